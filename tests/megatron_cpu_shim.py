"""TEST-ONLY fixture: lets megatron-core 0.16.1 code that hard-codes CUDA run on a CPU-only torch.

Never imported by library code. Megatron checks ``param.type()`` against ``torch.cuda.*`` names,
allocates buffers with ``device=torch.cuda.current_device()`` and forks a CUDA RNG tracker; here:
  * ``torch.cuda.current_device()`` -> "cpu", ``synchronize`` no-op, dummy current/default streams;
  * a TorchFunctionMode maps ``device='cuda'`` / ``.cuda()`` / ``.to('cuda')`` to CPU and makes
    ``Tensor.type()`` report ``torch.cuda.*`` names;
  * the RNG tracker's ``fork()`` is a null context (tests use dropout 0).
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode


def _cpu(device):
    if isinstance(device, bool):  # (``non_blocking`` passed by position, as nn.Module.to does)
        return device
    if isinstance(device, int) or (isinstance(device, (str, torch.device)) and str(device).startswith("cuda")):
        return "cpu"
    return device


class CudaToCpuMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        name = getattr(func, "__name__", "")
        if name == "cuda":
            return args[0]
        if name == "type" and len(args) == 1 and not kwargs:
            s = func(*args)
            return s if s.startswith("torch.cuda.") else s.replace("torch.", "torch.cuda.", 1)
        if name == "to":
            args = tuple(_cpu(a) for a in args)
        return func(*args, **kwargs)


class _Stream:
    def wait_event(self, *a, **k): ...
    def wait_stream(self, *a, **k): ...
    def synchronize(self): ...


_MODE: CudaToCpuMode | None = None


def install() -> None:
    """Call after ``initialize_model_parallel``. Idempotent within a process."""
    global _MODE
    if _MODE is not None:
        return
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _Stream()
    torch.cuda.default_stream = lambda *a, **k: _Stream()
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.get_cuda_rng_tracker()
    tracker.fork = lambda *a, **k: contextlib.nullcontext()
    tracker.is_initialized = lambda: True
    _MODE = CudaToCpuMode()
    _MODE.__enter__()
