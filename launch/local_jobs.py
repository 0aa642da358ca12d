"""Running the main job as a child process on this machine: for make compare, the benchmarks and the fault tools.

One free port, the CPU environment the children get, a 2-rank torchrun of launch/pretrain.py whose summary comes
back, and the processes of a job found by a marker in their environment (torchrun gives each rank a session of
its own, so a job's leftovers are not in the launcher's process group).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CPU_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_main_job(out: Path, world: int, args: Sequence[str], script: Sequence[str] = ("launch/pretrain.py",),
                 env: dict[str, str] | None = None) -> dict[str, Any]:
    """torchrun ``script`` (e.g. tools/inject_faults.py launch/pretrain.py) with ``args`` into ``out`` afresh, its
    output in ``<out>.log`` beside it; returns its summary.json plus ``wall_seconds``, or exits naming the log."""
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(world), "--master_port",
           str(free_port()), *script, *args, "--no_progress", "--overwrite", "--out", str(out)]
    out.mkdir(parents=True, exist_ok=True)
    log_path = out.parent / f"{out.name}.log"
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **CPU_ENV, **(env or {})}, stdout=log,
                            stderr=subprocess.STDOUT).returncode
    if rc:
        raise SystemExit(f"{out.name} failed (rc {rc}): see {log_path}")
    summary = json.loads((out / "summary.json").read_text())
    summary["wall_seconds"] = time.perf_counter() - t0
    return summary


def marked_processes(entry: bytes) -> Iterator[tuple[int, list[bytes]]]:
    """(pid, environment) of every process whose environment holds ``entry`` (``b"NAME=value"``)."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if entry in env:
            yield int(d), env


def kill_marked(entry: bytes) -> None:
    """SIGKILL every process marked with ``entry`` (what a job left behind)."""
    for pid, _ in marked_processes(entry):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
