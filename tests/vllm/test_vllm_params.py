"""haltkit.vllm's boundary without an engine: request parameters, engine and server arguments."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import haltkit.vllm
from haltkit import ExitPolicy
from haltkit.vllm import engine_args, exit_policy_from_args, server_args


def test_requests_without_haltkit_parameters_get_no_policy():
    assert exit_policy_from_args(None) is None
    assert exit_policy_from_args({}) is None
    assert exit_policy_from_args({"session_id": "x", "other_processor_arg": 3}) is None


def test_parameters_become_the_exit_policy_with_vllm_length_and_stop_ids():
    pol = exit_policy_from_args({"cost_of_time": 1, "patience": 2, "exit_tokens": 7, "session_id": "x"},
                                max_tokens=40, eos_token_ids=(2, 9))
    assert pol == ExitPolicy(cost_of_time=1, patience=2, max_new_tokens=40, eos_token_ids=(2, 9), exit_tokens=(7,))


@pytest.mark.parametrize("key, hint", [("max_new_tokens", "max_tokens"), ("eos_token_ids", "stop_token_ids"),
                                       ("thinking_budgte", "did you mean 'thinking_budget'")])
def test_vllm_owned_fields_and_near_misses_raise(key, hint):
    with pytest.raises(ValueError, match=hint):
        exit_policy_from_args({key: 3})


def test_engine_args_extend_rather_than_replace_the_callers_settings(tmp_path):
    head = haltkit.MarginalValueHead(16)
    head.save(tmp_path / "h.safetensors")
    kw = engine_args(value_head=tmp_path / "h.safetensors", logits_processors=["x:Y"],
                     additional_config={"other": 1}, dtype="float32")
    assert kw["logits_processors"] == ["x:Y", haltkit.vllm.PROCESSOR]
    assert kw["additional_config"] == {"other": 1, "haltkit": {"value_head": str(tmp_path / "h.safetensors")}}
    assert kw["dtype"] == "float32"
    flags = server_args(tmp_path / "h.safetensors")
    assert flags[:2] == ["--logits-processors", haltkit.vllm.PROCESSOR]
    assert json.loads(flags[3]) == {"haltkit": kw["additional_config"]["haltkit"]}


def test_engine_args_name_the_exit_rules_backend_only_when_asked(tmp_path):
    assert engine_args()["additional_config"] == {"haltkit": {}}
    assert engine_args(backend="torch")["additional_config"] == {"haltkit": {"backend": "torch"}}
    with pytest.raises(ValueError, match="'triton' is not an exit_rules backend"):
        engine_args(backend="triton")
    with pytest.raises(ValueError, match="'gpu' is unknown"):
        server_args(backend="gpu")


def test_engine_args_check_the_head_file_before_any_engine_starts(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file at"):
        engine_args(value_head=tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a haltkit value head"):
        engine_args(value_head=tmp_path / "other.safetensors")


def test_drafts_on_the_v1_runner_name_haltkits_worker_extension_and_only_there(monkeypatch):
    spec = {"method": "ngram", "num_speculative_tokens": 3}
    ext = haltkit.vllm.WORKER_EXTENSION
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    assert engine_args(speculative_config=spec)["worker_extension_cls"] == ext
    assert server_args(speculative_config=spec)[-2:] == ["--worker-extension-cls", ext]
    # Without drafts, or on Model Runner V2 (which takes custom processors with drafts), no extension.
    assert "worker_extension_cls" not in engine_args()
    assert "--worker-extension-cls" not in server_args()
    with pytest.raises(ValueError, match="worker_extension_cls: 'my.mod:Ext' is set"):
        engine_args(speculative_config=spec, worker_extension_cls="my.mod:Ext")
    with pytest.raises(ValueError, match="worker_extension_cls: 'my.mod:Ext' is set"):
        server_args(speculative_config=spec, worker_extension_cls="my.mod:Ext")
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    assert "worker_extension_cls" not in engine_args(speculative_config=spec)
    assert server_args(speculative_config=spec)[:2] == ["--logits-processors", haltkit.vllm.PROCESSOR]
    assert "--worker-extension-cls" not in server_args(speculative_config=spec)


def test_the_processor_implements_both_of_vllms_interfaces():
    from vllm.v1.sample.logits_processor import LogitsProcessor as V1
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2

    assert issubclass(haltkit.vllm.ValueExitLogitsProcessor, V1)
    assert issubclass(haltkit.vllm.ValueExitLogitsProcessor, V2)


def test_without_vllm_the_module_imports_and_says_what_is_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    assert exit_policy_from_args({"patience": 2}).patience == 2  # the vLLM-free part still works
    with pytest.raises(ImportError, match="haltkit.vllm needs vLLM"):
        engine_args()
    with pytest.raises(ImportError, match="haltkit.vllm needs vLLM"):
        server_args()
    with pytest.raises(ImportError, match="haltkit.vllm needs vLLM"):
        haltkit.vllm.ValueExitLogitsProcessor


def _head_with_meta(path, vocab: int = 100, fit_ok: bool = True) -> None:
    head = haltkit.MarginalValueHead(16)
    head.meta = {
        "model": {"hidden_size": 16, "vocab_size": vocab},
        "conventions": {"exit_ids": [7, 8], "eos_ids": [2]},
        "thinking_budget": 40,
        "operating_points": {"no_loss": {"cost_of_time": 0.02, "patience": 4}},
        "default_operating_point": "no_loss",
        "fit": {"ok": fit_ok, "reasons": [] if fit_ok else ["head no better than a constant"]},
    }
    head.save(path)


def _vllm_config(head_path, vocab: int = 100):
    from types import SimpleNamespace

    model = SimpleNamespace(get_hidden_size=lambda: 16, get_vocab_size=lambda: vocab)
    return SimpleNamespace(additional_config={haltkit.vllm.CONFIG_KEY: {"value_head": str(head_path),
                                                                        "backend": "torch"}},
                           model_config=model)


def test_a_trained_heads_settings_fill_what_a_request_leaves_out(tmp_path):
    from vllm import SamplingParams as VllmSamplingParams

    from haltkit.vllm.processor import engine_settings, request_policy

    _head_with_meta(tmp_path / "h.safetensors")
    _, head, vocab, defaults = engine_settings(_vllm_config(tmp_path / "h.safetensors"), torch.device("cpu"))
    assert head is not None and vocab == 100
    assert defaults == {"patience": 4, "exit_tokens": (7, 8), "thinking_budget": 40}
    # A request that asks for value exits gets the head's settings under its own values; vLLM
    # keeps the length and the stop ids.
    pol = request_policy(VllmSamplingParams(max_tokens=64, extra_args={"cost_of_time": 0.5}), defaults)
    assert pol == ExitPolicy(cost_of_time=0.5, patience=4, max_new_tokens=64, thinking_budget=40,
                             exit_tokens=(7, 8))
    pol = request_policy(VllmSamplingParams(max_tokens=64, extra_args={"cost_of_time": 0.5, "patience": 2,
                                                                       "exit_tokens": [9]}), defaults)
    assert (pol.patience, pol.exit_tokens, pol.thinking_budget) == (2, (9,), 40)
    # Without cost_of_time a request does not use the head: a budget alone stays a budget alone.
    pol = request_policy(VllmSamplingParams(max_tokens=64, extra_args={"thinking_budget": 20}), defaults)
    assert pol == ExitPolicy(max_new_tokens=64, thinking_budget=20)
    assert request_policy(VllmSamplingParams(max_tokens=64), defaults) is None


def test_an_unfit_head_or_one_of_another_vocabulary_is_refused_at_engine_start(tmp_path):
    from haltkit.vllm.processor import engine_settings

    _head_with_meta(tmp_path / "unfit.safetensors", fit_ok=False)
    with pytest.raises(ValueError, match="unfit"):
        engine_settings(_vllm_config(tmp_path / "unfit.safetensors"), torch.device("cpu"))
    _head_with_meta(tmp_path / "other.safetensors", vocab=50)
    with pytest.raises(ValueError, match="vocabulary of 50 tokens; this model has 100"):
        engine_settings(_vllm_config(tmp_path / "other.safetensors"), torch.device("cpu"))


def test_a_report_made_in_the_schedulers_process_applies_the_heads_defaults():
    # Out-of-process workers send state and plan rows to the scheduler, which has no head. The
    # request gives only cost_of_time; the head's default exit token 7 is what closes thinking.
    # A report rebuilt without the defaults would not see the model's own 7 as a think end.
    import pickle

    from vllm import SamplingParams as VllmSamplingParams

    from haltkit.params import SamplingParams, pack_requests
    from haltkit.reference.termination import pack_plan, plan_step
    from haltkit.state import DecodeState
    from haltkit.vllm.report import StepRows, report_from_rows

    defaults = {"exit_tokens": (7,), "patience": 3}
    params = VllmSamplingParams(max_tokens=16, extra_args={"cost_of_time": 0.5})
    policy = exit_policy_from_args(params.extra_args, params.max_tokens, (), defaults)
    req = pack_requests(SamplingParams(), [policy], 10)
    state = DecodeState.new(1)
    plan = pack_plan(plan_step(torch.tensor([1.0]), req, state, torch.tensor([False])))
    rows = torch.cat([torch.stack(state.tensors(), 1), plan], 1)[0].tolist()
    sent = pickle.loads(pickle.dumps(StepRows({"r": rows}, defaults)))  # as the worker's output travels
    assert sent.defaults == defaults and sent["r"] == rows

    report = report_from_rows(params, sent["r"], [7], sent.defaults)
    assert report == {"think_tokens": 0, "answer_tokens": 1, "think_end": "model", "finish": None}
    assert report_from_rows(params, rows, [7])["think_end"] is None  # what the defaults fix
