"""``compare.port`` on small networks of each torchvision family (``tests/port_nets.py``):
one call ports them to linen and to nnx, the generated module matches torch in eval mode
(float32 and float64) and, with the same dropout and stochastic-depth masks injected, in
one train step (outputs, gradients, running statistics, one SGD step); the registry's
models give the hand-written variables bit for bit.

CI budget (2 CPU cores): one jit per network, API, dtype and mode. An eval check takes
about 1 s (48 of them: every family, API and dtype); a train step 3-15 s, most of it XLA
compiling the backward pass, so train mode runs every family on linen in float32, three
on nnx (stochastic depth, functional dropout at the top level, a layer scale) and two in
float64: 17 train steps. The whole file measured 4.5 min on 2 cores shared with two other
test runs (load 6-7); expect about half on an idle 2-core runner.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from port_nets import FAMILIES
from torch import nn

import compare.port as port
from compare import registry, transfer
from compare.checks import ported as checks
from compare.checks.equivalence import randomize_batchnorm

APIS = ["linen", "nnx"]
TRAIN_NNX = ["efficientnet", "densenet", "convnext"]  # stochastic depth, functional dropout, layer scale
TRAIN_FLOAT64 = [("shufflenet_v2", "linen"), ("efficientnet", "nnx")]
TRAIN_CASES = [(n, "linen", "float32") for n in FAMILIES] + [(n, "nnx", "float32") for n in TRAIN_NNX]
TRAIN_CASES += [(n, api, "float64") for n, api in TRAIN_FLOAT64]


def _setup(name: str, dtype: str = "float32", batch: int = 8):
    torch.manual_seed(0)
    model, shape = FAMILIES[name]()
    x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
    randomize_batchnorm(model, torch.from_numpy(x), 0)  # statistics that a swap of mean and var would show
    if dtype == "float64":
        model, x = model.double(), x.astype(np.float64)
    return model.eval(), x


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_family_ports_in_one_call_and_matches_torch_in_eval_mode(name, api, dtype):
    model, x = _setup(name, dtype)
    record = checks.check_eval(port.port(model, x, api), x, name=name)
    # float32 (eval.port: rtol 1e-5, atol 1e-4): measured <= 5.7e-6 abs; float64 (eval.float64): <= 1e-14 relative
    assert record["ok"], record


@pytest.mark.parametrize(("name", "api", "dtype"), TRAIN_CASES, ids=lambda v: str(v))
def test_each_family_matches_torch_in_a_train_step_with_the_same_masks(name, api, dtype):
    model, x = _setup(name, dtype)
    ported = port.port(model, x, api)
    result = checks.check_train(ported, x)
    assert result["ok"], {k: v for k, v in result.items() if k != "grad_rel_diff"}
    assert result["trace_diff"] == 0.0  # the fx trace is the torch code that ran, bit for bit
    # the table's bounds hold everywhere except on gradients that are exactly 0 (a conv bias
    # before BatchNorm): rounding noise on both sides, judged against torch's own there
    zero = {"vgg_bn": {"features.0.bias", "features.4.bias"}, "conv1d": {"conv1.bias"}}.get(name, set())
    assert set(result["by_float64_reference"]) <= zero, result["by_float64_reference"]
    if name in ("efficientnet", "convnext", "densenet", "vgg_bn"):
        assert ported.sites, "the random layers are mask sites"


@pytest.mark.parametrize("api", APIS)
def test_the_eval_check_fails_on_a_wrong_port(api):
    model, x = _setup("mobilenet_v2")
    ported = port.port(model, x, api)
    flat = ported.flat()
    key = "batch_stats/features/2/conv/1/1/mean"  # one running mean shifted: a porting bug
    flat[key] = flat[key] + 0.5
    if api == "linen":
        ported.variables = transfer.flat_to_linen(flat)
    else:
        transfer.flat_into_nnx(ported.model, flat)
    record = checks.check_eval(ported, x, name="mobilenet_v2")
    assert not record["ok"] and record["vs_float64_rel"] > 100 * record["torch_own_rel"]


def test_the_random_layers_are_found_in_module_and_functional_form():
    model, x = _setup("densenet")
    ported = port.port(model, x, "linen")
    assert [s.kind for s in ported.sites] == ["dropout"] * 4  # F.dropout in each dense layer
    model, x = _setup("efficientnet")
    sites = port.port(model, x, "nnx").sites
    assert {s.kind for s in sites} == {"dropout", "stochastic_depth"}
    assert next(s for s in sites if s.kind == "stochastic_depth").mask_shape == (8, 1, 1, 1)  # row mode


@pytest.mark.parametrize("name", ["resnet_basic", "resnet_bottleneck", "mobilenet_v2", "efficientnet", "convnext"])
def test_a_generated_network_does_not_transpose_activations(name):
    """Channels last throughout: no transpose of an activation; ConvNeXt's layer scale, a
    (C, 1, 1) parameter, is the one thing moved to (1, 1, 1, C) where it multiplies."""
    model, x = _setup(name)
    generated = port.port(model, x, "linen").generated
    assert generated.conversions == 0
    moved = [line for line in generated.source.splitlines() if "jnp.transpose(" in line]
    assert all("layer_scale" in line for line in moved), moved


def test_a_channel_shuffle_moves_only_the_two_channel_axes():
    model, x = _setup("shufflenet_v2")
    source = port.port(model, x, "linen").source
    shuffles = [line for line in source.splitlines() if "jnp.transpose(" in line]
    assert len(shuffles) == 2 and all("(0, 1, 2, 4, 3)" in line for line in shuffles), shuffles


@pytest.mark.parametrize("api", APIS)
def test_other_input_sizes_work_where_torch_works_and_are_refused_where_it_does_not(api):
    model, x = _setup("resnet_basic")
    ported = port.port(model, x, api)
    for shape in [(3, 3, 48, 40), (1, 3, 33, 37)]:
        y = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        with torch.no_grad():
            want = model(torch.from_numpy(y)).numpy()
        np.testing.assert_allclose(ported.run(y), want, rtol=1e-5, atol=1e-4)  # eval.port's bound
    with pytest.raises(port.PortError, match=r"torch refuses the input shape \(1, 3, 16, 16\).*at least 32x32"):
        ported.run(np.zeros((1, 3, 16, 16), np.float32))  # torchbn's ResNet checks its input
    model, x = _setup("conv1d")  # a Linear after a flatten: the length is fixed
    ported = port.port(model, x, api)
    with pytest.raises(port.PortError, match=r"torch refuses the input shape \(8, 4, 20\).*reduction dim"):
        ported.run(np.zeros((8, 4, 20), np.float32))


@pytest.mark.parametrize("api", APIS)
def test_train_mode_returns_the_output_and_updates_the_statistics_as_torch_does(api):
    model, x = _setup("mnasnet")  # BatchNorm momentum 3e-4
    ported = port.port(model, x, api)
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(x))
    model.eval()
    _, stats = ported.run(x, train=True, rngs=0)
    bn = stats["layers"]["1"]
    np.testing.assert_allclose(bn["mean"], model.layers[1].running_mean.numpy(), rtol=1e-6, atol=1e-6)  # train.stats
    np.testing.assert_allclose(bn["var"], model.layers[1].running_var.numpy(), rtol=1e-6, atol=1e-6)
    assert int(bn["num_batches_tracked"]) == int(model.layers[1].num_batches_tracked)
    assert ported.flat()["batch_stats/layers/1/num_batches_tracked"] == int(model.layers[1].num_batches_tracked)


@pytest.mark.parametrize("api", APIS)
def test_dropout_draws_from_the_dropout_stream_in_training_and_is_the_identity_in_eval(api):
    model, x = _setup("vgg_bn")
    ported = port.port(model, x, api)
    a, b, c = (ported.run(x, train=True, rngs=k)[0] for k in (1, 1, 2))
    np.testing.assert_array_equal(a, b) if api == "linen" else None  # a key is a key (nnx: reseeded streams)
    assert not np.allclose(a, c)
    np.testing.assert_array_equal(ported.run(x), ported.run(x))


@pytest.mark.parametrize("api", APIS)
def test_trained_flax_weights_go_back_into_the_torch_model(api):
    model, x = _setup("convnext")
    ported = port.port(model, x, api)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in ported.state_dict().items():  # the round trip is bit-exact
        assert torch.equal(v, before[k]), k
    flat = {k: v * 2 if k.startswith("params/") else v for k, v in ported.flat().items()}
    if api == "linen":
        ported.variables = transfer.flat_to_linen(flat)
    else:
        transfer.flat_into_nnx(ported.model, flat)
    ported.to_torch()
    assert torch.equal(model.features[1][0].layer_scale, before["features.1.0.layer_scale"] * 2)
    assert torch.equal(model.classifier[2].weight, before["classifier.2.weight"] * 2)


REGISTRY = [("mlp", (784,)), ("cnn", (1, 28, 28)), ("resnet18", (3, 64, 64)), ("resnet18_cifar", (3, 32, 32))]
REGISTRY += [("resnet50", (3, 64, 64))]


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize(("name", "shape"), REGISTRY)
def test_the_registry_models_port_to_the_hand_written_variables_bit_for_bit(name, shape, api):
    spec = registry.get(name)
    torch.manual_seed(0)
    model = spec.build_torch().eval()
    x = np.random.default_rng(0).standard_normal((2, *shape)).astype(np.float32)
    ported = port.port(model, x, api)
    hand = transfer.torch_to_flat(model.state_dict(), spec)  # the hand-written twins hold exactly this
    got = ported.flat()
    assert sorted(got) == sorted(hand)
    for k, v in hand.items():
        assert got[k].dtype == v.dtype and np.array_equal(got[k], v), k
    # the same map: the port's moves are the transfer's plan for this model
    assert [(m.torch_key, m.flax_key) for m in ported.moves] == [(m.torch_key, m.flax_key) for m in transfer.plan(spec)]


def test_a_network_outside_the_supported_set_is_refused_with_every_node_listed():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.up = nn.Upsample(scale_factor=2)

        def forward(self, x):
            y = self.up(self.conv(x))  # noqa: F841 (unused, but traced: fx keeps it)
            c = self.conv(x)
            return torch.sort(c, dim=1)[0][:, :2] + c[:, 2:].unsqueeze(2).mean(2)

    with pytest.raises(port.PortError) as e:
        port.port(Odd(), np.zeros((1, 3, 8, 8), np.float32))
    message = str(e.value)
    assert "module Upsample at 'up'" in message
    assert "function torch.sort" in message
    assert "indexing or slicing a tensor" in message and "method Tensor.unsqueeze" in message
    assert "test_port_families.py:" in message and "y = self.up(self.conv(x))" in message  # the user's line
    # Upsample, sort, two slices, unsqueeze; what only depends on them (getitem, mean, add) is not listed
    assert message.startswith("Odd: 5 node(s) cannot be ported")
    assert "Supported modules: AdaptiveAvgPool1d" in message and "Supported tensor methods:" in message


def test_a_network_fx_cannot_trace_is_refused_with_fx_reason():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(port.PortError, match="torch.fx cannot trace Branchy in eval mode.*control flow"):
        port.port(Branchy(), np.zeros((1, 3), np.float32))


@pytest.mark.parametrize("api", APIS)
def test_a_network_that_traces_differently_in_each_mode_gets_one_forward_per_mode(api):
    class Aux(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head, self.aux = nn.Conv2d(3, 4, 3), nn.Linear(4, 2), nn.Linear(4, 3)

        def forward(self, x):
            h = self.body(x).mean((2, 3))
            return (self.head(h), self.aux(h)) if self.training else self.head(h)

    torch.manual_seed(0)
    model, x = Aux().eval(), np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    ported = port.port(model, x, api)
    assert ported.generated.split and "def forward_train" in ported.source
    with torch.no_grad():
        np.testing.assert_allclose(ported.run(x), model(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)
        out, _ = ported.run(x, train=True)
        model.train()
        want = model(torch.from_numpy(x))
    assert [o.shape for o in out] == [(2, 2), (2, 3)]
    np.testing.assert_allclose(out[1], want[1].numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("api", APIS)
def test_torch_names_that_are_flax_attributes_get_an_underscore_on_the_flax_side(api):
    inner = nn.Sequential()
    for name in ("layers", "entries", "name", "setup"):  # torchvision's MNASNet has "layers"; a Tree's field; linen's
        inner.add_module(name, nn.Linear(3, 3))
    model = nn.Sequential()
    model.add_module("keys", inner)  # an nnx.Dict method
    model.add_module("params", nn.Linear(3, 2))
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    ported = port.port(model.eval(), x, api)
    flat = ported.flat()
    assert {"params/keys_/layers/kernel", "params/keys_/entries_/kernel", "params/keys_/name_/kernel"} <= set(flat)
    assert "params/keys_/setup_/kernel" in flat and "params/params_/kernel" in flat  # linen refuses params/params
    with torch.no_grad():
        np.testing.assert_allclose(ported.run(x), model(torch.from_numpy(x)).numpy(), rtol=1e-6, atol=1e-6)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ported.state_dict().items())


def test_the_train_check_fails_on_a_wrong_port():
    """ReLU where torch has ReLU6 (issue 21's example of a wrong twin): the outputs and
    gradients differ far beyond torch's own float32 error."""
    model, x = _setup("mobilenet_v2")
    ported = port.port(model, x, "linen")
    ported.cls = port.load_source(
        ported.source.replace("jax.nn.relu6(", "jax.nn.relu("), ported.generated.class_name, "wrong"
    )
    ported.module = ported.cls()
    result = checks.check_train(ported, x * 4)
    assert not result["ok"] and not result["checks"]["out"] and not result["checks"]["grads"]
