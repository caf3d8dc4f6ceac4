#!/usr/bin/env bash
# The whole test suite: lint, unit tests and the multi-rank tests under mpirun.
#
#   bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash jobs/setup.sh
VENV=${VENV:-.venv}
"$VENV/bin/ruff" check collafuse_hpc tests tools
exec "$VENV/bin/python" -m pytest -q "$@"
