"""Speculative verification: validate once at the boundary, pick a backend, run ``haltkit::verify_step``.

Two layouts reach the same op: padded (``[B, K+1, V]`` logits, ``[B, K]`` drafts and a lengths
tensor) and vLLM's flattened one (each sequence's K_b+1 rows concatenated, cumulative draft
counts), which :func:`verify_step_flat` turns into the padded one with one gather.
"""

from __future__ import annotations

from typing import Optional

import torch

from .backends import backend_module, resolve_backend
from .ops import FLOAT_DTYPES, _STATE_FIELDS, _as_weights, _check_tensor, validate_step_inputs
from .params import RequestBatch
from .reference.verify_step import METHODS, VerifyOutput, sampling_log_probs
from .state import DecodeState
from .value_head import HeadWeights, MarginalValueHead

__all__ = ["verify_step", "verify_step_flat", "sampling_probs", "VerifyOutput"]


def sampling_probs(logits: torch.Tensor, requests: RequestBatch) -> torch.Tensor:
    """The distribution each row samples from, as ``decode_step`` and ``verify_step`` define it.

    Rows with temperature > 0 get the temperature-scaled softmax over the kept set of their
    top-k / top-p / min-p filters, renormalised (zero outside it): the p of speculative sampling,
    and the q a sampled draft should report so that target and draft are filtered alike. Greedy
    rows get the model's softmax (their token is its argmax; a greedy draft is a point mass).

    Args:
        logits: [B, V] float32 | bfloat16 | float16.
        requests: from :func:`haltkit.pack_requests`, [B] tensors on the logits' device.
    Returns:
        [B, V] float32, rows summing to 1; NaN rows where the logits are bad (NaN or +inf
        anywhere, or no finite entry).
    Raises:
        ValueError / TypeError: a shape, dtype or device is off.

    Example:
        >>> q = haltkit.sampling_probs(draft_logits, requests)        # [B, V]
        >>> draft = torch.multinomial(q, 1)[:, 0]
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a [B, V] tensor, got {getattr(logits, 'shape', type(logits))}")
    if not isinstance(requests, RequestBatch):
        raise TypeError(f"requests must be a RequestBatch, got {type(requests).__name__}")
    _check_tensor("logits", logits, (requests.batch_size, None), FLOAT_DTYPES, requests.temperature.device)
    return torch.exp(sampling_log_probs(logits, requests))


def _validate_verify_inputs(
    target_logits: torch.Tensor,
    hidden: torch.Tensor | None,
    draft_tokens: torch.Tensor,
    draft_lens: torch.Tensor,
    requests: RequestBatch,
    state: DecodeState,
    head: HeadWeights | None,
    draft_probs: torch.Tensor | None,
    method: str,
) -> None:
    if not isinstance(target_logits, torch.Tensor) or target_logits.dim() != 3:
        raise ValueError(
            f"target_logits must be a [B, K+1, V] tensor, got {getattr(target_logits, 'shape', type(target_logits))}"
        )
    B, K1, V = target_logits.shape
    dev = target_logits.device
    if K1 < 1:
        raise ValueError("target_logits must have at least one position (K+1 >= 1)")
    if hidden is not None:  # (without a head, validate_step_inputs below refuses hidden)
        shape = list(getattr(hidden, "shape", [type(hidden).__name__]))
        d = "d" if head is None else head.d_model
        if not isinstance(hidden, torch.Tensor) or len(shape) != 3 or shape[:2] != [B, K1] or (
            head is not None and shape[2] != d
        ):
            raise ValueError(f"hidden must have shape [{B}, {K1}, {d}], got {shape}")
    # Requests, state and head are checked as decode_step checks them, on position 0.
    validate_step_inputs(target_logits[:, 0], None if hidden is None else hidden[:, 0], requests, state, head)
    K = K1 - 1
    _check_tensor("draft_tokens", draft_tokens, (B, K), (torch.int64,), dev)
    _check_tensor("draft_lens", draft_lens, (B,), (torch.int32,), dev)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "exact":
        if draft_probs is not None:
            raise ValueError("draft_probs is only read by method='rejection'; pass None with method='exact'")
        return
    if draft_probs is None:
        raise ValueError(
            f"method='rejection' needs draft_probs: [{B}, {K}, {V}] draft distributions, "
            f"or [{B}, {K}] ones for point-mass drafts"
        )
    if not isinstance(draft_probs, torch.Tensor) or draft_probs.dim() not in (2, 3):
        raise ValueError(
            f"draft_probs must be [{B}, {K}, {V}] or [{B}, {K}], got {getattr(draft_probs, 'shape', type(draft_probs))}"
        )
    shape = (B, K) if draft_probs.dim() == 2 else (B, K, V)
    _check_tensor("draft_probs", draft_probs, shape, FLOAT_DTYPES, dev)


@torch.library.custom_op("haltkit::verify_step", mutates_args=_STATE_FIELDS, device_types=None)
def _verify_step_op(
    target_logits: torch.Tensor,
    hidden: Optional[torch.Tensor],
    draft_tokens: torch.Tensor,
    draft_lens: torch.Tensor,
    draft_probs: Optional[torch.Tensor],
    temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
    seed: torch.Tensor, cost_of_time: torch.Tensor, patience: torch.Tensor,
    min_new_tokens: torch.Tensor, max_new_tokens: torch.Tensor, thinking_budget: torch.Tensor,
    eos_ids: torch.Tensor, exit_tokens: torch.Tensor, exit_len: torch.Tensor,
    num_generated: torch.Tensor, think_tokens: torch.Tensor, below_count: torch.Tensor,
    phase: torch.Tensor, forced_pos: torch.Tensor, think_end: torch.Tensor, finish_reason: torch.Tensor,
    w1: Optional[torch.Tensor], b1: Optional[torch.Tensor], w2: Optional[torch.Tensor], b2: Optional[torch.Tensor],
    method: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    requests = RequestBatch(temperature, top_k, top_p, min_p, seed, cost_of_time, patience,
                            min_new_tokens, max_new_tokens, thinking_budget, eos_ids, exit_tokens, exit_len)
    state = DecodeState(num_generated, think_tokens, below_count, phase, forced_pos, think_end, finish_reason)
    head = None if w1 is None else HeadWeights(w1, b1, w2, b2)
    out = backend_module(backend).verify_step(
        target_logits, hidden, draft_tokens, draft_lens, requests, state, head, draft_probs, method
    )
    return tuple(out)


@_verify_step_op.register_fake
def _(
    target_logits, hidden, draft_tokens, draft_lens, draft_probs,
    temperature, top_k, top_p, min_p, seed, cost_of_time, patience,
    min_new_tokens, max_new_tokens, thinking_budget, eos_ids, exit_tokens, exit_len,
    num_generated, think_tokens, below_count, phase, forced_pos, think_end, finish_reason,
    w1, b1, w2, b2, method, backend,
):
    B, K1 = target_logits.shape[:2]
    f32 = dict(dtype=torch.float32, device=target_logits.device)
    i32 = dict(dtype=torch.int32, device=target_logits.device)
    i64 = dict(dtype=torch.int64, device=target_logits.device)
    new = target_logits.new_empty
    return (new(B, K1, **i64), new(B, **i32), new(B, **i32), new(B, K1, **f32), new(B, K1, **f32),
            new(B, **i64), new((), **i64))


def verify_step(
    target_logits: torch.Tensor,
    hidden: torch.Tensor | None,
    draft_tokens: torch.Tensor,
    draft_lens: torch.Tensor,
    requests: RequestBatch,
    state: DecodeState,
    head: MarginalValueHead | HeadWeights | None = None,
    draft_probs: torch.Tensor | None = None,
    method: str = "exact",
    backend: str = "auto",
) -> VerifyOutput:
    """Verify drafted tokens against the target in one fused launch: value head, acceptance,
    termination inside the accepted run, compaction.

    Position j of a row is judged exactly as ``decode_step`` judges step n+j; the semantics are
    those of :mod:`haltkit.reference.verify_step` (its docstring is the specification). No host
    synchronisation happens inside; ``state`` is updated in place. Malformed drafts (lengths
    outside [0, K], tokens outside [0, V), q(x) <= 0) end their own row with reason ERROR.

    Args:
        target_logits: [B, K+1, V] float32 | bfloat16 | float16, the target's logits at the K
            drafted positions and the bonus position (rows with unit stride).
        hidden: [B, K+1, d] float32 | bfloat16 | float16 final hidden states, or None without a head.
        draft_tokens: [B, K] int64; only the first draft_lens[b] entries of row b are read.
        draft_lens: [B] int32, K_b in [0, K].
        requests: from :func:`haltkit.pack_requests`, [B] tensors on the logits' device.
        state: a :class:`DecodeState` ([B] int32 tensors), updated in place.
        head: a :class:`MarginalValueHead` (or its :class:`HeadWeights`), or None.
        draft_probs: with method "rejection": [B, K, V] the distributions the draft sampled from
            (see :func:`sampling_probs`), or [B, K] all ones for point-mass drafts (greedy,
            n-gram, prompt lookup). None with method "exact".
        method: "exact" (the draft is accepted iff it is the token decode_step would emit: lossless
            for any draft) or "rejection" (speculative sampling for rows with temperature > 0).
        backend: "auto", "torch", "triton", "cuda" or "cpu" (see :func:`haltkit.backends`).

    Returns:
        A :class:`VerifyOutput` (tokens [B, K+1], num_emitted, num_accepted, values, logprobs,
        active_idx, num_active).

    Raises:
        ValueError / TypeError: a shape, dtype, device or argument is off (the message names it).
        RuntimeError: the backend is not available here (the message says why).

    Example:
        >>> out = haltkit.verify_step(logits, hidden, drafts, lens, requests, state, head)
        >>> out.tokens[b, : out.num_emitted[b]]      # what sequence b appends this step
    """
    w = _as_weights(head)
    _validate_verify_inputs(target_logits, hidden, draft_tokens, draft_lens, requests, state, w, draft_probs, method)
    name = resolve_backend(backend, target_logits.device, op="verify_step")
    if target_logits.stride(2) != 1:
        target_logits = target_logits.contiguous()
    if hidden is not None and hidden.stride(2) != 1:
        hidden = hidden.contiguous()
    if not torch.compiler.is_compiling():
        # As haltkit.decode_step: eager calls skip the torch.library dispatch (see there).
        with torch.no_grad():
            return backend_module(name).verify_step(
                target_logits, hidden, draft_tokens, draft_lens, requests, state, w, draft_probs, method
            )
    out = _verify_step_op(
        target_logits, hidden, draft_tokens, draft_lens, draft_probs,
        *requests.tensors(), *state.tensors(),
        *(w if w is not None else (None, None, None, None)), method, name,
    )
    return VerifyOutput(*out)


def verify_step_flat(
    target_logits: torch.Tensor,
    hidden: torch.Tensor | None,
    draft_tokens: torch.Tensor,
    cu_num_draft_tokens: torch.Tensor,
    max_draft_len: int,
    requests: RequestBatch,
    state: DecodeState,
    head: MarginalValueHead | HeadWeights | None = None,
    draft_probs: torch.Tensor | None = None,
    method: str = "exact",
    backend: str = "auto",
) -> VerifyOutput:
    """:func:`verify_step` on vLLM's flattened layout, converted to the padded one at the boundary.

    Sequence b owns K_b = cu[b] - cu[b-1] drafted tokens (cu[-1] = 0) and K_b + 1 target rows:
    rows cu[b-1] + b .. cu[b] + b of ``target_logits``. A K_b outside [0, max_draft_len] makes
    sequence b an ERROR row, like any malformed draft.

    Args:
        target_logits: [N + B, V] float32 | bfloat16 | float16, N = total drafted tokens.
        hidden: [N + B, d], or None without a head.
        draft_tokens: [N] int64, the drafts of all sequences concatenated.
        cu_num_draft_tokens: [B] int32, inclusive cumulative sum of K_b.
        max_draft_len: K, the width of the padded outputs (a Python int, so no host sync).
        requests, state, head, method, backend: as :func:`verify_step`.
        draft_probs: with method "rejection": [N, V] or [N] (ones for point-mass drafts).

    Returns:
        A :class:`VerifyOutput` in the padded layout (tokens [B, max_draft_len + 1]).

    Raises:
        ValueError / TypeError: a shape, dtype, device or argument is off.
    """
    if not isinstance(max_draft_len, int) or isinstance(max_draft_len, bool) or max_draft_len < 0:
        raise ValueError(f"max_draft_len must be an int >= 0, got {max_draft_len!r}")
    if not isinstance(target_logits, torch.Tensor) or target_logits.dim() != 2:
        raise ValueError(f"target_logits must be a [N + B, V] tensor, got {getattr(target_logits, 'shape', type(target_logits))}")
    dev = target_logits.device
    if not isinstance(cu_num_draft_tokens, torch.Tensor) or cu_num_draft_tokens.dim() != 1:
        raise ValueError(f"cu_num_draft_tokens must be a [B] tensor, got {getattr(cu_num_draft_tokens, 'shape', type(cu_num_draft_tokens))}")
    B = cu_num_draft_tokens.shape[0]
    _check_tensor("cu_num_draft_tokens", cu_num_draft_tokens, (B,), (torch.int32,), dev)
    if not isinstance(draft_tokens, torch.Tensor) or draft_tokens.dim() != 1:
        raise ValueError(f"draft_tokens must be a [N] tensor, got {getattr(draft_tokens, 'shape', type(draft_tokens))}")
    N = draft_tokens.shape[0]
    T, V = target_logits.shape
    if T != N + B:
        raise ValueError(f"target_logits must have N + B = {N} + {B} = {N + B} rows (K_b + 1 per sequence), got {T}")
    if hidden is not None and (not isinstance(hidden, torch.Tensor) or hidden.dim() != 2 or hidden.shape[0] != T):
        raise ValueError(f"hidden must have shape [{T}, d] like target_logits, got {getattr(hidden, 'shape', type(hidden))}")
    if draft_probs is not None and (not isinstance(draft_probs, torch.Tensor) or draft_probs.dim() not in (1, 2)
                                    or draft_probs.shape[0] != N):
        raise ValueError(f"draft_probs must be [{N}, {V}] or [{N}], got {getattr(draft_probs, 'shape', type(draft_probs))}")

    K = max_draft_len
    cu = cu_num_draft_tokens.to(torch.int64)
    start = torch.cat([cu.new_zeros(1), cu[:-1]])  # first draft of each sequence
    lens = cu - start
    # Indices are clamped so that a malformed cu never reads out of bounds; its row becomes an
    # ERROR row through draft_lens instead.
    j = torch.arange(K + 1, device=dev)[None, :]
    rows = (start[:, None] + torch.arange(B, device=dev)[:, None] + torch.minimum(j, lens[:, None].clamp(min=0)))
    rows = rows.clamp(0, T - 1)
    drafts_at = (start[:, None] + j[:, :K]).clamp(0, max(N - 1, 0))
    if N > 0:
        drafts = draft_tokens[drafts_at]
        probs = None if draft_probs is None else draft_probs[drafts_at]
    else:  # nothing drafted anywhere: every K_b is 0 and these are never read
        drafts = draft_tokens.new_zeros(B, K)
        probs = None if draft_probs is None else draft_probs.new_ones((B, K) + tuple(draft_probs.shape[1:]))
    return verify_step(target_logits[rows], None if hidden is None else hidden[rows], drafts,
                       lens.to(torch.int32), requests, state, head, probs, method, backend)
