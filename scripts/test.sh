#!/usr/bin/env bash
# Set up and run the test suite: bash scripts/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements-dev.txt
# the test files in parallel, one process per CPU (each file in one process: its fixtures are built once);
# the 25 slowest tests are listed at the end, to keep the suite within its time
exec .venv/bin/python -m pytest -n auto --dist loadfile --durations=25 "$@"
