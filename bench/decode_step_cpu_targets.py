"""The native CPU backend at the point issue 5 sets its targets: B = 64, V = 151936, fp32 logits.

Contenders, timed interleaved with ``bench/decode_step.py``'s harness and inputs (same eager chain,
same compiled reference, same value head and requests): ``eager`` (the baseline of every ratio),
``compiled`` (torch.compile of the reference), ``cpu`` (``haltkit.decode_step(backend="cpu")``)
and ``cpu_kernel`` (the same backend called directly, without the boundary's validation: what
the native code itself takes), in the modes greedy, top_p and top_k
(the last is not in decode_step.py's grid). Floors measured in the same run:

* ``floor_us``: decode_step.py's memory floor (every byte that must move, at copy bandwidth);
* ``read_floor_us``: the issue's greedy floor, logits bytes over single-pass read bandwidth:
  a torch sum over the very logits, timed interleaved with the contenders (the machine's
  bandwidth drifts by a quarter between runs, so a floor measured apart would move the ratio).
  The bandwidth of a sum over a 256 MiB buffer is reported beside it.

Targets (issue 5): top_p and top_k >= 10x eager and faster than compiled; greedy <= 1.5x the read
floor; (issue 17) top_p and top_k <= 2x the read floor with 2 threads. The vector path the native
module was built for (``avx512``, ``avx2`` or ``portable``, from the host's flags: it is built with
-march=native) is recorded, since it moves these ratios by 2x. Measured at each thread count of
``--threads`` (default 1 and 2, this machine's cores). Writes
``bench/results/decode_step_cpu_targets.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import decode_step as bench
from common import copy_bandwidth, machine_info, read_bandwidth, time_interleaved, write_results
from haltkit.backends import backend_module
from haltkit.reference.decode_step import decode_step as reference_decode_step

MODES = {**bench.MODES, "top_k": dict(temperature=0.8, top_k=50)}
B, V = 64, 151936
TARGETS = {"greedy": 1.5, "top_p": 2.0, "top_k": 2.0}  # cpu / read floor (issues 5 and 17)


def vector_path() -> str:
    """The vector path of csrc/cpu_rows.h a -march=native build takes on this host."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return "unknown"
    return "avx512" if "avx512f" in flags else ("avx2" if {"avx2", "fma"} <= flags else "portable")


def plot(res: dict, path: Path) -> None:
    """cpu / read floor per mode and thread count, with the targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    threads = sorted({r["threads"] for r in res["rows"]})
    width = 0.8 / len(threads)
    for i, t in enumerate(threads):
        rows = [r for r in res["rows"] if r["threads"] == t]
        xs = [list(MODES).index(r["mode"]) + i * width for r in rows]
        ax.bar(xs, [r["cpu_over_read_floor"] for r in rows], width, label=f"{t} thread(s)")
    for j, mode in enumerate(MODES):
        ax.hlines(TARGETS[mode], j - width / 2, j + 0.8 - width / 2, colors="k", linestyles="--")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(MODES))], list(MODES))
    ax.set_ylabel("haltkit.decode_step (cpu) / read floor")
    ax.set_title(f"B = {B}, V = {V}, fp32; {res['vector_path']} path; dashed: targets")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def measure(threads: int, reps: int, budget: float, compiled, gen: torch.Generator) -> tuple[dict, list[dict]]:
    """Bandwidths and every mode's timings with ``threads`` torch threads (the cpu backend uses as many)."""
    torch.set_num_threads(threads)
    dev = torch.device("cpu")
    copy_bw, read_bw = copy_bandwidth(dev), read_bandwidth(dev)
    rows = []
    for mode in MODES:
        inp = bench.make_inputs(mode, B, V, torch.float32, dev, gen)
        states = {name: inp.state0.clone() for name in ("eager", "compiled", "cpu", "cpu_kernel")}

        def restore(name: str) -> None:
            if name in states:  # the contenders that update a state in place
                for dst, src in zip(states[name].tensors(), inp.state0.tensors()):
                    dst.copy_(src)

        t0 = time.perf_counter()
        fns = bench.contenders(inp, states, compiled, ["cpu"])
        kernel = backend_module("cpu")
        fns["cpu_kernel"] = lambda: kernel.decode_step(inp.logits, inp.hidden, inp.requests, states["cpu_kernel"],
                                                       inp.head)
        fns["logits_sum"] = lambda: inp.logits.sum()
        times = time_interleaved(fns, dev, 1, reps, budget, before_each=restore)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        floor_us = inp.floor_bytes() / copy_bw * 1e6
        read_floor_us = med.pop("logits_sum")
        rows.append({"threads": threads, "mode": mode, "median_us": med, "times_us": times, "floor_us": floor_us,
                     "read_floor_us": read_floor_us,
                     "speedup_vs_eager": {n: med["eager"] / m for n, m in med.items()},
                     "cpu_vs_compiled": med["compiled"] / med["cpu"],
                     "cpu_over_floor": med["cpu"] / floor_us, "cpu_over_read_floor": med["cpu"] / read_floor_us,
                     "kernel_over_read_floor": med["cpu_kernel"] / read_floor_us})
        print(f"{threads}t {mode:6s} " + " ".join(f"{n}={m / 1e3:9.2f}ms" for n, m in med.items())
              + f"  floor={floor_us / 1e3:.2f}ms read_floor={read_floor_us / 1e3:.2f}ms"
              + f"  ({len(times['cpu'])} reps, {time.perf_counter() - t0:.0f}s)", flush=True)
    return {"threads": threads, "copy_bandwidth_GBps": copy_bw / 1e9, "read_bandwidth_GBps": read_bw / 1e9}, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                    help="torch intra-op thread counts to measure at (every contender and floor uses as many)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--budget", type=float, default=20.0, help="seconds of timed runs per mode, after 3 runs")
    ap.add_argument("--out", type=Path, default=bench.RESULTS)
    args = ap.parse_args(argv)
    bench.MODES.update(MODES)  # make_inputs reads its modes from there
    compiled = torch.compile(reference_decode_step, dynamic=True)
    gen = torch.Generator().manual_seed(0)
    bandwidths, rows = [], []
    for threads in args.threads:
        bw, r = measure(threads, args.reps, args.budget, compiled, gen)
        bandwidths.append(bw)
        rows += r
    res = {"machine": machine_info(torch.device("cpu")), "vector_path": vector_path(), "B": B, "V": V,
           "dtype": "fp32", "modes": MODES, "targets_over_read_floor": TARGETS, "bandwidths": bandwidths,
           "d_model": bench.D_MODEL, "head_width": bench.HEAD_WIDTH, "rows": rows}
    m = res["machine"]
    bw_text = "; ".join(f"{b['threads']} thread(s): copy {b['copy_bandwidth_GBps']:.1f} GB/s, read "
                        f"{b['read_bandwidth_GBps']:.1f} GB/s" for b in bandwidths)
    lines = [
        "# decode_step: native CPU backend at the issue-5 target point",
        "",
        f"B = {B}, V = {V}, fp32 logits; {m['processor'] or 'cpu'} ({m['cpus']} cpus), torch {m['torch']}, "
        f"load average {m['load_average'][0]:.1f} at the end; native vector path: {res['vector_path']}. Every contender and both floors of a row use the "
        f"row's thread count. Bandwidths measured in the run: {bw_text}. "
        "Median ms after warm-up, contenders interleaved; eager = bench/eager.py's chain, compiled = "
        "torch.compile of the reference. Value head: MLP d = 4096, width 64.",
        "",
        "| threads | mode | eager ms | compiled ms | cpu ms | cpu_kernel ms | cpu vs eager | cpu vs compiled "
        "| cpu / floor | cpu / read floor | cpu_kernel / read floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        med = r["median_us"]
        lines.append(f"| {r['threads']} | {r['mode']} | {med['eager'] / 1e3:.1f} | {med['compiled'] / 1e3:.1f} | "
                     f"{med['cpu'] / 1e3:.2f} | {med['cpu_kernel'] / 1e3:.2f} | {r['speedup_vs_eager']['cpu']:.1f}x | "
                     f"{r['cpu_vs_compiled']:.1f}x | {r['cpu_over_floor']:.2f} | {r['cpu_over_read_floor']:.2f} | "
                     f"{r['kernel_over_read_floor']:.2f} |")
    lines += ["", "floor = decode_step.py's (all bytes that must move, at copy bandwidth); read floor = a torch sum "
              "over the same logits, timed interleaved with the contenders (targets: greedy <= 1.5, top_p and top_k <= 2). "
              "cpu = `haltkit.decode_step` "
              "(validation included); cpu_kernel = the backend called directly, so cpu - cpu_kernel is the "
              "boundary's validation."]
    js, md = write_results(args.out, "decode_step_cpu_targets", res, "\n".join(lines) + "\n")
    png = args.out / "decode_step_cpu_targets.png"
    plot(res, png)
    print(f"wrote {js}, {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
