"""Training experiments: the datasets (``data``), one network under training in each
framework with the same methods (``nets``), the runs from the same weights and batches
(``training``), the measurements on trained networks (``probes``), the intervals and
verdicts (``stats``) and the lesson's claims with their experiments (``claims``)."""

__all__ = ["claims", "data", "nets", "probes", "stats", "training"]
