"""Worker side of the Megatron tests: a tiny GQA + SwiGLU GPT trained for a few steps per config.

Every rank first builds the TP=1 model (same seed everywhere) as the *full* weights; each config
then builds its TP-local model, loads the slices of those full weights, trains through megatron's
own DDP + ``get_megatron_optimizer`` and returns its local weights. Rank 0 also runs the
independent float64 dense reference (tests/reference.py) on the TP=1 model.
"""

from __future__ import annotations

import os
import warnings

import torch

from . import reference as R

os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore")

VOCAB, SEQ, BATCH, HIDDEN, HEADS, GROUPS, FFN = 64, 8, 4, 48, 4, 2, 40
LR, LR_SCALE, ITERS, WD, BETAS, EPS = 0.02, 0.05, 5, 0.01, (0.9, 0.999), 1e-8
TOL = 1e-5  # relative: max |w - w_ref| / max |w_ref|, fp32, for the matrices (our update rules)
# AdamW-fallback params (embedding, output layer, norms): Adam's m / sqrt(v) turns fp32 rounding of
# near-zero gradients (TP forward vs the TP=1 reference) into O(lr) steps, so they get 1e-4.
ADAM_TOL = 1e-4


def transformer_config(tp: int, bf16: bool = False):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=2, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=GROUPS, ffn_hidden_size=FFN,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        tensor_model_parallel_size=tp, use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
        bias_dropout_fusion=False, masked_softmax_fusion=False, bias_activation_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32)


def build_model(tp: int, bf16: bool = False):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    torch.manual_seed(0)
    model = GPTModel(config=transformer_config(tp, bf16), transformer_layer_spec=get_gpt_layer_local_spec(),
                     vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope",
                     share_embeddings_and_output_weights=False)
    # bf16: every param bf16, as Megatron-LM's Float16Module makes it (the local spec's norms are built fp32;
    # Float16OptimizerWithFloat16Params' checkpoint id map assumes all params are 16-bit)
    return model.bfloat16() if bf16 else model


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(100 + step))


def loss_of(model, ids: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(SEQ).unsqueeze(0).expand(ids.shape[0], -1)
    mask = torch.tril(torch.ones(1, 1, SEQ, SEQ)) < 0.5
    return model(input_ids=ids, position_ids=pos, attention_mask=mask, labels=ids).float().mean()


# ---------------------------------------------------------------------- full <-> TP-local weights
def tp_dim(p: torch.Tensor) -> int | None:
    """The dimension a TP-local parameter is split along (None: replicated)."""
    return p.partition_dim if getattr(p, "tensor_model_parallel", False) else None


def local_slice(name: str, full: torch.Tensor, dim: int | None, tp: int, rank: int) -> torch.Tensor:
    if tp == 1 or dim is None:
        return full
    if dim == 0 and name.endswith("linear_fc1.weight"):  # [gate; up] -> [gate_r; up_r] (stride 2)
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, 0)[rank], up.chunk(tp, 0)[rank]])
    return full.chunk(tp, dim=dim)[rank]


def assemble(name: str, parts: list[torch.Tensor], dim: int | None) -> torch.Tensor:
    """Inverse of :func:`local_slice`: the full weight from the TP ranks' slices (in TP-rank order)."""
    if len(parts) == 1 or dim is None:
        return parts[0]
    if dim == 0 and name.endswith("linear_fc1.weight"):
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(parts, dim=dim)


def block_of_row(name: str, rows: int) -> list[int] | None:
    """Blocks of the full (TP=1) fused weights: [q; k; v] per query group, [gate; up]."""
    hn = HIDDEN // HEADS
    if name.endswith("linear_qkv.weight"):
        per = [0] * (HEADS // GROUPS * hn) + [1] * hn + [2] * hn
        return per * GROUPS
    if name.endswith("linear_fc1.weight"):
        return [0] * (rows // 2) + [1] * (rows // 2)
    return None


def is_matrix(name: str, p: torch.Tensor) -> bool:
    return p.dim() == 2 and "embedding" not in name and "output_layer" not in name


# ---------------------------------------------------------------------- the independent reference
SCALE_MOMENTUM, SWAN_NS = 0.9, 5


def reference(full: dict[str, torch.Tensor], steps: int, split: bool = True, opt: str = "sinkgd",
              bf16: bool = False) -> dict[str, torch.Tensor]:
    """Dense float64 update rules (tests/reference.py) + torch AdamW, full batch, on the TP=1 model.

    sinkgd: SR-Sinkhorn per Q/K/V and gate/up block (``split``) on hidden matrices; scale: rows to
    RMS 1 on hidden matrices, embedding columns to RMS 1, output layer rows of a 0.9 momentum to
    RMS 1; swan: standardise + whiten each hidden matrix (per block when ``split``). Everything else: AdamW.
    ``bf16``: mixed precision as Megatron does it: fp32 masters start from the bf16-rounded
    weights, forward/backward run on a bf16 copy of the model, updates go to the masters.
    """
    model = build_model(1, bf16)
    master = {n: (t.bfloat16() if bf16 else t).double().clone() for n, t in full.items()}

    def own_rule(n: str, p: torch.Tensor) -> bool:
        return is_matrix(n, p) or (opt == "scale" and p.dim() == 2)

    adam_params = {n: master[n].requires_grad_(True) for n, p in model.named_parameters() if not own_rule(n, p)}
    adam = torch.optim.AdamW(list(adam_params.values()), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False)
    momentum: dict[str, torch.Tensor] = {}
    for step in range(steps):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(master[n])
        model.zero_grad(set_to_none=True)
        loss_of(model, batch(step)).backward()
        with torch.no_grad():
            for n, p in model.named_parameters():
                g = p.grad.double()
                if n in adam_params:
                    adam_params[n].grad = g
                    continue
                if opt == "sinkgd":
                    blocks = block_of_row(n, g.shape[0]) if split else None
                    upd = R.sr_sinkhorn_blocks(g, ITERS, blocks or [0] * g.shape[0])
                elif opt == "swan":  # whitening per Q/K/V and gate/up block (``split``), as unfused
                    blocks = block_of_row(n, g.shape[0]) if split else None
                    upd = torch.empty_like(g) if blocks else R.swan(g, SWAN_NS)
                    for b in sorted(set(blocks or [])):
                        rows = torch.tensor([i for i, blk in enumerate(blocks) if blk == b])
                        upd[rows] = R.swan(g[rows], SWAN_NS)
                elif "output_layer" in n:
                    momentum[n] = SCALE_MOMENTUM * momentum.get(n, torch.zeros_like(g)) + (1 - SCALE_MOMENTUM) * g
                    upd = R.row_rms_normalize(momentum[n])
                elif "embedding" in n:
                    upd = R.col_rms_normalize(g)
                else:
                    upd = R.row_rms_normalize(g)
                master[n].mul_(1 - LR * LR_SCALE * WD).sub_(LR * LR_SCALE * upd)
        adam.step()
    return {n: t.detach().clone() for n, t in master.items()}


# ---------------------------------------------------------------------- one distributed config
def build(full: dict[str, torch.Tensor], tp: int, dist_opt: bool, bf16: bool = False, optimizer: str = "sinkgd",
          bucket_size: int | None = 1500, split: bool = True, implementation: str = "auto"):
    """(Re)initialise model parallelism and build model (weights = slices of ``full``), DDP and optimizer."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import get_megatron_optimizer

    import megatron_patch

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    tp_rank = ps.get_tensor_model_parallel_rank()
    model = build_model(tp, bf16)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(local_slice(n, full[n], tp_dim(p), tp, tp_rank))
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                            use_distributed_optimizer=dist_opt, bucket_size=bucket_size)
    ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_cfg, module=model)
    megatron_patch.apply(training=False)
    from megatron_patch.training import CONFIGS

    cfg = CONFIGS[optimizer](
        lr=LR, weight_decay=WD, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_eps=EPS,
        sinkgd_iters=ITERS, sinkgd_lr_scale=LR_SCALE, use_distributed_optimizer=dist_opt, bf16=bf16,
        clip_grad=0.0, sinkgd_split_fused=split, sinkgd_implementation=implementation)
    return model, ddp, get_megatron_optimizer(cfg, [ddp])


def train(model, ddp, opt, first: int, last: int) -> list[float]:
    """Steps ``first..last-1`` on this rank's share of the fixed batches; returns the local losses."""
    from megatron.core import parallel_state as ps

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per, losses = BATCH // dp, []
    for step in range(first, last):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        loss = loss_of(ddp, batch(step)[dp_rank * per:(dp_rank + 1) * per])
        loss.backward()
        ddp.finish_grad_sync()
        ok, _, _ = opt.step()
        assert ok
        losses.append(float(loss.detach()))
    return losses


def global_losses(local: list[float]) -> list[float]:
    """Whole-batch losses (mean over the DP ranks' equal shares), comparable across layouts."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    t = torch.tensor(local, dtype=torch.float64)
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    return (t / ps.get_data_parallel_world_size()).tolist()


def masters(model, opt) -> dict[str, torch.Tensor]:
    """The fp32 master weights (TP-local, complete over DP): what the optimizer steps."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer import DistributedOptimizer, Float16OptimizerWithFloat16Params

    inner = opt.chained_optimizers[0]
    out = {}
    if isinstance(inner, DistributedOptimizer):
        for n, p in model.named_parameters():
            full = torch.zeros(p.numel(), dtype=torch.float32)
            if p in inner.model_param_group_index_map:  # this rank holds a piece of p
                gi, order = inner.model_param_group_index_map[p]
                rng = inner._get_model_param_range_map(p)["param"]
                full[rng.start:rng.end] = inner.optimizer.param_groups[gi]["params"][order].detach()
            dist.all_reduce(full, group=ps.get_data_parallel_group())
            out[n] = full.view(p.shape)
        return out
    main_of = {}
    if isinstance(inner, Float16OptimizerWithFloat16Params):
        for models, mains in zip(inner.float16_groups, inner.fp32_from_float16_groups):
            main_of.update({id(m): q for m, q in zip(models, mains)})
    return {n: main_of.get(id(p), p).detach().float().clone() for n, p in model.named_parameters()}


def run_config(full: dict[str, torch.Tensor], tp: int, dist_opt: bool, steps: int, bf16: bool = False,
               optimizer: str = "sinkgd", bucket_size: int | None = 1500, split: bool = True,
               implementation: str = "auto") -> dict:
    from megatron.core import parallel_state as ps

    model, ddp, opt = build(full, tp, dist_opt, bf16, optimizer, bucket_size, split, implementation)
    losses = train(model, ddp, opt, 0, steps)
    inner = opt.chained_optimizers[0]
    layouts = [*inner.optimizer._layout_specs, *(s for g in inner.optimizer._group_layouts.values() for s in g)]
    return {"tp": tp, "tp_rank": ps.get_tensor_model_parallel_rank(),
            # where each matrix's TP slice sits in the full matrix (its stochastic-rounding element indices)
            "places": {s.name.removeprefix("module."): (s.global_offset, s.shape, s.global_shape) for s in layouts},
            "types": (type(inner).__name__, type(inner.optimizer).__name__),
            "weights": masters(model, opt), "losses": global_losses(losses),
            "kinds": {g["kind"] for g in inner.optimizer.param_groups},
            "backends": sorted({b.backend.name for b in inner.optimizer._batches.values() if b.backend}),
            "dims": {n: tp_dim(p) for n, p in model.named_parameters()}}


def worker(rank: int, world: int, configs: list[dict], steps: int, references: list[tuple]) -> dict:
    """``references``: (optimizer, bf16, split, steps) keys of the dense references rank 0 computes;
    a config may set its own ``steps`` and ``expect_error`` (an exception type build must raise)."""
    from megatron.core import parallel_state as ps

    import megatron_patch  # noqa: F401 - import cost paid once

    from . import megatron_cpu_shim

    ps.initialize_model_parallel(tensor_model_parallel_size=1)
    megatron_cpu_shim.install()
    full = {n: p.detach().clone() for n, p in build_model(1).named_parameters()}
    out: dict = {"full": full if rank == 0 else None, "runs": {}, "reference": {}}
    if rank == 0:
        out["reference"] = {key: reference(full, key[3], split=key[2], opt=key[0], bf16=key[1]) for key in references}
    for cfg in configs:
        label, expect_error = cfg.pop("label"), cfg.pop("expect_error", None)
        cfg.setdefault("steps", steps)
        if expect_error is None:
            out["runs"][label] = run_config(full, **cfg)
            continue
        try:  # must be refused while building, before any step
            run_config(full, **cfg)
            out["runs"][label] = {"error": None}
        except expect_error as e:
            out["runs"][label] = {"error": f"{type(e).__name__}: {e}"}
    ps.destroy_model_parallel()
    return out
