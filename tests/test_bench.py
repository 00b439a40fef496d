"""The benchmark scripts run end to end (``--quick``: tiny shapes, few repetitions) into a temp dir.

Nothing here judges speed; it keeps the scripts working, and checks that what they write is
complete: every contender timed at every point, ratios consistent with the raw times.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_quick(script: str, out: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_decode_step_benchmark_quick_run_writes_complete_results(tmp_path):
    run_quick("decode_step.py", tmp_path)
    res = json.loads((tmp_path / "decode_step_quick.json").read_text())
    names = {"eager", "compiled", *res["fused_backends"]}
    assert {"torch", "platform", "load_average", "torch_threads"} <= set(res["machine"])
    assert res["copy_bandwidth_GBps"] > 0
    points = {(r["mode"], r["dtype"], r["B"], r["V"]) for r in res["rows"]}
    grid = res["grid"]
    assert points == {(m, d, b, v) for m in ("greedy", "top_p") for d in grid["dtype"] for b in grid["B"] for v in grid["V"]}
    for r in res["rows"]:
        assert set(r["times_us"]) == names
        for n, ts in r["times_us"].items():
            assert len(ts) >= 3 and all(t > 0 for t in ts)
            assert r["median_us"][n] == statistics.median(ts)
            assert r["speedup_vs_eager"][n] == r["median_us"]["eager"] / r["median_us"][n]
            assert 0 < r["floor_fraction"][n] == r["floor_us"] / r["median_us"][n]
    md = (tmp_path / "decode_step_quick.md").read_text()
    assert md.count("\n| greedy |") + md.count("\n| top_p |") == len(res["rows"])


def test_e2e_real_benchmark_logic_on_the_toy_writes_complete_results(tmp_path):
    """bench/e2e_real.py's whole path (contenders, interleaving, floors, tables) on the toy model."""
    out = tmp_path / "e2e_real"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "e2e_real.py"), "--toy", "--dtypes", "fp32", "--batch", "1", "--new", "4",
         "--repeats", "1", "--sampling", "greedy", "--workloads", "chat", "--contenders", "hf", "eager", "ngram",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=BENCH,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(out.with_suffix(".json").read_text())
    rows = {r["contender"]: r for r in res["rows"]}
    assert set(rows) == {"hf", "eager", "ngram"}
    for r in rows.values():
        assert r["median_us"] == statistics.median(r["times_us"]) > 0
        assert r["vs_hf"] == rows["hf"]["median_us"] / r["median_us"]
        assert abs(r["tokens_per_s"] - 4 / (r["median_us"] * 1e-6)) < 1e-6 * r["tokens_per_s"]
        assert 0 < r["floor_fraction"] == r["tokens_per_s"] / r["floor_tokens_per_s"]
        assert r["same_tokens_as_hf"] is True  # greedy, EOS off: haltkit equals HF token for token
        # prefill's token plus 3 one-token steps; fewer when drafts are accepted
        assert r["target_forwards_per_token"] == 1.0 if r["contender"] != "ngram" else r["target_forwards_per_token"] <= 1.0
    assert out.with_suffix(".md").read_text().count("| fp32 | greedy | chat | 1 |") == 3
