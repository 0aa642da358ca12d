"""DeepSpeed integration: ``"optimizer": {"type": "SinkGD", ...}`` at ZeRO stages 0-3.

What ``register()`` changes in DeepSpeed, and nothing else:
  * ``torch.optim.SinkGD/SCALE/SWAN`` exist, so DeepSpeed's own config path builds them
    (``_configure_basic_optimizer`` falls back to ``getattr(torch.optim, type)``);
  * they join ``ZERO_SUPPORTED_OPTIMIZERS`` (no ``zero_allow_untested_optimizer`` needed);
  * ``DeepSpeedEngine._do_sanity_check`` first resolves our names case-insensitively and turns an
    unknown ``type`` into a ValueError that suggests the closest name;
  * ``DeepSpeedEngine._configure_optimizer`` tags parameter names before the optimizer is built
    (so embeddings / LM head route to AdamW) and, once DeepSpeed has wrapped it, describes the
    ZeRO partitions to it (``describe_layout``) from DeepSpeed's own bookkeeping, turns on ZeRO-1/2's
    all-group gradient overflow check (it steps the inner optimizer one param group at a time) and
    gives sharded layouts the world as the group that shares the non-finite verdict.
If any of these DeepSpeed internals is missing, registration fails loudly with the version.
"""

from __future__ import annotations

import difflib
import functools
import logging
from typing import Any

import torch
import torch.distributed as dist

from ..layout import FlatMatrix, Fragment, MatrixSpec, flat_partition_specs
from ..optim import ADAMW, MatrixOptimizer, tag_parameter_names
from ..optim.base import engine_param_groups
from ..registry import classes, lookup
from . import require_internal
from .deepspeed_tp import TPSlice, tp_slices

log = logging.getLogger("sinkgd_ds")
OPTIMIZERS: dict[str, type[MatrixOptimizer]] = classes()
_REGISTERED = False


class DeepSpeedIntegrationError(RuntimeError):
    """DeepSpeed's internals are not what this integration was written against."""


def canonical_name(name: str | None) -> str | None:
    entry = lookup(name)
    return entry.name if entry is not None else None


def _ds_version() -> str:
    import deepspeed

    return getattr(deepspeed, "__version__", "unknown")


def _require(obj: Any, attr: str) -> Any:
    return require_internal(obj, attr, DeepSpeedIntegrationError, f"DeepSpeed {_ds_version()}", "deepspeed 0.19.8")


def matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """A weight as the papers see it: (out, in); >2-D weights as (d0, rest)."""
    numel = 1
    for s in shape:
        numel *= int(s)
    return (int(shape[0]), numel // int(shape[0]))


# ---------------------------------------------------------------------- layouts from ZeRO bookkeeping
def _group_of(group):
    return group if dist.get_world_size(group=group) > 1 else None


TPMap = dict  # id(model parameter) -> TPSlice | ValueError (deepspeed_tp.tp_slices)


def _tp_of(p: torch.Tensor, tps: TPMap) -> TPSlice | None:
    """The tensor-parallel slice a matrix parameter is (None: the whole matrix); an undescribable one raises."""
    tp = tps.get(id(p))
    if isinstance(tp, ValueError):
        raise tp
    return tp


def _flat_matrix(name: str, shape, offset: int, tp: TPSlice | None) -> FlatMatrix:
    if tp is None:
        return FlatMatrix(name, matrix_shape(shape), offset)
    return FlatMatrix(name, tp.shape, offset, global_shape=tp.global_shape, row_group=tp.row_group,
                      col_group=tp.col_group, global_offset=tp.global_offset)


def zero12_specs(zero, inner: MatrixOptimizer, tps: TPMap | None = None) -> list[MatrixSpec]:
    """ZeRO-1/2 (``DeepSpeedZeroOptimizer``): one flat fp32 partition per param group, cut anywhere."""
    specs: list[MatrixSpec] = []
    tps = tps or {}
    offsets_all = _require(zero, "round_robin_bit16_offsets")
    for i, pg in enumerate(inner.param_groups):
        if pg["kind"] == ADAMW:
            continue
        group = _require(zero, "real_dp_process_group")[i]
        world, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
        size = int(_require(zero, "partition_size")[i])
        params = _require(zero, "round_robin_bit16_groups")[i]
        metas = getattr(zero, "round_robin_bit16_meta", [params] * (i + 1))[i]
        mats = [_flat_matrix(inner._name(p) or f"group{i}.param{k}", meta.shape, int(off), _tp_of(p, tps))
                for k, (p, meta, off) in enumerate(zip(params, metas, offsets_all[i]))]
        bounds = [(r * size, (r + 1) * size) for r in range(world)]
        part = _require(zero, "single_partition_of_fp32_groups")[i]
        specs += flat_partition_specs(mats, bounds, rank, part, _group_of(group))
    return specs


def bf16_specs(bf16, inner: MatrixOptimizer, tps: TPMap | None = None) -> list[MatrixSpec]:
    """``BF16_Optimizer`` (bf16 + fp32 grad accumulation + stage 1): same cut, no per-param padding."""
    specs: list[MatrixSpec] = []
    tps = tps or {}
    for i, pg in enumerate(inner.param_groups):
        if pg["kind"] == ADAMW:
            continue
        group = _require(bf16, "real_dp_process_group")[i]
        world, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
        flat = _require(bf16, "bf16_groups_flat")[i]
        size = flat.numel() // world
        mats, off = [], 0
        for k, p in enumerate(_require(bf16, "bf16_groups")[i]):
            mats.append(_flat_matrix(inner._name(p) or f"group{i}.param{k}", p.shape, off, _tp_of(p, tps)))
            off += p.numel()
        bounds = [(r * size, (r + 1) * size) for r in range(world)]
        part = _require(bf16, "fp32_groups_flat_partition")[i]
        specs += flat_partition_specs(mats, bounds, rank, part, _group_of(group))
    return specs


def zero3_specs(z3, inner: MatrixOptimizer, tps: TPMap | None = None) -> list[MatrixSpec]:
    """ZeRO-3: every parameter is cut on its own (rank r holds [r*ps, (r+1)*ps) of it); a sub-group's
    pieces are concatenated into one flat fp32 tensor that the inner optimizer steps."""
    specs: list[MatrixSpec] = []
    tps = tps or {}
    flats = _require(z3, "fp32_partitioned_groups_flat")
    for sg, params in enumerate(_require(z3, "fp16_groups")):
        gid = _require(z3, "sub_group_to_group_id")[sg]
        if inner.param_groups[gid]["kind"] == ADAMW:
            continue
        group = _require(z3, "sub_group_process_groups")[sg]
        world, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
        owner, off = flats[sg], 0
        for p in params:
            ps, numel = int(p.partition_numel()), int(p.ds_numel)
            start = rank * ps
            k = max(0, min(ps, numel - start))
            shared = world > 1 and numel > ps
            if k or shared:
                frags = (Fragment(owner, off, start, k),) if k else ()
                mat = _flat_matrix(inner._name(p) or f"subgroup{sg}.ds{p.ds_id}", p.ds_shape, 0, _tp_of(p, tps))
                specs.append(mat.spec(frags, owner, group if shared else None))
            off += ps
    return specs


def stage0_specs(inner: MatrixOptimizer, tps: TPMap) -> list[MatrixSpec]:
    """Stage 0: the inner optimizer steps the (TP-local) model weights themselves; the sliced ones get their place
    in the full matrix, the others keep the dense default."""
    specs: list[MatrixSpec] = []
    for pg in inner.param_groups:
        if pg["kind"] == ADAMW:
            continue
        for p in pg["params"]:
            tp = _tp_of(p, tps)
            if tp is not None:
                specs.append(_flat_matrix(inner._label(p), p.shape, 0, tp).spec((Fragment(p, 0, 0, p.numel()),), p))
    return specs


def consensus_group(engine: Any) -> object | None:
    """The ranks that must reach one non-finite verdict: every rank of the job (None alone).

    Under ZeRO 1-3 and ``BF16_Optimizer`` each rank checks only the partition it holds, so a bad value that
    lands in one rank's partition would make that rank skip while the others step (a half-applied step).
    DeepSpeed's own overflow check does not always run (fp32 or ``compute_grad_norm: false``, bf16 with
    ``check_grad_overflow: false``), so the inner optimizer always asks all ranks. At stage 0 without model
    parallelism every rank steps the same all-reduced gradients, so the verdicts agree by construction and
    no extra collective is spent.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    dp_world = int(getattr(engine, "dp_world_size", dist.get_world_size()))
    stage0 = engine.zero_optimization_stage() == 0 and not isinstance(engine.optimizer, BF16_Optimizer)
    if stage0 and dp_world == dist.get_world_size():
        return None
    return dist.group.WORLD


def describe_layout(wrapper: Any, inner: MatrixOptimizer, consensus: object | None = None,
                    tps: TPMap | None = None) -> None:
    """Give ``inner`` the layout of the partitions DeepSpeed's ``wrapper`` hands to its step() and the group
    that agrees on skipping a non-finite step (:func:`consensus_group`). ``tps``: the model's tensor-parallel
    slices (:func:`deepspeed_tp.tp_slices`)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    tps = tps or {}
    if isinstance(wrapper, DeepSpeedZeroOptimizer_Stage3):
        inner.set_layout(zero3_specs(wrapper, inner, tps), consensus)
    elif isinstance(wrapper, DeepSpeedZeroOptimizer):
        if getattr(wrapper, "zenflow", False):
            raise ValueError("sinkgd_ds: ZenFlow is not supported with SinkGD/SCALE/SWAN; remove "
                             "zero_optimization.zenflow")
        if not _require(wrapper, "check_grad_overflow"):
            # ZeRO-1/2 hands the inner optimizer one param group per step() call and writes each group back
            # before stepping the next, so a verdict taken inside one call cannot stop the groups before it.
            # DeepSpeed's own check looks at every group's partition and all-reduces the flag over the data-
            # and model-parallel groups before the first group steps; fp32 and compute_grad_norm=false (and
            # bf16 with check_grad_overflow=false) turn it off, so it is turned back on for our optimizers.
            wrapper.check_grad_overflow = True
            log.info("sinkgd_ds: DeepSpeed's gradient overflow check is on for %s (one verdict for all param "
                     "groups and ranks before any group steps)", type(inner).__name__)
        inner.set_layout(zero12_specs(wrapper, inner, tps), consensus)
    elif isinstance(wrapper, BF16_Optimizer):
        inner.set_layout(bf16_specs(wrapper, inner, tps), consensus)
    elif wrapper is inner and (consensus is not None or tps):
        # stage 0, the inner optimizer itself: the dense default applies but to tensor-parallel slices; model
        # parallelism needs the shared verdict
        inner.set_layout(stage0_specs(inner, tps), consensus)
    elif tps:
        raise ValueError(f"sinkgd_ds: DeepSpeed wraps {type(inner).__name__} in {type(wrapper).__name__}, whose "
                         "partitions of tensor-parallel weights are not described; refused (use ZeRO 0-3 or "
                         "bf16's BF16_Optimizer)")
    elif consensus is not None:
        # stage 0 under FP16_UnfusedOptimizer's per-param fp32 copies of the 2-D shapes: the dense default
        # applies; only model parallelism needs the shared verdict
        inner.set_layout((), consensus)


# ---------------------------------------------------------------------- engine hooks
def _check_config(engine) -> None:
    """Reject combinations we cannot do exactly, before any partition is built."""
    offload = engine.zero_offload_optimizer() if hasattr(engine, "zero_offload_optimizer") else None
    device = getattr(offload, "device", None) if offload is not None else None
    if device is not None and str(getattr(device, "value", device)) not in ("none", "None"):
        raise ValueError(
            f"sinkgd_ds: zero_optimization.offload_optimizer.device={getattr(device, 'value', device)!r} is not "
            "supported with SinkGD/SCALE/SWAN (DeepSpeed's CPU offload path only runs its own CPU Adam/Lion "
            "kernels). Allowed: \"none\". These optimizers keep no state for matrices, so offload saves little.")


def _hook_sanity_check(orig):
    @functools.wraps(orig)
    def _do_sanity_check(self):
        name = self._config.optimizer_name if self.client_optimizer is None else None
        if name is not None:
            canon = canonical_name(name)
            if canon is not None:
                self._config.optimizer_name = canon
            elif not self._is_supported_optimizer(name):
                from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

                names = [*OPTIMIZERS, *DEEPSPEED_OPTIMIZERS]
                close = difflib.get_close_matches(name.lower(), [n.lower() for n in names], n=1, cutoff=0.5)
                hint = ""
                if close:
                    hint = f" Did you mean {next(n for n in names if n.lower() == close[0])!r}?"
                raise ValueError(f'DeepSpeed config "optimizer.type": {name!r} is not a known optimizer.{hint} '
                                 f"sinkgd_ds provides {', '.join(OPTIMIZERS)}; DeepSpeed provides "
                                 f"{', '.join(DEEPSPEED_OPTIMIZERS)} and torch.optim classes.")
        return orig(self)

    return _do_sanity_check


def _hook_configure_optimizer(orig):
    @functools.wraps(orig)
    def _configure_optimizer(self, client_optimizer, model_parameters):
        ours = isinstance(client_optimizer, MatrixOptimizer) or (
            client_optimizer is None and canonical_name(self.optimizer_name()) is not None)
        if ours or (client_optimizer is not None and not isinstance(client_optimizer, torch.optim.Optimizer)):
            tag_parameter_names(self.module.named_parameters())
        if ours:
            _check_config(self)
        if isinstance(client_optimizer, MatrixOptimizer):
            client_optimizer.split_param_groups_by_kind()  # ZeRO flattens per group: one kind per group
        with engine_param_groups():  # (the JSON path builds our optimizer inside)
            orig(self, client_optimizer, model_parameters)
        if isinstance(self.basic_optimizer, MatrixOptimizer):
            _check_config(self)
            describe_layout(self.optimizer, self.basic_optimizer, consensus_group(self),
                            tp_slices(self.module, getattr(self, "mpu", None)))

    return _configure_optimizer


def register() -> None:
    """Make DeepSpeed build our optimizers from its JSON config. Idempotent."""
    global _REGISTERED
    if _REGISTERED:
        return
    from deepspeed.runtime import engine as ds_engine
    from deepspeed.runtime.zero import utils as zero_utils

    engine_cls = _require(ds_engine, "DeepSpeedEngine")
    for attr in ("_do_sanity_check", "_configure_optimizer", "_is_supported_optimizer", "optimizer_name"):
        _require(engine_cls, attr)
    supported = _require(zero_utils, "ZERO_SUPPORTED_OPTIMIZERS")
    for name, cls in OPTIMIZERS.items():
        setattr(torch.optim, name, cls)
        if cls not in supported:
            supported.append(cls)
    engine_cls._do_sanity_check = _hook_sanity_check(engine_cls._do_sanity_check)
    engine_cls._configure_optimizer = _hook_configure_optimizer(engine_cls._configure_optimizer)
    _REGISTERED = True
    log.debug("sinkgd_ds: registered %s with DeepSpeed %s", ", ".join(OPTIMIZERS), _ds_version())


def register_if_available() -> bool:
    import importlib.util
    import os

    if os.environ.get("SINKGD_DS_NO_DEEPSPEED") == "1" or importlib.util.find_spec("deepspeed") is None:
        return False
    register()
    return True
