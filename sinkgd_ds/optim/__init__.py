"""Optimizer classes: each a torch.optim.Optimizer on top of the Sinkhorn engine."""

from .base import ADAMW, MatrixOptimizer, tag_parameter_names
from .scale import SCALE
from .sinkgd import SinkGD
from .swan import SWAN

__all__ = ["ADAMW", "MatrixOptimizer", "SCALE", "SWAN", "SinkGD", "tag_parameter_names"]
