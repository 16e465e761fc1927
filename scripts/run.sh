#!/usr/bin/env bash
# The main job: set up, build the default dataset (once), evaluate the classical baselines
# on its test split for Poisson-disc and 1D Cartesian masks at 4x.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --data
if [ ! -f data/default/manifest.json ]; then
  .venv/bin/cvxmri data simulate --out data/default
fi
.venv/bin/cvxmri evaluate --data data/default --split test --method zero-filled --method cs \
  --out "runs/evaluate-baselines" --force
