"""``step()`` with torch's hook contract, without a profiler range when no profiler runs.

``torch.optim.Optimizer`` wraps every subclass's ``step`` in ``record_function`` plus the step pre/post
hooks. Entering ``record_function`` is a dispatcher call that costs ~150 us when the step starts with
cold caches (as it does after a backward pass), even with no profiler active: about 5% of a SinkGD
L=1 step of LLaMA-60M-sized matrices, whose whole update is bandwidth-bound and takes ~3 ms. This
wrapper keeps everything the torch wrapper does (global and per-optimizer pre hooks, which may replace
the arguments; ``_optimizer_step_code`` for the profiler's Python tracer; post hooks) and opens the
``Optimizer.step#<Class>.step`` range only while a profiler is enabled. It also switches grad mode off
around the step (what ``@torch.no_grad()`` does, at a third of its cold cost).

Guarded by feature: when this torch lacks any of the pieces it relies on, ``hooked_step`` returns the
function unchanged and torch wraps it as usual.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from itertools import chain
from typing import Any

import torch

try:  # private parts of torch.optim that the stock wrapper uses
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks
    _profiler_enabled = torch._C._autograd._profiler_enabled
    # what torch.no_grad() ends up calling (the public torch.set_grad_enabled does the same through an object)
    _set_grad_enabled = getattr(torch._C, "_set_grad_enabled", torch.set_grad_enabled)
    _SUPPORTED = (callable(_profiler_enabled) and hasattr(torch.optim.Optimizer, "_optimizer_step_code")
                  and hasattr(torch.optim.Optimizer, "register_step_pre_hook"))  # (its per-optimizer hook dicts)
except (ImportError, AttributeError):
    _SUPPORTED = False

__all__ = ["hooked_step"]


def _run(func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """``args`` starts with the optimizer, as in torch's wrapper (hooks see and may replace all of it)."""
    self = args[0]
    for pre_hook in chain(_global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values()):
        result = pre_hook(self, args, kwargs)
        if result is not None:
            if not (isinstance(result, tuple) and len(result) == 2):
                raise RuntimeError(f"{func} must return None or a tuple of (new_args, new_kwargs), but got {result}.")
            args, kwargs = result
    grad_was_on = torch.is_grad_enabled()
    if grad_was_on:
        _set_grad_enabled(False)
    try:
        out = func(*args, **kwargs)
    finally:
        if grad_was_on:
            _set_grad_enabled(True)
    self._optimizer_step_code()
    for post_hook in chain(self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()):
        post_hook(self, args, kwargs)
    return out


def hooked_step(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate an optimizer's ``step(self, closure=None)``: the returned function runs with grad mode off and
    is marked so that ``torch.optim.Optimizer`` does not wrap it a second time. ``closure`` is called with
    grad mode on (as torch's optimizers do) by the step itself."""
    if not _SUPPORTED:
        return torch.no_grad()(func)

    @functools.wraps(func)
    def step(*args: Any, **kwargs: Any) -> Any:
        if _profiler_enabled():
            with torch.autograd.profiler.record_function(f"Optimizer.step#{type(args[0]).__name__}.step"):
                return _run(func, args, kwargs)
        return _run(func, args, kwargs)

    step.hooked = True  # type: ignore[attr-defined]  # torch.optim.Optimizer._patch_step_function checks this
    return step
