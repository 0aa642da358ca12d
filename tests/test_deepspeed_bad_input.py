"""Bad DeepSpeed configs fail at deepspeed.initialize with a message naming the key and value."""

from __future__ import annotations

from .distributed import spawn
from .ds_model import make_model
from .ds_worker import ds_config

CASES = {
    "typo": ({"type": "SinkDG"}, "'SinkDG' is not a known optimizer. Did you mean 'SinkGD'?"),
    "unknown_key": ({"params": {"lr": 0.02, "sinkhorn_iter": 3}}, "unknown key 'sinkhorn_iter'"),
    "bad_value": ({"params": {"lr": 0.02, "sinkhorn_iters": 0}}, "sinkhorn_iters=0"),
    "negative_lr": ({"params": {"lr": -1}}, "lr=-1"),
    "offload": ({"zero": {"offload_optimizer": {"device": "cpu"}}}, "offload_optimizer.device='cpu'"),
    "nonfinite_value": ({"params": {"lr": 0.02, "nonfinite": "all"}},
                        "nonfinite='all' is not allowed; use one of 'step', 'matrix'"),
    "nonfinite_sharded": ({"params": {"lr": 0.02, "nonfinite": "matrix"}},  # ZeRO-2: ranks could disagree
                          "nonfinite='matrix' is only supported for unsharded parameters"),
}


def worker(rank, world):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    out = {}
    for name, (change, _) in CASES.items():
        cfg = ds_config("SinkGD", 2, world)
        if "type" in change:
            cfg["optimizer"]["type"] = change["type"]
        if "params" in change:
            cfg["optimizer"]["params"] = change["params"]
        if "zero" in change:
            cfg["zero_optimization"].update(change["zero"])
        try:
            deepspeed.initialize(model=make_model(), config=cfg)
            out[name] = None
        except Exception as e:  # noqa: BLE001 - the message is what we check
            out[name] = f"{type(e).__name__}: {e}"
    # lower-case spelling of our names is accepted
    cfg = ds_config("sinkgd", 2, world)
    engine, *_ = deepspeed.initialize(model=make_model(), config=cfg)
    out["lowercase"] = type(engine.basic_optimizer).__name__
    return out


def test_bad_configs_fail_clearly():
    (res,) = spawn(worker, 1)
    for name, (_, needle) in CASES.items():
        assert res[name] is not None, f"{name}: no error raised"
        assert res[name].startswith("ValueError"), res[name]
        assert needle in res[name], res[name]
    assert res["lowercase"] == "SinkGD"
