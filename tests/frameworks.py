"""One BatchNorm layer of each framework, driven the same way, for the spec tests.

Inputs and outputs are numpy, features on the last axis for every framework: (N, C) for
all, or (N, H, W, C) which is transposed to (N, C, H, W) for torch. ``momentum`` is given
in torch's convention and converted for Flax. ``flaxbn=True`` swaps the stock Flax layer
for flaxbn's (``semantics`` "flax" or "torch").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import linen as nn
from flax import nnx

import flaxbn

FRAMEWORKS = ["torch", "linen", "nnx"]


def _to_torch(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.permute(0, 3, 1, 2) if t.ndim == 4 else t  # (N, H, W, C) -> (N, C, H, W)


def _from_torch(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return (t.permute(0, 2, 3, 1) if t.ndim == 4 else t).numpy()  # (N, C, H, W) -> (N, H, W, C)


class BN:
    def __init__(self, framework: str, features: int, *, momentum=0.1, eps=1e-5, flaxbn_semantics=None, **flax_kwargs):
        self.framework = framework
        flax_momentum = None if momentum is None else 1.0 - momentum
        if framework == "torch":
            self.layer = torch.nn.BatchNorm1d(features, momentum=momentum, eps=eps)
            self.layer2d = torch.nn.BatchNorm2d(features, momentum=momentum, eps=eps)
            self.layer2d.load_state_dict(self.layer.state_dict())
        elif framework == "linen":
            kwargs = {"momentum": flax_momentum, "epsilon": eps, **flax_kwargs}
            if flaxbn_semantics == "torch":
                self.layer = flaxbn.LinenTorchBatchNorm(**kwargs)
            elif flaxbn_semantics == "flax":
                self.layer = flaxbn.LinenBatchNorm(use_fast_variance=False, **kwargs)
            else:
                self.layer = nn.BatchNorm(**kwargs)
            self.variables = self.layer.init(jax.random.key(0), jnp.zeros((2, features)), use_running_average=True)
        else:
            kwargs = {"momentum": flax_momentum, "epsilon": eps, "rngs": nnx.Rngs(0), **flax_kwargs}
            if flaxbn_semantics == "torch":
                self.layer = flaxbn.NnxTorchBatchNorm(features, **kwargs)
            elif flaxbn_semantics == "flax":
                self.layer = flaxbn.NnxBatchNorm(features, use_fast_variance=False, **kwargs)
            else:
                self.layer = nnx.BatchNorm(features, **kwargs)

    def __call__(self, x: np.ndarray, *, train: bool) -> np.ndarray:
        if self.framework == "torch":
            layer = self.layer2d if x.ndim == 4 else self.layer
            if layer is self.layer2d:
                self.layer2d.load_state_dict(self.layer.state_dict())
            layer.train(train)
            with torch.no_grad():
                y = _from_torch(layer(_to_torch(x)))
            if layer is self.layer2d:
                self.layer.load_state_dict(self.layer2d.state_dict())
            return y
        if self.framework == "linen":
            if not train:
                return np.asarray(self.layer.apply(self.variables, jnp.asarray(x), use_running_average=True))
            y, updates = self.layer.apply(
                self.variables, jnp.asarray(x), use_running_average=False, mutable=["batch_stats"]
            )
            self.variables = {**self.variables, **updates}
            return np.asarray(y)
        return np.asarray(self.layer(jnp.asarray(x), use_running_average=not train))

    @property
    def stats(self) -> dict[str, np.ndarray]:
        """running mean, running var (and the counter where the layer has one)."""
        if self.framework == "torch":
            out = {"mean": self.layer.running_mean.numpy(), "var": self.layer.running_var.numpy()}
            return {**out, "count": int(self.layer.num_batches_tracked)}
        if self.framework == "linen":
            s = self.variables["batch_stats"]
            out = {"mean": np.asarray(s["mean"]), "var": np.asarray(s["var"])}
            return {**out, "count": int(s["num_batches_tracked"])} if "num_batches_tracked" in s else out
        out = {"mean": np.asarray(self.layer.mean[...]), "var": np.asarray(self.layer.var[...])}
        if hasattr(self.layer, "num_batches_tracked"):
            out["count"] = int(self.layer.num_batches_tracked[...])
        return out

    def set_stats(self, mean: np.ndarray, var: np.ndarray) -> None:
        if self.framework == "torch":
            self.layer.running_mean.copy_(torch.from_numpy(mean))
            self.layer.running_var.copy_(torch.from_numpy(var))
        elif self.framework == "linen":
            stats = {**self.variables["batch_stats"], "mean": jnp.asarray(mean), "var": jnp.asarray(var)}
            self.variables = {**self.variables, "batch_stats": stats}
        else:
            self.layer.mean[...], self.layer.var[...] = jnp.asarray(mean), jnp.asarray(var)
