"""The AdamW fallback of the matrix optimizers (embeddings, LM head, 1-D parameters, as in the papers).

torch's own AdamW (decoupled decay), fused where torch has the fused kernel (CPU and CUDA): one launch per
device and dtype. ``found_inf`` (a 0-dim tensor, nonzero = skip) is the step's verdict kept on the device:
the kernel then writes nothing and the step counters stay. A complex parameter is stepped as its real and
imaginary parts (``view_as_real``), as torch's AdamW does, so |g|^2 enters the second moment.

bf16 parameters with stochastic rounding (``rounding``): torch's kernel rounds its fp32 result to nearest
inside, so it runs instead on fp32 copies of the parameter, gradient and moments (pieces of at most
``PIECE`` elements, so the transient memory stays bounded whatever the parameter's size); the moments are
written back rounded to nearest, the parameter through ``sinkgd_ds.rounding`` keyed by the parameter's name
and each element's row-major index in the full parameter (a DTensor's local block at its global offset; a
flat ZeRO / distributed-optimizer partition, whose name and offset are unknown here, by its own name label and
positions: unbiased and deterministic, but not the dense run's bits). A skipped step (``found_inf``) writes
back the unchanged values, which bf16 represents exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim.adamw import adamw as _functional_adamw

from ..integrations.dtensor import is_dtensor, local_tensor
from ..rounding import StochasticRounding, flat_indices, matrix_key, random16, stochastic_round_bf16

__all__ = ["adamw_step"]

PIECE = 1 << 24  # elements per fp32 copy of the stochastic-rounding path (4 copies: 256 MiB at most)


def _as_real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _fused(tensors: list[torch.Tensor]) -> bool:
    return all(t.device.type in ("cpu", "cuda") and t.is_floating_point() for t in tensors)


def adamw_step(state: dict, group: dict[str, Any], params: list[torch.Tensor],
               found_inf: torch.Tensor | None = None, rounding: StochasticRounding | None = None,
               label: Callable[[torch.Tensor], str] | None = None) -> None:
    """One AdamW step of ``params`` (those with a gradient) with the group's settings; ``state``: the
    optimizer's per-parameter state (created here on first use, on the parameter's device). ``rounding``:
    bf16 parameters round stochastically (``label(p)`` names the parameter in the hash)."""
    if not params:
        return
    grads, m, v, steps, ps, stochastic = [], [], [], [], [], []
    for p in params:
        st = state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif st["step"].device != p.device:  # (a checkpoint saved by a version that kept it on the CPU)
            st["step"] = st["step"].to(p.device)
        if rounding is not None and p.dtype == torch.bfloat16:
            stochastic.append(p)
            continue
        grads.append(_as_real(p.grad if p.grad.dtype == p.dtype else p.grad.to(p.dtype)))
        m.append(_as_real(st["exp_avg"]))
        v.append(_as_real(st["exp_avg_sq"]))
        ps.append(_as_real(p))
        steps.append(st["step"])
    if stochastic:
        _stochastic_step(state, group, stochastic, found_inf, rounding, label or (lambda t: ""))
    if ps:
        _adamw(group, ps, grads, m, v, steps, found_inf)


def _adamw(group: dict[str, Any], ps, grads, m, v, steps, found_inf: torch.Tensor | None) -> bool:
    """torch's AdamW on these lists; False when it skipped on a host-read ``found_inf`` (unfused path).

    torch's fused kernel reads every tensor as its flat storage in memory order: a non-contiguous parameter,
    gradient or moment (a strided view, a transposed matrix, a gradient whose strides differ from its
    parameter's) is stepped on contiguous stand-ins, and the results are written back into the originals."""
    b1, b2 = group["betas"]
    fused = _fused(ps)
    if found_inf is not None and not fused:  # (torch's foreach AdamW has no found_inf: read it here)
        if bool(found_inf.item() > 0):
            return False
        found_inf = None
    strided = [i for i, ts in enumerate(zip(ps, grads, m, v)) if not all(t.is_contiguous() for t in ts)]
    lists = (ps, grads, m, v)
    if strided:
        lists = tuple(list(ts) for ts in lists)
        for ts in lists:
            for i in strided:
                ts[i] = ts[i].contiguous()
    lr = group["lr"]
    if isinstance(lr, torch.Tensor) and not fused:  # (torch's foreach path takes a tensor lr only when capturable)
        lr = lr.item()
    _functional_adamw(*lists, [], steps, foreach=None if fused else True, fused=fused or None,
                      found_inf=None if found_inf is None else found_inf.reshape(()).float(),
                      amsgrad=False, beta1=b1, beta2=b2, lr=lr, weight_decay=group["weight_decay"],
                      eps=group["eps"], maximize=False)
    with torch.no_grad():
        for i in strided:  # (a skipped step wrote nothing into the stand-ins: the copies write the same values)
            for original, stand_in in ((ps[i], lists[0][i]), (m[i], lists[2][i]), (v[i], lists[3][i])):
                if stand_in is not original:
                    original.copy_(stand_in)
    return True


def _local(t: torch.Tensor) -> torch.Tensor:
    return local_tensor(t) if is_dtensor(t) else t


def _placement(p: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(local shape, full shape, offset of the local block in it) of a parameter's data on this rank."""
    if not is_dtensor(p):
        return tuple(p.shape), tuple(p.shape), (0,) * p.dim()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return tuple(local_tensor(p).shape), tuple(p.shape), tuple(offset)


def _stochastic_step(state: dict, group: dict[str, Any], params: list[torch.Tensor], found_inf,
                     rounding: StochasticRounding, label: Callable[[torch.Tensor], str]) -> None:
    """AdamW on fp32 copies of bf16 parameters, the result rounded stochastically (see the module docstring)."""
    for p in params:
        st = state[p]
        views = [_local(p), _local(p.grad), _local(st["exp_avg"]), _local(st["exp_avg_sq"])]
        flat = all(t.is_contiguous() for t in views)
        stream, placement, count = rounding.stream(matrix_key(label(p))), _placement(p), views[0].numel()
        pieces = [(a, min(a + PIECE, count)) for a in range(0, count, PIECE)] if flat else [(0, count)]
        step = st["step"].clone()
        for a, b in pieces:
            part = [t.view(-1)[a:b] if flat else t for t in views]
            copies = [t.to(torch.float32, copy=True) for t in part]
            step = st["step"].clone()  # (each piece advances its own copy of the counter from the same value)
            if not _adamw(group, [copies[0]], [copies[1]], [copies[2]], [copies[3]], [step], found_inf):
                return
            part[2].copy_(copies[2])
            part[3].copy_(copies[3])
            index = flat_indices(*placement, a, b, views[0].device).view(part[0].shape)
            part[0].copy_(stochastic_round_bf16(copies[0], random16(stream, index)))
        st["step"].copy_(step)
