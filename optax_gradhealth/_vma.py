"""Per-device types under ``jax.shard_map``'s ``check_vma``: a leaf module.

Inside ``jax.shard_map(..., check_vma=True)`` every value carries the mesh axes it
varies over. A state kept per device (``P('data')`` copies, as
``examples/data_parallel.py`` keeps it) arrives varying over the data axis; a
transformation that computes its new state from replicated values only (the mean
gradient after :func:`optax_gradhealth.cross_device`'s all-reduce) would hand it back
typed as replicated, and a ``lax.scan`` or ``lax.cond`` whose carry or branches hold
the state then fails on the mismatch. Every stateful transformation of the package
returns ``match(new_state, state)`` (its ``update`` is wrapped in
:func:`keeps_state_type`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from jax import lax

__all__ = ["keeps_state_type", "match", "varying_axes", "varying_like"]


def varying_axes(x: Any) -> frozenset[str] | None:
    """The axes ``x`` varies over under shard_map's check_vma, or None when untracked."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    varying = getattr(mat, "varying", None)
    return None if varying is None else frozenset(varying)


def match(tree: Any, like: Any) -> Any:
    """``tree`` with each leaf cast to vary over the axes its counterpart in ``like``
    (same structure) varies over; unchanged outside shard_map."""

    def cast(x, ref):
        missing = tuple(sorted((varying_axes(ref) or frozenset()) - (varying_axes(x) or frozenset())))
        return lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree, like)


def keeps_state_type(update_fn: Callable[..., tuple[Any, Any]]) -> Callable[..., tuple[Any, Any]]:
    """``update_fn`` returning its new state with the per-device type of the state it got
    (:func:`match`)."""

    @functools.wraps(update_fn)
    def update(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> tuple[Any, Any]:
        new_updates, new_state = update_fn(updates, state, params, **extra_args)
        return new_updates, match(new_state, state)

    return update


def varying_like(x: Any, *trees: Any) -> Any:
    """``x`` cast to vary over every axis that some leaf of ``trees`` varies over (the
    type of a value computed from them: e.g. the other branch of a ``lax.cond``)."""
    axes: set[str] = set()
    for leaf in jax.tree.leaves(trees):
        axes |= varying_axes(leaf) or frozenset()
    missing = tuple(sorted(axes - (varying_axes(x) or frozenset())))
    return lax.pcast(x, missing, to="varying") if missing else x
