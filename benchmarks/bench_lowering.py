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
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

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


def bench(
    num_params: int, num_leaves: int, steps: int, warmup: int, guard: str = "guard (all on)", loop: int = 0
) -> list[dict]:
    """Times adamw, ``guard`` as it is and ``guard`` with each choice off: one step per
    call, or ``loop`` steps per call in one ``fori_loop`` (``bench_guard.make_loop``)."""
    params0 = bench_guard.make_tree(num_params, num_leaves, seed=0)
    grads = bench_guard.make_tree(num_params, num_leaves, seed=1)
    loss = jnp.float32(2.5)
    specs = bench_guard.variants()
    plan: list[tuple[str, str, str | None]] = [("adamw", "adamw", None), (guard, "all choices", None)]
    plan += [(guard, f"without {choice}", choice) for choice in _lowering.CHOICES]
    runs: dict[str, list[Any]] = {}
    for variant, label, choice in plan:
        factory, takes_loss = specs[variant]
        tx = factory()
        with without(choice):
            start = time.perf_counter()
            jitted = bench_guard.make_loop(tx, takes_loss, loop) if loop else bench_guard.make_step(tx, takes_loss)
            compiled = jitted.lower(params0, jax.eval_shape(tx.init, params0), grads, loss).compile()
            compile_s = time.perf_counter() - start
        analysis = compiled.memory_analysis()
        temp = analysis.temp_size_in_bytes if analysis is not None else -1
        print(f"  compiled {label}: {compile_s:.1f} s", file=sys.stderr)
        runs[label] = [compiled, jax.tree.map(jnp.copy, params0), tx.init(params0), [], compile_s, temp]
    for index in range(warmup + steps):
        for run in runs.values():
            start = time.perf_counter()
            run[1], run[2] = run[0](run[1], run[2], grads, loss)
            jax.block_until_ready((run[1], run[2]))
            if index >= warmup:
                run[3].append(time.perf_counter() - start)
    for run in runs.values():
        run[3] = [t / max(loop, 1) for t in run[3]]
    adamw = statistics.median(runs["adamw"][3])
    as_is = statistics.median(runs["all choices"][3])
    return [
        {
            "variant": label,
            "step_ms": statistics.median(run[3]) * 1e3,
            "x_adamw": statistics.median(run[3]) / adamw,
            "x_guard": statistics.median(run[3]) / as_is,
            "compile_s": run[4],
            "temp_mb": run[5] / 2**20,
        }
        for label, run in runs.items()
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
