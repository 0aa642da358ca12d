"""Issue 18 §1 on the DeepSpeed entry: ranks killed with SIGKILL mid-step and mid-save, damaged and foreign
checkpoints, a full disk. Every resumed run must end with the uninterrupted run's losses bit for bit.

Faults come from tools/inject_faults.py (a wrapper that patches the job from outside: a rank SIGKILLs itself at a
chosen step or inside a chosen save); tools/fault_trials.py runs randomized trials with kills from outside."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from launch import manifest
from launch.config import ConfigError
from launch.pretrain import parse_args, prepare

from .distributed import free_port, run_job

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
STEPS = 12
# 12 steps of tiny on 2 ranks, ZeRO-2 SinkGD, a checkpoint every 3 steps (the two newest kept), eval at 6 and 12
RUN_ARGS = ["--deepspeed_config", "configs/zero2_sinkgd.json", "--model", "tiny", "--steps", str(STEPS),
            "--set", "eval.every=6", "--set", "eval.sequences=8", "--set", "checkpoint.every=3",
            "--set", "checkpoint.keep=2", "--set", "train.log_every=1", "--no_progress"]


def run(out: Path, extra: list[str] = (), faults: dict[str, str] | None = None, expect: int = 0) -> str:
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           "tools/inject_faults.py", "launch/pretrain.py", *RUN_ARGS, "--out", str(out), *extra]
    proc = run_job(cmd, ROOT, {**ENV, **(faults or {})}, timeout=300)
    text = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == (expect == 0), text[-4000:]
    return text


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def tags(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step"))


@pytest.fixture(autouse=True)
def single_process_env(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, dict]:
    """The uninterrupted run every trial must reproduce."""
    out = tmp_path_factory.mktemp("faults") / "straight"
    run(out)
    s = summary(out)
    assert s["step"] == STEPS and tags(out) == ["step12", "step9"] and s["skipped_steps"] == []
    return out, s


def test_sigkill_in_a_save_and_mid_step_then_resume_exactly(straight, tmp_path):
    out, ref = tmp_path / "run", straight[1]
    # rank 1 dies inside the save of step 6, its files written: step6 must stay invisible
    text = run(out, faults={"FAULT_KILL_IN_SAVE": "6:1"}, expect=1)
    assert "rank 1: SIGKILL inside the save of step6" in text
    assert (out / "checkpoints/latest").read_text() == "step3" and tags(out) == ["step3", "step6.partial"]
    assert manifest.check(out / "checkpoints/step3", {}) == []
    # resumed from step 3; rank 0 then dies as it starts step 8 (the resumed run saved step 6 meanwhile)
    text = run(out, ["--resume"], faults={"FAULT_KILL_AT_STEP": "8:0"}, expect=1)
    assert "rank 0: SIGKILL at the start of step 8" in text
    assert (out / "checkpoints/latest").read_text() == "step6" and tags(out) == ["step3", "step6"]
    run(out, ["--resume"])
    s = summary(out)
    assert (s["resumed_from"], s["step"]) == (6, STEPS)
    assert s["losses"] == ref["losses"] and s["val"] == ref["val"]  # bit for bit
    assert tags(out) == ["step12", "step9"]


def _copy(straight: tuple[Path, dict], dest: Path) -> Path:
    shutil.copytree(straight[0], dest)
    return dest


def _refusal(monkeypatch, out: Path):
    def refused(*argv: str, world: str = "2") -> str:
        monkeypatch.setenv("WORLD_SIZE", world)
        with pytest.raises(ConfigError) as e:
            prepare(parse_args([*RUN_ARGS, "--out", str(out), "--resume", *argv]))
        return str(e.value)
    return refused


def test_damaged_or_foreign_checkpoints_are_refused_before_any_process_group(straight, tmp_path, monkeypatch):
    out = _copy(straight, tmp_path / "copy")
    step12 = out / "checkpoints/step12"
    rank1 = step12 / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    model = step12 / "mp_rank_00_model_states.pt"
    refused = _refusal(monkeypatch, out)
    # the run as saved resumes (a clean copy checks out)
    monkeypatch.setenv("WORLD_SIZE", "2")
    plan = prepare(parse_args([*RUN_ARGS, "--out", str(out), "--resume"]))
    assert plan["resume_from"] == step12 and plan["rejected"] == {}
    # another model, world size, optimizer or ZeRO stage: named key by key
    assert "model.hidden_size is 128 in the checkpoint, 64 in this run" in refused("--set", "model.hidden_size=64")
    assert "data_parallel is 2 in the checkpoint, 4 in this run" in refused("--micro_batch", "2", world="4")
    assert "optimizer is 'sinkgd' in the checkpoint, 'adamw' in this run" in refused(
        "--deepspeed_config", "configs/zero2_adamw.json")
    assert "zero_stage is 2 in the checkpoint, 1 in this run" in refused(
        "--deepspeed_config", "configs/zero1_sinkgd.json")
    # a truncated rank file, then a flipped byte, a missing rank file, a missing manifest
    data = rank1.read_bytes()
    rank1.write_bytes(data[: len(data) // 2])
    message = refused()
    assert f"{rank1}: truncated to {len(data) // 2} bytes, the save wrote {len(data)}" in message
    assert "older kept checkpoints: step9; pass --resume_fallback" in message
    rank1.write_bytes(data)
    blob = bytearray(model.read_bytes())
    blob[len(blob) // 3] ^= 0x40
    model.write_bytes(bytes(blob))
    assert f"{model}: corrupted (its CRC-32 differs" in refused()
    rank1.unlink()
    assert f"{rank1}: missing (the save wrote {len(data)} bytes there)" in refused()
    (step12 / "manifest.json").unlink()
    assert "manifest.json: missing, so the save of step12 never finished" in refused()
    # --resume_fallback: the newest older kept checkpoint that checks out
    monkeypatch.setenv("WORLD_SIZE", "2")
    plan = prepare(parse_args([*RUN_ARGS, "--out", str(out), "--resume", "--resume_fallback"]))
    assert plan["resume_from"] == out / "checkpoints/step9" and list(plan["rejected"]) == ["step12"]
    shutil.rmtree(out / "checkpoints/step9")
    assert "no kept checkpoint in" in refused("--resume_fallback")


def test_resume_fallback_is_exact_and_an_unloadable_checkpoint_is_named(straight, tmp_path):
    out = _copy(straight, tmp_path / "fallback")
    model = out / "checkpoints/step12/mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:-100])
    # from step 9, passing over the damaged step 12, to step 12 again: the straight run's losses exactly
    text = run(out, ["--resume", "--resume_fallback"])
    assert "--resume_fallback: resuming from step9" in text and f"{model}: truncated" in text
    s = summary(out)
    assert s["resumed_from"] == 9 and s["losses"] == straight[1]["losses"] and s["val"] == straight[1]["val"]
    assert (out / "checkpoints/step12.rejected").is_dir()  # kept for a look, never resumed or pruned
    assert tags(out) == ["step12", "step12.rejected", "step9"]
    # a checkpoint whose manifest vouches for files the engine cannot use (e.g. rewritten by another tool): a plain
    # torch file, so it passes the pickle check (tests/test_safe_loading.py) and DeepSpeed's loader fails on it
    other = _copy(straight, tmp_path / "unloadable")
    step12 = other / "checkpoints/step12"
    torch.save({"not": "a DeepSpeed checkpoint"}, step12 / "mp_rank_00_model_states.pt")
    manifest.write(step12, json.loads((step12 / "manifest.json").read_text())["identity"])
    text = run(other, ["--resume"], expect=2)
    assert f"error: --resume: DeepSpeedEngine could not load {step12}" in text


@pytest.fixture
def small_disk(tmp_path):
    """A size-limited tmpfs (root with CAP_SYS_ADMIN); skipped, naming the capability, elsewhere."""
    mounts = []

    def mount(megabytes: int) -> Path:
        where = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
        where.mkdir()
        if not shutil.which("mount"):
            pytest.skip("needs the mount command (util-linux) to make a small disk")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs (needs root with CAP_SYS_ADMIN): {proc.stderr.strip()}")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_stops_the_run_and_keeps_the_previous_checkpoint(straight, tmp_path, small_disk):
    # 40 MB: step 3's checkpoint (~23 MB) fits; step 6's would not: refused before any file is written
    out = small_disk(40) / "run"
    text = run(out, faults={}, expect=1)
    assert "error: not enough disk space to save checkpoint step6" in text
    assert "checkpoint step3 is intact and 'latest' names it" in text
    assert (out / "checkpoints/latest").read_text() == "step3" and tags(out) == ["step3"]
    assert manifest.check(out / "checkpoints/step3", {}) == []
    moved = tmp_path / "moved"  # (the user frees space: here, moves the run to a larger disk) and resumes
    shutil.copytree(out, moved)
    run(moved, ["--resume"])
    assert summary(moved)["losses"] == straight[1]["losses"]
    # 12 MB: the very first save runs out of space mid-write: the rank that hit it says so; nothing is visible
    out = small_disk(12) / "run"
    text = run(out, expect=1)
    assert "saving checkpoint step3 into" in text and "No space left on device" in text
    assert "no earlier checkpoint exists" in text and not (out / "checkpoints/latest").exists()
