"""The benchmarks' inputs and the original evaluation loop, shared by the scripts (run_cpu.py, gpu_bench.py) and the
pytest-benchmark suite (test_bench.py): every table and every suite run measures the same kind of data."""
from __future__ import annotations

import numpy as np
import torch

import brcd


def loss_case(B: int, K: int = 64, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Codes and keyword arguments of one BRCD loss step as distillation calls it: a bit mask (80 % of bits kept),
    false-negative groups from 10 clusters, a per-sample alpha (1 for about 30 % of the samples, else 0.8)."""
    g = torch.Generator(device=device).manual_seed(seed)
    s, ta, tv = (torch.randn(B, K, generator=g, device=device, dtype=dtype) for _ in range(3))
    clusters = torch.randint(0, 10, (B,), generator=g, device=device)
    kw = dict(temperature=0.3,
              alpha=(torch.rand(B, generator=g, device=device) < 0.3).to(dtype) * 0.2 + 0.8,
              bit_mask=(torch.rand(B, K, generator=g, device=device) < 0.8).to(dtype),
              row_groups=torch.cat([clusters, clusters]), col_groups=torch.cat([clusters, clusters]))
    return s, ta, tv, kw


def fused_loss(student, teacher_anchor, teacher_view, **kw):
    """brcd_loss as the benchmarks time it: like the eager reference (and the trainer), without checking that a
    per-sample alpha lies in [0, 1]; on a GPU that check reads its answer back, a device synchronisation per call (the
    GPU table times the checked call in a column of its own). On the CPU the op checks alpha regardless, for free."""
    return brcd.brcd_loss(student, teacher_anchor, teacher_view, check_alpha=False, **kw)


def loss_step(fn, s, ta, tv, kw, view_grad: bool = True):
    """One timed step of a loss implementation: forward and backward from fresh leaves, with gradients for the student
    and (view_grad) the teacher's second view; without it, the distillation step, where the teacher's codes are
    frozen. The step returns the loss and the student's gradient."""
    def run():
        a, b = s.detach().requires_grad_(), tv.detach().requires_grad_(view_grad)
        loss = fn(a, ta, b, **kw)
        loss.backward()
        return loss, a.grad
    return run


def packed_codes(n: int, nbits: int, seed: int = 0) -> torch.Tensor:
    """Uniformly random packed codes [n, nbits / 8] (uint8, the faiss and numpy.packbits layout)."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, size=(n, nbits // 8), dtype=np.uint8))


def map_case(q_count: int, n: int, nbits: int = 64, classes: int = 10, seed: int = 0):
    """±1 codes with class structure (each code is its class centre with 30 % of its bits flipped) and integer class
    labels: (query codes, database codes, query labels, database labels)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, nbits, generator=g).sign()
    ql, dl = torch.randint(0, classes, (q_count,), generator=g), torch.randint(0, classes, (n,), generator=g)
    flip = lambda m: torch.where(torch.rand(m, nbits, generator=g) < 0.3, -1.0, 1.0)
    return centers[ql] * flip(q_count), centers[dl] * flip(n), ql, dl


def one_hot(labels: torch.Tensor, classes: int) -> np.ndarray:
    return torch.nn.functional.one_hot(labels, classes).numpy().astype(np.float32)


def original_map(q_codes: np.ndarray, db_codes: np.ndarray, q_labels: np.ndarray, db_labels: np.ndarray, topk: int,
                 kind: str = "quicksort") -> float:
    """The original evaluation loop: per query, distances by a ±1 dot product, one argsort, AP over the top k."""
    nbits = q_codes.shape[1]
    total = 0.0
    for i in range(q_codes.shape[0]):
        relevant = (q_labels[i] @ db_labels.T > 0).astype(np.float32)
        dist = 0.5 * (nbits - q_codes[i] @ db_codes.T)
        order = np.argsort(dist, kind=kind)
        hits = relevant[order][:topk]
        count = int(hits.sum())
        if count == 0:
            continue
        ranks = np.arange(1, count + 1)
        positions = np.nonzero(hits)[0] + 1.0
        total += float(np.mean(ranks / positions))
    return total / q_codes.shape[0]
