"""Single-process dense references for the DeepSpeed runs: full batch, plain torch, float64 math."""

from __future__ import annotations

import torch

from . import reference as R
from .ds_model import FALLBACK, MATRICES, make_model


def _matrix_update(opt: str, g: torch.Tensor, name: str, hp: dict, mom: dict) -> torch.Tensor:
    if opt == "SinkGD":
        return R.sr_sinkhorn(g, hp.get("sinkhorn_iters", 5))
    if opt == "SWAN":
        return R.swan(g, hp.get("ns_steps", 5))
    if opt == "SCALE":
        return R.row_rms_normalize(g)
    raise ValueError(opt)


def reference_run(opt: str, hp: dict, data: list[torch.Tensor], lrs: list[float], clip: float = 0.0,
                  gas: int = 1, bf16: bool = False, zero_grad_init_step: bool = False,
                  shards: int = 1, round_masters: bool = True) -> dict[str, torch.Tensor]:
    """Train make_model() on the full batches; returns final fp32 master weights (float64).

    ``bf16``: mixed precision as DeepSpeed does it: fp32 master weights start from the bf16-rounded
    model, forward/backward run on a bf16 copy, updates are applied to the masters.

    ``shards``: in bf16, the gradient is computed per rank (each of ``shards`` ranks takes its rows of
    every batch, as the DeepSpeed runs do) in bf16 and averaged in float64, so the reference has the
    same bf16 roundings as data parallelism; only the bf16 reduction itself is left to the tolerance.

    ``zero_grad_init_step``: DeepSpeed's stage-0 mixed-precision wrapper (FP16_UnfusedOptimizer) runs one
    optimizer step on all-zero gradients at construction to create the optimizer state, for any
    optimizer: AdamW's step count then starts at 1 (moments 0); the matrix updates of zero gradients are 0.
    """
    model = make_model()
    if bf16:
        if round_masters:  # (DeepSpeed starts its fp32 masters from the bf16 model; FSDP2 keeps the fp32 ones)
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(p.bfloat16().float())
        low = make_model().bfloat16()
    params = dict(model.named_parameters())
    scale = hp.get("lr_scale", 0.05)
    if opt == "SCALE":  # SCALE keeps embedding (col-normalised) and head (momentum) off AdamW
        adam_names = [n for n in FALLBACK if n not in ("embed_tokens.weight", "lm_head.weight")]
    else:
        adam_names = list(FALLBACK)
    adam = torch.optim.AdamW([params[n] for n in adam_names], lr=lrs[0], betas=(0.9, 0.999), eps=1e-8,
                             weight_decay=0.0, foreach=False)
    head_m = torch.zeros_like(params["lm_head.weight"], dtype=torch.float64)
    if zero_grad_init_step:
        for n in adam_names:
            params[n].grad = torch.zeros_like(params[n])
        adam.step()
        model.zero_grad()
    for step, lr in enumerate(lrs):
        model.zero_grad()
        if bf16:
            with torch.no_grad():
                for q, p in zip(low.parameters(), model.parameters()):
                    q.copy_(p)
            acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
            for micro in data[step * gas : (step + 1) * gas]:
                per = micro.shape[0] // shards
                for r in range(shards):  # each rank's bf16 gradient of its rows, averaged exactly
                    low.zero_grad()
                    low(micro[r * per : (r + 1) * per]).backward()
                    for (n, _), q in zip(model.named_parameters(), low.parameters()):
                        acc[n] += q.grad.double() / (gas * shards)
            for n, p in model.named_parameters():
                p.grad = acc[n].float()
        else:
            for micro in data[step * gas : (step + 1) * gas]:
                (model(micro) / gas).backward()
        if clip > 0:
            total = torch.sqrt(sum(p.grad.double().square().sum() for p in model.parameters()))
            factor = clip / (float(total) + 1e-6)
            if factor < 1:
                for p in model.parameters():
                    p.grad.mul_(factor)
        with torch.no_grad():
            for n in MATRICES:
                params[n] -= (lr * scale * _matrix_update(opt, params[n].grad, n, hp, {})).float()
            if opt == "SCALE":
                e = params["embed_tokens.weight"]
                e -= (lr * scale * R.col_rms_normalize(e.grad)).float()
                head_m = 0.9 * head_m + 0.1 * params["lm_head.weight"].grad.double()
                params["lm_head.weight"] -= (lr * scale * R.row_rms_normalize(head_m)).float()
        for g in adam.param_groups:
            g["lr"] = lr
        adam.step()
    return {n: p.detach().double() for n, p in model.named_parameters()}
