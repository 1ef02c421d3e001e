#!/usr/bin/env bash
# The whole GPU run in one command, for a machine that already has CUDA torch and CUDA jax
# (such as the lent H100/H200, which reaches no package registry):
#
#   bash scripts/gpu_sweep.sh [OUT]        # default OUT: results/<card name>
#
# Equivalence + the quick GPU benchmark sweep (mlp, cnn, resnet18_cifar; float32 and
# bfloat16; batch 256 and up), then the spec suite with its GPU-only facts, inside 8
# minutes. The benchmark runs the groups the README quotes first and starts no group that
# its budget cannot finish (--budget-s); results.json and report.md are rewritten after
# every group, so even the outer `timeout` (SIGTERM) leaves every finished group. To finish
# a sweep that was cut short, run the bench line again with `--resume "$out"`.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
card=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))")
out="${1:-results/$card}"
mkdir -p "$out"
python - <<'PY' | tee "$out/versions.txt"
import platform, torch, jax, jaxlib, flax, optax, numpy
print(f"python {platform.python_version()} torch {torch.__version__} jax {jax.__version__} jaxlib {jaxlib.__version__}"
      f" flax {flax.__version__} optax {optax.__version__} numpy {numpy.__version__}")
print(f"torch device: {torch.cuda.get_device_name(0)}; jax devices: {jax.devices()}")
PY
timeout 330 python -m compare.run --suite equivalence --suite bench --device gpu --budget-s 260 --out "$out" ; echo "bench exit $?"
timeout 140 python -m compare.run --suite spec --device gpu --out "$out/spec" ; echo "spec exit $?"
