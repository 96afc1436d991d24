"""The guard: one statistics pass -> decide (apply / clip / skip / reset) -> inner update.

The pieces, in the order ``update`` runs them:

* :class:`GuardConfig`: the arguments of :func:`guard`, validated once when it is built.
* :func:`_stats._grad_stats`: one pass over the gradients (norm, finite flag, per-leaf
  norms).
* :func:`_decide`: the step's :class:`Decision` (finite? spike? clip factor, skip,
  momentum reset), from the detectors and the state before the step.
* :func:`_apply_inner`: the inner update on the clipped gradients, with the inner state
  selected where it is produced (kept on a skipped step, re-initialised on a reset), and
  the check of the optimizer's own output.
* :func:`_record`: the state's groups after the step: the running moments (accepted
  steps only), the counters and the step's report.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_gradhealth import _catalogue, _clipping, _lowering, _skip, _stats, _vma
from optax_gradhealth import _detectors as detect
from optax_gradhealth import _interfaces as interfaces
from optax_gradhealth import _validation as check
from optax_gradhealth._interfaces import UNSCALE_ARG, keep_on_momentum_reset

__all__ = [
    "SPIKE_ACTIONS",
    "GuardConfig",
    "GuardCounters",
    "GuardMoments",
    "GuardReport",
    "GuardState",
    "guard",
    "rebaseline",
]

SPIKE_ACTIONS = ("skip", "clip", "record")
_NO_STEP = detect.NO_STEP  # sentinel in the spike ring: "no spike recorded here"

# The spike rule's defaults, chosen from the detection benchmark (docs/detection.md).
SPIKE_THRESHOLD = 5.0  # norm / baseline
SPIKE_ZSCORE = 5.0  # robust z of log(norm)
SPIKE_WINDOW = 128  # accepted steps in the window (the spread of their step-to-step changes)
SPIKE_BASELINE = 16  # the latest accepted steps whose median norm is the baseline
REBASELINE_AFTER = 50  # spikes in a row after which the window starts again
SPREAD_FLOOR = 0.05  # lower bound of the window's robust spread of log-norms
# Lower bound of the loss's running standard deviation, relative to its running mean: a
# loss that barely moves (constant, or quantised in bf16) would otherwise make a change of
# one ulp a loss spike. The detection benchmark's clean runs move their loss by 8-14% a
# step, so the floor changes none of their z-scores (docs/detection.md, "Loss spikes").
LOSS_SPREAD_FLOOR = 0.01
# A run of spikes that re-baselines is lost (its rollback stands through the restart) when,
# with `loss=` passed, its loss is more than LOST_LOSS_RISE times the level before it and
# its loss per unit of gradient norm more than LOST_LOSS_PER_NORM_RISE times: a loss weight
# x10 (the loss and the gradient x10) measured 0.9-1.1 on the latter; a learning rate x100
# that made a regressor diverge, 2.1-3.9 (tests/test_rebaseline.py, docs/concepts.md).
LOST_LOSS_RISE = 2.0
LOST_LOSS_PER_NORM_RISE = 1.5


class GuardReport(NamedTuple):
    """What the guard measured and decided at the last step (overwritten every step).

    Every field is a metric (see :data:`optax_gradhealth.CATALOGUE` for the meaning of
    each name).

    Attributes:
      guard_norm: pre-clip global norm (``grad/norm``).
      guard_norm_clipped: norm after the guard's global-norm clip (its ``clip=``
        threshold or policy, or a spike clip), 0 when skipped; with a clip-mode
        transformation as ``clip=``, the norm before it (``grad/norm_clipped``).
      guard_clip_threshold: threshold used this step (``grad/clip_threshold``).
      guard_clipped: the step was clipped (``grad/clipped``).
      guard_finite: every gradient element (and ``loss`` and ``value``, if passed) was
        finite (``grad/finite``).
      guard_skipped: the step was skipped: zero update, inner state kept
        (``grad/skipped``).
      guard_spike: the step was a spike (``grad/spiked``).
      guard_spike_score: norm / baseline norm (``grad/spike_score``).
      guard_zscore: robust z-score of log(norm) against the window (``grad/zscore``).
      guard_norm_mean: running mean norm the step was judged by (``grad/norm_mean``).
      guard_norm_std: running standard deviation the step was judged by
        (``grad/norm_std``).
      guard_loss_zscore: (loss - running mean loss) / running std, 0 without ``loss``
        (``grad/loss_zscore``).
      guard_momentum_reset: this step re-initialised the inner moments
        (``grad/momentum_reset``).
      guard_vanishing: vanishing-gradient flag of the step (``grad/vanishing``).
      guard_update_norm: global norm of the update the guard returned, 0 on a skipped
        step (``update/norm``); None with ``update_health=False``.
      guard_param_norm: global norm of the ``params`` passed to ``update`` (0 when none
        are passed; ``param/norm``); None with ``update_health=False``.
      guard_update_param_ratio: ``update/norm / param/norm``, 0 when either is 0
        (``update/param_ratio``); None with ``update_health=False``.
      guard_leaf_norms: pre-clip per-leaf norms (a :class:`LeafNorms`: one vector;
        ``grad/leaf_norm/<path>``).
      guard_leaf_param_ratios: per leaf, the norm of the update's leaf over the norm of
        the parameter's leaf, 0 where either is 0 (one vector, like the per-leaf norms;
        ``update/leaf_param_ratio/<path>``); None with ``update_health=False``.
    """

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
    guard_vanishing: jax.Array
    guard_update_norm: jax.Array | None
    guard_param_norm: jax.Array | None
    guard_update_param_ratio: jax.Array | None
    guard_leaf_norms: _stats.LeafNorms
    guard_leaf_param_ratios: _stats.LeafNorms | None


class GuardCounters(NamedTuple):
    """Counts since ``init`` and the guard's sticky outcomes (every field a metric).

    Attributes:
      guard_num_steps: steps seen, skipped ones included (``grad/num_steps``).
      guard_num_clipped: clipped steps (``grad/num_clipped``).
      guard_num_nonfinite: steps with a non-finite gradient, ``loss`` or ``value``
        (``grad/num_nonfinite``).
      guard_num_nonfinite_updates: steps whose gradient was accepted but whose inner
        update or new inner state was non-finite, so they were skipped
        (``grad/num_nonfinite_updates``).
      guard_num_skipped: skipped steps (``grad/num_skipped``).
      guard_num_spikes: spikes detected (``grad/num_spikes``).
      guard_num_momentum_resets: momentum resets performed
        (``grad/num_momentum_resets``).
      guard_num_rebaselines: restarts of the spike window: after ``rebaseline_after``
        spikes or dips, and by :func:`rebaseline` (``grad/num_rebaselines``).
      guard_consecutive_nonfinite: non-finite steps (a non-finite gradient, loss, value
        or inner update) since the last good step; a spike between them does not break
        the run (``grad/consecutive_nonfinite``).
      guard_consecutive_spikes: spikes since the last good step; a non-finite step
        between them does not break the run (``grad/consecutive_spikes``).
      guard_rollback: sticky rollback recommendation (``grad/rollback_recommended``).
      guard_first_nonfinite_leaf: leaf index of the first non-finite leaf at the latest
        step with a non-finite gradient, -1 if none yet (a non-finite ``loss`` or
        ``value`` with finite gradients leaves it as it was); name it with
        ``gh.leaf_names(params)`` (``grad/first_nonfinite_leaf``).
    """

    guard_num_steps: jax.Array
    guard_num_clipped: jax.Array
    guard_num_nonfinite: jax.Array
    guard_num_nonfinite_updates: jax.Array
    guard_num_skipped: jax.Array
    guard_num_spikes: jax.Array
    guard_num_momentum_resets: jax.Array
    guard_num_rebaselines: jax.Array
    guard_consecutive_nonfinite: jax.Array
    guard_consecutive_spikes: jax.Array
    guard_rollback: jax.Array
    guard_first_nonfinite_leaf: jax.Array


class GuardMoments(NamedTuple):
    """The running statistics the guard judges steps by, folded from accepted (finite,
    applied) steps only; not metrics themselves.

    Attributes:
      guard_norm_window: the spike detector's window of the last ``spike_window``
        accepted log-norms (:class:`optax_gradhealth._detectors.NormWindow`).
      guard_running_norm_mean: bias-corrected EMA of the accepted norms (see
        ``running_moments_update``; reported, not used by the spike rule).
      guard_running_norm_var: their bias-corrected EMA variance.
      guard_num_accepted: accepted steps folded into them.
      guard_running_loss_mean: bias-corrected EMA of the accepted losses (when
        ``loss=`` is passed).
      guard_running_loss_var: their bias-corrected EMA variance.
      guard_num_losses: accepted losses folded into them (back to 0, with the mean
        and variance, when ``rebaseline_after`` spikes in a row restart the window).
      guard_rollback_held: bool, the rollback recommendation stands through a restart
        of the window: it was raised by non-finite steps, or by a run of spikes that
        ended without re-baselining. (A rollback that the run of spikes which
        re-baselines raised is cleared at the restart, the guard trained through it,
        unless the run's loss says the run is lost: see ``guard_run_log_loss``.)
      guard_run_log_loss: mean log-loss of the current run's spikes and dips (0 with no
        run going on, or without ``loss=``).
      guard_run_log_norm: mean log-norm of the same steps. At the restart, the rollback
        the run raised stands when the run's loss (geometric mean) is more than
        ``LOST_LOSS_RISE`` times ``guard_running_loss_mean`` (frozen during the run) and
        its loss per unit of gradient norm more than ``LOST_LOSS_PER_NORM_RISE`` times
        the level before the run (the window's baseline norm).
    """

    guard_norm_window: detect.NormWindow
    guard_running_norm_mean: jax.Array
    guard_running_norm_var: jax.Array
    guard_num_accepted: jax.Array
    guard_running_loss_mean: jax.Array
    guard_running_loss_var: jax.Array
    guard_num_losses: jax.Array
    guard_rollback_held: jax.Array
    guard_run_log_loss: jax.Array
    guard_run_log_norm: jax.Array


class GuardState(NamedTuple):
    """State of :func:`guard`, in groups. Every field of every group is prefixed
    ``guard_`` so that ``optax.tree.get(state, name)`` finds it without clashing with
    optax's names (e.g. ``optax.tree.get(state, 'guard_num_skipped')``).

    The report and the counters come first, so that :func:`optax_gradhealth.metrics`
    reports a guard's names before those of the transformations inside it.

    Attributes:
      guard_report: the last step's measurements and decisions (:class:`GuardReport`).
      guard_counters: counts and sticky outcomes (:class:`GuardCounters`).
      guard_moments: the running statistics (:class:`GuardMoments`).
      guard_spike_steps: int32 ring of the step indices of the latest skipped spikes
        (every spike with ``spike_action`` ``'clip'`` or ``'record'``; length
        ``reset_after``, 1 when None), for the momentum reset and for telling a recurring
        spike (:func:`optax_gradhealth._detectors.spike_action`).
      guard_clip_state: the clip policy's state.
      guard_inner_state: the wrapped optimizer's state.
    """

    guard_report: GuardReport
    guard_counters: GuardCounters
    guard_moments: GuardMoments
    guard_spike_steps: jax.Array
    guard_clip_state: Any
    guard_inner_state: Any

    # The loss scale's interface (`_interfaces.UnscalesOnRead`).
    def gradients_finite(self) -> jax.Array:
        return self.guard_report.guard_finite

    def keep_bookkeeping(self, previous: GuardState, keep: jax.Array, where: Callable) -> GuardState:
        inner = self.guard_inner_state
        kept = jax.tree.map(
            lambda old, new: where(keep, old, new),
            previous._replace(guard_inner_state=None),
            self._replace(guard_inner_state=None),
        )
        return kept._replace(guard_inner_state=inner)


_catalogue.register_metrics(GuardState, {})  # groups, reported in field order
_catalogue.register_metrics(
    GuardReport,
    {
        "guard_norm": "grad/norm",
        "guard_norm_clipped": "grad/norm_clipped",
        "guard_clip_threshold": "grad/clip_threshold",
        "guard_clipped": "grad/clipped",
        "guard_finite": "grad/finite",
        "guard_skipped": "grad/skipped",
        "guard_spike": "grad/spiked",
        "guard_spike_score": "grad/spike_score",
        "guard_zscore": "grad/zscore",
        "guard_norm_mean": "grad/norm_mean",
        "guard_norm_std": "grad/norm_std",
        "guard_loss_zscore": "grad/loss_zscore",
        "guard_momentum_reset": "grad/momentum_reset",
        "guard_vanishing": "grad/vanishing",
        "guard_update_norm": "update/norm",
        "guard_param_norm": "param/norm",
        "guard_update_param_ratio": "update/param_ratio",
        "guard_leaf_norms": "grad/leaf_norm",
        "guard_leaf_param_ratios": "update/leaf_param_ratio",
    },
)
_catalogue.register_metrics(
    GuardCounters,
    {
        "guard_num_steps": "grad/num_steps",
        "guard_num_clipped": "grad/num_clipped",
        "guard_num_nonfinite": "grad/num_nonfinite",
        "guard_num_nonfinite_updates": "grad/num_nonfinite_updates",
        "guard_num_skipped": "grad/num_skipped",
        "guard_num_spikes": "grad/num_spikes",
        "guard_num_momentum_resets": "grad/num_momentum_resets",
        "guard_num_rebaselines": "grad/num_rebaselines",
        "guard_consecutive_nonfinite": "grad/consecutive_nonfinite",
        "guard_consecutive_spikes": "grad/consecutive_spikes",
        "guard_rollback": "grad/rollback_recommended",
        "guard_first_nonfinite_leaf": "grad/first_nonfinite_leaf",
    },
)
keep_on_momentum_reset(GuardState)


# Sub-states whose counters drive learning-rate schedules: a momentum reset leaves them.
# (`reduce_on_plateau`'s learning-rate scale and its plateau counters are one of them.)
_SCHEDULE_STATES = (optax.ScaleByScheduleState, optax.contrib.ReduceLROnPlateauState)
_HYPERPARAM_STATES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
# Random-number states: a fresh init would replay the noise of the first steps (the same
# Gaussian noise twice voids DP-SGD's privacy accounting) and restart the noise's
# annealing schedule (`optax.add_noise`'s count). Any other leaf of a PRNG key dtype is
# kept too; a raw uint32 key cannot be told from data, hence the list.
_NOISE_STATES = (optax.AddNoiseState, optax.contrib.DifferentiallyPrivateAggregateState)
# States that mix moments with a learned step size or a schedule counter: the moments
# are reset, the named fields kept. Prodigy's and D-Adaptation's `estim_lr` (d) only
# grows (a max over its estimates), so the fresh accumulators that feed it cannot lower
# it; their `count` is also the bias correction of the reset moments and is reset with
# them (kept, the first updates would be up to ~6x too large). Momo's `count` is its
# schedule's step (its momentum is not bias-corrected) and `lb` its learned lower bound
# of the loss; MomoAdam's count is Adam's bias correction.
_KEPT_FIELDS: dict[type, tuple[str, ...]] = {
    optax.contrib.ProdigyState: ("estim_lr",),
    optax.contrib.DAdaptAdamWState: ("estim_lr",),
    optax.contrib.MomoState: ("count", "lb"),
    optax.contrib.MomoAdamState: ("lb",),
}
# gradhealth's own bookkeeping states (records, loss scale, audits, nested guards) are
# kept too: modules declare theirs with `_interfaces.keep_on_momentum_reset`.


def _is_prng_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _reset_mask(state: Any) -> Any:
    """A tree of Python bools shaped like ``state``: True for the leaves a momentum reset
    re-initialises (from a fresh ``inner.init``); False for those it keeps: schedule and
    hyperparameter counters, random-number keys and noise states, learned step sizes
    (``_KEPT_FIELDS``) and gradhealth's own bookkeeping states (clip modes, nested
    guards, loss scale)."""

    def kept(x):
        return (
            isinstance(x, _SCHEDULE_STATES + _NOISE_STATES)
            or interfaces.is_kept_on_momentum_reset(x)
            or _is_prng_key(x)
        )

    def is_boundary(x):
        return kept(x) or isinstance(x, _HYPERPARAM_STATES) or type(x) in _KEPT_FIELDS

    def one(o):
        if kept(o):
            mask = jax.tree.map(lambda _: False, o)
            fields = interfaces.wrapped_fields(o)  # a wrapper's inner state: reset as such
            return mask._replace(**{f: _reset_mask(getattr(o, f)) for f in fields}) if fields else mask
        if isinstance(o, _HYPERPARAM_STATES):
            return jax.tree.map(lambda _: False, o)._replace(inner_state=_reset_mask(o.inner_state))
        if type(o) in _KEPT_FIELDS:
            keep = {f: jax.tree.map(lambda _: False, getattr(o, f)) for f in _KEPT_FIELDS[type(o)]}
            return jax.tree.map(lambda _: True, o)._replace(**keep)
        return True

    return jax.tree.map(one, state, is_leaf=is_boundary)


def _gradient_like(params: Any) -> Any:
    """The tree the gradients have: ``params``, or the fast half of ``optax.lookahead``'s
    ``LookaheadParams`` (its gradients are taken with respect to the fast params)."""
    return params.fast if isinstance(params, optax.LookaheadParams) else params


def _on_gradient_like(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``tx`` (a clip mode chained in front of the inner optimizer) given the tree the
    gradients have (:func:`_gradient_like`) as ``params``, in ``init`` and ``update``:
    the fast half of ``optax.lookahead``'s ``LookaheadParams``, which the inner optimizer
    keeps getting whole. Its state is ``tx``'s own."""
    tx = optax.with_extra_args_support(tx)

    def init_fn(params):
        return tx.init(_gradient_like(params))

    def update_fn(updates, state, params=None, **extra_args):
        return tx.update(updates, state, None if params is None else _gradient_like(params), **extra_args)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _scalar_arg(name: str, x: Any) -> jax.Array | None:
    if x is None:
        return None
    if isinstance(x, (tuple, list, dict)):
        raise TypeError(
            f"gh.guard: `{name}` must be a scalar, got a {type(x).__name__}. With jax.value_and_grad(..., "
            f"has_aux=True), pass the loss alone: `(loss, aux), grads = jax.value_and_grad(f, has_aux=True)(...)`, "
            f"then tx.update(grads, state, params, {name}=loss)."
        )
    x = jnp.asarray(x, jnp.float32)
    if x.shape != ():
        raise ValueError(f"gh.guard: `{name}` must be a scalar, got shape {x.shape}.")
    return x


def _check_varies_like_grads(name: str, x: jax.Array | None, updates: Any) -> None:
    """Raises when ``x`` (the loss or value) varies over a ``jax.shard_map`` mesh axis
    that the gradients do not: a per-device loss next to an all-reduced gradient."""
    if x is None:
        return
    grad_axes: set[str] = set()
    for leaf in jax.tree.leaves(updates):
        grad_axes |= _vma.varying_axes(leaf) or frozenset()
    extra = sorted((_vma.varying_axes(x) or frozenset()) - grad_axes)
    if extra:
        axes = extra[0] if len(extra) == 1 else tuple(extra)
        raise ValueError(
            f"gh.guard: `{name}` varies over the jax.shard_map mesh axes {extra} (one value per device) and "
            f"the gradients do not: each device would judge the step by its own {name} and the replicas "
            f"would drift apart. Pass the mean: `{name}=jax.lax.pmean({name}, {axes!r})`."
        )


def _check_grads_vary_like_state(updates: Any, state: GuardState, params: Any) -> None:
    """Raises when the gradients vary over a ``jax.shard_map`` mesh axis that the
    guard's state does not: per-device gradients reached a guard whose state is shared
    by the devices (``optax.chain(gh.guard(...), gh.cross_device(...))``, the wrong
    order: each device would judge its own gradient and skip steps the others apply),
    or the leaves are split over the axis (``gh.cross_device``'s ``sharded_axes``; the
    parameters vary over it too), whose parts the guard cannot judge inside
    ``shard_map``: each device would see its own part's norm, and a mean over the axis
    would mix the parameter's parts."""
    state_axes = _vma.varying_axes(state.guard_counters.guard_num_steps) or frozenset()
    grad_axes: set[str] = set()
    first = None  # the first leaf that varies over an axis the state does not
    for path, leaf in jax.tree_util.tree_flatten_with_path(updates)[0]:
        axes = _vma.varying_axes(leaf) or frozenset()
        if first is None and axes - state_axes:
            first = _stats.path_name(path)
        grad_axes |= axes
    extra = sorted(grad_axes - state_axes)
    if not extra:
        return
    param_axes: set[str] = set()
    for leaf in jax.tree.leaves(params):
        param_axes |= _vma.varying_axes(leaf) or frozenset()
    split = sorted(param_axes.intersection(extra))
    start = (
        f"gh.guard: the gradients vary over the jax.shard_map mesh axes {extra} (leaf {first!r} does) but the "
        "guard's state does not"
    )
    jitted = "run the guard under jax.jit on sharded arrays (docs/distributed.md, 'Parameters sharded within one "
    jitted += "jitted program')"
    if split:
        raise ValueError(
            f"{start}, and the parameters are split over {split} (FSDP or tensor parallelism, gh.cross_device's "
            "`sharded_axes`): the guard cannot judge a gradient split across devices inside jax.shard_map (each "
            "device would see its own part's norm), and a mean over the axis would mix the parameter's parts. "
            f"Instead, {jitted}."
        )
    axes = extra[0] if len(extra) == 1 else tuple(extra)
    unknown = ""
    if params is None:  # nothing tells a data axis from a sharded one
        unknown = (
            " If instead the leaves are split over the axis (gh.cross_device's `sharded_axes`), do not average "
            f"them (a mean over the axis would mix the parameter's parts): {jitted}."
        )
    raise ValueError(
        f"{start}: per-device gradients reached the guard, which would judge each device's own gradient and "
        f"skip steps the others apply. Put gh.cross_device(axis_name={axes!r}) (or a jax.lax.pmean over "
        f"{axes!r}) in front of it: optax.chain(gh.cross_device(axis_name={axes!r}), gh.guard(...)).{unknown}"
    )


#: At most this many leaves' finite flags are and-ed before one reduction (`_all_finite`).
_FLAGS_PER_REDUCTION = 24


def _state_pairs(new_state: Any, old_state: Any) -> list[tuple[jax.Array, jax.Array]]:
    """The float leaves of the inner update's new state, each with the leaf at its place
    in the state the update was given (same structure: `_check_state_structure`)."""
    return [
        (jnp.asarray(x), jnp.asarray(old))
        for x, old in zip(jax.tree.leaves(new_state), jax.tree.leaves(old_state), strict=True)
        if _stats._is_float(x)
    ]


def _writable(new: jax.Array, old: jax.Array | None) -> jax.Array:
    """Per element: may the update write ``new``? Yes when it is finite, or when the
    element it replaces was not finite either: a sentinel an optimizer's ``init`` put
    there and keeps until it has data (``reduce_on_plateau``'s best value, +inf until
    its first ``accumulation_size`` losses are in). Only a value that *becomes* non-finite
    fails the check; without the exception such an optimizer's first step would be
    skipped, and so every step after it."""
    ok = jnp.isfinite(new)
    return ok if old is None else ok | ~jnp.isfinite(old)


def _all_finite(tree: Any, pairs: list[tuple[jax.Array, jax.Array | None]] = ()) -> jax.Array:
    """True when every float element of ``tree`` is finite and every ``(new, old)``
    state pair is :func:`_writable` (a scalar bool); the update check without update
    health.

    The flags of leaves of one shape are and-ed elementwise before one reduction, up to
    ``_FLAGS_PER_REDUCTION`` leaves at a time: where the compiler does not fuse a
    reduction with the computation of its operand (XLA:CPU materialises the operand of a
    reduction of booleans), that is one byte per element of each group, not one per
    leaf (Adam's ``mu``, ``nu`` and update share each parameter's shape). The cap keeps
    each group's kernel small: on a tree of 1000 leaves in a few shapes, one group per
    shape made kernels of hundreds of operands, whose code generation took 43 s of a
    59 s compile on XLA:CPU (``benchmarks/compile_profile.py``).
    """
    groups: dict[tuple[int, ...], list[jax.Array]] = {}
    flags = []
    for x, old in [(x, None) for x in _stats._float_leaves(tree)] + list(pairs):
        group = groups.setdefault(x.shape, [])
        group.append(_writable(x, old))
        if len(group) == _FLAGS_PER_REDUCTION:
            flags.append(functools.reduce(jnp.logical_and, groups.pop(x.shape)))
    flags += [functools.reduce(jnp.logical_and, group) for group in groups.values()]
    if not flags:
        return jnp.ones((), jnp.bool_)
    # One concatenation (see `_stats._sums_of_squares`), not a kernel reading every flag.
    return jnp.all(_lowering.one_vector(jnp.stack([jnp.all(flag) for flag in flags])))


class OutputSums(NamedTuple):
    """What :func:`_output_sums` reads from the inner update's outputs in one pass.

    Attributes:
      finite: every float element of the update and of the new inner state is finite,
        and no update leaf's sum of squares overflowed float32.
      update_sums: per update leaf (``jax.tree.leaves`` order), the float32 sum of
        squares of its elements (0 for non-float leaves), NaN or Inf when not
        ``finite``.
      param_sums: the same for the parameters, when they were passed and have the
        update's structure; else None.
    """

    finite: jax.Array
    update_sums: jax.Array
    param_sums: jax.Array | None


def _output_sums(updates: Any, new_state: Any, old_state: Any, params: Any | None) -> OutputSums:
    """The update check and update health from one reduction per update leaf.

    Each float update leaf's sum of squares is poisoned (NaN) where an element of a
    state leaf paired with it is not finite: the ``i``-th state leaf of a shape goes to
    the ``i mod n``-th of the ``n`` update leaves of that shape (Adam's ``mu`` and
    ``nu`` of a parameter go with its update, which reads them anyway). The sum is then
    finite exactly when all of them are, and when it did not overflow float32 (an
    update element of ~1e19: treated as non-finite). One float reduction per leaf, over
    the update evaluated from the step's inputs; the parameters' sums of squares are
    separate reductions of inputs. A state element that was not finite in ``old_state``
    does not poison (:func:`_writable`). State leaves of a shape no update leaf has (step
    counters, factored moments) are checked by :func:`_all_finite`.
    """
    alone: list[tuple[jax.Array, jax.Array | None]] = []
    if isinstance(params, optax.LookaheadParams) and isinstance(updates, optax.LookaheadParams):
        # optax.lookahead: the health of the fast half, whose leaves are the gradients';
        # the slow half's update is still checked.
        alone = [(x, None) for x in _stats._float_leaves(updates.slow)]
        updates, params = updates.fast, params.fast
    update_leaves = jax.tree.leaves(_stats._without_nnx_variables(updates))
    param_leaves = None
    if params is not None:
        param_leaves, param_def = jax.tree.flatten(_stats._without_nnx_variables(params))
        if param_def != jax.tree.structure(_stats._without_nnx_variables(updates)):
            param_leaves = None  # not the update's structure: no per-leaf ratios
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for k, u in enumerate(update_leaves):
        if _stats._is_float(u):
            by_shape.setdefault(jnp.shape(u), []).append(k)
    partners: dict[int, list[tuple[jax.Array, jax.Array]]] = {}
    seen: dict[tuple[int, ...], int] = {}
    for x, old in _state_pairs(new_state, old_state):
        owners = by_shape.get(x.shape)
        if owners is None:
            alone.append((x, old))
            continue
        count = seen.get(x.shape, 0)
        partners.setdefault(owners[count % len(owners)], []).append((x, old))
        seen[x.shape] = count + 1

    update_sums = []
    for k, u in enumerate(update_leaves):
        if not _stats._is_float(u):
            update_sums.append(jnp.zeros((), jnp.float32))
            continue
        u = jnp.asarray(u)
        squares = _stats._abs_squared(u, _stats._accumulation_dtype(u), None)
        ok = None
        for x, old in partners.get(k, ()):
            ok = _writable(x, old) if ok is None else ok & _writable(x, old)
        if ok is not None:  # (lax.select: jnp.where would add a nested call per leaf)
            squares = jax.lax.select(ok, squares, jax.lax.full_like(squares, jnp.nan))
        update_sums.append(jnp.sum(squares, dtype=squares.dtype).astype(jnp.float32))
    update_sums = _lowering.one_vector(jnp.stack(update_sums)) if update_sums else jnp.zeros((0,), jnp.float32)
    finite = jnp.all(jnp.isfinite(update_sums)) & _all_finite((), alone)
    param_sums = None
    if param_leaves is not None:
        sums = [_stats._sum_of_squares_or_zero(x) for x in param_leaves]
        param_sums = _lowering.one_vector(jnp.stack(sums)) if sums else jnp.zeros((0,), jnp.float32)
    return OutputSums(finite, update_sums, param_sums)


def _check_state_structure(old: Any, new: Any) -> None:
    """Raises when the inner update returns a state of another structure than it was
    given: the guard keeps the old state on a skipped step, leaf by leaf, so both must
    match (as ``lax.scan`` and ``jit`` buffer donation need anyway). A leaf whose dtype
    changed is not an error: it is cast back (:func:`_dtype_casts`)."""
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
        "outside the guard, e.g. optax.chain(optax.monitor(...), gh.guard(inner)). So does an optimizer "
        "initialised with flax.nnx.Param-wrapped parameters and updated with plain gradients, or the other "
        "way round: pass `init` the same kind of tree as the gradients."
    )


def _dtype_casts(old_leaves: list[Any], new_shapes: list[jax.ShapeDtypeStruct]) -> dict[int, tuple[Any, bool]]:
    """The inner state leaves whose dtype the inner update changed (same structure:
    :func:`_check_state_structure`): ``{k: (init's dtype, widened)}``, ``widened`` when
    every value of init's dtype is exact in the new one (bfloat16 or float16 to float32),
    so that the kept value survives a select in the new dtype. Empty in the usual case."""
    casts = {}
    for k, (old, new) in enumerate(zip(old_leaves, new_shapes, strict=True)):
        dtype = jnp.result_type(old)
        if new.dtype == dtype:
            continue
        widened = False
        if jnp.issubdtype(dtype, jnp.floating) and jnp.issubdtype(new.dtype, jnp.floating):
            a, b = jnp.finfo(dtype), jnp.finfo(new.dtype)
            widened = b.nmant >= a.nmant and b.maxexp >= a.maxexp and b.minexp <= a.minexp
        casts[k] = (dtype, widened)
    return casts


def _cast_state(state: Any, casts: dict[int, tuple[Any, bool]]) -> Any:
    """``state`` with the leaves in ``casts`` (:func:`_dtype_casts`) cast back to init's dtype."""
    if not casts:
        return state
    leaves, treedef = jax.tree.flatten(state)
    return treedef.unflatten([x.astype(casts[k][0]) if k in casts else x for k, x in enumerate(leaves)])


@dataclasses.dataclass(frozen=True)
class GuardConfig:
    """The arguments of :func:`guard`, validated once (see its docstring for each).

    Thresholds may be scalar arrays (traced under ``optax.inject_hyperparams``): they are
    checked when they are Python numbers and used as they are otherwise. So may the
    integer arguments: a concrete integer array is checked and made an int; a traced one
    (the same argument inside ``inject_hyperparams``' jitted update) is compared as it
    is, and the two that size the state (``spike_window``, ``reset_after``) are then
    read from the state's shapes (:meth:`sized_like`).
    """

    policy: _clipping.ClipPolicy
    spike_action: str
    spike_threshold: Any
    spike_zscore: Any
    spike_window: Any
    rebaseline_after: Any
    loss_spike_zscore: Any
    warmup_steps: Any
    stats_decay: Any
    reset_after: Any
    reset_window: Any
    rollback_after_nonfinite: Any
    rollback_after_spikes: Any
    vanishing_norm: Any
    check_updates: bool
    update_health: bool
    ring_size: int | None  # the reset ring's length; None until sized from a state
    # A clip mode (gh.clip_by_value, ...) is chained in front of the inner optimizer: it
    # bounds a recurring spike under 'skip' (no global factor, see `can_clip`).
    clip_mode: bool = False

    @classmethod
    def build(
        cls,
        *,
        clip: Any,
        spike_action: str,
        spike_threshold: Any,
        spike_zscore: Any,
        spike_window: Any,
        rebaseline_after: Any,
        loss_spike_zscore: Any,
        warmup_steps: Any,
        stats_decay: Any,
        reset_after: Any,
        reset_window: Any,
        rollback_after_nonfinite: Any,
        rollback_after_spikes: Any,
        vanishing_norm: Any,
        check_updates: bool,
        update_health: bool,
        clip_mode: bool = False,
    ) -> GuardConfig:
        """Validates every argument (a clear error naming it) and builds the config."""
        spike_threshold = check.optional(check.positive_or_array, "spike_threshold", spike_threshold)
        concrete = spike_threshold is not None and not isinstance(spike_threshold, jax.core.Tracer)
        if concrete and float(spike_threshold) <= 1.0:
            raise ValueError(
                f"`spike_threshold` is a ratio norm / baseline norm and must be > 1, got {float(spike_threshold)!r}."
            )
        count = lambda name, value: check.optional(check.integer_or_array, name, value, minimum=1)
        reset_after = count("reset_after", reset_after)
        reset_window = check.integer_or_array("reset_window", reset_window, minimum=1)
        if isinstance(reset_after, int) and isinstance(reset_window, int) and reset_after > reset_window:
            raise ValueError(
                f"`reset_after` ({reset_after}) spikes can never fall within `reset_window` ({reset_window}) steps, "
                "one spike per step: the momentum would never be reset. Use reset_window >= reset_after, or "
                "reset_after=None to turn the reset off."
            )
        return cls(
            policy=_clipping.as_clip_policy("clip", clip),
            spike_action=check.one_of("spike_action", spike_action, SPIKE_ACTIONS),
            spike_threshold=spike_threshold,
            spike_zscore=check.optional(check.positive_or_array, "spike_zscore", spike_zscore),
            spike_window=check.integer_or_array("spike_window", spike_window, minimum=1),
            rebaseline_after=count("rebaseline_after", rebaseline_after),
            loss_spike_zscore=check.optional(check.positive_or_array, "loss_spike_zscore", loss_spike_zscore),
            warmup_steps=check.integer_or_array("warmup_steps", warmup_steps, minimum=1),
            stats_decay=check.or_array(check.in_open_unit_interval, "stats_decay", stats_decay),
            reset_after=reset_after,
            reset_window=reset_window,
            rollback_after_nonfinite=count("rollback_after_nonfinite", rollback_after_nonfinite),
            rollback_after_spikes=count("rollback_after_spikes", rollback_after_spikes),
            vanishing_norm=check.optional(check.positive_or_array, "vanishing_norm", vanishing_norm),
            check_updates=check.boolean("check_updates", check_updates),
            update_health=check.boolean("update_health", update_health),
            ring_size=1 if reset_after is None else reset_after if isinstance(reset_after, int) else None,
            clip_mode=clip_mode,
        )

    def sized_like(self, state: GuardState) -> GuardConfig:
        """This config with the sizes a traced argument could not give taken from
        ``state``'s buffers (the spike window's and the reset ring's lengths)."""
        if isinstance(self.spike_window, int) and self.ring_size is not None:
            return self
        return dataclasses.replace(
            self,
            spike_window=int(state.guard_moments.guard_norm_window.window_log_norms.shape[0]),
            ring_size=int(state.guard_spike_steps.shape[0]),
        )

    @property
    def spike_rule(self) -> detect.SpikeRule:
        if not isinstance(self.spike_window, int):
            raise ValueError(
                "gh.guard: `spike_window` is a traced value, so the spike window's size is not known: build the "
                "guard (its init) with a concrete int, e.g. outside jit."
            )
        return detect.SpikeRule(
            self.spike_threshold,
            self.spike_zscore,
            self.spike_window,
            self.warmup_steps,
            SPREAD_FLOOR,
            min(SPIKE_BASELINE, self.spike_window),
            self.rebaseline_after,
        )

    @property
    def norm_spikes_on(self) -> bool:
        return self.spike_threshold is not None or self.spike_zscore is not None

    @property
    def can_clip(self) -> bool:
        """Whether any step can be clipped by a global factor (a policy, or spike clipping)."""
        policy = self.policy
        never_clips = (
            isinstance(policy, _clipping.FixedClip)
            and isinstance(policy.max_norm, float)
            and math.isinf(policy.max_norm)
        )
        return not never_clips or (self.norm_spikes_on and self.spike_action in self._bound_actions)

    @property
    def _bound_actions(self) -> tuple[str, ...]:
        """The spike actions that clip a spike to the spike bound by a global factor:
        'clip' (every spike) and 'skip' (a recurring one), but not 'skip' with a clip mode,
        which bounds a recurring spike itself: a global factor read by the mode's
        reduction and by the inner update would be materialised, a gradient-sized
        temporary."""
        return ("clip",) if self.clip_mode else ("clip", "skip")


class Decision(NamedTuple):
    """What :func:`_decide` made of a step, before the inner update runs.

    Attributes:
      finite: every gradient element, and ``loss`` and ``value`` if passed, is finite.
      verdict: the spike rule's scores against the window before the step.
      spike: a norm spike or, with ``loss_spike_zscore``, a loss spike.
      loss_zscore: the loss's z-score against its running moments (0 without ``loss``).
      threshold: the clip threshold in force (lowered to the spike bound when a spike is
        clipped).
      factors: the two clip factors whose product scales the gradients.
      skipped: the step is skipped (non-finite, or a spike with ``spike_action='skip'``);
        the inner update's own check can add to it (:class:`Outcome`).
      momentum_reset: this step re-initialises the inner moments.
      spike_steps: the reset ring after this step.
    """

    finite: jax.Array
    verdict: detect.SpikeVerdict
    spike: jax.Array
    loss_zscore: jax.Array
    threshold: jax.Array
    factors: tuple[jax.Array, jax.Array]
    skipped: jax.Array
    momentum_reset: jax.Array
    spike_steps: jax.Array


class Outcome(NamedTuple):
    """What :func:`_apply_inner` returns: the step's updates and inner state, and
    whether the step was skipped after all (``nonfinite_update``: the optimizer's own
    update or new state was not finite)."""

    updates: Any
    inner_state: Any
    skipped: jax.Array
    nonfinite_update: jax.Array
    sums: OutputSums | None  # the inner update's and the params' sums of squares (update health)


def _loss_zscore(config: GuardConfig, moments: GuardMoments, loss: jax.Array, finite: jax.Array) -> jax.Array:
    warm = moments.guard_num_losses >= config.warmup_steps
    mean = moments.guard_running_loss_mean
    std = jnp.sqrt(moments.guard_running_loss_var)
    return jnp.where(warm & finite, (loss - mean) / jnp.maximum(std, LOSS_SPREAD_FLOOR * jnp.abs(mean) + 1e-30), 0.0)


def _decide(
    config: GuardConfig,
    state: GuardState,
    stats: _stats.GradStats,
    loss: jax.Array | None,
    value: jax.Array | None,
    scaled_norm: jax.Array | None = None,
) -> Decision:
    """Judges the step from its statistics and the state before it (no inner update).

    ``scaled_norm``: the global norm times ``2**-80``
    (``_stats._grad_stats_and_scaled_norms``), read where the norm saturates at
    float32's max, so that the clip still brings it down to the threshold."""
    norm = stats.norm
    # The loss, and the objective `value` that line searches and Polyak steps read, are
    # inputs of the step like the gradient: a non-finite one skips it.
    finite = stats.finite
    for x in (loss, value):
        if x is not None:
            finite = finite & jnp.isfinite(x)

    # Spike detection, judged against the window of accepted norms before this step.
    verdict = config.spike_rule.judge(state.guard_moments.guard_norm_window, norm, finite)
    spike = verdict.spike
    loss_zscore = jnp.zeros((), jnp.float32)
    if loss is not None:
        loss_zscore = _loss_zscore(config, state.guard_moments, loss, finite)
        if config.loss_spike_zscore is not None:
            warm = state.guard_moments.guard_num_losses >= config.warmup_steps
            spike = spike | (warm & finite & (loss_zscore > config.loss_spike_zscore))

    # Skip, clip or reset (`detect.spike_action`). With spike_action='skip' a spike that
    # recurs among accepted steps (another skipped spike within `reset_window` steps, the
    # step before it accepted) is clipped to the spike bound instead: skipping every
    # batch that holds examples the model has not fit keeps them unfit, so they spike
    # again each time they come back (a run memorising a small dataset). Skipped spikes
    # fill the ring; `reset_after` of them within `reset_window` steps reset the moments.
    counters = state.guard_counters
    action = detect.spike_action(
        state.guard_spike_steps,
        counters.guard_num_steps,
        spike,
        counters.guard_consecutive_spikes > 0,
        config.reset_window,
        config.reset_after,
        recur=config.spike_action == "skip",
    )
    threshold = config.policy.threshold(state.guard_clip_state)
    if config.norm_spikes_on and config.spike_action in config._bound_actions:
        to_bound = spike if config.spike_action == "clip" else action.recurring
        threshold = jnp.where(to_bound, jnp.minimum(threshold, verdict.bound), threshold)
    if config.can_clip:
        factors = _clipping.clip_scale(norm, threshold, scaled_norm)
    else:
        # Constant factors: XLA drops the multiply, and a clip mode's statistics read the
        # gradient itself (x * factor, read by the mode's reduction and by the inner
        # update, would otherwise be materialised: a gradient-sized temporary).
        factors = (jnp.ones((), jnp.float32), jnp.ones((), jnp.float32))
    skipped = ~finite
    if config.spike_action == "skip":
        skipped = skipped | (spike & ~action.recurring)
    momentum_reset, spike_steps = action.reset, action.ring
    return Decision(finite, verdict, spike, loss_zscore, threshold, factors, skipped, momentum_reset, spike_steps)


def _apply_inner(
    config: GuardConfig,
    inner: optax.GradientTransformation,
    decision: Decision,
    updates: Any,
    unscale: jax.Array | None,
    state: GuardState,
    params: Any,
    extra_args: dict[str, Any],
) -> Outcome:
    """Runs the inner update on the (unscaled, clipped) gradients and selects its state.

    A skipped step keeps the inner state it would have updated: the old one,
    re-initialised (schedule counters excepted) on a momentum-reset step. Both are
    selects on the state leaves, applied where the inner update reads or produces them
    (`_skip`), so that XLA writes the new state in place without first copying the old
    moments (see the docstring of `_skip`).
    """
    old_leaves, state_treedef = jax.tree.flatten(state.guard_inner_state)
    sel = _skip.Selects()
    if config.reset_after is not None:
        fresh_leaves = jax.tree.leaves(inner.init(params if params is not None else updates))
        reset_leaves = jax.tree.leaves(_reset_mask(state.guard_inner_state))

    def kept(k):
        if config.reset_after is None or not reset_leaves[k]:
            return old_leaves[k]
        return sel.where(decision.momentum_reset, fresh_leaves[k], old_leaves[k])

    if config.spike_action == "skip":
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
        lambda: inner.update(_clipping.scale_tree(grads, decision.factors), inner_state, params, **extra_args),
        inputs=(updates, state, params, extra_args),
    )
    _check_state_structure(state.guard_inner_state, traced.out_shapes[1])
    # The state keeps init's dtypes, as optax.MultiSteps keeps them: an optimizer can
    # promote a leaf (optax.adam's mu of bfloat16 parameters, given float32 gradients,
    # comes back float32), which would change the state's type (lax.scan and buffer
    # donation refuse that). Such a leaf is cast back; the check reads the cast value.
    casts = _dtype_casts(old_leaves, jax.tree.leaves(traced.out_shapes[1]))
    # The optimizer itself can make a NaN from a finite gradient (an infinite learning
    # rate, moments overflowing in fp16, a bias correction of 0): an accepted step whose
    # update or new inner state is not finite is skipped too.
    skipped = decision.skipped
    nonfinite_update = jnp.zeros((), jnp.bool_)
    # Both read a second evaluation of the inner update (`TracedUpdate.outputs`), kept
    # apart from the one whose state is selected (see `_lowering.apart`).
    sums = None
    if config.update_health:
        new_updates, new_state = traced.outputs()
        new_state = _cast_state(new_state, casts)
        # The state is read with the check off too: one formulation (without it,
        # XLA:CPU gave the reduction a materialised copy of every constant).
        sums = _output_sums(new_updates, new_state, inner_state, params)
        outputs_finite = sums.finite
    elif config.check_updates:
        new_updates, new_state = traced.outputs()
        new_state = _cast_state(new_state, casts)
        outputs_finite = _all_finite(new_updates, _state_pairs(new_state, inner_state))
    if config.check_updates:
        nonfinite_update = ~skipped & ~outputs_finite
        skipped = skipped | nonfinite_update
    if sums is not None:
        # Reductions that read the state and the parameters and that no write depends
        # on (the parameters' sums; every sum without the check): XLA would copy what
        # they read before writing it in place. Tie them to the skip.
        tie = sums.update_sums if not config.check_updates else None
        if sums.param_sums is not None:
            tie = sums.param_sums if tie is None else jnp.concatenate([tie, sums.param_sums])
        if tie is not None:
            skipped = _lowering.before_writes(skipped, tie)

    def select(k, new):
        if k not in casts:
            return sel.where(skipped, kept(k), new)
        if casts[k][1]:  # widened: select in the wider dtype (exact), updates read it
            return sel.where(skipped, jnp.asarray(kept(k), new.dtype), new)
        return new  # narrowed: selected below, in the kept dtype

    inner_updates, new_inner_state = traced.with_selected_state(select)
    if casts:
        leaves, treedef = jax.tree.flatten(new_inner_state)
        for k, (dtype, widened) in casts.items():
            new = leaves[k].astype(dtype)
            leaves[k] = new if widened else sel.where(skipped, kept(k), new)
        new_inner_state = treedef.unflatten(leaves)
    return Outcome(sel.zero_floats_where(skipped, inner_updates), new_inner_state, skipped, nonfinite_update, sums)


def _capped_norm(stats: _stats.GradStats, decision: Decision) -> jax.Array:
    """The norm an accepted step counts with in every running statistic (the guard's
    moments and an adaptive clip policy's history): a spike's (a loss spike's too)
    capped at the largest norm that is not a spike."""
    return jnp.where(decision.spike, jnp.minimum(stats.norm, decision.verdict.bound), stats.norm)


def _record(
    config: GuardConfig,
    state: GuardState,
    stats: _stats.GradStats,
    loss: jax.Array | None,
    decision: Decision,
    outcome: Outcome,
    scaled_norm: jax.Array | None = None,
) -> tuple[GuardMoments, GuardCounters, GuardReport, jax.Array]:
    """The state's groups after the step: moments, counters, the step's report and the
    reset ring (emptied by a restart; ``scaled_norm`` as in :func:`_decide`)."""
    norm, spike, skipped = stats.norm, decision.spike, outcome.skipped
    accepted = ~skipped
    moments = state.guard_moments

    # Running statistics: accepted steps only, a spike's norm capped.
    capped_norm = _capped_norm(stats, decision)
    norm_mean, norm_var, num_accepted = _clipping.running_moments_update(
        moments.guard_running_norm_mean,
        moments.guard_running_norm_var,
        moments.guard_num_accepted,
        capped_norm,
        config.stats_decay,
        accepted,
    )
    loss_mean, loss_var, num_losses = (
        moments.guard_running_loss_mean,
        moments.guard_running_loss_var,
        moments.guard_num_losses,
    )
    vanishing = jnp.zeros((), jnp.bool_)
    if config.vanishing_norm is not None:
        vanishing = decision.finite & (norm < config.vanishing_norm)
    if loss is not None:
        loss_mean, loss_var, num_losses = _clipping.running_moments_update(
            loss_mean, loss_var, num_losses, loss, config.stats_decay, accepted & ~spike
        )
        if config.vanishing_norm is not None:
            not_falling = (moments.guard_num_losses == 0) | (loss >= moments.guard_running_loss_mean)
            vanishing = vanishing & not_falling
    # The run of spikes that re-baselines counts loss spikes too (a lasting rise of the
    # loss level would otherwise be skipped forever), and a step skipped as non-finite
    # (its gradient, loss, value or update) does not break it. When it restarts the
    # window, the loss statistics start again with it: the loss z-score warms up again
    # on the new level.
    rule, window = config.spike_rule, moments.guard_norm_window
    new_window, restart = rule.fold_and_restart(window, norm, decision.verdict, accepted, spike)
    run_log_loss, run_log_norm = moments.guard_run_log_loss, moments.guard_run_log_norm
    lost = jnp.zeros((), jnp.bool_)
    if config.rebaseline_after is not None and loss is not None:
        # The run's loss against the level before it (the loss statistics skip the run's
        # spikes, so their mean is still that level at the restart; the window's baseline
        # norm likewise): a run is lost, and the rollback it raised stands through the
        # restart, when its loss is more than LOST_LOSS_RISE times that level and the
        # rise is not a rescaling of the loss (a loss weight scales the loss and the
        # gradient alike: the loss per unit of gradient norm moves less than
        # LOST_LOSS_PER_NORM_RISE), as when the model diverged (a learning rate too high).
        log_of = lambda x: jnp.log(jnp.maximum(x, 1e-30)).astype(jnp.float32)
        moved = restart | (new_window.window_streak > window.window_streak)
        steps = (window.window_streak + 1).astype(jnp.float32)
        run_log_loss, run_log_norm = (
            jnp.where(moved, mean + (log_of(x) - mean) / steps, jnp.where(new_window.window_streak == 0, 0.0, mean))
            for mean, x in ((run_log_loss, loss), (run_log_norm, norm))
        )
        before = log_of(moments.guard_running_loss_mean)
        lost = (
            restart
            & (moments.guard_num_losses > 0)
            & (moments.guard_running_loss_mean > 0)
            & (run_log_loss - before > math.log(LOST_LOSS_RISE))
            & (run_log_loss - run_log_norm - before + decision.verdict.median > math.log(LOST_LOSS_PER_NORM_RISE))
        )
        run_log_loss, run_log_norm = (jnp.where(restart, 0.0, x) for x in (run_log_loss, run_log_norm))
        loss_mean, loss_var, num_losses = (
            jnp.where(restart, jnp.zeros_like(x), x) for x in (loss_mean, loss_var, num_losses)
        )

    counters = state.guard_counters
    nonfinite = ~decision.finite
    clipped = accepted & (decision.factors[0] < 1.0)
    # Each run is broken by a good step only, not by a bad step of the other kind: NaN
    # steps alternating with spikes would otherwise never raise the rollback.
    bad_value = nonfinite | outcome.nonfinite_update
    consecutive_nonfinite = jnp.where(
        bad_value, counters.guard_consecutive_nonfinite + 1, jnp.where(spike, counters.guard_consecutive_nonfinite, 0)
    )
    previous_spikes = counters.guard_consecutive_spikes
    spike_steps = decision.spike_steps
    if config.rebaseline_after is not None:
        # A run of spikes that restarted the window was the new level: as after
        # gh.rebaseline, the next spike counts as the first, for the rollback and the
        # momentum reset alike. The restart step itself still reports the run's length
        # (the diagnosis dates the run's start by it). A window with no run going on
        # (streak 0) after a spike is that restart: any other spike adds to the streak,
        # and a step that ends the run is a good step, which ends this count too.
        previous_spikes = jnp.where(window.window_streak == 0, 0, previous_spikes)
        spike_steps = jnp.where(restart, jnp.full_like(spike_steps, _NO_STEP), spike_steps)
    consecutive_spikes = jnp.where(spike, previous_spikes + 1, jnp.where(bad_value, previous_spikes, 0))
    rollback = counters.guard_rollback
    if config.rollback_after_nonfinite is not None:
        rollback = rollback | (consecutive_nonfinite >= config.rollback_after_nonfinite)
    if config.rollback_after_spikes is not None:
        rollback = rollback | (consecutive_spikes >= config.rollback_after_spikes)
    # A rollback that the run of spikes re-baselining the window raised is cleared with
    # the restart (the guard trained through a lasting change: a loop that restored the
    # checkpoint would never get past it), unless the run's loss says it is lost (above).
    # One raised by non-finite steps, or by a run that ended without re-baselining (a
    # burst of bad batches: the recommendation was standing while no run was going on),
    # stands.
    held = moments.guard_rollback_held
    if config.rebaseline_after is not None:
        held = held | (counters.guard_rollback & (window.window_streak == 0))
        if config.rollback_after_nonfinite is not None:
            held = held | (consecutive_nonfinite >= config.rollback_after_nonfinite)
        rollback = rollback & (held | ~restart | lost)
    as_int = lambda flag: flag.astype(jnp.int32)
    new_counters = GuardCounters(
        guard_num_steps=counters.guard_num_steps + 1,
        guard_num_clipped=counters.guard_num_clipped + as_int(clipped),
        guard_num_nonfinite=counters.guard_num_nonfinite + as_int(nonfinite),
        guard_num_nonfinite_updates=counters.guard_num_nonfinite_updates + as_int(outcome.nonfinite_update),
        guard_num_skipped=counters.guard_num_skipped + as_int(skipped),
        guard_num_spikes=counters.guard_num_spikes + as_int(spike),
        guard_num_momentum_resets=counters.guard_num_momentum_resets + as_int(decision.momentum_reset),
        guard_num_rebaselines=counters.guard_num_rebaselines + as_int(restart),
        guard_consecutive_nonfinite=consecutive_nonfinite,
        guard_consecutive_spikes=consecutive_spikes,
        guard_rollback=rollback,
        # Only a non-finite gradient names a leaf: a non-finite loss or value with finite
        # gradients (whose first_nonfinite_leaf is -1) keeps the last bad leaf.
        guard_first_nonfinite_leaf=jnp.where(
            ~stats.finite, stats.first_nonfinite_leaf, counters.guard_first_nonfinite_leaf
        ),
    )

    new_moments = GuardMoments(
        guard_norm_window=new_window,
        guard_running_norm_mean=norm_mean,
        guard_running_norm_var=norm_var,
        guard_num_accepted=num_accepted,
        guard_running_loss_mean=loss_mean,
        guard_running_loss_var=loss_var,
        guard_num_losses=num_losses,
        guard_rollback_held=held,
        guard_run_log_loss=run_log_loss,
        guard_run_log_norm=run_log_norm,
    )

    # The norm times each factor in turn: their product alone can be a float32
    # subnormal (flushed to 0) when the clip factor was split in two square roots; a
    # norm saturated at float32's max is read from its scaled value.
    clipped_norm = _clipping.clipped_norm(norm, decision.factors, scaled_norm)
    health = _update_health(outcome, stats.leaf_norms)
    report = GuardReport(
        guard_norm=norm,
        guard_norm_clipped=jnp.where(skipped, 0.0, clipped_norm),
        guard_clip_threshold=decision.threshold,
        guard_clipped=clipped,
        guard_finite=decision.finite,
        guard_skipped=skipped,
        guard_spike=spike,
        guard_spike_score=decision.verdict.ratio,
        guard_zscore=decision.verdict.zscore,
        guard_norm_mean=moments.guard_running_norm_mean,
        guard_norm_std=jnp.sqrt(moments.guard_running_norm_var),
        guard_loss_zscore=decision.loss_zscore,
        guard_momentum_reset=decision.momentum_reset,
        guard_vanishing=vanishing,
        guard_update_norm=health[0],
        guard_param_norm=health[1],
        guard_update_param_ratio=health[2],
        guard_leaf_norms=stats.leaf_norms,
        guard_leaf_param_ratios=health[3],
    )
    return new_moments, new_counters, report, spike_steps


def _ratio(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den``, 0 where ``den`` is 0 (a parameter still at 0: undefined)."""
    ok = den > 0.0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _update_health(outcome: Outcome, grad_leaf_norms: _stats.LeafNorms) -> tuple[Any, Any, Any, Any]:
    """``(update/norm, param/norm, update/param_ratio, per-leaf ratios)`` of the step:
    the update as returned (0 when skipped), all None with update health off."""
    if outcome.sums is None:
        return None, None, None, None
    # A sum of squares that overflowed float32 saturates the norm at float32's max.
    norms = lambda sums: jnp.minimum(jnp.sqrt(sums), _stats._F32_MAX)
    applied = ~outcome.skipped
    update_leaf_norms = jnp.where(applied, norms(outcome.sums.update_sums), 0.0)
    update_norm = _stats._norm_of_norms(update_leaf_norms) if update_leaf_norms.size else jnp.zeros((), jnp.float32)
    # Applied and not finite: only with check_updates=False; reported, not hidden.
    update_norm = jnp.where(outcome.sums.finite | ~applied, update_norm, jnp.nan)
    param_norm = jnp.zeros((), jnp.float32)
    param_leaf_norms = jnp.zeros_like(update_leaf_norms)  # ratios 0: unknown
    if outcome.sums.param_sums is not None:  # `update` was called with params
        param_leaf_norms = norms(outcome.sums.param_sums)
        param_norm = _stats._norm_of_norms(param_leaf_norms) if param_leaf_norms.size else param_norm
    ratios = _ratio(update_leaf_norms, param_leaf_norms)
    if ratios.shape != grad_leaf_norms.values.shape:
        # An update not shaped like the gradients (`_output_sums` reads optax.lookahead's
        # fast half): no leaf of it is a gradient leaf's; 0, as unknown.
        ratios = jnp.zeros_like(grad_leaf_norms.values)
    leaf_ratios = _stats.LeafNorms(ratios, grad_leaf_norms.treedef)
    return update_norm, param_norm, _ratio(update_norm, param_norm), leaf_ratios


def _init_state(config: GuardConfig, inner: optax.GradientTransformation, params: Any) -> GuardState:
    ring_size = config.ring_size
    if ring_size is None:
        raise ValueError(
            "gh.guard: `reset_after` is a traced value, so the reset ring's size is not known: build the guard "
            "(its init) with a concrete int, e.g. outside jit."
        )
    # Every field gets a buffer of its own, so the state can be donated.
    f32 = lambda: jnp.zeros((), jnp.float32)
    i32 = lambda: jnp.zeros((), jnp.int32)
    false = lambda: jnp.zeros((), jnp.bool_)
    clip_state = config.policy.init()
    inner_state = inner.init(params)
    interfaces.refuse_wrappers_inside(inner_state, "gh.guard")
    report = GuardReport(
        guard_norm=f32(),
        guard_norm_clipped=f32(),
        guard_clip_threshold=config.policy.threshold(clip_state),
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
        guard_vanishing=false(),
        guard_update_norm=f32() if config.update_health else None,
        guard_param_norm=f32() if config.update_health else None,
        guard_update_param_ratio=f32() if config.update_health else None,
        guard_leaf_norms=_stats.LeafNorms.zeros(_gradient_like(params)),
        guard_leaf_param_ratios=_stats.LeafNorms.zeros(_gradient_like(params)) if config.update_health else None,
    )
    counters = GuardCounters(
        *(i32() for _ in range(len(GuardCounters._fields) - 2)),
        guard_rollback=false(),
        guard_first_nonfinite_leaf=jnp.full((), -1, jnp.int32),
    )
    moments = GuardMoments(config.spike_rule.init(), f32(), f32(), i32(), f32(), f32(), i32(), false(), f32(), f32())
    return GuardState(
        guard_report=report,
        guard_counters=counters,
        guard_moments=moments,
        guard_spike_steps=jnp.full((ring_size,), _NO_STEP, jnp.int32),
        guard_clip_state=clip_state,
        guard_inner_state=inner_state,
    )


def guard(
    inner: optax.GradientTransformation,
    *,
    clip: float | jax.Array | _clipping.ClipPolicy | optax.GradientTransformation | None = None,
    spike_action: str = "skip",
    spike_threshold: float | jax.Array | None = SPIKE_THRESHOLD,
    spike_zscore: float | jax.Array | None = SPIKE_ZSCORE,
    spike_window: int | jax.Array = SPIKE_WINDOW,
    rebaseline_after: int | jax.Array | None = REBASELINE_AFTER,
    loss_spike_zscore: float | jax.Array | None = None,
    warmup_steps: int | jax.Array = 20,
    stats_decay: float | jax.Array = 0.98,
    reset_after: int | jax.Array | None = 3,
    reset_window: int | jax.Array = 100,
    rollback_after_nonfinite: int | jax.Array | None = 10,
    rollback_after_spikes: int | jax.Array | None = 10,
    vanishing_norm: float | jax.Array | None = 1e-5,
    check_updates: bool = True,
    update_health: bool = True,
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
      drops that condition; both ``None`` disables norm spikes): a norm above
      ``max(spike_threshold, exp(spike_zscore * s))`` times the baseline, or, when a ``loss``
      is passed and ``loss_spike_zscore`` is set, the loss z-score exceeds it. The
      ``spike_action`` is ``'skip'`` (as non-finite), ``'clip'`` (clip to the largest
      norm that is not a spike) or ``'record'`` (count only). With ``'skip'``, a spike
      that *recurs* is clipped that way instead of skipped (with a clip mode as
      ``clip``, the mode alone bounds it): one that comes after an accepted step while
      another skipped spike lies within the last ``reset_window`` steps. The first spike
      of a while, and every spike of a run (a burst of bad batches), are skipped. Spikes
      that keep coming back among accepted steps are part of the data (on a run
      memorising a small dataset, the examples the model has not fit yet): skipping
      every batch that holds them keeps them unfit, so they spike again each time, and
      the skips cascade (``docs/detection.md``, "The guard in the loop on clean runs").
      The defaults were chosen from measured false-skip rates and detection rates
      (``docs/detection.md``).
    * **clip** by ``clip`` (None: no clipping; a number: fixed threshold; or a policy:
      :class:`FixedClip`, :class:`ZScoreClip`, :class:`PercentileClip`).
    * **momentum reset** when ``reset_after`` spikes fall within ``reset_window``
      steps (with ``'skip'``, skipped spikes: a recurring spike, clipped, does not
      count): every per-parameter statistic of the inner state (Adam's ``mu``, ``nu``
      and their bias-correction ``count``) is re-initialised, while learning-rate
      schedule counters (``ScaleByScheduleState``, ``inject_hyperparams``), random-number
      keys and noise states, and learned step sizes (``optax.contrib.prodigy``'s d) keep
      going (``docs/concepts.md``, "Momentum reset"). The reset comes before the step's
      update: with ``spike_action='skip'`` the reset step is skipped, so the next
      accepted gradient is the fresh optimizer's first;
      with ``'clip'`` or ``'record'`` the reset step's own (clipped) gradient is.
    * **rollback** recommendation (sticky) after ``rollback_after_nonfinite``
      non-finite steps or ``rollback_after_spikes`` spikes without a good step between
      them.
    * **vanishing**: the norm is finite and below ``vanishing_norm``, and, when a
      ``loss`` is passed, the loss is not below its running mean (not falling).

    The spike window and the running norm and loss statistics (bias-corrected EMAs
    with decay ``stats_decay``, reported as ``grad/norm_mean`` and ``grad/norm_std``)
    are updated only on accepted (finite, applied) steps, with an accepted spike's norm
    capped at the largest norm that is not a spike, so one NaN or spike does not
    poison them.

    The state keeps the structure, shapes and dtypes ``init`` gave it, so it can be
    carried by ``lax.scan`` and donated. An inner state leaf that the optimizer returns
    in another dtype (optax's moments of bfloat16 parameters given float32 gradients
    come back float32) is cast back to its ``init`` dtype, as ``optax.MultiSteps``
    does; the step's update reads the uncast value, and a value the cast makes
    non-finite (beyond float16's range) is an update check failure (``check_updates``).

    Args:
      inner: the optimizer to protect, any ``optax.GradientTransformation``.
      clip: clipping before the inner update: None (off), a number (fixed global-norm
        threshold), a global-norm policy (:class:`FixedClip`, :class:`ZScoreClip`,
        :class:`PercentileClip`), or a clip-mode transformation
        (:func:`clip_by_value`, :func:`clip_by_leaf_norm`,
        :func:`adaptive_grad_clip`), which is chained in front of ``inner``.
      spike_action: ``'skip'``, ``'clip'`` or ``'record'``.
      spike_threshold: spike-score threshold, ``norm / baseline`` (> 1), or None.
      spike_zscore: robust z-score threshold on the log-norm (> 0), or None.
      spike_window: accepted steps in the spike detector's window (>= 1).
      rebaseline_after: spikes (loss spikes included, or dips, a norm as far below the
        baseline) in a run after which the spike window restarts on the run's own norms
        (so the next step is judged against the new level) and the running loss
        statistics start again (>= 1), or None (never; a dip then enters the window
        capped). A non-finite step does not break the run (as for
        ``grad/consecutive_spikes``) nor join it, nor does an accepted step whose norm
        is between the bound and the half-way point to the baseline (in log): only one
        near the baseline does. A lasting change of the gradient's scale (parameters thrown
        elsewhere by a learning-rate spike) or of the loss level (a new data mixture) is
        then trained through instead of skipping every later step; shorter bursts of bad
        batches are skipped whole. ``rollback_after_spikes`` (10) raises the rollback
        recommendation long before, and the restart clears it again (the run was a
        lasting change), with ``grad/consecutive_spikes`` and the momentum-reset window,
        as :func:`rebaseline` does: the next spike counts as the first. With ``loss=``
        passed, the recommendation stands through the restart when the run looks lost:
        its loss (geometric mean over its spikes) is more than 2x the running loss
        mean before it, and its loss per unit of gradient norm more than 1.5x the level
        before it, as when the model diverged (a learning rate too high). A loss weight
        scales the loss and the gradient alike, so its rise is cleared; a loss with no
        positive level is never judged lost. Without ``loss=`` every such rollback is
        cleared: the guard cannot tell a diverged model from a planned change. Counted in
        ``grad/num_rebaselines``. For a change you make on purpose (unfreezing, new
        data, a loss weight), call :func:`rebaseline` instead.
      loss_spike_zscore: loss z-score threshold (> 0), or None (default: off). The
        z-score is that of bias-corrected EMAs of the loss, its spread floored at 1% of
        its mean. On the detection benchmark's clean runs that draw fresh batches 6
        raises 0.06 false alarms per 10,000 steps and catches 98% of one-step x3 loss
        jumps; 3 raises 45. On runs that memorise a small dataset (batch 8, epochs) a
        batch holding an unfit example looks like a spike: 6 raises 26 per 10,000 there
        and 8 raises 15 (``docs/detection.md``, "Loss spikes").
      warmup_steps: accepted steps before spike detection starts (>= 1).
      stats_decay: EMA decay of the running statistics, in (0, 1).
      reset_after: spikes within ``reset_window`` that trigger a momentum reset
        (>= 1), or None to never reset.
      reset_window: window length in steps (>= ``reset_after``), for the momentum reset
        and, with ``spike_action='skip'``, for telling a recurring spike (clipped).
      rollback_after_nonfinite: non-finite steps without a good step between them
        (spikes do not count as good) that raise the rollback recommendation (>= 1), or
        None.
      rollback_after_spikes: spikes without a good step between them (non-finite steps
        do not count as good) that raise it (>= 1), or None.
      vanishing_norm: norm under which a step counts as vanishing (> 0), or None.
      check_updates: also skip an accepted step whose inner update or new inner state
        is not finite (the optimizer made the NaN itself: an infinite learning rate,
        fp16 moments overflowing, a bias correction of zero), counted in
        ``grad/num_nonfinite_updates``. One more read of the inner state per step
        (``docs/benchmarks_guard.md``); False drops the check. What fails it is an
        element that *becomes* non-finite: a float element of the new inner state may
        stay Inf or NaN only where the state it was given held a non-finite value too (a
        sentinel from the optimizer's ``init``, such as ``reduce_on_plateau``'s best
        value, +inf until ``accumulation_size`` values are in). Under jit the check
        evaluates the inner update a second time; a ``jax.debug.callback`` or
        ``jax.debug.print`` in it still runs once per update, also inside ``jit``,
        ``lax.cond``, ``lax.while_loop``, ``lax.scan``, ``jax.checkpoint``,
        ``custom_jvp``/``custom_vjp`` or ``shard_map`` (as in ``optax.MultiSteps``), but
        one inside another higher-order primitive (a Pallas kernel), or a
        ``jax.experimental.io_callback`` whose result the update uses, runs twice.
      update_health: record what the optimizer did with the step: ``update/norm``
        (the update returned, 0 when skipped), ``param/norm`` (of the ``params`` passed
        to ``update``; 0 without them), ``update/param_ratio`` and, per leaf,
        ``update/leaf_param_ratio/<path>`` (0 where the parameter is 0); of the fast
        half for ``optax.lookahead``. Read in the
        reduction that checks the update (``check_updates``); an update whose sum of
        squares overflows float32 (elements of ~1e19) then counts as non-finite. Its
        cost is in ``docs/benchmarks.md``; False drops it.

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
      >>> round(float(m['update/norm']), 4), round(float(m['param/norm']), 4)  # adam: ~lr per element
      (0.1414, 1.7321)
    """
    inner = check.transformation("inner", inner)
    if isinstance(clip, optax.GradientTransformation):
        # A clip mode (gh.clip_by_value, gh.clip_by_leaf_norm, gh.adaptive_grad_clip):
        # applied to accepted steps only, between the guard's decision and `inner`.
        # It reads the gradients' tree as params (optax.lookahead's fast half), and so
        # does its fresh init on a momentum reset.
        inner = optax.chain(_on_gradient_like(clip), inner)
        clip, clip_mode = None, True
    else:
        clip_mode = False
    config = GuardConfig.build(
        clip=clip,
        clip_mode=clip_mode,
        spike_action=spike_action,
        spike_threshold=spike_threshold,
        spike_zscore=spike_zscore,
        spike_window=spike_window,
        rebaseline_after=rebaseline_after,
        loss_spike_zscore=loss_spike_zscore,
        warmup_steps=warmup_steps,
        stats_decay=stats_decay,
        reset_after=reset_after,
        reset_window=reset_window,
        rollback_after_nonfinite=rollback_after_nonfinite,
        rollback_after_spikes=rollback_after_spikes,
        vanishing_norm=vanishing_norm,
        check_updates=check_updates,
        update_health=update_health,
    )

    def init_fn(params):
        return _init_state(config, inner, params)

    def update_fn(updates, state, params=None, **extra_args):
        check.state_type("gh.guard", state, GuardState)
        cfg = config.sized_like(state)  # sizes of traced integer arguments, from the state
        # A state built for another configuration (flax.serialization restores one without
        # checking shapes) is refused on its static shapes: nothing enters the compiled step.
        window = jnp.shape(state.guard_moments.guard_norm_window.window_log_norms)
        if isinstance(config.spike_window, int) and window != (config.spike_window,):
            field = "guard_moments.guard_norm_window.window_log_norms"
            raise _clipping.other_config_error("gh.guard", field, "spike_window", window, config.spike_window)
        ring = jnp.shape(state.guard_spike_steps)
        if config.ring_size is not None and ring != (config.ring_size,):
            field, built = "guard_spike_steps", "1 or None" if ring == (1,) else ring
            raise _clipping.other_config_error("gh.guard", field, "reset_after", built, config.reset_after)
        if (state.guard_report.guard_update_norm is not None) != config.update_health:
            field, built = "guard_report.guard_update_norm", not config.update_health
            raise _clipping.other_config_error("gh.guard", field, "update_health", built, config.update_health)
        _clipping.check_same_structure(updates, state.guard_report.guard_leaf_norms.treedef, "gh.guard")
        # From gh.dynamic_loss_scale (`_interfaces.UnscalesOnRead`): `updates` are still
        # loss-scaled; the true gradients are `updates * unscale`. The statistics and the
        # inner update both apply the multiply where they read the leaves, so the
        # unscaled gradients are never materialised (two consumers would force it).
        extra_args = dict(extra_args)
        unscale = extra_args.pop(UNSCALE_ARG, None)
        # (with the norm's scaled value, which a clip reads for a norm beyond float32)
        stats, scaled = _stats._grad_stats_and_scaled_norms(updates, unscale)
        loss = _scalar_arg("loss", extra_args.get("loss"))
        value = _scalar_arg("value", extra_args.get("value"))
        _check_grads_vary_like_state(updates, state, params)
        _check_varies_like_grads("loss", loss, updates)
        _check_varies_like_grads("value", value, updates)

        decision = _decide(cfg, state, stats, loss, value, scaled.norm)
        outcome = _apply_inner(cfg, inner, decision, updates, unscale, state, params, extra_args)
        moments, counters, report, spike_steps = _record(cfg, state, stats, loss, decision, outcome, scaled.norm)
        new_state = GuardState(
            guard_report=report,
            guard_counters=counters,
            guard_moments=moments,
            guard_spike_steps=spike_steps,
            guard_clip_state=cfg.policy.update(state.guard_clip_state, _capped_norm(stats, decision), ~outcome.skipped),
            guard_inner_state=outcome.inner_state,
        )
        return outcome.updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, _vma.keeps_state_type(update_fn))


def _is_guard_state(x: Any) -> bool:
    """A guard's state: the NamedTuple, or the dict a pure-dict restore (or
    ``nnx.state``) makes of it."""
    if isinstance(x, GuardState):
        return True
    return isinstance(x, dict) and {"guard_counters", "guard_moments", "guard_spike_steps"} <= set(x)


def _rebaselined(state: Any) -> Any:
    """``state`` (a guard state, NamedTuple or dict) after :func:`rebaseline`: each array
    replaced by ``jax.tree.map`` so that its container (an nnx variable) is kept."""
    get = lambda x, name: x[name] if isinstance(x, dict) else getattr(x, name)
    put = lambda x, **kw: {**x, **kw} if isinstance(x, dict) else x._replace(**kw)
    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
    moments, counters = get(state, "guard_moments"), get(state, "guard_counters")
    moments = put(
        moments,
        **{
            name: zeros(get(moments, name))
            for name in (
                "guard_norm_window",
                "guard_running_loss_mean",
                "guard_running_loss_var",
                "guard_num_losses",
                "guard_rollback_held",
                "guard_run_log_loss",
                "guard_run_log_norm",
            )
        },
    )
    counters = put(
        counters,
        guard_num_rebaselines=jax.tree.map(lambda n: n + 1, get(counters, "guard_num_rebaselines")),
        **{name: zeros(get(counters, name)) for name in ("guard_consecutive_nonfinite", "guard_consecutive_spikes")},
        guard_rollback=zeros(get(counters, "guard_rollback")),
    )
    ring = jax.tree.map(lambda x: jnp.full_like(x, _NO_STEP), get(state, "guard_spike_steps"))
    inner = jax.tree.map(
        lambda x: _rebaselined(x) if _is_guard_state(x) else x, get(state, "guard_inner_state"), is_leaf=_is_guard_state
    )  # a guard nested in this one's inner optimizer
    return put(state, guard_moments=moments, guard_counters=counters, guard_spike_steps=ring, guard_inner_state=inner)


def rebaseline(opt_state: Any) -> Any:
    """Announces a planned change of the gradient's scale to every :func:`guard` in
    ``opt_state``: returns a new state whose guards judge the next steps afresh.

    Call it at the step where you unfreeze layers, switch to a new dataset or data
    mixture, change a loss weight or switch to summed gradient accumulation: anything
    that moves the gradient norm (or the loss) to a new level on purpose. Without it a
    guard with ``spike_action='skip'`` sees the new level as a run of spikes, skips up
    to ``rebaseline_after`` (50) steps before it re-baselines on its own, resets the
    moments on the way and may raise the rollback recommendation.

    For each guard it empties the spike window, restarts the running loss statistics,
    zeroes the runs of spikes and non-finite steps (``grad/consecutive_spikes``,
    ``grad/consecutive_nonfinite``, the momentum-reset window and the re-baselining
    run), clears the rollback recommendation and adds one to ``grad/num_rebaselines``.
    The window then warms up again on the next ``warmup_steps`` accepted steps: as at
    the start of a run, spikes are not judged during those steps (NaN/Inf still are,
    and a clip policy still clips). The inner optimizer's state, the other counters and
    an adaptive clip policy's history are kept.

    Pure (the state is not changed in place), jittable, and the result has the same
    structure, shapes and dtypes as ``opt_state``, so it can be saved and restored like
    it. Guards are found anywhere in the tree, as :func:`metrics` finds them: in
    ``optax.chain``, ``optax.MultiSteps``, ``optax.inject_hyperparams``, a guard inside
    a guard, a restored pure dict. For ``flax.nnx``: ``optimizer.opt_state =
    gh.rebaseline(optimizer.opt_state)``; a step built with ``nnx.cached_partial`` holds
    its own reference to the optimizer's state, so update the optimizer in place there
    (``nnx.update(optimizer, ...)`` of a clone carrying the new state, as the demo does).

    Args:
      opt_state: an optimizer state holding at least one :func:`guard` state.

    Returns:
      The state with every guard re-baselined.

    Raises:
      ValueError: ``opt_state`` holds no guard state.
      TypeError: an ``nnx.Optimizer`` was passed (pass its ``opt_state``).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import optax_gradhealth as gh
      >>> tx = optax.chain(optax.clip(1.0), gh.guard(optax.adam(1e-3)))
      >>> params = {'w': jnp.zeros(3)}
      >>> state = tx.init(params)
      >>> _, state = tx.update({'w': jnp.ones(3)}, state, params)
      >>> # ...later: the body is unfrozen, the norms will be several times larger
      >>> state = jax.jit(gh.rebaseline)(state)
      >>> m = gh.metrics(state)
      >>> int(m['grad/num_rebaselines']), bool(m['grad/rollback_recommended']), int(m['grad/num_steps'])
      (1, False, 1)
    """
    nnx = sys.modules.get("flax.nnx")  # an nnx.Optimizer exists only where flax.nnx was imported
    if nnx is not None and isinstance(opt_state, nnx.Optimizer):
        raise TypeError(
            "gh.rebaseline: `opt_state` is an nnx.Optimizer; pass its state and assign the result back: "
            "optimizer.opt_state = gh.rebaseline(optimizer.opt_state)."
        )
    found = []

    def visit(x: Any) -> Any:
        if _is_guard_state(x):
            found.append(True)
            return _rebaselined(x)
        return x

    out = jax.tree.map(visit, opt_state, is_leaf=_is_guard_state)
    if not found:
        raise ValueError(
            f"gh.rebaseline: `opt_state` holds no gh.guard state (got a {type(opt_state).__name__}): pass the "
            "optimizer state that contains the guard, e.g. what tx.init returned, or nnx.Optimizer.opt_state."
        )
    return out
