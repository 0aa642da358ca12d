"""The Triton backend against the float64 reference and the torch backend, on the same layouts.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton); on a CUDA machine they are compiled and run on the GPU.
The interpreter runs one program after another, so shapes are small and the tiles are shrunk (to 4 x 8 and
16 elements) so that every tile boundary, partial tile and multi-tile loop of the kernels is exercised.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sinkgd_ds import SCALE, SinkGD, backends
from sinkgd_ds.layout import FlatMatrix, RowBlocks, dense_spec, flat_partition_specs
from sinkgd_ds.optim.base import grad_of
from sinkgd_ds.sinkhorn import CommStats, MatrixBatch

from .reference import row_rms_normalize, sr_sinkhorn, sr_sinkhorn_blocks
from .simulated import ThreadGroup, run_ranks

WHY = backends.triton_available()
ON_GPU = torch.cuda.is_available()
if WHY is None and not ON_GPU and not backends.interpreting():
    WHY = "TRITON_INTERPRET was not set before triton was imported (see tests/conftest.py)"
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"Triton backend not usable: {WHY}")

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
TOL = 1e-6


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    if not ON_GPU:  # (compiled on a GPU the production tiles are tested)
        from sinkgd_ds.backends.triton_backend import TritonBackend

        monkeypatch.setattr(TritonBackend, "ROW_TILE", (4, 8))
        monkeypatch.setattr(TritonBackend, "COL_TILE", (4, 8))
        monkeypatch.setattr(TritonBackend, "APPLY_BLOCK", 16)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm().clamp_min(1e-30))


def set_grad(w: torch.Tensor, g: torch.Tensor) -> None:
    if g.dtype != w.dtype:  # (as ZeRO's fp32 master weights with bf16 gradients)
        w.grad_dtype = None
    w.grad = g.to(w.device)


def update(g: torch.Tensor, schedule, impl: str, blocks=None, wdtype=torch.float32) -> tuple[torch.Tensor, object]:
    """diag(r) G diag(c) through the engine: minus the change of a zero weight after a step of size 1."""
    w = torch.zeros(g.shape, dtype=wdtype, device=DEVICE)
    set_grad(w, g)
    batch = MatrixBatch([dense_spec(w, "w", blocks)], grad_of, implementation=impl)
    assert batch.step_(schedule, 1.0) is True
    assert batch.backend.name == impl
    return -w.double().cpu(), batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (9, 1), (1, 17), (13, 10)])
def test_dense_matches_reference_and_torch(shape, dtype):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0] * 31 + shape[1])).to(dtype)
    for iters in (1, 3):
        got, _ = update(g, ("row", "col") * iters, "triton")
        assert rel(got, sr_sinkhorn(g.double(), iters)) <= TOL
        assert rel(got, update(g, ("row", "col") * iters, "torch")[0]) <= TOL


@pytest.mark.parametrize("schedule", [("row",), ("col",), ("col", "row"), ("row", "row", "col")])
def test_other_schedules_match_torch(schedule):
    """SCALE's single halves, and schedules that start with a column half or repeat a half."""
    g = torch.randn(6, 11, generator=torch.Generator().manual_seed(2))
    assert rel(update(g, schedule, "triton")[0], update(g, schedule, "torch")[0]) <= TOL
    if schedule == ("row",):
        assert rel(update(g, schedule, "triton")[0], row_rms_normalize(g)) <= TOL


def test_fused_row_blocks():
    q, k, v, groups, n = 3, 1, 2, 2, 9
    blocks = RowBlocks.from_sizes([q, k, v], repeats=groups)
    g = torch.randn(groups * (q + k + v), n, generator=torch.Generator().manual_seed(1))
    rows = [b for _ in range(groups) for b, size in enumerate((q, k, v)) for _ in range(size)]
    got, _ = update(g, ("row", "col") * 3, "triton", blocks)
    assert rel(got, sr_sinkhorn_blocks(g, 3, rows)) <= TOL


@pytest.mark.parametrize("blocks", [None, RowBlocks.from_sizes([3, 1, 2], repeats=2)])
def test_local_one_pass_schedule_across_segments(blocks, monkeypatch):
    """A local matrix cut into many segments (the engine bounds a segment's size): its row tiles stay inside
    one segment and one row block, each emitting a row of column contributions that the column half adds up."""
    import sinkgd_ds.layout as layout

    monkeypatch.setattr(layout, "CHUNK_ELEMENTS", 27)  # 3 rows of 9 per segment
    g = torch.randn(12, 9, generator=torch.Generator().manual_seed(4))
    got, batch = update(g, ("row", "col") * 3, "triton", blocks)
    assert len(batch.specs[0].segments) >= 4  # (several segments, and row tiles of 4 that cross none)
    rows = [b for _ in range(2) for b, size in enumerate((3, 1, 2)) for _ in range(size)]
    want = sr_sinkhorn(g, 3) if blocks is None else sr_sinkhorn_blocks(g, 3, rows)
    assert rel(got, want) <= TOL
    assert int((batch.prepared.row_progs[:, 7] >= 0).sum()) == len(batch.prepared.row_progs)  # (all one-pass)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_rows_and_columns(dtype):
    g = torch.randn(9, 10, generator=torch.Generator().manual_seed(5))
    g[[0, 4]] = 0
    g[:, [0, 7]] = 0
    g = g.to(dtype)
    x, _ = update(g, ("row", "col") * 3, "triton")
    assert torch.isfinite(x).all() and (x[[0, 4]] == 0).all() and (x[:, [0, 7]] == 0).all()
    assert rel(x, sr_sinkhorn(g.double(), 3)) <= TOL
    assert (update(torch.zeros(5, 3, dtype=dtype), ("row", "col") * 2, "triton")[0] == 0).all()


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16])
def test_update_with_weight_decay_matches_torch(wdtype, gdtype):
    """W <- W (1 - lr wd) - lr diag(r) G diag(c) for several matrices in one launch, fp32 and bf16 weights."""
    gen = torch.Generator().manual_seed(7)
    shapes = [(6, 5), (3, 12), (10, 2)]
    runs = {}
    for impl in ("torch", "triton"):
        ws = []
        for s in shapes:
            w = torch.randn(s, generator=torch.Generator().manual_seed(s[0])).to(wdtype).to(DEVICE)
            set_grad(w, torch.randn(s, generator=gen).to(gdtype))
            ws.append(w)
        gen = torch.Generator().manual_seed(7)
        batch = MatrixBatch([dense_spec(w, f"w{i}") for i, w in enumerate(ws)], grad_of, implementation=impl)
        assert batch.step_(("row", "col") * 2, 0.01, 0.1) is True
        runs[impl] = [w.detach().double().cpu() for w in ws]
    for a, b in zip(runs["triton"], runs["torch"]):
        if wdtype == torch.float32:
            assert rel(a, b) <= TOL
        else:  # bf16 weights: the same bf16 roundings, the fp32 products may differ by an ulp before them
            assert (a - b).abs().max() <= 2 ** -7 * b.abs().max()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_flags_and_nothing_written(bad, dtype):
    gen = torch.Generator().manual_seed(3)
    ws = [torch.randn(s, generator=gen).to(DEVICE) for s in [(5, 6), (4, 9), (7, 3)]]
    for w in ws:
        set_grad(w, torch.randn(w.shape, generator=gen).to(dtype))
    ws[1].grad[2, 5] = bad
    before = [w.clone() for w in ws]
    batch = MatrixBatch([dense_spec(w, f"w{i}") for i, w in enumerate(ws)], grad_of, implementation="triton")
    assert batch.step_(("row", "col") * 3, 0.1) is False
    assert [s.finite for s in batch.scales] == [True, False, True]
    assert all(torch.equal(w, b) for w, b in zip(ws, before))
    # per matrix: the clean ones are updated exactly as alone, the bad one is left as it was
    refs = [w.clone() for w in ws]
    for r, w in zip(refs, ws):
        set_grad(r, w.grad.clone())
    MatrixBatch([dense_spec(refs[i], "r") for i in (0, 2)], grad_of, implementation="triton").step_(
        ("row", "col") * 3, 0.1)
    assert batch.step_(("row", "col") * 3, 0.1, per_matrix=True) is False
    assert torch.equal(ws[1], before[1])
    assert torch.equal(ws[0], refs[0]) and torch.equal(ws[2], refs[2])


def test_sums_overflowing_in_a_middle_half_are_flagged():
    """A finite gradient whose column sums overflow in a middle half (so that later sums are finite again)."""
    g = torch.ones(4, 4)
    g[:, 0] = 3e19  # rows: sum of squares overflows fp32 -> r = 0 on those rows...
    for impl in ("torch", "triton"):
        w = torch.zeros(4, 4, device=DEVICE)
        w.grad = g.to(DEVICE)
        batch = MatrixBatch([dense_spec(w, "w")], grad_of, implementation=impl)
        assert batch.step_(("row", "col", "row"), 1.0) is False, impl
        assert (w == 0).all()


def _flat_problem(seed: int, world: int):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 7), (3, 4), (9, 2), (2, 11)]
    mats, off = [], 0
    for i, (m, n) in enumerate(shapes):
        mats.append(FlatMatrix(f"w{i}", (m, n), off))
        off += m * n
    gflat = torch.randn(off, generator=gen)
    inner = sorted(torch.randperm(off - 1, generator=gen)[: world - 1].add(1).tolist())
    edges = [0, *inner, off]
    return mats, gflat, [(edges[r], edges[r + 1]) for r in range(world)]


@pytest.mark.parametrize("world,seed", [(2, 0), (3, 1), (3, 2)])
def test_random_flat_cuts_equal_dense(world, seed):
    """ZeRO / distributed-optimizer partitions cut mid-row (simulated ranks), one in-place all-reduce per
    half-iteration; every rank sharing a matrix gets the same bits as with the torch backend."""
    mats, gflat, bounds = _flat_problem(seed, world)
    iters = 2
    out = {}
    for impl in ("torch", "triton"):
        group = ThreadGroup(world)

        def rank_fn(r, impl=impl, group=group):
            lo, hi = bounds[r]
            part = torch.zeros(hi - lo, device=DEVICE)
            part.grad = gflat[lo:hi].clone().to(DEVICE)
            specs = flat_partition_specs(mats, bounds, r, part, group.handle(r))
            batch = MatrixBatch(specs, grad_of, implementation=impl)
            stats = CommStats()
            assert batch.step_(("row", "col") * iters, 1.0, stats=stats) is True
            assert all(len(sl) == 1 for buckets in batch.sums.buckets.values() for _, sl in buckets)  # (in place)
            return part.detach().cpu(), stats.collectives

        results = run_ranks(world, rank_fn)
        out[impl] = -torch.cat([p for p, _ in results])
        assert group.calls == 2 * iters
    for mat in mats:
        got = out["triton"][mat.offset : mat.offset + mat.numel].view(mat.shape)
        want = sr_sinkhorn(gflat[mat.offset : mat.offset + mat.numel].view(mat.shape), iters)
        assert rel(got, want) <= TOL, mat
    assert rel(out["triton"], out["torch"]) <= TOL


@pytest.mark.parametrize("kind", ["column", "row"])
def test_tensor_parallel_slices_with_flat_cuts(kind):
    """TP row / column slices (2 TP ranks), each cut into 2 flat DP pieces: DP sums, then the TP sum."""
    tp, dp, m_loc, n_loc, iters = 2, 2, 5, 6, 2
    m, n = (m_loc * tp, n_loc) if kind == "column" else (m_loc, n_loc * tp)
    g = torch.randn(m, n, generator=torch.Generator().manual_seed(9))
    tp_groups = [ThreadGroup(tp) for _ in range(dp)]
    dp_groups = [ThreadGroup(dp) for _ in range(tp)]
    bounds = [(0, 13), (13, m_loc * n_loc)]

    def rank_fn(rank):
        t, d = divmod(rank, dp)
        gl = (g[t * m_loc : (t + 1) * m_loc] if kind == "column" else g[:, t * n_loc : (t + 1) * n_loc])
        gl = gl.contiguous().view(-1)
        lo, hi = bounds[d]
        part = torch.zeros(hi - lo, device=DEVICE)
        part.grad = gl[lo:hi].clone().to(DEVICE)
        tpg = tp_groups[d].handle(t)
        mat = FlatMatrix("w", (m_loc, n_loc), 0, global_shape=(m, n), row_group=tpg if kind == "row" else None,
                         col_group=tpg if kind == "column" else None)
        specs = flat_partition_specs([mat], bounds, d, part, dp_groups[t].handle(d))
        assert MatrixBatch(specs, grad_of, implementation="triton").step_(("row", "col") * iters, 1.0) is True
        return part.detach().cpu()

    res = run_ranks(tp * dp, rank_fn)
    locals_ = [torch.cat(res[t * dp : (t + 1) * dp]).double().neg().view(m_loc, n_loc) for t in range(tp)]
    got = torch.cat(locals_, dim=0 if kind == "column" else 1)
    assert rel(got, sr_sinkhorn(g, iters)) <= TOL


@pytest.mark.parametrize("iters", [1, 5])
def test_launches_per_step_do_not_grow_with_the_matrix_count(iters, monkeypatch):
    """2L + 3 launches (L row passes, L column passes, final scales, update) whatever the number of matrices."""
    from sinkgd_ds.backends.triton_backend import TritonBackend

    counts = []
    real = TritonBackend._launch

    def counted(kernel, programs, *args, **meta):
        counts[-1] += 1
        return real(kernel, programs, *args, **meta)

    monkeypatch.setattr(TritonBackend, "_launch", staticmethod(counted))
    for count in (1, 4):
        ws = [torch.zeros(3, 2, device=DEVICE) for _ in range(count)]
        for w in ws:
            w.grad = torch.randn(3, 2).to(DEVICE)
        counts.append(0)
        MatrixBatch([dense_spec(w) for w in ws], grad_of, implementation="triton").step_(("row", "col") * iters, 0.1)
        assert counts[-1] == 2 * iters + 2  # (+ the flags' reset, a torch fill)


def test_stochastic_rounding_adds_no_launch_and_matches_torch(monkeypatch):
    """bf16 weights with stochastic rounding: still 2L + 2 launches (the update launch takes the stochastic
    variant), and the bits of the torch reference (tests/test_stochastic_rounding.py checks the layouts)."""
    from sinkgd_ds.backends.triton_backend import TritonBackend
    from sinkgd_ds.rounding import StochasticRounding

    launches = []
    real = TritonBackend._launch

    def counted(kernel, programs, *args, **meta):
        launches.append(meta.get("STOCHASTIC"))
        return real(kernel, programs, *args, **meta)

    monkeypatch.setattr(TritonBackend, "_launch", staticmethod(counted))
    out = {}
    for impl in ("triton", "torch"):
        gen = torch.Generator().manual_seed(6)
        ws = [torch.randn(s, generator=gen).bfloat16().to(DEVICE) for s in [(6, 5), (3, 12), (10, 2)]]
        for w in ws:
            set_grad(w, torch.randn(w.shape, generator=gen).to(DEVICE))
        launches.clear()
        batch = MatrixBatch([dense_spec(w, f"w{i}") for i, w in enumerate(ws)], grad_of, implementation=impl)
        assert batch.step_(("row", "col") * 2, 0.01, 0.1, rounding=StochasticRounding(2, 3)) is True
        out[impl] = [w.cpu().view(torch.int16) for w in ws]
        if impl == "triton":
            assert len(launches) == 2 * 2 + 2 and launches[-1] is True
    assert all(torch.equal(a, b) for a, b in zip(out["triton"], out["torch"]))


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6)
        self.up = torch.nn.Linear(6, 10, bias=False)
        self.down = torch.nn.Linear(10, 6)
        self.lm_head = torch.nn.Linear(6, 11, bias=False)

    def forward(self, x):
        return self.lm_head(self.down(torch.relu(self.up(self.embed(x)))))


@pytest.mark.parametrize("cls", [SinkGD, SCALE])
def test_optimizers_end_to_end(cls):
    """Three steps of a tiny model: implementation="triton" equals "torch" (fp32, within 1e-6 of the change)."""
    runs = {}
    for impl in ("torch", "triton"):
        torch.manual_seed(0)
        model = _Tiny().to(DEVICE)
        start = [p.detach().clone() for p in model.parameters()]
        opt = cls(model.named_parameters(), lr=0.01, implementation=impl)
        x = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(1)).to(DEVICE)
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        runs[impl] = [(p.detach() - s).double().cpu() for p, s in zip(model.parameters(), start)]
    for a, b in zip(runs["triton"], runs["torch"]):
        assert rel(a, b) <= 1e-5


def test_implementation_option_is_validated():
    with pytest.raises(ValueError, match="implementation='cuda' is not allowed"):
        SinkGD([("w", torch.nn.Parameter(torch.zeros(2, 2)))], implementation="cuda")


def test_targets_are_the_papers():
    """The float table: rows scaled to norm sqrt(n), columns of each block to sqrt(global rows of the block)."""
    blocks = RowBlocks(((0, 2, 0), (2, 6, 1)), (2, 4))
    got, _ = update(torch.ones(6, 9), ("row", "col"), "triton", blocks)
    assert torch.allclose(got.norm(dim=1), torch.full((6,), 3.0, dtype=torch.float64))
    assert torch.allclose(got[:2].norm(dim=0), torch.full((9,), math.sqrt(2), dtype=torch.float64))
    assert torch.allclose(got[2:].norm(dim=0), torch.full((9,), 2.0, dtype=torch.float64))


# ---------------------------------------------------------------------- the step's verdict stays on the device
class _HostReads(torch.overrides.TorchFunctionMode):
    """Records every read of a tensor's value by the host (on a GPU each is a blocking sync)."""

    READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"}

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def _poisoned_run(cls, impl: str, poison: str | None, steps: int = 3, check_reads: bool = False):
    torch.manual_seed(0)
    model = _Tiny().to(DEVICE)
    opt = cls(model.named_parameters(), lr=0.01, weight_decay=0.1, implementation=impl)
    x = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    reads = []
    for step in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        if poison is not None and step == 1:
            dict(model.named_parameters())[poison].grad.view(-1)[3] = float("nan")
        before = ({n: p.detach().clone() for n, p in model.named_parameters()},
                  {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in opt.state.items()})
        mode = _HostReads()
        with mode:
            opt.step()
        reads.append(mode.reads)
        if poison is not None and step == 1:  # nothing written: weights and every state tensor (AdamW's
            # step counters included) bit-identical
            assert all(torch.equal(p, before[0][n]) for n, p in model.named_parameters())
            for k, v in opt.state.items():
                for kk, vv in v.items():
                    assert torch.equal(vv, before[1][k][kk]), kk
    return model, opt, reads


@pytest.mark.parametrize("cls", [SinkGD, SCALE])
@pytest.mark.parametrize("poison", [None, "up.weight", "down.bias", "lm_head.weight"])
def test_device_verdict_skips_whole_step_without_reading_it(cls, poison):
    """implementation="triton": a NaN in a matrix, an AdamW parameter or SCALE's momentum head skips the
    whole step, with no value read by the host inside step(); the counters read it when asked; the run
    equals the torch backend's (host verdict) run."""
    model, opt, reads = _poisoned_run(cls, "triton", poison)
    assert all(r == [] for r in reads), reads
    assert opt.skipped_steps == (poison is not None) and opt.last_step_skipped is False
    ref, ref_opt, ref_reads = _poisoned_run(cls, "torch", poison)
    assert all(r for r in ref_reads)  # (the probe sees the host verdict's reads)
    assert ref_opt.skipped_steps == opt.skipped_steps
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        assert rel(a.detach(), b.detach()) <= 1e-5, n


def test_torch_backend_gated_on_the_device(monkeypatch):
    """On a GPU without Triton the torch backend keeps the verdict on the device too (torch.where-gated
    update): forced here on CPU tensors."""
    from sinkgd_ds.optim.base import MatrixOptimizer

    ref, ref_opt, _ = _poisoned_run(SinkGD, "torch", "up.weight")
    monkeypatch.setattr(MatrixOptimizer, "_verdict_on_device", lambda self, groups: True)
    model, opt, reads = _poisoned_run(SinkGD, "torch", "up.weight")
    assert opt.skipped_steps == 1 == ref_opt.skipped_steps
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------- choosing a backend
def test_tensors_the_kernels_cannot_take_run_on_the_reference():
    """fp16 and non-contiguous gradients never reach the kernels: the batch runs on the torch reference."""
    g = torch.randn(7, 5, generator=torch.Generator().manual_seed(8))
    for grad in (g.half(), g.t().contiguous().t()):
        w = torch.zeros(7, 5, dtype=grad.dtype if grad.dtype == torch.half else torch.float32, device=DEVICE)
        w.grad = grad.to(DEVICE)
        batch = MatrixBatch([dense_spec(w)], grad_of, implementation="triton")
        assert batch.step_(("row", "col") * 2, 1.0) is True
        assert batch.backend.name == "torch"
        assert rel(-w.double(), sr_sinkhorn(grad.double().cpu(), 2)) <= (1e-3 if grad.dtype == torch.half else TOL)


def test_backend_choice_and_clear_errors(monkeypatch):
    cpu, meta = [torch.device("cpu")], [torch.device("meta")]
    assert backends.select("torch", cpu).name == "torch"
    assert backends.select("auto", meta).name == "torch"
    with pytest.raises(RuntimeError, match="implementation='native' runs on CPU tensors"):
        backends.select("native", meta)
    with pytest.raises(RuntimeError, match="implementation='triton' runs on CUDA tensors"):
        backends.select("triton", meta)
    monkeypatch.setenv(backends.ENV, "torch")  # the environment overrides what the optimizer asked for
    assert backends.select("triton", cpu).name == "torch"
    monkeypatch.setenv(backends.ENV, "gpu")
    with pytest.raises(ValueError, match="implementation='gpu' is not allowed"):
        backends.select("auto", cpu)


def test_every_kernel_variant_compiles_for_the_gpu():
    """The interpreter runs code the GPU compiler refuses (globals that are not constexpr, a name bound to
    different types in the branches of a runtime ``if``): every variant the backend can launch is compiled
    here, ahead of time, to a cubin for sm_90 (H100/H200), with no GPU (tests/triton_aot.py); the 6 stochastic-
    rounding variants of the update without fused multiply-adds, as they are launched."""
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(root / "tests" / "triton_aot.py"), "90"], env=env, cwd=root,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("\nok ") + proc.stdout.startswith("ok ") == 21, proc.stdout
