"""TEST-ONLY fixture: Megatron-LM's training loop (megatron.training) on a CPU-only machine. Never in library code.

Megatron-LM assumes CUDA throughout: it asserts ``torch.cuda.is_available()``, sets devices, creates streams and
events, reads memory counters, forks a CUDA RNG tracker and checks ``Tensor.type()`` against ``torch.cuda.*``
names. Here each of those is answered on the CPU, so the real loop (argument parsing, model build, optimizer
build through megatron_patch, the pipeline schedules, gradient reduction, checkpointing) runs over gloo:
  * device arguments ``cuda`` / ``cuda:N`` / ``N`` and ``.cuda()`` become the CPU (a TorchFunctionMode);
    ``Tensor.type()`` reports ``torch.cuda.*`` names;
  * ``torch.cuda``: available with one device, ``set_device`` / ``synchronize`` / ``empty_cache`` no-ops, dummy
    streams and events (elapsed time 0), memory counters 0;
  * the CUDA RNG is the CPU generator (``get_rng_state`` / ``set_rng_state`` / ``manual_seed``), and the model
    parallel RNG tracker forks nothing (the tests use dropout 0).
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch.overrides import TorchFunctionMode

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def _cpu(device):
    if isinstance(device, bool):  # ``non_blocking`` passed by position, as nn.Module.to does
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
        if name == "pin_memory":
            return args[0]
        return func(*args, **kwargs)


class _Stream:
    def __init__(self, *a, **k): ...
    def wait_event(self, *a, **k): ...
    def wait_stream(self, *a, **k): ...
    def synchronize(self): ...
    def record_event(self, *a, **k): return _Event()
    def __enter__(self): return self
    def __exit__(self, *a): return False


class _Event:
    def __init__(self, *a, **k): ...
    def record(self, *a, **k): ...
    def synchronize(self): ...
    def wait(self, *a, **k): ...
    def query(self): return True
    def elapsed_time(self, other): return 0.0


_MODE: CudaToCpuMode | None = None


def install() -> None:
    """Before Megatron-LM's loop starts. Idempotent within a process."""
    global _MODE
    if _MODE is not None:
        return
    import torch._dynamo

    torch._dynamo.config.disable = True  # (TORCHDYNAMO_DISABLE=1 counts only when set before torch is imported)
    cuda = torch.cuda
    cuda.is_available = lambda: True
    cuda.device_count = lambda: 1
    cuda.current_device = lambda: "cpu"
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.current_stream = lambda *a, **k: _Stream()
    cuda.default_stream = lambda *a, **k: _Stream()
    cuda.set_stream = lambda *a, **k: None
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.Stream = _Stream
    cuda.Event = _Event
    cuda.get_device_name = lambda *a, **k: "cpu"
    cuda.get_device_capability = lambda *a, **k: (9, 0)
    cuda.get_device_properties = lambda *a, **k: type("Props", (), {"total_memory": 0, "name": "cpu",
                                                                      "major": 9, "minor": 0})()
    for counter in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(cuda, counter, lambda *a, **k: 0)
    cuda.memory_stats = lambda *a, **k: {}
    cuda.mem_get_info = lambda *a, **k: (0, 0)
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: None
    cuda.manual_seed_all = lambda seed: None
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.get_cuda_rng_tracker()
    tracker.fork = lambda *a, **k: contextlib.nullcontext()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: None
    _MODE = CudaToCpuMode()
    _MODE.__enter__()
