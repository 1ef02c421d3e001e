"""Weight files: safe to read, atomic to write, converted exactly, with clear errors."""

from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_flat_equal, random_state_dict

from compare import convert, registry, transfer
from compare.io import checkpoint
from compare.io.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("src_suffix", [".pth", ".safetensors"])
def test_convert_torch_to_flax_and_back_is_bit_exact(tmp_path, src_suffix, capsys):
    spec = registry.get("cnn")
    sd = random_state_dict(spec)
    src = tmp_path / f"model{src_suffix}"
    checkpoint.write_torch_state_dict(sd, src)
    assert convert.main([str(src), str(tmp_path / "flax.safetensors"), "--model", "cnn"]) == 0
    assert "converted torch cnn (21 tensors) -> Flax (12 params, 9 batch_stats)" in capsys.readouterr().out
    flat, read_spec = checkpoint.read_flax(tmp_path / "flax.safetensors")
    assert read_spec == spec  # the file alone rebuilds the model
    assert_flat_equal(flat, transfer.torch_to_flat(sd, spec))
    assert convert.main([str(tmp_path / "flax.safetensors"), str(tmp_path / "back.pt")]) == 0
    assert_flat_equal(checkpoint.read_torch_state_dict(tmp_path / "back.pt"), sd)


def test_a_pickle_that_would_run_code_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"fc1.weight": Payload()}))
    with pytest.raises(CheckpointError, match="evil.pt: refused: the pickle wants to build objects other than tensors"):
        checkpoint.read_torch_state_dict(evil)
    assert convert.main([str(evil), str(tmp_path / "out.safetensors"), "--model", "mlp"]) == 2
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "is a directory, expected a checkpoint file"),
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_bytes(b"\x00" * 7), "not a valid safetensors file"),
    ],
    ids=["missing", "directory", "empty", "garbage"],
)
def test_unreadable_paths_get_an_error_that_names_the_file_and_the_problem(tmp_path, make, message):
    path = tmp_path / "weights.safetensors"
    make(path)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.read_torch_state_dict(path)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.read_flax(path)


def test_a_truncated_safetensors_file_is_refused(tmp_path):
    spec = registry.get("mlp")
    path = tmp_path / "w.safetensors"
    checkpoint.write_torch_state_dict(random_state_dict(spec), path)
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="w.safetensors: not a valid safetensors file"):
        checkpoint.read_torch_state_dict(path)


def test_a_state_dict_for_another_architecture_fails_conversion_and_writes_nothing(tmp_path, capsys):
    src = tmp_path / "r18c.pt"
    checkpoint.write_torch_state_dict(random_state_dict(registry.get("resnet18_cifar")), src)
    assert convert.main([str(src), str(tmp_path / "out.safetensors"), "--model", "resnet18"]) == 2
    err = capsys.readouterr().err
    assert "shape mismatch at 'conv1.weight': expected (64, 3, 7, 7), got (64, 3, 3, 3)" in err
    assert not (tmp_path / "out.safetensors").exists()


def test_a_torch_source_needs_model_and_a_flax_source_must_match_it(tmp_path, capsys):
    src = tmp_path / "m.pt"
    checkpoint.write_torch_state_dict(random_state_dict(registry.get("mlp")), src)
    with pytest.raises(SystemExit):
        convert.main([str(src), str(tmp_path / "f.safetensors")])
    assert "--model is required" in capsys.readouterr().err
    assert convert.main([str(src), str(tmp_path / "f.safetensors"), "--model", "mlp"]) == 0
    assert convert.main([str(tmp_path / "f.safetensors"), str(tmp_path / "b.pt"), "--model", "cnn"]) == 2
    assert "holds a 'mlp', not a 'cnn'" in capsys.readouterr().err


def test_a_full_training_checkpoint_dict_is_unwrapped_to_its_state_dict(tmp_path):
    sd = random_state_dict(registry.get("mlp"))
    torch.save({"epoch": 3, "state_dict": sd}, tmp_path / "ckpt.pth")
    assert_flat_equal(checkpoint.read_torch_state_dict(tmp_path / "ckpt.pth"), sd)


WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    sys.path.insert(0, {root!r})
    from compare.io import checkpoint
    i = 0
    while True:  # rewrite the same file forever, each time with other values
        i += 1
        checkpoint.write_torch_state_dict({{"w": __import__("torch").full((1024, 1024), float(i))}}, {path!r})
    """
)


def test_a_writer_killed_at_random_points_leaves_a_complete_loadable_file(tmp_path):
    """Every read after a kill -9 sees one whole version (all values equal), never a mix."""
    path = tmp_path / "w.safetensors"
    checkpoint.write_torch_state_dict({"w": torch.zeros(1024, 1024)}, path)
    rng = random.Random(0)
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER.format(root=str(ROOT), path=str(path))])
        time.sleep(rng.uniform(0.5, 2.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        w = checkpoint.read_torch_state_dict(path)["w"].numpy()
        assert w.shape == (1024, 1024) and np.all(w == w[0, 0])
