"""The native CPU kernels (sinkgd_ds.kernels) against the float64 reference and against the torch path.

Every test here runs the engine twice where it matters: with the kernels (the default on CPU) and with
``kernels.set_enabled(False)`` (the pure-torch reference path), and checks both against the naive
float64 SR-Sinkhorn of tests/reference.py.
"""

from __future__ import annotations

import functools
import logging
from contextlib import contextmanager

import pytest
import torch

from sinkgd_ds import kernels
from sinkgd_ds.layout import Fragment, MatrixSpec, RowBlocks, dense_spec
from sinkgd_ds.optim.base import grad_of
from sinkgd_ds.sinkhorn import (
    CommStats,
    MatrixBatch,
    apply_scaled_update_,
    apply_scaled_updates_,
    normalize_scales,
)

from .reference import sr_sinkhorn, sr_sinkhorn_blocks

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C++ compiler: kernels unavailable")

SHAPES = [(1, 9), (9, 1), (1, 1), (5, 7), (17, 3), (3, 200), (64, 33), (129, 77), (1, 700), (700, 1)]
TOL = 1e-6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@contextmanager
def torch_path():
    prev = kernels.set_enabled(False)
    try:
        yield
    finally:
        kernels.set_enabled(prev)


@contextmanager
def threads(n: int):
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def update(g: torch.Tensor, schedule, blocks: RowBlocks | None = None, wdtype=torch.float32) -> torch.Tensor:
    """diag(r) G diag(c) through the engine: the change of a zero weight after a step of size 1."""
    w = torch.zeros(g.shape, dtype=wdtype)
    spec = dense_spec(w, "w", blocks)
    (sc,) = normalize_scales([spec], lambda t: g, schedule)
    assert sc.finite
    apply_scaled_update_(spec, sc, lambda t: g, step_size=1.0)
    return -w.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("iters", [1, 2, 3, 5, 7, 10])
def test_kernel_matches_reference_and_torch_path(shape, iters, dtype):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(iters * 7919 + shape[0] * 31 + shape[1]))
    g = g.to(dtype)
    sched = ("row", "col") * iters
    got = update(g, sched)
    # the reference sees exactly the (bf16) values; both paths accumulate in fp32
    assert rel_err(got, sr_sinkhorn(g.double(), iters)) <= TOL
    with torch_path():
        ref_torch = update(g, sched)
    assert rel_err(got, ref_torch) <= TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_rows_and_columns(dtype):
    g = torch.randn(37, 23, generator=torch.Generator().manual_seed(5))
    g[[0, 4, 36]] = 0
    g[:, [0, 7, 22]] = 0
    g = g.to(dtype)
    for iters in (1, 4, 10):
        x = update(g, ("row", "col") * iters)
        assert torch.isfinite(x).all()
        assert (x[[0, 4, 36]] == 0).all() and (x[:, [0, 7, 22]] == 0).all()
        assert rel_err(x, sr_sinkhorn(g.double(), iters)) <= TOL
    assert (update(torch.zeros(5, 3, dtype=dtype), ("row", "col") * 3) == 0).all()


@pytest.mark.parametrize("shape", [(300, 300), (2000, 40), (40, 2000), (1, 70000), (70000, 1)])
def test_multithreaded_matches(shape):
    """Big enough that the kernels split the work over threads (per-thread column accumulators)."""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    with threads(2):
        got = update(g, ("row", "col") * 5)
    assert rel_err(got, sr_sinkhorn(g, 5)) <= TOL
    with threads(1):
        assert rel_err(update(g, ("row", "col") * 5), got) <= TOL


@pytest.mark.parametrize("spread", [1, 0])
def test_many_matrices_in_one_call(spread, monkeypatch):
    """Several local matrices in one step (one big one runs alone, the rest are spread over threads;
    or, spread=0, all threads on each in turn), each with its own shape, dtype and row blocks."""
    monkeypatch.setattr(kernels, "SPREAD", spread)
    gen = torch.Generator().manual_seed(3)
    shapes = [(400, 300), (5, 7), (64, 33), (33, 64), (1, 9), (9, 1), (128, 128), (12, 20)]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    grads[3] = grads[3].bfloat16()
    blocks = {0: RowBlocks.from_sizes([100, 50, 50], repeats=2), 6: RowBlocks.from_sizes([16, 8, 8], repeats=4)}
    ws = [torch.zeros(s) for s in shapes]
    specs = [dense_spec(w, f"w{i}", blocks.get(i)) for i, w in enumerate(ws)]
    by_id = {id(w): g for w, g in zip(ws, grads)}
    direction = lambda t: by_id[id(t)]
    with threads(2):
        scales = normalize_scales(specs, direction, ("row", "col") * 4)
    for spec, sc, w, g, i in zip(specs, scales, ws, grads, range(len(ws))):
        assert sc.finite
        apply_scaled_update_(spec, sc, direction, step_size=1.0)
        if i in blocks:
            rows = [b for s, e, b in blocks[i].runs for _ in range(s, e)]
            want = sr_sinkhorn_blocks(g.double(), 4, rows)
        else:
            want = sr_sinkhorn(g.double(), 4)
        assert rel_err(-w, want) <= TOL, shapes[i]


def test_fused_row_blocks():
    q, k, v, groups, n = 4, 2, 2, 3, 7
    blocks = RowBlocks.from_sizes([q, k, v], repeats=groups)
    g = torch.randn(groups * (q + k + v), n, generator=torch.Generator().manual_seed(1))
    rows = [b for _ in range(groups) for b, size in enumerate((q, k, v)) for _ in range(size)]
    for iters in (1, 5):
        got = update(g, ("row", "col") * iters, blocks)
        assert rel_err(got, sr_sinkhorn_blocks(g, iters, rows)) <= TOL
        with torch_path():
            assert rel_err(got, update(g, ("row", "col") * iters, blocks)) <= TOL


@pytest.mark.parametrize("schedule", [("row",), ("col",), ("col", "row"), ("row", "row", "col"),
                                      ("col", "col", "row", "col"), ()])
def test_other_schedules_match_torch_path(schedule):
    """SCALE uses a lone row or column half; any schedule must give what the torch path gives."""
    g = torch.randn(70, 45, generator=torch.Generator().manual_seed(2))
    got = update(g, schedule)
    with torch_path():
        want = update(g, schedule)
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_reported_like_torch_path(bad, dtype):
    g = torch.randn(40, 30)
    g[7, 3] = bad
    w, ok = torch.zeros(40, 30), torch.zeros(5, 5)
    by_id = {id(w): g.to(dtype), id(ok): torch.randn(5, 5).to(dtype)}
    direction = lambda t: by_id[id(t)]
    for sched in (("row", "col"), ("row",), ("col",)):
        got = normalize_scales([dense_spec(w), dense_spec(ok)], direction, sched)
        with torch_path():
            want = normalize_scales([dense_spec(w), dense_spec(ok)], direction, sched)
        assert [s.finite for s in got] == [s.finite for s in want] == [False, True]


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fused_apply_matches_torch_path(wdtype, gdtype, weight_decay):
    gen = torch.Generator().manual_seed(4)
    w0 = torch.randn(90, 61, generator=gen).to(wdtype)
    g = torch.randn(90, 61, generator=gen).to(gdtype)
    results = []
    for use_kernels in (True, False):
        prev = kernels.set_enabled(use_kernels)
        try:
            w = w0.clone()
            spec = dense_spec(w)
            (sc,) = normalize_scales([spec], lambda t: g, ("row", "col") * 3)
            apply_scaled_update_(spec, sc, lambda t: g, step_size=0.01, weight_decay=weight_decay, extra_scale=0.5)
            results.append(w)
        finally:
            kernels.set_enabled(prev)
    got, want = results
    delta_got, delta_want = got.double() - w0.double(), want.double() - w0.double()
    if wdtype == torch.float32:
        assert rel_err(delta_got, delta_want) <= 1e-5
    else:  # the kernel rounds to bf16 once, the torch path twice (after the decay and after the add)
        assert (got.double() - want.double()).abs().max() <= 2 * 2**-8 * w0.double().abs().max()


class _Solo:
    """A one-rank 'shard group': forces the half-iteration (sharded) path with its partial-sum kernels."""

    def all_reduce(self, buf: torch.Tensor) -> None:
        pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cut", [0, 1, 50, 2 * 33 + 5])
def test_partial_sum_kernels_on_sharded_layout(dtype, cut):
    """Two flat fragments cut mid-row (a ZeRO boundary), completed by a (trivial) group."""
    m, n = 64, 33
    g = torch.randn(m, n, generator=torch.Generator().manual_seed(cut)).to(dtype)
    part = torch.zeros(m * n)
    flat = g.reshape(-1).clone()
    frags = (Fragment(part, 0, 0, cut), Fragment(part, cut, cut, m * n - cut))
    results = []
    for use_kernels in (True, False):
        prev = kernels.set_enabled(use_kernels)
        try:
            part.zero_()
            spec = MatrixSpec("w", (m, n), frags, owner=part, shard_group=_Solo())
            stats = CommStats()
            (sc,) = normalize_scales([spec], lambda t: flat, ("row", "col") * 5, stats)
            assert sc.finite and stats.collectives == 10
            apply_scaled_update_(spec, sc, lambda t: flat, step_size=1.0)
            results.append(-part.view(m, n).double())
        finally:
            kernels.set_enabled(prev)
    assert rel_err(results[0], sr_sinkhorn(g.double(), 5)) <= TOL
    assert rel_err(results[0], results[1]) <= TOL


def test_no_compiler_falls_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_compiler", lambda: None)
    with caplog.at_level(logging.WARNING, logger="sinkgd_ds"):
        assert kernels.lib() is None
        assert kernels.lib() is None  # tried once, warned once
        g = torch.randn(6, 5)
        x = update(g, ("row", "col") * 2)
    assert rel_err(x, sr_sinkhorn(g, 2)) <= TOL
    warnings = [r for r in caplog.records if "compiler" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()


def test_build_is_cached(monkeypatch):
    path = kernels.build()
    assert path is not None and path.exists()
    stamp = path.stat().st_mtime_ns
    monkeypatch.setattr(kernels, "_lib", None)  # a new process: finds the library, does not rebuild
    monkeypatch.setattr(kernels, "_tried", False)
    assert kernels.build() == path and path.stat().st_mtime_ns == stamp


def _lookup(table: dict, t: torch.Tensor) -> torch.Tensor:
    return table[id(t)]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_batched_apply_equals_one_by_one(weight_decay):
    """apply_scaled_updates_ (one native call) == apply_scaled_update_ per matrix == the torch path."""
    gen = torch.Generator().manual_seed(9)
    shapes = [(300, 200), (5, 7), (64, 33), (1, 50), (40, 1), (128, 96)]
    w0 = [torch.randn(s, generator=gen) for s in shapes]
    w0[2] = w0[2].bfloat16()
    grads = [torch.randn(s, generator=gen) for s in shapes]
    grads[5] = grads[5].bfloat16()
    blocks = {5: RowBlocks.from_sizes([32, 16, 16], repeats=2)}
    results = []
    for mode in ("batched", "single", "torch"):
        prev = kernels.set_enabled(mode != "torch")
        try:
            ws = [w.clone() for w in w0]
            direction = functools.partial(_lookup, {id(w): g for w, g in zip(ws, grads)})
            specs = [dense_spec(w, f"w{i}", blocks.get(i)) for i, w in enumerate(ws)]
            with threads(2):
                scales = normalize_scales(specs, direction, ("row", "col") * 3)
                if mode == "batched":
                    apply_scaled_updates_(specs, scales, direction, 0.01, weight_decay, extra_scale=0.5)
                else:
                    for sp, sc in zip(specs, scales):
                        apply_scaled_update_(sp, sc, direction, 0.01, weight_decay, extra_scale=0.5)
            results.append(ws)
        finally:
            kernels.set_enabled(prev)
    for batched, single, ref, w in zip(*results, w0):
        assert torch.equal(batched, single)
        if w.dtype == torch.float32:
            assert rel_err(batched.double() - w.double(), ref.double() - w.double()) <= 1e-5
        else:
            assert (batched.double() - ref.double()).abs().max() <= 2 * 2**-8 * w.double().abs().max()


def test_reused_batch_follows_moved_and_changed_tensors():
    """An optimizer keeps one MatrixBatch across steps and only re-checks tensor addresses. Whatever moves
    between steps (gradients reallocated or recast, a weight swapped via .data, the kernels switched off,
    the thread count changed), each step must equal a fresh single-use computation of the same step."""
    gen = torch.Generator().manual_seed(11)
    shapes = [(96, 64), (7, 300), (64, 33)]

    def fresh_grads(dtype=torch.float32):
        return [torch.randn(s, generator=gen).to(dtype) for s in shapes]

    ws = [torch.randn(s, generator=gen) for s in shapes]
    refs = [w.clone() for w in ws]
    specs = [dense_spec(w, f"w{i}") for i, w in enumerate(ws)]
    batch = MatrixBatch(specs, grad_of)
    sched = ("row", "col") * 2

    def step_both(note: str) -> None:
        for w, ref in zip(ws, refs):
            ref.grad = w.grad
        ref_specs = [dense_spec(r, f"r{i}") for i, r in enumerate(refs)]
        scales = normalize_scales(ref_specs, grad_of, sched)  # fresh descriptors, nothing cached
        apply_scaled_updates_(ref_specs, scales, grad_of, 0.01, 0.1)
        batch.normalize(sched)
        batch.apply_(0.01, 0.1, recheck=False)
        for w, ref in zip(ws, refs):
            assert torch.equal(w, ref), note

    for w, g in zip(ws, fresh_grads()):
        w.grad = g
    step_both("first step")
    step_both("same tensors again")
    for w, g in zip(ws, fresh_grads()):  # zero_grad(set_to_none=True) + backward: new gradient tensors
        w.grad = g
    step_both("reallocated gradients")
    for w, ref in zip(ws, refs):  # (as ZeRO's fp32 master weights with bf16 gradients)
        w.grad_dtype = ref.grad_dtype = None
    for w, g in zip(ws, fresh_grads(torch.bfloat16)):
        w.grad = g
    step_both("bf16 gradients")
    for w, g in zip(ws, fresh_grads()):
        w.grad = g
    moved = ws[1].detach().clone()
    ws[1].data = moved  # same Parameter object, new storage
    step_both("weight storage swapped")
    with threads(1):
        step_both("one thread")
    with torch_path():
        step_both("kernels off")
    step_both("kernels on again")
    assert batch.backend.name == "native" and len(batch.prepared.norm.index) == len(shapes)


def _step_fixture(seed: int, gdtypes, blocks=None):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(96, 64), (7, 300), (64, 33), (12, 9)]
    ws, specs = [], []
    for i, (s, gdt) in enumerate(zip(shapes, gdtypes)):
        w = torch.randn(s, generator=gen)
        w.grad_dtype = None  # (as ZeRO's fp32 master weights with bf16 gradients)
        w.grad = torch.randn(s, generator=gen).to(gdt)
        ws.append(w)
        specs.append(dense_spec(w, f"w{i}", blocks if blocks is not None and s[0] == 12 else None))
    return ws, specs


@pytest.mark.parametrize("kernels_on", [True, False])
@pytest.mark.parametrize("gdtypes", [[torch.float32] * 4,
                                     [torch.bfloat16, torch.float32, torch.float16, torch.float32]])
def test_one_call_step_equals_normalize_then_apply(kernels_on, gdtypes):
    """MatrixBatch.step_ (one native call when every matrix runs natively; an fp16 gradient takes the torch
    path, so the second case mixes both) writes exactly what normalize() + apply_() write."""
    blocks = RowBlocks(((0, 4, 0), (4, 12, 1)), (4, 8))
    ws, specs = _step_fixture(3, gdtypes, blocks)
    refs, ref_specs = _step_fixture(3, gdtypes, blocks)
    sched = ("row", "col") * 3
    prev = kernels.set_enabled(kernels_on)
    try:
        for _ in range(2):  # the second step reuses the batch's descriptors
            ref_batch = MatrixBatch(ref_specs, grad_of)
            assert all(s.finite for s in ref_batch.normalize(sched))
            ref_batch.apply_(0.01, 0.1, recheck=False)
            batch = MatrixBatch(specs, grad_of)
            assert batch.step_(sched, 0.01, 0.1) is True
            assert all(s.finite for s in batch.scales)
            for w, ref in zip(ws, refs):
                assert torch.equal(w, ref)
        one_call = batch.backend.name == "native" and batch.prepared.segment_starts is not None
        assert one_call == (kernels_on and torch.float16 not in gdtypes)
    finally:
        kernels.set_enabled(prev)


@pytest.mark.parametrize("kernels_on", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_one_call_step_writes_nothing_on_a_non_finite_gradient(kernels_on, bad):
    ws, specs = _step_fixture(5, [torch.float32] * 4)
    ws[2].grad[10, 7] = bad  # a matrix in the middle: the others are clean, and none may be written
    before = [w.clone() for w in ws]
    prev = kernels.set_enabled(kernels_on)
    try:
        batch = MatrixBatch(specs, grad_of)
        assert batch.step_(("row", "col"), 0.01) is False
        assert [s.finite for s in batch.scales] == [True, True, False, True]
        for w, b in zip(ws, before):
            assert torch.equal(w, b)
        ws[2].grad[10, 7] = 0.0
        assert batch.step_(("row", "col"), 0.01) is True
        assert all(not torch.equal(w, b) for w, b in zip(ws, before))
    finally:
        kernels.set_enabled(prev)


@pytest.mark.parametrize("kernels_on", [True, False])
@pytest.mark.parametrize("gdtypes", [[torch.float32] * 4,
                                     [torch.bfloat16, torch.float32, torch.float16, torch.float32]])
@pytest.mark.parametrize("bad_at", [None, 0, 2])
def test_per_matrix_step_updates_exactly_the_clean_matrices(kernels_on, gdtypes, bad_at):
    """step_(per_matrix=True) (one fused native call when the kernels cover every matrix: each matrix updated
    right after its own normalisation) leaves a matrix with a non-finite gradient as it is and updates every
    other one exactly as normalize() + apply_() of those alone would."""
    blocks = RowBlocks(((0, 4, 0), (4, 12, 1)), (4, 8))
    ws, specs = _step_fixture(7, gdtypes, blocks)
    refs, ref_specs = _step_fixture(7, gdtypes, blocks)
    if bad_at is not None:
        ws[bad_at].grad.view(-1)[5] = float("nan")
    before = [w.clone() for w in ws]
    sched = ("row", "col") * 2
    prev = kernels.set_enabled(kernels_on)
    try:
        clean = [i for i in range(4) if i != bad_at]
        ref_batch = MatrixBatch([ref_specs[i] for i in clean], grad_of)
        ref_batch.normalize(sched)
        ref_batch.apply_(0.01, 0.1, recheck=False)
        batch = MatrixBatch(specs, grad_of)
        assert batch.step_(sched, 0.01, 0.1, per_matrix=True) is (bad_at is None)
        assert [s.finite for s in batch.scales] == [i != bad_at for i in range(4)]
        for i in range(4):
            if i == bad_at:
                assert torch.equal(ws[i], before[i])
            else:
                assert torch.equal(ws[i], refs[i]), i
        fused = batch.backend.name == "native" and batch.prepared.segment_starts is not None
        assert fused == (kernels_on and torch.float16 not in gdtypes)
    finally:
        kernels.set_enabled(prev)


def _bf16_fixture(seed: int, shapes, gdtypes):
    gen = torch.Generator().manual_seed(seed)
    ws, specs = [], []
    for i, (s, gdt) in enumerate(zip(shapes, gdtypes)):
        w = torch.randn(s, generator=gen).bfloat16()
        w.grad_dtype = None
        w.grad = torch.randn(s, generator=gen).to(gdt)
        ws.append(w)
        specs.append(dense_spec(w, f"layers.{i}.weight"))
    return ws, specs


@pytest.mark.parametrize("call", ["apply", "step", "per_matrix", "per_matrix_one_bad"])
def test_stochastic_rounding_equals_the_torch_path_bit_for_bit(call):
    """bf16 weights with stochastic rounding (sinkgd_ds/rounding.py): every native entry point (the update
    alone, the one-call step, the per-matrix fused step) writes the torch path's bits, on 2 threads, for a long
    single row (split over the threads) and for matrices split by rows."""
    from sinkgd_ds.rounding import StochasticRounding

    shapes = [(1, 70000), (300, 300), (7, 300), (12, 9)]
    gdtypes = [torch.bfloat16, torch.float32, torch.bfloat16, torch.float32]
    rounding = StochasticRounding(seed=4, step=9)
    sched = ("row", "col") * 2
    out = {}
    for kernels_on in (True, False):
        ws, specs = _bf16_fixture(11, shapes, gdtypes)
        if call == "per_matrix_one_bad":
            ws[1].grad[3, 4] = float("nan")
        before = [w.clone() for w in ws]
        prev = kernels.set_enabled(kernels_on)
        try:
            with threads(2):
                batch = MatrixBatch(specs, grad_of)
                if call == "apply":
                    batch.normalize(sched)
                    batch.apply_(0.01, 0.1, rounding=rounding)
                else:
                    batch.step_(sched, 0.01, 0.1, per_matrix=call != "step", rounding=rounding)
            assert (batch.backend.name == "native") == kernels_on
        finally:
            kernels.set_enabled(prev)
        out[kernels_on] = [w.view(torch.int16) for w in ws]
        if call == "per_matrix_one_bad":
            assert torch.equal(ws[1], before[1])
    assert all(torch.equal(a, b) for a, b in zip(out[True], out[False]))
    assert sum(not torch.equal(w.view(torch.int16), b.view(torch.int16)) for w, b in zip(ws, before)) >= 3
