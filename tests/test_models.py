"""The same three architectures on torch, linen and nnx: names, shapes, configuration."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest
import torch
from flax import nnx

import bnconfig
import flaxbn.config as fcfg
import torchbn.config as tcfg
from compare import conventions, registry, transfer

# torchvision.models.resnet18().state_dict() keys, in order (torchvision 0.29).
TORCHVISION_RESNET18_KEYS = [
    "conv1.weight",
    "bn1.weight",
    "bn1.bias",
    "bn1.running_mean",
    "bn1.running_var",
    "bn1.num_batches_tracked",
    "layer1.0.conv1.weight",
    "layer1.0.bn1.weight",
    "layer1.0.bn1.bias",
    "layer1.0.bn1.running_mean",
    "layer1.0.bn1.running_var",
    "layer1.0.bn1.num_batches_tracked",
    "layer1.0.conv2.weight",
    "layer1.0.bn2.weight",
    "layer1.0.bn2.bias",
    "layer1.0.bn2.running_mean",
    "layer1.0.bn2.running_var",
    "layer1.0.bn2.num_batches_tracked",
    "layer1.1.conv1.weight",
    "layer1.1.bn1.weight",
    "layer1.1.bn1.bias",
    "layer1.1.bn1.running_mean",
    "layer1.1.bn1.running_var",
    "layer1.1.bn1.num_batches_tracked",
    "layer1.1.conv2.weight",
    "layer1.1.bn2.weight",
    "layer1.1.bn2.bias",
    "layer1.1.bn2.running_mean",
    "layer1.1.bn2.running_var",
    "layer1.1.bn2.num_batches_tracked",
    "layer2.0.conv1.weight",
    "layer2.0.bn1.weight",
    "layer2.0.bn1.bias",
    "layer2.0.bn1.running_mean",
    "layer2.0.bn1.running_var",
    "layer2.0.bn1.num_batches_tracked",
    "layer2.0.conv2.weight",
    "layer2.0.bn2.weight",
    "layer2.0.bn2.bias",
    "layer2.0.bn2.running_mean",
    "layer2.0.bn2.running_var",
    "layer2.0.bn2.num_batches_tracked",
    "layer2.0.downsample.0.weight",
    "layer2.0.downsample.1.weight",
    "layer2.0.downsample.1.bias",
    "layer2.0.downsample.1.running_mean",
    "layer2.0.downsample.1.running_var",
    "layer2.0.downsample.1.num_batches_tracked",
    "layer2.1.conv1.weight",
    "layer2.1.bn1.weight",
    "layer2.1.bn1.bias",
    "layer2.1.bn1.running_mean",
    "layer2.1.bn1.running_var",
    "layer2.1.bn1.num_batches_tracked",
    "layer2.1.conv2.weight",
    "layer2.1.bn2.weight",
    "layer2.1.bn2.bias",
    "layer2.1.bn2.running_mean",
    "layer2.1.bn2.running_var",
    "layer2.1.bn2.num_batches_tracked",
    "layer3.0.conv1.weight",
    "layer3.0.bn1.weight",
    "layer3.0.bn1.bias",
    "layer3.0.bn1.running_mean",
    "layer3.0.bn1.running_var",
    "layer3.0.bn1.num_batches_tracked",
    "layer3.0.conv2.weight",
    "layer3.0.bn2.weight",
    "layer3.0.bn2.bias",
    "layer3.0.bn2.running_mean",
    "layer3.0.bn2.running_var",
    "layer3.0.bn2.num_batches_tracked",
    "layer3.0.downsample.0.weight",
    "layer3.0.downsample.1.weight",
    "layer3.0.downsample.1.bias",
    "layer3.0.downsample.1.running_mean",
    "layer3.0.downsample.1.running_var",
    "layer3.0.downsample.1.num_batches_tracked",
    "layer3.1.conv1.weight",
    "layer3.1.bn1.weight",
    "layer3.1.bn1.bias",
    "layer3.1.bn1.running_mean",
    "layer3.1.bn1.running_var",
    "layer3.1.bn1.num_batches_tracked",
    "layer3.1.conv2.weight",
    "layer3.1.bn2.weight",
    "layer3.1.bn2.bias",
    "layer3.1.bn2.running_mean",
    "layer3.1.bn2.running_var",
    "layer3.1.bn2.num_batches_tracked",
    "layer4.0.conv1.weight",
    "layer4.0.bn1.weight",
    "layer4.0.bn1.bias",
    "layer4.0.bn1.running_mean",
    "layer4.0.bn1.running_var",
    "layer4.0.bn1.num_batches_tracked",
    "layer4.0.conv2.weight",
    "layer4.0.bn2.weight",
    "layer4.0.bn2.bias",
    "layer4.0.bn2.running_mean",
    "layer4.0.bn2.running_var",
    "layer4.0.bn2.num_batches_tracked",
    "layer4.0.downsample.0.weight",
    "layer4.0.downsample.1.weight",
    "layer4.0.downsample.1.bias",
    "layer4.0.downsample.1.running_mean",
    "layer4.0.downsample.1.running_var",
    "layer4.0.downsample.1.num_batches_tracked",
    "layer4.1.conv1.weight",
    "layer4.1.bn1.weight",
    "layer4.1.bn1.bias",
    "layer4.1.bn1.running_mean",
    "layer4.1.bn1.running_var",
    "layer4.1.bn1.num_batches_tracked",
    "layer4.1.conv2.weight",
    "layer4.1.bn2.weight",
    "layer4.1.bn2.bias",
    "layer4.1.bn2.running_mean",
    "layer4.1.bn2.running_var",
    "layer4.1.bn2.num_batches_tracked",
    "fc.weight",
    "fc.bias",
]


def test_resnet18_state_dict_keys_equal_torchvision():
    keys = list(registry.get("resnet18").build_torch().state_dict())
    assert keys == TORCHVISION_RESNET18_KEYS


def test_resnet18_loads_a_torchvision_shaped_state_dict_with_strict_true():
    """Shapes as in torchvision's checkpoint: stem 7x7/2 conv, 1000-way fc."""
    model = registry.get("resnet18").build_torch()
    sd = model.state_dict()
    assert tuple(sd["conv1.weight"].shape) == (64, 3, 7, 7)
    assert tuple(sd["layer2.0.downsample.0.weight"].shape) == (128, 64, 1, 1)
    assert tuple(sd["fc.weight"].shape) == (1000, 512)
    result = model.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_layer_names_are_the_same_in_torch_linen_and_nnx(spec):
    """Every torch tensor has a Flax key made of the same module path, and linen and nnx
    flatten to exactly those keys."""
    planned = {m.flax_key for m in transfer.plan(spec)}
    assert set(transfer.flax_template(spec)) == planned
    assert set(transfer.nnx_to_flat(spec.build_nnx(nnx.Rngs(0)))) == planned
    for move in transfer.plan(spec):
        module_path = move.torch_key.rsplit(".", 1)[0].replace(".", "/")
        assert move.flax_key.split("/", 1)[1].rsplit("/", 1)[0] == module_path


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet18_cifar"])
def test_all_three_apis_map_a_batch_to_logits_of_the_same_shape(name):
    spec = registry.get(name)
    x = torch.zeros((2, *spec.input_shape))
    model = spec.build_torch().eval()
    assert tuple(model(x).shape) == (2, spec.config.num_classes)
    xf = jnp.zeros((2, *spec.flax_input_shape))
    linen = spec.build_linen()
    variables = linen.init(jax.random.key(0), xf, train=False)
    assert linen.apply(variables, xf, train=False).shape == (2, spec.config.num_classes)
    nnx_model = spec.build_nnx(nnx.Rngs(0))
    nnx_model.eval()
    assert nnx_model(xf).shape == (2, spec.config.num_classes)


def test_registry_names_an_unknown_model_and_lists_the_known_ones():
    with pytest.raises(KeyError, match=r"unknown model 'resnet99'; known models: mlp, cnn, resnet18"):
        registry.get("resnet99")


@pytest.mark.parametrize("module", [tcfg, fcfg], ids=["torch", "flax"])
def test_config_lists_every_invalid_field_at_once_with_the_valid_range(module):
    with pytest.raises(ValueError) as info:
        module.MLPConfig(hidden=(-1,), dropout=1.5, bn_momentum=2.0, bn_eps=0.0)
    message = str(info.value)
    for fragment in [
        "hidden must hold ints >= 1",
        "dropout must be in [0, 1], got 1.5",
        "bn_momentum must be in [0, 1]",
        "bn_eps must be > 0",
    ]:
        assert fragment in message


def test_cnn_config_rejects_an_image_size_the_pools_cannot_halve():
    with pytest.raises(ValueError, match=r"image_size must be divisible by 2\*\*len\(channels\) = 4, got 30"):
        tcfg.CNNConfig(image_size=30, channels=(8, 16))


def test_flax_config_is_the_torch_config_with_momentum_reversed():
    """torch momentum 0.1 (weight of the new batch) == Flax momentum 0.9 (weight of the old value)."""
    cfg = conventions.flax_config(tcfg.ResNetConfig(bn_momentum=0.1, dropout=0.2))
    assert cfg == fcfg.ResNetConfig(bn_momentum=0.9, dropout=0.2)
    assert conventions.torch_config(cfg) == tcfg.ResNetConfig(bn_momentum=0.1, dropout=0.2)


@pytest.mark.parametrize("kind", sorted(bnconfig.KINDS))
def test_every_flax_configuration_is_the_shared_one_plus_the_flax_settings_only(kind):
    """One definition of each architecture's fields and checks (``bnconfig``): the torch
    configs are those classes, the Flax ones derived from them, so they cannot drift (0.2
    kept two copies, and ``zero_init_residual`` was accepted by Flax and never read)."""
    shared = bnconfig.KINDS[kind]
    assert tcfg.KINDS[kind] is shared and issubclass(fcfg.KINDS[kind], shared)
    flax_fields = {f.name for f in dataclasses.fields(fcfg.KINDS[kind])}
    assert flax_fields - {f.name for f in dataclasses.fields(shared)} == {
        "bn_semantics",
        "compute_dtype",
        "bn_axis_name",
        "bn_variance",
    }
    assert fcfg.KINDS[kind]().bn_momentum == 0.9 and shared().bn_momentum == 0.1  # each side's direction


def test_a_new_kind_gets_its_flax_twin_without_flax_code():
    @dataclasses.dataclass(frozen=True)
    class TinyConfig(bnconfig.MLPConfig):
        """A kind the library does not know."""

    twin = fcfg.twin(TinyConfig)
    assert twin(hidden=(3,)).bn_momentum == 0.9 and twin(hidden=(3,), compute_dtype="bfloat16").hidden == (3,)
    with pytest.raises(ValueError, match="compute_dtype must be 'float32' or 'bfloat16'"):
        twin(compute_dtype="float16")


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_zero_init_residual_zeroes_each_blocks_last_batchnorm_scale_on_every_side(block):
    """torchvision's option: each residual block starts as the identity. Honoured by torch,
    linen (the scale's initialiser) and nnx (set after building, as torch does)."""
    spec = registry.get("resnet18_cifar").replace(width=4, layers=(1, 1), block=block, zero_init_residual=True)
    last = "bn3" if block == "bottleneck" else "bn2"
    torch_model = spec.build_torch()
    variables = spec.build_linen().init(jax.random.key(0), jnp.zeros((2, 8, 8, 3)), train=False)
    nnx_model = spec.build_nnx(nnx.Rngs(0))
    for stage in ("layer1", "layer2"):
        assert float(getattr(torch_model, stage)[0].get_submodule(last).weight.detach().abs().sum()) == 0
        assert float(jnp.abs(variables["params"][stage]["0"][last]["scale"]).sum()) == 0
        assert float(jnp.abs(getattr(getattr(nnx_model, stage)[0], last).scale[...]).sum()) == 0
        assert float(jnp.abs(variables["params"][stage]["0"]["bn1"]["scale"]).sum()) > 0  # only the last one


def test_torch_momentum_none_has_no_stock_flax_equivalent_and_says_so():
    with pytest.raises(ValueError, match="cumulative moving average"):
        conventions.flax_config(tcfg.MLPConfig(bn_momentum=None))


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_bfloat16_compute_keeps_float32_parameters_and_batchnorm_statistics(api):
    spec = registry.get("cnn").replace(in_channels=1, image_size=8, channels=(4, 8), hidden=16)
    x = jnp.ones((4, 8, 8, 1))
    if api == "linen":
        model = spec.build_linen(compute_dtype="bfloat16")
        variables = model.init(jax.random.key(0), x, train=False)
        logits, updates = model.apply(
            variables, x, train=True, rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"]
        )
        stats, params = updates["batch_stats"], variables["params"]
    else:
        model = spec.build_nnx(nnx.Rngs(0), compute_dtype="bfloat16")
        logits = model(x)
        stats, params = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)), nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert logits.dtype == jnp.bfloat16
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype("float32")}
    float_stats = [leaf for leaf in jax.tree_util.tree_leaves(stats) if leaf.dtype != jnp.int32]
    assert {leaf.dtype for leaf in float_stats} == {jnp.dtype("float32")}
