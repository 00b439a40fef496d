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

import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass

import torch

from ..value_head import MarginalValueHead
from .rollouts import Rollout

__all__ = [
    "HeadTrainConfig", "smooth_returns", "marginal_values", "build_examples", "train_head", "auroc", "reliability",
    "sample_problems", "run_train_head", "split_of", "head_values", "exit_steps", "simulate_exits", "baselines",
    "calibrate", "quality_gate", "PATIENCES", "PRICE_MARGIN", "CONFIDENCE_Z", "set_operating_points", "load_model",
    "head_meta", "calibrate_head_file",
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


def train_head(rollouts: list[Rollout], cfg: HeadTrainConfig = HeadTrainConfig(), log=None,
               is_val: torch.Tensor | None = None) -> tuple[MarginalValueHead, dict]:
    """Fit a :class:`MarginalValueHead` to the marginal-value targets of ``rollouts``.

    Training stops when the validation MSE has not improved for ``cfg.patience`` epochs and the
    best epoch's weights are kept.

    Args:
        rollouts: from :func:`haltkit.train.pipeline.collect` (or built by hand).
        cfg: the fit's settings.
        log: a text stream for one JSON line per epoch, or None.
        is_val: [len(rollouts)] bool, the validation rollouts; default a random ``cfg.val_frac``.
    Returns:
        (the head in eval mode, metrics: config, best epoch, train and validation metrics, and
        ``val.mse_constant``: the validation MSE of the best constant, the train targets' mean).
    Raises:
        ValueError: with fewer than two rollouts, or an empty train or validation split.
    """
    if len(rollouts) < 2:
        raise ValueError(f"need at least 2 rollouts for a train / validation split, got {len(rollouts)}")
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    h, n, b, v, owner = build_examples(rollouts, cfg, rng)
    if is_val is None:
        perm = list(range(len(rollouts)))
        rng.shuffle(perm)
        is_val = torch.zeros(len(rollouts), dtype=torch.bool)
        is_val[perm[: max(1, round(cfg.val_frac * len(rollouts)))]] = True
    n_val = int(is_val.sum())
    if n_val == 0 or n_val == len(rollouts):
        raise ValueError(f"is_val: the split must leave both train and validation rollouts, got {n_val} of "
                         f"{len(rollouts)} in validation")
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
    const = float(v[tr].mean())
    metrics["val"]["mse_constant"] = float(((v[val] - const) ** 2).mean())
    return head, metrics


def split_of(question: str, val_frac: float, test_frac: float) -> str:
    """"train", "val" or "test" by a hash of the question: repeats of a question share a split."""
    u = int.from_bytes(hashlib.blake2b(question.encode(), digest_size=4, person=b"haltkit-split").digest(), "big")
    x = u / 2**32
    return "test" if x < test_frac else "val" if x < test_frac + val_frac else "train"


@torch.no_grad()
def head_values(head: MarginalValueHead, rollouts: list[Rollout], budget: int) -> list[torch.Tensor]:
    """The head's value at every think step n = 0..T of each rollout ([T + 1] float32 each)."""
    out = []
    for r in rollouts:
        n = torch.arange(r.hidden.shape[0])
        out.append(head(r.hidden.float(), n, torch.full_like(n, budget)))
    return out


def _reward_at(r: Rollout, t: torch.Tensor) -> torch.Tensor:
    """R at the last checkpoint <= t (the forced answer the nearest probe measured), [K] float32."""
    i = torch.searchsorted(r.checkpoints, t, right=True) - 1
    return r.reward[i.clamp(min=0)]


def exit_steps(rollouts: list[Rollout], values: list[torch.Tensor], lambdas: torch.Tensor,
               patience: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Replay the kernel's value-exit rule on stored rollouts, for every price at once, per rollout.

    The rule of ``decode_step`` (min_new_tokens 0): at step n the head's value counts when below
    lambda; the think phase ends at the first n where ``patience`` consecutive steps counted, with
    n think tokens, and the forced answer there scores R(n) (the last probe at or before n). No
    exit before the rollout's end leaves its own length and answer.

    Args:
        values: from :func:`head_values`; lambdas: [L] float32; patience: >= 1.
    Returns:
        (think tokens at the exit [Q, L] int64, score of the answer there [Q, L] float32).
    """
    firsts, scores = [], []
    for r, v in zip(rollouts, values):
        T = v.shape[0] - 1
        if v.shape[0] >= patience:
            worst = v.unfold(0, patience, 1).max(1).values  # step n = i + patience - 1 exits iff worst[i] < lambda
            best_so_far = torch.cummin(worst, 0).values
            fires = best_so_far[None, :] < lambdas[:, None]  # [L, T + 2 - patience]
            first = torch.where(fires.any(1), fires.float().argmax(1) + patience - 1, T)
        else:
            first = torch.full((len(lambdas),), T)
        first = first.clamp(max=T)
        firsts.append(first)
        scores.append(_reward_at(r, first))
    return torch.stack(firsts), torch.stack(scores)


def simulate_exits(rollouts: list[Rollout], values: list[torch.Tensor], lambdas: torch.Tensor,
                   patience: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`exit_steps` averaged over the rollouts.

    Returns:
        (accuracy [L] float32, mean think tokens [L] float32).
    """
    first, score = exit_steps(rollouts, values, lambdas, patience)
    return score.mean(0), first.float().mean(0)


def baselines(rollouts: list[Rollout], budgets: list[int]) -> dict:
    """No exit, fixed thinking budgets (forced answer at min(T, b)) and the oracle (the earliest
    checkpoint from which every forced answer scores what the last one does), on rollouts."""
    T = torch.tensor([len(r.think_ids) for r in rollouts], dtype=torch.float32)
    final = torch.tensor([float(r.reward[-1]) for r in rollouts])
    out = {"no_exit": {"accuracy": float(final.mean()), "think_tokens": float(T.mean())}, "budgets": []}
    for b in budgets:
        acc = torch.stack([_reward_at(r, torch.tensor([min(len(r.think_ids), b)]))[0] for r in rollouts])
        out["budgets"].append({"budget": b, "accuracy": float(acc.mean()),
                               "think_tokens": float(T.clamp(max=b).mean())})
    oracle = []
    for r in rollouts:
        same = (r.reward == r.reward[-1]).flip(0).long().cumprod(0).flip(0)  # 1 where all later agree
        oracle.append(float(r.checkpoints[int(same.argmax())]))
    out["oracle"] = {"accuracy": float(final.mean()), "think_tokens": sum(oracle) / len(oracle)}
    return out


PATIENCES = (1, 2, 3, 4, 6, 8)
#: A calibrated point must also hold at a price this many times higher: the frontier falls off a
#: cliff as the price rises, and a point picked at the edge of the cliff on one split of the
#: questions falls off it on another (on the shipped toy head, 1.5 kept a point 3 points above no
#: exit on the test split, 2 kept one 8 points above, at 68% and 64% fewer think tokens).
PRICE_MARGIN = 2.0
#: ... and its accuracy must clear the floor by this many standard errors of its paired
#: difference with no exit (one-sided 95%), so that a point that holds on validation by luck is
#: not taken.
CONFIDENCE_Z = 1.645


def _higher_price(lambdas: torch.Tensor, margin: float) -> torch.Tensor:
    """Each price moved up by ``margin`` times its size (at least 1e-4: a price of 0 moves too)."""
    return lambdas + ((margin - 1.0) * lambdas.abs()).clamp(min=1e-4)


def calibrate(head: MarginalValueHead, val: list[Rollout], budget: int, tolerance: float = 0.01,
              price_margin: float = PRICE_MARGIN, z: float = CONFIDENCE_Z) -> dict:
    """Operating points (lambda, patience) chosen on validation rollouts, with margins.

    ``no_loss``: the fewest think tokens at accuracy >= no exit's; ``within_1pt``: the fewest at
    accuracy >= no exit's minus ``tolerance``. A setting counts as reaching a floor only when (1)
    its accuracy's lower confidence bound (mean paired difference with no exit, less ``z`` standard
    errors) clears the floor, and (2) the same patience at the price ``price_margin`` times higher
    reaches the floor too. Prices range over the quantiles of the head's values on the validation
    steps; patience over :data:`PATIENCES`. Without these margins the rule chose points that lost
    8 to 9 points on the test split (bench/exit_frontier.py).

    Args:
        head: the fitted head; val: validation rollouts (never those a report is made on);
        budget: the thinking budget the head is told; tolerance: the "within 1 point" slack.
        price_margin: see :data:`PRICE_MARGIN` (1 turns the neighbour check off);
        z: see :data:`CONFIDENCE_Z` (0 turns the confidence check off).
    Returns:
        {name: {"cost_of_time", "patience", "accuracy", "think_tokens", "accuracy_lower_bound",
        "accuracy_at_higher_price"}} (a name is absent when no setting reaches it), "no_exit":
        validation accuracy and think tokens, and "rule": the margins used.
    """
    values = head_values(head, val, budget)
    allv = torch.cat(values)
    lambdas = torch.unique(torch.quantile(allv, torch.linspace(0.0, 1.0, 61)))
    higher = _higher_price(lambdas, price_margin)
    ref = baselines(val, [])["no_exit"]
    base = torch.tensor([float(r.reward[-1]) for r in val])  # no exit's score per rollout
    n = len(val)
    best: dict = {"no_exit": ref, "rule": {"price_margin": price_margin, "z": z, "tolerance": tolerance,
                                           "questions": len({r.problem.question for r in val})}}
    for p in PATIENCES:
        first, score = exit_steps(val, values, torch.cat([lambdas, higher]), p)
        acc, think = score.mean(0), first.float().mean(0)
        L = len(lambdas)
        diff = score[:, :L] - base[:, None]  # [Q, L] paired with no exit
        se = diff.std(0, unbiased=True) / math.sqrt(n) if n > 1 else torch.zeros(L)
        lower = acc[:L] - z * se
        for name, floor in (("no_loss", ref["accuracy"] - 1e-9), ("within_1pt", ref["accuracy"] - tolerance)):
            ok = (lower >= floor) & (acc[L:] >= floor)
            if not ok.any():
                continue
            i = int(torch.where(ok, think[:L], math.inf).argmin())
            if name not in best or float(think[i]) < best[name]["think_tokens"]:
                best[name] = {"cost_of_time": float(lambdas[i]), "patience": p, "accuracy": float(acc[i]),
                              "think_tokens": float(think[i]), "accuracy_lower_bound": float(lower[i]),
                              "accuracy_at_higher_price": float(acc[L + i])}
    return best


def quality_gate(rollout_accuracy: float, any_right: bool, val: dict, min_auroc: float = 0.6,
                 max_mse_ratio: float = 0.98) -> dict:
    """Whether a fitted head is worth using: {"ok": bool, "reasons": [why not, ...]}.

    Unfit when no forced answer of any rollout was right (nothing to learn), or on validation
    the head's MSE is not below ``max_mse_ratio`` times the best constant's, or its AUROC of
    "stopping now loses nothing" is not above ``min_auroc`` (NaN: one class only).
    """
    reasons = []
    if not any_right:
        reasons.append(f"every forced answer of every rollout was wrong (rollout accuracy {rollout_accuracy:.3f}): "
                       "check the template, exit text and verifier")
    mse, const = val["mse"], val.get("mse_constant", math.nan)
    if not (const > 0 and mse < max_mse_ratio * const):
        reasons.append(f"validation MSE {mse:.4g} is no better than a constant predictor's {const:.4g}")
    a = val["auroc_stop_loses_nothing"]
    if not a > min_auroc:
        reasons.append(f"validation AUROC {a:.3f} is not above {min_auroc} (NaN: the targets have one class)")
    return {"ok": not reasons, "reasons": reasons}


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


def load_model(model_dir: str, gguf_file: str | None = None, dtype=None):
    """(model in eval mode, tokenizer) through ``AutoModelForCausalLM`` / ``AutoTokenizer``.

    ``gguf_file`` names a GGUF file inside ``model_dir`` (transformers dequantises it; needs the
    ``gguf`` package).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(model_dir, **kw)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kw, **({"dtype": dtype} if dtype else {}))
    return model.eval(), tok


def run_train_head(
    model_dir: str, out_dir: str, task, problems: list, task_id: dict, rollout_cfg=None,
    cfg: HeadTrainConfig = HeadTrainConfig(), conventions: dict | None = None, gguf_file: str | None = None,
    val_frac: float = 0.15, test_frac: float = 0.15, restart: bool = False, log=None, progress: bool = True,
    model_and_tokenizer=None,
) -> tuple[dict, int]:
    """Roll out a model on a task, fit the head, calibrate it and write it with its metadata.

    Steps: conventions from the tokenizer (:func:`haltkit.train.conventions.resolve_conventions`
    with ``conventions`` as overrides); rollouts into ``out_dir/rollouts/`` (resumable, keyed by a
    manifest); problems split by question into train / val / test (``val_frac``, ``test_frac``);
    the fit (early stopping on val); operating points chosen on val (:func:`calibrate`); the
    figures reported on test (:func:`simulate_exits`, :func:`baselines`); the quality gate.

    Writes ``out_dir/head.safetensors`` (or ``head.unfit.safetensors`` when the gate fails) with
    the metadata every entry point reads, and ``out_dir/head_metrics.json``.

    Args:
        model_dir: a Hugging Face model directory.
        task: has ``verify(problem, answer_text)``; problems: the prompts, in order.
        task_id: what names the task in the manifest (file hash, verifier).
        rollout_cfg: a :class:`haltkit.train.pipeline.RolloutConfig` (default settings if None).
        model_and_tokenizer: already loaded (model, tokenizer), else loaded from ``model_dir``.
    Returns:
        (metrics, exit status): 0 with a fit head, 3 when the quality gate refused it.
    Raises:
        ValueError: the tokenizer lacks the thinking tag, stored rollouts of another key, too few
            problems for three splits.
    """
    import os

    from .conventions import resolve_conventions
    from .pipeline import RolloutConfig, collect, manifest_key

    rc = rollout_cfg or RolloutConfig()
    model, tok = model_and_tokenizer or load_model(model_dir, gguf_file)
    conv = resolve_conventions(tok, model, **(conventions or {}))
    prompt_ids = conv.render_all(tok, problems)
    key = manifest_key(model, tok, conv, rc, task_id, len(problems))
    os.makedirs(out_dir, exist_ok=True)
    rollouts = collect(model, tok, conv, task, problems, prompt_ids, os.path.join(out_dir, "rollouts"), rc, key,
                       restart, progress, log)
    split = [split_of(r.problem.question, val_frac, test_frac) for r in rollouts]
    counts = {k: split.count(k) for k in ("train", "val", "test")}
    if min(counts.values()) == 0:
        raise ValueError(f"problems: the question-level split left an empty part {counts}; give more (distinct) "
                         "problems or other --val-frac / --test-frac")
    fit_set = [r for r, s in zip(rollouts, split) if s != "test"]
    is_val = torch.tensor([s == "val" for s, r in zip(split, rollouts) if s != "test"])
    head_cfg = HeadTrainConfig(**{**asdict(cfg), "budget": rc.max_think})
    head, metrics = train_head(fit_set, head_cfg, log, is_val=is_val)
    val = [r for r, s in zip(rollouts, split) if s == "val"]
    test = [r for r, s in zip(rollouts, split) if s == "test"]
    ops = calibrate(head, val, rc.max_think)
    finals = torch.tensor([float(r.reward[-1]) for r in rollouts])
    metrics["rollout_accuracy"] = float(finals.mean())
    metrics["split"] = counts
    budgets = sorted({max(1, round(rc.max_think * f)) for f in (0.1, 0.2, 0.3, 0.5, 0.75)})
    report = baselines(test, budgets)
    values = head_values(head, test, rc.max_think)
    for name in ("no_loss", "within_1pt"):
        if name in ops:
            acc, think = simulate_exits(test, values, torch.tensor([ops[name]["cost_of_time"]]), ops[name]["patience"])
            report[name] = {"accuracy": float(acc[0]), "think_tokens": float(think[0]), **{
                k: ops[name][k] for k in ("cost_of_time", "patience")}}
    metrics["test"] = report
    metrics["operating_points"] = ops
    any_right = bool(any(float(r.reward.max()) > 0 for r in rollouts))
    gate = quality_gate(metrics["rollout_accuracy"], any_right, metrics["val"])
    metrics["fit"] = gate
    head.meta = head_meta(
        model, tok, conv, rc, ops, gate,
        {"rollouts": asdict(rc), "head": asdict(head_cfg), "task": task_id, "split": counts},
        {"rollout_accuracy": metrics["rollout_accuracy"],
         "val": {k: metrics["val"][k] for k in ("mse", "mse_constant", "auroc_stop_loses_nothing")}, "test": report},
        os.path.basename(os.path.abspath(model_dir).rstrip("/")))
    name = "head.safetensors" if gate["ok"] else "head.unfit.safetensors"
    for stale in ("head.safetensors", "head.unfit.safetensors"):  # never leave a head of an earlier run
        if os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))
    head.save(os.path.join(out_dir, name))
    metrics["head_file"] = os.path.join(out_dir, name)
    metrics["model"] = os.path.abspath(model_dir)
    metrics["conventions"] = {k: v for k, v in conv.to_dict().items() if k != "chat_template"}
    with open(os.path.join(out_dir, "head_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    return metrics, 0 if gate["ok"] else 3


def _operating_points(ops: dict) -> tuple[dict, str | None]:
    """:func:`calibrate`'s result as a head stores it: (the points reached, by name; the default
    one's name: "within_1pt", else "no_loss", else None when neither was reached)."""
    points = {k: v for k, v in ops.items() if k not in ("no_exit", "rule")}
    return points, "within_1pt" if "within_1pt" in points else "no_loss" if "no_loss" in points else None


def head_meta(model, tok, conv, rc, ops: dict, fit: dict, training: dict, metrics: dict, name: str) -> dict:
    """The metadata a head file carries (see :meth:`haltkit.MarginalValueHead.exit_defaults`)."""
    from .conventions import model_identity, tokenizer_fingerprint

    points, default_op = _operating_points(ops)
    return {"model": {**model_identity(model), "tokenizer": tokenizer_fingerprint(tok), "name": name},
            "conventions": conv.to_dict(), "thinking_budget": rc.max_think, "max_answer_tokens": rc.max_answer,
            "operating_points": points,
            "default_operating_point": default_op,
            "training": {**training, **({"calibration_rule": ops["rule"]} if "rule" in ops else {})},
            "metrics": metrics, "fit": fit}


def calibrate_head_file(head_path: str, out_path: str, model, tok, conv, task, problems: list, rollout_cfg,
                        progress: bool = True) -> dict:
    """Give an existing head (weights unchanged) the metadata of :func:`run_train_head`, its
    operating points chosen on rollouts of ``problems`` (a validation set: never the set a report
    is made on). Used for the shipped toy head, trained before heads carried metadata.

    Returns:
        The metadata written to ``out_path``.
    """
    from .pipeline import rollout_batch

    head = MarginalValueHead.load(head_path)
    head.check_compatible(model, tok)
    prompt_ids = conv.render_all(tok, problems)
    rollouts = []
    bs = rollout_cfg.batch_size
    for i in range(0, len(problems), bs):
        rollouts += rollout_batch(model, tok, conv, task, problems[i : i + bs], prompt_ids[i : i + bs], rollout_cfg, i)
        if progress:
            print(f"calibration rollouts: {len(rollouts)}/{len(problems)}", flush=True)
    ops = calibrate(head, rollouts, rollout_cfg.max_think)
    fit = {"ok": True, "reasons": [], "note": "weights trained before the quality gate; operating points calibrated"}
    head.meta = head_meta(model, tok, conv, rollout_cfg, ops, fit,
                          {"calibration": {"rollouts": asdict(rollout_cfg), "problems": len(problems),
                                           "distinct_questions": len({p.question for p in problems})}},
                          {"calibration_no_exit": ops.get("no_exit")}, "toy target")
    head.save(out_path)
    return head.meta


def set_operating_points(head: MarginalValueHead, ops: dict, calibration: dict) -> None:
    """Replace a head's calibrated operating points (weights and conventions unchanged).

    Args:
        head: a head carrying train-head metadata; ops: :func:`calibrate`'s result;
        calibration: where the points were chosen (recorded under ``training.calibration``).
    Raises:
        ValueError: a head without metadata, or ``ops`` without any operating point.
    """
    if head.meta is None:
        raise ValueError("head.meta: a bare head has no metadata to carry operating points")
    points, default_op = _operating_points(ops)
    if not points:
        raise ValueError(f"ops: no operating point reached a floor on calibration ({sorted(ops)})")
    head.meta["operating_points"] = points
    head.meta["default_operating_point"] = default_op
    head.meta.setdefault("training", {})["calibration"] = calibration
    if "rule" in ops:
        head.meta["training"]["calibration_rule"] = ops["rule"]
    head.meta.setdefault("metrics", {})["calibration_no_exit"] = ops.get("no_exit")
