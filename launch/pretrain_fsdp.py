"""LLaMA pretraining with SinkGD / SCALE / SWAN (or AdamW) on torch's FSDP2 (``fully_shard``).

    torchrun --nproc_per_node 2 launch/pretrain_fsdp.py --config configs/zero2_sinkgd.json --model tiny

The same run configs (configs/models), data, checkpoint layout, progress, summary and loss plot as the
DeepSpeed entry (launch/pretrain.py), and the same JSON for the optimizer, schedule, micro-batch, clipping
and bf16 (its ZeRO and monitor sections are DeepSpeed's and are not used here). Every decoder layer is
sharded over all ranks; our optimizer reads the layouts from the DTensor parameters by itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `launch` importable

from launch.config import ROOT, ConfigError, add_run_control_args, run_entry  # noqa: E402
from launch.plan import prepare  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", dest="deepspeed_config", default=str(ROOT / "configs" / "zero2_sinkgd.json"),
                    help="JSON with optimizer, scheduler, micro batch, clipping, bf16 (default: %(default)s)")
    ap.add_argument("--model", default="tiny", help="tiny | 60m | 130m | 350m | 1b | 7b (configs/models) or a JSON")
    ap.add_argument("--data", default=None, help="as launch/pretrain.py (sets data.source)")
    ap.add_argument("--steps", type=int, default=None, help="sets train.steps")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override any run-config key (repeatable)")
    ap.add_argument("--micro_batch", type=int, default=None, help="sets train_micro_batch_size_per_gpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 MixedPrecisionPolicy (fp32 sharded parameters)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per group (FSDP x TP on a 2-D mesh; "
                    "attention and MLP projections column/row-parallel as in torchtitan)")
    ap.add_argument("--out", default=None, help="run directory (default runs/<model>-<config>-fsdp2)")
    add_run_control_args(ap)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out is None:
        args.out = str(ROOT / "runs" / f"{Path(args.model).stem}-{Path(args.deepspeed_config).stem}-fsdp2")

    def train(plan):
        from launch import runstate
        from launch.trainer import train as train_loop  # torch.distributed starts only after the checks

        runstate.leave(train_loop(plan, args, fsdp=True, tensor_parallel=args.tp))

    def checked():
        plan = prepare(args, args.tp, engine="fsdp")
        m = plan["run"]["model"]
        for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            value = m.get(key) or m["num_attention_heads"]
            if value % args.tp:
                raise ConfigError(f"--tp={args.tp}: model.{key}={value} is not divisible by it")
        return plan

    return run_entry(checked, train)


if __name__ == "__main__":
    sys.exit(main())
