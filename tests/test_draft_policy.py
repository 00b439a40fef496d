"""Draft lengths by measured cost (``adaptive="cost"``, :class:`haltkit.drafts.DraftLengthPolicy`).

The policy is driven here with step costs set by hand (the wall clock of a shared machine would
make the decisions, not the output, vary), and through ``generate``, where whatever it decides
must leave the output token for token that of decoding without a draft, and where a backed-off
draft must cost nothing: no draft or verification calls, the plain step's very operators.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import haltkit
import haltkit.engine as engine
from haltkit import DraftModel, EarlyLayerDraft, ExitPolicy, PromptLookup
from haltkit.drafts import DraftContext, DraftLengthPolicy, as_draft_source

pytest.importorskip("transformers")
from engine_models import ragged_prompts, sampled, tiny  # noqa: E402

P_ = DraftLengthPolicy
#: Seconds per step by width: each drafted token costs 15% of a plain step to draft and verify.
COSTS = {w: 1.0 + 0.15 * w for w in range(5)}
#: Plain steps before the first probe (its cost unmeasured), and between probes once it is (0.15).
FIRST = math.ceil(P_.PROBE_PRIOR / P_.PROBE_BUDGET)
GAP = max(P_.MIN_GAP, math.ceil((COSTS[1] / COSTS[0] - 1) / P_.PROBE_BUDGET))


def drive(policy: DraftLengthPolicy, passes, steps: int, costs=COSTS) -> list[list[int]]:
    """Run the policy as the engine does for ``steps`` steps; ``passes(step)`` -> [P] bools: the
    rows whose drafts pass at that step (all their tokens) or fail (the first token)."""
    finished = torch.zeros(policy.accepted.shape[0], dtype=torch.bool)
    widths, prev = [], None
    k = policy.lengths(finished)
    for step in range(steps):
        w = int(k.max())
        widths.append(k.tolist())
        policy.tick(w)
        if prev is not None:
            policy.T[prev] = costs[prev]  # what tick() measured for the step that just ended
        prev = w
        ok = torch.tensor(passes(step))
        if w == 0:
            if policy.shadow:  # the would-be first draft token, checked against the emitted one
                policy.observe(torch.ones_like(k), ok.long())
        else:
            policy.observe(k, torch.where(ok, k, 0))
        k = policy.lengths(finished)
    return widths


def always(*rows):
    return lambda step: list(rows)


def test_cost_policy_backs_off_and_probes_ever_more_rarely():
    policy = DraftLengthPolicy(4, 1, torch.device("cpu"), compile=False, shadow=False)
    drafted = [w[0] for w in drive(policy, always(False), 80)]
    # Plain steps first (timed); a width-1 probe once FIRST plain steps have passed, which fails;
    # then probes of measured cost (15% of a step: one per GAP plain steps keeps them within 2%)
    # whose gap doubles after each failure.
    expected = [0] * FIRST + [1] + [0] * 2 * GAP + [1] + [0] * 4 * GAP + [1]
    assert drafted[: len(expected)] == expected, drafted
    assert sum(drafted) == 3 and policy.probes == 3 and policy.gap == 8


def test_cost_policy_drafts_the_full_length_when_drafts_pass():
    policy = DraftLengthPolicy(4, 1, torch.device("cpu"), compile=False, shadow=False)
    widths = drive(policy, always(True), FIRST + 12)
    assert [w[0] for w in widths[-4:]] == [4] * 4, widths


def test_cost_policy_never_drafts_where_verification_costs_as_much_as_the_tokens_it_could_save():
    # Each drafted token costs a whole plain step: E(w) <= 1 + w = T(w) / T(0), drafting never pays.
    policy = DraftLengthPolicy(4, 1, torch.device("cpu"), compile=False, shadow=False)
    widths = drive(policy, always(True), 120, costs={w: 1.0 + w for w in range(5)})
    # The first probe and at most two width-1 steps (their cost unmeasured, then measured), then
    # probes that each cost a whole plain step: one per 1 / PROBE_BUDGET = 50 plain steps.
    drafted = [w[0] for w in widths]
    assert max(drafted) == 1 and sum(drafted[: FIRST + 3]) <= 3, drafted
    assert sum(drafted[FIRST + 3:]) <= 2 and drafted[FIRST + 3: FIRST + 3 + 45] == [0] * 45, drafted


def test_cost_policy_with_shadow_drafts_learns_without_drafting_and_sets_rows_apart():
    policy = DraftLengthPolicy(4, 2, torch.device("cpu"), compile=False, shadow=True)
    widths = drive(policy, always(True, False), 10)
    assert widths[:P_.WARMUP] == [[0, 0]] * P_.WARMUP  # shadow warm-up
    assert widths[-1] == [4, 0]  # the copying row drafts at the batch's width; the other does not


def test_cost_policy_follows_compaction():
    policy = DraftLengthPolicy(4, 3, torch.device("cpu"), compile=False, shadow=True)
    drive(policy, always(True, False, True), 6)
    before = policy.lengths(torch.zeros(3, dtype=torch.bool))
    policy.select_rows(torch.tensor([2, 1]))
    assert policy.lengths(torch.zeros(2, dtype=torch.bool)).tolist() == before[[2, 1]].tolist()


@settings(max_examples=15, deadline=None)
@given(prefix=st.lists(st.booleans(), max_size=40), shadow=st.booleans(), compile=st.booleans())
def test_cost_policy_any_history_resumes_when_drafts_pass_and_stops_when_they_fail(prefix, shadow, compile):
    """Whatever came before, a row whose drafts start passing is drafting K tokens within the
    probe gap that history can reach, and once they fail again it is back to plain steps with
    probes ever further apart."""
    policy = DraftLengthPolicy(4, 1, torch.device("cpu"), compile=compile, shadow=shadow)
    n, on, off = len(prefix), 300, 340  # 40 steps hold at most 2 failed probes: gaps of 4 * base_gap <= 120
    stream = lambda step: [prefix[step] if step < n else step < n + on]  # noqa: E731
    drafted = [w[0] for w in drive(policy, stream, n + on + off)]
    assert drafted[n + on - 4: n + on] == [4] * 4, drafted[n:n + on]
    tail = drafted[n + on + 40:]
    if shadow:  # shadow checks replace probes: no drafting at all
        assert sum(tail) == 0, tail
        return
    # Only probes (one step of the narrowest width), ever further apart: gaps doubling up to the cap.
    assert set(tail) <= {0, policy.widths[1]}, tail
    at = [i for i, w in enumerate(tail) if w]
    runs = [b - a - 1 for a, b in zip(at, at[1:])]
    cap = P_.MAX_GAP * policy.base_gap()
    assert len(runs) >= 2, runs
    assert all(r2 == min(2 * r1, cap) for r1, r2 in zip(runs, runs[1:])), runs
    # Backed off, the steps between probes were decided on the host alone.
    assert policy.full <= n + on + 40 + 2 * len(at), (policy.full, len(at))


def lookup_reference(row: list[int], L: int, k: int, max_ngram: int, min_ngram: int) -> list[int]:
    """Prompt lookup in plain Python: the longest n-gram suffix of row[:L+1] (n from max_ngram
    down), its latest earlier occurrence ending before L, and up to k tokens after it."""
    for n in range(max_ngram, min_ngram - 1, -1):
        if L + 1 < n:
            continue
        suffix = row[L - n + 1: L + 1]
        ends = [j for j in range(n - 1, L) if row[j - n + 1: j + 1] == suffix]
        if ends:
            return row[ends[-1] + 1: min(ends[-1] + 1 + k, L + 1)]
    return []


@settings(max_examples=60, deadline=None)
@given(data=st.data(), W=st.integers(1, 24), P=st.integers(1, 4), k=st.integers(1, 4),
       ngrams=st.tuples(st.integers(1, 4), st.integers(0, 2)))
def test_prompt_lookup_matches_the_plain_python_lookup(data, W, P, k, ngrams):
    min_ngram, max_ngram = ngrams[0], ngrams[0] + ngrams[1]
    rows = [data.draw(st.lists(st.integers(0, 3), min_size=W, max_size=W)) for _ in range(P)]
    L = [data.draw(st.integers(0, W - 1)) for _ in range(P)]
    ctx = DraftContext(torch.tensor(rows), torch.tensor(L), None, None, W, False, "torch", None)
    tokens, lens, _ = PromptLookup(max_len=4, max_ngram=max_ngram, min_ngram=min_ngram).propose(ctx, k)
    for b in range(P):
        want = lookup_reference(rows[b], L[b], k, max_ngram, min_ngram)
        assert tokens[b, : lens[b]].tolist() == want, (rows[b], L[b])


def test_draft_names_build_cost_policies_and_bad_modes_are_refused():
    assert as_draft_source("ngram").adaptive == "cost"
    assert as_draft_source("layer:1").adaptive == "cost"
    assert PromptLookup().adaptive is False
    with pytest.raises(ValueError, match="adaptive must be False, True or 'cost', got 'fast'"):
        PromptLookup(adaptive="fast")


class WrongLayerDraft(EarlyLayerDraft):
    """An early-layer draft that proposes a token the target never emits, and counts its calls."""

    calls: list[int] = []
    policies: list[DraftLengthPolicy] = []

    def __init__(self, token: int) -> None:
        super().__init__(1, max_len=4, adaptive="cost")
        self.token = token

    def start(self, *args) -> None:
        super().start(*args)
        WrongLayerDraft.policies.append(self.policy)

    def propose(self, ctx, k):
        tokens, lens, probs = super().propose(ctx, k)
        WrongLayerDraft.calls.append(k)
        return torch.full_like(tokens, self.token), lens, probs


def test_backed_off_draft_issues_no_draft_or_verify_calls(monkeypatch):
    model = tiny("llama")
    prompts = [[5, 6, 7, 5], [9, 10, 11]]
    n = FIRST + 40
    base = haltkit.generate(model, prompts, exit=ExitPolicy(max_new_tokens=n))
    never = min(set(range(111)) - {t for row in base.tokens for t in row})
    verifies, plain = [], []
    real_verify, real_decode = engine.verify_step, engine.decode_step
    monkeypatch.setattr(engine, "verify_step", lambda *a, **kw: verifies.append(1) or real_verify(*a, **kw))
    monkeypatch.setattr(engine, "decode_step", lambda *a, **kw: plain.append(1) or real_decode(*a, **kw))
    WrongLayerDraft.calls, WrongLayerDraft.policies = [], []
    res = haltkit.generate(model, prompts, exit=ExitPolicy(max_new_tokens=n), draft=WrongLayerDraft(never))
    assert res.tokens == base.tokens and sum(res.accepted) == 0
    policy = WrongLayerDraft.policies[0]
    # Only probes draft (the first after FIRST plain steps, the next ones >= 2 * MIN_GAP apart),
    # plus at most one width-1 retry each where a busy machine's clock made drafting look cheap:
    # one draft call and one verification per drafting step, and every other step a plain one.
    assert 1 <= policy.probes <= 3, policy.probes
    assert WrongLayerDraft.calls == [1] * len(verifies) and policy.probes <= len(verifies) <= 2 * policy.probes
    assert len(plain) == 1 + n - 1 - len(verifies)  # the prefill's, then one per plain step


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def step_ops(model, prompts, draft, n1: int, n2: int) -> Counter:
    """The aten operators that steps n1 + 1 .. n2 of a call add to it (setup cancels out)."""
    counts = []
    for n in (n1, n2):
        with OpCounter() as c:
            haltkit.generate(model, prompts, exit=ExitPolicy(max_new_tokens=n), draft=draft)
        counts.append(c.ops)
    return counts[1] - counts[0]


@pytest.mark.parametrize("draft", ["layer:1", lambda m: DraftModel(tiny("llama", seed=3, layers=1), adaptive="cost")])
def test_backed_off_step_is_exactly_the_plain_step(draft):
    """Before the first probe, a model draft's steps run the very operators of the plain step."""
    model = tiny("llama")
    prompts = [[5, 6, 7, 5], [9, 10, 11]]
    source = draft if isinstance(draft, str) else draft(model)
    assert FIRST >= 10
    assert step_ops(model, prompts, source, 4, 9) == step_ops(model, prompts, None, 4, 9)


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_cost_policy_leaves_the_output_unchanged(sampling, monkeypatch):
    model = tiny("llama")
    # Probes every MIN_GAP steps, so that model drafts draft within a short call.
    monkeypatch.setattr(DraftLengthPolicy, "PROBE_BUDGET", 1.0)
    # And prompt lookup drafts on a shadow pass or two (the tiny random model seldom copies for long).
    monkeypatch.setattr(DraftLengthPolicy, "SHADOW_FIXED_PRIOR", 0.0)
    monkeypatch.setattr(DraftLengthPolicy, "SHADOW_TOKEN_PRIOR", 0.0)
    # Rows that repeat themselves (prompt lookup finds its drafts) and ragged ones.
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 10], [3, 4, 3, 4, 3], [8]]
    kw = dict(exit=ExitPolicy(max_new_tokens=14), sampling=None if sampling == "greedy" else sampled(4))
    base = haltkit.generate(model, prompts, **kw)
    for source in (PromptLookup(max_len=3, adaptive="cost"), EarlyLayerDraft(1, max_len=4, adaptive="cost"),
                   DraftModel(tiny("llama", seed=7, layers=1, hidden=16), max_len=3, adaptive="cost"), "ngram",
                   DraftModel(model, max_len=3, adaptive="cost")):
        res = haltkit.generate(model, prompts, draft=source, **kw)
        assert res.tokens == base.tokens, source
        assert sum(res.verify_steps) > 0, source  # the drafting path ran
    ragged = ragged_prompts(3)
    assert haltkit.generate(model, ragged, draft="layer:1", exit=ExitPolicy(max_new_tokens=9)).tokens == \
        haltkit.generate(model, ragged, exit=ExitPolicy(max_new_tokens=9)).tokens


def test_shadow_policy_at_batch_one_waits_for_copying_not_a_chat_answers_first_words():
    """A chat answer's first words often come from its prompt (two passes, then failures with the
    odd pass): at one row a wider forward costs ~0.6 of a step before any token is saved, so that
    must not start drafting; copying (every check passes) drafts K from its fourth check."""
    chat = [True, True, False, False, False, False, True, False, False, False, True, False] * 3
    policy = DraftLengthPolicy(4, 1, torch.device("cpu"), compile=False, shadow=True)
    assert sum(w[0] for w in drive(policy, lambda step: [chat[step]], len(chat))) == 0
    policy = DraftLengthPolicy(4, 1, torch.device("cpu"), compile=False, shadow=True)
    drafted = [w[0] for w in drive(policy, always(True), 8)]
    assert drafted == [0] * P_.WARMUP + [4] * (8 - P_.WARMUP), drafted


def test_shadow_policy_resumes_when_a_chat_row_starts_copying():
    policy = DraftLengthPolicy(4, 1, torch.device("cpu"), compile=False, shadow=True)
    chat = [False, False, True, False, False, False, False, True, False, False] * 4
    stream = lambda step: [chat[step] if step < len(chat) else True]  # noqa: E731
    drafted = [w[0] for w in drive(policy, stream, len(chat) + 12)]
    assert sum(drafted[: len(chat)]) == 0, drafted
    assert min(drafted[-4:]) > 0 and drafted[-3:] == [4] * 3, drafted[len(chat):]


def _set_rows(policy: DraftLengthPolicy, accepted: list[float], rejected: list[float]) -> None:
    policy.accepted, policy.rejected = torch.tensor(accepted), torch.tensor(rejected)
    policy.seen = torch.full((len(accepted),), 10.0)


def test_rows_that_do_not_draft_pay_the_wider_step_without_its_gain():
    """One copying row (acceptance 0.87) among three that would not draft on their own (0.3):
    widening all four rows' step by 20% a token for the one row's gain does not pay; alone, it does."""
    policy = DraftLengthPolicy(4, 4, torch.device("cpu"), compile=False, shadow=True)
    policy.T = {w: 1.0 + 0.2 * w for w in range(5)}
    _set_rows(policy, [9.0, 3.0, 3.0, 3.0], [0.0, 7.0, 7.0, 7.0])
    assert policy.lengths(torch.zeros(4, dtype=torch.bool)).tolist() == [0, 0, 0, 0]
    _set_rows(policy, [9.0, 9.0, 3.0, 3.0], [0.0, 0.0, 7.0, 7.0])  # two copying rows: it pays
    assert policy.lengths(torch.zeros(4, dtype=torch.bool)).tolist() == [4, 4, 0, 0]
    alone = DraftLengthPolicy(4, 1, torch.device("cpu"), compile=False, shadow=True)
    alone.T = dict(policy.T)
    _set_rows(alone, [9.0], [0.0])
    assert alone.lengths(torch.zeros(1, dtype=torch.bool)).tolist() == [4]


def test_backed_off_shadow_policy_decides_on_the_host_until_a_check_passes():
    """On a CPU, a step after which no shadow check passed leaves the decision (no draft) as it
    was, without a device op; a pass makes it decide again, and a copying row then drafts."""
    policy = DraftLengthPolicy(4, 2, torch.device("cpu"), compile=False, shadow=True)
    policy.T = {0: 1.0}
    _set_rows(policy, [9.0, 0.0], [0.0, 5.0])
    policy.tick(0)
    policy.observe(torch.ones(2, dtype=torch.int64), torch.zeros(2, dtype=torch.bool))
    finished = torch.zeros(2, dtype=torch.bool)
    with OpCounter() as c:
        k = policy.lengths(finished)
    assert k.tolist() == [0, 0] and not c.ops, c.ops
    policy.observe(torch.ones(2, dtype=torch.int64), torch.tensor([True, False]))
    with OpCounter() as c:
        k = policy.lengths(finished)
    assert k[0] > 0 and k[1] == 0 and c.ops, k


def test_backed_off_prompt_lookup_step_is_the_plain_step_and_a_few_ops():
    """Prompt lookup backed off (nothing it would draft passes): no verification, the plain
    step's operators, plus its shadow check (a few ops over the row, whatever the n-gram size)."""
    model = tiny("llama")
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12]]
    source = PromptLookup(max_len=4, max_ngram=3, adaptive="cost")
    extra = step_ops(model, prompts, source, 4, 9) - step_ops(model, prompts, None, 4, 9)
    assert not any("verify" in op for op in extra), extra
    # The per-step budget (5 steps): the lookup, its check against the emitted token, the
    # acceptance counts. The decision itself is taken on the host while no check passes.
    assert sum(extra.values()) <= 5 * 50, (sum(extra.values()) / 5, extra)
