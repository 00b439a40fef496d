"""Tasks, tokenizer, rollouts, marginal-value targets, head training and the shipped toy models."""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest
import torch

import haltkit
from haltkit import DecodeState, MarginalValueHead, SamplingParams, decode_step, pack_requests
from haltkit.tasks import ChainSum, JsonlTask, Problem, forced_exit_text, parse_answer, prompt_text, trace_text
from haltkit.tokenizer import CharTokenizer
from haltkit.train.head import (
    HeadTrainConfig, auroc, marginal_values, sample_problems, smooth_returns, train_head,
)
from haltkit.train.rollouts import Rollout, collect_rollouts, forced_answers, load_rollouts, think_greedy

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread avoids spinning on a shared, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_llama(seed: int = 0, hidden: int = 16, layers: int = 1):
    """A Llama of a few thousand parameters on the char vocabulary."""
    from haltkit.train.toy import ModelSpec, build_model

    spec = ModelSpec(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                     num_attention_heads=2, max_position_embeddings=128)
    return build_model(spec, CharTokenizer().vocab_size, seed).eval()


# ---------------------------------------------------------------- tasks and tokenizer


def test_char_tokenizer_round_trips_through_pretrained_tokenizer_fast(tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok = CharTokenizer()
    tok.save(tmp_path)
    fast = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    rng, task = random.Random(1), ChainSum()
    for level in range(1, 6):
        p = task.sample(rng, level)
        text = trace_text(p, task.trace(p, rng))
        ids = tok.encode(text)
        assert fast(text, add_special_tokens=False)["input_ids"] == ids
        assert fast.decode(ids) == text == tok.decode(ids)
    assert fast.eos_token_id == tok.eos_id and len(fast) == tok.vocab_size


def test_tokenizer_rejects_characters_outside_the_vocabulary():
    with pytest.raises(ValueError, match="'é' at position 3"):
        CharTokenizer().encode("1+2é")


@pytest.mark.parametrize("level", [1, 2, 3, 4, 5])
def test_chain_sum_traces_are_arithmetically_right_and_support_the_answer(level):
    task, rng = ChainSum(slip_prob=0.3), random.Random(level)
    for _ in range(40):
        p = task.sample(rng, level)
        tr = task.trace(p, rng)
        assert int(p.answer) == sum(p.terms)
        assert tr.supported[-1] == p.answer and all(s == p.answer for s in tr.supported[tr.answer_pos:])
        assert len(tr.supported) == len(tr.think) + 1
        steps = [tuple(map(int, m)) for m in re.findall(r"(\d+)\+(\d+)=(\d+)", tr.think)]
        wrong = [s for s in steps if s[0] + s[1] != s[2]]
        # Only a planted slip is wrong, and then the re-check catches it and the trace redoes the sum.
        assert not wrong or ("mismatch" in tr.think and len(wrong) <= len(p.terms))
        cut = rng.randint(0, len(tr.think))
        assert parse_answer(forced_exit_text(p, tr, cut).split("</think>")[1]) == tr.supported[cut]


def test_held_out_split_is_disjoint_from_training_samples():
    task, rng = ChainSum(), random.Random(0)
    train = {task.sample(rng, 1, held_out=False).question for _ in range(300)}
    held = {task.sample(rng, 1, held_out=True).question for _ in range(300)}
    assert train and held and not train & held


def test_jsonl_task_verifies_numeric_and_exact_answers(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text('{"prompt": "2+2?", "answer": "4"}\n\n{"prompt": "big", "answer": "1,234.5"}\n')
    numeric = JsonlTask(f)
    a, b = numeric.problems
    assert numeric.verify(a, "so the answer is 4") == 1.0 and numeric.verify(a, "5") == 0.0
    assert numeric.verify(b, "1234.5") == 1.0 and numeric.verify(b, "none") == 0.0
    exact = JsonlTask(f, verifier="exact")
    assert exact.verify(a, " 4 ") == 1.0 and exact.verify(a, "4.0") == 0.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "answer": "1"}\n{"prompt": "y"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        JsonlTask(bad)


# ---------------------------------------------------------------- targets and metrics


def test_marginal_values_match_a_hand_computed_example():
    ckpt = torch.tensor([0, 2, 4, 6, 8])
    raw = torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0])
    smooth = smooth_returns(raw)  # the isolated 1 at t=4 and the 0 at t=6 are blips
    assert smooth.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    idx, v = marginal_values(ckpt, smooth, budget=100)
    assert idx.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(v, torch.tensor([1 / 6, 1 / 4, 1 / 2, 0.0]))
    # A budget of 4 makes the later answer unreachable: nothing is worth thinking for.
    idx, v = marginal_values(ckpt, smooth, budget=4)
    assert idx.tolist() == [0, 1] and v.tolist() == [0.0, 0.0]
    # Losing a right answer by thinking on is a negative value.
    idx, v = marginal_values(torch.tensor([0, 4, 8]), torch.tensor([1.0, 0.0, 0.0]), budget=100)
    torch.testing.assert_close(v, torch.tensor([-1 / 8, 0.0]))


def test_auroc_equals_the_pairwise_count():
    g = torch.Generator().manual_seed(0)
    score = torch.randint(0, 5, (60,), generator=g).float()  # many ties
    label = torch.rand(60, generator=g) < 0.4
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0)
             for p, n in itertools.product(score[label].tolist(), score[~label].tolist())]
    assert auroc(score, label) == pytest.approx(sum(pairs) / len(pairs))


def synthetic_rollouts(count: int, answer_at: int, length: int, d: int, seed: int) -> list[Rollout]:
    """Rollouts whose forced answers are right from ``answer_at`` think tokens on; the hidden states
    are weak noise, so only the step features tell when the answer is complete."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ckpt = torch.arange(length + 1)
        reward = (ckpt >= answer_at).float()
        out.append(Rollout(Problem("q", "a"), torch.zeros(length, dtype=torch.long), True, "a",
                           0.01 * torch.randn(length + 1, d, generator=g), ckpt, reward, torch.ones(length + 1),
                           torch.full((length + 1,), 4), ["a"] * (length + 1)))
    return out


def test_head_trained_where_the_answer_completes_at_a_fixed_step_exits_there():
    answer_at, length, d = 12, 30, 8
    cfg = HeadTrainConfig(hidden=32, budget=length, extra_budgets=0, epochs=100, patience=100, batch_size=64, lr=1e-2)
    head, metrics = train_head(synthetic_rollouts(40, answer_at, length, d, seed=0), cfg)
    assert metrics["val"]["auroc_stop_loses_nothing"] > 0.85
    # Replayed through the kernel op: the value exit fires at the step the answer completes.
    B = 16
    g = torch.Generator().manual_seed(1)
    policy = haltkit.ExitPolicy(cost_of_time=0.04, patience=1, max_new_tokens=length + 1, thinking_budget=length)
    req = pack_requests(SamplingParams(temperature=0.0), policy, 8, B)
    state = DecodeState.new(B)
    exits = torch.full((B,), -1)
    for n in range(length + 1):
        out = decode_step(torch.zeros(B, 8), 0.01 * torch.randn(B, d, generator=g), req, state, head, backend="torch")
        newly = (state.think_end != 0) & (exits < 0)
        exits[newly] = n
        if int(out.num_active) == 0:
            break
    assert exits.min() >= answer_at and exits.max() <= answer_at + 2, exits.tolist()
    assert exits.float().mean() <= answer_at + 1, exits.tolist()


# ---------------------------------------------------------------- rollouts and the pipeline


@pytest.mark.filterwarnings("error:.*past_key_values.*:FutureWarning")  # transformers 5.40 drops the old name
def test_forced_answers_reusing_the_cache_equal_answers_decoded_from_scratch():
    model, tok = tiny_llama(seed=3), CharTokenizer()
    p = ChainSum().sample(random.Random(0), 3)
    prompt = tok.encode(prompt_text(p))
    think = torch.randint(4, tok.vocab_size, (23,), generator=torch.Generator().manual_seed(0))
    ckpt = torch.tensor([0, 1, 7, 22, 23])
    texts, conf, probe = forced_answers(model, tok, prompt, think, ckpt, max_answer=5, chunk=2)
    for i, t in enumerate(ckpt.tolist()):
        seq, lps = prompt + think[:t].tolist() + list(tok.exit_tokens), []
        out = []
        with torch.no_grad():
            for _ in range(5):
                lp = torch.log_softmax(model(torch.tensor([seq])).logits[0, -1], -1)
                nxt = int(lp.argmax())
                out.append(nxt)
                lps.append(float(lp[nxt]))
                seq.append(nxt)
                if nxt == tok.eos_id:
                    break
        assert texts[i] == parse_answer(tok.decode(out))
        assert float(conf[i]) == pytest.approx(torch.tensor(lps).mean().exp().item(), rel=1e-4)
        assert int(probe[i]) == len(out) + len(tok.exit_tokens)


@pytest.mark.filterwarnings("error:.*past_key_values.*:FutureWarning")  # transformers 5.40 drops the old name
def test_think_greedy_records_the_hidden_state_the_head_reads():
    model, tok = tiny_llama(seed=4), CharTokenizer()
    problems = sample_problems(ChainSum(), 3, seed=0)  # prompts of different lengths: left padding
    for p, (think, _, _, hidden) in zip(problems, think_greedy(model, tok, problems, max_think=9)):
        prompt = tok.encode(prompt_text(p))
        with torch.no_grad():
            full = model.model(torch.tensor([prompt + think.tolist()])).last_hidden_state[0]
        torch.testing.assert_close(hidden, full[len(prompt) - 1:], rtol=1e-4, atol=1e-4)
        assert torch.equal(model.lm_head(full).argmax(-1)[len(prompt) - 1: -1], think)


def test_pipeline_runs_end_to_end_and_resumes(tmp_path):
    from haltkit.train.toy import TrainConfig, save_model, train_lm

    model = tiny_llama(seed=0)
    assert sum(p.numel() for p in model.parameters()) < 10_000
    cfg = TrainConfig(steps=8, batch_size=8, warmup=2, difficulties=(1,), group=2)

    def held_out_loss() -> float:  # one fixed batch of the data stream (another seed than training's)
        from haltkit.train.toy import _batches

        ids, labels = next(_batches(CharTokenizer(), TrainConfig(batch_size=16, difficulties=(1,), seed=99)))
        with torch.no_grad():
            return float(model(input_ids=ids, labels=labels).loss)

    before = held_out_loss()
    summary = train_lm(model, cfg)
    # Training must learn: the loss on a fixed batch falls (at lr=0 it would stay where it was).
    assert summary["tokens"] > 0 and held_out_loss() < before - 0.1, (before, held_out_loss())
    save_model(model, tmp_path / "tiny")
    task = ChainSum()
    problems = sample_problems(task, 24, seed=0)
    shards = collect_rollouts(model, CharTokenizer(), task, problems, tmp_path / "roll", every=4, max_think=12,
                              shard_size=8)
    first = load_rollouts(shards)
    assert len(first) == 24 and all(r.hidden.shape == (len(r.think_ids) + 1, 16) for r in first)
    assert all(r.checkpoints[0] == 0 and r.checkpoints[-1] == len(r.think_ids) for r in first)
    (tmp_path / "roll" / "shard_00001.safetensors").unlink()  # an interrupted collection
    again = load_rollouts(collect_rollouts(model, CharTokenizer(), task, problems, tmp_path / "roll", 4, 12,
                                           shard_size=8))
    assert [r.answers for r in again] == [r.answers for r in first]
    head, metrics = train_head(first, HeadTrainConfig(hidden=4, budget=12, epochs=3))
    assert set(metrics["val"]) >= {"mse", "auroc_stop_loses_nothing", "reliability"}
    head.save(tmp_path / "head.safetensors")
    loaded = MarginalValueHead.load(tmp_path / "head.safetensors")
    x, n, b = torch.randn(5, 16), torch.arange(5), torch.full((5,), 12)
    assert torch.equal(loaded(x, n, b), head(x, n, b))


def test_lm_training_is_a_function_of_its_seed():
    from haltkit.train.toy import TrainConfig, train_lm

    def run(seed: int) -> torch.Tensor:
        model = tiny_llama(seed=seed)
        train_lm(model, TrainConfig(steps=3, batch_size=4, warmup=1, difficulties=(1, 2), group=2, seed=seed))
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


def test_train_head_cli_writes_a_head_the_kernels_read(tmp_path):
    from haltkit.cli import main
    from haltkit.train.toy import save_model

    save_model(tiny_llama(seed=2), tmp_path / "m")
    # A random tiny model learns nothing: the quality gate says so (exit 3, the head marked unfit).
    status = main(["train-head", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "h"), "--prompts", "30",
                   "--every", "3", "--max-think", "9", "--hidden", "4", "--threads", "1", "--no-progress"])
    assert status in (0, 3)
    name = "head.safetensors" if status == 0 else "head.unfit.safetensors"
    head = MarginalValueHead.load(tmp_path / "h" / name)
    assert head.d_model == 16 and head.meta["thinking_budget"] == 9
    assert head.meta["fit"]["ok"] == (status == 0)
    metrics = json.loads((tmp_path / "h" / "head_metrics.json").read_text())
    assert metrics["rollouts"]["val"] >= 1 and metrics["split"]["test"] >= 1


# ---------------------------------------------------------------- the shipped models


@pytest.fixture(scope="module")
def toy():
    try:
        return haltkit.load_toy()
    except FileNotFoundError as e:
        pytest.fail(str(e))


def test_shipped_toy_models_reproduce_the_recorded_accuracy(toy):
    from haltkit.train.toy import fixed_check

    recorded = toy.meta["check"]
    got = fixed_check(toy.target)
    assert got["think"] == recorded["think"]
    assert got["correct"] == recorded["correct"]
    assert got["accuracy"] == recorded["accuracy"]


def test_shipped_head_and_draft_fit_the_target(toy):
    cfg = toy.target.config
    assert 1_000_000 <= sum(p.numel() for p in toy.target.parameters()) <= 1_600_000
    assert sum(p.numel() for p in toy.draft.parameters()) < sum(p.numel() for p in toy.target.parameters())
    assert toy.draft.config.vocab_size == cfg.vocab_size == toy.tokenizer.vocab_size
    assert toy.head.d_model == cfg.hidden_size
    assert list(toy.exit_tokens) == toy.tokenizer.encode("</think>A:")
    policy = toy.exit_policy(cost_of_time=0.01)
    assert policy.exit_tokens == toy.exit_tokens and policy.eos_token_ids == (toy.eos_token_id,)


def test_shipped_head_carries_its_conventions_and_operating_point(toy):
    meta = toy.head.meta
    assert meta is not None and meta["fit"]["ok"]
    assert tuple(meta["conventions"]["exit_ids"]) == toy.exit_tokens and meta["conventions"]["eos_ids"] == [1]
    op = meta["operating_points"][meta["default_operating_point"]]
    # Every entry point takes the patience from the head: toy.exit_policy too.
    assert toy.exit_policy(cost_of_time=0.01).patience == op["patience"] == toy.head.exit_policy().patience
    toy.head.check_compatible(toy.target, toy.tokenizer)  # the char tokenizer is the vocabulary it was made for


def test_greedy_answers_stop_each_row_at_its_first_eos():
    from haltkit.train.rollouts import greedy_answers

    # Row 0 emits 5, 1 (EOS), row 1 emits 5, 6, 7 up to max_answer; the step function sees what was drawn.
    script = [torch.tensor([5, 5]), torch.tensor([1, 6]), torch.tensor([4, 7])]
    fed = []

    def logits_for(toks):
        return torch.nn.functional.one_hot(toks, 10).float() * 9.0

    def step(nxt):
        fed.append(nxt.tolist())
        return logits_for(script[len(fed)])

    out, logp, count = greedy_answers(logits_for(script[0]), step, 3, torch.tensor([1]))
    assert out.tolist() == [[5, 1, -1], [5, 6, 7]]
    assert count.tolist() == [2, 3] and fed == [[5, 5], [1, 6]]
    per_step = [torch.log_softmax(logits_for(t), -1).gather(1, t[:, None])[:, 0] for t in script]
    assert torch.allclose(logp, torch.stack([per_step[0][0] + per_step[1][0], sum(p[1] for p in per_step)]))


def _cliff_rollouts(n: int = 60, T: int = 40):
    """Rollouts whose head value falls by 0.001 a step from 0.04 (the same for all), and whose
    forced answer turns right for good at a step spread over 5..25: accuracy falls off a cliff
    as the price rises past 0.015."""
    from haltkit.tasks import Problem
    from haltkit.train.rollouts import Rollout

    out = []
    for q in range(n):
        hidden = torch.zeros(T + 1, 4)
        hidden[:, 0] = 0.04 - 0.001 * torch.arange(T + 1)
        right_from = 5 + (20 * q) // n
        reward = (torch.arange(T + 1) >= right_from).float()
        out.append(Rollout(Problem(f"q{q}", "1"), torch.zeros(T, dtype=torch.long), True, "1", hidden,
                           torch.arange(T + 1), reward, torch.ones(T + 1), torch.ones(T + 1, dtype=torch.long),
                           [""] * (T + 1)))
    return out


def test_calibration_keeps_off_the_cliff_edge():
    from haltkit.train.head import calibrate

    head = MarginalValueHead(4, hidden=0)
    with torch.no_grad():  # the value is the first hidden feature
        head.w1.zero_()
        head.w1[0, 0] = 1.0
        head.b1.zero_()
    val = _cliff_rollouts()
    edge = calibrate(head, val, 40, price_margin=1.0, z=0.0)["within_1pt"]
    safe = calibrate(head, val, 40)["within_1pt"]
    # Without margins the point sits where the last question turns right (step 25, price ~0.015).
    assert edge["think_tokens"] <= 26 and edge["accuracy"] >= 0.99
    # With them, twice the price must still hold: the exit comes at least 7 steps later.
    assert safe["think_tokens"] >= edge["think_tokens"] + 7 and safe["accuracy_at_higher_price"] >= 0.99
    assert safe["cost_of_time"] * 2 <= edge["cost_of_time"] + 1e-3


def test_shipped_head_operating_point_holds_on_the_test_split(toy):
    cal = toy.head.meta["training"]["calibration"]
    assert cal["distinct_questions"] >= 150  # chosen on a validation split of distinct questions
    test = cal["test_split"]
    name = toy.head.meta["default_operating_point"]
    assert test[name]["accuracy"] >= test["no_exit"]["accuracy"] - 0.01  # on the other half of the questions
    assert test[name]["think_tokens"] <= 0.6 * test["no_exit"]["think_tokens"]
