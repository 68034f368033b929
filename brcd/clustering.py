"""k-means over the teacher's codes, per-cluster bit masks and the groups of the BRCD loss.

Semantics: shared/spec/contrastive-loss.md ("How the original code builds the groups", "The bit mask").

>>> centroids, assign, inertia = kmeans(teacher_codes, num_clusters=50, seed=0)
>>> masks = bit_masks(teacher_codes, assign, 50, margin=0.1)        # [50, K] of 0/1
>>> view_clusters = nearest_centroid(teacher_view_codes, centroids)
>>> rg, cg, alpha = negative_groups(assign[idx], view_clusters, base_alpha=0.8, mode="offset+fn")
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["KMeansResult", "kmeans", "nearest_centroid", "bit_masks", "negative_groups", "GROUP_MODES"]

# How negatives are dropped and positives distrusted (the paper's ablations):
#   "none"       no groups, alpha as given
#   "fn"         false negatives only: g_r = g_c = [c; c]
#   "offset"     offset positives only: no groups, alpha = 1 where c' != c
#   "offset+fn"  the full method: g_r = [c; c], g_c = [c; c'], alpha = 1 where c' != c
GROUP_MODES = ("none", "fn", "offset", "offset+fn")

_CHUNK = 1 << 14


@dataclass
class KMeansResult:
    centroids: Tensor  # [k, K] float
    assignments: Tensor  # [n] int64
    inertia: float  # sum of squared distances to the assigned centroids

    def __iter__(self):  # unpacks as (centroids, assignments, inertia)
        return iter((self.centroids, self.assignments, self.inertia))


def _check_codes(codes, name: str) -> Tensor:
    if not isinstance(codes, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dim() != 2 or codes.shape[0] == 0 or codes.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D tensor [n, bits], got shape {tuple(codes.shape)}")
    if not codes.is_floating_point():
        codes = codes.float()
    return codes


def _sq_dist_argmin(x: Tensor, centroids: Tensor) -> Tuple[Tensor, Tensor]:
    """Nearest centroid and squared distance for each row of x, in chunks (no n x k x K tensor)."""
    c_norm = (centroids * centroids).sum(1)
    best_i, best_d = [], []
    for i in range(0, x.shape[0], _CHUNK):
        xs = x[i : i + _CHUNK]
        d = (xs * xs).sum(1, keepdim=True) - 2 * xs @ centroids.T + c_norm
        v, j = d.min(dim=1)
        best_i.append(j)
        best_d.append(v.clamp_min(0))
    return torch.cat(best_i), torch.cat(best_d)


def _plus_plus_init(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """Greedy k-means++: each new centre is the best (lowest total potential) of a few D^2-sampled candidates.

    Plain k-means++ often puts two centres in one tight cluster of binary codes; the greedy variant (as in
    scikit-learn, 2 + log k candidates a step) rarely does.
    """
    n = x.shape[0]
    trials = 2 + int(math.log(k)) if k > 1 else 1
    first = torch.randint(n, (1,), generator=gen).item()
    chosen = [first]
    x_norm = (x * x).sum(1)
    _, d = _sq_dist_argmin(x, x[first : first + 1])
    for _ in range(1, k):
        total = float(d.sum())
        if total <= 0:  # every point coincides with a centre: any point will do
            candidates = torch.randint(n, (trials,), generator=gen)
        else:
            candidates = torch.multinomial((d / total).cpu(), trials, replacement=True, generator=gen)
        # Every candidate's squared distances in one product (a pass over x per candidate made this init most of
        # the fit's time: 2.3 s of 2.5 s per start for 50,000 codes and 100 clusters); the first of equal
        # potentials wins, as one at a time.
        c = x[candidates.to(x.device)]
        d_c = (x_norm[:, None] - 2 * x @ c.T + (c * c).sum(1)).clamp_min_(0)
        d_new = torch.minimum(d[:, None], d_c)
        best = int(d_new.sum(0, dtype=torch.float64).argmin())
        chosen.append(int(candidates[best]))
        d = d_new[:, best].contiguous()
    return x[torch.tensor(chosen, device=x.device)]


def kmeans(codes: Tensor, num_clusters: int, *, restarts: int = 3, iterations: int = 50, seed: int = 0,
           tol: float = 1e-6, progress: bool = False) -> KMeansResult:
    """Lloyd's k-means with k-means++ starts; the best of `restarts` runs by inertia. Runs on the codes' device.

    An emptied cluster is re-seeded with the point farthest from its centroid, so every cluster ends non-empty.
    """
    x = _check_codes(codes, "codes")
    n = x.shape[0]
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or not 1 <= num_clusters <= n:
        raise ValueError(f"num_clusters must be an integer between 1 and the number of codes {n}, got {num_clusters!r}")
    if restarts < 1 or iterations < 1:
        raise ValueError("restarts and iterations must be at least 1")
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    best: Optional[KMeansResult] = None
    for _ in tqdm(range(restarts), desc=f"k-means ({num_clusters} clusters)", disable=not progress, leave=False):
        centroids = _plus_plus_init(x, num_clusters, gen)
        prev = float("inf")
        for _ in range(iterations):
            assign, d = _sq_dist_argmin(x, centroids)
            counts = torch.bincount(assign, minlength=num_clusters)
            sums = torch.zeros_like(centroids).index_add_(0, assign, x)
            new = sums / counts.clamp_min(1).unsqueeze(1).to(x.dtype)
            empty = (counts == 0).nonzero().flatten()
            if len(empty):
                far = torch.argsort(d, descending=True)[: len(empty)]
                new[empty] = x[far]
            centroids = new
            inertia = float(d.sum())
            if prev - inertia <= tol * max(prev, 1.0) and not len(empty):
                break
            prev = inertia
        assign, d = _sq_dist_argmin(x, centroids)
        result = KMeansResult(centroids, assign, float(d.sum()))
        if best is None or result.inertia < best.inertia:
            best = result
    return best


def nearest_centroid(codes: Tensor, centroids: Tensor) -> Tensor:
    """The index of the nearest centroid (squared Euclidean; Hamming for ±1 codes) of every code: int64 [n]."""
    x = _check_codes(codes, "codes")
    c = _check_codes(centroids, "centroids")
    if x.shape[1] != c.shape[1]:
        raise ValueError(f"codes have {x.shape[1]} bits but centroids have {c.shape[1]}")
    return _sq_dist_argmin(x, c.to(device=x.device, dtype=x.dtype))[0]


def bit_masks(codes: Tensor, assignments: Tensor, num_clusters: int, margin: float = 0.1) -> Tensor:
    """Per-cluster bit masks [num_clusters, K]: 1 where the cluster's mean ±1 code has |mean| > margin.

    Bits that flip inside a cluster (mean near 0) are the redundant ones and are dropped. This is the rule the
    original release intended; its script turned every entry into 0 (see the spec). A cluster with no code keeps
    every bit.
    """
    x = _check_codes(codes, "codes")
    if not isinstance(assignments, Tensor) or assignments.shape != (x.shape[0],):
        raise ValueError(f"assignments must be a tensor of shape [{x.shape[0]}]")
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must lie in [0, 1), got {margin}")
    signs = torch.where(x > 0, 1.0, -1.0).to(x.dtype)
    a = assignments.to(x.device).long()
    if len(a) and (int(a.min()) < 0 or int(a.max()) >= num_clusters):
        raise ValueError(f"assignments must lie in [0, {num_clusters})")
    sums = torch.zeros(num_clusters, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, a, signs)
    counts = torch.bincount(a, minlength=num_clusters).to(x.dtype).unsqueeze(1)
    mean = sums / counts.clamp_min(1)
    masks = (mean.abs() > margin).to(x.dtype)
    masks[counts.squeeze(1) == 0] = 1.0
    return masks


def negative_groups(clusters: Tensor, view_clusters: Tensor, *, base_alpha: float = 0.8,
                    mode: str = "offset+fn") -> Tuple[Optional[Tensor], Optional[Tensor], Tensor]:
    """(row_groups, col_groups, alpha) of one batch for brcd_loss, as the original code builds them.

    clusters: c(k), the k-means cluster of each sample's training image; view_clusters: c'(k), the nearest centroid
    of the teacher's view-2 code. Returns [2B] int64 groups (None for mode "none") and a [B] alpha.
    """
    if mode not in GROUP_MODES:
        raise ValueError(f"mode must be one of {GROUP_MODES}, got {mode!r}")
    if not 0.0 <= float(base_alpha) <= 1.0:  # (NaN fails too) the alpha built here is trusted without a device sync
        raise ValueError(f"base_alpha must lie in [0, 1], got {base_alpha}")
    if clusters.shape != view_clusters.shape or clusters.dim() != 1:
        raise ValueError("clusters and view_clusters must be 1-D tensors of the same length")
    c, cv = clusters.long(), view_clusters.long().to(clusters.device)
    alpha = torch.full(c.shape, float(base_alpha), device=c.device)
    if mode == "none":
        return None, None, alpha
    rows = torch.cat([c, c])
    if mode == "fn":
        return rows, rows.clone(), alpha
    alpha = torch.where(cv != c, torch.ones_like(alpha), alpha)
    if mode == "offset":
        return None, None, alpha
    return rows, torch.cat([c, cv]), alpha
