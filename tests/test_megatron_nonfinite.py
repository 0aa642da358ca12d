"""Megatron: a NaN/inf gradient changes nothing on any rank (DistOpt, TP, TP x DistOpt, bf16).

Megatron-core's wrappers check nothing themselves for fp32/bf16 (its found-inf check belongs to the fp16
grad scaler), so the verdict is ours: the inner optimizer shares it over the world. Each config takes one
clean step, then one poisoned step per case (NaN or inf at one element of the gradient of a matrix, a
fused QKV matrix and the embedding, an AdamW-fallback parameter), on the last rank's backward only; after
each, every rank's fp32 masters, model weights and optimizer state are bit-identical to before.
"""

from __future__ import annotations

import pytest
import torch

from .distributed import spawn
from .poison import install_poison

pytest.importorskip("megatron.core")

TARGETS = ("decoder.layers.1.mlp.linear_fc2.weight", "decoder.layers.0.self_attention.linear_qkv.weight",
           "embedding.word_embeddings.weight")
CONFIGS = [dict(label="dp2-distopt", tp=1, dist_opt=True), dict(label="tp2", tp=2, dist_opt=False),
           dict(label="tp2-distopt", tp=2, dist_opt=True), dict(label="dp2", tp=1, dist_opt=False),
           dict(label="bf16-dp2-distopt", tp=1, dist_opt=True, bf16=True)]


def _state(opt) -> list[dict]:
    inner = opt.chained_optimizers[0].optimizer
    return [{k: v.detach().clone() for k, v in st.items() if torch.is_tensor(v)} for st in inner.state.values()]


def _same_state(a, b) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def _run_config(rank: int, world: int, full: dict, cfg: dict) -> dict:
    from megatron.core import parallel_state as ps

    from .megatron_worker import batch, build, loss_of, masters

    model, ddp, opt = build(full, **cfg)
    inner = opt.chained_optimizers[0].optimizer
    poison = install_poison(model, rank, world)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per = 4 // dp

    def step(i):
        count = inner.skipped_steps
        ddp.zero_grad_buffer()
        opt.zero_grad()
        loss_of(ddp, batch(i)[dp_rank * per:(dp_rank + 1) * per]).backward()
        ddp.finish_grad_sync()
        opt.step()
        return inner.skipped_steps > count

    def snapshot():
        return masters(model, opt), {n: p.detach().clone() for n, p in model.named_parameters()}, _state(opt)

    step(0)
    cases = {}
    for bad in ("nan", "inf"):
        for target in (*TARGETS, "decoder.final_layernorm.weight"):
            before = snapshot()
            poison.update(name=target, value=float(bad))
            skipped = step(1)
            poison["name"] = None
            after = snapshot()
            cases[f"{bad}-{target}"] = {
                "skipped": skipped,
                "masters": all(torch.equal(before[0][n], after[0][n]) for n in before[0]),
                "model": all(torch.equal(before[1][n], after[1][n]) for n in before[1]),
                "state": _same_state(before[2], after[2])}
    before = masters(model, opt)
    final_skipped = step(2)
    after = masters(model, opt)
    specs = [s for group in (*inner._group_layouts.values(), *inner._layouts.values()) for s in group]
    held = {s.name.removeprefix("module."): "local" if s.is_local else "shared" for s in specs if s.fragments}
    return {"cases": cases, "final_skipped": final_skipped, "held": held,
            "final_changed": any(not torch.equal(before[n], after[n]) for n in before),
            "consensus": inner._consensus_group is not None}


def worker(rank: int, world: int, configs: list[dict]) -> dict:
    from megatron.core import parallel_state as ps

    from . import megatron_cpu_shim
    from .megatron_worker import build_model

    ps.initialize_model_parallel(tensor_model_parallel_size=1)
    megatron_cpu_shim.install()
    full = {n: p.detach().clone() for n, p in build_model(1).named_parameters()}
    out = {}
    for cfg in configs:
        cfg = dict(cfg)
        label = cfg.pop("label")
        out[label] = _run_config(rank, world, full, cfg)
    ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def runs():
    return spawn(worker, 2, CONFIGS, timeout=900)


@pytest.mark.parametrize("label", [c["label"] for c in CONFIGS])
def test_poisoned_steps_change_nothing(runs, label):
    for rank, res in enumerate(runs):
        r = res[label]
        assert r["consensus"], label
        for case, c in r["cases"].items():
            where = (label, rank, case)
            assert c["skipped"], where
            assert c["masters"] and c["model"], ("weights changed", where)
            assert c["state"], ("optimizer state changed", where)
        assert not r["final_skipped"] and r["final_changed"], label


def test_distopt_cases_include_a_matrix_only_one_rank_holds(runs):
    """Under DistOpt a bad value in a matrix that lies inside one rank's shard is seen by that rank alone."""
    for label in ("dp2-distopt", "bf16-dp2-distopt"):
        helds = [res[label]["held"] for res in runs]
        only_one = [t for t in TARGETS[:2] if sum(h.get(t) == "local" for h in helds) == 1
                    and sum(t in h for h in helds) == 1]
        assert only_one, (label, helds)
