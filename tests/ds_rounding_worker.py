"""Pure-bf16 DeepSpeed ZeRO-2 with stochastic rounding: a straight run and a resumed one, per rank.

The configuration keeps DeepSpeed's master weights, gradients and optimizer states in bf16
(``bf16_master_weights_and_grads`` + ``bf16_optimizer_states``, ZeRO 1-3 only in DeepSpeed 0.19.8), so
the inner optimizer writes its updates into bf16 partitions: the case stochastic rounding is for.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist

import sinkgd_ds  # noqa: F401  - registers SinkGD/SCALE/SWAN with DeepSpeed
from sinkgd_ds.optim.base import ROUNDING_STEP_KEY

from .ds_model import BATCH, batches, make_model
from .ds_worker import ds_config

STEPS, SPLIT = 6, 3


def pure_bf16_config(world: int, stochastic_rounding: bool = True) -> dict:
    cfg = ds_config("SinkGD", 2, world, hp={"stochastic_rounding": stochastic_rounding, "rounding_seed": 7})
    cfg["bf16"] = {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}
    return cfg


def _engine(cfg: dict, seed: int = 0):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=make_model(seed).bfloat16(), config=copy.deepcopy(cfg))
    return engine


def _steps(engine, first: int, last: int) -> None:
    world, rank = dist.get_world_size(), dist.get_rank()
    data, per = batches(STEPS), BATCH // world
    for step in range(first, last):
        engine.backward(engine(data[step][rank * per : (rank + 1) * per]))
        engine.step()


def _weights(engine) -> dict[str, torch.Tensor]:
    """Every parameter's full master weight (bf16 here), as stored."""
    import deepspeed

    return {n: deepspeed.utils.safe_get_full_fp32_param(p).detach().clone()
            for n, p in engine.module.named_parameters()}


def _counters(engine) -> list[int]:
    return [g[ROUNDING_STEP_KEY] for g in engine.basic_optimizer.param_groups]


def run(rank: int, world: int, root: str) -> dict:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = pure_bf16_config(world)
    out: dict = {}

    engine = _engine(cfg)
    inner = engine.basic_optimizer
    out["stepped_dtypes"] = sorted({str(p.dtype) for g in inner.param_groups for p in g["params"]})
    out["options"] = (inner.stochastic_rounding, inner.rounding_seed)
    _steps(engine, 0, STEPS)
    out["straight"], out["straight_counters"] = _weights(engine), _counters(engine)
    engine.destroy()

    engine = _engine(pure_bf16_config(world, stochastic_rounding=False))
    _steps(engine, 0, STEPS)
    out["nearest"] = _weights(engine)
    engine.destroy()

    ckpt = os.path.join(root, "ckpt")
    engine = _engine(cfg)
    _steps(engine, 0, SPLIT)
    engine.save_checkpoint(ckpt, tag="half")
    engine.destroy()
    for key, reset in (("resumed", False), ("resumed_counter_reset", True)):
        engine = _engine(cfg, seed=123)  # other initial weights: the load must overwrite them
        engine.load_checkpoint(ckpt, tag="half")
        out[f"{key}_loaded_counters"] = _counters(engine)
        if reset:  # the control: the same load with the rounding counter forgotten
            for g in engine.basic_optimizer.param_groups:
                g[ROUNDING_STEP_KEY] = 0
        _steps(engine, SPLIT, STEPS)
        out[key], out[f"{key}_counters"] = _weights(engine), _counters(engine)
        engine.destroy()
    return out
