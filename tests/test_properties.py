"""Property-based: for random architectures, round trips are exact and eval outputs agree."""

from __future__ import annotations

import numpy as np
import torch
from conftest import assert_flat_equal, random_state_dict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compare import registry, transfer
from compare.checks import equivalence

widths = st.integers(min_value=1, max_value=12)
rates = st.sampled_from([0.0, 0.1, 0.5])

mlps = st.builds(
    lambda n_in, hidden, classes, p: registry.get("mlp").replace(in_features=n_in, hidden=tuple(hidden), num_classes=classes, dropout=p),
    widths, st.lists(widths, min_size=1, max_size=3), st.integers(2, 7), rates,
)  # fmt: skip
cnns = st.builds(
    lambda c_in, chans, pools, hidden, p: registry.get("cnn").replace(
        in_channels=c_in, channels=tuple(chans), image_size=2 ** len(chans) * pools, hidden=hidden, dropout=p, dropout2d=p
    ),
    st.integers(1, 3), st.lists(st.integers(1, 6), min_size=1, max_size=2), st.integers(1, 3), widths, rates,
)  # fmt: skip
resnets = st.builds(
    lambda layers, width, stem: registry.get("resnet18_cifar").replace(layers=tuple(layers), width=width, stem=stem),
    st.lists(st.integers(1, 2), min_size=1, max_size=3), st.integers(1, 6), st.sampled_from(["cifar", "imagenet"]),
)  # fmt: skip
architectures = st.one_of(mlps, cnns, resnets)
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(spec=architectures, api=st.sampled_from(["linen", "nnx"]), seed=st.integers(0, 2**16))
def test_torch_to_flax_to_torch_is_exact_for_any_architecture(spec, api, seed):
    sd = random_state_dict(spec, seed)
    if api == "linen":
        back = transfer.linen_to_torch(transfer.torch_to_linen(sd, spec), spec)
    else:
        back = transfer.nnx_to_torch(transfer.torch_to_nnx(sd, spec), spec)
    assert_flat_equal(back, sd)


@SETTINGS
@given(spec=architectures, api=st.sampled_from(["linen", "nnx"]), seed=st.integers(0, 2**16))
def test_eval_outputs_agree_for_any_architecture(spec, api, seed):
    """Small networks, O(1) logits: measured max |diff| <= 2e-6 over these examples;
    tolerance rtol 1e-4, atol 1e-5."""
    torch.manual_seed(seed)
    model = spec.build_torch()
    spatial = spec.input_shape[1] if len(spec.input_shape) == 3 else None
    if spatial is not None and spec.name.startswith("resnet"):
        spec = registry.ModelSpec(
            spec.name, spec.config, (spec.config.in_channels, 16, 16)
        )  # any size works after pooling
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, *spec.input_shape), dtype=np.float32)
    equivalence.randomize_batchnorm(
        model, torch.from_numpy(rng.standard_normal((8, *spec.input_shape), dtype=np.float32)), seed
    )
    model.eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    state = equivalence.flax_state_from_torch(spec, api, model.state_dict())
    got = equivalence.flax_eval(spec, api, state, x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
