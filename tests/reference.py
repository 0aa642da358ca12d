"""Independent dense single-process references (float64, written from the papers' definitions).

Nothing here imports sinkgd_ds: these are the yardsticks the package is measured against.
"""

from __future__ import annotations

import math

import torch


def sr_sinkhorn(g: torch.Tensor, iters: int) -> torch.Tensor:
    """Alternately scale every row to l2 norm sqrt(n) and every column to sqrt(m); zero stays zero."""
    x = g.double().clone()
    m, n = x.shape
    for _ in range(iters):
        rn = x.norm(dim=1, keepdim=True)
        x = torch.where(rn > 0, x * math.sqrt(n) / torch.where(rn > 0, rn, 1), torch.zeros_like(x))
        cn = x.norm(dim=0, keepdim=True)
        x = torch.where(cn > 0, x * math.sqrt(m) / torch.where(cn > 0, cn, 1), torch.zeros_like(x))
    return x


def sr_sinkhorn_blocks(g: torch.Tensor, iters: int, block_of_row: list[int]) -> torch.Tensor:
    """Fused matrix = a stack of separate matrices (rows grouped by block), each normalised alone."""
    out = torch.zeros_like(g, dtype=torch.float64)
    ids = torch.tensor(block_of_row)
    for b in sorted(set(block_of_row)):
        rows = (ids == b).nonzero().flatten()
        out[rows] = sr_sinkhorn(g[rows], iters)
    return out


def row_rms_normalize(g: torch.Tensor) -> torch.Tensor:
    """SCALE's op on a Linear weight: every row (output unit) to RMS 1."""
    x = g.double()
    rms = x.square().mean(dim=1, keepdim=True).sqrt()
    return torch.where(rms > 0, x / torch.where(rms > 0, rms, 1), torch.zeros_like(x))


def col_rms_normalize(g: torch.Tensor) -> torch.Tensor:
    return row_rms_normalize(g.t()).t()


def swan(g: torch.Tensor, ns_steps: int) -> torch.Tensor:
    """GradNorm (row standardisation) then GradWhitening by coupled Newton-Schulz, RMS-1 output."""
    x = g.double()
    m, n = x.shape
    x = x - x.mean(dim=1, keepdim=True)
    sd = x.square().mean(dim=1, keepdim=True).sqrt()
    x = torch.where(sd > 0, x / torch.where(sd > 0, sd, 1), torch.zeros_like(x))
    if m > n:
        return swan_whiten_rows(x.t(), ns_steps).t() * 1.0
    return swan_whiten_rows(x, ns_steps)


def swan_whiten_rows(x: torch.Tensor, ns_steps: int) -> torch.Tensor:
    m, n = x.shape
    a = x @ x.t()
    y = a / a.norm()
    z = torch.eye(m, dtype=x.dtype)
    for _ in range(ns_steps):
        t = (3 * torch.eye(m, dtype=x.dtype) - z @ y) / 2
        y, z = y @ t, t @ z
    d = z @ x
    return d * math.sqrt(m * n) / d.norm()


def adamw_reference(p, grads, lr, betas, eps, wd):
    """Run torch.optim.AdamW on a copy of ``p`` over the list of ``grads``."""
    q = p.detach().clone().requires_grad_(True)
    opt = torch.optim.AdamW([q], lr=lr, betas=betas, eps=eps, weight_decay=wd, foreach=False)
    for g in grads:
        q.grad = g.clone()
        opt.step()
    return q.detach()
