"""haltkit.generate end to end on tiny random-weight models: lossless against Hugging Face's
generate, speculation and compaction that never change the output, value exits at a known step,
and bad input refused before any model work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import haltkit
from haltkit import DraftModel, EarlyLayerDraft, ExitPolicy, MarginalValueHead, PromptLookup

pytest.importorskip("transformers")
from engine_models import PAD, V, countdown_head, forward_calls, hf_generate, ragged_prompts, sampled, tiny  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def greedy(max_new: int, eos: int | None = None, **kw) -> ExitPolicy:
    return ExitPolicy(max_new_tokens=max_new, eos_token_ids=() if eos is None else (eos,), **kw)


# -- lossless against Hugging Face ----------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gpt2"])
@pytest.mark.parametrize("B", [1, 4, 7])
def test_greedy_matches_hf_generate_token_for_token(family, B):
    model = tiny(family)
    prompts = ragged_prompts(B)
    max_new = 14
    # EOS is a token the first row really emits at step 3, so rows finish early and leave the batch.
    eos = haltkit.generate(model, prompts[:1], exit=greedy(max_new)).tokens[0][3]
    want = hf_generate(model, prompts, max_new, eos)
    res = haltkit.generate(model, prompts, exit=greedy(max_new, eos))
    assert res.tokens == want
    assert res.finish_reason == ["eos" if t[-1] == eos else "length" for t in want]
    assert res.num_steps == [len(t) for t in want]


def test_tensor_input_with_left_or_right_padding_equals_ragged_lists():
    model = tiny("llama")
    prompts = ragged_prompts(4)
    want = haltkit.generate(model, prompts, exit=greedy(6)).tokens
    T = max(map(len, prompts))
    for left in (True, False):
        ids = torch.full((4, T), PAD)
        mask = torch.zeros(4, T, dtype=torch.long)
        for b, p in enumerate(prompts):
            sl = slice(T - len(p), T) if left else slice(0, len(p))
            ids[b, sl] = torch.tensor(p)
            mask[b, sl] = 1
        assert haltkit.generate(model, ids, attention_mask=mask, exit=greedy(6)).tokens == want


def test_plain_module_with_the_forward_contract_runs_like_the_hf_model():
    class Plain(nn.Module):
        """No base_model / output embeddings: only Hugging Face's forward arguments and outputs."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.config = inner.config

        def forward(self, **kw):
            return self.inner(**kw)

    model = tiny("llama")
    prompts = ragged_prompts(3)
    assert haltkit.generate(Plain(model), prompts, exit=greedy(8)).tokens == \
        haltkit.generate(model, prompts, exit=greedy(8)).tokens


# -- speculation never changes the output -----------------------------------------------------------

def draft_sources(family: str):
    small = tiny(family, seed=7, layers=1, hidden=16)
    return {
        "draft-model": DraftModel(small, max_len=3),
        "prompt-lookup": PromptLookup(max_len=3),
        "early-layer-adaptive": EarlyLayerDraft(1, max_len=4, adaptive=True),
    }


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_every_draft_source_gives_identical_greedy_output(family):
    model = tiny(family)
    # Repetitive prompts so prompt lookup finds matches; a short one to exercise ragged drafts.
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 10], [3, 4, 3, 4, 3], [8]]
    base = haltkit.generate(model, prompts, exit=greedy(12))
    for name, source in draft_sources(family).items():
        res = haltkit.generate(model, prompts, exit=greedy(12), draft=source)
        assert res.tokens == base.tokens, name
        assert all(d > 0 for d in res.drafted) or name == "prompt-lookup", name
        assert res.target_forwards <= base.target_forwards, name
    same = haltkit.generate(model, prompts, exit=greedy(12), draft=DraftModel(model, max_len=4, adaptive=True))
    assert same.tokens == base.tokens
    assert same.accepted == same.drafted  # the target drafting for itself is always right


def test_seeded_sampling_is_identical_with_and_without_speculation():
    model = tiny("llama")
    prompts = ragged_prompts(4)
    base = haltkit.generate(model, prompts, exit=greedy(12), sampling=sampled(4))
    for name, source in draft_sources("llama").items():
        res = haltkit.generate(model, prompts, exit=greedy(12), sampling=sampled(4), draft=source)
        assert res.tokens == base.tokens, name
    # A model drafting for itself samples with the target's own rule: every draft is accepted.
    same = haltkit.generate(model, prompts, exit=greedy(12), sampling=sampled(4), draft=DraftModel(model))
    assert same.tokens == base.tokens and same.accepted == same.drafted


def test_a_sequence_does_not_depend_on_its_batch_companions():
    model = tiny("llama")
    prompts = ragged_prompts(5)
    params = sampled(5)
    together = haltkit.generate(model, prompts, exit=greedy(12), sampling=params)
    for b in (0, 3):
        alone = haltkit.generate(model, [prompts[b]], exit=greedy(12), sampling=[params[b]])
        assert alone.tokens[0] == together.tokens[b]
        spec = haltkit.generate(model, [prompts[b]], exit=greedy(12), sampling=[params[b]], draft="layer:1")
        assert spec.tokens[0] == together.tokens[b]


def test_rejection_sampling_keeps_greedy_rows_lossless():
    model = tiny("llama")
    prompts = ragged_prompts(3)
    base = haltkit.generate(model, prompts, exit=greedy(10))
    small = tiny("llama", seed=7, layers=1, hidden=16)
    res = haltkit.generate(model, prompts, exit=greedy(10), draft=DraftModel(small), method="rejection")
    assert res.tokens == base.tokens
    mixed = haltkit.generate(model, prompts, exit=greedy(10), sampling=sampled(3), draft=DraftModel(small),
                             method="rejection")
    assert all(len(t) == 10 and all(0 <= x < V for x in t) for t in mixed.tokens)


def test_rejection_sampling_draws_from_the_targets_distribution():
    """Speculative sampling's promise: the second token (the first one a verification pass judges,
    accepting or resampling the draft's) is distributed as the target's sum_t0 p(t0) p(t1 | t0).
    Chi-square goodness of fit over N rows, failing by chance with probability 1e-6; the draft is
    another model, so most drafts are rejected or resampled."""
    scipy_stats = pytest.importorskip("scipy.stats")
    np = pytest.importorskip("numpy")
    model = tiny("llama")
    small = tiny("llama", seed=7, layers=1, hidden=16)
    for m, spread in ((model, 40.0), (small, 40.0)):  # peaked distributions, unlike each other
        with torch.no_grad():
            m.lm_head.weight.mul_(spread)
    prompt, T, N = [5, 9, 2], 1.0, 6000
    with torch.no_grad():
        p0 = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double() / T, -1)
        nxt = torch.tensor([prompt + [t] for t in range(V)])
        p1_given = torch.softmax(model(nxt).logits[:, -1].double() / T, -1)
    p1 = (p0 @ p1_given).numpy()
    res = haltkit.generate(model, [prompt] * N, exit=greedy(2), draft=DraftModel(small, max_len=3),
                           method="rejection", sampling=[haltkit.SamplingParams(temperature=T, seed=s)
                                                         for s in range(N)])
    assert sum(res.drafted) > 0 and sum(res.accepted) < sum(res.drafted)  # a real mix of accept / reject
    counts = np.bincount([t[1] for t in res.tokens], minlength=V)
    exp = p1 * N
    big = exp >= 5
    obs, e = counts[big], exp[big]
    if not big.all():
        obs, e = np.append(obs, counts[~big].sum()), np.append(e, exp[~big].sum())
    assert scipy_stats.chisquare(obs, e).pvalue > 1e-6


def test_unseeded_sampling_draws_fresh_seeds_per_row_and_call_while_seeded_repeats():
    model = tiny("llama")
    prompts = [[5, 6, 7]] * 4
    hot = haltkit.SamplingParams(temperature=1.5)
    one = haltkit.generate(model, prompts, exit=greedy(8), sampling=hot).tokens
    two = haltkit.generate(model, prompts, exit=greedy(8), sampling=hot).tokens
    assert len({tuple(t) for t in one}) == 4 and one != two  # 111 tokens at T=1.5: a repeat is ~never chance
    seeded = haltkit.SamplingParams(temperature=1.5, seed=3)
    again = haltkit.generate(model, prompts, exit=greedy(8), sampling=seeded).tokens
    assert again == haltkit.generate(model, prompts, exit=greedy(8), sampling=seeded).tokens
    assert len({tuple(t) for t in again}) == 1  # one seed for every row: the same draw


# -- value exits and compaction ---------------------------------------------------------------------

@pytest.mark.parametrize("draft", [None, "layer:1", "ngram"])
def test_value_exit_ends_exactly_those_sequences_at_the_known_step(draft):
    model = tiny("llama")
    budget, patience = 16, 3
    head = countdown_head(32, budget)
    prompts = ragged_prompts(5)
    # Sequence b's value drops below its lambda from step k_b on; with patience 3 it exits at
    # step k_b + 2 without emitting (no exit tokens), or switches to forced exit tokens.
    ks = [None, 2, 6, None, 0]
    exits = [greedy(budget, cost_of_time=None if k is None else 100.0 - k + 0.5, patience=patience,
                    exit_tokens=(100, 101) if b == 4 else ()) for b, k in enumerate(ks)]
    res = haltkit.generate(model, prompts, exit=exits, value_head=head, draft=draft)
    base = haltkit.generate(model, prompts, exit=greedy(budget))
    for b, k in enumerate(ks):
        if k is None:
            assert res.tokens[b] == base.tokens[b] and res.finish_reason[b] == "length"
            assert res.think_end[b] == "none"
        elif b == 4:  # exit tokens: forced at step k + patience - 1, then sampling resumes
            stop = k + patience - 1
            assert res.tokens[b][:stop] == base.tokens[b][:stop]
            assert res.tokens[b][stop:stop + 2] == [100, 101]
            assert res.think_end[b] == "value" and res.num_steps[b] == budget
        else:
            stop = k + patience - 1
            assert res.tokens[b] == base.tokens[b][:stop]
            assert (res.finish_reason[b], res.think_end[b], res.num_steps[b]) == ("value", "value", stop)
            assert res.values[b] == [100.0 - n for n in range(stop + 1)]


@settings(max_examples=6, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 12), st.sampled_from([None, 1, 4, 9]), st.integers(1, 3),
                          st.booleans(), st.sampled_from([None, "ngram", "layer:1"])), min_size=2, max_size=5),
       st.integers(0, 2**31 - 1))
def test_compaction_never_changes_a_sequence(rows, seed):
    """Random batches (lengths, value exits, patience, exit tokens, sampled or greedy rows): every
    sequence's output in the batch equals its output alone, whoever leaves the batch when."""
    model = tiny("llama")
    head = countdown_head(32, 16)
    prompts = ragged_prompts(len(rows), seed=seed % 1000)
    exits = [greedy(n, cost_of_time=None if k is None else 100.0 - k + 0.5, patience=p,
                    exit_tokens=(100, 101) if forced else ()) for n, k, p, forced, _ in rows]
    params = sampled(len(rows))
    draft = rows[0][4]
    together = haltkit.generate(model, prompts, value_head=head, exit=exits, sampling=params, draft=draft)
    for b in range(len(rows)):
        alone = haltkit.generate(model, [prompts[b]], value_head=head, exit=[exits[b]], sampling=[params[b]])
        assert together.tokens[b] == alone.tokens[0]
        assert together.finish_reason[b] == alone.finish_reason[0]
        assert together.think_end[b] == alone.think_end[0]


def test_patience_and_min_new_tokens_delay_the_value_exit():
    model = tiny("llama")
    budget = 12
    head = countdown_head(32, budget)
    # lambda 97.5: below from step 3; patience 20 never reached within the budget.
    res = haltkit.generate(model, ragged_prompts(2), value_head=head, exit=greedy(budget, cost_of_time=97.5,
                                                                                   patience=20))
    assert res.finish_reason == ["length", "length"]
    res = haltkit.generate(model, ragged_prompts(2), value_head=head,
                           exit=greedy(budget, cost_of_time=97.5, patience=4, min_new_tokens=5))
    assert res.num_steps == [8, 8]  # counting starts at step 5 (min_new_tokens), fires at 8


# -- bad input --------------------------------------------------------------------------------------

class _Tok:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def encode(self, text):
        return [1 + ord(c) % 50 for c in text]

    def decode(self, ids):
        return " ".join(map(str, ids))


@pytest.mark.parametrize("case, match", [
    ("tokenizer_vocab", "tokenizer has 500 tokens but the model's vocabulary has 111"),
    ("head_size", "value head reads hidden states of size 48 but the model's final hidden state has size 32"),
    ("prompt_too_long", "sequence 1: a prompt of 60 tokens plus max_new_tokens=8 needs 68 positions"),
    ("empty_prompt", "prompt 1 is empty"),
    ("draft_vocab", "draft model's vocabulary has 120 entries but the target's has 111"),
    ("token_out_of_vocab", "prompt 0 has token id 111 outside the model's vocabulary"),
    ("early_layer_too_deep", r"layers must be an int in \[1, 2\)"),
    ("unknown_backend", "unknown backend 'tpu'"),
    ("float_token_ids", "prompt 1, position 0: token id 3.0 is a float, not an int"),
    ("bool_token_ids", "prompt 0, position 1: token id True is a bool, not an int"),
    ("bool_input_ids_tensor", "input_ids must be an integer tensor .* torch.bool"),
    ("float_input_ids_tensor", "input_ids must be an integer tensor .* torch.float32"),
    ("mask_with_a_hole", "attention_mask row 1 has a hole: 0 at position 1 between real tokens at 0 and 2"),
    ("mask_not_binary", "attention_mask row 0 holds 2"),
    ("float_max_cache_len", "max_cache_len must be an int >= 1, got 64.0"),
    ("cost_of_time_without_head", r"sequence 1: ExitPolicy\(cost_of_time=0.1\) .* value_head is None"),
    ("cache_beyond_model_positions", r"needs 68 positions, but the cache holds 64 \(the model's max_position"),
    ("draft_positions", r"sequence 0: .* needs 18 positions, but the cache holds 16 \(the draft model's max_position"),
])
def test_bad_input_raises_a_clear_error_before_any_work(case, match):
    model = tiny("llama")
    # Every submodule's forward: generate runs the body and the LM head, never model.forward.
    calls = forward_calls(model)
    kw = dict(exit=greedy(8))
    prompts = [[1, 2], [3, 4, 5]]
    if case == "tokenizer_vocab":
        kw.update(prompts=["ab", "cd"], tokenizer=_Tok(500))
        prompts = None
    elif case == "head_size":
        kw["value_head"] = MarginalValueHead(48)
    elif case == "prompt_too_long":
        prompts[1] = [1] * 60
    elif case == "empty_prompt":
        prompts[1] = []
    elif case == "draft_vocab":
        kw["draft"] = tiny("llama", vocab=120)
    elif case == "token_out_of_vocab":
        prompts[0] = [V]
    elif case == "early_layer_too_deep":
        kw["draft"] = "layer:2"
    elif case == "unknown_backend":
        kw["backend"] = "tpu"
    elif case == "float_token_ids":
        prompts[1] = [3.0, 4.0]
    elif case == "bool_token_ids":
        prompts[0] = [1, True]
    elif case in ("bool_input_ids_tensor", "float_input_ids_tensor"):
        prompts = torch.ones(2, 3, dtype=torch.bool if case.startswith("bool") else torch.float32)
    elif case == "mask_with_a_hole":
        prompts = torch.tensor([[1, 2, 3], [4, 5, 6]])
        kw["attention_mask"] = torch.tensor([[0, 1, 1], [1, 0, 1]])
    elif case == "mask_not_binary":
        prompts = torch.tensor([[1, 2, 3], [4, 5, 6]])
        kw["attention_mask"] = torch.tensor([[2, 1, 1], [1, 1, 1]])
    elif case == "float_max_cache_len":
        kw["max_cache_len"] = 64.0
    elif case == "cost_of_time_without_head":
        kw["exit"] = [greedy(8), greedy(8, cost_of_time=0.1)]
    elif case == "cache_beyond_model_positions":  # a larger max_cache_len does not lift the model's limit
        prompts[1] = [1] * 60
        kw["max_cache_len"] = 100
    elif case == "draft_positions":
        small = tiny("llama", seed=7, layers=1, hidden=16)
        small.config.max_position_embeddings = 16
        draft_calls = forward_calls(small)
        kw.update(draft=small, exit=greedy(16))
    with pytest.raises((ValueError, TypeError), match=match):
        haltkit.generate(model, prompts, **kw)
    assert calls == []
    assert case != "draft_positions" or draft_calls == []


# -- result, CLI, compile, benchmark ----------------------------------------------------------------

def test_result_reports_reasons_timings_and_serialises():
    model = tiny("llama")
    head = countdown_head(32, 10)
    res = haltkit.generate(model, ragged_prompts(2), value_head=head, draft="layer:1", progress=True,
                           exit=[greedy(10), greedy(10, cost_of_time=97.5, patience=1)])
    d = json.loads(json.dumps(res.to_dict()))
    assert d["finish_reason"] == ["length", "value"] and d["num_steps"] == [10, 3]
    assert set(d["timings"]) >= {"prefill", "decode", "compile", "total", "tokens_per_s"}
    assert res.timings["compile"] == 0.0 and res.target_forwards >= 2
    text = repr(res)
    assert "value" in text and "length" in text and "tok/s" in text


def test_cli_generate_runs_a_local_checkpoint(tmp_path, capsys):
    from haltkit.cli import main
    from haltkit.tokenizer import CharTokenizer

    tok = CharTokenizer()
    model = tiny("llama", vocab=tok.vocab_size)
    model.config.eos_token_id = tok.eos_id
    model.save_pretrained(tmp_path)
    tok.save(tmp_path)
    head = countdown_head(32, 12)
    head.save(tmp_path / "head.safetensors")
    assert main(["generate", "--model", str(tmp_path), "--prompt", "Q:1+2<think>", "--prompt", "Q:7<think>",
                 "--max-new-tokens", "12", "--value-head", str(tmp_path / "head.safetensors"),
                 "--cost-of-time", "97.5", "--patience", "2", "--exit-text", "</think>A:", "--draft", "ngram",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["think_end"] == ["value", "value"]
    # Below lambda from step 3, patience 2: the exit text is forced from step 4 on.
    assert all(t[4:7] == list(tok.exit_tokens) for t in out["tokens"])


@pytest.fixture
def toy_checkpoint(tmp_path):
    from haltkit.tokenizer import CharTokenizer

    tok = CharTokenizer()
    model = tiny("llama", vocab=tok.vocab_size)
    model.config.eos_token_id = tok.eos_id
    model.save_pretrained(tmp_path)
    tok.save(tmp_path)
    return tmp_path


@pytest.mark.parametrize("argv, words", [
    (["--model", "{ckpt}/nonexistent"], ["--model", "nonexistent", "the directory does not exist"]),
    (["--prompt", "Q:1+\u00e9"], ["--prompt", "character '\u00e9' at position 4", "vocabulary"]),
    (["--exit-text", "</think>\u00a7"], ["--exit-text", "character '\u00a7' at position 8"]),
    (["--draft", "foo"], ["--draft foo", "not a directory", "'ngram'", "'layer:L'"]),
    (["--cost-of-time", "0.1"], ["--cost-of-time 0.1", "--value-head"]),
    (["--temperature", "-1"], ["temperature must be >= 0", "-1.0"]),
    (["--chat"], ["--chat", "no chat template"]),
    (["--value-head", "{ckpt}/missing.safetensors"], ["--value-head", "missing.safetensors", "does not exist"]),
])
def test_cli_generate_refuses_bad_input_in_one_line_with_exit_2(toy_checkpoint, capsys, monkeypatch, argv, words):
    import haltkit.cli_engine as cli_engine
    from haltkit.cli import main

    argv = [a.format(ckpt=toy_checkpoint) for a in argv]
    loads = []
    real_load = cli_engine._load_local
    monkeypatch.setattr(cli_engine, "_load_local", lambda path: loads.append(path) or real_load(path))
    base = ["generate", "--model", str(toy_checkpoint), "--prompt", "Q:1+2<think>", "--max-new-tokens", "4"]
    assert main(base + argv) == 2
    err = capsys.readouterr().err  # (Hugging Face's weight-loading bar may come first)
    errors = [line for line in err.splitlines() if line.startswith("haltkit generate: error: ")]
    assert len(errors) == 1 and "Traceback" not in err and err.rstrip().endswith(errors[0]), err
    for w in words:
        assert w in err, (w, err)
    if argv[0] in ("--model", "--draft", "--cost-of-time", "--value-head"):
        assert loads == []  # refused before the model loads


def test_cli_generate_help_shows_every_option_with_text_and_defaults(capsys):
    from haltkit.cli import main

    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for opt in ("--model", "--prompt", "--chat", "--value-head", "--cost-of-time", "--patience", "--thinking-budget",
                "--exit-text", "--draft", "--draft-len", "--max-new-tokens", "--temperature", "--top-p", "--seed",
                "--compile", "--backend", "--json"):
        assert f"{opt} " in out
    for default in ("K, the longest draft (default: 4)", "0 = greedy (default: 0.0)", "(default: auto)"):
        assert default in out, default
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", "x", "--prompt", "y", "--no-such-flag"])
    assert e.value.code == 2


def test_cli_chat_wraps_prompts_in_the_tokenizers_template(toy_checkpoint, capsys):
    from haltkit.cli import main

    cfg_path = toy_checkpoint / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = "{% for m in messages %}Q:{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<think>{% endif %}"
    cfg_path.write_text(json.dumps(cfg))
    run = ["generate", "--model", str(toy_checkpoint), "--max-new-tokens", "6", "--json"]
    assert main(run + ["--prompt", "1+2", "--chat"]) == 0
    chat = json.loads(capsys.readouterr().out)
    assert main(run + ["--prompt", "Q:1+2<think>"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert chat["tokens"] == plain["tokens"] and len(chat["tokens"][0]) == 6


def test_tokens_per_second_is_the_decode_loops_without_prefill_or_compile():
    model = tiny("llama")
    res = haltkit.generate(model, ragged_prompts(3), exit=greedy(6))
    t = res.timings
    # 3 rows x 6 tokens, of which the prefill emitted the first of each.
    assert t["tokens_per_s"] == pytest.approx((18 - 3) / (t["decode"] - t["compile"]))
    assert "decode " in repr(res).splitlines()[0] and "prefill" in repr(res).splitlines()[0]


def test_compiled_step_matches_eager_across_buckets_and_is_reused():
    from haltkit import compiled

    model = tiny("llama", seed=3)
    prompts = ragged_prompts(3)
    # Batch 3 runs in the bucket of 4 (one dead slot); when row 1 stops after 2 tokens the two
    # left move into the bucket of 2 (their cache rows copied across), sampled rows included.
    exits = [greedy(6), greedy(2), greedy(6)]
    params = [haltkit.SamplingParams(temperature=0.0)] + sampled(2)
    want = haltkit.generate(model, prompts, exit=exits, sampling=params).tokens
    first = haltkit.generate(model, prompts, exit=exits, sampling=params, compile=True)
    assert first.tokens == want and first.timings["compile"] > 0
    assert [len(t) for t in want] == [6, 2, 6]
    again = haltkit.generate(model, prompts, exit=exits, sampling=params, compile=True)
    assert again.tokens == want and again.timings["compile"] == 0.0
    compiled.clear()


def test_pooled_compiled_runner_follows_a_model_converted_in_place():
    """A model moved to bf16 after a compiled call gets a pooled runner (and KV cache) of bf16, not
    the fp32 buffers of before (whose attention would mix dtypes)."""
    from haltkit import compiled

    model = tiny("llama", seed=3)
    fp32 = compiled.compiled_runner(model, 2, 64)
    assert compiled.compiled_runner(model, 2, 64) is fp32
    model.to(torch.bfloat16)
    bf16 = compiled.compiled_runner(model, 2, 64)
    assert bf16 is not fp32 and bf16.dtype == torch.bfloat16
    compiled.clear()


def test_e2e_benchmark_quick_mode_writes_json_and_markdown(tmp_path):
    out = tmp_path / "e2e"
    subprocess.run([sys.executable, str(REPO / "bench" / "e2e.py"), "--quick", "--out", str(out)], check=True,
                   cwd=tmp_path, capture_output=True)
    data = json.loads(out.with_suffix(".json").read_text())
    names = {r["contender"] for r in data["throughput"]}
    assert names >= {"hf", "hf-assisted", "haltkit (eager)", "haltkit+draft", "haltkit+ngram", "haltkit+layer"}
    assert all(r["same_tokens_as_hf"] for r in data["throughput"])
    assert all(r["tokens_per_s"] > 0 for r in data["throughput"])
    assert "| 1 | hf |" in out.with_suffix(".md").read_text()


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("draft", [None, "layer:1"])
def test_gpu_generate_matches_hf_generate(compile, draft):
    """CUDA: eager or CUDA-graph steps, FlashAttention over the cache when flash-attn is installed."""
    model = tiny("llama").cuda()
    prompts = ragged_prompts(4)
    eos = haltkit.generate(model, prompts[:1], exit=greedy(12)).tokens[0][3]
    want = hf_generate(model, prompts, 12, eos)
    res = haltkit.generate(model, prompts, exit=greedy(12, eos), compile=compile, draft=draft)
    assert res.tokens == want
