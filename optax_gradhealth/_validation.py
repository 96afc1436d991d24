"""Argument checks run when a transformation is built, never inside jit."""

from __future__ import annotations

import math
import numbers
from typing import Any

import optax


def _describe(value: Any) -> str:
    return f"{value!r} (type {type(value).__name__})"


def real_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {_describe(value)}.")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"`{name}` must not be NaN, got {value!r}.")
    return value


def positive(name: str, value: Any, *, allow_inf: bool = False) -> float:
    value = real_number(name, value)
    if not value > 0 or (math.isinf(value) and not allow_inf):
        allowed = "a positive number" + (" (inf allowed)" if allow_inf else ", finite")
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")
    return value


def non_negative(name: str, value: Any) -> float:
    value = real_number(name, value)
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
    return value


def in_open_unit_interval(name: str, value: Any) -> float:
    value = real_number(name, value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"`{name}` must lie strictly between 0 and 1, got {value!r}.")
    return value


def integer(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int >= {minimum}, got {_describe(value)}.")
    value = int(value)
    if value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return value


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {_describe(value)}.")
    return value


def optional(check, name: str, value: Any, **kwargs):
    return None if value is None else check(name, value, **kwargs)


def one_of(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {allowed}, got {_describe(value)}.")
    return value


def transformation(name: str, value: Any) -> optax.GradientTransformationExtraArgs:
    if not isinstance(value, optax.GradientTransformation) and not (
        callable(getattr(value, "init", None)) and callable(getattr(value, "update", None))
    ):
        raise TypeError(
            f"`{name}` must be an optax.GradientTransformation (e.g. optax.adamw(1e-3)), got {_describe(value)}."
        )
    if not isinstance(value, optax.GradientTransformation):
        value = optax.GradientTransformation(value.init, value.update)
    return optax.with_extra_args_support(value)
