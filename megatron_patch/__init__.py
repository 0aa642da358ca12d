"""megatron_patch: SinkGD / SCALE / SWAN inside Megatron-Core and Megatron-LM.

Python (megatron-core)::

    import megatron_patch
    megatron_patch.apply()
    opt = get_megatron_optimizer(megatron_patch.SinkGDOptimizerConfig(lr=0.02, ...), model_chunks)

Megatron-LM (``pretrain_gpt.py --optimizer sinkgd --sinkgd-iters 5 --sinkgd-lr-scale 0.05``)::

    python -m megatron_patch.run pretrain_gpt.py --optimizer sinkgd ...   # from the Megatron-LM checkout

Importing this package imports no Megatron module (``python -m megatron_patch.run`` must put the script's
folder on ``sys.path`` before the first ``megatron`` import); the config classes load on first use.
See docs/megatron.md.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OURS", "SCALEOptimizerConfig", "SWANOptimizerConfig", "SinkGDOptimizerConfig", "apply"]


def __getattr__(name: str) -> Any:
    if name in ("OURS", "SCALEOptimizerConfig", "SWANOptimizerConfig", "SinkGDOptimizerConfig"):
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'megatron_patch' has no attribute {name!r}")


def apply(training: bool | None = None) -> None:
    """Teach megatron-core's ``get_megatron_optimizer`` our names; with Megatron-LM importable (or
    ``training=True``) also its argument parser and optimizer-config plumbing. Idempotent; call it before or after
    Megatron-LM's modules are imported (every bound copy is replaced)."""
    from .factory import patch_core

    patch_core()
    if training is None:
        import importlib.util

        training = importlib.util.find_spec("megatron.training") is not None
    if training:
        from .training import patch_training

        patch_training()
