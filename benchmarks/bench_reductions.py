"""Microbenchmark: how the backend reduces a value computed from an optimizer's inputs.

The guard's update check and update health reduce values computed by the inner update
(Adam's new moments and update) without writing them: whether a backend fuses such a
reduction with the computation of its operand, or writes the operand first and reads it
back, decides what the check costs. Each formulation below reduces, per leaf, a value
computed from three inputs (a gradient ``g`` and Adam's ``mu`` and ``nu``), in one
jitted call over every leaf; the table gives the median time, the ratio to reading
the gradient once (``input_sq``, the sum of squares of an input) and XLA's temporary
buffer (where a written operand shows):

* ``input_sq``: ``sum(g * g)``, the statistics' pass;
* ``mu_sq``: ``sum(mu' * mu')`` of the new first moment (two inputs, cheap arithmetic);
* ``update_sq``: ``sum(u * u)`` of Adam's update (a square root and two divisions);
* ``poisoned``: the update's squares, NaN where ``mu'`` or ``nu'`` is not finite (a
  select), summed: update health's formulation;
* ``flags``: ``all(isfinite(u) & isfinite(mu') & isfinite(nu'))``: the update check's.

Usage::

    python benchmarks/bench_reductions.py                 # 8M elements in 20 leaves
    python benchmarks/bench_reductions.py --elements 4e6 --leaves 1000
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

WIDTH = 512


def adam_like(g: jax.Array, mu: jax.Array, nu: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One Adam step's new moments and update (bias corrections of step 1)."""
    new_mu = 0.9 * mu + 0.1 * g
    new_nu = 0.999 * nu + 0.001 * g * g
    update = -1e-3 * (new_mu / 0.1) / (jnp.sqrt(new_nu / 0.001) + 1e-8)
    return update, new_mu, new_nu


def _reduce(kind: str, g: jax.Array, mu: jax.Array, nu: jax.Array) -> jax.Array:
    if kind == "input_sq":
        return jnp.sum(g * g)
    update, new_mu, new_nu = adam_like(g, mu, nu)
    if kind == "mu_sq":
        return jnp.sum(new_mu * new_mu)
    if kind == "update_sq":
        return jnp.sum(update * update)
    if kind == "poisoned":
        ok = jnp.isfinite(new_mu) & jnp.isfinite(new_nu)
        return jnp.sum(jax.lax.select(ok, update * update, jnp.full_like(update, jnp.nan)))
    if kind == "flags":
        return jnp.all(jnp.isfinite(update) & jnp.isfinite(new_mu) & jnp.isfinite(new_nu)).astype(jnp.float32)
    raise ValueError(f"unknown formulation {kind!r}")


KINDS = ("input_sq", "mu_sq", "update_sq", "poisoned", "flags")


def bench(num_elements: int, num_leaves: int, rounds: int, warmup: int) -> list[dict]:
    """Times every formulation, round-robin, on the same inputs."""
    rng = np.random.default_rng(0)
    rows = max(1, num_elements // num_leaves // WIDTH)

    def leaves(positive: bool = False) -> list[jax.Array]:
        out = [rng.standard_normal((rows, WIDTH), dtype=np.float32) for _ in range(num_leaves)]
        return [jnp.asarray(np.abs(x) if positive else x) for x in out]

    g, mu, nu = leaves(), leaves(), leaves(positive=True)
    executables, temp = {}, {}
    for kind in KINDS:
        fn = jax.jit(lambda g, mu, nu, kind=kind: jnp.stack([_reduce(kind, *xs) for xs in zip(g, mu, nu)]))
        executables[kind] = fn.lower(g, mu, nu).compile()
        analysis = executables[kind].memory_analysis()
        temp[kind] = analysis.temp_size_in_bytes if analysis is not None else -1
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for index in range(warmup + rounds):
        for kind in KINDS:
            start = time.perf_counter()
            jax.block_until_ready(executables[kind](g, mu, nu))
            if index >= warmup:
                times[kind].append(time.perf_counter() - start)
    base = statistics.median(times["input_sq"])
    return [
        {
            "formulation": kind,
            "ms": statistics.median(times[kind]) * 1e3,
            "ratio": statistics.median(times[kind]) / base,
            "temp_mb": temp[kind] / 2**20,
        }
        for kind in KINDS
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elements", type=float, default=8e6, help="elements per input (default 8e6)")
    parser.add_argument("--leaves", type=int, default=20, help="leaves (default 20)")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    args = parser.parse_args(argv)
    if args.elements < args.leaves or args.leaves < 1 or args.rounds < 1:
        parser.error("need --leaves >= 1, --rounds >= 1 and at least one element per leaf")
    rows = bench(int(args.elements), args.leaves, args.rounds, args.warmup)
    size = f"{args.elements / 1e6:g}M elements in {args.leaves} leaves"
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {size}")
    print("| formulation | ms (median) | x input_sq | temp MB |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['formulation']} | {row['ms']:.2f} | {row['ratio']:.2f} | {row['temp_mb']:.1f} |")


if __name__ == "__main__":
    main()
