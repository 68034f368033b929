"""brcd.code_statistics against the formulas computed directly with NumPy."""
import math

import numpy as np
import pytest
import torch

import brcd
from brcd import code_stats as cs_module
from brcd.code_stats import code_statistics
from conftest import device_params


def direct(codes: torch.Tensor):
    """The statistics of real codes from the ±1 matrix, bit by bit in NumPy."""
    signs = np.where(codes.cpu().numpy() > 0, 1.0, -1.0)
    n, bits = signs.shape
    ones = (signs > 0).mean(0)
    entropy = np.array([0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) for p in ones])
    corr = np.eye(bits)
    for i in range(bits):
        for j in range(bits):
            if i != j and signs[:, i].std() > 0 and signs[:, j].std() > 0:
                corr[i, j] = np.corrcoef(signs[:, i], signs[:, j])[0, 1]
    distinct = len({tuple(row) for row in signs.tolist()})
    return ones, entropy, corr, distinct


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("nbits", [1, 7, 64, 70])
def test_matches_the_formulas(device, nbits):
    gen = torch.Generator().manual_seed(nbits)
    base = torch.randn(300, nbits, generator=gen)
    base[:, 0] = base[:, -1] * 0.5 + torch.randn(300, generator=gen) * 0.3  # correlated bits (one when nbits = 1)
    if nbits > 2:
        base[:, 1] = 1.0  # a constant bit
    base[100:150] = base[:50]  # repeated codes
    ones, entropy, corr, distinct = direct(base)
    got = code_statistics(base.to(device))
    torch.testing.assert_close(got["ones_share"], torch.from_numpy(ones), rtol=0, atol=1e-12)
    torch.testing.assert_close(got["bit_entropy"], torch.from_numpy(entropy), rtol=0, atol=1e-12)
    torch.testing.assert_close(got["correlation"], torch.from_numpy(corr), rtol=0, atol=1e-10)
    assert got["mean_bit_entropy"] == pytest.approx(entropy.mean(), abs=1e-12)
    assert got["mean_imbalance"] == pytest.approx(np.abs(2 * ones - 1).mean(), abs=1e-12)
    off = ~np.eye(nbits, dtype=bool)
    assert got["mean_abs_correlation"] == pytest.approx(np.abs(corr[off]).mean() if nbits > 1 else 0.0, abs=1e-10)
    assert got["distinct_codes"] == distinct and got["distinct_share"] == distinct / 300
    if nbits > 2:
        assert got["bit_entropy"][1] == 0 and torch.equal(got["correlation"][1, 2:], torch.zeros(nbits - 2,
                                                                                               dtype=torch.float64))


def test_packed_codes_chunks_and_padding(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    codes = torch.randn(1000, 21, generator=gen)
    whole = code_statistics(codes)
    packed = brcd.pack_codes(codes)
    packed[:, -1] |= 0b11100000  # bits past the 21st: not part of the codes
    monkeypatch.setattr(cs_module, "_CHUNK_ROWS", 77)
    got = code_statistics(packed, nbits=21)
    for key in ("ones_share", "bit_entropy", "correlation"):
        torch.testing.assert_close(got[key], whole[key], rtol=0, atol=1e-12)
    assert got["distinct_codes"] == whole["distinct_codes"]


def test_ideal_and_degenerate_codes():
    # Every 10-bit pattern once: balanced, independent, distinct.
    patterns = torch.tensor([[(v >> b) & 1 for b in range(10)] for v in range(1024)]) * 2 - 1
    ideal = code_statistics(patterns)
    assert ideal["mean_bit_entropy"] == 1.0 and ideal["mean_imbalance"] == 0.0
    assert ideal["mean_abs_correlation"] < 1e-12 and ideal["distinct_share"] == 1.0
    same = code_statistics(torch.ones(50, 8))
    assert same["mean_bit_entropy"] == 0.0 and same["mean_imbalance"] == 1.0 and same["distinct_codes"] == 1
    assert torch.equal(same["correlation"], torch.eye(8, dtype=torch.float64))


def test_bad_input():
    with pytest.raises(TypeError, match="codes"):
        code_statistics([[1, -1]])
    with pytest.raises(ValueError, match="at least two"):
        code_statistics(torch.randn(1, 8))
    with pytest.raises(ValueError, match="nbits is required"):
        code_statistics(brcd.pack_codes(torch.randn(5, 8)))
    with pytest.raises(ValueError, match="nbits"):
        code_statistics(brcd.pack_codes(torch.randn(5, 8)), nbits=9)
    with pytest.raises(ValueError, match="nbits is 7"):
        code_statistics(torch.randn(5, 8), nbits=7)
    with pytest.raises(TypeError, match="nbits"):
        code_statistics(torch.randn(5, 8), nbits=8.0)
