"""Single-process checks of megatron_patch pieces: checkpoint state allocation.

The Megatron-LM hooks are tested against the real ``megatron.training`` (tests/megatron_lm/, the Python 3.12
lane with megatron-core 0.19, whose wheel ships it); the fake that stood in for it is gone.
"""

from __future__ import annotations

import pytest
import torch

megatron_patch = pytest.importorskip("megatron_patch")
from megatron_patch.wrappers import init_state, state_keys  # noqa: E402
from sinkgd_ds.optim import SCALE, SWAN, SinkGD  # noqa: E402
from sinkgd_ds.optim.base import engine_param_groups  # noqa: E402


def _named_params(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"embedding.word_embeddings.weight": (16, 8), "decoder.layers.0.mlp.linear_fc2.weight": (8, 12),
              "output_layer.weight": (16, 8), "decoder.final_layernorm.weight": (8,)}
    return [(n, torch.randn(*s, generator=g).requires_grad_(True)) for n, s in shapes.items()]


@pytest.mark.parametrize("cls", [SinkGD, SCALE, SWAN])
def test_init_state_is_what_a_step_creates(cls):
    """init_state allocates exactly the keys, shapes and dtypes a real step creates (no more: matrices none),
    and zero state steps like a fresh optimizer (bitwise)."""
    with engine_param_groups():  # as megatron_patch builds them: one kind per group
        stepped, fresh, inited, init_only = (cls(_named_params(), lr=0.02) for _ in range(4))
    init_state(inited)
    g = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=g) for p in grp["params"]] for grp in stepped.param_groups]
    for opt in (stepped, fresh, inited):
        for grp, gs in zip(opt.param_groups, grads):
            for p, gr in zip(grp["params"], gs):
                p.grad = gr.clone()
    stepped.step()
    init_state(init_only)
    for g_step, g_init in zip(stepped.param_groups, init_only.param_groups):
        assert g_step["kind"] == g_init["kind"]
        for p_step, p_init in zip(g_step["params"], g_init["params"]):
            s_step, s_init = stepped.state.get(p_step, {}), init_only.state.get(p_init, {})
            assert set(s_step) == set(s_init), (g_step["kind"], set(s_step), set(s_init))
            assert set(s_init) - {"step"} == set(state_keys(g_init["kind"]))
            for k in s_init:
                assert s_init[k].shape == s_step[k].shape and s_init[k].dtype == s_step[k].dtype
                assert not s_init[k].any()
    for _ in range(2):
        fresh.step()
        inited.step()
    for gf, gi in zip(fresh.param_groups, inited.param_groups):
        for pf, pi in zip(gf["params"], gi["params"]):
            assert torch.equal(pf, pi)
