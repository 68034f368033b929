"""HammingIndex: add/search/len/to/save/load, the file format's checks and atomic writes."""
import os
import struct

import numpy as np
import pytest
import torch

import brcd
from brcd import reference as ref
from brcd.index import HEADER_SIZE, HammingIndex, IndexFileError
from conftest import device_params


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("nbits", [7, 64, 130])
def test_add_search_matches_reference(device, nbits):
    gen = torch.Generator().manual_seed(nbits)
    index = HammingIndex(nbits, device=device)
    a, b = torch.randn(300, nbits, generator=gen), torch.randn(200, nbits, generator=gen).sign()
    assert torch.equal(index.add(a), torch.arange(300))
    assert torch.equal(index.add(b), torch.arange(300, 500))
    assert len(index) == 500
    q = torch.randn(9, nbits, generator=gen)
    d, i = index.search(q, 25)
    rd, ri = ref.hamming_topk(ref.pack_codes(q), ref.pack_codes(torch.cat([a, b])), 25)
    assert torch.equal(d.cpu(), rd) and torch.equal(i.cpu(), ri)
    d2, i2 = index.search_packed(brcd.pack_codes(q), 25)
    assert torch.equal(d2, d) and torch.equal(i2, i)


@pytest.mark.parametrize("device", device_params())
def test_many_small_adds_grow_the_storage_without_changing_anything(device, tmp_path):
    """Codes added in batches of every size (the storage grows past its room several times) are the same codes, ids
    and results as one add; a view taken earlier keeps its values; the index still grows after a save, a load and a
    move."""
    gen = torch.Generator().manual_seed(3)
    codes = brcd.pack_codes(torch.randn(5000, 70, generator=gen))
    index = HammingIndex(70, device=device)
    start, views = 0, []
    for m in (1, 2, 1000, 3, 1021, 1, 2500, 472):
        assert torch.equal(index.add_packed(codes[start : start + m]), torch.arange(start, start + m))
        start += m
        views.append((start, index.packed_codes))
    assert len(index) == 5000 and torch.equal(index.packed_codes.cpu(), codes)
    for count, view in views:
        assert torch.equal(view.cpu(), codes[:count])
    q = codes[:7]
    want = ref.hamming_topk(q, codes, 30)
    assert all(torch.equal(g.cpu(), w) for g, w in zip(index.search_packed(q, 30), want))
    index.save(tmp_path / "grown.bhi")
    loaded = HammingIndex.load(tmp_path / "grown.bhi", device=device)
    for again in (loaded, index.to(device)):
        assert torch.equal(again.add_packed(codes[:5]), torch.arange(5000, 5005))
        assert torch.equal(again.packed_codes.cpu(), torch.cat([codes, codes[:5]]))


def test_save_load_roundtrip(tmp_path):
    index = HammingIndex(65)
    index.add(torch.randn(123, 65))
    path = tmp_path / "codes.bhi"
    index.save(path)
    loaded = HammingIndex.load(path)
    assert loaded.nbits == 65 and len(loaded) == 123
    assert torch.equal(loaded.packed_codes, index.packed_codes)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    empty = HammingIndex(16)
    empty.save(tmp_path / "empty.bhi")
    assert len(HammingIndex.load(tmp_path / "empty.bhi")) == 0


def test_corrupt_and_truncated_files_raise(tmp_path):
    index = HammingIndex(64)
    index.add(torch.randn(50, 64))
    path = tmp_path / "codes.bhi"
    index.save(path)
    data = path.read_bytes()
    cases = {
        "truncated": data[:-3],
        "too short": data[:10],
        "bad magic": b"XXXXXXXX" + data[8:],
        "flipped payload bit": data[:HEADER_SIZE + 5] + bytes([data[HEADER_SIZE + 5] ^ 1]) + data[HEADER_SIZE + 6:],
        "future version": data[:8] + struct.pack("<I", 99) + data[12:],
        "count too large": data[:16] + struct.pack("<Q", 51) + data[24:],
    }
    for name, blob in cases.items():
        bad = tmp_path / f"{name}.bhi"
        bad.write_bytes(blob)
        with pytest.raises(IndexFileError):
            HammingIndex.load(bad)
    with pytest.raises(IndexFileError, match="no such"):
        HammingIndex.load(tmp_path / "missing.bhi")


def test_failed_save_keeps_the_good_file(tmp_path, monkeypatch):
    path = tmp_path / "codes.bhi"
    good = HammingIndex(32)
    good.add(torch.randn(10, 32))
    good.save(path)
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    other = HammingIndex(32)
    other.add(torch.randn(99, 32))
    with pytest.raises(OSError):
        other.save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["codes.bhi"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="nbits"):
        HammingIndex(0)
    index = HammingIndex(16)
    with pytest.raises(ValueError, match="empty"):
        index.search(torch.randn(1, 16), 1)
    index.add(torch.randn(5, 16))
    with pytest.raises(ValueError, match="shape"):
        index.add(torch.randn(5, 15))
    with pytest.raises(TypeError, match="packed"):
        index.add(brcd.pack_codes(torch.randn(5, 16)))  # packed bytes through the real-codes path
    with pytest.raises(ValueError, match="packed"):
        index.add_packed(torch.randn(5, 16))
    with pytest.raises(ValueError, match="k must be between 1 and the index size 5, got 6"):
        index.search(torch.randn(1, 16), 6)
    for bad in (2.0, True, "3"):  # the searches' shared checks: a type error names the argument
        with pytest.raises(TypeError, match="k must be an int"):
            index.search(torch.randn(1, 16), bad)
        with pytest.raises(TypeError, match="radius must be an int"):
            index.range_search(torch.randn(1, 16), bad)
    with pytest.raises(ValueError, match="radius must be a non-negative Hamming distance, got -1"):
        index.range_search(torch.randn(1, 16), -1)
    assert index.search(torch.randn(1, 16), np.int64(2))[1].shape == (1, 2)  # NumPy integers are integers
    odd = HammingIndex(12)
    with pytest.raises(ValueError, match="beyond nbits"):
        odd.add_packed(torch.full((1, 2), 255, dtype=torch.uint8))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_device_keeps_results():
    index = HammingIndex(64)
    index.add(torch.randn(1000, 64))
    q = torch.randn(4, 64)
    d, i = index.search(q, 10)
    index.to("cuda")
    d2, i2 = index.search(q, 10)
    assert torch.equal(d, d2.cpu()) and torch.equal(i, i2.cpu())


def test_faiss_round_trip():
    faiss = pytest.importorskip("faiss")
    codes = torch.randn(3000, 64, generator=torch.Generator().manual_seed(5))
    index = HammingIndex(64)
    index.add(codes)
    flat = index.to_faiss()
    assert isinstance(flat, faiss.IndexBinaryFlat) and flat.ntotal == 3000 and flat.d == 64
    queries = torch.randn(7, 64, generator=torch.Generator().manual_seed(6))
    d_faiss, _ = flat.search(brcd.pack_codes(queries).numpy(), 20)
    d, _ = index.search(queries, 20)
    assert (d.numpy() == d_faiss).all()
    back = HammingIndex.from_faiss(flat)
    assert back.nbits == 64 and torch.equal(back.packed_codes, index.packed_codes)
    hnsw = faiss.IndexBinaryHNSW(64, 8)  # any binary index that can give its codes back
    hnsw.add(index.packed_codes.numpy())
    assert torch.equal(HammingIndex.from_faiss(hnsw).packed_codes, index.packed_codes)
    empty = HammingIndex.from_faiss(faiss.IndexBinaryFlat(128))
    assert len(empty) == 0 and empty.nbits == 128 and HammingIndex(16).to_faiss().ntotal == 0
    with pytest.raises(ValueError, match="multiple of 8"):
        HammingIndex(12).to_faiss()
    with pytest.raises(TypeError, match="faiss binary index"):
        HammingIndex.from_faiss(faiss.IndexFlatL2(8))
