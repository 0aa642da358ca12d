"""Triton kernels of the Sinkhorn engine: one launch per half-iteration for every segment of every matrix.

Tensors are reached through int64 descriptor tables (addresses, sizes, offsets), as in Triton's grouped-GEMM
tutorial, so one launch covers any number of matrices and layouts. Every sum is computed by exactly one
program in a fixed order (a program owns a row tile of a matrix, or a column tile of one row block, and walks
that matrix's segments in table order): no atomics, so every rank that shares a matrix gets the same bits.
A matrix no other rank shares takes one pass over G per iteration (see ``row_pass``).
The scales of the previous half are computed inside the kernel from its completed sums (zero sum -> zero
scale) and every sums vector is checked for non-finite values by exactly one program per element, which sets
the matrix's device flag; nothing is read back on the host.

Tables (int64, one row per entry; the column names below are the only coupling with ``triton_backend.py``):
  segments  G address, G dtype code, row, rows, col, cols, block, W address, W dtype code, matrix, logical index
            of element (0, 0), logical row stride, matrix key (the last three: stochastic rounding only)
  matrices  m, n, blocks, first segment, end segment, row-sum offset, col-sum offset, r address, c address,
            offset of its targets in the float table (sqrt(n), then sqrt(global rows) of each block)
  row programs  matrix, first row, end row, tile index, tiles of the matrix, first segment, end segment,
                partial row (-1: none)
  col programs  matrix, block, first column, tile index, tiles of the matrix, first and end partial row (-1)
  partial rows  offset in the partial buffer, block
  apply programs  segment, first element
A segment is a (rows x cols) run of G stored contiguously (rows == 1 or cols == n), so element (i, j) of the
matrix is at ``address + (i - row) * cols + (j - col)``.
"""

from __future__ import annotations

import triton
import triton.language as tl

# (globals a kernel reads must be tl.constexpr: the compiler refuses others, the interpreter does not check)
SEG_WIDTH = tl.constexpr(13)
MAT_WIDTH = tl.constexpr(10)
ROWP_WIDTH = tl.constexpr(8)
COLP_WIDTH = tl.constexpr(7)


@triton.jit
def _load_f32(addr, code, offs, mask):
    """Elements ``offs`` of a fp32 (code 0) or bf16 (code 1) tensor at ``addr``, as fp32 (0 where masked)."""
    if code == 0:
        x = tl.load(addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
    else:
        x = tl.load(addr.to(tl.pointer_type(tl.bfloat16)) + offs, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _round_bf16(x):
    """fp32 -> the nearest bf16 value, ties to even, kept in fp32. Written out because Triton's interpreter
    truncates in ``.to(tl.bfloat16)``; on a GPU this is what the conversion does anyway."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _fmix32(h):
    """MurmurHash3's 32-bit finaliser on uint32 (sinkgd_ds/rounding.py's ``fmix32``)."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _random16(seed, step, matrix, index):
    """16 uniform bits per element (int64 ``index``): sinkgd_ds/rounding.py's ``stream_key`` and ``random16``."""
    stream = _fmix32(_fmix32(_fmix32(seed.to(tl.uint32) ^ 0x9E3779B9) ^ step.to(tl.uint32)) ^ matrix.to(tl.uint32))
    h = _fmix32(index.to(tl.uint32) ^ stream)
    return _fmix32(h + ((index >> 32).to(tl.uint32) ^ stream)) >> 16


@triton.jit
def _stochastic_bf16_bits(y, r16):
    """The bf16 bit pattern (int16) of fp32 ``y`` rounded with the random ``r16``; NaN -> 0x7FC0."""
    u = y.to(tl.uint32, bitcast=True)
    bits = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, (u + r16) >> 16)
    return bits.to(tl.int16)


@triton.jit
def _scale(sums, target):
    """target / sqrt(sums); zero sum -> zero scale (NaN stays NaN, inf -> 0)."""
    return tl.where(sums == 0.0, 0.0, target / tl.sqrt(sums))


@triton.jit
def _flag_slice(sums, total, t, tiles, flags, k, BLOCK: tl.constexpr):
    """Program ``t`` of ``tiles`` checks its share of a matrix's completed sums; any non-finite one flags it."""
    chunk = (total + tiles - 1) // tiles
    a = t * chunk
    e = tl.minimum(a + chunk, total)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    i = a
    while i < e:
        o = i + tl.arange(0, BLOCK)
        x = tl.load(sums + o, mask=o < e, other=0.0)
        bad = bad | ((x - x) != 0.0).to(tl.int32)  # (x - x is NaN exactly for inf and NaN)
        i += BLOCK
    if tl.max(bad, 0) > 0:
        tl.store(flags + k, 1)


@triton.jit
def row_pass(mats, segs, targets, progs, prows, partial, rowsum, colsum, flags,
             HAVE_COL: tl.constexpr, EMIT: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """Row sums sum_j G_ij^2 c_j^2 of a tile of rows [r0, r1) of one matrix, over the segments held here.

    A *local* matrix (no other rank holds any of it; its tiles lie inside one segment and one row block) has
    complete sums here, so with EMIT (a column half follows) the program also knows r_i and adds its tile's
    column contributions r_i^2 G_ij^2 into its own row of ``partial`` while the tile is still in cache: one
    pass over G per iteration. The column half then only adds those rows up (``col_pass``)."""
    pid = tl.program_id(0)
    prog = progs + pid * ROWP_WIDTH
    k = tl.load(prog)
    r0 = tl.load(prog + 1)
    r1 = tl.load(prog + 2)
    lo = tl.load(prog + 5)
    hi = tl.load(prog + 6)
    mat = mats + k * MAT_WIDTH
    n = tl.load(mat + 1)
    roff = tl.load(mat + 5)
    coff = tl.load(mat + 6)
    toff = tl.load(mat + 9)
    if HAVE_COL:
        _flag_slice(colsum + coff, tl.load(mat + 2) * n, tl.load(prog + 3), tl.load(prog + 4), flags, k, BC)
    rows = r0 + tl.arange(0, BR)
    acc = tl.zeros([BR], dtype=tl.float32)
    s = lo
    while s < hi:
        seg = segs + s * SEG_WIDTH
        srow = tl.load(seg + 2)
        srows = tl.load(seg + 3)
        if (srow < r1) & (srow + srows > r0):
            gaddr = tl.load(seg)
            gcode = tl.load(seg + 1)
            scol = tl.load(seg + 4)
            scols = tl.load(seg + 5)
            blk = tl.load(seg + 6)
            target = tl.load(targets + toff + 1 + blk)
            rmask = (rows >= srow) & (rows < srow + srows) & (rows < r1)
            j = 0
            while j < scols:
                cols = j + tl.arange(0, BC)
                cmask = cols < scols
                if HAVE_COL:
                    c = _scale(tl.load(colsum + coff + blk * n + scol + cols, mask=cmask, other=1.0), target)
                else:
                    c = tl.full([BC], 1.0, tl.float32)
                g = _load_f32(gaddr, gcode, (rows - srow)[:, None] * scols + cols[None, :],
                              rmask[:, None] & cmask[None, :])
                acc += tl.sum(g * g * (c * c)[None, :], axis=1)
                j += BC
        s += 1
    tl.store(rowsum + roff + rows, acc, mask=rows < r1)
    if EMIT:
        prow = tl.load(prog + 7)
        if prow >= 0:  # a local matrix: the tile's column contributions, from the same (cached) tile
            seg = segs + lo * SEG_WIDTH
            srow = tl.load(seg + 2)
            gaddr = tl.load(seg)
            gcode = tl.load(seg + 1)
            r = _scale(acc, tl.load(targets + toff))
            rmask = rows < r1
            base = partial + tl.load(prows + prow * 2)
            j = 0
            while j < n:
                cols = j + tl.arange(0, BC)
                cmask = cols < n
                g = _load_f32(gaddr, gcode, (rows - srow)[:, None] * n + cols[None, :], rmask[:, None] & cmask[None, :])
                tl.store(base + cols, tl.sum(g * g * (r * r)[:, None], axis=0), mask=cmask)
                j += BC


@triton.jit
def col_pass(mats, segs, targets, progs, prows, partial, rowsum, colsum, flags, use_partial,
             HAVE_ROW: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """Column sums sum_i r_i^2 G_ij^2 of a tile of BC columns of one row block of one matrix: for a local
    matrix whose row half just emitted them (``use_partial`` 1), the sum of its tiles' rows of ``partial`` in
    tile order; else over the segments held here."""
    pid = tl.program_id(0)
    prog = progs + pid * COLP_WIDTH
    k = tl.load(prog)
    b = tl.load(prog + 1)
    c0 = tl.load(prog + 2)
    p_lo = tl.load(prog + 5)
    p_hi = tl.load(prog + 6)
    mat = mats + k * MAT_WIDTH
    n = tl.load(mat + 1)
    roff = tl.load(mat + 5)
    coff = tl.load(mat + 6)
    target = tl.load(targets + tl.load(mat + 9))
    if HAVE_ROW:
        _flag_slice(rowsum + roff, tl.load(mat), tl.load(prog + 3), tl.load(prog + 4), flags, k, BR)
    cols = c0 + tl.arange(0, BC)
    acc = tl.zeros([BC], dtype=tl.float32)
    if (p_lo >= 0).to(tl.int32) * use_partial > 0:
        p = p_lo
        while p < p_hi:
            if tl.load(prows + p * 2 + 1) == b:
                acc += tl.load(partial + tl.load(prows + p * 2) + cols, mask=cols < n, other=0.0)
            p += 1
    else:
        s = tl.load(mat + 3)
        hi = tl.load(mat + 4)
        while s < hi:
            seg = segs + s * SEG_WIDTH
            scol = tl.load(seg + 4)
            scols = tl.load(seg + 5)
            blk = tl.load(seg + 6)
            if (blk == b) & (scol < c0 + BC) & (scol + scols > c0):
                gaddr = tl.load(seg)
                gcode = tl.load(seg + 1)
                srow = tl.load(seg + 2)
                srows = tl.load(seg + 3)
                cmask = (cols >= scol) & (cols < scol + scols)
                i = 0
                while i < srows:
                    rr = i + tl.arange(0, BR)
                    rmask = rr < srows
                    if HAVE_ROW:
                        r = _scale(tl.load(rowsum + roff + srow + rr, mask=rmask, other=1.0), target)
                    else:
                        r = tl.full([BR], 1.0, tl.float32)
                    g = _load_f32(gaddr, gcode, rr[:, None] * scols + (cols - scol)[None, :],
                                  rmask[:, None] & cmask[None, :])
                    acc += tl.sum(g * g * (r * r)[:, None], axis=0)
                    i += BR
            s += 1
    tl.store(colsum + coff + b * n + cols, acc, mask=cols < n)


@triton.jit
def finish_pass(mats, targets, row_progs, col_progs, rowsum, colsum, flags, n_row_progs,
                HAVE_ROW: tl.constexpr, HAVE_COL: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """The final scales r (row programs) and c (col programs) from the completed sums; non-finite sums flag.
    (The two branches name their values apart: the compiler wants one type per name across them.)"""
    pid = tl.program_id(0)
    if pid < n_row_progs:
        rprog = row_progs + pid * ROWP_WIDTH
        rk = tl.load(rprog)
        rows = tl.load(rprog + 1) + tl.arange(0, BR)
        rmask = rows < tl.load(rprog + 2)
        rmat = mats + rk * MAT_WIDTH
        if HAVE_ROW:
            rsums = tl.load(rowsum + tl.load(rmat + 5) + rows, mask=rmask, other=0.0)
            if tl.max(((rsums - rsums) != 0.0).to(tl.int32), 0) > 0:
                tl.store(flags + rk, 1)
            r = _scale(rsums, tl.load(targets + tl.load(rmat + 9)))
        else:
            r = tl.full([BR], 1.0, tl.float32)
        tl.store(tl.load(rmat + 7).to(tl.pointer_type(tl.float32)) + rows, r, mask=rmask)
    else:
        cprog = col_progs + (pid - n_row_progs) * COLP_WIDTH
        ck = tl.load(cprog)
        b = tl.load(cprog + 1)
        cmat = mats + ck * MAT_WIDTH
        n = tl.load(cmat + 1)
        cols = tl.load(cprog + 2) + tl.arange(0, BC)
        cmask = cols < n
        if HAVE_COL:
            csums = tl.load(colsum + tl.load(cmat + 6) + b * n + cols, mask=cmask, other=0.0)
            if tl.max(((csums - csums) != 0.0).to(tl.int32), 0) > 0:
                tl.store(flags + ck, 1)
            c = _scale(csums, tl.load(targets + tl.load(cmat + 9) + 1 + b))
        else:
            c = tl.full([BC], 1.0, tl.float32)
        tl.store(tl.load(cmat + 8).to(tl.pointer_type(tl.float32)) + b * n + cols, c, mask=cmask)


@triton.jit(do_not_specialize=["seed", "step"])
def apply_pass(mats, segs, progs, gate, flags, decay, alpha, seed, step,
               GATE: tl.constexpr, USE_DECAY: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    """W <- W decay - alpha diag(r) G diag(c) on BLOCK elements of one segment. GATE 1: nothing is written
    when ``gate`` (the step's verdict, on the device) is nonzero; GATE 2: when the matrix's own flag is.
    STOCHASTIC: bf16 weights round stochastically, keyed by (seed, step, matrix key, logical index); this
    variant is launched only over bf16 weights, and compiled without fused multiply-adds (the backend passes
    enable_fp_fusion=False) so that (W decay) - (alpha u) is rounded as every backend rounds it."""
    pid = tl.program_id(0)
    s = tl.load(progs + pid * 2)
    e0 = tl.load(progs + pid * 2 + 1)
    seg = segs + s * SEG_WIDTH
    k = tl.load(seg + 9)
    veto = 0.0
    if GATE == 1:
        veto = tl.load(gate)
    if GATE == 2:
        veto = tl.load(flags + k).to(tl.float32)
    if veto == 0.0:
        mat = mats + k * MAT_WIDTH
        n = tl.load(mat + 1)
        srow = tl.load(seg + 2)
        scol = tl.load(seg + 4)
        scols = tl.load(seg + 5)
        blk = tl.load(seg + 6)
        e = e0 + tl.arange(0, BLOCK)
        mask = e < tl.load(seg + 3) * scols
        r = tl.load(tl.load(mat + 7).to(tl.pointer_type(tl.float32)) + srow + e // scols, mask=mask, other=0.0)
        c = tl.load(tl.load(mat + 8).to(tl.pointer_type(tl.float32)) + blk * n + scol + e % scols, mask=mask,
                    other=0.0)
        upd = _load_f32(tl.load(seg), tl.load(seg + 1), e, mask) * r * c
        paddr = tl.load(seg + 7)
        if tl.load(seg + 8) == 0:
            pp = paddr.to(tl.pointer_type(tl.float32))
            p = tl.load(pp + e, mask=mask, other=0.0)
            if USE_DECAY:
                p = p * decay
            tl.store(pp + e, p - alpha * upd, mask=mask)
        elif STOCHASTIC:
            wb = tl.load(paddr.to(tl.pointer_type(tl.bfloat16)) + e, mask=mask, other=0.0).to(tl.float32)
            if USE_DECAY:
                wb = wb * decay
            y = wb - alpha * upd
            index = tl.load(seg + 10) + (e // scols) * tl.load(seg + 11) + e % scols
            r16 = _random16(seed, step, tl.load(seg + 12), index)
            tl.store(paddr.to(tl.pointer_type(tl.int16)) + e, _stochastic_bf16_bits(y, r16), mask=mask)
        else:  # bf16 weights: rounded where torch rounds (the decayed weight, the update), then once more
            pb = paddr.to(tl.pointer_type(tl.bfloat16))
            p = tl.load(pb + e, mask=mask, other=0.0).to(tl.float32)
            if USE_DECAY:
                p = _round_bf16(p * decay)
            tl.store(pb + e, _round_bf16(p - alpha * _round_bf16(upd)).to(tl.bfloat16), mask=mask)
