"""The checks that produce records: eval-mode equivalence (``equivalence``), train-mode
equivalence with injected masks (``train_equivalence``), the spec facts (``spec``), the
data-parallel checks (``parallel_jax``, ``parallel_torch``), with one table of tolerances
(``tolerances``) and one tree-diff helper (``diffs``)."""

__all__ = ["diffs", "equivalence", "parallel_jax", "parallel_torch", "spec", "tolerances", "train_equivalence"]
