#!/usr/bin/env bash
# The lower bounds of pyproject.toml, tested: bash scripts/oldest.sh
#
# Makes a scratch virtual environment (.venv-oldest, outside git) with exactly the oldest
# allowed version of every dependency (the ">=" bounds of pyproject.toml, pinned with a
# constraints file; jaxlib follows jax), then runs the fast part of the suite there: every
# spec fact (-m spec), the transfer, model, checkpoint and records tests and the claims'
# statistics (scipy's t quantiles). A bound that
# does not hold must be raised in pyproject.toml, not claimed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
env=.venv-oldest
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
"$PY" - "$pins" <<'PY'
import re, sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
pins = {}
for dep in deps:
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9A-Za-z.]*)", dep.split(";")[0].split("#")[0].strip())
    assert m, f"pyproject.toml: {dep!r} has no '>=' lower bound to test"
    pins[m.group(1)] = m.group(2)
pins["jaxlib"] = pins["jax"]
open(sys.argv[1], "w").write("".join(f"{k}=={v}\n" for k, v in sorted(pins.items())))
print("oldest: " + ", ".join(f"{k} {v}" for k, v in sorted(pins.items())))
PY
[ -x "$env/bin/python" ] || "$PY" -m venv "$env"
quiet() { "$@" 2> >(grep -v "^WARNING: Location" >&2); }
torch_pin=$(grep '^torch==' "$pins" | cut -d= -f3)
quiet "$env/bin/python" -m pip install --quiet --disable-pip-version-check "torch==${torch_pin}"
quiet "$env/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[test]" -c "$pins"
"$env/bin/python" - "$pins" <<'PY'
import sys
from importlib import metadata
from packaging.version import Version
want = dict(line.strip().split("==") for line in open(sys.argv[1]) if line.strip())
got = {k: metadata.version(k) for k in want}
bad = {k: (want[k], got[k]) for k in want if Version(Version(got[k]).public) != Version(want[k])}
assert not bad, f"the oldest environment did not get the pinned versions: {bad}"
PY
"$env/bin/python" -m pytest -q -p no:cacheprovider -m spec tests/
"$env/bin/python" -m pytest -q -p no:cacheprovider tests/test_transfer.py tests/test_models.py tests/test_checkpoint.py tests/test_records.py
"$env/bin/python" -m pytest -q -p no:cacheprovider tests/test_claims.py -k "interval or quantile or power"  # scipy
