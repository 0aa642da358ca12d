"""SWAN (Ma et al., arXiv 2412.13148): row standardisation, then whitening, no optimizer state.

For each matrix gradient G (m x n):
  G~ = (G - mean_row) / std_row             (GradNorm: per-row mean and std over the n inputs)
  D  = (G~ G~^T)^(-1/2) G~                  (GradWhitening; on the smaller Gram side, fp32)
  D *= sqrt(m n) / ||D||_F                  (entries of RMS 1, like SinkGD's output)
  W -= lr * lr_scale * D
(G G^T)^(-1/2) uses ``ns_steps`` coupled Newton-Schulz iterations on A / ||A||_F (SWAN's sibling
paper, App. B.8: "typically ... only 5 steps"). Embeddings, LM head and 1-D params: AdamW.

Whitening needs the whole matrix, so on sharded layouts SWAN (and only SWAN) assembles each
matrix from its pieces over the shard group (one all-reduce of m*n floats per shared matrix); every
rank then applies its own piece. Tensor-parallel slices are not supported for SWAN. Fused matrices
(row blocks) are whitened block by block.

Defaults: lr=0.02, lr_scale=0.05 (as SinkGD; the community SWAN ports use alpha 0.05), ns_steps=5,
weight_decay=0, AdamW betas (0.9, 0.999), eps 1e-8.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import hparams as hp
from ..layout import RowBlocks
from ..sinkhorn import apply_dense_update_, gather_matrix
from .base import MatrixOptimizer, grad_of, has_grad, matrix_step_size

SWAN_KIND = "swan"


def swan_direction(g: torch.Tensor, ns_steps: int) -> torch.Tensor:
    """Standardise rows, whiten, rescale to RMS 1 (fp32 in, fp32 out)."""
    m, n = g.shape
    mean = g.mean(dim=1, keepdim=True)
    centered = g - mean
    std = centered.square().mean(dim=1, keepdim=True).sqrt()
    gn = torch.where(std > 0, centered / torch.where(std > 0, std, torch.ones_like(std)), torch.zeros_like(g))
    tall = m > n
    x = gn.t() if tall else gn  # s x l with s <= l
    a = x @ x.t()
    norm = torch.linalg.matrix_norm(a)
    if norm == 0:
        return torch.zeros_like(g)
    y = a / norm
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    z = eye.clone()
    for _ in range(ns_steps):
        t = 0.5 * (3.0 * eye - z @ y)
        y = y @ t
        z = t @ z
    d = z @ x
    d = d.t() if tall else d
    dn = torch.linalg.matrix_norm(d)
    return d * (math.sqrt(m * n) / dn) if dn > 0 else torch.zeros_like(g)


def blockwise_direction(g: torch.Tensor, blocks: RowBlocks, ns_steps: int) -> torch.Tensor:
    """SWAN on each row block of a fused matrix on its own (Q/K/V of linear_qkv, gate/up of a SwiGLU
    fc1), as the paper's unfused LLaMA would whiten them: whitening mixes rows, so never across blocks."""
    if blocks.count == 1:
        return swan_direction(g, ns_steps)
    out = torch.empty_like(g)
    for b in range(blocks.count):
        rows = torch.cat([torch.arange(lo, hi, device=g.device) for lo, hi, blk in blocks.runs if blk == b])
        out[rows] = swan_direction(g[rows], ns_steps)
    return out


class SWAN(MatrixOptimizer):
    GROUP_KEYS = (*MatrixOptimizer.GROUP_KEYS, "ns_steps")
    MATRIX_KINDS = (SWAN_KIND,)
    DEVICE_VERDICT = False  # (the whitening reads its own norms on the host: SWAN keeps the host verdict)
    TENSOR_PARALLEL = False  # (the whitening needs whole rows and columns)

    def __init__(self, params, lr: float = 0.02, lr_scale: float = 0.05, ns_steps: int = 5,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 fallback_patterns=None, implementation: str = "auto", stochastic_rounding: bool = True,
                 rounding_seed: int = 0, **unknown: Any):
        # (``implementation`` is accepted as by every optimizer here; SWAN's whitening itself runs in torch, and
        # so does its update, stochastic rounding included: the same bits as the engine's)
        if unknown:
            hp.check_known_keys(f"{type(self).__name__}()", unknown,
                                [*self.GROUP_KEYS, "fallback_patterns", *self.OPTIONS])
        defaults = dict(lr=lr, lr_scale=lr_scale, ns_steps=ns_steps, weight_decay=weight_decay,
                        betas=betas, eps=eps, kind=None)
        super().__init__(params, defaults, fallback_patterns, implementation=implementation,
                         stochastic_rounding=stochastic_rounding, rounding_seed=rounding_seed)

    def _validate_extra(self, where: str, key: str, value: Any) -> None:
        if key == "ns_steps":
            hp.int_in_range(where, key, value, 1, 1000)  # each one is a pass over every gradient
            hp.warn_above(where, key, value, 20, "Newton-Schulz steps (the paper uses 5)")

    def _prepare_matrices(self, group, final=False):  # (whitening needs the whole matrix: always two phases)
        specs = [s for s in self.matrix_specs(group) if not s.is_local or has_grad(s)]
        for s in specs:
            if s.row_group is not None or s.col_group is not None:
                raise NotImplementedError(f"SWAN: matrix {s.name!r} is split by tensor parallelism; SWAN's "
                                          "whitening is only supported on data-parallel (ZeRO/DistOpt) layouts")
        frags = (f.tensor.grad.view(-1)[f.offset:f.offset + f.numel] for s in specs for f in s.fragments)
        return {"specs": specs, "nonfinite": self._local_nonfinite(frags)}

    def _apply_matrices(self, group, plan, gate=None):  # (gate: never set, DEVICE_VERDICT is False)
        for spec in plan["specs"]:
            full = gather_matrix(spec, grad_of)
            update = blockwise_direction(full, spec.blocks, group["ns_steps"])
            apply_dense_update_(spec, update, matrix_step_size(group), group["weight_decay"], self.rounding(group))
