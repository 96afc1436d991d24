"""Data-parallel training on 8 emulated CPU devices with the cross-device audit.

Each device computes its LOCAL gradient inside ``jax.shard_map``
(``gh.local_value_and_grad``), ``gh.cross_device`` averages them and audits them, and
``gh.guard`` protects adamw. A scenario injects one of the faults the audit is meant to
catch; the script prints the alarms (``gh.cross_device_alarms``) as they appear.

Run::

  python examples/data_parallel.py --scenario clean            # no alarm
  python examples/data_parallel.py --scenario desync           # device 5 initialised from its own seed
  python examples/data_parallel.py --scenario duplicate        # devices 2 and 6 read the same shard
  python examples/data_parallel.py --scenario corrupt-device --corruption flip   # or scale, noise

Each device holds its own replica of the parameters and optimizer state (``P('data')``
on a stacked copy, as under ``jax.pmap``), which is what lets the desync scenario exist:
in a correct run all replicas stay bit-identical. With truly replicated parameters
(``in_specs=P()``) the state can leave ``shard_map`` with ``out_specs=P()``.
"""

from __future__ import annotations

import argparse
import os

# Emulate 8 CPU devices; must happen before jax starts. Added to XLA_FLAGS already set
# (os.environ.setdefault would leave out the count whenever the user has any flag there,
# and the scenarios need 8 devices); a count set there is kept.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
    else f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import optax_gradhealth as gh

SCENARIOS = ("clean", "desync", "duplicate", "corrupt-device")
D_IN, HIDDEN, CLASSES, BATCH = 16, 32, 4, 64


def init_params(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "hidden": {"kernel": rng.normal(size=(D_IN, HIDDEN)) / np.sqrt(D_IN), "bias": np.zeros(HIDDEN)},
        "out": {"kernel": rng.normal(size=(HIDDEN, CLASSES)) / np.sqrt(HIDDEN), "bias": np.zeros(CLASSES)},
    }


def loss_fn(params, x, y):
    h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    logits = h @ params["out"]["kernel"] + params["out"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def main(scenario: str = "clean", corruption: str = "scale", steps: int = 60, every: int = 10) -> list[list[str]]:
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")
    k = jax.device_count()
    mesh = jax.make_mesh((k,), ("data",), axis_types=(AxisType.Auto,))
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(D_IN, CLASSES))
    x = rng.normal(size=(steps, k, BATCH, D_IN)).astype(np.float32)
    y = np.argmax(x @ teacher + 0.5 * rng.normal(size=(steps, k, BATCH, CLASSES)), -1).astype(np.int32)

    replicas = [init_params(0) for _ in range(k)]
    scale, noise = np.ones(k, np.float32), np.zeros(k, np.float32)
    if scenario == "desync":
        replicas[5] = init_params(5)  # the classic bug: init with a per-device key
    elif scenario == "duplicate":
        x[:, 6], y[:, 6] = x[:, 2], y[:, 2]  # the sampler forgot the rank
    elif scenario == "corrupt-device":
        if corruption == "scale":
            scale[3] = 10.0
        elif corruption == "flip":
            scale[3] = -1.0
        else:
            noise[3] = 5.0
    params = jax.tree.map(lambda *r: jnp.asarray(np.stack(r), jnp.float32), *replicas)

    tx = optax.chain(
        gh.cross_device("data", per_device_batch=BATCH, audit_first_steps=200, audit_every=500),
        gh.guard(optax.adamw(1e-2), clip=1.0),
    )

    def step(params, state, x, y, scale, noise, t):
        params, state = jax.tree.map(lambda p: p[0], (params, state))  # this device's replica
        loss, grads = gh.local_value_and_grad(loss_fn, "data")(params, x[0], y[0])
        key = jax.random.fold_in(jax.random.key(1), t)
        grads = jax.tree.map(
            lambda g: g * scale[0] + noise[0] * jnp.linalg.norm(g) * jax.random.normal(key, g.shape) / np.sqrt(g.size),
            grads,
        )
        # The guard must see the same loss on every device (it decides to skip from it):
        # pass the mean loss, never the local one.
        loss = jax.lax.pmean(loss, "data")
        updates, state = tx.update(grads, state, params, loss=loss)
        params = optax.apply_updates(params, updates)
        # Per-device copies (identical values) because the state is kept per device here.
        return jax.tree.map(lambda p: p[None], (params, state, gh.metrics(state, deprecated_names=False))), loss

    sharded = P("data")
    train_step = jax.jit(
        jax.shard_map(
            step,
            mesh=mesh,
            in_specs=(sharded, sharded, sharded, sharded, sharded, sharded, P()),
            out_specs=(sharded, P()),
        )
    )
    state = jax.tree.map(lambda s: jnp.stack([s] * k), tx.init(jax.tree.map(lambda p: p[0], params)))
    history = []
    for t in range(steps):
        (params, state, metrics), loss = train_step(params, state, x[t], y[t], scale, noise, t)
        metrics = jax.tree.map(lambda v: v[0], jax.device_get(metrics))  # device 0's copy
        alarms = gh.cross_device_alarms(metrics)
        history.append(alarms)
        if t % every == 0 or (alarms and not history[-2:-1]) or (alarms and history[-2] != alarms):
            print(
                f"step {t:4d} loss {float(loss):.3f} agreement {float(metrics['xdev/agreement']):+.3f} "
                f"noise_scale {float(metrics['xdev/noise_scale']):8.1f} "
                f"outlier_score {float(metrics['xdev/outlier_score']):5.1f} alarms {alarms or 'none'}"
            )
    raised = sum(bool(a) for a in history)
    print(f"{scenario}: alarms on {raised} of {steps} steps")
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=SCENARIOS, default="clean")
    parser.add_argument("--corruption", choices=("scale", "flip", "noise"), default="scale")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    main(args.scenario, args.corruption, args.steps)
