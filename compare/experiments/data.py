"""Datasets for the training comparison, and the one batching pipeline both frameworks share.

Nothing is downloaded at run time. The default is scikit-learn's copy of the UCI
handwritten digits (1,797 8x8 grey images, 10 classes), which ships inside the
``scikit-learn`` wheel: real data, small enough that a grid of runs in two frameworks
takes minutes on two CPU cores, and hard enough that BatchNorm and Dropout make a
visible difference. ``synthetic`` is an image task generated from the seed, whose
difficulty its parameters set (``compare.experiments.synthetic``). MNIST, Fashion-MNIST
(IDX files, gzipped or not) and CIFAR-10 (the python batches) are read from a folder the
user already has. Each seed can draw its own split (train, validation, test) and its own
subsets.

Images are returned in torch layout (N, C, H, W), float32, normalised with the mean and
standard deviation of the *training* split only.
"""

from __future__ import annotations

import dataclasses
import functools
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

DATASETS = ("digits", "synthetic", "mnist", "fashion_mnist", "cifar10")
# numpy streams of one seed, one per purpose: SeedSequence([seed, tag]); the batches use
# [seed, epoch] with epochs far below these tags, so no two purposes share a stream
SPLIT_STREAM, SUBSET_STREAM, SYNTHETIC_STREAM = 2**31 + 1, 2**31 + 2, 2**31 + 3


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray  # (N, C, H, W) float32, normalised
    y_train: np.ndarray  # (N,) int64
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    x_val: np.ndarray | None = None  # the validation split (learning rates are chosen on it), when drawn
    y_val: np.ndarray | None = None
    y_train_true: np.ndarray | None = None  # the true training labels when some of y_train are made wrong

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])


def _normalise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std from the training split only, applied to both."""
    axes = (0, 2, 3)
    mean = x_train.mean(axis=axes, keepdims=True)
    std = x_train.std(axis=axes, keepdims=True) + 1e-8
    return ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.float32)[:, None, :, :]  # (N, 8, 8) -> (N, 1, 8, 8), values 0..16
    x.flags.writeable = False
    y = bunch.target.astype(np.int64)
    y.flags.writeable = False
    return x, y


def split(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    seed: int,
    test_fraction: float,
    val_fraction: float = 0.0,
) -> Dataset:
    """Train, test and (``val_fraction > 0``) validation splits of one set of images, drawn
    from ``seed``, normalised with the training split's statistics."""
    if not (0 < test_fraction and 0 <= val_fraction and test_fraction + val_fraction < 1):
        raise ValueError(f"fractions test {test_fraction} and validation {val_fraction}: each in [0, 1), sum < 1")
    order = np.random.default_rng(seed).permutation(len(x))
    n_test, n_val = round(len(x) * test_fraction), round(len(x) * val_fraction)
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    x_train, x_test = _normalise(x[train], x[test])
    ds = Dataset(name, x_train, y[train], x_test, y[test], num_classes)
    if n_val:
        _, x_val = _normalise(x[train], x[val])
        ds = dataclasses.replace(ds, x_val=x_val, y_val=y[val])
    return ds


def digits(seed: int = 0, test_fraction: float = 0.5, val_fraction: float = 0.0) -> Dataset:
    """scikit-learn's 8x8 digits, split into train, test and (``val_fraction > 0``)
    validation with ``seed``: seed 0 without a validation split is 0.2's fixed split."""
    x, y = _digits_arrays()
    if val_fraction:  # a seed's own split (0.2's digits(0) keeps its exact permutation)
        seed = np.random.SeedSequence([seed, SPLIT_STREAM])
    return split("digits", x, y, 10, seed, test_fraction, val_fraction)


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


def load(
    name: str = "digits",
    data_dir: str | Path | None = None,
    seed: int = 0,
    *,
    val_fraction: float = 0.0,
    test_fraction: float = 0.5,
    synthetic: dict | None = None,
) -> Dataset:
    """One of ``DATASETS``; all but ``digits`` and ``synthetic`` read from ``data_dir``.

    ``seed`` draws the split (digits, and the validation split of the others) and, for
    ``synthetic``, the images themselves (``synthetic``: its parameters,
    :func:`compare.experiments.synthetic.images`). ``val_fraction`` of the images
    (of the training split, for datasets that ship their own test split) become a
    validation split."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if name == "digits":
        return digits(seed, test_fraction, val_fraction)
    if name == "synthetic":
        from compare.experiments import synthetic as synth

        x, y = synth.images(seed, **(synthetic or {}))
        return split("synthetic", x, y, int(y.max()) + 1, np.random.SeedSequence([seed, SPLIT_STREAM]),
                     test_fraction, val_fraction)  # fmt: skip
    if data_dir is None:
        raise ValueError(f"--dataset {name} needs --data-dir: the folder with its files (nothing is downloaded)")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: not a directory")
    ds = cifar10(data_dir) if name == "cifar10" else idx_dataset(name, data_dir)
    return with_validation(ds, val_fraction, seed) if val_fraction else ds


def with_validation(ds: Dataset, fraction: float, seed: int) -> Dataset:
    """``fraction`` of the training split, drawn with ``seed``, becomes the validation split
    (the training statistics that normalised both are kept)."""
    order = np.random.default_rng([seed, SPLIT_STREAM]).permutation(len(ds.x_train))
    n_val = round(len(order) * fraction)
    val, train = order[:n_val], order[n_val:]
    return dataclasses.replace(
        ds, x_train=ds.x_train[train], y_train=ds.y_train[train], x_val=ds.x_train[val], y_val=ds.y_train[val]
    )


def subset(ds: Dataset, n: int, label_noise: float = 0.0, seed: int = 0) -> Dataset:
    """A class-balanced subset of ``n`` training images (``n // num_classes`` per class),
    with a fraction ``label_noise`` of its labels replaced by a different class drawn
    uniformly (``y_train_true`` keeps the true ones); the test and validation splits are
    untouched. The same (n, seed) gives the same images whatever the noise, and the same
    (n, label_noise, seed) the same subset to every run and framework; each seed draws its
    own images and its own wrong labels."""
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
    rng = np.random.default_rng([seed, SUBSET_STREAM])
    idx = np.concatenate([rng.permutation(np.flatnonzero(ds.y_train == c))[:per_class] for c in range(ds.num_classes)])
    idx = rng.permutation(idx)
    y = ds.y_train[idx].copy()
    flip = rng.random(len(y)) < label_noise
    y[flip] = (y[flip] + rng.integers(1, ds.num_classes, int(flip.sum()))) % ds.num_classes  # never the true class
    return dataclasses.replace(ds, x_train=ds.x_train[idx], y_train=y, y_train_true=ds.y_train[idx].copy())


def batches(n: int, batch_size: int, seed: int, epoch: int) -> Iterator[np.ndarray]:
    """Index arrays of one shuffled epoch (the last incomplete batch is dropped, so every
    step has the same shape). The same (seed, epoch) gives the same order to everyone."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start : start + batch_size]
