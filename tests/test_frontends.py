"""The same ``"type": "SinkGD"`` JSON through the HF Trainer, Accelerate's DeepSpeed plugin and mpirun.

Each front end is one 2-rank launch of a script in tests/jobs/. Accelerate and mpirun train OddLM
and must equal the single-process dense reference; the HF Trainer trains a tiny LLaMA with its own
data loader and schedule, so it is checked for routing, statelessness and a falling loss.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from .distributed import free_port
from .ds_worker import ds_config
from .test_deepspeed import check_against_reference

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def launch(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_hf_trainer_with_json_sinkgd(tmp_path):
    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
           "train_batch_size": "auto", "gradient_clipping": "auto", "zero_optimization": {"stage": 2},
           "optimizer": {"type": "SinkGD", "params": {"lr": "auto", "weight_decay": "auto", "betas": "auto",
                                                      "eps": "auto", "lr_scale": 0.05, "sinkhorn_iters": 5}}}
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    out = tmp_path / "report.json"
    launch([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
            "tests/jobs/hf_trainer_job.py", "--ds_config", str(tmp_path / "ds.json"), "--out", str(out)])
    r = json.loads(out.read_text())
    assert (r["world"], r["engine"], r["inner"]) == (2, "DeepSpeedEngine", "SinkGD")
    assert r["kinds"] == ["adamw", "sinkgd"]
    # q, k, v, o, gate, up, down of both layers; embeddings, head and norms are on AdamW
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert len(r["matrices"]) == 14 and all(any(p in m for p in projections) for m in r["matrices"]), r["matrices"]
    assert r["matrix_state"] == 0
    assert r["lrs"] == [0.0, 0.0]  # HF's linear schedule drove our groups' lr down to 0
    losses = r["losses"]
    assert len(losses) == 12 and losses[-1] < 0.5 * losses[0]


def test_hf_trainer_with_deepspeed_autotp(tmp_path):
    """The HF Trainer with "tensor_parallel": {"autotp_size": 2} in the same JSON (2 ranks: TP 2 x DP 1) trains as
    the same Trainer on 1 rank without TP, loss for loss within float noise; every
    projection's layout carries its TP group. (Normalising the TP slices as whole matrices moves the losses by
    1e-4 relative within two steps.)"""
    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
           "gradient_clipping": "auto", "zero_optimization": {"stage": 1},
           "optimizer": {"type": "SinkGD", "params": {"lr": "auto", "weight_decay": "auto", "lr_scale": 0.05}}}
    reports = {}
    for tp in (1, 2):
        path = tmp_path / f"ds{tp}.json"
        path.write_text(json.dumps({**cfg, **({"tensor_parallel": {"autotp_size": tp}} if tp > 1 else {})}))
        out = tmp_path / f"report{tp}.json"
        launch([str(BIN / "deepspeed"), "--num_gpus", str(tp), "--master_port", str(free_port()),
                "tests/jobs/hf_trainer_job.py", "--ds_config", str(path), "--out", str(out)])
        reports[tp] = json.loads(out.read_text())
    one, two = reports[1], reports[2]
    assert (two["world"], two["inner"]) == (2, "SinkGD") and one["world"] == 1
    assert len(two["tp_sliced"]) == 14 and not one["tp_sliced"]
    assert len(two["losses"]) == 12 and two["losses"][-1] < 0.5 * two["losses"][0]
    assert max(abs(a - b) / a for a, b in zip(one["losses"], two["losses"])) <= 1e-5, (one["losses"], two["losses"])


def test_accelerate_deepspeed_plugin_is_exact(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps(ds_config("SinkGD", 2, 2)))
    out = tmp_path / "result.pt"
    launch([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
            "tests/jobs/accelerate_job.py", "--ds_config", str(tmp_path / "ds.json"), "--out", str(out)])
    r = torch.load(out, weights_only=False)
    assert (r["world"], r["engine"], r["inner"]) == (2, "DeepSpeedEngine", "SinkGD")
    check_against_reference(r, "SinkGD", key="accelerate")


def test_mpirun_with_mpi4py_is_exact(tmp_path):
    mpirun = shutil.which("mpirun")
    assert mpirun, "mpirun not found: make test installs Open MPI (openmpi-bin) with apt"
    out = tmp_path / "result.pt"
    launch([mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "DS_ACCELERATOR", "-x",
            "OMP_NUM_THREADS", "-x", "PATH", sys.executable, "tests/jobs/mpi_job.py", str(out)])
    r = torch.load(out, weights_only=False)
    assert r["world"] == 2
    for key, res in r["results"].items():
        check_against_reference(res, key.split("-")[0], key=key)
