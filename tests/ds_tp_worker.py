"""Tensor parallelism inside DeepSpeed, run for real: AutoTP over a tiny HF LLaMA, and Megatron-style layers
(DeepSpeed's ``LinearLayer`` / ``LinearAllreduce``) with an ``mpu`` given to ``deepspeed.initialize``.

Each configuration trains a few steps and returns, from every rank, the full fp32 master weights (the TP slices
gathered over the TP group, ZeRO partitions gathered by DeepSpeed), the losses and the skip record; the test
compares them with the same optimizer on the unsharded model in one process.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import sinkgd_ds  # noqa: F401  - registers SinkGD/SCALE/SWAN with DeepSpeed

VOCAB, SEQ, BATCH = 96, 8, 4


def llama(seed: int = 0, uneven: bool = False):
    """A tiny LLaMA (hidden 64, 2 layers, 4 heads, 2 KV heads); ``uneven``: 3 KV heads and 6 heads over 2 TP
    ranks, so AutoTP cuts k/v (and q, o) unevenly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads, kv = (6, 3) if uneven else (4, 2)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48 if uneven else 64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64,
                      tie_word_embeddings=False, attn_implementation="eager")
    return LlamaForCausalLM(cfg)


def phi3(seed: int = 0, uneven: bool = False):
    """A tiny Phi-3: fused ``qkv_proj`` and ``gate_up_proj`` (AutoTP's "phi3" preset cuts each sub-parameter)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    cfg = Phi3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                     tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                     attn_implementation="eager")
    return Phi3ForCausalLM(cfg)


class MPU:
    """A Megatron-style ``mpu`` (the interface Megatron-DeepSpeed hands ``deepspeed.initialize``): TP groups of
    consecutive ranks, data-parallel groups across them."""

    def __init__(self, tp: int):
        world, rank = dist.get_world_size(), dist.get_rank()
        self.tp, self.dp = tp, world // tp
        for start in range(0, world, tp):  # (every rank creates every group, in one order)
            g = dist.new_group(list(range(start, start + tp)))
            if start <= rank < start + tp:
                self.tp_group = g
        for first in range(tp):
            g = dist.new_group(list(range(first, world, tp)))
            if rank % tp == first:
                self.dp_group = g
        self.tp_rank, self.dp_rank = rank % tp, rank // tp

    def get_model_parallel_group(self):
        return self.tp_group

    get_tensor_model_parallel_group = get_model_parallel_group

    def get_model_parallel_rank(self):
        return self.tp_rank

    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_model_parallel_world_size(self):
        return self.tp

    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self):
        return dist.get_rank() - self.tp_rank

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_rank(self):
        return self.dp_rank

    def get_data_parallel_world_size(self):
        return self.dp


class ParallelStateMPU(MPU):
    """megatron.core.parallel_state seen through the mpu interface DeepSpeed asks for (Megatron-DeepSpeed ships
    such an mpu; megatron-core's own module lacks get_model_parallel_world_size / _rank)."""

    def __init__(self, tp: int):
        from megatron.core import parallel_state as ps

        from . import megatron_cpu_shim

        ps.destroy_model_parallel()
        ps.initialize_model_parallel(tensor_model_parallel_size=tp)
        megatron_cpu_shim.install()
        self.tp, self.dp = tp, ps.get_data_parallel_world_size()
        self.tp_group, self.dp_group = ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group()
        self.tp_rank, self.dp_rank = ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()


class MegatronCoreLinears(torch.nn.Module):
    """Megatron-Core's ColumnParallelLinear / RowParallelLinear as ``up`` / ``down`` (their ``(output, bias)``
    returns unwrapped)."""

    def __init__(self, d: int, ff: int, tp: int):
        from megatron.core.model_parallel_config import ModelParallelConfig
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        cfg = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                                  gradient_accumulation_fusion=False)
        init = torch.nn.init.xavier_normal_
        self.up = ColumnParallelLinear(d, ff, config=cfg, init_method=init, bias=True, gather_output=False)
        self.down = RowParallelLinear(ff, d, config=cfg, init_method=init, bias=False, input_is_parallel=True,
                                      skip_bias_add=False)


class TPLM(torch.nn.Module):
    """Embedding, a column-parallel ``up`` (DeepSpeed's ``LinearLayer``) and a row-parallel ``down``
    (``LinearAllreduce``) on the mpu's TP group, LM head; ``group=None`` builds the unsharded model."""

    def __init__(self, group=None, seed: int = 0, d: int = 24, ff: int = 40, mcore_tp: int = 0):
        from types import SimpleNamespace

        super().__init__()
        torch.manual_seed(seed)
        self.embed_tokens = torch.nn.Embedding(VOCAB, d)
        self.norm = torch.nn.LayerNorm(d)
        self.up = torch.nn.Linear(d, ff)
        self.down = torch.nn.Linear(ff, d, bias=False)
        self.lm_head = torch.nn.Linear(d, VOCAB, bias=False)
        self._unwrap = bool(mcore_tp)
        if mcore_tp:
            linears = MegatronCoreLinears(d, ff, mcore_tp)
            self.up, self.down = linears.up, linears.down
        elif group is not None:
            from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer, set_autotp_mode

            set_autotp_mode(training=True)
            self.up = LinearLayer(self.up, mp_group=group)
            self.down = LinearAllreduce(self.down, mp_group=group)
        self._out = SimpleNamespace

    def forward(self, input_ids, labels):
        h = self.embed_tokens(input_ids)
        if self._unwrap:
            h = h + self.down(torch.nn.functional.gelu(self.up(self.norm(h))[0]))[0]
        else:
            h = h + self.down(torch.nn.functional.gelu(self.up(self.norm(h))))
        logits = self.lm_head(h)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        return self._out(loss=loss)


def data(steps: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen) for _ in range(steps)]


def ds_config(opt: str, stage: int, tp: int, dp: int, gas: int = 1, clip: float = 0.0, bf16: bool = False,
              hp: dict | None = None, preset: str | None = None) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": BATCH // dp // gas,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": clip,
        "optimizer": {"type": opt, "params": {"lr": 0.02, "lr_scale": 0.05, **(hp or {})}},
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if tp > 1:
        cfg["tensor_parallel"] = {"autotp_size": tp}
    if preset == "fused-mlp":  # a custom partition config: only the MLP, its fused [gate; up] cut per half
        cfg["tensor_parallel"]["partition_config"] = {"use_default_specs": False, "layer_specs": [
            {"patterns": [r".*\.mlp\.gate_up_proj\.weight$"], "partition_type": "column", "shape": [2, -1],
             "partition_dim": 0},
            {"patterns": [r".*\.mlp\.down_proj\.weight$"], "partition_type": "row"}]}
    elif preset:
        cfg["tensor_parallel"]["preset_model"] = preset
    return cfg


def _full(p: torch.Tensor, group, dim: int | None, widths) -> torch.Tensor:
    """A TP slice's full matrix: every TP rank's slice, concatenated along the cut dimension; a fused weight
    (``widths``: each sub-parameter's rows on each rank) sub-parameter by sub-parameter."""
    if group is None or dim is None:
        return p
    pieces = [None] * dist.get_world_size(group=group)
    dist.all_gather_object(pieces, p, group=group)
    if not widths:
        return torch.cat(pieces, dim=dim)
    per_rank = [list(piece.split([ws[r] for ws in widths], dim=0)) for r, piece in enumerate(pieces)]
    return torch.cat([per_rank[r][s] for s in range(len(widths)) for r in range(len(pieces))], dim=0)


def full_weights(engine, mixed: bool, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter's full fp32 master (ZeRO partitions and TP slices gathered); ``grads``: its full gradient
    as the optimizer will see it (between backward and step)."""
    import deepspeed
    from deepspeed.utils import groups

    mpu = engine.mpu if isinstance(engine.mpu, MPU) else groups if engine.autotp_size() > 1 else None
    tp_group = mpu.get_tensor_model_parallel_group() if mpu and mpu.get_tensor_model_parallel_world_size() > 1 \
        else None
    masters = {}
    for lows, highs in zip(getattr(engine.optimizer, "fp16_groups", []), getattr(engine.optimizer, "fp32_groups", [])):
        masters.update({id(lo): hi for lo, hi in zip(lows, highs)})
    out = {}
    for name, p in engine.module.named_parameters():
        if grads:
            local = deepspeed.utils.safe_get_full_grad(p).detach().float().clone()
        elif engine.zero_optimization_stage() == 0 and not mixed:
            local = p.detach().float().clone()
        elif engine.zero_optimization_stage() == 0 and id(p) in masters:
            local = masters[id(p)].detach().float().clone()
        else:
            local = deepspeed.utils.safe_get_full_fp32_param(p).detach().float().clone()
        meta = getattr(p, "ds_autotp_universal_checkpoint_meta", None)
        dim = None
        if getattr(p, "tensor_model_parallel", False):
            dim = meta["partition_dim"] if meta is not None else getattr(p, "partition_dim", None)
        out[name] = _full(local, tp_group, dim, meta.get("sub_param_shard_widths") if meta else None)
    return out


def plain_torch_on_slices(tp: int) -> dict:
    """DeepSpeed's TP layers (sliced weights) stepped by a plain SinkGD, no engine to describe them: must be refused
    by name at the first step, with every weight unchanged. (``deepspeed.tp_model_init`` only records its arguments
    in 0.19.8: AutoTP slices exist only inside ``deepspeed.initialize``.)"""
    model = TPLM(MPU(tp).tp_group)
    opt = sinkgd_ds.SinkGD(model.named_parameters(), lr=0.02)
    ids = data(1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        opt.step()
        error = None
    except ValueError as e:
        error = str(e)
    unchanged = all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    return {"error_text": error, "unchanged": unchanged}


def train(cfg: dict, steps: int = 3, uneven: bool = False, poison_step: int | None = None,
          tp_model_init: bool = False, mpu_tp: int = 0, client: bool = False, arch: str = "llama",
          ckpt: str | None = None, save_after: int | None = None, start: int = 0, load_tag: str = "saved",
          mcore_tp: int = 0) -> dict:
    """``ckpt``: with ``save_after``, save there after that many steps (and go on); with ``start``, load it and
    train from that step."""
    import deepspeed
    from deepspeed.utils import groups

    if "tensor_parallel" not in cfg:  # (an earlier AutoTP engine in this process left AutoTP's training mode on,
        # and an earlier tp_model_init its recorded arguments, which DeepSpeed would apply to this engine)
        from deepspeed.module_inject import set_autotp_mode
        from deepspeed.runtime.tensor_parallel import init_utils

        set_autotp_mode(training=False)
        init_utils._TP_MODEL_INIT_ARGS = None
    mpu = ParallelStateMPU(mcore_tp) if mcore_tp else MPU(mpu_tp) if mpu_tp else None
    if mcore_tp:
        model = TPLM(mcore_tp=mcore_tp)
    else:
        model = TPLM(mpu.tp_group) if mpu else {"llama": llama, "phi3": phi3}[arch](uneven=uneven)
    poison = {"on": False}
    if tp_model_init:
        tp = cfg["tensor_parallel"]["autotp_size"]
        model = deepspeed.tp_model_init(model, tp_size=tp, dtype=torch.float32)
    cfg = copy.deepcopy(cfg)
    optimizer = None
    if client:  # the user's own optimizer object instead of the JSON "optimizer" section
        spec = cfg.pop("optimizer")
        optimizer = getattr(sinkgd_ds, spec["type"])(model.named_parameters(), **spec["params"])
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=None if client else model.parameters(),
                                           optimizer=optimizer, config=cfg, mpu=mpu)
    inner = engine.basic_optimizer
    params = dict(engine.module.named_parameters())
    target = params["down.weight" if mpu else "model.layers.1.mlp.down_proj.weight"]  # (every arch has it)
    target.register_hook(lambda g: torch.full_like(g, float("nan")) if poison["on"] else g)
    gas = cfg["gradient_accumulation_steps"]
    autotp = "tensor_parallel" in cfg
    dp_rank = mpu.get_data_parallel_rank() if mpu else groups.get_data_parallel_rank() if autotp else dist.get_rank()
    dp = mpu.dp if mpu else groups.get_data_parallel_world_size() if autotp else dist.get_world_size()
    per = BATCH // dp // gas
    losses, skipped, first = [], [], {}
    batches = data(steps)
    mixed = cfg["bf16"]["enabled"]
    if ckpt is not None and start:
        engine.load_checkpoint(ckpt, tag=load_tag)
        first["loaded"] = full_weights(engine, mixed)
    for step in range(start, steps):
        for micro in range(gas):
            rows = batches[step][dp_rank * gas * per:(dp_rank + 1) * gas * per]
            ids = rows[micro * per:(micro + 1) * per]
            poison["on"] = poison_step == step and dist.get_rank() == dist.get_world_size() - 1
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            if step == 0 and micro == gas - 1:  # (the first step's masters and gradients, for a one-step check)
                first = dict(before=full_weights(engine, mixed), grads=full_weights(engine, mixed, grads=True))
            engine.step()
            losses.append(float(loss.detach()))
        if step == 0:
            first["after"] = full_weights(engine, mixed)
        if ckpt is not None and save_after == step + 1:
            engine.save_checkpoint(ckpt, tag="saved")
            first["saved"] = full_weights(engine, mixed)
        skipped.append(bool(getattr(engine.optimizer, "overflow", False)) or bool(inner.last_step_skipped))
    metas = {n: getattr(p, "ds_autotp_universal_checkpoint_meta", None) for n, p in params.items()}
    sizes = {n: tuple(m["partition_sizes"]) for n, m in metas.items() if m and m.get("partition_sizes")}
    sizes.update({n: tuple(map(tuple, m["sub_param_shard_widths"])) for n, m in metas.items()
                  if m and m.get("sub_param_shard_widths")})
    weights = full_weights(engine, mixed)
    out = dict(weights=weights, first=first, losses=losses, partition_sizes=sizes, skipped=skipped,
               wrapper=type(engine.optimizer).__name__,
               tp=mpu.tp if mpu else groups.get_tensor_model_parallel_world_size() if autotp else 1, dp=dp,
               comm_groups=len(getattr(inner.last_comm, "groups", ()) or ()))
    engine.destroy() if hasattr(engine, "destroy") else None
    return out


def _run_one(key: str, cfg: dict, kw: dict) -> dict:
    return plain_torch_on_slices(**kw) if key == "plain-torch" else train(cfg, **kw)


def run_configs(rank: int, world: int, configs: list[tuple[str, dict, dict]]) -> dict:
    """As ``ds_worker.run_configs``, with this module's runs."""
    from . import ds_worker

    return ds_worker.run_configs(rank, world, configs, run=_run_one)
