"""The two rows of the lesson that are not statistical claims: what BatchNorm and Dropout do
in eval mode is deterministic, the same on every seed, so each is a fact of the spec (a
SEMANTICS.md row with its test), checked here on every network a run probed, not judged
by an interval over seeds.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class FactRow:
    """A row of the lesson that is a deterministic fact of eval mode, checked on every probed
    network (and pinned by the spec test ``spec_id``)."""

    claim: str
    component: str
    lesson: str
    statement: str  # what is true
    spec_id: str
    test: str


FACTS = (
    FactRow(
        "bn_active_at_inference", "BatchNorm", "no (BN is not active at inference)",
        "BatchNorm is applied at inference: an exact per-channel affine map of its input, with the running"
        " statistics, and no dependence on the rest of the batch",
        "bn.eval.is_a_fixed_affine_map_without_batch_dependence",
        "tests/test_spec_inference.py::test_eval_batchnorm_in_a_trained_network_is_a_fixed_affine_map",
    ),
    FactRow(
        "dropout_active_at_inference", "Dropout", "no (Dropout is not active at inference)",
        "Dropout is not active at inference: eval mode is exactly the identity", "dropout.eval_is_identity",
        "tests/test_spec_dropout.py::test_eval_is_the_identity",
    ),
)  # fmt: skip
FACT = {f.claim: f for f in FACTS}
AFFINE_RESIDUAL_BOUND = 1e-4  # float32: measured 5e-8 (relative to the output's scale)
BATCH_DEPENDENCE_BOUND = 1e-4  # float32 logits: torch 0, XLA 2e-6 (its matmul tiles)


def fact_check(records: list[dict]) -> list[dict]:
    """Per fact and framework, over every network whose eval mode was probed: BatchNorm's
    largest affine residual and batch dependence and its smallest relative change (it is
    applied: not the identity); Dropout's largest relative change (exactly 0)."""
    out = []
    for fw in sorted({r["framework"] for r in records}):
        probed = [r["probes"] for r in records if r["framework"] == fw and "bn_change" in (r.get("probes") or {})]
        if probed:
            res = max(p["bn_affine_residual"] for p in probed)
            dep = max(p["bn_batch_dependence"] for p in probed)
            change = min(p["bn_change"] for p in probed)
            ok = res < AFFINE_RESIDUAL_BOUND and dep < BATCH_DEPENDENCE_BOUND and change > 0.01
            out.append({"claim": "bn_active_at_inference", "framework": fw, "networks": len(probed), "holds": ok,
                        "max_affine_residual": res, "max_batch_dependence": dep, "min_change": change})  # fmt: skip
        drops = [
            r["probes"]
            for r in records
            if r["framework"] == fw and r["dropout"] > 0 and "dropout_change" in (r.get("probes") or {})
        ]
        if drops:
            change = max(p["dropout_change"] for p in drops)
            out.append({"claim": "dropout_active_at_inference", "framework": fw, "networks": len(drops),
                        "holds": change == 0.0, "max_change": change})  # fmt: skip
    return out
