"""A run's logged metrics as columns: :class:`History` and :func:`load_history`.

Host side only (numpy). Every reader of logs in the package goes through
:func:`load_history`: ``gh.diagnose``, the plotted report and the command line.

Sources:

* a JSON Lines log (:class:`optax_gradhealth.writers.JsonlWriter`): parsed line by line
  with the standard library's ``json`` straight into columns (no list of row dicts);
* a TensorBoard log directory (or one event file), read with the ``tensorboard``
  package's ``EventAccumulator`` (``pip install tensorboard``, in the ``examples``
  extra); the tags are the metric names (``gh.TensorBoardWriter`` writes them so);
* a CSV file: a Weights & Biases history export (``run.history().to_csv()`` or the
  UI's CSV export), the step in ``_step`` / ``Step`` / ``step``;
* rows in memory: a list of metric dicts (values may be arrays, flattened like
  :func:`optax_gradhealth.writers.flatten` does), a dict of equal-length columns, or a
  :class:`History`.

What a real run's log holds, and what is done about it:

* **a cut line**: a run killed mid-write leaves a line that stops before its closing
  brace. It is skipped with a :class:`LogReadWarning` naming ``file:line``; the rest is
  used. (``JsonlWriter`` starts a new line when it appends to such a file, so a resumed
  run's rows stay readable.) Any other line that is not a JSON object is an error naming
  ``file:line``, or is skipped with a warning when ``skip_bad_lines=True``.
* **a file that is not UTF-8 text** (a binary file, a picture): a ``ValueError`` that
  says so.
* **a resumed run appending to the same log**: the step goes backwards. A run that
  goes back to step ``s`` starts its timeline again there: every row written before it
  at a step ``>= s`` is dropped, the ones it logs again and the ones of the abandoned
  run beyond the step it has reached so far. :attr:`History.restarts` lists the steps
  the run went back to (``gh.diagnose`` reports them as ``restart``, the report marks
  them).
* **names behind a prefix** (``gh.MetricLogger(prefix='train/')``): when no column is a
  gradhealth metric but some are behind a prefix ending in ``/``, :func:`load_history`
  removes that prefix (see its ``prefix`` argument).
"""

from __future__ import annotations

import bisect
import csv
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from optax_gradhealth import _validation as check
from optax_gradhealth._catalogue import CATALOGUE, current_name, is_declared

__all__ = ["History", "LogReadWarning", "load_history"]

_NONFINITE = {"NaN": math.nan, "nan": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
# Rows parsed are converted to numpy when either bound is reached: the values bound keeps
# the Python floats alive small on a wide log (a 64-device run logs 12,751 values a row).
_CHUNK_ROWS = 4096
_CHUNK_VALUES = 2**18
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1  # a step must fit in History.steps (int64)


class LogReadWarning(UserWarning):
    """A log line that was skipped (a cut last line, or a bad line with ``skip_bad_lines``)."""


class History:
    """A run's logged metrics as columns, one row per logged step.

    Built by :func:`load_history` (or directly from columns). A row written at or below
    the step the run has reached (the step goes backwards, or repeats, in the given
    order) is a restart when it logs a metric that a row it goes back over logged: a
    resumed run appending to the same log. A restart to step ``s`` supersedes every row
    written before it at a step ``>= s``: the rows the resumed run logs again, and the
    abandoned run's rows beyond the step it has reached so far. A row that logs none of
    their metrics is another logger's (an eval row after the train row of its step, a
    summary row logged at step 0 at the end): its values join the row of its step. Of
    two rows of one step that log the same metric, the later one gives it. What is left
    is sorted by step, one row per step.

    Args:
      steps: ``[T]`` integer steps, in the order they were logged.
      columns: ``{name: array}``, each ``[T]`` (NaN where a row lacks the name) or
        ``[T, ...]`` for a vector or matrix metric (stored as ``name/i`` / ``name/i/j``
        columns, the names :func:`optax_gradhealth.writers.flatten` gives).
      source: where it was read from (a path), for messages and titles.
      nan_logged: ``{name: [T] bool}`` (shaped like the column): the rows where a NaN in
        the column was logged as NaN, as opposed to a row that lacks the metric. A column
        not named here has no logged NaN. None (default): the source cannot tell the two
        apart, and every NaN counts as logged. :func:`load_history` fills it from the
        readers (a JSON ``"NaN"``, a CSV ``NaN`` cell, a TensorBoard NaN value; a JSON
        ``null``, an empty CSV cell, a step another tag was written at, or a key a row
        lacks are not logged).

    Attributes:
      steps: ``[T]`` int64, strictly increasing.
      columns: ``{name: [T] float64}``, NaN where a row lacks the name.
      restarts: the steps the run went back to, in log order (empty for a run that was
        never resumed); a step logged again right after itself (a run resumed at the last
        step it logged) is one too.
      restarted_from: the step logged just before each restart.
      rows_replaced: rows dropped because a later write went back to or before their
        step (a restart supersedes them).
      rows_superseded: those of them above every step the rows kept after them logged:
        the abandoned run's rows beyond the step the resumed run has reached (its tail).
      prefix: the prefix :func:`load_history` removed from the names (``'train/'``), or
        ``''``.
      source: the path it was read from, or None.

    Example:
      >>> import numpy as np
      >>> from optax_gradhealth.history import History
      >>> h = History([0, 1, 2, 1, 2, 3], {'grad/norm': [1.0, 2.0, 9.0, 2.5, 3.0, 4.0],
      ...                                  'xdev/device_norms': np.ones((6, 2))})
      >>> h.steps.tolist(), h['grad/norm'].tolist(), h.restarts, h.rows_replaced
      ([0, 1, 2, 3], [1.0, 2.5, 3.0, 4.0], (1,), 2)
      >>> h['xdev/device_norms'].shape
      (4, 2)
      >>> h = History([0, 10, 20, 30, 10], {'loss': [1.0, 2.0, 3.0, 4.0, 1.5]})  # resumed at 10
      >>> h.steps.tolist(), h['loss'].tolist(), h.rows_replaced, h.rows_superseded
      ([0, 10], [1.0, 1.5], 3, 2)
      >>> nan = float('nan')  # a train row, then an eval row of the same step
      >>> h = History([0, 1, 1], {'loss': [1.0, 0.5, nan], 'eval/loss': [nan, nan, 0.7]})
      >>> h.steps.tolist(), h['loss'].tolist(), h['eval/loss'].tolist(), h.restarts
      ([0, 1], [1.0, 0.5], [nan, 0.7], ())
    """

    def __init__(
        self,
        steps: Any,
        columns: Mapping[str, Any],
        *,
        source: str | None = None,
        nan_logged: Mapping[str, Any] | None = None,
    ):
        steps = np.asarray(steps)
        if steps.ndim != 1:
            raise ValueError(f"History: `steps` must be 1-D, got shape {steps.shape}.")
        steps = steps.astype(np.int64, copy=False)
        flat = _flat_columns(columns, steps.size, np.float64)
        # NaN cells that were logged as NaN (None: every NaN counts as logged).
        logged_nan = None if nan_logged is None else _flat_columns(nan_logged, steps.size, bool)
        if logged_nan is not None:
            logged_nan = {name: mask & np.isnan(flat[name]) for name, mask in logged_nan.items() if name in flat}
        _current_names(flat, logged_nan, steps.size)
        self.source = source
        self.restarts: tuple[int, ...]
        self.restarted_from: tuple[int, ...]
        self.prefix = ""
        side, restart = _side_rows(steps, flat, logged_nan)
        self.restarts, self.restarted_from = _restarts(steps, restart)
        keep = _current_rows(steps, side)
        if keep.size != steps.size:
            self.rows_replaced, self.rows_superseded = _dropped(steps, keep)
            steps = steps[keep]
            for name in list(flat):
                flat[name] = flat[name][keep]
            if logged_nan is not None:
                logged_nan = {name: mask[keep] for name, mask in logged_nan.items()}
        else:
            self.rows_replaced = self.rows_superseded = 0
        if side.any():  # side rows join the row at their step (a later write wins a cell)
            steps, flat, logged_nan = _merge_steps(steps, flat, logged_nan)
        self.steps: np.ndarray = steps
        self.columns: dict[str, np.ndarray] = dict(sorted(flat.items()))
        self._logged_nan = None if logged_nan is None else {n: m for n, m in logged_nan.items() if m.any()}
        self._nan: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.steps.size)

    def __repr__(self) -> str:
        span = f"steps {self.steps[0]}..{self.steps[-1]}" if len(self) else "empty"
        extra = f", {len(self.restarts)} restart(s)" if self.restarts else ""
        return f"History({len(self)} rows, {len(self.columns)} columns, {span}{extra})"

    @property
    def names(self) -> tuple[str, ...]:
        """The column names, sorted.

        Example:
          >>> from optax_gradhealth.history import History
          >>> History([0], {'loss': [1.0], 'grad/norm': [2.0]}).names
          ('grad/norm', 'loss')
        """
        return tuple(self.columns)

    def has(self, name: str) -> bool:
        """Whether a ``[T]`` column ``name`` was logged.

        Example:
          >>> from optax_gradhealth.history import History
          >>> h = History([0], {'loss': [1.0]})
          >>> h.has('loss'), h.has('grad/norm')
          (True, False)
        """
        return current_name(name) in self.columns

    def col(self, name: str) -> np.ndarray:
        """The ``[T]`` column ``name`` (all NaN when it was never logged).

        Example:
          >>> from optax_gradhealth.history import History
          >>> h = History([0, 1], {'loss': [1.0, 0.5]})
          >>> h.col('loss').tolist(), h.col('grad/norm').tolist()
          ([1.0, 0.5], [nan, nan])
        """
        column = self.columns.get(current_name(name))
        if column is not None:
            return column
        if self._nan is None:
            self._nan = np.full(len(self), np.nan)
            self._nan.flags.writeable = False
        return self._nan

    def logged(self, name: str) -> np.ndarray:
        """``[T]`` bool: the rows where ``name`` was logged (a number, or NaN logged as
        NaN), as opposed to rows that lack it (a NaN cell of :meth:`col` either way).
        When the source cannot tell them apart (see ``nan_logged``), every row of a
        logged column counts.

        Example:
          >>> from optax_gradhealth.history import History
          >>> h = History([0, 1, 2], {'grad/norm': [1.0, float('nan'), float('nan')]},
          ...             nan_logged={'grad/norm': [False, True, False]})
          >>> h.logged('grad/norm').tolist(), h.logged('loss').tolist()
          ([True, True, False], [False, False, False])
        """
        column = self.columns.get(current_name(name))
        if column is None:
            return np.zeros(len(self), bool)
        if self._logged_nan is None:
            return np.ones(len(self), bool)
        nan = self._logged_nan.get(current_name(name))
        present = ~np.isnan(column)
        return present if nan is None else present | nan

    def indexed(self, name: str) -> list[tuple[int, ...]]:
        """The index suffixes logged under ``name/i`` or ``name/i/j`` (sorted).

        Example:
          >>> import numpy as np
          >>> from optax_gradhealth.history import History
          >>> History([0], {'xdev/pairwise_cosine': np.eye(2)[None]}).indexed('xdev/pairwise_cosine')
          [(0, 0), (0, 1), (1, 0), (1, 1)]
        """
        pattern = re.compile(re.escape(current_name(name)) + r"((?:/\d+)+)$")
        found = {
            tuple(int(i) for i in m.group(1).strip("/").split("/")) for n in self.columns if (m := pattern.match(n))
        }
        return sorted(found)

    def vector(self, name: str) -> np.ndarray | None:
        """``[T, K]`` from ``name/0`` ... ``name/K-1`` columns, or None.

        Example:
          >>> from optax_gradhealth.history import History
          >>> h = History([0, 1], {'xdev/device_norms/0': [1.0, 2.0], 'xdev/device_norms/1': [3.0, 4.0]})
          >>> h.vector('xdev/device_norms').tolist(), h.vector('loss')
          ([[1.0, 3.0], [2.0, 4.0]], None)
        """
        index = [i for i in self.indexed(name) if len(i) == 1]
        if not index:
            return None
        return np.stack([self.col(f"{name}/{i[0]}") for i in index], axis=1)

    def matrix(self, name: str) -> np.ndarray | None:
        """``[T, K, K]`` from ``name/j/k`` columns (NaN where an entry is missing), or None.

        Example:
          >>> from optax_gradhealth.history import History
          >>> History([0], {'m/0/1': [0.5], 'm/1/0': [0.5]}).matrix('m').tolist()
          [[[nan, 0.5], [0.5, nan]]]
        """
        index = [i for i in self.indexed(name) if len(i) == 2]
        if not index:
            return None
        k = max(max(i) for i in index) + 1
        out = np.full((len(self), k, k), np.nan)
        for j, m in index:
            out[:, j, m] = self.col(f"{name}/{j}/{m}")
        return out

    def __getitem__(self, name: str) -> np.ndarray:
        """A ``[T]`` column, or a vector (``[T, K]``) or matrix (``[T, K, K]``) metric
        stacked from its ``name/i`` / ``name/i/j`` columns."""
        if current_name(name) in self.columns:
            return self.columns[current_name(name)]
        index = self.indexed(name)
        if index and all(len(i) == 1 for i in index):
            return self.vector(name)
        if index and all(len(i) == 2 for i in index):
            return self.matrix(name)
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (current_name(name) in self.columns or bool(self.indexed(name)))

    def leaf_names(self) -> list[str]:
        """The leaves logged as ``grad/leaf_norm/<path>`` (sorted; logs of 0.1.0 named
        them ``grad/layer_norm/<path>``).

        Example:
          >>> from optax_gradhealth.history import History
          >>> History([0], {'grad/leaf_norm/head/kernel': [1.0], 'grad/layer_norm/w': [1.0]}).leaf_names()
          ['head/kernel', 'w']
        """
        prefix = "grad/leaf_norm/"
        return sorted(n[len(prefix) :] for n in self.columns if n.startswith(prefix) and "#" not in n)

    def rows(self) -> list[dict[str, float]]:
        """The rows as dicts ``{'step': int, name: float}`` (every column, NaN where missing).

        Example:
          >>> from optax_gradhealth.history import History
          >>> History([3, 5], {'loss': [2.0, 1.0]}).rows()
          [{'step': 3, 'loss': 2.0}, {'step': 5, 'loss': 1.0}]
        """
        names = list(self.columns)
        values = np.stack([self.columns[n] for n in names], axis=1) if names else np.zeros((len(self), 0))
        return [{"step": int(step), **dict(zip(names, row))} for step, row in zip(self.steps.tolist(), values.tolist())]


def _current_names(flat: dict[str, np.ndarray], logged_nan: dict[str, np.ndarray] | None, rows: int) -> None:
    """Renames deprecated (0.1.0) names in ``flat`` (and ``logged_nan``) to the current
    ones, in place. A log of 0.1.0 (or one written with both names, e.g. a run resumed
    after an upgrade) is read under the current names: per row, the current name's
    logged value wins, and the old name's fills the rows the current name lacks."""
    for name in list(flat):
        current = current_name(name)
        if current == name:
            continue
        old_column = flat.pop(name)
        old_nan = logged_nan.pop(name, None) if logged_nan is not None else None
        if current not in flat:
            flat[current] = old_column
            if old_nan is not None:
                logged_nan[current] = old_nan
            continue
        column = flat[current]
        if logged_nan is None:
            missing = np.isnan(column)  # a NaN may be logged: keep it unless the old name has a number
            flat[current] = np.where(missing & ~np.isnan(old_column), old_column, column)
            continue
        current_nan = logged_nan.get(current, np.zeros(rows, bool))
        missing = np.isnan(column) & ~current_nan
        flat[current] = np.where(missing, old_column, column)
        if old_nan is not None:
            logged_nan[current] = current_nan | (missing & old_nan)


def _side_rows(
    steps: np.ndarray, flat: Mapping[str, np.ndarray], logged_nan: Mapping[str, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    """``(side, restart)``, ``[T]`` bool each, for the rows written at or below the step
    the run has reached. A row that logs a metric one of the rows it would supersede
    logged (a resumed run logs what it logged before) is a restart. One that logs none of
    them is a side row: another logger's row at a step the run has reached (an eval row
    after the train row of its step, a summary row logged at step 0 at the end)."""
    side = np.zeros(steps.size, bool)
    back = np.flatnonzero(steps[1:] <= steps[:-1]) + 1
    restart = np.zeros(steps.size, bool)
    if back.size == 0 or not flat:
        restart[back] = True
        return side, restart

    def logged(name: str, column: np.ndarray, rows: Any) -> np.ndarray:
        cells = ~np.isnan(column[rows])
        if logged_nan is not None and name in logged_nan:
            cells |= logged_nan[name][rows]
        return cells

    timeline: list[int] = []  # the rows of the run's current timeline, by step
    key = steps.__getitem__
    row, check = 0, False  # check: compare the row with the timeline (it follows a side row)
    while row < steps.size:
        if not (check or (row > 0 and steps[row] <= steps[row - 1])):
            end = int(back[np.searchsorted(back, row, side="right")]) if back[-1] > row else steps.size
            timeline.extend(range(row, end))  # rows above the one before them, which is on the timeline
            row, check = end, False
            continue
        if steps[row] > steps[timeline[-1]]:
            timeline.append(row)
        else:
            start = bisect.bisect_left(timeline, steps[row], key=key)
            rows = np.asarray(timeline[start:])  # what a restart at this row would supersede
            names = [name for name, column in flat.items() if logged(name, column, row)]
            if any(logged(name, flat[name], rows).any() for name in names):
                del timeline[start:]
                timeline.append(row)
                restart[row] = True
            else:
                side[row] = True
        row, check = row + 1, bool(side[row])
    return side, restart


def _current_rows(steps: np.ndarray, side: np.ndarray) -> np.ndarray:
    """The rows (indices, in write order) that no later write supersedes: a row is kept
    when every row written after it, side rows (:func:`_side_rows`) aside, has a higher
    step. A run that goes back to step ``s`` (a resume, a rollback) starts its timeline
    again at ``s``, so every row written before it at a step ``>= s`` belongs to the
    abandoned run, the ones it logged again and the ones beyond where it has reached so
    far. Without side rows the kept steps are strictly increasing."""
    if steps.size < 2:
        return np.arange(steps.size)
    timeline = np.where(side, _INT64_MAX, steps)
    later_min = np.minimum.accumulate(timeline[::-1])[::-1][1:]  # the lowest step written after each row
    return np.flatnonzero(np.concatenate([steps[:-1] < later_min, [True]]))


def _merge_steps(
    steps: np.ndarray, flat: dict[str, np.ndarray], logged_nan: dict[str, np.ndarray] | None
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """The rows sorted by step, the rows of one step joined into one: per column, the
    last row (in write order) that logged it gives the cell."""
    order = np.argsort(steps, kind="stable")
    sorted_steps = steps[order]
    unique, starts = np.unique(sorted_steps, return_index=True)
    position = np.arange(order.size)
    for name in list(flat):
        column = flat[name][order]
        logged = ~np.isnan(column)
        if logged_nan is not None and name in logged_nan:
            logged |= logged_nan[name][order]
        last = np.maximum.reduceat(np.where(logged, position, -1), starts)  # -1: no row of the step logged it
        flat[name] = np.where(last >= 0, column[np.maximum(last, 0)], np.nan)
        if logged_nan is not None and name in logged_nan:
            logged_nan[name] = (last >= 0) & logged_nan[name][order][np.maximum(last, 0)]
    return unique, flat, logged_nan


def _dropped(steps: np.ndarray, keep: np.ndarray) -> tuple[int, int]:
    """``(rows_replaced, rows_superseded)``: the rows :func:`_current_rows` drops, and
    those of them above the highest step a kept row written after them logged (the
    abandoned run's tail, beyond the step the resumed run has reached). A dropped row at
    a step the resumed run passed without logging it (it logs other steps) is replaced,
    not superseded."""
    dropped = np.ones(steps.size, bool)
    dropped[keep] = False
    kept = np.full(steps.size, np.iinfo(np.int64).min)
    kept[keep] = steps[keep]
    later_max = np.maximum.accumulate(kept[::-1])[::-1]  # the highest kept step at or after each row
    reached = np.append(later_max[1:], np.iinfo(np.int64).min)  # ... written after it
    return int(np.count_nonzero(dropped)), int(np.count_nonzero(dropped & (steps > reached)))


def _restarts(steps: np.ndarray, restart: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(restarts, restarted_from)`` of steps in write order: the step of each restart
    row (``restart``, from :func:`_side_rows`), and the step logged just before it. A
    step logged again right after itself (a run resumed at the last step it logged) is
    a restart too: its later row replaces the earlier one."""
    back = np.flatnonzero(restart)
    return tuple(int(s) for s in steps[back]), tuple(int(s) for s in steps[back - 1])


def _flat_columns(columns: Mapping[str, Any], rows: int, dtype: Any) -> dict[str, np.ndarray]:
    """``{name: [T]}``: ``[T, ...]`` vector / matrix columns split into ``name/i[/j]``."""
    flat: dict[str, np.ndarray] = {}
    for name, value in columns.items():
        array = np.asarray(value, dtype=dtype)
        if array.ndim == 0 or array.shape[0] != rows:
            raise ValueError(f"History: column {name!r} has shape {array.shape}, expected {rows} rows (one per step).")
        if array.ndim == 1:
            flat[name] = array
        else:
            for index in np.ndindex(array.shape[1:]):
                flat[name + "".join(f"/{i}" for i in index)] = array[(slice(None), *index)]
    return flat


# --------------------------------------------------------------------------- load_history


def load_history(source: Any, *, skip_bad_lines: bool = False, prefix: str | None = None) -> History:
    """Reads a run's logged metrics into a :class:`History`.

    Args:
      source: a path to a JSON Lines log (``.jsonl``, written by ``gh.JsonlWriter``), a
        TensorBoard log directory or event file, a ``.csv`` Weights & Biases history
        export; or a list of metric dicts (each optionally with ``'step'``; values may
        be arrays), a dict of equal-length columns, or a :class:`History` (returned as
        it is).
      skip_bad_lines: skip (with a warning) JSON Lines lines that are not JSON objects
        instead of raising. A cut line (one that stops before its closing brace, what a
        run killed mid-write leaves) is always skipped with a warning. True or False.
      prefix: a prefix to remove from the metric names (a str), ``''`` to keep the names
        as logged, or None (default): when no column is a gradhealth metric
        (``grad/norm``, ``xdev/...``, see ``gh.CATALOGUE``) but some are behind a prefix
        ending in ``/`` (``train/grad/norm``, what ``gh.MetricLogger(prefix='train/')``
        writes), that prefix is removed. When several prefixes hold gradhealth metrics
        (``train/`` and ``eval/``), the one whose gradhealth metrics are logged on the
        most rows is removed (the first in sorted order on a tie), with a
        :class:`LogReadWarning` naming the others; the other prefixes' names stay as they
        are. A name that would then clash with a name already in the log keeps its prefix.
        A :class:`History` source is returned as it is.

    Returns:
      The :class:`History`: sorted by step, a restart superseding the earlier rows at
      its step and beyond, restarts listed in ``restarts``, the removed prefix in
      ``prefix``.

    Raises:
      FileNotFoundError: no such file or directory.
      ValueError: a line that is not a JSON object (naming ``file:line``), a file that
        is not UTF-8 text, a directory without TensorBoard event files, a step that is
        not an integer in int64's range (naming ``file:line`` or the row), a ``prefix``
        that no name starts with.
      TypeError: a source of another type, a column of a dict that is not a list or
        array, a ``skip_bad_lines`` that is not a bool, a ``prefix`` that is not a str or
        None.
      ImportError: a TensorBoard directory without the ``tensorboard`` package.

    Example:
      >>> import os, tempfile, warnings
      >>> import optax_gradhealth as gh
      >>> path = os.path.join(tempfile.mkdtemp(), 'run.jsonl')
      >>> with open(path, 'w') as f:
      ...     _ = f.write('{"step": 0, "grad/norm": 1.5}\\n{"step": 1, "grad/norm": "NaN"}\\n{"step": 2, "gr')
      >>> with warnings.catch_warnings(record=True) as caught:
      ...     warnings.simplefilter('always')
      ...     h = gh.load_history(path)
      >>> h.steps.tolist(), h['grad/norm'].tolist()
      ([0, 1], [1.5, nan])
      >>> str(caught[0].message).endswith('run.jsonl:3: skipped a cut line (the run stopped while writing it)')
      True
      >>> h = gh.load_history([{'step': 0, 'train/grad/norm': 2.0, 'train/loss': 0.5}])
      >>> h.names, h.prefix
      (('grad/norm', 'loss'), 'train/')
    """
    skip_bad_lines = check.boolean("skip_bad_lines", skip_bad_lines)
    if prefix is not None and not isinstance(prefix, str):
        raise TypeError(
            f"gh.load_history: `prefix` must be None (find it), '' (keep the names) or a str such as 'train/', "
            f"got {prefix!r} (type {type(prefix).__name__})."
        )
    if isinstance(source, History):
        return source
    return _without_prefix(_load(source, skip_bad_lines), prefix)


def _load(source: Any, skip_bad_lines: bool) -> History:
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file or directory.")
        if os.path.isdir(path):
            return _read_tensorboard(path)
        if "tfevents" in os.path.basename(path):
            return _read_tensorboard(path)
        if path.lower().endswith(".csv"):
            return _read_csv(path)
        return _read_jsonl(path, skip_bad_lines)
    if isinstance(source, Mapping):
        return _from_columns(source)
    if isinstance(source, (bytes, bytearray)) or not isinstance(source, Iterable):
        raise TypeError(
            "gh.load_history: expected a path, a list of metric dicts, a dict of columns or a History, "
            f"got {type(source).__name__}."
        )
    builder = _Builder(0)
    for i, row in enumerate(source):
        if not isinstance(row, Mapping):
            raise TypeError(
                f"gh.load_history: each history row must be a dict of metrics, row {i} is {type(row).__name__}."
            )
        builder.put_row(i, *_flat_row(row, i))
    return builder.history(None)


def _without_prefix(history: History, prefix: str | None) -> History:
    """``history`` with ``prefix`` removed from its names (in place); None: the prefix
    found by :func:`_gradhealth_prefix`."""
    if prefix is None:
        prefix = _gradhealth_prefix(history)
    elif prefix and not any(name.startswith(prefix) for name in history.columns):
        shown = ", ".join(list(history.columns)[:4]) + (", ..." if len(history.columns) > 4 else "")
        raise ValueError(
            f"gh.load_history: no metric name in {history.source or 'the rows'} starts with prefix={prefix!r} "
            f"(names: {shown or 'none'})."
        )
    if not prefix:
        return history
    renamed = {}
    for name in history.columns:
        short = name[len(prefix) :] if name.startswith(prefix) else name
        if short != name and (short in history.columns or not short):
            short = name  # a clash with a name logged without the prefix: keep the full name
        renamed[name] = short
    columns = {renamed[n]: c for n, c in history.columns.items()}
    logged_nan = None if history._logged_nan is None else {renamed[n]: m for n, m in history._logged_nan.items()}
    _current_names(columns, logged_nan, len(history))  # a 0.1.0 name behind the prefix ('train/grad/spike')
    history.columns = dict(sorted(columns.items()))
    history._logged_nan = None if logged_nan is None else {n: m for n, m in logged_nan.items() if m.any()}
    history.prefix = prefix
    return history


def _gradhealth_prefix(history: History) -> str:
    """The prefix ending in ``/`` that holds the log's gradhealth metrics, when no name is
    one as it is; ``''`` otherwise. Several: the one logged on the most rows (see
    :func:`load_history`), with a :class:`LogReadWarning`."""
    tops = {name.split("/", 1)[0] for name in CATALOGUE}  # 'grad', 'xdev', ... (and registered names')

    def known(name: str) -> bool:
        return name.split("/", 1)[0] in tops and is_declared(name)

    names = list(history.columns)
    if any(known(name) for name in names):
        return ""
    found: dict[str, list[str]] = {}
    for name in names:
        for cut in (i + 1 for i, ch in enumerate(name) if ch == "/"):
            if known(name[cut:]):
                found.setdefault(name[:cut], []).append(name)
    if len(found) <= 1:
        return next(iter(found), "")
    rows = {p: int(np.logical_or.reduce([history.logged(n) for n in found[p]]).sum()) for p in found}
    chosen = min(sorted(found), key=lambda p: -rows[p])
    others = ", ".join(f"{p!r} ({rows[p]} rows)" for p in sorted(found) if p != chosen)
    warnings.warn(
        f"{history.source or 'gh.load_history'}: gradhealth metrics are logged under several prefixes: read "
        f"{chosen!r} ({rows[chosen]} rows), not {others}; choose one with gh.load_history(..., prefix=...) "
        "(--prefix on the command line).",
        LogReadWarning,
        stacklevel=4,
    )
    return chosen


def _to_float(value: Any) -> float:
    if value is None:
        return math.nan
    if isinstance(value, str):
        return _NONFINITE.get(value, math.nan)
    return float(value)


def _flat_row(row: Mapping[str, Any], index: int, where: str | None = None) -> tuple[dict[str, float], set[str]]:
    """One row as ``({'step': int, name: float}, names not logged)``: arrays flattened
    (``name/i``), the non-finite strings turned into floats, ``null`` and other strings
    NaN but not logged (the second item); no step: ``index``. A step that is not a
    number is a ``ValueError`` naming ``where`` (``file:line``, default the row)."""
    from optax_gradhealth.writers import flatten

    step = row.get("step", index)
    numbers = {k: (math.nan if v is None else v) for k, v in row.items() if k != "step" and not isinstance(v, str)}
    flat = flatten(numbers)
    flat.update({k: _to_float(v) for k, v in row.items() if isinstance(v, str) and k != "step"})
    flat["step"] = _step_of(step, where or f"gh.load_history: row {index}")
    unlogged = {k for k, v in row.items() if v is None or (isinstance(v, str) and v not in _NONFINITE)}
    return flat, unlogged


def _step_of(step: Any, where: str) -> int:
    """The step as an exact int; a ``ValueError`` naming ``where`` for one that is not a
    number, not an integer (``1.5``) or outside int64's range (what ``History.steps``
    holds)."""
    if isinstance(step, (int, np.integer)) and not isinstance(step, (bool, np.bool_)):
        value = int(step)
    else:
        number = math.nan
        if isinstance(step, str):
            try:
                number = int(step.strip())  # exact, however large
            except ValueError:
                pass
        if not isinstance(step, (bool, np.bool_)) and number != number:
            try:
                number = float(np.asarray(step if not isinstance(step, str) else step.strip(), dtype=np.float64))
            except (TypeError, ValueError):
                pass
        if isinstance(number, float) and not math.isfinite(number):
            raise ValueError(f"{where}: the step must be a finite number, got {step!r}.")
        if isinstance(number, float) and not number.is_integer():
            raise ValueError(f"{where}: the step must be an integer, got {step!r}.")
        value = int(number)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"{where}: the step must be an integer in int64's range [-2**63, 2**63 - 1], got {step!r}.")
    return value


def _steps_of(steps: np.ndarray) -> np.ndarray:
    """A numeric step column as exact int64; a ``ValueError`` naming the first row whose
    step is not an integer in int64's range (see :func:`_step_of`)."""
    if steps.ndim != 1:
        raise ValueError(f"gh.load_history: the step column must be 1-D (one step per row), got shape {steps.shape}.")
    if steps.dtype.kind == "i":
        return steps.astype(np.int64, copy=False)
    if steps.dtype.kind == "u":
        bad = steps > _INT64_MAX
    elif steps.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(steps) | (steps != np.floor(steps)) | (steps < _INT64_MIN) | (steps >= 2.0**63)
    else:  # bools
        bad = np.ones(steps.shape, bool)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        _step_of(steps[row].item(), f"gh.load_history: row {row}")  # raises, naming the row
    return steps.astype(np.int64)


def _from_columns(columns: Mapping[str, Any]) -> History:
    for name, value in columns.items():
        try:
            sized = not isinstance(value, (str, bytes, Mapping)) and len(value) >= 0
        except TypeError:  # a number, None, a 0-d array
            sized = False
        if not sized:
            raise TypeError(
                f"gh.load_history: column {name!r} of a dict history must be a list or array of values (one per "
                f"row), got {value!r:.80} (type {type(value).__name__})."
            )
    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
        raise ValueError(f"gh.load_history: columns of a dict history must have one length, got {sorted(lengths)}.")
    count = lengths.pop() if lengths else 0
    arrays = {}
    for name, value in columns.items():
        try:
            array = np.asarray(value)
        except ValueError:  # ragged
            array = None
        if array is None or array.dtype.kind not in "biuf":
            # Strings, None or ragged values: row by row, as a list of dicts would be read.
            return _load([{k: v[i] for k, v in columns.items()} for i in range(count)], False)
        arrays[name] = array
    step = arrays.pop("step", None)
    if step is None:
        steps = np.arange(count)
    elif step.dtype.kind != "i" and isinstance(columns["step"], (list, tuple)):
        # Python numbers: one by one, exact (numpy would make [0, 2**63] floats).
        steps = np.array([_step_of(s, f"gh.load_history: row {i}") for i, s in enumerate(columns["step"])], np.int64)
    else:
        steps = _steps_of(step)
    return History(steps, arrays)


class _Builder:
    """Columns filled row by row (or block by block), grown as rows come."""

    def __init__(self, capacity: int):
        self.capacity = max(int(capacity), 16)
        self.count = 0  # rows put so far (the highest row index + 1)
        self.steps = np.zeros(self.capacity, np.int64)
        self.has_step = np.zeros(self.capacity, bool)
        self.columns: dict[str, np.ndarray] = {}
        self.nan_logged: dict[str, list[Any]] = {}  # name -> row indices (ints or arrays) of logged NaNs

    def reserve(self, rows: int) -> None:
        if rows <= self.capacity:
            return
        capacity = max(rows, int(self.capacity * 1.25) + 16)
        self.steps = _grown(self.steps, capacity, 0)
        self.has_step = _grown(self.has_step, capacity, False)
        for name in self.columns:
            self.columns[name] = _grown(self.columns[name], capacity, np.nan)
        self.capacity = capacity

    def column(self, name: str) -> np.ndarray:
        column = self.columns.get(name)
        if column is None:
            column = self.columns[name] = np.full(self.capacity, np.nan)
        return column

    def put_row(self, index: int, flat: Mapping[str, float], unlogged: Iterable[str] = ()) -> None:
        """One row; a NaN value is a logged NaN unless its name is in ``unlogged``."""
        self.reserve(index + 1)
        self.count = max(self.count, index + 1)
        for name, value in flat.items():
            if name == "step":
                self.steps[index] = value
                self.has_step[index] = True
            else:
                self.column(name)[index] = value
                if value != value and name not in unlogged:
                    self.nan_logged.setdefault(name, []).append(index)

    def put_block(self, index: np.ndarray, keys: tuple[str, ...], block: np.ndarray, steps: Any = None) -> None:
        """Rows ``index`` of the columns ``keys`` (``block``: ``[rows, keys]`` floats) and,
        unless None, their ``steps`` (ints, kept apart from the floats to stay exact)."""
        self.reserve(int(index[-1]) + 1)
        self.count = max(self.count, int(index[-1]) + 1)
        where: Any = index
        if int(index[-1]) - int(index[0]) + 1 == index.size:
            where = slice(int(index[0]), int(index[-1]) + 1)
        if steps is not None:
            self.steps[where] = np.array(steps, dtype=np.int64)
            self.has_step[where] = True
        for j, name in enumerate(keys):
            self.column(name)[where] = block[:, j]

    def put_nan_logged(self, name: str, index: np.ndarray) -> None:
        self.nan_logged.setdefault(name, []).append(index)

    def history(self, source: str | None) -> History:
        n = self.count
        steps = np.where(self.has_step[:n], self.steps[:n], np.arange(n))
        columns = {}
        for name in list(self.columns):
            column = self.columns.pop(name)
            if column.size != n:
                column = _trimmed(column, n)
            columns[name] = column
        nan_logged = {}
        for name, where in self.nan_logged.items():
            mask = nan_logged[name] = np.zeros(n, bool)
            for index in where:
                mask[index] = True
        return History(steps, columns, source=source, nan_logged=nan_logged)


def _grown(array: np.ndarray, capacity: int, fill: Any) -> np.ndarray:
    out = np.full(capacity, fill, dtype=array.dtype)
    out[: array.size] = array
    return out


def _trimmed(array: np.ndarray, n: int) -> np.ndarray:
    try:
        array.resize((n,), refcheck=False)  # in place: no second copy of a large column
        return array
    except ValueError:
        return array[:n].copy()


def _has_surrogates(text: str) -> bool:
    """Whether ``text`` (decoded with ``errors='surrogateescape'``) had bytes that are not UTF-8."""
    return not text.isascii() and any("\udc80" <= ch <= "\udcff" for ch in text)


def _not_utf8(path: str, line_number: int | None) -> ValueError:
    where = f"{path}:{line_number}" if line_number is not None else path
    return ValueError(
        f"{where}: not UTF-8 text (binary data?): is this a JSON Lines metrics log? "
        "(TensorBoard: pass the log directory or a file named *tfevents*)"
    )


def _read_jsonl(path: str, skip_bad_lines: bool) -> History:
    """The JSON Lines reader: ``json.loads`` per line, rows with the same keys (in the
    same order) gathered as tuples and turned into numpy blocks every few thousand rows."""
    size = os.path.getsize(path)
    builder = _Builder(0)
    # (keys, has a step) -> (row indices, value tuples, steps): the rows parsed since the
    # last conversion; the steps (ints) are kept out of the float blocks, to stay exact.
    pending: dict[tuple[tuple[str, ...], bool], tuple[list[int], list[tuple], list[int]]] = {}
    bad: list[int] = []
    parsed = 0
    pending_rows = pending_values = 0  # what `pending` holds
    sized = False  # the columns were sized from the bytes read at the first conversion
    loads = json.loads
    nonfinite = ('"NaN"', '"Infinity"', '"-Infinity"')

    def convert() -> None:
        for (keys, has_step), (index, values, steps) in pending.items():
            try:
                block = np.array(values, dtype=np.float64)
            except (ValueError, TypeError):
                block = None
            if block is None or block.shape != (len(values), len(keys)):
                for i, row, step in zip(index, values, steps if has_step else [None] * len(index)):
                    row = dict(zip(keys, row))
                    if has_step:
                        row["step"] = step
                    builder.put_row(i, *_flat_row(row, i))
            else:
                index = np.asarray(index)
                builder.put_block(index, keys, block, steps if has_step else None)
                nan_rows, nan_cols = np.nonzero(np.isnan(block))
                for r, j in zip(nan_rows.tolist(), nan_cols.tolist()):  # rare: NaN logged as NaN, or a null
                    if values[r][j] is not None:
                        builder.put_nan_logged(keys[j], index[r])
        pending.clear()

    with open(path, encoding="utf-8", errors="surrogateescape") as file:
        for line_number, line in enumerate(file, start=1):
            try:
                row = loads(line)
            except ValueError as error:
                if not line.strip():
                    continue
                _bad_line(path, line_number, line, error, skip_bad_lines, parsed)
                bad.append(line_number)
                continue
            if type(row) is not dict:
                _bad_line(path, line_number, line, None, skip_bad_lines, parsed)
                bad.append(line_number)
                continue
            # Fast path: every value a number, a bool, null or one of the non-finite strings
            # (each key and each such string adds two quotes); anything else row by row.
            quotes = line.count('"')
            simple = quotes == 2 * len(row) or quotes == 2 * len(row) + 2 * sum(line.count(s) for s in nonfinite)
            step = row.get("step", 0)
            if not (type(step) is int and _INT64_MIN <= step <= _INT64_MAX):
                step = _step_of(step, f"{path}:{line_number}")  # raises for a step that is not an int64 integer
            if simple:
                has_step = row.pop("step", None) is not None
                keys = tuple(row)
                group = pending.get((keys, has_step))
                if group is None:
                    group = pending[keys, has_step] = ([], [], [])
                group[0].append(parsed)
                group[1].append(tuple(row.values()))
                group[2].append(step)
                pending_rows += 1
                pending_values += len(keys)
            else:
                builder.put_row(parsed, *_flat_row(row, parsed, f"{path}:{line_number}"))
            parsed += 1
            if pending_rows >= _CHUNK_ROWS or pending_values >= _CHUNK_VALUES:
                if not sized:  # size the columns from the bytes read so far
                    done = max(file.buffer.tell(), 1)
                    builder.reserve(int(parsed * size / done * 1.02) + 64)
                    sized = True
                convert()
                pending_rows = pending_values = 0
        convert()
    bad_names = [name for name in builder.columns if _has_surrogates(name)]
    if bad_names:
        raise _not_utf8(path, None)
    return builder.history(path)


def _bad_line(
    path: str, line_number: int, line: str, error: ValueError | None, skip: bool, parsed: int, stacklevel: int = 4
) -> None:
    """Warns about a cut line; raises (or warns, with ``skip``) for any other bad line."""
    text = line.strip().strip("\x00")
    if parsed == 0 and ("\x00" in line or _has_surrogates(line)):  # binary data from the start
        raise _not_utf8(path, line_number)
    if not text or (text.startswith("{") and not text.endswith("}")):
        warnings.warn(
            f"{path}:{line_number}: skipped a cut line (the run stopped while writing it)",
            LogReadWarning,
            stacklevel=stacklevel,
        )
        return
    reason = error.msg if isinstance(error, json.JSONDecodeError) else "not a JSON object"
    if _has_surrogates(line):
        reason = "not UTF-8 text"
    if skip:
        warnings.warn(f"{path}:{line_number}: skipped a bad line ({reason})", LogReadWarning, stacklevel=stacklevel)
        return
    hint = " (skip such lines with skip_bad_lines=True, or --skip-bad-lines)" if parsed else ""
    raise ValueError(f"{path}:{line_number}: not a JSON object ({reason}){hint}.")


# --------------------------------------------------------------------------- TensorBoard


def _read_tensorboard(path: str) -> History:
    """Scalars (and scalar tensors) of one TensorBoard run, with the ``tensorboard``
    package's own reader; tags are metric names."""
    try:
        from tensorboard.backend.event_processing import event_accumulator as ea
        from tensorboard.util import tensor_util
    except ImportError as error:
        raise ImportError(
            f"{path}: reading a TensorBoard log needs the tensorboard package: pip install tensorboard "
            "(or pip install 'optax-gradhealth[examples]')."
        ) from error
    if os.path.isdir(path):
        files = [name for name in os.listdir(path) if "tfevents" in name]
        if not files:
            runs = []
            for root, folders, names in os.walk(path):
                depth = os.path.relpath(root, path).count(os.sep) + (root != path)
                if depth >= 2:
                    folders.clear()  # look two levels down at most
                if root != path and any("tfevents" in name for name in names):
                    runs.append(os.path.relpath(root, path))
            runs.sort()
            if runs:
                raise ValueError(
                    f"{path}: no event file here, but {len(runs)} run folder(s) below it "
                    f"({', '.join(runs[:5])}{', ...' if len(runs) > 5 else ''}): pass one of them."
                )
            raise ValueError(f"{path}: a folder without TensorBoard event files (*tfevents*).")
    guidance = {ea.SCALARS: 0, ea.TENSORS: 0, ea.IMAGES: 1, ea.AUDIO: 1, ea.HISTOGRAMS: 1, ea.COMPRESSED_HISTOGRAMS: 1}
    # purge_orphaned_data=False: keep what a resumed run overwrote, to find the restart.
    accumulator = ea.EventAccumulator(path, size_guidance=guidance, purge_orphaned_data=False)
    try:
        accumulator.Reload()
    except Exception as error:  # a corrupt file: the reader's own exception types vary
        raise ValueError(f"{path}: not a readable TensorBoard event file ({type(error).__name__}: {error}).") from None
    tags = accumulator.Tags()
    series: dict[str, tuple[list[Any], list[Any]]] = {}
    for tag in tags.get(ea.SCALARS, []):
        events = accumulator.Scalars(tag)
        series[tag] = (events, [e.value for e in events])
    for tag in tags.get(ea.TENSORS, []):
        if tag in series:
            continue
        events = accumulator.Tensors(tag)
        values = [tensor_util.make_ndarray(e.tensor_proto) for e in events]
        if values and all(v.ndim == 0 and v.dtype.kind in "biuf" for v in values):
            series[tag] = (events, values)
    if not any(events for events, _ in series.values()):
        return History(np.zeros(0, np.int64), {}, source=path)
    # The rows as they were written (as a JSON Lines log of the same writes holds them),
    # so that History finds the restarts, the side rows and what a restart supersedes
    # over all tags at once, as for the other sources.
    names = list(series)
    wall = np.concatenate([np.array([e.wall_time for e in series[n][0]], np.float64) for n in names])
    steps = np.concatenate([np.array([e.step for e in series[n][0]], np.int64) for n in names])
    values = np.concatenate([np.asarray(series[n][1], np.float64).reshape(-1) for n in names])
    tag = np.repeat(np.arange(len(names)), [len(series[n][0]) for n in names])
    # Write order: by wall time (the reader's order is the event files', sorted by name:
    # not the write order of two files opened within one second); one wall time keeps
    # the step order.
    order = np.lexsort((steps, wall))
    wall, steps, values, tag = wall[order], steps[order], values[order], tag[order]
    row = _tensorboard_rows(wall, steps, tag, len(names))
    table = np.full((int(row[-1]) + 1, len(names)), np.nan)
    table[row, tag] = values
    row_steps = np.zeros(table.shape[0], np.int64)
    row_steps[row] = steps
    nan_table = np.zeros(table.shape, bool)  # a NaN written as the value (not a row the tag lacks)
    nan_table[row, tag] = np.isnan(values)
    columns = {name: table[:, i] for i, name in enumerate(names)}
    nan_logged = {name: nan_table[:, i] for i, name in enumerate(names) if nan_table[:, i].any()}
    return History(row_steps, columns, source=path, nan_logged=nan_logged)


def _tensorboard_rows(wall: np.ndarray, steps: np.ndarray, tag: np.ndarray, tags: int) -> np.ndarray:
    """The row of each event (in write order): the events of one write (one wall time and
    step: ``gh.TensorBoardWriter.write`` puts a row's scalars in one event) are a row.
    Writes of one tag each at one step, one after the other (``add_scalar`` writes an
    event per tag), are one row too; a tag that repeats among them (a run resumed at the
    step it had logged) starts a new row, and History tells the two apart."""
    n = steps.size
    same_step = np.zeros(n, bool)
    same_step[1:] = steps[1:] == steps[:-1]
    new_write = ~same_step
    new_write[1:] |= wall[1:] != wall[:-1]
    write = np.cumsum(new_write) - 1
    single = (np.bincount(write) == 1)[write]  # the event is a write of one tag
    joins = new_write & same_step
    joins[1:] &= single[1:] & single[:-1]
    new_row = new_write & ~joins
    key = (np.cumsum(new_row) - 1) * tags + tag
    ordered = np.sort(key)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]] // tags  # rows where a tag repeats (rare)
    seen: set[int] = set()
    for i in np.flatnonzero(np.isin(key // tags, repeated)).tolist():
        if new_row[i] or tag[i] in seen:
            new_row[i], seen = True, set()
        seen.add(int(tag[i]))
    return np.cumsum(new_row) - 1


# --------------------------------------------------------------------------- CSV (W&B)

_STEP_COLUMNS = ("_step", "step", "Step", "global_step", "trainer/global_step")


def _read_csv(path: str) -> History:
    """A Weights & Biases history export: one row per step, the step in ``_step``
    (``run.history()``) or ``Step`` (the UI export); W&B's own ``_...`` columns and the
    UI's ``__MIN`` / ``__MAX`` columns are left out; the ``<run> - `` prefix of the UI's
    columns (the longest prefix ending in `` - `` that every metric column shares, so a
    run name may hold `` - `` too) is removed. An empty cell is a metric the row did not
    log; a ``NaN`` cell is a logged NaN."""
    try:
        # utf-8-sig: a file re-saved by a spreadsheet starts with a byte-order mark, which
        # would otherwise be part of the first column's name (and hide the step column).
        with open(path, encoding="utf-8-sig", newline="") as file:
            table = list(csv.reader(file))
    except UnicodeDecodeError:
        raise _not_utf8(path, None) from None
    if not table or not table[0]:
        return History(np.zeros(0, np.int64), {}, source=path)
    header, body = table[0], [r for r in table[1:] if any(cell.strip() for cell in r)]
    step_at = next((header.index(name) for name in _STEP_COLUMNS if name in header), None)
    metric_at = [
        i
        for i, name in enumerate(header)
        if i != step_at and name and not name.startswith("_") and not name.endswith(("__MIN", "__MAX"))
    ]
    names = [header[i] for i in metric_at]
    if names and all(" - " in name for name in names):
        # The UI names a column "<run> - <metric>", and a run's name may hold " - " too:
        # the prefix removed is the longest one ending in " - " that every column shares.
        first, last = min(names), max(names)  # the prefix all share is the one these two share
        size = next((i for i, (a, b) in enumerate(zip(first, last)) if a != b), min(len(first), len(last)))
        cut = first[:size].rfind(" - ")
        if cut >= 0:
            names = [name[cut + 3 :] for name in names]
    for number, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}:{number}: {len(row)} fields, the header has {len(header)}.")

    def number(cell: str) -> float:
        cell = cell.strip()
        if not cell:
            return math.nan
        try:
            return float(cell)
        except ValueError:
            return _NONFINITE.get(cell, math.nan)

    if step_at is None:
        steps = np.arange(len(body))
    else:
        raw = np.array([number(r[step_at]) for r in body])
        if not np.isfinite(raw).all():
            bad = int(np.flatnonzero(~np.isfinite(raw))[0]) + 2
            raise ValueError(f"{path}:{bad}: the step column {header[step_at]!r} is empty or not a number.")
        # Exact integers (a 1.5 is an error naming its line, as in a JSONL log, not 1).
        steps = np.array([_step_of(r[step_at], f"{path}:{i}") for i, r in enumerate(body, start=2)], np.int64)
    columns, nan_logged = {}, {}
    for name, i in zip(names, metric_at):
        column = columns[name] = np.array([number(r[i]) for r in body])
        if np.isnan(column).any():  # a NaN cell was logged as NaN; an empty cell was not logged
            nan_logged[name] = np.array([r[i].strip().lower() == "nan" for r in body])
    return History(steps, columns, source=path, nan_logged=nan_logged)
