"""Resharding DeepSpeed checkpoints of SinkGD / SCALE / SWAN runs (resume on a different world size).

DeepSpeed's rigid ZeRO checkpoints reload only on the same data-parallel size; changing it goes
through the *universal* format (``ds_to_universal`` offline, then ``"checkpoint": {"load_universal":
true}``). DeepSpeed's converter assumes every parameter group carries Adam's ``exp_avg`` and
``exp_avg_sq``; our matrix groups carry no state at all, so it fails on them. ``to_universal``
feeds the converter a copy of the checkpoint where the groups without Adam moments get zero
placeholders, then deletes those placeholders from the result: a matrix parameter's universal
folder holds only ``fp32.pt``, and DeepSpeed's ZeRO-1/2 loader restores exactly the files it finds.
ZeRO-3 is refused with the reason (see ``_add_placeholders``). The AdamW fallback state
(and SCALE's head momentum, stored as ``exp_avg``) is resharded by DeepSpeed itself.

The input may come from anywhere: its files are read with ``weights_only=True`` (``sinkgd_ds.safe_load``) and
checked before DeepSpeed's converter, which unpickles them with ``weights_only=False``, sees any of them.

Command line::

    python -m sinkgd_ds.checkpoint --input_folder CKPT/TAG --output_folder CKPT/TAG_universal
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import tempfile
from argparse import Namespace

import torch

from . import safe_load

__all__ = ["to_universal"]

ADAM_KEYS = ("exp_avg", "exp_avg_sq")
OPTIM_SUFFIX = "_optim_states.pt"


def _add_placeholders(osd: dict) -> set[tuple[str, str]]:
    """Give every flat group zero Adam moments where it has none, in place; return (parameter, key) added."""
    if "fp32_flat_groups" in osd:
        raise NotImplementedError(
            "ZeRO-3 checkpoints cannot be resharded for SinkGD/SCALE/SWAN: DeepSpeed's ZeRO-3 universal loader "
            "(stage3.py, load_hp_checkpoint_state_from_checkpoint_dir_stage3) copies param_groups[0]'s settings onto "
            "every param group and requires exp_avg/exp_avg_sq for every parameter, so it cannot restore an "
            "optimizer whose groups differ (matrix groups vs the AdamW fallback). ZeRO-3 checkpoints reload at the "
            "same world size with engine.load_checkpoint; to change the world size, train with ZeRO-1 or ZeRO-2")
    base = osd["base_optimizer_state"]
    if not isinstance(base, dict):
        raise ValueError("elastic ZeRO checkpoints (zero_optimization.elastic_checkpoint=true) cannot be "
                         "converted; save with elastic_checkpoint=false (the default)")
    states, flats = base["state"], osd["single_partition_of_fp32_groups"]
    # the fp32 partitions are saved without their alignment padding, the optimizer state with it
    paddings = osd.get("group_paddings") or [0] * len(flats)
    added: set[tuple[str, str]] = set()
    for idx, (flat, mapping) in enumerate(zip(flats, osd["param_slice_mappings"])):
        state = states.setdefault(idx, {})
        for key in ADAM_KEYS:
            if key not in state:
                state[key] = torch.zeros(flat.numel() + paddings[idx], dtype=torch.float32)
                added.update((name, key) for name in mapping)
    return added


def _deepspeed_converter():
    try:
        from deepspeed.checkpoint import ds_to_universal
    except ImportError as e:  # pragma: no cover - depends on the installed DeepSpeed
        raise RuntimeError("sinkgd_ds.checkpoint needs deepspeed.checkpoint.ds_to_universal") from e
    if not hasattr(ds_to_universal, "main"):
        import deepspeed

        raise RuntimeError(f"deepspeed {deepspeed.__version__}: ds_to_universal.main is missing")
    return ds_to_universal


def to_universal(input_folder: str, output_folder: str, workers: int = 1) -> set[str]:
    """Convert one saved ZeRO-1/2 tag folder (e.g. ``ckpt/global_step100``) to DeepSpeed's universal format.

    Returns the names of the parameters that carry no Adam moments (SinkGD/SWAN matrices, SCALE's
    hidden matrices); their universal folders hold the fp32 weight (and SCALE's head its ``exp_avg``).
    """
    if not os.path.isdir(input_folder):
        raise FileNotFoundError(f"input_folder {input_folder!r} is not a directory")
    optim_files = glob.glob(os.path.join(input_folder, "*" + OPTIM_SUFFIX))
    if not optim_files:
        raise FileNotFoundError(f"no *{OPTIM_SUFFIX} files in {input_folder!r}: not a DeepSpeed ZeRO checkpoint tag")
    converter = _deepspeed_converter()
    safe_load.check_directory(input_folder)  # (before DeepSpeed's converter unpickles any of it)
    parent = os.path.dirname(os.path.abspath(output_folder))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".sinkgd-universal-", dir=parent)
    try:
        added: set[tuple[str, str]] = set()
        for path in glob.glob(os.path.join(input_folder, "*")):
            target = os.path.join(staging, os.path.basename(path))
            if path.endswith(OPTIM_SUFFIX):
                sd = safe_load.load(path)
                added |= _add_placeholders(sd["optimizer_state_dict"])
                torch.save(sd, target)
            else:
                os.symlink(os.path.abspath(path), target)
        converter.main(Namespace(input_folder=staging, output_folder=output_folder, num_extract_workers=workers,
                                 num_merge_workers=workers, keep_temp_folder=False, strict=True,
                                 inject_missing_state=True))
        for name, key in added:
            os.remove(os.path.join(output_folder, "zero", name, f"{key}.pt"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {name for name, _ in added}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input_folder", required=True, help="a saved tag folder, e.g. ckpt/global_step100")
    parser.add_argument("--output_folder", required=True, help="e.g. ckpt/global_step100_universal")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        stateless = to_universal(args.input_folder, args.output_folder, args.workers)
    except safe_load.UnsafeCheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"universal checkpoint in {args.output_folder} ({len(stateless)} stateless matrix parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
