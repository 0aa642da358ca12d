"""Stopping cleanly and resuming exactly: signal flag, checkpoint save/load, pruning old checkpoints.

A signal only sets a flag; the ranks agree on it at the next step boundary (one all-reduce they
already do), save a checkpoint together and exit 0. Every launcher gives ranks time for that:
the deepspeed launcher SIGTERMs its ranks and waits 30 s, torchrun does the same.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from launch.config import ConfigError

STOP = {"signal": None}


def install_signal_handlers() -> None:
    def handler(signum: int, _frame: Any) -> None:
        if STOP["signal"] is None:
            STOP["signal"] = signal.Signals(signum).name
            print(f"[rank {dist.get_rank() if dist.is_initialized() else '?'}] got {STOP['signal']}: saving a "
                  "checkpoint after this step, then exiting", file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def stop_requested() -> bool:
    return STOP["signal"] is not None


def checkpoint_dir(out_dir: Path) -> Path:
    return out_dir / "checkpoints"


def has_checkpoint(out_dir: Path) -> bool:
    return (checkpoint_dir(out_dir) / "latest").is_file()


def prepare_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """--resume / --overwrite against what ``out_dir`` holds, checked before any process group starts;
    --overwrite then clears it (once, on local rank 0)."""
    if overwrite and resume:
        raise ConfigError("--overwrite and --resume contradict each other; pass one")
    if resume and not has_checkpoint(out_dir):
        raise ConfigError(f"--resume: no checkpoint in {checkpoint_dir(out_dir)} (expected a 'latest' file); "
                          "run without --resume first, or point --out at the run directory")
    if not resume and not overwrite and has_checkpoint(out_dir):
        raise ConfigError(f"{out_dir} already holds a run (checkpoints/latest); pass --resume to continue it, "
                          "--overwrite to start over there, or another --out")
    if overwrite and os.environ.get("LOCAL_RANK", "0") == "0":
        shutil.rmtree(out_dir, ignore_errors=True)


def save(engine: Any, out_dir: Path, step: int, client_state: dict[str, Any], keep: int) -> Path:
    """Collective: every rank writes its partition. A checkpoint is complete or invisible: the ranks write into
    ``step<N>.partial``; once all are done rank 0 renames it to ``step<N>``, then points ``latest`` at it
    (a temporary file renamed over it), and only then prunes all but the ``keep`` newest tags, so an older
    checkpoint is never deleted before the new one is complete."""
    ckpt = checkpoint_dir(out_dir)
    tag = f"step{step}"
    partial = ckpt / f"{tag}.partial"
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)  # (left by a save that was killed)
    dist.barrier()
    engine.save_checkpoint(str(ckpt), tag=partial.name, client_state=client_state, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        final = ckpt / tag
        if final.exists():  # (the same step saved again, e.g. a stop right after a periodic save)
            shutil.rmtree(final)
        os.replace(partial, final)
        write_atomically(ckpt / "latest", tag)
        prune(ckpt, keep)
    dist.barrier()
    return ckpt / tag


def write_atomically(path: Path, text: str) -> None:
    """``path`` holds either its old content or ``text``, never a part of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prune(ckpt: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete ``step<N>`` tags (``keep`` 0: keep all), and the unfinished
    ``step<N>.partial`` directories of killed saves. Rank 0 only."""
    for stale in ckpt.glob("step*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep > 0:
        tags = sorted((p for p in ckpt.glob("step*") if p.is_dir() and p.name[4:].isdigit()),
                      key=lambda p: int(p.name[4:]))
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def load(engine: Any, out_dir: Path) -> dict[str, Any]:
    path, client_state = engine.load_checkpoint(str(checkpoint_dir(out_dir)))
    if path is None or client_state is None:
        raise RuntimeError(f"--resume: could not load a checkpoint from {checkpoint_dir(out_dir)}")
    return client_state


def all_reduce_sum(values: list[float], device: Any = None) -> list[float]:
    """One small all-reduce for everything the ranks must agree on each step (loss, stop flag).
    ``device``: where the tensor lives (a CUDA device under an NCCL-only process group)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
