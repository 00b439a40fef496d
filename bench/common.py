"""Small helpers the benchmarks share: interleaved timing, copy bandwidth, machine info, output.

Every figure a benchmark reports is a ratio against a baseline timed in the same run, or a
fraction of a hardware floor measured in the same run; these helpers make that the easy path.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

__all__ = ["sync", "time_interleaved", "copy_bandwidth", "machine_info", "write_results"]


def sync(device: torch.device) -> None:
    """Wait for the device (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Microseconds of one call: CUDA events on a GPU, wall clock around a sync elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e6


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    warmup: int,
    reps: int,
    budget_s: float,
    before_each: Callable[[str], None] | None = None,
    min_reps: int = 3,
) -> dict[str, list[float]]:
    """Microseconds per call of each contender, the contenders alternating within every repetition
    (in a new random order each repetition).

    Args:
        fns: name -> zero-argument callable.
        device: where they run (CUDA events on a GPU).
        warmup: untimed repetitions first (compilation, caches, allocator).
        reps: timed repetitions at most.
        budget_s: stop after this many seconds of timed repetitions, once ``min_reps`` are done.
        before_each: called with the contender's name before each call, outside the timed
            region (e.g. to restore a state the call updates in place).
        min_reps: timed repetitions made whatever the budget.
    Returns:
        name -> list of microseconds, one per timed repetition.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = None
    for rep in range(warmup + reps):
        if rep == warmup:
            start = time.perf_counter()
        # A fresh (seeded) order every repetition, so no contender always runs right after the
        # same (e.g. a memory-heavy) neighbour: rotating the list would keep every contender's
        # cyclic predecessor, and the one after the compiled reference paid ~0.3 ms for it.
        items = random.Random(rep).sample(list(fns.items()), len(fns))
        for name, fn in items:
            if before_each is not None:
                before_each(name)
            us = _time_once(fn, device)
            if rep >= warmup:
                times[name].append(us)
        if start is not None and rep + 1 - warmup >= min_reps and time.perf_counter() - start > budget_s:
            break
    return times


def copy_bandwidth(device: torch.device, mib: int | None = None) -> float:
    """Bytes moved per second (read + write) by a large on-device copy, median of 10 after warm-up."""
    n = (mib or (512 if device.type == "cuda" else 256)) << 20
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    runs = [_time_once(lambda: dst.copy_(src), device) for _ in range(12)][2:]
    return 2 * n / (statistics.median(runs) * 1e-6)


def read_bandwidth(device: torch.device, mib: int = 256) -> float:
    """Bytes read per second by a single pass (a sum) over a large buffer, median of 10 after warm-up."""
    src = torch.ones((mib << 20) // 4, dtype=torch.float32, device=device)
    runs = [_time_once(src.sum, device) for _ in range(12)][2:]
    return src.numel() * 4 / (statistics.median(runs) * 1e-6)


def machine_info(device: torch.device) -> dict:
    """Machine, library versions and load: what a reader needs to weigh the numbers."""
    info = {
        "platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "load_average": list(os.getloadavg()),
        "python": sys.version.split()[0], "torch": torch.__version__, "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    for lib in ("haltkit", "triton"):
        try:
            info[lib] = __import__(lib).__version__
        except Exception:
            info[lib] = None
    return info


def write_results(out_dir: Path, stem: str, result: dict, markdown: str) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` under ``out_dir``; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    js.write_text(json.dumps(result, indent=1) + "\n")
    md.write_text(markdown)
    return js, md
