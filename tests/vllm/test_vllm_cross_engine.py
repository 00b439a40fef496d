"""Cross-engine equality: haltkit in vLLM against haltkit.generate, request by request.

The same prompts (as token ids), greedy, the same head and per-request exit policy must give the
same tokens, the same finish step and the same finish reason in both engines. vLLM has no finish
reason of its own for a value or budget exit without exit tokens: such a request ends with one
more token, its EOS, and reason "stop"; every other haltkit reason maps one to one (eos -> stop,
length -> length).
"""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams

import haltkit
from haltkit import ExitPolicy, MarginalValueHead
from haltkit.tokenizer import CharTokenizer
from tinyllama import BUDGET, D_MODEL, ENGINE_KW, PROMPTS

TOK = CharTokenizer()
EOS, EXIT = TOK.eos_id, TOK.exit_tokens


def as_vllm(tokens: list[int], reason: str) -> tuple[list[int], str]:
    """What vLLM reports for a haltkit.generate outcome."""
    if reason in ("value", "budget"):
        return tokens + [EOS], "stop"
    return tokens, {"eos": "stop", "length": "length"}[reason]


def vllm_run(llm, ids: list[list[int]], policies: list[ExitPolicy]) -> list[tuple[list[int], str]]:
    params = []
    for p in policies:
        extra = {"cost_of_time": p.cost_of_time, "patience": p.patience, "min_new_tokens": p.min_new_tokens,
                 "thinking_budget": p.thinking_budget, "exit_tokens": list(p.exit_tokens)}
        extra = {k: v for k, v in extra.items() if v is not None}
        params.append(SamplingParams(temperature=0, max_tokens=p.max_new_tokens, extra_args=extra))
    outs = llm.generate([{"prompt_token_ids": t} for t in ids], params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), o.outputs[0].finish_reason) for o in outs]


def assert_same(res, got, policies) -> None:
    for i, (toks, reason) in enumerate(got):
        want = as_vllm(res.tokens[i], res.finish_reason[i])
        assert (toks, reason) == want, (i, policies[i], res.finish_reason[i], res.think_end[i])


@pytest.fixture(scope="module")
def hf_model(tiny_model):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32).eval()


def test_step_head_exits_match_haltkit_generate(hf_model, step_llm, step_head_file):
    head = MarginalValueHead.load(step_head_file)
    ids = [TOK.encode(p) for p in PROMPTS]
    base = dict(max_new_tokens=BUDGET, eos_token_ids=(EOS,))
    policies = [
        ExitPolicy(cost_of_time=-4.0, **base),
        ExitPolicy(cost_of_time=-2.0, patience=3, exit_tokens=EXIT, **base),
        ExitPolicy(cost_of_time=-1.0, min_new_tokens=6, **base),
        ExitPolicy(thinking_budget=BUDGET, exit_tokens=EXIT, **{**base, "max_new_tokens": BUDGET}),
        ExitPolicy(cost_of_time=-9.0, patience=2, exit_tokens=EXIT, **base),
        ExitPolicy(**base),
        ExitPolicy(cost_of_time=0.0, **base),
    ]
    res = haltkit.generate(hf_model, ids, value_head=head, exit=policies,
                           sampling=haltkit.SamplingParams(temperature=0.0))
    assert {"value", "length"} <= set(res.finish_reason)
    assert_same(res, vllm_run(step_llm, ids, policies), policies)


def test_a_head_reading_the_hidden_state_exits_where_haltkit_generate_does(hf_model, tiny_model, new_llm, tmp_path):
    # Values now depend on the hidden state, so both engines must hand the head the same row
    # of the same final hidden state. Each request's lambda sits in the middle of a wide gap of
    # its own value trace, so fp32 differences between the engines cannot move an exit.
    import haltkit.vllm

    gen = torch.Generator().manual_seed(7)
    head = MarginalValueHead(D_MODEL, hidden=8)
    with torch.no_grad():
        head.w1.normal_(0, 1, generator=gen)
        head.w2.normal_(0, 1, generator=gen)
    path = str(tmp_path / "reader.safetensors")
    head.save(path)
    ids = [TOK.encode(p) for p in PROMPTS]
    sampling = haltkit.SamplingParams(temperature=0.0)
    free = ExitPolicy(max_new_tokens=BUDGET, eos_token_ids=(EOS,))  # values traced, no exits
    trace = haltkit.generate(hf_model, ids, value_head=head, exit=free, sampling=sampling).values
    policies = []
    for i, values in enumerate(trace):
        v = sorted(values[2:12])  # exit somewhere in the first dozen steps
        gap, lam = max((b - a, (a + b) / 2) for a, b in zip(v, v[1:]))
        assert gap > 1e-3
        policies.append(ExitPolicy(cost_of_time=lam, patience=1 + i % 2, max_new_tokens=BUDGET,
                                   eos_token_ids=(EOS,), exit_tokens=EXIT if i % 3 == 0 else ()))
    res = haltkit.generate(hf_model, ids, value_head=head, exit=policies, sampling=sampling)
    assert "value" in res.finish_reason
    llm = new_llm(tiny_model, **haltkit.vllm.engine_args(value_head=path, **ENGINE_KW))
    assert_same(res, vllm_run(llm, ids, policies), policies)


def test_the_shipped_toy_model_exits_where_haltkit_generate_does(new_llm):
    import haltkit.vllm
    from haltkit.models import toy_dir
    from haltkit.tasks import ChainSum, prompt_text
    from haltkit.train.head import sample_problems

    if not (toy_dir() / "meta.json").exists():
        pytest.skip("the toy models are not in this checkout")
    toy = haltkit.load_toy()
    problems = sample_problems(ChainSum(), 6, seed=11, held_out=True)
    ids = [TOK.encode(prompt_text(p)) for p in problems]
    policies = [toy.exit_policy(cost_of_time=lam, thinking_budget=96, patience=2)
                for lam in (0.0, 0.01, 0.05, 0.2, None, 0.02)]
    res = haltkit.generate(toy.target, ids, value_head=toy.head, exit=policies,
                           sampling=haltkit.SamplingParams(temperature=0.0))
    assert "value" in res.think_end, res.think_end
    llm = new_llm(str(toy_dir() / "target"), **haltkit.vllm.engine_args(
        value_head=toy_dir() / "head.safetensors", **ENGINE_KW))
    assert_same(res, vllm_run(llm, ids, policies), policies)
