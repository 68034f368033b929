"""The Python face of the brcd ops: argument checks, fake kernels (torch.compile) and autograd.

Every op is registered in C++ under ``torch.ops.brcd``; the functions here are the public API.
"""
from __future__ import annotations

import functools
import numbers
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import _ext  # noqa: F401  (registers torch.ops.brcd)

__all__ = [
    "pack_codes",
    "unpack_codes",
    "hamming_distance",
    "hamming_topk",
    "hamming_range_search",
    "brcd_loss",
    "ntxent_loss",
]

_ops = torch.ops.brcd


@functools.lru_cache(maxsize=None)
def _byte_signs(device: torch.device, dtype: torch.dtype) -> Tensor:
    """Row b: the ±1 codes of byte b, bit 0 first (the pack_codes layout); one copy per device and dtype."""
    return (((torch.arange(256)[:, None] >> torch.arange(8)) & 1) * 2 - 1).to(device=device, dtype=dtype)


def _require_tensor(value, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_int(value, name: str) -> int:
    """An integer argument (k, a radius): a Python or NumPy integer, never a bool or a float (TypeError naming it)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def _check_radius(radius) -> int:
    """A Hamming radius: an integer >= 0. The searches (the op, the indexes) share this check and its messages."""
    radius = _check_int(radius, "radius")
    if radius < 0:
        raise ValueError(f"radius must be a non-negative Hamming distance, got {radius}")
    return radius


def _check_k(k, n: int, of: str = "the database size") -> int:
    """A number of nearest codes: an integer from 1 to n, the size of what is searched (`of` names it)."""
    k = _check_int(k, "k")
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and {of} {n}, got {k}")
    return k


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_alpha_range(alpha: Tensor) -> None:
    """Raises ValueError where a (GPU) alpha tensor holds a value outside [0, 1], NaN included, naming the first, as
    the op's own check does on the CPU. Reading the answer waits for the device: one reduction and one copy (the
    bad index is looked for only when there is one)."""
    lo, hi = torch.stack(torch.aminmax(alpha.detach())).tolist()  # NaN propagates into both
    if lo >= 0 and hi <= 1:
        return
    flat = alpha.detach().reshape(-1)
    first = int((~((flat >= 0) & (flat <= 1))).nonzero()[0])
    raise ValueError(f"alpha must lie in [0, 1], got {float(flat[first])} at index {first}")


# ----------------------------------------------------------------------------------------------- Hamming ops
def pack_codes(codes: Tensor) -> Tensor:
    """Pack codes [n, nbits] into bytes [n, ceil(nbits / 8)]: bit j is 1 where ``codes[:, j] > 0``.

    The layout is ``numpy.packbits(codes > 0, axis=1, bitorder="little")``, so packed codes go straight into faiss
    binary indexes. Float, integer and bool codes are accepted, on CPU and CUDA.
    """
    return _ops.pack_codes(_require_tensor(codes, "codes"))


def unpack_codes(packed: Tensor, nbits: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`pack_codes`: ±1 codes [n, nbits] (1 where the bit is set)."""
    _require_tensor(packed, "packed")
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed must be a 2-D uint8 tensor, got {packed.dtype} with shape {tuple(packed.shape)}")
    if not isinstance(nbits, numbers.Integral) or not (1 <= nbits <= 8 * packed.shape[1]):
        raise ValueError(f"nbits must be an integer in [1, {8 * packed.shape[1]}], got {nbits!r}")
    # One lookup of 8 values per byte, written straight into the result (shifting, masking, converting and scaling
    # the bits took four passes: 270 ms against 110 ms for 1M 64-bit codes).
    signs = _byte_signs(packed.device, dtype)[packed.long()].reshape(packed.shape[0], -1)
    return signs if nbits == signs.shape[1] else signs[:, :nbits].contiguous()


def hamming_distance(query_packed: Tensor, db_packed: Tensor) -> Tensor:
    """All Hamming distances between packed codes: int32 [q, n]."""
    return _ops.hamming_distance(_require_tensor(query_packed, "query_packed"), _require_tensor(db_packed, "db_packed"))


def hamming_topk(query_packed: Tensor, db_packed: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Exact k nearest codes: (distances int32 [q, k], indices int64 [q, k]).

    Ascending distance; ties go to the smaller database index. Any bit count, any k in [1, n]. The q x n
    distance matrix is never built.

    On CUDA, codes of up to 256 bits with k up to 2048 (compute capability 8.0 or later) take a one-pass tensor-core
    kernel that waits for the GPU once per call (once per 4096 queries at k = 1000): it reads how many queries its
    sampled bound could not serve and hands those to the exact two-pass kernels. Other sizes, and every call made
    while the stream is being captured into a CUDA graph, take the two-pass kernels, which never synchronise.

    Example::

        >>> db = brcd.pack_codes(torch.randn(100_000, 64))
        >>> q = brcd.pack_codes(torch.randn(5, 64))
        >>> dist, idx = brcd.hamming_topk(q, db, 10)   # [5, 10] each
    """
    _require_tensor(query_packed, "query_packed")
    _require_tensor(db_packed, "db_packed")
    return _ops.hamming_topk(query_packed, db_packed, _check_int(k, "k"))  # its range: the op's own check


def hamming_range_search(query_packed: Tensor, db_packed: Tensor, radius: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Every database code within Hamming distance ``radius`` of each query (a Hamming-ball lookup, exact).

    Returns ``(lims, distances, indices)`` in faiss's ``RangeSearchResult`` layout: query i's results are entries
    ``lims[i]:lims[i + 1]`` of ``distances`` (int32) and ``indices`` (int64); ``lims`` is int64 [q + 1]. Each
    query's results are sorted by (distance, index), so they are the first ``lims[i + 1] - lims[i]`` results of
    :func:`hamming_topk` with that k. A radius of nbits or more returns the whole database for every query: the
    output holds q x n entries then (12 bytes each).

    On the CPU the scan keeps a fixed bound of radius + 1: the top-k's threshold scan, which visits only the blocks
    of codes with a hit, where a sample of the database says hits are sparse, branch-free candidate lists where they
    are dense; a counting sort then orders each query's codes. On CUDA the distances of a chunk of queries (at most
    2^26 query-code pairs at a time) come from :func:`hamming_distance` and torch ops keep and order those within
    the radius; it waits for the GPU once per chunk (the results' size is known only then).

    Example::

        >>> lims, dist, idx = brcd.hamming_range_search(q, db, radius=2)
        >>> idx[lims[0]:lims[1]]                      # the database codes within distance 2 of query 0
    """
    _require_tensor(query_packed, "query_packed")
    _require_tensor(db_packed, "db_packed")
    return _ops.hamming_range_search(query_packed, db_packed, _check_radius(radius))


# Query-code pairs whose distances the composed range search holds at once (256 MiB of int32, plus a byte each).
_RANGE_CHUNK_PAIRS = 1 << 26


def _range_search_by_ops(query_packed: Tensor, db_packed: Tensor, radius: int) -> Tuple[Tensor, Tensor, Tensor]:
    """hamming_range_search from hamming_distance over chunks of queries and torch ops: the CUDA kernel of the op.

    Device-agnostic, so the tests run it on the CPU against the CPU kernel. The first chunk always calls
    hamming_distance, even for no queries, so that its checks of the two tensors run.
    """
    if radius < 0:
        raise ValueError(f"radius must be a non-negative Hamming distance, got {radius}")
    q = query_packed.shape[0]
    rows = max(1, _RANGE_CHUNK_PAIRS // max(1, db_packed.shape[0]))
    bound = min(radius, 8 * db_packed.shape[1])  # no distance exceeds the bits of a code's bytes
    counts, dists, idxs = [], [], []
    for q0 in range(0, max(q, 1), rows):
        dist = _ops.hamming_distance(query_packed[q0 : q0 + rows], db_packed)
        hit_row, hit_col = (dist <= bound).nonzero(as_tuple=True)  # row-major: index order within each row
        count, d, i = _order_hits(hit_row, hit_col, dist[hit_row, hit_col], dist.shape[0], bound)
        counts.append(count)
        dists.append(d)
        idxs.append(i)
    lims = torch.cat([counts[0].new_zeros(1), torch.cumsum(torch.cat(counts), 0)])
    return lims, torch.cat(dists), torch.cat(idxs)


def _order_hits(query: Tensor, ids: Tensor, dist: Tensor, queries: int, max_dist: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Range-search hits given in (query, id) order, into the op's order: how many each query has (int64
    [queries]), and the distances (int32) and ids sorted by (query, distance, id). A stable sort by (query, distance)
    keeps id order among equal distances."""
    order = torch.sort(query * (max_dist + 1) + dist, stable=True).indices
    return torch.bincount(query, minlength=queries), dist[order].to(torch.int32), ids[order]


torch.library.register_kernel("brcd::hamming_range_search", "cuda", _range_search_by_ops)


@torch.library.register_fake("brcd::pack_codes")
def _pack_codes_fake(codes):
    torch._check(codes.dim() == 2, lambda: "codes must be a 2-D tensor")
    return codes.new_empty((codes.shape[0], (codes.shape[1] + 7) // 8), dtype=torch.uint8)


@torch.library.register_fake("brcd::hamming_distance")
def _hamming_distance_fake(query_packed, db_packed):
    return query_packed.new_empty((query_packed.shape[0], db_packed.shape[0]), dtype=torch.int32)


@torch.library.register_fake("brcd::hamming_topk")
def _hamming_topk_fake(query_packed, db_packed, k):
    q = query_packed.shape[0]
    return (
        query_packed.new_empty((q, k), dtype=torch.int32),
        query_packed.new_empty((q, k), dtype=torch.int64),
    )


@torch.library.register_fake("brcd::hamming_range_search")
def _hamming_range_search_fake(query_packed, db_packed, radius):
    total = torch.library.get_ctx().new_dynamic_size()  # known only once the codes are compared
    return (
        query_packed.new_empty((query_packed.shape[0] + 1,), dtype=torch.int64),
        query_packed.new_empty((total,), dtype=torch.int32),
        query_packed.new_empty((total,), dtype=torch.int64),
    )


# ----------------------------------------------------------------------------------------------- loss ops
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
    check_alpha: bool = True,
) -> Tensor:
    """The BRCD contrastive distillation loss (shared/spec/contrastive-loss.md), fused: O(B*K) extra memory.

    Args:
        student: student codes of view 1, [B, K].
        teacher_anchor: teacher codes of view 1, [B, K] (the individual-space positive).
        teacher_view: teacher codes of view 2, [B, K] (the structural positive and negatives).
        temperature: softmax temperature, > 0.
        alpha: weight of the individual term in [0, 1]: a float, a 0-d tensor (a CPU one goes with codes on any
            device) or a [B] tensor on the codes' device (1 for offset positives).
        bit_mask: per-sample bit weights [B, K] applied to the structural part, or None (all ones).
        row_groups, col_groups: [2B] int64 group ids; a negative (r, c) is dropped when
            ``row_groups[r] == col_groups[c] >= 0``. Give both or neither.
        check_alpha: check that a tensor alpha on a GPU lies in [0, 1]. Reading the answer waits for the device (one
            synchronisation per call, which also drains a training loop's queue of GPU work ahead of the host); pass
            False where alpha is valid by construction, as the trainer does (its alpha is ``base_alpha`` or 1). An
            alpha outside [0, 1] then goes unreported. On the CPU the op checks alpha's range whatever this says (it
            costs nothing there), and every check of shapes, dtypes and devices always runs.

    Returns a 0-d tensor in the codes' dtype, differentiable with respect to the three code tensors (once: a second
    derivative, through gradients taken with ``create_graph=True``, raises NotImplementedError). The backward
    computes only the gradients autograd asks for: with the teacher's codes frozen, as in distillation, the CPU
    kernels skip the products that feed only them.
    """
    student = _require_tensor(student, "student")
    _require_tensor(teacher_anchor, "teacher_anchor")
    _require_tensor(teacher_view, "teacher_view")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if isinstance(alpha, Tensor):
        alpha_t = alpha
        # On the CPU the op checks the range itself; on a GPU that check is a device sync, done here once.
        if (check_alpha and alpha_t.is_floating_point() and alpha_t.device.type != "cpu" and not _compiling()
                and alpha_t.numel()):
            _check_alpha_range(alpha_t)
    elif isinstance(alpha, numbers.Real) and not isinstance(alpha, bool):
        # A CPU scalar whatever the codes' device: the op reads it on the host (no copy to a GPU, nothing to wait for)
        # and checks its range there.
        alpha_t = torch.tensor(float(alpha), dtype=torch.float64)
    else:
        raise TypeError(f"alpha must be a float or a tensor, got {type(alpha).__name__}")
    for name, value in (("bit_mask", bit_mask), ("row_groups", row_groups), ("col_groups", col_groups)):
        if value is not None:
            _require_tensor(value, name)
    loss, _ = _ops.contrastive_forward(
        student, teacher_anchor, teacher_view, float(temperature), alpha_t, bit_mask, row_groups, col_groups
    )
    return loss


def ntxent_loss(view_a: Tensor, view_b: Tensor, *, temperature: float = 0.3) -> Tensor:
    """NT-Xent (SimCLR / CIBHash) over two views' codes [B, K]: the BRCD loss with alpha = 0, no mask, no groups."""
    _require_tensor(view_a, "view_a")
    _require_tensor(view_b, "view_b")
    if view_a.shape != view_b.shape:
        raise ValueError(f"view_b has shape {tuple(view_b.shape)} but view_a has shape {tuple(view_a.shape)}")
    return brcd_loss(view_a, view_a, view_b, temperature=temperature, alpha=0.0)


@torch.library.register_fake("brcd::average_precision")
def _average_precision_fake(query_packed, db_packed, query_labels, db_labels, k):
    return query_packed.new_empty((query_packed.shape[0],), dtype=torch.float64)


@torch.library.register_fake("brcd::distance_histograms")
def _distance_histograms_fake(query_packed, db_packed, query_labels, db_labels):
    shape = (query_packed.shape[0], 8 * db_packed.shape[1] + 1)
    return query_packed.new_empty(shape, dtype=torch.int64), query_packed.new_empty(shape, dtype=torch.int64)


@torch.library.register_fake("brcd::contrastive_forward")
def _contrastive_forward_fake(student, teacher_anchor, teacher_view, temperature, alpha, bit_mask, row_groups,
                              col_groups):
    compute = torch.float64 if student.dtype == torch.float64 else torch.float32
    loss = student.new_empty((), dtype=student.dtype)
    stats = student.new_empty((2, 2 * student.shape[0]), dtype=compute)
    return loss, stats


@torch.library.register_fake("brcd::contrastive_backward")
def _contrastive_backward_fake(grad_loss, student, teacher_anchor, teacher_view, temperature, alpha, bit_mask,
                               row_groups, col_groups, row_stats, output_mask=(True, True, True)):
    return torch.empty_like(student), torch.empty_like(student), torch.empty_like(student)
