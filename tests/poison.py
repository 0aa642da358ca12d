"""A NaN/inf injected by autograd itself: one element of one parameter's gradient, on the last rank only."""

from __future__ import annotations

import torch


def install_poison(model: torch.nn.Module, rank: int, world: int) -> dict:
    """Hooks on every parameter; returns the switch: set ``name`` (a parameter name) and ``value`` to poison the
    next backward of that parameter on rank ``world - 1`` (the other ranks' gradients stay clean)."""
    poison: dict = {"name": None, "value": 0.0}

    def hook_for(name):
        def hook(g):
            if poison["name"] != name or rank != world - 1:
                return g
            g = g.clone()
            g.view(-1)[0] = poison["value"]
            return g
        return hook

    for n, p in model.named_parameters():
        p.register_hook(hook_for(n))
    return poison
