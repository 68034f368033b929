"""Data: idx files (plain and gzip, with their errors), Fashion-MNIST, CIFAR-10 and list-file loading, splits,
two-view views."""
import gzip
import struct

import numpy as np
import pytest
import torch

from brcd.data import (DataFileError, TwoViewDataset, load_cifar10, load_fashion_mnist, load_image_list, make_split,
                       read_idx, read_list_file, synthetic_data, to_device, two_view_transform)
from conftest import device_params


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


def write_image_list(root, name, rows, size=(20, 12)):
    """Writes PNG images of flat colours and a list file for them; rows are multi-hot label lists."""
    from PIL import Image

    (root / "img").mkdir(exist_ok=True)
    lines = []
    for i, labels in enumerate(rows):
        colour = (40 * i % 256, 200, 17 * sum(labels) % 256)
        Image.new("RGB", size, colour).save(root / "img" / f"{name}{i}.png")
        lines.append(f"img/{name}{i}.png " + " ".join(str(v) for v in labels))
    (root / f"{name}.txt").write_text("# path labels\n" + "\n".join(lines) + "\n")


def test_load_image_list_multi_hot(tmp_path):
    train_rows = [[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 1]]
    write_image_list(tmp_path, "train", train_rows)
    write_image_list(tmp_path, "test", [[1, 0, 0], [0, 0, 1]])
    data = load_image_list(tmp_path, image_size=8, progress=False)
    assert data.train_images.shape == (6, 3, 8, 8) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (2, 3, 8, 8) and data.num_classes == 3
    assert data.train_labels.tolist() == train_rows and data.train_labels.dtype == torch.int64
    # Flat colours survive the resize: image 1 is (40, 200, 17).
    assert data.train_images[1, :, 4, 4].tolist() == [40, 200, 17]
    gray = load_image_list(tmp_path, image_size=4, channels=1, progress=False)
    assert gray.train_images.shape == (6, 1, 4, 4)


@pytest.mark.parametrize("content, needle", [
    ("img/a.png 0 2\n", "labels must be 0 or 1"),
    ("img/a.png 0 x\n", "labels must be 0 or 1"),
    ("img/a.png\n", "image path and its 0/1 labels"),
    ("img/a.png 0 1\nimg/b.png 1\n", ":2: 1 labels"),
    ("# only a comment\n", "no images"),
])
def test_read_list_file_errors(tmp_path, content, needle):
    (tmp_path / "train.txt").write_text(content)
    with pytest.raises(DataFileError, match=needle):
        read_list_file(tmp_path / "train.txt")


def test_load_image_list_missing_and_corrupt_images(tmp_path):
    write_image_list(tmp_path, "train", [[1, 0], [0, 1]])
    write_image_list(tmp_path, "test", [[1, 0]])
    (tmp_path / "img" / "train1.png").write_bytes(b"not an image")
    with pytest.raises(DataFileError, match="train1.png: cannot be decoded"):
        load_image_list(tmp_path, progress=False)
    (tmp_path / "img" / "train1.png").unlink()
    with pytest.raises(DataFileError, match="train1.png: no such image"):
        load_image_list(tmp_path, progress=False)
    (tmp_path / "test.txt").unlink()
    with pytest.raises(DataFileError, match="test.txt: no such file"):
        load_image_list(tmp_path, progress=False)


def test_multi_label_split_draws_labelled_images():
    gen = torch.Generator().manual_seed(0)
    labels = (torch.rand(400, 5, generator=gen) < 0.3).long()
    labels[:20] = 0  # unlabelled images are never drawn for training
    split = make_split(labels, torch.zeros(60, 5, dtype=torch.long), train_per_class=10, val_queries=20,
                       test_queries=30, seed=3)
    assert len(split.train) == 50 and len(set(split.train.tolist())) == 50
    assert bool(labels[split.train].any(dim=1).all())
    assert len(split.val_queries) == 20 and len(split.test_queries) == 30
    again = make_split(labels, torch.zeros(60, 5, dtype=torch.long), train_per_class=10, val_queries=20,
                       test_queries=30, seed=3)
    assert torch.equal(split.train, again.train)
    with pytest.raises(ValueError, match="labelled training images"):
        make_split(labels, torch.zeros(60, 5, dtype=torch.long), train_per_class=100, val_queries=20)


@pytest.mark.parametrize("device", device_params())
def test_to_device_copies_from_the_host_and_leaves_the_rest(device):
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    moved = to_device(images, device)
    assert moved.device.type == device and torch.equal(moved.cpu(), images)
    assert to_device(moved, device) is moved  # already there: no copy
    if device != "cpu":
        assert torch.equal(to_device(moved, "cpu"), images)
