"""Worker side of tests/test_memory.py: real engines, one step, then ``account()`` between backward and step.

Each config builds the main job's model (launch/trainer.py or launch/pretrain_megatron.py ``build_model`` from a
configs/models run config; ``model="oddlm"``: tests/ds_model.py's OddLM for the hand count), takes one full step
(so lazily created optimizer state exists), runs forward and backward once more and accounts there (gradients
held), then steps. DeepSpeed configs run first, then FSDP2, then Megatron: Megatron's CPU shim
(tests/megatron_cpu_shim.py) stays installed once a Megatron config ran. A built HF model is kept and deep-copied
for the next config of the same shape (copying is cheaper than initialising the 60m model again).
"""

from __future__ import annotations

import copy
import os
import time
import warnings

import torch
import torch.distributed as dist

os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore")

SEQ = 8  # tokens per micro batch row: the memory accounted does not depend on it
DS_OPTIMIZERS = {"sinkgd": "SinkGD", "scale": "SCALE", "swan": "SWAN", "adamw": "AdamW"}
_BUILT: dict[tuple, torch.nn.Module] = {}


def run_config(model: str, vocab: int):
    from launch.config import load_run_config

    return load_run_config(model, [f"data.vocab_size={vocab}"])


def batch(vocab: int, step: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, SEQ), generator=torch.Generator().manual_seed(7 + step))


def ds_config(optimizer: str, stage: int, bf16: bool, grad_accum: str | None = None) -> dict:
    params = {"lr": 1e-3, "torch_adam": True} if optimizer == "adamw" else {"lr": 0.02, "lr_scale": 0.05}
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
           "optimizer": {"type": DS_OPTIMIZERS[optimizer], "params": params},
           "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16}, "steps_per_print": 10**9,
           "wall_clock_breakdown": False}
    if grad_accum:
        cfg["data_types"] = {"grad_accum_dtype": grad_accum}
    return cfg


def hf_model(model: str, vocab: int) -> torch.nn.Module:
    key = ("hf", model, vocab)
    if key not in _BUILT:
        if model == "oddlm":
            from .ds_model import make_model

            _BUILT[key] = make_model()
        else:
            from launch.trainer import build_model

            _BUILT[key] = build_model(run_config(model, vocab), vocab)
    return copy.deepcopy(_BUILT[key])


def loss_of(engine, ids: torch.Tensor, oddlm: bool) -> torch.Tensor:
    return engine(ids) if oddlm else engine(input_ids=ids, labels=ids).loss


def with_gather(acc: dict[str, int]) -> dict:
    from sinkgd_ds.memory import gather

    return {"account": acc, "gathered": gather(acc)}


def run_deepspeed(model: str, vocab: int, optimizer: str, stage: int, bf16: bool, grad_accum: str | None = None):
    import deepspeed

    import sinkgd_ds  # noqa: F401 - registers our optimizers with DeepSpeed
    from sinkgd_ds.memory import account

    net = hf_model(model, vocab)
    engine, _, _, _ = deepspeed.initialize(model=net, model_parameters=net.parameters(),
                                           config=ds_config(optimizer, stage, bf16, grad_accum))
    for step in range(2):
        engine.backward(loss_of(engine, batch(vocab, step).to(engine.device), model == "oddlm"))
        if step == 1:
            before = account(engine)
        engine.step()
    out = {**with_gather(before), "wrapper": type(engine.optimizer).__name__}
    engine.destroy()
    return out


def run_megatron(model: str, vocab: int, optimizer: str, distopt: bool, bf16: bool):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    import megatron_patch
    from launch.pretrain_megatron import build_model, lm_loss
    from megatron_patch.training import CONFIGS
    from sinkgd_ds.memory import account

    from . import megatron_cpu_shim

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=1)
    megatron_cpu_shim.install()
    net = build_model(run_config(model, vocab), vocab, 1, bf16)
    ddp = DistributedDataParallel(config=net.config, module=net, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=distopt))
    megatron_patch.apply(training=False)
    common = dict(lr=0.02, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8, clip_grad=0.0,
                  bf16=bf16, use_distributed_optimizer=distopt)
    config = OptimizerConfig(optimizer="adam", **common) if optimizer == "adamw" else CONFIGS[optimizer](**common)
    opt = get_megatron_optimizer(config, [ddp])
    for step in range(2):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        lm_loss(ddp, batch(vocab, step), torch.device("cpu")).backward()
        ddp.finish_grad_sync()
        if step == 1:
            before = account(opt, ddp)
            without_model = account(opt)
        ok, _, _ = opt.step()
        assert ok
    inner = opt.chained_optimizers[0] if hasattr(opt, "chained_optimizers") else opt
    return {**with_gather(before), "without_model": without_model, "wrapper": type(inner).__name__}


def run_fsdp2(model: str, vocab: int, optimizer: str, bf16: bool):
    """launch/fsdp_engine.py's engine (FSDP2 over every rank), built from the same JSON as DeepSpeed's."""
    from launch.fsdp_engine import FSDPEngine
    from sinkgd_ds.memory import account

    engine = FSDPEngine(hf_model(model, vocab), ds_config(optimizer, 0, bf16))
    for step in range(2):
        ids = batch(vocab, step)
        engine.backward(loss_of(engine, ids, False))
        if step == 1:
            before = account(engine)
        engine.step()
    return {**with_gather(before), "wrapper": type(engine.basic_optimizer).__name__}


RUNNERS = {"deepspeed": run_deepspeed, "fsdp2": run_fsdp2, "megatron": run_megatron}  # (in this order)


def worker(rank: int, world: int, configs: list[dict]) -> dict:
    """``configs``: dicts with ``label`` and ``engine`` (a key of RUNNERS) plus the runner's keywords."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    out = {}
    for cfg in sorted(configs, key=lambda c: list(RUNNERS).index(c["engine"])):
        cfg = dict(cfg)
        label, engine = cfg.pop("label"), cfg.pop("engine")
        start = time.perf_counter()
        out[label] = RUNNERS[engine](**cfg)
        dist.barrier()
        out[label]["seconds"] = time.perf_counter() - start
    return out
