"""The native backends ("cpu": haltkit._cpu; "cuda": haltkit._C) against the reference.

Shared vectors (``native_vectors.py``) run on every native backend available here; the same
vectors run again under AddressSanitizer + UndefinedBehaviorSanitizer in a subprocess. Tokens,
state, termination and compaction must match exactly, values and log-probs within TOL; the only
allowed differences are float ties the reference's own rounding leaves open (see
``native_vectors.float_tie``). GPU tests carry the ``gpu`` marker.
"""

from __future__ import annotations

import glob
import math
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import haltkit
import native_vectors as nv
from step_fixtures import one_intra_op_thread  # noqa: F401  (autouse: one torch thread per module)
from haltkit import DecodeState, ExitPolicy, Reason, SamplingParams, StepOutput, pack_requests
from haltkit.backends import backend_module, resolve_backend
from haltkit.native import cuda_backend
from haltkit.reference.decode_step import decode_step as reference_step
from haltkit.reference.philox import gumbel_from_words, random_words

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)]


def _device(backend: str) -> str:
    dev = "cuda" if backend == "cuda" else "cpu"
    try:
        resolve_backend(backend, torch.device(dev))
    except (RuntimeError, ValueError) as e:
        pytest.skip(str(e))
    return dev


def _cpu_module():
    try:
        return backend_module("cpu").module
    except RuntimeError as e:
        pytest.skip(str(e))


# --- the shared vectors --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", nv.cases(), ids=str)
def test_step_matches_reference_on_shared_vectors(backend, case):
    # A float tie is legitimate but rare (< 1e-4 a draw); a fixed vector that met one would be
    # reseeded, so here it would mean the tie allowance is hiding a bug.
    assert nv.run_case(case, backend, _device(backend)) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("case", nv.cases(), ids=str)
def test_cuda_greedy_rows_split_over_blocks_match_the_reference(case, monkeypatch):
    # Small batches split each greedy row's pass over several blocks (greedy_parts), merged by
    # the row's judge; forcing 7 slices runs that path on every vector, short rows included.
    monkeypatch.setattr(backend_module("cuda"), "split_rows", 7)
    assert nv.run_case(case, "cuda", "cuda") == 0


def test_rows_are_split_only_when_the_batch_cannot_fill_the_gpu(monkeypatch):
    from haltkit import native

    monkeypatch.setattr(native, "_sm_count", lambda device: 132)
    backend = native.NativeBackend("cuda", None, lambda device: 0)
    parts = {(B, V): backend._parts(B, V, torch.device("cpu")) for B, V in
             [(1, 151936), (4, 151936), (66, 151936), (67, 151936), (1, 32000), (1, 4000)]}
    assert parts == {(1, 151936): 18, (4, 151936): 18, (66, 151936): 2, (67, 151936): 1,
                     (1, 32000): 3, (1, 4000): 1}
    backend.split_rows = 7
    assert backend._parts(200, 9, torch.device("cpu")) == 3  # never a slice without a group of four


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_rows_than_a_gpu_holds_blocks_match_the_reference(backend):
    # The CUDA kernels' grid is at most one resident wave (row_grid): with more rows, a block
    # loops over rows and reuses its shared memory, which the smaller vectors never exercise.
    assert nv.run_case(nv.persistent_grid_case(), backend, _device(backend)) == 0
    nv.run_exit_rules_case(0, backend, _device(backend), steps=4, rows=2400)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", nv.verify_cases(), ids=str)
def test_verify_step_matches_reference_on_shared_vectors(backend, case):
    assert nv.run_verify_case(case, backend, _device(backend)) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_are_refused_before_the_kernel(backend):
    _device(backend)
    nv.run_bad_inputs(backend)


def test_binding_refuses_malformed_arguments():
    nv.run_bad_binding_calls(_cpu_module())


def test_auto_picks_the_native_cpu_backend_for_cpu_tensors():
    _cpu_module()
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"


# --- Philox and the draw ------------------------------------------------------------------------


def test_philox_words_are_bit_identical_to_the_reference():
    mod = _cpu_module()
    for seed in (0, 1, 2**32 - 1, 2**32, 2**62 + 12345, 2**63 - 1):
        for step in (0, 1, 7, 2**31 - 1):
            for stream in (0, 1, 2):
                want = random_words(torch.tensor([seed]), torch.tensor([step]), stream, 37)[0].tolist()
                assert mod.random_words(seed, step, stream, 37) == want, (seed, step, stream)


def test_gumbel_noise_is_within_two_ulp_of_the_reference():
    # The uniform is exact; -log(-log(u)) uses the shared header's log, not torch's libm: the two
    # round differently in the last bit now and then (documented float ties of the draw). Near
    # G = 0 the inner log's rounding dominates, so the bound is 2 ulp of max(|G|, 1).
    mod = _cpu_module()
    words = random_words(torch.tensor([3, 2**40 + 9]), torch.tensor([0, 5]), 0, 50000).flatten()
    edge = torch.tensor([0, 1, 511, 512, 2**31, 2**32 - 512, 2**32 - 1])
    words = torch.cat([words, edge])
    want = gumbel_from_words(words).numpy()
    got = np.asarray(mod.gumbel_from_words(words.tolist()), dtype=np.float32)
    ulp = np.spacing(np.maximum(np.abs(want), np.float32(1)))
    assert np.all(np.abs(got - want) <= 2 * ulp), np.max(np.abs(got - want) / ulp)
    assert np.all(got <= 16.7) and np.all(np.isfinite(got))  # the pruning bound of the draw


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampled_tokens_agree_with_reference_over_many_seeds(backend):
    # The bar: the same token for the same (seed, step) in >= 99.9% of draws, and every
    # difference a float tie. 5 filter settings x 128 seeds x 2 steps = 1280 draws.
    dev = _device(backend)
    B, V = 128, 1000
    gen = torch.Generator().manual_seed(1)
    ties = draws = 0
    for filt in (dict(), dict(top_k=30), dict(top_p=0.9), dict(min_p=0.05), dict(top_k=300, top_p=0.6, min_p=0.01)):
        samp = [SamplingParams(temperature=0.8, seed=1000 * s + 17, **filt) for s in range(B)]
        req = pack_requests(samp, ExitPolicy(max_new_tokens=100), V)
        ref_state, got_state = DecodeState.new(B), DecodeState.new(B, dev)
        for step in range(2):
            x = torch.randn(B, V, generator=gen) * 2.5
            before = ref_state.clone()
            ref = reference_step(x, None, req, ref_state, None)
            got = haltkit.decode_step(x.to(dev), None, req.to(dev), got_state, None, backend=backend)
            diff = torch.nonzero(ref.tokens != got.tokens.cpu()).flatten().tolist()
            for b in diff:
                assert nv.float_tie(x, req, before, b, (int(ref.tokens[b]), int(got.tokens[b]))), (filt, step, b)
            ties += len(diff)
            draws += B
            got_state = DecodeState(*(t.clone() for t in ref_state.tensors()))  # continue in lockstep
            got_state = DecodeState(*(t.to(dev) for t in got_state.tensors()))
    assert ties <= draws // 1000, f"{ties} float ties in {draws} draws"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_row_does_not_depend_on_the_batch_around_it(backend):
    dev = _device(backend)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the batch is split across two OpenMP threads, a single row is not
    try:
        _check_rows_alone_equal_rows_in_batch(backend, dev)
    finally:
        torch.set_num_threads(threads)


def _check_rows_alone_equal_rows_in_batch(backend: str, dev: str) -> None:
    V = 4099
    samp, exits = nv._mixed(V, seed=11)
    req = pack_requests(samp, exits, V)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(len(samp), V, generator=gen) * 3
    full = haltkit.decode_step(x.to(dev), None, req.to(dev), DecodeState.new(len(samp), dev), backend=backend)
    for b in range(len(samp)):
        one = haltkit.decode_step(x[b : b + 1].to(dev), None, req.index_select(torch.tensor([b])).to(dev),
                                  DecodeState.new(1, dev), backend=backend)
        assert int(one.tokens[0]) == int(full.tokens[b])
        same_bits = one.logprobs.cpu()[:1].view(torch.int32) == full.logprobs.cpu()[b : b + 1].view(torch.int32)
        assert bool(same_bits), (b, float(one.logprobs[0]), float(full.logprobs[b]))  # NaN included


@pytest.mark.parametrize("backend", BACKENDS)
def test_filter_thresholds_keep_ties_and_stop_where_the_mass_reaches_top_p_exactly(backend):
    dev = _device(backend)
    # exp(z) rounds to 1.0f for -2.9e-8 < z <= 0, so these cumulative masses hit the top-p target
    # exactly: the kept set ends at the first token whose cumulative mass reaches it (>=).
    near_zero = torch.tensor([0.0, -1e-8, -1.5e-8, -2e-8, -20.0])
    assert torch.equal(torch.exp(near_zero[:4]), torch.ones(4))
    rows = {  # (sampling, logits, kept set)
        "top_p reached exactly": (dict(top_p=0.5), near_zero, {0, 1}),
        "top_k ties kept": (dict(top_k=2), torch.tensor([1.0, 3.0, 1.0, 3.0, 3.0]), {1, 3, 4}),
        "top_k then top_p": (dict(top_k=4, top_p=0.75), near_zero, {0, 1, 2}),
        "min_p 1 keeps the tied maxima": (dict(min_p=1.0), torch.tensor([2.0, 5.0, 5.0, -1.0, 5.0]), {1, 2, 4}),
    }
    B = 64
    for what, (filt, x, kept) in rows.items():
        req = pack_requests([SamplingParams(seed=s, **filt) for s in range(B)], ExitPolicy(), 5)
        logits = x.expand(B, 5).contiguous()
        ref = reference_step(logits, None, req, DecodeState.new(B), None)
        got = haltkit.decode_step(logits.to(dev), None, req.to(dev), DecodeState.new(B, dev), backend=backend)
        assert set(got.tokens.tolist()) == kept, what  # 64 draws from a uniform set of <= 3: all appear
        assert got.tokens.tolist() == ref.tokens.tolist(), what
        z = (x - x.max())[got.tokens.cpu()]
        want = z - math.log(float(torch.exp(x - x.max())[sorted(kept)].sum()))
        torch.testing.assert_close(got.logprobs.cpu(), want.float(), rtol=1e-5, atol=1e-5, msg=what)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_p_total_counts_every_chunk_wherever_the_row_max_lies(backend):
    # The top-p total comes from the pass that finds the max (online softmax: rescaled whenever
    # the running max grows). Rows whose max comes last (a ramp), first, or grows in every chunk
    # of 64 tokens (a sawtooth): a total that missed a rescale or a chunk would move tau_p, hence
    # the kept set and its mass, hence every log-prob (and many tokens).
    dev = _device(backend)
    V, B = 64 * 40, 32
    ramp = torch.linspace(-12.0, 3.0, V)
    saw = (torch.arange(V) % 64).float() * -0.2 + (torch.arange(V) // 64).float() * 0.3
    gen = torch.Generator().manual_seed(5)
    rows = {"max last": ramp, "max first": ramp.flip(0), "max grows every chunk": saw,
            "normal": torch.randn(V, generator=gen) * 3.0}
    for what, x in rows.items():
        for filt in (dict(temperature=0.7, top_p=0.6), dict(temperature=1.3, top_p=0.95, min_p=1e-4)):
            req = pack_requests([SamplingParams(seed=s, **filt) for s in range(B)], ExitPolicy(), V)
            logits = x.expand(B, V).contiguous()
            ref = reference_step(logits, None, req, DecodeState.new(B), None)
            got = haltkit.decode_step(logits.to(dev), None, req.to(dev), DecodeState.new(B, dev), backend=backend)
            assert got.tokens.tolist() == ref.tokens.tolist(), (what, filt)
            torch.testing.assert_close(got.logprobs.cpu(), ref.logprobs, rtol=1e-5, atol=1e-5, msg=(what, filt))


def test_flat_rows_and_the_small_top_k_boundary_match_the_reference():
    """Rows the candidate path declines (flat: near-uniform logits at a high temperature over 40000
    tokens, a large top-k) take the general path; at V = 449 (seven chunks of 64 and one token) top_k = 2 sits on
    the chunk-bound limit (4 k = ceil(V / 64), where both paths must take the chunk bound) with the
    row max in the lone tail token: decode_step (candidate path) and rejection verify_step at drafted
    positions (general path) against the reference."""
    _device("cpu")
    B = 16
    gen = torch.Generator().manual_seed(17)
    flat = torch.randn(B, 40000, generator=gen) * 0.05  # more candidates than the candidate path takes
    tail = torch.randn(B, 449, generator=gen) * 3.0
    tail[:, -1] = tail.max(1).values + 0.5
    rows = [("flat top_p", flat, dict(temperature=2.0, top_p=0.9)),
            ("flat top_p min_p", flat, dict(temperature=4.0, top_p=0.5, min_p=0.5)),
            ("large top_k", flat * 40, dict(temperature=1.0, top_k=1000, top_p=0.95)),
            ("top_k at the chunk bound", tail, dict(temperature=0.9, top_k=2)),
            ("top_k at the chunk bound, top_p", tail, dict(temperature=0.9, top_k=2, top_p=0.6))]
    for what, x, filt in rows:
        V = x.shape[1]
        req = pack_requests([SamplingParams(seed=s, **filt) for s in range(B)], ExitPolicy(), V)
        ref = reference_step(x, None, req, DecodeState.new(B), None)
        got = haltkit.decode_step(x, None, req, DecodeState.new(B), None, backend="cpu")
        for b in torch.nonzero(ref.tokens != got.tokens).flatten().tolist():
            assert nv.float_tie(x, req, DecodeState.new(B), b, (int(ref.tokens[b]), int(got.tokens[b]))), (what, b)
        assert int((ref.tokens != got.tokens).sum()) <= 1, what
        torch.testing.assert_close(got.logprobs, ref.logprobs, rtol=1e-5, atol=1e-5, msg=what)
        if V != 449:
            continue
        # Drafted positions: the general path (kept_threshold, then the residual draw).
        K = 2
        logits = torch.stack([x, x.roll(7, 1), x.roll(-3, 1)], 1)
        drafts = torch.stack([x.argmax(1), torch.randint(V, (B,), generator=gen)], 1)
        lens = torch.full((B,), K, dtype=torch.int32)
        q = torch.ones(B, K)
        runs = {bk: haltkit.verify_step(logits, None, drafts, lens, req, DecodeState.new(B), None, q, "rejection", bk)
                for bk in ("torch", "cpu")}
        assert torch.equal(runs["cpu"].tokens, runs["torch"].tokens), what
        assert torch.equal(runs["cpu"].num_accepted, runs["torch"].num_accepted), what
        torch.testing.assert_close(runs["cpu"].logprobs, runs["torch"].logprobs, rtol=1e-5, atol=1e-5,
                                   equal_nan=True, msg=what)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return set()


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.uname().machine != "x86_64",
                    reason="the check builds x86-64 variants with g++")
def test_cpu_row_machinery_matches_plain_loops(tmp_path):
    """tests/cpu_rows_check.cpp (csrc/cpu_rows.h's vector paths against plain loops: the AVX2 exp
    within its stated bound down to underflow, the greedy scan, chunk maxima and the top-p total,
    the candidate gather at vector and chunk tails, the kept mass, the head's dot blocks), built
    for this host's ISA (its AVX2 or AVX-512 paths) and for plain x86-64 (the portable loops)."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not on PATH")
    flags = _cpu_flags()
    native = "avx512" if "avx512f" in flags else ("avx2" if {"avx2", "fma"} <= flags else "portable")
    for isa, want in (("native", native), ("x86-64", "portable")):
        exe = tmp_path / f"cpu_rows_check_{isa}"
        build = subprocess.run([gxx, "-std=c++17", "-O1", f"-march={isa}", "-ffp-contract=off", "-fno-trapping-math",
                                "-fno-math-errno", "-fopenmp", "-Wall", "-Wextra", "-Werror", f"-I{ROOT}/csrc",
                                f"-I{ROOT}/csrc/include", f"{ROOT}/tests/cpu_rows_check.cpp", "-o", str(exe)],
                               capture_output=True, text=True)
        assert build.returncode == 0, build.stderr[-3000:]
        run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-3000:]
        assert run.stdout.split()[-2:] == ["ok", want], run.stdout[-300:]


# --- outputs and state ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_output_element_is_written(backend):
    dev = _device(backend)
    case = nv.cases(large=False)[3]  # non-finite rows, an MLP head, some rows finishing
    B, V = case.B, case.V
    gen = torch.Generator().manual_seed(case.seed)
    head = nv.make_head("mlp", case.d, torch.float32, gen)
    req = pack_requests(case.sampling, case.exits, V, B)
    ref_state, got_state = DecodeState.new(B), DecodeState.new(B, dev)
    impl = backend_module(backend)
    for step in range(3):
        x = nv.make_logits("nonfinite", B, V, step, gen)
        h = torch.randn(B, case.d, generator=gen)
        before = ref_state.clone()
        ref = reference_step(x, h, req, ref_state, head)
        out = StepOutput(torch.full((B,), 12345, dtype=torch.int64, device=dev),
                         torch.full((B,), 777.0, device=dev), torch.full((B,), 777.0, device=dev),
                         torch.full((B,), 999, dtype=torch.int64, device=dev),
                         torch.full((), 999, dtype=torch.int64, device=dev))
        got = impl.decode_step_into(out, x.to(dev), h.to(dev), req.to(dev), got_state,
                                    haltkit.HeadWeights(*(t.to(dev) for t in head)))
        assert got is out
        assert nv.compare_step(f"step {step}", x, req, before, ref, ref_state, got, got_state)


def test_non_contiguous_state_is_updated_in_place():
    _cpu_module()
    B, V = 5, 40
    req = pack_requests(SamplingParams(temperature=0), ExitPolicy(max_new_tokens=2), V, B)
    buf = torch.zeros(len(DecodeState.__dataclass_fields__), 2 * B, dtype=torch.int32)
    state = DecodeState(*(row[::2] for row in buf))
    x = torch.randn(B, V)
    for _ in range(2):
        haltkit.decode_step(x, None, req, state, backend="cpu")
    assert state.num_generated.tolist() == [2] * B and state.finish_reason.tolist() == [2] * B
    assert not buf[:, 1::2].any()  # the gaps between the views' elements are untouched


def test_custom_ops_pass_opcheck_on_the_cpu_backend():
    # Not the test_aot_dispatch_* utils: they re-run the op on the state its first run advanced,
    # so outputs legitimately differ (tests/test_decode_step.py says the same).
    _cpu_module()
    B, K, V, d = 4, 2, 50, 6
    samp, exits = nv._mixed(V, seed=3)
    req = pack_requests(samp[:B], exits[:B], V)
    head = nv.make_head("mlp", d, torch.float32, torch.Generator().manual_seed(0))
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    args = (torch.randn(B, V), torch.randn(B, d), *req.tensors(), *DecodeState.new(B).tensors(), *head, "cpu")
    torch.library.opcheck(haltkit.ops._decode_step_op, args, test_utils=utils)
    drafts, lens = torch.randint(0, V, (B, K)), torch.full((B,), K, dtype=torch.int32)
    probs = torch.softmax(torch.randn(B, K, V), dim=2)
    args = (torch.randn(B, K + 1, V), torch.randn(B, K + 1, d), drafts, lens, probs, *req.tensors(),
            *DecodeState.new(B).tensors(), *head, "rejection", "cpu")
    torch.library.opcheck(haltkit.speculative._verify_step_op, args, test_utils=utils)


# --- hypothesis: multi-step scenarios ------------------------------------------------------------


@st.composite
def scenarios(draw) -> nv.Case:
    V = draw(st.sampled_from([1, 2, 5, 33, 130]))
    B = draw(st.integers(1, 6))
    token = st.integers(0, V - 1)
    samp, exits = [], []
    for _ in range(B):
        samp.append(SamplingParams(
            temperature=draw(st.sampled_from([0.0, 0.0, 0.5, 1.0, 1.7])),
            top_k=draw(st.sampled_from([0, 0, 1, 2, 3, V, V + 3])),
            top_p=draw(st.sampled_from([1.0, 1.0, 0.2, 0.5, 0.9])),
            min_p=draw(st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0])),
            seed=draw(st.integers(0, 2**63 - 1)),
        ))
        exits.append(ExitPolicy(
            cost_of_time=draw(st.sampled_from([None, None, -1.0, 0.0, 0.3, 1.0])),
            patience=draw(st.integers(1, 3)),
            min_new_tokens=draw(st.integers(0, 3)),
            max_new_tokens=draw(st.integers(1, 12)),
            eos_token_ids=tuple(draw(st.lists(token, max_size=2))),
            thinking_budget=draw(st.one_of(st.none(), st.integers(1, 6))),
            exit_tokens=tuple(draw(st.lists(token, max_size=3))),
        ))
    return nv.Case(
        "hypothesis", B, V, samp, exits, steps=draw(st.integers(1, 8)),
        logits_dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        head=draw(st.sampled_from(["none", "linear", "mlp"])),
        head_dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        kind=draw(st.sampled_from(["normal", "normal", "grid", "nonfinite", "peaked", "flat"])),
        strided=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)),
    )


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenarios())
def test_cpu_matches_reference_on_random_multi_step_scenarios(case):
    _cpu_module()
    # No row may part from the reference at a float tie: 400 scenarios met none (measured), so
    # here a tie is far more likely a real difference that the tie allowance would hide.
    assert nv.run_case(case, "cpu") == 0


# --- the CUDA module on a machine without a GPU --------------------------------------------------


def _cuda_module():
    try:
        import haltkit._C as mod
    except ImportError as e:
        pytest.skip(f"haltkit._C was not built here ({e})")
    return mod


def test_cuda_module_imports_and_refuses_to_run_without_a_gpu():
    mod = _cuda_module()  # importing must work with no driver (static cudart)
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible; the GPU tests cover the module")
    req = (0,) * 13 + (1, 1)
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        mod.decode_step((0, 0, 0, 1, 1), (0,) * 4, (0,) * 7, req, (0,) * 7, (0,) * 5, (0, 1), 0, 0)
    with pytest.raises(ValueError, match="workspace"):  # the binding's own check comes first
        mod.decode_step((0, 0, 0, 1, 1), (0,) * 4, (0,) * 7, req, (0,) * 7, (0,) * 5, (0, 4), 0, 0)
    assert "no usable CUDA device" in mod.probe(0)
    with pytest.raises(RuntimeError, match="CUDA device"):
        cuda_backend(mod)
    assert "no CUDA device" in haltkit.backends()["cuda"]


def _cuobjdump() -> str | None:
    try:
        import nvidia
    except ImportError:
        return shutil.which("cuobjdump")
    for base in nvidia.__path__:
        found = sorted(glob.glob(os.path.join(base, "cu*", "bin", "cuobjdump")))
        if found:
            return found[-1]
    return shutil.which("cuobjdump")


def test_cuda_module_carries_sm80_and_sm90a_code():
    mod = _cuda_module()
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (pip install nvidia-cuda-cuobjdump, in the test extra)")
    elf = subprocess.run([tool, "--list-elf", mod.__file__], capture_output=True, text=True, check=True).stdout
    ptx = subprocess.run([tool, "--list-ptx", mod.__file__], capture_output=True, text=True, check=True).stdout
    assert "sm_80" in elf and "sm_90a" in elf, elf
    assert "sm_90" in ptx, ptx  # PTX for newer GPUs to JIT


# --- the sanitizer build -------------------------------------------------------------------------

SANITIZED_RUN = textwrap.dedent("""
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("haltkit._cpu", sys.argv[1])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["haltkit._cpu"] = mod
    sys.path.insert(0, sys.argv[2])
    import torch
    torch.set_num_threads(2)
    from haltkit.backends import backend_module
    assert backend_module("cpu").module is mod, "the sanitized module is not the one running"
    import native_vectors
    ties = native_vectors.run_all("cpu")
    assert ties == 0, f"{ties} float ties in the fixed vectors"
    print("ties", ties)
""")


def test_sanitizer_build_runs_the_vectors_clean(tmp_path):
    """ASan + UBSan build of haltkit._cpu (into tmp_path), run in a subprocess over every vector,
    bad input and malformed binding call; any report aborts the subprocess."""
    pybind11 = pytest.importorskip("pybind11")
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not on PATH")
    build = tmp_path / "build"
    gen = ["-GNinja"] if shutil.which("ninja") else []
    subprocess.run([cmake, "-S", ROOT, "-B", str(build), *gen, "-DHALTKIT_SANITIZE=ON", "-DHALTKIT_CUDA=OFF",
                    "-DCMAKE_BUILD_TYPE=Debug", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                    f"-DPython_EXECUTABLE={sys.executable}", f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={tmp_path}"],
                   check=True, capture_output=True)
    subprocess.run([cmake, "--build", str(build), "--target", "_cpu", "-j", "2"], check=True, capture_output=True)
    module = glob.glob(str(tmp_path / "_cpu.*.so"))[0]
    # python itself is not instrumented: the ASan runtime must load first, and libstdc++ with it so
    # that ASan finds the real __cxa_throw to intercept.
    runtime = [subprocess.run(["gcc", f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
               for lib in ("libasan.so", "libstdc++.so")]
    env = dict(os.environ, LD_PRELOAD=" ".join(runtime), ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    run = subprocess.run([sys.executable, "-c", SANITIZED_RUN, module, os.path.dirname(__file__)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert "ERROR: AddressSanitizer" not in run.stderr and "runtime error" not in run.stderr, run.stderr[-6000:]
    assert "ties" in run.stdout


def test_auto_falls_back_with_one_warning_when_the_cuda_module_cannot_run_here(monkeypatch):
    # A built haltkit._C on a GPU it holds no code for (a T4, a V100) or under a driver older than
    # its CUDA: "auto" must probe it, pass over it to Triton and say so once; "cuda" must refuse.
    import importlib
    import warnings

    backends = importlib.import_module("haltkit.backends")  # haltkit.backends is also a function

    why = "haltkit._C: its kernels cannot run on device 0 (compute capability 7.5; ...): no kernel image"

    class Unrunnable:
        @staticmethod
        def probe(index):
            return why

    real_import = importlib.import_module
    monkeypatch.setattr(backends.importlib, "import_module",
                        lambda name: Unrunnable if name == "haltkit._C" else real_import(name))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    backends._probe.cache_clear()
    backends._warn_cuda_fallback.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"uses 'triton' instead of 'cuda'.*compute capability 7\.5"):
            assert backends.resolve_backend("auto", torch.device("cuda", 0)) == "triton"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per process, not once per step
            assert backends.resolve_backend("auto", torch.device("cuda", 0)) == "triton"
        with pytest.raises(RuntimeError, match="compute capability 7.5"):
            backends.resolve_backend("cuda", torch.device("cuda", 0))
    finally:
        backends._probe.cache_clear()
        backends._warn_cuda_fallback.cache_clear()


# --- the comparison's own excuses ------------------------------------------------------------------


def _one_step(B: int = 4, V: int = 300, lam: float | None = None):
    """A reference step on sampled rows (top-p 0.9) and a copy of its outputs and state to tamper with."""
    samp = [SamplingParams(temperature=0.8 if b else 0.0, top_p=0.9, seed=b) for b in range(B)]
    req = pack_requests(samp, ExitPolicy(cost_of_time=lam, max_new_tokens=20), V)
    x = torch.randn(B, V, generator=torch.Generator().manual_seed(4)) * 2
    before = DecodeState.new(B)
    ref_state = before.clone()
    ref = reference_step(x, None, req, ref_state, None)
    got = StepOutput(*(t.clone() for t in ref))
    return x, req, before, ref, ref_state, got, ref_state.clone()


def test_a_log_prob_shift_on_sampled_rows_is_not_excused():
    x, req, before, ref, ref_state, got, got_state = _one_step()
    assert nv.compare_step("clean", x, req, before, ref, ref_state, got, got_state)
    got.logprobs[1:] += 0.5  # the sampled rows only: no token of theirs lies on a kept-set edge
    assert not any(nv.kept_set_edge(x, req, b) for b in range(4))
    with pytest.raises(AssertionError, match="row 1 logprob"):
        nv.compare_step("shifted", x, req, before, ref, ref_state, got, got_state)


def test_a_value_tie_in_one_row_excuses_that_row_only():
    x, req, before, ref, ref_state, got, got_state = _one_step(lam=0.25)
    # As if a head had valued the rows (this one has none): all running, row 0 exactly at its price.
    for out, state in ((ref, ref_state), (got, got_state)):
        out.values[:] = torch.tensor([0.25, 3.0, 3.0, 3.0])
        state.finish_reason.fill_(Reason.NONE)
        out.active_idx[:] = torch.arange(4)
        out.num_active.fill_(4)
    assert nv.compare_step("clean", x, req, before, ref, ref_state, got, got_state)
    got_state.finish_reason[0] = Reason.VALUE  # row 0 decided the other way: legitimate at a tie
    got.tokens[0] = -1
    got.active_idx[:] = torch.tensor([1, 2, 3, -1])
    got.num_active.fill_(3)
    diverged = set()
    assert not nv.compare_step("row 0 tie", x, req, before, ref, ref_state, got, got_state, diverged)
    assert diverged == {0}
    got_state.num_generated[2] += 1  # a real difference in another row must still fail
    with pytest.raises(AssertionError, match=r"state.num_generated"):
        nv.compare_step("row 2 wrong", x, req, before, ref, ref_state, got, got_state, set())
