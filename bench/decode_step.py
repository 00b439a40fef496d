"""Benchmark of ``haltkit.decode_step`` against the eager PyTorch chain and the compiled reference.

Contenders, timed interleaved on the same inputs (median of many runs after warm-up; every run
starts from the same decode state, restored outside the timed region):

* ``eager``: the epilogue of an eager HF / vLLM-style engine (``bench/eager.py``: value head,
  temperature, top-p by sort + cumsum, softmax, exponential-race sample, log-softmax, termination
  bookkeeping, ``nonzero`` compaction, ~25 kernels). The baseline of every ratio.
* ``compiled``: ``torch.compile(dynamic=True)`` of the reference (``haltkit.reference.decode_step``),
  i.e. what Inductor makes of the specification.
* ``cpu`` / ``triton`` / ``cuda``: ``haltkit.decode_step(backend=...)`` for each fused backend
  available on the device (Triton's CPU interpreter is a test tool, never timed).

Also reported, per contender: the fraction of the memory floor, i.e. the time the bytes that must
move take at the copy bandwidth measured in the same run (logits read once, hidden states, head
weights, requests and state read and written, outputs written).

Inputs: logits ~ 4 N(0, 1) and hidden states in fp32 or bf16, a float32 MLP head (d = 4096,
width 64); mode ``greedy`` (temperature 0) or ``top_p`` (temperature 0.8, top-p 0.9). Every
request keeps running (price of time -1e9, no EOS in reach), so every row does the full work.

Writes ``bench/results/decode_step.{json,md,png}``; ``--quick`` runs tiny shapes with dynamo's
"eager" compile backend (what ``tests/test_bench.py`` runs) and writes ``decode_step_quick.*``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import haltkit
from haltkit import DecodeState, ExitPolicy, HeadWeights, RequestBatch, SamplingParams, pack_requests
from haltkit.backends import resolve_backend
from haltkit.reference.decode_step import decode_step as reference_decode_step

from common import copy_bandwidth, machine_info, time_interleaved, write_results
from eager import eager_batch, eager_decode_step

RESULTS = Path(__file__).resolve().parent / "results"
GRID = dict(B=[1, 8, 64, 256], V=[32000, 128256, 151936], dtype=["fp32", "bf16"])
# No B equal to the two exit tokens' width: dynamo's duck sizing would recompile for it.
QUICK_GRID = dict(B=[3, 5], V=[1000], dtype=["bf16"])
MODES = {"greedy": dict(temperature=0.0), "top_p": dict(temperature=0.8, top_p=0.9)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
D_MODEL, HEAD_WIDTH = 4096, 64
FUSED = ("cpu", "triton", "cuda")


@dataclass
class Inputs:
    """One benchmark point: a batch of B rows over V tokens."""

    logits: torch.Tensor
    hidden: torch.Tensor
    requests: RequestBatch
    head: HeadWeights
    state0: DecodeState

    def floor_bytes(self) -> int:
        """Bytes that must move: inputs read once, state read and written, outputs written."""
        def size(ts) -> int:
            return sum(t.numel() * t.element_size() for t in ts)
        B = self.logits.shape[0]
        outputs = B * (8 + 4 + 4 + 8) + 8  # tokens, logprobs, values, active_idx, num_active
        return (size([self.logits, self.hidden]) + size(self.head) + size(self.requests.tensors())
                + 2 * size(self.state0.tensors()) + outputs)


def make_inputs(mode: str, B: int, V: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Inputs:
    logits = (torch.randn(B, V, generator=gen) * 4).to(device=device, dtype=dtype)
    hidden = torch.randn(B, D_MODEL, generator=gen).to(device=device, dtype=dtype)
    requests = pack_requests(
        [SamplingParams(seed=i, **MODES[mode]) for i in range(B)],
        ExitPolicy(cost_of_time=-1e9, max_new_tokens=1 << 30, eos_token_ids=(V - 1,), thinking_budget=1 << 30,
                   exit_tokens=(V - 2, V - 3)),
        V, device=device,
    )
    head = haltkit.MarginalValueHead(D_MODEL, hidden=HEAD_WIDTH, device=device).weights()
    return Inputs(logits, hidden, requests, head, DecodeState.new(B, device=device))


def fused_backends(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """The fused backends to time on ``device``, and why each other one is left out."""
    names, skipped = [], {}
    for name in FUSED:
        if name == "triton" and device.type != "cuda":
            skipped[name] = "Triton runs on a CPU only through its interpreter, a test tool"
            continue
        try:
            resolve_backend(name, device)
            names.append(name)
        except (RuntimeError, ValueError) as e:
            skipped[name] = str(e)
    return names, skipped


def contenders(inp: Inputs, states: dict[str, DecodeState], compiled, fused: list[str]) -> dict[str, Callable]:
    eb = eager_batch(inp.requests)
    a = (inp.logits, inp.hidden)
    fns = {
        "eager": lambda: eager_decode_step(*a, eb, states["eager"], inp.head),
        "compiled": lambda: compiled(*a, inp.requests, states["compiled"], inp.head),
    }
    for name in fused:
        fns[name] = lambda name=name: haltkit.decode_step(*a, inp.requests, states[name], inp.head, backend=name)
    return fns


def run(grid: dict, device: torch.device, warmup: int, reps: int, budget_s: float, compile_backend: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    bandwidth = copy_bandwidth(device)
    fused, skipped = fused_backends(device)
    compiled = torch.compile(reference_decode_step, dynamic=True, backend=compile_backend)
    rows = []
    for V in grid["V"]:
        for B in grid["B"]:
            for mode in MODES:
                for dname in grid["dtype"]:
                    inp = make_inputs(mode, B, V, DTYPES[dname], device, gen)
                    states = {name: inp.state0.clone() for name in ["eager", "compiled", *fused]}

                    def restore(name: str) -> None:
                        for dst, src in zip(states[name].tensors(), inp.state0.tensors()):
                            dst.copy_(src)

                    t0 = time.perf_counter()
                    times = time_interleaved(contenders(inp, states, compiled, fused), device, warmup, reps,
                                             budget_s, before_each=restore)
                    med = {name: statistics.median(ts) for name, ts in times.items()}
                    floor_us = inp.floor_bytes() / bandwidth * 1e6
                    rows.append({
                        "mode": mode, "dtype": dname, "B": B, "V": V, "floor_bytes": inp.floor_bytes(),
                        "floor_us": floor_us, "median_us": med, "times_us": times,
                        "speedup_vs_eager": {n: med["eager"] / m for n, m in med.items()},
                        "floor_fraction": {n: floor_us / m for n, m in med.items()},
                    })
                    print(f"{mode:6s} {dname} B={B:3d} V={V:6d} floor={floor_us:8.1f}us "
                          + " ".join(f"{n}={m:10.1f}us" for n, m in med.items())
                          + f"  ({len(times['eager'])} reps, {time.perf_counter() - t0:.0f}s)", flush=True)
    return {
        "machine": machine_info(device), "copy_bandwidth_GBps": bandwidth / 1e9, "grid": grid,
        "warmup": warmup, "max_reps": reps, "budget_s_per_point": budget_s, "compile_backend": compile_backend,
        "d_model": D_MODEL, "head_width": HEAD_WIDTH, "modes": MODES, "fused_backends": fused,
        "not_timed": skipped, "rows": rows,
    }


def markdown(res: dict) -> str:
    names = ["eager", "compiled", *res["fused_backends"]]
    m = res["machine"]
    lines = [
        "# decode_step benchmark",
        "",
        f"Device: {m['device']} ({m.get('gpu') or m['processor'] or 'cpu'}, {m['cpus']} cpus), torch {m['torch']} "
        f"({m['torch_threads']} threads, load average {m['load_average'][0]:.1f} at the end); copy bandwidth "
        f"{res['copy_bandwidth_GBps']:.2f} GB/s measured in the run. Median microseconds after warm-up, contenders "
        "interleaved. (Nx) = speedup over `eager` in the same run; [f] = fraction of the memory floor "
        "(bytes that must move / copy bandwidth). `compiled` = torch.compile of the reference "
        f"(backend \"{res['compile_backend']}\"). Value head: MLP d = {res['d_model']}, width {res['head_width']}.",
        "",
        "| mode | logits | B | V | floor us | " + " | ".join(names) + " |",
        "|---|---|---|---|---|" + "---|" * len(names),
    ]
    for r in res["rows"]:
        cells = [f"{r['median_us'][n]:.0f} ({r['speedup_vs_eager'][n]:.2f}x) [{r['floor_fraction'][n]:.2g}]"
                 for n in names]
        lines.append(f"| {r['mode']} | {r['dtype']} | {r['B']} | {r['V']} | {r['floor_us']:.0f} | " + " | ".join(cells) + " |")
    if res["not_timed"]:
        lines += ["", "Not timed here: " + "; ".join(f"`{k}`: {v}" for k, v in res["not_timed"].items()) + "."]
    lines += [
        "",
        "Reading: `compiled` sorts every row and draws Philox noise over the whole vocabulary even for "
        "greedy rows (the reference is written to be obviously right, not fast), hence its greedy column. "
        "`eager` draws from the global torch generator, not Philox keyed by (seed, step), and checks no "
        "row for NaN: it does less than the fused op. On a shared machine (see the load average) "
        "absolute times are noisy; the ratios come from interleaved runs of the same inputs.",
    ]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> bool:
    """Microseconds per row against B at the largest V, one panel per mode (bf16 logits)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    V = max(res["grid"]["V"])
    names = ["eager", "compiled", *res["fused_backends"]]
    fig, axes = plt.subplots(1, len(MODES), figsize=(10, 4), sharey=True)
    for ax, mode in zip(axes, MODES):
        pts = sorted((r["B"], r) for r in res["rows"] if r["V"] == V and r["mode"] == mode and r["dtype"] == "bf16")
        Bs = [b for b, _ in pts]
        for n in names:
            ax.plot(Bs, [r["median_us"][n] / b for b, r in pts], marker="o", label=n)
        ax.plot(Bs, [r["floor_us"] / b for b, r in pts], "k--", label="memory floor")
        ax.set(xscale="log", yscale="log", xlabel="batch size B", title=f"{mode}, V = {V}, bf16 logits")
    axes[0].set_ylabel("microseconds per row (median)")
    axes[0].legend()
    fig.suptitle(f"decode_step on {res['machine']['device']} ({res['machine']['torch_threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few runs (what tests/test_bench.py runs)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads on a CPU (default 1: the machine is shared; recorded in the JSON)")
    ap.add_argument("--budget", type=float, default=3.0, help="seconds of timed runs per point, after 3 runs")
    ap.add_argument("--reps", type=int, default=30, help="timed runs per point at most")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.quick:
        res = run(QUICK_GRID, device, warmup=1, reps=3, budget_s=0.0, compile_backend="eager")
        stem = "decode_step_quick"
    else:
        res = run(GRID, device, warmup=1 if device.type == "cpu" else 10, reps=args.reps, budget_s=args.budget,
                  compile_backend="inductor")
        stem = "decode_step"
    res["machine"] = machine_info(device)  # the load average at the end of the run
    js, md = write_results(args.out, stem, res, markdown(res))
    if not args.quick and plot(res, args.out / f"{stem}.png"):
        print(f"wrote {args.out / (stem + '.png')}")
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
