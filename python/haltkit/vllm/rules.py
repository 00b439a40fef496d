"""The exit rules of ``decode_step``, split around a sampler that is not haltkit's.

vLLM draws the token itself, after its logits processors have run, so one haltkit step becomes
two halves here:

* :func:`decide` runs before vLLM samples: it consults the head and settles everything that does
  not depend on the drawn token (value and budget exits, the forced token, the ``halt`` of a
  request that finishes without emitting anything);
* :func:`account` runs once the drawn token is known: it counts the token and closes the
  thinking phase when the model drew ``exit_tokens[0]`` itself.

``account(decide(state), token)`` equals one step of :func:`haltkit.reference.decode_step` with
that token drawn (tests/vllm/test_vllm_rules.py holds them together over random scenarios).
The candidate state of :func:`decide` is only committed by :func:`account`, so a decision whose
token never comes (vLLM discards the sample of a partial prefill) is simply decided again.
Both halves are vectorised over the batch and never synchronise with the host.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..params import RequestBatch
from ..state import DecodeState, Reason
from ..value_head import HeadWeights, head_forward, step_features

__all__ = ["Decision", "head_values", "decide", "account"]


class Decision(NamedTuple):
    """What :func:`decide` settled for one step, all [B] on the state's device.

    Fields:
        state: the candidate state after the token-independent half of the step (committed
            by :func:`account` once the step's token exists).
        emit: bool, the row emits a haltkit token this step (forced or drawn).
        drew: bool, the row's token is drawn by the sampler (``emit`` and not forced).
        forced_token: int64, the token to force where ``emit & ~drew``, else -1.
        halt: bool, the row finishes this step without a token of its own (a value or budget
            exit without exit tokens, or an error); the caller ends the request.
    """

    state: DecodeState
    emit: torch.Tensor
    drew: torch.Tensor
    forced_token: torch.Tensor
    halt: torch.Tensor


def head_values(
    hidden: torch.Tensor | None, requests: RequestBatch, state: DecodeState, head: HeadWeights | None
) -> torch.Tensor:
    """The head's value per row, from the hidden state and the step features.

    Args:
        hidden: [B, d] float32 | bfloat16 | float16, or None when there is no head.
        requests, state: [B] each.
        head: the head's weights, or None (then every value is NaN).

    Returns:
        [B] float32.
    """
    if head is None:
        return torch.full((state.batch_size,), math.nan, device=state.num_generated.device)
    r = requests
    budget = torch.where(r.thinking_budget > 0, r.thinking_budget, r.max_new_tokens)
    feats = torch.cat([hidden.float(), step_features(state.num_generated, budget)], dim=1)
    return head_forward(feats, head)


def decide(values: torch.Tensor, requests: RequestBatch, state: DecodeState) -> Decision:
    """The token-independent half of a step (steps 2-4 of the reference, without the draw).

    Args:
        values: [B] float32 from :func:`head_values`.
        requests: [B] each.
        state: the committed state, [B] int32 each; not modified.

    Returns:
        A :class:`Decision`.
    """
    r, s = requests, state
    n = s.num_generated
    running = s.finish_reason == Reason.NONE
    consult = running & (s.phase == 0)
    lam_on = r.cost_of_time > -math.inf
    bad = consult & lam_on & ~torch.isfinite(values)
    consult = consult & ~bad
    below = consult & (n >= r.min_new_tokens) & (values < r.cost_of_time)
    below_count = torch.where(consult, torch.where(below, s.below_count + 1, 0), s.below_count)
    value_exit = consult & (below_count >= r.patience)
    budget_exit = consult & ~value_exit & (r.thinking_budget > 0) & (s.think_tokens >= r.thinking_budget)
    think_exit = value_exit | budget_exit
    think_reason = torch.where(value_exit, int(Reason.VALUE), int(Reason.BUDGET))
    has_exit = r.exit_len > 0
    switch = think_exit & has_exit
    stop_now = think_exit & ~has_exit

    forced_pos = torch.where(switch, 0, s.forced_pos)
    emit = running & ~bad & ~stop_now
    forcing = emit & (switch | ((s.phase == 1) & (forced_pos < r.exit_len)))
    last = r.exit_tokens.shape[1] - 1
    forced_tok = r.exit_tokens.gather(1, forced_pos.clamp(0, last).long()[:, None])[:, 0].long()

    cand = DecodeState(
        num_generated=n.clone(),
        think_tokens=s.think_tokens.clone(),
        below_count=below_count.to(torch.int32),
        phase=torch.where(switch, 1, s.phase).to(torch.int32),
        forced_pos=torch.where(forcing, forced_pos + 1, s.forced_pos).to(torch.int32),
        think_end=torch.where(think_exit, think_reason, s.think_end).to(torch.int32),
        finish_reason=torch.where(
            bad, int(Reason.ERROR), torch.where(stop_now, think_reason, s.finish_reason)
        ).to(torch.int32),
    )
    forced_token = torch.where(forcing, forced_tok, -1)
    return Decision(cand, emit, emit & ~forcing, forced_token, running & (bad | stop_now))


def account(decision: Decision, token: torch.Tensor, requests: RequestBatch) -> DecodeState:
    """The token-dependent half of a step (step 5 of the reference): the committed new state.

    Args:
        decision: from :func:`decide` for this step.
        token: [B] int64, the token the row emitted this step (ignored where it emitted none).
        requests: [B] each.

    Returns:
        The state after the step, [B] int32 each (a new object; ``decision`` is not modified).
    """
    c, r = decision.state, requests
    emit, drew = decision.emit, decision.drew
    # Rows that drew were not switched by `decide`, so their candidate phase is the old one.
    closes = drew & (c.phase == 0) & (r.exit_len > 0) & (token == r.exit_tokens[:, 0].long())
    thinking_token = emit & (c.phase == 0) & ~closes
    n_new = c.num_generated + emit.to(torch.int32)
    is_eos = (token[:, None] == r.eos_ids.long()).any(1)
    finish = torch.where(
        emit & is_eos, int(Reason.EOS),
        torch.where(emit & (n_new >= r.max_new_tokens), int(Reason.LENGTH), c.finish_reason),
    )
    return DecodeState(
        num_generated=n_new,
        think_tokens=c.think_tokens + thinking_token.to(torch.int32),
        below_count=c.below_count,
        phase=torch.where(closes, 1, c.phase).to(torch.int32),
        forced_pos=torch.where(closes, r.exit_len, c.forced_pos).to(torch.int32),
        think_end=torch.where(closes, int(Reason.MODEL), c.think_end).to(torch.int32),
        finish_reason=finish.to(torch.int32),
    )
