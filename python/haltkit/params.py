"""Per-request parameter types and their packing into a struct of ``[B]`` tensors.

A request is described by two frozen, validated dataclasses:

* :class:`SamplingParams`: how a token is drawn (greedy, temperature, top-k, top-p, min-p, seed);
* :class:`ExitPolicy`: when the sequence stops thinking or stops altogether (price of time,
  patience, length limits, EOS ids, thinking budget, exit tokens).

Kernels never see these objects: :func:`pack_requests` turns a batch of them into one
:class:`RequestBatch` of device tensors, once, before the decode loop starts.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, fields
from typing import Sequence

import torch

__all__ = ["SamplingParams", "ExitPolicy", "RequestBatch", "pack_requests", "SEED_MAX", "DEFAULT_PATIENCE"]

#: The one default patience: what every entry point (``ExitPolicy``, ``haltkit generate``, the vLLM
#: request parameter, ``toy.exit_policy``, ``haltkit.hf.ValueExit``, ``eval-exits``) uses when no
#: trained head supplies its calibrated patience and the caller names none. Chosen on the shipped
#: toy head (bench/results/exit_frontier.md, 182 test questions): at patience 1 a single low value
#: ends the think phase, and the head exits after 0-5 think tokens answering 0-15% of sums right;
#: at 2 accuracy stays at or above no exit's only for prices up to 0.005; at 4 for every price from
#: 0.0005 to 0.015 (a 30x range), with 25-66% fewer think tokens.
DEFAULT_PATIENCE = 4
#: Seeds are stored in an int64 tensor, so they live in [0, 2**63).
SEED_MAX = 2**63 - 1
# Counts and token ids are int32 on the device.
_I32 = 2**31 - 1
# Smallest normal and largest finite float32 (kernels may flush subnormals to zero).
_F32_MIN_POSITIVE = 2.0**-126
_F32_MAX = 3.4028234663852886e38


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_int(field: str, value: object, lo: int, hi: int | None = None) -> None:
    if not _is_int(value):
        raise ValueError(f"{field} must be an int, got {value!r} ({type(value).__name__})")
    if value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{field} must be {bound}, got {value!r}")


def _check_float(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field} must be a float, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{field} must be finite, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SamplingParams:
    """How one request draws its tokens.

    Filters are applied to the temperature-scaled distribution ``softmax(logits / temperature)``
    and combined as an intersection of three thresholds (ties at a threshold are kept):

    * ``top_k``: keep tokens whose logit is at least the k-th largest logit (0 = off;
      ``top_k >= V`` keeps everything).
    * ``top_p``: over the top-k survivors, keep the smallest set of most likely tokens whose
      renormalised mass reaches ``top_p`` (1.0 = off).
    * ``min_p``: keep tokens whose probability is at least ``min_p`` times the most likely
      token's (0.0 = off).

    Tokens are then drawn from the kept set renormalised, by the Gumbel-max rule with noise from
    a Philox generator keyed by ``seed`` and the request's own step: a request's tokens depend on
    its seed, its logits and its step only, never on the batch around it or on the backend.

    Seeds: a seeded request is reproducible (same seed, same logits: same tokens, in any batch).
    An unseeded one (``seed=None``, the default) gets a fresh seed per row each time it is packed
    (:func:`pack_requests`, hence every ``generate`` call), as vLLM does: four rows sharing one
    unseeded ``SamplingParams`` draw four independent samples, and a repeated call draws anew.
    Fresh seeds come from the operating system's entropy (``secrets``), so drawing them never
    moves torch's or Python's random state (a vLLM engine's own unseeded draws stay as they
    were); pass seeds for a reproducible run. Greedy rows use no seed.

    Args:
        temperature: 0 for greedy (lowest index among equal maxima), else > 0 within float32's
            normal range [1.2e-38, 3.4e38]. Default 1.0.
        top_k: >= 0. Default 0 (off).
        top_p: in (0, 1]. Default 1.0 (off).
        min_p: in [0, 1]. Default 0.0 (off).
        seed: in [0, 2**63), or None for a fresh seed per row at packing. Default None.

    Raises:
        ValueError: naming the field and the offending value.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        t = _check_float("temperature", self.temperature)
        if t < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        # Stored as float32: a tiny positive temperature would round to 0 and silently turn
        # greedy, a huge one to inf (and -inf / inf logits to NaN).
        if t > 0 and not _F32_MIN_POSITIVE <= t <= _F32_MAX:
            raise ValueError(
                f"temperature must be 0 (greedy) or within float32 range "
                f"[{_F32_MIN_POSITIVE:.3g}, {_F32_MAX:.3g}], got {self.temperature!r}"
            )
        _check_int("top_k", self.top_k, 0, _I32)
        p = _check_float("top_p", self.top_p)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        m = _check_float("min_p", self.min_p)
        if not 0.0 <= m <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None:
            _check_int("seed", self.seed, 0, SEED_MAX)

    @property
    def greedy(self) -> bool:
        """True when the request takes the argmax (temperature 0)."""
        return self.temperature == 0.0


@dataclass(frozen=True)
class ExitPolicy:
    """When one request leaves its thinking phase, and when it finishes.

    A step of a request in its thinking phase first consults the marginal-value head: once
    ``min_new_tokens`` tokens exist, every step whose predicted value is below
    ``cost_of_time`` counts, any other step resets the count; when the count reaches
    ``patience`` the thinking phase ends with a *value exit*. It also ends when
    ``thinking_budget`` tokens have been generated (a *budget exit*). An ended thinking phase
    finishes the request (reason ``value`` / ``budget``, no token emitted that step) if it has
    no ``exit_tokens``; otherwise the request switches to its answer phase and the exit tokens
    are forced, one per step, starting that very step. ``exit_tokens[0]`` closes the thinking
    phase (e.g. the id of ``</think>``): if the model samples it by itself, the answer phase
    starts and nothing is forced. The head is not consulted in the answer phase.

    Every emitted token (sampled or forced) then ends the request on an EOS id (reason ``eos``,
    the token is kept) or when ``max_new_tokens`` tokens exist (reason ``length``). EOS is never
    suppressed: ``min_new_tokens`` only delays value exits.

    Args:
        cost_of_time: the price of one more step, lambda, in units of final return per step;
            ``None`` turns value exits off. Default None.
        patience: consecutive below-lambda steps needed, >= 1. Default :data:`DEFAULT_PATIENCE`
            (a trained head's calibrated patience comes from ``head.exit_policy()``).
        min_new_tokens: tokens before value exits may fire, >= 0. Default 0.
        max_new_tokens: hard length limit, >= 1. Default 256.
        eos_token_ids: ids that finish the request. Default () (none).
        thinking_budget: most tokens in the thinking phase, >= 1, or None. Default None.
        exit_tokens: tokens forced when the thinking phase is ended. Default () (finish instead).

    Raises:
        ValueError: naming the field and the offending value.
    """

    cost_of_time: float | None = None
    patience: int = DEFAULT_PATIENCE
    min_new_tokens: int = 0
    max_new_tokens: int = 256
    eos_token_ids: tuple[int, ...] = ()
    thinking_budget: int | None = None
    exit_tokens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.cost_of_time is not None:
            lam = _check_float("cost_of_time", self.cost_of_time)
            if abs(lam) > 3e38:  # would round to +-inf in the float32 request tensor
                raise ValueError(f"cost_of_time must be within float32 range, got {lam!r}")
        _check_int("patience", self.patience, 1, _I32)
        _check_int("min_new_tokens", self.min_new_tokens, 0, _I32)
        _check_int("max_new_tokens", self.max_new_tokens, 1, _I32)
        if self.thinking_budget is not None:
            _check_int("thinking_budget", self.thinking_budget, 1, _I32)
        for name in ("eos_token_ids", "exit_tokens"):
            ids = getattr(self, name)
            if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
                raise ValueError(f"{name} must be a sequence of token ids, got {ids!r}")
            for i, tok in enumerate(ids):
                _check_int(f"{name}[{i}]", tok, 0, _I32)
            # Stored as a tuple so the policy stays hashable and immutable.
            object.__setattr__(self, name, tuple(ids))


@dataclass
class RequestBatch:
    """A batch of requests as one struct of tensors, built once by :func:`pack_requests`.

    Fields (all on one device, first dimension B):
        temperature: [B] float32, 0 = greedy.
        top_k: [B] int32, 0 = off.
        top_p: [B] float32, 1 = off.
        min_p: [B] float32, 0 = off.
        seed: [B] int64, Philox key (low and high 32-bit words).
        cost_of_time: [B] float32, -inf where value exits are off.
        patience: [B] int32.
        min_new_tokens: [B] int32.
        max_new_tokens: [B] int32.
        thinking_budget: [B] int32, 0 = no budget.
        eos_ids: [B, E] int32, padded with -1 (E >= 1).
        exit_tokens: [B, X] int32, padded with -1 (X >= 1).
        exit_len: [B] int32, number of real entries in ``exit_tokens``.
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    seed: torch.Tensor
    cost_of_time: torch.Tensor
    patience: torch.Tensor
    min_new_tokens: torch.Tensor
    max_new_tokens: torch.Tensor
    thinking_budget: torch.Tensor
    eos_ids: torch.Tensor
    exit_tokens: torch.Tensor
    exit_len: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.temperature.shape[0]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """All fields in declaration order (the order the custom ops take them in)."""
        return tuple(getattr(self, f.name) for f in fields(self))

    def token_end(self) -> int:
        """One past the largest token id the batch names (EOS ids, exit tokens): the logits of a
        step need at least this many columns, or a forced exit token would index past a row.

        :func:`pack_requests` knows it; for a batch built by hand it is read from the tensors on
        first use (one host sync on a GPU) and kept. :meth:`index_select` and :meth:`to` pass it
        on, so a step never syncs for it. (Edit ``eos_ids`` / ``exit_tokens`` in place and the
        kept value is stale: build a new batch instead.)
        """
        end = self.__dict__.get("_token_end")
        if end is None:
            end = int(torch.maximum(self.eos_ids.max(), self.exit_tokens.max())) + 1
            self.__dict__["_token_end"] = end
        return end

    def _derived(self, tensors) -> "RequestBatch":
        out = RequestBatch(*tensors)
        if "_token_end" in self.__dict__:  # a subset names no larger token
            out.__dict__["_token_end"] = self.__dict__["_token_end"]
        return out

    def index_select(self, idx: torch.Tensor) -> "RequestBatch":
        """The requests at rows ``idx`` ([n] int64), in that order: how a batch is compacted."""
        return self._derived(t.index_select(0, idx) for t in self.tensors())

    def to(self, device: torch.device | str) -> "RequestBatch":
        return self._derived(t.to(device) for t in self.tensors())


def _broadcast(name: str, value, batch_size: int | None) -> list:
    if isinstance(value, (SamplingParams, ExitPolicy)):
        if batch_size is None:
            raise ValueError(f"{name}: a single value needs batch_size to broadcast")
        return [value] * batch_size
    items = list(value)
    if batch_size is not None and len(items) != batch_size:
        raise ValueError(f"{name}: expected {batch_size} entries, got {len(items)}")
    return items


def _seeds(samp: list[SamplingParams]) -> list[int]:
    """Each row's seed: its own, or (unseeded, sampled rows) a fresh one from the OS's entropy;
    greedy rows without a seed get 0, which they never read."""
    return [s.seed if s.seed is not None else (0 if s.greedy else secrets.randbits(63)) for s in samp]


def pack_requests(
    sampling: SamplingParams | Sequence[SamplingParams],
    exits: ExitPolicy | Sequence[ExitPolicy],
    vocab_size: int,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
) -> RequestBatch:
    """Pack per-request parameters into one :class:`RequestBatch` of ``[B]`` tensors.

    Unseeded sampled requests (``seed=None``) get a fresh seed per row here (see
    :class:`SamplingParams`).

    Args:
        sampling: one :class:`SamplingParams` for every request, or one per request.
        exits: one :class:`ExitPolicy` for every request, or one per request.
        vocab_size: V; EOS ids and exit tokens must lie in [0, V).
        batch_size: B; needed only when both arguments are single values.
        device: where the tensors live (the device of the logits).

    Returns:
        The packed batch.

    Raises:
        ValueError: on mismatched lengths, or naming the request, field and value of a token id
            outside the vocabulary.
        TypeError: when an argument, or one of its entries, is not a SamplingParams /
            ExitPolicy.
    """
    _check_int("vocab_size", vocab_size, 1)
    if batch_size is not None:
        _check_int("batch_size", batch_size, 1)
    for name, value, kind in (("sampling", sampling, SamplingParams), ("exits", exits, ExitPolicy)):
        if not isinstance(value, kind) and (isinstance(value, (str, bytes)) or not isinstance(value, Sequence)):
            raise TypeError(f"{name} must be one {kind.__name__} or a sequence of them, got {type(value).__name__}")
    if batch_size is None:
        if not isinstance(sampling, SamplingParams):
            batch_size = len(sampling)
        elif not isinstance(exits, ExitPolicy):
            batch_size = len(exits)
    samp = _broadcast("sampling", sampling, batch_size)
    pol = _broadcast("exits", exits, batch_size)
    if len(samp) != len(pol):
        raise ValueError(f"sampling has {len(samp)} entries but exits has {len(pol)}")
    if len(samp) == 0:
        raise ValueError("a batch needs at least one request")
    for i, (s, e) in enumerate(zip(samp, pol)):
        if not isinstance(s, SamplingParams):
            raise TypeError(f"request {i}: sampling must be SamplingParams, got {type(s).__name__}")
        if not isinstance(e, ExitPolicy):
            raise TypeError(f"request {i}: exits must be ExitPolicy, got {type(e).__name__}")
        for name in ("eos_token_ids", "exit_tokens"):
            for j, tok in enumerate(getattr(e, name)):
                if tok >= vocab_size:
                    raise ValueError(
                        f"request {i}: {name}[{j}] = {tok} is outside the vocabulary [0, {vocab_size})"
                    )

    def col(values, dtype):
        return torch.tensor(values, dtype=dtype, device=device)

    def padded(rows: list[tuple[int, ...]]) -> torch.Tensor:
        width = max(1, max(len(r) for r in rows))
        return col([list(r) + [-1] * (width - len(r)) for r in rows], torch.int32)

    batch = RequestBatch(
        temperature=col([s.temperature for s in samp], torch.float32),
        top_k=col([s.top_k for s in samp], torch.int32),
        top_p=col([s.top_p for s in samp], torch.float32),
        min_p=col([s.min_p for s in samp], torch.float32),
        seed=col(_seeds(samp), torch.int64),
        cost_of_time=col(
            [-math.inf if e.cost_of_time is None else e.cost_of_time for e in pol], torch.float32
        ),
        patience=col([e.patience for e in pol], torch.int32),
        min_new_tokens=col([e.min_new_tokens for e in pol], torch.int32),
        max_new_tokens=col([e.max_new_tokens for e in pol], torch.int32),
        thinking_budget=col([e.thinking_budget or 0 for e in pol], torch.int32),
        eos_ids=padded([e.eos_token_ids for e in pol]),
        exit_tokens=padded([e.exit_tokens for e in pol]),
        exit_len=col([len(e.exit_tokens) for e in pol], torch.int32),
    )
    batch.__dict__["_token_end"] = 1 + max((t for e in pol for t in (*e.eos_token_ids, *e.exit_tokens)), default=-1)
    return batch
