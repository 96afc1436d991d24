"""The guard's promises on the paths where the gradient is not the culprit, and the
behaviours a plausible wrong implementation would get wrong (issue 17):

- the optimizer itself makes the NaN/Inf from a finite gradient (bf16 hyperparameters,
  an fp16 moment overflowing, an infinite learning rate): skipped and counted;
- a non-finite ``value=`` (Polyak step sizes, reduce_on_plateau) is treated like ``loss``;
- ``optax.monitor`` inside the guard is rejected with a clear error; ``optax.lookahead``
  works;
- the momentum-reset window, the steps that feed an adaptive clip policy, and the leaf
  index recorded for the first non-finite leaf each decide an outcome here.

Every expected value is written out (numpy, or the bare optax optimizer), never read
from the state under test.
"""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gradhealth as gh


def _donated_update(tx):
    def step(params, state, grads, **extra):
        updates, state = tx.update(grads, state, params, **extra)
        return updates, state

    return jax.jit(step, donate_argnums=(1,))


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_same_state(a, b):
    chex.assert_trees_all_equal(_host(a), _host(b))


# --- the optimizer's own NaN ------------------------------------------------------------


def _bf16_b2_rounds_to_one():
    # inject_hyperparams keeps b2 in the params' dtype: bf16(0.999) == 1.0, so Adam's
    # bias correction 1 - b2**t is 0 and the first update is 0 / 0.
    params = {"w": jnp.ones(4, jnp.bfloat16)}
    return optax.inject_hyperparams(optax.adam)(1e-3), params, {"w": jnp.ones(4, jnp.bfloat16)}


def _fp16_second_moment_overflows():
    # 300**2 = 90000 > 65504: nu = inf in float16, the update is 0 and the moment Inf.
    params = {"w": jnp.zeros(3, jnp.float16)}
    return optax.adam(1e-3), params, {"w": jnp.array([300.0, 1.0, -2.0], jnp.float16)}


def _infinite_learning_rate():
    params = {"w": jnp.zeros(3)}
    return optax.adam(lambda count: jnp.inf), params, {"w": jnp.array([1.0, -2.0, 0.5])}


OWN_NANS = {
    "bf16-b2-rounds-to-1": _bf16_b2_rounds_to_one,
    "fp16-moment-overflow": _fp16_second_moment_overflows,
    "infinite-learning-rate": _infinite_learning_rate,
}


@pytest.mark.parametrize("case", list(OWN_NANS))
def test_bare_optimizer_makes_a_nonfinite_update_or_state_from_a_finite_gradient(case):
    """The premise of the next test: bare optax writes a NaN/Inf on these inputs."""
    inner, params, grads = OWN_NANS[case]()
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    updates, state = inner.update(grads, inner.init(params), params)
    leaves = [x for x in jax.tree.leaves((updates, state)) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert not all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


@pytest.mark.parametrize("case", list(OWN_NANS))
@pytest.mark.parametrize("jit", [True, False])
def test_guard_skips_an_update_the_optimizer_made_nonfinite(case, jit):
    inner, params, grads = OWN_NANS[case]()
    tx = gh.guard(inner)
    state = tx.init(params)
    before = _host(state.guard_inner_state)
    update = _donated_update(tx) if jit else (lambda p, s, g, **kw: tx.update(g, s, p, **kw))
    for step in range(3):
        updates, state = update(params, state, grads, loss=jnp.float32(1.0))
        for u in jax.tree.leaves(updates):
            np.testing.assert_array_equal(np.asarray(u, np.float32), 0.0)
        chex.assert_trees_all_equal(_host(state.guard_inner_state), before)
        m = gh.metrics(state)
        assert bool(m["grad/finite"]) and bool(m["grad/skipped"])
        assert int(m["grad/num_nonfinite_updates"]) == step + 1
        assert int(m["grad/num_nonfinite"]) == 0
        assert int(m["grad/num_skipped"]) == step + 1
        assert int(m["grad/consecutive_nonfinite"]) == step + 1
        assert float(m["grad/norm_clipped"]) == 0.0
        # Nothing was accepted: the spike window and the running statistics are empty.
        assert int(state.guard_moments.guard_num_accepted) == 0
        assert int(state.guard_moments.guard_norm_window.window_count) == 0


def test_a_later_nonfinite_update_keeps_the_state_of_the_last_applied_step():
    """A learning rate that becomes infinite at the third step: two steps as bare adam,
    then skips that keep exactly the state after step two; rollback after 10 in a row."""
    schedule = lambda count: jnp.where(count >= 2, jnp.inf, 0.1)
    tx = gh.guard(optax.adam(schedule), rollback_after_nonfinite=10)
    bare = optax.adam(schedule)
    params = {"w": jnp.zeros(3)}
    grads = {"w": jnp.array([1.0, -2.0, 0.5])}
    state, bare_state = tx.init(params), bare.init(params)
    update = _donated_update(tx)
    for _ in range(2):
        updates, state = update(params, state, grads)
        bare_updates, bare_state = bare.update(grads, bare_state, params)
        np.testing.assert_allclose(updates["w"], bare_updates["w"], rtol=1e-6)
    kept = _host(state.guard_inner_state)
    chex.assert_trees_all_close(kept, _host(bare_state), rtol=1e-6)
    for step in range(10):
        updates, state = update(params, state, grads)
        np.testing.assert_array_equal(updates["w"], 0.0)
        chex.assert_trees_all_equal(_host(state.guard_inner_state), kept)
        assert bool(gh.metrics(state)["grad/rollback_recommended"]) == (step == 9)
    m = gh.metrics(state)
    assert int(m["grad/num_nonfinite_updates"]) == 10 and int(m["grad/num_steps"]) == 12


def test_nonfinite_update_on_a_reset_step_keeps_the_reset_state():
    """With 'record' a reset step is applied to the re-initialised optimizer; when that
    update overflows (an fp16 moment) the step is skipped and keeps the state the inner
    update was given: the fresh one, not the pre-reset moments."""
    inner = optax.adam(1e-3)
    tx = gh.guard(inner, spike_action="record", warmup_steps=3, reset_after=1, spike_threshold=2.0, spike_zscore=None)
    params = {"w": jnp.zeros(3, jnp.float16)}
    state = tx.init(params)
    for _ in range(5):
        _, state = tx.update({"w": jnp.array([0.6, 0.8, 0.1], jnp.float16)}, state, params)
    assert int(state.guard_inner_state[0].count) == 5
    updates, state = tx.update({"w": jnp.array([300.0, 1.0, 1.0], jnp.float16)}, state, params)
    m = gh.metrics(state)
    assert bool(m["grad/spiked"]) and bool(m["grad/momentum_reset"]) and bool(m["grad/skipped"])
    assert int(m["grad/num_nonfinite_updates"]) == 1
    np.testing.assert_array_equal(np.asarray(updates["w"], np.float32), 0.0)
    _assert_same_state(state.guard_inner_state, inner.init(params))


def test_check_updates_false_lets_the_optimizers_nan_through():
    """The switch does what it says: without the check, bf16 b2 = 1 writes NaN."""
    inner, params, grads = _bf16_b2_rounds_to_one()
    tx = gh.guard(inner, check_updates=False)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    assert bool(jnp.any(jnp.isnan(updates["w"])))
    assert not bool(gh.metrics(state)["grad/skipped"])
    with pytest.raises(TypeError, match=r"check_updates.*True or False.*'yes'"):
        gh.guard(inner, check_updates="yes")


def test_finite_updates_are_bit_for_bit_those_of_the_bare_optimizer_with_the_check_on():
    """The check reads the inner outputs; it must not change them (eagerly, where no
    fusion can differ, the guard's update is the bare update exactly)."""
    inner = optax.adamw(1e-2, weight_decay=1e-3)
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones(4)}
    rng = np.random.default_rng(0)
    tx = gh.guard(inner)
    state, bare_state = tx.init(params), inner.init(params)
    for _ in range(5):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 0.1, jnp.float32), params)
        updates, state = tx.update(grads, state, params)
        bare_updates, bare_state = inner.update(grads, bare_state, params)
        chex.assert_trees_all_equal(updates, bare_updates)
        chex.assert_trees_all_equal(state.guard_inner_state, bare_state)
    assert int(gh.metrics(state)["grad/num_nonfinite_updates"]) == 0


def test_update_check_holds_its_flags_in_one_byte_per_element_of_a_leaf_shape():
    """Where XLA:CPU does not fuse a reduction with its operand, the check's flags are
    materialised: one bool per element of each leaf shape (the flags of Adam's update,
    mu and nu for every parameter of that shape are and-ed first), never a float copy.
    (Update health off: with it, the check is part of its reduction; see
    tests/test_update_health.py.)"""
    params = {f"w{i}": jnp.ones((256, 128), jnp.float32) for i in range(4)} | {"b": jnp.ones((128,))}

    def temp_bytes(check):
        tx = gh.guard(optax.adamw(1e-3), clip=1.0, check_updates=check, update_health=False)

        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    without, with_check = temp_bytes(False), temp_bytes(True)
    assert without < 16 * 1024
    assert with_check - without <= 256 * 128 + 128 + 1024  # one bool per element of each shape


# --- value= -----------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [True, False])
def test_nonfinite_value_is_skipped_like_a_nonfinite_loss(jit):
    """polyak_sgd divides by the gradient's squared norm and reads `value`: a NaN value
    with a finite gradient used to apply a NaN update with grad/skipped False."""
    tx = gh.guard(optax.polyak_sgd(max_learning_rate=1.0))
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.array([1.0, 2.0, 2.0])}  # |g|^2 = 9
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    updates, state = update(grads, state, params, value=jnp.float32(4.5))
    # Polyak step size value / |g|^2 = 0.5 (under the max 1.0), written out.
    np.testing.assert_allclose(updates["w"], -0.5 * np.array([1.0, 2.0, 2.0]), rtol=1e-6)
    for bad in (jnp.nan, jnp.inf):
        updates, state = update(grads, state, params, value=jnp.float32(bad))
        np.testing.assert_array_equal(updates["w"], 0.0)
        m = gh.metrics(state)
        assert bool(m["grad/skipped"]) and not bool(m["grad/finite"])
    assert int(m["grad/num_nonfinite"]) == 2 and int(m["grad/num_nonfinite_updates"]) == 0
    with pytest.raises(ValueError, match="`value` must be a scalar"):
        tx.update(grads, state, params, value=jnp.ones(2))


def test_nonfinite_value_never_reaches_reduce_on_plateau_state():
    inner = optax.chain(optax.sgd(0.1), optax.contrib.reduce_on_plateau(patience=2))
    tx = gh.guard(inner)
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.array([0.1, 0.2, 0.3])}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for v in (1.0, 0.9, 0.8):
        _, state = update(grads, state, params, value=jnp.float32(v))
    before = _host(state.guard_inner_state)
    updates, state = update(grads, state, params, value=jnp.float32(jnp.nan))
    chex.assert_trees_all_equal(_host(state.guard_inner_state), before)
    chex.assert_tree_all_finite(state.guard_inner_state)
    np.testing.assert_array_equal(updates["w"], 0.0)


@pytest.mark.parametrize("update_health", [True, False])
def test_a_sentinel_kept_since_init_does_not_skip_the_step(update_health):
    """reduce_on_plateau(accumulation_size=3) keeps its best value at +inf (init's
    sentinel) until three values are in. The update check must not read that as the
    optimizer making an Inf: the step would be skipped, its count never advance, and
    every later step skipped too. Expected: the bare optax chain, step for step."""
    inner = optax.chain(
        optax.sgd(0.1), optax.contrib.reduce_on_plateau(factor=0.5, patience=1, cooldown=0, accumulation_size=3)
    )
    tx = gh.guard(inner, clip=None, spike_zscore=None, update_health=update_health)
    grads = {"w": jnp.array([0.1, -0.2, 0.3], jnp.float32)}
    params = want = {"w": jnp.ones(3, jnp.float32)}
    state, want_state = tx.init(params), inner.init(params)
    update, reference = jax.jit(tx.update), jax.jit(inner.update)
    values = [3.0, 2.0, 1.0] + [1.5] * 9  # a plateau after the first window: the scale halves
    for k, v in enumerate(values):
        updates, state = update(grads, state, params, value=jnp.float32(v))
        want_updates, want_state = reference(grads, want_state, want, value=jnp.float32(v))
        params, want = optax.apply_updates(params, updates), optax.apply_updates(want, want_updates)
        np.testing.assert_allclose(params["w"], want["w"], rtol=1e-6, err_msg=f"step {k}")
    m = gh.metrics(state)
    assert int(m["grad/num_nonfinite_updates"]) == 0 and int(m["grad/num_skipped"]) == 0
    assert float(want_state[1].scale) < 1.0  # the run reached a plateau: the comparison covered one


def test_a_state_element_that_becomes_nonfinite_is_still_caught_next_to_a_sentinel():
    """The sentinel exception is per element: an element that was finite and becomes
    Inf skips the step, though another element of the same leaf holds an Inf sentinel."""

    def init(params):
        return {"m": jnp.array([jnp.inf, 0.0], jnp.float32)}

    def update_fn(updates, state, params=None):
        # Element 1 overflows float32 once the gradient is large; element 0 stays +inf.
        return updates, {"m": state["m"] * jnp.float32(1e30) + jnp.sum(updates["w"])}

    inner = optax.GradientTransformation(init, update_fn)
    for update_health in (True, False):
        tx = gh.guard(inner, clip=None, spike_zscore=None, update_health=update_health)
        params = {"w": jnp.ones(2, jnp.float32)}
        state = tx.init(params)
        update = jax.jit(tx.update)
        _, state = update({"w": jnp.full(2, 1e-3, jnp.float32)}, state, params)
        assert int(gh.metrics(state)["grad/num_nonfinite_updates"]) == 0
        m_after_first = float(state.guard_inner_state["m"][1])
        assert m_after_first == np.float32(2e-3)
        updates, state = update({"w": jnp.full(2, 1e-3, jnp.float32)}, state, params)  # 2e-3 * 1e30: finite
        assert int(gh.metrics(state)["grad/num_nonfinite_updates"]) == 0
        updates, state = update({"w": jnp.full(2, 1e-3, jnp.float32)}, state, params)  # 2e27 * 1e30: Inf
        assert int(gh.metrics(state)["grad/num_nonfinite_updates"]) == 1, update_health
        np.testing.assert_array_equal(updates["w"], 0.0)
        assert np.isfinite(float(state.guard_inner_state["m"][1]))


def _shard_map_step(tx, reduce_loss):
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:4])

    def step(params, state, x):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((p["w"] * x) ** 2))(params)
        grads = jax.lax.pmean(grads, "data")
        if reduce_loss:
            loss = jax.lax.pmean(loss, "data")
        updates, state = tx.update(grads, state, params, loss=loss)
        return optax.apply_updates(params, updates), state

    sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=(P(), P()))
    x = jax.device_put(jnp.arange(32.0).reshape(4, 8) / 32, jax.NamedSharding(mesh, P("data")))
    return jax.jit(sharded), x


def test_a_per_device_loss_next_to_all_reduced_gradients_gets_a_clear_error():
    """Under shard_map a loss left per device (not pmean-ed) would let each device judge
    the step by its own loss; JAX used to fail deep inside the guard instead."""
    tx = gh.guard(optax.adam(0.1), clip=1.0)
    params = {"w": jnp.ones(8)}
    step, x = _shard_map_step(tx, reduce_loss=False)
    with pytest.raises(ValueError, match=re.escape("Pass the mean: `loss=jax.lax.pmean(loss, 'data')`")):
        step(params, tx.init(params), x)
    step, x = _shard_map_step(tx, reduce_loss=True)
    new_params, state = step(params, tx.init(params), x)
    want = float(np.mean((np.arange(32.0).reshape(4, 8) / 32) ** 2))
    np.testing.assert_allclose(float(state.guard_moments.guard_running_loss_mean), want, rtol=1e-6)
    assert not np.allclose(new_params["w"], 1.0)


# --- optax.monitor and optax.lookahead ---------------------------------------------------


@pytest.mark.parametrize("jit", [True, False])
def test_monitor_inside_the_guard_is_rejected_with_a_clear_error(jit):
    tx = gh.guard(optax.chain(optax.monitor({"norm": optax.tree.norm}), optax.adam(0.1)))
    params = {"w": jnp.ones((4, 3))}
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    with pytest.raises(ValueError) as raised:
        update({"w": jnp.ones((4, 3))}, state, params)
    # The whole message, each of its sentences in full (the cause, optax.monitor, the fix).
    before, after = "(3 leaves before, 4 after: ", ")."
    expected = (
        "gh.guard: the inner optimizer's update returned a state whose structure differs from the state it was "
        f"given {before}<treedefs>{after} The guard keeps the old state on a skipped step, so the structure "
        "must stay fixed. optax.monitor does this (its measurements dict is empty until the first update): "
        "chain it outside the guard, e.g. optax.chain(optax.monitor(...), gh.guard(inner)). So does an "
        "optimizer initialised with flax.nnx.Param-wrapped parameters and updated with plain gradients, or "
        "the other way round: pass `init` the same kind of tree as the gradients."
    )
    pattern = re.escape(expected).replace("<treedefs>", r"PyTreeDef\(.*\) -> PyTreeDef\(.*\)")
    assert re.fullmatch(pattern, str(raised.value), flags=re.DOTALL), str(raised.value)


def test_a_state_leaf_that_changes_shape_is_named_in_the_error():
    """Same tree structure, one leaf of another shape after the update: the error names
    the leaf and both shapes (the guard could not keep the old leaf on a skip)."""
    growing = optax.GradientTransformation(
        lambda params: {"history": jnp.zeros(2), "count": jnp.zeros((), jnp.int32)},
        lambda updates, state, params=None: (updates, {"history": jnp.zeros(3), "count": state["count"] + 1}),
    )
    tx = gh.guard(growing)
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match=r"leaf 1: shape \(2,\) before, \(3,\) after"):
        tx.update({"w": jnp.ones(2)}, tx.init(params), params)


def test_monitor_chained_outside_the_guard_works():
    tx = optax.chain(optax.monitor({"norm": optax.tree.norm}), gh.guard(optax.sgd(0.1)))
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    _, state = jax.jit(tx.update)({"w": jnp.array([3.0, 0.0, 4.0])}, state, params)
    assert float(optax.tree.get(state, "norm")) == pytest.approx(5.0)
    assert float(gh.metrics(state)["grad/norm"]) == pytest.approx(5.0)


@pytest.mark.parametrize("jit", [True, False])
def test_lookahead_is_guarded_and_otherwise_follows_bare_lookahead(jit):
    """Gradients are taken with respect to the fast params; the updates move both halves.
    The guarded run equals bare lookahead with the NaN step left out."""
    make = lambda: optax.lookahead(optax.adam(0.1), sync_period=3, slow_step_size=0.5)
    tx, bare = gh.guard(make()), make()
    params = bare_params = optax.LookaheadParams.init_synced({"w": jnp.array([1.0, -1.0, 2.0])})
    state, bare_state = tx.init(params), bare.init(bare_params)
    update = jax.jit(tx.update) if jit else tx.update
    grad_fn = jax.grad(lambda p: jnp.sum(p["w"] ** 2))
    for step in range(8):
        grads = grad_fn(params.fast)
        if step == 4:
            grads = {"w": grads["w"].at[1].set(jnp.nan)}
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        if step != 4:
            bare_updates, bare_state = bare.update(grad_fn(bare_params.fast), bare_state, bare_params)
            bare_params = optax.apply_updates(bare_params, bare_updates)
        chex.assert_trees_all_close(params, bare_params, rtol=1e-6)
    m = gh.metrics(state)
    assert int(m["grad/num_skipped"]) == 1 and list(gh.leaf_names(params.fast)) == ["w"]
    assert set(k for k in m if k.startswith("grad/leaf_norm/")) == {"grad/leaf_norm/w"}


# --- behaviours that decide an outcome ----------------------------------------------------


def _norm_run(tx, norms):
    params = {"w": jnp.zeros(4)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    history = []
    for norm in norms:
        grads = {"w": jnp.full((4,), norm / 2.0, jnp.float32)}  # global norm == norm
        _, state = update(grads, state, params)
        history.append(jax.device_get(gh.metrics(state)))
    return state, history


def _calm(n, seed=0):
    return list(1.0 + 0.05 * np.random.default_rng(seed).standard_normal(n))


@pytest.mark.parametrize(("gap", "reset"), [(9, True), (10, False), (11, False)])
def test_reset_window_decides_whether_two_spikes_reset(gap, reset):
    """reset_after=2 spikes within reset_window=10 steps: spikes 9 steps apart reset, 10
    apart do not (the window holds steps t-9..t)."""
    tx = gh.guard(optax.sgd(0.1), spike_action="record", reset_after=2, reset_window=10, warmup_steps=20)
    norms = _calm(60)
    norms[30] = norms[30 + gap] = 50.0
    _, history = _norm_run(tx, norms)
    assert [t for t, h in enumerate(history) if h["grad/spiked"]] == [30, 30 + gap]
    assert [t for t, h in enumerate(history) if h["grad/momentum_reset"]] == ([30 + gap] if reset else [])


def test_reset_window_counts_spikes_since_the_last_reset():
    """Three spikes within the window with reset_after=2: the first two reset; the third
    starts a new count (the reset clears the recorded spikes), so it does not."""
    tx = gh.guard(optax.sgd(0.1), spike_action="record", reset_after=2, reset_window=50, warmup_steps=20)
    norms = _calm(60)
    for t in (30, 33, 36):
        norms[t] = 50.0
    _, history = _norm_run(tx, norms)
    assert [t for t, h in enumerate(history) if h["grad/momentum_reset"]] == [33]


def _zscore_reference(norms, decay=0.99, z=3.0, warmup=5):
    """ZScoreClip written out (float64): bias-corrected EMA mean and variance of the
    norms it is given, raw during the first `warmup` of them, then each capped at the
    threshold mean + z * std in force before it. Returns the threshold after them."""
    mean = var = 0.0
    for count, norm in enumerate(norms, start=1):
        if count > warmup:
            norm = min(norm, mean + z * np.sqrt(var))
        alpha = (1 - decay) / (1 - decay**count)
        diff = norm - mean
        mean += alpha * diff
        var = (1 - alpha) * (var + alpha * diff * diff)
    return mean + z * np.sqrt(var)


def test_skipped_spikes_and_nonfinite_steps_do_not_move_the_adaptive_clip_threshold():
    policy = gh.ZScoreClip(z=3.0, stats_decay=0.99, warmup_steps=5)
    tx = gh.guard(optax.sgd(0.1), clip=policy, spike_action="skip", warmup_steps=20)
    norms = _calm(40)
    norms[25] = 80.0  # a spike: skipped
    norms[30] = float("nan")  # non-finite: skipped
    state, history = _norm_run(tx, norms)
    assert bool(history[25]["grad/skipped"]) and bool(history[30]["grad/skipped"])
    accepted = [n for t, n in enumerate(norms) if t not in (25, 30)]
    np.testing.assert_allclose(float(policy.threshold(state.guard_clip_state)), _zscore_reference(accepted), rtol=1e-5)
    # Folding the skipped steps in (the wrong implementation) gives another threshold.
    assert abs(_zscore_reference([n for t, n in enumerate(norms) if t != 30]) - _zscore_reference(accepted)) > 1e-3


def test_first_nonfinite_leaf_names_the_bad_leaf_in_leaf_names_order():
    params = {"a": jnp.zeros(2), "b": {"c": jnp.zeros(3), "d": jnp.zeros(1)}, "e": jnp.zeros(2)}
    names = gh.leaf_names(params)
    assert names == ["a", "b/c", "b/d", "e"]
    tx = gh.guard(optax.sgd(0.1))
    state = tx.init(params)
    update = jax.jit(tx.update)
    ones = jax.tree.map(jnp.ones_like, params)
    seen = []
    for bad in ["b/d", None, "e", "b/c"]:
        grads = ones
        if bad is not None:
            index = names.index(bad)
            leaves, treedef = jax.tree.flatten(ones)
            leaves[index] = leaves[index].at[0].set(jnp.inf if bad == "e" else jnp.nan)
            if bad == "b/c":  # two bad leaves: the first in leaf order is recorded
                leaves[3] = leaves[3].at[1].set(jnp.nan)
            grads = jax.tree.unflatten(treedef, leaves)
        _, state = update(grads, state, params)
        seen.append(names[int(gh.metrics(state)["grad/first_nonfinite_leaf"])])
    assert seen == ["b/d", "b/d", "e", "b/c"]


def test_first_nonfinite_leaf_is_kept_by_a_nonfinite_loss_with_finite_gradients():
    """A NaN loss (or value) with finite gradients is a non-finite step, but no leaf went
    bad: the index of the last bad leaf stays (it was overwritten with -1, which the
    catalogue reads as "no non-finite step yet")."""
    params = {"a": jnp.zeros(2), "b": jnp.zeros(3)}
    tx = gh.guard(optax.sgd(0.1))
    state = tx.init(params)
    update = jax.jit(tx.update)
    ones = jax.tree.map(jnp.ones_like, params)
    seen = []
    for grads, loss in [
        (ones, 1.0),  # nothing bad yet: -1
        ({"a": jnp.ones(2), "b": jnp.ones(3).at[1].set(jnp.nan)}, 1.0),  # leaf 1 ("b") goes bad
        (ones, 1.0),
        (ones, float("nan")),  # a NaN loss, finite gradients
    ]:
        _, state = update(grads, state, params, loss=jnp.float32(loss))
        seen.append(int(gh.metrics(state)["grad/first_nonfinite_leaf"]))
    assert seen == [-1, 1, 1, 1]
    assert int(gh.metrics(state)["grad/num_nonfinite"]) == 2
    _, state = update(ones, state, params, value=jnp.float32(jnp.inf))  # a non-finite value: the same
    assert int(gh.metrics(state)["grad/first_nonfinite_leaf"]) == 1


@pytest.mark.parametrize("jit", [True, False])
def test_guard_over_a_tree_without_float_leaves_applies_every_step(jit):
    """Nothing to check (no float leaf in the update or the inner state): the step is
    applied, not skipped, and the state keeps its structure."""
    tx = gh.guard(optax.sgd(0.1))
    params = {"frozen": {}, "step": jnp.zeros((), jnp.int32)}
    grads = {"frozen": {}, "step": jnp.zeros((), jnp.int32)}
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    for _ in range(2):
        updates, state = update(grads, state, params)
    m = gh.metrics(state)
    assert not bool(m["grad/skipped"]) and int(m["grad/num_nonfinite_updates"]) == 0
    assert int(m["grad/num_steps"]) == 2 and float(m["grad/norm"]) == 0.0
    chex.assert_trees_all_equal(updates, grads)


def _loss_moments_reference(losses, decay):
    """Bias-corrected EMA mean and variance of the losses, written out in float64
    (E[x] and E[x^2] - E[x]^2 of bias-corrected EMAs)."""
    m1 = m2 = 0.0
    for x in losses:
        m1 = decay * m1 + (1 - decay) * x
        m2 = decay * m2 + (1 - decay) * x * x
    corr = 1 - decay ** len(losses)
    mean = m1 / corr
    return mean, max(m2 / corr - mean * mean, 0.0)


def _loss_zscores(losses, **kwargs):
    tx = gh.guard(optax.sgd(0.0), **kwargs)
    params = {"w": jnp.ones(2)}
    state = tx.init(params)
    out = []
    for loss in losses:
        _, state = tx.update({"w": jnp.ones(2)}, state, params, loss=jnp.float32(loss))
        out.append(float(gh.metrics(state)["grad/loss_zscore"]))
    return out


def test_loss_zscore_starts_exactly_after_warmup_steps_losses():
    losses = [1.0, 2.0, 1.5, 4.0, 1.2]
    z = _loss_zscores(losses, warmup_steps=3, stats_decay=0.9)
    assert z[:3] == [0.0, 0.0, 0.0]  # judged once 3 losses are in the running moments
    for t in (3, 4):
        mean, var = _loss_moments_reference(losses[:t], 0.9)
        assert z[t] == pytest.approx((losses[t] - mean) / np.sqrt(var), rel=1e-4)


def test_loss_zscore_floor_of_the_spread_is_relative_to_the_mean_and_never_zero():
    # A constant loss has no spread: the floor is 1% of |mean| (+ 1e-30), so a change of
    # 1e-3 on a loss of 1000 is a z-score of 1e-4 (with the floor of 1e-12 |mean| it was
    # about 1e6: a loss spike), and a loss that stays at exactly 0 has z-score 0 (not 0/0).
    z = _loss_zscores([1000.0] * 4 + [1000.001], warmup_steps=2)
    step = float(np.float32(1000.001)) - 1000.0
    assert z[4] == pytest.approx(step / (0.01 * 1000.0), rel=1e-3)
    assert _loss_zscores([0.0] * 5, warmup_steps=2) == [0.0] * 5
    # A bf16 loss stuck at 2.0 that moves by one bf16 ulp (0.4%) is not a loss spike.
    ulp = float(jnp.nextafter(jnp.bfloat16(2.0), jnp.bfloat16(3.0))) - 2.0
    z = _loss_zscores([2.0] * 30 + [2.0 + ulp], warmup_steps=20, loss_spike_zscore=6.0)
    assert z[-1] == pytest.approx(ulp / (0.01 * 2.0), rel=1e-3) and z[-1] < 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"vanishing_norm": None, "rollback_after_nonfinite": None, "rollback_after_spikes": None},
        {"reset_after": None, "rebaseline_after": None, "spike_threshold": None, "spike_zscore": None},
        {"spike_action": "clip", "clip": gh.ZScoreClip(), "loss_spike_zscore": 3.0},
    ],
    ids=["defaults", "no-vanishing-no-rollback", "no-reset-no-spikes", "clip-action"],
)
@pytest.mark.parametrize("with_loss", [False, True], ids=["no-loss", "loss"])
@pytest.mark.parametrize("x64", [False, True], ids=["x32", "x64"])
def test_every_configuration_keeps_the_state_structure_and_dtypes_through_a_scan(kwargs, with_loss, x64):
    """Whatever is switched off, every field of the state exists from init on with its
    final shape and dtype (a disabled feature records a constant, not None; nothing
    turns float64 under x64), so a lax.scan over steps carries it."""
    with jax.enable_x64(x64):
        _scan_the_guard(kwargs, with_loss)


def _scan_the_guard(kwargs, with_loss):
    tx = gh.guard(optax.adam(0.1), warmup_steps=2, **kwargs)
    params = {"w": jnp.ones(3), "b": jnp.zeros(())}
    state0 = tx.init(params)
    grads = jnp.asarray([[1.0, 2.0, 3.0], [jnp.nan, 0.0, 1.0], [1.0, 1.0, 1.0], [50.0, 50.0, 50.0]], jnp.float32)

    def body(state, g):
        extra = {"loss": jnp.sum(g)} if with_loss else {}
        updates, state = tx.update({"w": g, "b": jnp.float32(0.5)}, state, params, **extra)
        return state, updates["w"]

    state, updates = jax.lax.scan(body, state0, grads)
    assert jax.tree.structure(state) == jax.tree.structure(state0)
    types = lambda tree: [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(tree)]
    assert types(state) == types(state0)
    assert bool(jnp.all(jnp.isfinite(updates)))
    for name, value in gh.metrics(state).items():
        assert value is not None and jnp.shape(value) == jnp.shape(gh.metrics(state0)[name]), name


def test_vanishing_is_a_norm_strictly_below_the_threshold():
    tx = gh.guard(optax.sgd(0.1), vanishing_norm=0.5)
    params = {"w": jnp.zeros(2)}
    flags = []
    for g in ([0.3, 0.4], [0.3, 0.39], [3.0, 4.0]):  # norms 0.5 (exactly), 0.4924..., 5
        _, state = tx.update({"w": jnp.array(g)}, tx.init(params), params)
        flags.append(bool(gh.metrics(state)["grad/vanishing"]))
    assert flags == [False, True, False]


def test_vanishing_with_a_loss_needs_the_loss_not_falling():
    """A tiny norm is vanishing unless the loss is below its running mean (still
    falling); the first loss, with no mean yet, counts as not falling, whatever its sign,
    and a loss equal to the mean is not falling."""
    tx = gh.guard(optax.sgd(0.1), vanishing_norm=1e-3, warmup_steps=50)
    params = {"w": jnp.zeros(2)}
    tiny = {"w": jnp.array([1e-5, 0.0])}

    def flags(losses):
        state, out = tx.init(params), []
        for loss in losses:
            _, state = tx.update(tiny, state, params, loss=jnp.float32(loss))
            out.append(bool(gh.metrics(state)["grad/vanishing"]))
        return out

    assert flags([-1.0]) == [True]  # the first loss: no mean to fall below
    assert flags([1.0, 0.5, 2.0]) == [True, False, True]  # 0.5 < mean 1: falling
    assert flags([1.0, 1.0, 1.0]) == [True, True, True]  # equal to the mean: not falling


def test_loss_spikes_are_judged_from_the_warmup_th_loss_and_strictly_above_the_threshold():
    tx = gh.guard(optax.sgd(0.0), warmup_steps=3, loss_spike_zscore=3.0, spike_action="record")
    params = {"w": jnp.ones(2)}

    def spikes(losses, threshold=None):
        guard = tx if threshold is None else gh.guard(optax.sgd(0.0), warmup_steps=3, loss_spike_zscore=threshold)
        state, out = guard.init(params), []
        for loss in losses:
            _, state = guard.update({"w": jnp.ones(2)}, state, params, loss=jnp.float32(loss))
            out.append(bool(gh.metrics(state)["grad/spiked"]))
        return out

    # Three losses in the running moments: the fourth is judged (a spike), not the third.
    assert spikes([1.0, 1.1, 50.0]) == [False, False, False]
    assert spikes([1.0, 1.1, 0.9, 50.0]) == [False, False, False, True]
    # Losses of exactly 0 leave no spread: the floor is 1e-30, and a z-score exactly at
    # the threshold is not a spike (strictly above).
    z = float(np.float32(3e-30) / np.float32(np.float32(1e-12) * np.float32(0.0) + np.float32(1e-30)))
    assert spikes([0.0, 0.0, 0.0, 3e-30], threshold=z) == [False, False, False, False]
    assert spikes([0.0, 0.0, 0.0, 3e-30], threshold=z * 0.999) == [False, False, False, True]


@pytest.mark.parametrize("action", ["record", "skip"])
def test_only_spike_action_clip_lowers_the_threshold_on_a_spike(action):
    """With 'record' a spike is counted and applied as it is (under the policy's own
    threshold); with 'skip' it is skipped; neither clips it to the spike bound, and the
    recorded threshold is the policy's."""
    tx = gh.guard(optax.sgd(1.0), clip=1e6, spike_action=action, warmup_steps=5)
    params = {"w": jnp.zeros(4)}
    state = tx.init(params)
    rng = np.random.default_rng(0)
    for _ in range(20):
        _, state = tx.update({"w": jnp.asarray(rng.normal(size=4) * 0.1, jnp.float32)}, state, params)
    big = jnp.full((4,), 500.0)
    updates, state = tx.update({"w": big}, state, params)
    m = gh.metrics(state)
    assert bool(m["grad/spiked"]) and float(m["grad/clip_threshold"]) == 1e6
    expected = np.zeros(4) if action == "skip" else -np.asarray(big)
    np.testing.assert_array_equal(np.asarray(updates["w"]), expected)


# --- counters and the momentum reset's fresh state (mutation run of _record, _apply_inner) ---


def test_num_clipped_counts_each_clipped_step_once():
    tx = gh.guard(optax.sgd(0.1), clip=1.0, spike_threshold=None, spike_zscore=None)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    norms = [3.0, 0.5, 2.0, 1.0, 4.0]  # clipped when strictly above 1.0
    for norm in norms:
        _, state = tx.update({"w": jnp.array([norm, 0.0])}, state, params)
    assert int(gh.metrics(state)["grad/num_clipped"]) == sum(n > 1.0 for n in norms)


def test_norm_clipped_reaches_a_threshold_whose_ratio_to_the_norm_is_subnormal():
    """threshold / norm = 1e-40 is a float32 subnormal: the clip factor is applied as two
    square roots, and the recorded post-clip norm is their product times the norm."""
    tx = gh.guard(optax.sgd(0.1), clip=1e-30, spike_threshold=None, spike_zscore=None)
    params = {"w": jnp.zeros(2)}
    updates, state = tx.update({"w": jnp.array([1e10, 0.0])}, tx.init(params), params)
    m = gh.metrics(state)
    np.testing.assert_allclose(float(m["grad/norm_clipped"]), 1e-30, rtol=1e-5)
    np.testing.assert_allclose(float(updates["w"][0]), -0.1 * 1e-30, rtol=1e-5)


def test_a_reset_reinitialises_the_moments_from_the_params_not_the_gradients():
    """optax.lookahead's params are LookaheadParams (fast and slow), its gradients only
    the fast ones': a reset must re-initialise it from the params (from the gradients
    its init would fail) and zero the fast optimizer's moments."""
    inner = optax.lookahead(optax.adam(0.1), sync_period=100, slow_step_size=0.5)
    tx = gh.guard(inner, warmup_steps=3, reset_after=1, spike_zscore=None, spike_threshold=2.0)
    params = optax.LookaheadParams(fast={"w": jnp.ones(2)}, slow={"w": jnp.ones(2)})
    state = tx.init(params)
    for value in (1.0, 1.0, 1.0, 1.0, 50.0):
        _, state = tx.update({"w": jnp.full((2,), value)}, state, params)
    assert int(gh.metrics(state)["grad/num_momentum_resets"]) == 1
    adam = state.guard_inner_state.fast_state[0]
    np.testing.assert_array_equal(np.asarray(adam.mu["w"]), 0.0)
    assert int(adam.count) == 0


def test_a_reset_reinitialises_a_state_that_starts_from_the_param_values():
    """An optimizer whose state starts as a copy of the parameters (schedule-free's z,
    an anchor): the fresh state of a reset holds the parameters' values, not the
    gradient's."""

    def anchored():
        return optax.GradientTransformation(
            lambda params: {"anchor": jax.tree.map(jnp.array, params)},
            lambda updates, state, params=None: (updates, state),
        )

    tx = gh.guard(anchored(), warmup_steps=3, reset_after=1, spike_zscore=None, spike_threshold=2.0)
    params = {"w": jnp.array([1.0, 2.0])}
    state = tx.init({"w": jnp.zeros(2)})  # the anchor starts elsewhere: a reset must move it
    for value in (1.0, 1.0, 1.0, 1.0, 50.0):
        _, state = tx.update({"w": jnp.full((2,), value)}, state, params)
    assert int(gh.metrics(state)["grad/num_momentum_resets"]) == 1
    np.testing.assert_array_equal(np.asarray(state.guard_inner_state["anchor"]["w"]), [1.0, 2.0])


def test_a_reset_without_params_reinitialises_the_moments_from_the_gradients():
    """optax makes params optional: a guard updated without them re-initialises Adam
    from the gradients (its init needs only their shapes) and zeroes the moments."""
    tx = gh.guard(optax.adam(0.1), warmup_steps=3, reset_after=1, spike_zscore=None, spike_threshold=2.0)
    state = tx.init({"w": jnp.ones(2)})
    for value in (1.0, 1.0, 1.0, 1.0, 50.0):
        _, state = tx.update({"w": jnp.full((2,), value)}, state)
    assert int(gh.metrics(state)["grad/num_momentum_resets"]) == 1
    adam = state.guard_inner_state[0]
    np.testing.assert_array_equal(np.asarray(adam.mu["w"]), 0.0)
    assert int(adam.count) == 0


# --- the state before the first update ----------------------------------------------------


@pytest.mark.parametrize("x64", [False, True], ids=["x32", "x64"])
@pytest.mark.parametrize("clip", [None, 2.5])
def test_metrics_before_the_first_update_hold_their_documented_initial_values(clip, x64):
    """docs/comparison.md: until the first update every recorded value is 0 or False,
    except ``grad/finite`` (True), ``grad/first_nonfinite_leaf`` (-1, no bad leaf) and
    ``grad/clip_threshold`` (the policy's: the fixed threshold, +inf without a clip).
    The state keeps its shapes and dtypes through updates; the reset ring holds int32
    step numbers, exact beyond float32's 2**24, under x64 too."""
    with jax.enable_x64(x64):
        _check_initial_metrics(clip)


def _check_initial_metrics(clip):
    tx = gh.guard(optax.adam(0.1), clip=clip)
    params = {"w": jnp.ones(3), "b": jnp.ones(2)}
    state = tx.init(params)
    special = {
        "grad/finite": True,
        "grad/first_nonfinite_leaf": -1,
        "grad/clip_threshold": np.inf if clip is None else clip,
    }
    m = _host(gh.metrics(state))
    assert set(special) <= set(m)
    for name, value in m.items():
        expected = special.get(name, 0)
        assert np.all(value == expected), (name, value, expected)
    # (each metric's dtype, by its declared kind: tests/test_catalogue.py)
    assert state.guard_spike_steps.dtype == jnp.int32
    _, after = jax.jit(tx.update)({"w": jnp.ones(3), "b": jnp.full(2, jnp.nan)}, state, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(after, state)
    assert int(gh.metrics(after)["grad/first_nonfinite_leaf"]) == 0  # "b" sorts first


# --- the documented defaults -----------------------------------------------------------


def _default_guard_history(bad_at, steps, bad=lambda g: g * 1e4, seed=3):
    """The metrics of each step of a default gh.guard(adam) fed unit-scale noise, with
    ``bad(g)`` (by default a 1e4-times gradient) at the steps in ``bad_at``."""
    tx = gh.guard(optax.adam(0.1))
    params = {"w": jnp.zeros(4)}
    state, update = tx.init(params), jax.jit(tx.update)
    rng = np.random.default_rng(seed)
    history = []
    for t in range(steps):
        g = rng.normal(size=4).astype(np.float32)
        _, state = update({"w": jnp.asarray(bad(g) if t in bad_at else g)}, state, params)
        history.append({name: bool(value) for name, value in gh.metrics(state).items() if value.dtype == bool})
    return history


def _default_guard_flags(spike_at, steps):
    """(spike, momentum reset) of each step, spikes at the steps in ``spike_at``."""
    return [(m["grad/spiked"], m["grad/momentum_reset"]) for m in _default_guard_history(spike_at, steps)]


def test_the_default_warm_up_is_20_accepted_steps_and_3_spikes_reset_the_momentum():
    """docs/concepts.md: spikes are judged once `warmup_steps` (20) steps have been
    accepted; `reset_after` skipped spikes (3) within `reset_window` steps (100) reset."""
    flags = _default_guard_flags({19, 20, 21, 22}, 26)
    assert [t for t, (spike, _) in enumerate(flags) if spike] == [20, 21, 22]  # 19: still warming up
    assert [t for t, (_, reset) in enumerate(flags) if reset] == [22]


def _steps_flagged(history, name):
    return [t for t, metrics in enumerate(history) if metrics[name]]


def test_the_default_reset_window_is_100_steps():
    """A run of two skipped spikes, then a pair about 100 steps later: its first spike
    recurs (clipped, not counted), its second is skipped, the third skipped spike, with
    the run's first among its last 100 steps (inside) or not (outside)."""
    inside = _default_guard_history({20, 21, 118, 119}, 120)
    outside = _default_guard_history({20, 21, 119, 120}, 121)
    assert _steps_flagged(inside, "grad/spiked") == [20, 21, 118, 119]
    assert _steps_flagged(inside, "grad/skipped") == [20, 21, 119]
    assert _steps_flagged(inside, "grad/momentum_reset") == [119]
    assert _steps_flagged(outside, "grad/spiked") == [20, 21, 119, 120]
    assert _steps_flagged(outside, "grad/skipped") == [20, 21, 120]
    assert _steps_flagged(outside, "grad/momentum_reset") == []


def test_a_spike_that_recurs_among_accepted_steps_is_clipped_not_skipped():
    """docs/concepts.md: with the default spike_action='skip', a spike after an accepted
    step while a skipped spike lies within the last `reset_window` (100) steps is clipped
    to the spike bound and applied; one 100 steps or more after it is skipped again."""
    history = _default_guard_history({30, 60, 129, 131, 200, 250}, 252)
    assert _steps_flagged(history, "grad/spiked") == [30, 60, 129, 131, 200, 250]
    # 60 and 129 recur (30 is 30 and 99 steps back); at 131 the last skipped spike is
    # still 30 (a recurring one is not counted), 101 steps back: skipped. 200 recurs
    # (131 is 69 back); 250 does not (119 back).
    assert _steps_flagged(history, "grad/skipped") == [30, 131, 250]
    assert _steps_flagged(history, "grad/clipped") == [60, 129, 200]
    assert _steps_flagged(history, "grad/momentum_reset") == []


def test_the_default_rollback_recommendation_comes_after_10_bad_steps_in_a_row():
    """docs/concepts.md: `rollback_after_nonfinite` (10) non-finite steps in a row or
    `rollback_after_spikes` (10) spikes in a row raise grad/rollback_recommended."""
    for bad in (lambda g: g * np.nan, lambda g: g * 1e4):
        history = _default_guard_history(range(25, 40), 40, bad, seed=5)
        raised = [m["grad/rollback_recommended"] for m in history]
        assert raised.index(True) == 25 + 9 and all(raised[34:])


def test_the_default_vanishing_norm_is_1e_5():
    """docs/concepts.md: a finite step whose norm is below `vanishing_norm` (1e-5) is
    flagged grad/vanishing; the step is applied as usual."""
    tx = gh.guard(optax.sgd(1.0))
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    for norm, vanishing in [(2e-5, False), (5e-6, True), (1e-3, False)]:
        g = {"w": jnp.array([0.6, 0.8]) * norm}
        updates, state = tx.update(g, state, params)
        assert bool(gh.metrics(state)["grad/vanishing"]) == vanishing, norm
        np.testing.assert_allclose(updates["w"], -g["w"], rtol=1e-6)


# --- a clip mode as `clip` ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["value", "leaf_norm"])
def test_a_clip_mode_as_clip_feeds_the_inner_optimizer(mode):
    """`clip=gh.clip_by_value(c)` or `gh.clip_by_leaf_norm(c)`: the inner optimizer gets
    the clipped gradients (numpy float64 reference): sgd(0.5) returns -0.5 * clipped."""
    clip = gh.clip_by_value(1.0) if mode == "value" else gh.clip_by_leaf_norm(1.0)
    tx = gh.guard(optax.sgd(0.5), clip=clip)
    grads = {"a": np.array([3.0, -0.25, -2.0], np.float32), "b": np.array([0.3, 0.4], np.float32)}
    params = jax.tree.map(jnp.zeros_like, grads)
    updates, _ = tx.update(jax.tree.map(jnp.asarray, grads), tx.init(params), params)
    for name, g in grads.items():
        g = g.astype(np.float64)
        clipped = np.clip(g, -1.0, 1.0) if mode == "value" else g * min(1.0, 1.0 / np.linalg.norm(g))
        np.testing.assert_allclose(np.asarray(updates[name]), -0.5 * clipped, rtol=1e-6)


@pytest.mark.parametrize("update_health", [True, False], ids=["health", "check-only"])
@pytest.mark.parametrize("poisoned", ["a", "b"])
@pytest.mark.parametrize("shape", [(3,), (7,)], ids=["param-shaped", "own-shape"])
def test_a_nan_in_either_of_two_state_leaves_of_one_shape_is_caught(update_health, poisoned, shape):
    """The update check combines the flags of leaves of one shape before it reduces them:
    a NaN in the first of two such leaves, or in the second, is caught (shaped like the
    params, or of a shape of its own), with update health on or off."""

    def init(params):
        return {"a": jnp.zeros(shape), "b": jnp.zeros(shape)}

    def update(updates, state, params=None):
        new = {name: leaf + 1.0 for name, leaf in state.items()}
        new[poisoned] = new[poisoned] * jnp.nan
        return updates, new

    tx = gh.guard(optax.GradientTransformation(init, update), update_health=update_health)
    params = {"w": jnp.ones(3)}
    updates, state = jax.jit(tx.update)({"w": jnp.ones(3)}, tx.init(params), params)
    m = gh.metrics(state)
    assert int(m["grad/num_nonfinite_updates"]) == 1 and bool(m["grad/skipped"])
    np.testing.assert_array_equal(np.asarray(updates["w"]), 0.0)
    _assert_same_state(state.guard_inner_state, init(params))


@pytest.mark.parametrize("kind", ["loss", "value"])
def test_a_float64_loss_or_value_under_x64_keeps_the_state_float32(kind):
    """Under x64 a loss (or `value`) computed in float64 is read in float32: the loss
    moments, the z-score and the rest of the state keep init's dtypes."""
    with jax.enable_x64(True):
        tx = gh.guard(optax.sgd(0.1), loss_spike_zscore=3.0)
        params = {"w": jnp.ones(3, jnp.float32)}
        state = tx.init(params)
        dtypes = [x.dtype for x in jax.tree.leaves(state)]
        for scalar in (np.float64(2.0), jnp.asarray(2.5, jnp.float64), 3, 1.5):
            _, state = jax.jit(tx.update)({"w": jnp.ones(3, jnp.float32)}, state, params, **{kind: scalar})
            assert [x.dtype for x in jax.tree.leaves(state)] == dtypes, type(scalar)
        assert gh.metrics(state)["grad/loss_zscore"].dtype == jnp.float32


def _spiky_grads(steps: int, spikes: tuple[int, ...]) -> list[dict[str, jax.Array]]:
    rng = np.random.default_rng(0)
    out = []
    for t in range(steps):
        g = rng.normal(size=3).astype(np.float32)
        out.append({"w": jnp.asarray(g * (1e4 if t in spikes else 1.0))})
    return out


@pytest.mark.parametrize("reset_window", [100, 2**30 + 100, 2**31 - 1])
def test_one_spike_never_resets_the_momentum_whatever_the_window(reset_window):
    """reset_after=3 needs three spikes within the window: one spike is one, however wide
    the window (an empty slot of the spike ring is not a spike long ago)."""
    tx = gh.guard(optax.adam(0.1), reset_after=3, reset_window=reset_window)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for g in _spiky_grads(30, spikes=(25,)):
        _, state = update(g, state, params)
    m = gh.metrics(state)
    assert int(m["grad/num_spikes"]) == 1 and int(m["grad/num_momentum_resets"]) == 0


def test_a_momentum_reset_keeps_reduce_on_plateaus_learning_rate_scale():
    """reduce_on_plateau's scale is a learning-rate schedule's state: a momentum reset
    re-initialises Adam's moments, not the scale the plateau has cut (1.0 at init)."""
    inner = optax.chain(optax.adam(0.1), optax.contrib.reduce_on_plateau(factor=0.1, patience=1, cooldown=0))
    tx = gh.guard(inner, warmup_steps=3, spike_window=8, reset_after=2, reset_window=10, spike_action="clip")
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    scales, resets = [], []
    for g in _spiky_grads(12, spikes=(9, 10)):
        _, state = update(g, state, params, value=jnp.float32(1.0))  # a flat loss: the plateau cuts
        scales.append(float(state.guard_inner_state[1].scale))
        resets.append(bool(gh.metrics(state)["grad/momentum_reset"]))
    assert resets.index(True) == 10
    assert scales[10] < 1e-8 and scales[11] < scales[10]  # no jump back to 1.0


def test_a_dip_of_the_gradient_norm_does_not_make_the_next_steps_spikes():
    """Nine nearly empty batches (norm 1e-6) among norms of about 1: with the guard's
    defaults the return to the usual scale was 50 skipped spikes, momentum resets and a
    rollback recommendation. Exact zeros were already left out of the window."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.ones(2)}
    tx = gh.guard(optax.adam(1e-3))
    state = tx.init(params)
    update = jax.jit(tx.update)
    norms = list(np.exp(rng.normal(0, 0.2, 100))) + [1e-6] * 9 + list(np.exp(rng.normal(0, 0.2, 100)))
    for n in norms:
        _, state = update({"w": jnp.array([n, 0.0], jnp.float32)}, state, params)
    m = gh.metrics(state)
    assert int(m["grad/num_skipped"]) == 0 and int(m["grad/num_spikes"]) == 0
    assert not bool(m["grad/rollback_recommended"])


def test_nan_steps_alternating_with_spikes_raise_the_rollback():
    """Each consecutive counter was reset by a bad step of the other kind: NaN steps
    alternating with spikes (a broken run) never raised the rollback recommendation.
    Only a good step breaks a run now. Expected, written out: with the defaults (10 and
    10), the 10th NaN of an alternating run (its 19th bad step) raises it; one good step
    in the middle starts both counts again."""
    rng = np.random.default_rng(3)
    params = {"w": jnp.ones(3)}

    def run(pattern):
        tx = gh.guard(optax.sgd(0.1), reset_after=None)
        state = tx.init(params)
        update = jax.jit(tx.update)
        for _ in range(40):  # warm-up on ordinary norms
            _, state = update({"w": jnp.asarray(rng.normal(size=3), jnp.float32)}, state, params)
        raised = []
        for kind in pattern:
            g = rng.normal(size=3).astype(np.float32)
            g = {"nan": g * np.nan, "spike": g * 1e4, "good": g}[kind]
            _, state = update({"w": jnp.asarray(g)}, state, params)
            m = gh.metrics(state)
            raised.append(bool(m["grad/rollback_recommended"]))
            counts = (int(m["grad/consecutive_nonfinite"]), int(m["grad/consecutive_spikes"]))
        return raised, counts

    raised, counts = run(["nan", "spike"] * 10)
    assert raised.index(True) == 18 and counts == (10, 10)
    raised, counts = run(["nan", "spike"] * 5 + ["good"] + ["nan", "spike"] * 4)
    assert not any(raised) and counts == (4, 4)


def _adam_states(state):
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
    return [x for x in jax.tree.leaves(state, is_leaf=is_adam) if is_adam(x)]


def test_a_momentum_reset_reaches_the_optimizer_inside_a_gradhealth_wrapper():
    """gh.accumulate keeps its own bookkeeping on a reset, but the optimizer it wraps is
    the inner optimizer: its moments are re-initialised. (They were kept whole: the reset
    was counted and did nothing.) With spike_action='record' the reset step's gradient is
    the fresh Adam's first: count 1, mu = (1 - b1) g, nu = (1 - b2) g**2. (The other
    gradhealth wrapper, gh.dynamic_loss_scale, is refused inside a guard.)"""
    tx = gh.guard(
        gh.accumulate(optax.adam(0.1), 1), warmup_steps=3, spike_window=8, reset_after=1, spike_action="record"
    )
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    grads = _spiky_grads(8, spikes=(6,))
    for g in grads:
        _, state = update(g, state, params)
    assert int(gh.metrics(state)["grad/num_momentum_resets"]) == 1
    (adam_state,) = _adam_states(state.guard_inner_state)
    g6 = np.asarray(grads[6]["w"], np.float64)  # the reset step: Adam's first
    g7 = np.asarray(grads[7]["w"], np.float64)
    assert int(adam_state.count) == 2
    np.testing.assert_allclose(adam_state.mu["w"], 0.9 * 0.1 * g6 + 0.1 * g7, rtol=1e-5)
    np.testing.assert_allclose(adam_state.nu["w"], 0.999 * 0.001 * g6**2 + 0.001 * g7**2, rtol=1e-5)


@pytest.mark.parametrize("clip", [None, 1.0, "leaf"])
def test_python_float_leaves_work_eagerly_as_under_jit(clip):
    """A Python float among the gradients and parameters (a scalar hyperparameter kept in
    the tree): the guard's eager update equals its jitted one."""
    clip = gh.clip_by_leaf_norm(1.0) if clip == "leaf" else clip
    tx = gh.guard(optax.adam(0.1), clip=clip)
    params = {"w": jnp.ones(2), "s": 1.0}
    grads = {"w": jnp.array([3.0, 4.0]), "s": 0.5}
    eager, _ = tx.update(grads, tx.init(params), params)
    jitted, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    for name in ("w", "s"):
        np.testing.assert_allclose(np.asarray(eager[name]), np.asarray(jitted[name]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(eager["s"]), -0.1, rtol=1e-4)  # Adam's first step: -lr * sign


@pytest.mark.parametrize("nested", [False, True], ids=["direct", "inside-jit"])
def test_an_inner_debug_callback_runs_once_per_update(nested):
    """The update check evaluates the inner update a second time under jit; a
    jax.debug.callback in the inner optimizer (directly or inside a jitted helper) must
    still run once per update, as with bare optax, and see the update's own values."""
    calls = []

    def log(u):
        jax.debug.callback(lambda n: calls.append(float(n)), optax.tree.norm(u))
        return u

    logged = jax.jit(log) if nested else log
    logging = optax.GradientTransformation(lambda p: optax.EmptyState(), lambda u, s, p=None: (logged(u), s))
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.array([3.0, 4.0, 0.0])}
    for tx in (optax.chain(logging, optax.sgd(0.1)), gh.guard(optax.chain(logging, optax.sgd(0.1)))):
        calls.clear()
        updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
        jax.block_until_ready(updates)
        jax.effects_barrier()
        assert calls == [5.0]


@pytest.mark.parametrize("spike_action", ["clip", "record"])
def test_an_adaptive_clip_policy_counts_an_accepted_spike_capped(spike_action):
    """An accepted spike (spike_action 'clip' or 'record') enters the clip policy's
    history capped at the spike bound, as it enters the guard's own statistics: one
    spike of 1e4 must not sit in a percentile clip's history. With spike detection off
    the same norm enters as it is."""
    grads = _spiky_grads(16, spikes=(12,))
    raw = float(np.linalg.norm(np.asarray(grads[12]["w"], np.float64)))
    entries = {}
    for detect in (True, False):
        thresholds = {} if detect else {"spike_threshold": None, "spike_zscore": None}
        policy = gh.PercentileClip(percentile=90, history_size=32, warmup_steps=0)
        tx = gh.guard(optax.sgd(0.1), clip=policy, spike_action=spike_action, warmup_steps=5, **thresholds)
        params = {"w": jnp.ones(3)}
        state = tx.init(params)
        update = jax.jit(tx.update)
        for g in grads[:13]:
            _, state = update(g, state, params)
        assert bool(gh.metrics(state)["grad/spiked"]) == detect
        entries[detect] = float(state.guard_clip_state.percentile_history[12])
    np.testing.assert_allclose(entries[False], raw, rtol=1e-6)
    assert entries[True] < raw / 100


def test_a_run_of_zero_gradients_does_not_make_every_later_step_a_spike():
    """Eight all-zero gradients (empty or fully masked batches) in a row: they carry no
    scale, so they do not enter the spike window; the ordinary steps after them are
    not spikes (log(0) in the window's median made each one a spike until the window
    restarted: 50 skipped steps and a rollback)."""
    tx = gh.guard(optax.adam(1e-3))
    params = {"w": jnp.ones(16)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    rng = np.random.default_rng(0)
    for t in range(100):
        g = jnp.asarray(rng.normal(size=16), jnp.float32) * (0.0 if 30 <= t < 38 else 1.0)
        _, state = update({"w": g}, state, params)
    m = gh.metrics(state)
    assert int(m["grad/num_spikes"]) == 0 and int(m["grad/num_skipped"]) == 0
    assert not bool(m["grad/rollback_recommended"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("jit", [True, False])
def test_a_state_leaf_the_optimizer_promotes_keeps_inits_dtype(dtype, jit):
    """Low-precision parameters with float32 gradients: optax's momentum comes back
    float32 (its promotion), the guard's state keeps init's dtype, as optax.MultiSteps
    does (lax.scan and donation need a fixed type). The updates are bare optax's (they
    read the float32 momentum); the kept momentum is it rounded to init's dtype; a
    skipped step keeps it bit for bit."""
    low = jnp.dtype(dtype)
    params = {"w": jnp.ones(3, low)}
    inner = optax.sgd(0.1, momentum=0.9)
    tx = gh.guard(inner, warmup_steps=100)
    update = _donated_update(tx) if jit else (lambda p, s, g, **kw: tx.update(g, s, p, **kw))
    state0 = tx.init(params)
    types = lambda tree: [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(tree)]
    want = types(state0)
    g1 = np.array([1 + 2**-10, -3.0 - 2**-12, 0.3], np.float32)  # not exact in bfloat16 / float16
    g2 = np.array([0.7, 2 + 2**-11, -1.1], np.float32)
    # Step 1 from a zero momentum, written out: the momentum is the gradient.
    updates, state = update(params, state0, {"w": jnp.asarray(g1)})
    assert types(state) == want
    np.testing.assert_allclose(np.asarray(updates["w"]), -np.float32(0.1) * g1, rtol=1e-6)
    kept = np.asarray(state.guard_inner_state[0].trace["w"])
    np.testing.assert_array_equal(kept, g1.astype(low))
    # Step 2: bare optax from the same (kept) state, run the same way; the kept momentum
    # is its own float32 momentum rounded to init's dtype. (Under jit, XLA may keep
    # optax's low-precision product 0.9 * trace in float32: a rounding of init's dtype.)
    bare = jax.jit(inner.update) if jit else inner.update
    bare_updates, bare_state = bare({"w": jnp.asarray(g2)}, state.guard_inner_state, params)
    assert bare_state[0].trace["w"].dtype == jnp.float32  # optax's promotion
    updates, state = update(params, state, {"w": jnp.asarray(g2)})
    assert types(state) == want
    rtol = float(jnp.finfo(low).eps) if jit else 0.0
    np.testing.assert_allclose(np.asarray(updates["w"]), np.asarray(bare_updates["w"]), rtol=rtol)
    np.testing.assert_allclose(
        np.asarray(state.guard_inner_state[0].trace["w"], np.float32),
        np.asarray(bare_state[0].trace["w"]).astype(low).astype(np.float32),
        rtol=rtol,
    )
    before = _host(state.guard_inner_state)
    _, state = update(params, state, {"w": jnp.array([jnp.nan, 1.0, 1.0])})
    assert bool(gh.metrics(state)["grad/skipped"])
    chex.assert_trees_all_equal(_host(state.guard_inner_state), before)
    # And so a scan carries it.
    grads = jnp.asarray(np.stack([g1, g2, g1]))
    scanned, _ = jax.lax.scan(lambda s, g: (tx.update({"w": g}, s, params)[1], None), tx.init(params), grads)
    assert types(scanned) == want


def test_a_promoted_state_leaf_that_overflows_init_dtype_is_a_nonfinite_update():
    """float16 parameters, float32 gradients: a momentum finite in float32 but beyond
    float16's range (65504) would be kept as Inf; the step is skipped as an update the
    optimizer made non-finite, and the state kept."""
    params = {"w": jnp.ones(2, jnp.float16)}
    inner = optax.sgd(0.1, momentum=0.9)
    grads = {"w": jnp.array([1e5, 1.0], jnp.float32)}
    bare_updates, bare_state = inner.update(grads, inner.init(params), params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((bare_updates, bare_state)))
    assert 1e5 > float(np.finfo(np.float16).max)
    tx = gh.guard(inner)
    state = tx.init(params)
    before = _host(state.guard_inner_state)
    for update in (_donated_update(tx), lambda p, s, g: tx.update(g, s, p)):
        updates, new_state = update(params, state, grads)
        np.testing.assert_array_equal(np.asarray(updates["w"], np.float32), 0.0)
        chex.assert_trees_all_equal(_host(new_state.guard_inner_state), before)
        assert int(gh.metrics(new_state)["grad/num_nonfinite_updates"]) == 1
        state = tx.init(params)


# --- what a momentum reset keeps: random-number state, learned step sizes ------------------

_UNIT = np.array([0.6, 0.8, 0.0])  # norm 1: the spike window's baseline
_SPIKE = np.array([30.0, 40.0, 0.0])  # norm 50, clipped to 2 x the baseline: 2 * _SPIKE / 50


def _reset_run(inner, grads, params, **extra):
    """The guard (spike_action='clip', a reset on every spike) over ``grads``, each
    update applied; the last update and state."""
    tx = gh.guard(inner, spike_action="clip", warmup_steps=3, reset_after=1, spike_zscore=None, spike_threshold=2.0)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for g in grads:
        updates, state = update(g, state, params, **extra)
        params = optax.apply_updates(params, updates)
    return updates, state


def test_a_reset_keeps_add_noise_going_instead_of_replaying_its_noise():
    """optax.add_noise (noisy_sgd): a reset used to put its key and its annealing count
    back to init's, so the noise of the first steps was added again. Its state must be
    where a plain add_noise's is after as many steps, and the noise the same."""
    params = {"w": jnp.zeros(3)}
    grads = [{"w": jnp.asarray(g, jnp.float32)} for g in [_UNIT] * 5 + [_SPIKE] + [_UNIT] * 2]
    updates, state = _reset_run(optax.chain(optax.add_noise(1.0, 0.55, 0), optax.sgd(1.0)), grads, params)
    assert int(gh.metrics(state)["grad/num_momentum_resets"]) == 1
    plain = optax.add_noise(1.0, 0.55, 0)
    ref_state = plain.init(params)
    for g in grads:
        noisy, ref_state = plain.update(g, ref_state)
    noise = state.guard_inner_state[0]
    assert int(noise.count) == int(ref_state.count) == len(grads)
    np.testing.assert_array_equal(jax.random.key_data(noise.rng_key), jax.random.key_data(ref_state.rng_key))
    # sgd(1.0): the update is -(gradient + noise); the last gradient was not clipped.
    np.testing.assert_allclose(np.asarray(updates["w"]), -np.asarray(noisy["w"]), rtol=1e-6)


@pytest.mark.filterwarnings('ignore:"seed" is deprecated:DeprecationWarning')  # optax 0.2.8 has no `key` yet
def test_a_reset_keeps_dpsgd_key_so_no_noise_is_used_twice():
    """optax.contrib.dpsgd: the same Gaussian noise twice can be cancelled by differencing
    two updates (no privacy left). After a reset the key goes on: the guarded run's last
    update equals a plain dpsgd's on the same per-example gradients."""
    params = {"w": jnp.zeros(3)}
    per_example = lambda g: {"w": jnp.asarray(np.stack([g] * 4) * 1e-3, jnp.float32)}
    grads = [per_example(g) for g in [_UNIT] * 5 + [_SPIKE] + [_UNIT] * 2]
    make = lambda: optax.contrib.dpsgd(1.0, l2_norm_clip=1.0, noise_multiplier=1.0, seed=0)
    updates, state = _reset_run(make(), grads, params)
    assert int(gh.metrics(state)["grad/num_momentum_resets"]) == 1
    plain = make()
    ref_state = plain.init(params)
    for g in grads:
        ref_updates, ref_state = plain.update(g, ref_state, params)
    np.testing.assert_array_equal(
        jax.random.key_data(state.guard_inner_state[0].rng_key), jax.random.key_data(ref_state[0].rng_key)
    )
    np.testing.assert_allclose(np.asarray(updates["w"]), np.asarray(ref_updates["w"]), rtol=1e-6)


def test_a_reset_keeps_a_typed_prng_key_leaf_and_resets_the_moments_next_to_it():
    """Any leaf of a PRNG key dtype is kept (a fresh key replays the noise); the other
    leaves of the same state are re-initialised."""

    def keyed():
        def init(params):
            return {"key": jax.random.key(0), "total": jnp.zeros_like(params["w"])}

        def update(updates, state, params=None):
            key, _ = jax.random.split(state["key"])
            return updates, {"key": key, "total": state["total"] + updates["w"]}

        return optax.GradientTransformation(init, update)

    params = {"w": jnp.zeros(3)}
    raw = [_UNIT] * 5 + [_SPIKE] + [_UNIT] * 2
    _, state = _reset_run(keyed(), [{"w": jnp.asarray(g, jnp.float32)} for g in raw], params)
    assert int(gh.metrics(state)["grad/num_momentum_resets"]) == 1
    key = jax.random.key(0)
    for _ in raw:
        key, _ = jax.random.split(key)
    np.testing.assert_array_equal(jax.random.key_data(state.guard_inner_state["key"]), jax.random.key_data(key))
    # The total restarted at the reset step: its clipped gradient and the two after it.
    np.testing.assert_allclose(state.guard_inner_state["total"], 2 * _SPIKE / 50 + 2 * _UNIT, rtol=1e-6)


@pytest.mark.parametrize("name", ["prodigy", "dadapt_adamw", "momo"])
def test_a_reset_keeps_a_learned_step_size_and_resets_the_moments(name):
    """prodigy / dadapt_adamw learn their step size d (`estim_lr`, from 1e-6): a reset
    used to put it back to 1e-6 (updates 1e5 x smaller for tens of steps). It is kept,
    while the moments and their bias-correction count restart (Adam's first step,
    written out below). momo's count is its schedule's step: it goes on, and its
    momentum restarts from zero."""
    params = {"w": jnp.asarray([1.0, -2.0, 0.5])}
    inner = {"prodigy": optax.contrib.prodigy, "dadapt_adamw": optax.contrib.dadapt_adamw}.get(name)
    inner = inner(1.0) if inner else optax.contrib.momo(0.1)
    extra = {"value": jnp.float32(1.0)} if name == "momo" else {}
    warm = [{"w": jnp.asarray(_UNIT, jnp.float32)}] * 30
    _, before = _reset_run(inner, warm, params, **extra)
    _, state = _reset_run(inner, [*warm, {"w": jnp.asarray(_SPIKE, jnp.float32)}], params, **extra)
    assert bool(state.guard_report.guard_momentum_reset)
    old, new = before.guard_inner_state, state.guard_inner_state
    clipped = 2.0 * _SPIKE / 50.0
    b1, b2 = 0.9, 0.999
    if name == "momo":
        assert int(new.count) == int(old.count) + 1 == 31
        # count > 0: exp_avg = b * 0 + (1 - b) * g (momo initialises it from g only at count 0)
        np.testing.assert_allclose(new.exp_avg["w"], (1 - b1) * clipped, rtol=1e-6)
        return
    d = float(old.estim_lr)
    assert d > 1e-5  # it has grown from 1e-6
    # The fresh accumulators' first estimate is 0 (prodigy: params0 = params; dadapt:
    # grad_sum = 0), so d stays exactly what it was.
    assert float(new.estim_lr) == d
    assert int(new.count) == 1
    if name == "prodigy":
        expected_mu, expected_nu = (1 - b1) * d * clipped, (1 - b2) * (d * clipped) ** 2
    else:  # dadapt_adamw: mu = (1 - b1) * dlr * g, dlr = d * lr * sqrt(1 - b2) / (1 - b1)
        dlr = d * np.sqrt(1 - b2) / (1 - b1)
        expected_mu, expected_nu = (1 - b1) * dlr * clipped, (1 - b2) * clipped**2
    np.testing.assert_allclose(new.exp_avg["w"], expected_mu, rtol=1e-5)
    np.testing.assert_allclose(new.exp_avg_sq["w"], expected_nu, rtol=1e-5)


# --- optax.lookahead with a clip mode, and its update health ------------------------------


@pytest.mark.parametrize("mode", ["none", "clip_by_leaf_norm", "adaptive_grad_clip", "adagc_clip"])
def test_a_clip_mode_inside_the_guard_of_lookahead_reads_the_fast_params(mode):
    """clip= a clip mode with optax.lookahead inside the guard used to crash (the mode was
    initialised and updated with LookaheadParams, the gradients being the fast half's).
    It gets the fast half; update health is that of the fast half (|u.fast_l| /
    |p.fast_l| per leaf, not 0), and a reset re-initialises it too."""
    fast = {"b": jnp.asarray([2.0, -2.0]), "w": jnp.full((3,), 2.0)}
    params = optax.LookaheadParams(fast=fast, slow=jax.tree.map(lambda x: 0.5 * x, fast))
    clip = {
        "none": lambda: None,
        "clip_by_leaf_norm": lambda: gh.clip_by_leaf_norm(0.5),
        "adaptive_grad_clip": lambda: gh.adaptive_grad_clip(0.1),
        "adagc_clip": lambda: gh.adagc_clip(),
    }[mode]()
    tx = gh.guard(
        optax.lookahead(optax.sgd(1.0), sync_period=100, slow_step_size=0.5),
        clip=clip,
        warmup_steps=3,
        reset_after=1,
        spike_zscore=None,
        spike_threshold=2.0,
    )
    state = tx.init(params)
    update = jax.jit(tx.update)
    g = {"b": np.array([0.6, 0.0]), "w": np.array([0.0, 0.8, 0.0])}  # leaf norms 0.6, 0.8
    for _ in range(4):
        updates, state = update(jax.tree.map(jnp.asarray, g), state, params)
    _, reset_state = update(jax.tree.map(lambda x: jnp.asarray(50 * x, jnp.float32), g), state, params)
    assert bool(reset_state.guard_report.guard_momentum_reset)
    m = gh.metrics(state, deprecated_names=False)
    u_fast = {k: np.asarray(v, np.float64) for k, v in updates.fast.items()}
    np.testing.assert_array_equal(np.asarray(updates.slow["w"]), 0.0)  # no sync yet
    p_fast = {k: np.asarray(v, np.float64) for k, v in fast.items()}
    if mode == "none":
        for k in g:
            np.testing.assert_allclose(u_fast[k], -g[k], rtol=1e-6)
    elif mode == "clip_by_leaf_norm":  # each leaf to norm <= 0.5; sgd(1.0)
        for k in g:
            np.testing.assert_allclose(u_fast[k], -g[k] * min(1.0, 0.5 / np.linalg.norm(g[k])), rtol=1e-6)
    elif mode == "adaptive_grad_clip":  # each (1-D) leaf to norm <= 0.1 * |fast leaf|
        for k in g:
            bound = 0.1 * max(np.linalg.norm(p_fast[k]), 1e-3)
            np.testing.assert_allclose(u_fast[k], -g[k] * min(1.0, bound / np.linalg.norm(g[k])), rtol=1e-6)
    for k in g:
        want = np.linalg.norm(u_fast[k]) / np.linalg.norm(p_fast[k])
        np.testing.assert_allclose(float(m[f"update/leaf_param_ratio/{k}"]), want, rtol=1e-5)
    norm = lambda tree: np.sqrt(sum(np.sum(x**2) for x in tree.values()))
    np.testing.assert_allclose(float(m["update/norm"]), norm(u_fast), rtol=1e-5)
    np.testing.assert_allclose(float(m["param/norm"]), norm(p_fast), rtol=1e-5)
