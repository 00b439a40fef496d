"""``haltkit eval-exits``: accuracy against think tokens for a model, its value head and a task.

Points: no exit; the head across prices (multiples of its calibrated price, at its calibrated
patience); fixed thinking budgets (the exit text forced at the budget: truncation); the oracle
(the earliest think length from which every forced answer scores what the last one does). All
come exactly, for greedy decoding, from one set of rollouts with a probe after every think token
(see :func:`eval_exits`); the head's default point is cross-checked with a real
:func:`haltkit.generate` run. Each head point is compared with truncation at the same mean think
tokens (interpolated between the budgets). With levels in the task, every figure is also given
per level.
"""

from __future__ import annotations

import json
import os

import torch

__all__ = ["eval_exits", "run_points", "frontier_markdown"]


def run_points(model, tokenizer, head, conv, task, problems: list, prompt_ids: list[list[int]],
               settings: list[dict], batch_size: int = 64, progress: bool = True) -> list[dict]:
    """One :func:`haltkit.generate` run per setting; per-problem think tokens and scores.

    Args:
        settings: each ``{"kind", "label", "policy": ExitPolicy kwargs overrides}``.
    Returns:
        The settings with "think" [N] and "correct" [N] lists added.
    """
    from ..engine import generate
    from .pipeline import answer_of

    out = []
    it = settings
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(settings, desc="eval-exits", unit="run")
    for s in it:
        think, correct = [], []
        for i in range(0, len(problems), batch_size):
            res = generate(model, input_ids=prompt_ids[i : i + batch_size], value_head=head,
                           exit=head.exit_policy(**s["policy"]))
            for p, toks in zip(problems[i : i + batch_size], res.tokens):
                T, answer = answer_of(tokenizer, conv, toks, int(head.meta.get("max_answer_tokens", 16)))
                think.append(T)
                correct.append(task.verify(p, answer))
        out.append({**s, "think": think, "correct": correct})
    return out


def _summary(points: list[dict], idx: list[int]) -> list[dict]:
    rows = []
    for p in points:
        th = [p["think"][i] for i in idx]
        ok = [p["correct"][i] for i in idx]
        rows.append({"kind": p["kind"], "label": p["label"], "accuracy": sum(ok) / len(ok),
                     "think_tokens": sum(th) / len(th)})
    # Truncation at the same mean think tokens, interpolated between the measured budgets.
    trunc = sorted(((r["think_tokens"], r["accuracy"]) for r in rows if r["kind"] == "budget"))
    if trunc:
        xs, ys = torch.tensor([t for t, _ in trunc]), torch.tensor([a for _, a in trunc])
        for r in rows:
            if r["kind"] == "head":
                x = r["think_tokens"]
                if x <= xs[0]:
                    r["truncation_at_same_tokens"] = float(ys[0]) if x == xs[0] else None
                elif x >= xs[-1]:
                    r["truncation_at_same_tokens"] = float(ys[-1])
                else:
                    j = int(torch.searchsorted(xs, torch.tensor(x)))
                    w = (x - xs[j - 1]) / (xs[j] - xs[j - 1])
                    r["truncation_at_same_tokens"] = float(ys[j - 1] + w * (ys[j] - ys[j - 1]))
    return rows


def frontier_markdown(rows: list[dict], title: str) -> str:
    """A markdown table of one frontier (rows from the summary)."""
    ref = next(r for r in rows if r["kind"] == "no_exit")
    lines = [f"### {title}", "", "| setting | accuracy | think tokens | saved vs no exit | truncation at the same "
             "tokens |", "|---|---|---|---|---|"]
    for r in rows:
        saved = 1 - r["think_tokens"] / ref["think_tokens"] if ref["think_tokens"] else 0.0
        tr = r.get("truncation_at_same_tokens")
        lines.append(f"| {r['label']} | {r['accuracy']:.3f} | {r['think_tokens']:.1f} | {saved:+.1%} | "
                     f"{'' if tr is None else f'{tr:.3f}'} |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, style in (("head", "o-"), ("budget", "s--")):
        pts = sorted((r["think_tokens"], r["accuracy"]) for r in rows if r["kind"] == kind)
        if pts:
            ax.plot(*zip(*pts), style, label={"head": "value head (lambda sweep)", "budget": "fixed budget"}[kind])
    for kind, marker in (("no_exit", "k*"), ("oracle", "r^")):
        for r in rows:
            if r["kind"] == kind:
                ax.plot(r["think_tokens"], r["accuracy"], marker, markersize=10, label=r["label"])
    ax.set_xlabel("think tokens per query")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def eval_exits(model_dir: str, head_path: str, task, problems: list, out_dir: str, gguf_file: str | None = None,
               batch_size: int = 64, lambda_factors=(0.125, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 8.0),
               budget_fractions=(0.25, 0.5, 0.75, 1.0, 1.5), check_generate: bool = True, progress: bool = True,
               model_and_tokenizer=None, allow_unfit: bool = False) -> dict:
    """The frontier of a head on a task: JSON, markdown table and PNG under ``out_dir``.

    Greedy rollouts of every problem with a forced-answer probe after every think token give
    every point exactly for greedy decoding: a value exit after n think tokens forces the exit
    text there, which is the probe at n; a budget b is the probe at min(T, b); no exit is the
    rollout itself. The head is replayed on the rollouts' hidden states with the kernel's rule
    (:func:`haltkit.train.head.simulate_exits`) across prices, at its calibrated patience. With
    ``check_generate`` the head's default operating point is also run through
    :func:`haltkit.generate` and compared with its replay, problem by problem.

    Args:
        model_dir: the model the head was trained for; head_path: a ``train-head`` head file.
        task, problems: the evaluation problems (held out from training).
        lambda_factors: multiples of the default operating point's price.
        budget_fractions: fixed budgets as multiples of the mean no-exit think length.
        allow_unfit: evaluate a head that train-head's quality gate marked unfit (the report says so).
    Returns:
        {"rows": overall summary, "per_level": {group: rows}, "markdown", "files"}.
    Raises:
        ValueError: a head without train-head metadata, or one of another model / tokenizer.
    """
    from ..params import DEFAULT_PATIENCE
    from ..value_head import load_value_head
    from .conventions import Conventions
    from .head import _reward_at, head_values, load_model, simulate_exits
    from .pipeline import RolloutConfig, rollout_batch

    model, tok = model_and_tokenizer or load_model(model_dir, gguf_file)
    head = load_value_head(head_path, model, tok, allow_unfit=allow_unfit)
    if head.meta is None or "conventions" not in head.meta:
        raise ValueError(f"{head_path}: a head without train-head metadata (no exit tokens or operating point)")
    conv = Conventions.from_dict(head.meta["conventions"])
    prompt_ids = conv.render_all(tok, problems)
    B = int(head.meta["thinking_budget"])
    default = head.exit_defaults()
    patience = default.get("patience", DEFAULT_PATIENCE)
    rc = RolloutConfig(every=1, max_think=B, max_answer=int(head.meta.get("max_answer_tokens", 16)),
                       batch_size=batch_size)
    rollouts = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(problems), desc="eval-exits rollouts", unit="prompt")
    for i in range(0, len(problems), batch_size):
        rollouts += rollout_batch(model, tok, conv, task, problems[i : i + batch_size], prompt_ids[i : i + batch_size],
                                  rc, i)
        if bar is not None:
            bar.update(len(problems[i : i + batch_size]))
    if bar is not None:
        bar.close()
    values = head_values(head, rollouts, B)
    lam0 = default.get("cost_of_time")
    lams = sorted({round(lam0 * f, 10) for f in lambda_factors} if lam0 is not None else set())
    for op in (head.meta.get("operating_points") or {}).values():
        lams = sorted(set(lams) | {round(op["cost_of_time"], 10)})
    T_all = torch.tensor([len(r.think_ids) for r in rollouts], dtype=torch.float32)
    budgets = sorted({max(1, min(B, round(float(T_all.mean()) * f))) for f in budget_fractions})
    # Per problem: think tokens and score of every setting.
    points = [{"kind": "no_exit", "label": "no exit", "think": T_all.tolist(),
               "correct": [float(r.reward[-1]) for r in rollouts]}]
    for lam in lams:
        th, ok = [], []
        for r, v in zip(rollouts, values):
            acc, think = simulate_exits([r], [v], torch.tensor([lam]), patience)
            th.append(float(think[0]))
            ok.append(float(acc[0]))
        points.append({"kind": "head", "label": f"head, lambda {lam:.4g}, patience {patience}", "cost_of_time": lam,
                       "think": th, "correct": ok})
    for b in budgets:
        th = [float(min(len(r.think_ids), b)) for r in rollouts]
        ok = [float(_reward_at(r, torch.tensor([min(len(r.think_ids), b)]))[0]) for r in rollouts]
        points.append({"kind": "budget", "label": f"budget {b}", "think": th, "correct": ok})
    orc_t, orc_ok = [], []
    for r in rollouts:
        same = (r.reward == r.reward[-1]).flip(0).long().cumprod(0).flip(0)
        orc_t.append(float(r.checkpoints[int(same.argmax())]))
        orc_ok.append(float(r.reward[-1]))
    points.append({"kind": "oracle", "label": "oracle", "think": orc_t, "correct": orc_ok})
    check = None
    if check_generate and lam0 is not None:
        gen = run_points(model, tok, head, conv, task, problems, prompt_ids,
                         [{"kind": "generate", "label": f"head via haltkit.generate, lambda {lam0:.4g}", "policy": {}}],
                         batch_size, progress=False)[0]
        replay = next(p for p in points if p.get("cost_of_time") == round(lam0, 10))
        same = sum(int(a == b) for a, b in zip(gen["think"], replay["think"]))
        check = {"generate": {"accuracy": sum(gen["correct"]) / len(problems),
                              "think_tokens": sum(gen["think"]) / len(problems)},
                 "replay": {"accuracy": sum(replay["correct"]) / len(problems),
                            "think_tokens": sum(replay["think"]) / len(problems)},
                 "same_think_length": same / len(problems),
                 "same_score": sum(int(a == b) for a, b in zip(gen["correct"], replay["correct"])) / len(problems)}
    levels = sorted({p.difficulty for p in problems})
    groups = {"all": list(range(len(problems)))}
    if len(levels) > 1:
        groups.update({f"level {lv}": [i for i, p in enumerate(problems) if p.difficulty == lv] for lv in levels})
    result = {"model": os.path.abspath(model_dir), "head": os.path.abspath(head_path), "problems": len(problems),
              "distinct_questions": len({p.question for p in problems}), "patience": patience,
              "thinking_budget": B, "generate_check": check, "fit": head.meta.get("fit"), "per_group": {}}
    md = [f"# eval-exits: {os.path.basename(os.path.abspath(model_dir))}, {len(problems)} problems "
          f"({result['distinct_questions']} distinct questions)", "",
          f"Greedy decoding, thinking budget {B}, head patience {patience} ("
          f"{'from the head file' if 'patience' in default else 'haltkit.DEFAULT_PATIENCE: the head names none'}). "
          "Every point is "
          "exact for greedy decoding: a forced-answer probe after every think token, the head replayed with the "
          "kernel's exit rule. 'truncation at the same tokens' interpolates the fixed budgets at the head point's "
          "mean think tokens.", ""]
    if not (head.meta.get("fit") or {}).get("ok", True):
        md += ["**This head was marked UNFIT by train-head's quality gate: "
               + "; ".join(head.meta["fit"].get("reasons", [])) + ".**", ""]
    if check is not None:
        md += [f"Check against `haltkit.generate` at the default operating point: accuracy "
               f"{check['generate']['accuracy']:.3f} vs replay {check['replay']['accuracy']:.3f}, think tokens "
               f"{check['generate']['think_tokens']:.1f} vs {check['replay']['think_tokens']:.1f}; the same think "
               f"length for {check['same_think_length']:.1%} of problems, the same score for "
               f"{check['same_score']:.1%}.", ""]
    os.makedirs(out_dir, exist_ok=True)
    for name, idx in groups.items():
        rows = _summary(points, idx)
        result["per_group"][name] = rows
        md.append(frontier_markdown(rows, f"{name} ({len(idx)} problems)"))
    result["points"] = points
    files = {"json": os.path.join(out_dir, "eval_exits.json"), "md": os.path.join(out_dir, "eval_exits.md"),
             "png": os.path.join(out_dir, "eval_exits.png")}
    with open(files["json"], "w") as f:
        json.dump(result, f, indent=1)
    text = "\n".join(md)
    with open(files["md"], "w") as f:
        f.write(text)
    _plot(result["per_group"]["all"], files["png"], f"{os.path.basename(os.path.abspath(model_dir))}: accuracy vs "
          "think tokens")
    return {"rows": result["per_group"]["all"], "per_level": result["per_group"], "markdown": text, "files": files,
            "generate_check": check}
