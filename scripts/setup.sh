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
elif "${pip[@]}" --no-index "torch==${TORCH_VERSION}" 2>/dev/null; then
  echo "setup: installed torch ${TORCH_VERSION} (CPU) from a local wheel"
else
  echo "setup: installing torch ${TORCH_VERSION} CPU build from download.pytorch.org"
  "${pip[@]}" "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
fi

"${pip[@]}" -e ".${extras:+[$extras]}"
echo "setup: done ($(.venv/bin/python -c 'import torch, jax, flax; print(f"torch {torch.__version__}, jax {jax.__version__} on {jax.default_backend()}, flax {flax.__version__}")'))"
