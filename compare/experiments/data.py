"""Datasets for the training comparison, and the one batching pipeline both frameworks share.

Nothing is downloaded at run time. The default is scikit-learn's copy of the UCI
handwritten digits (1,797 8x8 grey images, 10 classes), which ships inside the
``scikit-learn`` wheel: real data, small enough that a grid of runs in two frameworks
takes minutes on two CPU cores, and hard enough that BatchNorm and Dropout make a
visible difference. MNIST, Fashion-MNIST (IDX files, gzipped or not) and CIFAR-10 (the
python batches) are read from a folder the user already has.

Images are returned in torch layout (N, C, H, W), float32, normalised with the mean and
standard deviation of the *training* split only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from compare.io.datasets import (  # the readers of untrusted files live in io  # noqa: F401
    DataError,
    _check_labels,
    _find,
    _read_bounded,
    read_cifar_batch,
    read_idx,
)

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10")


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray  # (N, C, H, W) float32, normalised
    y_train: np.ndarray  # (N,) int64
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])


def _normalise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std from the training split only, applied to both."""
    axes = (0, 2, 3)
    mean = x_train.mean(axis=axes, keepdims=True)
    std = x_train.std(axis=axes, keepdims=True) + 1e-8
    return ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)


def digits(seed: int = 0, test_fraction: float = 0.5) -> Dataset:
    """scikit-learn's 8x8 digits, split into train and test with a fixed seed."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.float32)[:, None, :, :]  # (N, 8, 8) -> (N, 1, 8, 8), values 0..16
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = round(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    x_train, x_test = _normalise(x[train], x[test])
    return Dataset("digits", x_train, y[train], x_test, y[test], 10)


# --- IDX (MNIST, Fashion-MNIST) -------------------------------------------------------------

_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def idx_dataset(name: str, data_dir: Path) -> Dataset:
    arrays = {key: read_idx(_find(data_dir, stem)) for key, stem in _IDX_FILES.items()}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{data_dir}: {split} images {x.shape} and labels {y.shape} do not match")
        _check_labels(data_dir / _IDX_FILES[f"y_{split}"], y, 10)
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise DataError(
            f"{data_dir}: train images are {arrays['x_train'].shape[1:]} and test images {arrays['x_test'].shape[1:]}:"
            " the two splits must have one image size"
        )
    x_train, x_test = _normalise(
        arrays["x_train"][:, None].astype(np.float32), arrays["x_test"][:, None].astype(np.float32)
    )
    return Dataset(name, x_train, arrays["y_train"].astype(np.int64), x_test, arrays["y_test"].astype(np.int64), 10)


# --- CIFAR-10 python batches ----------------------------------------------------------------


def cifar10(data_dir: Path) -> Dataset:
    folder = data_dir / "cifar-10-batches-py" if (data_dir / "cifar-10-batches-py").is_dir() else data_dir
    train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
    for f in [*train_files, folder / "test_batch"]:
        if not f.is_file():
            raise DataError(f"missing file: expected {f}")
    parts = [read_cifar_batch(f) for f in train_files]
    x_test, y_test = read_cifar_batch(folder / "test_batch")
    x_train = np.concatenate([p[0] for p in parts]).astype(np.float32)
    y_train = np.concatenate([p[1] for p in parts])
    x_train, x_test = _normalise(x_train, x_test.astype(np.float32))
    return Dataset("cifar10", x_train, y_train, x_test, y_test, 10)


def load(name: str = "digits", data_dir: str | Path | None = None, seed: int = 0) -> Dataset:
    """One of ``DATASETS``; all but ``digits`` read from ``data_dir``."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if name == "digits":
        return digits(seed)
    if data_dir is None:
        raise ValueError(f"--dataset {name} needs --data-dir: the folder with its files (nothing is downloaded)")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: not a directory")
    return cifar10(data_dir) if name == "cifar10" else idx_dataset(name, data_dir)


def subset(ds: Dataset, n: int, label_noise: float = 0.0, seed: int = 0) -> Dataset:
    """A class-balanced subset of ``n`` training images (``n // num_classes`` per class),
    with a fraction ``label_noise`` of its labels replaced by a different class drawn
    uniformly; the test split is untouched. The same (n, label_noise, seed) gives the same
    subset to every run and framework."""
    per_class = n // ds.num_classes
    counts = np.bincount(ds.y_train, minlength=ds.num_classes)
    problems = []
    if per_class < 1:
        problems.append(f"n = {n} is fewer than one image per class ({ds.num_classes} classes)")
    if per_class > counts.min():
        problems.append(f"n = {n} needs {per_class} images per class; the smallest class has {counts.min()}")
    if not 0.0 <= label_noise < 1.0:
        problems.append(f"label_noise must be in [0, 1), got {label_noise}")
    if problems:
        raise ValueError(f"subset of {ds.name}: " + "; ".join(problems))
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.permutation(np.flatnonzero(ds.y_train == c))[:per_class] for c in range(ds.num_classes)])
    idx = rng.permutation(idx)
    y = ds.y_train[idx].copy()
    flip = rng.random(len(y)) < label_noise
    y[flip] = (y[flip] + rng.integers(1, ds.num_classes, int(flip.sum()))) % ds.num_classes  # never the true class
    return dataclasses.replace(ds, x_train=ds.x_train[idx], y_train=y)


def batches(n: int, batch_size: int, seed: int, epoch: int) -> Iterator[np.ndarray]:
    """Index arrays of one shuffled epoch (the last incomplete batch is dropped, so every
    step has the same shape). The same (seed, epoch) gives the same order to everyone."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start : start + batch_size]
