"""Update health in the guard (issue 15, part 1): ``update/norm``, ``param/norm``,
``update/param_ratio`` and ``update/leaf_param_ratio/<path>``.

Every expected value is computed here in numpy float64 from the update the guard
returned (or the bare optax optimizer's) and the parameters passed, never read from the
state under test. The update check that shares their reduction is tested too: a NaN in
any state leaf, paired with an update leaf of its shape or not, still skips the step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gradhealth as gh

HEALTH = ("update/norm", "param/norm", "update/param_ratio")


def _norm64(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree))))


def _params():
    rng = np.random.default_rng(0)
    # Four leaves of one shape (each update leaf is reduced with "its" moments: the
    # pairing by shape must hold for several of them), a bias still at zero, a scalar.
    params = {f"w{i}": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32) for i in range(4)}
    params |= {"b": jnp.zeros(5, jnp.float32), "s": jnp.float32(2.0)}
    return params


def _grads(params, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=jnp.shape(p)), jnp.float32), params)


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("check_updates", [True, False])
def test_update_health_matches_numpy_float64_of_the_returned_update(jit, check_updates):
    inner = optax.adamw(1e-2, weight_decay=1e-2)
    tx = gh.guard(inner, clip=1.0, check_updates=check_updates)
    params = _params()
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    names = gh.leaf_names(params)
    for step in range(4):
        updates, state = update(_grads(params, step), state, params)
        m = gh.metrics(state, deprecated_names=False)
        u_norm, p_norm = _norm64(updates), _norm64(params)
        np.testing.assert_allclose(float(m["update/norm"]), u_norm, rtol=2e-6)
        np.testing.assert_allclose(float(m["param/norm"]), p_norm, rtol=2e-6)
        np.testing.assert_allclose(float(m["update/param_ratio"]), u_norm / p_norm, rtol=4e-6)
        for name, u, p in zip(names, jax.tree.leaves(updates), jax.tree.leaves(params)):
            p_leaf = float(np.linalg.norm(np.asarray(p, np.float64)))
            expected = float(np.linalg.norm(np.asarray(u, np.float64))) / p_leaf if p_leaf > 0 else 0.0
            np.testing.assert_allclose(float(m[f"update/leaf_param_ratio/{name}"]), expected, rtol=4e-6)
        params = optax.apply_updates(params, updates)
    # The bias started at 0 (ratio undefined: 0) and has moved since: its ratio is not 0.
    assert float(m["update/leaf_param_ratio/b"]) > 0.0


def test_update_norm_is_the_bare_optimizers_update_norm():
    """Against bare optax, not the guard's own output: the reduction reads a second
    evaluation of the inner update, which must be the update applied."""
    inner = optax.adam(3e-3)
    tx = gh.guard(inner)
    params = _params()
    state, bare_state = tx.init(params), inner.init(params)
    step = jax.jit(tx.update)
    for seed in range(3):
        grads = _grads(params, seed)
        _, state = step(grads, state, params)
        bare_updates, bare_state = inner.update(grads, bare_state, params)
        np.testing.assert_allclose(float(gh.metrics(state)["update/norm"]), _norm64(bare_updates), rtol=2e-6)


def test_a_skipped_step_records_a_zero_update_and_the_params_norm():
    tx = gh.guard(optax.sgd(0.1))
    params = _params()
    state = tx.init(params)
    grads = _grads(params, 0)
    grads["w2"] = grads["w2"].at[1, 1].set(jnp.nan)
    _, state = jax.jit(tx.update)(grads, state, params)
    m = gh.metrics(state, deprecated_names=False)
    assert bool(m["grad/skipped"])
    assert float(m["update/norm"]) == 0.0 and float(m["update/param_ratio"]) == 0.0
    np.testing.assert_allclose(float(m["param/norm"]), _norm64(params), rtol=2e-6)
    assert all(float(v) == 0.0 for k, v in m.items() if k.startswith("update/leaf_param_ratio/"))


def _state_nan_in(leaf: str, kind: str) -> optax.GradientTransformation:
    """SGD whose state holds a copy of each gradient leaf ('paired': the gradient's
    shape) or a vector of another shape ('alone'); the state goes NaN at ``leaf``."""

    def init(params):
        if kind == "paired":
            return {"trace": jax.tree.map(jnp.zeros_like, params)}
        return {"trace": jnp.zeros(7)}

    def update(updates, state, params=None):
        if kind == "paired":
            trace = dict(updates)
            trace[leaf] = trace[leaf] * jnp.nan
        else:
            trace = state["trace"] + jnp.nan
        return jax.tree.map(lambda g: -0.1 * g, updates), {"trace": trace}

    return optax.GradientTransformation(init, update)


@pytest.mark.parametrize("leaf", ["w0", "w3", "b", "s"])
def test_a_nan_in_any_paired_state_leaf_skips_the_step(leaf):
    tx = gh.guard(_state_nan_in(leaf, "paired"))
    params = _params()
    updates, state = jax.jit(tx.update)(_grads(params, 0), tx.init(params), params)
    m = gh.metrics(state)
    assert bool(m["grad/skipped"]) and int(m["grad/num_nonfinite_updates"]) == 1
    assert float(m["update/norm"]) == 0.0
    assert _norm64(updates) == 0.0


def test_a_nan_in_a_state_leaf_of_no_update_shape_skips_the_step():
    tx = gh.guard(_state_nan_in("", "alone"))
    params = _params()
    _, state = jax.jit(tx.update)(_grads(params, 0), tx.init(params), params)
    assert int(gh.metrics(state)["grad/num_nonfinite_updates"]) == 1


def test_an_update_whose_squares_overflow_float32_is_treated_as_nonfinite():
    """Elements of 1e20 are finite, but their squares are not: skipped (documented)."""
    tx = gh.guard(optax.scale(1e20))
    params = {"w": jnp.ones(3)}
    _, state = jax.jit(tx.update)({"w": jnp.ones(3)}, tx.init(params), params)
    m = gh.metrics(state)
    assert bool(m["grad/finite"]) and bool(m["grad/skipped"]) and int(m["grad/num_nonfinite_updates"]) == 1


def test_without_the_check_a_nan_update_is_reported_not_hidden():
    tx = gh.guard(optax.scale(jnp.nan), check_updates=False)
    params = {"w": jnp.ones(3)}
    updates, state = jax.jit(tx.update)({"w": jnp.ones(3)}, tx.init(params), params)
    assert bool(jnp.all(jnp.isnan(updates["w"])))
    m = gh.metrics(state)
    assert not bool(m["grad/skipped"]) and bool(jnp.isnan(m["update/norm"]))


@pytest.mark.parametrize("passed", ["none", "other-structure"])
def test_without_params_of_the_updates_structure_the_param_norm_and_the_ratios_are_zero(passed):
    """No params (optax makes them optional), or params of another structure than the
    update (nothing to pair its leaves with): param/norm and the ratios are 0, the
    update's norm is still recorded."""
    tx = gh.guard(optax.sgd(0.5))
    params = {"v": jnp.ones(1), "w": jnp.ones(4)}
    other = None if passed == "none" else {"v": jnp.ones(1), "w": jnp.ones(4), "frozen": jnp.ones(3)}
    _, state = tx.update({"v": jnp.zeros(1), "w": jnp.full(4, 2.0)}, tx.init(params), other)
    m = gh.metrics(state, deprecated_names=False)
    np.testing.assert_allclose(float(m["update/norm"]), 2.0, rtol=1e-6)  # |-0.5 * 2| * sqrt(4)
    assert float(m["param/norm"]) == 0.0 and float(m["update/param_ratio"]) == 0.0
    assert float(m["update/leaf_param_ratio/v"]) == 0.0 and float(m["update/leaf_param_ratio/w"]) == 0.0


def test_lookahead_reads_the_health_of_its_fast_half():
    """optax.lookahead's update holds the fast and the slow params' (LookaheadParams),
    its gradients only the fast ones': update health is the fast half's, whose leaves
    are the gradient's, so the per-leaf ratios are known (they were 0 when the norms
    covered both halves, and the diagnosis read that as a dead leaf)."""
    inner = optax.lookahead(optax.sgd(0.1), sync_period=2, slow_step_size=0.5)
    tx = gh.guard(inner)
    fast, slow = np.array([3.0, 4.0]), np.array([0.0, 1.0])
    params = optax.LookaheadParams(fast={"w": jnp.asarray(fast)}, slow={"w": jnp.asarray(slow)})
    updates, state = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
    m = gh.metrics(state, deprecated_names=False)
    fast_update = np.asarray(updates.fast["w"], np.float64)
    np.testing.assert_allclose(float(m["param/norm"]), np.linalg.norm(fast), rtol=1e-6)
    np.testing.assert_allclose(float(m["update/norm"]), np.linalg.norm(fast_update), rtol=1e-6)
    assert [k for k in m if k.startswith("update/leaf_param_ratio/")] == ["update/leaf_param_ratio/w"]
    expected = np.linalg.norm(fast_update) / np.linalg.norm(fast)
    np.testing.assert_allclose(float(m["update/leaf_param_ratio/w"]), expected, rtol=1e-6)


def test_update_health_off_records_nothing_and_keeps_the_structure():
    tx = gh.guard(optax.sgd(0.1), update_health=False)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    _, new_state = jax.jit(tx.update)({"w": jnp.ones(3)}, state, params)
    assert jax.tree.structure(state) == jax.tree.structure(new_state)
    names = gh.metrics(new_state)
    assert not any(name.startswith(("update/", "param/")) for name in names)
    with pytest.raises(TypeError, match=r"update_health.*True or False"):
        gh.guard(optax.sgd(0.1), update_health=1)


def test_update_health_adds_at_most_one_float_per_update_element_of_temporary():
    """XLA:CPU writes the poisoned squares of each update leaf to memory before it sums
    them (measured: one float32 per element); no copy of the parameters or of the
    moments, with the check on or off. Not measured on other backends: the same bound."""
    params = {f"w{i}": jnp.ones((256, 128), jnp.float32) for i in range(4)} | {"b": jnp.ones((128,))}
    elements = sum(x.size for x in jax.tree.leaves(params))

    def temp_bytes(**kwargs):
        tx = gh.guard(optax.adamw(1e-3), clip=1.0, **kwargs)

        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    baseline = temp_bytes(check_updates=False, update_health=False)
    for check in (True, False):
        assert temp_bytes(check_updates=check) - baseline <= 4 * elements + 4096


def test_every_state_leaf_is_checked_whatever_comes_before_it():
    """A state leaf of a shape no update leaf has, first in the state, does not stop the
    pairing of the leaves after it: a NaN in a later, paired leaf still skips."""

    def inner():
        def update(updates, state, params=None):
            trace = jax.tree.map(lambda g: g * jnp.nan, updates)
            return updates, {"a_alone": state["a_alone"] + 1.0, "b_trace": trace}

        return optax.GradientTransformation(
            lambda params: {"a_alone": jnp.zeros(7), "b_trace": jax.tree.map(jnp.zeros_like, params)}, update
        )

    tx = gh.guard(inner())
    params = {"w": jnp.ones(3)}
    _, state = jax.jit(tx.update)({"w": jnp.ones(3)}, tx.init(params), params)
    assert int(gh.metrics(state)["grad/num_nonfinite_updates"]) == 1


@pytest.mark.parametrize("x64", [False, True], ids=["x32", "x64"])
@pytest.mark.parametrize("jit", [True, False])
def test_integer_leaves_of_the_update_count_zero_and_do_not_shift_the_others(jit, x64):
    """An update with an integer leaf (a step counter passed through, sorted first):
    its norm and ratio are 0, and the float leaf after it keeps its own; the recorded
    values stay float32 under x64."""
    with jax.enable_x64(x64):
        tx = gh.guard(optax.identity())
        params = {"n": jnp.int32(5), "w": jnp.array([3.0, 4.0], jnp.float32)}
        update = jax.jit(tx.update) if jit else tx.update
        _, state = update({"n": jnp.int32(1), "w": jnp.array([0.3, 0.4], jnp.float32)}, tx.init(params), params)
        m = gh.metrics(state, deprecated_names=False)
    assert {m[name].dtype for name in m if name.startswith(("update/", "param/"))} == {np.dtype(np.float32)}
    np.testing.assert_allclose(float(m["update/norm"]), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(m["param/norm"]), 5.0, rtol=1e-6)
    np.testing.assert_allclose(float(m["update/leaf_param_ratio/w"]), 0.1, rtol=1e-6)
    assert float(m["update/leaf_param_ratio/n"]) == 0.0


@pytest.mark.parametrize("x64", [False, True], ids=["x32", "x64"])
@pytest.mark.parametrize("jit", [True, False])
def test_an_empty_tree_records_float32_zeros(jit, x64):
    with jax.enable_x64(x64):
        tx = gh.guard(optax.sgd(0.1))
        update = jax.jit(tx.update) if jit else tx.update
        updates, state = update({}, tx.init({}), {})
        m = gh.metrics(state, deprecated_names=False)
    assert updates == {}
    assert [float(m[name]) for name in HEALTH] == [0.0, 0.0, 0.0]
    assert {m[name].dtype for name in HEALTH} == {np.dtype(np.float32)}
    ratios = state.guard_report.guard_leaf_param_ratios.values
    assert ratios.shape == (0,) and ratios.dtype == np.float32


def test_a_nan_in_the_first_of_two_state_leaves_paired_with_an_update_leaf_skips():
    """Adam's layout: two state leaves per parameter (m, then v); a NaN in the first of
    the two paired with a leaf, the second finite, still skips the step."""

    def inner():
        def update(updates, state, params=None):
            m = jax.tree.map(lambda g: g * jnp.nan, updates)
            return updates, {"m": m, "v": jax.tree.map(jnp.abs, updates)}

        zeros = lambda p: jax.tree.map(jnp.zeros_like, p)
        return optax.GradientTransformation(lambda p: {"m": zeros(p), "v": zeros(p)}, update)

    tx = gh.guard(inner())
    params = {"a": jnp.ones(3), "b": jnp.ones(3)}
    _, state = jax.jit(tx.update)({"a": jnp.ones(3), "b": jnp.ones(3)}, tx.init(params), params)
    assert int(gh.metrics(state)["grad/num_nonfinite_updates"]) == 1
