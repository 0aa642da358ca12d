"""The torch.optim contract where DeepSpeed is involved: a client optimizer built from named parameters
(its groups split per kind for ZeRO before DeepSpeed flattens them), a deepcopy of the inner optimizer, and
checkpoints of that client optimizer; 2 ranks, ZeRO-2.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from .distributed import spawn
from .ds_model import BATCH, batches, make_model
from .ds_worker import ds_config


def _steps(engine, data, first, last):
    world, rank = dist.get_world_size(), dist.get_rank()
    per = BATCH // world
    for step in range(first, last):
        loss = engine(data[step][rank * per:(rank + 1) * per])
        engine.backward(loss)
        engine.step()


def _weights(engine):
    import deepspeed

    full = deepspeed.utils.safe_get_full_fp32_param
    return {n: full(p).detach().clone() for n, p in engine.module.named_parameters()}


def worker(rank, world, ckpt_dir):
    import deepspeed

    import sinkgd_ds

    deepspeed.init_distributed(dist_backend="gloo")
    data = batches(4)
    cfg = ds_config("SinkGD", 2, world)
    json_engine, *_ = deepspeed.initialize(model=make_model(), config=copy.deepcopy(cfg))
    _steps(json_engine, data, 0, 4)
    client_cfg = {k: v for k, v in cfg.items() if k != "optimizer"}

    def client_engine():
        model = make_model()
        opt = sinkgd_ds.SinkGD(model.named_parameters(), lr=0.02, lr_scale=0.05)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=copy.deepcopy(client_cfg))
        return engine

    engine = client_engine()
    inner = engine.basic_optimizer
    _steps(engine, data, 0, 2)
    engine.save_checkpoint(ckpt_dir, tag="two")
    twin = copy.deepcopy(inner)
    spec = twin._layout_specs[0]
    copied_ok = (spec.fragments[0].tensor is not inner._layout_specs[0].fragments[0].tensor
                 and any(spec.fragments[0].tensor is p for g in twin.param_groups for p in g["params"])
                 and twin._consensus_group is inner._consensus_group
                 and [g["kind"] for g in twin.param_groups] == [g["kind"] for g in inner.param_groups])
    _steps(engine, data, 2, 4)
    resumed = client_engine()
    resumed.load_checkpoint(ckpt_dir, tag="two")
    _steps(resumed, data, 2, 4)
    return {"json": _weights(json_engine), "client": _weights(engine), "resumed": _weights(resumed),
            "kinds": [g["kind"] for g in inner.param_groups], "copied_ok": copied_ok}


def test_named_client_optimizer_under_zero2(tmp_path):
    for r in spawn(worker, 2, str(tmp_path), timeout=600):
        assert r["kinds"] == ["adamw", "sinkgd"] and r["copied_ok"]
        for n, w in r["json"].items():
            assert torch.equal(r["client"][n], w), n  # the same routing and groups as the JSON path
            assert torch.equal(r["resumed"][n], w), n  # and its checkpoint resumes bit for bit
