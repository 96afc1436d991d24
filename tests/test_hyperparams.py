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
    # The guard's numeric arguments all become hyperparameters under inject_hyperparams.
    guard = optax.inject_hyperparams(gh.guard)(inner=optax.sgd(1.0), clip=_schedule)
    layer = optax.inject_hyperparams(gh.clip_by_leaf_norm)(max_norm=_schedule)
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


def test_inject_hyperparams_of_the_guard_needs_no_static_integers():
    """Every numeric argument of gh.guard may be a hyperparameter: integers become int32
    arrays (checked at init, traced in the jitted update, where the sizes they set are
    read from the state). The run equals the plain guard's, step for step, through a
    non-finite step, spikes and a momentum reset."""
    kwargs = dict(clip=2.0, spike_window=8, warmup_steps=4, reset_after=2, reset_window=10, rebaseline_after=30)
    injected = optax.inject_hyperparams(gh.guard, static_args=("inner",))(inner=optax.adam(0.1), **kwargs)
    plain = gh.guard(optax.adam(0.1), **kwargs)
    assert injected.init({"w": jnp.zeros(3)}).hyperparams["spike_window"].dtype == jnp.int32
    params = {"w": jnp.zeros(3)}
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=3).astype(np.float32) for _ in range(16)]
    grads[6] = np.array([np.nan, 1.0, 1.0], np.float32)
    grads[9] = grads[9] * 1e4  # spikes, two within reset_window: a momentum reset
    grads[11] = grads[11] * 1e4
    states = [injected.init(params), plain.init(params)]
    updates_of = [jax.jit(injected.update), jax.jit(plain.update)]
    resets = 0
    for g in grads:
        outs = [update({"w": jnp.asarray(g)}, state, params) for update, state in zip(updates_of, states)]
        np.testing.assert_array_equal(np.asarray(outs[0][0]["w"]), np.asarray(outs[1][0]["w"]))
        states = [out[1] for out in outs]
        m_injected, m_plain = gh.metrics(states[0]), gh.metrics(states[1])
        assert m_injected.keys() == m_plain.keys()
        for name in m_plain:
            np.testing.assert_array_equal(np.asarray(m_injected[name]), np.asarray(m_plain[name]), err_msg=name)
        resets = int(m_plain["grad/num_momentum_resets"])
    assert resets == 1 and int(gh.metrics(states[1])["grad/num_skipped"]) == 3


def test_integer_arguments_as_arrays_are_checked_when_concrete():
    with pytest.raises(ValueError, match=r"spike_window.*>= 1, got 0"):
        gh.guard(optax.sgd(0.1), spike_window=jnp.int32(0))
    with pytest.raises(TypeError, match=r"reset_after.*integer scalar array.*float32"):
        gh.guard(optax.sgd(0.1), reset_after=jnp.float32(3.0))
    with pytest.raises(TypeError, match=r"warmup_steps.*shape \(2,\)"):
        gh.guard(optax.sgd(0.1), warmup_steps=jnp.ones(2, jnp.int32))
    tx = gh.guard(optax.sgd(0.1), spike_window=np.int64(5), reset_after=jnp.int32(2))
    state = tx.init({"w": jnp.zeros(2)})
    assert state.guard_moments.guard_norm_window.log_norms.shape == (5,) and state.guard_spike_steps.shape == (2,)


def test_a_guard_built_inside_jit_from_traced_sizes_says_what_is_missing():
    @jax.jit
    def init(window):
        return gh.guard(optax.sgd(0.1), spike_window=window).init({"w": jnp.zeros(2)})

    with pytest.raises(ValueError, match=r"spike_window.*traced.*concrete int"):
        init(jnp.int32(8))


def test_a_guard_initialised_inside_jit_with_a_traced_reset_after_says_so_in_full():
    """The reset ring's length comes from ``reset_after``: traced at init, the error
    names the argument and the fix, from its first word to its last."""

    @jax.jit
    def init(reset_after):
        return gh.guard(optax.sgd(0.1), reset_after=reset_after).init({"w": jnp.zeros(2)})

    expected = (
        "gh.guard: `reset_after` is a traced value, so the reset ring's size is not known: build the guard "
        "(its init) with a concrete int, e.g. outside jit."
    )
    with pytest.raises(ValueError) as raised:
        init(jnp.int32(3))
    assert str(raised.value) == expected


@pytest.mark.parametrize("static", ["spike_window", "reset_after"])
def test_one_size_static_and_the_other_injected_runs_like_the_plain_guard(static):
    """The two sizes come from different places when only one is a hyperparameter: the
    static one from the arguments, the traced one from the state's buffers."""
    kwargs = dict(spike_window=6, warmup_steps=3, reset_after=2, reset_window=10)
    injected = optax.inject_hyperparams(gh.guard, static_args=("inner", static))(inner=optax.adam(0.1), **kwargs)
    plain = gh.guard(optax.adam(0.1), **kwargs)
    params = {"w": jnp.zeros(3)}
    states = [injected.init(params), plain.init(params)]
    assert isinstance(states[0].hyperparams.get("spike_window", 6), int) == (static == "spike_window")
    rng = np.random.default_rng(1)
    grads = [rng.normal(size=3).astype(np.float32) for _ in range(10)]
    grads[5], grads[7] = grads[5] * 1e4, grads[7] * 1e4  # two spikes within reset_window: a reset
    for g in grads:
        outs = [jax.jit(tx.update)({"w": jnp.asarray(g)}, s, params) for tx, s in zip((injected, plain), states)]
        np.testing.assert_array_equal(np.asarray(outs[0][0]["w"]), np.asarray(outs[1][0]["w"]))
        states = [out[1] for out in outs]
    m_injected, m_plain = gh.metrics(states[0]), gh.metrics(states[1])
    for name in m_plain:
        np.testing.assert_array_equal(np.asarray(m_injected[name]), np.asarray(m_plain[name]), err_msg=name)
    assert int(m_plain["grad/num_momentum_resets"]) == 1
