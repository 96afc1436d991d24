"""A Flax NNX character-level transformer on the standard library's sources, guarded by
``gh.guard``, with faults injected on request.

    python examples/char_transformer.py                         # a clean run
    python examples/char_transformer.py --inject demo           # the demo's faults
    python examples/char_transformer.py --inject nan@50,corrupt@120,lr@200:3 --steps 300

Fault kinds (``kind@step[:length]``): ``nan`` (a NaN in the batch's loss weights),
``corrupt`` (a zero-filled batch with inflated loss weights), ``lr`` (learning rate x100).
Writes ``run.jsonl``, ``report.png`` and the findings into ``--out``. The model, data and
loop are ``optax_gradhealth.demo`` (one implementation, two front ends).
"""

from __future__ import annotations

import argparse
import sys

from optax_gradhealth import demo


def main(argv: list[str] | None = None) -> dict:
    defaults = demo.TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    demo.add_arguments(parser, defaults)
    parser.add_argument(
        "--inject",
        default="",
        metavar="FAULTS",
        help=f"comma-separated kind@step[:length] faults, or 'demo' for {demo.DEMO_FAULTS!r} (default: none)",
    )
    parser.add_argument(
        "--log-every",
        type=demo._int_at_least(1),
        default=defaults.log_every,
        help="fetch and write the log every N steps (>= 1)",
    )
    parser.add_argument("--no-report", action="store_true", help="write the log only (no picture)")
    args = parser.parse_args(argv)
    faults = demo.DEMO_FAULTS if args.inject == "demo" else args.inject
    try:
        demo.parse_faults(faults)  # fail fast on a typo: a usage error, not a traceback
    except ValueError as error:
        parser.error(f"argument --inject: {error}")
    config = demo.TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        out=args.out,
        faults=faults,
        log_every=args.log_every,
        progress=not args.no_progress,
        report=not args.no_report,
    )
    result = demo.train(config)
    demo.print_summary(result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
