"""The public fused ops: validate once at the boundary, pick a backend, run as a torch.library op."""

from __future__ import annotations

from dataclasses import fields
from typing import Optional

import torch

from .backends import backend_module, resolve_backend
from .params import RequestBatch
from .state import DecodeState, StepOutput
from .value_head import HeadWeights, MarginalValueHead

__all__ = ["decode_step", "verify_step", "verify_step_flat", "sampling_probs"]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_STATE_FIELDS = ("num_generated", "think_tokens", "below_count", "phase", "forced_pos", "think_end", "finish_reason")


def _check_tensor(name: str, t: object, shape: tuple, dtypes: tuple, device: torch.device) -> None:
    # The common case first, without generators: this runs ~20 times per decode step.
    if isinstance(t, torch.Tensor) and t.dtype in dtypes and t.device == device and t.dim() == len(shape):
        for got, want in zip(t.shape, shape):
            if want is not None and got != want:
                break
        else:
            return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype {' | '.join(str(d)[6:] for d in dtypes)}, got {str(t.dtype)[6:]}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the logits are on {device}")


def _as_weights(head: MarginalValueHead | HeadWeights | None) -> HeadWeights | None:
    if head is None or isinstance(head, HeadWeights):
        return head
    if isinstance(head, MarginalValueHead):
        return head.weights()
    raise TypeError(f"head must be a MarginalValueHead, HeadWeights or None, got {type(head).__name__}")


def validate_step_inputs(
    logits: torch.Tensor,
    hidden: torch.Tensor | None,
    requests: RequestBatch,
    state: DecodeState,
    head: HeadWeights | None,
) -> None:
    """Shapes, dtypes and devices of one step's inputs, checked once; raises ValueError/TypeError."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be a [B, V] tensor, got shape {list(logits.shape)}")
    B, V = logits.shape
    dev = logits.device
    _check_tensor("logits", logits, (B, V), FLOAT_DTYPES, dev)
    if V < 1:
        raise ValueError("logits must have at least one column (V >= 1)")
    if not isinstance(requests, RequestBatch):
        raise TypeError(f"requests must be a RequestBatch (see haltkit.pack_requests), got {type(requests).__name__}")
    if not isinstance(state, DecodeState):
        raise TypeError(f"state must be a DecodeState, got {type(state).__name__}")
    for name, rows in (("requests", requests.temperature), ("state", state.num_generated)):
        if isinstance(rows, torch.Tensor) and rows.dim() == 1 and rows.shape[0] != B:
            raise ValueError(f"{name} has {rows.shape[0]} rows but the logits have {B} (one row per sequence)")
    for f, t in zip(fields(requests), requests.tensors()):
        name = f.name
        dt = {"temperature": torch.float32, "top_p": torch.float32, "min_p": torch.float32,
              "cost_of_time": torch.float32, "seed": torch.int64}.get(name, torch.int32)
        shape = (B, None) if name in ("eos_ids", "exit_tokens") else (B,)
        _check_tensor(f"requests.{name}", t, shape, (dt,), dev)
    for name in _STATE_FIELDS:
        _check_tensor(f"state.{name}", getattr(state, name), (B,), (torch.int32,), dev)
    if requests.token_end() > V:  # a forced exit token would be read past the end of its row
        raise ValueError(f"the requests name token id {requests.token_end() - 1} (in eos_ids or exit_tokens) but "
                         f"the logits have V = {V} columns: pack the requests with vocab_size = {V}")
    if head is None:
        if hidden is not None:
            raise ValueError("hidden was given but head is None: pass the value head too, or hidden=None")
        return
    d = head.d_model
    if hidden is None:
        raise ValueError(f"head needs the hidden states: pass hidden of shape [{B}, {d}]")
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 2 and hidden.shape[1] != d:
        raise ValueError(f"hidden has {hidden.shape[1]} features but the head reads d_model = {d}: "
                         f"expected hidden of shape [{B}, {d}], got {list(hidden.shape)}")
    _check_tensor("hidden", hidden, (B, d), FLOAT_DTYPES, dev)
    wdt = head.w1.dtype
    R = head.w1.shape[0]
    _check_tensor("head.w1", head.w1, (R, d + 2), FLOAT_DTYPES, dev)
    _check_tensor("head.b1", head.b1, (R,), (wdt,), dev)
    _check_tensor("head.w2", head.w2, (R if head.is_mlp else 0,), (wdt,), dev)
    _check_tensor("head.b2", head.b2, (1,), (wdt,), dev)
    if not head.is_mlp and R != 1:
        raise ValueError(f"a linear head has w1 of shape [1, {d + 2}], got {list(head.w1.shape)}")


@torch.library.custom_op(
    "haltkit::decode_step",
    mutates_args=_STATE_FIELDS,
    device_types=None,
)
def _decode_step_op(
    logits: torch.Tensor,
    hidden: Optional[torch.Tensor],
    temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
    seed: torch.Tensor, cost_of_time: torch.Tensor, patience: torch.Tensor,
    min_new_tokens: torch.Tensor, max_new_tokens: torch.Tensor, thinking_budget: torch.Tensor,
    eos_ids: torch.Tensor, exit_tokens: torch.Tensor, exit_len: torch.Tensor,
    num_generated: torch.Tensor, think_tokens: torch.Tensor, below_count: torch.Tensor,
    phase: torch.Tensor, forced_pos: torch.Tensor, think_end: torch.Tensor, finish_reason: torch.Tensor,
    w1: Optional[torch.Tensor], b1: Optional[torch.Tensor], w2: Optional[torch.Tensor], b2: Optional[torch.Tensor],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    requests = RequestBatch(temperature, top_k, top_p, min_p, seed, cost_of_time, patience,
                            min_new_tokens, max_new_tokens, thinking_budget, eos_ids, exit_tokens, exit_len)
    state = DecodeState(num_generated, think_tokens, below_count, phase, forced_pos, think_end, finish_reason)
    head = None if w1 is None else HeadWeights(w1, b1, w2, b2)
    out = backend_module(backend).decode_step(logits, hidden, requests, state, head)
    return tuple(out)


@_decode_step_op.register_fake
def _(
    logits, hidden, temperature, top_k, top_p, min_p, seed, cost_of_time, patience,
    min_new_tokens, max_new_tokens, thinking_budget, eos_ids, exit_tokens, exit_len,
    num_generated, think_tokens, below_count, phase, forced_pos, think_end, finish_reason,
    w1, b1, w2, b2, backend,
):
    B = logits.shape[0]
    f32 = dict(dtype=torch.float32, device=logits.device)
    i64 = dict(dtype=torch.int64, device=logits.device)
    return (logits.new_empty(B, **i64), logits.new_empty(B, **f32), logits.new_empty(B, **f32),
            logits.new_empty(B, **i64), logits.new_empty((), **i64))


def decode_step(
    logits: torch.Tensor,
    hidden: torch.Tensor | None,
    requests: RequestBatch,
    state: DecodeState,
    head: MarginalValueHead | HeadWeights | None = None,
    backend: str = "auto",
) -> StepOutput:
    """One fused decode step: value head, sampling, per-sequence termination and compaction.

    The semantics are those of :mod:`haltkit.reference.decode_step` (its docstring is the
    specification). No host synchronisation happens inside; ``state`` is updated in place.

    Args:
        logits: [B, V] float32 | bfloat16 | float16, the step's logits (rows with unit stride).
        hidden: [B, d] float32 | bfloat16 | float16 final hidden states, or None without a head.
        requests: from :func:`haltkit.pack_requests`, [B] tensors on the logits' device.
        state: a :class:`DecodeState` ([B] int32 tensors), updated in place.
        head: a :class:`MarginalValueHead` (or its :class:`HeadWeights`), or None; without a
            head the values are NaN, so a request with a cost_of_time finishes with ERROR.
        backend: "auto", "torch", "triton", "cuda" or "cpu" (see :func:`haltkit.backends`).

    Returns:
        A :class:`StepOutput` (tokens, logprobs, values, active_idx, num_active).

    Raises:
        ValueError / TypeError: a shape, dtype, device or argument is off (the message names it).
        RuntimeError: the backend is not available here (the message says why).

    Example:
        >>> req = haltkit.pack_requests(SamplingParams(temperature=0), ExitPolicy(max_new_tokens=8), V, B)
        >>> state = haltkit.DecodeState.new(B)
        >>> out = haltkit.decode_step(logits, None, req, state)
    """
    w = _as_weights(head)
    validate_step_inputs(logits, hidden, requests, state, w)
    name = resolve_backend(backend, logits.device)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if hidden is not None and hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    if not torch.compiler.is_compiling():
        # Eager calls go straight to the backend: the torch.library op exists for graphs, and
        # its Python dispatch of a mutating op costs ~0.5 ms, more than the kernel at small B.
        with torch.no_grad():
            return backend_module(name).decode_step(logits, hidden, requests, state, w)
    out = _decode_step_op(
        logits, hidden, *requests.tensors(), *state.tensors(),
        *(w if w is not None else (None, None, None, None)), name,
    )
    return StepOutput(*out)


# haltkit::verify_step lives beside this module and reuses its checks, so it is imported last.
from .speculative import sampling_probs, verify_step, verify_step_flat  # noqa: E402
