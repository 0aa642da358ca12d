"""The engine on the trivial (dense, single-process) layout against the naive float64 reference."""

from __future__ import annotations

import pytest
import torch

from sinkgd_ds.layout import RowBlocks, dense_spec
from sinkgd_ds.sinkhorn import apply_scaled_update_, normalize_scales

from .reference import sr_sinkhorn, sr_sinkhorn_blocks

SHAPES = [(1, 9), (9, 1), (1, 1), (5, 7), (64, 33), (300, 128), (17, 3), (3, 200)]


def engine_update(g: torch.Tensor, iters: int, blocks: RowBlocks | None = None) -> torch.Tensor:
    """diag(r) G diag(c) via the engine, recovered as the change of a zero weight with step 1."""
    w = torch.zeros(g.shape, dtype=torch.float32)
    spec = dense_spec(w, "w", blocks)
    (sc,) = normalize_scales([spec], lambda t: g, ("row", "col") * iters)  # g may be bf16
    assert sc.finite
    apply_scaled_update_(spec, sc, lambda t: g, step_size=1.0)
    return -w.double()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("iters", range(1, 11))
def test_dense_matches_naive(shape, iters):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(iters * 1000 + shape[0]))
    assert rel_err(engine_update(g, iters), sr_sinkhorn(g, iters)) <= 1e-6


@pytest.mark.parametrize("shape", [(5, 7), (64, 33), (33, 64)])
def test_bf16_gradients(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(3)).bfloat16()
    # reference sees exactly the bf16 values; the engine accumulates them in fp32
    assert rel_err(engine_update(g, 5), sr_sinkhorn(g.double(), 5)) <= 1e-6


def test_fixed_point_norms():
    """After enough iterations rows have norm sqrt(n) and columns sqrt(m)."""
    g = torch.rand(12, 20) + 0.1
    x = engine_update(g, 50)
    assert torch.allclose(x.norm(dim=1), torch.full((12,), 20**0.5, dtype=torch.float64), rtol=1e-4)
    assert torch.allclose(x.norm(dim=0), torch.full((20,), 12**0.5, dtype=torch.float64), rtol=1e-4)


def test_zero_rows_and_columns_give_zero_finite_update():
    g = torch.randn(6, 5)
    g[2] = 0
    g[:, 3] = 0
    x = engine_update(g, 5)
    assert torch.isfinite(x).all()
    assert (x[2] == 0).all() and (x[:, 3] == 0).all()
    assert rel_err(x, sr_sinkhorn(g, 5)) <= 1e-6
    assert (engine_update(torch.zeros(4, 3), 3) == 0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_is_reported(bad):
    g = torch.randn(4, 5)
    g[1, 2] = bad
    w = torch.zeros(4, 5)
    w.grad = g
    (sc,) = normalize_scales([dense_spec(w)], lambda t: t.grad, ("row", "col"))
    assert not sc.finite


def test_fused_row_blocks():
    """Q/K/V stacked per query group: columns normalised per block, like three separate matrices."""
    q, k, v, groups, n = 4, 2, 2, 3, 7
    blocks = RowBlocks.from_sizes([q, k, v], repeats=groups)
    g = torch.randn(groups * (q + k + v), n)
    block_of_row = [b for _ in range(groups) for b, size in enumerate((q, k, v)) for _ in range(size)]
    assert rel_err(engine_update(g, 5, blocks), sr_sinkhorn_blocks(g, 5, block_of_row)) <= 1e-6


def test_chunked_segments_match(monkeypatch):
    """Splitting big matrices into row chunks (bounded transient memory) changes nothing."""
    import sinkgd_ds.layout as layout

    g = torch.randn(50, 40)
    whole = engine_update(g, 3)
    monkeypatch.setattr(layout, "CHUNK_ELEMENTS", 120)  # 3 rows per chunk
    assert rel_err(engine_update(g, 3), whole) <= 1e-7
