"""One verdict on every rank: the non-finite grid under DeepSpeed, many engines per launch.

Each configuration (stage x fp32/bf16 x compute_grad_norm x clipping x DeepSpeed's own overflow check)
builds a SinkGD engine on GridLM, takes one clean step (so the AdamW fallback has state), then one
poisoned step per case (NaN or inf at one element of: a matrix that lies wholly inside one rank's
partition, a matrix that straddles partitions, an AdamW-fallback parameter), and finally one clean
step. Around every poisoned step it records, on this rank, whether the full fp32 weights, the module
weights and the inner optimizer's state are bit-identical to before, and whether the step was skipped.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F

import sinkgd_ds  # noqa: F401  - registers SinkGD/SCALE/SWAN with DeepSpeed

from .poison import install_poison

VOCAB, D, HID, FF, SEQ, BATCH = 13, 6, 4, 20, 5, 6
# a: 4x6 (24 elements) sits at the start of the matrix group's flat buffer, inside rank 0's partition;
# c: 6x20 (120) at its end straddles the last cut. The worker reports what each rank really holds.
MATRICES = ("a.weight", "b.weight", "c.weight")
CASES = [(bad, where) for bad in ("nan", "inf") for where in ("local", "shared", "fallback")]


class GridLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(VOCAB, D)
        self.norm = torch.nn.LayerNorm(D)
        self.a = torch.nn.Linear(D, HID, bias=False)
        self.b = torch.nn.Linear(HID, FF, bias=False)
        self.c = torch.nn.Linear(FF, D, bias=False)
        self.lm_head = torch.nn.Linear(D, VOCAB, bias=False)

    def forward(self, ids):
        h = self.embed_tokens(ids)
        h = h + self.c(F.gelu(self.b(F.gelu(self.a(self.norm(h))))))
        logits = self.lm_head(h).float()
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def grid_config(stage: int, world: int, bf16: bool, clip: float, grad_norm: bool = True,
                ds_check: bool = True, bf16_optimizer: bool = False) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": BATCH // world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": clip,
        "optimizer": {"type": "SinkGD", "params": {"lr": 0.02, "lr_scale": 0.05}},
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": bf16, "check_grad_overflow": ds_check},
        "steps_per_print": 10**9,
    }
    if not grad_norm:
        cfg["zero_optimization"]["compute_grad_norm"] = False
    if bf16_optimizer:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


def grid(world: int) -> list[tuple[str, dict]]:
    """Every combination DeepSpeed 0.19.8 accepts (compute_grad_norm=false: stages 1-2, no clipping)."""
    out = []
    for stage in (0, 1, 2, 3):
        for bf16 in (False, True):
            for clip in (0.0, 1.0):
                prec = "bf16" if bf16 else "fp32"
                out.append((f"z{stage}-{prec}-clip{clip:g}", grid_config(stage, world, bf16, clip)))
            if stage in (1, 2):
                out.append((f"z{stage}-{'bf16' if bf16 else 'fp32'}-nonorm",
                            grid_config(stage, world, bf16, 0.0, grad_norm=False)))
                if bf16:
                    out.append((f"z{stage}-bf16-nonorm-nocheck",
                                grid_config(stage, world, True, 0.0, grad_norm=False, ds_check=False)))
    for clip in (0.0, 1.0):
        out.append((f"z1-bf16opt-clip{clip:g}", grid_config(1, world, True, clip, bf16_optimizer=True)))
    return out


def _batches(steps: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen) for _ in range(steps)]


def _snapshot(engine, inner) -> dict:
    import deepspeed

    stage = engine.zero_optimization_stage()
    masters = {}
    for lows, highs in zip(getattr(engine.optimizer, "fp16_groups", []), getattr(engine.optimizer, "fp32_groups", [])):
        masters.update({id(lo): hi for lo, hi in zip(lows, highs)})
    full, module = {}, {}
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
        for n, p in engine.module.named_parameters():
            module[n] = p.detach().clone()
    for n, p in engine.module.named_parameters():
        if stage == 0:
            full[n] = masters.get(id(p), p).detach().float().clone()
        else:
            full[n] = deepspeed.utils.safe_get_full_fp32_param(p).detach().clone()
    state = [{k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in st.items()}
             for st in inner.state.values()]
    return {"full": full, "module": module, "state": state}


def _same(a: dict, b: dict) -> dict:
    def eq(x, y):
        if torch.is_tensor(x) or torch.is_tensor(y):
            return torch.is_tensor(x) and torch.is_tensor(y) and x.shape == y.shape and torch.equal(x, y)
        return x == y

    return {
        "weights": all(eq(a["full"][n], b["full"][n]) for n in a["full"]),
        "module": all(eq(a["module"][n], b["module"][n]) for n in a["module"]),
        "state": len(a["state"]) == len(b["state"]) and all(
            sa.keys() == sb.keys() and all(eq(sa[k], sb[k]) for k in sa) for sa, sb in zip(a["state"], b["state"])),
        "finite": all(bool(torch.isfinite(t).all()) for t in b["full"].values())
        and all(bool(torch.isfinite(v).all()) for st in b["state"] for v in st.values() if torch.is_tensor(v)),
    }


def _holdings(inner) -> dict[str, str]:
    """For each matrix this rank steps: 'local' (its sums complete here) or 'shared'."""
    out = {}
    for specs in inner._layouts.values():
        for s in specs:
            if s.fragments:
                out[s.name] = "local" if s.is_local else "shared"
    return out


def run_grid(rank: int, world: int, configs: list[tuple[str, dict]]) -> dict:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for key, cfg in configs:
        try:
            results[key] = _run_one(cfg)
        except Exception as e:  # noqa: BLE001 - reported per config
            results[key] = {"error": f"{type(e).__name__}: {e}"}
    return results


def _run_one(cfg: dict) -> dict:
    import deepspeed

    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    model = GridLM()
    poison = install_poison(model, rank, world)  # the bad value comes from one rank's backward
    engine, _, _, _ = deepspeed.initialize(model=model, config=copy.deepcopy(cfg))
    inner = engine.basic_optimizer
    holdings = _holdings(inner)
    # where each case puts its bad element: a matrix local to some rank, one shared by ranks, a fallback param
    held = [None] * world
    dist.all_gather_object(held, holdings)
    # (stage 0 holds every matrix whole on every rank, ZeRO-3 cuts every matrix: then the first and last stand in)
    local = next((m for m in MATRICES if any(h.get(m) == "local" for h in held)), MATRICES[0])
    shared = next((m for m in reversed(MATRICES) if any(h.get(m) == "shared" for h in held)), MATRICES[-1])
    targets = {"local": local, "shared": shared, "fallback": "embed_tokens.weight"}
    data = _batches(2 + len(CASES))
    per = BATCH // world

    def step(i):
        count = inner.skipped_steps
        loss = engine(data[i][rank * per : (rank + 1) * per])
        engine.backward(loss)
        engine.step()
        ds_skip = bool(getattr(engine.optimizer, "overflow", False))
        inner_skip = inner.skipped_steps > count  # (DeepSpeed skipping itself never calls the inner step)
        return float(loss.detach()), ds_skip or inner_skip, ds_skip

    step(0)
    cases = {}
    for i, (bad, where) in enumerate(CASES, start=1):
        name = targets[where]
        before = _snapshot(engine, inner)
        poison.update(name=name, value=float("nan") if bad == "nan" else float("inf"))
        _, skipped, by_deepspeed = step(i)
        poison["name"] = None
        after = _snapshot(engine, inner)
        cases[f"{bad}-{where}"] = {"target": name, "held": [h.get(name) for h in held], "skipped": skipped,
                                   "by_deepspeed": by_deepspeed,
                                   **_same(before, after)}
    before = _snapshot(engine, inner)
    loss, skipped, _ = step(len(CASES) + 1)
    after = _snapshot(engine, inner)
    out = {"cases": cases, "holdings": holdings, "final_skipped": skipped,
           "final_changed": not _same(before, after)["weights"], "weights": after["full"],
           "skipped_steps": inner.skipped_steps, "engine_skipped": engine.skipped_steps,
           "wrapper": type(engine.optimizer).__name__,
           "kinds": [g["kind"] for g in inner.param_groups]}
    engine.destroy() if hasattr(engine, "destroy") else None
    return out
