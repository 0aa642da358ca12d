"""The AdamW fallback of the matrix optimizers (embeddings, LM head, 1-D parameters, as in the papers).

torch's own AdamW (decoupled decay), fused where torch has the fused kernel (CPU and CUDA): one launch per
device and dtype. ``found_inf`` (a 0-dim tensor, nonzero = skip) is the step's verdict kept on the device:
the kernel then writes nothing and the step counters stay. A complex parameter is stepped as its real and
imaginary parts (``view_as_real``), as torch's AdamW does, so |g|^2 enters the second moment.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.adamw import adamw as _functional_adamw

__all__ = ["adamw_step"]


def _as_real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def adamw_step(state: dict, group: dict[str, Any], params: list[torch.Tensor],
               found_inf: torch.Tensor | None = None) -> None:
    """One AdamW step of ``params`` (those with a gradient) with the group's settings; ``state``: the
    optimizer's per-parameter state (created here on first use, on the parameter's device)."""
    if not params:
        return
    b1, b2 = group["betas"]
    grads, m, v, steps, ps = [], [], [], [], []
    for p in params:
        st = state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif st["step"].device != p.device:  # (a checkpoint saved by a version that kept it on the CPU)
            st["step"] = st["step"].to(p.device)
        grads.append(_as_real(p.grad if p.grad.dtype == p.dtype else p.grad.to(p.dtype)))
        m.append(_as_real(st["exp_avg"]))
        v.append(_as_real(st["exp_avg_sq"]))
        ps.append(_as_real(p))
        steps.append(st["step"])
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in ps)
    if found_inf is not None and not fused:  # (torch's foreach AdamW has no found_inf: read it here)
        if bool(found_inf.item() > 0):
            return
        found_inf = None
    _functional_adamw(ps, grads, m, v, [], steps, foreach=None if fused else True, fused=fused or None,
                      found_inf=None if found_inf is None else found_inf.reshape(()).float(),
                      amsgrad=False, beta1=b1, beta2=b2, lr=group["lr"], weight_decay=group["weight_decay"],
                      eps=group["eps"], maximize=False)
