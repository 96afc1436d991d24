"""The vocabulary of the diagnosis: thresholds, patterns, findings."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from optax_gradhealth._guard import SPIKE_THRESHOLD, SPIKE_WINDOW, SPIKE_ZSCORE

__all__ = ["SEVERITIES", "Finding", "Pattern", "Thresholds", "format_findings"]

#: The severities, most urgent first: ``error`` (act now), ``warning``, ``info`` (worth
#: knowing, not a fault).
SEVERITIES = ("error", "warning", "info")


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """The numbers each pattern is judged by (see ``docs/diagnosis.md``).

    Attributes:
      warmup_rows: leading rows of the log ignored by the statistics computed here
        (spike score from norms when ``grad/spike_score`` is absent, oscillation, clip
        calibration). Rows, not steps: with ``MetricLogger(log_every=N)`` they cover
        ``N`` times as many steps. (0.1.0 called it ``warmup_steps``, a name that means
        accepted steps elsewhere; the old keyword still works, with a warning, but not
        beside ``warmup_rows``.) The integer fields take ints (``12``, not ``12.0``).
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
      vanishing_layer_ratio: vanishing in the layers: with ``grad/leaf_norm/<path>``
        and a ``loss`` column, the largest leaf's median gradient norm is more than this
        multiple of the smallest non-zero one's while the loss is still at least
        ``vanishing_loss_fraction`` of its initial value (training stuck).
      vanishing_leaf_fraction: vanishing in the layers needs at least this fraction of
        the leaves (with a non-zero median norm) below the largest by that ratio: a
        starved stack of layers, not one or two leaves whose gradient is near 0 by
        construction (an attention key's bias: the softmax ignores a constant per query).
      oscillation_loss_fraction: oscillation is not reported when the median loss of
        the last quarter of the judged rows is below this fraction of the first
        quarter's (training progresses: the swings are minibatch noise).
      overflow_fraction: a dynamic loss scale overflows too often when
        ``grad/num_overflows`` grows on more than this fraction of the steps after
        warm-up, beyond the scale's growths when ``grad/loss_scale`` is logged (a
        healthy scale overflows about once per growth interval).
      oscillation_ratio: a swing is a step-to-step change of the norm by more than
        this factor (up or down)...
      oscillation_fraction: ...and oscillation is a fraction of swings above this.
      direction_negative: a step-to-step cosine (``grad/step_cosine``) below this is a
        reversal of the direction...
      direction_oscillation_fraction: ...and reversals on at least this fraction of the
        steps after warm-up are an oscillation of the direction.
      direction_drift_cosine: a median step-to-step cosine above this after warm-up is a
        slow drift (the direction barely changes from step to step).
      update_ratio_high: a leaf whose median ``update/leaf_param_ratio/<path>`` (or,
        without per-leaf ratios, ``update/param_ratio``) over the accepted steps after
        warm-up exceeds this trains too fast (10x above the usual band, 1e-4 to 1e-2).
      update_ratio_low: a leaf that moves but whose median ratio is below this trains
        too slowly (10x below the band); a ratio of exactly 0 on every such step is a
        dead (or frozen) leaf.
      leaf_clip_fraction: a per-leaf or per-element clip mode whose clipped fraction
        (``grad/leaf_clip_fraction``, ``grad/agc_clip_fraction``,
        ``grad/adagc_clip_fraction``, ``grad/value_clip_fraction``) has at least this
        median over the accepted steps after warm-up is too tight.
      batch_size: the examples per optimizer step (micro-batch times accumulation
        steps, times devices); None (default): the batch is not compared with the
        noise scale.
      noise_scale_factor: with ``batch_size``, a finding when the late median noise
        scale is more than this factor above or below the batch.
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
      drift_drop: gradual divergence: quarter medians of the agreement after the first
        ``warmup_rows`` rows never rise and the first quarter's exceeds the last
        quarter's by at least this.
      outlier_fraction: a device named by the outlier detector is reported when, from
        one of its namings on, it was named on at least this fraction of the audits...
      outlier_min_audits: ...and on at least this many audits. A device named only now
        and then (early in training, when the other devices agree closely, one noisy
        device can score high for an audit or a few) is not reported; a device whose
        gradient was non-finite or exactly zero at an audit always is.
      outlier_run_audits: ...or when this many audits in a row named it, however long the
        log goes on after (a fault that stands out while the gradient signal is strong
        and sinks into the noise later; clean runs' transients last a few audits).
      near_duplicate_min_audits: a pair flagged by the near-duplicate detector is
        reported when flagged on at least this many audits. (A pair whose logged
        ``xdev/pairwise_cosine`` stands near 1 far above the other pairs' is reported
        too: ``diagnosis.cross_device.NEAR_DUPLICATE_DISTANCE``.)
      param_desync: parameter desync when ``xdev/param_desync`` exceeds this.

    Example:
      >>> import optax_gradhealth as gh
      >>> rows = [{'step': t, 'grad/norm': 1.0 + 0.01 * (t % 3)} for t in range(100)]
      >>> rows[60]['grad/norm'] = 4.0  # a x4 jump: below the default spike_score of 5
      >>> [f.pattern for f in gh.diagnose(rows)]
      []
      >>> [f.pattern for f in gh.diagnose(rows, gh.Thresholds(spike_score=3.0))]
      ['explosion']
    """

    warmup_rows: int = 20
    min_steps: int = 10
    spike_score: float = SPIKE_THRESHOLD
    spike_zscore: float = SPIKE_ZSCORE
    spike_window: int = SPIKE_WINDOW
    vanishing_norm: float = 1e-5
    vanishing_loss_fraction: float = 0.5
    vanishing_min_steps: int = 5
    vanishing_layer_ratio: float = 1e3
    vanishing_leaf_fraction: float = 0.25
    oscillation_loss_fraction: float = 0.5
    overflow_fraction: float = 0.02
    oscillation_ratio: float = 2.0
    oscillation_fraction: float = 0.2
    direction_negative: float = -0.2
    direction_oscillation_fraction: float = 0.3
    direction_drift_cosine: float = 0.9
    update_ratio_high: float = 0.1
    update_ratio_low: float = 1e-5
    leaf_clip_fraction: float = 0.5
    batch_size: int | None = None
    noise_scale_factor: float = 10.0
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
    outlier_fraction: float = 0.5
    outlier_min_audits: int = 3
    outlier_run_audits: int = 20
    near_duplicate_min_audits: int = 1
    param_desync: float = 0.0

    def __post_init__(self) -> None:
        for name in _RANGES:
            value = getattr(self, name)
            if value is None and name == "batch_size":
                continue
            _check_field(name, value)


_INF = math.inf
# field -> (kind, lowest, highest, the range in words); _OPEN: ends that are excluded.
_RANGES: dict[str, tuple[type, float, float, str]] = {
    "warmup_rows": (int, 0, _INF, "an integer >= 0"),
    "min_steps": (int, 1, _INF, "an integer >= 1"),
    "spike_score": (float, 1.0, _INF, "a number > 1 (a ratio norm / baseline norm)"),
    "spike_zscore": (float, 0.0, _INF, "a number > 0"),
    "spike_window": (int, 1, _INF, "an integer >= 1"),
    "vanishing_norm": (float, 0.0, _INF, "a number >= 0"),
    "vanishing_loss_fraction": (float, 0.0, _INF, "a number >= 0 (a fraction of the initial loss)"),
    "vanishing_min_steps": (int, 1, _INF, "an integer >= 1"),
    "vanishing_layer_ratio": (float, 1.0, _INF, "a number >= 1 (a ratio of gradient norms)"),
    "vanishing_leaf_fraction": (float, 0.0, 1.0, "a fraction in [0, 1]"),
    "oscillation_loss_fraction": (float, 0.0, 1.0, "a fraction in [0, 1]"),
    "overflow_fraction": (float, 0.0, 1.0, "a fraction in [0, 1]"),
    "oscillation_ratio": (float, 1.0, _INF, "a number >= 1 (a factor)"),
    "oscillation_fraction": (float, 0.0, 1.0, "a fraction in [0, 1]"),
    "direction_negative": (float, -1.0, 1.0, "a cosine in [-1, 1]"),
    "direction_oscillation_fraction": (float, 0.0, 1.0, "a fraction in [0, 1]"),
    "direction_drift_cosine": (float, -1.0, 1.0, "a cosine in [-1, 1]"),
    "update_ratio_high": (float, 0.0, _INF, "a number >= 0"),
    "update_ratio_low": (float, 0.0, _INF, "a number >= 0"),
    "leaf_clip_fraction": (float, 0.0, 1.0, "a fraction in [0, 1]"),
    "batch_size": (int, 1, _INF, "None or an integer >= 1"),
    "noise_scale_factor": (float, 1.0, _INF, "a number >= 1 (a factor)"),
    "clip_always_fraction": (float, 0.0, 1.0, "a fraction in [0, 1]"),
    "clip_never_margin": (float, 0.0, _INF, "a number > 0 (a multiple of the p99 norm)"),
    "clip_suggest_percentile": (float, 0.0, 100.0, "a percentile in [0, 100]"),
    "dispersion_cv": (float, 0.0, _INF, "a number >= 0"),
    "dispersion_fraction": (float, 0.0, 1.0, "a fraction in [0, 1]"),
    "agreement_drop_before": (float, -1.0, 1.0, "a cosine in [-1, 1]"),
    "agreement_drop_after": (float, -1.0, 1.0, "a cosine in [-1, 1]"),
    "agreement_window": (int, 1, _INF, "an integer >= 1"),
    "agreement_low": (float, -1.0, 1.0, "a cosine in [-1, 1]"),
    "agreement_low_fraction": (float, 0.0, 1.0, "a fraction in [0, 1]"),
    "agreement_high": (float, -1.0, 1.0, "a cosine in [-1, 1]"),
    "agreement_high_fraction": (float, 0.0, 1.0, "a fraction in [0, 1]"),
    "drift_drop": (float, 0.0, 2.0, "a number in [0, 2] (a fall of a cosine)"),
    "outlier_fraction": (float, 0.0, 1.0, "a fraction in [0, 1]"),
    "outlier_min_audits": (int, 1, _INF, "an integer >= 1"),
    "outlier_run_audits": (int, 1, _INF, "an integer >= 1"),
    "near_duplicate_min_audits": (int, 1, _INF, "an integer >= 1"),
    "param_desync": (float, 0.0, _INF, "a number >= 0"),
}
_OPEN = {"spike_score": (1.0,), "spike_zscore": (0.0,), "clip_never_margin": (0.0,)}


def _check_field(name: str, value: Any, label: str | None = None) -> None:
    """Raises when ``value`` is outside the range of the field ``name`` (``_RANGES``);
    the error calls the field ``label`` (default: its name)."""
    kind, low, high, allowed = _RANGES[name]
    label = name if label is None else label
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"Thresholds.{label} must be {allowed}, got {value!r}.")
    if kind is int and not isinstance(value, (int, np.integer)):  # 12.0 is refused, as on the command line
        raise ValueError(f"Thresholds.{label} must be {allowed}, got {value!r}.")
    if not math.isfinite(value) or not (low <= value <= high) or value in _OPEN.get(name, ()):
        raise ValueError(f"Thresholds.{label} must be {allowed}, got {value!r}.")


_dataclass_init = Thresholds.__init__


@functools.wraps(_dataclass_init)
def _thresholds_init(self, *args: Any, warmup_steps: int | None = None, **kwargs: Any) -> None:
    # The keyword of 0.1.0 for `warmup_rows` (goes in 0.4). Not a dataclass field, so
    # that dataclasses.replace keeps (and can change) warmup_rows without a warning.
    if warmup_steps is not None:
        import warnings

        if args or "warmup_rows" in kwargs:  # warmup_rows is the first field: positional or by name
            given = kwargs["warmup_rows"] if "warmup_rows" in kwargs else args[0]
            raise TypeError(
                f"gh.Thresholds: got warmup_rows={given!r} and warmup_steps={warmup_steps!r}, its deprecated "
                "name: give warmup_rows only, not both."
            )

        warnings.warn(
            "gh.Thresholds(warmup_steps=...) is deprecated: use warmup_rows=... (leading log rows, not "
            "accepted steps). The old keyword goes in 0.4.",
            DeprecationWarning,
            stacklevel=2,
        )
        # Checked under the keyword it came in as, so that an error names that one.
        _check_field("warmup_rows", warmup_steps, label="warmup_steps (deprecated name of warmup_rows)")
        kwargs["warmup_rows"] = warmup_steps
    _dataclass_init(self, *args, **kwargs)


_signature = inspect.signature(_dataclass_init)
_thresholds_init.__signature__ = _signature.replace(
    parameters=[
        *_signature.parameters.values(),
        inspect.Parameter("warmup_steps", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="int | None"),
    ]
)
Thresholds.__init__ = _thresholds_init
assert set(_RANGES) == {f.name for f in dataclasses.fields(Thresholds)}

# The 0.1.0 attribute reads on: `th.warmup_steps` is `th.warmup_rows`.
Thresholds.warmup_steps = property(lambda self: self.warmup_rows, doc="Deprecated name of ``warmup_rows``.")


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A known unhealthy pattern: what it is called and what to do about it.

    ``docs/diagnosis.md`` is the long form of each.

    Attributes:
      name: the pattern's key (``Finding.pattern``), e.g. ``'explosion'``.
      title: what it is, in words.
      severity: one of :data:`SEVERITIES`.
      causes: likely causes.
      mitigations: what to do.
    """

    name: str
    title: str
    severity: str
    causes: tuple[str, ...]
    mitigations: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"Pattern {self.name!r}: severity must be one of {SEVERITIES}, got {self.severity!r}.")

    def finding(self, summary: str, steps: Iterable[int], evidence: dict[str, Any]) -> Finding:
        """A :class:`Finding` of this pattern (numpy numbers in ``evidence`` made plain)."""
        clean = {k: (round(float(v), 6) if isinstance(v, (float, np.floating)) else v) for k, v in evidence.items()}
        clean = {k: (int(v) if isinstance(v, (np.integer, np.bool_)) else v) for k, v in clean.items()}
        return Finding(
            pattern=self.name,
            title=self.title,
            severity=self.severity,
            summary=summary,
            steps=tuple(sorted(int(s) for s in steps)),
            evidence=clean,
            causes=self.causes,
            mitigations=self.mitigations,
        )


@dataclasses.dataclass(frozen=True)
class Finding:
    """One diagnosed pattern.

    Attributes:
      pattern: the :class:`Pattern`'s name, a key of :data:`PATTERNS` (e.g.
        ``'explosion'``).
      title: what it is, in words.
      severity: ``'error'`` (act now), ``'warning'`` or ``'info'`` (worth knowing, not
        a fault: ``restart``).
      summary: one line with the key numbers.
      steps: the steps where it shows (all of them, sorted).
      evidence: the numbers behind it.
      causes: likely causes.
      mitigations: what to do.

    Example:
      >>> import optax_gradhealth as gh
      >>> rows = [{'step': t, 'grad/norm': 1.0 + 0.01 * (t % 3)} for t in range(100)]
      >>> rows[60]['grad/norm'] = 9.0
      >>> finding = gh.diagnose(rows)[0]
      >>> finding.pattern, finding.severity, finding.steps
      ('explosion', 'error', (60,))
      >>> finding.to_dict()['steps']  # JSON-ready
      [60]
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
        """A dict that is strict JSON (``json.dumps(..., allow_nan=False)`` takes it): a
        NaN or infinite number in the evidence is written as the string ``"NaN"``,
        ``"Infinity"`` or ``"-Infinity"``, as JSONL logs write them.

        Example:
          >>> import dataclasses, json, math
          >>> import optax_gradhealth as gh
          >>> rows = [{'step': t, 'grad/norm': 1.0 + 0.01 * (t % 3)} for t in range(100)]
          >>> rows[60]['grad/norm'] = 9.0
          >>> finding = dataclasses.replace(gh.diagnose(rows)[0], evidence={'ratio': math.inf})
          >>> json.dumps(finding.to_dict()['evidence'], allow_nan=False)
          '{"ratio": "Infinity"}'
        """
        return _json_ready(dataclasses.asdict(self) | {"steps": list(self.steps)})

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


def _json_ready(value: Any) -> Any:
    """``value`` with numpy numbers made Python ones and non-finite floats the strings
    ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (in dicts, lists and tuples)."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def format_findings(findings: Iterable[Finding]) -> str:
    """The findings as text, one block each (or a line saying there are none). When a
    ``no_metrics`` finding is among them (no column of the log is a gradhealth metric),
    the first line says that nothing was judged: no findings then is no all-clear.

    Example:
      >>> import optax_gradhealth as gh
      >>> print(gh.format_findings([]))
      gradhealth diagnosis: no findings (no pattern crossed its threshold).
      >>> rows = [{'step': t, 'grad/norm': 1.0 + 0.01 * (t % 3)} for t in range(100)]
      >>> rows[60]['grad/norm'] = 9.0
      >>> print(gh.format_findings(gh.diagnose(rows)).splitlines()[2])
      [error] gradient explosion (spikes): 1 spike(s) with spike score > 5 (max 8.91 at step 60)
      >>> print(gh.format_findings(gh.diagnose([{'lr': 0.001, 'batch': 32}])).splitlines()[0])
      gradhealth diagnosis: nothing was judged (no gradhealth metric in the log)
    """
    findings = list(findings)
    if not findings:
        return "gradhealth diagnosis: no findings (no pattern crossed its threshold)."
    head = f"gradhealth diagnosis: {len(findings)} finding(s)"
    if any(f.pattern == "no_metrics" for f in findings):
        head = "gradhealth diagnosis: nothing was judged (no gradhealth metric in the log)"
    return head + "\n\n" + "\n\n".join(str(f) for f in findings)
