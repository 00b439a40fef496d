"""End-to-end decoding: haltkit.generate against Hugging Face generate, on one model and prompts.

In one process, interleaved run by run, on the shipped toy model (or a random-weight Llama of the
same shape when it is missing):

* ``hf``: Hugging Face greedy ``model.generate`` (the baseline of every ratio);
* ``hf-assisted``: Hugging Face assisted generation with the same draft model (batch 1 only:
  Hugging Face has no batched speculation);
* ``haltkit``: ``haltkit.generate`` greedy, eager and compiled;
* ``haltkit+draft``, ``haltkit+ngram``, ``haltkit+layer``: with each draft source (compiled);

Every contender generates exactly ``--new`` tokens per sequence (EOS off) so tokens/s compare like
for like. Reported per contender and batch size: median tokens/s after a warm-up run (which also
pays any compile), the ratio to ``hf`` at that batch size, target forward passes per emitted token
and mean accepted draft length. A separate section runs the toy target on held-out reasoning
prompts with its EOS and exit policy, with and without value exits: tokens saved and accuracy.

Writes ``bench/results/e2e.{json,md}``. ``--quick`` runs a seconds-long version (tests use it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

import haltkit
from haltkit import DraftModel, EarlyLayerDraft, ExitPolicy, PromptLookup

RESULTS = Path(__file__).resolve().parent / "results"


def load_models(seed: int):
    """(target, draft, head, tokenizer, shipped?): the toy models, or random ones of their shape."""
    try:
        toy = haltkit.load_toy()
        return toy.target, toy.draft, toy.head, toy.tokenizer, True, toy
    except FileNotFoundError:
        pass
    from transformers import LlamaConfig, LlamaForCausalLM

    from haltkit.tokenizer import CharTokenizer

    tok = CharTokenizer()
    torch.manual_seed(seed)
    common = dict(vocab_size=tok.vocab_size, num_attention_heads=4, max_position_embeddings=512, tie_word_embeddings=True)
    target = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=5, **common))
    draft = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3, **common))
    head = haltkit.MarginalValueHead(128, hidden=16)
    return target.eval(), draft.eval(), head, tok, False, None


def prompts_for(tok, B: int, seed: int) -> list[str]:
    from haltkit.tasks import ChainSum, prompt_text

    rng = random.Random(seed)
    return [prompt_text(ChainSum().sample(rng, 1 + b % 5, held_out=True)) for b in range(B)]


def hf_contender(target, draft, ids, mask, new: int, assisted: bool):
    def run():
        # Forward passes of the target's body, counted by a hook that lives only during this run
        # (a hook seen by torch.compile would be traced into haltkit's compiled steps).
        calls = []
        hook = target.base_model.register_forward_pre_hook(lambda *a: calls.append(1))
        try:
            kw = dict(assistant_model=draft) if assisted else {}
            out = target.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, pad_token_id=0, eos_token_id=None, **kw)
        finally:
            hook.remove()
        emitted = (out.shape[1] - ids.shape[1]) * ids.shape[0]
        return {"tokens": emitted, "target_forwards": len(calls), "accepted": math.nan, "compile": 0.0,
                "out": out[:, ids.shape[1]:].tolist()}
    return run


def hk_contender(target, lists, new: int, draft, compile: bool, backend: str):
    policy = ExitPolicy(max_new_tokens=new)

    def run():
        res = haltkit.generate(target, lists, exit=policy, draft=draft, compile=compile, backend=backend)
        return {"tokens": res.total_tokens, "target_forwards": res.target_forwards,
                "accepted": res.mean_accepted_length, "compile": res.timings["compile"], "out": res.tokens}
    return run


def bench_throughput(target, draft, tok, batch_sizes, new: int, repeats: int, compile: bool, backend: str,
                     layers: int, K: int, seed: int) -> list[dict]:
    rows = []
    for B in batch_sizes:
        texts = prompts_for(tok, B, seed)
        lists = [tok.encode(t) for t in texts]
        T = max(map(len, lists))
        ids = torch.zeros(B, T, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.long)
        for b, p in enumerate(lists):
            ids[b, T - len(p):] = torch.tensor(p)
            mask[b, T - len(p):] = 1
        contenders = {"hf": hf_contender(target, draft, ids, mask, new, False)}
        if B == 1:
            contenders["hf-assisted"] = hf_contender(target, draft, ids, mask, new, True)
        contenders["haltkit (eager)"] = hk_contender(target, lists, new, None, False, backend)
        if compile:
            contenders["haltkit"] = hk_contender(target, lists, new, None, True, backend)
        contenders["haltkit+draft"] = hk_contender(target, lists, new, DraftModel(draft, max_len=K), compile, backend)
        contenders["haltkit+ngram"] = hk_contender(target, lists, new, PromptLookup(max_len=K), compile, backend)
        contenders["haltkit+layer"] = hk_contender(target, lists, new, EarlyLayerDraft(layers, max_len=K),
                                                   compile, backend)
        times = {name: [] for name in contenders}
        first = {}
        for r in range(repeats + 1):  # run 0 warms up (and compiles)
            for name, run in contenders.items():
                t0 = time.perf_counter()
                out = run()
                dt = time.perf_counter() - t0
                if r == 0:
                    first[name] = dict(out, warmup_s=dt)
                else:
                    times[name].append(dt)
        base = statistics.median(times["hf"])
        for name in contenders:
            f = first[name]
            med = statistics.median(times[name])
            rows.append({
                "contender": name, "batch": B, "new_tokens": new, "median_s": med, "times_s": times[name],
                "tokens_per_s": f["tokens"] / med, "speedup_vs_hf": base / med,
                "target_forwards_per_token": f["target_forwards"] / f["tokens"] * B,
                "mean_accepted": f["accepted"], "warmup_s": f["warmup_s"], "compile_s": f["compile"],
                "same_tokens_as_hf": f["out"] == first["hf"]["out"],
            })
    return rows


def bench_exits(toy, B: int, lambdas, seed: int, backend: str, budget: int) -> list[dict]:
    """Held-out reasoning prompts with the toy's exit policy: tokens and accuracy per lambda."""
    from haltkit.tasks import ChainSum, parse_answer, prompt_text

    rng = random.Random(seed + 1)
    problems = [ChainSum().sample(rng, 1 + b % 5, held_out=True) for b in range(B)]
    texts = [prompt_text(p) for p in problems]

    def run(lam):
        t0 = time.perf_counter()
        res = haltkit.generate(toy.target, prompts=texts, tokenizer=toy.tokenizer, value_head=toy.head,
                               exit=toy.exit_policy(cost_of_time=lam, thinking_budget=budget), backend=backend)
        return res, time.perf_counter() - t0

    run(None)  # warm-up, not reported
    rows = []
    for lam in [None] + list(lambdas):
        res, dt = run(lam)
        correct = [float(parse_answer(t) == p.answer) for t, p in zip(res.text, problems)]
        rows.append({"cost_of_time": lam, "tokens": res.total_tokens, "think_tokens": sum(res.think_tokens),
                     "accuracy": sum(correct) / B, "seconds": dt,
                     "value_exits": sum(r == "value" for r in res.think_end)})
    base = rows[0]["tokens"]
    for r in rows:
        r["tokens_saved"] = base - r["tokens"]
        r["tokens_saved_frac"] = (base - r["tokens"]) / base
    return rows


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "haltkit": haltkit.__version__,
            "backends": haltkit.backends(), "load_avg": os.getloadavg()}


def markdown(meta: dict, rows: list[dict], exits: list[dict]) -> str:
    lines = [f"# End-to-end decoding ({'shipped toy model' if meta['shipped'] else 'random-weight Llama, toy shape'})",
             "", f"{meta['machine']['platform']}, {meta['machine']['cpus']} CPUs, torch {meta['machine']['torch']}, "
             f"transformers {meta['machine']['transformers']}, load average at start "
             f"{meta['machine']['load_avg'][0]:.1f}; {meta['new_tokens']} new tokens per sequence, EOS off, "
             f"median of {meta['repeats']} interleaved runs after a warm-up; K = {meta['K']}, "
             f"early-layer draft L = {meta['layers']}; epilogue backend {meta['backend']}.", "",
             "| batch | contender | tokens/s | vs hf | target fwd / token | accepted / step | same tokens as hf | warm-up s (compile s) |",
             "|---:|---|---:|---:|---:|---:|:-:|---:|"]
    for r in rows:
        acc = "-" if math.isnan(r["mean_accepted"]) else f"{r['mean_accepted']:.2f}"
        lines.append(f"| {r['batch']} | {r['contender']} | {r['tokens_per_s']:.0f} | {r['speedup_vs_hf']:.2f}x | "
                     f"{r['target_forwards_per_token']:.2f} | {acc} | {'yes' if r['same_tokens_as_hf'] else 'no'} | "
                     f"{r['warmup_s']:.1f} ({r['compile_s']:.1f}) |")
    if exits:
        lines += ["", "## Value exits (held-out chain sums, toy exit policy, greedy)", "",
                  "| lambda | tokens | saved | think tokens | value exits | accuracy | seconds | time vs off |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in exits:
            lam = "off" if r["cost_of_time"] is None else f"{r['cost_of_time']:g}"
            lines.append(f"| {lam} | {r['tokens']} | {r['tokens_saved']} ({100 * r['tokens_saved_frac']:.0f}%) | "
                         f"{r['think_tokens']} | {r['value_exits']} | {r['accuracy']:.2f} | {r['seconds']:.2f} | "
                         f"{r['seconds'] / exits[0]['seconds']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="seconds-long run: batch 1, few tokens, no compile")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--new", type=int, default=128, help="tokens generated per sequence")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--K", type=int, default=4, help="draft length")
    p.add_argument("--layers", type=int, default=2, help="early-layer draft depth")
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "e2e"), help="output path without extension")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.new, args.repeats, args.no_compile = [1], 6, 1, True
    torch.set_num_threads(args.threads)
    target, draft, head, tok, shipped, toy = load_models(args.seed)
    with torch.no_grad():
        rows = bench_throughput(target, draft, tok, args.batch, args.new, args.repeats, not args.no_compile,
                                args.backend, args.layers, args.K, args.seed)
    exits = bench_exits(toy, 2 if args.quick else 16, [0.01] if args.quick else [0.002, 0.005, 0.01, 0.02, 0.05],
                        args.seed, args.backend, 16 if args.quick else 320) if shipped else []
    meta = {"machine": machine(), "shipped": shipped, "new_tokens": args.new, "repeats": args.repeats,
            "K": args.K, "layers": args.layers, "backend": args.backend, "compile": not args.no_compile,
            "batch_sizes": args.batch, "quick": args.quick}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "throughput": clean, "exits": exits}, indent=1))
    md = markdown(meta, rows, exits)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
