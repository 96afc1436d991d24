"""The declared interfaces between the package's transformations.

A leaf module (it imports nothing from the package), so that a transformation can take
part in another's behaviour without either importing the other:

* **What a momentum reset keeps.** :func:`optax_gradhealth.guard` re-initialises its
  inner optimizer's moments after persistent spikes. State types declared with
  :func:`keep_on_momentum_reset` (bookkeeping: clip records, loss scale, audits, nested
  guards) are kept as they are. The declaration is about behaviour only; what is logged
  (:func:`optax_gradhealth.register_metrics`) never changes it.
* **Loss scaling through a wrapped transformation.**
  :func:`optax_gradhealth.dynamic_loss_scale` hands the unscale factor to a wrapped
  transformation whose state implements :class:`UnscalesOnRead`, instead of unscaling
  the gradients itself: the wrapped transformation multiplies where it reads the
  gradients, so the unscaled gradients are never materialised. On an overflow the loss
  scale asks that state to keep its previous bookkeeping.
* **What must stay outside.** A state type declared with :func:`must_wrap` belongs to a
  transformation that has to wrap the guard (or come before it in a chain), never sit
  inside it; the guard's ``init`` refuses an inner optimizer that holds one
  (:func:`refuse_wrappers_inside`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax

__all__ = [
    "UNSCALE_ARG",
    "UnscalesOnRead",
    "is_kept_on_momentum_reset",
    "keep_on_momentum_reset",
    "must_wrap",
    "refuse_wrappers_inside",
    "wrapped_fields",
]

#: The private extra argument that carries the loss scale's unscale factor (a float32
#: scalar: the true gradients are ``updates * factor``) to a transformation whose state
#: is :class:`UnscalesOnRead`.
UNSCALE_ARG = "_gradhealth_unscale"

_KEPT_ON_RESET: dict[type, tuple[str, ...]] = {}
_MUST_WRAP: dict[type, tuple[str, str, str | None]] = {}


def keep_on_momentum_reset(*state_types: type, wrapped: tuple[str, ...] = ()) -> None:
    """Declares state types that the guard's momentum reset keeps as they are (instead of
    re-initialising them with the inner optimizer's moments): bookkeeping, not moments.

    ``wrapped`` names the fields of a wrapper's state (a NamedTuple) that hold the
    wrapped optimizer's state, or a window being accumulated for it: the reset treats
    them as it treats any inner state (moments re-initialised, bookkeeping found inside
    kept), and keeps the other fields."""
    for state_type in state_types:
        _KEPT_ON_RESET[state_type] = tuple(wrapped)


def is_kept_on_momentum_reset(state: Any) -> bool:
    """True for a state whose type was declared with :func:`keep_on_momentum_reset`."""
    return type(state) in _KEPT_ON_RESET


def wrapped_fields(state: Any) -> tuple[str, ...]:
    """The ``wrapped`` fields declared for the type of ``state`` (empty if none)."""
    return _KEPT_ON_RESET.get(type(state), ())


@runtime_checkable
class UnscalesOnRead(Protocol):
    """The state of a transformation that accepts ``UNSCALE_ARG`` in ``update``.

    Such a transformation multiplies the incoming gradients by the factor wherever it
    reads them (its statistics and its inner update), and treats a non-finite gradient
    by returning a zero update and keeping its inner optimizer's state, as
    :func:`optax_gradhealth.guard` does.
    """

    def gradients_finite(self) -> Any:
        """The bool scalar this step's state recorded: every (unscaled) gradient element,
        and the loss, were finite."""
        ...

    def keep_bookkeeping(self, previous: Any, keep: Any, where: Callable[[Any, Any, Any], Any]) -> Any:
        """This state with its own bookkeeping (everything but the inner optimizer's
        state, which a non-finite step already kept) taken from ``previous`` where
        ``keep``: ``where(keep, old_leaf, new_leaf)`` leaf by leaf."""
        ...


def guard_states(state: Any) -> list[UnscalesOnRead]:
    """The outermost :class:`UnscalesOnRead` states (guards) inside ``state``, found from
    its structure (when an update is traced)."""
    is_guard = lambda x: isinstance(x, UnscalesOnRead)
    return [x for x in jax.tree.leaves(state, is_leaf=is_guard) if is_guard(x)]


def must_wrap(state_type: type, name: str, why: str, *, before: str | None = None) -> None:
    """Declares that the transformation whose state is ``state_type`` (called ``name`` in
    messages) must wrap the guard; ``why`` says what goes wrong when it sits inside.

    ``before``: for a transformation that is chained before the guard rather than wrapping
    it, the order to write instead, with ``{outer}`` for the guard's name (e.g.
    ``"optax.chain(gh.cross_device(...), {outer}(...))"``)."""
    _MUST_WRAP[state_type] = (name, why, before)


def refuse_wrappers_inside(inner_state: Any, outer: str) -> None:
    """Raises a ValueError naming the order to use when ``inner_state`` (the state of the
    transformation that ``outer`` wraps) holds a state declared with :func:`must_wrap`."""
    declared = lambda x: type(x) in _MUST_WRAP
    for state in jax.tree.leaves(inner_state, is_leaf=declared):
        if declared(state):
            name, why, before = _MUST_WRAP[type(state)]
            if before is None:
                order = f"must wrap {outer}, not sit inside it: {name}({outer}(...))"
            else:
                order = f"must come before {outer}, not sit inside it: {before.format(outer=outer)}"
            raise ValueError(f"{outer}: the optimizer it wraps holds a {name} state; {name} {order}. Inside, {why}.")
