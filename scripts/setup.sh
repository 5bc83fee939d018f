#!/usr/bin/env bash
# Create .venv and install the pinned requirements (idempotent). Usage: scripts/setup.sh [requirements file]
set -euo pipefail
cd "$(dirname "$0")/.."
requirements=${1:-requirements.txt}
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$requirements"
# the package itself, editable: `import myrtle_vision` from any folder (benchmarks, users' own code)
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
