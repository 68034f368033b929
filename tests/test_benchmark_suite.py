"""The pytest-benchmark suite (benchmarks/test_bench.py) runs, at its smoke size, with its answer checks: it cannot
rot between benchmark runs."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_suite_runs_at_smoke_size():
    pytest.importorskip("pytest_benchmark")
    env = dict(os.environ, BRCD_BENCH_SIZE="smoke")
    out = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-disable", "-q", "-p",
                          "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout.splitlines()[-1]
