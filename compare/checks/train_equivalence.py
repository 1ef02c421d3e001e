"""Exact train-mode equivalence: same weights, same data, same dropout masks.

With the masks injected (``compare.masks``), torch and Flax compute the same function in
training, so everything can be compared step by step: the logits of one train-mode
forward, the gradients (moved to torch's layout by the weight map, which is linear, so it
carries gradients exactly like weights), the running statistics after the step, and the
parameters after many optimizer steps.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import flaxbn.train as ftrain
import torchbn.train as ttrain
from compare import conventions, masks, optimizers, transfer
from compare.checks import diffs, equivalence, tolerances
from compare.records import TrainEquivalenceRecord
from compare.registry import ModelSpec, get

LOGITS = tolerances.get("train.logits")
GRADS = tolerances.get("train.grads")
STATS = tolerances.get("train.stats")
TRAJECTORY_FLOAT64 = tolerances.get("train.trajectory_float64")


@dataclasses.dataclass
class Setup:
    """The same starting point for both sides."""

    spec: ModelSpec
    torch_model: torch.nn.Module
    x: np.ndarray  # torch layout
    labels: np.ndarray
    sites: list[masks.DropoutSite]
    rng: np.random.Generator

    @property
    def flax_x(self) -> jax.Array:
        return jnp.asarray(conventions.to_flax_input(self.x))


def setup(spec: ModelSpec | str, seed: int = 0, batch: int = 32, dtype: str = "float32") -> Setup:
    spec = get(spec)
    torch.manual_seed(seed)
    model = spec.build_torch()
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *spec.input_shape), dtype=np.float32)
    equivalence.randomize_batchnorm(model, torch.from_numpy(x), seed)
    if dtype == "float64":
        model.double()
        x = x.astype(np.float64)
    labels = rng.integers(0, spec.config.num_classes, batch)
    return Setup(spec, model, x, labels, masks.sites(model, torch.from_numpy(x)), rng)


def _torch_side(s: Setup, step_masks) -> dict[str, Any]:
    with masks.inject_torch(s.torch_model, s.sites, step_masks):
        loss, logits = ttrain.loss_and_grads(s.torch_model, torch.from_numpy(s.x), torch.from_numpy(s.labels))
    grads = {k: p.grad.numpy().copy() for k, p in s.torch_model.named_parameters()}
    buffers = {
        k: v.numpy().copy() for k, v in s.torch_model.state_dict().items() if "running" in k or "num_batches" in k
    }
    return {"loss": float(loss), "logits": logits.numpy(), "grads": grads, "buffers": buffers}


def _flax_side(s: Setup, api: str, bn_semantics: str, step_masks, bn_variance: str = "two_pass") -> dict[str, Any]:
    sd = s.torch_model.state_dict()
    if api == "linen":
        variables = transfer.torch_to_linen(sd, s.spec)
        apply = masks.linen_masked_apply(
            s.spec.build_linen(bn_semantics, bn_variance=bn_variance), s.sites, [jnp.asarray(m) for m in step_masks]
        )
        (loss, (logits, stats)), grads = ftrain.linen_loss_and_grads(
            apply, variables["params"], variables["batch_stats"], s.flax_x, jnp.asarray(s.labels), jax.random.key(0)
        )
    else:
        model = transfer.torch_to_nnx(
            sd, s.spec, s.spec.build_nnx(nnx.Rngs(0), bn_semantics=bn_semantics, bn_variance=bn_variance)
        )
        model.train()
        with masks.inject_nnx(model, s.sites, step_masks):
            (loss, logits), grads_state = ftrain.nnx_loss_and_grads(model, s.flax_x, jnp.asarray(s.labels))
        grads = nnx.to_pure_dict(grads_state)
        stats = transfer.nnx_to_linen(model, s.spec)["batch_stats"]
    as_torch = transfer.linen_to_torch({"params": grads, "batch_stats": stats}, s.spec)
    params = {k for k, _ in s.torch_model.named_parameters()}
    return {
        "loss": float(loss),
        "logits": np.asarray(logits),
        "grads": {k: v.numpy() for k, v in as_torch.items() if k in params},
        "buffers": {k: v.numpy() for k, v in as_torch.items() if k not in params},
    }


def one_step(
    spec: ModelSpec | str,
    api: str,
    *,
    bn_semantics: str = "torch",
    bn_variance: str = "two_pass",
    seed: int = 0,
    batch: int = 32,
) -> dict:
    """One train-mode forward and backward on both sides with the same masks.

    Returns the differences: ``logits_max_abs_diff``, ``grad_max_rel_diff`` (worst tensor,
    see the floor below),
    ``stats_max_abs_diff``, and the torch and Flax results themselves (``torch``, ``flax``).
    """
    s = setup(spec, seed, batch)
    step_masks = masks.draw(s.sites, s.rng)
    var_before = {k: v.numpy().copy() for k, v in s.torch_model.state_dict().items() if k.endswith("running_var")}
    flax_out = _flax_side(s, api, bn_semantics, step_masks, bn_variance)  # first: the torch step changes the model
    torch_out = _torch_side(s, step_masks)
    # The bias of a Linear/Conv followed by BatchNorm has a true gradient of 0 (the mean is
    # subtracted): both sides give rounding noise (~1e-10). So each tensor's scale is
    # floored at 1% of the largest gradient entry of the model.
    floor = 1e-2 * max(float(np.max(np.abs(g))) for g in torch_out["grads"].values())
    grad_rel = {k: diffs.max_rel(flax_out["grads"][k], torch_out["grads"][k], floor) for k in torch_out["grads"]}
    stats_keys = [k for k in torch_out["buffers"] if "running" in k]
    logits = diffs.tree_diff(flax_out["logits"], torch_out["logits"])
    stats = diffs.tree_diff(
        {k: flax_out["buffers"][k] for k in stats_keys}, {k: torch_out["buffers"][k] for k in stats_keys}
    )
    return {
        "logits_max_abs_diff": logits.max_abs,
        "logits_max_rel_diff": logits.max_rel,
        "logits_scale": logits.scale,
        "grad_max_rel_diff": max(grad_rel.values()),
        "grad_rel_diff": grad_rel,
        "stats_max_abs_diff": stats.max_abs,
        "stats_scale": stats.scale,
        "counters_equal": all(
            int(flax_out["buffers"][k]) == int(torch_out["buffers"][k])
            for k in torch_out["buffers"]
            if "num_batches" in k
        ),
        "var_before": var_before,
        "torch": torch_out,
        "flax": flax_out,
    }


def trajectory(
    spec: ModelSpec | str,
    api: str,
    *,
    steps: int = 200,
    seed: int = 0,
    batch: int = 32,
    optimizer: str = "sgd_momentum",
    dtype: str = "float32",
    bn_variance: str = "two_pass",
) -> dict[str, list[float]]:
    """``steps`` training steps on both sides from the same weights, batches and masks,
    with the torch-compatible BatchNorm. Returns per-step lists: ``loss_diff`` (abs) and
    ``param_rel_diff`` (worst tensor of parameters and running statistics, normwise).

    ``dtype="float64"`` runs both sides in double precision (torch ``.double()``, JAX with
    x64 enabled for the call): the frameworks' arithmetic is then identical to ~1e-12.
    In float32, rounding differences occasionally flip a discrete decision (a ReLU input
    or two max-pool candidates within rounding of each other), which sends the
    trajectories apart by a step of ~1e-4; such events compound over steps.
    """
    with jax.enable_x64(dtype == "float64"):
        return _trajectory(get(spec), api, steps, seed, batch, optimizer, dtype, bn_variance)


def _trajectory(
    spec: ModelSpec, api: str, steps: int, seed: int, batch: int, optimizer: str, dtype: str, bn_variance: str
):
    s = setup(spec, seed, batch, dtype)
    torch_opt_fn, optax_fn = optimizers.PAIRS[optimizer]
    tx = optax_fn()
    flax_side = (_LinenRun if api == "linen" else _NnxRun)(s, tx, bn_variance)
    torch_opt = torch_opt_fn(s.torch_model.parameters())
    data_rng = np.random.default_rng(seed + 1)
    batches = [
        (data_rng.standard_normal(s.x.shape).astype(s.x.dtype), data_rng.integers(0, s.spec.config.num_classes, batch))
        for _ in range(8)
    ]
    loss_diff, param_diff = [], []
    with flax_side:
        for step in range(steps):
            x, y = batches[step % len(batches)]
            step_masks = masks.draw(s.sites, s.rng)
            with masks.inject_torch(s.torch_model, s.sites, step_masks):
                torch_loss = float(
                    ttrain.train_step(s.torch_model, torch_opt, torch.from_numpy(x), torch.from_numpy(y))
                )
            flax_loss = flax_side.step(jnp.asarray(conventions.to_flax_input(x)), jnp.asarray(y), step_masks)
            torch_sd = {k: v.numpy() for k, v in s.torch_model.state_dict().items() if "num_batches" not in k}
            flax_sd = flax_side.state_dict()
            loss_diff.append(abs(flax_loss - torch_loss))
            param_diff.append(max(diffs.max_rel(flax_sd[k].numpy(), torch_sd[k]) for k in torch_sd))
    return {"loss_diff": loss_diff, "param_rel_diff": param_diff}


class _LinenRun:
    """The linen side of a trajectory: a jitted functional step with the masks as arguments."""

    def __init__(self, s: Setup, tx, bn_variance: str):
        self.spec, self.dtype = s.spec, _torch_dtype(s.x)
        variables = transfer.torch_to_linen(s.torch_model.state_dict(), s.spec, float_dtype=s.x.dtype)
        self.state = ftrain.linen_init_state(variables, tx)
        model = s.spec.build_linen("torch", bn_variance=bn_variance)

        @jax.jit
        def step(state, x, y, step_masks):
            apply = masks.linen_masked_apply(model, s.sites, step_masks)
            return ftrain.linen_train_step(apply, tx, state, x, y, jax.random.key(0))

        self._step = step

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def step(self, x, y, step_masks) -> float:
        self.state, loss = self._step(self.state, x, y, [jnp.asarray(m) for m in step_masks])
        return float(loss)

    def state_dict(self):
        variables = {"params": self.state.params, "batch_stats": self.state.batch_stats}
        return transfer.linen_to_torch(variables, self.spec, dtype=self.dtype)


class _NnxRun:
    """The nnx side of a trajectory: ``nnx.jit`` step; masks swapped in for the run."""

    def __init__(self, s: Setup, tx, bn_variance: str):
        self.spec, self.sites, self.dtype = s.spec, s.sites, _torch_dtype(s.x)
        # its dropouts are replaced by masks
        model = s.spec.build_nnx(nnx.Rngs(0), bn_semantics="torch", bn_variance=bn_variance)
        self.model = transfer.torch_to_nnx(s.torch_model.state_dict(), s.spec, model, float_dtype=s.x.dtype)
        self.model.train()
        self.optimizer = nnx.Optimizer(self.model, tx, wrt=nnx.Param)
        self._step = nnx.jit(ftrain.nnx_train_step)
        self._injection = masks.inject_nnx(self.model, s.sites, [np.ones(site.mask_shape, bool) for site in s.sites])

    def __enter__(self):
        self._injection.__enter__()
        return self

    def __exit__(self, *exc):
        return self._injection.__exit__(*exc)

    def step(self, x, y, step_masks) -> float:
        masks.set_nnx_masks(self.model, self.sites, step_masks)
        return float(self._step(self.model, self.optimizer, x, y))

    def state_dict(self):
        return transfer.nnx_to_torch(self.model, self.spec, dtype=self.dtype)


def _torch_dtype(x: np.ndarray) -> torch.dtype:
    return torch.float64 if x.dtype == np.float64 else torch.float32


def record(name: str, api: str, *, steps: int = 200, seed: int = 0) -> dict:
    """The train-mode ``equivalence`` record of one model and Flax API: one step in
    float32 (logits, gradients, statistics) and ``steps``-step trajectories in float64
    (checked) and float32 (recorded, with the first step past 1e-4)."""
    r = one_step(name, api, seed=seed)
    f64 = trajectory(name, api, steps=steps, seed=seed, dtype="float64")
    f32 = trajectory(name, api, steps=steps, seed=seed, dtype="float32")
    f64_max = max(f64["param_rel_diff"])
    ok = (
        LOGITS.holds(r["logits_max_abs_diff"], r["logits_scale"])
        and GRADS.holds(r["grad_max_rel_diff"], 1.0)
        and STATS.holds(r["stats_max_abs_diff"], r["stats_scale"])
        and r["counters_equal"]
        and TRAJECTORY_FLOAT64.holds(f64_max, 1.0)
    )
    return TrainEquivalenceRecord(
        model=get(name).name,
        flax_api=api,
        mode="train",
        dtype="float32",
        max_abs_diff=r["logits_max_abs_diff"],
        max_rel_diff=r["logits_max_rel_diff"],
        tol=LOGITS.bound(r["logits_scale"]),
        ok=bool(ok),
        grad_max_rel_diff=r["grad_max_rel_diff"],
        grad_rtol=GRADS.rtol,
        stats_max_abs_diff=r["stats_max_abs_diff"],
        stats_tol=STATS.bound(r["stats_scale"]),
        trajectory_steps=steps,
        trajectory_float64_max_rel_diff=f64_max,
        trajectory_float64_tol=TRAJECTORY_FLOAT64.rtol,
        trajectory_float32_final_rel_diff=f32["param_rel_diff"][-1],
        trajectory_float32_first_step_above_1e_4=next(
            (i + 1 for i, d in enumerate(f32["param_rel_diff"]) if d > 1e-4), None
        ),
        divergence_float64=f64["param_rel_diff"],
        divergence_float32=f32["param_rel_diff"],
    ).to_dict()
