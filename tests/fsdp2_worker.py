"""One rank of the FSDP2 tests: OddLM under ``fully_shard`` (optionally with tensor parallelism or HSDP),
trained a few steps with our optimizer built as a user would (``SinkGD(model.named_parameters())``)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from sinkgd_ds import SCALE, SWAN, SinkGD

from .ds_model import make_model
from .ds_worker import CollectiveLog

CLASSES = {"SinkGD": SinkGD, "SCALE": SCALE, "SWAN": SWAN}


def shard(model, world: int, layout: str, mp: bool = False):
    """fsdp: 1-D mesh; hsdp: (replicate 2, shard world/2); fsdp_tp: (dp world/2, tp 2), up column-parallel and
    down row-parallel. Returns the data-parallel index and size of this rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mp else \
        MixedPrecisionPolicy()
    rank = dist.get_rank()
    if layout == "fsdp":
        mesh, dp, dp_size = init_device_mesh("cpu", (world,)), rank, world
    elif layout == "hsdp":
        mesh, dp, dp_size = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("rep", "shard")), rank, world
    elif layout == "fsdp_tp":
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        full = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
        # (the activation stays a DTensor between the two, so its uneven global size, 11, is kept)
        parallelize_module(model, full["tp"], {"up": ColwiseParallel(use_local_output=False),
                                               "down": RowwiseParallel()})
        mesh, dp, dp_size = full["dp"], rank // 2, world // 2
    else:
        raise ValueError(layout)
    for mod in (model.embed_tokens, model.norm, model.up, model.down, model.lm_head):
        fully_shard(mod, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return dp, dp_size


def train(world: int, opt: str, layout: str, data: list[torch.Tensor], hp: dict | None = None,
          poison_step: int | None = None, mp: bool = False, gas: int = 1) -> dict:
    """``data``: one batch per step, or with ``gas`` micro-batches per step, ``gas`` consecutive ones."""
    model = make_model()
    dp, dp_size = shard(model, world, layout, mp)
    optimizer = CLASSES[opt](model.named_parameters(), lr=0.02, **(hp or {}))
    placements = {n: str(p.placements) for n, p in model.named_parameters()}
    comm, skipped, snaps = [], [], []
    for step in range(len(data) // gas):
        optimizer.zero_grad()
        for batch in data[step * gas : (step + 1) * gas]:  # (FSDP2 accumulates the sharded gradients)
            per = batch.shape[0] // dp_size
            (model(batch[dp * per : (dp + 1) * per]) / gas).backward()
        if poison_step == step and dist.get_rank() == world - 1:  # a NaN in one rank's shard only
            model.up.weight.grad.to_local().view(-1)[0] = float("nan")
        with CollectiveLog() as log:
            optimizer.step()
        comm.append((optimizer.last_comm.collectives, log.calls))
        skipped.append(optimizer.last_step_skipped)
        snaps.append({n: p.full_tensor().detach().float().clone() for n, p in model.named_parameters()})
    state_types = sorted({type(v).__name__ for st in optimizer.state.values() for v in st.values()
                          if isinstance(v, torch.Tensor) and v.dim() > 0})
    return {"weights": snaps[-1], "snaps": snaps, "comm": comm, "skipped": skipped, "placements": placements,
            "kinds": optimizer.param_kinds(), "state_types": state_types, "skipped_steps": optimizer.skipped_steps}


def run(rank: int, world: int, configs: list[tuple[str, dict]]) -> dict:
    out = {}
    for key, kw in configs:
        try:
            out[key] = train(world, **kw)
        except Exception as e:  # noqa: BLE001 - reported per config
            import traceback

            out[key] = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"}
    return out


def checkpoint_run(rank: int, world: int, opt: str, layout: str, batches: list[torch.Tensor], path: str,
                   save_after: int | None = None, load: bool = False) -> dict:
    """Train on ``batches`` (from the checkpoint at ``path`` when ``load``), saving with
    torch.distributed.checkpoint after ``save_after`` steps; returns the full weights after each step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = make_model()
    dp, dp_size = shard(model, world, layout)
    optimizer = CLASSES[opt](model.named_parameters(), lr=0.02)
    if load:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    snaps = []
    for step, batch in enumerate(batches):
        per = batch.shape[0] // dp_size
        optimizer.zero_grad()
        model(batch[dp * per : (dp + 1) * per]).backward()
        optimizer.step()
        snaps.append({n: p.full_tensor().detach().clone() for n, p in model.named_parameters()})
        if save_after is not None and step + 1 == save_after:
            msd, osd = get_state_dict(model, optimizer)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    return {"snaps": snaps, "state_keys": sorted({k for st in optimizer.state.values() for k in st})}
