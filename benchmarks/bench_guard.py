"""Benchmark: the cost of ``gh.guard`` against bare ``optax.adamw`` and optax's own guards.

Times, in ONE run, on the same inputs, with donated parameter and optimizer-state
buffers (``jax.jit(step, donate_argnums=(0, 1))``), one full training-step update
(``tx.update`` + ``optax.apply_updates``) for:

* ``adamw``: bare ``optax.adamw``;
* ``clip+adamw``: ``optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(...))``;
* ``apply_if_finite``: ``optax.apply_if_finite(that chain, 5)``;
* ``guard``: ``gh.guard(optax.adamw(...), clip=1.0)`` with every feature on (loss
  passed, norm and loss spike detection with skip, momentum reset, rollback, vanishing
  flag, per-layer norms).

The variants are timed round-robin (one step of each in turn, repeated ``--steps``
times after ``--warmup`` untimed rounds), so machine noise hits them alike; the table
reports medians and ratios to bare adamw. Compile time is ``lower() + compile()`` of a
freshly built jitted step, median of ``--compile-reps`` interleaved repetitions.
``state MB`` is the bytes of the optimizer-state leaves; ``temp MB`` is XLA's
temporary buffer size for the compiled step (``memory_analysis()``), where an extra
gradient-sized buffer would show.

With ``--loop N`` each timed call runs ``N`` steps inside one jitted
``lax.fori_loop`` (the gradients scaled by a step-dependent scalar, so that nothing can
be hoisted out of the loop), as a training loop compiled whole (``lax.scan`` over
batches) runs them; the table then reports the time per step and the loop's temporary
buffer, where a gradient-sized temporary held across steps would show. ``--json PATH``
also writes the rows as JSON.

Usage::

    python benchmarks/bench_guard.py                       # 40M params, 100 and 1000 leaves
    python benchmarks/bench_guard.py --params 4e6 --steps 20
    python benchmarks/bench_guard.py --params 4e8 --leaves 100 --loop 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_gradhealth as gh

LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4
WIDTH = 512


def make_tree(num_params: int, num_leaves: int, seed: int = 0) -> dict[str, jax.Array]:
    """A dict of ``num_leaves`` float32 matrices holding about ``num_params`` elements.

    Leaf sizes vary (a fixed spread of 0.5x to 1.5x the mean, the same for every
    ``seed``), like the layers of a network; ``seed`` draws the values.
    """
    weights = np.random.default_rng(12345).uniform(0.5, 1.5, num_leaves)
    rng = np.random.default_rng(seed)
    sizes = np.maximum(1, np.round(weights / weights.sum() * num_params)).astype(int)
    tree = {}
    for i, size in enumerate(sizes):
        width = min(WIDTH, int(size))
        rows = max(1, round(size / width))
        tree[f"layer_{i:04d}"] = jnp.asarray(rng.standard_normal((rows, width), dtype=np.float32) * 0.02)
    return tree


def variants() -> dict[str, tuple[Callable[[], optax.GradientTransformation], bool]]:
    """name -> (factory of the transformation, whether it takes ``loss=``)."""

    def adamw():
        return optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)

    def clip_adamw():
        return optax.chain(optax.clip_by_global_norm(1.0), adamw())

    def apply_if_finite():
        return optax.apply_if_finite(clip_adamw(), 5)

    def guard(check_updates=True, update_health=True):
        return gh.guard(
            adamw(),
            check_updates=check_updates,
            update_health=update_health,
            clip=1.0,
            spike_action="skip",
            spike_threshold=2.0,
            spike_zscore=3.0,
            loss_spike_zscore=3.0,
            warmup_steps=20,
            reset_after=3,
            reset_window=100,
            rollback_after_nonfinite=10,
            rollback_after_spikes=10,
            vanishing_norm=1e-5,
        )

    return {
        "adamw": (adamw, False),
        "clip+adamw": (clip_adamw, False),
        "apply_if_finite": (apply_if_finite, False),
        "guard (all on)": (guard, True),
        "guard, update_health=False": (lambda: guard(update_health=False), True),
        "guard, check_updates=False": (lambda: guard(check_updates=False), True),
        "guard, both False": (lambda: guard(check_updates=False, update_health=False), True),
    }


def make_step(tx: optax.GradientTransformation, takes_loss: bool):
    """The jitted training-step update, parameters and optimizer state donated."""

    def step(params, opt_state, grads, loss):
        extra = {"loss": loss} if takes_loss else {}
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(step, donate_argnums=(0, 1))


def make_loop(tx: optax.GradientTransformation, takes_loss: bool, num_steps: int):
    """``num_steps`` training-step updates in one jitted ``fori_loop``, parameters and
    optimizer state donated. Step ``i`` sees the gradients times ``1 + 1e-3 i``."""

    def run(params, opt_state, grads, loss):
        def body(i, carry):
            params, opt_state = carry
            scale = 1.0 + 1e-3 * i.astype(jnp.float32)
            step_grads = jax.tree.map(lambda g: g * scale, grads)
            extra = {"loss": loss * scale} if takes_loss else {}
            updates, opt_state = tx.update(step_grads, opt_state, params, **extra)
            return optax.apply_updates(params, updates), opt_state

        return jax.lax.fori_loop(0, num_steps, body, (params, opt_state))

    return jax.jit(run, donate_argnums=(0, 1))


def tree_bytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def bench_tree(
    num_params: int,
    num_leaves: int,
    steps: int,
    warmup: int,
    compile_reps: int,
    specs: dict[str, tuple[Callable[[], optax.GradientTransformation], bool]] | None = None,
    loop: int = 0,
) -> list[dict]:
    """Times every variant of ``specs`` (default :func:`variants`; the first is the
    baseline): one step per call, or ``loop`` steps per call in one ``fori_loop``."""
    params0 = make_tree(num_params, num_leaves, seed=0)
    grads = make_tree(num_params, num_leaves, seed=1)  # norm ~ 0.02 * sqrt(N) > 1: clipping is active
    loss = jnp.float32(2.5)
    specs = specs if specs is not None else variants()
    names = list(specs)
    base = names[0]

    # Compile time: a fresh transformation and jit each time, interleaved over variants.
    # The last executable of each variant is the one timed below.
    compile_times: dict[str, list[float]] = {n: [] for n in names}
    executables: dict[str, Any] = {}
    temp_bytes: dict[str, int] = {}
    for _ in range(compile_reps):
        for name in names:
            factory, takes_loss = specs[name]
            tx = factory()
            state_shape = jax.eval_shape(tx.init, params0)
            start = time.perf_counter()
            jitted = make_loop(tx, takes_loss, loop) if loop else make_step(tx, takes_loss)
            executables[name] = jitted.lower(params0, state_shape, grads, loss).compile()
            compile_times[name].append(time.perf_counter() - start)
            analysis = executables[name].memory_analysis()
            temp_bytes[name] = getattr(analysis, "temp_size_in_bytes", -1) if analysis is not None else -1
            print(f"  compiled {name} ({num_leaves} leaves): {compile_times[name][-1]:.1f} s", file=sys.stderr)

    # Step time: each variant owns its (donated) params and state; round-robin.
    runners = {}
    for name in names:
        factory, _ = specs[name]
        params = jax.tree.map(jnp.copy, params0)
        state = factory().init(params)
        runners[name] = [executables[name], params, state, tree_bytes(state)]
    times: dict[str, list[float]] = {n: [] for n in names}
    for round_index in range(warmup + steps):
        for name in names:
            run = runners[name]
            start = time.perf_counter()
            params, state = run[0](run[1], run[2], grads, loss)
            jax.block_until_ready((params, state))
            elapsed = time.perf_counter() - start
            run[1], run[2] = params, state
            if round_index >= warmup:
                times[name].append(elapsed)

    for name in names:  # every variant must have kept finite parameters
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(runners[name][1])), name

    per_call = max(loop, 1)
    times = {name: [t / per_call for t in values] for name, values in times.items()}
    base_step = statistics.median(times[base])
    base_compile = statistics.median(compile_times[base])
    rows = []
    for name in names:
        step_time = statistics.median(times[name])
        compile_time = statistics.median(compile_times[name])
        rows.append(
            {
                "tree": f"{num_params / 1e6:g}M/{num_leaves}" + (f" loop{loop}" if loop else ""),
                "variant": name,
                "step_ms": step_time * 1e3,
                "step_ratio": step_time / base_step,
                "compile_s": compile_time,
                "compile_ratio": compile_time / base_compile,
                "state_mb": runners[name][3] / 2**20,
                "temp_mb": temp_bytes[name] / 2**20 if temp_bytes[name] >= 0 else float("nan"),
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    header = (
        "| tree (params/leaves) | variant | step ms (median) | x adamw | compile s | compile x adamw "
        "| state MB | temp MB |"
    )
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['tree']} | {r['variant']} | {r['step_ms']:.2f} | {r['step_ratio']:.2f} | "
            f"{r['compile_s']:.2f} | {r['compile_ratio']:.2f} | {r['state_mb']:.1f} | {r['temp_mb']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=40e6, help="parameters in the tree (default 40e6)")
    parser.add_argument(
        "--leaves", type=int, nargs="+", default=[100, 1000], help="leaf counts to run (default 100 1000)"
    )
    parser.add_argument("--steps", type=int, default=50, help="timed rounds per variant (default 50)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    parser.add_argument("--compile-reps", type=int, default=3, help="compilations per variant (default 3)")
    parser.add_argument("--loop", type=int, default=0, help="steps per call in one fori_loop (default 0: one step)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument(
        "--variants",
        nargs="+",
        help="only these variants (exact names, see variants()); adamw, the baseline, always runs first",
    )
    args = parser.parse_args(argv)
    if args.loop < 0:
        parser.error(f"--loop must be >= 0, got {args.loop}")

    print(
        f"jax {jax.__version__}, optax {optax.__version__}, backend {jax.default_backend()}, "
        f"devices {jax.devices()[0].device_kind}" + (f", {args.loop} steps per call (fori_loop)" if args.loop else "")
    )
    specs = variants()
    if args.variants:
        unknown = sorted(set(args.variants) - set(specs))
        if unknown:
            parser.error(f"unknown --variants {unknown}; known: {list(specs)}")
        specs = {name: spec for name, spec in specs.items() if name == "adamw" or name in args.variants}
    rows = []
    for num_leaves in args.leaves:
        rows += bench_tree(
            int(args.params), num_leaves, args.steps, args.warmup, args.compile_reps, specs=specs, loop=args.loop
        )
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"backend": jax.default_backend(), "jax": jax.__version__, "rows": rows}, file, indent=1)


if __name__ == "__main__":
    main()
