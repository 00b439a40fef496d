"""An independent per-row model of the decode_step specification, in plain Python.

Written from the docstring of ``haltkit/reference/decode_step.py`` and the documented fields of
``SamplingParams`` / ``ExitPolicy`` / ``DecodeState`` / ``StepOutput``, not from the reference's
vectorised code: one row at a time, scalar loops and sorted lists.

Arithmetic follows what the specification fixes and nothing more:

* ``z = (x - max) / T`` is float32 (the Gumbel-max argmax of ``z + G`` is compared exactly, so it
  is computed with the same IEEE float32 operations: ``numpy.float32`` scalars);
* masses, log-probabilities and the head's value are float64 (compared with a tolerance);
* where float32 rounding in the reference could legitimately fall either way (a top-p target
  within 1e-5 of a cumulative mass, a z within 1e-6 of log(min_p), a value within its rounding
  bound of the price of time), the model lists both outcomes and the caller lets the reference's
  observable output pick one; anything outside that list is a disagreement.

The Gumbel noise is an input: the specification names it (Philox keyed by (seed; token, step,
STREAM_TOKEN)), and Philox itself is held to its known-answer vectors in ``test_philox.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from haltkit import ExitPolicy, Reason, SamplingParams

F32 = np.float32
NAN = math.nan
#: Relative slack within which float32 and float64 top-p / min-p decisions may differ.
MASS_EPS = 1e-5
LOGIT_EPS = 1e-6


def f32(x: float) -> float:
    """x rounded to float32, as the packed request tensors hold it."""
    return float(F32(x))


@dataclass(frozen=True)
class RowRequest:
    """One request with its float fields rounded to float32 (as :func:`pack_requests` stores them)."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    seed: int
    cost_of_time: float | None
    patience: int
    min_new_tokens: int
    max_new_tokens: int
    eos: tuple[int, ...]
    thinking_budget: int | None
    exit_tokens: tuple[int, ...]

    @classmethod
    def of(cls, s: SamplingParams, e: ExitPolicy) -> "RowRequest":
        return cls(
            f32(s.temperature), s.top_k, f32(s.top_p), f32(s.min_p), s.seed,
            None if e.cost_of_time is None else f32(e.cost_of_time),
            e.patience, e.min_new_tokens, e.max_new_tokens, tuple(e.eos_token_ids),
            e.thinking_budget, tuple(e.exit_tokens),
        )


@dataclass
class RowState:
    """The documented DecodeState fields of one row."""

    num_generated: int = 0
    think_tokens: int = 0
    below_count: int = 0
    phase: int = 0
    forced_pos: int = 0
    think_end: int = int(Reason.NONE)
    finish_reason: int = int(Reason.NONE)

    def as_tuple(self) -> tuple[int, ...]:
        return (self.num_generated, self.think_tokens, self.below_count, self.phase,
                self.forced_pos, self.think_end, self.finish_reason)


@dataclass
class RowOutput:
    token: int = -1
    logprob: float = NAN
    value: float = NAN
    #: every (token, logprob) the specification allows, when float rounding leaves a choice
    allowed: list[tuple[int, float]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# The value head, in float64.
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadModel:
    """The head's weights as float64 lists: w1 [R][d+2], b1 [R], w2 [R] or [] (linear), b2."""

    w1: list[list[float]]
    b1: list[float]
    w2: list[float]
    b2: float

    @classmethod
    def of(cls, weights) -> "HeadModel":
        w1, b1, w2, b2 = (t.detach().double().tolist() for t in weights)
        return cls(w1, b1, w2, b2[0])

    def value(self, h: list[float], n: int, budget: int) -> tuple[float, float]:
        """(value, rounding bound of a float32 evaluation) for hidden h after n tokens."""
        x = list(h) + [math.log1p(n), n / budget]
        pre, mag = [], []
        for w, b in zip(self.w1, self.b1):
            pre.append(sum(wi * xi for wi, xi in zip(w, x)) + b)
            mag.append(sum(abs(wi * xi) for wi, xi in zip(w, x) if math.isfinite(wi * xi)) + abs(b))
        if not self.w2:
            return pre[0], 1e-5 * (1 + mag[0])
        # ReLU that lets NaN through, as torch.relu does.
        act = [p if (p > 0 or p != p) else 0.0 for p in pre]
        v = sum(a * w for a, w in zip(act, self.w2)) + self.b2
        bound = 1e-5 * (1 + sum(abs(w) * m for w, m in zip(self.w2, mag)) + abs(self.b2))
        return v, bound


# ------------------------------------------------------------------------------------------------
# Sampling: scaled logits, the kept set, the draw and the log-probability.
# ------------------------------------------------------------------------------------------------

def row_is_bad(x: list[float]) -> bool:
    """Step 1: NaN or +inf anywhere, or no finite entry."""
    return any(v != v or v == math.inf for v in x) or all(v == -math.inf for v in x)


def scaled(x: list[float], temperature: float) -> list[float]:
    """z_i = (x_i - max x) / T in float32 (T = 1 for greedy rows)."""
    m = F32(max(x))
    t = F32(temperature if temperature > 0 else 1.0)
    return [float((F32(v) - m) / t) for v in x]


def top_p_threshold(z: list[float], floor: float, top_p: float, target_scale: float) -> float:
    """The largest distinct z value v with mass(z >= v) >= target (masses of exp(z) over z >= floor).

    ``target_scale`` nudges the target to either side of float rounding; when no value reaches the
    nudged target, every survivor of the floor is kept.
    """
    values = sorted({v for v in z if v >= floor}, reverse=True)
    mass = {v: 0.0 for v in values}
    for v in z:
        if v >= floor:
            mass[v] += math.exp(v)
    total = sum(mass.values())
    target = top_p * total * target_scale
    cum = 0.0
    for v in values:
        cum += mass[v]
        if cum >= target:
            return v
    return floor


def kept_sets(z: list[float], req: RowRequest) -> list[set[int]]:
    """The kept set(s) of a sampled row: one set, or two where float rounding may decide.

    Greedy rows keep every token (their distribution is the model's softmax, filters ignored).
    """
    V = len(z)
    if req.temperature == 0:
        return [set(range(V))]
    desc = sorted(z, reverse=True)
    tau_k = desc[req.top_k - 1] if 0 < req.top_k < V else -math.inf
    if req.top_p < 1:
        # Fewer kept when the reference's target rounds down, more when it rounds up.
        tau_p_hi = top_p_threshold(z, tau_k, req.top_p, 1 - MASS_EPS)
        tau_p_lo = top_p_threshold(z, tau_k, req.top_p, 1 + MASS_EPS)
    else:
        tau_p_hi = tau_p_lo = -math.inf
    if req.min_p > 0:
        tau_m = math.log(req.min_p)
        slack = LOGIT_EPS * max(1.0, abs(tau_m))
        tau_m_hi, tau_m_lo = tau_m + slack, tau_m - slack
    else:
        tau_m_hi = tau_m_lo = -math.inf
    # The row maximum (z = 0) is always kept: every threshold is <= 0.
    tau_hi = min(0.0, max(tau_k, tau_p_hi, tau_m_hi))
    tau_lo = min(0.0, max(tau_k, tau_p_lo, tau_m_lo))
    certain = {i for i in range(V) if z[i] >= tau_hi}
    possible = {i for i in range(V) if z[i] >= tau_lo}
    return [certain] if certain == possible else [certain, possible]


def logprob(z: list[float], kept: set[int], token: int) -> float:
    """log of the token's probability under the kept set renormalised; -inf outside it."""
    if token not in kept:
        return -math.inf
    return z[token] - math.log(sum(math.exp(z[i]) for i in kept))


def gumbel_argmax(z: list[float], noise: list[float], kept: set[int]) -> int:
    """First index of the largest float32 z_i + G_i over the kept set."""
    best, best_score = -1, -math.inf
    for i in sorted(kept):
        s = float(F32(z[i]) + F32(noise[i]))
        if best < 0 or s > best_score:
            best, best_score = i, s
    return best


def first_argmax(x: list[float]) -> int:
    m = max(x)
    return next(i for i, v in enumerate(x) if v == m)


# ------------------------------------------------------------------------------------------------
# One step of one row.
# ------------------------------------------------------------------------------------------------

def model_step(
    req: RowRequest,
    st: RowState,
    x: list[float],
    h: list[float] | None,
    head: HeadModel | None,
    noise: list[float],
    ref_value: float,
    ref_token: int,
) -> RowOutput:
    """Advance ``st`` by one step of the specification and return what the row emits.

    Args:
        req, st: the row's request and state (``st`` is updated in place).
        x: the row's logits as float32 values (python floats).
        h: the row's hidden state, or None without a head.
        head: the value head in float64, or None.
        noise: Gumbel noise of this row at this step, one float32 per token.
        ref_value: the reference's float32 value, used only to settle a comparison with the
            price of time that lies within float32 rounding of it.
        ref_token: the reference's token, used only to pick among outcomes float rounding allows.
    """
    out = RowOutput()
    if st.finish_reason != Reason.NONE:
        return out  # finished rows: nothing emitted, nothing changes, value NaN
    n = st.num_generated
    budget = req.thinking_budget or req.max_new_tokens
    v, bound = head.value(h, n, budget) if head is not None else (NAN, 0.0)
    out.value = v
    if row_is_bad(x):
        st.finish_reason = int(Reason.ERROR)
        return out

    if st.phase == 0:
        lam = req.cost_of_time
        if lam is not None and not math.isfinite(v):
            st.finish_reason = int(Reason.ERROR)
            return out
        if lam is not None and n >= req.min_new_tokens:
            below = ref_value < lam if abs(v - lam) <= bound else v < lam
        else:
            below = False
        st.below_count = st.below_count + 1 if below else 0
        exit_reason = None
        if st.below_count >= req.patience:
            exit_reason = Reason.VALUE
        elif req.thinking_budget is not None and st.think_tokens >= req.thinking_budget:
            exit_reason = Reason.BUDGET
        if exit_reason is not None:
            st.think_end = int(exit_reason)
            if not req.exit_tokens:
                st.finish_reason = int(exit_reason)
                return out
            st.phase, st.forced_pos = 1, 0

    z = scaled(x, req.temperature)
    variants = kept_sets(z, req)
    if st.phase == 1 and st.forced_pos < len(req.exit_tokens):
        token = req.exit_tokens[st.forced_pos]
        st.forced_pos += 1
        out.allowed = [(token, logprob(z, kept, token)) for kept in variants]
    else:
        if req.temperature == 0:
            t = first_argmax(x)
            out.allowed = [(t, logprob(z, variants[0], t))]
        else:
            out.allowed = [(t, logprob(z, kept, t)) for kept in variants for t in [gumbel_argmax(z, noise, kept)]]
        token = next((t for t, _ in out.allowed if t == ref_token), out.allowed[0][0])
        if st.phase == 0 and req.exit_tokens and token == req.exit_tokens[0]:
            st.phase, st.forced_pos, st.think_end = 1, len(req.exit_tokens), int(Reason.MODEL)
    out.token = token
    out.logprob = next(lp for t, lp in out.allowed if t == token)

    st.num_generated = n + 1
    if st.phase == 0:  # neither switched nor closed by this token: a thinking token
        st.think_tokens += 1
    if token in req.eos:
        st.finish_reason = int(Reason.EOS)
    elif st.num_generated >= req.max_new_tokens:
        st.finish_reason = int(Reason.LENGTH)
    return out


def compaction(states: list[RowState]) -> tuple[list[int], int]:
    """Indices of rows still running, in order, padded with -1 to the batch size; their count."""
    running = [i for i, s in enumerate(states) if s.finish_reason == Reason.NONE]
    return running + [-1] * (len(states) - len(running)), len(running)
