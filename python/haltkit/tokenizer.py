"""The character-level tokenizer of the toy reasoning models.

One id per printable ASCII character plus newline, and four special tokens (``<pad>``,
``<eos>``, ``<think>``, ``</think>``). :class:`CharTokenizer` is the fast path used by training
and rollouts; :meth:`CharTokenizer.save` writes the same vocabulary in the form
``transformers.PreTrainedTokenizerFast.from_pretrained(directory)`` loads, and the tests check
that both encode alike.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

__all__ = ["CharTokenizer", "PAD", "EOS", "THINK", "END_THINK", "ANSWER_PREFIX"]

PAD, EOS, THINK, END_THINK = "<pad>", "<eos>", "<think>", "</think>"
SPECIALS = (PAD, EOS, THINK, END_THINK)
#: Written after ``</think>`` before the answer; the exit tokens are ``</think>`` then these.
ANSWER_PREFIX = "A:"
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")


class CharTokenizer:
    """Character-level tokenizer: special tokens first, then ``\\n`` and printable ASCII.

    Example:
        >>> tok = CharTokenizer()
        >>> tok.decode(tok.encode("Q:1+2<think>"))
        'Q:1+2<think>'
    """

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {t: i for i, t in enumerate(SPECIALS + tuple(CHARS))}
        self.id_to_token: list[str] = list(self.vocab)
        self.pad_id, self.eos_id = self.vocab[PAD], self.vocab[EOS]
        self.think_id, self.end_think_id = self.vocab[THINK], self.vocab[END_THINK]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def exit_tokens(self) -> tuple[int, ...]:
        """The ids forced at an exit: ``</think>`` then the answer prefix."""
        return (self.end_think_id,) + tuple(self.encode(ANSWER_PREFIX))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens are written literally (``"<think>"``).

        Raises:
            ValueError: naming the first character outside the vocabulary and its position.
        """
        ids: list[int] = []
        pos = 0
        for part in _SPECIAL_RE.split(text):
            if part in self.vocab and part in SPECIALS:
                ids.append(self.vocab[part])
            else:
                for i, ch in enumerate(part):
                    tid = self.vocab.get(ch)
                    if tid is None:
                        raise ValueError(
                            f"character {ch!r} at position {pos + i} is not in the vocabulary "
                            "(printable ASCII and newline)"
                        )
                    ids.append(tid)
            pos += len(part)
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """The text of ``ids`` (ids outside the vocabulary raise IndexError)."""
        toks = (self.id_to_token[int(i)] for i in ids)
        return "".join(t for t in toks if not (skip_special and t in SPECIALS))

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` and its config so ``PreTrainedTokenizerFast`` loads the directory."""
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        core = Tokenizer(models.WordLevel(vocab=self.vocab, unk_token=None))
        # Every character is its own word; special tokens are matched before splitting.
        core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
        core.decoder = decoders.Fuse()
        core.add_special_tokens(list(SPECIALS))
        fast = PreTrainedTokenizerFast(
            tokenizer_object=core, pad_token=PAD, eos_token=EOS, additional_special_tokens=[THINK, END_THINK]
        )
        fast.save_pretrained(os.fspath(directory))
