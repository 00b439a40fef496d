"""Compiled decode steps, cached across calls: one per (model, batch-size bucket, capacity).

On the CPU a step is the model's forward under ``torch.compile(dynamic=False)``; on a GPU the
same under ``mode="reduce-overhead"``, which captures it in a CUDA graph and replays it. Either
needs fixed shapes and fixed buffer addresses, so each bucket owns a pooled :class:`ModelRunner`
whose KV-cache buffers are allocated once and reused by every later call (their addresses are
marked static for the CUDA graph). Compaction copies the surviving rows into the next smaller
bucket's buffers. ``clear()`` drops everything (models, buffers and compiled code).
"""

from __future__ import annotations

import time
import weakref

import torch
from torch import nn

from .runner import ModelRunner, RaggedKVCache

__all__ = ["CompiledRunner", "compiled_runner", "move_to_bucket", "clear"]

# model -> {(batch, capacity): runner}. The runner holds the model, so entries live until
# clear(): a compiled step is only worth its compile time if it is kept.
_POOL: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
#: Compiled graphs per code object that dynamo keeps (buckets x step widths x models).
_RECOMPILE_LIMIT = 64


class CompiledRunner(ModelRunner):
    """A pooled runner whose forwards run compiled; one per (model, batch bucket, capacity)."""

    compiled = True

    def __init__(self, model: nn.Module, batch: int, capacity: int, layers: int | None = None) -> None:
        super().__init__(model, batch, capacity, layers=layers)
        self._steps: dict[tuple, object] = {}
        self._fresh_s = 0.0

    def step(self, fn, input_ids: torch.Tensor, start: torch.Tensor, view: int, *args):
        """As :meth:`ModelRunner.step`, compiled once per (fn, step width q); ``view`` is ignored
        (a compiled step always attends over the full static cache).

        On the CPU the whole step (forward and epilogue) is one compiled graph. On a GPU only the
        forward is compiled and captured in a CUDA graph (the epilogue mutates per-call state
        tensors, which a graph cannot own) and ``fn`` runs eagerly around it: one fused launch.
        """
        q = input_ids.shape[1]
        positions = start[:, None] + torch.arange(q, device=start.device)[None, :]
        self.cache.view_len = self.capacity + 1
        cuda = self.device.type == "cuda"
        key = ("forward" if cuda else fn, q)
        compiled = self._steps.get(key)
        if compiled is None:
            if torch._dynamo.config.recompile_limit < _RECOMPILE_LIMIT:
                torch._dynamo.config.recompile_limit = _RECOMPILE_LIMIT
            if cuda:
                compiled = torch.compile(ModelRunner.forward_at.__get__(self), dynamic=False, mode="reduce-overhead")
                # Warm-up, then two calls: the first records the CUDA graph, the next replays it.
                t0 = time.perf_counter()
                for _ in range(3):
                    compiled(input_ids, positions)
                torch.cuda.synchronize()
                self._fresh_s += time.perf_counter() - t0
            else:
                compiled = torch.compile(fn, dynamic=False)
            self._steps[key] = compiled
            if not cuda:
                t0 = time.perf_counter()
                out = compiled(self, input_ids, positions, *args)
                self._fresh_s += time.perf_counter() - t0
                return out
        if cuda:
            self.forward_at = compiled  # the instance attribute shadows the eager method
            return fn(self, input_ids, positions, *args)
        return compiled(self, input_ids, positions, *args)

    def compile_seconds(self) -> float:
        """Seconds spent compiling since the last call (each compile is reported once)."""
        s, self._fresh_s = self._fresh_s, 0.0
        return s


def compiled_runner(model: nn.Module, batch: int, capacity: int, layers: int | None = None) -> CompiledRunner:
    """The pooled compiled runner of ``model`` (or of its first ``layers`` layers, an early-layer
    draft that brings the target's cache) for this batch bucket and capacity."""
    runners = _POOL.setdefault(model, {})
    key = (batch, capacity, layers)
    if key not in runners:
        runners[key] = CompiledRunner(model, batch, capacity, layers)
    return runners[key]


def _allocate_like(src: RaggedKVCache, dst: RaggedKVCache) -> None:
    for bufs_src, bufs_dst in ((src.keys, dst.keys), (src.values, dst.values)):
        for i, buf in enumerate(bufs_src):
            if buf is not None and bufs_dst[i] is None:
                bufs_dst[i] = buf.new_zeros((dst.batch,) + tuple(buf.shape[1:]))
                if bufs_dst[i].is_cuda:
                    torch._dynamo.mark_static_address(bufs_dst[i])


def move_to_bucket(runner: ModelRunner, idx: torch.Tensor) -> CompiledRunner:
    """Copy rows ``idx`` of ``runner``'s cache into the pooled runner of bucket ``len(idx)``."""
    dst = compiled_runner(runner.model, idx.shape[0], runner.capacity)
    _allocate_like(runner.cache, dst.cache)
    runner.cache.copy_rows_into(dst.cache, idx)
    return dst


def clear() -> None:
    """Forget every compiled step and pooled cache."""
    _POOL.clear()
    torch._dynamo.reset()
