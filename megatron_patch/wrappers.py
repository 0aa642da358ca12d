"""Megatron's optimizer wrappers, adapted to an optimizer whose matrices carry no state.

What differs from Adam, and why each override exists:
  * ``DistributedOptimizer.__init__`` asserts an Adam-family inner optimizer (megatron-core 0.16.1,
    "due to checkpointing requirements"); we satisfy it for our class only, during construction.
  * Our param groups are Megatron's groups split by kind (matrix / AdamW fallback), so several share
    Megatron's identifier keys (wd_mult, lr_mult, ...): groups are matched by position, and the kind
    is checked, instead of by those keys.
  * State exists only for AdamW-fallback params (exp_avg, exp_avg_sq, step) and SCALE's output
    layer (exp_avg); matrices have none (:func:`state_keys`). :func:`init_state` allocates exactly
    that, without a step, for checkpoint loading.
  * Distributed optimizer checkpoints: every parameter-state format of megatron-core 0.16.1's
    DistributedOptimizer is unusable here. ``dp_reshardable`` (Megatron-LM's default) and
    ``fully_reshardable`` assume every param of a bucket has the same state keys (Adam's
    ``exp_avg``/``exp_avg_sq``, hard-coded in ``get_parameter_state_dp_zero``), and
    ``dp_reshardable`` cannot change TP; ``fully_sharded_model_space`` builds ShardedTensors with
    ``flattened_range``, which 0.16.1's ``ShardedTensor.validate_metadata_integrity`` rejects
    ("ShardedTensor.flattened_range is not supported."). So :class:`SinkDistributedOptimizer` saves
    its own model-space layout (``sinkgd_model_space``): per model parameter, the TP-local fp32 main
    param and that param's own state keys, completed over the data-parallel group (one all-reduce
    per tensor, as ``fully_reshardable`` gathers) and stored as ShardedTensors with the model
    parameter's own sharding metadata. Matrices store only the main param, so a checkpoint loads
    at any DP and TP size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.optimizer import DistributedOptimizer, Float16OptimizerWithFloat16Params, FP32Optimizer

from sinkgd_ds.integrations.megatron import require
from sinkgd_ds.optim.base import ADAMW, LAYOUT_KEY, MatrixOptimizer
from sinkgd_ds.optim.scale import HEAD_STATE, SCALE_HEAD

MODEL_SPACE = "sinkgd_model_space"


def state_keys(kind: str) -> tuple[str, ...]:
    """Tensor state (beside AdamW's 0-dim ``step``) one parameter of this kind carries after a step."""
    if kind == ADAMW:
        return ("exp_avg", "exp_avg_sq")
    if kind == SCALE_HEAD:
        return (HEAD_STATE,)
    return ()


@torch.no_grad()
def init_state(opt: MatrixOptimizer, config: Any = None) -> None:
    """Allocate, as zeros, the state a step would create lazily (for checkpoint loading). No collectives.

    Zero state is what a first step starts from (AdamW ``step`` 0, zero moments), so an
    initialised-but-not-loaded optimizer steps exactly like a fresh one.
    """
    for g in opt.kind_groups():
        keys = state_keys(g["kind"])
        for p in g["params"]:
            if not keys:
                continue
            st = opt.state[p]
            if g["kind"] == ADAMW and "step" not in st:
                st["step"] = torch.zeros((), dtype=torch.float32)
            for k in keys:
                if k not in st:
                    st[k] = torch.zeros_like(p, memory_format=torch.preserve_format)


#: Megatron's per-group identifier keys (besides ``kind``): groups that agree on them take the same schedule
GROUP_IDENTITY = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr", "max_lr", "min_lr")


def _identity(group: dict) -> tuple:
    return (group.get("kind"), *(group.get(k) for k in GROUP_IDENTITY))


def match_groups(current: list[dict], saved: list[dict], kinds: tuple[str, ...]) -> list[dict]:
    """The saved groups' settings, one per current group, in current order.

    A checkpoint's groups are the ones the saving rank had; with pipeline parallelism that is the first stage's
    (Megatron stores the groups once), whose groups are another set or order of kinds than a later stage's. So a
    current group takes the settings of the saved group of the same kind and Megatron keys; a kind the saving
    rank did not have keeps the group's own (they come from the same config; the scheduler sets lr and weight
    decay every step). ``params`` stay at their positions: Megatron stores them per rank. A saved kind that is
    not one of this optimizer's (``kinds``) means another optimizer saved it, and is refused.
    """
    foreign = sorted({g["kind"] for g in saved if g.get("kind") is not None and g["kind"] not in kinds})
    if foreign:
        raise ValueError(f"megatron_patch: the checkpoint's optimizer param groups are of kind {', '.join(foreign)}, "
                         f"which this optimizer does not have ({', '.join(kinds)}); was it saved with another "
                         "optimizer?")
    if len(saved) != len(current) and all("kind" not in g for g in saved):
        raise ValueError(f"megatron_patch: checkpoint has {len(saved)} optimizer param groups, this run has "
                         f"{len(current)}; was it saved with another optimizer or model?")
    if [_identity(g) for g in saved] == [_identity(g) for g in current]:
        return saved
    by_identity: dict[tuple, dict] = {}
    for g in saved:
        by_identity.setdefault(_identity(g), g)
    out = []
    for i, cur in enumerate(current):
        source = by_identity.get(_identity(cur), cur)
        group = {k: v for k, v in source.items() if k != "params"}
        group["params"] = saved[i]["params"] if i < len(saved) else cur["params"]
        out.append(group)
    return out


class _GroupsByKind:
    def _filter_and_reorder_param_groups(self, current_groups: list[dict], state_dict_groups: list[dict]) -> list[dict]:
        return match_groups(current_groups, state_dict_groups, (ADAMW, *type(self.optimizer).MATRIX_KINDS))

    def load_state_dict(self, state_dict: dict) -> None:
        if "param_state_sharding_type" in state_dict:
            raise ValueError("megatron_patch: this optimizer checkpoint was saved with use_distributed_optimizer=True;"
                             " resume with the distributed optimizer too (any DP/TP size works)")
        super().load_state_dict(state_dict)


class SinkFP32Optimizer(_GroupsByKind, FP32Optimizer):
    """FP32Optimizer over SinkGD / SCALE / SWAN."""


class SinkFloat16Optimizer(_GroupsByKind, Float16OptimizerWithFloat16Params):
    """Float16OptimizerWithFloat16Params (bf16 model, fp32 main params) over SinkGD / SCALE / SWAN."""


@contextlib.contextmanager
def _accept_inner(cls: type) -> Iterator[None]:
    """Let DistributedOptimizer.__init__'s Adam-only isinstance check accept ``cls`` (0.16.1)."""
    import megatron.core.optimizer.distrib_optimizer as mod

    had = hasattr(mod, "Adam")
    orig = getattr(mod, "Adam", None)
    if had:
        mod.Adam = (orig, cls)
    try:
        yield
    finally:
        if had:
            mod.Adam = orig


class SinkDistributedOptimizer(DistributedOptimizer):
    """Megatron's DistributedOptimizer (sharded grads, params and our fallback state) over our optimizer."""

    def __init__(self, optimizer: MatrixOptimizer, *args: Any, **kwargs: Any):
        # Before DistributedOptimizer replaces the groups' params by this rank's shards: every model
        # param's kind, which fixes its state keys on every rank (holder of a shard or not).
        kinds = {p: g["kind"] for g in optimizer.param_groups for p in g["params"]}
        with _accept_inner(type(optimizer)):
            super().__init__(optimizer, *args, **kwargs)
        for attr in ("gbuf_ranges", "buffers", "model_param_group_index_map", "_get_model_param_range_map"):
            require(self, attr)
        self._kind_of = kinds

    # ----------------------------------------------------------------- non-parameter state
    def _adamw_step(self) -> float:
        """The AdamW fallback's step count, agreed over the data-parallel group (some ranks hold none)."""
        steps = [float(st["step"]) for g in self.optimizer.param_groups if g["kind"] == ADAMW
                 for p in g["params"] if "step" in (st := self.optimizer.state.get(p, {}))]
        t = torch.tensor([max(steps, default=0.0)])
        if dist.is_initialized() and self.data_parallel_group is not None:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.data_parallel_group)
        return float(t.item())

    def state_dict(self) -> dict:
        groups = [{k: v for k, v in g.items() if k not in ("params", LAYOUT_KEY)}
                  for g in self.optimizer.param_groups]
        step = self._adamw_step()
        for g in groups:
            g["step"] = step
        out: dict[str, Any] = {"optimizer": {"param_groups": groups}}
        if self.grad_scaler:
            out["grad_scaler"] = self.grad_scaler.state_dict()
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        if "param_state_sharding_type" not in state_dict or "optimizer" not in state_dict:
            raise ValueError("megatron_patch: this optimizer checkpoint was not saved with the distributed optimizer;"
                             " resume with use_distributed_optimizer=False (any DP/TP size works)")
        saved = match_groups(self.optimizer.param_groups, [dict(g) for g in state_dict["optimizer"]["param_groups"]],
                             (ADAMW, *type(self.optimizer).MATRIX_KINDS))
        init_state(self.optimizer)
        step = None
        for cur, old in zip(self.optimizer.param_groups, saved):
            step = old.pop("step", step)
            cur.update({k: v for k, v in old.items() if k not in ("params", LAYOUT_KEY)})
        if step is not None:
            for g in self.optimizer.param_groups:
                for p in g["params"]:
                    if "step" in self.optimizer.state.get(p, {}):
                        self.optimizer.state[p]["step"].fill_(step)
        if self.grad_scaler and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
        if "param_state" in state_dict:
            kind = state_dict.get("param_state_sharding_type")
            if kind != MODEL_SPACE:
                raise ValueError(f"megatron_patch: cannot load distributed-optimizer param state of type {kind!r}; "
                                 f"checkpoints of SinkGD/SCALE/SWAN use {MODEL_SPACE!r} (was this checkpoint "
                                 "saved with another optimizer?)")
            self._load_model_space(state_dict["param_state"])

    # ----------------------------------------------------------------- parameter state
    def _model_params(self) -> list[torch.Tensor]:
        """Every model param of this optimizer, in buffer order (the same on all data-parallel ranks)."""
        out = []
        for buf in self.buffers:
            out += [p for p, _ in sorted(buf.param_index_map.items(), key=lambda kv: kv[1][0])]
        return out

    def _local_tensors(self, model_param: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """This rank's flat pieces of the main param and its state, or None when it holds no piece."""
        if model_param not in self.model_param_group_index_map:
            return None
        gi, order = self.model_param_group_index_map[model_param]
        main = self.optimizer.param_groups[gi]["params"][order]
        st = self.optimizer.state.get(main, {})
        return {"param": main, **{k: st[k] for k in state_keys(self._kind_of[model_param])}}

    def sharded_state_dict(self, model_sharded_state_dict: Any = None, is_loading: bool = False,
                           sharding_type: str | None = None, metadata: dict | None = None) -> dict:
        """Our ``sinkgd_model_space`` layout, whatever ``metadata['distrib_optim_sharding_type']`` asks for
        (Megatron-LM asks for ``dp_reshardable``/``fully_reshardable``; see the module docstring)."""
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
        from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

        if is_loading:
            init_state(self.optimizer)
        state_dict = self.state_dict()
        model_sd, _ = extract_sharded_tensors_and_factories(model_sharded_state_dict or {})
        sharded_of = {sh.data: sh for sh in nested_values(model_sd)}
        group = self.data_parallel_group
        param_state = {}
        for idx, model_param in enumerate(self._model_params()):
            if model_param not in sharded_of:
                raise ValueError(f"megatron_patch: a model param of shape {tuple(model_param.shape)} is not in the "
                                 "model's sharded_state_dict (build it from the DDP-wrapped model chunks)")
            sh = sharded_of[model_param]
            local = self._local_tensors(model_param)
            rng = self._get_model_param_range_map(model_param)["param"] if local is not None else None
            tensors = {}
            for key in ("param", *state_keys(self._kind_of[model_param])):
                full = torch.zeros(model_param.numel(), dtype=torch.float32, device=model_param.device)
                if not is_loading:  # complete the TP-local tensor over DP: every element has one holder
                    if local is not None:
                        full[rng.start:rng.end] = local[key].detach().float()
                    if group is not None and dist.get_world_size(group=group) > 1:
                        dist.all_reduce(full, group=group)
                kw = dict(key=f"optimizer.state.{'fp32_param' if key == 'param' else key}.{sh.key}",
                          data=full.view(model_param.shape), replica_id=sh.replica_id)
                if not isinstance(sh, ShardedTensorFactory):
                    kw["dtype"] = torch.float32
                tensors[key] = replace(sh, **kw)
            param_state[idx] = tensors
        state_dict["param_state"] = param_state
        state_dict["param_state_sharding_type"] = MODEL_SPACE
        return state_dict

    @torch.no_grad()
    def _load_model_space(self, param_state: dict) -> None:
        params = self._model_params()
        if len(param_state) != len(params):
            raise ValueError(f"megatron_patch: checkpoint param state has {len(param_state)} entries, this "
                             f"optimizer has {len(params)} params")
        for idx, model_param in enumerate(params):
            local = self._local_tensors(model_param)
            if local is None:
                continue
            rng = self._get_model_param_range_map(model_param)["param"]
            for key, dst in local.items():
                dst.copy_(param_state[idx][key].reshape(-1)[rng.start:rng.end])

    def get_parameter_state_dp_zero(self, *args: Any, **kwargs: Any):
        raise NotImplementedError("megatron_patch: legacy dp_zero optimizer checkpoints are not supported; use "
                                  "distributed checkpoints (--ckpt-format torch_dist)")
