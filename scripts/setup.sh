#!/usr/bin/env bash
# Create .venv with cvxmri installed (editable) and every dependency, on a machine that has
# only Python. torch is pinned by constraints.txt so no dependency can pull a CUDA build.
# Usage: bash scripts/setup.sh [--data]   (--data also installs the default volumes)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
  -c constraints.txt -e ".[data,dev]"

if [ "${1:-}" = "--data" ] && [ ! -f /usr/share/mricron/templates/ch2.nii.gz ]; then
  # Colin27 comes from Debian's mricron-data; without apt (or root) the default dataset is
  # built from the MNI152 template in nilearn alone.
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mricron-data) \
      >/dev/null 2>&1 || echo "setup: could not install mricron-data; using MNI152 only" >&2
  else
    echo "setup: no root apt-get; the default dataset uses MNI152 only" >&2
  fi
fi
