"""Full training-state checkpoints, torch and Flax, for exact resume.

One ``.safetensors`` file per checkpoint (written atomically, see ``compare.io.checkpoint``):
the tensors under named prefixes and, in the JSON header, everything else. A checkpoint
alone rebuilds the model (name and configuration are in the header).

* torch: ``model/<state_dict key>`` (BatchNorm buffers and ``num_batches_tracked``
  included), ``optim/<param index>/<name>`` (momentum buffers, Adam moments), the global
  CPU generator as ``rng/torch`` (dropout masks continue where they stopped); the header
  has the optimizer class, its param_groups and the step.
* linen: the ``LinenState`` pytree (params, batch_stats, opt_state, step) flattened by
  tree path under ``state/``, and the dropout key's raw data under ``rng/key`` (the
  per-step key is ``fold_in(key, step)``, so restoring both resumes the masks).
* nnx: ``nnx.state((model, optimizer))`` flattened by path: parameters, BatchStats, the
  optimizer state and each Dropout's RNG stream (key data and count).

Loading validates every key, shape and dtype against a freshly built template before
anything is replaced: a checkpoint of another architecture or optimizer is refused with
the list of differences, and nothing is half-restored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import flaxbn.train as ftrain
from compare import transfer
from compare.io.checkpoint import CheckpointError, read_arrays, spec_from_metadata, spec_metadata, write_arrays
from compare.registry import ModelSpec

FORMAT = "bn-dropout-parity/train-state/1"


def _header(spec: ModelSpec, kind: str, **extra) -> dict[str, str]:
    return {"format": FORMAT, "kind": kind, **spec_metadata(spec), **{k: json.dumps(v) for k, v in extra.items()}}


def _read(path: Path, kind: str) -> tuple[dict[str, np.ndarray], dict[str, str], ModelSpec]:
    arrays, header = read_arrays(path)
    if header.get("format") != FORMAT or header.get("kind") != kind:
        raise CheckpointError(
            f"{path}: not a {kind} training checkpoint (format {header.get('format')!r}, kind {header.get('kind')!r})"
        )
    return arrays, header, spec_from_metadata(header, path)


def _compare(path: Path, got: dict[str, np.ndarray], want: dict[str, Any]) -> None:
    expected = {k: (tuple(np.shape(v)), str(np.asarray(v).dtype)) for k, v in want.items()}
    problems = transfer.validate(got, expected, allow_nonfinite=True)
    if problems:
        raise CheckpointError(f"{path}: does not fit the model and optimizer: " + "; ".join(problems))


# --- torch ---------------------------------------------------------------------------------


def save_torch(
    path: str | Path, spec: ModelSpec, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int
) -> None:
    opt = optimizer.state_dict()
    arrays = {f"model/{k}": v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    scalars = {}
    for idx, entry in opt["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                arrays[f"optim/{idx}/{name}"] = value.detach().cpu().numpy()
            else:
                scalars[f"{idx}/{name}"] = value
    arrays["rng/torch"] = torch.get_rng_state().numpy()
    header = _header(
        spec,
        "torch",
        step=step,
        optimizer=type(optimizer).__name__,
        param_groups=opt["param_groups"],
        optim_scalars=scalars,
    )
    write_arrays(path, arrays, header)


# the optimizers a torch training checkpoint may name, and the per-parameter state they keep
# (each entry the parameter's shape, except the scalar ``step``)
OPTIMIZER_STATE = {"SGD": ("momentum_buffer",), "Adam": ("exp_avg", "exp_avg_sq", "step"), "AdamW": ("exp_avg", "exp_avg_sq", "step"), "RMSprop": ("square_avg", "momentum_buffer", "grad_avg", "step")}  # fmt: skip


def _torch_optimizer(path: Path, header: dict[str, str], model: torch.nn.Module) -> tuple[torch.optim.Optimizer, list]:
    """The optimizer the header names, built with its hyper-parameters, all checked first."""
    try:
        name, groups = json.loads(header["optimizer"]), json.loads(header["param_groups"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: the optimizer in the header is unreadable ({e})") from None
    if name not in OPTIMIZER_STATE:
        raise CheckpointError(f"{path}: optimizer {name!r} is not one of {sorted(OPTIMIZER_STATE)}")
    if not (isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict)):
        raise CheckpointError(f"{path}: param_groups must be a list of one group, got {groups!r:.200}")
    hyper = {k: v for k, v in groups[0].items() if k != "params"}
    bad = [
        f"{k} = {v!r:.60}"
        for k, v in hyper.items()
        if not (
            v is None
            or isinstance(v, (bool, int, float, str))
            or (isinstance(v, list) and all(isinstance(x, (int, float)) for x in v))
        )
    ]
    if bad:
        raise CheckpointError(f"{path}: hyper-parameters of the wrong type: {'; '.join(bad)}")
    hyper = {k: tuple(v) if isinstance(v, list) else v for k, v in hyper.items()}
    try:
        return getattr(torch.optim, name)(model.parameters(), **hyper), groups
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {name} refuses the hyper-parameters in the header ({e})") from None


def load_torch(path: str | Path) -> tuple[ModelSpec, torch.nn.Module, torch.optim.Optimizer, int]:
    """(spec, model, optimizer, step); the global torch generator is restored too. Every
    piece is checked before anything is loaded: the optimizer and its hyper-parameters,
    every state tensor's shape and dtype against its parameter, the RNG state's shape."""
    path = Path(path)
    arrays, header, spec = _read(path, "torch")
    with torch.random.fork_rng(devices=[]):  # the weights are loaded below: building must not move the caller's RNG
        model = spec.build_torch()
    optimizer, groups = _torch_optimizer(path, header, model)
    want = {f"model/{k}": v.numpy() for k, v in model.state_dict().items()}
    got_model = {k: v for k, v in arrays.items() if k.startswith("model/")}
    _compare(path, got_model, want)
    params = list(model.parameters())
    name = json.loads(header["optimizer"])
    expected = {}
    for idx, p in enumerate(params):
        for entry in OPTIMIZER_STATE[name]:
            expected[f"optim/{idx}/{entry}"] = np.zeros(() if entry == "step" else tuple(p.shape), np.float32)
    got_optim = {k: v for k, v in arrays.items() if k.startswith("optim/")}
    problems = transfer.validate(got_optim, {k: (v.shape, "float32") for k, v in expected.items()}, True)
    problems = [p for p in problems if not p.startswith("missing key")]  # state appears lazily, per entry
    rng = arrays.get("rng/torch")
    if rng is None or rng.dtype != np.uint8 or rng.shape != tuple(torch.get_rng_state().shape):
        problems.append(f"rng/torch: expected uint8{list(torch.get_rng_state().shape)}")
    try:
        scalars = json.loads(header["optim_scalars"])
        assert isinstance(scalars, dict)
    except (KeyError, ValueError, AssertionError):
        problems.append("optim_scalars: expected a JSON object")
        scalars = {}
    for key, value in scalars.items():
        idx, _, entry = key.partition("/")
        if not (idx.isdigit() and int(idx) < len(params) and entry in OPTIMIZER_STATE[name]):
            problems.append(f"optim scalar {key!r}: no such parameter state for {name}")
        elif not isinstance(value, (int, float)):
            problems.append(f"optim scalar {key!r} = {value!r:.60}: expected a number")
    if problems:
        raise CheckpointError(f"{path}: does not fit the model and optimizer: " + "; ".join(problems))
    state: dict[int, dict] = {}
    for key, value in got_optim.items():
        _, idx, entry = key.split("/", 2)
        state.setdefault(int(idx), {})[entry] = torch.from_numpy(value)
    for key, value in scalars.items():
        idx, entry = key.split("/", 1)
        state.setdefault(int(idx), {})[entry] = value
    model.load_state_dict({k[len("model/") :]: torch.from_numpy(v) for k, v in got_model.items()}, strict=True)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(torch.from_numpy(rng))
    return spec, model, optimizer, json.loads(header["step"])


# --- linen -----------------------------------------------------------------------------------


def _flat_tree(tree: Any, prefix: str) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {prefix + jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def save_linen(path: str | Path, spec: ModelSpec, state: ftrain.LinenState, key: jax.Array) -> None:
    arrays = _flat_tree(state, "state")
    arrays["rng/key"] = np.asarray(jax.random.key_data(key))
    write_arrays(path, arrays, _header(spec, "linen", key_impl=str(jax.random.key_impl(key))))


def load_linen(path: str | Path, template: ftrain.LinenState) -> tuple[ModelSpec, ftrain.LinenState, jax.Array]:
    """(spec, state, dropout key); ``template`` gives the pytree structure (for example
    ``linen_init_state(model.init(...), tx)`` with the same optimizer)."""
    arrays, header, spec = _read(Path(path), "linen")
    want = _flat_tree(template, "state")
    _compare(Path(path), {k: v for k, v in arrays.items() if k.startswith("state")}, want)
    key = _rng_key(Path(path), header, arrays.get("rng/key"))
    leaves = [jnp.asarray(arrays[k]) for k in want]  # flatten order == _flat_tree order
    state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves)
    return spec, state, key


def _rng_key(path: Path, header: dict[str, str], data: np.ndarray | None) -> jax.Array:
    """The dropout key: a known PRNG implementation and key data of its shape and dtype."""
    try:
        impl = json.loads(header["key_impl"])
        want = np.asarray(jax.random.key_data(jax.random.key(0, impl=impl)))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: the PRNG implementation in the header is unreadable ({e})") from None
    if data is None or data.shape != want.shape or data.dtype != want.dtype:
        found = "none" if data is None else f"{data.dtype}{list(data.shape)}"
        raise CheckpointError(f"{path}: rng/key: expected {want.dtype}{list(want.shape)} for {impl}, found {found}")
    return jax.random.wrap_key_data(jnp.asarray(data), impl=impl)


# --- nnx --------------------------------------------------------------------------------------


def _nnx_flat(model: nnx.Module, optimizer: nnx.Optimizer) -> dict[str, tuple[tuple, nnx.Variable]]:
    return {"/".join(map(str, path)): (path, var) for path, var in nnx.to_flat_state(nnx.state((model, optimizer)))}


def _nnx_value(var: nnx.Variable) -> np.ndarray:
    value = var.get_value()
    return np.asarray(jax.random.key_data(value)) if isinstance(var, nnx.RngKey) else np.asarray(value)


def save_nnx(path: str | Path, spec: ModelSpec, model: nnx.Module, optimizer: nnx.Optimizer) -> None:
    arrays = {k: _nnx_value(var) for k, (_, var) in _nnx_flat(model, optimizer).items()}
    write_arrays(path, arrays, _header(spec, "nnx"))


def load_nnx(path: str | Path, model: nnx.Module, optimizer: nnx.Optimizer) -> ModelSpec:
    """Restore into ``model`` and ``optimizer`` (built like the saved ones) in place."""
    arrays, _, spec = _read(Path(path), "nnx")
    current = _nnx_flat(model, optimizer)
    _compare(Path(path), arrays, {k: _nnx_value(var) for k, (_, var) in current.items()})
    updates = []
    for k, (p, var) in current.items():
        value = jnp.asarray(arrays[k])
        if isinstance(var, nnx.RngKey):
            value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(var.get_value()))
        updates.append((p, var.replace(value)))
    nnx.update((model, optimizer), nnx.from_flat_state(updates))
    return spec
