"""LLaMA pretraining with SinkGD / SCALE / SWAN (or AdamW) on a DeepSpeed engine.

    deepspeed --num_gpus 2 launch/pretrain.py --deepspeed_config configs/zero2_sinkgd.json --model tiny
    deepspeed --num_gpus 4 launch/pretrain.py --deepspeed_config configs/zero2_sinkgd.json --tp 2   # AutoTP
    torchrun --nproc_per_node 2 launch/pretrain.py --deepspeed_config configs/zero2_sinkgd.json
    mpirun -np 2 python launch/pretrain.py --deepspeed_config configs/zero2_sinkgd.json

Model size, steps, batch, schedule and data come from configs/models/<model>.json plus overrides
(--steps, --data, --set section.key=value); the optimizer and ZeRO stage from the DeepSpeed JSON.
Config and data problems are reported before any process group starts. See docs/main_job.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `launch` importable

from launch import plan  # noqa: E402
from launch.config import ROOT, ConfigError, add_run_control_args, run_entry  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deepspeed_config", default=str(ROOT / "configs" / "zero2_sinkgd.json"),
                    help="DeepSpeed JSON: optimizer, ZeRO stage, precision, monitor (default: %(default)s)")
    ap.add_argument("--model", default="tiny", help="tiny | 60m | 130m | 350m | 1b | 7b (configs/models) or a JSON")
    ap.add_argument("--data", default=None, help="shakespeare (default) | english | FILE[,FILE|DIR] | hf:DIR[:SPLIT] | "
                    "megatron:PREFIX (sets data.source)")
    ap.add_argument("--steps", type=int, default=None, help="sets train.steps")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override any run-config key, e.g. --set train.batch_size=32 (repeatable)")
    ap.add_argument("--micro_batch", type=int, default=None, help="sets train_micro_batch_size_per_gpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 weights/activations (the papers' precision; GPU)")
    ap.add_argument("--pure_bf16", action="store_true",
                    help="bf16 weights, gradients and optimizer state with no fp32 master copy (DeepSpeed "
                    "bf16_master_weights_and_grads + bf16_optimizer_states, ZeRO 1-3); our optimizers round their "
                    "updates stochastically (docs/precision.md)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per group, through DeepSpeed's AutoTP "
                    "(q/k/v/gate/up cut by output, o/down by input; ZeRO shards over the data-parallel ranks; "
                    "sets tensor_parallel.autotp_size)")
    ap.add_argument("--out", default=None, help="run directory (default runs/<model>-<optimizer>-zero<stage>)")
    add_run_control_args(ap)
    ap.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return ap.parse_args(argv)


def map_mpi_env() -> None:
    """Under plain mpirun: torch.distributed env from Open MPI's, on loopback (DeepSpeed's own MPI discovery
    picks `hostname -I`, which is not always reachable)."""
    if "OMPI_COMM_WORLD_RANK" in os.environ and "RANK" not in os.environ:
        os.environ.update(RANK=os.environ["OMPI_COMM_WORLD_RANK"], WORLD_SIZE=os.environ["OMPI_COMM_WORLD_SIZE"],
                          LOCAL_RANK=os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")


def prepare(args: argparse.Namespace, tensor_parallel: int | None = None, engine: str = "deepspeed") -> dict[str, Any]:
    """The shared plan (launch/plan.py) with this entry's AutoTP (``--tp``)."""
    return plan.prepare(args, tensor_parallel, engine, adjust=with_autotp if engine == "deepspeed" else None)


def with_autotp(ds: dict[str, Any], ds_path: Path, run: dict[str, Any], tp: int) -> dict[str, Any]:
    """``--tp N`` as DeepSpeed's AutoTP (``tensor_parallel.autotp_size``), checked against the JSON and the model
    before any process group: a JSON that asks for another size, SWAN (whose whitening needs whole matrices) or
    fewer key-value heads than TP ranks is refused by name."""
    given = ds.get("tensor_parallel", {}).get("autotp_size")
    if given not in (None, 0, 1, tp):
        raise ConfigError(f"{ds_path.name}: tensor_parallel.autotp_size={given} but --tp={tp}; set the "
                          "tensor-parallel size in one place (--tp)")
    if tp == 1:
        return ds
    optimizer = str(ds.get("optimizer", {}).get("type", "")).lower()
    if optimizer == "swan":
        raise ConfigError(f"--tp={tp}: {ds_path.name} asks for SWAN, whose whitening needs whole matrices; use "
                          "SinkGD or SCALE with tensor parallelism, or --tp 1")
    m = run["model"]
    kv = m.get("num_key_value_heads") or m["num_attention_heads"]
    if kv < tp:
        raise ConfigError(f"--tp={tp}: model.num_key_value_heads={kv} is smaller (AutoTP cuts attention by "
                          "key-value heads); allowed: --tp <= the key-value head count")
    # (DeepSpeed 0.19.8 checks train_batch_size against micro x accumulation x *all* ranks before AutoTP has made
    # its groups, so the batch is given by those two alone; the ranks of a TP group share their micro-batches)
    ds = {k: v for k, v in ds.items() if k != "train_batch_size"}
    return {**ds, "tensor_parallel": {**ds.get("tensor_parallel", {}), "autotp_size": tp}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    map_mpi_env()

    def train(plan: dict[str, Any]) -> int:
        from launch import runstate
        from launch.trainer import train as train_on_deepspeed  # deepspeed is imported only after the checks

        runstate.leave(train_on_deepspeed(plan, args, tensor_parallel=args.tp))  # (group down, files written)

    return run_entry(lambda: prepare(args), train)


if __name__ == "__main__":
    sys.exit(main())
