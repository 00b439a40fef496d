"""Executable specification of ``verify_step``: speculative verification fused with the value
head and per-sequence termination.

The target model has scored, for each of B sequences, K+1 positions in one forward pass: its
logits and final hidden states at position j are those of step n+j (n = the sequence's
num_generated), given the K_b = draft_lens[b] drafted tokens before it. Verification decides which
tokens the sequence emits.

Position j (0 <= j <= K_b) of row b is judged exactly as ``decode_step`` judges step n+j of that
sequence, with the target's logits and hidden state at position j: the same value features (from
n+j), patience carried from position to position and from step to step, the thinking budget,
forced exit tokens, EOS, the length limit and ERROR rows. The row's run stops at the first
position that finishes the sequence, emits no token, or emits a token different from the drafted
one (that token, the correction, is still emitted). After K_b accepted drafts the bonus position
K_b emits as ``decode_step`` would. Positions after the run are not judged: token -1, value and
log-prob NaN, state untouched.

The token position j < K_b emits, for drafted token x:

* method "exact", and every greedy row (temperature 0) whatever the method: the token
  ``decode_step`` emits at step n+j (forced exit token, greedy argmax, or the Gumbel-max draw with
  STREAM_TOKEN noise at step n+j). x is accepted iff it equals that token, so the output is token
  for token that of ``decode_step`` run step by step, whatever the draft.
* method "rejection", rows with temperature > 0 (speculative sampling): p is the distribution the
  row samples from at j (:func:`sampling_probs`: decode_step's kept set, renormalised), q the
  draft's distribution at j (a ``draft_probs`` row, or a point mass at x when ``draft_probs`` is
  [B, K]). With u = uniform(Philox(seed; 0, n+j, STREAM_ACCEPT)), x is accepted iff
  u * q(x) < p(x), i.e. with probability min(1, p(x) / q(x)). At a rejection the token is the
  Gumbel-max draw over the residual r = max(0, p - q) (r = p should rounding leave it empty):
  argmax over r_i > 0 of log r_i + G_i, G from Philox(seed; i, n+j, STREAM_RESIDUAL). Forced exit
  tokens still take precedence (accepted iff equal to x), and a value or budget exit still stops
  the row. The emitted token's log-prob is log p(token).

Malformed drafts: a running row whose draft length lies outside [0, K], whose drafted token at a
position j < K_b lies outside [0, V), or (method "rejection", temperature > 0) whose q(x) at such
a position is not a finite number > 0 (in the [B, K] point-mass form: not exactly 1) is an ERROR
row: it is treated as if its logits at position 0 were bad, so it emits nothing and only its
finish reason changes. No other row is affected. The other entries of a q row are trusted, not
checked (checking them would read every q row twice); a negative or NaN entry i only drops i from
the residual.

Outputs: tokens [B, K+1] (-1 padded), num_emitted [B], num_accepted [B] (drafted tokens emitted),
values and log-probs per judged position, and the compacted indices of rows still running.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..params import RequestBatch
from ..state import DecodeState, Reason
from ..value_head import HeadWeights
from .decode_step import decode_step, filter_threshold, row_is_bad, scaled_logits, compact
from .philox import STREAM_ACCEPT, STREAM_RESIDUAL, gumbel_from_words, random_words, uniform_from_words

__all__ = ["verify_step", "sampling_log_probs", "VerifyOutput", "METHODS"]

#: The verification rules ``verify_step`` knows.
METHODS = ("exact", "rejection")


class VerifyOutput(NamedTuple):
    """What one verification step returns (the state is updated in place).

    Fields:
        tokens: [B, K+1] int64, the emitted tokens in order, padded with -1.
        num_emitted: [B] int32, how many entries of ``tokens`` are real.
        num_accepted: [B] int32, how many drafted tokens were emitted (num_emitted - 1 or
            num_emitted).
        values: [B, K+1] float32, the head's value at every judged position; NaN elsewhere.
        logprobs: [B, K+1] float32, log-probability of each emitted token under the distribution
            its row samples from at that position (as ``StepOutput.logprobs``); NaN elsewhere.
        active_idx: [B] int64, indices of the rows still running, in order, padded with -1.
        num_active: [] int64, how many entries of ``active_idx`` are real.
    """

    tokens: torch.Tensor
    num_emitted: torch.Tensor
    num_accepted: torch.Tensor
    values: torch.Tensor
    logprobs: torch.Tensor
    active_idx: torch.Tensor
    num_active: torch.Tensor


def sampling_log_probs(logits: torch.Tensor, requests: RequestBatch) -> torch.Tensor:
    """Log-probabilities of the distribution each row samples from, as ``decode_step`` defines it.

    Rows with temperature > 0: the temperature-scaled softmax restricted to the kept set of
    top-k / top-p / min-p (``filter_threshold``) and renormalised; -inf outside the kept set.
    Greedy rows: the model's softmax (their draw is its argmax); this is what ``logprobs`` report.

    Args:
        logits: [B, V] float32 | bfloat16 | float16.
        requests: the packed requests, [B] each.
    Returns:
        [B, V] float32; rows with bad logits (see ``row_is_bad``) are NaN.
    """
    x = logits.float()
    bad = row_is_bad(x)
    x = torch.where(bad[:, None], torch.zeros_like(x), x)  # keep the math finite
    r = requests
    greedy = r.temperature == 0
    z = scaled_logits(x, r.temperature)
    tau = filter_threshold(
        z,
        torch.where(greedy, torch.zeros_like(r.top_k), r.top_k),
        torch.where(greedy, torch.ones_like(r.top_p), r.top_p),
        torch.where(greedy, torch.zeros_like(r.min_p), r.min_p),
    )
    kept = z >= tau[:, None]
    log_mass = torch.log(torch.where(kept, torch.exp(z), torch.zeros_like(z)).sum(1, keepdim=True))
    logp = torch.where(kept, z - log_mass, torch.full_like(z, -math.inf))
    return torch.where(bad[:, None], torch.full_like(z, math.nan), logp)


def _malformed_drafts(
    draft_tokens: torch.Tensor,
    draft_lens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    requests: RequestBatch,
    vocab_size: int,
    method: str,
) -> torch.Tensor:
    """[B] bool: the row's draft breaks the rules of the module docstring (an ERROR row)."""
    B, K = draft_tokens.shape
    lens = draft_lens.to(torch.int64)
    judged = torch.arange(K, device=lens.device)[None, :] < lens[:, None]  # [B, K]
    out_of_vocab = (draft_tokens < 0) | (draft_tokens >= vocab_size)
    bad = (lens < 0) | (lens > K) | (judged & out_of_vocab).any(1)
    if method == "rejection" and K > 0:
        if draft_probs.dim() == 2:
            q_bad = draft_probs.float() != 1
        else:
            qx = draft_probs.gather(2, draft_tokens.clamp(0, vocab_size - 1)[:, :, None])[:, :, 0].float()
            q_bad = ~((qx > 0) & (qx < math.inf))
        bad = bad | ((requests.temperature > 0) & (judged & q_bad).any(1))
    return bad


def _speculative_choice(
    logp: torch.Tensor, q: torch.Tensor | None, draft: torch.Tensor, seed: torch.Tensor, step: torch.Tensor
) -> torch.Tensor:
    """[B] int64: the token speculative sampling emits at one position (accepted draft or correction).

    Args:
        logp: [B, V] float32, log p of the target (``sampling_log_probs``).
        q: [B, V] float32 draft distribution, or None for a point mass at ``draft``.
        draft: [B] int64 drafted tokens, in [0, V).
        seed: [B] int64; step: [B] int32, the Philox step n+j.
    """
    p = torch.exp(logp)
    px = p.gather(1, draft[:, None])[:, 0]
    qx = torch.ones_like(px) if q is None else q.gather(1, draft[:, None])[:, 0]
    u = uniform_from_words(random_words(seed, step, STREAM_ACCEPT, 1))[:, 0]
    accept = u * qx < px
    if q is None:
        resid = p.scatter(1, draft[:, None], 0.0)
    else:
        resid = torch.clamp(p - q, min=0.0)
    resid = torch.where((resid > 0).any(1, keepdim=True), resid, p)
    noise = gumbel_from_words(random_words(seed, step, STREAM_RESIDUAL, p.shape[1]))
    score = torch.where(resid > 0, torch.log(resid) + noise, torch.full_like(p, -math.inf))
    return torch.where(accept, draft, score.argmax(1))


def verify_step(
    target_logits: torch.Tensor,
    hidden: torch.Tensor | None,
    draft_tokens: torch.Tensor,
    draft_lens: torch.Tensor,
    requests: RequestBatch,
    state: DecodeState,
    head: HeadWeights | None,
    draft_probs: torch.Tensor | None = None,
    method: str = "exact",
) -> VerifyOutput:
    """One fused verification step, as specified in this module's docstring (state updated in place).

    Args:
        target_logits: [B, K+1, V] float32 | bfloat16 | float16.
        hidden: [B, K+1, d] float32 | bfloat16 | float16, or None when ``head`` is None.
        draft_tokens: [B, K] int64; entries at j >= draft_lens[b] are ignored.
        draft_lens: [B] int32, K_b in [0, K].
        requests: the packed requests, [B] each.
        state: the decode state, [B] int32 each; updated in place.
        head: the value head's weights, or None.
        draft_probs: method "rejection" only: [B, K, V] draft distributions, or [B, K] of ones
            for point-mass drafts.
        method: "exact" or "rejection".
    Returns:
        A :class:`VerifyOutput`.
    """
    B, K1, V = target_logits.shape
    K = K1 - 1
    dev = target_logits.device
    x = target_logits.float()
    r = requests
    rejection = method == "rejection"
    lens = draft_lens.to(torch.int64)
    # A malformed draft is an ERROR row: decode_step sees a NaN row at position 0.
    malformed = _malformed_drafts(draft_tokens, draft_lens, draft_probs, r, V, method)
    sampled = r.temperature > 0

    tokens = torch.full((B, K1), -1, dtype=torch.int64, device=dev)
    values = torch.full((B, K1), math.nan, dtype=torch.float32, device=dev)
    logprobs = torch.full((B, K1), math.nan, dtype=torch.float32, device=dev)
    num_emitted = torch.zeros(B, dtype=torch.int32, device=dev)
    num_accepted = torch.zeros(B, dtype=torch.int32, device=dev)
    in_run = state.finish_reason == Reason.NONE

    for j in range(K1):
        xj = x[:, j]
        if j == 0:
            xj = torch.where(malformed[:, None], torch.full_like(xj, math.nan), xj)
        has_draft = in_run & (j < lens)
        draft = draft_tokens[:, j].clamp(0, V - 1) if j < K else torch.zeros_like(lens)

        # Speculative sampling chooses the token of a drafted sampled position; decode_step then
        # judges the step with logits that make its own draw pick exactly that token (a one-hot
        # row), so every termination rule applies to it unchanged. Forced tokens and exits do not
        # read the logits, and the row check already passed on the real ones.
        step_logits, chosen = xj, torch.zeros(B, dtype=torch.bool, device=dev)
        if rejection and j < K:
            chosen = has_draft & sampled & ~row_is_bad(xj)
            logp = sampling_log_probs(xj, r)
            q = None if draft_probs.dim() == 2 else draft_probs[:, j].float()
            token = _speculative_choice(logp, q, draft, r.seed, state.num_generated)
            one_hot = torch.full_like(xj, -math.inf).scatter(1, token[:, None], 0.0)
            step_logits = torch.where(chosen[:, None], one_hot, xj)

        # Rows out of the run are hidden from decode_step by a finish reason on a scratch copy.
        view = state.clone()
        view.finish_reason.copy_(torch.where(in_run, view.finish_reason, int(Reason.ERROR)))
        out = decode_step(step_logits, None if hidden is None else hidden[:, j], r, view, head)
        for name, t in vars(state).items():
            t.copy_(torch.where(in_run, getattr(view, name), t))

        emitted = in_run & (out.tokens >= 0)
        lp = out.logprobs
        if rejection and j < K:
            lp_real = logp.gather(1, out.tokens.clamp(0, V - 1)[:, None])[:, 0]
            lp = torch.where(chosen & emitted, lp_real, lp)
        tokens[:, j] = out.tokens
        values[:, j] = out.values
        logprobs[:, j] = lp
        accepted = emitted & has_draft & (out.tokens == draft)
        num_emitted += emitted.to(torch.int32)
        num_accepted += accepted.to(torch.int32)
        in_run = accepted & (state.finish_reason == Reason.NONE)

    active_idx, num_active = compact(state.finish_reason)
    return VerifyOutput(tokens, num_emitted, num_accepted, values, logprobs, active_idx, num_active)
