"""The sharded SR-Sinkhorn engine: layouts in, scales and updates out, one backend doing the arithmetic.

SR-Sinkhorn only ever multiplies rows and columns by positive numbers, so after any number of
half-iterations the normalised gradient is ``diag(r) @ G @ diag(c)`` (the math, on one screen, is
``sinkgd_ds.backends.reference``). Both scales come from sums, so a rank holding any subset of the elements
adds the terms it holds, and one all-reduce of the partial vectors completes them exactly. The partial sums
of every matrix of a step live in one persistent buffer per half kind, laid out so that each process group's
matrices are one contiguous slice: each half-iteration is one in-place all-reduce per process group for all
matrices (a layout whose groups cannot all be contiguous falls back to a gathered copy for that group).

:class:`MatrixBatch` keeps this bookkeeping and picks a backend per device (``sinkgd_ds.backends``): the
torch reference, the native CPU kernels, or Triton on CUDA. A zero sum gives a zero scale (a zero row or
column gets a zero update), the same rule in every layout and backend; non-finite sums mark the matrix
non-finite so the caller can skip the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from . import backends
from .backends.reference import check_schedule as _check_schedule
from .layout import MatrixSpec
from .rounding import StochasticRounding, flat_indices, random16, stochastic_round_bf16, update_target

__all__ = ["Scales", "MatrixBatch", "normalize_scales", "apply_scaled_update_", "apply_scaled_updates_",
           "apply_dense_update_", "gather_matrix", "CommStats"]

Half = Literal["row", "col"]
Direction = Callable[[torch.Tensor], torch.Tensor]


class Scales:
    """``r`` (m,) and ``c`` (blocks, n) such that the normalised matrix is diag(r) G diag(c_b).

    ``finite`` may be backed by a device flag (``flag``, nonzero = non-finite) that a backend set without
    reading it: it is read (one host sync) only when someone asks.
    """

    __slots__ = ("r", "c", "_finite", "flag")

    def __init__(self, r: torch.Tensor, c: torch.Tensor, finite: bool = True):
        self.r, self.c, self._finite, self.flag = r, c, finite, None

    @property
    def finite(self) -> bool:
        if self.flag is not None:
            self._finite, self.flag = not bool(self.flag), None
        return self._finite

    @finite.setter
    def finite(self, value: bool) -> None:
        self._finite, self.flag = bool(value), None

    def set_flag(self, flag: torch.Tensor) -> None:
        self.flag = flag

    def __repr__(self) -> str:
        return f"Scales(r={self.r!r}, c={self.c!r}, finite={self.finite})"


@dataclass
class CommStats:
    """What the engine sent, for tests and logs: number of collectives and floats reduced."""

    collectives: int = 0
    elements: int = 0


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


class PartialSums:
    """The partial row and column sums of every matrix of a batch, in two persistent fp32 buffers.

    Matrices are laid out stably sorted by which groups complete their sums (a property of the matrix, so
    every rank of a group sorts alike), which makes every group's matrices one contiguous slice in the common
    layouts (ZeRO, Megatron TP + distributed optimizer). ``buckets[half]``: one ``(group, slices)`` per
    process group (see ``_buckets``), slices in the order all ranks list the matrices; a single slice is
    reduced in place.
    """

    def __init__(self, specs: Sequence[MatrixSpec], device: torch.device):
        order = sorted(range(len(specs)), key=lambda i: (specs[i].shard_group is None, specs[i].row_group is None,
                                                          specs[i].col_group is None))
        self.row_offsets, self.col_offsets = [0] * len(specs), [0] * len(specs)
        self.row_sizes = [sp.shape[0] for sp in specs]
        self.col_sizes = [sp.blocks.count * sp.shape[1] for sp in specs]
        r = c = 0
        for i in order:
            self.row_offsets[i], self.col_offsets[i] = r, c
            r, c = r + self.row_sizes[i], c + self.col_sizes[i]
        self.rows = torch.zeros(r, dtype=torch.float32, device=device)
        self.cols = torch.zeros(c, dtype=torch.float32, device=device)
        self.buckets = {half: self._buckets(specs, order, half) for half in ("row", "col")}

    def _buckets(self, specs, order, half):
        """One bucket per process group that completes some matrix's sums of this half: every matrix whose
        chain (its shard groups, then the tensor-parallel group of this half) holds that group, in list order.
        Buckets of shard groups come first, then those of tensor-parallel groups, each in order of first
        appearance: the same order on every rank of a group. (Sums commute, so a matrix cut along one dimension
        by several mesh dimensions is complete after one all-reduce per group, in any order.)"""
        offsets, sizes = (self.row_offsets, self.row_sizes) if half == "row" else (self.col_offsets, self.col_sizes)
        groups: dict[int, list] = {}  # id -> [group, is a tensor-parallel group, matrices]
        for i, sp in enumerate(specs):
            for tp, gs in ((False, sp.shard_group), (True, sp.row_group if half == "row" else sp.col_group)):
                for g in (gs if isinstance(gs, tuple) else (gs,)):
                    if g is not None:
                        entry = groups.setdefault(id(g), [g, tp, []])
                        entry[1] = entry[1] or tp
                        if not entry[2] or entry[2][-1] != i:
                            entry[2].append(i)
        buckets = []
        for g, _tp, idx in sorted(groups.values(), key=lambda e: e[1]):  # (stable: first appearance within)
            idx_sorted = sorted(idx, key=offsets.__getitem__)
            contiguous = idx_sorted == idx and all(offsets[a] + sizes[a] == offsets[b] for a, b in zip(idx, idx[1:]))
            slices = [(offsets[idx[0]], offsets[idx[-1]] + sizes[idx[-1]])] if contiguous else \
                [(offsets[i], offsets[i] + sizes[i]) for i in idx]
            buckets.append((g, slices))
        return buckets

    def row(self, i: int) -> torch.Tensor:
        return self.rows[self.row_offsets[i] : self.row_offsets[i] + self.row_sizes[i]]

    def col(self, i: int) -> torch.Tensor:
        return self.cols[self.col_offsets[i] : self.col_offsets[i] + self.col_sizes[i]]

    def reduce(self, half: Half, stats: CommStats) -> None:
        """Complete this half's sums: one all-reduce per process group, in place where contiguous."""
        buf = self.rows if half == "row" else self.cols
        for group, slices in self.buckets[half]:
            if len(slices) == 1:
                view = buf[slices[0][0] : slices[0][1]]
                all_reduce_sum(view, group)
                n = view.numel()
            else:
                tmp = torch.cat([buf[a:b] for a, b in slices])
                all_reduce_sum(tmp, group)
                pos = 0
                for a, b in slices:
                    buf[a:b].copy_(tmp[pos : pos + b - a])
                    pos += b - a
                n = tmp.numel()
            stats.collectives += 1
            stats.elements += n


class MatrixBatch:
    """The matrices that one optimizer step normalises and updates together, prepared for reuse.

    Preparing a backend's descriptors costs about 20 us of Python per matrix, as much as the kernels spend on
    a small matrix. So an optimizer keeps one batch per parameter group: descriptors are built once, and each
    later step only compares the tensors' current addresses, dtypes and sizes with the ones they were built
    for (under 1 us per tensor), rebuilding when anything moved (e.g. gradients set to None and reallocated).
    ``scales`` (one :class:`Scales` per spec) belong to the batch: every :meth:`normalize` overwrites them.
    """

    def __init__(self, specs: Sequence[MatrixSpec], direction: Direction, scales: Sequence[Scales] | None = None,
                 implementation: str = "auto"):
        self.specs = tuple(specs)
        self.direction = direction
        if scales is None:
            scales = [Scales(torch.ones(sp.shape[0], dtype=torch.float32, device=sp.owner.device),
                             torch.ones(sp.blocks.count, sp.shape[1], dtype=torch.float32, device=sp.owner.device))
                      for sp in self.specs]
        elif len(scales) != len(self.specs):
            raise ValueError(f"got {len(scales)} scales for {len(self.specs)} matrices")
        self.scales = list(scales)
        self.implementation = implementation
        # every tensor the descriptors point into, once (a ZeRO partition holds the pieces of many matrices)
        self._tensors = tuple({id(f.tensor): f.tensor for sp in self.specs for f in sp.fragments}.values())
        self._devices = tuple({sp.owner.device for sp in self.specs})
        self.backend = None
        self.prepared = None  # the backend's descriptors for the tensors of ``_key``
        self.sums: PartialSums | None = None
        self._key: list | None = None
        self._checked = False  # normalize() validated the descriptors for the apply_() of the same step
        self._all = list(range(len(self.specs)))
        self._col_targets: dict[int, torch.Tensor] = {}

    def _addresses(self, backend) -> list:
        """Everything the descriptors depend on besides the specs (which are immutable). Runs every step with
        cold caches, so it is one flat loop (no closure or generator to create)."""
        key: list = [backend, torch.get_num_threads()]
        direction = self.direction
        for t in self._tensors:
            g = direction(t)
            key += (t.data_ptr(), t.dtype, t.numel(), None) if g is None else \
                (t.data_ptr(), t.dtype, t.numel(), g.data_ptr(), g.dtype, g.numel(), g.is_contiguous())
        for sc in self.scales:
            key += (sc.r.data_ptr(), sc.c.data_ptr())
        return key

    def _refresh(self) -> None:
        backend = backends.select(self.implementation, self._devices)
        key = self._addresses(backend)
        if key == self._key:
            return
        self.backend = backend
        if self.sums is None:
            device = self.scales[0].r.device if self.scales else torch.device("cpu")
            self.sums = PartialSums(self.specs, device)
        backend.prepare(self)
        self._key = key

    def col_targets(self, i: int) -> torch.Tensor:
        """sqrt(global rows of each block) of matrix ``i``, on the scales' device (built once)."""
        t = self._col_targets.get(i)
        if t is None:
            rows = self.specs[i].blocks.global_rows
            t = self._col_targets[i] = torch.tensor([math.sqrt(r) for r in rows], dtype=torch.float32,
                                                    device=self.scales[i].r.device)
        return t

    def normalize(self, schedule: Sequence[Half], stats: CommStats | None = None) -> list[Scales]:
        """Run the half-iterations of ``schedule`` on every matrix together (see :func:`normalize_scales`)."""
        self._refresh()
        return self._normalize(tuple(schedule), stats)

    def _normalize(self, schedule: tuple[Half, ...], stats: CommStats | None) -> list[Scales]:
        """:meth:`normalize` on descriptors the caller has just refreshed."""
        stats = stats if stats is not None else CommStats()
        sched = _check_schedule(schedule)
        self._checked = True
        be = self.backend
        done = be.normalize_local(self, sched)
        if done:
            done = set(done)
            rest = [i for i in self._all if i not in done]
        else:
            rest = self._all
        if rest:
            be.begin(self, rest)
            previous = None
            for pos, half in enumerate(schedule):
                following = schedule[pos + 1] if pos + 1 < len(schedule) else None
                be.partials(self, rest, half, previous, following)
                self.sums.reduce(half, stats)
                previous = half
            if previous is not None:
                be.finish(self, rest, previous)
        return self.scales

    def all_finite(self) -> bool:
        """Whether every matrix's sums were finite (one host read for all device flags)."""
        flagged = [sc for sc in self.scales if sc.flag is not None]
        if flagged:
            bad = torch.stack([sc.flag.reshape(()).to(torch.bool) for sc in flagged]).tolist()
            for sc, b in zip(flagged, bad):
                sc.finite = not b
        return all([sc._finite for sc in self.scales])

    def verdict(self) -> torch.Tensor | None:
        """A 0-dim fp32 tensor on the scales' device, nonzero when some matrix is non-finite (no host sync where
        the flags live on the device); None for an empty batch."""
        if not self.scales:
            return None
        device = self.scales[0].r.device
        parts = [sc.flag.reshape(()).float() if sc.flag is not None else
                 torch.tensor(0.0 if sc._finite else 1.0, device=device) for sc in self.scales]
        return torch.stack(parts).amax()

    def apply_(self, step_size: float, weight_decay: float = 0.0, extra_scale: float = 1.0,
               recheck: bool = True, gate: torch.Tensor | None = None,
               rounding: StochasticRounding | None = None) -> None:
        """W <- W (1 - step_size * weight_decay) - step_size * extra_scale * diag(r) G diag(c) for every matrix
        (on CPU one native call for all of them, on CUDA one Triton launch). ``recheck=False`` reuses the check
        made by :meth:`normalize` in the same step (for callers that know no tensor moved in between).
        ``gate``: a 0-dim tensor; when it is nonzero nothing is written (a verdict that stays on the device).
        ``rounding``: bf16 weights take the update through stochastic rounding (``sinkgd_ds.rounding``); None
        rounds to nearest. fp32 weights are the same either way."""
        if recheck or not self._checked:
            self._refresh()
        self._checked = False
        self.backend.apply(self, self._all, *_update_coefficients(step_size, weight_decay, extra_scale), gate,
                           rounding)

    def step_(self, schedule: Sequence[Half], step_size: float, weight_decay: float = 0.0, extra_scale: float = 1.0,
              stats: CommStats | None = None, per_matrix: bool = False,
              rounding: StochasticRounding | None = None) -> bool:
        """Normalise and update in one go, for a caller whose verdict is complete with this batch's (nothing after
        it can veto the step). Returns whether every matrix was updated; ``scales[i].finite`` says which were not.

        ``per_matrix=False``: :meth:`normalize`, then :meth:`apply_` only if every matrix's sums are finite
        (otherwise nothing is written). ``per_matrix=True``: each matrix with finite sums is updated, the others
        are left as they are; on CPU each matrix is updated right after its own normalisation, while its G is
        still in cache. When every matrix runs natively either is ONE native call. ``rounding``: as in
        :meth:`apply_`.
        """
        schedule = tuple(schedule)
        self._refresh()
        decay, alpha = _update_coefficients(step_size, weight_decay, extra_scale)
        done = self.backend.step(self, schedule, decay, alpha, per_matrix, stats, rounding)
        if done is not None:
            return done
        self._normalize(schedule, stats)
        if self.all_finite():
            self.apply_(step_size, weight_decay, extra_scale, recheck=False, rounding=rounding)
            return True
        if per_matrix:  # (rare: a non-finite step of a batch the kernels do not fully cover)
            clean = [i for i, sc in enumerate(self.scales) if sc.finite]
            self.backend.apply(self, clean, decay, alpha, None, rounding)
        self._checked = False
        return False


def _update_coefficients(step_size: float, weight_decay: float, extra_scale: float) -> tuple[float, float]:
    """(decay, alpha) of W <- W decay - alpha diag(r) G diag(c)."""
    return (1.0 - step_size * weight_decay) if weight_decay else 1.0, step_size * extra_scale


def normalize_scales(
    specs: Sequence[MatrixSpec],
    direction: Direction,
    schedule: Sequence[Half],
    stats: CommStats | None = None,
    implementation: str = "auto",
) -> list[Scales]:
    """Run the half-iterations of ``schedule`` on every matrix of ``specs`` together.

    ``direction(tensor)`` returns the tensor to normalise for a fragment's storage tensor (its
    ``.grad``, or a momentum buffer of the same shape). Returns one :class:`Scales` per spec; all
    ranks that share a matrix get bit-identical scales, hence identical ``finite`` decisions.
    Optimizers that step the same matrices repeatedly keep a :class:`MatrixBatch` instead.
    """
    return MatrixBatch(specs, direction, implementation=implementation).normalize(schedule, stats)


def apply_scaled_update_(
    spec: MatrixSpec,
    scales: Scales,
    direction: Direction,
    step_size: float,
    weight_decay: float = 0.0,
    extra_scale: float = 1.0,
    implementation: str = "auto",
    rounding: StochasticRounding | None = None,
) -> None:
    """W <- W (1 - step_size * weight_decay) - step_size * extra_scale * diag(r) G diag(c), on local pieces."""
    apply_scaled_updates_([spec], [scales], direction, step_size, weight_decay, extra_scale, implementation, rounding)


def apply_scaled_updates_(
    specs: Sequence[MatrixSpec],
    scales: Sequence[Scales],
    direction: Direction,
    step_size: float,
    weight_decay: float = 0.0,
    extra_scale: float = 1.0,
    implementation: str = "auto",
    rounding: StochasticRounding | None = None,
) -> None:
    """:func:`apply_scaled_update_` for many matrices with the same step size (see :meth:`MatrixBatch.apply_`)."""
    MatrixBatch(specs, direction, scales, implementation).apply_(step_size, weight_decay, extra_scale,
                                                                 rounding=rounding)


def gather_matrix(spec: MatrixSpec, direction: Direction) -> torch.Tensor:
    """The full rank-local matrix (fp32), assembled from the fragments of every rank in shard_group.

    Only for optimizers that need the whole matrix (SWAN's whitening); SinkGD and SCALE never call it.
    """
    m, n = spec.shape
    dev = spec.owner.device
    full = torch.zeros(m * n, dtype=torch.float32, device=dev)
    for f in spec.fragments:
        full[f.start : f.start + f.numel] = direction(f.tensor).view(-1)[f.offset : f.offset + f.numel].float()
    groups = spec.shard_group if isinstance(spec.shard_group, tuple) else (spec.shard_group,)
    for group in groups:  # fragments are disjoint, so the sum assembles them
        if group is not None:
            all_reduce_sum(full, group)
    return full.view(m, n)


def apply_dense_update_(spec: MatrixSpec, update: torch.Tensor, step_size: float, weight_decay: float = 0.0,
                        rounding: StochasticRounding | None = None) -> None:
    """W_piece <- W_piece (1 - step_size * wd) - step_size * update_piece, for a full (m, n) update; a bf16
    piece through stochastic rounding when ``rounding`` is given (the same bits as the engine's update)."""
    flat = update.reshape(-1)
    for f in spec.fragments:
        p = f.tensor.view(-1)[f.offset : f.offset + f.numel]
        if rounding is not None and p.dtype == torch.bfloat16:
            decay = 1.0 - step_size * weight_decay if weight_decay else 1.0
            y = update_target(p, flat[f.start : f.start + f.numel].to(torch.float32, copy=True), decay, step_size)
            index = flat_indices(spec.shape, spec.global_shape, spec.global_offset, f.start, f.start + f.numel,
                                 p.device)
            p.copy_(stochastic_round_bf16(y, random16(rounding.stream(spec.key), index)))
            continue
        if weight_decay:
            p.mul_(1.0 - step_size * weight_decay)
        p.add_(flat[f.start : f.start + f.numel].to(p.dtype), alpha=-step_size)
