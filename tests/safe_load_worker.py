"""The FSDP2 engine's own checkpoint loader on a real (one-rank, gloo) process group: a clean save / load resumes
bit for bit; a checkpoint whose ``engine.pt`` or DCP ``.metadata`` was replaced by a pickle that would write a
marker file is refused, naming the file, and the marker is never written."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from launch.config import load_run_config
from launch.fsdp_engine import FSDPEngine
from launch.trainer import build_model

VOCAB, SEQ, ROWS = 256, 16, 2
DS_CFG = {"train_micro_batch_size_per_gpu": ROWS, "gradient_clipping": 1.0,
          "optimizer": {"type": "SinkGD", "params": {"lr": 0.02, "lr_scale": 0.05, "sinkhorn_iters": 5}},
          "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 3}}}


class Payload:
    """Unpickled without restriction, this runs ``open(marker, 'w').write(...)``: the code a tampered file runs."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _engine() -> FSDPEngine:
    import sinkgd_ds  # noqa: F401  - registers the optimizers

    run = load_run_config("tiny", ["model.num_hidden_layers=2", "model.hidden_size=64", "model.intermediate_size=96"])
    return FSDPEngine(build_model(run, VOCAB), DS_CFG)


def _steps(engine: FSDPEngine, first: int, last: int) -> list[float]:
    losses = []
    for step in range(first, last):
        ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=torch.Generator().manual_seed(step))
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


def _refusal(engine: FSDPEngine, directory: Path, tag: str) -> str:
    from sinkgd_ds.safe_load import UnsafeCheckpointError

    try:
        engine.load_checkpoint(str(directory), tag=tag)
    except UnsafeCheckpointError as e:
        return str(e)
    return "loaded"


def round_trip(rank: int, world: int, root: str) -> dict:
    """2 steps, save, 2 more (the straight run); a fresh engine loads the checkpoint and takes the same 2 steps; then
    the checkpoint with engine.pt, and with .metadata, replaced by a payload pickle, each loaded by a fresh engine."""
    directory = Path(root) / "checkpoints"
    engine = _engine()
    _steps(engine, 0, 2)
    client = {"step": 2, "losses": [1.5, 1.25], "val": [(2, 1.0)], "data_sha256": {"text": "abc"}}
    engine.save_checkpoint(str(directory), "step2", client)
    straight = _steps(engine, 2, 4)
    fresh = _engine()
    loaded, state = fresh.load_checkpoint(str(directory), tag="step2")
    out = {"loaded": loaded, "client_state": state, "micro_steps": fresh.micro_steps, "straight": straight}
    out["resumed"] = _steps(fresh, 2, 4)
    for name in ("engine.pt", ".metadata"):
        tampered = directory / f"tampered{name}"
        shutil.copytree(directory / "step2", tampered)
        marker = Path(root) / f"marker{name}"
        if name == "engine.pt":
            torch.save({"scheduler": None, "micro_steps": 2, "client_state": Payload(str(marker))}, tampered / name)
        else:
            import pickle

            (tampered / name).write_bytes(pickle.dumps(Payload(str(marker))))
        out[name] = {"file": str(tampered / name), "error": _refusal(_engine(), directory, tampered.name),
                     "marker_written": marker.exists()}
    return out
