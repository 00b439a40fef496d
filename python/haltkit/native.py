"""The Python side of the native backends: tensors in, raw pointers to ``haltkit._cpu`` / ``haltkit._C``.

Both extension modules take flat tuples of ints (data pointers, shapes, strides, dtype codes and,
for CUDA, the stream handle) and no torch types, so they build against any PyTorch. This module
allocates the outputs, makes every ``[B]`` tensor contiguous (state tensors that are not are
updated through a contiguous copy) and wraps the result in the reference's output types.
Inputs are assumed validated by :mod:`haltkit.ops`.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Callable

import torch

from .params import RequestBatch
from .reference.verify_step import VerifyOutput
from .state import DecodeState, StepOutput
from .value_head import HeadWeights

__all__ = ["NativeBackend", "cpu_backend", "cuda_backend", "emulated_cuda_backend", "DTYPE_CODES"]

#: The dtype numbering of csrc/include/haltkit/shim.cuh.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D tensor whose rows have unit column stride (a copy only when they do not)."""
    return t if t.stride(1) == 1 else t.contiguous()


def _hidden_rows(hidden: torch.Tensor | None, head: HeadWeights | None) -> tuple[torch.Tensor | None, tuple]:
    """The [B, d] hidden states with unit column stride (kept alive by the caller for the launch)
    and the launchers' hidden tuple: (ptr, row stride, dtype code, d), zeros without a head."""
    if head is None:
        return None, (0, 0, 0, 0)
    hidden = _rows(hidden)
    return hidden, (hidden.data_ptr(), hidden.stride(0), DTYPE_CODES[hidden.dtype], hidden.shape[1])


def _ptrs(tensors: tuple[torch.Tensor, ...]) -> tuple[int, ...]:
    return tuple(t.data_ptr() for t in tensors)


class NativeBackend:
    """One native extension module seen as a haltkit backend (the reference's op signatures).

    Args:
        name: "cpu" or "cuda".
        module: the extension module (``haltkit._cpu`` or ``haltkit._C``).
        last_args: returns the launcher's last arguments for a device: (thread count,) on the
            CPU; (device index, current stream's handle) on a GPU, whose launchers make that
            device current for the launch.
        sm_count: the SMs of a device, for the cuda backend's row split (default: torch's
            device properties; the emulated device reports its own).
    """

    #: The cuda decode_step's blocks per greedy row: None picks it from the batch and the GPU
    #: (see :meth:`_parts`); an int forces it (tests use it to run the split path on any batch).
    split_rows: int | None = None

    def __init__(self, name: str, module: ModuleType, last_args: Callable[[torch.device], tuple[int, ...]],
                 sm_count: Callable[[torch.device], int] | None = None) -> None:
        self.name = name
        self.module = module
        self._last_args = last_args
        self._sm_count = sm_count

    def _parts(self, B: int, V: int, dev: torch.device) -> int:
        """Blocks per greedy row for a cuda decode_step: with fewer rows than half the SMs, a row's
        single pass is split so the batch can use the whole chip, in slices of >= 8192 tokens
        (each block then still streams >= 32 KiB of fp32 logits)."""
        if self.split_rows is not None:
            return max(1, min(self.split_rows, -(-V // 4)))  # at least one group of four tokens each
        sms = (self._sm_count or _sm_count)(dev)
        return 1 if 2 * B > sms else max(1, min(sms // B, V // 8192, 64))

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
        if B == 0:
            out.num_active.zero_()
            return out
        logits = _rows(logits)
        hidden, hid = _hidden_rows(hidden, head)
        split, workspace = None, None
        if self.name == "cuda":
            parts = self._parts(B, V, logits.device)
            if parts > 1:  # B * parts GreedyPart records of 16 bytes
                workspace = torch.empty(B * parts * 16, dtype=torch.uint8, device=logits.device)
            split = (0 if workspace is None else workspace.data_ptr(), parts)
        self._launch(
            "decode_step", logits.device, requests, state, head,
            (logits.data_ptr(), logits.stride(0), DTYPE_CODES[logits.dtype], B, V), hid, None, _ptrs(out), split,
        )
        return out

    def verify_step(
        self,
        target_logits: torch.Tensor,
        hidden: torch.Tensor | None,
        draft_tokens: torch.Tensor,
        draft_lens: torch.Tensor,
        requests: RequestBatch,
        state: DecodeState,
        head: HeadWeights | None,
        draft_probs: torch.Tensor | None = None,
        method: str = "exact",
    ) -> VerifyOutput:
        """One fused verification step; see :func:`haltkit.reference.verify_step` for the semantics.

        Args:
            target_logits: [B, K+1, V] float32 | bfloat16 | float16.
            hidden: [B, K+1, d] float32 | bfloat16 | float16, or None when ``head`` is None.
            draft_tokens: [B, K] int64.
            draft_lens: [B] int32.
            requests: the packed requests, [B] each.
            state: the decode state, [B] int32 each; updated in place.
            head: the value head's weights, or None.
            draft_probs: method "rejection": [B, K, V] or [B, K] (point masses); else None.
            method: "exact" or "rejection".
        Returns:
            A :class:`~haltkit.VerifyOutput`.
        """
        B, K1, V = target_logits.shape
        dev = target_logits.device
        f32, i32 = dict(dtype=torch.float32, device=dev), dict(dtype=torch.int32, device=dev)
        out = VerifyOutput(
            torch.empty(B, K1, dtype=torch.int64, device=dev), torch.empty(B, **i32), torch.empty(B, **i32),
            torch.empty(B, K1, **f32), torch.empty(B, K1, **f32),
            torch.empty(B, dtype=torch.int64, device=dev), torch.zeros((), dtype=torch.int64, device=dev),
        )
        if B == 0:
            return out
        x = target_logits if target_logits.stride(2) == 1 else target_logits.contiguous()
        h = None if head is None else (hidden if hidden.stride(2) == 1 else hidden.contiguous())
        hid = (0, 0, 0, 0, 0) if h is None else (
            h.data_ptr(), h.stride(0), h.stride(1), DTYPE_CODES[h.dtype], h.shape[2])
        tokens = draft_tokens.contiguous()
        lens = draft_lens.contiguous()
        probs = None if method != "rejection" or draft_probs is None else draft_probs.contiguous()
        drafts = (tokens.data_ptr(), lens.data_ptr(), 0 if probs is None else probs.data_ptr(),
                  0 if probs is None else DTYPE_CODES[probs.dtype], 0 if probs is None else probs.dim(),
                  int(method == "rejection"))
        self._launch(
            "verify_step", dev, requests, state, head,
            (x.data_ptr(), x.stride(0), x.stride(1), DTYPE_CODES[x.dtype], B, K1, V), hid, drafts, _ptrs(out),
        )
        return out

    def exit_rules(
        self,
        logits: torch.Tensor,
        hidden: torch.Tensor | None,
        requests: RequestBatch,
        state: DecodeState,
        head: HeadWeights | None,
        plan: torch.Tensor,
        token: torch.Tensor,
        halt_token: torch.Tensor,
        active: torch.Tensor,
    ) -> None:
        """decode_step's exit rules around another sampler; see :func:`haltkit.reference.exit_rules`.

        Args:
            logits: [B, V] float32 with unit column stride; forced rows are overwritten.
            hidden: [B, d] float32 | bfloat16 | float16, or None when ``head`` is None.
            requests: [M >= B] each.
            state: [M] int32 each; committed rows are updated.
            head: the value head's weights, or None.
            plan: [M, PLAN_WORDS] int32, contiguous.
            token: [B] int64, -1 where no token was drawn for the pending plan.
            halt_token: [M] int64.
            active: [M] bool.
        """
        B, V = logits.shape
        if B == 0:
            return
        if logits.stride(1) != 1 or not plan.is_contiguous():
            raise ValueError("exit_rules: logits rows and the plan must be contiguous (they are written in place)")
        hidden, hid = _hidden_rows(hidden, head)
        keep = (plan, token.contiguous(), halt_token.contiguous(), active.contiguous())  # alive for the call
        rules = _ptrs(keep)
        self._launch("exit_rules", logits.device, requests, state, head,
                     (logits.data_ptr(), logits.stride(0), DTYPE_CODES[logits.dtype], B, V), hid, None, rules)

    def _launch(self, op: str, dev: torch.device, requests: RequestBatch, state: DecodeState,
                head: HeadWeights | None, logits: tuple, hidden: tuple, drafts: tuple | None,
                outputs: tuple, extra: tuple | None = None) -> None:
        """Calls the module's ``op`` with the requests, state and head as pointer tuples
        (``outputs``: the op's outputs, or exit_rules' plan, token, halt_token, active; ``extra``:
        a last tuple some ops take, the cuda decode_step's row split)."""
        if head is None:
            w = (0, 0, 0, 0, 0, 0, 0)
        else:
            weights = tuple(t.contiguous() for t in head)
            w = (*_ptrs(weights), head.w1.shape[0], DTYPE_CODES[head.w1.dtype], int(head.is_mlp))
        req = tuple(t.contiguous() for t in requests.tensors())
        st_in = state.tensors()
        st = tuple(t.contiguous() for t in st_in)
        args = [logits, hidden, w, (*_ptrs(req), requests.eos_ids.shape[1], requests.exit_tokens.shape[1]), _ptrs(st)]
        if drafts is not None:
            args.append(drafts)
        # The cuda launchers make the tensors' device current themselves (a stream belongs to it).
        getattr(self.module, op)(*args, outputs, *(() if extra is None else (extra,)), *self._last_args(dev))
        for mine, theirs in zip(st, st_in):
            if mine.data_ptr() != theirs.data_ptr():
                theirs.copy_(mine)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def cpu_backend(module: ModuleType) -> NativeBackend:
    """The "cpu" backend over ``haltkit._cpu``: rows spread over ``torch.get_num_threads()`` threads."""
    return NativeBackend("cpu", module, lambda device: (torch.get_num_threads(),))


def cuda_backend(module: ModuleType) -> NativeBackend:
    """The "cuda" backend over ``haltkit._C``: kernels run on the current stream of the logits' device.

    Raises:
        RuntimeError: when no CUDA device is visible (the extension itself also refuses to launch).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("the cuda backend needs a visible CUDA device; none is available here")
    return NativeBackend("cuda", module,
                         lambda device: (device.index, torch.cuda.current_stream(device).cuda_stream))


def emulated_cuda_backend(module: ModuleType) -> NativeBackend:
    """The "cuda" backend over ``haltkit._cuda_emu``: the CUDA kernels' own sources built against a
    host emulation of the CUDA execution model (csrc/emu), run on CPU tensors. A test tool, never
    chosen by a backend name: see ``module.set_schedule`` for the warp schedules it runs under.

    Example:
        >>> import haltkit._cuda_emu as emu
        >>> out = emulated_cuda_backend(emu).decode_step(logits, None, requests, state, None)
    """
    return NativeBackend("cuda", module, lambda device: (0, 0), lambda device: module.multiprocessor_count())
