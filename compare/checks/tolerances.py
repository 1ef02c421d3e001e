"""Every tolerance of every check, in one table: ``(rtol, atol)`` with what was measured.

A difference ``d`` between two results whose reference has magnitude ``scale`` (the largest
absolute value of the reference, normwise) passes when ``d <= atol + rtol * scale``, the
rule of ``numpy.isclose`` applied to the whole array at once. Each entry says what was
measured (CPU float32 unless stated; torch 2.13, jax 0.10.2, flax 0.12.8) so that a change
of tolerance is a visible, reviewable decision. The divergence report's entry is
:class:`Relative`: a factor over the reference framework's own float32 error.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float
    measured: str  # the worst case seen, and where

    def bound(self, scale: float = 0.0) -> float:
        """The largest difference that passes against a reference of magnitude ``scale``."""
        return self.atol + self.rtol * scale

    def holds(self, diff: float, scale: float = 0.0) -> bool:
        return bool(math.isfinite(diff) and diff <= self.bound(scale))


@dataclasses.dataclass(frozen=True)
class Relative:
    """A port's error judged against the reference framework's own error at the same
    place: both measured against the reference run in float64, a difference ``d`` whose
    reference has error ``own`` and magnitude ``scale`` passes when
    ``d <= factor * own + atol + rtol * scale``. The error of a correct float32 port grows
    with depth exactly as the reference's own does, so the bound grows with it."""

    factor: float
    rtol: float
    atol: float
    measured: str

    def bound(self, own: float, scale: float = 0.0) -> float:
        return self.factor * own + self.atol + self.rtol * scale

    def holds(self, diff: float, own: float, scale: float = 0.0) -> bool:
        return bool(math.isfinite(diff) and diff <= self.bound(own, scale))


TOLERANCES: dict[str, Tolerance | Relative] = {
    # eval mode, logits of the same weights (compare.checks.equivalence). The ResNets sum
    # thousands of products per output (3x3x512 convolutions) in another order in oneDNN
    # and XLA; the error grows with depth.
    "eval.mlp": Tolerance(1e-5, 1e-5, "7.2e-7 abs, seeds 0-4, batch 8 (normwise relative ~1e-6)"),
    "eval.cnn": Tolerance(1e-5, 1e-5, "1.7e-6 abs, seeds 0-4"),
    "eval.resnet18": Tolerance(1e-5, 1e-4, "4.8e-6 abs, seeds 0-4"),
    "eval.resnet18_cifar": Tolerance(1e-5, 1e-4, "3.9e-6 abs, seeds 0-4"),
    "eval.resnet34": Tolerance(1e-5, 1e-4, "2.7e-5 abs, seeds 0-4"),
    "eval.default": Tolerance(1e-5, 1e-4, "the ResNets' value, for a model without its own entry"),
    # both sides computing in bfloat16 (torch autocast, Flax compute_dtype): 8 bits of mantissa
    "eval.bfloat16": Tolerance(
        4e-2, 1e-2, "normwise relative <= 2.7e-2 (resnet18_cifar/nnx), abs <= 7.8e-2 (resnet18/nnx), seeds 0-2"
    ),
    # one train-mode step with injected masks (compare.checks.train_equivalence), mlp and cnn, seeds 0-2
    "train.logits": Tolerance(1e-6, 1e-5, "1.2e-6 abs"),
    "train.grads": Tolerance(1e-5, 0.0, "2.1e-6 relative to the tensor's largest entry (floored, see the check)"),
    "train.stats": Tolerance(1e-6, 1e-6, "2.4e-7 abs with bn_semantics='torch'"),
    # a deep network whose last stage sees 1x1 maps of a batch of 8: BatchNorm over 8 values
    "train.grads_deep": Tolerance(1e-4, 0.0, "1.3e-5 relative (reduced resnext, layer4.0.bn2.weight)"),
    # the same deep network's logits and running statistics: the eval ResNets' bound. On an
    # Intel Xeon with AVX-512 (oneDNN picks other kernels than on the AMD EPYC the first
    # bound was measured on) train.logits failed here: 1.25e-5 abs at scale 1.84
    "train.logits_deep": Tolerance(1e-5, 1e-4, "1.25e-5 abs (scale 1.8), 5e-6 typical; reduced resnext, seeds 0-3"),
    "train.stats_deep": Tolerance(1e-5, 1e-5, "5.7e-6 abs, reduced resnext, seeds 0-3 (Xeon, AVX-512)"),
    # 200 SGD steps in float64: identical arithmetic up to rounding
    "train.trajectory_float64": Tolerance(1e-10, 0.0, "7e-14 (mlp), 5e-14 (cnn) relative at step 200"),
    # compare.port: generated Flax modules against their torch networks (tests/test_port_families.py)
    "eval.port": Tolerance(1e-5, 1e-4, "the ResNets' value; <= 1.1e-6 of the largest logit on the 12 test networks"),
    # a float32 port's error against torch in float64, over torch's own float32 error there
    "eval.torch_own_error": Relative(
        4.0,
        1e-6,
        1e-30,
        "0.29-1.8x: 15 torchvision models, random weights and BatchNorm statistics, 64x64 (efficientnet_b0:"
        " torch's own float32 error 2e-2 of its largest logit, the port's 7.7e-3)",
    ),
    "eval.float64": Tolerance(1e-10, 0.0, "<= 3.9e-15 (test networks), <= 1.1e-11 (efficientnet_b0, random weights)"),
    # one train step of a float32 port where the train.* bounds are too tight for the network: its
    # error against the float64 step within this factor of torch's own float32 error (as layerwise)
    "train.port": Relative(
        10.0,
        1e-6,
        1e-30,
        "a gradient that is exactly 0 (a bias before BatchNorm): 0.24-0.83x (vgg_bn, conv1d); see the port tests",
    ),
    "train.step": Tolerance(1e-6, 1e-6, "parameters after one SGD step (lr 0.1): <= 3e-7 relative, test networks"),
    "train.float64": Tolerance(1e-10, 0.0, "one step in float64: <= 8.9e-13 (regnet_y_400mf's gradients)"),
    # data parallelism: reductions in another order across shards, 2-8 simulated devices
    "parallel.logits": Tolerance(
        1e-6, 1e-5, "1.4e-6 abs (jax, 8 simulated devices), 7.2e-7 (torch SyncBatchNorm on 4 ranks), 0 (torch DDP)"
    ),
    "parallel.grads": Tolerance(1e-6, 1e-5, "1e-6 abs"),
    "parallel.stats": Tolerance(1e-6, 1e-6, "2e-7 abs"),
    "parallel.train": Tolerance(1e-6, 1e-5, "3e-7 abs after 5 steps"),
    # several processes (compare.parallel), 5 steps with dropout, floating-point arrays of the
    # checkpoints (integers, steps and key data, must be equal): the same 4 devices as 2 x 2
    # and 4 x 1 processes (gloo in both) agree exactly; against 1 x 4 (in-process collectives)
    # the sums run in another order
    "parallel.split": Tolerance(1e-6, 1e-6, "0 (2x2 against 4x1); 4.8e-7 abs (2x2 against 1x4, nnx); resumes 1.2e-7"),
    # a synchronised run resumed on another device count: every reduction is split otherwise
    "parallel.resume": Tolerance(1e-6, 1e-5, "2.4e-7 abs (jax, 4 devices -> 2), 1.2e-7 (torch, 2 ranks -> 4)"),
    # the divergence report (compare.checks.equivalence.layerwise): a layer is flagged when the
    # port's float32 error there (against torch in float64) is well above torch's own float32
    # error; rtol is a floor of a few float32 roundings for layers where torch's error is ~0
    "layerwise": Relative(
        10.0,
        1e-6,
        1e-30,
        "port error / torch's own float32 error per layer, linen, seeds 0-2, batch 4: at most 3.1 (mlp drop1), "
        "2.9 (resnet18_cifar), 2.3 (resnet18), 1.7 (resnet50), 2.1 (resnet152 width 16, 370 layers), "
        "1.5 (resnext50_32x4d); median 0.9 to 2.5",
    ),
}


def get(name: str) -> Tolerance | Relative:
    """The entry ``name``; ``eval.<model>`` falls back to ``eval.default``."""
    if name in TOLERANCES:
        return TOLERANCES[name]
    if name.startswith("eval."):
        return TOLERANCES["eval.default"]
    raise KeyError(f"no tolerance {name!r}; known: {', '.join(TOLERANCES)}")
