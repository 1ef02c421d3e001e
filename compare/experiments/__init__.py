"""Training experiments: the datasets (``data``), one network under training in each
framework with the same methods (``nets``), the runs from the same weights and batches
(``training``), the measurements on trained networks (``probes``), and the lesson's claims
(``claims``: the plan, the claims table, the statistics and the verdicts)."""

__all__ = ["claims", "data", "nets", "probes", "training"]
