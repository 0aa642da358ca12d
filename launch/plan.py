"""Set-up shared by the DeepSpeed and FSDP2 entries: the run plan, checked before any process group starts.

The run config, the DeepSpeed-format JSON (optimizer, schedule, micro-batch, clipping, bf16), the run directory,
the data and the identity a checkpoint records; with ``--resume``, the checkpoint to resume from. Each entry adds
only what is its own (the DeepSpeed entry's AutoTP, the FSDP2 entry's divisibility checks) through ``adjust``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launch.config import ROOT, ConfigError, check_stop_at_step, load_run_config, resolve_ds_config, world_size_from_env

DsAdjust = Callable[[dict[str, Any], Path, dict[str, Any], int], dict[str, Any]]


def prepare(args: argparse.Namespace, tensor_parallel: int | None = None, engine: str = "deepspeed",
            adjust: DsAdjust | None = None) -> dict[str, Any]:
    """Everything that can fail on bad input, before any process group starts (``tensor_parallel``: ranks per
    tensor-parallel group, by default ``args.tp``; the batch is split over the other, data-parallel, dimension;
    ``engine``: "deepspeed" or "fsdp", which decides what a resumed checkpoint must share with this run;
    ``adjust(ds, ds_path, run, tensor_parallel)``: the entry's own changes to the resolved JSON)."""
    from launch import runstate
    from launch.data import check_lengths, load_tokens

    tensor_parallel = getattr(args, "tp", 1) if tensor_parallel is None else tensor_parallel

    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.data is not None:
        overrides.append(f"data.source={args.data}")
    run = load_run_config(args.model, overrides)
    ds_path = Path(args.deepspeed_config)
    world = world_size_from_env()
    if tensor_parallel < 1 or world % tensor_parallel:
        raise ConfigError(f"--tp={tensor_parallel} must be a positive divisor of the world size {world}")
    world //= tensor_parallel
    model_name = Path(args.model).stem
    out = Path(args.out) if args.out else ROOT / "runs" / f"{model_name}-{ds_path.stem}"
    ds = resolve_ds_config(ds_path, run, out, args.micro_batch, args.bf16, world, getattr(args, "pure_bf16", False))
    if adjust is not None:
        ds = adjust(ds, ds_path, run, tensor_parallel)
    runstate.prepare_out_dir(out, args.resume, args.overwrite)
    check_stop_at_step(args.stop_at_step, run["train"]["steps"])
    d = run["data"]
    data = load_tokens(d["source"], d["vocab_size"], d["val_fraction"], d["tokenizer"], d["text_column"])
    check_lengths(data, run["train"]["seq_len"], run["eval"]["sequences"] if run["eval"]["every"] else 0)
    identity = checkpoint_identity(engine, run, ds, data, world, tensor_parallel)
    plan = {"run": run, "ds": ds, "data": data, "out": out, "world": world, "model_name": model_name,
            "ds_name": ds_path.name, "identity": identity, "resume_from": None, "rejected": {}}
    if args.resume:
        # ZeRO partitions (stage >= 1) load only at the data-parallel size that wrote them; DCP (FSDP2) reshards
        must = ["engine", "model", "vocab_size", "data_sha256", "optimizer", "precision"] + \
            (["zero_stage", "tensor_parallel"] + (["data_parallel"] if identity["zero_stage"] else [])
             if engine == "deepspeed" else [])
        plan["resume_from"], plan["rejected"] = runstate.select_resume(
            out, {k: identity[k] for k in must}, args.resume_fallback)
    return plan


def precision(ds: dict[str, Any]) -> str:
    """fp32, bf16 (bf16 compute, fp32 masters) or pure-bf16 (no fp32 copy anywhere), from the DeepSpeed JSON."""
    bf16 = ds.get("bf16", {})
    if not bf16.get("enabled"):
        return "fp32"
    return "pure-bf16" if bf16.get("bf16_master_weights_and_grads") else "bf16"


def checkpoint_identity(engine: str, run: dict[str, Any], ds: dict[str, Any], data: Any, data_parallel: int,
                        tensor_parallel: int) -> dict[str, Any]:
    """What a checkpoint records about the run that wrote it (launch/manifest.py)."""
    return {"engine": engine, "model": run["model"], "vocab_size": data.vocab_size, "data_sha256": data.sha256,
            "optimizer": str(ds["optimizer"]["type"]).lower(), "precision": precision(ds),
            "zero_stage": int(ds.get("zero_optimization", {}).get("stage", 0)) if engine == "deepspeed" else None,
            "data_parallel": data_parallel, "tensor_parallel": tensor_parallel}


