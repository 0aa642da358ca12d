"""Accelerate's DeepSpeed plugin with our JSON (``DummyOptim`` + ``"type": "SinkGD"``) on OddLM.

Launched by tests/test_frontends.py under torchrun with 2 CPU ranks; rank 0 saves the full fp32
weights and losses, which the test compares with the single-process dense reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import sinkgd_ds  # noqa: E402,F401  - registers "SinkGD" with DeepSpeed
from tests.ds_model import BATCH, batches, make_model  # noqa: E402
from tests.jobs.teardown import leave  # noqa: E402


def main() -> None:
    import deepspeed
    from accelerate import Accelerator, DeepSpeedPlugin, PartialState
    from accelerate.utils import DummyOptim

    ap = argparse.ArgumentParser()
    ap.add_argument("--ds_config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    with open(args.ds_config) as f:
        cfg = json.load(f)
    # On CPU, Accelerate only joins the ranks when the process state is made with cpu=True first (as the
    # HF Trainer does for use_cpu=True); the Accelerator then switches it to DeepSpeed.
    PartialState(cpu=True)
    acc = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg))
    model = make_model()
    model, opt = acc.prepare(model, DummyOptim(model.parameters()))
    world, rank = acc.num_processes, acc.process_index
    per, losses = BATCH // world, []
    for ids in batches(args.steps):
        loss = model(ids[rank * per : (rank + 1) * per].to(acc.device))
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    engine = model  # accelerate hands back the DeepSpeed engine
    weights = {n: deepspeed.utils.safe_get_full_fp32_param(p).detach().clone()
               for n, p in engine.module.named_parameters()}
    if rank == 0:
        torch.save(dict(world=world, weights=weights, losses=losses, engine=type(engine).__name__,
                        inner=type(engine.basic_optimizer).__name__,
                        lrs=[engine.get_lr()[0]] * args.steps), args.out)
    leave()


if __name__ == "__main__":
    main()
