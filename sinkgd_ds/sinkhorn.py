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

On CPU the work is done by native kernels (``sinkgd_ds.kernels``) when they could be built; the torch
code below stays the reference and the fallback (GPU tensors, fp16, no compiler). A matrix whose sums
are all complete on this rank (``spec.is_local``: no collective) runs its whole schedule in one call
with ONE pass over G per iteration (a row's r_i is known as soon as the row is summed, so its column
contribution r_i^2 G_ij^2 is added while the row is still in cache). Sharded matrices keep the
half-iteration structure (their collectives sit between the halves); the kernels then only compute
the local partial sums, without materialising G^2. The update is one pass fused with weight decay.
When nothing else can veto the step, normalisation, verdict and update are one native call
(``MatrixBatch.step_``); with ``per_matrix=True`` each matrix is updated right after its own
normalisation, while its G is still in cache, and a non-finite matrix is left alone.
"""

from __future__ import annotations

import functools
import math
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist

from . import kernels as _kernels
from .layout import MatrixSpec, RowBlocks, Segment

__all__ = ["Scales", "MatrixBatch", "normalize_scales", "apply_scaled_update_", "apply_scaled_updates_",
           "apply_dense_update_", "gather_matrix", "CommStats"]

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


def _ptr(t: torch.Tensor, elem: int = 0) -> int:
    return t.data_ptr() + elem * t.element_size()


def _row_sums(spec: MatrixSpec, csq: torch.Tensor, direction: Direction, device, lib=None) -> torch.Tensor:
    out = torch.zeros(spec.shape[0], dtype=torch.float32, device=device)
    n = spec.shape[1]
    for seg in spec.segments:
        g = _view(spec, seg, direction)
        if lib is not None and _kernels.supports(g) and csq.device.type == "cpu":
            lib.sk_row_partial(_ptr(g), _kernels.DTYPE_CODES[g.dtype], seg.rows, seg.cols,
                               _ptr(csq, seg.block * n + seg.col), _ptr(out, seg.row), _kernels.num_threads(g.numel()))
            continue
        g2 = g.float().square()
        out[seg.row : seg.row + seg.rows].addmv_(g2, csq[seg.block, seg.col : seg.col + seg.cols])
    return out


def _col_sums(spec: MatrixSpec, rsq: torch.Tensor, direction: Direction, device, lib=None) -> torch.Tensor:
    out = torch.zeros(spec.blocks.count, spec.shape[1], dtype=torch.float32, device=device)
    n = spec.shape[1]
    for seg in spec.segments:
        g = _view(spec, seg, direction)
        if lib is not None and _kernels.supports(g) and rsq.device.type == "cpu":
            lib.sk_col_partial(_ptr(g), _kernels.DTYPE_CODES[g.dtype], seg.rows, seg.cols,
                               _ptr(rsq, seg.row), _ptr(out, seg.block * n + seg.col), _kernels.num_threads(g.numel()))
            continue
        g2 = g.float().square()
        out[seg.block, seg.col : seg.col + seg.cols].addmv_(g2.t(), rsq[seg.row : seg.row + seg.rows])
    return out


def _local_matrix(spec: MatrixSpec, direction: Direction) -> tuple[torch.Tensor, int] | None:
    """(G's tensor, address of G[0, 0]) when every sum of ``spec`` is complete on this rank (no collective),
    the whole local matrix is one contiguous run of a CPU tensor and the kernels take its dtype."""
    if spec.shard_group is not None or spec.row_group is not None or spec.col_group is not None:
        return None
    frags = spec.fragments
    if len(frags) != 1 or not spec.owner.is_cpu:
        return None
    f = frags[0]
    if f.start != 0 or f.numel != spec.shape[0] * spec.shape[1]:
        return None
    g = direction(f.tensor)
    if not _kernels.supports(g) or g.numel() < f.offset + f.numel:
        return None
    return g, g.data_ptr() + f.offset * g.element_size()


@functools.lru_cache(maxsize=64)
def _check_schedule(schedule: tuple[Half, ...]) -> bytes:
    """The schedule as the kernels' bytes (0 = row half, 1 = col half)."""
    for half in schedule:
        if half not in ("row", "col"):
            raise ValueError(f"schedule entries must be 'row' or 'col', got {half!r}")
    return bytes(0 if h == "row" else 1 for h in schedule)


@functools.lru_cache(maxsize=1024)
def _block_constants(blocks: RowBlocks) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Flattened row-block runs and the column targets sqrt(global rows) of each block."""
    return tuple(v for run in blocks.runs for v in run), tuple(math.sqrt(rows) for rows in blocks.global_rows)


@dataclass
class _NativeNormalize:
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
        # the addresses, taken once (the arrays never change after this)
        self.head = (len(self.index), _addr(self.desc), _addr(self.row_targets), _addr(self.runs),
                     _addr(self.col_targets))
        self.bad_addr = _addr(self.bad)


def _native_normalize(items: list[tuple[int, MatrixSpec, torch.Tensor, int, Scales]]) -> _NativeNormalize:
    """Descriptors for running the whole schedule of every local matrix in one native call (one pass over G
    per row+col iteration; matrices spread over the threads, no barrier inside a matrix unless it is too big
    to share). ``items``: (position, spec, G's tensor, address of G[0, 0], the scales to write)."""
    desc = array("q")
    runs = array("q")
    targets = array("f")
    row_targets = array("f")
    codes = _kernels.DTYPE_CODES
    for _, spec, g, ptr, sc in items:
        m, n = spec.shape
        flat_runs, col_targets = _block_constants(spec.blocks)
        desc.extend((ptr, codes[g.dtype], m, n, len(runs) // 3, len(flat_runs) // 3, len(col_targets), len(targets),
                     sc.r.data_ptr(), sc.c.data_ptr()))
        runs.extend(flat_runs)
        targets.extend(col_targets)
        row_targets.append(math.sqrt(spec.global_shape[1]))
    total = sum(spec.shape[0] * spec.shape[1] for _, spec, _, _, _ in items)
    bad = array("i", bytes(4 * len(items)))
    return _NativeNormalize([it[0] for it in items], desc, row_targets, runs, targets, bad, _kernels.num_threads(total))


def _kernel_vectors(r: torch.Tensor, c: torch.Tensor) -> bool:
    """The kernels read and write r and c through raw pointers: contiguous CPU fp32 only."""
    return r.is_cpu and c.is_cpu and r.dtype == c.dtype == torch.float32 and r.is_contiguous() and c.is_contiguous()


def _owns_scales(spec: MatrixSpec, sc: Scales) -> bool:
    """The normalisation kernel writes r and c in place: kernel vectors of exactly the spec's sizes."""
    m, n = spec.shape
    return _kernel_vectors(sc.r, sc.c) and sc.r.numel() == m and sc.c.numel() == spec.blocks.count * n


def _addr(buf: array) -> int:
    return buf.buffer_info()[0] if len(buf) else 0


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


class MatrixBatch:
    """The matrices that one optimizer step normalises and updates together, prepared for reuse.

    Building the native descriptors of a step costs about 20 us of Python per matrix, as much as the
    kernels spend on a small matrix. So an optimizer keeps one batch per parameter group: the
    descriptors are built once, and each later step only compares the tensors' current addresses,
    dtypes and sizes with the ones they were built for (under 1 us per tensor), rebuilding when
    anything moved (e.g. gradients set to None and reallocated). ``scales`` (one :class:`Scales` per
    spec) belong to the batch: every :meth:`normalize` overwrites their tensors in place.
    """

    def __init__(self, specs: Sequence[MatrixSpec], direction: Direction, scales: Sequence[Scales] | None = None):
        self.specs = tuple(specs)
        self.direction = direction
        if scales is None:
            scales = [Scales(torch.ones(sp.shape[0], dtype=torch.float32, device=sp.owner.device),
                             torch.ones(sp.blocks.count, sp.shape[1], dtype=torch.float32, device=sp.owner.device))
                      for sp in self.specs]
        elif len(scales) != len(self.specs):
            raise ValueError(f"got {len(scales)} scales for {len(self.specs)} matrices")
        self.scales = list(scales)
        self._any_cpu = any(sp.owner.is_cpu for sp in self.specs)
        # every tensor the descriptors point into, once (a ZeRO partition holds the pieces of many matrices)
        self._tensors = tuple({id(f.tensor): f.tensor for sp in self.specs for f in sp.fragments}.values())
        self._key: list | None = None
        self._checked = False  # normalize() validated the descriptors for the apply_() of the same step
        self._native_norm: _NativeNormalize | None = None
        self._torch_norm: list[int] = []
        self._apply_desc = array("q")
        self._apply_head = (0, 0)
        self._segment_starts: array | None = None  # per-matrix update segments, when every matrix runs natively
        self._apply_threads = 1
        self._torch_apply: list[int] = []

    def _addresses(self, lib) -> list:
        """Everything the descriptors depend on besides the specs (which are immutable). Runs every step with
        cold caches, so it is one flat loop (no closure or generator to create)."""
        key: list = [lib is not None, torch.get_num_threads()]
        direction = self.direction
        for t in self._tensors:
            g = direction(t)
            key += (t.data_ptr(), t.dtype, t.numel(), None) if g is None else \
                (t.data_ptr(), t.dtype, t.numel(), g.data_ptr(), g.dtype, g.numel(), g.is_contiguous())
        return key

    def _refresh(self, lib) -> None:
        key = self._addresses(lib)
        if key == self._key:
            return
        local = []
        if lib is not None:
            for i, (spec, sc) in enumerate(zip(self.specs, self.scales)):
                loc = _local_matrix(spec, self.direction)
                if loc is not None and _owns_scales(spec, sc):
                    local.append((i, spec, *loc, sc))
        self._native_norm = _native_normalize(local) if local else None
        native = {it[0] for it in local}
        self._torch_norm = [i for i in range(len(self.specs)) if i not in native]
        desc = self._apply_desc = array("q")
        starts = array("q")  # matrix i's update segments are desc rows [starts[i], starts[i + 1])
        self._torch_apply = []
        for i, (spec, sc) in enumerate(zip(self.specs, self.scales)):
            starts.append(len(desc) // 8)
            if lib is None or not _apply_segments(spec, sc.r, sc.c, self.direction, desc):
                self._torch_apply.append(i)
        starts.append(len(desc) // 8)
        all_native = bool(local) and len(local) == len(self.specs) and not self._torch_apply
        self._segment_starts = starts if all_native else None
        self._apply_threads = _kernels.num_threads(sum(desc[k + 4] * desc[k + 5] for k in range(0, len(desc), 8)))
        self._apply_head = (len(desc) // 8, _addr(desc))
        self._key = key

    def normalize(self, schedule: Sequence[Half], stats: CommStats | None = None) -> list[Scales]:
        """Run the half-iterations of ``schedule`` on every matrix together (see :func:`normalize_scales`)."""
        lib = _kernels.lib() if self._any_cpu else None
        self._refresh(lib)
        return self._normalize(tuple(schedule), stats, lib)

    def _normalize(self, schedule: tuple[Half, ...], stats: CommStats | None, lib) -> list[Scales]:
        """:meth:`normalize` on descriptors the caller has just refreshed."""
        stats = stats if stats is not None else CommStats()
        sched = _check_schedule(schedule)
        self._checked = True
        # Local matrices need no collective, so they run first, all in one call (which works through them
        # roughly in reverse order, so that the update pass starts on gradients that are still in cache).
        nat = self._native_norm
        if nat is not None:
            self._take_native_verdicts(
                lib.sk_normalize_many(*nat.head, sched, len(sched), nat.threads, _kernels.SPREAD, nat.bad_addr))
        if self._torch_norm:
            _normalize_torch([self.specs[i] for i in self._torch_norm], [self.scales[i] for i in self._torch_norm],
                             self.direction, schedule, stats, lib)
        return self.scales

    def _take_native_verdicts(self, rc: int) -> None:
        """After a native normalising call: its per-matrix non-finite flags into ``scales``."""
        if rc < 0:
            raise RuntimeError("sinkgd_ds kernel rejected a gradient dtype")
        for i, flag in zip(self._native_norm.index, self._native_norm.bad):
            self.scales[i].finite = flag == 0

    def apply_(self, step_size: float, weight_decay: float = 0.0, extra_scale: float = 1.0,
               recheck: bool = True) -> None:
        """W <- W (1 - step_size * weight_decay) - step_size * extra_scale * diag(r) G diag(c) for every matrix:
        on CPU one native call for all of them (matrices spread over the threads, one fork/join), the rest
        one by one in torch. ``recheck=False`` reuses the check made by :meth:`normalize` in the same step
        (for callers that know no tensor moved in between, as the optimizers do)."""
        lib = _kernels.lib() if self._any_cpu else None
        if recheck or not self._checked:
            self._refresh(lib)
        self._checked = False
        if self._apply_desc:
            lib.sk_apply_many(*self._apply_head, *_update_coefficients(step_size, weight_decay, extra_scale),
                              self._apply_threads)
        for i in self._torch_apply:
            _apply_torch(self.specs[i], self.scales[i], self.direction, step_size, weight_decay, extra_scale)

    def step_(self, schedule: Sequence[Half], step_size: float, weight_decay: float = 0.0, extra_scale: float = 1.0,
              stats: CommStats | None = None, per_matrix: bool = False) -> bool:
        """Normalise and update in one go, for a caller whose verdict is complete with this batch's (nothing after
        it can veto the step). Returns whether every matrix was updated; ``scales[i].finite`` says which were not.

        ``per_matrix=False``: :meth:`normalize`, then :meth:`apply_` only if every matrix's sums are finite
        (otherwise nothing is written). ``per_matrix=True``: each matrix with finite sums is updated, the others
        are left as they are; each matrix is updated right after its own normalisation, while its G is still in
        cache, so G is read from DRAM once instead of twice. When every matrix runs natively either is ONE
        native call: no Python and no thread wake-up between the passes.
        """
        schedule = tuple(schedule)
        sched = _check_schedule(schedule)
        lib = _kernels.lib() if self._any_cpu else None
        self._refresh(lib)
        nat = self._native_norm
        if nat is None or self._segment_starts is None:
            scales = self._normalize(schedule, stats, lib)  # (refreshed above: the address check runs once)
            if all([s.finite for s in scales]):
                self.apply_(step_size, weight_decay, extra_scale, recheck=False)
                return True
            if per_matrix:  # (rare: a non-finite step of a batch the kernels do not fully cover)
                clean = [i for i, sc in enumerate(scales) if sc.finite]
                MatrixBatch([self.specs[i] for i in clean], self.direction,
                            [scales[i] for i in clean]).apply_(step_size, weight_decay, extra_scale)
            return False
        coefficients = _update_coefficients(step_size, weight_decay, extra_scale)
        if per_matrix:
            rc = lib.sk_fused_many(*nat.head, sched, len(sched), nat.threads, _kernels.SPREAD, nat.bad_addr,
                                   _addr(self._segment_starts), self._apply_head[1], *coefficients)
        else:
            rc = lib.sk_step_many(*nat.head, sched, len(sched), nat.threads, _kernels.SPREAD, nat.bad_addr,
                                  *self._apply_head, *coefficients, self._apply_threads)
        self._take_native_verdicts(rc)
        return rc == 0


def _update_coefficients(step_size: float, weight_decay: float, extra_scale: float) -> tuple[float, float, int]:
    """The kernels' (decay, alpha, use_decay): W <- W (1 - step_size wd) - step_size extra_scale diag(r) G diag(c)."""
    return 1.0 - step_size * weight_decay, step_size * extra_scale, 1 if weight_decay else 0


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
    Optimizers that step the same matrices repeatedly keep a :class:`MatrixBatch` instead.
    """
    return MatrixBatch(specs, direction).normalize(schedule, stats)


def _normalize_torch(specs: Sequence[MatrixSpec], scales: Sequence[Scales], direction: Direction,
                     schedule: Sequence[Half], stats: CommStats, lib) -> None:
    """Half-iteration by half-iteration, with one bucketed all-reduce per half (the sharded path);
    writes r and c into ``scales`` in place."""
    for sc in scales:
        sc.r.fill_(1.0)
        sc.c.fill_(1.0)
    bad = [torch.zeros((), dtype=torch.bool, device=s.r.device) for s in scales]
    for half in schedule:
        if half == "row":
            sums = [_row_sums(sp, sc.c.square(), direction, sc.r.device, lib) for sp, sc in zip(specs, scales)]
            _allreduce_bucketed(sums, [(sp.shard_group, sp.row_group) for sp in specs], stats)
            for i, (sp, sc) in enumerate(zip(specs, scales)):
                bad[i] |= ~torch.isfinite(sums[i]).all()
                sc.r.copy_(_guarded_scale(sums[i], sp.row_target))
        else:
            sums = [_col_sums(sp, sc.r.square(), direction, sc.r.device, lib) for sp, sc in zip(specs, scales)]
            _allreduce_bucketed(sums, [(sp.shard_group, sp.col_group) for sp in specs], stats)
            for i, (sp, sc) in enumerate(zip(specs, scales)):
                bad[i] |= ~torch.isfinite(sums[i]).all()
                sc.c.copy_(_guarded_scale(sums[i], sp.col_targets().to(sums[i].device)[:, None]))
    if bad:
        for sc, flag in zip(scales, torch.stack(bad).tolist()):
            sc.finite = not flag


def apply_scaled_update_(
    spec: MatrixSpec,
    scales: Scales,
    direction: Direction,
    step_size: float,
    weight_decay: float = 0.0,
    extra_scale: float = 1.0,
) -> None:
    """W <- W (1 - step_size * weight_decay) - step_size * extra_scale * diag(r) G diag(c), on local pieces."""
    apply_scaled_updates_([spec], [scales], direction, step_size, weight_decay, extra_scale)


def apply_scaled_updates_(
    specs: Sequence[MatrixSpec],
    scales: Sequence[Scales],
    direction: Direction,
    step_size: float,
    weight_decay: float = 0.0,
    extra_scale: float = 1.0,
) -> None:
    """:func:`apply_scaled_update_` for many matrices with the same step size (see :meth:`MatrixBatch.apply_`)."""
    MatrixBatch(specs, direction, scales).apply_(step_size, weight_decay, extra_scale)


def _apply_torch(spec: MatrixSpec, scales: Scales, direction: Direction, step_size: float, weight_decay: float,
                 extra_scale: float) -> None:
    r, c = scales.r, scales.c
    for seg in spec.segments:
        frag = spec.fragments[seg.fragment]
        p = frag.tensor.view(-1)[seg.offset : seg.offset + seg.rows * seg.cols].view(seg.rows, seg.cols)
        g = _view(spec, seg, direction)
        upd = g.float() * r[seg.row : seg.row + seg.rows, None]
        upd.mul_(c[seg.block, seg.col : seg.col + seg.cols])
        if weight_decay:
            p.mul_(1.0 - step_size * weight_decay)
        p.add_(upd.to(p.dtype), alpha=-step_size * extra_scale)


def _apply_segments(spec: MatrixSpec, r: torch.Tensor, c: torch.Tensor, direction: Direction, desc: array) -> bool:
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
                     cp + 4 * (seg.block * n + seg.col)))
    return True


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
