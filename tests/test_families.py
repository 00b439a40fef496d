"""Model families whose decoding differs from Llama's, against Hugging Face on tiny random models:
sliding windows (from ``layer_types``, from ``sliding_window`` alone, behind a
``use_sliding_window`` flag), logit transforms after the LM head (scaling, soft-capping) for
greedy and sampled decoding, and the families haltkit refuses (ALiBi, non-attention layers,
nested layers for early-layer drafts) refused before any forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import haltkit
from haltkit import ExitPolicy, SamplingParams

transformers = pytest.importorskip("transformers")
scipy_stats = pytest.importorskip("scipy.stats")
from haltkit.hf import ValueExit  # noqa: E402

from engine_models import PAD, V, forward_calls, hf_generate, left_padded, ragged_prompts, tiny  # noqa: E402

WINDOWED = ["phi3", "starcoder2", "mixtral", "qwen2-window-off", "qwen2-window-all", "cohere2", "gemma2"]
TRANSFORMED = ["cohere", "cohere2", "granite", "gemma2"]
#: A sampling test fails by chance with probability below this (chi-square goodness of fit).
FALSE_FAILURE = 1e-6


def strong_logits(family: str):
    """The tiny model with logits spread wide (std ~3), so that a skipped transform (scale or cap)
    moves the sampling distribution far."""
    model = tiny(family)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(3.0 / _logit_std(model))
    return model


def _logit_std(model) -> float:
    with torch.no_grad():
        return float(model.get_output_embeddings()(model.base_model(torch.tensor([[3, 4, 5]])).last_hidden_state).std())


@pytest.mark.parametrize("family", WINDOWED + ["cohere", "granite"])
def test_greedy_matches_hf_generate_across_the_window(family):
    """Prompts up to 7 tokens plus 14 new ones, windows of 6: every later step reads past the window."""
    model = tiny(family)
    prompts = ragged_prompts(4)
    want = hf_generate(model, prompts, 14, None)
    res = haltkit.generate(model, prompts, exit=ExitPolicy(max_new_tokens=14))
    assert res.tokens == want
    # Speculation shares the windowed masks (the verification pass scores several positions).
    assert haltkit.generate(model, prompts, exit=ExitPolicy(max_new_tokens=14), draft="layer:1").tokens == want


@pytest.mark.parametrize("family", sorted(set(WINDOWED + TRANSFORMED)))
def test_logits_equal_hf_forward_at_every_position_prefill_then_decode(family):
    """The runner's logits (a prefill of 8 tokens, then one cached token per step) equal Hugging
    Face's full forward at every one of 20 positions: windows and transforms included, where a
    greedy comparison on a random model might not notice a window."""
    from haltkit.runner import ModelRunner

    model = strong_logits(family)
    ids = torch.randint(1, V, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(ids).logits
        runner = ModelRunner(model, 2, 24)
        got = [runner.forward(ids[:, :8], torch.zeros(2, dtype=torch.int64), 8)[0]]
        for j in range(8, 20):
            got.append(runner.forward(ids[:, j:j + 1], torch.full((2,), j), j + 1)[0])
    torch.testing.assert_close(torch.cat(got, 1), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", TRANSFORMED)
def test_sampling_draws_from_hugging_faces_distribution(family):
    """N rows of one prompt, one sampled token each, against softmax(HF logits / T): chi-square
    goodness of fit, failing by chance with probability FALSE_FAILURE (seeds are fixed, so a
    given run is deterministic). A skipped transform fails at p < 1e-100."""
    model = strong_logits(family)
    prompt = [7, 19, 3, 88, 41, 5, 62, 30, 11]  # longer than the windows
    T, N = 0.9, 3000
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].double()
    probs = torch.softmax(logits / T, -1).numpy()
    res = haltkit.generate(model, [prompt] * N, exit=ExitPolicy(max_new_tokens=1),
                           sampling=[SamplingParams(temperature=T, seed=s) for s in range(N)])
    counts = np.bincount([t[0] for t in res.tokens], minlength=V)
    expected = probs * N
    big = expected >= 5  # pool the rare tokens into one bin, as the test needs
    obs, exp = counts[big], expected[big]
    if not big.all():
        obs, exp = np.append(obs, counts[~big].sum()), np.append(exp, expected[~big].sum())
    p = scipy_stats.chisquare(obs, exp).pvalue
    assert p > FALSE_FAILURE, (family, p)


@pytest.mark.parametrize("family", ["cohere", "gemma2"])
def test_value_exit_adapter_and_generate_sample_the_same_tokens(family):
    """haltkit.hf.ValueExit inside HF's generate sees HF's transformed logits; generate applies the
    family's transform itself: with the same seeds they emit the same tokens."""
    model = strong_logits(family)
    prompts = ragged_prompts(4)
    # Hot enough that the noise, not the largest logit, picks most tokens: a skipped transform shows.
    params = [SamplingParams(temperature=3.0, top_k=[0, 50][b % 2], seed=500 + b) for b in range(4)]
    want = haltkit.generate(model, prompts, exit=ExitPolicy(max_new_tokens=10), sampling=params)
    vx = ValueExit(model, exit=ExitPolicy(max_new_tokens=10), sampling=params)
    ids, mask = left_padded(prompts)
    try:
        model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD,
                       eos_token_id=None, logits_processor=[vx.processor], stopping_criteria=[vx.stopping])
    finally:
        vx.close()
    assert vx.tokens() == want.tokens


def _common(**kw):
    return dict(vocab_size=V, hidden_size=32, num_attention_heads=4, **kw)


REFUSED = {
    "bloom": (lambda: transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=V, hidden_size=32, n_layer=2,
                                                                             n_head=4)), "ALiBi"),
    "falcon-alibi": (lambda: transformers.FalconForCausalLM(transformers.FalconConfig(
        **_common(num_hidden_layers=2), alibi=True)), "ALiBi"),
    "mamba": (lambda: transformers.MambaForCausalLM(transformers.MambaConfig(vocab_size=V, hidden_size=32,
                                                                             num_hidden_layers=2)),
              "no attention heads"),
    "jamba": (lambda: transformers.JambaForCausalLM(transformers.JambaConfig(
        **_common(num_hidden_layers=2, intermediate_size=64, num_key_value_heads=2, attn_layer_period=2,
                  attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=2,
                  mamba_d_state=4))), r"layers of kind \['linear_attention'\]"),
    "unknown-logit-scale": (lambda: _with_model_type(tiny("cohere"), "cohere_like"), "logit_scale=4.0"),
}


def _with_model_type(model, kind):
    model.config.model_type = kind
    return model


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_families_are_refused_before_any_forward(case):
    build, match = REFUSED[case]
    torch.manual_seed(0)
    model = build().eval()
    calls = forward_calls(model)
    with pytest.raises(TypeError, match=match):
        haltkit.generate(model, [[1, 2, 3]], exit=ExitPolicy(max_new_tokens=4))
    assert calls == []
    # A draft model of such a family is refused the same way.
    target = tiny("llama")
    with pytest.raises(TypeError, match=match):
        haltkit.generate(target, [[1, 2, 3]], exit=ExitPolicy(max_new_tokens=4), draft=haltkit.DraftModel(model))
    assert calls == []


def test_early_layer_draft_on_nested_layers_is_refused_naming_them():
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=32)).eval()
    calls = forward_calls(model)
    with pytest.raises(TypeError, match="nested, at 'decoder.layers'"):
        haltkit.generate(model, [[1, 2, 3]], exit=ExitPolicy(max_new_tokens=4), draft="layer:1")
    assert calls == []
    # The model itself runs (and equals HF); only the early-layer draft is refused.
    prompts = ragged_prompts(3)
    assert haltkit.generate(model, prompts, exit=ExitPolicy(max_new_tokens=6)).tokens == hf_generate(model, prompts, 6,
                                                                                                     None)


def test_the_cache_is_passed_under_the_name_the_model_takes(recwarn):
    """transformers 5.2x renamed ``past_key_values`` to ``cache`` (the old name warns, and goes in
    5.40): the runner passes whichever name the body's forward declares."""
    model = tiny("llama")
    haltkit.generate(model, ragged_prompts(2), exit=ExitPolicy(max_new_tokens=3), draft="layer:1")
    assert not [w for w in recwarn if "past_key_values" in str(w.message)]
