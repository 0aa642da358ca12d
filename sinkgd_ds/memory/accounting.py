"""Exact bytes this rank holds, by category, read from the engine's own tensors (never from RSS).

What is counted: every storage reachable from the engine's bookkeeping for parameters, gradients, fp32
master copies and optimizer state, each storage once (keyed by its device and address). Many tensors are
views of flat buffers (ZeRO's ``bit16_groups_flat``, Megatron's ``param_data`` / ``grad_data``), so a view
counts its whole storage, which is what is allocated: the alignment padding DeepSpeed and Megatron put
between and after parameters in those buffers is included. A storage reachable from two categories goes to
the first in this order: weights, gradients, master_weights, optimizer state (so an fp32 optimizer that
steps the model's own tensors has no master weights).

What is not counted, and why:
  * communication buckets (ZeRO's IPG reduce buckets, sized by ``reduce_bucket_size`` and not by the
    model; ZeRO-1/2 free them after each backward, ZeRO-3 keeps one for the whole run; all-gather staging;
    Megatron's bucket views are views of ``grad_data``, which is counted): they depend on communication
    settings, not on the optimizer, and are the same for all four optimizers;
  * transients of the step itself (the fp32 copy of a bf16 gradient partition ZeRO makes inside
    ``step()``, the matrix optimizers' per-step scratch) and ZeRO-3's gathered full parameters (released
    after each module's forward/backward): they are not held between steps;
  * the matrix optimizers' cached row/column sums (``MatrixBatch.sums``, one fp32 value per row and column
    of each matrix): workspace, not state; 0.3 % of the bf16 weights at 60M (305 KiB), less for larger
    models;
  * module buffers (RoPE frequencies), activations, the allocator's rounding and fragmentation.

Gradients exist between ``backward()`` and the optimizer step: call :func:`account` there to see them (after
the step ZeRO-1/2 and DeepSpeed stage 0 free theirs; ZeRO-3, BF16_Optimizer and Megatron keep their buffers).
Optimizer state is created lazily by the first step. The memory model (:mod:`sinkgd_ds.memory.model`) predicts
this moment.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from ..integrations.dtensor import is_dtensor, local_tensor
from ..optim.base import ADAMW, MatrixOptimizer

__all__ = ["CATEGORIES", "KEYS", "account", "gather"]

WEIGHTS, GRADIENTS, MASTER = "weights", "gradients", "master_weights"
STATE_MATRICES, STATE_ADAMW = "optimizer_state_matrices", "optimizer_state_adamw"
CATEGORIES = (WEIGHTS, GRADIENTS, MASTER, STATE_MATRICES, STATE_ADAMW)
KEYS = (*CATEGORIES, "total")


class Ledger:
    """Bytes per category; each storage counted once, in the first category that claims it."""

    def __init__(self) -> None:
        self.bytes = dict.fromkeys(CATEGORIES, 0)
        self._seen: set[tuple[str, int | None, int]] = set()

    def add(self, category: str, *objs: Any) -> None:
        for t in tensors_in(objs):
            if is_dtensor(t):
                t = local_tensor(t)
            if t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            size = storage.nbytes()
            if size == 0:
                continue
            key = (t.device.type, t.device.index, storage.data_ptr())
            if key not in self._seen:
                self._seen.add(key)
                self.bytes[category] += size

    def add_grads(self, params: Iterable[torch.Tensor]) -> None:
        """The gradients hanging off tensors: ``.grad``, ZeRO-1/2's ``.grad_accum``, Megatron's ``.main_grad``."""
        for p in tensors_in(params):
            for attr in ("grad", "grad_accum", "main_grad"):
                self.add(GRADIENTS, getattr(p, attr, None))

    def result(self) -> dict[str, int]:
        out = {k: int(v) for k, v in self.bytes.items()}
        out["total"] = sum(out.values())
        return out


def tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    """Tensors in nested lists / tuples / dicts (values) / ZeRO's ``GradPartitionBufferGroup``."""
    if obj is None:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    flat = getattr(obj, "flat_partition", None)  # (GradPartitionBufferGroup: views of one flat partition)
    if isinstance(flat, torch.Tensor):
        yield flat
    items = list(obj.values()) if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    for item in items:
        yield from tensors_in(item)


def account(engine_or_optimizer: Any, model: Any = None) -> dict[str, int]:
    """Bytes this rank holds by category: ``weights``, ``gradients``, ``master_weights``,
    ``optimizer_state_matrices``, ``optimizer_state_adamw`` and ``total`` (their sum), all ints.

    ``engine_or_optimizer``:
      * a DeepSpeed engine (ZeRO 0-3, fp32 or bf16: ``DeepSpeedZeroOptimizer``, ``..._Stage3``,
        ``BF16_Optimizer``, ``FP16_UnfusedOptimizer`` / ``FP16_Optimizer``, or the bare optimizer);
      * ``launch.fsdp_engine.FSDPEngine`` or anything else with ``.module`` and ``.basic_optimizer``;
      * a Megatron optimizer (``DistributedOptimizer``, ``Float16OptimizerWithFloat16Params``,
        ``FP32Optimizer`` or a ``ChainedOptimizer`` of them); ``model``: the DDP model (or a list of model
        chunks), optional: without it, parameters no optimizer holds (frozen) are not counted;
      * a torch optimizer (ours or any other) with ``model`` (a module, or an iterable of parameters):
        without a model the optimizer's parameters are the weights.

    Optimizer state: the state of AdamW-kind param groups (and all state of an optimizer that is not one
    of ours, e.g. the AdamW baseline) counts as ``optimizer_state_adamw``; the rest (SCALE's head momentum)
    as ``optimizer_state_matrices``. See the module docstring for what is and is not counted.
    """
    ledger = Ledger()
    obj = engine_or_optimizer
    if hasattr(obj, "basic_optimizer") and hasattr(obj, "module"):
        wrapper = getattr(obj, "optimizer", None) or obj.basic_optimizer
        _account_deepspeed(ledger, obj.module, wrapper, obj.basic_optimizer)
    elif _is_megatron_optimizer(obj):
        _account_megatron(ledger, obj, model)
    elif isinstance(obj, torch.optim.Optimizer):
        _account_torch(ledger, obj, model)
    else:
        raise TypeError(f"account(): {type(obj).__name__} is not a DeepSpeed engine, an engine with .module and "
                        ".basic_optimizer, a Megatron optimizer or a torch optimizer")
    return ledger.result()


def gather(account_dict: dict[str, int]) -> list[dict[str, int]]:
    """Every rank's :func:`account` dict, in rank order, on every rank (a collective when torch.distributed
    is initialised with more than one rank; otherwise just ``[account_dict]``)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [dict(account_dict)]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, dict(account_dict))
    return out


# ---------------------------------------------------------------------- optimizer state
def _model_params(model: Any) -> list[torch.Tensor]:
    """Parameters of a module, of a list of modules (model chunks), or an iterable of parameters."""
    if model is None:
        return []
    if isinstance(model, torch.nn.Module):
        return list(model.parameters())
    params: list[torch.Tensor] = []
    for item in model:
        params += list(item.parameters()) if isinstance(item, torch.nn.Module) else [item]
    return params


def add_state(ledger: Ledger, inner: torch.optim.Optimizer, extra_groups: dict[int, dict] | None = None) -> None:
    """``inner.state`` by kind. ``extra_groups``: id(state key) -> its param group, for keys the groups no longer
    list (ZeRO-3 empties them between steps)."""
    group_of = {id(p): g for g in inner.param_groups for p in g["params"]}
    group_of.update(extra_groups or {})
    for key, state in inner.state.items():
        category = STATE_ADAMW
        if isinstance(inner, MatrixOptimizer):
            group = group_of.get(id(key))
            if group is not None:
                kind = inner._kind(group, key)
            else:  # (a key no group names: the fallback's state is recognisable by its second moment)
                kind = ADAMW if "exp_avg_sq" in state else "matrix"
            category = STATE_ADAMW if kind == ADAMW else STATE_MATRICES
        ledger.add(category, [v for v in state.values() if isinstance(v, torch.Tensor)])


def inner_params(inner: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in inner.param_groups for p in g["params"]]


# ---------------------------------------------------------------------- plain torch (and FSDP2)
def _account_torch(ledger: Ledger, opt: torch.optim.Optimizer, model: Any) -> None:
    params = _model_params(model) or inner_params(opt)
    ledger.add(WEIGHTS, params)
    ledger.add_grads(params)
    ledger.add_grads(inner_params(opt))
    ledger.add(MASTER, inner_params(opt))  # (only tensors that are not the model's own)
    add_state(ledger, opt)


# ---------------------------------------------------------------------- DeepSpeed
def _account_deepspeed(ledger: Ledger, module: torch.nn.Module, wrapper: Any, basic: torch.optim.Optimizer) -> None:
    params = list(module.parameters())
    ledger.add(WEIGHTS, params, [getattr(p, "ds_tensor", None) for p in params])
    # flat buffers the parameters are views of (their padding included)
    for attr in ("bit16_groups_flat", "bf16_groups_flat", "lp_param_buffer", "fp16_partitioned_groups_flat",
                 "fp16_groups"):
        ledger.add(WEIGHTS, getattr(wrapper, attr, None))
    ledger.add_grads(params)
    # ZeRO-1/2: the reduced gradient partition (views of grads_in_partition, plus zero padding); BF16_Optimizer:
    # the fp32 accumulation buffers; ZeRO-3: the partitioned gradient buffer
    for attr in ("averaged_gradients", "grads_in_partition", "all_grad_tensors", "fp32_groups_gradients_flat",
                 "grad_partitions_flat_buffer"):
        ledger.add(GRADIENTS, getattr(wrapper, attr, None))
    masters = [getattr(wrapper, attr, None) for attr in ("single_partition_of_fp32_groups",
                                                         "fp32_groups_flat_partition", "fp32_partitioned_groups_flat",
                                                         "fp32_groups")]
    ledger.add_grads(list(tensors_in(masters)))
    ledger.add_grads(inner_params(basic))
    ledger.add(MASTER, masters, inner_params(basic))
    add_state(ledger, basic, _zero3_groups(wrapper, basic))


def _zero3_groups(wrapper: Any, inner: torch.optim.Optimizer) -> dict[int, dict]:
    """ZeRO-3 hands the inner optimizer one flat fp32 tensor per sub-group only during the step."""
    flats = getattr(wrapper, "fp32_partitioned_groups_flat", None)
    owner = getattr(wrapper, "sub_group_to_group_id", None)
    if flats is None or owner is None:
        return {}
    return {id(flat): inner.param_groups[owner[sg]] for sg, flat in enumerate(flats)}


# ---------------------------------------------------------------------- Megatron
def _is_megatron_optimizer(obj: Any) -> bool:
    return any(c.__module__.startswith("megatron.core.optimizer") for c in type(obj).__mro__)


def _account_megatron(ledger: Ledger, opt: Any, model: Any) -> None:
    wrappers = list(getattr(opt, "chained_optimizers", [opt]))
    chunks = model if isinstance(model, (list, tuple)) else [] if model is None else [model]
    params = _model_params(model)
    for w in wrappers:  # model params as each wrapper knows them (its own groups)
        attrs = [a for a in ("model_float16_groups", "model_fp32_groups", "float16_groups", "fp32_from_fp32_groups")
                 if hasattr(w, a)]
        for attr in attrs:
            params += list(tensors_in(getattr(w, attr)))
        if not attrs:  # (FP32Optimizer: the inner optimizer steps the model's own parameters)
            params += inner_params(w.optimizer)
    buffers = [b for w in wrappers for b in getattr(w, "buffers", [])]  # DistOpt: the DDP param/grad buffers
    for chunk in chunks:  # (DDP's own list of buffers; nn.Module.buffers is a method)
        for attr in ("buffers", "expert_parallel_buffers"):
            found = getattr(chunk, attr, None)
            buffers += [] if callable(found) or found is None else list(found)
    ledger.add(WEIGHTS, [getattr(b, "param_data", None) for b in buffers], params)
    ledger.add(GRADIENTS, [getattr(b, "grad_data", None) for b in buffers])
    ledger.add_grads(params)
    for w in wrappers:
        inner = w.optimizer
        masters = [getattr(w, attr, None) for attr in ("shard_fp32_from_float16_groups", "shard_fp32_groups",
                                                       "fp32_from_float16_groups")]
        ledger.add_grads(list(tensors_in(masters)) + inner_params(inner))
        ledger.add(MASTER, masters, inner_params(inner))
        add_state(ledger, inner)
