"""Checkpoint round trips through DeepSpeed's own save/load, many configurations per launch.

``save_phase`` (run on the saving world size) trains each configuration 6 steps straight, then
3 steps + ``engine.save_checkpoint`` + a fresh engine + ``engine.load_checkpoint`` + 3 more steps,
and (rank 0) converts the step-3 checkpoint to DeepSpeed's universal format with
``sinkgd_ds.checkpoint.to_universal``. ``resume_phase`` (run on another world size) loads that
universal checkpoint and trains the last 3 steps.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist

import sinkgd_ds  # noqa: F401  - registers SinkGD/SCALE/SWAN with DeepSpeed

from .ds_model import BATCH, batches, make_model

STEPS, SPLIT = 6, 3


def _engine(cfg: dict, seed: int = 0):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=make_model(seed), config=copy.deepcopy(cfg))
    return engine


def _steps(engine, first: int, last: int) -> list[float]:
    world, rank = dist.get_world_size(), dist.get_rank()
    data, per, losses = batches(STEPS), BATCH // world, []
    for step in range(first, last):
        loss = engine(data[step][rank * per : (rank + 1) * per])
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


def _full_weights(engine) -> dict[str, torch.Tensor]:
    """fp32 master weights (ZeRO) or the module's own (stage 0 fp32, where the module holds the masters)."""
    import deepspeed

    out = {}
    for n, p in engine.module.named_parameters():
        full = deepspeed.utils.safe_get_full_fp32_param(p) if engine.zero_optimization_stage() > 0 else None
        out[n] = (p if full is None else full).detach().float().clone()
    return out


def _global_losses(local: list[float]) -> list[float]:
    """The loss of the whole batch (mean over ranks of equal shards), so runs on different world sizes compare."""
    t = torch.tensor(local, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def save_phase(rank: int, world: int, configs: list[tuple[str, dict]], root: str) -> dict:
    import deepspeed

    from sinkgd_ds.checkpoint import to_universal

    deepspeed.init_distributed(dist_backend="gloo")
    out = {}
    for key, cfg in configs:
        try:
            engine = _engine(cfg)
            straight = _steps(engine, 0, STEPS)
            straight_w = _full_weights(engine)
            engine.destroy()

            ckpt = os.path.join(root, key)
            engine = _engine(cfg)
            first = _steps(engine, 0, SPLIT)
            engine.save_checkpoint(ckpt, tag="step3", client_state={"next_step": SPLIT})
            engine.destroy()

            engine = _engine(cfg, seed=123)  # other initial weights: the load must overwrite them
            _, client = engine.load_checkpoint(ckpt, tag="step3")
            resumed = _steps(engine, client["next_step"], STEPS)
            resumed_w = _full_weights(engine)
            state_keys = sorted({k for s in engine.basic_optimizer.state.values() for k in s})
            engine.destroy()
            converted = None
            if rank == 0 and cfg["zero_optimization"]["stage"] > 0:
                # offline conversion; the other ranks wait so that the next config starts together
                try:
                    to_universal(os.path.join(ckpt, "step3"), os.path.join(ckpt, "step3_universal"))
                except Exception as e:  # noqa: BLE001 - reported with the config
                    converted = f"{type(e).__name__}: {e}"
            dist.barrier()
            out[key] = dict(converted=converted, straight=_global_losses(straight), straight_w=straight_w,
                            resumed=_global_losses(first + resumed), resumed_w=resumed_w, state_keys=state_keys)
        except Exception as e:  # noqa: BLE001 - reported per config
            import traceback

            out[key] = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
    return out


def resume_phase(rank: int, world: int, configs: list[tuple[str, str, dict, bool]], root: str) -> dict:
    """Load ``root/saved`` on this world size and train the last steps; ZeRO-1/2 via the universal format
    (stage 0 keeps whole optimizer state per rank, so its own checkpoint loads directly)."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    out = {}
    for key, saved, cfg, optimizer_states in configs:
        try:
            universal = cfg["zero_optimization"]["stage"] > 0
            if universal:
                cfg = {**cfg, "checkpoint": {"load_universal": True}}
            engine = _engine(cfg, seed=123)
            engine.load_checkpoint(os.path.join(root, saved), tag="step3_universal" if universal else "step3")
            if not optimizer_states:  # the control: forget what was loaded (AdamW starts afresh)
                engine.basic_optimizer.state.clear()
            losses = _steps(engine, SPLIT, STEPS)
            out[key] = dict(resumed=_global_losses(losses), resumed_w=_full_weights(engine))
            engine.destroy()
        except Exception as e:  # noqa: BLE001 - reported per config
            import traceback

            out[key] = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
    return out
