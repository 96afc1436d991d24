"""Rollback with orbax-checkpoint: when ``gh.guard`` recommends a rollback
(``grad/rollback_recommended``), the loop restores the last healthy checkpoint and moves on.

    python examples/rollback_orbax.py --steps 200 --ckpt /tmp/gh_ckpt

``--ckpt`` must be a new or empty folder: the example refuses one that holds anything
(an earlier run's checkpoints would be restored in place of this run's).

The run is a small regression (an MLP in plain JAX + optax) whose data depend only on
the step number, so that a resumed run sees exactly the batches the original saw. A
stretch of broken batches (NaN inputs, ``--bad-from`` for ``--bad-steps`` steps) makes
the guard skip them and, after ``rollback_after_nonfinite`` in a row, raise its sticky
rollback recommendation. The loop then restores the last healthy checkpoint and
continues with the next batch. A checkpoint is saved every ``save_every`` steps when no
step since the previous save step was skipped, and the one saved before it then counts
as healthy (a later interval without a skip followed it: not necessarily the next one,
since a one-off bad batch that the guard skipped did no damage; damage that keeps the
guard skipping until the rollback never lets it count). The newest checkpoint is not
restored: an update that damages the parameters without being skipped (a learning-rate
spike: its gradient is normal) shows only in the steps after it. Before the first
healthy checkpoint a rollback restores the state the run started from
(``--bad-from 0``).

A recommendation that comes back before a new healthy checkpoint (none since the
restore) means that restoring did not remove its cause: a lasting change of the
gradient's scale (new data in other units, unfrozen layers, a loss weight) or bad data
that goes on. Restoring again would loop for ever, so the loop does not restore: it calls
``gh.rebaseline(opt_state)`` (the guard accepts the new level and clears the
recommendation), says so and trains on. A change made on purpose is best announced
with ``gh.rebaseline`` at its step, before any recommendation.

What is checkpointed is the whole optimizer state, guard included: its running
statistics, counters and the inner moments round-trip through orbax, so a run resumed
from a checkpoint continues bit-identically (see ``tests/test_flax.py``).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import optax_gradhealth as gh

IN, HIDDEN = 8, 32


def init_params(seed: int = 0) -> dict[str, Any]:
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "hidden": {"kernel": jax.random.normal(k1, (IN, HIDDEN)) / np.sqrt(IN), "bias": jnp.zeros(HIDDEN)},
        "out": {"kernel": jax.random.normal(k2, (HIDDEN, 1)) / np.sqrt(HIDDEN), "bias": jnp.zeros(1)},
    }


@functools.lru_cache(maxsize=1)  # one object, so that make_step's jit compiles once per process
def make_optimizer() -> optax.GradientTransformationExtraArgs:
    return gh.guard(optax.adam(1e-2), clip=gh.ZScoreClip(), warmup_steps=10, rollback_after_nonfinite=5)


def batch(step: int, seed: int = 0, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The batch of ``step``: a function of (seed, step) only, so resumed runs replay it."""
    rng = np.random.default_rng([seed, step])
    x = rng.normal(size=(size, IN)).astype(np.float32)
    y = np.sin(x.sum(axis=1, keepdims=True)).astype(np.float32)
    return x, y


def loss_fn(params, x, y):
    h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    return jnp.mean((h @ params["out"]["kernel"] + params["out"]["bias"] - y) ** 2)


@functools.lru_cache(maxsize=4)
def make_step(tx):
    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        return optax.apply_updates(params, updates), opt_state, loss, gh.metrics(opt_state, deprecated_names=False)

    return step


def checkpoint_manager(directory: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(directory), options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    )


def refuse_non_empty(directory: str) -> None:
    """Raises ``ValueError`` if ``directory`` exists and holds anything.

    A run must start with its own checkpoint folder: orbax's ``CheckpointManager.save``
    skips (returns False) a step that is not newer than the newest one already there, so
    in a folder of an earlier, longer run nothing would be saved and a rollback would
    restore that other run's newest checkpoint.
    """
    entries = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    if entries:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ValueError(
            f"checkpoint folder {os.path.abspath(directory)!r} is not empty (it holds {shown}): "
            "a rollback would restore another run's checkpoints. Pass a new folder to --ckpt, "
            "or delete this one."
        )


def save(manager: ocp.CheckpointManager, step: int, params, opt_state) -> None:
    """Saves ``{'params', 'opt_state'}`` at ``step``; raises if orbax did not save it."""
    if not manager.save(step, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state})):
        raise RuntimeError(
            f"orbax did not save step {step} in {manager.directory} (newest step there: "
            f"{manager.latest_step()}); a save is skipped when the step is not newer than the newest."
        )
    manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, step: int | None, like_params, like_opt_state):
    """Restores ``{'params', 'opt_state'}`` of ``step`` (default: the newest) into the
    structure of ``like_*`` (NamedTuple states included)."""
    step = manager.latest_step() if step is None else step
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": like_params, "opt_state": like_opt_state})
    restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    return restored["params"], restored["opt_state"], step


def train(
    steps: int,
    ckpt_dir: str,
    *,
    seed: int = 0,
    save_every: int = 20,
    bad_from: int | None = None,
    bad_steps: int = 0,
    start: int = 0,
    state: tuple[Any, Any] | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Runs steps ``start`` .. ``steps - 1``; saves a checkpoint every ``save_every``
    steps after an interval without a skipped step, which makes the previous one healthy;
    when the guard recommends a rollback, restores the last healthy checkpoint (the state
    the run started from when there is none yet) and deletes the newer one. When the
    recommendation comes back before a new healthy checkpoint, the cause outlasted the
    restore: the loop re-baselines the guard (``gh.rebaseline``) instead of restoring
    again. ``ckpt_dir`` must be new or empty (:func:`refuse_non_empty`).

    Returns the final ``params``, ``opt_state``, the ``rollbacks`` as
    ``(step, restored_step)`` pairs (``restored_step`` None: the starting state), the
    steps where it re-baselined instead (``rebaselines``), the ``saved`` steps and the
    per-step ``rollback`` flags the loop saw.
    """
    refuse_non_empty(ckpt_dir)
    tx = make_optimizer()
    params, opt_state = state if state is not None else (init_params(seed), None)
    if opt_state is None:
        opt_state = tx.init(params)
    step_fn = make_step(tx)
    manager = checkpoint_manager(ckpt_dir)
    rollbacks, rebaselines, saved, flags = [], [], [], []
    num_skipped = lambda state: int(gh.metrics(state, deprecated_names=False)["grad/num_skipped"])
    # Before the first healthy checkpoint, a rollback goes back to where the run started.
    start_state, healthy, candidate = (params, opt_state), None, None
    restored_healthy = False  # a rollback went back to `healthy`, and no newer healthy checkpoint since
    skipped_at_save = num_skipped(opt_state)
    for step in range(start, steps):
        x, y = batch(step, seed)
        if bad_from is not None and bad_from <= step < bad_from + bad_steps:
            x = np.full_like(x, np.nan)
        params, opt_state, loss, metrics = step_fn(params, opt_state, x, y)
        rollback = bool(metrics["grad/rollback_recommended"])  # one scalar fetch; check less often in big runs
        flags.append(rollback)
        if rollback and restored_healthy:
            # Back before a new healthy checkpoint: restoring did not remove the cause (a
            # lasting change of scale, or bad data that goes on) and would loop for ever.
            # Accept the new level instead: the guard judges the next steps afresh.
            opt_state = gh.rebaseline(opt_state)
            rebaselines.append(step)
            if verbose:
                print(
                    f"step {step}: rollback recommended again before a new healthy checkpoint -> "
                    "the cause persists; re-baselined the guard (gh.rebaseline) instead of restoring"
                )
        elif rollback:
            if healthy is None:
                params, opt_state = start_state
            else:
                params, opt_state, _ = restore(manager, healthy, params, opt_state)
            rollbacks.append((step, healthy))
            if candidate is not None:  # saved after the healthy state: not to be trusted
                manager.delete(candidate)
            candidate, skipped_at_save, restored_healthy = None, num_skipped(opt_state), True
            if verbose:
                restored = f"checkpoint {healthy}" if healthy is not None else "the starting state"
                print(f"step {step}: rollback recommended -> restored {restored}")
        elif step % save_every == 0:
            skipped = int(metrics["grad/num_skipped"])
            if skipped == skipped_at_save:  # no skip since the last save step
                if candidate is not None:  # a clean interval followed it: a new healthy checkpoint
                    healthy, restored_healthy = candidate, False
                save(manager, step, params, opt_state)
                saved.append(step)
                candidate = step
            skipped_at_save = skipped
        if verbose and step % 50 == 0:
            print(f"step {step:4d}  loss {float(loss):.4f}  norm {float(metrics['grad/norm']):.4f}")
    manager.close()
    return {
        "params": params,
        "opt_state": opt_state,
        "rollbacks": rollbacks,
        "rebaselines": rebaselines,
        "saved": saved,
        "flags": flags,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--ckpt", default="checkpoints", help="checkpoint folder (new or empty)")
    parser.add_argument("--bad-from", type=int, default=90, help="first broken batch")
    parser.add_argument("--bad-steps", type=int, default=8, help="broken batches in a row")
    args = parser.parse_args(argv)
    try:
        refuse_non_empty(args.ckpt)
    except ValueError as error:
        parser.error(str(error))  # exits with status 2 before any training
    result = train(args.steps, args.ckpt, bad_from=args.bad_from, bad_steps=args.bad_steps, verbose=True)
    print(f"checkpoints saved at {result['saved']}; rollbacks (step, restored) {result['rollbacks']}")
    if result["rebaselines"]:
        print(f"re-baselined instead of restoring again at steps {result['rebaselines']}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
