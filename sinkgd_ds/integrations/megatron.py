"""Megatron-Core layouts: tensor-parallel slices and DistributedOptimizer shards → MatrixSpecs.

This module only *describes* what each rank holds, from Megatron's own bookkeeping, and hands it
to the optimizer (``MatrixOptimizer.set_layout``); the Sinkhorn engine does all the math.

* Tensor parallelism: a column-parallel weight (``partition_dim == 0``) holds a slice of the rows,
  so its column sums are completed over the TP group; a row-parallel weight (``partition_dim == 1``)
  holds a slice of the columns, so its row sums are. Targets use the global shape.
* DistributedOptimizer: the inner optimizer steps one 1-D shard per (param ∩ this rank's bucket
  chunk). We enumerate every matrix of a param group in buffer order (identical on all ranks of the
  data-parallel group), with the piece ``_get_model_param_range_map(p)["param"]`` where this rank
  has one, so all ranks' buckets of partial sums line up (2L collectives per step per group).
* Fused ``linear_qkv`` (per query group [Q; K; V]) and SwiGLU ``linear_fc1`` ([gate; up] on each TP
  rank) get per-block column statistics (``RowBlocks``), as the paper's unfused LLaMA would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..layout import Fragment, MatrixSpec, RowBlocks
from ..optim.base import ADAMW, NAME_ATTR, MatrixOptimizer
from . import require_internal

__all__ = ["MatrixMeta", "MegatronIntegrationError", "describe_layout", "fused_row_blocks", "matrix_meta",
           "named_parameters"]

#: the name of the one weight that tied word embeddings and output layer share
TIED_EMBEDDING = "embedding.word_embeddings.weight"


class MegatronIntegrationError(RuntimeError):
    """Megatron-Core's internals are not what this integration was written against."""


def mcore_version() -> str:
    try:
        from megatron.core import package_info

        return str(getattr(package_info, "__version__", "unknown"))
    except ImportError:  # pragma: no cover - megatron-core always ships package_info
        return "unknown"


def require(obj: Any, attr: str) -> Any:
    return require_internal(obj, attr, MegatronIntegrationError, f"megatron-core {mcore_version()}",
                            "megatron-core 0.16.1")


def named_parameters(chunk: torch.nn.Module):
    """``chunk.named_parameters()``, with the last pipeline stage's copy of a tied embedding named as the
    embedding it copies.

    With tied embeddings and pipeline parallelism, Megatron keeps the word embedding on the first stage and a copy
    as ``output_layer.weight`` on the last (both marked ``shared_embedding``), sums their gradients over the
    embedding group and expects both copies to step alike. At PP=1 the model has one weight, the embedding, so
    that is what the copy is: it must take the embedding's rule (SCALE would otherwise give it the head's momentum
    rule and the copies would drift apart).
    """
    for name, p in chunk.named_parameters():
        tied_copy = getattr(p, "shared_embedding", False) and name.split(".")[-2:] == ["output_layer", "weight"]
        yield (name[: -len("output_layer.weight")] + TIED_EMBEDDING if tied_copy else name), p


@dataclass(frozen=True)
class MatrixMeta:
    """Everything about one matrix that does not depend on which flat piece a rank holds."""

    name: str
    shape: tuple[int, int]
    global_shape: tuple[int, int]
    blocks: RowBlocks | None
    row_group: object | None
    col_group: object | None
    global_offset: tuple[int, int] = (0, 0)  # the TP slice's place in the full matrix (Megatron concatenates the
    # TP ranks' slices along partition_dim, so rank t holds rows / columns [t * local, (t + 1) * local))


def fused_row_blocks(name: str, shape: tuple[int, int], model_config: Any, tp_size: int) -> RowBlocks | None:
    """Row blocks of a fused TP-local weight, or None when ``name`` is not a fused weight.

    ``linear_qkv``: per local query group, [Q (heads/groups * kv_channels rows); (gate;) K; V];
    ``linear_fc1`` with a gated linear unit: [gate_local; up_local] (Megatron chunks the local output
    in two). Global block rows are the local ones times the TP size.
    """
    rows = shape[0]
    if name.endswith("linear_qkv.weight"):
        heads = model_config.num_attention_heads
        groups = model_config.num_query_groups or heads
        hn = model_config.kv_channels or model_config.hidden_size // heads
        if groups < tp_size:
            raise ValueError(f"sinkgd_ds: {name}: num_query_groups={groups} < tensor_model_parallel_size="
                             f"{tp_size} spreads one query group over several TP ranks; per-block Q/K/V "
                             "statistics are not supported there. Set split_fused_blocks=False.")
        q = heads // groups * hn
        sizes = [q, q, hn, hn] if getattr(model_config, "attention_output_gate", False) else [q, hn, hn]
        repeats = groups // tp_size
    elif name.endswith("linear_fc1.weight") and getattr(model_config, "gated_linear_unit", False):
        sizes, repeats = [rows // 2, rows // 2], 1
    else:
        return None
    if repeats * sum(sizes) != rows:
        raise ValueError(f"sinkgd_ds: {name}: local shape {shape} does not match the fused layout "
                         f"{repeats} x {sizes} implied by the model config (tp={tp_size})")
    return RowBlocks.from_sizes(sizes, repeats=repeats, global_scale=tp_size)


def matrix_meta(model_param: torch.Tensor, tp_group: object | None, model_config: Any,
                split_fused: bool = True) -> MatrixMeta:
    """Shape, global shape, TP groups and fused blocks of one Megatron weight (a 2-D TP-local tensor)."""
    name = getattr(model_param, NAME_ATTR, "") or ""
    if model_param.dim() != 2:
        raise ValueError(f"sinkgd_ds: {name or 'a matrix parameter'} has shape {tuple(model_param.shape)}; "
                         "only 2-D weights take the matrix update (others use the AdamW fallback)")
    m, n = (int(s) for s in model_param.shape)
    tp = dist.get_world_size(group=tp_group) if tp_group is not None else 1
    row_group = col_group = None
    global_shape, offset = (m, n), (0, 0)
    if tp > 1 and getattr(model_param, "tensor_model_parallel", False):
        dim = getattr(model_param, "partition_dim", -1)
        rank = dist.get_rank(group=tp_group)
        if dim == 0:
            global_shape, col_group, offset = (m * tp, n), tp_group, (rank * m, 0)
        elif dim == 1:
            global_shape, row_group, offset = (m, n * tp), tp_group, (0, rank * n)
        else:
            raise ValueError(f"sinkgd_ds: {name}: tensor_model_parallel with partition_dim={dim} is not supported")
    blocks = fused_row_blocks(name, (m, n), model_config, tp) if split_fused and model_config is not None else None
    return MatrixMeta(name, (m, n), global_shape, blocks, row_group, col_group, offset)


def _spec(meta: MatrixMeta, frags: tuple[Fragment, ...], owner: torch.Tensor, shard_group=None) -> MatrixSpec:
    return MatrixSpec(meta.name, meta.shape, frags, owner=owner, global_shape=meta.global_shape, blocks=meta.blocks,
                      shard_group=shard_group, row_group=meta.row_group, col_group=meta.col_group,
                      global_offset=meta.global_offset)


def _matrix_groups(inner: MatrixOptimizer) -> list[int]:
    return [i for i, g in enumerate(inner.param_groups) if g["kind"] != ADAMW]


def replicated_specs(wrapper: Any, inner: MatrixOptimizer, tp_group, model_config, split_fused: bool):
    """FP32Optimizer / Float16OptimizerWithFloat16Params: every rank steps whole TP-local matrices."""
    model_of: dict[int, torch.Tensor] = {}
    for models, mains in zip(getattr(wrapper, "float16_groups", []), getattr(wrapper, "fp32_from_float16_groups", [])):
        model_of.update({id(main): model for model, main in zip(models, mains)})
    specs = []
    for gi in _matrix_groups(inner):
        for p in inner.param_groups[gi]["params"]:
            meta = matrix_meta(model_of.get(id(p), p), tp_group, model_config, split_fused)
            specs.append(_spec(meta, (Fragment(p, 0, 0, p.numel()),), owner=p))
    return specs


def _local_shards(distopt: Any, gi: int) -> dict[torch.Tensor, torch.Tensor]:
    """model param -> the 1-D fp32 shard the inner optimizer steps for it (group ``gi``, this rank)."""
    pairs = list(zip(require(distopt, "model_fp32_groups")[gi], require(distopt, "shard_fp32_groups")[gi]))
    pairs += zip(require(distopt, "model_float16_groups")[gi], require(distopt, "shard_fp32_from_float16_groups")[gi])
    return dict(pairs)


def _holders(start: int, end: int, bucket: Any, world: int) -> list[int]:
    """DP ranks whose chunk of ``bucket`` intersects buffer elements [start, end) (as DistOpt cuts it)."""
    size = bucket.grad_data.numel() // world
    return [r for r in range(world)
            if max(start, bucket.offset + r * size) < min(end, bucket.offset + (r + 1) * size)]


def distopt_group_specs(distopt: Any, inner: MatrixOptimizer, group_members: Sequence[Sequence[torch.Tensor]],
                        tp_group, model_config, split_fused: bool) -> dict[int, list[MatrixSpec]]:
    """DistributedOptimizer: per matrix group, every matrix any rank of the DP group shares, in buffer order.

    ``group_members[i]``: the model params of inner group ``i`` before DistOpt replaced them by shards.
    """
    buffers = require(distopt, "buffers")
    out: dict[int, list[MatrixSpec]] = {}
    for gi in _matrix_groups(inner):
        members = {id(p) for p in group_members[gi]}
        local = _local_shards(distopt, gi)
        params = inner.param_groups[gi]["params"]
        anchor = params[0] if params else _placeholder(buffers)
        specs = []
        for buf in buffers:
            dp = require(buf, "data_parallel_group")
            world, rank = dist.get_world_size(group=dp), dist.get_rank(group=dp)
            index = sorted(require(buf, "param_index_map").items(), key=lambda kv: kv[1][0])
            for param, (start, end, bucket_id) in index:
                if id(param) not in members:
                    continue
                holders = _holders(start, end, require(buf, "buckets")[bucket_id], world)
                shared = len(holders) > 1
                if rank not in holders and not shared:
                    continue
                meta = matrix_meta(param, tp_group, model_config, split_fused)
                frags: tuple[Fragment, ...] = ()
                owner = anchor
                if param in local:
                    rng = require(distopt, "_get_model_param_range_map")(param)["param"]
                    owner = local[param]
                    frags = (Fragment(owner, 0, int(rng.start), int(rng.end - rng.start)),)
                specs.append(_spec(meta, frags, owner, shard_group=dp if shared and world > 1 else None))
        out[gi] = specs
    return out


def _placeholder(buffers: Sequence[Any]) -> torch.Tensor:
    """Owner for a rank that holds no piece of any matrix of a group but must join its collectives."""
    dev = buffers[0].grad_data.device if buffers else torch.device("cpu")
    t = torch.zeros(0, device=dev)
    t.grad = torch.zeros(0, device=dev)
    return t


def describe_layout(wrapper: Any, inner: MatrixOptimizer, *, tp_group: object | None, model_config: Any,
                    group_members: Sequence[Sequence[torch.Tensor]] | None = None, split_fused: bool = True,
                    consensus_group: object | None = None) -> None:
    """Give ``inner`` the layout of what Megatron's ``wrapper`` (FP32 / Float16 / Distributed) hands its step()."""
    from megatron.core.optimizer import DistributedOptimizer

    if isinstance(wrapper, DistributedOptimizer):
        if group_members is None:
            raise ValueError("describe_layout: DistributedOptimizer needs group_members (the inner groups' model "
                             "params before sharding)")
        groups = distopt_group_specs(wrapper, inner, group_members, tp_group, model_config, split_fused)
        inner.set_layout((), consensus_group, group_specs=groups)
    else:
        inner.set_layout(replicated_specs(wrapper, inner, tp_group, model_config, split_fused), consensus_group)
