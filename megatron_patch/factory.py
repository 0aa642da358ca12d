"""Building our optimizer where megatron-core builds its inner torch optimizer.

``megatron.core.optimizer.get_megatron_optimizer`` makes param groups and buffers per model-chunk
group, then calls ``_get_megatron_optimizer_based_on_param_groups``, which only knows adam/sgd. We
wrap that one function: for our names we construct SinkGD / SCALE / SWAN from the same param
groups, wrap it exactly as Megatron would (DistributedOptimizer, Float16OptimizerWithFloat16Params
or FP32Optimizer; our subclasses only adapt checkpointing to a stateless optimizer) and describe
the layout (``sinkgd_ds.integrations.megatron``). Every other name goes to Megatron unchanged.

From megatron-core 0.18, ``get_megatron_optimizer`` itself sends every name but adam/sgd to its
"emerging optimizer" builder (Muon, SOAP, ...; layer-wise sharding, not the DistributedOptimizer), so
the inner function is never reached for ours. We therefore also wrap ``get_megatron_optimizer``: for
our names it runs Megatron's own standard path on a copy of the config that says ``adam`` (param
groups, buffers, DistributedOptimizer exactly as for Adam) while a context variable tells the inner
wrapper which optimizer to build. That is one code path for every version, chosen by no version string.
"""

from __future__ import annotations

import contextvars
import copy
import difflib
import functools
from typing import Any

import torch.distributed as dist

from sinkgd_ds.integrations.megatron import describe_layout, named_parameters, require
from sinkgd_ds.optim import MatrixOptimizer, tag_parameter_names
from sinkgd_ds.optim.base import engine_param_groups
from sinkgd_ds.registry import MEGATRON_COMMON_FIELDS, lookup

from .config import OURS
from .rebind import rebind
from .wrappers import SinkDistributedOptimizer, SinkFloat16Optimizer, SinkFP32Optimizer, init_state

MEGATRON_NAMES = ("adam", "sgd")
# Megatron's per-group bookkeeping keys, kept on our routed groups for its LR scheduler and checkpoints.
_MEGATRON_GROUP_KEYS = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr", "max_lr", "min_lr",
                        "default_config")


def is_ours(config: Any) -> bool:
    return str(getattr(config, "optimizer", "")).lower() in OURS


class AdamPath(str):
    """``"adam"`` for Megatron's dispatch, but its logs of the config say which optimizer is really built."""

    def __new__(cls, value: str, ours: str) -> AdamPath:
        self = super().__new__(cls, value)
        self.ours = ours
        return self

    def __repr__(self) -> str:
        return f"'{self.ours}' (built on megatron-core's adam path)"


#: the config of ours being built while Megatron's standard (adam) path runs on its copy (see the module docstring)
_BUILDING: contextvars.ContextVar[Any] = contextvars.ContextVar("sinkgd_building", default=None)


def check_name(config: Any) -> None:
    """A near miss of one of our names (``sinkdg``) fails here with the name meant. Any other name is Megatron's
    to accept or refuse: installing this package must not take away Megatron's own optimizers (Muon, Lion, SOAP,
    ... in megatron-core 0.18+), whatever their names."""
    name = str(getattr(config, "optimizer", ""))
    if name.lower() in (*MEGATRON_NAMES, *OURS):
        return
    close = difflib.get_close_matches(name.lower(), OURS, n=1, cutoff=0.75)
    if close:
        raise ValueError(f"optimizer={name!r} is not supported. Did you mean {close[0]!r}? megatron_patch adds "
                         f"{', '.join(OURS)}; megatron-core has its own names.")


def check_hyperparameters(config: Any) -> None:
    """Each of our config fields (Megatron-LM flags ``--sinkgd-iters`` ...) through the optimizer's own checks,
    so that a bad value is named by its field and flag before anything is built."""
    entry = lookup(config.optimizer)
    cls = entry.cls
    for field, key in {**MEGATRON_COMMON_FIELDS, **entry.megatron_fields}.items():
        value = getattr(config, field, None)
        if value is None:
            continue
        cls.check_options(f"megatron_patch: {field}={value!r} (--{field.replace('_', '-')})", **{key: value})
    betas = (getattr(config, "adam_beta1", 0.9), getattr(config, "adam_beta2", 0.999))
    cls.check_options(f"megatron_patch: adam_beta1/adam_beta2={betas!r}", betas=betas)
    if config.lr is not None:
        cls.check_options(f"megatron_patch: lr={config.lr!r} with weight_decay={config.weight_decay!r}",
                          lr=config.lr, weight_decay=config.weight_decay)


def check_config(config: Any, param_groups: list[dict], model_chunks: list) -> None:
    """Reject combinations we do not handle, before anything is built."""
    name = config.optimizer.lower()
    check_hyperparameters(config)
    bad = []
    if config.fp16:
        bad.append("fp16 (dynamic loss scaling is untested with these optimizers; use bf16)")
    if getattr(config, "optimizer_cpu_offload", False):
        bad.append("optimizer_cpu_offload (HybridDeviceOptimizer only runs Adam/SGD)")
    if getattr(config, "use_precision_aware_optimizer", False):
        bad.append("use_precision_aware_optimizer (TransformerEngine FusedAdam feature)")
    if getattr(config, "use_layer_wise_distributed_optimizer", False):
        bad.append("use_layer_wise_distributed_optimizer (use use_distributed_optimizer: shards are exact here)")
    if getattr(config, "optimizer_cuda_graph", False):
        bad.append("optimizer_cuda_graph (--optimizer-cuda-graph: the step reads a host-side non-finite verdict)")
    if getattr(config, "overlap_param_gather_with_optimizer_step", False):
        bad.append("overlap_param_gather_with_optimizer_step (--overlap-param-gather-with-optimizer-step: "
                   "splits the first model chunk into its own optimizer, whose statistics would miss the others')")
    ddp_config = getattr(model_chunks[0], "ddp_config", None) if model_chunks else None
    if getattr(ddp_config, "num_distributed_optimizer_instances", 1) > 1:
        bad.append(f"num_distributed_optimizer_instances={ddp_config.num_distributed_optimizer_instances} "
                   "(--num-distributed-optimizer-instances: several instances are not described; use 1)")
    model_config = getattr(model_chunks[0], "config", None) if model_chunks else None
    if getattr(model_config, "gtp_weight_remat_size", 1) not in (None, 1):
        bad.append(f"gtp_weight_remat_size={model_config.gtp_weight_remat_size} (GTP weight rematerialisation "
                   "shards weights over a group that is not described)")
    if any(g.get("is_expert_parallel") for g in param_groups):
        bad.append("expert (MoE) parameters (their expert-TP/DP groups are not described yet)")
    if getattr(ddp_config, "use_megatron_fsdp", False):
        bad.append("Megatron-FSDP")
    if not getattr(config, "decoupled_weight_decay", True) and config.weight_decay:
        bad.append("decoupled_weight_decay=False with weight_decay > 0 (weight decay here is always decoupled)")
    if name == "swan" and dist.is_initialized():
        from megatron.core import parallel_state

        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            bad.append("SWAN with tensor parallelism (whitening needs whole matrices; use sinkgd or scale)")
    if bad:
        raise ValueError(f"megatron_patch: optimizer={config.optimizer!r} does not support: " + "; ".join(bad))


def build_inner(config: Any, param_groups: list[dict]) -> MatrixOptimizer:
    """Our optimizer over Megatron's param groups, with Megatron's group keys carried over."""
    entry = lookup(config.optimizer)
    # the fields the config has (a plain OptimizerConfig(optimizer="sinkgd") has none of ours: their defaults)
    fields = {**MEGATRON_COMMON_FIELDS, **entry.megatron_fields}
    kwargs = {kw: getattr(config, f) for f, kw in fields.items() if getattr(config, f, None) is not None}
    kwargs.setdefault("lr", 0.0)  # (Megatron's scheduler sets it)
    groups = [{"params": g["params"]} for g in param_groups if g["params"]]
    with engine_param_groups():  # Megatron shards and checkpoints per group: one kind per group
        inner: MatrixOptimizer = entry.cls(groups, betas=(config.adam_beta1, config.adam_beta2), **kwargs)
    source = {id(p): g for g in param_groups for p in g["params"]}
    for group in inner.param_groups:
        src = source[id(group["params"][0])]
        group.update({k: src[k] for k in _MEGATRON_GROUP_KEYS if k in src})
    return inner


def build(orig, config: Any, model_chunks: list, param_groups: list[dict], per_model_buffers=None,
          model_parallel_group=None, data_parallel_group=None, data_parallel_group_gloo=None,
          data_parallel_group_idx=None, intra_dist_opt_group=None, distributed_optimizer_instance_id=0,
          pg_collection=None, **extra: Any):
    """Drop-in for ``_get_megatron_optimizer_based_on_param_groups`` (``orig``) that knows our names."""
    real = _BUILDING.get()
    if real is not None and not is_ours(config):  # our config's adam-named copy, on Megatron's standard path
        config = copy.copy(config)
        config.optimizer = real.optimizer
    if not is_ours(config):
        check_name(config)
        return orig(config, model_chunks, param_groups, per_model_buffers=per_model_buffers,
                    model_parallel_group=model_parallel_group, data_parallel_group=data_parallel_group,
                    data_parallel_group_gloo=data_parallel_group_gloo, data_parallel_group_idx=data_parallel_group_idx,
                    intra_dist_opt_group=intra_dist_opt_group,
                    distributed_optimizer_instance_id=distributed_optimizer_instance_id,
                    pg_collection=pg_collection, **extra)
    check_config(config, param_groups, model_chunks)
    for chunk in model_chunks:
        tag_parameter_names(named_parameters(chunk))
    from megatron.core import parallel_state

    tp_group = pg_collection.tp if pg_collection is not None and hasattr(pg_collection, "tp") else \
        parallel_state.get_tensor_model_parallel_group()
    model_config = getattr(model_chunks[0], "config", None) if model_chunks else None
    split = bool(getattr(config, "sinkgd_split_fused", True))
    if not any(g["params"] for g in param_groups):
        return orig(config, model_chunks, param_groups, per_model_buffers=per_model_buffers,
                    model_parallel_group=model_parallel_group, data_parallel_group=data_parallel_group,
                    data_parallel_group_gloo=data_parallel_group_gloo, data_parallel_group_idx=data_parallel_group_idx,
                    intra_dist_opt_group=intra_dist_opt_group,
                    distributed_optimizer_instance_id=distributed_optimizer_instance_id, pg_collection=pg_collection)
    inner = build_inner(config, param_groups)
    members = [list(g["params"]) for g in inner.param_groups]
    if config.use_distributed_optimizer:
        wrapper = SinkDistributedOptimizer(
            inner, config, None, init_state, model_chunks=model_chunks, per_model_buffers=per_model_buffers,
            data_parallel_group=data_parallel_group, data_parallel_group_gloo=data_parallel_group_gloo,
            data_parallel_group_idx=data_parallel_group_idx,
            distributed_optimizer_instance_id=distributed_optimizer_instance_id)
        wrapper.grad_stats_parallel_group = intra_dist_opt_group
    elif config.bf16:
        wrapper = SinkFloat16Optimizer(inner, config, None, init_state)
        wrapper.grad_stats_parallel_group = model_parallel_group
    else:
        wrapper = SinkFP32Optimizer(inner, config, init_state)
        wrapper.grad_stats_parallel_group = model_parallel_group
    wrapper.tp_group = tp_group
    world = dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None
    describe_layout(wrapper, inner, tp_group=tp_group, model_config=model_config, group_members=members,
                    split_fused=split, consensus_group=world)
    return wrapper


def patch_core() -> None:
    """Route ``get_megatron_optimizer`` through :func:`build`. Idempotent."""
    import megatron.core.optimizer as mco

    orig = require(mco, "_get_megatron_optimizer_based_on_param_groups")
    if getattr(orig, "_sinkgd_patched", False):
        return
    get_optimizer = require(mco, "get_megatron_optimizer")

    def _get_megatron_optimizer_based_on_param_groups(config, model_chunks, param_groups, *args, **kwargs):
        if args:
            raise TypeError("megatron_patch: expected keyword arguments after param_groups (megatron-core "
                            "0.16.1 through 0.19 call it that way)")
        return build(orig, config, model_chunks, param_groups, **kwargs)

    def get_megatron_optimizer(config, model_chunks, *args, **kwargs):
        if not is_ours(config):
            check_name(config)
            return get_optimizer(config, model_chunks, *args, **kwargs)
        as_adam = copy.copy(config)
        as_adam.optimizer = AdamPath("adam", config.optimizer)
        token = _BUILDING.set(config)
        try:
            return get_optimizer(as_adam, model_chunks, *args, **kwargs)
        finally:
            _BUILDING.reset(token)

    _get_megatron_optimizer_based_on_param_groups._sinkgd_patched = True  # type: ignore[attr-defined]
    rebind(mco, "_get_megatron_optimizer_based_on_param_groups", _get_megatron_optimizer_based_on_param_groups)
    rebind(mco, "get_megatron_optimizer", functools.wraps(get_optimizer)(get_megatron_optimizer))
    emerging = getattr(mco, "_get_megatron_emerging_optimizer", None)
    if emerging is not None:  # megatron-core 0.18+: where the original get_megatron_optimizer sends our names

        def _get_megatron_emerging_optimizer(config, model_chunks, *args, **kwargs):
            """Reached for our names only through a reference to the original ``get_megatron_optimizer`` taken
            before ``apply()`` (a local ``from ... import``): build through the standard path all the same."""
            if not is_ours(config):
                return emerging(config, model_chunks, *args, **kwargs)
            overrides = kwargs.get("config_overrides", args[0] if args else None)
            pg_collection = kwargs.get("pg_collection", args[1] if len(args) > 1 else None)
            return get_megatron_optimizer(config, model_chunks, config_overrides=overrides,
                                          pg_collection=pg_collection)

        rebind(mco, "_get_megatron_emerging_optimizer", _get_megatron_emerging_optimizer)
