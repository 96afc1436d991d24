"""The state's field names never clash with optax's own (docs/concepts.md, "Fixed state
structure and names"): ``optax.tree.get(state, name)`` finds an optimizer's ``count``
also when a gradhealth transformation wraps it or sits next to it."""

from __future__ import annotations

import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest

import optax_gradhealth as gh
from optax_gradhealth import _catalogue

# Field names of the states of common optax optimizers and wrappers, written out: adam's
# count/mu/nu, inject_hyperparams, MultiSteps, apply_if_finite, masked, lookahead.
OPTAX_NAMES = {
    "count",
    "mu",
    "nu",
    "inner_state",
    "hyperparams",
    "hyperparams_states",
    "mini_step",
    "gradient_step",
    "inner_opt_state",
    "acc_grads",
    "skip_state",
    "notfinite_count",
    "last_finite",
    "total_notfinite",
    "fast_state",
    "trace",
    "rng_key",
}


def _is_namedtuple(cls) -> bool:
    return isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields")


def _optax_state_fields() -> set[str]:
    """Every field name of a ``...State`` NamedTuple optax and optax.contrib export."""
    names = set()
    for module in (optax, optax.contrib):
        for name, cls in vars(module).items():
            if name.endswith("State") and _is_namedtuple(cls):
                names.update(cls._fields)
    return names


def _gradhealth_state_classes() -> set[type]:
    """Every NamedTuple the package exports or registers in the catalogue, and every
    NamedTuple nested in their fields' annotations (the guard's groups, its window)."""
    roots = {cls for cls in vars(gh).values() if _is_namedtuple(cls)}
    roots |= {cls for cls in _catalogue.STATE_FIELDS if cls.__module__.startswith("optax_gradhealth")}
    seen: set[type] = set()

    def visit(annotation) -> None:
        if _is_namedtuple(annotation) and annotation not in seen:
            seen.add(annotation)
            hints = typing.get_type_hints(annotation)
            for field in annotation._fields:
                visit(hints.get(field))
        for arg in typing.get_args(annotation):
            visit(arg)

    for cls in roots:
        visit(cls)
    return {cls for cls in seen if cls.__module__.startswith("optax_gradhealth")}


def test_the_walk_reaches_the_nested_states():
    names = {cls.__name__ for cls in _gradhealth_state_classes()}
    assert {"GuardState", "GuardMoments", "GuardCounters", "GuardReport", "NormWindow"} <= names
    assert {"ClipByGlobalNormState", "ReplayState", "AccumulationState", "LossScaleState"} <= names


@pytest.mark.parametrize("cls", sorted(_gradhealth_state_classes(), key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_no_state_field_clashes_with_an_optax_state_field(cls):
    assert OPTAX_NAMES <= _optax_state_fields() | OPTAX_NAMES
    clashes = set(cls._fields) & (OPTAX_NAMES | _optax_state_fields())
    assert not clashes, f"{cls.__module__}.{cls.__name__} has fields named as optax's: {sorted(clashes)}"


def test_tree_get_count_finds_adams_count_inside_the_guard():
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    tx = gh.guard(optax.adam(1e-2))
    state = tx.init(params)
    assert int(optax.tree.get(state, "count")) == 0
    update = jax.jit(tx.update)
    rng = np.random.default_rng(0)
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params) for _ in range(4)]
    grads[2] = {"w": jnp.full((3, 2), jnp.nan), "b": jnp.zeros(2)}  # skipped: adam's count stays
    for g in grads:
        _, state = update(g, state, params)
    applied = sum(all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g)) for g in grads)
    assert applied == 3
    assert int(optax.tree.get(state, "count")) == applied
    # The guard's window (every finite step accepted: no spike before its warm-up) keeps
    # its count under its own name.
    assert int(optax.tree.get(state, "window_count")) == applied
