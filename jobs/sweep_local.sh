#!/usr/bin/env bash
# A cut-ratio sweep on this machine, one run after the other: every client of the
# config gets c; each run trains, samples and evaluates (eval.at_end) into its own
# folder <sweep>/c<c>/, then tools/report.py writes the table and figures.
#
#   CUTS="0.2 0.5 0.8" bash jobs/sweep_local.sh CONFIG [--set key=value ...]
#
# c = 0 is the centralized baseline (the server sees raw images): an explicit opt-in
# that this script sets for that run only. SWEEP_DIR sets the folder (default
# runs/sweep-local-<time>); rerunning with the same SWEEP_DIR skips evaluated runs and
# resumes interrupted ones.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: jobs/sweep_local.sh CONFIG [--set key=value ...]}
shift
VENV=${VENV:-.venv}
read -r -a cuts <<< "${CUTS:-0.2 0.5 0.8}"
sweep=${SWEEP_DIR:-runs/sweep-local-$(date +%Y%m%d-%H%M%S)}
np=$("$VENV/bin/python" -c "import sys; from collafuse_hpc.config import load
cfg = load(sys.argv[1], [a for a in sys.argv[2:] if a != '--set'], check_files=False)
print(cfg.server.count + len(cfg.clients))" "$config" "$@")
for c in "${cuts[@]}"; do
  out="$sweep/c$c"
  if [ -f "$out/results.h5" ] && "$VENV/bin/python" -c "import h5py, sys; sys.exit('metrics' not in h5py.File(sys.argv[1], 'r'))" "$out/results.h5"; then
    echo "sweep: c = $c already evaluated in $out"
    continue
  fi
  extra=()
  [ -f "$out/results.h5" ] && extra=(--resume=auto)  # an interrupted run continues (or starts over without a checkpoint)
  [ "$(awk -v c="$c" 'BEGIN { print (c == 0) }')" = 1 ] && extra+=(--set "clients.*.allow_centralized=true")
  echo "sweep: c = $c -> $out"
  bash jobs/local.sh "$np" train "$config" --set "run.output_dir=$out" --set "clients.*.cut_ratio=$c" \
    --set eval.at_end=true "${extra[@]}" "$@"
done
"$VENV/bin/python" tools/report.py "$sweep"/c*/results.h5 --out "$sweep/report"
