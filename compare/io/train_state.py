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
import math
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import flaxbn.train as ftrain
from compare import transfer
from compare.io import limits
from compare.io.checkpoint import CheckpointError, read_arrays, spec_from_header, spec_metadata, write_arrays
from compare.registry import ModelSpec

FORMAT = "bn-dropout-parity/train-state/1"


def _header(spec: ModelSpec, kind: str, **extra) -> dict[str, str]:
    return {"format": FORMAT, "kind": kind, **spec_metadata(spec), **{k: json.dumps(v) for k, v in extra.items()}}


def _read(path: Path, kind: str) -> tuple[dict[str, np.ndarray], dict[str, str], ModelSpec]:
    arrays, header = read_arrays(path)
    if header.get("format") != FORMAT or header.get("kind") != kind:
        found = ", ".join(limits.printable(repr(header.get(k)), 60) for k in ("format", "kind"))
        raise CheckpointError(f"{path}: not a {kind} training checkpoint (format, kind: {found})")
    return arrays, header, spec_from_header(header, path)


def _json(path: Path, header: dict[str, str], key: str) -> Any:
    """A JSON entry of the header, bounded; missing or unreadable is a CheckpointError."""
    if key not in header:
        raise CheckpointError(f"{path}: the header has no {key!r} entry")
    try:
        return limits.parse_json(header[key], f"header entry {key!r}")
    except limits.LimitError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _problems(got: dict[str, np.ndarray], expected: dict[str, tuple], allow_nonfinite: bool) -> list[str]:
    """Keys, shapes and exact dtypes against ``expected`` = {key: (shape, dtype name)};
    finite floats; counters (integer arrays) not negative."""
    problems = transfer.validate(got, expected, allow_nonfinite=True)
    for key, value in got.items():
        if key in expected and value.shape == expected[key][0] and str(value.dtype) == expected[key][1]:
            if not allow_nonfinite and value.dtype.kind == "f" and not np.isfinite(value).all():
                problems.append(f"non-finite values at {limits.printable(repr(key), 80)}")
            elif value.dtype.kind == "i" and value.size and value.min() < 0:
                problems.append(f"a negative counter at {limits.printable(repr(key), 80)}")
    return problems


def _compare(path: Path, got: dict[str, np.ndarray], want: dict[str, Any], allow_nonfinite: bool) -> None:
    expected = {k: (tuple(np.shape(v)), str(np.asarray(v).dtype)) for k, v in want.items()}
    problems = _problems(got, expected, allow_nonfinite)
    if problems:
        raise CheckpointError(f"{path}: does not fit the model and optimizer: " + limits.summary(problems))


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


OPTIMIZERS = ("SGD", "Adam", "AdamW", "RMSprop")  # the optimizers a torch training checkpoint may name
_UNIT = (0.0, 1.0, False)  # [0, 1)
HYPER = {  # hyper-parameter: (low, high, high included) for numbers, a tuple of types otherwise
    "lr": (0.0, math.inf, False), "momentum": _UNIT, "dampening": (0.0, 1.0, True), "alpha": (0.0, 1.0, True),
    "weight_decay": (0.0, math.inf, False), "eps": (1e-300, math.inf, False), "initial_lr": (0.0, math.inf, False),
    **dict.fromkeys(["nesterov", "maximize", "differentiable", "amsgrad", "capturable", "centered",
                     "decoupled_weight_decay"], (bool,)),
    **dict.fromkeys(["foreach", "fused"], (bool, type(None))),
}  # fmt: skip


def _hyper_problems(name: str, groups: Any, n_params: int) -> list[str]:
    """The param_groups of the header against the optimizer's own: one group over every
    parameter in order, each hyper-parameter of its type and range (Adam's betas two
    numbers in [0, 1))."""
    if not (type(groups) is list and len(groups) == 1 and type(groups[0]) is dict):
        return ["param_groups: expected a list of one object"]
    group, problems = groups[0], []
    if group.get("params") != list(range(n_params)):
        problems.append(f"param_groups[0].params: expected [0, ..., {n_params - 1}] (the model's parameters in order)")
    default = getattr(torch.optim, name)([torch.zeros(1, device="meta", requires_grad=True)]).param_groups[0]
    for key in sorted(set(default) - {"params"} - set(group)):
        problems.append(f"param_groups[0]: {name} needs {key!r}")
    for key, value in group.items():
        rule = HYPER.get(key) if key in default or key == "initial_lr" else None
        if key == "params":
            continue
        if key == "betas":
            ok = type(value) is list and len(value) == 2 and all(type(b) in (int, float) and 0 <= b < 1 for b in value)
        elif rule is None:
            ok = False
        elif isinstance(rule[0], type):
            ok = type(value) in rule
        else:
            low, high, closed = rule
            ok = type(value) in (int, float) and low <= value and (value <= high if closed else value < high)
        if not ok:
            what = "not a hyper-parameter of " + name if rule is None and key != "betas" else "out of range or type"
            problems.append(f"param_groups[0].{limits.printable(key, 40)} = {limits.printable(value, 40)}: {what}")
    return problems


def _constructor_arguments(group: dict) -> dict[str, Any]:
    """A saved param group as the optimizer's keyword arguments: lists back to tuples (betas),
    without ``params`` and ``initial_lr`` (a scheduler's entry, which ``load_state_dict``
    restores): the template and the loaded optimizer are built the same way."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in group.items() if k not in ("params", "initial_lr")}


def _optimizer_template(name: str, group: dict, model: torch.nn.Module) -> dict[int, dict[str, Any]]:
    """What the optimizer keeps per parameter: one step of it, with these hyper-parameters,
    on the model's parameters as meta tensors (nothing allocated). {index: {entry: a
    meta tensor, or a python value}}."""
    params = [torch.zeros(p.shape, dtype=p.dtype, device="meta", requires_grad=True) for p in model.parameters()]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer = getattr(torch.optim, name)(params, **_constructor_arguments(group))
    optimizer.step()
    return optimizer.state_dict()["state"]


def _state_problems(arrays: dict, scalars: Any, template: dict[int, dict[str, Any]]) -> list[str]:
    """The optimizer state of the checkpoint against the template: per parameter, every
    entry or none (state appears at a parameter's first step), each of the template's
    shape and dtype, finite; scalars where the template has them."""
    if type(scalars) is not dict:
        return ["optim_scalars: expected an object"]
    got: dict[int, dict[str, Any]] = {}
    problems = []
    entries = [(k[len("optim/") :], v) for k, v in arrays.items() if k.startswith("optim/")] + list(scalars.items())
    for key, value in entries:
        idx, _, entry = key.partition("/")
        if not (re.fullmatch(r"0|[1-9][0-9]{0,8}", idx) and int(idx) in template and entry in template[int(idx)]):
            problems.append(f"optim {limits.printable(repr(key), 60)}: the optimizer keeps no such state")
            continue
        want = template[int(idx)][entry]
        if isinstance(want, torch.Tensor):
            dtype = str(want.dtype).removeprefix("torch.")
            if not isinstance(value, np.ndarray) or value.shape != tuple(want.shape) or str(value.dtype) != dtype:
                found = f"{value.dtype}{list(value.shape)}" if isinstance(value, np.ndarray) else "a number"
                problems.append(f"optim {key}: expected {dtype}{list(want.shape)}, found {found}")
            elif value.dtype.kind == "f" and not np.isfinite(value).all():
                problems.append(f"optim {key}: non-finite values")
        elif not (value is None if want is None else type(value) in (int, float) and math.isfinite(value)):
            problems.append(f"optim {key}: expected {'null' if want is None else 'a finite number'}")
        got.setdefault(int(idx), {})[entry] = value
    for idx, entries_of in sorted(got.items()):
        missing = set(template[idx]) - set(entries_of)
        if missing:
            problems.append(f"optim {idx}: has {sorted(entries_of)} but not {sorted(missing)}")
    return problems


def load_torch(path: str | Path) -> tuple[ModelSpec, torch.nn.Module, torch.optim.Optimizer, int]:
    """(spec, model, optimizer, step); the global torch generator is restored too. Every
    field is checked before anything is built or loaded: the model's tensors against the
    architecture (built on the meta device), the optimizer's name, hyper-parameters and
    per-parameter state against what that optimizer keeps, the step, and the RNG state
    (tried on a generator of its own)."""
    path = Path(path)
    arrays, header, spec = _read(path, "torch")
    name, groups, scalars, step = (
        _json(path, header, k) for k in ("optimizer", "param_groups", "optim_scalars", "step")
    )
    if name not in OPTIMIZERS:
        raise CheckpointError(f"{path}: optimizer {limits.printable(repr(name), 60)} is not one of {list(OPTIMIZERS)}")
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        shapes = spec.build_torch()
    want = {f"model/{k}": (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in shapes.state_dict().items()}
    problems = _problems({k: v for k, v in arrays.items() if k.startswith("model/")}, want, allow_nonfinite=False)
    problems += _hyper_problems(name, groups, len(list(shapes.parameters())))
    if not (type(step) is int and 0 <= step < 1 << 62):
        problems.append(f"step = {limits.printable(step, 40)}: expected an int >= 0")
    rng = arrays.get("rng/torch")
    try:
        torch.Generator().set_state(torch.from_numpy(rng))  # the generator's own check, on a generator of its own
        assert rng.dtype == np.uint8 and rng.shape == tuple(torch.get_rng_state().shape)
    except (RuntimeError, TypeError, AssertionError, AttributeError):
        problems.append(f"rng/torch: expected a valid uint8{list(torch.get_rng_state().shape)} generator state")
    unknown = [k for k in arrays if not k.startswith(("model/", "optim/")) and k != "rng/torch"]
    problems += [f"unexpected key {limits.printable(repr(k), 60)}" for k in unknown]
    if not problems:
        try:
            template = _optimizer_template(name, groups[0], shapes)
        except (RuntimeError, ValueError, TypeError) as e:
            problems.append(f"{name} refuses the hyper-parameters ({limits.printable(e, 120)})")
        else:
            problems += _state_problems(arrays, scalars, template)
    if problems:
        raise CheckpointError(f"{path}: does not fit the model and optimizer: " + limits.summary(problems))
    with torch.random.fork_rng(devices=[]):  # the weights are loaded below: building must not move the caller's RNG
        model = spec.build_torch()
    optimizer = getattr(torch.optim, name)(model.parameters(), **_constructor_arguments(groups[0]))
    state: dict[int, dict] = {}
    for key, value in arrays.items():
        if key.startswith("optim/"):
            _, idx, entry = key.split("/", 2)
            state.setdefault(int(idx), {})[entry] = torch.from_numpy(value)
    for key, value in scalars.items():
        idx, entry = key.split("/", 1)
        state.setdefault(int(idx), {})[entry] = value
    model.load_state_dict(
        {k[len("model/") :]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("model/")}
    )
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(torch.from_numpy(rng))
    return spec, model, optimizer, step


# --- linen -----------------------------------------------------------------------------------


def _flat_tree(tree: Any, prefix: str) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {prefix + jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def save_linen(path: str | Path, spec: ModelSpec, state: ftrain.LinenState, key: jax.Array) -> None:
    arrays = _flat_tree(state, "state")
    arrays["rng/key"] = np.asarray(jax.random.key_data(key))
    write_arrays(path, arrays, _header(spec, "linen", key_impl=str(jax.random.key_impl(key))))


def load_linen(
    path: str | Path, template: ftrain.LinenState, *, allow_nonfinite: bool = False
) -> tuple[ModelSpec, ftrain.LinenState, jax.Array]:
    """(spec, state, dropout key); ``template`` gives the pytree structure (for example
    ``linen_init_state(model.init(...), tx)`` with the same optimizer). Every leaf is
    checked against it (shape, dtype, finite floats, counters not negative) first."""
    arrays, header, spec = _read(Path(path), "linen")
    want = _flat_tree(template, "state")
    unknown = {k: v for k, v in arrays.items() if not k.startswith("state") and k != "rng/key"}
    _compare(Path(path), {k: v for k, v in arrays.items() if k.startswith("state")} | unknown, want, allow_nonfinite)
    key = _rng_key(Path(path), header, arrays.get("rng/key"))
    leaves = [jnp.asarray(arrays[k]) for k in want]  # flatten order == _flat_tree order
    state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves)
    return spec, state, key


def _rng_key(path: Path, header: dict[str, str], data: np.ndarray | None) -> jax.Array:
    """The dropout key: a known PRNG implementation and key data of its shape and dtype."""
    impl = _json(path, header, "key_impl")
    try:
        if not (type(impl) is str and re.fullmatch(r"[a-z0-9_]{1,40}", impl)):
            raise ValueError("not a short name")
        want = np.asarray(jax.random.key_data(jax.random.key(0, impl=impl)))
    except (ValueError, TypeError, KeyError) as e:
        shown = limits.printable(repr(impl), 60)
        raise CheckpointError(f"{path}: PRNG implementation {shown} in the header is unknown ({e})") from None
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


def load_nnx(
    path: str | Path, model: nnx.Module, optimizer: nnx.Optimizer, *, allow_nonfinite: bool = False
) -> ModelSpec:
    """Restore into ``model`` and ``optimizer`` (built like the saved ones) in place, after
    every array is checked against them (shape, dtype, finite floats, counters)."""
    arrays, _, spec = _read(Path(path), "nnx")
    current = _nnx_flat(model, optimizer)
    _compare(Path(path), arrays, {k: _nnx_value(var) for k, (_, var) in current.items()}, allow_nonfinite)
    updates = []
    for k, (p, var) in current.items():
        value = jnp.asarray(arrays[k])
        if isinstance(var, nnx.RngKey):
            value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(var.get_value()))
        updates.append((p, var.replace(value)))
    nnx.update((model, optimizer), nnx.from_flat_state(updates))
    return spec
