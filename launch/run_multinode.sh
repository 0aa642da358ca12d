#!/usr/bin/env bash
# One node of a multi-node main job: run it on every node with the same NNODES, MASTER_ADDR (node 0's
# address, reachable from every node), MASTER_PORT, and this node's NODE_RANK (0 .. NNODES-1); NPROC ranks
# per node. Arguments go to launch/pretrain.py (or ENTRY=launch/pretrain_fsdp.py).
#   LAUNCHER=torchrun   (default) torch's static rendezvous
#   LAUNCHER=deepspeed  the deepspeed launcher without ssh (--no_ssh --node_rank), NODES="host0 host1 ..."
#   LAUNCHER=mpirun     Open MPI, run on node 0 only (NODE_RANK=0): mpirun starts the other nodes' ranks itself,
#                       through ssh, or MPI_RSH_AGENT (any command taking "host command...", e.g. one that enters
#                       a container or, in tests/test_multinode.py, a network namespace); NODES as for deepspeed
# A node with several network interfaces: set GLOO_SOCKET_IFNAME (CPU / gloo) or NCCL_SOCKET_IFNAME to the one
# the nodes reach each other on.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC=8 launch/run_multinode.sh \
#       --deepspeed_config configs/zero2_sinkgd.json --model 60m --bf16
set -euo pipefail
source "$(dirname "$0")/_env.sh"
: "${NNODES:?set NNODES (number of nodes)}" "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1)}"
: "${MASTER_ADDR:?set MASTER_ADDR (the address of node 0)}"
ENTRY="${ENTRY:-launch/pretrain.py}"
case "${LAUNCHER:-torchrun}" in
  torchrun)
    exec "$BIN/torchrun" --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC" \
      --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$ENTRY" "$@" ;;
  deepspeed)
    : "${NODES:?set NODES (the node names, in node-rank order) for LAUNCHER=deepspeed}"
    hostfile="$(mktemp)"
    for node in $NODES; do echo "$node slots=$NPROC" >> "$hostfile"; done
    exec "$BIN/deepspeed" --hostfile "$hostfile" --no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" \
      --master_port "$MASTER_PORT" "$ENTRY" "$@" ;;
  mpirun)
    : "${NODES:?set NODES (the node names, node 0 first) for LAUNCHER=mpirun}"
    if [ "$NODE_RANK" != 0 ]; then
      echo "LAUNCHER=mpirun runs on node 0 only (NODE_RANK=0): it starts the other nodes' ranks itself" >&2; exit 2
    fi
    hostfile="$(mktemp)"
    for node in $NODES; do echo "$node slots=$NPROC" >> "$hostfile"; done
    ifname="${MPI_IFNAME:-${GLOO_SOCKET_IFNAME:-}}"
    args=(-np "$((NNODES * NPROC))" --hostfile "$hostfile" --map-by "ppr:$NPROC:node" --bind-to none)
    [ "$(id -u)" = 0 ] && args+=(--allow-run-as-root)
    [ -n "${MPI_RSH_AGENT:-}" ] && args+=(--mca plm_rsh_agent "$MPI_RSH_AGENT")
    [ -n "$ifname" ] && args+=(--mca oob_tcp_if_include "$ifname" --mca btl_tcp_if_include "$ifname")
    for var in MASTER_ADDR MASTER_PORT DS_ACCELERATOR OMP_NUM_THREADS PYTHONWARNINGS SINKGD_DS_CACHE \
               GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME; do
      [ -n "${!var:-}" ] && args+=(-x "$var")
    done
    exec mpirun "${args[@]}" "$BIN/python" "$ENTRY" "$@" ;;
  *) echo "LAUNCHER=${LAUNCHER} is not one of: torchrun, deepspeed, mpirun" >&2; exit 2 ;;
esac
