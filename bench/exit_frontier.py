"""Exit frontier: accuracy vs think tokens of exit rules on held-out chain sums (shipped toy model).

One greedy rollout per held-out query, with an answer forced after every think length t
(``every=1``), gives R(t), each forced answer's confidence and text. Greedy decoding makes the
think prefix the same whatever rule stops it, so every rule below is scored exactly on these
rollouts; the value head is replayed through ``haltkit.decode_step`` itself (torch backend) on
the recorded hidden states, and a live decode with the head checks the replay.

Rules: (a) no exit; (b) fixed thinking budgets (truncation); (c) DEER-style confidence exit: an
answer is forced every k tokens and accepted when its tokens' geometric-mean probability passes
a threshold; (d) Dynasor-style consistency exit: an answer is forced every k tokens and
accepted when the last n agree; (e) the value head over a sweep of the price of time lambda
(and patience); (o) the oracle: per query, the earliest t after which forced answers stay
correct (0 tokens for a query the model gets wrong anyway). Probe tokens of (c) and (d) (the
exit tokens and answers of rejected probes) are counted in their cost.

Queries are distinct held-out questions (level 1 has only 11 possible held-out questions), split by
a hash of the question into a validation half, on which the head's operating points (lambda,
patience) are chosen by the pipeline's own rule (:func:`haltkit.train.head.calibrate`: the point
must hold with a confidence margin and at twice its price), and a test half, which every reported
figure comes from. ``--calibrate-head FILE`` writes the shipped head with those points.

Writes ``bench/results/exit_frontier.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

import haltkit
from haltkit import DecodeState, Reason, SamplingParams, decode_step, pack_requests
from haltkit.tasks import DIFFICULTIES, ChainSum, prompt_text
from haltkit.tokenizer import CharTokenizer
from haltkit.train.head import calibrate, set_operating_points, split_of
from haltkit.train.rollouts import collect_rollouts, load_rollouts, think_greedy

RESULTS = Path(__file__).resolve().parent / "results"
LAMBDAS = [0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3]
PATIENCES = [1, 2, 4]
BUDGETS = [4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256]
PROBE_EVERY = [4, 8, 16, 32]
DEER_THRESHOLDS = [0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999]
DYNASOR_REPEATS = [2, 3, 4]


def distinct_held_out(task: ChainSum, per_level: int, seed: int) -> list:
    """Up to ``per_level`` distinct held-out questions per level (level 1 has only a few)."""
    import random

    rng, seen, out = random.Random(seed), set(), []
    for level in sorted(DIFFICULTIES):
        n = tries = 0
        while n < per_level and tries < 200 * per_level:
            tries += 1
            p = task.sample(rng, level, held_out=True)
            if p.question not in seen:
                seen.add(p.question)
                out.append(p)
                n += 1
    return out


def level_counts(rs) -> dict:
    """Distinct questions per difficulty level."""
    out: dict = {}
    for r in rs:
        out.setdefault(r.problem.difficulty, set()).add(r.problem.question)
    return {lvl: len(q) for lvl, q in sorted(out.items())}


def point(rs, think, probe, label: str, **params) -> dict:
    """Aggregate per-query exits (think tokens, probe tokens) into one frontier point."""
    correct = [float(r.reward[t]) for r, t in zip(rs, think)]
    n = len(rs)
    return {"label": label, **params, "accuracy": sum(correct) / n, "think": sum(think) / n,
            "probe": sum(probe) / n, "tokens": (sum(think) + sum(probe)) / n, "exits": list(think), "correct": correct}


def no_exit(rs) -> dict:
    return point(rs, [len(r.think_ids) for r in rs], [0] * len(rs), "(a) no exit")


def truncation(rs, budget: int) -> dict:
    return point(rs, [min(len(r.think_ids), budget) for r in rs], [0] * len(rs), "(b) budget", budget=budget)


def oracle(rs) -> dict:
    think = []
    for r in rs:
        R = r.reward
        if R[-1] < 1:
            think.append(0)
            continue
        bad = (R < 1).nonzero()
        think.append(int(bad[-1]) + 1 if len(bad) else 0)
    return point(rs, think, [0] * len(rs), "(o) oracle")


def probed(rs, every: int, accept, label: str, **params) -> dict:
    """Force an answer every ``every`` think tokens; stop at the first probe ``accept`` takes."""
    think, probe = [], []
    for r in rs:
        T, spent, seen, stop = len(r.think_ids), 0, [], None
        for t in range(every, T, every):
            seen.append(r.answers[t])
            if accept(r, t, seen):
                stop = t
                break
            spent += int(r.probe_tokens[t])  # a rejected probe's exit tokens and answer are wasted
        think.append(T if stop is None else stop)
        probe.append(spent)
    return point(rs, think, probe, label, every=every, **params)


def deer(rs, every: int, threshold: float) -> dict:
    return probed(rs, every, lambda r, t, seen: float(r.confidence[t]) >= threshold,
                  "(c) confidence", threshold=threshold)


def dynasor(rs, every: int, repeats: int) -> dict:
    def accept(r, t, seen):
        return len(seen) >= repeats and seen[-1] != "" and len(set(seen[-repeats:])) == 1
    return probed(rs, every, accept, "(d) consistency", repeats=repeats)


def replay_value_exits(rs, head, toy, settings: list[tuple[float | None, int, int]]) -> list[list[int]]:
    """Think length at which each query leaves thinking under each (lambda, patience, budget).

    Runs ``haltkit.decode_step`` (torch backend) step by step on the recorded hidden states, with
    logits that make the greedy choice the recorded token: the exact decision the live loop makes.
    """
    Q, S = len(rs), len(settings)
    V = toy.tokenizer.vocab_size
    policies = [toy.exit_policy(lam, thinking_budget=b, patience=p) for lam, p, b in settings]
    req = pack_requests(SamplingParams(temperature=0.0), [pol for pol in policies for _ in range(Q)], V)
    state = DecodeState.new(Q * S)
    T = torch.tensor([len(r.think_ids) for r in rs])
    max_T = int(T.max())
    # next token at step n per query: the recorded think token, then </think> where the model closed
    nxt = torch.full((Q, max_T + 1), toy.tokenizer.end_think_id, dtype=torch.long)
    hid = torch.zeros(Q, max_T + 1, rs[0].hidden.shape[1])
    for q, r in enumerate(rs):
        nxt[q, : len(r.think_ids)] = r.think_ids
        hid[q, : len(r.hidden)] = r.hidden
        hid[q, len(r.hidden):] = r.hidden[-1]
    for n in range(max_T + 1):
        if not bool((state.phase == 0).any()):
            break
        logits = torch.zeros(Q, V)
        logits[torch.arange(Q), nxt[:, n]] = 10.0
        decode_step(logits.repeat(S, 1), hid[:, n].repeat(S, 1), req, state, head, backend="torch")
    return state.think_tokens.view(S, Q).tolist()


def value_sweep(rs, toy, max_think: int) -> list[dict]:
    settings = [(lam, p, max_think) for p in PATIENCES for lam in LAMBDAS]
    exits = replay_value_exits(rs, toy.head, toy, settings)
    return [point(rs, ex, [0] * len(rs), "(e) value head", cost_of_time=lam, patience=p)
            for (lam, p, _), ex in zip(settings, exits)]


def frontier_cost(points: list[dict], accuracy: float) -> float:
    """Fewest mean tokens any point reaches at accuracy >= ``accuracy`` (inf if none)."""
    costs = [p["tokens"] for p in points if p["accuracy"] >= accuracy - 1e-12]
    return min(costs) if costs else math.inf


def per_difficulty(rs, pt: dict) -> dict:
    out = {}
    for level in sorted({r.problem.difficulty for r in rs}):
        idx = [i for i, r in enumerate(rs) if r.problem.difficulty == level]
        out[level] = {"n": len(idx), "accuracy": sum(pt["correct"][i] for i in idx) / len(idx),
                      "think": sum(pt["exits"][i] for i in idx) / len(idx)}
    return out


@torch.no_grad()
def draft_acceptance(rs, toy, draft_len: int = 4) -> dict:
    """Greedy speculative acceptance of the draft on the target's own traces, per difficulty.

    The draft proposes greedily; a proposal is accepted while it equals the target's greedy token
    (teacher forcing on the target trace gives the draft's proposals up to its first miss).
    Returns per level: per-token agreement, and tokens per target forward at ``draft_len``.
    """
    tok = toy.tokenizer
    stats: dict[int, list[float]] = {}
    for r in rs:
        answer = tok.encode(f"A:{r.natural_answer}") + [tok.eos_id]
        trace = r.think_ids.tolist() + [tok.end_think_id] * r.closed + (answer if r.closed else [])
        prompt = tok.encode(prompt_text(r.problem))
        seq = torch.tensor(prompt + trace)[None]
        guess = toy.draft(seq).logits[0, len(prompt) - 1 : -1].argmax(-1)
        match = (guess == torch.tensor(trace)).tolist()
        i = forwards = 0
        while i < len(match):
            run = 0
            while run < draft_len and i + run < len(match) and match[i + run]:
                run += 1
            forwards += 1
            i += run + 1  # accepted proposals plus the target's own token
        s = stats.setdefault(r.problem.difficulty, [0, 0, 0])
        s[0] += sum(match)
        s[1] += len(match)
        s[2] += forwards
    return {lvl: {"agreement": a / n, "tokens_per_target_forward": n / f} for lvl, (a, n, f) in sorted(stats.items())}


def live_check(rs, toy, lam: float, patience: int, max_think: int, count: int) -> dict:
    """Decode ``count`` queries live with the head at (lam, patience); compare with the replay."""
    sub = rs[:: max(1, len(rs) // count)][:count]
    live = think_greedy(toy.target, toy.tokenizer, [r.problem for r in sub], max_think,
                        head=toy.head, cost_of_time=lam, patience=patience)
    replay = replay_value_exits(sub, toy.head, toy, [(lam, patience, max_think)])[0]
    same_exit = sum(len(ids) == t for (ids, _, _, _), t in zip(live, replay))
    task = ChainSum()
    same_score = sum(task.verify(r.problem, ans) == float(r.reward[t]) for r, (_, _, ans, _), t in zip(sub, live, replay))
    return {"queries": len(sub), "cost_of_time": lam, "patience": patience,
            "same_exit_step": same_exit, "same_correctness": same_score}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-level", type=int, default=90, help="held-out queries per difficulty level")
    ap.add_argument("--max-think", type=int, default=320)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "haltkit_exit_frontier"),
                    help="rollout shards (resumable)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--toy", default=None, help="a toy model directory (default: the shipped one)")
    ap.add_argument("--live", type=int, default=40, help="queries decoded live to check the replay")
    ap.add_argument("--rollouts-only", action="store_true", help="collect the rollouts (before a head exists) and stop")
    ap.add_argument("--worker", type=int, default=0, help="with --rollouts-only: this process's share of the shards")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--calibrate-head", default=None, help="write the head with the operating points chosen on the "
                    "validation half to this file (the shipped one: python/haltkit/models/toy/head.safetensors)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    from transformers import LlamaForCausalLM

    target = LlamaForCausalLM.from_pretrained(Path(args.toy or haltkit.models.toy_dir()) / "target").eval()
    task = ChainSum()
    problems = distinct_held_out(task, args.per_level, args.seed)
    cache = os.path.join(args.cache, f"distinct_seed{args.seed}_n{len(problems)}_think{args.max_think}")
    paths = collect_rollouts(target, CharTokenizer(), task, problems, cache, 1, args.max_think, shard_size=16,
                             worker=args.worker, workers=args.workers)
    t_roll = time.time() - t0
    if args.rollouts_only:
        return 0
    everything = load_rollouts(paths)
    # Operating points are chosen on a validation half of the questions; every reported figure
    # comes from the other half (split by a hash of the question, so no question is in both).
    val_rs = [r for r in everything if split_of(r.problem.question, 0.5, 0.0) == "val"]
    rs = [r for r in everything if split_of(r.problem.question, 0.5, 0.0) != "val"]
    toy = haltkit.load_toy(path=args.toy)

    a, o = no_exit(rs), oracle(rs)
    b = [truncation(rs, B) for B in BUDGETS]
    c = [deer(rs, k, th) for k in PROBE_EVERY for th in DEER_THRESHOLDS]
    d = [dynasor(rs, k, n) for k in PROBE_EVERY for n in DYNASOR_REPEATS]
    e = value_sweep(rs, toy, args.max_think) + [dict(a, label="(e) value head", cost_of_time=None, patience=None)]

    # The operating points are chosen on the validation half by train-head's rule (with margins),
    # and reported at the same (lambda, patience) on the test half; so is the rule without margins.
    ops = calibrate(toy.head, val_rs, args.max_think)
    naive = calibrate(toy.head, val_rs, args.max_think, price_margin=1.0, z=0.0)
    chosen = {}
    for tag, op in (("within_1pt", ops.get("within_1pt")), ("no_loss", ops.get("no_loss")),
                    ("within_1pt_no_margin", naive.get("within_1pt"))):
        if op is None:
            continue
        ex = replay_value_exits(rs, toy.head, toy, [(op["cost_of_time"], op["patience"], args.max_think)])[0]
        chosen[tag] = dict(point(rs, ex, [0] * len(rs), "(e) value head", cost_of_time=op["cost_of_time"],
                                 patience=op["patience"]), validation={k: op[k] for k in ("accuracy", "think_tokens")})
    star = chosen.get("within_1pt", dict(a, label="(e) value head", cost_of_time=None, patience=None))
    star_val = ops.get("within_1pt")
    e = e + [p for p in chosen.values()]
    best_e = max(e, key=lambda p: (p["accuracy"], -p["tokens"]))  # the head's most accurate setting
    save_e, save_o = a["think"] - star["think"], a["think"] - o["think"]
    dominated = {name: [frontier_cost(e, p["accuracy"]) <= p["tokens"] + 1e-9 for p in pts]
                 for name, pts in (("b", b), ("c", c), ("d", d))}

    # Budget conditioning: at a target mean budget, the head (told a cap through n / budget)
    # against plain truncation at that budget.
    budget_rows = []
    patience = star["patience"] or haltkit.DEFAULT_PATIENCE
    for target in (16, 32, 48, 64, 96):
        caps = sorted({min(c, args.max_think) for c in (target, 2 * target, args.max_think)})
        settings = [(lam, patience, cap) for cap in caps for lam in LAMBDAS[::2] + [star["cost_of_time"] or LAMBDAS[0]]]
        exits = replay_value_exits(rs, toy.head, toy, settings)
        pts = [point(rs, ex, [0] * len(rs), "(e)", cost_of_time=lam, cap=cap) for (lam, _, cap), ex in zip(settings, exits)]
        tr = truncation(rs, target)
        fits = [p for p in pts if p["think"] <= tr["think"] + 1e-9]
        best = max(fits, key=lambda p: (p["accuracy"], -p["think"])) if fits else None
        same_cap = [p for p in pts if p["cap"] == target and p["cost_of_time"] == star["cost_of_time"]]
        capped = [p for p in pts if p["cap"] == target]
        capped_best = max(capped, key=lambda p: (p["accuracy"], -p["think"])) if capped else None
        budget_rows.append({
            "budget": target, "truncation": {k: tr[k] for k in ("accuracy", "think")},
            "head_best_within_mean_budget": None if best is None else
                {k: best[k] for k in ("accuracy", "think", "cost_of_time", "cap")},
            "head_cap_equal_budget_at_star": None if not same_cap else {k: same_cap[0][k] for k in ("accuracy", "think")},
            "head_cap_equal_budget_best": None if capped_best is None else
                {k: capped_best[k] for k in ("accuracy", "think", "cost_of_time")},
        })

    acc = draft_acceptance(rs, toy)
    live = live_check(rs, toy, star["cost_of_time"], star["patience"], args.max_think, args.live) \
        if star["cost_of_time"] is not None else None
    strip = lambda p: {k: v for k, v in p.items() if k not in ("exits", "correct")}  # noqa: E731
    result = {
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "model": {"target_params": sum(p.numel() for p in toy.target.parameters()),
                  "draft_params": sum(p.numel() for p in toy.draft.parameters()), "head": repr(toy.head)},
        "queries": len(rs), "distinct_questions": len({r.problem.question for r in rs}),
        "validation_queries": len(val_rs), "validation_distinct_questions": len({r.problem.question for r in val_rs}),
        "level_counts": {"validation": level_counts(val_rs), "test": level_counts(rs)},
        "operating_point_on_validation": star_val, "calibration": {k: v for k, v in ops.items()},
        "chosen_on_validation": {k: strip(v) for k, v in chosen.items()}, "per_level": args.per_level,
        "seed": args.seed, "max_think": args.max_think,
        "rollout_seconds": t_roll, "natural_vs_forced_final_agree": sum(
            task.verify(r.problem, r.natural_answer) == float(r.reward[-1]) for r in rs) / len(rs),
        "a": strip(a), "o": strip(o), "b": [strip(p) for p in b], "c": [strip(p) for p in c],
        "d": [strip(p) for p in d], "e": [strip(p) for p in e],
        "operating_point": strip(star),
        "targets": {"vacuous": a["accuracy"] == 0.0,
                    "accuracy_a": a["accuracy"], "accuracy_e": star["accuracy"], "think_a": a["think"],
                    "think_e": star["think"], "think_o": o["think"],
                    "e_saves_fraction_of_oracle_saving": save_e / save_o if save_o > 0 else math.nan,
                    "e_saves_fraction_of_a": save_e / a["think"],
                    "dominated_points": {k: f"{sum(v)}/{len(v)}" for k, v in dominated.items()},
                    "undominated": {k: [strip(p) for p, dom in zip(pts, dominated[k]) if not dom]
                                    for k, pts in (("b", b), ("c", c), ("d", d))}},
        "most_accurate_e": strip(best_e),
        "per_difficulty": {"a": per_difficulty(rs, a), "o": per_difficulty(rs, o), "e": per_difficulty(rs, star),
                           "e_best": per_difficulty(rs, best_e)},
        "budget_conditioning": budget_rows,
        "draft_acceptance": acc,
        "live_check": live,
        "seconds": time.time() - t0,
    }
    if args.calibrate_head:
        head = haltkit.MarginalValueHead.load(Path(args.toy or haltkit.models.toy_dir()) / "head.safetensors")
        set_operating_points(head, ops, {
            "source": "bench/exit_frontier.py, validation half", "questions": len(val_rs),
            "distinct_questions": len({r.problem.question for r in val_rs}), "level_counts": level_counts(val_rs),
            "seed": args.seed, "per_level": args.per_level, "split": "split_of(question, 0.5, 0.0) == 'val'",
            "probe_every": 1, "max_think": args.max_think,
            "test_split": {k: {"accuracy": v["accuracy"], "think_tokens": v["think"]} for k, v in chosen.items()
                           if k in ops} | {"no_exit": {"accuracy": a["accuracy"], "think_tokens": a["think"]}}})
        head.save(args.calibrate_head)
        print(f"wrote {args.calibrate_head}: {head.meta['operating_points']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "exit_frontier.json").write_text(json.dumps(result, indent=1))
    (out / "exit_frontier.md").write_text(markdown(result))
    plot(result, out / "exit_frontier.png")
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    t = r["targets"]
    counts = ", ".join(f"{v['n']}" for v in r["per_difficulty"]["a"].values())
    lc = r["level_counts"]
    fmt = lambda d: ", ".join(f"level {k}: {v}" for k, v in d.items())  # noqa: E731
    rule = r["calibration"].get("rule", {})
    L = [f"# Exit frontier: shipped toy model, {r['queries']} held-out chain sums, {r['distinct_questions']} distinct "
         f"(per level: {counts})", "",
         f"Test half: {r['distinct_questions']} distinct held-out questions ({fmt(lc['test'])}). The operating points "
         f"(lambda, patience) were chosen on {r['validation_distinct_questions']} other distinct held-out questions "
         f"(validation half, split by a hash of the question; {fmt(lc['validation'])}; level 1 has only 11 possible "
         "held-out questions in all) by train-head's rule, `haltkit.train.head.calibrate`: the fewest think tokens "
         f"whose accuracy clears the floor by {rule.get('z')} standard errors of its paired difference with no exit "
         f"and that still clears it at {rule.get('price_margin')}x the price. Every figure below is from the test half.",
         "", "| point chosen on validation | lambda | patience | validation accuracy / think | test accuracy / think |",
         "|---|---|---|---|---|",
         *[f"| {name} | {p['cost_of_time']:.4g} | {p['patience']} | {p['validation']['accuracy']:.3f} / "
           f"{p['validation']['think_tokens']:.1f} | {p['accuracy']:.3f} / {p['think']:.1f} |"
           for name, p in r["chosen_on_validation"].items()],
         f"| (a) no exit | - | - | {r['calibration']['no_exit']['accuracy']:.3f} / "
         f"{r['calibration']['no_exit']['think_tokens']:.1f} | {r['a']['accuracy']:.3f} / {r['a']['think']:.1f} |", "",
         "`within_1pt_no_margin` is the same choice without the margins (fewest tokens within one point of no "
         "exit on validation), shown for what it loses on the test half.", "",
         f"Greedy; {r['model']['target_params']:,}-parameter target, head {r['model']['head']}; "
         f"torch {r['machine']['torch']}, {r['machine']['threads']} threads. Tokens are mean think tokens per "
         "query, plus rejected probes' tokens for (c) and (d).", "",
         *(["**The model answers no held-out query correctly, so every rule ties at accuracy 0 and the "
             "targets below are met only vacuously: this run is not evidence for (or against) the head.**", ""]
           if t["vacuous"] else []),
         "## Against the targets", "",
         "| quantity | measured | target |", "|---|---|---|",
         f"| accuracy (a) no exit | {t['accuracy_a']:.3f} | |",
         f"| accuracy (e) at operating point (lambda={r['operating_point']['cost_of_time']:.4g}, "
         f"patience={r['operating_point']['patience']}) | {t['accuracy_e']:.3f} | >= (a) - 0.01 |",
         f"| think tokens (a) / (e) / (o) | {t['think_a']:.1f} / {t['think_e']:.1f} / {t['think_o']:.1f} | |",
         f"| (e) saving / oracle saving | {t['e_saves_fraction_of_oracle_saving']:.2f} | >= 0.80 |",
         f"| (e) saving / (a) think tokens | {t['e_saves_fraction_of_a']:.2f} | >= 0.40 |",
         f"| points of (b), (c), (d) dominated by (e) | {t['dominated_points']['b']}, {t['dominated_points']['c']}, "
         f"{t['dominated_points']['d']} | all |", "",
         "## Frontier points", "", "| rule | setting | accuracy | think | probe | tokens |", "|---|---|---|---|---|---|"]
    def row(p, setting):
        L.append(f"| {p['label']} | {setting} | {p['accuracy']:.3f} | {p['think']:.1f} | {p['probe']:.1f} | {p['tokens']:.1f} |")
    row(r["a"], "-")
    row(r["o"], "-")
    for p in r["b"]:
        row(p, f"budget {p['budget']}")
    for p in r["c"]:
        row(p, f"every {p['every']}, conf >= {p['threshold']}")
    for p in r["d"]:
        row(p, f"every {p['every']}, {p['repeats']} equal")
    for p in r["e"]:
        row(p, "-" if p["cost_of_time"] is None else f"lambda {p['cost_of_time']:.4g}, patience {p['patience']}")
    L += ["", "## Per difficulty (accuracy / mean think tokens)", "",
          f"| level | n | (a) no exit | (o) oracle | (e) operating point | (e) most accurate (lambda "
          f"{r['most_accurate_e']['cost_of_time']}, patience {r['most_accurate_e']['patience']}) |",
          "|---|---|---|---|---|---|"]
    for lvl, pa in r["per_difficulty"]["a"].items():
        po, pe, pb = (r["per_difficulty"][k][lvl] for k in ("o", "e", "e_best"))
        L.append(f"| {lvl} | {pa['n']} | {pa['accuracy']:.2f} / {pa['think']:.1f} | {po['accuracy']:.2f} / "
                 f"{po['think']:.1f} | {pe['accuracy']:.2f} / {pe['think']:.1f} | {pb['accuracy']:.2f} / {pb['think']:.1f} |")
    L += ["", "A price of time lambda ends a think phase whose expected gain per further token is below lambda: at a "
          "high price the hardest queries, whose answers are far away, are given up early, so tokens per query grow "
          "with difficulty only up to the level the price still pays for."]
    L += ["", "## Budget conditioning (accuracy / mean think tokens)", "",
          "| target mean budget | truncation | head, best within that mean budget (lambda, cap) "
          "| head, cap = budget, best lambda | head, cap = budget, operating lambda |",
          "|---|---|---|---|---|"]
    for br in r["budget_conditioning"]:
        tr, hb, hc = br["truncation"], br["head_best_within_mean_budget"], br["head_cap_equal_budget_at_star"]
        hx = br["head_cap_equal_budget_best"]
        hb_s = "-" if hb is None else f"{hb['accuracy']:.3f} / {hb['think']:.1f} ({hb['cost_of_time']}, {hb['cap']})"
        hx_s = "-" if hx is None else f"{hx['accuracy']:.3f} / {hx['think']:.1f} ({hx['cost_of_time']})"
        hc_s = "-" if hc is None else f"{hc['accuracy']:.3f} / {hc['think']:.1f}"
        L.append(f"| {br['budget']} | {tr['accuracy']:.3f} / {tr['think']:.1f} | {hb_s} | {hx_s} | {hc_s} |")
    L += ["", "## Draft acceptance (greedy, draft length 4, on the target's traces)", "",
          "| level | per-token agreement | tokens per target forward |", "|---|---|---|"]
    for lvl, s in r["draft_acceptance"].items():
        L.append(f"| {lvl} | {s['agreement']:.3f} | {s['tokens_per_target_forward']:.2f} |")
    if r["live_check"]:
        lc = r["live_check"]
        L += ["", f"Live decode with the head vs replay ({lc['queries']} queries, lambda {lc['cost_of_time']}): "
              f"same exit step {lc['same_exit_step']}/{lc['queries']}, same correctness {lc['same_correctness']}/{lc['queries']}."]
    L.append(f"Natural answer vs answer forced at the model's own end agree on {r['natural_vs_forced_final_agree']:.3f} of queries.")
    return "\n".join(L) + "\n"


def plot(r: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG written (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7, 5))
    def series(pts, style, label):
        pts = sorted(pts, key=lambda p: p["tokens"])
        ax.plot([p["tokens"] for p in pts], [p["accuracy"] for p in pts], style, label=label, alpha=0.8)
    series(r["b"], "s-", "(b) fixed budget")
    series(r["c"], "^", "(c) confidence (DEER-style), incl. probes")
    series(r["d"], "v", "(d) consistency (Dynasor-style), incl. probes")
    for p_, style in zip(PATIENCES, ("o-", "o--", "o:")):
        series([p for p in r["e"] if p["patience"] == p_], style, f"(e) value head, patience {p_}")
    ax.plot([r["a"]["tokens"]], [r["a"]["accuracy"]], "k*", ms=14, label="(a) no exit")
    ax.plot([r["o"]["tokens"]], [r["o"]["accuracy"]], "r*", ms=14, label="(o) oracle")
    ax.set_xlabel("mean tokens per query (think + probes)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Exit frontier, toy model, {r['queries']} held-out chain sums")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
