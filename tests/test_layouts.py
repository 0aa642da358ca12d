"""The engine on simulated sharded layouts (threads as ranks) equals the dense reference.

Flat cuts at arbitrary element boundaries (ZeRO-1/2, DistOpt), tensor-parallel row/column slices,
both at once, and fused row blocks — property-based over shapes and cut points.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sinkgd_ds.layout import FlatMatrix, RowBlocks, flat_partition_specs
from sinkgd_ds.sinkhorn import CommStats, apply_scaled_update_, normalize_scales

from .reference import sr_sinkhorn, sr_sinkhorn_blocks
from .simulated import ThreadGroup, run_ranks

TOL = 1e-6


def grad(t):
    return t.grad


def step_partition(specs, partition, iters):
    stats = CommStats()
    scales = normalize_scales(specs, grad, ("row", "col") * iters, stats)
    assert all(s.finite for s in scales)
    for spec, sc in zip(specs, scales):
        apply_scaled_update_(spec, sc, grad, step_size=1.0)
    return partition.detach().clone(), stats


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@st.composite
def flat_problem(draw):
    shapes = draw(st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=4))
    total = sum(m * n for m, n in shapes)
    world = draw(st.integers(1, 4))
    cuts = sorted(draw(st.lists(st.integers(0, total), min_size=world - 1, max_size=world - 1)))
    iters = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    return shapes, [0, *cuts, total], iters, seed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flat_problem())
def test_flat_cuts_equal_dense(problem):
    shapes, edges, iters, seed = problem
    world = len(edges) - 1
    gen = torch.Generator().manual_seed(seed)
    mats, off = [], 0
    for i, (m, n) in enumerate(shapes):
        mats.append(FlatMatrix(f"w{i}", (m, n), off))
        off += m * n
    gflat = torch.randn(off, generator=gen)
    bounds = [(edges[r], edges[r + 1]) for r in range(world)]
    group = ThreadGroup(world)

    def rank_fn(r):
        lo, hi = bounds[r]
        part = torch.zeros(hi - lo)
        part.grad = gflat[lo:hi].clone()
        specs = flat_partition_specs(mats, bounds, r, part, group.handle(r))
        return step_partition(specs, part, iters)

    results = run_ranks(world, rank_fn)
    flat = -torch.cat([p for p, _ in results])
    for mat in mats:
        got = flat[mat.offset : mat.offset + mat.numel].view(mat.shape)
        want = sr_sinkhorn(gflat[mat.offset : mat.offset + mat.numel].view(mat.shape), iters)
        assert rel(got, want) <= TOL, mat
    # one bucketed all-reduce per half-iteration, and none when nothing is shared
    any_shared = any(
        sum(1 for a, b in bounds if a < m.offset + m.numel and m.offset < b and a < b) > 1 for m in mats
    )
    for _, stats in results:
        assert stats.collectives in ((2 * iters) if any_shared else 0, 0)
    assert group.calls == (2 * iters if any_shared else 0)


@st.composite
def tp_problem(draw):
    tp = draw(st.integers(2, 3))
    dp = draw(st.integers(1, 2))
    kind = draw(st.sampled_from(["column", "row"]))
    m_loc, n_loc = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    fused = draw(st.booleans()) and kind == "column"
    seed = draw(st.integers(0, 2**16))
    cut_frac = draw(st.floats(0, 1))
    return tp, dp, kind, m_loc, n_loc, fused, seed, cut_frac


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tp_problem())
def test_tensor_parallel_slices_equal_dense(problem):
    """TP row/column slices, each further cut into flat DP pieces: DP sums first, then the TP sum."""
    tp, dp, kind, m_loc, n_loc, fused, seed, cut_frac = problem
    iters = 3
    gen = torch.Generator().manual_seed(seed)
    if fused:  # per TP rank: [q; k; v] blocks of a column-parallel fused weight, 1 query group
        sizes = (m_loc, 1, 1)
        m_loc = sum(sizes)
    m, n = (m_loc * tp, n_loc) if kind == "column" else (m_loc, n_loc * tp)
    g = torch.randn(m, n, generator=gen)

    tp_groups = [ThreadGroup(tp) for _ in range(dp)]
    dp_groups = [ThreadGroup(dp) for _ in range(tp)]
    numel = m_loc * n_loc
    cut = int(round(cut_frac * numel))
    edges = [0, cut, numel] if dp == 2 else [0, numel]
    bounds = [(edges[i], edges[i + 1]) for i in range(dp)]

    def rank_fn(rank):
        t_r_local, d_r = divmod(rank, dp)
        gl = (g[t_r_local * m_loc : (t_r_local + 1) * m_loc] if kind == "column"
              else g[:, t_r_local * n_loc : (t_r_local + 1) * n_loc]).contiguous().view(-1)
        lo, hi = bounds[d_r]
        part = torch.zeros(hi - lo)
        part.grad = gl[lo:hi].clone()
        tpg = tp_groups[d_r].handle(t_r_local)
        blocks = RowBlocks.from_sizes(sizes, global_scale=tp) if fused else None
        mat = FlatMatrix("w", (m_loc, n_loc), 0, global_shape=(m, n), blocks=blocks,
                         row_group=tpg if kind == "row" else None, col_group=tpg if kind == "column" else None)
        specs = flat_partition_specs([mat], bounds, d_r, part, dp_groups[t_r_local].handle(d_r))
        return step_partition(specs, part, iters)[0]

    results = run_ranks(tp * dp, rank_fn)
    locals_ = [torch.cat(results[t * dp : (t + 1) * dp]).double().neg().view(m_loc, n_loc) for t in range(tp)]
    got = torch.cat(locals_, dim=0 if kind == "column" else 1)
    if fused:
        block_of_row = [b for _ in range(tp) for b, s in enumerate(sizes) for _ in range(s)]
        want = sr_sinkhorn_blocks(g, iters, block_of_row)
    else:
        want = sr_sinkhorn(g, iters)
    assert rel(got, want) <= TOL
