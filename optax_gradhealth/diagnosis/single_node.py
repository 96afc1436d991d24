"""Patterns of one training run's gradient statistics (any number of devices).

Each pattern is a :class:`Pattern` and a ``check_<name>(history, thresholds)`` that
returns its findings (an empty list when the pattern is absent, or when the history
lacks the metrics it needs).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

from optax_gradhealth._guard import LOST_LOSS_PER_NORM_RISE, LOST_LOSS_RISE
from optax_gradhealth.diagnosis import _columns as cols
from optax_gradhealth.diagnosis._core import Finding, Pattern, Thresholds
from optax_gradhealth.history import History

NONFINITE = Pattern(
    "nonfinite",
    "non-finite gradients (NaN/Inf)",
    "error",
    (
        "a bad batch (NaN/Inf in the inputs or targets, empty sequences, division by zero in the loss)",
        "fp16 overflow or underflow (activations, loss scale too high)",
        "the parameters already diverged (learning rate too high) and the loss overflowed",
    ),
    (
        "keep gh.guard in the chain: it skips these updates and never writes a NaN into the parameters",
        "find the leaf with grad/first_nonfinite_leaf (name it with gh.leaf_names(params)) and the batch",
        "use bf16 or float32 where fp16 overflows; lower the loss scale",
        "if they come in a row, restore the last healthy checkpoint (grad/rollback_recommended)",
    ),
)


def row_masks(h: History) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(finite, skipped, accepted)`` per row as :func:`_columns.step_masks
    <optax_gradhealth.diagnosis._columns.step_masks>` gives them, with the rows where a
    dynamic loss scale skipped the step (``grad/overflowed`` 1) skipped and not finite:
    such a step never reached the guard, whose metrics on that row still hold the
    previous step's values (a stale norm that must not be judged again). A row that
    repeats the guard's report (:func:`_repeated`) is none of the three: it is not
    judged at all."""
    finite, skipped, accepted = cols.step_masks(h)
    over = _overflowed(h)
    repeat = _repeated(h) & ~over
    return finite & ~over & ~repeat, (skipped | over) & ~repeat, accepted & ~over & ~repeat


def _repeated(h: History) -> np.ndarray:
    """Rows whose ``grad/num_steps`` equals its value on the previous row that logged it:
    the guard did not run since that row, so the row repeats its report (the micro-steps
    of ``gh.accumulate`` or ``optax.MultiSteps`` logged after every update call, a dynamic
    loss scale's overflow, the same state logged twice). Such a row is not a step of the
    guard of its own: its flags (``grad/skipped``, ``grad/spiked``, ``grad/finite``) and
    norm are the previous row's and are not counted again. All False without the column."""
    out = np.zeros(len(h), bool)
    if not h.has("grad/num_steps"):
        return out
    count = h.col("grad/num_steps")
    logged = np.flatnonzero(np.isfinite(count))
    out[logged[1:]] = count[logged[1:]] == count[logged[:-1]]
    return out


def _judged_rows(h: History) -> np.ndarray:
    """Rows whose gradient was judged (:func:`_columns.gradient_rows
    <optax_gradhealth.diagnosis._columns.gradient_rows>`) by a step of the guard of their
    own: rows that repeat its report (:func:`_repeated`) left out."""
    return cols.gradient_rows(h) & ~_repeated(h)


def _overflowed(h: History) -> np.ndarray:
    """Rows with ``grad/overflowed`` 1 (gh.dynamic_loss_scale skipped the step)."""
    if not h.has("grad/overflowed"):
        return np.zeros(len(h), bool)
    return h.col("grad/overflowed") == 1


def _counter_max(h: History, name: str) -> int:
    """The largest logged value of a column (0 when it holds no finite value): for a
    streak such as ``grad/consecutive_nonfinite``; a counter's total is
    :func:`~optax_gradhealth.diagnosis._columns.counter_total` (resets and restores judged)."""
    values = h.col(name)
    values = values[np.isfinite(values)]
    return int(values.max()) if values.size else 0


def check_nonfinite(h: History, th: Thresholds) -> list[Finding]:
    """Steps with a non-finite gradient: rows that logged a non-finite ``grad/norm`` or
    ``grad/finite`` 0 (rows that did not log the gradient are not judged), or the
    guard's counter (``grad/num_nonfinite``) above 0. A row that repeats the guard's
    report (:func:`_repeated`: an accumulation's micro-step) is not counted again."""
    if not h.has("grad/norm"):
        return []
    steps = h.steps
    _, skipped, _ = row_masks(h)
    judged = _judged_rows(h)
    bad = cols.nonfinite_rows(h) & judged
    counter = cols.counter_total(h, "grad/num_nonfinite")  # across resets and restores of the guard
    if not (bad.any() or counter > 0):
        return []
    evidence = {"nonfinite_logged_steps": int(bad.sum()), "fraction": float(bad.sum() / max(judged.sum(), 1))}
    if h.has("grad/num_nonfinite"):
        evidence["num_nonfinite_counter"] = counter
    if h.has("grad/skipped"):
        evidence["skipped_of_them"] = int((bad & skipped).sum())
    if h.has("grad/first_nonfinite_leaf") and bad.any():
        leaf = h.col("grad/first_nonfinite_leaf")[bad]
        evidence["first_nonfinite_leaf"] = int(leaf[np.isfinite(leaf)][0]) if np.isfinite(leaf).any() else -1
    # Consecutive logged rows; the guard's own count of consecutive non-finite steps
    # when logged (with log_every=N a run of bad steps can span few logged rows).
    evidence["longest_run"] = cols.longest_run(bad[judged])
    if h.has("grad/consecutive_nonfinite"):
        evidence["longest_run"] = max(evidence["longest_run"], _counter_max(h, "grad/consecutive_nonfinite"))
    if bad.any():
        shown, where = steps[bad], _first_bad_step(h, int(np.flatnonzero(bad)[0]))
    else:  # the counter grew between logged rows (no row of its own to show)
        grew = cols.counter_growth(h, "grad/num_nonfinite")
        seen = f", first seen at step {int(grew[1][0])}" if grew is not None else ""
        shown, where = steps[:0], f"between logged steps (counter only{seen})"
    return [NONFINITE.finding(f"{max(int(bad.sum()), counter)} non-finite step(s), {where}", shown, evidence)]


def _first_bad_step(h: History, row: int) -> str:
    """The first non-finite row's step in words: 'first at step S', or 'first logged at
    step S (counter C there, P at step Q)' when ``grad/num_nonfinite`` rose there by more
    than this row (earlier bad steps fell between logged rows)."""
    step = int(h.steps[row])
    if not h.has("grad/num_nonfinite") or not np.isfinite(h.col("grad/num_nonfinite")[row]):
        return f"first at step {step}"
    counter = h.col("grad/num_nonfinite")
    before = np.flatnonzero(np.isfinite(counter[:row]))
    previous = float(counter[before[-1]]) if before.size else 0.0
    if cols.counter_increments(h, "grad/num_nonfinite")[row] <= 1:
        return f"first at step {step}"
    since = f", {int(previous)} at step {int(h.steps[before[-1]])}" if before.size else ""
    return f"first logged at step {step} (counter {int(counter[row])} there{since})"


NONFINITE_UPDATE = Pattern(
    "nonfinite_update",
    "the optimizer made a non-finite update from finite gradients",
    "error",
    (
        "hyperparameters in bf16/fp16 (optax.inject_hyperparams takes the params' dtype): Adam's b2 = 0.999 "
        "rounds to 1 and the bias correction divides by zero",
        "fp16/bf16 optimizer moments overflowing (the second moment squares the gradient)",
        "an infinite or NaN learning rate from a schedule, or a zero denominator in a custom optimizer",
    ),
    (
        "keep gh.guard's check_updates on: it skips these steps and keeps the moments as they were",
        "keep hyperparameters in float32 (inject_hyperparams(..., hyperparam_dtype=jnp.float32)) and the "
        "moments in float32 (mu_dtype, or fp32 master weights)",
        "check the learning-rate schedule's values around the first step counted",
    ),
)


def check_nonfinite_update(h: History, th: Thresholds) -> list[Finding]:
    """The guard skipped steps whose gradient was finite but whose inner update or new
    inner state was not (``grad/num_nonfinite_updates`` grew)."""
    found = cols.counter_growth(h, "grad/num_nonfinite_updates")
    if found is None:
        return []
    total, steps = found
    evidence = {"num_nonfinite_updates": total, "first_logged_step": int(steps[0])}
    summary = (
        f"{total} step(s) skipped because the optimizer's own update was not finite, "
        f"first logged at step {int(steps[0])}"
    )
    return [NONFINITE_UPDATE.finding(summary, steps, evidence)]


LOSS_SCALE = Pattern(
    "loss_scale",
    "the dynamic loss scale collapsed or overflows too often: many steps skipped before the guard saw them",
    "warning",
    (
        "Inf/NaN in the forward pass (a bad batch, log(0), a division by zero): no scale makes it finite",
        "fp16 activations or the loss overflowing (above 65504) even at a small scale",
        "parameters that diverged (learning rate too high), so every step overflows",
    ),
    (
        "train in bf16 (float32's range: no loss scale needed) or keep the overflowing op in float32",
        "find the overflowing op: run the step in float32 on the batches at the first overflow steps and "
        "compare the activations' largest magnitudes with 65504",
        "tune gh.dynamic_loss_scale: a higher min_scale; after a collapse from a one-off fault, a shorter "
        "growth_interval brings the scale back sooner (at 2000 it stays down for 2000 steps per halving)",
        "an overflowed step keeps the guard's previous metrics: read grad/overflowed before those rows",
    ),
)


#: The fewest overflows in a row, after a healthy stretch, that read as a burst of bad
#: batches: a healthy scale overflows once per growth (it doubles, overshoots, halves).
OVERFLOW_BURST = 3

LOSS_SCALE_BURST_CAUSES = (
    "bad batches, not the scale: a burst of corrupted or out-of-distribution batches (inputs or targets far out "
    "of range) that overflow at any scale; each overflow halved a healthy scale, which stays that low until it "
    "grows back (one doubling per growth_interval clean steps)",
    "an activation or the loss that overflows fp16 on some batches only (long sequences, rare tokens)",
)
LOSS_SCALE_BURST_MITIGATIONS = (
    "look at the batches of the steps listed: the guard never saw them (the overflow skipped them first)",
    "a shorter growth_interval brings the scale back sooner after such a burst (at the default 2000 each "
    "halving costs 2000 clean steps); or train in bf16 (no loss scale, and the guard sees bad batches as spikes)",
    "an overflowed step keeps the guard's previous metrics: read grad/overflowed before those rows",
)


def _overflow_bursts(h: History, th: Thresholds) -> list[tuple[int, int, int]]:
    """``(first step, last step, first row)`` of each run of at least
    :data:`OVERFLOW_BURST` consecutive overflowed steps that began after warm-up and
    after ``min_steps`` logged rows without an overflow (a healthy stretch). A step is
    known to have overflowed from its row's ``grad/overflowed`` 1 (a row of its own),
    or from ``grad/num_overflows`` when it grew on a row by the number of steps since
    the row before that logged it (every step between them overflowed), or by at least
    :data:`OVERFLOW_BURST` while ``grad/loss_scale`` fell by at least that many halvings
    (overflows beyond the growths between two logged rows: ``log_every=N``). A healthy
    stretch may hold one overflow (a growth's)."""
    steps = h.steps
    spans = []  # (first step, last step, row) of steps known to have overflowed, all of them
    for row in np.flatnonzero(_overflowed(h)):
        spans.append((int(steps[row]), int(steps[row]), int(row)))
    if h.has("grad/num_overflows"):
        growth = cols.counter_increments(h, "grad/num_overflows")
        scale = h.col("grad/loss_scale") if h.has("grad/loss_scale") else np.full(len(h), np.nan)
        logged = np.flatnonzero(np.isfinite(growth))
        for before, row in itertools.pairwise(logged):
            gap = int(steps[row] - steps[before])
            every = growth[row] > 0 and gap > 0 and int(growth[row]) == gap
            with np.errstate(divide="ignore", invalid="ignore"):
                fell = np.log2(scale[before] / scale[row])  # halvings beyond growths between the rows
            if every or (growth[row] >= OVERFLOW_BURST and fell >= OVERFLOW_BURST):
                spans.append((int(steps[before]) + 1, int(steps[row]), int(before) + 1))
    if not spans:
        return []
    spans.sort()
    runs = [list(spans[0])]
    for first, last, row in spans[1:]:
        if first <= runs[-1][1] + 1:
            runs[-1][1] = max(runs[-1][1], last)
        else:
            runs.append([first, last, row])
    over_rows = np.zeros(len(h), bool)
    for first, last, _ in runs:
        over_rows |= (steps >= first) & (steps <= last)
    after = cols.after_warmup(h, th)
    out = []
    for first, last, row in runs:
        if last - first + 1 < OVERFLOW_BURST or not after[row]:
            continue
        before = np.flatnonzero(steps < first)[-th.min_steps :]
        if before.size < th.min_steps or over_rows[before].sum() > 1:
            continue  # no healthy stretch (one overflow at most, a growth's) before it: a run that overflows
        out.append((first, last, row))
    return out


def check_loss_scale(h: History, th: Thresholds) -> list[Finding]:
    """``gh.dynamic_loss_scale``: ``grad/num_overflows`` grew on more than
    ``overflow_fraction`` of the steps after warm-up, counting only the overflows beyond
    the scale's growths when ``grad/loss_scale`` is logged (without the counter:
    ``grad/overflowed`` on that fraction of the rows), or ``grad/loss_scale`` fell to 1
    or below (its default ``min_scale``: the loss is no longer scaled up at all), or at
    least :data:`OVERFLOW_BURST` steps in a row overflowed after a healthy stretch
    (:func:`_overflow_bursts`: bad batches, named first when that is the only reason)."""
    after = cols.after_warmup(h, th)
    steps = h.steps
    evidence: dict = {}
    reasons = []
    overflow_steps = steps[:0]
    if h.has("grad/num_overflows"):
        counter = h.col("grad/num_overflows")
        logged = np.flatnonzero(np.isfinite(counter))
        start = logged[logged < th.warmup_rows]
        start = start[-1] if start.size else (logged[0] if logged.size else None)
        judged = logged[logged > start] if start is not None else logged[:0]
        if judged.size:
            rows = np.concatenate([[start], judged])
            growth = cols.counter_increments(h, "grad/num_overflows")[judged]
            span = int(steps[judged[-1]] - steps[start])
            count = int(growth.sum())
            overflow_steps = steps[judged[growth > 0]]
            evidence["num_overflows"] = cols.counter_total(h, "grad/num_overflows")
            evidence["overflows_after_warmup"] = count
            excess = float(count)
            scale = h.col("grad/loss_scale") if h.has("grad/loss_scale") else None
            if scale is not None and np.all(np.isfinite(scale[rows]) & (scale[rows] > 0)):
                # A healthy scale overflows about once per growth (it doubles, overshoots,
                # halves): judge the overflows beyond its growths. Between two logged rows
                # log2(s_j / s_i) = growths - overflows, so the growths are read even when
                # a doubling and its halving fall between them.
                grew = np.maximum(np.diff(np.log2(scale[rows])) + growth, 0.0)
                excess = count - float(grew.sum())
                evidence["overflows_beyond_growths"] = excess
            evidence["overflow_rate"] = excess / max(span, 1)
    elif h.has("grad/overflowed"):
        flags = _overflowed(h) & after
        if after.any():
            overflow_steps = steps[flags]
            evidence["overflowed_rows_after_warmup"] = int(flags.sum())
            evidence["overflow_rate"] = float(flags.sum() / after.sum())
    if evidence.get("overflow_rate", 0.0) > th.overflow_fraction:
        count = evidence.get("overflows_after_warmup", evidence.get("overflowed_rows_after_warmup"))
        beyond = " beyond the scale's growths" if "overflows_beyond_growths" in evidence else ""
        reasons.append(
            f"{count} step(s) overflowed after warm-up ({evidence['overflow_rate']:.1%} of the steps{beyond}), "
            f"first seen at step {int(overflow_steps[0])}"
        )
    if h.has("grad/loss_scale"):
        scale = h.col("grad/loss_scale")
        logged = np.flatnonzero(np.isfinite(scale) & (scale > 0))
        if logged.size:
            low = float(scale[logged].min())
            first_low = logged[np.argmax(scale[logged] == low)]
            high = float(scale[logged[logged < first_low]].max()) if (logged < first_low).any() else low
            at_low = int((scale[logged] == low).sum())
            evidence["scale_range"] = [low, float(scale[logged].max())]
            if low <= 1.0 and high > low:
                evidence["scale_fell_at_step"] = int(steps[first_low])
                evidence["rows_at_lowest"] = at_low
                reasons.insert(
                    0,
                    f"the loss scale fell from {high:g} to {low:g} at step {int(steps[first_low])} and was there on "
                    f"{at_low} of {logged.size} logged rows",
                )
    bursts = _overflow_bursts(h, th)
    if bursts:
        evidence["overflow_bursts"] = [[first, last] for first, last, _ in bursts]
        said = ", ".join(f"steps {first}-{last}" for first, last, _ in bursts)
        scale_said = ""
        if h.has("grad/loss_scale"):
            scale = h.col("grad/loss_scale")
            first_row = bursts[0][2]
            known = np.flatnonzero(np.isfinite(scale) & (scale > 0))
            healthy, later = known[known < first_row], known[known > first_row]
            if healthy.size and later.size:
                scale_said = f"; the scale went from {scale[healthy[-1]]:g} to {scale[later[-1]]:g} at the last row"
        reasons.append(
            f"{len(bursts)} run(s) of {OVERFLOW_BURST} or more overflows in a row after a healthy stretch ({said})"
            + scale_said
        )
    if not reasons:
        return []
    if h.has("grad/overflowed"):
        evidence["overflowed_rows"] = int(_overflowed(h).sum())
    if bursts:
        shown = np.unique(np.concatenate([overflow_steps, [s for f, la, _ in bursts for s in range(f, la + 1)]]))
        finding = LOSS_SCALE.finding("; ".join(reasons), shown.astype(int), evidence)
        if len(reasons) == 1:  # the burst alone: bad batches, not the scale
            return [
                dataclasses.replace(
                    finding,
                    causes=(*LOSS_SCALE_BURST_CAUSES, *LOSS_SCALE.causes),
                    mitigations=LOSS_SCALE_BURST_MITIGATIONS,
                )
            ]
        return [dataclasses.replace(finding, causes=(*LOSS_SCALE.causes, LOSS_SCALE_BURST_CAUSES[0]))]
    return [LOSS_SCALE.finding("; ".join(reasons), overflow_steps, evidence)]


REPLAY_MISMATCH = Pattern(
    "replay_mismatch",
    "a step computed twice gave two different gradients: a transient computation fault",
    "error",
    (
        "silent data corruption: a device computed a wrong value once, without an error (rare per chip, "
        "frequent on a large fleet)",
        "a computation that is not deterministic: on GPU, scatter-adds and some reductions use atomics unless "
        "XLA_FLAGS=--xla_gpu_deterministic_ops=true",
        "random numbers drawn outside the step's arguments (a key not passed in), so the second computation "
        "draws others",
    ),
    (
        "if the flag and the keys are right, find the device: log the host and device of each fault, run the "
        "vendor's hardware diagnostics on repeat offenders and drain them",
        "gh.step_replay already used the healthy second computation where there was one "
        "(grad/num_replay_recovered); restore a checkpoint if faults were not recovered",
    ),
)


def check_replay_mismatch(h: History, th: Thresholds) -> list[Finding]:
    """``grad/num_replay_mismatches`` grew (:func:`optax_gradhealth.step_replay`)."""
    found = cols.counter_growth(h, "grad/num_replay_mismatches")
    if found is None:
        return []
    total, steps = found
    recovered = h.col("grad/num_replay_recovered") if h.has("grad/num_replay_recovered") else None
    evidence = {"num_replay_mismatches": total, "first_logged_step": int(steps[0])}
    if recovered is not None:
        evidence["num_replay_recovered"] = cols.counter_total(h, "grad/num_replay_recovered")
    summary = f"{total} step(s) gave a different gradient when computed again, first logged at step {int(steps[0])}"
    return [REPLAY_MISMATCH.finding(summary, steps, evidence)]


EXPLOSION = Pattern(
    "explosion",
    "gradient explosion (spikes)",
    "error",
    (
        "dirty data: a corrupted or out-of-distribution batch",
        "learning rate too high, or a warm-up that is too short",
        "momentum contaminated by earlier large gradients",
    ),
    (
        "skip the spiking batches (gh.guard(spike_action='skip'), the default)",
        "reset the optimizer's momentum when spikes persist (gh.guard(reset_after=...))",
        "lower the learning rate or lengthen the warm-up; clip adaptively (gh.ZScoreClip)",
        "look at the layer with the largest jump (evidence) to locate the source (embeddings vs head)",
    ),
)


def _spike_rows(h: History, th: Thresholds) -> tuple[np.ndarray, np.ndarray, str]:
    """``(spikes, score, source)`` per row: the spikes by the guard's rule, on its logged
    scores or replayed on the norms (``grad/norm`` must be there)."""
    norm = h.col("grad/norm")
    finite, _, _ = row_masks(h)
    if h.has("grad/spike_score"):
        # The guard's rule on its logged scores (the same thresholds by default, so the
        # same steps as grad/spiked, loss spikes aside; other thresholds re-judge them).
        score = np.nan_to_num(h.col("grad/spike_score"), nan=0.0)
        spikes = finite & (score > th.spike_score)
        source = "grad/spike_score"
        if h.has("grad/zscore"):
            spikes &= np.nan_to_num(h.col("grad/zscore"), nan=0.0) > th.spike_zscore
            source = "grad/spike_score and grad/zscore"
    else:
        spikes, score = cols.replay_spike_scores(np.where(finite, norm, np.nan), th)
        spikes = spikes & finite
        source = "the guard's spike rule replayed on grad/norm"
    return spikes, score, source


@dataclasses.dataclass(frozen=True)
class _LastingChange:
    """A run of spikes that ended in a re-baseline of the guard's window
    (``grad/num_rebaselines`` grew), after which the run trained on without a skip."""

    start: int | None  # the step the run began (the change); None when no row tells
    first_row: int  # the run's first row (its rows: first_row..row)
    row: int  # the row where grad/num_rebaselines grew
    exact: bool  # the counter was logged on the step before too: the restart was at `step`
    step: int  # the step of `row`

    @property
    def rebaselined(self) -> str:
        return ("at step " if self.exact else "by step ") + str(self.step)

    def started(self) -> str:
        return f"at step {self.start}" if self.start is not None else f"before step {self.step}"


LASTING_CHANGE_MITIGATION = (
    "if planned, call gh.rebaseline(opt_state) at the change (or use spike_action='clip', which adapts "
    "within a few steps)"
)


#: A lasting change whose logged loss after the re-baseline is more than this many times
#: its median before the run of spikes reads as a divergence, not as a planned change
#: (the guard's own rule: ``_guard.LOST_LOSS_RISE``) ...
DIVERGED_LOSS_FACTOR = LOST_LOSS_RISE
#: ... when its loss per unit of gradient norm (``loss / grad/norm``) rose by more than
#: this too, where ``grad/norm`` is logged: a loss weight scales the loss and the
#: gradient alike (ratio ~1), a learning rate that threw the model does not (2-4x
#: measured; ``_guard.LOST_LOSS_PER_NORM_RISE``).
DIVERGED_LOSS_PER_NORM_FACTOR = LOST_LOSS_PER_NORM_RISE


def _loss_rise(h: History, th: Thresholds, change: _LastingChange) -> tuple[float, float, int] | None:
    """``(loss before, loss after, step the trouble began)``: the medians of the logged ``loss`` over the rows
    before the trouble and after the run's re-baseline, as many finite values each as
    the run has rows (at least ``min_steps``), when the one after is more than
    :data:`DIVERGED_LOSS_FACTOR` times the one before; None otherwise, or without a
    ``loss`` column (or fewer than ``min_steps`` finite values on either side), or when
    the loss per unit of ``grad/norm`` (where logged) rose less than
    :data:`DIVERGED_LOSS_PER_NORM_FACTOR` times (a loss weight, not a divergence). The
    trouble begins at the run's first row, or earlier while a spike or a skipped step
    lies fewer rows before it than the run is long (an earlier run, not re-baselined,
    that this one continues)."""
    if not h.has("loss"):
        return None
    loss = h.col("loss")
    finite = np.isfinite(loss)
    width = max(th.min_steps, change.row - change.first_row + 1)
    bad = _spike_rows(h, th)[0] | row_masks(h)[1]
    start = change.first_row
    while True:
        earlier = np.flatnonzero(bad[max(start - width, 0) : start])
        if not earlier.size:
            break
        start = max(start - width, 0) + int(earlier[0])
    norm = h.col("grad/norm") if h.has("grad/norm") else np.ones_like(loss)
    finite &= np.isfinite(norm) & (norm > 0)
    rows_before = np.flatnonzero(finite[:start])[-width:]
    rows_after = change.row + 1 + np.flatnonzero(finite[change.row + 1 :])[:width]
    if rows_before.size < th.min_steps or rows_after.size < th.min_steps:
        return None
    level, now = float(np.median(loss[rows_before])), float(np.median(loss[rows_after]))
    if not now > DIVERGED_LOSS_FACTOR * level:
        return None
    if h.has("grad/norm"):
        per_norm = loss / norm
        if not np.median(per_norm[rows_after]) > DIVERGED_LOSS_PER_NORM_FACTOR * np.median(per_norm[rows_before]):
            return None
    return level, now, int(h.steps[start])


def _diverged_cause(h: History, th: Thresholds, changes: list[_LastingChange]) -> str | None:
    """The cause 'learning rate too high / diverged', with the loss before and after,
    for the first of ``changes`` whose loss rose (:func:`_loss_rise`); None if none did."""
    for change in changes:
        rise = _loss_rise(h, th, change)
        if rise is not None:
            return (
                f"learning rate too high / diverged: the loss after the re-baseline {change.rebaselined} is "
                f"{rise[1] / rise[0]:.3g}x its level before the spikes began at step {rise[2]} (median "
                f"{rise[0]:.4g} -> {rise[1]:.4g}); the guard took the diverged level as the new normal"
            )
    return None


DIVERGED_MITIGATION = (
    "restore a checkpoint from before the run of spikes and lower the learning rate (check the schedule and any "
    "learning-rate multiplier around that step)"
)


def _lasting_change_cause(changes: list[_LastingChange]) -> str:
    first, more = changes[0], changes[1:]
    cause = (
        f"a lasting change of the gradient's scale {first.started()} (planned: unfreezing layers, a new dataset, a "
        f"loss-weight change, summed accumulation), which the guard took as the new level {first.rebaselined}"
    )
    if more:
        cause += f"; {len(more)} more: " + ", ".join(f"{c.started()} (taken {c.rebaselined})" for c in more)
    return cause


def _lasting_changes(h: History, th: Thresholds) -> list[_LastingChange]:
    """The runs of spikes that ended in a re-baseline of the guard's window and after
    which the run trained on: ``grad/num_rebaselines`` grew on a row that is part of a
    run of spike (or skipped) rows, or right after one, or whose ``grad/num_spikes``
    grew too (the run fell between logged rows), and none of the next ``min_steps``
    gradient rows (at least one) was skipped. An accepted row whose spike score is at
    least ``sqrt(spike_score)`` stays in the run, as the guard's run goes on through a
    step that is not near the baseline (a change just past the threshold). A re-baseline
    after a run of dips, or announced by ``gh.rebaseline``, is no such run (no spike led
    to it)."""
    if not (h.has("grad/norm") and h.has("grad/num_rebaselines")):
        return []
    grew = np.nan_to_num(cols.counter_increments(h, "grad/num_rebaselines"), nan=0.0)
    if not grew.any():
        return []
    spikes, score, _ = _spike_rows(h, th)
    finite, skipped, _ = row_masks(h)
    member = spikes | skipped | (finite & (score >= math.sqrt(th.spike_score)))
    if h.has("grad/spiked"):
        member |= h.col("grad/spiked") == 1
    gradient = np.flatnonzero(_judged_rows(h))
    spike_growth = (
        np.nan_to_num(cols.counter_increments(h, "grad/num_spikes"), nan=0.0)
        if h.has("grad/num_spikes")
        else np.zeros(len(h))
    )
    skip_growth = (
        np.nan_to_num(cols.counter_increments(h, "grad/num_skipped"), nan=0.0)
        if h.has("grad/num_skipped")
        else np.zeros(len(h))
    )
    consecutive = h.col("grad/consecutive_spikes") if h.has("grad/consecutive_spikes") else None
    counter_rows = np.flatnonzero(np.isfinite(h.col("grad/num_rebaselines")))
    steps = h.steps
    out = []
    for row in np.flatnonzero(grew > 0):
        at = int(np.searchsorted(gradient, row))
        if at >= gradient.size or gradient[at] != row:
            continue
        first = at if member[row] else at - 1
        if first < 0 or not member[gradient[first]]:
            if not (member[row] or spike_growth[row] > 0):
                continue  # a run of dips, or gh.rebaseline: no spike led to it
            first = at
        else:
            while first > 0 and member[gradient[first - 1]]:
                first -= 1
        after = gradient[at + 1 : at + 1 + th.min_steps]
        if not after.size or skipped[after].any() or (skip_growth[after] > 0).any():
            continue  # it did not train on (yet)
        run = gradient[first : at + 1]
        starts = [int(steps[r]) for r in run if member[r]]
        if consecutive is not None:
            starts += [int(steps[r] - consecutive[r] + 1) for r in run if consecutive[r] > 0]
        before = counter_rows[counter_rows < row]
        exact = bool(before.size) and int(steps[before[-1]]) == int(steps[row]) - 1
        out.append(_LastingChange(min(starts) if starts else None, int(run[0]), int(row), exact, int(steps[row])))
    return out


#: The memorisation pattern (:func:`_memorising`): spikes recurring over at least this
#: many steps, ...
MEMORISE_SPAN = 200
#: ... at least this fraction of their runs one or two rows long, ...
MEMORISE_ISOLATED = 0.75
#: ... the accepted steps' loss at most this fraction of the initial loss (the model fits
#: the rest of the data), ...
MEMORISE_LOSS_FRACTION = 0.05
#: ... and the spike steps' loss at least this many times the accepted steps' before them.
MEMORISE_SPIKE_LOSS = 3.0

MEMORISE_CAUSE = (
    "hard or mislabelled examples the model has not fit yet (a small dataset seen many times): a skipped one stays "
    "unlearned and spikes again each time it comes back (the guard clips a spike that recurs among accepted steps, "
    "but skips the first of a while and every spike of a run, and such runs reset the momentum)"
)
MEMORISE_MITIGATION = (
    "gh.guard(spike_action='clip', reset_after=None): clip those steps to the spike bound instead of skipping them, "
    "so the examples are learned and the momentum is kept (compare with a spike_action='record' twin if unsure)"
)


def _spike_runs(flags: np.ndarray) -> np.ndarray:
    """The lengths of the runs of consecutive True values, in order."""
    padded = np.concatenate([[False], np.asarray(flags, bool), [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return edges[1::2] - edges[::2]


def _memorising(h: History, th: Thresholds, spikes: np.ndarray) -> dict | None:
    """The evidence of spikes from examples the model has not fit yet in a small dataset
    it sees many times, or None: at least ``min_steps`` spike rows, from the first to the
    last at least :data:`MEMORISE_SPAN` steps apart; at least :data:`MEMORISE_ISOLATED`
    of their runs (consecutive judged rows) one or two rows long; the median logged
    ``loss`` of the accepted rows between the first and the last spike at most
    :data:`MEMORISE_LOSS_FRACTION` of the initial loss (the median of the first 10 finite
    values): the model fits the rest; and the median, over the spike rows, of the spike's
    loss over the median loss of the accepted rows among the 20 rows before it at least
    :data:`MEMORISE_SPIKE_LOSS` (the spike steps hold examples with a high loss, not a
    gradient fault on ordinary ones). Also tells (``explains_all``) whether every run is
    at most 3 rows long, no gradient was non-finite and the accepted loss over the last
    quarter of the judged rows from the first spike on (spike rows included: a skipped
    example's loss is still the model's) is at most :data:`DIVERGED_LOSS_FACTOR` times
    its median over the 100 judged rows before it (no loss jump)."""
    if not h.has("loss") or spikes.sum() < th.min_steps:
        return None
    steps, loss = h.steps, h.col("loss")
    rows = np.flatnonzero(spikes)
    if steps[rows[-1]] - steps[rows[0]] < MEMORISE_SPAN:
        return None
    judged = _judged_rows(h)
    runs = _spike_runs(spikes[judged])
    isolated = float((runs <= 2).mean())
    _, _, accepted = row_masks(h)
    accepted &= np.isfinite(loss)
    finite = loss[np.isfinite(loss)]
    inside = accepted.copy()
    inside[: rows[0]] = inside[rows[-1] :] = False
    if isolated < MEMORISE_ISOLATED or finite.size < th.min_steps or inside.sum() < th.min_steps:
        return None
    initial, fitted = float(np.median(finite[:10])), float(np.median(loss[inside]))
    ratios = []
    for row in rows:
        before = np.flatnonzero(accepted[max(row - 20, 0) : row])
        if before.size and np.isfinite(loss[row]):
            level = float(np.median(loss[max(row - 20, 0) + before]))
            if level > 0:  # a loss of exactly 0 (fitted to the last bit) gives no ratio
                ratios.append(loss[row] / level)
    if not ratios or not initial > 0 or fitted > MEMORISE_LOSS_FRACTION * initial:
        return None
    spike_loss = float(np.median(ratios))
    if not spike_loss >= MEMORISE_SPIKE_LOSS:
        return None
    logged = judged & np.isfinite(loss)  # the spike rows too: skipping them does not make their loss go away
    earlier = np.flatnonzero(logged[: rows[0]])[-100:]
    later = np.flatnonzero(logged[rows[0] :])
    later = rows[0] + later[later.size - max(later.size // 4, 1) :] if later.size else later
    jump = (
        earlier.size >= th.min_steps
        and later.size > 0
        and float(np.median(loss[later])) > DIVERGED_LOSS_FACTOR * float(np.median(loss[earlier]))
    )
    nonfinite = bool((cols.nonfinite_rows(h) & judged).any()) or cols.counter_total(h, "grad/num_nonfinite") > 0
    return {
        "isolated_run_fraction": round(isolated, 6),
        "longest_run": int(runs.max()),
        "initial_loss": round(initial, 6),
        "accepted_loss_median": round(fitted, 6),
        "spike_loss_ratio": round(spike_loss, 6),
        "loss_jump": bool(jump),
        "explains_all": bool(runs.max() <= 3 and not nonfinite and not jump),
    }


def _as_memorising(h: History, th: Thresholds, finding: Finding, spikes: np.ndarray) -> Finding:
    """``finding`` (an explosion) with the memorisation pattern (:func:`_memorising`)
    named first in its causes and mitigations, and its evidence under ``memorising``; a
    warning when that pattern explains every spike and no lasting change of scale is
    among them. Unchanged when the pattern is absent."""
    found = _memorising(h, th, spikes)
    if found is None:
        return finding
    every = found["explains_all"] and "lasting_change_steps" not in finding.evidence
    fitted, share = found["accepted_loss_median"], found["accepted_loss_median"] / found["initial_loss"]
    said = (
        f"isolated spikes recurring while the model fits the rest (accepted loss {fitted:.3g}, {share:.2%} of the "
        f"initial; the spike steps' {found['spike_loss_ratio']:.3g}x it): examples it has not fit yet"
    )
    return dataclasses.replace(
        finding,
        severity="warning" if every else finding.severity,
        summary=f"{finding.summary}; {said}",
        evidence={**finding.evidence, "memorising": found},
        causes=(MEMORISE_CAUSE, *finding.causes),
        mitigations=(MEMORISE_MITIGATION, *finding.mitigations),
    )


def check_explosion(h: History, th: Thresholds) -> list[Finding]:
    """Spikes by the guard's rule: on its logged scores, or replayed on the norms. Spikes
    of a run that ended in a re-baseline of the guard's window, after which the run
    trained on (:func:`_lasting_changes`), are named as a lasting change of scale first;
    when every spike is one of them, the finding is a warning. Isolated spikes recurring
    while the model fits the rest of a small dataset (:func:`_memorising`) are named
    first as examples not fit yet, a warning when that explains every spike."""
    if not h.has("grad/norm"):
        return []
    steps, norm = h.steps, h.col("grad/norm")
    finite, _, _ = row_masks(h)
    spikes, score, source = _spike_rows(h, th)
    # Spikes the guard counted (grad/num_spikes) that no logged row shows: with
    # MetricLogger(log_every=N) they fell between logged rows.
    own = h.col("grad/spiked") == 1 if h.has("grad/spiked") else spikes
    extra = _unlogged_extra(h, "grad/num_spikes", own)
    hidden, first_seen = (int(extra.sum()), int(steps[np.argmax(extra > 0)])) if extra.any() else (0, None)
    if not spikes.any():
        if not hidden:
            return []
        evidence = {
            "num_spikes_counter": cols.counter_total(h, "grad/num_spikes"),
            "spikes_between_logged_steps": hidden,
            "first_seen_step": first_seen,
        }
        summary = f"{hidden} spike(s) between logged steps (counter only, first seen at step {first_seen})"
        return [_as_lasting_change(h, th, EXPLOSION.finding(summary, (), evidence), spikes, extra)]
    worst = int(np.argmax(np.where(spikes, score, -np.inf)))
    evidence = {
        "spike_steps": int(spikes.sum()),
        "max_spike_score": float(score[worst]),
        "threshold": th.spike_score,
        "norm_at_max": float(norm[worst]),
        "median_norm": float(np.median(norm[finite])),
        "score_source": source,
    }
    if h.has("grad/num_spikes"):
        evidence["num_spikes_counter"] = cols.counter_total(h, "grad/num_spikes")
    if h.has("grad/num_momentum_resets") and np.isfinite(h.col("grad/num_momentum_resets")).any():
        # The guard's counter: resets between logged rows count, as spikes do.
        evidence["momentum_resets"] = cols.counter_total(h, "grad/num_momentum_resets")
    elif h.has("grad/momentum_reset"):
        evidence["momentum_resets"] = int((h.col("grad/momentum_reset") == 1).sum())
    layer = cols.largest_layer_jump(h, worst)
    if layer is not None:
        evidence["largest_layer_jump"] = layer[0]
        evidence["layer_jump_ratio"] = layer[1]
    summary = (
        f"{int(spikes.sum())} spike(s) with spike score > {th.spike_score:g} (max {score[worst]:.3g} "
        f"at step {int(steps[worst])})"
    )
    if hidden:
        evidence["spikes_between_logged_steps"] = hidden
        summary += f"; {hidden} more between logged steps (the guard's counter: {evidence['num_spikes_counter']})"
    finding = _as_lasting_change(h, th, EXPLOSION.finding(summary, steps[spikes], evidence), spikes, extra)
    return [_as_memorising(h, th, finding, spikes)]


def _as_lasting_change(h: History, th: Thresholds, finding: Finding, spikes: np.ndarray, extra: np.ndarray) -> Finding:
    """``finding`` (an explosion) with the lasting changes of scale among its spikes
    (:func:`_lasting_changes`) named first in its causes and mitigations, and said in its
    summary and evidence; a warning, with causes and mitigations of its own, when every
    spike (logged or between logged rows) is one of them. When the logged loss after a
    re-baseline is far above its level before the run (:func:`_loss_rise`), 'learning
    rate too high / diverged' is named first instead and the severity is kept.
    Unchanged when none is."""
    changes = _lasting_changes(h, th)
    if not changes:
        return finding
    explained = np.zeros(len(h), bool)
    for change in changes:
        explained[change.first_row : change.row + 1] = True
    every = not (spikes & ~explained).any() and not extra[~explained].any()
    first = changes[0]
    began = f"from step {first.start}" if first.start is not None else first.started()
    said = (
        f"the run of spikes {began} ended when the guard took the new level {first.rebaselined}, and it trained on "
        "without a skip: a lasting change of scale"
    )
    if len(changes) > 1:
        said += f" ({len(changes)} such runs)"
    evidence = {
        **finding.evidence,
        "lasting_change_steps": [c.start for c in changes],
        "rebaselined_steps": [c.step for c in changes],
        "num_rebaselines_counter": cols.counter_total(h, "grad/num_rebaselines"),
        "spikes_of_lasting_changes": int((spikes & explained).sum() + extra[explained].sum()),
    }
    cause = _lasting_change_cause(changes)
    diverged = _diverged_cause(h, th, changes)
    if diverged is not None:  # the loss rose far above its level: not a planned change, and still an error
        evidence["diverged"] = True
        return dataclasses.replace(
            finding,
            summary=f"{finding.summary}; {said}, but the loss after it is far above its level before",
            evidence=evidence,
            causes=(diverged, *finding.causes, cause),
            mitigations=(DIVERGED_MITIGATION, *finding.mitigations, LASTING_CHANGE_MITIGATION),
        )
    if every:
        causes = (
            cause,
            "an unplanned change that lasted: a fault present on every batch since then (a data source in other "
            "units, a loss or masking bug), which the guard now takes as normal",
            "a learning-rate spike or another bad update just before the run, which threw the parameters where the "
            "gradients are larger (the loss jumped at the start of the run)",
        )
        mitigations = (
            LASTING_CHANGE_MITIGATION,
            "if not planned, find what changed at that step (the data, the loss, the model) before training on",
            "if the loss jumped at the start of the run, restore a checkpoint from before it: the update that "
            "caused it was applied",
            "a loop that restores a checkpoint on grad/rollback_recommended goes back before the change: "
            "announce a planned one with gh.rebaseline instead",
        )
        return dataclasses.replace(
            finding,
            severity="warning",
            summary=f"{finding.summary}; {said}",
            evidence=evidence,
            causes=causes,
            mitigations=mitigations,
        )
    return dataclasses.replace(
        finding,
        summary=f"{finding.summary}; some of them {said}",
        evidence=evidence,
        causes=(cause, *finding.causes),
        mitigations=(LASTING_CHANGE_MITIGATION, *finding.mitigations),
    )


def _unlogged_extra(h: History, name: str, own: np.ndarray) -> np.ndarray:
    """Per row: how much the counter ``name`` grew beyond the row's own flag (``own``):
    the events between logged rows, counted on the row that first logs them; 0 where
    none, and on every row when the counter is not logged. Growth is judged between
    consecutive logged values, the first against 0, a reset or a restore of the guard's
    state as :func:`~optax_gradhealth.diagnosis._columns.counter_increments` judges it."""
    extra = np.zeros(len(h))
    if not h.has(name):
        return extra
    increments = cols.counter_increments(h, name)
    logged = np.flatnonzero(np.isfinite(increments))
    extra[logged] = np.maximum(increments[logged] - own[logged], 0.0)
    return extra


VANISHING = Pattern(
    "vanishing",
    "vanishing gradients (everywhere, or in some layers: early layers far below late ones)",
    "warning",
    (
        "poor weight initialisation (too small, saturated activations)",
        "fp16 underflow of small gradients",
        "an architectural bottleneck (deep post-LN stacks, sigmoid/tanh saturation)",
    ),
    (
        "re-scale the initialisation (e.g. muP-style), add normalisation or residual paths",
        "use bf16 or float32, or raise the loss scale",
        "check that the loss actually depends on the parameters (stop_gradient, detached branches)",
        "fix the architecture before tuning the learning rate: the small leaves' updates are small because "
        "their gradients are",
    ),
)


def _stuck_loss_rows(h: History, th: Thresholds) -> tuple[np.ndarray, float] | None:
    """``(rows, initial loss)``: the rows whose loss is still at least
    ``vanishing_loss_fraction`` of the initial loss (median of the first 10 finite
    losses), when the loss at the end (median of the last 10) is too; None without a
    loss column or when the loss fell below that (training progressed)."""
    if not h.has("loss"):
        return None
    loss = h.col("loss")
    finite = loss[np.isfinite(loss)]
    if not finite.size:
        return None
    initial, final = float(np.median(finite[:10])), float(np.median(finite[-10:]))
    limit = th.vanishing_loss_fraction * initial
    if not final >= limit:
        return None
    return np.isfinite(loss) & (loss >= limit), initial


def _vanishing_leaves(h: History, th: Thresholds) -> tuple[dict[str, float], str, float, np.ndarray] | None:
    """``({leaf: median norm}, largest leaf, its median, judged rows)`` of the leaves
    whose median ``grad/leaf_norm/<path>`` over the accepted rows after warm-up (where
    the loss is stuck, :func:`_stuck_loss_rows`) is more than ``vanishing_layer_ratio``
    times below the largest leaf's; None when none is, when fewer than
    ``vanishing_leaf_fraction`` of the leaves are, or when not judged. Leaves whose
    median is exactly 0 are left out (``dead_leaf`` judges them)."""
    names = h.leaf_names()
    stuck = _stuck_loss_rows(h, th) if names and h.has("grad/norm") else None
    if stuck is None:
        return None
    rows = stuck[0] & row_masks(h)[2] & cols.after_warmup(h, th)
    if rows.sum() < th.min_steps:
        return None
    medians = {}
    for name in names:
        values = h.col(f"grad/leaf_norm/{name}")[rows]
        values = values[np.isfinite(values)]
        median = float(np.median(values)) if values.size >= th.min_steps else 0.0
        if median > 0:
            medians[name] = median
    if len(medians) < 2:
        return None
    largest = max(medians, key=medians.get)
    limit = medians[largest] / th.vanishing_layer_ratio
    small = {name: m for name, m in sorted(medians.items(), key=lambda kv: kv[1]) if m < limit}
    if not small or len(small) < th.vanishing_leaf_fraction * len(medians):
        return None
    return small, largest, medians[largest], rows


def check_vanishing(h: History, th: Thresholds) -> list[Finding]:
    """Tiny finite norms while the loss (if logged) is still high; or, with per-leaf
    norms and a loss that is stuck, leaves whose median norm is more than
    ``vanishing_layer_ratio`` below the largest leaf's (early layers starved while the
    last ones dominate the global norm)."""
    if not h.has("grad/norm"):
        return []
    layers = _vanishing_leaves(h, th)
    found = _vanishing_global(h, th)
    if layers is None:
        return found
    small, largest, top, rows = layers
    shown = ", ".join(f"{name} ({value:.2g})" for name, value in list(small.items())[:5])
    more = f" and {len(small) - 5} more" if len(small) > 5 else ""
    evidence = {
        "leaves": list(small),
        "median_leaf_norms": list(small.values()),
        "largest_leaf": largest,
        "largest_median_norm": top,
        "layer_ratio": top / min(small.values()),
        "threshold_ratio": th.vanishing_layer_ratio,
        "steps_judged": int(rows.sum()),
    }
    summary = (
        f"{len(small)} leaf(s) with a median gradient norm over {th.vanishing_layer_ratio:g}x below the largest "
        f"({largest}, {top:.2g}) while the loss is stuck (>= {th.vanishing_loss_fraction:g} x initial): "
        f"{shown}{more}"
    )
    if found:  # the global norm is tiny too: one finding with both
        first = found[0]
        merged = {**first.evidence, **{f"layers_{k}": v for k, v in evidence.items()}}
        return [VANISHING.finding(f"{first.summary}; {summary}", first.steps, merged)]
    return [VANISHING.finding(summary, h.steps[rows], evidence)]


def _vanishing_global(h: History, th: Thresholds) -> list[Finding]:
    """Tiny finite norms (below ``vanishing_norm``) while the loss (if logged) is still high."""
    steps, norm = h.steps, h.col("grad/norm")
    finite, _, _ = row_masks(h)
    tiny = finite & (norm < th.vanishing_norm)
    loss_note = "no loss logged"
    if h.has("loss"):
        loss = h.col("loss")
        first_losses = loss[np.isfinite(loss)][:10]
        if first_losses.size:
            initial = float(np.median(first_losses))
            tiny &= np.isfinite(loss) & (loss >= th.vanishing_loss_fraction * initial)
            loss_note = f"loss >= {th.vanishing_loss_fraction:g} x initial {initial:.4g}"
    if tiny.sum() < th.vanishing_min_steps:
        return []
    evidence = {
        "vanishing_steps": int(tiny.sum()),
        "median_norm_there": float(np.median(norm[tiny])),
        "threshold": th.vanishing_norm,
        "condition": loss_note,
    }
    summary = f"{int(tiny.sum())} step(s) with norm < {th.vanishing_norm:g} ({loss_note})"
    return [VANISHING.finding(summary, steps[tiny], evidence)]


OSCILLATION = Pattern(
    "oscillation",
    "persistent oscillation of the gradient norm",
    "warning",
    (
        "batch too small: the gradient is dominated by sample noise",
        "learning rate at the edge of stability",
    ),
    (
        "increase the batch size (or accumulate gradients) or lower the learning rate",
        "extend the warm-up",
    ),
)


def check_oscillation(h: History, th: Thresholds) -> list[Finding]:
    """Frequent large swings between consecutive finite norms after warm-up (judged from
    the norms only when the direction, ``grad/step_cosine``, was not logged: with it,
    ``direction_oscillation`` judges the steps themselves), while the loss (if logged)
    is not improving: not reported when the median loss of the last quarter of the
    judged rows is below ``oscillation_loss_fraction`` of the first quarter's (near its
    noise floor a minibatch gradient's norm swings by 2x on a healthy run)."""
    if not h.has("grad/norm") or h.has("grad/step_cosine"):
        return []
    steps, norm = h.steps, h.col("grad/norm")
    finite, _, _ = row_masks(h)
    usable = finite & cols.after_warmup(h, th) & (norm > 0)
    pair = usable[1:] & usable[:-1]
    if pair.sum() < th.min_steps:
        return []
    ratio = np.abs(np.log(norm[1:][pair] / norm[:-1][pair]))
    swings = ratio > math.log(th.oscillation_ratio)
    fraction = float(swings.mean())
    if fraction < th.oscillation_fraction:
        return []
    values = norm[usable]
    evidence = {
        "swing_fraction": fraction,
        "threshold_fraction": th.oscillation_fraction,
        "norm_cv": float(np.std(values) / np.mean(values)),
        "steps_judged": int(pair.sum()),
    }
    if h.has("loss"):
        loss = h.col("loss")[usable]
        loss = loss[np.isfinite(loss)]
        if loss.size >= 4:
            quarter = loss.size // 4
            first, last = float(np.median(loss[:quarter])), float(np.median(loss[-quarter:]))
            if last < th.oscillation_loss_fraction * first:
                return []  # the loss keeps falling: the swings are minibatch noise
            evidence["loss_first_quarter"], evidence["loss_last_quarter"] = first, last
    summary = f"{fraction:.0%} of steps change the norm by more than {th.oscillation_ratio:g}x"
    return [OSCILLATION.finding(summary, steps[1:][pair][swings], evidence)]


DIRECTION_OSCILLATION = Pattern(
    "direction_oscillation",
    "consecutive steps undo each other (the gradient's direction reverses)",
    "warning",
    (
        "learning rate too high: each step overshoots across a sharp valley",
        "a batch so small that consecutive gradients are mostly noise of opposite signs",
    ),
    (
        "lower the learning rate (or lengthen the warm-up)",
        "increase momentum or the batch size (or accumulate gradients) to smooth the direction",
    ),
)


def _cosines_after_warmup(h: History, th: Thresholds) -> tuple[np.ndarray, np.ndarray] | None:
    if not h.has("grad/step_cosine"):
        return None
    cosine = h.col("grad/step_cosine")
    rows = cols.after_warmup(h, th) & np.isfinite(cosine)
    if h.has("grad/skipped"):
        rows &= h.col("grad/skipped") != 1
    rows &= ~_overflowed(h)
    if rows.sum() < th.min_steps:
        return None
    return cosine, rows


def check_direction_oscillation(h: History, th: Thresholds) -> list[Finding]:
    """The step-to-step cosine is below ``direction_negative`` on at least
    ``direction_oscillation_fraction`` of the accepted steps after warm-up."""
    found = _cosines_after_warmup(h, th)
    if found is None:
        return []
    cosine, rows = found
    reversed_ = rows & (cosine < th.direction_negative)
    fraction = float(reversed_.sum() / rows.sum())
    if fraction < th.direction_oscillation_fraction:
        return []
    evidence = {
        "reversal_fraction": fraction,
        "median_step_cosine": float(np.median(cosine[rows])),
        "threshold": th.direction_negative,
        "steps_judged": int(rows.sum()),
    }
    summary = (
        f"the step-to-step cosine is below {th.direction_negative:g} on {fraction:.0%} of steps "
        f"(median {evidence['median_step_cosine']:.3g})"
    )
    return [DIRECTION_OSCILLATION.finding(summary, h.steps[reversed_], evidence)]


DIRECTION_DRIFT = Pattern(
    "direction_drift",
    "the gradient's direction barely changes from step to step (a slow drift)",
    "info",
    (
        "a learning rate low enough that the parameters crawl along one direction",
        "a very large batch (little noise) on a smooth stretch of the loss",
    ),
    (
        "try a larger learning rate (the direction is consistent enough to take longer steps)",
        "compare the batch with the noise scale (grad/noise_scale or xdev/noise_scale)",
    ),
)


def check_direction_drift(h: History, th: Thresholds) -> list[Finding]:
    """The median step-to-step cosine after warm-up is above ``direction_drift_cosine``."""
    found = _cosines_after_warmup(h, th)
    if found is None:
        return []
    cosine, rows = found
    median = float(np.median(cosine[rows]))
    if median <= th.direction_drift_cosine:
        return []
    evidence = {"median_step_cosine": median, "threshold": th.direction_drift_cosine, "steps_judged": int(rows.sum())}
    summary = f"median step-to-step cosine {median:.3g} over {int(rows.sum())} steps"
    return [DIRECTION_DRIFT.finding(summary, (), evidence)]


UPDATE_RATIO_HIGH = Pattern(
    "update_ratio_high",
    "updates large against their parameters (update/param ratio far above the usual 1e-4 to 1e-2)",
    "warning",
    (
        "a learning rate too high for these leaves",
        "a small initialisation, or weights decayed close to 0, that every step dwarfs",
        "no learning-rate warm-up: Adam's first steps are the largest relative to the weights",
    ),
    (
        "lower the learning rate, or give these leaves their own (optax.multi_transform)",
        "lengthen the learning-rate warm-up",
        "check these leaves' initialisation scale",
    ),
)
UPDATE_RATIO_LOW = Pattern(
    "update_ratio_low",
    "updates too small to move their parameters (update/param ratio far below the usual 1e-4 to 1e-2)",
    "warning",
    (
        "a learning rate too low for these leaves, or a schedule that decayed it to ~0",
        "gradients vanishing in these leaves (see grad/leaf_norm/<path>)",
        "weights grown very large (weight decay too weak)",
    ),
    (
        "raise the learning rate for these leaves (optax.multi_transform), or check the schedule's end value",
        "look at these leaves' gradient norms: a vanishing gradient needs a fix in the model, not the optimizer",
    ),
)
DEAD_LEAF = Pattern(
    "dead_leaf",
    "leaves that never change or never get a gradient (update/param ratio or gradient norm 0 on every step)",
    "warning",
    (
        "a dead layer: its gradient is exactly 0 (dead ReLUs, a detached branch, a parameter the loss never uses); "
        "under decoupled weight decay (adamw) the leaf still moves, shrunk by the decay alone",
        "frozen on purpose (optax.set_to_zero, optax.multi_transform): then nothing is wrong",
        "a parameter still exactly 0, whose ratio is undefined (recorded 0), that nothing moves",
    ),
    (
        "check that the leaf is used in the loss and that gradients reach it (grad/leaf_norm/<path> is 0 too)",
        "for dead ReLUs: a lower learning rate, a better initialisation, or a leaky activation",
    ),
)

_RATIO_PREFIX = "update/leaf_param_ratio/"
_ALL_PARAMETERS = "(all parameters)"


def _update_ratios(h: History, th: Thresholds) -> tuple[dict[str, np.ndarray], np.ndarray] | None:
    """``({leaf: ratios}, judged rows)`` from the guard's update health: per leaf when
    logged, else the global ratio as one "leaf". None when not logged, when too few
    accepted rows follow the warm-up, or when the parameters were never passed to the
    guard (``param/norm`` 0 on every row: the ratios are 0 because unknown)."""
    names = sorted(n[len(_RATIO_PREFIX) :] for n in h.columns if n.startswith(_RATIO_PREFIX) and "#" not in n)
    ratios = {name: h.col(_RATIO_PREFIX + name) for name in names}
    if not ratios and h.has("update/param_ratio"):
        ratios = {_ALL_PARAMETERS: h.col("update/param_ratio")}
    if not ratios or (h.has("param/norm") and not np.any(h.col("param/norm") > 0)):
        return None
    rows = cols.after_warmup(h, th)
    if h.has("grad/norm"):
        rows &= row_masks(h)[2]
    elif h.has("grad/skipped"):
        rows &= h.col("grad/skipped") != 1
    rows &= ~_overflowed(h)
    for values in ratios.values():
        rows &= np.isfinite(values)
    if rows.sum() < th.min_steps:
        return None
    return ratios, rows


def _ratio_finding(pattern: Pattern, h: History, leaves: dict[str, float], rows: np.ndarray, limit: float):
    shown = ", ".join(f"{name} ({value:.2g})" for name, value in list(leaves.items())[:5])
    more = f" and {len(leaves) - 5} more" if len(leaves) > 5 else ""
    evidence = {
        "leaves": list(leaves),
        "median_ratios": [float(v) for v in leaves.values()],
        "threshold": limit,
        "steps_judged": int(rows.sum()),
    }
    summary = f"{len(leaves)} leaf(s), median ratio over {int(rows.sum())} steps: {shown}{more}"
    return [pattern.finding(summary, h.steps[rows], evidence)]


def check_update_ratio_high(h: History, th: Thresholds) -> list[Finding]:
    """Leaves whose median update/param ratio after warm-up exceeds ``update_ratio_high``."""
    found = _update_ratios(h, th)
    if found is None:
        return []
    ratios, rows = found
    medians = {name: float(np.median(values[rows])) for name, values in ratios.items()}
    high = {name: m for name, m in sorted(medians.items(), key=lambda kv: -kv[1]) if m > th.update_ratio_high}
    return _ratio_finding(UPDATE_RATIO_HIGH, h, high, rows, th.update_ratio_high) if high else []


def check_update_ratio_low(h: History, th: Thresholds) -> list[Finding]:
    """Leaves that do move (a non-zero ratio on some judged step) but whose median
    update/param ratio after warm-up is below ``update_ratio_low``."""
    found = _update_ratios(h, th)
    if found is None:
        return []
    ratios, rows = found
    medians = {name: float(np.median(v[rows])) for name, v in ratios.items() if np.any(v[rows] > 0)}
    low = {name: m for name, m in sorted(medians.items(), key=lambda kv: kv[1]) if m < th.update_ratio_low}
    if low:
        # Leaves without a gradient (dead_leaf) or whose gradient vanishes (vanishing)
        # are slow because of the gradient, not the learning rate: reported there.
        explained = set(_zero_gradient_leaves(h, th)[0])
        vanishing = _vanishing_leaves(h, th)
        if vanishing is not None:
            explained |= set(vanishing[0])
        low = {name: m for name, m in low.items() if name not in explained}
    return _ratio_finding(UPDATE_RATIO_LOW, h, low, rows, th.update_ratio_low) if low else []


def _zero_gradient_leaves(h: History, th: Thresholds) -> tuple[list[str], np.ndarray]:
    """``(leaves, judged rows)``: the leaves whose ``grad/leaf_norm/<path>`` is exactly 0
    on every accepted row after warm-up (at least ``min_steps`` of them, each logged)."""
    names = h.leaf_names()
    if not names or not h.has("grad/norm"):
        return [], np.zeros(len(h), bool)
    rows = row_masks(h)[2] & cols.after_warmup(h, th)
    dead = []
    for name in names:
        values = h.col(f"grad/leaf_norm/{name}")[rows]
        if values.size >= th.min_steps and np.all(values == 0):
            dead.append(name)
    return dead, rows


def check_dead_leaf(h: History, th: Thresholds) -> list[Finding]:
    """Leaves whose update/param ratio is exactly 0 on every accepted step after warm-up,
    or whose gradient norm (``grad/leaf_norm/<path>``) is: decoupled weight decay moves a
    leaf without a gradient, so its ratio is not 0 (judged without ``params`` too)."""
    found = _update_ratios(h, th)
    ratios, ratio_rows = found if found is not None else ({}, np.zeros(len(h), bool))
    zero_update = [name for name, values in ratios.items() if not np.any(values[ratio_rows] != 0)]
    zero_gradient, grad_rows = _zero_gradient_leaves(h, th)
    leaves = sorted(set(zero_update) | set(zero_gradient))
    if not leaves:
        return []
    moved = [name for name in zero_gradient if name in ratios and name not in zero_update]
    rows = ratio_rows | grad_rows

    def note(name):
        if name in moved:
            return "gradient 0, moved by weight decay alone"
        words = (("update 0", name in zero_update), ("gradient 0", name in zero_gradient))
        return ", ".join(word for word, on in words if on)

    shown = ", ".join(f"{name} ({note(name)})" for name in leaves[:5])
    more = f" and {len(leaves) - 5} more" if len(leaves) > 5 else ""
    evidence = {
        "leaves": leaves,
        "median_ratios": [float(np.median(ratios[n][ratio_rows])) if n in ratios and found else None for n in leaves],
        "zero_update": zero_update,
        "zero_gradient": zero_gradient,
        "moved_by_weight_decay_alone": moved,
        "steps_judged": int(rows.sum()),
    }
    summary = f"{len(leaves)} leaf(s) never changed or got no gradient over {int(rows.sum())} steps: {shown}{more}"
    return [DEAD_LEAF.finding(summary, h.steps[rows], evidence)]


LEAF_CLIP_ALWAYS = Pattern(
    "leaf_clip_always",
    "a per-leaf or per-element clip acts on most of the gradient on most steps: its bound is too tight",
    "warning",
    (
        "the bound (gh.clip_by_leaf_norm's max_norm, gh.adaptive_grad_clip's clipping, gh.adagc_clip's relative, "
        "gh.clip_by_value's max_abs) far below the typical gradient: the clip then acts as a smaller, "
        "per-leaf learning rate",
        "a learning rate or initialisation that makes every gradient large",
    ),
    (
        "raise the bound until the clip acts on a minority of leaves (or elements) on a typical step",
        "for AGC/AdaGC: the relative bound scales with the weights; check it against the paper's setting "
        "for your optimizer",
    ),
)

# (metric, what it is a fraction of) for each clip mode that logs a fraction.
_CLIP_FRACTIONS = (
    ("grad/leaf_clip_fraction", "leaves"),
    ("grad/agc_clip_fraction", "leaves"),
    ("grad/adagc_clip_fraction", "leaves"),
    ("grad/value_clip_fraction", "elements"),
)


def check_leaf_clip_always(h: History, th: Thresholds) -> list[Finding]:
    """A clip mode's clipped fraction (of leaves or elements) has a median of at least
    ``leaf_clip_fraction`` over the accepted rows after warm-up."""
    rows = cols.after_warmup(h, th)
    if h.has("grad/skipped"):
        rows &= h.col("grad/skipped") != 1
    rows &= ~_overflowed(h)
    out = []
    for name, of_what in _CLIP_FRACTIONS:
        if not h.has(name):
            continue
        values = h.col(name)
        judged = rows & np.isfinite(values)
        if judged.sum() < th.min_steps:
            continue
        median = float(np.median(values[judged]))
        if median < th.leaf_clip_fraction:
            continue
        evidence = {
            "metric": name,
            "median_fraction": median,
            "threshold": th.leaf_clip_fraction,
            "steps_judged": int(judged.sum()),
        }
        summary = f"{name}: a median {median:.0%} of the {of_what} clipped per step over {int(judged.sum())} steps"
        out.append(LEAF_CLIP_ALWAYS.finding(summary, h.steps[judged & (values >= th.leaf_clip_fraction)], evidence))
    return out


BATCH_VS_NOISE_SCALE = Pattern(
    "batch_vs_noise_scale",
    "the batch size is far from the gradient noise scale (the most efficient batch, B_simple)",
    "info",
    (
        "a batch far below the noise scale: each step's gradient is mostly noise, and a larger batch would "
        "make nearly proportionally more progress per step",
        "a batch far above the noise scale: the extra examples add little to each step (diminishing returns)",
    ),
    (
        "below: accumulate more micro-batches (gh.accumulate's every_k) or lower the learning rate",
        "above: a smaller batch with more steps trains as well for less compute",
        "the noise scale grows as the loss falls: compare again later in the run",
    ),
)


def check_batch_vs_noise_scale(h: History, th: Thresholds) -> list[Finding]:
    """With ``Thresholds.batch_size`` set: the median noise scale over the last half of
    the finite rows (``grad/noise_scale`` from gh.accumulate, else ``xdev/noise_scale``)
    is more than ``noise_scale_factor`` times the batch, or less than its inverse."""
    if th.batch_size is None:
        return []
    name = "grad/noise_scale" if h.has("grad/noise_scale") else "xdev/noise_scale"
    if not h.has(name):
        return []
    values = h.col(name)
    finite = np.flatnonzero(np.isfinite(values) & (values > 0))
    if finite.size < th.min_steps:
        return []
    late = finite[finite.size // 2 :]
    noise_scale = float(np.median(values[late]))
    ratio = noise_scale / th.batch_size
    if 1.0 / th.noise_scale_factor <= ratio <= th.noise_scale_factor:
        return []
    evidence = {"metric": name, "noise_scale": noise_scale, "batch_size": th.batch_size, "ratio": ratio}
    where = "below" if ratio > 1 else "above"
    summary = f"the batch ({th.batch_size}) is {max(ratio, 1 / ratio):.3g}x {where} the noise scale ({noise_scale:.4g})"
    return [BATCH_VS_NOISE_SCALE.finding(summary, h.steps[late], evidence)]


CLIP_ALWAYS = Pattern(
    "clip_always",
    "clipping on (almost) every step: threshold too low",
    "warning",
    ("max_norm was set far below the typical gradient norm, so clipping acts as a smaller learning rate",),
    (
        "raise max_norm to the suggested value (a high percentile of this run's norms)",
        "or clip adaptively: gh.PercentileClip(95) / gh.ZScoreClip()",
    ),
)
CLIP_NEVER = Pattern(
    "clip_never",
    "clipping never triggers: threshold too high",
    "warning",
    ("max_norm is far above every gradient norm seen, so it cannot stop a spike",),
    (
        "lower max_norm to the suggested value (a high percentile of this run's norms)",
        "or clip adaptively: gh.PercentileClip(95) / gh.ZScoreClip()",
    ),
)


def _clip_calibration(h: History, th: Thresholds) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """``(judged rows, clipped of them, evidence)`` for the clip patterns, or None when
    the history lacks the clip metrics or enough accepted steps after warm-up."""
    if not (h.has("grad/norm") and h.has("grad/clipped") and h.has("grad/clip_threshold")):
        return None
    norm, threshold = h.col("grad/norm"), h.col("grad/clip_threshold")
    finite, _, accepted = row_masks(h)
    after = cols.after_warmup(h, th)
    judged = accepted & after & np.isfinite(threshold)
    if judged.sum() < th.min_steps:
        return None
    clipped = h.col("grad/clipped")[judged] == 1
    calib = norm[finite & after]
    evidence = {
        "clipped_fraction": float(clipped.mean()),
        "median_threshold": float(np.median(threshold[judged])),
        "median_norm": float(np.median(calib)),
        "p99_norm": float(np.percentile(calib, 99)),
        "suggested_max_norm": float(np.percentile(calib, th.clip_suggest_percentile)),
        "suggested_from": f"p{th.clip_suggest_percentile:g} of {calib.size} finite norms after warm-up",
    }
    return judged, clipped, evidence


def check_clip_always(h: History, th: Thresholds) -> list[Finding]:
    """Clipped on at least ``clip_always_fraction`` of the accepted steps after warm-up."""
    calibration = _clip_calibration(h, th)
    if calibration is None:
        return []
    judged, clipped, evidence = calibration
    fraction = evidence["clipped_fraction"]
    if fraction < th.clip_always_fraction:
        return []
    summary = (
        f"clipped on {fraction:.0%} of steps at threshold {evidence['median_threshold']:.4g}; "
        f"suggested max_norm {evidence['suggested_max_norm']:.4g}"
    )
    return [CLIP_ALWAYS.finding(summary, h.steps[judged][clipped], evidence)]


def check_clip_never(h: History, th: Thresholds) -> list[Finding]:
    """Never clipped while the threshold is far above the 99th percentile norm (not
    judged when that percentile is 0, e.g. a frozen model: no ``max_norm`` to suggest)."""
    calibration = _clip_calibration(h, th)
    if calibration is None:
        return []
    _, _, evidence = calibration
    median_threshold, p99 = evidence["median_threshold"], evidence["p99_norm"]
    if evidence["clipped_fraction"] != 0.0 or not p99 > 0 or median_threshold < th.clip_never_margin * p99:
        return []
    summary = (
        f"never clipped; threshold {median_threshold:.4g} is {median_threshold / p99:.3g}x the p99 "
        f"norm; suggested max_norm {evidence['suggested_max_norm']:.4g}"
    )
    return [CLIP_NEVER.finding(summary, (), evidence)]


ROLLBACK = Pattern(
    "rollback",
    "rollback recommended",
    "error",
    (
        "a run of consecutive non-finite steps or spikes: the guard cannot recover by skipping alone",
        "the parameters (or the optimizer moments) are already damaged",
    ),
    (
        "restore the last healthy checkpoint (see docs/logging.md, orbax) and move past the bad data",
        "lower the learning rate after the restore",
    ),
)


def check_rollback(h: History, th: Thresholds) -> list[Finding]:
    """The guard's rollback recommendation (:func:`_check_rollback`), with the
    memorisation pattern's cause and mitigation (:func:`_memorising`) named first when
    the spikes show it (its severity kept)."""
    found = _check_rollback(h, th)
    if not found:
        return found
    memorising = _memorising(h, th, _spike_rows(h, th)[0])
    if memorising is None:
        return found
    return [
        dataclasses.replace(
            f,
            evidence={**f.evidence, "memorising": memorising},
            causes=(MEMORISE_CAUSE, *f.causes),
            mitigations=(MEMORISE_MITIGATION, *f.mitigations),
        )
        for f in found
    ]


def _check_rollback(h: History, th: Thresholds) -> list[Finding]:
    """The guard's rollback recommendation (``grad/rollback_recommended``) was raised. An
    episode that a run of spikes raised and the guard withdrew when it took the run's
    level as the new one, training on after it (:func:`_lasting_changes`), is named as a
    lasting change of scale first; when every episode is one, the finding is a warning
    that does not call the parameters damaged, unless the logged loss after the
    re-baseline is more than :data:`DIVERGED_LOSS_FACTOR` times its level before the run
    (:func:`_loss_rise`): then 'learning rate too high / diverged' is named first and the
    finding stays an error. So it is, too, when the recommendation stood through the
    re-baseline (a guard given ``loss=`` keeps it when the run looks lost) and the loss
    rose so."""
    if not (h.has("grad/norm") and h.has("grad/rollback_recommended")):
        return []
    steps = h.steps
    flag = h.col("grad/rollback_recommended") == 1
    if not flag.any():
        return []
    first_rows = np.flatnonzero(flag & ~np.concatenate([[False], flag[:-1]]))
    starts = steps[first_rows]
    summary = f"the guard recommended a rollback at step {int(starts[0])}" + (
        f" ({len(starts)} episodes)" if len(starts) > 1 else ""
    )
    finding = ROLLBACK.finding(summary, starts, {"episodes": len(starts), "flagged_steps": int(flag.sum())})
    # Episodes raised within a lasting change's run and withdrawn by its re-baseline: the
    # flag is down on the re-baseline's row or the next logged one.
    logged = np.flatnonzero(np.isfinite(h.col("grad/rollback_recommended")))
    withdrawn: dict[int, _LastingChange] = {}
    kept: list[_LastingChange] = []
    for change in _lasting_changes(h, th):
        if flag[logged[logged >= change.row][:2]].all():
            # still raised: not by this run alone (a non-finite run holds it), an older
            # guard's log, or a guard given the loss that judged the run lost (a diverged model)
            kept.append(change)
            continue
        for start in first_rows[(first_rows >= change.first_row) & (first_rows <= change.row)]:
            withdrawn[int(start)] = change
    if not withdrawn:
        diverged = _diverged_cause(h, th, kept) if kept else None
        if diverged is None:
            return [finding]
        evidence = {**finding.evidence, "diverged": True, "rebaselined_steps": [c.step for c in kept]}
        return [
            dataclasses.replace(
                finding,
                summary=f"{summary}; it stood through the re-baseline {kept[0].rebaselined}: the loss after it is "
                "far above its level before, the run diverged",
                evidence=evidence,
                causes=(diverged, *finding.causes, _lasting_change_cause(kept)),
                mitigations=(DIVERGED_MITIGATION, *finding.mitigations, LASTING_CHANGE_MITIGATION),
            )
        ]
    changes = list(dict.fromkeys(withdrawn.values()))
    said = ", ".join(f"at step {int(steps[r])} withdrawn {c.rebaselined}" for r, c in withdrawn.items())
    evidence = {
        **finding.evidence,
        "withdrawn_episodes": len(withdrawn),
        "lasting_change_steps": [c.start for c in changes],
        "rebaselined_steps": [c.step for c in changes],
    }
    cause = _lasting_change_cause(changes)
    diverged = _diverged_cause(h, th, changes)
    if diverged is not None:  # the loss rose far above its level: the withdrawal does not make it healthy
        evidence["diverged"] = True
        return [
            dataclasses.replace(
                finding,
                summary=f"{summary}; {len(withdrawn)} of them {said}, by a lasting change of scale, but the loss "
                "after it is far above its level before: the run diverged",
                evidence=evidence,
                causes=(diverged, *finding.causes, cause),
                mitigations=(DIVERGED_MITIGATION, *finding.mitigations, LASTING_CHANGE_MITIGATION),
            )
        ]
    if len(withdrawn) == len(first_rows):
        summary = (
            f"the guard recommended a rollback {said}, when it took the new level of a lasting change of scale "
            "and trained on without a skip"
        )
        return [
            dataclasses.replace(
                finding,
                severity="warning",
                summary=summary,
                evidence=evidence,
                causes=(
                    cause,
                    "an unplanned change that lasted (a fault on every batch since then), which the guard now takes "
                    "as normal",
                ),
                mitigations=(
                    LASTING_CHANGE_MITIGATION,
                    "a loop that restores a checkpoint while grad/rollback_recommended is set goes back before the "
                    "change each time: announce a planned change with gh.rebaseline; if it was not planned, find "
                    "what changed at that step before training on",
                ),
            )
        ]
    return [
        dataclasses.replace(
            finding,
            summary=f"{summary}; {len(withdrawn)} of them {said}, by a lasting change of scale",
            evidence=evidence,
            causes=(cause, *finding.causes),
            mitigations=(LASTING_CHANGE_MITIGATION, *finding.mitigations),
        )
    ]


RESTART = Pattern(
    "restart",
    "the run restarted: the step went backwards (or repeated) in the log",
    "info",
    (
        "the run was resumed from a checkpoint (after a crash, a preemption or by hand), appending to the log",
        "a rollback restored an earlier checkpoint and the loop counted the steps again from there",
        "two runs write to the same log file",
        "a row logged again for a step with some of the same metrics (e.g. a train row logged twice): the later "
        "one gives them",
    ),
    (
        "nothing, for a planned resume: from each restart on, the resumed run's rows are the ones diagnosed and "
        "plotted (the earlier rows at its steps and beyond are dropped)",
        "if rows_superseded counts rows you meant to keep (a summary row logged at a low step with a training "
        "metric such as loss), log them elsewhere or under their own names: a row with a lower step that logs "
        "a metric of the rows it goes back over reads as a restart (one that logs none of them joins its step)",
        "otherwise, find out what stopped the run at the step it went back from (crash, preemption, OOM)",
        "give each run its own log (gh.JsonlWriter(path, overwrite=True) or a new path) when runs must not mix",
    ),
)


def check_restart(h: History, th: Thresholds) -> list[Finding]:
    """The step went backwards, or was logged again right after itself, in the log
    (``History.restarts``)."""
    if not h.restarts:
        return []
    pairs = ", ".join(f"{a} -> {b}" for a, b in list(zip(h.restarted_from, h.restarts))[:5])
    more = " ..." if len(h.restarts) > 5 else ""
    evidence = {
        "restarts": len(h.restarts),
        "resumed_at": list(h.restarts),
        "went_back_from": list(h.restarted_from),
        "rows_replaced": h.rows_replaced,
        "rows_superseded": h.rows_superseded,
    }
    beyond = f", {h.rows_superseded} of them beyond the steps logged again" if h.rows_superseded else ""
    summary = (
        f"the step went backwards or repeated {len(h.restarts)} time(s) ({pairs}{more}); "
        f"{h.rows_replaced} earlier row(s) dropped{beyond}"
    )
    return [RESTART.finding(summary, h.restarts, evidence)]


NO_METRICS = Pattern(
    "no_metrics",
    "no gradhealth metric in the log: nothing was judged",
    "warning",
    (
        "the log holds none of the metrics gh.metrics returns (names like grad/norm, grad/skipped, "
        "xdev/agreement): another program's log, a config file, an eval-only log",
        "the names were changed on the way (a prefix, a renaming logger), so that none is a catalogue name",
    ),
    (
        "log gh.metrics(opt_state) (gh.MetricLogger) and diagnose that log",
        "give the columns their catalogue names (gh.CATALOGUE): e.g. a dict of columns with the prefix removed",
    ),
)


def check_no_metrics(h: History, th: Thresholds) -> list[Finding]:
    """No column of the log is a metric of optax_gradhealth
    (:func:`~optax_gradhealth.diagnosis._columns.gradhealth_metric`): every other
    pattern skipped it, so an empty diagnosis would be a false all-clear."""
    if not len(h) or cols.gradhealth_metric(h) is not None:
        return []
    names = h.names
    shown = ", ".join(repr(n) for n in names[:6]) + (", ..." if len(names) > 6 else "")
    summary = (
        f"none of the log's {len(names)} column(s) ({shown or 'none'}) is a gradhealth metric "
        "(names like grad/norm, xdev/agreement: gh.CATALOGUE)"
    )
    return [NO_METRICS.finding(summary, (), {"columns": len(names), "first_columns": list(names[:6])})]


#: The single-run patterns and their checks, in the order they are run.
CHECKS = (
    (NONFINITE, check_nonfinite),
    (NONFINITE_UPDATE, check_nonfinite_update),
    (LOSS_SCALE, check_loss_scale),
    (REPLAY_MISMATCH, check_replay_mismatch),
    (EXPLOSION, check_explosion),
    (VANISHING, check_vanishing),
    (OSCILLATION, check_oscillation),
    (DIRECTION_OSCILLATION, check_direction_oscillation),
    (DIRECTION_DRIFT, check_direction_drift),
    (UPDATE_RATIO_HIGH, check_update_ratio_high),
    (UPDATE_RATIO_LOW, check_update_ratio_low),
    (DEAD_LEAF, check_dead_leaf),
    (LEAF_CLIP_ALWAYS, check_leaf_clip_always),
    (BATCH_VS_NOISE_SCALE, check_batch_vs_noise_scale),
    (CLIP_ALWAYS, check_clip_always),
    (CLIP_NEVER, check_clip_never),
    (ROLLBACK, check_rollback),
    (RESTART, check_restart),
    (NO_METRICS, check_no_metrics),
)
