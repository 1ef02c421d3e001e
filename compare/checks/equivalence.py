"""Eval-mode equivalence: the same weights give the same logits in torch, linen and nnx.

Each check builds the torch model, gives every BatchNorm *non-trivial* statistics and
affine parameters (random, so that a mean/var or scale/bias swap changes the output),
transfers them, runs one batch through both sides in eval mode and records the largest
differences of the logits. When a check fails, :func:`layerwise` walks the network in
torch's execution order (forward hooks against Flax intermediates) and names the first
layer whose output differs, so a porting bug is found in seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx, traverse_util

from compare import conventions, transfer
from compare.checks import diffs, tolerances
from compare.records import EquivalenceRecord
from compare.registry import ModelSpec, get


@dataclasses.dataclass
class LayerDiff:
    layer: str
    max_abs_diff: float
    scale: float  # max |torch output| of that layer
    ok: bool


def randomize_batchnorm(model: torch.nn.Module, x: torch.Tensor, seed: int) -> None:
    """Give every BatchNorm non-trivial statistics, affine parameters and counter.

    The running statistics start from the batch statistics of ``x`` (so activations keep
    the scale of a trained network instead of exploding with depth) and are then
    perturbed per channel: mean += 0.2 * std * N(0, 1), var *= U(0.6, 1.6).
    """
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    was_training = model.training
    with torch.no_grad():
        for m in bns:
            m.momentum = 1.0  # running statistics := this batch's statistics
        model.train()
        model(x)
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
            c = m.num_features
            if m.affine:
                m.weight.copy_(torch.empty(c).uniform_(0.5, 1.5, generator=gen))
                m.bias.copy_(0.2 * torch.randn(c, generator=gen))
            if m.track_running_stats:
                m.running_mean.add_(0.2 * m.running_var.sqrt() * torch.randn(c, generator=gen))
                m.running_var.mul_(torch.empty(c).uniform_(0.6, 1.6, generator=gen))
                m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=gen)))
    model.train(was_training)


def flax_eval(spec: ModelSpec, api: str, state: Any, x: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """Logits of the Flax side in eval mode (float32); ``state`` is linen variables or an
    nnx model; ``x`` is in torch layout; ``dtype`` is the compute dtype of the linen model."""
    xf = jnp.asarray(conventions.to_flax_input(x))
    if api == "linen":
        return np.asarray(spec.build_linen(compute_dtype=dtype).apply(state, xf, train=False), np.float32)
    state.eval()
    return np.asarray(state(xf), np.float32)


def flax_state_from_torch(spec: ModelSpec, api: str, state_dict, dtype: str = "float32") -> Any:
    if api == "linen":
        return transfer.torch_to_linen(state_dict, spec)
    if api == "nnx":
        return transfer.torch_to_nnx(state_dict, spec, spec.build_nnx(nnx.Rngs(0), compute_dtype=dtype))
    raise ValueError(f"flax_api must be 'linen' or 'nnx', got {api!r}")


def check_eval(
    spec: ModelSpec | str,
    api: str,
    *,
    seed: int = 0,
    batch: int = 8,
    tol: tolerances.Tolerance | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict:
    """One eval-mode equivalence record (:class:`compare.records.EquivalenceRecord`, with
    ``layers`` when a float32 check fails). ``tol`` defaults to the table's ``eval.<model>``
    (``eval.bfloat16`` for ``dtype="bfloat16"``: torch under ``autocast``, Flax with
    ``compute_dtype="bfloat16"``, both with float32 weights and BatchNorm statistics);
    ``device`` is 'cpu' or 'gpu' for both sides."""
    spec = get(spec)
    with true_float32(), jax.default_device(jax.devices(device)[0]):
        return _check_eval(spec, api, seed, batch, tol, "cuda" if device == "gpu" else "cpu", dtype)


@contextlib.contextmanager
def true_float32():
    """float32 matmuls and convolutions on both sides: TF32 off in torch (cuBLAS and
    cuDNN), ``highest`` matmul precision in JAX. No effect on CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with jax.default_matmul_precision("highest"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _check_eval(
    spec: ModelSpec, api: str, seed: int, batch: int, tol: tolerances.Tolerance | None, torch_device: str, dtype: str
) -> dict:
    if tol is None:
        tol = tolerances.get("eval.bfloat16" if dtype == "bfloat16" else f"eval.{spec.name}")
    torch.manual_seed(seed)
    model = spec.build_torch()
    rng = np.random.default_rng(seed)
    calibration = rng.standard_normal((max(batch, 8), *spec.input_shape), dtype=np.float32)
    randomize_batchnorm(model, torch.from_numpy(calibration), seed)
    model.eval().to(torch_device)
    x = rng.standard_normal((batch, *spec.input_shape), dtype=np.float32)
    autocast = torch.autocast(torch_device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    with torch.no_grad(), autocast:
        expected = model(torch.from_numpy(x).to(torch_device)).float().cpu().numpy()
    state = flax_state_from_torch(spec, api, model.state_dict(), dtype)
    got = flax_eval(spec, api, state, x, dtype)
    diff = diffs.tree_diff(got, expected)
    ok = tol.holds(diff.max_abs, diff.scale)
    layers = [] if ok or dtype != "float32" else layerwise(spec, api, model, state, x, tol)
    return EquivalenceRecord(
        model=spec.name,
        flax_api=api,
        mode="eval",
        dtype=dtype,
        max_abs_diff=diff.max_abs,
        max_rel_diff=diff.max_rel,
        tol=tol.bound(diff.scale),
        ok=ok,
        first_divergence=next((d.layer for d in layers if not d.ok), None),
        layers=[dataclasses.asdict(d) for d in layers] or None,
    ).to_dict()


def _torch_outputs(model: torch.nn.Module, x: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Outputs of every named submodule, in execution order."""
    outputs, hooks = [], []
    for name, module in model.named_modules():
        if name:
            hooks.append(
                module.register_forward_hook(
                    lambda m, i, o, name=name: outputs.append((name, o.detach().cpu().numpy()))
                )
            )
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(torch.from_numpy(x).to(device))
    finally:
        for h in hooks:
            h.remove()
    return outputs


def _flax_outputs(api: str, linen_model: Any, state: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    """Outputs of every Flax submodule, keyed by their dotted path."""
    xf = jnp.asarray(conventions.to_flax_input(x))
    if api == "linen":
        _, inter = linen_model.apply(state, xf, train=False, capture_intermediates=True, mutable=["intermediates"])
        flat = traverse_util.flatten_dict(inter["intermediates"])
    else:
        state.eval()
        _, inter = nnx.capture(state, nnx.Intermediate, method_outputs=nnx.Intermediate)(xf)
        flat = {path: var.get_value() for path, var in nnx.to_flat_state(inter)}
    return {".".join(map(str, path[:-1])): np.asarray(out[0]) for path, out in flat.items() if path[-1] == "__call__"}


def layerwise(
    spec: ModelSpec | transfer.Port,
    api: str,
    torch_model: torch.nn.Module,
    state: Any,
    x: np.ndarray,
    tol: tolerances.Tolerance,
    *,
    linen_model: Any = None,
) -> list[LayerDiff]:
    """Per-layer max |torch - flax| in torch's execution order, for layers both sides
    name. A layer is ok when its difference is within ``tol`` of that layer's output.
    ``spec`` may be a custom pair (``transfer.custom``, whose ``rename`` is followed); for
    linen, ``linen_model`` is the module (default: the registry spec's)."""
    if api == "linen" and linen_model is None:
        linen_model = spec.build_linen()
    flax_out = _flax_outputs(api, linen_model, state, x)
    rename = spec.rename if isinstance(spec, transfer.Port) else {}
    out = []
    for name, ref in _torch_outputs(torch_model, x):
        flax_name = rename.get(name, name)
        if flax_name not in flax_out:
            continue  # ReLU/Dropout/Identity modules exist only on the torch side
        ref = conventions.to_flax_input(ref)  # (N, C, H, W) -> (N, H, W, C); others as they are
        got = flax_out[flax_name]
        if got.shape != ref.shape:
            out.append(LayerDiff(name, float("inf"), float(np.max(np.abs(ref))), False))
            continue
        d = diffs.tree_diff(got, ref)
        out.append(LayerDiff(name, d.max_abs, d.scale, tol.holds(d.max_abs, d.scale)))
    return out


def run(
    models: list[str],
    apis: list[str],
    *,
    seeds: list[int],
    batch: int,
    device: str = "cpu",
    dtypes: tuple[str, ...] = ("float32",),
    progress=None,
) -> list[dict]:
    """Every (model, api, dtype, seed) check; ``progress`` is called after each."""
    records = []
    for name in models:
        for api in apis:
            for dtype in dtypes:
                for seed in seeds:
                    records.append(check_eval(name, api, seed=seed, batch=batch, device=device, dtype=dtype))
                    if progress:
                        progress(f"{name}/{api}/{dtype}/seed {seed}", None)
    jax.clear_caches()
    return records
