"""The CPU backend: the native kernels of ``sinkgd_ds.kernels`` (C++, OpenMP, loaded with ctypes).

Native code reads raw addresses, so everything that decides whether a tensor may be handed to it lives
here: :func:`sinkgd_ds.kernels.supports` (plain CPU tensor with storage, fp32/bf16, contiguous) for every
gradient and weight, and exact sizes for the scale vectors it writes. Anything else stays on the torch
path of :class:`~sinkgd_ds.backends.reference.TorchBackend`, which this class extends.

Descriptors (arrays of addresses and sizes) are built once per batch and reused while the tensors stay
where they were (``MatrixBatch`` rebuilds them when an address moves). A matrix whose sums are complete
on this rank runs its whole schedule in one call, with ONE pass over G per iteration (a row's r_i is
known as soon as the row is summed, so its column contribution is added while the row is in cache).
"""

from __future__ import annotations

import functools
import math
from array import array
from dataclasses import dataclass, field

import torch

from .. import kernels as _kernels
from ..layout import MatrixSpec, RowBlocks
from ..rounding import StochasticRounding
from .reference import TorchBackend, _segments
from .reference import check_schedule as _check_schedule

__all__ = ["NativeBackend"]

APPLY_WIDTH = 11  # int64 per update segment (the C++ source's APPLY_WIDTH)


def _addr(buf: array) -> int:
    return buf.buffer_info()[0] if len(buf) else 0


def _ptr(t: torch.Tensor, elem: int = 0) -> int:
    return t.data_ptr() + elem * t.element_size()


@functools.lru_cache(maxsize=1024)
def _block_constants(blocks: RowBlocks) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Flattened row-block runs and the column targets sqrt(global rows) of each block."""
    return tuple(v for run in blocks.runs for v in run), tuple(math.sqrt(rows) for rows in blocks.global_rows)


def _kernel_vectors(r: torch.Tensor, c: torch.Tensor) -> bool:
    """The kernels read and write r and c through raw pointers: contiguous CPU fp32 only."""
    return _kernels.supports(r) and _kernels.supports(c) and r.dtype == c.dtype == torch.float32


def _owns_scales(spec: MatrixSpec, r: torch.Tensor, c: torch.Tensor) -> bool:
    """The normalisation kernel writes r and c in place: kernel vectors of exactly the spec's sizes."""
    m, n = spec.shape
    return _kernel_vectors(r, c) and r.numel() == m and c.numel() == spec.blocks.count * n


def _local_matrix(spec: MatrixSpec, direction) -> tuple[torch.Tensor, int] | None:
    """(G's tensor, address of G[0, 0]) when every sum of ``spec`` is complete on this rank (no collective),
    the whole local matrix is one contiguous run of a CPU tensor and the kernels take its dtype."""
    if not spec.is_local or len(spec.fragments) != 1 or not spec.owner.is_cpu:
        return None
    f = spec.fragments[0]
    if f.start != 0 or f.numel != spec.shape[0] * spec.shape[1]:
        return None
    g = direction(f.tensor)
    if not _kernels.supports(g) or g.numel() < f.offset + f.numel:
        return None
    return g, g.data_ptr() + f.offset * g.element_size()


@dataclass
class _Normalize:
    """Arguments of one ``sk_normalize_many`` call (the arrays must outlive the call, so they are kept)."""

    index: list[int]  # positions (in the batch) of the matrices it covers
    desc: array
    row_targets: array
    runs: array
    col_targets: array
    bad: array
    threads: int
    head: tuple[int, ...] = field(init=False)  # the call's leading arguments: count and array addresses
    bad_addr: int = field(init=False)

    def __post_init__(self) -> None:
        self.head = (len(self.index), _addr(self.desc), _addr(self.row_targets), _addr(self.runs),
                     _addr(self.col_targets))
        self.bad_addr = _addr(self.bad)


def _normalize_descriptors(items) -> _Normalize:
    """``items``: (position, spec, G's tensor, address of G[0, 0], r, c) of every local matrix."""
    desc, runs, targets, row_targets = array("q"), array("q"), array("f"), array("f")
    codes = _kernels.DTYPE_CODES
    for _, spec, g, ptr, r, c in items:
        m, n = spec.shape
        flat_runs, col_targets = _block_constants(spec.blocks)
        desc.extend((ptr, codes[g.dtype], m, n, len(runs) // 3, len(flat_runs) // 3, len(col_targets), len(targets),
                     r.data_ptr(), c.data_ptr()))
        runs.extend(flat_runs)
        targets.extend(col_targets)
        row_targets.append(math.sqrt(spec.global_shape[1]))
    total = sum(spec.shape[0] * spec.shape[1] for _, spec, *_ in items)
    bad = array("i", bytes(4 * len(items)))
    return _Normalize([it[0] for it in items], desc, row_targets, runs, targets, bad, _kernels.num_threads(total))


def _apply_segments(spec: MatrixSpec, r: torch.Tensor, c: torch.Tensor, direction, desc: array) -> bool:
    """Append the native update descriptors of ``spec`` to ``desc``; False (nothing appended) when the
    kernels do not take these tensors."""
    m, n = spec.shape
    if not (spec.segments and _kernel_vectors(r, c) and r.numel() >= m and c.numel() >= spec.blocks.count * n):
        return False  # (the torch path reports misuse)
    frags = []
    codes = _kernels.DTYPE_CODES
    for f in spec.fragments:
        p, g = f.tensor, direction(f.tensor)
        if not (_kernels.supports(p) and _kernels.supports(g) and g.numel() == p.numel()):
            return False
        frags.append((p.data_ptr(), p.element_size(), codes[p.dtype], g.data_ptr(), g.element_size(), codes[g.dtype]))
    rp, cp = r.data_ptr(), c.data_ptr()
    for seg in spec.segments:
        pp, ps, pcode, gp, gs, gcode = frags[seg.fragment]
        desc.extend((pp + seg.offset * ps, pcode, gp + seg.offset * gs, gcode, seg.rows, seg.cols, rp + 4 * seg.row,
                     cp + 4 * (seg.block * n + seg.col), spec.index_base(seg), spec.global_shape[1], spec.key))
    return True


def _rounding_args(rounding: StochasticRounding | None) -> tuple[int, int, int]:
    """(on, seed, step) as the kernels take them."""
    return (0, 0, 0) if rounding is None else (1, *rounding.words)


@dataclass
class _Prepared:
    norm: _Normalize | None
    apply_desc: array
    apply_head: tuple[int, int]
    apply_threads: int
    torch_apply: list[int]
    starts: array  # matrix i's update segments are apply_desc rows [starts[i], starts[i + 1])
    segment_starts: array | None  # ``starts`` when every matrix runs natively (the one-call step)


class NativeBackend(TorchBackend):
    """Native kernels for what they take; the torch reference for the rest (same results to fp32 rounding)."""

    name = "native"

    def __init__(self, lib):
        self.lib = lib

    def prepare(self, batch) -> None:
        local = []
        for i, (spec, sc) in enumerate(zip(batch.specs, batch.scales)):
            loc = _local_matrix(spec, batch.direction)
            if loc is not None and _owns_scales(spec, sc.r, sc.c):
                local.append((i, spec, *loc, sc.r, sc.c))
        desc, starts, torch_apply = array("q"), array("q"), []
        for i, (spec, sc) in enumerate(zip(batch.specs, batch.scales)):
            starts.append(len(desc) // APPLY_WIDTH)  # matrix i's update segments: rows [starts[i], starts[i + 1])
            if not _apply_segments(spec, sc.r, sc.c, batch.direction, desc):
                torch_apply.append(i)
        starts.append(len(desc) // APPLY_WIDTH)
        all_native = bool(local) and len(local) == len(batch.specs) and not torch_apply
        threads = _kernels.num_threads(sum(desc[k + 4] * desc[k + 5] for k in range(0, len(desc), APPLY_WIDTH)))
        norm = _normalize_descriptors(local) if local else None
        batch.prepared = _Prepared(norm, desc, (len(desc) // APPLY_WIDTH, _addr(desc)), threads, torch_apply, starts,
                                   starts if all_native else None)

    def normalize_local(self, batch, schedule: bytes) -> list[int]:
        # Local matrices need no collective, so they run first, all in one call (which works through them
        # roughly in reverse order, so that the update pass starts on gradients that are still in cache).
        nat = batch.prepared.norm
        if nat is None:
            return []
        self._verdicts(batch, self.lib.sk_normalize_many(*nat.head, schedule, len(schedule), nat.threads,
                                                         _kernels.SPREAD, nat.bad_addr))
        return nat.index

    def _verdicts(self, batch, rc: int) -> None:
        """After a native normalising call: its per-matrix non-finite flags into the scales."""
        if rc < 0:
            raise RuntimeError("sinkgd_ds kernel rejected a gradient dtype")
        for i, flag in zip(batch.prepared.norm.index, batch.prepared.norm.bad):
            batch.scales[i].finite = flag == 0

    def partials(self, batch, idx: list[int], half: str, previous: str | None, following: str | None = None) -> None:
        lib, sums = self.lib, batch.sums
        for i in idx:
            spec, sc = batch.specs[i], batch.scales[i]
            if previous is not None:
                self._finish_half(batch, i, previous)
            n = spec.shape[1]
            out = sums.row(i) if half == "row" else sums.col(i)
            out.zero_()
            other = (sc.c if half == "row" else sc.r).square().contiguous()
            for seg, g in _segments(spec, batch.direction):
                cs = slice(seg.block * n + seg.col, seg.block * n + seg.col + seg.cols)
                if _kernels.supports(g) and out.is_cpu:
                    code, threads = _kernels.DTYPE_CODES[g.dtype], _kernels.num_threads(g.numel())
                    if half == "row":
                        lib.sk_row_partial(_ptr(g), code, seg.rows, seg.cols, _ptr(other, seg.block * n + seg.col),
                                           _ptr(out, seg.row), threads)
                    else:
                        lib.sk_col_partial(_ptr(g), code, seg.rows, seg.cols, _ptr(other, seg.row),
                                           _ptr(out, seg.block * n + seg.col), threads)
                elif half == "row":
                    out[seg.row : seg.row + seg.rows].addmv_(g.float().square(), other.view(-1)[cs])
                else:
                    out[cs].addmv_(g.float().square().t(), other[seg.row : seg.row + seg.rows])

    def apply(self, batch, idx: list[int], decay: float, alpha: float, gate: torch.Tensor | None,
              rounding: StochasticRounding | None = None) -> None:
        prep = batch.prepared
        if gate is not None and bool(gate.item() > 0):  # (a CPU flag: reading it is no device sync)
            return
        use_decay, words = 1 if decay != 1.0 else 0, _rounding_args(rounding)
        if len(idx) == len(batch.specs):
            if prep.apply_desc:
                self.lib.sk_apply_many(*prep.apply_head, decay, alpha, use_decay, *words, prep.apply_threads)
            super().apply(batch, prep.torch_apply, decay, alpha, None, rounding)
            return
        # a subset (rare: the clean matrices of a non-finite step): their rows of the descriptors
        desc, native = array("q"), set(idx) - set(prep.torch_apply)
        for i in sorted(native):
            desc.extend(prep.apply_desc[APPLY_WIDTH * prep.starts[i] : APPLY_WIDTH * prep.starts[i + 1]])
        if desc:
            self.lib.sk_apply_many(len(desc) // APPLY_WIDTH, _addr(desc), decay, alpha, use_decay, *words,
                                   prep.apply_threads)
        super().apply(batch, [i for i in idx if i not in native], decay, alpha, None, rounding)

    def step(self, batch, schedule: tuple[str, ...], decay: float, alpha: float, per_matrix: bool,
             stats, rounding: StochasticRounding | None = None) -> bool | None:
        """Normalise and update every matrix in ONE native call, when every matrix runs natively; None when
        it cannot (the engine then normalises and applies in two calls)."""
        prep = batch.prepared
        nat = prep.norm
        if nat is None or prep.segment_starts is None:
            return None
        use_decay, words = 1 if decay != 1.0 else 0, _rounding_args(rounding)
        schedule = _check_schedule(schedule)
        if per_matrix:
            rc = self.lib.sk_fused_many(*nat.head, schedule, len(schedule), nat.threads, _kernels.SPREAD,
                                        nat.bad_addr, _addr(prep.segment_starts), prep.apply_head[1], decay, alpha,
                                        use_decay, *words)
        else:
            rc = self.lib.sk_step_many(*nat.head, schedule, len(schedule), nat.threads, _kernels.SPREAD,
                                       nat.bad_addr, *prep.apply_head, decay, alpha, use_decay, *words,
                                       prep.apply_threads)
        self._verdicts(batch, rc)
        return rc == 0
