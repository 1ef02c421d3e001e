"""The bridge between ``torchbn`` and ``flaxbn``, and everything built on it. One folder
per job; imports point one way, down this map (``tests/test_architecture.py`` enforces it;
docs/architecture.md says where each kind of change goes)::

    conventions   every conversion between torch's and Flax's conventions, by name
    registry      the named models, built the same on every side
    transfer/     the weight map: rules, validation, moves, custom networks, twin checks
    port/         the Flax twin generated from a traced torch network
    masks         dropout masks drawn once and injected into torch, linen and nnx
    optimizers    optimizers that match step for step
    records       the dataclasses that define every results.json field
    suite         what a suite of compare.run is
    io/           files: checkpoints, conversion, training state, limits on untrusted input
    checks/       equivalence, train equivalence, the spec, tolerances
    parallel/     data parallelism on several processes: launcher, checks, checkpoints, costs
    bench/        the benchmark: sweeps, runners, FLOPs, memory, machine load
    experiments/  the lesson's claims
    report/       results.json, report.md, console, figures, generated docs
    run, convert  the command lines

Module paths that moved (``compare.checkpoint``, ``compare.report.plots``,
``compare.checks.parallel_jax``, ...) still import, with a ``DeprecationWarning`` that names
the new path (``DEPRECATED_MODULES``, at the end).
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
    "parallel",
    "records",
    "registry",
    "report",
    "suite",
    "transfer",
]


# --- module paths that moved: imported with a DeprecationWarning -------------------------

# old module -> the new module(s) whose public names it re-exports, searched in order
DEPRECATED_MODULES: dict[str, tuple[str, ...]] = {
    "compare.checkpoint": ("compare.io.checkpoint",),
    "compare.train_state": ("compare.io.train_state",),
    "compare.equivalence": ("compare.checks.equivalence",),
    "compare.train_equivalence": ("compare.checks.train_equivalence",),
    "compare.spec": ("compare.checks.spec",),
    "compare.distributed_jax": ("compare.parallel.jax_checks", "flaxbn.parallel"),
    "compare.distributed_torch": ("compare.parallel.torch_checks",),
    # the data-parallel checks moved to their own job folder, compare/parallel/ (documented paths before)
    "compare.checks.parallel_jax": ("compare.parallel.jax_checks", "flaxbn.parallel"),
    "compare.checks.parallel_torch": ("compare.parallel.torch_checks",),
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
            f"{spec.name} moved to {' and '.join(targets)}; the old path goes away in a later release (CHANGELOG.md)",
            DeprecationWarning,
            stacklevel=2,
        )
        return _DeprecatedModule(spec.name, targets)

    def exec_module(self, module):
        pass


if not any(isinstance(f, _DeprecatedFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _DeprecatedFinder())
