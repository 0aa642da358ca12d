"""Megatron-LM (``megatron.training``): ``--optimizer sinkgd|scale|swan`` and their arguments.

Three wrappers, each installed wherever Megatron-LM bound the function (:func:`megatron_patch.rebind.rebind`:
0.16.1's ``initialize.py`` imports ``parse_args`` / ``validate_args`` by name at import time, later versions
look them up at call time):
  * ``arguments.parse_args``: chains :func:`add_arguments` after any ``extra_args_provider``;
  * ``arguments.validate_args``: validates our runs as ``adam`` runs. Megatron-LM otherwise treats
    every non-adam/sgd name as an "emerging" optimizer and turns ``--use-distributed-optimizer``
    into its layer-wise optimizer, which would give up exact sharded statistics;
  * ``training.get_megatron_optimizer_config``: builds our config class, so the extra fields survive.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from typing import Any

from sinkgd_ds.backends import IMPLEMENTATIONS
from sinkgd_ds.integrations.megatron import require

from .config import CONFIGS, OURS, SinkGDOptimizerConfig
from .rebind import rebind


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add our names to ``--optimizer`` and our hyperparameters (defaults = the config classes')."""
    for action in parser._actions:  # argparse has no public API to extend choices
        if "--optimizer" in action.option_strings and action.choices is not None:
            action.choices = [*action.choices, *(n for n in OURS if n not in action.choices)]
    g = parser.add_argument_group("sinkgd", "SinkGD / SCALE / SWAN (megatron_patch)")
    g.add_argument("--sinkgd-iters", type=int, default=5, help="Sinkhorn row/column passes per step (L).")
    g.add_argument("--sinkgd-lr-scale", type=float, default=0.05,
                   help="Matrices step with lr * this; embeddings, output layer and vectors use AdamW at lr.")
    g.add_argument("--sinkgd-no-split-fused", dest="sinkgd_split_fused", action="store_false",
                   help="Treat fused linear_qkv / SwiGLU linear_fc1 as one matrix each.")
    g.add_argument("--sinkgd-implementation", default="auto", choices=IMPLEMENTATIONS,
                   help="Engine backend: auto = Triton on CUDA, the native kernels on CPU.")
    g.add_argument("--sinkgd-stochastic-rounding", default=True, action=argparse.BooleanOptionalAction,
                   help="Round updates written into bf16 tensors stochastically (--no-sinkgd-stochastic-rounding: "
                        "to nearest). fp32 main params are unaffected.")
    g.add_argument("--sinkgd-rounding-seed", type=int, default=0, help="Seed of the stochastic-rounding hash.")
    g.add_argument("--scale-momentum", type=float, default=0.9, help="SCALE: output-layer momentum.")
    g.add_argument("--swan-ns-steps", type=int, default=5, help="SWAN: Newton-Schulz steps of the whitening.")
    return parser


def _chain(extra):
    def provider(parser):
        if extra is not None:
            parser = extra(parser)
        return add_arguments(parser)

    return provider


def config_from_args(args: Any) -> SinkGDOptimizerConfig:
    cls = CONFIGS[args.optimizer]
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def patch_training() -> None:
    """Install the three wrappers. Idempotent."""
    from megatron.training import arguments, training

    from .factory import check_name

    parse_args = require(arguments, "parse_args")
    if getattr(parse_args, "_sinkgd_patched", False):
        return
    validate_args = require(arguments, "validate_args")
    get_config = require(training, "get_megatron_optimizer_config")
    require(training, "get_standard_config_overrides")

    @functools.wraps(parse_args)
    def _parse_args(extra_args_provider=None, ignore_unknown_args=False):
        return parse_args(_chain(extra_args_provider), ignore_unknown_args)

    @functools.wraps(validate_args)
    def _validate_args(args, defaults={}):  # noqa: B006 - Megatron-LM's signature
        name = getattr(args, "optimizer", None)
        if name not in OURS:
            return validate_args(args, defaults)
        args.optimizer = "adam"
        try:
            out = validate_args(args, defaults)
        finally:
            args.optimizer = name
        return out

    @functools.wraps(get_config)
    def _get_config(args):
        if getattr(args, "optimizer", None) not in OURS:
            check_name(args)
            return get_config(args)
        config = config_from_args(args)
        return config, training.get_standard_config_overrides(config=config)

    _parse_args._sinkgd_patched = True  # type: ignore[attr-defined]
    # initialize.py binds parse_args / validate_args at import: import it now, so rebind reaches its copies
    import megatron.training.initialize  # noqa: F401

    rebind(arguments, "parse_args", _parse_args)
    rebind(arguments, "validate_args", _validate_args)
    rebind(training, "get_megatron_optimizer_config", _get_config)
