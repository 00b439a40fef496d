"""Value exits inside Hugging Face's own ``model.generate``: a LogitsProcessor + StoppingCriteria pair.

For users who keep their ``generate`` call. A forward hook on the LM head keeps its input (the
final hidden state, after the final norm) from the forward that produced the step's logits; the
processor runs ``haltkit.decode_step`` on those logits and that hidden state (value head,
per-request sampling, patience, thinking budgets, forced exit tokens) and hands Hugging Face a
one-hot row, so whatever decoding Hugging Face was asked for picks exactly that token; the
stopping criterion reports each row's finish. The tokens are those :func:`haltkit.generate`
emits for the same requests (same seeds, same rules).

Two things differ from :func:`haltkit.generate` because the loop is Hugging Face's: finished rows
stay in the batch (padded, not compacted), and a row that ends without a token (a value or budget
exit without exit tokens) still gets one pad token appended by Hugging Face in that step.
:meth:`ValueExit.tokens` returns exactly what each row emitted. Assisted generation (an
``assistant_model``) scores several positions per call and is not supported.

Example:
    >>> vx = haltkit.hf.ValueExit(model, head, exit=ExitPolicy(cost_of_time=0.01, max_new_tokens=64,
    ...                                                       eos_token_ids=(eos,)))
    >>> out = model.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False,
    ...                      logits_processor=[vx.processor], stopping_criteria=[vx.stopping])
    >>> vx.finish_reason(), vx.tokens()
    >>> vx.close()
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from transformers import LogitsProcessor, StoppingCriteria

from .ops import decode_step
from .params import ExitPolicy, SamplingParams, pack_requests
from .runner import model_dims, split_model
from .state import DecodeState, Reason
from .value_head import MarginalValueHead

__all__ = ["ValueExit", "ValueExitLogitsProcessor", "ValueExitStoppingCriteria"]


class ValueExit:
    """The shared state of one ``model.generate`` call: requests, decode state, per-row outputs.

    Args:
        model: the Hugging Face causal LM that will run ``generate``.
        value_head: a :class:`MarginalValueHead` reading the model's final hidden state, or None.
        exit: one :class:`ExitPolicy` for all rows, or one per row. Default: the head's own
            (``value_head.exit_policy()``) when it carries train-head metadata, else ``ExitPolicy()``.
        sampling: one :class:`SamplingParams` for all rows, or one per row. Default greedy.
        batch_size: B; needed when both ``exit`` and ``sampling`` are single values.
        pad_token_id: the token given to Hugging Face for a row that emits nothing. Default: the
            model's generation config's pad token, else 0.
        backend: the epilogue backend. Default "auto".

    Raises:
        ValueError / TypeError: a head of the wrong hidden size, a model without output
            embeddings, a bad parameter (before generation starts).
    """

    def __init__(
        self,
        model: nn.Module,
        value_head: MarginalValueHead | None = None,
        exit: ExitPolicy | Sequence[ExitPolicy] | None = None,
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        batch_size: int | None = None,
        pad_token_id: int | None = None,
        backend: str = "auto",
    ) -> None:
        _, lm_head = split_model(model)
        if lm_head is None:
            raise TypeError("ValueExit needs a Hugging Face causal LM (with output embeddings)")
        vocab, hidden, _ = model_dims(model)
        if value_head is not None and value_head.d_model != hidden:
            raise ValueError(
                f"the value head reads hidden states of size {value_head.d_model} "
                f"but the model's final hidden state has size {hidden}"
            )
        if value_head is not None:
            value_head.check_compatible(model)
        if exit is None:
            exit = value_head.exit_policy() if value_head is not None and value_head.meta else ExitPolicy()
        sampling = SamplingParams(temperature=0.0) if sampling is None else sampling
        self.device = next(model.parameters()).device
        self.requests = pack_requests(sampling, exit, vocab, batch_size, self.device)
        B = self.requests.batch_size
        if value_head is None:  # a price of time without a head would end every row with "error"
            lams = self.requests.cost_of_time.tolist()
            priced = [b for b, lam in enumerate(lams) if lam != -math.inf]
            if priced:
                raise ValueError(
                    f"row {priced[0]}: ExitPolicy(cost_of_time={lams[priced[0]]:g}) prices time against the value "
                    "head's predictions, but value_head is None: pass a value head, or cost_of_time=None"
                )
        self.state = DecodeState.new(B, self.device)
        self.head, self.backend = value_head, backend
        if pad_token_id is None:
            pad_token_id = getattr(getattr(model, "generation_config", None), "pad_token_id", None) or 0
        self.pad_token_id = pad_token_id
        self._hidden: torch.Tensor | None = None
        self._hook = lm_head.register_forward_hook(self._keep_hidden)
        self._tokens: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self.processor = ValueExitLogitsProcessor(self)
        self.stopping = ValueExitStoppingCriteria(self)

    def _keep_hidden(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._hidden = args[0][:, -1]

    def step(self, scores: torch.Tensor) -> torch.Tensor:
        """One decode step on Hugging Face's scores [B, V]; returns the one-hot scores."""
        B = self.requests.batch_size
        if scores.shape[0] != B:
            raise ValueError(
                f"the requests describe {B} rows but generate scored {scores.shape[0]} "
                "(num_return_sequences, beams and assisted generation are not supported)"
            )
        hidden = None
        if self.head is not None:
            if self._hidden is None or self._hidden.shape[0] != B:
                raise RuntimeError("no final hidden state was captured from the LM head for this step")
            hidden = self._hidden
        out = decode_step(scores, hidden, self.requests, self.state, self.head, self.backend)
        self._tokens.append(out.tokens)
        self._values.append(out.values)
        chosen = torch.where(out.tokens >= 0, out.tokens, self.pad_token_id)
        one_hot = torch.full_like(scores, -math.inf)
        return one_hot.scatter_(1, chosen[:, None], 0.0)

    def tokens(self) -> list[list[int]]:
        """B lists: the tokens each row emitted (forced exit tokens included, pads excluded)."""
        if not self._tokens:
            return [[] for _ in range(self.requests.batch_size)]
        t = torch.stack(self._tokens, 1).tolist()
        return [[x for x in row if x >= 0] for row in t]

    def values(self) -> list[list[float]]:
        """B lists: the head's value at each step the row was running (as GenerateResult.values)."""
        if not self._values:
            return [[] for _ in range(self.requests.batch_size)]
        v = torch.stack(self._values, 1).tolist()
        return [[x for x in row if not math.isnan(x)] for row in v]

    def finish_reason(self) -> list[str]:
        """B of "none" (still running when generate stopped), "eos", "length", "value", "budget", "error"."""
        return [Reason(r).name.lower() for r in self.state.finish_reason.tolist()]

    def think_end(self) -> list[str]:
        """B of "none", "value", "budget", "model"."""
        return [Reason(r).name.lower() for r in self.state.think_end.tolist()]

    def close(self) -> None:
        """Remove the LM-head hook (call once generation is over)."""
        self._hook.remove()


class ValueExitLogitsProcessor(LogitsProcessor):
    """Runs the fused decode step on the scores and forces its token (see :class:`ValueExit`)."""

    def __init__(self, shared: ValueExit) -> None:
        self.shared = shared

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Args: input_ids [B, T] (unused), scores [B, V]. Returns: [B, V] one-hot scores."""
        return self.shared.step(scores)


class ValueExitStoppingCriteria(StoppingCriteria):
    """Per-row stop: True where the decode state has a finish reason."""

    def __init__(self, shared: ValueExit) -> None:
        self.shared = shared

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        """Returns: [B] bool, the rows that finished."""
        return self.shared.state.finished.to(input_ids.device)
