"""Multi-host data-parallel training with the cross-device audit.

Every process runs the same program; ``jax.distributed.initialize`` joins them into one
set of global devices, a 1-D mesh ``('data',)`` spans all of them, and
``gh.cross_device`` audits every device's gradient across hosts. Only process 0 prints.

On one machine (emulated CPU devices; each process is started for you); with no
arguments the script runs this local demo, 2 processes x 4 devices::

  python examples/multihost_launch.py
  python examples/multihost_launch.py --local 2 --devices-per-process 4

On a cluster, start one process per host with the same coordinator::

  python examples/multihost_launch.py --coordinator 10.0.0.1:1234 --num-processes 4 --process-id $RANK

On a Cloud TPU pod slice, ``jax.distributed.initialize()`` needs no arguments; start the
script on every worker (e.g. ``gcloud compute tpus tpu-vm ssh NAME --worker=all
--command="python multihost_launch.py --tpu"``).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys


def train(steps: int, per_device_batch: int = 32) -> None:
    import jax
    import numpy as np
    import optax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import optax_gradhealth as gh

    k = jax.device_count()
    mesh = jax.make_mesh((k,), ("data",), axis_types=(AxisType.Auto,))
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(16, 4)).astype(np.float32) / 4, "b": np.zeros((4,), np.float32)}
    teacher = rng.normal(size=(16, 4))

    def global_array(value, spec):
        # Each process materialises only the shards of its own devices.
        return jax.make_array_from_callback(value.shape, NamedSharding(mesh, spec), lambda index: value[index])

    def loss_fn(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y).mean()

    tx = optax.chain(
        gh.cross_device("data", per_device_batch=per_device_batch, audit_first_steps=100, audit_every=500),
        gh.guard(optax.adamw(1e-2), clip=1.0),
    )

    def step(params, state, x, y):
        loss, grads = gh.local_value_and_grad(loss_fn, "data")(params, x, y)
        loss = jax.lax.pmean(loss, "data")  # the guard must see the same loss everywhere
        updates, state = tx.update(grads, state, params, loss=loss)
        return optax.apply_updates(params, updates), state, loss, gh.metrics(state, deprecated_names=False)

    train_step = jax.jit(
        jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=P()),
        donate_argnums=(0, 1),
    )
    params = jax.tree.map(lambda v: global_array(v, P()), params)
    state = jax.jit(tx.init, out_shardings=NamedSharding(mesh, P()))(params)
    for t in range(steps):
        x = rng.normal(size=(k * per_device_batch, 16)).astype(np.float32)  # same global batch on every host
        y = np.argmax(x @ teacher, -1).astype(np.int32)
        params, state, loss, metrics = train_step(params, state, global_array(x, P("data")), global_array(y, P("data")))
        if jax.process_index() == 0 and (t % 10 == 0 or t == steps - 1):
            local = {name: np.asarray(value.addressable_data(0)) for name, value in metrics.items()}
            print(
                f"step {t:3d} loss {float(loss.addressable_data(0)):.3f} "
                f"agreement {float(local['xdev/agreement']):+.3f} noise_scale {float(local['xdev/noise_scale']):7.1f} "
                f"alarms {gh.cross_device_alarms(local) or 'none'}",
                flush=True,
            )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(processes: int, devices_per_process: int, steps: int, timeout: float) -> int:
    """Starts ``processes`` copies of this script on 127.0.0.1 and waits for them."""
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
    children = [
        subprocess.Popen(
            [
                *(sys.executable, __file__, "--coordinator", f"127.0.0.1:{port}"),
                *("--num-processes", str(processes), "--process-id", str(i), "--steps", str(steps)),
            ],
            env=env,
        )
        for i in range(processes)
    ]
    try:
        # A process whose peer never joins aborts instead of raising: bound the wait.
        codes = [child.wait(timeout=timeout) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    return max(codes, key=abs)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--local", type=int, default=0, help="start this many processes on this machine")
    parser.add_argument("--devices-per-process", type=int, default=4)
    parser.add_argument("--coordinator", help="HOST:PORT of process 0")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--tpu", action="store_true", help="Cloud TPU: let JAX discover the pod")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    cluster = [args.coordinator, args.num_processes, args.process_id]
    if args.local < 0 or args.devices_per_process < 1:
        parser.error("--local and --devices-per-process must be positive")
    if not args.local and not args.tpu and all(value is None for value in cluster):
        print(
            "no --coordinator, --tpu or --local given: running the local demo, 2 processes x "
            f"{args.devices_per_process} CPU devices (--help for the cluster modes)",
            flush=True,
        )
        args.local = 2
    if args.local:
        return launch_local(args.local, args.devices_per_process, args.steps, args.timeout)
    if not args.tpu and any(value is None for value in cluster):
        parser.error("a cluster run needs all of --coordinator HOST:PORT, --num-processes N and --process-id I")
    import jax

    if args.tpu:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(
            coordinator_address=args.coordinator, num_processes=args.num_processes, process_id=args.process_id
        )
    try:
        train(args.steps)
    finally:
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
