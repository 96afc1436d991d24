"""The guard benchmark runs end to end at a tiny size (no timing is asserted)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_guard_runs_and_prints_every_row():
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_guard.py"),
            "--params",
            "2e4",
            "--leaves",
            "3",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--compile-reps",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 0.02M/3 |")]
    variants = [row.split("|")[2].strip() for row in rows]
    assert variants == ["adamw", "clip+adamw", "apply_if_finite", "guard (all on)"], result.stdout
