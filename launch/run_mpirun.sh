#!/usr/bin/env bash
# NPROC ranks under Open MPI's mpirun; pretrain.py maps OMPI_COMM_WORLD_* to RANK/WORLD_SIZE on 127.0.0.1.
# For several nodes, set MASTER_ADDR to the first node's address and pass a hostfile via MPIRUN_ARGS.
set -euo pipefail
source "$(dirname "$0")/_env.sh"
EXTRA=(-x PYTHONWARNINGS -x MASTER_PORT="$MASTER_PORT")
[ "$(id -u)" = 0 ] && EXTRA+=(--allow-run-as-root)
for var in DS_ACCELERATOR OMP_NUM_THREADS SINKGD_DS_CACHE MASTER_ADDR; do
  [ -n "${!var:-}" ] && EXTRA+=(-x "$var")
done
# shellcheck disable=SC2086
exec mpirun -np "$NPROC" --bind-to none "${EXTRA[@]}" ${MPIRUN_ARGS:-} "$BIN/python" launch/pretrain.py "$@"
