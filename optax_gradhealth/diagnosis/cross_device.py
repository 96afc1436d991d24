"""Patterns of the cross-device audit's metrics (``xdev/...``, :func:`gh.cross_device
<optax_gradhealth.cross_device>`).

Each pattern is a :class:`Pattern` and a ``check_<name>(history, thresholds)`` that
returns its findings: empty without the ``xdev/...`` metrics it needs; one per device
for ``outlier_device`` and one per pair for ``near_duplicate``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import numpy as np

from optax_gradhealth.diagnosis import _columns as cols
from optax_gradhealth.diagnosis._core import Finding, Pattern, Thresholds
from optax_gradhealth.history import History

HIGH_DISPERSION = Pattern(
    "high_dispersion",
    "high dispersion of the gradient norm across devices",
    "warning",
    (
        "desynchronised random seeds (dropout, augmentation) across devices",
        "data shuffling / sampler misalignment between devices",
        "a silent hardware or collective-communication fault",
    ),
    (
        "enforce the same global seed and fold in the device index only where intended",
        "check the distributed sampler (epoch seeding, rank and world size)",
        "look at xdev/outlier_device: one bad device points to hardware",
    ),
)


def _nanmedian(values: Any) -> float:
    """The median of the entries that are not NaN; NaN (without numpy's warning) when
    every entry is: a device whose gradient was NaN at every audit it was named in."""
    values = np.asarray(values, np.float64)
    values = values[~np.isnan(values)]
    return float(np.median(values)) if values.size else float("nan")


#: What a high dispersion is when the local gradients are sampling noise (see
#: :func:`check_high_dispersion`).
SMALL_BATCH_CAUSE = (
    "per-device batch small against the gradient noise scale: each device's gradient is mostly its own "
    "batch's sampling noise (median xdev/agreement near 0), whose norm varies from device to device by chance"
)
SMALL_BATCH_MITIGATION = (
    "nothing, if the global batch suits the noise scale (xdev/noise_scale): the devices' mean is what trains; "
    "a larger per-device batch (or gradient accumulation) makes the local norms comparable"
)


def check_high_dispersion(h: History, th: Thresholds) -> list[Finding]:
    """The per-device norms' coefficient of variation is high on many steps.

    When the local gradients are noise-dominated (the median ``xdev/agreement``, the
    share of a device's squared norm that the devices have in common, is below
    ``agreement_low``: in expectation ``1 / (1 + B_noise / B)``, so a noise scale about
    ten times the per-device batch or more), a device's norm is that of its own batch's
    sampling noise, which varies from device to device by chance (per-device batches of
    2 or 4 give a CV of 0.5 to 0.7 on clean runs): the finding is ``info``, with the
    small per-device batch as its first cause. Unless one device is the farthest from
    the median log-norm on most of the high rows (K >= 3): sampling noise spreads that
    over the devices, a faulty device does not (it keeps its warning and causes)."""
    if not h.has("xdev/norm_cv"):
        return []
    cv = h.col("xdev/norm_cv")
    ok = np.isfinite(cv)
    if not ok.any() or ok.sum() < th.min_steps:
        return []
    high = ok & (cv > th.dispersion_cv)
    fraction = float(high.sum() / ok.sum())
    if fraction < th.dispersion_fraction:
        return []
    evidence = {"fraction": fraction, "median_norm_cv": float(np.median(cv[ok])), "threshold": th.dispersion_cv}
    if h.has("xdev/norm_max_over_min"):
        ratio = h.col("xdev/norm_max_over_min")
        # The largest logged ratio, inf included (a dead device's norm of 0 makes every
        # row's ratio inf): only NaN (not logged) is left out.
        logged = ratio[~np.isnan(ratio)]
        evidence["max_norm_max_over_min"] = float(logged.max()) if logged.size else math.nan
    summary = f"per-device norm CV > {th.dispersion_cv:g} on {fraction:.0%} of steps"
    finding = HIGH_DISPERSION.finding(summary, h.steps[high], evidence)
    agreement = h.col("xdev/agreement") if h.has("xdev/agreement") else np.full(len(h), np.nan)
    agreement = agreement[np.isfinite(agreement)]
    if not agreement.size or np.median(agreement) >= th.agreement_low:
        return [finding]
    evidence["median_agreement"] = float(np.median(agreement))
    norms = h.vector("xdev/device_norms")
    if norms is not None and norms.shape[1] >= 3:
        logs = np.log(norms[high])
        ok = np.isfinite(logs).all(axis=1)
        if ok.any():
            farthest = np.argmax(np.abs(logs[ok] - np.median(logs[ok], axis=1, keepdims=True)), axis=1)
            device = int(np.bincount(farthest).argmax())
            share = float(np.mean(farthest == device))
            evidence["farthest_device"], evidence["farthest_device_share"] = device, share
            if share > 0.5:  # one device makes the dispersion: not sampling noise
                return [HIGH_DISPERSION.finding(summary, h.steps[high], evidence)]
    return [
        dataclasses.replace(
            HIGH_DISPERSION.finding(summary + "; the local gradients are noise-dominated", h.steps[high], evidence),
            severity="info",
            causes=(SMALL_BATCH_CAUSE, *HIGH_DISPERSION.causes),
            mitigations=(SMALL_BATCH_MITIGATION, *HIGH_DISPERSION.mitigations),
        )
    ]


AGREEMENT_DROP = Pattern(
    "agreement_drop",
    "sudden drop of cross-device gradient agreement",
    "error",
    (
        "seed desynchronisation: devices use different random streams for dropout or augmentation",
        "data loader misalignment: shuffling is no longer synchronised across devices",
    ),
    (
        "re-align the global seeds at initialisation and after restores",
        "check the sampler's epoch seeding (set_epoch-style) on every device",
    ),
)


def check_agreement_drop(h: History, th: Thresholds) -> list[Finding]:
    """The agreement falls from a high rolling median to near zero and stays there
    (:func:`~optax_gradhealth.diagnosis._columns.agreement_drops`), after the first
    ``warmup_rows`` rows (as :func:`check_agreement_drift`): early in training the
    agreement falls fast as the devices learn the shared signal, and a value that falls
    with it is no drop. Neither the drop nor the median before it reads those rows; a
    drop soon after them is judged on the values there are before it (at least
    ``agreement_window // 2``), and dated at the row where the value fell
    (:func:`~optax_gradhealth.diagnosis._columns.agreement_fall`)."""
    name, a, a_steps = cols.agreement(h, cols.after_warmup(h, th))
    drops = cols.agreement_drops(a, th)
    if not drops:
        return []
    # Each drop with the low values that led to it, from the row where the value fell.
    shown = sorted({i for t in drops for i in range(cols.agreement_fall(a, t, th), t + 1)})
    t0 = shown[0]
    before = cols.rolling_median_before(a, t0, th.agreement_window)
    evidence = {
        "median_before": before,
        "value_at_drop": float(a[t0]),
        "median_after": float(np.median(a[t0 : t0 + th.agreement_window])),
        "median_rest": float(np.median(a[t0:])),
        "metric": name,
    }
    summary = f"{name} fell from {before:.3g} to {a[t0]:.3g} at step {int(a_steps[t0])}"
    return [AGREEMENT_DROP.finding(summary, a_steps[shown], evidence)]


AGREEMENT_LOW = Pattern(
    "agreement_low",
    "persistently low cross-device gradient agreement",
    "warning",
    (
        "batch too small: local gradients are dominated by sample noise (see xdev/noise_scale)",
        "learning rate too high: the model bounces around the loss landscape",
    ),
    (
        "compare the global batch (devices x per-device batch) with xdev/noise_scale (B_simple): below it, "
        "grow the batch or accumulate gradients; well above it, low per-device agreement is expected and harmless",
        "lower the learning rate or increase momentum to smooth directions",
    ),
)


def check_agreement_low(h: History, th: Thresholds) -> list[Finding]:
    """The agreement is below ``agreement_low`` on most steps."""
    name, a, a_steps = cols.agreement(h)
    if a.size == 0 or a.size < th.min_steps:
        return []
    low = a < th.agreement_low
    if low.mean() < th.agreement_low_fraction:
        return []
    evidence = {"fraction_low": float(low.mean()), "median_agreement": float(np.median(a)), "metric": name}
    if h.has("xdev/noise_scale"):
        noise = h.col("xdev/noise_scale")
        noise = noise[np.isfinite(noise)]
        if noise.size:
            evidence["median_noise_scale"] = float(np.median(noise))
    summary = f"{name} < {th.agreement_low:g} on {low.mean():.0%} of steps (median {np.median(a):.3g})"
    return [AGREEMENT_LOW.finding(summary, a_steps[low], evidence)]


AGREEMENT_HIGH = Pattern(
    "agreement_high",
    "abnormally high cross-device gradient agreement (duplicated data)",
    "error",
    ("devices are loading identical data shards (rank / world size not passed to the data pipeline)",),
    ("audit the data sharding now: each device must see its own shard",),
)


def check_agreement_high(h: History, th: Thresholds) -> list[Finding]:
    """The agreement is above ``agreement_high`` on most steps, or two devices had
    bit-identical gradients at an audit (``xdev/duplicate_pairs``)."""
    steps = h.steps
    name, a, a_steps = cols.agreement(h)
    high = a > th.agreement_high
    high_fraction = float(high.mean()) if a.size and a.size >= th.min_steps else 0.0
    duplicate = cols.reduced(h, "xdev/duplicate_pairs", np.sum)
    audits = cols.audit_rows(h)
    # Audit values are held between audits: count them on audit rows only.
    dup_rows = audits & (np.nan_to_num(duplicate) > 0) if duplicate is not None else np.zeros(len(h), bool)
    if high_fraction < th.agreement_high_fraction and not dup_rows.any():
        return []
    evidence: dict[str, Any] = {"fraction_high": high_fraction, "metric": name}
    if a.size:
        evidence["median_agreement"] = float(np.median(a))
    if duplicate is not None:
        evidence["max_duplicate_pairs"] = int(np.nanmax(np.nan_to_num(duplicate)))
        pairs = cols.flagged_indices(h, "xdev/duplicate_pairs", audits)
        if pairs:
            evidence["duplicate_device_pairs"] = sorted({tuple(sorted(p)) for p in pairs if len(p) == 2})
    parts = [f"{name} > {th.agreement_high:g} on {high_fraction:.0%} of steps"] if high.any() else []
    if dup_rows.any():
        pair_list = ", ".join(f"{j}-{k}" for j, k in evidence.get("duplicate_device_pairs", []))
        parts.append(f"bit-identical gradients on device pairs {pair_list} at {int(dup_rows.sum())} audit(s)")
    rows = sorted(set(a_steps[high].tolist()) | set(steps[dup_rows].tolist()))
    return [AGREEMENT_HIGH.finding("; ".join(parts), rows, evidence)]


AGREEMENT_DRIFT = Pattern(
    "agreement_drift",
    "gradual divergence of cross-device agreement",
    "warning",
    (
        "precision drift: floating-point non-associativity (bf16/fp16) makes replicas drift apart",
        "(also normal late in training as the signal shrinks: compare with xdev/noise_scale)",
    ),
    (
        "periodically broadcast one replica's parameters to all devices",
        "check xdev/param_desync; keep the all-reduce in float32",
    ),
)


def check_agreement_drift(h: History, th: Thresholds) -> list[Finding]:
    """The agreement's quarter medians never rise and fall by ``drift_drop`` or more,
    after the first ``warmup_rows`` rows: early in training the agreement falls fast as
    the devices learn the shared signal, a normal decline that is no drift."""
    name, a, _ = cols.agreement(h, cols.after_warmup(h, th))
    if a.size < 4 * th.agreement_window:
        return []
    quarters = [float(np.median(q)) for q in np.array_split(a, 4)]
    non_increasing = all(later <= earlier + 0.02 for earlier, later in itertools.pairwise(quarters))
    if not (non_increasing and quarters[0] - quarters[-1] >= th.drift_drop):
        return []
    summary = f"{name} declined gradually from {quarters[0]:.3g} to {quarters[-1]:.3g} (quarter medians)"
    evidence = {"quarter_medians": quarters, "threshold_drop": th.drift_drop, "metric": name}
    return [AGREEMENT_DRIFT.finding(summary, (), evidence)]


OUTLIER_DEVICE = Pattern(
    "outlier_device",
    "one device persistently unlike the others",
    "error",
    (
        "silent data corruption or a failing accelerator on that device",
        "thermal throttling or a different software state on that host",
        "a data shard that differs systematically (corrupt files on one host)",
    ),
    (
        "drain the device/host and rerun the step there to confirm; swap the hardware",
        "check that device's data shard",
    ),
)


def _persistent_from(named: np.ndarray, audits: np.ndarray, hard: np.ndarray, th: Thresholds) -> int | None:
    """The first row from which a device counts as an outlier, or None: its first
    naming at a hard fault (``hard``: a non-finite or zero gradient), or the first of its
    namings from which it was named on at least ``outlier_fraction`` of the audits and
    on at least ``outlier_min_audits`` of them (a persistent fault, not a transient), or
    the start of ``outlier_run_audits`` audits in a row that named it (a fault that stood
    out for that long, then sank into the noise of a longer log)."""
    at = np.flatnonzero(named)
    if hard[at].any():
        return int(at[hard[at]][0])
    named_since = np.cumsum(named[::-1])[::-1][at]  # namings from each naming on
    audits_since = np.cumsum(audits[::-1])[::-1][at]
    ok = (named_since >= th.outlier_min_audits) & (named_since >= th.outlier_fraction * audits_since)
    starts = [int(at[ok][0])] if ok.any() else []
    audit_rows = np.flatnonzero(audits)
    seq = named[audit_rows].astype(np.int64)
    # Length of the run of namings ending at each audit.
    resets = np.maximum.accumulate(np.where(seq == 0, np.arange(seq.size), -1))
    run = np.arange(seq.size) - resets
    long = np.flatnonzero(run >= th.outlier_run_audits)
    if long.size:
        starts.append(int(audit_rows[long[0] - th.outlier_run_audits + 1]))
    return min(starts) if starts else None


def check_outlier_device(h: History, th: Thresholds) -> list[Finding]:
    """Devices the audit's outlier detector named (as logged, or replayed on the logged
    per-device norms and cosines with the same rules) persistently, or at a non-finite
    or zero gradient (:func:`_persistent_from`): one finding per device."""
    from optax_gradhealth._cross_device import describe_outlier

    steps = h.steps
    audits = cols.audit_rows(h)
    named = h.vector("xdev/outlier_devices")
    source = "xdev/outlier_devices (logged)"
    scores = {name: h.vector(f"xdev/{name}") for name in ("norm_score", "direction_score", "outlier_evidence")}
    norms, cosines = h.vector("xdev/device_norms"), h.vector("xdev/cosine_to_mean")
    if named is None and h.has("xdev/outlier_device"):
        ids = np.nan_to_num(h.col("xdev/outlier_device"), nan=-1.0).astype(int)
        k = max(int(ids.max()) + 1, norms.shape[1] if norms is not None else 0, 1)
        named = ids[:, None] == np.arange(k)[None, :]
        source = "xdev/outlier_device (logged)"
    elif named is None:
        verdicts = cols.audit_verdicts(h, audits)
        if verdicts is None:
            return []
        k = verdicts.outlier_devices.shape[-1]
        named = np.zeros((len(h), k), bool)
        named[audits] = np.asarray(verdicts.outlier_devices)
        for name, values in (
            ("norm_score", verdicts.scores.norm_score),
            ("direction_score", verdicts.scores.direction_score),
            ("outlier_evidence", verdicts.outlier_evidence),
        ):
            full = np.zeros((len(h), k))
            full[audits] = np.asarray(values)
            scores[name] = full
        source = "the audit detectors replayed on xdev/device_norms and xdev/cosine_to_mean"
    # A missing cell (NaN: a row that did not log the vector) names no device.
    named = (np.nan_to_num(named, nan=0.0) != 0) & audits[:, None]
    found = []
    for device in np.nonzero(named.any(axis=0))[0]:
        device = int(device)
        rows = named[:, device]
        # A hard fault: the device's logged norm was non-finite or exactly 0 (without the
        # norms: an infinite xdev/outlier_score, which only a non-finite device gets).
        if norms is not None and device < norms.shape[1]:
            logged = h.logged(f"xdev/device_norms/{device}")  # a missing cell is no NaN device
            hard = logged & (~np.isfinite(norms[:, device]) | (norms[:, device] == 0))
        elif h.has("xdev/outlier_score"):
            hard = np.isposinf(h.col("xdev/outlier_score"))
        else:
            hard = np.zeros(len(h), bool)
        first = _persistent_from(rows, audits, hard & rows, th)
        if first is None:
            continue
        earlier = int(rows[:first].sum())  # transient namings before: not part of it
        rows = rows & (np.arange(len(h)) >= first)
        since = int(audits[first:].sum())
        fraction = float(rows.sum() / since)
        evidence: dict[str, Any] = {
            "device": device,
            "audits_named": int(rows.sum()),
            "fraction_of_audits": fraction,
            "audits_since_first_flag": since,
            "source": source,
        }
        if earlier:
            evidence["earlier_transient_namings"] = earlier
        summary = f"device {device} named at {int(rows.sum())} of {since} audits since step {int(steps[first])}"
        if h.has("xdev/outlier_score"):
            evidence["median_outlier_score"] = _nanmedian(h.col("xdev/outlier_score")[rows])
        if norms is not None and device < norms.shape[1]:
            # The kind of fault, worded as cross_device_alarms words it, at the audit
            # with the most evidence (or the first one).
            weight = scores["outlier_evidence"]
            at = int(np.argmax(np.where(rows, weight[:, device], -np.inf))) if weight is not None else first
            pick = {name: (v[at] if v is not None else None) for name, v in scores.items()}
            alarm = describe_outlier(
                device,
                norms[at],
                cosines[at] if cosines is not None else None,
                pick["norm_score"],
                pick["direction_score"],
                pick["outlier_evidence"],
            )
            evidence["kind"] = alarm.kind
            evidence.update({k: v for k, v in alarm.evidence.items() if k not in evidence})
            summary += f"; at step {int(steps[at])}: {alarm}"
            if cosines is not None and device < cosines.shape[1]:
                others = np.delete(cosines[rows], device, axis=1)
                evidence["median_cosine_to_mean_device"] = _nanmedian(cosines[rows, device])
                evidence["median_cosine_to_mean_others"] = _nanmedian(others)
            others = np.delete(norms[rows], device, axis=1)
            own, rest = _nanmedian(norms[rows, device]), _nanmedian(others)
            # The others' median norm may be 0 (or NaN): no finite ratio then.
            evidence["norm_ratio_to_others"] = own / rest if rest > 0 else (math.inf if own > 0 else math.nan)
        found.append(OUTLIER_DEVICE.finding(summary, steps[rows], evidence))
    return found


NEAR_DUPLICATE = Pattern(
    "near_duplicate",
    "two devices see nearly the same data",
    "error",
    (
        "both devices read the same examples: the sampler or data loader is seeded without the device rank",
        "a shard was copied to two hosts; different dropout or augmentation hides the exact duplicate",
    ),
    (
        "audit the data sharding now: pass the rank and the world size to the sampler",
        "check that each host reads its own shard files",
    ),
)


#: The near-duplicate test on the logged cosines: a pair is nearly duplicated when its
#: distance from 1 (``1 - cosine``: the share of the two gradients' noise that is not
#: common to them) is at most this fraction of the other pairs' (measured on 8-device
#: runs: 0.81 to 0.89 for the closest pair of clean runs, 0.01 to 0.07 for two devices
#: that read the same examples under their own augmentation noise).
NEAR_DUPLICATE_DISTANCE = 0.2


def _others_medians(cos: np.ndarray, js: np.ndarray, ms: np.ndarray) -> np.ndarray:
    """``[T, P]``: per row of ``cos`` (``[T, K, K]``) and per pair ``(js[p], ms[p])``, the
    median (``np.median``'s, exactly) of the row's off-diagonal cosines other than the
    pair's two entries ``[j, m]`` and ``[m, j]``; NaN where one of those others is NaN,
    or where there are none (K = 2).

    Each row's ``K (K - 1)`` off-diagonal values are sorted once; the median without a
    pair's two entries is then read at the middle positions shifted past the two
    entries' ranks. O(T K^2 log K), not O(T K^4) (a median over ``K^2`` values per pair)."""
    t, k = cos.shape[0], cos.shape[1]
    n = k * (k - 1)
    out = np.full((t, js.size), np.nan)
    if n <= 2 or not js.size or not t:
        return out
    off = ~np.eye(k, dtype=bool)
    position = np.full((k, k), -1)
    position[off] = np.arange(n)  # where [j, m] sits in a row's off-diagonal values
    a, b = position[js, ms], position[ms, js]
    lo, hi = (n - 3) // 2, (n - 2) // 2  # the middle of the n - 2 values left
    chunk = max(1, 2**22 // n)  # rows at a time: a few million values
    for first in range(0, t, chunk):
        values = cos[first : first + chunk][:, off]
        order = np.argsort(values, axis=1, kind="stable")  # NaN last
        ranked = np.take_along_axis(values, order, axis=1)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.broadcast_to(np.arange(n), order.shape), axis=1)
        p1 = np.minimum(rank[:, a], rank[:, b])
        p2 = np.maximum(rank[:, a], rank[:, b])

        def nth(i: int, ranked=ranked, p1=p1, p2=p2) -> np.ndarray:
            # The i-th of the sorted values with positions p1 < p2 taken out.
            q = i + (i >= p1)
            return np.take_along_axis(ranked, q + (q >= p2), axis=1)

        middle = nth(lo) if lo == hi else (nth(lo) + nth(hi)) / 2
        nan = np.isnan(values)
        others_nan = nan.sum(axis=1)[:, None] - nan[:, a] - nan[:, b]
        out[first : first + chunk] = np.where(others_nan > 0, np.nan, middle)
    return out


def _column_medians(values: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Per column ``p``: ``np.median(values[ok[:, p], p])`` (``ok`` entries finite); NaN
    for a column with none."""
    count = ok.sum(axis=0)
    if not len(values):
        return np.full(values.shape[1:], np.nan)
    ranked = np.sort(np.where(ok, values, np.inf), axis=0)
    low = np.take_along_axis(ranked, np.maximum((count - 1) // 2, 0)[None, :], axis=0)[0]
    high = np.take_along_axis(ranked, np.minimum(count // 2, len(values) - 1)[None, :], axis=0)[0]
    middle = np.where(count % 2 == 1, low, (low + high) / 2)
    return np.where(count > 0, middle, np.nan)


def check_near_duplicate(h: History, th: Thresholds) -> list[Finding]:
    """Device pairs the near-duplicate detector flagged (as logged, or replayed on the
    sketched pairwise cosines), or whose logged cosine stands near 1 far above the
    other pairs' (over the audits, the pair's median ``1 - cosine`` is at most
    :data:`NEAR_DUPLICATE_DISTANCE` times the others'), bit-identical pairs aside: one
    finding per pair. The second test does not depend on how widely the other pairs'
    cosines spread, which the in-step detector's robust z-score divides by: with noisy
    per-device gradients a pair at 0.99 against others at 0.15 scores below its drift
    there. Every pair is judged at once (:func:`_others_medians`)."""
    steps = h.steps
    audits = cols.audit_rows(h)
    cos = cols.matrix(h, "xdev/pairwise_cosine")
    flagged = cols.matrix(h, "xdev/near_duplicate_pairs")
    source = "xdev/near_duplicate_pairs (logged)"
    if flagged is None:
        if cos is None:
            return []
        verdicts = cols.audit_verdicts(h, audits)
        k = cos.shape[1]
        flagged = np.zeros((len(h), k, k), bool)
        source = "the near-duplicate detector replayed on xdev/pairwise_cosine"
        if verdicts is not None and verdicts.near_duplicate_pairs.shape[-1] == k:
            flagged[audits] = np.asarray(verdicts.near_duplicate_pairs)
    flagged = (flagged != 0) & audits[:, None, None]
    exact = cols.matrix(h, "xdev/duplicate_pairs")
    k = flagged.shape[1]
    js, ms = np.triu_indices(k, 1)  # the pairs j < m, in the order of the findings
    distinct = np.ones((len(h), js.size), bool)
    if exact is not None:
        distinct = (exact[:, js, ms] == 0) & (exact[:, ms, js] == 0)
    rows = (flagged[:, js, ms] | flagged[:, ms, js]) & distinct  # [T, pairs]
    judged = audits[:, None] & distinct
    level = cos is not None and cos.shape[1] == k
    by_level = np.zeros(js.size, bool)
    if level and judged.any():
        at = np.flatnonzero(audits)  # only audit rows are judged
        pair = 1.0 - cos[at][:, js, ms]
        with np.errstate(all="ignore"):
            typical = 1.0 - _others_medians(cos[at], js, ms)
        ok = judged[at] & np.isfinite(pair) & np.isfinite(typical)
        with np.errstate(invalid="ignore"):
            by_level = _column_medians(pair, ok) <= NEAR_DUPLICATE_DISTANCE * _column_medians(typical, ok)
            rows[at] |= ok & (pair <= NEAR_DUPLICATE_DISTANCE * typical) & by_level
    found = []
    for p in np.flatnonzero(rows.sum(axis=0) >= max(th.near_duplicate_min_audits, 1)):
        j, m, pair_rows = int(js[p]), int(ms[p]), rows[:, p]
        evidence: dict[str, Any] = {"devices": [j, m], "audits_flagged": int(pair_rows.sum()), "source": source}
        summary = f"devices {j} and {m} have nearly the same gradients at {int(pair_rows.sum())} audit(s)"
        if level:
            # Over the flagged audits, or for the second test over every audit it judged.
            over = judged[:, p] if by_level[p] else pair_rows
            off = ~np.eye(k, dtype=bool)
            off[j, m] = off[m, j] = False
            evidence["median_pair_cosine"] = float(np.median(cos[over][:, j, m]))
            others = cos[over][:, off]  # none with 2 devices: NaN, without numpy's warning
            evidence["median_other_pairs_cosine"] = float(np.median(others)) if others.size else math.nan
            pair_median, others = evidence["median_pair_cosine"], evidence["median_other_pairs_cosine"]
            if by_level[p]:
                evidence["source"] = "xdev/pairwise_cosine: the pair's 1 - cosine against the other pairs'"
                evidence["audits_judged"] = int(over.sum())
                summary = (
                    f"devices {j} and {m} have nearly the same gradients: pair cosine median {pair_median:.3g} "
                    f"over {int(over.sum())} audits vs {others:.2f} for the other pairs"
                )
            else:
                summary += f" (pair cosine {pair_median:.2f} vs {others:.2f} for the other pairs)"
        found.append(NEAR_DUPLICATE.finding(summary, steps[pair_rows], evidence))
    return found


PARAM_DESYNC = Pattern(
    "param_desync",
    "parameters differ across replicas (desync)",
    "error",
    (
        "a replica missed an update or applied a different one (non-deterministic op, skipped collective)",
        "silent data corruption in memory",
    ),
    (
        "broadcast the parameters from a healthy replica, or restore the last checkpoint",
        "make every skip/apply decision from collective values (identical on every device)",
    ),
)


def check_param_desync(h: History, th: Thresholds) -> list[Finding]:
    """The replicas' parameter fingerprints differed at an audit."""
    desync = cols.reduced(h, "xdev/param_desync", np.max)
    if desync is None:
        return []
    steps = h.steps
    desync = np.where(cols.audit_rows(h), np.nan_to_num(desync, nan=0.0), 0.0)
    bad = desync > th.param_desync
    if not bad.any():
        return []
    devices = sorted({p[0] for p in cols.flagged_indices(h, "xdev/param_desync", bad) if len(p) == 1})
    evidence = {"max_param_desync": float(desync.max()), "threshold": th.param_desync, "devices": devices}
    summary = f"replica parameters differ at {int(bad.sum())} step(s), first at step {int(steps[bad][0])}"
    return [PARAM_DESYNC.finding(summary, steps[bad], evidence)]


#: The cross-device patterns and their checks, in the order they are run.
CHECKS = (
    (HIGH_DISPERSION, check_high_dispersion),
    (AGREEMENT_DROP, check_agreement_drop),
    (AGREEMENT_LOW, check_agreement_low),
    (AGREEMENT_HIGH, check_agreement_high),
    (AGREEMENT_DRIFT, check_agreement_drift),
    (OUTLIER_DEVICE, check_outlier_device),
    (NEAR_DUPLICATE, check_near_duplicate),
    (PARAM_DESYNC, check_param_desync),
)
