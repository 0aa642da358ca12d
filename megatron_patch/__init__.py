"""megatron_patch: SinkGD / SCALE / SWAN inside Megatron-Core and Megatron-LM.

Python (megatron-core)::

    import megatron_patch
    megatron_patch.apply()
    opt = get_megatron_optimizer(megatron_patch.SinkGDOptimizerConfig(lr=0.02, ...), model_chunks)

Megatron-LM (``pretrain_gpt.py --optimizer sinkgd --sinkgd-iters 5 --sinkgd-lr-scale 0.05``)::

    python -m megatron_patch.run pretrain_gpt.py --optimizer sinkgd ...   # from the Megatron-LM checkout

See docs/megatron.md.
"""

from __future__ import annotations

from .config import OURS, SCALEOptimizerConfig, SinkGDOptimizerConfig, SWANOptimizerConfig

__all__ = ["OURS", "SCALEOptimizerConfig", "SWANOptimizerConfig", "SinkGDOptimizerConfig", "apply"]


def apply(training: bool | None = None) -> None:
    """Teach megatron-core's ``get_megatron_optimizer`` our names; with Megatron-LM importable (or
    ``training=True``) also its argument parser and optimizer-config plumbing. Idempotent."""
    from .factory import patch_core

    patch_core()
    if training is None:
        import importlib.util

        training = importlib.util.find_spec("megatron.training") is not None
    if training:
        from .training import patch_training

        patch_training()
