"""Draft lengths by measured cost (``adaptive="cost"``, :class:`haltkit.drafts.DraftLengthPolicy`).

The policy is driven here with step costs set by hand (the wall clock of a shared machine would
make the decisions, not the output, vary), and through ``generate``, where whatever it decides
must leave the output token for token that of decoding without a draft.
"""

from __future__ import annotations

import pytest
import torch

import haltkit
from haltkit import DraftModel, EarlyLayerDraft, ExitPolicy, PromptLookup
from haltkit.drafts import DraftLengthPolicy, as_draft_source

pytest.importorskip("transformers")
from engine_models import ragged_prompts, sampled, tiny  # noqa: E402

#: Seconds per step by width: each drafted token costs 15% of a plain step to verify.
COSTS = {w: 1.0 + 0.15 * w for w in range(5)}


def drive(policy: DraftLengthPolicy, passes: list[bool], steps: int, costs=COSTS) -> list[list[int]]:
    """Run the policy for ``steps`` steps on rows whose drafts all pass (True) or all fail."""
    running = torch.ones(len(passes), dtype=torch.bool)
    ok = torch.tensor(passes)
    widths = []
    k = policy.lengths(running)
    for _ in range(steps):
        widths.append(k.tolist())
        w = int(k.max())
        policy.T[w] = costs[w]  # what tick() would have measured for that width
        if policy.shadow and w == 0:
            policy.observe(torch.ones_like(k), ok.long())  # the would-be first draft token
        else:
            policy.observe(k, torch.where(ok, k, 0))
        k = policy.lengths(running)
    return widths


def test_cost_policy_backs_off_to_no_draft_when_drafts_are_rejected():
    policy = DraftLengthPolicy(4, 1, torch.device("cpu"), compile=False, shadow=False)
    widths = drive(policy, [False], 60)
    assert widths[0] == [0]  # the plain step is timed first
    assert widths[1] == [1]  # then one width is tried, and fails
    drafted = [w[0] for w in widths[2:]]
    # Backed off to 0. Probes of width 1 cost 15% of a step more: one per ceil(0.15 / 0.02) = 8
    # idle steps keeps them within 2%, and that gap doubles after each failure (twice so far).
    assert drafted == [0] * 16 + [1] + [0] * 32 + [1] + [0] * 8, drafted


def test_cost_policy_drafts_the_full_length_when_drafts_pass():
    policy = DraftLengthPolicy(4, 1, torch.device("cpu"), compile=False, shadow=False)
    widths = drive(policy, [True], 12)
    assert [w[0] for w in widths[-4:]] == [4] * 4, widths


def test_cost_policy_never_drafts_where_verification_costs_as_much_as_the_tokens_it_could_save():
    # Each drafted token costs a whole plain step: E(w) <= 1 + w = T(w) / T(0), drafting never pays.
    policy = DraftLengthPolicy(4, 1, torch.device("cpu"), compile=False, shadow=False)
    widths = drive(policy, [True], 30, costs={w: 1.0 + w for w in range(5)})
    assert sum(w[0] for w in widths[3:]) <= 2, widths  # the exploration, and at most a probe


def test_cost_policy_with_shadow_drafts_learns_without_drafting_and_sets_rows_apart():
    policy = DraftLengthPolicy(4, 2, torch.device("cpu"), compile=False, shadow=True)
    widths = drive(policy, [True, False], 10)
    assert widths[:DraftLengthPolicy.WARMUP] == [[0, 0]] * DraftLengthPolicy.WARMUP  # shadow warm-up
    assert widths[-1] == [4, 0]  # the copying row drafts at the batch's width; the other does not


def test_cost_policy_follows_compaction():
    policy = DraftLengthPolicy(4, 3, torch.device("cpu"), compile=False, shadow=True)
    drive(policy, [True, False, True], 6)
    before = policy.lengths(torch.ones(3, dtype=torch.bool))
    policy.select_rows(torch.tensor([2, 1]))
    assert policy.lengths(torch.ones(2, dtype=torch.bool)).tolist() == before[[2, 1]].tolist()


def test_draft_names_build_cost_policies_and_bad_modes_are_refused():
    assert as_draft_source("ngram").adaptive == "cost"
    assert as_draft_source("layer:1").adaptive == "cost"
    assert PromptLookup().adaptive is False
    with pytest.raises(ValueError, match="adaptive must be False, True or 'cost', got 'fast'"):
        PromptLookup(adaptive="fast")


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_cost_policy_leaves_the_output_unchanged(sampling):
    model = tiny("llama")
    # Rows that repeat themselves (prompt lookup finds its drafts) and ragged ones.
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 10], [3, 4, 3, 4, 3], [8]]
    kw = dict(exit=ExitPolicy(max_new_tokens=14), sampling=None if sampling == "greedy" else sampled(4))
    base = haltkit.generate(model, prompts, **kw)
    for source in (PromptLookup(max_len=3, adaptive="cost"), EarlyLayerDraft(1, max_len=4, adaptive="cost"),
                   DraftModel(tiny("llama", seed=7, layers=1, hidden=16), max_len=3, adaptive="cost"), "ngram"):
        res = haltkit.generate(model, prompts, draft=source, **kw)
        assert res.tokens == base.tokens, source
    ragged = ragged_prompts(3)
    assert haltkit.generate(model, ragged, draft="layer:1", exit=ExitPolicy(max_new_tokens=9)).tokens == \
        haltkit.generate(model, ragged, exit=ExitPolicy(max_new_tokens=9)).tokens
