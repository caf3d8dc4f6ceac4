#!/usr/bin/env bash
# Run collafuse-hpc on this machine with mpirun, one rank per role.
#
#   jobs/local.sh NP train configs/quickstart.yaml [--set key=value ...]
#
# NP must equal server.count + number of clients. Works as root and with more
# ranks than cores (Open MPI from PyPI needs flags for both; MPICH needs none).
set -euo pipefail
cd "$(dirname "$0")/.."
np=${1:?usage: jobs/local.sh NP train|sample CONFIG [args]}
shift
VENV=${VENV:-.venv}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl=${OMPI_MCA_btl:-self,tcp}  # no stale /dev/shm segments
export PRTE_MCA_rmaps_default_mapping_policy=${PRTE_MCA_rmaps_default_mapping_policy:-:oversubscribe}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
MPIRUN=${MPIRUN:-$VENV/bin/mpirun}
exec "$MPIRUN" -np "$np" "$VENV/bin/python" -m collafuse_hpc "$@"
