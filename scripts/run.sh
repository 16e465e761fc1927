#!/usr/bin/env bash
# The main job: set up, then reproduce the paper's experiment with the quick preset: build
# the default dataset if missing, train and evaluate every method on a Poisson-disc and a
# 1D Cartesian mask at 4x, and write the report (25-31 min on 2 idle CPU cores of the
# development machines). Rerunning resumes an interrupted run and skips what is finished.
# Ends with the report's path.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --data
.venv/bin/cvxmri reproduce --preset quick
