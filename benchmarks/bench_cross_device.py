"""Cost of gh.cross_device on 8 emulated CPU devices (ratios measured in one run).

Variants of one data-parallel training step of an MLP (~3.2 M parameters, per-device
batch 32 unless ``--batch`` says otherwise) under ``jax.pmap``:

* ``plain``: ``lax.pmean`` of the gradients + ``optax.adamw`` (the baseline);
* ``plain+clip``: the same with ``optax.clip_by_global_norm(1.0)`` before adamw, the
  usual recipe (the global norm is the same barrier between the all-reduce and the
  update as the guard's);
* ``xdev``: ``gh.cross_device`` + ``optax.adamw``, a non-audit step;
* ``xdev+guard``: ``gh.cross_device`` + ``gh.guard(optax.adamw, clip=1.0)``, a non-audit step;
* ``xdev+guard lean``: the same with the update check and update health off
  (``check_updates=False, update_health=False``): what those two defaults cost here;
* ``xdev+guard audit``: the same on an audit step (every step audited);
* ``naive all-gather``: ``lax.all_gather`` of the full gradients, exact K x K cosine
  matrix, then ``pmean`` + adamw: the obvious alternative to the sketch.

Timings are medians over interleaved rounds in a shuffled order (so load drift and
position effects hit every variant alike);
memory is XLA's compiled temporary-buffer size per device (parameters and optimizer
state are donated and updated in place, identical for every variant, and not counted).
Bytes communicated per device per step are computed from the collectives' operand sizes.
The per-device batch sets how much forward/backward work each step does beside the
update: the audit's cost is per parameter, so its ratio falls as the batch grows.
Run: ``python benchmarks/bench_cross_device.py [--rounds 15] [--batch 32]``.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_gradhealth as gh

WIDTH, DEPTH, BATCH = 1024, 3, 32  # BATCH: the default per-device batch


def init_params(rng):
    return {
        f"layer{i}": {
            "kernel": jnp.asarray(rng.normal(size=(WIDTH, WIDTH)) / np.sqrt(WIDTH), jnp.float32),
            "bias": jnp.zeros((WIDTH,), jnp.float32),
        }
        for i in range(DEPTH)
    }


def loss_fn(params, x):
    h = x
    for i in range(DEPTH):
        h = jnp.tanh(h @ params[f"layer{i}"]["kernel"] + params[f"layer{i}"]["bias"])
    return jnp.mean(jnp.square(h - 0.1))


def make_step(kind: str, batch: int = BATCH):
    adamw = optax.adamw(3e-4)
    if kind == "plain" or kind == "naive all-gather":
        tx = adamw
    elif kind == "plain+clip":
        tx = optax.chain(optax.clip_by_global_norm(1.0), adamw)
    elif kind == "xdev":
        tx = optax.chain(gh.cross_device("data", per_device_batch=batch, audit_first_steps=0, audit_every=10**6), adamw)
    elif kind == "xdev+guard":
        tx = optax.chain(
            gh.cross_device("data", per_device_batch=batch, audit_first_steps=0, audit_every=10**6),
            gh.guard(adamw, clip=1.0),
        )
    elif kind == "xdev+guard lean":
        tx = optax.chain(
            gh.cross_device("data", per_device_batch=batch, audit_first_steps=0, audit_every=10**6),
            gh.guard(adamw, clip=1.0, check_updates=False, update_health=False),
        )
    elif kind == "xdev+guard audit":
        tx = optax.chain(
            gh.cross_device("data", per_device_batch=batch, audit_first_steps=10**9), gh.guard(adamw, clip=1.0)
        )
    else:
        raise ValueError(kind)

    def step(params, state, x):
        grads = jax.grad(loss_fn)(params, x)
        if kind in ("plain", "plain+clip"):
            grads = jax.lax.pmean(grads, "data")
        elif kind == "naive all-gather":
            everything = jnp.concatenate([g.reshape(-1) for g in jax.tree.leaves(grads)])
            gathered = jax.lax.all_gather(everything, "data")  # [K, n] on every device
            unit = gathered / jnp.linalg.norm(gathered, axis=1, keepdims=True)
            cosine = unit @ unit.T
            grads = jax.tree.map(lambda g: jax.lax.pmean(g, "data"), grads)
            grads = jax.tree.map(lambda g: g + 0.0 * cosine[0, 0], grads)  # keep the audit alive
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return tx, jax.pmap(step, axis_name="data", donate_argnums=(0, 1))


def main(rounds: int = 15, batch: int = BATCH) -> list[dict]:
    k = jax.device_count()
    rng = np.random.default_rng(0)
    params = init_params(rng)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    x = jnp.asarray(rng.normal(size=(k, batch, WIDTH)), jnp.float32)
    kinds = ["plain", "plain+clip", "xdev", "xdev+guard", "xdev+guard lean", "xdev+guard audit", "naive all-gather"]
    runs = {}
    for kind in kinds:
        tx, step = make_step(kind, batch)
        p = jax.tree.map(lambda a: jnp.stack([a] * k), params)
        s = jax.pmap(tx.init, axis_name="data")(p)
        compiled = step.lower(p, s, x).compile()
        mem = compiled.memory_analysis()
        memory = mem.temp_size_in_bytes if mem is not None else float("nan")
        p, s = step(p, s, x)  # first call: the audit variants run their step-0 audit here
        jax.block_until_ready(p)
        runs[kind] = {"step": step, "state": (p, s), "times": [], "memory": memory}
    order_rng = np.random.default_rng(1)
    for _ in range(rounds):
        for kind in order_rng.permutation(kinds):  # no variant always runs after the same one
            run = runs[kind]
            p, s = run["state"]
            start = time.perf_counter()
            p, s = run["step"](p, s, x)
            jax.block_until_ready((p, s))
            run["times"].append(time.perf_counter() - start)
            run["state"] = (p, s)
    base = float(np.median(runs["plain"]["times"]))
    base_mem = runs["plain"]["memory"]
    rows = []
    print(f"{k} devices, {n_params / 1e6:.2f} M parameters, per-device batch {batch}, {rounds} rounds")
    dim = 1024
    comm = {
        "plain": n_params,
        "plain+clip": n_params,
        "xdev": n_params + k,
        "xdev+guard": n_params + k,
        "xdev+guard lean": n_params + k,
        "xdev+guard audit": n_params + k + k * (dim + 1) + 2 * k,
        "naive all-gather": n_params + k * n_params,
    }
    print(
        "| variant | median step (ms) | vs plain | temp memory/device (MiB) | vs plain | all-reduced/gathered floats |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for kind in kinds:
        median = float(np.median(runs[kind]["times"]))
        memory = runs[kind]["memory"]
        rows.append({"variant": kind, "ms": 1e3 * median, "ratio": median / base, "mib": memory / 2**20})
        print(
            f"| {kind} | {1e3 * median:.1f} | {median / base:.3f}x | {memory / 2**20:.1f} | {memory / base_mem:.2f}x "
            f"| {comm[kind]:,} |"
        )
    clip = float(np.median(runs["plain+clip"]["times"]))
    guarded = float(np.median(runs["xdev+guard"]["times"]))
    print(f"xdev+guard / plain+clip: {guarded / clip:.3f}x")
    lean = float(np.median(runs["xdev+guard lean"]["times"]))
    print(f"xdev+guard lean / plain+clip: {lean / clip:.3f}x")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=BATCH, help=f"per-device batch (default {BATCH})")
    args = parser.parse_args()
    if args.batch <= 0 or args.rounds <= 0:
        parser.error(f"--batch and --rounds must be positive, got {args.batch} and {args.rounds}")
    main(args.rounds, args.batch)
