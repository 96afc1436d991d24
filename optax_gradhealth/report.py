"""A plotted report of a run's logged metrics (matplotlib), with the diagnosis beside it.

Host side only. ``python -m optax_gradhealth report RUN.jsonl -o report.png`` calls
:func:`write_report`. Panels, each drawn only when its metrics are in the log:

* global norm (log scale) with the clip threshold, the guard's running mean +- std
  band, and markers for clipped, skipped, non-finite, spike, momentum-reset and
  rollback steps;
* the loss (when a ``loss`` column is logged);
* the spike score with its threshold;
* per-layer norms as a heatmap over steps (log10);
* cross-device: per-device norms, agreement (and the audits' mean pairwise cosine),
  each device's cosine to the mean gradient, the pairwise cosine matrix of the last
  audit, and the gradient noise scale.

matplotlib is imported inside the functions (it is an optional dependency, in the
``examples`` extra), with the object-oriented API: no pyplot global state.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

import numpy as np

# The module (``optax_gradhealth.diagnose`` the attribute is the function gh.diagnose).
_diagnose = importlib.import_module("optax_gradhealth.diagnose")

__all__ = ["findings_paths", "plot_report", "write_report"]


def _steps_where(h: _diagnose._History, name: str, value: float = 1.0) -> np.ndarray:
    return h.steps[h.col(name) == value] if h.has(name) else np.zeros((0,), np.int64)


def _matrix_at_last_audit(h: _diagnose._History, name: str) -> tuple[np.ndarray, int] | None:
    index = [i for i in h.indexed(name) if len(i) == 2]
    if not index:
        return None
    size = max(max(i) for i in index) + 1
    rows = np.arange(len(h))
    if h.has("xdev/audited"):
        rows = rows[h.col("xdev/audited") == 1]
    for row in rows[::-1]:
        matrix = np.full((size, size), np.nan)
        for i, j in index:
            matrix[i, j] = h.col(f"{name}/{i}/{j}")[row]
        if np.isfinite(matrix).any():
            return matrix, int(h.steps[row])
    return None


def plot_report(
    history: Any,
    path: str | os.PathLike = "report.png",
    *,
    findings: list[_diagnose.Finding] | None = None,
    thresholds: _diagnose.Thresholds | None = None,
    title: str | None = None,
    dpi: int = 110,
) -> str:
    """Draws the report of a run and saves it as an image.

    Args:
      history: as for :func:`optax_gradhealth.diagnose` (a ``.jsonl`` path, a list of
        metric dicts or a dict of columns).
      path: the image file (``.png``, ``.pdf``, ``.svg``...).
      findings: the diagnosis to summarise in the title (default: computed).
      thresholds: used for the spike-score line and the diagnosis.
      title: the figure title (default: the log's file name, or ``'run'``).
      dpi: resolution of raster images.

    Returns:
      The path written.

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

    th = thresholds if thresholds is not None else _diagnose.Thresholds()
    h = _diagnose._History(_diagnose.load_history(history))
    if not len(h):
        raise ValueError("gh.plot_report: the history has no rows to plot.")
    if findings is None:
        findings = _diagnose.diagnose(h.rows, th)
    if title is None:
        title = os.path.basename(os.fspath(history)) if isinstance(history, (str, os.PathLike)) else "run"
    steps = h.steps
    layers = h.layer_names()
    device_norms = h.vector("xdev/device_norms")
    cosines = h.vector("xdev/cosine_to_mean")
    pairwise = _matrix_at_last_audit(h, "xdev/pairwise_cosine")
    has_agreement = h.has("xdev/agreement") or h.has("xdev/mean_pairwise_cosine")
    has_noise = h.has("xdev/noise_scale")

    # Layout: full-width time series, then the cross-device grid (two columns).
    panels = ["norm"] + (["loss"] if h.has("loss") else [])
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
    heights = [sizes[p] for p in panels] + [2.6] * len(xdev_rows)
    fig = Figure(figsize=(12, sum(heights) + 1.2), layout="constrained")
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
            _norm_panel(ax, h, th)
        elif panel == "loss":
            loss = h.col("loss")
            ax.plot(steps, loss, color="tab:green", lw=1)
            if (loss[np.isfinite(loss)] > 0).all():
                ax.set_yscale("log")
            ax.set_ylabel("loss")
            ax.set_title("loss", loc="left", fontsize=10)
        elif panel == "spike":
            if h.has("grad/spike_score"):
                score = h.col("grad/spike_score")
                label = "grad/spike_score"
            else:
                norm = h.col("grad/norm")
                score = _diagnose._replayed_spikes(np.where(np.isfinite(norm), norm, np.nan), th)[1]
                label = "norm / baseline (the guard's rule, replayed)"
            ax.plot(steps, score, color="tab:blue", lw=1, label=label)
            ax.axhline(th.spike_score, color="tab:red", ls="--", lw=1, label=f"threshold {th.spike_score:g}")
            ax.set_yscale("symlog", linthresh=1.0)
            ax.set_ylim(bottom=0)
            ax.set_ylabel("spike score")
            ax.set_title("spike score (norm / running mean; 0 during warm-up)", loc="left", fontsize=10)
            ax.legend(loc="upper right", fontsize=8)
        elif panel == "layers":
            values = np.stack([h.col(f"grad/layer_norm/{name}") for name in layers])
            positive = np.where(np.isfinite(values) & (values > 0), values, np.nan)
            finite = positive[np.isfinite(positive)]
            norm_c = colors.LogNorm(vmin=finite.min(), vmax=finite.max()) if finite.size else None
            edges = np.concatenate([[steps[0] - 0.5], (steps[1:] + steps[:-1]) / 2, [steps[-1] + 0.5]])
            mesh = ax.pcolormesh(
                edges,
                np.arange(len(layers) + 1),
                np.ma.masked_invalid(positive),
                norm=norm_c,
                cmap="viridis",
                shading="flat",
            )
            fig.colorbar(mesh, ax=ax, label="layer norm", pad=0.01)
            every = max(1, len(layers) // 48)
            ax.set_yticks(np.arange(0, len(layers), every) + 0.5)
            ax.set_yticklabels(layers[::every], fontsize=7)
            ax.set_ylim(len(layers), 0)
            ax.grid(False)
            ax.set_title("per-layer gradient norm (white: non-finite)", loc="left", fontsize=10)
        ax.set_xlabel("step") if row == len(panels) - 1 and not xdev_rows else None

    row0 = len(panels)
    for offset, (left, right) in enumerate(xdev_rows):
        row = row0 + offset
        if right is None:
            axes = {left: series_axis(row)}
        else:
            axes = {left: fig.add_subplot(grid[row, 0]), right: fig.add_subplot(grid[row, 1])}
        for name, ax in axes.items():
            _xdev_panel(name, ax, h, device_norms, cosines, pairwise, fig, xlim)

    counts = []
    for name, label in (("grad/skipped", "skipped"), ("grad/clipped", "clipped"), ("grad/spike", "spikes")):
        if h.has(name):
            counts.append(f"{int((h.col(name) == 1).sum())} {label}")
    headline = f"{title}: {len(h)} logged steps ({steps[0]}..{steps[-1]})" + (
        "; " + ", ".join(counts) if counts else ""
    )
    diagnosis = (
        "diagnosis: " + "; ".join(f"[{f.severity}] {f.pattern}" for f in findings)
        if findings
        else "diagnosis: no findings"
    )
    fig.suptitle(headline + "\n" + diagnosis, fontsize=11)
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _norm_panel(ax, h: _diagnose._History, th: _diagnose.Thresholds) -> None:
    from matplotlib import transforms

    steps = h.steps
    norm = h.col("grad/norm")
    finite = np.isfinite(norm) & (norm > 0)
    ax.plot(steps, np.where(finite, norm, np.nan), color="tab:blue", lw=1, label="grad/norm", zorder=3)
    if h.has("grad/norm_mean") and h.has("grad/norm_std"):
        mean, std = h.col("grad/norm_mean"), h.col("grad/norm_std")
        on = mean > 0
        # On a log axis a band reaching zero would swamp the plot: floor it at mean / 10.
        ax.fill_between(
            steps,
            np.where(on, np.maximum(mean - std, mean / 10), np.nan),
            np.where(on, mean + std, np.nan),
            color="tab:blue",
            alpha=0.15,
            lw=0,
            label="running mean +- std",
        )
        ax.plot(steps, np.where(on, mean, np.nan), color="tab:blue", lw=0.8, ls=":", alpha=0.8)
    if h.has("grad/clip_threshold"):
        threshold = h.col("grad/clip_threshold")
        if np.isfinite(threshold).any():
            ax.plot(
                steps,
                np.where(np.isfinite(threshold), threshold, np.nan),
                color="tab:orange",
                ls="--",
                lw=1,
                label="clip threshold",
            )
    top = transforms.blended_transform_factory(ax.transData, ax.transAxes)
    markers = [
        ("grad/clipped", dict(marker=".", color="tab:orange", s=14), "clipped"),
        ("grad/spike", dict(marker="o", facecolors="none", edgecolors="tab:red", s=46, lw=1.2), "spike"),
        ("grad/skipped", dict(marker="x", color="black", s=30, lw=1.2), "skipped"),
    ]
    for name, style, label in markers:
        at = _steps_where(h, name)
        if at.size:
            rows = np.isin(steps, at)
            y = np.where(finite[rows], norm[rows], np.nan)
            keep = np.isfinite(y)
            if keep.any():
                ax.scatter(at[keep], y[keep], label=f"{label} ({at.size})", zorder=4, **style)
            else:
                ax.scatter([], [], label=f"{label} ({at.size})", **style)
    nonfinite = steps[~np.isfinite(norm) | ((h.col("grad/finite") == 0) if h.has("grad/finite") else False)]
    if nonfinite.size:
        ax.scatter(
            nonfinite,
            np.full(nonfinite.size, 0.95),
            transform=top,
            marker="v",
            color="red",
            s=40,
            zorder=5,
            label=f"non-finite ({nonfinite.size})",
            clip_on=False,
        )
    resets = _steps_where(h, "grad/momentum_reset")
    for i, step in enumerate(resets):
        ax.axvline(
            step, color="tab:purple", lw=1.2, ls="-.", label=f"momentum reset ({resets.size})" if i == 0 else None
        )
    if h.has("grad/rollback"):
        flag = h.col("grad/rollback") == 1
        starts = np.flatnonzero(flag & ~np.concatenate([[False], flag[:-1]]))
        for i, start in enumerate(starts):
            end = start
            while end + 1 < len(flag) and flag[end + 1]:
                end += 1
            ax.axvspan(
                steps[start] - 0.5,
                steps[end] + 0.5,
                color="red",
                alpha=0.15,
                label="rollback recommended" if i == 0 else None,
            )
            ax.axvline(steps[start], color="red", lw=1.5)
    ax.set_yscale("log")
    if finite.any():
        ax.set_ylim(norm[finite].min() / 3, norm[finite].max() * 3)
    ax.set_ylabel("global norm (pre-clip)")
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), fontsize=8, ncol=6, frameon=False)


def _xdev_panel(name, ax, h, device_norms, cosines, pairwise, fig, xlim) -> None:
    steps = h.steps
    audited = h.col("xdev/audited") == 1 if h.has("xdev/audited") else np.ones(len(h), bool)
    if name in ("device_norms", "agreement", "cosine_to_mean", "noise"):
        ax.set_xlim(*xlim)
        ax.grid(alpha=0.3)
    if name == "device_norms":
        if device_norms is not None:
            for k in range(device_norms.shape[1]):
                ax.plot(steps, device_norms[:, k], lw=0.8, label=str(k))
            ax.set_yscale("log")
            ax.legend(title="device", fontsize=7, ncol=4, loc="upper right")
        ax.set_title("per-device gradient norm (before the all-reduce)", loc="left", fontsize=10)
    elif name == "agreement":
        if h.has("xdev/agreement"):
            ax.plot(steps, h.col("xdev/agreement"), color="tab:green", lw=1, label="xdev/agreement")
        if h.has("xdev/mean_pairwise_cosine"):
            mpc = np.where(audited, h.col("xdev/mean_pairwise_cosine"), np.nan)
            ax.plot(steps, mpc, ".", color="tab:purple", ms=3, label="mean pairwise cosine (audits)")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_ylim(-0.3, 1.05)
        ax.legend(fontsize=7, loc="lower left")
        ax.set_title("cross-device agreement", loc="left", fontsize=10)
    elif name == "cosine_to_mean":
        if cosines is not None:
            for k in range(cosines.shape[1]):
                ax.plot(steps[audited], cosines[audited, k], ".-", lw=0.6, ms=2, label=str(k))
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
            ax.legend(title="device", fontsize=7, ncol=5, loc="lower left")
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
            ax.set_xticks(range(matrix.shape[0]))
            ax.set_yticks(range(matrix.shape[0]))
            ax.set_title(f"pairwise cosine, last audit (step {step})", loc="left", fontsize=10)
        else:
            ax.set_axis_off()
    elif name == "noise":
        noise = h.col("xdev/noise_scale")
        ax.plot(steps, np.where(noise > 0, noise, np.nan), color="tab:brown", lw=1, label="xdev/noise_scale")
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
    thresholds: _diagnose.Thresholds | None = None,
    title: str | None = None,
) -> list[_diagnose.Finding]:
    """Diagnoses a run, draws :func:`plot_report` and writes the findings beside the
    image (text and JSON, see :func:`findings_paths`).

    Returns:
      The findings.
    """
    rows = _diagnose.load_history(history)
    if title is None and isinstance(history, (str, os.PathLike)):
        title = os.path.basename(os.fspath(history))
    findings = _diagnose.diagnose(rows, thresholds)
    plot_report(rows, path, findings=findings, thresholds=thresholds, title=title)
    text_path, json_path = findings_paths(path)
    with open(text_path, "w", encoding="utf-8") as file:
        file.write(_diagnose.format_findings(findings) + "\n")
    with open(json_path, "w", encoding="utf-8") as file:
        json.dump([f.to_dict() for f in findings], file, indent=1, default=str)
    return findings
