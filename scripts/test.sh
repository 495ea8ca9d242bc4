#!/usr/bin/env bash
# Sets up what is missing, then runs everything CI runs: ruff, mypy and the whole test suite
# (real daemon, real /proc, real TensorFlow). Needs root. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/pytest -q -p no:cacheprovider "$@"
