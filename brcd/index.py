"""HammingIndex: an exact, flat index of binary codes backed by the brcd top-k kernels.

File format (version 1), little-endian::

    offset  size  field
    0       8     magic b"BRCDHIX\\0"
    8       4     version (uint32) = 1
    12      4     nbits (uint32)
    16      8     count (uint64): number of codes
    24      4     bytes per code (uint32) = ceil(nbits / 8)
    28      4     CRC-32 of bytes 0..27 followed by the payload
    32      ...   payload: count x bytes-per-code packed codes (pack_codes layout), row-major

Files are written atomically (a temporary file in the same folder, fsync, then rename), so a crash never
leaves a half-written index in place of a good one. Loading checks every field and the checksum and raises
IndexFileError, never returning part of an index.
"""
from __future__ import annotations

import numbers
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .ops import _check_k, _check_radius, hamming_range_search, hamming_topk, pack_codes

MAGIC = b"BRCDHIX\0"
VERSION = 1
_HEADER = struct.Struct("<8sIIQI")  # the checksummed part of the header
_CRC = struct.Struct("<I")
HEADER_SIZE = _HEADER.size + _CRC.size


class IndexFileError(ValueError):
    """A HammingIndex file that is not one, is truncated, corrupted or of an unknown version."""


def atomic_write_bytes(path: Union[str, os.PathLike], chunks) -> None:
    """Write the byte chunks to `path` through a temporary file and a rename: all or nothing."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _import_faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("this needs faiss: pip install faiss-cpu (or faiss-gpu)") from None
    return faiss


class HammingIndex:
    """Exact Hamming search over binary codes.

    >>> index = HammingIndex(64)
    >>> ids = index.add(torch.randn(1000, 64))          # real codes: bit = code > 0
    >>> dist, ids = index.search(torch.randn(5, 64), k=10)
    >>> lims, dist, ids = index.range_search(torch.randn(5, 64), radius=20)   # query i: ids[lims[i]:lims[i + 1]]
    >>> index.save("codes.bhi"); index = HammingIndex.load("codes.bhi")

    ``add``/``search`` take real-valued (±1, logits, ...) codes [m, nbits]; ``add_packed``/``search_packed`` take
    uint8 codes from :func:`brcd.pack_codes`. The two paths are separate so the formats can never be confused.
    """

    def __init__(self, nbits: int, device: Union[str, torch.device] = "cpu"):
        if isinstance(nbits, bool) or not isinstance(nbits, numbers.Integral) or nbits < 1:
            raise ValueError(f"nbits must be a positive integer, got {nbits!r}")
        self.nbits = int(nbits)
        self.code_bytes = (self.nbits + 7) // 8
        self.device = torch.device(device)
        # Rows [0, count) of the storage hold the codes; the rest is room to grow into.
        self._storage = torch.empty((0, self.code_bytes), dtype=torch.uint8, device=self.device)
        self._count = 0

    # ------------------------------------------------------------------ contents
    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"HammingIndex(nbits={self.nbits}, count={len(self)}, device={self.device})"

    @property
    def packed_codes(self) -> Tensor:
        """The stored codes, uint8 [count, ceil(nbits / 8)] (a view of the index's storage)."""
        return self._storage[: self._count]

    def _check_real(self, codes, name: str) -> Tensor:
        if not isinstance(codes, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(codes).__name__}")
        if codes.dtype == torch.uint8:
            raise TypeError(f"{name} is uint8: pass packed codes to the *_packed method, real codes [m, nbits] here")
        if codes.dim() != 2 or codes.shape[1] != self.nbits:
            raise ValueError(f"{name} must have shape [m, {self.nbits}], got {tuple(codes.shape)}")
        return codes

    def _check_packed(self, packed, name: str) -> Tensor:
        if not isinstance(packed, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(packed).__name__}")
        if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != self.code_bytes:
            raise ValueError(
                f"{name} must be uint8 [m, {self.code_bytes}] packed codes, got {packed.dtype} {tuple(packed.shape)}"
            )
        spare = 8 * self.code_bytes - self.nbits
        if spare and packed.numel() and bool((packed[:, -1] >> (8 - spare)).any()):
            raise ValueError(f"{name} has bits set beyond nbits={self.nbits}: not codes of this index")
        return packed

    def add(self, codes: Tensor) -> Tensor:
        """Add real-valued codes [m, nbits]; returns their ids (int64 [m])."""
        return self.add_packed(pack_codes(self._check_real(codes, "codes")))

    def add_packed(self, packed: Tensor) -> Tensor:
        """Add packed codes uint8 [m, ceil(nbits/8)]; returns their ids (int64 [m])."""
        packed = self._check_packed(packed, "packed")
        start, m = self._count, packed.shape[0]
        self._reserve(start + m)
        self._storage[start : start + m] = packed  # copied to the index's device
        self._count = start + m
        return torch.arange(start, start + m, dtype=torch.int64)

    def _reserve(self, rows: int) -> None:
        """Room for `rows` codes. The storage at least doubles when it grows, so adding n codes in batches copies
        O(n) bytes: a concatenation per batch copied everything stored so far (4M 64-bit codes added 1000 at a time
        took 21 s)."""
        capacity = self._storage.shape[0]
        if rows <= capacity:
            return
        grown = torch.empty((max(rows, 2 * capacity, 1024), self.code_bytes), dtype=torch.uint8, device=self.device)
        grown[: self._count] = self._storage[: self._count]
        self._storage = grown

    # ------------------------------------------------------------------ search
    def search(self, codes: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        """The k nearest stored codes of each query: (distances int32 [q, k], ids int64 [q, k])."""
        return self.search_packed(pack_codes(self._check_real(codes, "codes")), k)

    def search_packed(self, packed: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        packed = self._check_packed(packed, "packed")
        if len(self) == 0:
            raise ValueError("the index is empty: add codes before searching")
        return hamming_topk(packed.to(self.device), self.packed_codes, _check_k(k, len(self), "the index size"))

    def range_search(self, codes: Tensor, radius: int) -> Tuple[Tensor, Tensor, Tensor]:
        """Every stored code within Hamming distance ``radius`` of each query: (lims int64 [q + 1], distances int32,
        ids int64), query i's results at ``lims[i]:lims[i + 1]``, sorted by (distance, id). See
        :func:`brcd.hamming_range_search`."""
        return self.range_search_packed(pack_codes(self._check_real(codes, "codes")), radius)

    def range_search_packed(self, packed: Tensor, radius: int) -> Tuple[Tensor, Tensor, Tensor]:
        packed = self._check_packed(packed, "packed")
        if len(self) == 0:
            raise ValueError("the index is empty: add codes before searching")
        return hamming_range_search(packed.to(self.device), self.packed_codes, _check_radius(radius))

    def to(self, device: Union[str, torch.device]) -> "HammingIndex":
        """Move the stored codes to `device` (in place); returns self."""
        self.device = torch.device(device)
        self._storage = self.packed_codes.to(self.device)  # without the room to grow
        return self

    # ------------------------------------------------------------------ faiss
    def to_faiss(self):
        """A faiss ``IndexBinaryFlat`` holding the same codes (same ids, same byte layout). faiss stores codes of a
        multiple of 8 bits only. Needs faiss (``pip install faiss-cpu``)."""
        faiss = _import_faiss()
        if self.nbits % 8:
            raise ValueError(f"faiss binary indexes hold codes of a multiple of 8 bits; this index has {self.nbits}")
        index = faiss.IndexBinaryFlat(self.nbits)
        if len(self):
            index.add(self.packed_codes.cpu().contiguous().numpy())
        return index

    @classmethod
    def from_faiss(cls, index, device: Union[str, torch.device] = "cpu") -> "HammingIndex":
        """A HammingIndex of the codes of a faiss binary index (any kind that can reconstruct its codes: flat, HNSW,
        ...), in the order of their faiss ids 0..ntotal - 1."""
        faiss = _import_faiss()
        if not isinstance(index, faiss.IndexBinary):
            raise TypeError(f"index must be a faiss binary index (faiss.IndexBinary), got {type(index).__name__}")
        out = cls(index.d, device=device)
        if index.ntotal:
            out.add_packed(torch.from_numpy(index.reconstruct_n(0, index.ntotal)))
        return out

    # ------------------------------------------------------------------ files
    def save(self, path: Union[str, os.PathLike]) -> None:
        payload = self.packed_codes.cpu().contiguous().numpy().tobytes()
        head = _HEADER.pack(MAGIC, VERSION, self.nbits, len(self), self.code_bytes)
        crc = zlib.crc32(payload, zlib.crc32(head))
        atomic_write_bytes(path, [head, _CRC.pack(crc), payload])

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> "HammingIndex":
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise IndexFileError(f"{path}: no such index file") from None
        if len(data) < HEADER_SIZE:
            raise IndexFileError(f"{path}: {len(data)} bytes is too short for a HammingIndex file (truncated?)")
        magic, version, nbits, count, code_bytes = _HEADER.unpack_from(data, 0)
        (crc,) = _CRC.unpack_from(data, _HEADER.size)
        if magic != MAGIC:
            raise IndexFileError(f"{path}: not a HammingIndex file (bad magic {magic!r})")
        if version != VERSION:
            raise IndexFileError(f"{path}: file format version {version} is not supported (this brcd reads {VERSION})")
        if nbits < 1 or code_bytes != (nbits + 7) // 8:
            raise IndexFileError(f"{path}: inconsistent header (nbits={nbits}, bytes per code={code_bytes})")
        expected = HEADER_SIZE + count * code_bytes
        if len(data) != expected:
            raise IndexFileError(
                f"{path}: {len(data)} bytes but the header promises {expected} ({count} codes): truncated or corrupted"
            )
        payload = memoryview(data)[HEADER_SIZE:]
        if zlib.crc32(payload, zlib.crc32(data[: _HEADER.size])) != crc:
            raise IndexFileError(f"{path}: checksum mismatch: the file is corrupted")
        index = cls(nbits, device=device)
        codes = np.frombuffer(payload, dtype=np.uint8).reshape(count, code_bytes).copy()
        index._storage = torch.from_numpy(codes).to(index.device)
        index._count = count
        return index
