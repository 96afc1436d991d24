"""Argument checks run when a transformation is built, never inside jit; and
:func:`state_type`, the check of an update's state, which reads its Python type only."""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _describe(value: Any) -> str:
    kind = type(value)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return f"{value!r} (type {name})"


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


def is_array_like(value: Any) -> bool:
    """A jax or numpy array (or numpy scalar): a hyperparameter that may be traced, e.g.
    injected by ``optax.inject_hyperparams``. Python numbers are not array-like."""
    return isinstance(value, (jax.Array, np.ndarray, np.generic))


def or_array(check: Any, name: str, value: Any, **kwargs: Any) -> Any:
    """``check(name, value)`` for a Python number; a real scalar array is returned as it
    is (its dtype kept), after ``check`` of its value when it is concrete (a numpy
    scalar, or the array ``optax.inject_hyperparams`` makes of a number outside jit). A
    traced one (the same argument inside a jitted update) cannot be checked: only its
    shape and dtype are."""
    if not is_array_like(value) and not isinstance(value, jax.core.Tracer):
        return check(name, value, **kwargs)
    shape, dtype = tuple(np.shape(value)), np.dtype(value.dtype)
    # (jnp.issubdtype knows bfloat16 and the fp8 types as floating; np.issubdtype does not.)
    if shape != () or not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise ValueError(
            f"`{name}` must be a number or a real scalar array, got an array of shape {shape} and dtype {dtype}."
        )
    if not isinstance(value, jax.core.Tracer):
        check(name, np.asarray(value).item(), **kwargs)
    return value


def positive_or_array(name: str, value: Any, *, allow_inf: bool = False) -> Any:
    """A positive Python number (validated now), or a scalar array (see :func:`or_array`)."""
    return or_array(positive, name, value, allow_inf=allow_inf)


def concrete_values(**values: Any) -> dict[str, float]:
    """The values that are known now, as floats: Python numbers and concrete scalar
    arrays; a traced one (inside a jitted update) is left out of checks between
    arguments."""
    return {name: float(v) for name, v in values.items() if not isinstance(v, jax.core.Tracer)}


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


#: The largest int an argument may be: every count, step and size is compared with (or
#: stored in) an int32 inside the jitted step, where a larger Python int fails to trace.
INT32_MAX = 2**31 - 1


def integer(name: str, value: Any, *, minimum: int, maximum: int | None = INT32_MAX) -> int:
    """An int >= ``minimum`` (a bool is not one), at most ``maximum``: by default
    :data:`INT32_MAX`, for the counts, steps and sizes an int32 holds or is compared with;
    ``None`` for an int that never enters the jitted step (a seed numpy reads)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        hint = ""
        if is_array_like(value) or isinstance(value, jax.core.Tracer):
            hint = f" (it cannot be an array: under optax.inject_hyperparams pass static_args=('{name}',))"
        raise TypeError(f"`{name}` must be an int >= {minimum}, got {_describe(value)}{hint}.")
    value = int(value)
    if value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    if maximum is not None and value > maximum:
        why = " (2**31 - 1: it is compared with int32 step counts)" if maximum == INT32_MAX else ""
        raise ValueError(f"`{name}` must be an int <= {maximum}{why}, got {value!r}.")
    return value


def int_or_ints(
    name: str, value: Any, *, distinct: bool = False, or_none: bool = False, context: str = ""
) -> int | tuple[int, ...] | None:
    """An int, or a non-empty tuple (or list) of ints (``distinct``: no repeats), as
    ``jax.grad``'s ``argnums`` or an ``axis`` take them, or None if ``or_none``; bools
    are not ints here. ``context`` prefixes the error (the transformation's name)."""
    if or_none and value is None:
        return None

    def one(a: Any) -> bool:
        return isinstance(a, (int, np.integer)) and not isinstance(a, (bool, np.bool_))

    if one(value):
        return int(value)
    if isinstance(value, (tuple, list)) and value and all(one(a) for a in value):
        if not distinct or len(set(value)) == len(value):
            return tuple(int(a) for a in value)
    kind = "distinct ints" if distinct else "ints"
    hint = f" (under optax.inject_hyperparams, pass static_args=('{name}',))" if is_array_like(value) else ""
    allowed = ("None, an int" if or_none else "an int") + f" or a non-empty tuple of {kind}"
    raise TypeError(f"{context}`{name}` must be {allowed}, got {_describe(value)}{hint}.")


def integer_or_array(name: str, value: Any, *, minimum: int) -> Any:
    """An int (validated now): a Python int, or a concrete integer scalar array (as
    ``optax.inject_hyperparams`` makes of every numeric argument, outside jit). A traced
    integer scalar (the same argument inside a jitted update) is passed through as it is:
    it cannot be checked, and a caller that sizes a buffer with it takes the size from
    the state instead."""
    if is_array_like(value) or isinstance(value, jax.core.Tracer):
        shape, dtype = tuple(np.shape(value)), np.dtype(value.dtype)
        if shape != () or not np.issubdtype(dtype, np.integer):
            raise TypeError(
                f"`{name}` must be an int >= {minimum} or an integer scalar array, got an array of shape "
                f"{shape} and dtype {dtype}."
            )
        if isinstance(value, jax.core.Tracer):
            return value
        value = int(value)
    return integer(name, value, minimum=minimum)


def boolean(name: str, value: Any, *, context: str = "") -> bool:
    """True or False (a numpy bool too); anything else, a string "False" included, is
    an error rather than read by its truth value. ``context`` prefixes the error (the
    function's name)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{context}`{name}` must be True or False, got {_describe(value)}.")
    return bool(value)


def optional(check, name: str, value: Any, **kwargs):
    return None if value is None else check(name, value, **kwargs)


def one_of(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    # A string first: `in` compares an array elementwise (numpy then raises its own
    # ambiguity error, which names no argument).
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"`{name}` must be one of {allowed}, got {_describe(value)}.")
    return str(value)


def transformation(name: str, value: Any) -> optax.GradientTransformationExtraArgs:
    if not isinstance(value, optax.GradientTransformation) and not (
        callable(getattr(value, "init", None)) and callable(getattr(value, "update", None))
    ):
        raise TypeError(
            f"`{name}` must be an optax.GradientTransformation (e.g. optax.adamw(1e-3)), got {_describe(value)}."
        )
    if isinstance(value, optax.GradientTransformationExtraArgs):
        return value
    if _takes_keywords(value.update):
        # It takes extra arguments without declaring it by its type: an
        # `optax.MultiSteps`, or its `.gradient_transformation()`, which forward them to
        # the optimizer they wrap (a guard's `loss=`). `with_extra_args_support` would
        # drop them.
        return optax.GradientTransformationExtraArgs(value.init, value.update)
    if not isinstance(value, optax.GradientTransformation):
        value = optax.GradientTransformation(value.init, value.update)
    return optax.with_extra_args_support(value)


def state_type(what: str, state: Any, cls: type) -> None:
    """Refuses a ``state`` that is not a ``cls``: the NamedTuple that the init of the
    transformation ``what`` (e.g. ``"gh.clip_by_global_norm"``) returns, as every form
    that its update accepts is (the state itself, and one restored into the structure of
    ``tx.init(params)``). The error names ``what``, the type received and ``cls``, with a
    hint at the usual mistakes. Called at the top of an ``update_fn``: a check of the
    Python type only, at trace time, that leaves the compiled program as it is."""
    if isinstance(state, cls):
        return
    if state is None:
        hint = "Pass the state that tx.init(params) returned, then the one each tx.update returns."
    elif isinstance(state, dict):
        hint = (
            "Is it a state dict (flax.serialization.to_state_dict, or a checkpoint restored without a target)? "
            "Restore it into the structure of tx.init(params), e.g. "
            "flax.serialization.from_state_dict(tx.init(params), state_dict)."
        )
    else:
        if type(state).__module__.startswith("optax_gradhealth"):
            hint = f"Is it the state of another gradhealth transformation ({type(state).__name__})?"
        else:
            hint = "Is it another optimizer's state (an optax state, e.g. optax.adamw(...).init(params))?"
        inner = [f for f in getattr(cls, "_fields", ()) if f.endswith("inner_state")]
        if inner:
            hint += (
                f" The state of the optimizer that {what} wraps? Pass {what}'s own state, which holds that one "
                f"(state.{inner[0]})."
            )
        hint += (
            f" From a checkpoint taken before {what} was added? Restore the params alone and call "
            "tx.init(params) for a new optimizer state."
        )
    raise TypeError(
        f"{what}: `state` must be the {cls.__name__} that this transformation's init returned, "
        f"got {_state_description(state)}. {hint}"
    )


def _state_description(state: Any) -> str:
    """The type of ``state`` in a few words: a plain tuple (an optax chain's state) with
    the types it holds, a dict with its keys."""
    if state is None:
        return "None"
    if isinstance(state, tuple) and not hasattr(state, "_fields"):
        parts = [type(x).__name__ for x in state[:4]] + (["..."] if len(state) > 4 else [])
        return f"a tuple of ({', '.join(parts)})" if state else "an empty tuple"
    if isinstance(state, dict):
        keys = [repr(k) for k in list(state)[:4]] + (["..."] if len(state) > 4 else [])
        return f"a dict with keys {', '.join(keys)}" if state else "an empty dict"
    kind = type(state)
    if kind.__module__ == "builtins":
        return kind.__name__
    return f"{kind.__module__.split('.')[0]}.{kind.__qualname__}"


def _takes_keywords(fn: Any) -> bool:
    """Whether ``fn`` takes arbitrary keyword arguments (a ``**kwargs`` parameter)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins)
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
