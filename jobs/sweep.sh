#!/usr/bin/env bash
# Submit a cut-ratio sweep as a SLURM job array (one task per c, jobs/sweep.sbatch)
# and the report step as a job that runs after the whole array.
#
#   CUTS="0.2 0.4 0.6 0.8 1.0" bash jobs/sweep.sh CONFIG [sbatch options ...] [-- --set key=value ...]
#
# Prints the array job id and the report job id; results land in runs/sweep-<array id>/c<c>/
# (jobs/points.sh),
# the report (table.csv, table.md, tradeoff.png, grids/) in runs/sweep-<array id>/report/.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: jobs/sweep.sh CONFIG [sbatch options] [-- --set key=value ...]}
shift
opts=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do opts+=("$1"); shift; done
[ "${1:-}" = -- ] && shift
read -r -a cuts <<< "${CUTS:-0.2 0.4 0.6 0.8 1.0}"
export POINTS="${cuts[*]/#/c}"
mkdir -p runs
array=$(sbatch --parsable --array=0-$((${#cuts[@]} - 1)) "${opts[@]}" jobs/sweep.sbatch "$config" "$@")
array=${array%%;*}
mkdir -p "runs/sweep-$array"
report=$(sbatch --parsable "${opts[@]}" --dependency=afterany:"$array" --nodes=1 --ntasks=1 \
  --ntasks-per-node=1 --job-name=collafuse-report --output="runs/sweep-$array/report.out" --gres=none \
  --wrap "${VENV:-.venv}/bin/collafuse-hpc report runs/sweep-$array/c*/results.h5 --out runs/sweep-$array/report")
echo "sweep: array job $array (c = ${cuts[*]}), report job $report -> runs/sweep-$array/report.out"
