"""Logit traffic of the Triton decode_step kernel: full-row reads per row, per sampling mode.

Decode is memory-bound, and the kernel's floor is one read of each row of logits; this script
measures how many reads each sampling mode makes (the pass-count design of
``kernels/decode_step.py``) and on what fraction of vocabulary tiles a draw pass evaluates
Philox noise (the rest are skipped because they cannot win). It counts the kernel's own passes
by running it under the Triton interpreter on CPU tensors, so it needs no GPU and says nothing
about time: on a GPU, a row that is read k times costs about k times the floor unless it stays in L2.

Logits are synthetic (normal, scaled so a step's top-p 0.9 set spans a few to a few hundred
tokens), one row per launch so each count belongs to one row.

Writes bench/results/decode_step_passes.json and .md.

    python bench/decode_step_passes.py [--rows 4] [--vocab 32000 151936]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402

import haltkit  # noqa: E402
from haltkit import DecodeState, ExitPolicy, SamplingParams, pack_requests  # noqa: E402

MODES = {
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=0.8),
    "top_k=50": dict(temperature=0.8, top_k=50),
    "top_p=0.9": dict(temperature=0.8, top_p=0.9),
    "min_p=0.05": dict(temperature=0.8, min_p=0.05),
    "top_k=50,top_p=0.9,min_p=0.05": dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05),
}
PASSES = ("_scan_row", "_search_pass", "_draw_pass")
_calls: collections.Counter = collections.Counter()


def _count_device_calls() -> None:
    """Count every @triton.jit helper the interpreter calls, by name."""
    call = interpreter.InterpretedFunction.__call__

    def counted(self, *args, **kwargs):
        _calls[self.fn.__name__] += 1
        return call(self, *args, **kwargs)

    interpreter.InterpretedFunction.__call__ = counted


def measure(V: int, mode: str, rows: int, gen: torch.Generator) -> dict:
    reads, philox_share = [], []
    for _ in range(rows):
        scale = float(torch.empty(1).uniform_(1.0, 4.0, generator=gen))
        logits = torch.randn(1, V, generator=gen) * scale
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        req = pack_requests(SamplingParams(seed=seed, **MODES[mode]), ExitPolicy(), V, 1)
        _calls.clear()
        haltkit.decode_step(logits, None, req, DecodeState.new(1), None, backend="triton")
        tiles = -(-V // 1024)
        draw_passes = (_calls["_scan_row"] if mode == "temperature" else 0) + _calls["_draw_pass"]
        reads.append(sum(_calls[p] for p in PASSES))
        philox_share.append(_calls["token_words"] / (tiles * draw_passes) if draw_passes else 0.0)
    return dict(V=V, mode=mode, rows=rows, reads=reads, philox_tile_share=philox_share,
                median_reads=statistics.median(reads), max_reads=max(reads),
                median_philox_tile_share=statistics.median(philox_share))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=4, help="rows (random logits and seeds) per case")
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "decode_step_passes"))
    args = ap.parse_args(argv)
    _count_device_calls()
    gen = torch.Generator().manual_seed(0)
    results = [measure(V, mode, args.rows, gen) for V in args.vocab for mode in MODES]
    meta = dict(machine=platform.platform(), python=sys.version.split()[0], torch=torch.__version__,
                triton=triton.__version__, block_v=1024, note="counts from the Triton interpreter; no timing")
    with open(args.out + ".json", "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    lines = ["# Triton decode_step: full-row logit reads per row (floor = 1)", "",
             f"Counted under the Triton interpreter (triton {triton.__version__}), BLOCK_V = 1024, "
             f"{args.rows} rows of synthetic logits per case. Philox share: fraction of vocabulary tiles "
             "whose noise a draw pass evaluates (the rest cannot win and are skipped).", "",
             "| V | mode | reads / row (median) | max | Philox tile share |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['V']} | {r['mode']} | {r['median_reads']:.1f} | {r['max_reads']} | "
                     f"{r['median_philox_tile_share']:.2f} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
