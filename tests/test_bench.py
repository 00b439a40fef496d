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
