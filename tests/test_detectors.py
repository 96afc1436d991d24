"""The detectors (optax_gradhealth._detectors) on synthetic streams, against references
written out here in numpy float64 and against the theory of each rule."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from optax_gradhealth import _cross_device
from optax_gradhealth import _detectors as detect

AUDIT_RULE = _cross_device.default_audit_rule()  # what gh.cross_device runs by default


def normal_tail(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


# ----------------------------------------------------------------------------- medians


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(np.float32, st.integers(1, 40), elements=st.floats(-1e6, 1e6, width=32)),
    st.data(),
)
def test_masked_median_is_numpys_median_of_the_valid_entries(values, data):
    mask = data.draw(hnp.arrays(np.bool_, values.shape))
    got = float(detect.masked_median(values, mask))
    want = float(np.median(values[mask].astype(np.float64))) if mask.any() else 0.0
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6)


def test_median_and_spread_along_an_axis_with_ragged_masks():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(5, 9)).astype(np.float32)
    mask = rng.random((5, 9)) < 0.7
    mask[0] = False  # no valid entry: 0, 0
    centre, spread = detect.median_and_spread(values, mask, axis=1)
    for row in range(5):
        v = values[row][mask[row]].astype(np.float64)
        want_c = np.median(v) if v.size else 0.0
        want_s = 1.4826 * np.median(np.abs(v - want_c)) if v.size else 0.0
        assert float(centre[row]) == pytest.approx(want_c, abs=1e-6)
        assert float(spread[row]) == pytest.approx(want_s, abs=1e-6)


# ----------------------------------------------------------------------------- window


def test_norm_window_holds_the_last_accepted_log_norms():
    rng = np.random.default_rng(1)
    norms = np.exp(rng.normal(size=50)).astype(np.float32)
    accepted = rng.random(50) < 0.6
    window = detect.norm_window_init(8)
    for norm, ok in zip(norms, accepted):
        window = detect.norm_window_push(window, jnp.log(norm), jnp.bool_(ok))
    kept = np.log(norms[accepted].astype(np.float64))[-8:]  # in the order they came
    assert int(window.window_count) == accepted.sum()
    np.testing.assert_allclose(np.sort(np.asarray(window.window_log_norms)), np.sort(kept), rtol=1e-6)
    # Baseline: the median of the latest `recent`; spread: of the consecutive differences.
    diffs = np.diff(kept)
    want_spread = 1.4826 * np.median(np.abs(diffs - np.median(diffs))) / np.sqrt(2)
    for recent, want_centre in [(None, np.median(kept)), (3, np.median(kept[-3:])), (4, np.median(kept[-4:]))]:
        centre, spread = detect.norm_window_stats(window, recent)
        assert float(centre) == pytest.approx(want_centre, abs=1e-6)
        assert float(spread) == pytest.approx(want_spread, abs=1e-6)


def test_norm_window_spread_is_blind_to_a_trend():
    # Log-norms falling linearly with small noise: the spread of the levels is large, the
    # spread of the step-to-step changes is the noise's.
    rng = np.random.default_rng(15)
    logs = -0.02 * np.arange(128) + rng.normal(0.0, 0.05, 128)
    window = detect.norm_window_init(128)
    for value in logs:
        window = detect.norm_window_push(window, jnp.float32(value), jnp.bool_(True))
    _, spread = detect.norm_window_stats(window, 16)
    assert float(spread) == pytest.approx(0.05, rel=0.25)
    assert 1.4826 * np.median(np.abs(logs - np.median(logs))) > 0.5


def test_norm_window_ignores_non_finite_values():
    window = detect.norm_window_init(4)
    for value in [0.0, jnp.nan, jnp.inf, 1.0]:
        window = detect.norm_window_push(window, jnp.float32(value), jnp.bool_(True))
    assert int(window.window_count) == 2
    assert float(detect.norm_window_stats(window)[0]) == 0.5
    assert float(detect.norm_window_stats(window)[1]) == 0.0  # one difference: no spread yet


# ----------------------------------------------------------------------------- spikes


@pytest.mark.parametrize("baseline", [16, 64])
def test_spike_rule_false_alarm_rate_on_a_stationary_stream_matches_the_normal_tail(baseline):
    # Log-normal norms, log(norm) ~ N(0, s^2). The spread estimates s; the baseline, a
    # median of m values, has variance (pi / 2) s^2 / m, so the z-score is about normal
    # with variance 1 + pi / (2 m), and the rate of z > z0 is that normal's tail.
    rng = np.random.default_rng(2)
    norms = np.exp(rng.normal(0.0, 0.3, 100_000)).astype(np.float32)
    rule = detect.SpikeRule(None, 2.5, window=512, warmup=512, spread_floor=0.01, baseline=baseline)
    out = detect.replay_spikes(rule, norms, accept_spikes=True)
    rate = float(np.asarray(out["spike"])[512:].mean())
    assert rate == pytest.approx(normal_tail(2.5 / math.sqrt(1 + math.pi / (2 * baseline))), rel=0.2)


def test_spike_rule_needs_both_conditions_and_its_bound_is_the_boundary():
    rule = detect.SpikeRule(threshold=3.0, zscore=6.0, window=64, warmup=10, spread_floor=0.05, baseline=16)
    window = rule.init()
    rng = np.random.default_rng(3)
    logs = rng.normal(0.0, 0.1, 64)
    for value in logs:
        window = detect.norm_window_push(window, jnp.float32(value), jnp.bool_(True))
    median = np.median(logs[-16:])
    diffs = np.diff(logs)
    spread = max(1.4826 * np.median(np.abs(diffs - np.median(diffs))) / np.sqrt(2), 0.05)
    # The bound: the larger of 3 x baseline and the z = 6 point.
    bound = math.exp(max(median + math.log(3.0), median + 6.0 * spread))
    for factor, want in [(0.999, False), (1.001, True)]:
        verdict = rule.judge(window, jnp.float32(bound * factor), jnp.bool_(True))
        assert bool(verdict.spike) is want
        assert float(verdict.bound) == pytest.approx(bound, rel=1e-5)
        assert float(verdict.ratio) == pytest.approx(bound * factor / math.exp(median), rel=1e-5)
    assert not bool(rule.judge(window, jnp.float32(1e6), jnp.bool_(False)).spike)  # non-finite step


def test_default_guard_catches_a_x10_spike_in_a_batch_8_window():
    # A window as noisy as a batch-8 run on a small dataset (docs/detection.md, the
    # small-data runs): log-norms ~ N(0, 0.42^2), a spread (1.4826 MAD of the step-to-step
    # changes / sqrt 2) of about 0.42. A step 10x the baseline (the median of the latest
    # 16) then has z = ln 10 / 0.42 = 5.5: a spike under the documented defaults (ratio > 5
    # and z > 5); with z > 6 it was not (the norm had to reach exp(6 * 0.42) = 12x the
    # baseline, and half of the x10 spikes of those runs were missed). A x4 step is none.
    import optax

    import optax_gradhealth as gh

    logs = np.random.default_rng(5).normal(0.0, 0.42, 128)
    diffs = np.diff(logs)
    spread = 1.4826 * np.median(np.abs(diffs - np.median(diffs))) / math.sqrt(2.0)
    assert math.log(10.0) / 6.0 < spread < math.log(10.0) / 5.0, spread
    baseline = math.exp(np.median(logs[-16:]))
    tx = gh.guard(optax.sgd(0.0))
    params = jnp.zeros((1,), jnp.float32)
    state = tx.init(params)
    step = jax.jit(lambda g, s: tx.update(g, s, params)[1])
    for value in logs:
        state = step(jnp.array([math.exp(value)], jnp.float32), state)
    assert int(gh.metrics(state)["grad/num_spikes"]) == 0
    for factor in (4.0, 10.0):
        want = bool(factor > 5.0 and math.log(factor) / spread > 5.0)
        metrics = gh.metrics(step(jnp.array([factor * baseline], jnp.float32), state))
        assert float(metrics["grad/zscore"]) == pytest.approx(math.log(factor) / spread, rel=1e-4)
        assert bool(metrics["grad/spiked"]) is want is (factor == 10.0), (factor, spread)


def test_spike_rule_waits_for_warmup():
    rule = detect.SpikeRule(threshold=2.0, zscore=None, window=16, warmup=5, spread_floor=0.05)
    norms = np.array([1.0, 1.0, 1.0, 1.0, 100.0, 1.0, 100.0], np.float32)
    spikes = np.asarray(detect.replay_spikes(rule, norms)["spike"])
    assert spikes.tolist() == [False] * 6 + [True]


def test_spike_delay_after_a_step_change_is_zero_and_skipped_spikes_do_not_move_the_baseline():
    rng = np.random.default_rng(4)
    norms = np.exp(rng.normal(0.0, 0.1, 600)).astype(np.float32)
    norms[400:] *= 20.0  # a lasting jump
    rule = detect.SpikeRule(threshold=3.0, zscore=6.0, window=128, warmup=20, spread_floor=0.05)  # no rebaseline
    skipped = detect.replay_spikes(rule, norms)
    assert not np.asarray(skipped["spike"])[:400].any()
    assert np.asarray(skipped["spike"])[400:].all()  # found at once, and the baseline never moves
    assert float(np.asarray(skipped["median"])[-1]) == pytest.approx(0.0, abs=0.05)
    # Accepted (clip/record) spikes fold in capped: the baseline follows the new level.
    accepted = np.asarray(detect.replay_spikes(rule, norms, accept_spikes=True)["spike"])
    assert accepted[400] and not accepted[-100:].any()


def test_spike_rule_rebaselines_after_a_long_streak_but_skips_a_shorter_burst():
    rng = np.random.default_rng(16)
    norms = np.exp(rng.normal(0.0, 0.1, 900)).astype(np.float32)
    norms[200:230] *= 10.0  # a burst of 30 bad batches: every one a spike
    norms[500:] *= 10.0  # a lasting change of scale
    rule = detect.SpikeRule(5.0, 6.0, window=128, warmup=20, spread_floor=0.05, rebaseline_after=50)
    spikes = np.asarray(detect.replay_spikes(rule, norms)["spike"])
    assert spikes[200:230].all() and not spikes[230:500].any()
    # 50 spikes in a row, then a fresh window warms up (20 steps) on the new level.
    assert spikes[500:550].all() and not spikes[550:].any()


def test_spike_rule_leaves_a_dip_out_of_the_window_and_rebaselines_after_a_lasting_fall():
    """Nine nearly empty batches (norm 1e-6 among norms of 1) were pushed into the window:
    the median of the latest 16 fell to 1e-6 and the next 50 ordinary steps were spikes.
    A dip (below median**2 / bound, the mirror of a spike) is left out and counts in the
    streak, so a lasting fall of the scale re-baselines as a lasting rise does."""
    rng = np.random.default_rng(7)
    norms = np.exp(rng.normal(0.0, 0.1, 900)).astype(np.float32)
    norms[200:209] = 1e-6
    norms[400:] *= 1e-3  # a lasting fall
    norms[700] *= 10.0  # a spike at the new scale
    rule = detect.SpikeRule(5.0, 6.0, window=128, warmup=20, spread_floor=0.05, rebaseline_after=50)
    out = detect.replay_spikes(rule, norms)
    spikes, median = np.asarray(out["spike"]), np.asarray(out["median"])
    assert np.flatnonzero(spikes).tolist() == [700]
    assert abs(float(median[210])) < 0.15  # the dip did not move the baseline (log-norm 0, not -13.8)
    assert abs(float(median[440])) < 0.15  # nor, for 50 steps, the fall
    # 50 dips in a row, a fresh window, 20 steps of warm-up: the baseline is the new scale.
    assert float(median[699]) == pytest.approx(np.log(1e-3), abs=0.1)
    # Without re-baselining, dips enter the window capped: the baseline still follows the
    # fall (left out, it stayed at the old scale and the spike at the new one went
    # unseen); the short dip then costs a spike or a few on the way back, not 50.
    never = dataclasses.replace(rule, rebaseline_after=None)
    out = detect.replay_spikes(never, norms)
    found = np.flatnonzero(np.asarray(out["spike"])).tolist()
    assert 700 in found and all(209 <= t < 215 for t in found if t != 700), found
    assert float(np.asarray(out["median"])[699]) == pytest.approx(np.log(1e-3), abs=0.1)


def _warm_streak_window(seed: int, streak: int):
    """A rule (ratio 5, z 6, W 32, warm-up 5, re-baselining after 4), its window warm on
    10 norms ~exp(N(0, 0.1)) of ``seed``, those norms, and the window's run set to
    ``streak`` spikes."""
    rule = detect.SpikeRule(5.0, 6.0, window=32, warmup=5, spread_floor=0.05, rebaseline_after=4)
    window = rule.init()
    xs = np.exp(np.random.default_rng(seed).normal(0.0, 0.1, 10)).astype(np.float32)
    for x in xs:
        window = rule.fold(window, jnp.float32(x), rule.judge(window, jnp.float32(x), True), True)
    return rule, window._replace(window_streak=jnp.int32(streak)), xs


def test_spike_rule_streak_breaks_only_on_an_accepted_step_near_the_baseline():
    """The table of ``SpikeRule.streak`` (the run of spikes and dips): a spike, the
    caller's spike flag (the guard's loss spike) or a dip adds one; an accepted step
    that is neither ends the run when its log-norm lies within half the log-distance
    from the baseline to the spike bound (either side), and leaves it as it is between
    that and the bound; a step that is neither and not accepted (a NaN loss or update
    with a finite gradient norm, or a NaN norm) leaves it. (Any accepted step used to
    end the run: under a lasting change just past the threshold the new level's low
    tail kept restarting the count.)"""
    rule, window, xs = _warm_streak_window(0, 2)
    false, true = jnp.bool_(False), jnp.bool_(True)
    # The bound, by the math: the median of the 10 log-norms; the spread floor (0.05)
    # times 6 is below log 5, so the bound is 5 x the baseline and "near" is a ratio in
    # (1/sqrt(5), sqrt(5)).
    logs = np.log(xs.astype(np.float64))
    assert 6 * max(1.4826 * np.median(np.abs(np.diff(logs) - np.median(np.diff(logs)))) / np.sqrt(2), 0.05) < np.log(5)
    baseline = float(np.exp(np.median(logs)))

    def after(ratio, accepted, spike=None):
        norm = jnp.float32(ratio * baseline)
        verdict = rule.judge(window, norm, jnp.isfinite(norm))
        return int(rule.fold(window, norm, verdict, accepted, spike).window_streak)

    assert after(1.0, true) == 0  # an accepted ordinary step ends the run
    assert after(2.1, true) == 0 and after(1 / 2.1, true) == 0  # near: within sqrt(5) either side
    assert after(2.4, true) == 2 and after(4.5, true) == 2  # accepted, between sqrt(5) and 5: kept
    assert after(1 / 2.4, true) == 2 and after(1 / 4.5, true) == 2  # the mirror below
    assert after(1.0, false) == 2  # a finite norm, but skipped (NaN loss): kept
    assert after(float("nan"), false) == 2  # a NaN gradient: kept
    assert after(100.0, false) == 3  # a norm spike
    assert after(1.0, false, true) == 3  # a loss spike (the caller's flag)
    assert after(1e-4, true) == 3  # a dip
    window = window._replace(window_streak=jnp.int32(3))  # the 4th in a row restarts the window
    norm = jnp.float32(1.0)
    verdict = rule.judge(window, norm, True)
    restarted = rule.fold(window, norm, verdict, false, true)
    # on the run's own norms: here only this step's (the run ring was empty)
    assert int(restarted.window_count) == 1 and int(restarted.window_streak) == 0
    assert float(restarted.window_log_norms[0]) == 0.0
    assert int(rule.fold(window, norm, verdict, true).window_count) == 11


# ----------------------------------------------------------------------------- CUSUM


def _first_passage(scores: np.ndarray, drift: float, threshold: float) -> np.ndarray:
    """Steps until each chain's CUSUM first exceeds the threshold (jitted scan over rows)."""

    def step(carry, score):
        evidence, time, done = carry
        evidence = detect.cusum(evidence, score, drift, 2.0 * threshold)
        crossed = evidence > threshold
        time = jnp.where(done, time, time + 1)
        return (evidence, time, done | crossed), None

    chains = scores.shape[1]
    init = (jnp.zeros(chains, jnp.float32), jnp.zeros(chains, jnp.int32), jnp.zeros(chains, jnp.bool_))
    (_, time, done), _ = jax.lax.scan(step, init, jnp.asarray(scores, jnp.float32))
    assert bool(done.all()), "some chain never crossed: lengthen the stream"
    return np.asarray(time)


def _siegmund_run_length(mean: float, drift: float, threshold: float) -> float:
    delta = mean - drift
    b = threshold + 1.166
    return (math.exp(-2.0 * delta * b) + 2.0 * delta * b - 1.0) / (2.0 * delta * delta)


# ----------------------------------------------------------------------------- skip, clip or reset


def _actions_written_out(spikes, after_spike, window, reset_after, size, recur=True):
    """``detect.spike_action`` step by step in plain Python: a list of the skipped
    spikes' steps (at most ``size``, the oldest dropped), recurring = a spike after a
    non-spike with a skipped spike less than ``window`` steps back (never without
    ``recur``: every spike is written)."""
    ring, out = [], []
    for step, (spike, after) in enumerate(zip(spikes, after_spike)):
        recurring = bool(recur and spike and not after and any(step - s < window for s in ring))
        reset = False
        if spike and not recurring:
            ring = [*ring, step][-size:]
            if reset_after is not None and sum(step - s < window for s in ring) >= reset_after:
                reset, ring = True, []
        out.append((recurring, reset))
    return out


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.booleans(), min_size=1, max_size=120),
    st.lists(st.booleans(), min_size=120, max_size=120),
    st.integers(1, 40),
    st.sampled_from([None, 1, 2, 3, 5]),
    st.booleans(),
)
def test_spike_action_matches_the_rule_written_out(spikes, after_spike, window, reset_after, recur):
    after_spike = after_spike[: len(spikes)]
    size = reset_after or 1
    want = _actions_written_out(spikes, after_spike, window, reset_after, size, recur)

    def step(ring, x):
        t, spike, after = x
        action = detect.spike_action(ring, t, spike, after, window, reset_after, recur=recur)
        return action.ring, (action.recurring, action.reset)

    ring = jnp.full((size,), detect.NO_STEP, jnp.int32)
    xs = (jnp.arange(len(spikes), dtype=jnp.int32), jnp.asarray(spikes), jnp.asarray(after_spike))
    ring, (recurring, reset) = jax.lax.scan(step, ring, xs)
    # Flags the guard folds into its state as they are: bool, and an int32 ring.
    assert (recurring.dtype, reset.dtype, ring.dtype) == (jnp.bool_, jnp.bool_, jnp.int32)
    assert list(zip(np.asarray(recurring).tolist(), np.asarray(reset).tolist())) == want


def test_recurring_spikes_are_accepted_and_a_run_is_skipped_in_the_replay():
    """The replay with the guard's action: x20 spikes every 7th step (recurring: the
    first skipped, the others accepted capped, no reset), then a run of 6 (skipped, a
    reset at the 3rd and the 6th), as the rule written out above says."""
    rng = np.random.default_rng(0)
    norms = np.exp(0.05 * rng.normal(size=400)).astype(np.float32)
    spiky = list(range(100, 200, 7)) + list(range(300, 306))
    norms[spiky] *= 20.0
    rule = detect.SpikeRule(5.0, 5.0, 128, 20, 0.05, 16, 50)
    out = detect.replay_spikes(rule, norms, recur_window=100, reset_after=3)
    spike = np.asarray(out["spike"])
    np.testing.assert_array_equal(np.flatnonzero(spike), spiky)
    after = np.concatenate([[False], spike[:-1]])
    want = _actions_written_out(spike.tolist(), after.tolist(), 100, 3, 3)
    np.testing.assert_array_equal(np.asarray(out["recurring"]), [w[0] for w in want])
    np.testing.assert_array_equal(np.asarray(out["reset"]), [w[1] for w in want])
    assert np.flatnonzero(out["recurring"]).tolist() == spiky[1:15]
    # The run of 6 comes 200 steps after the last skipped spike (100): skipped whole.
    assert np.flatnonzero(out["reset"]).tolist() == [302, 305]
    # Accepted capped, the recurring spikes raise the window's baseline by at most a
    # little (no clean step became a spike, above).
    assert float(np.exp(out["median"][299])) < 1.2
    # Without the guard's action every spike is skipped: the old replay.
    assert "recurring" not in detect.replay_spikes(rule, norms)


def test_cusum_false_alarm_run_length_matches_siegmund():
    rng = np.random.default_rng(5)
    times = _first_passage(rng.normal(size=(4000, 2000)), drift=0.5, threshold=4.0)
    assert times.mean() == pytest.approx(_siegmund_run_length(0.0, 0.5, 4.0), rel=0.15)


def test_cusum_delay_after_a_step_change_matches_siegmund():
    rng = np.random.default_rng(6)
    times = _first_passage(rng.normal(2.0, 1.0, size=(60, 2000)), drift=0.5, threshold=4.0)
    assert times.mean() == pytest.approx(_siegmund_run_length(2.0, 0.5, 4.0), rel=0.15)


def test_cusum_caps_ignores_nan_and_saturates_on_inf():
    e = detect.cusum(jnp.array([0.0, 5.0, 5.0, 5.0]), jnp.array([1.0, jnp.nan, jnp.inf, 100.0]), 2.0, 8.0)
    np.testing.assert_allclose(np.asarray(e), [0.0, 3.0, 8.0, 8.0])


# ----------------------------------------------------------------------------- devices


def test_leave_one_out_cosine_from_norms_and_cosines_matches_the_vectors():
    rng = np.random.default_rng(7)
    g = rng.normal(size=(6, 50)) + 0.5 * rng.normal(size=50)
    mean = g.mean(axis=0)
    norms = np.linalg.norm(g, axis=1)
    cos_to_mean = g @ mean / (norms * np.linalg.norm(mean))
    want = [g[k] @ (g.sum(0) - g[k]) / (norms[k] * np.linalg.norm(g.sum(0) - g[k])) for k in range(6)]
    got = detect.leave_one_out_cosine(norms.astype(np.float32), cos_to_mean.astype(np.float32))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def test_device_scores_against_numpy():
    rng = np.random.default_rng(8)
    norms = np.exp(rng.normal(0.0, 0.05, 8))
    norms[2] *= 3.0
    cos = rng.uniform(0.3, 0.5, 8)
    cos[5] = -0.2
    scores = detect.device_scores(norms.astype(np.float32), cos.astype(np.float32), 0.0, 0.0, 0.1, 0.05)
    logs = np.log(norms)
    spread = max(1.4826 * np.median(np.abs(logs - np.median(logs))), 0.1)
    np.testing.assert_allclose(np.asarray(scores.norm_score), np.abs(logs - np.median(logs)) / spread, rtol=1e-4)
    g_norm = (cos * norms).sum() / 8
    loo = np.array(
        [
            (8 * c * n * g_norm - n * n) / (n * math.sqrt(64 * g_norm**2 - 16 * c * n * g_norm + n * n))
            for c, n in zip(cos, norms)
        ]
    )
    # The direction score is a robust z-score of log(1 - cosine), the log-distance.
    dist = np.log(1.0 - loo)
    cspread = max(1.4826 * np.median(np.abs(dist - np.median(dist))), 0.05)
    np.testing.assert_allclose(np.asarray(scores.direction_score), (dist - np.median(dist)) / cspread, atol=1e-4)
    assert int(np.argmax(np.asarray(scores.score))) in (2, 5)
    # A non-finite device scores inf even though it makes every cosine NaN.
    norms[6] = np.inf
    bad = detect.device_scores(norms.astype(np.float32), np.full(8, np.nan, np.float32), 0.0, 0.0, 0.1, 0.05)
    assert np.isinf(np.asarray(bad.score)[6]) and np.isfinite(np.delete(np.asarray(bad.score), 6)).all()


def test_pair_scores_against_numpy():
    rng = np.random.default_rng(9)
    c = rng.uniform(0.0, 0.3, (6, 6))
    c = (c + c.T) / 2
    c[1, 4] = c[4, 1] = 0.9
    np.fill_diagonal(c, 1.0)
    off = ~np.eye(6, dtype=bool)
    dist = np.log(1.0 - np.where(off, c, 0.0))  # the log-distance of each pair
    centre = np.median(dist[off])
    spread = max(1.4826 * np.median(np.abs(dist[off] - centre)), 0.05)
    want = np.where(off, (centre - dist) / spread, 0.0)
    np.testing.assert_allclose(np.asarray(detect.pair_scores(c.astype(np.float32), 0.05)), want, atol=1e-4)


def _pair_stream(rng, audits, k=8, centre=0.14, sd=0.3):
    """Sketched pair cosines of devices whose gradients share some signal: N(0.14, 0.3^2)."""
    pairs = np.clip(rng.normal(centre, sd, (audits, k, k)), -0.95, 0.95)
    pairs = (pairs + pairs.transpose(0, 2, 1)) / 2
    pairs[:, np.arange(k), np.arange(k)] = 1.0
    norms = np.exp(rng.normal(0.0, 0.1, (audits, k))).astype(np.float32)
    cos = np.clip(rng.normal(0.4, 0.05, (audits, k)), -1, 1).astype(np.float32)
    return norms, cos, pairs


def test_near_duplicate_under_augmentation_noise_is_flagged():
    # Two devices on the same examples with their own augmentation: pair cosine 0.99 while
    # the other pairs spread over 0.14 +- 0.3. The cosine's own z-score was ~2.6, under the
    # pair CUSUM's drift of 3: never flagged. Its log-distance is ~50x smaller than theirs.
    rng = np.random.default_rng(21)
    norms, cos, pairs = _pair_stream(rng, 60)
    pairs[20:, 2, 5] = pairs[20:, 5, 2] = rng.uniform(0.985, 0.995, 40)
    near = np.asarray(detect.replay_audits(norms, cos, pairs.astype(np.float32), **AUDIT_RULE).near_duplicate_pairs)
    assert not near[:20].any()
    assert near[22:, 2, 5].all() and near[22:, 5, 2].all()
    assert {tuple(p) for p in np.argwhere(near[-1])} == {(2, 5), (5, 2)}


def test_one_audit_where_two_batches_agree_flags_no_pair():
    # A clean regression run had one audit with a pair at cosine 0.85 against a median of
    # 0.04 (a score of 16): one audit adds at most half the threshold to the evidence.
    rng = np.random.default_rng(22)
    norms, cos, pairs = _pair_stream(rng, 40, centre=0.04, sd=0.1)
    pairs[20, 1, 6] = pairs[20, 6, 1] = 0.85
    verdicts = detect.replay_audits(norms, cos, pairs.astype(np.float32), **AUDIT_RULE)
    # Unclipped, this one score minus the drift would pass the threshold at once.
    score = float(np.asarray(detect.pair_scores(pairs[20].astype(np.float32), 0.05))[1, 6])
    assert score > AUDIT_RULE["pair_threshold"] + AUDIT_RULE["pair_drift"]
    assert not np.asarray(verdicts.near_duplicate_pairs).any()


def _audit_stream(k, audits, rng, norm_sd=0.1):
    norms = np.exp(rng.normal(0.0, norm_sd, (audits, k))).astype(np.float32)
    cos = np.clip(rng.normal(0.4, 0.05, (audits, k)), -1, 1).astype(np.float32)
    pairs = rng.normal(0.15, 0.05, (audits, k, k))
    pairs = np.clip((pairs + pairs.transpose(0, 2, 1)) / 2, -1, 1)
    pairs[:, np.arange(k), np.arange(k)] = 1.0
    return norms, cos, pairs.astype(np.float32)


@pytest.mark.parametrize("k", [8, 32])
def test_audit_detector_clean_stream_raises_nothing(k):
    rng = np.random.default_rng(10 + k)
    verdicts = detect.replay_audits(*_audit_stream(k, 1000, rng), **AUDIT_RULE)
    assert (np.asarray(verdicts.outlier_device) == -1).all()
    assert not np.asarray(verdicts.near_duplicate_pairs).any()


@pytest.mark.parametrize(("factor", "within"), [(2.5, 5), (20.0, 1)])
def test_audit_detector_names_a_persistent_device_in_time(factor, within):
    rng = np.random.default_rng(11)
    norms, cos, pairs = _audit_stream(8, 200, rng)
    norms[100:, 3] *= factor
    verdicts = detect.replay_audits(norms, cos, pairs, **AUDIT_RULE)
    named = np.asarray(verdicts.outlier_device)
    assert (named[:100] == -1).all()
    first = int(np.argmax(named[100:] == 3))
    assert named[100 + first] == 3 and first < within
    assert (named[100 + within :] == 3).all()  # and keeps naming it
    assert np.asarray(verdicts.outlier_devices)[150].tolist() == [i == 3 for i in range(8)]


def _signal_dominated_stream(rng, audits, odd=None, odd_ratio=4.0, k=8, dim=256):
    """Per-device gradients ``s + r_k n_k``: one shared signal three times the noise's norm
    (cosines to the mean ~0.95, as in early training) and a noise whose size varies by
    batch, ``r_k`` log-normal (sigma 0.6: a batch with 5x the usual noise now and then).
    ``odd=(start, device)`` multiplies that device's noise by ``odd_ratio`` from ``start``."""
    signal = rng.normal(size=dim)
    signal *= 3.0 / np.linalg.norm(signal)
    ratio = np.exp(rng.normal(0.0, 0.6, (audits, k)))
    if odd is not None:
        ratio[odd[0] :, odd[1]] *= odd_ratio
    grads = signal + ratio[..., None] * rng.normal(size=(audits, k, dim)) / np.sqrt(dim)
    mean = grads.mean(axis=1)
    norms = np.linalg.norm(grads, axis=2)
    cos = np.einsum("tkd,td->tk", grads, mean) / (norms * np.linalg.norm(mean, axis=1)[:, None])
    return norms.astype(np.float32), cos.astype(np.float32)


@pytest.mark.parametrize("seed", range(4))
def test_direction_score_is_calm_when_the_devices_share_a_strong_signal(seed):
    # Cosines to the mean around 0.95 and down to ~0.6 by chance. The cosine's own z-score
    # (the score before the log-distance) passed 5 on 35-44 device-audits of each stream
    # and the instant threshold 10 on two of them; the log-distance's passes 5 at most on
    # the first audit (no running spread yet) and never reaches 10.
    norms, cos = _signal_dominated_stream(np.random.default_rng(seed), 300)
    assert np.median(cos) > 0.9 and cos.min() < 0.7
    scores = np.asarray(detect.replay_audits(norms, cos, **AUDIT_RULE).scores.direction_score)
    assert scores.max() < AUDIT_RULE["outlier_threshold"]
    assert (scores[1:] > 5.0).sum() == 0


@pytest.mark.parametrize("seed", range(4))
def test_audit_detector_names_a_persistently_noisy_device_when_the_signal_is_strong(seed):
    # One device's noise 4x the others' from audit 100 (its cosine ~0.72 against ~0.95).
    norms, cos = _signal_dominated_stream(np.random.default_rng(seed), 200, odd=(100, 3))
    verdicts = detect.replay_audits(norms, cos, **AUDIT_RULE)
    named = np.asarray(verdicts.outlier_device)
    first = int(np.argmax(named[100:] == 3))
    assert first < 10
    # From its first naming on, device 3 is named at every audit where its gradient looks
    # abnormal now (score above the evidence's drift, the evidence having passed its
    # threshold) and at no other: the evidence alone does not name it on an audit where
    # its noise happened to look normal. A 4x noise does most of the time.
    score = np.asarray(verdicts.scores.score)[100 + first :, 3]
    evidence = np.asarray(verdicts.outlier_evidence)[100 + first :, 3]
    expected = (score > AUDIT_RULE["outlier_threshold"]) | (
        (evidence > AUDIT_RULE["evidence_threshold"]) & (score > AUDIT_RULE["evidence_drift"])
    )
    np.testing.assert_array_equal(named[100 + first :] == 3, expected)
    assert (named[100:] == 3).mean() > 0.6
    assert set(np.unique(named[100:])) <= {-1, 3}


def test_audit_detector_forgets_a_fault_once_it_is_over():
    rng = np.random.default_rng(12)
    norms, cos, pairs = _audit_stream(8, 300, rng)
    norms[100:150, 3] *= 3.0
    named = np.asarray(detect.replay_audits(norms, cos, pairs, **AUDIT_RULE).outlier_device)
    assert (named[110:150] == 3).all() and (named[170:] == -1).all()


def test_audit_detector_flags_a_near_duplicate_pair_and_only_it():
    rng = np.random.default_rng(13)
    norms, cos, pairs = _audit_stream(8, 200, rng)
    pairs[100:, 2, 6] = pairs[100:, 6, 2] = rng.uniform(0.8, 0.9, 100)
    near = np.asarray(detect.replay_audits(norms, cos, pairs, **AUDIT_RULE).near_duplicate_pairs)
    assert not near[:100].any()
    first = int(np.argmax(near[100:, 2, 6]))
    assert first < 5
    flagged = {(j, k) for j, k in zip(*np.nonzero(near[-1]))}
    assert flagged == {(2, 6), (6, 2)}


def test_audit_detector_non_finite_device_is_named_and_does_not_move_the_others():
    rng = np.random.default_rng(14)
    norms, cos, pairs = _audit_stream(8, 40, rng)
    norms[20, 5] = np.inf
    cos[20] = np.nan
    verdicts = detect.replay_audits(norms, cos, pairs, **AUDIT_RULE)
    assert int(verdicts.outlier_device[20]) == 5 and np.isinf(float(verdicts.outlier_score[20]))
    assert (np.asarray(verdicts.outlier_device)[21:] == -1).all()
    np.testing.assert_array_equal(verdicts.outlier_evidence[20], verdicts.outlier_evidence[19])


def test_a_low_norm_on_a_step_that_was_not_accepted_is_no_dip():
    """A finite gradient norm far below the baseline (a dip's) on a step the guard skipped
    as non-finite (its loss, value or update): not accepted, so it neither adds to the
    run of spikes and dips nor joins the run's ring, and one short of
    ``rebaseline_after`` it does not restart the window (the documented rule: a step not
    accepted leaves the run as it was). Accepted, the same norm is a dip."""
    rule, window, xs = _warm_streak_window(1, 3)
    low = jnp.float32(1e-3 * np.exp(np.median(np.log(xs.astype(np.float64)))))  # 1/1000 of the baseline
    verdict = rule.judge(window, low, jnp.bool_(False))  # judged as the guard does: not finite
    kept, restart = rule.fold_and_restart(window, low, verdict, jnp.bool_(False))
    assert not bool(restart)
    assert int(kept.window_streak) == 3 and int(kept.window_count) == 10
    assert int(kept.window_run_count) == int(window.window_run_count)
    verdict = rule.judge(window, low, jnp.bool_(True))
    _, restart = rule.fold_and_restart(window, low, verdict, jnp.bool_(True))
    assert bool(restart)  # accepted: the 4th dip in a row
