"""Which backends exist here, and why the missing ones are missing.

A backend is a module exposing the op functions with the reference's signatures (for example
``decode_step(logits, hidden, requests, state, head) -> StepOutput``). Nothing here imports a
backend until it is first asked for, so ``import haltkit`` stays cheap and never needs a GPU.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from types import ModuleType

import torch

__all__ = ["backends", "resolve_backend", "backend_module", "BACKENDS"]

BACKENDS = ("torch", "triton", "cuda", "cpu")


@functools.cache
def _probe(name: str) -> tuple[ModuleType | None, str]:
    """(module, '') when ``name`` works here, else (None, reason)."""
    if name == "torch":
        return importlib.import_module("haltkit.reference"), ""
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as e:
            return None, f"triton is not installed ({e})"
        interp = os.environ.get("TRITON_INTERPRET") == "1"
        if not torch.cuda.is_available() and not interp:
            return None, "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors)"
        return importlib.import_module("haltkit.kernels"), ""
    if name == "cuda":
        try:
            mod = importlib.import_module("haltkit._C")
        except ImportError as e:
            return None, f"the CUDA extension haltkit._C is not built ({e})"
        if not torch.cuda.is_available():
            return None, "haltkit._C is built but no CUDA device is visible"
        # Once per process: a driver older than the build's CUDA, or a GPU the module holds no
        # code for (it has sm_80 and sm_90a SASS and compute_90 PTX), would fail every launch.
        for index in range(torch.cuda.device_count()):
            why = mod.probe(index)
            if why:
                return None, why
        return importlib.import_module("haltkit.native").cuda_backend(mod), ""
    if name == "cpu":
        try:
            mod = importlib.import_module("haltkit._cpu")
        except ImportError as e:
            return None, f"the native CPU extension haltkit._cpu is not built ({e})"
        return importlib.import_module("haltkit.native").cpu_backend(mod), ""
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS + ('auto',)}")


def backends() -> dict[str, str]:
    """Every backend with ``"available"`` or the reason it is not.

    Example:
        >>> haltkit.backends()["torch"]
        'available'
    """
    return {name: _probe(name)[1] or "available" for name in BACKENDS}


# Dynamo must not trace the probe (importlib is off limits under fullgraph=True until the cache is
# warm): the answer is fixed for the process, so the compiled graph takes it as a constant.
@torch.compiler.assume_constant_result
def resolve_backend(backend: str, device: torch.device, op: str | None = None) -> str:
    """The concrete backend for ``backend`` ("auto" or a name) on ``device``.

    "auto" picks, on a CUDA device, cuda then triton then torch; on the CPU, the native cpu
    backend then torch (Triton's interpreter is a test tool, never chosen by "auto"). With
    ``op`` (e.g. "verify_step"), backends that do not implement that op yet are passed over.

    Raises:
        ValueError: unknown name, or a backend that cannot run on ``device``.
        RuntimeError: a backend that is not available here (or lacks ``op``), with the reason.
    """
    if backend == "auto":
        order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
        name = next(name for name in order if _probe(name)[0] is not None
                    and (op is None or hasattr(_probe(name)[0], op)))
        if device.type == "cuda" and name != "cuda":
            _warn_cuda_fallback(name)
        return name
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS + ('auto',)}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors, got tensors on {device}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, got tensors on {device}")
    mod, why = _probe(backend)
    if mod is None:
        raise RuntimeError(f"backend {backend!r} is not available: {why}")
    if op is not None and not hasattr(mod, op):
        raise RuntimeError(f"backend {backend!r} does not implement {op} yet")
    return backend


@functools.cache
def _warn_cuda_fallback(chosen: str) -> None:
    """Once per process: "auto" passed over a built haltkit._C that cannot run on this GPU."""
    why = _probe("cuda")[1]
    if why.startswith("the CUDA extension haltkit._C is not built"):
        return  # nothing to warn about: a build without nvcc uses Triton by design
    warnings.warn(f"haltkit: backend 'auto' uses {chosen!r} instead of 'cuda': {why}", RuntimeWarning, stacklevel=3)


def backend_module(name: str) -> ModuleType:
    """The module implementing backend ``name`` (must be available)."""
    mod, why = _probe(name)
    if mod is None:
        raise RuntimeError(f"backend {name!r} is not available: {why}")
    return mod
