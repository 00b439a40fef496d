"""exit_rules: decode_step's exit rules around another sampler (vLLM's), reference and native.

* The reference, driven by a sampler that takes the token decode_step's reference draws, must
  reproduce that reference step by step: every state field, every emitted / forced token.
* The native backends must equal the reference bit for bit (state, packed plan, forced logits)
  on the shared vectors of ``native_vectors``, which the sanitizer build also runs.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import haltkit
from haltkit import DecodeState, ExitPolicy, MarginalValueHead, Reason, SamplingParams, pack_requests
from haltkit.backends import backend_module, resolve_backend
from haltkit.reference.decode_step import decode_step as reference_step
from haltkit.reference.termination import PLAN_WORDS, unpack_plan

import native_vectors as nv

D = 8
BACKENDS = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(40))
def test_native_exit_rules_equal_the_reference(backend, seed):
    nv.run_exit_rules_case(seed, backend, device="cuda" if backend == "cuda" else "cpu")


@pytest.mark.parametrize("seed", range(12))  # the interpreter runs a launch in ~10-50 ms
def test_triton_exit_rules_equal_the_reference(seed):
    nv.run_exit_rules_case(seed, "triton", device="cuda" if torch.cuda.is_available() else "cpu")


def test_binding_refuses_malformed_arguments():
    nv.run_exit_rules_bad_binding_calls(backend_module("cpu").module)


def test_auto_picks_the_native_backend_on_the_cpu():
    assert resolve_backend("auto", torch.device("cpu"), op="exit_rules") == "cpu"


@st.composite
def policies(draw, vocab: int) -> ExitPolicy:
    tok = st.integers(0, vocab - 1)
    return ExitPolicy(
        cost_of_time=draw(st.one_of(st.none(), st.floats(-1.0, 1.0))),
        patience=draw(st.integers(1, 3)),
        min_new_tokens=draw(st.integers(0, 4)),
        max_new_tokens=draw(st.integers(1, 14)),
        eos_token_ids=tuple(draw(st.lists(tok, max_size=1))),
        thinking_budget=draw(st.one_of(st.none(), st.integers(1, 8))),
        exit_tokens=tuple(draw(st.lists(tok, max_size=3))),
    )


@st.composite
def scenarios(draw):
    vocab = draw(st.integers(2, 9))  # small, so drawn tokens often hit EOS ids and exit_tokens[0]
    batch = draw(st.integers(1, 7))
    pols = [draw(policies(vocab)) for _ in range(batch)]
    temps = [draw(st.sampled_from([0.0, 1.0])) for _ in range(batch)]
    return vocab, pols, temps, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_exit_rules_around_the_reference_draw_equal_the_reference_step(scenario):
    """Each call commits the previous step with the token decode_step's reference drew (or the
    forced / halt token the rules imposed) and plans the next: the committed state must be the
    reference's after every step, the forced tokens its tokens, the halts its silent finishes."""
    vocab, pols, temps, seed = scenario
    B = len(pols)
    gen = torch.Generator().manual_seed(seed)
    req = pack_requests([SamplingParams(temperature=t, seed=i) for i, t in enumerate(temps)], pols, vocab)
    head = MarginalValueHead(D, hidden=4)
    with torch.no_grad():
        head.w1.normal_(0, 1, generator=gen)
    w = head.weights()
    halt = torch.tensor([(p.eos_token_ids or (-1,))[0] for p in pols])
    ref, ours = DecodeState.new(B), DecodeState.new(B)
    plan = torch.zeros(B, PLAN_WORDS, dtype=torch.int32)
    token = torch.full((B,), -1)
    for step in range(12):
        logits = torch.randn(B, vocab, generator=gen)
        hidden = torch.randn(B, D, generator=gen)
        if step == 5:
            hidden[seed % B] = math.nan  # a non-finite value: ERROR where lambda is on
        masked = logits.clone()
        haltkit.reference.exit_rules(masked, hidden, req, ours, w, plan, token, halt, torch.ones(B, dtype=torch.bool))
        for name, a, b in zip(nv.STATE_FIELDS, ours.tensors(), ref.tensors()):  # committed = reference so far
            assert torch.equal(a, b), (name, step, a.tolist(), b.tolist())
        running = ref.finish_reason == Reason.NONE
        out = reference_step(logits, hidden, req, ref, w)

        p = unpack_plan(plan)
        emitted = out.tokens >= 0
        assert torch.equal(p.emit, emitted)
        forced = torch.isinf(masked).any(1)
        assert torch.equal(forced & p.emit, p.forcing)
        assert torch.equal(masked.argmax(1)[p.forcing], out.tokens[p.forcing])
        halted = running & ~emitted
        assert torch.equal(forced & ~p.emit, (halt >= 0) & ~p.emit)
        assert bool((masked.argmax(1)[forced & ~p.emit] == halt[forced & ~p.emit]).all())
        assert not bool(halted[p.emit].any())
        # vLLM's draw: the reference's token where the row emits, the forced halt token elsewhere.
        token = torch.where(emitted, out.tokens, torch.where(halt >= 0, halt, 0))


def test_a_plan_whose_token_never_comes_is_planned_again():
    # vLLM discards the sample of a partial prefill: with token -1 nothing is committed, and the
    # repeated plan is the first one.
    req = pack_requests(SamplingParams(), ExitPolicy(cost_of_time=0.5, patience=2), 5, batch_size=1)
    head = MarginalValueHead(3, hidden=0)
    with torch.no_grad():
        head.w1.zero_()  # value 0 < 0.5 every step
    head = head.weights()
    state, plan = DecodeState.new(1), torch.zeros(1, PLAN_WORDS, dtype=torch.int32)
    on, halt, h = torch.ones(1, dtype=torch.bool), torch.tensor([4]), torch.zeros(1, 3)
    none = torch.tensor([-1])
    haltkit.reference.exit_rules(torch.zeros(1, 5), h, req, state, head, plan, none, halt, on)
    first = plan.clone()
    haltkit.reference.exit_rules(torch.zeros(1, 5), h, req, state, head, plan, none, halt, on)
    assert torch.equal(plan, first) and int(unpack_plan(plan).below_count) == 1
    assert int(state.num_generated) == 0
    x = torch.zeros(1, 5)
    haltkit.reference.exit_rules(x, h, req, state, head, plan, torch.tensor([3]), halt, on)
    assert int(state.num_generated) == 1 and int(state.below_count) == 1
    assert int(x.argmax()) == 4 and bool(torch.isinf(x).sum() == 4)  # patience 2 reached: halted
    assert not bool(unpack_plan(plan).emit) and bool(unpack_plan(plan).stop_now)
