"""Data: idx files (plain and gzip, with their errors), Fashion-MNIST loading, splits, two-view views."""
import gzip
import struct

import numpy as np
import pytest
import torch

from brcd.data import (DataFileError, TwoViewDataset, load_cifar10, load_fashion_mnist, make_split, read_idx,
                       synthetic_data, two_view_transform)


def write_idx(path, array: np.ndarray, compress=False):
    code = {np.uint8: 0x08}[array.dtype.type]
    blob = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(blob) if compress else blob)


def fake_fashion_dir(tmp_path, n_train=60, n_test=30, compress=True):
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                  compress)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", (np.arange(n) % 10).astype(np.uint8), compress)
    return tmp_path


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_roundtrip(tmp_path, compress):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    write_idx(path, arr, compress)
    np.testing.assert_array_equal(read_idx(path), arr)


def test_read_idx_errors(tmp_path):
    arr = np.zeros((4, 5), dtype=np.uint8)
    good = tmp_path / "good.idx"
    write_idx(good, arr)
    data = good.read_bytes()
    cases = {"truncated": data[:-1], "bad magic": b"\x01\x00" + data[2:], "empty": b"", "header only": data[:6]}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(DataFileError):
            read_idx(tmp_path / name)
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataFileError, match="cannot be read"):
        read_idx(tmp_path / "bad.gz")
    with pytest.raises(DataFileError, match="no such file"):
        read_idx(tmp_path / "missing.idx")


def test_load_fashion_mnist_from_a_folder(tmp_path):
    data = load_fashion_mnist(fake_fashion_dir(tmp_path))
    assert data.train_images.shape == (60, 1, 28, 28) and data.train_images.dtype == torch.uint8
    assert data.test_labels.shape == (30,) and data.num_classes == 10
    with pytest.raises(DataFileError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nowhere")


def test_split_is_balanced_disjoint_and_seeded():
    data = synthetic_data(num_train=400, num_test=100, classes=4)
    split = make_split(data.train_labels, data.test_labels, train_per_class=20, val_queries=30, test_queries=40,
                       seed=5)
    assert len(split.train) == 80
    assert torch.bincount(data.train_labels[split.train], minlength=4).tolist() == [20] * 4
    assert len(set(split.val_queries.tolist()) & set(split.test_queries.tolist())) == 0
    assert len(split.database) == 400
    again = make_split(data.train_labels, data.test_labels, train_per_class=20, val_queries=30, test_queries=40,
                       seed=5)
    assert torch.equal(again.train, split.train) and torch.equal(again.test_queries, split.test_queries)
    with pytest.raises(ValueError, match="train_per_class"):
        make_split(data.train_labels, data.test_labels, train_per_class=1000)


def test_two_views_differ_and_are_model_input():
    torch.manual_seed(0)
    data = synthetic_data(num_train=8, size=16)
    ds = TwoViewDataset(data.train_images, two_view_transform(16, 1))
    a, b, i = ds[3]
    assert a.shape == (1, 16, 16) and a.dtype == torch.float32 and i == 3
    assert -1.0 <= float(a.min()) and float(a.max()) <= 1.0
    assert not torch.equal(a, b)


def test_load_cifar10_python_folder(tmp_path):
    import pickle

    rng = np.random.default_rng(1)
    for name, n in [(f"data_batch_{i}", 20) for i in range(1, 6)] + [("test_batch", 10)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(np.arange(n) % 10)}
        with open(tmp_path / name, "wb") as f:
            pickle.dump(batch, f)
    data = load_cifar10(tmp_path)
    assert data.train_images.shape == (100, 3, 32, 32) and data.test_images.shape == (10, 3, 32, 32)
    assert data.train_labels.dtype == torch.int64 and data.num_classes == 10
    (tmp_path / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DataFileError, match="not a CIFAR-10 batch"):
        load_cifar10(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(DataFileError, match="data_batch_3"):
        load_cifar10(tmp_path)
