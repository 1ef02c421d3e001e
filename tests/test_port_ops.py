"""Every operation ``compare.port`` supports, in every form it comes in (module,
function, tensor method), on linen and on nnx: the generated module matches torch in
eval mode (float64, so that a wrong formula cannot hide in float32 rounding), and the
table covers every form of the op table (``compare.port.ops.table``).

CI budget: one tiny jit per case and API (about 0.1-0.3 s each on 2 CPU cores).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from port_nets import StochasticDepth, stochastic_depth
from torch import fx, nn

import compare.port as port
from compare.port.ops import table

fx.wrap("stochastic_depth")  # torchvision's is wrapped where it is defined; here it is called from this file

APIS = ["linen", "nnx"]


class Fn(nn.Module):
    """A forward given as a function of (self, x), with optional parameters of given shapes."""

    def __init__(self, fn: Callable, **params: tuple[int, ...]):
        super().__init__()
        self.fn = fn
        for name, shape in params.items():
            setattr(self, name, nn.Parameter(torch.randn(shape, dtype=torch.float64)))

    def forward(self, x):
        return self.fn(self, x)


class Seq(nn.Sequential):
    pass


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str
    form: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    note: str = ""

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.form}{'-' + self.note if self.note else ''}"


class MyConv(nn.Conv2d):
    """A subclass that keeps Conv2d's forward: ported as a Conv2d."""


class BNSub(nn.BatchNorm2d):
    pass


IMG, SEQ = (2, 4, 9, 7), (2, 4, 11)
CASES = [
    # layers with parameters
    Case("conv", "module", lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), IMG),
    Case("conv", "module", lambda: MyConv(4, 6, (3, 1), padding="same", dilation=(2, 1), bias=False), IMG, "same"),
    Case("conv", "module", lambda: nn.Conv1d(4, 6, 3, padding="valid", stride=2), SEQ, "1d"),
    Case(
        "conv",
        "function",
        lambda: Fn(lambda s, x: F.conv2d(x, s.weight, s.bias, 1, 1, 1, 2), weight=(6, 2, 3, 3), bias=(6,)),
        IMG,
    ),
    Case("conv", "function", lambda: Fn(lambda s, x: F.conv1d(x, s.w, None, 2, 0, 1, 1), w=(5, 4, 3)), SEQ, "1d"),
    Case("linear", "module", lambda: Seq(nn.Flatten(), nn.Linear(4 * 9 * 7, 5)), IMG, "after-flatten"),
    Case("linear", "module", lambda: nn.Linear(11, 3), SEQ, "last-axis"),
    Case("linear", "function", lambda: Fn(lambda s, x: F.linear(x, s.weight, s.bias), weight=(3, 11), bias=(3,)), SEQ),
    Case("batch_norm", "module", lambda: nn.BatchNorm2d(4), IMG),
    Case("batch_norm", "module", lambda: nn.BatchNorm1d(4, affine=False), SEQ, "1d-no-affine"),
    Case("batch_norm", "module", lambda: Seq(nn.Flatten(), nn.BatchNorm1d(44, momentum=None)), SEQ, "features"),
    Case("batch_norm", "module", lambda: nn.SyncBatchNorm(4), IMG, "sync"),
    Case("batch_norm", "module", lambda: BNSub(4, track_running_stats=False), IMG, "subclass-no-stats"),
    Case("layer_norm", "module", lambda: nn.LayerNorm(7), IMG, "last"),
    Case("layer_norm", "module", lambda: nn.LayerNorm((9, 7), elementwise_affine=False), IMG, "two-axes"),
    Case(
        "layer_norm",
        "module",
        lambda: Seq(Fn(lambda s, x: x.permute(0, 2, 1)), nn.LayerNorm(4, eps=1e-6)),
        SEQ,
        "channels",
    ),
    Case(
        "layer_norm",
        "function",
        lambda: Fn(
            lambda s, x: F.layer_norm(x.permute(0, 2, 3, 1), (4,), s.weight, s.bias).permute(0, 3, 1, 2),
            weight=(4,),
            bias=(4,),
        ),
        IMG,
    ),
    Case("group_norm", "module", lambda: nn.GroupNorm(2, 4), IMG),
    Case(
        "group_norm",
        "function",
        lambda: Fn(lambda s, x: F.group_norm(x, 2, s.weight, s.bias, 1e-3), weight=(4,), bias=(4,)),
        SEQ,
    ),
    # randomness (identity in eval; tests/test_port_families.py checks train mode)
    Case("dropout", "module", lambda: nn.Dropout(0.3), IMG),
    Case("dropout", "module", lambda: nn.Dropout2d(0.3), IMG, "2d"),
    Case("dropout", "module", lambda: nn.Dropout1d(0.3), SEQ, "1d"),
    Case("dropout", "function", lambda: Fn(lambda s, x: F.dropout(x, 0.3, s.training)), IMG),
    Case("dropout", "function", lambda: Fn(lambda s, x: F.dropout2d(x, 0.3, s.training)), IMG, "2d"),
    Case("stochastic_depth", "function", lambda: Fn(lambda s, x: stochastic_depth(x, 0.3, "row", s.training)), IMG),
    Case("stochastic_depth", "function", lambda: StochasticDepth(0.3, "batch"), IMG, "module"),
    # activations
    Case("relu", "module", lambda: nn.ReLU(inplace=True), IMG),
    Case("relu", "function", lambda: Fn(lambda s, x: F.relu(x)), IMG),
    Case("relu", "function", lambda: Fn(lambda s, x: torch.relu(x)), IMG, "torch"),
    Case("relu", "method", lambda: Fn(lambda s, x: x.relu()), IMG),
    Case("relu", "method", lambda: Fn(lambda s, x: (x * 2).relu_() + x), IMG, "inplace"),
    Case("relu6", "module", lambda: nn.ReLU6(inplace=True), IMG),
    Case("relu6", "function", lambda: Fn(lambda s, x: F.relu6(x * 4)), IMG),
    Case("silu", "module", lambda: nn.SiLU(), IMG),
    Case("silu", "function", lambda: Fn(lambda s, x: F.silu(x)), IMG),
    Case("gelu", "module", lambda: nn.GELU(), IMG),
    Case("gelu", "module", lambda: nn.GELU(approximate="tanh"), IMG, "tanh"),
    Case("gelu", "function", lambda: Fn(lambda s, x: F.gelu(x, approximate="tanh")), IMG),
    Case("hardswish", "module", lambda: nn.Hardswish(), IMG),
    Case("hardswish", "function", lambda: Fn(lambda s, x: F.hardswish(x * 3)), IMG),
    Case("hardsigmoid", "module", lambda: nn.Hardsigmoid(), IMG),
    Case("hardsigmoid", "function", lambda: Fn(lambda s, x: F.hardsigmoid(x * 3)), IMG),
    Case("sigmoid", "module", lambda: nn.Sigmoid(), IMG),
    Case("sigmoid", "function", lambda: Fn(lambda s, x: torch.sigmoid(x)), IMG),
    Case("sigmoid", "method", lambda: Fn(lambda s, x: x.sigmoid()), IMG),
    Case("tanh", "module", lambda: nn.Tanh(), IMG),
    Case("tanh", "function", lambda: Fn(lambda s, x: torch.tanh(x)), IMG),
    Case("tanh", "method", lambda: Fn(lambda s, x: x.tanh()), IMG),
    Case("leaky_relu", "module", lambda: nn.LeakyReLU(0.2), IMG),
    Case("leaky_relu", "function", lambda: Fn(lambda s, x: F.leaky_relu(x, 0.3)), IMG),
    Case("identity", "module", lambda: nn.Identity(), IMG),
    Case("identity", "method", lambda: Fn(lambda s, x: x.transpose(1, 2).contiguous()), IMG),
    # pooling
    Case("max_pool", "module", lambda: nn.MaxPool2d(3, 2, 1, ceil_mode=True), IMG),
    Case("max_pool", "module", lambda: nn.MaxPool1d(2, dilation=2), SEQ, "1d"),
    Case("max_pool", "function", lambda: Fn(lambda s, x: F.max_pool2d(x, (2, 3), 1)), IMG),
    Case("avg_pool", "module", lambda: nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False), IMG),
    Case("avg_pool", "module", lambda: nn.AvgPool1d(3, 2, 1), SEQ, "1d"),
    Case("avg_pool", "function", lambda: Fn(lambda s, x: F.avg_pool2d(x, 2, ceil_mode=True, divisor_override=3)), IMG),
    Case("adaptive_avg_pool", "module", lambda: nn.AdaptiveAvgPool2d((4, 5)), IMG),
    Case("adaptive_avg_pool", "module", lambda: nn.AdaptiveAvgPool1d(4), SEQ, "1d"),
    Case("adaptive_avg_pool", "function", lambda: Fn(lambda s, x: F.adaptive_avg_pool2d(x, (None, 2))), IMG),
    Case("adaptive_max_pool", "module", lambda: nn.AdaptiveMaxPool2d(4), IMG),
    Case("adaptive_max_pool", "function", lambda: Fn(lambda s, x: F.adaptive_max_pool1d(x, 3)), SEQ),
    # shapes
    Case("flatten", "module", lambda: nn.Flatten(), IMG),
    Case("flatten", "function", lambda: Fn(lambda s, x: torch.flatten(x, 2)), IMG),
    Case("flatten", "method", lambda: Fn(lambda s, x: x.flatten(1, 2)), IMG),
    Case(
        "reshape",
        "method",
        lambda: Fn(lambda s, x: x.view(x.size(0), 2, x.size(1) // 2, x.size(2), -1)),
        IMG,
        "split-channels",
    ),
    Case("reshape", "method", lambda: Fn(lambda s, x: x.reshape(2, -1)), SEQ),
    Case("reshape", "function", lambda: Fn(lambda s, x: torch.reshape(x, (4, 2, 63))), IMG),
    Case("permute", "method", lambda: Fn(lambda s, x: x.permute(0, 2, 3, 1) * 2), IMG),
    Case("permute", "function", lambda: Fn(lambda s, x: torch.permute(x, (2, 0, 1))), SEQ),
    Case("transpose", "method", lambda: Fn(lambda s, x: x.transpose(1, 3)), IMG),
    Case("transpose", "function", lambda: Fn(lambda s, x: torch.transpose(x, 0, 2)), SEQ),
    Case("size", "method", lambda: Fn(lambda s, x: x.view(x.size()[0], -1)), IMG),
    Case("getattr", "function", lambda: Fn(lambda s, x: x.view(x.shape[0], x.shape[1] * x.shape[2], -1)), IMG),
    Case("mean", "method", lambda: Fn(lambda s, x: x.mean((2, 3))), IMG),
    Case("mean", "function", lambda: Fn(lambda s, x: torch.mean(x, 1, keepdim=True)), IMG),
    Case("cat", "function", lambda: Fn(lambda s, x: torch.cat([x, x * 2], 1)), IMG),
    Case(
        "cat",
        "function",
        lambda: Fn(lambda s, x: torch.concat((x, x.transpose(2, 3).transpose(2, 3)), dim=-1)),
        IMG,
        "concat",
    ),
    Case("stack", "function", lambda: Fn(lambda s, x: torch.stack([x, -x], 2)), IMG),
    Case("neg", "function", lambda: Fn(lambda s, x: torch.neg(x) - (-x.size(1))), IMG),
    Case("neg", "method", lambda: Fn(lambda s, x: x.neg()), IMG),
    Case("chunk", "method", lambda: Fn(lambda s, x: x.chunk(4, 2)[1]), IMG),
    Case("chunk", "function", lambda: Fn(lambda s, x: torch.chunk(x, 2, -1)), SEQ),
    Case("split", "method", lambda: Fn(lambda s, x: x.split(3, 1)), IMG),
    Case("split", "function", lambda: Fn(lambda s, x: torch.split(x, [1, 3], 1)[1]), SEQ),
    Case("getitem", "function", lambda: Fn(lambda s, x: x.chunk(2, 1)[0] * x.chunk(2, 1)[1]), IMG),
    # arithmetic, with torch's broadcasting across layouts
    Case("add", "function", lambda: Fn(lambda s, x: x + s.b, b=(4, 1, 1)), IMG, "broadcast"),
    Case("add", "function", lambda: Fn(lambda s, x: torch.add(x, x.permute(0, 1, 3, 2).transpose(2, 3), alpha=2)), IMG),
    Case("add", "method", lambda: Fn(lambda s, x: x.add(1.5)), IMG),
    Case("add", "method", lambda: Fn(lambda s, x: (x * 1).add_(x)), IMG, "inplace"),
    Case("sub", "function", lambda: Fn(lambda s, x: x - x.mean(1, keepdim=True)), IMG),
    Case("sub", "method", lambda: Fn(lambda s, x: x.sub(s.b), b=(7,)), IMG),
    Case("mul", "function", lambda: Fn(lambda s, x: s.ls * x, ls=(4, 1, 1)), IMG, "layer-scale"),
    Case("mul", "method", lambda: Fn(lambda s, x: x.mul(x.mean((2, 3), keepdim=True))), IMG),
    Case("truediv", "function", lambda: Fn(lambda s, x: x / 3.0), IMG),
    Case("truediv", "method", lambda: Fn(lambda s, x: x.div(2.0)), IMG),
    Case("floordiv", "function", lambda: Fn(lambda s, x: x.view(x.size(0), x.size(1) // 2, -1)), IMG),
]


def _ported_matches(case: Case, api: str) -> None:
    torch.manual_seed(0)
    model = case.build()
    model = (model if not port.ops.module_form(model) else Seq(model)).double().eval()  # a single layer in a network
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = np.random.default_rng(0).standard_normal(case.shape)
    ported = port.port(model, x, api)
    with torch.no_grad():
        want = model(torch.from_numpy(x))
    got = ported.run(x)
    want_leaves = [want] if isinstance(want, torch.Tensor) else list(want)
    got_leaves = [got] if isinstance(got, np.ndarray) else list(got)
    assert len(got_leaves) == len(want_leaves)
    for g, w in zip(got_leaves, want_leaves, strict=True):
        assert g.shape == tuple(w.shape)
        # float64 on both sides: measured <= 2e-15 relative; anything wrong is O(1)
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_each_op_in_each_form_matches_torch(case, api):
    _ported_matches(case, api)


def test_the_table_covers_every_kind_in_every_form_it_has():
    forms = {(f.kind, f.form) for f in table.FORMS} | {("stochastic_depth", "function")}
    covered = {(c.kind, c.form) for c in CASES}
    assert forms <= covered, sorted(forms - covered)


def test_the_supported_set_names_every_form():
    listed = port.supported()
    assert "Conv2d" in listed["module"] and "torch.nn.functional.conv2d" in listed["function"]
    assert "torch.split" in listed["function"] and "torch.nn.functional.avg_pool1d" in listed["function"]
    assert "Tensor.view" in listed["method"] and "operator.add" in listed["function"]
    assert "torchvision.ops.stochastic_depth" in listed["function"]
    assert operator.getitem in {f.target for f in table.FORMS}
