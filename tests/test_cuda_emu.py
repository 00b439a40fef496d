"""The CUDA kernels' own sources, run on CPU tensors by a host emulation of the CUDA execution model.

``haltkit._cuda_emu`` is csrc/decode_step.cu, verify_step.cu, exit_rules.cu and cuda_rows.cuh built
by g++ against csrc/emu (each CUDA thread a fiber switching at barriers and shuffles, ``__shared__``
per block, warps visited in the order of a schedule; see csrc/emu/emu.cpp). The shared native
vectors, the verify and exit_rules vectors and random multi-step scenarios run through it under
three warp schedules, with more rows than the emulated device holds blocks (a persistent grid of
3 blocks) and with greedy rows split over 1, 3, 5 and 7 blocks, and once under UBSan. Tokens,
state and compaction must equal the reference exactly, log-probs and values within TOL, as on a GPU.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import native_vectors as nv
from step_fixtures import one_intra_op_thread  # noqa: F401  (autouse: one torch thread per module)
from haltkit import DecodeState, ExitPolicy, SamplingParams, pack_requests
from haltkit.native import emulated_cuda_backend
from test_native import scenarios

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: (schedule, seed): warps run ahead of each other through their shuffles, in three orders.
SCHEDULES = [("forward", 0), ("reverse", 0), ("random", 1234)]
SCHEDULE_IDS = [s for s, _ in SCHEDULES]


@pytest.fixture(scope="module")
def emu():
    """The emulated module; a missing one fails (setup.py builds it) unless HALTKIT_CUDA_EMU=OFF."""
    try:
        import haltkit._cuda_emu as mod
    except ImportError as e:
        if os.environ.get("HALTKIT_CUDA_EMU", "ON").upper() == "OFF":
            pytest.skip(f"haltkit._cuda_emu was not built (HALTKIT_CUDA_EMU=OFF): {e}")
        pytest.fail(f"haltkit._cuda_emu is missing ({e}); pip install -e . builds it")
    yield mod
    mod.set_schedule("forward", 0)


@pytest.fixture(params=SCHEDULES, ids=SCHEDULE_IDS)
def cuda(emu, request):
    """The emulated cuda backend under one schedule."""
    emu.set_schedule(*request.param)
    return emulated_cuda_backend(emu)


# --- the shared vectors --------------------------------------------------------------------------


@pytest.mark.parametrize("case", nv.cases(), ids=str)
def test_emulated_cuda_matches_reference_on_shared_vectors(cuda, case):
    assert nv.run_case(case, cuda) == 0


@pytest.mark.parametrize("split", [1, 3, 5, 7])
@pytest.mark.parametrize("case", nv.cases(), ids=str)
def test_emulated_cuda_greedy_rows_split_over_blocks_match_the_reference(emu, case, split):
    # greedy_parts scans slice s of each greedy row in block (s, b); the row's judge merges them.
    # One schedule per split keeps the time down while every schedule meets the split path.
    emu.set_schedule(*SCHEDULES[split % 3])
    cuda = emulated_cuda_backend(emu)
    cuda.split_rows = split
    assert nv.run_case(case, cuda) == 0


def test_emulated_cuda_with_more_rows_than_resident_blocks_matches_the_reference(cuda, emu):
    # The row kernels' grid is one resident wave: 3 blocks here, so each block judges ~20 rows in
    # its grid-stride loop and reuses its shared memory from row to row.
    assert emu.multiprocessor_count() >= 2
    assert nv.run_case(nv.persistent_grid_case(60), cuda) == 0
    nv.run_exit_rules_case(0, cuda, steps=4, rows=60)


@pytest.mark.parametrize("case", nv.verify_cases(), ids=str)
def test_emulated_cuda_verify_step_matches_reference_on_shared_vectors(cuda, case):
    assert nv.run_verify_case(case, cuda) == 0


def test_emulated_cuda_exit_rules_match_the_reference(cuda):
    for seed in range(12):
        nv.run_exit_rules_case(seed, cuda)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                 HealthCheck.function_scoped_fixture])
@given(case=scenarios(), schedule=st.sampled_from(SCHEDULES), split=st.sampled_from([None, 2, 7]))
def test_emulated_cuda_matches_reference_on_random_multi_step_scenarios(emu, case, schedule, split):
    emu.set_schedule(*schedule)
    cuda = emulated_cuda_backend(emu)
    cuda.split_rows = split
    # No row may part from the reference at a float tie (150 scenarios met none): see test_native.
    assert nv.run_case(case, cuda) == 0


def test_top_p_draws_are_identical_under_every_schedule(emu):
    # Top-p's bucket masses are summed in a fixed order, not by atomics whose order follows the
    # warps' timing: the same seed gives the same tokens and bit-identical log-probs whatever
    # order the warps run in (V = 151936: 297 groups of 4 tokens per thread of the block).
    B, V = 4, 151936
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(B, V, generator=gen) * 2
    req = pack_requests([SamplingParams(temperature=1.0, top_p=p, seed=s) for s, p in enumerate((0.9, 0.5, 0.99, 0.7))],
                        ExitPolicy(max_new_tokens=4), V)
    seen = set()
    for schedule in SCHEDULES + [("random", 99)]:
        emu.set_schedule(*schedule)
        out = emulated_cuda_backend(emu).decode_step(x, None, req, DecodeState.new(B), None)
        seen.add((tuple(out.tokens.tolist()), out.logprobs.numpy().tobytes()))
    assert len(seen) == 1


# --- the emulator's own checks -------------------------------------------------------------------


@pytest.mark.parametrize("kernel, message", [
    ("barrier_under_lane_zero", "wait at different barriers"),
    ("half_warp_mask", "mask 0x0000ffff"),
    ("divergent_shuffle", "are at different shuffles"),
    ("return_before_barrier", "while other threads of its block have returned"),
])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=SCHEDULE_IDS)
def test_emulator_stops_divergent_collectives(emu, schedule, kernel, message):
    emu.set_schedule(*schedule)
    with pytest.raises(RuntimeError, match=message):
        emu.selftest(kernel)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=SCHEDULE_IDS)
def test_emulator_exposes_a_missing_barrier_in_a_block_reduction(emu, schedule):
    emu.set_schedule(*schedule)
    assert set(emu.selftest("block_sum")) == {float(sum(range(256)))}
    # Without the barrier, warps read each other's partials before they are written: poison.
    assert set(emu.selftest("block_sum_without_barrier")) != {float(sum(range(256)))}


def test_emulator_refuses_unknown_schedules(emu):
    with pytest.raises(ValueError, match="forward, reverse or random, got sideways"):
        emu.set_schedule("sideways", 0)


# --- UBSan ---------------------------------------------------------------------------------------

UBSAN_RUN = textwrap.dedent("""
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("haltkit._cuda_emu", sys.argv[1])
    emu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(emu)
    sys.path.insert(0, sys.argv[2])
    import torch
    torch.set_num_threads(1)
    import native_vectors as nv
    from haltkit.native import emulated_cuda_backend
    emu.set_schedule("random", 7)
    cuda = emulated_cuda_backend(emu)
    # fp32 rows of V = 4099 start 12 bytes past a 16-byte boundary every other row: the float4
    # loads must be limited to aligned rows.
    for case in nv.cases(large=False):
        if case.V in (4099, 257, 64) or case.strided:
            assert nv.run_case(case, cuda) == 0, case
    cuda.split_rows = 3
    assert nv.run_case(nv.cases(large=False)[0], cuda) == 0
    cuda.split_rows = None
    assert nv.run_verify_case(nv.verify_cases()[2], cuda) == 0
    nv.run_exit_rules_case(1, cuda, steps=4)
    print("clean")
""")


def test_emulated_cuda_runs_clean_under_ubsan(tmp_path):
    """An UndefinedBehaviorSanitizer build of haltkit._cuda_emu (into tmp_path), run in a
    subprocess over vectors with misaligned fp32 rows, a split greedy row, verify and exit_rules."""
    pybind11 = pytest.importorskip("pybind11")
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not on PATH")
    build = tmp_path / "build"
    gen = ["-GNinja"] if shutil.which("ninja") else []
    subprocess.run([cmake, "-S", ROOT, "-B", str(build), *gen, "-DHALTKIT_CUDA=OFF", "-DHALTKIT_CUDA_EMU_UBSAN=ON",
                    "-DCMAKE_BUILD_TYPE=Debug", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                    f"-DPython_EXECUTABLE={sys.executable}", f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={tmp_path}"],
                   check=True, capture_output=True)
    subprocess.run([cmake, "--build", str(build), "--target", "_cuda_emu", "-j", "2"], check=True, capture_output=True)
    module = glob.glob(str(tmp_path / "_cuda_emu.*.so"))[0]
    env = dict(os.environ, UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    run = subprocess.run([sys.executable, "-c", UBSAN_RUN, module, os.path.dirname(__file__)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert "runtime error" not in run.stderr, run.stderr[-6000:]
    assert "clean" in run.stdout


# --- the launchers' device and the probe ----------------------------------------------------------


def test_launchers_make_the_tensors_device_current(emu):
    # The emulated device is number 0: a launch for device 1 must try to switch to it and fail,
    # which shows the launchers take the device from their argument, not the thread's current one.
    x = torch.randn(2, 50)
    req = pack_requests(SamplingParams(temperature=0.0), ExitPolicy(max_new_tokens=3), 50, 2)
    cuda = emulated_cuda_backend(emu)
    cuda._last_args = lambda device: (1, 0)
    with pytest.raises(RuntimeError, match="cudaSetDevice to the tensors' device: invalid device ordinal"):
        cuda.decode_step(x, None, req, DecodeState.new(2), None)
    assert emulated_cuda_backend(emu).decode_step(x, None, req, DecodeState.new(2), None).tokens.tolist() == \
        x.argmax(1).tolist()


def test_the_probe_runs_and_passes_on_the_emulated_device(emu):
    # The same probe_cuda that haltkit.backends runs on a GPU before "auto" picks "cuda".
    assert emu.probe(0) == ""
    assert "invalid device ordinal" in emu.probe(3)


# --- on a GPU: the real kernels against their emulation ------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("case, split", [(c, s) for c in nv.cases() for s in (None, 5)]
                         + [(nv.persistent_grid_case(), None)], ids=str)
def test_real_cuda_matches_the_emulated_kernels_bit_for_bit(emu, case, split):
    # The same sources on both sides: tokens, state and compaction must be identical, with no
    # float tie excused (scripts/gpu_check.sh runs this first on a new GPU machine).
    from haltkit.backends import backend_module

    real = backend_module("cuda")
    emu.set_schedule("random", 5)
    emulated = emulated_cuda_backend(emu)
    real_split, real.split_rows = real.split_rows, split
    emulated.split_rows = split
    try:
        nv.compare_backends(case, real, emulated, "cuda", "cpu")
    finally:
        real.split_rows = real_split
