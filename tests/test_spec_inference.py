"""What BatchNorm does at inference in a trained network: the fact behind the lesson's row
"BatchNorm: not active at inference", which is wrong. It is deterministic (no spread
over seeds), so it is a fact of the spec, not one of the statistical claims
(``compare.experiments.claims.effects.FACTS``); the ``train`` suite checks the same
measurements on every network it probes.
"""

from __future__ import annotations

import numpy as np
import pytest

from compare.experiments import data, nets, probes, training

spec = pytest.mark.spec


def _trained(fw: str):
    """The lesson's mlp (BatchNorm and Dropout 0.5), trained for two epochs on digits."""
    full = data.load("digits")
    ds = data.Dataset(full.name, full.x_train[:256], full.y_train[:256], full.x_test[:256], full.y_test[:256], 10)
    cfg = training.RunConfig("learning_rate", "mlp", True, 0.5, 0.1, epochs=2, hidden=(32, 32))
    spec_ = training.model_spec("mlp", ds, True, 0.5, (32, 32))
    init = spec_.build_torch().state_dict()
    net = nets.TorchNet(spec_, ds, cfg, init) if fw == "torch" else nets.LinenNet(spec_, ds, cfg, init)
    for epoch in range(cfg.epochs):
        net.train_epoch(data.batches(len(ds.x_train), cfg.batch_size, 0, epoch))
    return net


def _bn_parameters(net, fw: str, name: str) -> tuple[np.ndarray, ...]:
    """(scale, bias, running mean, running variance) of one BatchNorm, float64."""
    if fw == "torch":
        m = dict(net.model.named_modules())[name]
        arrays = (m.weight, m.bias, m.running_mean, m.running_var)
        return tuple(a.detach().cpu().numpy().astype(np.float64) for a in arrays)
    p, s = net.state.params[name], net.state.batch_stats[name]
    return tuple(np.asarray(a, np.float64) for a in (p["scale"], p["bias"], s["mean"], s["var"]))


@spec("bn.eval.is_a_fixed_affine_map_without_batch_dependence")
@pytest.mark.parametrize("fw", ["torch", "linen"])
def test_eval_batchnorm_in_a_trained_network_is_a_fixed_affine_map(fw):
    """After training, eval-mode BatchNorm is applied, not switched off: every channel is
    exactly ``y = scale * (x - running_mean) / sqrt(running_var + eps) + bias`` (float32
    against the float64 formula: measured 1.2e-7 of the output's scale), it changes its
    input by 35-39% (it is not the identity), and a sample's logits do not depend on the
    rest of the batch (16 samples alone and in the batch: torch 0, XLA 2.4e-7; one sample:
    2.4e-7 in both, the matmul's summation order changes with the batch size)."""
    net = _trained(fw)
    captured = net.captured("test")
    for name in ("bn1", "bn2"):
        x, y = (a.astype(np.float64) for a in captured[name])
        scale, bias, mean, var = _bn_parameters(net, fw, name)
        expected = scale * (x - mean) / np.sqrt(var + 1e-5) + bias
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
        assert np.linalg.norm(y - x) / np.linalg.norm(x) > 0.05  # applied: far from the identity
    measured = probes.active_at_inference(net)
    assert measured["bn_affine_residual"] < 1e-5  # least squares per channel: float32, measured 5e-8
    assert measured["bn_batch_dependence"] < 1e-4
    one = net.logits("test", rows=1)[0]  # the first test image as a batch of one
    np.testing.assert_allclose(one, net.logits("test")[0], rtol=1e-5, atol=1e-5)
