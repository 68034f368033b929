"""Datasets for hashing: Fashion-MNIST idx files, CIFAR-10's python folder, image list files with multi-hot labels
(NUS-WIDE / MS COCO style), the hashing protocol's splits, two-view augmentations, and a tiny synthetic set for tests.
Nothing is ever downloaded: data comes from local files.

>>> data = load_fashion_mnist()                      # /usr/share/datasets/fashion-mnist (Debian's package)
>>> split = make_split(data.train_labels, data.test_labels, train_per_class=200, seed=0)
"""
from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DataFileError",
    "ImageData",
    "HashingSplit",
    "DEFAULT_FASHION_MNIST_DIR",
    "read_idx",
    "load_fashion_mnist",
    "load_cifar10",
    "load_image_list",
    "read_list_file",
    "make_split",
    "synthetic_data",
    "two_view_transform",
    "TwoViewDataset",
    "to_model_input",
]

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataFileError(ValueError):
    """A data file that is missing, truncated or not of the expected format."""


def read_idx(path: Union[str, Path]) -> np.ndarray:
    """Read an idx file (the MNIST format), plain or gzip-compressed, checking its header against its size."""
    path = Path(path)
    if not path.exists():
        raise DataFileError(f"{path}: no such file")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataFileError(f"{path}: cannot be read ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataFileError(f"{path}: not an idx file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataFileError(f"{path}: truncated idx header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DataFileError(f"{path}: {len(raw)} bytes but its header {shape} needs {expected}: truncated or corrupt")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


@dataclass
class ImageData:
    train_images: Tensor  # uint8 [n, C, H, W]
    train_labels: Tensor  # int64: class ids [n], or multi-hot 0/1 [n, num_classes]
    test_images: Tensor
    test_labels: Tensor
    num_classes: int
    name: str


def _find(data_dir: Path, stem: str) -> Path:
    for candidate in (data_dir / f"{stem}.gz", data_dir / stem):
        if candidate.exists():
            return candidate
    raise DataFileError(
        f"{data_dir}: no {stem}[.gz]. Install Debian's dataset-fashion-mnist package (apt-get install "
        f"dataset-fashion-mnist) or point --data-dir at a folder with the four idx files."
    )


def load_cifar10(data_dir: Union[str, Path]) -> ImageData:
    """CIFAR-10 from its python-pickle folder (data_batch_1..5 and test_batch, as the official tarball unpacks)."""
    import pickle

    root = Path(data_dir)

    def batch(name):
        path = root / name
        if not path.exists():
            raise DataFileError(f"{path}: no such file (expected the CIFAR-10 python folder: data_batch_1..5, "
                                f"test_batch)")
        try:
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            images = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = np.asarray(d[b"labels"], dtype=np.int64)
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as exc:
            raise DataFileError(f"{path}: not a CIFAR-10 batch ({type(exc).__name__})") from None
        if len(images) != len(labels) or labels.min() < 0 or labels.max() > 9:
            raise DataFileError(f"{path}: images and labels do not match")
        return images, labels

    train = [batch(f"data_batch_{i}") for i in range(1, 6)]
    test_images, test_labels = batch("test_batch")
    return ImageData(torch.from_numpy(np.concatenate([t[0] for t in train])),
                     torch.from_numpy(np.concatenate([t[1] for t in train])),
                     torch.from_numpy(test_images), torch.from_numpy(test_labels), 10, "cifar10")


def read_list_file(path: Union[str, Path]) -> Tuple[List[Path], np.ndarray]:
    """A list file: one image per line, its path (relative to the list file's folder, or absolute) and then one
    0/1 label per class, as the NUS-WIDE and MS COCO hashing lists are written. Blank lines and lines starting with
    # are skipped. Returns the image paths and the multi-hot labels, int64 [n, num_classes]."""
    path = Path(path)
    if not path.exists():
        raise DataFileError(f"{path}: no such file")
    paths, rows = [], []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) < 2:
                raise DataFileError(f"{path}:{line_no}: expected an image path and its 0/1 labels")
            try:
                labels = [int(v) for v in fields[1:]]
            except ValueError:
                raise DataFileError(f"{path}:{line_no}: labels must be 0 or 1, got {' '.join(fields[1:])!r}") from None
            if any(v not in (0, 1) for v in labels):
                raise DataFileError(f"{path}:{line_no}: labels must be 0 or 1, got {' '.join(fields[1:])!r}")
            if rows and len(labels) != len(rows[0]):
                raise DataFileError(f"{path}:{line_no}: {len(labels)} labels, but the first line has {len(rows[0])}")
            image = Path(fields[0])
            paths.append(image if image.is_absolute() else path.parent / image)
            rows.append(labels)
    if not rows:
        raise DataFileError(f"{path}: no images listed")
    return paths, np.asarray(rows, dtype=np.int64)


def _decode_images(paths: List[Path], size: int, channels: int, desc: str, progress: bool) -> Tensor:
    from PIL import Image, UnidentifiedImageError
    from tqdm.auto import tqdm

    out = np.empty((len(paths), size, size, channels), dtype=np.uint8)
    mode = "RGB" if channels == 3 else "L"
    for i, p in enumerate(tqdm(paths, desc=desc, disable=not progress, leave=False)):
        try:
            with Image.open(p) as img:
                img = img.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
                out[i] = np.asarray(img).reshape(size, size, channels)
        except FileNotFoundError:
            raise DataFileError(f"{p}: no such image (listed in the {desc} list)") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise DataFileError(f"{p}: cannot be decoded as an image ({exc})") from None
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def load_image_list(data_dir: Union[str, Path], *, image_size: int = 32, channels: int = 3,
                    progress: bool = True) -> ImageData:
    """The user's own images from DATA_DIR/train.txt and DATA_DIR/test.txt (see read_list_file), decoded and resized
    to image_size x image_size. The training list is the pool of the training subset and the database, the test
    list that of the queries, as in the CIFAR-10 protocol. Labels are multi-hot [n, num_classes]."""
    if image_size < 1 or channels not in (1, 3):
        raise ValueError(f"image_size must be positive and channels 1 or 3, got {image_size} and {channels}")
    root = Path(data_dir)
    train_paths, train_labels = read_list_file(root / "train.txt")
    test_paths, test_labels = read_list_file(root / "test.txt")
    if train_labels.shape[1] != test_labels.shape[1]:
        raise DataFileError(f"{root}: train.txt has {train_labels.shape[1]} classes but test.txt has "
                            f"{test_labels.shape[1]}")
    return ImageData(_decode_images(train_paths, image_size, channels, "train", progress),
                     torch.from_numpy(train_labels),
                     _decode_images(test_paths, image_size, channels, "test", progress),
                     torch.from_numpy(test_labels), int(train_labels.shape[1]), root.name or "images")


def load_fashion_mnist(data_dir: Optional[Union[str, Path]] = None) -> ImageData:
    """Fashion-MNIST from its four standard idx files (gzip or plain)."""
    root = Path(data_dir) if data_dir is not None else DEFAULT_FASHION_MNIST_DIR
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataFileError(f"{root}: {split} images {images.shape} and labels {labels.shape} do not match")
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise DataFileError(f"{root}: {split} labels outside 0..9")
        parts[split] = (torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
    return ImageData(parts["train"][0], parts["train"][1], parts["test"][0], parts["test"][1], 10, "fashion-mnist")


@dataclass
class HashingSplit:
    """Indices of the hashing protocol (CIBHash / BRCD style), drawn with a recorded seed.

    train: a class-balanced subset of the training split (for training and clustering); database: the training
    split (or a random subset of it); val_queries and test_queries: disjoint subsets of the test split.
    """
    train: Tensor
    database: Tensor
    val_queries: Tensor
    test_queries: Tensor
    seed: int


def make_split(train_labels: Tensor, test_labels: Tensor, *, train_per_class: int = 500, val_queries: int = 1000,
               test_queries: int = 1000, database_size: Optional[int] = None, seed: int = 0) -> HashingSplit:
    """Class ids [n]: train_per_class images of every class. Multi-hot labels [n, C] (an image may belong to several
    classes, so classes cannot be balanced exactly): train_per_class * C images drawn at random among those with at
    least one label, as the NUS-WIDE and MS COCO protocols draw theirs."""
    gen = torch.Generator().manual_seed(seed)
    if train_labels.dim() == 2:
        labelled = (train_labels > 0).any(dim=1).nonzero().flatten()
        want = train_per_class * train_labels.shape[1]
        if len(labelled) < want:
            raise ValueError(f"{len(labelled)} labelled training images, fewer than train_per_class x classes = "
                             f"{want}")
        train = [labelled[torch.randperm(len(labelled), generator=gen)[:want]]]
    else:
        train = []
        for c in range(int(train_labels.max()) + 1):
            idx = (train_labels == c).nonzero().flatten()
            if len(idx) < train_per_class:
                raise ValueError(f"class {c} has {len(idx)} training images, fewer than "
                                 f"train_per_class={train_per_class}")
            train.append(idx[torch.randperm(len(idx), generator=gen)[:train_per_class]])
    if val_queries + test_queries > len(test_labels):
        raise ValueError(f"val_queries + test_queries exceeds the {len(test_labels)} test images")
    order = torch.randperm(len(test_labels), generator=gen)
    n_db = len(train_labels) if database_size is None else min(database_size, len(train_labels))
    database = torch.randperm(len(train_labels), generator=gen)[:n_db].sort().values
    return HashingSplit(torch.cat(train).sort().values, database, order[:val_queries].sort().values,
                        order[val_queries : val_queries + test_queries].sort().values, seed)


def synthetic_data(num_train: int = 256, num_test: int = 128, classes: int = 4, size: int = 16,
                   seed: int = 0) -> ImageData:
    """A tiny image set for tests: each class is a fixed random pattern plus noise."""
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.rand(classes, 1, size, size, generator=gen) * 255

    def draw(n):
        labels = torch.randint(0, classes, (n,), generator=gen)
        noise = torch.randn(n, 1, size, size, generator=gen) * 40
        return (patterns[labels] + noise).clamp(0, 255).to(torch.uint8), labels

    (tr, trl), (te, tel) = draw(num_train), draw(num_test)
    return ImageData(tr, trl, te, tel, classes, "synthetic")


def to_device(tensor: Tensor, device) -> Tensor:
    """`tensor` on `device`; from the host to a GPU through pinned memory, so that the copy does not wait for the GPU's
    queue of work (a copy from pageable memory synchronises the stream first)."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def to_model_input(images: Tensor) -> Tensor:
    """uint8 images [n, C, H, W] to float in [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def two_view_transform(size: int, channels: int):
    """SimCLR / CIBHash style augmentation sized to the images: random resized crop, flip, brightness and contrast
    jitter (colour jitter and random grayscale for RGB), blur. One image at a time, in the data loader;
    `brcd.augment.BatchAugment` draws the same on a whole batch at once, on the training device."""
    from torchvision.transforms import v2

    from . import augment as law  # the law's values (imported here: brcd.augment imports this module)

    ops = [v2.RandomResizedCrop(size, scale=law.CROP_SCALE, ratio=law.CROP_RATIO, antialias=True),
           v2.RandomHorizontalFlip(p=law.FLIP_P)]
    jitter = dict(brightness=law.BRIGHTNESS, contrast=law.CONTRAST)
    if channels == 3:
        ops += [v2.RandomApply([v2.ColorJitter(**jitter, saturation=law.SATURATION, hue=law.HUE)], p=law.JITTER_P),
                v2.RandomGrayscale(p=law.GRAYSCALE_P)]
    else:
        ops += [v2.RandomApply([v2.ColorJitter(**jitter)], p=law.JITTER_P)]
    ops += [v2.RandomApply([v2.GaussianBlur(3, sigma=law.BLUR_SIGMA)], p=law.BLUR_P)]
    return v2.Compose(ops)


class TwoViewDataset(torch.utils.data.Dataset):
    """(view 1, view 2, index) of each image: two independent augmentations, as model input."""

    def __init__(self, images: Tensor, transform):
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = self.images[i]
        return to_model_input(self.transform(img)), to_model_input(self.transform(img)), i
