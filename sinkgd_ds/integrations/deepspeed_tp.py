"""Tensor-parallel slices inside DeepSpeed (AutoTP, Megatron-style layers with an ``mpu``) → what each rank holds.

DeepSpeed can cut a weight over a tensor-parallel group itself: AutoTP replaces ``nn.Linear`` by ``LinearLayer``
(the output dimension cut: q/k/v/gate/up, the LM head) or ``LinearAllreduce`` (the input dimension cut: o/down),
marks the weight ``tensor_model_parallel=True`` and records the cut in ``ds_autotp_universal_checkpoint_meta``
(partition dimension, the full shape, every rank's slice size, uneven ones included); the layer holds its TP
group as ``mp_group``. Megatron-style layers run under DeepSpeed with an ``mpu`` mark their weights
``tensor_model_parallel`` / ``partition_dim`` (even slices over the ``mpu``'s TP group).

A slice that the optimizer normalised as if it were the whole matrix would be silently wrong, so this module
turns that bookkeeping into the slice's place in its matrix (:class:`TPSlice`): an output-dimension cut holds
some rows, whose column sums the TP group completes; an input-dimension cut holds some columns, whose row sums
it completes. A weight that is marked as a slice but whose cut cannot be read is refused by name. This module
only describes layouts; it never touches a norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..optim.base import NAME_ATTR

__all__ = ["TPSlice", "UC_META", "tp_slices", "is_tp_marked"]

UC_META = "ds_autotp_universal_checkpoint_meta"


@dataclass(frozen=True)
class TPSlice:
    """A weight's TP-local (rows, cols) inside its full matrix, and the group that completes its sums."""

    shape: tuple[int, int]
    global_shape: tuple[int, int]
    global_offset: tuple[int, int]
    row_group: object | None  # completes row sums (input dimension cut)
    col_group: object | None  # completes column sums (output dimension cut)


def is_tp_marked(p: torch.Tensor) -> bool:
    """DeepSpeed's and Megatron's mark of a tensor-parallel slice."""
    return bool(getattr(p, "tensor_model_parallel", False))


def _local_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The TP-local shape (ZeRO-3 keeps it as ``ds_shape`` once it has partitioned the tensor)."""
    return tuple(int(s) for s in getattr(p, "ds_shape", None) or p.shape)


def _slice(name: str, local: tuple[int, ...], dim: int, sizes: list[int], rank: int, group) -> TPSlice:
    if len(local) != 2:
        raise ValueError(f"sinkgd_ds: {name!r} is a tensor-parallel slice of shape {local}; only 2-D weights are "
                         "described (others use the AdamW fallback: name them in fallback_patterns)")
    if not 0 <= rank < len(sizes) or sizes[rank] != local[dim]:
        raise ValueError(f"sinkgd_ds: {name!r}: DeepSpeed records slice sizes {sizes} along dim {dim}, but TP rank "
                         f"{rank} holds shape {local}; the layout cannot be proved, so it is refused")
    start, total = sum(sizes[:rank]), sum(sizes)
    m, n = local
    if dim == 0:
        return TPSlice((m, n), (total, n), (start, 0), None, group)
    return TPSlice((m, n), (m, total), (0, start), group, None)


def autotp_slice(name: str, p: torch.Tensor, group) -> TPSlice | None:
    """The slice of an AutoTP weight from DeepSpeed's universal-checkpoint metadata (None: replicated)."""
    meta = getattr(p, UC_META)
    if meta.get("replicated"):
        return None
    dim, local = meta.get("partition_dim"), _local_shape(p)
    reason = meta.get("unsupported_reason")
    widths = meta.get("sub_param_shard_widths")
    if reason or dim not in (0, 1) or (widths and dim != 0):
        what = reason or ("sub-parameter slices of the input dimension" if widths else f"partition_dim={dim!r}")
        raise ValueError(f"sinkgd_ds: {name!r} is an AutoTP slice ({meta.get('partition_type')!r}, {what}) whose "
                         "layout is not described here; it is refused rather than normalised as a whole matrix. "
                         "Keep it out of AutoTP (tensor_parallel.partition_config) or name it in fallback_patterns")
    world = dist.get_world_size(group=group)
    if widths:
        return fused_rows_slice(name, local, [[int(w) for w in ws] for ws in widths], dist.get_rank(group=group),
                                group)
    sizes = meta.get("partition_sizes")
    if not sizes:
        logical = meta.get("logical_shape") or meta.get("original_shape")
        if not logical or logical[dim] % world:
            raise ValueError(f"sinkgd_ds: {name!r}: AutoTP records no slice sizes and the full shape {logical} "
                             f"does not split evenly over {world} TP ranks; refused")
        sizes = [logical[dim] // world] * world
    return _slice(name, local, dim, [int(s) for s in sizes], dist.get_rank(group=group), group)


def fused_rows_slice(name: str, local: tuple[int, ...], widths: list[list[int]], rank: int, group) -> TPSlice:
    """A fused weight (qkv_proj, gate_up_proj: sub-parameters stacked along the rows) whose every sub-parameter
    AutoTP cut along its rows: rank r holds rows ``widths[s][r]`` of each sub-parameter s, stacked. The matrix is
    the whole fused weight, as the unsharded model's optimizer sees it: rows are complete on each rank, column sums
    are completed over the TP group (the order of rows does not enter them). This rank's rows are not one
    contiguous run of the full matrix, so stochastic rounding's element indices count them from this rank's first
    row (unbiased and deterministic, not the dense run's bits; fp32 is exact)."""
    if len(local) != 2 or sum(ws[rank] for ws in widths) != local[0]:
        raise ValueError(f"sinkgd_ds: {name!r}: AutoTP records sub-parameter row widths {widths}, but TP rank {rank} "
                         f"holds shape {local}; the layout cannot be proved, so it is refused")
    total, start = sum(sum(ws) for ws in widths), sum(widths[0][:rank])
    return TPSlice((local[0], local[1]), (total, local[1]), (min(start, total - local[0]), 0), None, group)


def megatron_slice(name: str, p: torch.Tensor, group) -> TPSlice:
    """A Megatron-style slice (``partition_dim``, even over the TP group)."""
    dim = getattr(p, "partition_dim", None)
    if dim not in (0, 1):
        raise ValueError(f"sinkgd_ds: {name!r} is marked tensor_model_parallel with partition_dim={dim!r}; only "
                         "output (0) and input (1) dimension cuts are described, so it is refused")
    if getattr(p, "partition_stride", 1) != 1:
        raise ValueError(f"sinkgd_ds: {name!r}: partition_stride={p.partition_stride} (strided TP slices) is not "
                         "described; refused")
    local, world = _local_shape(p), dist.get_world_size(group=group)
    return _slice(name, local, dim, [local[dim]] * world, dist.get_rank(group=group), group)


def _mpu_group(mpu: Any):
    if mpu is None:
        return None
    for attr in ("get_tensor_model_parallel_group", "get_model_parallel_group"):
        fn = getattr(mpu, attr, None)
        if callable(fn):
            return fn()
    return None


def tp_slices(module: torch.nn.Module, mpu: Any = None) -> dict[int, TPSlice | ValueError]:
    """id(parameter) -> its slice, for every tensor-parallel weight of ``module`` cut over more than one rank, or the
    error that refuses it (raised by the caller only for weights that take a matrix update: an AdamW parameter is
    exact on any slice). TP groups come from the layer that holds the weight (AutoTP's ``mp_group``), else from
    ``mpu``."""
    out: dict[int, TPSlice | ValueError] = {}
    fallback_group = _mpu_group(mpu)
    for mod_name, mod in module.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if not is_tp_marked(p) or id(p) in out or len(_local_shape(p)) < 2:
                continue  # (a sliced bias: elementwise AdamW)
            name = getattr(p, NAME_ATTR, None) or (f"{mod_name}.{pname}" if mod_name else pname)
            group = getattr(mod, "mp_group", None) or fallback_group
            if group is None:
                out[id(p)] = ValueError(
                    f"sinkgd_ds: {name!r} is marked as a tensor-parallel slice (tensor_model_parallel=True) but "
                    "neither its layer (mp_group) nor an mpu names its TP group; its layout cannot be proved, so it "
                    "is refused")
                continue
            if dist.get_world_size(group=group) == 1:
                continue
            try:
                tp = autotp_slice(name, p, group) if hasattr(p, UC_META) else megatron_slice(name, p, group)
            except ValueError as e:
                out[id(p)] = e
                continue
            if tp is not None:
                out[id(p)] = tp
    return out
