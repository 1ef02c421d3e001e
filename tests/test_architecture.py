"""The package rules of DESIGN.md, checked over every import of every module (including
imports inside functions), so that a violation fails here and not in a user's install.

* ``bnconfig`` (the model configurations both sides share) imports the standard library
  only; ``torchbn`` imports torch and numpy, never jax/flax/optax; ``flaxbn`` never imports
  torch; neither imports the other or ``compare``.
* Inside ``compare`` imports point one way: the bridge (``conventions``, ``registry``, ``suite``,
  ``transfer``, ``port``, ``masks``, ``optimizers``, ``records``) <- ``io`` (files and the limits on
  untrusted input) <- ``checks``, ``bench``, ``experiments``, ``parallel`` (each may use the
  bridge, ``io`` and its own folder; ``parallel`` also the one tolerance table and tree-diff
  helper of ``checks``) <- ``report`` <- the command lines (``run``, ``convert``, and every
  ``__main__`` module: ``python -m compare.port`` is a command line that lives beside its
  package, and no library code imports a ``__main__``).
* No folder holds more than 8 modules, and no module is longer than 400 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bnconfig", "torchbn", "flaxbn", "compare")
BRIDGE = {"conventions", "registry", "transfer", "port", "masks", "optimizers", "records", "suite"}
MIDDLE = {"io", "checks", "bench", "experiments", "parallel"}
SHARED = {"compare.checks.tolerances", "compare.checks.diffs"}  # the one tolerance table, the one tree diff
CLI = {"run", "convert"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of the file, as absolute names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")[: -node.level + (path.name == "__init__.py")]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module
            subs = {f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in MODULES}
            found |= subs if len(subs) == len(node.names) else {module, *subs}
    return found


def _layer(module: str) -> str:
    """'bridge', 'io'/'checks'/'bench'/'experiments', 'report', 'cli' or 'package' for a compare module."""
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    if parts[-1] == "__main__":  # the entry point of ``python -m``: a command line wherever it lives
        return "cli"
    head = parts[1]
    if head in BRIDGE:
        return "bridge"
    if head in CLI:
        return "cli"
    return head


def test_every_module_is_found_and_parsed():
    assert {"compare.run", "compare.records", "compare.checks.equivalence", "torchbn.models", "flaxbn.parallel"} <= set(
        MODULES
    )
    assert {"compare.parallel.launch", "compare.parallel.suite", "torchbn.batchnorm"} <= set(MODULES)
    assert all(_imports(name, path) is not None for name, path in MODULES.items())


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("bnconfig")])
def test_bnconfig_imports_the_standard_library_only(module):
    import sys

    bad = {i for i in _imports(module, MODULES[module]) if i.split(".")[0] not in sys.stdlib_module_names}
    assert not bad, f"{module} imports {sorted(bad)}"


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("torchbn")])
def test_torchbn_imports_no_jax_flax_or_compare(module):
    bad = {
        i for i in _imports(module, MODULES[module]) if i.split(".")[0] in {"jax", "flax", "optax", "flaxbn", "compare"}
    }
    assert not bad, f"{module} imports {sorted(bad)}"


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("flaxbn")])
def test_flaxbn_imports_no_torch_or_compare(module):
    bad = {i for i in _imports(module, MODULES[module]) if i.split(".")[0] in {"torch", "torchbn", "compare"}}
    assert not bad, f"{module} imports {sorted(bad)}"


def _allowed(importer: str, imported: str) -> bool:
    a, b = _layer(importer), _layer(imported)
    if b == "package":
        return a != "bridge"  # compare/__init__ holds the deprecated aliases only
    if a in ("package", "cli"):
        return True
    if a == "bridge":
        return b == "bridge"
    if a == "io":
        return b in {"bridge", "io"}
    if a in MIDDLE:
        return b in {"bridge", "io", a} or (a == "parallel" and imported in SHARED)
    if a == "report":
        return b in {"bridge", "report", *MIDDLE}
    return False


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("compare.")])
def test_compare_imports_point_one_way(module):
    """bridge <- io <- checks, bench, experiments <- report <- CLI."""
    inside = {i for i in _imports(module, MODULES[module]) if i.split(".")[0] == "compare" and i in MODULES}
    bad = sorted(i for i in inside if not _allowed(module, i))
    assert not bad, f"{module} ({_layer(module)}) imports {bad}"


def test_the_direction_check_can_fail():
    """The rule itself: a bridge module importing a check, or a check importing the report, is refused."""
    assert not _allowed("compare.transfer", "compare.checks.equivalence")
    assert not _allowed("compare.checks.equivalence", "compare.report.markdown")
    assert not _allowed("compare.io.checkpoint", "compare.bench.sweep")
    assert not _allowed("compare.io.checkpoint", "compare.experiments.data")
    assert not _allowed("compare.checks.spec", "compare.bench.sweep")
    assert not _allowed("compare.parallel.jax_checks", "compare.checks.equivalence")
    assert not _allowed("compare.checks.spec", "compare.parallel.suite")
    assert _allowed("compare.parallel.jax_checks", "compare.checks.tolerances")
    assert _allowed("compare.report.plots", "compare.experiments.claims")
    assert not _allowed("compare.port.ported", "compare.checks.ported")  # the bridge never imports a check
    assert _allowed("compare.port.__main__", "compare.checks.ported")  # its command line may
    assert not _allowed("compare.checks.ported", "compare.port.__main__")


@pytest.mark.parametrize("folder", sorted({p.parent for p in MODULES.values()}), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_folder_holds_more_than_8_modules(folder):
    modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
    assert len(modules) <= 8, sorted(p.name for p in modules)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_longer_than_400_lines(module):
    assert len(MODULES[module].read_text().splitlines()) <= 400
