import os
from pathlib import Path

import pytest
import torch

import brcd

ROOT = Path(__file__).resolve().parents[1]


def device_params():
    """pytest params for every device; CUDA is marked and skipped where there is none."""
    params = [pytest.param("cpu", id="cpu")]
    params.append(pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not brcd.cuda_available(), reason="needs a CUDA device and a CUDA build of brcd")]))
    return params


def reference_vectors_path() -> Path:
    env = os.environ.get("BRCD_REFERENCE_VECTORS")
    candidates = [Path(env)] if env else []
    candidates += [ROOT.parent / "shared" / "reference" / "vectors.pt", ROOT / "shared" / "reference" / "vectors.pt"]
    for c in candidates:
        if c.exists():
            return c
    pytest.skip("shared/reference/vectors.pt not found (set BRCD_REFERENCE_VECTORS)")


@pytest.fixture(scope="session")
def reference_cases():
    return torch.load(reference_vectors_path(), weights_only=True)
