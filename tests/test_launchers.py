"""The same JSON config through the launchers DeepSpeed users use (2 CPU ranks each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .distributed import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(cmd: list[str], tmp_path: Path) -> dict:
    out = tmp_path / "summary.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    args = ["launch/train_tiny.py", "--deepspeed_config", "configs/zero2_sinkgd.json", "--steps", "25",
            "--summary_json", str(out)]
    proc = subprocess.run(cmd + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_launcher_trains_with_json_sinkgd(launcher, tmp_path):
    port = str(free_port())
    if launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port]
    else:
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port]
    summary = run(cmd, tmp_path)
    assert summary["world"] == 2
    losses = summary["losses"]
    assert losses[-1] < 0.5 * losses[0]
