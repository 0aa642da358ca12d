"""Backends of the Sinkhorn engine: the same few batched operations, one implementation per device.

``MatrixBatch`` (``sinkgd_ds.sinkhorn``) keeps the layout bookkeeping and the collectives; a backend only
computes, for the matrices of a batch: partial row / column sums of one half-iteration into the engine's
buffers (``partials``), the scales and non-finite flags from completed sums (``finish``), the update of
every matrix (``apply``), and optionally a whole schedule for matrices no other rank shares
(``normalize_local``) or normalisation and update in one call (``step``).

  torch   the reference (``reference.py``): plain torch, any device, dtype and tensor type
  native  the CPU kernels (``native.py``, ``sinkgd_ds.kernels``): plain CPU fp32/bf16 tensors
  triton  Triton kernels (``triton.py``): CUDA tensors, one launch per half-iteration for all matrices

``implementation="auto"`` takes triton on CUDA when Triton imports, native on CPU when the kernels built,
else torch. The environment variable SINKGD_DS_IMPLEMENTATION overrides what the optimizers ask for, and
SINKGD_DS_KERNELS=0 keeps the native kernels off.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch

from .. import kernels as _kernels
from .reference import TorchBackend

__all__ = ["IMPLEMENTATIONS", "TorchBackend", "check_implementation", "select", "triton_available"]

IMPLEMENTATIONS = ("auto", "torch", "native", "triton")
ENV = "SINKGD_DS_IMPLEMENTATION"
_TORCH = TorchBackend()


@functools.lru_cache(maxsize=1)
def triton_available() -> str | None:
    """None when the Triton backend can be used in this process, else why not."""
    try:
        import triton  # noqa: F401  (TRITON_INTERPRET must be set before this import to take effect)
    except ImportError as e:
        return f"triton is not importable ({e})"
    return None


def interpreting() -> bool:
    """Triton's interpreter runs kernels on CPU tensors (tests on machines without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_implementation(where: str, value: object) -> str:
    """Validate the optimizers' ``implementation`` option (a clear error before training starts)."""
    if value not in IMPLEMENTATIONS:
        raise ValueError(f"{where}: implementation={value!r} is not allowed; use one of {', '.join(IMPLEMENTATIONS)}")
    if value == "triton" and triton_available() is not None:
        raise ValueError(f"{where}: implementation='triton' needs Triton: {triton_available()}")
    if value == "triton" and not torch.cuda.is_available() and not interpreting():
        raise ValueError(f"{where}: implementation='triton' needs a CUDA device (or TRITON_INTERPRET=1 set before "
                         "triton is imported, to run the kernels on CPU tensors in Triton's interpreter)")
    if value == "native" and not _kernels.available():
        raise ValueError(f"{where}: implementation='native' needs the CPU kernels, which are not available here "
                         "(disabled with SINKGD_DS_KERNELS=0, or no C++ compiler); use 'auto' or 'torch'")
    return value


def requested(implementation: str) -> str:
    return os.environ.get(ENV, "").strip().lower() or implementation


def select(implementation: str, devices: Sequence[torch.device]):
    """The backend for a batch whose tensors live on ``devices``."""
    implementation = requested(implementation)
    kinds = {d.type for d in devices}
    if implementation == "torch" or not kinds:
        return _TORCH
    if implementation == "native":
        if kinds != {"cpu"} or _kernels.lib() is None:
            raise RuntimeError(f"implementation='native' runs on CPU tensors with the CPU kernels built; this batch "
                               f"lives on {sorted(kinds)} (kernels {'built' if _kernels.lib() else 'unavailable'})")
        return _native()
    if implementation == "triton":
        why = triton_available()
        if why is None and (kinds == {"cuda"} or (kinds == {"cpu"} and interpreting())):
            return _triton()
        raise RuntimeError(f"implementation='triton' runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); "
                           f"this batch lives on {sorted(kinds)}" + (f"; {why}" if why else ""))
    if implementation != "auto":
        raise ValueError(f"implementation={implementation!r} is not allowed; use one of {', '.join(IMPLEMENTATIONS)}")
    if kinds == {"cuda"} and triton_available() is None:
        return _triton()
    if kinds == {"cpu"} and _kernels.lib() is not None:
        return _native()
    return _TORCH


def _native():
    from .native import NativeBackend

    lib = _kernels.lib()
    cached = getattr(_native, "backend", None)
    if cached is None or cached.lib is not lib:
        cached = _native.backend = NativeBackend(lib)
    return cached


@functools.lru_cache(maxsize=1)
def _triton():
    from .triton_backend import TritonBackend

    return TritonBackend()
