"""Draft sources for speculative decoding: one small interface, three sources.

* :class:`DraftModel`: a smaller causal LM with the target's vocabulary, run on its own ragged
  KV cache;
* :class:`EarlyLayerDraft`: self-speculation, the target's first L layers plus its final norm
  and LM head, sharing the target's KV cache (the verification pass rewrites those layers'
  entries at every position it scores, so the draft never has to catch up);
* :class:`PromptLookup`: n-gram / prompt-lookup drafting, copying what followed the latest
  earlier occurrence of the sequence's last n tokens (no model at all).

A model draft samples with ``decode_step``'s own rule on its logits (the request's seed, the
sequence's step counter, its filters, forced exit tokens and length limit; value exits off), so
under seeded sampling it proposes the very token the target will draw whenever the two models
agree, and acceptance stays high. Every source returns its own length per sequence.

The interface (what :func:`haltkit.generate` calls):

* ``max_len`` (K) and ``adaptive``: the longest draft, and whether the engine shortens a
  sequence's drafts while its recent drafts are rejected (True), or sets them from a cost model
  measured in the call, down to no draft at all (``"cost"``: :class:`DraftLengthPolicy`, whose
  per-call instance the source holds as ``policy``);
* ``check(model, vocab_size)``: raise before any work when the source cannot serve ``model``;
* ``start(target, batch, capacity, compile)``: per-call set-up;
* ``propose(ctx, k) -> (tokens [P, k] int64, lens [P] int32, probs [P, k, V] | [P, k] | None)``;
* ``select_rows(idx)``: follow the engine's compaction;
* ``for_call()`` (optional): a copy that holds one call's state, so that concurrent calls sharing
  one source object never share a cache.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from .ops import decode_step
from .params import RequestBatch
from .runner import ModelRunner, model_dims
from .speculative import sampling_probs
from .state import DecodeState

__all__ = ["DraftContext", "DraftLengthPolicy", "DraftModel", "EarlyLayerDraft", "PromptLookup", "as_draft_source"]


@dataclass
class DraftContext:
    """What a draft source sees of the running batch (P rows; all on the target's device).

    Fields:
        seq: [P, W] int64, row b's tokens by position (prompt then generated); valid on
            ``[0, length[b]]``, the last of which is the pending token (emitted, not yet in the
            target's cache).
        length: [P] int64, tokens in the target's cache (the pending token's position).
        requests: the packed requests of the P rows.
        state: the decode state of the P rows (read only; drafts work on a copy).
        view: a host-side bound on ``length.max() + 1`` (how many cache slots eager attention reads).
        want_probs: return the draft distributions (speculative sampling, method "rejection").
        backend: the epilogue backend.
        target: the target's runner (its KV cache is shared by an early-layer draft).
    """

    seq: torch.Tensor
    length: torch.Tensor
    requests: RequestBatch
    state: DecodeState
    view: int
    want_probs: bool
    backend: str
    target: ModelRunner


def _check_len(max_len: object) -> int:
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
        raise ValueError(f"draft max_len must be an int >= 1, got {max_len!r}")
    return max_len


class DraftLengthPolicy:
    """Draft lengths that pay for themselves: acceptance per sequence against step costs measured
    in the call (a source built with ``adaptive="cost"`` owns one per ``generate`` call).

    The cost model. ``T(w)`` is the wall time of one step of width ``w`` (``w`` drafted tokens per
    row; ``w = 0`` is a plain decode step with no draft work), measured host sync to host sync (the
    median of the width's last 5 steps; CPU time of the process on a CPU, wall time on a GPU), so
    it holds the draft's own cost, the wider verification forward and the bookkeeping; compile
    time is left out. ``T(w) - T(0)`` is what drafting costs: the draft's forwards plus the extra
    verified positions. An unmeasured width between measured ones is interpolated linearly; past
    the widest measured one ``wm`` it is extrapolated with the measured cost per drafted token
    ``(T(wm) - T(0)) / wm`` (draft plus verification, per token), before any drafting step is
    measured with a prior of 0.25 of a plain step per token for a model draft. Prompt lookup drafts
    for free, and what its steps pay is the wider verification forward, whose cost is concave in
    the width (on a CPU at batch 1 a second position turns matrix-vector products into matrix
    products: T(1) = 1.6 T(0), T(4) = 1.9 T(0) on SmolLM2-135M); its prior is 0.15 of a plain
    step per token plus, for a lone row, 0.5 of one; a wider unmeasured width costs a measured one
    plus 0.15 per token (or the measured average, if smaller), a narrower one at most the measured
    one (see :meth:`_shadow_cost`). So a row starts drafting on its shadow checks alone only when
    they pass most of the time (copying), not on a chat answer's first words taken from its
    prompt. Each sequence keeps an estimate
    ``a_b`` of the chance that a drafted token is accepted (accepted and rejected counts decayed by
    0.9 per observation, prior 0.3 of weight 2, so that a row that never passes settles at 0.05):
    a draft of ``w`` tokens then yields
    ``E_b(w) = 1 + a_b + ... + a_b^w`` tokens a step. Every row pays the step, so the batch drafts
    at ``w* = argmax_w sum_b G_b(w) / T(w)``, a width above 0 only when it beats the plain step by
    10% (the clock of a busy machine is that noisy). A sequence drafts ``w*`` tokens when its own
    best width is positive (then ``G_b(w) = E_b(w)``), else none (``G_b(w) = 1``: it pays the wider
    step for one token); when no sequence drafts, the step is a plain decode step.

    Backing off costs nothing. Sources whose drafts cost a forward (``shadow=False``) learn only
    by drafting: once a step is plain and nothing new was observed, the next length is decided on
    the host alone (no device work, no sync) and stays 0 until a probe is due: a width-1 step
    (K when compiled) of every running row after ``gap * g`` plain steps, ``g`` sized so that
    probes cost at most 2% of the plain steps' time (from the probe's measured cost; 0.25 of a
    plain step before one is measured), ``gap`` doubling (up to 64) after every probe that does
    not turn drafting on and reset to 1 when drafting pays. Sources that draft cheaply
    (``shadow=True``, prompt lookup) are checked at every plain step instead: the would-be first
    draft token against the emitted one, so a row starts drafting as soon as it starts copying;
    on a CPU the next length is decided on the host alone after a step where no check passed.

    Args:
        max_len: K, the longest draft.
        batch: P rows.
        device: where the per-row state lives.
        compile: compiled steps have fixed shapes, so the widths are 0 and K only.
        shadow: the source's drafts are cheap enough to propose at every plain step.
    """

    PRIOR, PRIOR_WEIGHT, DECAY = 0.3, 2.0, 0.9
    MARGIN, EXPLORE_MARGIN, WARMUP = 1.1, 1.1, 3
    PROBE_BUDGET, PROBE_PRIOR, MAX_GAP, MIN_GAP = 0.02, 0.25, 64, 4
    SHADOW_FIXED_PRIOR, SHADOW_TOKEN_PRIOR = 0.5, 0.15

    def __init__(self, max_len: int, batch: int, device: torch.device, compile: bool, shadow: bool) -> None:
        self.K, self.shadow = max_len, shadow
        # A drafted token's cost in plain steps, before any is measured: a model draft's forward
        # (the probe's prior), or only its verification for a source that drafts for free.
        self.token_prior = self.SHADOW_TOKEN_PRIOR if shadow else self.PROBE_PRIOR
        self.widths = [0, max_len] if compile else list(range(max_len + 1))
        self.T: dict[int, float] = {}  # measured seconds per step, by width
        self._samples: dict[int, list[float]] = {}
        self._last: tuple[int, float, float] | None = None
        self._compile = compile
        # On a CPU the process's CPU time is what a step costs it: other work on a shared machine
        # stretches the wall clock of any step at random. A GPU's steps (and compiles) run on the
        # wall clock.
        cpu = torch.device(device).type == "cpu" and not compile
        self._clock = time.process_time if cpu else time.perf_counter
        z = dict(dtype=torch.float32, device=device)
        self.accepted = torch.zeros(batch, **z)  # decayed counts of accepted / rejected draft tokens
        self.rejected = torch.zeros(batch, **z)
        self.seen = torch.zeros(batch, **z)  # observations so far (shadow warm-up)
        self._ws = torch.tensor(self.widths, dtype=torch.int64, device=device)
        self._pow = torch.arange(max_len + 1, dtype=torch.float32, device=device)
        self._zeros = torch.zeros(batch, dtype=torch.int64, device=device)
        # Host-side back-off state (read and written without touching the device).
        self.width: int | None = None  # width of the step under way (set by tick)
        self.plain = 0  # plain steps since the last probe or drafting step
        self.gap = 1  # probe gap, in units of the base gap
        self.probes = 0  # probes issued so far
        self.full = 0  # decisions taken on the device (the rest were host-only)
        self._fresh = False  # observations since the last decision on the device
        self._probe = 0  # 1: a probe was issued, 2: it runs (its outcome shows at the next tick)
        # A CPU tensor is read on the host for free (no device to wait for): a shadow source then
        # learns at every step whether any of its checks passed, and skips the decision when none did.
        self._host_reads = torch.device(device).type == "cpu"
        self._passed = True  # some check passed at the last observation (unknown off a CPU: True)

    def select_rows(self, idx: torch.Tensor) -> None:
        """Follow the engine's compaction: keep rows ``idx`` ([n] int64), in that order."""
        for name in ("accepted", "rejected", "seen", "_zeros"):
            setattr(self, name, getattr(self, name).index_select(0, idx))

    def tick(self, width: int) -> None:
        """Called right after the step's host sync, with the width of the step about to run:
        the time since the previous call is that of the previous step."""
        now = self._clock()
        comp = _compile_seconds() if self._compile else 0.0
        if self._last is not None:
            w, t0, c0 = self._last
            # The median of the width's last 5 steps: one slow step (a first call's set-up, a busy
            # core) must not make a width look cheap or dear for long.
            recent = self._samples.setdefault(w, [])
            recent.append(now - t0 - (comp - c0))
            del recent[:-5]
            self.T[w] = statistics.median(recent)
        self._last = (width, now, comp)
        self.width = width
        if self._probe == 2:  # the probe's outcome: drafting turned on, or another wait, twice as long
            self.gap = 1 if width > 0 else min(2 * self.gap, self.MAX_GAP)
            self._probe = 0
        elif self._probe == 1:
            self._probe = 2
        if width == 0:
            self.plain += 1
        else:
            self.plain = 0
            if self._probe == 0:  # drafting that pays: a later back-off probes soon again
                self.gap = 1

    def cost(self, w: int) -> tuple[float, bool]:
        """(T(w) in seconds, or relative to a unit plain step before any is measured; measured?)."""
        if w in self.T:
            return self.T[w], True
        known = sorted(self.T)
        below = [m for m in known if m < w]
        above = [m for m in known if m > w]
        if self.shadow and 0 in self.T:
            return self._shadow_cost(w, below[-1], above[0] if above else None), False
        if below and above:
            lo, hi = below[-1], above[0]
            return self.T[lo] + (self.T[hi] - self.T[lo]) * (w - lo) / (hi - lo), False
        if below and 0 in self.T:  # the measured cost per drafted token, extrapolated (else its prior)
            wm = below[-1]
            per_token = max(self.T[wm] - self.T[0], 0.0) / wm if wm > 0 else self.T[0] * self.token_prior
            return self.T[0] + per_token * w, False
        if below:
            return self.T[below[-1]], False
        if above:
            return self.T[above[0]], False
        return 1.0, False

    def _shadow_cost(self, w: int, lo: int, hi: int | None) -> float:
        """An unmeasured width's cost for a source that drafts for free (only the wider verification
        forward costs), between the measured widths ``lo`` < w < ``hi`` (None: none wider).

        A wider forward's cost is concave in its width: on a CPU a batch of one row turns every
        weight's matrix-vector product into a matrix product at its first extra position (T(1) =
        1.6 T(0) for SmolLM2-135M, T(4) = 1.9 T(0); at 4 rows T(1) = 1.07 T(0), T(4) = 1.6 T(0)).
        So the prior is 0.15 of a plain step per token plus, for a lone row, 0.5 of one, and a
        measured width bounds its neighbours: a wider one costs at least as much (plus the per-token
        prior, or the measured average per token if that is smaller), a narrower one at most as much."""
        T0 = self.T[0]
        fixed = self.SHADOW_FIXED_PRIOR if self.accepted.shape[0] == 1 else 0.0  # only a lone row leaves them
        prior = T0 * (1.0 + fixed + self.token_prior * w)
        if hi is not None:
            if lo > 0:  # between two measured drafting widths: linear
                return self.T[lo] + (self.T[hi] - self.T[lo]) * (w - lo) / (hi - lo)
            return min(prior, self.T[hi])
        if lo == 0:
            return prior
        per_token = min(self.token_prior * T0, max(self.T[lo] - T0, 0.0) / lo)
        return self.T[lo] + per_token * (w - lo)

    def base_gap(self) -> int:
        """Plain steps between probes (before doubling): a probe's extra cost over the budget."""
        w1 = self.widths[1]
        extra = self.cost(w1)[0] / self.T[0] - 1.0 if w1 in self.T and 0 in self.T else self.PROBE_PRIOR
        return max(self.MIN_GAP, math.ceil(extra / self.PROBE_BUDGET))

    def observe(self, drafted: torch.Tensor, accepted: torch.Tensor) -> None:
        """A step's outcome per row: ``drafted`` [P] drafted tokens offered (0: no observation),
        ``accepted`` [P] of them accepted (a run from the first; 0 where nothing was drafted)."""
        on = drafted > 0
        a = accepted.to(torch.float32)
        f = torch.where(on, self.DECAY, 1.0)
        self.accepted = self.accepted * f + a
        self.rejected = self.rejected * f + (a < drafted).to(torch.float32)
        self.seen += on
        self._fresh = True
        if self.shadow and self._host_reads:
            self._passed = bool(accepted.any())

    def lengths(self, finished: torch.Tensor) -> torch.Tensor:
        """[P] int64 draft lengths for the next step (0: do not draft), on the device; the batch's
        width is their maximum. ``finished``: [P] bool, the rows that stopped decoding.

        Host-only (no device work) while a non-shadow source is backed off and no probe is due,
        and on a CPU while a shadow source is backed off and none of its last checks passed (a row's
        acceptance estimate rises only on a pass, so the last decision, no draft, stands)."""
        if 0 not in self.T:  # the plain step's cost first: every rate is relative to it
            return self._zeros
        if self.shadow and self.width == 0 and not self._passed:
            return self._zeros
        if not self.shadow and not self._fresh and self.width == 0:
            if self.plain < self.gap * self.base_gap():
                return self._zeros
            self._probe, self.probes, self.plain = 1, self.probes + 1, 0
            return torch.where(finished, 0, self.widths[1])
        self._fresh = False
        self.full += 1
        acc = (self.accepted + self.PRIOR * self.PRIOR_WEIGHT) / (self.accepted + self.rejected + self.PRIOR_WEIGHT)
        gain = (acc[:, None] ** self._pow).cumsum(1)  # [P, K + 1]: E_b(w) for w = 0..K
        if self._compile:
            gain = gain.index_select(1, self._ws)
        costs = [self.cost(w) for w in self.widths]
        widest = max(self.T)
        denom = []
        for i, (w, (c, known)) in enumerate(zip(self.widths, costs)):
            m = 1.0 if i == 0 else self.MARGIN if known else self.EXPLORE_MARGIN
            # Drafting is what tells whether drafts pass: a non-shadow source explores one width at a time.
            if not self.shadow and i > 0 and w > widest and self.widths[i - 1] not in self.T:
                m = math.inf
            denom.append(c * m)
        den = torch.tensor(denom, dtype=torch.float32, device=gain.device)
        rate = gain / den  # [P, n]
        ready = ~finished
        if self.shadow:
            ready = ready & (self.seen >= self.WARMUP)
        # The rows that draft at a positive width (those whose own best width is positive) gain
        # E_b(w); every other running row pays the wider step for its one token.
        drafts = ready & (rate.argmax(1) > 0)
        total = torch.where(drafts[:, None], gain, (~finished)[:, None].to(gain.dtype)).sum(0) / den
        return torch.where(drafts, self._ws[total.argmax()], 0)


def _policy(source, batch: int, device: torch.device, compile: bool, shadow: bool) -> DraftLengthPolicy | None:
    """The source's per-call length policy, when it sets its lengths by cost."""
    if source.adaptive != "cost":
        return None
    return DraftLengthPolicy(source.max_len, batch, device, compile, shadow)


def _compile_seconds() -> float:
    from .compiled import compile_seconds_since

    return compile_seconds_since(0.0)


def _check_adaptive(adaptive: object) -> bool | str:
    if isinstance(adaptive, str):
        if adaptive != "cost":
            raise ValueError(f"draft adaptive must be False, True or 'cost', got {adaptive!r}")
        return adaptive
    return bool(adaptive)


class _ModelDrafter:
    """Shared loop of the two model drafts: catch up the draft's cache, then draw k tokens, each
    draft step one forward plus ``decode_step`` (one compiled graph when the engine compiles)."""

    max_len: int
    adaptive: bool | str
    runner: ModelRunner | None = None
    policy: DraftLengthPolicy | None = None
    compile = False
    #: Forward passes of the draft (model or early layers) since ``start``.
    forwards = 0

    def for_call(self) -> "_ModelDrafter":
        """A copy to hold one ``generate`` call's state (runner, cache, counters): the engine
        drafts with it, so one source object serves concurrent calls (the weights are shared)."""
        return copy.copy(self)

    def _draft_requests(self, requests: RequestBatch) -> RequestBatch:
        # The draft has no value head: value exits are off, everything else is the request's.
        return replace(requests, cost_of_time=torch.full_like(requests.cost_of_time, -math.inf))

    def _cached(self, ctx: DraftContext) -> torch.Tensor:
        """[P] int64: positions [0, D) of the draft's cache that hold the sequence's tokens."""
        raise NotImplementedError

    def _advance(self, done: torch.Tensor) -> None:
        """Record that the draft's cache now holds positions [0, done)."""

    def _catch_up_width(self, ctx: DraftContext, D: torch.Tensor) -> int:
        return 1

    def propose(
        self, ctx: DraftContext, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Draft up to ``k`` tokens per row: (tokens [P, k], lens [P] int32, probs [P, k, V])."""
        P, W = ctx.seq.shape
        L = ctx.length
        D = torch.minimum(self._cached(ctx), L)
        runner = self.runner
        req = self._draft_requests(ctx.requests)
        state = ctx.state.clone()
        width = self._catch_up_width(ctx, D)
        if width == 1:  # caught up: the first draft step feeds the pending token alone
            pending = ctx.seq.gather(1, L[:, None])
            token, prob = runner.step(_draft_one, pending, L, ctx.view, req, state, ctx.want_probs, ctx.backend)
        else:
            # Catch-up chunk: positions [D, L] (the last is the pending token), right-padded, fed
            # eagerly (its width varies); its last real row's logits give the first draft.
            pos = D[:, None] + torch.arange(width, device=L.device)[None, :]
            chunk = ctx.seq.gather(1, pos.clamp(max=W - 1))
            logits, _ = ModelRunner.step(runner, _eager_logits, chunk, D, ctx.view)
            last = (L - D)[:, None, None].expand(P, 1, logits.shape[-1])
            token, prob = _draw(logits.gather(1, last)[:, 0], req, state, ctx.want_probs, ctx.backend)
        tokens = torch.zeros(P, k, dtype=torch.int64, device=L.device)
        probs = [prob]
        alive = torch.ones(P, dtype=torch.bool, device=L.device)
        lens = torch.zeros(P, dtype=torch.int32, device=L.device)
        for i in range(k):
            # A row's draft ends where its copy of the decode state finished (EOS, length).
            alive = alive & (token >= 0)
            lens += alive.to(torch.int32)
            tokens[:, i] = torch.where(alive, token, 0)
            if i + 1 < k:
                token, prob = runner.step(_draft_one, tokens[:, i : i + 1], L + 1 + i, ctx.view + i + 1, req, state,
                                          ctx.want_probs, ctx.backend)
                probs.append(prob)
        self.forwards += k
        self._advance(L + k)
        return tokens, lens, (torch.stack(probs, 1) if ctx.want_probs else None)


def _draw(logits: torch.Tensor, requests: RequestBatch, state: DecodeState, want_probs: bool, backend: str):
    """The draft's token by decode_step's own rule ([P] int64, -1 where its state finished), and
    the distribution it was drawn from ([P, V]) when asked."""
    probs = sampling_probs(logits, requests) if want_probs else None
    return decode_step(logits, None, requests, state, None, backend).tokens, probs


def _draft_one(runner: ModelRunner, input_ids, positions, requests, state, want_probs, backend):
    """One draft step: the draft's forward over one token per row, then its draw."""
    logits, _ = runner.forward_at(input_ids, positions)
    return _draw(logits[:, 0], requests, state, want_probs, backend)


def _eager_logits(runner: ModelRunner, input_ids, positions):
    # The class's method, not a compiled one a CUDA runner may have installed on the instance.
    return ModelRunner.forward_at(runner, input_ids, positions)


class DraftModel(_ModelDrafter):
    """A smaller causal LM with the target's vocabulary drafts K tokens per step.

    Args:
        model: the draft model (a Hugging Face causal LM), on the target's device.
        max_len: K, the longest draft. Default 4.
        adaptive: False (always K), True (shorten a sequence's drafts while they are rejected:
            +2 after a fully accepted draft, -1 otherwise, within [1, K]) or "cost" (lengths from
            a cost model measured in the call, 0 when drafting does not pay: see
            :class:`DraftLengthPolicy`). Default False; ``draft=`` given a module or a name
            builds its source with "cost".

    Example:
        >>> haltkit.generate(target, ids, draft=DraftModel(small, max_len=4))
    """

    name = "draft-model"

    def __init__(self, model: nn.Module, max_len: int = 4, adaptive: bool | str = False) -> None:
        self.model, self.max_len, self.adaptive = model, _check_len(max_len), _check_adaptive(adaptive)
        self.D: torch.Tensor | None = None

    def check(self, model: nn.Module, vocab_size: int) -> None:
        """Raise ValueError when the draft's vocabulary is not the target's, TypeError when haltkit
        cannot run the draft's family (:func:`haltkit.runner.check_family`)."""
        from .runner import check_family

        check_family(self.model)
        v, _, _ = model_dims(self.model)
        if v != vocab_size:
            raise ValueError(
                f"the draft model's vocabulary has {v} entries but the target's has {vocab_size}; "
                "a draft must share the target's tokenizer and vocabulary"
            )

    def start(self, target: ModelRunner, batch: int, capacity: int, compile: bool) -> None:
        # The cache fills on the first proposal (its catch-up chunk is the whole prompt).
        self.runner = ModelRunner(self.model, batch, capacity)
        self.compile, self.forwards = compile, 0
        self.D = torch.zeros(batch, dtype=torch.int64, device=target.device)
        self.policy = _policy(self, batch, target.device, compile, shadow=False)

    def _cached(self, ctx: DraftContext) -> torch.Tensor:
        return self.D

    def _advance(self, done: torch.Tensor) -> None:
        self.D = done

    def _catch_up_width(self, ctx: DraftContext, D: torch.Tensor) -> int:
        # One host sync per step: the longest catch-up (the prompt, on the first step).
        return int((ctx.length - D).max()) + 1

    def select_rows(self, idx: torch.Tensor) -> None:
        if self.compile:
            from .compiled import move_to_bucket

            self.runner = move_to_bucket(self.runner, idx)
        else:
            self.runner = self.runner.compact(idx)
        self.D = self.D.index_select(0, idx)
        if self.policy is not None:
            self.policy.select_rows(idx)


class EarlyLayerDraft(_ModelDrafter):
    """Self-speculation: the target's first ``layers`` layers, final norm and LM head draft.

    Shares the target's weights and KV cache; costs no memory and needs no second model.

    Args:
        layers: L, in [1, num_hidden_layers).
        max_len: K. Default 4.
        adaptive: as :class:`DraftModel`. Default False.
    """

    name = "early-layer"

    def __init__(self, layers: int, max_len: int = 4, adaptive: bool | str = False) -> None:
        self.layers, self.max_len, self.adaptive = layers, _check_len(max_len), _check_adaptive(adaptive)

    def check(self, model: nn.Module, vocab_size: int) -> None:
        """Raise ValueError/TypeError when the target cannot be cut at ``layers``."""
        from .runner import truncated_body

        truncated_body(model, self.layers)

    def start(self, target: ModelRunner, batch: int, capacity: int, compile: bool) -> None:
        self.runner = ModelRunner(target.model, batch, capacity, layers=self.layers, cache=target.cache)
        self.compile, self.forwards = compile, 0
        self.policy = _policy(self, batch, target.device, compile, shadow=False)

    def _cached(self, ctx: DraftContext) -> torch.Tensor:
        # The target's verification pass wrote these layers at every position it scored; its
        # cache (compacted, or a compiled bucket's) is the one to write into.
        target = ctx.target
        if self.compile and target.compiled:
            from .compiled import compiled_runner

            self.runner = compiled_runner(target.model, target.batch, target.capacity, layers=self.layers)
        self.runner.cache = target.cache
        return ctx.length

    def select_rows(self, idx: torch.Tensor) -> None:
        # The shared cache is compacted by the target.
        if self.policy is not None:
            self.policy.select_rows(idx)


class PromptLookup:
    """Prompt-lookup / n-gram drafting: copy what followed the latest earlier match of the
    sequence's last n tokens (n from ``max_ngram`` down to ``min_ngram``).

    Args:
        max_len: K. Default 4.
        max_ngram, min_ngram: the n-gram sizes tried, longest first. Defaults 3 and 1.
        adaptive: as :class:`DraftModel`. Default False.
    """

    name = "prompt-lookup"

    policy: DraftLengthPolicy | None = None

    def __init__(self, max_len: int = 4, max_ngram: int = 3, min_ngram: int = 1,
                 adaptive: bool | str = False) -> None:
        self.max_len, self.adaptive = _check_len(max_len), _check_adaptive(adaptive)
        if not (isinstance(min_ngram, int) and isinstance(max_ngram, int) and 1 <= min_ngram <= max_ngram):
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram!r}, max_ngram={max_ngram!r}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def check(self, model: nn.Module, vocab_size: int) -> None:
        """Nothing to check: the draft copies the sequence's own tokens."""

    def for_call(self) -> "PromptLookup":
        """A copy to hold one ``generate`` call's state (its length policy)."""
        return copy.copy(self)

    def start(self, target: ModelRunner, batch: int, capacity: int, compile: bool) -> None:
        # Its drafts cost a few small tensor ops: cheap enough to shadow every plain step.
        self.policy = _policy(self, batch, target.device, compile, shadow=True)

    def select_rows(self, idx: torch.Tensor) -> None:
        if self.policy is not None:
            self.policy.select_rows(idx)

    def propose(
        self, ctx: DraftContext, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(tokens [P, k], lens [P] int32, None): point-mass drafts (probs are ones if asked)."""
        seq, L = ctx.seq, ctx.length
        P, W = seq.shape
        n, dev = self.max_ngram, seq.device
        # win[b, j, i] = seq[b, j - n + 1 + i]: the n tokens ending at j (-1 before position 0).
        win = torch.nn.functional.pad(seq, (n - 1, 0), value=-1).unfold(1, n, 1)  # [P, W, n]
        suffix = win.gather(1, L.view(P, 1, 1).expand(P, 1, n))  # [P, 1, n]: those ending at the pending token
        # run[b, j]: the length of the match counted back from j and L (at most n). A -1 is never
        # reached by a match: j < L hits position -1 while L's suffix still holds a real token. A
        # few ops over the row, whatever n: prompt lookup is checked at every plain step.
        run = (win == suffix).flip(2).cumprod(2).sum(2)  # [P, W]
        j = torch.arange(W, device=dev)
        # The longest match wins, then the latest (ending at j < L, so that a known token follows).
        key = torch.where((run >= self.min_ngram) & (j < L[:, None]), run * W + j, -1).amax(1)
        cont = key % W + 1  # where the copied continuation starts
        lens = torch.where(key >= 0, (L + 1 - cont).clamp(max=k), 0).to(torch.int32)
        tokens = seq.gather(1, (cont[:, None] + torch.arange(k, device=dev)).clamp(max=W - 1))
        probs = torch.ones(P, k, device=dev) if ctx.want_probs else None
        return tokens, lens, probs


def as_draft_source(draft: object, max_len: int = 4) -> object | None:
    """A draft source from ``generate``'s ``draft`` argument.

    Accepts a source, None, an ``nn.Module`` (a :class:`DraftModel`), ``"ngram"`` /
    ``"prompt-lookup"`` (a :class:`PromptLookup`) or ``"layer:L"`` (an :class:`EarlyLayerDraft`);
    a source built here sets its lengths by cost (``adaptive="cost"``), so it never drafts where
    drafting does not pay.
    ``max_len`` (K, default 4) is that of the source built from a module or a name; a source
    passed in keeps its own.

    Raises:
        ValueError / TypeError: anything else, saying what is accepted, or a bad ``max_len``.
    """
    if draft is None or isinstance(draft, (DraftModel, EarlyLayerDraft, PromptLookup)):
        return draft
    if isinstance(draft, nn.Module):
        return DraftModel(draft, max_len=max_len, adaptive="cost")
    if isinstance(draft, str):
        if draft in ("ngram", "prompt-lookup"):
            return PromptLookup(max_len=max_len, adaptive="cost")
        if draft.startswith("layer:"):
            try:
                layers = int(draft.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"draft {draft!r}: expected 'layer:L' with an integer L") from None
            return EarlyLayerDraft(layers, max_len=max_len, adaptive="cost")
        raise ValueError(f"unknown draft {draft!r}; expected 'ngram', 'prompt-lookup' or 'layer:L'")
    raise TypeError(
        f"draft must be None, an nn.Module, 'ngram', 'layer:L' or a draft source, got {type(draft).__name__}"
    )
