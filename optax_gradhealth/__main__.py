"""Command line: ``python -m optax_gradhealth report RUN.jsonl -o report.png`` and
``python -m optax_gradhealth diagnose RUN.jsonl``; ``python -m optax_gradhealth --version``."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys

from optax_gradhealth import __version__

# The module (``optax_gradhealth.diagnose`` the attribute is the function gh.diagnose).
_diagnose = importlib.import_module("optax_gradhealth.diagnose")


def _thresholds(pairs: list[str]) -> _diagnose.Thresholds:
    fields = {f.name: f for f in dataclasses.fields(_diagnose.Thresholds)}
    values = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in fields or not value:
            raise SystemExit(f"--threshold expects NAME=VALUE with NAME one of {', '.join(fields)}; got {pair!r}.")
        values[name] = int(value) if fields[name].type in ("int", int) else float(value)
    return _diagnose.Thresholds(**values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optax_gradhealth", description="Gradient-health reports.")
    parser.add_argument("--version", action="version", version=f"optax-gradhealth {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    report = sub.add_parser("report", help="plot a run's log and write the diagnosis beside the picture")
    report.add_argument("log", help="the run's JSON Lines metrics log")
    report.add_argument("-o", "--output", default="report.png", help="image file (default: report.png)")
    report.add_argument("--title", default=None)
    diag = sub.add_parser("diagnose", help="print the diagnosis of a run's log")
    diag.add_argument("log", help="the run's JSON Lines metrics log")
    for p in (report, diag):
        p.add_argument(
            "--threshold",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="override a gh.Thresholds field, e.g. --threshold spike_score=3 (repeatable)",
        )
    args = parser.parse_args(argv)
    thresholds = _thresholds(args.threshold)
    if args.command == "report":
        _report = importlib.import_module("optax_gradhealth.report")

        findings = _report.write_report(args.log, args.output, thresholds=thresholds, title=args.title)
        print(_diagnose.format_findings(findings))
        text_path, json_path = _report.findings_paths(args.output)
        print(f"\nwrote {args.output}, {text_path}, {json_path}")
    else:
        print(_diagnose.format_findings(_diagnose.diagnose(args.log, thresholds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
