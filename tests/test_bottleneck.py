"""torchvision's Bottleneck ResNets (resnet50/101/152, wide_resnet50_2/101_2,
resnext50_32x4d/101_32x8d) in torch, linen and nnx: torchvision's state_dict keys and
parameter counts at full size (meta device, ``jax.eval_shape``: nothing is allocated), and
the numerics on width- and depth-reduced variants, which run the same code paths (grouped
3x3 convolutions, the stride on the 3x3, 1x1 shortcuts)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_flat_equal, random_state_dict
from flax import nnx

from compare import convert, registry, transfer
from compare.checks import equivalence, tolerances, train_equivalence
from compare.io import checkpoint

# torchvision's published parameter counts (the models' documentation) and state_dict sizes
FAMILY = {
    "resnet50": (25_557_032, 320, (64, 64, 3, 3)),
    "resnet101": (44_549_160, 626, (64, 64, 3, 3)),
    "resnet152": (60_192_808, 932, (64, 64, 3, 3)),
    "wide_resnet50_2": (68_883_240, 320, (128, 128, 3, 3)),
    "wide_resnet101_2": (126_886_696, 626, (128, 128, 3, 3)),
    "resnext50_32x4d": (25_028_904, 320, (128, 4, 3, 3)),
    "resnext101_32x8d": (88_791_336, 626, (256, 8, 3, 3)),
}
# resnet50's keys in torchvision's order, pinned in part: the stem, the first block with its
# downsample, the last block, the head (all 320 are checked by count and by pattern below)
RESNET50_KEYS = [
    "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked",
    "layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.0.bn1.bias", "layer1.0.bn1.running_mean",
    "layer1.0.bn1.running_var", "layer1.0.bn1.num_batches_tracked", "layer1.0.conv2.weight", "layer1.0.bn2.weight",
    "layer1.0.bn2.bias", "layer1.0.bn2.running_mean", "layer1.0.bn2.running_var", "layer1.0.bn2.num_batches_tracked",
    "layer1.0.conv3.weight", "layer1.0.bn3.weight", "layer1.0.bn3.bias", "layer1.0.bn3.running_mean",
    "layer1.0.bn3.running_var", "layer1.0.bn3.num_batches_tracked", "layer1.0.downsample.0.weight",
    "layer1.0.downsample.1.weight", "layer1.0.downsample.1.bias", "layer1.0.downsample.1.running_mean",
    "layer1.0.downsample.1.running_var", "layer1.0.downsample.1.num_batches_tracked",
]  # fmt: skip
RESNET50_LAST = [
    "layer4.2.bn3.running_var", "layer4.2.bn3.num_batches_tracked", "fc.weight", "fc.bias",
]  # fmt: skip
REDUCED = {  # the same blocks at width 16, one or two blocks per stage, 32 x 32 images
    "resnet50": dict(width=16, layers=(2, 1, 1, 1), num_classes=10),
    "wide_resnet50_2": dict(width=16, layers=(1, 1, 1, 1), num_classes=10),
    "resnext50_32x4d": dict(width=16, layers=(1, 2, 1, 1), num_classes=10, groups=4, width_per_group=4),
}


def _reduced(name: str) -> registry.ModelSpec:
    spec = registry.get(name).replace(**REDUCED[name])
    return registry.ModelSpec(spec.name, spec.config, (3, 32, 32))


@pytest.mark.parametrize("name", FAMILY)
def test_full_size_keys_parameter_counts_and_shapes_equal_torchvision(name):
    params, n_keys, conv2 = FAMILY[name]
    spec = registry.get(name)
    with torch.device("meta"):
        sd = spec.build_torch().state_dict()
    assert len(sd) == n_keys
    assert sum(v.numel() for k, v in sd.items() if not k.endswith(("running_mean", "running_var", "tracked"))) == params
    assert tuple(sd["layer1.0.conv2.weight"].shape) == conv2 and tuple(sd["fc.weight"].shape) == (1000, 2048)
    # the Flax side has the same tensors, by the weight map, without allocating anything
    template = transfer.flax_template(spec)
    assert len(template) == n_keys and {m.flax_key for m in transfer.plan(spec)} == set(template)


def test_resnet50_keys_are_torchvisions_in_order():
    with torch.device("meta"):
        keys = list(registry.get("resnet50").build_torch().state_dict())
    assert keys[: len(RESNET50_KEYS)] == RESNET50_KEYS and keys[-len(RESNET50_LAST) :] == RESNET50_LAST
    blocks = {k.split(".")[0] + "." + k.split(".")[1] for k in keys if k.startswith("layer")}
    assert len(blocks) == 3 + 4 + 6 + 3


@pytest.mark.parametrize("api", ["linen", "nnx"])
@pytest.mark.parametrize("name", REDUCED)
def test_reduced_bottleneck_networks_match_torch_in_eval_mode(name, api):
    """Tolerance eval.default: atol 1e-4 + rtol 1e-5 * max|logits| (measured <= 2e-6)."""
    record = equivalence.check_eval(_reduced(name), api, seed=1)
    assert record["ok"], record


@pytest.mark.parametrize("name", REDUCED)
def test_reduced_bottleneck_round_trips_are_bit_exact_in_every_direction(name):
    spec = _reduced(name)
    sd = random_state_dict(spec)
    variables = transfer.torch_to_linen(sd, spec)
    assert_flat_equal(transfer.linen_to_torch(variables, spec), sd)
    model = transfer.torch_to_nnx(sd, spec, spec.build_nnx(nnx.Rngs(0)))
    assert_flat_equal(transfer.nnx_to_torch(model, spec), sd)
    assert_flat_equal(transfer.linen_to_flat(transfer.nnx_to_linen(model, spec)), transfer.linen_to_flat(variables))


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_a_reduced_resnext_trains_like_torch_with_injected_masks(api):
    """Grouped convolutions in training: logits, gradients and statistics of one step.
    The deep network's own entries of the tolerance table (BatchNorm over 8 values at the
    last stage amplifies rounding: logits 1.25e-5 abs on an AVX-512 Xeon)."""
    spec = _reduced("resnext50_32x4d").replace(dropout=0.3)
    step = train_equivalence.one_step(spec, api, batch=8)
    assert tolerances.get("train.logits_deep").holds(step["logits_max_abs_diff"], step["logits_scale"]), step
    assert tolerances.get("train.grads_deep").holds(step["grad_max_rel_diff"], 1.0), step["grad_rel_diff"]
    assert tolerances.get("train.stats_deep").holds(step["stats_max_abs_diff"], step["stats_scale"])


def test_zero_init_residual_zeroes_the_last_batchnorm_of_every_bottleneck():
    spec = _reduced("resnet50").replace(zero_init_residual=True)
    model = spec.build_torch()
    blocks = [m for m in model.modules() if m.__class__.__name__ == "Bottleneck"]
    assert blocks and all(float(b.bn3.weight.abs().sum()) == 0 for b in blocks)
    assert all(float(b.bn2.weight.abs().sum()) > 0 for b in blocks)


def test_a_full_size_resnet50_file_converts_to_flax_and_back_exactly(tmp_path):
    """The command a user runs on a real torchvision file, on a random one of its shape."""
    spec = registry.get("resnet50")
    sd = random_state_dict(spec)
    checkpoint.write_torch_state_dict(sd, tmp_path / "resnet50.pth")
    assert (
        convert.main([str(tmp_path / "resnet50.pth"), str(tmp_path / "flax.safetensors"), "--model", "resnet50"]) == 0
    )
    assert convert.main([str(tmp_path / "flax.safetensors"), str(tmp_path / "back.safetensors")]) == 0
    assert_flat_equal(checkpoint.read_torch_state_dict(tmp_path / "back.safetensors"), sd)
    flat, read_spec = checkpoint.read_flax(tmp_path / "flax.safetensors")
    assert read_spec == spec and flat["params/layer4/2/conv3/kernel"].shape == (1, 1, 512, 2048)
