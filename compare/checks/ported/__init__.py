"""Equivalence of a generated port (``compare.port``) with its torch network, in eval mode
(``eval``) and in one train step with the same injected masks (``train``)."""

from compare.checks.ported.eval import check_eval
from compare.checks.ported.train import check_train

__all__ = ["check_eval", "check_train"]
