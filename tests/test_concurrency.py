"""Concurrent generate calls: never a silently wrong answer.

Eager calls (one draft object shared by all of them included) give every thread the output it
gets alone; a second compiled call while one runs is refused with an error that names both."""

from __future__ import annotations

import threading
import time

import pytest

import haltkit
from haltkit import DraftModel, EarlyLayerDraft, ExitPolicy

pytest.importorskip("transformers")
from engine_models import ragged_prompts, sampled, tiny  # noqa: E402


def _run_threads(fns):
    """Run fns in threads started together; returns their results (or the exception each raised)."""
    out = [None] * len(fns)
    barrier = threading.Barrier(len(fns))

    def work(i):
        barrier.wait()
        try:
            out[i] = fns[i]()
        except Exception as e:  # noqa: BLE001 - reported to the test
            out[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _slow_down(model):
    """Yield the GIL inside every draft forward, so that the threads' steps interleave."""
    model.register_forward_pre_hook(lambda *a: time.sleep(0.002))


@pytest.mark.parametrize("kind", ["draft-model", "early-layer"])
def test_one_draft_object_shared_by_concurrent_calls_gives_each_its_own_output(kind):
    model = tiny("llama")
    small = tiny("llama", seed=7, layers=1, hidden=16)
    _slow_down(small)
    _slow_down(model.base_model.layers[0])
    source = DraftModel(small, max_len=3) if kind == "draft-model" else EarlyLayerDraft(1, max_len=3)
    # Four calls of different batch sizes and prompts, each alone first.
    jobs = [(ragged_prompts(n, seed=s), sampled(n)) for n, s in ((1, 1), (3, 2), (2, 3), (4, 4))]
    alone = [haltkit.generate(model, p, exit=ExitPolicy(max_new_tokens=10), sampling=sp, draft=source).tokens
             for p, sp in jobs]
    together = _run_threads([
        (lambda p=p, sp=sp: haltkit.generate(model, p, exit=ExitPolicy(max_new_tokens=10), sampling=sp,
                                             draft=source).tokens)
        for p, sp in jobs
    ])
    assert together == alone


def test_a_second_compiled_call_is_refused_while_one_runs_and_allowed_after():
    model = tiny("llama")
    other = tiny("llama", seed=3)
    prompts = ragged_prompts(3)
    inside, tried = threading.Event(), threading.Event()

    def hold(*a):
        # The first (compiled) call waits in its prefill until the second one has tried.
        if threading.current_thread().name == "first":
            inside.set()
            tried.wait(60)

    handle = model.base_model.register_forward_pre_hook(hold)
    result = {}

    def first():
        # max_new_tokens=1: the prefill emits the only token, so no step is compiled (fast).
        result["first"] = haltkit.generate(model, prompts, exit=ExitPolicy(max_new_tokens=1), compile=True)

    t = threading.Thread(target=first, name="first")
    t.start()
    assert inside.wait(60)
    try:
        for m in (model, other):  # the same model or another: compiled calls share the stance
            with pytest.raises(RuntimeError, match=r"another compiled call is running on LlamaForCausalLM .*"
                                                   r"thread 'first'"):
                haltkit.generate(m, prompts, exit=ExitPolicy(max_new_tokens=1), compile=True)
        # Eager calls may run meanwhile.
        assert haltkit.generate(other, prompts, exit=ExitPolicy(max_new_tokens=3)).num_steps == [3, 3, 3]
    finally:
        tried.set()
        t.join()
        handle.remove()
    want = haltkit.generate(model, prompts, exit=ExitPolicy(max_new_tokens=1)).tokens
    assert result["first"].tokens == want
    # The slot is free again, also after a call that failed inside.
    handle = model.base_model.register_forward_pre_hook(lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        haltkit.generate(model, prompts, exit=ExitPolicy(max_new_tokens=1), compile=True)
    handle.remove()
    assert haltkit.generate(model, prompts, exit=ExitPolicy(max_new_tokens=1), compile=True).tokens == want


def test_attention_switch_is_shared_by_concurrent_forwards():
    """FlashAttention runs switch the model's attention implementation for their forward (GPU
    only); eight threads inside at once all see the switch, and the user's setting comes back."""
    import types

    from haltkit.runner import _attn_implementation

    cfg = types.SimpleNamespace(_attn_implementation="sdpa")
    seen = []

    def forward():
        with _attn_implementation(cfg, "haltkit_flash_kvcache"):
            time.sleep(0.01)  # the others enter and leave meanwhile
            seen.append(cfg._attn_implementation)

    _run_threads([forward] * 8)
    assert seen == ["haltkit_flash_kvcache"] * 8 and cfg._attn_implementation == "sdpa"
