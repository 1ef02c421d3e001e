"""Training checkpoints against hostile input, field by field: every header entry and every
array of a valid checkpoint replaced by structured hostile values. Whatever is changed,
loading either gives a model, optimizer and step that train, or raises CheckpointError
naming the file, and nothing was restored (the caller's RNG, the nnx model). One test per
class of the issue, then the generators."""

from __future__ import annotations

import functools
import json
import re
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flaxbn.train as ftrain
from compare import registry
from compare.io import checkpoint, train_state
from compare.io.checkpoint import CheckpointError

MLP = registry.get("mlp").replace(in_features=6, hidden=(8,), num_classes=3)
FAST = settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def _valid(path: Path, optimizer: str = "SGD") -> Path:
    torch.manual_seed(0)
    model = MLP.build_torch()
    kwargs = {"SGD": {"lr": 0.1, "momentum": 0.9}, "Adam": {"lr": 1e-3}}[optimizer]
    opt = getattr(torch.optim, optimizer)(model.parameters(), **kwargs)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    train_state.save_torch(path, MLP, model, opt, step=1)
    return path


def _edited(path: Path, header: dict | None = None, arrays: dict | None = None, drop: tuple = ()) -> Path:
    got, meta = checkpoint.read_arrays(path)
    got = {k: v for k, v in {**got, **(arrays or {})}.items() if k not in drop}
    meta = {k: v for k, v in {**meta, **(header or {})}.items() if k not in drop}
    checkpoint.write_arrays(path, got, meta)
    return path


def load_or_refuse(path: Path):
    """A model, optimizer and step that train one more step, or CheckpointError naming the
    file with nothing restored; within the time budget."""
    before = torch.get_rng_state()
    t0 = time.process_time()
    try:
        _, model, opt, step = train_state.load_torch(path)
    except CheckpointError as e:
        assert path.name in str(e) and str(e).isprintable(), str(e)
        assert torch.equal(torch.get_rng_state(), before)
        result = e
    else:
        assert type(step) is int and step >= 0
        model.train()
        opt.zero_grad()
        model(torch.randn(4, 6)).sum().backward()
        opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters())
        result = (model, opt, step)
    assert time.process_time() - t0 < 10
    return result


# --- one test per class ------------------------------------------------------------------------------

GROUP = {"lr": 0.1, "momentum": 0.9, "dampening": 0, "weight_decay": 0, "nesterov": False, "maximize": False,
         "foreach": None, "differentiable": False, "fused": None, "params": [0, 1, 2, 3]}  # fmt: skip
CASES = {
    "param_groups_not_a_list": ({"param_groups": json.dumps({"lr": 0.1})}, "param_groups: expected a list"),
    "optim_scalars_not_an_object": ({"optim_scalars": "[]"}, "optim_scalars: expected an object"),
    "superscript_digit_index": ({"optim_scalars": json.dumps({"\u00b2/momentum_buffer": 0.5})}, "no such state"),
    "missing_step": ({"step": None}, "the header has no 'step' entry"),
    "deeply_nested_param_groups": ({"param_groups": "[" * 5000 + "]" * 5000}, "MAX_JSON_DEPTH"),
    "string_step": ({"step": json.dumps("1")}, "step = 1: expected an int"),
    "infinite_learning_rate": (
        {"param_groups": json.dumps([{**GROUP, "lr": 0.5}]).replace("0.5", "1e999")},
        r"lr = inf: out of range",
    ),
    "nan_learning_rate": ({"param_groups": json.dumps([{**GROUP, "lr": float("nan")}])}, "NaN is not a JSON value"),
    "permuted_parameters": ({"param_groups": json.dumps([{**GROUP, "params": [3, 2, 1, 0]}])}, "in order"),
    "scalar_momentum_buffer": ({"optim_scalars": json.dumps({"0/momentum_buffer": 0.5})}, "expected float32"),
    "unknown_hyper_parameter": ({"param_groups": json.dumps([{**GROUP, "betas": [0.9]}])}, "betas"),
    "missing_hyper_parameter": (
        {"param_groups": json.dumps([{k: v for k, v in GROUP.items() if k != "momentum"}])},
        "SGD needs 'momentum'",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_a_torch_training_checkpoint_field_that_does_not_fit_is_named(tmp_path, case):
    changes, fragment = CASES[case]
    drop = tuple(k for k, v in changes.items() if v is None)
    path = _edited(_valid(tmp_path / "t.safetensors"), {k: v for k, v in changes.items() if v is not None}, drop=drop)
    error = load_or_refuse(path)
    assert isinstance(error, CheckpointError)
    assert fragment in str(error) or re.search(fragment, str(error)), str(error)


def test_short_adam_betas_and_an_all_zero_rng_state_are_named(tmp_path):
    path = _valid(tmp_path / "a.safetensors", "Adam")
    _, meta = checkpoint.read_arrays(path)
    groups = json.loads(meta["param_groups"])
    groups[0]["betas"] = [0.9]
    error = load_or_refuse(_edited(path, {"param_groups": json.dumps(groups)}))
    assert "param_groups[0].betas = [0.9]: out of range or type" in str(error)
    path = _valid(tmp_path / "b.safetensors", "Adam")
    error = load_or_refuse(_edited(path, arrays={"rng/torch": np.zeros(5056, np.uint8)}))
    assert "rng/torch: expected a valid uint8[5056] generator state" in str(error)


def test_momentum_buffers_moved_to_another_parameter_are_refused_by_their_shapes(tmp_path):
    path = _valid(tmp_path / "t.safetensors")
    arrays, _ = checkpoint.read_arrays(path)
    moved = {f"optim/{i}/momentum_buffer": arrays[f"optim/{(i + 1) % 4}/momentum_buffer"] for i in range(4)}
    error = load_or_refuse(_edited(path, arrays=moved))
    assert "optim 0/momentum_buffer: expected float32[8, 6], found float32[8]" in str(error)


def test_non_finite_state_and_negative_counters_are_refused(tmp_path):
    path = _valid(tmp_path / "t.safetensors")
    arrays, _ = checkpoint.read_arrays(path)
    bad = {"model/fc1.weight": np.full_like(arrays["model/fc1.weight"], np.nan)}
    assert "non-finite values at 'model/fc1.weight'" in str(load_or_refuse(_edited(path, arrays=bad)))
    path = _valid(tmp_path / "u.safetensors")
    bad = {"model/bn1.num_batches_tracked": np.array(-5, np.int64)}
    assert "a negative counter at 'model/bn1.num_batches_tracked'" in str(load_or_refuse(_edited(path, arrays=bad)))


def test_a_header_declaring_a_huge_model_is_refused_before_it_is_built(tmp_path):
    """A 64 x 65,536-wide MLP (over a terabyte) in the header of a tiny file: the model is
    built on the meta device and compared with the arrays first."""
    big = MLP.replace(hidden=(1 << 16,) * 64)
    path = _edited(_valid(tmp_path / "t.safetensors"), checkpoint.spec_metadata(big))
    t0 = time.process_time()
    error = load_or_refuse(path)
    assert "does not fit the model" in str(error) and "expected shape (65536,)" in str(error)
    assert time.process_time() - t0 < 5


def test_a_valid_checkpoint_loads_and_continues_exactly(tmp_path):
    for optimizer in ("SGD", "Adam"):
        _, opt, step = load_or_refuse(_valid(tmp_path / f"{optimizer}.safetensors", optimizer))
        assert step == 1 and type(opt).__name__ == optimizer


# --- generators -----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=10,
)
HEADER_KEYS = ["optimizer", "param_groups", "optim_scalars", "step", "config", "input_shape", "model", "config_type",
               "format", "kind"]  # fmt: skip
header_edits = st.tuples(
    st.sampled_from(HEADER_KEYS),
    st.one_of(
        json_values.map(lambda v: json.dumps(v, allow_nan=True)),
        st.sampled_from(["", "{", "NaN", "[" * 3000, "1e400", '"\\ud800"', "null", '{"a": 1, "a": 2}']),
        st.none(),
    ),
)
hyper_edits = st.tuples(
    st.sampled_from([*GROUP, "betas", "amsgrad", "eps", "initial_lr", "\u00b9"]),
    json_values | st.sampled_from([float("inf"), -0.0, 1 - 1e-17, [3, 2, 1, 0], [0, 1, 2], [0, 1, 2, 3, 4]]),
)
array_edits = st.tuples(
    st.sampled_from(["drop", "nan", "dtype", "reshape", "move", "add", "zero"]),
    st.integers(0, 100),
    st.sampled_from(
        ["optim/9/momentum_buffer", "optim/\u0663/momentum_buffer", "rng/other", "model/x", "optim/0/step"]
    ),
)


@FAST
@given(
    headers=st.lists(header_edits, max_size=2),
    hypers=st.lists(hyper_edits, max_size=2),
    edits=st.lists(array_edits, max_size=2),
)
def test_generated_torch_checkpoints_load_into_a_model_that_trains_or_are_refused(
    tmp_path_factory, headers, hypers, edits
):
    path = _valid(tmp_path_factory.mktemp("train") / "t.safetensors")
    arrays, meta = checkpoint.read_arrays(path)
    arrays = dict(arrays)
    groups = json.loads(meta["param_groups"])
    for key, value in hypers:
        groups[0][key] = value
    meta["param_groups"] = json.dumps(groups, allow_nan=True)
    for key, text in headers:
        if text is None:
            meta.pop(key, None)
        else:
            meta[key] = text
    names = sorted(arrays)
    for how, pick, extra in edits:
        key = names[pick % len(names)]
        value = arrays.get(key)
        if how == "drop" or value is None:
            arrays.pop(key, None)
        elif how == "nan" and value.dtype.kind == "f":
            arrays[key] = np.full_like(value, np.nan)
        elif how == "dtype":
            arrays[key] = value.astype(np.float64 if value.dtype != np.float64 else np.float32)
        elif how == "reshape":
            arrays[key] = value.reshape(-1)[:-1] if value.size else value.reshape(1, *value.shape)
        elif how == "move":
            arrays[extra] = value
        elif how == "add":
            arrays[extra] = np.zeros(3, np.float32)
        else:
            arrays[key] = np.zeros_like(value)
    checkpoint.write_arrays(path, arrays, meta)
    load_or_refuse(path)


@functools.cache
def _flax_checkpoints(folder: Path) -> tuple:
    """A linen and an nnx checkpoint of MLP (built once: jax is slow to trace)."""
    model, tx = MLP.build_linen(), optax.sgd(0.1, momentum=0.9)
    template = ftrain.linen_init_state(model.init(jax.random.key(0), np.zeros((2, 6), np.float32), train=False), tx)
    train_state.save_linen(folder / "l.safetensors", MLP, template, jax.random.key(1))
    net = MLP.build_nnx(nnx.Rngs(0))
    opt = nnx.Optimizer(net, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    train_state.save_nnx(folder / "n.safetensors", MLP, net, opt)
    return template, net, opt, {n: checkpoint.read_arrays(folder / n) for n in ("l.safetensors", "n.safetensors")}


@settings(FAST, max_examples=20)
@given(
    edits=st.lists(array_edits, min_size=1, max_size=2),
    impl=st.none() | st.sampled_from(['"rbg"', '"os"', "[1]", "", '"unsafe_rbg"', '"threefry2x32"']),
)
def test_generated_linen_and_nnx_checkpoints_load_or_are_refused_and_leave_the_model(tmp_path_factory, edits, impl):
    folder = tmp_path_factory.mktemp("flax")
    template, net, opt, valid = _flax_checkpoints(tmp_path_factory.getbasetemp())
    for name, (arrays, meta) in valid.items():
        arrays, meta, names = dict(arrays), dict(meta), sorted(arrays)
        for how, pick, extra in edits:
            key = names[pick % len(names)]
            if key not in arrays:
                continue
            if how in ("drop", "move"):
                arrays[extra if how == "move" else key] = arrays.pop(key)
            elif how == "nan" and arrays[key].dtype.kind == "f":
                arrays[key] = np.full_like(arrays[key], np.inf)
            elif how == "zero" and arrays[key].dtype.kind == "i":
                arrays[key] = np.full_like(arrays[key], -1)
            else:
                arrays[key] = arrays[key].astype(np.float64)
        if impl is not None and name == "l.safetensors":
            meta["key_impl"] = impl
        checkpoint.write_arrays(folder / name, arrays, meta)
    before = jax.tree_util.tree_map(np.asarray, nnx.to_pure_dict(nnx.state(net, nnx.Param)))
    for load in (lambda: train_state.load_linen(folder / "l.safetensors", template),
                 lambda: train_state.load_nnx(folder / "n.safetensors", net, opt)):  # fmt: skip
        try:
            load()
        except CheckpointError as e:
            assert "safetensors" in str(e) and str(e).isprintable()
            after = jax.tree_util.tree_map(np.asarray, nnx.to_pure_dict(nnx.state(net, nnx.Param)))
            jax.tree_util.tree_map(np.testing.assert_array_equal, after, before)


def test_a_checkpoint_saved_under_a_learning_rate_scheduler_loads(tmp_path):
    """A scheduler adds ``initial_lr`` to the param group; the optimizer's constructor does
    not take it (it raised TypeError after the checks passed): restored by load_state_dict."""
    torch.manual_seed(0)
    model = MLP.build_torch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    scheduler.step()
    train_state.save_torch(tmp_path / "s.safetensors", MLP, model, opt, step=1)
    _, _, loaded, _ = train_state.load_torch(tmp_path / "s.safetensors")
    assert loaded.param_groups[0]["initial_lr"] == 0.1 and loaded.param_groups[0]["lr"] == 0.05
