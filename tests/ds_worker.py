"""Runs many DeepSpeed configurations inside one process group (one launch, many checks).

Each config trains OddLM for a few steps with ``import sinkgd_ds`` and a plain JSON config, then
returns the full fp32 weights, the losses, the lrs and what the inner optimizer communicated.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import sinkgd_ds  # noqa: F401  - registers SinkGD/SCALE/SWAN with DeepSpeed

from .ds_model import BATCH, batches, make_model


def ds_config(opt: str, stage: int, world: int, bf16: bool = False, hp: dict | None = None, gas: int = 1,
              clip: float = 0.0, scheduler: dict | None = None, **zero_extra) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": BATCH // world // gas,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": clip,
        "optimizer": {"type": opt, "params": {"lr": 0.02, "lr_scale": 0.05, **(hp or {})}},
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0, **zero_extra},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if scheduler:
        cfg["scheduler"] = scheduler
    return cfg


class CollectiveLog:
    """Records every torch.distributed collective issued while active (op name, elements)."""

    OPS = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
           "reduce", "all_to_all_single", "gather", "scatter")

    def __init__(self):
        self.calls: list[tuple[str, int]] = []
        self._saved = {}

    def __enter__(self):
        for op in self.OPS:
            fn = getattr(dist, op)
            self._saved[op] = fn

            def wrapped(tensor, *a, _fn=fn, _op=op, **k):
                t = tensor[0] if isinstance(tensor, (list, tuple)) else tensor
                self.calls.append((_op, t.numel() if torch.is_tensor(t) else -1))
                return _fn(tensor, *a, **k)

            setattr(dist, op, wrapped)
        return self

    def __exit__(self, *exc):
        for op, fn in self._saved.items():
            setattr(dist, op, fn)


def train(cfg: dict, steps: int = 3, poison_step: int | None = None) -> dict:
    import deepspeed

    world, rank = dist.get_world_size(), dist.get_rank()
    model = make_model()
    poison = {"on": False}  # a NaN in up.weight's gradient, injected by autograd itself

    def poison_hook(g):
        return torch.full_like(g, float("nan")) if poison["on"] else g

    model.up.weight.register_hook(poison_hook)
    engine, _, _, _ = deepspeed.initialize(model=model, config=copy.deepcopy(cfg))
    inner = engine.basic_optimizer
    gas = cfg["gradient_accumulation_steps"]
    data = batches(steps * gas)
    per = BATCH // world
    losses, lrs, comm, skipped, out_snaps = [], [], [], [], []
    original_step = inner.step

    def logged_step(*a, **k):
        with CollectiveLog() as log:
            out = original_step(*a, **k)
        comm.append((inner.last_comm.collectives, log.calls))
        return out

    inner.step = logged_step
    for step in range(steps):
        lrs.append(engine.get_lr()[0])
        for micro in range(gas):
            ids = data[step * gas + micro][rank * per : (rank + 1) * per]
            poison["on"] = poison_step == step and rank == world - 1
            loss = engine(ids.to(engine.device))
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        skipped.append(bool(getattr(engine.optimizer, "overflow", False)) or bool(inner.last_step_skipped))
        if poison_step is not None:
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters()),
                                                   enabled=cfg["zero_optimization"]["stage"] == 3):
                snap = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
            out_snaps.append(snap)
    weights = {}
    stage = cfg["zero_optimization"]["stage"]
    masters = {}  # stage 0 + bf16: FP16_UnfusedOptimizer keeps fp32 masters beside the bf16 params
    for lows, highs in zip(getattr(engine.optimizer, "fp16_groups", []), getattr(engine.optimizer, "fp32_groups", [])):
        masters.update({id(lo): hi for lo, hi in zip(lows, highs)})
    for name, p in engine.module.named_parameters():
        if stage == 0:
            weights[name] = masters.get(id(p), p).detach().float().clone()
        else:
            weights[name] = deepspeed.utils.safe_get_full_fp32_param(p).detach().clone()
    module_weights = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    # (ZeRO-3 empties the inner groups' params between steps, so read the state itself; SinkGD's
    # matrices have none, so every exp_avg here belongs to the AdamW fallback)
    adam_state = sum(st["exp_avg"].numel() for st in inner.state.values() if "exp_avg" in st)
    out = dict(weights=weights, module_weights=module_weights, adam_state=adam_state, losses=losses, lrs=lrs, comm=comm,
               kinds=[g["kind"] for g in inner.param_groups],
               inner=type(inner).__name__, wrapper=type(engine.optimizer).__name__, skipped=skipped,
               snaps=out_snaps, group_lrs=[g["lr"] for g in inner.param_groups])
    engine.destroy() if hasattr(engine, "destroy") else None
    return out


def run_configs(rank: int, world: int, configs: list[tuple[str, dict, dict]], run=None) -> dict:
    """Every ``(key, config, kwargs)`` in one process group: ``run(key, config, kwargs)`` (default: :func:`train`),
    a failure reported under its key while the others go on."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for key, cfg, kw in configs:
        try:
            results[key] = run(key, cfg, kw) if run is not None else train(cfg, **kw)
        except Exception as e:  # noqa: BLE001 - reported per config
            results[key] = {"error": f"{type(e).__name__}: {e}"}
    return results
