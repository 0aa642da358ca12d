"""Optimizer configs: megatron-core ``OptimizerConfig`` subclasses that select our optimizers.

``get_megatron_optimizer(SinkGDOptimizerConfig(lr=..., ...), model_chunks)`` returns SinkGD once
``megatron_patch.apply()`` ran. A plain ``OptimizerConfig(optimizer="sinkgd")`` works too (with the
defaults below); the subclasses only add the extra fields, so Megatron-LM's argument plumbing
(``dataclasses.fields``) can carry ``--sinkgd-iters`` / ``--sinkgd-lr-scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.optimizer import OptimizerConfig

from sinkgd_ds.registry import keys

OURS = keys()  # --optimizer values: sinkgd_ds.registry


@dataclass
class SinkGDOptimizerConfig(OptimizerConfig):
    """SinkGD on 2-D hidden weights, AdamW (adam_beta1/2, adam_eps) on embeddings, output layer, vectors."""

    optimizer: str = "sinkgd"
    sinkgd_iters: int = 5
    """L, Sinkhorn row/column passes per step (the paper's value)."""
    sinkgd_lr_scale: float = 0.05
    """Matrices step with lr * sinkgd_lr_scale (paper setup: 0.02 * 0.05)."""
    sinkgd_split_fused: bool = True
    """Per-block column statistics for fused linear_qkv (Q/K/V) and SwiGLU linear_fc1 (gate/up)."""
    sinkgd_implementation: str = "auto"
    """Engine backend: auto (Triton on CUDA, the native kernels on CPU), torch, native or triton."""
    sinkgd_stochastic_rounding: bool = True
    """Updates written into bf16 tensors round stochastically (fp32 main params, Megatron's default, are exact)."""
    sinkgd_rounding_seed: int = 0
    """Seed of the stochastic-rounding hash."""


@dataclass
class SCALEOptimizerConfig(SinkGDOptimizerConfig):
    """SCALE: column-normalised SGD with momentum on the output layer only (embedding included)."""

    optimizer: str = "scale"
    scale_momentum: float = 0.9


@dataclass
class SWANOptimizerConfig(SinkGDOptimizerConfig):
    """SWAN: row standardisation + whitening. Needs whole matrices, so no tensor parallelism."""

    optimizer: str = "swan"
    swan_ns_steps: int = 5


#: the config class of each --optimizer value (every registry key has one; tests/test_registry.py checks)
CONFIGS = {"sinkgd": SinkGDOptimizerConfig, "scale": SCALEOptimizerConfig, "swan": SWANOptimizerConfig}
