#!/usr/bin/env bash
# Set up .venv for this project: bash scripts/setup.sh [EXTRAS]   (e.g. "test" or "test,cuda")
#
# The venv sees the system's site-packages, so a CUDA torch or CUDA jax that is already
# installed is used as it is. Without any torch, the CPU build is installed first, so that
# the `torch` requirement never pulls a multi-GB CUDA build onto a CPU machine: from a
# local wheel when pip's find-links has one, else from pytorch.org's CPU index.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv --system-site-packages .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

if .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: using the installed torch $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
elif wheels=$(mktemp -d) && .venv/bin/python -m pip download --quiet --disable-pip-version-check --no-index --no-deps \
    "torch==${TORCH_VERSION}" -d "$wheels" 2>/dev/null && ls "$wheels"/torch-*.whl >/dev/null 2>&1; then
  # a local wheel (pip's find-links) is the CPU build: install that file, its dependencies from the index
  "${pip[@]}" "$wheels"/torch-*.whl
  echo "setup: installed torch ${TORCH_VERSION} from the local wheel $(basename "$wheels"/torch-*.whl)"
else
  echo "setup: installing torch ${TORCH_VERSION} CPU build from download.pytorch.org"
  "${pip[@]}" "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
fi

"${pip[@]}" -e ".${extras:+[$extras]}"
echo "setup: done ($(.venv/bin/python -c 'import torch, jax, flax; print(f"torch {torch.__version__}, jax {jax.__version__} on {jax.default_backend()}, flax {flax.__version__}")'))"
