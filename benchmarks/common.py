"""Shared helpers of the benchmark scripts: timing, machine description, Markdown tables."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from typing import Callable, List, Sequence

import torch


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine(device: str = "cpu") -> str:
    import brcd

    info = brcd.build_info()
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        return (f"{p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
                f"CUDA {torch.version.cuda}")
    return (f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"brcd SIMD {info['simd']}, OpenMP threads {info['openmp_threads']}, torch {torch.__version__}")


def time_cpu(fn: Callable[[], object], repeat: int = 3, warmup: int = 1) -> float:
    """Median wall time in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_cuda(fn: Callable[[], object], repeat: int = 10, warmup: int = 3) -> float:
    """Median device time in seconds, measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def table(headers: Sequence[str], rows: List[Sequence[object]]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def git_revision() -> str:
    if os.environ.get("BRCD_REVISION"):  # the GPU machine receives no .git
        return os.environ["BRCD_REVISION"]
    try:
        git = lambda *args: subprocess.run(["git", *args], capture_output=True, text=True, timeout=5).stdout.strip()
        # Tracked files changed since the commit: the numbers are not that commit's alone.
        return (git("rev-parse", "--short", "HEAD") or "unknown") + ("+changes" if git(
            "status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
