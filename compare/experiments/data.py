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
import io
import math
import pickle
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np

from compare.io.limits import MAX_DATASET_BYTES

DATASETS = ("digits", "synthetic", "mnist", "fashion_mnist", "cifar10")
# numpy streams of one seed, one per purpose: SeedSequence([seed, tag]); the batches use
# [seed, epoch] with epochs far below these tags, so no two purposes share a stream
SPLIT_STREAM, SUBSET_STREAM, SYNTHETIC_STREAM = 2**31 + 1, 2**31 + 2, 2**31 + 3


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


def _find(data_dir: Path, stem: str) -> Path:
    for candidate in (data_dir / stem, data_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"missing file: expected {data_dir / stem} or {data_dir / stem}.gz")


def _read_bounded(path: Path) -> bytes:
    """The file's bytes (decompressed for ``.gz``), refused past ``MAX_DATASET_BYTES``
    before that much is held in memory."""
    try:
        if path.stat().st_size > MAX_DATASET_BYTES:
            raise DataError(f"{path}: {path.stat().st_size} bytes, more than the limit of {MAX_DATASET_BYTES}")
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None
    if path.suffix != ".gz":
        return raw
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip framing
    try:
        out = inflate.decompress(raw, MAX_DATASET_BYTES + 1)
    except zlib.error as e:
        raise DataError(f"{path}: not a valid gzip file ({e})") from None
    if len(out) > MAX_DATASET_BYTES:
        raise DataError(f"{path}: unpacks to more than the limit of {MAX_DATASET_BYTES} bytes")
    if not inflate.eof:
        raise DataError(f"{path}: not a valid gzip file (the compressed stream is truncated)")
    return out


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (gzipped or not): magic 0x0803 (images, 3 dims) or 0x0801 (labels)."""
    raw = _read_bounded(path)
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
    if math.prod(shape) > MAX_DATASET_BYTES:
        raise DataError(f"{path}: declares an array of shape {shape}, more than the limit of {MAX_DATASET_BYTES} bytes")
    expected = header + math.prod(shape)
    if len(raw) != expected:
        raise DataError(f"{path}: {len(raw)} bytes, expected {expected} for an array of shape {shape} (truncated?)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


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


def _check_labels(path: Path, labels: np.ndarray, num_classes: int) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels from {labels.min()} to {labels.max()}, expected 0 to {num_classes - 1}")


def _checked_build(unpickler: pickle._Unpickler) -> None:
    """BUILD for a numpy array: its declared shape and dtype are checked against its bytes
    and the limit before numpy allocates anything; object arrays are refused."""
    state = unpickler.stack[-1]
    inst = unpickler.stack[-2]
    if isinstance(inst, np.ndarray):
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError(f"an array state of {type(state).__name__}")
        _, shape, dtype, _, data = state
        if not (isinstance(shape, tuple) and all(type(d) is int and d >= 0 for d in shape)):
            raise pickle.UnpicklingError(f"array shape {shape!r}")
        if not isinstance(dtype, np.dtype) or dtype.hasobject or dtype.kind not in "biuf":
            raise pickle.UnpicklingError(f"array dtype {dtype!r}: only numbers are allowed")
        size = math.prod(shape) * dtype.itemsize
        if size > MAX_DATASET_BYTES or not isinstance(data, bytes) or len(data) != size:
            raise pickle.UnpicklingError(
                f"an array of shape {shape} {dtype} over {len(data) if isinstance(data, bytes) else '?'} bytes"
            )
    pickle._Unpickler.load_build(unpickler)


class _NumpyOnlyUnpickler(pickle._Unpickler):
    """CIFAR's batches are pickles. This unpickler builds only plain containers and
    numpy arrays of numbers whose declared size its bytes back; any other global (a
    function a malicious file would call) is refused. (The pure-Python unpickler, so
    that the array check runs before numpy allocates.)"""

    dispatch: ClassVar[dict] = {**pickle._Unpickler.dispatch, pickle.BUILD[0]: _checked_build}

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
        batch = _NumpyOnlyUnpickler(io.BytesIO(_read_bounded(path)), encoding="bytes").load()
    except DataError:
        raise
    except Exception as e:  # a hostile pickle can fail in any way; none of it is a bug of ours
        reason = str(e) if isinstance(e, pickle.UnpicklingError) else f"{type(e).__name__}: {e}"
        raise DataError(f"{path}: not a CIFAR-10 python batch ({reason})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path}: expected a dict with b'data' and b'labels'")
    data, labels = batch[b"data"], batch[b"labels"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8):
        raise DataError(
            f"{path}: b'data' must be a uint8 array, got {type(data).__name__} {getattr(data, 'dtype', '')}"
        )
    if not (isinstance(labels, list) and all(type(v) is int for v in labels)):
        raise DataError(f"{path}: b'labels' must be a list of ints")
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DataError(f"{path}: data {data.shape} and labels {labels.shape}: expected (N, 3072) and (N,)")
    _check_labels(path, labels, 10)
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
