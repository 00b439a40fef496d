"""One default patience: every entry point that applies a value head takes the head's calibrated
patience, else ``haltkit.DEFAULT_PATIENCE``; an explicit patience overrides both."""

from __future__ import annotations

import json

import pytest
import torch

import haltkit
from haltkit import DEFAULT_PATIENCE, ExitPolicy, MarginalValueHead
from haltkit.tasks import Problem
from haltkit.train.conventions import resolve_conventions

pytest.importorskip("transformers")
from test_train_pipeline import char_fast, head_with_meta, tiny_llama  # noqa: E402

CALIBRATED = 7  # a head's patience that no default equals
EXPLICIT = 5


class Captured(Exception):
    """Raised by a spy once it has seen the patience, so the entry point does no further work."""


def _spy(monkeypatch, module, name: str, pick):
    """Replace ``module.name`` by a function that records ``pick(*args, **kwargs)`` and stops."""
    seen = []

    def spy(*args, **kwargs):
        seen.append(pick(*args, **kwargs))
        raise Captured

    monkeypatch.setattr(module, name, spy)
    return seen


def _policy_patience(exits) -> int:
    exits = [exits] if isinstance(exits, ExitPolicy) else list(exits)
    assert len({e.patience for e in exits}) == 1
    return exits[0].patience


# Each entry point: (head or None, explicit patience or None, tmp_path, monkeypatch) -> the patience it applies.


def ep_exit_policy(head, explicit, tmp_path, monkeypatch):
    return ExitPolicy(**({"patience": explicit} if explicit else {})).patience


def ep_head_exit_policy(head, explicit, tmp_path, monkeypatch):
    return head.exit_policy(**({"patience": explicit} if explicit else {})).patience


def ep_generate(head, explicit, tmp_path, monkeypatch):
    import haltkit.engine

    seen = _spy(monkeypatch, haltkit.engine, "pack_requests", lambda s, e, *a, **k: _policy_patience(e))
    exit = None if explicit is None else head.exit_policy(patience=explicit)
    with pytest.raises(Captured):
        haltkit.generate(tiny_llama(seed=5), input_ids=[[5, 6, 2]], value_head=head, exit=exit)
    return seen[0]


def ep_cli_generate(head, explicit, tmp_path, monkeypatch):
    from haltkit.cli import main

    model, tok = tiny_llama(seed=5), char_fast(tmp_path)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    head.save(tmp_path / "h.safetensors")
    seen = _spy(monkeypatch, haltkit, "generate", lambda *a, exit, **k: _policy_patience(exit))
    argv = ["generate", "--model", str(tmp_path / "m"), "--prompt", "1+2",
            "--value-head", str(tmp_path / "h.safetensors")]
    with pytest.raises(Captured):
        main(argv + (["--patience", str(explicit)] if explicit else []))
    return seen[0]


def ep_hf_value_exit(head, explicit, tmp_path, monkeypatch):
    from haltkit.hf import ValueExit

    exit = None if explicit is None else head.exit_policy(patience=explicit)
    return ValueExit(tiny_llama(seed=5), head, exit=exit, batch_size=1).requests.patience.item()


def ep_vllm_request(head, explicit, tmp_path, monkeypatch):
    from haltkit.vllm import exit_policy_from_args, head_defaults

    args = {"cost_of_time": 0.5, **({"patience": explicit} if explicit else {})}
    return exit_policy_from_args(args, max_tokens=32, defaults=head_defaults(head)).patience


def ep_toy_exit_policy(head, explicit, tmp_path, monkeypatch):
    toy = haltkit.ToyModels(None, None, head, None, (3, 38, 31), 1, {})
    return toy.exit_policy(cost_of_time=0.5, patience=explicit).patience


def ep_think_greedy(head, explicit, tmp_path, monkeypatch):
    import haltkit.train.rollouts as rollouts
    from haltkit.tokenizer import CharTokenizer

    seen = _spy(monkeypatch, rollouts, "pack_requests", lambda s, e, *a, **k: _policy_patience(e))
    with pytest.raises(Captured):
        rollouts.think_greedy(tiny_llama(seed=5), CharTokenizer(), [Problem("1+2", "3")], 4, head=head,
                              cost_of_time=0.5, patience=explicit)
    return seen[0]


def ep_eval_exits(head, explicit, tmp_path, monkeypatch):
    from haltkit.train.evaluate import eval_exits

    assert explicit is None  # eval-exits evaluates the head as it is
    model, tok = tiny_llama(seed=5), char_fast(tmp_path)
    head.save(tmp_path / "h.safetensors")
    never_right = type("T", (), {"verify": staticmethod(lambda p, a: 0.0)})
    eval_exits(str(tmp_path), str(tmp_path / "h.safetensors"), never_right, [Problem("1+2", "3")],
               str(tmp_path / "eval"), progress=False, model_and_tokenizer=(model, tok))
    return json.loads((tmp_path / "eval" / "eval_exits.json").read_text())["patience"]


ENTRY_POINTS = [ep_head_exit_policy, ep_generate, ep_cli_generate, ep_hf_value_exit, ep_vllm_request,
                ep_toy_exit_policy, ep_think_greedy, ep_eval_exits]


def _head(tmp_path, patience: int | None) -> MarginalValueHead:
    """A head with train-head metadata; ``patience`` None: no operating point, so it names none."""
    model, tok = tiny_llama(seed=5), char_fast(tmp_path)
    head = head_with_meta(model, tok, resolve_conventions(tok, model, exit_text="</think>A:"), cost=0.5,
                          patience=patience or 1)
    if patience is None:
        del head.meta["operating_points"], head.meta["default_operating_point"]
    return head


def test_the_default_patience_is_not_the_trap_of_one():
    # At patience 1 the shipped head ends the think phase after about 3 tokens (bench/exit_frontier.md).
    assert DEFAULT_PATIENCE == 4 and ExitPolicy().patience == DEFAULT_PATIENCE


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda f: f.__name__[3:])
def test_entry_point_uses_the_default_patience_when_the_head_names_none(entry, tmp_path, monkeypatch):
    assert entry(_head(tmp_path, None), None, tmp_path, monkeypatch) == DEFAULT_PATIENCE


@pytest.mark.parametrize("entry", [e for e in ENTRY_POINTS if e not in (ep_eval_exits,)], ids=lambda f: f.__name__[3:])
def test_entry_point_uses_the_default_patience_with_a_bare_head(entry, tmp_path, monkeypatch):
    head = MarginalValueHead(16, hidden=0)  # no metadata at all
    assert entry(head, None, tmp_path, monkeypatch) == DEFAULT_PATIENCE


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda f: f.__name__[3:])
def test_entry_point_uses_the_heads_calibrated_patience(entry, tmp_path, monkeypatch):
    assert entry(_head(tmp_path, CALIBRATED), None, tmp_path, monkeypatch) == CALIBRATED


@pytest.mark.parametrize("entry", [e for e in ENTRY_POINTS if e is not ep_eval_exits] + [ep_exit_policy],
                         ids=lambda f: f.__name__[3:])
def test_explicit_patience_overrides_the_heads(entry, tmp_path, monkeypatch):
    assert entry(_head(tmp_path, CALIBRATED), EXPLICIT, tmp_path, monkeypatch) == EXPLICIT
