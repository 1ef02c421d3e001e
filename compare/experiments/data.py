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
import gzip
import io
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10")


class DataError(ValueError):
    """A dataset file that is missing or not in the expected format; names the file."""


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


def _find(data_dir: Path, stem: str) -> Path:
    for candidate in (data_dir / stem, data_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"missing file: expected {data_dir / stem} or {data_dir / stem}.gz")


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (gzipped or not): magic 0x0803 (images, 3 dims) or 0x0801 (labels)."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a valid gzip file ({e})") from None
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    zero, dtype_code, ndim = raw[0] << 8 | raw[1], raw[2], raw[3]
    if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3):
        raise DataError(
            f"{path}: wrong magic number 0x{raw[:4].hex()}: expected 0x00000801 (labels) or 0x00000803 (images)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes, expected {header})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(f"{path}: {len(raw)} bytes, expected {expected} for an array of shape {shape} (truncated?)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def idx_dataset(name: str, data_dir: Path) -> Dataset:
    arrays = {key: read_idx(_find(data_dir, stem)) for key, stem in _IDX_FILES.items()}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{data_dir}: {split} images {x.shape} and labels {y.shape} do not match")
    x_train, x_test = _normalise(
        arrays["x_train"][:, None].astype(np.float32), arrays["x_test"][:, None].astype(np.float32)
    )
    return Dataset(name, x_train, arrays["y_train"].astype(np.int64), x_test, arrays["y_test"].astype(np.int64), 10)


# --- CIFAR-10 python batches ----------------------------------------------------------------


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR's batches are pickles. This unpickler builds only plain containers and
    numpy arrays; any other global (a function a malicious file would call) is refused."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 3, 32, 32) uint8, labels (N,)) from one CIFAR-10 python batch."""
    try:
        batch = _NumpyOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({e})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path}: expected a dict with b'data' and b'labels'")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DataError(f"{path}: data {data.shape} and labels {labels.shape}: expected (N, 3072) and (N,)")
    return data.reshape(-1, 3, 32, 32), labels


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


def batches(n: int, batch_size: int, seed: int, epoch: int) -> Iterator[np.ndarray]:
    """Index arrays of one shuffled epoch (the last incomplete batch is dropped, so every
    step has the same shape). The same (seed, epoch) gives the same order to everyone."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start : start + batch_size]
