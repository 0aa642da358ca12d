#!/usr/bin/env bash
# NPROC ranks on this machine under torchrun; arguments go to launch/pretrain.py.
set -euo pipefail
source "$(dirname "$0")/_env.sh"
exec "$BIN/torchrun" --nproc_per_node "$NPROC" --master_port "$MASTER_PORT" launch/pretrain.py "$@"
