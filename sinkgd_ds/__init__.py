"""sinkgd-ds: stateless SinkGD / SCALE / SWAN optimizers whose statistics are computed on shards.

``import sinkgd_ds`` is all a DeepSpeed user needs: when DeepSpeed is installed, the optimizers are
registered so that ``"optimizer": {"type": "SinkGD", ...}`` in the JSON config works at every ZeRO stage.
"""

from .layout import Fragment, MatrixSpec, RowBlocks, dense_spec
from .optim import ADAMW, SCALE, SWAN, MatrixOptimizer, SinkGD, tag_parameter_names
from .sinkhorn import apply_scaled_update_, normalize_scales

__version__ = "0.1.0"
from .registry import classes  # noqa: E402

OPTIMIZERS = classes()

__all__ = ["ADAMW", "DEEPSPEED_REGISTERED", "Fragment", "MatrixOptimizer", "MatrixSpec", "OPTIMIZERS", "RowBlocks",
           "SCALE", "SWAN", "SinkGD", "apply_scaled_update_", "dense_spec", "normalize_scales", "tag_parameter_names"]

from .integrations import deepspeed as _deepspeed_integration  # noqa: E402

DEEPSPEED_REGISTERED = _deepspeed_integration.register_if_available()
