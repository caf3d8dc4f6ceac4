#!/usr/bin/env bash
# The main job on one CPU machine: set up .venv, prepare the digit shards
# (bundled in scikit-learn, no network), then train 1 server + 2 clients under
# mpirun for a few minutes, sample collaboratively and print a summary.
#
#   bash jobs/quickstart.sh [--set key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash jobs/setup.sh
VENV=${VENV:-.venv}
"$VENV/bin/python" -m collafuse_hpc prepare digits --out data/quickstart --clients 2 --partition class --size 16
out="runs/quickstart-$(date +%Y%m%d-%H%M%S)"
start=$(date +%s)
bash jobs/local.sh 3 train configs/quickstart.yaml --set "run.output_dir=$out" "$@"
echo "quickstart: done in $(( $(date +%s) - start )) s; sample grids: $out/samples/*.png; results: $out/results.h5"
echo "quickstart: the commands above run in its venv: source $VENV/bin/activate (or call $VENV/bin/collafuse-hpc;"
echo "  tools/*.py with $VENV/bin/python)"
