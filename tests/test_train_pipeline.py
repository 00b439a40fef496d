"""train-head for any Hugging Face causal LM: verifiers, conventions, batched rollouts, manifest,
quality gate, head metadata and the entry points that honour it (tiny models, fast)."""

from __future__ import annotations

import json
import random
import sys
import warnings
import zlib

import pytest
import torch

import haltkit
from haltkit import MarginalValueHead
from haltkit.tasks import ChainSum, JsonlTask, Problem, make_verifier
from haltkit.tokenizer import CharTokenizer
from haltkit.train.conventions import TemplateWarning, resolve_conventions, tokenizer_fingerprint
from haltkit.train.pipeline import ManifestMismatch, RolloutConfig, collect, manifest_key, rollout_batch
from haltkit.train.toy import TOY_CHAT_TEMPLATE
from haltkit.value_head import load_value_head

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def char_fast(tmp_path, template: str | None = TOY_CHAT_TEMPLATE, tags: bool = True):
    """The toy's character vocabulary as a PreTrainedTokenizerFast (no haltkit tokenizer)."""
    from transformers import PreTrainedTokenizerFast

    if tags:
        CharTokenizer().save(tmp_path / "tok")
        tok = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")
    else:  # the same characters, no <think> / </think>
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

        vocab = {t: i for i, t in enumerate(["<pad>", "<eos>"] + list(CharTokenizer().id_to_token[4:]))}
        core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
        core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
        core.decoder = decoders.Fuse()
        core.add_special_tokens(["<pad>", "<eos>"])
        tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")
    tok.chat_template = template
    return tok


def tiny_llama(seed: int = 0, hidden: int = 16):
    from haltkit.train.toy import ModelSpec, build_model

    spec = ModelSpec(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=2,
                     max_position_embeddings=256)
    return build_model(spec, CharTokenizer().vocab_size, seed).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=CharTokenizer().vocab_size, n_embd=16, n_layer=2, n_head=2, n_positions=256,
                     eos_token_id=1, bos_token_id=1, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


# ---------------------------------------------------------------- tasks and verifiers


def test_verifiers_score_formatted_answers(tmp_path):
    p = Problem("q", "1234.5")
    numeric = make_verifier("numeric")
    assert numeric(p, "so the total is $1,234.50.") == 1.0 and numeric(p, r"\boxed{1234.5}") == 1.0
    assert numeric(p, "1234") == 0.0 and numeric(p, "no number") == 0.0
    assert make_verifier("numeric")(Problem("q", "0.75"), "3/4") == 1.0
    choice = make_verifier("choice")
    assert choice(Problem("q", "B"), "(B)") == 1.0 and choice(Problem("q", "B"), "The answer is b.") == 1.0
    assert choice(Problem("q", "B"), "I think C") == 0.0
    assert make_verifier("regex")(Problem("q", r"^4\d$"), "42") == 1.0
    assert make_verifier("exact")(Problem("q", "cat"), " cat ") == 1.0
    (tmp_path / "myverify.py").write_text("def check(answer, problem):\n    return answer.lower() == 'yes'\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert make_verifier("myverify:check")(p, "YES") == 1.0
    finally:
        sys.path.remove(str(tmp_path))
    with pytest.raises(ValueError, match="cannot load 'nope'"):
        make_verifier("myverify_missing_module:nope")
    with pytest.raises(ValueError, match="verifier must be one of"):
        make_verifier("fuzzy")


def test_jsonl_task_reads_chat_rows_and_levels_and_names_bad_lines(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                          {"role": "user", "content": "2+2?"}], "answer": "4", "level": 2}) + "\n"
                 + json.dumps({"prompt": "3+3?", "answer": "6"}) + "\n")
    a, b = JsonlTask(f).problems
    assert a.messages == (("system", "be brief"), ("user", "2+2?")) and a.difficulty == 2 and b.difficulty == 0
    f.write_text(json.dumps({"prompt": "x", "answer": "1", "level": "hard"}) + "\n")
    with pytest.raises(ValueError, match=r"t.jsonl:1: 'level' must be an integer"):
        JsonlTask(f)
    f.write_text(json.dumps({"prompt": "x", "answer": "B"}) + "\n" + json.dumps({"prompt": "y", "answer": "7"}) + "\n")
    with pytest.raises(ValueError, match=r"t.jsonl:2: answer '7' is not a choice letter"):
        JsonlTask(f, verifier="choice")


# ---------------------------------------------------------------- conventions


def test_template_is_rendered_once_and_a_templated_prompt_is_used_as_is(tmp_path):
    tok = char_fast(tmp_path)
    conv = resolve_conventions(tok, tiny_llama(), exit_text="</think>A:")
    plain, wrapped = Problem("8+3+3", "14"), Problem("Q:8+3+3<think>", "14")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = conv.render_all(tok, [plain])[0]
    assert tok.decode(ids) == "Q:8+3+3<think>"
    with pytest.warns(TemplateWarning, match="1 of 2 prompts .*row 1.*used as is, not wrapped again"):
        both = conv.render_all(tok, [plain, wrapped])
    assert both[1] == ids  # never Q:Q:8+3+3<think><think>
    assert conv.exit_ids == tuple(CharTokenizer().exit_tokens) and conv.eos_ids == (1,)


def test_tokenizer_without_the_thinking_tag_is_refused_with_what_to_pass(tmp_path):
    tok = char_fast(tmp_path, tags=False)
    with pytest.raises(ValueError, match=r"think_close: the tokenizer has no '</think>' token .*--think-close"):
        resolve_conventions(tok, tiny_llama())
    conv = resolve_conventions(tok, tiny_llama(), think_close="|", exit_text="|A:")  # one token: accepted
    assert conv.exit_ids[0] == tok.convert_tokens_to_ids("|") and conv.think_open == ""


def test_eos_ids_come_from_the_generation_config(tmp_path):
    model = tiny_llama()
    model.generation_config.eos_token_id = [1, 7]
    assert resolve_conventions(char_fast(tmp_path), model).eos_ids == (1, 7)


# ---------------------------------------------------------------- rollouts


@pytest.mark.filterwarnings("error:.*past_key_values.*:FutureWarning")  # transformers 5.40 drops the old name
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_probes_equal_answers_decoded_from_scratch(tmp_path, family):
    model = tiny_llama(seed=3) if family == "llama" else tiny_gpt2(seed=3)
    tok = char_fast(tmp_path)
    conv = resolve_conventions(tok, model, exit_text="</think>A:")
    rng = random.Random(0)
    problems = [ChainSum().sample(rng, lv) for lv in (1, 3, 5)]  # ragged prompts
    ids = conv.render_all(tok, problems)
    cfg = RolloutConfig(every=3, max_think=11, max_answer=4, probe_batch=5, temperature=0.8, seed=7)
    rolls = rollout_batch(model, tok, conv, ChainSum(), problems, ids, cfg)
    body, lm_head = haltkit.runner.split_model(model)
    for p, r, prompt in zip(problems, rolls, ids):
        T = len(r.think_ids)
        assert r.checkpoints[0] == 0 and r.checkpoints[-1] == T and r.hidden.shape == (T + 1, 16)
        with torch.no_grad():
            full = body(input_ids=torch.tensor([prompt + r.think_ids.tolist()])).last_hidden_state[0]
        torch.testing.assert_close(r.hidden, full[len(prompt) - 1:], rtol=1e-4, atol=1e-4)
        for i, t in enumerate(r.checkpoints.tolist()):
            seq, out, lps = prompt + r.think_ids[:t].tolist() + list(conv.exit_ids), [], []
            with torch.no_grad():
                for _ in range(4):
                    lp = torch.log_softmax(model(torch.tensor([seq])).logits[0, -1], -1)
                    nxt = int(lp.argmax())
                    seq.append(nxt)
                    lps.append(float(lp[nxt]))
                    if nxt == 1:
                        break
                    out.append(nxt)
            assert r.answers[i] == tok.decode(out).strip(), (t, r.answers[i], tok.decode(out))
            # The answer's probability depends on every visible token: a probe that saw one think
            # token too many or too few would differ here even where its argmax does not.
            assert float(r.confidence[i]) == pytest.approx(torch.tensor(lps).mean().exp().item(), rel=1e-4)
            assert int(r.probe_tokens[i]) == len(lps) + len(conv.exit_ids)
            assert r.reward[i] == ChainSum().verify(p, r.answers[i])
    # One seed per rollout: the same settings give the same think phases, another seed others.
    again = rollout_batch(model, tok, conv, ChainSum(), problems, ids, cfg)
    other = rollout_batch(model, tok, conv, ChainSum(), problems, ids, RolloutConfig(**{**cfg.__dict__, "seed": 8}))
    assert [r.think_ids.tolist() for r in again] == [r.think_ids.tolist() for r in rolls]
    assert [r.think_ids.tolist() for r in other] != [r.think_ids.tolist() for r in rolls]


def test_stale_manifest_is_refused_never_mixed(tmp_path):
    model, tok = tiny_llama(seed=1), char_fast(tmp_path)
    conv = resolve_conventions(tok, model, exit_text="</think>A:")
    problems = [ChainSum().sample(random.Random(i), 1) for i in range(4)]
    ids = conv.render_all(tok, problems)
    cfg = RolloutConfig(every=4, max_think=6, max_answer=3, shard_size=2)
    key = manifest_key(model, tok, conv, cfg, {"file": "a"}, 4)
    first = collect(model, tok, conv, ChainSum(), problems, ids, tmp_path / "r", cfg, key, progress=False)
    (tmp_path / "r" / "shard_00001.safetensors").unlink()  # interrupted: the same key resumes
    again = collect(model, tok, conv, ChainSum(), problems, ids, tmp_path / "r", cfg, key, progress=False)
    assert [r.answers for r in again] == [r.answers for r in first]
    other = tiny_llama(seed=2)  # another model, same config: its weights differ
    key2 = manifest_key(other, tok, conv, cfg, {"file": "a"}, 4)
    with pytest.raises(ManifestMismatch, match=r"model.weights: stored .*--restart"):
        collect(other, tok, conv, ChainSum(), problems, ids, tmp_path / "r", cfg, key2, progress=False)
    key3 = manifest_key(model, tok, conv, cfg, {"file": "b"}, 4)
    with pytest.raises(ManifestMismatch, match=r"task.file: stored 'a', now 'b'"):
        collect(model, tok, conv, ChainSum(), problems, ids, tmp_path / "r", cfg, key3, progress=False)
    fresh = collect(other, tok, conv, ChainSum(), problems, ids, tmp_path / "r", cfg, key2, restart=True,
                    progress=False)
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["key"] == json.loads(json.dumps(key2))
    assert len(fresh) == 4


# ---------------------------------------------------------------- the head's metadata and its users


def head_with_meta(model, tok, conv, cost: float, patience: int, budget: int = 12) -> MarginalValueHead:
    from haltkit.train.conventions import model_identity

    head = MarginalValueHead(16, hidden=0)
    with torch.no_grad():  # a constant value of 0: below any positive price
        head.w1.zero_()
    head.meta = {"model": {**model_identity(model), "tokenizer": tokenizer_fingerprint(tok)},
                 "conventions": conv.to_dict(), "thinking_budget": budget, "max_answer_tokens": 4,
                 "operating_points": {"within_1pt": {"cost_of_time": cost, "patience": patience}},
                 "default_operating_point": "within_1pt", "fit": {"ok": True, "reasons": []}}
    return head


def test_head_metadata_round_trips_and_generate_honours_it(tmp_path):
    model, tok = tiny_llama(seed=5), char_fast(tmp_path)
    conv = resolve_conventions(tok, model, exit_text="</think>A:")
    head = head_with_meta(model, tok, conv, cost=0.5, patience=3)
    head.save(tmp_path / "h.safetensors")
    loaded = load_value_head(tmp_path / "h.safetensors", model, tok)
    assert loaded.meta == json.loads(json.dumps(head.meta))
    policy = loaded.exit_policy()
    assert (policy.cost_of_time, policy.patience, policy.exit_tokens, policy.eos_token_ids, policy.thinking_budget) \
        == (0.5, 3, conv.exit_ids, (1,), 12)
    assert loaded.exit_policy(patience=1).patience == 1  # explicit arguments override
    ids = conv.render_all(tok, [Problem("1+2", "3")])
    res = haltkit.generate(model, input_ids=ids, value_head=loaded)  # no exit policy given: the head's
    # The value (0) is below 0.5 at steps 0, 1, 2: patience 3 exits at step 2, then the exit text is forced.
    assert res.think_end[0] == "value" and res.think_tokens[0] == 2
    assert tuple(res.tokens[0][2:2 + len(conv.exit_ids)]) == conv.exit_ids


def test_cli_generate_takes_everything_from_the_head(tmp_path, capsys):
    from haltkit.cli import main

    model, tok = tiny_llama(seed=5), char_fast(tmp_path)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    conv = resolve_conventions(tok, model, exit_text="</think>A:")
    head_with_meta(model, tok, conv, cost=0.5, patience=2).save(tmp_path / "h.safetensors")
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "1+2", "--value-head",
                 str(tmp_path / "h.safetensors"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["think_end"] == ["value"] and out["think_tokens"] == [1]
    assert tuple(out["tokens"][0][1:1 + len(conv.exit_ids)]) == conv.exit_ids


def test_value_exit_for_hf_generate_takes_the_heads_policy(tmp_path):
    from haltkit.hf import ValueExit

    model, tok = tiny_llama(seed=5), char_fast(tmp_path)
    conv = resolve_conventions(tok, model, exit_text="</think>A:")
    ve = ValueExit(model, head_with_meta(model, tok, conv, cost=0.5, patience=4), batch_size=1)
    assert ve.requests.patience.tolist() == [4] and ve.requests.cost_of_time.tolist() == [0.5]


def test_head_of_another_model_or_tokenizer_is_refused(tmp_path):
    model, tok = tiny_llama(seed=5), char_fast(tmp_path)
    conv = resolve_conventions(tok, model, exit_text="</think>A:")
    head = head_with_meta(model, tok, conv, cost=0.5, patience=2)
    wide = tiny_llama(seed=5, hidden=32)
    with pytest.raises(ValueError, match="hidden states of size 16 but the model's final hidden state has size 32"):
        haltkit.generate(wide, input_ids=[[5, 6]], value_head=head)
    head.meta["model"]["vocab_size"] = 50
    with pytest.raises(ValueError, match="trained for a vocabulary of 50 tokens, the model has 100"):
        haltkit.generate(model, input_ids=[[5, 6]], value_head=head)
    head.meta["model"]["vocab_size"] = 100
    head.meta["model"]["tokenizer"] = "0123456789abcdef"
    with pytest.raises(ValueError, match="trained with tokenizer 0123456789abcdef"):
        haltkit.generate(model, input_ids=[[5, 6]], tokenizer=tok, value_head=head)
    head.meta["model"]["tokenizer"] = tokenizer_fingerprint(tok)
    head.save(tmp_path / "h.safetensors")
    with pytest.raises(ValueError, match="hidden states of size 16"):
        load_value_head(tmp_path / "h.safetensors", wide)
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(CharTokenizer())  # the same vocabulary


def test_all_wrong_rollouts_fail_the_quality_gate(tmp_path):
    from haltkit.train.head import HeadTrainConfig, run_train_head

    model, tok = tiny_llama(seed=6), char_fast(tmp_path)
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"{i}+{j}", "answer": "never"}) + "\n"
                         for i in range(1, 7) for j in range(1, 7)))
    task = JsonlTask(f, verifier="exact")
    metrics, status = run_train_head(
        str(tmp_path), str(tmp_path / "out"), task, task.problems, {"file": "t"},
        RolloutConfig(every=3, max_think=6, max_answer=3), HeadTrainConfig(hidden=4, epochs=3),
        {"exit_text": "</think>A:"}, progress=False, model_and_tokenizer=(model, tok))
    assert status == 3 and metrics["rollout_accuracy"] == 0.0
    assert any("every forced answer of every rollout was wrong" in r for r in metrics["fit"]["reasons"])
    assert not (tmp_path / "out" / "head.safetensors").exists()
    with pytest.raises(ValueError, match="marked unfit by train-head's quality gate"):
        load_value_head(tmp_path / "out" / "head.unfit.safetensors")
    assert load_value_head(tmp_path / "out" / "head.unfit.safetensors", allow_unfit=True).meta["fit"]["ok"] is False


def test_eval_exits_replay_equals_generate_and_writes_the_frontier(tmp_path):
    from haltkit.train.evaluate import eval_exits

    model, tok = tiny_llama(seed=8), char_fast(tmp_path)
    conv = resolve_conventions(tok, model, exit_text="</think>A:")
    head = head_with_meta(model, tok, conv, cost=0.0, patience=2, budget=16)
    torch.manual_seed(0)
    with torch.no_grad():  # values that vary along a think phase: some steps below the price, some not
        head.w1.normal_(0, 2.0)
    rng = random.Random(0)
    problems = [ChainSum().sample(rng, 1 + i % 5) for i in range(10)]
    ids = conv.render_all(tok, problems)
    res = haltkit.generate(model, input_ids=ids, exit=head.exit_policy(cost_of_time=None), value_head=head)
    values = torch.tensor([v for row in res.values for v in row if v == v])
    head.meta["operating_points"]["within_1pt"]["cost_of_time"] = float(values.median())
    head.save(tmp_path / "h.safetensors")
    class TextParity:  # a score that changes with any character of the answer: replies and probes must match
        @staticmethod
        def verify(problem, answer):
            return float(zlib.crc32(answer.encode()) % 2)

    out = eval_exits(str(tmp_path), str(tmp_path / "h.safetensors"), TextParity(), problems, str(tmp_path / "eval"),
                     progress=False, model_and_tokenizer=(model, tok))
    check = out["generate_check"]
    assert check["same_think_length"] == 1.0 and check["same_score"] == 1.0, check
    assert check["generate"] == check["replay"], check
    assert 0 < check["generate"]["think_tokens"] < out["rows"][0]["think_tokens"]  # some exits, not all at once
    kinds = {r["kind"] for r in out["rows"]}
    assert kinds == {"no_exit", "head", "budget", "oracle"} and "level 3" in out["per_level"]
    assert (tmp_path / "eval" / "eval_exits.png").stat().st_size > 0


# ---------------------------------------------------------------- reasoning-gym (optional extra)


def test_reasoning_gym_missing_says_how_to_install(monkeypatch):
    from haltkit.tasks import ReasoningGymTask

    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'haltkit\[reasoning-gym\]'"):
        ReasoningGymTask("basic_arithmetic", 4)


def test_reasoning_gym_task_is_scored_by_the_packages_scorer_offline(monkeypatch):
    pytest.importorskip("reasoning_gym", reason="the reasoning-gym extra is not installed (CI leaves it out)")
    import socket

    from haltkit.tasks import ReasoningGymTask

    def no_network(*a, **k):
        raise AssertionError("reasoning-gym tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    task = ReasoningGymTask("basic_arithmetic", 6, seed=3)
    again = ReasoningGymTask("basic_arithmetic", 6, seed=3)
    assert [p.question for p in task.problems] == [p.question for p in again.problems]  # seeded
    for p in task.problems:
        assert task.verify(p, p.answer) == 1.0
        assert task.verify(p, f"{p.answer}1") < 1.0  # another number is wrong
    assert task.task_id()["reasoning_gym"] == "basic_arithmetic"
    with pytest.raises(ValueError, match="no dataset 'basic_arithmetc'; did you mean 'basic_arithmetic'"):
        ReasoningGymTask("basic_arithmetc", 2)
    # The CLI's task source: --prompts entries from --seed; eval-exits (held out) from another seed.
    import argparse

    from haltkit.cli import _conventions, _task_and_problems

    args = argparse.Namespace(jsonl=None, reasoning_gym="basic_arithmetic", prompts=6, seed=3, verifier="numeric",
                              chat_template="auto", think_open=None, think_close=None, exit_text=None, eos_id=None)
    cli_task, problems, task_id = _task_and_problems(args)
    assert [p.question for p in problems] == [p.question for p in task.problems] and task_id["seed"] == 3
    assert _task_and_problems(args, held_out=True)[2]["seed"] != 3
    assert _conventions(args) == {"chat_template": "auto"}  # the model's own template, not the toy's
