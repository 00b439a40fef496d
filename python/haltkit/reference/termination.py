"""The exit and phase rules of a decode step (steps 1, 3 and 5 of ``decode_step``), as two halves.

:func:`plan_step` settles everything that does not depend on the step's token (row check,
value and budget exits, the forced exit token); :func:`after_step` applies the token once it
exists. ``decode_step`` runs both around its own draw; :mod:`haltkit.reference.exit_rules`
runs them around another sampler's (vLLM's), keeping the plan between the two calls in the
packed form of :func:`pack_plan`. The native backends run the same two halves
(``plan_step`` / ``finish_step`` in csrc/include/haltkit/termination.cuh).
"""

from __future__ import annotations

import enum
import math
from typing import NamedTuple

import torch

from ..params import RequestBatch
from ..state import DecodeState, Reason

__all__ = ["Plan", "plan_step", "after_step", "pack_plan", "unpack_plan", "PLAN_WORDS"]


class Plan(NamedTuple):
    """What a step does to each row before its token is known; every field [B].

    Fields:
        running: bool, the row had no finish reason at the start of the step.
        bad: bool, the row finishes with ERROR now (bad logits, or a non-finite consulted value).
        emit: bool, the row emits a token this step.
        forcing: bool, that token is ``forced_token``.
        draw: bool, that token is drawn (``emit & ~forcing``).
        stop_now: bool, thinking ended without exit tokens: the row finishes with ``think_reason``.
        switched: bool, thinking ended with exit tokens: the answer phase starts now.
        think_exit: bool, thinking ended this step (``stop_now | switched``).
        think_reason: int32, VALUE or BUDGET where ``think_exit`` (BUDGET elsewhere).
        below_count: int32, the new count of consecutive below-price steps.
        forced_pos: int32, the index of the exit token forced this step (where ``forcing``).
        forced_token: int64, the forced token where ``forcing``, else -1.
    """

    running: torch.Tensor
    bad: torch.Tensor
    emit: torch.Tensor
    forcing: torch.Tensor
    draw: torch.Tensor
    stop_now: torch.Tensor
    switched: torch.Tensor
    think_exit: torch.Tensor
    think_reason: torch.Tensor
    below_count: torch.Tensor
    forced_pos: torch.Tensor
    forced_token: torch.Tensor


def plan_step(values: torch.Tensor, requests: RequestBatch, state: DecodeState, logits_bad: torch.Tensor) -> Plan:
    """Steps 1 and 3 of ``decode_step``, and which token step 4 forces.

    Args:
        values: [B] float32, the head's values (read only where a running thinking row has value
            exits on).
        requests: [B] each.
        state: [B] int32 each, the state at the start of the step; not modified.
        logits_bad: [B] bool, the row check of the step's logits.

    Returns:
        The :class:`Plan`.
    """
    r, s = requests, state
    running = s.finish_reason == int(Reason.NONE)
    bad = running & logits_bad
    consult = running & ~bad & (s.phase == 0)
    bad = bad | (consult & (r.cost_of_time > -math.inf) & ~torch.isfinite(values))
    consult = consult & ~bad
    below = consult & (s.num_generated >= r.min_new_tokens) & (values < r.cost_of_time)
    below_count = torch.where(consult, torch.where(below, s.below_count + 1, 0), s.below_count)
    value_exit = consult & (below_count >= r.patience)
    budget_exit = consult & ~value_exit & (r.thinking_budget > 0) & (s.think_tokens >= r.thinking_budget)
    think_exit = value_exit | budget_exit
    has_exit = r.exit_len > 0
    switched = think_exit & has_exit
    stop_now = think_exit & ~has_exit
    forced_pos = torch.where(switched, 0, s.forced_pos)
    emit = running & ~bad & ~stop_now
    forcing = emit & (switched | ((s.phase == 1) & (forced_pos < r.exit_len)))
    last = r.exit_tokens.shape[1] - 1
    forced = r.exit_tokens.gather(1, forced_pos.clamp(0, last).long()[:, None])[:, 0].long()
    return Plan(
        running=running, bad=bad, emit=emit, forcing=forcing, draw=emit & ~forcing, stop_now=stop_now,
        switched=switched, think_exit=think_exit,
        think_reason=torch.where(value_exit, int(Reason.VALUE), int(Reason.BUDGET)).to(torch.int32),
        below_count=below_count.to(torch.int32), forced_pos=forced_pos.to(torch.int32),
        forced_token=torch.where(forcing, forced, -1),
    )


def after_step(plan: Plan, token: torch.Tensor, requests: RequestBatch, state: DecodeState) -> DecodeState:
    """Step 5 of ``decode_step``: the state after a step with plan ``plan`` and token ``token``.

    Args:
        plan: from :func:`plan_step` on ``state``.
        token: [B] int64, the row's token (read only where ``plan.emit``).
        requests: [B] each.
        state: [B] int32 each, the state the plan was made on; not modified.

    Returns:
        A new :class:`DecodeState`, [B] int32 each.
    """
    p, r, s = plan, requests, state
    thinking = s.phase == 0
    closes = p.draw & thinking & (r.exit_len > 0) & (token == r.exit_tokens[:, 0].long())
    n_new = s.num_generated + p.emit.to(torch.int32)
    is_eos = (token[:, None] == r.eos_ids.long()).any(1)
    finish = torch.where(
        p.bad, int(Reason.ERROR),
        torch.where(p.stop_now, p.think_reason,
        torch.where(p.emit & is_eos, int(Reason.EOS),
        torch.where(p.emit & (n_new >= r.max_new_tokens), int(Reason.LENGTH), s.finish_reason))))
    i32 = torch.int32
    return DecodeState(
        num_generated=n_new,
        think_tokens=s.think_tokens + (p.emit & thinking & ~p.switched & ~closes).to(i32),
        below_count=p.below_count,
        phase=torch.where(p.switched | closes, 1, s.phase).to(i32),
        forced_pos=torch.where(p.forcing, p.forced_pos + 1, torch.where(closes, r.exit_len, s.forced_pos)).to(i32),
        think_end=torch.where(p.think_exit, p.think_reason,
                              torch.where(closes, int(Reason.MODEL), s.think_end)).to(i32),
        finish_reason=finish.to(i32),
    )


# --- the packed plan ------------------------------------------------------------------------
# [B, PLAN_WORDS] int32 per row: flags, think_reason, below_count, forced_pos, forced_token.
# The layout of kPlanWords / PlanFlag in termination.cuh, bit for bit.

PLAN_WORDS = 5


class _Flag(enum.IntFlag):
    RUNNING = 1
    BAD = 2
    EMIT = 4
    FORCING = 8
    DRAW = 16
    STOP_NOW = 32
    SWITCHED = 64
    THINK_EXIT = 128


_FLAG_FIELDS = ("running", "bad", "emit", "forcing", "draw", "stop_now", "switched", "think_exit")


def pack_plan(plan: Plan) -> torch.Tensor:
    """The plan as [B, PLAN_WORDS] int32 (the native backends' layout)."""
    flags = sum(getattr(plan, f).to(torch.int32) * int(_Flag[f.upper()]) for f in _FLAG_FIELDS)
    return torch.stack([flags, plan.think_reason, plan.below_count, plan.forced_pos,
                        plan.forced_token.to(torch.int32)], dim=1).to(torch.int32)


def unpack_plan(packed: torch.Tensor) -> Plan:
    """The :class:`Plan` of a [B, PLAN_WORDS] int32 tensor from :func:`pack_plan`."""
    flags = packed[:, 0]
    bits = {f: (flags & int(_Flag[f.upper()])) != 0 for f in _FLAG_FIELDS}
    return Plan(**bits, think_reason=packed[:, 1], below_count=packed[:, 2], forced_pos=packed[:, 3],
                forced_token=packed[:, 4].long())
