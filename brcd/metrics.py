"""Retrieval metrics for binary codes (semantics: shared/spec/contrastive-loss.md).

Codes may be real-valued (bit = code > 0, e.g. ±1) or packed uint8 from :func:`brcd.pack_codes`.
Labels may be integer class ids [n], or one-hot / multi-hot [n, C]; an item is relevant to a query when they share
a label. Rankings are by ascending Hamming distance with ties to the smaller database index. With ``topk`` given,
the q x n distance matrix is never built: the fused top-k kernel ranks the database.

Both search paradigms are a choice of arguments: symmetric (student codes for queries and database) and
asymmetric (student queries against a teacher-encoded database); see :func:`evaluate_paradigms`.
"""
from __future__ import annotations

import numbers
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .ops import _check_radius, hamming_distance, hamming_topk, pack_codes

__all__ = [
    "mean_average_precision",
    "average_precisions",
    "precision_at_k",
    "precision_recall_at_k",
    "precision_recall_curve",
    "precision_within_radius",
    "ndcg_at_k",
    "retrieval_scores",
    "evaluate_paradigms",
]

# Bound on the per-chunk working set (ranked ids, distances, relevance) of the metric loops.
_CHUNK_BYTES = 256 * 2**20


def _packed(codes, name: str) -> Tensor:
    if not isinstance(codes, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dim() != 2:
        raise ValueError(f"{name} must be 2-D [n, nbits] codes or [n, nbytes] packed codes, got {tuple(codes.shape)}")
    return codes if codes.dtype == torch.uint8 else pack_codes(codes)


def _labels(labels, name: str, n: int) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() not in (1, 2):
        raise ValueError(f"{name} must be class ids [n] or (multi-)hot labels [n, C], got {tuple(labels.shape)}")
    if labels.shape[0] != n:
        raise ValueError(f"{name} has {labels.shape[0]} rows but there are {n} codes")
    if labels.dim() == 1 and (labels.is_floating_point() or labels.dtype == torch.bool):
        raise TypeError(f"{name}: 1-D labels must be integer class ids, got {labels.dtype}")
    return labels


def _prepare(query_codes, db_codes, query_labels, db_labels):
    qp, dp = _packed(query_codes, "query_codes"), _packed(db_codes, "db_codes")
    if qp.shape[1] != dp.shape[1]:
        raise ValueError(f"query_codes and db_codes differ in bit count ({qp.shape[1]} vs {dp.shape[1]} bytes)")
    if dp.shape[0] == 0:
        raise ValueError("db_codes is empty")
    if qp.shape[0] == 0:
        raise ValueError("query_codes is empty: there is nothing to average over")
    ql = _labels(query_labels, "query_labels", qp.shape[0])
    dl = _labels(db_labels, "db_labels", dp.shape[0])
    if ql.dim() != dl.dim():  # class ids against multi-hot: lift the ids to one-hot
        classes = (dl if dl.dim() == 2 else ql).shape[1]
        ql, dl = [torch.nn.functional.one_hot(x.long(), classes) if x.dim() == 1 else x for x in (ql, dl)]
    elif ql.dim() == 2 and ql.shape[1] != dl.shape[1]:
        raise ValueError(f"query_labels has {ql.shape[1]} classes but db_labels has {dl.shape[1]}")
    # Compact label types: the relevance pass gathers one label row per ranked item.
    if ql.dim() == 1:
        lo, hi = int(min(ql.min(), dl.min())), int(max(ql.max(), dl.max()))
        narrow = torch.uint8 if 0 <= lo and hi < 256 else (torch.int32 if -2**31 <= lo and hi < 2**31 else ql.dtype)
        ql, dl = ql.to(narrow), dl.to(narrow)
    else:
        ql, dl = ql > 0, dl > 0
    dev = dp.device
    return qp.to(dev), dp, ql.to(dev), dl.to(dev)


class _DatabaseLabels:
    """The database's labels, prepared to answer for chunks of queries without a [q, n, C] broadcast (see
    :class:`_ChunkLabels`).

    Class ids: a query's relevant items are its class, whose size is counted once. Multi-hot rows: the distinct label
    rows, each with its multiplicity (a multi-label set has far fewer distinct rows than images: a few labels of 21
    or 80 each); a matmul of 0/1 rows counts the labels each shares with a query exactly (float32 holds integers to
    2^24), and sums weighted by multiplicity count the items."""

    def __init__(self, dl: Tensor):
        self.labels = dl
        if dl.dim() == 1:
            self.classes, self.class_sizes = torch.unique(dl, return_counts=True)
        else:
            rows, self.row_of_item, self.multiplicity = torch.unique(dl, dim=0, return_inverse=True,
                                                                     return_counts=True)
            self.rows = rows.float()
            self.most_labels = int(rows.sum(dim=1).max())  # no item shares more labels with a query

    def bytes_per_query(self) -> int:
        """The working set of a query in a chunk: its shared-label counts with every distinct row (float and int64)."""
        return 0 if self.labels.dim() == 1 else 12 * self.rows.shape[0]

    def of(self, queries: Tensor) -> "_ChunkLabels":
        return _ChunkLabels(self, queries)


class _ChunkLabels:
    """What a chunk of queries asks of the database's labels: which items are relevant to each query (share a label
    with it), how many labels ranked items share, how many items are relevant, and each query's ideal DCG. Multi-hot
    labels count the labels each distinct row shares with each query once per chunk, for all of them."""

    def __init__(self, database: _DatabaseLabels, queries: Tensor):
        self.database, self.queries = database, queries
        self._by_row = None

    def _shared_by_row(self) -> Tensor:
        """How many labels each distinct database row shares with each query (float [q, rows], integers)."""
        if self._by_row is None:
            self._by_row = self.queries.float() @ self.database.rows.T
        return self._by_row

    def relevant(self) -> Tensor:
        """Whether each database item is relevant to each query (bool [q, n])."""
        db = self.database
        if db.labels.dim() == 1:
            return db.labels[None, :] == self.queries[:, None]
        return (self._shared_by_row() > 0)[:, db.row_of_item]

    def ranked_shared(self, ranked: Tensor) -> Tensor:
        """How many labels each ranked item shares with its query (int32 [q, k]; 0 or 1 for class ids): ranked holds
        the items' indices [q, k]."""
        db = self.database
        if db.labels.dim() == 1:
            return (db.labels[ranked] == self.queries[:, None]).to(torch.int32)
        return self._shared_by_row().gather(1, db.row_of_item[ranked]).to(torch.int32)

    def relevant_counts(self) -> Tensor:
        """How many database items are relevant to each query (int64 [q])."""
        db = self.database
        if db.labels.dim() == 1:
            at = torch.searchsorted(db.classes, self.queries).clamp_(max=len(db.classes) - 1)
            return torch.where(db.classes[at] == self.queries, db.class_sizes[at], 0)
        return db.labels.shape[0] - self._items_by_shared()[:, 0]

    def ideal_dcgs(self, discounts: Tensor) -> Tensor:
        """Each query's ideal DCG@k (k = len(discounts); gain 2^r - 1 for an item sharing r labels): the database's
        items in descending r. The items sharing at least r labels take the first positions, so the ideal sums, for
        r from the largest down, gain 2^r - 1 over positions [items sharing > r, items sharing >= r), from prefix sums
        of the discounts: no sort of the database."""
        k = discounts.shape[0]
        before = torch.cat([discounts.new_zeros(1), discounts.cumsum(0)])  # before[i]: the discounts of positions < i
        if self.database.labels.dim() == 1:  # the items of the query's class, gain 1 each
            return before[self.relevant_counts().clamp_(max=k)]
        at_least = self._items_by_shared().flip(1).cumsum(1).flip(1)  # [:, r]: items sharing >= r labels
        ideal = torch.zeros(self.queries.shape[0], dtype=torch.float64, device=discounts.device)
        filled = torch.zeros(self.queries.shape[0], dtype=torch.int64, device=discounts.device)
        for r in range(self.database.most_labels, 0, -1):
            upto = at_least[:, r].clamp(max=k)
            ideal += (2.0**r - 1) * (before[upto] - before[filled])
            filled = upto
        return ideal

    def _items_by_shared(self) -> Tensor:
        """How many database items share exactly r labels with each query: int64 [q, most_labels + 1], column r; a
        histogram of the distinct rows' shared counts weighted by their multiplicities."""
        db = self.database
        shared = self._shared_by_row().long()
        counts = torch.zeros((shared.shape[0], db.most_labels + 1), dtype=torch.int64, device=shared.device)
        return counts.scatter_add_(1, shared, db.multiplicity.expand(shared.shape[0], -1))


def _ranked_chunks(qp: Tensor, dp: Tensor, ql: Tensor, database: _DatabaseLabels, k: int):
    """The top-k op's rankings of chunks of queries: (the chunk's labels (_ChunkLabels), how many labels each ranked
    item shares with its query [q, k], their relevance [q, k])."""
    step = max(1, _CHUNK_BYTES // (k * 24 + database.bytes_per_query()))
    for q0 in range(0, qp.shape[0], step):
        _, idx = hamming_topk(qp[q0 : q0 + step], dp, k)
        chunk = database.of(ql[q0 : q0 + step])
        shared = chunk.ranked_shared(idx)
        yield chunk, shared, shared > 0


def average_precisions(query_codes, db_codes, query_labels, db_labels, topk: Optional[int] = None) -> Tensor:
    """AP@topk of every query (float64 [q]); a query with nothing relevant in its top k scores 0."""
    qp, dp, ql, dl = _prepare(query_codes, db_codes, query_labels, db_labels)
    n = dp.shape[0]
    if topk is not None:
        topk = _check_cutoff(topk, None, "topk", or_none=True)
    k = n if topk is None else min(topk, n)
    if dp.device.type == "cpu":  # one fused pass: candidates below the k-th distance, AP without a sort
        return torch.ops.brcd.average_precision(qp, dp, ql, dl, k)
    return _average_precisions_by_ops(qp, dp, ql, dl, k)


def _average_precisions_by_ops(qp: Tensor, dp: Tensor, ql: Tensor, dl: Tensor, k: int) -> Tensor:
    """average_precisions from the top-k op's rankings and torch ops (the path for GPUs; runs on any device)."""
    return _ranked_sums(qp, dp, ql, dl, k, average_precision=True)["ap"]


def _average_precisions_of_ranked(rel: Tensor, inv_positions: Tensor) -> Tensor:
    """AP of each ranked row of relevance flags (bool [q, k]); 0 where nothing relevant was ranked."""
    # AP = (1 / hits) * sum over relevant positions i of (relevant items up to i) / i.
    cum = torch.cumsum(rel, dim=1, dtype=torch.int32)
    hits = cum[:, -1].double()
    total = (cum * rel).double().mul_(inv_positions).sum(dim=1)
    return torch.where(hits > 0, total / hits.clamp_min(1), torch.zeros_like(hits))


def mean_average_precision(query_codes, db_codes, query_labels, db_labels, topk: Optional[int] = None) -> float:
    """mAP@topk (the whole database when topk is None)."""
    return float(average_precisions(query_codes, db_codes, query_labels, db_labels, topk).mean())


def precision_at_k(query_codes, db_codes, query_labels, db_labels, k: int) -> float:
    """Mean over queries of the fraction of relevant items among the top k."""
    qp, dp, ql, dl = _prepare(query_codes, db_codes, query_labels, db_labels)
    k = _check_cutoff(k, dp.shape[0], "k")
    return _ranked_sums(qp, dp, ql, dl, k)["hits"] / (k * qp.shape[0])


def precision_recall_at_k(query_codes, db_codes, query_labels, db_labels, max_k: int = 1000) -> Dict[str, Tensor]:
    """Precision@N and recall@N of the Hamming ranking (ties to the smaller index) for every N from 1 to max_k (at
    most the database size): the "precision@top-N" curves of hashing papers.

    Returns {"k", "precision", "recall"} (k int64, the others float64, [min(max_k, n)]). Precision@N averages over
    every query the share of relevant items among its top N; recall@N the share of its relevant database items found
    in its top N, over the queries that have one in the database.
    """
    qp, dp, ql, dl = _prepare(query_codes, db_codes, query_labels, db_labels)
    max_k = _check_cutoff(max_k, None, "max_k")
    k = min(max_k, dp.shape[0])
    precision, (recall, with_relevant) = _precision_recall_sums(qp, dp, ql, dl, k)
    return {"k": torch.arange(1, k + 1), "precision": (precision / max(qp.shape[0], 1)).cpu(),
            "recall": (recall / max(with_relevant, 1)).cpu()}


def _check_cutoff(k, n: Optional[int], name: str, or_none: bool = False) -> int:
    """A cutoff of a ranking: an integer (Python or NumPy; a TypeError otherwise, as for the searches' k) from 1 to n
    (any positive one where n is None); or_none says None was allowed too (the caller's case)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{name} must be an int{' or None' if or_none else ''}, got {type(k).__name__}")
    if k < 1 or (n is not None and k > n):
        bound = "a positive integer" if n is None else f"an integer between 1 and the database size {n}"
        raise ValueError(f"{name} must be {bound}{' or None' if or_none else ''}, got {k!r}")
    return int(k)


def _precision_recall_sums(qp: Tensor, dp: Tensor, ql: Tensor, dl: Tensor, k: int):
    """Sums over queries of precision@N for N = 1..k (float64 [k]) and (the sums of recall@N over the queries with a
    relevant database item, how many those are)."""
    cutoffs = torch.arange(1, k + 1, dtype=torch.float64, device=dp.device)
    precision = torch.zeros(k, dtype=torch.float64, device=dp.device)
    recall = torch.zeros_like(precision)
    with_relevant = 0
    database = _DatabaseLabels(dl)
    for chunk, _, rel in _ranked_chunks(qp, dp, ql, database, k):
        hits = torch.cumsum(rel, dim=1, dtype=torch.int64).double()
        precision += (hits / cutoffs).sum(0)
        relevant = chunk.relevant_counts().double()
        found = relevant > 0
        recall += (hits[found] / relevant[found, None]).sum(0)
        with_relevant += int(found.sum())
    return precision, (recall, with_relevant)


def ndcg_at_k(query_codes, db_codes, query_labels, db_labels, k: int) -> float:
    """NDCG@k of the Hamming ranking (ties to the smaller index) with graded relevance, as multi-label hashing papers
    report it: an item's gain is ``2^r - 1``, r the number of labels it shares with the query (0 or 1 for class ids),
    discounted by ``log2(1 + position)``; each query's DCG is divided by its ideal one (its database items in
    descending r), and a query with nothing relevant in the database scores 0. The mean over queries."""
    qp, dp, ql, dl = _prepare(query_codes, db_codes, query_labels, db_labels)
    k = _check_cutoff(k, dp.shape[0], "k")
    return _ranked_sums(qp, dp, ql, dl, k, ndcg=True)["ndcg"] / qp.shape[0]


def _ranked_sums(qp: Tensor, dp: Tensor, ql: Tensor, dl: Tensor, k: int, ndcg: bool = False,
                 average_precision: bool = False) -> dict:
    """One ranking of the database by the top-k op, over chunks of queries, and the sums over queries of what it
    gives: "hits" (relevant items in the top k, an exact count) and, where asked, "ndcg" (the sum of NDCG@k) and "ap"
    (each query's AP@k, float64 [q]). Every metric of a top-k ranking comes from here, so that one pass can serve
    several, with the same chunks (and so the same float sums) as each alone."""
    device = dp.device
    discounts = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64, device=device))
    inv_positions = 1.0 / torch.arange(1, k + 1, dtype=torch.float64, device=device)
    hits = torch.zeros((), dtype=torch.int64, device=device)
    ndcg_sum = torch.zeros((), dtype=torch.float64, device=device)
    aps = [torch.zeros(0, dtype=torch.float64, device=device)]
    database = _DatabaseLabels(dl)
    for chunk, shared, rel in _ranked_chunks(qp, dp, ql, database, k):
        hits += rel.sum()
        if ndcg:
            dcg = (torch.exp2(shared.double()) - 1).mul_(discounts).sum(dim=1)
            ideal = chunk.ideal_dcgs(discounts)
            ndcg_sum += (dcg / ideal.where(ideal > 0, 1.0)).sum()  # a query with nothing relevant: 0 / 1
        if average_precision:
            aps.append(_average_precisions_of_ranked(rel, inv_positions))
    return {"hits": int(hits), "ndcg": float(ndcg_sum), "ap": torch.cat(aps)}


def _radius_histograms(qp, dp, ql, dl) -> Tuple[Tensor, Tensor, int]:
    """Per query, counts of database items (all, relevant) at each Hamming distance 0..nbits: [q, nbits + 1]."""
    if dp.device.type == "cpu":  # one fused pass: distances of a chunk counted while in cache
        all_counts, rel_counts = torch.ops.brcd.distance_histograms(qp, dp, ql, dl)
        return all_counts, rel_counts, 8 * dp.shape[1]
    return _radius_histograms_by_ops(qp, dp, ql, dl)


def _radius_histograms_by_ops(qp, dp, ql, dl) -> Tuple[Tensor, Tensor, int]:
    """_radius_histograms from distance matrices of chunks of queries and torch ops (the path for GPUs)."""
    nbits = 8 * dp.shape[1]
    width = nbits + 1
    all_counts = torch.zeros((qp.shape[0], width), dtype=torch.int64, device=dp.device)
    rel_counts = torch.zeros_like(all_counts)
    step = max(1, _CHUNK_BYTES // (dp.shape[0] * 16))
    database = _DatabaseLabels(dl)
    for q0 in range(0, qp.shape[0], step):
        dist = hamming_distance(qp[q0 : q0 + step], dp).long()
        rows = torch.arange(dist.shape[0], device=dp.device)[:, None] * width
        flat = (rows + dist).reshape(-1)
        rel = database.of(ql[q0 : q0 + step]).relevant()
        size = dist.shape[0] * width
        all_counts[q0 : q0 + step] = torch.bincount(flat, minlength=size).view(-1, width)
        rel_counts[q0 : q0 + step] = torch.bincount(flat, weights=rel.reshape(-1).double(), minlength=size).view(
            -1, width).long()
    return all_counts, rel_counts, nbits


def precision_recall_curve(query_codes, db_codes, query_labels, db_labels) -> Dict[str, Tensor]:
    """Precision and recall of Hamming-ball retrieval at every radius 0..nbits, averaged over queries.

    Returns {"radius", "precision", "recall"} (float64 [nbits + 1]). At each radius, precision averages over the
    queries that retrieve something; recall over the queries that have a relevant item.
    """
    qp, dp, ql, dl = _prepare(query_codes, db_codes, query_labels, db_labels)
    all_counts, rel_counts, nbits = _radius_histograms(qp, dp, ql, dl)
    retrieved = all_counts.cumsum(dim=1).double()
    hits = rel_counts.cumsum(dim=1).double()
    relevant = hits[:, -1:]
    has_any = retrieved > 0
    precision = (torch.where(has_any, hits / retrieved.clamp_min(1), 0).sum(0) / has_any.sum(0).clamp_min(1))
    has_rel = (relevant > 0).expand_as(hits)
    recall = torch.where(has_rel, hits / relevant.clamp_min(1), 0).sum(0) / has_rel.sum(0).clamp_min(1)
    return {"radius": torch.arange(nbits + 1), "precision": precision.cpu(), "recall": recall.cpu()}


def precision_within_radius(query_codes, db_codes, query_labels, db_labels, radius: int = 2) -> float:
    """Mean precision of the items within Hamming distance <= radius; a query that retrieves nothing scores 0."""
    radius = _check_radius(radius)
    return _precision_within_radius(*_prepare(query_codes, db_codes, query_labels, db_labels), radius)


def _precision_within_radius(qp: Tensor, dp: Tensor, ql: Tensor, dl: Tensor, radius: int) -> float:
    all_counts, rel_counts, _ = _radius_histograms(qp, dp, ql, dl)
    r = min(radius, all_counts.shape[1] - 1)
    retrieved = all_counts[:, : r + 1].sum(1).double()
    hits = rel_counts[:, : r + 1].sum(1).double()
    return float(torch.where(retrieved > 0, hits / retrieved.clamp_min(1), 0).mean())


def retrieval_scores(query_codes, db_codes, query_labels, db_labels, topk: Optional[int] = 1000,
                     radius: int = 2) -> Dict[str, float]:
    """The scalar metrics hashing papers report, at once: ``map`` (mAP@topk), ``precision_at_K`` and ``ndcg_at_K``
    (K = topk, at most the database size; the whole database where topk is None) and
    ``precision_within_radius_R`` (R = radius). Each equals its own function's value to the last digit, but the
    database is ranked once for all of them (on the CPU, mAP comes from its own fused pass, which sorts nothing)."""
    if topk is not None:
        topk = _check_cutoff(topk, None, "topk", or_none=True)
    radius = _check_radius(radius)
    qp, dp, ql, dl = _prepare(query_codes, db_codes, query_labels, db_labels)
    k = dp.shape[0] if topk is None else min(topk, dp.shape[0])
    on_cpu = dp.device.type == "cpu"
    ranked = _ranked_sums(qp, dp, ql, dl, k, ndcg=True, average_precision=not on_cpu)
    aps = torch.ops.brcd.average_precision(qp, dp, ql, dl, k) if on_cpu else ranked["ap"]
    return {"map": float(aps.mean()), f"precision_at_{k}": ranked["hits"] / (k * qp.shape[0]),
            f"ndcg_at_{k}": ranked["ndcg"] / qp.shape[0],
            f"precision_within_radius_{radius}": _precision_within_radius(qp, dp, ql, dl, radius)}


def evaluate_paradigms(student_query_codes, student_db_codes, teacher_db_codes, query_labels, db_labels,
                       topk: Optional[int] = 1000) -> Dict[str, float]:
    """mAP@topk in both paradigms: symmetric (student vs student) and asymmetric (student vs teacher database)."""
    return {
        "map_symmetric": mean_average_precision(student_query_codes, student_db_codes, query_labels, db_labels, topk),
        "map_asymmetric": mean_average_precision(student_query_codes, teacher_db_codes, query_labels, db_labels, topk),
    }
