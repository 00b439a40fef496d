"""Benchmark of ``haltkit.verify_step`` against the eager PyTorch implementation, and on a GPU
against vLLM's rejection sampler and FlashInfer's ``chain_speculative_sampling``.

Contenders, timed interleaved on the same inputs (median of many runs after warm-up):

* ``eager``: the reference implementation (:mod:`haltkit.reference.verify_step`) on the device:
  what the op costs written as plain PyTorch ops. The baseline of every ratio.
* ``haltkit``: ``haltkit.verify_step(backend="auto")`` (cuda, else triton on a GPU; the native cpu
  backend, else the reference, on the CPU).
* ``vllm`` (GPU, vllm installed): ``apply_sampling_constraints`` + ``rejection_sample`` of
  vllm.v1.sample.rejection_sampler, plus its bonus token (argmax, or a softmax draw).
* ``flashinfer`` (GPU, flashinfer installed, method "rejection" only): softmax with temperature,
  ``top_p_renorm_probs``, ``chain_speculative_sampling``.

Where the semantics differ (the table repeats it): vLLM and FlashInfer do no value head and no
termination, draw from torch generators rather than Philox keyed by (seed, step), process every
drafted position instead of stopping at the first rejection, and FlashInfer takes one K for the
whole batch. haltkit also writes values, log-probs, the updated state and the compacted indices.

Modes: ``greedy`` (temperature 0, method "exact"), ``sampled`` (temperature 0.8, top-p 0.9,
method "exact"), ``rejection`` (the same request, method "rejection" with full draft
distributions). Drafts are decode_step's own token at each position with probability 0.8
(greedy / sampled), or drawn from a draft distribution near the target's (rejection).

Also reported: the fraction of the memory floor (bytes that must be read once: logits, hidden
states, draft distributions; over the copy bandwidth measured in the same run).

Writes ``bench/results/verify_step.{json,md}`` (``--quick``: tiny shapes, ``verify_step_quick.*``).
On a CPU the default grid is B in {1, 16}, K in {1, 4}, V = 32000 (the reference takes ~2 min per
call at B = 64, K = 8, V = 151936 on a 2-core machine); ``--full`` runs the GPU grid anyway.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

import haltkit
from haltkit import DecodeState, ExitPolicy, SamplingParams, pack_requests
from haltkit.backends import resolve_backend
from haltkit.reference.decode_step import decode_step as eager_decode_step
from haltkit.reference.verify_step import verify_step as eager_verify_step

RESULTS = Path(__file__).resolve().parent / "results"
GPU_GRID = dict(B=[1, 16, 64], K=[1, 4, 8], V=[32000, 151936])
CPU_GRID = dict(B=[1, 16], K=[1, 4], V=[32000])
QUICK_GRID = dict(B=[1, 4], K=[1, 3], V=[1000])
MODES = ("greedy", "sampled", "rejection")
HIDDEN = 1024
SEMANTICS = (
    "vLLM / FlashInfer: no value head, no termination, torch-generator randomness instead of "
    "Philox(seed, step), every drafted position processed; FlashInfer: one K for the batch, "
    "rejection only. haltkit and eager: value head (linear, d = 1024), termination, state update, "
    "compaction, values and log-probs."
)


@dataclasses.dataclass
class Case:
    """One benchmark input: a batch of B rows, K drafted positions, V tokens, one mode."""

    mode: str
    B: int
    K: int
    V: int
    logits: torch.Tensor
    hidden: torch.Tensor
    drafts: torch.Tensor
    lens: torch.Tensor
    probs: torch.Tensor | None
    requests: haltkit.RequestBatch
    head: haltkit.HeadWeights

    @property
    def method(self) -> str:
        return "rejection" if self.mode == "rejection" else "exact"

    def floor_bytes(self) -> int:
        n = self.logits.numel() * self.logits.element_size() + self.hidden.numel() * self.hidden.element_size()
        return n + (0 if self.probs is None else self.probs.numel() * self.probs.element_size())


def make_case(mode: str, B: int, K: int, V: int, device: torch.device, gen: torch.Generator) -> Case:
    logits = (torch.randn(B, K + 1, V, generator=gen) * 4).to(device)
    hidden = torch.randn(B, K + 1, HIDDEN, generator=gen).to(device)
    temperature = 0.0 if mode == "greedy" else 0.8
    requests = pack_requests(
        [SamplingParams(temperature=temperature, top_p=1.0 if mode == "greedy" else 0.9, seed=i) for i in range(B)],
        ExitPolicy(max_new_tokens=1 << 20), V, device=device,
    )
    head = haltkit.MarginalValueHead(HIDDEN, device=device).weights()
    lens = torch.full((B,), K, dtype=torch.int32, device=device)
    probs = None
    if mode == "rejection":
        # A draft near the target: its logits are the target's plus noise, filtered alike.
        draft_logits = logits[:, :K] + torch.randn(B, K, V, generator=gen).to(device)
        probs = torch.stack([haltkit.sampling_probs(draft_logits[:, j], requests) for j in range(K)], 1)
        drafts = torch.multinomial(probs.reshape(-1, V), 1, generator=None).reshape(B, K)
    else:
        # decode_step's own tokens (what a draft sharing the request's seed would propose), kept
        # with probability 0.8 per position.
        state = DecodeState.new(B, device=device)
        target = torch.stack([eager_decode_step(logits[:, j], hidden[:, j], requests, state, head).tokens
                              for j in range(K)], 1)
        other = torch.randint(0, V, (B, K), generator=gen).to(device)
        drafts = torch.where(torch.rand(B, K, generator=gen).to(device) < 0.8, target, other)
    return Case(mode, B, K, V, logits, hidden, drafts, lens, probs, requests, head)


def contenders(case: Case, device: torch.device) -> dict[str, Callable[[DecodeState], object]]:
    """name -> fn(state); a contender that cannot run here is left out (see ``unavailable``)."""
    c = case
    out: dict[str, Callable] = {
        "eager": lambda st: eager_verify_step(c.logits, c.hidden, c.drafts, c.lens, c.requests, st, c.head,
                                              c.probs, c.method),
        "haltkit": lambda st: haltkit.verify_step(c.logits, c.hidden, c.drafts, c.lens, c.requests, st, c.head,
                                                  c.probs, c.method),
    }
    if device.type == "cuda":
        for name, build in (("vllm", _vllm_contender), ("flashinfer", _flashinfer_contender)):
            try:
                fn = build(c)
            except Exception as e:  # a missing or changed library: say why in the results
                unavailable[name] = f"{type(e).__name__}: {e}"
                continue
            if fn is not None:
                out[name] = fn
    return out


unavailable: dict[str, str] = {}


def _vllm_contender(c: Case):
    if c.mode == "sampled":
        return None  # vLLM has no exact (Gumbel-coupled) verification
    from vllm.v1.sample.rejection_sampler import apply_sampling_constraints, rejection_sample
    from vllm.v1.sample.metadata import SamplingMetadata

    B, K, V = c.B, c.K, c.V
    dev = c.logits.device
    greedy = c.mode == "greedy"
    values = dict(
        temperature=None if greedy else c.requests.temperature, all_greedy=greedy, all_random=not greedy,
        top_p=None if greedy else c.requests.top_p, top_k=None, generators={}, max_num_logprobs=None,
        no_penalties=True, prompt_token_ids=None, frequency_penalties=torch.zeros(B, device=dev),
        presence_penalties=torch.zeros(B, device=dev), repetition_penalties=torch.ones(B, device=dev),
        output_token_ids=[[] for _ in range(B)], allowed_token_ids_mask=None, bad_words_token_ids={},
        logitsprocs=None,
    )
    names = {f.name for f in dataclasses.fields(SamplingMetadata)}
    meta = SamplingMetadata(**{k: v for k, v in values.items() if k in names})
    flat = c.logits[:, :K].reshape(B * K, V)
    bonus_logits = c.logits[:, K]
    drafts = c.drafts.reshape(-1).to(torch.int32).contiguous()
    cu = torch.arange(1, B + 1, device=dev, dtype=torch.int32) * K
    q = None if c.probs is None else c.probs.reshape(B * K, V).contiguous()

    def run(_state):
        target = apply_sampling_constraints(flat.float().clone(), cu, meta)
        if greedy:
            bonus = bonus_logits.argmax(-1, keepdim=True)
        else:
            p = torch.softmax(bonus_logits.float() / c.requests.temperature[:, None], -1)
            bonus = torch.multinomial(p, 1)
        return rejection_sample(drafts, [K] * B, K, cu, q, target, bonus.to(torch.int32).contiguous(), meta)

    return run


def _flashinfer_contender(c: Case):
    if c.mode != "rejection":
        return None  # chain_speculative_sampling is speculative sampling only
    import flashinfer.sampling as fs

    drafts = c.drafts.to(torch.int32)
    t = c.requests.temperature[:, None, None]

    def run(_state):
        p = torch.softmax(c.logits.float() / t, -1)
        p = fs.top_p_renorm_probs(p.reshape(-1, c.V), 0.9).reshape(p.shape)
        return fs.chain_speculative_sampling(c.probs, drafts, p)

    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable], state0: DecodeState, device: torch.device,
                     warmup: int, reps: int, budget_s: float) -> dict[str, list[float]]:
    """Microseconds of each contender per run; contenders alternate within every repetition and
    each run starts from a fresh copy of the same state (copied outside the timed region)."""
    states = {name: state0.clone() for name in fns}
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for rep in range(warmup + reps):
        for name, fn in fns.items():
            for dst, src in zip(states[name].tensors(), state0.tensors()):
                dst.copy_(src)
            _sync(device)
            t0 = time.perf_counter()
            fn(states[name])
            _sync(device)
            if rep >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e6)
        if rep >= warmup + 2 and time.perf_counter() - start > budget_s:
            break
    return times


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy (read + write), median of 10."""
    n = (256 if device.type == "cuda" else 64) << 20
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    runs = []
    for i in range(12):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        if i >= 2:
            runs.append(time.perf_counter() - t0)
    return 2 * n / statistics.median(runs)


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
            "python": sys.version.split()[0], "torch": torch.__version__, "haltkit": haltkit.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    for lib in ("triton", "vllm", "flashinfer"):
        try:
            info[lib] = __import__(lib).__version__
        except Exception:
            info[lib] = None
    return info


def run(grid: dict, device: torch.device, warmup: int, reps: int, budget_s: float) -> dict:
    gen = torch.Generator().manual_seed(0)
    bw = copy_bandwidth(device)
    backend = resolve_backend("auto", device, op="verify_step")
    rows = []
    for V in grid["V"]:
        for B in grid["B"]:
            for K in grid["K"]:
                for mode in MODES:
                    case = make_case(mode, B, K, V, device, gen)
                    fns = contenders(case, device)
                    state0 = DecodeState.new(B, device=device)
                    times = time_interleaved(fns, state0, device, warmup, reps, budget_s)
                    accepted = fns["eager"](state0.clone()).num_accepted.float().mean().item()
                    med = {name: statistics.median(ts) for name, ts in times.items()}
                    floor_us = case.floor_bytes() / bw * 1e6
                    rows.append({
                        "mode": mode, "B": B, "K": K, "V": V, "logits_dtype": str(case.logits.dtype)[6:],
                        "mean_accepted": accepted, "floor_us": floor_us, "median_us": med, "times_us": times,
                        "speedup_vs_eager": {name: med["eager"] / m for name, m in med.items()},
                        "floor_fraction": {name: floor_us / m for name, m in med.items()},
                    })
                    print(f"{mode:9s} B={B:3d} K={K} V={V:6d} accepted={accepted:4.2f} "
                          + " ".join(f"{n}={m:9.1f}us" for n, m in med.items()), flush=True)
    return {"machine": machine(), "device": str(device), "haltkit_backend": backend,
            "copy_bandwidth_GBps": bw / 1e9, "grid": grid, "warmup": warmup, "max_reps": reps,
            "semantics": SEMANTICS, "unavailable": unavailable, "rows": rows}


def markdown(res: dict) -> str:
    names = ["eager", "haltkit", "vllm", "flashinfer"]
    lines = [
        "# verify_step benchmark",
        "",
        f"Device: {res['device']} ({res['machine'].get('gpu') or res['machine']['processor'] or 'cpu'}), "
        f"torch {res['machine']['torch']} ({res['machine']['torch_threads']} threads, load average "
        f"{res['machine']['load_average'][0]:.1f}); haltkit backend \"{res['haltkit_backend']}\"; copy bandwidth "
        f"{res['copy_bandwidth_GBps']:.1f} GB/s. Median microseconds after warm-up, contenders interleaved; "
        "(x) = speedup over eager in the same run; floor = the haltkit column's fraction of the memory floor.",
        "",
        f"Semantics: {res['semantics']}",
        "",
        "| mode | B | K | V | accepted/K | " + " | ".join(names) + " | floor |",
        "|---|---|---|---|---|" + "---|" * len(names) + "---|",
    ]
    for r in res["rows"]:
        cells = []
        for n in names:
            m = r["median_us"].get(n)
            cells.append("n/a" if m is None else f"{m:.0f} ({r['speedup_vs_eager'][n]:.2f}x)")
        lines.append(f"| {r['mode']} | {r['B']} | {r['K']} | {r['V']} | {r['mean_accepted'] / r['K']:.2f} | "
                     + " | ".join(cells) + f" | {r['floor_fraction']['haltkit']:.2g} |")
    if res["unavailable"]:
        lines += ["", "Unavailable: " + "; ".join(f"{k}: {v}" for k, v in res["unavailable"].items())]
    if res["device"] == "cpu":
        lines += ["", "No GPU here: the vllm / flashinfer columns and the Triton / CUDA kernels need one; "
                  "on the CPU the haltkit column runs the backend \"auto\" picks."]
    if res["haltkit_backend"] == "torch":
        lines += ["", "The haltkit column is the reference itself here (no compiled verify_step backend on "
                  "this device), so its ratios show dispatch overhead and timing noise only."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few runs (what the test runs)")
    ap.add_argument("--full", action="store_true", help="the GPU grid even on a CPU (slow)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (on a shared CPU, 1 avoids thrashing; recorded in the JSON)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick:
        grid, warmup, reps, budget, stem = QUICK_GRID, 1, 3, 1.0, "verify_step_quick"
    else:
        gpu = device.type == "cuda" or args.full
        grid, warmup, reps, budget, stem = (GPU_GRID if gpu else CPU_GRID), 2, 25, 5.0, "verify_step"
    torch.manual_seed(0)
    res = run(grid, device, warmup, reps, budget)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (args.out / f"{stem}.md").write_text(markdown(res))
    print(f"wrote {args.out / (stem + '.json')} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
