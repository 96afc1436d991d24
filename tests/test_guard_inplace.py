"""The guard's skip path under jit with donation: no copy of the inner state, exact skips.

The structural check reads XLA's compiled program (no timing): a copy of a moment leaf
would be a gradient-sized ``copy(`` of an optimizer-state parameter.
"""

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gradhealth as gh
from optax_gradhealth import _skip


def _params():
    return {"w": jnp.ones((64, 32), jnp.float32), "b": jnp.ones((32,), jnp.float32)}


def _compiled_step(tx, params):
    def step(params, state, grads, loss):
        updates, state = tx.update(grads, state, params, loss=loss)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    return jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params, jnp.float32(1.0)).compile()


@pytest.mark.parametrize("spike_action", ["skip", "clip", "record"])
@pytest.mark.parametrize("reset_after", [3, None])
def test_guard_with_donation_copies_no_array(reset_after, spike_action):
    tx = gh.guard(
        optax.adamw(1e-3), clip=1.0, loss_spike_zscore=3.0, reset_after=reset_after, spike_action=spike_action
    )
    hlo = _compiled_step(tx, _params()).as_text()
    array_copies = re.findall(r"f32\[\d+(?:,\d+)*\]\{[\d,]*\} copy\(", hlo)
    assert array_copies == []


def _param_sized_copies(hlo: str, params) -> list[str]:
    shapes = {f"f32[{','.join(map(str, x.shape))}]" for x in jax.tree.leaves(params)}
    return [c for c in re.findall(r"(f32\[[\d,]*\])\{[\d,]*\} copy\(", hlo) if c in shapes]


def _compiled_plain_step(tx, params):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params).compile()


@pytest.mark.parametrize(
    "inner",
    [
        lambda: optax.adamw(1e-3),
        lambda: optax.sgd(1e-2, momentum=0.9),
        lambda: optax.lion(1e-4),
        lambda: optax.adafactor(1e-3),
        lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=optax.linear_schedule(1e-3, 0.0, 100)),
    ],
    ids=["adamw", "sgd-momentum", "lion", "adafactor", "inject-schedule"],
)
@pytest.mark.parametrize(
    "clip",
    [None, 1.0, lambda: gh.ZScoreClip(), lambda: gh.PercentileClip(), lambda: gh.clip_by_leaf_norm(1.0)],
    ids=["none", "fixed", "zscore", "percentile", "layer-norm-mode"],
)
def test_guard_adds_no_parameter_sized_copy_to_any_inner_optimizer(inner, clip):
    """Under donation, guard(inner) copies no more parameter-sized arrays than inner alone
    (optax's lion copies its moment by itself; the guard must not add any)."""
    params = _params()
    clip = clip() if callable(clip) else clip
    bare = _param_sized_copies(_compiled_plain_step(inner(), params).as_text(), params)
    tx = gh.guard(inner(), clip=clip, spike_action="record", reset_after=2)
    guarded = _param_sized_copies(_compiled_plain_step(tx, params).as_text(), params)
    assert len(guarded) <= len(bare), (guarded, bare)


def test_guard_step_has_no_per_leaf_slices_and_no_scatter():
    """Compile time on XLA:CPU grows with the number of kernels: per-layer norms are kept
    as one vector (no slice per leaf), the rescaled norm pass reduces each leaf once, and
    ring buffers are written by select, not scatter (which XLA:CPU expands into a loop)."""
    params = {f"layer_{i:02d}": jnp.ones((8, 4 + i), jnp.float32) for i in range(24)}
    tx = gh.guard(
        optax.adamw(1e-3), clip=1.0, spike_action="skip", reset_after=3, loss_spike_zscore=3.0, vanishing_norm=1e-6
    )
    hlo = _compiled_step(tx, params).as_text()
    assert re.findall(r" slice\(", hlo) == []
    assert re.findall(r" (?:scatter|dynamic-update-slice)\(", hlo) == []
    reductions = re.findall(r"f32\[\] reduce\(", hlo)
    # One first-pass and one rescaled reduction per leaf, and update health's of the
    # update and of the parameter (plus a few over the leaf vectors).
    assert 4 * len(params) <= len(reductions) <= 4 * len(params) + 8
    # The recorded per-layer norms are one float32[24] vector in the state.
    state = tx.init(params)
    assert isinstance(state.guard_report.guard_leaf_norms, gh.LeafNorms)
    assert state.guard_report.guard_leaf_norms.values.shape == (len(params),)


def _calls_and_widest_kernel(num_leaves: int, same_shape: bool = False, **kwargs: Any) -> tuple[int, int]:
    shape = lambda i: (8, 4) if same_shape else (8, 4 + i)
    params = {f"layer_{i:02d}": jnp.ones(shape(i), jnp.float32) for i in range(num_leaves)}
    tx = gh.guard(
        optax.adamw(1e-3),
        clip=1.0,
        spike_action="skip",
        reset_after=3,
        loss_spike_zscore=3.0,
        vanishing_norm=1e-6,
        **kwargs,
    )

    def step(params, state, grads, loss):
        updates, state = tx.update(grads, state, params, loss=loss)
        return optax.apply_updates(params, updates), state

    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params, jnp.float32(1.0))
    calls = re.findall(r"call @\w+", lowered.as_text())
    operands = [m.count("%") for m in re.findall(r" fusion\((.*?)\), kind=", lowered.compile().as_text())]
    return len(calls), max(operands)


def test_guard_step_adds_no_per_leaf_calls_or_one_operand_per_leaf_kernels():
    """Compile-time structure: doubling the leaves adds no nested call (``jnp.where``
    traces one per use: a call per leaf, thousands on a large tree, each inlined by XLA)
    and no kernel reads one operand per leaf (the vector of per-leaf sums is built once,
    not fused into each of its consumers)."""
    calls_12, widest_12 = _calls_and_widest_kernel(12)
    calls_24, widest_24 = _calls_and_widest_kernel(24)
    assert calls_24 == calls_12
    # A kernel of one operand per leaf has at least 24 at 24 leaves (the widest, leaves
    # aside, has 23 here on XLA:CPU), and grows with them.
    assert widest_24 == widest_12 < 24


def test_update_check_kernels_stay_narrow_when_many_leaves_share_a_shape():
    """The update check (update health off) ands the finite flags of leaves of one shape
    before reducing them, a bounded number at a time: with one group per shape, a tree of
    1000 leaves in a few shapes compiled kernels of hundreds of operands (43 s of code
    generation out of 59 s on XLA:CPU, benchmarks/compile_profile.py)."""
    _, widest_48 = _calls_and_widest_kernel(48, same_shape=True, update_health=False)
    _, widest_96 = _calls_and_widest_kernel(96, same_shape=True, update_health=False)
    # (On so small a tree XLA may fuse a few groups' reductions into one kernel: the
    # widest kernel must not grow with the leaves, not be the same at both sizes.)
    assert widest_96 <= widest_48, (widest_48, widest_96)


def _run(tx, grads_seq, params, jit):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates

    step = jax.jit(step, donate_argnums=(0, 1)) if jit else step
    state = tx.init(params)
    out = []
    for grads in grads_seq:
        before = jax.tree.map(np.asarray, state.guard_inner_state)
        params, state, updates = step(params, state, grads)
        out.append((before, jax.tree.map(np.asarray, state.guard_inner_state), jax.tree.map(np.asarray, updates)))
    return out


@pytest.mark.parametrize("jit", [True, False])
def test_skipped_steps_keep_the_state_bit_for_bit_and_applied_steps_match_adam(jit):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)}
    grads_seq = [{"w": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)} for _ in range(6)]
    grads_seq[2] = {"w": grads_seq[2]["w"].at[0, 0].set(jnp.nan)}
    grads_seq[3] = {"w": grads_seq[3]["w"].at[1, 1].set(jnp.inf)}
    tx = gh.guard(optax.adam(0.1), spike_threshold=None, spike_zscore=None)
    out = _run(tx, grads_seq, jax.tree.map(jnp.copy, params), jit)

    # Adam written out in numpy float64, fed only the finite gradients.
    mu = np.zeros((8, 4))
    nu = np.zeros((8, 4))
    count = 0
    for t, (before, after, updates) in enumerate(out):
        if t in (2, 3):
            for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
                np.testing.assert_array_equal(new, old)  # bit for bit
            np.testing.assert_array_equal(updates["w"], np.zeros((8, 4), np.float32))
            continue
        g = np.asarray(grads_seq[t]["w"], np.float64)
        count += 1
        mu = 0.9 * mu + 0.1 * g
        nu = 0.999 * nu + 0.001 * g * g
        expected = -0.1 * (mu / (1 - 0.9**count)) / (np.sqrt(nu / (1 - 0.999**count)) + 1e-8)
        np.testing.assert_allclose(updates["w"], expected, rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose(after[0].mu["w"], mu, rtol=2e-6, atol=1e-9)
        assert int(after[0].count) == count


def test_selected_state_reaches_values_computed_inside_calls_and_duplicates():
    """An inner whose state leaves come out of a jit call, twice, and as a passthrough."""

    @jax.jit
    def inner_math(g, m):
        m_new = 0.5 * m + g
        return m_new, 2.0 * m_new

    def update(g, state):
        m_new, u = inner_math(g, state[0])
        return u, (m_new, m_new, state[2])

    g = jnp.arange(4.0)
    state = (jnp.ones(4), jnp.full(4, 7.0), jnp.full(4, 3.0))
    old = jax.tree.leaves(state)

    @jax.jit
    def run(skip):
        return _skip.update_with_selected_state(
            lambda: update(g, state), lambda k, new: jnp.where(skip, old[k], new), inputs=(g, state, skip)
        )

    u, s = run(True)
    for got, want in zip(s, state):
        np.testing.assert_array_equal(got, want)
    # On a skip the updates read the selected (old) state: 2 * m_old.
    np.testing.assert_array_equal(u, 2.0 * np.ones(4))
    u, s = run(False)
    m_new = 0.5 * np.ones(4) + np.arange(4.0)
    np.testing.assert_array_equal(s[0], m_new)
    np.testing.assert_array_equal(s[1], m_new)
    np.testing.assert_array_equal(s[2], np.full(4, 3.0))
    np.testing.assert_array_equal(u, 2.0 * m_new)


# ------------------------------------------------------------ many inner optimizers, exact skips

_CURVATURE = {"w": np.linspace(0.5, 2.0, 24).reshape(6, 4), "b": np.linspace(1.0, 3.0, 4)}
_TARGET = {"w": np.linspace(-1.0, 1.0, 24).reshape(6, 4), "b": np.linspace(2.0, -2.0, 4)}


def _objective(params):
    """A fixed quadratic, so that every optimizer (line searches included) gets the exact
    gradient of the value it is given."""
    return sum(
        0.5 * jnp.sum(jnp.asarray(_CURVATURE[k], jnp.float32) * jnp.square(params[k] - _TARGET[k])) for k in params
    )


_INNERS = {
    "adamw": lambda: optax.adamw(0.05, weight_decay=1e-2),
    "sgd-nesterov": lambda: optax.sgd(0.05, momentum=0.9, nesterov=True),
    "multi-transform": lambda: optax.multi_transform(
        {"a": optax.adam(0.05), "s": optax.sgd(0.05, momentum=0.9)}, {"w": "a", "b": "s"}
    ),
    "masked": lambda: optax.chain(optax.masked(optax.adam(0.05), {"w": True, "b": False}), optax.sgd(0.01)),
    "inject-schedule": lambda: optax.inject_hyperparams(optax.adamw)(
        learning_rate=optax.cosine_decay_schedule(0.05, 50)
    ),
    "muon": lambda: optax.contrib.muon(0.02),  # Newton-Schulz iterations: a loop inside the update
    "schedule-free": lambda: optax.contrib.schedule_free_adamw(0.05, warmup_steps=2),
    "lbfgs": lambda: optax.lbfgs(),  # a line search: a while_loop calling the value function
}


def _trajectory(tx, faults, steps):
    """Runs ``steps`` jitted steps of ``tx`` on the quadratic; at each step in ``faults``
    the gradient gets that value at one element. Returns (params, inner-state leaves,
    updates) after every step."""

    def step(params, state, fault):
        value, grads = jax.value_and_grad(_objective)(params)
        grads = {**grads, "w": grads["w"].at[0, 0].add(fault)}  # fault 0.0 leaves it as it is
        updates, state = tx.update(grads, state, params, value=value, grad=grads, value_fn=_objective)
        return optax.apply_updates(params, updates), state, updates

    step = jax.jit(step)
    params = {k: jnp.zeros(np.shape(v), jnp.float32) for k, v in _TARGET.items()}
    state = tx.init(params)
    out = []
    for t in range(steps):
        params, state, updates = step(params, state, jnp.float32(faults.get(t, 0.0)))
        inner = state.guard_inner_state if isinstance(state, gh.GuardState) else state
        out.append(jax.tree.map(np.asarray, (params, jax.tree.leaves(inner), updates)))
    return out


@pytest.mark.parametrize("name", list(_INNERS))
def test_guard_skips_exactly_and_otherwise_follows_the_bare_optimizer(name):
    """guard(inner) on a run with a NaN and an Inf gradient: the skipped steps change
    nothing (inner state bit for bit, zero updates, parameters unchanged), and the other
    steps follow the bare optimizer run on the clean steps alone (the guard's state
    substitution reaches inside loops and line searches without changing the math)."""
    faults = {2: float("nan"), 3: float("inf"), 6: float("-inf")}
    steps = 10
    guarded = _trajectory(gh.guard(_INNERS[name](), spike_threshold=None, spike_zscore=None), faults, steps)
    bare = _trajectory(_INNERS[name](), {}, steps - len(faults))
    clean = iter(bare)
    for t, (params, inner, updates) in enumerate(guarded):
        if t in faults:
            prev_params, prev_inner, _ = guarded[t - 1]
            for new, old in zip(inner, prev_inner):
                np.testing.assert_array_equal(new, old)
            for leaf in jax.tree.leaves(updates):
                np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
            jax.tree.map(np.testing.assert_array_equal, params, prev_params)
            continue
        want_params, want_inner, want_updates = next(clean)
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), updates, want_updates)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), params, want_params)
        assert len(inner) == len(want_inner)
        for got, want in zip(inner, want_inner):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
