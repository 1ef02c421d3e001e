"""No write goes where it should not: every writer of the project (weights, training state,
results.json, report.md, figures) refuses a destination that is a link or not a regular
file, and never replaces its own source (same device and inode); the clean-up of a killed
writer's temporary files touches exact names only; the safetensors library's own
temporaries are never made and old ones are cleaned."""

from __future__ import annotations

import os
import stat
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_state_dict

from compare import convert, registry, transfer
from compare.io import checkpoint, files
from compare.io.files import WriteError
from compare.report import results
from compare.report.figures import style

MLP = registry.get("mlp").replace(in_features=6, hidden=(8,), num_classes=3)


def _figure():
    fig, ax = style.plt.subplots()
    ax.plot([0, 1])
    return fig


WRITERS = {
    "safetensors_state_dict": lambda p: checkpoint.write_torch_state_dict(random_state_dict(MLP), p),
    "pt_state_dict": lambda p: checkpoint.write_torch_state_dict(random_state_dict(MLP), p.with_suffix(".pt")),
    "flax": lambda p: checkpoint.write_flax(transfer.torch_to_flat(random_state_dict(MLP), MLP), MLP, p),
    "arrays": lambda p: checkpoint.write_arrays(p, {"a": np.zeros(3)}, {}),
    "results_json": lambda p: results.write(p, {"meta": {}}),
    "figure": lambda p: style.save(_figure(), p),
}


def _kinds(tmp_path: Path) -> dict[str, tuple[Path, object]]:
    """Destinations that are not regular files, each with how to see it was not replaced."""
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.write_bytes(b"not yours")
    out = {"link": outside, "dangling_link": tmp_path / "nowhere", "fifo": None, "directory": None}
    try:
        os.mknod(tmp_path / "probe", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers
        os.unlink(tmp_path / "probe")
        out["character_device"] = None
    except (PermissionError, OSError):
        pass
    return out


def _make(path: Path, kind: str, target: Path | None) -> None:
    if kind in ("link", "dangling_link"):
        path.symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))


@pytest.mark.parametrize("writer", WRITERS)
def test_no_writer_follows_a_link_or_replaces_what_is_not_a_regular_file(tmp_path, writer):
    for kind, target in _kinds(tmp_path).items():
        folder = tmp_path / kind
        folder.mkdir()
        dst = folder / ("w.pt" if writer == "pt_state_dict" else "w.safetensors")
        _make(dst, kind, target)
        before = os.lstat(dst)
        with pytest.raises(
            WriteError, match=r"w\.(pt|safetensors): is (a symbolic link|a FIFO|a directory|a character device)"
        ):
            WRITERS[writer](folder / "w.safetensors")
        after = os.lstat(dst)
        assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino), kind
        assert sorted(p.name for p in folder.iterdir()) == [dst.name], kind  # no temporary file left
        if kind == "link":
            assert target.read_bytes() == b"not yours"
        if kind == "dangling_link":
            assert not target.exists()


def test_convert_never_replaces_its_source_through_a_hard_link_or_any_other_name(tmp_path, capsys):
    src = tmp_path / "w.safetensors"
    checkpoint.write_flax(transfer.torch_to_flat(random_state_dict(MLP), MLP), MLP, src)
    os.link(src, tmp_path / "hard.safetensors")
    (tmp_path / "soft.safetensors").symlink_to(src)
    (tmp_path / "sub").mkdir()
    before = src.read_bytes()
    for dst in ("hard.safetensors", "soft.safetensors", "sub/../w.safetensors"):
        assert convert.main([str(src), str(tmp_path / dst)]) == 2
        assert "the same file" in capsys.readouterr().err
    assert src.read_bytes() == before
    # and the library function, called directly, refuses by device and inode too
    with pytest.raises(WriteError, match="same file"):
        from compare.io import convert as io_convert

        io_convert.flax_file_to_torch(src, tmp_path / "hard.safetensors")
    assert src.read_bytes() == before


@pytest.mark.parametrize("name", ["w[1].safetensors", "*.safetensors", "w?.safetensors", "[!a].safetensors"])
def test_the_clean_up_of_temporary_files_matches_exact_names_only(tmp_path, name):
    """A destination named with glob characters once made the clean-up delete other files."""
    old = time.time() - files.STALE_TMP_SECONDS - 60
    unrelated = [tmp_path / ".w1.safetensors.abcdefgh.tmp", tmp_path / ".x.safetensors.abcdefgh.tmp",
                 tmp_path / ".b.safetensors.abcdefgh.tmp", tmp_path / f".{name}.abcdefgh.tmp.keep"]  # fmt: skip
    ours = tmp_path / f".{name}.abcdefgh.tmp"
    for p in [*unrelated, ours]:
        p.write_bytes(b"x")
        os.utime(p, (old, old))
    checkpoint.write_arrays(tmp_path / name, {"a": np.zeros(2)}, {})
    assert all(p.exists() for p in unrelated) and not ours.exists()


def _library_tmp(path: Path, content: bytes, age: float) -> Path:
    path.write_bytes(content)
    os.utime(path, (time.time() - age,) * 2)
    return path


def test_the_safetensors_library_temporaries_are_never_made_and_old_ones_are_cleaned(tmp_path):
    stale = files.STALE_TMP_SECONDS + 60
    header = struct.pack("<Q", 60) + b'{"w":{"dtype":"F32"'
    killed = _library_tmp(tmp_path / ".tmpA1b2C3", header + bytes(1 << 16), stale)
    young = _library_tmp(tmp_path / ".tmpYoung1", header, 1)
    other = _library_tmp(tmp_path / ".tmpOther", b"a text file", stale)
    (tmp_path / ".tmpLink01").symlink_to(killed)
    checkpoint.write_torch_state_dict({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    assert not killed.exists() and young.exists() and other.exists() and (tmp_path / ".tmpLink01").is_symlink()
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"w.safetensors", ".tmpYoung1", ".tmpOther", ".tmpLink01"}  # nothing of the writer's left


def test_our_safetensors_files_are_read_by_the_library_and_its_files_by_us(tmp_path):
    from safetensors.numpy import load_file, save_file

    arrays = {
        "b": np.arange(6, dtype=np.int64).reshape(2, 3),
        "a": np.array(1.5, np.float32),
        "e": np.zeros((0, 4), np.float16),
    }
    checkpoint.write_arrays(tmp_path / "ours.safetensors", arrays, {"k": "v"})
    theirs = load_file(str(tmp_path / "ours.safetensors"))
    save_file(arrays, str(tmp_path / "theirs.safetensors"), metadata={"k": "v"})
    ours, meta = checkpoint.read_arrays(tmp_path / "theirs.safetensors")
    for got in (theirs, ours):
        assert got.keys() == arrays.keys()
        for k in arrays:
            np.testing.assert_array_equal(got[k], arrays[k])
            assert got[k].dtype == np.asarray(arrays[k]).dtype
    assert meta == {"k": "v"}


def test_a_write_that_fails_midway_leaves_the_destination_and_no_temporary(tmp_path):
    dst = tmp_path / "w.safetensors"
    dst.write_bytes(b"previous")

    class Boom:
        shape, dtype = (2,), np.dtype("float32")

        def __array__(self, *a, **k):
            raise OSError(28, "No space left on device")

    with pytest.raises((WriteError, OSError)):
        checkpoint.write_arrays(dst, {"a": np.zeros(2), "b": Boom()}, {})
    assert dst.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
