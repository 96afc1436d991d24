"""Host-side diagnosis of a run's logged metrics: pattern -> evidence -> causes -> mitigations.

``diagnose(history)`` reads what the optimizer state recorded (``gh.metrics``, logged by
:class:`optax_gradhealth.writers.MetricLogger` or by hand) and returns :class:`Finding`\\ s.
It is plain numpy: it never touches the jitted path and needs no device.

Every threshold is a field of :class:`Thresholds` (documented there and in
``docs/diagnosis.md``); pass your own to tune it::

    findings = gh.diagnose("run.jsonl", thresholds=gh.Thresholds(spike_score=3.0))
    print(gh.format_findings(findings))

A history that lacks a metric simply skips the patterns that need it (no cross-device
finding without ``xdev/...`` metrics, no clipping finding without ``grad/clipped``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from optax_gradhealth import _detectors as detect
from optax_gradhealth._guard import (
    REBASELINE_AFTER,
    SPIKE_BASELINE,
    SPIKE_THRESHOLD,
    SPIKE_WINDOW,
    SPIKE_ZSCORE,
    SPREAD_FLOOR,
)
from optax_gradhealth.history import History
from optax_gradhealth.history import load_history as _load_columns

__all__ = ["PLAYBOOK", "Finding", "Thresholds", "diagnose", "format_findings", "load_history"]


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """The numbers each pattern is judged by (see ``docs/diagnosis.md``).

    Attributes:
      warmup_steps: leading rows ignored by the statistics computed here (spike score
        from norms when ``grad/spike_score`` is absent, oscillation, clip calibration).
      min_steps: fewest usable rows for a rate-based pattern (oscillation, clipping,
        dispersion, agreement rates) to be judged at all.
      spike_score: explosion when ``norm / baseline norm`` exceeds this (the guard's
        ``spike_threshold``) and the z-score exceeds ``spike_zscore``: on the logged
        ``grad/spike_score`` and ``grad/zscore`` when present (the guard's scores), else
        replayed on ``grad/norm`` through the guard's own rule
        (``optax_gradhealth._detectors.SpikeRule``) with these and ``spike_window``.
      spike_zscore: the rule's robust z-score threshold (the guard's ``spike_zscore``).
      spike_window: the rule's window of accepted norms (the guard's ``spike_window``).
      vanishing_norm: a finite norm below this is vanishing...
      vanishing_loss_fraction: ...while the loss is still at least this fraction of
        its initial value (median of the first 10 finite losses); without a loss
        column every tiny norm counts.
      vanishing_min_steps: vanishing steps needed for a finding.
      oscillation_ratio: a swing is a step-to-step change of the norm by more than
        this factor (up or down)...
      oscillation_fraction: ...and oscillation is a fraction of swings above this.
      clip_always_fraction: clipped on at least this fraction of accepted steps: the
        threshold is too low.
      clip_never_margin: never clipped while the median threshold is at least this
        multiple of the 99th percentile norm: the threshold is too high.
      clip_suggest_percentile: the suggested ``max_norm`` is this percentile of the
        finite norms after warm-up (95: about 5% of such steps would be clipped).
      dispersion_cv: high dispersion when the coefficient of variation of the
        per-device norms (``xdev/norm_cv``) exceeds this...
      dispersion_fraction: ...on at least this fraction of steps.
      agreement_drop_before: a sudden drop starts from a median agreement above this
        over the previous ``agreement_window`` steps...
      agreement_drop_after: ...and falls below this.
      agreement_window: steps of the rolling median for drops and gradual drift.
      agreement_low: persistently low agreement: below this...
      agreement_low_fraction: ...on at least this fraction of steps.
      agreement_high: abnormally high agreement: above this...
      agreement_high_fraction: ...on at least this fraction of steps (or any
        ``xdev/duplicate_pairs`` > 0).
      drift_drop: gradual divergence: quarter medians of the agreement never rise and
        the first quarter's exceeds the last quarter's by at least this.
      outlier_fraction: a device named by the outlier detector is reported when it was
        named on at least this fraction of the audits from its first naming on...
      outlier_min_audits: ...and on at least this many audits (the detector in the step
        already accumulates evidence over audits, so one naming counts by default).
      near_duplicate_min_audits: a pair flagged by the near-duplicate detector is
        reported when flagged on at least this many audits.
      param_desync: parameter desync when ``xdev/param_desync`` exceeds this.
    """

    warmup_steps: int = 20
    min_steps: int = 10
    spike_score: float = SPIKE_THRESHOLD
    spike_zscore: float = SPIKE_ZSCORE
    spike_window: int = SPIKE_WINDOW
    vanishing_norm: float = 1e-5
    vanishing_loss_fraction: float = 0.5
    vanishing_min_steps: int = 5
    oscillation_ratio: float = 2.0
    oscillation_fraction: float = 0.2
    clip_always_fraction: float = 0.9
    clip_never_margin: float = 3.0
    clip_suggest_percentile: float = 95.0
    dispersion_cv: float = 0.5
    dispersion_fraction: float = 0.2
    agreement_drop_before: float = 0.5
    agreement_drop_after: float = 0.1
    agreement_window: int = 10
    agreement_low: float = 0.1
    agreement_low_fraction: float = 0.5
    agreement_high: float = 0.99
    agreement_high_fraction: float = 0.9
    drift_drop: float = 0.3
    outlier_fraction: float = 0.0
    outlier_min_audits: int = 1
    near_duplicate_min_audits: int = 1
    param_desync: float = 0.0


# pattern -> (title, likely causes, mitigations). docs/diagnosis.md is the long form.
PLAYBOOK: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "nonfinite": (
        "non-finite gradients (NaN/Inf)",
        (
            "a bad batch (NaN/Inf in the inputs or targets, empty sequences, division by zero in the loss)",
            "fp16 overflow or underflow (activations, loss scale too high)",
            "the parameters already diverged (learning rate too high) and the loss overflowed",
        ),
        (
            "keep gh.guard in the chain: it skips these updates and never writes a NaN into the parameters",
            "find the leaf with grad/first_nonfinite_leaf (name it with gh.leaf_names(params)) and the batch",
            "use bf16 or float32 where fp16 overflows; lower the loss scale",
            "if they come in a row, restore the last healthy checkpoint (grad/rollback)",
        ),
    ),
    "explosion": (
        "gradient explosion (spikes)",
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
    ),
    "vanishing": (
        "vanishing gradients",
        (
            "poor weight initialisation (too small, saturated activations)",
            "fp16 underflow of small gradients",
            "an architectural bottleneck (deep post-LN stacks, sigmoid/tanh saturation)",
        ),
        (
            "re-scale the initialisation (e.g. muP-style), add normalisation or residual paths",
            "use bf16 or float32, or raise the loss scale",
            "check that the loss actually depends on the parameters (stop_gradient, detached branches)",
        ),
    ),
    "oscillation": (
        "persistent oscillation of the gradient norm",
        (
            "batch too small: the gradient is dominated by sample noise",
            "learning rate at the edge of stability",
        ),
        (
            "increase the batch size (or accumulate gradients) or lower the learning rate",
            "extend the warm-up",
        ),
    ),
    "clip_always": (
        "clipping on (almost) every step: threshold too low",
        ("max_norm was set far below the typical gradient norm, so clipping acts as a smaller learning rate",),
        (
            "raise max_norm to the suggested value (a high percentile of this run's norms)",
            "or clip adaptively: gh.PercentileClip(95) / gh.ZScoreClip()",
        ),
    ),
    "clip_never": (
        "clipping never triggers: threshold too high",
        ("max_norm is far above every gradient norm seen, so it cannot stop a spike",),
        (
            "lower max_norm to the suggested value (a high percentile of this run's norms)",
            "or clip adaptively: gh.PercentileClip(95) / gh.ZScoreClip()",
        ),
    ),
    "rollback": (
        "rollback recommended",
        (
            "a run of consecutive non-finite steps or spikes: the guard cannot recover by skipping alone",
            "the parameters (or the optimizer moments) are already damaged",
        ),
        (
            "restore the last healthy checkpoint (see docs/logging.md, orbax) and move past the bad data",
            "lower the learning rate after the restore",
        ),
    ),
    "high_dispersion": (
        "high dispersion of the gradient norm across devices",
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
    ),
    "agreement_drop": (
        "sudden drop of cross-device gradient agreement",
        (
            "seed desynchronisation: devices use different random streams for dropout or augmentation",
            "data loader misalignment: shuffling is no longer synchronised across devices",
        ),
        (
            "re-align the global seeds at initialisation and after restores",
            "check the sampler's epoch seeding (set_epoch-style) on every device",
        ),
    ),
    "agreement_low": (
        "persistently low cross-device gradient agreement",
        (
            "batch too small: local gradients are dominated by sample noise (see xdev/noise_scale)",
            "learning rate too high: the model bounces around the loss landscape",
        ),
        (
            "compare the global batch (devices x per-device batch) with xdev/noise_scale (B_simple): below it, "
            "grow the batch or accumulate gradients; well above it, low per-device agreement is expected and harmless",
            "lower the learning rate or increase momentum to smooth directions",
        ),
    ),
    "agreement_high": (
        "abnormally high cross-device gradient agreement (duplicated data)",
        ("devices are loading identical data shards (rank / world size not passed to the data pipeline)",),
        ("audit the data sharding now: each device must see its own shard",),
    ),
    "agreement_drift": (
        "gradual divergence of cross-device agreement",
        (
            "precision drift: floating-point non-associativity (bf16/fp16) makes replicas drift apart",
            "(also normal late in training as the signal shrinks: compare with xdev/noise_scale)",
        ),
        (
            "periodically broadcast one replica's parameters to all devices",
            "check xdev/param_desync; keep the all-reduce in float32",
        ),
    ),
    "outlier_device": (
        "one device persistently unlike the others",
        (
            "silent data corruption or a failing accelerator on that device",
            "thermal throttling or a different software state on that host",
            "a data shard that differs systematically (corrupt files on one host)",
        ),
        (
            "drain the device/host and rerun the step there to confirm; swap the hardware",
            "check that device's data shard",
        ),
    ),
    "near_duplicate": (
        "two devices see nearly the same data",
        (
            "both devices read the same examples: the sampler or data loader is seeded without the device rank",
            "a shard was copied to two hosts; different dropout or augmentation hides the exact duplicate",
        ),
        (
            "audit the data sharding now: pass the rank and the world size to the sampler",
            "check that each host reads its own shard files",
        ),
    ),
    "restart": (
        "the run restarted: the step went backwards in the log",
        (
            "the run was resumed from a checkpoint (after a crash, a preemption or by hand), appending to the log",
            "a rollback restored an earlier checkpoint and the loop counted the steps again from there",
            "two runs write to the same log file",
        ),
        (
            "nothing, for a planned resume: the last write of each step is the one diagnosed and plotted",
            "otherwise, find out what stopped the run at the step it went back from (crash, preemption, OOM)",
            "give each run its own log (gh.JsonlWriter(path, overwrite=True) or a new path) when runs must not mix",
        ),
    ),
    "param_desync": (
        "parameters differ across replicas (desync)",
        (
            "a replica missed an update or applied a different one (non-deterministic op, skipped collective)",
            "silent data corruption in memory",
        ),
        (
            "broadcast the parameters from a healthy replica, or restore the last checkpoint",
            "make every skip/apply decision from collective values (identical on every device)",
        ),
    ),
}

_SEVERITY = {
    "nonfinite": "error",
    "explosion": "error",
    "rollback": "error",
    "param_desync": "error",
    "outlier_device": "error",
    "agreement_drop": "error",
    "agreement_high": "error",
    "near_duplicate": "error",
}
_SEVERITY["restart"] = "info"
_SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


@dataclasses.dataclass(frozen=True)
class Finding:
    """One diagnosed pattern.

    Attributes:
      pattern: a key of :data:`PLAYBOOK` (e.g. ``'explosion'``).
      title: what it is, in words.
      severity: ``'error'`` (act now), ``'warning'`` or ``'info'`` (worth knowing, not
        a fault: ``restart``).
      summary: one line with the key numbers.
      steps: the steps where it shows (all of them, sorted).
      evidence: the numbers behind it.
      causes: likely causes.
      mitigations: what to do.
    """

    pattern: str
    title: str
    severity: str
    summary: str
    steps: tuple[int, ...]
    evidence: dict[str, Any]
    causes: tuple[str, ...]
    mitigations: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return dataclasses.asdict(self) | {"steps": list(self.steps)}

    def __str__(self) -> str:
        shown = ", ".join(str(s) for s in self.steps[:12]) + (" ..." if len(self.steps) > 12 else "")
        lines = [f"[{self.severity}] {self.title}: {self.summary}"]
        if self.steps:
            lines.append(f"  steps ({len(self.steps)}): {shown}")
        lines.append("  evidence: " + ", ".join(f"{k}={_fmt(v)}" for k, v in self.evidence.items()))
        lines.append("  likely causes:")
        lines += [f"    - {c}" for c in self.causes]
        lines.append("  mitigations:")
        lines += [f"    - {m}" for m in self.mitigations]
        return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def format_findings(findings: Iterable[Finding]) -> str:
    """The findings as text, one block each (or a line saying there are none)."""
    findings = list(findings)
    if not findings:
        return "gradhealth diagnosis: no findings (no pattern crossed its threshold)."
    head = f"gradhealth diagnosis: {len(findings)} finding(s)"
    return head + "\n\n" + "\n\n".join(str(f) for f in findings)


# --------------------------------------------------------------------------- history


# The columns diagnose reads (a History: sorted by step, last write of a step kept).
_History = History


def _to_float(value: Any) -> float:
    if value is None:
        return math.nan
    if isinstance(value, str):
        return {"NaN": math.nan, "nan": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}.get(value, math.nan)
    return float(value)


def load_history(history: Any) -> list[dict[str, float]]:
    """Rows ``{'step': int, name: float}`` from a ``.jsonl`` path, a list of metric dicts
    (arrays allowed: they are flattened like the writers do), or a dict of columns.
    Rows without ``'step'`` are numbered in order; rows are sorted by step. (For columns,
    TensorBoard and CSV input, restarts and last-write-wins, see :func:`gh.load_history
    <optax_gradhealth.history.load_history>`, which ``gh.diagnose`` reads through.)"""
    from optax_gradhealth.writers import flatten, read_jsonl

    if isinstance(history, (str, os.PathLike)):
        rows = read_jsonl(history)
    elif isinstance(history, Mapping):
        lengths = {len(v) for v in history.values()}
        if len(lengths) > 1:
            raise ValueError(f"gh.diagnose: columns of a dict history must have one length, got {sorted(lengths)}.")
        count = lengths.pop() if lengths else 0
        rows = [{k: v[i] for k, v in history.items()} for i in range(count)]
    else:
        rows = list(history)
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(
                f"gh.diagnose: each history row must be a dict of metrics, row {i} is {type(row).__name__}."
            )
        step = row.get("step", i)
        flat = flatten({k: v for k, v in row.items() if k != "step" and not isinstance(v, str)})
        flat.update({k: _to_float(v) for k, v in row.items() if isinstance(v, str)})
        flat["step"] = int(np.asarray(step))
        out.append(flat)
    out.sort(key=lambda r: r["step"])
    return out


# --------------------------------------------------------------------------- patterns


def _finding(pattern: str, summary: str, steps: Iterable[int], evidence: dict[str, Any]) -> Finding:
    title, causes, mitigations = PLAYBOOK[pattern]
    clean = {k: (round(float(v), 6) if isinstance(v, (float, np.floating)) else v) for k, v in evidence.items()}
    clean = {k: (int(v) if isinstance(v, (np.integer, np.bool_)) else v) for k, v in clean.items()}
    return Finding(
        pattern=pattern,
        title=title,
        severity=_SEVERITY.get(pattern, "warning"),
        summary=summary,
        steps=tuple(sorted(int(s) for s in steps)),
        evidence=clean,
        causes=causes,
        mitigations=mitigations,
    )


def _replayed_spikes(norm: np.ndarray, th: Thresholds) -> tuple[np.ndarray, np.ndarray]:
    """``(spike, ratio)`` per row: the guard's spike rule replayed over the logged norms."""
    rule = detect.SpikeRule(
        th.spike_score,
        th.spike_zscore,
        th.spike_window,
        th.warmup_steps,
        SPREAD_FLOOR,
        min(SPIKE_BASELINE, th.spike_window),
        REBASELINE_AFTER,
    )
    out = detect.replay_spikes(rule, np.asarray(norm, np.float32))
    return np.array(out["spike"]), np.array(out["ratio"], np.float64)


def _single_node(h: _History, th: Thresholds) -> list[Finding]:
    found: list[Finding] = []
    if not h.has("grad/norm"):
        return found
    steps = h.steps
    norm = h.col("grad/norm")
    finite = np.isfinite(norm)
    if h.has("grad/finite"):
        finite &= h.col("grad/finite") != 0
    skipped = h.col("grad/skipped") == 1 if h.has("grad/skipped") else ~finite
    accepted = finite & ~skipped

    # Non-finite steps.
    counter = np.nanmax(h.col("grad/num_nonfinite")) if h.has("grad/num_nonfinite") else 0.0
    bad = ~finite
    if bad.any() or counter > 0:
        evidence = {"nonfinite_logged_steps": int(bad.sum()), "fraction": float(bad.mean())}
        if h.has("grad/num_nonfinite"):
            evidence["num_nonfinite_counter"] = int(counter)
        if h.has("grad/skipped"):
            evidence["skipped_of_them"] = int((bad & skipped).sum())
        if h.has("grad/first_nonfinite_leaf") and bad.any():
            leaf = h.col("grad/first_nonfinite_leaf")[bad]
            evidence["first_nonfinite_leaf"] = int(leaf[np.isfinite(leaf)][0]) if np.isfinite(leaf).any() else -1
        run = _longest_run(bad)
        evidence["longest_run"] = run
        first = int(steps[bad][0]) if bad.any() else None
        where = f"first at step {first}" if first is not None else "between logged steps (counter only)"
        found.append(
            _finding(
                "nonfinite", f"{max(int(bad.sum()), int(counter))} non-finite step(s), {where}", steps[bad], evidence
            )
        )

    # Explosion: the guard's spike rule (as logged, or replayed here on the norms).
    if h.has("grad/spike_score"):
        # The guard's rule on its logged scores (the same thresholds by default, so the
        # same steps as grad/spike, loss spikes aside; other thresholds re-judge them).
        score = np.nan_to_num(h.col("grad/spike_score"), nan=0.0)
        spikes = finite & (score > th.spike_score)
        source = "grad/spike_score"
        if h.has("grad/zscore"):
            spikes &= np.nan_to_num(h.col("grad/zscore"), nan=0.0) > th.spike_zscore
            source = "grad/spike_score and grad/zscore"
    else:
        spikes, score = _replayed_spikes(np.where(finite, norm, np.nan), th)
        spikes = spikes & finite
        source = "the guard's spike rule replayed on grad/norm"
    if spikes.any():
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
            evidence["num_spikes_counter"] = int(np.nanmax(h.col("grad/num_spikes")))
        if h.has("grad/momentum_reset"):
            evidence["momentum_resets"] = int((h.col("grad/momentum_reset") == 1).sum())
        layer = _largest_layer_jump(h, worst)
        if layer is not None:
            evidence["largest_layer_jump"] = layer[0]
            evidence["layer_jump_ratio"] = layer[1]
        found.append(
            _finding(
                "explosion",
                f"{int(spikes.sum())} spike(s) with spike score > {th.spike_score:g} (max {score[worst]:.3g} "
                f"at step {int(steps[worst])})",
                steps[spikes],
                evidence,
            )
        )

    # Vanishing: tiny finite norms while the loss is still high.
    tiny = finite & (norm < th.vanishing_norm)
    loss_note = "no loss logged"
    if h.has("loss"):
        loss = h.col("loss")
        first_losses = loss[np.isfinite(loss)][:10]
        if first_losses.size:
            initial = float(np.median(first_losses))
            tiny &= np.isfinite(loss) & (loss >= th.vanishing_loss_fraction * initial)
            loss_note = f"loss >= {th.vanishing_loss_fraction:g} x initial {initial:.4g}"
    if tiny.sum() >= th.vanishing_min_steps:
        found.append(
            _finding(
                "vanishing",
                f"{int(tiny.sum())} step(s) with norm < {th.vanishing_norm:g} ({loss_note})",
                steps[tiny],
                {
                    "vanishing_steps": int(tiny.sum()),
                    "median_norm_there": float(np.median(norm[tiny])),
                    "threshold": th.vanishing_norm,
                    "condition": loss_note,
                },
            )
        )

    # Oscillation: frequent large swings between consecutive finite norms after warm-up.
    after = np.arange(len(norm)) >= th.warmup_steps
    usable = finite & after & (norm > 0)
    pair = usable[1:] & usable[:-1]
    if pair.sum() >= th.min_steps:
        ratio = np.abs(np.log(norm[1:][pair] / norm[:-1][pair]))
        swings = ratio > math.log(th.oscillation_ratio)
        fraction = float(swings.mean())
        if fraction >= th.oscillation_fraction:
            swing_steps = steps[1:][pair][swings]
            values = norm[usable]
            found.append(
                _finding(
                    "oscillation",
                    f"{fraction:.0%} of steps change the norm by more than {th.oscillation_ratio:g}x",
                    swing_steps,
                    {
                        "swing_fraction": fraction,
                        "threshold_fraction": th.oscillation_fraction,
                        "norm_cv": float(np.std(values) / np.mean(values)),
                        "steps_judged": int(pair.sum()),
                    },
                )
            )

    # Clipping on (almost) every step, or never.
    if h.has("grad/clipped") and h.has("grad/clip_threshold"):
        threshold = h.col("grad/clip_threshold")
        judged = accepted & after & np.isfinite(threshold)
        if judged.sum() >= th.min_steps:
            clipped = h.col("grad/clipped")[judged] == 1
            fraction = float(clipped.mean())
            calib = norm[finite & after]
            suggest = float(np.percentile(calib, th.clip_suggest_percentile))
            median_threshold = float(np.median(threshold[judged]))
            p99 = float(np.percentile(calib, 99))
            evidence = {
                "clipped_fraction": fraction,
                "median_threshold": median_threshold,
                "median_norm": float(np.median(calib)),
                "p99_norm": p99,
                "suggested_max_norm": suggest,
                "suggested_from": f"p{th.clip_suggest_percentile:g} of {calib.size} finite norms after warm-up",
            }
            if fraction >= th.clip_always_fraction:
                found.append(
                    _finding(
                        "clip_always",
                        f"clipped on {fraction:.0%} of steps at threshold {median_threshold:.4g}; "
                        f"suggested max_norm {suggest:.4g}",
                        steps[judged][clipped],
                        evidence,
                    )
                )
            elif fraction == 0.0 and median_threshold >= th.clip_never_margin * p99:
                found.append(
                    _finding(
                        "clip_never",
                        f"never clipped; threshold {median_threshold:.4g} is {median_threshold / p99:.3g}x the p99 "
                        f"norm; suggested max_norm {suggest:.4g}",
                        (),
                        evidence,
                    )
                )

    # Rollback recommendation raised.
    if h.has("grad/rollback"):
        flag = h.col("grad/rollback") == 1
        if flag.any():
            starts = steps[flag & ~np.concatenate([[False], flag[:-1]])]
            found.append(
                _finding(
                    "rollback",
                    f"the guard recommended a rollback at step {int(starts[0])}"
                    + (f" ({len(starts)} episodes)" if len(starts) > 1 else ""),
                    starts,
                    {"episodes": len(starts), "flagged_steps": int(flag.sum())},
                )
            )
    return found


def _longest_run(flags: np.ndarray) -> int:
    """The longest run of consecutive True values."""
    padded = np.concatenate([[False], np.asarray(flags, bool), [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))  # starts (0 -> 1) and ends (1 -> 0), alternating
    return int((edges[1::2] - edges[::2]).max()) if edges.size else 0


def _restarts(h: History) -> list[Finding]:
    if not h.restarts:
        return []
    pairs = ", ".join(f"{a} -> {b}" for a, b in list(zip(h.restarted_from, h.restarts))[:5])
    more = " ..." if len(h.restarts) > 5 else ""
    return [
        _finding(
            "restart",
            f"the step went backwards {len(h.restarts)} time(s) ({pairs}{more}); "
            f"{h.rows_replaced} overlapping row(s) replaced by the later write",
            h.restarts,
            {
                "restarts": len(h.restarts),
                "resumed_at": list(h.restarts),
                "went_back_from": list(h.restarted_from),
                "rows_replaced": h.rows_replaced,
            },
        )
    ]


def _largest_layer_jump(h: _History, row: int) -> tuple[str, float] | None:
    """The layer whose norm at ``row`` is the largest multiple of its median."""
    best = None
    for name in h.layer_names():
        values = h.col(f"grad/layer_norm/{name}")
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


def _reduced(h: _History, name: str, reduce) -> np.ndarray | None:
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


def _flagged_indices(h: _History, name: str, rows: np.ndarray) -> list[tuple[int, ...]]:
    """The ``name/i[/j]`` entries that are non-zero on any of ``rows``."""
    return [
        idx
        for idx in h.indexed(name)
        if np.any(np.nan_to_num(h.col(name + "".join(f"/{i}" for i in idx))[rows]) != 0)
        and (len(idx) != 2 or idx[0] != idx[1])
    ]


def _rolling_median_before(values: np.ndarray, t: int, window: int) -> float:
    return float(np.median(values[t - window : t]))


def _cross_device(h: _History, th: Thresholds) -> list[Finding]:
    found: list[Finding] = []
    steps = h.steps

    # High dispersion of the per-device norms.
    if h.has("xdev/norm_cv"):
        cv = h.col("xdev/norm_cv")
        ok = np.isfinite(cv)
        if ok.sum() >= th.min_steps:
            high = ok & (cv > th.dispersion_cv)
            fraction = float(high.sum() / ok.sum())
            if fraction >= th.dispersion_fraction:
                evidence = {
                    "fraction": fraction,
                    "median_norm_cv": float(np.median(cv[ok])),
                    "threshold": th.dispersion_cv,
                }
                if h.has("xdev/norm_max_over_min"):
                    ratio = h.col("xdev/norm_max_over_min")
                    evidence["max_norm_max_over_min"] = float(np.nanmax(np.where(np.isfinite(ratio), ratio, np.nan)))
                found.append(
                    _finding(
                        "high_dispersion",
                        f"per-device norm CV > {th.dispersion_cv:g} on {fraction:.0%} of steps",
                        steps[high],
                        evidence,
                    )
                )

    # Agreement: every step (xdev/agreement), else the audits' mean pairwise cosine.
    name = "xdev/agreement" if h.has("xdev/agreement") else "xdev/mean_pairwise_cosine"
    agreement = h.col(name) if h.has(name) else np.full(len(h), np.nan)
    if name == "xdev/mean_pairwise_cosine" and h.has("xdev/audited"):
        agreement = np.where(h.col("xdev/audited") == 1, agreement, np.nan)
    ok = np.isfinite(agreement)
    a, a_steps = agreement[ok], steps[ok]
    dropped = False
    if a.size > th.agreement_window:
        # The rolling median only where the value is low (the same medians, vectorised).
        low_at = np.flatnonzero(a[th.agreement_window :] < th.agreement_drop_after) + th.agreement_window
        windows = np.lib.stride_tricks.sliding_window_view(a, th.agreement_window)
        medians = np.median(windows[low_at - th.agreement_window], axis=1) if low_at.size else np.zeros(0)
        drops = low_at[medians > th.agreement_drop_before].tolist()
        if drops:
            dropped = True
            t0 = drops[0]
            after = a[t0:]
            found.append(
                _finding(
                    "agreement_drop",
                    f"{name} fell from {_rolling_median_before(a, t0, th.agreement_window):.3g} to {a[t0]:.3g} "
                    f"at step {int(a_steps[t0])}",
                    a_steps[drops],
                    {
                        "median_before": _rolling_median_before(a, t0, th.agreement_window),
                        "value_at_drop": float(a[t0]),
                        "median_after": float(np.median(after)),
                        "metric": name,
                    },
                )
            )
    if a.size >= th.min_steps:
        low = a < th.agreement_low
        if not dropped and low.mean() >= th.agreement_low_fraction:
            evidence = {"fraction_low": float(low.mean()), "median_agreement": float(np.median(a)), "metric": name}
            if h.has("xdev/noise_scale"):
                noise = h.col("xdev/noise_scale")
                noise = noise[np.isfinite(noise)]
                if noise.size:
                    evidence["median_noise_scale"] = float(np.median(noise))
            found.append(
                _finding(
                    "agreement_low",
                    f"{name} < {th.agreement_low:g} on {low.mean():.0%} of steps (median {np.median(a):.3g})",
                    a_steps[low],
                    evidence,
                )
            )
    high = a > th.agreement_high
    high_fraction = float(high.mean()) if a.size >= th.min_steps else 0.0
    duplicate = _reduced(h, "xdev/duplicate_pairs", np.sum)
    audit_rows = h.col("xdev/audited") == 1 if h.has("xdev/audited") else np.ones(len(h), bool)
    # Audit values are held between audits: count them on audit rows only.
    dup_rows = audit_rows & (np.nan_to_num(duplicate) > 0) if duplicate is not None else np.zeros(len(h), bool)
    if high_fraction >= th.agreement_high_fraction or dup_rows.any():
        evidence = {"fraction_high": high_fraction, "metric": name}
        if a.size:
            evidence["median_agreement"] = float(np.median(a))
        if duplicate is not None:
            evidence["max_duplicate_pairs"] = int(np.nanmax(np.nan_to_num(duplicate)))
            pairs = _flagged_indices(h, "xdev/duplicate_pairs", audit_rows)
            if pairs:
                evidence["duplicate_device_pairs"] = sorted({tuple(sorted(p)) for p in pairs if len(p) == 2})
        found.append(
            _finding(
                "agreement_high",
                "; ".join(
                    ([f"{name} > {th.agreement_high:g} on {high_fraction:.0%} of steps"] if high.any() else [])
                    + (
                        [
                            "bit-identical gradients on device pairs "
                            + ", ".join(f"{j}-{k}" for j, k in evidence.get("duplicate_device_pairs", []))
                            + f" at {int(dup_rows.sum())} audit(s)"
                        ]
                        if dup_rows.any()
                        else []
                    )
                ),
                sorted(set(a_steps[high].tolist()) | set(steps[dup_rows].tolist())),
                evidence,
            )
        )
    if not dropped and a.size >= 4 * th.agreement_window:
        quarters = [float(np.median(q)) for q in np.array_split(a, 4)]
        non_increasing = all(later <= earlier + 0.02 for earlier, later in itertools.pairwise(quarters))
        if non_increasing and quarters[0] - quarters[-1] >= th.drift_drop:
            found.append(
                _finding(
                    "agreement_drift",
                    f"{name} declined gradually from {quarters[0]:.3g} to {quarters[-1]:.3g} (quarter medians)",
                    (),
                    {"quarter_medians": quarters, "threshold_drop": th.drift_drop, "metric": name},
                )
            )

    # Outlier devices and near-duplicate pairs: the audit detectors' verdicts, as logged
    # or replayed here on the logged per-device norms and cosines (the same rules).
    found += _outlier_findings(h, th, audit_rows)
    found += _near_duplicate_findings(h, th, audit_rows)

    # Parameter desync.
    desync = _reduced(h, "xdev/param_desync", np.max)
    if desync is not None:
        desync = np.where(audit_rows, np.nan_to_num(desync, nan=0.0), 0.0)
        bad = desync > th.param_desync
        if bad.any():
            found.append(
                _finding(
                    "param_desync",
                    f"replica parameters differ at {int(bad.sum())} step(s), first at step {int(steps[bad][0])}",
                    steps[bad],
                    {
                        "max_param_desync": float(desync.max()),
                        "threshold": th.param_desync,
                        "devices": sorted({p[0] for p in _flagged_indices(h, "xdev/param_desync", bad) if len(p) == 1}),
                    },
                )
            )
    return found


def _matrix(h: _History, name: str) -> np.ndarray | None:
    """``[T, K, K]`` from ``name/j/k`` columns, or None."""
    index = [i for i in h.indexed(name) if len(i) == 2]
    if not index:
        return None
    k = max(max(i) for i in index) + 1
    out = np.zeros((len(h), k, k))
    for j, m in index:
        out[:, j, m] = np.nan_to_num(h.col(f"{name}/{j}/{m}"))
    return out


def _audit_verdicts(h: _History, audit_rows: np.ndarray) -> detect.AuditVerdict | None:
    """The audit detectors replayed over the audit rows (None without the vectors)."""
    norms, cosines = h.vector("xdev/device_norms"), h.vector("xdev/cosine_to_mean")
    if norms is None or cosines is None or not audit_rows.any():
        return None
    from optax_gradhealth import _cross_device

    pairs = _matrix(h, "xdev/pairwise_cosine")
    return detect.replay_audits(
        norms[audit_rows],
        cosines[audit_rows],
        None if pairs is None else pairs[audit_rows],
        **_cross_device.default_audit_rule(),
    )


def _outlier_findings(h: _History, th: Thresholds, audit_rows: np.ndarray) -> list[Finding]:
    from optax_gradhealth._cross_device import describe_outlier

    steps = h.steps
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
        verdicts = _audit_verdicts(h, audit_rows)
        if verdicts is None:
            return []
        k = verdicts.outlier_devices.shape[-1]
        named = np.zeros((len(h), k), bool)
        named[audit_rows] = np.asarray(verdicts.outlier_devices)
        for name, values in (
            ("norm_score", verdicts.scores.norm_score),
            ("direction_score", verdicts.scores.direction_score),
            ("outlier_evidence", verdicts.outlier_evidence),
        ):
            full = np.zeros((len(h), k))
            full[audit_rows] = np.asarray(values)
            scores[name] = full
        source = "the audit detectors replayed on xdev/device_norms and xdev/cosine_to_mean"
    named = (named != 0) & audit_rows[:, None]
    found = []
    for device in np.nonzero(named.any(axis=0))[0]:
        device = int(device)
        rows = named[:, device]
        first = int(np.argmax(rows))
        since = int(audit_rows[first:].sum())
        fraction = float(rows.sum() / since)
        if rows.sum() < th.outlier_min_audits or fraction < th.outlier_fraction:
            continue
        evidence: dict[str, Any] = {
            "device": device,
            "audits_named": int(rows.sum()),
            "fraction_of_audits": fraction,
            "audits_since_first_flag": since,
            "source": source,
        }
        summary = f"device {device} named at {int(rows.sum())} of {since} audits since step {int(steps[first])}"
        if h.has("xdev/outlier_score"):
            evidence["median_outlier_score"] = float(np.nanmedian(h.col("xdev/outlier_score")[rows]))
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
                evidence["median_cosine_to_mean_device"] = float(np.nanmedian(cosines[rows, device]))
                evidence["median_cosine_to_mean_others"] = float(np.nanmedian(others))
            others = np.delete(norms[rows], device, axis=1)
            evidence["norm_ratio_to_others"] = float(np.nanmedian(norms[rows, device]) / np.nanmedian(others))
        found.append(_finding("outlier_device", summary, steps[rows], evidence))
    return found


def _near_duplicate_findings(h: _History, th: Thresholds, audit_rows: np.ndarray) -> list[Finding]:
    steps = h.steps
    flagged = _matrix(h, "xdev/near_duplicate_pairs")
    source = "xdev/near_duplicate_pairs (logged)"
    if flagged is None:
        if not h.indexed("xdev/pairwise_cosine"):
            return []
        verdicts = _audit_verdicts(h, audit_rows)
        if verdicts is None:
            return []
        k = verdicts.near_duplicate_pairs.shape[-1]
        flagged = np.zeros((len(h), k, k), bool)
        flagged[audit_rows] = np.asarray(verdicts.near_duplicate_pairs)
        source = "the near-duplicate detector replayed on xdev/pairwise_cosine"
    flagged = (flagged != 0) & audit_rows[:, None, None]
    exact = _matrix(h, "xdev/duplicate_pairs")
    cos = _matrix(h, "xdev/pairwise_cosine")
    found = []
    k = flagged.shape[1]
    for j in range(k):
        for m in range(j + 1, k):
            rows = flagged[:, j, m] | flagged[:, m, j]
            if exact is not None:
                rows &= (exact[:, j, m] == 0) & (exact[:, m, j] == 0)
            if rows.sum() < max(th.near_duplicate_min_audits, 1):
                continue
            evidence: dict[str, Any] = {"devices": [j, m], "audits_flagged": int(rows.sum()), "source": source}
            summary = f"devices {j} and {m} have nearly the same gradients at {int(rows.sum())} audit(s)"
            if cos is not None and cos.shape[1] == k:
                off = ~np.eye(k, dtype=bool)
                off[j, m] = off[m, j] = False
                evidence["median_pair_cosine"] = float(np.median(cos[rows][:, j, m]))
                evidence["median_other_pairs_cosine"] = float(np.median(cos[rows][:, off]))
                summary += (
                    f" (pair cosine {evidence['median_pair_cosine']:.2f} vs "
                    f"{evidence['median_other_pairs_cosine']:.2f} for the other pairs)"
                )
            found.append(_finding("near_duplicate", summary, steps[rows], evidence))
    return found


def diagnose(history: Any, thresholds: Thresholds | None = None) -> list[Finding]:
    """Finds the known unhealthy patterns in a run's logged metrics.

    Args:
      history: the run's metrics: a path to a JSON Lines log
        (:class:`optax_gradhealth.writers.JsonlWriter`), a TensorBoard log directory, a
        ``.csv`` W&B history export, a list of metric dicts (one per logged step, each
        optionally with ``'step'``; values may be arrays, e.g. straight from
        ``gh.metrics``), a dict of equal-length columns or a :class:`gh.History
        <optax_gradhealth.history.History>` (all read by :func:`gh.load_history
        <optax_gradhealth.history.load_history>`: a step logged twice keeps its last
        write). Optional extra column: ``'loss'`` (used by the vanishing pattern).
      thresholds: a :class:`Thresholds` (default: the documented defaults).

    Returns:
      A list of :class:`Finding`, errors first, then warnings; empty for a healthy run.
      Patterns: ``nonfinite``, ``explosion``, ``vanishing``, ``oscillation``,
      ``clip_always``, ``clip_never``, ``rollback`` and, with ``xdev/...`` metrics,
      ``high_dispersion``, ``agreement_drop``, ``agreement_low``, ``agreement_high``,
      ``agreement_drift``, ``outlier_device``, ``near_duplicate``, ``param_desync``;
      ``restart`` (info) when the step went backwards in the log (a resumed run).

    Example:
      >>> import optax_gradhealth as gh
      >>> rows = [{'step': t, 'grad/norm': 1.0 + 0.01 * (t % 3)} for t in range(100)]
      >>> rows[60]['grad/norm'] = 9.0
      >>> [f.pattern for f in gh.diagnose(rows)]
      ['explosion']
      >>> gh.diagnose(rows)[0].steps
      (60,)
    """
    th = thresholds if thresholds is not None else Thresholds()
    if not isinstance(th, Thresholds):
        raise TypeError(f"gh.diagnose: `thresholds` must be a gh.Thresholds, got {type(th).__name__}.")
    h = _load_columns(history)
    if not len(h):
        return []
    found = _single_node(h, th) + _cross_device(h, th) + _restarts(h)
    return sorted(found, key=lambda f: (_SEVERITY_ORDER[f.severity], f.steps[0] if f.steps else 1 << 62))
