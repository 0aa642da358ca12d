"""The Triton backend: CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``, for tests).

A step is, whatever the number of matrices: one flag reset, one launch per half-iteration, one launch for the
final scales and one for the update (2L + 3 launches for SinkGD with L iterations), plus the all-reduces the
layout needs between halves. A matrix that no other rank shares reads G once per iteration (the row half adds
its column contributions while the tile is in cache); a shared one reads it once per half. Descriptor tables
are built on the host only when the batch's tensors move, and uploaded once (pinned, non-blocking); the
verdict stays on the device (per-matrix flags), so nothing in a step waits for the GPU. The kernels are
``triton_kernels.py``.

Tensors the kernels cannot take (another dtype than fp32/bf16, non-contiguous, a tensor subclass such as a
DTensor, tensors on several devices) make the batch use the torch reference instead: no address is ever
taken from a tensor that was not checked here.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from ..rounding import StochasticRounding
from . import _TORCH

__all__ = ["TritonBackend"]

_CODES = {torch.float32: 0, torch.bfloat16: 1}
_PLAIN = (torch.Tensor, torch.nn.Parameter)
# One launch at a time in this process: Triton's interpreter is not thread-safe, nor is a first compile racing
# another one (ranks simulated by threads, in the tests and the GPU check, launch from several threads).
_launch_lock = threading.Lock()


def _takes(t: torch.Tensor, device: torch.device) -> bool:
    return (type(t) in _PLAIN and t.device == device and t.dtype in _CODES and t.is_contiguous()
            and t.data_ptr() != 0)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class _Tables:
    mats: torch.Tensor
    segs: torch.Tensor
    targets: torch.Tensor
    row_progs: torch.Tensor
    col_progs: torch.Tensor
    apply_progs: torch.Tensor
    apply_progs_f32: torch.Tensor  # the apply programs of fp32 weights, and of bf16 weights (stochastic rounding
    apply_progs_bf16: torch.Tensor  # launches the two apart: fp32 weights keep today's variant bit for bit)
    prows: torch.Tensor
    partial: torch.Tensor  # local matrices: a row of column contributions per row tile (about G / 16 floats)
    flags: torch.Tensor  # int32 per matrix: nonzero = non-finite sums this step
    host: tuple  # the pinned host copies, alive until their non-blocking upload is done
    state: dict  # which sums this normalisation has computed; whether the last row half emitted partials


class TritonBackend:
    """One launch per half-iteration for all matrices of a batch; see the module docstring."""

    name = "triton"
    ROW_TILE = (16, 128)  # rows x cols of a row-pass tile (BR is also the finish pass's row tile)
    COL_TILE = (32, 64)  # rows x cols of a col-pass tile (BC is also the finish pass's column tile)
    APPLY_BLOCK = 2048

    def __init__(self) -> None:
        from . import triton_kernels

        self.k = triton_kernels

    # ------------------------------------------------------------------ descriptors
    def prepare(self, batch) -> None:
        tables = self._tables(batch)
        if tables is None:  # something the kernels cannot take: this batch runs on the reference
            batch.backend = _TORCH
            _TORCH.prepare(batch)
            return
        batch.prepared = tables

    def _tables(self, batch) -> _Tables | None:
        if not batch.specs:
            return None
        device = batch.scales[0].r.device
        sums = batch.sums
        if sums.rows.device != device:
            return None
        mats, segs, targets, row_progs, col_progs, prows = [], [], [], [], [], []
        br, bc = self.ROW_TILE[0], self.COL_TILE[1]
        partial_size = 0
        for k, (spec, sc) in enumerate(zip(batch.specs, batch.scales)):
            m, n = spec.shape
            nb = spec.blocks.count
            if not (_takes(sc.r, device) and _takes(sc.c, device) and sc.r.dtype == sc.c.dtype == torch.float32
                    and sc.r.numel() == m and sc.c.numel() == nb * n):
                return None
            frags = []
            for f in spec.fragments:
                p, g = f.tensor, batch.direction(f.tensor)
                if g is None or not (_takes(p, device) and _takes(g, device) and g.numel() == p.numel()):
                    return None
                frags.append((p, g))
            lo = len(segs)
            for seg in spec.segments:
                p, g = frags[seg.fragment]
                segs.append((g.data_ptr() + seg.offset * g.element_size(), _CODES[g.dtype], seg.row, seg.rows,
                             seg.col, seg.cols, seg.block, p.data_ptr() + seg.offset * p.element_size(),
                             _CODES[p.dtype], k, spec.index_base(seg), spec.global_shape[1], spec.key))
            mats.append((m, n, nb, lo, len(segs), sums.row_offsets[k], sums.col_offsets[k], sc.r.data_ptr(),
                         sc.c.data_ptr(), len(targets)))
            targets.append(spec.row_target)
            targets.extend(float(rows) ** 0.5 for rows in spec.blocks.global_rows)
            first = len(row_progs)
            if spec.is_local and spec.segments and all(sg.col == 0 and sg.cols == n for sg in spec.segments):
                # one pass per iteration: tiles inside one segment (hence one row block), each with its own
                # row of column contributions in the partial buffer
                p_lo = len(prows)
                for i, sg in enumerate(spec.segments):
                    for r0 in range(sg.row, sg.row + sg.rows, br):
                        row_progs.append([k, r0, min(r0 + br, sg.row + sg.rows), 0, 0, lo + i, lo + i + 1, len(prows)])
                        prows.append((partial_size, sg.block))
                        partial_size += n
                p_range = (p_lo, len(prows))
            else:
                row_progs.extend([k, t * br, min(t * br + br, m), 0, 0, lo, len(segs), -1] for t in range(_cdiv(m, br)))
                p_range = (-1, -1)
            for t, prog in enumerate(row_progs[first:]):
                prog[3], prog[4] = t, len(row_progs) - first
            ctiles = _cdiv(n, bc)
            col_progs.extend((k, b, t * bc, b * ctiles + t, nb * ctiles, *p_range) for b in range(nb)
                             for t in range(ctiles))
        seg_numel = torch.tensor([s[3] * s[5] for s in segs], dtype=torch.int64)
        tiles = (seg_numel + self.APPLY_BLOCK - 1) // self.APPLY_BLOCK
        seg_of = torch.repeat_interleave(torch.arange(len(segs)), tiles)
        first = torch.cumsum(tiles, 0) - tiles
        apply_progs = torch.stack([seg_of, (torch.arange(len(seg_of)) - first[seg_of]) * self.APPLY_BLOCK], 1)
        bf16_weight = torch.tensor([s[8] == _CODES[torch.bfloat16] for s in segs], dtype=torch.bool)[seg_of]
        host = [torch.tensor(mats, dtype=torch.int64), torch.tensor(segs, dtype=torch.int64).reshape(-1, 13),
                torch.tensor(targets, dtype=torch.float32), torch.tensor(row_progs, dtype=torch.int64),
                torch.tensor(col_progs, dtype=torch.int64), apply_progs.contiguous(),
                apply_progs[~bf16_weight].contiguous(), apply_progs[bf16_weight].contiguous(),
                torch.tensor(prows or [(0, 0)], dtype=torch.int64)]
        if device.type == "cuda":
            host = [t.pin_memory() for t in host]
        dev = [t.to(device, non_blocking=True) for t in host]
        flags = torch.zeros(len(batch.specs), dtype=torch.int32, device=device)
        partial = torch.empty(max(partial_size, 1), dtype=torch.float32, device=device)
        return _Tables(*dev, partial=partial, flags=flags, host=tuple(host),
                       state={"row": False, "col": False, "emitted": False})

    # ------------------------------------------------------------------ the engine's operations
    def normalize_local(self, batch, schedule: bytes) -> list[int]:
        return []  # (local matrices go through the same launches, with no all-reduce between them)

    def begin(self, batch, idx: list[int]) -> None:
        tb = batch.prepared
        tb.flags.zero_()
        tb.state.update(row=False, col=False, emitted=False)
        for i in idx:
            batch.scales[i].set_flag(tb.flags[i])

    def partials(self, batch, idx: list[int], half: str, previous: str | None, following: str | None = None) -> None:
        tb, sums, st = batch.prepared, batch.sums, batch.prepared.state
        if half == "row":
            br, bc = self.ROW_TILE
            emit = following == "col"  # (local matrices then add their column contributions in the same pass)
            self._launch(self.k.row_pass, len(tb.row_progs), tb.mats, tb.segs, tb.targets, tb.row_progs, tb.prows,
                         tb.partial, sums.rows, sums.cols, tb.flags, HAVE_COL=st["col"], EMIT=emit, BR=br, BC=bc)
            st["emitted"] = emit
        else:
            br, bc = self.COL_TILE
            use = 1 if previous == "row" and st["emitted"] else 0
            self._launch(self.k.col_pass, len(tb.col_progs), tb.mats, tb.segs, tb.targets, tb.col_progs, tb.prows,
                         tb.partial, sums.rows, sums.cols, tb.flags, use, HAVE_ROW=st["row"], BR=br, BC=bc)
            st["emitted"] = False
        st[half] = True

    def finish(self, batch, idx: list[int], last: str) -> None:
        tb, sums = batch.prepared, batch.sums
        self._launch(self.k.finish_pass, len(tb.row_progs) + len(tb.col_progs), tb.mats, tb.targets, tb.row_progs,
                     tb.col_progs, sums.rows, sums.cols, tb.flags, len(tb.row_progs), HAVE_ROW=tb.state["row"],
                     HAVE_COL=tb.state["col"], BR=self.ROW_TILE[0], BC=self.COL_TILE[1])

    def apply(self, batch, idx: list[int], decay: float, alpha: float, gate: torch.Tensor | None,
              rounding: StochasticRounding | None = None) -> None:
        """Every matrix (``idx`` is all of them), or with ``idx`` a subset: the matrices whose flag is clear
        (the engine's only subset is the clean matrices of a non-finite step). With ``rounding`` the bf16
        weights take the stochastic variant (one more launch where fp32 and bf16 weights share a batch)."""
        tb = batch.prepared
        mode = 2 if len(idx) != len(batch.specs) else (1 if gate is not None else 0)
        gate_t = gate.reshape(()).to(device=tb.flags.device, dtype=torch.float32) if gate is not None else tb.targets
        args = (tb.mats, tb.segs)
        meta = dict(GATE=mode, USE_DECAY=decay != 1.0, BLOCK=self.APPLY_BLOCK)
        if rounding is None or len(tb.apply_progs_bf16) == 0:
            self._launch(self.k.apply_pass, len(tb.apply_progs), *args, tb.apply_progs, gate_t, tb.flags,
                         float(decay), float(alpha), 0, 0, STOCHASTIC=False, **meta)
            return
        if len(tb.apply_progs_f32):
            self._launch(self.k.apply_pass, len(tb.apply_progs_f32), *args, tb.apply_progs_f32, gate_t, tb.flags,
                         float(decay), float(alpha), 0, 0, STOCHASTIC=False, **meta)
        self._launch(self.k.apply_pass, len(tb.apply_progs_bf16), *args, tb.apply_progs_bf16, gate_t, tb.flags,
                     float(decay), float(alpha), *rounding.words, STOCHASTIC=True, enable_fp_fusion=False, **meta)

    def step(self, batch, schedule: tuple[str, ...], decay: float, alpha: float, per_matrix: bool, stats,
             rounding: StochasticRounding | None = None) -> bool:
        """Normalise, then update gated on the device (the whole batch's verdict, or each matrix's own flag);
        the one host read is the returned verdict, after everything is queued."""
        batch._normalize(schedule, stats)
        if per_matrix:
            self.apply(batch, [], decay, alpha, None, rounding)
        else:
            self.apply(batch, batch._all, decay, alpha, batch.verdict(), rounding)
        batch._checked = False
        return batch.all_finite()

    @staticmethod
    def _launch(kernel, programs: int, *args, **meta) -> None:
        if programs == 0:
            return
        with _launch_lock:  # (an uncontended lock costs ~0.1 us; ranks simulated by threads may contend)
            kernel[(programs,)](*args, **meta)
