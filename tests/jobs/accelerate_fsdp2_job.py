"""Accelerate's FSDP2 plugin (``fsdp_version=2``) with our optimizer built as usual, on OddLM.

The model and the optimizer go through one ``prepare()`` (Accelerate then swaps the optimizer's parameters
for their sharded DTensors). Launched by tests/test_fsdp2.py under torchrun with 2 CPU ranks; rank 0 saves
the full weights, which the test compares with the single-process dense reference.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from sinkgd_ds import SinkGD  # noqa: E402
from tests.ds_model import make_model  # noqa: E402
from tests.jobs.teardown import leave  # noqa: E402


def main() -> None:
    from accelerate import Accelerator, PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    PartialState(cpu=True)  # (on CPU Accelerate joins the ranks only when the state is made with cpu=True)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                            auto_wrap_policy="size_based_wrap", min_num_params=1,
                                            cpu_ram_efficient_loading=False)
    acc = Accelerator(fsdp_plugin=plugin)
    # Test-only: Accelerate turns FSDP on for GPU-like devices only (MULTI_CPU keeps plain DDP), while torch's
    # fully_shard itself runs on CPU over gloo; so here (and only here) the state is set to FSDP by hand, the
    # way Accelerate sets it on a GPU, to run its FSDP2 prepare() path on this CPU machine.
    from accelerate.utils import DistributedType

    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    model = make_model()
    opt = SinkGD(model.named_parameters(), lr=0.02)
    model, opt = acc.prepare(model, opt)
    world, rank = acc.num_processes, acc.process_index
    data = torch.load(args.data)
    for ids in data:
        per = ids.shape[0] // world
        loss = model(ids[rank * per : (rank + 1) * per])
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
    inner = getattr(opt, "optimizer", opt)
    weights = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    placements = {n: str(p.placements) for n, p in model.named_parameters()}
    if rank == 0:
        torch.save(dict(world=world, weights=weights, placements=placements, kinds=inner.param_kinds(),
                        inner=type(inner).__name__), args.out)
    leave()


if __name__ == "__main__":
    main()
