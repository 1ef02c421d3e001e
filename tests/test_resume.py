"""Exact resume: N + M steps in one go equals N steps, a checkpoint, a fresh process, and
M more, bit for bit on CPU (parameters, statistics, optimizer state, and the dropout masks
that follow, through the restored RNG state)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

from compare import registry
from compare.io import train_state
from compare.io.checkpoint import CheckpointError

WORKER = str(Path(__file__).with_name("resume_worker.py"))


def _worker(*args: str) -> None:
    subprocess.run([sys.executable, WORKER, *args], check=True, capture_output=True, timeout=300)


@pytest.mark.parametrize("framework", ["torch", "linen", "nnx"])
def test_training_n_plus_m_steps_equals_n_steps_save_load_in_a_fresh_process_and_m_more(tmp_path, framework):
    n, m = 3, 4
    _worker(framework, str(n + m), str(tmp_path / "straight.safetensors"))
    _worker(framework, str(n), str(tmp_path / "half.safetensors"))
    _worker(framework, str(m), str(tmp_path / "resumed.safetensors"), str(tmp_path / "half.safetensors"))
    straight, resumed = (
        load_file(str(tmp_path / "straight.safetensors")),
        load_file(str(tmp_path / "resumed.safetensors")),
    )
    half = load_file(str(tmp_path / "half.safetensors"))
    assert set(straight) == set(resumed)
    for key in straight:
        np.testing.assert_array_equal(resumed[key], straight[key], err_msg=key)
    moved = [k for k in straight if straight[k].dtype.kind == "f" and not np.array_equal(straight[k], half[k])]
    assert len(moved) > len(straight) // 3  # the last M steps really changed the state


def test_a_torch_checkpoint_rebuilds_model_optimizer_and_step_alone(tmp_path):
    spec = registry.get("mlp").replace(in_features=6, hidden=(8,))
    model = spec.build_torch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    train_state.save_torch(tmp_path / "t.safetensors", spec, model, opt, step=1)
    spec2, model2, opt2, step = train_state.load_torch(tmp_path / "t.safetensors")
    assert spec2 == spec and step == 1 and type(opt2) is torch.optim.Adam
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], opt2.state_dict()["state"][0]["exp_avg"])


def test_a_checkpoint_for_another_architecture_is_refused_and_the_model_is_untouched(tmp_path):
    small = registry.get("mlp").replace(in_features=6, hidden=(8,))
    model = small.build_nnx(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    train_state.save_nnx(tmp_path / "n.safetensors", small, model, opt)
    other = registry.get("mlp").replace(in_features=6, hidden=(16,)).build_nnx(nnx.Rngs(1))
    other_opt = nnx.Optimizer(other, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    before = jax.tree_util.tree_map(np.asarray, nnx.to_pure_dict(nnx.state(other, nnx.Param)))
    with pytest.raises(
        CheckpointError,
        match=r"does not fit the model and optimizer: .*shape mismatch at '0/fc1/kernel': expected \(6, 16\), got \(6, 8\)",
    ):
        train_state.load_nnx(tmp_path / "n.safetensors", other, other_opt)
    after = jax.tree_util.tree_map(np.asarray, nnx.to_pure_dict(nnx.state(other, nnx.Param)))
    jax.tree_util.tree_map(np.testing.assert_array_equal, after, before)


def test_a_weights_file_is_not_mistaken_for_a_training_checkpoint(tmp_path):
    from compare import transfer
    from compare.io import checkpoint

    spec = registry.get("mlp").replace(in_features=6, hidden=(8,))
    checkpoint.write_flax(
        transfer.torch_to_flat(spec.build_torch().state_dict(), spec), spec, tmp_path / "w.safetensors"
    )
    with pytest.raises(CheckpointError, match="not a torch training checkpoint"):
        train_state.load_torch(tmp_path / "w.safetensors")


@pytest.mark.parametrize("framework", ["torch", "linen", "nnx"])
def test_the_same_seed_gives_a_bit_identical_run_twice_in_a_row(tmp_path, framework):
    sys.path.insert(0, str(Path(WORKER).parent))
    import resume_worker

    run = {"torch": resume_worker.run_torch, "linen": resume_worker.run_linen, "nnx": resume_worker.run_nnx}[framework]
    run(4, str(tmp_path / "a.safetensors"), None)
    run(4, str(tmp_path / "b.safetensors"), None)
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
