"""Host tools on real runs' logs (issue 16): cut and corrupt lines, files that are not
logs, resumed runs, long runs, TensorBoard and W&B input, the command line's errors,
the logger's crash guarantee, the multi-host example's default and the py.typed marker.

References are independent of the code under test: the rows as generated here, a
plain ``json.loads`` reading, brute-force loops."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import optax_gradhealth as gh
from optax_gradhealth.history import History, LogReadWarning
from tests.figures import captured_figure

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}


def make_rows(n, seed=0, start=0, scale=1.0):
    rng = np.random.default_rng(seed)
    rows = []
    for t in range(start, start + n):
        norm = scale * float(np.exp(0.1 * rng.standard_normal()))
        rows.append(
            {
                "step": t,
                "grad/norm": norm,
                "grad/clipped": float(norm > 1.1 * scale),
                "grad/clip_threshold": 1.1 * scale,
                "loss": 2.0 - t / 1e5,
            }
        )
    return rows


def write_jsonl(path, rows, mode="w"):
    with open(path, mode, encoding="utf-8") as file:
        for row in rows:
            file.write(
                json.dumps({k: ("NaN" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
            )
            file.write("\n")
    return path


def reference_columns(rows):
    """step -> {name: value}, the last write of each step winning (plain dict logic)."""
    out = {}
    for row in rows:
        out[row["step"]] = {k: v for k, v in row.items() if k != "step"}
    return dict(sorted(out.items()))


def assert_history_equals(h, rows):
    ref = reference_columns(rows)
    assert h.steps.tolist() == list(ref)
    names = sorted({k for r in ref.values() for k in r})
    assert list(h.names) == names
    for name in names:
        expected = np.array([r.get(name, np.nan) for r in ref.values()], dtype=float)
        np.testing.assert_array_equal(h[name], expected, err_msg=name)


def run_cli(*args, cwd=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "optax_gradhealth", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=ENV,
    )


# ----------------------------------------------------------------------------- reading JSON Lines


def test_cut_last_line_is_skipped_with_a_warning_naming_file_and_line(tmp_path):
    rows = make_rows(50)
    path = write_jsonl(tmp_path / "run.jsonl", rows)
    with open(path, "a") as file:
        file.write('{"step": 50, "grad/norm": 1.0, "gr')  # the crash
    with pytest.warns(LogReadWarning, match=r"run\.jsonl:51: skipped a cut line"):
        h = gh.load_history(path)
    assert_history_equals(h, rows)
    with pytest.warns(LogReadWarning, match=r"run\.jsonl:51"):
        assert [r["step"] for r in gh.read_jsonl(path)] == list(range(50))


def test_cut_multibyte_character_and_nul_padding_count_as_a_cut(tmp_path):
    rows = make_rows(5)
    path = tmp_path / "run.jsonl"
    write_jsonl(path, rows)
    with open(path, "ab") as file:
        file.write('{"step": 5, "loss\u00e9'.encode()[:-1])  # half of a two-byte character
    with pytest.warns(LogReadWarning, match=r":6: skipped a cut line"):
        assert_history_equals(gh.load_history(path), rows)
    path.write_bytes(path.read_bytes().rsplit(b"\n", 1)[0] + b"\n" + b"\x00" * 64)
    with pytest.warns(LogReadWarning, match=r":6: skipped a cut line"):
        assert_history_equals(gh.load_history(path), rows)


def test_corrupt_line_in_the_middle_is_an_error_or_skipped_on_request(tmp_path):
    rows = make_rows(20)
    path = tmp_path / "run.jsonl"
    write_jsonl(path, rows[:10])
    with open(path, "a") as file:
        file.write('{"step": 10, "grad/norm": 1.0}}\n')  # ends with a brace: not a cut, corrupt
    write_jsonl(path, rows[11:], mode="a")
    with pytest.raises(ValueError, match=r"run\.jsonl:11: not a JSON object"):
        gh.load_history(path)
    with pytest.raises(ValueError, match=r"run\.jsonl:11"):
        gh.diagnose(path)
    with pytest.raises(ValueError, match=r"run\.jsonl:11"):
        gh.read_jsonl(path)
    with pytest.warns(LogReadWarning, match=r"run\.jsonl:11: skipped a bad line"):
        h = gh.load_history(path, skip_bad_lines=True)
    assert_history_equals(h, rows[:10] + rows[11:])


def test_files_that_are_not_logs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        gh.load_history(tmp_path / "missing.jsonl")
    png = tmp_path / "picture.jsonl"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="not UTF-8"):
        gh.load_history(png)
    with pytest.raises(ValueError, match="not UTF-8"):
        gh.read_jsonl(png)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"step": 0, "d\u00e9bit": 1.0}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        gh.load_history(latin1)
    with pytest.raises(ValueError, match="without TensorBoard event files"):
        gh.load_history(tmp_path)


def test_columns_match_a_plain_json_reading_across_chunks_and_row_shapes(tmp_path):
    # Audit rows carry extra keys, some rows hold JSON arrays or odd strings (the row by
    # row path), and there are more rows than one conversion chunk.
    rng = np.random.default_rng(3)
    lines, reference = [], []
    for t in range(10_000):
        row = {"step": t, "grad/norm": float(rng.lognormal()), "loss": float(rng.random())}
        if t % 7 == 0:
            row["xdev/agreement"] = float(rng.random())
        if t % 1000 == 5:
            row["grad/norm"] = "NaN"
        if t % 2500 == 7:
            row["loss"] = "Infinity"
        if t % 3001 == 11:
            row["xdev/device_norms"] = [1.0, 2.0]
        if t % 4001 == 13:
            row["note"] = "restarted by hand"
        lines.append(json.dumps(row))
        plain = {}
        for k, v in json.loads(lines[-1]).items():  # the reference: json.loads and the documented rules
            if isinstance(v, list):
                plain.update({f"{k}/{i}": float(x) for i, x in enumerate(v)})
            elif isinstance(v, str):
                plain[k] = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}.get(v, math.nan)
            else:
                plain[k] = v
        reference.append(plain)
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert_history_equals(gh.load_history(path), reference)
    # The same from the rows in memory and from a dict of columns.
    assert_history_equals(gh.load_history(reference), reference)
    columns = {"step": [r["step"] for r in reference], "grad/norm": [r["grad/norm"] for r in reference]}
    assert_history_equals(gh.load_history(columns), [{k: r[k] for k in columns} for r in reference])


def test_history_stacks_vectors_and_matrices():
    rng = np.random.default_rng(0)
    norms, cos = rng.random((6, 4)), rng.random((6, 3, 3))
    h = History(np.arange(6), {"xdev/device_norms": norms, "xdev/pairwise_cosine": cos, "loss": np.ones(6)})
    np.testing.assert_array_equal(h["xdev/device_norms"], norms)
    np.testing.assert_array_equal(h["xdev/pairwise_cosine"], cos)
    assert "xdev/device_norms/3" in h.names and "xdev/device_norms" in h and "nothing" not in h
    with pytest.raises(KeyError):
        h["nothing"]
    assert h.rows()[2] == {"step": 2, "loss": 1.0, **{f"xdev/device_norms/{k}": norms[2, k] for k in range(4)}} | {
        f"xdev/pairwise_cosine/{i}/{j}": cos[2, i, j] for i in range(3) for j in range(3)
    }


# ----------------------------------------------------------------------------- resumed runs


def resumed_rows():
    """1,200 steps, a crash, a resume from step 1000 to 1499: 1,700 rows for 1,500 steps."""
    return make_rows(1200, seed=0) + make_rows(500, seed=1, start=1000, scale=1.5)


def test_resumed_log_last_write_wins_and_the_restart_is_listed(tmp_path):
    rows = resumed_rows()
    path = write_jsonl(tmp_path / "run.jsonl", rows)
    h = gh.load_history(path)
    assert_history_equals(h, rows)
    assert len(h) == 1500 and h.rows_replaced == 200
    assert h.restarts == (1000,) and h.restarted_from == (1199,)
    restart = [f for f in gh.diagnose(path) if f.pattern == "restart"]
    assert len(restart) == 1 and restart[0].steps == (1000,) and restart[0].severity == "info"
    assert restart[0].evidence["went_back_from"] == [1199] and restart[0].evidence["rows_replaced"] == 200
    # A run that never went back has no restart.
    assert not [f for f in gh.diagnose(rows[:1200]) if f.pattern == "restart"]


def stale_tail_rows():
    """Run 1 logs steps 0..390 every 10 and goes non-finite from 350; run 2 resumes from
    the checkpoint of step 300 and has reached step 340: 45 rows written."""
    run1 = [
        {"step": t, "grad/norm": 1.0 if t < 350 else math.nan, "grad/finite": float(t < 350)} for t in range(0, 400, 10)
    ]
    run2 = [{"step": t, "grad/norm": 0.5, "grad/finite": 1.0} for t in range(300, 350, 10)]
    return run1, run2


def test_a_resumed_run_supersedes_the_abandoned_runs_later_rows(tmp_path):
    # The abandoned run's rows beyond the resumed run's last step (350..390, non-finite)
    # were kept after the resumed run's rows and diagnosed as the current run.
    run1, run2 = stale_tail_rows()
    path = write_jsonl(tmp_path / "run.jsonl", run1 + run2)
    current = run1[:30] + run2  # the timeline as it now stands: run 1 to 290, run 2 from 300
    for h in (gh.load_history(path), gh.load_history(run1 + run2)):
        assert_history_equals(h, current)
        assert h.restarts == (300,) and h.restarted_from == (390,)
        assert h.rows_replaced == 10 and h.rows_superseded == 5  # 300..340 logged again; 350..390 not
    findings = gh.diagnose(path)
    assert not [f for f in findings if f.pattern in ("nonfinite", "rollback")]
    (restart,) = [f for f in findings if f.pattern == "restart"]
    assert restart.evidence["rows_replaced"] == 10 and restart.evidence["rows_superseded"] == 5
    assert "10 earlier row(s) dropped, 5 of them beyond the steps logged again" in restart.summary
    # Two restarts: each one supersedes what came before it at its step and beyond.
    rows = make_rows(50) + make_rows(30, seed=1, start=20) + make_rows(5, seed=2, start=10)
    h = gh.load_history(rows)
    assert_history_equals(h, rows[:10] + rows[-5:])
    assert (h.restarts, h.restarted_from, h.rows_replaced) == ((20, 10), (49, 49), len(rows) - 15)
    # A train row and an eval row at one step: the later row replaces the earlier.
    rows = [{"step": 0, "loss": 1.0}, {"step": 0, "loss": 2.0}, {"step": 1, "loss": 3.0}]
    h = gh.load_history(rows)
    assert h.steps.tolist() == [0, 1] and h["loss"].tolist() == [2.0, 3.0] and h.rows_superseded == 0


def test_another_loggers_row_at_a_reached_step_joins_that_step_instead_of_restarting(tmp_path):
    # An eval row written after the train row of its step replaced it whole: the train
    # row's NaN loss and gradient norm were lost, and the diagnosis missed the NaN step.
    train = [{"step": t, "loss": 1.0 / (t + 1), "grad/norm": 1.0, "grad/finite": 1.0} for t in range(40)]
    train[20] = {"step": 20, "loss": math.nan, "grad/norm": math.nan, "grad/finite": 0.0}
    rows = []
    for row in train:
        rows.append(row)
        if row["step"] % 10 == 0:
            rows.append({"step": row["step"], "eval/loss": 0.5})
    rows.append({"step": 0, "summary/best_eval": 0.5})  # a summary row at step 0, at the end
    path = write_jsonl(tmp_path / "run.jsonl", rows)
    for h in (gh.load_history(path), gh.load_history(rows)):
        assert h.steps.tolist() == list(range(40))
        assert (h.restarts, h.rows_replaced, h.rows_superseded) == ((), 0, 0)
        for name in ("loss", "grad/norm", "grad/finite"):
            np.testing.assert_array_equal(h[name], [r[name] for r in train], err_msg=name)
        np.testing.assert_array_equal(h["eval/loss"], [0.5 if t % 10 == 0 else math.nan for t in range(40)])
        np.testing.assert_array_equal(h["summary/best_eval"], [0.5] + [math.nan] * 39)
    findings = gh.diagnose(path)
    (nonfinite,) = [f for f in findings if f.pattern == "nonfinite"]
    assert nonfinite.steps == (20,)
    assert not [f for f in findings if f.pattern == "restart"]


def test_a_resume_is_a_restart_whatever_row_came_before_it():
    # The abandoned run's last row is an eval row; the resumed run's first row shares no
    # metric with it, but does with the train rows it goes back over: a restart.
    run1 = [{"step": t, "loss": 1.0} for t in range(11)] + [{"step": 10, "eval/loss": 0.5}]
    run2 = [{"step": t, "loss": 2.0} for t in range(8, 13)]
    h = gh.load_history(run1 + run2)
    assert h.steps.tolist() == list(range(13)) and h["loss"].tolist() == [1.0] * 8 + [2.0] * 5
    assert np.isnan(h["eval/loss"]).all()  # the eval row of step 10 was the abandoned run's
    assert (h.restarts, h.restarted_from, h.rows_replaced, h.rows_superseded) == ((8,), (10,), 4, 0)
    # A summary row at a low step, then a resume above it: the resume is still a restart.
    rows = [{"step": t, "loss": 1.0} for t in range(6)] + [{"step": 1, "summary/x": 3.0}]
    rows += [{"step": t, "loss": 2.0} for t in range(3, 5)]
    h = gh.load_history(rows)
    assert h.steps.tolist() == [0, 1, 2, 3, 4] and h["loss"].tolist() == [1.0, 1.0, 1.0, 2.0, 2.0]
    assert h["summary/x"][1] == 3.0
    assert (h.restarts, h.restarted_from, h.rows_replaced, h.rows_superseded) == ((3,), (1,), 3, 1)


def test_a_resumed_tensorboard_run_supersedes_the_abandoned_runs_later_rows(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("tensorboardX")
    run1, run2 = stale_tail_rows()
    for suffix, rows in ((".1", run1), (".2", run2)):
        writer = gh.TensorBoardWriter(tmp_path, filename_suffix=suffix)
        for row in rows:
            writer.write(row["step"], {k: v for k, v in row.items() if k != "step"})
        writer.close()
    h = gh.load_history(tmp_path)
    assert_history_equals(h, run1[:30] + run2)
    assert (h.restarts, h.rows_replaced, h.rows_superseded) == ((300,), 10, 5)


def test_a_resumed_tensorboard_run_supersedes_a_tag_it_has_not_logged_again(tmp_path):
    # Restarts were found per tag: the abandoned run's eval row at 300, beyond the step
    # the resumed run has reached (290), was kept as current in a TensorBoard log (a JSON
    # Lines log of the same writes dropped it).
    pytest.importorskip("tensorboard")
    pytest.importorskip("tensorboardX")

    def writes(first, last, run):
        for t in range(first, last + 1, 10):
            loss = math.nan if (run, t) == (0, 100) else 2.0 - run  # a NaN train row with an eval row
            yield t, {"grad/norm": 1.0 + run, "loss": loss}
            if t % 100 == 0:
                yield t, {"eval/loss": 5.0 + run}

    run1, run2 = list(writes(0, 390, 0)), list(writes(250, 290, 1))  # run 2 resumed at 250
    jsonl = gh.JsonlWriter(tmp_path / "run.jsonl")
    tb = gh.TensorBoardWriter(tmp_path / "tb")
    for step, scalars in run1 + run2:
        jsonl.write(step, scalars)
        tb.write(step, scalars)
    jsonl.close()
    tb.close()
    # The timeline written out: run 1's rows below 250, then run 2's; the eval rows join
    # the train row of their step.
    current = {t: dict(r) for t, r in run1 if t < 250 and "loss" in r}
    current.update({t: dict(r) for t, r in run2 if "loss" in r})
    for t, r in run1 + run2:
        if "eval/loss" in r and t < 250:
            current[t].update(r)
    dropped = [t for t, _ in run1 if t >= 250]  # 15 train rows and the eval row at 300
    for source in ("run.jsonl", "tb"):
        h = gh.load_history(tmp_path / source)
        assert h.steps.tolist() == sorted(current), source
        for name in ("grad/norm", "loss", "eval/loss"):
            expected = [current[t].get(name, math.nan) for t in sorted(current)]
            np.testing.assert_array_equal(h[name], expected, err_msg=f"{source} {name}")
        assert h.logged("loss")[h.steps == 100].all()  # the NaN loss was logged
        assert (h.restarts, h.restarted_from) == ((250,), (390,)), source
        assert h.rows_replaced == len(dropped) == 16, source
        assert h.rows_superseded == sum(t > 290 for t in dropped) == 11, source


def test_tensorboard_events_of_one_tag_each_read_as_one_row_per_step(tmp_path):
    # add_scalar writes an event per tag: the events of one step are one row, and a run
    # resumed at the step it had logged last replaces that step once.
    pytest.importorskip("tensorboard")
    tensorboardX = pytest.importorskip("tensorboardX")
    for suffix, steps, value in ((".1", range(60), 1.0), (".2", range(59, 65), 5.0)):
        writer = tensorboardX.SummaryWriter(str(tmp_path), filename_suffix=suffix)
        for t in steps:
            writer.add_scalar("grad/norm", value, t)
            writer.add_scalar("loss", value + 1, t)
            if t % 20 == 0:
                writer.add_scalar("eval/loss", value + 2, t)
        writer.close()
    h = gh.load_history(tmp_path)
    assert h.steps.tolist() == list(range(65))
    np.testing.assert_array_equal(h["grad/norm"], [1.0] * 59 + [5.0] * 6)
    np.testing.assert_array_equal(h["loss"], [2.0] * 59 + [6.0] * 6)
    evals = [(3.0 if t < 59 else 7.0) if t % 20 == 0 else math.nan for t in range(65)]  # run 2 logs 60
    np.testing.assert_array_equal(h["eval/loss"], evals)
    assert (h.restarts, h.restarted_from, h.rows_replaced, h.rows_superseded) == ((59,), (59,), 1, 0)


def test_rows_superseded_counts_only_the_rows_beyond_the_step_reached_again():
    # Run 1 logged 0..40 every 10; run 2 resumed at 15 and logs 15, 25, ...: the rows of
    # run 1 at 20, 30, 40 were counted as "beyond the steps logged again" although run 2
    # had passed them.
    run1 = list(range(0, 50, 10))
    for reached in (95, 25):
        run2 = list(range(15, reached + 1, 10))
        h = History(run1 + run2, {"grad/norm": [1.0] * (len(run1) + len(run2))})
        dropped = [t for t in run1 if t >= 15]
        assert h.steps.tolist() == [t for t in run1 if t < 15] + run2
        assert h.rows_replaced == len(dropped) == 3
        assert h.rows_superseded == sum(t > reached for t in dropped) == (0 if reached == 95 else 2)
        (restart,) = [f for f in gh.diagnose(h) if f.pattern == "restart"]
        assert restart.evidence["rows_superseded"] == h.rows_superseded
        assert ("beyond the steps logged again" in restart.summary) == (reached == 25)


def test_a_prefixed_log_with_010_names_is_read_under_the_current_names(tmp_path):
    # The prefix was removed after the deprecated names were renamed, so 'train/grad/spike'
    # became 'grad/spike', which no reader looks up.
    rows = [
        {"step": t, "grad/norm": math.nan if t == 30 else 1.0, "grad/spike": float(t == 60), "grad/layer_norm/w": 2.0}
        for t in range(100)
    ]
    rows[70]["grad/spiked"] = 1.0  # a current name beside the old one: merged per row
    prefixed = [{("step" if k == "step" else "train/" + k): v for k, v in r.items()} for r in rows]
    path = write_jsonl(tmp_path / "run.jsonl", prefixed)
    h = gh.load_history(path)
    assert h.prefix == "train/"
    assert h.names == ("grad/leaf_norm/w", "grad/norm", "grad/spiked")
    np.testing.assert_array_equal(h["grad/spiked"], [float(t in (60, 70)) for t in range(100)])
    np.testing.assert_array_equal(h.col("grad/leaf_norm/w"), [2.0] * 100)
    assert np.flatnonzero(~h.logged("grad/norm")).tolist() == [] and np.isnan(h["grad/norm"][30])
    assert h.has("grad/spiked") and h.has("grad/leaf_norm/w")


def test_a_log_written_with_a_prefix_is_read_under_the_metric_names(tmp_path):
    # MetricLogger(prefix='train/') wrote names no reader looked up: "no findings" on a
    # run that went non-finite.
    rows = guard_like_rows()
    path = tmp_path / "run.jsonl"
    with gh.MetricLogger(gh.JsonlWriter(path), log_every=1, prefix="train/") as logger:
        for row in rows:
            logger.log(row["step"], {k: v for k, v in row.items() if k != "step"})
    h = gh.load_history(path)
    assert_history_equals(h, rows)
    assert h.prefix == "train/"
    expected = [(f.pattern, f.steps) for f in gh.diagnose(rows)]
    assert {"nonfinite", "explosion"} <= {p for p, _ in expected}
    assert [(f.pattern, f.steps) for f in gh.diagnose(path)] == expected
    assert gh.load_history(path, prefix="").names[0].startswith("train/")  # '' keeps the names
    # Train and eval prefixes: the one logged on the most rows, with a warning naming the other.
    both = []
    for r in rows:
        metrics = {k: v for k, v in r.items() if k != "step"}
        row = {"step": r["step"], **{f"train/{k}": v for k, v in metrics.items()}}
        if r["step"] % 50 == 0:  # an eval step logs the eval copy in the same row
            row.update({f"eval/{k}": v for k, v in metrics.items()})
        both.append(row)
    with pytest.warns(LogReadWarning, match=r"several prefixes: read 'train/' \(200 rows\), not 'eval/' \(4 rows\)"):
        h = gh.load_history(both)
    eval_names = sorted(f"eval/{k}" for k in rows[0] if k != "step")
    assert h.prefix == "train/" and [n for n in h.names if n.startswith("eval/")] == eval_names
    assert_history_equals(History(h.steps, {n: h[n] for n in h.names if not n.startswith("eval/")}), rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h = gh.load_history(both, prefix="eval/")
    assert h.prefix == "eval/" and h["grad/norm"][::50].tolist() == [r["grad/norm"] for r in rows[::50]]
    with pytest.raises(ValueError, match=r"no metric name in the rows starts with prefix='val/'"):
        gh.load_history(both, prefix="val/")
    with pytest.raises(TypeError, match=r"`prefix` must be None .*got 5 \(type int\)"):
        gh.load_history(both, prefix=5)
    # A log with no gradhealth metric, behind a prefix or not, keeps its names.
    assert gh.load_history([{"step": 0, "run/lr": 0.1, "loss": 1.0}]).names == ("loss", "run/lr")


def test_the_command_line_reads_the_prefix_it_is_given(tmp_path):
    # The CLI had no way to choose a prefix: an eval copy of the metrics could not be
    # diagnosed from the command line.
    rows = guard_like_rows()
    clean = [{"step": r["step"], "grad/norm": 1.0, "grad/finite": 1.0} for r in rows]
    both = [
        {"step": r["step"], **{f"train/{k}": v for k, v in c.items() if k != "step"}}
        | {f"eval/{k}": v for k, v in r.items() if k != "step"}
        for r, c in zip(rows, clean)
    ]
    path = write_jsonl(tmp_path / "both.jsonl", both)
    expected = gh.format_findings(gh.diagnose(rows))
    assert "nonfinite" in expected
    result = run_cli("diagnose", path, "--prefix", "eval/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected.strip()
    result = run_cli("diagnose", path)  # both prefixes on every row: 'eval/' comes first, with a warning
    assert result.returncode == 0 and "several prefixes" in result.stderr
    result = run_cli("diagnose", path, "--prefix", "train/")
    assert result.returncode == 0 and result.stdout.strip() == gh.format_findings(gh.diagnose(clean)).strip()
    result = run_cli("diagnose", path, "--prefix", "val/")
    assert result.returncode == 2 and "starts with prefix='val/'" in result.stderr and "Traceback" not in result.stderr


def test_the_pending_rows_of_a_wide_log_are_bounded_by_values(tmp_path, monkeypatch):
    # The rows parsed between two conversions to numpy were bounded in rows (4096), not
    # values: a wide log (a 32-device run's 3,311 values a row) held them all as Python
    # floats, 6.5x the columnar data. Here the bound is made small to keep the log small.
    import tracemalloc

    import optax_gradhealth.history as history

    monkeypatch.setattr(history, "_CHUNK_VALUES", 2**14, raising=False)
    rng = np.random.default_rng(0)
    values = rng.random((1000, 300))
    names = [f"xdev/pairwise_cosine/{i // 20}/{i % 20}" for i in range(300)]
    path = tmp_path / "wide.jsonl"
    with open(path, "w") as file:
        for t, row in enumerate(values.tolist()):
            file.write(json.dumps({"step": t, **dict(zip(names, row))}) + "\n")
    tracemalloc.start()
    try:
        h = gh.load_history(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    for j, name in enumerate(names):
        np.testing.assert_array_equal(h[name], values[:, j], err_msg=name)
    assert peak <= 2 * values.nbytes, peak / values.nbytes  # benchmarks.md: at most 2x the columns


def test_appending_to_a_cut_log_starts_a_new_line(tmp_path):
    path = tmp_path / "run.jsonl"
    with gh.JsonlWriter(path) as writer:
        writer.write(0, {"loss": 1.0})
    with open(path, "a") as file:
        file.write('{"step": 1, "lo')  # the crash
    with gh.JsonlWriter(path) as writer:  # the resumed run
        writer.write(1, {"loss": 0.5})
    with pytest.warns(LogReadWarning, match=r"run\.jsonl:2: skipped a cut line"):
        h = gh.load_history(path)
    assert h.steps.tolist() == [0, 1] and h["loss"].tolist() == [1.0, 0.5]


def test_report_marks_the_restart_and_plots_each_step_once(tmp_path, monkeypatch):
    captured = captured_figure(monkeypatch)
    path = write_jsonl(tmp_path / "run.jsonl", resumed_rows())
    gh.plot_report(path, tmp_path / "r.png")
    norm_ax = captured["figure"].axes[0]
    restart_lines = [line for line in norm_ax.get_lines() if line.get_label() == "restart"]
    assert len(restart_lines) == 1 and list(restart_lines[0].get_xdata()) == [1000, 1000]
    assert "restart" in captured["figure"].get_suptitle()
    # Every plotted x is a distinct step (the overlap is not drawn twice).
    xs = np.concatenate([np.asarray(line.get_xdata(), float) for line in norm_ax.get_lines()[:1]])
    assert np.all(np.diff(xs) > 0)


# ----------------------------------------------------------------------------- long runs


def test_bins_envelope_and_smoothing_match_brute_force():
    from optax_gradhealth.report import _Bins, _rolling_mean

    rng = np.random.default_rng(1)
    steps = np.sort(rng.choice(100_000, size=5_000, replace=False))
    values = rng.lognormal(size=steps.size)
    values[rng.choice(steps.size, 50)] = np.nan
    bins = _Bins(steps, 300)
    edges = np.linspace(steps[0], steps[-1] + 1, 301)
    lo, hi, counts = [], [], []
    for a, b in itertools.pairwise(edges):  # brute force: every bin by its step span
        inside = (steps >= a) & (steps < b)
        if inside.any():
            chunk = values[inside]
            counts.append(inside.sum())
            lo.append(np.nanmin(chunk) if np.isfinite(chunk).any() else np.nan)
            hi.append(np.nanmax(chunk) if np.isfinite(chunk).any() else np.nan)
    assert bins.counts.tolist() == counts
    np.testing.assert_array_equal(bins.min(values), lo)
    np.testing.assert_array_equal(bins.max(values), hi)
    window = 7
    expected = []
    for i in range(values.size):
        chunk = values[max(i - window // 2, 0) : i + window - window // 2]
        chunk = chunk[np.isfinite(chunk)]
        expected.append(10 ** np.mean(np.log10(chunk)) if chunk.size else np.nan)
    np.testing.assert_allclose(_rolling_mean(values, window, log=True), expected, rtol=1e-12)


@pytest.mark.parametrize("n", [1_500, 30_000])
def test_long_run_report_draws_envelopes_and_an_events_strip(tmp_path, monkeypatch, n):
    captured = captured_figure(monkeypatch)
    rng = np.random.default_rng(n)
    norm = np.exp(0.3 * rng.standard_normal(n))
    clipped = norm > 1.2
    spikes = rng.choice(n, size=5, replace=False)
    norm[spikes] = 50.0
    columns = {
        "step": np.arange(n),
        "grad/norm": norm,
        "grad/clipped": clipped.astype(float),
        "grad/clip_threshold": np.full(n, 1.2),
        "grad/spiked": np.isin(np.arange(n), spikes).astype(float),
        "loss": np.linspace(3, 1, n),
    }
    gh.plot_report(columns, tmp_path / "long.png")
    figure = captured["figure"]
    norm_ax, events_ax = figure.axes[0], figure.axes[1]
    width_px = figure.get_figwidth() * 110
    assert all(len(line.get_xdata()) < width_px for line in norm_ax.get_lines())  # no more points than pixels
    labels = [t.get_text() for t in events_ax.get_yticklabels()]
    assert f"clipped ({int(clipped.sum())})" in labels and "spike (5)" in labels
    legend = [t.get_text() for t in norm_ax.get_legend().get_texts()]
    assert not any(text.startswith("clipped") for text in legend)  # no clipped markers
    assert "spike (5)" in legend  # rare events keep theirs
    envelope = [c for c in norm_ax.collections if "min-max" in str(c.get_label())]
    top = max(path.vertices[:, 1].max() for c in envelope for path in c.get_paths())
    assert top == 50.0  # the spikes stay in the envelope


def test_short_run_report_keeps_every_point_and_marker(tmp_path, monkeypatch):
    captured = captured_figure(monkeypatch)
    rows = make_rows(300)
    gh.plot_report(rows, tmp_path / "short.png")
    norm_ax = captured["figure"].axes[0]
    assert len(norm_ax.get_lines()[0].get_xdata()) == 300
    legend = [t.get_text() for t in norm_ax.get_legend().get_texts()]
    assert f"clipped ({sum(r['grad/clipped'] == 1 for r in rows)})" in legend


# ----------------------------------------------------------------------------- diagnose, vectorised


def test_vectorised_patterns_match_the_loops_they_replace():
    from optax_gradhealth.diagnosis._columns import longest_run as _longest_run

    rng = np.random.default_rng(0)
    for _ in range(50):
        flags = rng.random(rng.integers(0, 200)) < rng.random()
        best = current = 0
        for flag in flags:
            current = current + 1 if flag else 0
            best = max(best, current)
        assert _longest_run(flags) == best
    # Agreement drops: the finding's steps against the rule written as a loop.
    th = gh.Thresholds()
    agreement = np.clip(0.6 + 0.05 * rng.standard_normal(400), -1, 1)
    agreement[150:170] = 0.02  # a drop that stays down...
    agreement[[250, 251, 252, 300, 395]] = 0.02  # ...and dips that do not (or may not yet)
    rows = [{"step": t, "xdev/agreement": float(a)} for t, a in enumerate(agreement)]
    w = th.agreement_window
    expected = [
        t
        for t in range(w, agreement.size - w + 1)
        if agreement[t] < th.agreement_drop_after
        and np.median(agreement[t - w : t]) > th.agreement_drop_before
        and np.median(agreement[t : t + w]) < th.agreement_drop_after
    ]
    (drop,) = [f for f in gh.diagnose(rows) if f.pattern == "agreement_drop"]
    assert list(drop.steps) == expected == [150, 151, 152, 153, 154]


# ----------------------------------------------------------------------------- TensorBoard and W&B


def guard_like_rows(n=200):
    rows = make_rows(n)
    for row in rows:
        row.update({"grad/finite": 1.0, "grad/skipped": 0.0})
    rows[120].update({"grad/norm": math.nan, "grad/finite": 0.0, "grad/skipped": 1.0})
    rows[150]["grad/norm"] = 40.0
    return rows


def test_tensorboard_log_directory_reads_like_the_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("tensorboardX")
    rows = guard_like_rows()
    logdir = tmp_path / "tb"
    writer = gh.TensorBoardWriter(logdir)
    for row in rows:
        writer.write(row["step"], {k: v for k, v in row.items() if k != "step"})
    writer.close()
    h = gh.load_history(logdir)
    # TensorBoard keeps float32 scalars.
    as_float32 = [{k: (v if k == "step" else float(np.float32(v))) for k, v in r.items()} for r in rows]
    assert_history_equals(h, as_float32)
    expected = [(f.pattern, f.steps) for f in gh.diagnose(rows)]
    assert {"nonfinite", "explosion"} <= {p for p, _ in expected}
    assert [(f.pattern, f.steps) for f in gh.diagnose(logdir)] == expected
    event_file = next(logdir.iterdir())
    assert gh.load_history(event_file).steps.tolist() == list(range(200))


def test_tensorboard_resumed_run_and_run_folders(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("tensorboardX")
    logdir = tmp_path / "runs" / "a"
    rows = make_rows(60) + make_rows(40, seed=1, start=40, scale=2.0)
    first = gh.TensorBoardWriter(logdir, filename_suffix=".1")
    for row in rows[:60]:
        first.write(row["step"], {"grad/norm": row["grad/norm"]})
    first.close()
    second = gh.TensorBoardWriter(logdir, filename_suffix=".2")  # the resumed run: a new event file
    for row in rows[60:]:
        second.write(row["step"], {"grad/norm": row["grad/norm"]})
    second.close()
    h = gh.load_history(logdir)
    assert h.restarts == (40,) and h.restarted_from == (59,) and h.rows_replaced == 20
    assert_history_equals(h, [{"step": r["step"], "grad/norm": float(np.float32(r["grad/norm"]))} for r in rows])
    with pytest.raises(ValueError, match=r"run folder\(s\) below it \(a\)"):
        gh.load_history(tmp_path / "runs")


def test_wandb_history_csv_exports(tmp_path):
    rows = guard_like_rows()
    api = tmp_path / "history.csv"  # run.history().to_csv(): _step plus W&B's own columns
    names = ["grad/norm", "grad/finite", "loss"]
    with open(api, "w", newline="") as file:
        out = csv.writer(file)
        out.writerow(["", "_step", "_runtime", "_timestamp", *names])
        for i, row in enumerate(rows):
            cells = ["" if (i == 3 and n == "loss") else ("NaN" if math.isnan(row[n]) else repr(row[n])) for n in names]
            out.writerow([i, row["step"], 0.5 * i, 1.7e9 + i, *cells])
    h = gh.load_history(api)
    expected = [{"step": r["step"], **{n: r[n] for n in names}} for r in rows]
    expected[3]["loss"] = math.nan  # an empty cell
    assert_history_equals(h, expected)
    ui = tmp_path / "panel.csv"  # the UI's panel export: "<run> - <metric>" and __MIN / __MAX
    with open(ui, "w", newline="") as file:
        out = csv.writer(file)
        out.writerow(["Step", "run-7 - grad/norm", "run-7 - grad/norm__MIN", "run-7 - grad/norm__MAX"])
        for row in rows:
            out.writerow([row["step"], row["grad/norm"], row["grad/norm"], row["grad/norm"]])
    assert_history_equals(gh.load_history(ui), [{"step": r["step"], "grad/norm": r["grad/norm"]} for r in rows])
    assert {f.pattern for f in gh.diagnose(api)} >= {"nonfinite", "explosion"}


# ----------------------------------------------------------------------------- command line


def test_cli_input_errors_are_one_line_with_status_2(tmp_path):
    missing = run_cli("diagnose", tmp_path / "missing.jsonl")
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 16)
    corrupt = write_jsonl(tmp_path / "corrupt.jsonl", make_rows(5))
    with open(corrupt, "a") as file:
        file.write("oops}\n")
    write_jsonl(corrupt, make_rows(5, start=5), mode="a")
    results = {
        "missing": (missing, "missing.jsonl: no such file"),
        "binary": (run_cli("report", binary, "-o", tmp_path / "x.png"), "model.bin:1: not UTF-8"),
        "corrupt": (run_cli("diagnose", corrupt), "corrupt.jsonl:6: not a JSON object"),
        "threshold": (run_cli("diagnose", corrupt, "--threshold", "spike_score=high"), "spike_score expects a number"),
        "unknown": (run_cli("diagnose", corrupt, "--threshold", "nope=1"), "NAME=VALUE"),
        "usage": (run_cli("diagnose"), "required: log"),
    }
    for name, (result, message) in results.items():
        assert result.returncode == 2, (name, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, (name, result.stderr)
        assert lines[0].startswith("python -m optax_gradhealth: error: ") and message in lines[0], (name, lines)
    skipped = run_cli("diagnose", corrupt, "--skip-bad-lines")
    assert skipped.returncode == 0 and "corrupt.jsonl:6: skipped a bad line" in skipped.stderr


def test_cli_reader_closing_the_pipe_early_is_not_a_traceback(tmp_path):
    # `python -m optax_gradhealth diagnose run.jsonl | head -1`: the reader has gone when the
    # findings are written. The read end is closed before the child writes anything.
    path = write_jsonl(tmp_path / "run.jsonl", guard_like_rows())
    child = subprocess.Popen(
        [sys.executable, "-m", "optax_gradhealth", "diagnose", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    child.stdout.close()
    _, err = child.communicate(timeout=300)
    assert "Traceback" not in err.decode() and "BrokenPipeError" not in err.decode(), err.decode()
    assert child.returncode == 1


def test_demo_summary_names_only_the_files_it_wrote(tmp_path, capsys):
    from optax_gradhealth import demo

    result = {"seconds": 1.0, "final_loss": 2.0, "events": {}, "rollbacks": [], "findings": []}
    demo.print_summary({**result, "log": "out/run.jsonl", "report": None})  # --no-report, or no matplotlib
    assert capsys.readouterr().out.rstrip().endswith("\nwrote out/run.jsonl")
    demo.print_summary({**result, "log": "out/run.jsonl", "report": "out/report.png"})
    written = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert written == "wrote out/run.jsonl, out/report.png, out/report.findings.txt, out/report.findings.json"


def test_cli_cut_last_line_warns_and_reports(tmp_path):
    path = write_jsonl(tmp_path / "run.jsonl", guard_like_rows())
    with open(path, "a") as file:
        file.write('{"step": 200, "grad/no')
    result = run_cli("report", path, "-o", tmp_path / "r.png")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "python -m optax_gradhealth: warning: " + f"{path}:201: skipped a cut line " + (
        "(the run stopped while writing it)"
    )
    assert "gradient explosion" in result.stdout and (tmp_path / "r.png").stat().st_size > 10_000


def test_cli_reads_a_tensorboard_directory_and_help_has_examples(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("tensorboardX")
    writer = gh.TensorBoardWriter(tmp_path / "tb")
    for row in guard_like_rows():
        writer.write(row["step"], {k: v for k, v in row.items() if k != "step"})
    writer.close()
    result = run_cli("diagnose", tmp_path / "tb")
    assert result.returncode == 0, result.stderr
    assert "non-finite" in result.stdout and "gradient explosion" in result.stdout
    help_text = run_cli("report", "--help")
    assert help_text.returncode == 0 and "examples:" in help_text.stdout and "report run.jsonl -o" in help_text.stdout


# ----------------------------------------------------------------------------- logger, example, typing

_CRASH = """
import os, sys
import jax.numpy as jnp
from optax_gradhealth.writers import JsonlWriter, MetricLogger
path, all_steps, crash_after = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
logger = MetricLogger(JsonlWriter(path), log_every=10, all_steps=all_steps)
for step in range(100):
    logger.log(step, {"loss": jnp.float32(step)})
    if step == crash_after:
        os._exit(1)  # killed: no close, no flush, no atexit
"""


@pytest.mark.parametrize("all_steps", [False, True])
def test_metric_logger_crash_loses_at_most_the_unfetched_steps(tmp_path, all_steps):
    path = tmp_path / "run.jsonl"
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(_CRASH))
    result = subprocess.run(
        [sys.executable, str(script), str(path), str(int(all_steps)), "25"], env=ENV, capture_output=True, timeout=120
    )
    assert result.returncode == 1, result.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no cut line either
        steps = [row["step"] for row in gh.read_jsonl(path)]
    if all_steps:  # written at steps 0, 10 and 20: 21..25 were not fetched yet
        assert steps == list(range(21))
        assert 25 - steps[-1] <= 10 - 1
    else:  # every logged step (0, 10, 20) is on disk
        assert steps == [0, 10, 20]


def test_multihost_example_runs_its_local_demo_without_arguments():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "multihost_launch.py"), "--steps", "2", "--timeout", "240"],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "running the local demo, 2 processes x 4 CPU devices" in result.stdout
    assert "step   0 loss" in result.stdout
    usage = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "multihost_launch.py"), "--coordinator", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert usage.returncode == 2 and "needs all of --coordinator" in usage.stderr


def test_py_typed_marker_ships_in_the_wheel(tmp_path):
    import tomllib
    import zipfile

    assert (ROOT / "optax_gradhealth" / "py.typed").is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["optax_gradhealth"]
    pytest.importorskip("build")
    source = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(
        ROOT / "optax_gradhealth", source / "optax_gradhealth", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "CHANGELOG.md"):
        shutil.copy(ROOT / name, source / name)
    result = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {result.stderr[-500:]}")
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert "optax_gradhealth/py.typed" in zipfile.ZipFile(wheel).namelist()


def test_bench_host_runs_at_a_tiny_size():
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_host.py"),
            "--rows",
            "600",
            "--columns",
            "20",
            "--repeat",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.split()}
    assert {"json", "diagnose", "report"} <= set(rows)
    assert float(rows["json"][2]) == 1.0  # the ratio column, against itself


# ----------------------------------------------------------------------------- logged vs missing


def test_jsonl_tells_a_logged_nan_from_a_missing_value_on_both_read_paths(tmp_path):
    """'"NaN"' is logged; a missing key or null is not; the same on the fast path (rows
    with the same keys) and the row-by-row path (a row holding another string)."""
    lines = [
        '{"step": 0, "grad/norm": 1.0, "loss": 2.0}',
        '{"step": 1, "grad/norm": "NaN", "loss": 2.0}',
        '{"step": 2, "loss": 2.0}',
        '{"step": 3, "grad/norm": null, "loss": 2.0}',
        '{"step": 4, "grad/norm": "NaN", "loss": 2.0, "note": "eval"}',
        '{"step": 5, "grad/norm": null, "loss": 2.0, "note": "eval"}',
        '{"step": 6, "grad/norm": 3.0, "loss": 2.0}',
    ]
    path = tmp_path / "run.jsonl"
    path.write_text("\n".join(lines) + "\n")
    h = gh.load_history(path)
    assert h.logged("grad/norm").tolist() == [True, True, False, False, True, False, True]
    assert h.logged("loss").tolist() == [True] * 7
    assert h.logged("no/such").tolist() == [False] * 7
    rows = [json.loads(line) for line in lines]  # rows in memory: the same
    assert gh.load_history(rows).logged("grad/norm").tolist() == [True, True, False, False, True, False, True]
    # Columns of a dict (or a History built directly) cannot tell: every NaN is logged.
    assert gh.load_history({"grad/norm": [1.0, math.nan]}).logged("grad/norm").tolist() == [True, True]


def test_a_resumed_log_keeps_the_logged_nans_of_the_rows_that_win():
    rows = [{"step": 0, "grad/norm": 1.0}, {"step": 1, "grad/norm": "NaN", "loss": 2.0}, {"step": 1, "loss": 1.0}]
    h = gh.load_history(rows)  # step 1 written again (the loss) without the norm: the later row wins
    assert h.steps.tolist() == [0, 1] and h.logged("grad/norm").tolist() == [True, False]
    assert h["loss"].tolist()[1] == 1.0 and h.restarts == (1,)
    # Another logger's row of step 1 (no metric in common) joins it: the NaN stays logged.
    h = gh.load_history([rows[0], {"step": 1, "grad/norm": "NaN"}, rows[2]])
    assert h.logged("grad/norm").tolist() == [True, True] and h["loss"].tolist()[1] == 1.0 and h.restarts == ()


def test_jsonl_step_that_is_not_a_number_names_file_and_line(tmp_path):
    for bad in ("null", '"abc"', '"NaN"'):
        path = tmp_path / "run.jsonl"
        path.write_text('{"step": 0, "a": 1}\n{"step": ' + bad + ', "a": 2}\n')
        with pytest.raises(ValueError, match=r"run\.jsonl:2: the step must be a finite number"):
            gh.load_history(path)
    with pytest.raises(ValueError, match=r"row 1: the step must be a finite number, got None"):
        gh.load_history([{"step": 0}, {"step": None}])
    result = run_cli("diagnose", path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("run.jsonl:2: the step must be a finite number, got 'NaN'.")


def test_wandb_csv_empty_cells_are_not_logged_and_nan_cells_are(tmp_path):
    path = tmp_path / "mixed.csv"
    with open(path, "w", newline="") as file:
        out = csv.writer(file)
        out.writerow(["_step", "loss", "grad/norm"])
        out.writerows([[0, 2.0, 1.0], [1, 2.0, ""], [2, 2.0, "NaN"], [3, 2.0, ""], [4, 2.0, 1.5]])
    h = gh.load_history(path)
    assert h.logged("grad/norm").tolist() == [True, False, True, False, True]
    finding = next(f for f in gh.diagnose(path) if f.pattern == "nonfinite")
    assert finding.steps == (2,) and finding.evidence["nonfinite_logged_steps"] == 1
    assert finding.evidence["fraction"] == round(1 / 3, 6)  # 1 of the 3 rows that logged the norm


def test_tensorboard_step_union_rows_are_not_nan_gradients(tmp_path):
    """The loss every step, gradhealth metrics every 10 steps: the union's other rows
    lack grad/norm; a NaN written as a value is logged."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("tensorboardX")
    writer = gh.TensorBoardWriter(tmp_path / "tb")
    for t in range(100):
        writer.write(t, {"loss": 2.0 - 0.01 * t})
        if t % 10 == 0:
            norm = math.nan if t == 40 else 1.0
            writer.write(t, {"grad/norm": norm, "grad/finite": float(t != 40), "grad/skipped": float(t == 40)})
    writer.close()
    h = gh.load_history(tmp_path / "tb")
    assert np.flatnonzero(h.logged("grad/norm")).tolist() == list(range(0, 100, 10))
    found = {f.pattern: f for f in gh.diagnose(tmp_path / "tb")}
    assert list(found) == ["nonfinite"] and found["nonfinite"].steps == (40,)
    assert found["nonfinite"].evidence["fraction"] == 0.1  # 1 of the 10 logged rows


def test_old_and_current_names_in_one_log_are_merged_per_row():
    """A 0.1.0 run (grad/spike) resumed after an upgrade (grad/spiked): both halves read
    under the current name; on a row with both, the current name's value wins."""
    rows = [{"step": t, "grad/norm": 1.0, "grad/spike": float(t == 10)} for t in range(50)]
    rows += [{"step": t, "grad/norm": 1.0, "grad/spiked": float(t == 70)} for t in range(50, 100)]
    rows[20]["grad/spiked"] = 0.0  # both names on one row, disagreeing: the current one wins
    rows[20]["grad/spike"] = 1.0
    rows[30]["grad/spiked"] = "NaN"  # a logged NaN under the current name wins too
    h = gh.load_history(rows)
    spiked = h.col("grad/spiked")
    assert h.steps[spiked == 1].tolist() == [10, 70]
    assert np.flatnonzero(np.isnan(spiked)).tolist() == [30]
    assert "grad/spike" not in h.names
    # Columns given directly (no presence information): a number under the old name fills a NaN.
    direct = History([0, 1, 2], {"grad/spike": [1.0, 0.0, 1.0], "grad/spiked": [math.nan, 1.0, 0.0]})
    assert direct.col("grad/spiked").tolist() == [1.0, 1.0, 0.0]


def test_legacy_names_work_with_getitem_and_in():
    h = History([0, 1], {"grad/spike": [0.0, 1.0]})  # a 0.1.0 log
    assert "grad/spike" in h and "grad/spiked" in h
    assert h["grad/spike"].tolist() == [0.0, 1.0] and h["grad/spiked"].tolist() == [0.0, 1.0]
    with pytest.raises(KeyError):
        h["grad/no_such"]


def test_wandb_ui_csv_run_name_holding_a_dash_separator(tmp_path):
    path = tmp_path / "ui.csv"
    with open(path, "w", newline="") as file:
        out = csv.writer(file)
        out.writerow(["Step", "bert - lr 3e-4 - grad/norm", "bert - lr 3e-4 - grad/norm__MIN", "bert - lr 3e-4 - loss"])
        out.writerows([[t, 1.0 + t, 1.0 + t, 2.0] for t in range(5)])
    h = gh.load_history(path)
    assert h.names == ("grad/norm", "loss")
    assert h["grad/norm"].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    one = tmp_path / "one.csv"  # a single metric column: everything up to its last " - "
    one.write_text("Step,a - b - grad/norm\n0,1.0\n")
    assert gh.load_history(one).names == ("grad/norm",)


# ----------------------------------------------------------------------------- CLI arguments


def test_cli_threshold_out_of_range_and_bad_image_extension_are_usage_errors(tmp_path):
    log = write_jsonl(tmp_path / "run.jsonl", make_rows(50))
    from optax_gradhealth import __main__ as cli

    cases = [
        (["diagnose", log, "--threshold", "clip_suggest_percentile=200"], "clip_suggest_percentile", "[0, 100]"),
        (["diagnose", log, "--threshold", "spike_window=-3"], "spike_window", ">= 1"),
        (["diagnose", log, "--threshold", "min_steps=0"], "min_steps", ">= 1"),
        (["diagnose", log, "--threshold", "oscillation_fraction=nan"], "oscillation_fraction", "[0, 1]"),
        (["report", log, "-o", str(tmp_path / "r.xyz")], "r.xyz", ".png"),
    ]
    for argv, field, allowed in cases:
        with pytest.raises(SystemExit) as raised:
            cli.main([str(a) for a in argv])
        assert raised.value.code == 2
        message = str(raised.value)
        assert field in message and allowed in message, message
    assert not (tmp_path / "r.xyz").exists() and not (tmp_path / "r.findings.txt").exists()
    result = run_cli("diagnose", log, "--threshold", "spike_window=-3")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "python -m optax_gradhealth: error: --threshold: Thresholds.spike_window must be an integer >= 1, got -3."
    )


def test_cli_report_without_an_extension_names_the_png_it_wrote(tmp_path, capsys):
    from optax_gradhealth import __main__ as cli

    log = write_jsonl(tmp_path / "run.jsonl", make_rows(50))
    assert cli.main(["report", str(log), "-o", str(tmp_path / "noext")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    stem = str(tmp_path / "noext")
    assert last == f"wrote {stem}.png, {stem}.findings.txt, {stem}.findings.json"
    assert (tmp_path / "noext.png").exists() and not (tmp_path / "noext").exists()
    assert gh.plot_report(make_rows(20), tmp_path / "other") == str(tmp_path / "other.png")


def test_cli_batch_size_threshold_is_an_integer(tmp_path, capsys):
    from optax_gradhealth import __main__ as cli

    rows = [{"step": t, "grad/norm": 1.0, "grad/noise_scale": 10.0} for t in range(50)]
    log = write_jsonl(tmp_path / "run.jsonl", rows)
    assert cli.main(["diagnose", str(log), "--threshold", "batch_size=256"]) == 0
    assert "the batch (256) is 25.6x above the noise scale (10)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"batch_size expects an integer or None, got '2\.5'"):
        cli.main(["diagnose", str(log), "--threshold", "batch_size=2.5"])


@pytest.mark.parametrize("steps", ["0", "1", "-5"])
def test_demo_rejects_fewer_than_two_steps_as_a_usage_error(steps, capsys):
    from optax_gradhealth import demo

    with pytest.raises(SystemExit) as raised:
        demo.main(["--steps", steps, "--no-progress"])
    assert raised.value.code == 2
    assert f"argument --steps: must be at least 2, got {int(steps)}" in capsys.readouterr().err


def test_load_history_skip_bad_lines_must_be_a_bool(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text('{"step": 0, "loss": 1}\nnot json\n{"step": 1, "loss": 2}\n')
    for bad in ("False", 0, None):
        with pytest.raises(TypeError, match=r"`skip_bad_lines` must be True or False"):
            gh.load_history(path, skip_bad_lines=bad)
    with pytest.raises(ValueError, match=r"run\.jsonl:2"):
        gh.load_history(path, skip_bad_lines=np.bool_(False))
    with pytest.warns(LogReadWarning, match=r"run\.jsonl:2: skipped a bad line"):
        assert gh.load_history(path, skip_bad_lines=np.bool_(True)).steps.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("step", "message"),
    [
        (math.nan, r"row 1: the step must be a finite number, got nan"),
        (math.inf, r"row 1: the step must be a finite number, got inf"),
        (1.5, r"row 1: the step must be an integer, got 1.5"),
        (1e30, r"row 1: the step must be an integer in int64's range .*got 1e\+30"),
        (2**63, r"row 1: the step must be an integer in int64's range .*got 9223372036854775808"),
        (-(2**63) - 1, r"row 1: the step must be an integer in int64's range .*got -9223372036854775809"),
    ],
)
def test_a_step_that_is_not_an_int64_integer_is_an_error_in_every_source(tmp_path, step, message):
    with pytest.raises(ValueError, match=message):
        gh.load_history({"step": [0, step], "loss": [1.0, 2.0]})
    with pytest.raises(ValueError, match=message):
        gh.load_history([{"step": 0, "loss": 1.0}, {"step": step, "loss": 2.0}])
    path = tmp_path / "run.jsonl"
    text = json.dumps(step) if math.isfinite(step) else {"nan": '"NaN"', "inf": '"Infinity"'}[str(step)]
    path.write_text('{"step": 0, "loss": 1.0}\n{"step": ' + text + ', "loss": 2.0}\n')
    message = message.replace("row 1", r"run\.jsonl:2").replace("got nan", "got 'NaN'")
    message = message.replace("got inf", "got 'Infinity'")
    with pytest.raises(ValueError, match=message):
        gh.load_history(path)


def test_steps_beyond_float64_precision_stay_exact(tmp_path):
    steps = [2**53, 2**53 + 1, 2**63 - 1]
    rows = [{"step": s, "grad/norm": float(i)} for i, s in enumerate(steps)]
    rows.insert(0, {"step": -(2**63), "grad/norm": -1.0})
    path = write_jsonl(tmp_path / "run.jsonl", rows)
    expected = [-(2**63), *steps]
    for source in (path, rows, {"step": [r["step"] for r in rows], "grad/norm": [r["grad/norm"] for r in rows]}):
        h = gh.load_history(source)
        assert h.steps.dtype == np.int64 and h.steps.tolist() == expected, source
        assert h["grad/norm"].tolist() == [-1.0, 0.0, 1.0, 2.0] and h.rows_replaced == 0


@pytest.mark.parametrize("column", [1.0, "abc", None, {"a": 1.0}])
def test_a_dict_history_column_that_is_not_a_sequence_is_an_error(column):
    with pytest.raises(TypeError, match=r"column 'loss' of a dict history must be a list or array of values"):
        gh.load_history({"loss": column})
    with pytest.raises(TypeError, match=r"column 'loss' of a dict history must be a list or array of values"):
        gh.load_history({"step": [0], "loss": column})


def test_wandb_csv_with_a_byte_order_mark_keeps_its_step_column(tmp_path):
    # A CSV re-saved by a spreadsheet starts with a BOM: the header's first name was
    # '\ufeff_step', so the steps became row numbers and the BOM name a metric column.
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeff_step,grad/norm\n100,1.0\n200,2.0\n".encode())
    h = gh.load_history(path)
    assert h.steps.tolist() == [100, 200]
    assert h.names == ("grad/norm",)


@pytest.mark.parametrize("cell", ["1.5", "2.7", "1e-3"])
def test_wandb_csv_step_that_is_not_an_integer_names_its_line(tmp_path, cell):
    # logging.md: a step that is not a whole number is an error naming file:line (the
    # CSV reader truncated 1.5 to 1, making duplicate steps and false restarts).
    path = tmp_path / "half.csv"
    path.write_text(f"_step,grad/norm\n0,1.0\n{cell},1.0\n2,1.0\n")
    with pytest.raises(ValueError, match=rf"half\.csv:3: the step must be an integer, got '{cell}'"):
        gh.load_history(path)
    path.write_text("_step,grad/norm\n0,1.0\n1.0,1.0\n9007199254740993,1.0\n")  # whole numbers, one past 2**53
    assert gh.load_history(path).steps.tolist() == [0, 1, 2**53 + 1]


def test_a_repeated_step_in_a_tensorboard_log_is_a_restart(tmp_path):
    # Steps 0..4, then a resumed run writing 4..6: step 4 was replaced with no restart.
    writer = gh.TensorBoardWriter(tmp_path)
    for step in [0, 1, 2, 3, 4, 4, 5, 6]:
        writer.write(step, {"grad/norm": float(step)})
    writer.close()
    h = gh.load_history(tmp_path)
    assert (h.restarts, h.restarted_from, h.rows_replaced) == ((4,), (4,), 1)
    assert h.steps.tolist() == list(range(7))
