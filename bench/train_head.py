"""Rollout and forced-probe throughput of train-head's batched pipeline against plain Hugging Face.

Both sides do the same work for the same prompts, greedy: a think phase of at most ``max_think``
tokens (ended by the model's ``think_close`` token, EOS or the budget), then a forced-answer probe
every ``every`` think tokens (the exit text, then a greedy answer of at most ``max_answer`` tokens).

* haltkit: :func:`haltkit.train.pipeline.rollout_batch`: the think phases of the batch through
  ``haltkit.generate``, one teacher-forced forward for the hidden states, then every probe of the
  batch ``probe_batch`` at a time from copies of one shared KV cache.
* Hugging Face: ``model.generate`` over the batch (left padding) for the think phases, then per
  rollout one ``model.generate`` over all its probes (left-padded prompt + think[:t] + exit text).

Throughput counts generated tokens (think tokens plus probe tokens: exit text and answer), taken
from the haltkit side for both (the two must agree: the bench checks that both sides read the same
answers). Sides alternate, median of ``--rounds``. Writes ``bench/results/train_head.{json,md}``.
The machine is shared: ratios, not absolute figures, are what carry over.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def hf_rollouts(model, conv, prompt_ids, max_think: int, every: int, max_answer: int, pad: int):
    """The same rollouts with plain ``model.generate``: (think lists, answers per checkpoint)."""
    def left_pad(lists):
        W = max(map(len, lists))
        ids = torch.full((len(lists), W), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(lists):
            ids[i, W - len(s):] = torch.tensor(s)
            mask[i, W - len(s):] = 1
        return ids, mask

    ids, mask = left_pad(prompt_ids)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_think, do_sample=False,
                         eos_token_id=[conv.think_close_id, *conv.eos_ids], pad_token_id=pad)
    thinks = []
    for row in out[:, ids.shape[1]:].tolist():
        stop = next((i for i, t in enumerate(row) if t == conv.think_close_id or t in conv.eos_ids), len(row))
        thinks.append(row[:stop])
    answers = []
    for p, think in zip(prompt_ids, thinks):
        T = len(think)
        ckpts = sorted(set(range(0, T + 1, every)) | {T})
        ids, mask = left_pad([p + think[:t] + list(conv.exit_ids) for t in ckpts])
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_answer, do_sample=False,
                             eos_token_id=list(conv.eos_ids), pad_token_id=pad)
        rows = []
        for row in gen[:, ids.shape[1]:].tolist():
            cut = next((i for i, t in enumerate(row) if t in conv.eos_ids), len(row))
            rows.append(row[:cut])
        answers.append(rows)
    return thinks, answers


def bench_model(name, model, tok, conv, task, problems, max_think, every, max_answer, rounds, batch):
    from haltkit.train.pipeline import RolloutConfig, rollout_batch

    prompt_ids = conv.render_all(tok, problems)
    cfg = RolloutConfig(every=every, max_think=max_think, max_answer=max_answer, batch_size=batch, probe_batch=64)
    pad = tok.pad_token_id if tok.pad_token_id is not None else conv.eos_ids[0]
    times = {"haltkit": [], "hf": []}
    ours = theirs = None
    with torch.no_grad():
        for r in range(rounds):
            for side in (("haltkit", "hf") if r % 2 == 0 else ("hf", "haltkit")):
                t0 = time.perf_counter()
                if side == "haltkit":
                    ours = rollout_batch(model, tok, conv, task, problems, prompt_ids, cfg)
                else:
                    theirs = hf_rollouts(model, conv, prompt_ids, max_think, every, max_answer, pad)
                times[side].append(time.perf_counter() - t0)
    think_tokens = sum(len(r.think_ids) for r in ours)
    probe_tokens = int(sum(int(r.probe_tokens.sum()) for r in ours))
    same_think = sum(int(r.think_ids.tolist() == t) for r, t in zip(ours, theirs[0])) / len(ours)
    ours_answers = [a for r in ours for a in r.answers]
    theirs_answers = [tok.decode(a).strip() for rows in theirs[1] for a in rows]
    same_answers = (sum(int(a == b) for a, b in zip(ours_answers, theirs_answers)) / max(1, len(ours_answers))
                    if len(ours_answers) == len(theirs_answers) else None)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = think_tokens + probe_tokens
    return {"model": name, "prompts": len(problems), "max_think": max_think, "every": every, "max_answer": max_answer,
            "think_tokens": think_tokens, "probes": len(ours_answers), "probe_tokens": probe_tokens,
            "seconds": times, "median_s": med,
            "tokens_per_s": {k: tokens / v for k, v in med.items()}, "speedup": med["hf"] / med["haltkit"],
            "same_think": same_think, "same_answers": same_answers}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--toy-prompts", type=int, default=16)
    ap.add_argument("--smol-prompts", type=int, default=8)
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "train_head"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from haltkit.tasks import ChainSum, Problem, make_verifier
    from haltkit.train.conventions import resolve_conventions
    from haltkit.train.head import sample_problems
    from haltkit.train.toy import export_hf

    results, notes = [], []
    toy_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "haltkit_bench_toyhf"
    export_hf(toy_dir)
    tok = AutoTokenizer.from_pretrained(toy_dir)
    model = AutoModelForCausalLM.from_pretrained(toy_dir).eval()
    conv = resolve_conventions(tok, model, exit_text="</think>A:")
    problems = sample_problems(ChainSum(), args.toy_prompts, seed=3, held_out=True)
    results.append(bench_model("toy (1.08M, exported HF dir)", model, tok, conv, ChainSum(), problems, 160, 2, 8,
                               args.rounds, len(problems)))
    print(json.dumps({k: v for k, v in results[-1].items() if k != "seconds"}), flush=True)
    if not args.skip_smollm2:
        from e2e_real import default_cache, fetch_model

        ckpt, _, note = fetch_model(default_cache())
        notes.append(note)
        if ckpt is None:
            print(f"train_head bench: SmolLM2 skipped: {note}")
        else:
            tok = AutoTokenizer.from_pretrained(ckpt)
            model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
            conv = resolve_conventions(tok, model, think_close="\n\n", exit_text="\n\nThe answer is")
            rng = random.Random(0)
            task = type("Sums", (), {"verify": staticmethod(make_verifier("numeric"))})()
            probs = []
            for _ in range(args.smol_prompts):
                a, b = rng.randint(10, 99), rng.randint(10, 99)
                probs.append(Problem(f"What is {a} + {b}? Explain briefly.", str(a + b)))
            results.append(bench_model("SmolLM2-135M-Instruct (GGUF Q4_1, de-quantised fp32)", model, tok, conv, task,
                                       probs, 48, 4, 6, args.rounds, len(probs)))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "seconds"}), flush=True)
    out = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "threads": args.threads, "rounds": args.rounds, "notes": notes, "results": results,
           "load_note": "2-core machine shared with other jobs (load average about 8 during the run): ratios only"}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(out, f, indent=1)
    lines = ["# train-head rollouts: batched pipeline vs plain Hugging Face generate", "",
             "Same prompts, greedy, same probes (exit text then a greedy answer every `every` think tokens); "
             f"median of {args.rounds} alternating rounds, {args.threads} threads, on a shared 2-core CPU "
             "(load average about 8): the ratio is the figure to read.", "",
             "| model | prompts | think tokens | probes | probe tokens | haltkit s | HF s | haltkit tok/s | HF tok/s "
             "| speed-up | same think / answers |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['prompts']} | {r['think_tokens']} | {r['probes']} | {r['probe_tokens']} | "
                     f"{r['median_s']['haltkit']:.2f} | {r['median_s']['hf']:.2f} | "
                     f"{r['tokens_per_s']['haltkit']:.0f} | {r['tokens_per_s']['hf']:.0f} | {r['speedup']:.2f}x | "
                     f"{r['same_think']:.0%} / "
                     f"{'n/a' if r['same_answers'] is None else format(r['same_answers'], '.0%')} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
