"""Metric writers (JSON Lines, TensorBoard, Weights & Biases) and a logging helper.

Host side only: nothing here is imported by the jitted path.

* :func:`flatten` turns a metrics dict (device or host arrays, vectors, matrices,
  nested per-layer dicts) into ``{name: float}`` scalars with stable names:
  ``xdev/device_norms/3``, ``xdev/pairwise_cosine/0/5``, ``grad/leaf_norm/dense/kernel``.
* :class:`JsonlWriter` (default, no extra dependency), :class:`TensorBoardWriter`
  (``tensorboardX``) and :class:`WandbWriter` (``wandb``, when installed) write
  ``{name: float}`` rows.
* :class:`MetricLogger` calls them every ``log_every`` steps and only then fetches
  the device arrays to the host (one ``jax.device_get`` for everything), so the
  training loop never waits on the device in between.

JSON Lines format: one object per line, ``{"step": int, name: value, ...}``. Floats
that are not finite are written as the strings ``"NaN"``, ``"Infinity"`` and
``"-Infinity"`` (strict JSON has no literal for them) and read back as floats by
:func:`read_jsonl`.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
import uuid
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import numpy as np

__all__ = [
    "JsonlWriter",
    "MetricLogger",
    "TensorBoardWriter",
    "WandbWriter",
    "Writer",
    "flatten",
    "read_jsonl",
]

_NONFINITE_TO_STR = {math.inf: "Infinity", -math.inf: "-Infinity"}
_STR_TO_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class Writer(Protocol):
    """Anything with ``write(step, scalars)`` and ``close()``."""

    def write(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def _key_name(key: Any) -> str:
    """A readable name for a dict key or pytree path entry."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _check_metrics(what: str, metrics: Any) -> None:
    """A clear error for a ``metrics`` that is not a dict (an optimizer state passed
    where ``gh.metrics(opt_state)`` was meant)."""
    if isinstance(metrics, Mapping):
        return
    hint = (
        " (an optimizer state? pass gh.metrics(opt_state))"
        if hasattr(metrics, "_fields") or isinstance(metrics, (tuple, list))
        else ""
    )
    raise TypeError(f"{what}: `metrics` must be a dict of name -> value, got {type(metrics).__name__}{hint}.")


def flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Flattens a metrics dict to ``{name: float}`` scalars with stable names.

    Scalars keep their name; an array of shape ``[K]`` becomes ``name/0`` ...
    ``name/K-1``, a matrix ``name/i/j`` (row, column), and so on for higher ranks;
    nested dicts (per-layer norms) join their keys with ``/``. Booleans and integers
    become floats (``1.0`` / ``0.0``). Device arrays are read with ``np.asarray``:
    fetch them first (``jax.device_get``) to fetch everything in one transfer.

    Args:
      metrics: ``{name: value}``, values scalars, arrays or nested dicts.
      prefix: prepended to every name (e.g. ``'train/'``).

    Returns:
      ``dict[str, float]``, sorted by name.

    Example:
      >>> import numpy as np
      >>> from optax_gradhealth.writers import flatten
      >>> flatten({'grad/norm': np.float32(2.0), 'xdev/device_norms': np.array([1.0, 3.0]),
      ...          'xdev/pairwise_cosine': np.eye(2), 'grad/skipped': np.bool_(True)})
      ... # doctest: +NORMALIZE_WHITESPACE
      {'grad/norm': 2.0, 'grad/skipped': 1.0, 'xdev/device_norms/0': 1.0, 'xdev/device_norms/1': 3.0,
       'xdev/pairwise_cosine/0/0': 1.0, 'xdev/pairwise_cosine/0/1': 0.0,
       'xdev/pairwise_cosine/1/0': 0.0, 'xdev/pairwise_cosine/1/1': 1.0}
    """
    _check_metrics("gh.flatten", metrics)
    out: dict[str, float] = {}

    def visit(name: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, sub in value.items():
                visit(f"{name}/{_key_name(key)}" if name else _key_name(key), sub)
            return
        if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
            value = np.asarray(value)
        array = np.asarray(value)
        if array.ndim == 0:
            out[name] = float(array)
            return
        for index in np.ndindex(array.shape):
            out[name + "".join(f"/{i}" for i in index)] = float(array[index])

    for key, value in metrics.items():
        visit(prefix + _key_name(key), value)
    return dict(sorted(out.items()))


def _json_value(value: float) -> Any:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return _NONFINITE_TO_STR[value]
    return value


class JsonlWriter:
    """Appends one JSON object per logged step to a ``.jsonl`` file.

    Each row is written with one ``write`` and flushed to the operating system at once
    (line buffering), so a crash of the process loses no row already written; a crash
    during a write leaves at most that one row cut (readers skip it with a warning).
    Appending to a file whose last line was cut starts a new line first, so a resumed
    run's rows stay readable.

    Args:
      path: the file; its folder is created. An existing file is appended to unless
        ``overwrite=True``.
      overwrite: start a fresh file (True or False).

    Example:
      >>> import os, tempfile
      >>> from optax_gradhealth.writers import JsonlWriter, read_jsonl
      >>> path = os.path.join(tempfile.mkdtemp(), 'run.jsonl')
      >>> with JsonlWriter(path) as writer:
      ...     writer.write(0, {'grad/norm': 1.5, 'grad/finite': 1.0})
      ...     writer.write(1, {'grad/norm': float('nan'), 'grad/finite': 0.0})
      >>> rows = read_jsonl(path)
      >>> rows[1]['step'], rows[1]['grad/norm']
      (1, nan)
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False):
        from optax_gradhealth import _validation as check

        overwrite = check.boolean("overwrite", overwrite)  # before opening: a truthy string must not truncate
        if not isinstance(path, (str, bytes, os.PathLike)):
            raise TypeError(
                f"`path` must be a file path (a str or os.PathLike), got {path!r} (type {type(path).__name__})."
            )
        self.path = os.fspath(path)
        folder = os.path.dirname(self.path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        cut = not overwrite and _ends_without_newline(self.path)
        self._file = open(self.path, "w" if overwrite else "a", encoding="utf-8", buffering=1)
        if cut:
            self._file.write("\n")

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Appends the row ``{"step": step, **scalars}`` (non-finite values as strings).

        Raises:
          ValueError: a metric is named ``'step'`` (it would replace the row's step).
        """
        if "step" in scalars:
            raise ValueError(
                f"JsonlWriter: a metric named 'step' (value {scalars['step']!r}) would replace the step "
                f"{step!r} of its row in {self.path}; log it under another name (e.g. a prefix: "
                "MetricLogger(prefix=...))."
            )
        row = {"step": int(step)}
        row.update({name: _json_value(float(value)) for name, value in scalars.items()})
        self._file.write(json.dumps(row, allow_nan=False) + "\n")

    def flush(self) -> None:
        """Flushes to the operating system (every row already is)."""
        self._file.flush()

    def close(self) -> None:
        """Closes the file."""
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ends_without_newline(path: str) -> bool:
    """Whether ``path`` is a non-empty file whose last byte is not a newline (a cut line)."""
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            if file.tell() == 0:
                return False
            file.seek(-1, os.SEEK_END)
            return file.read(1) != b"\n"
    except OSError:
        return False


def read_jsonl(path: str | os.PathLike, *, skip_bad_lines: bool = False) -> list[dict[str, float]]:
    """Reads a :class:`JsonlWriter` file back: one dict per line, non-finite strings
    turned back into floats. Blank lines are ignored.

    A cut line (one that stops before its closing brace: the run was killed while
    writing it) is skipped with a :class:`~optax_gradhealth.history.LogReadWarning`
    naming ``file:line``. Any other line that is not a JSON object raises a
    ``ValueError`` naming ``file:line``, or is skipped with a warning when
    ``skip_bad_lines=True``; a file that is not UTF-8 text raises a ``ValueError``.
    For large logs, :func:`optax_gradhealth.history.load_history` reads columns
    directly (much less memory).

    Example:
      >>> import os, tempfile
      >>> from optax_gradhealth.writers import read_jsonl
      >>> path = os.path.join(tempfile.mkdtemp(), 'run.jsonl')
      >>> with open(path, 'w') as f:
      ...     _ = f.write('{"step": 0, "grad/norm": "Infinity"}\\n')
      >>> read_jsonl(path)
      [{'step': 0, 'grad/norm': inf}]
    """
    from optax_gradhealth import _validation as check
    from optax_gradhealth.history import _bad_line, _has_surrogates, _not_utf8

    skip_bad_lines = check.boolean("skip_bad_lines", skip_bad_lines)
    path = os.fspath(path)
    rows = []
    with open(path, encoding="utf-8", errors="surrogateescape") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                _bad_line(path, line_number, line, error, skip_bad_lines, len(rows), stacklevel=3)
                continue
            if not isinstance(row, dict):
                _bad_line(path, line_number, line, None, skip_bad_lines, len(rows), stacklevel=3)
                continue
            if _has_surrogates(line):
                raise _not_utf8(path, line_number)
            rows.append({k: _STR_TO_NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in row.items()})
    return rows


class TensorBoardWriter:
    """Writes scalars to TensorBoard event files with ``tensorboardX``.

    The tags are the metric names exactly as given (``grad/norm#2``,
    ``grad/leaf_norm/mlp/~/linear_0/w``), so :func:`optax_gradhealth.load_history`
    reads the same names back as from a JSON Lines log. Each step is one event holding
    all its scalars. TensorBoard stores float32: a finite value beyond float32's range
    reads back as an infinity; NaN and infinities are kept.

    Args:
      logdir: the run's folder.
      **kwargs: passed to ``tensorboardX.FileWriter`` (``max_queue``, ``flush_secs``,
        ``filename_suffix``). ``filename_suffix`` defaults to one of this writer's own
        (``.<pid>.<random hex>``), so that two writers opened on one logdir within the
        same second (the file's name has the time in seconds) write two files.

    Example:
      >>> import tempfile
      >>> import optax_gradhealth as gh
      >>> logdir = tempfile.mkdtemp()
      >>> writer = gh.TensorBoardWriter(logdir)
      >>> for step in range(3):
      ...     writer.write(step, {'grad/norm': 1.0 + step, 'grad/norm#2': 0.5})
      >>> writer.close()
      >>> history = gh.load_history(logdir)  # the same names back
      >>> history['grad/norm'].tolist(), history['grad/norm#2'].tolist()
      ([1.0, 2.0, 3.0], [0.5, 0.5, 0.5])
    """

    def __init__(self, logdir: str | os.PathLike, **kwargs: Any):
        try:
            from tensorboardX import FileWriter
            from tensorboardX.proto.summary_pb2 import Summary
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError(
                "TensorBoardWriter needs tensorboardX: pip install tensorboardX "
                "(or pip install 'optax-gradhealth[examples]')."
            ) from error
        # A file name of its own: tensorboardX names the file by the second and the host,
        # and a second writer on the same logdir within that second would truncate it.
        kwargs.setdefault("filename_suffix", f".{os.getpid()}.{uuid.uuid4().hex[:8]}")
        self._writer = FileWriter(os.fspath(logdir), **kwargs)
        self._summary = Summary

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Writes one event at ``step`` with a ``simple_value`` per name, tags unchanged."""
        # Not SummaryWriter.add_scalar: it rewrites tags (every character outside
        # [-/\w.], e.g. '#' and '~', becomes '_', so the second copy of a name, '#2',
        # is logged as '_2') and prints a line on stdout for each non-finite value. The
        # Summary proto is what add_scalar builds, with the tag left as given, written by
        # tensorboardX's public FileWriter.
        values = [(name, float(value)) for name, value in scalars.items()]
        if values:
            summary = self._summary(value=[self._summary.Value(tag=n, simple_value=v) for n, v in values])
            self._writer.add_summary(summary, global_step=int(step))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbWriter:
    """Logs scalars to Weights & Biases (``wandb``, when installed).

    Args:
      run: an existing ``wandb`` run (anything with a ``log(data, step=...)`` method);
        when None, ``wandb.init(**init_kwargs)`` starts one (and :meth:`close` finishes
        it).
      **init_kwargs: passed to ``wandb.init`` when ``run`` is None; an error beside a
        ``run``.

    Example:
      >>> import optax_gradhealth as gh
      >>> class Run:  # stands in for wandb.init(project=...)
      ...     def log(self, data, step):
      ...         print(step, data)
      >>> writer = gh.WandbWriter(Run())
      >>> writer.write(7, {'grad/norm': 1.5})
      7 {'grad/norm': 1.5}
    """

    def __init__(self, run: Any = None, **init_kwargs: Any):
        if run is not None and not callable(getattr(run, "log", None)):
            raise TypeError(
                f"`run` must be None or a wandb run (an object with a log(data, step=...) method, e.g. "
                f"wandb.init(...)), got {run!r} (type {type(run).__name__})."
            )
        if run is not None and init_kwargs:
            raise TypeError(
                f"gh.WandbWriter: give `run` or `**init_kwargs` (passed to wandb.init to start a run), not both; "
                f"got a run and init_kwargs {sorted(init_kwargs)}."
            )
        if run is None:
            try:
                import wandb
            except ImportError as error:
                raise ImportError("WandbWriter needs wandb: pip install wandb.") from error
            run = wandb.init(**init_kwargs)
            self._owns_run = True
        else:
            self._owns_run = False
        self._run = run

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        self._run.log(dict(scalars), step=int(step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self._owns_run:
            self._run.finish()


def _on_device(value: Any) -> bool:
    """Whether ``value`` is a jax array (reading it may wait for the device), without
    importing jax where no one has."""
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(value, jax.Array)


class MetricLogger:
    """Logs metrics every ``log_every`` steps, fetching device arrays only then.

    Call :meth:`log` every step with the step number and a metrics dict (e.g.
    ``gh.metrics(opt_state)`` plus your loss). On steps that are not logged it does
    nothing with the values (no host sync). On a logged step it fetches everything in
    one ``jax.device_get``, :func:`flatten`\\ s it and hands it to every writer.

    With ``all_steps=True`` it instead keeps every step's dict (references to device
    arrays, no sync) and fetches and writes the whole batch every ``log_every``
    steps: the log has every step at the cost of one transfer per ``log_every``
    steps. The kept arrays must stay alive: return the metrics from your jitted step
    (fresh output buffers) rather than passing ``gh.metrics(opt_state)`` of a state
    you later donate to ``jit`` (donation deletes those buffers).

    What a crash loses: rows are handed to the writers on the step they are logged, and
    :class:`JsonlWriter` flushes each row as it writes it. So a crash loses no row that
    was written, except at most the one being written at that moment (left as a cut
    line, which readers skip with a warning); with ``all_steps=True`` it also loses the
    steps kept but not yet fetched, at most ``log_every - 1``.

    Args:
      writers: one writer (an object with ``write(step, scalars)`` and ``close()``) or an
        iterable of them (default: none; use :class:`JsonlWriter`). A path is not a
        writer: pass ``JsonlWriter(path)``.
      log_every: log every this many steps (>= 1); step 0 is logged.
      all_steps: keep and write every step, flushed every ``log_every`` steps (True or
        False).
      prefix: a str prepended to every name.
      replicated: the values carry a leading device axis (outputs of ``jax.pmap``, or
        of a ``shard_map`` with ``out_specs=P('data')``, where every gradhealth metric is
        identical on every device): log the first copy this process holds (True or
        False). Only that copy's shard is fetched, so a multi-host array (spanning
        devices of other processes) is logged too. A scalar (a Python number or a 0-d
        array: a host value such as the learning rate, logged beside them) has no device
        axis and is logged as it is.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_gradhealth.writers import MetricLogger
      >>> class Print:
      ...     def write(self, step, scalars): print(step, scalars)
      ...     def close(self): pass
      >>> logger = MetricLogger(Print(), log_every=2)
      >>> for step in range(3):
      ...     logger.log(step, {'loss': jnp.float32(step)})
      0 {'loss': 0.0}
      2 {'loss': 2.0}
    """

    def __init__(
        self,
        writers: Writer | Iterable[Writer] | None = None,
        *,
        log_every: int = 10,
        all_steps: bool = False,
        prefix: str = "",
        replicated: bool = False,
    ):
        if isinstance(log_every, bool) or not isinstance(log_every, numbers.Integral) or log_every < 1:
            raise ValueError(f"`log_every` must be an integer >= 1, got {log_every!r}.")
        log_every = int(log_every)  # a numpy integer (e.g. from argparse or a config) becomes a plain int
        from optax_gradhealth import _validation as check

        all_steps = check.boolean("all_steps", all_steps)
        replicated = check.boolean("replicated", replicated)
        if not isinstance(prefix, str):
            raise TypeError(f"`prefix` must be a str, got {prefix!r} (type {type(prefix).__name__}).")
        if writers is None:
            writers = []
        elif hasattr(writers, "write"):
            writers = [writers]
        elif (
            isinstance(writers, (str, bytes, os.PathLike))
            or check.is_array_like(writers)  # iterable, but of numbers (a 0-d one fails inside iter)
            or not isinstance(writers, Iterable)
        ):
            hint = f" (for a JSON Lines file: gh.JsonlWriter({writers!r}))" if isinstance(writers, str) else ""
            raise TypeError(
                "`writers` must be a writer (an object with write(step, scalars) and close(), e.g. "
                f"gh.JsonlWriter(path)), an iterable of writers or None, got {writers!r} "
                f"(type {type(writers).__name__}){hint}."
            )
        writers = list(writers)
        for i, writer in enumerate(writers):
            if not callable(getattr(writer, "write", None)) or not callable(getattr(writer, "close", None)):
                raise TypeError(
                    f"`writers[{i}]` must be a writer (an object with write(step, scalars) and close(), e.g. "
                    f"gh.JsonlWriter(path)), got {writer!r} (type {type(writer).__name__})."
                )
        self.writers = writers
        self.log_every = log_every
        self.all_steps = all_steps
        self.prefix = prefix
        self.replicated = replicated
        # (step, metrics, how many flushes its fetch failed)
        self._pending: list[tuple[int, Mapping[str, Any], int]] = []
        self._warned_device_step = False

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Records ``metrics`` for ``step``; fetches and writes on logged steps.

        ``step`` is a host integer (the training loop's counter). A device array (a
        ``TrainState``'s ``step``) works, but reading its value waits for the step that
        computes it on every call, a host sync; a :class:`UserWarning` says so, once per
        logger.
        """
        if not self._warned_device_step and not isinstance(step, numbers.Integral) and _on_device(step):
            self._warned_device_step = True
            warnings.warn(
                f"MetricLogger.log: `step` is a device array ({type(step).__name__}); reading its value waits for "
                "the step that computes it on every call (a host sync that stalls the pipeline). Pass the "
                "training loop's Python int counter instead.",
                UserWarning,
                stacklevel=2,
            )
        _check_metrics("MetricLogger.log", metrics)
        step = int(step)
        if self.all_steps or step % self.log_every == 0:
            # Appended: rows a failed fetch left pending are written with this one.
            self._pending.append((step, metrics, 0))
            if step % self.log_every == 0:
                self.flush()

    def flush(self) -> None:
        """Fetches and writes whatever is pending, in step order; then raises the first
        error met, if any.

        A row whose fetch fails stays pending with the rows after it (rows are written in
        step order): the next flush (the next logged step, or :meth:`close`) writes them,
        so a passing failure loses no row. The row is dropped, and the rows after it are
        written, when its fetch fails again while other rows' fetches succeed (a buffer
        of its own is gone, e.g. donated to ``jit``), on its third failed flush, or when
        :meth:`close` cannot fetch it. A row whose values :func:`flatten` rejects is
        dropped at once. Either way the error is raised, with a note naming the steps.
        """
        self._flush(final=False)

    def _flush(self, *, final: bool) -> None:
        if not self._pending:
            return
        pending = self._pending  # replaced once the rows are sorted out (an interrupt keeps them)
        try:  # one transfer for the whole batch
            fetched: list[Any] = self._fetch([metrics for _, metrics, _ in pending])
            failures: list[BaseException | None] = [None] * len(pending)
        except Exception:  # find the rows that fail, one by one
            fetched, failures = [], []
            for _, metrics, _ in pending:
                try:
                    fetched.append(self._fetch([metrics])[0])
                    failures.append(None)
                except Exception as error:
                    fetched.append(None)
                    failures.append(error)
        any_fetched = any(error is None for error in failures)
        rows, errors, dropped, held = [], [], [], []
        for (step, metrics, tries), values, error in zip(pending, fetched, failures):
            if error is not None:
                errors.append(error)
                if final or tries + 1 >= _FETCH_TRIES or (tries and any_fetched):
                    dropped.append(step)
                else:  # kept, with the rows after it, for the next flush
                    held.append((step, metrics, tries + 1))
                continue
            if held:
                held.append((step, metrics, tries))
                continue
            try:
                rows.append((step, flatten(values, prefix=self.prefix)))
            except Exception as bad:  # a value that is not a number: the row can never be written
                errors.append(bad)
                dropped.append(step)
        self._pending = held
        for step, scalars in rows:
            for writer in self.writers:
                writer.write(step, scalars)
        for writer in self.writers:
            if hasattr(writer, "flush"):
                writer.flush()
        if errors:
            note = f"gh.MetricLogger: {len(rows)} row(s) written"
            if dropped:
                note += f"; dropped (not written) the row(s) of step(s) {dropped}"
            if self._pending:
                note += f"; kept {len(self._pending)} row(s) from step {self._pending[0][0]} for the next flush"
            errors[0].add_note(note + ".")
            raise errors[0]

    def _fetch(self, sources: list[Any]) -> list[Any]:
        """``sources`` fetched to the host in one ``jax.device_get``."""
        import jax  # host side, but jax is needed to fetch device arrays in one go

        if self.replicated:
            # Fetch one copy's shard, not all K copies (on a multi-host run the whole
            # array spans devices this process cannot read).
            sources = jax.tree.map(_one_copy, sources)
        fetched = jax.device_get(sources)
        if self.replicated:
            # A 0-d value (a host number beside the pmap outputs) has no device axis.
            fetched = jax.tree.map(lambda x: x[0] if np.ndim(x) >= 1 else x, fetched)
        return fetched

    def close(self) -> None:
        """Writes what is pending (dropping the rows whose fetch fails: no later flush
        would write them), closes the writers, then raises the first error met."""
        try:
            self._flush(final=True)
        finally:
            self._pending = []
            for writer in self.writers:
                writer.close()

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# A row whose fetch keeps failing is dropped on this failed flush (see MetricLogger.flush).
_FETCH_TRIES = 3


def _one_copy(value: Any) -> Any:
    """What to fetch of a replicated value (a leading device axis): the data of one shard
    this process holds that has whole copies (its slices of the other axes are whole),
    or the value itself (a host value, a 0-d array, no such shard)."""
    shards = getattr(value, "addressable_shards", None)
    if not shards or np.ndim(value) == 0:
        return value
    for shard in shards:
        whole = all(
            (index.start in (None, 0)) and (index.stop in (None, size)) and (index.step in (None, 1))
            for index, size in zip(shard.index[1:], value.shape[1:])
        )
        if whole and shard.data.shape[0] >= 1:
            return shard.data
    return value
