"""Executable specification of ``exit_rules``: decode_step's exit rules around another sampler.

A serving engine such as vLLM draws each token itself, after its logits processors have run, so
haltkit cannot run a whole ``decode_step``. One call of ``exit_rules`` per engine step, before the
engine samples, does instead, for every active row b < B:

1. Commit. Where ``token[b] >= 0`` (the engine drew it for the row's pending plan), step 5 of
   ``decode_step`` (:func:`~haltkit.reference.termination.after_step`) with that plan and token.
   ``token[b] = -1`` leaves the state as it is: the first call for a row, or a step whose sample
   the engine discarded (a partial prefill), is simply planned again.
2. Plan. The head's value on ``hidden[b]`` and the committed state, then steps 1 and 3
   (:func:`~haltkit.reference.termination.plan_step`) without a row check of the logits (the
   engine's own business). The plan is stored in ``plan[b]`` (packed, see ``pack_plan``).
3. Force. The row must take its forced exit token, or, when it emits nothing of its own this
   step (a value or budget exit without exit tokens, an error, or a row already finished), its
   ``halt_token[b]`` (the EOS the engine stops on; -1: none). A forced row's logits become -inf
   everywhere but 0 at that token, so any sampler takes it.

Rows with ``active[b]`` false are not touched. ``requests``, ``state``, ``plan``, ``halt_token``
and ``active`` may have more rows than the logits (an engine's slot storage): rows >= B are not
touched either.
"""

from __future__ import annotations

import math

import torch

from ..params import RequestBatch
from ..state import DecodeState
from ..value_head import HeadWeights
from .decode_step import head_values
from .termination import after_step, pack_plan, plan_step, unpack_plan

__all__ = ["exit_rules"]


def exit_rules(
    logits: torch.Tensor,
    hidden: torch.Tensor | None,
    requests: RequestBatch,
    state: DecodeState,
    head: HeadWeights | None,
    plan: torch.Tensor,
    token: torch.Tensor,
    halt_token: torch.Tensor,
    active: torch.Tensor,
) -> None:
    """One call of the exit rules, as specified in this module's docstring (all in place).

    Args:
        logits: [B, V] float32; forced rows are overwritten.
        hidden: [B, d] float32 | bfloat16 | float16, or None when ``head`` is None.
        requests: [M >= B] each.
        state: [M] int32 each; committed rows are updated.
        head: the value head's weights, or None (then value exits must be off).
        plan: [M, PLAN_WORDS] int32; read by the commit, overwritten by the plan.
        token: [B] int64, the token drawn for each row's pending plan, -1 for none.
        halt_token: [M] int64, what a row that emits nothing must take, -1 for nothing.
        active: [M] bool, the rows these rules govern.
    """
    B = logits.shape[0]
    r = RequestBatch(*(t[:B] for t in requests.tensors()))
    s = DecodeState(*(t[:B] for t in state.tensors()))
    on = active[:B]

    committed = after_step(unpack_plan(plan[:B]), token, r, s)
    commit = on & (token >= 0)
    for dst, src in zip(s.tensors(), committed.tensors()):
        dst.copy_(torch.where(commit, src, dst))

    p = plan_step(head_values(hidden, r, s, head), r, s, torch.zeros_like(on))
    plan[:B] = torch.where(on[:, None], pack_plan(p), plan[:B])

    force = torch.where(on & p.forcing, p.forced_token, torch.where(on & ~p.emit, halt_token[:B], -1))
    forcing = (force >= 0)[:, None]
    col = force.clamp(min=0)[:, None]
    logits.masked_fill_(forcing, -math.inf)
    logits.scatter_(1, col, torch.where(forcing, torch.zeros_like(col, dtype=logits.dtype), logits.gather(1, col)))
