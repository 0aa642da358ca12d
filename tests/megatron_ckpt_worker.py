"""Worker side of the Megatron checkpoint tests: save / load through megatron's distributed checkpointing.

Save and load call megatron-core the way Megatron-LM's ``megatron/training/checkpointing.py`` does
(read at NVIDIA/Megatron-LM main d98e8a64): ``generate_state_dict`` builds
``{"model": model.sharded_state_dict(metadata), "optimizer": optimizer.sharded_state_dict(state_dict,
metadata)}`` (the optimizer receives the whole dict), ``dist_checkpointing.save`` writes it with the
torch_dist strategy wrapped in ``FullyParallelSaveStrategyWrapper`` over the data-parallel group;
loading builds the same dict with ``is_loading=True``, ``dist_checkpointing.load``, then
``model.load_state_dict(sd["model"])`` and ``optimizer.load_state_dict(sd["optimizer"])``.

Per plan item (a save layout and the layouts to resume at): an uninterrupted run of STEPS steps;
a run of SPLIT steps that saves; for each resume layout a fresh model and optimizer (other initial
weights, so the load must overwrite them) that load and train the remaining steps.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .megatron_worker import build, build_model, global_losses, masters, reference, tp_dim, train

STEPS, SPLIT = 6, 3


def _metadata(dist_opt: bool) -> dict:
    """Megatron-LM's ``_build_sharded_state_dict_metadata`` for --ckpt-format torch_dist (default flags)."""
    from megatron.core import parallel_state as ps

    md = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
          "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}
    if dist_opt:
        md["distrib_optim_sharding_type"] = "dp_reshardable"  # Megatron-LM's default; ours saves its own layout
    return md


def _state_dict(model, opt, dist_opt: bool, is_loading: bool) -> dict:
    """``generate_state_dict``: the model's part from the unwrapped model (Megatron-LM ``unwrap_model``)."""
    md = _metadata(dist_opt)
    sd = {"model": model.sharded_state_dict(metadata=md), "iteration": SPLIT}
    sd["optimizer"] = opt.sharded_state_dict(sd, is_loading=is_loading, metadata=md)
    return sd


def save(model, opt, dist_opt: bool, ckpt_dir: str) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    if dist.get_rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    dist.barrier()
    sd = _state_dict(model, opt, dist_opt, is_loading=False)
    strategy = FullyParallelSaveStrategyWrapper(TorchDistSaveShardedStrategy("torch_dist", 1),
                                                ps.get_data_parallel_group(with_context_parallel=True))
    content = {k: v for k, v in _metadata(dist_opt).items() if k != "dp_cp_group"}
    dist_checkpointing.save(sd, ckpt_dir, strategy, content_metadata=content)
    dist.barrier()


def load(model, ddp, opt, dist_opt: bool, ckpt_dir: str, with_optimizer: bool = True) -> int:
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    sd = _state_dict(model, opt, dist_opt, is_loading=True)
    if not with_optimizer:
        sd.pop("optimizer")
    strategy = FullyParallelLoadStrategyWrapper(TorchDistLoadShardedStrategy(),
                                                ps.get_data_parallel_group(with_context_parallel=True))
    loaded = dist_checkpointing.load(sd, ckpt_dir, strategy)
    ddp.load_state_dict(loaded["model"])
    if with_optimizer:
        opt.load_state_dict(loaded["optimizer"])
    else:
        opt.reload_model_params()
    return int(loaded["iteration"])


def snapshot(model, opt) -> dict[str, dict[str, torch.Tensor]]:
    """Per model param (TP-local, complete over DP): fp32 main param and every optimizer state tensor."""
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer import DistributedOptimizer

    from megatron_patch.wrappers import state_keys

    inner = opt.chained_optimizers[0]
    out: dict[str, dict[str, torch.Tensor]] = {}
    if isinstance(inner, DistributedOptimizer):
        for n, p in model.named_parameters():
            local = inner._local_tensors(p)
            rng = inner._get_model_param_range_map(p)["param"] if local is not None else None
            out[n] = {}
            for key in ("param", *state_keys(inner._kind_of[p])):
                full = torch.zeros(p.numel(), dtype=torch.float32)
                if local is not None:
                    full[rng.start:rng.end] = local[key].detach().float()
                dist.all_reduce(full, group=ps.get_data_parallel_group())
                out[n][key] = full.view(p.shape)
        return out
    main_of = {id(p): p for p in model.parameters()}
    for models, mains in zip(getattr(inner, "float16_groups", []), getattr(inner, "fp32_from_float16_groups", [])):
        main_of.update({id(m): q for m, q in zip(models, mains)})
    for n, p in model.named_parameters():
        main = main_of[id(p)]
        st = inner.optimizer.state.get(main, {})
        out[n] = {"param": main.detach().float().clone(),
                  **{k: v.detach().float().clone() for k, v in st.items() if k != "step"}}
    return out


def _record(model, opt, local_losses: list[float], layout: dict, loaded: dict | None = None) -> dict:
    from megatron.core import parallel_state as ps

    inner = opt.chained_optimizers[0]
    return {"losses": global_losses(local_losses), "weights": masters(model, opt), "layout": dict(layout),
            "tp": layout["tp"], "tp_rank": ps.get_tensor_model_parallel_rank(),
            "types": (type(inner).__name__, type(inner.optimizer).__name__), "loaded": loaded,
            "state_keys": sorted({k for s in inner.optimizer.state.values() for k in s}),
            "dims": {n: tp_dim(p) for n, p in model.named_parameters()}}


def ckpt_worker(rank: int, world: int, plan: list[dict], root: str) -> dict:
    from megatron.core import parallel_state as ps

    from . import megatron_cpu_shim

    ps.initialize_model_parallel(tensor_model_parallel_size=1)
    megatron_cpu_shim.install()
    full = {n: p.detach().clone() for n, p in build_model(1).named_parameters()}
    other = {n: (t * 0.5 + 0.01).contiguous() for n, t in full.items()}  # a fresh run's start, not the saved one
    out: dict = {"full": full if rank == 0 else None, "reference": {}, "items": {}}
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    for item in plan:
        label, save_at = item["label"], item["save"]
        key = (save_at.get("optimizer", "sinkgd"), save_at.get("bf16", False))
        if rank == 0 and not key[1] and key not in out["reference"]:
            out["reference"][key] = reference(full, STEPS, opt=key[0])
        res: dict = {}
        model, ddp, opt = build(full, **save_at)
        res["straight"] = _record(model, opt, train(model, ddp, opt, 0, STEPS), save_at)
        model, ddp, opt = build(full, **save_at)
        first = train(model, ddp, opt, 0, SPLIT)
        ckpt = os.path.join(root, label)
        save(model, opt, save_at["dist_opt"], ckpt)
        res["saved"] = {"losses": global_losses(first), "state": snapshot(model, opt),
                        "tp": save_at["tp"], "tp_rank": ps.get_tensor_model_parallel_rank(),
                        "dims": {n: tp_dim(p) for n, p in model.named_parameters()}}
        for name, at in item.get("refused", {}).items():  # must fail in load, with a clear message
            model, ddp, opt = build(other, **at)
            try:
                load(model, ddp, opt, at["dist_opt"], ckpt)
                res[name] = {"error": None}
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - the test checks the type
                res[name] = {"error": f"{type(e).__name__}: {e}"}
        for name, at in item["resume"].items():
            model, ddp, opt = build(other, **at)
            start = load(model, ddp, opt, at["dist_opt"], ckpt)
            loaded = snapshot(model, opt)
            res[name] = _record(model, opt, train(model, ddp, opt, start, STEPS), at, loaded)
        if item.get("control"):  # model weights loaded, optimizer state not: must NOT reproduce the run
            model, ddp, opt = build(other, **save_at)
            start = load(model, ddp, opt, save_at["dist_opt"], ckpt, with_optimizer=False)
            res["model-only"] = _record(model, opt, train(model, ddp, opt, start, STEPS), save_at)
        out["items"][label] = res
    ps.destroy_model_parallel()
    return out
