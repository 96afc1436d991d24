"""Accuracy of the sketched step cosine (``gh.record_step_cosine``) against the exact one.

For pairs of random gradients with a chosen exact cosine (a 1M-element tree of 8 leaves
of unequal sizes), it prints the RMS and the largest error of the sketched cosine, per
sketch size, over ``--pairs`` pairs (each pair with a fresh sketch seed).

Usage::

    python benchmarks/bench_sketch.py
    python benchmarks/bench_sketch.py --dims 256 1024 4096 --pairs 50
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import optax_gradhealth as gh

SIZES = (400_000, 250_000, 150_000, 100_000, 60_000, 25_000, 10_000, 5_000)


def pair(rng: np.random.Generator, cosine: float) -> tuple[np.ndarray, np.ndarray]:
    """Two float32 vectors with the exact cosine ``cosine`` (to float64 rounding)."""
    n = sum(SIZES)
    x = rng.standard_normal(n)
    z = rng.standard_normal(n)
    z -= (z @ x) / (x @ x) * x  # orthogonal to x
    y = cosine * x / np.linalg.norm(x) + np.sqrt(1 - cosine**2) * z / np.linalg.norm(z)
    return x.astype(np.float32), y.astype(np.float32)


def as_tree(v: np.ndarray) -> dict[str, jax.Array]:
    out, start = {}, 0
    for i, size in enumerate(SIZES):
        out[f"leaf{i}"] = jnp.asarray(v[start : start + size])
        start += size
    return out


def sketched_cosine(x: np.ndarray, y: np.ndarray, dim: int, seed: int) -> float:
    tx = gh.record_step_cosine(sketch_dim=dim, seed=seed)
    state = tx.init(as_tree(x))
    update = jax.jit(tx.update)
    _, state = update(as_tree(x), state)
    _, state = update(as_tree(y), state)
    return float(state.step_cosine)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--cosines", type=float, nargs="+", default=[-0.5, 0.0, 0.5, 0.9])
    parser.add_argument("--pairs", type=int, default=30)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    pairs = {c: [pair(rng, c) for _ in range(args.pairs)] for c in args.cosines}
    print(f"{sum(SIZES):,} elements in {len(SIZES)} leaves, {args.pairs} pairs per cell (a fresh seed each)")
    print("| sketch_dim | exact cosine | RMS error | largest error | 1/sqrt(dim) |")
    print("|---:|---:|---:|---:|---:|")
    for dim in args.dims:
        for c in args.cosines:
            errors = np.array([sketched_cosine(x, y, dim, seed) - c for seed, (x, y) in enumerate(pairs[c])])
            rms, worst = np.sqrt(np.mean(errors**2)), np.max(np.abs(errors))
            print(f"| {dim} | {c:+.1f} | {rms:.4f} | {worst:.4f} | {1 / np.sqrt(dim):.4f} |")


if __name__ == "__main__":
    main()
