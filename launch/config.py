"""Run configuration: a model/run JSON from ``configs/models`` plus command-line overrides, and the
DeepSpeed JSON completed from it (schedule, batch, monitor paths).

All validation happens here, before any process group exists, and every error names the key, the
value and what is allowed (with the closest known key for typos).
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launch.errors import CheckpointSaveError, ConfigError, DataError

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = ROOT / "configs" / "models"


# section -> key -> (allowed types, default). Keys starting with "_" are comments / sources, ignored.
SCHEMA: dict[str, dict[str, tuple[tuple[type, ...], Any]]] = {
    "model": {
        "hidden_size": ((int,), None), "intermediate_size": ((int,), None), "num_attention_heads": ((int,), None),
        "num_key_value_heads": ((int, type(None)), None), "num_hidden_layers": ((int,), None),
        "max_position_embeddings": ((int,), None), "rms_norm_eps": ((float,), 1e-6),
        "rope_theta": ((float,), 10000.0), "tie_word_embeddings": ((bool,), False),
        "initializer_range": ((float,), 0.02),
    },
    "train": {
        "steps": ((int,), None), "batch_size": ((int,), None), "seq_len": ((int,), 256),
        "warmup_fraction": ((float,), 0.1), "min_lr_ratio": ((float,), 0.1), "seed": ((int,), 0),
        "log_every": ((int,), 10),
    },
    "eval": {"every": ((int,), 100), "sequences": ((int,), 64)},
    "checkpoint": {"every": ((int,), 0), "keep": ((int,), 2)},
    "data": {
        "source": ((str,), "shakespeare"), "vocab_size": ((int,), 4096), "val_fraction": ((float,), 0.1),
        "tokenizer": ((str, type(None)), None), "text_column": ((str,), "text"), "order": ((str,), "random"),
    },
}
DATA_ORDERS = ("random", "shuffled")
REQUIRED = {"model": ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                      "max_position_embeddings"), "train": ("steps", "batch_size")}


def _closest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def _check_type(where: str, value: Any, types: tuple[type, ...]) -> Any:
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if int in types and isinstance(value, bool):
        raise ConfigError(f"{where}={value!r} must be an integer")
    if not isinstance(value, types):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise ConfigError(f"{where}={value!r} must be {names}, got {type(value).__name__}")
    return value


def validate(cfg: dict[str, Any], origin: str) -> dict[str, Any]:
    """Unknown sections/keys and wrong types fail with the closest name; defaults are filled in."""
    out: dict[str, dict[str, Any]] = {s: {k: d for k, (_, d) in keys.items()} for s, keys in SCHEMA.items()}
    for section, body in cfg.items():
        if section.startswith("_"):
            continue
        if section not in SCHEMA:
            raise ConfigError(f"{origin}: unknown section {section!r}.{_closest(section, list(SCHEMA))} "
                              f"Allowed sections: {', '.join(SCHEMA)}.")
        if not isinstance(body, dict):
            raise ConfigError(f"{origin}: section {section!r} must be an object, got {type(body).__name__}")
        for key, value in body.items():
            if key.startswith("_"):
                continue
            if key not in SCHEMA[section]:
                allowed = list(SCHEMA[section])
                raise ConfigError(f"{origin}: unknown key {section}.{key} (value {value!r}).{_closest(key, allowed)} "
                                  f"Allowed keys in {section!r}: {', '.join(allowed)}.")
            out[section][key] = _check_type(f"{origin}: {section}.{key}", value, SCHEMA[section][key][0])
    for section, keys in REQUIRED.items():
        for key in keys:
            if out[section][key] is None:
                raise ConfigError(f"{origin}: {section}.{key} is required")
    _check_values(out, origin)
    return out


def _check_values(cfg: dict[str, Any], origin: str) -> None:
    m, t, e, c, d = (cfg[s] for s in ("model", "train", "eval", "checkpoint", "data"))
    positive = [("model", k) for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                                        "max_position_embeddings")] + [("train", "steps"), ("train", "batch_size"),
                                                                       ("train", "seq_len"), ("train", "log_every")]
    for s, k in positive:
        if cfg[s][k] <= 0:
            raise ConfigError(f"{origin}: {s}.{k}={cfg[s][k]} must be > 0")
    for s, k in (("eval", "every"), ("eval", "sequences"), ("checkpoint", "every"), ("checkpoint", "keep")):
        if cfg[s][k] < 0:
            raise ConfigError(f"{origin}: {s}.{k}={cfg[s][k]} must be >= 0 (0 turns it off)")
    if m["hidden_size"] % m["num_attention_heads"]:
        raise ConfigError(f"{origin}: model.hidden_size={m['hidden_size']} is not divisible by "
                          f"model.num_attention_heads={m['num_attention_heads']}")
    kv = m["num_key_value_heads"] or m["num_attention_heads"]
    if m["num_attention_heads"] % kv:
        raise ConfigError(f"{origin}: model.num_attention_heads={m['num_attention_heads']} is not divisible by "
                          f"model.num_key_value_heads={kv}")
    if t["seq_len"] > m["max_position_embeddings"]:
        raise ConfigError(f"{origin}: train.seq_len={t['seq_len']} is longer than the model allows "
                          f"(model.max_position_embeddings={m['max_position_embeddings']})")
    for k in ("warmup_fraction", "min_lr_ratio"):
        if not 0.0 <= t[k] <= 1.0:
            raise ConfigError(f"{origin}: train.{k}={t[k]} must be in [0, 1]")
    if not 0.0 < d["val_fraction"] < 1.0:
        raise ConfigError(f"{origin}: data.val_fraction={d['val_fraction']} must be in (0, 1)")
    if d["vocab_size"] < 258 and not d["source"].startswith("megatron:") and d["tokenizer"] is None:
        raise ConfigError(f"{origin}: data.vocab_size={d['vocab_size']} must be >= 258 for a byte-level BPE "
                          "(256 bytes + <|endoftext|> + one merge)")
    if d["order"] not in DATA_ORDERS:
        raise ConfigError(f"{origin}: data.order={d['order']!r} is not known; allowed: {', '.join(DATA_ORDERS)} "
                          "(random: windows drawn with replacement; shuffled: each epoch's non-overlapping windows "
                          "in a seeded order, no token seen twice before the next epoch)")
    if e["every"] and not e["sequences"]:
        raise ConfigError(f"{origin}: eval.every={e['every']} needs eval.sequences > 0")
    del c


def parse_value(text: str) -> Any:
    """``--set k=v`` values: JSON when it parses (numbers, true, null), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def model_file(name: str) -> Path:
    """``tiny`` / ``60m`` / ... (files in configs/models) or a path to a JSON file."""
    path = Path(name)
    if path.suffix == ".json" or os.sep in name:
        if not path.is_file():
            raise ConfigError(f"--model {name}: no such file")
        return path
    known = sorted(p.stem for p in MODELS_DIR.glob("*.json"))
    if name not in known:
        raise ConfigError(f"--model {name!r} is not a known model config.{_closest(name, known)} "
                          f"Known: {', '.join(known)} (configs/models/), or a path to a JSON file.")
    return MODELS_DIR / f"{name}.json"


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{what} {path}: no such file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: must be a JSON object")
    return data


def load_run_config(model: str, overrides: list[str]) -> dict[str, Any]:
    """The model/run JSON with ``section.key=value`` overrides applied, validated as a whole."""
    path = model_file(model)
    raw = copy.deepcopy(read_json(path, "model config"))
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.steps=100")
        raw.setdefault(section, {})
        if isinstance(raw[section], dict):
            raw[section][name] = parse_value(value)
    return validate(raw, f"{path.name} + overrides" if overrides else path.name)


# ---------------------------------------------------------------------- the DeepSpeed JSON
def world_size_from_env() -> int:
    """Every launcher sets this before our script runs; reading it lets us check batch sizes pre-init."""
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 1


def known_optimizers() -> list[str]:
    import torch

    from sinkgd_ds.registry import names

    try:
        from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
    except ImportError:
        DEEPSPEED_OPTIMIZERS = []
    torch_names = [n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type) and n[0].isupper()]
    return sorted({*names(), *DEEPSPEED_OPTIMIZERS, *torch_names})


def resolve_ds_config(path: Path, run: dict[str, Any], out_dir: Path, micro_batch: int | None,
                      bf16: bool, world: int, pure_bf16: bool = False) -> dict[str, Any]:
    """Fill in what the run config owns: batch split, the 10%-warmup cosine schedule, monitor paths."""
    from sinkgd_ds.registry import lookup, names

    ds = copy.deepcopy(read_json(path, "--deepspeed_config"))
    t = run["train"]
    opt = ds.get("optimizer")
    if not isinstance(opt, dict) or "type" not in opt:
        raise ConfigError(f"{path}: needs an \"optimizer\": {{\"type\": ..., \"params\": {{...}}}} section")
    known = known_optimizers()
    if opt["type"].lower() not in {n.lower() for n in known}:
        raise ConfigError(f"{path}: optimizer.type={opt['type']!r} is not a known optimizer."
                          f"{_closest(opt['type'], known)} sinkgd_ds provides {', '.join(names())}.")
    ours = lookup(opt["type"])
    if ours is not None:
        params = opt.get("params", {})
        if not isinstance(params, dict):
            raise ConfigError(f"{path}: optimizer.params={params!r} must be an object")
        try:  # the optimizer's own checks, before any process group exists
            ours.cls.check_options(f"{path}: optimizer.params", **params)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if opt["type"].lower() in ("adam", "adamw") and not opt.get("params", {}).get("torch_adam"):
        raise ConfigError(f"{path}: optimizer {opt['type']} without \"torch_adam\": true JIT-builds FusedAdam "
                          "(minutes, and GPU only); add \"torch_adam\": true to its params")
    if micro_batch is not None:
        ds["train_micro_batch_size_per_gpu"] = micro_batch
    micro = ds.get("train_micro_batch_size_per_gpu")
    if not isinstance(micro, int) or micro <= 0:
        raise ConfigError(f"{path}: train_micro_batch_size_per_gpu={micro!r} must be a positive integer")
    if t["batch_size"] % (micro * world):
        raise ConfigError(f"train.batch_size={t['batch_size']} is not divisible by train_micro_batch_size_per_gpu="
                          f"{micro} x world size {world}; allowed: multiples of {micro * world}")
    ds["train_batch_size"] = t["batch_size"]
    ds["gradient_accumulation_steps"] = t["batch_size"] // (micro * world)
    if bf16 or pure_bf16:
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": True}
    if pure_bf16:
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        if stage not in (1, 2, 3):
            raise ConfigError(f"--pure_bf16 needs ZeRO stage 1, 2 or 3 (DeepSpeed keeps fp32 masters at stage 0); "
                              f"{path} has zero_optimization.stage={stage}")
        ds["bf16"].update(bf16_master_weights_and_grads=True, bf16_optimizer_states=True)
    if ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{path}: fp16 is not supported here (CPU has none; the papers use bf16): use \"bf16\"")
    sched = ds.setdefault("scheduler", {"type": "WarmupCosineLR", "params": {}})
    if sched.get("type") == "WarmupCosineLR":
        p = sched.setdefault("params", {})
        auto = {"total_num_steps": t["steps"], "warmup_num_steps": max(1, round(t["warmup_fraction"] * t["steps"])),
                "cos_min_ratio": t["min_lr_ratio"], "warmup_type": "linear"}
        for k, v in auto.items():
            if p.get(k, "auto") == "auto":
                p[k] = v
    for mon in ("csv_monitor", "tensorboard"):
        if isinstance(ds.get(mon), dict) and ds[mon].get("enabled"):
            ds[mon].setdefault("output_path", "")
            ds[mon]["output_path"] = ds[mon]["output_path"] or str(out_dir / "logs")
            ds[mon].setdefault("job_name", mon)
    ds.setdefault("steps_per_print", 10**9)
    return ds


def add_run_control_args(ap: argparse.ArgumentParser) -> None:
    """The options every main-job entry shares: resuming, restarting, stopping early, output."""
    ap.add_argument("--overwrite", action="store_true", help="delete --out first (a fresh run in the same place)")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    ap.add_argument("--resume_fallback", action="store_true",
                    help="with --resume: if the latest checkpoint is incomplete, damaged or cannot be loaded by this "
                    "run, resume from the newest older kept one that checks out (the rejected ones are renamed "
                    "<tag>.rejected)")
    ap.add_argument("--stop_at_step", type=int, default=None,
                    help="behave as if SIGTERM arrived after this step (checkpoint + exit); for tests")
    ap.add_argument("--no_progress", action="store_true", help="plain log lines instead of a progress bar")
    ap.add_argument("--summary_json", default=None, help="also write the summary here (default <out>/summary.json)")


def check_stop_at_step(stop_at_step: int | None, steps: int) -> None:
    if stop_at_step is not None and not 0 < stop_at_step <= steps:
        raise ConfigError(f"--stop_at_step={stop_at_step} must be in [1, train.steps={steps}]")


def run_entry(prepare: Callable[[], dict[str, Any]], train: Callable[[dict[str, Any]], int]) -> int:
    """Every check first: bad input (a ConfigError or DataError, a checkpoint that cannot be resumed) prints
    ``error: ...`` and exits 2 before any process group starts; otherwise train on the prepared plan. A checkpoint
    the engine then fails to load (exit 2, before the first step) or a save that cannot finish (exit 1) ends the
    rank the same way, with the message instead of a traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        plan = prepare()
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        return train(plan)
    except (ConfigError, CheckpointSaveError) as e:
        if getattr(e, "announce", True):
            print(f"error: {e}", file=sys.stderr, flush=True)
        _leave_process_group()
        return 2 if isinstance(e, ConfigError) else 1


def _leave_process_group() -> None:
    """After an error every rank raised alike: tear the process group down instead of leaving gloo threads."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
