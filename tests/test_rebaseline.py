"""Re-baselining the guard's spike window on a new level: automatically after a run of
spikes or dips (the restart on a dominant run, the warm restart, the rollback it clears)
and on request (``gh.rebaseline``). The expected values come from the stream's
construction (which steps are spikes, by the math) and numpy float64, not from the code
under test."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gradhealth as gh
from optax_gradhealth import _detectors as detect
from optax_gradhealth._guard import SPREAD_FLOOR
from tests.test_guard import run_norm_sequence as run_norms  # the guard over gradients of given norms


def flags(history, name):
    return [i for i, h in enumerate(history) if bool(h[name])]


# ----------------------------------------------------------------------------- dominant run


def test_a_lasting_change_just_past_the_threshold_restarts_after_rebaseline_after_spikes():
    """A lasting change whose new level has a low tail below the spike bound: 7x the old
    level, with every 10th step at 3x (between sqrt(5) and 5 times the baseline: accepted,
    not a spike, but not near the old baseline either). By the math (ratio 5, z-score 5 on
    a spread at its floor, log 5 > 5 x 0.05) the 7x steps are spikes and the 3x steps are
    not; the 3x steps are too few (5 of the latest 16) to move the median. Expected: the
    first 50 spikes are skipped, the window then restarts on the new level, and nothing
    after is a spike. The run used to end at each 3x step, so the window never
    re-baselined: the 7x steps were skipped until the 3x steps made up half the baseline
    (81 skips, every one a momentum reset candidate)."""
    rng = np.random.default_rng(0)
    t0, total = 200, 400
    level = np.ones(total)
    level[t0:] = 7.0
    level[t0 + 9 :: 10] = 3.0
    norms = (level * np.exp(rng.normal(0.0, 0.05, total))).astype(np.float32)
    rule = detect.SpikeRule(5.0, 5.0, 128, 20, SPREAD_FLOOR, 16, 50)
    spike = np.asarray(detect.replay_spikes(rule, jnp.asarray(norms))["spike"])
    high = np.flatnonzero(level == 7.0)
    assert np.flatnonzero(spike).tolist() == high[:50].tolist()


def test_clean_and_trending_streams_never_restart():
    """Clean lognormal noise (sigma 0.1 to 1) and a 1000x fall: no run of spikes or dips
    reaches 10, so nothing restarts (the near-baseline steps end every run)."""
    rule = detect.SpikeRule(5.0, 5.0, 128, 20, SPREAD_FLOOR, 16, 10)

    @jax.jit
    def longest_run(norms):
        def step(window, norm):
            verdict = rule.judge(window, norm, jnp.isfinite(norm))
            window, restart = rule.fold_and_restart(window, norm, verdict, ~verdict.spike)
            return window, (window.window_streak, restart)

        _, (streak, restart) = jax.lax.scan(step, rule.init(), norms)
        return jnp.max(streak), jnp.sum(restart)

    rng = np.random.default_rng(1)
    t = np.arange(5000)
    for stream in (
        np.exp(rng.normal(0.0, 0.1, t.size)),
        np.exp(rng.normal(0.0, 1.0, t.size)),
        np.exp(rng.normal(0.0, 0.3, t.size) - t / t.size * np.log(1000.0)),
    ):
        longest, restarts = longest_run(jnp.asarray(stream, jnp.float32))
        assert int(restarts) == 0 and int(longest) < 5


# ----------------------------------------------------------------------------- warm restart


@pytest.mark.parametrize("change", [10.0, 0.1])
def test_a_spike_right_after_a_rebaseline_is_caught(change):
    """A lasting x10 rise (50 spikes) or fall (50 dips) of the norm, then a x100 spike
    (against the new level) on the very next step after the window restarts. The window
    restarts on the run's own 50 norms, so it is warm (warmup 20) and judges that step:
    expected a skipped spike whose score is its norm over the median of the run's
    latest 16 norms (numpy). It used to restart empty: the 20 warm-up steps that
    followed were not judged, and the x100 gradient was applied."""
    rng = np.random.default_rng(2)
    t0, after = 60, 50
    norms = np.exp(rng.normal(0.0, 0.05, 130))
    norms[t0:] *= change
    restart = t0 + after - 1  # the 50th spike or dip
    norms[restart + 1] *= 100.0
    norms = norms.astype(np.float32)
    tx = gh.guard(optax.sgd(0.1), reset_after=None, rollback_after_spikes=None)
    _, history = run_norms(tx, norms)
    skipped = flags(history, "grad/skipped")
    spiked = flags(history, "grad/spiked")
    if change > 1:
        assert skipped == spiked == list(range(t0, restart + 2))
    else:  # dips are accepted (their norms left out of the window); the spike is skipped
        assert skipped == spiked == [restart + 1]
    assert [int(h["grad/num_rebaselines"]) for h in history[restart - 1 : restart + 1]] == [0, 1]
    baseline = np.exp(np.median(np.log(norms[restart - 15 : restart + 1].astype(np.float64))))
    np.testing.assert_allclose(history[restart + 1]["grad/spike_score"], norms[restart + 1] / baseline, rtol=1e-4)
    assert not any(h["grad/skipped"] for h in history[restart + 2 :])


# ----------------------------------------------------------------------------- rollback


def lasting_jump(n=110, at=40, factor=20.0, seed=3):
    norms = np.exp(np.random.default_rng(seed).normal(0.0, 0.05, n))
    norms[at:] *= factor
    return norms.astype(np.float32)


def test_the_rollback_a_run_of_spikes_raised_is_cleared_when_it_rebaselines():
    """A lasting x20 change: the rollback is raised at the 10th spike and, since that run
    of spikes turned out to be a lasting change the guard re-baselined on (the 50th),
    cleared there; it stays False. It used to stay True for the rest of the run, and a
    loop restoring the last checkpoint on it never got past the change."""
    norms = lasting_jump()
    _, history = run_norms(gh.guard(optax.sgd(0.1), reset_after=None), norms)
    assert flags(history, "grad/skipped") == list(range(40, 90))
    assert flags(history, "grad/rollback_recommended") == list(range(49, 89))
    assert int(history[-1]["grad/num_rebaselines"]) == 1


def test_a_rollback_raised_by_nonfinite_steps_or_an_earlier_burst_stands_through_a_rebaseline():
    """The rollback is cleared only when the run of spikes that raised it re-baselines.
    Raised by 10 non-finite steps, or by a burst of 12 spikes that ended (normal steps
    after it), it stays True through a later lasting change's re-baseline."""
    norms = lasting_jump(n=130, at=70)
    nonfinite = norms.copy()
    nonfinite[30:40] = np.nan
    burst = norms.copy()
    burst[30:42] *= 20.0
    for stream, raised in ((nonfinite, 39), (burst, 39)):
        _, history = run_norms(gh.guard(optax.sgd(0.1), reset_after=None), stream)
        assert flags(history, "grad/rollback_recommended") == list(range(raised, 130))
        assert int(history[-1]["grad/num_rebaselines"]) == 1


# ----------------------------------------------------------------------------- gh.rebaseline


def _guard_states(tree):
    is_guard = lambda x: isinstance(x, gh.GuardState)
    return [x for x in jax.tree.leaves(tree, is_leaf=is_guard) if is_guard(x)]


@pytest.mark.parametrize(
    "make",
    [
        lambda: optax.chain(optax.add_decayed_weights(0.0), gh.guard(optax.adam(1e-2), loss_spike_zscore=6.0)),
        lambda: optax.MultiSteps(gh.guard(optax.adam(1e-2), loss_spike_zscore=6.0), every_k_schedule=1),
        lambda: optax.inject_hyperparams(gh.guard, static_args=("inner",))(
            inner=optax.adam(1e-2), loss_spike_zscore=6.0
        ),
        lambda: gh.guard(gh.guard(optax.adam(1e-2), loss_spike_zscore=6.0), loss_spike_zscore=6.0),
    ],
    ids=["chain", "multisteps", "inject_hyperparams", "guard_in_guard"],
)
def test_rebaseline_restarts_every_guard_in_a_nested_state_under_jit(make):
    """gh.rebaseline finds the guards wherever gh.metrics does and, under jit, returns a
    state of the same structure, shapes and dtypes: every guard's window empty, loss
    statistics restarted, runs and the rollback cleared, grad/num_rebaselines + 1; the
    inner optimizer's state and the other counters as they were."""
    tx = make()
    params = {"w": jnp.zeros(4)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    rng = np.random.default_rng(4)
    for t in range(40):
        scale = 1e4 if 25 <= t < 37 else 1.0  # 12 spikes in a row: a rollback
        grads = {"w": jnp.asarray(scale * rng.normal(size=4), jnp.float32)}
        _, state = update(grads, state, params, loss=jnp.float32(1.0 + 0.01 * rng.normal()))
    before = _guard_states(state)
    assert before and all(int(g.guard_moments.guard_norm_window.window_count) > 0 for g in before)
    assert bool(before[0].guard_counters.guard_rollback)
    new = jax.jit(gh.rebaseline)(state)
    assert jax.tree.structure(new) == jax.tree.structure(state)
    chex.assert_trees_all_equal_shapes_and_dtypes(new, state)
    after = _guard_states(new)
    assert len(after) == len(before)
    for old, g in zip(before, after, strict=True):
        window = g.guard_moments.guard_norm_window
        assert int(window.window_count) == 0 and int(window.window_streak) == 0 and int(window.window_run_count) == 0
        assert int(g.guard_moments.guard_num_losses) == 0 and float(g.guard_moments.guard_running_loss_mean) == 0.0
        c, o = g.guard_counters, old.guard_counters
        assert not bool(c.guard_rollback)
        assert int(c.guard_consecutive_spikes) == 0 and int(c.guard_consecutive_nonfinite) == 0
        assert int(c.guard_num_rebaselines) == int(o.guard_num_rebaselines) + 1
        assert int(c.guard_num_spikes) == int(o.guard_num_spikes) and int(c.guard_num_steps) == int(o.guard_num_steps)
        assert np.all(np.asarray(g.guard_spike_steps) == np.min(np.asarray(g.guard_spike_steps)))
    inner = lambda s: [x for x in jax.tree.leaves(s) if isinstance(x, jax.Array) and x.size == 4]
    chex.assert_trees_all_equal(inner(new), inner(state))  # adam's moments (and the leaf norms) kept
    m = gh.metrics(new)
    assert int(m["grad/num_rebaselines"]) == 1 and not bool(m["grad/rollback_recommended"])
    # The window warms up again: the next 20 accepted steps are not judged (a x100 one
    # included), as at the start of a run; NaN still is.
    _, state2 = update({"w": jnp.full((4,), jnp.nan)}, new, params, loss=jnp.float32(1.0))
    assert bool(gh.metrics(state2)["grad/skipped"])
    _, state2 = update({"w": jnp.full((4,), 1e6)}, state2, params, loss=jnp.float32(1.0))
    assert not bool(gh.metrics(state2)["grad/spiked"]) and float(gh.metrics(state2)["grad/spike_score"]) == 0.0


def test_rebaseline_of_an_nnx_optimizer_state():
    from flax import nnx

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, gh.guard(optax.adam(1e-3)), wrt=nnx.Param)
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    for _ in range(3):
        optimizer.update(model, grads)
    assert int(gh.metrics(optimizer)["grad/num_rebaselines"]) == 0
    optimizer.opt_state = gh.rebaseline(optimizer.opt_state)
    m = gh.metrics(optimizer)
    assert int(m["grad/num_rebaselines"]) == 1 and int(m["grad/num_steps"]) == 3
    optimizer.update(model, grads)  # still a working optimizer
    assert int(gh.metrics(optimizer)["grad/num_steps"]) == 4
    with pytest.raises(TypeError, match=r"gh.rebaseline: `opt_state` is an nnx.Optimizer.*optimizer.opt_state ="):
        gh.rebaseline(optimizer)


def test_rebaseline_refuses_a_state_without_a_guard():
    state = optax.adam(1e-3).init({"w": jnp.zeros(2)})
    with pytest.raises(ValueError, match=r"gh.rebaseline: `opt_state` holds no gh.guard state \(got a tuple\)"):
        gh.rebaseline(state)


def test_a_planned_change_announced_with_rebaseline_is_not_skipped():
    """A x10 change of the norm at a step announced with gh.rebaseline: no step skipped
    (the window warms up on the new level), where the guard alone skipped 50; the
    counter counts the manual restart. After the warm-up a x100 spike is caught again."""
    norms = lasting_jump(n=100, at=40, factor=10.0)
    norms[75] *= 100.0
    tx = gh.guard(optax.sgd(0.1), reset_after=None)
    params = {"w": jnp.zeros(4)}
    state, update, skipped = tx.init(params), jax.jit(tx.update), []
    for t, norm in enumerate(norms):
        if t == 40:
            state = gh.rebaseline(state)
        _, state = update({"w": jnp.full((4,), norm / 2.0, jnp.float32)}, state, params)
        if bool(gh.metrics(state)["grad/skipped"]):
            skipped.append(t)
    assert skipped == [75]
    assert int(gh.metrics(state)["grad/num_rebaselines"]) == 1
