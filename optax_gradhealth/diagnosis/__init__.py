"""Host-side diagnosis of a run's logged metrics: pattern -> evidence -> causes -> mitigations.

``gh.diagnose(history)`` reads what the optimizer state recorded (``gh.metrics``, logged
by :class:`optax_gradhealth.writers.MetricLogger` or by hand) and returns
:class:`Finding`\\ s. It is plain numpy: it never touches the jitted path and needs no
device.

The package is a list of patterns. Each is a :class:`Pattern` (name, title, severity,
likely causes, mitigations) with one ``check_<name>(history, thresholds)`` that returns
its findings, in :mod:`~optax_gradhealth.diagnosis.single_node` (one run's gradient
statistics) and :mod:`~optax_gradhealth.diagnosis.cross_device` (the audit's ``xdev/...``
metrics). :data:`SUPPRESSED_BY` says, in one place, which finding hides which.

Every threshold is a field of :class:`Thresholds` (documented there and in
``docs/diagnosis.md``); pass your own to tune it::

    findings = gh.diagnose("run.jsonl", thresholds=gh.Thresholds(spike_score=3.0))
    print(gh.format_findings(findings))

A history that lacks a metric simply skips the patterns that need it (no cross-device
finding without ``xdev/...`` metrics, no clipping finding without ``grad/clipped``). A
history with no gradhealth metric at all (a config file, a log whose names carry an
unknown prefix) gets the warning ``no_metrics``: nothing was judged, which an empty
list would hide.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from optax_gradhealth.diagnosis import cross_device, single_node
from optax_gradhealth.diagnosis._columns import copy_view, metric_copies, replay_spike_scores
from optax_gradhealth.diagnosis._core import SEVERITIES, Finding, Pattern, Thresholds, format_findings
from optax_gradhealth.history import History, load_history

__all__ = [
    "CHECKS",
    "PATTERNS",
    "PLAYBOOK",
    "SEVERITIES",
    "SUPPRESSED_BY",
    "Finding",
    "Pattern",
    "Thresholds",
    "diagnose",
    "format_findings",
    "replay_spike_scores",
]

#: Every pattern with its check, in the order they run: ``(Pattern, check)`` where
#: ``check(history, thresholds) -> list[Finding]``.
CHECKS: tuple[tuple[Pattern, Callable[[History, Thresholds], list[Finding]]], ...] = (
    *single_node.CHECKS,
    *cross_device.CHECKS,
)

#: Every pattern, by name.
PATTERNS: dict[str, Pattern] = {pattern.name: pattern for pattern, _ in CHECKS}

#: ``{pattern: (title, causes, mitigations)}``, the playbook ``docs/diagnosis.md``
#: expands (the same words as :data:`PATTERNS`).
PLAYBOOK: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    name: (p.title, p.causes, p.mitigations) for name, p in PATTERNS.items()
}

#: The suppression rules: a finding of a key's pattern is dropped when a finding of one
#: of the listed patterns is present. A sudden drop of agreement explains the low
#: agreement and the decline that follow it; clipping on every step is not also
#: "never clipped".
SUPPRESSED_BY: dict[str, tuple[str, ...]] = {
    "agreement_low": ("agreement_drop",),
    "agreement_drift": ("agreement_drop",),
    "clip_never": ("clip_always",),
}

_RANK = {severity: rank for rank, severity in enumerate(SEVERITIES)}


def diagnose(history: Any, thresholds: Thresholds | None = None) -> list[Finding]:
    """Finds the known unhealthy patterns in a run's logged metrics.

    Args:
      history: the run's metrics: a path to a JSON Lines log
        (:class:`optax_gradhealth.writers.JsonlWriter`), a TensorBoard log directory, a
        ``.csv`` W&B history export, a list of metric dicts (one per logged step, each
        optionally with ``'step'``; values may be arrays, e.g. straight from
        ``gh.metrics``), a dict of equal-length columns or a :class:`gh.History
        <optax_gradhealth.history.History>` (all read by :func:`gh.load_history
        <optax_gradhealth.history.load_history>`: a resumed run's rows supersede the
        abandoned run's, and an eval row joins the row of its step). Optional extra
        column: ``'loss'`` (used by the vanishing pattern).
      thresholds: a :class:`Thresholds` (default: the documented defaults).

    Returns:
      A list of :class:`Finding`, errors first, then warnings, then information; empty
      for a healthy run. Patterns (:data:`PATTERNS`): ``nonfinite``, ``nonfinite_update``, ``loss_scale``,
      ``replay_mismatch``, ``explosion``,
      ``vanishing``, ``oscillation``, ``direction_oscillation``, ``direction_drift``,
      ``update_ratio_high``, ``update_ratio_low``, ``dead_leaf``, ``leaf_clip_always``,
      ``batch_vs_noise_scale`` (info; with ``Thresholds.batch_size``),
      ``clip_always``, ``clip_never``, ``rollback``
      and, with ``xdev/...`` metrics, ``high_dispersion``, ``agreement_drop``,
      ``agreement_low``, ``agreement_high``, ``agreement_drift``, ``outlier_device``,
      ``near_duplicate``, ``param_desync``; ``restart`` (info) when the step went
      backwards in the log (a resumed run). A history with rows but no gradhealth metric
      (no column named as in :data:`gh.CATALOGUE <optax_gradhealth.CATALOGUE>`, such as
      ``grad/norm`` or ``xdev/agreement``) gets the warning ``no_metrics`` (nothing was
      judged), not an empty list; an empty history gets an empty list. The command line
      makes both an error (exit status 2). A log with further copies of the metrics
      (``grad/norm#2``, ...: one ``gh.guard`` per parameter group of an
      ``optax.multi_transform``) gets each copy judged by the single-run patterns
      (:data:`PER_COPY_CHECKS`) on its ``#k`` columns under the plain names; those
      findings' summaries start with ``guard #k: `` and their evidence holds ``copy``
      (``'#2'``).

    Example:
      >>> import optax_gradhealth as gh
      >>> rows = [{'step': t, 'grad/norm': 1.0 + 0.01 * (t % 3)} for t in range(100)]
      >>> rows[60]['grad/norm'] = 9.0
      >>> [f.pattern for f in gh.diagnose(rows)]
      ['explosion']
      >>> gh.diagnose(rows)[0].steps
      (60,)
      >>> [f.pattern for f in gh.diagnose([{'step': 0, 'lr': 0.001}])]  # no gradhealth metric
      ['no_metrics']
    """
    th = thresholds if thresholds is not None else Thresholds()
    if not isinstance(th, Thresholds):
        raise TypeError(f"gh.diagnose: `thresholds` must be a gh.Thresholds, got {type(th).__name__}.")
    h = load_history(history)
    if not len(h):
        return []
    found = _suppressed([finding for _, check in CHECKS for finding in check(h, th)])
    for copy in metric_copies(h):
        view = copy_view(h, copy)
        label = f"guard #{copy}" if view.has("grad/num_steps") else f"metrics #{copy}"
        judged = _suppressed([finding for _, check in PER_COPY_CHECKS for finding in check(view, th)])
        found += [_tagged(finding, copy, label) for finding in judged]
    return sorted(found, key=lambda f: (_RANK[f.severity], f.steps[0] if f.steps else 1 << 62))


#: The checks run once more for each further copy of the metrics (``grad/norm#2``, ...:
#: one ``gh.guard`` per parameter group): the single-run patterns of one guard's
#: metrics, on the copy's columns under the plain names (the log's restarts and whether
#: it has any gradhealth metric are judged once, on the whole log).
PER_COPY_CHECKS = tuple(
    (pattern, check) for pattern, check in single_node.CHECKS if pattern.name not in ("restart", "no_metrics")
)


def _suppressed(found: list[Finding]) -> list[Finding]:
    """``found`` without the findings that :data:`SUPPRESSED_BY` hides."""
    present = {f.pattern for f in found}
    return [f for f in found if not present.intersection(SUPPRESSED_BY.get(f.pattern, ()))]


def _tagged(finding: Finding, copy: int, label: str) -> Finding:
    """``finding`` of the ``copy``-th metrics: its summary starts with ``label`` (``guard
    #2: ...``) and its evidence with ``copy`` (``'#2'``)."""
    return dataclasses.replace(
        finding, summary=f"{label}: {finding.summary}", evidence={"copy": f"#{copy}", **finding.evidence}
    )
