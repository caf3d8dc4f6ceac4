# Shared by the SLURM job scripts (sourced from $SLURM_SUBMIT_DIR/jobs/common.sh, first thing
# after the arguments: the stop traps below are set when it is sourced).
#
# collafuse_run CONFIG [ARGS...] runs one training job step with srun:
#   - environment: NCCL/gloo interfaces, threads per task from --cpus-per-task;
#   - output folder $OUTPUT_DIR (default runs/<job name>-<job id>); a requeued
#     job finds its results there and continues with --resume;
#   - USR1 (from --signal=B:USR1@120) is forwarded to every rank, which stop at
#     the next round boundary with a checkpoint set and exit 75; the job is then
#     requeued with scontrol. TERM to the script is forwarded the same way, without
#     the requeue (scancel without --signal reaches the ranks directly). A rank that
#     dies of the forwarded signal while still starting is exit 75 too (jobs/stop.sh).
#   - A stop that comes before the step starts (a short --time, a slow module load) is
#     not the script's death: no step starts, and the job is requeued (USR1) or exits 75.
# SRUN_ARGS (an array, optional) adds options to srun, e.g. (--het-group=0,1).

# The rendezvous store is unauthenticated: keep it on the cluster's internal
# network (set the interfaces when the default route is not internal).
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}
[ -n "${GLOO_SOCKET_IFNAME:-}" ] || unset GLOO_SOCKET_IFNAME
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
VENV=${VENV:-.venv}
source "$(dirname "${BASH_SOURCE[0]}")/stop.sh"

collafuse_stopped=""  # the stop signal's name once one came
collafuse_requeue=1
collafuse_launched=""  # set just before srun starts the job step

# collafuse_stop SIGNAL: forward a stop to the ranks if they run; remember it either way
collafuse_stop() {
  collafuse_stopped=$1
  if [ "$1" = TERM ]; then
    collafuse_requeue=0  # TERM or INT to this script alone (scancel --batch, a job killed from outside)
  fi
  if [ -z "$collafuse_launched" ]; then
    echo "collafuse: $1 before the job step started: no step starts"
    return
  fi
  echo "collafuse: $1, ranks stop at the next round boundary"
  scancel --signal="$1" "$SLURM_JOB_ID"
}
trap 'collafuse_stop USR1' USR1
trap 'collafuse_stop TERM' TERM INT  # the ranks stop on TERM (INT is what a terminal sends)

collafuse_run() {
  local config=$1
  shift
  local out=${OUTPUT_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
  local resume=()
  [ -f "$out/results.h5" ] && resume=(--resume=auto)
  echo "collafuse: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST -> $out"
  local rc=75
  if [ -z "$collafuse_stopped" ]; then
    collafuse_launched=1
    srun --kill-on-bad-exit=1 "${SRUN_ARGS[@]}" "$VENV/bin/python" -m collafuse_hpc train "$config" \
      --set "run.output_dir=$out" "${resume[@]}" "$@" &
    local step=$!
    rc=0
    wait "$step" || rc=$?
    while kill -0 "$step" 2>/dev/null; do  # wait returns early when a trap runs
      rc=0
      wait "$step" || rc=$?
    done
    [ -z "$collafuse_stopped" ] || rc=$(stop_status "$rc")
  fi
  if [ "$rc" -eq 75 ] && [ "$collafuse_requeue" -eq 1 ]; then
    echo "collafuse: stopped (exit 75), requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  elif [ "$rc" -eq 75 ]; then
    echo "collafuse: stopped (exit 75); not requeued (stopped by TERM/INT): submit again to continue"
  fi
  return "$rc"
}
