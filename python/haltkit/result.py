"""What :func:`haltkit.generate` returns: per-sequence tokens, reasons, value traces and timings."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

__all__ = ["GenerateResult"]


@dataclass
class GenerateResult:
    """The outcome of one :func:`haltkit.generate` call (B sequences, in input order).

    Fields:
        tokens: B lists of generated token ids (prompt excluded; forced exit tokens included).
        text: B decoded strings when a tokenizer was given, else None.
        finish_reason: B of "eos", "length", "value", "budget", "error".
        think_end: B of "none", "value", "budget", "model": why the thinking phase ended.
        values: B lists, the head's value at every step (NaN without a head); entry i is step
            i's, and a sequence that ended without a token (a value exit, an error) has one more
            entry than tokens: the value of that last step.
        num_steps: B token counts (the length of ``tokens``).
        think_tokens: B counts of tokens generated in the thinking phase.
        drafted: B counts of drafted tokens offered for verification (0 without a draft).
        accepted: B counts of drafted tokens accepted.
        verify_steps: B counts of verification steps the sequence took part in.
        target_forwards: forward passes of the target model, prefill included.
        draft_forwards: forward passes of the draft model (0 for prompt lookup or no draft).
        timings: seconds: "prefill", "decode" (the loop, compile included), "compile",
            "total"; and "tokens_per_s", the decode loop's throughput: tokens after each row's
            first (which the prefill emits) over the loop's time less compile time.
    """

    tokens: list[list[int]]
    text: list[str] | None
    finish_reason: list[str]
    think_end: list[str]
    values: list[list[float]]
    num_steps: list[int]
    think_tokens: list[int]
    drafted: list[int]
    accepted: list[int]
    verify_steps: list[int]
    target_forwards: int
    draft_forwards: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return len(self.tokens)

    @property
    def total_tokens(self) -> int:
        """Tokens generated over the whole batch."""
        return sum(self.num_steps)

    @property
    def mean_accepted_length(self) -> float:
        """Accepted drafted tokens per verification step over the batch; NaN without a draft.

        A verification step of one sequence emits this many drafted tokens plus one.
        """
        steps = sum(self.verify_steps)
        return math.nan if steps == 0 else sum(self.accepted) / steps

    def to_dict(self) -> dict:
        """Plain Python types only (JSON-serialisable; NaN values become None)."""
        d = asdict(self)
        d["values"] = [[None if math.isnan(v) else v for v in row] for row in self.values]
        d["mean_accepted_length"] = None if math.isnan(self.mean_accepted_length) else self.mean_accepted_length
        return d

    def __repr__(self) -> str:
        t = self.timings
        head = (
            f"GenerateResult(B={self.batch_size}, tokens={self.total_tokens}, "
            f"target_forwards={self.target_forwards}, "
            f"decode {t.get('tokens_per_s', math.nan):.1f} tok/s, prefill {t.get('prefill', 0.0):.2f}s, "
            f"compile {t.get('compile', 0.0):.1f}s)"
        )
        lines = [head, f"  {'seq':>3} {'steps':>5} {'think':>5} {'think end':>9} {'finish':>7}  "
                       f"{'value min/mean/max':>20}  {'accepted':>9}  output"]
        for b in range(self.batch_size):
            v = [x for x in self.values[b] if not math.isnan(x)]
            vs = f"{min(v):+.2f}/{sum(v) / len(v):+.2f}/{max(v):+.2f}" if v else "-"
            acc = f"{self.accepted[b]}/{self.drafted[b]}" if self.drafted[b] else "-"
            shown = repr(self.text[b]) if self.text is not None else " ".join(map(str, self.tokens[b]))
            if len(shown) > 48:
                shown = shown[:45] + "..."
            lines.append(f"  {b:>3} {self.num_steps[b]:>5} {self.think_tokens[b]:>5} {self.think_end[b]:>9} "
                         f"{self.finish_reason[b]:>7}  {vs:>20}  {acc:>9}  {shown}")
        return "\n".join(lines)
