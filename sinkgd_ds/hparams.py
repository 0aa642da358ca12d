"""Hyperparameter checks that fail at construction with the key, the value and what is allowed."""

from __future__ import annotations

import difflib
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any


def _suggest(key: str, allowed: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def check_known_keys(where: str, given: Mapping[str, Any], allowed: Iterable[str]) -> None:
    allowed = sorted(allowed)
    for key in given:
        if key not in allowed:
            raise ValueError(f"{where}: unknown key {key!r} (value {given[key]!r}).{_suggest(key, allowed)} "
                             f"Allowed keys: {', '.join(allowed)}.")


def _number(where: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: {key}={value!r} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{where}: {key}={value!r} must be finite")
    return float(value)


def learning_rate(where: str, key: str, value: Any) -> float:
    """A learning rate: a number >= 0, or (as torch's optimizers accept, so that torch.compile users change it
    without recompiling) a 1-element tensor holding one; its value is returned."""
    import torch

    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{where}: {key} is a tensor of shape {tuple(value.shape)}: Tensor lr must be 1-element")
        if value.is_complex() or not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"{where}: {key} is a {value.dtype} tensor; a tensor lr must hold a real number")
        value = value.item()
    return non_negative(where, key, value)


def non_negative(where: str, key: str, value: Any) -> float:
    v = _number(where, key, value)
    if v < 0:
        raise ValueError(f"{where}: {key}={value!r} is not allowed; it must be >= 0")
    return v


def positive(where: str, key: str, value: Any) -> float:
    v = _number(where, key, value)
    if v <= 0:
        raise ValueError(f"{where}: {key}={value!r} is not allowed; it must be > 0")
    return v


def unit_interval(where: str, key: str, value: Any) -> float:
    v = _number(where, key, value)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"{where}: {key}={value!r} is not allowed; it must be in [0, 1)")
    return v


def int_at_least(where: str, key: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {key}={value!r} must be an integer >= {low}, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{where}: {key}={value!r} is not allowed; it must be an integer >= {low}")
    return value


def boolean(where: str, key: str, value: Any) -> bool:
    """A switch: exactly True or False (JSON true/false), never a string such as "false", which is truthy."""
    if not isinstance(value, bool):
        raise ValueError(f"{where}: {key}={value!r} is not allowed; it must be True or False (JSON true / false), "
                         f"got {type(value).__name__}")
    return value


def betas_pair(where: str, key: str, value: Any) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{where}: {key}={value!r} must be a pair (beta1, beta2), each in [0, 1)")
    return (unit_interval(where, f"{key}[0]", value[0]), unit_interval(where, f"{key}[1]", value[1]))


def one_of(where: str, key: str, value: Any, allowed: Iterable[str]) -> str:
    allowed = list(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{where}: {key}={value!r} is not allowed; use one of {', '.join(map(repr, allowed))}")
    return value


def int_in_range(where: str, key: str, value: Any, low: int, high: int) -> int:
    """An integer count with a sane ceiling: a loop count of 10**9 would never finish, so it is refused."""
    int_at_least(where, key, value, low)
    if value > high:
        raise ValueError(f"{where}: {key}={value!r} is not allowed; it must be an integer in [{low}, {high}]")
    return value


def warn_above(where: str, key: str, value: float, limit: float, why: str) -> None:
    """Accepted, but far from every published setting: say so once at construction."""
    if value > limit:
        warnings.warn(f"{where}: {key}={value!r} is unusually large (> {limit}); {why}", UserWarning, stacklevel=4)


def decay_factor(where: str, lr: float, weight_decay: float) -> None:
    """Decoupled weight decay multiplies weights by 1 - lr * weight_decay (AdamW groups; matrices by less): it must
    stay positive."""
    if lr * weight_decay >= 1.0:
        raise ValueError(f"{where}: weight_decay={weight_decay!r} with lr={lr!r} is not allowed: the decoupled decay "
                         f"factor 1 - lr * weight_decay would be <= 0 (weights flipped or zeroed every step); "
                         f"it needs lr * weight_decay < 1")


def regex_list(where: str, key: str, value: Any) -> list[re.Pattern]:
    """Parameter-name patterns: a list of regular expressions (a bare string would be split into letters)."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: {key}={value!r} must be a list of regular expressions, got {type(value).__name__}")
    out = []
    for pattern in value:
        if not isinstance(pattern, str):
            raise ValueError(f"{where}: {key} holds {pattern!r}; each entry must be a regular expression string")
        try:
            out.append(re.compile(pattern))
        except re.error as e:
            raise ValueError(f"{where}: {key} entry {pattern!r} is not a valid regular expression ({e})") from None
    return out
