"""A long run with non-finite gradients injected (issue 18 §2): does the job keep going, skip exactly the
poisoned steps, keep every non-finite value out of weights, optimizer state and checkpoints, end close to a clean
run, and hold its resident memory flat?

    python benchmarks/long_run.py                       # tiny, 1000 steps, 2 ranks, ZeRO-2 SinkGD, ~1 % injected
    python benchmarks/long_run.py --steps 200 --rate 0.05

Two runs of the main job, side by side, same seed: one clean, one through tools/inject_faults.py with
FAULT_NONFINITE (at about --rate of the steps one rank's gradient of one drawn parameter gets a NaN or an inf
element). Every --every steps a checkpoint is kept (all of them), then read back and checked for non-finite
tensors. Prints a report and writes it (Markdown + JSON) to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: make `launch` importable

from launch.local_jobs import run_main_job  # noqa: E402
from sinkgd_ds import safe_load  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=0.01, help="fraction of steps with an injected non-finite gradient")
    ap.add_argument("--seed", type=int, default=1, help="seed of the injection schedule")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--every", type=int, default=100, help="checkpoint and eval every N steps")
    ap.add_argument("--warmup", type=int, default=100, help="steps before resident memory is expected to be flat")
    ap.add_argument("--config", default="configs/zero2_sinkgd.json")
    ap.add_argument("--out", default=str(ROOT / "runs" / "long_run"))
    args = ap.parse_args(argv)
    if not 0 < args.rate < 1:
        ap.error(f"--rate={args.rate} must be in (0, 1)")
    if args.steps < 2 * args.every or args.every < 1:
        ap.error(f"--steps={args.steps} must be at least twice --every={args.every} (>= 1)")
    if not 0 < args.warmup < args.steps:
        ap.error(f"--warmup={args.warmup} must be in (0, --steps)")
    return args


def launch(args: argparse.Namespace, out: Path, faults: dict[str, str]) -> dict[str, Any]:
    return run_main_job(out, args.world, [
        "--deepspeed_config", args.config, "--model", "tiny", "--steps", str(args.steps),
        "--set", f"eval.every={args.every}", "--set", f"checkpoint.every={args.every}", "--set", "checkpoint.keep=0",
        "--set", "train.log_every=10"], script=("tools/inject_faults.py", "launch/pretrain.py"), env=faults)


def nonfinite_tensors(obj: Any, where: str = "") -> list[str]:
    """Paths of floating tensors holding a NaN or an inf, anywhere inside a loaded checkpoint object."""
    if isinstance(obj, torch.Tensor):
        return [where] if obj.is_floating_point() and not torch.isfinite(obj).all() else []
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in nonfinite_tensors(v, f"{where}/{k}")]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in nonfinite_tensors(v, f"{where}[{i}]")]
    return []


def checkpoint_report(out: Path) -> dict[str, Any]:
    """Every kept checkpoint's files read back: tensors checked, and the losses it carries finite."""
    bad, files = [], 0
    for tag in sorted((out / "checkpoints").glob("step*")):
        for f in sorted(tag.glob("*.pt")):
            files += 1
            bad += [f"{f.relative_to(out)}:{p}" for p in nonfinite_tensors(safe_load.load(f))]
    return {"files": files, "nonfinite": bad}


def memory_growth(rss_by_rank: list[list[list[int]]], warmup: int) -> list[dict[str, float]]:
    """Per rank: resident MiB at the end of warm-up and at the end, and the growth between (MiB and %)."""
    rows = []
    for samples in rss_by_rank:
        after = [(s, b) for s, b in samples if s >= warmup]
        first, last = after[0][1] / 2**20, after[-1][1] / 2**20
        peak = max(b for _, b in after) / 2**20
        rows.append({"at_warmup_mib": first, "at_end_mib": last, "max_after_warmup_mib": peak,
                     "growth_mib": last - first, "growth_pct": 100 * (last - first) / first})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    log = root / "schedule.json"
    print(f"long run: tiny, {args.steps} steps, {args.world} ranks, {args.config}; injected at ~{args.rate:.1%} of "
          f"the steps (seed {args.seed}); the clean run first", flush=True)
    clean = launch(args, root / "clean", {})
    injected = launch(args, root / "injected", {"FAULT_NONFINITE": f"{args.rate}:{args.seed}", "FAULT_LOG": str(log)})
    schedule = {int(k): v for k, v in json.loads(log.read_text()).items()}
    skipped = injected["skipped_steps"]
    ckpt = checkpoint_report(root / "injected")
    clean_val, val = clean["val_loss"], injected["val_loss"]
    memory = memory_growth(injected["resident_bytes_by_step"], args.warmup)
    result = {
        "steps": args.steps, "world": args.world, "config": args.config, "rate": args.rate, "seed": args.seed,
        "injections": len(schedule), "injected_steps": sorted(schedule), "skipped_steps": skipped,
        "skips_equal_injections": sorted(skipped) == sorted(schedule) and clean["skipped_steps"] == [],
        "injected_kinds": sorted({v["value"] for v in schedule.values()}),
        "injected_parameters": len({v["parameter"] for v in schedule.values()}),
        "losses_finite": all(math.isfinite(x) for x in injected["losses"]),
        "checkpoints": ckpt, "val_loss_clean": clean_val, "val_loss_injected": val,
        "val_loss_rel_diff": (val - clean_val) / clean_val, "memory_after_warmup": memory,
        "wall_seconds": {"clean": clean["wall_seconds"], "injected": injected["wall_seconds"]},
    }
    (root / "report.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# Long run: {args.steps} steps, non-finite gradients injected at ~{args.rate:.1%} of the steps",
        "",
        f"- injections: {len(schedule)} ({', '.join(result['injected_kinds'])}; {result['injected_parameters']} "
        f"different parameters, both ranks); steps {sorted(schedule)}",
        f"- skipped steps: {len(skipped)}; equal to the injected steps: **{result['skips_equal_injections']}** "
        "(the clean run skipped none)",
        f"- every logged loss finite: {result['losses_finite']}; checkpoints read back: {ckpt['files']} files, "
        f"non-finite tensors: **{len(ckpt['nonfinite'])}**",
        f"- final val loss: clean {clean_val:.4f}, injected {val:.4f} ({100 * result['val_loss_rel_diff']:+.2f} %)",
        f"- resident memory after warm-up (step {args.warmup}), per rank: " + "; ".join(
            f"{m['at_warmup_mib']:.0f} -> {m['at_end_mib']:.0f} MiB ({m['growth_mib']:+.1f} MiB, "
            f"{m['growth_pct']:+.2f} %, max {m['max_after_warmup_mib']:.0f})" for m in memory),
        f"- wall time: clean {clean['wall_seconds']:.0f} s, injected {injected['wall_seconds']:.0f} s",
    ]
    text = "\n".join(lines)
    (root / "report.md").write_text(text + "\n")
    print(text, flush=True)
    ok = result["skips_equal_injections"] and result["losses_finite"] and not ckpt["nonfinite"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
