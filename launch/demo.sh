#!/usr/bin/env bash
# make demo: LLaMA-tiny on the embedded Shakespeare corpus, SinkGD, ZeRO-2, 2 CPU ranks, deepspeed launcher.
# A fresh run each time in runs/demo (checkpoints, logs/, loss.png, summary.json); extra args go to pretrain.py.
set -euo pipefail
exec bash "$(dirname "$0")/run_deepspeed.sh" --deepspeed_config configs/zero2_sinkgd.json --model tiny \
  --out runs/demo --overwrite "$@"
