"""The Python steps of scripts/gpu_check.sh (see there): a small vector set for compute-sanitizer,
an end-to-end ``haltkit.generate(compile=True)`` on a random Llama, and the summary.

    python scripts/gpu_check.py sanitize [--dry-run]
    python scripts/gpu_check.py e2e [--dry-run]
    python scripts/gpu_check.py summary STEPS_TSV OUTDIR

``--dry-run`` runs the same code on CPU tensors (the vectors through the emulated cuda backend,
the model eagerly on the CPU), so CI checks this file's logic without a GPU. Each step prints one
``GPU_CHECK_RESULT {json}`` line that ``summary`` collects from the log.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def _result(step: str, **fields) -> None:
    print("GPU_CHECK_RESULT " + json.dumps({"step": step, **fields}), flush=True)


def sanitize(dry_run: bool) -> int:
    """A few vectors through every cuda kernel (row kernels, split greedy rows, verify, exit_rules,
    compaction), small enough for racecheck: tokens and state checked against the reference."""
    import torch

    import native_vectors as nv
    from haltkit.backends import backend_module
    from haltkit.native import emulated_cuda_backend

    if dry_run:
        import haltkit._cuda_emu as emu

        backend, device = emulated_cuda_backend(emu), "cpu"
    else:
        backend, device = backend_module("cuda"), "cuda"
    torch.set_num_threads(1)
    start = time.perf_counter()
    cases = [c for c in nv.cases(large=False) if c.V <= 4099][:4]
    ties = sum(nv.run_case(c, backend, device) for c in cases)
    backend.split_rows = 3
    ties += nv.run_case(cases[0], backend, device)
    backend.split_rows = None
    ties += nv.run_verify_case(nv.verify_cases()[0], backend, device)
    nv.run_exit_rules_case(0, backend, device, steps=3)
    _result("sanitize-vectors", cases=len(cases) + 3, ties=ties, seconds=round(time.perf_counter() - start, 2))
    return 0 if ties == 0 else 1


def e2e(dry_run: bool) -> int:
    """haltkit.generate(compile=True) on a random 4-layer Llama (CUDA graphs on a GPU) against the
    same call uncompiled: the greedy tokens must be identical; reports tokens per second."""
    import torch

    import haltkit

    try:
        import transformers
    except ImportError as e:
        _result("e2e", skipped=f"transformers is not installed ({e})")
        return 0
    device = "cpu" if dry_run else "cuda"
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg).to(device).eval()
    B, new = (2, 4) if dry_run else (16, 64)
    prompts = torch.randint(0, 512, (B, 12)).tolist()
    exit = haltkit.ExitPolicy(max_new_tokens=new)
    eager = haltkit.generate(model, prompts, exit=exit, compile=False)
    if dry_run:  # compiling needs a C++ toolchain run of minutes on a CPU: the GPU run does it
        _result("e2e", device=device, rows=B, new_tokens=new, compiled=False)
        return 0
    first = time.perf_counter()
    compiled = haltkit.generate(model, prompts, exit=exit, compile=True)
    compile_s = time.perf_counter() - first
    torch.cuda.synchronize()
    start = time.perf_counter()
    again = haltkit.generate(model, prompts, exit=exit, compile=True)
    torch.cuda.synchronize()
    run_s = time.perf_counter() - start
    same = [list(a) == list(b) == list(c) for a, b, c in zip(eager.tokens, compiled.tokens, again.tokens)]
    _result("e2e", device=torch.cuda.get_device_name(), rows=B, new_tokens=new, first_call_s=round(compile_s, 2),
            tokens_per_s=round(B * new / run_s, 1), identical_to_eager=all(same))
    return 0 if all(same) else 1


def summary(steps_tsv: Path, outdir: Path) -> int:
    """summary.json and summary.md from the steps table and the log's result lines."""
    steps = []
    for line in steps_tsv.read_text().splitlines():
        name, status, rc, seconds, command = line.split("\t", 4)
        steps.append(dict(step=name, status=status, rc=int(rc), seconds=float(seconds), command=command))
    results = []
    log = outdir / "gpu_check.log"
    if log.exists():
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("GPU_CHECK_RESULT "):
                results.append(json.loads(line[len("GPU_CHECK_RESULT "):]))
    ok = all(s["status"] in ("passed", "dry-run", "skipped") for s in steps)
    doc = dict(ok=ok, dry_run=os.environ.get("GPU_CHECK_DRY_RUN") == "1", steps=steps, results=results,
               machine=dict(host=os.uname().nodename, python=sys.version.split()[0]))
    (outdir / "summary.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = ["# haltkit GPU check", "", f"overall: **{'passed' if ok else 'FAILED'}**" + (" (dry run)" if doc["dry_run"] else ""),
          "", "| step | status | rc | seconds |", "|---|---|---|---|"]
    md += [f"| {s['step']} | {s['status']} | {s['rc']} | {s['seconds']:.1f} |" for s in steps]
    if results:
        md += ["", "| result | fields |", "|---|---|"]
        md += [f"| {r['step']} | " + ", ".join(f"{k}={v}" for k, v in r.items() if k != "step") + " |" for r in results]
    md += ["", "Full output: `gpu_check.log`; benchmarks: `decode_step.md`, `verify_step.md`."]
    (outdir / "summary.md").write_text("\n".join(md) + "\n")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("sanitize", "e2e"):
        sub.add_parser(name).add_argument("--dry-run", action="store_true")
    s = sub.add_parser("summary")
    s.add_argument("steps", type=Path)
    s.add_argument("outdir", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "sanitize":
        return sanitize(args.dry_run)
    if args.cmd == "e2e":
        return e2e(args.dry_run)
    return summary(args.steps, args.outdir)


if __name__ == "__main__":
    sys.exit(main())
