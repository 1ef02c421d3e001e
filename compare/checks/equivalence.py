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
import copy
import dataclasses
import functools
import warnings
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
    """One row of the divergence report. Errors are against torch in float64."""

    layer: str
    max_abs_diff: float  # max |flax - torch| (both float32)
    scale: float  # max |torch output| of that layer
    ok: bool
    call: int = 0  # which call of a layer used more than once (torchvision's shared ReLU)
    port_error: float | None = None  # max |flax - torch float64|
    torch_error: float | None = None  # max |torch float32 - torch float64|: torch's own error
    bound: float | None = None  # the largest port_error that is ok here
    detail: str | None = None  # a shape mismatch, or why there is no float64 reference


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
        tol = tolerances.get("eval.bfloat16" if conventions.Precision(dtype).mixed else f"eval.{spec.name}")
    torch.manual_seed(seed)
    model = spec.build_torch()
    rng = np.random.default_rng(seed)
    calibration = rng.standard_normal((max(batch, 8), *spec.input_shape), dtype=np.float32)
    randomize_batchnorm(model, torch.from_numpy(calibration), seed)
    model.eval().to(torch_device)
    x = rng.standard_normal((batch, *spec.input_shape), dtype=np.float32)
    autocast = conventions.Precision(dtype).autocast(torch_device)
    with torch.no_grad(), autocast:
        expected = model(torch.from_numpy(x).to(torch_device)).float().cpu().numpy()
    state = flax_state_from_torch(spec, api, model.state_dict(), dtype)
    got = flax_eval(spec, api, state, x, dtype)
    diff = diffs.tree_diff(got, expected)
    ok = tol.holds(diff.max_abs, diff.scale)
    layers = [] if ok or dtype != "float32" else layerwise(spec, api, model, state, x)
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


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """``model`` in eval mode, every module's own mode restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training


def _torch_outputs(model: torch.nn.Module, x: np.ndarray) -> dict[str, list[np.ndarray]]:
    """Every call's output of every named submodule, in execution order: {name: [call 0,
    call 1, ...]}. Each output is *copied* when its hook runs: ``detach().numpy()`` shares
    memory with the tensor, and a later in-place op (``ReLU(inplace=True)``, ``out +=
    identity``) would overwrite what was stored."""
    outputs: dict[str, list[np.ndarray]] = {}

    def keep(module, inputs, output, name):
        if isinstance(output, torch.Tensor):
            outputs.setdefault(name, []).append(output.detach().to("cpu", copy=True).numpy())

    hooks = [
        module.register_forward_hook(functools.partial(keep, name=name))
        for name, module in model.named_modules()
        if name
    ]
    param = next(model.parameters(), None)
    try:
        with torch.no_grad():
            model(torch.from_numpy(x).to(param.device if param is not None else "cpu"))
    finally:
        for h in hooks:
            h.remove()
    return outputs


def _torch_float64_outputs(model: torch.nn.Module, x: np.ndarray) -> dict[str, list[np.ndarray]] | str:
    """The same outputs from a float64 copy of ``model`` (the reference of every error), or
    why it could not run in float64."""
    try:
        reference = copy.deepcopy(model).to("cpu", torch.float64)
        return _torch_outputs(reference, x.astype(np.float64))
    except Exception as e:  # a forward that builds float32 tensors itself, a module deepcopy refuses
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _flax_outputs(api: str, linen_model: Any, state: Any, x: np.ndarray) -> dict[str, list[np.ndarray]]:
    """Every call's output of every Flax submodule, keyed by its dotted path (copied)."""
    xf = jnp.asarray(conventions.to_flax_input(x))
    if api == "linen":
        _, inter = linen_model.apply(state, xf, train=False, capture_intermediates=True, mutable=["intermediates"])
        flat = traverse_util.flatten_dict(inter["intermediates"])
    else:
        state.eval()
        _, inter = nnx.capture(state, nnx.Intermediate, method_outputs=nnx.Intermediate)(xf)
        flat = {path: var.get_value() for path, var in nnx.to_flat_state(inter)}
    return {
        ".".join(map(str, path[:-1])): [np.array(o, copy=True) for o in out]
        for path, out in flat.items()
        if path[-1] == "__call__"
    }


def layerwise(
    spec: ModelSpec | transfer.Port | str,
    api: str,
    torch_model: torch.nn.Module,
    state: Any,
    x: np.ndarray,
    tol: tolerances.Tolerance | None = None,
    *,
    linen_model: Any = None,
) -> list[LayerDiff]:
    """The divergence report: per layer (and per call of a layer used twice), in torch's
    execution order, how far the Flax output is from torch's, for the layers both sides
    name (module paths; a custom pair's ``rename`` is followed).

    Both sides are judged against torch run in float64 on a copy of ``torch_model``: a
    layer is not ok when the port's float32 error there is above ``factor`` times torch's
    own float32 error at that layer (plus a floor of a few roundings; the ``layerwise``
    entry of the tolerance table), so a correct port of any depth reports nothing and the
    first layer that is really wrong comes first. Every captured output is copied, so
    in-place ops cannot overwrite what was captured.

    Args:
      spec: a registry name, a ``ModelSpec`` or a ``transfer.custom`` pair.
      api: "linen" (``state`` = variables) or "nnx" (``state`` = the model).
      x: one batch in torch's layout.
      tol: deprecated: used only when the model cannot run in float64, as an absolute bound.
      linen_model: the linen module (default: the registry spec's); checked first with
        :func:`compare.transfer.check_twin`, as is an nnx ``state``.
    """
    spec = transfer.rules.resolve(spec)
    if tol is not None:
        warnings.warn(
            "layerwise(tol=...) is deprecated: layers are judged against torch's own float32 error "
            "(tolerances 'layerwise'); tol is used only for a model that cannot run in float64",
            DeprecationWarning,
            stacklevel=2,
        )
    if api == "linen" and linen_model is None:
        linen_model = spec.build_linen()
    if isinstance(spec, transfer.Port):
        transfer.check_twin(spec, linen_model if api == "linen" else state, x)
    relative = tolerances.get("layerwise")
    flax_out = _flax_outputs(api, linen_model, state, x)
    with _eval_mode(torch_model):  # the Flax side runs in eval mode; nothing is updated
        torch32 = _torch_outputs(torch_model, x)
        torch64 = _torch_float64_outputs(torch_model, x)
    absolute = tol or tolerances.get("eval.default")
    rename = spec.rename if isinstance(spec, transfer.Port) else {}
    out = []
    for name, calls in torch32.items():
        got_calls = flax_out.get(rename.get(name, name))
        if got_calls is None:
            continue  # a ReLU, Dropout or container that exists only on the torch side
        for call, (t32, got) in enumerate(zip(calls, got_calls, strict=False)):
            t32 = conventions.to_flax_input(t32)  # (N, C, H, W) -> (N, H, W, C); others as they are
            scale = float(np.max(np.abs(t32))) if t32.size else 0.0
            if got.shape != t32.shape:
                out.append(LayerDiff(name, float("inf"), scale, False, call=call, detail=f"shape {got.shape}"))
                continue
            diff = diffs.tree_diff(got, t32).max_abs
            if isinstance(torch64, str):  # no float64 reference: the absolute bound
                ok = absolute.holds(diff, scale)
                out.append(LayerDiff(name, diff, scale, ok, call=call, bound=absolute.bound(scale), detail=torch64))
                continue
            t64 = conventions.to_flax_input(torch64[name][call])
            own = float(np.max(np.abs(t32 - t64))) if t64.size else 0.0
            err = float(np.max(np.abs(got - t64))) if t64.size else 0.0
            bound = relative.bound(own, float(np.max(np.abs(t64))) if t64.size else 0.0)
            out.append(LayerDiff(name, diff, scale, bool(np.isfinite(err) and err <= bound), call, err, own, bound))
    return out


def format_report(layers: list[LayerDiff]) -> str:
    """The divergence report as a text table, one row per layer (and call), the first
    layer that is not ok marked with an arrow."""
    first = next((i for i, d in enumerate(layers) if not d.ok), None)
    rows = [("", "layer", "|flax - torch|", "port error", "torch's own", "bound", "ok")]
    for i, d in enumerate(layers):
        name = d.layer + (f" (call {d.call + 1})" if d.call else "")
        cells = [d.max_abs_diff, d.port_error, d.torch_error, d.bound]
        text = [f"{c:.2e}" if c is not None else "-" for c in cells]
        rows.append(("->" if i == first else "", name, *text, "ok" if d.ok else "NOT OK"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows)


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
