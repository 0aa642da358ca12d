"""SR-Sinkhorn in plain torch: the reference every backend is tested against, and the fallback.

For a gradient G (m x n) whose rows fall into blocks b(i) (one block unless the weight is fused), the
normalised gradient is diag(r) G diag(c) with

    row half:  r_i  = sqrt(n)   / sqrt( sum_j         G_ij^2 c_{b(i)j}^2 )
    col half:  c_bj = sqrt(m_b) / sqrt( sum_{i in b}  r_i^2  G_ij^2     )

and a zero sum gives a zero scale. Both are sums, so every *segment* (a 2-D run of G inside one tensor,
see ``sinkgd_ds.layout``) adds its partial sums into the matrix's vectors; the engine then completes them
over the ranks with one all-reduce per half. The update is W <- W (1 - s wd) - s k diag(r) G diag(c); a bf16
W takes it through stochastic rounding when the step asks for it (``sinkgd_ds.rounding``).
"""

from __future__ import annotations

import functools

import torch

from ..layout import MatrixSpec, Segment
from ..rounding import StochasticRounding, random16, stochastic_round_bf16, update_target

__all__ = ["TorchBackend", "guarded_scale", "row_partials_", "col_partials_", "scaled_update_", "segment_noise",
           "segment_view"]


@functools.lru_cache(maxsize=64)
def check_schedule(schedule: tuple[str, ...]) -> bytes:
    """The schedule as the kernels' bytes (0 = row half, 1 = col half)."""
    for half in schedule:
        if half not in ("row", "col"):
            raise ValueError(f"schedule entries must be 'row' or 'col', got {half!r}")
    return bytes(0 if h == "row" else 1 for h in schedule)


def guarded_scale(sums: torch.Tensor, target: torch.Tensor | float) -> torch.Tensor:
    """target / sqrt(sums); zero sum -> zero scale. NaN stays NaN and inf -> 0 (NaN one half later)."""
    return torch.where(sums == 0, torch.zeros_like(sums), target * torch.rsqrt(sums))


def row_partials_(out: torch.Tensor, g: torch.Tensor, csq: torch.Tensor) -> None:
    """out[i] += sum_j g_ij^2 csq_j  (g: a segment, rows x cols; csq: its columns' c^2)."""
    out.addmv_(g.float().square(), csq)


def col_partials_(out: torch.Tensor, g: torch.Tensor, rsq: torch.Tensor) -> None:
    """out[j] += sum_i rsq_i g_ij^2."""
    out.addmv_(g.float().square().t(), rsq)


def scaled_update_(p: torch.Tensor, g: torch.Tensor, r: torch.Tensor, c: torch.Tensor, decay: float,
                   alpha: float, noise: tuple[int, torch.Tensor] | None = None) -> None:
    """p <- p decay - alpha diag(r) g diag(c)  (p, g: a segment; r: its rows' scales; c: its columns').

    ``noise``: (stream key, logical indices of the segment's elements) to round a bf16 ``p`` stochastically;
    None rounds to nearest (in the order torch's in-place ops round: the decayed weight, the update, the sum)."""
    upd = g.float() * r[:, None]
    upd.mul_(c)
    if noise is not None and p.dtype == torch.bfloat16:
        stream, index = noise
        p.copy_(stochastic_round_bf16(update_target(p, upd, decay, alpha), random16(stream, index)))
        return
    if decay != 1.0:
        p.mul_(decay)
    p.add_(upd.to(p.dtype), alpha=-alpha)


def segment_noise(spec: MatrixSpec, seg: Segment, rounding: StochasticRounding | None,
                  device: torch.device) -> tuple[int, torch.Tensor] | None:
    """The stream key and logical element indices of ``seg`` for :func:`scaled_update_`, or None."""
    if rounding is None:
        return None
    stride = spec.global_shape[1]
    rows = torch.arange(seg.rows, dtype=torch.int64, device=device)[:, None] * stride
    index = rows + torch.arange(seg.cols, dtype=torch.int64, device=device) + spec.index_base(seg)
    return rounding.stream(spec.key), index


def segment_view(tensor: torch.Tensor, seg: Segment, read_only: bool = False) -> torch.Tensor:
    """The (rows, cols) view of ``seg`` inside a fragment's tensor, or, ``read_only``, of its gradient (which
    may be non-contiguous: then a copy of its elements in row-major order)."""
    flat = tensor.reshape(-1) if read_only else tensor.view(-1)
    return flat[seg.offset : seg.offset + seg.rows * seg.cols].view(seg.rows, seg.cols)


class TorchBackend:
    """The reference as a backend: one torch op per segment (any device, dtype and tensor type)."""

    name = "torch"

    def prepare(self, batch) -> None:
        """Nothing to build: every call walks the segments."""

    def normalize_local(self, batch, schedule: bytes) -> list[int]:
        return []  # (no whole-schedule shortcut: every matrix goes through the half-iterations)

    def step(self, batch, schedule: tuple[str, ...], decay: float, alpha: float, per_matrix: bool, stats,
             rounding: StochasticRounding | None = None):
        return None  # (no one-call step: the engine normalises, reads the verdict, then applies)

    def begin(self, batch, idx: list[int]) -> None:
        for i in idx:
            batch.scales[i].r.fill_(1.0)
            batch.scales[i].c.fill_(1.0)
            batch.scales[i].set_flag(torch.zeros((), dtype=torch.bool, device=batch.scales[i].r.device))

    def partials(self, batch, idx: list[int], half: str, previous: str | None, following: str | None = None) -> None:
        """This half's partial sums into the engine's buffers; first the other half's scales from its sums."""
        sums = batch.sums
        for i in idx:
            spec, sc = batch.specs[i], batch.scales[i]
            if previous is not None:
                self._finish_half(batch, i, previous)
            if half == "row":
                out, csq = sums.row(i), sc.c.square()
                out.zero_()
                for seg, g in _segments(spec, batch.direction):
                    row_partials_(out[seg.row : seg.row + seg.rows], g, csq[seg.block, seg.col : seg.col + seg.cols])
            else:
                out, rsq = sums.col(i).view(spec.blocks.count, spec.shape[1]), sc.r.square()
                out.zero_()
                for seg, g in _segments(spec, batch.direction):
                    col_partials_(out[seg.block, seg.col : seg.col + seg.cols], g, rsq[seg.row : seg.row + seg.rows])

    def finish(self, batch, idx: list[int], last: str) -> None:
        for i in idx:
            self._finish_half(batch, i, last)

    def _finish_half(self, batch, i: int, half: str) -> None:
        """The scales of ``half`` from its completed sums, and their finiteness into the matrix's flag."""
        spec, sc = batch.specs[i], batch.scales[i]
        if half == "row":
            sums = batch.sums.row(i)
            sc.r.copy_(guarded_scale(sums, spec.row_target))
        else:
            sums = batch.sums.col(i).view(spec.blocks.count, spec.shape[1])
            sc.c.copy_(guarded_scale(sums, batch.col_targets(i)[:, None]))
        sc.flag |= ~torch.isfinite(sums).all()

    def apply(self, batch, idx: list[int], decay: float, alpha: float, gate: torch.Tensor | None,
              rounding: StochasticRounding | None = None) -> None:
        for i in idx:
            spec, sc = batch.specs[i], batch.scales[i]
            n = spec.shape[1]
            for seg, g in _segments(spec, batch.direction):
                p = segment_view(spec.fragments[seg.fragment].tensor, seg)
                c = sc.c.view(-1)[seg.block * n + seg.col : seg.block * n + seg.col + seg.cols]
                noise = segment_noise(spec, seg, rounding, p.device) if p.dtype == torch.bfloat16 else None
                if gate is None:
                    scaled_update_(p, g, sc.r[seg.row : seg.row + seg.rows], c, decay, alpha, noise)
                else:  # (device verdict: write the old values back where the step is skipped, no host sync)
                    new = p.clone()
                    scaled_update_(new, g, sc.r[seg.row : seg.row + seg.rows], c, decay, alpha, noise)
                    p.copy_(torch.where(gate > 0, p, new))


def _segments(spec: MatrixSpec, direction):
    for seg in spec.segments:
        yield seg, segment_view(direction(spec.fragments[seg.fragment].tensor), seg, read_only=True)
