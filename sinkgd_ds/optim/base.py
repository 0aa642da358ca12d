"""Shared machinery of the matrix optimizers: parameter routing, layouts, AdamW fallback, safe steps.

Subclasses (SinkGD, SCALE, SWAN) only say which *kind* each parameter gets and how a kind turns a
gradient into an update; every kind that normalises rows/columns goes through
``sinkgd_ds.sinkhorn``. Integrations (DeepSpeed ZeRO, Megatron) never touch the math: they hand
this class a layout (``set_layout``) describing the pieces each inner tensor holds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from .. import hparams as hp
from ..layout import MatrixSpec, dense_spec
from ..sinkhorn import CommStats, Direction, MatrixBatch, all_reduce_sum
from .step_hooks import hooked_step

log = logging.getLogger("sinkgd_ds")

ADAMW = "adamw"
# Names (regex, searched in the parameter's qualified name) that stay on AdamW, as in the papers:
# token/position embeddings and the LM head. 1-D parameters (norms, biases) always do.
DEFAULT_FALLBACK_PATTERNS = (r"embed", r"\bwte\b", r"\bwpe\b", r"lm_head", r"output_layer")
NAME_ATTR = "_sinkgd_name"  # integrations tag parameters with their module name here
LAYOUT_KEY = "layout_id"  # param-group key naming a group-level layout (set_layout(group_specs=...))


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


class MatrixOptimizer(torch.optim.Optimizer):
    """Base class. ``params``: tensors, ``(name, tensor)`` pairs, or param-group dicts of either."""

    #: per-group keys every subclass accepts (their defaults come from the constructor)
    GROUP_KEYS = ("params", "lr", "lr_scale", "weight_decay", "betas", "eps", "kind")
    #: kinds a subclass may assign (besides ADAMW)
    MATRIX_KINDS: tuple[str, ...] = ()

    #: what a non-finite gradient skips: "step" (the whole step, every class) or "matrix" (subclasses that
    #: implement _step_matrices_skipping list it here)
    NONFINITE_MODES: tuple[str, ...] = ("step",)

    def __init__(self, params: Any, defaults: dict[str, Any], fallback_patterns: Sequence[str] | None = None,
                 nonfinite: str = "step"):
        name = type(self).__name__
        self._where = name
        self.nonfinite = hp.one_of(f"{name}()", "nonfinite", nonfinite, self.NONFINITE_MODES)
        self.last_skipped: list[str] = []  # nonfinite="matrix": what the last step left unchanged
        self._fallback_re = hp.regex_list(f"{name}()", "fallback_patterns",
                                          DEFAULT_FALLBACK_PATTERNS if fallback_patterns is None else fallback_patterns)
        self._names: dict[int, str] = {}
        self._layouts: dict[int, list[MatrixSpec]] = {}
        self._group_layouts: dict[int, list[MatrixSpec]] = {}
        self._dense_specs: dict[int, MatrixSpec] = {}
        self._batches: dict[tuple, MatrixBatch] = {}
        self._consensus_group = None
        self.skipped_steps = 0
        self.last_step_skipped = False
        self.last_comm = CommStats()
        self._validate_group(defaults, f"{name}()")
        super().__init__(self._route(params, defaults), defaults)

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

    def _route(self, params: Any, defaults: dict[str, Any]) -> list[dict[str, Any]]:
        if isinstance(params, torch.Tensor):
            raise ValueError(f"{self._where}: params must be an iterable of tensors or dicts, got a single tensor")
        raw = list(params)
        if not raw:
            raise ValueError(f"{self._where}: got an empty parameter list")
        groups = raw if isinstance(raw[0], dict) else [{"params": raw}]
        routed: list[dict[str, Any]] = []
        unnamed_matrices = 0
        for gi, g in enumerate(groups):
            if not isinstance(g, dict) or "params" not in g:
                raise ValueError(f"{self._where}: param group {gi} must be a dict with a 'params' key")
            self._validate_group(g, f"{self._where} param group {gi}")
            items = g["params"]
            items = [items] if isinstance(items, torch.Tensor) else list(items)
            by_kind: dict[str, list[torch.Tensor]] = {}
            for item in items:
                if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                    pname, p = item
                else:
                    pname, p = getattr(item, NAME_ATTR, None), item
                if not isinstance(p, torch.Tensor):
                    raise ValueError(f"{self._where}: param group {gi} holds a {type(p).__name__}, not a tensor")
                if pname is not None:
                    self._names[id(p)] = pname
                # (an explicit kind is the caller's: a flat partition whose layout set_layout will describe)
                kind = g.get("kind") or self.classify(pname, p)
                if not g.get("kind") and kind != ADAMW and pname is None:
                    unnamed_matrices += 1
                by_kind.setdefault(kind, []).append(p)
            for kind, ps in by_kind.items():
                group = {k: v for k, v in g.items() if k != "params"}
                group.update(params=ps, kind=kind)
                routed.append(group)
        if not any(g["kind"] != ADAMW for g in routed):
            count = sum(len(g["params"]) for g in routed)
            raise ValueError(
                f"{self._where}: none of the {count} parameters is a matrix that {self._where} normalises (every one "
                "is 1-D or an embedding / LM head by name), so all of them would be trained by the AdamW fallback. "
                "If that is what you want, use torch.optim.AdamW; if the model has matrices, pass its parameters "
                "(under deepspeed.zero.Init they are routed by ds_shape)")
        if unnamed_matrices:
            log.warning(
                "%s: %d matrix parameters came without names, so none can be recognised as an embedding "
                "or LM head (those stay on AdamW in the papers). Pass model.named_parameters().",
                self._where, unnamed_matrices,
            )
        return routed

    def _validate_group(self, g: dict[str, Any], where: str) -> None:
        hp.check_known_keys(where, g, self.GROUP_KEYS if "params" in g else set(self.GROUP_KEYS) - {"params"})
        for key, value in g.items():
            if key in ("lr", "weight_decay"):
                hp.non_negative(where, key, value)
                if key == "lr":
                    hp.warn_above(where, key, value, 1.0, "the papers' global lr is 0.02 (matrices step lr * lr_scale)")
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
        if isinstance(g.get("lr"), (int, float)) and isinstance(g.get("weight_decay"), (int, float)):
            hp.decay_factor(where, g["lr"], g["weight_decay"])

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
        self._layouts = {}
        self._batches = {}
        for spec in specs:
            self._layouts.setdefault(id(spec.owner), []).append(spec)
        self._group_layouts = {}
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
        return self._names.get(id(p)) or f"<{tuple(p.shape)} tensor>"

    def _dense_spec(self, p: torch.Tensor) -> MatrixSpec:
        """The trivial layout of a whole parameter, built once (its segments cost ~0.2 ms/step to recompute)."""
        spec = self._dense_specs.get(id(p))
        if spec is None or spec.owner is not p or spec.fragments[0].numel != p.numel():
            if not p.is_contiguous():
                raise ValueError(f"{self._where}: parameter {self._label(p)!r} must be contiguous")
            spec = self._dense_specs[id(p)] = dense_spec(p, self._label(p))
        return spec

    def matrix_batch(self, specs: Sequence[MatrixSpec], direction: Direction) -> MatrixBatch:
        """The engine's prepared form of ``specs`` (kept across steps: rebuilding it costs ~20 us per matrix)."""
        key = (direction, *map(id, specs))  # a batch holds its specs, so their ids stay theirs
        batch = self._batches.get(key)
        if batch is None:
            if len(self._batches) >= 32:  # e.g. the set of matrices with gradients keeps changing
                self._batches.clear()
            batch = self._batches[key] = MatrixBatch(specs, direction)
        return batch

    # ------------------------------------------------------------------ AdamW fallback
    def _adamw_prepare(self, group: dict[str, Any]) -> list[torch.Tensor]:
        return [p for p in group["params"] if p.grad is not None]

    def _adamw_apply(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        if not params:
            return
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        b1, b2 = group["betas"]
        grads, m, v, steps = [], [], [], []
        for p in params:
            st = self.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["step"] += 1
            grads.append(p.grad if p.grad.dtype == p.dtype else p.grad.to(p.dtype))
            m.append(st["exp_avg"])
            v.append(st["exp_avg_sq"])
            steps.append(float(st["step"]))
        if wd:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_lerp_(m, grads, 1.0 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, 1.0 - b2)
        for p, mi, vi, t in zip(params, m, v, steps):
            bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t
            denom = (vi.sqrt() / (bc2**0.5)).add_(eps)
            p.addcdiv_(mi, denom, value=-lr / bc1)

    # ------------------------------------------------------------------ the step
    @staticmethod
    def _finite_flags(tensors: Sequence[torch.Tensor]) -> list[bool]:
        """Whether each tensor is all finite (one host sync for all of them)."""
        return torch.stack([torch.isfinite(t).all() for t in tensors]).tolist() if tensors else []

    def _local_nonfinite(self, tensors: Iterable[torch.Tensor]) -> bool:
        return not all(self._finite_flags([t for t in tensors if t is not None]))

    def _agree(self, bad: bool) -> bool:
        if self._consensus_group is None or not dist.is_initialized():
            return bad
        flag = torch.tensor([1.0 if bad else 0.0])
        all_reduce_sum(flag, self._consensus_group)
        return bool(flag.item() > 0)

    @hooked_step
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.last_comm = CommStats()
        if self.nonfinite == "matrix":
            self._step_skipping()
            return loss
        # The last group's verdict completes the step's when every earlier one is clean and no other rank has a
        # say; that group may then write its update in the same pass (plan["applied"]), e.g. one native call.
        alone = self._consensus_group is None or not dist.is_initialized()
        last = len(self.param_groups) - 1
        plans: list[dict[str, Any]] = []
        bad = False
        for i, group in enumerate(self.param_groups):
            plans.append(self._prepare(group, final=alone and i == last and not bad))
            bad = bad or plans[-1].get("nonfinite", False)
        bad = self._agree(bad)
        self.last_step_skipped = bad
        if bad:
            self.skipped_steps += 1
            log.warning("%s: non-finite gradients, step skipped (no weight or state changed; %d skipped so far)",
                        self._where, self.skipped_steps)
            return loss
        for group, plan in zip(self.param_groups, plans):
            if not plan.get("applied", False):
                self._apply(group, plan)
        return loss

    def _step_skipping(self) -> None:
        """nonfinite="matrix": every group steps on its own; a matrix (or fallback parameter) whose gradient is
        non-finite is left unchanged, weights and state, and named in ``last_skipped``."""
        skipped: list[str] = []
        for group in self.param_groups:
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
            return {"params": params, "nonfinite": self._local_nonfinite(p.grad for p in params)}
        return self._prepare_matrices(group, final)

    def _apply(self, group: dict[str, Any], plan: dict[str, Any]) -> None:
        """Phase 2 (only when every rank agreed the step is finite): write weights and state."""
        if group["kind"] == ADAMW:
            self._adamw_apply(group, plan["params"])
        else:
            self._apply_matrices(group, plan)

    def _prepare_matrices(self, group: dict[str, Any], final: bool = False) -> dict[str, Any]:
        raise NotImplementedError

    def _apply_matrices(self, group: dict[str, Any], plan: dict[str, Any]) -> None:
        raise NotImplementedError


def matrix_step_size(group: dict[str, Any]) -> float:
    """The step a matrix takes: the group's lr (which schedulers set) times its lr_scale."""
    return group["lr"] * group["lr_scale"]


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
