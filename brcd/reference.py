"""Pure-PyTorch twins of every brcd op: the executable spec (shared/spec/contrastive-loss.md) the kernels are
tested against. Simple and materialising (O(B^2) or O(q*n) memory): for tests and small inputs only."""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

EPS = 1e-8


def pack_codes(codes: Tensor) -> Tensor:
    bits = (codes > 0).cpu().numpy()
    return torch.from_numpy(np.packbits(bits, axis=1, bitorder="little")).to(codes.device)


def hamming_distance(query_packed: Tensor, db_packed: Tensor) -> Tensor:
    q = np.unpackbits(query_packed.cpu().numpy(), axis=1).astype(np.int32)
    d = np.unpackbits(db_packed.cpu().numpy(), axis=1).astype(np.int32)
    dist = q @ (1 - d).T + (1 - q) @ d.T
    return torch.from_numpy(dist.astype(np.int32))


def hamming_topk(query_packed: Tensor, db_packed: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    dist = hamming_distance(query_packed, db_packed).to(torch.int64)
    n = dist.shape[1]
    # Sort by (distance, index): a stable sort on distance keeps index order among ties.
    key = dist * n + torch.arange(n)
    order = torch.argsort(key, dim=1)[:, :k]
    return torch.gather(dist, 1, order).to(torch.int32), order


def hamming_range_search(query_packed: Tensor, db_packed: Tensor, radius: int) -> Tuple[Tensor, Tensor, Tensor]:
    dist = hamming_distance(query_packed, db_packed)
    lims, dists, idxs = [0], [], []
    for row in dist.tolist():
        hits = sorted((d, j) for j, d in enumerate(row) if d <= radius)
        lims.append(lims[-1] + len(hits))
        dists += [d for d, _ in hits]
        idxs += [j for _, j in hits]
    return (torch.tensor(lims, dtype=torch.int64), torch.tensor(dists, dtype=torch.int32),
            torch.tensor(idxs, dtype=torch.int64))


def _cos_matrix(z: Tensor) -> Tensor:
    zn = z / z.norm(dim=1, keepdim=True).clamp_min(EPS)
    return zn @ zn.T


def brcd_loss(
    student: Tensor,
    teacher_anchor: Tensor,
    teacher_view: Tensor,
    *,
    temperature: float = 0.3,
    alpha: Union[float, Tensor] = 0.8,
    bit_mask: Optional[Tensor] = None,
    row_groups: Optional[Tensor] = None,
    col_groups: Optional[Tensor] = None,
) -> Tensor:
    B = student.shape[0]
    n2 = 2 * B
    if not isinstance(alpha, Tensor):
        alpha = torch.full((B,), float(alpha), dtype=student.dtype, device=student.device)
    alpha = alpha.to(student.dtype).expand(B)
    mask = torch.ones_like(student) if bit_mask is None else bit_mask.to(student.dtype)
    z = torch.cat([mask * student, mask * teacher_view], dim=0)
    logits = _cos_matrix(z) / temperature
    a = torch.arange(n2, device=student.device)
    partner = (a + B) % n2
    individual = torch.nn.functional.cosine_similarity(student, teacher_anchor, dim=1, eps=EPS) / temperature
    alpha2 = torch.cat([alpha, alpha])
    pos = alpha2 * torch.cat([individual, individual]) + (1 - alpha2) * logits[a, partner]
    drop = torch.eye(n2, dtype=torch.bool, device=student.device)
    drop[a, partner] = True
    if row_groups is not None:
        same = row_groups[:, None] == col_groups[None, :]
        drop |= same & (row_groups[:, None] >= 0)
    neg = logits.masked_fill(drop, float("-inf"))
    lse = torch.logsumexp(torch.cat([pos[:, None], neg], dim=1), dim=1)
    return (lse - pos).mean()


def ntxent_loss(view_a: Tensor, view_b: Tensor, *, temperature: float = 0.3) -> Tensor:
    return brcd_loss(view_a, view_a, view_b, temperature=temperature, alpha=0.0)


def relevance(query_labels: Tensor, db_labels: Tensor) -> Tensor:
    """[q, n] bool: a shared label (multi-hot dot > 0), or equal class ids for 1-D integer labels."""
    if query_labels.dim() == 1:
        return query_labels[:, None] == db_labels[None, :]
    return (query_labels.double() @ db_labels.double().T) > 0


def mean_average_precision(query_codes: Tensor, db_codes: Tensor, query_labels: Tensor, db_labels: Tensor,
                           topk: Optional[int] = None) -> float:
    """mAP@topk by the spec: one ranking per query, ties to the smaller database index."""
    qp, dp = pack_codes(query_codes), pack_codes(db_codes)
    n = dp.shape[0]
    k = n if topk is None else min(topk, n)
    _, idx = hamming_topk(qp, dp, k)
    rel = relevance(query_labels.cpu(), db_labels.cpu())
    aps = []
    for qi in range(qp.shape[0]):
        r = rel[qi, idx[qi]].double()
        hits = r.sum()
        if hits == 0:
            aps.append(0.0)
            continue
        ranks = torch.cumsum(r, 0)
        pos = torch.arange(1, k + 1, dtype=torch.float64)
        aps.append(float((ranks / pos * r).sum() / hits))
    return float(np.mean(aps))


def precision_recall_at_k(query_codes: Tensor, db_codes: Tensor, query_labels: Tensor, db_labels: Tensor,
                          max_k: int) -> Tuple[Tensor, Tensor]:
    """Precision@N and recall@N for N = 1..min(max_k, n), query by query in Python floats: precision over every query,
    recall over the queries with a relevant database item."""
    qp, dp = pack_codes(query_codes), pack_codes(db_codes)
    k = min(max_k, dp.shape[0])
    _, idx = hamming_topk(qp, dp, k)
    rel = relevance(query_labels.cpu(), db_labels.cpu())
    precision, recall, counted = [0.0] * k, [0.0] * k, 0
    for qi in range(qp.shape[0]):
        ranked = rel[qi, idx[qi]].tolist()
        total = int(rel[qi].sum())
        counted += total > 0
        hits = 0
        for n in range(k):
            hits += ranked[n]
            precision[n] += hits / (n + 1)
            if total:
                recall[n] += hits / total
    q = max(qp.shape[0], 1)
    return (torch.tensor(precision, dtype=torch.float64) / q,
            torch.tensor(recall, dtype=torch.float64) / max(counted, 1))


def ndcg_at_k(query_codes: Tensor, db_codes: Tensor, query_labels: Tensor, db_labels: Tensor, k: int) -> float:
    """NDCG@k with gains 2^(shared labels) - 1, query by query: the ranking a stable sort of Hamming distances
    counted bit by bit, the ideal ranking the database sorted by shared labels."""
    qb, db = query_codes.cpu() > 0, db_codes.cpu() > 0
    ql, dl = query_labels.cpu(), db_labels.cpu()
    if ql.dim() == 1 and dl.dim() == 1:
        shared = (ql[:, None] == dl[None, :]).double()
    else:
        classes = (dl if dl.dim() == 2 else ql).shape[1]
        hot = lambda x: x if x.dim() == 2 else torch.nn.functional.one_hot(x.long(), classes)
        shared = (hot(ql) > 0).double() @ (hot(dl) > 0).double().T
    total = 0.0
    for qi in range(qb.shape[0]):
        distances = (qb[qi][None, :] != db).sum(dim=1)
        order = torch.argsort(distances, stable=True)[:k].tolist()
        gains = [2.0 ** float(shared[qi, j]) - 1 for j in order]
        ideal = sorted((2.0 ** float(r) - 1 for r in shared[qi]), reverse=True)[:k]
        dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains))
        best = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
        total += dcg / best if best > 0 else 0.0
    return total / qb.shape[0]
