#!/usr/bin/env bash
# Run collafuse-hpc on this machine with mpirun, one rank per role.
#
#   jobs/local.sh NP train configs/quickstart.yaml [--set key=value ...]
#
# NP must equal server.count + the client ranks (number of clients / run.clients_per_rank,
# rounded up; `collafuse-hpc config CONFIG` prints it). Works as root and with more
# ranks than cores (Open MPI from PyPI needs flags for both; MPICH needs none).
#
# SIGTERM or SIGINT (Ctrl-C) to this script stops the run at the next round
# boundary with a checkpoint set (exit 75; continue with --resume): the script
# hands them to mpirun as SIGUSR1, which mpirun forwards. Before training starts
# it is exit 75 too, also where a rank still starting died of it (jobs/stop.sh).
# mpirun itself, signalled with SIGTERM or SIGINT, kills its ranks at once: then
# the newest complete checkpoint set stays as it was, and the round in progress is lost.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: jobs/local.sh NP train|sample CONFIG [args]"
np=${1:-}
if ! [[ $np =~ ^[1-9][0-9]*$ ]]; then  # else mpirun reads the command as NP, and collafuse-hpc CONFIG as one
  echo "jobs/local.sh: NP, the number of ranks, is missing or not a count (got '$np'); collafuse-hpc config" \
    "CONFIG prints it. $usage" >&2
  exit 2
fi
shift
VENV=${VENV:-.venv}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl=${OMPI_MCA_btl:-self,tcp}  # no stale /dev/shm segments
export PRTE_MCA_rmaps_default_mapping_policy=${PRTE_MCA_rmaps_default_mapping_policy:-:oversubscribe}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
MPIRUN=${MPIRUN:-$VENV/bin/mpirun}
set +o posix  # POSIX mode (POSIXLY_CORRECT in the environment) forgets a waited child's status: mpirun's is read twice
source jobs/stop.sh
stopped=""
stop() {  # before mpirun starts: a stop that comes meanwhile is handed over once it runs
  stopped=$1
  echo "collafuse: $1, ranks stop at the next round boundary" >&2
  [ -z "${launcher:-}" ] || kill -USR1 "$launcher" 2>/dev/null || true
}
trap 'stop SIGTERM' TERM
trap 'stop SIGINT' INT
# mpirun in its own process group, so a Ctrl-C at the terminal reaches only this script
set -m
"$MPIRUN" -np "$np" "$VENV/bin/python" -m collafuse_hpc "$@" &
launcher=$!
set +m
[ -z "$stopped" ] || kill -USR1 "$launcher" 2>/dev/null || true
while kill -0 "$launcher" 2>/dev/null; do
  wait "$launcher" || true  # until mpirun ends, or a trap runs
done
rc=0
wait "$launcher" || rc=$?  # mpirun's own status (a wait a trap cut short gave 128 + its signal)
[ -z "$stopped" ] || rc=$(stop_status "$rc")
exit "$rc"
