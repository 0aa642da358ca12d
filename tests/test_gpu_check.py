"""tools/gpu_check.py on a CPU-only machine: CUDA phases skipped with the reason, the summary and the log
written, a failing or hanging phase reported without stopping the others, and the CUDA phases' plumbing
rehearsed on the CPU (``--rehearse``) so that a lent GPU is not spent on a broken kit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import gpu_check  # noqa: E402
import prepare_gpu_kit  # noqa: E402

CUDA_PHASES = [p.name for p in gpu_check.PHASES if p.cuda]


def run_check(tmp_path, *args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--out", str(tmp_path / "out"), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    return proc, summary


def test_on_cpu_every_cuda_phase_is_skipped_and_it_exits_0(tmp_path):
    assert not torch.cuda.is_available()  # (this test is about the CPU-only behaviour)
    proc, summary = run_check(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    phases = summary["phases"]
    assert list(phases) == [p.name for p in gpu_check.PHASES]
    assert phases["environment"]["status"] == "passed"
    assert phases["environment"]["details"]["cuda_available"] is False
    for name in CUDA_PHASES:
        assert phases[name]["status"] == "skipped", (name, phases[name])
        assert "no CUDA device" in phases[name]["reason"], phases[name]
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert all(f"===== {n}:" in log for n in phases)
    assert f"1 passed, 0 failed, {len(CUDA_PHASES)} skipped" in proc.stdout


def test_a_failing_or_hanging_phase_does_not_stop_the_others(tmp_path):
    phases = [gpu_check.Phase("boom", 30, False, "fails"), gpu_check.Phase("hang", 3, False, "hangs"),
              gpu_check.Phase("skip", 30, False, "skips"), gpu_check.Phase("fine", 30, False, "passes")]
    bodies = {"boom": "raise RuntimeError('the reason it failed')", "hang": "import time; time.sleep(60)",
              "skip": "import sys; print('skipped: nothing to do here'); sys.exit(3)", "fine": "print('ok')"}
    ctx = gpu_check.Context(tmp_path / "out", None, False)
    summary = gpu_check.run_phases(phases, ctx, argv_of=lambda ph: [sys.executable, "-c", bodies[ph.name]])
    got = {n: e["status"] for n, e in summary["phases"].items()}
    assert got == {"boom": "failed", "hang": "failed", "skip": "skipped", "fine": "passed"}
    assert "RuntimeError: the reason it failed" in summary["phases"]["boom"]["error"]
    assert "time limit 3 s exceeded" in summary["phases"]["hang"]["error"]
    assert summary["phases"]["skip"]["reason"] == "nothing to do here"
    assert summary["failed"] == ["boom", "hang"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary


def test_rehearsal_runs_the_cuda_phases_plumbing_on_cpu(tmp_path):
    proc, summary = run_check(tmp_path, "--rehearse", "--phases", "engine,gloo2,deepspeed,megatron,megatron_lm")
    assert proc.returncode == 0, proc.stdout + proc.stderr + (tmp_path / "out" / "gpu_check.log").read_text()[-4000:]
    ph = summary["phases"]
    for name in ("engine", "gloo2", "deepspeed", "megatron"):
        assert ph[name]["status"] == "passed", (name, ph[name])
    cases = ph["engine"]["details"]["cases"]
    assert {"dense-float32", "fused-bfloat16", "flat-cuts-float32", "tp-row-float32", "SinkGD-step"} <= set(cases)
    assert max(v for k, v in cases.items() if k.endswith("float32")) <= 1e-5
    assert ph["gloo2"]["details"]["probes"]["all_reduce"] == "works"
    assert ph["deepspeed"]["details"]["main_job"]["zero2"]["exact_resume"] is True
    assert ph["megatron_lm"]["status"] == "skipped" and "Megatron-LM" in ph["megatron_lm"]["reason"]


def test_kit_helpers(tmp_path):
    # Megatron-LM files are taken from a work tree (or a git dir's tag); the size check counts every file
    src = tmp_path / "checkout"
    for rel in ("pretrain_gpt.py", "gpt_builders.py", "model_provider.py", "megatron/training/a.py",
                "megatron/legacy/b.py", "megatron/core/c.py", "tools/not_copied.py"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("x" * 10)
    prepare_gpu_kit.copy_megatron_lm(src, tmp_path / "kit" / "megatron_lm")
    copied = sorted(str(p.relative_to(tmp_path / "kit" / "megatron_lm")) for p in (tmp_path / "kit").rglob("*.py"))
    assert copied == ["gpt_builders.py", "megatron/core/c.py", "megatron/legacy/b.py", "megatron/training/a.py",
                      "model_provider.py", "pretrain_gpt.py"]  # megatron/core too: one megatron, not a mix
    assert prepare_gpu_kit.size_of(tmp_path / "kit") == 60
    # only the wheels whose module this Python lacks are installed (none here: hjson is present)
    (tmp_path / "kit" / "wheels").mkdir()
    (tmp_path / "kit" / "wheels" / "hjson-3.1.0-py3-none-any.whl").write_bytes(b"")
    assert gpu_check.install_kit(tmp_path / "kit") == []


def test_the_time_budget_skips_what_no_longer_fits(tmp_path):
    phases = [gpu_check.Phase("slow", 30, False, "sleeps"), gpu_check.Phase("later", 30, False, "never starts")]
    ctx = gpu_check.Context(tmp_path / "out", None, False)
    summary = gpu_check.run_phases(phases, ctx, budget=12,
                                   argv_of=lambda ph: [sys.executable, "-c", "import time; time.sleep(5)"])
    assert summary["phases"]["slow"]["status"] == "passed"
    assert summary["phases"]["later"] == {"status": "skipped", "seconds": 0.0, "what": "never starts",
                                          "reason": "the time budget (12 s) is used up"}
    assert sum(p.timeout for p in gpu_check.PHASES) <= 570  # one 10-minute device call, with room to start


def test_phases_on_cuda_never_inherit_the_cpu_accelerator(tmp_path, monkeypatch):
    """The Makefile exports DS_ACCELERATOR=cpu for the CPU suite; on a GPU machine that would run DeepSpeed on
    the CPU. The runner leaves the device to each phase, and a CUDA phase's commands drop it."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    runner = gpu_check.Context(tmp_path, None, False)
    assert runner.env()["DS_ACCELERATOR"] == "cpu"  # (inherited, untouched: the phase decides)
    assert "DS_ACCELERATOR" not in gpu_check.Context(tmp_path, None, False, device="cuda").env()
    cpu = gpu_check.Context(tmp_path, None, True, device="cpu").env()
    assert cpu["DS_ACCELERATOR"] == "cpu" and cpu["OMP_NUM_THREADS"] == "1"
