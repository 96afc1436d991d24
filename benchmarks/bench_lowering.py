"""Benchmark: what each of the guard's fusion choices (``_lowering``) buys on this backend.

``optax_gradhealth._lowering`` holds every place where the jitted core steers XLA's
fusion (an ``optimization_barrier``, a data dependency). Each is there because of a
measurement on one backend; this script repeats the measurement on the backend at hand.
It compiles the guard (``bench_guard.py``'s ``guard (all on)``, or the variant named by
``--guard``) as it is, and once more with each choice turned into the identity, and times them round-robin
on the same inputs, buffers donated, next to bare ``optax.adamw``. A choice earns its
place where turning it off costs step time, temporary memory or compile time.

Usage::

    python benchmarks/bench_lowering.py                       # 8M parameters, 20 leaves
    python benchmarks/bench_lowering.py --params 4e6 --leaves 1000
    python benchmarks/bench_lowering.py --guard "guard, both False"
    python benchmarks/bench_lowering.py --loop 5              # 5 steps per call in a fori_loop
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import optax

from optax_gradhealth import _lowering

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_guard

#: The identity each choice becomes when turned off.
_IDENTITY = {
    "keep_in_reduction": lambda operands: operands,
    "one_vector": lambda vector: vector,
    "own_operands": lambda operands: operands,
    "apart": lambda value: value,
    "before_writes": lambda flag, sums: flag,
}


@contextlib.contextmanager
def without(choice: str | None) -> Iterator[None]:
    """Within the block, ``_lowering.<choice>`` is the identity (None: all as they are)."""
    if choice is None:
        yield
        return
    original = getattr(_lowering, choice)
    setattr(_lowering, choice, _IDENTITY[choice])
    try:
        yield
    finally:
        setattr(_lowering, choice, original)


def _with_choice_off(tx: optax.GradientTransformation, choice: str) -> optax.GradientTransformationExtraArgs:
    """``tx`` whose update is traced with ``_lowering.<choice>`` turned off."""

    def update(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> tuple[Any, Any]:
        with without(choice):
            return tx.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(tx.init, update)


def bench(
    num_params: int, num_leaves: int, steps: int, warmup: int, guard: str = "guard (all on)", loop: int = 0
) -> list[dict]:
    """Times adamw, ``guard`` as it is and ``guard`` with each choice off
    (``bench_guard.bench_tree``: one step per call, or ``loop`` steps per call in one
    ``fori_loop``)."""
    variants = bench_guard.variants()
    factory, takes_loss = variants[guard]
    specs = {"adamw": variants["adamw"], "all choices": (factory, takes_loss)}
    for choice in _lowering.CHOICES:
        specs[f"without {choice}"] = (lambda choice=choice: _with_choice_off(factory(), choice), takes_loss)
    rows = bench_guard.bench_tree(num_params, num_leaves, steps, warmup, 1, specs=specs, loop=loop)
    as_is = next(row["step_ms"] for row in rows if row["variant"] == "all choices")
    return [
        {
            "variant": row["variant"],
            "step_ms": row["step_ms"],
            "x_adamw": row["step_ratio"],
            "x_guard": row["step_ms"] / as_is,
            "compile_s": row["compile_s"],
            "temp_mb": row["temp_mb"],
        }
        for row in rows
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=8e6, help="parameters in the tree (default 8e6)")
    parser.add_argument("--leaves", type=int, default=20, help="leaves in the tree (default 20)")
    parser.add_argument("--steps", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    parser.add_argument(
        "--guard", default="guard (all on)", help="the bench_guard.py variant to vary (default 'guard (all on)')"
    )
    parser.add_argument("--loop", type=int, default=0, help="steps per call in one fori_loop (default 0: one step)")
    args = parser.parse_args(argv)
    if args.loop < 0:
        parser.error(f"--loop must be >= 0, got {args.loop}")
    guards = [name for name in bench_guard.variants() if name.startswith("guard")]
    if args.guard not in guards:
        parser.error(f"unknown --guard {args.guard!r}; known: {guards}")
    if args.steps < 1 or args.leaves < 1:
        parser.error(f"--steps and --leaves must be >= 1, got {args.steps} and {args.leaves}")
    rows = bench(int(args.params), args.leaves, args.steps, args.warmup, args.guard, args.loop)
    size = f"{args.params / 1e6:g}M parameters in {args.leaves} leaves, {args.guard}"
    size += f", {args.loop} steps per call (fori_loop; times per step)" if args.loop else ""
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {size}")
    print("| variant | step ms (median) | x adamw | x guard | compile s | temp MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['variant']} | {row['step_ms']:.2f} | {row['x_adamw']:.2f} | {row['x_guard']:.2f} | "
            f"{row['compile_s']:.2f} | {row['temp_mb']:.1f} |"
        )


if __name__ == "__main__":
    main()
