"""Statistics of a set of binary codes: how balanced, how independent and how distinct their bits are.

Hashing methods aim for bits that split the data evenly (balance, entropy), carry different information
(decorrelation) and give distinct items distinct codes; BRCD's bit mask exists because some bits are redundant.
These numbers show how far a model's codes are from that.

>>> stats = brcd.code_statistics(torch.randn(1000, 64))
>>> stats["mean_bit_entropy"], stats["mean_abs_correlation"], stats["distinct_share"]
"""
from __future__ import annotations

import numbers
from typing import Dict, Optional, Union

import torch
from torch import Tensor

from .ops import pack_codes, unpack_codes

__all__ = ["code_statistics"]

# Codes unpacked at a time (8 bytes per bit each).
_CHUNK_ROWS = 65536


def code_statistics(codes: Tensor, nbits: Optional[int] = None) -> Dict[str, Union[float, int, Tensor]]:
    """Bit balance, entropy, correlation and distinctness of codes [n, nbits] (real: bit = value > 0) or of packed
    codes uint8 [n, ceil(nbits / 8)] (then ``nbits`` is required), n >= 2.

    Returns:
        ones_share: float64 [nbits], the share of codes with each bit set.
        bit_entropy: float64 [nbits], each bit's binary entropy in bits (1: an even split, 0: a constant bit).
        mean_bit_entropy: their mean.
        mean_imbalance: mean over bits of |2 * ones_share - 1| (0: every bit splits the codes evenly).
        correlation: float64 [nbits, nbits], Pearson correlation of the bits over the codes (0 where a bit is
            constant, 1 on the diagonal).
        mean_abs_correlation: mean |correlation| over the pairs of distinct bits.
        distinct_codes: how many different codes there are; distinct_share: that over n.
    """
    if not isinstance(codes, Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dim() != 2 or codes.shape[0] < 2:
        raise ValueError(f"codes must be 2-D with at least two codes, got shape {tuple(codes.shape)}")
    if nbits is not None and (isinstance(nbits, bool) or not isinstance(nbits, numbers.Integral)):
        raise TypeError(f"nbits must be an int, got {type(nbits).__name__}")
    if codes.dtype == torch.uint8:
        if nbits is None:
            raise ValueError("nbits is required with packed (uint8) codes")
        if not 1 <= nbits <= 8 * codes.shape[1]:
            raise ValueError(f"nbits must be an integer in [1, {8 * codes.shape[1]}], got {nbits}")
        packed = codes[:, : (nbits + 7) // 8].clone()
        if nbits % 8:  # bits past nbits are not part of the codes
            packed[:, -1] &= (1 << (nbits % 8)) - 1
    else:
        if nbits is not None and nbits != codes.shape[1]:
            raise ValueError(f"nbits is {nbits} but the codes have {codes.shape[1]} columns")
        nbits = codes.shape[1]
        packed = pack_codes(codes)
    n = packed.shape[0]
    # The sum and Gram matrix of the ±1 codes, a chunk of rows at a time: the ±1 matrix itself would take 8 bytes
    # per bit of every code (512 MiB for a million 64-bit codes).
    total = torch.zeros(nbits, dtype=torch.float64, device=packed.device)
    gram = torch.zeros(nbits, nbits, dtype=torch.float64, device=packed.device)
    for r0 in range(0, n, _CHUNK_ROWS):
        signs = unpack_codes(packed[r0 : r0 + _CHUNK_ROWS], nbits, dtype=torch.float64)
        total += signs.sum(0)
        gram += signs.T @ signs
    mean = total / n
    ones = (1 + mean) / 2
    p = ones.clamp(1e-300, 1)
    q = (1 - ones).clamp(1e-300, 1)
    entropy = torch.where((ones > 0) & (ones < 1), -(ones * p.log2() + (1 - ones) * q.log2()), torch.zeros_like(ones))
    covariance = gram / n - mean[:, None] * mean[None, :]
    spread = covariance.diagonal().clamp_min(0).sqrt()
    constant = spread == 0  # every code has the same bit there: no correlation to speak of
    safe = torch.where(constant, torch.ones_like(spread), spread)
    correlation = (covariance / safe[:, None] / safe[None, :]).clamp(-1, 1)
    correlation = correlation.masked_fill(constant[:, None] | constant[None, :], 0.0)
    correlation.fill_diagonal_(1.0)
    off_diagonal = ~torch.eye(nbits, dtype=torch.bool, device=correlation.device)
    mean_abs = float(correlation.abs()[off_diagonal].mean()) if nbits > 1 else 0.0
    distinct = int(torch.unique(packed, dim=0).shape[0])
    return {
        "ones_share": ones.cpu(),
        "bit_entropy": entropy.cpu(),
        "mean_bit_entropy": float(entropy.mean()),
        "mean_imbalance": float((2 * ones - 1).abs().mean()),
        "correlation": correlation.cpu(),
        "mean_abs_correlation": mean_abs,
        "distinct_codes": distinct,
        "distinct_share": distinct / n,
    }
