"""verify_step: every backend against decode_step run step by step, and speculative sampling by distribution.

The oracle (:func:`step_by_step`) runs the reference decode_step one position of one sequence at a
time, which is what the specification says verification must reproduce; the reference verify_step
and the Triton kernel are both held to it.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from scipy import stats

import haltkit
from haltkit import DecodeState, ExitPolicy, HeadWeights, Reason, SamplingParams, pack_requests
from haltkit.backends import resolve_backend
from haltkit.reference.decode_step import decode_step as ref_decode_step
from conftest import TOL

BACKENDS = ["torch", "triton"]
#: Each statistical check fails a correct implementation with probability ALPHA; a test makes at
#: most 10 of them, so its false-failure rate stays under 1e-4.
ALPHA = 1e-5


def needs(backend: str) -> None:
    try:
        resolve_backend(backend, torch.device("cpu"))
    except RuntimeError as e:
        pytest.skip(str(e))


def random_requests(B: int, V: int, gen: random.Random, *, sampled: bool = True, exits: bool = True):
    """A batch mixing greedy and filtered sampling with EOS, budgets, exit tokens and value exits."""
    samp, pol = [], []
    for _ in range(B):
        if sampled and gen.random() < 0.7:
            s = SamplingParams(
                temperature=gen.choice([0.6, 1.0, 1.7]),
                top_k=gen.choice([0, 0, 3, V + 5]),
                top_p=gen.choice([1.0, 0.9, 0.5]),
                min_p=gen.choice([0.0, 0.0, 0.05]),
                seed=gen.randrange(2**63),
            )
        else:
            s = SamplingParams(temperature=0.0, seed=gen.randrange(2**63))
        if exits:
            e = ExitPolicy(
                cost_of_time=gen.choice([None, -0.2, 0.0, 0.3]),
                patience=gen.choice([1, 2, 3]),
                min_new_tokens=gen.choice([0, 2]),
                max_new_tokens=gen.choice([3, 6, 40]),
                eos_token_ids=tuple(gen.sample(range(V), gen.choice([0, 1, 2]))),
                thinking_budget=gen.choice([None, 2, 5]),
                exit_tokens=tuple(gen.sample(range(V), gen.choice([0, 1, 2]))),
            )
        else:
            e = ExitPolicy(max_new_tokens=10_000)
        samp.append(s)
        pol.append(e)
    return pack_requests(samp, pol, V)


def random_head(d: int, mlp: bool, gen: torch.Generator) -> HeadWeights:
    head = haltkit.MarginalValueHead(d, hidden=8 if mlp else 0)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return head.weights()


def step_by_step(logits, hidden, requests, state, head, draft_for):
    """decode_step one position of one row at a time: what verify_step must reproduce.

    ``draft_for(b, j, token)`` returns the drafted token at position j of row b given the token
    decode_step emits there (or None past the row's draft). Returns tokens, num_emitted,
    num_accepted, values, logprobs like VerifyOutput; ``state`` is updated in place.
    """
    B, K1, _ = logits.shape
    tokens = torch.full((B, K1), -1, dtype=torch.int64)
    values = torch.full((B, K1), math.nan)
    logprobs = torch.full((B, K1), math.nan)
    accepted = torch.zeros(B, dtype=torch.int32)
    for b in range(B):
        idx = torch.tensor([b])
        req, st = requests.index_select(idx), state.index_select(idx)
        for j in range(K1):
            if bool(st.finished[0]):
                break
            out = ref_decode_step(logits[b : b + 1, j], None if hidden is None else hidden[b : b + 1, j], req, st, head)
            values[b, j] = out.values[0]
            tok = int(out.tokens[0])
            if tok < 0:
                break
            tokens[b, j], logprobs[b, j] = tok, out.logprobs[0]
            if draft_for(b, j, tok) != tok:
                break
            accepted[b] += 1
        for name, t in vars(state).items():
            t[b] = getattr(st, name)[0]
    return tokens, (tokens >= 0).sum(1).to(torch.int32), accepted, values, logprobs


def build_drafts(logits, hidden, requests, state, head, lens, match: float, gen: random.Random):
    """Drafts that match decode_step's tokens with probability ``match`` per position (then random)."""
    B, K1, V = logits.shape
    drafts = torch.tensor([[gen.randrange(V) for _ in range(K1 - 1)] for _ in range(B)], dtype=torch.int64)
    drafts = drafts.reshape(B, K1 - 1)

    def choose(b, j, tok):
        if j >= lens[b]:
            return None
        drafts[b, j] = tok if gen.random() < match else (tok + 1 + gen.randrange(V - 1)) % V
        return int(drafts[b, j])

    step_by_step(logits, hidden, requests, state.clone(), head, choose)
    return drafts


def check_against_oracle(out, expected, state, want_state, dtype):
    tokens, num_emitted, num_accepted, values, logprobs = expected
    assert torch.equal(out.tokens, tokens)
    assert torch.equal(out.num_emitted, num_emitted)
    assert torch.equal(out.num_accepted, num_accepted)
    for name in vars(state):
        assert torch.equal(getattr(state, name), getattr(want_state, name)), name
    # Values and log-probs are floats: the head's matmul over a batch of B rows may round
    # differently from the oracle's batches of one.
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.values, values, rtol=rtol, atol=atol, equal_nan=True)
    torch.testing.assert_close(out.logprobs, logprobs, rtol=rtol, atol=atol, equal_nan=True)
    active = (~state.finished).nonzero()[:, 0]
    assert int(out.num_active) == active.numel()
    assert torch.equal(out.active_idx[: active.numel()], active)
    assert (out.active_idx[active.numel():] == -1).all()


def scenario(B, K, V, d, seed, *, dtype=torch.float32, head_kind="linear", sampled=True, warm=True):
    """Random logits / hidden / requests / state, with a state already some steps in."""
    gen = random.Random(seed)
    tgen = torch.Generator().manual_seed(seed)
    requests = random_requests(B, V, gen, sampled=sampled)
    logits = (torch.randn(B, K + 1, V, generator=tgen) * 2).to(dtype)
    head = None if head_kind is None else random_head(d, head_kind == "mlp", tgen)
    hidden = None if head is None else torch.randn(B, K + 1, d, generator=tgen).to(dtype)
    if head is None:  # no head: value exits must be off, else every row is an ERROR row
        requests.cost_of_time.fill_(-math.inf)
    state = DecodeState.new(B)
    if warm:  # a few ordinary steps, so patience counts, phases and forcing are mid-way
        for _ in range(gen.randrange(3)):
            ref_decode_step(logits[:, 0], None if hidden is None else hidden[:, 0], requests, state, head)
    return gen, requests, logits, hidden, head, state


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "B,K,V,dtype,head_kind",
    [
        (1, 0, 111, torch.float32, "linear"),
        (7, 4, 111, torch.float32, "mlp"),
        (9, 3, 257, torch.bfloat16, "linear"),
        (5, 6, 4099, torch.float16, None),
    ],
)
def test_exact_method_equals_step_by_step_decode(backend, B, K, V, dtype, head_kind):
    needs(backend)
    for trial in range(2):
        gen, requests, logits, hidden, head, state = scenario(B, K, V, 16, 1000 * trial + B + K, dtype=dtype, head_kind=head_kind)
        # Every draft length from 0 to K appears, with matches and mismatches mixed.
        lens = torch.tensor([(b + trial) % (K + 1) for b in range(B)], dtype=torch.int32)
        drafts = build_drafts(logits, hidden, requests, state, head, lens, match=0.75, gen=gen)
        want_state = state.clone()
        expected = step_by_step(logits, hidden, requests, want_state, head,
                                lambda b, j, t: int(drafts[b, j]) if j < lens[b] else None)
        out = haltkit.verify_step(logits, hidden, drafts, lens, requests, state, head, backend=backend)
        check_against_oracle(out, expected, state, want_state, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_all_drafts_accepted_appends_bonus(backend):
    needs(backend)
    B, K, V = 6, 5, 300
    gen, requests, logits, hidden, head, state = scenario(B, K, V, 8, 7, sampled=False, head_kind=None, warm=False)
    requests.max_new_tokens.fill_(1000)
    requests.eos_ids.fill_(-1)
    requests.exit_len.zero_()
    requests.thinking_budget.zero_()
    lens = torch.full((B,), K, dtype=torch.int32)
    drafts = logits[:, :K].float().argmax(-1)
    out = haltkit.verify_step(logits, hidden, drafts, lens, requests, state, head, backend=backend)
    assert torch.equal(out.tokens, logits.float().argmax(-1))
    assert (out.num_emitted == K + 1).all() and (out.num_accepted == K).all()
    # One wrong draft in the middle: the correction is the target's argmax there, then nothing.
    state = DecodeState.new(B)
    drafts[:, 2] = (drafts[:, 2] + 1) % V
    out = haltkit.verify_step(logits, hidden, drafts, lens, requests, state, head, backend=backend)
    assert torch.equal(out.tokens[:, :3], logits[:, :3].float().argmax(-1))
    assert (out.tokens[:, 3:] == -1).all()
    assert (out.num_emitted == 3).all() and (out.num_accepted == 2).all()
    assert (state.num_generated == 3).all()
