"""One process of the multi-host test (run by tests/test_cross_device.py as a subprocess).

Usage: python _multihost_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID OUT_JSON

Trains a tiny model data-parallel over every device of every process (one mesh axis
'data' of 8 devices) for two steps with gh.cross_device + gh.guard inside jax.shard_map,
with one corrupted device (3: gradient x100) and one duplicated shard (devices 1 and 5),
and writes the recorded metrics of both steps to OUT_JSON.
"""

from __future__ import annotations

import json
import sys

import jax


def main(coordinator: str, num_processes: int, process_id: int, out: str) -> None:
    if num_processes > 1:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import optax_gradhealth as gh

    k = jax.device_count()
    mesh = jax.make_mesh((k,), ("data",), axis_types=(AxisType.Auto,))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, k, 8, 5)).astype(np.float32)
    x[:, 5] = x[:, 1]  # devices 1 and 5 read the same shard
    scale = np.ones((k,), np.float32)
    scale[3] = 100.0  # device 3 corrupts its gradient
    params = {"w": rng.normal(size=(5, 3)).astype(np.float32), "b": np.zeros((3,), np.float32)}

    def global_array(value, spec):
        return jax.make_array_from_callback(value.shape, NamedSharding(mesh, spec), lambda index: value[index])

    tx = optax.chain(gh.cross_device("data", per_device_batch=8), gh.guard(optax.adamw(1e-2), clip=1.0))
    loss = lambda p, xb: jnp.mean(jnp.square(jnp.tanh(xb @ p["w"] + p["b"]) - 0.5))

    def train(params, xs, scale):
        state = tx.init(params)
        recorded = []
        for step in range(xs.shape[0]):
            _, grads = gh.local_value_and_grad(loss, "data")(params, xs[step, 0])
            grads = jax.tree.map(lambda g: g * scale[0], grads)
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
            recorded.append(gh.metrics(state))
        return params, recorded

    step = jax.jit(jax.shard_map(train, mesh=mesh, in_specs=(P(), P(None, "data"), P("data")), out_specs=P()))
    params, recorded = step(
        jax.tree.map(lambda v: global_array(v, P()), params),
        global_array(x, P(None, "data")),
        global_array(scale, P("data")),
    )
    result = {}
    for i, metrics in enumerate(recorded):
        for name, value in metrics.items():
            if name.startswith(("xdev/", "grad/norm")):
                result[f"step{i}/{name}"] = np.asarray(value.addressable_data(0)).tolist()
    for name, value in params.items():
        result[f"params/{name}"] = np.asarray(value.addressable_data(0)).tolist()
    with open(out, "w") as f:
        json.dump(result, f)
    if num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
