"""optax_gradhealth._skip: the per-leaf selects and the inner update whose state is selected
where it is produced, against the rule written out in numpy (float64) here."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gradhealth as gh
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
    # Every state slot went through select exactly once (a second select of the same
    # slot would be one more operation on every step).
    assert collections.Counter(calls) == {0: 1, 1: 1, 2: 1, 3: 1}
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


def test_traced_update_out_shapes_describe_both_outputs():
    """``out_shapes`` is ``(updates, new_state)`` as ShapeDtypeStructs, eagerly and traced
    (the guard checks the inner state's structure against it)."""
    grads = jnp.array([1.0, -2.0, 0.5], jnp.float32)
    state = (jnp.zeros(3, jnp.bfloat16), jnp.zeros(3), jnp.ones((2, 2)), jnp.int32(0))
    want = (
        jax.ShapeDtypeStruct((3,), jnp.float32),
        (
            jax.ShapeDtypeStruct((3,), jnp.float32),  # bf16 momentum + f32 gradient: promoted
            jax.ShapeDtypeStruct((3,), jnp.float32),
            jax.ShapeDtypeStruct((2, 2), jnp.float32),
            jax.ShapeDtypeStruct((), jnp.int32),
        ),
    )
    got = []

    def step(grads, state):
        traced = _skip.TracedUpdate(lambda: _inner_update(grads, state, state[2]), inputs=(grads, state))
        got.append(traced.out_shapes)
        return traced.outputs()

    step(grads, state)
    jax.jit(step)(grads, state)
    for shapes in got:
        assert jax.tree.structure(shapes) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(shapes), jax.tree.leaves(want)):
            assert (a.shape, a.dtype) == (b.shape, b.dtype)


def _loop_update(grads, state):
    """A momentum optimizer whose state is produced inside a nested jit that outputs
    only state, whose updates read the step count (after a duplicated and a passed-
    through slot), go through a loop (a `scan` with a closed jaxpr of its own, to be
    bound, not inlined) and a reduction (a primitive with parameters), and add noise
    drawn under a trace-time setting (the equation's context)."""
    mu, _, fixed, count, key = state
    new_mu = jax.jit(lambda mu, g: DECAY * mu + g)(mu, grads)
    new_count = count + 1
    total = jax.lax.fori_loop(0, 3, lambda i, acc: acc + new_mu, jnp.zeros_like(new_mu))
    scale = jnp.sum(jnp.abs(new_mu)) / new_count.astype(jnp.float32)
    with jax.threefry_partitionable(not jax.config.jax_threefry_partitionable):
        noise = jax.random.uniform(key, new_mu.shape)
    updates = -LR * total / 3.0 * scale + noise
    return updates, (new_mu, new_mu, fixed, new_count, key)


@pytest.mark.parametrize("skip", [False, True], ids=["applied", "skipped"])
def test_traced_update_inlines_state_calls_binds_loops_and_keeps_contexts(skip):
    grads = jnp.array([1.0, -2.0, 0.5], jnp.float32)
    key = jax.random.key(3)
    state = (jnp.array([0.5, 0.25, -1.0]), jnp.array([9.0, 9.0, 9.0]), jnp.array([4.0, 5.0, 6.0]), jnp.int32(3), key)

    @jax.jit
    def step(grads, state, skip):
        old = jax.tree.leaves(state)
        select = lambda k, new: jnp.where(skip, old[k], new)
        return _skip.update_with_selected_state(lambda: _loop_update(grads, state), select, inputs=(grads, state))

    updates, new_state = step(grads, state, jnp.asarray(skip))
    # The reference: the selected momentum and count, then the formula in float64.
    mu, count = np.asarray(state[0], np.float64), int(state[3])
    new_mu, new_count = DECAY * mu + np.asarray(grads, np.float64), count + 1
    sel_mu, sel_count = (mu, count) if skip else (new_mu, new_count)
    with jax.threefry_partitionable(not jax.config.jax_threefry_partitionable):
        noise = np.asarray(jax.random.uniform(key, (3,)), np.float64)
    expected = -LR * sel_mu * (np.abs(sel_mu).sum() / sel_count) + noise
    np.testing.assert_allclose(np.asarray(updates), expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new_state[0]), sel_mu, rtol=1e-6)
    assert int(new_state[3]) == sel_count


def test_selects_broadcast_each_predicate_once_per_shape():
    """Selects on one predicate share its broadcast per shape (a 1000-leaf tree would
    otherwise carry thousands of duplicate broadcasts for the compiler to walk)."""

    def selects(pred, a, b, c):
        sel = _skip.Selects()
        return sel.where(pred, a, b), sel.where(pred, b, a), sel.where(pred, c, c), sel.where(~pred, a, b)

    x, y = jnp.ones((4, 3)), jnp.zeros((4, 3))
    jaxpr = jax.make_jaxpr(selects)(jnp.asarray(True), x, y, jnp.ones(5))
    broadcasts = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "broadcast_in_dim"]
    # pred to (4, 3) and to (5,), ~pred to (4, 3): three, not four.
    assert len(broadcasts) == 3


@pytest.mark.parametrize("selected", [False, True], ids=["outputs", "with_selected_state"])
def test_traced_update_rebinds_every_equation_under_its_trace_time_context(selected):
    """The interpreter binds each equation again under the context it was traced in (its
    threefry setting, compute type, XLA metadata): the re-evaluated program keeps it."""
    flipped = not jax.config.jax_threefry_partitionable

    def update(grads, state):
        with jax.threefry_partitionable(flipped):
            marked = grads * 3.0  # a plain primitive traced under the flipped setting
        return marked, (state + 1.0,)

    def evaluate(grads, state):
        traced = _skip.TracedUpdate(lambda: update(grads, state), inputs=(grads, state))
        if selected:
            return traced.with_selected_state(lambda k, new: new)
        return traced.outputs()

    jaxpr = jax.make_jaxpr(evaluate)(jnp.ones(3), jnp.zeros(3))
    muls = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "mul"]
    assert len(muls) == 1 and muls[0].ctx.threefry_partitionable == flipped
    adds = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "add"]
    assert len(adds) == 1 and adds[0].ctx.threefry_partitionable == jax.config.jax_threefry_partitionable


def _callback_everywhere(calls):
    """An update whose every higher-order primitive logs: a callback in a `cond` branch
    (with a jitted helper inside), a `while` condition and body, a `scan` body, a
    `checkpoint`, a `custom_jvp` and a `custom_vjp` function, and an ordered print; plus
    a write to a `jax.Ref` (no output, an effect: not a callback) the update reads."""

    def log(tag):
        jax.debug.callback(lambda: calls.append(tag))

    @jax.custom_jvp
    def twice(x):
        log("custom_jvp")
        return 2.0 * x

    twice.defjvp(lambda p, t: (twice(p[0]), 2.0 * t[0]))

    @jax.custom_vjp
    def thrice(x):
        log("custom_vjp")
        return 3.0 * x

    thrice.defvjp(lambda x: (thrice(x), None), lambda _, g: (3.0 * g,))

    def update(grads, mu):
        def branch(g):
            log("cond")
            return jax.jit(lambda g: (log("jit in cond"), g + 1.0)[1])(g)

        g = jax.lax.cond(jnp.sum(grads) > 0, branch, lambda g: g - 1.0, grads)

        def cond_fun(c):
            log("while cond")
            return c[0] < 2

        def body_fun(c):
            log("while body")
            return c[0] + 1, c[1] * 0.5

        _, g = jax.lax.while_loop(cond_fun, body_fun, (0, g))
        g, _ = jax.lax.scan(lambda c, _: ((log("scan"), c + 1.0)[1], None), g, None, length=2)
        g = jax.checkpoint(lambda g: (log("checkpoint"), g * 4.0)[1])(g)
        g = thrice(twice(g))
        jax.debug.print("ordered {}", jnp.sum(g), ordered=True)
        ref = jax.new_ref(jnp.zeros_like(g))
        jax.ref.addupdate(ref, ..., g)
        new_mu = DECAY * mu + ref[...]
        return -LR * new_mu, (new_mu,)

    return update


def _callback_reference(grads, mu):
    g = np.asarray(grads, np.float64)
    g = g + 1.0 if g.sum() > 0 else g - 1.0
    g = ((g * 0.25 + 2.0) * 4.0) * 6.0
    new_mu = DECAY * np.asarray(mu, np.float64) + g
    return -LR * new_mu, new_mu


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["branch-logs", "branch-silent"])
def test_checking_evaluation_leaves_out_callbacks_at_every_depth(sign, capfd):
    """The evaluation that only checks the outputs (`outputs`, under jit) runs no host
    callback, at any depth of cond / while / scan / checkpoint / custom_jvp / custom_vjp
    / jit; the selected evaluation runs each once, as the bare update does. A write to a
    `jax.Ref` is not a callback: both evaluations keep it (their outputs read it)."""
    grads, mu = sign * jnp.array([1.0, 2.0, 0.5]), jnp.array([0.5, -0.25, 1.0])
    bare_calls, calls = [], []
    bare = jax.jit(_callback_everywhere(bare_calls))(grads, mu)
    update = _callback_everywhere(calls)

    @jax.jit
    def both(grads, mu):
        traced = _skip.TracedUpdate(lambda: update(grads, mu), inputs=(grads, mu))
        return traced.outputs(), traced.with_selected_state(lambda k, new: new)

    checked, selected = both(grads, mu)
    jax.effects_barrier()
    assert sorted(calls) == sorted(bare_calls)
    assert ("cond" in calls) == (sign > 0)
    assert calls.count("while body") == 2 and calls.count("scan") == 2
    assert capfd.readouterr().out.count("ordered ") == 2  # bare + selected, not checked
    want_updates, want_mu = _callback_reference(grads, mu)
    for updates, (new_mu,) in (bare, checked, selected):
        np.testing.assert_allclose(np.asarray(updates), want_updates, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(new_mu), want_mu, rtol=1e-6)


def test_guarded_multisteps_runs_an_inner_callback_once_per_update():
    """optax.MultiSteps runs its inner update inside a `cond`: a callback there runs as
    often under the guard (update check on) as in bare MultiSteps."""

    def logging(calls):
        def update(u, s, p=None):
            jax.debug.callback(lambda: calls.append(1))
            return u, s

        return optax.GradientTransformation(lambda p: optax.EmptyState(), update)

    counts = {}
    for name in ("bare", "guard"):
        calls = []
        tx = optax.MultiSteps(optax.chain(logging(calls), optax.adam(0.1)), 2).gradient_transformation()
        tx = gh.guard(tx) if name == "guard" else tx
        params = {"w": jnp.ones(3)}
        state = tx.init(params)
        step = jax.jit(tx.update)
        for _ in range(4):
            _, state = step({"w": jnp.ones(3)}, state, params)
        jax.effects_barrier()
        counts[name] = len(calls)
    assert counts["bare"] > 0 and counts["guard"] == counts["bare"]
