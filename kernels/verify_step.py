"""Triton backend of ``verify_step``: one program per row, the verified positions looped inside.

Semantics are those of :mod:`haltkit.reference.verify_step` (its docstring is the specification).
A program keeps its row's decode state in registers and walks positions j = 0, 1, ... while the
run lasts; each position is one decode step of :mod:`haltkit.kernels.decode_step`, built from the
same pieces (value head, row scan with its one-pass draw, threshold searches, draw pass), then the
drafted token is compared with the step's token:

* greedy rows and method "exact": the step's own token (argmax, Gumbel-max draw with STREAM_TOKEN
  noise at step n+j, or a forced exit token) is the target token;
* method "rejection", temperature > 0: the kept mass comes from the same passes (without the
  draw), the acceptance test reads two numbers (p(x) from the logits, q(x)), and only a rejected
  position reads the row once more to draw from the residual max(0, p - q) with STREAM_RESIDUAL
  noise (:func:`_residual_pass`).

Positions after the run are not read at all. State is written once, after the loop; compaction
happens in the same launch, by the last program to finish (as in decode_step).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..params import RequestBatch
from ..reference.verify_step import VerifyOutput
from ..state import DecodeState
from ..value_head import HeadWeights
from .decode_step import _INF_KEY, _compact, _draw_pass, _key, _pow2, _scan_row, _search_threshold, _ticket, _value_head
from .philox import gumbel_from_words, seed_key, token_words, uniform_from_words, words_at
from .termination import after_rules, is_eos_token, plan_rules

__all__ = ["verify_step"]

_STREAM_ACCEPT: tl.constexpr = tl.constexpr(1)
_STREAM_RESIDUAL: tl.constexpr = tl.constexpr(2)


@triton.jit
def _residual_pass(x_ptr, q_ptr, V, M, t, W, log_mass, draft, k0, k1, step,
                   Q_FULL: tl.constexpr, BLOCK_V: tl.constexpr):
    """The correction token after a rejection: Gumbel-max over log max(0, p - q) with
    STREAM_RESIDUAL noise, or over log p when rounding leaves the residual empty.

    p_i = exp(z_i - log_mass) on the kept set (key(z) <= W), 0 elsewhere; q is the draft's row
    (Q_FULL) or a point mass at ``draft``.
    """
    offs0 = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")
    lane_r = tl.full([BLOCK_V], neg_inf, tl.float32)
    lane_r_idx = tl.zeros([BLOCK_V], dtype=tl.int32)
    lane_p = tl.full([BLOCK_V], neg_inf, tl.float32)
    lane_p_idx = tl.zeros([BLOCK_V], dtype=tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + offs0
        mask = offs < V
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = tl.math.div_rn(x - M, t)
        p = tl.where(mask & (_key(z) <= W), tl.exp(z - log_mass), 0.0)
        if Q_FULL:
            q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            q = tl.where(offs == draft, 1.0, 0.0)
        r = p - q
        g = gumbel_from_words(token_words(k0, k1, step, _STREAM_RESIDUAL, start, BLOCK_V))
        # r > 0 is false for NaN, as in the reference.
        score_r = tl.where(r > 0, tl.log(r) + g, neg_inf)
        score_p = tl.where(p > 0, tl.log(p) + g, neg_inf)
        up = score_r > lane_r
        lane_r = tl.where(up, score_r, lane_r)
        lane_r_idx = tl.where(up, offs, lane_r_idx)
        up = score_p > lane_p
        lane_p = tl.where(up, score_p, lane_p)
        lane_p_idx = tl.where(up, offs, lane_p_idx)
    big = 2147483647
    best_r = tl.max(lane_r)
    best_p = tl.max(lane_p)
    tok_r = tl.min(tl.where(lane_r == best_r, lane_r_idx, big))
    tok_p = tl.min(tl.where(lane_p == best_p, lane_p_idx, big))
    return tl.where(best_r > neg_inf, tok_r, tok_p)


@triton.jit
def _verify_step_kernel(
    logits_ptr, stride_lb, stride_lj,  # [B, K+1, V] fp32 | bf16 | fp16, unit column stride
    hidden_ptr, stride_hb, stride_hj,  # [B, K+1, d] any float (unused without a head)
    drafts_ptr, stride_db, lens_ptr,  # [B, K] i64, [B] i32
    q_ptr, stride_qb, stride_qj,  # [B, K, V] (Q_FULL) or [B, K] any float (unused by "exact")
    temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr,  # [B] f32, i32, f32, f32, i64
    cost_ptr, patience_ptr, min_new_ptr, max_new_ptr, budget_ptr,  # [B] f32, i32 x4
    eos_ptr, E, exit_ptr, X, exit_len_ptr,  # [B, E] i32, [B, X] i32, [B] i32
    num_generated_ptr, think_tokens_ptr, below_count_ptr, phase_ptr,  # [B] i32, updated in place
    forced_pos_ptr, think_end_ptr, finish_ptr,  # [B] i32, updated in place
    w1_ptr, b1_ptr, w2_ptr, b2_ptr, d, R,  # [R, d + 2], [R], [R] or [0], [1]: one float dtype
    tokens_ptr, num_emitted_ptr, num_accepted_ptr,  # [B, K+1] i64, [B] i32, [B] i32 outputs
    values_ptr, logprobs_ptr,  # [B, K+1] f32 outputs
    active_idx_ptr, num_active_ptr, ticket_ptr,  # [B] i64, [] i64 outputs; [1] i32, zero between launches
    B, V, K,
    HAS_HEAD: tl.constexpr, IS_MLP: tl.constexpr, REJECTION: tl.constexpr, Q_FULL: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr, NT: tl.constexpr,
):
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    finish = tl.load(finish_ptr + row)
    n = tl.load(num_generated_ptr + row)
    think_tokens = tl.load(think_tokens_ptr + row)
    below_count = tl.load(below_count_ptr + row)
    phase = tl.load(phase_ptr + row)
    forced_pos = tl.load(forced_pos_ptr + row)
    think_end = tl.load(think_end_ptr + row)
    lam = tl.load(cost_ptr + row)
    budget = tl.load(budget_ptr + row)
    max_new = tl.load(max_new_ptr + row)
    min_new = tl.load(min_new_ptr + row)
    patience = tl.load(patience_ptr + row)
    exit_len = tl.load(exit_len_ptr + row)
    exit0 = tl.load(exit_ptr + row64 * X)
    temperature = tl.load(temperature_ptr + row)
    greedy = temperature == 0
    t = tl.where(greedy, 1.0, temperature)
    top_k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    min_p = tl.load(min_p_ptr + row)
    k_on = ~greedy & (top_k > 0) & (top_k < V)
    p_on = ~greedy & (top_p < 1)
    m_on = ~greedy & (min_p > 0)
    plain = ~greedy & ~k_on & ~p_on & ~m_on
    k0, k1 = seed_key(tl.load(seed_ptr + row))
    lens = tl.load(lens_ptr + row)

    # Malformed drafts make the row's logits at position 0 count as bad (an ERROR row).
    malformed = (lens < 0) | (lens > K)
    for j in range(0, K):
        judged = j < lens
        x_j = tl.load(drafts_ptr + row64 * stride_db + j)
        malformed = malformed | (judged & ((x_j < 0) | (x_j >= V)))
        if REJECTION:
            q_off = row64 * stride_qb + j * stride_qj
            if Q_FULL:
                q_x = tl.load(q_ptr + q_off + tl.minimum(tl.maximum(x_j, 0), V - 1)).to(tl.float32)
                q_bad = ~((q_x > 0) & (q_x < float("inf")))
            else:
                q_bad = tl.load(q_ptr + q_off).to(tl.float32) != 1.0
            malformed = malformed | (judged & ~greedy & q_bad)

    live = finish == 0
    n_emitted = tl.zeros([], dtype=tl.int32)
    n_accepted = tl.zeros([], dtype=tl.int32)
    for j in range(0, K + 1):
        token = tl.full([], -1, tl.int32)
        logprob = tl.full([], float("nan"), tl.float32)
        value = tl.full([], float("nan"), tl.float32)
        if live:
            has_draft = (j < lens) & (j < K)
            draft = tl.load(drafts_ptr + row64 * stride_db + j, mask=has_draft, other=0).to(tl.int32)

            # Value and thinking-phase exits, as decode_step at step n (= n + j of the call).
            if HAS_HEAD:
                value = _value_head(hidden_ptr + row64 * stride_hb + j * stride_hj, w1_ptr, b1_ptr, w2_ptr,
                                    b2_ptr, d, R, n, tl.where(budget > 0, budget, max_new), IS_MLP, BLOCK_D, BLOCK_R)
            value_bad, new_below, think_exit, think_reason, switch, stop_now, fpos, forcing, emit, draw = plan_rules(
                live, value, n, think_tokens, below_count, phase, forced_pos, lam, min_new, patience, budget,
                exit_len)
            # Speculative sampling picks this position's token instead of decode_step's draw.
            choose = REJECTION & draw & has_draft & ~greedy

            x_ptr = logits_ptr + row64 * stride_lb + j * stride_lj
            logits_bad = tl.zeros([], dtype=tl.int1)
            if value_bad == 0:
                n_bad, M, arg, sum_exp, certified, drawn = _scan_row(
                    x_ptr, V, t, plain & draw & ~choose, k0, k1, n, BLOCK_V)
                logits_bad = (n_bad > 0) | (M == float("-inf")) | (malformed & (j == 0))
                emit = emit & ~logits_bad
                draw = draw & ~logits_bad
                forcing = forcing & ~logits_bad
                choose = choose & ~logits_bad
                if emit:
                    W = tl.full([], _INF_KEY, tl.int32)
                    mass = sum_exp
                    token = tl.where(greedy, arg, drawn)
                    if (~greedy & ~plain) | (plain & draw & ~choose & ~certified):
                        if k_on:
                            W = _search_threshold(x_ptr, V, M, t, W, top_k.to(tl.float32), 0.0, False, BLOCK_V, NT)
                        if p_on:
                            W = _search_threshold(x_ptr, V, M, t, W, tl.full([], -1.0, tl.float32), top_p,
                                                  True, BLOCK_V, NT)
                        if m_on:
                            W = tl.minimum(W, _key(tl.log(min_p)))
                        mass, token = _draw_pass(x_ptr, V, M, t, W, draw & ~choose, k0, k1, n, BLOCK_V)
                    if choose:
                        log_mass = tl.log(mass)
                        z_x = tl.math.div_rn(tl.load(x_ptr + draft).to(tl.float32) - M, t)
                        p_x = tl.where(_key(z_x) <= W, tl.exp(z_x - log_mass), 0.0)
                        q_row = q_ptr + row64 * stride_qb + j * stride_qj
                        q_x = 1.0
                        if Q_FULL:
                            q_x = tl.load(q_row + draft).to(tl.float32)
                        u = uniform_from_words(words_at(k0, k1, n, _STREAM_ACCEPT, tl.zeros([], dtype=tl.int32)))
                        token = draft
                        if u * q_x >= p_x:
                            token = _residual_pass(x_ptr, q_row, V, M, t, W, log_mass, draft, k0, k1, n,
                                                   Q_FULL, BLOCK_V)
                    if forcing:
                        token = tl.load(exit_ptr + row64 * X + fpos)
                    z_tok = tl.math.div_rn(tl.load(x_ptr + token).to(tl.float32) - M, t)
                    logprob = tl.where(_key(z_tok) <= W, z_tok - tl.log(mass), float("-inf"))

            # State updates, as decode_step's step 5; an ERROR row keeps everything but its reason.
            bad = value_bad | logits_bad
            is_eos = is_eos_token(eos_ptr + row64 * E, E, token, BLOCK_E)
            n, think_tokens, below_count, phase, forced_pos, think_end, finish = after_rules(
                bad, emit, draw, forcing, stop_now, switch, think_exit, think_reason, new_below, fpos, token,
                is_eos, exit0, n, think_tokens, below_count, phase, forced_pos, think_end, finish, exit_len, max_new)

            accepted = emit & has_draft & (token == draft)
            n_emitted += emit.to(tl.int32)
            n_accepted += accepted.to(tl.int32)
            token = tl.where(emit, token, -1)
            live = accepted & (finish == 0)
        out = row64 * (K + 1) + j
        tl.store(tokens_ptr + out, token.to(tl.int64))
        tl.store(values_ptr + out, value)
        tl.store(logprobs_ptr + out, logprob)

    tl.store(num_generated_ptr + row, n)
    tl.store(think_tokens_ptr + row, think_tokens)
    tl.store(below_count_ptr + row, below_count)
    tl.store(phase_ptr + row, phase)
    tl.store(forced_pos_ptr + row, forced_pos)
    tl.store(think_end_ptr + row, think_end)
    tl.store(finish_ptr + row, finish)
    tl.store(num_emitted_ptr + row, n_emitted)
    tl.store(num_accepted_ptr + row, n_accepted)

    # Compaction by the last program to finish.
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == B - 1:
        _compact(finish_ptr, active_idx_ptr, num_active_ptr, B, BLOCK_B)
        tl.store(ticket_ptr, 0)


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
    *,
    out: VerifyOutput | None = None,
    block_v: int | None = None,
) -> VerifyOutput:
    """One fused verification step in a single Triton launch (state updated in place, no host sync).

    Inputs are validated by :func:`haltkit.verify_step`, which calls this; semantics are the
    reference's (:mod:`haltkit.reference.verify_step`).

    Args:
        target_logits: [B, K+1, V] float32 | bfloat16 | float16 with unit column stride.
        hidden: [B, K+1, d] float32 | bfloat16 | float16 with unit column stride, or None.
        draft_tokens: [B, K] int64.
        draft_lens: [B] int32.
        requests: the packed requests on the logits' device.
        state: [B] int32 contiguous tensors, updated in place.
        head: the value head's weights (one float dtype), or None.
        draft_probs: "rejection" only: [B, K, V] or [B, K] float, unit column stride.
        method: "exact" or "rejection".
        out: preallocated outputs to write into (tests poison them); default: fresh tensors.
        block_v: vocabulary tile size, a power of two >= 16; default min(1024, next power of two of V).
    Returns:
        A :class:`VerifyOutput`.
    Raises:
        ValueError: a state tensor is not contiguous, or ``block_v`` is not a power of two >= 16.
    """
    B, K1, V = target_logits.shape
    K = K1 - 1
    dev = target_logits.device
    for name, t in zip(("num_generated", "think_tokens", "below_count", "phase", "forced_pos",
                        "think_end", "finish_reason"), state.tensors()):
        if not t.is_contiguous():
            raise ValueError(f"state.{name} must be contiguous (it is updated in place), got stride {t.stride()}")
    r = RequestBatch(*(t.contiguous() for t in requests.tensors()))
    if out is None:
        i32, i64, f32 = (dict(dtype=dt, device=dev) for dt in (torch.int32, torch.int64, torch.float32))
        out = VerifyOutput(
            torch.empty(B, K1, **i64), torch.empty(B, **i32), torch.empty(B, **i32),
            torch.empty(B, K1, **f32), torch.empty(B, K1, **f32),
            torch.empty(B, **i64), torch.empty((), **i64),
        )
    if B == 0:  # nothing to launch: a grid of zero programs would leave num_active unwritten
        out.num_active.zero_()
        return out
    if head is not None:
        w1, b1, w2, b2 = (t.contiguous() for t in head)
        R, d = w1.shape[0], w1.shape[1] - 2
        h, stride_hb, stride_hj = hidden, hidden.stride(0), hidden.stride(1)
    else:
        w1 = b1 = w2 = b2 = h = target_logits  # never read: HAS_HEAD is False
        R, d, stride_hb, stride_hj = 1, 1, 0, 0
    rejection = method == "rejection"
    if rejection:
        q = draft_probs if draft_probs.stride(-1) == 1 else draft_probs.contiguous()
        stride_qb, stride_qj = q.stride(0), q.stride(1)
    else:
        q, stride_qb, stride_qj = target_logits, 0, 0  # never read: REJECTION is False
    drafts = draft_tokens.contiguous()
    if block_v is None:
        block_v = _pow2(V, 16, 1024)
    elif block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two >= 16, got {block_v}")
    E, X = r.eos_ids.shape[1], r.exit_tokens.shape[1]
    _verify_step_kernel[(B,)](
        target_logits, target_logits.stride(0), target_logits.stride(1), h, stride_hb, stride_hj,
        drafts, drafts.stride(0), draft_lens.contiguous(), q, stride_qb, stride_qj,
        r.temperature, r.top_k, r.top_p, r.min_p, r.seed,
        r.cost_of_time, r.patience, r.min_new_tokens, r.max_new_tokens, r.thinking_budget,
        r.eos_ids, E, r.exit_tokens, X, r.exit_len,
        *state.tensors(),
        w1, b1, w2, b2, d, R,
        *out, _ticket(dev),
        B, V, K,
        HAS_HEAD=head is not None, IS_MLP=head is not None and head.is_mlp,
        REJECTION=rejection, Q_FULL=rejection and draft_probs.dim() == 3,
        BLOCK_V=block_v, BLOCK_D=_pow2(d, 16, 256), BLOCK_R=_pow2(R, 2, 32),
        BLOCK_E=_pow2(E, 2, 16), BLOCK_B=_pow2(B, 16, 1024), NT=16,
        num_warps=8,
    )
    return out
