"""Dynamic loss scaling for fp16 training (the role of PyTorch's ``GradScaler``).

Two pieces that work as a pair:

* :func:`dynamic_loss_scale` wraps an optimizer (normally a :func:`guard`). It keeps the
  loss scale in the optimizer state, unscales the incoming gradients *before* anything
  else sees them (so every statistic, clip and spike decision of the wrapped optimizer
  works on true gradient values), turns an overflow into a skipped step that never
  reaches the wrapped optimizer, and adjusts the scale.
* :func:`loss_scale` reads the current scale out of any optimizer state (chained,
  nested in ``optax.MultiSteps``, inside a ``flax.nnx.Optimizer``), and
  :func:`scale_loss` multiplies a loss by it, in float32, in the train step.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_gradhealth import _catalogue, _clipping, _metrics, _skip, _stats, _vma
from optax_gradhealth import _interfaces as interfaces
from optax_gradhealth import _validation as check

__all__ = ["LossScaleState", "dynamic_loss_scale", "loss_scale", "scale_loss"]


class LossScaleState(NamedTuple):
    """State of :func:`dynamic_loss_scale`. Fields are prefixed ``loss_scale`` so that
    ``optax.tree.get(state, name)`` finds them without clashing.

    Attributes:
      loss_scale_inner_state: the wrapped optimizer's state.
      loss_scale: float32 scalar, the scale the next train step multiplies its loss by
        (``grad/loss_scale``).
      loss_scale_growth_tracker: int32, finite steps since the scale last changed or an
        overflow happened; the scale grows when it reaches ``growth_interval``.
      loss_scale_overflow: bool, the last step overflowed and was skipped
        (``grad/overflowed``).
      loss_scale_num_overflows: int32, overflowed (skipped) steps so far
        (``grad/num_overflows``).
    """

    loss_scale_inner_state: Any
    loss_scale: jax.Array
    loss_scale_growth_tracker: jax.Array
    loss_scale_overflow: jax.Array
    loss_scale_num_overflows: jax.Array


interfaces.keep_on_momentum_reset(LossScaleState, wrapped=("loss_scale_inner_state",))
interfaces.must_wrap(
    LossScaleState,
    "gh.dynamic_loss_scale",
    "an overflow is skipped before the loss scale sees it, so the scale never backs off and every later step "
    "overflows and is skipped",
)
_catalogue.register_metrics(
    LossScaleState,
    {
        "loss_scale": "grad/loss_scale",
        "loss_scale_overflow": "grad/overflowed",
        "loss_scale_num_overflows": "grad/num_overflows",
    },
)


#: The scale's range: a normal float32 whose inverse (the unscaling factor) is a normal
#: float32 too (a subnormal inverse is flushed to 0 on CPU: every gradient unscaled to 0).
_SMALLEST_SCALE = 2.0**-126
_LARGEST_SCALE = 2.0**126


def _overflowed(scaled: Any, unscaled_finite: jax.Array, scale: jax.Array) -> jax.Array:
    """Whether the *scaled* gradients were not finite (what backing the scale off can
    help), given whether the unscaled ones, as the optimizer reads them, are. With a
    scale of 1 or more the two agree (unscaling cannot overflow). Below 1 a float16
    gradient can be finite scaled and overflow once unscaled, a genuine fault: that rare
    step measures the scaled gradients again, in a ``lax.cond`` (only when some leaf is
    float16 or fp8)."""
    bad = ~unscaled_finite
    if not any(_stats._overflows_on_scaling(x) for x in jax.tree.leaves(scaled)):
        return bad  # no float16 (or fp8) leaf: no such fault, no second look
    again = lambda tree: _vma.varying_like(~_stats.grad_stats(tree).finite, tree, bad)
    as_is = lambda tree: _vma.varying_like(bad, tree)
    return jax.lax.cond(bad & (scale < 1.0), again, as_is, scaled)


def _holds_guard(state: Any) -> bool:
    """Whether a guard's state (any :class:`~optax_gradhealth._interfaces.UnscalesOnRead`
    state: one that skips and counts a non-finite step) is anywhere inside ``state``;
    decided from its structure, when the update is traced."""
    return bool(interfaces.guard_states(state))


def _empty_finished_windows(state: Any, sel: _skip.Selects) -> Any:
    """``state`` with the accumulator of every ``optax.MultiStepsState`` in it emptied
    (zeros, by a select) where its window has just ended (``mini_step == 0``).

    ``MultiSteps`` empties it by multiplying it by 0, which keeps a NaN: a genuine fault
    passed on to a guard inside would make every later window NaN (and skipped). The
    guard has skipped and counted the window it spoiled; the next one starts clean, as in
    :func:`optax_gradhealth.accumulate`. A finite accumulator is 0 there already."""
    is_window = lambda x: isinstance(x, optax.MultiStepsState)

    def empty(x):
        if not is_window(x):
            return x
        done = x.mini_step == 0
        acc = jax.tree.map(lambda a: sel.where(done, sel.zeros(a), a) if _stats._is_float(a) else a, x.acc_grads)
        return x._replace(acc_grads=acc)

    return jax.tree.map(empty, state, is_leaf=is_window)


def _zero_nonfinite(updates: Any) -> Any:
    """``updates`` with every non-finite float element replaced by 0."""
    return jax.tree.map(
        lambda u: jnp.where(jnp.isfinite(u), u, jnp.zeros_like(u)) if _stats._is_float(u) else u, updates
    )


def _growth_factor(name: str, value: Any) -> float:
    value = check.real_number(name, value)
    if not 1.0 < value < math.inf:
        raise ValueError(f"`{name}` must be a finite number > 1, got {value!r}.")
    return value


def dynamic_loss_scale(
    inner: optax.GradientTransformation,
    *,
    init_scale: float | jax.Array = 2.0**16,
    growth_factor: float | jax.Array = 2.0,
    backoff_factor: float | jax.Array = 0.5,
    growth_interval: int | jax.Array = 2000,
    min_scale: float | jax.Array = 1.0,
    max_scale: float | jax.Array = 2.0**24,
) -> optax.GradientTransformationExtraArgs:
    """Dynamic loss scaling around an optimizer, normally :func:`guard`.

    The train step multiplies its loss by the current scale (:func:`scale_loss`, or
    ``loss * gh.loss_scale(opt_state)``) before differentiating. ``update`` then:

    1. divides the gradients by the scale (float32 arithmetic, each leaf keeps its
       dtype), so the wrapped optimizer, and every norm, clip and spike decision in it,
       sees true gradient values;
    2. on an **overflow** (a non-finite scaled gradient while the scale is above
       ``min_scale`` and the ``loss``, if passed, is finite) skips the step: zero
       update, the wrapped optimizer is not called and its state (moments, guard
       statistics and counters) stays exactly as it was; the step counts in
       ``grad/num_overflows``, not in the guard's ``grad/num_nonfinite``; the scale is
       multiplied by ``backoff_factor`` (not below ``min_scale``);
    3. otherwise passes the unscaled gradients on. A non-finite gradient that is not an
       overflow (non-finite ``loss`` or ``value``, the scale already at ``min_scale``,
       or a float16 gradient that is finite scaled but overflows once unscaled by a
       scale below 1: backing off would only make that worse) is a genuine fault. When
       a :func:`guard` is inside ``inner`` (``inner`` itself, ``optax.MultiSteps`` or
       :func:`accumulate` of one, a chain holding one: decided from the state's
       structure) the fault goes to ``inner``, so that the guard skips it and counts it
       in ``grad/num_nonfinite`` (and, if it persists, recommends a rollback); inside
       ``optax.MultiSteps`` the micro-batch spoils its window, which the guard skips at
       the window's end, and the accumulator is emptied here (MultiSteps' own reset, a
       multiplication by 0, would keep the NaN for every later window). A non-finite
       ``loss`` with finite gradients does so on any micro-batch under
       :func:`accumulate`, but on the window's last one only under plain
       ``optax.MultiSteps``, which hands the guard that micro-batch's loss alone (an
       earlier one resets the growth count and nothing else). Transformations
       chained in front of the guard see the fault as they would without the loss
       scale. When no guard is inside, ``inner`` keeps its state on such a step (as on
       an overflow), so that its moments never see the NaN: the step is dropped, and
       **nothing counts it** (it is not an overflow either); wrap the optimizer in
       :func:`guard` to have such faults counted. The returned update is zeroed either
       way, and an update element that is not finite is zeroed as well;
    4. after ``growth_interval`` consecutive finite steps multiplies the scale by
       ``growth_factor`` (not above ``max_scale``, nor above 2**126: the unscaling
       factor ``1 / scale`` stays a normal float32).

    The defaults (``2**16``, x2 every 2000 finite steps, x0.5 on overflow) are
    ``torch.amp.GradScaler``'s.

    With gradient accumulation put this wrapper *outside* ``optax.MultiSteps``:
    ``dynamic_loss_scale(optax.MultiSteps(guard(...), k))``. Each micro-batch is then
    unscaled before it is accumulated, and an overflowed micro-batch is dropped instead
    of turning the accumulator into NaN (``MultiSteps`` resets its accumulator by
    multiplying by zero, so an Inf in it becomes NaN for good). A genuine fault in a
    micro-batch spoils its window only: the guard skips and counts that window, and the
    next one starts clean (a NaN loss with finite gradients: see 3., it counts on the
    window's last micro-batch only unless the accumulation is :func:`accumulate`). The
    growth interval then counts micro-batches.

    Args:
      inner: the optimizer to wrap (``gh.guard(...)`` recommended).
      init_scale: initial loss scale, in [2**-126, 2**126] (a float32 whose inverse
        is a normal float32 too).
      growth_factor: factor applied after ``growth_interval`` finite steps (> 1).
      backoff_factor: factor applied on overflow, in (0, 1).
      growth_interval: consecutive finite steps before the scale grows (int >= 1).
      min_scale: lower bound of the scale, in [2**-126, 2**126]. A non-finite gradient
        at this scale is treated as a genuine fault, not an overflow.
      max_scale: upper bound of the scale (>= ``min_scale``; inf, or anything above
        2**126, means 2**126).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`LossScaleState`; ``update`` forwards ``loss=`` and every other extra
      argument to ``inner``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import optax_gradhealth as gh
      >>> tx = gh.dynamic_loss_scale(gh.guard(optax.sgd(1.0)), init_scale=1024.0)
      >>> params = {'w': jnp.zeros(2, jnp.float16)}
      >>> state = tx.init(params)
      >>> float(gh.loss_scale(state))
      1024.0
      >>> grads = {'w': jnp.array([3.0, 4.0], jnp.float16) * gh.loss_scale(state).astype(jnp.float16)}
      >>> updates, state = tx.update(grads, state, params)
      >>> updates['w'].tolist(), float(gh.metrics(state)['grad/norm'])
      ([-3.0, -4.0], 5.0)
      >>> updates, state = tx.update({'w': jnp.array([jnp.inf, 1.0], jnp.float16)}, state, params)
      >>> m = gh.metrics(state)
      >>> bool(m['grad/overflowed']), float(m['grad/loss_scale']), int(m['grad/num_nonfinite'])
      (True, 512.0, 0)
    """
    inner = check.transformation("inner", inner)
    # Each may be a scalar array (optax.inject_hyperparams): checked like the number it
    # holds when concrete; the checks between them need all of them concrete.
    init_scale = check.positive_or_array("init_scale", init_scale)
    growth_factor = check.or_array(_growth_factor, "growth_factor", growth_factor)
    backoff_factor = check.or_array(check.in_open_unit_interval, "backoff_factor", backoff_factor)
    growth_interval = check.integer_or_array("growth_interval", growth_interval, minimum=1)
    min_scale = check.positive_or_array("min_scale", min_scale)
    max_scale = check.positive_or_array("max_scale", max_scale, allow_inf=True)
    concrete = check.concrete_values(init_scale=init_scale, min_scale=min_scale, max_scale=max_scale)
    for name in ("init_scale", "min_scale"):
        if name in concrete and not _SMALLEST_SCALE <= concrete[name] <= _LARGEST_SCALE:
            raise ValueError(
                f"`{name}` must lie in [2**-126, 2**126] (a normal float32 whose inverse, the "
                f"unscaling factor, is one too), got {concrete[name]!r}."
            )
    if len(concrete) == 3:
        init, low, high = concrete["init_scale"], concrete["min_scale"], concrete["max_scale"]
        if high < low:
            raise ValueError(f"`max_scale` ({high!r}) must be >= `min_scale` ({low!r}).")
        if not low <= init <= high:
            raise ValueError(f"`init_scale` must lie in [min_scale, max_scale] = [{low!r}, {high!r}], got {init!r}.")

    def init_fn(params):
        return LossScaleState(
            loss_scale_inner_state=inner.init(params),
            loss_scale=jnp.asarray(init_scale, jnp.float32),
            loss_scale_growth_tracker=jnp.zeros((), jnp.int32),
            loss_scale_overflow=jnp.zeros((), jnp.bool_),
            loss_scale_num_overflows=jnp.zeros((), jnp.int32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        check.state_type("gh.dynamic_loss_scale", state, LossScaleState)
        scale = state.loss_scale
        old_inner = state.loss_scale_inner_state
        sel = _skip.Selects()
        # Unscaling multiplies by `1 / scale` (as torch's GradScaler; exact for the
        # power-of-two scales of the default schedule): unlike a divide, XLA fuses the
        # multiply into every consumer instead of materialising the unscaled gradients.
        inverse = 1.0 / scale.astype(jnp.float32)
        # A non-finite loss (or `value`, which the guard judges as it does a loss) is a
        # genuine fault, not an overflow: the loss scale does not back off for it.
        loss_ok = jnp.ones((), jnp.bool_)
        for name in ("loss", "value"):
            if extra_args.get(name) is not None:
                loss_ok = loss_ok & jnp.all(jnp.isfinite(jnp.asarray(extra_args[name])))
        if isinstance(old_inner, interfaces.UnscalesOnRead):
            # A guard (or any transformation declaring the interface) unscales where it
            # reads the gradients (its statistics and its inner update), so the unscaled
            # gradients are never materialised.
            inner_updates, inner_state = inner.update(
                updates, old_inner, params, **extra_args, **{interfaces.UNSCALE_ARG: inverse}
            )
            # It already measured the gradient (its finite flag) and, on a non-finite
            # step, returned zeros and kept its inner optimizer's state. An overflow only
            # has to undo its own bookkeeping (scalars, per-leaf norms): no second pass
            # over the gradients or the moments.
            good = inner_state.gradients_finite()  # gradients and loss finite
            overflow = _overflowed(updates, good | ~loss_ok, scale) & loss_ok & (scale > min_scale)
            new_inner_state = inner_state.keep_bookkeeping(old_inner, overflow, sel.where)
            # Finite already unless the guard was built with check_updates=False: as on
            # the general path, no non-finite update element leaves this function (one
            # select, fused into the guard's own writes of the updates).
            new_updates = _zero_nonfinite(inner_updates)
        else:
            # The unscaled gradients, rounded to each leaf's dtype, as the wrapped
            # optimizer reads them: an overflow shows in the scaled ones, and with a
            # scale below 1 a float16 gradient can overflow when unscaled.
            finite = _stats._grad_stats(updates, inverse).finite
            good = finite & loss_ok
            overflow = _overflowed(updates, finite, scale) & loss_ok & (scale > min_scale)
            # An overflow never reaches the wrapped optimizer's state; no non-finite
            # update ever leaves this function. A genuine fault (non-finite, not an
            # overflow) goes on to a guard inside (`optax.MultiSteps(guard)`,
            # `gh.accumulate(guard)`, a chain holding one: decided from the state's
            # structure), which skips and counts it; a plain optimizer keeps its state on
            # it, so that its moments never see the NaN. The state is selected where the
            # inner update produces it (`_skip`), so that under donation XLA writes it in
            # place instead of copying every moment; the updates of a kept step, computed
            # from the kept state, are zeroed below (such a step is never finite).
            guarded = _holds_guard(old_inner)
            keep = overflow if guarded else ~finite
            old_leaves = jax.tree.leaves(old_inner)
            unscaled = _clipping.scale_tree(updates, (inverse, 1.0))  # in float32, cast back
            inner_updates, new_inner_state = _skip.update_with_selected_state(
                lambda: inner.update(unscaled, old_inner, params, **extra_args),
                lambda k, new: sel.where(keep, old_leaves[k], new),
                inputs=(updates, state, params, extra_args),
            )
            if guarded:
                new_inner_state = _empty_finished_windows(new_inner_state, sel)
            new_updates = _zero_nonfinite(sel.zero_floats_where(~finite, inner_updates))

        tracker = jnp.where(good, state.loss_scale_growth_tracker + 1, 0)
        grow = tracker >= growth_interval
        new_scale = jnp.where(grow, jnp.minimum(scale * growth_factor, jnp.minimum(max_scale, _LARGEST_SCALE)), scale)
        new_scale = jnp.where(overflow, jnp.maximum(scale * backoff_factor, min_scale), new_scale)
        tracker = jnp.where(grow, 0, tracker)
        return new_updates, LossScaleState(
            loss_scale_inner_state=new_inner_state,
            loss_scale=new_scale.astype(jnp.float32),
            loss_scale_growth_tracker=tracker.astype(jnp.int32),
            loss_scale_overflow=overflow,
            loss_scale_num_overflows=state.loss_scale_num_overflows + overflow.astype(jnp.int32),
        )

    return optax.GradientTransformationExtraArgs(init_fn, _vma.keeps_state_type(update_fn))


def _find_loss_scale_states(opt_state: Any) -> list[LossScaleState]:
    found = []

    def visit(x):
        if isinstance(x, LossScaleState):
            found.append(x)
        if isinstance(x, (list, tuple)):  # NamedTuples included
            for value in x:
                visit(value)
        elif isinstance(x, dict):
            for value in x.values():
                visit(value)

    visit(_metrics._unwrap_variables(opt_state))
    return found


def loss_scale(opt_state: Any) -> jax.Array:
    """The current loss scale (float32 scalar) held in an optimizer state.

    Finds the :class:`LossScaleState` anywhere inside ``opt_state`` (an
    ``optax.chain``, ``optax.MultiSteps``, an ``nnx.Optimizer`` or its
    ``opt_state``). Works inside and outside ``jit``; no host sync.

    Raises:
      ValueError: if there is no :func:`dynamic_loss_scale` state, or more than one.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import optax_gradhealth as gh
      >>> tx = optax.MultiSteps(gh.dynamic_loss_scale(optax.sgd(0.1), init_scale=8.0), 2)
      >>> float(gh.loss_scale(tx.init({'w': jnp.zeros(2)})))
      8.0
    """
    found = _find_loss_scale_states(opt_state)
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise ValueError(
            f"gh.loss_scale: found {what} gh.dynamic_loss_scale state(s) in the optimizer state; "
            "expected exactly one. Build the optimizer with gh.dynamic_loss_scale(...)."
        )
    return found[0].loss_scale


def scale_loss(loss: jax.Array, opt_state: Any) -> jax.Array:
    """``loss * loss_scale(opt_state)``, computed in float32.

    Differentiate the returned value in the train step. It is float32 even for an fp16
    loss, because an fp16 loss times the default scale (65536) would overflow; the
    gradient flowing back into fp16 activations is still scaled, which is the point.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import optax_gradhealth as gh
      >>> state = gh.dynamic_loss_scale(optax.sgd(0.1)).init({'w': jnp.zeros(2)})
      >>> float(gh.scale_loss(jnp.float16(2.0), state))
      131072.0
    """
    loss = jnp.asarray(loss)
    wide = jnp.promote_types(loss.dtype, jnp.float32)
    return loss.astype(wide) * loss_scale(opt_state).astype(wide)
