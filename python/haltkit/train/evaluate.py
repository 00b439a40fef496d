"""``haltkit eval-exits``: accuracy against think tokens for a model, its value head and a task.

Every point but the oracle is a real :func:`haltkit.generate` run (greedy, the head's exit
tokens and EOS ids, its thinking budget): no exit; the head across prices (its calibrated
operating points and multiples of them, at its calibrated patience); fixed thinking budgets
(the exit text forced at the budget: truncation). The oracle comes from forced-answer rollouts
of the same problems: the earliest probe from which every forced answer scores what the last
one does. Each head point is compared with truncation at the same mean think tokens
(interpolated between the measured budgets). With levels in the task, every figure is also
given per level.
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
                T, answer = answer_of(tokenizer, conv, toks)
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
               every: int = 2, batch_size: int = 64, lambda_factors=(0.25, 0.5, 1.0, 2.0, 4.0),
               budget_fractions=(0.1, 0.25, 0.5, 0.75), progress: bool = True, model_and_tokenizer=None) -> dict:
    """The frontier of a head on a task: JSON, markdown table and PNG under ``out_dir``.

    Args:
        model_dir: the model the head was trained for; head_path: a ``train-head`` head file.
        task, problems: the evaluation problems (held out from training).
        every: probe spacing of the oracle's rollouts.
        lambda_factors: multiples of the default operating point's price to run.
        budget_fractions: fixed budgets as fractions of the head's thinking budget.
    Returns:
        {"rows": overall summary, "per_level": {level: rows}, "markdown", "files"}.
    Raises:
        ValueError: a head without train-head metadata, or one of another model / tokenizer.
    """
    from ..value_head import load_value_head
    from .conventions import Conventions
    from .head import baselines, load_model
    from .pipeline import RolloutConfig, rollout_batch

    model, tok = model_and_tokenizer or load_model(model_dir, gguf_file)
    head = load_value_head(head_path, model, tok)
    if head.meta is None or "conventions" not in head.meta:
        raise ValueError(f"{head_path}: a head without train-head metadata (no exit tokens or operating point)")
    conv = Conventions.from_dict(head.meta["conventions"])
    prompt_ids = conv.render_all(tok, problems)
    B = int(head.meta["thinking_budget"])
    ops = head.meta.get("operating_points") or {}
    default = head.exit_defaults()
    settings = [{"kind": "no_exit", "label": "no exit", "policy": {"cost_of_time": None}}]
    lams = {}
    if "cost_of_time" in default:
        for f in lambda_factors:
            lams[round(default["cost_of_time"] * f, 8)] = f"head, lambda {default['cost_of_time'] * f:.4g}"
    for name, op in ops.items():
        lams[round(op["cost_of_time"], 8)] = f"head, lambda {op['cost_of_time']:.4g} ({name})"
    patience = default.get("patience", 1)
    for lam, label in sorted(lams.items()):
        settings.append({"kind": "head", "label": f"{label}, patience {patience}",
                         "policy": {"cost_of_time": lam, "patience": patience}})
    for f in budget_fractions:
        b = max(1, round(B * f))
        settings.append({"kind": "budget", "label": f"budget {b}", "policy": {"cost_of_time": None,
                                                                             "thinking_budget": b}})
    points = run_points(model, tok, head, conv, task, problems, prompt_ids, settings, batch_size, progress)
    # The oracle: greedy rollouts with probes on the same problems.
    rc = RolloutConfig(every=every, max_think=B, max_answer=int(head.meta.get("max_answer_tokens", 16)),
                       batch_size=batch_size)
    rollouts = []
    for i in range(0, len(problems), batch_size):
        rollouts += rollout_batch(model, tok, conv, task, problems[i : i + batch_size], prompt_ids[i : i + batch_size],
                                  rc, i)
    levels = sorted({p.difficulty for p in problems})
    groups = {"all": list(range(len(problems)))}
    if len(levels) > 1:
        groups.update({f"level {lv}": [i for i, p in enumerate(problems) if p.difficulty == lv] for lv in levels})
    result = {"model": os.path.abspath(model_dir), "head": os.path.abspath(head_path), "problems": len(problems),
              "distinct_questions": len({p.question for p in problems}), "per_group": {}}
    md = [f"# eval-exits: {os.path.basename(os.path.abspath(model_dir))}, {len(problems)} problems "
          f"({result['distinct_questions']} distinct questions)", "",
          f"Greedy `haltkit.generate` runs; thinking budget {B}; head patience {patience}; oracle from forced-answer "
          f"probes every {every} think tokens. 'truncation at the same tokens' interpolates the fixed-budget runs "
          "at the head point's mean think tokens.", ""]
    os.makedirs(out_dir, exist_ok=True)
    for name, idx in groups.items():
        rows = _summary(points, idx)
        orc = baselines([rollouts[i] for i in idx], [])["oracle"]
        rows.append({"kind": "oracle", "label": "oracle", **orc})
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
    return {"rows": result["per_group"]["all"], "per_level": result["per_group"], "markdown": text, "files": files}
