"""Detectors: pure rules over per-step scalars (norms, scores, cosines) that raise alarms.

Every function here takes arrays of scalars (or small ``[K]`` / ``[K, K]`` vectors) and
returns arrays; the state of a detector is a small NamedTuple of fixed structure. Nothing
here reads a gradient. The guard (:func:`optax_gradhealth.guard`), the cross-device audit
(:func:`optax_gradhealth.cross_device`), the host-side diagnosis and the detection
benchmark (``benchmarks/bench_detection.py``) all call these same functions, so a
threshold measured in the benchmark is the threshold the jitted step applies.

Three detectors, each judged by its false-alarm rate on clean runs and its delay on
faults (``docs/detection.md``):

* **spike** (single device, every step, :class:`SpikeRule`): the ratio ``norm /
  baseline`` and the robust z-score of the log-norm against a window of the last
  ``window`` accepted log-norms (:class:`NormWindow`; the baseline is the median of the
  latest few, the spread that of the step-to-step changes, see
  :func:`norm_window_stats`). A spike needs both.
* **outlier device** (cross-device audits): per-device robust scores (log-norm and
  log-distance ``log(1 - cos)`` of the leave-one-out cosine, against the median and MAD
  across devices), accumulated over
  audits by a one-sided CUSUM (:func:`cusum`). A strong score names the device at once;
  a moderate but persistent one after a few audits.
* **near-duplicate pair** (cross-device audits): the robust z-score of each pair's
  closeness (``-log(1 - cos)`` of its sketched cosine) against the other pairs',
  accumulated by the same CUSUM.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "MAD_TO_STD",
    "NO_STEP",
    "AuditDetectorState",
    "AuditVerdict",
    "DeviceScores",
    "NormWindow",
    "SpikeAction",
    "SpikeRule",
    "SpikeVerdict",
    "audit_init",
    "audit_update",
    "cusum",
    "device_scores",
    "direction_distance",
    "leave_one_out_cosine",
    "masked_median",
    "norm_window_init",
    "norm_window_push",
    "norm_window_stats",
    "pair_scores",
    "replay_audits",
    "replay_spikes",
    "spike_action",
    "spike_bound",
    "spike_scores",
]

# 1.4826 * MAD estimates the standard deviation of a normal sample.
MAD_TO_STD = 1.4826


# ----------------------------------------------------------------------------- medians


def masked_median(values: jax.Array, mask: jax.Array, axis: int = -1) -> jax.Array:
    """Median of ``values`` over the entries where ``mask`` is True, along ``axis``.

    Sorts once (masked-out entries as ``+inf``) and averages the two middle entries of
    the ``n`` valid ones; 0 where no entry is valid. ``n`` may differ along the other
    axes and may be a traced value.
    """
    values = jnp.moveaxis(jnp.asarray(values, jnp.float32), axis, -1)
    mask = jnp.moveaxis(jnp.broadcast_to(mask, values.shape), axis, -1)
    ordered = jnp.sort(jnp.where(mask, values, jnp.inf), axis=-1)
    n = jnp.sum(mask, axis=-1, dtype=jnp.int32)
    low = jnp.take_along_axis(ordered, jnp.maximum((n - 1) // 2, 0)[..., None], axis=-1)[..., 0]
    high = jnp.take_along_axis(ordered, jnp.maximum(n // 2, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(n > 0, 0.5 * (low + jnp.where(n > 1, high, low)), 0.0)


def median_and_spread(values: jax.Array, mask: jax.Array, axis: int = -1) -> tuple[jax.Array, jax.Array]:
    """Median and ``MAD_TO_STD * MAD`` (a robust standard deviation) over the masked entries."""
    centre = masked_median(values, mask, axis)
    deviation = jnp.abs(jnp.asarray(values, jnp.float32) - jnp.expand_dims(centre, axis))
    return centre, MAD_TO_STD * masked_median(deviation, mask, axis)


# ----------------------------------------------------------------------------- CUSUM


def cusum(evidence: jax.Array, score: jax.Array, drift: float, cap: float) -> jax.Array:
    """One step of a one-sided CUSUM: ``min(max(0, evidence + score - drift), cap)``.

    ``score`` is a per-step score that is small (below ``drift`` on average) when all is
    well and larger under a fault; the evidence then grows by ``score - drift`` per
    step and an alarm is raised when it passes a threshold ``h``. A fault whose score is
    ``s > drift`` is found after about ``h / (s - drift)`` steps, while for independent
    standard-normal scores the mean run length between false alarms grows like
    ``exp(2 drift (h + 1.166)) / (2 drift^2)`` (Siegmund's approximation). The cap bounds
    how long the evidence outlasts a fault: once it is over, each clean step takes
    ``drift - score`` off, so the evidence falls back below ``h`` after
    ``(cap - h) / (drift - s)`` clean steps of mean score ``s < drift``, never fewer
    than ``(cap - h) / drift`` (clean scores of about 1 against a drift of 2 take twice
    that). A rule that must not outlast the fault names on the evidence only while the
    step adds to it (``score > drift``, as :func:`audit_update`). A NaN score adds
    nothing; ``+inf`` saturates at the cap.
    """
    score = jnp.where(jnp.isnan(score), 0.0, score)
    return jnp.clip(evidence + score - drift, 0.0, cap).astype(jnp.float32)


# ----------------------------------------------------------------------------- spikes


class NormWindow(NamedTuple):
    """The last ``W`` accepted log-norms, the spike detector's state.

    The field names carry a ``window_`` prefix so that ``optax.tree.get(state, name)``
    finds an optimizer's own ``count`` without a clash when the guard wraps it.

    Attributes:
      window_log_norms: float32 ``[W]`` ring of natural logs of accepted norms.
      window_count: int32, accepted norms pushed so far (the ring holds the last
        ``min(window_count, W)`` of them).
      window_streak: int32, spikes and dips in a run (see ``SpikeRule.rebaseline_after``
        and :meth:`SpikeRule.streak`).
      window_run_log_norms: float32 ``[W]`` ring of the raw log-norms of the run's steps
        (its spikes and dips uncapped, and the accepted steps between them), laid out as
        ``window_log_norms`` is, so that a restarted window is this ring (``[0]`` without
        re-baselining). None in a window built only to be judged against.
      window_run_count: int32, log-norms written to ``window_run_log_norms`` since the
        run began (the ring holds the last ``min(window_run_count, W)`` of them).
    """

    window_log_norms: jax.Array
    window_count: jax.Array
    window_streak: jax.Array
    window_run_log_norms: jax.Array | None = None
    window_run_count: jax.Array | None = None


def norm_window_init(size: int, run_size: int = 0) -> NormWindow:
    """An empty window of ``size`` log-norms (and a run ring of ``run_size``)."""
    zero = lambda: jnp.zeros((), jnp.int32)
    return NormWindow(jnp.zeros((size,), jnp.float32), zero(), zero(), jnp.zeros((run_size,), jnp.float32), zero())


def norm_window_push(window: NormWindow, log_norm: jax.Array, accepted: jax.Array) -> NormWindow:
    """Writes ``log_norm`` into the ring where ``accepted`` (and finite)."""
    accepted = jnp.asarray(accepted) & jnp.isfinite(log_norm)
    size = window.window_log_norms.shape[0]
    hit = jnp.arange(size, dtype=jnp.int32) == window.window_count % size
    written = jnp.where(hit & accepted, jnp.asarray(log_norm, jnp.float32), window.window_log_norms)
    return window._replace(window_log_norms=written, window_count=window.window_count + accepted.astype(jnp.int32))


def norm_window_stats(window: NormWindow, recent: int | None = None) -> tuple[jax.Array, jax.Array]:
    """``(baseline, spread)`` of the log-norms in the window (0, 0 when empty).

    * ``baseline``: the median of the ``recent`` latest log-norms (all of them when None),
      so that it follows the trend of a run (norms fall fast early in training).
    * ``spread``: a robust standard deviation of the step-to-step noise, from the
      differences of consecutive accepted log-norms over the whole window:
      ``1.4826 MAD(differences) / sqrt(2)``. Differences are blind to a slow trend, which
      would inflate the spread of the levels themselves (and hide spikes) while the norms
      fall. For independent noise it estimates the same standard deviation as the MAD of
      the levels.
    """
    size = window.window_log_norms.shape[0]
    valid = jnp.minimum(window.window_count, size)
    age = (window.window_count - 1 - jnp.arange(size, dtype=jnp.int32)) % size  # 0 = latest
    filled = age < valid
    in_baseline = filled if recent is None else filled & (age < recent)
    baseline = masked_median(window.window_log_norms, in_baseline)
    # Slot j minus the slot written before it (a gather, not roll's two slices).
    previous = jnp.take(window.window_log_norms, (jnp.arange(size, dtype=jnp.int32) - 1) % size)
    differences = window.window_log_norms - previous
    _, spread = median_and_spread(differences, age + 1 < valid)
    return baseline, spread / math.sqrt(2.0)


def spike_scores(
    norm: jax.Array, median: jax.Array, spread: jax.Array, spread_floor: float
) -> tuple[jax.Array, jax.Array]:
    """``(ratio, zscore)`` of a norm against a window's ``(median, spread)`` of log-norms.

    ``ratio = norm / exp(median)`` (the norm over the window's median norm) and
    ``zscore = (log(norm) - median) / max(spread, spread_floor)``. The floor keeps a
    window of nearly equal norms from turning a 5% wobble into a large z-score.
    """
    log_norm = jnp.log(jnp.maximum(norm, 1e-37))
    deviation = log_norm - median
    ratio = jnp.exp(jnp.minimum(deviation, 80.0))
    return ratio, deviation / jnp.maximum(spread, spread_floor)


def spike_bound(
    median: jax.Array, spread: jax.Array, spread_floor: float, ratio: float | None, zscore: float | None
) -> jax.Array:
    """The largest norm that is not a spike: a spike needs ``ratio > ratio`` AND
    ``zscore > zscore``, so the bound is the larger of the two conditions' bounds
    (``inf`` when both are None)."""
    if ratio is None and zscore is None:
        return jnp.full((), jnp.inf, jnp.float32)
    log_bound = jnp.full((), -jnp.inf, jnp.float32)
    if ratio is not None:
        log_ratio = math.log(ratio) if isinstance(ratio, (int, float)) else jnp.log(jnp.asarray(ratio, jnp.float32))
        log_bound = jnp.maximum(log_bound, median + log_ratio)
    if zscore is not None:
        # float32 whatever the threshold's dtype (a float64 array under x64 would make
        # the bound, and the state it is folded into, float64).
        # (np.float64 is a Python float too: float() makes it a weak Python number.)
        z = float(zscore) if isinstance(zscore, (int, float)) else jnp.asarray(zscore, jnp.float32)
        log_bound = jnp.maximum(log_bound, median + z * jnp.maximum(spread, spread_floor))
    return jnp.exp(jnp.minimum(log_bound, 88.0))


class SpikeVerdict(NamedTuple):
    """What the spike rule concluded about one step (see :meth:`SpikeRule.judge`).

    Attributes:
      ratio: ``norm / baseline`` (0 during warm-up or on a non-finite step).
      zscore: robust z-score of the log-norm (0 likewise).
      spike: the step is a spike.
      bound: the largest norm that would not have been a spike (what a spike is
        clipped to, and what an accepted spike folds into the window).
      median: the window's baseline log-norm the step was judged by.
      spread: the window's robust spread (before the floor).
    """

    ratio: jax.Array
    zscore: jax.Array
    spike: jax.Array
    bound: jax.Array
    median: jax.Array
    spread: jax.Array


@dataclasses.dataclass(frozen=True)
class SpikeRule:
    """The guard's spike rule: ``ratio > threshold`` AND ``zscore > zscore`` after
    ``warmup`` accepted steps, against a window of the last ``window`` accepted
    log-norms (:func:`norm_window_stats`: the baseline is the median of the latest
    ``baseline`` of them, the spread that of their step-to-step differences). A ``None``
    threshold drops that condition; both None: no spikes.

    After a run of ``rebaseline_after`` spikes or dips (None: never; see :meth:`streak`)
    the window restarts on the run's own norms (its last ``window`` at most, spikes
    uncapped) and judges the next step against that new level: a
    lasting change of the gradient's scale (parameters thrown elsewhere by a
    learning-rate spike, a new phase of training) is then accepted instead of every
    later step being a spike, and a spike right after the restart is still caught. A
    burst of bad batches shorter than that is skipped whole. An accepted step ends the
    run only if it lies near the baseline (within half the log-distance from the
    baseline to the spike bound, either side): under a lasting change just past the
    threshold, the new level's low tail does not keep restarting the count. A dip (a
    norm as far below the baseline as a spike is above it) is left out of the window,
    or, with ``rebaseline_after=None``, enters it capped at that distance."""

    threshold: float | None
    zscore: float | None
    window: int
    warmup: int
    spread_floor: float
    baseline: int = 16
    rebaseline_after: int | None = None

    def init(self) -> NormWindow:
        return norm_window_init(self.window, self.run_size)

    @property
    def run_size(self) -> int:
        """Length of the window's ring of the run's log-norms: ``window`` (a restart
        seeds at most that many), 0 without re-baselining."""
        return 0 if self.rebaseline_after is None else self.window

    def exceeds(self, norm: jax.Array, median: jax.Array, spread: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(ratio, zscore, over)``: the scores of ``norm`` (any shape) against a window's
        ``(median, spread)``, and whether they pass the thresholds (warm-up aside)."""
        ratio, z = spike_scores(norm, median, spread, self.spread_floor)
        over = jnp.full(jnp.shape(ratio), self.threshold is not None or self.zscore is not None)
        if self.threshold is not None:
            over = over & (ratio > self.threshold)
        if self.zscore is not None:
            over = over & (z > self.zscore)
        return ratio, z, over

    def warm(self, window: NormWindow) -> jax.Array:
        """The window has seen ``warmup`` accepted norms, and at least one whatever
        ``warmup`` (0 is allowed in gh.Thresholds, and a traced one is unchecked): an
        empty window's median is log 1, and every step of a run at norm 10 would be a
        spike."""
        return window.window_count >= jnp.maximum(self.warmup, 1)

    def judge(self, window: NormWindow, norm: jax.Array, finite: jax.Array) -> SpikeVerdict:
        median, spread = norm_window_stats(window, self.baseline)
        return self.judge_against(window, norm, finite, median, spread)

    def judge_against(
        self, window: NormWindow, norm: jax.Array, finite: jax.Array, median: jax.Array, spread: jax.Array
    ) -> SpikeVerdict:
        """:meth:`judge` given the window's ``(median, spread)`` (only its count is read):
        the host replay computes the statistics of many windows at once."""
        active = self.warm(window) & finite
        ratio, z, over = self.exceeds(norm, median, spread)
        bound = spike_bound(median, spread, self.spread_floor, self.threshold, self.zscore)
        return SpikeVerdict(
            jnp.where(active, ratio, 0.0), jnp.where(active, z, 0.0), active & over, bound, median, spread
        )

    @staticmethod
    def capped(norm: jax.Array, verdict: SpikeVerdict) -> jax.Array:
        """The norm a step counts with in running statistics: a spike's capped at the bound."""
        return jnp.where(verdict.spike, jnp.minimum(norm, verdict.bound), norm)

    def dip(self, window: NormWindow, norm: jax.Array, verdict: SpikeVerdict) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(log_norm, floor, dip)``: the log of the norm a step folds with (a spike's
        capped), the mirror bound ``log(median**2 / bound)``, and whether the step is a
        dip (below that bound, once the window is warm; a zero norm is none)."""
        log_norm = jnp.log(jnp.maximum(self.capped(norm, verdict), 1e-37))
        floor = 2.0 * verdict.median - jnp.log(verdict.bound)
        return log_norm, floor, self.warm(window) & (norm > 0) & (log_norm < floor)

    @staticmethod
    def near(norm: jax.Array, verdict: SpikeVerdict) -> jax.Array:
        """The norm lies near the window's baseline: its log within half the
        log-distance from the median to the spike bound, either side (a step that ends a
        run of spikes and dips, see :meth:`streak`)."""
        half = 0.5 * (jnp.log(verdict.bound) - verdict.median)
        return jnp.abs(jnp.log(jnp.maximum(norm, 1e-37)) - verdict.median) < half

    def streak(
        self, window: NormWindow, norm: jax.Array, verdict: SpikeVerdict, moved: jax.Array, accepted: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """``(streak, ends)``: the run of spikes and dips after this step, before a
        restart, and whether this step ended it. A step that ``moved`` (a spike, the
        guard's loss spikes included, or a :meth:`dip`) adds one. An accepted step that
        did not ends the run when it lies near the baseline: its log-norm within half
        the log-distance from the window's median to the spike bound, either side
        (below ``sqrt(bound / baseline)`` times the baseline and above its mirror), or
        while the window warms up; one between that and the bound leaves the run as it
        is, as does a step that was not accepted (a non-finite gradient, loss, value or
        update), as ``grad/consecutive_spikes`` does for the latter. So a lasting change
        of the scale just past the threshold, whose low tail falls below the bound now
        and then, still restarts the window after about ``rebaseline_after`` steps."""
        ends = accepted & ~moved & (self.near(norm, verdict) | ~self.warm(window))
        streak = jnp.where(moved, window.window_streak + 1, jnp.where(ends, 0, window.window_streak))
        return streak.astype(jnp.int32), ends

    def fold(
        self,
        window: NormWindow,
        norm: jax.Array,
        verdict: SpikeVerdict,
        accepted: jax.Array,
        spike: jax.Array | None = None,
    ) -> NormWindow:
        """Pushes an accepted step's norm (a spike's capped at ``verdict.bound``), counts
        the run of spikes and dips (:meth:`streak`; ``spike`` as there) and restarts the
        window after ``rebaseline_after`` of them (see :meth:`fold_and_restart`)."""
        return self.fold_and_restart(window, norm, verdict, accepted, spike)[0]

    def fold_and_restart(
        self,
        window: NormWindow,
        norm: jax.Array,
        verdict: SpikeVerdict,
        accepted: jax.Array,
        spike: jax.Array | None = None,
    ) -> tuple[NormWindow, jax.Array]:
        """:meth:`fold`, and whether this step restarted the window.

        The restarted window holds the run's last ``min(window_run_count, window)`` raw
        log-norms, oldest first, with the run's count: warm at once when the run was at least
        ``warmup`` steps long, so the next step is judged against the new level."""
        # A dip, the mirror of a spike (below ``median**2 / bound``), is left out of the
        # window: a few nearly empty batches (a norm of 1e-6 among norms of 1) would pull
        # the median down, and the return to the usual scale would be a run of spikes. A
        # dip counts in the streak as a spike does, so a lasting fall of the scale
        # re-baselines after ``rebaseline_after`` steps. Without re-baselining (None) a
        # dip enters capped at that mirror bound instead, so the median still follows a
        # lasting fall, a bound at a time. A zero gradient (an empty or fully masked
        # batch) is not a scale either: log(0) would pull the baseline down by ~85.
        # A step that was not accepted (a non-finite loss, value or update with a finite
        # gradient) is no dip either: it leaves the run as it was (see :meth:`streak`).
        log_norm, floor, dip = self.dip(window, norm, verdict)
        dip = dip & accepted
        if self.rebaseline_after is None:
            log_norm = jnp.where(dip, floor, log_norm)
            pushed = norm_window_push(window, log_norm, accepted & (norm > 0))
        else:
            pushed = norm_window_push(window, log_norm, accepted & (norm > 0) & ~dip)
        moved = (verdict.spike if spike is None else spike) | dip
        streak, ends = self.streak(window, norm, verdict, moved, accepted)
        pushed = pushed._replace(window_streak=streak)
        if self.rebaseline_after is None:
            return pushed, jnp.zeros((), jnp.bool_)
        restart = streak >= self.rebaseline_after
        # The run's ring: the raw log-norm (a spike's uncapped: it is the new level) of
        # every finite, non-zero step of the run (moved, or accepted without ending it),
        # written where the window would write its k-th push; emptied when the run ends.
        # The restarted window is that ring, its count the run's: it holds the run's last
        # min(run_count, W) log-norms, oldest first.
        raw = jnp.log(jnp.maximum(norm, 1e-37)).astype(jnp.float32)
        kept = (moved | accepted) & ~ends & jnp.isfinite(norm) & (norm > 0)
        as_run = window._replace(window_log_norms=window.window_run_log_norms, window_count=window.window_run_count)
        run = norm_window_push(as_run, raw, kept)
        run_count = jnp.where(ends, 0, run.window_count)
        pushed = pushed._replace(window_run_log_norms=run.window_log_norms, window_run_count=run_count)
        zero = jnp.zeros((), jnp.int32)
        fresh = NormWindow(run.window_log_norms, run_count, zero, run.window_log_norms, zero)
        return jax.tree.map(lambda a, b: jnp.where(restart, a, b), fresh, pushed), restart


NO_STEP = -(2**30)  # an empty slot of the spike ring: never within any window


class SpikeAction(NamedTuple):
    """What the guard does with a step's spike under ``spike_action='skip'`` (see
    :func:`spike_action`).

    Attributes:
      recurring: the spike recurs among accepted steps: it is clipped to the spike
        bound and accepted, not skipped.
      reset: the spike resets the inner optimizer's moments.
      ring: the spike ring after the step: the step indices of the latest skipped spikes
        (:data:`NO_STEP` in empty slots).
    """

    recurring: jax.Array
    reset: jax.Array
    ring: jax.Array


def spike_action(
    ring: jax.Array,
    step: jax.Array,
    spike: jax.Array,
    after_spike: jax.Array,
    window: int | jax.Array,
    reset_after: int | jax.Array | None,
    recur: bool = True,
) -> SpikeAction:
    """Skip, clip or reset: the guard's action on a spike, from the ring of the step
    indices of the latest skipped spikes (``[n]`` int32, :data:`NO_STEP` where empty).

    * A spike that comes after an accepted step (``after_spike`` False: the step before
      it was no spike) while another skipped spike lies within the last ``window``
      steps **recurs**: it is clipped, not skipped (``recur``; the guard's
      ``spike_action='skip'``). Spikes that keep coming back among accepted steps are
      part of the data (examples the model has not fit yet, on a run that memorises a
      small dataset): skipping every batch that holds them keeps them unlearned, so they
      spike again each time they come back. The first spike of a while, and every spike
      of a run of them (a burst of bad batches, a lasting change), is skipped.
    * Every skipped spike is written into the ring, over its oldest slot. When
      ``reset_after`` of them (``None``: never) lie within the last ``window`` steps, this
      one included, the spike **resets** the moments (spikes that persist) and the ring
      empties.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_gradhealth import _detectors as detect
      >>> ring = jnp.full((3,), detect.NO_STEP, jnp.int32)
      >>> first = detect.spike_action(ring, jnp.int32(10), jnp.bool_(True), jnp.bool_(False), 100, 3)
      >>> bool(first.recurring), bool(first.reset)
      (False, False)
      >>> again = detect.spike_action(first.ring, jnp.int32(40), jnp.bool_(True), jnp.bool_(False), 100, 3)
      >>> bool(again.recurring), sorted(int(s) for s in again.ring if s != detect.NO_STEP)
      (True, [10])
    """
    filled = ring != NO_STEP
    recurring = jnp.zeros((), jnp.bool_)
    if recur:
        recurring = spike & ~after_spike & jnp.any(filled & (step - ring < window))
    written = spike & ~recurring
    # Over the oldest slot (an empty one first: NO_STEP is below every step), as a select
    # against arange like _clipping.ring_write (not imported: this module is a leaf).
    oldest = jnp.arange(ring.shape[0]) == jnp.argmin(ring)
    ring = jnp.where(written & oldest, step, ring).astype(jnp.int32)
    reset = jnp.zeros((), jnp.bool_)
    if reset_after is not None:
        within = jnp.sum((ring != NO_STEP) & (step - ring < window), dtype=jnp.int32)
        reset = written & (within >= reset_after)
        ring = jnp.where(reset, jnp.full_like(ring, NO_STEP), ring)
    return SpikeAction(recurring, reset, ring)


@functools.partial(jax.jit, static_argnames=("rule", "accept_spikes", "recur_window", "reset_after"))
def replay_spikes(
    rule: SpikeRule,
    norms: jax.Array,
    accept_spikes: bool = False,
    recur_window: int | None = None,
    reset_after: int | None = None,
) -> dict[str, jax.Array]:
    """Runs the spike rule over a recorded norm stream, as the guard would.

    A non-finite norm is never accepted; a spike is accepted (clipped or recorded, its
    norm capped) when ``accept_spikes``, else skipped. With ``recur_window`` (the guard's
    ``reset_window``) and ``reset_after``, as the guard's ``spike_action='skip'``: a spike
    that recurs (:func:`spike_action`) is accepted, capped, and the others are skipped.
    Returns per-step arrays ``ratio``, ``zscore``, ``spike``, ``bound`` and the window's
    ``median`` and ``spread`` before the step (float32 ``[T]``, ``spike`` bool), and with
    ``recur_window`` the bool ``recurring`` and ``reset``.
    """
    recur = recur_window is not None and not accept_spikes

    def step(carry, x):
        window, ring, after_spike = carry
        t, norm = x
        finite = jnp.isfinite(norm)
        verdict = rule.judge(window, norm, finite)
        out = verdict._asdict()
        if accept_spikes:
            accepted = finite
        elif not recur:
            accepted = finite & ~verdict.spike
        else:
            action = spike_action(ring, t, verdict.spike, after_spike, recur_window, reset_after)
            accepted = finite & (~verdict.spike | action.recurring)
            ring = action.ring
            out.update(recurring=action.recurring, reset=action.reset)
        window, restart = rule.fold_and_restart(window, norm, verdict, accepted)
        ring = jnp.where(restart, jnp.full_like(ring, NO_STEP), ring)
        # As grad/consecutive_spikes > 0: a non-finite step leaves it as it was.
        after_spike = verdict.spike | (after_spike & ~finite)
        return (window, ring, after_spike), out

    norms = jnp.asarray(norms, jnp.float32)
    ring = jnp.full((max(reset_after or 1, 1),), NO_STEP, jnp.int32)
    carry = (rule.init(), ring, jnp.zeros((), jnp.bool_))
    _, out = jax.lax.scan(step, carry, (jnp.arange(norms.shape[0], dtype=jnp.int32), norms))
    return out


# ----------------------------------------------------------------------------- devices


def leave_one_out_cosine(device_norms: jax.Array, cosine_to_mean: jax.Array) -> jax.Array:
    """``[K]`` cosine of each device's gradient to the mean of the OTHER devices' gradients.

    Computed from the per-device norms ``|g_k|`` and cosines to the mean ``c_k`` alone
    (both are recorded metrics, so a logged run can be replayed): ``sum_k <g_k, g> =
    K |g|^2`` gives ``|g| = sum_k c_k |g_k| / K``, then ``<g_k, g> = c_k |g_k| |g|`` and
    the others' sum is ``K g - g_k``.
    """
    k = device_norms.shape[-1]
    kf = jnp.float32(k)
    norms = jnp.asarray(device_norms, jnp.float32)
    # The cosines do not depend on the norms' scale: divided by the largest, the squares
    # below stay in float32's range whatever the norms (one device's ~1e20 included).
    largest = jnp.max(norms, axis=-1, keepdims=True)
    norms = norms / jnp.where(largest > 0, largest, 1.0)
    cos = jnp.asarray(cosine_to_mean, jnp.float32)
    mean_norm = jnp.sum(cos * norms, axis=-1, keepdims=True) / kf
    dots = cos * norms * mean_norm
    others_sq = jnp.maximum(kf * kf * mean_norm**2 - 2.0 * kf * dots + norms**2, 0.0)
    numerator = kf * dots - norms**2
    denominator = norms * jnp.sqrt(others_sq)
    return jnp.where(denominator > 0, numerator / jnp.where(denominator > 0, denominator, 1.0), 0.0)


# 1 - cosine is kept at or above this before its log: float32 cosines of nearly parallel
# gradients round to 1 (a log of 0), and below it the distances are rounding noise.
_MIN_DISTANCE = 1e-6


def direction_distance(cosine: jax.Array) -> jax.Array:
    """``log(max(1 - cosine, 1e-6))``: how far a device's gradient points from the others',
    in the units the direction score is measured in.

    ``1 - cos`` is half the squared distance between the unit gradients. Its log makes the
    score a ratio: where the gradients share a strong signal (early training, cosines
    around 0.9), ``1 - cos`` is about half the squared noise-to-signal ratio of the
    device's batch, and batches differ in it by factors, not by fixed amounts (8 devices
    of a small MLP: cosines 0.93 +- 0.02 and one batch at 0.31, a ~10x larger ``1 -
    cos``, by chance). Around cosine 0 (gradients dominated by their noise, most of a
    run), ``log(1 - c)`` is ``-c`` to first order: the score is the cosine's own z-score.
    """
    return jnp.log(jnp.maximum(1.0 - jnp.asarray(cosine, jnp.float32), _MIN_DISTANCE))


class DeviceScores(NamedTuple):
    """Per-device robust scores of one audit (all ``[K]`` float32 but the spreads).

    Attributes:
      norm_score: ``|log|g_k| - median| / spread`` of the log-norms (two-sided).
      direction_score: ``(d_k - median) / spread`` of the log-distances ``d_k = log(1 -
        c_k)`` of the leave-one-out cosines ``c_k`` (see :func:`direction_distance`;
        one-sided: only a device that agrees LESS with the others scores).
      score: the larger of the two; ``inf`` for a device with a non-finite gradient.
      norm_spread: this audit's robust spread of the log-norms (before flooring).
      cosine_spread: this audit's robust spread of the log-distances ``d_k``.
    """

    norm_score: jax.Array
    direction_score: jax.Array
    score: jax.Array
    norm_spread: jax.Array
    cosine_spread: jax.Array


def device_scores(
    device_norms: jax.Array,
    cosine_to_mean: jax.Array,
    norm_spread_ref: jax.Array,
    cosine_spread_ref: jax.Array,
    norm_floor: float,
    cosine_floor: float,
) -> DeviceScores:
    """Robust per-device scores of one audit against the other devices.

    The spread each score divides by is the largest of this audit's robust spread (MAD
    across devices), the reference spread passed in (a running average over audits,
    so one audit where the others happen to agree closely does not turn noise into an
    alarm) and the floor. The robust scores need K >= 3: with 2 devices the spread
    is their distance and every score would be the same, so both scores are 0, except
    the verdicts that need no spread: a device with a non-finite gradient scores
    ``inf``, and so does a dead one, whose gradient is exactly zero while another
    device's is finite and non-zero (``norm_score`` ``inf``). (With K >= 3 a dead device
    gets a large finite norm score from its clamped log-norm.)
    """
    k = device_norms.shape[-1]
    norms = jnp.asarray(device_norms, jnp.float32)
    # A non-finite device also makes the mean (so every cosine) non-finite: it is the
    # device's norm that tells which one it is.
    finite = jnp.isfinite(norms)
    everyone = jnp.ones(norms.shape, jnp.bool_)
    log_norms = jnp.log(jnp.maximum(jnp.where(finite, norms, 1.0), 1e-30))
    cosines = jnp.where(jnp.isfinite(cosine_to_mean), cosine_to_mean, 0.0)
    distance = direction_distance(leave_one_out_cosine(jnp.where(finite, norms, 0.0), cosines))
    norm_centre, norm_spread = median_and_spread(log_norms, everyone)
    cos_centre, cos_spread = median_and_spread(distance, everyone)
    norm_scale = jnp.maximum(jnp.maximum(norm_spread, norm_spread_ref), norm_floor)
    cos_scale = jnp.maximum(jnp.maximum(cos_spread, cosine_spread_ref), cosine_floor)
    norm_score = jnp.abs(log_norms - norm_centre[..., None]) / norm_scale[..., None]
    direction_score = (distance - cos_centre[..., None]) / cos_scale[..., None]
    if k < 3:
        alive = jnp.any(finite & (norms > 0), axis=-1, keepdims=True)
        dead = (norms == 0) & alive
        norm_score = jnp.where(dead, jnp.inf, jnp.zeros_like(norm_score))
        direction_score = jnp.zeros_like(direction_score)
    score = jnp.where(finite, jnp.maximum(norm_score, direction_score), jnp.inf)
    return DeviceScores(norm_score, direction_score, score, norm_spread, cos_spread)


def pair_scores(pairwise_cosine: jax.Array, floor: float) -> jax.Array:
    """``[K, K]`` robust z-score of each pair's closeness against all off-diagonal pairs:
    ``(median - d_jk) / max(spread, floor)`` of the log-distances ``d_jk = log(1 - c_jk)``
    of the sketched cosines (:func:`direction_distance`); 0 on the diagonal and with fewer
    than 3 devices. High for a pair that agrees far more than the others: two devices that
    see the same examples. The log measures a pair by how many times closer it is than the
    others: a near-duplicate under augmentation noise (cosine 0.99 against 0.14 +- 0.3 for
    the other pairs) scores about 12 where the cosine's own z-score was 2.6."""
    k = pairwise_cosine.shape[-1]
    cos = jnp.asarray(pairwise_cosine, jnp.float32)
    off = ~jnp.eye(k, dtype=jnp.bool_)
    finite = jnp.isfinite(cos) & off
    distance = direction_distance(jnp.where(finite, cos, 0.0))
    flat = distance.reshape((*cos.shape[:-2], k * k))
    centre, spread = median_and_spread(flat, finite.reshape((*finite.shape[:-2], k * k)))
    z = (centre[..., None, None] - distance) / jnp.maximum(spread, floor)[..., None, None]
    if k < 3:
        return jnp.zeros_like(cos)
    return jnp.where(finite, z, 0.0)


# ----------------------------------------------------------------------------- audits


class AuditDetectorState(NamedTuple):
    """What the cross-device detectors remember between audits (fixed structure).

    Attributes:
      num_audits: int32, audits folded in.
      norm_spread_ema: EMA (decay ``AuditRule.spread_decay``, bias-corrected with
        ``num_audits``) of the robust cross-device spread of the log-norms.
      cosine_spread_ema: the same for the log-distances of the leave-one-out cosines
        (:func:`direction_distance`).
      outlier_evidence: float32 ``[K]`` CUSUM evidence that each device is an outlier.
      pair_evidence: float32 ``[K, K]`` CUSUM evidence that each pair sees the same data.
    """

    num_audits: jax.Array
    norm_spread_ema: jax.Array
    cosine_spread_ema: jax.Array
    outlier_evidence: jax.Array
    pair_evidence: jax.Array


class AuditVerdict(NamedTuple):
    """What one audit concluded (see :func:`audit_update`).

    Attributes:
      scores: the per-device :class:`DeviceScores`.
      outlier_devices: bool ``[K]``, devices named as outliers: instant score above
        ``outlier_threshold``, or CUSUM evidence above ``evidence_threshold`` with an
        instant score above ``evidence_drift``.
      outlier_device: int32, the named device with the largest evidence (its instant
        score when that is larger), -1 when none is named.
      outlier_score: the largest instant score.
      outlier_evidence: float32 ``[K]``, each device's CUSUM evidence after this audit.
      near_duplicate_pairs: bool ``[K, K]`` (symmetric, False on the diagonal), pairs whose
        cosine has stood far above the other pairs' for several audits.
    """

    scores: DeviceScores
    outlier_devices: jax.Array
    outlier_device: jax.Array
    outlier_score: jax.Array
    outlier_evidence: jax.Array
    near_duplicate_pairs: jax.Array


def audit_init(k: int) -> AuditDetectorState:
    """An empty detector state for ``k`` devices."""
    zero = jnp.zeros((), jnp.float32)
    return AuditDetectorState(
        jnp.zeros((), jnp.int32), zero, zero, jnp.zeros((k,), jnp.float32), jnp.zeros((k, k), jnp.float32)
    )


def audit_update(
    state: AuditDetectorState,
    device_norms: jax.Array,
    cosine_to_mean: jax.Array,
    pairwise_cosine: jax.Array,
    *,
    outlier_threshold: float,
    evidence_threshold: float,
    evidence_drift: float,
    norm_floor: float,
    cosine_floor: float,
    pair_threshold: float,
    pair_drift: float,
    pair_floor: float,
    spread_decay: float,
) -> tuple[AuditDetectorState, AuditVerdict]:
    """Folds one audit into the detectors and returns their verdict.

    Outlier device: :func:`device_scores` against the running spreads, then a CUSUM per
    device with drift ``evidence_drift`` capped at ``2 * evidence_threshold``. A device
    is named when its instant score exceeds ``outlier_threshold`` (a strong fault: at
    once) or its evidence exceeds ``evidence_threshold`` while this audit adds to it
    (score above ``evidence_drift``: a moderate fault that persists). The evidence can
    only pass the threshold at an audit that adds to it, so the first naming is the
    evidence rule's; but once the fault is over, the capped evidence takes many clean
    audits to drain (clean scores of about 1 against a drift of 2), and a device whose
    current gradient is normal is no longer named on its past.

    Near-duplicate pairs: :func:`pair_scores` of the sketched cosines, a CUSUM per pair
    with drift ``pair_drift`` capped at ``2 * pair_threshold``, flagged above
    ``pair_threshold``. One audit adds at most half the threshold (the score is clipped at
    ``pair_drift + pair_threshold / 2``): a pair is flagged after three audits at the
    earliest, since two devices' batches can agree closely by chance once (a clean
    regression run: pair cosine 0.85 against 0.04, a score of 16).

    A device with a non-finite gradient scores ``inf`` and is named at that audit; such
    an audit moves neither the running spreads nor any evidence (the other devices'
    cosines are meaningless when the mean is not finite).
    """
    k = device_norms.shape[-1]
    # The references the scores divide by: the running spreads before this audit
    # (bias-corrected), so this audit's own spread enters through `device_scores`.
    previous = jnp.maximum(1.0 - spread_decay ** state.num_audits.astype(jnp.float32), 1e-30)
    scores = device_scores(
        device_norms,
        cosine_to_mean,
        jnp.where(state.num_audits > 0, state.norm_spread_ema / previous, 0.0),
        jnp.where(state.num_audits > 0, state.cosine_spread_ema / previous, 0.0),
        norm_floor,
        cosine_floor,
    )
    all_finite = jnp.all(jnp.isfinite(scores.score))

    def ema(old, new):
        return jnp.where(all_finite, spread_decay * old + (1.0 - spread_decay) * new, old).astype(jnp.float32)

    cap = 2.0 * evidence_threshold
    evidence = jnp.where(
        all_finite, cusum(state.outlier_evidence, scores.score, evidence_drift, cap), state.outlier_evidence
    ).astype(jnp.float32)
    named = (scores.score > outlier_threshold) | ((evidence > evidence_threshold) & (scores.score > evidence_drift))
    rank = jnp.where(named, jnp.maximum(evidence, jnp.where(jnp.isfinite(scores.score), scores.score, 1e30)), -1.0)
    outlier_device = jnp.where(jnp.any(named), jnp.argmax(rank), -1).astype(jnp.int32)

    pairs = pair_scores(pairwise_cosine, pair_floor)
    pairs = jnp.minimum(pairs, pair_drift + 0.5 * pair_threshold)
    pair_evidence = jnp.where(
        all_finite, cusum(state.pair_evidence, pairs, pair_drift, 2.0 * pair_threshold), state.pair_evidence
    )
    off = ~jnp.eye(k, dtype=jnp.bool_)
    near = off & (pair_evidence > pair_threshold)
    near = near | near.T

    new_state = AuditDetectorState(
        num_audits=jnp.where(all_finite, state.num_audits + 1, state.num_audits).astype(jnp.int32),
        norm_spread_ema=ema(state.norm_spread_ema, scores.norm_spread),
        cosine_spread_ema=ema(state.cosine_spread_ema, scores.cosine_spread),
        outlier_evidence=evidence,
        pair_evidence=pair_evidence.astype(jnp.float32),
    )
    verdict = AuditVerdict(scores, named, outlier_device, jnp.max(scores.score).astype(jnp.float32), evidence, near)
    return new_state, verdict


@functools.partial(jax.jit, static_argnames=("rule",))
def _replay_audits(rule: tuple[tuple[str, Any], ...], device_norms, cosine_to_mean, pairwise_cosine):
    k = device_norms.shape[-1]

    def step(state, inputs):
        state, verdict = audit_update(state, *inputs, **dict(rule))
        return state, verdict

    _, verdicts = jax.lax.scan(step, audit_init(k), (device_norms, cosine_to_mean, pairwise_cosine))
    return verdicts


def replay_audits(
    device_norms: Any, cosine_to_mean: Any, pairwise_cosine: Any | None = None, **rule: float
) -> AuditVerdict:
    """Runs :func:`audit_update` over recorded audits (``[T, K]``, ``[T, K]``,
    ``[T, K, K]``; the pairwise cosines may be omitted: no near-duplicate evidence),
    with the keyword arguments of :func:`audit_update` as the rule. Returns the
    per-audit verdicts stacked along a leading axis."""
    device_norms = jnp.asarray(device_norms, jnp.float32)
    if pairwise_cosine is None:
        pairwise_cosine = jnp.zeros(device_norms.shape + device_norms.shape[-1:], jnp.float32)
    return _replay_audits(
        tuple(sorted((name, float(value)) for name, value in rule.items())),
        device_norms,
        jnp.asarray(cosine_to_mean, jnp.float32),
        jnp.asarray(pairwise_cosine, jnp.float32),
    )
