"""The main job on Megatron-Core (launch/pretrain_megatron.py): bad input is refused before any process group,
and 6 steps of the tiny model on 2 CPU ranks (TP=2, and DP=2 with the distributed optimizer) lower the loss,
write the summary, and agree with each other; a run stopped after step 3 and resumed from its distributed
checkpoint reproduces the straight run's losses exactly. CPU only through tests/main_job_megatron_cpu.py, which installs
the test-only shim (tests/megatron_cpu_shim.py) around the unmodified launch script."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from launch.config import ConfigError
from launch.pretrain_megatron import parse_args, prepare

from .distributed import free_port, run_job

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": "cpu"}
ARGS = ["--model", "tiny", "--steps", "6", "--set", "eval.every=4", "--set", "eval.sequences=4",
        "--set", "train.log_every=1", "--no_progress"]


@pytest.fixture(autouse=True)
def single_process_env(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("argv, world, message", [
    (["--tp", "3"], "3", "model.num_attention_heads=4 is not divisible by --tp 3"),
    (["--tp", "2"], "3", "--tp 2 must be >= 1 and divide the world size 3"),
    (["--optimizer", "swan", "--tp", "2"], "2", "--optimizer swan needs whole matrices"),
    (["--optimizer", "sinkdg"], "1", "Did you mean 'sinkgd'?"),
    (["--micro_batch", "3"], "2", "train.batch_size=8 is not divisible by --micro_batch 3 x data-parallel size 2"),
    (["--set", "train.stpes=3"], "1", "Did you mean 'steps'?"),
])
def test_bad_input_is_refused_before_any_process_group(monkeypatch, argv, world, message):
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prepare(parse_args(["--model", "tiny", *argv]))


def run(tmp_path: Path, name: str, extra: list[str], faults: dict[str, str] | None = None) -> dict:
    """A 2-rank run (through tools/inject_faults.py when ``faults``: then it must fail and returns its output)."""
    wrapper = ["tools/inject_faults.py"] if faults else []
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           *wrapper, "tests/main_job_megatron_cpu.py", *ARGS, "--out", str(tmp_path / name), *extra]
    proc = run_job(cmd, ROOT, {**ENV, **(faults or {})}, timeout=240)
    if faults:
        assert proc.returncode != 0, proc.stdout[-3000:]
        return {"output": proc.stdout + proc.stderr}
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "==== summary ====" in proc.stdout
    return json.loads((tmp_path / name / "summary.json").read_text())


@pytest.fixture(scope="module")
def dp2(tmp_path_factory) -> tuple[Path, dict]:
    """6 straight steps, DP=2 + distributed optimizer (checkpoint at the end only): shared by two tests."""
    tmp = tmp_path_factory.mktemp("megatron_main")
    return tmp, run(tmp, "dp2", ["--use_distributed_optimizer", "--save_every", "0", "--overwrite"])


def test_two_ranks_loss_falls_tp2_and_dp2_distopt_agree(tmp_path, dp2):
    tp2 = run(tmp_path, "tp2", ["--tp", "2", "--overwrite"])
    (dp2_dir, dp2) = dp2
    for s, (tp, dp), d in ((tp2, (2, 1), tmp_path / "tp2"), (dp2, (1, 2), dp2_dir / "dp2")):
        assert (s["step"], s["steps"], s["world"], s["tp"], s["dp"]) == (6, 6, 2, tp, dp)
        assert s["optimizer"] == "SinkGD (adamw, sinkgd)"
        losses = s["losses"]
        assert len(losses) == 6 and losses[-1] < losses[0] - 1.0, losses  # 8.33 -> 6.53 measured
        assert s["val_loss"] is not None and s["val_loss"] < losses[0]
        assert (d / "loss.png").is_file() and s["checkpoint"] == str(d / "checkpoints/step6")
        ranks = s["memory"]["per_rank"]
        assert len(ranks) == 2 and all(m["optimizer_state_matrices"] == 0 < m["optimizer_state_adamw"] for m in ranks)
    # the same global batches and the same full initial weights: the two layouts train the same model
    assert tp2["losses"] == pytest.approx(dp2["losses"], rel=1e-4)
    assert tp2["val_loss"] == pytest.approx(dp2["val_loss"], rel=1e-4)


def test_stop_then_resume_reproduces_the_straight_run_exactly(tmp_path, dp2):
    """DP=2 + distributed optimizer: 6 steps straight vs --stop_at_step 3, then --resume to step 6."""
    straight = dp2[1]
    first = run(tmp_path, "split", ["--use_distributed_optimizer", "--stop_at_step", "3"])
    assert (first["step"], first["stopped_by"], first["checkpoint"]) == (3, "--stop_at_step",
                                                                          str(tmp_path / "split/checkpoints/step3"))
    assert (tmp_path / "split/checkpoints/latest").read_text() == "step3"
    resumed = run(tmp_path, "split", ["--use_distributed_optimizer", "--resume"])
    assert (resumed["step"], resumed["resumed_from"], resumed["stopped_by"]) == (6, 3, None)
    assert resumed["losses"][:3] == first["losses"]
    assert resumed["losses"] == straight["losses"]  # exact: weights, optimizer state and lr schedule restored
    assert resumed["val"] == straight["val"] and len(straight["val"]) == 2
    assert sorted(p.name for p in (tmp_path / "split/checkpoints").iterdir()) == ["latest", "step3", "step6"]


def test_sigkill_in_a_save_then_resume_exactly_and_damage_is_refused(tmp_path, dp2, monkeypatch):
    """Issue 18 on this entry: rank 1 SIGKILLs itself inside the save of step 4 (checkpoints every 2 steps): step 4
    stays invisible, --resume continues from step 2 and ends with the straight run's losses bit for bit. A truncated
    file of the kept checkpoint is refused before any process group, naming it; so is switching the distributed
    optimizer off."""
    from launch import manifest

    straight = dp2[1]
    args = ["--use_distributed_optimizer", "--save_every", "2"]
    killed = run(tmp_path, "killed", args, faults={"FAULT_KILL_IN_SAVE": "4:1"})
    assert "rank 1: SIGKILL inside the save of step4" in killed["output"]
    ckpt = tmp_path / "killed/checkpoints"
    assert (ckpt / "latest").read_text() == "step2" and not (ckpt / "step4").exists()
    assert manifest.check(ckpt / "step2", {"engine": "megatron", "tensor_parallel": 1, "data_parallel": 2}) == []
    victim = max((p for p in (ckpt / "step2").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    whole = victim.read_bytes()
    victim.write_bytes(whole[:-1])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=f"{victim}: truncated to {len(whole) - 1} bytes"):
        prepare(parse_args([*ARGS, "--out", str(tmp_path / "killed"), "--resume", *args]))
    with pytest.raises(ConfigError, match="distributed_optimizer is True in the checkpoint, False in this run"):
        prepare(parse_args([*ARGS, "--out", str(tmp_path / "killed"), "--resume", "--save_every", "2"]))
    victim.write_bytes(whole)
    resumed = run(tmp_path, "killed", [*args, "--resume"])
    assert (resumed["resumed_from"], resumed["step"]) == (2, 6)
    assert resumed["losses"] == straight["losses"] and resumed["val"] == straight["val"]
