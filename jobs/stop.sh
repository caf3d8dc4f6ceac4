# Shared by jobs/local.sh and jobs/common.sh (sourced): the exit status a job script gives
# after it forwarded a stop (SIGUSR1 or SIGTERM) to the ranks.
#
# stop_status RC prints RC, the launcher's (mpirun's, srun's), or 75 where a rank died of
# the stop signal (128 + 10 or + 15; srun's --kill-on-bad-exit then sends SIGTERM to the rest).
# A rank catches the stop signals from the first lines of collafuse-hpc until it exits, so one
# that dies of a signal was still starting (Python's start alone takes seconds on a cluster's
# shared file system): no rank had joined the job, nothing was trained or written, and the
# answer is to run the same command again, as for the ranks that were ready and exited 75.
stop_status() {
  local rc=$1
  if [ "$rc" -eq 138 ] || [ "$rc" -eq 143 ]; then
    echo "collafuse: a rank died of SIG$(kill -l "$rc") while it was still starting (before it caught" \
      "the stop): nothing was trained; exit 75, run the same command again" >&2
    rc=75
  fi
  echo "$rc"
}
