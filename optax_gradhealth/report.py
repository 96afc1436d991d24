"""A plotted report of a run's logged metrics (matplotlib), with the diagnosis beside it.

Host side only. ``python -m optax_gradhealth report RUN.jsonl -o report.png`` calls
:func:`write_report`. Panels, each drawn only when its metrics are in the log:

* global norm (log scale) with the clip threshold, the guard's running mean +- std
  band, and markers for clipped, skipped, non-finite, spike, momentum-reset,
  loss-scale overflow and rollback steps (the title counts skipped, clipped and spike
  steps from the guard's counters when logged, so that steps between logged rows count);
* the loss (when a ``loss`` column is logged);
* the spike score with its threshold;
* per-leaf norms as a heatmap over steps (log10);
* cross-device: per-device norms, agreement (and the audits' mean pairwise cosine),
  each device's cosine to the mean gradient, the pairwise cosine matrix of the last
  audit, and the gradient noise scale (above 16 devices, only the devices the audit
  named get a colour and a legend entry, the others are grey; the matrix's ticks are
  thinned).

Restarts (the step went backwards in the log: a resumed run) are dashed grey lines.

Long runs: when a panel has more points than the axis has pixels, each series is drawn
as a per-bin min/max envelope with a smoothed line (a rolling mean over ``len / 200``
logged steps, geometric on log axes), and the event markers are replaced by an "events"
strip under the norm panel: one row per kind, shaded by the fraction of each bin's
steps with the event (any event at all is visible). Rare events (at most 60 of a
kind) keep their markers.

matplotlib is imported inside the functions (it is an optional dependency, in the
``examples`` extra), with the object-oriented API: no pyplot global state.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from optax_gradhealth import _validation as check
from optax_gradhealth.diagnosis import Finding, Thresholds, diagnose, format_findings, replay_spike_scores
from optax_gradhealth.diagnosis._columns import copy_view, counter_total, metric_copies, nonfinite_rows
from optax_gradhealth.diagnosis.single_node import row_masks
from optax_gradhealth.history import History
from optax_gradhealth.history import load_history as _load_columns

_WIDTH_IN = 12.0  # figure width (inches)
_FEW_MARKERS = 60  # events of a kind drawn one by one even in a long run
_TOP = 1e200  # the highest norm axis limit (see _norm_panel)
_LEGEND_DEVICES = 16  # above this many devices, only the ones the audit named get a colour and a legend entry


def _max_points(dpi: int) -> int:
    """About the pixel width of a full-width panel: more points than this are binned."""
    return int(_WIDTH_IN * dpi * 0.85)


class _Bins:
    """Consecutive rows grouped into equal spans of steps (each bin a few pixels wide)."""

    def __init__(self, steps: np.ndarray, count: int):
        edges = np.linspace(steps[0], steps[-1] + 1, count + 1)
        starts = np.unique(np.searchsorted(steps, edges[:-1], side="left"))
        self.starts = starts[starts < steps.size]
        self.counts = np.diff(np.append(self.starts, steps.size))
        self.x = np.add.reduceat(steps.astype(np.float64), self.starts) / self.counts
        self.edges = np.append(steps[self.starts] - 0.5, steps[-1] + 0.5)
        self.size = int(steps.size)
        self.window = max(1, self.size // 200)

    def min(self, values: np.ndarray) -> np.ndarray:
        return np.fmin.reduceat(values, self.starts)  # NaN-aware: NaN only for an all-NaN bin

    def max(self, values: np.ndarray) -> np.ndarray:
        return np.fmax.reduceat(values, self.starts)

    def mean(self, values: np.ndarray) -> np.ndarray:
        ok = np.isfinite(values)
        total = np.add.reduceat(np.where(ok, values, 0.0), self.starts)
        count = np.add.reduceat(ok.astype(np.int64), self.starts)
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)

    def count(self, flags: np.ndarray) -> np.ndarray:
        return np.add.reduceat(np.asarray(flags, np.int64), self.starts)


def _layer_bins(bins: _Bins, values: np.ndarray) -> np.ndarray:
    """Per bin: the largest positive norm, NaN where the bin holds a non-finite one."""
    finite = np.isfinite(values)
    largest = bins.max(np.where(finite & (values > 0), values, np.nan))
    return np.where(bins.count(~finite) > 0, np.nan, largest)


def _bins(steps: np.ndarray, dpi: int) -> _Bins | None:
    """None when every row gets its own pixel (plain lines), else the bins."""
    limit = _max_points(dpi)
    return _Bins(steps, limit // 2) if steps.size > limit else None


def _rolling_mean(values: np.ndarray, window: int, log: bool) -> np.ndarray:
    """Centred rolling mean over ``window`` rows of the finite (on a log axis: positive,
    averaged as logarithms) values; NaN where the window has none."""
    ok = np.isfinite(values) & ((values > 0) if log else True)
    v = np.where(ok, np.log10(np.where(ok, values, 1.0)) if log else values, 0.0)
    total = np.concatenate([[0.0], np.cumsum(v)])
    count = np.concatenate([[0], np.cumsum(ok)])
    n = values.size
    lo = np.clip(np.arange(n) - window // 2, 0, n)
    hi = np.clip(np.arange(n) + window - window // 2, 0, n)
    k = count[hi] - count[lo]
    mean = np.where(k > 0, (total[hi] - total[lo]) / np.maximum(k, 1), np.nan)
    return 10.0**mean if log else mean


def _smoothed_title(title: str, bins: _Bins | None) -> str:
    """``title`` and the smoothing window of a long run's lines (a legend title for
    lines drawn with ``window_in_label=False``, or a line's label)."""
    return title if bins is None else f"{title} (smoothed over {bins.window} steps)"


def _series(
    ax,
    bins: _Bins | None,
    steps: np.ndarray,
    values: np.ndarray,
    *,
    color: str,
    label: str | None,
    log: bool = False,
    envelope: bool = True,
    lw: float = 1.0,
    window_in_label: bool = True,
    **style: Any,
) -> None:
    """A line, or for a long run a per-bin min/max envelope and a smoothed line (its
    label says over how many steps, unless ``window_in_label`` is False: the legend's
    title says it then, see :func:`_smoothed_title`)."""
    if bins is None:
        ax.plot(steps, values, color=color, lw=lw, label=label, **style)
        return
    shown = np.where(np.isfinite(values) & ((values > 0) if log else True), values, np.nan)
    if envelope:
        ax.fill_between(
            bins.x,
            bins.min(shown),
            bins.max(shown),
            color=color,
            alpha=0.25,
            lw=0,
            label=f"{label}: min-max per bin" if label else None,
        )
    rolling = _rolling_mean(shown, bins.window, log)
    # Per bin: the mean of the rolling mean (of its logarithm on a log axis).
    smooth = 10.0 ** bins.mean(np.log10(rolling)) if log else bins.mean(rolling)
    ax.plot(
        bins.x,
        smooth,
        color=color,
        lw=max(lw, 1.2),
        label=_smoothed_title(label, bins) if label and window_in_label else label,
        **{k: v for k, v in style.items() if k not in ("marker", "ms")},
    )


__all__ = ["findings_paths", "image_path", "plot_report", "write_report"]


def image_path(path: str | os.PathLike) -> str:
    """The file :func:`plot_report` writes for ``path``: ``path`` itself when its
    extension is an image format matplotlib writes, ``path`` + ``.png`` when it has no
    extension (what matplotlib's ``savefig`` does then).

    Raises:
      ValueError: an extension matplotlib cannot write (naming the ones it can).

    Example:
      >>> from optax_gradhealth.report import image_path
      >>> image_path('out/report'), image_path('out/report.svg')
      ('out/report.png', 'out/report.svg')
    """
    from matplotlib.backend_bases import FigureCanvasBase

    path = os.fspath(path)
    extension = os.path.splitext(path)[1][1:].lower()
    if not extension:
        return path + ".png"
    supported = FigureCanvasBase.get_supported_filetypes()
    if extension not in supported:
        raise ValueError(
            f"{path}: cannot write a .{extension} image; use one of the extensions "
            f"{', '.join('.' + e for e in sorted(supported))}."
        )
    return path


def _steps_where(h: History, name: str, value: float = 1.0) -> np.ndarray:
    return h.steps[h.col(name) == value] if h.has(name) else np.zeros((0,), np.int64)


def _matrix_at_last_audit(h: History, name: str) -> tuple[np.ndarray, int] | None:
    index = [i for i in h.indexed(name) if len(i) == 2]
    if not index:
        return None
    size = max(max(i) for i in index) + 1
    rows = np.arange(len(h))
    if h.has("xdev/audited"):
        rows = rows[h.col("xdev/audited") == 1]
    columns = {(i, j): h.col(f"{name}/{i}/{j}") for i, j in index}
    # The last audit row with a finite entry (vectorised: no loop over the rows).
    finite = np.zeros(len(h), bool)
    for column in columns.values():
        finite |= np.isfinite(column)
    rows = rows[finite[rows]]
    if not rows.size:
        return None
    row = rows[-1]
    matrix = np.full((size, size), np.nan)
    for (i, j), column in columns.items():
        matrix[i, j] = column[row]
    return matrix, int(h.steps[row])


def plot_report(
    history: Any,
    path: str | os.PathLike = "report.png",
    *,
    findings: list[Finding] | None = None,
    thresholds: Thresholds | None = None,
    title: str | None = None,
    dpi: int = 110,
) -> str:
    """Draws the report of a run and saves it as an image.

    Args:
      history: as for :func:`optax_gradhealth.diagnose` (a ``.jsonl`` path, a
        TensorBoard log directory, a W&B ``.csv``, a list of metric dicts, a dict of
        columns or a :class:`~optax_gradhealth.history.History`).
      path: the image file (``.png``, ``.pdf``, ``.svg``...; without an extension,
        ``.png`` is added: see :func:`image_path`).
      findings: the diagnosis to summarise in the title, an iterable of
        :class:`~optax_gradhealth.Finding` (default: computed).
      thresholds: used for the spike-score line and the diagnosis.
      title: the figure title (default: the log's file name, or ``'run'``).
      dpi: resolution of raster images, a number >= 10 (dots per inch; below that
        matplotlib cannot size the text).

    Returns:
      The path written (``path``, with ``.png`` added when it has no extension).

    Raises:
      ValueError: an image extension matplotlib cannot write, a history without rows,
        a ``dpi`` below 10 or not finite.
      TypeError: a ``dpi`` that is not a number, ``findings`` that are not findings,
        ``thresholds`` that are not a :class:`~optax_gradhealth.Thresholds`.

    Example:
      >>> import os, tempfile
      >>> import optax_gradhealth as gh
      >>> rows = [{'step': t, 'grad/norm': 1.0 + 0.1 * (t % 4)} for t in range(50)]
      >>> path = gh.plot_report(rows, os.path.join(tempfile.mkdtemp(), 'report.png'))
      >>> os.path.getsize(path) > 10_000
      True
    """
    from matplotlib import colors
    from matplotlib.figure import Figure

    # Checked before any work. Below ~6 dpi matplotlib fails to size the text; 10 is the floor.
    if not math.isfinite(check.real_number("dpi", dpi)) or not dpi >= 10:
        raise ValueError(f"`dpi` must be a number >= 10 (dots per inch), got {dpi!r}.")
    if findings is not None:
        if isinstance(findings, (str, bytes, Finding)) or not isinstance(findings, Iterable):
            raise TypeError(
                "`findings` must be None or a list of gh.Finding (what gh.diagnose returns), "
                f"got {findings!r:.80} (type {type(findings).__name__})."
            )
        findings = list(findings)
        for i, finding in enumerate(findings):
            if not isinstance(finding, Finding):
                raise TypeError(
                    f"`findings[{i}]` must be a gh.Finding (what gh.diagnose returns), "
                    f"got {finding!r:.80} (type {type(finding).__name__})."
                )
    if thresholds is not None and not isinstance(thresholds, Thresholds):
        raise TypeError(
            f"`thresholds` must be None or a gh.Thresholds, got {thresholds!r:.80} (type {type(thresholds).__name__})."
        )
    th = thresholds if thresholds is not None else Thresholds()
    path = image_path(path)  # before drawing: a bad extension fails at once
    h = _load_columns(history)
    if not len(h):
        raise ValueError("gh.plot_report: the history has no rows to plot.")
    if findings is None:
        findings = diagnose(h, th)
    if title is None:
        title = _title(h)
    steps = h.steps
    bins = _bins(steps, dpi)
    layers = h.leaf_names()
    device_norms = h.vector("xdev/device_norms")
    cosines = h.vector("xdev/cosine_to_mean")
    pairwise = _matrix_at_last_audit(h, "xdev/pairwise_cosine")
    has_agreement = h.has("xdev/agreement") or h.has("xdev/mean_pairwise_cosine")
    has_noise = h.has("xdev/noise_scale")

    # Layout: full-width time series, then the cross-device grid (two columns).
    panels = ["norm"] + (["events"] if bins is not None and _event_rows(h, bins) else [])
    panels += ["loss"] if h.has("loss") else []
    panels += ["spike"] if h.has("grad/spike_score") or h.has("grad/norm") else []
    panels += ["layers"] if layers else []
    xdev_rows = []
    if device_norms is not None or has_agreement:
        xdev_rows.append(("device_norms", "agreement"))
    if cosines is not None or pairwise is not None:
        xdev_rows.append(("cosine_to_mean", "pairwise"))
    if has_noise:
        xdev_rows.append(("noise", None))
    sizes = {"norm": 3.4, "layers": max(3.2, 0.13 * len(layers)), "loss": 2.0, "spike": 2.0}
    if "events" in panels:
        sizes["events"] = 0.4 + 0.22 * len(_event_rows(h, bins))
    heights = [sizes[p] for p in panels] + [2.6] * len(xdev_rows)
    fig = Figure(figsize=(_WIDTH_IN, sum(heights) + 1.2), layout="constrained")
    grid = fig.add_gridspec(len(heights), 2, height_ratios=heights)
    xlim = (steps[0] - 0.5, steps[-1] + 0.5)

    def series_axis(row):
        ax = fig.add_subplot(grid[row, :])
        ax.set_xlim(*xlim)
        ax.grid(alpha=0.3)
        return ax

    for row, panel in enumerate(panels):
        ax = series_axis(row)
        if panel == "norm":
            _norm_panel(ax, h, th, bins)
        elif panel == "events":
            _events_panel(ax, h, bins)
        elif panel == "loss":
            loss = h.col("loss")
            positive = bool(np.isfinite(loss).any() and (loss[np.isfinite(loss)] > 0).all())
            _series(ax, bins, steps, loss, color="tab:green", label=None if bins is None else "loss", log=positive)
            if positive:
                ax.set_yscale("log")
            if bins is not None:
                ax.legend(loc="upper right", fontsize=8)
            ax.set_ylabel("loss")
            ax.set_title("loss", loc="left", fontsize=10)
        elif panel == "spike":
            if h.has("grad/spike_score"):
                score = h.col("grad/spike_score")
                label = "grad/spike_score"
            else:
                # The norms diagnose replays (rows flagged non-finite or overflowed left out): the same
                # input, so the replay it just ran is reused, not run again.
                finite = row_masks(h)[0]
                score = replay_spike_scores(np.where(finite, h.col("grad/norm"), np.nan), th)[1]
                label = "norm / baseline (the guard's rule, replayed)"
            _series(ax, bins, steps, score, color="tab:blue", label=label)
            ax.axhline(th.spike_score, color="tab:red", ls="--", lw=1, label=f"threshold {th.spike_score:g}")
            ax.set_yscale("symlog", linthresh=1.0)
            ax.set_ylim(bottom=0)
            ax.set_ylabel("spike score")
            ax.set_title(
                "spike score (norm / baseline, the median of the latest accepted norms; 0 during warm-up)",
                loc="left",
                fontsize=10,
            )
            ax.legend(loc="upper right", fontsize=8)
        elif panel == "layers":
            if bins is None:
                values = np.stack([h.col(f"grad/leaf_norm/{name}") for name in layers])
                positive = np.where(np.isfinite(values) & (values > 0), values, np.nan)
                edges = np.concatenate([[steps[0] - 0.5], (steps[1:] + steps[:-1]) / 2, [steps[-1] + 0.5]])
            else:  # per bin, layer by layer: the largest norm; white when the bin holds a non-finite one
                positive = np.stack([_layer_bins(bins, h.col(f"grad/leaf_norm/{name}")) for name in layers])
                edges = bins.edges
            finite = positive[np.isfinite(positive)]
            norm_c = colors.LogNorm(vmin=finite.min(), vmax=finite.max()) if finite.size else None
            mesh = ax.pcolormesh(
                edges,
                np.arange(len(layers) + 1),
                np.ma.masked_invalid(positive),
                norm=norm_c,
                cmap="viridis",
                shading="flat",
            )
            fig.colorbar(mesh, ax=ax, label="leaf norm", pad=0.01)
            every = max(1, len(layers) // 48)
            ax.set_yticks(np.arange(0, len(layers), every) + 0.5)
            ax.set_yticklabels(layers[::every], fontsize=7)
            ax.set_ylim(len(layers), 0)
            ax.grid(False)
            ax.set_title(
                "per-leaf gradient norm (white: non-finite)" + ("" if bins is None else "; the largest per bin"),
                loc="left",
                fontsize=10,
            )
        ax.set_xlabel("step") if row == len(panels) - 1 and not xdev_rows else None

    row0 = len(panels)
    for offset, (left, right) in enumerate(xdev_rows):
        row = row0 + offset
        if right is None:
            axes = {left: series_axis(row)}
        else:
            axes = {left: fig.add_subplot(grid[row, 0]), right: fig.add_subplot(grid[row, 1])}
        for name, ax in axes.items():
            _xdev_panel(name, ax, h, device_norms, cosines, pairwise, fig, xlim, dpi)

    counts = _title_counts(h)
    if h.restarts:
        counts.append(f"{len(h.restarts)} restart(s), {h.rows_replaced} earlier row(s) dropped")
    headline = f"{title}: {len(h)} logged steps ({steps[0]}..{steps[-1]})" + (
        "; " + ", ".join(counts) if counts else ""
    )
    # Each further guard (one per parameter group: grad/num_skipped#2, ...) counts its own.
    for copy in metric_copies(h):
        view = copy_view(h, copy)
        more = _title_counts(view)
        if more:
            headline += f"; {'guard ' if view.has('grad/num_steps') else ''}#{copy}: " + ", ".join(more)
    diagnosis = (
        "diagnosis: "
        + "; ".join(
            f"[{f.severity}] {f.pattern}" + (f" {f.evidence['copy']}" if "copy" in f.evidence else "") for f in findings
        )
        if findings
        else "diagnosis: no findings"
    )
    fig.suptitle(headline + "\n" + diagnosis, fontsize=11)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _title_counts(h: History) -> list[str]:
    """The title's counts of skipped (overflowed), clipped and spike steps of one guard's
    metrics (:func:`_event_count`), as ``'12 skipped, 0 clipped, 0 spikes'`` parts."""
    counts = []
    overflows = _event_count(h, "grad/overflowed", "grad/num_overflows")
    for flag, counter, label in (
        ("grad/skipped", "grad/num_skipped", "skipped"),
        ("grad/clipped", "grad/num_clipped", "clipped"),
        ("grad/spiked", "grad/num_spikes", "spikes"),
    ):
        count = _event_count(h, flag, counter)
        if label == "skipped" and overflows:  # steps the loss scale skipped never reach the guard
            counts.append(f"{(count or 0) + overflows} skipped ({overflows} overflowed)")
        elif count is not None:
            counts.append(f"{count} {label}")
    return counts


def _event_count(h: History, flag: str, counter: str) -> int | None:
    """Steps with an event: from the guard's counter when logged (its growth between
    consecutive logged values, the first against 0, a reset or a restore of the guard's
    state judged as the diagnosis judges it:
    :func:`~optax_gradhealth.diagnosis._columns.counter_total`),
    so that events between logged rows (``MetricLogger(log_every=N)``) count; else the
    rows whose flag is 1; None when neither is logged."""
    if h.has(counter) and np.isfinite(h.col(counter)).any():
        return counter_total(h, counter)
    if h.has(flag):
        return int((h.col(flag) == 1).sum())
    return None


def _title(h: History) -> str:
    if h.source is None:
        return "run"
    return os.path.basename(os.path.normpath(h.source)) or h.source


def _events(h: History) -> list[tuple[str, np.ndarray, str]]:
    """``(label, per-row flags, colour)`` of each event kind the log has."""
    steps = h.steps
    out = []
    for name, label, color in (
        ("grad/clipped", "clipped", "tab:orange"),
        ("grad/spiked", "spike", "tab:red"),
        ("grad/skipped", "skipped", "black"),
        ("grad/overflowed", "overflowed (loss scale)", "tab:brown"),
    ):
        if h.has(name):
            out.append((label, h.col(name) == 1, color))
    if h.has("grad/norm") or h.has("grad/finite"):
        out.append(("non-finite", nonfinite_rows(h), "red"))
    if h.has("grad/momentum_reset"):
        out.append(("momentum reset", h.col("grad/momentum_reset") == 1, "tab:purple"))
    if h.has("grad/rollback_recommended"):
        out.append(("rollback", h.col("grad/rollback_recommended") == 1, "darkred"))
    if h.restarts:
        out.append(("restart", np.isin(steps, h.restarts), "dimgrey"))
    return out


def _event_rows(h: History, bins: _Bins) -> list[tuple[str, np.ndarray, str]]:
    """The events strip's rows: the kinds that happened at least once."""
    return [(label, flags, color) for label, flags, color in _events(h) if flags.any()]


def _events_panel(ax, h: History, bins: _Bins) -> None:
    """One row per event kind; each bin shaded by the fraction of its steps with the
    event (any event at all shows at about half the full shade)."""
    from matplotlib import colors

    rows = _event_rows(h, bins)
    for i, (label, flags, color) in enumerate(rows):
        count = bins.count(flags)
        shade = np.where(count > 0, 0.45 + 0.55 * count / bins.counts, 0.0)
        cmap = colors.LinearSegmentedColormap.from_list(label, ["white", color])
        ax.pcolormesh(bins.edges, [i, i + 1], shade[None, :], cmap=cmap, vmin=0, vmax=1, shading="flat")
    ax.set_yticks(np.arange(len(rows)) + 0.5)
    ax.set_yticklabels([f"{label} ({int(flags.sum())})" for label, flags, _ in rows], fontsize=7)
    ax.set_ylim(len(rows), 0)
    ax.grid(False)
    ax.set_title(
        f"events per bin ({len(bins.starts)} bins of about {bins.size // len(bins.starts)} logged steps; "
        "darker: a larger fraction of the bin)",
        loc="left",
        fontsize=9,
    )


def _norm_panel(ax, h: History, th: Thresholds, bins: _Bins | None = None) -> None:
    from matplotlib import transforms

    steps = h.steps
    norm = h.col("grad/norm")
    # A step the loss scale skipped (grad/overflowed) holds the previous step's norm: a gap.
    finite = np.isfinite(norm) & (norm > 0)
    if h.has("grad/overflowed"):
        finite &= h.col("grad/overflowed") != 1
    _series(ax, bins, steps, np.where(finite, norm, np.nan), color="tab:blue", label="grad/norm", log=True, zorder=3)
    if h.has("grad/norm_mean") and h.has("grad/norm_std"):
        mean, std = h.col("grad/norm_mean"), h.col("grad/norm_std")
        x = steps
        if bins is not None:  # per bin: the mean of the running statistics
            mean, std, x = bins.mean(mean), bins.mean(std), bins.x
        on = mean > 0
        # On a log axis a band reaching zero would swamp the plot: floor it at mean / 10.
        ax.fill_between(
            x,
            np.where(on, np.maximum(mean - std, mean / 10), np.nan),
            np.where(on, mean + std, np.nan),
            color="tab:blue",
            alpha=0.15,
            lw=0,
            label="running mean +- std",
        )
        ax.plot(x, np.where(on, mean, np.nan), color="tab:blue", lw=0.8, ls=":", alpha=0.8)
    if h.has("grad/clip_threshold"):
        threshold = h.col("grad/clip_threshold")
        if np.isfinite(threshold).any():
            x, shown = steps, np.where(np.isfinite(threshold), threshold, np.nan)
            if bins is not None:
                x, shown = bins.x, bins.mean(shown)
            ax.plot(x, shown, color="tab:orange", ls="--", lw=1, label="clip threshold")
    top = transforms.blended_transform_factory(ax.transData, ax.transAxes)
    markers = [
        ("grad/clipped", dict(marker=".", color="tab:orange", s=14), "clipped"),
        ("grad/spiked", dict(marker="o", facecolors="none", edgecolors="tab:red", s=46, lw=1.2), "spike"),
        ("grad/skipped", dict(marker="x", color="black", s=30, lw=1.2), "skipped"),
    ]
    for name, style, label in markers:
        at = _steps_where(h, name)
        if bins is not None and (name == "grad/clipped" or at.size > _FEW_MARKERS):
            continue  # in the events strip
        if at.size:
            rows = np.isin(steps, at)
            y = np.where(finite[rows], norm[rows], np.nan)
            keep = np.isfinite(y)
            if keep.any():
                ax.scatter(at[keep], y[keep], label=f"{label} ({at.size})", zorder=4, **style)
            else:
                ax.scatter([], [], label=f"{label} ({at.size})", **style)
    for at, height, color, size, label in (
        # logged non-finite (a row without grad/norm is not)
        (steps[nonfinite_rows(h)], 0.95, "red", 40, "non-finite"),
        (_steps_where(h, "grad/overflowed"), 0.88, "tab:brown", 30, "overflowed, skipped by the loss scale"),
    ):
        if at.size and (bins is None or at.size <= _FEW_MARKERS):
            ax.scatter(
                at,
                np.full(at.size, height),
                transform=top,
                marker="v",
                color=color,
                s=size,
                zorder=5,
                label=f"{label} ({at.size})",
                clip_on=False,
            )
    resets = _steps_where(h, "grad/momentum_reset")
    if bins is None or resets.size <= _FEW_MARKERS:
        for i, step in enumerate(resets):
            ax.axvline(
                step, color="tab:purple", lw=1.2, ls="-.", label=f"momentum reset ({resets.size})" if i == 0 else None
            )
    if h.has("grad/rollback_recommended"):
        flag = h.col("grad/rollback_recommended") == 1
        edges = np.flatnonzero(np.diff(np.concatenate([[0], flag.astype(np.int8), [0]])))
        starts, ends = edges[::2], edges[1::2] - 1  # each episode's first and last row
        if bins is None or starts.size <= _FEW_MARKERS:
            for i, (start, end) in enumerate(zip(starts, ends)):
                ax.axvspan(
                    steps[start] - 0.5,
                    steps[end] + 0.5,
                    color="red",
                    alpha=0.15,
                    label="rollback recommended" if i == 0 else None,
                )
                ax.axvline(steps[start], color="red", lw=1.5)
    if h.restarts and (bins is None or len(h.restarts) <= _FEW_MARKERS):
        for i, (step, before) in enumerate(zip(h.restarts, h.restarted_from)):
            ax.axvline(step, color="dimgrey", lw=1.4, ls="--", zorder=2, label="restart" if i == 0 else None)
            ax.annotate(
                f"restart: {before} -> {step}",
                (step, 0.02),
                xycoords=top,
                rotation=90,
                fontsize=7,
                color="dimgrey",
                ha="right",
                va="bottom",
            )
    if finite.any():
        ax.set_yscale("log")
        # A third of a decade of margin, up to 1e200: matplotlib's log ticks run a
        # stride of decades past the limit, and one beyond 1e308 is an infinity it
        # cannot place (a norm logged above the limit is drawn at the axis' top).
        bottom, top = norm[finite].min() / 3, min(norm[finite].max(), _TOP / 3) * 3
        ax.set_ylim(min(bottom, top / 10), top)
    else:  # nothing to draw on a log axis (no norm logged, or none positive and finite)
        ax.set_ylim(0, 1)
        ax.text(
            0.5,
            0.5,
            "no grad/norm logged" if not h.has("grad/norm") else "no positive finite grad/norm",
            transform=ax.transAxes,
            ha="center",
            va="center",
            color="grey",
        )
    ax.set_ylabel("global norm (pre-clip)")
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), fontsize=8, ncol=6, frameon=False)


def _named_devices(h: History, count: int) -> list[int]:
    """The devices the audit named as outliers on some audit row (``xdev/outlier_devices``
    or ``xdev/outlier_device``), at most :data:`_LEGEND_DEVICES`, most often named first."""
    audited = h.col("xdev/audited") == 1 if h.has("xdev/audited") else np.ones(len(h), bool)
    times = np.zeros(count)
    named = h.vector("xdev/outlier_devices")
    if named is not None:
        flags = (np.nan_to_num(named, nan=0.0) != 0) & audited[:, None]
        times[: min(count, flags.shape[1])] += flags.sum(axis=0)[:count]
    elif h.has("xdev/outlier_device"):
        ids = np.nan_to_num(h.col("xdev/outlier_device"), nan=-1.0).astype(np.int64)[audited]
        ids = ids[(ids >= 0) & (ids < count)]
        times += np.bincount(ids, minlength=count)[:count]
    order = np.argsort(-times, kind="stable")
    return sorted(int(k) for k in order[:_LEGEND_DEVICES] if times[k] > 0)


def _device_colour(i: int) -> Any:
    """The ``i``-th of :data:`_LEGEND_DEVICES` distinct colours: the colour cycle's ten
    (``C0`` ... ``C9``), then the light shades of ``tab20``, which none of them is."""
    if i < 10:
        return f"C{i}"
    import matplotlib

    return matplotlib.colormaps["tab20"].colors[2 * (i - 10) + 1]


def _device_style(k: int, count: int, named: list[int]) -> dict[str, Any]:
    """Colour, label and weight of device ``k``'s line: its index as the label and a
    colour no other device drawn in colour has (:func:`_device_colour`, by the index, or
    above :data:`_LEGEND_DEVICES` devices by its place in ``named``), or, above
    :data:`_LEGEND_DEVICES` devices, grey (one legend entry for all of them, on the
    first) unless the audit named it (``named``)."""
    if count <= _LEGEND_DEVICES:
        return {"color": _device_colour(k), "label": str(k), "zorder": 3}
    if k in named:
        return {"color": _device_colour(named.index(k)), "label": str(k), "zorder": 3}
    first_other = next(i for i in range(count) if i not in named)
    label = f"not named by the audit ({count - len(named)})" if k == first_other else None
    return {"color": "0.65", "label": label, "zorder": 2, "alpha": 0.6}


def _xdev_panel(name, ax, h, device_norms, cosines, pairwise, fig, xlim, dpi: int = 110) -> None:
    steps = h.steps
    audited = h.col("xdev/audited") == 1 if h.has("xdev/audited") else np.ones(len(h), bool)
    bins = _bins(steps, dpi)
    audit_bins = _bins(steps[audited], dpi) if audited.any() else None
    if name in ("device_norms", "agreement", "cosine_to_mean", "noise"):
        ax.set_xlim(*xlim)
        ax.grid(alpha=0.3)
    if name == "device_norms":
        if device_norms is not None:
            count = device_norms.shape[1]
            named = _named_devices(h, count) if count > _LEGEND_DEVICES else []
            for k in range(count):
                # A long run: one smoothed line per device (K envelopes would hide each other).
                _series(
                    ax,
                    bins,
                    steps,
                    device_norms[:, k],
                    log=True,
                    envelope=False,
                    lw=0.8,
                    window_in_label=False,
                    **_device_style(k, count, named),
                )
            if np.any(np.isfinite(device_norms) & (device_norms > 0)):
                ax.set_yscale("log")
            # Short labels (the device index; the smoothing in the title): a legend of
            # long labels in a half-width axis made constrained layout shrink the axes.
            ax.legend(title=_smoothed_title("device", bins), fontsize=7, title_fontsize=7, ncol=4, loc="upper right")
        ax.set_title("per-device gradient norm (before the all-reduce)", loc="left", fontsize=10)
    elif name == "agreement":
        if h.has("xdev/agreement"):
            _series(ax, bins, steps, h.col("xdev/agreement"), color="tab:green", label="xdev/agreement")
        if h.has("xdev/mean_pairwise_cosine"):
            mpc = h.col("xdev/mean_pairwise_cosine")[audited]
            if audit_bins is None:
                ax.plot(steps[audited], mpc, ".", color="tab:purple", ms=3, label="mean pairwise cosine (audits)")
            else:
                _series(ax, audit_bins, steps[audited], mpc, color="tab:purple", label="mean pairwise cosine (audits)")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_ylim(-0.3, 1.05)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower left")
        else:
            ax.text(0.5, 0.5, "no agreement logged", transform=ax.transAxes, ha="center", va="center", color="grey")
        ax.set_title("cross-device agreement", loc="left", fontsize=10)
    elif name == "cosine_to_mean":
        if cosines is not None:
            count = cosines.shape[1]
            named = _named_devices(h, count) if count > _LEGEND_DEVICES else []
            for k in range(count):
                style = _device_style(k, count, named)
                if audit_bins is None:
                    ax.plot(steps[audited], cosines[audited, k], ".-", lw=0.6, ms=2, **style)
                else:
                    _series(
                        ax,
                        audit_bins,
                        steps[audited],
                        cosines[audited, k],
                        envelope=False,
                        lw=0.6,
                        window_in_label=False,
                        **style,
                    )
        if h.has("xdev/outlier_device"):
            outlier = h.col("xdev/outlier_device")
            flagged = audited & (outlier >= 0)
            if flagged.any():
                ax.scatter(
                    steps[flagged],
                    np.full(flagged.sum(), -0.25),
                    marker="|",
                    color="red",
                    s=30,
                    label="outlier flagged",
                )
        if ax.get_legend_handles_labels()[0]:
            title = _smoothed_title("device", audit_bins if cosines is not None else None)
            ax.legend(title=title, fontsize=7, title_fontsize=7, ncol=5, loc="lower left")
        ax.set_ylim(-0.3, 1.05)
        ax.set_title("each device's cosine to the mean gradient (audits)", loc="left", fontsize=10)
    elif name == "pairwise":
        if pairwise is not None:
            matrix, step = pairwise
            image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
            fig.colorbar(image, ax=ax, shrink=0.9)
            if matrix.shape[0] <= 8:
                for (i, j), value in np.ndenumerate(matrix):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6)
            # A tick per device up to 16, then every n-th (as the per-leaf heatmap thins its
            # labels): at most 16 rows and 8 columns of labels, which do not overlap.
            size = matrix.shape[0]
            wide = size > _LEGEND_DEVICES
            ax.set_xticks(range(0, size, math.ceil(size / 8) if wide else 1))
            ax.set_yticks(range(0, size, math.ceil(size / _LEGEND_DEVICES) if wide else 1))
            ax.set_title(f"pairwise cosine, last audit (step {step})", loc="left", fontsize=10)
        else:
            ax.set_axis_off()
    elif name == "noise":
        noise = h.col("xdev/noise_scale")
        _series(
            ax, bins, steps, np.where(noise > 0, noise, np.nan), color="tab:brown", label="xdev/noise_scale", log=True
        )
        if np.any(np.isfinite(noise) & (noise > 0)):
            ax.set_yscale("log")
        ax.set_ylabel("B_simple")
        ax.set_title("gradient noise scale B_simple (critical batch size estimate)", loc="left", fontsize=10)
        ax.set_xlabel("step")


def findings_paths(image_path: str | os.PathLike) -> tuple[str, str]:
    """Where :func:`write_report` writes the findings beside the image:
    ``<stem>.findings.txt`` and ``<stem>.findings.json``."""
    stem = os.path.splitext(os.fspath(image_path))[0]
    return stem + ".findings.txt", stem + ".findings.json"


def write_report(
    history: Any,
    path: str | os.PathLike = "report.png",
    *,
    thresholds: Thresholds | None = None,
    title: str | None = None,
) -> list[Finding]:
    """Diagnoses a run, draws :func:`plot_report` and writes the findings beside the
    image (text and JSON, see :func:`findings_paths`).

    Returns:
      The findings.
    """
    path = image_path(path)
    h = _load_columns(history)
    findings = diagnose(h, thresholds)
    plot_report(h, path, findings=findings, thresholds=thresholds, title=title)
    text_path, json_path = findings_paths(path)
    with open(text_path, "w", encoding="utf-8") as file:
        file.write(format_findings(findings) + "\n")
    with open(json_path, "w", encoding="utf-8") as file:
        json.dump([f.to_dict() for f in findings], file, indent=1, default=str, allow_nan=False)
    return findings
