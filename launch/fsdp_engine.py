"""The main job on torch's FSDP2: a small engine with the part of DeepSpeed's engine interface the training
loop (``launch/trainer.py``) uses, so both entries share the loop, config, data, checkpoint and report code.

Every decoder layer and then the whole model go through ``fully_shard`` over all ranks (bf16
``MixedPrecisionPolicy`` with ``--bf16``); our optimizer is built as a user would build it,
``SinkGD(model.named_parameters(), **params)`` from the same JSON's ``"optimizer"`` section, with the JSON's
``"scheduler"`` (DeepSpeed's schedule classes work on any torch optimizer), gradient accumulation and
clipping. Checkpoints are ``torch.distributed.checkpoint`` directories (model, optimizer, scheduler and the
loop's state) under the same ``checkpoints/<tag>`` + ``latest`` layout as the DeepSpeed entry. Loading one runs
nothing from it: ``engine.pt`` holds plain values only and is read with ``weights_only=True``, and DCP's own
pickles (``.metadata``, non-tensor entries) are checked by ``sinkgd_ds.safe_load`` before ``dcp.load`` reads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sinkgd_ds import safe_load


class FSDPEngine:
    """``engine(**batch)``, ``backward``, ``step`` (the optimizer steps every ``gradient_accumulation_steps``
    micro-steps), ``get_lr``, ``save_checkpoint`` / ``load_checkpoint``: as DeepSpeed's engine."""

    layout_label = "FSDP2"

    def __init__(self, model: torch.nn.Module, ds_cfg: dict[str, Any], tensor_parallel: int = 1):
        from deepspeed.runtime import lr_schedules
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from sinkgd_ds.registry import lookup

        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else \
            torch.device("cpu")
        model.to(self.device)
        world = dist.get_world_size()
        if tensor_parallel > 1:  # FSDP over "dp" x tensor parallelism over "tp" (torchtitan's LLaMA plan)
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            full = init_device_mesh(self.device.type, (world // tensor_parallel, tensor_parallel),
                                    mesh_dim_names=("dp", "tp"))
            plan = {f"self_attn.{p}_proj": ColwiseParallel() for p in "qkv"}
            plan.update({"self_attn.o_proj": RowwiseParallel(), "mlp.gate_proj": ColwiseParallel(),
                         "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()})
            for layer in model.model.layers:
                parallelize_module(layer, full["tp"], plan)
            mesh = full["dp"]
        else:
            mesh = init_device_mesh(self.device.type, (world,))
        self.data_parallel_rank, self.data_parallel_size = mesh.get_local_rank(), mesh.size()
        self.layout_label = "FSDP2" if tensor_parallel == 1 else f"FSDP2 x TP{tensor_parallel}"
        bf16 = bool(ds_cfg.get("bf16", {}).get("enabled"))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        self.module = model
        opt = ds_cfg["optimizer"]
        entry = lookup(opt["type"])
        params = dict(opt.get("params", {}))
        if entry is None:  # (AdamW, the baseline: torch's own)
            params.pop("torch_adam", None)
            self.basic_optimizer = torch.optim.AdamW(model.parameters(), **params)
        else:
            self.basic_optimizer = entry.cls(model.named_parameters(), **params)
        sched = ds_cfg.get("scheduler")
        self.scheduler = getattr(lr_schedules, sched["type"])(self.basic_optimizer, **sched.get("params", {})) \
            if sched else None
        self.micro_batch = ds_cfg["train_micro_batch_size_per_gpu"]
        self.accumulation = ds_cfg.get("gradient_accumulation_steps", 1)
        self.clipping = float(ds_cfg.get("gradient_clipping", 0.0) or 0.0)
        self.monitor = None  # (the DeepSpeed entry's csv / tensorboard monitor is DeepSpeed's; not here)
        self.micro_steps = 0

    # ------------------------------------------------------------------ the loop's interface
    def __call__(self, **batch: Any) -> Any:
        return self.module(**batch)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.accumulation:
            return
        if self.clipping > 0:
            self._clip_gradients(self.clipping)
        self.basic_optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.basic_optimizer.zero_grad(set_to_none=True)

    def _clip_gradients(self, max_norm: float) -> None:
        """Global-norm clipping over parameters that may live on different meshes (FSDP x TP: torch's
        clip_grad_norm_ cannot stack norms of DTensors from two meshes): each squared norm is completed on its
        own mesh, then summed."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        squares = [g.float().square().sum() for g in grads]
        total = torch.stack([s.full_tensor() if hasattr(s, "full_tensor") else s for s in squares]).sum().sqrt()
        coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))  # (one host read per step)
        for g in grads:
            g.mul_(coef)

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.basic_optimizer.param_groups]

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.micro_batch

    def gradient_accumulation_steps(self) -> int:
        return self.accumulation

    def zero_optimization_stage(self) -> str:
        return self.layout_label

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, directory: str, tag: str, client_state: dict[str, Any], save_latest: bool = True) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        path = Path(directory) / tag
        msd, osd = get_state_dict(self.module, self.basic_optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))
        if dist.get_rank() == 0:
            torch.save({"scheduler": self.scheduler.state_dict() if self.scheduler else None,
                        "micro_steps": self.micro_steps, "client_state": client_state}, path / "engine.pt")
            if save_latest:  # (after every rank's files: dcp.save ends collectively)
                (Path(directory) / "latest").write_text(tag)
        dist.barrier()

    def load_checkpoint(self, directory: str, tag: str | None = None) -> tuple[str | None, dict[str, Any] | None]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        latest = Path(directory) / "latest"
        if tag is None and not latest.is_file():
            return None, None
        path = Path(directory) / (tag or latest.read_text().strip())
        safe_load.check_directory(path)  # (dcp.load unpickles .metadata and non-tensor entries unrestricted)
        msd, osd = get_state_dict(self.module, self.basic_optimizer)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(self.module, self.basic_optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        extra = read_engine_state(path)
        if self.scheduler is not None and extra["scheduler"] is not None:
            self.scheduler.load_state_dict(extra["scheduler"])
        self.micro_steps = extra["micro_steps"]
        return str(path), extra["client_state"]


def read_engine_state(path: Path) -> dict[str, Any]:
    """``<checkpoint>/engine.pt`` (scheduler state, micro-step count, the loop's client state: dicts, lists, numbers,
    strings), read with ``weights_only=True``: a file that would need more is refused by name
    (:class:`sinkgd_ds.safe_load.UnsafeCheckpointError`) and nothing in it runs."""
    return safe_load.load(path / "engine.pt")
