"""The exit and phase rules of one row, as Triton device functions shared by every kernel.

The two halves of :mod:`haltkit.reference.termination`: :func:`plan_rules` before the token is
known (value and budget exits, the forced exit token), :func:`after_rules` once it is. The
logits' row check is left to the caller: it only turns a planned row into an ERROR, which emits
nothing and leaves every other state field as it was.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..state import Reason

EOS: tl.constexpr = tl.constexpr(int(Reason.EOS))
LENGTH: tl.constexpr = tl.constexpr(int(Reason.LENGTH))
VALUE: tl.constexpr = tl.constexpr(int(Reason.VALUE))
BUDGET: tl.constexpr = tl.constexpr(int(Reason.BUDGET))
ERROR: tl.constexpr = tl.constexpr(int(Reason.ERROR))
MODEL: tl.constexpr = tl.constexpr(int(Reason.MODEL))


@triton.jit
def plan_rules(running, value, n, think_tokens, below_count, phase, forced_pos,
               lam, min_new, patience, budget, exit_len):
    """Step 3 and the forcing of step 4 for one row (``running``: no finish reason yet).

    Returns (value_bad, below_count, think_exit, think_reason, switch, stop_now, forced_pos,
    forcing, emit, draw); ``value_bad`` rows are ERRORs and emit nothing.
    """
    value_bad = running & (phase == 0) & (lam > float("-inf")) & ~(tl.abs(value) < float("inf"))
    consult = running & (phase == 0) & ~value_bad
    below = consult & (n >= min_new) & (value < lam)
    new_below = tl.where(consult, tl.where(below, below_count + 1, 0), below_count)
    value_exit = consult & (new_below >= patience)
    budget_exit = consult & ~value_exit & (budget > 0) & (think_tokens >= budget)
    think_exit = value_exit | budget_exit
    think_reason = tl.where(value_exit, VALUE, BUDGET)
    switch = think_exit & (exit_len > 0)
    stop_now = think_exit & (exit_len == 0)
    fpos = tl.where(switch, 0, forced_pos)
    emit = running & ~value_bad & ~stop_now
    forcing = emit & (switch | ((phase == 1) & (fpos < exit_len)))
    return value_bad, new_below, think_exit, think_reason, switch, stop_now, fpos, forcing, emit, emit & ~forcing


@triton.jit
def is_eos_token(eos_ptr, E, token, BLOCK_E: tl.constexpr):
    """Whether ``token`` is one of the row's E EOS ids (padded with -1) at ``eos_ptr``."""
    hit = tl.full([], 0, tl.int1)
    for e0 in range(0, E, BLOCK_E):
        ee = e0 + tl.arange(0, BLOCK_E)
        ids = tl.load(eos_ptr + ee, mask=ee < E, other=-1)
        hit = hit | (tl.sum((ids == token).to(tl.int32)) > 0)
    return hit


@triton.jit
def after_rules(bad, emit, draw, forcing, stop_now, switch, think_exit, think_reason, new_below, fpos,
                token, is_eos, exit0, n, think_tokens, below_count, phase, forced_pos, think_end, finish,
                exit_len, max_new):
    """Step 5 for one row: the state after a step with that plan and token. ``bad``: the row is an
    ERROR now (a value error, or logits that failed the row check after the plan was made): it
    finishes with ERROR and every other field stays as it was, whatever the plan said.

    Returns (num_generated, think_tokens, below_count, phase, forced_pos, think_end, finish_reason).
    """
    ok = ~bad
    emit = emit & ok
    closes = ok & draw & (phase == 0) & (exit_len > 0) & (token == exit0)
    n_new = n + emit.to(tl.int32)
    finish = tl.where(bad, ERROR, tl.where(stop_now, think_reason, tl.where(
        emit & is_eos, EOS, tl.where(emit & (n_new >= max_new), LENGTH, finish))))
    return (n_new,
            think_tokens + (emit & (phase == 0) & ~switch & ~closes).to(tl.int32),
            tl.where(ok, new_below, below_count),
            tl.where(ok & (switch | closes), 1, phase),
            tl.where(ok & forcing, fpos + 1, tl.where(closes, exit_len, forced_pos)),
            tl.where(ok & think_exit, think_reason, tl.where(closes, MODEL, think_end)),
            finish)
