#!/usr/bin/env bash
# make demo: a 2-process CPU SinkGD run (ZeRO-2) under the deepspeed launcher.
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore::FutureWarning
exec .venv/bin/deepspeed --num_gpus 2 --master_port "${MASTER_PORT:-29517}" launch/train_tiny.py \
  --deepspeed_config configs/zero2_sinkgd.json "$@"
