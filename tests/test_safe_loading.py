"""Issue 28: resuming runs no code from a checkpoint directory.

Every loader gets a checkpoint file whose pickle, unpickled without restriction, writes a marker file (the
``Payload`` below; each test first shows the payload is live where that is cheap): the load is refused with an
error naming the file, and the marker is never written. Loaders: the FSDP2 engine's ``engine.pt`` and its DCP
files (``launch/fsdp_engine.py``), the ZeRO universal converter (``sinkgd_ds/checkpoint.py``), and the pre-check
every entry's ``--resume`` runs before any process group (``launch/manifest.py``: DeepSpeed, FSDP2, Megatron), which
must hold even when the attacker rewrote the manifest too. Clean checkpoints still load (the bit-for-bit resume
tests are tests/test_fsdp2.py, tests/test_faults.py, tests/test_main_job_megatron.py and
tests/test_deepspeed_checkpoint.py; the one-rank FSDP2 round trip below is exact too).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from launch import manifest
from launch.config import ConfigError
from sinkgd_ds import safe_load
from sinkgd_ds.safe_load import UnsafeCheckpointError

from .distributed import free_port, run_job, spawn
from .safe_load_worker import Payload, round_trip

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
RUN = ["--model", "tiny", "--steps", "2", "--set", "eval.every=0", "--set", "checkpoint.every=1", "--no_progress"]


@pytest.fixture(autouse=True)
def single_process_env(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)


def refused(call, where: Path | str, marker: Path) -> str:
    """``call()`` must raise UnsafeCheckpointError naming ``where``, without writing ``marker``."""
    with pytest.raises(UnsafeCheckpointError) as e:
        call()
    assert str(where) in str(e.value) and "refused to load" in str(e.value), str(e.value)
    assert not marker.exists(), "the payload ran"
    return str(e.value)


# ---------------------------------------------------------------------- torch.save files
def test_the_payload_runs_when_unpickled_without_restriction(tmp_path):
    """The control every refusal below rests on: torch.load(weights_only=False) of a payload file writes the marker."""
    marker, file = tmp_path / "marker", tmp_path / "payload.pt"
    torch.save({"client_state": Payload(str(marker))}, file)
    torch.load(file, weights_only=False)
    assert marker.read_text() == "ran"


def test_engine_state_is_read_weights_only(tmp_path):
    """launch/fsdp_engine.read_engine_state: what save_checkpoint writes reads back equal; a payload is refused by name
    (the callable it names), the marker unwritten."""
    from launch.fsdp_engine import read_engine_state

    state = {"scheduler": {"last_batch_iteration": 4}, "micro_steps": 10,
             "client_state": {"step": 5, "losses": [8.25, 7.5], "val": [(4, 7.75)], "tokens": 4096, "skipped": [3],
                              "data_sha256": {"text_train": "ab" * 32}}}
    torch.save(state, tmp_path / "engine.pt")
    assert read_engine_state(tmp_path) == state
    marker = tmp_path / "marker"
    torch.save({**state, "client_state": Payload(str(marker))}, tmp_path / "engine.pt")
    message = refused(lambda: read_engine_state(tmp_path), tmp_path / "engine.pt", marker)
    assert "it names builtins.exec" in message and "resume only checkpoints you trust" in message


def test_allow_list_is_exactly_what_checkpoints_store(tmp_path):
    """DeepSpeed's three ZeRO record classes load; a class that is harmless but no checkpoint of ours holds
    (argparse.Namespace) is refused by name, so the allow-list is not torch's 'anything registered'."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    torch.save({"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients, "x": torch.ones(2),
                "param_slice_mappings": {"w": fragment_address(numel=4, start=0)}}, tmp_path / "a.pt")
    got = safe_load.load(tmp_path / "a.pt")
    assert got["zero_stage"] is ZeroStageEnum.gradients and got["param_slice_mappings"]["w"].numel == 4
    torch.save({"args": Namespace(lr=0.1)}, tmp_path / "b.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"b\.pt: refused to load: it names argparse\.Namespace"):
        safe_load.load(tmp_path / "b.pt")
    (tmp_path / "c.pt").write_bytes(pickle.dumps(Payload(str(tmp_path / "marker"))))  # (a raw pickle, not a zip)
    refused(lambda: safe_load.load(tmp_path / "c.pt"), tmp_path / "c.pt", tmp_path / "marker")


# ---------------------------------------------------------------------- torch.distributed.checkpoint
def test_dcp_pickles_are_checked_before_dcp_reads_them(tmp_path):
    """DCP's loader unpickles .metadata and every non-tensor entry without restriction (the last step shows it runs
    the payload); safe_load.check_directory refuses both, naming the file (and the entry)."""
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "marker"
    clean, entry, meta = tmp_path / "clean", tmp_path / "entry", tmp_path / "meta"
    dcp.save({"w": torch.arange(4.0), "group": {"lr": 0.02, "betas": (0.9, 0.99), "kind": "sinkgd"}},
             checkpoint_id=str(clean))
    safe_load.check_directory(clean)
    dcp.save({"w": torch.arange(4.0), "extra": Payload(str(marker))}, checkpoint_id=str(entry))
    message = refused(lambda: safe_load.check_directory(entry), entry / "__0_0.distcp", marker)
    assert "(entry 'extra')" in message and "builtins.exec" in message
    shutil.copytree(clean, meta)
    (meta / ".metadata").write_bytes(pickle.dumps(Payload(str(marker))))
    refused(lambda: safe_load.check_directory(meta), meta / ".metadata", marker)
    dcp.load({"w": torch.zeros(4), "extra": None}, checkpoint_id=str(entry))  # torch's own loader, unchecked
    assert marker.read_text() == "ran"


def test_fsdp2_engine_resumes_exactly_and_refuses_a_payload(tmp_path):
    """launch/fsdp_engine.FSDPEngine on one gloo rank: a fresh engine loads its checkpoint and continues with the
    straight run's losses bit for bit; engine.pt or .metadata replaced by a payload is refused, naming the file."""
    r = spawn(round_trip, 1, str(tmp_path), timeout=300)[0]
    assert r["loaded"].endswith("step2") and r["micro_steps"] == 2
    assert r["client_state"] == {"step": 2, "losses": [1.5, 1.25], "val": [(2, 1.0)], "data_sha256": {"text": "abc"}}
    assert r["resumed"] == r["straight"]
    for name in ("engine.pt", ".metadata"):
        assert r[name]["error"].startswith(f"{r[name]['file']}: refused to load: it names builtins.exec"), r[name]
        assert not r[name]["marker_written"]


# ---------------------------------------------------------------------- the universal converter
@pytest.mark.parametrize("victim", ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"])
def test_universal_converter_refuses_a_payload(tmp_path, victim, capsys):
    """sinkgd_ds.checkpoint: the optimizer files it reads and the files DeepSpeed's converter then unpickles with
    weights_only=False are all checked first; nothing is staged or written, and the command line exits 2."""
    from sinkgd_ds.checkpoint import main, to_universal

    tag, out, marker = tmp_path / "global_step1", tmp_path / "universal", tmp_path / "marker"
    tag.mkdir()
    for name in ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"):
        torch.save({"optimizer_state_dict": {}, "module": {}}, tag / name)
    torch.save({"optimizer_state_dict": Payload(str(marker))}, tag / victim)
    refused(lambda: to_universal(str(tag), str(out)), tag / victim, marker)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["global_step1"]
    assert main(["--input_folder", str(tag), "--output_folder", str(out)]) == 2
    assert f"error: {tag / victim}: refused to load" in capsys.readouterr().err and not marker.exists()


# ---------------------------------------------------------------------- the entries' --resume
def _launch(script: list[str], out: Path, extra: list[str] = (), ranks_exit: int = 0) -> str:
    """A 2-rank torchrun of an entry; ``ranks_exit``: the exit status its ranks must report (torchrun's own is 1
    when one is not 0)."""
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), *script, *RUN, "--out", str(out),
           *extra]
    proc = run_job(cmd, ROOT, ENV, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == (1 if ranks_exit else 0), text[-4000:]
    assert not ranks_exit or f"exitcode  : {ranks_exit} " in text, text[-4000:]
    return text


def _inject_into_torch_file(file: Path, marker: Path) -> None:
    state = safe_load.load(file)
    state["client_state_extra"] = Payload(str(marker))
    torch.save(state, file)


def _inject_into_dcp_metadata(file: Path, marker: Path) -> None:
    metadata = safe_load.load_dcp_metadata(file)
    metadata.planner_data = Payload(str(marker))
    file.write_bytes(pickle.dumps(metadata))


def _entry(name: str):
    """(script, extra args, parse_args, prepare, the file tampered with, how) of one main-job entry."""
    if name == "deepspeed":
        from launch.pretrain import parse_args, prepare

        return (["launch/pretrain.py"], ["--deepspeed_config", "configs/zero2_sinkgd.json"], parse_args, prepare,
                "zero_pp_rank_1_mp_rank_00_optim_states.pt", _inject_into_torch_file)
    if name == "fsdp2":
        from launch.pretrain import prepare
        from launch.pretrain_fsdp import parse_args

        return (["launch/pretrain_fsdp.py"], [], parse_args, lambda args: prepare(args, args.tp, engine="fsdp"),
                "engine.pt", _inject_into_torch_file)
    from launch.pretrain_megatron import parse_args, prepare

    return (["tests/main_job_megatron_cpu.py"], ["--use_distributed_optimizer", "--save_every", "1"], parse_args,
            prepare, ".metadata", _inject_into_dcp_metadata)


@pytest.mark.parametrize("entry", ["deepspeed", "fsdp2", "megatron"])
def test_resume_refuses_a_payload_whose_manifest_was_rewritten(tmp_path, monkeypatch, entry):
    """A 2-step run (checkpoints after steps 1 and 2); the newest checkpoint gets a payload and a manifest rewritten
    to match (the CRC-32s then vouch for it): --resume is refused before any process group, naming the file, and the
    marker is never written; --resume_fallback sets it aside and takes step 1. (FSDP2: the refusal under torchrun too,
    exit 2.)"""
    script, extra, parse_args, prepare, victim_name, inject = _entry(entry)
    out, marker = tmp_path / "run", tmp_path / "marker"
    _launch(script, out, extra)
    step2 = out / "checkpoints/step2"
    victim = step2 / victim_name
    inject(victim, marker)
    manifest.write(step2, json.loads((step2 / manifest.NAME).read_text())["identity"])
    assert manifest.file_problems(step2, manifest.read(step2)) == []  # the checksums alone would let it through
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = parse_args([*RUN, *extra, "--out", str(out), "--resume"])
    with pytest.raises(ConfigError) as e:
        prepare(args)
    assert f"{victim}: refused to load: it names builtins.exec" in str(e.value), str(e.value)
    assert "--resume_fallback" in str(e.value) and not marker.exists()
    args.resume_fallback = True
    plan = prepare(args)
    assert plan["resume_from"] == out / "checkpoints/step1" and list(plan["rejected"]) == ["step2"]
    if entry == "fsdp2":
        text = _launch(script, out, ["--resume"], ranks_exit=2)
        assert f"{victim}: refused to load" in text and "error: --resume" in text
    assert not marker.exists()


def test_unreadable_pickle_with_a_rewritten_manifest_is_refused_before_any_process_group(tmp_path):
    """A file that torch cannot read with weights_only=True at all (not a pickle) is refused by the same check: it
    cannot be shown to hold only plain values."""
    tag = tmp_path / "step1"
    tag.mkdir()
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"not a torch file")
    manifest.write(tag, {})
    problems = manifest.check(tag, {})
    assert len(problems) == 1 and problems[0].startswith(f"{tag / 'mp_rank_00_model_states.pt'}: refused to load: "
                                                         "it does not load with torch.load(weights_only=True)")
