"""Models built inside ``deepspeed.zero.Init`` (1-D placeholder parameters when the optimizer is built).

Runs on 2 ranks at ZeRO-3: a plain MLP with SinkGD / SCALE / SWAN from the JSON config and as a client
optimizer, and an HF LLaMA loaded with ``from_pretrained`` from a local directory under ZeRO-3 (HF then
builds it inside ``zero.Init``). Each run returns the routing the inner optimizer chose, the initial and
final full weights (gathered) and the losses, for a dense single-process reference in the test.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F

import sinkgd_ds  # noqa: F401  - registers SinkGD/SCALE/SWAN with DeepSpeed

BATCH, IN, HID, MID, OUT = 6, 7, 11, 9, 5
STEPS = 3
LLAMA = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=16, tie_word_embeddings=False)
LLAMA_BATCH, LLAMA_SEQ = 4, 8


class MLP(torch.nn.Module):
    """Plain 2-D weights and 1-D biases: every weight must reach the matrix optimizer."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(IN, HID)
        self.fc2 = torch.nn.Linear(HID, MID)
        self.fc3 = torch.nn.Linear(MID, OUT)

    def forward(self, x, y):
        return F.mse_loss(self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x))))), y)


def mlp_data(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(BATCH, IN, generator=gen), torch.randn(BATCH, OUT, generator=gen)) for _ in range(steps)]


def llama_data(steps: int = STEPS) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(6)
    return [torch.randint(0, LLAMA["vocab_size"], (LLAMA_BATCH, LLAMA_SEQ), generator=gen) for _ in range(steps)]


def zero3_config(world: int, batch: int, opt: str | None) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": batch // world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }
    if opt is not None:
        cfg["optimizer"] = {"type": opt, "params": {"lr": 0.02, "lr_scale": 0.05}}
    return cfg


def _gathered(module) -> dict[str, torch.Tensor]:
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        return {n: p.detach().clone().float() for n, p in module.named_parameters()}


def _train(engine, batches, rank, world, llama: bool) -> list[float]:
    losses = []
    for b in batches:
        if llama:
            per = b.shape[0] // world
            ids = b[rank * per : (rank + 1) * per]
            loss = engine(input_ids=ids, labels=ids).loss
        else:
            per = b[0].shape[0] // world
            loss = engine(b[0][rank * per : (rank + 1) * per], b[1][rank * per : (rank + 1) * per])
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


def _report(engine, init, losses, placeholders) -> dict:
    inner = engine.basic_optimizer
    names = {id(p): n for n, p in engine.module.named_parameters()}
    kinds = {n: inner.classify(n, p) for n, p in engine.module.named_parameters()}
    return {"inner": type(inner).__name__, "group_kinds": [g["kind"] for g in inner.param_groups], "kinds": kinds,
            "init": init, "final": _gathered(engine.module), "losses": losses, "placeholders": placeholders,
            "names": sorted(names.values())}


def run_mlp(opt: str, client: bool) -> dict:
    import deepspeed

    world, rank = dist.get_world_size(), dist.get_rank()
    cfg = zero3_config(world, BATCH, None if client else opt)
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=copy.deepcopy(cfg)):
        model = MLP()
    placeholders = {n: (tuple(p.shape), tuple(p.ds_shape)) for n, p in model.named_parameters()}
    init = _gathered(model)
    optimizer = None
    if client:
        optimizer = getattr(sinkgd_ds, opt)(model.named_parameters(), lr=0.02, lr_scale=0.05)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
    losses = _train(engine, mlp_data(), rank, world, llama=False)
    return _report(engine, init, losses, placeholders)


def run_llama(path: str) -> dict:
    import deepspeed
    from transformers import LlamaForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    world, rank = dist.get_world_size(), dist.get_rank()
    cfg = zero3_config(world, LLAMA_BATCH, "SinkGD")
    keep = HfDeepSpeedConfig(copy.deepcopy(cfg))  # noqa: F841 - must stay alive: from_pretrained then uses zero.Init
    model = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    placeholders = {n: (tuple(p.shape), tuple(p.ds_shape)) for n, p in model.named_parameters()}
    init = _gathered(model)
    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    losses = _train(engine, llama_data(), rank, world, llama=True)
    return _report(engine, init, losses, placeholders)


def run_all(rank: int, world: int, llama_path: str) -> dict:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    out = {}
    jobs = [(f"{opt}-{'client' if client else 'json'}", run_mlp, (opt, client))
            for opt in ("SinkGD", "SCALE", "SWAN") for client in (False, True)]
    jobs.append(("llama-from_pretrained", run_llama, (llama_path,)))
    for key, fn, args in jobs:
        try:
            out[key] = fn(*args)
        except Exception as e:  # noqa: BLE001 - reported per job
            import traceback

            out[key] = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"}
    return out
