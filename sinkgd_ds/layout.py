"""Layouts: which pieces of which logical matrices this rank holds, and who completes their sums.

A *logical matrix* is what the papers normalise: a 2-D weight, or one row block of a fused weight
(Q/K/V of ``linear_qkv``, gate/up of a SwiGLU ``fc1``).  Under ZeRO or Megatron's distributed
optimizer a rank holds arbitrary flat element ranges of the row-major matrix (cut mid-row); under
tensor parallelism it holds a row or column slice.  A :class:`MatrixSpec` records exactly that and
nothing else, so the Sinkhorn engine (``sinkgd_ds.sinkhorn``) is the one place that does the math.

Every rank that shares a process group must list the matrices of that group in the same order,
including matrices of which it holds no piece (``fragments=()``): the engine concatenates their
partial sums into one buffer per group, and the buffers must line up across ranks.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["Fragment", "FlatMatrix", "MatrixSpec", "RowBlocks", "Segment", "dense_spec", "flat_partition_specs"]

# Largest number of elements squared at once. Bounds the transient memory of a step to one block.
CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class Fragment:
    """A contiguous flat range of the (rank-local) row-major matrix, stored inside ``tensor``.

    ``tensor`` is the tensor the inner optimizer steps (a full 2-D weight, or a flat ZeRO / DistOpt
    partition); its ``.grad`` (or a same-shaped state buffer) supplies the direction.
    """

    tensor: torch.Tensor
    offset: int  # first element inside ``tensor.view(-1)``
    start: int  # first element inside the row-major matrix
    numel: int


@dataclass(frozen=True)
class RowBlocks:
    """Row → block map of a fused matrix, as contiguous runs ``(row_start, row_end, block)``.

    Columns are normalised per block (target ``sqrt(global_rows[block])``); rows are unaffected.
    """

    runs: tuple[tuple[int, int, int], ...]
    global_rows: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.global_rows)

    @staticmethod
    def from_sizes(sizes: Sequence[int], repeats: int = 1, global_scale: int = 1) -> RowBlocks:
        """Blocks given as row counts repeated ``repeats`` times (e.g. [q, k, v] per query group).

        ``global_scale`` multiplies the per-block row total to get the global row count (TP size
        for a column-parallel weight whose rows are split over TP ranks).
        """
        runs, row = [], 0
        for _ in range(repeats):
            for b, size in enumerate(sizes):
                runs.append((row, row + size, b))
                row += size
        totals = tuple(size * repeats * global_scale for size in sizes)
        return RowBlocks(tuple(runs), totals)


@dataclass(frozen=True)
class Segment:
    """A 2-D sub-block of the matrix inside one fragment: rows [row, row+rows), cols [col, col+cols)."""

    fragment: int
    offset: int  # element offset inside fragment.tensor.view(-1)
    row: int
    rows: int
    col: int
    cols: int
    block: int


@dataclass
class MatrixSpec:
    """One logical (possibly fused) matrix as seen by this rank.

    ``shape`` is the rank-local matrix (the TP slice); ``global_shape`` the full matrix, used for the
    targets sqrt(n) and sqrt(m_block); ``global_offset`` is where the local matrix sits in it (element (i, j)
    is global (i + row offset, j + col offset)), used only to give each element its logical index for
    stochastic rounding (``sinkgd_ds.rounding``), as does ``name`` (its CRC-32 names the matrix there, so it
    must be the same for one logical matrix on every rank and in every layout).  ``shard_group`` completes
    sums over ranks that hold other flat pieces of the same local matrix (ZeRO / DistOpt data parallelism);
    ``row_group`` completes row sums over column slices (row-parallel TP) and ``col_group`` column sums over
    row slices (column-parallel TP).  ``None`` means the sum is already complete on this rank.
    """

    name: str
    shape: tuple[int, int]
    fragments: tuple[Fragment, ...]
    owner: torch.Tensor  # the inner-optimizer tensor whose step() triggers this matrix
    global_shape: tuple[int, int] | None = None
    blocks: RowBlocks | None = None
    shard_group: object | None = None
    row_group: object | None = None
    col_group: object | None = None
    global_offset: tuple[int, int] = (0, 0)
    segments: tuple[Segment, ...] = field(init=False, repr=False)
    key: int = field(init=False, repr=False)  # CRC-32 of the name: the matrix's identity in the rounding hash

    def __post_init__(self) -> None:
        m, n = self.shape
        if m < 1 or n < 1:
            raise ValueError(f"matrix {self.name!r}: shape {self.shape} must be positive")
        if self.global_shape is None:
            self.global_shape = self.shape
        (r0, c0), (gm, gn) = self.global_offset, self.global_shape
        if r0 < 0 or c0 < 0 or r0 + m > gm or c0 + n > gn:
            raise ValueError(f"matrix {self.name!r}: local {self.shape} at offset {self.global_offset} lies outside "
                             f"the global {self.global_shape}")
        self.key = zlib.crc32(self.name.encode())
        for f in self.fragments:
            if f.numel < 0 or f.start < 0 or f.start + f.numel > m * n:
                raise ValueError(f"matrix {self.name!r}: fragment [{f.start}, {f.start + f.numel}) outside {m}x{n}")
            if f.offset < 0 or f.offset + f.numel > f.tensor.numel():
                raise ValueError(f"matrix {self.name!r}: fragment offset {f.offset}+{f.numel} outside its tensor")
        if self.blocks is None:
            self.blocks = RowBlocks(((0, m, 0),), (self.global_shape[0],))
        covered = sum(e - s for s, e, _ in self.blocks.runs)
        if covered != m or self.blocks.runs[0][0] != 0:
            raise ValueError(f"matrix {self.name!r}: row blocks cover {covered} of {m} rows")
        self.segments = tuple(self._segments())

    @property
    def row_target(self) -> float:
        return math.sqrt(self.global_shape[1])

    def col_targets(self) -> torch.Tensor:
        return torch.tensor([math.sqrt(r) for r in self.blocks.global_rows], dtype=torch.float32)

    def index_base(self, seg: Segment) -> int:
        """Logical index (global row * global columns + global column) of ``seg``'s first element; its element
        (i, j) has index ``index_base(seg) + i * global_shape[1] + j``."""
        return (self.global_offset[0] + seg.row) * self.global_shape[1] + self.global_offset[1] + seg.col

    @property
    def is_local(self) -> bool:
        return self.shard_group is None and self.row_group is None and self.col_group is None

    def _block_runs(self, row0: int, row1: int):
        """Split rows [row0, row1) at block boundaries: yields (start, end, block)."""
        for s, e, b in self.blocks.runs:
            lo, hi = max(s, row0), min(e, row1)
            if lo < hi:
                yield lo, hi, b

    def _segments(self):
        m, n = self.shape
        for fi, f in enumerate(self.fragments):
            pos, end, off = f.start, f.start + f.numel, f.offset
            while pos < end:
                row, col = divmod(pos, n)
                if col or end - pos < n:  # partial row (head or tail)
                    cols = min(n - col, end - pos)
                    blk = next(self._block_runs(row, row + 1))[2]
                    yield Segment(fi, off, row, 1, col, cols, blk)
                    pos, off = pos + cols, off + cols
                    continue
                full = (end - pos) // n
                for s, e, blk in self._block_runs(row, row + full):
                    step = max(1, CHUNK_ELEMENTS // n)
                    for r in range(s, e, step):
                        rows = min(step, e - r)
                        yield Segment(fi, off + (r - row) * n, r, rows, 0, n, blk)
                pos, off = pos + full * n, off + full * n


def dense_spec(param: torch.Tensor, name: str = "", blocks: RowBlocks | None = None) -> MatrixSpec:
    """The trivial layout: the whole matrix lives here. Tensors of >2 dims are viewed as (d0, rest)."""
    if param.dim() < 2:
        raise ValueError(f"{name or 'tensor'} of shape {tuple(param.shape)} is not a matrix")
    m = param.shape[0]
    n = param.numel() // m
    return MatrixSpec(name, (m, n), (Fragment(param, 0, 0, m * n),), owner=param, blocks=blocks)


@dataclass(frozen=True)
class FlatMatrix:
    """A matrix stored at ``offset`` of a flat buffer that is cut into per-rank partitions."""

    name: str
    shape: tuple[int, int]
    offset: int
    global_shape: tuple[int, int] | None = None
    blocks: RowBlocks | None = None
    row_group: object | None = None
    col_group: object | None = None
    global_offset: tuple[int, int] = (0, 0)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def spec(self, fragments: tuple[Fragment, ...], owner: torch.Tensor, shard_group: object | None = None
             ) -> MatrixSpec:
        """This matrix as the pieces ``fragments`` of it that ``owner`` holds (``shard_group``: the ranks holding
        the other pieces)."""
        return MatrixSpec(self.name, self.shape, fragments, owner=owner, global_shape=self.global_shape,
                          blocks=self.blocks, shard_group=shard_group, row_group=self.row_group,
                          col_group=self.col_group, global_offset=self.global_offset)


def flat_partition_specs(
    matrices: Sequence[FlatMatrix],
    bounds: Sequence[tuple[int, int]],
    rank: int,
    partition: torch.Tensor,
    group: object,
) -> list[MatrixSpec]:
    """Specs for rank ``rank`` of a flat buffer cut at ``bounds`` (ZeRO-1/2 style; any cut points).

    ``partition`` holds flat elements ``bounds[rank]``. A matrix that lies in one partition is local
    to its holder; one that straddles a cut is listed by *every* rank (with no fragment where it
    holds nothing) and reduced over ``group``, so all ranks' buckets line up.
    """
    lo, hi = bounds[rank]
    specs = []
    for mat in matrices:
        mlo, mhi = mat.offset, mat.offset + mat.numel
        holders = [r for r, (a, b) in enumerate(bounds) if a < mhi and mlo < b and a < b]
        shared = len(holders) > 1
        if rank not in holders and not shared:
            continue
        frags: tuple[Fragment, ...] = ()
        if rank in holders:
            s, e = max(lo, mlo), min(hi, mhi)
            frags = (Fragment(partition, s - lo, s - mlo, e - s),)
        specs.append(mat.spec(frags, partition, group if shared else None))
    return specs
