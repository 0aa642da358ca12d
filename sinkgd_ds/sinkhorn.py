"""The sharded SR-Sinkhorn engine: the only place where row/column normalisation is computed.

SR-Sinkhorn only ever multiplies rows and columns by positive numbers, so after any number of
half-iterations the normalised gradient is ``diag(r) @ G @ diag(c)``.  We keep just ``r`` (m) and
``c`` (blocks x n) in fp32:

    r_i = sqrt(n) / sqrt(sum_j G_ij^2 c_{b(i)j}^2)       (row half-iteration)
    c_bj = sqrt(m_b) / sqrt(sum_{i in b} r_i^2 G_ij^2)    (column half-iteration)

Both are sums, so a rank holding any subset of the elements adds the terms it holds, and one
all-reduce of the partial vectors (bucketed across every matrix of the step, one per process group
and half-iteration) completes them exactly.  The update ``r_i G_ij c_j`` is then applied to the
local piece only.  A zero sum gives a zero scale (a zero row/column gets a zero update), the same
rule in every layout; non-finite sums are reported so the caller can skip the step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from .layout import MatrixSpec, Segment

__all__ = ["Scales", "normalize_scales", "apply_scaled_update_", "apply_dense_update_", "gather_matrix", "CommStats"]

Half = Literal["row", "col"]
Direction = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Scales:
    """``r`` (m,) and ``c`` (blocks, n) such that the normalised matrix is diag(r) G diag(c_b)."""

    r: torch.Tensor
    c: torch.Tensor
    finite: bool = True


@dataclass
class CommStats:
    """What the engine sent, for tests and logs: number of collectives and floats reduced."""

    collectives: int = 0
    elements: int = 0


def _view(spec: MatrixSpec, seg: Segment, direction: Direction) -> torch.Tensor:
    frag = spec.fragments[seg.fragment]
    flat = direction(frag.tensor).view(-1)
    return flat[seg.offset : seg.offset + seg.rows * seg.cols].view(seg.rows, seg.cols)


def _row_sums(spec: MatrixSpec, csq: torch.Tensor, direction: Direction, device) -> torch.Tensor:
    out = torch.zeros(spec.shape[0], dtype=torch.float32, device=device)
    for seg in spec.segments:
        g2 = _view(spec, seg, direction).float().square()
        out[seg.row : seg.row + seg.rows].addmv_(g2, csq[seg.block, seg.col : seg.col + seg.cols])
    return out


def _col_sums(spec: MatrixSpec, rsq: torch.Tensor, direction: Direction, device) -> torch.Tensor:
    out = torch.zeros(spec.blocks.count, spec.shape[1], dtype=torch.float32, device=device)
    for seg in spec.segments:
        g2 = _view(spec, seg, direction).float().square()
        out[seg.block, seg.col : seg.col + seg.cols].addmv_(g2.t(), rsq[seg.row : seg.row + seg.rows])
    return out


def all_reduce_sum(buf: torch.Tensor, group) -> None:
    """Sum ``buf`` over ``group``: a torch ProcessGroup, or any object with ``all_reduce(tensor)``
    (used to simulate several ranks inside one process in tests)."""
    if hasattr(group, "all_reduce"):
        group.all_reduce(buf)
        return
    dev = _comm_device(group, buf.device)
    tmp = buf.to(dev)
    dist.all_reduce(tmp, op=dist.ReduceOp.SUM, group=group)
    if tmp is not buf:
        buf.copy_(tmp)


def _comm_device(group, fallback: torch.device) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl" and fallback.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return fallback


def _allreduce_bucketed(
    vectors: list[torch.Tensor], groups: list[tuple[object | None, object | None]], stats: CommStats
) -> None:
    """Sum each vector over its groups: stage 0 = shard (data-parallel) group, stage 1 = TP group.

    Per stage, every distinct group gets ONE all-reduce carrying the concatenation of all vectors
    that need it, in list order (which all ranks of the group agree on).
    """
    for stage in (0, 1):
        buckets: dict[int, tuple[object, list[int]]] = {}
        for i, gs in enumerate(groups):
            g = gs[stage]
            if g is not None:
                buckets.setdefault(id(g), (g, []))[1].append(i)
        for group, idx in buckets.values():
            parts = [vectors[i].reshape(-1) for i in idx]
            buf = torch.cat(parts)
            all_reduce_sum(buf, group)
            stats.collectives += 1
            stats.elements += buf.numel()
            pos = 0
            for i in idx:
                k = vectors[i].numel()
                vectors[i].view(-1).copy_(buf[pos : pos + k])
                pos += k


def _guarded_scale(sums: torch.Tensor, target: torch.Tensor | float) -> torch.Tensor:
    # zero sum -> zero scale; NaN stays NaN and inf -> 0 (which turns into NaN one half later),
    # so non-finite input is always visible in the sums we check.
    return torch.where(sums == 0, torch.zeros_like(sums), target * torch.rsqrt(sums))


def normalize_scales(
    specs: Sequence[MatrixSpec],
    direction: Direction,
    schedule: Sequence[Half],
    stats: CommStats | None = None,
) -> list[Scales]:
    """Run the half-iterations of ``schedule`` on every matrix of ``specs`` together.

    ``direction(tensor)`` returns the tensor to normalise for a fragment's storage tensor (its
    ``.grad``, or a momentum buffer of the same shape). Returns one :class:`Scales` per spec; all
    ranks that share a matrix get bit-identical scales, hence identical ``finite`` decisions.
    """
    stats = stats if stats is not None else CommStats()
    scales: list[Scales] = []
    for spec in specs:
        dev = spec.owner.device
        m, n = spec.shape
        scales.append(
            Scales(torch.ones(m, dtype=torch.float32, device=dev), torch.ones(spec.blocks.count, n, device=dev))
        )
    bad = [torch.zeros((), dtype=torch.bool, device=s.r.device) for s in scales]
    for half in schedule:
        if half == "row":
            sums = [_row_sums(sp, sc.c.square(), direction, sc.r.device) for sp, sc in zip(specs, scales)]
            _allreduce_bucketed(sums, [(sp.shard_group, sp.row_group) for sp in specs], stats)
            for i, (sp, sc) in enumerate(zip(specs, scales)):
                bad[i] |= ~torch.isfinite(sums[i]).all()
                sc.r = _guarded_scale(sums[i], sp.row_target)
        elif half == "col":
            sums = [_col_sums(sp, sc.r.square(), direction, sc.r.device) for sp, sc in zip(specs, scales)]
            _allreduce_bucketed(sums, [(sp.shard_group, sp.col_group) for sp in specs], stats)
            for i, (sp, sc) in enumerate(zip(specs, scales)):
                bad[i] |= ~torch.isfinite(sums[i]).all()
                sc.c = _guarded_scale(sums[i], sp.col_targets().to(sums[i].device)[:, None])
        else:
            raise ValueError(f"schedule entries must be 'row' or 'col', got {half!r}")
    if bad:
        for sc, flag in zip(scales, torch.stack(bad).tolist()):
            sc.finite = not flag
    return scales


def apply_scaled_update_(
    spec: MatrixSpec,
    scales: Scales,
    direction: Direction,
    step_size: float,
    weight_decay: float = 0.0,
    extra_scale: float = 1.0,
) -> None:
    """W <- W (1 - step_size * weight_decay) - step_size * extra_scale * diag(r) G diag(c), on local pieces."""
    for seg in spec.segments:
        frag = spec.fragments[seg.fragment]
        p = frag.tensor.view(-1)[seg.offset : seg.offset + seg.rows * seg.cols].view(seg.rows, seg.cols)
        g = _view(spec, seg, direction)
        upd = g.float() * scales.r[seg.row : seg.row + seg.rows, None]
        upd.mul_(scales.c[seg.block, seg.col : seg.col + seg.cols])
        if weight_decay:
            p.mul_(1.0 - step_size * weight_decay)
        p.add_(upd.to(p.dtype), alpha=-step_size * extra_scale)


def gather_matrix(spec: MatrixSpec, direction: Direction) -> torch.Tensor:
    """The full rank-local matrix (fp32), assembled from the fragments of every rank in shard_group.

    Only for optimizers that need the whole matrix (SWAN's whitening); SinkGD and SCALE never call it.
    """
    m, n = spec.shape
    dev = spec.owner.device
    full = torch.zeros(m * n, dtype=torch.float32, device=dev)
    for f in spec.fragments:
        full[f.start : f.start + f.numel] = direction(f.tensor).view(-1)[f.offset : f.offset + f.numel].float()
    if spec.shard_group is not None:
        all_reduce_sum(full, spec.shard_group)  # fragments are disjoint, so the sum assembles them
    return full.view(m, n)


def apply_dense_update_(spec: MatrixSpec, update: torch.Tensor, step_size: float, weight_decay: float = 0.0) -> None:
    """W_piece <- W_piece (1 - step_size * wd) - step_size * update_piece, for a full (m, n) update."""
    flat = update.reshape(-1)
    for f in spec.fragments:
        p = f.tensor.view(-1)[f.offset : f.offset + f.numel]
        if weight_decay:
            p.mul_(1.0 - step_size * weight_decay)
        p.add_(flat[f.start : f.start + f.numel].to(p.dtype), alpha=-step_size)
