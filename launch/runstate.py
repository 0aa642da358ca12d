"""Stopping cleanly and resuming exactly: signal flag, checkpoint save/load, pruning old checkpoints.

A signal only sets a flag; the ranks agree on it at the next step boundary (one all-reduce they
already do), save a checkpoint together and exit 0. Every launcher gives ranks time for that:
the deepspeed launcher SIGTERMs its ranks and waits 30 s, torchrun does the same.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from launch import manifest
from launch.errors import CheckpointSaveError, ConfigError

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


def save(engine: Any, out_dir: Path, step: int, client_state: dict[str, Any], keep: int,
         identity: dict[str, Any] | None = None, device: Any = None) -> Path:
    """A DeepSpeed (or DeepSpeed-like) engine's checkpoint through :func:`save_with`."""
    def write(partial: Path) -> None:
        engine.save_checkpoint(str(partial.parent), tag=partial.name, client_state=client_state, save_latest=False)

    return save_with(write, out_dir, step, keep, identity or {}, device)


def save_with(write: Callable[[Path], None], out_dir: Path, step: int, keep: int, identity: dict[str, Any],
              device: Any = None) -> Path:
    """Collective: a checkpoint is complete or invisible. The ranks check there is room for it (the size of the
    newest kept one), then ``write`` their files into ``step<N>.partial``; once all are done rank 0 writes the
    manifest (sizes, checksums, ``identity``: see launch/manifest.py), renames the directory to ``step<N>``, points
    ``latest`` at it (a temporary file renamed over it), and only then prunes all but the ``keep`` newest tags, so
    an older checkpoint is never deleted before the new one is complete."""
    ckpt = checkpoint_dir(out_dir)
    tag = f"step{step}"
    partial = ckpt / f"{tag}.partial"
    rank = dist.get_rank()
    if rank == 0:
        ckpt.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    previous = _check_room(ckpt, tag, device)
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # (left by a save that was killed)
        partial.mkdir()
    dist.barrier()
    try:
        write(partial)
    except Exception as e:  # noqa: BLE001 - torch.save reports a full disk as a RuntimeError ("iostream error")
        free = shutil.disk_usage(ckpt).free
        raise CheckpointSaveError(f"[rank {rank}] saving checkpoint {tag} into {partial} failed: {type(e).__name__}: "
                                  f"{e} ({free / 2**20:,.1f} MiB free on that file system{_full(free)}). The run stops "
                                  f"here; {_intact(previous)}") from e
    dist.barrier()
    if rank == 0:
        final = ckpt / tag
        try:
            manifest.write(partial, identity)
            if final.exists():  # (the same step saved again, e.g. a stop right after a periodic save)
                shutil.rmtree(final)
            os.replace(partial, final)
            _fsync_dir(ckpt)
            write_atomically(ckpt / "latest", tag)
        except OSError as e:
            raise CheckpointSaveError(f"[rank 0] completing checkpoint {tag} in {ckpt} failed: {e}. The run stops "
                                      f"here; {_intact(previous)}") from e
        prune(ckpt, keep)
    dist.barrier()
    return ckpt / tag


def _full(free: int) -> str:
    return ": No space left on device" if free < 2**20 else ""


def _intact(previous: str | None) -> str:
    return (f"checkpoint {previous} is intact and 'latest' names it: free space, then --resume" if previous else
            "no earlier checkpoint exists")


def _check_room(ckpt: Path, tag: str, device: Any) -> str | None:
    """Every rank: is there room for a checkpoint as large as the newest kept one (plus 5 %)? One all-reduce, so all
    ranks stop together, before any file is written, with the numbers in the message. Returns that newest tag."""
    named = ckpt / "latest"
    previous = named.read_text().strip() if named.is_file() else None
    need = math.ceil(manifest.total_bytes(ckpt / previous) * 1.05) if previous else 0
    free = shutil.disk_usage(ckpt).free
    (short,) = all_reduce_sum([float(free < need)], device)
    if short > 0:
        raise CheckpointSaveError(
            f"not enough disk space to save checkpoint {tag} in {ckpt}: it needs about {need / 2**20:,.1f} MiB (the "
            f"size of {previous} + 5 %), {free / 2**20:,.1f} MiB are free on one rank's file system. The run stops "
            f"here; {_intact(previous)} (or lower checkpoint.keep)", announce=dist.get_rank() == 0)
    return previous


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def select_resume(out_dir: Path, wanted: dict[str, Any], fallback: bool) -> tuple[Path, dict[str, list[str]]]:
    """Before any process group: the checkpoint a --resume continues from (launch/manifest.py checks it)."""
    path, rejected = manifest.select(checkpoint_dir(out_dir), wanted, fallback)
    if rejected and os.environ.get("RANK", "0") == "0":
        print(f"--resume_fallback: resuming from {path.name}; set aside (renamed to <tag>.rejected):\n"
              f"{manifest.describe(rejected)}", file=sys.stderr, flush=True)
    return path, rejected


def set_aside(out_dir: Path, chosen: Path, rejected: dict[str, list[str]]) -> None:
    """Collective, after a fallback: rank 0 renames the rejected checkpoints ``<tag>.rejected`` (kept for a look,
    never resumed or pruned) and points ``latest`` at the chosen one."""
    ckpt = checkpoint_dir(out_dir)
    if dist.get_rank() == 0:
        for tag in rejected:
            if (ckpt / tag).is_dir():
                os.replace(ckpt / tag, ckpt / f"{tag}.rejected")
        write_atomically(ckpt / "latest", chosen.name)
    dist.barrier()


def load(engine: Any, path: Path) -> dict[str, Any]:
    """Checkpoint ``path`` (checked by :func:`select_resume`) into a DeepSpeed-like engine: its client state."""
    try:
        loaded, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    except Exception as e:  # noqa: BLE001 - whatever the engine raises, name the checkpoint, before any step
        raise manifest.CheckpointError(f"--resume: {engine.__class__.__name__} could not load {path}: "
                                       f"{type(e).__name__}: {e}") from e
    if loaded is None or client_state is None:
        raise manifest.CheckpointError(f"--resume: could not load a checkpoint from {path}")
    return client_state


def all_reduce_sum(values: list[float], device: Any = None) -> list[float]:
    """One small all-reduce for everything the ranks must agree on each step (loss, stop flag).
    ``device``: where the tensor lives (a CUDA device under an NCCL-only process group)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def leave(rc: int) -> None:
    """End a rank whose process group is down and whose files are written, without interpreter finalization: a
    gloo worker thread that releases a Python-owned tensor while the interpreter finalizes aborts the rank
    ("terminate called without an active exception"; about 1 run in 10-30 on one node, every run under mpirun
    across nodes). Under mpirun, MPI is finalized first if mpi4py started it; helper processes this rank started
    (megatron-core's checkpoint writer runs a multiprocessing Manager) are stopped, as interpreter exit would."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    release_deepspeed_shm()
    stop_helper_processes()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def deepspeed_shm_prefix() -> str:
    """Where DeepSpeed's CPU shm comm op puts this user's allreduce buffers (``<prefix><addr>_<port>_<rank>``)."""
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_"


def release_deepspeed_shm() -> None:
    """Unlink this rank's DeepSpeed CPU shared-memory allreduce buffer. DeepSpeed 0.19.8's shm comm op creates
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> (66 MB per rank) and never unlinks it (its
    shared_close is never called), so every CPU run would leave that much RAM behind. Called once every rank is past
    the final barrier (the mappings stay valid until the processes exit)."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return
    for rank in {os.environ.get("LOCAL_RANK"), os.environ.get("RANK")} - {None}:
        try:
            os.unlink(f"{deepspeed_shm_prefix()}{addr}_{port}_{rank}")
        except OSError:
            pass


def stop_helper_processes() -> None:
    """Terminate and reap this rank's multiprocessing children, as multiprocessing's exit handlers would (os._exit
    skips them): left running they outlive the job and hold its output pipes open."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.terminate()
        child.join(timeout=5)
