"""benchmarks/gpu_step.py runs on a machine without a GPU: it says so and exits 0, and its CPU rehearsal
walks every code path but the profiler counts (which need CUDA) and writes a complete JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_step.py"
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
CONFIGS = ["adamw_fused", "sinkgd_L1_fp32", "sinkgd_L5_fp32", "sinkgd_L1_bf16", "sinkgd_L5_bf16", "scale_fp32"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=ENV, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here: the script would measure")
def test_without_cuda_says_so_and_exits_0():
    r = run()
    assert r.returncode == 0, r.stderr
    assert "CUDA is not available, so nothing was measured" in r.stdout


def test_cpu_rehearsal_writes_every_configuration(tmp_path):
    out = tmp_path / "step.json"
    r = run("--device", "cpu", "--layers", "1", "--scale", "32", "--reps", "2", "--warmup", "1", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(out.read_text())
    assert set(doc["configs"]) == set(CONFIGS)
    for name, row in doc["configs"].items():
        assert row["median_ms"] > 0 and len(row["times_ms"]) == 2 and all(t > 0 for t in row["times_ms"]), name
        assert row["gbps"] > 0 and row["launches"] is None and row["host_syncs"] is None, name
    assert doc["matrices"] == 7 and doc["copy"]["gbps"] > 0
    assert doc["device"] == "cpu" and doc["versions"]["torch"] == torch.__version__
    assert any(t["target"].startswith("sinkgd_L5_fp32 <=") for t in doc["targets"])
    assert "n/a" in r.stdout  # the profiler counts are skipped on the CPU
    assert all(t["pass"] is None for t in doc["targets"])  # (a CPU rehearsal judges no GPU target)
    assert doc["configs"]["sinkgd_L5_fp32"]["backend"] in ("native", "torch")
    assert doc["configs"]["adamw_fused"]["backend"] == "-"
