"""The real Megatron-LM entry points after ``megatron_patch.apply()``: argument parsing and validation, the
optimizer config, and Megatron's own optimizers left as they were (megatron-core 0.19's ``megatron.training``)."""

from __future__ import annotations

import sys
import types

import pytest

import megatron_patch
from megatron_patch import rebind

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--micro-batch-size", "2", "--train-iters", "2", "--lr", "0.02",
        "--vocab-size", "1023", "--tokenizer-type", "NullTokenizer", "--mock-data"]


@pytest.fixture(scope="module")
def patched():
    from megatron.training import arguments

    original = arguments.parse_args
    # a module that bound parse_args by name before apply(), as 0.16.1's megatron/training/initialize.py does
    early = types.ModuleType("early_binding")
    early.parse_args = original
    sys.modules["early_binding"] = early
    megatron_patch.apply()
    yield original, early
    del sys.modules["early_binding"]


def parse(monkeypatch, *argv: str):
    """What ``parse_and_validate_args`` (pretrain_gpt.py's first call) does before it sets Megatron's globals."""
    from megatron.training import arguments

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *BASE, *argv])
    args = arguments.parse_args()
    arguments.validate_args(args, {})
    return args


def test_every_binding_of_the_wrapped_functions_is_ours(patched):
    original, early = patched
    from megatron.training import arguments

    assert arguments.parse_args is not original and arguments.parse_args.__wrapped__ is original
    assert early.parse_args is arguments.parse_args  # bound before apply(), replaced all the same
    for module in list(sys.modules.values()):
        assert vars(module).get("parse_args") is not original, module.__name__
    megatron_patch.apply()  # idempotent: nothing wrapped twice
    assert arguments.parse_args.__wrapped__ is original


def test_our_flags_parse_validate_and_reach_the_config(patched, monkeypatch):
    from megatron.training import training

    args = parse(monkeypatch, "--optimizer", "scale", "--scale-momentum", "0.8", "--sinkgd-iters", "3",
                 "--use-distributed-optimizer")
    assert args.optimizer == "scale" and args.use_distributed_optimizer
    assert not args.use_layer_wise_distributed_optimizer  # not turned into Megatron's layer-wise optimizer
    config, _ = training.get_megatron_optimizer_config(args)
    assert type(config) is megatron_patch.SCALEOptimizerConfig
    assert (config.scale_momentum, config.sinkgd_iters, config.use_distributed_optimizer) == (0.8, 3, True)


def test_megatrons_own_optimizers_keep_their_behaviour(patched, monkeypatch):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.training import training

    args = parse(monkeypatch, "--optimizer", "muon", "--use-distributed-optimizer")
    assert args.use_layer_wise_distributed_optimizer and not args.use_distributed_optimizer  # Megatron's rule
    config, _ = training.get_megatron_optimizer_config(args)
    assert type(config) is OptimizerConfig and config.optimizer == "muon"
    with pytest.raises(ImportError, match="emerging-optimizers package is required for optimizer='muon'"):
        get_megatron_optimizer(OptimizerConfig(optimizer="muon", lr=0.01), [object()])  # Megatron's own answer
    with pytest.raises(ValueError, match=r"optimizer='sinkdg' is not supported\. Did you mean 'sinkgd'\?"):
        get_megatron_optimizer(OptimizerConfig(optimizer="sinkdg", lr=0.01), [object()])
    with pytest.raises(SystemExit):
        parse(monkeypatch, "--optimizer", "sinkgdd")  # argparse's choices, ours added to Megatron's


def test_rebind_reports_what_it_changed():
    holder = types.ModuleType("holder")
    user = types.ModuleType("user_of_holder")
    holder.f = user.f = lambda: 1
    sys.modules.update({"holder": holder, "user_of_holder": user})
    try:
        changed = rebind.rebind(holder, "f", lambda: 2)
        assert changed == ["holder", "user_of_holder"] and user.f() == 2 and holder.f.__wrapped__() == 1
    finally:
        del sys.modules["holder"], sys.modules["user_of_holder"]
