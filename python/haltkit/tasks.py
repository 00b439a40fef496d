"""Verifiable reasoning tasks: generated chain sums of graded difficulty, JSONL task files, verifiers.

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
    "ReasoningGymTask",
    "DIFFICULTIES",
    "is_held_out",
    "prompt_text",
    "trace_text",
    "forced_exit_text",
    "parse_answer",
    "parse_number",
    "parse_choice",
    "make_verifier",
    "extract_answer",
    "chain_sum_jsonl",
    "VERIFIERS",
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
    messages: tuple[tuple[str, str], ...] = ()  # a chat's (role, content) turns; () for a plain prompt


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


#: The built-in verifiers (a ``module:function`` string names a user's callable instead).
VERIFIERS = ("numeric", "exact", "choice", "regex")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?(?:\s*/\s*\d+)?")


def parse_number(text: str) -> float | None:
    """The number an answer states, tolerant of formatting; None when it states none.

    Takes the content of the last ``\\boxed{...}`` if any, else the whole text; drops thousands
    separators, ``$``, ``%`` and LaTeX spacing; reads the last number (``3/4`` as a fraction,
    ``1e3`` in scientific notation).

    Example:
        >>> parse_number("so the total is $1,234.50.")
        1234.5
    """
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if boxed:
        text = boxed[-1]
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text).replace("$", "").replace("\\,", "").replace("\\!", "")
    found = _NUMBER.findall(text)
    if not found:
        return None
    tok = found[-1].replace(" ", "")
    try:
        if "/" in tok:
            num, den = tok.split("/")
            x = float(num) / float(den) if float(den) != 0 else math.nan
        else:
            x = float(tok)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def parse_choice(text: str) -> str | None:
    """The multiple-choice letter (A to J) an answer states, or None.

    A bare letter (``"B"``, ``"(B)"``, ``"B."``) wins; else ``answer is (B)`` / ``answer: B``;
    else the first standalone capital letter A-J (not the pronoun "I" before a lowercase word).
    """
    t = text.strip()
    m = re.fullmatch(r"\(?([A-J])\)?[.:)]?", t)
    if m is None:
        m = re.search(r"answer\s*(?:is|:)?\s*\(?([A-J])\b", t, flags=re.IGNORECASE)
    if m is None:
        m = re.search(r"\b([A-J])\b(?<!\bI(?=\s+[a-z]))", t)  # not the pronoun of "I think"
    return m.group(1).upper() if m else None


def make_verifier(spec: str):
    """A verifier ``f(problem, answer_text) -> float`` in [0, 1] from its name.

    Args:
        spec: "numeric" (numbers equal within 1e-6 relative, see :func:`parse_number`), "exact"
            (stripped text equal), "choice" (the same letter, see :func:`parse_choice`), "regex"
            (the expected answer is a regular expression searched in the answer text), or
            "package.module:function", a user's callable taking ``(answer_text, problem)`` and
            returning a bool or a float in [0, 1].
    Raises:
        ValueError: an unknown name, a module that does not import, or a missing function.
    """
    if spec == "numeric":
        def numeric(problem, answer):
            got, want = parse_number(answer), parse_number(problem.answer)
            return float(got is not None and want is not None and abs(got - want) <= 1e-6 * max(1.0, abs(want)))
        return numeric
    if spec == "exact":
        return lambda problem, answer: float(answer.strip() == problem.answer.strip())
    if spec == "choice":
        return lambda problem, answer: float(parse_choice(answer) == parse_choice(problem.answer) is not None)
    if spec == "regex":
        return lambda problem, answer: float(re.search(problem.answer, answer) is not None)
    if ":" in spec:
        import importlib

        mod_name, fn_name = spec.split(":", 1)
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"verifier {spec!r}: cannot load {fn_name!r} from module {mod_name!r} ({e})") from e
        if not callable(fn):
            raise ValueError(f"verifier {spec!r}: {fn_name!r} is not callable")
        return lambda problem, answer: float(fn(answer, problem))
    raise ValueError(f"verifier must be one of {VERIFIERS} or 'module:function', got {spec!r}")


class JsonlTask:
    """Verifiable tasks from a JSONL file: one JSON object per line.

    A row is ``{"prompt": str, "answer": str, "level": int (optional)}`` or, for a chat,
    ``{"messages": [{"role": ..., "content": ...}, ...], "answer": ..., "level": ...}``; other
    keys are ignored. The prompt is the user's text only: the model's chat template and
    thinking tag are added by :mod:`haltkit.train.conventions`.

    Args:
        path: the JSONL file.
        verifier: see :func:`make_verifier`. Default "numeric".
    Raises:
        ValueError: naming the file and line of a malformed record, or an unknown verifier.
    """

    name = "jsonl"

    def __init__(self, path: str | os.PathLike, verifier: str = "numeric") -> None:
        self.verifier = verifier
        self._verify = make_verifier(verifier)
        self.path = os.fspath(path)
        self.problems: list[Problem] = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not JSON ({e})") from e
                if not isinstance(rec, dict) or "answer" not in rec or ("prompt" in rec) == ("messages" in rec):
                    got = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
                    raise ValueError(f"{where}: expected an object with 'answer' and one of 'prompt' or 'messages', "
                                     f"got {got}")
                messages: tuple = ()
                if "messages" in rec:
                    msgs = rec["messages"]
                    if (not isinstance(msgs, list) or not msgs
                            or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in msgs)):
                        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
                    messages = tuple((str(m["role"]), str(m["content"])) for m in msgs)
                    prompt = messages[-1][1]
                else:
                    prompt = rec["prompt"]
                    if not isinstance(prompt, str) or not prompt:
                        raise ValueError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}")
                level = rec.get("level", 0)
                if not isinstance(level, int) or isinstance(level, bool):
                    raise ValueError(f"{where}: 'level' must be an integer, got {level!r}")
                answer = str(rec["answer"]).strip()
                if verifier == "numeric" and parse_number(answer) is None:
                    raise ValueError(f"{where}: answer {answer!r} has no number for the numeric verifier")
                if verifier == "choice" and parse_choice(answer) is None:
                    raise ValueError(f"{where}: answer {answer!r} is not a choice letter A-J")
                self.problems.append(Problem(str(prompt), answer, level, (), messages))

    def verify(self, problem: Problem, answer: str) -> float:
        """The verifier's score of ``answer`` (the text after the exit text) for ``problem``."""
        return float(self._verify(problem, answer))


class ReasoningGymTask:
    """Verifiable tasks generated by the ``reasoning-gym`` package, scored by its own scorers.

    ``pip install 'haltkit[reasoning-gym]'`` (Apache-2.0; procedural generators, no network: the
    questions are made on this machine from ``seed``). Each entry's question becomes a plain
    prompt (the model's chat template and thinking tag are added by
    :mod:`haltkit.train.conventions`); the answer text after the exit text is scored by the
    dataset's ``score_answer`` (1.0 right, partial credit where the dataset gives it).

    Args:
        dataset: a reasoning-gym dataset name, e.g. "basic_arithmetic", "leg_counting".
        size: how many entries to generate (>= 1).
        seed: the generator's seed.
        **config: the dataset's own settings (e.g. ``min_terms=2``).
    Raises:
        ImportError: reasoning-gym is not installed (saying how to install it).
        ValueError: an unknown dataset (listing close names), or a bad size.
    """

    name = "reasoning_gym"

    def __init__(self, dataset: str, size: int = 1000, seed: int = 0, **config) -> None:
        try:
            import reasoning_gym
        except ImportError as e:
            raise ImportError("ReasoningGymTask needs the reasoning-gym package: pip install 'haltkit[reasoning-gym]'"
                              ) from e
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"size must be an int >= 1, got {size!r}")
        known = sorted(reasoning_gym.factory.DATASETS)
        if dataset not in known:
            import difflib

            close = difflib.get_close_matches(dataset, known, n=3)
            raise ValueError(f"dataset: reasoning-gym has no dataset {dataset!r}"
                             + (f"; did you mean {', '.join(map(repr, close))}?" if close else ""))
        self.dataset, self.size, self.seed, self.config = dataset, size, seed, dict(config)
        self.version = getattr(reasoning_gym, "__version__", "unknown")
        self._data = reasoning_gym.create_dataset(dataset, size=size, seed=seed, **config)
        self.entries = [self._data[i] for i in range(size)]
        self.problems = [Problem(str(e["question"]), str(e["answer"]).strip()) for e in self.entries]
        # score_answer needs the entry (its metadata); a repeated question has the same entry's answer.
        self._entry = {}
        for p, e in zip(self.problems, self.entries):
            self._entry.setdefault(p.question, e)

    def verify(self, problem: Problem, answer: str) -> float:
        """The dataset's own score of ``answer`` (the text after the exit text) for ``problem``."""
        entry = self._entry.get(problem.question)
        if entry is None:
            raise ValueError(f"problem: {problem.question[:60]!r} is not one of this task's {self.size} entries")
        return float(self._data.score_answer(answer, entry) or 0.0)

    def task_id(self) -> dict:
        """What names the task in a rollout manifest."""
        return {"reasoning_gym": self.dataset, "size": self.size, "seed": self.seed, "config": self.config,
                "version": self.version}


def chain_sum_jsonl(path: str | os.PathLike, count: int, seed: int, held_out: bool = False,
                    template: bool = False) -> list[Problem]:
    """Write ``count`` chain sums (levels cycling 1..5) as a JSONL task file; returns the problems.

    Args:
        held_out: draw from the evaluation split (see :func:`is_held_out`) instead of training.
        template: write the toy's raw prompt (``Q:...<think>``) instead of the bare question.
    """
    rng, task, levels = random.Random(seed), ChainSum(), sorted(DIFFICULTIES)
    problems = [task.sample(rng, levels[i % len(levels)], held_out=held_out) for i in range(count)]
    with open(path, "w", encoding="utf-8") as f:
        for p in problems:
            prompt = prompt_text(p) if template else p.question
            f.write(json.dumps({"prompt": prompt, "answer": p.answer, "level": p.difficulty}) + "\n")
    return problems


def extract_answer(text: str, exit_text: str = "", stop: tuple[str, ...] = ()) -> str:
    """The answer in generated text: what follows the first ``exit_text`` (all of ``text`` when
    it holds none), cut at the first of ``stop`` (EOS strings), stripped."""
    if exit_text and exit_text in text:
        text = text.split(exit_text, 1)[1]
    for s in stop:
        if s and s in text:
            text = text.split(s, 1)[0]
    return text.strip()
