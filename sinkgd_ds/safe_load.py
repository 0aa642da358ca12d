"""Reading checkpoint files without running code from them.

A pickle can name any importable callable and have the unpickler call it, so ``torch.load(weights_only=False)``
or ``pickle.load`` on a tampered checkpoint file runs whatever its author wrote, as the training user, before the
first step. Checkpoint directories travel between people and clusters, so what this package reads from one goes
through here:

* ``torch.save`` files (``*.pt``): :func:`load` is ``torch.load(weights_only=True)``, with torch's safe-globals
  mechanism allowing exactly the classes our checkpoints hold beyond tensors and plain values
  (:data:`TORCH_FILE_TYPES`: DeepSpeed's ZeRO optimizer states keep three of their own);
* ``torch.distributed.checkpoint`` directories (FSDP2 and megatron-core's ``torch_dist`` checkpoints):
  :func:`load_dcp_metadata` unpickles ``.metadata`` allowing only DCP's own metadata classes
  (:data:`DCP_METADATA_TYPES`), and every non-tensor entry in the ``.distcp`` files it lists must load with
  ``weights_only=True`` (torch reads the tensor entries that way itself).

Third-party loaders still unpickle: DeepSpeed 0.19.8's ``load_checkpoint`` and its universal-format tools
(``torch.load(weights_only=False)`` on every file), torch 2.13's DCP ``FileSystemReader.read_metadata``
(``pickle.load``) and ``DefaultLoadPlanner.load_bytes`` (``weights_only=False`` on non-tensor entries), which
megatron-core's ``dist_checkpointing.load`` uses too. :func:`check_directory` checks those same bytes first: a
file that passes names no callable outside the allow-lists, so the third-party unpickler builds the same plain
objects. It does not help against a file changed between the check and the load.

    python -m sinkgd_ds.safe_load CKPT/TAG [CKPT/TAG ...]     # exit 0: every file checks out; 1: refused
"""

from __future__ import annotations

import argparse
import importlib
import io
import pickle
import sys
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["DCP_METADATA_TYPES", "TORCH_FILE_TYPES", "UnsafeCheckpointError", "check_directory", "load",
           "load_dcp_metadata", "problems"]

# Beyond torch's own weights-only set (tensors, dict, list, tuple, set, OrderedDict, str, int, float, bool, None,
# torch.Size, dtypes), the only classes a checkpoint of ours holds; each is a plain record whose construction runs
# nothing else.
TORCH_FILE_TYPES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # ZeRO / bf16 optimizer states: the (static) loss scaler
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # ... of an fp16 run
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # ZeRO optimizer states: the stage that wrote them
    "deepspeed.utils.tensor_fragment.fragment_address",  # ZeRO-1/2 optimizer states: param_slice_mappings
)

# What torch.distributed.checkpoint's .metadata holds (dataclasses, an enum, Size, dtypes, a layout by name);
# megatron-core's torch_dist checkpoints also keep their save plans there.
DCP_METADATA_TYPES = frozenset({
    *(f"torch.distributed.checkpoint.metadata.{n}" for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    "torch.distributed.checkpoint.filesystem._StorageInfo",
    *(f"torch.distributed.checkpoint.planner.{n}" for n in ("SavePlan", "WriteItem", "WriteItemType",
                                                            "TensorWriteData")),
    "torch.Size", "torch.serialization._get_layout", "pathlib.PosixPath", "collections.OrderedDict",
})

_TRUST = "resume only checkpoints you trust (docs/fault_tolerance.md)"


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file refused before anything in it was unpickled unsafely; the message names the file."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: refused to load: {reason}; {_TRUST}")
        self.where = where


# ---------------------------------------------------------------------- torch.save files
def load(path: str | Path, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU, allowing :data:`TORCH_FILE_TYPES`;
    ``mmap``: map the tensors' storage instead of reading it (a check that only needs the pickle)."""
    return _load_torch(str(path), str(path), mmap)


def _load_torch(source: str | IO[bytes], where: str, mmap: bool = False) -> Any:
    """Any class the file names outside the allow-lists is refused by name before torch reads it; whatever else
    torch's weights-only unpickler refuses (an opcode it cannot vouch for, a damaged stream) is refused too.
    Classes other code registered with torch process-wide (megatron-core adds argparse.Namespace, numpy arrays,
    ... on import) are set aside meanwhile: the allow-list is ours alone."""
    registered = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        return _load_torch_alone(source, where, mmap)
    finally:
        torch.serialization.add_safe_globals(registered)


def _load_torch_alone(source: str | IO[bytes], where: str, mmap: bool) -> Any:
    zipped = _is_zip(source)
    names = _named_globals(source) if zipped else []  # (other formats: torch's weights-only unpickler judges alone)
    foreign = sorted(set(names) - set(TORCH_FILE_TYPES))
    if foreign:
        raise UnsafeCheckpointError(where, f"it names {', '.join(foreign)}, which no checkpoint of ours stores "
                                           "and which could run code as it loads")
    try:
        allowed = [_resolve(n) for n in names]
    except ImportError as e:
        raise UnsafeCheckpointError(where, f"checking it needs {e.name}, which is not installed") from None
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(_rewound(source), map_location="cpu", weights_only=True, mmap=mmap and zipped)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(where, f"it does not load with torch.load(weights_only=True): {_reason(e)}") \
            from e
    except (RuntimeError, ValueError, EOFError, OSError) as e:  # (a damaged zip or stream)
        raise UnsafeCheckpointError(where, f"torch.load(weights_only=True) cannot read it ({type(e).__name__}: "
                                           f"{_reason(e)})") from e


def _named_globals(source: str | IO[bytes]) -> list[str]:
    """The classes / functions a torch.save zip file names beyond torch's weights-only set, read without running
    anything."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(_rewound(source))
    except (ValueError, RuntimeError):  # (torchscript, a damaged zip: torch.load then says what is wrong)
        return []


def _is_zip(source: str | IO[bytes]) -> bool:
    if isinstance(source, str):
        with open(source, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    magic = _rewound(source).read(4)
    return magic == b"PK\x03\x04"


def _rewound(source: str | IO[bytes]) -> str | IO[bytes]:
    if not isinstance(source, str):
        source.seek(0)
    return source


def _resolve(name: str) -> Any:
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _reason(e: BaseException) -> str:
    """torch's weights-only message without its advice (it suggests allow-listing what it refused)."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0].split(". Please use", 1)[0] if lines else type(e).__name__


# ---------------------------------------------------------------------- torch.distributed.checkpoint
class _MetadataUnpickler(pickle.Unpickler):
    """Python's documented way to restrict an unpickler: every class or function a pickle names goes through
    ``find_class``; names outside :data:`DCP_METADATA_TYPES` (and torch's dtypes) are refused."""

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in DCP_METADATA_TYPES or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {full}, which DCP metadata never holds and which could run code "
                                     "as it loads")


def load_dcp_metadata(path: str | Path) -> Any:
    """A ``torch.distributed.checkpoint`` ``.metadata`` file, unpickled with only DCP's metadata classes."""
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        reason = str(e) if str(e).startswith("it names") else f"not a DCP metadata pickle ({type(e).__name__}: {e})"
        raise UnsafeCheckpointError(str(path), reason) from None


def _check_dcp_entries(directory: Path, metadata_file: Path) -> None:
    """Every non-tensor entry the metadata lists (DCP's loader unpickles them with weights_only=False) must load
    with weights_only=True."""
    for fqn, rel, offset, length, transforms in _byte_entries(metadata_file):
        file = directory / rel
        where = f"{file} (entry {fqn!r})"
        if directory.resolve() not in file.resolve().parents:
            raise UnsafeCheckpointError(str(metadata_file), f"entry {fqn!r} points outside the checkpoint")
        if transforms:
            raise UnsafeCheckpointError(where, "it is stored through transforms this check cannot undo")
        try:
            with open(file, "rb") as f:
                f.seek(offset)
                blob = f.read(length)
        except OSError as e:
            raise UnsafeCheckpointError(where, f"unreadable ({e})") from None
        _load_torch(io.BytesIO(blob), where)


def _byte_entries(metadata_file: Path) -> list[tuple[str, str, int, int, Any]]:
    """(key, file, offset, length, transforms) of every non-tensor entry in a DCP ``.metadata``."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = load_dcp_metadata(metadata_file)
    try:
        kinds = metadata.state_dict_metadata
        return [(index.fqn, str(info.relative_path), int(info.offset), int(info.length), info.transform_descriptors)
                for index, info in metadata.storage_data.items()
                if isinstance(kinds.get(index.fqn), BytesStorageMetadata)]
    except (AttributeError, TypeError, ValueError) as e:
        raise UnsafeCheckpointError(str(metadata_file), f"not DCP metadata ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------- whole checkpoints
def check_directory(path: str | Path) -> None:
    """Raise :class:`UnsafeCheckpointError` for the first file under ``path`` a loader would unpickle and that does
    not pass: every ``*.pt`` (DeepSpeed, our engine.pt, megatron-core's common.pt) and every DCP ``.metadata`` with
    the non-tensor entries it lists."""
    directory = Path(path)
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        if file.suffix == ".pt":
            load(file, mmap=True)
        elif file.name.endswith(".metadata"):
            _check_dcp_entries(file.parent, file)


def problems(path: str | Path) -> list[str]:
    """:func:`check_directory` as a list of messages (empty: every file checks out)."""
    try:
        check_directory(path)
    except UnsafeCheckpointError as e:
        return [str(e)]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check that a checkpoint's pickled files hold only tensors, plain "
                                     "values and the few classes sinkgd-ds, DeepSpeed and torch DCP store, without "
                                     "running anything from them.")
    parser.add_argument("checkpoints", nargs="+", help="checkpoint directories, e.g. runs/x/checkpoints/step100")
    args = parser.parse_args(argv)
    failed = 0
    for path in args.checkpoints:
        if not Path(path).is_dir():
            print(f"{path}: not a directory", file=sys.stderr)
            failed += 1
            continue
        found = problems(path)
        print("\n".join(found) if found else f"{path}: every pickled file checks out", file=sys.stderr if found
              else sys.stdout)
        failed += bool(found)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
