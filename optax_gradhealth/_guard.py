"""The guard: one statistics pass -> decide (apply / clip / skip / reset) -> inner update."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_gradhealth import _clipping, _skip, _stats
from optax_gradhealth import _detectors as detect
from optax_gradhealth import _validation as check

__all__ = ["SPIKE_ACTIONS", "GuardState", "guard"]

SPIKE_ACTIONS = ("skip", "clip", "record")
UNSCALE_ARG = "_gradhealth_unscale"  # private extra argument, see dynamic_loss_scale
_NO_STEP = -(2**30)  # sentinel in the spike ring: "no spike recorded here"

# The spike rule's defaults, chosen from the detection benchmark (docs/detection.md).
SPIKE_THRESHOLD = 5.0  # norm / baseline
SPIKE_ZSCORE = 6.0  # robust z of log(norm)
SPIKE_WINDOW = 128  # accepted steps in the window (the spread of their step-to-step changes)
SPIKE_BASELINE = 16  # the latest accepted steps whose median norm is the baseline
REBASELINE_AFTER = 50  # spikes in a row after which the window starts again
SPREAD_FLOOR = 0.05  # lower bound of the window's robust spread of log-norms


class GuardState(NamedTuple):
    """State of :func:`guard`. Every field is prefixed ``guard_`` so that
    ``optax.tree.get(state, name)`` finds it without clashing with optax's names.

    The fields named like a metric hold the value of the last step; see
    :func:`optax_gradhealth.metrics` for the public names and their meaning.

    Attributes:
      guard_inner_state: the wrapped optimizer's state.
      guard_clip_state: the clip policy's state.
      guard_norm_window: the spike detector's window of the last ``spike_window``
        accepted log-norms (:class:`optax_gradhealth._detectors.NormWindow`).
      guard_running_norm_mean: bias-corrected EMA of the accepted norms (see
        ``running_moments_update``; reported, not used by the spike rule).
      guard_running_norm_var: their bias-corrected EMA variance.
      guard_num_accepted: accepted (finite, applied) steps folded into them.
      guard_running_loss_mean: bias-corrected EMA of the accepted losses (when
        ``loss=`` is passed).
      guard_running_loss_var: their bias-corrected EMA variance.
      guard_num_losses: accepted losses folded into them.
      guard_spike_steps: int32 ring of the step indices of the latest spikes
        (length ``reset_after``), for the momentum-reset window.
      guard_norm: pre-clip global norm (``grad/norm``).
      guard_norm_clipped: norm of what the inner optimizer saw, 0 when skipped.
      guard_clip_threshold: threshold used this step.
      guard_clipped: the step was clipped.
      guard_finite: every gradient element (and ``loss`` and ``value``, if passed) was
        finite.
      guard_skipped: the step was skipped (zero update, inner state kept).
      guard_spike: the step was a spike.
      guard_spike_score: norm / baseline norm (the window's median norm).
      guard_zscore: robust z-score of log(norm) against the window.
      guard_norm_mean: bias-corrected running mean norm the step was judged by.
      guard_norm_std: running standard deviation the step was judged by.
      guard_loss_zscore: (loss - running mean loss) / running std (0 without loss).
      guard_momentum_reset: True when this step re-initialised the inner moments.
      guard_rollback: sticky rollback recommendation.
      guard_vanishing: vanishing-gradient flag of the step.
      guard_first_nonfinite_leaf: leaf index of the first non-finite leaf at the latest
        non-finite step (-1 if none yet); name it with ``gh.leaf_names(params)``.
      guard_num_steps: steps seen (int32), skipped ones included.
      guard_num_clipped: clipped steps (int32).
      guard_num_nonfinite: steps with a non-finite gradient, ``loss`` or ``value`` (int32).
      guard_num_nonfinite_updates: steps whose gradient was accepted but whose inner
        update or new inner state was non-finite, so they were skipped (int32).
      guard_num_skipped: skipped steps (int32).
      guard_num_spikes: spikes detected (int32).
      guard_num_momentum_resets: momentum resets performed (int32).
      guard_consecutive_nonfinite: current run of consecutive non-finite steps (a
        non-finite gradient, loss, value or inner update).
      guard_consecutive_spikes: current run of consecutive spikes.
      guard_layer_norms: pre-clip per-leaf norms (a :class:`LayerNorms`: one vector).
    """

    guard_inner_state: Any
    guard_clip_state: Any
    guard_norm_window: detect.NormWindow
    guard_running_norm_mean: jax.Array
    guard_running_norm_var: jax.Array
    guard_num_accepted: jax.Array
    guard_running_loss_mean: jax.Array
    guard_running_loss_var: jax.Array
    guard_num_losses: jax.Array
    guard_spike_steps: jax.Array
    guard_norm: jax.Array
    guard_norm_clipped: jax.Array
    guard_clip_threshold: jax.Array
    guard_clipped: jax.Array
    guard_finite: jax.Array
    guard_skipped: jax.Array
    guard_spike: jax.Array
    guard_spike_score: jax.Array
    guard_zscore: jax.Array
    guard_norm_mean: jax.Array
    guard_norm_std: jax.Array
    guard_loss_zscore: jax.Array
    guard_momentum_reset: jax.Array
    guard_rollback: jax.Array
    guard_vanishing: jax.Array
    guard_first_nonfinite_leaf: jax.Array
    guard_num_steps: jax.Array
    guard_num_clipped: jax.Array
    guard_num_nonfinite: jax.Array
    guard_num_nonfinite_updates: jax.Array
    guard_num_skipped: jax.Array
    guard_num_spikes: jax.Array
    guard_num_momentum_resets: jax.Array
    guard_consecutive_nonfinite: jax.Array
    guard_consecutive_spikes: jax.Array
    guard_layer_norms: _stats.LayerNorms


# Sub-states whose counters drive learning-rate schedules: a momentum reset leaves them.
_SCHEDULE_STATES = (optax.ScaleByScheduleState,)
_HYPERPARAM_STATES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
# gradhealth's own bookkeeping states (records, loss scale, audits, nested guards): a
# momentum reset keeps them as they are. Modules add theirs with keep_on_momentum_reset.
_KEPT_ON_RESET: set[type] = set()


def keep_on_momentum_reset(*state_types: type) -> None:
    """Declares state types that the guard's momentum reset keeps as they are (instead of
    re-initialising them with the inner optimizer's moments): bookkeeping, not moments."""
    _KEPT_ON_RESET.update(state_types)


def _reset_mask(state: Any) -> Any:
    """A tree of Python bools shaped like ``state``: True for the leaves a momentum reset
    re-initialises (from a fresh ``inner.init``); False for those it keeps: schedule and
    hyperparameter counters and gradhealth's own bookkeeping states (clip modes, nested
    guards, loss scale)."""

    def kept(x):
        return isinstance(x, _SCHEDULE_STATES) or type(x) in _KEPT_ON_RESET

    def is_boundary(x):
        return kept(x) or isinstance(x, _HYPERPARAM_STATES)

    def one(o):
        if kept(o):
            return jax.tree.map(lambda _: False, o)
        if isinstance(o, _HYPERPARAM_STATES):
            return jax.tree.map(lambda _: False, o)._replace(inner_state=_reset_mask(o.inner_state))
        return True

    return jax.tree.map(one, state, is_leaf=is_boundary)


def _gradient_like(params: Any) -> Any:
    """The tree the gradients have: ``params``, or the fast half of ``optax.lookahead``'s
    ``LookaheadParams`` (its gradients are taken with respect to the fast params)."""
    return params.fast if isinstance(params, optax.LookaheadParams) else params


def _scalar_arg(name: str, x: Any) -> jax.Array | None:
    if x is None:
        return None
    x = jnp.asarray(x, jnp.float32)
    if x.shape != ():
        raise ValueError(f"gh.guard: `{name}` must be a scalar, got shape {x.shape}.")
    return x


def _all_finite(tree: Any) -> jax.Array:
    """True when every float element of ``tree`` is finite (a scalar bool).

    The flags of leaves of one shape are and-ed elementwise before one reduction: where
    the compiler does not fuse a reduction with the computation of its operand (XLA:CPU
    materialises the operand), that is one byte per element of each shape, not one per
    leaf (Adam's ``mu``, ``nu`` and update share each parameter's shape).
    """
    by_shape: dict[tuple[int, ...], jax.Array] = {}
    for x in _stats._float_leaves(tree):
        flag = jnp.isfinite(x)
        by_shape[x.shape] = flag if x.shape not in by_shape else by_shape[x.shape] & flag
    if not by_shape:
        return jnp.ones((), jnp.bool_)
    # One concatenation (see `_stats._sums_of_squares`), not a kernel reading every flag.
    return jnp.all(jax.lax.optimization_barrier(jnp.stack([jnp.all(flag) for flag in by_shape.values()])))


def _check_state_structure(old: Any, new: Any) -> None:
    """Raises when the inner update returns a state of another structure than it was
    given: the guard keeps the old state on a skipped step, leaf by leaf, so both must
    match (as ``lax.scan`` and ``jit`` buffer donation need anyway)."""
    old_leaves, old_def = jax.tree.flatten(old)
    new_leaves, new_def = jax.tree.flatten(new)
    if old_def != new_def:
        where = f"{old_def.num_leaves} leaves before, {new_def.num_leaves} after: {old_def} -> {new_def}"
    else:
        shapes = [(k, jnp.shape(a), b.shape) for k, (a, b) in enumerate(zip(old_leaves, new_leaves))]
        changed = [f"leaf {k}: shape {a} before, {b} after" for k, a, b in shapes if a != b]
        if not changed:
            return
        where = changed[0]
    raise ValueError(
        "gh.guard: the inner optimizer's update returned a state whose structure differs from the state it "
        f"was given ({where}). The guard keeps the old state on a skipped step, so the structure must stay "
        "fixed. optax.monitor does this (its measurements dict is empty until the first update): chain it "
        "outside the guard, e.g. optax.chain(optax.monitor(...), gh.guard(inner))."
    )


def guard(
    inner: optax.GradientTransformation,
    *,
    clip: float | _clipping.ClipPolicy | None = None,
    spike_action: str = "skip",
    spike_threshold: float | None = SPIKE_THRESHOLD,
    spike_zscore: float | None = SPIKE_ZSCORE,
    spike_window: int = SPIKE_WINDOW,
    rebaseline_after: int | None = REBASELINE_AFTER,
    loss_spike_zscore: float | None = None,
    warmup_steps: int = 20,
    stats_decay: float = 0.98,
    reset_after: int | None = 3,
    reset_window: int = 100,
    rollback_after_nonfinite: int | None = 10,
    rollback_after_spikes: int | None = 10,
    vanishing_norm: float | None = 1e-5,
    check_updates: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """Wraps an optimizer so that NaN/Inf, spikes and runaway runs cannot hurt it.

    Every step computes the gradient statistics once (:func:`grad_stats`: float32,
    overflow-safe, finite flag, per-leaf norms) and then decides:

    * **non-finite** (a NaN/Inf element, or a non-finite ``loss`` or ``value``): skip.
      The returned update is zero and the inner state is left exactly as it was,
      however many non-finite steps come in a row. Counted; the first bad leaf is
      recorded. A finite step whose inner update or new inner state comes out
      non-finite (the optimizer's own NaN) is skipped the same way and counted in
      ``grad/num_nonfinite_updates``.
    * **spike** (after ``warmup_steps`` accepted steps): judged against the last
      ``spike_window`` accepted norms, on a log scale and with robust statistics. The
      baseline is the median of the latest 16 of them, the spread ``s`` a robust
      standard deviation of their step-to-step changes (``1.4826 MAD / sqrt(2)`` of the
      differences of consecutive log-norms, at least 0.05): blind to the slow trend of
      a run. A spike's score ``norm / baseline`` exceeds ``spike_threshold`` *and* its
      robust z-score ``log(norm / baseline) / s`` exceeds ``spike_zscore`` (a ``None``
      drops that condition; both ``None`` disables norm spikes), or, when a ``loss``
      is passed and ``loss_spike_zscore`` is set, the loss z-score exceeds it. The
      ``spike_action`` is ``'skip'`` (as non-finite), ``'clip'`` (clip to the largest
      norm that is not a spike) or ``'record'`` (count only). The defaults were chosen
      from measured false-skip rates and detection rates (``docs/detection.md``).
    * **clip** by ``clip`` (None: no clipping; a number: fixed threshold; or a policy:
      :class:`FixedClip`, :class:`ZScoreClip`, :class:`PercentileClip`).
    * **momentum reset** when ``reset_after`` spikes fall within ``reset_window``
      steps: every per-parameter statistic of the inner state (Adam's ``mu``, ``nu``
      and their bias-correction ``count``) is re-initialised, while learning-rate
      schedule counters (``ScaleByScheduleState``, ``inject_hyperparams``) keep going.
      The reset comes before the step's update: with ``spike_action='skip'`` the reset
      step is skipped, so the next accepted gradient is the fresh optimizer's first;
      with ``'clip'`` or ``'record'`` the reset step's own (clipped) gradient is.
    * **rollback** recommendation (sticky) after ``rollback_after_nonfinite``
      non-finite steps in a row or ``rollback_after_spikes`` spikes in a row.
    * **vanishing**: the norm is finite and below ``vanishing_norm``, and, when a
      ``loss`` is passed, the loss is not below its running mean (not falling).

    The spike window and the running norm and loss statistics (bias-corrected EMAs
    with decay ``stats_decay``, reported as ``grad/norm_mean`` and ``grad/norm_std``)
    are updated only on accepted (finite, applied) steps, with an accepted spike's norm
    capped at the largest norm that is not a spike, so one NaN or spike does not
    poison them.

    Args:
      inner: the optimizer to protect, any ``optax.GradientTransformation``.
      clip: clipping before the inner update: None (off), a number (fixed global-norm
        threshold), a global-norm policy (:class:`FixedClip`, :class:`ZScoreClip`,
        :class:`PercentileClip`), or a clip-mode transformation
        (:func:`clip_by_value`, :func:`clip_by_layer_norm`,
        :func:`adaptive_grad_clip`), which is chained in front of ``inner``.
      spike_action: ``'skip'``, ``'clip'`` or ``'record'``.
      spike_threshold: spike-score threshold, ``norm / baseline`` (> 1), or None.
      spike_zscore: robust z-score threshold on the log-norm (> 0), or None.
      spike_window: accepted steps in the spike detector's window (>= 1).
      rebaseline_after: spikes in a row after which the spike window is emptied and
        warms up again on the new norms (>= 1), or None (never). A lasting change of
        the gradient's scale (parameters thrown elsewhere by a learning-rate spike) is
        then trained through instead of skipping every later step; shorter bursts of
        bad batches are skipped whole. ``rollback_after_spikes`` (10) raises the
        rollback recommendation long before.
      loss_spike_zscore: loss z-score threshold (> 0), or None (default: off).
      warmup_steps: accepted steps before spike detection starts (>= 1).
      stats_decay: EMA decay of the running statistics, in (0, 1).
      reset_after: spikes within ``reset_window`` that trigger a momentum reset
        (>= 1), or None to never reset.
      reset_window: window length in steps (>= 1).
      rollback_after_nonfinite: consecutive non-finite steps that raise the rollback
        recommendation (>= 1), or None.
      rollback_after_spikes: consecutive spikes that raise it (>= 1), or None.
      vanishing_norm: norm under which a step counts as vanishing (> 0), or None.
      check_updates: also skip an accepted step whose inner update or new inner state
        is not finite (the optimizer made the NaN itself: an infinite learning rate,
        fp16 moments overflowing, a bias correction of zero), counted in
        ``grad/num_nonfinite_updates``. One more read of the inner state per step
        (``docs/benchmarks_guard.md``); False drops the check.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` accepts ``loss=`` and
      forwards every extra argument to ``inner``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import optax_gradhealth as gh
      >>> tx = gh.guard(optax.adam(0.1), clip=1.0)
      >>> params = {'w': jnp.ones(3)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({'w': jnp.array([jnp.nan, 1.0, 1.0])}, state, params)
      >>> updates['w'].tolist(), bool(gh.metrics(state)['grad/skipped'])
      ([0.0, 0.0, 0.0], True)
      >>> updates, state = tx.update({'w': jnp.array([3.0, 0.0, 4.0])}, state, params)
      >>> m = gh.metrics(state)
      >>> float(m['grad/norm']), float(m['grad/norm_clipped']), int(m['grad/num_skipped'])
      (5.0, 1.0, 1)
    """
    inner = check.transformation("inner", inner)
    if isinstance(clip, optax.GradientTransformation):
        # A clip mode (gh.clip_by_value, gh.clip_by_layer_norm, gh.adaptive_grad_clip):
        # applied to accepted steps only, between the guard's decision and `inner`.
        inner = optax.chain(clip, inner)
        clip = None
    policy = _clipping.as_clip_policy("clip", clip)
    spike_action = check.one_of("spike_action", spike_action, SPIKE_ACTIONS)
    # Thresholds may be scalar arrays (traced under optax.inject_hyperparams): checked
    # here when they are Python numbers, used as they are otherwise.
    spike_threshold = check.optional(check.positive_or_array, "spike_threshold", spike_threshold)
    if isinstance(spike_threshold, float) and spike_threshold <= 1.0:
        raise ValueError(f"`spike_threshold` is a ratio norm / baseline norm and must be > 1, got {spike_threshold!r}.")
    spike_zscore = check.optional(check.positive_or_array, "spike_zscore", spike_zscore)
    loss_spike_zscore = check.optional(check.positive_or_array, "loss_spike_zscore", loss_spike_zscore)
    spike_window = check.integer("spike_window", spike_window, minimum=1)
    rebaseline_after = check.optional(check.integer, "rebaseline_after", rebaseline_after, minimum=1)
    warmup_steps = check.integer("warmup_steps", warmup_steps, minimum=1)
    stats_decay = check.or_array(check.in_open_unit_interval, "stats_decay", stats_decay)
    reset_after = check.optional(check.integer, "reset_after", reset_after, minimum=1)
    reset_window = check.integer("reset_window", reset_window, minimum=1)
    rollback_after_nonfinite = check.optional(
        check.integer, "rollback_after_nonfinite", rollback_after_nonfinite, minimum=1
    )
    rollback_after_spikes = check.optional(check.integer, "rollback_after_spikes", rollback_after_spikes, minimum=1)
    vanishing_norm = check.optional(check.positive_or_array, "vanishing_norm", vanishing_norm)
    check_updates = check.boolean("check_updates", check_updates)
    norm_spikes_on = spike_threshold is not None or spike_zscore is not None
    spike_rule = detect.SpikeRule(
        spike_threshold,
        spike_zscore,
        spike_window,
        warmup_steps,
        SPREAD_FLOOR,
        min(SPIKE_BASELINE, spike_window),
        rebaseline_after,
    )
    # Whether any step can be clipped by a global factor (a policy, or spike clipping).
    never_clips = (
        isinstance(policy, _clipping.FixedClip) and isinstance(policy.max_norm, float) and math.isinf(policy.max_norm)
    )
    can_clip = not never_clips or (spike_action == "clip" and norm_spikes_on)
    ring_size = reset_after if reset_after is not None else 1

    def init_fn(params):
        # Every field gets a buffer of its own, so the state can be donated.
        f32 = lambda: jnp.zeros((), jnp.float32)
        i32 = lambda: jnp.zeros((), jnp.int32)
        false = lambda: jnp.zeros((), jnp.bool_)
        clip_state = policy.init()
        return GuardState(
            guard_inner_state=inner.init(params),
            guard_clip_state=clip_state,
            guard_norm_window=spike_rule.init(),
            guard_running_norm_mean=f32(),
            guard_running_norm_var=f32(),
            guard_num_accepted=i32(),
            guard_running_loss_mean=f32(),
            guard_running_loss_var=f32(),
            guard_num_losses=i32(),
            guard_spike_steps=jnp.full((ring_size,), _NO_STEP, jnp.int32),
            guard_norm=f32(),
            guard_norm_clipped=f32(),
            guard_clip_threshold=policy.threshold(clip_state),
            guard_clipped=false(),
            guard_finite=jnp.ones((), jnp.bool_),
            guard_skipped=false(),
            guard_spike=false(),
            guard_spike_score=f32(),
            guard_zscore=f32(),
            guard_norm_mean=f32(),
            guard_norm_std=f32(),
            guard_loss_zscore=f32(),
            guard_momentum_reset=false(),
            guard_rollback=false(),
            guard_vanishing=false(),
            guard_first_nonfinite_leaf=jnp.full((), -1, jnp.int32),
            guard_num_steps=i32(),
            guard_num_clipped=i32(),
            guard_num_nonfinite=i32(),
            guard_num_nonfinite_updates=i32(),
            guard_num_skipped=i32(),
            guard_num_spikes=i32(),
            guard_num_momentum_resets=i32(),
            guard_consecutive_nonfinite=i32(),
            guard_consecutive_spikes=i32(),
            guard_layer_norms=_stats.LayerNorms.zeros(_gradient_like(params)),
        )

    def update_fn(updates, state, params=None, **extra_args):
        _clipping.check_same_structure(updates, state.guard_layer_norms.treedef, "gh.guard")
        # Private, from gh.dynamic_loss_scale: `updates` are still loss-scaled; the true
        # gradients are `updates * unscale`. Both the statistics and the inner update
        # apply the multiply where they read the leaves, so the unscaled gradients are
        # never materialised (they would be: two different consumers read them).
        extra_args = dict(extra_args)
        unscale = extra_args.pop(UNSCALE_ARG, None)
        stats = _stats._grad_stats(updates, unscale)
        norm = stats.norm
        step = state.guard_num_steps

        # The loss, and the objective `value` that line searches and Polyak steps read,
        # are inputs of the step like the gradient: a non-finite one skips it.
        loss = _scalar_arg("loss", extra_args.get("loss"))
        value = _scalar_arg("value", extra_args.get("value"))
        finite = stats.finite
        for x in (loss, value):
            if x is not None:
                finite = finite & jnp.isfinite(x)

        # Spike detection, judged against the window of accepted norms before this step.
        verdict = spike_rule.judge(state.guard_norm_window, norm, finite)
        spike_score, zscore, spike = verdict.ratio, verdict.zscore, verdict.spike

        loss_zscore = jnp.zeros((), jnp.float32)
        if loss is not None:
            loss_mean = state.guard_running_loss_mean
            loss_std = jnp.sqrt(state.guard_running_loss_var)
            loss_warm = state.guard_num_losses >= warmup_steps
            loss_zscore = jnp.where(
                loss_warm & finite, (loss - loss_mean) / jnp.maximum(loss_std, 1e-12 * jnp.abs(loss_mean) + 1e-30), 0.0
            )
            if loss_spike_zscore is not None:
                spike = spike | (loss_warm & finite & (loss_zscore > loss_spike_zscore))

        # Clip and skip decisions.
        threshold = policy.threshold(state.guard_clip_state)
        if spike_action == "clip" and norm_spikes_on:
            threshold = jnp.where(spike, jnp.minimum(threshold, verdict.bound), threshold)
        if can_clip:
            factors = _clipping.clip_scale(norm, threshold)
        else:
            # Constant factors: XLA drops the multiply, and a clip mode's statistics read
            # the gradient itself (x * factor, read by the mode's reduction and by the
            # inner update, would otherwise be materialised: a gradient-sized temporary).
            factors = (jnp.ones((), jnp.float32), jnp.ones((), jnp.float32))
        skipped = ~finite
        if spike_action == "skip":
            skipped = skipped | spike

        # Momentum reset: `reset_after` spikes within `reset_window` steps.
        spike_steps = state.guard_spike_steps
        momentum_reset = jnp.zeros((), jnp.bool_)
        if reset_after is not None:
            slot = state.guard_num_spikes % ring_size
            spike_steps = jnp.where(spike, _clipping.ring_write(spike_steps, slot, step), spike_steps)
            in_window = jnp.sum((step - spike_steps < reset_window).astype(jnp.int32))
            momentum_reset = spike & (in_window >= reset_after)
            spike_steps = jnp.where(momentum_reset, jnp.full_like(spike_steps, _NO_STEP), spike_steps)
            fresh_leaves = jax.tree.leaves(inner.init(params if params is not None else updates))
            reset_leaves = jax.tree.leaves(_reset_mask(state.guard_inner_state))

        # The inner update sees the clipped gradients. A skipped step keeps the inner state
        # it would have updated: the old one, re-initialised (schedule counters excepted)
        # on a momentum-reset step. Both are selects on the state leaves, applied where the
        # inner update reads or produces them (`_skip`), so that XLA writes the new state
        # in place without first copying the old moments (see the docstring of `_skip`).
        old_leaves, state_treedef = jax.tree.flatten(state.guard_inner_state)
        sel = _skip.Selects()

        def kept(k):
            if reset_after is None or not reset_leaves[k]:
                return old_leaves[k]
            return sel.where(momentum_reset, fresh_leaves[k], old_leaves[k])

        if spike_action == "skip":
            # A reset step is a skipped step: its (discarded) updates read the old state.
            inner_state = state.guard_inner_state
        else:
            # A reset step is applied: the re-initialised optimizer takes this step's
            # (clipped) gradient as its first.
            inner_state = state_treedef.unflatten([kept(k) for k in range(len(old_leaves))])

        # Unscaled first (rounded to each leaf's dtype, as a separately unscaled gradient
        # would be), then clipped; all of it fused into the inner update's reads.
        grads = updates if unscale is None else _clipping.scale_tree(updates, (unscale, 1.0))
        traced = _skip.TracedUpdate(
            lambda: inner.update(_clipping.scale_tree(grads, factors), inner_state, params, **extra_args),
            inputs=(updates, state, params, extra_args),
        )
        _check_state_structure(state.guard_inner_state, traced.out_shapes[1])
        # The optimizer itself can make a NaN from a finite gradient (an infinite learning
        # rate, moments overflowing in fp16, a bias correction of 0): an accepted step
        # whose update or new inner state is not finite is skipped too.
        nonfinite_update = jnp.zeros((), jnp.bool_)
        if check_updates:
            nonfinite_update = ~skipped & ~_all_finite(traced.outputs())
            skipped = skipped | nonfinite_update
        accepted = ~skipped
        clipped = accepted & (factors[0] < 1.0)
        inner_updates, new_inner_state = traced.with_selected_state(lambda k, new: sel.where(skipped, kept(k), new))
        new_updates = sel.zero_floats_where(skipped, inner_updates)

        # Running statistics: accepted steps only; a spike's norm is capped.
        capped_norm = jnp.where(spike, jnp.minimum(norm, verdict.bound), norm)  # loss spikes too
        norm_window = spike_rule.fold(state.guard_norm_window, norm, verdict, accepted)
        mean = state.guard_running_norm_mean
        std = jnp.sqrt(state.guard_running_norm_var)
        norm_mean, norm_var, num_accepted = _clipping.running_moments_update(
            state.guard_running_norm_mean,
            state.guard_running_norm_var,
            state.guard_num_accepted,
            capped_norm,
            stats_decay,
            accepted,
        )
        loss_mean_new = state.guard_running_loss_mean
        loss_var_new = state.guard_running_loss_var
        num_losses = state.guard_num_losses
        vanishing = jnp.zeros((), jnp.bool_)
        if vanishing_norm is not None:
            vanishing = finite & (norm < vanishing_norm)
        if loss is not None:
            loss_accepted = accepted & ~spike
            loss_mean_new, loss_var_new, num_losses = _clipping.running_moments_update(
                loss_mean_new, loss_var_new, num_losses, loss, stats_decay, loss_accepted
            )
            if vanishing_norm is not None:
                not_falling = (state.guard_num_losses == 0) | (loss >= loss_mean)
                vanishing = vanishing & not_falling

        nonfinite = ~finite
        consecutive_nonfinite = jnp.where(nonfinite | nonfinite_update, state.guard_consecutive_nonfinite + 1, 0)
        consecutive_spikes = jnp.where(spike, state.guard_consecutive_spikes + 1, 0)
        rollback = state.guard_rollback
        if rollback_after_nonfinite is not None:
            rollback = rollback | (consecutive_nonfinite >= rollback_after_nonfinite)
        if rollback_after_spikes is not None:
            rollback = rollback | (consecutive_spikes >= rollback_after_spikes)

        as_int = lambda flag: flag.astype(jnp.int32)
        new_state = GuardState(
            guard_inner_state=new_inner_state,
            guard_clip_state=policy.update(state.guard_clip_state, norm, accepted),
            guard_norm_window=norm_window,
            guard_running_norm_mean=norm_mean,
            guard_running_norm_var=norm_var,
            guard_num_accepted=num_accepted,
            guard_running_loss_mean=loss_mean_new,
            guard_running_loss_var=loss_var_new,
            guard_num_losses=num_losses,
            guard_spike_steps=spike_steps,
            guard_norm=norm,
            guard_norm_clipped=jnp.where(skipped, 0.0, norm * factors[0] * factors[1]),
            guard_clip_threshold=threshold,
            guard_clipped=clipped,
            guard_finite=finite,
            guard_skipped=skipped,
            guard_spike=spike,
            guard_spike_score=spike_score,
            guard_zscore=zscore,
            guard_norm_mean=mean,
            guard_norm_std=std,
            guard_loss_zscore=loss_zscore,
            guard_momentum_reset=momentum_reset,
            guard_rollback=rollback,
            guard_vanishing=vanishing,
            guard_first_nonfinite_leaf=jnp.where(
                nonfinite, stats.first_nonfinite_leaf, state.guard_first_nonfinite_leaf
            ),
            guard_num_steps=step + 1,
            guard_num_clipped=state.guard_num_clipped + as_int(clipped),
            guard_num_nonfinite=state.guard_num_nonfinite + as_int(nonfinite),
            guard_num_nonfinite_updates=state.guard_num_nonfinite_updates + as_int(nonfinite_update),
            guard_num_skipped=state.guard_num_skipped + as_int(skipped),
            guard_num_spikes=state.guard_num_spikes + as_int(spike),
            guard_num_momentum_resets=state.guard_num_momentum_resets + as_int(momentum_reset),
            guard_consecutive_nonfinite=consecutive_nonfinite,
            guard_consecutive_spikes=consecutive_spikes,
            guard_layer_norms=stats.leaf_norms,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


keep_on_momentum_reset(GuardState, _clipping.ClipByGlobalNormState)
