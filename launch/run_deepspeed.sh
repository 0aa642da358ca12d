#!/usr/bin/env bash
# NPROC ranks on this machine under the deepspeed launcher; arguments go to launch/pretrain.py.
#   NPROC=8 launch/run_deepspeed.sh --deepspeed_config configs/zero2_sinkgd.json --model 60m --bf16
set -euo pipefail
source "$(dirname "$0")/_env.sh"
exec "$BIN/deepspeed" --num_gpus "$NPROC" --master_port "$MASTER_PORT" launch/pretrain.py "$@"
