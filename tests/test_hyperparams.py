"""Array-like hyperparameters, as optax's own transformations take them: a clip threshold
scheduled by ``optax.inject_hyperparams`` (Python numbers are still validated when the
transformation is built)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gradhealth as gh


def _schedule(count):
    return 4.0 - 1.0 * jnp.minimum(count, 3)  # 4, 3, 2, 1, 1, ...


@pytest.mark.parametrize("jit", [True, False])
def test_scheduled_clip_threshold_of_clip_by_global_norm(jit):
    tx = optax.inject_hyperparams(gh.clip_by_global_norm)(max_norm=_schedule)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    grads = {"w": jnp.array([6.0, 8.0])}  # norm 10: clipped every step
    for step in range(5):
        updates, state = update(grads, state, params)
        expected = 4.0 - min(step, 3)
        np.testing.assert_allclose(np.linalg.norm(np.asarray(updates["w"], np.float64)), expected, rtol=1e-6)
        np.testing.assert_allclose(gh.metrics(state)["grad/clip_threshold"], expected, rtol=1e-6)
        assert bool(gh.metrics(state)["grad/clipped"])


def test_scheduled_threshold_of_the_guard_clip_and_the_leaf_clips():
    grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.0, 0.5])}
    params = jax.tree.map(jnp.ones_like, grads)
    # The guard's numeric arguments all become hyperparameters under inject_hyperparams;
    # the ones that size its buffers (and the others it checks as ints) stay static.
    static = (
        "inner",
        "spike_window",
        "warmup_steps",
        "reset_after",
        "reset_window",
        "rebaseline_after",
        "rollback_after_nonfinite",
        "rollback_after_spikes",
        "check_updates",
    )
    guard = optax.inject_hyperparams(gh.guard, static_args=static)(inner=optax.sgd(1.0), clip=_schedule)
    layer = optax.inject_hyperparams(gh.clip_by_layer_norm)(max_norm=_schedule)
    for tx, norm_of in [
        (guard, lambda u: np.linalg.norm(np.concatenate([np.asarray(x) for x in jax.tree.leaves(u)]))),
        (layer, lambda u: np.linalg.norm(np.asarray(u["a"]))),
    ]:
        state = tx.init(params)
        update = jax.jit(tx.update)
        for step in range(4):
            updates, state = update(grads, state, params)
            np.testing.assert_allclose(norm_of(updates), 4.0 - min(step, 3), rtol=1e-6)


def test_python_numbers_are_still_checked_and_arrays_must_be_scalars():
    with pytest.raises(ValueError, match=r"max_norm.*positive"):
        gh.clip_by_global_norm(-1.0)
    with pytest.raises(ValueError, match=r"max_norm.*scalar array.*shape \(2,\)"):
        gh.clip_by_global_norm(jnp.ones(2))
    with pytest.raises(ValueError, match=r"spike_threshold.*> 1"):
        gh.guard(optax.sgd(0.1), spike_threshold=0.5)
    gh.guard(optax.sgd(0.1), clip=jnp.float32(1.0), spike_threshold=jnp.float32(5.0))  # accepted as they are
