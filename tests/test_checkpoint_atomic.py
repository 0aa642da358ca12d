"""launch/runstate.save: a checkpoint is complete or invisible. A save killed half way leaves ``latest`` and
the previous checkpoint as they were; older checkpoints are pruned only after the new one is complete."""

from __future__ import annotations

from pathlib import Path

from .distributed import spawn


class _Engine:
    """Writes one file per save, like an engine's checkpoint; ``fail`` makes the save die half way."""

    def __init__(self):
        self.fail = False

    def save_checkpoint(self, directory, tag, client_state, save_latest=True):
        d = Path(directory) / tag
        d.mkdir(parents=True, exist_ok=True)
        (d / "part0.pt").write_text(repr(client_state))
        if self.fail:
            raise OSError("No space left on device")  # (as a full disk would, mid-save)
        (d / "part1.pt").write_text("done")
        assert not save_latest  # (runstate points latest itself, once the tag is complete)


def _saves(rank, world, out):
    from launch import runstate

    out = Path(out)
    engine = _Engine()
    runstate.save(engine, out, 1, {"step": 1}, keep=1)
    ckpt = runstate.checkpoint_dir(out)
    after_first = sorted(p.name for p in ckpt.iterdir())
    engine.fail = True
    try:
        runstate.save(engine, out, 2, {"step": 2}, keep=1)
        died = False
    except runstate.CheckpointSaveError as e:
        died = "No space left on device" in str(e) and "checkpoint step1 is intact" in str(e)
    after_death = sorted(p.name for p in ckpt.iterdir())
    latest_after_death = (ckpt / "latest").read_text()
    step1_files = sorted(p.name for p in (ckpt / "step1").iterdir())
    engine.fail = False
    runstate.save(engine, out, 3, {"step": 3}, keep=1)
    final, latest = sorted(p.name for p in ckpt.iterdir()), (ckpt / "latest").read_text()
    size3 = sum(f.stat().st_size for f in (ckpt / "step3").iterdir() if f.name != "manifest.json")
    real = runstate.shutil.disk_usage
    runstate.shutil.disk_usage = lambda path: real(path)._replace(free=size3)  # (room for less than step3 + 5 %)
    try:
        runstate.save(engine, out, 4, {"step": 4}, keep=1)
        full = None
    except runstate.CheckpointSaveError as e:
        full = str(e)
    finally:
        runstate.shutil.disk_usage = real
    return dict(full=full, after_full=sorted(p.name for p in ckpt.iterdir()), after_first=after_first, died=died,
                after_death=after_death, latest_after_death=latest_after_death, step1_files=step1_files, final=final,
                latest=latest)


def test_a_killed_save_leaves_the_previous_checkpoint(tmp_path):
    (r,) = spawn(_saves, 1, str(tmp_path))
    assert r["after_first"] == ["latest", "step1"]
    assert r["died"] and r["latest_after_death"] == "step1"
    assert r["step1_files"] == ["manifest.json", "part0.pt", "part1.pt"]
    assert "step2" not in r["after_death"]  # (only step2.partial: invisible to --resume)
    assert r["final"] == ["latest", "step3"] and r["latest"] == "step3"  # pruned after step3 was complete
    # not enough room for a checkpoint as large as the last one: refused before any file is written
    assert r["full"] is not None and "not enough disk space to save checkpoint step4" in r["full"], r["full"]
    assert "checkpoint step3 is intact" in r["full"] and r["after_full"] == ["latest", "step3"]
