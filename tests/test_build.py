"""What the extension reports about its own build."""
import re
from pathlib import Path

import torch

import brcd


def test_version_is_the_one_pyproject_declares():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    declared = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE).group(1)
    assert brcd.__version__ == declared == brcd.build_info()["version"]


def test_build_info_names_what_was_built():
    info = brcd.build_info()
    assert set(info) >= {"version", "cuda", "simd", "openmp", "openmp_threads"}
    assert info["simd"] in ("scalar", "avx2", "avx512_vpopcntdq")
    assert isinstance(info["cuda"], bool) and isinstance(info["openmp"], bool)
    # The CUDA kernels run where they were built and torch sees a GPU: a CUDA build on a machine without one (the
    # development machine) says no.
    assert brcd.cuda_available() is (info["cuda"] and torch.cuda.is_available())
