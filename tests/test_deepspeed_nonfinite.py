"""One verdict for every rank and every param group: a NaN/inf gradient never half-applies a step.

The grid (tests/ds_nonfinite_worker.py): ZeRO 0-3 x fp32/bf16 (and DeepSpeed's BF16_Optimizer) x
compute_grad_norm on/off x clipping on/off x DeepSpeed's own bf16 overflow check on/off x NaN/inf x where
the bad element sits (a matrix wholly inside one rank's partition, a matrix shared by ranks, an
AdamW-fallback parameter), at 2 and 3 ranks. After each poisoned step every rank's full fp32 weights,
module weights and optimizer state are bit-identical to before it, and every rank reports the skip.

Before the fix, fp32 ZeRO-1/2 with ``compute_grad_norm: false`` changed the AdamW groups (and the other
rank's matrices) while the poisoned matrix stayed put: DeepSpeed steps the inner optimizer one param group
at a time, and each rank judged only its own partition.
"""

from __future__ import annotations

import pytest
import torch

from .distributed import spawn
from .ds_nonfinite_worker import CASES, grid, run_grid


@pytest.fixture(scope="module")
def grids():
    return {world: spawn(run_grid, world, grid(world), timeout=900) for world in (2, 3)}


@pytest.mark.parametrize("world", [2, 3])
def test_poisoned_steps_change_nothing_on_any_rank(grids, world):
    ranks = grids[world]
    for key, _cfg in grid(world):
        for rank, res in enumerate(ranks):
            r = res[key]
            assert "error" not in r, (key, r.get("error"))
            assert [f"{b}-{w}" for b, w in CASES] == list(r["cases"]), key
            for case, c in r["cases"].items():
                where = (key, rank, case, c["target"])
                assert c["skipped"], where
                assert c["weights"] and c["module"], ("weights changed", where)
                assert c["state"], ("optimizer state changed", where)
                assert c["finite"], ("non-finite value written", where)
            # training goes on afterwards; DeepSpeed counted every skip (so its LR scheduler did not advance)
            assert not r["final_skipped"] and r["final_changed"], key
            assert r["engine_skipped"] == len(CASES), (key, r["engine_skipped"])


@pytest.mark.parametrize("world", [2, 3])
def test_the_grid_covers_every_placement(grids, world):
    """The cases really put the bad value where they say: for ZeRO-1/2 and BF16_Optimizer a matrix that only
    one rank holds, and one that several ranks hold; stage 3 cuts every matrix over all ranks."""
    r0 = grids[world][0]
    for key, _cfg in grid(world):
        cases = r0[key]["cases"]
        if key.startswith(("z1", "z2")):
            held = cases["nan-local"]["held"]
            assert held.count("local") == 1 and held.count(None) == world - 1, (key, held)
            assert cases["nan-shared"]["held"].count("shared") >= 2, (key, cases["nan-shared"]["held"])
        if key.startswith("z3"):
            assert cases["nan-shared"]["held"] == ["shared"] * world, key
        if key.startswith("z0"):
            assert r0[key]["wrapper"] in ("SinkGD", "FP16_UnfusedOptimizer"), key
    wrappers = {r0[k]["wrapper"] for k, _ in grid(world)}
    assert {"DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3", "BF16_Optimizer"} <= wrappers


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_end_with_the_same_weights(grids, world):
    for key, _cfg in grid(world):
        first = grids[world][0][key]["weights"]
        for other in grids[world][1:]:
            for n, w in other[key]["weights"].items():
                assert torch.equal(w, first[n]), (key, n)
