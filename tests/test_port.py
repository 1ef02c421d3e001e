"""Port your own model: ``transfer.custom`` takes any torch network built from supported
layers and its Flax twin (linen or nnx) with the same layer names, or a ``rename``; the
transfer is as strict as for the registry models and bit-exact both ways."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_flat_equal
from flax import linen as nn
from flax import nnx

import flaxbn
from compare import transfer
from compare.checks import equivalence, tolerances


class Net1d(torch.nn.Module):
    """Conv1d, a grouped Conv1d, BatchNorm1d over channels, and a head after a flatten."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv1d(4, 8, 3, padding=1)
        self.mix = torch.nn.Conv1d(8, 8, 3, padding=1, groups=2, bias=False)
        self.norm = torch.nn.BatchNorm1d(8)
        self.out = torch.nn.Linear(8 * 6, 5)

    def forward(self, x):  # (N, C, W)
        x = torch.relu(self.norm(self.mix(torch.relu(self.stem(x)))))
        return self.out(torch.flatten(x, 1))  # flattens (C, W)


class Flax1d(nn.Module):
    """The linen twin, NWC; ``norm`` is called ``bn`` here (the rename's job)."""

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.relu(nn.Conv(8, (3,), padding=((1, 1),), name="stem")(x))
        x = nn.Conv(8, (3,), padding=((1, 1),), feature_group_count=2, use_bias=False, name="mix")(x)
        x = nn.relu(flaxbn.LinenBatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="bn")(x))
        return nn.Dense(5, name="out")(x.reshape(len(x), -1))  # flattens (W, C)


def _randomized(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif t.is_floating_point():
                t.copy_(torch.randn_like(t))
    return model.eval()


def _port(model):
    # a (C, W) map is a (C, H=1, W) map: the same flatten permutation
    return transfer.custom(model, flatten={"out": (8, 1, 6)}, rename={"norm": "bn"}, name="net1d")


def test_a_custom_1d_network_with_grouped_convolutions_ports_to_linen_and_back_exactly():
    model = _randomized(Net1d())
    port = _port(model)
    variables = transfer.torch_to_linen(model.state_dict(), port)
    assert set(variables["batch_stats"]) == {"bn"}  # renamed
    assert variables["params"]["mix"]["kernel"].shape == (3, 4, 8)  # (W, I/groups, O)
    x = np.random.default_rng(0).standard_normal((3, 4, 6), dtype=np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    got = Flax1d().apply(variables, jnp.asarray(x.transpose(0, 2, 1)), train=False)  # (N, C, W) -> (N, W, C)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)  # float32 sums: measured 5e-7
    assert_flat_equal(transfer.linen_to_torch(variables, port), model.state_dict())


def test_an_nnx_twin_is_loaded_in_place_and_round_trips_exactly():
    class Twin(nnx.Module):
        def __init__(self, rngs):
            self.stem = nnx.Conv(4, 8, (3,), padding=((1, 1),), rngs=rngs)
            self.mix = nnx.Conv(8, 8, (3,), padding=((1, 1),), feature_group_count=2, use_bias=False, rngs=rngs)
            self.bn = flaxbn.NnxBatchNorm(8, momentum=0.9, epsilon=1e-5, rngs=rngs)
            self.out = nnx.Linear(48, 5, rngs=rngs)

    model = _randomized(Net1d())
    twin = transfer.torch_to_nnx(model.state_dict(), _port(model), model=Twin(nnx.Rngs(0)))
    np.testing.assert_array_equal(np.asarray(twin.bn.var[...]), model.norm.running_var.numpy())
    assert_flat_equal(transfer.nnx_to_torch(twin, _port(model)), model.state_dict())
    with pytest.raises(TypeError, match="custom network: pass its nnx twin as model="):
        transfer.torch_to_nnx(model.state_dict(), _port(model))


def test_a_custom_transfer_is_strict_and_lists_every_problem():
    model = _randomized(Net1d())
    sd = dict(model.state_dict())
    sd["stem.weight"] = torch.zeros(8, 4, 5)
    del sd["norm.running_mean"]
    with pytest.raises(transfer.TransferError, match="2 problem") as e:
        transfer.torch_to_linen(sd, _port(model))
    assert "shape mismatch at 'stem.weight'" in str(e.value) and "missing key 'norm.running_mean'" in str(e.value)


def test_a_layer_without_a_rule_is_named_with_its_path_and_type():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    with pytest.raises(
        NotImplementedError, match=r"no transfer rule for: 1.weight \(LayerNorm\), 1.bias \(LayerNorm\)"
    ):
        transfer.plan(transfer.custom(net))
    with pytest.raises(KeyError, match="no module 'head' in Sequential"):
        transfer.custom(net, flatten={"head": (1, 1, 4)})


class Net2d(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1, groups=2, bias=False)
        self.norm = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        return self.head(torch.flatten(torch.relu(self.norm(self.conv(x))), 1))


class Flax2d(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
        x = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=2, use_bias=False, name="conv")(x)
        x = nn.relu(flaxbn.LinenBatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="bn")(x))
        return nn.Dense(3, name="head")(x.reshape(len(x), -1))


def test_the_layerwise_report_names_the_first_layer_that_differs_in_a_custom_pair():
    """A correct port: every layer ok. Shift one running mean (a porting bug): the report
    names that layer (through the rename) and not the layer before it."""
    model = _randomized(Net2d())
    port = transfer.custom(model, flatten={"head": (4, 3, 3)}, rename={"norm": "bn"})
    variables = transfer.torch_to_linen(model.state_dict(), port)
    x = np.random.default_rng(1).standard_normal((3, 2, 3, 3), dtype=np.float32)
    tol = tolerances.get("eval.default")
    layers = equivalence.layerwise(port, "linen", model, variables, x, tol, linen_model=Flax2d())
    assert [d.layer for d in layers] == ["conv", "norm", "head"] and all(d.ok for d in layers)
    variables["batch_stats"]["bn"]["mean"] = variables["batch_stats"]["bn"]["mean"] + 1.0
    layers = equivalence.layerwise(port, "linen", model, variables, x, tol, linen_model=Flax2d())
    assert next(d.layer for d in layers if not d.ok) == "norm" and layers[0].ok
