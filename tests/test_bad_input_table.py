"""One table of bad hyperparameters, walked through every user-facing entry.

Each row is (optimizers it applies to, key, value, what the message must say, error or warning). Every
entry must refuse an error row before the first step with a message naming the key, the value and what
is allowed, and must warn (and go on) for a warning row:
  * the optimizer constructors (SinkGD, SCALE, SWAN);
  * DeepSpeed JSON ``"optimizer": {"type": ..., "params": {...}}`` at ``deepspeed.initialize``;
  * Megatron: the config fields / Megatron-LM flags (``--sinkgd-iters`` ...), in ``check_config``;
  * the main job's DeepSpeed JSON, checked before any process group starts (``resolve_ds_config``).
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from sinkgd_ds import SCALE, SWAN, SinkGD

from .distributed import spawn
from .ds_model import make_model
from .ds_worker import ds_config

ALL = ("SinkGD", "SCALE", "SWAN")
CLASSES = {"SinkGD": SinkGD, "SCALE": SCALE, "SWAN": SWAN}
ERROR, WARN = "error", "warning"
TABLE = [
    (ALL, "lr", -1, "must be >= 0", ERROR),
    (ALL, "lr", math.nan, "must be finite", ERROR),
    (ALL, "lr", "0.02", "must be a number", ERROR),
    (ALL, "lr", 5.0, "unusually large", WARN),
    (ALL, "lr_scale", 0, "must be > 0", ERROR),
    (ALL, "lr_scale", 2.0, "unusually large", WARN),
    (ALL, "weight_decay", -0.1, "must be >= 0", ERROR),
    (ALL, "weight_decay", 100.0, "lr * weight_decay < 1", ERROR),
    (ALL, "eps", 0, "must be > 0", ERROR),
    (ALL, "betas", (0.9, 1.0), "must be in [0, 1)", ERROR),
    (ALL, "betas", 0.9, "must be a pair", ERROR),
    (("SinkGD",), "sinkhorn_iters", 0, "must be an integer >= 1", ERROR),
    (("SinkGD",), "sinkhorn_iters", 10**9, "must be an integer in [1, 1000]", ERROR),
    (("SinkGD",), "sinkhorn_iters", 2.5, "must be an integer", ERROR),
    (("SinkGD",), "sinkhorn_iters", 50, "unusually large", WARN),
    (("SinkGD",), "sinkhorn_iter", 3, "unknown key 'sinkhorn_iter'", ERROR),
    (("SinkGD",), "nonfinite", "all", "use one of 'step', 'matrix'", ERROR),
    (("SCALE",), "momentum", 1.0, "must be in [0, 1)", ERROR),
    (("SWAN",), "ns_steps", 0, "must be an integer >= 1", ERROR),
    (("SWAN",), "ns_steps", 10**6, "must be an integer in [1, 1000]", ERROR),
    (("SinkGD", "SWAN"), "fallback_patterns", "embed", "must be a list of regular expressions", ERROR),
    (("SinkGD", "SWAN"), "fallback_patterns", ["("], "is not a valid regular expression", ERROR),
    (("SCALE",), "head_patterns", ["["], "is not a valid regular expression", ERROR),
    (ALL, "implementation", "cuda", "use one of auto, torch, native, triton", ERROR),
    (ALL, "stochastic_rounding", "false", "must be True or False", ERROR),
    (ALL, "rounding_seed", -1, "must be an integer >= 0", ERROR),
    (ALL, "rounding_seed", 2**31, "must be an integer in [0, 2147483647]", ERROR),
]
# the Megatron config field (Megatron-LM flag) of each key; keys without one are not reachable from there
MEGATRON_FIELD = {"lr": "lr", "lr_scale": "sinkgd_lr_scale", "weight_decay": "weight_decay", "eps": "adam_eps",
                  "sinkhorn_iters": "sinkgd_iters", "momentum": "scale_momentum", "ns_steps": "swan_ns_steps",
                  "implementation": "sinkgd_implementation", "stochastic_rounding": "sinkgd_stochastic_rounding",
                  "rounding_seed": "sinkgd_rounding_seed"}


def rows(entry_keys=None):
    for opts, key, value, needle, kind in TABLE:
        for opt in opts:
            if entry_keys is None or key in entry_keys:
                yield pytest.param(opt, key, value, needle, kind, id=f"{opt}-{key}-{value!r}")


def named_params():
    return list(make_model().named_parameters())


def check_message(msg: str, key: str, value, needle: str) -> None:
    assert needle in msg, msg
    assert key in msg, msg
    if not isinstance(value, (list, tuple)) and not (isinstance(value, float) and math.isnan(value)):
        assert repr(value) in msg, msg


@pytest.mark.parametrize("opt, key, value, needle, kind", list(rows()))
def test_optimizer_constructors(opt, key, value, needle, kind):
    build = lambda: CLASSES[opt](named_params(), **{key: value})  # noqa: E731
    if kind == ERROR:
        with pytest.raises(ValueError) as e:
            build()
        check_message(str(e.value), key, value, needle)
    else:
        with pytest.warns(UserWarning, match=needle) as rec:
            build()
        check_message(str(rec[0].message), key, value, needle)


def ds_worker(rank, world, cases):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    out = []
    for opt, key, value in cases:
        cfg = ds_config(opt, 2, world)
        cfg["optimizer"]["params"][key] = list(value) if isinstance(value, tuple) else value
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            try:
                engine, *_ = deepspeed.initialize(model=make_model(), config=cfg)
                err = None
                engine.destroy() if hasattr(engine, "destroy") else None
            except Exception as e:  # noqa: BLE001 - the message is what we check
                err = f"{type(e).__name__}: {e}"
        out.append((err, [str(w.message) for w in rec if issubclass(w.category, UserWarning)]))
    return out


def test_deepspeed_json_params():
    cases = [(opt, key, value, needle, kind) for opts, key, value, needle, kind in TABLE for opt in opts]
    (res,) = spawn(ds_worker, 1, [c[:3] for c in cases], timeout=600)
    for (opt, key, value, needle, kind), (err, warned) in zip(cases, res):
        where = (opt, key, value)
        if kind == ERROR:
            assert err is not None and err.startswith("ValueError"), (where, err)
            check_message(err, key, value, needle)
        else:
            assert err is None, (where, err)
            hits = [w for w in warned if needle in w]
            assert hits, (where, warned)
            check_message(hits[0], key, value, needle)


megatron_rows = list(rows(MEGATRON_FIELD))


@pytest.mark.parametrize("opt, key, value, needle, kind", megatron_rows)
def test_megatron_config_fields(opt, key, value, needle, kind):
    megatron_patch = pytest.importorskip("megatron_patch")
    from megatron_patch.factory import check_config

    cls = {"SinkGD": megatron_patch.SinkGDOptimizerConfig, "SCALE": megatron_patch.SCALEOptimizerConfig,
           "SWAN": megatron_patch.SWANOptimizerConfig}[opt]
    field = MEGATRON_FIELD[key]
    base = dict(lr=0.02, weight_decay=0.0)
    config = cls(**{**base, field: value})
    if kind == ERROR:
        with pytest.raises(ValueError) as e:
            check_config(config, [], [])
        msg = str(e.value)
        assert f"--{field.replace('_', '-')}" in msg or field == "weight_decay", msg
        check_message(msg, field, value, needle)
    else:
        with pytest.warns(UserWarning, match=needle):
            check_config(config, [], [])


def test_megatron_adam_betas():
    megatron_patch = pytest.importorskip("megatron_patch")
    from megatron_patch.factory import check_config

    with pytest.raises(ValueError, match=r"adam_beta1/adam_beta2=\(0\.9, 1\.0\).*betas\[1\]=1\.0 .*\[0, 1\)"):
        check_config(megatron_patch.SinkGDOptimizerConfig(lr=0.02, adam_beta2=1.0), [], [])


@pytest.mark.parametrize("opt, key, value, needle, kind", [r for r in rows() if r.values[4] == ERROR])
def test_main_job_deepspeed_json(tmp_path, opt, key, value, needle, kind):
    from launch.config import ConfigError, load_run_config, resolve_ds_config

    cfg = ds_config(opt, 2, 1)
    cfg["optimizer"]["params"][key] = list(value) if isinstance(value, tuple) else value
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:  # before any process group: no torch.distributed here
        resolve_ds_config(path, load_run_config("tiny", []), tmp_path, None, False, 1)
    assert str(path) in str(e.value)
    check_message(str(e.value), key, value, needle)
    assert not torch.distributed.is_initialized()


def test_routing_refusals():
    """A model with no matrix, and a ZeRO-3 parameter without its logical shape, are refused loudly."""
    vectors = [("norm.weight", torch.nn.Parameter(torch.ones(4))), ("embed_tokens.weight",
                                                                   torch.nn.Parameter(torch.ones(5, 4)))]
    for cls in (SinkGD, SWAN):
        with pytest.raises(ValueError, match="none of the 2 parameters is a matrix"):
            cls(vectors)
    odd = torch.nn.Parameter(torch.ones(0))
    odd.ds_id = 7  # a ZeRO-3 placeholder that lost its ds_shape
    with pytest.raises(ValueError, match="ds_id=7.*no ds_shape"):
        SinkGD([("w", odd), ("m", torch.nn.Parameter(torch.ones(3, 3)))])
