"""The checks that produce records: eval-mode equivalence (``equivalence``), train-mode
equivalence with injected masks (``train_equivalence``), the spec facts (``spec``), with
one table of tolerances (``tolerances``) and one tree-diff helper (``diffs``), which the
data-parallel checks of ``compare.parallel`` use too (``compare.checks.parallel_jax`` and
``parallel_torch`` moved there and still import, with a ``DeprecationWarning``)."""

__all__ = ["diffs", "equivalence", "spec", "tolerances", "train_equivalence"]
