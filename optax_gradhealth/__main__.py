"""Command line: ``python -m optax_gradhealth report LOG -o report.png`` and
``python -m optax_gradhealth diagnose LOG``; ``python -m optax_gradhealth --version``.

``LOG`` is a JSON Lines metrics log, a TensorBoard log directory or a W&B history CSV
(see :func:`optax_gradhealth.history.load_history`). An unreadable input, a log with no
gradhealth metric (nothing to judge) or a bad argument is one line on stderr and exit
status 2, never a traceback; a skipped cut line is one warning line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import os
import sys
import warnings

from optax_gradhealth import __version__
from optax_gradhealth.diagnosis import Thresholds, diagnose, format_findings
from optax_gradhealth.diagnosis.single_node import check_no_metrics
from optax_gradhealth.history import History, LogReadWarning, load_history

PROG = "python -m optax_gradhealth"

_EPILOG = f"""examples:
  {PROG} diagnose run.jsonl
  {PROG} diagnose run.jsonl --threshold spike_score=3 --threshold warmup_rows=50
  {PROG} diagnose runs/tensorboard/run1/        (a TensorBoard log directory)
  {PROG} report run.jsonl -o report.png         (also writes report.findings.txt/.json)
  {PROG} report wandb_history.csv -o report.png --title "run 42"
  {PROG} diagnose run.jsonl --prefix eval/       (metrics logged as eval/grad/norm, ...)

LOG is a JSON Lines metrics log (gh.JsonlWriter), a TensorBoard log directory (needs the
tensorboard package) or a Weights & Biases history export (.csv). A cut last line (a run
stopped mid-write) is skipped with a warning; a resumed run's rows supersede the abandoned
run's (reported as a restart); an eval row joins the row of its step.

exit status: 0 done; 2 bad arguments, an unreadable log or a log with no gradhealth
metric (names like grad/norm, xdev/agreement: nothing to judge) (one line on stderr)."""


class UsageError(SystemExit):
    """A bad argument or an unreadable input: exit status 2, the message in ``args[0]``."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise UsageError(f"{message} (see {self.prog} --help)")


def _thresholds(pairs: list[str]) -> Thresholds:
    fields = {f.name: f for f in dataclasses.fields(Thresholds)}
    values = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        name = {"warmup_steps": "warmup_rows"}.get(name, name)  # the name of 0.1.0
        if name not in fields or not value:
            raise UsageError(f"--threshold expects NAME=VALUE with NAME one of {', '.join(fields)}; got {pair!r}.")
        annotation = str(fields[name].type).replace(" ", "")  # a string: annotations are postponed
        optional = annotation.endswith("|None")
        kind = int if annotation.removesuffix("|None") in ("int", "<class'int'>") else float
        if optional and value.lower() == "none":
            values[name] = None
            continue
        try:
            values[name] = kind(value)
        except ValueError:
            also = " or None" if optional else ""
            raise UsageError(
                f"--threshold {name} expects {'an integer' if kind is int else 'a number'}{also}, got {value!r}."
            ) from None
    try:
        return Thresholds(**values)
    except ValueError as error:  # a value out of its field's range
        raise UsageError(f"--threshold: {error}") from None


def _load(path: str, skip_bad_lines: bool, prefix: str | None = None) -> History:
    """The log, with its warnings as one stderr line each and its errors as UsageError."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LogReadWarning)
        try:
            history = load_history(path, skip_bad_lines=skip_bad_lines, prefix=prefix)
        except (OSError, ValueError, ImportError) as error:
            raise UsageError(str(error) or type(error).__name__) from None
    for warning in caught:
        if issubclass(warning.category, LogReadWarning):
            print(f"{PROG}: warning: {warning.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return history


def _run(argv: list[str] | None) -> int:
    parser = _Parser(
        prog=PROG,
        description="Gradient-health reports of a training run's logged metrics.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"optax-gradhealth {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    kind = argparse.RawDescriptionHelpFormatter
    report = sub.add_parser(
        "report",
        help="plot a run's log and write the diagnosis beside the picture",
        epilog=_EPILOG,
        formatter_class=kind,
    )
    report.add_argument("log", help="the run's metrics: .jsonl log, TensorBoard log directory or W&B .csv")
    report.add_argument("-o", "--output", default="report.png", help="image file (default: report.png)")
    report.add_argument("--title", default=None)
    diag = sub.add_parser("diagnose", help="print the diagnosis of a run's log", epilog=_EPILOG, formatter_class=kind)
    diag.add_argument("log", help="the run's metrics: .jsonl log, TensorBoard log directory or W&B .csv")
    for p in (report, diag):
        p.add_argument(
            "--threshold",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="override a gh.Thresholds field, e.g. --threshold spike_score=3 (repeatable)",
        )
        p.add_argument(
            "--skip-bad-lines",
            action="store_true",
            help="skip (with a warning) lines of a .jsonl log that are not JSON objects instead of failing",
        )
        p.add_argument(
            "--prefix",
            default=None,
            metavar="PREFIX",
            help="read the metrics logged behind PREFIX (e.g. --prefix eval/ for gh.MetricLogger(prefix='eval/')); "
            "'' keeps the names as logged; default: the prefix that holds the most rows of gradhealth metrics",
        )
    args = parser.parse_args(argv)
    thresholds = _thresholds(args.threshold)
    if args.command == "report":
        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError("report needs matplotlib: pip install matplotlib (or 'optax-gradhealth[examples]').")
        _report = importlib.import_module("optax_gradhealth.report")
        try:
            output = _report.image_path(args.output)  # checked before the log is read and drawn
        except ValueError as error:
            raise UsageError(str(error)) from None
    history = _load(args.log, args.skip_bad_lines, args.prefix)
    if not len(history):
        raise UsageError(f"{args.log}: no logged rows.")
    for finding in check_no_metrics(history, thresholds):  # before drawing: an empty report is no all-clear
        raise UsageError(f"{args.log}: nothing was judged: {finding.summary}.")
    if args.command == "report":
        try:
            findings = _report.write_report(history, output, thresholds=thresholds, title=args.title)
        except OSError as error:  # the output cannot be written
            raise UsageError(f"{output}: {error.strerror or error}") from None
        print(format_findings(findings))
        text_path, json_path = _report.findings_paths(output)
        print(f"\nwrote {output}, {text_path}, {json_path}")
    else:
        print(format_findings(diagnose(history, thresholds)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status.

    A bad argument or an unreadable log prints one line on stderr and raises
    :class:`UsageError` (a ``SystemExit`` with code 2).

    Example:
      >>> from optax_gradhealth.__main__ import main
      >>> try:
      ...     main(["diagnose", "no/such/run.jsonl"])
      ... except SystemExit as error:
      ...     print(error.code, "|", error)
      2 | no/such/run.jsonl: no such file or directory.
    """
    try:
        status = _run(argv)
        sys.stdout.flush()  # inside the try: a pipe closed early fails here, not at exit
        return status
    except UsageError as error:
        print(f"{PROG}: error: {error.args[0]}", file=sys.stderr)
        raise
    except BrokenPipeError:
        # The reader went away (``... | head``): nothing left to say. Point stdout at
        # devnull so that the interpreter's own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
