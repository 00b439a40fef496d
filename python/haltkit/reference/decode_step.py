"""Executable specification of ``decode_step``: value head, sampling, termination, compaction.

Plain PyTorch, vectorised over the batch, slow and obviously right. Every backend is tested
against this file; where a backend disagrees, this file is the answer.

One step of one running sequence (n = tokens generated so far):

1. Row check. Logits with a NaN or +inf anywhere, or with no finite entry, end the row with
   reason ERROR; it emits nothing and the rest of its state is left alone.
2. Value. v = head([h, log1p(n), n / budget]) with budget = thinking_budget or max_new_tokens.
3. Thinking phase only (phase 0): the head is consulted. A non-finite v where value exits are on
   is an ERROR. Once n >= min_new_tokens, v < cost_of_time counts one more below-price step, any
   other step resets the count to 0. The thinking phase ends with VALUE when the count reaches
   patience, else with BUDGET when think_tokens >= thinking_budget. Ended without exit tokens:
   the sequence finishes with that reason and emits nothing. With exit tokens: it switches to
   the answer phase and exit_tokens[0] is emitted this very step.
4. Token. In the answer phase with exit tokens left to force, the next one is emitted;
   otherwise the token is drawn: greedy rows take the first index of the largest logit; other
   rows take argmax over the kept set of z_i + G_i, where z = (logits - max) / temperature,
   the kept set is z >= max(tau_k, tau_p, tau_m) (see ``filter_threshold``) and G_i is Gumbel
   noise from Philox(seed; i, n, STREAM_TOKEN). A thinking-phase draw of exit_tokens[0] closes
   thinking by the model's own choice (think_end MODEL), nothing is forced.
5. Emitted token: n += 1 (and think_tokens += 1 for a thinking token). The row finishes with
   EOS if the token is an EOS id, else with LENGTH once n >= max_new_tokens.
6. Compaction: the indices of rows still running, in order, and their count.
"""

from __future__ import annotations

import math

import torch

from ..params import RequestBatch
from ..state import DecodeState, Reason, StepOutput
from ..value_head import HeadWeights, head_forward, step_features
from .philox import STREAM_TOKEN, gumbel_from_words, random_words
from .termination import after_step, plan_step

__all__ = ["decode_step", "head_values", "row_is_bad", "filter_threshold", "scaled_logits", "compact"]


def row_is_bad(x: torch.Tensor) -> torch.Tensor:
    """[B, V] float32 -> [B] bool: NaN or +inf anywhere, or no finite entry."""
    return torch.isnan(x).any(1) | (x == math.inf).any(1) | (x == -math.inf).all(1)


def scaled_logits(x: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """z = (x - max x) / T per row, with T = 1 for greedy rows; the max entry maps to exactly 0.

    Args:
        x: [B, V] float32 logits of rows that passed :func:`row_is_bad`.
        temperature: [B] float32 >= 0.
    Returns:
        [B, V] float32.
    """
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    return (x - x.max(1, keepdim=True).values) / t[:, None]


def filter_threshold(
    z: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """The kept-set threshold tau per row: the kept set is ``z >= tau`` (ties kept).

    * tau_k: the top_k-th largest z (with multiplicity); -inf when top_k == 0 or top_k >= V.
    * tau_p: the largest z value v with mass(z >= v) >= top_p * mass(z >= tau_k), masses of
      exp(z); -inf when top_p == 1.
    * tau_m: log(min_p), since p_i >= min_p * p_max  <=>  z_i >= log(min_p); -inf when min_p == 0.

    Args:
        z: [B, V] float32 from :func:`scaled_logits` (row max exactly 0).
        top_k: [B] int32; top_p: [B] float32; min_p: [B] float32.
    Returns:
        [B] float32, tau = max(tau_k, tau_p, tau_m) <= 0, so the argmax is always kept.
    """
    B, V = z.shape
    neg_inf = torch.full((B,), -math.inf, dtype=z.dtype, device=z.device)
    zs, _ = torch.sort(z, dim=1, descending=True)
    k = top_k.to(torch.int64)
    k_on = (k > 0) & (k < V)
    tau_k = torch.where(k_on, zs.gather(1, (k.clamp(1, V) - 1)[:, None])[:, 0], neg_inf)

    e = torch.where(zs >= tau_k[:, None], torch.exp(zs), torch.zeros_like(zs))
    cum = torch.cumsum(e, dim=1)
    target = top_p * cum[:, -1]
    # First sorted position whose cumulative mass reaches the target; rounding can leave a
    # top_p just below 1 short of it, and then the whole top-k set is kept.
    reach = cum >= target[:, None]
    first = torch.where(reach.any(1), reach.to(torch.int8).argmax(1), (k.clamp(1, V) - 1) * k_on + (V - 1) * ~k_on)
    tau_p = torch.where(top_p < 1, zs.gather(1, first[:, None])[:, 0], neg_inf)

    tau_m = torch.where(min_p > 0, torch.log(min_p), neg_inf)
    return torch.maximum(torch.maximum(tau_k, tau_p), tau_m)


def compact(finish_reason: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order-preserving indices of running rows, padded with -1, and their count (no host sync).

    Args:
        finish_reason: [B] int32.
    Returns:
        ([B] int64, [] int64).
    """
    B = finish_reason.shape[0]
    # int(): torch.compile traces `tensor == IntEnum` to a Python bool instead of a tensor.
    running = finish_reason == int(Reason.NONE)
    pos = torch.cumsum(running.to(torch.int64), 0) - 1
    # Finished rows scatter into a spill slot B that is cut off afterwards.
    dest = torch.where(running, pos, torch.full_like(pos, B))
    idx = torch.full((B + 1,), -1, dtype=torch.int64, device=finish_reason.device)
    idx.scatter_(0, dest, torch.arange(B, dtype=torch.int64, device=finish_reason.device))
    return idx[:B], running.sum().to(torch.int64)


def head_values(
    hidden: torch.Tensor | None, requests: RequestBatch, state: DecodeState, head: HeadWeights | None
) -> torch.Tensor:
    """Step 2 for every row: v = head([h, log1p(n), n / budget]), NaN everywhere without a head.

    Args:
        hidden: [B, d] float32 | bfloat16 | float16, or None when there is no head.
        requests, state: [B] each.
        head: the head's weights, or None.

    Returns:
        [B] float32.
    """
    if head is None:
        return torch.full((state.batch_size,), math.nan, device=state.num_generated.device)
    budget = torch.where(requests.thinking_budget > 0, requests.thinking_budget, requests.max_new_tokens)
    return head_forward(torch.cat([hidden.float(), step_features(state.num_generated, budget)], dim=1), head)


def decode_step(
    logits: torch.Tensor,
    hidden: torch.Tensor | None,
    requests: RequestBatch,
    state: DecodeState,
    head: HeadWeights | None,
) -> StepOutput:
    """One fused decode step, as specified in this module's docstring (state updated in place).

    Args:
        logits: [B, V] float32 | bfloat16 | float16.
        hidden: [B, d] float32 | bfloat16 | float16, or None when ``head`` is None.
        requests: the packed requests, [B] each.
        state: the decode state, [B] int32 each; updated in place.
        head: the value head's weights, or None (values are NaN, value exits must be off).
    Returns:
        A :class:`StepOutput`.
    """
    V = logits.shape[1]
    x = logits.float()
    r, s = requests, state
    n = s.num_generated
    running = s.finish_reason == int(Reason.NONE)

    # 2. Value, for every row running at the start of the step.
    values = head_values(hidden, r, s, head)
    values = torch.where(running, values, torch.full_like(values, math.nan))

    # 1 and 3. Row check, thinking-phase exits, the forced token.
    p = plan_step(values, r, s, row_is_bad(x))

    # 4. Token: forced, or drawn.
    xs = torch.where(p.bad[:, None] | ~running[:, None], torch.zeros_like(x), x)  # keep math finite
    greedy = r.temperature == 0
    z = scaled_logits(xs, r.temperature)
    zero = torch.zeros_like(r.top_k)
    tau = filter_threshold(
        z,
        torch.where(greedy, zero, r.top_k),
        torch.where(greedy, torch.ones_like(r.top_p), r.top_p),
        torch.where(greedy, torch.zeros_like(r.min_p), r.min_p),
    )
    kept = z >= tau[:, None]
    noise = gumbel_from_words(random_words(r.seed, n, STREAM_TOKEN, V))
    score = torch.where(kept, z + noise, torch.full_like(z, -math.inf))
    drawn = torch.where(greedy, xs.argmax(1), score.argmax(1))
    token = torch.where(p.forcing, p.forced_token, drawn)

    log_mass = torch.log(torch.where(kept, torch.exp(z), torch.zeros_like(z)).sum(1))
    tok_c = token.clamp(0, V - 1)[:, None]
    lp = torch.where(kept.gather(1, tok_c)[:, 0], z.gather(1, tok_c)[:, 0] - log_mass, -math.inf)

    # 5. State updates.
    for dst, src in zip(s.tensors(), after_step(p, token, r, s).tensors()):
        dst.copy_(src)

    tokens = torch.where(p.emit, token, -1)
    logprobs = torch.where(p.emit, lp, math.nan).float()
    active_idx, num_active = compact(s.finish_reason)
    return StepOutput(tokens, logprobs, values.float(), active_idx, num_active)
