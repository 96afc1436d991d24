"""Optimizer state -> flat ``{name: array}`` metrics dict.

``metrics`` only reads fields: no computation, no host sync. Call it inside or outside
``jit``; fetch the arrays to the host only when you log (see ``jax.device_get``).
"""

from __future__ import annotations

import re
import sys
import typing
from typing import Any

import jax
import optax

from optax_gradhealth import _catalogue, _stats
from optax_gradhealth import _validation as check

__all__ = ["CATALOGUE", "metrics", "register_metrics"]

# The names and their meanings live in the leaf module `_catalogue` (one table); the
# modules that define states register their fields there. This module only reads.
CATALOGUE = _catalogue.CATALOGUE
register_metrics = _catalogue.register_metrics
_REGISTRY = _catalogue.STATE_FIELDS


def _unwrap_variables(tree: Any) -> Any:
    """Reads through ``flax.nnx`` variables (``nnx.Optimizer.opt_state``) and optimizers
    (none can exist unless ``flax.nnx`` was imported: it is not imported here)."""
    nnx = sys.modules.get("flax.nnx")
    if nnx is None:
        return tree
    if isinstance(tree, nnx.Optimizer):
        tree = tree.opt_state
    if isinstance(tree, nnx.Module) or isinstance(tree, nnx.State):
        tree = nnx.state(tree) if isinstance(tree, nnx.Module) else tree
        if hasattr(nnx, "to_pure_dict"):  # State.to_pure_dict is deprecated in flax 0.12
            tree = nnx.to_pure_dict(tree)
        elif hasattr(tree, "to_pure_dict"):  # pragma: no cover - older flax
            tree = tree.to_pure_dict()
    return _stats._without_nnx_variables(tree)


def _refuse_transformation(obj: Any) -> None:
    """A ``TypeError`` for the transformation passed instead of its state (``{}`` would
    fail a line later, unexplained)."""
    if isinstance(obj, optax.GradientTransformation):
        raise TypeError(
            f"gh.metrics: got the transformation (a {type(obj).__name__}), not its state: pass the state "
            "tx.init / tx.update returned, not tx."
        )


def _refuse_model(obj: Any) -> None:
    """A ``TypeError`` for an ``nnx`` model passed instead of its optimizer (called when
    no gradhealth state was found: a Module that holds the optimizer is fine)."""
    nnx = sys.modules.get("flax.nnx")  # not imported here: without it there is no nnx Module
    if nnx is not None and isinstance(obj, nnx.Module) and not isinstance(obj, nnx.Optimizer):
        raise TypeError(
            f"gh.metrics: got a {type(obj).__name__}, an nnx.Module that is not an nnx.Optimizer and holds no "
            "gradhealth state: pass the nnx.Optimizer or its opt_state."
        )


def _may_be_none(state_type: type, field: str) -> bool:
    """Whether ``state_type`` annotates ``field`` as possibly None (``X | None``,
    ``Optional[X]``), e.g. ``GuardReport.guard_update_norm`` with ``update_health=False``.

    NamedTuple keeps a string annotation (``from __future__ import annotations``) as a
    ``typing.ForwardRef``; it is read as text, since resolving it would import names the
    annotation only mentions.
    """
    annotation = getattr(state_type, "__annotations__", {}).get(field)
    if isinstance(annotation, typing.ForwardRef):
        annotation = annotation.__forward_arg__
    if isinstance(annotation, str):
        return bool(re.search(r"\bNone\b|\bOptional\[", annotation))
    return annotation is None or type(None) in typing.get_args(annotation)


def _holds_leaf_norms(state_type: type, field: str) -> bool:
    """Whether ``state_type`` annotates ``field`` as a :class:`LeafNorms` (``LeafNorms``,
    ``_stats.LeafNorms | None``, ``gh.LeafNorms``...), read as text like
    :func:`_may_be_none`."""
    annotation = getattr(state_type, "__annotations__", {}).get(field)
    if isinstance(annotation, typing.ForwardRef):
        annotation = annotation.__forward_arg__
    if isinstance(annotation, str):
        return bool(re.search(r"\b(LeafNorms|LayerNorms)\b", annotation))
    return annotation is _stats.LeafNorms or _stats.LeafNorms in typing.get_args(annotation)


def _is_flattened_leaf_norms(state_type: type, field: str, value: Any) -> bool:
    """A :class:`LeafNorms` field that ``nnx.state`` (or a pure-dict restore) turned into
    ``{'values': vector}``. Only a field annotated as a LeafNorms qualifies: a
    per-leaf field of another kind (``ClipByLeafNormState.leaf_clipped``) has the
    parameters' structure, which may be a dict with the one key ``'values'`` too."""
    return (
        isinstance(value, dict)
        and set(value) == {"values"}
        and len(getattr(value["values"], "shape", ())) >= 1  # [..., num_leaves]
        and _holds_leaf_norms(state_type, field)
    )


def _state_type_of_mapping(mapping: dict) -> type | None:
    """The registered NamedTuple type whose fields ``mapping``'s keys are.

    ``nnx.state(optimizer)`` (and pure-dict checkpoint restores) turn every NamedTuple
    into a dict keyed by field name, losing the type, and drop the fields that hold
    ``None`` or an empty sub-state (e.g. ``FixedClipState()``; ``GuardReport``'s update
    fields with ``update_health=False``). Our field names are namespaced (``guard_...``,
    ``clip_...``), so a dict whose keys are all fields of a registered type and include
    every metric field that the type does not annotate as possibly None is that state;
    the missing fields are filled with ``None`` (a None metric field reports nothing,
    as on the typed state). A field annotated ``X | None`` is optional because that is
    exactly the field such a dict may lack; a field that is never None must be there,
    so that a dict holding only some of a type's fields is not taken for it (and a type
    whose metric fields may all be None needs one of them, for the same reason).
    """
    keys = set(mapping)
    for state_type, metric_fields in _REGISTRY.items():
        fields = getattr(state_type, "_fields", None)
        if not fields or not keys <= set(fields):
            continue
        required = {field for field in metric_fields if not _may_be_none(state_type, field)}
        if required <= keys and (keys & set(metric_fields) or not metric_fields):
            return state_type
    return None


def _as_state(x: Any) -> Any:
    if type(x) in _REGISTRY:
        return x
    if isinstance(x, dict) and x and all(isinstance(k, str) for k in x):
        state_type = _state_type_of_mapping(x)
        if state_type is not None:
            return state_type(**{field: x.get(field) for field in state_type._fields})
    return None


def _find_states(tree: Any) -> list[Any]:
    """Registered states anywhere in a pytree (any container: chains, dicts, flax
    structs such as ``TrainState``, or the dicts ``nnx.state`` makes of them), outer
    before inner, in flattening order."""
    found = []
    for leaf in jax.tree.leaves(tree, is_leaf=lambda x: _as_state(x) is not None):
        state = _as_state(leaf)
        if state is not None:
            found.append(state)
            for value in state:  # states nest (e.g. a guard inside a guard)
                found.extend(_find_states(value))
    return found


def metrics(opt_state: Any, *, deprecated_names: bool = True) -> dict[str, jax.Array]:
    """A flat ``{name: array}`` dict of every gradhealth metric found in ``opt_state``.

    Looks anywhere inside a chained, nested or wrapped optimizer state, including
    ``flax.nnx.Optimizer`` (pass the optimizer or its ``opt_state``) and
    ``flax.training.train_state.TrainState.opt_state``. Values are device arrays (no
    host sync); per-leaf norms appear as ``grad/leaf_norm/<path>`` (one slice of the
    state's :class:`LeafNorms` vector each; from an ``nnx.state(...)`` dict, which
    drops the tree structure, as ``grad/leaf_norm/<leaf index>``). The names are the
    keys of :data:`CATALOGUE`. When several states report the same name (two clip
    transformations in one chain, say), the first found (chain order, outer state
    before inner) keeps the plain name and the others get a ``#2``, ``#3``... suffix.

    The names 0.1.0 used and a later release renamed (``grad/layer_norm/<path>``,
    ``grad/spike``, ... see ``docs/metrics.md``) are returned too, after the current
    ones and with the same arrays, while ``deprecated_names`` is True, so that dashboards
    built on them keep working. Pass False to log only the current names. The default
    becomes False in 0.3 and the old names go in 0.4.

    Args:
      opt_state: an optimizer state (or an ``nnx.Optimizer``).
      deprecated_names: also return each metric under its deprecated name, if it has one
        (True or False).

    Returns:
      ``dict[str, jax.Array]``; empty if no gradhealth state is inside (the params, or
      the state of an optimizer without a gradhealth transformation).

    Raises:
      TypeError: for what cannot be an optimizer state: the transformation itself (an
        ``optax.GradientTransformation``: pass the state ``tx.init`` / ``tx.update``
        returned), or an ``nnx.Module`` that is not an ``nnx.Optimizer`` and holds
        none (pass the optimizer or its ``opt_state``).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import optax_gradhealth as gh
      >>> tx = gh.guard(optax.sgd(0.1))
      >>> state = tx.init({'w': jnp.zeros(2)})
      >>> sorted(gh.metrics(state))[:3]
      ['grad/clip_threshold', 'grad/clipped', 'grad/consecutive_nonfinite']
      >>> 'grad/spike' in gh.metrics(state), 'grad/spike' in gh.metrics(state, deprecated_names=False)
      (True, False)
    """
    deprecated_names = check.boolean("deprecated_names", deprecated_names)
    _refuse_transformation(opt_state)
    out: dict[str, jax.Array] = {}
    for state in _find_states(_unwrap_variables(opt_state)):
        entries: dict[str, jax.Array] = {}
        for field, name in _REGISTRY[type(state)].items():
            value = getattr(state, field)
            if isinstance(value, _stats.LeafNorms):
                for leaf_name, leaf_norm in value.as_dict().items():
                    entries[f"{name}/{leaf_name}"] = leaf_norm
            elif _is_flattened_leaf_norms(type(state), field, value):
                # A LeafNorms that nnx.state (or a pure-dict restore) turned into a
                # dict: the leaf names are gone with the tree structure; index them.
                for i, leaf_norm in enumerate(_stats._unstack(value["values"])):
                    entries[f"{name}/{i}"] = leaf_norm
            elif isinstance(value, jax.Array) or hasattr(value, "shape"):
                entries[name] = value
            else:
                # Named as gh.leaf_names names them (and so as grad/leaf_norm/<path>): two
                # paths that join to one name get a suffix instead of overwriting.
                for leaf_name, leaf in zip(_stats.leaf_names(value), jax.tree.leaves(value), strict=True):
                    entries[f"{name}/{leaf_name}"] = leaf
        for name, value in entries.items():
            key, copy = name, 1
            while key in out:
                copy += 1
                key = f"{name}#{copy}"
            out[key] = value
    if not out:
        _refuse_model(opt_state)
    if deprecated_names:
        for key, value in list(out.items()):
            name, hash_, copy = key.partition("#")
            old = _catalogue.deprecated_name(name)
            if old is not None:
                out[old + hash_ + copy] = value
    return out
