"""Columns the patterns read, derived from a :class:`History` (numpy, host side)."""

from __future__ import annotations

import numpy as np

from optax_gradhealth import _detectors as detect
from optax_gradhealth._guard import REBASELINE_AFTER, SPIKE_BASELINE, SPREAD_FLOOR
from optax_gradhealth.diagnosis._core import Thresholds
from optax_gradhealth.history import History


def replay_spike_scores(norm: np.ndarray, thresholds: Thresholds) -> tuple[np.ndarray, np.ndarray]:
    """``(spike, ratio)`` per row: the guard's spike rule (``_detectors.SpikeRule``, with
    the thresholds' ``spike_score``, ``spike_zscore``, ``spike_window`` and
    ``warmup_rows``) replayed over logged norms (a non-finite norm is never accepted)."""
    th = thresholds
    rule = detect.SpikeRule(
        th.spike_score,
        th.spike_zscore,
        th.spike_window,
        th.warmup_rows,
        SPREAD_FLOOR,
        min(SPIKE_BASELINE, th.spike_window),
        REBASELINE_AFTER,
    )
    # A finite norm beyond float32 (a float64 log) saturates, as the guard's does; cast
    # as it is it would become Inf and count as neither a spike nor non-finite.
    norm = np.asarray(norm, np.float64)
    big = np.finfo(np.float32).max
    out = detect.replay_spikes(rule, np.where(np.isfinite(norm), np.minimum(norm, big), norm).astype(np.float32))
    return np.array(out["spike"]), np.array(out["ratio"], np.float64)


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


def counter_growth(h: History, name: str) -> tuple[int, np.ndarray] | None:
    """``(total, steps where it grew)`` of a counter column (a ``num_...`` metric), or
    None when it is not logged or never rose above 0. Rows that do not log the counter
    (NaN) are left out: growth is judged between consecutive logged values (the first
    against 0)."""
    if not h.has(name):
        return None
    column = h.col(name)
    logged = np.flatnonzero(np.isfinite(column))
    counter = column[logged]
    total = int(counter.max()) if counter.size else 0
    if total <= 0:
        return None
    grew = np.diff(np.concatenate([[0.0], counter])) > 0
    return total, h.steps[logged[grew]]


def after_warmup(h: History, th: Thresholds) -> np.ndarray:
    """Rows at or after ``warmup_rows`` (by position in the history)."""
    return np.arange(len(h)) >= th.warmup_rows


def audit_rows(h: History) -> np.ndarray:
    """Rows that were audit steps: ``xdev/audited`` is 1, or, when it is not logged, some
    ``xdev/`` metric was (an eval row, a row of a step union, is not an audit: its
    missing per-device norms would read as NaN devices)."""
    if h.has("xdev/audited"):
        return h.col("xdev/audited") == 1
    rows = np.zeros(len(h), bool)
    for name in h.columns:
        if name.startswith("xdev/"):
            rows |= h.logged(name)
    return rows


def agreement(h: History) -> tuple[str, np.ndarray, np.ndarray]:
    """``(metric name, values, steps)`` of the finite cross-device agreement: every step
    (``xdev/agreement``), else the audits' ``xdev/mean_pairwise_cosine``."""
    name = "xdev/agreement" if h.has("xdev/agreement") else "xdev/mean_pairwise_cosine"
    values = h.col(name) if h.has(name) else np.full(len(h), np.nan)
    if name == "xdev/mean_pairwise_cosine" and h.has("xdev/audited"):
        values = np.where(h.col("xdev/audited") == 1, values, np.nan)
    ok = np.isfinite(values)
    return name, values[ok], h.steps[ok]


def agreement_drops(a: np.ndarray, th: Thresholds) -> list[int]:
    """Indices into ``a`` where it falls below ``agreement_drop_after`` while the median
    of the previous ``agreement_window`` values is above ``agreement_drop_before``."""
    if a.size <= th.agreement_window:
        return []
    # The rolling median only where the value is low (the same medians, vectorised).
    low_at = np.flatnonzero(a[th.agreement_window :] < th.agreement_drop_after) + th.agreement_window
    windows = np.lib.stride_tricks.sliding_window_view(a, th.agreement_window)
    medians = np.median(windows[low_at - th.agreement_window], axis=1) if low_at.size else np.zeros(0)
    return low_at[medians > th.agreement_drop_before].tolist()


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
    return float(np.median(values[t - window : t]))


def matrix(h: History, name: str) -> np.ndarray | None:
    """``[T, K, K]`` from ``name/j/k`` columns, or None."""
    index = [i for i in h.indexed(name) if len(i) == 2]
    if not index:
        return None
    k = max(max(i) for i in index) + 1
    out = np.zeros((len(h), k, k))
    for j, m in index:
        out[:, j, m] = np.nan_to_num(h.col(f"{name}/{j}/{m}"))
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
