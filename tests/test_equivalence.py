"""Eval-mode equivalence: same weights, same input, same logits in torch, linen and nnx."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import APIS, MODELS

from compare import registry, transfer
from compare.checks import equivalence, tolerances


@pytest.mark.spec("cross.eval.same_weights_same_outputs")
@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("name", MODELS)
def test_eval_logits_match_torch_within_the_stated_tolerance(name, api):
    """Tolerances (``eval.<model>`` in compare.checks.tolerances): atol 1e-5 for mlp/cnn and
    1e-4 for the ResNets, rtol 1e-5, about 10x the largest difference measured over five seeds."""
    record = equivalence.check_eval(name, api, seed=3)
    assert record["ok"], record
    tol = tolerances.get(f"eval.{name}")
    assert record["max_abs_diff"] <= tol.bound(record["max_abs_diff"] / max(record["max_rel_diff"], 1e-30))


def test_randomized_batchnorm_statistics_are_far_from_the_defaults():
    """Means and variances away from 0 and 1, different per channel, so that a swap of
    mean and var (or of scale and bias) changes the output."""
    spec = registry.get("cnn")
    model = spec.build_torch()
    equivalence.randomize_batchnorm(model, torch.randn(8, *spec.input_shape), seed=0)
    for bn in [model.bn1, model.bn2, model.fc_bn]:
        assert bn.running_mean.abs().mean() > 0.01
        assert (bn.running_var - 1).abs().mean() > 0.05
        assert bn.running_var.std() > 0.01 and bn.weight.std() > 0.01
        assert int(bn.num_batches_tracked) > 0


def _eval_pair(name, seed=0):
    spec = registry.get(name)
    model = spec.build_torch()
    equivalence.randomize_batchnorm(model, torch.randn(8, *spec.input_shape), seed)
    model.eval()
    x = np.random.default_rng(seed).standard_normal((4, *spec.input_shape), dtype=np.float32)
    return spec, model, x


@pytest.mark.parametrize("api", APIS)
def test_a_swapped_mean_and_var_is_found_at_its_layer(api):
    """The layer-by-layer report names the first layer whose output differs."""
    spec, model, x = _eval_pair("resnet18_cifar")
    variables = transfer.torch_to_linen(model.state_dict(), spec)
    stats = variables["batch_stats"]["layer2"]["0"]["bn2"]
    stats["mean"], stats["var"] = stats["var"], stats["mean"]
    state = variables if api == "linen" else transfer.linen_to_nnx(variables, spec)
    layers = equivalence.layerwise(spec, api, model, state, x)
    first_bad = next(d.layer for d in layers if not d.ok)
    assert first_bad == "layer2.0.bn2"
    assert all(d.ok for d in layers[: [d.layer for d in layers].index(first_bad)])


def test_a_failed_check_records_the_layer_table_and_blames_no_layer_of_a_correct_port(monkeypatch):
    """With a zero tolerance every check fails and the record carries the layer table; the
    port is correct, so every layer is within torch's own float32 error and none is named."""
    monkeypatch.setitem(tolerances.TOLERANCES, "eval.mlp", tolerances.Tolerance(0.0, 0.0, "none: every check fails"))
    record = equivalence.check_eval("mlp", "nnx")
    assert not record["ok"]
    assert record["first_divergence"] is None
    compared = [d["layer"] for d in record["layers"] if not d["layer"].startswith("drop")]
    assert compared == ["fc1", "bn1", "fc2", "bn2", "head"]  # torch's execution order
    assert all(d["ok"] and d["port_error"] <= d["bound"] for d in record["layers"])


def test_a_failed_check_of_a_wrong_port_names_the_wrong_layer(monkeypatch):
    """A porting bug in the Flax side (fc2's kernel scaled by 1.01 on the way): the check
    fails and the record names fc2 as the first divergence."""
    original = transfer.torch_to_linen

    def buggy(state_dict, spec, **kwargs):
        variables = original(state_dict, spec, **kwargs)
        variables["params"]["fc2"]["kernel"] = variables["params"]["fc2"]["kernel"] * 1.01
        return variables

    monkeypatch.setattr(transfer, "torch_to_linen", buggy)
    record = equivalence.check_eval("mlp", "linen")
    assert not record["ok"] and record["first_divergence"] == "fc2"


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet18_cifar"])
def test_in_bfloat16_both_sides_agree_within_the_bfloat16_tolerance(name, api):
    """torch under autocast and Flax with compute_dtype='bfloat16', float32 weights and
    statistics on both sides: tolerance eval.bfloat16 (rtol 4e-2, atol 1e-2; measured
    normwise relative <= 2.7e-2). The float32 check of the same weights is 1000x tighter."""
    record = equivalence.check_eval(name, api, seed=1, dtype="bfloat16")
    assert record["ok"] and record["dtype"] == "bfloat16", record
    assert record["max_rel_diff"] > 1e-4  # it really computed in bfloat16
