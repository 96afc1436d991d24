"""Running an inner update whose new state is selected (skip / reset) without copies.

Why this exists. The guard must leave the inner state exactly as it was on a skipped
step, so its new state is ``where(skip, old, new)``. Written naively (call the inner
update, then select), XLA fuses the cheap elementwise computation of ``new`` (e.g.
Adam's ``mu = b1 * mu + (1 - b1) * g``) into *both* of its consumers: the select that
produces the state and the computation of the updates. Both then read the old moment
buffer, and under ``jax.jit(..., donate_argnums=...)`` the old buffer is also where the
new state is written in place, so XLA inserts a full copy of every moment leaf (a
gradient-sized temporary buffer per moment, 4-6x the step time of bare adamw on CPU).

The fix is to let the *updates* read the selected state, as bare optax does with the
new state: every state output of the inner update is replaced by its selected value
as soon as the inner computation produces it, so every later use (the updates) reads
the selected value. On an applied step the selected value *is* the new value, bit for
bit, so the updates are the same computation (under jit, XLA's different fusion may
round their last bit differently); on a skipped step the updates are discarded by the
caller anyway. XLA then materialises the selected state once, in place, and the
updates read it: no copy, no temporary.

The inner update is traced to a jaxpr (``jax.make_jaxpr``) and re-evaluated by a small
interpreter that applies the substitution; calls (``jit``) that produce a state output
are inlined so the substitution reaches inside them. Any other primitive is bound as is
(in the evaluation that only checks the outputs, with its host callbacks left out of
its sub-jaxprs: see ``_strip_callbacks``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

from optax_gradhealth import _lowering, _stats

__all__ = ["Selects", "TracedUpdate", "update_with_selected_state"]

_CALL_PRIMITIVES = ("jit", "pjit")
# Higher-order primitives whose sub-jaxprs (in their parameters) the checking evaluation
# rewrites without host callbacks. Their (forward) result is fully given by those
# jaxprs, and their abstract evaluation derives the equation's effects from them.
_NESTING_PRIMITIVES = frozenset(
    {
        *_CALL_PRIMITIVES,
        "cond",
        "while",
        "scan",
        "closed_call",
        "core_call",
        "remat2",
        "checkpoint",
        "custom_jvp_call",
        "custom_vjp_call",
        "shard_map",
    }
)


class Selects:
    """Per-leaf selects on scalar predicates, one ``select`` operation each.

    ``jnp.where`` traces a nested jitted call for every use, and broadcasts its
    predicate (and a zero) afresh each time: on a tree of 1000 leaves with a few selects
    per leaf that is thousands of calls for XLA to inline and thousands of duplicate
    broadcasts, all of which every compiler pass walks. Here each predicate is
    broadcast once per leaf shape, and zeros once per shape and dtype, within one
    update step (make one ``Selects`` per traced update: it keeps the predicates alive,
    so the cache keys, their ids, stay unique).
    """

    def __init__(self) -> None:
        self._broadcasts: dict[tuple[int, tuple[int, ...], Any], tuple[jax.Array, jax.Array]] = {}
        self._zeros: dict[tuple[tuple[int, ...], Any, Any], jax.Array] = {}

    def _broadcast(self, scalar: jax.Array, like: jax.Array) -> jax.Array:
        # On an Explicit mesh the broadcast takes the sharding of the leaf it selects
        # (`select` wants the predicate sharded as its cases), so it is part of the key.
        sharding = _stats.explicit_sharding(like)
        key = (id(scalar), like.shape, sharding)
        hit = self._broadcasts.get(key)
        if hit is None:
            wide = (
                lax.broadcast(scalar, like.shape)
                if sharding is None
                else lax.broadcast_in_dim(scalar, like.shape, (), out_sharding=sharding)
            )
            hit = self._broadcasts[key] = (scalar, wide)
        return hit[1]

    def zeros(self, like: jax.Array) -> jax.Array:
        """Zeros with the shape and dtype of ``like`` (and its sharding on an Explicit mesh)."""
        sharding = _stats.explicit_sharding(like)
        key = (like.shape, like.dtype, sharding)
        if key not in self._zeros:
            self._zeros[key] = jnp.zeros(like.shape, like.dtype, out_sharding=sharding)
        return self._zeros[key]

    def where(self, pred: jax.Array, on_true: Any, on_false: Any) -> jax.Array:
        """``jnp.where(pred, on_true, on_false)`` for a boolean scalar ``pred``, as one
        ``select``; ``on_false`` gives the shape and dtype, ``on_true`` is cast to them.

        (``lax.select_n`` with an integer index would not save anything: it lowers to a
        comparison and a select per case, on broadcast operands.)
        """
        on_false = jnp.asarray(on_false)
        on_true = jnp.asarray(on_true, dtype=on_false.dtype)
        if on_true.shape != on_false.shape:
            raise ValueError(f"where: on_true has shape {on_true.shape}, on_false {on_false.shape}")
        return lax.select(self._broadcast(pred, on_false), on_true, on_false)

    def zero_floats_where(self, pred: jax.Array, tree: Any) -> Any:
        """``tree`` with every float leaf replaced by zeros where ``pred`` is True
        (non-float leaves pass through)."""
        return jax.tree.map(lambda x: self.where(pred, self.zeros(x), x) if _stats._is_float(x) else x, tree)


def _is_input(jaxpr: Jaxpr, var: Any) -> bool:
    return isinstance(var, Literal) or var in jaxpr.invars or var in jaxpr.constvars


def _is_callback(eqn: Any) -> bool:
    """An equation with effects, no outputs and no reference operand: a host callback
    (``jax.debug.callback``, ``jax.debug.print``, an ``io_callback`` without results), not
    a write to a ``jax.Ref`` (whose later reads would change without it)."""
    return (
        bool(eqn.effects)
        and not eqn.outvars
        and not any(isinstance(getattr(v, "aval", None), jax.ref.AbstractRef) for v in eqn.invars)
    )


def _strip_callbacks(jaxpr: Jaxpr) -> Jaxpr:
    """``jaxpr`` without its host callbacks (:func:`_is_callback`), at every depth of
    the higher-order primitives in ``_NESTING_PRIMITIVES``; ``jaxpr`` itself if it has
    none. An effect leaves the jaxpr's (and a rewritten equation's) effects only where
    no equation left still has it."""
    if not jaxpr.effects:
        return jaxpr
    eqns, removed = [], set()
    for eqn in jaxpr.eqns:
        if _is_callback(eqn):
            removed |= set(eqn.effects)
            continue
        new = _strip_eqn(eqn)
        removed |= set(eqn.effects) - set(new.effects)
        eqns.append(new)
    if not removed:
        return jaxpr
    kept = set().union(*(eqn.effects for eqn in eqns))
    return jaxpr.replace(eqns=eqns, effects=set(jaxpr.effects) - (removed - kept))


def _strip_param(value: Any) -> Any:
    if isinstance(value, ClosedJaxpr):
        inner = _strip_callbacks(value.jaxpr)
        return value if inner is value.jaxpr else ClosedJaxpr(inner, value.consts)
    if isinstance(value, Jaxpr):
        return _strip_callbacks(value)
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        new = [_strip_param(v) for v in value]
        return value if all(a is b for a, b in zip(new, value)) else type(value)(new)
    return value


def _sub_effects(params: dict[str, Any]) -> set[Any]:
    found: set[Any] = set()
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, (ClosedJaxpr, Jaxpr)):
                found |= set(item.effects)
    return found


def _strip_eqn(eqn: Any) -> Any:
    """``eqn`` with the host callbacks left out of its sub-jaxprs (a primitive in
    ``_NESTING_PRIMITIVES`` with effects), or ``eqn`` itself. Any other primitive is
    kept as it is: a callback inside it runs in the checking evaluation too."""
    if not eqn.effects or eqn.primitive.name not in _NESTING_PRIMITIVES:
        return eqn
    params = {name: _strip_param(value) for name, value in eqn.params.items()}
    if all(params[name] is value for name, value in eqn.params.items()):
        return eqn
    gone = _sub_effects(eqn.params) - _sub_effects(params)
    return eqn.replace(params=params, effects=set(eqn.effects) - gone)


def _evaluate(
    jaxpr: Jaxpr,
    consts: Sequence[Any],
    args: Sequence[Any],
    subst: dict[Any, Callable],
    skip_side_effects: bool = False,
) -> list[Any]:
    """Evaluates ``jaxpr``; a variable ``v`` in ``subst`` takes ``subst[v](value)``.

    With ``skip_side_effects``, a host callback (a ``jax.debug.callback`` or
    ``jax.debug.print``: :func:`_is_callback`) is left out, inside calls and the
    sub-jaxprs of ``cond``, ``while``, ``scan`` and the other ``_NESTING_PRIMITIVES``
    too (``optax.MultiSteps`` runs its inner update in a ``cond``): the evaluation that
    only checks the outputs must not log (or count) a second time. A callback inside any
    other higher-order primitive (e.g. a Pallas kernel) still runs in it."""
    env: dict[Any, Any] = {}

    def read(var):
        return var.val if isinstance(var, Literal) else env[var]

    for var, value in zip(jaxpr.constvars, consts):
        env[var] = value
    for var, value in zip(jaxpr.invars, args):
        env[var] = value

    for eqn in jaxpr.eqns:
        if skip_side_effects and _is_callback(eqn):
            continue
        hits = [v for v in eqn.outvars if v in subst]
        invals = [read(v) for v in eqn.invars]
        call = eqn.params.get("jaxpr")
        if (
            skip_side_effects
            and eqn.effects
            and eqn.primitive.name in _CALL_PRIMITIVES
            and isinstance(call, ClosedJaxpr)
        ):
            outs = _evaluate(call.jaxpr, call.consts, invals, {}, skip_side_effects=True)
            for var, value in zip(eqn.outvars, outs):
                env[var] = subst[var](value) if var in subst else value
            continue
        if hits and eqn.primitive.name in _CALL_PRIMITIVES and isinstance(call, ClosedJaxpr):
            # Inline the call so that the values it computes from a substituted output
            # (e.g. the updates) read the substituted value too.
            inner_subst: dict[Any, Callable] = {}
            owner: dict[Any, Any] = {}  # inner variable -> the outer output it stands for
            for var, inner_var in zip(eqn.outvars, call.jaxpr.outvars):
                if var in subst and not _is_input(call.jaxpr, inner_var) and inner_var not in inner_subst:
                    inner_subst[inner_var] = subst[var]
                    owner[inner_var] = var
            outs = _evaluate(call.jaxpr, call.consts, invals, inner_subst)
            for var, inner_var, value in zip(eqn.outvars, call.jaxpr.outvars, outs):
                done_inside = not isinstance(inner_var, Literal) and owner.get(inner_var) is var
                env[var] = subst[var](value) if var in subst and not done_inside else value
            continue
        if skip_side_effects:
            eqn = _strip_eqn(eqn)
        ctx = getattr(eqn, "ctx", None)
        with ctx.manager if ctx is not None else contextlib.nullcontext():
            ans = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
        if not eqn.primitive.multiple_results:
            ans = [ans]
        for var, value in zip(eqn.outvars, ans):
            env[var] = subst[var](value) if var in subst else value
    return [read(v) for v in jaxpr.outvars]


class TracedUpdate:
    """An update ``() -> (updates, new_state)``, traced once, that can be read two ways:
    as it computes its outputs (:meth:`outputs`, e.g. to check them), and with every
    state leaf selected where it is produced (:meth:`with_selected_state`).

    Under a trace the update is made a jaxpr once and evaluated by the interpreter above,
    each way at most once. The plain evaluation reads its inputs through optimization
    barriers, so that XLA keeps it apart from the selected one: shared, the new state
    would have two consumers (the check and the select) and be materialised, a
    state-sized temporary per leaf; apart, each is fused on its own. Eagerly (``inputs``
    has no tracer: op-by-op execution, where XLA copies nothing) ``update`` is simply
    called once and its state selected afterwards.

    Args:
      update: a function of no arguments (it closes over the gradients, state, params
        and extra arguments) returning ``(updates, new_state)``.
      inputs: the pytree ``update`` closes over (to tell eager from traced).
    """

    def __init__(self, update: Callable[[], tuple[Any, Any]], inputs: Any = None) -> None:
        eager = inputs is not None and not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(inputs))
        self._outputs: tuple[Any, Any] | None = None
        if eager:
            self._outputs = update()
            self._closed = None
            shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), self._outputs)
        else:
            self._closed, shapes = jax.make_jaxpr(update, return_shape=True)()
        self.out_shapes: tuple[Any, Any] = shapes
        """``(updates, new_state)`` as a tree of ``jax.ShapeDtypeStruct``."""
        self._out_tree = jax.tree.structure(shapes)
        self._num_updates = len(jax.tree.leaves(shapes[0]))

    def outputs(self) -> tuple[Any, Any]:
        """``(updates, new_state)`` as ``update`` computes them."""
        if self._outputs is None:
            assert self._closed is not None
            # A barrier of its own per input: one over all of them would give every output the
            # same varying-axes type under shard_map (mixing replicated and per-device values).
            consts = [_lowering.apart(c) for c in self._closed.consts]
            outs = _evaluate(self._closed.jaxpr, consts, [], {}, skip_side_effects=True)
            self._outputs = jax.tree.unflatten(self._out_tree, outs)
        return self._outputs

    def with_selected_state(self, select: Callable[[int, jax.Array], jax.Array]) -> tuple[Any, Any]:
        """Returns ``(updates', state')`` where ``state'`` leaf ``k`` (in
        ``jax.tree.leaves`` order) is ``select(k, new_leaf_k)``, and ``updates'`` is
        computed from the selected state leaves instead of the new ones. ``select(k, x)``
        must return ``x`` unchanged whenever the caller keeps ``updates'`` (an applied
        step), so that ``updates'`` equals the plain updates there; on the other steps
        the caller must discard them."""
        if self._closed is None:
            updates, state = self.outputs()
            leaves, treedef = jax.tree.flatten(state)
            return updates, treedef.unflatten([select(k, x) for k, x in enumerate(leaves)])

        jaxpr = self._closed.jaxpr
        state_vars = jaxpr.outvars[self._num_updates :]
        subst: dict[Any, Callable] = {}
        first_slot: dict[Any, int] = {}
        for slot, var in enumerate(state_vars):
            if _is_input(jaxpr, var) or var in subst:
                continue  # passed through, a constant, or the same value in two slots
            subst[var] = lambda value, slot=slot: select(slot, value)
            first_slot[var] = slot

        outs = _evaluate(jaxpr, self._closed.consts, [], subst)
        for slot, var in enumerate(state_vars):
            if isinstance(var, Literal) or first_slot.get(var) != slot:
                outs[self._num_updates + slot] = select(slot, outs[self._num_updates + slot])
        return jax.tree.unflatten(self._out_tree, outs)


def update_with_selected_state(
    update: Callable[[], tuple[Any, Any]],
    select: Callable[[int, jax.Array], jax.Array],
    inputs: Any = None,
) -> tuple[Any, Any]:
    """Calls ``update() -> (updates, state)`` with every state leaf selected in place:
    ``TracedUpdate(update, inputs).with_selected_state(select)`` (see there)."""
    return TracedUpdate(update, inputs).with_selected_state(select)
