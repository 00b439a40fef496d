"""Triton backend of ``decode_step``: one program per row, tiled over the vocabulary.

Semantics are those of :mod:`haltkit.reference.decode_step` (its docstring is the specification).
A program reads its row's state and request, evaluates the value head (dot products in fp32 over
tiles of d), decides the thinking-phase exits (none of which depend on the logits), then makes as
few passes over the logits as the row's sampling parameters allow:

* greedy rows: one pass (row check, max, first argmax, online sum of exp);
* temperature-only rows that draw: one pass, which adds a Gumbel-max draw to the above. The
  reference draws argmax (x - max) / T + G; the max is not known until the pass ends, so the pass
  ranks each vocabulary lane by (x - r) / T + G for a fixed shift r (the ranking is the same up
  to rounding), keeps every lane's best and runner-up, and rescores the lane winners exactly once
  the max is known. A rounding-error bound certifies that each lane's winner is its exact winner;
  when it cannot (near ties, ~1e-5 of rows, or extreme temperatures) an exact second pass runs;
* rows with top-k / top-p: one pass for the max, a threshold search per filter (see
  :func:`_search_threshold`: each search pass counts, or sums exp(z) over, z >= tau for 16
  candidate thresholds at once and narrows the bracket to present values; 3-5 passes per search
  on the rows of bench/decode_step_passes.py, 9 at most), then one pass that sums the kept mass
  and draws. Not a sort: the count / mass tests are the reference's definitions of tau_k, tau_p;
* min-p only: one pass for the max, one to draw (tau_m = log(min_p) needs no search);
* rows that emit nothing (finished, a value error, a value / budget exit without exit tokens)
  read no logits beyond the row check, and finished rows none at all.

Draw passes skip the Philox noise of a tile whose best z + GUMBEL_MAX cannot beat the best score
so far (exact: no skipped token could have won), so on real logits most tiles cost one read.

Compaction happens in the same launch: every program takes a ticket from an atomic counter after
writing its finish reason; the program with the last ticket writes ``active_idx`` /
``num_active`` and resets the counter, which lives in a small per-(device, stream) buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..params import RequestBatch
from ..state import DecodeState, StepOutput
from ..value_head import HeadWeights
from .philox import GUMBEL_MAX, gumbel_from_words, seed_key, token_words
from .termination import after_rules, is_eos_token, plan_rules

__all__ = ["decode_step"]

# The order-reversing integer image of z <= 0 is its magnitude bits: 0 for z = 0, growing as z
# falls, _INF_KEY for -inf; z >= tau  <=>  key(z) <= key(tau). Padding lanes get _PAD_KEY.
_INF_KEY: tl.constexpr = tl.constexpr(0x7F800000)
_PAD_KEY: tl.constexpr = tl.constexpr(0x7FFFFFFF)
# Single-pass draws: tiles whose shifted scores are this far below the best skip their noise, and
# lanes whose best is more than half of it below the best cannot hold the winner (see _scan_row).
_SLACK: tl.constexpr = tl.constexpr(1.0)
_STREAM_TOKEN: tl.constexpr = tl.constexpr(0)


@triton.jit
def _key(z):
    """float32 z <= 0 -> int32 key, order-reversing (see _INF_KEY)."""
    return z.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _value_head(h_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, d, R, n, budget,
                IS_MLP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """The head on [h, log1p(n), n / budget] in fp32. h_ptr: [d] any float; w1_ptr: [R, d + 2]."""
    nf = n.to(tl.float32)
    f_log = tl.log(1.0 + nf)  # n < 2**24, so 1 + n is exact and this is log1p(n)
    f_frac = tl.math.div_rn(nf, budget.to(tl.float32))
    rr = tl.arange(0, BLOCK_R)
    dd = tl.arange(0, BLOCK_D)
    v = tl.full([], 0, tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + rr
        rmask = rows < R
        acc = tl.full([BLOCK_R], 0, tl.float32)
        for c0 in range(0, d, BLOCK_D):
            cols = c0 + dd
            cmask = cols < d
            h = tl.load(h_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            w = tl.load(w1_ptr + rows[:, None] * (d + 2) + cols[None, :],
                        mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * h[None, :], axis=1)
        w_log = tl.load(w1_ptr + rows * (d + 2) + d, mask=rmask, other=0.0).to(tl.float32)
        w_frac = tl.load(w1_ptr + rows * (d + 2) + d + 1, mask=rmask, other=0.0).to(tl.float32)
        acc += w_log * f_log + w_frac * f_frac + tl.load(b1_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        if IS_MLP:
            w2 = tl.load(w2_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
            # where(acc < 0) rather than maximum: a NaN must reach the value, as torch.relu lets it.
            v += tl.sum(tl.where(rmask, tl.where(acc < 0, 0.0, acc) * w2, 0.0))
        else:
            v += tl.sum(tl.where(rmask, acc, 0.0))
    if IS_MLP:
        v += tl.load(b2_ptr).to(tl.float32)
    return v


@triton.jit
def _scan_row(x_ptr, V, t, sample, k0, k1, step, BLOCK_V: tl.constexpr):
    """Pass 1: row check, max, first argmax, sum of exp((x - max) / t); plus a draw when ``sample``.

    Returns (n_bad, M, argmax, sum_exp, certified, drawn). ``drawn`` is the reference's Gumbel-max
    token (with the kernel's noise) when ``certified``; otherwise the caller redraws exactly.
    """
    offs0 = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")
    # Per-lane accumulators, reduced once after the loop (a reduction per tile costs a cross-warp
    # exchange on a GPU and a device-function call in the interpreter).
    lane_max = tl.full([BLOCK_V], neg_inf, tl.float32)
    lane_arg = tl.full([BLOCK_V], 0, tl.int32)
    lane_bad = tl.full([BLOCK_V], 0, tl.int1)
    lane_sum = tl.full([BLOCK_V], 0, tl.float32)
    m = tl.full([], neg_inf, tl.float32)
    # Draw state: the shift r (the running max when the first finite entry shows up, as every
    # earlier entry is -inf and scores -inf whatever r is),
    # the best shifted score so far, and per lane the best / runner-up key and the best's x, G, index.
    r = tl.full([], neg_inf, tl.float32)
    best = tl.full([], neg_inf, tl.float32)
    lane_key = tl.full([BLOCK_V], neg_inf, tl.float32)
    lane_2nd = tl.full([BLOCK_V], neg_inf, tl.float32)
    lane_x = tl.full([BLOCK_V], 0, tl.float32)
    lane_g = tl.full([BLOCK_V], 0, tl.float32)
    lane_idx = tl.full([BLOCK_V], 0, tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + offs0
        x = tl.load(x_ptr + offs, mask=offs < V, other=neg_inf).to(tl.float32)
        lane_bad = lane_bad | (x != x) | (x == float("inf"))
        up = x > lane_max
        lane_max = tl.where(up, x, lane_max)
        lane_arg = tl.where(up, offs, lane_arg)
        m_new = tl.maximum(m, tl.max(x))
        # Until a finite entry shows up every term is 0 (and a +inf makes the row bad): shifting by
        # 0 then avoids inf - inf.
        m_safe = tl.where(tl.abs(m_new) < float("inf"), m_new, 0.0)
        lane_sum = lane_sum * tl.exp((m - m_safe) / t) + tl.exp((x - m_safe) / t)
        m = m_new
        if sample:
            r = tl.where(r > neg_inf, r, m_safe)
            zr = tl.math.div_rn(x - r, t)
            zr_max = tl.max(zr)
            if (zr_max > neg_inf) & (zr_max + GUMBEL_MAX >= best - _SLACK):
                g = gumbel_from_words(token_words(k0, k1, step, _STREAM_TOKEN, start, BLOCK_V))
                key = zr + g
                up = key > lane_key
                lane_2nd = tl.maximum(lane_2nd, tl.where(up, lane_key, key))
                lane_key = tl.where(up, key, lane_key)
                lane_x = tl.where(up, x, lane_x)
                lane_g = tl.where(up, g, lane_g)
                lane_idx = tl.where(up, offs, lane_idx)
                best = tl.maximum(best, tl.max(key))
    big = 2147483647
    n_bad = tl.sum(lane_bad.to(tl.int32))
    s = tl.sum(lane_sum)
    arg = tl.min(tl.where(lane_max == m, lane_arg, big))
    certified = sample
    drawn = arg
    if sample:
        # A key and the reference's score of the same token differ by the constant (M - r) / t plus
        # rounding of at most 2**-20 * (|key| + |M - r| / t + 9) for two tokens near the top; D is
        # 4x that. Lanes within D of their runner-up, or D too large to separate lanes, fall back.
        shift = tl.abs(m - r) / t
        relevant = lane_key >= best - 0.5 * _SLACK
        bound = 3.814697265625e-06 * (tl.abs(lane_key) + shift + 64.0)
        ok = (~relevant) | (lane_2nd + bound < lane_key)
        worst = tl.max(tl.where(relevant, bound, 0.0))
        certified = (tl.min(ok.to(tl.int32)) == 1) & (worst < 0.25 * _SLACK)
        exact = tl.where(lane_key > neg_inf, tl.math.div_rn(lane_x - m, t) + lane_g, neg_inf)
        top = tl.max(exact)
        drawn = tl.min(tl.where(exact == top, lane_idx, big))
    return n_bad, m, arg, s, certified, drawn


@triton.jit
def _search_pass(x_ptr, V, M, t, lo, hi, first, MASS: tl.constexpr, BLOCK_V: tl.constexpr, NT: tl.constexpr):
    """One pass of the threshold search over candidate keys thr (thr[0] = lo - 1, thr[NT-1] = hi).

    Returns (thr, g, P, Q), each [NT]: g = count (or exp(z) mass) of keys <= thr, P = largest key
    <= thr (-1 if none), Q = smallest key > thr (_PAD_KEY if none).
    """
    j = tl.arange(0, NT)
    width = (hi - lo + 1 + NT - 2) // (NT - 1)
    thr = lo - 1 + j * width
    # Keys are linear in the float bits, so most of [0, hi] holds |z| < 2**-20, where thresholds
    # rarely fall: the first pass puts its inner thresholds at |z| = 2**(j - NT // 2) instead.
    thr = tl.where(first & (j > 0) & (j < NT - 1), ((j + 127 - NT // 2) << 23) - 1, thr)
    thr = tl.minimum(thr, hi)
    # Masses add up in float64 and round once, as the reference's cumsum does on the CPU, so
    # the >= target tests agree with it except within an ulp of exp(z).
    if MASS:
        g = tl.full([NT], 0, tl.float64)
    else:
        g = tl.full([NT], 0, tl.int32)
    P = tl.full([NT], -1, tl.int32)
    Q = tl.full([NT], _PAD_KEY, tl.int32)
    offs0 = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        offs = start + offs0
        mask = offs < V
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = tl.math.div_rn(x - M, t)
        w = tl.where(mask, _key(z), _PAD_KEY)
        le = w[:, None] <= thr[None, :]
        if MASS:
            g += tl.sum(tl.where(le, tl.exp(z).to(tl.float64)[:, None], 0.0), axis=0)
        else:
            g += tl.sum(le.to(tl.int32), axis=0)
        P = tl.maximum(P, tl.max(tl.where(le, w[:, None], -1), axis=0))
        Q = tl.minimum(Q, tl.min(tl.where(le, _PAD_KEY, w[:, None]), axis=0))
    return thr, g.to(tl.float32), P, Q


@triton.jit
def _search_threshold(x_ptr, V, M, t, hi, target, frac,
                      MASS: tl.constexpr, BLOCK_V: tl.constexpr, NT: tl.constexpr):
    """The smallest present key W <= hi with g(W) >= target, where g(W) counts (MASS: sums exp(z)
    over) the keys <= W: the reference's tau_k (target = k) or tau_p (target = frac * g(hi)).

    Invariant: g(lo - 1) < target <= g(hi). Each pass evaluates g at NT thresholds spread over
    [lo - 1, hi] and shrinks the bracket to the present keys of the first interval that reaches
    the target, so it ends when one distinct value is left: after the first pass (thresholds at
    binades) at most ceil(31 / log2(NT - 1)) = 8 more. The kept set is keys <= W, so ties at the
    threshold are kept. With MASS, ``target`` < 0 means "frac of the mass up to hi", computed in
    the first pass.
    """
    lo = tl.full([], 0, tl.int32)
    first = lo == 0
    j = tl.arange(0, NT)
    while lo < hi:
        thr, g, P, Q = _search_pass(x_ptr, V, M, t, lo, hi, first, MASS, BLOCK_V, NT)
        first = lo < 0
        if MASS:
            target = tl.where(target < 0, frac * tl.sum(tl.where(j == NT - 1, g, 0.0)), target)
        hit = tl.min(tl.where((g >= target) & (j >= 1), j, NT))
        # No threshold reaching the target can only come from rounding (top_p just below 1): keep
        # everything up to hi, as the reference keeps the whole top-k set then.
        new_hi = tl.where(hit < NT, tl.sum(tl.where(j == hit, P, 0)), hi)
        new_lo = tl.where(hit < NT, tl.sum(tl.where(j == hit - 1, Q, 0)), hi)
        hi = new_hi
        lo = new_lo
    return hi


@triton.jit
def _draw_pass(x_ptr, V, M, t, W, draw, k0, k1, step, BLOCK_V: tl.constexpr):
    """The kept set z >= tau (key(z) <= W): its exp(z) mass and, if ``draw``, the Gumbel-max token."""
    offs0 = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")
    lane_mass = tl.full([BLOCK_V], 0, tl.float32)
    best = tl.full([], neg_inf, tl.float32)
    lane_s = tl.full([BLOCK_V], neg_inf, tl.float32)
    lane_idx = tl.full([BLOCK_V], 0, tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + offs0
        mask = offs < V
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = tl.math.div_rn(x - M, t)
        zk = tl.where(mask & (_key(z) <= W), z, neg_inf)
        lane_mass += tl.exp(zk)
        # No token of a skipped tile can reach the best score: each scores z + G <= max z + GUMBEL_MAX.
        zk_max = tl.max(zk)
        if draw & (zk_max > neg_inf) & (zk_max + GUMBEL_MAX >= best):
            score = zk + gumbel_from_words(token_words(k0, k1, step, _STREAM_TOKEN, start, BLOCK_V))
            up = score > lane_s
            lane_s = tl.where(up, score, lane_s)
            lane_idx = tl.where(up, offs, lane_idx)
            best = tl.maximum(best, tl.max(score))
    drawn = tl.min(tl.where(lane_s == best, lane_idx, 2147483647))
    return tl.sum(lane_mass), drawn


@triton.jit
def _compact(finish_ptr, active_idx_ptr, num_active_ptr, B, BLOCK_B: tl.constexpr):
    """Order-preserving indices of the running rows, padded with -1, and their count."""
    offs0 = tl.arange(0, BLOCK_B)
    count = tl.full([], 0, tl.int32)
    for start in range(0, B, BLOCK_B):
        offs = start + offs0
        mask = offs < B
        # volatile: other programs wrote these; never serve them from a stale cache line.
        fr = tl.load(finish_ptr + offs, mask=mask, other=1, volatile=True)
        run = (fr == 0) & mask
        pos = count + tl.cumsum(run.to(tl.int32), 0) - 1
        tl.store(active_idx_ptr + pos, offs.to(tl.int64), mask=run)
        count += tl.sum(run.to(tl.int32))
    for start in range(0, B, BLOCK_B):
        offs = start + offs0
        tl.store(active_idx_ptr + offs, tl.full([BLOCK_B], -1, tl.int64), mask=(offs < B) & (offs >= count))
    tl.store(num_active_ptr, count.to(tl.int64))


@triton.jit
def _decode_step_kernel(
    logits_ptr, stride_l,  # [B, V] fp32 | bf16 | fp16, unit column stride
    hidden_ptr, stride_h,  # [B, d] any float (unused without a head)
    temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr,  # [B] f32, i32, f32, f32, i64
    cost_ptr, patience_ptr, min_new_ptr, max_new_ptr, budget_ptr,  # [B] f32, i32 x4
    eos_ptr, E, exit_ptr, X, exit_len_ptr,  # [B, E] i32, [B, X] i32, [B] i32
    num_generated_ptr, think_tokens_ptr, below_count_ptr, phase_ptr,  # [B] i32, updated in place
    forced_pos_ptr, think_end_ptr, finish_ptr,  # [B] i32, updated in place
    w1_ptr, b1_ptr, w2_ptr, b2_ptr, d, R,  # [R, d + 2], [R], [R] or [0], [1]: one float dtype
    tokens_ptr, logprobs_ptr, values_ptr,  # [B] i64, f32, f32 outputs
    active_idx_ptr, num_active_ptr, ticket_ptr,  # [B] i64, [] i64 outputs; [1] i32, zero between launches
    B, V,
    HAS_HEAD: tl.constexpr, IS_MLP: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr, NT: tl.constexpr,
):
    row = tl.program_id(0)
    token = tl.full([], -1, tl.int32)
    logprob = tl.full([], float("nan"), tl.float32)
    value = tl.full([], float("nan"), tl.float32)
    finish = tl.load(finish_ptr + row)
    if finish == 0:
        n = tl.load(num_generated_ptr + row)
        think_tokens = tl.load(think_tokens_ptr + row)
        below_count = tl.load(below_count_ptr + row)
        phase = tl.load(phase_ptr + row)
        forced_pos = tl.load(forced_pos_ptr + row)
        think_end = tl.load(think_end_ptr + row)
        lam = tl.load(cost_ptr + row)
        budget = tl.load(budget_ptr + row)
        max_new = tl.load(max_new_ptr + row)
        exit_len = tl.load(exit_len_ptr + row)
        row64 = row.to(tl.int64)

        # 2. Value.
        if HAS_HEAD:
            value = _value_head(hidden_ptr + row64 * stride_h, w1_ptr, b1_ptr, w2_ptr, b2_ptr, d, R, n,
                                tl.where(budget > 0, budget, max_new), IS_MLP, BLOCK_D, BLOCK_R)

        # 3. Thinking-phase exits: nothing here depends on the logits, whose check comes next and
        # only turns the row into an ERROR (which leaves every other state field alone).
        value_bad, new_below, think_exit, think_reason, switch, stop_now, fpos, forcing, emit, draw = plan_rules(
            finish == 0, value, n, think_tokens, below_count, phase, forced_pos, lam,
            tl.load(min_new_ptr + row), tl.load(patience_ptr + row), budget, exit_len)

        # 1. Row check (with pass 1), skipped when a value error already ends the row.
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
        x_ptr = logits_ptr + row64 * stride_l
        logits_bad = tl.full([], 0, tl.int1)
        if value_bad == 0:
            n_bad, M, arg, sum_exp, certified, drawn = _scan_row(x_ptr, V, t, plain & draw, k0, k1, n, BLOCK_V)
            logits_bad = (n_bad > 0) | (M == float("-inf"))
            emit = emit & ~logits_bad
            draw = draw & ~logits_bad
            forcing = forcing & ~logits_bad
            if emit:
                # 4. Token and its log-probability under the kept set z >= tau (key <= W).
                W = tl.full([], _INF_KEY, tl.int32)
                mass = sum_exp
                token = tl.where(greedy, arg, drawn)
                if (~greedy & ~plain) | (plain & draw & ~certified):
                    if k_on:
                        W = _search_threshold(x_ptr, V, M, t, W, top_k.to(tl.float32), 0.0,
                                              False, BLOCK_V, NT)
                    if p_on:
                        W = _search_threshold(x_ptr, V, M, t, W, tl.full([], -1.0, tl.float32), top_p,
                                              True, BLOCK_V, NT)
                    if m_on:
                        W = tl.minimum(W, _key(tl.log(min_p)))
                    mass, token = _draw_pass(x_ptr, V, M, t, W, draw, k0, k1, n, BLOCK_V)
                if forcing:
                    token = tl.load(exit_ptr + row64 * X + fpos)
                z_tok = tl.math.div_rn(tl.load(x_ptr + token).to(tl.float32) - M, t)
                logprob = tl.where(_key(z_tok) <= W, z_tok - tl.log(mass), float("-inf"))

        # 5. State updates.
        bad = value_bad | logits_bad
        is_eos = is_eos_token(eos_ptr + row64 * E, E, token, BLOCK_E)
        n, think_tokens, below_count, phase, forced_pos, think_end, finish = after_rules(
            bad, emit, draw, forcing, stop_now, switch, think_exit, think_reason, new_below, fpos, token, is_eos,
            tl.load(exit_ptr + row64 * X), n, think_tokens, below_count, phase, forced_pos, think_end, finish,
            exit_len, max_new)
        tl.store(num_generated_ptr + row, n)
        tl.store(think_tokens_ptr + row, think_tokens)
        tl.store(below_count_ptr + row, below_count)
        tl.store(phase_ptr + row, phase)
        tl.store(forced_pos_ptr + row, forced_pos)
        tl.store(think_end_ptr + row, think_end)
        tl.store(finish_ptr + row, finish)
        token = tl.where(emit, token, -1)
    tl.store(tokens_ptr + row, token.to(tl.int64))
    tl.store(logprobs_ptr + row, logprob)
    tl.store(values_ptr + row, value)

    # 6. Compaction by the last program to finish.
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == B - 1:
        _compact(finish_ptr, active_idx_ptr, num_active_ptr, B, BLOCK_B)
        tl.store(ticket_ptr, 0)


_tickets: dict[tuple, torch.Tensor] = {}


def _ticket(device: torch.device) -> torch.Tensor:
    """The launch counter of ``device``'s current stream: zero between launches (the last program
    resets it), so it is allocated once, outside any captured graph, and never cleared by the host."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    buf = _tickets.get(key)
    if buf is None:
        buf = _tickets[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return buf


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def decode_step(
    logits: torch.Tensor,
    hidden: torch.Tensor | None,
    requests: RequestBatch,
    state: DecodeState,
    head: HeadWeights | None,
    *,
    out: StepOutput | None = None,
    block_v: int | None = None,
) -> StepOutput:
    """One fused decode step in a single Triton launch (state updated in place, no host sync).

    Inputs are validated by :func:`haltkit.decode_step`, which calls this; semantics are the
    reference's (:mod:`haltkit.reference.decode_step`).

    Args:
        logits: [B, V] float32 | bfloat16 | float16 with unit column stride.
        hidden: [B, d] float32 | bfloat16 | float16 with unit column stride, or None without a head.
        requests: the packed requests, [B] tensors (and [B, E], [B, X]) on the logits' device.
        state: [B] int32 contiguous tensors, updated in place.
        head: the value head's weights (one float dtype), or None.
        out: preallocated outputs to write into (tests poison them to catch unwritten elements);
            default: fresh tensors.
        block_v: vocabulary tile size, a power of two >= 16 (tests use small tiles so short rows
            still span several); default min(1024, next power of two of V).
    Returns:
        A :class:`StepOutput`.
    Raises:
        ValueError: a state tensor is not contiguous (it is updated in place, so it cannot be copied).
    """
    B, V = logits.shape
    dev = logits.device
    for name, t in zip(("num_generated", "think_tokens", "below_count", "phase", "forced_pos",
                        "think_end", "finish_reason"), state.tensors()):
        if not t.is_contiguous():
            raise ValueError(f"state.{name} must be contiguous (it is updated in place), got stride {t.stride()}")
    r = RequestBatch(*(t.contiguous() for t in requests.tensors()))
    if out is None:
        out = StepOutput(
            torch.empty(B, dtype=torch.int64, device=dev), torch.empty(B, dtype=torch.float32, device=dev),
            torch.empty(B, dtype=torch.float32, device=dev), torch.empty(B, dtype=torch.int64, device=dev),
            torch.empty((), dtype=torch.int64, device=dev),
        )
    if B == 0:  # nothing to launch (a grid of zero programs would never reset the ticket)
        out.num_active.zero_()
        return out
    if head is not None:
        w1, b1, w2, b2 = (t.contiguous() for t in head)
        R, d = w1.shape[0], w1.shape[1] - 2
        h, stride_h = hidden, hidden.stride(0)
    else:
        w1 = b1 = w2 = b2 = h = logits  # never read: HAS_HEAD is False
        R, d, stride_h = 1, 1, 0
    if block_v is None:
        block_v = _pow2(V, 16, 1024)
    elif block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two >= 16, got {block_v}")
    E, X = r.eos_ids.shape[1], r.exit_tokens.shape[1]
    _decode_step_kernel[(B,)](
        logits, logits.stride(0), h, stride_h,
        r.temperature, r.top_k, r.top_p, r.min_p, r.seed,
        r.cost_of_time, r.patience, r.min_new_tokens, r.max_new_tokens, r.thinking_budget,
        r.eos_ids, E, r.exit_tokens, X, r.exit_len,
        *state.tensors(),
        w1, b1, w2, b2, d, R,
        *out, _ticket(dev),
        B, V,
        HAS_HEAD=head is not None, IS_MLP=head is not None and head.is_mlp,
        BLOCK_V=block_v, BLOCK_D=_pow2(d, 16, 256), BLOCK_R=_pow2(R, 2, 32),
        BLOCK_E=_pow2(E, 2, 16), BLOCK_B=_pow2(B, 16, 1024), NT=16,
        num_warps=8,
    )
    return out
