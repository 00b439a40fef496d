"""Sampling is exact in distribution, on every backend available here.

For each filter combination, one batch holds many rows with identical logits and different seeds:
a request's draw depends only on its seed, its logits and its step (checked below), so the rows
are independent draws. Their token counts are compared with the filtered target distribution,
computed in float64 from the definitions (``decode_step_model.kept_sets``: the kept set, then
``softmax(z)`` renormalised over it), by a chi-square goodness-of-fit test; tokens outside the
kept set must never appear. Logits and seeds are fresh every run (the failure message prints
what reproduces it).

False-failure rate: each chi-square test rejects a correct sampler with probability
ALPHA = 1e-6. The file makes at most 6 such tests per backend and there are at most 4 backends, so a
correct implementation fails a run with probability below 2.4e-5 (< 1e-4). Everything else here
is exact and cannot fail by chance.

Power: 50,000 draws per case on compiled backends. The Triton interpreter runs one Python loop
per row (0.1-0.5 s), so on a CPU it runs two cases with 96 draws each: it still catches a token
outside the kept set and a wrong log-probability (both exact), and gross distortions of the
weights; the Triton backend's same-seed agreement with the reference (test_decode_step.py) carries
the rest, and every case runs at full size on a GPU.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from scipy import stats

import haltkit
from haltkit import DecodeState, ExitPolicy, SamplingParams, pack_requests

from step_fixtures import INTERPRETED, backend, one_intra_op_thread  # noqa: F401  (fixtures)
from decode_step_model import RowRequest, kept_sets, scaled

ALPHA = 1e-6
MIN_EXPECTED = 5.0  # chi-square cells are pooled until each expects at least this many draws

CASES = {
    # name: (V, SamplingParams fields other than the seed)
    "temperature": (12, dict(temperature=0.7)),
    "top_k": (12, dict(temperature=1.0, top_k=4)),
    "top_p": (12, dict(temperature=1.0, top_p=0.8)),
    "min_p": (12, dict(temperature=1.2, min_p=0.2)),
    "top_k_top_p_min_p": (12, dict(temperature=1.3, top_k=6, top_p=0.9, min_p=0.05)),
    "hot_wide_top_p": (111, dict(temperature=2.5, top_p=0.95)),
}


#: Cases the Triton interpreter runs (0.1-0.5 s per row on a 2-core machine): the single-pass
#: temperature draw and the threshold searches of every filter at once.
INTERPRETER_CASES = ("temperature", "top_k_top_p_min_p")


def draws_for(name: str, case: str) -> int:
    """Draws per case: 50,000 on compiled backends, 96 through the Triton interpreter."""
    if name == "triton" and INTERPRETED:
        if case not in INTERPRETER_CASES:
            pytest.skip(f"Triton interpreter: only {INTERPRETER_CASES} fit the time budget (every case runs on a GPU)")
        return 96
    return 50_000


def case_logits(V: int, params: dict, rng: np.random.Generator) -> tuple[list[float], set[int], np.ndarray]:
    """Fresh logits on a coarse grid (ties everywhere) with -inf masks, and their target.

    Redrawn until float rounding cannot move the kept set (so the target is unambiguous).
    Returns (logits, kept set, target probabilities [V] float64).
    """
    req = RowRequest.of(SamplingParams(**params), ExitPolicy())
    while True:
        x = rng.integers(-8, 5, V) * 0.5
        x[rng.random(V) < 0.15] = -np.inf
        x[rng.integers(V)] = 2.5  # at least one finite entry
        x = x.tolist()
        z = scaled(x, req.temperature)
        variants = kept_sets(z, req)
        if len(variants) == 1:
            break
    kept = variants[0]
    p = np.zeros(V)
    for i in kept:
        p[i] = math.exp(z[i])
    return x, kept, p / p.sum()


def pooled_chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Chi-square p-value of ``counts`` against ``probs`` (over the kept tokens), small cells pooled.

    Cells are taken from the least to the most likely and merged until each expects at least
    MIN_EXPECTED draws; a short remainder joins the last cell. Returns (p-value, cells).
    """
    n = counts.sum()
    order = np.argsort(probs)
    cells_obs, cells_exp, obs, exp = [], [], 0.0, 0.0
    for i in order:
        obs, exp = obs + counts[i], exp + n * probs[i]
        if exp >= MIN_EXPECTED:
            cells_obs.append(obs)
            cells_exp.append(exp)
            obs, exp = 0.0, 0.0
    if exp > 0 or obs > 0:
        if cells_obs:
            cells_obs[-1] += obs
            cells_exp[-1] += exp
        else:
            cells_obs, cells_exp = [obs], [exp]
    if len(cells_obs) < 2:
        return 1.0, len(cells_obs)
    o, e = np.array(cells_obs), np.array(cells_exp)
    stat = float(((o - e) ** 2 / e).sum())
    return float(stats.chi2.sf(stat, len(o) - 1)), len(o)


@pytest.mark.parametrize("case", list(CASES))
def test_sampled_tokens_follow_the_filtered_distribution(backend, case):
    name, dev = backend
    V, params = CASES[case]
    run_seed = random.SystemRandom().randrange(2**32)
    rng = np.random.default_rng(run_seed)
    x, kept, target = case_logits(V, params, rng)
    N = draws_for(name, case)
    seed0 = int(rng.integers(0, 2**62))
    # One packed request repeated N times, then N consecutive seeds.
    req = pack_requests(SamplingParams(**params), ExitPolicy(), V, batch_size=1, device=dev)
    req = req.index_select(torch.zeros(N, dtype=torch.int64, device=dev))
    req.seed = seed0 + torch.arange(N, dtype=torch.int64, device=dev)
    state = DecodeState.new(N, dev)
    logits = torch.tensor(x, dtype=torch.float32, device=dev).expand(N, V).contiguous()
    out = haltkit.decode_step(logits, None, req, state, backend=name)
    tokens = out.tokens.cpu().numpy()
    where = f"{case} on {name}: run seed {run_seed}, logits {x}"
    assert ((tokens >= 0) & (tokens < V)).all(), where
    counts = np.bincount(tokens, minlength=V)
    outside = sorted(set(np.flatnonzero(counts).tolist()) - kept)
    assert not outside, f"{where}: tokens {outside} are outside the kept set {sorted(kept)}"
    p_value, cells = pooled_chi_square(counts, target)
    assert p_value > ALPHA, f"{where}: chi-square p = {p_value:.3g} over {cells} cells; counts {counts.tolist()}, expected {(N * target).round(1).tolist()}"
    # Each draw's log-probability is that of its token under the same target.
    want = np.log(target[tokens])
    np.testing.assert_allclose(out.logprobs.cpu().numpy(), want, rtol=1e-5, atol=1e-5, err_msg=where)


def _varied_requests(B: int, V: int, rng: random.Random) -> list[SamplingParams]:
    return [
        SamplingParams(
            temperature=rng.choice([0.0, 0.5, 1.0, 1.7]), top_k=rng.choice([0, 2, 5, V]),
            top_p=rng.choice([1.0, 0.9, 0.5]), min_p=rng.choice([0.0, 0.05, 0.3]), seed=rng.randrange(2**63),
        )
        for _ in range(B)
    ]


def test_a_seed_draws_the_same_token_whatever_the_batch_around_it(backend):
    name, dev = backend
    run_seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(run_seed)
    gen = torch.Generator().manual_seed(run_seed)
    B, V, step = (12 if name == "triton" and INTERPRETED else 48), 111, 5
    samp = _varied_requests(B, V, rng)
    logits = torch.randn(B, V, generator=gen) * 3
    logits[torch.rand(B, V, generator=gen) < 0.1] = -math.inf
    logits[:, 0] = 1.0  # a finite entry in every row

    def one_step(rows: list[int], extra: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows ``rows`` (in that order) with ``extra`` unrelated requests interleaved."""
        others = _varied_requests(extra, V, rng)
        pick, params = [], []
        for j, r in enumerate(rows):
            pick.append(logits[r])
            params.append(samp[r])
            if j < extra:
                noise = torch.randn(V, generator=gen) * 5
                if j % 3 == 0:
                    noise[7] = math.nan  # an error row next door changes nothing
                pick.append(noise)
                params.append(others[j])
        req = pack_requests(params, ExitPolicy(), V, device=dev)
        state = DecodeState.new(len(params), dev)
        state.num_generated.fill_(step)
        out = haltkit.decode_step(torch.stack(pick).to(dev), None, req, state, backend=name)
        own = torch.tensor([i for i, p in enumerate(params) if not any(p is o for o in others)])
        return out.tokens.cpu()[own], out.logprobs.cpu()[own]

    alone_tokens, alone_lps = one_step(list(range(B)), 0)
    shuffled = list(range(B))
    rng.shuffle(shuffled)
    mixed_tokens, mixed_lps = one_step(shuffled, B // 2)
    order = torch.tensor(shuffled)
    where = f"{name}: run seed {run_seed}"
    assert torch.equal(mixed_tokens, alone_tokens[order]), where
    torch.testing.assert_close(mixed_lps, alone_lps[order], rtol=0, atol=0, msg=where)
