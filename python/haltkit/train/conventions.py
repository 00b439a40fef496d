"""A model's conventions: how a task becomes its prompt, how its thinking ends, what ends a reply.

Read from the tokenizer and the model's generation config, overridable one by one:

* **template**: the tokenizer's chat template, rendered once with the generation prompt. A
  prompt that already holds the template (its opening text before the question, or its
  generation prompt / thinking tag after it) is used as is, with a warning, never wrapped twice.
* **thinking tags**: ``think_close`` (default ``</think>``) must be one token of the vocabulary,
  because ``ExitPolicy.exit_tokens[0]`` is the token whose sampling ends the think phase; a
  tokenizer without it is refused with a message that says what to pass. ``think_open``
  (default ``<think>`` when ``</think>`` is the close tag, else nothing) is appended to the
  rendered prompt unless the template already ends with it.
* **exit text**: what is forced at an exit, ``think_close`` plus the answer prefix (default
  ``"\\n\\n"``, the Qwen3 / DeepSeek-R1 layout ``</think>\\n\\nANSWER``). Its token ids are the
  exit tokens; the answer is the text that follows it.
* **EOS ids**: the generation config's ``eos_token_id`` (an int or a list), else the tokenizer's.

:func:`model_identity` and :func:`tokenizer_fingerprint` name a model and a tokenizer, so that a
value head trained for one is refused for another.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass

__all__ = ["Conventions", "resolve_conventions", "model_identity", "tokenizer_fingerprint", "TemplateWarning"]

_SENTINEL = "\x00HALTKIT_QUESTION\x00"
#: Config keys that do not change what the model computes (paths, versions, dtype, runtime flags).
_VOLATILE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache", "_attn_implementation",
             "_attn_implementation_autoset", "architectures", "name_or_path", "output_hidden_states",
             "_commit_hash", "quantization_config"}


class TemplateWarning(UserWarning):
    """A prompt already held the chat template and was used as is."""


@dataclass(frozen=True)
class Conventions:
    """How prompts are written and thinking ends for one model (stored in the head's metadata).

    Fields:
        chat_template: the tokenizer's chat template source, or None (prompts used raw).
        think_open: text appended after the rendered prompt to open thinking ("" for none).
        think_close: the tag that closes thinking (one token: ``think_close_id``).
        exit_text: forced at an exit: ``think_close`` then the answer prefix.
        exit_ids: the token ids of ``exit_text`` (``exit_ids[0] == think_close_id``).
        eos_ids: ids that end a reply.
        eos_texts: their text, cut from answers.
    """

    chat_template: str | None
    think_open: str
    think_close: str
    think_close_id: int
    exit_text: str
    exit_ids: tuple[int, ...]
    eos_ids: tuple[int, ...]
    eos_texts: tuple[str, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Conventions":
        return cls(**{**d, "exit_ids": tuple(d["exit_ids"]), "eos_ids": tuple(d["eos_ids"]),
                      "eos_texts": tuple(d["eos_texts"])})

    def render_all(self, tokenizer, problems) -> list[list[int]]:
        """Every problem's prompt ids (see :meth:`render`); one :class:`TemplateWarning` names how
        many prompts already held the template and the first of them."""
        out, as_is = [], []
        for i, p in enumerate(problems):
            ids, used_as_is = self.render(tokenizer, p, i)
            out.append(ids)
            if used_as_is:
                as_is.append(i)
        if as_is:
            q = problems[as_is[0]].question
            warnings.warn(f"{len(as_is)} of {len(problems)} prompts (first: row {as_is[0]}, {q[:60]!r}) already hold "
                          f"the chat template or the thinking tag {self.think_open!r}: used as is, not wrapped again",
                          TemplateWarning, stacklevel=2)
        return out

    def render(self, tokenizer, problem, row: int | str = "?") -> tuple[list[int], bool]:
        """The prompt's token ids: the template rendered once, then ``think_open``.

        Returns:
            (ids, used_as_is): a plain prompt that already holds the template's text (or ends
            with ``think_open``) is used as is, never wrapped again.
        Raises:
            ValueError: the prompt encodes to no tokens (naming the row).
        """
        if problem.messages:
            messages = [{"role": r, "content": c} for r, c in problem.messages]
        else:
            messages = [{"role": "user", "content": problem.question}]
        templated = self.chat_template is not None
        as_is = not problem.messages and self.holds_template(problem.question)
        if as_is:
            text = problem.question
        elif templated:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                 chat_template=self.chat_template)
            if self.think_open and not text.rstrip().endswith(self.think_open):
                text += self.think_open
        else:
            text = problem.question + self.think_open
        ids = _encode(tokenizer, text, add_special_tokens=not templated)
        if not ids:
            raise ValueError(f"row {row}: the prompt encodes to no tokens")
        return ids, as_is

    def holds_template(self, prompt: str) -> bool:
        """True when a plain prompt already holds the template's own text or the thinking tag."""
        if self.think_open and prompt.rstrip().endswith(self.think_open):
            return True
        if self.chat_template is None:
            return False
        before, after = self._template_parts()
        # The template's text around the question, stripped of whitespace and BOS-like tokens.
        return bool((before and prompt.lstrip().startswith(before)) or (after and after in prompt))

    def _template_parts(self) -> tuple[str, str]:
        from jinja2 import Template  # transformers renders templates with jinja2 too

        try:
            text = Template(self.chat_template).render(
                messages=[{"role": "user", "content": _SENTINEL}], add_generation_prompt=True,
                bos_token="", eos_token="")
        except Exception:  # a template that needs more context than this: no detection
            return "", ""
        before, after = text.split(_SENTINEL, 1) if _SENTINEL in text else ("", "")
        return before.strip(), after.strip()


def _encode(tokenizer, text: str, add_special_tokens: bool = False) -> list[int]:
    try:
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
    except TypeError:  # haltkit's CharTokenizer
        return list(tokenizer.encode(text))


def _vocab(tokenizer) -> dict[str, int]:
    get = getattr(tokenizer, "get_vocab", None)
    return dict(get()) if callable(get) else dict(tokenizer.vocab)


def resolve_conventions(
    tokenizer, model=None, chat_template: str | None = "auto", think_open: str | None = None,
    think_close: str | None = None, exit_text: str | None = None, answer_prefix: str = "\n\n",
    eos_ids: tuple[int, ...] | None = None,
) -> Conventions:
    """The model's conventions, defaults read from the tokenizer and generation config.

    Args:
        tokenizer: a Hugging Face tokenizer (or anything with ``encode``/``decode``/``get_vocab``).
        model: the causal LM (its ``generation_config`` gives the EOS ids), or None.
        chat_template: "auto" (the tokenizer's, if it has one), "none", or a template source.
        think_open, think_close: the thinking tags (defaults above).
        exit_text: the text forced at an exit (default ``think_close + answer_prefix``).
        answer_prefix: written after ``think_close`` before the answer when ``exit_text`` is not given.
        eos_ids: override the EOS ids.
    Raises:
        ValueError: ``think_close`` is not one token of the vocabulary (naming it and how it
            tokenizes), ``exit_text`` does not start with it, or no EOS id is known.
    """
    vocab = _vocab(tokenizer)
    close = "</think>" if think_close is None else think_close
    close_ids = _encode(tokenizer, close)
    if close not in vocab and len(close_ids) != 1:
        raise ValueError(
            f"think_close: the tokenizer has no {close!r} token (it encodes as {len(close_ids)} tokens {close_ids}); "
            "the tag that ends thinking must be one token of the vocabulary. Use a reasoning model whose "
            "tokenizer has it, or pass --think-close with a text that is one token (e.g. '\\n\\n' for a plain "
            "instruct model) and --exit-text")
    close_id = vocab[close] if close in vocab else close_ids[0]
    if think_open is None:
        think_open = "<think>" if close == "</think>" and "<think>" in vocab else ""
    if exit_text is None:
        exit_text = close + answer_prefix
    if not exit_text.startswith(close):
        raise ValueError(f"exit_text must start with the think_close tag {close!r}, got {exit_text!r}")
    ids = [close_id] + _encode(tokenizer, exit_text[len(close):]) if len(exit_text) > len(close) else [close_id]
    template = getattr(tokenizer, "chat_template", None) if chat_template == "auto" else (
        None if chat_template in (None, "none") else chat_template)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    if eos_ids is None:
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        if eos is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            eos = getattr(tokenizer, "eos_id", None) if eos is None else eos
        eos_ids = () if eos is None else ((eos,) if isinstance(eos, int) else tuple(eos))
    if not eos_ids:
        raise ValueError("eos_ids: neither the generation config nor the tokenizer names an EOS token; pass --eos-id")
    eos_texts = tuple(tokenizer.decode([e]) for e in eos_ids)
    return Conventions(template, think_open, close, int(close_id), exit_text, tuple(int(i) for i in ids),
                       tuple(int(e) for e in eos_ids), eos_texts)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary (token -> id): equal for equal vocabularies."""
    items = sorted(_vocab(tokenizer).items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()[:16]


def model_identity(model) -> dict:
    """{"hidden_size", "vocab_size", "model_type", "config_hash"} of a causal LM.

    The config hash covers the architecture (layers, widths, vocabulary, rope, ...) and leaves
    out paths, versions, dtype and runtime flags.
    """
    from ..runner import model_dims

    vocab, hidden, _ = model_dims(model)
    cfg = getattr(model, "config", None)
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
    d = {k: v for k, v in d.items() if k not in _VOLATILE}
    blob = json.dumps(d, sort_keys=True, default=str)
    return {"hidden_size": hidden, "vocab_size": vocab, "model_type": d.get("model_type"),
            "config_hash": hashlib.sha256(blob.encode()).hexdigest()[:16]}
