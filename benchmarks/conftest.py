"""Fixtures of the pytest-benchmark suite (test_bench.py).

    pytest benchmarks/ --benchmark-only                  # every group, on the CPU (and CUDA where there is one)
    pytest benchmarks/ --benchmark-only -k topk          # one family
    pytest benchmarks/ --benchmark-only --benchmark-save=NAME, later --benchmark-compare

BRCD_BENCH_SIZE=smoke shrinks every case to a size that runs in seconds (the test suite runs it that way, with
--benchmark-disable, so the suite cannot rot); the default sizes take a few minutes on 2 cores.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import brcd  # noqa: E402

SMOKE = os.environ.get("BRCD_BENCH_SIZE", "default") == "smoke"


def size(default, smoke):
    """The case's size: the default, or the smoke run's."""
    return smoke if SMOKE else default


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not brcd.cuda_available(), reason="needs a CUDA device and a CUDA build of brcd"))])
def device(request) -> str:
    return request.param


def timed(fn, device: str):
    """fn, waiting for the device at the end of each call: the timer sees the work, not its launch."""
    if device == "cpu":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run
