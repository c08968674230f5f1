"""The benchmarks run (their figures are what docs/performance.md reports; here only that they work)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sdxl_merge_benchmark_smoke_runs_the_real_pipeline_on_a_cpu(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sdxl_merge.py"), "--smoke", "--checkpointing", "on,off", "--repeats", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    import json

    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2
    for row in rows:
        assert row["steps"] == 4 and row["floor_s"] > 0 and row["step_s"] > 0 and row["export_s"] is not None
        assert row["step_mode"] == "eager"  # no CUDA here: the eager path is the one chosen
    assert "floor" in result.stdout and "x floor" in result.stdout


def test_direct_merge_benchmark_small(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "direct_merge.py"), "--rank", "2", "--repeat", "1", "--keep", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "722 layers" in result.stdout and "peak RSS" in result.stdout
