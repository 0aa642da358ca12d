"""Randomized kill / resume trials of the main job: does a job killed with SIGKILL at a random moment, then
resumed, end with the uninterrupted run's losses bit for bit?

    python tools/fault_trials.py --trials 10 --seed 0                    # DeepSpeed entry, ZeRO-2 SinkGD
    python tools/fault_trials.py --trials 4 --entry megatron             # Megatron entry, distributed optimizer

Each trial draws a victim rank, a step and a moment: "step" (as rank 0 reports that step) or "save" (the
instant the next checkpoint's ``step<N>.partial`` directory appears after that step, i.e. inside a save). The
victim gets SIGKILL from outside (a real ``kill -9``), the launcher tears the others down, and the job is
relaunched with ``--resume`` (or afresh if no checkpoint was complete yet) until it finishes. A trial passes when
the final losses and val losses equal the uninterrupted run's exactly, no ``.partial`` directory is left and every
kept checkpoint checks out against its manifest. Prints one line per trial and a summary; writes
<out>/trials.json; exits 1 if any trial failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launch import manifest  # noqa: E402
from launch.local_jobs import CPU_ENV, free_port, kill_marked, marked_processes  # noqa: E402

STEP_LINE = re.compile(r"^step\s+(\d+)\s+loss", re.M)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0, help="draws of the trials (victim, moment, step)")
    ap.add_argument("--entry", choices=("deepspeed", "megatron"), default="deepspeed")
    ap.add_argument("--world", type=int, default=2, help="ranks (one node)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--every", type=int, default=3, help="checkpoint every N steps")
    ap.add_argument("--out", default=str(ROOT / "runs" / "fault_trials"))
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed for one launch")
    args = ap.parse_args(argv)
    for key in ("trials", "world", "steps", "every"):
        if getattr(args, key) < 1:
            ap.error(f"--{key}={getattr(args, key)} must be >= 1")
    if args.steps < 3:
        ap.error(f"--steps={args.steps} must be >= 3 (a kill needs a step before and after it)")
    return args


def job_command(args: argparse.Namespace, out: Path) -> list[str]:
    torchrun = str(Path(sys.executable).parent / "torchrun")
    common = ["--model", "tiny", "--steps", str(args.steps), "--set", f"eval.every={max(1, args.steps // 2)}",
              "--set", "eval.sequences=8", "--set", "train.log_every=1", "--set", "checkpoint.keep=2",
              "--no_progress", "--out", str(out)]
    if args.entry == "deepspeed":
        script = ["launch/pretrain.py", "--deepspeed_config", "configs/zero2_sinkgd.json",
                  "--set", f"checkpoint.every={args.every}"]
    else:
        import torch

        entry = "launch/pretrain_megatron.py" if torch.cuda.is_available() else "tests/main_job_megatron_cpu.py"
        script = [entry, "--use_distributed_optimizer", "--save_every", str(args.every)]
    return [torchrun, "--nproc_per_node", str(args.world), "--master_port", str(free_port()), *script, *common]


class Job:
    """One launch, its output in <out>.log, every process it starts marked in its environment."""

    def __init__(self, cmd: list[str], log: Path):
        marker = uuid.uuid4().hex
        self.marker = f"SINKGD_DS_FAULT_JOB={marker}".encode()
        env = {**os.environ, **CPU_ENV, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
               "SINKGD_DS_FAULT_JOB": marker}
        self.log = log
        self.file = open(log, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.file, stderr=subprocess.STDOUT, text=True)

    def steps_seen(self) -> int:
        found = STEP_LINE.findall(self.log.read_text(errors="replace"))
        return int(found[-1]) if found else 0

    def rank_pid(self, rank: int) -> int | None:
        """The training process of ``rank`` (its environment carries RANK and our marker)."""
        ranks = [pid for pid, env in marked_processes(self.marker) if f"RANK={rank}".encode() in env]
        return min(ranks) if ranks else None  # (the rank starts before any helper it forks)

    def finish(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = -1
        self.proc.kill()
        kill_marked(self.marker)  # (helpers a killed rank orphaned)
        self.file.close()
        return rc


def kill_during(job: Job, args: argparse.Namespace, mode: str, step: int, rank: int, ckpt: Path) -> dict[str, Any]:
    """Wait for the moment, then SIGKILL the victim. Returns what happened."""
    deadline = time.time() + args.timeout
    while time.time() < deadline and job.proc.poll() is None and job.steps_seen() < step:
        time.sleep(0.05)
    while mode == "save" and time.time() < deadline and job.proc.poll() is None:  # (the next save after that step)
        if any(ckpt.glob("step*.partial")):
            break
        time.sleep(0.001)
    in_save = any(ckpt.glob("step*.partial"))
    pid = job.rank_pid(rank)
    if job.proc.poll() is not None or pid is None:
        return {"killed": False, "at_step": job.steps_seen(), "in_save": in_save}
    os.kill(pid, signal.SIGKILL)
    return {"killed": True, "at_step": job.steps_seen(), "in_save": in_save}


def complete(args: argparse.Namespace, out: Path, logs: Path, first: int) -> tuple[int, list[int]]:
    """Relaunch until the run finishes: --resume when a checkpoint is there, else afresh. Returns the launches and
    the steps they resumed from."""
    resumed = []
    for attempt in range(first, first + 3):
        latest = out / "checkpoints" / "latest"
        extra = ["--resume"] if latest.is_file() else ["--overwrite"]
        if latest.is_file():
            resumed.append(int(latest.read_text().strip()[4:]))
        job = Job(job_command(args, out) + extra, logs / f"launch{attempt}.log")
        if job.finish(args.timeout) == 0:
            return attempt, resumed
    raise RuntimeError(f"{out}: did not finish in 3 relaunches; see {logs}")


def checkpoints_sound(out: Path) -> list[str]:
    ckpt = out / "checkpoints"
    problems = [f"left behind: {p.name}" for p in ckpt.glob("step*.partial")]
    for tag in manifest.kept_tags(ckpt):
        problems += manifest.check(ckpt / tag, {})
    return problems


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    print(f"reference: {args.entry} entry, tiny, {args.world} ranks, {args.steps} steps, checkpoint every "
          f"{args.every}", flush=True)
    ref_out = root / "reference"
    ref_out.mkdir()
    if Job(job_command(args, ref_out), ref_out / "launch.log").finish(args.timeout) != 0:
        print(f"the uninterrupted run failed: see {ref_out / 'launch.log'}", file=sys.stderr)
        return 2
    ref = json.loads((ref_out / "summary.json").read_text())
    rng = random.Random(args.seed)
    results = []
    for i in range(args.trials):
        mode, rank = rng.choice(("step", "save")), rng.randrange(args.world)
        step = rng.randint(1, args.steps - 1)
        out = root / f"trial{i}"
        logs = out.parent / f"trial{i}-logs"
        logs.mkdir()
        job = Job(job_command(args, out), logs / "launch0.log")
        what = kill_during(job, args, mode, step, rank, out / "checkpoints")
        rc = job.finish(args.timeout)
        launches, resumed = complete(args, out, logs, 1)
        final = json.loads((out / "summary.json").read_text())
        problems = checkpoints_sound(out)
        exact = final["losses"] == ref["losses"] and final["val"] == ref["val"]
        row = {"trial": i, "mode": mode, "victim": rank, "drawn_step": step, **what, "killed_rc": rc,
               "resumed_from": resumed, "launches": launches + 1, "exact": exact, "problems": problems}
        results.append(row)
        where = "inside a save" if what["in_save"] else f"after step {what['at_step']}"
        verdict = "EXACT" if exact and not problems else "DIFFERENT" if not exact else "DAMAGED CHECKPOINT"
        print(f"trial {i}: rank {rank} {'killed ' + where if what['killed'] else 'not killed (run ended first)'}"
              f"; resumed from {resumed or 'scratch'}; {verdict}" + "".join(f"\n    {p}" for p in problems),
              flush=True)
    killed = [r for r in results if r["killed"]]
    good = [r for r in results if r["exact"] and not r["problems"]]
    print(f"{len(good)}/{len(results)} trials ended with the uninterrupted run's losses bit for bit "
          f"({len(killed)} with a rank killed, {sum(r['in_save'] for r in killed)} of them inside a save)", flush=True)
    (root / "trials.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0 if len(good) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
