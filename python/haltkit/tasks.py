"""Verifiable reasoning tasks: generated chain sums of graded difficulty, and a JSONL adapter.

A task turns a :class:`Problem` into text the toy models read and write::

    prompt:  Q:4+8+5+9<think>
    think:   4+8=12, 12+5=17, 17+9=26. so 26. check: 9+5=14, 14+8=22, 22+4=26. ok.
    answer:  </think>A:26<eos>

The think phase works the problem (running partial sums in ordinary digit order), usually
states the answer before it ends and then re-checks it with the terms in another order, in
sampled phrasing, so a draft model cannot predict every token. A few traces carry a slip in the
first pass that the re-check catches (``mismatch. redo: ...``), so thinking past the first
answer is sometimes worth something, as in a real reasoning model.

Every trace also records, for each character position, the answer its partial work supports
(the last partial sum of the first pass, then the stated answer, then the re-check's result
once it disagreed): :func:`forced_exit_text` cuts the think phase at a random point and
writes that answer after ``</think>``, which is how the toy models learn to answer when their
thinking is cut short.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from dataclasses import dataclass

from .tokenizer import ANSWER_PREFIX, END_THINK, EOS, THINK

__all__ = [
    "Problem",
    "Trace",
    "ChainSum",
    "JsonlTask",
    "DIFFICULTIES",
    "is_held_out",
    "prompt_text",
    "trace_text",
    "forced_exit_text",
    "parse_answer",
]

#: Difficulty level -> (number of terms (lo, hi), largest term). Difficulty grows with the
#: number of terms, so the work (and the think phase) grows with it; the terms are digits and
#: the partial sums reach two digits, which a ~1M-parameter model learns within its 30-minute
#: CPU budget (three-digit terms it did not: it still miscopied operands after 15M tokens).
DIFFICULTIES: dict[int, tuple[tuple[int, int], int]] = {
    1: ((2, 2), 9),
    2: ((3, 4), 9),
    3: ((5, 6), 9),
    4: ((7, 8), 9),
    5: ((9, 10), 9),
}


@dataclass(frozen=True)
class Problem:
    """One verifiable question: ``question`` is asked, ``answer`` is the exact expected text."""

    question: str
    answer: str
    difficulty: int = 0
    terms: tuple[int, ...] = ()


@dataclass(frozen=True)
class Trace:
    """A worked think phase.

    Fields:
        think: the think-phase text (no ``<think>`` / ``</think>``).
        supported: per character position p in [0, len(think)], the answer that ``think[:p]``
            supports (what a forced exit after p characters should answer).
        answer_pos: the first p from which ``supported`` stays equal to the final answer.
    """

    think: str
    supported: tuple[str, ...]
    answer_pos: int


def prompt_text(problem: Problem) -> str:
    """The prompt the model sees; it ends with ``<think>`` so generation starts in the think phase."""
    return f"Q:{problem.question}{THINK}"


def trace_text(problem: Problem, trace: Trace) -> str:
    """Prompt, full think phase, ``</think>``, the answer and ``<eos>``: one training example."""
    return f"{prompt_text(problem)}{trace.think}{END_THINK}{ANSWER_PREFIX}{problem.answer}{EOS}"


def forced_exit_text(problem: Problem, trace: Trace, cut: int) -> str:
    """The think phase cut after ``cut`` characters, then the answer that partial work supports."""
    if not 0 <= cut <= len(trace.think):
        raise ValueError(f"cut must be in [0, {len(trace.think)}], got {cut}")
    return f"{prompt_text(problem)}{trace.think[:cut]}{END_THINK}{ANSWER_PREFIX}{trace.supported[cut]}{EOS}"


def parse_answer(text: str) -> str:
    """The answer in generated text: what follows the answer prefix, up to ``<eos>``, stripped."""
    if ANSWER_PREFIX in text:
        text = text.split(ANSWER_PREFIX, 1)[1]
    return text.split(EOS, 1)[0].strip()


def is_held_out(problem: Problem) -> bool:
    """True for about a tenth of all problems, reserved for evaluation (never trained on).

    The split is a hash of the question, so it holds for every sampler and seed.
    """
    return hashlib.blake2b(problem.question.encode(), digest_size=2).digest()[0] % 10 == 0


class _TraceWriter:
    """Appends text and records, per character, the answer the text so far supports."""

    def __init__(self, first_guess: str) -> None:
        self.parts: list[str] = []
        self.supported: list[str] = [first_guess]
        self.length = 0

    def write(self, text: str, supports: str | None = None) -> None:
        """Append ``text``; once its last character is written, the support becomes ``supports``."""
        before = self.supported[-1]
        self.parts.append(text)
        self.length += len(text)
        self.supported.extend([before] * (len(text) - 1))
        self.supported.append(before if supports is None else supports)


class ChainSum:
    """Sums of 2 to 10 digits worked as running partial sums; difficulty grows with the terms.

    Args:
        check_prob: probability that a trace re-checks its answer. Default 0.85.
        slip_prob: probability that the first pass carries a slip the re-check catches. Default 0.08.
    """

    name = "chain_sum"

    def __init__(self, check_prob: float = 0.85, slip_prob: float = 0.08) -> None:
        self.check_prob = check_prob
        self.slip_prob = slip_prob

    def sample(self, rng: random.Random, difficulty: int, held_out: bool | None = False) -> Problem:
        """A random problem of a difficulty level (1..5).

        Args:
            rng: the random source.
            difficulty: a key of :data:`DIFFICULTIES`.
            held_out: False for training problems, True for evaluation ones, None for either.
        Raises:
            ValueError: for an unknown difficulty level.
        """
        if difficulty not in DIFFICULTIES:
            raise ValueError(f"difficulty must be one of {sorted(DIFFICULTIES)}, got {difficulty!r}")
        (lo, hi), top = DIFFICULTIES[difficulty]
        while True:
            terms = tuple(rng.randint(1, top) for _ in range(rng.randint(lo, hi)))
            p = Problem("+".join(map(str, terms)), str(sum(terms)), difficulty, terms)
            if held_out is None or is_held_out(p) == held_out:
                return p

    def verify(self, problem: Problem, answer: str) -> float:
        """1.0 when the answer text is exactly the sum, else 0.0."""
        return float(answer.strip() == problem.answer)

    def _chain(self, w: _TraceWriter, terms: list[int], supports: bool, slip_at: int = 0, slip: int = 0) -> int:
        acc = terms[0]
        for i, t in enumerate(terms[1:], 1):
            # A slip is a small error at one step that the later steps carry along.
            s = acc + t + (slip if i == slip_at and acc + t + slip > 0 else 0)
            sep = ", " if i > 1 else ""
            w.write(f"{sep}{acc}+{t}=")
            w.write(str(s), str(s) if supports else None)
            acc = s
        return acc

    def trace(self, problem: Problem, rng: random.Random) -> Trace:
        """A worked think phase for ``problem`` with sampled phrasing, check order and slip."""
        terms = list(problem.terms)
        w = _TraceWriter(str(terms[0]))
        check = rng.random() < self.check_prob
        slip_at = rng.randint(1, len(terms) - 1) if check and rng.random() < self.slip_prob else 0
        stated = self._chain(w, terms, True, slip_at, rng.choice((1, -1, 10, -10)))
        w.write(". " + rng.choice(("so ", "answer ", "total ", "got ")))
        w.write(str(stated), str(stated))
        w.write(".")
        if check:
            order = terms[::-1] if rng.random() < 0.6 else terms[1:] + terms[:1]
            w.write(" " + rng.choice(("check: ", "verify: ", "recheck: ")))
            again = self._chain(w, order, False)
            if again == stated:
                w.write(". " + rng.choice(("ok.", "yes.", "matches.")))
            else:
                w.write(". mismatch.", str(again))
                w.write(" redo: ")
                self._chain(w, terms, False)
                w.write(". " + rng.choice(("so ", "answer ")) + str(again) + ".")
        supported = tuple(w.supported)
        final = problem.answer
        pos = len(supported) - 1
        while pos > 0 and supported[pos - 1] == final:
            pos -= 1
        return Trace("".join(w.parts), supported, pos)


class JsonlTask:
    """Prompt / answer pairs from a JSONL file (GSM8K style), with a numeric or exact verifier.

    Each line is ``{"prompt": ..., "answer": ...}`` (other keys are ignored). The numeric
    verifier compares the last number in the model's answer with the expected number (commas
    dropped, ``abs diff <= 1e-6 * max(1, |expected|)``); the exact verifier compares stripped text.

    Args:
        path: the JSONL file.
        verifier: "numeric" or "exact". Default "numeric".
    Raises:
        ValueError: naming the line of a malformed record, or an unknown verifier.
    """

    name = "jsonl"

    def __init__(self, path: str | os.PathLike, verifier: str = "numeric") -> None:
        if verifier not in ("numeric", "exact"):
            raise ValueError(f"verifier must be 'numeric' or 'exact', got {verifier!r}")
        self.verifier = verifier
        self.problems: list[Problem] = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    prompt, answer = rec["prompt"], rec["answer"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{lineno}: expected a JSON object with 'prompt' and 'answer' ({e})") from e
                if verifier == "numeric" and _last_number(str(answer)) is None:
                    raise ValueError(f"{path}:{lineno}: answer {answer!r} has no number for the numeric verifier")
                self.problems.append(Problem(str(prompt), str(answer).strip()))

    def verify(self, problem: Problem, answer: str) -> float:
        """1.0 when ``answer`` matches the expected one under this task's verifier, else 0.0."""
        if self.verifier == "exact":
            return float(answer.strip() == problem.answer)
        got, want = _last_number(answer), _last_number(problem.answer)
        return float(got is not None and abs(got - want) <= 1e-6 * max(1.0, abs(want)))


def _last_number(text: str) -> float | None:
    found = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
    if not found:
        return None
    x = float(found[-1])
    return x if math.isfinite(x) else None

