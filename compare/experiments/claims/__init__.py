"""The lesson's claims: the plan of runs (``design``), the claims table with one function
per claim (``effects``), the intervals and verdicts (``stats``) and the judging of a run's
records (``judge``). ``compare.experiments.claims.claims(records)`` gives every verdict."""

from compare.experiments.claims.design import (
    ABLATED_FRACTION,
    GAP_EPOCHS,
    OVERFIT_TEST_LOSS_RISE,
    PLANS,
    STABLE_ACCURACY,
    Plan,
)
from compare.experiments.claims.effects import ROW, ROWS, ClaimRow, Runs, generalisation_gap, select, unstable
from compare.experiments.claims.verdicts import PROBED, claims, framework_agreement, judge, setting

__all__ = [
    "ABLATED_FRACTION",
    "GAP_EPOCHS",
    "OVERFIT_TEST_LOSS_RISE",
    "PLANS",
    "PROBED",
    "ROW",
    "ROWS",
    "STABLE_ACCURACY",
    "ClaimRow",
    "Plan",
    "Runs",
    "claims",
    "framework_agreement",
    "generalisation_gap",
    "judge",
    "select",
    "setting",
    "unstable",
]


def __getattr__(name: str):
    """0.2's ``SPEC``/``SPECS`` (the claims table), with a DeprecationWarning."""
    from compare.experiments.claims import design

    return getattr(design, name)
