"""The toy reasoning models shipped with haltkit: a Llama target, a smaller draft and a trained head.

Trained from scratch on CPU by ``haltkit train-toy`` and ``haltkit train-head`` on the built-in
chain-sum task (:mod:`haltkit.tasks`); ``toy/meta.json`` records how (seeds, steps, timings)
and what they reach (accuracy per difficulty on held-out problems, head metrics).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

__all__ = ["ToyModels", "load_toy", "toy_dir"]


def toy_dir() -> Path:
    """The directory of the shipped toy models (``target/``, ``draft/``, ``head.safetensors``)."""
    return Path(__file__).resolve().parent / "toy"


class ToyModels(NamedTuple):
    """What :func:`load_toy` returns.

    Fields:
        target: ``transformers.LlamaForCausalLM`` (~1.08M parameters), eval mode.
        draft: ``transformers.LlamaForCausalLM`` (~0.16M parameters, same vocabulary), eval mode.
        head: :class:`haltkit.MarginalValueHead` reading the target's final (post-norm) hidden state.
        tokenizer: :class:`haltkit.tokenizer.CharTokenizer` (``transformers.PreTrainedTokenizerFast``
            loads the same vocabulary from ``toy_dir() / "target"``).
        exit_tokens: ids forced at an exit: ``</think>`` then ``A`` ``:``.
        eos_token_id: the id of ``<eos>``.
        meta: the contents of ``toy/meta.json``.
    """

    target: object
    draft: object
    head: object
    tokenizer: object
    exit_tokens: tuple[int, ...]
    eos_token_id: int
    meta: dict

    def exit_policy(self, cost_of_time: float | None = None, thinking_budget: int = 320, patience: int | None = None,
                    min_new_tokens: int = 0, max_answer_tokens: int = 10):
        """An :class:`haltkit.ExitPolicy` for the toy target (its EOS and exit tokens filled in).

        ``patience`` defaults to the head's calibrated one (its metadata), else
        :data:`haltkit.DEFAULT_PATIENCE`, as everywhere else a head is used; ``max_new_tokens``
        leaves room for the forced exit tokens and an answer after the budget.
        """
        from ..params import DEFAULT_PATIENCE, ExitPolicy

        if patience is None:
            patience = self.head.exit_defaults().get("patience", DEFAULT_PATIENCE)
        return ExitPolicy(cost_of_time=cost_of_time, patience=patience, min_new_tokens=min_new_tokens,
                          max_new_tokens=thinking_budget + len(self.exit_tokens) + max_answer_tokens,
                          eos_token_ids=(self.eos_token_id,), thinking_budget=thinking_budget,
                          exit_tokens=self.exit_tokens)


def load_toy(device: str = "cpu", path: str | Path | None = None) -> ToyModels:
    """Load the shipped toy target, draft, value head and tokenizer.

    Args:
        device: where the models go. Default "cpu".
        path: a directory laid out like :func:`toy_dir` (default: the shipped one).
    Returns:
        A :class:`ToyModels`.
    Raises:
        FileNotFoundError: when the package was installed without its model files.

    Example:
        >>> toy = haltkit.load_toy()
        >>> policy = toy.exit_policy(cost_of_time=0.01)   # value exits at lambda = 0.01 per token
    """
    from transformers import LlamaForCausalLM

    from ..tokenizer import CharTokenizer
    from ..value_head import MarginalValueHead

    root = toy_dir() if path is None else Path(path)
    if not (root / "meta.json").exists():
        raise FileNotFoundError(f"{root}: the toy models are missing (install haltkit with its package data)")
    target = LlamaForCausalLM.from_pretrained(root / "target").to(device).eval()
    draft = LlamaForCausalLM.from_pretrained(root / "draft").to(device).eval()
    head = MarginalValueHead.load(root / "head.safetensors", device=device)
    tok = CharTokenizer()
    meta = json.loads((root / "meta.json").read_text())
    return ToyModels(target, draft, head, tok, tok.exit_tokens, tok.eos_id, meta)
