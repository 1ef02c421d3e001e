"""Analytic FLOP count of one training step, from the layer shapes.

Counted: the multiply-adds of Linear and Conv layers, as 2 FLOPs each (a multiply and an
add). Not counted: BatchNorm, ReLU, pooling, dropout, the loss and the optimizer, which
are elementwise or reductions: O(activations), under 2% of the step for these models.

Per layer with forward cost F = 2 * (multiply-adds):

* forward: F;
* backward to the weights: F (one product of the same size);
* backward to the inputs: F, except for the first layer, whose input (the data) needs no
  gradient.

So a step is 3 * sum(F) - F_first. ``tests/test_bench.py`` checks the per-layer formulas
by hand, and the count against XLA's own (``cost_analysis``) for the mlp.
"""

from __future__ import annotations

import torch
from torch import nn

from compare.registry import ModelSpec, get


def linear_forward_flops(batch: int, n_in: int, n_out: int) -> int:
    """2 * N * in * out (the bias adds are O(N * out) and not counted)."""
    return 2 * batch * n_in * n_out


def conv_forward_flops(
    batch: int, c_in: int, c_out: int, kernel: tuple[int, int], out_hw: tuple[int, int], groups: int = 1
) -> int:
    """2 * N * H_out * W_out * C_out * (C_in / groups) * kH * kW."""
    return 2 * batch * out_hw[0] * out_hw[1] * c_out * (c_in // groups) * kernel[0] * kernel[1]


def forward_flops_per_layer(spec: ModelSpec | str, batch: int) -> list[tuple[str, int]]:
    """(layer name, forward FLOPs) of every Linear and Conv, in execution order."""
    spec = get(spec)
    with torch.device("meta"):
        model = spec.build_torch()
        x = torch.empty((batch, *spec.input_shape))
    found, hooks = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):

            def count(m, inputs, output, name=name):
                rows = inputs[0].numel() // m.in_features
                found.append((name, linear_forward_flops(rows, m.in_features, m.out_features)))

            hooks.append(module.register_forward_hook(count))
        elif isinstance(module, nn.Conv2d):

            def count(m, inputs, output, name=name):
                n, _, h, w = output.shape
                found.append(
                    (name, conv_forward_flops(n, m.in_channels, m.out_channels, m.kernel_size, (h, w), m.groups))
                )

            hooks.append(module.register_forward_hook(count))
    try:
        model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return found


def train_step_flops(spec: ModelSpec | str, batch: int) -> int:
    """FLOPs of one training step (forward + backward, see the module docstring)."""
    layers = forward_flops_per_layer(spec, batch)
    return 3 * sum(f for _, f in layers) - layers[0][1]
