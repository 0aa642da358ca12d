"""Shared machinery of the matrix optimizers: parameter routing, layouts, AdamW fallback, safe steps.

Subclasses (SinkGD, SCALE, SWAN) only say which *kind* each parameter gets and how a kind turns a
gradient into an update; every kind that normalises rows/columns goes through
``sinkgd_ds.sinkhorn``. Integrations (DeepSpeed ZeRO, Megatron) never touch the math: they hand
this class a layout (``set_layout``) describing the pieces each inner tensor holds.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import torch
import torch.distributed as dist

from .. import backends
from .. import hparams as hp
from ..integrations.dtensor import dtensor_spec, is_dtensor, local_tensor
from ..layout import MatrixSpec, dense_spec
from ..rounding import SEED_LIMIT, StochasticRounding
from ..sinkhorn import CommStats, Direction, MatrixBatch, all_reduce_sum
from .adamw_fallback import adamw_step
from .step_hooks import hooked_step
from .verdict import SkipVerdict

log = logging.getLogger("sinkgd_ds")

ADAMW = "adamw"
# Names (regex, searched in the parameter's qualified name) that stay on AdamW, as in the papers:
# token/position embeddings and the LM head. 1-D parameters (norms, biases) always do.
DEFAULT_FALLBACK_PATTERNS = (r"embed", r"\bwte\b", r"\bwpe\b", r"lm_head", r"output_layer")
NAME_ATTR = "_sinkgd_name"  # integrations tag parameters with their module name here
LAYOUT_KEY = "layout_id"  # param-group key naming a group-level layout (set_layout(group_specs=...))
# param-group key counting the step() calls that included the group: the "step" of the stochastic-rounding hash.
# In the group (not a state tensor) so that every checkpoint that saves the inner optimizer's param groups
# (torch's state_dict, DeepSpeed's rigid and universal checkpoints, megatron_patch's) carries it.
ROUNDING_STEP_KEY = "rounding_step"
# group keys that torch, its LR schedulers and our integrations add to groups (accepted, never user settings)
MANAGED_KEYS = ("param_names", "initial_lr", "differentiable", LAYOUT_KEY, ROUNDING_STEP_KEY)
_ENGINE_GROUPS: ContextVar[bool] = ContextVar("sinkgd_ds_engine_groups", default=False)


@contextlib.contextmanager
def engine_param_groups() -> Iterator[None]:
    """Optimizers built inside this context keep one param group per (user group, kind).

    ZeRO flattens each param group into one buffer and Megatron's distributed optimizer shards each group
    on its own; a stateless matrix group and an AdamW group must not share a buffer (AdamW's moments would
    then cover the matrices too). The integrations build our optimizers inside this context; everywhere
    else ``param_groups`` are the user's own groups, as with torch's optimizers.
    """
    token = _ENGINE_GROUPS.set(True)
    try:
        yield
    finally:
        _ENGINE_GROUPS.reset(token)


def logical_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The shape a parameter has in the model, which is what routing must look at.

    Built inside ``deepspeed.zero.Init`` (ZeRO-3 models, HF ``from_pretrained`` under ZeRO-3) a
    parameter is a 1-D placeholder while it is partitioned; its model shape is ``ds_shape``.
    """
    shape = getattr(p, "ds_shape", None)
    if shape is not None:
        return tuple(int(s) for s in shape)
    if hasattr(p, "ds_id"):  # a ZeRO-3 parameter whose shape DeepSpeed did not record: do not guess
        raise ValueError(f"parameter {getattr(p, NAME_ATTR, '')!r} is partitioned by ZeRO-3 (ds_id={p.ds_id}) but "
                         "has no ds_shape, so whether it is a matrix cannot be decided; build the optimizer after "
                         "the model is fully constructed")
    return tuple(p.shape)


def tag_parameter_names(named_params: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Record qualified names on the tensors so routing works when only bare tensors reach us."""
    for name, p in named_params:
        if not hasattr(p, NAME_ATTR):
            setattr(p, NAME_ATTR, name)


class MatrixOptimizer(SkipVerdict, torch.optim.Optimizer):
    """Base class. ``params``: tensors, ``(name, tensor)`` pairs, or param-group dicts of either."""

    #: per-group keys every subclass accepts (their defaults come from the constructor)
    GROUP_KEYS = ("params", "lr", "lr_scale", "weight_decay", "betas", "eps", "kind")
    #: kinds a subclass may assign (besides ADAMW)
    MATRIX_KINDS: tuple[str, ...] = ()

    #: what a non-finite gradient skips: "step" (the whole step, every class) or "matrix" (subclasses that
    #: implement _step_matrices_skipping list it here)
    NONFINITE_MODES: tuple[str, ...] = ("step",)

    #: instance attributes that are configuration or counters (kept by copy.deepcopy and pickle); the rest are
    #: caches derived from these and from param_groups, rebuilt after a copy
    PERSISTENT = ("_where", "nonfinite", "fallback_patterns", "split_by_kind", "implementation", "stochastic_rounding",
                  "rounding_seed", "_skipped_steps", "_last_step_skipped", "last_skipped", "_layout_specs",
                  "_group_layouts", "_consensus_group")

    #: whether the class can keep a step's non-finite verdict on the device (SWAN's whitening reads its own)
    DEVICE_VERDICT = True
    #: whether the class handles matrices whose rows or columns are cut by tensor parallelism
    TENSOR_PARALLEL = True

    #: constructor options every subclass accepts besides its group keys
    OPTIONS = ("implementation", "stochastic_rounding", "rounding_seed")

    def __init__(self, params: Any, defaults: dict[str, Any], fallback_patterns: Sequence[str] | None = None,
                 nonfinite: str = "step", config: dict[str, Any] | None = None, implementation: str = "auto",
                 stochastic_rounding: bool = True, rounding_seed: int = 0):
        # Nothing is set on self before Optimizer.__init__: when the optimizer is built inside a function that
        # torch.compile traces, attributes stored before it are lost. Everything is checked first (on locals),
        # torch adds the groups as given, then _configure (run eagerly) sets the attributes and routes them.
        where = f"{type(self).__name__}()"
        nonfinite = hp.one_of(where, "nonfinite", nonfinite, self.NONFINITE_MODES)
        backends.check_implementation(where, implementation)
        hp.boolean(where, "stochastic_rounding", stochastic_rounding)
        hp.int_in_range(where, "rounding_seed", rounding_seed, 0, SEED_LIMIT - 1)
        if isinstance(defaults.get("betas"), list):  # (JSON configs give a list)
            defaults = {**defaults, "betas": tuple(defaults["betas"])}
        patterns = DEFAULT_FALLBACK_PATTERNS if fallback_patterns is None else fallback_patterns
        hp.regex_list(where, "fallback_patterns", patterns)
        self._validate_group(defaults, where)
        if isinstance(params, torch.Tensor):
            raise TypeError("params argument given to the optimizer should be an iterable of Tensors or dicts, but "
                            f"got {torch.typename(params)}")
        params = list(params)
        _check_naming(params, type(self).__name__)
        split = _ENGINE_GROUPS.get()
        super().__init__(params, defaults)
        self._configure(dict(nonfinite=nonfinite, fallback_patterns=tuple(patterns), split_by_kind=split,
                             implementation=implementation, stochastic_rounding=stochastic_rounding,
                             rounding_seed=rounding_seed, **(config or {})))

    @torch._disable_dynamo
    def _configure(self, config: dict[str, Any]) -> None:
        """The attributes, then every group again through our add_param_group (validated and routed)."""
        self._where = type(self).__name__
        self.__dict__.update(config)
        self._layout_specs: list[MatrixSpec] = []
        self._group_layouts: dict[int, list[MatrixSpec]] = {}
        self._consensus_group = None
        self._skipped_steps = 0
        self._last_step_skipped = False
        self.last_skipped: list[str] = []  # nonfinite="matrix": what the last step left unchanged
        self._reset_caches()
        self._add_groups_again()
        self._require_a_matrix()
        unnamed = [p for g in self.param_groups for p in g["params"]
                   if self._kind(g, p) != ADAMW and self._name(p) is None]
        if unnamed and not any(g.get("kind") for g in self.param_groups):
            log.warning("%s: %d matrix parameters came without names, so none can be recognised as an embedding "
                        "or LM head (those stay on AdamW in the papers). Pass model.named_parameters().",
                        self._where, len(unnamed))

    def _reset_caches(self, groups: Sequence[dict[str, Any]] = ()) -> None:
        """Everything derived (rebuilt after copy.deepcopy / unpickling, from ``groups``: the param groups once
        they exist; no attribute is probed for, so dynamo can trace the constructor)."""
        self._compile_patterns()
        self.last_comm = CommStats()
        self._names: dict[int, str] = {}
        self._kinds: dict[int, str] = {}
        self._index_layouts()
        self._dense_specs: dict[int, MatrixSpec] = {}
        self._shadows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._dtensor_specs: dict[int, tuple[torch.Tensor, MatrixSpec]] = {}  # id(param) -> (param, its layout)
        self._dtensor_of: dict[int, torch.Tensor] = {}  # id(local block) -> its DTensor parameter
        self._group_names: dict[int, list[str | None]] = {}  # id(group) -> names of its tagged bare tensors
        self._has_dtensors = any(is_dtensor(p) for g in groups for p in g["params"])
        self._verdict = torch.zeros(1)
        self._pending_skips: tuple[torch.Tensor, torch.Tensor] | None = None  # (skips not yet read, last verdict)
        self._device_mode = False
        for g in groups:  # names given as (name, tensor) pairs live in the groups
            for name, p in zip(g.get("param_names", ()), g["params"]):
                self._names[id(p)] = name
            if "param_names" not in g:  # tagged bare tensors: their names by position, for swapped parameters
                tags = [getattr(p, NAME_ATTR, None) for p in g["params"]]
                if any(t is not None for t in tags):
                    self._group_names[id(g)] = tags

    def _index_layouts(self) -> None:
        """``_layout_specs`` by owner tensor, and no prepared batch (they hold specs of the layout before)."""
        self._layouts: dict[int, list[MatrixSpec]] = {}
        for spec in self._layout_specs:
            self._layouts.setdefault(id(spec.owner), []).append(spec)
        self._batches: dict[tuple, MatrixBatch] = {}
        self._slices_checked = False  # (:meth:`_refuse_undescribed_slices` runs again on the next step)

    def _compile_patterns(self) -> None:
        self._fallback_re = hp.regex_list(self._where, "fallback_patterns", self.fallback_patterns)

    # ------------------------------------------------------------------ copies (torch keeps only 3 attributes)
    def __getstate__(self) -> dict[str, Any]:
        self._resolve_verdicts()
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in self.PERSISTENT if k in self.__dict__})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._reset_caches(self.param_groups)

    def __deepcopy__(self, memo: dict) -> MatrixOptimizer:
        """A copy with its own tensors and state that shares the process groups (communicators are never
        copied), so the copy of a sharded inner optimizer steps its copied partitions with the same layout."""
        for group in self._process_groups():
            memo[id(group)] = group
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    def __reduce_ex__(self, protocol):
        if any(isinstance(g, dist.ProcessGroup) for g in self._process_groups()):
            raise TypeError(f"{self._where}: this optimizer's layout (set by DeepSpeed / Megatron) holds process "
                            "groups, which cannot be pickled; save optimizer.state_dict() (or the engine's checkpoint)"
                            " instead, or copy.deepcopy it within the process")
        return super().__reduce_ex__(protocol)

    def _process_groups(self) -> list[object]:
        specs = [*self._layout_specs, *(s for g in self._group_layouts.values() for s in g),
                 *(c[1] for c in self._dtensor_specs.values())]
        groups = [self._consensus_group]
        for s in specs:
            for x in (s.shard_group, s.row_group, s.col_group):
                groups.extend(x if isinstance(x, tuple) else (x,))
        return list({id(g): g for g in groups if g is not None}.values())

    @classmethod
    def check_options(cls, where: str, **options: Any) -> None:
        """Validate constructor options before any model exists (configs are checked before a process group
        starts): the constructor's own checks, run on a probe matrix, with ``where`` naming the source."""
        probe = torch.nn.Parameter(torch.zeros(2, 2))
        try:
            cls([("probe.weight", probe)], **options)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    # ------------------------------------------------------------------ parameter routing
    def classify(self, name: str | None, p: torch.Tensor) -> str:
        """Kind of a parameter: ADAMW for vectors/embeddings/head, else a matrix kind. Subclasses override."""
        if len(logical_shape(p)) < 2 or self._is_fallback_name(name):
            return ADAMW
        return self.MATRIX_KINDS[0]

    def _is_fallback_name(self, name: str | None) -> bool:
        return name is not None and any(r.search(name) for r in self._fallback_re)

    def _name(self, p: torch.Tensor) -> str | None:
        name = self._names.get(id(p)) or getattr(p, NAME_ATTR, None)
        if name is None and "_where" in self.__dict__:
            # A parameter swapped into a group after construction (Accelerate's FSDP2 prepare() puts the sharded
            # DTensors in place of the originals): its name is still at its position, in torch's ``param_names``
            # or, for tagged bare tensors (the HF Trainer passes those), in ours.
            for g in self.param_groups:
                for q, n in zip(g["params"], g.get("param_names") or self._group_names.get(id(g), ())):
                    if q is p:
                        self._names[id(p)] = n
                        return n
        return name

    def _kind(self, group: dict[str, Any], p: torch.Tensor) -> str:
        """The kind that steps ``p``: its group's ``kind`` when set, else what :meth:`classify` says (cached)."""
        if group.get("kind"):
            return group["kind"]
        kind = self._kinds.get(id(p))
        if kind is None:
            kind = self._kinds[id(p)] = self.classify(self._name(p), p)
        return kind

    def param_kinds(self) -> dict[str, str]:
        """Every parameter's kind, by name (else shape): which update rule steps it."""
        return {self._label(p): self._kind(g, p) for g in self.param_groups for p in g["params"]}

    @torch._disable_dynamo
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, validated, with the parameters' kinds decided here.

        Parameters may be tensors or ``(name, tensor)`` pairs (torch then keeps ``param_names``), the same
        in every group. With :attr:`split_by_kind` the group is added as one group per kind, in order, of bare
        tensors.
        """
        if "_where" not in self.__dict__:  # inside Optimizer.__init__: _configure adds every group again
            super().add_param_group(param_group)
            return
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        self._slices_checked = False
        param_group = {ROUNDING_STEP_KEY: 0, **param_group}  # (a new group starts counting; a re-added one goes on)
        where = f"{self._where} param group {len(self.param_groups)}"
        if "params" not in param_group:
            raise ValueError(f"{where}: a param group needs a 'params' key")
        self._validate_group(param_group, where)
        items = param_group["params"]
        if isinstance(items, set):
            raise TypeError(f"{where}: parameters must be an ordered collection (a set's order changes between "
                            "runs); use a list")
        items = [items] if isinstance(items, torch.Tensor) else list(items)
        named = [isinstance(it, tuple) for it in items]
        has_names = [("param_names" in g) for g in self.param_groups]
        if any(named) and not all(named) or (not self.split_by_kind and has_names and items
                                             and has_names[0] != named[0]):
            raise ValueError(f"{where}: named ((name, tensor) pairs) and unnamed parameters are mixed in one "
                             "optimizer; pass model.named_parameters() everywhere, or bare tensors everywhere")
        pairs = [it if isinstance(it, tuple) else (getattr(it, NAME_ATTR, None), it) for it in items]
        for pname, p in pairs:
            if not isinstance(pname, (str, type(None))) or not isinstance(p, torch.Tensor):
                raise TypeError(f"{where}: optimizer can only optimize Tensors (or (name, Tensor) pairs), but one "
                                f"of the params is {type(p).__name__}")
            if pname is not None:
                self._names[id(p)] = pname
            kind = self._kind(param_group, p)
            if is_dtensor(p):
                self._check_dtensor(where, p, kind)
            if kind != ADAMW and p.is_complex():
                raise ValueError(f"{where}: parameter {self._label(p)!r} is complex ({p.dtype}); {self._where}'s "
                                 f"{kind} update is defined for real matrices only. Give it kind 'adamw' (AdamW on "
                                 "its real and imaginary parts, as torch's AdamW does) or view it as real")
        if not self.split_by_kind:
            super().add_param_group({**param_group, "params": items})
            if not any(named) and any(name is not None for name, _ in pairs):  # (tagged bare tensors)
                self._group_names[id(self.param_groups[-1])] = [name for name, _ in pairs]
            return
        # (bare tensors: the engines replace a group's tensors by flat partitions, which names would not fit;
        # the names stay known to this optimizer for routing and messages)
        by_kind: dict[str, list[torch.Tensor]] = {}
        for _, p in pairs:
            by_kind.setdefault(self._kind(param_group, p), []).append(p)
        for kind, tensors in by_kind.items():
            super().add_param_group({**param_group, "params": tensors, "kind": kind})

    def split_param_groups_by_kind(self) -> None:
        """Turn the user's groups into one group per (group, kind), for an engine that shards per group
        (a client optimizer handed to DeepSpeed). Only before the first step."""
        if self.split_by_kind:
            return
        if any(self.state.values()) or any("initial_lr" in g for g in self.param_groups):
            raise RuntimeError(f"{self._where}: its param groups are split per kind for DeepSpeed, which must happen "
                               "before the first step and before an LR scheduler is attached; build the scheduler "
                               "after deepspeed.initialize (or in the DeepSpeed config)")
        self.split_by_kind = True
        self._add_groups_again()

    def _add_groups_again(self) -> None:
        """Every current group through add_param_group once more, its names given back as (name, tensor) pairs."""
        groups, self.param_groups = self.param_groups, []
        for g in groups:
            g = dict(g)
            names = g.pop("param_names", None)
            if names is not None:
                g["params"] = list(zip(names, g["params"]))
            self.add_param_group(g)

    def _require_a_matrix(self) -> None:
        if any(self._kind(g, p) != ADAMW for g in self.param_groups for p in g["params"]):
            return
        count = sum(len(g["params"]) for g in self.param_groups)
        raise ValueError(
            f"{self._where}: none of the {count} parameters is a matrix that {self._where} normalises (every one "
            "is 1-D or an embedding / LM head by name), so all of them would be trained by the AdamW fallback. "
            "If that is what you want, use torch.optim.AdamW; if the model has matrices, pass its parameters "
            "(under deepspeed.zero.Init they are routed by ds_shape)")

    def kind_groups(self) -> list[dict[str, Any]]:
        """The step's work list: one group per kind. A user group that mixes kinds is viewed as one group per
        kind, in order of first appearance, each a copy of the group's settings (so an engine-split optimizer and
        a mirrored one run the same groups in the same order)."""
        out = []
        for group in self.param_groups:
            if group.get("kind"):
                out.append(group)
                continue
            by_kind: dict[str, list[torch.Tensor]] = {}
            for p in group["params"]:
                by_kind.setdefault(self._kind(group, p), []).append(p)
            for kind, ps in by_kind.items():
                out.append({**group, "params": ps, "kind": kind})
        return out

    def _validate_group(self, g: dict[str, Any], where: str) -> None:
        allowed = self.GROUP_KEYS if "params" in g else set(self.GROUP_KEYS) - {"params"}
        hp.check_known_keys(where, {k: v for k, v in g.items() if k not in MANAGED_KEYS}, allowed)
        for key, value in g.items():
            if key in MANAGED_KEYS:
                continue
            if key == "lr":
                hp.warn_above(where, key, hp.learning_rate(where, key, value), 1.0,
                              "the papers' global lr is 0.02 (matrices step lr * lr_scale)")
            elif key == "weight_decay":
                hp.non_negative(where, key, value)
            elif key in ("lr_scale", "eps"):
                hp.positive(where, key, value)
                if key == "lr_scale":
                    hp.warn_above(where, key, value, 1.0, "matrices step lr * lr_scale; the papers use 0.05")
            elif key == "betas":
                hp.betas_pair(where, key, value)
            elif key == "kind" and value is not None and value not in (ADAMW, *self.MATRIX_KINDS):
                raise ValueError(f"{where}: kind={value!r} is not allowed; use one of "
                                 f"{', '.join((ADAMW, *self.MATRIX_KINDS))}")
            else:
                self._validate_extra(where, key, value)
        lr = g.get("lr")
        lr = lr.item() if isinstance(lr, torch.Tensor) and lr.numel() == 1 else lr
        if isinstance(lr, (int, float)) and isinstance(g.get("weight_decay"), (int, float)):
            hp.decay_factor(where, lr, g["weight_decay"])

    def _validate_extra(self, where: str, key: str, value: Any) -> None:
        """Subclass hook for its own keys."""

    # ------------------------------------------------------------------ layouts
    def set_layout(self, specs: Iterable[MatrixSpec], consensus_group: object | None = None,
                   group_specs: dict[int, Sequence[MatrixSpec]] | None = None) -> None:
        """Describe the pieces this rank's inner tensors hold (called by integrations).

        Replaces the dense default for every owner tensor named by the specs. ``consensus_group``:
        ranks that must agree on skipping a step with non-finite gradients (one 1-element
        all-reduce per step; the normalisation statistics themselves are not affected).
        ``group_specs``: param-group index -> the complete, rank-independent list of that group's
        matrices. Needed where a rank may hold no tensor of a group yet must join its collectives
        (Megatron's distributed optimizer); the index is stored in the group under LAYOUT_KEY so it
        survives ``load_state_dict`` and ``{**group}`` copies.
        """
        if self.nonfinite != "step":
            raise ValueError(f"{self._where}: nonfinite={self.nonfinite!r} is only supported for unsharded parameters "
                             "(plain torch, DDP); under DeepSpeed or Megatron use nonfinite='step' (the default), "
                             "which skips the whole step on every rank alike")
        self._layout_specs = list(specs)
        if not self.TENSOR_PARALLEL:
            for spec in [*self._layout_specs, *(s for gs in (group_specs or {}).values() for s in gs)]:
                if spec.row_group is not None or spec.col_group is not None:
                    cut = "rows" if spec.col_group is not None else "columns"
                    raise ValueError(f"{self._where}: {spec.name!r} is a tensor-parallel slice (some {cut} of the "
                                     f"{spec.global_shape[0]} x {spec.global_shape[1]} matrix); {self._where} needs "
                                     "whole rows and columns (its whitening), so it is refused: use SinkGD or SCALE, "
                                     "or no tensor parallelism")
        self._group_layouts = {}
        self._index_layouts()
        for idx, gspecs in (group_specs or {}).items():
            self.param_groups[idx][LAYOUT_KEY] = idx
            self._group_layouts[idx] = list(gspecs)
        self._consensus_group = consensus_group

    def matrix_specs(self, group: dict[str, Any]) -> list[MatrixSpec]:
        if group.get(LAYOUT_KEY) in self._group_layouts:
            return list(self._group_layouts[group[LAYOUT_KEY]])
        specs: list[MatrixSpec] = []
        for p in group["params"]:
            if id(p) in self._layouts:
                specs.extend(self._layouts[id(p)])
            elif is_dtensor(p):
                specs.append(self._dtensor_spec(p))
            elif p.dim() >= 2:
                specs.append(self._dense_spec(p))
            else:
                raise RuntimeError(
                    f"{self._where}: a {group['kind']} group holds a 1-D tensor of {p.numel()} elements with no "
                    "layout. This is a flattened partition (ZeRO / distributed optimizer) whose matrix structure "
                    "was not registered: import sinkgd_ds before deepspeed.initialize / use megatron_patch.")
        return specs

    def _label(self, p: torch.Tensor) -> str:
        """How messages and ``last_skipped`` name a parameter: its model name, else its shape."""
        return self._name(p) or f"<{tuple(p.shape)} tensor>"

    def _dense_spec(self, p: torch.Tensor) -> MatrixSpec:
        """The trivial layout of a whole parameter, built once (its segments cost ~0.2 ms/step to recompute).

        A non-contiguous parameter (e.g. a transposed view) gets a contiguous stand-in: the engine works on the
        stand-in, loaded from the parameter here and written back after the step (:meth:`_store_shadows`)."""
        cached = self._dense_specs.get(id(p))
        if cached is None or cached[0] is not p or cached[1].fragments[0].numel != p.numel() \
                or (cached[1].owner is p) != p.is_contiguous():
            target = p if p.is_contiguous() else torch.empty(p.shape, dtype=p.dtype, device=p.device)
            cached = self._dense_specs[id(p)] = (p, dense_spec(target, self._label(p)))
        spec = cached[1]
        if spec.owner is not p:
            self._load_shadow(p, spec.owner)
        return spec

    def _check_dtensor(self, where: str, p: torch.Tensor, kind: str) -> None:
        """A DTensor parameter (FSDP2, torch tensor parallelism): its layout is read from its placements (any
        placement it cannot complete sums over is refused now, before training starts)."""
        if self.nonfinite != "step":
            raise ValueError(f"{where}: nonfinite={self.nonfinite!r} needs unsharded parameters; {self._label(p)!r} "
                             "is a DTensor (use nonfinite='step', which skips the whole step on every rank alike)")
        if kind != ADAMW:
            try:
                spec = dtensor_spec(self._label(p), p)  # (raises with the parameter and the placement)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            if not self.TENSOR_PARALLEL and (spec.row_group is not None or spec.col_group is not None):
                raise ValueError(f"{where}: parameter {self._label(p)!r} has placements {p.placements}: its columns "
                                 f"are cut over a mesh dimension (tensor parallelism), which {self._where} does not "
                                 "support (it needs whole rows and columns); shard it only along dim 0 (FSDP, HSDP)")
        self._has_dtensors = True

    def _dtensor_spec(self, p: torch.Tensor) -> MatrixSpec:
        """The layout of a DTensor matrix (built once), with this step's local gradient attached to the local
        block the engine works on (released after the step)."""
        cached = self._dtensor_specs.get(id(p))
        local = local_tensor(p)
        if cached is None or cached[0] is not p or cached[1].owner is not local:
            cached = self._dtensor_specs[id(p)] = (p, dtensor_spec(self._label(p), p))
            self._dtensor_of[id(local)] = p
        local.grad = None if p.grad is None else local_tensor(p.grad)
        self.state[p]  # noqa: B018 - an (empty) entry: torch.distributed.checkpoint's set_state_dict wants one for
        # every parameter that requires grad, so the stateless matrices round-trip as empty states
        return cached[1]

    def _release_dtensor_grads(self) -> None:
        for _param, spec in self._dtensor_specs.values():
            spec.owner.grad = None

    def _param_of(self, t: torch.Tensor) -> torch.Tensor:
        """The parameter a tensor the engine sees stands for: a DTensor for its local block, else itself."""
        return self._dtensor_of.get(id(t), t)

    def _load_shadow(self, p: torch.Tensor, shadow: torch.Tensor) -> None:
        with torch.no_grad():
            shadow.copy_(p)
        shadow.grad = None if p.grad is None else p.grad.contiguous()
        if p in self.state:  # state is looked up by the tensor the engine sees (SCALE's head momentum)
            self.state[shadow] = self.state[p]
        self._shadows[id(shadow)] = (p, shadow)

    def _store_shadows(self, applied: bool) -> None:
        """After a step: write the stand-ins' new values into their non-contiguous parameters."""
        for p, shadow in self._shadows.values():
            if applied:
                with torch.no_grad():
                    p.copy_(shadow)
            self.state.pop(shadow, None)
            shadow.grad = None
        self._shadows.clear()

    def matrix_batch(self, specs: Sequence[MatrixSpec], direction: Direction) -> MatrixBatch:
        """The engine's prepared form of ``specs`` (kept across steps: rebuilding it costs ~20 us per matrix)."""
        key = (direction, *map(id, specs))  # a batch holds its specs, so their ids stay theirs
        batch = self._batches.get(key)
        if batch is None:
            if len(self._batches) >= 32:  # e.g. the set of matrices with gradients keeps changing
                self._batches.clear()
            batch = self._batches[key] = MatrixBatch(specs, direction, implementation=self.implementation)
        return batch

    # ------------------------------------------------------------------ AdamW fallback
    def _adamw_prepare(self, group: dict[str, Any]) -> list[torch.Tensor]:
        return [p for p in group["params"] if p.grad is not None]

    def _adamw_apply(self, group: dict[str, Any], params: list[torch.Tensor],
                     found_inf: torch.Tensor | None = None) -> None:
        adamw_step(self.state, group, params, found_inf, self.rounding(group), self._label)

    # ------------------------------------------------------------------ the step
    @hooked_step
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            self._step()
        finally:
            if self._dtensor_specs:
                self._release_dtensor_grads()
        for group in self.param_groups:  # (skipped steps count too: every rank counts alike)
            group[ROUNDING_STEP_KEY] = group.get(ROUNDING_STEP_KEY, 0) + 1
        return loss

    def rounding(self, group: dict[str, Any]) -> StochasticRounding | None:
        """How this step rounds updates written into bf16 tensors of ``group``: stochastically, keyed by the
        optimizer's seed and the group's step counter, or (None) to nearest."""
        if not self.stochastic_rounding:
            return None
        return StochasticRounding(self.rounding_seed, group.get(ROUNDING_STEP_KEY, 0))

    def _refuse_undescribed_slices(self, groups: Sequence[dict[str, Any]]) -> None:
        """Never normalise a tensor-parallel slice as if it were the whole matrix: a weight that DeepSpeed (AutoTP)
        or Megatron marked ``tensor_model_parallel`` and that no integration described is refused by name before
        anything is written (once per layout)."""
        if self._slices_checked:
            return
        for group in groups:
            if group["kind"] == ADAMW or group.get(LAYOUT_KEY) in self._group_layouts:
                continue
            for p in group["params"]:
                if _marked_slice(p) and id(p) not in self._layouts and not is_dtensor(p):
                    raise ValueError(
                        f"{self._where}: parameter {self._label(p)!r} is a tensor-parallel slice (tensor_model_parallel"
                        f"=True, shape {tuple(p.shape)}) that no engine integration described, so its row and column "
                        "sums would miss the other ranks' slices; refused. Let DeepSpeed (deepspeed.initialize, AutoTP "
                        "or an mpu) or Megatron (megatron_patch) build the layout, or route it to AdamW "
                        "(fallback_patterns)")
        self._slices_checked = True

    def _step(self) -> None:
        self.last_comm = CommStats()
        groups = self.kind_groups()
        self._refuse_undescribed_slices(groups)
        if not self._has_dtensors:  # (parameters may be swapped for DTensors after construction: Accelerate)
            self._has_dtensors = any(is_dtensor(g["params"][0]) for g in groups if g["params"])
        self._device_mode = self.nonfinite == "step" and self._verdict_on_device(groups)
        if self._device_mode:
            self._step_verdict_on_device(groups)
            return
        if self.nonfinite == "matrix":
            self._step_skipping()
            self._store_shadows(applied=True)  # (a skipped matrix's stand-in still holds its old values)
            return
        # The last group's verdict completes the step's when every earlier one is clean and no other rank has a
        # say; that group may then write its update in the same pass (plan["applied"]), e.g. one native call.
        alone = self._consensus() is None or not dist.is_initialized()
        last = len(groups) - 1
        plans: list[dict[str, Any]] = []
        bad = False
        for i, group in enumerate(groups):
            plans.append(self._prepare(group, final=alone and i == last and not bad))
            bad = bad or plans[-1].get("nonfinite", False)
        bad = self._agree(bad)
        self.last_step_skipped = bad
        if bad:
            self._store_shadows(applied=False)
            self.skipped_steps += 1
            log.warning("%s: non-finite gradients, step skipped (no weight or state changed; %d skipped so far)",
                        self._where, self.skipped_steps)
            return
        for group, plan in zip(groups, plans):
            if not plan.get("applied", False):
                self._apply(group, plan)
        self._store_shadows(applied=True)

    def _verdict_on_device(self, groups: Sequence[dict[str, Any]]) -> bool:
        """Keep the verdict on the device: parameters on a GPU, or the Triton backend asked for (which is how the
        path is tested on CPU, under Triton's interpreter)."""
        if not self.DEVICE_VERDICT:
            return False
        if self.implementation == "triton":
            return True
        for group in groups:
            for p in group["params"]:
                return p.device.type != "cpu"
        return False

    def _step_verdict_on_device(self, groups: Sequence[dict[str, Any]]) -> None:
        """The whole-step skip without a host read: every group's flag (a 0-dim device tensor) is combined and,
        with other ranks, all-reduced on the device; every write (matrix kernels, fused AdamW's ``found_inf``, the
        head momentum) is gated by it. ``last_step_skipped`` / ``skipped_steps`` read it when asked."""
        plans = [self._prepare(group) for group in groups]
        flags = [plan["flag"] for plan in plans if plan["flag"] is not None]
        device = next((f.device for f in flags if f.device.type != "cpu"), flags[0].device if flags else "cpu")
        verdict = torch.stack([f.to(device) for f in flags]).amax().reshape(1) if flags else \
            torch.zeros(1, device=device)
        group = self._consensus()
        if group is not None and dist.is_initialized():
            all_reduce_sum(verdict, group)
        verdict = verdict.reshape(())
        for group, plan in zip(groups, plans):
            self._apply(group, plan, gate=verdict)
        skip = (verdict > 0).float()
        pending = self._pending_skips
        self._pending_skips = (skip.clone() if pending is None else pending[0].add_(skip), skip)
        for p, shadow in self._shadows.values():  # (non-contiguous parameters: their stand-ins, gated)
            with torch.no_grad():
                p.copy_(torch.where(skip > 0, p, shadow))
        self._store_shadows(applied=False)

    def _step_skipping(self) -> None:
        """nonfinite="matrix": every group steps on its own; a matrix (or fallback parameter) whose gradient is
        non-finite is left unchanged, weights and state, and named in ``last_skipped``."""
        skipped: list[str] = []
        for group in self.kind_groups():
            if group["kind"] != ADAMW:
                skipped += self._step_matrices_skipping(group)
                continue
            params = self._adamw_prepare(group)
            finite = self._finite_flags([p.grad for p in params])
            skipped += [self._label(p) for p, ok in zip(params, finite) if not ok]
            self._adamw_apply(group, [p for p, ok in zip(params, finite) if ok])
        self.last_skipped = skipped
        self.last_step_skipped = bool(skipped)
        if skipped:
            self.skipped_steps += 1
            log.warning("%s: non-finite gradients in %s; those were left unchanged (%d steps with skips so far)",
                        self._where, ", ".join(skipped[:8]) + (" ..." if len(skipped) > 8 else ""),
                        self.skipped_steps)

    def _step_matrices_skipping(self, group: dict[str, Any]) -> list[str]:
        """nonfinite="matrix" for a matrix group: update the matrices with finite gradients, return the others'
        names."""
        raise NotImplementedError

    def _prepare(self, group: dict[str, Any], final: bool = False) -> dict[str, Any]:
        """Phase 1 (collectives allowed, no writes): statistics and the non-finite verdict. ``final``: this
        verdict completes the step's and every earlier one was clean, so a clean group may already write its
        update (and say so with ``"applied": True``); a non-finite one must write nothing."""
        if group["kind"] == ADAMW:
            params = self._adamw_prepare(group)
            if self._device_mode:
                return {"params": params, "flag": self._nonfinite_flag([p.grad for p in params])}
            return {"params": params, "nonfinite": self._local_nonfinite(p.grad for p in params)}
        return self._prepare_matrices(group, final)

    def _apply(self, group: dict[str, Any], plan: dict[str, Any], gate: torch.Tensor | None = None) -> None:
        """Phase 2 (only when every rank agreed the step is finite, or gated by ``gate``, the verdict on the
        device): write weights and state."""
        if group["kind"] == ADAMW:
            self._adamw_apply(group, plan["params"], found_inf=gate)
        else:
            self._apply_matrices(group, plan, gate)

    def _prepare_matrices(self, group: dict[str, Any], final: bool = False) -> dict[str, Any]:
        """Statistics and verdict of a matrix group: ``"nonfinite"`` (a bool), or in device mode ``"flag"``."""
        raise NotImplementedError

    def _apply_matrices(self, group: dict[str, Any], plan: dict[str, Any], gate: torch.Tensor | None = None) -> None:
        """Write the group's update; ``gate`` (device mode): a 0-dim tensor, nonzero = write nothing."""
        raise NotImplementedError


def _marked_slice(p: torch.Tensor) -> bool:
    """Marked as a tensor-parallel slice, by DeepSpeed (AutoTP, only when it cuts over several ranks) or Megatron
    (which marks its parallel layers' weights at every TP size: a TP size of 1 cuts nothing)."""
    if not getattr(p, "tensor_model_parallel", False):
        return False
    state = sys.modules.get("megatron.core.parallel_state")
    if state is not None and not hasattr(p, "ds_autotp_universal_checkpoint_meta"):
        try:
            return state.get_tensor_model_parallel_world_size() != 1
        except (AssertionError, AttributeError, RuntimeError):  # (Megatron's groups not initialised)
            return True
    return True


def _check_naming(params: list, owner: str) -> None:
    """All parameters named ((name, tensor) pairs) or none, across every group (torch checks within one)."""
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    kinds = set()
    for g in groups:
        items = g.get("params", []) if isinstance(g, dict) else []
        items = [items] if isinstance(items, torch.Tensor) else items
        if isinstance(items, (list, tuple)):
            kinds.update(isinstance(it, tuple) for it in items)
    if len(kinds) > 1:
        raise ValueError(f"{owner}: named ((name, tensor) pairs) and unnamed parameters are mixed in one optimizer; "
                         "pass model.named_parameters() everywhere, or bare tensors everywhere")


def matrix_step_size(group: dict[str, Any]) -> float:
    """The step a matrix takes: the group's lr (which schedulers set) times its lr_scale. A tensor lr (torch's
    optimizers accept a 1-element one) is read here as a number: every backend takes the step as a scalar."""
    lr = group["lr"]
    return (lr.item() if isinstance(lr, torch.Tensor) else lr) * group["lr_scale"]


def grad_of(t: torch.Tensor) -> torch.Tensor:
    """Direction callback for the engine: the tensor's gradient."""
    return t.grad


def has_grad(spec: MatrixSpec) -> bool:
    if spec.owner.grad is None:
        return False
    for f in spec.fragments:  # (a loop, not all(<generator>): this runs for every matrix of every step)
        if f.tensor.grad is None:
            return False
    return True
