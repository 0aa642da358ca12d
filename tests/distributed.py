"""Spawning real process groups (gloo, CPU) from a test, results returned through a queue."""

from __future__ import annotations

import io
import os
import subprocess
import tempfile
import traceback
import uuid

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launch.local_jobs import free_port, kill_marked

__all__ = ["free_port", "run_job", "spawn"]


def _entry(rank, world, port, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        buf = io.BytesIO()  # tensors as bytes: shared-memory handles die with the worker
        torch.save(fn(rank, world, *args), buf)
        queue.put((rank, buf.getvalue(), None))
    except BaseException:  # noqa: BLE001 - sent to the parent
        queue.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn, world: int, *args, timeout: float = 300) -> list:
    """Run fn(rank, world, *args) on ``world`` gloo ranks; return the per-rank results in rank order."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    import queue as queue_mod
    import time

    deadline = time.monotonic() + timeout
    try:
        while len(results) < world:
            try:
                rank, value, err = queue.get(timeout=2)
            except queue_mod.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"workers died or timed out (exit codes {dead})") from None
                continue
            if err:
                raise RuntimeError(f"rank {rank} failed:\n{err}")
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


def run_job(cmd: list[str], cwd, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """A launcher command with its output through files, and every process it left behind killed once it exits:
    a rank killed with SIGKILL can orphan helpers (megatron-core's checkpoint writer starts a multiprocessing
    Manager) that would otherwise live on, holding a pipe open. torchrun puts each rank in a session of its own, so
    the leftovers are found by a marker in their environment, not by process group."""
    marker = f"{os.getpid()}-{uuid.uuid4().hex}"
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env={**env, "SINKGD_DS_TEST_JOB": marker}, stdout=out, stderr=err,
                                text=True)
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            proc.kill()
            kill_marked(f"SINKGD_DS_TEST_JOB={marker}".encode())
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, rc, out.read(), err.read())
