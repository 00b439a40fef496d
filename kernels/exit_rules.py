"""Triton backend of ``exit_rules``: one program per row (see :mod:`haltkit.reference.exit_rules`).

A program commits its row's pending plan with the token the engine drew, evaluates the head
where the rules consult it, stores the new plan, and overwrites the logits of a row that must
take a forced token. No host synchronisation; rows >= B and inactive rows are not touched.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..params import RequestBatch
from ..reference.termination import PLAN_WORDS
from ..state import DecodeState
from ..value_head import HeadWeights
from .decode_step import _pow2, _value_head
from .termination import after_rules, is_eos_token, plan_rules

__all__ = ["exit_rules"]


@triton.jit
def _exit_rules_kernel(
    logits_ptr, stride_l,  # [B, V] f32, unit column stride, written
    hidden_ptr, stride_h,  # [B, d] any float (unused without a head)
    cost_ptr, patience_ptr, min_new_ptr, max_new_ptr, budget_ptr,  # [M] f32, i32 x4
    eos_ptr, E, exit_ptr, X, exit_len_ptr,  # [M, E] i32, [M, X] i32, [M] i32
    num_generated_ptr, think_tokens_ptr, below_count_ptr, phase_ptr,  # [M] i32, updated in place
    forced_pos_ptr, think_end_ptr, finish_ptr,  # [M] i32, updated in place
    w1_ptr, b1_ptr, w2_ptr, b2_ptr, d, R,  # [R, d + 2], [R], [R] or [0], [1]: one float dtype
    plan_ptr, token_ptr, halt_ptr, active_ptr,  # [M, 5] i32, [B] i64, [M] i64, [M] bool
    V,
    HAS_HEAD: tl.constexpr, IS_MLP: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    row = tl.program_id(0)
    if tl.load(active_ptr + row) != 0:
        row64 = row.to(tl.int64)
        n = tl.load(num_generated_ptr + row)
        think_tokens = tl.load(think_tokens_ptr + row)
        below_count = tl.load(below_count_ptr + row)
        phase = tl.load(phase_ptr + row)
        forced_pos = tl.load(forced_pos_ptr + row)
        think_end = tl.load(think_end_ptr + row)
        finish = tl.load(finish_ptr + row)
        lam = tl.load(cost_ptr + row)
        min_new = tl.load(min_new_ptr + row)
        patience = tl.load(patience_ptr + row)
        budget = tl.load(budget_ptr + row)
        max_new = tl.load(max_new_ptr + row)
        exit_len = tl.load(exit_len_ptr + row)
        exit0 = tl.load(exit_ptr + row64 * X)
        p = plan_ptr + row64 * 5

        # 1. Commit the pending plan with the token drawn for it.
        token = tl.load(token_ptr + row)
        if token >= 0:
            flags = tl.load(p)
            n, think_tokens, below_count, phase, forced_pos, think_end, finish = after_rules(
                (flags & 2) != 0, (flags & 4) != 0, (flags & 16) != 0, (flags & 8) != 0, (flags & 32) != 0,
                (flags & 64) != 0, (flags & 128) != 0, tl.load(p + 1), tl.load(p + 2), tl.load(p + 3),
                token, is_eos_token(eos_ptr + row64 * E, E, token, BLOCK_E), exit0,
                n, think_tokens, below_count, phase, forced_pos, think_end, finish, exit_len, max_new)
            tl.store(num_generated_ptr + row, n)
            tl.store(think_tokens_ptr + row, think_tokens)
            tl.store(below_count_ptr + row, below_count)
            tl.store(phase_ptr + row, phase)
            tl.store(forced_pos_ptr + row, forced_pos)
            tl.store(think_end_ptr + row, think_end)
            tl.store(finish_ptr + row, finish)

        # 2. The head where the rules read it, and the plan.
        running = finish == 0
        value = tl.full([], float("nan"), tl.float32)
        if HAS_HEAD:
            if running & (phase == 0) & (lam > float("-inf")):
                value = _value_head(hidden_ptr + row64 * stride_h, w1_ptr, b1_ptr, w2_ptr, b2_ptr, d, R, n,
                                    tl.where(budget > 0, budget, max_new), IS_MLP, BLOCK_D, BLOCK_R)
        bad, new_below, think_exit, think_reason, switch, stop_now, fpos, forcing, emit, draw = plan_rules(
            running, value, n, think_tokens, below_count, phase, forced_pos, lam, min_new, patience, budget,
            exit_len)
        forced = tl.load(exit_ptr + row64 * X + tl.minimum(tl.maximum(fpos, 0), X - 1))
        forced = tl.where(forcing, forced, -1)
        flags = (running.to(tl.int32) | (bad.to(tl.int32) << 1) | (emit.to(tl.int32) << 2)
                 | (forcing.to(tl.int32) << 3) | (draw.to(tl.int32) << 4) | (stop_now.to(tl.int32) << 5)
                 | (switch.to(tl.int32) << 6) | (think_exit.to(tl.int32) << 7))
        tl.store(p, flags)
        tl.store(p + 1, think_reason)
        tl.store(p + 2, new_below)
        tl.store(p + 3, fpos)
        tl.store(p + 4, forced)

        # 3. Force: the forced exit token, or the halt token of a row that emits nothing.
        force = tl.where(forcing, forced.to(tl.int64), tl.where(emit, -1, tl.load(halt_ptr + row)))
        if (force >= 0) & (force < V):
            x_ptr = logits_ptr + row64 * stride_l
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                tl.store(x_ptr + cols, tl.where(cols == force, 0.0, float("-inf")), mask=cols < V)


def exit_rules(
    logits: torch.Tensor,
    hidden: torch.Tensor | None,
    requests: RequestBatch,
    state: DecodeState,
    head: HeadWeights | None,
    plan: torch.Tensor,
    token: torch.Tensor,
    halt_token: torch.Tensor,
    active: torch.Tensor,
) -> None:
    """decode_step's exit rules around another sampler, in one Triton launch (all in place).

    Args and semantics: those of :func:`haltkit.reference.exit_rules`; ``logits`` [B, V]
    float32 with unit column stride, ``plan`` and the state tensors contiguous.
    """
    B, V = logits.shape
    if B == 0:
        return
    if logits.stride(1) != 1 or not plan.is_contiguous() or plan.shape[1] != PLAN_WORDS:
        raise ValueError("exit_rules: logits rows and the [M, 5] plan must be contiguous (they are written in place)")
    for t in state.tensors():
        if not t.is_contiguous():
            raise ValueError("exit_rules: the state tensors must be contiguous (they are updated in place)")
    r = RequestBatch(*(t.contiguous() for t in requests.tensors()))
    if head is not None:
        w1, b1, w2, b2 = (t.contiguous() for t in head)
        R, d = w1.shape[0], w1.shape[1] - 2
        h = hidden if hidden.stride(1) == 1 else hidden.contiguous()
        stride_h = h.stride(0)
    else:
        w1 = b1 = w2 = b2 = h = logits  # never read: HAS_HEAD is False
        R, d, stride_h = 1, 1, 0
    E, X = r.eos_ids.shape[1], r.exit_tokens.shape[1]
    _exit_rules_kernel[(B,)](
        logits, logits.stride(0), h, stride_h,
        r.cost_of_time, r.patience, r.min_new_tokens, r.max_new_tokens, r.thinking_budget,
        r.eos_ids, E, r.exit_tokens, X, r.exit_len,
        *state.tensors(),
        w1, b1, w2, b2, d, R,
        plan, token.contiguous(), halt_token.contiguous(), active.contiguous(),
        V,
        HAS_HEAD=head is not None, IS_MLP=head is not None and head.is_mlp,
        BLOCK_V=_pow2(V, 16, 1024), BLOCK_D=_pow2(d, 16, 256), BLOCK_R=_pow2(R, 2, 32), BLOCK_E=_pow2(E, 2, 16),
        num_warps=4,
    )
