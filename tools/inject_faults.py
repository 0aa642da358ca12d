"""Run a main-job script with faults injected, for the fault tests, tools/fault_trials.py and
benchmarks/long_run.py. The job's own code is unchanged: this wrapper patches it from outside, then runs it.

    torchrun --nproc_per_node 2 tools/inject_faults.py launch/pretrain.py --model tiny ...

Faults (environment variables, each optional):
  FAULT_KILL_AT_STEP=STEP:RANK   rank RANK kills itself with SIGKILL as it starts step STEP (1-based: the step
                                 that would become step STEP), before its forward pass
  FAULT_KILL_IN_SAVE=STEP:RANK   rank RANK kills itself with SIGKILL inside the save of checkpoint step<STEP>,
                                 right after its own files are written (the others wait at the barrier)
  FAULT_NONFINITE=RATE:SEED      at about RATE of the steps (drawn from SEED, at most one per step), one rank's
                                 gradient of one parameter gets a NaN or an inf element (DeepSpeed entry only);
                                 the schedule is written to $FAULT_LOG (JSON) by rank 0
"""

from __future__ import annotations

import json
import os
import random
import runpy
import signal
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _pair(var: str) -> tuple[int, int] | None:
    value = os.environ.get(var)
    if not value:
        return None
    step, rank = (int(x) for x in value.split(":"))
    return step, rank


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))


def _die(what: str) -> None:
    print(f"[inject_faults] rank {_rank()}: SIGKILL {what}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def nonfinite_schedule(rate: float, seed: int, steps: int, world: int, names: list[str]) -> dict[int, dict[str, Any]]:
    """step (1-based) -> {rank, parameter, value}: the same on every rank (drawn from ``seed`` alone)."""
    rng = random.Random(seed)
    plan = {}
    for step in range(1, steps + 1):
        if rng.random() < rate:
            plan[step] = {"rank": rng.randrange(world), "parameter": rng.choice(names),
                          "value": rng.choice(["nan", "inf", "-inf"])}
    return plan


def install() -> None:
    import launch.data

    kill_at, kill_in_save = _pair("FAULT_KILL_AT_STEP"), _pair("FAULT_KILL_IN_SAVE")
    nonfinite = os.environ.get("FAULT_NONFINITE")
    current = {"step": 0}
    real_batch = launch.data.train_batch

    def train_batch(data, seed, step, *args, **kwargs):
        current["step"] = step + 1
        if kill_at and (step + 1, _rank()) == kill_at:
            _die(f"at the start of step {step + 1}")
        return real_batch(data, seed, step, *args, **kwargs)

    launch.data.train_batch = train_batch  # (the entries import it from launch.data when they start)

    if kill_in_save:
        from launch import runstate

        real_save_with = runstate.save_with

        def save_with(write, out_dir, step, *args, **kwargs):
            def write_then_die(partial):
                write(partial)
                if (step, _rank()) == kill_in_save:
                    _die(f"inside the save of step{step}, its files written")
            return real_save_with(write_then_die, out_dir, step, *args, **kwargs)

        runstate.save_with = save_with

    if nonfinite:
        _install_nonfinite(nonfinite, current)


def _install_nonfinite(spec: str, current: dict[str, int]) -> None:
    """Gradient hooks on every parameter of the model the DeepSpeed entry builds; the schedule decides which
    (step, rank, parameter) gets a non-finite element."""
    import launch.trainer

    rate, seed = spec.split(":")
    real_build = launch.trainer.build_model

    def build_model(run, vocab_size):
        model = real_build(run, vocab_size)
        names = [n for n, _ in model.named_parameters()]
        plan = nonfinite_schedule(float(rate), int(seed), run["train"]["steps"], _world(), names)
        if _rank() == 0 and os.environ.get("FAULT_LOG"):
            Path(os.environ["FAULT_LOG"]).write_text(json.dumps({str(k): v for k, v in plan.items()}))

        def hook_for(name):
            def hook(grad):
                hit = plan.get(current["step"])
                if hit is None or hit["rank"] != _rank() or hit["parameter"] != name:
                    return grad
                grad = grad.clone()
                grad.view(-1)[0] = float(hit["value"])
                return grad
            return hook

        for name, p in model.named_parameters():
            p.register_hook(hook_for(name))
        return model

    launch.trainer.build_model = build_model


if __name__ == "__main__":
    script = Path(sys.argv[1]).resolve()
    install()
    sys.argv = [str(script), *sys.argv[2:]]
    runpy.run_path(str(script), run_name="__main__")
