"""Decode state updated in place by the fused step ops, and the step's outputs."""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch

__all__ = ["Reason", "DecodeState", "StepOutput"]


class Reason(enum.IntEnum):
    """Why a sequence finished (``finish_reason``) or left its thinking phase (``think_end``)."""

    NONE = 0  #: still running / still thinking
    EOS = 1  #: emitted an EOS id (the token is kept)
    LENGTH = 2  #: reached max_new_tokens
    VALUE = 3  #: the head's value stayed below the price of time for `patience` steps
    BUDGET = 4  #: the thinking budget ran out
    ERROR = 5  #: non-finite logits (or a non-finite value where the head was consulted)
    MODEL = 6  #: the model closed its thinking phase itself (``think_end`` only)


@dataclass
class DecodeState:
    """Per-sequence decode state; every field is a [B] int32 tensor on the logits' device.

    The step ops read and update it in place, so a captured CUDA graph replays on it.

    Fields:
        num_generated: tokens emitted so far, sampled and forced; also the Philox step counter.
        think_tokens: tokens emitted in the thinking phase, not counting the token that closes it.
        below_count: consecutive consulted steps whose value was below the price of time.
        phase: 0 = thinking, 1 = answering (the head is no longer consulted).
        forced_pos: in the answer phase, the index of the next exit token to force
            (equal to the number of exit tokens once forcing is done).
        think_end: a :class:`Reason` (NONE, VALUE, BUDGET or MODEL): why thinking ended.
        finish_reason: a :class:`Reason`; NONE while the sequence runs.
    """

    num_generated: torch.Tensor
    think_tokens: torch.Tensor
    below_count: torch.Tensor
    phase: torch.Tensor
    forced_pos: torch.Tensor
    think_end: torch.Tensor
    finish_reason: torch.Tensor

    @classmethod
    def new(cls, batch_size: int, device: torch.device | str = "cpu") -> "DecodeState":
        """A fresh state: nothing generated, every sequence thinking and running."""
        return cls(*(torch.zeros(batch_size, dtype=torch.int32, device=device) for _ in fields(cls)))

    @property
    def batch_size(self) -> int:
        return self.num_generated.shape[0]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """All fields in declaration order (the order the custom ops take them in)."""
        return tuple(getattr(self, f.name) for f in fields(self))

    def index_select(self, idx: torch.Tensor) -> "DecodeState":
        """The rows ``idx`` ([n] int64), in that order: how a batch is compacted."""
        return DecodeState(*(t.index_select(0, idx) for t in self.tensors()))

    def clone(self) -> "DecodeState":
        return DecodeState(*(t.clone() for t in self.tensors()))

    @property
    def finished(self) -> torch.Tensor:
        """[B] bool: the sequence has a finish reason."""
        return self.finish_reason != Reason.NONE


class StepOutput(NamedTuple):
    """What one decode step returns (the state is updated in place).

    Fields:
        tokens: [B] int64, the emitted token, or -1 where the row emitted nothing (already
            finished, error, or a value / budget exit without exit tokens).
        logprobs: [B] float32, log-probability of the token under the distribution the row samples
            from (greedy rows: the model's softmax); -inf for a forced token outside that
            distribution's kept set; NaN where no token was emitted.
        values: [B] float32, the head's predicted marginal value for every row that was running
            at the start of the step; NaN for rows already finished or when there is no head.
        active_idx: [B] int64, indices of the rows still running after the step, in order,
            padded with -1.
        num_active: [] int64, how many entries of ``active_idx`` are real.
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor
    active_idx: torch.Tensor
    num_active: torch.Tensor
