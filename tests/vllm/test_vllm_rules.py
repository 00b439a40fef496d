"""The split exit rules of haltkit.vllm against the decode_step reference (no vLLM needed).

``account(decide(state), token)`` must be one reference step with that token: every state field
equal after every step, over random multi-step scenarios with value exits, patience, budgets,
exit tokens the model also draws by itself, EOS, length limits and non-finite values.
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from haltkit import DecodeState, ExitPolicy, MarginalValueHead, Reason, SamplingParams, pack_requests
from haltkit.reference import decode_step as reference_step
from haltkit.vllm.rules import account, decide, head_values

D = 8


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
def test_decide_then_account_equals_reference_step(scenario):
    vocab, pols, temps, seed = scenario
    B = len(pols)
    gen = torch.Generator().manual_seed(seed)
    req = pack_requests([SamplingParams(temperature=t, seed=i) for i, t in enumerate(temps)], pols, vocab)
    head = MarginalValueHead(D, hidden=4)
    with torch.no_grad():
        head.w1.normal_(0, 1, generator=gen)
    w = head.weights()
    ref, ours = DecodeState.new(B), DecodeState.new(B)
    for step in range(12):
        logits = torch.randn(B, vocab, generator=gen)
        hidden = torch.randn(B, D, generator=gen)
        if step == 5:
            hidden[seed % B] = math.nan  # a non-finite value: ERROR where lambda is on
        running = ours.finish_reason == Reason.NONE
        values = head_values(hidden, req, ours, w)
        dec = decide(values, req, ours)
        out = reference_step(logits, hidden, req, ref, w)

        assert torch.equal(torch.where(running, values, math.nan).isnan(), out.values.isnan())
        ok = ~out.values.isnan()
        assert torch.equal(values[ok], out.values[ok])
        emitted = out.tokens >= 0
        assert torch.equal(dec.emit, emitted)
        assert torch.equal(dec.halt, running & ~emitted)
        forced = dec.emit & ~dec.drew
        assert torch.equal(dec.forced_token[forced], out.tokens[forced])
        assert bool((dec.forced_token[~forced] == -1).all())

        ours = account(dec, out.tokens, req)
        for name, a, b in zip(("num_generated", "think_tokens", "below_count", "phase", "forced_pos",
                               "think_end", "finish_reason"), ours.tensors(), ref.tensors()):
            assert a.dtype == torch.int32, name
            assert torch.equal(a, b), (name, step, a.tolist(), b.tolist())


def test_a_decision_whose_token_never_comes_is_decided_again():
    # vLLM discards the sample of a partial prefill; committing only in `account` makes the
    # repeated decision identical to a first one.
    req = pack_requests(SamplingParams(), ExitPolicy(cost_of_time=0.5, patience=2), 5, batch_size=1)
    state = DecodeState.new(1)
    low = torch.tensor([0.0])
    first = decide(low, req, state)
    again = decide(low, req, state)  # no token came: the same committed state again
    assert torch.equal(first.state.below_count, again.state.below_count)
    assert int(again.state.below_count) == 1
    committed = account(again, torch.tensor([3]), req)
    assert int(committed.below_count) == 1 and int(committed.num_generated) == 1
    assert bool(decide(low, req, committed).halt)  # patience 2 reached on the next step
