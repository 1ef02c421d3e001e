#!/usr/bin/env bash
# Release hygiene, as CI runs it: bash scripts/check_package.sh
#
# Builds the sdist and the wheel (python -m build), checks their metadata (twine check),
# installs the wheel into a fresh virtual environment outside the checkout, and from
# there imports every subpackage, imports torchbn and flaxbn each on its own, and runs
# `python -m compare.run --help` and `python -m compare.convert --help`. A subpackage left
# out of the wheel, a missing dependency or a missing licence fails here.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
PY="${PYTHON:-.venv/bin/python}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

quiet() { "$@" 2> >(grep -v "^WARNING: Location" >&2); }
quiet "$PY" -m pip install --quiet --disable-pip-version-check build twine
"$PY" -m build --sdist --wheel --outdir "$work/dist" . >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
"$PY" -m twine check --strict "$work"/dist/*
wheel=$(ls "$work"/dist/*.whl)
# the listing into a file first: with pipefail, `unzip -l | grep -q` fails when grep stops
# reading at the first match and unzip, still writing a long listing, dies of SIGPIPE
unzip -l "$wheel" >"$work/listing"
grep -q "LICENSE" "$work/listing" || { echo "check_package: the wheel carries no LICENSE"; exit 1; }

python3 -m venv "$work/venv"
pip=(quiet "$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# the CPU build of torch first (see scripts/setup.sh), then the wheel with its dependencies
"${pip[@]}" "torch==${TORCH_VERSION}" 2>/dev/null || "${pip[@]}" "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
"${pip[@]}" "$wheel"

cd "$work"  # outside the checkout: nothing may come from the source tree
"$work/venv/bin/python" - "$repo" <<'PY'
import importlib, pkgutil, sys
from pathlib import Path

repo = Path(sys.argv[1]).resolve()
names = []
for top in ("bnconfig", "torchbn", "flaxbn", "compare"):
    pkg = importlib.import_module(top)
    assert repo not in Path(pkg.__file__).resolve().parents, f"{top} was imported from the checkout"
    names.append(top)
    for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{top}."):
        importlib.import_module(info.name)
        names.append(info.name)
expected = {"compare.io", "compare.checks", "compare.bench", "compare.experiments", "compare.report", "compare.report.figures", "flaxbn.parallel"}
missing = expected - set(names)
assert not missing, f"not in the wheel: {sorted(missing)}"
import compare, flaxbn, torchbn
assert compare.__version__ == flaxbn.__version__ == torchbn.__version__
print(f"check_package: {len(names)} modules import from the installed wheel (version {compare.__version__})")
PY
"$work/venv/bin/python" -c "import torchbn, sys; assert 'jax' not in sys.modules and 'flax' not in sys.modules"
"$work/venv/bin/python" -c "import flaxbn, sys; assert 'torch' not in sys.modules"
"$work/venv/bin/python" -m compare.run --help >/dev/null
"$work/venv/bin/python" -m compare.convert --help >/dev/null
echo "check_package: sdist and wheel built and checked; the installed wheel runs outside the checkout"
