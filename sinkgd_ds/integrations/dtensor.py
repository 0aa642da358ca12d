"""DTensor parameters (FSDP2's ``fully_shard``, torch tensor parallelism): their layout, read from placements.

A DTensor parameter's local block is a box ``[r0, r0 + mr) x [c0, c0 + nc)`` of the global (m, n) matrix
(torch computes it from the mesh coordinates and the placements, uneven and strided cuts included). In the
engine's terms (``sinkgd_ds.layout``) the rank-local matrix is the column slice ``(m, nc)`` this rank's columns
belong to, of which it holds the rows ``[r0, r0 + mr)`` as one flat fragment; the mesh dimensions that cut
rows complete the sums over the other rows (``shard_group``), those that cut columns complete the row sums
over the other column slices (``row_group``), and ``Replicate`` dimensions add nothing. A tensor dimension cut
by several mesh dimensions (FSDP x TP) is completed by one all-reduce per mesh dimension, in mesh order.
The column slice sits at column ``c0`` of the global matrix (``global_offset``, for stochastic rounding's
logical element indices). Rows cut twice along dim 0 (``_StridedShard``, FSDP2 over a column-parallel TP
weight) are not one contiguous run of global rows: the sums are exact as ever, but the rounding indices then
count this rank's rows as if they were (unbiased and deterministic, not the dense run's bits).

This module only describes layouts; it never touches a norm.
"""

from __future__ import annotations

import torch

from ..layout import Fragment, MatrixSpec

__all__ = ["is_dtensor", "local_tensor", "dtensor_spec"]


def is_dtensor(t: object) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # (a torch without DTensor)
        return False
    return isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's block of a DTensor, as one stable tensor object (``to_local()`` makes a new view each call;
    the engine keys its prepared descriptors by tensor identity and address)."""
    local = getattr(t, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else t.to_local()


def _groups(mesh, dims: list[int]) -> tuple | object | None:
    groups = tuple(mesh.get_group(d) for d in dims)
    return None if not groups else groups[0] if len(groups) == 1 else groups


def dtensor_spec(name: str, p: torch.Tensor) -> MatrixSpec:
    """The layout of a DTensor matrix parameter (views of more than 2 dims as (d0, rest))."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # (older torch)
        _StridedShard = Shard
    shape = tuple(p.shape)
    if len(shape) < 2:
        raise ValueError(f"{name!r} of shape {shape} is not a matrix")
    row_dims, col_dims = [], []
    for mesh_dim, pl in enumerate(p.placements):
        if isinstance(pl, Replicate):
            continue
        if isinstance(pl, (Shard, _StridedShard)) and pl.dim == 0:
            row_dims.append(mesh_dim)
        elif isinstance(pl, (Shard, _StridedShard)) and pl.dim == 1 and len(shape) == 2:
            col_dims.append(mesh_dim)
        else:
            raise ValueError(f"parameter {name!r}: placement {pl!r} on mesh dimension {mesh_dim} is not supported "
                             f"(supported: Shard(0), Shard(1) of a 2-D weight, _StridedShard of those, Replicate); "
                             f"its row and column statistics could not be completed exactly")
    local_shape, offset = compute_local_shape_and_global_offset(shape, p.device_mesh, p.placements)
    m = shape[0]
    n = 1
    for s in shape[1:]:
        n *= s
    mr = local_shape[0]
    nc = local_shape[1] if len(shape) == 2 else n
    local = local_tensor(p)
    if local.numel() != mr * nc or not local.is_contiguous():
        raise ValueError(f"parameter {name!r}: its local block {tuple(local.shape)} does not match the layout "
                         f"{mr} x {nc} computed from placements {p.placements}")
    frags = (Fragment(local, 0, offset[0] * nc, mr * nc),) if mr * nc else ()
    return MatrixSpec(name, (m, nc), frags, owner=local, global_shape=(m, n),
                      shard_group=_groups(p.device_mesh, row_dims), row_group=_groups(p.device_mesh, col_dims),
                      global_offset=(0, offset[1] if len(shape) == 2 else 0))
