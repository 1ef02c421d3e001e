"""Weight transfer: bit-exact round trips in every direction, and strict validation."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from conftest import assert_flat_equal, random_state_dict
from flax import nnx

from compare import registry, transfer
from compare.checks import equivalence
from compare.transfer import TransferError


def _random_linen(spec, seed=1) -> dict:
    """Linen variables with random values everywhere (via a random torch state_dict)."""
    return transfer.torch_to_linen(random_state_dict(spec, seed), spec)


# --- round trips --------------------------------------------------------------------


def test_torch_to_linen_to_torch_is_bit_exact(spec):
    sd = random_state_dict(spec)
    assert_flat_equal(transfer.linen_to_torch(transfer.torch_to_linen(sd, spec), spec), sd)


def test_torch_to_nnx_to_torch_is_bit_exact(spec):
    sd = random_state_dict(spec)
    assert_flat_equal(transfer.nnx_to_torch(transfer.torch_to_nnx(sd, spec), spec), sd)


def test_linen_to_torch_to_linen_is_bit_exact(spec):
    variables = _random_linen(spec)
    back = transfer.torch_to_linen(transfer.linen_to_torch(variables, spec), spec)
    assert_flat_equal(transfer.linen_to_flat(back), transfer.linen_to_flat(variables))


def test_nnx_to_torch_to_nnx_is_bit_exact(spec):
    model = transfer.linen_to_nnx(_random_linen(spec), spec)
    back = transfer.torch_to_nnx(transfer.nnx_to_torch(model, spec), spec, spec.build_nnx(nnx.Rngs(7)))
    assert_flat_equal(transfer.nnx_to_flat(back), transfer.nnx_to_flat(model))


def test_linen_to_nnx_to_linen_is_bit_exact(spec):
    variables = _random_linen(spec)
    back = transfer.nnx_to_linen(transfer.linen_to_nnx(variables, spec), spec)
    assert_flat_equal(transfer.linen_to_flat(back), transfer.linen_to_flat(variables))


def test_num_batches_tracked_survives_a_round_trip_through_flax():
    spec = registry.get("mlp")
    sd = random_state_dict(spec)
    sd["bn1.num_batches_tracked"] = torch.tensor(12345)
    variables = transfer.torch_to_linen(sd, spec)
    assert int(variables["batch_stats"]["bn1"]["num_batches_tracked"]) == 12345
    back = transfer.linen_to_torch(variables, spec)
    assert back["bn1.num_batches_tracked"].dtype == torch.int64
    assert int(back["bn1.num_batches_tracked"]) == 12345


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_transferred_weights_do_not_alias_the_torch_tensors(api):
    """An in-place torch update after the transfer (an optimizer step) leaves Flax alone."""
    spec = registry.get("mlp")
    model = spec.build_torch()
    state = (
        transfer.torch_to_linen(model.state_dict(), spec)
        if api == "linen"
        else transfer.torch_to_nnx(model.state_dict(), spec)
    )
    before = transfer.linen_to_flat(state) if api == "linen" else transfer.nnx_to_flat(state)
    before = {k: v.copy() for k, v in before.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.bn1.running_mean.add_(1.0)
    after = transfer.linen_to_flat(state) if api == "linen" else transfer.nnx_to_flat(state)
    assert_flat_equal(after, before)


def test_numpy_arrays_transfer_exactly_like_tensors():
    """A state_dict read from a file may hold numpy arrays instead of tensors."""
    spec = registry.get("cnn")
    sd = random_state_dict(spec)
    from_numpy = transfer.torch_to_linen({k: v.numpy() for k, v in sd.items()}, spec)
    assert_flat_equal(transfer.linen_to_flat(from_numpy), transfer.linen_to_flat(transfer.torch_to_linen(sd, spec)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_goes_through_float32_and_keeps_its_dtype_on_the_way_back(dtype):
    spec = registry.get("mlp")
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in random_state_dict(spec).items()}
    variables = transfer.torch_to_linen(sd, spec)
    kernel = np.asarray(variables["params"]["fc1"]["kernel"])
    assert kernel.dtype == np.float32
    np.testing.assert_array_equal(kernel, sd["fc1.weight"].float().numpy().T)  # bf16 -> f32 is exact
    back = transfer.linen_to_torch(variables, spec, dtype={k: v.dtype for k, v in sd.items()})
    assert_flat_equal(back, sd)


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "module._orig_mod."])
def test_compile_and_data_parallel_prefixes_are_stripped(prefix):
    spec = registry.get("mlp")
    sd = random_state_dict(spec)
    prefixed = {prefix + k: v for k, v in sd.items()}
    assert_flat_equal(transfer.linen_to_torch(transfer.torch_to_linen(prefixed, spec), spec), sd)


def test_state_dicts_of_real_compiled_and_data_parallel_models_load():
    spec = registry.get("mlp")
    model = spec.build_torch()
    for wrapped in (torch.compile(model), torch.nn.DataParallel(model)):
        variables = transfer.torch_to_linen(wrapped.state_dict(), spec)
        assert_flat_equal(transfer.linen_to_torch(variables, spec), model.state_dict())


def test_first_linear_after_flatten_has_its_inputs_permuted_from_chw_to_hwc():
    """Kernel row of input feature (h, w, c) in Flax == torch weight column of (c, h, w)."""
    spec = registry.get("cnn")
    sd = random_state_dict(spec)
    kernel = np.asarray(transfer.torch_to_linen(sd, spec)["params"]["fc"]["kernel"])
    c, h, w = spec.config.flatten_shape
    weight = sd["fc.weight"].numpy()
    for ci, hi, wi in [(0, 0, 0), (c - 1, 0, 1), (3, h - 1, w - 2), (c - 1, h - 1, w - 1)]:
        np.testing.assert_array_equal(kernel[(hi * w + wi) * c + ci], weight[:, (ci * h + hi) * w + wi])


@pytest.mark.spec("cross.layout.flatten_order_chw_vs_hwc", framework="cross")
def test_eval_outputs_disagree_when_the_flatten_permutation_is_removed(monkeypatch):
    """The permutation is what makes the CNN match: without it the logits are far apart."""
    assert equivalence.check_eval("cnn", "linen")["ok"]
    monkeypatch.setattr(transfer.rules, "_flattened_inputs", lambda spec: {})
    transfer.plan.cache_clear()
    try:
        record = equivalence.check_eval("cnn", "linen")
    finally:
        transfer.plan.cache_clear()
    assert not record["ok"] and record["max_abs_diff"] > 1e-2
    assert record["first_divergence"] == "fc"


# --- strictness -----------------------------------------------------------------------


def test_every_problem_is_listed_in_one_error_with_expected_and_actual_shapes():
    spec = registry.get("mlp")
    sd = random_state_dict(spec)
    del sd["bn1.running_var"]
    sd["bn9.weight"] = torch.zeros(3)
    sd["fc1.weight"] = torch.zeros(7, 784)
    with pytest.raises(TransferError) as info:
        transfer.torch_to_linen(sd, spec)
    assert info.value.problems == [
        "missing key 'bn1.running_var' (expected shape (512,))",
        "unexpected key 'bn9.weight' (shape (3,))",
        "shape mismatch at 'fc1.weight': expected (512, 784), got (7, 784)",
    ]
    assert "3 problem(s), nothing was loaded" in str(info.value)


def test_an_integer_weight_and_a_float_counter_are_incompatible_dtypes():
    spec = registry.get("mlp")
    sd = random_state_dict(spec)
    sd["head.bias"] = torch.zeros(10, dtype=torch.int64)
    sd["bn2.num_batches_tracked"] = torch.tensor(3.0)
    with pytest.raises(TransferError) as info:
        transfer.torch_to_linen(sd, spec)
    assert info.value.problems == [
        "dtype mismatch at 'bn2.num_batches_tracked': expected an integer tensor, got torch.float32",
        "dtype mismatch at 'head.bias': expected a floating-point tensor, got torch.int64",
    ]


def test_non_finite_values_are_rejected_unless_asked_to_keep_them():
    spec = registry.get("mlp")
    sd = random_state_dict(spec)
    sd["bn1.running_var"][3] = float("nan")
    sd["head.weight"][0, 0] = float("inf")
    with pytest.raises(TransferError, match=r"non-finite values at 'bn1.running_var': 1 of 512"):
        transfer.torch_to_linen(sd, spec)
    variables = transfer.torch_to_linen(sd, spec, allow_nonfinite=True)
    assert np.isnan(variables["batch_stats"]["bn1"]["var"][3])
    assert_flat_equal(transfer.linen_to_torch(variables, spec, allow_nonfinite=True), sd)


def test_a_counter_beyond_int32_is_rejected_rather_than_wrapped():
    spec = registry.get("mlp")
    sd = random_state_dict(spec)
    sd["bn1.num_batches_tracked"] = torch.tensor(2**31)
    with pytest.raises(TransferError, match=r"outside \[0, 2\*\*31\)"):
        transfer.torch_to_linen(sd, spec)


def test_a_state_dict_of_another_architecture_is_rejected_with_every_key_named():
    sd = random_state_dict(registry.get("resnet18_cifar"))
    with pytest.raises(TransferError) as info:
        transfer.torch_to_linen(sd, "resnet34")
    missing = [p for p in info.value.problems if p.startswith("missing key")]
    assert len(missing) == 218 - 122 and "missing key 'layer1.2.conv1.weight'" in " ".join(missing)


def test_a_failed_nnx_load_leaves_the_model_untouched():
    spec = registry.get("cnn")
    model = spec.build_nnx(nnx.Rngs(0))
    before = transfer.nnx_to_flat(model)
    sd = random_state_dict(spec)
    sd["head.weight"] = torch.zeros(3, 3)  # the last tensor is wrong; all others are fine
    with pytest.raises(TransferError):
        transfer.torch_to_nnx(sd, spec, model)
    assert_flat_equal(transfer.nnx_to_flat(model), before)


def test_flax_to_torch_validates_the_flax_side_too():
    spec = registry.get("mlp")
    variables = _random_linen(spec)
    del variables["batch_stats"]["bn2"]["mean"]
    variables["params"]["head"]["kernel"] = np.zeros((3, 3), np.float32)
    with pytest.raises(TransferError) as info:
        transfer.linen_to_torch(variables, spec)
    assert info.value.problems == [
        "missing key 'batch_stats/bn2/mean' (expected shape (512,))",
        "shape mismatch at 'params/head/kernel': expected (512, 10), got (3, 3)",
    ]


def test_linen_variables_of_another_model_do_not_load_into_nnx():
    variables = _random_linen(registry.get("mlp").replace(hidden=(32,)))
    with pytest.raises(TransferError, match="missing key 'params/fc2/kernel'"):
        transfer.linen_to_nnx(variables, "mlp")


@pytest.mark.spec("transfer.nnx_update_accepts_wrong_shapes", framework="nnx")
def test_nnx_update_itself_accepts_a_kernel_of_another_shape_which_is_why_we_validate():
    """Pins the upstream behaviour that makes our own validation necessary."""
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    state = nnx.state(model)
    state["kernel"] = nnx.Param(jax.numpy.zeros((5, 7)))
    nnx.update(model, state)
    assert model.kernel[...].shape == (5, 7)
