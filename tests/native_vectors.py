"""Shared test vectors of the native backends, and how a backend's step is held to the reference.

Used in-process by ``test_native.py`` (backends "cpu" and, on a GPU, "cuda") and in a subprocess
by its sanitizer test, which loads an ASan + UBSan build of ``haltkit._cpu`` in place of the real
one and runs :func:`run_all` over the same vectors.

What must match exactly: tokens, the full decode state, finish / think-end reasons, active
indices and their count. Within ``TOL``: values and log-probs. The documented exceptions are
float ties, where the reference's own float32 rounding could have gone either way (see
:func:`float_tie`): the two tokens' Gumbel scores within 1e-5, or a token within float slack of a
top-p / min-p threshold, or a value within 1e-5 of the price of time. Each excuse holds for its
own row only, and only for what the tie can change (see :func:`compare_step`): a row that parts
from the reference at a tie is left out from then on, every other row is still compared, and
the count of such rows is reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

import haltkit
from haltkit import DecodeState, ExitPolicy, HeadWeights, Reason, SamplingParams, StepOutput, pack_requests
from haltkit.backends import backend_module
from haltkit.reference.decode_step import decode_step as reference_step
from haltkit.reference.decode_step import filter_threshold, row_is_bad, scaled_logits
from haltkit.reference.philox import STREAM_TOKEN, gumbel_from_words, random_words

from conftest import TOL

#: Relative slack of the float ties the reference's rounding leaves open.
TIE_EPS = 1e-5
STATE_FIELDS = ("num_generated", "think_tokens", "below_count", "phase", "forced_pos", "think_end", "finish_reason")


@dataclass
class Case:
    """One multi-step scenario: requests, head and a logits generator, on any backend."""

    name: str
    B: int
    V: int
    sampling: list[SamplingParams]
    exits: list[ExitPolicy]
    steps: int = 3
    logits_dtype: torch.dtype = torch.float32
    head: str = "none"  # "none" | "linear" | "mlp"
    head_dtype: torch.dtype = torch.float32
    d: int = 8
    kind: str = "normal"  # see make_logits
    strided: bool = False  # logits / hidden rows with padding, state tensors as strided views
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.name


def make_logits(kind: str, B: int, V: int, step: int, gen: torch.Generator) -> torch.Tensor:
    """[B, V] float32 logits of a given kind (one special row per non-finite kind, rest normal)."""
    x = torch.randn(B, V, generator=gen) * 3.0
    if kind == "grid":  # coarse values: ties everywhere
        x = torch.randint(-3, 2, (B, V), generator=gen).float() * 0.5
    elif kind == "peaked":  # one token far above the rest, as trained models produce
        x = torch.randn(B, V, generator=gen) * 2.0 - 20.0
        x[torch.arange(B), torch.randint(0, V, (B,), generator=gen)] = 5.0
    elif kind == "nonfinite":
        rows = torch.arange(B)
        x[rows % 7 == 0, (step * 13) % V] = math.nan
        x[rows % 7 == 1, (step * 5) % V] = math.inf
        x[rows % 7 == 2] = -math.inf
        x[rows % 7 == 3] = -math.inf
        x[rows % 7 == 3, (step * 3) % V] = 1.5  # one finite entry: a valid row
        masked = (torch.rand(B, V, generator=gen) < 0.4) & (rows % 7 == 4)[:, None]
        x[masked] = -math.inf
        x[rows % 7 == 4, 0] = 0.0
    elif kind == "flat":
        x[:] = 0.25
    return x


def make_head(kind: str, d: int, dtype: torch.dtype, gen: torch.Generator) -> HeadWeights | None:
    if kind == "none":
        return None
    head = haltkit.MarginalValueHead(d, hidden=5 if kind == "mlp" else 0, dtype=dtype)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return head.weights()


def _layout(t: torch.Tensor, pad: int) -> torch.Tensor:
    """The same values in rows padded by ``pad`` columns (row stride != width)."""
    wide = torch.full((t.shape[0], t.shape[1] + pad), float("nan"), dtype=t.dtype, device=t.device)
    wide[:, : t.shape[1]] = t
    return wide[:, : t.shape[1]]


def _strided_state(state: DecodeState) -> DecodeState:
    """The same state held in every other element of larger buffers (non-contiguous views)."""
    views = []
    for t in state.tensors():
        buf = torch.full((2 * t.shape[0],), -7, dtype=t.dtype, device=t.device)
        buf[::2] = t
        views.append(buf[::2])
    return DecodeState(*views)


def _edge_band(x: torch.Tensor, r: haltkit.RequestBatch) -> tuple[torch.Tensor, float, float]:
    """z of one row and the band [lo, hi) of z where its top-p / min-p threshold could fall under a
    relative perturbation of TIE_EPS of top_p and min_p (float32 rounding of the mass sums)."""
    z = scaled_logits(x, r.temperature)

    def tau(p_scale: float, m_scale: float) -> float:
        top_p = torch.clamp(r.top_p * p_scale, max=1.0) if float(r.top_p[0]) < 1 else r.top_p
        return float(filter_threshold(z, r.top_k, top_p, r.min_p * m_scale)[0])

    return z, tau(1 + TIE_EPS, 1 - TIE_EPS), tau(1 - TIE_EPS, 1 + TIE_EPS)


def _row(logits: torch.Tensor, requests: haltkit.RequestBatch, row: int):
    x = logits.float()[row : row + 1].cpu()
    r = haltkit.RequestBatch(*(t[row : row + 1].cpu() for t in requests.tensors()))
    sampled = not bool(row_is_bad(x)[0]) and float(r.temperature[0]) != 0
    return x, r, sampled


def float_tie(logits: torch.Tensor, requests: haltkit.RequestBatch, before: DecodeState, row: int,
              tokens: tuple[int, int]) -> bool:
    """Whether the reference's float32 rounding could have picked either of two different tokens at
    ``row``: one of them on the edge of the kept set, or their Gumbel scores within TIE_EPS."""
    a, b = tokens
    assert a != b, "float_tie compares two different tokens (see kept_set_edge for log-probs)"
    x, r, sampled = _row(logits, requests, row)
    if not sampled:
        return False  # greedy tokens and the row check involve no rounding
    z, lo, hi = _edge_band(x, r)
    if any(lo <= float(z[0, t]) < hi for t in (a, b)):
        return True  # a token on the edge of the kept set
    step = before.num_generated[row : row + 1].cpu()
    score = z[0] + gumbel_from_words(random_words(r.seed, step, STREAM_TOKEN, x.shape[1]))[0]
    sa, sb = float(score[a]), float(score[b])
    return math.isfinite(sa) and math.isfinite(sb) and abs(sa - sb) <= TIE_EPS * (1 + abs(sa))


def kept_set_edge(logits: torch.Tensor, requests: haltkit.RequestBatch, row: int) -> bool:
    """Whether some token of ``row`` lies on the edge of its kept set (see :func:`_edge_band`): a
    backend may then keep one token more or less, which changes the kept mass (so the log-prob)
    and nothing else when the drawn token is the same."""
    x, r, sampled = _row(logits, requests, row)
    if not sampled:
        return False
    z, lo, hi = _edge_band(x, r)
    return bool(((z[0] >= lo) & (z[0] < hi)).any())


def value_tie_rows(values: torch.Tensor, requests: haltkit.RequestBatch, before: DecodeState) -> set[int]:
    """The consulted rows whose value lies within float slack of their price of time (their
    continue / stop decision could go either way)."""
    lam = requests.cost_of_time.cpu()
    v = values.cpu()
    consulted = (before.finish_reason.cpu() == Reason.NONE) & (before.phase.cpu() == 0) & (lam > -math.inf)
    near = (v - lam).abs() <= TIE_EPS * (1 + lam.abs())
    return set(torch.nonzero(consulted & near).flatten().tolist())


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    rtol, atol = TOL[dtype]
    got, want = got.cpu(), want.cpu()
    same_nonfinite = (got.isnan() & want.isnan()) | (got == want)
    finite = want.isfinite() & got.isfinite()
    return same_nonfinite | (finite & ((got - want).abs() <= atol + rtol * want.abs()))


def _compaction(finish_reason: torch.Tensor) -> tuple[torch.Tensor, int]:
    running = torch.nonzero(finish_reason.cpu() == Reason.NONE).flatten()
    idx = torch.full((finish_reason.shape[0],), -1, dtype=torch.int64)
    idx[: running.numel()] = running
    return idx, running.numel()


def compare_step(where, logits, requests, before: DecodeState, ref: StepOutput, ref_state: DecodeState,
                 got: StepOutput, got_state: DecodeState, diverged: set[int] | None = None) -> bool:
    """Asserts one step agrees on every row, except rows in ``diverged``: rows a float tie let the
    two runs part at an earlier step (``diverged`` is updated with this step's). Each excuse is
    per row and as narrow as its reason:

    - a token that differs at a float tie (:func:`float_tie`): the row diverges from here on;
    - a row whose value lies within float slack of its price of time: its decision may differ, so
      if its token or state differs, it diverges (its value itself is still compared);
    - a log-prob outside TOL on a row with a token on the edge of its kept set: that log-prob only.

    Compaction is checked against each run's own finish reasons, and against the reference on
    the rows still compared. Returns True when no row was excused.
    """
    diverged = set() if diverged is None else diverged
    before_rows = set(diverged)
    B = ref.tokens.shape[0]
    rows = [b for b in range(B) if b not in before_rows]
    bad_v = ~_close(got.values, ref.values, logits.dtype)
    for b in rows:
        assert not bad_v[b], f"{where}: row {b} value {float(got.values[b])}, reference {float(ref.values[b])}"
    lam_ties = value_tie_rows(ref.values, requests, before)
    rt, gt = ref.tokens.cpu(), got.tokens.cpu()
    state_differs = torch.zeros(B, dtype=torch.bool)
    for name in STATE_FIELDS:
        state_differs |= getattr(got_state, name).cpu() != getattr(ref_state, name).cpu()
    excused_lp = set()
    for b in rows:
        if b in lam_ties and (rt[b] != gt[b] or state_differs[b]):
            diverged.add(b)
        elif rt[b] != gt[b]:
            if not float_tie(logits, requests, before, b, (int(rt[b]), int(gt[b]))):
                raise AssertionError(f"{where}: row {b} token {int(gt[b])}, reference {int(rt[b])}")
            diverged.add(b)
    ok_lp = _close(got.logprobs, ref.logprobs, logits.dtype)
    for b in rows:
        if b not in diverged and not ok_lp[b]:
            if not kept_set_edge(logits, requests, b):
                raise AssertionError(f"{where}: row {b} logprob {float(got.logprobs[b])}, "
                                     f"reference {float(ref.logprobs[b])}")
            excused_lp.add(b)
    keep = torch.tensor([b for b in range(B) if b not in diverged], dtype=torch.int64)
    for name in STATE_FIELDS:
        g, w = getattr(got_state, name).cpu()[keep], getattr(ref_state, name).cpu()[keep]
        assert torch.equal(g, w), f"{where}: state.{name} {g.tolist()}, reference {w.tolist()} (rows {keep.tolist()})"
    idx, n = _compaction(got_state.finish_reason)
    assert torch.equal(got.active_idx.cpu(), idx), f"{where}: active_idx {got.active_idx.tolist()}, its state says {idx.tolist()}"
    assert int(got.num_active) == n, f"{where}: num_active {int(got.num_active)}, its state says {n}"
    if not diverged:
        assert torch.equal(got.active_idx.cpu(), ref.active_idx.cpu()), f"{where}: active_idx"
        assert int(got.num_active) == int(ref.num_active), f"{where}: num_active"
    return not diverged and not excused_lp


def _impl(backend):
    """The implementation of a backend name, or ``backend`` itself when it is a backend object (the
    emulated cuda backend, :func:`haltkit.native.emulated_cuda_backend`, which has no name of its own)."""
    return backend_module(backend) if isinstance(backend, str) else backend


def _decode_step(backend, *args):
    """haltkit.decode_step by name (through the dispatcher's checks), or the backend object's own."""
    if isinstance(backend, str):
        return haltkit.decode_step(*args, backend=backend)
    return backend.decode_step(*args)


def run_case(case: Case, backend="cpu", device: str = "cpu") -> int:
    """Runs ``case`` on ``backend`` (a name or a backend object) and the reference step by step;
    returns the number of rows that parted from the reference at a float tie (see compare_step)."""
    gen = torch.Generator().manual_seed(case.seed)
    head = make_head(case.head, case.d, case.head_dtype, gen)
    head_dev = None if head is None else HeadWeights(*(t.to(device) for t in head))
    requests = pack_requests(case.sampling, case.exits, case.V, case.B)
    req_dev = requests.to(device)
    ref_state = DecodeState.new(case.B)
    got_state = DecodeState.new(case.B, device)
    diverged: set[int] = set()
    if case.strided:
        got_state = _strided_state(got_state)
    for step in range(case.steps):
        x = make_logits(case.kind, case.B, case.V, step, gen).to(case.logits_dtype)
        h = None if head is None else (torch.randn(case.B, case.d, generator=gen)).to(case.head_dtype)
        if h is not None and case.kind == "nonfinite":
            h[torch.arange(case.B) % 7 == 5, 0] = math.nan
        xd = x.to(device)
        hd = None if h is None else h.to(device)
        if case.strided:
            xd = _layout(xd, 3)
            hd = None if hd is None else _layout(hd, 5)
        before = ref_state.clone()
        ref = reference_step(x, h, requests, ref_state, head)
        got = _decode_step(backend, xd, hd, req_dev, got_state, head_dev)
        compare_step(f"{case} step {step}", x, requests, before, ref, ref_state, got, got_state, diverged)
        if len(diverged) == case.B:
            break  # every row has parted at a float tie: nothing left to compare
    return len(diverged)


def _mixed(V: int, seed: int) -> tuple[list[SamplingParams], list[ExitPolicy]]:
    """Seven requests covering every filter combination and every exit rule."""
    samp = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.9, top_p=0.8, seed=seed + 1),
        SamplingParams(temperature=1.2, top_k=5, seed=seed + 2),
        SamplingParams(min_p=0.1, seed=seed + 3),
        SamplingParams(temperature=0.7, top_k=40, top_p=0.95, min_p=0.02, seed=seed + 4),
        SamplingParams(temperature=1.0, top_k=max(1, V // 3), top_p=0.5, seed=2**62 + seed),
        SamplingParams(temperature=1.0, seed=seed + 6),
    ]
    exits = [
        ExitPolicy(cost_of_time=0.1, patience=2, max_new_tokens=50, thinking_budget=2, exit_tokens=(3 % V, 4 % V)),
        ExitPolicy(cost_of_time=-0.3, max_new_tokens=3, eos_token_ids=(0, 1 % V)),
        ExitPolicy(thinking_budget=1, exit_tokens=(V - 1,)),
        ExitPolicy(cost_of_time=0.2, min_new_tokens=1, patience=1),
        ExitPolicy(max_new_tokens=2),
        ExitPolicy(eos_token_ids=tuple(range(min(V, 4)))),
        ExitPolicy(cost_of_time=0.05, patience=3, exit_tokens=(2 % V, 5 % V, 7 % V), thinking_budget=3),
    ]
    return samp, exits


def cases(large: bool = True) -> list[Case]:
    """The shared vectors. ``large`` adds a V = 151936 case (the benchmark's vocabulary)."""
    out = []
    for V, dtype, head, hd, kind, steps in [
        (4099, torch.float32, "mlp", torch.float32, "normal", 4),
        (111, torch.bfloat16, "linear", torch.bfloat16, "normal", 4),
        (32000, torch.float16, "mlp", torch.float16, "normal", 2),
        (257, torch.float32, "mlp", torch.float32, "nonfinite", 3),
        (64, torch.float32, "linear", torch.float32, "grid", 4),
        (4099, torch.float32, "none", torch.float32, "peaked", 3),
        (1000, torch.bfloat16, "mlp", torch.float16, "flat", 2),
    ]:
        samp, exits = _mixed(V, seed=V)
        if head == "none":
            exits = [ExitPolicy(max_new_tokens=e.max_new_tokens, eos_token_ids=e.eos_token_ids,
                                thinking_budget=e.thinking_budget, exit_tokens=e.exit_tokens) for e in exits]
        out.append(Case(f"V{V}-{str(dtype)[6:]}-{head}-{kind}", 7, V, samp, exits, steps, dtype, head, hd, kind=kind, seed=V))
    samp, exits = _mixed(33, seed=5)
    out.append(Case("B99-V33-strided", 99, 33, samp * 14 + samp[:1], exits * 14 + exits[:1], 3, head="mlp",
                    strided=True, seed=99))
    one = [SamplingParams(temperature=t, top_k=k, top_p=p, seed=3) for t, k, p in [(0, 0, 1), (1, 1, 0.5), (2, 0, 1)]]
    out.append(Case("V1", 3, 1, one, [ExitPolicy(max_new_tokens=2, eos_token_ids=(0,))] * 3, 3, head="linear"))
    out.append(Case("B1-V2", 1, 2, [SamplingParams(temperature=0.5, top_p=0.3, seed=9)], [ExitPolicy(max_new_tokens=9)], 5))
    if large:
        V = 151936
        samp = [SamplingParams(temperature=1.0, top_p=0.9, seed=1), SamplingParams(temperature=0.8, top_k=20000, top_p=0.7, seed=2),
                SamplingParams(temperature=1.0, top_k=50, seed=3), SamplingParams(temperature=0.0)]
        out.append(Case("V151936", 4, V, samp, [ExitPolicy(max_new_tokens=8)] * 4, 2, seed=7))
    return out


def persistent_grid_case(B: int = 2400) -> Case:
    """More rows than any GPU holds blocks at once, so the CUDA kernels' blocks take several rows
    each (their grid is one resident wave; the emulated device holds 3, so B = 60 does there).
    Greedy rows with every exit rule: no float ties."""
    samp, exits = _mixed(40, seed=11)
    return Case(f"B{B}-V40-persistent", B, 40, [SamplingParams(temperature=0.0)] * B,
                (exits * (B // len(exits) + 1))[:B], 3, head="mlp", seed=11)


# --- verify_step -----------------------------------------------------------------------------


@dataclass
class VerifyCase:
    """Rounds of speculative verification: drafts partly the target's own argmax, partly random."""

    name: str
    B: int
    K: int
    V: int
    method: str = "exact"
    probs: str | None = None  # "point" ([B, K] ones) or "full" ([B, K, V]) with method "rejection"
    logits_dtype: torch.dtype = torch.float32
    head: str = "mlp"
    rounds: int = 3
    seed: int = 0

    def __str__(self) -> str:
        return self.name


def _verify_tie(x: torch.Tensor, requests, row: int, step: int, tokens: tuple[int, int], case: VerifyCase,
                draft: int, q: torch.Tensor | None) -> bool:
    """Whether float rounding in the reference could have picked either token at this position."""
    before = DecodeState.new(requests.batch_size)
    before.num_generated.fill_(step)
    if float_tie(x, requests, before, row, tokens):
        return True
    if case.method != "rejection" or float(requests.temperature[row]) == 0:
        return False
    from haltkit.reference.philox import STREAM_ACCEPT, STREAM_RESIDUAL, uniform_from_words
    from haltkit.reference.verify_step import sampling_log_probs

    r = haltkit.RequestBatch(*(t[row : row + 1] for t in requests.tensors()))
    p = torch.exp(sampling_log_probs(x[row : row + 1].float(), r))[0]
    qx = 1.0 if q is None else float(q[draft])
    u = float(uniform_from_words(random_words(r.seed, torch.tensor([step]), STREAM_ACCEPT, 1))[0, 0])
    if abs(u * qx - float(p[draft])) <= TIE_EPS * float(p[draft]):
        return True  # the acceptance test itself is on a float edge
    resid = p.clone()
    if q is None:
        resid[draft] = 0
    else:
        resid = torch.clamp(p - q.float(), min=0.0)
    g = gumbel_from_words(random_words(r.seed, torch.tensor([step]), STREAM_RESIDUAL, x.shape[1]))[0]
    score = torch.log(resid) + g
    a, b = tokens
    sa, sb = float(score[a]), float(score[b])
    return math.isfinite(sa) and math.isfinite(sb) and abs(sa - sb) <= TIE_EPS * (1 + abs(sa))


def run_verify_case(case: VerifyCase, backend="cpu", device: str = "cpu") -> int:
    """Runs ``case`` on ``backend`` and the verify_step reference; returns the float ties met (0 or 1)."""
    from haltkit.reference.verify_step import verify_step as reference_verify

    gen = torch.Generator().manual_seed(case.seed)
    B, K, V = case.B, case.K, case.V
    samp, exits = _mixed(V, seed=case.seed)
    samp, exits = (samp * B)[:B], (exits * B)[:B]
    requests = pack_requests(samp, exits, V)
    head = make_head(case.head, 8, torch.float32, gen)
    head_dev = None if head is None else HeadWeights(*(t.to(device) for t in head))
    ref_state, got_state = DecodeState.new(B), DecodeState.new(B, device)
    for rnd in range(case.rounds):
        x = torch.randn(B, K + 1, V, generator=gen) * 3
        x[: B // 2] *= 4  # peaked rows: drafts of their argmax get accepted by sampled rows too
        x = x.to(case.logits_dtype)
        h = None if head is None else torch.randn(B, K + 1, 8, generator=gen)
        drafts = x[:, :K].float().argmax(2)
        random_rows = torch.rand(B, generator=gen) < 0.3
        drafts[random_rows] = torch.randint(0, V, (int(random_rows.sum()), K), generator=gen)
        lens = torch.randint(0, K + 1, (B,), generator=gen, dtype=torch.int32)
        if rnd == 1:  # a malformed draft in row 0: a token outside the vocabulary, or too long
            if K > 0:
                drafts[0, 0], lens[0] = V, max(int(lens[0]), 1)
            else:
                lens[0] = 1
        q = None
        if case.probs == "point":
            q = torch.ones(B, K)
        elif case.probs == "full":
            q = torch.softmax(torch.randn(B, K, V, generator=gen), dim=2).to(case.logits_dtype)
            if rnd == 2 and K > 0 and B > 1:  # q(x) = 0 at a judged position: malformed
                lens[1] = max(int(lens[1]), 1)
                q[1, 0, drafts[1, 0]] = 0
        n0 = ref_state.num_generated.clone()
        ref = reference_verify(x, h, drafts, lens, requests, ref_state, head, q, case.method)
        args = (x.to(device), None if h is None else h.to(device), drafts.to(device), lens.to(device),
                requests.to(device), got_state, head_dev, None if q is None else q.to(device), case.method)
        if isinstance(backend, str):
            got = haltkit.verify_step(*args, backend=backend)
        else:
            got = backend.verify_step(*args)
        where = f"{case} round {rnd}"
        rt, gt = ref.tokens, got.tokens.cpu()
        for b in range(B):
            diff = torch.nonzero(rt[b] != gt[b]).flatten()
            if diff.numel():
                j = int(diff[0])
                qrow = None if q is None or q.dim() == 2 or j >= K else q[b, j]
                if _verify_tie(x[:, j], requests, b, int(n0[b]) + j, (int(rt[b, j]), int(gt[b, j])), case,
                               int(drafts[b, min(j, K - 1)]) if K else 0, qrow):
                    return 1
                raise AssertionError(f"{where}: row {b} tokens {gt[b].tolist()}, reference {rt[b].tolist()}")
        for name in ("num_emitted", "num_accepted", "active_idx", "num_active"):
            g, w = getattr(got, name).cpu(), getattr(ref, name)
            assert torch.equal(g, w), f"{where}: {name} {g.tolist()}, reference {w.tolist()}"
        for name in STATE_FIELDS:
            g, w = getattr(got_state, name).cpu(), getattr(ref_state, name)
            assert torch.equal(g, w), f"{where}: state.{name} {g.tolist()}, reference {w.tolist()}"
        for name in ("values", "logprobs"):
            ok = _close(getattr(got, name), getattr(ref, name), case.logits_dtype)
            assert ok.all(), f"{where}: {name} {getattr(got, name)[~ok].tolist()}, reference {getattr(ref, name)[~ok].tolist()}"
    return 0


def verify_cases() -> list[VerifyCase]:
    return [
        VerifyCase("exact-B7-K3-V111", 7, 3, 111),
        VerifyCase("rejection-point-B7-K3-V111", 7, 3, 111, "rejection", "point"),
        VerifyCase("rejection-full-B5-K4-V4099-bf16", 5, 4, 4099, "rejection", "full", torch.bfloat16, seed=1),
        VerifyCase("exact-B3-K2-V32000-f16-nohead", 3, 2, 32000, logits_dtype=torch.float16, head="none", seed=2),
        VerifyCase("rejection-full-B6-K0-V33", 6, 0, 33, "rejection", "full", seed=3),
    ]


# --- exit_rules ---------------------------------------------------------------------------------

#: What an untouched plan row holds (rows >= B, inactive rows): any write shows.
PLAN_POISON = 0x5EADBEEF


def _integer_head(kind: str, d: int, gen: torch.Generator) -> HeadWeights | None:
    """A head whose values are exact in any summation order: small integer weights and biases, and
    no weight on the (non-integer) step features; with integer hidden states every value is an
    integer, and the prices of time drawn below are half-integers, so no decision is a float tie."""
    if kind == "none":
        return None
    R = 1 if kind == "linear" else 5
    w1 = torch.randint(-2, 3, (R, d + 2), generator=gen).float()
    w1[:, d:] = 0.0
    b1 = torch.randint(-2, 3, (R,), generator=gen).float()
    if kind == "linear":
        return HeadWeights(w1, b1, torch.empty(0), torch.empty(0))
    return HeadWeights(w1, b1, torch.randint(-2, 3, (R,), generator=gen).float(), torch.tensor([0.0]))


def exit_rules_scenario(seed: int, device: str = "cpu", rows: int | None = None) -> dict:
    """A random slot table for exit_rules: M slots, B logits rows (1-6, or ``rows``), some inactive."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=gen))  # noqa: E731
    B, V, d = rnd(1, 6), rnd(3, 40), rnd(1, 9)
    B = rows or B
    M = B + rnd(0, 2)
    head_kind = ("none", "linear", "mlp")[seed % 3]
    tok = lambda: rnd(0, V - 1)  # noqa: E731
    exits = [ExitPolicy(
        cost_of_time=None if head_kind == "none" or rnd(0, 3) == 0 else rnd(-3, 3) + 0.5,
        patience=rnd(1, 3), min_new_tokens=rnd(0, 3), max_new_tokens=rnd(1, 12),
        eos_token_ids=tuple(tok() for _ in range(rnd(0, 2))),
        thinking_budget=None if rnd(0, 1) else rnd(1, 8),
        exit_tokens=tuple(tok() for _ in range(rnd(0, 3))),
    ) for _ in range(M)]
    requests = pack_requests(SamplingParams(), exits, V, device=device)
    plan = torch.full((M, 5), PLAN_POISON, dtype=torch.int32)
    return dict(
        B=B, V=V, d=d, requests=requests, head=_integer_head(head_kind, d, gen),
        hidden_dtype=(torch.float32, torch.bfloat16)[rnd(0, 1)],
        active=(torch.rand(M, generator=gen) < 0.8).to(device),
        halt=torch.tensor([(e.eos_token_ids or (-1,))[0] for e in exits], dtype=torch.int64, device=device),
        state=DecodeState.new(M, device), plan=plan.to(device), gen=gen,
    )


def run_exit_rules_case(seed: int, backend="cpu", device: str = "cpu", steps: int = 10,
                        rows: int | None = None) -> None:
    """exit_rules of ``backend`` against the reference, step after step on one scenario: the state,
    the plan (poisoned rows untouched) and the forced logits equal bit for bit."""
    sc = exit_rules_scenario(seed, device, rows)
    B, V, gen = sc["B"], sc["V"], sc["gen"]
    head = sc["head"]
    head = None if head is None else HeadWeights(*(t.to(device) for t in head))
    op = _impl(backend).exit_rules
    ref_state, ours_state = sc["state"], sc["state"].clone()
    ref_plan, ours_plan = sc["plan"], sc["plan"].clone()
    token = torch.full((B,), -1, dtype=torch.int64, device=device)  # nothing pending yet
    for step in range(steps):
        logits = torch.randn(B, V, generator=gen).to(device)
        hidden = None if head is None else torch.randint(-3, 4, (B, sc["d"]), generator=gen).to(device, sc["hidden_dtype"])
        if hidden is not None and step == 5:
            hidden[seed % B, 0] = math.nan  # a non-finite value: ERROR where the row consults it
        ref_x, ours_x = logits.clone(), logits.clone()
        haltkit.reference.exit_rules(ref_x, hidden, sc["requests"], ref_state, head, ref_plan, token,
                                     sc["halt"], sc["active"])
        op(ours_x, hidden, sc["requests"], ours_state, head, ours_plan, token, sc["halt"], sc["active"])
        where = f"exit_rules[{backend}] seed {seed} step {step}"
        for name, a, b in zip(STATE_FIELDS, ours_state.tensors(), ref_state.tensors()):
            assert torch.equal(a, b), f"{where}: state.{name} {a.tolist()} != {b.tolist()}"
        assert torch.equal(ours_plan, ref_plan), f"{where}: plan {ours_plan.tolist()} != {ref_plan.tolist()}"
        assert torch.equal(ours_x, ref_x), f"{where}: logits differ"
        untouched = torch.ones_like(sc["active"])
        untouched[:B] = ~sc["active"][:B]
        assert bool((ours_plan[untouched] == PLAN_POISON).all()), f"{where}: an inactive plan row was written"
        # The engine's draw: a forced row takes its token, the others any token; now and then the
        # engine discards its sample (a partial prefill) and nothing is committed next time.
        drawn = torch.randint(0, V, (B,), generator=gen).to(device)
        token = torch.where(torch.isinf(ref_x).any(1), ref_x.argmax(1), drawn)
        if step % 4 == 3:
            token[int(torch.randint(0, B, (), generator=gen))] = -1


def run_exit_rules_bad_binding_calls(module) -> None:
    """exit_rules' binding refuses logits that are not float32 and malformed tuples."""
    z = (0,) * 15
    calls = [
        ((0, 0, 1, 1, 1), (0,) * 4, (0,) * 7, z[:13] + (1, 1), (0,) * 7, (0,) * 4),  # bf16 logits
        ((0, 0, 0, 1, 1), (0,) * 4, (0,) * 7, z[:13] + (1, 1), (0,) * 7, (0,) * 3),  # a rules field missing
    ]
    for args in calls:
        try:
            module.exit_rules(*args, 1)
        except ValueError:
            continue
        raise AssertionError(f"exit_rules binding accepted {args}")


def bad_inputs() -> list[tuple[str, dict, type]]:
    """Calls haltkit.decode_step must refuse before any kernel runs: (what, kwargs, exception)."""
    B, V, d = 3, 50, 4
    req = pack_requests(SamplingParams(), ExitPolicy(), V, B)
    head = make_head("linear", d, torch.float32, torch.Generator().manual_seed(0))
    x, h = torch.randn(B, V), torch.randn(B, d)
    st = DecodeState.new
    return [
        ("1-D logits", dict(logits=torch.randn(V), hidden=None, requests=req, state=st(B)), ValueError),
        ("integer logits", dict(logits=torch.ones(B, V, dtype=torch.int32), hidden=None, requests=req, state=st(B)), ValueError),
        ("empty vocabulary", dict(logits=torch.randn(B, 0), hidden=None, requests=req, state=st(B)), ValueError),
        ("batch mismatch", dict(logits=torch.randn(B + 1, V), hidden=None, requests=req, state=st(B + 1)), ValueError),
        ("state batch mismatch", dict(logits=x, hidden=None, requests=req, state=st(B - 1)), ValueError),
        ("int64 state", dict(logits=x, hidden=None, requests=req,
                             state=DecodeState(*(t.long() for t in st(B).tensors()))), ValueError),
        ("hidden without head", dict(logits=x, hidden=h, requests=req, state=st(B)), ValueError),
        ("head without hidden", dict(logits=x, hidden=None, requests=req, state=st(B), head=head), ValueError),
        ("hidden of the wrong width", dict(logits=x, hidden=torch.randn(B, d + 1), requests=req, state=st(B), head=head), ValueError),
        ("requests not packed", dict(logits=x, hidden=None, requests=object(), state=st(B)), TypeError),
    ]


def run_bad_inputs(backend: str = "cpu") -> None:
    for what, kwargs, exc in bad_inputs():
        try:
            haltkit.decode_step(**kwargs, backend=backend)
        except exc:
            continue
        raise AssertionError(f"{what}: decode_step did not raise {exc.__name__}")


def run_bad_binding_calls(module) -> None:
    """The binding's own checks (the last line of defence when it is called directly)."""
    z = (0,) * 15
    calls = [
        ((0, 0, 0, 1, 1), (0,) * 4, (0,) * 7, z[:-1], (0,) * 7, (0,) * 5),  # a request field missing
        ((0, 0, 0, 0, 1), (0,) * 4, (0,) * 7, z[:13] + (1, 1), (0,) * 7, (0,) * 5),  # B = 0
        ((0, 0, 0, 1, 2**31), (0,) * 4, (0,) * 7, z[:13] + (1, 1), (0,) * 7, (0,) * 5),  # V >= 2^31
        ((0, 0, 0, 1, 1), (0,) * 4, (0,) * 7, z[:13] + (0, 1), (0,) * 7, (0,) * 5),  # no eos column
    ]
    for args in calls:
        try:
            module.decode_step(*args, 1)
        except ValueError:
            continue
        raise AssertionError(f"binding accepted {args}")


def run_all(backend: str = "cpu", large: bool = True) -> int:
    """Every vector, bad input and binding check; returns the number of float ties met."""
    ties = sum(run_case(c, backend) for c in cases(large))
    ties += sum(run_verify_case(c, backend) for c in verify_cases())
    for seed in range(12):
        run_exit_rules_case(seed, backend)
    run_bad_inputs(backend)
    if backend == "cpu":
        run_bad_binding_calls(backend_module("cpu").module)
        run_exit_rules_bad_binding_calls(backend_module("cpu").module)
    return ties


# --- two backends side by side (the real cuda backend against the emulated one) ----------------


def compare_backends(case: Case, first, second, dev_first: str, dev_second: str) -> None:
    """Runs ``case`` on two backends (names or backend objects) on the same inputs, step by step:
    tokens, the full state and compaction equal exactly, log-probs and values within TOL. No float
    tie is excused: the two run the same code (e.g. haltkit._C and haltkit._cuda_emu)."""
    gen = torch.Generator().manual_seed(case.seed)
    head = make_head(case.head, case.d, case.head_dtype, gen)
    requests = pack_requests(case.sampling, case.exits, case.V, case.B)
    runs = [(first, dev_first, DecodeState.new(case.B, dev_first)), (second, dev_second, DecodeState.new(case.B, dev_second))]
    for step in range(case.steps):
        x = make_logits(case.kind, case.B, case.V, step, gen).to(case.logits_dtype)
        h = None if head is None else torch.randn(case.B, case.d, generator=gen).to(case.head_dtype)
        outs = []
        for backend, dev, state in runs:
            hw = None if head is None else HeadWeights(*(t.to(dev) for t in head))
            out = _decode_step(backend, x.to(dev), None if h is None else h.to(dev), requests.to(dev), state, hw)
            outs.append(StepOutput(*(t.cpu() for t in out)))
        a, b = outs
        where = f"{case} step {step}"
        for name in ("tokens", "active_idx", "num_active"):
            assert torch.equal(getattr(a, name), getattr(b, name)), f"{where}: {name} {getattr(a, name).tolist()} vs {getattr(b, name).tolist()}"
        for name in ("logprobs", "values"):
            ok = _close(getattr(a, name), getattr(b, name), case.logits_dtype)
            assert ok.all(), f"{where}: {name} {getattr(a, name)[~ok].tolist()} vs {getattr(b, name)[~ok].tolist()}"
        for name, sa, sb in zip(STATE_FIELDS, runs[0][2].tensors(), runs[1][2].tensors()):
            assert torch.equal(sa.cpu(), sb.cpu()), f"{where}: state.{name} {sa.tolist()} vs {sb.tolist()}"
