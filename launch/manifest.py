"""Checkpoint manifests: what a run saved, file by file, so a resume can refuse a damaged checkpoint before it
starts any process group.

The manifest is the last file of a checkpoint written (by rank 0, once every rank's files are on disk): it
lists every file with its size and CRC-32 and the run's identity (model, data, optimizer, layout). A checkpoint
without one never finished saving. ``select`` checks the checkpoint ``latest`` names (and, when asked, the older
kept ones) against the run that wants to resume it: a missing, truncated or corrupted file, or a checkpoint of
another model / optimizer / layout that this engine cannot load, is an error naming the file and the problem.
Once sizes and checksums agree, every file a loader would unpickle must hold nothing that could run code
(``sinkgd_ds.safe_load``): the CRC-32s guard against accidents, not against someone who rewrites the manifest too.

Every rank re-reads every file to check it (one pass, C-speed CRC); on multi-terabyte checkpoints that is the
price of never resuming from a damaged one.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

from launch.errors import CheckpointError

NAME = "manifest.json"
FORMAT = 1
_BLOCK = 1 << 22


def crc32_of(path: Path, sync: bool = False) -> int:
    """CRC-32 of a file's bytes; ``sync`` also flushes it to disk (a manifest must not outlive its files)."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            crc = zlib.crc32(block, crc)
        if sync:
            os.fsync(f.fileno())
    return crc


def write(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """Rank 0, after every rank wrote its files into ``path``: fsync them and record them with ``identity``."""
    files = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != NAME):
        files[f.relative_to(path).as_posix()] = {"bytes": f.stat().st_size, "crc32": crc32_of(f, sync=True)}
    manifest = {"format": FORMAT, "identity": identity, "files": files}
    tmp = path / f".{NAME}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / NAME)
    return manifest


def read(path: Path) -> dict[str, Any]:
    """The manifest of checkpoint ``path``; a CheckpointError when it is missing or unreadable."""
    file = path / NAME
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not file.is_file():
        raise CheckpointError(f"{file}: missing, so the save of {path.name} never finished (or an older sinkgd-ds "
                              "wrote it)")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable ({e})") from None
    valid = isinstance(manifest, dict) and manifest.get("format") == FORMAT and isinstance(manifest.get("files"), dict)
    if not valid:
        raise CheckpointError(f"{file}: not a sinkgd-ds checkpoint manifest of format {FORMAT}")
    return manifest


def total_bytes(path: Path) -> int:
    """Bytes of a complete checkpoint, from its manifest (0 if it has none)."""
    try:
        return sum(f["bytes"] for f in read(path)["files"].values())
    except CheckpointError:
        return 0


def file_problems(path: Path, manifest: dict[str, Any]) -> list[str]:
    """Every listed file present, of the recorded size and checksum."""
    problems = []
    for rel, want in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            problems.append(f"{f}: missing (the save wrote {want['bytes']} bytes there)")
        elif (size := f.stat().st_size) != want["bytes"]:
            problems.append(f"{f}: {'truncated' if size < want['bytes'] else 'grown'} to {size} bytes, the save wrote "
                            f"{want['bytes']}")
        elif crc32_of(f) != want["crc32"]:
            problems.append(f"{f}: corrupted (its CRC-32 differs from the one recorded at save time)")
    return problems


def identity_problems(saved: dict[str, Any], wanted: dict[str, Any], manifest_file: Path) -> list[str]:
    """What this run needs to be equal to the saved run, key by key. ``wanted`` maps a key to its value here; a
    key whose value is a dict is compared entry by entry (e.g. the model config), so the message names the entry."""
    problems = []
    for key, want in wanted.items():
        have = saved.get(key)
        if isinstance(want, dict) and isinstance(have, dict):
            for sub in sorted(set(want) | set(have)):
                if want.get(sub) != have.get(sub):
                    problems.append(f"{manifest_file}: {key}.{sub} is {have.get(sub)!r} in the checkpoint, "
                                    f"{want.get(sub)!r} in this run")
        elif have != want:
            problems.append(f"{manifest_file}: {key} is {have!r} in the checkpoint, {want!r} in this run")
    return problems


def check(path: Path, wanted: dict[str, Any]) -> list[str]:
    """Everything wrong with resuming checkpoint ``path`` in a run of identity ``wanted`` (empty: usable)."""
    try:
        manifest = read(path)
    except CheckpointError as e:
        return [str(e)]
    problems = identity_problems(manifest["identity"], wanted, path / NAME) + file_problems(path, manifest)
    return problems or unsafe_problems(path)  # (a damaged file is named as such, not as unsafe)


def unsafe_problems(path: Path) -> list[str]:
    """A file that the engine's loader would unpickle and that could run code as it loads (DeepSpeed's
    ``load_checkpoint`` and torch DCP unpickle without restriction): checked for every file in the directory, listed
    in the manifest or not, since a manifest rewritten along with the files vouches for anything."""
    from sinkgd_ds.safe_load import problems

    return problems(path)


def kept_tags(ckpt: Path) -> list[str]:
    """Complete-looking ``step<N>`` directories, newest first."""
    tags = [p.name for p in ckpt.glob("step*") if p.is_dir() and p.name[4:].isdigit()]
    return sorted(tags, key=lambda t: int(t[4:]), reverse=True)


def select(ckpt: Path, wanted: dict[str, Any], fallback: bool) -> tuple[Path, dict[str, list[str]]]:
    """The checkpoint to resume: the one ``latest`` names if it checks out; with ``fallback``, else the newest older
    kept one that does. Returns it and the rejected tags with their problems; a CheckpointError when none can be
    used (or, without ``fallback``, when the latest cannot)."""
    latest = ckpt / "latest"
    try:
        named = latest.read_text().strip()
    except OSError as e:
        raise CheckpointError(f"{latest}: unreadable ({e})") from None
    order = [named] + [t for t in kept_tags(ckpt) if t != named]
    rejected: dict[str, list[str]] = {}
    for tag in order:
        problems = check(ckpt / tag, wanted)
        if not problems:
            return ckpt / tag, rejected
        rejected[tag] = problems
        if not fallback:
            older = order[1:]
            hint = (f"older kept checkpoints: {', '.join(older)}; pass --resume_fallback to resume from the newest "
                    "of them that checks out" if older else "no older checkpoint is kept to fall back to")
            raise CheckpointError(f"--resume: the checkpoint {latest} names cannot be resumed:\n{describe(rejected)}"
                                  f"\n{hint}")
    raise CheckpointError(f"--resume --resume_fallback: no kept checkpoint in {ckpt} can be resumed:\n"
                          f"{describe(rejected)}")


def describe(rejected: dict[str, list[str]]) -> str:
    return "\n".join(f"{tag}:\n" + "\n".join(f"  - {p}" for p in problems) for tag, problems in rejected.items())
