"""Memory per rank of optimizer + engine: exact accounting of real engines (:func:`account`, :func:`gather`) and a
model that predicts it from a run config (:func:`estimate`; ``python -m sinkgd_ds.memory``; docs/memory.md)."""

from .accounting import CATEGORIES, KEYS, account, gather
from .model import Setup, estimate, estimate_ranks

__all__ = ["CATEGORIES", "KEYS", "Setup", "account", "estimate", "estimate_ranks", "gather"]
