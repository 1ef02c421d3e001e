"""The bridge between ``torchbn`` and ``flaxbn``, and everything built on it.

One folder per job; imports point one way (``tests/test_architecture.py`` enforces it)::

    conventions registry transfer masks optimizers records   the bridge
    io/  checks/  bench/  experiments/                       built on the bridge
    report/                                                  reads their records
    run  convert                                             the command lines

The modules of the flat layout before 0.2 (``compare.checkpoint``, ``compare.equivalence``,
``compare.bench_jax``, ...) still import, with a ``DeprecationWarning`` that names the new
path; they go away in 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

__version__ = "0.2.0"

__all__ = [
    "__version__",
    "bench",
    "checks",
    "conventions",
    "experiments",
    "io",
    "masks",
    "optimizers",
    "records",
    "registry",
    "report",
    "transfer",
]

# old module -> the new module(s) whose public names it re-exports, searched in order
DEPRECATED_MODULES: dict[str, tuple[str, ...]] = {
    "compare.checkpoint": ("compare.io.checkpoint",),
    "compare.train_state": ("compare.io.train_state",),
    "compare.equivalence": ("compare.checks.equivalence",),
    "compare.train_equivalence": ("compare.checks.train_equivalence",),
    "compare.spec": ("compare.checks.spec",),
    "compare.distributed_jax": ("compare.checks.parallel_jax", "flaxbn.parallel"),
    "compare.distributed_torch": ("compare.checks.parallel_torch",),
    "compare.bench_jax": ("compare.bench.runners_jax",),
    "compare.bench_torch": ("compare.bench.runners_torch",),
    "compare.flops": ("compare.bench.flops",),
    "compare.data": ("compare.experiments.data",),
    "compare.training": ("compare.experiments.training", "compare.experiments.claims"),
    "compare.experiments.design": ("compare.experiments.claims.design",),
    "compare.experiments.stats": ("compare.experiments.claims.stats",),
    "compare.results": ("compare.report.results",),
    "compare.plots": (
        "compare.report.figures.bench",
        "compare.report.figures.equivalence",
        "compare.report.figures.training",
    ),
    "compare.report.plots": (
        "compare.report.figures.bench",
        "compare.report.figures.equivalence",
        "compare.report.figures.training",
    ),
    "compare.report.claim_plots": ("compare.report.figures.claims",),
}


class _DeprecatedModule(types.ModuleType):
    """Stands for an old module path: attribute look-ups go to the new modules."""

    def __init__(self, name: str, targets: tuple[str, ...]):
        super().__init__(name, f"Deprecated alias of {', '.join(targets)}.")
        self._targets = targets

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        for target in self._targets:
            module = importlib.import_module(target)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} (now {' and '.join(self._targets)}) has no attribute {attr!r}")

    def __dir__(self):
        return sorted({n for t in self._targets for n in dir(importlib.import_module(t)) if not n.startswith("_")})


class _DeprecatedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``compare.<old>`` as a :class:`_DeprecatedModule`, warning once per import."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in DEPRECATED_MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        targets = DEPRECATED_MODULES[spec.name]
        warnings.warn(
            f"{spec.name} moved to {' and '.join(targets)} in compare 0.2; the old path goes away in 0.3",
            DeprecationWarning,
            stacklevel=2,
        )
        return _DeprecatedModule(spec.name, targets)

    def exec_module(self, module):
        pass


if not any(isinstance(f, _DeprecatedFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _DeprecatedFinder())
