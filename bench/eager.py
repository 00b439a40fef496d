"""The baseline of the decode_step benchmark: the epilogue an eager HF / vLLM-style engine runs.

One step as ~20-30 small PyTorch kernels, written the way serving engines write it today:

* value head: ``cat`` of the hidden state and two step features, ``linear`` (+ ``relu``, ``linear``);
* sampling, after vLLM's v1 ``Sampler``: raw ``log_softmax`` for the returned log-probs; greedy
  batches take ``argmax`` alone; otherwise temperature division, top-k by ``topk`` + mask,
  top-p by ``sort`` + ``softmax`` + ``cumsum`` + mask + ``scatter``, min-p by ``softmax`` +
  ``amax`` + mask, then ``softmax`` and the exponential race ``probs / q`` (``q ~ Exp(1)`` from
  the global generator: vLLM's fast path when no request carries its own seed);
* termination: value exits with patience, thinking budgets, forced exit tokens, EOS and length,
  as [B]-wide ``where`` chains;
* compaction: ``nonzero`` of the running rows (a host synchronisation, as in eager engines).

Filters nobody in the batch uses are skipped (flags computed once per batch on the host, like
vLLM's ``SamplingMetadata``), so the baseline does no work a real engine would avoid. It does not
check rows for NaN, nor key its randomness by (seed, step): it does less than haltkit, never more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from haltkit import HeadWeights, RequestBatch

__all__ = ["EagerBatch", "eager_batch", "eager_decode_step"]


@dataclass
class EagerBatch:
    """A packed batch plus the host-side flags an eager engine keeps beside it."""

    requests: RequestBatch
    all_greedy: bool
    any_greedy: bool
    use_top_k: bool
    use_top_p: bool
    use_min_p: bool


def eager_batch(requests: RequestBatch) -> EagerBatch:
    """Flags of which filters the batch uses (host syncs happen here, once, not per step)."""
    r = requests
    greedy = r.temperature == 0
    return EagerBatch(
        r, bool(greedy.all()), bool(greedy.any()), bool((r.top_k > 0).any()),
        bool((r.top_p < 1).any()), bool((r.min_p > 0).any()),
    )


def _sample(x: torch.Tensor, eb: EagerBatch) -> torch.Tensor:
    r = eb.requests
    greedy_tok = x.argmax(-1)
    if eb.all_greedy:
        return greedy_tok
    t = torch.where(r.temperature > 0, r.temperature, torch.ones_like(r.temperature))
    x = x / t[:, None]
    if eb.use_top_k:
        k = r.top_k.long().clamp(1, x.shape[1])
        kth = x.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
        x = x.masked_fill((x < kth) & (r.top_k > 0)[:, None], float("-inf"))
    if eb.use_top_p:
        xs, order = x.sort(dim=-1, descending=False)
        cum = xs.softmax(-1).cumsum(-1)
        drop = cum <= (1 - r.top_p)[:, None]
        drop[:, -1] = False
        x = x.scatter(1, order, xs.masked_fill(drop, float("-inf")))
    if eb.use_min_p:
        p = x.softmax(-1)
        x = x.masked_fill(p < r.min_p[:, None] * p.amax(-1, keepdim=True), float("-inf"))
    probs = x.softmax(-1)
    q = torch.empty_like(probs).exponential_()
    tok = (probs / q).argmax(-1)
    return torch.where(r.temperature == 0, greedy_tok, tok) if eb.any_greedy else tok


def eager_decode_step(
    logits: torch.Tensor, hidden: torch.Tensor, eb: EagerBatch, state, head: HeadWeights
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One eager step; ``state`` (a DecodeState) is updated in place.

    Args:
        logits: [B, V] float32 | bfloat16 | float16.
        hidden: [B, d] float32 | bfloat16 | float16.
        eb: from :func:`eager_batch`.
        state: a :class:`haltkit.DecodeState`.
        head: the value head's weights.
    Returns:
        (tokens [B] int64 (-1: none), logprobs [B] float32, values [B] float32,
        active_idx [num_active] int64).
    """
    r, s = eb.requests, state
    running = s.finish_reason == 0
    n = s.num_generated.float()

    budget = torch.where(r.thinking_budget > 0, r.thinking_budget, r.max_new_tokens).float()
    feats = torch.cat([hidden.float(), torch.log1p(n)[:, None], (n / budget)[:, None]], 1)
    pre = F.linear(feats, head.w1.float(), head.b1.float())
    values = (F.relu(pre) @ head.w2.float() + head.b2.float()) if head.w2.numel() else pre[:, 0]

    x = logits.float()
    logprobs_all = x.log_softmax(-1)
    drawn = _sample(x, eb)

    thinking = running & (s.phase == 0)
    below = thinking & (s.num_generated >= r.min_new_tokens) & (values < r.cost_of_time)
    below_count = torch.where(thinking, torch.where(below, s.below_count + 1, 0), s.below_count)
    value_exit = thinking & (below_count >= r.patience)
    budget_exit = thinking & ~value_exit & (r.thinking_budget > 0) & (s.think_tokens >= r.thinking_budget)
    exit_now = value_exit | budget_exit
    has_exit = r.exit_len > 0
    forced_pos = torch.where(exit_now & has_exit, 0, s.forced_pos)
    forcing = running & (exit_now & has_exit | (s.phase == 1) & (forced_pos < r.exit_len))
    emit = running & ~(exit_now & ~has_exit)
    forced_tok = r.exit_tokens.gather(1, forced_pos.clamp(max=r.exit_tokens.shape[1] - 1).long()[:, None])[:, 0]
    token = torch.where(forcing, forced_tok.long(), drawn)
    n_new = s.num_generated + emit.int()
    eos = (token[:, None] == r.eos_ids).any(1)
    finish = torch.where(exit_now & ~has_exit, torch.where(value_exit, 3, 4), s.finish_reason)
    finish = torch.where(emit & eos, 1, torch.where(emit & (n_new >= r.max_new_tokens), 2, finish))

    s.below_count.copy_(below_count)
    s.think_tokens.add_((emit & thinking & ~exit_now).int())
    s.phase.copy_(torch.where(exit_now & has_exit, 1, s.phase))
    s.forced_pos.copy_(torch.where(forcing, forced_pos + 1, s.forced_pos))
    s.num_generated.copy_(n_new)
    s.finish_reason.copy_(finish.int())

    tokens = torch.where(emit, token, -1)
    logprobs = logprobs_all.gather(1, token.clamp(min=0)[:, None])[:, 0]
    active_idx = torch.nonzero(s.finish_reason == 0).squeeze(1)
    return tokens, logprobs, values, active_idx
