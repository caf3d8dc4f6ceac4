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
#     the requeue (scancel without --signal reaches the ranks directly); a TERM after a
#     forwarded USR1 only cancels the requeue. A rank that dies of the forwarded signal
#     while still starting is exit 75 too (jobs/stop.sh). A stop sent while srun still
#     creates the step (named collafuse-train) is sent again until squeue shows the step.
#   - A stop that comes before the step starts (a slow module load) is not the script's
#     death: no step starts, and the job is requeued (USR1) or exits 75. A requeued job
#     stopped again before it trained a round (no newer checkpoint set; a --time not longer
#     than --signal's lead) is not requeued again: it could loop.
# SRUN_ARGS (an array, optional) adds options to srun, e.g. (--het-group=0,1).

# The rendezvous store is unauthenticated: keep it on the cluster's internal
# network (set the interfaces when the default route is not internal).
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}
[ -n "${GLOO_SOCKET_IFNAME:-}" ] || unset GLOO_SOCKET_IFNAME
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
VENV=${VENV:-.venv}
set +o posix  # POSIX mode (POSIXLY_CORRECT exported by sbatch) forgets a waited child's status: collafuse_run waits twice
source "$(dirname "${BASH_SOURCE[0]}")/stop.sh"

collafuse_stopped=""  # the stop's name (USR1, TERM) once one came; the ranks get it
collafuse_requeue=1

# collafuse_stop SIGNAL: remember a stop; collafuse_run forwards it to the ranks
collafuse_stop() {
  echo "collafuse: got $1 (restart ${SLURM_RESTART_COUNT:-0})"
  collafuse_stopped=$1
  [ "$1" = USR1 ] || collafuse_requeue=0  # TERM or INT to this script alone (scancel --batch, a job killed from outside)
}
trap 'collafuse_stop USR1' USR1
trap 'collafuse_stop TERM' TERM INT  # the ranks stop on TERM (INT is what a terminal sends)

# collafuse_forward: send the stop to the job's steps; true when the training step exists (a
# signal sent while srun still creates it reaches nothing: it is sent until the step has
# been seen twice, a second apart)
collafuse_forward() {
  scancel --signal="$collafuse_stopped" "$SLURM_JOB_ID"
  squeue -h -s -j "$SLURM_JOB_ID" -o %j 2>/dev/null | grep -qx collafuse-train
}

# collafuse_newest_set DIR: the round of DIR's newest complete checkpoint set (-1: none; nothing
# printed when it cannot tell: then the requeue-loop guard stays off); a stopped step that
# trained wrote one
collafuse_newest_set() {
  "$VENV/bin/python" -c 'import sys
from collafuse_hpc.runtime.checkpoint import complete_rounds
print((complete_rounds(sys.argv[1]) or [-1])[-1])' "$1" 2>/dev/null
}

collafuse_run() {
  local config=$1
  shift
  local out=${OUTPUT_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
  local resume=()
  [ -f "$out/results.h5" ] && resume=(--resume=auto)
  echo "collafuse: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST -> $out"
  local rc=75 before="" after=""
  [ "${SLURM_RESTART_COUNT:-0}" -eq 0 ] || before=$(collafuse_newest_set "$out")
  if [ -z "$collafuse_stopped" ]; then
    srun --job-name=collafuse-train --kill-on-bad-exit=1 "${SRUN_ARGS[@]}" "$VENV/bin/python" -m collafuse_hpc train "$config" \
      --set "run.output_dir=$out" "${resume[@]}" "$@" &
    local step=$! sent=0 seen=0
    while kill -0 "$step" 2>/dev/null; do
      if [ -n "$collafuse_stopped" ] && [ "$seen" -lt 2 ]; then
        [ "$sent" -gt 0 ] || echo "collafuse: $collafuse_stopped, ranks stop at the next round boundary"
        sent=$((sent + 1))
        if collafuse_forward; then seen=$((seen + 1)); fi
        sleep 1
      else
        wait "$step"  # until the step ends, or a trap runs
      fi
    done
    rc=0
    wait "$step" || rc=$?  # the step's own status (a wait a trap cut short gave 128 + its signal)
    [ -z "$collafuse_stopped" ] || rc=$(stop_status "$rc")
  else
    echo "collafuse: $collafuse_stopped before the job step started: no step starts"
  fi
  [ "$rc" -ne 75 ] || [ -z "$before" ] || after=$(collafuse_newest_set "$out")
  if [ "$rc" -eq 75 ] && [ "$collafuse_requeue" -eq 1 ] && [ -n "$after" ] && [ "$after" = "$before" ]; then
    echo "collafuse: stopped (exit 75) again after a requeue, before this allocation trained a round (or" \
      "while it only evaluated: eval.at_end starts over):" \
      "not requeued again, which could repeat without end; if the job's --time is not longer than" \
      "--signal's lead (B:USR1@<seconds>) and its start, raise --time; else submit the same job again"
  elif [ "$rc" -eq 75 ] && [ "$collafuse_requeue" -eq 1 ]; then
    echo "collafuse: stopped (exit 75), requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  elif [ "$rc" -eq 75 ]; then
    echo "collafuse: stopped (exit 75); not requeued (stopped by TERM/INT): submit again to continue"
  fi
  return "$rc"
}
