"""The Hugging Face adapter: value exits inside HF's own generate give haltkit.generate's tokens,
finish reasons and finish steps."""

from __future__ import annotations

import pytest
import torch

import haltkit
from haltkit import ExitPolicy, MarginalValueHead, SamplingParams

pytest.importorskip("transformers")
from haltkit.hf import ValueExit  # noqa: E402

from engine_models import PAD, countdown_head, left_padded, ragged_prompts, sampled, tiny  # noqa: E402


def hf_run(model, prompts, vx: ValueExit, max_new: int) -> torch.Tensor:
    ids, mask = left_padded(prompts)
    try:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, pad_token_id=PAD,
                             eos_token_id=None, logits_processor=[vx.processor], stopping_criteria=[vx.stopping])
    finally:
        vx.close()
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_adapter_gives_generate_tokens_reasons_and_finish_steps(family):
    model = tiny(family)
    budget, patience = 14, 2
    head = countdown_head(32, budget)
    prompts = ragged_prompts(5)
    ks = [None, 2, 5, 0, None]
    exits = [ExitPolicy(max_new_tokens=budget, cost_of_time=None if k is None else 100.0 - k + 0.5,
                        patience=patience, eos_token_ids=(7,), exit_tokens=(100, 101) if b == 2 else ())
             for b, k in enumerate(ks)]
    params = sampled(5)
    params[0] = SamplingParams(temperature=0.0)
    want = haltkit.generate(model, prompts, value_head=head, exit=exits, sampling=params)

    vx = ValueExit(model, head, exit=exits, sampling=params)
    out = hf_run(model, prompts, vx, budget)
    assert vx.tokens() == want.tokens
    assert vx.finish_reason() == want.finish_reason
    assert vx.think_end() == want.think_end
    assert vx.values() == want.values
    # In HF's own output, each row holds its tokens, then (value exit without exit tokens, or a
    # row done before the others) only padding.
    for b, toks in enumerate(want.tokens):
        row = out[b].tolist()
        assert row[: len(toks)] == toks
        assert all(t == PAD for t in row[len(toks):])


def test_adapter_without_exits_is_plain_greedy_generate():
    model = tiny("llama")
    prompts = ragged_prompts(3)
    ids, mask = left_padded(prompts)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=PAD,
                           eos_token_id=None)[:, ids.shape[1]:]
    vx = ValueExit(model, exit=ExitPolicy(max_new_tokens=9), batch_size=3)
    assert torch.equal(hf_run(model, prompts, vx, 9), plain)
    assert vx.finish_reason() == ["length"] * 3


def test_adapter_refuses_a_head_of_the_wrong_size_and_a_wrong_batch():
    model = tiny("llama")
    with pytest.raises(ValueError, match="value head reads hidden states of size 16 but .* size 32"):
        ValueExit(model, MarginalValueHead(16), exit=ExitPolicy(max_new_tokens=4), batch_size=2)
    vx = ValueExit(model, exit=ExitPolicy(max_new_tokens=4), batch_size=2)
    with pytest.raises(ValueError, match="the requests describe 2 rows but generate scored 3"):
        hf_run(model, ragged_prompts(3), vx, 4)
    with pytest.raises(ValueError, match=r"row 1: ExitPolicy\(cost_of_time=0.5\) .* value_head is None"):
        ValueExit(model, exit=[ExitPolicy(max_new_tokens=4), ExitPolicy(max_new_tokens=4, cost_of_time=0.5)])
