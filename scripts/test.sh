#!/usr/bin/env bash
# Set up and run the test suite: bash scripts/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements-dev.txt
# lint and format first (the rules are in pyproject.toml): a second or two, and the tree stays clean
.venv/bin/ruff check --quiet .
.venv/bin/ruff format --check --quiet .
# the test files in parallel, one process per CPU (each file in one process: its fixtures are built once);
# the 25 slowest tests are listed at the end, to keep the suite within its time.
# The fast tier, after every change: bash scripts/test.sh -m "not slow"
exec .venv/bin/python -m pytest -n auto --dist loadfile --durations=25 "$@"
