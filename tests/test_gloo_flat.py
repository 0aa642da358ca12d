"""Real processes over gloo: each rank holds a flat piece of the same matrices (cut mid-row).

The first proof of the all-reduce path: the optimizer, given the layout, reproduces the dense
single-process SinkGD update, with exactly 2L statistics collectives per step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from sinkgd_ds import SinkGD
from sinkgd_ds.layout import FlatMatrix, flat_partition_specs

from .distributed import spawn
from .reference import sr_sinkhorn

SHAPES = [(5, 7), (3, 4), (1, 9), (6, 1)]
ITERS, LR, SCALE, STEPS = 3, 0.1, 0.5, 3


def problem():
    gen = torch.Generator().manual_seed(7)
    weights = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(STEPS)]
    return weights, grads


def flat_layout(world):
    mats, off = [], 0
    for i, s in enumerate(SHAPES):
        mats.append(FlatMatrix(f"w{i}", s, off))
        off += s[0] * s[1]
    size = -(-off // world)  # ZeRO-style equal partitions, last one padded
    return mats, off, [(min(r * size, off), min((r + 1) * size, off)) for r in range(world)], size


def worker(rank, world):
    weights, grads = problem()
    mats, total, bounds, size = flat_layout(world)
    flat_w = torch.cat([w.view(-1) for w in weights])
    lo, hi = bounds[rank]
    part = torch.zeros(size)
    part[: hi - lo] = flat_w[lo:hi]
    opt = SinkGD([{"params": [part], "kind": "sinkgd"}], lr=LR, lr_scale=SCALE, sinkhorn_iters=ITERS)
    opt.set_layout(flat_partition_specs(mats, bounds, rank, part, dist.group.WORLD))
    counts = []
    for step in grads:
        gflat = torch.cat([g.view(-1) for g in step])
        part.grad = torch.zeros(size)
        part.grad[: hi - lo] = gflat[lo:hi]
        opt.step()
        counts.append(opt.last_comm.collectives)
    return part[: hi - lo].clone(), counts, part[hi - lo :].clone()


def test_two_ranks_flat_pieces_equal_dense():
    world = 2
    results = spawn(worker, world)
    weights, grads = problem()
    flat = torch.cat([r[0] for r in results])
    off = 0
    for i, s in enumerate(SHAPES):
        want = weights[i].double()
        for step in grads:
            want = want - LR * SCALE * sr_sinkhorn(step[i], ITERS)
        got = flat[off : off + s[0] * s[1]].view(s)
        off += s[0] * s[1]
        assert float((got.double() - want).norm() / want.norm()) <= 1e-6, s
    for _, counts, padding in results:
        assert counts == [2 * ITERS] * STEPS  # one bucketed all-reduce per half-iteration
        assert (padding == 0).all()  # padding never touched
