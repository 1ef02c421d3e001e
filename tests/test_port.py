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
from compare.checks import equivalence


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


def test_layers_without_a_rule_are_listed_by_custom_itself_with_path_type_and_the_supported_set():
    """Before anything is built or transferred: every such layer at once (0.2 found them
    only at transfer time, one call later). Still a NotImplementedError, as in 0.2."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Embedding(5, 4), torch.nn.PReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(transfer.CustomPortError, match="2 problem") as e:
        transfer.custom(net)
    message = str(e.value)
    assert "'1' (Embedding, tensors weight): no transfer rule" in message
    assert "'2' (PReLU, tensors weight): no transfer rule" in message
    assert "supported: Linear, Conv2d, Conv1d" in message and isinstance(e.value, NotImplementedError)
    with pytest.raises(transfer.CustomPortError, match="no module 'head' in Sequential") as e:
        transfer.custom(torch.nn.Sequential(torch.nn.Linear(3, 4)), flatten={"head": (1, 1, 4)})
    assert isinstance(e.value, KeyError) and isinstance(e.value, transfer.TransferError)


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
    layers = equivalence.layerwise(port, "linen", model, variables, x, linen_model=Flax2d())
    assert [d.layer for d in layers] == ["conv", "norm", "head"] and all(d.ok for d in layers)
    variables["batch_stats"]["bn"]["mean"] = variables["batch_stats"]["bn"]["mean"] + 1.0
    layers = equivalence.layerwise(port, "linen", model, variables, x, linen_model=Flax2d())
    assert next(d.layer for d in layers if not d.ok) == "norm" and layers[0].ok


# --- mistakes of the hand-written path: each one error that names the layer -----------------


class Vgg(torch.nn.Module):
    """A VGG-style head: a flatten of a (C, H, W) map through ReLU and Dropout to a Linear."""

    def __init__(self, pool: bool = False):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4))
        self.pool = torch.nn.AdaptiveAvgPool2d(1) if pool else torch.nn.Identity()
        self.classifier = torch.nn.Sequential(
            torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(4 * (1 if pool else 9), 2)
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def test_a_linear_after_a_flatten_with_no_flatten_entry_is_an_error_naming_the_layer_and_the_source_line():
    """Left out, the transfer gave a VGG logits 0.155 off without a word: now it is found by
    tracing, and the message gives both ways to declare it, with the traced shape."""
    with pytest.raises(transfer.TransferError, match="1 problem") as e:
        transfer.custom(Vgg())
    assert "'classifier.2' (Linear) reads torch.flatten at test_port.py:" in str(e.value)
    assert "(C = 4 from 'features.1')" in str(e.value)
    x = np.zeros((1, 3, 3, 3), np.float32)
    with pytest.raises(
        transfer.TransferError,
        match=r"of a \(C, H, W\) = \(4, 3, 3\) map: pass flatten=\{'classifier.2': \(4, 3, 3\)\}",
    ):
        transfer.custom(Vgg(), example_input=x)
    assert transfer.custom(Vgg(), flatten={"classifier.2": (4, 3, 3)}, example_input=x).flatten == {
        "classifier.2": (4, 3, 3)
    }


def test_a_wrong_flatten_shape_is_named_with_the_shape_traced_or_the_size_it_must_have():
    """0.2 failed inside numpy (``cannot reshape array of size ... into shape ...``) with no
    layer named, or silently permuted by the wrong shape when the size happened to fit."""
    x = np.zeros((1, 3, 3, 3), np.float32)
    with pytest.raises(
        transfer.TransferError,
        match=r"flatten\['classifier.2'\] = \(4, 1, 9\), but 'classifier.2' reads torch.flatten .* of a \(4, 3, 3\) map",
    ):
        transfer.custom(Vgg(), flatten={"classifier.2": (4, 1, 9)}, example_input=x)
    with pytest.raises(transfer.TransferError, match=r"C\*H\*W = 32, but 'classifier.2' has in_features = 36"):
        transfer.custom(Vgg(), flatten={"classifier.2": (4, 2, 4)})
    with pytest.raises(transfer.TransferError, match=r"the map it reads has 4 channels \(from 'features.1'\)"):
        transfer.custom(Vgg(), flatten={"classifier.2": (9, 2, 2)})
    with pytest.raises(transfer.TransferError, match=r"'features.0' is a Conv2d, not a Linear"):
        transfer.custom(Vgg(), flatten={"classifier.2": (4, 3, 3), "features.0": (1, 1, 1)})


def test_a_linear_after_global_pooling_needs_no_entry_and_none_declares_a_twin_that_flattens_like_torch():
    assert transfer.custom(Vgg(pool=True)).flatten == {}
    port = transfer.custom(Vgg(), flatten={"classifier.2": None})
    assert (
        next(m.to_flax for m in transfer.plan(port) if m.torch_key == "classifier.2.weight").__name__
        == "linear_to_dense"
    )
    with pytest.raises(transfer.TransferError, match=r"flatten\['features.0'\]"):
        transfer.custom(Vgg(pool=True), flatten={"classifier.2": None, "features.0": None})


def test_a_network_fx_cannot_trace_is_warned_about_and_its_flatten_is_checked_for_size_only():
    class Dynamic(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                x = -x
            return self.fc(x.flatten(1))

    with pytest.warns(UserWarning, match="torch.fx could not trace Dynamic"):
        transfer.custom(Dynamic(), flatten={"fc": (1, 2, 2)})


class NnxStockTwin(nnx.Module):
    def __init__(self, rngs):
        self.stem = nnx.Conv(4, 8, (3,), padding=((1, 1),), rngs=rngs)
        self.mix = nnx.Conv(8, 8, (3,), padding=((1, 1),), feature_group_count=2, use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(8, momentum=0.9, epsilon=1e-5, rngs=rngs)  # stock: no num_batches_tracked
        self.out = nnx.Linear(48, 5, rngs=rngs)


def test_a_twin_with_stock_flax_batchnorm_is_refused_with_the_batchnorm_to_use_and_why():
    """nnx: 0.2 listed one 'unexpected key num_batches_tracked' per BatchNorm (52 on a
    mobilenet) and no hint; linen: a stock ``nn.BatchNorm`` ran without a word."""
    model = _randomized(Net1d())
    with pytest.raises(transfer.TransferError, match="1 problem") as e:
        transfer.torch_to_nnx(model.state_dict(), _port(model), model=NnxStockTwin(nnx.Rngs(0)))
    assert "'bn' is a stock flax.nnx.BatchNorm, which has no num_batches_tracked" in str(e.value)
    assert "use flaxbn.NnxBatchNorm" in str(e.value) and "flaxbn.NnxTorchBatchNorm" in str(e.value)

    class LinenStock(nn.Module):
        @nn.compact
        def __call__(self, x, *, train):
            x = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=2, use_bias=False, name="conv")(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="bn")(x))
            return nn.Dense(3, name="head")(x.reshape(len(x), -1))

    model = _randomized(Net2d())
    port = transfer.custom(model, flatten={"head": (4, 3, 3)}, rename={"norm": "bn"})
    variables = transfer.torch_to_linen(model.state_dict(), port)
    x = np.zeros((3, 2, 3, 3), np.float32)
    with pytest.raises(transfer.TransferError, match="'bn' is a stock flax.linen.BatchNorm") as e:
        equivalence.layerwise(port, "linen", model, variables, x, linen_model=LinenStock())
    assert "use flaxbn.LinenBatchNorm" in str(e.value) and len(e.value.problems) == 1
    transfer.check_twin(port, Flax2d(), x)  # the right twin passes


def test_check_twin_lists_every_missing_unexpected_and_misshapen_variable():
    class Wrong(nn.Module):
        @nn.compact
        def __call__(self, x, *, train):
            x = nn.Conv(4, (5, 5), padding=((2, 2), (2, 2)), use_bias=False, name="conv")(x)  # 5x5, not 3x3
            x = flaxbn.LinenBatchNorm(use_running_average=not train, name="norm")(x)  # not renamed to "bn"
            return nn.Dense(3, name="head")(x.reshape(len(x), -1))

    model = _randomized(Net2d())
    port = transfer.custom(model, flatten={"head": (4, 3, 3)}, rename={"norm": "bn"})
    with pytest.raises(transfer.TransferError) as e:
        transfer.check_twin(port, Wrong(), np.zeros((1, 2, 3, 3), np.float32))
    problems = e.value.problems
    assert (
        "shape mismatch at 'params/conv/kernel': the weight map gives (3, 3, 1, 4), the twin has (5, 5, 2, 4)"
        in problems
    )
    assert "missing in the twin: 'params/bn/scale' (shape (4,))" in problems
    assert "unexpected in the twin: 'batch_stats/norm/mean' (shape (4,))" in problems
    assert len(problems) == 11  # 5 missing under bn, 5 unexpected under norm, 1 shape


# --- rules match by state layout -----------------------------------------------------------


class MyConv(torch.nn.Conv2d):
    """A subclass with its own forward, the way weight-standardised convolutions are written."""


class FrozenBatchNorm2d(torch.nn.Module):
    """torchvision.ops.FrozenBatchNorm2d: the four tensors as buffers, no counter."""

    def __init__(self, n):
        super().__init__()
        for name, value in [("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)]:
            self.register_buffer(name, torch.full((n,), value))

    def forward(self, x):
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        return x * scale[None, :, None, None] + (self.bias - self.running_mean * scale)[None, :, None, None]


@pytest.mark.parametrize("norm", ["sync", "frozen"])
def test_subclasses_syncbatchnorm_and_frozen_batchnorm_port_by_their_state_layout(norm):
    """0.2 matched exact types: a Conv2d subclass, SyncBatchNorm (BatchNorm's state_dict)
    and a frozen BatchNorm were refused. The frozen one has no counter: Flax gets 0, and
    the way back drops it, so the round trip is exact."""
    layer = torch.nn.SyncBatchNorm(4) if norm == "sync" else FrozenBatchNorm2d(4)
    model = _randomized(torch.nn.Sequential(MyConv(2, 4, 3, padding=1, bias=False), layer))
    port = transfer.custom(model)
    variables = transfer.torch_to_linen(model.state_dict(), port)
    assert variables["params"]["0"]["kernel"].shape == (3, 3, 2, 4)
    assert int(variables["batch_stats"]["1"]["num_batches_tracked"]) == (
        0 if norm == "frozen" else int(layer.num_batches_tracked)
    )
    assert_flat_equal(transfer.linen_to_torch(variables, port), model.state_dict())

    class Twin(nn.Module):
        @nn.compact
        def __call__(self, x, *, train=False):
            x = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="0")(x)
            return flaxbn.LinenBatchNorm(use_running_average=True, epsilon=1e-5, name="1")(x)

    x = np.random.default_rng(0).standard_normal((2, 2, 5, 5), dtype=np.float32)
    if norm == "frozen":  # SyncBatchNorm's forward needs a process group even in eval
        layers = equivalence.layerwise(port, "linen", model, variables, x, linen_model=Twin())
        assert [(d.layer, d.ok) for d in layers] == [("0", True), ("1", True)]


def test_a_transfer_error_of_a_file_names_the_file(tmp_path):
    from compare.io import checkpoint, convert

    sd = dict(_randomized(torch.nn.Sequential(torch.nn.Linear(3, 4))).state_dict())
    checkpoint.write_torch_state_dict(sd, tmp_path / "mine.pth")
    with pytest.raises(transfer.TransferError) as e:
        convert.torch_file_to_flax(tmp_path / "mine.pth", tmp_path / "out.safetensors", "mlp")
    assert e.value.file == str(tmp_path / "mine.pth") and str(e.value).startswith(f"{tmp_path / 'mine.pth'}: ")
