"""Dataset loaders: the real file formats (written here, tiny), and clear errors."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest

from compare.experiments import data
from compare.experiments.data import DataError


def _idx_bytes(array: np.ndarray) -> bytes:
    magic = bytes([0, 0, 0x08, array.ndim])
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return magic + dims + array.astype(np.uint8).tobytes()


def _write_mnist(folder, n_train=12, n_test=6, gz=False):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for name, arr in arrays.items():
        raw = _idx_bytes(arr)
        (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(raw) if gz else raw)
    return arrays


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_mnist_idx_files_load_with_train_statistics_normalisation(tmp_path, gz):
    arrays = _write_mnist(tmp_path, gz=gz)
    ds = data.load("mnist", tmp_path)
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_test.shape == (6, 1, 28, 28)
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])
    # normalised with the training split's statistics: mean 0, std 1 there (float32 sums: 1e-6)
    np.testing.assert_allclose([ds.x_train.mean(), ds.x_train.std()], [0.0, 1.0], rtol=0, atol=1e-5)
    raw_test = arrays["t10k-images-idx3-ubyte"].astype(np.float64)
    raw_train = arrays["train-images-idx3-ubyte"].astype(np.float64)
    expected = (raw_test - raw_train.mean()) / (raw_train.std() + 1e-8)
    np.testing.assert_allclose(ds.x_test[:, 0], expected, rtol=1e-5, atol=1e-5)


def test_fashion_mnist_uses_the_same_idx_format(tmp_path):
    _write_mnist(tmp_path)
    assert data.load("fashion_mnist", tmp_path).name == "fashion_mnist"


def test_a_truncated_idx_file_names_the_file_and_the_expected_size(tmp_path):
    _write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(
        DataError, match=r"train-images-idx3-ubyte: 9324 bytes, expected 9424 for an array of shape \(12, 28, 28\)"
    ):
        data.load("mnist", tmp_path)


def test_a_wrong_magic_number_is_reported_with_the_expected_ones(tmp_path):
    _write_mnist(tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"\x12\x34\x56\x78" + path.read_bytes()[4:])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: wrong magic number 0x12345678: expected 0x00000801"):
        data.load("mnist", tmp_path)


def test_a_missing_file_names_both_accepted_spellings(tmp_path):
    _write_mnist(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(
        DataError, match=r"missing file: expected .*t10k-images-idx3-ubyte or .*t10k-images-idx3-ubyte.gz"
    ):
        data.load("mnist", tmp_path)


def test_a_corrupt_gzip_file_is_named(tmp_path):
    _write_mnist(tmp_path, gz=True)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz: not a valid gzip file"):
        data.load("mnist", tmp_path)


def _write_cifar(folder, n=4):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch))


def test_cifar10_python_batches_load_as_nchw(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    ds = data.load("cifar10", tmp_path)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    assert ds.y_train.dtype == np.int64 and ds.num_classes == 10


def test_a_cifar_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path):
    _write_cifar(tmp_path)
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": Payload(), b"labels": []}))
    with pytest.raises(
        DataError, match=r"data_batch_3: not a CIFAR-10 python batch \(refusing to load (builtins|io)\.open"
    ):
        data.load("cifar10", tmp_path)
    assert not marker.exists()


def test_a_truncated_cifar_batch_is_named(tmp_path):
    _write_cifar(tmp_path)
    path = tmp_path / "test_batch"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(DataError, match="test_batch: not a CIFAR-10 python batch"):
        data.load("cifar10", tmp_path)


def test_the_digits_split_is_fixed_and_normalised_with_train_statistics_only():
    a, b = data.load("digits"), data.load("digits")
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert a.x_train.shape[1:] == (1, 8, 8) and len(a.x_train) + len(a.x_test) == 1797
    np.testing.assert_allclose([a.x_train.mean(), a.x_train.std()], [0.0, 1.0], rtol=0, atol=1e-5)
    assert abs(a.x_test.mean()) > 1e-4  # the test split is not re-centred on itself


def test_other_datasets_need_a_data_dir_and_unknown_names_are_listed(tmp_path):
    with pytest.raises(ValueError, match="--dataset mnist needs --data-dir"):
        data.load("mnist")
    with pytest.raises(
        ValueError, match="unknown dataset 'svhn'; known: digits, synthetic, mnist, fashion_mnist, cifar10"
    ):
        data.load("svhn", tmp_path)
    with pytest.raises(DataError, match="not a directory"):
        data.load("mnist", tmp_path / "nope")


def test_batches_are_the_same_for_everyone_and_reshuffled_per_epoch():
    first = [b.tolist() for b in data.batches(10, 3, seed=0, epoch=0)]
    assert first == [b.tolist() for b in data.batches(10, 3, seed=0, epoch=0)]
    assert first != [b.tolist() for b in data.batches(10, 3, seed=0, epoch=1)]
    assert len(first) == 3 and all(len(b) == 3 for b in first)  # the incomplete batch is dropped
