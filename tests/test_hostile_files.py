"""Every file reader survives hostile input: a clear error of the project's own type that
names the file, bounded memory and time, and nothing written or changed. One case per
class of hostile file (the memory bombs run under the issue's budgets in
test_hostile_budgets.py); property tests truncate, flip and extend valid files of every
format."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
import time
import warnings
import zipfile
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
import torch
from conftest import random_state_dict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flaxbn.train as ftrain
from compare import convert, registry, transfer
from compare.experiments import data
from compare.experiments.data import DataError
from compare.io import checkpoint, limits, train_state
from compare.io.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
MLP = registry.get("mlp").replace(in_features=6, hidden=(8,), num_classes=3)


def _safetensors(path: Path, header: object, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _flax_file(path: Path, **metadata_changes: str) -> Path:
    """A valid Flax weights file of MLP with some header entries replaced."""
    checkpoint.write_flax(transfer.torch_to_flat(random_state_dict(MLP), MLP), MLP, path)
    arrays, metadata = checkpoint.read_arrays(path)
    checkpoint.write_arrays(path, arrays, {**metadata, **metadata_changes})
    return path


def _resnet_config(**changes) -> str:
    return json.dumps({"layers": [2, 2], "num_classes": 10, "in_channels": 3, "width": 8, "stem": "cifar", **changes})


# --- safetensors headers -----------------------------------------------------------------------

SAFETENSORS_CASES = {
    "absurd_header_length": lambda p: p.write_bytes(struct.pack("<Q", 1 << 60) + b"{}"),
    "header_not_json": lambda p: p.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{]"),
    "header_not_an_object": lambda p: _safetensors(p, [1, 2, 3]),
    "metadata_not_a_string_map": lambda p: _safetensors(p, {"__metadata__": {"format": 1}}),
    "unknown_dtype_float8": lambda p: _safetensors(p, {"w": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
    "negative_shape": lambda p: _safetensors(p, {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
    "offsets_past_the_file": lambda p: _safetensors(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 4),
    "shape_larger_than_its_bytes": lambda p: _safetensors(
        p, {"w": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 4]}}, b"\0" * 4
    ),
    "entry_not_an_object": lambda p: _safetensors(p, {"w": [1, 2]}),
    "header_nested_10000_deep": lambda p: _raw_header(p, b'{"__metadata__": {"a": "b"}, "w": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"),
    "duplicate_names": lambda p: _raw_header(p, b'{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', b"\0"),
    "nan_in_the_header": lambda p: _raw_header(p, b'{"w": {"dtype": "U8", "shape": [NaN], "data_offsets": [0, 1]}}', b"\0"),
    "escape_sequence_in_a_name": lambda p: _safetensors(p, {"\x1b[32mconverted": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
    "gap_between_tensors": lambda p: _safetensors(p, {"w": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}, b"\0\0"),
    "overlapping_tensors": lambda p: _safetensors(p, {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}, "b": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, b"\0\0"),
    "a_fifo": lambda p: os.mkfifo(p),
}  # fmt: skip


def _raw_header(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize("case", SAFETENSORS_CASES)
@pytest.mark.parametrize("reader", ["read_flax", "read_torch_state_dict", "convert"])
def test_a_malformed_safetensors_file_is_refused_with_its_name_and_nothing_is_written(tmp_path, case, reader, capsys):
    path = tmp_path / "hostile.safetensors"
    SAFETENSORS_CASES[case](path)
    before = path.read_bytes() if path.is_file() else None
    t0 = time.perf_counter()
    if reader == "convert":
        assert convert.main([str(path), str(tmp_path / "out.pt"), "--model", "mlp"]) == 2
        err = capsys.readouterr().err
        assert "hostile.safetensors" in err and "Traceback" not in err
    else:
        with pytest.raises(CheckpointError, match="hostile.safetensors"):
            getattr(checkpoint, reader)(path)
    assert time.perf_counter() - t0 < 5
    assert (path.read_bytes() if path.is_file() else None) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile.safetensors"]


def test_too_many_tensors_are_refused_before_reading_them(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_TENSORS", 3)
    header = {f"w{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(4)}
    path = _safetensors(tmp_path / "many.safetensors", header, b"\0" * 4)
    with pytest.raises(
        CheckpointError,
        match=r"many.safetensors: refused: tensors: 4, more than the budget of 3 \(MAX_TENSORS; raise it with the environment variable BN_PARITY_MAX_TENSORS\)",
    ):
        checkpoint.read_arrays(path)


# --- model configurations in a Flax file's header ---------------------------------------------

CONFIG_CASES = {
    "input_shape_of_a_billion": ({"input_shape": json.dumps([1_000_000_000])}, "input_shape"),
    "resnet_of_30000_blocks": (
        {"config_type": "ResNetConfig", "config": _resnet_config(layers=[30000, 2]), "input_shape": "[3, 32, 32]"},
        "layers",
    ),
    "width_doubling_past_the_limit": (
        {"config_type": "ResNetConfig", "config": _resnet_config(layers=[1] * 8, width=4096), "input_shape": "[3, 32, 32]"},
        "doubles past",
    ),
    "config_not_an_object": ({"config": "[1, 2]"}, "unreadable"),
    "unknown_config_type": ({"config_type": "os.system"}, "unreadable"),
    "hidden_not_ints": ({"config": json.dumps({"in_features": 6, "hidden": ["8"], "num_classes": 3})}, "hidden"),
    "config_nested_5000_deep": ({"config": "[" * 5000 + "]" * 5000}, "MAX_JSON_DEPTH"),
    "input_shape_nested_100_deep": ({"input_shape": "[" * 100 + "]" * 100}, "MAX_JSON_DEPTH"),
    "config_with_a_huge_int": ({"config": json.dumps({"in_features": 6, "hidden": [8], "num_classes": 3}).replace("3}", "9" * 5000 + "}")}, "unreadable"),
}  # fmt: skip


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_a_model_configuration_past_the_limits_is_refused_before_any_model_is_built(tmp_path, case):
    changes, fragment = CONFIG_CASES[case]
    path = _flax_file(tmp_path / "w.safetensors", **changes)
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=rf"w.safetensors: the model configuration .*{fragment}"):
        checkpoint.read_flax(path)
    assert time.perf_counter() - t0 < 2


def test_model_option_checks_the_architecture_the_arrays_describe_not_only_the_label(tmp_path, capsys):
    """A file whose header says 'cnn' but whose arrays are an mlp's: --model cnn is refused
    by the arrays' keys and shapes."""
    spec = registry.get("mlp")
    flat = transfer.torch_to_flat(random_state_dict(spec), spec)
    checkpoint.write_arrays(
        tmp_path / "f.safetensors",
        flat,
        {"format": checkpoint.FORMAT, **checkpoint.spec_metadata(spec), "model": "cnn"},
    )
    assert convert.main([str(tmp_path / "f.safetensors"), str(tmp_path / "b.pt"), "--model", "cnn"]) == 2
    err = capsys.readouterr().err
    assert "problem(s)" in err and "missing key 'params/conv1/kernel'" in err and not (tmp_path / "b.pt").exists()


# --- torch .pt files ----------------------------------------------------------------------------


def _quantized() -> torch.Tensor:
    with warnings.catch_warnings():  # quantized tensors are deprecated in torch, not yet gone
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8)


PT_CASES = {
    "non_string_keys": ({1: torch.ones(2)}, "key 1 is a int"),
    "sparse_tensor": ({"w": torch.ones(3, 3).to_sparse()}, "sparse"),
    "quantized_tensor": ({"w": _quantized()}, "quantized"),
    "float8_tensor": ({"w": torch.ones(4).to(torch.float8_e4m3fn)}, "float8"),
    "complex_tensor": ({"w": torch.ones(4, dtype=torch.complex64)}, "complex"),
    "not_a_mapping": ([torch.ones(2)], "a list"),
    "values_not_tensors": ({"w": 3}, "a int, expected a tensor"),
}


@pytest.mark.parametrize("case", PT_CASES)
def test_a_pt_file_that_is_not_a_state_dict_of_dense_tensors_is_refused(tmp_path, case):
    obj, fragment = PT_CASES[case]
    torch.save(obj, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=rf"w.pt: .*{fragment}"):
        checkpoint.read_torch_state_dict(tmp_path / "w.pt")


def _stride0_view(path: Path) -> None:
    torch.save({"w": torch.zeros(1).expand(40_000, 40_000)}, path)  # 6.4 GB if ever materialised


def _zip_bomb(path: Path) -> None:
    """A torch.save archive whose 256 MB storage is deflated to a few hundred KB."""
    plain = path.with_suffix(".plain")
    torch.save({"w": torch.zeros(64 << 20)}, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    plain.unlink()


def test_a_stride_zero_view_is_refused_without_materialising_it(tmp_path):
    _stride0_view(tmp_path / "view.pt")
    with pytest.raises(CheckpointError, match=r"view.pt: .*a view of 1600000000 elements over a storage of 1"):
        checkpoint.read_torch_state_dict(tmp_path / "view.pt")


def test_a_compressed_pt_archive_is_refused_before_it_is_unpacked(tmp_path):
    """torch.save stores its entries; a deflated one (here 256 MB in a few hundred KB) is not its output."""
    _zip_bomb(tmp_path / "bomb.pt")
    assert (tmp_path / "bomb.pt").stat().st_size < 2 << 20
    with pytest.raises(CheckpointError, match=r"bomb.pt: not a readable torch checkpoint \(entry .* is compressed"):
        checkpoint.read_torch_state_dict(tmp_path / "bomb.pt")


# --- destinations ---------------------------------------------------------------------------------


def test_convert_refuses_to_replace_its_own_source_also_through_a_link(tmp_path, capsys):
    src = tmp_path / "w.safetensors"
    checkpoint.write_flax(transfer.torch_to_flat(random_state_dict(MLP), MLP), MLP, src)
    (tmp_path / "link.safetensors").symlink_to(src)
    before = src.read_bytes()
    for dst in (src, tmp_path / "link.safetensors"):
        assert convert.main([str(src), str(dst)]) == 2
        assert "are the same file" in capsys.readouterr().err
    assert src.read_bytes() == before


def test_a_destination_that_cannot_be_written_is_a_clear_error(tmp_path, capsys):
    src = tmp_path / "m.pt"
    checkpoint.write_torch_state_dict(random_state_dict(registry.get("mlp")), src)
    (tmp_path / "file").write_text("not a folder")
    assert convert.main([str(src), str(tmp_path / "file" / "out.safetensors"), "--model", "mlp"]) == 2
    err = capsys.readouterr().err
    assert "out.safetensors: cannot write there" in err and "Traceback" not in err


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o600, 0o444])
def test_replacing_a_file_keeps_its_permissions_and_removes_stale_temporary_files(tmp_path, mode):
    """Whatever the mode, also one the safetensors library's own rename would have lost."""
    dst = tmp_path / "w.safetensors"
    dst.write_bytes(b"old")
    os.chmod(dst, mode)
    stale, fresh = tmp_path / ".w.safetensors.k1lled_x.tmp", tmp_path / ".w.safetensors.wr1ting_.tmp"
    stale.write_bytes(b"x" * 100)
    fresh.write_bytes(b"y")
    old = time.time() - checkpoint.STALE_TMP_SECONDS - 10
    os.utime(stale, (old, old))
    checkpoint.write_flax(transfer.torch_to_flat(random_state_dict(MLP), MLP), MLP, dst)
    assert dst.stat().st_mode & 0o777 == mode
    assert not stale.exists() and fresh.exists()  # another writer's file, still young, is left alone
    checkpoint.write_torch_state_dict(random_state_dict(MLP), tmp_path / "new.safetensors")
    assert (tmp_path / "new.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


# --- training checkpoints -------------------------------------------------------------------------


def _torch_checkpoint(path: Path, **header_changes) -> Path:
    model = MLP.build_torch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    train_state.save_torch(path, MLP, model, opt, step=1)
    arrays, header = checkpoint.read_arrays(path)
    for key, value in header_changes.items():
        if key.startswith("array:"):
            arrays[key[len("array:") :]] = value
        else:
            header[key] = value
    checkpoint.write_arrays(path, arrays, header)
    return path


TRAIN_CASES = {
    "unknown_optimizer": ({"optimizer": json.dumps("load")}, "optimizer 'load' is not one of"),
    "hyper_parameter_of_the_wrong_type": (
        {"param_groups": json.dumps([{"lr": {"evil": 1}, "momentum": 0.9, "params": [0, 1, 2, 3]}])},
        r"param_groups\[0\].lr = .*: out of range or type",
    ),
    "optimizer_buffer_of_the_wrong_shape": (
        {"array:optim/0/momentum_buffer": np.zeros((2, 2), np.float32)},
        r"optim 0/momentum_buffer: expected float32\[8, 6\], found float32\[2, 2\]",
    ),
    "rng_state_of_the_wrong_shape": ({"array:rng/torch": np.zeros(3, np.uint8)}, "rng/torch: expected a valid uint8"),
    "header_not_json": ({"param_groups": "{"}, "header entry 'param_groups' is not valid JSON"),
}


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_a_torch_training_checkpoint_is_checked_before_anything_is_loaded(tmp_path, case):
    changes, fragment = TRAIN_CASES[case]
    path = _torch_checkpoint(tmp_path / "t.safetensors", **changes)
    rng_before = torch.get_rng_state()
    with pytest.raises(CheckpointError, match=rf"t.safetensors: .*{fragment}"):
        train_state.load_torch(path)
    assert torch.equal(torch.get_rng_state(), rng_before)  # nothing was restored


# --- datasets ----------------------------------------------------------------------------------------


def _idx(dims: tuple[int, ...], payload: bytes = b"") -> bytes:
    return bytes([0, 0, 0x08, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + payload


def _cifar(path: Path, batch: object) -> Path:
    path.write_bytes(pickle.dumps(batch))
    return path


class _HugeArray:
    """Pickles as a numpy array (numpy's own reduce) whose state declares 10^9 x 3072 bytes
    over the 3072 bytes it carries."""

    def __reduce__(self):
        build, args, state = np.zeros((1, 3072), np.uint8).__reduce__()
        return build, args, (state[0], (10**9, 3072), *state[2:])


def _huge_array_pickle(path: Path) -> Path:
    """A 3 KB CIFAR batch declaring an array of 10^9 x 3072 bytes."""
    return _cifar(path, {b"data": _HugeArray(), b"labels": [0]})


DATA_CASES = {
    "idx_dimensions_that_overflow": (lambda p: p.write_bytes(_idx((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF))), "read_idx", "declares an array"),
    "gzip_with_a_corrupt_deflate_stream": (lambda p: p.write_bytes(gzip.compress(_idx((2,), b"\1\2"))[:12] + b"\xff" * 20), "read_idx", "not a valid gzip file"),
    "cifar_data_of_the_wrong_type": (lambda p: _cifar(p, {b"data": ["a"] * 3072, b"labels": [0]}), "read_cifar_batch", "must be a uint8 array"),
    "cifar_object_array": (lambda p: _cifar(p, {b"data": np.array([[None] * 3072], dtype=object), b"labels": [0]}), "read_cifar_batch", "only numbers"),
    "cifar_labels_out_of_range": (lambda p: _cifar(p, {b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}), "read_cifar_batch", "labels from 10 to 10, expected 0 to 9"),
    "cifar_labels_not_ints": (lambda p: _cifar(p, {b"data": np.zeros((1, 3072), np.uint8), b"labels": ["0"]}), "read_cifar_batch", "list of ints"),
    "cifar_array_larger_than_its_bytes": (_huge_array_pickle, "read_cifar_batch", "refused: bytes of one array: 3,072,000,000,000"),
}  # fmt: skip


@pytest.mark.parametrize("case", DATA_CASES)
def test_a_malformed_dataset_file_is_refused_with_its_name(tmp_path, case):
    write, reader, fragment = DATA_CASES[case]
    path = tmp_path / ("hostile.gz" if "gzip" in case else "hostile")
    write(path)
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=rf"hostile(.gz)?: .*{fragment}"):
        getattr(data, reader)(path)
    assert time.perf_counter() - t0 < 5


def test_idx_splits_with_two_image_sizes_are_refused(tmp_path):
    for split, n, side in (("train", 4, 2), ("t10k", 2, 3)):
        (tmp_path / f"{split}-images-idx3-ubyte").write_bytes(_idx((n, side, side), bytes(n * side * side)))
        (tmp_path / f"{split}-labels-idx1-ubyte").write_bytes(_idx((n,), bytes(n)))
    with pytest.raises(DataError, match=r"train images are \(2, 2\) and test images \(3, 3\)"):
        data.load("mnist", tmp_path)


def test_idx_labels_outside_the_ten_classes_are_refused(tmp_path):
    for split, n in (("train", 4), ("t10k", 2)):
        (tmp_path / f"{split}-images-idx3-ubyte").write_bytes(_idx((n, 2, 2), bytes(n * 4)))
        (tmp_path / f"{split}-labels-idx1-ubyte").write_bytes(_idx((n,), bytes([0] * (n - 1) + [12])))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: labels from 0 to 12, expected 0 to 9"):
        data.load("mnist", tmp_path)


# --- property tests: truncated, flipped and extended files --------------------------------------------


def _valid_files(folder: Path) -> dict[str, tuple[Path, object]]:
    """One valid file of every format, with the reader that takes it."""
    folder.mkdir(exist_ok=True)
    sd = random_state_dict(MLP)
    checkpoint.write_flax(transfer.torch_to_flat(sd, MLP), MLP, folder / "flax.safetensors")
    checkpoint.write_torch_state_dict(sd, folder / "torch.pt")
    checkpoint.write_torch_state_dict(sd, folder / "torch.safetensors")
    (folder / "labels").write_bytes(_idx((6,), bytes([1, 2, 3, 4, 5, 6])))
    (folder / "images.gz").write_bytes(gzip.compress(_idx((2, 3, 3), bytes(range(18)))))
    _cifar(folder / "batch", {b"data": np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072), b"labels": [1, 7]})
    model, tx = MLP.build_linen(), optax.sgd(0.1, momentum=0.9)
    template = ftrain.linen_init_state(model.init(jax.random.key(0), np.zeros((2, 6), np.float32), train=False), tx)
    train_state.save_linen(folder / "linen.safetensors", MLP, template, jax.random.key(1))

    def flax_then_torch(path):
        flat, spec = checkpoint.read_flax(path)
        return transfer.flat_to_torch(flat, spec)

    return {
        "flax": (folder / "flax.safetensors", flax_then_torch),
        "pt": (folder / "torch.pt", checkpoint.read_torch_state_dict),
        "torch_safetensors": (folder / "torch.safetensors", checkpoint.read_torch_state_dict),
        "idx": (folder / "labels", data.read_idx),
        "idx_gz": (folder / "images.gz", data.read_idx),
        "cifar": (folder / "batch", data.read_cifar_batch),
        "linen_state": (folder / "linen.safetensors", lambda p: train_state.load_linen(p, template)),
    }


EXPECTED = (CheckpointError, DataError, transfer.TransferError)


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory):
    return _valid_files(tmp_path_factory.mktemp("valid"))


@pytest.mark.parametrize("fmt", ["flax", "pt", "torch_safetensors", "idx", "idx_gz", "cifar", "linen_state"])
@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edit=st.tuples(
        st.sampled_from(["truncate", "flip", "extend"]), st.floats(0, 1), st.integers(0, 7), st.binary(max_size=64)
    )
)
def test_truncated_flipped_or_extended_files_give_a_clear_error_or_a_read(valid_files, fmt, edit, tmp_path_factory):
    """Whatever is done to a valid file, the reader either reads it or raises one of the
    project's errors naming it: nothing else escapes."""
    original, reader = valid_files[fmt]
    raw = bytearray(original.read_bytes())
    how, where, bit, extra = edit
    at = min(int(where * len(raw)), len(raw) - 1)
    if how == "truncate":
        raw = raw[:at]
    elif how == "flip":
        raw[at] ^= 1 << bit
    else:
        raw += extra or b"\0"
    path = tmp_path_factory.mktemp("edited") / original.name
    path.write_bytes(bytes(raw))
    try:
        reader(path)
    except EXPECTED as e:
        assert original.name in str(e) or isinstance(e, transfer.TransferError), str(e)


# --- the files page keeps the threat model true -------------------------------------------------------


def _size(name: str, value: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20)):
        if name.endswith("_BYTES") and value >= 1 << shift and value % (1 << shift) == 0:
            return f"{value >> shift} {unit}"
    return f"{value:,}"


def test_the_files_page_lists_every_budget_with_its_default_and_what_it_bounds():
    page = (ROOT / "docs" / "files.md").read_text()
    table = page.split("<!-- BEGIN budgets -->\n")[1].split("<!-- END budgets -->")[0]
    rows = [[c.strip().strip("`") for c in line.strip("|").split("|")] for line in table.strip().splitlines()[2:]]
    assert rows == [[name, _size(name, getattr(limits, name)), what] for name, what in limits.BUDGETS.items()]
    assert all(f"BN_PARITY_{name}" in limits.over(name, 1) for name in limits.BUDGETS)
    for constant in ("MAX_STAGES", "MAX_BLOCKS", "MAX_HIDDEN_LAYERS", "MAX_WIDTH"):  # the fixed sizes, in words
        assert f"{getattr(limits, constant):,}" in page or str(getattr(limits, constant)) in page, constant
