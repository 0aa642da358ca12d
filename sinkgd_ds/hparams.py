"""Hyperparameter checks that fail at construction with the key, the value and what is allowed."""

from __future__ import annotations

import difflib
import math
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


def betas_pair(where: str, key: str, value: Any) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{where}: {key}={value!r} must be a pair (beta1, beta2), each in [0, 1)")
    return (unit_interval(where, f"{key}[0]", value[0]), unit_interval(where, f"{key}[1]", value[1]))


def one_of(where: str, key: str, value: Any, allowed: Iterable[str]) -> str:
    allowed = list(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{where}: {key}={value!r} is not allowed; use one of {', '.join(map(repr, allowed))}")
    return value
