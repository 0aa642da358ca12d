"""The one list of our optimizers, read by every front end.

DeepSpeed's JSON ``"type"`` and the class name are ``name``; Megatron's ``--optimizer`` value is ``key``;
``megatron_fields`` maps the Megatron config fields (Megatron-LM flags ``--sinkgd-iters`` ...) that only
this optimizer reads to its constructor keywords. Adding an optimizer here is all the DeepSpeed
registration, ``megatron_patch`` and the launch entries need (plus its Megatron config class, see
``megatron_patch.config``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .optim import SCALE, SWAN, MatrixOptimizer, SinkGD

__all__ = ["MEGATRON_COMMON_FIELDS", "OptimizerEntry", "REGISTRY", "classes", "keys", "lookup", "names"]


@dataclass(frozen=True)
class OptimizerEntry:
    name: str
    cls: type[MatrixOptimizer]
    megatron_fields: Mapping[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.name.lower()


REGISTRY: dict[str, OptimizerEntry] = {e.name: e for e in (
    OptimizerEntry("SinkGD", SinkGD, {"sinkgd_iters": "sinkhorn_iters"}),
    OptimizerEntry("SCALE", SCALE, {"scale_momentum": "momentum"}),
    OptimizerEntry("SWAN", SWAN, {"swan_ns_steps": "ns_steps"}),
)}
# Megatron config fields every one of our optimizers reads (Megatron's own names for lr, decay, Adam's eps)
MEGATRON_COMMON_FIELDS: Mapping[str, str] = {"lr": "lr", "weight_decay": "weight_decay", "sinkgd_lr_scale": "lr_scale",
                                             "adam_eps": "eps", "sinkgd_implementation": "implementation",
                                             "sinkgd_stochastic_rounding": "stochastic_rounding",
                                             "sinkgd_rounding_seed": "rounding_seed"}


def names() -> list[str]:
    """Canonical names (DeepSpeed ``"type"``), in registry order."""
    return list(REGISTRY)


def classes() -> dict[str, type[MatrixOptimizer]]:
    """Canonical name -> class."""
    return {name: entry.cls for name, entry in REGISTRY.items()}


def keys() -> tuple[str, ...]:
    """Lower-case names (Megatron ``--optimizer``)."""
    return tuple(e.key for e in REGISTRY.values())


def lookup(name: object) -> OptimizerEntry | None:
    """The entry of ``name`` in any letter case, else None."""
    if not isinstance(name, str):
        return None
    return next((e for e in REGISTRY.values() if e.key == name.lower()), None)
