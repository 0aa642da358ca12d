"""Launch Megatron-LM's training loop (tests/megatron_lm/pretrain_gpt_cpu.py) as a user would, and read what it did.

Every run is ``torchrun --nproc_per_node N -m megatron_patch.run tests/megatron_lm/pretrain_gpt_cpu.py <flags>``
with the flags a Megatron-LM user types, plus the CPU ones (``--transformer-impl local``, the ``--no-*-fusion``
flags, ``--distributed-backend gloo``, ``--num-workers 0``). Runs that must be compared start from the same weights:
one checkpoint, written by a 1-rank run that steps with lr 0, loaded with ``--finetune --no-load-optim
--no-load-rng`` (Megatron re-slices it for any TP/PP layout).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "megatron_lm" / "pretrain_gpt_cpu.py"

MODEL = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2",
         "--group-query-attention", "--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear",
         "--position-embedding-type", "rope", "--seq-length", "32", "--max-position-embeddings", "32",
         "--vocab-size", "1023", "--tokenizer-type", "NullTokenizer", "--mock-data", "--split", "100,0,0",
         "--hidden-dropout", "0", "--attention-dropout", "0", "--init-method-std", "0.02", "--seed", "1234"]
CPU = ["--transformer-impl", "local", "--no-gradient-accumulation-fusion", "--no-bias-dropout-fusion",
       "--no-bias-swiglu-fusion", "--no-masked-softmax-fusion", "--no-persist-layer-norm", "--no-rope-fusion",
       "--distributed-backend", "gloo", "--num-workers", "0", "--eval-iters", "0", "--eval-interval", "1000",
       "--log-interval", "1", "--use-cpu-initialization"]
TRAIN = ["--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "0.02", "--min-lr", "0.002",
         "--lr-decay-style", "cosine", "--lr-warmup-iters", "1", "--clip-grad", "1.0", "--weight-decay", "0.01"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, nproc: int, flags: list[str], timeout: int = 600,
           entry: list[str] | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``entry``: what torchrun starts (default: megatron_patch.run with our GPT script); ``env``: added."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **(env or {}), "SINKGD_MLM_OUT": str(out), "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1",
           "PYTHONWARNINGS": "ignore", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), *(entry or ["-m", "megatron_patch.run", str(SCRIPT)]), *flags]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    (out / "log.txt").write_text(proc.stdout + proc.stderr)
    return proc


def run(out: Path, nproc: int, flags: list[str], timeout: int = 600, entry: list[str] | None = None,
        env: dict[str, str] | None = None) -> list[dict]:
    """Each rank's dump (losses, parameters by name, optimizer classes); the log is in ``out/log.txt``."""
    proc = launch(out, nproc, flags, timeout, entry, env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        raise RuntimeError(f"Megatron-LM run failed ({nproc} ranks, {' '.join(flags)}):\n{tail}")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(nproc)]


def initial_checkpoint(out: Path, optimizer: str = "sinkgd") -> Path:
    """Weights every compared run starts from: a 1-rank run of one iteration at lr 0 (nothing moves), saved."""
    ckpt = out / "init"
    if not (ckpt / "latest_checkpointed_iteration.txt").exists():
        run(out / "init-run", 1, [*MODEL, *CPU, "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "0",
                                  "--min-lr", "0", "--lr-decay-style", "constant", "--train-iters", "1",
                                  "--optimizer", optimizer, "--save", str(ckpt), "--save-interval", "1"])
    return ckpt


def from_checkpoint(ckpt: Path) -> list[str]:
    return ["--load", str(ckpt), "--finetune", "--no-load-optim", "--no-load-rng"]


def losses(dumps: list[dict]) -> list[float]:
    """The run's per-iteration loss (reported identically by every rank of the last pipeline stage)."""
    last = max(d["pp_rank"] for d in dumps)
    return next(d["losses"] for d in dumps if d["pp_rank"] == last and d["losses"])
