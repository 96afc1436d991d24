"""gh.guard: skip, spike, momentum reset, rollback, vanishing; scan, jit, donation; metrics."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gradhealth as gh
from optax_gradhealth import _detectors as detect
from optax_gradhealth import _guard
from tests.test_detectors import _actions_written_out

# ---------------------------------------------------------------------------------------
# A small linear-regression problem whose gradients depend on the parameters, so that a
# skipped or corrupted step changes the whole trajectory unless it is handled exactly.

STEPS = 250
BATCH = 32


def make_data(seed=0, steps=STEPS):
    rng = np.random.default_rng(seed)
    true_w = rng.normal(size=(8, 4))
    x = rng.normal(size=(steps, BATCH, 8))
    y = x @ true_w + 0.3 * rng.normal(size=(steps, BATCH, 4))
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def init_params():
    return {"dense": {"kernel": jnp.zeros((8, 4)), "bias": jnp.zeros((4,))}}


def loss_fn(params, x, y):
    pred = x @ params["dense"]["kernel"] + params["dense"]["bias"]
    return jnp.mean((pred - y) ** 2)


def corrupt(grads, fault):
    """fault: 0 clean, 1 NaN, 2 Inf, 3 spike (x100)."""
    scale = jnp.where(fault == 3, 100.0, 1.0)
    poison = jnp.where(fault == 1, jnp.nan, jnp.where(fault == 2, jnp.inf, 0.0))
    return jax.tree.map(lambda g: g * scale + poison, grads)


def guarded_run(tx, faults, data, params=None):
    """The whole run under one jit, in lax.scan, with params and state donated."""
    x, y = data
    params = init_params() if params is None else params

    @jax.jit
    def run(params, opt_state):
        def step(carry, inputs):
            params, opt_state = carry
            xb, yb, fault = inputs
            loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
            updates, opt_state = tx.update(corrupt(grads, fault), opt_state, params, loss=loss)
            params = optax.apply_updates(params, updates)
            return (params, opt_state), (params, gh.metrics(opt_state))

        return jax.lax.scan(step, (params, opt_state), (x, y, faults))

    run = jax.jit(run, donate_argnums=(0, 1))
    opt_state = tx.init(params)
    (params, opt_state), (trajectory, history) = run(params, opt_state)
    return params, opt_state, trajectory, history


def reference_run(make_inner, data, skip_steps, reset_steps, clipped_steps=None):
    """Plain optax optimizer, step by step: skipped steps are simply left out, and at a
    reset step the optimizer state is re-initialised (params kept). ``clipped_steps``
    maps a step to ``(factor, max_norm)``: its gradient times ``factor`` (the injected
    spike), scaled down to ``max_norm`` in float64."""
    x, y = data
    inner = make_inner()
    params = init_params()
    state = inner.init(params)
    clipped_steps = clipped_steps or {}

    @jax.jit
    def step(params, state, grads):
        updates, state = inner.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    trajectory = []
    for t in range(x.shape[0]):
        if t not in skip_steps:
            grads = jax.grad(loss_fn)(params, x[t], y[t])
            if t in clipped_steps:
                factor, max_norm = clipped_steps[t]
                big = [np.asarray(g, np.float64) * factor for g in jax.tree.leaves(grads)]
                scale = min(1.0, max_norm / np.sqrt(sum(float(np.sum(g * g)) for g in big)))
                grads = jax.tree.unflatten(jax.tree.structure(grads), [jnp.float32(g * scale) for g in big])
            params, state = step(params, state, grads)
        if t in reset_steps:
            state = inner.init(params)
        trajectory.append(params)
    return trajectory


def expected_actions(spike_steps, reset_after, window):
    """The skip / clip / reset rule of ``spike_action='skip'`` written out
    (``test_detectors._actions_written_out``) on the spikes at ``spike_steps``, each after
    a spike when the step before it is one: ``(skipped, clipped, resets)``."""
    steps = max(spike_steps) + 1
    spikes = [t in spike_steps for t in range(steps)]
    after = [t - 1 in spike_steps for t in range(steps)]
    actions = _actions_written_out(spikes, after, window, reset_after, reset_after)
    skipped = [t for t in spike_steps if not actions[t][0]]
    clipped = [t for t in spike_steps if actions[t][0]]
    return skipped, clipped, [t for t in spike_steps if actions[t][1]]


def test_fault_injection_run_in_scan_with_donation():
    data = make_data()
    # A run of three spikes (skipped, the third resets the moments), a spike after the
    # reset emptied the ring (skipped), one that recurs 30 steps later (clipped to the
    # spike bound) and one more than `reset_window` steps after the last skipped spike
    # (skipped).
    nan_steps, inf_steps, spike_steps = [30, 46, 47], [45], [60, 61, 62, 90, 120, 200]
    faults = np.zeros(STEPS, np.int32)
    faults[nan_steps], faults[inf_steps], faults[spike_steps] = 1, 2, 3
    tx = gh.guard(optax.adamw(1e-2), clip=None, spike_action="skip", reset_after=3, reset_window=100)
    _params, opt_state, trajectory, history = guarded_run(tx, jnp.asarray(faults), data)
    history = jax.device_get(history)
    skipped_spikes, clipped_spikes, resets = expected_actions(spike_steps, reset_after=3, window=100)
    assert (skipped_spikes, clipped_spikes, resets) == ([60, 61, 62, 90, 200], [120], [62])

    # Parameters are finite at every step.
    for leaf in jax.tree.leaves(trajectory):
        assert np.isfinite(leaf).all()
    # Exactly the injected steps were non-finite / spikes / skipped: no clean step skipped.
    bad = sorted(nan_steps + inf_steps)
    np.testing.assert_array_equal(np.flatnonzero(~history["grad/finite"]), bad)
    np.testing.assert_array_equal(np.flatnonzero(history["grad/spiked"]), spike_steps)
    np.testing.assert_array_equal(np.flatnonzero(history["grad/skipped"]), sorted(bad + skipped_spikes))
    np.testing.assert_array_equal(np.flatnonzero(history["grad/clipped"]), clipped_spikes)
    m = gh.metrics(opt_state)
    assert int(m["grad/num_nonfinite"]) == len(bad)
    assert int(m["grad/num_spikes"]) == len(spike_steps)
    assert int(m["grad/num_skipped"]) == len(bad) + len(skipped_spikes)
    assert int(m["grad/num_clipped"]) == len(clipped_spikes)
    assert int(m["grad/num_steps"]) == STEPS
    np.testing.assert_array_equal(np.flatnonzero(history["grad/momentum_reset"]), resets)
    assert int(m["grad/num_momentum_resets"]) == len(resets)
    assert int(m["grad/first_nonfinite_leaf"]) in (0, 1)
    # The recurring spike is clipped to a bound above the window's baseline, far below
    # its x100 norm (clip=None: the bound is the only clip there is).
    bound = float(history["grad/clip_threshold"][120])
    assert np.isinf(history["grad/clip_threshold"][119])
    lower_middle = np.sort(history["grad/norm"][104:120])[7]  # the baseline's 16 norms
    assert 5.0 * lower_middle * 0.999 < bound < float(history["grad/norm"][120]) / 10
    np.testing.assert_allclose(history["grad/norm_clipped"][120], bound, rtol=1e-5)
    # On clean steps the trajectory equals plain adamw run without the skipped batches,
    # the recurring spike's gradient clipped to the bound.
    reference = reference_run(
        lambda: optax.adamw(1e-2), data, set(bad + skipped_spikes), set(resets), {120: (100.0, bound)}
    )
    for t in [0, 29, 30, 44, 48, 59, 63, 89, 91, 119, 120, 121, 199, 249]:
        chex.assert_trees_all_close(
            jax.tree.map(lambda leaf, t=t: leaf[t], trajectory), reference[t], rtol=2e-5, atol=1e-6
        )


def test_many_nonfinite_steps_in_a_row_never_reach_the_params():
    data = make_data(steps=60)
    faults = np.zeros(60, np.int32)
    faults[5:45] = 1  # 40 NaN steps in a row; optax.apply_if_finite(.., 5) gives in after 5
    tx = gh.guard(optax.adam(1e-2), rollback_after_nonfinite=10)
    params, opt_state, trajectory, history = guarded_run(tx, jnp.asarray(faults), data)
    chex.assert_tree_all_finite((trajectory, opt_state.guard_inner_state))
    chex.assert_tree_all_finite(
        (opt_state.guard_moments.guard_running_norm_mean, opt_state.guard_moments.guard_running_norm_var)
    )
    history = jax.device_get(history)
    assert int(history["grad/consecutive_nonfinite"][44]) == 40
    # The rollback recommendation rises at the 10th non-finite step and stays up.
    np.testing.assert_array_equal(np.flatnonzero(history["grad/rollback_recommended"]), np.arange(14, 60))
    # The inner state is untouched during the streak: params identical across it.
    chex.assert_trees_all_equal(
        jax.tree.map(lambda leaf: leaf[4], trajectory), jax.tree.map(lambda leaf: leaf[44], trajectory)
    )

    # What optax.apply_if_finite does with the same stream: NaN reaches the parameters.
    optax_tx = optax.apply_if_finite(optax.adam(1e-2), max_consecutive_errors=5)
    params = init_params()
    state = optax_tx.init(params)
    for t in range(15):
        grads = jax.grad(loss_fn)(params, data[0][t], data[1][t])
        grads = corrupt(grads, jnp.int32(faults[t]))
        updates, state = optax_tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert not np.isfinite(np.asarray(params["dense"]["kernel"])).all()


def test_skipped_step_leaves_inner_state_bitwise_identical_and_update_zero():
    tx = gh.guard(optax.adamw(1e-3, b1=0.9), clip=1.0)
    params = {"a": jnp.ones((3,)), "b": jnp.ones((2, 2), jnp.bfloat16)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for seed in range(3):
        grads = jax.tree.map(lambda p, seed=seed: jnp.full_like(p, 0.1 * (seed + 1)), params)
        _, state = update(grads, state, params)
    for bad in [jnp.nan, jnp.inf, -jnp.inf]:
        grads = {"a": jnp.array([1.0, bad, 1.0]), "b": jnp.ones((2, 2), jnp.bfloat16)}
        updates, new_state = update(grads, state, params)
        chex.assert_trees_all_equal(new_state.guard_inner_state, state.guard_inner_state)
        for leaf in jax.tree.leaves(updates):
            assert not np.asarray(leaf, np.float32).any()
        chex.assert_trees_all_equal_dtypes(updates, params)
        assert gh.leaf_names(grads)[int(new_state.guard_counters.guard_first_nonfinite_leaf)] == "a"
        state = new_state


def test_huge_finite_gradient_is_clipped_and_applied_not_skipped():
    tx = gh.guard(optax.sgd(1.0), clip=1.0)
    params = {"w": jnp.zeros(2)}
    # norm 1.4e38: threshold / norm (7e-39) would be a subnormal, flushed to zero.
    updates, state = tx.update({"w": jnp.array([1e38, 1e38])}, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["w"]), -np.full(2, 1 / np.sqrt(2)), rtol=1e-6)
    m = gh.metrics(state)
    assert bool(m["grad/finite"]) and not bool(m["grad/skipped"]) and bool(m["grad/clipped"])


def run_norm_sequence(tx, norms, loss=None):
    params = {"w": jnp.zeros(4)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    history = []
    for i, norm in enumerate(norms):
        grads = {"w": jnp.full((4,), norm / 2.0, jnp.float32)}  # global norm == norm
        extra = {} if loss is None else {"loss": loss[i]}
        _, state = update(grads, state, params, **extra)
        history.append(jax.device_get(gh.metrics(state)))
    return state, history


def window_reference(norms, window=128, baseline=16, floor=0.05):
    """The spike window's (baseline, spread) of the log-norms, in numpy float64."""
    logs = np.log(np.asarray(norms, np.float64))[-window:]
    diffs = np.diff(logs)
    spread = 1.4826 * np.median(np.abs(diffs - np.median(diffs))) / np.sqrt(2)
    return np.median(logs[-baseline:]), max(spread, floor)


def noisy_norms(n, seed=0):
    return list(1.0 + 0.1 * np.random.default_rng(seed).standard_normal(n))


def test_spike_detection_rule_and_warmup():
    tx = gh.guard(optax.sgd(0.1), spike_threshold=2.0, spike_zscore=3.0, warmup_steps=20, reset_after=None)
    norms = noisy_norms(25)
    norms[10] = 50.0  # during warm-up: not a spike
    _, history = run_norm_sequence(tx, norms)
    assert not any(h["grad/spiked"] for h in history)

    norms = noisy_norms(60)
    norms[40] = 5.0  # score ~5, z >> 3: spike
    norms[50] = 1.5  # score 1.5 < 2: not a spike
    _, history = run_norm_sequence(tx, norms)
    assert [i for i, h in enumerate(history) if h["grad/spiked"]] == [40]
    # The score and z-score against the window (the last 128 accepted, here all 40),
    # written out in float64: baseline = median of the latest 16 log-norms, spread =
    # 1.4826 MAD / sqrt(2) of the differences of consecutive log-norms, floored at 0.05.
    median, spread = window_reference(norms[:40])
    np.testing.assert_allclose(history[40]["grad/spike_score"], 5.0 / np.exp(median), rtol=1e-5)
    np.testing.assert_allclose(history[40]["grad/zscore"], (np.log(5.0) - median) / spread, rtol=1e-4)
    # grad/norm_mean and grad/norm_std report the EMA statistics, also written out:
    decay, mean, var, count = 0.98, 0.0, 0.0, 0
    for i, norm in enumerate(norms[:40]):
        count += 1
        alpha = (1 - decay) / (1 - decay**count)
        # the guard caps the value it folds in only on spikes; none before step 40
        diff = norm - mean
        mean += alpha * diff
        var = (1 - alpha) * (var + alpha * diff * diff)
        assert not history[i]["grad/spiked"]
    np.testing.assert_allclose(history[40]["grad/norm_mean"], mean, rtol=1e-4)
    np.testing.assert_allclose(history[40]["grad/norm_std"], np.sqrt(var), rtol=1e-3)
    assert int(history[-1]["grad/num_spikes"]) == 1


@pytest.mark.parametrize("action", ["skip", "clip", "record"])
def test_spike_actions(action):
    norms = noisy_norms(30)
    norms[25] = 10.0
    tx = gh.guard(optax.sgd(1.0), spike_action=action, spike_threshold=2.0, spike_zscore=3.0, reset_after=None)
    params = {"w": jnp.zeros(4)}
    # 'clip' brings a spike down to the largest norm that is not one: the larger of
    # 2 x the window's median norm and its z = 3 point (log scale, MAD floored at 0.05).
    median, spread = window_reference(norms[:25])
    bound = np.exp(max(median + np.log(2.0), median + 3.0 * spread))
    state = tx.init(params)
    for i, norm in enumerate(norms):
        grads = {"w": jnp.full((4,), norm / 2.0)}
        updates, state = tx.update(grads, state, params)
        if i == 25:
            m = gh.metrics(state)
            assert bool(m["grad/spiked"])
            applied = float(jnp.linalg.norm(updates["w"]))
            expected = {"skip": 0.0, "clip": bound, "record": 10.0}[action]
            np.testing.assert_allclose(applied, expected, rtol=1e-5)
            assert bool(m["grad/skipped"]) == (action == "skip")
            assert bool(m["grad/clipped"]) == (action == "clip")


def test_momentum_reset_keeps_schedule_counter():
    schedule = optax.linear_schedule(1e-2, 1e-3, 100)
    tx = gh.guard(optax.adamw(schedule), warmup_steps=5, reset_after=2, reset_window=10, spike_zscore=None)
    params = {"w": jnp.zeros(4)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    norms = noisy_norms(20)
    norms[12] = norms[13] = 30.0  # a run of two spikes: the second resets
    for i, norm in enumerate(norms):
        _, state = update({"w": jnp.full((4,), norm / 2.0)}, state, params)
        adam, _, sched = state.guard_inner_state
        if i == 13:
            assert bool(state.guard_report.guard_momentum_reset)
            assert int(adam.count) == 0
            assert not np.asarray(adam.mu["w"]).any() and not np.asarray(adam.nu["w"]).any()
            # The schedule counts every applied step (spikes are skipped, so 12 = 14 - 2).
            assert int(sched.count) == 12
    assert int(state.guard_counters.guard_num_momentum_resets) == 1
    assert int(adam.count) == 6  # steps 14..19 after the reset


@pytest.mark.parametrize("action", ["clip", "record"])
@pytest.mark.parametrize("jit", [True, False])
def test_applied_reset_step_is_the_fresh_optimizers_first_step(action, jit):
    """With 'clip' or 'record' the reset step is applied: the moments are re-initialised
    before its update, so update and state are those of a fresh adam on this step's
    gradient (scaled to 2 x the baseline norm under 'clip')."""
    tx = gh.guard(
        optax.adam(0.1), spike_action=action, warmup_steps=3, reset_after=1, spike_threshold=2.0, spike_zscore=None
    )
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    for _ in range(4):  # norm 1 every step: baseline norm 1
        _, state = update({"w": jnp.array([0.6, 0.8, 0.0])}, state, params)
    spike = np.array([30.0, 40.0, 0.0])  # norm 50
    updates, state = update({"w": jnp.asarray(spike, jnp.float32)}, state, params)
    m = gh.metrics(state)
    assert bool(m["grad/spiked"]) and bool(m["grad/momentum_reset"]) and not bool(m["grad/skipped"])
    # Adam's first step written out: mu = (1 - b1) g, nu = (1 - b2) g^2, bias-corrected.
    g = spike * (2.0 / 50.0) if action == "clip" else spike
    mu, nu = 0.1 * g, 0.001 * g**2
    expected_update = -0.1 * (mu / 0.1) / (np.sqrt(nu / 0.001) + 1e-8)
    np.testing.assert_allclose(updates["w"], expected_update, rtol=2e-5)  # float32 bias correction
    adam = state.guard_inner_state[0]
    assert int(adam.count) == 1
    np.testing.assert_allclose(adam.mu["w"], mu, rtol=1e-6)
    np.testing.assert_allclose(adam.nu["w"], nu, rtol=1e-6)


def test_registering_metrics_does_not_change_what_a_reset_keeps(request):
    """What a reset keeps is declared apart (_guard.keep_on_momentum_reset): logging a
    state's fields with gh.register_metrics must not spare it from the reset."""
    from typing import NamedTuple

    from optax_gradhealth import _catalogue

    class SeenState(NamedTuple):
        seen_steps: jax.Array

    def count_steps():
        return optax.GradientTransformation(
            lambda params: SeenState(jnp.zeros((), jnp.int32)),
            lambda updates, state, params=None: (updates, SeenState(state.seen_steps + 1)),
        )

    gh.register_metrics(SeenState, {"seen_steps": "test/seen_steps"})
    # The registry is global: undone after the test (test_catalogue checks that every
    # registered name is declared, whatever ran before it).
    request.addfinalizer(lambda: _catalogue.STATE_FIELDS.pop(SeenState, None))
    tx = gh.guard(optax.chain(count_steps(), optax.sgd(0.1)), warmup_steps=3, reset_after=1, spike_zscore=None)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    for norm in [1.0, 1.0, 1.0, 1.0]:
        _, state = tx.update({"w": jnp.full((2,), norm / np.sqrt(2))}, state, params)
    assert int(gh.metrics(state)["test/seen_steps"]) == 4
    _, state = tx.update({"w": jnp.full((2,), 50.0)}, state, params)  # spike: reset
    assert bool(state.guard_report.guard_momentum_reset)
    assert int(gh.metrics(state)["test/seen_steps"]) == 0  # re-initialised like any moment


def test_momentum_reset_inside_inject_hyperparams_keeps_its_count():
    inner = optax.inject_hyperparams(optax.adam)(learning_rate=optax.linear_schedule(1e-2, 0.0, 50))
    tx = gh.guard(inner, warmup_steps=3, reset_after=1, spike_zscore=None)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    for norm in [1.0, 1.0, 1.0, 1.0, 9.0]:
        _, state = tx.update({"w": jnp.full((2,), norm / np.sqrt(2))}, state, params)
    inject = state.guard_inner_state
    assert bool(state.guard_report.guard_momentum_reset)
    assert int(inject.count) == 4  # kept
    assert int(inject.inner_state[0].count) == 0  # adam's moments reset
    assert not np.asarray(inject.inner_state[0].mu["w"]).any()


def test_rollback_after_consecutive_spikes_and_vanishing_rule():
    norms = noisy_norms(40)
    norms[25:30] = [10.0] * 5
    tx = gh.guard(optax.sgd(0.1), rollback_after_spikes=4, reset_after=None)
    _, history = run_norm_sequence(tx, norms)
    rolled = [i for i, h in enumerate(history) if h["grad/rollback_recommended"]]
    assert rolled == list(range(28, 40))

    # Vanishing: finite norm below the threshold; with a loss, only while it is not falling.
    norms = [1.0] * 5 + [1e-7] * 4
    tx = gh.guard(optax.sgd(0.1), vanishing_norm=1e-5)
    _, history = run_norm_sequence(tx, norms)
    assert [bool(h["grad/vanishing"]) for h in history] == [False] * 5 + [True] * 4
    loss = [1.0] * 5 + [2.0, 2.0, 1e-3, 1e-3]
    _, history = run_norm_sequence(tx, norms, loss=jnp.asarray(loss))
    assert [bool(h["grad/vanishing"]) for h in history] == [False] * 5 + [True, True, False, False]


def test_lasting_change_of_scale_is_trained_through_after_a_streak_of_spikes():
    """A lasting 20x jump: skipped for `rebaseline_after` steps (the rollback
    recommendation raised on the way, and cleared when that run re-baselines: the guard
    trained through), then the window restarts on the run's own norms: here 5 of the
    10 warm-up steps, so 5 more accepted steps are not scored, then each is judged
    against the new level."""
    norms = noisy_norms(70)
    norms[30:] = [20.0 * n for n in norms[30:]]
    tx = gh.guard(optax.sgd(0.1), rebaseline_after=5, reset_after=None, rollback_after_spikes=3, warmup_steps=10)
    _, history = run_norm_sequence(tx, norms)
    assert [i for i, h in enumerate(history) if h["grad/skipped"]] == list(range(30, 35))
    rolled = [bool(h["grad/rollback_recommended"]) for h in history[30:40]]
    assert rolled == [False, False, True, True] + [False] * 6  # raised at the 3rd spike, cleared at the 5th
    assert [int(h["grad/num_rebaselines"]) for h in history[33:36]] == [0, 1, 1]
    assert int(history[-1]["grad/num_spikes"]) == 5 and int(history[-1]["grad/num_rebaselines"]) == 1
    assert [h["grad/spike_score"] for h in history[35:40]] == [0.0] * 5
    assert all(0.5 < float(h["grad/spike_score"]) < 2.0 for h in history[40:])


def test_a_lasting_rise_of_the_loss_is_trained_through_after_a_streak_of_loss_spikes():
    """A lasting jump of the loss level (ordinary gradients) with loss spikes on: loss
    spikes count in the `rebaseline_after` streak, and the restart starts the loss
    statistics again too. Expected: skipped for `rebaseline_after` steps, then the loss
    z-score warms up again (0 for `warmup_steps` losses) and is judged against the new
    level (bias-corrected EMAs of the losses since the restart, written out). Before, every
    step after the jump was a loss spike, skipped forever."""
    n, jump, after, warmup, decay = 60, 20, 4, 5, 0.98
    norms = noisy_norms(n)
    loss = 1.0 + 0.05 * np.random.default_rng(1).standard_normal(n)
    loss[jump:] += 2.0
    loss = loss.astype(np.float32)
    tx = gh.guard(
        optax.sgd(0.1),
        loss_spike_zscore=6.0,
        rebaseline_after=after,
        warmup_steps=warmup,
        reset_after=None,
        rollback_after_spikes=None,
    )
    _, history = run_norm_sequence(tx, norms, loss=jnp.asarray(loss))
    assert [i for i, h in enumerate(history) if h["grad/skipped"]] == list(range(jump, jump + after))
    restart = jump + after  # the first step after the restart
    assert [float(h["grad/loss_zscore"]) for h in history[restart : restart + warmup]] == [0.0] * warmup
    t = restart + warmup + 3
    m1 = m2 = 0.0
    for x in loss[restart:t].astype(np.float64):
        m1, m2 = decay * m1 + (1 - decay) * x, decay * m2 + (1 - decay) * x * x
    corr = 1 - decay ** (t - restart)
    mean = m1 / corr
    std = max(np.sqrt(max(m2 / corr - mean * mean, 0.0)), 0.01 * abs(mean))
    np.testing.assert_allclose(float(history[t]["grad/loss_zscore"]), (loss[t] - mean) / std, rtol=1e-3, atol=1e-4)
    assert int(history[-1]["grad/num_spikes"]) == after


@pytest.mark.parametrize("bad", ["nan_gradient", "nan_loss"])
def test_a_nonfinite_loss_does_not_break_the_streak_that_rebaselines(bad):
    """A lasting x20 jump of the gradient's scale with a bad batch every other step at
    first. A non-finite step between spikes does not break the run (as for
    grad/consecutive_spikes), whether its gradient or only its loss is non-finite: the
    window restarts after `rebaseline_after` spikes either way. A NaN loss with finite
    gradients used to reset the streak, so the window never re-baselined."""
    norms = noisy_norms(60)
    norms[30:] = [20.0 * x for x in norms[30:]]
    loss = [1.0] * 60
    bad_steps = (31, 33)
    for t in bad_steps:
        if bad == "nan_gradient":
            norms[t] = float("nan")
        else:
            loss[t] = float("nan")
    tx = gh.guard(optax.sgd(0.1), rebaseline_after=5, warmup_steps=10, reset_after=None, rollback_after_spikes=None)
    _, history = run_norm_sequence(tx, norms, loss=jnp.asarray(loss, jnp.float32))
    # Spikes at 30, 32, 34, 35, 36 (the 5th restarts the window); 31 and 33 skipped as
    # non-finite; every step after is accepted.
    assert [i for i, h in enumerate(history) if h["grad/skipped"]] == list(range(30, 37))
    assert [i for i, h in enumerate(history) if h["grad/spiked"]] == [30, 32, 34, 35, 36]
    # The window restarts on the run's 5 finite norms: 5 more accepted steps to warm up.
    assert [float(h["grad/spike_score"]) for h in history[37:42]] == [0.0] * 5
    assert all(0.5 < float(h["grad/spike_score"]) < 2.0 for h in history[42:])


def test_nonfinite_loss_skips_and_loss_spikes_are_detected():
    norms = noisy_norms(40)
    loss = list(2.0 + 0.01 * np.random.default_rng(1).standard_normal(40))
    loss[30] = float("nan")
    loss[35] = 50.0
    tx = gh.guard(optax.sgd(0.1), loss_spike_zscore=6.0, reset_after=None)
    _, history = run_norm_sequence(tx, norms, loss=jnp.asarray(loss, jnp.float32))
    assert [i for i, h in enumerate(history) if h["grad/skipped"]] == [30, 35]
    assert not history[30]["grad/finite"] and history[35]["grad/spiked"]
    assert history[35]["grad/loss_zscore"] > 6.0


def test_state_structure_is_fixed_and_fields_are_found_by_name():
    inner = optax.chain(optax.clip(10.0), optax.adamw(optax.cosine_decay_schedule(1e-3, 100)))
    tx = optax.chain(gh.clip_by_global_norm(gh.PercentileClip()), gh.guard(inner, clip=gh.ZScoreClip()))
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2, jnp.bfloat16)}
    state0 = tx.init(params)
    update = jax.jit(tx.update)
    state = state0
    for grads in [
        jax.tree.map(jnp.ones_like, params),
        {"w": jnp.full((3, 2), jnp.nan), "b": jnp.ones(2, jnp.bfloat16)},
    ]:
        _, state = update(grads, state, params)
        assert jax.tree.structure(state) == jax.tree.structure(state0)
        chex.assert_trees_all_equal_shapes_and_dtypes(state, state0)
    for name in [
        "guard_num_skipped",
        "guard_inner_state",
        "clip_num_clipped",
        "zscore_num_accepted",
        "percentile_history",
    ]:
        optax.tree.get(state, name)  # raises if missing or ambiguous
    assert int(optax.tree.get(state, "guard_num_skipped")) == 1
    m = gh.metrics(state)
    # The guard's names in DESIGN.md's catalogue, every one present and documented.
    expected = set(
        "norm norm_clipped clip_threshold clipped finite skipped spike spike_score zscore norm_mean norm_std "
        "momentum_reset rollback vanishing first_nonfinite_leaf num_steps num_clipped num_nonfinite "
        "num_nonfinite_updates num_skipped num_spikes num_momentum_resets consecutive_nonfinite "
        "consecutive_spikes".split()
    )
    expected = {f"grad/{name}" for name in expected}
    assert expected <= set(m)
    assert expected <= set(gh.CATALOGUE)
    assert {"grad/leaf_norm/w", "grad/leaf_norm/b", "grad/norm#2"} <= set(m)


def test_metrics_found_in_nnx_optimizer():
    from flax import nnx

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, gh.guard(optax.adam(1e-3), clip=1.0), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads, loss=loss)
        return loss

    train_step(model, optimizer, jnp.ones((4, 3)))
    for source in (optimizer, optimizer.opt_state):
        m = gh.metrics(source)
        assert int(m["grad/num_steps"]) == 1
        assert float(m["grad/norm"]) > 0
        assert {"grad/leaf_norm/bias", "grad/leaf_norm/kernel"} <= set(m)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(inner="adam"), TypeError, r"`inner` must be an optax.GradientTransformation.*'adam'"),
        (dict(clip=-1.0), ValueError, r"`clip` must be a positive number.*-1.0"),
        (dict(spike_action="ignore"), ValueError, r"`spike_action` must be one of \('skip', 'clip', 'record'\)"),
        # An array (not a string) names the argument too, not numpy's "truth value of an
        # array ... is ambiguous".
        (dict(spike_action=np.array(["skip", "clip"])), ValueError, r"`spike_action` must be one of"),
        (dict(spike_action=np.array("skip")), ValueError, r"`spike_action` must be one of"),
        (dict(spike_threshold=0.5), ValueError, r"`spike_threshold` .* must be > 1, got 0.5"),
        (dict(spike_threshold=1.0), ValueError, r"`spike_threshold` .* must be > 1, got 1.0"),
        (dict(spike_threshold=float("nan")), ValueError, r"`spike_threshold` must not be NaN"),
        (dict(spike_zscore=-3.0), ValueError, r"`spike_zscore` must be a positive number"),
        (dict(warmup_steps=0), ValueError, r"`warmup_steps` must be an int >= 1, got 0"),
        (dict(spike_window=0), ValueError, r"`spike_window` must be an int >= 1, got 0"),
        (dict(rebaseline_after=0), ValueError, r"`rebaseline_after` must be an int >= 1, got 0"),
        (dict(stats_decay=1.5), ValueError, r"`stats_decay` must lie strictly between 0 and 1, got 1.5"),
        (dict(reset_after=0), ValueError, r"`reset_after` must be an int >= 1, got 0"),
        (dict(reset_window=0), ValueError, r"`reset_window` must be an int >= 1, got 0"),
        (dict(reset_after=5, reset_window=3), ValueError, r"`reset_after` \(5\) spikes can never fall within"),
        (dict(rollback_after_nonfinite=2.0), TypeError, r"`rollback_after_nonfinite` must be an int"),
        (dict(vanishing_norm=0.0), ValueError, r"`vanishing_norm` must be a positive number"),
        (dict(loss_spike_zscore=0.0), ValueError, r"`loss_spike_zscore` must be a positive number.*0.0"),
        (dict(rollback_after_spikes=0), ValueError, r"`rollback_after_spikes` must be an int >= 1, got 0"),
        (dict(rollback_after_nonfinite=0), ValueError, r"`rollback_after_nonfinite` must be an int >= 1, got 0"),
        (dict(check_updates="yes"), TypeError, r"`check_updates` must be True or False, got 'yes'"),
        (dict(update_health=1), TypeError, r"`update_health` must be True or False, got 1"),
        (dict(clip="auto"), TypeError, r"`clip` must be None, a positive number or a clip policy.*got 'auto'"),
        # A concrete array (a numpy scalar, or what optax.inject_hyperparams makes of a
        # number outside jit) is checked like the number it holds.
        (dict(clip=np.float32(-1.0)), ValueError, r"`clip` must be a positive number.*-1.0"),
        (dict(spike_threshold=np.float32(0.5)), ValueError, r"`spike_threshold` .* must be > 1, got 0.5"),
        (dict(spike_zscore=jnp.float32(-3.0)), ValueError, r"`spike_zscore` must be a positive number"),
        (dict(stats_decay=np.float32(1.5)), ValueError, r"`stats_decay` must lie strictly between 0 and 1, got 1.5"),
        (dict(warmup_steps=np.int32(0)), ValueError, r"`warmup_steps` must be an int >= 1, got 0"),
    ],
)
def test_bad_arguments_are_rejected_at_construction(kwargs, error, match):
    kwargs = {"inner": optax.sgd(0.1), **kwargs}
    with pytest.raises(error, match=match):
        gh.guard(**kwargs)


def test_mismatched_gradient_tree_and_bad_loss_get_clear_errors():
    tx = gh.guard(optax.sgd(0.1))
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"gh.guard: the gradient tree's structure does not match"):
        jax.jit(tx.update)({"v": jnp.zeros(2)}, state, params)
    with pytest.raises(ValueError, match=r"`loss` must be a scalar, got shape \(3,\)"):
        tx.update({"w": jnp.zeros(2)}, state, params, loss=jnp.ones(3))


@pytest.mark.parametrize("aux", [{"acc": jnp.float32(0.5)}, jnp.float32(0.5)], ids=["dict_aux", "scalar_aux"])
def test_the_pair_of_value_and_grad_has_aux_as_loss_is_refused_naming_loss(aux):
    """`(loss, aux), grads = jax.value_and_grad(f, has_aux=True)(...)` then loss=(loss, aux):
    the error used to be numpy's float() message (dict aux) or a shape (2,) (scalar aux)."""
    tx = gh.guard(optax.sgd(0.1))
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    for pair in [(jnp.float32(1.0), aux), [jnp.float32(1.0), aux]]:
        with pytest.raises(
            TypeError,
            match=r"gh\.guard: `loss` must be a scalar, got a (tuple|list)\. With "
            r"jax\.value_and_grad\(\.\.\., has_aux=True\), pass the loss alone",
        ):
            jax.jit(tx.update)({"w": jnp.zeros(2)}, state, params, loss=pair)
    with pytest.raises(TypeError, match=r"gh\.guard: `value` must be a scalar, got a dict"):
        tx.update({"w": jnp.zeros(2)}, state, params, value={"loss": jnp.float32(1.0)})


def test_the_guard_refuses_another_optimizers_state_naming_itself():
    """An optax state (or the guard's own inner state) passed as the guard's state used
    to fail with "'tuple' object has no attribute 'guard_moments'"."""
    tx = gh.guard(optax.adam(0.1))
    params = {"w": jnp.zeros(2)}
    grads = {"w": jnp.ones(2)}
    for wrong in [optax.adam(0.1).init(params), tx.init(params).guard_inner_state]:
        with pytest.raises(TypeError, match=r"gh\.guard: `state` must be the GuardState that this transformation"):
            tx.update(grads, wrong, params)


def test_metrics_found_in_train_state_and_nested_guards():
    from flax.training import train_state

    tx = gh.guard(gh.guard(optax.sgd(1.0), clip=0.5), clip=2.0)
    ts = train_state.TrainState.create(apply_fn=None, params={"w": jnp.zeros(2)}, tx=tx)
    ts = ts.apply_gradients(grads={"w": jnp.array([3.0, 4.0])})
    m = gh.metrics(ts)
    # Outer guard clips 5 -> 2, the inner one then sees 2 and clips to 0.5.
    np.testing.assert_allclose([m["grad/norm"], m["grad/norm#2"]], [5.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose([m["grad/norm_clipped"], m["grad/norm_clipped#2"]], [2.0, 0.5], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ts.params["w"]), -0.5 * np.array([0.6, 0.8]), rtol=1e-6)


def test_clip_mode_as_guard_clip_applies_only_to_accepted_steps_and_survives_reset():
    tx = gh.guard(
        optax.sgd(1.0),
        clip=gh.clip_by_value(0.5),
        warmup_steps=3,
        reset_after=1,
        spike_threshold=5.0,
        spike_zscore=None,
    )
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.array([2.0, 0.1])}, state, params)
    np.testing.assert_allclose(np.asarray(updates["w"]), [-0.5, -0.1])  # element-wise, as optax.clip
    _, state = tx.update({"w": jnp.array([jnp.nan, 0.1])}, state, params)
    m = gh.metrics(state)
    assert bool(m["grad/skipped"]) and int(m["grad/num_value_clipped"]) == 1  # the skipped step left it
    for grads in ([0.1, 0.1], [0.1, 0.1], [0.6, 0.1]):
        _, state = tx.update({"w": jnp.array(grads)}, state, params)
    _, state = tx.update({"w": jnp.array([50.0, 50.0])}, state, params)  # spike -> reset
    m = gh.metrics(state)
    # The reset re-initialised the optimizer but kept the clip mode's record of the
    # last accepted step (one element clipped), rather than zeroing it.
    assert bool(m["grad/momentum_reset"]) and int(m["grad/num_value_clipped"]) == 1


@pytest.mark.parametrize("threshold", [1.0, 1e-3])
def test_guard_clips_a_norm_beyond_float32_to_its_threshold(threshold):
    """The guard's own clip computed its factor from the saturated norm (3.4e38): four
    elements of 3e38 (norm 6e38) came out at 1.76x the threshold. Reference: float64."""
    grads = {"w": jnp.full((4,), 3e38, jnp.float32), "b": jnp.array([3.0, 4.0], jnp.float32)}
    norm = math.sqrt(4 * 3e38**2 + 25.0)
    tx = gh.guard(optax.sgd(1.0), clip=threshold)  # first step: in warm-up, never a spike
    updates, state = jax.jit(tx.update)(grads, tx.init(grads))
    got = np.asarray(updates["w"], np.float64)
    np.testing.assert_allclose(-got, 3e38 * threshold / norm, rtol=1e-6)
    m = gh.metrics(state)
    assert bool(m["grad/clipped"]) and not bool(m["grad/skipped"])
    assert float(m["grad/norm"]) == np.finfo(np.float32).max  # saturated, as documented
    np.testing.assert_allclose(float(m["grad/norm_clipped"]), threshold, rtol=1e-6)


def test_the_arguments_that_take_a_jax_scalar_say_so_in_their_hints():
    """Every number argument of gh.guard accepts a jax scalar (as inject_hyperparams
    passes it); its type hint says so, as clip_by_global_norm's does."""
    import inspect

    numbers = {
        "spike_threshold": 3.0,
        "spike_zscore": 4.0,
        "spike_window": 50,
        "rebaseline_after": 5,
        "loss_spike_zscore": 3.0,
        "warmup_steps": 5,
        "stats_decay": 0.9,
        "reset_after": 2,
        "reset_window": 10,
        "rollback_after_nonfinite": 3,
        "rollback_after_spikes": 3,
        "vanishing_norm": 1e-6,
    }
    hints = inspect.signature(gh.guard).parameters
    for name, value in numbers.items():
        kind = "float" if isinstance(value, float) else "int"
        assert f"{kind} | jax.Array" in str(hints[name].annotation), name
    arrays = {n: jnp.asarray(v, jnp.float32 if isinstance(v, float) else jnp.int32) for n, v in numbers.items()}
    tx = gh.guard(optax.sgd(0.5), **arrays)
    params = {"w": jnp.ones(2)}
    updates, _ = tx.update({"w": jnp.array([1.0, -2.0])}, tx.init(params), params)
    np.testing.assert_array_equal(np.asarray(updates["w"]), [-0.5, 1.0])


@pytest.mark.parametrize(
    "saved, target, field, sizes",
    [
        (
            {"spike_window": 64},
            {"spike_window": 32},
            "guard_norm_window.window_log_norms",
            "spike_window=64.*spike_window=32",
        ),
        ({"reset_after": 5}, {"reset_after": 3}, "guard_spike_steps", "reset_after=5.*reset_after=3"),
        ({"reset_after": 3}, {"reset_after": None}, "guard_spike_steps", "reset_after=3.*reset_after=None"),
        ({}, {"update_health": False}, "guard_update_norm", "update_health=True.*update_health=False"),
    ],
    ids=["spike_window", "reset_after", "reset_off", "update_health"],
)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_a_state_restored_for_another_configuration_is_refused(saved, target, field, sizes, jit):
    """flax.serialization restores a state of another spike_window / reset_after /
    update_health without checking shapes (it fills the target's None fields); the guard
    then ran on the foreign buffers silently (a 5-slot ring under reset_after=3) or failed
    with a bare broadcasting or pytree error. Now: a ValueError naming the field, both
    settings and the remedy, at the first update. The same restore into the same
    configuration still runs."""
    from flax import serialization

    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.array([1.0, -2.0, 0.5])}
    kwargs = {"reset_window": 100}
    old = gh.guard(optax.sgd(0.1), **kwargs, **saved)
    _, state = old.update(grads, old.init(params), params)
    blob = serialization.to_bytes(state)
    new = gh.guard(optax.sgd(0.1), **kwargs, **target)
    restored = serialization.from_bytes(new.init(params), blob)
    update = jax.jit(new.update) if jit else new.update
    with pytest.raises(ValueError, match=f"(?s){field}.*{sizes}.*Restore into `tx.init\\(params\\)`"):
        update(grads, restored, params)
    same = serialization.from_bytes(old.init(params), blob)
    _, after = (jax.jit(old.update) if jit else old.update)(grads, same, params)
    assert int(gh.metrics(after)["grad/num_steps"]) == 2


def test_the_guards_skips_clips_and_resets_equal_the_replay_of_its_rule():
    """The jitted guard (defaults) on a stream of gradients of chosen norms, against
    ``replay_spikes`` with the guard's action: recurring x20 spikes (clipped, the first
    skipped), a NaN between two spikes of a run, a run of 7 (skipped, resets) and a
    spike after the run's reset emptied the ring."""
    rng = np.random.default_rng(1)
    norms = np.exp(0.1 * rng.normal(size=500)).astype(np.float32)
    spiky = [*range(60, 140, 9), *range(300, 307), 320, 321, 323]
    norms[spiky] *= 20.0
    norms[322] = np.nan
    tx = gh.guard(optax.sgd(1e-3))

    def step(state, norm):
        _, state = tx.update({"w": jnp.full((4,), norm / 2.0)}, state, {"w": jnp.zeros(4)})
        m = gh.metrics(state)
        return state, {k: m[k] for k in ("grad/spiked", "grad/skipped", "grad/clipped", "grad/momentum_reset")}

    _, got = jax.jit(lambda n: jax.lax.scan(step, tx.init({"w": jnp.zeros(4)}), n))(jnp.asarray(norms))
    g = _guard
    rule = detect.SpikeRule(
        g.SPIKE_THRESHOLD, g.SPIKE_ZSCORE, g.SPIKE_WINDOW, 20, g.SPREAD_FLOOR, g.SPIKE_BASELINE, g.REBASELINE_AFTER
    )
    want = detect.replay_spikes(rule, norms, recur_window=100, reset_after=3)
    spike, recurring = np.asarray(want["spike"]), np.asarray(want["recurring"])
    np.testing.assert_array_equal(np.flatnonzero(got["grad/spiked"]), spiky)
    np.testing.assert_array_equal(got["grad/spiked"], spike)
    np.testing.assert_array_equal(got["grad/skipped"], (spike & ~recurring) | ~np.isfinite(norms))
    np.testing.assert_array_equal(got["grad/clipped"], recurring)
    np.testing.assert_array_equal(got["grad/momentum_reset"], want["reset"])
    # 320 comes after accepted steps with 306 skipped 14 steps before: it recurs; 321
    # and 323 (the NaN at 322 does not break their run) are skipped and, with 306, reset.
    assert np.flatnonzero(recurring).tolist() == [*spiky[1:9], 320]
    # The run: 300-302 skipped, the third resets; 303-305 again.
    assert np.flatnonzero(want["reset"]).tolist() == [302, 305, 323]
