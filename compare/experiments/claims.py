"""The claims of the classic lesson, judged from the ``train`` suite's records.

* BatchNorm claim: mlp and cnn, with and without BatchNorm, over a learning-rate sweep
  (SGD, momentum 0.9, no dropout). It holds for a model when BatchNorm trains stably at
  every learning rate where the plain network does, and at a higher one or faster
  (fewer steps to the target test accuracy).
* Dropout claim: mlp and cnn *without* BatchNorm (the setting of the Dropout paper, and
  BatchNorm regularises too, which would hide the effect) with p = 0, 0.2, 0.5, trained
  long enough to overfit, over two seeds. It holds when the generalisation gap (test loss
  - train loss, both in eval mode, averaged over the last 5 epochs and the seeds) shrinks
  as p grows.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from compare.records import Agreement, Claim

STABLE_ACCURACY = 0.5  # a run that did not diverge and ends above this trained "stably"


def _stable(r: dict) -> bool:
    return not r["diverged"] and r["final_test_acc"] >= STABLE_ACCURACY


def batchnorm_claim(records: list[dict], model: str, framework: str) -> dict:
    rs = [r for r in records if r["claim"] == "batchnorm" and r["model"] == model and r["framework"] == framework]
    by = {(r["use_bn"], r["lr"]): r for r in rs}
    lrs = sorted({r["lr"] for r in rs})
    stable_bn = [lr for lr in lrs if _stable(by[(True, lr)])]
    stable_plain = [lr for lr in lrs if _stable(by[(False, lr)])]
    both = [lr for lr in lrs if lr in stable_bn and lr in stable_plain]
    never = 10**9

    def mean_steps(bn):
        return float(np.mean([by[(bn, lr)]["steps_to_target"] or never for lr in both])) if both else None

    higher = bool(set(stable_bn) > set(stable_plain))
    faster = bool(both) and mean_steps(True) < mean_steps(False)
    holds = set(stable_plain) <= set(stable_bn) and (higher or faster)
    detail = (
        f"stable learning rates with BN {stable_bn}, without {stable_plain}; "
        f"diverged without BN at {[lr for lr in lrs if by[(False, lr)]['diverged']]}, with BN at "
        f"{[lr for lr in lrs if by[(True, lr)]['diverged']]}; final test accuracy with/without BN per lr: "
        + ", ".join(
            f"{lr}: {by[(True, lr)]['final_test_acc']:.3f}/{by[(False, lr)]['final_test_acc']:.3f}" for lr in lrs
        )
    )
    return Claim(claim="batchnorm", model=model, framework=framework, holds=bool(holds), detail=detail).to_dict()


GAP_EPOCHS = 5


def generalisation_gap(r: dict) -> float:
    """test loss - train loss (eval mode), averaged over the last ``GAP_EPOCHS`` epochs."""
    c = r["curves"]
    if r["diverged"] or not c["test_loss"]:
        return float("nan")
    return float(np.mean(np.subtract(c["test_loss"], c["train_loss"])[-GAP_EPOCHS:]))


def dropout_claim(records: list[dict], model: str, framework: str) -> dict:
    rs = [r for r in records if r["claim"] == "dropout" and r["model"] == model and r["framework"] == framework]
    ps = sorted({r["dropout"] for r in rs})
    gaps = [(p, float(np.mean([generalisation_gap(r) for r in rs if r["dropout"] == p]))) for p in ps]
    values = [g for _, g in gaps]
    monotone = all(a > b for a, b in itertools.pairwise(values))
    holds = bool(values) and values[-1] < values[0] and monotone
    detail = f"generalisation gap (test - train loss, last {GAP_EPOCHS} epochs, mean of seeds) by p: " + ", ".join(
        f"{p}: {g:.3f}" for p, g in gaps
    )
    if values and values[-1] < values[0] and not monotone:
        detail += " (smaller at the largest p, but not monotone)"
    return Claim(claim="dropout", model=model, framework=framework, holds=bool(holds), detail=detail).to_dict()


def claims(records: list[dict]) -> list[dict]:
    out = []
    for fw in sorted({r["framework"] for r in records}):
        for model in sorted({r["model"] for r in records}):
            if any(r["claim"] == "batchnorm" and r["model"] == model for r in records):
                out.append(batchnorm_claim(records, model, fw))
            if any(r["claim"] == "dropout" and r["model"] == model for r in records):
                out.append(dropout_claim(records, model, fw))
    return out


def framework_agreement(records: list[dict]) -> list[dict]:
    """Per run: the final test accuracy of each framework and their difference."""
    runs: dict[tuple, dict] = {}
    for r in records:
        key = (r["claim"], r["model"], r["use_bn"], r["dropout"], r["lr"], r["seed"])
        runs.setdefault(key, {})[r["framework"]] = r
    rows = []
    for (claim, model, use_bn, dropout, lr, seed), by_fw in runs.items():
        if {"torch", "linen"} <= set(by_fw):
            a, b = by_fw["torch"]["final_test_acc"], by_fw["linen"]["final_test_acc"]
            rows.append(
                Agreement(
                    claim=claim,
                    model=model,
                    use_bn=use_bn,
                    dropout=dropout,
                    lr=lr,
                    seed=seed,
                    torch_test_acc=a,
                    linen_test_acc=b,
                    acc_diff=abs(a - b) if math.isfinite(a) and math.isfinite(b) else None,
                    both_diverged=by_fw["torch"]["diverged"] and by_fw["linen"]["diverged"],
                ).to_dict()
            )
    return rows
