"""Measurements on a trained network, one function per claim, written once for both
frameworks against the methods of ``compare.experiments.nets`` (``TorchNet``/``LinenNet``).
Every function returns plain floats, lists and dicts (they go into the run's record under
``probes``).
"""

from __future__ import annotations

import numpy as np

BATCH_INDEPENDENCE_ROWS = 16


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, -1) == labels))


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _sites(captured: dict, prefix: str) -> list[str]:
    return sorted(k for k in captured if k.startswith(prefix) and k[len(prefix) :].isdigit())


def ics_layers(hidden: int) -> dict[str, tuple[str, ...]]:
    """The mlp's weight layers that have layers before them (``fc2`` .. ``fc{n}``, ``head``),
    each with the modules before it (``fc{i}``, ``bn{i}``)."""
    names = [f"fc{i}" for i in range(1, hidden + 1)] + ["head"]
    return {
        name: tuple(f"{kind}{i}" for i in range(1, j + 1) for kind in ("fc", "bn")) for j, name in enumerate(names) if j
    }


def internal_covariate_shift(net, idx: np.ndarray) -> dict[str, dict[str, float]]:
    """Santurkar et al. 2018, definition 2.1, at every weight layer with layers before it:
    how much the gradient G of the layer's weight changes when the layers before it take
    the optimizer's own step (its momentum included) on the same batch. Per layer: ``l2``
    ``||G - G'||`` (their definition), ``cos`` the cosine of G and G' (their second
    measure), ``rel`` ``||G - G'|| / ||G||``."""
    shift = net.gradient_shift(idx, ics_layers(len(net.spec.config.hidden)))
    return {layer: {"l2": d, "cos": c, "rel": d / g if g > 0 else float("nan")} for layer, (d, g, c) in shift.items()}


def active_at_inference(net) -> dict:
    """Eval mode on the test split. BatchNorm: the relative change it makes to its input
    (``||out - in|| / ||in||``), how far its output is from a per-channel affine map of
    its input (least squares; relative to the output's scale), and how much a sample's
    logits depend on the rest of the batch. Dropout: the relative change it makes."""
    cap = net.captured("test")
    out: dict = {}
    bns, drops = _sites(cap, "bn"), _sites(cap, "drop")
    if bns:
        change, residual = {}, 0.0
        for name in bns:
            x, y = (a.astype(np.float64) for a in cap[name])
            change[name] = float(np.linalg.norm(y - x) / np.linalg.norm(x))
            design = np.stack([x, np.ones_like(x)], axis=-1)  # per channel: y = a * x + b
            for c in range(x.shape[-1]):
                coef, *_ = np.linalg.lstsq(design[:, c], y[:, c], rcond=None)
                residual = max(residual, float(np.abs(design[:, c] @ coef - y[:, c]).max() / (np.abs(y).max() + 1e-30)))
        alone = net.logits("test", rows=BATCH_INDEPENDENCE_ROWS)
        together = net.logits("test")[:BATCH_INDEPENDENCE_ROWS]
        out |= {
            "bn_change": float(np.mean(list(change.values()))),
            "bn_change_per_layer": change,
            "bn_affine_residual": residual,
            "bn_batch_dependence": float(np.abs(alone - together).max()),
        }
    if drops:
        per = {n: float(np.linalg.norm(cap[n][1] - cap[n][0]) / np.linalg.norm(cap[n][0])) for n in drops}
        out |= {"dropout_change": max(per.values()), "dropout_change_per_layer": per}
    return out


def variance_shift(net) -> dict:
    """Li et al. 2019: per BatchNorm, the running variance (accumulated in training, with
    Dropout active) over the variance of the same layer's input in eval mode on the
    training data (Dropout off), averaged over channels; 1 means no shift. ``variance_shift``
    is the largest ``|ratio - 1|`` over the layers."""
    cap, running = net.captured("train"), net.running_var()
    ratios = {}
    for name in _sites(cap, "bn"):
        eval_var = cap[name][0].astype(np.float64).var(axis=0)
        ratios[name] = float(np.mean(running[name] / eval_var))
    return {"variance_ratio": ratios, "variance_shift": max(abs(r - 1.0) for r in ratios.values())}


def ablation(net, fractions: tuple[float, ...], draws: int, seed: int = 0) -> dict:
    """Test accuracy when a fraction ``f`` of the hidden units is zeroed at every
    ``drop{i}`` site (after the activation), averaged over ``draws`` random choices of
    units; the same choices for every network and framework (``seed``). Twice: as is
    (``ablation_acc``), and with the kept units scaled by ``1 / (1 - f)``
    (``ablation_acc_rescaled``), the inverted scaling Dropout uses in training, so that
    the next layer's input keeps its expected size and only the loss of particular units
    is measured."""
    labels = net.labels("test")
    widths = {f"drop{i}": width for i, width in enumerate(net.spec.config.hidden, start=1)}  # the mlp's sites
    rng = np.random.default_rng(seed)
    acc, rescaled = {}, {}
    for f in fractions:
        plain_runs, scaled_runs = [], []
        for _ in range(draws):
            masks = {}
            for name, width in sorted(widths.items()):
                keep = np.ones(width, np.float32)
                keep[rng.choice(width, round(f * width), replace=False)] = 0.0
                masks[name] = keep
            plain_runs.append(_accuracy(net.logits("test", ablate=masks), labels))
            if f < 1.0:
                scale = np.float32(1.0 / (1.0 - f))
                scaled_runs.append(
                    _accuracy(net.logits("test", ablate={k: m * scale for k, m in masks.items()}), labels)
                )
        acc[str(f)] = float(np.mean(plain_runs))
        if scaled_runs:
            rescaled[str(f)] = float(np.mean(scaled_runs))
    full = _accuracy(net.logits("test"), labels)
    return {"ablation_full_acc": full, "ablation_acc": acc, "ablation_acc_rescaled": rescaled}


def ensemble(net, passes: int) -> dict:
    """Weight scaling (eval mode) against Monte-Carlo dropout: ``passes`` stochastic
    forward passes (Dropout active, each a thinned network), their mean probability as an
    ensemble; accuracy of the ensemble with 1, 2, 4, ... members."""
    labels = net.labels("test")
    eval_logits = net.logits("test")
    stochastic = net.stochastic_logits("test", passes)
    probs = _softmax(stochastic.astype(np.float64))
    mc = probs.mean(0)
    sizes = [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k <= passes]
    return {
        "eval_acc": _accuracy(eval_logits, labels),
        "single_acc": float(np.mean([_accuracy(s, labels) for s in stochastic])),
        "mc_acc": _accuracy(mc, labels),
        "eval_mc_agreement": float(np.mean(np.argmax(eval_logits, -1) == np.argmax(mc, -1))),
        "mc_acc_by_members": {str(k): _accuracy(probs[:k].mean(0), labels) for k in sizes},
        "passes": passes,
    }
