"""Train the marginal-value head from rollouts (``haltkit train-head``).

Targets. A rollout gives R(t), the verifier's score of the answer forced after t think tokens,
at checkpoints t_0 = 0 < t_1 < ... < t_C = T. Each R(t) is one greedy answer, so a single
checkpoint can flicker; R is first smoothed by a running median over three neighbouring
checkpoints (edges repeated), which removes isolated blips and keeps real steps where they are.
With a thinking budget B the reachable future is the checkpoints t' <= min(B, T). The target at
checkpoint t is then

    v_B(t) = max over reachable t' > t of (R~(t') - R~(t)) / (t' - t),

the best average gain per token that thinking on can still buy. It is the quantity the kernel's
rule compares with the price of time: with R known, "continue while v_B(t) > lambda" is exactly
the optimal stopping rule for a price lambda per token (continue iff some reachable future pays
more than lambda per token spent). The head regresses it (mean squared error), so it predicts its
expectation given the hidden state and the two step features; checkpoints with no reachable
future are not targets (the budget or the model ends thinking there anyway). Targets are clipped
to [-clip, clip] (default 0.1 return per token): a price above that ends every think phase at
once, so the exact size of larger values never changes a decision, while fitting the large
values just before an answer appears would cost accuracy where decisions are made, near 0.
Each rollout gives
examples under the default budget and under ``extra_budgets`` budgets drawn below its length,
so the head learns what a tighter budget does to the value of thinking on.

Metrics (on a held-out split of the rollouts): MSE; reliability (mean predicted vs mean target
value in deciles of the prediction, and its weighted mean gap); AUROC of "stopping now loses
nothing" (target <= 0) scored by the negated prediction.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass

import torch

from ..value_head import MarginalValueHead
from .rollouts import Rollout

__all__ = [
    "HeadTrainConfig", "smooth_returns", "marginal_values", "build_examples", "train_head", "auroc", "reliability",
    "sample_problems", "run_train_head",
]


@dataclass(frozen=True)
class HeadTrainConfig:
    """Settings of one head fit (defaults are the shipped head's)."""

    hidden: int = 32
    budget: int = 320
    extra_budgets: int = 2
    clip: float = 0.1
    val_frac: float = 0.15
    epochs: int = 80
    patience: int = 8
    batch_size: int = 512
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0


def smooth_returns(reward: torch.Tensor) -> torch.Tensor:
    """Running median of R over three neighbouring checkpoints, edges repeated: [C] -> [C]."""
    if reward.numel() < 3:
        return reward.clone()
    padded = torch.cat([reward[:1], reward, reward[-1:]])
    return padded.unfold(0, 3, 1).median(dim=1).values


def marginal_values(checkpoints: torch.Tensor, reward: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets v_B(t) at every checkpoint that has a reachable future (see the module docstring).

    Args:
        checkpoints: [C] int64, increasing think lengths.
        reward: [C] float32, R at those lengths (already smoothed if wanted).
        budget: B >= 1; checkpoints beyond it are unreachable.
    Returns:
        (indices [K] int64 of the checkpoints that get a target, targets [K] float32).

    Example:
        >>> marginal_values(torch.tensor([0, 2, 4, 6]), torch.tensor([0., 0., 1., 1.]), 100)
        (tensor([0, 1, 2]), tensor([0.2500, 0.5000, 0.0000]))
    """
    reach = checkpoints <= budget
    t, r = checkpoints[reach].float(), reward[reach].float()
    K = t.numel() - 1
    if K <= 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    gain = (r[None, :] - r[:, None]) / (t[None, :] - t[:, None])  # [K+1, K+1], valid where t' > t
    future = torch.triu(torch.ones(K + 1, K + 1, dtype=torch.bool), diagonal=1)
    v = torch.where(future, gain, torch.full_like(gain, -math.inf)).max(1).values[:K]
    return torch.arange(K), v


def build_examples(rollouts: list[Rollout], cfg: HeadTrainConfig, rng: random.Random):
    """Head inputs and targets from rollouts.

    Returns:
        (hidden [N, d] float32, n [N] int64, budget [N] int64, target [N] float32, rollout index [N]).
    """
    hs, ns, bs, vs, owner = [], [], [], [], []
    for i, r in enumerate(rollouts):
        smooth = smooth_returns(r.reward)
        T = int(r.checkpoints[-1])
        inner = [int(t) for t in r.checkpoints[1:-1]]
        budgets = [cfg.budget] + ([rng.choice(inner) for _ in range(cfg.extra_budgets)] if inner else [])
        for B in budgets:
            idx, v = marginal_values(r.checkpoints, smooth, B)
            if B < T and B not in r.checkpoints.tolist():
                continue  # the budget's cut has no measured return
            n = r.checkpoints[idx]
            hs.append(r.hidden[n])
            ns.append(n)
            bs.append(torch.full_like(n, B))
            vs.append(v.clamp(-cfg.clip, cfg.clip))
            owner.append(torch.full_like(n, i))
    return torch.cat(hs).float(), torch.cat(ns), torch.cat(bs), torch.cat(vs), torch.cat(owner)


def auroc(score: torch.Tensor, label: torch.Tensor) -> float:
    """Area under the ROC curve of ``score`` for boolean ``label`` (ties count one half); NaN if one class."""
    pos, neg = int(label.sum()), int((~label).sum())
    if pos == 0 or neg == 0:
        return math.nan
    order = torch.argsort(score)
    ranks = torch.empty_like(score, dtype=torch.float64)
    s = score[order]
    r = torch.arange(1, len(s) + 1, dtype=torch.float64)
    # average ranks over ties
    uniq, inv, counts = torch.unique(s, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, r)
    ranks[order] = (sums / counts)[inv]
    return float((ranks[label].sum() - pos * (pos + 1) / 2) / (pos * neg))


def reliability(pred: torch.Tensor, target: torch.Tensor, bins: int = 10) -> dict:
    """Mean prediction vs mean target in quantile bins of the prediction, and the weighted gap."""
    order = torch.argsort(pred)
    rows, gap = [], 0.0
    for chunk in torch.tensor_split(order, bins):
        if chunk.numel() == 0:
            continue
        p, t = float(pred[chunk].mean()), float(target[chunk].mean())
        rows.append({"n": int(chunk.numel()), "mean_pred": p, "mean_target": t})
        gap += chunk.numel() * abs(p - t)
    return {"bins": rows, "weighted_gap": gap / max(1, pred.numel())}


def _metrics(head: MarginalValueHead, h, n, b, v) -> dict:
    with torch.no_grad():
        pred = head(h, n, b)
    return {
        "mse": float(((pred - v) ** 2).mean()),
        "target_var": float(v.var()),
        "auroc_stop_loses_nothing": auroc(-pred, v <= 0),
        "reliability": reliability(pred, v),
        "examples": int(v.numel()),
    }


def train_head(rollouts: list[Rollout], cfg: HeadTrainConfig = HeadTrainConfig(), log=None) -> tuple[MarginalValueHead, dict]:
    """Fit a :class:`MarginalValueHead` to the marginal-value targets of ``rollouts``.

    Rollouts are split into train / validation by prompt; training stops when the validation
    MSE has not improved for ``cfg.patience`` epochs and the best epoch's weights are kept.

    Args:
        rollouts: from :func:`haltkit.train.rollouts.collect_rollouts` (or built by hand).
        cfg: the fit's settings.
        log: a text stream for one JSON line per epoch, or None.
    Returns:
        (the head in eval mode, metrics: config, best epoch, train and validation metrics).
    Raises:
        ValueError: with fewer than two rollouts (no validation split).
    """
    if len(rollouts) < 2:
        raise ValueError(f"need at least 2 rollouts for a train / validation split, got {len(rollouts)}")
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    h, n, b, v, owner = build_examples(rollouts, cfg, rng)
    perm = list(range(len(rollouts)))
    rng.shuffle(perm)
    n_val = max(1, round(cfg.val_frac * len(rollouts)))
    is_val = torch.zeros(len(rollouts), dtype=torch.bool)
    is_val[perm[:n_val]] = True
    val = is_val[owner]
    tr = ~val
    head = MarginalValueHead(h.shape[1], hidden=cfg.hidden)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    idx_tr = tr.nonzero()[:, 0]
    best, best_state, best_epoch, stale = math.inf, None, -1, 0
    for epoch in range(cfg.epochs):
        head.train()
        for chunk in idx_tr[torch.randperm(len(idx_tr))].split(cfg.batch_size):
            loss = ((head(h[chunk], n[chunk], b[chunk]) - v[chunk]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            val_mse = float(((head(h[val], n[val], b[val]) - v[val]) ** 2).mean())
        if log is not None:
            log.write(json.dumps({"epoch": epoch, "val_mse": val_mse}) + "\n")
        if val_mse < best - 1e-9:
            best, best_epoch, stale = val_mse, epoch, 0
            best_state = {k: t.clone() for k, t in head.state_dict().items()}
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    head.load_state_dict(best_state)
    head.eval()
    metrics = {
        "config": asdict(cfg),
        "best_epoch": best_epoch,
        "rollouts": {"train": len(rollouts) - n_val, "val": n_val},
        "train": _metrics(head, h[tr], n[tr], b[tr], v[tr]),
        "val": _metrics(head, h[val], n[val], b[val], v[val]),
    }
    return head, metrics


def sample_problems(task, count: int, seed: int, held_out: bool = False) -> list:
    """``count`` problems of a task, difficulties cycling 1..5 for the built-in chain sums.

    JSONL tasks return their first ``count`` problems (all of them when ``count`` is larger).
    """
    if hasattr(task, "problems"):
        return task.problems[:count]
    from ..tasks import DIFFICULTIES

    rng = random.Random(seed)
    levels = sorted(DIFFICULTIES)
    return [task.sample(rng, levels[i % len(levels)], held_out=held_out) for i in range(count)]


def run_train_head(
    model_dir: str, out_dir: str, task, prompts: int = 1000, every: int = 2, max_think: int = 320,
    cfg: HeadTrainConfig = HeadTrainConfig(), log=None, worker: int = 0, workers: int = 1,
) -> dict | None:
    """Roll out a model on a task, fit the head and write ``out_dir/head.safetensors``.

    Rollouts go to ``out_dir/rollouts/`` (a rerun resumes them); metrics to
    ``out_dir/head_metrics.json``. With ``workers > 1`` this process only collects its share of
    the rollout shards and returns None; a final run with ``workers == 1`` fits the head.
    Returns the metrics.
    """
    import os

    from transformers import AutoModelForCausalLM

    from ..tokenizer import CharTokenizer
    from .rollouts import collect_rollouts, load_rollouts

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = CharTokenizer()
    problems = sample_problems(task, prompts, cfg.seed)
    paths = collect_rollouts(model, tok, task, problems, os.path.join(out_dir, "rollouts"), every, max_think,
                             log=log, worker=worker, workers=workers)
    if workers > 1:
        return None
    rollouts = load_rollouts(paths)
    head, metrics = train_head(rollouts, HeadTrainConfig(**{**asdict(cfg), "budget": max_think}), log)
    head.save(os.path.join(out_dir, "head.safetensors"))
    metrics["rollout_accuracy"] = float(torch.tensor([float(r.reward[-1]) for r in rollouts]).mean())
    metrics["every"], metrics["max_think"], metrics["model"] = every, max_think, os.path.abspath(model_dir)
    with open(os.path.join(out_dir, "head_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    return metrics
