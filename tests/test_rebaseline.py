"""Re-baselining the guard's spike window on a new level: automatically after a run of
spikes or dips (the restart on a dominant run, the warm restart, the rollback it clears)
and on request (``gh.rebaseline``). The expected values come from the stream's
construction (which steps are spikes, by the math) and numpy float64, not from the code
under test."""

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


@pytest.mark.parametrize(
    "norm_factor, loss_factor, lost",
    [
        (10.0, 40.0, True),  # diverged: the loss x40, its loss per unit of norm x4
        (10.0, 17.0, True),  # x1.7 per unit of norm
        (10.0, 14.0, False),  # x1.4 per unit of norm: not lost
        (20.0, 20.0, False),  # a loss weight x20: the loss and the gradient alike
        (20.0, 1.0, False),  # the gradient's scale alone (unfreezing)
        (20.0, 3.0, False),  # the loss x3, but less than the gradient
        (1.0, 2.5, True),  # the loss alone x2.5 (loss spikes, loss_spike_zscore)
        (1.0, 1.8, False),  # x1.8: under 2x
    ],
)
def test_the_rollback_of_a_run_whose_loss_diverged_stands_through_the_restart(norm_factor, loss_factor, lost):
    """A lasting change at step 40 with ``loss=`` passed: the rollback is raised at the
    10th spike (step 49) and the window restarts at the 50th (step 89). The run is lost
    when its loss is more than 2x the level before it (a loss ~1) and its loss per unit
    of gradient norm more than 1.5x (the ratio of the factors): the recommendation then
    stays True to the end. A rescaled loss (a loss weight scales both) or a change of the
    gradient's scale alone is a lasting change, cleared at the restart as without
    ``loss=``. It used to be cleared whatever the loss did (a learning rate x100 whose
    loss stayed 6-17x its level read 0 at every later step). With the norm unchanged,
    the run is one of loss spikes (``loss_spike_zscore``)."""
    rng = np.random.default_rng(11)
    norms = lasting_jump(n=120, at=40, factor=norm_factor)
    loss = np.exp(rng.normal(0.0, 0.05, 120))
    loss[40:] *= loss_factor
    lost_by_the_rule = loss_factor > 2.0 and loss_factor / norm_factor > 1.5  # the factors, by construction
    assert lost_by_the_rule == lost
    tx = gh.guard(optax.sgd(0.1), reset_after=None, loss_spike_zscore=6.0 if norm_factor == 1.0 else None)
    _, history = run_norms(tx, norms, loss=loss.astype(np.float32))
    assert flags(history, "grad/skipped") == list(range(40, 90))
    assert int(history[-1]["grad/num_rebaselines"]) == 1
    assert flags(history, "grad/rollback_recommended") == list(range(49, 120 if lost else 89))


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


# ----------------------------------------------------------------------------- review round 9 (A)


def test_one_spike_right_after_an_automatic_restart_counts_as_one_with_the_defaults():
    """The defaults (rollback after 10 spikes, momentum reset after 3 within 100 steps):
    a lasting x10 rise at step 60, and one x100 spike on the step after the window
    restarts (the 50th spike, step 109). By the math: the rollback is raised at the 10th
    spike (step 69) and cleared at the restart; the reset ring, emptied by each reset,
    resets at every 3rd spike of the run (16 resets). After the restart the x100 spike
    is one spike, as after gh.rebaseline: grad/consecutive_spikes 1 (the restart step
    still reads the run's 50), no rollback, no reset. The restart used to keep the run's
    count (51 at that spike: the rollback came back for the rest of the run) and the
    run's last two spikes in the ring (a reset)."""
    rng = np.random.default_rng(5)
    t0, after = 60, 50
    norms = np.exp(rng.normal(0.0, 0.05, 140))
    norms[t0:] *= 10.0
    restart = t0 + after - 1
    norms[restart + 1] *= 100.0
    _, history = run_norms(gh.guard(optax.sgd(0.1)), norms.astype(np.float32))
    assert flags(history, "grad/spiked") == list(range(t0, restart + 2))
    assert [int(h["grad/num_rebaselines"]) for h in history[restart - 1 : restart + 1]] == [0, 1]
    assert flags(history, "grad/rollback_recommended") == list(range(t0 + 9, restart))
    assert flags(history, "grad/momentum_reset") == [t0 + k - 1 for k in range(3, after + 1, 3)]
    consecutive = [int(h["grad/consecutive_spikes"]) for h in history]
    assert consecutive[restart - 1 : restart + 3] == [after - 1, after, 1, 0]
    # A NaN step between the restart and the spike: the run is still over.
    norms[restart + 1], norms[restart + 2] = np.nan, norms[restart + 1]
    _, history = run_norms(gh.guard(optax.sgd(0.1)), norms.astype(np.float32))
    consecutive = [int(h["grad/consecutive_spikes"]) for h in history]
    assert consecutive[restart : restart + 4] == [after, 0, 1, 0]
    assert flags(history, "grad/rollback_recommended") == list(range(t0 + 9, restart))


def test_nonfinite_steps_with_a_low_gradient_norm_do_not_rebaseline_the_window():
    """50 steps whose loss is NaN and whose (finite) gradient norm is 1e-3, among steps at
    norm ~1: every one is skipped as non-finite, which leaves the run of spikes and dips
    as it was (the window never accepted them). Expected: no restart, only those 50
    steps skipped, and the steps back at ~1 accepted. They used to count as dips: the
    window re-baselined on 1e-3 and the next 50 clean steps were skipped as spikes."""
    rng = np.random.default_rng(6)
    norms = np.exp(rng.normal(0.0, 0.05, 160))
    bad = np.arange(40, 90)
    norms[bad] = 1e-3
    loss = np.ones(160, np.float32)
    loss[bad] = np.nan
    _, history = run_norms(gh.guard(optax.sgd(0.1)), norms.astype(np.float32), loss=loss)
    assert flags(history, "grad/skipped") == bad.tolist()
    assert not flags(history, "grad/spiked")
    assert int(history[-1]["grad/num_rebaselines"]) == 0


def _sharded_guard_step(with_params):
    """A data (4) x model (2) mesh under jax.shard_map, leaf 'a' split over 'model', 'b'
    replicated, the audit with sharded_axes='model' in front of the guard."""
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    tx = optax.chain(gh.cross_device("data", sharded_axes="model", num_devices=4), gh.guard(optax.adam(1e-3)))

    def run(g, p):
        g = jax.tree.map(lambda x: x[0], g)
        updates, _ = tx.update(g, tx.init(p), p if with_params else None)
        return updates

    rng = np.random.default_rng(0)
    grads = {"a": jnp.asarray(rng.normal(size=(4, 8)), jnp.float32), "b": jnp.asarray(rng.normal(size=(4, 3)))}
    params = {"a": jnp.ones((8,), jnp.float32), "b": jnp.zeros((3,), jnp.float32)}
    in_specs = ({"a": P("data", "model"), "b": P("data")}, {"a": P("model"), "b": P()})
    out_specs = {"a": P("model"), "b": P()}
    return jax.jit(jax.shard_map(run, mesh=mesh, in_specs=in_specs, out_specs=out_specs)), grads, params


def test_the_guard_on_gradients_split_over_a_sharded_axis_does_not_advise_a_mean_over_it():
    """The guard after gh.cross_device(..., sharded_axes='model') inside shard_map sees
    leaf 'a' split over 'model'. A mean over 'model' in front of it (the error's only
    advice) averages the parameter's two halves into each other: the error now names the
    leaf and, where the parameters vary over the axis too, says the guard cannot judge
    split gradients there and points to the jitted, sharded form instead. Without
    parameters nothing tells a data axis from a sharded one: both cases are named."""
    step, grads, params = _sharded_guard_step(with_params=True)
    with pytest.raises(ValueError) as info:
        step(grads, params)
    message = str(info.value)
    assert "mesh axes ['model'] (leaf 'a' does)" in message
    assert "the parameters are split over ['model']" in message
    assert "Parameters sharded within one jitted program" in message
    assert "pmean" not in message and "cross_device(axis_name='model')" not in message
    step, grads, params = _sharded_guard_step(with_params=False)
    with pytest.raises(ValueError, match=r"cross_device\(axis_name='model'\).*do not average them") as info:
        step(grads, params)
    assert "Parameters sharded within one jitted program" in str(info.value)


# ----------------------------------------------------------------------------- reference


def _reference_spike_replay(norms, *, ratio, zscore, window, warmup, floor, baseline, rebaseline_after, accept):
    """The documented spike rule with re-baselining, written out in float64 Python: the
    window's baseline is the median of its latest ``baseline`` log-norms, its spread the
    normal-consistent MAD of consecutive differences over sqrt(2); a spike passes both
    thresholds once warm; a dip (below ``median**2 / bound``) stays out of the window;
    spikes and dips make a run that an accepted step near the baseline (within half the
    log-distance to the bound) ends; ``rebaseline_after`` steps of a run restart the
    window on the run's raw log-norms, with the run's count (without re-baselining,
    None, a dip enters the window at the mirror bound instead). Returns, per step, whether it
    was a spike and the baseline it was judged by (None while cold)."""
    logs, count, streak, run, run_count = [], 0, 0, [], 0
    spikes, medians = [], []
    for x in (float(v) for v in norms):
        finite = math.isfinite(x)
        warm = count >= warmup
        held = logs[-window:]
        median = float(np.median(held[-baseline:])) if held else 0.0
        diffs = np.diff(np.asarray(held, np.float64))
        spread = 1.4826 * float(np.median(np.abs(diffs - np.median(diffs)))) / math.sqrt(2) if diffs.size else 0.0
        log_bound = max(median + math.log(ratio), median + zscore * max(spread, floor))
        log_x = math.log(max(x, 1e-37)) if finite else math.nan
        spike = warm and finite and log_x - median > math.log(ratio) and (log_x - median) / max(spread, floor) > zscore
        accepted = finite and (accept or not spike)
        capped = min(log_x, log_bound) if spike else log_x  # an accepted spike enters at the bound
        dip = warm and accepted and x > 0 and capped < 2 * median - log_bound
        if rebaseline_after is None:  # no runs: a dip enters at the mirror bound
            if accepted and x > 0:
                logs.append(max(capped, 2 * median - log_bound) if warm else capped)
                count += 1
            spikes.append(spike)
            medians.append(median if warm else None)
            continue
        if accepted and x > 0 and not dip:
            logs.append(capped)
            count += 1
        moved = spike or dip
        near = finite and abs(log_x - median) < 0.5 * (log_bound - median)
        ends = accepted and not moved and (near or not warm)
        streak = streak + 1 if moved else 0 if ends else streak
        if ends:
            run, run_count = [], 0
        elif (moved or accepted) and finite and x > 0:
            run.append(log_x)
            run_count += 1
        if streak >= rebaseline_after:
            logs, count, streak, run, run_count = run[-window:], run_count, 0, [], 0
        spikes.append(spike)
        medians.append(median if warm else None)
    return np.asarray(spikes), medians


def _levels_stream(seed, n, scale):
    """Norms around ``scale`` that move to lasting new levels (x3, x10, x30, /10) for 5 to
    200 steps, with 2% x100 spikes, 1% NaN and 1% zero norms (empty batches)."""
    rng = np.random.default_rng(seed)
    level, t = np.zeros(n), 0
    while t < n:
        length = int(rng.integers(5, 200))
        level[t : t + length] = rng.choice([0.0, 0.0, math.log(10), -math.log(10), math.log(3), math.log(30)])
        t += length
    x = scale * np.exp(level + rng.normal(0, rng.choice([0.05, 0.2, 0.5]), n))
    x[rng.random(n) < 0.02] *= 100
    x[rng.random(n) < 0.01] = np.nan
    x[rng.random(n) < 0.01] = 0.0
    return x.astype(np.float32)


@pytest.mark.parametrize("scale", [1e-4, 1.0, 3e3])
@pytest.mark.parametrize(
    ("window", "warmup", "rebaseline_after"), [(128, 20, 50), (16, 5, 12), (8, 4, 30), (32, 10, 5), (32, 10, None)]
)
@pytest.mark.parametrize("accept", [False, True])
def test_the_spike_rule_with_rebaselining_matches_a_float64_reference(scale, window, warmup, rebaseline_after, accept):
    """The jitted rule (``replay_spikes``, the guard's ``SpikeRule``) against the rule
    written out, on streams whose baseline is far from a norm of 1 (log-median not 0,
    so a sign slip in the baseline is seen), with lasting level changes (restarts,
    runs longer than the ring), spikes, NaNs and zero norms: the same spikes, step by
    step, judged by the same baseline."""
    rule = detect.SpikeRule(5.0, 5.0, window, warmup, SPREAD_FLOOR, min(16, window), rebaseline_after)
    for seed in range(3):
        x = _levels_stream(seed, 600, scale)
        got = detect.replay_spikes(rule, jnp.asarray(x), accept_spikes=accept)
        spikes, medians = _reference_spike_replay(
            x,
            ratio=5.0,
            zscore=5.0,
            window=window,
            warmup=warmup,
            floor=SPREAD_FLOOR,
            baseline=min(16, window),
            rebaseline_after=rebaseline_after,
            accept=accept,
        )
        np.testing.assert_array_equal(np.asarray(got["spike"]), spikes, err_msg=f"seed {seed}")
        warm = np.array([m is not None for m in medians])
        expected = np.array([m if m is not None else np.nan for m in medians])
        # float32 log-norms against float64 (a dip's mirror bound, folded back into the
        # window, carries its rounding on): 1e-3 in log, a factor of 1.001 in norm.
        np.testing.assert_allclose(np.asarray(got["median"])[warm], expected[warm], rtol=0, atol=1e-3)


def test_zero_norms_are_no_dips_and_do_not_rebaseline_the_window():
    """Empty or fully masked batches (a gradient norm of exactly 0) are no scale: not
    pushed, no dip, so however many come in a row they neither make a run nor restart
    the window, and a x100 spike after them is judged against the old baseline."""
    rng = np.random.default_rng(0)
    norms = np.concatenate([np.exp(0.05 * rng.standard_normal(40)), np.zeros(12), [100.0, 1.0]]).astype(np.float32)
    rule = detect.SpikeRule(5.0, 5.0, 32, 10, SPREAD_FLOOR, 16, 5)
    out = detect.replay_spikes(rule, jnp.asarray(norms))
    spikes = np.flatnonzero(np.asarray(out["spike"]))
    np.testing.assert_array_equal(spikes, [52])
    baseline = np.median(np.log(norms[24:40].astype(np.float64)))  # the latest 16 accepted
    np.testing.assert_allclose(np.asarray(out["median"])[40:54], baseline, atol=1e-6)
