"""Adapters that describe an engine's layouts (DeepSpeed ZeRO, Megatron-Core) to the Sinkhorn engine."""

from __future__ import annotations

from typing import Any


def require_internal(obj: Any, attr: str, error: type[Exception], installed: str, tested: str) -> Any:
    """``getattr`` for an engine internal we rely on: if it moved, fail loudly naming the installed
    version (``installed``, e.g. "DeepSpeed 0.20.0") and the tested one, never fall back silently."""
    if not hasattr(obj, attr):
        raise error(f"sinkgd_ds: {installed} has no {getattr(obj, '__name__', type(obj).__name__)}.{attr}; "
                    f"this integration is tested with {tested}. Pin that version or report the new layout.")
    return getattr(obj, attr)
