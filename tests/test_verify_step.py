"""verify_step: every backend against decode_step run step by step, and speculative sampling by distribution.

The oracle (:func:`step_by_step`) runs the reference decode_step one position of one sequence at a
time, which is what the specification says verification must reproduce; the reference verify_step
and the Triton kernel are both held to it.
"""

from __future__ import annotations

import json
import math
import random
import sys

import pytest
import torch
from scipy import stats

import haltkit
from haltkit import DecodeState, ExitPolicy, HeadWeights, Reason, SamplingParams, pack_requests
from haltkit.backends import resolve_backend
from haltkit.reference.decode_step import decode_step as ref_decode_step
from conftest import TOL

BACKENDS = ["torch", "triton", "cpu"]  # on CPU tensors
GPU_BACKENDS = ["torch", "triton", "cuda"]  # on CUDA tensors (tests marked gpu)
# The Triton interpreter evaluates -inf - -inf and log(0) on masked lanes through numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
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
    for trial in range(2 if backend == "torch" else 1):  # the Triton interpreter is slow
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


def run_rounds(backend, B, K, V, seed, rounds, match, head_kind):
    """Several verification rounds in a row, each against the oracle, the state carried over."""
    gen, requests, _, _, head, state = scenario(B, K, V, 8, seed, head_kind=head_kind, warm=False)
    tgen = torch.Generator().manual_seed(seed + 1)
    want_state = state.clone()
    for _ in range(rounds):
        logits = torch.randn(B, K + 1, V, generator=tgen) * 2
        hidden = None if head is None else torch.randn(B, K + 1, 8, generator=tgen)
        lens = torch.tensor([gen.randrange(K + 1) for _ in range(B)], dtype=torch.int32)
        drafts = build_drafts(logits, hidden, requests, state, head, lens, match=match, gen=gen)
        expected = step_by_step(logits, hidden, requests, want_state, head,
                                lambda b, j, t: int(drafts[b, j]) if j < lens[b] else None)
        out = haltkit.verify_step(logits, hidden, drafts, lens, requests, state, head, backend=backend)
        check_against_oracle(out, expected, state, want_state, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_termination_state_machine_matches_step_by_step_over_rounds(backend):
    """Random policies (patience, budgets, exit tokens, EOS, lengths) over several rounds (hypothesis)."""
    needs(backend)
    from hypothesis import given, settings, strategies as st

    big = backend == "torch"  # the Triton interpreter is slow: fewer, smaller scenarios
    @settings(max_examples=30 if big else 5, deadline=None, derandomize=False)
    @given(
        B=st.integers(1, 6 if big else 3), K=st.integers(0, 5 if big else 3), V=st.sampled_from([5, 33, 130]),
        seed=st.integers(0, 2**31), rounds=st.integers(1, 4 if big else 2), match=st.sampled_from([0.5, 0.9, 1.0]),
        head_kind=st.sampled_from([None, "linear", "mlp"]),
    )
    def prop(B, K, V, seed, rounds, match, head_kind):
        run_rounds(backend, B, K, V, seed, rounds, match, head_kind)

    prop()


def greedy_batch(B, K, V, policy: ExitPolicy, seed: int = 0):
    """Greedy requests with drafts equal to the target's argmax everywhere (all would be accepted)."""
    tgen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K + 1, V, generator=tgen)
    requests = pack_requests(SamplingParams(temperature=0.0), policy, V, B)
    drafts = logits[:, :K].argmax(-1)
    return logits, requests, drafts, torch.full((B,), K, dtype=torch.int32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eos_at_position_j_emits_j_plus_one_tokens(backend):
    needs(backend)
    K, V, eos = 5, 64, 3
    B = K + 2
    logits, requests, drafts, lens = greedy_batch(B, K, V, ExitPolicy(eos_token_ids=(eos,)))
    logits[:, :, eos] = -100.0
    for b in range(K + 1):  # row b's target argmax is EOS at position b; row K+1 never sees EOS
        logits[b, b, eos] = 100.0
    drafts = logits[:, :K].argmax(-1)
    state = DecodeState.new(B)
    out = haltkit.verify_step(logits, None, drafts, lens, requests, state, backend=backend)
    want = torch.tensor(list(range(1, K + 2)) + [K + 1], dtype=torch.int32)
    assert torch.equal(out.num_emitted, want)
    assert torch.equal(out.num_accepted, torch.clamp(want, max=K))
    for b in range(K + 1):
        assert int(out.tokens[b, b]) == eos and (out.tokens[b, b + 1 :] == -1).all()
        assert out.logprobs[b, b + 1 :].isnan().all() and not out.logprobs[b, : b + 1].isnan().any()
    assert state.finish_reason.tolist() == [Reason.EOS] * (K + 1) + [Reason.NONE]
    assert torch.equal(state.num_generated, want)
    assert torch.equal(out.active_idx, torch.tensor([K + 1] + [-1] * (B - 1)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("exit_tokens", [(), (11, 12)])
def test_value_exit_patience_spans_two_verify_steps(backend, exit_tokens):
    """Patience 3 with two positions per step: two below-price positions, then the exit at the next step's first."""
    needs(backend)
    B, K, V, d = 2, 1, 40, 4
    policy = ExitPolicy(cost_of_time=0.5, patience=3, exit_tokens=exit_tokens)
    logits, requests, drafts, lens = greedy_batch(B, K, V, policy)
    logits[:, :, 11:13] = -50.0  # the model never closes thinking by itself
    drafts = logits[:, :K].argmax(-1)
    head = HeadWeights(torch.zeros(1, d + 2), torch.tensor([0.1]), torch.zeros(0), torch.zeros(1))
    hidden = torch.randn(B, K + 1, d)
    state = DecodeState.new(B)
    out = haltkit.verify_step(logits, hidden, drafts, lens, requests, state, head, backend=backend)
    assert (out.num_emitted == 2).all() and (state.below_count == 2).all()
    assert torch.allclose(out.values, torch.full((B, K + 1), 0.1))
    assert (state.finish_reason == Reason.NONE).all()

    if exit_tokens:  # the switch forces 11 at position 0 (drafted: accepted) and 12 at the bonus
        drafts = torch.full((B, K), 11, dtype=torch.int64)
    out = haltkit.verify_step(logits, hidden, drafts, lens, requests, state, head, backend=backend)
    assert state.think_end.tolist() == [Reason.VALUE] * B
    if exit_tokens:
        assert out.tokens.tolist() == [[11, 12]] * B and out.num_accepted.tolist() == [1] * B
        assert state.phase.tolist() == [1] * B and state.finish_reason.tolist() == [Reason.NONE] * B
        assert out.logprobs.isfinite().all()  # greedy rows: forced tokens under the full softmax
    else:  # the sequence finishes at position 0 without a token; the head was consulted there
        assert out.num_emitted.tolist() == [0] * B and (out.tokens == -1).all()
        assert state.finish_reason.tolist() == [Reason.VALUE] * B
        assert not out.values[:, 0].isnan().any() and out.values[:, 1].isnan().all()
        assert int(out.num_active) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_length_limit_mid_run_cuts_the_accepted_run(backend):
    needs(backend)
    B, K, V = 3, 6, 50
    logits, requests, drafts, lens = greedy_batch(B, K, V, ExitPolicy(max_new_tokens=5))
    state = DecodeState.new(B)
    state.num_generated.copy_(torch.tensor([0, 2, 4], dtype=torch.int32))
    out = haltkit.verify_step(logits, None, drafts, lens, requests, state, backend=backend)
    assert out.num_emitted.tolist() == [5, 3, 1]
    assert out.num_accepted.tolist() == [5, 3, 1]
    assert (state.num_generated == 5).all() and (state.finish_reason == Reason.LENGTH).all()
    assert torch.equal(out.tokens[0, :5], drafts[0, :5]) and (out.tokens[0, 5:] == -1).all()


# ----------------------------------------------------------------------------------------------
# Speculative sampling ("rejection") by distribution. Every row is the same request with its own
# fresh seed, so the emitted tokens are N independent draws.

N_DRAWS = 20_000
V_SMALL = 10


def filtered_target(gen: torch.Generator):
    """Logits [2, V] (positions 0 and 1) and their sampling distributions under a filtering request."""
    logits = torch.randn(2, V_SMALL, generator=gen) * 1.2
    params = SamplingParams(temperature=0.9, top_k=8, top_p=0.97, min_p=0.01)
    one = pack_requests(params, ExitPolicy(max_new_tokens=1000), V_SMALL, 2)
    p = haltkit.sampling_probs(logits, one).double()
    return logits, params, p / p.sum(1, keepdim=True)


def draft_distribution(kind: str, p: torch.Tensor, gen: torch.Generator) -> torch.Tensor | None:
    """q [V] of one position: close to p, far from it, disjoint from its support, or None (point mass)."""
    if kind == "close":
        q = p * (1 + 0.2 * torch.rand(V_SMALL, generator=gen, dtype=torch.float64)) + 1e-3
    elif kind == "far":
        q = torch.softmax(torch.randn(V_SMALL, generator=gen, dtype=torch.float64) * 3, 0)
    elif kind == "disjoint":
        q = (p == 0).double() * torch.rand(V_SMALL, generator=gen, dtype=torch.float64)
    else:
        return None
    return q / q.sum()


def goodness_of_fit(tokens: torch.Tensor, p: torch.Tensor, what: str) -> None:
    counts = torch.bincount(tokens, minlength=V_SMALL).double()
    assert counts[p == 0].sum() == 0, f"{what}: tokens outside the kept set were emitted: {counts}"
    expected = p[p > 0] * counts.sum()
    assert expected.min() >= 5, "the test's logits make a chi-square test unreliable"
    pval = stats.chisquare(counts[p > 0].numpy(), expected.numpy()).pvalue
    assert pval > ALPHA, f"{what}: counts {counts.tolist()} vs expected {(p * counts.sum()).tolist()}, p = {pval:.2e}"


def acceptance_matches(accepted: int, trials: int, p: torch.Tensor, q: torch.Tensor, what: str) -> None:
    rate = float(torch.minimum(p, q).sum())
    if rate == 0.0:
        assert accepted == 0, f"{what}: {accepted} drafts accepted where p and q are disjoint"
        return
    pval = stats.binomtest(accepted, trials, min(rate, 1.0)).pvalue
    assert pval > ALPHA, f"{what}: accepted {accepted}/{trials}, theory sum(min(p, q)) = {rate:.4f}, p = {pval:.2e}"


@pytest.mark.parametrize(
    "kinds", [("close", "close"), ("far", "far"), ("disjoint", "far"), ("far", "point"), ("point", "point")]
)
def test_rejection_sampling_is_lossless_in_distribution(kinds):
    """Position 0 draws from p0; given an accepted draft at 0, position 1 draws from p1; acceptance
    rates are sum(min(p, q)). Five checks at ALPHA each: false-failure rate < 1e-4.

    "point" drafts are deterministic (p's second most likely token): a one-hot row of [B, K, V]
    draft_probs when mixed with another kind, the [B, K] ones form when every position is one.
    """
    seed = random.randrange(2**31)  # fresh every run; printed on failure
    gen = torch.Generator().manual_seed(seed)
    logits, params, p = filtered_target(gen)
    K = 2
    qs = [draft_distribution(k, p[j], gen) for j, k in enumerate(kinds)]
    drafts = torch.empty(N_DRAWS, K, dtype=torch.int64)
    probs = torch.empty(N_DRAWS, K, V_SMALL)
    for j, q in enumerate(qs):
        if q is None:
            drafts[:, j] = int(p[j].argsort(descending=True)[1])
            qs[j] = torch.nn.functional.one_hot(drafts[0, j], V_SMALL).double()
        else:
            drafts[:, j] = torch.multinomial(q, N_DRAWS, replacement=True, generator=gen)
        probs[:, j] = qs[j].float()
    if all(k == "point" for k in kinds):
        probs = torch.ones(N_DRAWS, K)
    requests = pack_requests(params, ExitPolicy(max_new_tokens=1000), V_SMALL, N_DRAWS)
    requests.seed.copy_(torch.randint(0, 2**62, (N_DRAWS,), generator=gen))
    target = torch.cat([logits, logits[1:]]).expand(N_DRAWS, K + 1, V_SMALL)
    state = DecodeState.new(N_DRAWS)
    lens = torch.full((N_DRAWS,), K, dtype=torch.int32)
    out = haltkit.verify_step(target, None, drafts, lens, requests, state, draft_probs=probs,
                              method="rejection", backend="torch")
    tag = f"kinds={kinds} seed={seed}"
    goodness_of_fit(out.tokens[:, 0], p[0], f"position 0 ({tag})")
    ok0 = out.num_accepted >= 1
    acceptance_matches(int(ok0.sum()), N_DRAWS, p[0], qs[0], f"position 0 ({tag})")
    if int(ok0.sum()) >= 2000:
        goodness_of_fit(out.tokens[ok0, 1], p[1], f"position 1 after an accepted draft ({tag})")
        acceptance_matches(int((out.num_accepted >= 2).sum()), int(ok0.sum()), p[1], qs[1], f"position 1 ({tag})")
    assert torch.equal(state.num_generated, out.num_emitted)
    assert torch.equal(out.num_emitted, out.num_accepted + 1)  # no row finishes here


def test_rejection_on_greedy_rows_is_the_exact_rule():
    B, K, V = 7, 3, 97
    gen, requests, logits, hidden, head, state = scenario(B, K, V, 8, 3, sampled=False)
    lens = torch.tensor([b % (K + 1) for b in range(B)], dtype=torch.int32)
    drafts = build_drafts(logits, hidden, requests, state, head, lens, match=0.7, gen=gen)
    exact_state = state.clone()
    want = haltkit.verify_step(logits, hidden, drafts, lens, requests, exact_state, head, backend="torch")
    q = torch.zeros(B, K, V)  # would be malformed for a sampled row; greedy rows never read it
    got = haltkit.verify_step(logits, hidden, drafts, lens, requests, state, head, draft_probs=q,
                              method="rejection", backend="torch")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    for name in vars(state):
        assert torch.equal(getattr(state, name), getattr(exact_state, name))


def test_sampling_probs_is_the_distribution_decode_step_draws_from():
    B, V = 9, 211
    gen = random.Random(5)
    requests = random_requests(B, V, gen, exits=False)
    logits = torch.randn(B, V) * 3
    p = haltkit.sampling_probs(logits, requests)
    torch.testing.assert_close(p.sum(1), torch.ones(B))
    out = ref_decode_step(logits, None, requests, DecodeState.new(B), None)
    # decode_step's log-prob of its token is log p of that token, and it never draws outside p's support.
    torch.testing.assert_close(out.logprobs, p.gather(1, out.tokens[:, None])[:, 0].log())
    greedy = requests.temperature == 0
    torch.testing.assert_close(p[greedy], torch.softmax(logits[greedy], 1))
    with pytest.raises(ValueError, match=r"logits must have shape \[9, \*\]"):
        haltkit.sampling_probs(logits[:3], requests)


@pytest.mark.parametrize("method", ["exact", "rejection"])
def test_flat_layout_equals_padded_layout(method):
    B, K, V, d = 6, 4, 73, 8
    gen, requests, logits, hidden, head, state = scenario(B, K, V, d, 21)
    lens = torch.tensor([0, 4, 2, 1, 3, 4], dtype=torch.int32)
    drafts = build_drafts(logits, hidden, requests, state, head, lens, match=0.8, gen=gen)
    probs = torch.softmax(torch.randn(B, K, V), -1) if method == "rejection" else None
    flat_rows = [(b, j) for b in range(B) for j in range(int(lens[b]) + 1)]
    flat_drafts = [(b, j) for b in range(B) for j in range(int(lens[b]))]
    pick = lambda t, idx: torch.stack([t[b, j] for b, j in idx])  # noqa: E731
    padded_state = state.clone()
    want = haltkit.verify_step(logits, hidden, drafts, lens, requests, padded_state, head, probs, method, "torch")
    got = haltkit.verify_step_flat(
        pick(logits, flat_rows), pick(hidden, flat_rows), pick(drafts, flat_drafts),
        torch.cumsum(lens, 0).to(torch.int32), K, requests, state, head,
        None if probs is None else pick(probs, flat_drafts), method, "torch",
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    for name in vars(state):
        assert torch.equal(getattr(state, name), getattr(padded_state, name))


def test_opcheck_and_compiled_graph_match_eager():
    """The fake op agrees with the real one, and torch.compile traces through the op unchanged.

    opcheck's AOT test re-runs the op on the inputs its first run already mutated (the state), so
    outputs legitimately differ; the compiled comparison below does that check on fresh states.
    """
    from haltkit.speculative import _verify_step_op

    B, K, V, d = 3, 2, 37, 4
    gen, requests, logits, hidden, head, state = scenario(B, K, V, d, 8, head_kind="mlp", warm=False)
    drafts = torch.randint(0, V, (B, K))
    lens = torch.tensor([0, 1, 2], dtype=torch.int32)
    for method, probs in [("exact", None), ("rejection", torch.softmax(torch.randn(B, K, V), -1))]:
        args = (logits, hidden, drafts, lens, probs, *requests.tensors(), *state.clone().tensors(),
                *head, method, "torch")
        torch.library.opcheck(_verify_step_op, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))

        def step(st):
            return _verify_step_op(logits, hidden, drafts, lens, probs, *requests.tensors(), *st.tensors(),
                                   *head, method, "torch")

        eager_state, compiled_state = state.clone(), state.clone()
        want = step(eager_state)
        got = torch.compile(step, backend="aot_eager", fullgraph=True)(compiled_state)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        for name in vars(state):
            assert torch.equal(getattr(compiled_state, name), getattr(eager_state, name))


# ----------------------------------------------------------------------------------------------
# Bad input: a clear error at the boundary, or an ERROR row that leaves every other row alone.

def _call(**over):
    B, K, V, d = 3, 2, 20, 4
    args = dict(
        target_logits=torch.randn(B, K + 1, V), hidden=torch.randn(B, K + 1, d),
        draft_tokens=torch.randint(0, V, (B, K)), draft_lens=torch.full((B,), K, dtype=torch.int32),
        requests=pack_requests(SamplingParams(), ExitPolicy(), V, B), state=DecodeState.new(B),
        head=haltkit.MarginalValueHead(d), draft_probs=None, method="exact", backend="torch",
    )
    args.update(over)
    return haltkit.verify_step(**args)


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(target_logits=torch.randn(3, 20)), r"target_logits must be a \[B, K\+1, V\] tensor"),
        (dict(target_logits=torch.randn(3, 0, 20)), r"at least one position"),
        (dict(hidden=torch.randn(3, 2, 4)), r"hidden must have shape \[3, 3, 4\], got \[3, 2, 4\]"),
        (dict(hidden=torch.randn(3, 3, 5)), r"hidden must have shape \[3, 3, 4\], got \[3, 3, 5\]"),
        (dict(draft_tokens=torch.zeros(3, 3, dtype=torch.int64)), r"draft_tokens must have shape \[3, 2\]"),
        (dict(draft_tokens=torch.zeros(3, 2, dtype=torch.int32)), r"draft_tokens must have dtype int64"),
        (dict(draft_lens=torch.zeros(3, dtype=torch.int64)), r"draft_lens must have dtype int32"),
        (dict(draft_lens=torch.zeros(4, dtype=torch.int32)), r"draft_lens must have shape \[3\]"),
        (dict(state=DecodeState.new(4)), r"state has 4 rows but the logits have 3"),
        (dict(method="greedy"), r"method must be one of \('exact', 'rejection'\), got 'greedy'"),
        (dict(draft_probs=torch.ones(3, 2)), r"draft_probs is only read by method='rejection'"),
        (dict(method="rejection"), r"method='rejection' needs draft_probs: \[3, 2, 20\]"),
        (dict(method="rejection", draft_probs=torch.ones(3, 2, 19)), r"draft_probs must have shape \[3, 2, 20\]"),
        (dict(method="rejection", draft_probs=torch.ones(3, 2, dtype=torch.int64)), r"draft_probs must have dtype"),
        (dict(backend="tpu"), r"unknown backend 'tpu'"),
    ],
)
def test_bad_arguments_raise_naming_the_field(over, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _call(**over)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "defect", ["token_below_vocab", "token_at_vocab", "len_above_k", "len_negative", "q_zero_at_draft",
               "q_nan", "q_inf",
               "q_point_not_one", "nan_logits_mid_run"],
)
def test_malformed_row_is_an_error_row_and_leaves_the_others_alone(backend, defect):
    needs(backend)
    B, K, V, d, bad = 5, 3, 41, 4, 2
    gen = random.Random(13)
    requests = pack_requests(
        [SamplingParams(temperature=0.8, seed=gen.randrange(2**63)) for _ in range(B)],
        ExitPolicy(max_new_tokens=100), V,
    )
    tgen = torch.Generator().manual_seed(13)
    logits = torch.randn(B, K + 1, V, generator=tgen)
    hidden = torch.randn(B, K + 1, d, generator=tgen)
    head = random_head(d, False, tgen)
    state = DecodeState.new(B)
    lens = torch.full((B,), K, dtype=torch.int32)
    drafts = build_drafts(logits, hidden, requests, state, head, lens, match=1.0, gen=gen)
    probs = torch.softmax(torch.randn(B, K, V, generator=tgen), -1)
    probs.scatter_(2, drafts[:, :, None], 0.5)  # every draft has q(x) > 0
    method = "rejection" if defect.startswith("q_") else "exact"
    if defect == "token_below_vocab":
        drafts[bad, 1] = -1
    elif defect == "token_at_vocab":
        drafts[bad, 2] = V
    elif defect == "len_above_k":
        lens[bad] = K + 1
    elif defect == "len_negative":
        lens[bad] = -1
    elif defect == "q_zero_at_draft":
        probs[bad, 1, drafts[bad, 1]] = 0.0
    elif defect == "q_nan":
        probs[bad, 0, drafts[bad, 0]] = math.nan
    elif defect == "q_inf":
        probs[bad, 2, drafts[bad, 2]] = math.inf
    elif defect == "q_point_not_one":
        probs = torch.ones(B, K)
        probs[bad, 2] = 0.5
    elif defect == "nan_logits_mid_run":
        logits[bad, 2, 5] = math.nan
    # A drafted token past the row's draft length is never read, so it is no defect.
    lens[bad + 1] = 1
    drafts[bad + 1, 2] = V + 100

    def run(rows):
        idx = torch.tensor(rows)
        st = state.index_select(idx)
        out = haltkit.verify_step(
            logits[idx], hidden[idx], drafts[idx], lens[idx], requests.index_select(idx), st, head,
            None if method == "exact" else probs[idx], method, backend)
        return out, st

    out, st = run(list(range(B)))
    assert int(st.finish_reason[bad]) == Reason.ERROR
    if defect == "nan_logits_mid_run":  # the two accepted positions before it stand, as step by step
        assert int(out.num_emitted[bad]) == 2 and int(st.num_generated[bad]) == 2
        assert not out.values[bad, 2].isnan() and out.values[bad, 3].isnan()
    else:  # judged as bad logits at position 0: nothing emitted, only the finish reason changes
        assert int(out.num_emitted[bad]) == 0 and (out.tokens[bad] == -1).all()
        assert int(st.num_generated[bad]) == 0 and int(st.think_tokens[bad]) == 0
    assert bad not in out.active_idx.tolist()
    others = [b for b in range(B) if b != bad]
    alone, st_alone = run(others)
    assert (st.finish_reason[others] == Reason.NONE).all()
    for name in ("tokens", "num_emitted", "num_accepted"):
        assert torch.equal(getattr(out, name)[others], getattr(alone, name)), name
    torch.testing.assert_close(out.values[others], alone.values, equal_nan=True, **dict(zip(("rtol", "atol"), TOL[torch.float32])))
    for name in vars(st):
        assert torch.equal(getattr(st, name)[others], getattr(st_alone, name)), name


# ----------------------------------------------------------------------------------------------
# Triton against the reference on the same seeds.

@pytest.mark.parametrize("q_form", ["full", "point"])
def test_triton_and_cpu_rejection_match_reference_on_the_same_seeds(q_form):
    """Same tokens and acceptances as the reference, for Triton and the native cpu backend; the
    spec allows 0.1% of draws to differ (an ulp of the kept mass can flip a comparison), which
    with fewer than 1000 draws means none."""
    needs("triton")
    needs("cpu")
    B, K, V = 16, 3, 300
    gen, requests, logits, hidden, head, state = scenario(B, K, V, 8, 77, head_kind="linear")
    tgen = torch.Generator().manual_seed(78)
    lens = torch.tensor([b % (K + 1) for b in range(B)], dtype=torch.int32)
    # Drafts from q: half from the target's own distribution (often accepted), half from noise.
    p = torch.stack([haltkit.sampling_probs(logits[:, j], requests) for j in range(K)], 1)
    q = torch.softmax(torch.randn(B, K, V, generator=tgen) * 2, -1)
    q[: B // 2] = 0.5 * q[: B // 2] + 0.5 * p[: B // 2].nan_to_num(0.0)
    drafts = torch.multinomial(q.reshape(-1, V), 1, generator=tgen).reshape(B, K)
    if q_form == "point":  # deterministic drafts: the target's most likely token
        drafts = p.nan_to_num(0.0).argmax(-1)
        q = torch.ones(B, K)
    runs = {}
    for backend in BACKENDS:
        st = state.clone()
        runs[backend] = (haltkit.verify_step(logits, hidden, drafts, lens, requests, st, head, q, "rejection",
                                             backend), st)
    ref, ref_state = runs["torch"]
    assert set(runs) == {"torch", "triton", "cpu"}
    for backend in ("triton", "cpu"):
        got, got_state = runs[backend]
        assert torch.equal(got.tokens, ref.tokens), backend
        assert torch.equal(got.num_accepted, ref.num_accepted) and torch.equal(got.num_emitted, ref.num_emitted), backend
        for name in vars(ref_state):
            assert torch.equal(getattr(got_state, name), getattr(ref_state, name)), (backend, name)
        tol = dict(zip(("rtol", "atol"), TOL[torch.float32]))
        torch.testing.assert_close(got.values, ref.values, equal_nan=True, msg=backend, **tol)
        torch.testing.assert_close(got.logprobs, ref.logprobs, equal_nan=True, msg=backend, **tol)
    assert int(ref.num_accepted.sum()) > 0 and int((ref.num_accepted < torch.minimum(lens, ref.num_emitted)).sum()) > 0


@pytest.mark.parametrize("method", ["exact", "rejection"])
def test_triton_kernel_writes_every_output_with_small_vocabulary_tiles(method):
    """Outputs poisoned before the launch; 16-wide tiles so every row spans many tiles and a tail."""
    needs("triton")
    from haltkit.kernels.verify_step import verify_step as triton_verify_step
    from haltkit.reference.verify_step import VerifyOutput, verify_step as reference_verify_step

    B, K, V = 5, 3, 203
    gen, requests, logits, hidden, head, state = scenario(B, K, V, 8, 31, head_kind="mlp")
    lens = torch.tensor([3, 0, 2, 3, 1], dtype=torch.int32)
    drafts = build_drafts(logits, hidden, requests, state, head, lens, match=0.8, gen=gen)
    probs = torch.softmax(torch.randn(B, K, V), -1) if method == "rejection" else None
    if probs is not None:
        probs.scatter_(2, drafts[:, :, None], 0.3)
    want_state = state.clone()
    want = reference_verify_step(logits, hidden, drafts, lens, requests, want_state, head, probs, method)
    poisoned = VerifyOutput(
        torch.full((B, K + 1), 12345, dtype=torch.int64), torch.full((B,), 77, dtype=torch.int32),
        torch.full((B,), 77, dtype=torch.int32), torch.full((B, K + 1), 9.0), torch.full((B, K + 1), 9.0),
        torch.full((B,), 12345, dtype=torch.int64), torch.tensor(12345),
    )
    got = triton_verify_step(logits, hidden, drafts, lens, requests, state, head, probs, method,
                             out=poisoned, block_v=16)
    check_against_oracle(got, tuple(want[:5]), state, want_state, torch.float32)


def test_benchmark_quick_mode_writes_json_and_markdown(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "verify_step.py"
    spec = importlib.util.spec_from_file_location("bench_verify_step", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads((tmp_path / "verify_step_quick.json").read_text())
    assert len(res["rows"]) == len(bench.MODES) * 4
    for row in res["rows"]:
        assert set(row["median_us"]) >= {"eager", "haltkit"} and row["speedup_vs_eager"]["eager"] == 1.0
        assert all(len(t) >= 3 and min(t) > 0 for t in row["times_us"].values())
    table = (tmp_path / "verify_step_quick.md").read_text()
    assert table.count("\n| ") == 1 + len(res["rows"])


def test_triton_kernel_compiles_for_a_hopper_gpu():
    """The interpreter accepts what the compiler may not: compile the speculative-sampling variant
    (a superset of the exact one) to a sm_90 cubin, which needs ptxas but no GPU."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    import os
    import shutil
    import subprocess
    import textwrap

    code = textwrap.dedent("""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from haltkit.kernels.verify_step import _verify_step_kernel as k
        const = dict(HAS_HEAD=True, IS_MLP=True, REJECTION=True, Q_FULL=True, BLOCK_V=1024, BLOCK_D=256,
                     BLOCK_R=32, BLOCK_E=2, BLOCK_B=64, NT=16)
        i64 = ("drafts_ptr", "seed_ptr", "tokens_ptr", "active_idx_ptr", "num_active_ptr")
        f32 = ("q_ptr", "temperature_ptr", "top_p_ptr", "min_p_ptr", "cost_ptr", "logprobs_ptr", "values_ptr",
               "w1_ptr", "b1_ptr", "w2_ptr", "b2_ptr")
        def kind(n):
            if n in const:
                return "constexpr"
            if n == "logits_ptr":
                return "*bf16"
            if n == "hidden_ptr":
                return "*fp16"
            return "*i64" if n in i64 else "*fp32" if n in f32 else "*i32" if n.endswith("_ptr") else "i32"
        sig = {n: kind(n) for n in k.arg_names}
        src = ASTSource(fn=k, signature=sig, constexprs={(k.arg_names.index(n),): v for n, v in const.items()})
        assert triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["cubin"]
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"haltkit-verify-cache-{os.getpid()}")
    try:
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(env["TRITON_CACHE_DIR"], ignore_errors=True)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["exact", "rejection"])
def test_gpu_backends_match_reference_at_a_real_vocabulary(method):
    B, K, V = 64, 4, 151936
    gen, requests, logits, hidden, head, state = scenario(B, K, V, 128, 5, dtype=torch.bfloat16, head_kind="mlp")
    lens = torch.tensor([b % (K + 1) for b in range(B)], dtype=torch.int32)
    drafts = build_drafts(logits, hidden, requests, state, head, lens, match=0.8, gen=gen)
    probs = None
    if method == "rejection":
        probs = torch.stack([haltkit.sampling_probs(logits[:, j].float() + torch.randn(B, V), requests)
                             for j in range(K)], 1)
        drafts = torch.multinomial(probs.reshape(-1, V), 1).reshape(B, K)
    cuda = lambda t: None if t is None else t.cuda()  # noqa: E731
    outs = {}
    for backend in GPU_BACKENDS:
        st = DecodeState(*(t.cuda() for t in state.tensors()))
        out = haltkit.verify_step(logits.cuda(), hidden.cuda(), drafts.cuda(), lens.cuda(), requests.to("cuda"),
                                  st, HeadWeights(*(t.cuda() for t in head)), cuda(probs), method, backend)
        outs[backend] = (out, st)
    ref, ref_st = outs["torch"]
    for backend in GPU_BACKENDS[1:]:
        got, got_st = outs[backend]
        assert torch.equal(got.tokens, ref.tokens) and torch.equal(got.num_accepted, ref.num_accepted), backend
        for name in vars(ref_st):
            assert torch.equal(getattr(got_st, name), getattr(ref_st, name)), (backend, name)
        torch.testing.assert_close(got.logprobs, ref.logprobs, equal_nan=True,
                                   **dict(zip(("rtol", "atol"), TOL[torch.bfloat16])))


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_batch_has_no_active_rows(backend):
    # B = 0, as after compacting to nothing: num_active must be written (0), never left as it was.
    needs(backend)
    V, K = 50, 2
    requests = pack_requests(SamplingParams(), ExitPolicy(), V, 1).index_select(torch.zeros(0, dtype=torch.int64))
    state = DecodeState.new(0)
    got = haltkit.verify_step(torch.randn(0, K + 1, V), None, torch.zeros(0, K, dtype=torch.int64),
                              torch.zeros(0, dtype=torch.int32), requests, state, None, backend=backend)
    assert int(got.num_active) == 0 and got.tokens.shape == (0, K + 1) and got.active_idx.shape == (0,)


def test_triton_launcher_writes_num_active_for_an_empty_batch():
    # The launcher's own output buffers, poisoned: a zero-program grid would leave 12345 there.
    needs("triton")
    from haltkit.kernels.verify_step import verify_step as triton_verify
    from haltkit.reference.verify_step import VerifyOutput

    V, K = 50, 2
    i32, i64, f32 = (dict(dtype=dt) for dt in (torch.int32, torch.int64, torch.float32))
    out = VerifyOutput(torch.empty(0, K + 1, **i64), torch.empty(0, **i32), torch.empty(0, **i32),
                       torch.empty(0, K + 1, **f32), torch.empty(0, K + 1, **f32), torch.empty(0, **i64),
                       torch.full((), 12345, **i64))
    triton_verify(torch.randn(0, K + 1, V), None, torch.zeros(0, K, dtype=torch.int64),
                  torch.zeros(0, dtype=torch.int32),
                  pack_requests(SamplingParams(), ExitPolicy(), V, 1).index_select(torch.zeros(0, dtype=torch.int64)),
                  DecodeState.new(0), None, out=out)
    assert int(out.num_active) == 0
