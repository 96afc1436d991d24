"""The plotted report and the command line."""

import json
import math
import subprocess
import sys
import warnings

import matplotlib.image
import numpy as np
import pytest

import optax_gradhealth as gh
from optax_gradhealth import __main__ as cli
from optax_gradhealth.report import findings_paths, write_report
from tests.figures import captured_figure

K = 4


def history(n=120, xdev=True):
    rng = np.random.default_rng(0)
    rows = []
    for t in range(n):
        norm = float(np.exp(0.1 * rng.standard_normal()))
        row = {
            "step": t,
            "loss": 2.0 - t / n,
            "grad/norm": norm,
            "grad/norm_mean": 1.0 if t >= 20 else 0.0,
            "grad/norm_std": 0.1 if t >= 20 else 0.0,
            "grad/clip_threshold": 1.2,
            "grad/clipped": float(norm > 1.2),
            "grad/finite": 1.0,
            "grad/skipped": 0.0,
            "grad/spiked": 0.0,
            "grad/spike_score": norm if t >= 20 else 0.0,
            "grad/momentum_reset": float(t == 90),
            "grad/rollback_recommended": float(100 <= t < 104),
            "grad/leaf_norm": {"embed": norm * 0.3, "head": norm * 0.9},
        }
        if t == 60:
            row.update({"grad/norm": float("nan"), "grad/finite": 0.0, "grad/skipped": 1.0})
        if t == 80:
            row.update({"grad/norm": 9.0, "grad/spiked": 1.0, "grad/spike_score": 9.0, "grad/skipped": 1.0})
        if xdev:
            cos = rng.uniform(0.4, 0.6, size=(K, K))
            cos = (cos + cos.T) / 2
            np.fill_diagonal(cos, 1.0)
            row.update(
                {
                    "xdev/device_norms": norm * (1 + 0.05 * rng.standard_normal(K)),
                    "xdev/norm_cv": 0.05,
                    "xdev/agreement": 0.5,
                    "xdev/audited": float(t % 10 == 0),
                    "xdev/mean_pairwise_cosine": 0.5,
                    "xdev/cosine_to_mean": rng.uniform(0.7, 0.8, size=K),
                    "xdev/pairwise_cosine": cos,
                    "xdev/outlier_device": -1.0,
                    "xdev/noise_scale": 50.0,
                }
            )
        rows.append(row)
    return rows


def write_log(rows, path):
    with gh.JsonlWriter(path, overwrite=True) as writer:
        for row in rows:
            writer.write(row["step"], gh.flatten({k: v for k, v in row.items() if k != "step"}))
    return path


def test_report_writes_the_picture_and_the_findings(tmp_path):
    log = write_log(history(), tmp_path / "run.jsonl")
    out = tmp_path / "out" / "report.png"
    findings = write_report(log, out)
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[0] > 1000 and image.shape[1] > 1000
    assert image[..., :3].std() > 0.05  # not blank
    text_path, json_path = findings_paths(out)
    assert text_path.endswith("report.findings.txt") and json_path.endswith("report.findings.json")
    expected = gh.diagnose(log)
    assert [f.pattern for f in findings] == [f.pattern for f in expected]
    assert {"nonfinite", "explosion", "rollback"} <= {f.pattern for f in findings}
    with open(json_path) as file:
        saved = json.load(file)
    assert [f["pattern"] for f in saved] == [f.pattern for f in expected]
    with open(text_path) as file:
        assert file.read().strip() == gh.format_findings(expected)


def test_cross_device_panels_only_when_present(tmp_path):
    with_xdev = matplotlib.image.imread(gh.plot_report(history(), tmp_path / "a.png"))
    without = matplotlib.image.imread(gh.plot_report(history(xdev=False), tmp_path / "b.png"))
    # Three extra rows of panels (norms/agreement, cosines/matrix, noise scale).
    assert with_xdev.shape[0] > without.shape[0] + 500
    assert with_xdev.shape[1] == without.shape[1]


def test_report_of_a_bare_log_with_only_norms(tmp_path):
    rows = [{"step": t, "grad/norm": 1.0 + 0.1 * np.sin(t)} for t in range(50)]
    path = gh.plot_report(rows, tmp_path / "bare.png")
    assert matplotlib.image.imread(path).shape[0] > 300


@pytest.mark.parametrize("huge", [1e300, 1.7e308])
def test_report_draws_a_norm_near_the_float64_limit(tmp_path, huge):
    """A finite logged norm of 1e300 made the log axis' ticks overflow to Inf, and
    matplotlib raised OverflowError while saving."""
    rows = [{"step": t, "grad/norm": huge if t == 3 else 1e-300 if t == 5 else 1.0} for t in range(10)]
    path = gh.plot_report(rows, tmp_path / "huge.png")
    assert matplotlib.image.imread(path).shape[0] > 300


def test_report_rejects_an_empty_history(tmp_path):
    with pytest.raises(ValueError, match="no rows"):
        gh.plot_report([], tmp_path / "x.png")


def test_cli_report_and_diagnose(tmp_path, capsys):
    log = write_log(history(xdev=False), tmp_path / "run.jsonl")
    out = tmp_path / "r.png"
    assert cli.main(["report", str(log), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "gradient explosion" in printed and "r.findings.txt" in printed
    assert out.exists()
    assert cli.main(["diagnose", str(log), "--threshold", "spike_score=1000"]) == 0
    printed = capsys.readouterr().out
    assert "gradient explosion" not in printed and "non-finite" in printed
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        cli.main(["diagnose", str(log), "--threshold", "no_such=1"])


def test_python_dash_m_entry_point(tmp_path):
    log = write_log(history(n=40, xdev=False), tmp_path / "run.jsonl")
    result = subprocess.run(
        [sys.executable, "-m", "optax_gradhealth", "report", str(log), "-o", str(tmp_path / "m.png")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**__import__("os").environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[1])},
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m.png").exists() and (tmp_path / "m.findings.txt").exists()


def test_the_headline_names_the_run_not_a_panel(tmp_path, monkeypatch):
    """The figure's title starts with the run's title (the spike-score panel once
    overwrote it with its own)."""
    import matplotlib.figure

    seen = []
    original = matplotlib.figure.Figure.suptitle
    monkeypatch.setattr(
        matplotlib.figure.Figure, "suptitle", lambda self, t, **kw: seen.append(t) or original(self, t, **kw)
    )
    gh.plot_report(history(), tmp_path / "r.png", title="my run")
    assert len(seen) == 1 and seen[0].startswith("my run: 120 logged steps (0..119)"), seen


def _norm_axis_labels(monkeypatch, rows, path):
    """The legend labels and y scale of the norm panel of the report of ``rows``."""
    captured = captured_figure(monkeypatch)
    gh.plot_report(rows, path)
    ax = captured["figure"].axes[0]
    return ax.get_legend_handles_labels()[1], ax.get_yscale()


def test_report_without_grad_norm_draws_and_marks_no_nonfinite_step(tmp_path, monkeypatch):
    """A log of gh.cross_device alone, and a log of the loss alone: no norm panel data,
    no non-finite markers (it crashed log-scaling an empty panel)."""
    xdev = [{"step": t, "xdev/device_norms": [1.0, 1.1], "xdev/agreement": 0.5, "xdev/audited": 1.0} for t in range(50)]
    labels, scale = _norm_axis_labels(monkeypatch, xdev, tmp_path / "x.png")
    assert not any(label.startswith("non-finite") for label in labels) and scale == "linear"
    labels, scale = _norm_axis_labels(
        monkeypatch, [{"step": t, "loss": 1.0 / (t + 1)} for t in range(5)], tmp_path / "l.png"
    )
    assert not any(label.startswith("non-finite") for label in labels)
    assert (tmp_path / "x.png").exists() and (tmp_path / "l.png").exists()


def test_report_with_every_norm_nan_marks_each_and_draws(tmp_path, monkeypatch):
    labels, scale = _norm_axis_labels(
        monkeypatch, [{"step": t, "grad/norm": "NaN"} for t in range(5)], tmp_path / "n.png"
    )
    assert "non-finite (5)" in labels and scale == "linear"


def test_report_marks_only_the_rows_that_logged_a_nan_norm(tmp_path, monkeypatch):
    """The loss every step, the norm every 10th (one of them NaN): one non-finite marker,
    not one per row without a norm."""
    rows = []
    for t in range(100):
        row = {"step": t, "loss": 2.0 - 0.01 * t}
        if t % 10 == 0:
            row["grad/norm"] = "NaN" if t == 30 else 1.0
        rows.append(row)
    labels, scale = _norm_axis_labels(monkeypatch, rows, tmp_path / "r.png")
    assert "non-finite (1)" in labels and scale == "log"


def test_plot_report_refuses_a_bad_dpi_before_any_work(tmp_path, monkeypatch):
    rows = history(30, xdev=False)
    path = tmp_path / "report.png"
    with monkeypatch.context() as patch:
        patch.setattr(gh.report, "diagnose", lambda *a, **k: pytest.fail("diagnosed before checking dpi"))
        for dpi, error, message in [
            (0, ValueError, r"`dpi` must be a number >= 10 \(dots per inch\), got 0"),
            (-5, ValueError, r"`dpi` must be a number >= 10 \(dots per inch\), got -5"),
            (1.5, ValueError, r"`dpi` must be a number >= 10 \(dots per inch\), got 1.5"),
            (float("inf"), ValueError, r"`dpi` must be a number >= 10 \(dots per inch\), got inf"),
            (True, TypeError, r"`dpi` must be a real number, got True"),
            ("x", TypeError, r"`dpi` must be a real number, got 'x'"),
        ]:
            with pytest.raises(error, match=message):
                gh.plot_report(rows, path, dpi=dpi)
    assert not path.exists()
    written = gh.plot_report(rows, path, dpi=40.0)  # matplotlib takes a float dpi
    assert matplotlib.image.imread(written).shape[1] == pytest.approx(40 * 12, abs=60)


def test_plot_report_refuses_findings_that_are_not_findings(tmp_path):
    finding = gh.Finding("restart", "a restart", "info", "resumed", (3,), {}, (), ())
    path = tmp_path / "report.png"
    with pytest.raises(TypeError, match=r"`findings` must be None or a list of gh.Finding.*got 5 \(type int\)"):
        gh.plot_report(history(30, xdev=False), path, findings=5)
    with pytest.raises(TypeError, match=r"`findings\[1\]` must be a gh.Finding.*got 'explosion' \(type str\)"):
        gh.plot_report(history(30, xdev=False), path, findings=[finding, "explosion"])
    with pytest.raises(TypeError, match=r"`thresholds` must be None or a gh.Thresholds, got 5 \(type int\)"):
        gh.plot_report(history(30, xdev=False), path, findings=[finding], thresholds=5)
    assert not path.exists()
    written = gh.plot_report(history(30, xdev=False), path, findings=(f for f in [finding]))  # any iterable
    assert matplotlib.image.imread(written).shape[0] > 0


def _xdev_rows(n, k, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "step": t,
            "grad/norm": 1.0 + 0.1 * rng.random(),
            "xdev/agreement": 0.5,
            **{f"xdev/device_norms/{d}": 1.0 + 0.1 * rng.random() for d in range(k)},
            **{f"xdev/cosine_to_mean/{d}": 0.9 for d in range(k)},
        }
        for t in range(n)
    ]


@pytest.mark.parametrize("n, k", [(1000, 4), (3000, 4), (3000, 8)])
def test_cross_device_panels_keep_their_width_when_binned(tmp_path, monkeypatch, n, k):
    # A long run (binned, more rows than pixels) drew its per-device legends with labels
    # 'k (smoothed over N steps)': wider than the half-width axes, which constrained layout
    # then shrank to slivers (0.03 of the figure instead of 0.44).
    captured = captured_figure(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gh.plot_report(_xdev_rows(n, k), tmp_path / "r.png")
    fig = captured["figure"]
    widths = {ax.get_title(loc="left")[:12]: ax.get_position().width for ax in fig.axes}
    full = max(widths.values())
    assert full > 0.85
    for title in ("per-device g", "cross-device", "each device'"):
        # Two panels side by side: each about half the full width (less a gap).
        assert 0.4 * full < widths[title] <= 0.5 * full, (title, widths)
    legend = next(ax for ax in fig.axes if ax.get_title(loc="left").startswith("per-device")).get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [str(d) for d in range(k)]


def test_agreement_panel_without_agreement_draws_no_empty_legend(tmp_path):
    # Device norms but neither xdev/agreement nor xdev/mean_pairwise_cosine: the panel's
    # only artist was the unlabelled zero line, and ax.legend() warned.
    rows = [{k: v for k, v in r.items() if k != "xdev/agreement"} for r in _xdev_rows(50, 4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gh.plot_report(rows, tmp_path / "r.png")


def test_findings_json_is_strict_json_with_non_finite_evidence(tmp_path):
    # A dead device (norm 0): xdev/norm_max_over_min is inf on every row. The evidence
    # kept it as NaN (with a RuntimeWarning) and findings.json held a bare NaN.
    rows = [
        {
            "step": t,
            "grad/norm": 1.0,
            "xdev/norm_cv": 0.9,
            "xdev/norm_max_over_min": math.inf,
            **{f"xdev/device_norms/{d}": 0.0 if d == 2 else 1.0 for d in range(4)},
        }
        for t in range(60)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        findings = write_report(rows, tmp_path / "r.png")
    dispersion = next(f for f in findings if f.pattern == "high_dispersion")
    assert dispersion.evidence["max_norm_max_over_min"] == math.inf
    text = (tmp_path / "r.findings.json").read_text()

    def refuse(constant):
        raise ValueError(f"non-JSON constant {constant}")

    loaded = json.loads(text, parse_constant=refuse)  # strict: no NaN / Infinity literals
    evidence = next(f for f in loaded if f["pattern"] == "high_dispersion")["evidence"]
    assert evidence["max_norm_max_over_min"] == "Infinity"


def test_report_replays_the_spike_rule_once(tmp_path, monkeypatch):
    # A log without grad/spike_score: diagnose replays the guard's rule over the norms,
    # and the report's spike panel used to replay it a second time.
    from optax_gradhealth import _detectors as detect
    from optax_gradhealth.diagnosis import _columns as cols

    calls = []
    # Whichever runs the replay: the step-by-step rule, or the fast path that replaced it.
    for module, name in ((detect, "replay_spikes"), (cols, "_replay_fast")):
        if hasattr(module, name):
            original = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k))
    if hasattr(cols, "_last_replay"):
        cols._last_replay.clear()
    rng = np.random.default_rng(3)
    norm = np.exp(0.1 * rng.standard_normal(300))
    norm[150] = 40.0
    norm[200] = np.nan
    findings = write_report({"step": np.arange(300), "grad/norm": norm, "loss": np.ones(300)}, tmp_path / "r.png")
    assert {"explosion", "nonfinite"} <= {f.pattern for f in findings}
    assert len(calls) == 1


# ---------------------------------------------------------------- headline counts of a trained MLP's log


def _headline(monkeypatch, log, path):
    import matplotlib.figure

    seen = []
    original = matplotlib.figure.Figure.suptitle
    monkeypatch.setattr(
        matplotlib.figure.Figure, "suptitle", lambda self, t, **kw: seen.append(t) or original(self, t, **kw)
    )
    captured = captured_figure(monkeypatch)
    gh.plot_report(log, path)
    return seen[0].split("\n")[0], captured["figure"].axes[0].get_legend_handles_labels()[1]


def _last_logged(path, name):
    """The last value of ``name`` in a JSON Lines log, read with the json module."""
    with open(path) as f:
        values = [row[name] for row in map(json.loads, f) if name in row]
    return int(values[-1])


def test_the_headline_counts_the_guards_steps_between_logged_rows(tmp_path, monkeypatch):
    """MetricLogger(log_every=10): two spikes and a burst of 12 NaN batches fall mostly
    between logged rows; the headline counts the guard's counters, not the flagged rows
    (which said 1 skipped, 0 spikes)."""
    from tests.test_diagnose import _spikes_and_nan_burst, _train_logged

    log = tmp_path / "sparse.jsonl"
    final = _train_logged(log, fault=_spikes_and_nan_burst, log_every=10)
    headline, _ = _headline(monkeypatch, log, tmp_path / "r.png")
    skipped, spikes = int(final["grad/num_skipped"]), int(final["grad/num_spikes"])
    # 12 NaN and the spike at 153, all before the last logged row; the spike at 157 recurs
    # 4 steps after a skipped one: it is clipped, not skipped.
    assert (skipped, spikes) == (13, 2)
    clipped = _last_logged(log, "grad/num_clipped")  # the log starts at step 0
    assert f"; {skipped} skipped, {clipped} clipped, {spikes} spikes" in headline, headline


def test_steps_the_loss_scale_skipped_are_counted_and_marked(tmp_path, monkeypatch):
    """gh.dynamic_loss_scale skips an overflowed step before the guard sees it: the
    headline adds grad/num_overflows to the guard's skipped steps, and the norm panel
    marks those steps (whose logged norm is the previous step's)."""
    from tests.test_diagnose import _train_fp16_overflow

    log = tmp_path / "scale.jsonl"
    final = _train_fp16_overflow(log)  # logged every step: the last row is the final state
    headline, labels = _headline(monkeypatch, log, tmp_path / "r.png")
    overflows, guard_skipped = int(final["grad/num_overflows"]), int(final["grad/num_skipped"])
    assert overflows > 0 and guard_skipped > 0
    assert f"; {overflows + guard_skipped} skipped ({overflows} overflowed)" in headline, headline
    assert f"overflowed, skipped by the loss scale ({overflows})" in labels, labels


# ---------------------------------------------------------------- round 5 (review A)


@pytest.mark.parametrize("command", ["diagnose", "report"])
def test_cli_refuses_a_log_without_gradhealth_metrics(tmp_path, capsys, command):
    """A config file (or a log of other names) said "no findings" and exit 0: now one
    error line, exit status 2, and no picture."""
    log = tmp_path / "config.json"
    log.write_text('{"lr": 0.001, "batch": 32}\n')
    out = tmp_path / "r.png"
    with pytest.raises(SystemExit) as error:
        cli.main([command, str(log), "-o", str(out)] if command == "report" else [command, str(log)])
    assert error.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{cli.PROG}: error: {log}: nothing was judged"), lines
    assert "'batch', 'lr'" in lines[0] and "grad/norm" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize(
    "events_1, events_2",
    [((50, 51, 52), (300, 301, 302, 303, 304)), ((50, 51, 52), (203, 204, 300))],
)
def test_the_headline_counts_across_a_counter_reset_as_the_diagnosis_does(tmp_path, monkeypatch, events_1, events_2):
    """Two training stages, each with a fresh guard (counters from 0): the headline's
    skipped count and the nonfinite finding both count every planted step."""
    from tests.test_diagnose import _two_stage_rows

    rows = _two_stage_rows(events_1, events_2)
    headline, _ = _headline(monkeypatch, rows, tmp_path / "r.png")
    truth = len(events_1) + len(events_2)
    assert f"; {truth} skipped" in headline, headline
    finding = next(f for f in gh.diagnose(rows) if f.pattern == "nonfinite")
    assert finding.summary.startswith(f"{truth} non-finite step(s)")


@pytest.mark.parametrize("log_every", [1, 10])
def test_the_headline_counts_steps_before_a_rollback_restore_once(tmp_path, monkeypatch, log_every):
    """The documented rollback loop restores the counters to a checkpoint's values while
    the step goes on: the headline counted the restored skipped steps again."""
    from tests.test_diagnose import _rollback_rows

    events = (10, 30, 31, 32, 45) if log_every == 1 else (50, 138, 139, 140, 145, 163)
    checkpoint, restore = (20, 32) if log_every == 1 else (100, 140)
    rows = _rollback_rows(events, 200, log_every, checkpoint, (restore,))
    headline, _ = _headline(monkeypatch, rows, tmp_path / "r.png")
    assert f"; {len(events)} skipped" in headline, headline


@pytest.mark.parametrize("k, named", [(32, (5, 25)), (32, (3, 13, 23)), (16, range(16)), (12, (1, 11))])
def test_each_device_drawn_in_colour_has_its_own(tmp_path, monkeypatch, k, named):
    """Devices 5 and 25 (both named by the audit at K=32) were drawn and listed in the
    same colour (C5), as were devices 1 and 11 of 12: every device with a legend entry of
    its own now has a colour no other one has."""
    import matplotlib.colors

    t = 40
    late = {d: 10 + 2 * i for i, d in enumerate(named)}  # the audit names each from its row on
    rows = []
    for s in range(t):
        row = {"step": s, "grad/norm": 1.0, "xdev/audited": 1.0}
        for d in range(k):
            flagged = d in late and s >= late[d]
            row[f"xdev/device_norms/{d}"] = 1.0 + 5.0 * flagged
            row[f"xdev/outlier_devices/{d}"] = float(flagged)
        rows.append(row)
    captured = captured_figure(monkeypatch)
    gh.plot_report(gh.load_history(rows), tmp_path / "r.png", findings=[])
    ax = next(a for a in captured["figure"].axes if a.get_title(loc="left").startswith("per-device"))
    handles, labels = ax.get_legend_handles_labels()
    colours = {label: matplotlib.colors.to_rgba(h.get_color()) for h, label in zip(handles, labels)}
    own = [str(d) for d in (range(k) if k <= 16 else sorted(named))]  # up to 16 devices: each one
    assert [label for label in labels if label.isdigit()] == own, labels
    assert len({colours[label] for label in own}) == len(own), colours
    assert matplotlib.colors.to_rgba("0.65") not in {colours[label] for label in own}


def test_report_of_many_devices_keeps_its_legends_and_ticks_readable(tmp_path, monkeypatch):
    """64 devices: a legend entry per device covered half of two panels and 64 tick labels
    overlapped. Above 16 devices only the devices the audit named get a colour and an
    entry (the others: one grey entry), and the heatmap's ticks are thinned."""
    k, t = 64, 60
    rng = np.random.default_rng(0)
    cos = np.clip(0.3 + 0.03 * rng.standard_normal((t, k, k)), -1, 1)
    cos[:, np.arange(k), np.arange(k)] = 1.0
    outlier = np.where(np.arange(t) >= 30, 7.0, -1.0)
    h = gh.History(
        np.arange(t),
        {
            "grad/norm": np.ones(t),
            "xdev/audited": np.ones(t),
            "xdev/agreement": np.full(t, 0.3),
            "xdev/device_norms": np.exp(0.1 * rng.standard_normal((t, k))),
            "xdev/cosine_to_mean": 0.5 + 0.05 * rng.standard_normal((t, k)),
            "xdev/pairwise_cosine": cos,
            "xdev/outlier_device": outlier,
        },
    )
    captured = captured_figure(monkeypatch)
    gh.plot_report(h, tmp_path / "r.png", findings=[])
    axes = {ax.get_title(loc="left"): ax for ax in captured["figure"].axes}
    for title in ("per-device gradient norm", "each device's cosine to the mean"):
        ax = next(a for name, a in axes.items() if name.startswith(title))
        labels = [text.get_text() for text in ax.get_legend().get_texts()]
        assert "7" in labels and f"not named by the audit ({k - 1})" in labels, labels
        assert len(labels) <= 3, labels  # 7, the others and the outlier marks
    heatmap = next(a for name, a in axes.items() if name.startswith("pairwise cosine"))
    assert len(heatmap.get_yticks()) <= 16 and len(heatmap.get_xticks()) <= 8
    assert heatmap.get_yticks()[0] == 0
    # A few devices keep one entry each.
    small = {name: h.col(name) for name in ("grad/norm", "xdev/audited")}
    small["xdev/device_norms"] = h.vector("xdev/device_norms")[:, :8]
    captured = captured_figure(monkeypatch)
    gh.plot_report(gh.History(np.arange(t), small), tmp_path / "s.png", findings=[])
    ax = next(a for a in captured["figure"].axes if a.get_title(loc="left").startswith("per-device"))
    assert [text.get_text() for text in ax.get_legend().get_texts()] == [str(i) for i in range(8)]


def test_the_headline_counts_every_guard_of_a_multi_transform(tmp_path, monkeypatch):
    """Review A, round 8: with one gh.guard per parameter group, the second guard's
    12 skipped NaN steps (grad/num_skipped#2) were missing from the title, which said
    "0 skipped ... diagnosis: no findings" above a heatmap with the NaN steps in it."""
    import matplotlib.figure

    from tests.test_diagnose import _two_group_log

    log = tmp_path / "groups.jsonl"
    final = _two_group_log(log)
    seen = []
    original = matplotlib.figure.Figure.suptitle
    monkeypatch.setattr(
        matplotlib.figure.Figure, "suptitle", lambda self, t, **kw: seen.append(t) or original(self, t, **kw)
    )
    gh.plot_report(log, tmp_path / "r.png")
    headline, diagnosis = seen[0].split("\n")
    first = f"{int(final['grad/num_skipped'])} skipped, {int(final['grad/num_clipped'])} clipped, 0 spikes"
    second = f"{int(final['grad/num_skipped#2'])} skipped, {int(final['grad/num_clipped#2'])} clipped, 0 spikes"
    assert final["grad/num_skipped#2"] == 12 and final["grad/num_skipped"] == 0
    assert headline.endswith(f"; {first}; guard #2: {second}"), headline
    assert "[error] nonfinite #2" in diagnosis and "[error] rollback #2" in diagnosis, diagnosis
