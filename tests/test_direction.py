"""gh.record_step_cosine: the sketched cosine between consecutive gradients, against the
exact cosine computed in numpy float64, alone and inside the guard."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gradhealth as gh


def _exact_cosine(x, y):
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def _tree(v):
    return {"a": jnp.asarray(v[:30000].reshape(300, 100)), "b": jnp.asarray(v[30000:])}


@pytest.mark.parametrize("offset", [0.0, 0.3], ids=["centred", "common-offset"])
def test_sketched_cosine_is_close_to_the_exact_cosine(offset):
    """Within a few 1/sqrt(dim) of the exact cosine, also for gradients sharing a mean
    (where a sketch without random signs would be biased towards 1)."""
    rng = np.random.default_rng(1)
    errors = []
    for seed in range(12):
        x = rng.standard_normal(40000) + offset
        y = 0.6 * x + rng.standard_normal(40000) + offset * rng.uniform(-1, 1)
        tx = gh.record_step_cosine(sketch_dim=1024, seed=seed)
        state = tx.init(_tree(x))
        _, state = tx.update(_tree(x.astype(np.float32)), state)
        _, state = tx.update(_tree(y.astype(np.float32)), state)
        errors.append(float(state.step_cosine) - _exact_cosine(x, y))
    errors = np.array(errors)
    assert np.sqrt(np.mean(errors**2)) < 0.05 and np.max(np.abs(errors)) < 0.12, errors
    assert abs(np.mean(errors)) < 0.03, errors  # no bias


def test_inside_the_guard_the_reference_is_the_last_accepted_gradient():
    rng = np.random.default_rng(2)
    g1 = rng.standard_normal(5000).astype(np.float32)
    spike = 1e4 * rng.standard_normal(5000).astype(np.float32)
    tx = gh.guard(optax.chain(gh.record_step_cosine(), optax.sgd(0.0)), warmup_steps=3)
    params = {"w": jnp.zeros(5000)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    seen = []
    for g in [g1, 1.01 * g1, 0.99 * g1, 1.02 * g1, np.full(5000, np.nan, np.float32), spike, -g1]:
        _, state = update({"w": jnp.asarray(g)}, state, params)
        m = gh.metrics(state)
        seen.append((float(m["grad/step_cosine"]), bool(m["grad/skipped"])))
    assert seen[0] == (0.0, False) and all(c == pytest.approx(1.0, abs=1e-5) for c, _ in seen[1:4])
    assert seen[4][1] and seen[5][1]  # the NaN step and the spike were skipped ...
    assert seen[4][0] == seen[3][0] and seen[5][0] == seen[3][0]  # ... and kept the last value
    assert seen[6] == (pytest.approx(-1.0, abs=1e-5), False)  # against g1's family, not the spike


def test_a_zero_or_nonfinite_gradient_gives_zero_and_keeps_the_reference():
    tx = gh.record_step_cosine(sketch_dim=64)
    g = jnp.arange(1.0, 101.0)
    state = tx.init({"w": g})
    for grads in (g, jnp.zeros(100), g.at[3].set(jnp.inf), g):
        _, state = tx.update({"w": grads}, state)
    assert float(state.step_cosine) == pytest.approx(1.0, abs=1e-6)  # compared with the first g
    _, zero = tx.update({"w": jnp.zeros(100)}, state)
    assert float(zero.step_cosine) == 0.0 and bool(jnp.all(jnp.isfinite(zero.step_sketch)))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="`sketch_dim`"):
        gh.record_step_cosine(sketch_dim=1)
    with pytest.raises(TypeError, match="`seed`"):
        gh.record_step_cosine(seed=0.5)


@pytest.mark.parametrize(
    ("first", "second"), [(1e18, 1e18), (1e20, 1.0), (1.0, 1e20), (1e-10, 1e-25), (1e-21, 1e-21)], ids=str
)
def test_the_cosine_does_not_depend_on_the_gradients_scale(first, second):
    """A gradient and a scaled copy point the same way (exact cosine 1, or -1 negated),
    at any finite scale: a norm whose square leaves float32's range (above ~1.8e19,
    below ~1e-19) still has a direction, and becomes the reference."""
    g = jnp.sin(jnp.arange(4096.0) * 0.37)
    tx = gh.record_step_cosine()
    state = tx.init({"w": g})
    for grads, expected in ((first * g, 0.0), (second * g, 1.0), (-second * g, -1.0)):
        _, state = jax.jit(tx.update)({"w": grads}, state)
        np.testing.assert_allclose(float(gh.metrics(state)["grad/step_cosine"]), expected, atol=1e-5)
        assert bool(state.step_has_reference)


def test_a_python_float_leaf_is_accepted():
    """A Python float leaf raised AttributeError outside jit (x.reshape). Reference: a
    one-element gradient's direction is its sign, so consecutive cosines are exactly
    +1 or -1."""
    tx = gh.record_step_cosine(sketch_dim=8)
    state = tx.init({"s": 0.0})
    cosines = []
    for value in (2.0, 3.0, -0.5):
        updates, state = tx.update({"s": value}, state)
        assert updates["s"] == value
        cosines.append(float(state.step_cosine))
    np.testing.assert_allclose(cosines, [0.0, 1.0, -1.0], atol=1e-6)


@pytest.mark.parametrize("seed", [2**31, 2**64 + 7])
def test_a_seed_beyond_int32_is_a_seed(seed):
    """Only numpy's default_rng reads the seed (as cross_device's sketch_seed): no int32
    limit. The sketch is linear, so g then 2g then -g have cosines 1 and -1 whatever
    the hashes."""
    tx = gh.record_step_cosine(sketch_dim=64, seed=seed)
    g = jnp.asarray(np.random.default_rng(0).normal(size=500), jnp.float32)
    state = tx.init({"w": g})
    cosines = []
    for grads in (g, 2 * g, -g):
        _, state = tx.update({"w": grads}, state)
        cosines.append(float(state.step_cosine))
    np.testing.assert_allclose(cosines[1:], [1.0, -1.0], atol=1e-6)
    with pytest.raises(ValueError, match="`seed` must be an int >= 0"):
        gh.record_step_cosine(seed=-1)


def test_a_state_of_another_sketch_dim_is_refused():
    """flax.serialization restores a record_step_cosine(64) state into a (32) target
    without checking shapes; the update then failed with a bare broadcasting error. Now a
    ValueError names the field, both sketch sizes and the remedy."""
    from flax import serialization

    params = {"w": jnp.ones(5)}
    grads = {"w": jnp.arange(5.0)}
    old, new = gh.record_step_cosine(64), gh.record_step_cosine(32)
    _, state = old.update(grads, old.init(params))
    restored = serialization.from_bytes(new.init(params), serialization.to_bytes(state))
    for update in (new.update, jax.jit(new.update)):
        with pytest.raises(ValueError, match=r"(?s)step_sketch.*sketch_dim=64.*sketch_dim=32.*Restore into `tx.init"):
            update(grads, restored)
    # The same sketch size runs on: the same gradient again has cosine 1.
    same = serialization.from_bytes(old.init(params), serialization.to_bytes(state))
    _, after = old.update(grads, same)
    np.testing.assert_allclose(float(after.step_cosine), _exact_cosine(grads["w"], grads["w"]), atol=1e-6)
