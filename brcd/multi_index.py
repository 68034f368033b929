"""Multi-index hashing (Norouzi, Punjani and Fleet, CVPR 2012): exact Hamming search that looks codes up instead of
scanning them all.

Each code is cut into m substrings, and each substring indexes a sorted table. Two codes within distance r differ in
at most floor(r / m) bits of some substring (pigeonhole), so probing every table with every key within floor(r / m)
bits of the query's substring finds every code within r; the candidates are then checked with the full distance.
Where the database is large and the radius small (a hash lookup), this reads a few hundred codes per query instead of
all of them. The answers are exactly those of :func:`brcd.hamming_range_search` and :func:`brcd.hamming_topk`
(same order, ties to the smaller index); where the probes would touch a large share of the database anyway, the
search falls back to those linear scans.

>>> mih = MultiIndexHashing(brcd.pack_codes(db_codes), nbits=64)
>>> lims, dist, ids = mih.range_search(brcd.pack_codes(query_codes), radius=3)
>>> dist, ids = mih.search(brcd.pack_codes(query_codes), k=10)

Everything is torch ops on the codes' device (CPU or GPU).
"""
from __future__ import annotations

import functools
import itertools
import math
import numbers
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .ops import _check_k, _check_radius, _order_hits, _require_tensor, hamming_range_search, hamming_topk

__all__ = ["MultiIndexHashing"]

# What a probe key and a candidate cost, in the linear scan's unit (one query against one 64-bit word of one code):
# measured on the 2-core development CPU, where the scan compares a 64-bit code in 0.04 ns and the lookups' torch
# ops spend about 100 ns per probe key and 200 to 400 ns per candidate. A lookup whose probes and candidates would
# cost more than the scan gives way to it.
_PROBE_COST = 2500
_CANDIDATE_COST = 10000
# Queries whose probes decide, for a larger batch, whether the lookup can beat the scan, and whose k-th distances
# (by the scan) give a k-nearest search its first radius.
_SAMPLED_QUERIES = 64
# The most probe keys per substring and query (the keys within the substring radius of the query's).
_MAX_PROBES = 1 << 16


class MultiIndexHashing:
    """An exact multi-index over packed codes uint8 [n, ceil(nbits / 8)] (from :func:`brcd.pack_codes`).

    Args:
        db_packed: the database, packed; its ids are its rows.
        nbits: bits per code.
        substrings: m, the number of tables; by default about nbits / log2(n) (substrings of about log2(n) bits, so
            that a table has about one code per key), at least 1, at most nbits, with substrings of at most 32 bits.
    """

    def __init__(self, db_packed: Tensor, nbits: int, substrings: Optional[int] = None):
        _require_tensor(db_packed, "db_packed")
        if db_packed.dtype != torch.uint8 or db_packed.dim() != 2:
            raise ValueError(f"db_packed must be uint8 [n, nbytes] packed codes, got {db_packed.dtype} "
                             f"{tuple(db_packed.shape)}")
        if isinstance(nbits, bool) or not isinstance(nbits, numbers.Integral) or not (
                1 <= nbits <= 8 * db_packed.shape[1] and db_packed.shape[1] == (nbits + 7) // 8):
            raise ValueError(f"nbits must be the bits of the packed codes ({db_packed.shape[1]} bytes each), "
                             f"got {nbits!r}")
        n = db_packed.shape[0]
        if n == 0:
            raise ValueError("db_packed is empty: the database needs at least one code")
        least = math.ceil(nbits / 32)
        if substrings is None:
            substrings = max(least, min(nbits, round(nbits / max(1.0, math.log2(n)))))
        if isinstance(substrings, bool) or not isinstance(substrings, numbers.Integral) or not (
                least <= substrings <= nbits):
            raise ValueError(f"substrings must be an integer in [{least}, {nbits}] (substrings of 1 to 32 bits), "
                             f"got {substrings!r}")
        self.nbits, self.substrings = int(nbits), int(substrings)
        self.db_packed = db_packed.contiguous()
        bounds = [round(j * nbits / substrings) for j in range(substrings + 1)]
        self._spans: List[Tuple[int, int]] = list(zip(bounds[:-1], bounds[1:]))
        self._tables = []
        for begin, end in self._spans:
            keys = _substring_keys(self.db_packed, begin, end)
            sorted_keys, order = torch.sort(keys, stable=True)  # equal keys keep id order
            self._tables.append((sorted_keys, order))

    def __len__(self) -> int:
        return self.db_packed.shape[0]

    def __repr__(self) -> str:
        widths = sorted({end - begin for begin, end in self._spans})
        return (f"MultiIndexHashing(nbits={self.nbits}, count={len(self)}, substrings={self.substrings} of "
                f"{'/'.join(map(str, widths))} bits, device={self.db_packed.device})")

    def _check_queries(self, query_packed: Tensor) -> Tensor:
        _require_tensor(query_packed, "query_packed")
        if query_packed.dtype != torch.uint8 or query_packed.dim() != 2 or \
                query_packed.shape[1] != self.db_packed.shape[1]:
            raise ValueError(f"query_packed must be uint8 [q, {self.db_packed.shape[1]}] packed codes, got "
                             f"{query_packed.dtype} {tuple(query_packed.shape)}")
        if query_packed.device != self.db_packed.device:
            raise ValueError(f"query_packed is on {query_packed.device} but the index is on {self.db_packed.device}")
        return query_packed.contiguous()

    # ------------------------------------------------------------------ search
    def range_search(self, query_packed: Tensor, radius: int) -> Tuple[Tensor, Tensor, Tensor]:
        """Every code within Hamming distance ``radius``: exactly :func:`brcd.hamming_range_search`'s answer (lims,
        distances, indices; each query's results sorted by (distance, index))."""
        q = self._check_queries(query_packed)
        radius = _check_radius(radius)
        found = self._lookup(q, radius)
        return found if found is not None else hamming_range_search(q, self.db_packed, radius)

    def search(self, query_packed: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        """The k nearest codes: exactly :func:`brcd.hamming_topk`'s answer (distances int32 [q, k], indices int64
        [q, k]). Looks codes up within a radius that grows by m (one more bit per substring) until each query has k
        codes within it, starting from the median k-th distance of a sample of queries (found by the scan); the
        queries left when a lookup would cost more than the scan go to hamming_topk, and so does a batch no larger
        than the sample."""
        q = self._check_queries(query_packed)
        k = _check_k(k, len(self))
        count, m = q.shape[0], self.substrings
        if count <= _SAMPLED_QUERIES:
            return hamming_topk(q, self.db_packed, k)
        out_d = torch.empty((count, k), dtype=torch.int32, device=q.device)
        out_i = torch.empty((count, k), dtype=torch.int64, device=q.device)
        sample = torch.linspace(0, count - 1, _SAMPLED_QUERIES, device=q.device).long()
        start = int(hamming_topk(q[sample], self.db_packed, k)[0][:, -1].median())
        # Lookups at substring radius j find every code within m * (j + 1) - 1: the first such radius >= start.
        radius = start + (m - 1 - start) % m
        left = torch.arange(count, device=q.device)
        while left.numel():
            found = self._lookup(q[left], radius)
            if found is None:
                out_d[left], out_i[left] = hamming_topk(q[left], self.db_packed, k)
                break
            lims, dist, idx = found
            done = lims[1:] - lims[:-1] >= k
            if bool(done.any()):
                # The first k results of a query with at least k within the radius are its k nearest.
                take = lims[:-1][done][:, None] + torch.arange(k, device=q.device)
                out_d[left[done]], out_i[left[done]] = dist[take], idx[take]
            left = left[~done]
            radius += self.substrings
        return out_d, out_i

    def _probe(self, q: Tensor, probes: List[Tensor]) -> List[Tuple[Tensor, Tensor]]:
        """Per table, where the codes of each query's probe keys begin in it and how many there are ([q, P] each)."""
        spans = []
        for (begin, end), masks, (sorted_keys, _) in zip(self._spans, probes, self._tables):
            keys = _substring_keys(q, begin, end)[:, None] ^ masks.to(q.device)[None, :]
            lo = torch.searchsorted(sorted_keys, keys, right=False)
            spans.append((lo, torch.searchsorted(sorted_keys, keys, right=True) - lo))
        return spans

    def _lookup(self, q: Tensor, radius: int) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
        """range_search's answer by table lookups, or None where the linear scan would cost less."""
        n, count = len(self), q.shape[0]
        scan_cost = count * n * ((self.nbits + 63) // 64)
        sub_radius = radius // self.substrings
        keys_per_query = [_probe_count(end - begin, sub_radius) for begin, end in self._spans]
        if count == 0 or radius >= self.nbits or max(keys_per_query) > _MAX_PROBES:
            return None
        probe_cost = _PROBE_COST * count * sum(keys_per_query)
        if probe_cost > scan_cost:
            return None
        probes = [_probe_masks(end - begin, sub_radius) for begin, end in self._spans]
        if count > _SAMPLED_QUERIES and 8 * probe_cost > scan_cost:
            # Probing costs a good part of a scan, wasted where the lookup then loses: decide on a sample first.
            sample = q[torch.linspace(0, count - 1, _SAMPLED_QUERIES, device=q.device).long()]
            guessed = sum(int(length.sum()) for _, length in self._probe(sample, probes)) * count / _SAMPLED_QUERIES
            if probe_cost + _CANDIDATE_COST * guessed > scan_cost:
                return None
        # Where each probe key's codes lie in each sorted table; how many candidates that makes before any is read.
        spans = self._probe(q, probes)
        total = sum(int(length.sum()) for _, length in spans)
        if probe_cost + _CANDIDATE_COST * total > scan_cost:
            return None
        candidates = []
        for (lo, length), (_, order) in zip(spans, self._tables):
            length = length.reshape(-1)
            first = lo.reshape(-1).repeat_interleave(length)
            starts = (length.cumsum(0) - length).repeat_interleave(length)
            within = torch.arange(first.numel(), device=q.device) - starts  # each candidate's place in its bucket
            query = torch.arange(count, device=q.device).repeat_interleave(lo.shape[1]).repeat_interleave(length)
            candidates.append(query * n + order[first + within])
        # Unique pairs, sorted by query, then by id: the order _order_hits takes.
        pairs = torch.unique(torch.cat(candidates))
        query, ids = pairs // n, pairs % n
        dist = _popcount_rows(q[query] ^ self.db_packed[ids])
        keep = dist <= radius
        counts, dist, ids = _order_hits(query[keep], ids[keep], dist[keep], count, self.nbits)
        return torch.cat([counts.new_zeros(1), counts.cumsum(0)]), dist, ids


def _substring_keys(packed: Tensor, begin: int, end: int) -> Tensor:
    """Bits [begin, end) of each packed code as an integer (bit begin lowest): int64 [n]."""
    keys = torch.zeros(packed.shape[0], dtype=torch.int64, device=packed.device)
    for bit in range(begin, end):
        keys |= ((packed[:, bit // 8].to(torch.int64) >> (bit % 8)) & 1) << (bit - begin)
    return keys


def _probe_count(width: int, radius: int) -> int:
    """How many keys lie within `radius` bits of a key of `width` bits."""
    return sum(math.comb(width, i) for i in range(min(radius, width) + 1))


@functools.lru_cache(maxsize=64)
def _probe_masks(width: int, radius: int) -> Tensor:
    """Every mask of at most `radius` set bits among `width`, as int64 (built once per width and radius)."""
    masks = [sum(1 << b for b in bits) for i in range(min(radius, width) + 1)
             for bits in itertools.combinations(range(width), i)]
    return torch.tensor(masks, dtype=torch.int64)


_POPCOUNT = torch.tensor([bin(v).count("1") for v in range(256)], dtype=torch.int64)


def _popcount_rows(xor: Tensor) -> Tensor:
    """Set bits of each row of uint8 [r, nbytes]: int64 [r]."""
    return _POPCOUNT.to(xor.device)[xor.long()].sum(dim=1)
