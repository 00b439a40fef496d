"""The Python side of the native backends: tensors in, raw pointers to ``haltkit._cpu`` / ``haltkit._C``.

Both extension modules take flat tuples of ints (data pointers, shapes, strides, dtype codes and,
for CUDA, the stream handle) and no torch types, so they build against any PyTorch. This module
allocates the outputs, makes every ``[B]`` tensor contiguous (state tensors that are not are
updated through a contiguous copy) and wraps the result in the reference's output types.
Inputs are assumed validated by :mod:`haltkit.ops`.
"""

from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Callable

import torch

from .params import RequestBatch
from .state import DecodeState, StepOutput
from .value_head import HeadWeights

__all__ = ["NativeBackend", "cpu_backend", "cuda_backend", "DTYPE_CODES"]

#: The dtype numbering of csrc/include/haltkit/shim.cuh.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D tensor whose rows have unit column stride (a copy only when they do not)."""
    return t if t.stride(1) == 1 else t.contiguous()


def _ptrs(tensors: tuple[torch.Tensor, ...]) -> tuple[int, ...]:
    return tuple(t.data_ptr() for t in tensors)


class NativeBackend:
    """One native extension module seen as a haltkit backend (the reference's op signatures).

    Args:
        name: "cpu" or "cuda".
        module: the extension module (``haltkit._cpu`` or ``haltkit._C``).
        last_arg: returns the launcher's last argument for a device: the thread count on the
            CPU, the current stream's handle on a GPU.
    """

    def __init__(self, name: str, module: ModuleType, last_arg: Callable[[torch.device], int]) -> None:
        self.name = name
        self.module = module
        self._last_arg = last_arg

    def __repr__(self) -> str:
        return f"NativeBackend({self.name!r}, {self.module.__name__})"

    def decode_step(
        self,
        logits: torch.Tensor,
        hidden: torch.Tensor | None,
        requests: RequestBatch,
        state: DecodeState,
        head: HeadWeights | None,
    ) -> StepOutput:
        """One fused decode step; see :func:`haltkit.reference.decode_step` for the semantics.

        Args:
            logits: [B, V] float32 | bfloat16 | float16.
            hidden: [B, d] float32 | bfloat16 | float16, or None when ``head`` is None.
            requests: the packed requests, [B] each.
            state: the decode state, [B] int32 each; updated in place.
            head: the value head's weights, or None.
        Returns:
            A :class:`~haltkit.StepOutput`.
        """
        B = logits.shape[0]
        dev = logits.device
        out = StepOutput(
            torch.empty(B, dtype=torch.int64, device=dev),
            torch.empty(B, dtype=torch.float32, device=dev),
            torch.empty(B, dtype=torch.float32, device=dev),
            torch.empty(B, dtype=torch.int64, device=dev),
            torch.zeros((), dtype=torch.int64, device=dev),
        )
        return self.decode_step_into(out, logits, hidden, requests, state, head)

    def decode_step_into(
        self,
        out: StepOutput,
        logits: torch.Tensor,
        hidden: torch.Tensor | None,
        requests: RequestBatch,
        state: DecodeState,
        head: HeadWeights | None,
    ) -> StepOutput:
        """:meth:`decode_step` writing into ``out`` (contiguous tensors of the output shapes and
        dtypes, e.g. poisoned by a test to show that every element is written). Returns ``out``."""
        B, V = logits.shape
        dev = logits.device
        if B == 0:
            out.num_active.zero_()
            return out
        logits = _rows(logits)
        if head is None:
            hid = (0, 0, 0, 0)
            w = (0, 0, 0, 0, 0, 0, 0)
        else:
            hidden = _rows(hidden)
            hid = (hidden.data_ptr(), hidden.stride(0), DTYPE_CODES[hidden.dtype], hidden.shape[1])
            weights = tuple(t.contiguous() for t in head)
            w = (*_ptrs(weights), head.w1.shape[0], DTYPE_CODES[head.w1.dtype], int(head.is_mlp))
        req = tuple(t.contiguous() for t in requests.tensors())
        st_in = state.tensors()
        st = tuple(t.contiguous() for t in st_in)
        # A stream belongs to a device: launch with the logits' device current.
        with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
            self.module.decode_step(
                (logits.data_ptr(), logits.stride(0), DTYPE_CODES[logits.dtype], B, V),
                hid,
                w,
                (*_ptrs(req), requests.eos_ids.shape[1], requests.exit_tokens.shape[1]),
                _ptrs(st),
                _ptrs(out),
                self._last_arg(dev),
            )
        for mine, theirs in zip(st, st_in):
            if mine.data_ptr() != theirs.data_ptr():
                theirs.copy_(mine)
        return out


def cpu_backend(module: ModuleType) -> NativeBackend:
    """The "cpu" backend over ``haltkit._cpu``: rows spread over ``torch.get_num_threads()`` threads."""
    return NativeBackend("cpu", module, lambda device: torch.get_num_threads())


def cuda_backend(module: ModuleType) -> NativeBackend:
    """The "cuda" backend over ``haltkit._C``: kernels run on the current stream of the logits' device.

    Raises:
        RuntimeError: when no CUDA device is visible (the extension itself also refuses to launch).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("the cuda backend needs a visible CUDA device; none is available here")
    return NativeBackend("cuda", module, lambda device: torch.cuda.current_stream(device).cuda_stream)
