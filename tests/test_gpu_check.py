"""scripts/gpu_check.sh's own logic, on the CPU: its --dry-run runs every step's dry form (pytest
collects the GPU tests, the sanitizer's vector set runs on the emulated cuda backend, benchmarks
parse their arguments, e2e runs eagerly) and writes the same summary files as a GPU run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
STEPS = ["env", "build", "emu", "gpu-tests", "memcheck", "racecheck", "synccheck", "initcheck", "bench", "e2e", "vllm"]


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def test_dry_run_runs_every_step_and_writes_the_summary(tmp_path):
    out = tmp_path / "out"
    run = _run(str(out), "--dry-run")
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:] + log[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_check.log", "summary.json", "summary.md"]  # + 4 benchmark files on a GPU: <= 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["dry_run"]
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert list(status) == STEPS
    # Only three sanitizer tools lack a dry form (compute-sanitizer needs a GPU).
    assert {k for k, v in status.items() if v == "skipped"} == {"racecheck", "synccheck", "initcheck"}
    assert all(v == "dry-run" for k, v in status.items() if k not in ("racecheck", "synccheck", "initcheck"))
    results = {r["step"]: r for r in summary["results"]}
    assert results["sanitize-vectors"]["ties"] == 0 and results["e2e"]["device"] == "cpu"
    assert "23/" in log  # the emulator comparison's GPU tests were collected (22 vectors + the persistent grid)
    assert "**passed** (dry run)" in run.stdout


def test_a_failing_step_fails_the_check_and_the_others_still_run(tmp_path):
    # A python that fails the benchmarks' argument parsing: that step fails, e2e still runs.
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/bash\ncase "$*" in *bench/*) exit 3;; esac\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    out = tmp_path / "out"
    run = _run(str(out), "--dry-run", env=dict(PYTHON=str(wrapper), GPU_CHECK_ONLY="bench e2e"))
    assert run.returncode == 1, run.stdout + run.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["ok"]
    assert {s["step"]: (s["status"], s["rc"]) for s in summary["steps"]} == {"bench": ("failed", 3), "e2e": ("dry-run", 0)}
    assert "**FAILED**" in (out / "summary.md").read_text()


def test_arguments_are_checked():
    assert _run().returncode == 2
    assert _run("a", "b").returncode == 2
    bad = _run("--sideways")
    assert bad.returncode == 2 and "unknown option --sideways" in bad.stderr
