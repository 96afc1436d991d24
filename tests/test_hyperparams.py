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
    grads[9] = grads[9] * 1e4  # a run of two spikes: a momentum reset
    grads[10] = grads[10] * 1e4
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
    assert state.guard_moments.guard_norm_window.window_log_norms.shape == (5,)
    assert state.guard_spike_steps.shape == (2,)


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
    grads[5], grads[6] = grads[5] * 1e4, grads[6] * 1e4  # a run of two spikes: a reset
    for g in grads:
        outs = [jax.jit(tx.update)({"w": jnp.asarray(g)}, s, params) for tx, s in zip((injected, plain), states)]
        np.testing.assert_array_equal(np.asarray(outs[0][0]["w"]), np.asarray(outs[1][0]["w"]))
        states = [out[1] for out in outs]
    m_injected, m_plain = gh.metrics(states[0]), gh.metrics(states[1])
    for name in m_plain:
        np.testing.assert_array_equal(np.asarray(m_injected[name]), np.asarray(m_plain[name]), err_msg=name)
    assert int(m_plain["grad/num_momentum_resets"]) == 1


def _same_updates_as_plain(injected, plain, params, grads_seq, **extra):
    """Runs both (jitted) over the same gradients: the injected transformation must give
    the plain one's updates, step for step."""
    a, b = injected.init(params), plain.init(params)
    step_a, step_b = jax.jit(injected.update), jax.jit(plain.update)
    for t, grads in enumerate(grads_seq):
        ua, a = step_a(grads, a, params, **extra)
        ub, b = step_b(grads, b, params, **extra)
        for x, y in zip(jax.tree.leaves(ua), jax.tree.leaves(ub)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, err_msg=f"step {t}")
    return a


@pytest.mark.parametrize(
    "factory, kwargs",
    [
        (gh.adaptive_grad_clip, dict(clipping=0.05, eps=1e-2)),
        (gh.clip_by_value, dict(max_abs=0.3)),
        (gh.adagc_clip, dict(relative=1.05, warmup_steps=2)),
    ],
    ids=["adaptive_grad_clip", "clip_by_value", "adagc_clip"],
)
def test_every_numeric_argument_of_the_clip_modes_may_be_injected(factory, kwargs):
    """optax.inject_hyperparams turns every numeric argument, defaults included, into a
    scalar array (traced in the update): `eps`, `max_abs`, `warmup_steps` were rejected
    as "must be a real number / an int". Expected: the plain transformation's updates."""
    params = {"w": jnp.ones((3, 4)), "b": jnp.full((4,), 0.5)}
    rng = np.random.default_rng(0)
    grads_seq = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params) for _ in range(5)]
    _same_updates_as_plain(optax.inject_hyperparams(factory)(**kwargs), factory(**kwargs), params, grads_seq)


def test_the_wrappers_numeric_arguments_may_be_injected():
    """gh.dynamic_loss_scale and gh.accumulate under inject_hyperparams: the same updates
    as built plainly; a size that shapes the state (record_step_cosine's `sketch_dim`)
    says to list it in static_args."""
    params = {"w": jnp.ones(3)}
    grads_seq = [{"w": jnp.array([0.5, -1.0, 2.0]) * (t + 1)} for t in range(6)]
    for factory, kwargs in [
        (gh.dynamic_loss_scale, dict(inner=optax.adam(0.1), init_scale=4.0, growth_interval=2)),
        (gh.accumulate, dict(inner=optax.adam(0.1), every_k=2, micro_batch_size=3)),
    ]:
        injected = optax.inject_hyperparams(factory)(**kwargs)
        state = _same_updates_as_plain(injected, factory(**kwargs), params, grads_seq)
        if factory is gh.accumulate:  # the noise-scale estimate with a traced every_k too
            plain = factory(**kwargs)
            s = plain.init(params)
            for g in grads_seq:
                _, s = plain.update(g, s, params)
            np.testing.assert_allclose(
                gh.metrics(state.inner_state)["grad/grad_sq_est"], gh.metrics(s)["grad/grad_sq_est"], rtol=1e-6
            )
    with pytest.raises(TypeError, match=r"static_args=\('sketch_dim',\)"):
        optax.inject_hyperparams(gh.record_step_cosine)(sketch_dim=16).init(params)


def test_array_hyperparameters_in_every_float_dtype_and_inf_as_an_array():
    """bfloat16 scalars were rejected ("must be a number or a real scalar array") where
    fp16 and optax took them; an infinite threshold (never clips) was accepted as a
    Python float only."""
    params = {"w": jnp.ones(3, jnp.bfloat16)}
    grads = {"w": jnp.array([3.0, 4.0, 0.0], jnp.bfloat16)}
    for clip in (jnp.bfloat16(1.0), np.float32(np.inf), jnp.float32(jnp.inf)):
        for tx in (gh.clip_by_global_norm(clip), gh.guard(optax.sgd(1.0), clip=clip)):
            updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
            want = 5.0 if np.isinf(float(clip)) else 1.0
            np.testing.assert_allclose(float(optax.tree.norm(updates)), want, rtol=1e-2)
    injected = optax.inject_hyperparams(gh.guard)(inner=optax.sgd(1.0), clip=float("inf"))
    updates, _ = jax.jit(injected.update)(grads, injected.init(params), params)
    np.testing.assert_allclose(float(optax.tree.norm(updates)), 5.0, rtol=1e-2)


def test_an_array_threshold_is_not_the_states_buffer():
    """The init state held the threshold array itself: donating the state deleted the
    user's array (a later init failed), and under inject_hyperparams one buffer was
    donated twice."""
    params = {"w": jnp.ones(3)}
    grads = jnp.array([[3.0, 4.0, 0.0], [0.0, 0.3, 0.4]])

    def donated_loop(tx):
        # A training loop carries the whole state through a scan, donated: each of its
        # buffers is the loop's to reuse.
        def body(state, g):
            return tx.update({"w": g}, state, params)[1], None

        return jax.jit(lambda state: jax.lax.scan(body, state, grads)[0], donate_argnums=0)

    clip = jnp.float32(1.0)
    for tx in (gh.guard(optax.sgd(0.1), clip=clip), gh.clip_by_global_norm(clip)):
        donated_loop(tx)(tx.init(params))
        assert not clip.is_deleted()
        donated_loop(tx)(tx.init(params))  # a second init still reads the threshold
    injected = optax.inject_hyperparams(gh.clip_by_global_norm)(max_norm=1.0)
    state = donated_loop(injected)(injected.init(params))  # was: one buffer donated twice
    np.testing.assert_allclose(float(gh.metrics(state.inner_state)["grad/clip_threshold"]), 1.0)


def test_a_float64_spike_zscore_under_x64_keeps_the_state_float32():
    """The z-score bound was not cast: a float64 `spike_zscore` (or inject_hyperparams'
    float64 default with float64 parameters) made the running norm statistics float64
    after one step, and a lax.scan over steps failed on the carry's type."""
    with jax.enable_x64(True):
        params = {"w": jnp.ones(3, jnp.float64)}
        grads = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)))
        for tx in (
            gh.guard(optax.sgd(0.1), spike_zscore=jnp.float64(6.0), spike_action="clip", warmup_steps=2),
            gh.guard(optax.sgd(0.1), spike_zscore=np.float64(6.0), spike_action="clip", warmup_steps=2),
            optax.inject_hyperparams(gh.guard)(inner=optax.sgd(0.1), warmup_steps=2),
        ):
            state = tx.init(params)

            def body(state, g, tx=tx):
                return tx.update({"w": g}, state, params)[1], None

            final, _ = jax.jit(lambda s, tx=tx, body=body: jax.lax.scan(body, s, grads))(state)
            before = [x.dtype for x in jax.tree.leaves(state)]
            assert [x.dtype for x in jax.tree.leaves(final)] == before


def test_numpy_bools_are_flags_strings_are_not():
    gh.guard(optax.sgd(0.1), check_updates=np.bool_(False), update_health=np.True_)
    with pytest.raises(TypeError, match=r"`check_updates` must be True or False, got 'False' \(type str\)"):
        gh.guard(optax.sgd(0.1), check_updates="False")
