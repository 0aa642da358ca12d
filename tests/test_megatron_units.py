"""Single-process checks of megatron_patch pieces: checkpoint state allocation and the Megatron-LM hooks.

The Megatron-LM tests here run against a FAKE, minimal ``megatron.training`` (three functions that
mirror, by behaviour, Megatron-LM main's ``arguments.parse_args`` / ``validate_args`` and
``training.get_megatron_optimizer_config``): Megatron-LM is not installed in this environment, so
the real ``pretrain_gpt.py`` path is NOT exercised by these tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types

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


# ----------------------------------------------------------------------------- FAKE Megatron-LM
MEGATRON_LM_OPTIMIZERS = ["adam", "sgd", "muon", "dist_muon", "lion", "soap", "adaptive_muon"]  # main d98e8a64


def _fake_megatron_training() -> dict[str, types.ModuleType]:
    """A stand-in for ``megatron.training`` with Megatron-LM main's behaviour in the three hooked functions."""
    from megatron.core.optimizer import OptimizerConfig

    arguments = types.ModuleType("megatron.training.arguments")
    training = types.ModuleType("megatron.training.training")

    def parse_args(extra_args_provider=None, ignore_unknown_args=False):
        parser = argparse.ArgumentParser(description="FAKE Megatron-LM Arguments", allow_abbrev=False)
        group = parser.add_argument_group("training")
        group.add_argument("--optimizer", type=str, default="adam", choices=list(MEGATRON_LM_OPTIMIZERS))
        group.add_argument("--use-distributed-optimizer", action="store_true")
        group.add_argument("--lr", type=float, default=None)
        group.add_argument("--weight-decay", type=float, default=0.01)
        group.add_argument("--bf16", action="store_true")
        if extra_args_provider is not None:
            parser = extra_args_provider(parser)
        return parser.parse_known_args()[0] if ignore_unknown_args else parser.parse_args()

    def validate_args(args, defaults={}):  # noqa: B006 - Megatron-LM's signature
        # Megatron-LM main: every non-adam/sgd name is an "emerging" optimizer, and
        # --use-distributed-optimizer becomes its layer-wise optimizer.
        args.use_layer_wise_distributed_optimizer = False
        if args.optimizer not in ("sgd", "adam"):
            if args.use_distributed_optimizer:
                args.use_layer_wise_distributed_optimizer = True
                args.use_distributed_optimizer = False
        return args

    def get_standard_config_overrides(config):
        return {"standard_overrides_for": type(config).__name__}

    def get_megatron_optimizer_config(args):
        kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(OptimizerConfig) if hasattr(args, f.name)}
        config = OptimizerConfig(**kwargs)
        return config, training.get_standard_config_overrides(config=config)

    arguments.parse_args, arguments.validate_args = parse_args, validate_args
    training.get_megatron_optimizer_config = get_megatron_optimizer_config
    training.get_standard_config_overrides = get_standard_config_overrides
    package = types.ModuleType("megatron.training")
    package.arguments, package.training = arguments, training
    return {"megatron.training": package, "megatron.training.arguments": arguments,
            "megatron.training.training": training}


@pytest.fixture
def fake_lm(monkeypatch):
    mods = _fake_megatron_training()
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return mods["megatron.training.arguments"], mods["megatron.training.training"]


def _parse(arguments, monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *argv])
    return arguments.parse_args()


def test_fake_megatron_lm_unpatched_behaviour(fake_lm, monkeypatch):
    """The fake behaves like Megatron-LM: our names are rejected, emerging names lose the DistOpt."""
    arguments, _ = fake_lm
    with pytest.raises(SystemExit):
        _parse(arguments, monkeypatch, "--optimizer", "sinkgd")
    args = arguments.validate_args(_parse(arguments, monkeypatch, "--optimizer", "muon", "--use-distributed-optimizer"))
    assert args.use_layer_wise_distributed_optimizer and not args.use_distributed_optimizer


def test_fake_megatron_lm_patched(fake_lm, monkeypatch):
    from megatron_patch.training import patch_training

    arguments, training = fake_lm
    patch_training()
    patch_training()  # idempotent: a second call must not add the arguments twice
    args = _parse(arguments, monkeypatch, "--optimizer", "sinkgd", "--sinkgd-iters", "3", "--sinkgd-lr-scale", "0.1",
                  "--use-distributed-optimizer", "--lr", "0.02", "--sinkgd-no-split-fused")
    args = arguments.validate_args(args)
    assert args.optimizer == "sinkgd"
    assert args.use_distributed_optimizer and not args.use_layer_wise_distributed_optimizer
    config, overrides = training.get_megatron_optimizer_config(args)
    assert type(config) is megatron_patch.SinkGDOptimizerConfig
    assert (config.optimizer, config.sinkgd_iters, config.sinkgd_lr_scale, config.sinkgd_split_fused) == \
        ("sinkgd", 3, 0.1, False)
    assert config.use_distributed_optimizer and config.lr == 0.02
    assert overrides == {"standard_overrides_for": "SinkGDOptimizerConfig"}

    args = arguments.validate_args(_parse(arguments, monkeypatch, "--optimizer", "scale", "--scale-momentum", "0.8"))
    config, _ = training.get_megatron_optimizer_config(args)
    assert type(config) is megatron_patch.SCALEOptimizerConfig and config.scale_momentum == 0.8

    config, _ = training.get_megatron_optimizer_config(arguments.validate_args(_parse(arguments, monkeypatch)))
    assert type(config).__name__ == "OptimizerConfig" and config.optimizer == "adam"  # others untouched

    muon = arguments.validate_args(_parse(arguments, monkeypatch, "--optimizer", "muon", "--use-distributed-optimizer"))
    assert muon.use_layer_wise_distributed_optimizer  # Megatron-LM's own names keep its behaviour
    with pytest.raises(SystemExit):
        _parse(arguments, monkeypatch, "--optimizer", "sinkgdd")
