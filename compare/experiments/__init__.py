"""Training experiments: the datasets (``data``), the training runs in torch and linen from
the same weights and batches (``training``), and the verdicts on the lesson's claims
(``claims``)."""

__all__ = ["claims", "data", "training"]
