"""The decode_step specification, tested two ways.

1. The reference (``haltkit.reference.decode_step``) against an independent per-row model of its
   docstring (``decode_step_model.py``: plain Python, scalar loops, sorted lists) over hundreds of
   random multi-step scenarios driven by hypothesis, compared after every step: tokens, values
   and log-probs (tolerance), the full state, finish / think-end reasons and compaction, with and
   without the caller shrinking the batch.
2. Hand-written behaviours, each stated with its expected numbers, run on every backend
   available here (so a new backend inherits them).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import haltkit
from haltkit import DecodeState, ExitPolicy, HeadWeights, Reason, SamplingParams, pack_requests
from haltkit.reference.decode_step import decode_step as reference_step
from haltkit.reference.philox import STREAM_TOKEN, gumbel_from_words, random_words

from step_fixtures import backend, one_intra_op_thread  # noqa: F401  (fixtures)
from conftest import TOL
from decode_step_model import HeadModel, RowRequest, RowState, compaction, model_step

NONE, EOS, LENGTH, VALUE, BUDGET, ERROR, MODEL = (int(r) for r in Reason)
STATE_FIELDS = ("num_generated", "think_tokens", "below_count", "phase", "forced_pos", "think_end", "finish_reason")


# ------------------------------------------------------------------------------------------------
# 1. Reference against the per-row model, over random scenarios.
# ------------------------------------------------------------------------------------------------

#: Row kinds of a step's logits; repeats weight the draw towards ordinary rows.
LOGIT_KINDS = ["normal"] * 4 + ["grid"] * 3 + ["masked"] * 2 + [
    "flat", "peak_exit", "peak_eos", "one_finite", "nan", "posinf", "all_neginf",
]
HIDDEN_KINDS = ["normal"] * 12 + ["nan", "inf"]
D_MODEL = 4


@st.composite
def requests_for(draw, V: int, has_head: bool) -> tuple[SamplingParams, ExitPolicy]:
    tokens = st.integers(0, V - 1)
    samp = SamplingParams(
        temperature=draw(st.sampled_from([0.0, 0.5, 1.0, 1.7])),
        top_k=draw(st.sampled_from([0, 2, 3, 1, V, V + 3])),
        top_p=draw(st.sampled_from([1.0, 0.5, 0.9, 0.2, 0.75])),
        min_p=draw(st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0])),
        seed=draw(st.integers(0, 2**63 - 1)),
    )
    # Without a head a price of time ends the row with ERROR: keep that rare so rows live on.
    prices = [None, -1.0, 0.0, 0.3, 1.0] if has_head else [None] * 7 + [0.3]
    exits = ExitPolicy(
        cost_of_time=draw(st.sampled_from(prices)),
        patience=draw(st.integers(1, 3)),
        min_new_tokens=draw(st.integers(0, 3)),
        max_new_tokens=draw(st.integers(1, 12)),
        eos_token_ids=tuple(draw(st.lists(tokens, max_size=2))),
        thinking_budget=draw(st.one_of(st.none(), st.integers(1, 6))),
        exit_tokens=tuple(draw(st.lists(tokens, max_size=3))),
    )
    return samp, exits


@st.composite
def scenarios(draw) -> dict:
    V = draw(st.sampled_from([1, 2, 3, 7, 16, 33]))
    B = draw(st.integers(1, 6))
    steps = draw(st.integers(1, 10))
    head = draw(st.sampled_from(["linear", "mlp", "none"]))
    return dict(
        V=V,
        requests=[draw(requests_for(V, head != "none")) for _ in range(B)],
        steps=steps,
        head=head,
        head_dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        logits_dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        shrink=draw(st.booleans()),
        logit_kinds=draw(st.lists(st.sampled_from(LOGIT_KINDS), min_size=B * steps, max_size=B * steps)),
        hidden_kinds=draw(st.lists(st.sampled_from(HIDDEN_KINDS), min_size=B * steps, max_size=B * steps)),
        data_seed=draw(st.integers(0, 2**32 - 1)),
    )


def scenario_logits(kind: str, V: int, req: RowRequest, rng: np.random.Generator) -> np.ndarray:
    x = rng.normal(0.0, 2.0, V)
    if kind == "grid":  # coarse values: ties everywhere
        x = rng.integers(-3, 2, V) * 0.5
    elif kind == "masked":
        x[rng.random(V) < 0.4] = -math.inf
        x[rng.integers(V)] = rng.normal()
    elif kind == "flat":
        x[:] = 0.25
    elif kind == "peak_exit" and req.exit_tokens:
        x[req.exit_tokens[0]] = 30.0
    elif kind == "peak_eos" and req.eos:
        x[req.eos[0]] = 30.0
    elif kind == "one_finite":
        x[:] = -math.inf
        x[rng.integers(V)] = 1.0
    elif kind == "nan":
        x[rng.integers(V)] = math.nan
    elif kind == "posinf":
        x[rng.integers(V)] = math.inf
    elif kind == "all_neginf":
        x[:] = -math.inf
    return x


def scenario_head(kind: str, dtype: torch.dtype, gen: torch.Generator) -> HeadWeights | None:
    if kind == "none":
        return None
    head = haltkit.MarginalValueHead(D_MODEL, hidden=3 if kind == "mlp" else 0, dtype=dtype)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.6)
    return head.weights()


def assert_close_or_same_nonfinite(got: float, want: float, rtol: float, atol: float, what: str) -> None:
    if math.isnan(want) or math.isinf(want):
        assert (math.isnan(got) and math.isnan(want)) or got == want, f"{what}: got {got}, want {want}"
    else:
        assert abs(got - want) <= atol + rtol * abs(want), f"{what}: got {got}, want {want}"


def run_scenario(sc: dict) -> None:
    V, steps = sc["V"], sc["steps"]
    rows = list(range(len(sc["requests"])))  # original index of each row of the current batch
    model_req = [RowRequest.of(s, e) for s, e in sc["requests"]]
    model_state = [RowState() for _ in rows]
    requests = pack_requests([s for s, _ in sc["requests"]], [e for _, e in sc["requests"]], V)
    state = DecodeState.new(len(rows))
    gen = torch.Generator().manual_seed(sc["data_seed"])
    head = scenario_head(sc["head"], sc["head_dtype"], gen)
    head_model = HeadModel.of(head) if head is not None else None
    rng = np.random.default_rng(sc["data_seed"])
    B0 = len(rows)
    rtol, atol = TOL[sc["logits_dtype"]]

    for step in range(steps):
        B = len(rows)
        x = np.stack([scenario_logits(sc["logit_kinds"][step * B0 + r], V, model_req[r], rng) for r in rows])
        logits = torch.tensor(x, dtype=torch.float32).to(sc["logits_dtype"])
        h = rng.normal(0.0, 1.0, (B, D_MODEL))
        for b, r in enumerate(rows):
            kind = sc["hidden_kinds"][step * B0 + r]
            if kind != "normal":
                h[b, rng.integers(D_MODEL)] = math.nan if kind == "nan" else math.inf
        hidden = torch.tensor(h, dtype=torch.float32) if head is not None else None

        out = reference_step(logits, hidden, requests, state, head)

        # The model draws its noise from its own step counters.
        seeds = torch.tensor([model_req[r].seed for r in rows], dtype=torch.int64)
        counters = torch.tensor([model_state[r].num_generated for r in rows], dtype=torch.int64)
        noise = gumbel_from_words(random_words(seeds, counters, STREAM_TOKEN, V)).tolist()
        xs = logits.float().tolist()
        for b, r in enumerate(rows):
            where = f"step {step}, row {b} (request {r})"
            got = model_step(
                model_req[r], model_state[r], xs[b], None if hidden is None else h[b].tolist(),
                head_model, noise[b], float(out.values[b]), int(out.tokens[b]),
            )
            assert int(out.tokens[b]) == got.token, f"{where}: token {int(out.tokens[b])}, model {got.token} of {got.allowed}"
            assert_close_or_same_nonfinite(float(out.logprobs[b]), got.logprob, rtol, atol, f"{where} logprob")
            _, bound = head_model.value(h[b].tolist(), 0, 1) if head_model else (0, 0)
            assert_close_or_same_nonfinite(float(out.values[b]), got.value, 1e-5, 2 * bound, f"{where} value")
            ref_row = tuple(int(getattr(state, f)[b]) for f in STATE_FIELDS)
            assert ref_row == model_state[r].as_tuple(), f"{where}: state {ref_row}, model {model_state[r].as_tuple()}"
        want_idx, want_num = compaction([model_state[r] for r in rows])
        assert out.active_idx.tolist() == want_idx and int(out.num_active) == want_num, f"step {step}: compaction"

        if sc["shrink"]:
            keep = out.active_idx[: int(out.num_active)]
            if keep.numel() == 0:
                return
            rows = [rows[i] for i in keep.tolist()]
            requests, state = requests.index_select(keep), state.index_select(keep)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenarios())
def test_reference_matches_row_model_on_random_scenarios(sc):
    run_scenario(sc)


# ------------------------------------------------------------------------------------------------
# 2. Behaviours, on every backend available here.
# ------------------------------------------------------------------------------------------------

#: A linear head that returns hidden[:, 0] exactly, so a test sets each row's value directly.
VALUE_PROBE = HeadWeights(
    torch.tensor([[1.0, 0.0, 0.0]]), torch.zeros(1), torch.zeros(0), torch.zeros(1)
)


class Run:
    """A batch decoded step by step on one backend, with a trace of every output and state."""

    def __init__(self, backend, samp, exits, V: int, batch_size: int | None = None):
        self.name, self.dev = backend
        self.V = V
        self.req = pack_requests(samp, exits, V, batch_size, device=self.dev)
        self.state = DecodeState.new(self.req.batch_size, self.dev)
        self.outs: list[haltkit.StepOutput] = []
        self.states: list[dict[str, list[int]]] = []

    def step(self, logits: torch.Tensor, values: list[float] | None = None) -> haltkit.StepOutput:
        hidden = None if values is None else torch.tensor(values, dtype=torch.float32, device=self.dev)[:, None]
        head = None if values is None else HeadWeights(*(t.to(self.dev) for t in VALUE_PROBE))
        out = haltkit.decode_step(logits.to(self.dev), hidden, self.req, self.state, head, backend=self.name)
        out = haltkit.StepOutput(*(t.cpu() for t in out))
        self.outs.append(out)
        self.states.append({f: getattr(self.state, f).tolist() for f in STATE_FIELDS})
        return out

    def tokens(self, row: int) -> list[int]:
        return [int(o.tokens[row]) for o in self.outs]

    def trace(self, field: str, row: int) -> list[int]:
        return [s[field][row] for s in self.states]


def peaked(B: int, V: int, tokens: list[int], margin: float = 30.0) -> torch.Tensor:
    """Logits whose every row has one token ``margin`` above the rest (rest: small noise).

    A margin above 19.5 makes even sampled rows deterministic: Philox Gumbel noise lies in
    [-2.81, 16.6], so no other token can overtake the peak.
    """
    x = torch.rand(B, V) * 0.1
    x[torch.arange(B), torch.tensor(tokens)] = margin
    return x


def test_value_exit_respects_patience(backend):
    V = 16
    run = Run(backend, SamplingParams(temperature=0.0),
              [ExitPolicy(cost_of_time=0.5, patience=3), ExitPolicy(cost_of_time=0.5, patience=1)], V)
    values = [0.1, 0.1, 0.9, 0.1, 0.1, 0.1]
    for v in values:
        run.step(peaked(2, V, [1, 1]), [v, v])
    assert run.trace("below_count", 0) == [1, 2, 0, 1, 2, 3]
    assert run.trace("finish_reason", 0) == [NONE] * 5 + [VALUE]
    assert run.tokens(0) == [1, 1, 1, 1, 1, -1]  # the exit step emits nothing
    assert run.trace("think_end", 0)[-1] == VALUE and run.state.num_generated[0] == 5
    assert run.tokens(1) == [-1] * 6 and run.trace("finish_reason", 1)[0] == VALUE
    assert [float(o.values[0]) for o in run.outs] == pytest.approx(values)
    assert math.isnan(float(run.outs[1].values[1]))  # finished rows report no value


def test_min_new_tokens_delays_value_exits(backend):
    V = 16
    run = Run(backend, SamplingParams(temperature=0.0),
              [ExitPolicy(cost_of_time=0.5, patience=1, min_new_tokens=3), ExitPolicy(cost_of_time=0.5, patience=1)], V)
    for _ in range(4):
        run.step(peaked(2, V, [2, 2]), [0.1, 0.1])
    assert run.trace("below_count", 0) == [0, 0, 0, 1]
    assert run.tokens(0) == [2, 2, 2, -1] and run.trace("finish_reason", 0) == [NONE] * 3 + [VALUE]
    assert run.tokens(1)[0] == -1 and run.trace("finish_reason", 1)[0] == VALUE


def test_budget_exit_forces_exit_tokens_starting_that_step(backend):
    V = 16
    exits = [
        ExitPolicy(thinking_budget=2, exit_tokens=(7, 8, 9), max_new_tokens=20),
        ExitPolicy(cost_of_time=0.5, patience=2, exit_tokens=(7, 8, 9), max_new_tokens=20),
    ]
    run = Run(backend, [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=5)], exits, V)
    nan = math.nan
    # Row 1 exits on value at step 1; afterwards its head is not consulted, so NaN values are fine.
    for values in ([0.1, 0.1], [0.1, 0.1], [0.1, nan], [0.1, nan], [0.1, nan], [0.1, nan]):
        run.step(peaked(2, V, [1, 1]), values)
    assert run.tokens(0) == [1, 1, 7, 8, 9, 1]
    assert run.trace("think_end", 0) == [NONE, NONE] + [BUDGET] * 4
    assert run.trace("phase", 0) == [0, 0, 1, 1, 1, 1]
    assert run.trace("forced_pos", 0) == [0, 0, 1, 2, 3, 3]
    assert run.trace("think_tokens", 0) == [1, 2, 2, 2, 2, 2]
    assert run.tokens(1) == [1, 7, 8, 9, 1, 1]
    assert run.trace("think_end", 1) == [NONE] + [VALUE] * 5
    assert run.trace("below_count", 1) == [1] + [2] * 5
    assert run.trace("finish_reason", 0) == run.trace("finish_reason", 1) == [NONE] * 6


def test_thinking_budget_counts_only_thinking_tokens(backend):
    V = 16
    exits = [ExitPolicy(thinking_budget=3, exit_tokens=(7, 8)), ExitPolicy(thinking_budget=3, exit_tokens=(5,))]
    run = Run(backend, SamplingParams(temperature=0.0), exits, V)
    for step in range(8):
        run.step(peaked(2, V, [1, 5 if step == 1 else 1]))
    assert run.tokens(0) == [1, 1, 1, 7, 8, 1, 1, 1]
    assert run.trace("think_tokens", 0) == [1, 2, 3, 3, 3, 3, 3, 3]  # forced and answer tokens not counted
    assert run.trace("think_end", 0)[-1] == BUDGET
    # Row 1 closes thinking itself at step 1: the closing token is not a thinking token, and no
    # budget exit follows however long the answer runs.
    assert run.tokens(1) == [1, 5, 1, 1, 1, 1, 1, 1]
    assert run.trace("think_tokens", 1) == [1] * 8
    assert run.trace("think_end", 1) == [NONE] + [MODEL] * 7
    assert run.state.num_generated.tolist() == [8, 8]


def test_model_closed_thinking_forces_nothing(backend):
    V = 16
    run = Run(backend, [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_p=0.9, seed=11)],
              ExitPolicy(exit_tokens=(5, 6), thinking_budget=10), V, 2)
    run.step(peaked(2, V, [1, 1]))
    run.step(peaked(2, V, [5, 5]))
    run.step(peaked(2, V, [3, 3]))
    for row in (0, 1):
        assert run.tokens(row) == [1, 5, 3]  # not 6: a model-closed thinking phase forces nothing
        assert run.trace("think_end", row) == [NONE, MODEL, MODEL]
        assert run.trace("phase", row) == [0, 1, 1]
        assert run.trace("forced_pos", row) == [0, 2, 2]


def test_forced_tokens_ignore_the_logits(backend):
    V = 16
    samp = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=1, seed=3), SamplingParams(seed=4)]
    run = Run(backend, samp, ExitPolicy(thinking_budget=1, exit_tokens=(7, 8)), V, 3)
    run.step(peaked(3, V, [2, 2, 2]))
    x = peaked(3, V, [2, 2, 2])
    x[:, 7] = x[:, 8] = -math.inf
    run.step(x)
    run.step(x)
    for row in range(3):
        assert run.tokens(row) == [2, 7, 8]
        assert [float(o.logprobs[row]) for o in run.outs[1:]] == [-math.inf, -math.inf]


def test_eos_is_kept_and_finishes(backend):
    V = 16
    exits = [ExitPolicy(eos_token_ids=(4,), min_new_tokens=5, cost_of_time=0.5),
             ExitPolicy(eos_token_ids=(2,), thinking_budget=1, exit_tokens=(7, 2, 9))]
    run = Run(backend, SamplingParams(temperature=0.0), exits, V, 2)
    for _ in range(3):
        run.step(peaked(2, V, [4, 1]), [1.0, 1.0])
    assert run.tokens(0) == [4, -1, -1]  # min_new_tokens never suppresses EOS
    assert run.trace("finish_reason", 0) == [EOS] * 3 and run.state.num_generated[0] == 1
    assert run.tokens(1) == [1, 7, 2]  # an EOS id among the forced tokens finishes too
    assert run.trace("finish_reason", 1) == [NONE, NONE, EOS]
    assert run.outs[-1].num_active == 0 and run.outs[-1].active_idx.tolist() == [-1, -1]


def test_length_limit_finishes_after_the_last_token(backend):
    V = 16
    exits = [ExitPolicy(max_new_tokens=3), ExitPolicy(max_new_tokens=2, thinking_budget=1, exit_tokens=(7, 8, 9))]
    run = Run(backend, SamplingParams(seed=9), exits, V, 2)
    for _ in range(4):
        run.step(peaked(2, V, [1, 1]))
    assert run.tokens(0) == [1, 1, 1, -1]
    assert run.trace("finish_reason", 0) == [NONE, NONE, LENGTH, LENGTH]
    assert run.tokens(1) == [1, 7, -1, -1]  # the length limit cuts forcing short
    assert run.trace("finish_reason", 1) == [NONE, LENGTH, LENGTH, LENGTH]
    assert run.state.num_generated.tolist() == [3, 2]


def _mixed_batch(V: int):
    samp = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, top_p=0.8, seed=1),
            SamplingParams(temperature=1.2, top_k=5, seed=2), SamplingParams(min_p=0.1, seed=3),
            SamplingParams(temperature=0.7, top_k=40, top_p=0.95, min_p=0.02, seed=4),
            SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=6)]
    exits = [ExitPolicy(cost_of_time=-5.0, max_new_tokens=50, thinking_budget=2, exit_tokens=(3, 4)),
             ExitPolicy(cost_of_time=-5.0, max_new_tokens=50)] * 3 + [ExitPolicy(max_new_tokens=50)]
    return samp, exits


@pytest.mark.parametrize("bad", ["nan", "posinf", "all_neginf", "nan_value"])
def test_error_row_is_isolated(backend, bad):
    V, B, row = 111, 7, 2
    samp, exits = _mixed_batch(V)
    full = Run(backend, samp, exits, V)
    rest = [b for b in range(B) if b != row]
    alone = Run(backend, [samp[b] for b in rest], [exits[b] for b in rest], V)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        x = torch.randn(B, V, generator=gen) * 3
        values = (torch.rand(B, generator=gen) + 0.5).tolist()
        if step == 1:
            if bad == "nan":
                x[row, 17] = math.nan
            elif bad == "posinf":
                x[row, 50] = math.inf
            elif bad == "all_neginf":
                x[row] = -math.inf
            else:
                values[row] = math.nan
        full.step(x, values)
        alone.step(x[rest], [values[b] for b in rest])
    for f_out, a_out in zip(full.outs, alone.outs):
        for name in ("tokens", "logprobs", "values"):
            torch.testing.assert_close(getattr(f_out, name)[rest], getattr(a_out, name), rtol=0, atol=0, equal_nan=True)
    for f_state, a_state in zip(full.states, alone.states):
        for f in STATE_FIELDS:
            assert [f_state[f][b] for b in rest] == a_state[f], f
    err = full.outs[1]
    assert int(err.tokens[row]) == -1 and math.isnan(float(err.logprobs[row]))
    assert full.trace("finish_reason", row) == [NONE, ERROR, ERROR]
    # The rest of the row's state is left as the step before left it.
    for f in STATE_FIELDS[:-1]:
        assert full.trace(f, row)[1] == full.trace(f, row)[0], f
    assert row not in full.outs[1].active_idx.tolist() and int(full.outs[1].num_active) == B - 1


def test_finished_rows_are_untouched(backend):
    V, B = 33, 5
    run = Run(backend, SamplingParams(seed=1), ExitPolicy(cost_of_time=0.5, exit_tokens=(3,)), V, B)
    before = torch.tensor([[4, 2, 1, 0, 0, 0, EOS], [9, 9, 0, 1, 1, VALUE, LENGTH], [5, 5, 2, 0, 0, 0, VALUE],
                           [1, 0, 0, 0, 0, 0, ERROR], [0, 0, 0, 0, 0, 0, NONE]], dtype=torch.int32)
    for i, f in enumerate(STATE_FIELDS):
        getattr(run.state, f).copy_(before[:, i].to(run.dev))
    x = torch.randn(B, V)
    x[0, 0], x[3] = math.nan, -math.inf  # bad logits in a finished row change nothing
    out = run.step(x, [0.0, 0.0, math.nan, 0.0, 2.0])
    for i, f in enumerate(STATE_FIELDS):
        assert getattr(run.state, f)[:4].tolist() == before[:4, i].tolist(), f
    assert out.tokens[:4].tolist() == [-1] * 4
    assert torch.isnan(out.logprobs[:4]).all() and torch.isnan(out.values[:4]).all()
    assert out.active_idx.tolist() == [4, -1, -1, -1, -1] and int(out.num_active) == 1


def _draws(backend, probs: list[float], **filters) -> tuple[list[int], list[float]]:
    """One step of 16 rows with identical logits log(probs) and seeds 0..15.

    Checks on these are exact: every token lies in the kept set and its log-probability is
    log(p / mass of the kept set), so a wrong kept set shows whichever token is drawn (whether
    every kept token gets drawn at the right rate is test_sampling_distribution's job).
    """
    V, rows = len(probs), 16
    run = Run(backend, [SamplingParams(seed=s, **filters) for s in range(rows)], ExitPolicy(), V)
    logits = torch.log(torch.tensor(probs, dtype=torch.float32)).expand(rows, V).contiguous()
    out = run.step(logits)
    return out.tokens.tolist(), out.logprobs.tolist()


def assert_drawn_from(tokens: list[int], lps: list[float], probs: list[float], kept: set[int]) -> None:
    assert set(tokens) <= kept, (tokens, kept)
    mass = sum(probs[i] for i in kept)
    assert lps == pytest.approx([math.log(probs[t] / mass) for t in tokens], abs=1e-5)


def test_top_k_keeps_ties_at_the_kth_value(backend):
    p = torch.softmax(torch.tensor([3.0, 3.0, 3.0, 1.0, 0.0], dtype=torch.float64), 0).tolist()
    assert_drawn_from(*_draws(backend, p, top_k=2), p, {0, 1, 2})  # mass of 3 ties, not 2
    assert_drawn_from(*_draws(backend, p, top_k=5 + 3), p, {0, 1, 2, 3, 4})  # top_k >= V keeps all


def test_top_p_keeps_the_smallest_set_reaching_p(backend):
    p = [0.5, 0.3, 0.15, 0.05]
    assert_drawn_from(*_draws(backend, p, top_p=0.75), p, {0, 1})
    assert_drawn_from(*_draws(backend, p, top_p=0.85), p, {0, 1, 2})
    assert_drawn_from(*_draws(backend, p, top_p=0.45), p, {0})


def test_min_p_keeps_tokens_at_least_min_p_times_the_top(backend):
    p = [0.5, 0.3, 0.15, 0.05]
    assert_drawn_from(*_draws(backend, p, min_p=0.25), p, {0, 1, 2})  # keeps p >= 0.125
    assert_drawn_from(*_draws(backend, p, min_p=0.7), p, {0})  # 0.3 < 0.7 * 0.5


def test_logprob_of_forced_token_outside_kept_set_is_minus_inf(backend):
    V = 111
    samp = [SamplingParams(temperature=1.0, top_k=1, seed=1), SamplingParams(temperature=0.0),
            SamplingParams(temperature=2.0, top_k=V, seed=2)]
    run = Run(backend, samp, ExitPolicy(thinking_budget=1, exit_tokens=(3,)), V, 3)
    run.step(peaked(3, V, [10, 10, 10]))  # a thinking token that cannot be the exit token
    x = torch.randn(3, V)
    x[:, 10] = 8.0  # the argmax, never the forced token
    out = run.step(x)
    assert out.tokens.tolist() == [3, 3, 3]
    assert float(out.logprobs[0]) == -math.inf  # top-k 1 keeps only token 10
    greedy = torch.log_softmax(x[1].double(), 0)[3].item()  # greedy rows: the model's softmax
    assert float(out.logprobs[1]) == pytest.approx(greedy, abs=1e-5)
    hot = torch.log_softmax(x[2].double() / 2.0, 0)[3].item()  # top_k >= V keeps everything
    assert float(out.logprobs[2]) == pytest.approx(hot, abs=1e-5)


def test_greedy_takes_first_maximum_and_its_raw_log_softmax(backend):
    V = 4099
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, V, generator=gen) * 4
    x[0, [9, 4000]] = 30.0  # a tie: the first index wins
    samp = [SamplingParams(temperature=0.0, top_k=1, top_p=0.1, min_p=0.9)] * 3  # filters ignored
    run = Run(backend, samp, ExitPolicy(), V)
    out = run.step(x.to(torch.bfloat16))
    xb = x.to(torch.bfloat16).double()
    want = xb.argmax(1)
    want[0] = 9
    assert out.tokens.tolist() == want.tolist()
    lsm = torch.log_softmax(xb, 1).gather(1, want[:, None])[:, 0]
    torch.testing.assert_close(out.logprobs.double(), lsm, rtol=1e-5, atol=1e-5)


def test_reference_traces_whole_under_torch_compile():
    # The benchmark compiles the reference; `tensor == Reason.NONE` once traced to a Python bool.
    # Dynamo's "eager" backend checks the trace without paying for code generation.
    V, B = 50, 3
    samp = [SamplingParams(temperature=0.8, top_p=0.9, seed=1), SamplingParams(temperature=0.0),
            SamplingParams(top_k=3, min_p=0.1, seed=2)]
    req = pack_requests(samp, ExitPolicy(cost_of_time=0.0, exit_tokens=(5,), eos_token_ids=(2,)), V)
    gen = torch.Generator().manual_seed(0)
    logits, hidden = torch.randn(B, V, generator=gen), torch.randn(B, D_MODEL, generator=gen)
    head = scenario_head("mlp", torch.float32, gen)
    compiled = torch.compile(reference_step, backend="eager", fullgraph=True)
    s_eager, s_compiled = DecodeState.new(B), DecodeState.new(B)
    s_eager.finish_reason[1] = EOS
    s_compiled.finish_reason[1] = EOS
    want = reference_step(logits, hidden, req, s_eager, head)
    got = compiled(logits, hidden, req, s_compiled, head)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    for a, b in zip(s_compiled.tensors(), s_eager.tensors()):
        assert torch.equal(a, b)
