"""optax_gradhealth._skip: the per-leaf selects and the inner update whose state is selected
where it is produced, against the rule written out in numpy (float64) here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_gradhealth import _skip

LR, DECAY = 0.1, 0.9


def test_selects_where_picks_casts_and_checks_shapes():
    sel = _skip.Selects()
    on_false = jnp.array([1.0, 2.0], jnp.float16)
    for pred in (True, False):
        out = sel.where(jnp.asarray(pred), jnp.array([3, 4], jnp.int32), on_false)
        assert out.dtype == jnp.float16 and out.shape == (2,)
        np.testing.assert_array_equal(np.asarray(out, np.float64), [3.0, 4.0] if pred else [1.0, 2.0])
    # A scalar on_true is not broadcast: the shapes must agree.
    with pytest.raises(ValueError, match=r"on_true has shape \(\), on_false \(2,\)"):
        sel.where(jnp.asarray(True), jnp.float16(0), on_false)
    # The same predicate on leaves of two shapes: one broadcast per shape, each right.
    pred = jnp.asarray(True)
    a = sel.where(pred, jnp.ones((2, 3)), jnp.zeros((2, 3)))
    b = sel.where(pred, jnp.ones((4,)), jnp.zeros((4,)))
    np.testing.assert_array_equal(np.asarray(a), np.ones((2, 3)))
    np.testing.assert_array_equal(np.asarray(b), np.ones(4))


def test_selects_zeros_and_zero_floats_where():
    sel = _skip.Selects()
    z = sel.zeros(jnp.ones((2, 3), jnp.bfloat16))
    assert z.shape == (2, 3) and z.dtype == jnp.bfloat16 and not np.asarray(z, np.float32).any()
    tree = {"w": jnp.array([1.5, -2.0]), "h": jnp.array([3.0], jnp.float16), "step": jnp.array(7, jnp.int32)}
    kept = sel.zero_floats_where(jnp.asarray(False), tree)
    zeroed = sel.zero_floats_where(jnp.asarray(True), tree)
    for name in tree:
        np.testing.assert_array_equal(np.asarray(kept[name]), np.asarray(tree[name]))
        assert zeroed[name].dtype == tree[name].dtype and zeroed[name].shape == tree[name].shape
    np.testing.assert_array_equal(np.asarray(zeroed["w"]), [0.0, 0.0])
    np.testing.assert_array_equal(np.asarray(zeroed["h"], np.float32), [0.0])
    assert int(zeroed["step"]) == 7  # non-float leaves pass through


def _inner_update(grads, state, fixed):
    """A small momentum optimizer. State leaves (in order): the momentum (computed), the
    same momentum again (one value in two slots), ``fixed`` (passed through from the
    closure) and a step count (computed). The updates read the new momentum."""
    mu, _, _, count = state
    new_mu = DECAY * mu + grads
    return -LR * new_mu, (new_mu, new_mu, fixed, count + 1)


def _reference(grads, state, skip):
    """The contract written out: state' = old state where skip, else the new state; the
    updates are computed from state' (so from the old momentum on a skipped step)."""
    mu, _, fixed, count = (np.asarray(x, np.float64) for x in state)
    new_mu = DECAY * mu + np.asarray(grads, np.float64)
    new = (new_mu, new_mu, fixed, count + 1)
    selected = tuple(np.asarray(o, np.float64) for o in state) if skip else new
    return -LR * selected[0], selected


def _run(skip, traced, nested_jit):
    grads = jnp.array([1.0, -2.0, 0.5], jnp.float32)
    state = (jnp.array([0.5, 0.25, -1.0]), jnp.array([9.0, 9.0, 9.0]), jnp.array([4.0, 5.0, 6.0]), jnp.int32(3))
    calls = []

    def step(grads, state, skip):
        old = jax.tree.leaves(state)

        def select(k, new):
            calls.append(k)
            return jnp.where(skip, old[k], new)

        inner = jax.jit(_inner_update) if nested_jit else _inner_update
        return _skip.update_with_selected_state(
            lambda: inner(grads, state, state[2]), select, inputs=(grads, state, skip)
        )

    step = jax.jit(step) if traced else step
    updates, new_state = step(grads, state, jnp.asarray(skip))
    assert sorted(set(calls)) == [0, 1, 2, 3]  # every state slot went through select
    return (grads, state), updates, new_state


@pytest.mark.parametrize("nested_jit", [False, True], ids=["inline", "nested-jit"])
@pytest.mark.parametrize("skip", [False, True], ids=["applied", "skipped"])
def test_traced_update_reads_the_selected_state(skip, nested_jit):
    (grads, state), updates, new_state = _run(skip, traced=True, nested_jit=nested_jit)
    expected_updates, expected_state = _reference(grads, state, skip)
    np.testing.assert_allclose(np.asarray(updates), expected_updates, rtol=1e-6)
    for got, want in zip(new_state, expected_state):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6)
    if skip:  # a skipped step leaves every state leaf bit for bit as it was
        for got, old in zip(new_state, state):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(old))
            assert got.dtype == old.dtype


@pytest.mark.parametrize("skip", [False, True], ids=["applied", "skipped"])
def test_eager_update_is_called_plainly_and_its_state_selected(skip):
    (grads, state), updates, new_state = _run(skip, traced=False, nested_jit=False)
    # Eagerly the updates are the plain ones (the caller discards them on a skipped step).
    plain_updates, _ = _reference(grads, state, skip=False)
    np.testing.assert_allclose(np.asarray(updates), plain_updates, rtol=1e-6)
    _, expected_state = _reference(grads, state, skip)
    for got, want in zip(new_state, expected_state):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6)


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "jit"])
def test_traced_update_outputs_are_the_plain_update_and_both_readings_agree(traced):
    grads = jnp.array([1.0, -2.0, 0.5], jnp.float32)
    state = (jnp.array([0.5, 0.25, -1.0]), jnp.array([9.0, 9.0, 9.0]), jnp.array([4.0, 5.0, 6.0]), jnp.int32(3))

    def step(grads, state):
        old = jax.tree.leaves(state)
        traced_update = _skip.TracedUpdate(lambda: _inner_update(grads, state, state[2]), inputs=(grads, state))
        plain = traced_update.outputs()
        skipped = traced_update.with_selected_state(lambda k, new: old[k])  # every leaf kept
        return plain, skipped

    step = jax.jit(step) if traced else step
    (updates, new_state), (_, kept_state) = step(grads, state)
    expected_updates, expected_state = _reference(grads, state, skip=False)
    np.testing.assert_allclose(np.asarray(updates), expected_updates, rtol=1e-6)
    for got, want in zip(new_state, expected_state):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6)
    for got, old in zip(kept_state, state):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(old))
