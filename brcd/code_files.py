"""Codes and labels in files: read to score any hashing method's codes (`brcd score`), written to take brcd's codes
elsewhere (`brcd encode`).

Formats, by suffix: ``.npy`` (NumPy; pickled object arrays are refused), ``.pt`` / ``.pth`` (one tensor saved with
``torch.save``, read with ``weights_only=True``), ``.txt`` / ``.tsv`` (whitespace or tab separated) and ``.csv`` (comma
separated), one row per item; for codes also ``.bhi``, a :class:`brcd.HammingIndex` file.

Codes are real-valued, one column per bit (bit = value > 0: ±1, 0/1, or a hashing layer's outputs before the sign),
or, read with ``packed=True``, bytes of packed bits (integers 0..255, ``ceil(bits / 8)`` columns). A Hamming distance
does not depend on the order of the bits within a byte, so bytes from ``numpy.packbits`` in either bit order score
alike, as long as queries and database share it. Labels are integer class ids (one value, or one column, per item)
or 0/1 multi-hot rows (one column per class).
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from .data import DataFileError
from .index import HammingIndex, IndexFileError, atomic_write_bytes
from .ops import pack_codes

__all__ = ["PackedCodes", "check_file_type", "load_codes", "load_labels", "save_codes", "save_labels", "save_scores"]

_TEXT_DELIMITERS = {".txt": None, ".tsv": "\t", ".csv": ","}
_ARRAY_SUFFIXES = (".npy", ".pt", ".pth", *_TEXT_DELIMITERS)


@dataclass(frozen=True)
class PackedCodes:
    """Codes read from a file, packed (uint8 [n, bytes]); nbits where the file says it (real-valued codes and index
    files), None for files of packed bytes, whose last byte may hold padding."""

    packed: Tensor
    nbits: Optional[int]

    def __len__(self) -> int:
        return self.packed.shape[0]


def load_codes(path: Union[str, Path], name: str = "codes", packed: bool = False) -> PackedCodes:
    """Read a code file (see the module's formats); `name` (a flag, say) prefixes every error. packed: the array
    holds bytes of packed bits, not one value per bit (an index file always holds packed codes)."""
    path = Path(path)
    if check_file_type(path, name, codes=True) == ".bhi":
        try:
            index = HammingIndex.load(path)
        except IndexFileError as exc:
            raise DataFileError(f"{name}: {exc}") from None
        codes = PackedCodes(index.packed_codes, index.nbits)
    else:
        values = _read_array(path, name, 2)
        if packed:
            codes = PackedCodes(_as_bytes(values, path, name), None)
        else:
            if values.is_floating_point() and not bool(torch.isfinite(values).all()):
                raise DataFileError(f"{name} {path}: the codes hold NaN or infinite values")
            codes = PackedCodes(pack_codes(values > 0), values.shape[1])
    if len(codes) == 0:
        raise DataFileError(f"{name} {path}: holds no codes")
    return codes


def load_labels(path: Union[str, Path], name: str = "labels", rows: Optional[int] = None) -> Tensor:
    """Read a label file: int64 class ids [n] (one value or one column per item) or multi-hot rows [n, C] (bool).
    rows: the number of codes they label, checked."""
    path = Path(path)
    values = _read_array(path, name, 1)
    if values.dim() == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.is_floating_point():
        if not bool(torch.isfinite(values).all()):
            raise DataFileError(f"{name} {path}: the labels hold NaN or infinite values")
        if not bool((values == values.round()).all()):
            raise DataFileError(f"{name} {path}: labels must be integer class ids or 0/1 multi-hot rows, found "
                                "fractional values")
    labels = values.to(torch.int64) if values.dim() == 1 else values > 0
    if rows is not None and labels.shape[0] != rows:
        raise DataFileError(f"{name} {path}: {labels.shape[0]} rows of labels for {rows} codes")
    return labels


def check_file_type(path: Union[str, Path], name: str, codes: bool = False) -> str:
    """The file's suffix (lower case), if it names a format of this module (an index file only for codes)."""
    suffix = Path(path).suffix.lower()
    known = (*_ARRAY_SUFFIXES, ".bhi") if codes else _ARRAY_SUFFIXES
    if suffix not in known:
        raise DataFileError(f"{name} {path}: unknown file type {suffix or '(no suffix)'!r}; known: {', '.join(known)}")
    return suffix


def _read_array(path: Path, name: str, min_dims: int) -> Tensor:
    """The file's array as a tensor of 1 or 2 dimensions (at least min_dims) of numbers or booleans."""
    suffix = check_file_type(path, name)
    if not path.is_file():
        raise DataFileError(f"{name} {path}: no such file")
    try:
        with warnings.catch_warnings():  # the readers' warnings (an empty text file, say) become our checks' errors
            warnings.simplefilter("ignore")
            if suffix == ".npy":
                array = np.load(path, allow_pickle=False)
            elif suffix in (".pt", ".pth"):
                array = torch.load(path, map_location="cpu", weights_only=True)
            else:
                array = np.loadtxt(path, delimiter=_TEXT_DELIMITERS[suffix], ndmin=min_dims, dtype=np.float64)
    except Exception as exc:  # each reader has its own errors; any of them means the same to the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataFileError(f"{name} {path}: cannot be read as a {suffix} array ({reason})") from None
    if isinstance(array, np.ndarray):
        if array.dtype.kind not in "biuf":
            raise DataFileError(f"{name} {path}: expected numbers, found an array of {array.dtype}")
        if array.dtype.kind == "u" and array.dtype.itemsize > 1:  # torch's wide unsigned types lack most ops
            array = array.astype(np.int64)
        elif not array.dtype.isnative:  # written on a machine of the other byte order: torch reads native only
            array = array.astype(array.dtype.newbyteorder("="))
        array = torch.from_numpy(np.ascontiguousarray(array))
    elif not isinstance(array, Tensor):
        raise DataFileError(f"{name} {path}: expected one tensor saved with torch.save, found {type(array).__name__}")
    elif array.is_complex():
        raise DataFileError(f"{name} {path}: expected real numbers, found a {array.dtype} tensor")
    if not min_dims <= array.dim() <= 2:
        shape = "[n] or [n, columns]" if min_dims == 1 else "[n, columns]"
        raise DataFileError(f"{name} {path}: expected a {shape} array, found shape {tuple(array.shape)}")
    if array.dim() == 2 and array.shape[1] == 0:
        raise DataFileError(f"{name} {path}: the rows are empty")
    return array


def _as_bytes(values: Tensor, path: Path, name: str) -> Tensor:
    if values.dtype == torch.uint8:
        return values
    is_bytes = values.dtype != torch.bool and bool(((values >= 0) & (values <= 255)).all())
    if is_bytes and values.is_floating_point():
        is_bytes = bool((values == values.round()).all())
    if not is_bytes:
        raise DataFileError(f"{name} {path}: packed codes must be bytes (integers 0 to 255); without --packed, each "
                            "column is one bit")
    return values.to(torch.uint8)


def save_codes(path: Union[str, Path], codes: Tensor, name: str = "codes") -> None:
    """Write real-valued codes [n, bits] (bit = value > 0) in the format the suffix names, atomically: ±1 int8
    columns in an array or text file (read back by :func:`load_codes`), or packed in a HammingIndex file (``.bhi``)."""
    path = Path(path)
    if not isinstance(codes, Tensor) or codes.dim() != 2 or codes.is_complex():
        raise ValueError(f"{name}: expected real codes [n, bits]")
    if check_file_type(path, name, codes=True) == ".bhi":
        index = HammingIndex(codes.shape[1])
        index.add(codes.cpu())
        index.save(path)
        return
    _write_array(path, torch.where(codes.cpu() > 0, 1, -1).to(torch.int8), name)


def save_labels(path: Union[str, Path], labels: Tensor, name: str = "labels") -> None:
    """Write labels (class ids [n], or multi-hot rows [n, C] as 0/1) in the format the suffix names, atomically."""
    if not isinstance(labels, Tensor) or labels.dim() not in (1, 2) or labels.is_floating_point():
        raise ValueError(f"{name}: expected integer class ids [n] or multi-hot rows [n, C]")
    _write_array(Path(path), (labels > 0).to(torch.uint8) if labels.dim() == 2 else labels.to(torch.int64), name)


def save_scores(path: Union[str, Path], scores: Tensor, name: str = "scores") -> None:
    """Write one number per query (float [q], such as each query's AP) in the format the suffix names, atomically;
    text keeps every digit (%.17g), so a file read back holds the same float64 values."""
    if not isinstance(scores, Tensor) or scores.dim() != 1 or not scores.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor [q] of per-query scores")
    _write_array(Path(path), scores.detach().cpu().double(), name)


def _write_array(path: Path, values: Tensor, name: str) -> None:
    suffix = check_file_type(path, name)
    buffer = io.BytesIO()
    if suffix == ".npy":
        np.save(buffer, values.numpy(), allow_pickle=False)
    elif suffix in (".pt", ".pth"):
        torch.save(values.clone(), buffer)
    else:
        rows = values.numpy() if values.dim() == 2 else values.numpy()[:, None]
        fmt = "%.17g" if values.is_floating_point() else "%d"
        np.savetxt(buffer, rows, fmt=fmt, delimiter=_TEXT_DELIMITERS[suffix] or " ")
    atomic_write_bytes(path, [buffer.getvalue()])
