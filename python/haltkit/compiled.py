"""Compiled decode steps, cached across calls: one per (model, batch-size bucket, capacity).

On the CPU a step is the model's forward under ``torch.compile(dynamic=False)``; on a GPU the
same under ``mode="reduce-overhead"``, which captures it in a CUDA graph and replays it. Either
needs fixed shapes and fixed buffer addresses, so each bucket owns a pooled :class:`ModelRunner`
whose KV-cache buffers are allocated once and reused by every later call (their addresses are
marked static for the CUDA graph). Compaction copies the surviving rows into the next smaller
bucket's buffers. ``clear()`` drops everything (models, buffers and compiled code).

Across processes, torch's own on-disk caches carry the compiled code: inductor's FX-graph cache
and the AOTAutograd cache (both on by default in torch >= 2.6) key each graph by its content and
keep the generated C++ and its shared object under ``TORCHINDUCTOR_CACHE_DIR`` (default
``/tmp/torchinductor_<user>``). A second process tracing the same step (same model, dtype, batch
bucket and capacity) loads it instead of generating and compiling it again; only dynamo's trace
is paid again. The capacity is rounded up to a multiple of 64 (``engine._capacity``), so calls of
similar lengths share one compiled step; each new (bucket, capacity) compiles once.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref

import torch
from torch import nn

from .runner import ModelRunner, RaggedKVCache

__all__ = ["CompiledRunner", "compiled_runner", "move_to_bucket", "clear", "new_call", "compile_seconds_since",
           "exclusive"]

# model -> {(batch, capacity): runner}. The runner holds the model, so entries live until
# clear(): a compiled step is only worth its compile time if it is kept.
_POOL: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
#: Compiled graphs per code object that dynamo keeps (buckets x step widths x models).
_RECOMPILE_LIMIT = 64
#: Seconds spent compiling, ever (generate reports the difference over its call).
_COMPILE_SECONDS = [0.0]
#: Which generate call is running (a step's first run in each call checks every guard).
_CALL = [0]


#: The compiled generate call in flight: (thread name, model description), or None.
_RUNNING: list = [None]
_RUNNING_LOCK = threading.Lock()


@contextlib.contextmanager
def exclusive(model: nn.Module):
    """Hold the process's one slot for a compiled ``generate`` call; raise if it is taken.

    Compiled calls share state that a second call in another thread would overwrite: the pooled
    runners' KV caches (one per model, batch bucket and capacity, draft models included), and
    torch.compile's process-wide guard stance (``skip_guard_eval_unsafe``), under which another
    call's first step could run a graph compiled for other inputs. So a second one is refused,
    never silently wrong.

    Raises:
        RuntimeError: a compiled call is already running, naming its thread and model.
    """
    me = (threading.current_thread().name, f"{type(model).__name__} at {id(model):#x}")
    with _RUNNING_LOCK:
        if _RUNNING[0] is not None:
            thread, what = _RUNNING[0]
            raise RuntimeError(
                f"haltkit.generate(compile=True) on {me[1]} (thread {me[0]!r}): another compiled call is running "
                f"on {what} (thread {thread!r}). Compiled calls share pooled KV caches and torch.compile's guard "
                "stance, so they run one at a time per process: wait for it, or pass compile=False (eager calls "
                "may run concurrently)"
            )
        _RUNNING[0] = me
    try:
        yield
    finally:
        with _RUNNING_LOCK:
            _RUNNING[0] = None


def new_call() -> float:
    """Mark the start of a generate call; returns the compile seconds so far."""
    _CALL[0] += 1
    return _COMPILE_SECONDS[0]


def compile_seconds_since(mark: float) -> float:
    """Seconds spent compiling since ``mark`` (from :func:`new_call`)."""
    return _COMPILE_SECONDS[0] - mark


class CompiledRunner(ModelRunner):
    """A pooled runner whose forwards run compiled; one per (model, batch bucket, capacity)."""

    compiled = True

    def __init__(self, model: nn.Module, batch: int, capacity: int, layers: int | None = None) -> None:
        super().__init__(model, batch, capacity, layers=layers)
        self._steps: dict[tuple, object] = {}
        self._checked: tuple[int, set] = (-1, set())  # (call, steps already run fully guarded in it)

    def step(self, fn, input_ids: torch.Tensor, start: torch.Tensor, view: int, *args):
        """As :meth:`ModelRunner.step`, compiled once per (fn, step width q); ``view`` is ignored
        (a compiled step always attends over the full static cache).

        On the CPU the whole step (forward and epilogue) is one compiled graph with a C++
        wrapper. On a GPU only the forward is compiled and captured in a CUDA graph (the epilogue
        mutates per-call state tensors, which a graph cannot own) and ``fn`` runs eagerly around
        it: one fused launch. Within one ``generate`` call the first run of a step checks every
        dynamo guard; later runs, whose inputs differ only in values, check only the guards that
        tell compiled variants apart (``skip_guard_eval_unsafe``), which on a small model is a
        large part of a step.
        """
        q = input_ids.shape[1]
        input_ids = input_ids.contiguous()  # one stride per shape, so guards never tell calls apart by it
        positions = start[:, None] + torch.arange(q, device=start.device)[None, :]
        self.cache.view_len = self.capacity + 1
        cuda = self.device.type == "cuda"
        key = ("forward" if cuda else fn, q)
        if self._checked[0] != _CALL[0]:
            self._checked = (_CALL[0], set())
        checked = self._checked[1]
        compiled = self._steps.get(key)
        if compiled is None:
            if torch._dynamo.config.recompile_limit < _RECOMPILE_LIMIT:
                torch._dynamo.config.recompile_limit = _RECOMPILE_LIMIT
            t0 = time.perf_counter()
            if cuda:
                compiled = torch.compile(ModelRunner.forward_at.__get__(self), dynamic=False, mode="reduce-overhead")
                for _ in range(3):  # compile, record the CUDA graph, replay it
                    compiled(input_ids, positions)
                torch.cuda.synchronize()
            else:
                compiled = torch.compile(fn, dynamic=False, options={"cpp_wrapper": True})
                out = compiled(self, input_ids, positions, *args)
            _COMPILE_SECONDS[0] += time.perf_counter() - t0
            self._steps[key] = compiled
            checked.add(key)
            if not cuda:
                return out
        if cuda:
            self.forward_at = compiled  # the instance attribute shadows the eager method
            compiled_fn, call_args = fn, (self, input_ids, positions, *args)
        else:
            compiled_fn, call_args = compiled, (self, input_ids, positions, *args)
        if key in checked:
            try:
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    return compiled_fn(*call_args)
            except RuntimeError as e:
                # Dynamo refuses before running anything when these inputs would need a new
                # graph; run them fully guarded instead (and compile for them).
                if "skip_guard_eval_unsafe" not in str(e):
                    raise
        checked.add(key)
        return compiled_fn(*call_args)


def compiled_runner(model: nn.Module, batch: int, capacity: int, layers: int | None = None) -> CompiledRunner:
    """The pooled compiled runner of ``model`` (or of its first ``layers`` layers, an early-layer
    draft that brings the target's cache) for this batch bucket and capacity."""
    runners = _POOL.setdefault(model, {})
    # The model's dtype and device are part of the key: a model converted in place after a compiled
    # call (model.to(torch.bfloat16)) gets caches of its new dtype, never the old buffers.
    p = next(model.parameters())
    key = (batch, capacity, layers, p.dtype, p.device)
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
