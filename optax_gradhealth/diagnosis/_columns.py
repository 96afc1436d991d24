"""Columns the patterns read, derived from a :class:`History` (numpy, host side)."""

from __future__ import annotations

import functools
import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np

from optax_gradhealth import _detectors as detect
from optax_gradhealth._guard import REBASELINE_AFTER, SPIKE_BASELINE, SPREAD_FLOOR
from optax_gradhealth.diagnosis._core import Thresholds
from optax_gradhealth.history import History


def replay_spike_scores(norm: np.ndarray, thresholds: Thresholds) -> tuple[np.ndarray, np.ndarray]:
    """``(spike, ratio)`` per row: the guard's spike rule (``_detectors.SpikeRule``, with
    the thresholds' ``spike_score``, ``spike_zscore``, ``spike_window`` and
    ``warmup_rows``) replayed over logged norms (a non-finite norm is never accepted).

    The same verdicts as ``_detectors.replay_spikes`` (the guard's rule step by step),
    computed many rows at a time where that is exact (see :func:`_replay_fast`). The
    last result is kept: :func:`gh.write_report <optax_gradhealth.write_report>`'s
    diagnosis and spike panel replay a log once."""
    rule = spike_rule(thresholds)
    # A finite norm beyond float32 (a float64 log) saturates, as the guard's does; cast
    # as it is it would become Inf and count as neither a spike nor non-finite.
    norm = np.asarray(norm, np.float64)
    big = np.finfo(np.float32).max
    norm = np.where(np.isfinite(norm), np.minimum(norm, big), norm).astype(np.float32)
    # A subnormal norm (below 1.2e-38) is 0, as XLA:CPU flushes it: the replay's numpy
    # comparisons would otherwise push it into the window, where the rule pushes nothing.
    norm = np.where(np.abs(norm) < np.finfo(np.float32).tiny, np.float32(0.0), norm)
    key = (rule, hashlib.blake2b(norm.tobytes(), digest_size=16).digest(), norm.size)
    if _last_replay and _last_replay[0] == key:
        spike, ratio = _last_replay[1]
    else:
        spike, ratio = _replay_fast(rule, norm)
        _last_replay[:] = [key, (spike, ratio)]
    return spike.copy(), ratio.copy()


def spike_rule(th: Thresholds) -> detect.SpikeRule:
    """The guard's spike rule with the thresholds' ``spike_score``, ``spike_zscore``,
    ``spike_window`` and ``warmup_rows`` (the guard's floor, baseline and re-baselining)."""
    return detect.SpikeRule(
        th.spike_score,
        th.spike_zscore,
        th.spike_window,
        th.warmup_rows,
        SPREAD_FLOOR,
        min(SPIKE_BASELINE, th.spike_window),
        REBASELINE_AFTER,
    )


_last_replay: list = []  # [key, (spike, ratio)] of the last replay


def _window_medians(seq: np.ndarray, ends: np.ndarray, sizes: np.ndarray, centre: np.ndarray | None = None):
    """Per row ``i``, ``_detectors.masked_median`` of ``seq[ends[i] - sizes[i] : ends[i]]``
    (of its distances to ``centre[i]`` when given), in float32 as there: the average of
    the two middle entries, 0 for none."""
    out = np.zeros(ends.size, np.float32)
    for size in np.unique(sizes):
        rows = np.flatnonzero(sizes == size)
        if size == 0:
            continue
        windows = np.lib.stride_tricks.sliding_window_view(seq, int(size))[ends[rows] - size]
        if centre is not None:
            windows = np.abs(windows - centre[rows, None])
        low, high = (int(size) - 1) // 2, int(size) // 2
        part = np.sort(windows, axis=1)  # (faster than a two-element partition of short rows)
        out[rows] = np.float32(0.5) * (part[:, low] + part[:, high])
    return out


def _stretches(rule: detect.SpikeRule) -> tuple[int, int]:
    """The shortest and longest stretches of rows :func:`_replay_fast` judges at once
    (``[L, W]`` windows: up to about 4M entries)."""
    large = max(1, min(16384, 2**22 // rule.window))
    return min(256, large), large


@functools.partial(jax.jit, static_argnames=("rule",))
def _judge_at(rule: detect.SpikeRule, norms, count, median, spread):
    """``SpikeRule.judge``, ``SpikeRule.dip`` and whether the step ends a run of spikes
    and dips (``SpikeRule.streak``), given each row's window as its count and ``(median,
    spread)``, for a row that follows no spike or dip: ``(spike, ratio, dip, floor, ends)``."""
    zero = jnp.zeros_like(count)
    window = detect.NormWindow(None, count, zero)
    finite = jnp.isfinite(norms)
    verdict = rule.judge_against(window, norms, finite, median, spread)
    _, floor, dip = rule.dip(window, norms, verdict)
    _, ends = rule.streak(window, norms, verdict, verdict.spike | dip, finite & ~verdict.spike)
    return verdict.spike, verdict.ratio, dip, floor, ends


def _replay_stretch(rule: detect.SpikeRule, kept: np.ndarray, count: int, norms: np.ndarray, logs: np.ndarray):
    """The rule's verdicts on ``norms`` (``[L]``; ``logs`` their log-norms, as the rule's
    fold computes them) after a window that holds ``kept`` (its valid log-norms, oldest
    first) and has seen ``count`` pushes, as if no row before each one were a spike or a
    dip: a finite norm above 0 then pushes its log-norm, any other row pushes nothing,
    so each row's window is the last ``W`` log-norms pushed before it.

    Returns ``(spike, ratio, first, floor, ends)``: ``first`` is the first row that is a
    spike or a dip (L when none is), the verdicts are exact up to it (it included),
    ``floor`` its dip bound and ``ends`` whether a row ends a run of spikes and dips
    (``SpikeRule.streak``). The medians are numpy's (a selection of the same float32
    numbers, the average of the two middle ones in float32); the rest is the rule's own
    code (:func:`_judge_at`)."""
    size, length = rule.window, norms.size
    pushes = np.isfinite(norms) & (norms > 0)
    before = np.concatenate([[0], np.cumsum(pushes)[:-1]]) if length else np.zeros(0, np.int64)
    seq = np.concatenate([kept, logs[pushes]]).astype(np.float32)
    ends = kept.size + before  # row i's window ends (exclusive) in seq
    valid = np.minimum(ends, size)
    median = _window_medians(seq, ends, np.minimum(valid, rule.baseline))
    n = np.maximum(valid - 1, 0)
    diffs = (seq[1:] - seq[:-1]).astype(np.float32)
    centre = _window_medians(diffs, np.maximum(ends - 1, 0), n)
    spread = np.float32(detect.MAD_TO_STD) * _window_medians(diffs, np.maximum(ends - 1, 0), n, centre)
    spread = (spread / np.float32(math.sqrt(2.0))).astype(np.float32)
    padded = next(n for n in _stretches(rule) if n >= length)  # two compiled shapes (NaN pads)

    def pad(x, fill):
        return np.concatenate([x, np.full(padded - length, fill, x.dtype)])

    out = _judge_at(
        rule,
        pad(norms, np.nan),
        pad((count + before).astype(np.int32), 0),
        pad(median, 0.0),
        pad(spread, 0.0),
    )
    spike, ratio, dip, floor, ends = (np.asarray(x)[:length] for x in out)
    moved = np.isfinite(norms) & (spike | dip)
    first = int(np.argmax(moved)) if moved.any() else length
    return spike, ratio, first, floor, ends


def _ring(
    rule: detect.SpikeRule, kept: np.ndarray, count: int, streak: int, run: np.ndarray, run_count: int
) -> detect.NormWindow:
    """The rule's window (a ring) that holds ``kept`` (oldest first) after ``count`` pushes,
    with the run's ring holding ``run`` (oldest first) after ``run_count`` writes."""
    ring = np.zeros(rule.window, np.float32)
    ring[np.arange(count - kept.size, count) % rule.window] = kept
    size = rule.run_size
    run_ring = np.zeros(size, np.float32)
    if size:
        run_ring[np.arange(run_count - run.size, run_count) % size] = run
    return detect.NormWindow(
        jnp.asarray(ring), jnp.int32(count), jnp.int32(streak), jnp.asarray(run_ring), jnp.int32(run_count)
    )


@functools.partial(jax.jit, static_argnames=("rule",))
def _replay_steps(rule: detect.SpikeRule, window: detect.NormWindow, norms: jax.Array):
    """``_detectors.replay_spikes`` from ``window``: ``(spike, ratio, window after)``."""

    def step(window, norm):
        verdict = rule.judge(window, norm, jnp.isfinite(norm))
        accepted = jnp.isfinite(norm) & ~verdict.spike
        return rule.fold(window, norm, verdict, accepted), (verdict.spike, verdict.ratio)

    window, (spike, ratio) = jax.lax.scan(step, window, norms)
    return spike, ratio, window


def _replay_fast(rule: detect.SpikeRule, norms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The guard's spike rule over ``norms`` (float32 ``[T]``), as ``_detectors.replay_spikes``
    runs it step by step, with the same verdicts: stretches of rows are judged at once
    (:func:`_replay_stretch`) up to the next spike or dip, whose effect on the window is
    then applied (:meth:`SpikeRule.fold_and_restart`'s rules: not pushed, or with
    ``rebaseline_after=None`` a dip pushed at its floor; one more in the run of spikes and
    dips, which an accepted row near the baseline ends (``SpikeRule.streak``), and which
    at ``rebaseline_after`` restarts the window on the run's own last log-norms), and the
    next stretch starts after it. Where such rows come every few steps (an oscillating
    norm), blocks of rows are replayed step by step instead (:func:`_replay_steps`; NaN
    rows, which change nothing, pad the last block)."""
    total, size = norms.size, rule.window
    run_size = rule.run_size
    spike, ratio = np.zeros(total, bool), np.zeros(total, np.float64)
    # What a row pushes, computed as the rule's fold computes it.
    logs = np.asarray(jnp.log(jnp.maximum(jnp.asarray(norms), 1e-37)), np.float32)
    # A long stretch while no row moves, a short one after one that did (spikes come in
    # bursts: a long stretch would be cut short at once, its windows wasted).
    small, large = _stretches(rule)
    kept, count, streak = np.zeros(0, np.float32), 0, 0
    run, run_count = np.zeros(0, np.float32), 0  # the run's log-norms (its last run_size), written since it began
    position, stretch, short, block = 0, small, 0, 1024
    while position < total:
        if short >= 4:  # four stretches in a row stopped within a few rows: step by step
            part = np.full(block, np.nan, np.float32)
            taken = min(block, total - position)
            part[:taken] = norms[position : position + taken]
            window = _ring(rule, kept, count, streak, run, run_count)
            s, r, window = _replay_steps(rule, window, part)
            spike[position : position + taken] = np.asarray(s)[:taken]
            ratio[position : position + taken] = np.asarray(r)[:taken]
            ring, count = np.asarray(window.window_log_norms), int(window.window_count)
            streak = int(window.window_streak)
            kept = ring[np.arange(count - min(count, size), count) % size]
            run_count = int(window.window_run_count)
            if run_size:
                held = np.arange(run_count - min(run_count, run_size), run_count) % run_size
                run = np.asarray(window.window_run_log_norms)[held]
            position, stretch, short = position + taken, small, 0
            continue
        end = min(total, position + stretch)
        segment = norms[position:end]
        s, r, first, floor, ends = _replay_stretch(rule, kept, count, segment, logs[position:end])
        taken = min(first + 1, end - position)
        spike[position : position + taken] = s[:taken]
        ratio[position : position + taken] = r[:taken]
        before = segment[:first]
        pushes = np.isfinite(before) & (before > 0)
        kept = np.concatenate([kept, logs[position : position + first][pushes]])[-size:]
        count += int(pushes.sum())
        # The run: an accepted row near the baseline ends it (and is not part of it); the
        # other finite rows above 0 join it.
        ended = np.flatnonzero(ends[:first])
        joins = pushes & ~ends[:first]
        if ended.size:
            streak, run_count = 0, 0
            run = np.zeros(0, np.float32)
            joins[: ended[-1] + 1] = False
        run = np.concatenate([run, logs[position : position + first][joins]])[-run_size:] if run_size else run
        run_count += int(joins.sum())
        if position + first == end:
            position, stretch = end, min(large, 2 * stretch)
            continue
        # The row that moved (a spike, or a dip): not accepted if a spike, never pushed
        # but as a dip without re-baselining (at its floor); one more in the run.
        streak += 1
        if rule.rebaseline_after is None:
            if not s[first]:  # a dip, accepted and pushed at its floor
                kept = np.concatenate([kept, floor[first : first + 1]])[-size:]
                count += 1
        else:
            if run_size:
                run = np.concatenate([run, logs[position + first : position + first + 1]])[-run_size:]
            run_count += 1
            if streak >= rule.rebaseline_after:  # restarted on the run's last log-norms, with its count
                kept, count = run[run.size - min(run_count, run_size) :].copy(), run_count
                streak, run, run_count = 0, np.zeros(0, np.float32), 0
        position, stretch = position + first + 1, small
        short = short + 1 if first < 8 else 0
    return spike, ratio


def gradient_rows(h: History) -> np.ndarray:
    """Rows where the gradient was judged: ``grad/norm`` or the guard's ``grad/finite``
    flag was logged (a row of a step union, an empty CSV cell, an eval row, is not)."""
    rows = h.logged("grad/norm")
    if h.has("grad/finite"):
        rows |= h.logged("grad/finite")
    return rows


def nonfinite_rows(h: History) -> np.ndarray:
    """Rows with a non-finite gradient: ``grad/norm`` logged non-finite (NaN logged as
    NaN, or an infinity), or the guard's ``grad/finite`` flag logged 0. A row that does
    not log the norm at all is not one of them."""
    norm = h.col("grad/norm")
    bad = h.logged("grad/norm") & ~np.isfinite(norm)
    if h.has("grad/finite"):
        bad |= h.col("grad/finite") == 0
    return bad


def step_masks(h: History) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(finite, skipped, accepted)`` per row, from ``grad/norm`` (which must be there),
    ``grad/finite`` and ``grad/skipped`` when logged. ``finite``: a finite norm was
    logged and the ``grad/finite`` flag (if logged) is not 0; ``skipped``: the guard's
    flag, else the non-finite rows (:func:`nonfinite_rows`); rows that log no norm are
    neither finite nor accepted."""
    bad = nonfinite_rows(h)
    finite = np.isfinite(h.col("grad/norm")) & ~bad
    skipped = h.col("grad/skipped") == 1 if h.has("grad/skipped") else bad
    return finite, skipped, finite & ~skipped


def counter_increments(h: History, name: str) -> np.ndarray:
    """Per row: how much the counter column ``name`` (a ``num_...`` metric) grew since
    its previous logged value (the first one: since 0); NaN on rows that do not log it.
    The one rule for every counter the diagnosis and the report count
    (:func:`counter_total`, :func:`counter_growth`).

    A counter goes down when the optimizer state went back, and the guard's own step
    count ``grad/num_steps`` (logged with its counters) tells how:

    - a reset (a freshly initialised guard, e.g. a new training stage that continues
      the log): ``grad/num_steps`` restarted, at most the steps since the previous
      logged row. All of the counter's new value is growth since the reset.
    - a restore (a rollback to a checkpoint while the step goes on, as the demo and
      ``examples/rollback_orbax.py`` do): ``grad/num_steps`` went back to the
      checkpoint's count. The restored value was counted before; the growth is the
      value beyond the counter's value at the first earlier row (since the last time
      the state went back) whose ``grad/num_steps`` reached this row's: the state
      restored is from no later than that row, so no event is counted twice.
    - without ``grad/num_steps`` (or when it did not go back), nothing tells the two
      apart: a counter that went down counts 0, never events counted before."""
    values = h.col(name)
    out = np.full(len(h), np.nan)
    logged = np.flatnonzero(np.isfinite(values))
    if not logged.size:
        return out
    v = values[logged]
    grew = np.maximum(v - np.concatenate([[0.0], v[:-1]]), 0.0)
    if h.has("grad/num_steps"):
        n = h.col("grad/num_steps")[logged]
        steps = h.steps[logged].astype(np.float64)
        back = np.flatnonzero(n[1:] < n[:-1]) + 1  # the state went back between k - 1 and k
        for i, k in enumerate(back):
            if n[k] <= steps[k] - steps[k - 1]:  # a fresh state: counts from 0
                grew[k] = v[k]
                continue
            start = back[i - 1] if i else 0
            reached = start + np.flatnonzero(n[start:k] >= n[k])[0]
            grew[k] = max(v[k] - v[reached], 0.0)
    out[logged] = grew
    return out


def counter_total(h: History, name: str) -> int:
    """How much a counter column (a ``num_...`` metric) grew over the log, resets and
    restores judged by :func:`counter_increments` (the first logged value against 0); 0
    when it is not logged or never grew (:func:`counter_growth`)."""
    growth = counter_growth(h, name)
    return growth[0] if growth else 0


def counter_growth(h: History, name: str) -> tuple[int, np.ndarray] | None:
    """``(total, steps where it grew)`` of a counter column (a ``num_...`` metric), or
    None when it is not logged or never rose above 0. Rows that do not log the counter
    (NaN) are left out: growth is judged between consecutive logged values (the first
    against 0) by :func:`counter_increments`."""
    if not h.has(name):
        return None
    grew = counter_increments(h, name)
    logged = np.isfinite(grew)
    total = int(grew[logged].sum())
    if total <= 0:
        return None
    return total, h.steps[logged & (grew > 0)]


def _copy_of(name: str) -> tuple[str, int]:
    """``(name without its copy suffix, copy number)`` of a metric's column: ``('grad/norm',
    2)`` for ``grad/norm#2``, ``('xdev/device_norms/3', 2)`` for ``xdev/device_norms#2/3``;
    ``(name, 1)`` for the first copy, and for a column that is no metric of the catalogue
    (a ``#`` in a name of the user's own is not a copy)."""
    from optax_gradhealth._catalogue import _split_copy, spec_of

    stem, copy = _split_copy(name)
    if not copy:
        return name, 1
    try:
        spec_of(stem)
    except KeyError:
        return name, 1
    return stem, int(copy[1:])


def metric_copies(h: History) -> list[int]:
    """The copy numbers above 1 in ``h``'s metric names (``[2]`` for a log with
    ``grad/norm#2``, ...): the metrics of a second, third... state that reports the same
    names, such as one ``gh.guard`` per parameter group in ``optax.multi_transform``
    (``gh.metrics`` gives the first one found the plain names)."""
    return sorted({copy for name in h.names if (copy := _copy_of(name)[1]) > 1})


def copy_view(h: History, copy: int) -> History:
    """``h`` as the ``copy``-th state's metrics: its ``#<copy>`` columns under the plain
    names (``grad/norm#2`` as ``grad/norm``), beside the columns that are no metric of
    the catalogue (``loss``, an eval metric); the other copies' metrics are left out, the
    first copy's too. A per-leaf metric named only once (a leaf of the second group of a
    ``multi_transform`` has a name of its own, without a suffix) stays with the first
    copy, where it is judged. The rows and what was logged on each are ``h``'s."""
    columns: dict[str, np.ndarray] = {}
    logged: dict[str, np.ndarray] = {}
    for name in h.names:
        stem, number = _copy_of(name)
        if number == copy or (number == 1 and not _is_metric(name)):
            columns[stem] = h.col(name)
            logged[stem] = h.logged(name)
    return History(h.steps, columns, source=h.source, nan_logged=logged)


def _is_metric(name: str) -> bool:
    from optax_gradhealth._catalogue import spec_of

    try:
        spec_of(name)
    except KeyError:
        return False
    return True


def gradhealth_metric(h: History) -> str | None:
    """The first column of ``h`` that is a metric of optax_gradhealth (a name of the
    catalogue, :data:`optax_gradhealth.CATALOGUE`: ``grad/norm``, ``grad/leaf_norm/<path>``,
    ``xdev/device_norms/3``, ...; a name users registered is not one, no pattern reads it)
    with a value on some row; None when there is none, so that no pattern can judge
    anything in ``h``."""
    from optax_gradhealth._catalogue import spec_of

    for name in h.names:
        try:
            spec_of(name)
        except KeyError:
            continue
        if h.logged(name).any():
            return name
    return None


def after_warmup(h: History, th: Thresholds) -> np.ndarray:
    """Rows at or after ``warmup_rows`` (by position in the history)."""
    return np.arange(len(h)) >= th.warmup_rows


# Audit-only metrics with continuous values: between audits a log holds the last
# audit's values, and a new audit changes them.
_AUDIT_VALUES = (
    "xdev/cosine_to_mean",
    "xdev/pairwise_cosine",
    "xdev/mean_pairwise_cosine",
    "xdev/norm_score",
    "xdev/direction_score",
    "xdev/outlier_evidence",
    "xdev/outlier_score",
)


def audit_rows(h: History) -> np.ndarray:
    """Rows that hold a new audit's values: the audit-only metrics (cosines, outlier
    scores, duplicate pairs, parameter desync) keep the latest audit's values between
    audits, so a logged row holds a new audit when one ran since the previous logged row,
    whether or not it ran on the row's own step (``log_every=64`` logs step 512, which
    holds the audit of step 500 with ``xdev/audited`` 0).

    * A row with ``xdev/audited`` 1 (its own step was an audit).
    * Where ``xdev/num_audits`` (the audit counter) is logged: the rows where it is above
      0 and differs from its value on the previous row that logged it (it grew; or it
      fell to a count above 0, a restart from a checkpoint or from scratch that audited
      again). Exact: two audits with bit-equal values are two.
    * Elsewhere (a log without the counter, or its rows that lack it): a row where an
      audit-only metric with continuous values (``xdev/cosine_to_mean``,
      ``xdev/pairwise_cosine``, ``xdev/mean_pairwise_cosine``, the outlier scores) was
      logged with a value unlike the one it had on the previous row that logged it:
      counting the rows that repeat the last audit's values would
      replay one audit many times beside the norms of later steps. (Without the counter,
      two audits in a row with every such value bit-equal, neither on a logged audit
      step, read as one.) Without any of these metrics, a row that logged some ``xdev/``
      metric.

    An eval row or a row of a step union is never an audit: its missing per-device norms
    would read as NaN devices."""
    audited = h.col("xdev/audited") == 1 if h.has("xdev/audited") else np.zeros(len(h), bool)
    rows = audited.copy()
    counted = np.zeros(len(h), bool)
    if h.has("xdev/num_audits"):
        count = h.col("xdev/num_audits")
        counted = np.isfinite(count)
        at = np.flatnonzero(counted)
        if at.size:
            values = count[at]
            changed = np.concatenate([[True], values[1:] != values[:-1]])
            rows[at[changed & (values > 0)]] = True
        if counted.all():
            return rows
    fallback = audited.copy()
    names = [n for n in h.columns if any(n == p or n.startswith(p + "/") for p in _AUDIT_VALUES) and h.logged(n).any()]
    if not names and not h.has("xdev/audited"):
        for name in h.columns:
            if name.startswith("xdev/"):
                fallback |= h.logged(name)
    for name in names:
        at = np.flatnonzero(h.logged(name))
        if at.size == 0:  # a column no row logged (null or empty cells throughout)
            continue
        values = h.col(name)[at]
        same = (values[1:] == values[:-1]) | (np.isnan(values[1:]) & np.isnan(values[:-1]))
        fallback[at[np.concatenate([[True], ~same])]] = True
    return np.where(counted, rows, fallback)


def agreement(h: History, rows: np.ndarray | None = None) -> tuple[str, np.ndarray, np.ndarray]:
    """``(metric name, values, steps)`` of the finite cross-device agreement: every step
    (``xdev/agreement``), else the audits' ``xdev/mean_pairwise_cosine``; on ``rows``
    only (a boolean row mask) when given."""
    name = "xdev/agreement" if h.has("xdev/agreement") else "xdev/mean_pairwise_cosine"
    values = h.col(name) if h.has(name) else np.full(len(h), np.nan)
    if name == "xdev/mean_pairwise_cosine" and h.has("xdev/audited"):
        values = np.where(h.col("xdev/audited") == 1, values, np.nan)
    ok = np.isfinite(values) if rows is None else np.isfinite(values) & rows
    return name, values[ok], h.steps[ok]


def agreement_drops(a: np.ndarray, th: Thresholds) -> list[int]:
    """Indices into ``a`` where it falls below ``agreement_drop_after`` while the median
    of the previous ``agreement_window`` values is above ``agreement_drop_before``, and
    stays down: the median of the ``agreement_window`` values from there on (the value
    itself included) is below ``agreement_drop_after`` too. Near the start of ``a`` the
    median before reads the values there are, at least ``agreement_window // 2`` (1 at
    least): a drop soon after the first value is judged, not left to a later index. A
    single low value (or a few) while the agreement declines early in training, as the
    devices learn the shared signal, is not a drop; a drop less than
    ``agreement_window`` values before the end cannot be told from one yet. The value
    may have fallen a few indices before the one judged (:func:`agreement_fall`)."""
    w = th.agreement_window
    first = max(1, w // 2)
    if a.size < first + w:
        return []
    # The rolling medians only where the value is low (the same medians, vectorised).
    low_at = np.flatnonzero(a[first : a.size - w + 1] < th.agreement_drop_after) + first
    if not low_at.size:
        return []
    windows = np.lib.stride_tricks.sliding_window_view(a, w)
    full = low_at >= w
    before = np.empty(low_at.size)
    before[full] = np.median(windows[low_at[full] - w], axis=1)
    for i in np.flatnonzero(~full):  # fewer than w values before: all of them
        before[i] = np.median(a[: low_at[i]])
    after = np.median(windows[low_at], axis=1)
    return low_at[(before > th.agreement_drop_before) & (after < th.agreement_drop_after)].tolist()


def agreement_fall(a: np.ndarray, drop: int, th: Thresholds) -> int:
    """The index where the agreement fell for the drop judged at ``drop``
    (:func:`agreement_drops`): the first of the values below ``agreement_drop_after``
    that lead to it (a low value right before a drop is judged only once the median
    before it is known)."""
    fall = drop
    while fall > 0 and a[fall - 1] < th.agreement_drop_after:
        fall -= 1
    return fall


def longest_run(flags: np.ndarray) -> int:
    """The longest run of consecutive True values."""
    padded = np.concatenate([[False], np.asarray(flags, bool), [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))  # starts (0 -> 1) and ends (1 -> 0), alternating
    return int((edges[1::2] - edges[::2]).max()) if edges.size else 0


def largest_layer_jump(h: History, row: int) -> tuple[str, float] | None:
    """The layer whose norm at ``row`` is the largest multiple of its median."""
    best = None
    for name in h.leaf_names():
        values = h.col(f"grad/leaf_norm/{name}")
        typical = values[np.isfinite(values)]
        if typical.size < 2 or not np.isfinite(values[row]):
            continue
        median = float(np.median(typical))
        if median <= 0:
            continue
        ratio = float(values[row] / median)
        if best is None or ratio > best[1]:
            best = (name, ratio)
    return best


def reduced(h: History, name: str, reduce) -> np.ndarray | None:
    """The ``name`` column, or, when it was logged as a vector / matrix (``name/i``,
    ``name/i/j``), its per-row reduction (e.g. a per-device or per-pair flag); None if absent."""
    if h.has(name):
        return h.col(name)
    index = h.indexed(name)
    if not index:
        return None

    def column(idx):
        return np.nan_to_num(h.col(name + "".join(f"/{i}" for i in idx)), nan=0.0)

    if all(len(idx) == 2 for idx in index):
        # A [K, K] pair matrix: one column per unordered pair {j, k}, j != k, set when
        # either [j, k] or [k, j] is (so a symmetric matrix counts each pair once).
        present = set(index)
        pairs = sorted({(min(j, k), max(j, k)) for j, k in index if j != k})
        columns = [
            np.maximum(column((j, k)) if (j, k) in present else 0.0, column((k, j)) if (k, j) in present else 0.0)
            for j, k in pairs
        ]
    else:
        columns = [column(idx) for idx in index]
    if not columns:
        return np.zeros(len(h))
    return reduce(np.stack(columns, axis=1), axis=1)


def flagged_indices(h: History, name: str, rows: np.ndarray) -> list[tuple[int, ...]]:
    """The ``name/i[/j]`` entries that are non-zero on any of ``rows``."""
    return [
        idx
        for idx in h.indexed(name)
        if np.any(np.nan_to_num(h.col(name + "".join(f"/{i}" for i in idx))[rows]) != 0)
        and (len(idx) != 2 or idx[0] != idx[1])
    ]


def rolling_median_before(values: np.ndarray, t: int, window: int) -> float:
    """The median of the up to ``window`` values before index ``t`` (``t`` >= 1)."""
    return float(np.median(values[max(0, t - window) : t]))


def matrix(h: History, name: str) -> np.ndarray | None:
    """``[T, K, K]`` from ``name/j/k`` columns, or None."""
    index = [i for i in h.indexed(name) if len(i) == 2]
    if not index:
        return None
    k = max(max(i) for i in index) + 1
    out = np.zeros((len(h), k, k))
    js, ms = np.array(index).T
    out[:, js, ms] = np.nan_to_num(np.stack([h.col(f"{name}/{j}/{m}") for j, m in index], axis=1))
    return out


def audit_verdicts(h: History, audit_rows: np.ndarray) -> detect.AuditVerdict | None:
    """The audit detectors replayed over the audit rows (None without the vectors)."""
    norms, cosines = h.vector("xdev/device_norms"), h.vector("xdev/cosine_to_mean")
    if norms is None or cosines is None or not audit_rows.any():
        return None
    from optax_gradhealth import _cross_device

    pairs = matrix(h, "xdev/pairwise_cosine")
    return detect.replay_audits(
        norms[audit_rows],
        cosines[audit_rows],
        None if pairs is None else pairs[audit_rows],
        **_cross_device.default_audit_rule(),
    )
