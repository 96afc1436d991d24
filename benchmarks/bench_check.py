"""Benchmark: what checking an optimizer's own output costs, atomic or per element.

The guard's update check (``check_updates=True``) skips a whole step whose inner update
or new inner state is not finite. Its writes then depend on a reduction over values
the inner update computes, so the guard evaluates the update twice (once to check, once
to write the selected state): on any backend one more read of everything the optimizer
reads, about 4/7 of adamw's memory traffic on top of the one read of the gradients a
global-norm clip needs.

A check per element needs no such dependency: each new state element that is not
finite keeps its old value, each non-finite update element becomes 0, and the count of
such steps is a reduction that no write waits for. Where a compiler fuses that
reduction with the writes (one pass), the check costs next to nothing; where it does
not, the reduction's reads of the old state force a copy of it before the writes
(donated buffers are written in place). This script measures which happens, per
backend, with optax's adamw inside a minimal wrapper (a global-norm clip to 1.0 and the
check, no statistics or detection):

* ``adamw``: bare ``optax.adamw`` (the baseline);
* ``clip+adamw``: ``optax.chain(optax.clip_by_global_norm(1.0), adamw)``;
* ``clip``: the wrapper without a check;
* ``atomic``: the wrapper with the guard's check (two evaluations, ``_skip.TracedUpdate``);
* ``per element``: the wrapper with the check per element, one evaluation (under jit
  the update reads the selected state, as the guard's does: an element whose new state
  was not finite gets the update its old state gives, 0 if that is not finite either).

Usage::

    python benchmarks/bench_check.py                       # 8M parameters in 20 leaves
    python benchmarks/bench_check.py --params 4e8 --leaves 100
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_guard import LEARNING_RATE, WEIGHT_DECAY, bench_tree, format_table

from optax_gradhealth import _guard, _skip, _stats

MODES = ("clip", "atomic", "per element")


class CheckState(NamedTuple):
    inner: Any
    flagged: jax.Array  # int32: steps whose update or new state held a non-finite element


def checked(inner: optax.GradientTransformation, mode: str) -> optax.GradientTransformation:
    """``inner`` after a clip of the global norm to 1.0, with the check ``mode``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    def init_fn(params):
        return CheckState(inner.init(params), jnp.zeros((), jnp.int32))

    def update_fn(grads, state, params=None):
        factor = jnp.minimum(1.0, 1.0 / jnp.maximum(_stats.global_norm(grads), 1e-30))
        old = jax.tree.leaves(state.inner)
        traced = _skip.TracedUpdate(
            lambda: inner.update(jax.tree.map(lambda g: g * factor.astype(g.dtype), grads), state.inner, params),
            inputs=(grads, state, params),
        )
        sel = _skip.Selects()
        if mode == "clip":
            updates, new_inner = traced.outputs()
            bad = jnp.zeros((), jnp.bool_)
        elif mode == "atomic":
            bad = ~_guard._all_finite(traced.outputs())
            updates, new_inner = traced.with_selected_state(lambda k, new: sel.where(bad, old[k], new))
            updates = sel.zero_floats_where(bad, updates)
        else:
            flags = []

            def keep_finite(k, new):
                if not _stats._is_float(new):
                    return new
                finite = jnp.isfinite(new)
                flags.append(jnp.all(finite))
                return jax.lax.select(finite, new, old[k])

            def zero_nonfinite(u):
                if not _stats._is_float(u):
                    return u
                finite = jnp.isfinite(u)
                flags.append(jnp.all(finite))
                return jax.lax.select(finite, u, jnp.zeros_like(u))

            updates, new_inner = traced.with_selected_state(keep_finite)
            updates = jax.tree.map(zero_nonfinite, updates)
            bad = ~jnp.all(jnp.stack(flags)) if flags else jnp.zeros((), jnp.bool_)
        return updates, CheckState(new_inner, state.flagged + bad.astype(jnp.int32))

    return optax.GradientTransformation(init_fn, update_fn)


def specs() -> dict[str, tuple[Any, bool]]:
    def adamw():
        return optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)

    out = {"adamw": (adamw, False), "clip+adamw": (lambda: optax.chain(optax.clip_by_global_norm(1.0), adamw()), False)}
    for mode in MODES:
        out[mode] = (lambda mode=mode: checked(adamw(), mode), False)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=8e6, help="parameters (default 8e6)")
    parser.add_argument("--leaves", type=int, default=20, help="leaves (default 20)")
    parser.add_argument("--steps", type=int, default=15, help="timed steps (default 15)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--loop", type=int, default=0, help="steps per call in one fori_loop (default 0: one)")
    args = parser.parse_args(argv)
    if args.params < args.leaves or args.leaves < 1 or args.steps < 1:
        parser.error("need --leaves >= 1, --steps >= 1 and at least one parameter per leaf")
    rows = bench_tree(int(args.params), args.leaves, args.steps, args.warmup, 1, specs(), loop=args.loop)
    print(f"jax {jax.__version__}, optax {optax.__version__}, backend {jax.default_backend()}")
    print(format_table(rows))


if __name__ == "__main__":
    main()
