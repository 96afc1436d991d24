"""Clip policies and gh.clip_by_global_norm against references written out in numpy."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gradhealth as gh


def random_grads(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.normal(size=(4, 3)) * scale, jnp.float32), "b": jnp.asarray(rng.normal(size=3))}


def np_norm(tree):
    return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree))))


class TestClipByGlobalNorm(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_optax_and_records_norms(self):
        tx = gh.clip_by_global_norm(1.0)
        reference = optax.clip_by_global_norm(1.0)
        update = self.variant(tx.update)
        state = tx.init(random_grads(0))
        num_clipped = 0
        for seed, scale in enumerate([0.01, 5.0, 0.3, 50.0]):
            grads = random_grads(seed, scale)
            updates, state = update(grads, state)
            expected, _ = reference.update(grads, reference.init(grads))
            chex.assert_trees_all_close(updates, expected, rtol=1e-6)
            m = gh.metrics(state)
            norm = np_norm(grads)
            num_clipped += norm > 1.0
            np.testing.assert_allclose(m["grad/norm"], norm, rtol=1e-6)
            np.testing.assert_allclose(m["grad/norm_clipped"], min(norm, 1.0), rtol=1e-6)
            np.testing.assert_allclose(m["grad/norm_clipped"], np_norm(updates), rtol=1e-6)
            assert bool(m["grad/clipped"]) == (norm > 1.0)
            assert int(m["grad/num_clipped"]) == num_clipped
            assert int(m["grad/num_steps"]) == seed + 1
            np.testing.assert_allclose(m["grad/leaf_norm/w"], np_norm(grads["w"]), rtol=1e-6)

    def test_huge_finite_gradient_is_clipped_not_zeroed(self):
        # optax's norm overflows to inf and its clip returns all zeros here.
        grads = {"w": jnp.array([1e20, -1e20, 1e19], jnp.float32)}
        assert float(jnp.abs(optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())[0]["w"]).sum()) == 0
        tx = gh.clip_by_global_norm(1.0)
        updates, _ = tx.update(grads, tx.init(grads))
        np.testing.assert_allclose(np_norm(updates), 1.0, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(updates["w"]), np.array([1e20, -1e20, 1e19]) / np_norm(grads), rtol=1e-6)

    def test_fp16_gradient_keeps_dtype_and_is_clipped_correctly(self):
        grads = {"w": jnp.full((16,), 300.0, jnp.float16)}  # sum of squares 1.44e6 > fp16 max
        tx = gh.clip_by_global_norm(1.0)
        updates, state = tx.update(grads, tx.init(grads))
        assert updates["w"].dtype == jnp.float16
        np.testing.assert_allclose(np.asarray(updates["w"], np.float64), np.full(16, 0.25), rtol=1e-3)
        np.testing.assert_allclose(gh.metrics(state)["grad/norm"], 1200.0, rtol=1e-6)

    def test_nonfinite_updates_pass_through_unchanged(self):
        grads = {"w": jnp.array([jnp.nan, 1.0])}
        tx = gh.clip_by_global_norm(1.0)
        updates, state = tx.update(grads, tx.init(grads))
        assert np.isnan(updates["w"][0]) and float(updates["w"][1]) == 1.0
        assert not bool(gh.metrics(state)["grad/clipped"])


def zscore_reference(norms, accepted, z, stats_decay, warmup_steps, warmup_max_norm, max_norm=None):
    """ZScoreClip written out in float64: thresholds used at each step. Warm once
    max(warmup_steps, 2) norms are in; then the clipped norm is folded, except while
    every norm folded so far is the same (zero spread: the raw norm)."""
    decay = stats_decay
    ema = sq = 0.0
    count = 0
    folded: set[float] = set()
    thresholds = []
    for norm, ok in zip(norms, accepted):
        warm = count >= max(warmup_steps, 2)
        if warm:
            correction = 1 - decay**count
            mean, second = ema / correction, sq / correction
            threshold = mean + z * math.sqrt(max(second - mean**2, 0.0))
        else:
            threshold = warmup_max_norm
        if max_norm is not None:
            threshold = min(threshold, max_norm)
        thresholds.append(threshold)
        if ok and math.isfinite(norm) and norm > 0:  # a zero norm carries no scale
            value = min(norm, threshold) if warm and len(folded) > 1 else norm
            folded.add(float(np.float32(value)))
            ema = decay * ema + (1 - decay) * value
            sq = decay * sq + (1 - decay) * value**2
            count += 1
    return thresholds


def run_policy(policy, norms, accepted):
    def step(state, inputs):
        norm, ok = inputs
        return policy.update(state, norm, ok), policy.threshold(state)

    _, thresholds = jax.lax.scan(
        step, policy.init(), (jnp.asarray(norms, jnp.float32), jnp.asarray(accepted, jnp.bool_))
    )
    return np.asarray(thresholds, np.float64)


def test_zscore_policy_matches_reference():
    rng = np.random.default_rng(0)
    norms = list(np.abs(rng.normal(1.0, 0.2, size=120)))
    norms[40], norms[70], norms[90] = 20.0, float("nan"), 8.0
    accepted = [True] * 120
    accepted[50] = False  # e.g. skipped by the guard
    for kwargs in [
        dict(z=2.5, stats_decay=0.97, warmup_steps=25, warmup_max_norm=1.0),
        dict(z=1.0, stats_decay=0.9, warmup_steps=0, warmup_max_norm=math.inf, max_norm=1.1),
    ]:
        got = run_policy(gh.ZScoreClip(**kwargs), norms, accepted)
        expected = zscore_reference(norms, accepted, **kwargs)
        np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_zscore_policy_survives_a_norm_whose_square_overflows_float32():
    """One norm of 1e20 (its square overflows float32) left the running variance NaN
    (0 * Inf at the first step) or Inf for the rest of the run, and ZScoreClip's
    threshold NaN: it never clipped again. The variance now saturates at float32's max
    and decays as the EMA forgets; reference: the Welford update in float64 with that
    saturation written out."""
    decay, z, big = 0.9, 2.0, float(np.finfo(np.float32).max)
    norms = [1e20] + [1.0] * 1000
    got = run_policy(gh.ZScoreClip(z=z, stats_decay=decay, warmup_steps=0), norms, [True] * len(norms))
    mean = var = 0.0
    expected = []
    for t, norm in enumerate(norms, start=1):
        warm = t > 2  # two norms in (warmup_steps=0): mean + z * std, else warmup_max_norm (1.0)
        expected.append(mean + z * math.sqrt(var) if warm else 1.0)
        value = min(norm, expected[-1]) if warm else norm
        alpha = (1 - decay) / (1 - decay**t)
        diff = value - mean
        mean += alpha * diff
        var = (1 - alpha) * min(var + min(alpha * diff * diff, big), big)
    assert np.all(np.isfinite(got[1:])), got[:5]
    np.testing.assert_allclose(got[1:], expected[1:], rtol=1e-4)
    assert got[-1] < 2.0  # the EMA forgot the outlier: a norm of 2 would be clipped again


@pytest.mark.parametrize("direction", [2.0, 0.0], ids=["ulp_up", "ulp_down"])
def test_zscore_variance_survives_a_power_rounded_one_ulp_off(monkeypatch, direction):
    """The bias correction's power and division round differently per backend (on an
    H200 the threshold after one norm was 2.4e-4 off: the sqrt of a first variance
    that should be 0). With ``decay**t`` one ulp off (``decay**0`` stays 1, as IEEE
    ``pow`` requires) the first variance is still exactly 0, never negative, and every
    threshold matches the float64 reference."""
    real_power = jnp.power

    def one_ulp_off(x, y):
        exact = real_power(x, y)
        return jnp.where(jnp.asarray(y) == 0, exact, jnp.nextafter(exact, jnp.asarray(direction, exact.dtype)))

    monkeypatch.setattr(jnp, "power", one_ulp_off)
    policy = gh.ZScoreClip(z=1.0, stats_decay=0.9, warmup_steps=0)
    state = policy.update(policy.init(), jnp.float32(1.3), jnp.bool_(True))
    assert float(state.zscore_norm_var) == 0.0
    assert float(state.zscore_norm_mean) == np.float32(1.3)
    rng = np.random.default_rng(3)
    norms = list(np.abs(rng.normal(1.0, 0.2, size=60)))
    kwargs = dict(z=1.0, stats_decay=0.9, warmup_steps=0, warmup_max_norm=math.inf)
    got = run_policy(gh.ZScoreClip(**kwargs), norms, [True] * 60)
    np.testing.assert_allclose(got, zscore_reference(norms, [True] * 60, **kwargs), rtol=1e-5)


def test_zscore_policy_is_not_poisoned_by_nan_or_skipped_steps():
    policy = gh.ZScoreClip(warmup_steps=0)
    state = policy.init()
    for _ in range(10):
        state = policy.update(state, jnp.float32(1.0), jnp.bool_(True))
    before = state
    state = policy.update(state, jnp.float32(jnp.nan), jnp.bool_(True))
    state = policy.update(state, jnp.float32(jnp.inf), jnp.bool_(True))
    state = policy.update(state, jnp.float32(1e6), jnp.bool_(False))
    chex.assert_trees_all_equal(state, before)


def test_percentile_policy_matches_numpy_over_ring():
    rng = np.random.default_rng(1)
    norms = list(np.abs(rng.normal(2.0, 1.0, size=60)))
    norms[10] = float("nan")
    accepted = [i % 7 != 3 for i in range(60)]
    policy = gh.PercentileClip(percentile=75.0, history_size=16, warmup_steps=5, warmup_max_norm=0.5)
    got = run_policy(policy, norms, accepted)
    kept: list[float] = []
    for i, (norm, ok) in enumerate(zip(norms, accepted)):
        expected = 0.5 if len(kept) < 5 else np.percentile(kept[-16:], 75.0)
        np.testing.assert_allclose(got[i], expected, rtol=1e-5, err_msg=f"step {i}")
        if ok and math.isfinite(norm):
            kept.append(norm)


def test_adaptive_policy_in_clip_transformation_clips_at_its_threshold():
    policy = gh.ZScoreClip(z=2.0, warmup_steps=5, warmup_max_norm=math.inf)
    tx = gh.clip_by_global_norm(policy)
    grads = random_grads(0)
    state = tx.init(grads)
    update = jax.jit(tx.update)
    for seed in range(20):
        state_before = state
        g = random_grads(seed, 1.0 + 0.05 * seed)
        if seed == 15:
            g = jax.tree.map(lambda x: 100 * x, g)
        updates, state = update(g, state)
        threshold = float(policy.threshold(state_before.clip_policy_state))
        np.testing.assert_allclose(gh.metrics(state)["grad/clip_threshold"], threshold, rtol=1e-6)
        np.testing.assert_allclose(np_norm(updates), min(np_norm(g), threshold), rtol=1e-5)
    assert bool(gh.metrics(state)["grad/clipped"]) is False
    assert int(gh.metrics(state)["grad/num_clipped"]) >= 1


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: gh.clip_by_global_norm(-1.0), r"`max_norm` must be a positive number.*-1.0"),
        (lambda: gh.clip_by_global_norm(float("nan")), r"`max_norm` must not be NaN"),
        (lambda: gh.clip_by_global_norm("1.0"), r"`max_norm` must be None, a positive number or a clip policy"),
        (lambda: gh.ZScoreClip(z=0.0), r"`z` must be a positive number.*0.0"),
        (lambda: gh.ZScoreClip(stats_decay=1.0), r"`stats_decay` must lie strictly between 0 and 1, got 1.0"),
        (lambda: gh.ZScoreClip(stats_decay=0.0), r"`stats_decay` must lie strictly between 0 and 1"),
        (lambda: gh.ZScoreClip(warmup_steps=-1), r"`warmup_steps` must be an int >= 0, got -1"),
        (lambda: gh.ZScoreClip(warmup_steps=2.5), r"`warmup_steps` must be an int >= 0, got 2.5"),
        (lambda: gh.ZScoreClip(max_norm=0), r"`max_norm` must be a positive number"),
        (lambda: gh.PercentileClip(percentile=0), r"`percentile` must lie in \(0, 100\], got 0.0"),
        (lambda: gh.PercentileClip(percentile=101), r"`percentile` must lie in \(0, 100\]"),
        (lambda: gh.PercentileClip(history_size=0), r"`history_size` must be an int >= 1, got 0"),
        (lambda: gh.FixedClip(True), r"`max_norm` must be a real number, got True"),
    ],
)
def test_bad_arguments_are_rejected_at_construction(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


def test_structure_mismatch_is_a_clear_error():
    tx = gh.clip_by_global_norm(1.0)
    state = tx.init({"w": jnp.zeros(2)})
    with pytest.raises(ValueError, match="structure does not match"):
        jax.jit(tx.update)({"w": jnp.zeros(2), "extra": jnp.zeros(1)}, state)


def test_percentile_clip_in_clip_by_global_norm_feeds_the_pre_clip_norm():
    """The ring buffer of a PercentileClip inside clip_by_global_norm holds the *pre-clip*
    norms (the docstring's contract). Fed the post-clip norm instead, every clipped step
    would pull the percentile down to the threshold itself, and the threshold could only
    fall: here the thresholds after warm-up would be 1.0, not the pre-clip percentiles."""
    policy = gh.PercentileClip(percentile=50.0, history_size=4, warmup_steps=2, warmup_max_norm=1.0)
    tx = gh.clip_by_global_norm(policy)
    direction = np.array([0.6, -0.8])  # unit norm
    norms = [3.0, 5.0, 4.0, 0.5, 6.0, 2.0, 8.0]
    state = tx.init({"w": jnp.zeros(2)})
    update = jax.jit(tx.update)
    history: list[float] = []  # the pre-clip norms, written out
    for step, norm in enumerate(norms):
        grads = {"w": jnp.asarray(direction * norm, jnp.float32)}
        updates, state = update(grads, state)
        threshold = 1.0 if len(history) < 2 else float(np.percentile(history[-4:], 50.0))
        np.testing.assert_allclose(gh.metrics(state)["grad/clip_threshold"], threshold, rtol=1e-6, err_msg=f"{step}")
        np.testing.assert_allclose(np_norm(updates), min(norm, threshold), rtol=1e-5, err_msg=f"step {step}")
        history.append(norm)
    np.testing.assert_allclose(
        np.sort(np.asarray(state.clip_policy_state.percentile_history)), np.sort(norms[-4:]), rtol=1e-6
    )


# --- Tests added from mutation testing (tools/mutation.py _clipping; docs/testing.md) ----


def test_policy_arguments_are_normalised_and_bounds_are_inclusive():
    policy = gh.PercentileClip(percentile=50, warmup_max_norm=2, max_norm=3)
    assert type(policy.percentile) is float and policy.percentile == 50.0
    assert type(policy.warmup_max_norm) is float and type(policy.max_norm) is float
    assert gh.PercentileClip(percentile=100).percentile == 100.0  # (0, 100]: 100 is in
    assert gh.PercentileClip(percentile=0.5).percentile == 0.5
    sized = gh.PercentileClip(history_size=np.int64(3))
    assert type(sized.history_size) is int and sized.history_size == 3
    zscore = gh.ZScoreClip(z=2, stats_decay=np.float32(0.5), warmup_steps=np.int64(3), warmup_max_norm=math.inf)
    assert type(zscore.z) is float and type(zscore.stats_decay) is float and zscore.stats_decay == 0.5
    assert type(zscore.warmup_steps) is int and zscore.warmup_steps == 3
    assert zscore.max_norm is None and zscore.warmup_max_norm == math.inf
    assert type(gh.FixedClip(2).max_norm) is float


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: gh.PercentileClip(percentile="50"), TypeError, r"^`percentile` must be a real number"),
        (lambda: gh.PercentileClip(percentile=-5), ValueError, r"^`percentile` must lie in \(0, 100\], got -5.0"),
        (lambda: gh.PercentileClip(warmup_steps=-1), ValueError, r"^`warmup_steps` must be an int >= 0"),
        (lambda: gh.PercentileClip(warmup_max_norm=0), ValueError, r"^`warmup_max_norm` must be a positive"),
        (lambda: gh.PercentileClip(max_norm=-1.0), ValueError, r"^`max_norm` must be a positive number, finite"),
        (lambda: gh.ZScoreClip(max_norm=math.inf), ValueError, r"^`max_norm` must be a positive number, finite"),
        (lambda: gh.ZScoreClip(z=math.inf), ValueError, r"^`z` must be a positive number, finite"),
        (lambda: gh.ZScoreClip(warmup_max_norm=-1), ValueError, r"^`warmup_max_norm` must be a positive number"),
        (lambda: gh.FixedClip(0.0), ValueError, r"^`max_norm` must be a positive number \(inf allowed\)"),
        (lambda: gh.clip_by_global_norm(True), TypeError, r"^`max_norm` must be None, a positive number or a clip"),
        (lambda: gh.clip_by_global_norm(gh.FixedClip), TypeError, r"got <class .*FixedClip'> \(type type\)"),
    ],
)
def test_bad_policy_arguments_name_the_argument(build, error, match):
    with pytest.raises(error, match=match):
        build()


def _policies():
    return [
        gh.FixedClip(2.0),
        gh.ZScoreClip(z=2.0, warmup_steps=1, warmup_max_norm=4.0, max_norm=10.0),
        gh.PercentileClip(percentile=50.0, history_size=3, warmup_steps=1, warmup_max_norm=4.0, max_norm=10.0),
    ]


@pytest.mark.parametrize("x64", [False, True], ids=["x32", "x64"])
def test_policy_states_and_thresholds_keep_their_dtypes(x64):
    # A state must come out of update with the dtypes it went in with (a scan carry, a
    # donated buffer); the threshold is float32 like the norm it is compared with.
    with jax.enable_x64(x64):
        for policy in _policies():
            state = policy.init()
            for norm in (1.0, 3.0):
                new = policy.update(state, jnp.float32(norm), jnp.bool_(True))
                assert jax.tree.map(lambda x: x.dtype, new) == jax.tree.map(lambda x: x.dtype, state), policy
                state = new
            for leaf in jax.tree.leaves(state):
                assert leaf.dtype in (jnp.float32, jnp.int32), (policy, leaf.dtype)
            assert policy.threshold(state).dtype == jnp.float32
            tx = gh.clip_by_global_norm(policy)
            tx_state = tx.init({"w": jnp.zeros(2)})
            _, new_state = tx.update({"w": jnp.array([3.0, 4.0])}, tx_state)
            assert [x.dtype for x in jax.tree.leaves(new_state)] == [x.dtype for x in jax.tree.leaves(tx_state)]
            for st in (tx_state, new_state):  # the dtypes ClipByGlobalNormState documents
                assert st.clip_norm.dtype == st.clip_norm_clipped.dtype == st.clip_threshold.dtype == jnp.float32
                assert st.clip_clipped.dtype == jnp.bool_
                assert st.clip_num_clipped.dtype == st.clip_num_steps.dtype == jnp.int32


@pytest.mark.parametrize("warmup_steps", [0, 1, 2])
def test_adaptive_threshold_needs_one_accepted_norm_and_the_warmup(warmup_steps):
    # Written out: PercentileClip is warm once max(warmup_steps, 1) norms are accepted;
    # the percentile of one norm is the norm itself. ZScoreClip needs two (one has no
    # spread): after one norm it still uses warmup_max_norm.
    percentile = gh.PercentileClip(percentile=90.0, history_size=4, warmup_steps=warmup_steps, warmup_max_norm=7.0)
    zscore = gh.ZScoreClip(z=3.0, warmup_steps=warmup_steps, warmup_max_norm=7.0)
    for policy, after_one in ((percentile, 2.0 if warmup_steps <= 1 else 7.0), (zscore, 7.0)):
        state = policy.init()
        assert float(policy.threshold(state)) == 7.0
        state = policy.update(state, jnp.float32(2.0), jnp.bool_(True))
        assert float(policy.threshold(state)) == after_one, policy
        state = policy.update(state, jnp.float32(2.0), jnp.bool_(False))  # not accepted: no count
        assert float(policy.threshold(state)) == after_one, policy


@pytest.mark.parametrize("warmup_steps", [0, 1])
def test_zscore_threshold_does_not_freeze_at_the_first_norm(warmup_steps):
    """With warmup_steps 0 or 1 the threshold after one norm was that norm (zero
    spread); every larger norm was clipped to it and folded in as it, the spread stayed
    0, and the threshold never rose: rising norms 1 -> 3 were all clipped to 1.
    Reference: ZScoreClip written out in float64 (two norms of warm-up at least)."""
    norms = list(np.linspace(1.0, 3.0, 200))
    kwargs = dict(z=2.5, stats_decay=0.97, warmup_steps=warmup_steps, warmup_max_norm=10.0)
    got = run_policy(gh.ZScoreClip(**kwargs), norms, [True] * len(norms))
    np.testing.assert_allclose(got, zscore_reference(norms, [True] * len(norms), **kwargs), rtol=1e-5)
    assert got[-1] > norms[-1]  # the threshold followed the rise
    assert np.mean(np.asarray(norms[2:]) > got[2:]) < 0.05


def test_zscore_threshold_does_not_freeze_after_a_warmup_of_equal_norms():
    """A warm-up whose norms are all equal leaves the variance exactly 0, the threshold
    the mean: capped at it, every later norm was folded in as that mean and the
    threshold stayed there for good. While the spread is 0 the raw norm is folded.
    Reference: ZScoreClip written out in float64."""
    norms = [1.0] * 5 + list(np.linspace(1.0, 3.0, 200))
    kwargs = dict(z=2.5, stats_decay=0.97, warmup_steps=5, warmup_max_norm=10.0)
    got = run_policy(gh.ZScoreClip(**kwargs), norms, [True] * len(norms))
    np.testing.assert_allclose(got, zscore_reference(norms, [True] * len(norms), **kwargs), rtol=1e-5)
    assert got[-1] > norms[-1]


def test_guard_clip_error_names_the_clip_mode_transformations():
    """`clip=` of the guard also takes a clip-mode transformation: its error says so.
    clip_by_global_norm, which takes none, does not list them."""
    with pytest.raises(
        TypeError,
        match=r"^`clip` must be None.*a clip-mode transformation \(gh.clip_by_value, "
        r"gh.clip_by_leaf_norm, gh.adaptive_grad_clip, gh.adagc_clip, or any optax.GradientTransformation\), "
        r"got '1.0'",
    ):
        gh.guard(optax.sgd(0.1), clip="1.0")
    with pytest.raises(TypeError, match=r"^`max_norm` must be None") as info:
        gh.clip_by_global_norm("1.0")
    assert "clip-mode" not in str(info.value)
    # What the message promises is accepted.
    for mode in (gh.clip_by_value(1.0), gh.clip_by_leaf_norm(1.0), gh.adaptive_grad_clip(), gh.adagc_clip()):
        gh.guard(optax.sgd(0.1), clip=mode)


def test_fixed_clip_hint_admits_the_scalar_array_it_takes():
    """FixedClip takes a jax scalar (optax.inject_hyperparams); its hint said float."""
    import typing

    assert gh.FixedClip(jnp.float32(2.0)).threshold(None) == 2.0
    hint = typing.get_type_hints(gh.FixedClip)["max_norm"]
    assert jax.Array in typing.get_args(hint), hint


def test_max_norm_caps_the_percentile_threshold_during_and_after_warmup():
    norms = [5.0, 1.0, 6.0, 0.5, 4.0, 8.0]
    policy = gh.PercentileClip(percentile=75.0, history_size=4, warmup_steps=2, warmup_max_norm=9.0, max_norm=4.5)
    got = run_policy(policy, norms, [True] * len(norms))
    for i in range(len(norms)):
        expected = 9.0 if i < 2 else float(np.percentile(norms[max(0, i - 4) : i], 75.0))
        np.testing.assert_allclose(got[i], min(expected, 4.5), rtol=1e-6, err_msg=f"step {i}")


@pytest.mark.parametrize("threshold", [1e-3, 1.0])
def test_clip_factor_of_a_norm_beyond_1e38_times_the_threshold_does_not_underflow(threshold):
    # threshold / norm is a float32 subnormal here (flushed to zero on CPU): the clip
    # must still bring the update to the threshold, not to zero.
    grads = {"w": jnp.array([1e38, -1e38, 3.0], jnp.float32)}
    tx = gh.clip_by_global_norm(threshold)
    updates, state = jax.jit(tx.update)(grads, tx.init(grads))
    expected = np.array([1e38, -1e38, 3.0]) * (threshold / np_norm(grads))
    # (3.0 becomes a float32 subnormal, 2e-41 or 2e-38: read as zero or kept, both fine)
    np.testing.assert_allclose(np.asarray(updates["w"], np.float64), expected, rtol=1e-5, atol=1e-37)
    m = gh.metrics(state)
    assert bool(m["grad/clipped"]) and int(m["grad/num_clipped"]) == 1
    np.testing.assert_allclose(m["grad/norm_clipped"], threshold, rtol=1e-5)


def test_clip_scales_every_float_dtype_in_float32_and_keeps_it():
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        tree = {
            "f32": jnp.asarray(rng.normal(size=5), jnp.float32),
            "f16": jnp.asarray(rng.normal(size=4) * 100, jnp.float16),
            "bf16": jnp.asarray(rng.normal(size=3) * 10, jnp.bfloat16),
            "f64": jnp.asarray(rng.normal(size=3) * 1000, jnp.float64),
            "c64": jnp.asarray(rng.normal(size=2) + 1j * rng.normal(size=2), jnp.complex64),
            "step": jnp.array(4, jnp.int32),
        }
        tx = gh.clip_by_global_norm(1.0)
        updates, state = tx.update(tree, tx.init(tree))
        floats = {k: np.asarray(v).astype(np.complex128) for k, v in tree.items() if k != "step"}
        norm = np.sqrt(sum(np.sum(np.abs(v) ** 2) for v in floats.values()))
        np.testing.assert_allclose(float(gh.metrics(state)["grad/norm"]), norm, rtol=1e-5)
        for name, value in floats.items():
            assert updates[name].dtype == tree[name].dtype, name
            rtol = {"f16": 1e-3, "bf16": 1e-2}.get(name, 1e-6)
            np.testing.assert_allclose(np.asarray(updates[name]).astype(np.complex128), value / norm, rtol=rtol)
        assert updates["step"] is tree["step"]  # non-float leaves pass through untouched


def test_fixed_clip_inf_never_clips_and_counts_steps():
    tx = gh.clip_by_global_norm(None)
    grads = {"w": jnp.array([3e30, 4e30])}
    state = tx.init(grads)
    for step in range(1, 3):
        updates, state = tx.update(grads, state)
        np.testing.assert_array_equal(np.asarray(updates["w"]), np.asarray(grads["w"]))
        m = gh.metrics(state)
        assert float(m["grad/clip_threshold"]) == math.inf and not bool(m["grad/clipped"])
        assert int(m["grad/num_clipped"]) == 0 and int(m["grad/num_steps"]) == step
        np.testing.assert_allclose(float(m["grad/norm_clipped"]), 5e30, rtol=1e-6)


@pytest.mark.parametrize("x64", [False, True], ids=["x32", "x64"])
def test_ring_write_is_a_set_that_keeps_the_buffer_dtype(x64):
    from optax_gradhealth import _clipping

    with jax.enable_x64(x64):
        buffer = np.array([1.0, np.nan, 3.0, 4.0], np.float32)
        for slot, value in [(0, 9.5), (3, -2.0), (1, 1e-3)]:
            expected = buffer.copy()
            expected[slot] = np.float32(value)  # numpy's buffer[slot] = value
            value = jnp.asarray(value, jnp.float64 if x64 else jnp.float32)
            got = _clipping.ring_write(jnp.asarray(buffer), jnp.asarray(slot, jnp.int32), value)
            assert got.dtype == jnp.float32
            np.testing.assert_array_equal(np.asarray(got), expected)
            buffer = expected


def test_structure_mismatch_error_names_the_transformation():
    tx = gh.clip_by_global_norm(1.0)
    state = tx.init({"w": jnp.zeros(2)})
    with pytest.raises(ValueError, match=r"^gh\.clip_by_global_norm: the gradient tree's structure does not") as e:
        tx.update({"v": jnp.zeros(2)}, state)
    assert str(e.value).endswith("Call `init` with parameters of the same structure as the gradients.")


def test_threshold_inf_or_array_is_accepted_and_clips_as_written_out():
    grads = {"w": jnp.array([3.0, -4.0, 12.0])}  # norm 13
    for threshold, expected_factor in [(math.inf, 1.0), (jnp.float32(2.0), 2.0 / 13.0), (np.float32(26.0), 1.0)]:
        tx = gh.clip_by_global_norm(threshold)
        updates, state = jax.jit(tx.update)(grads, tx.init(grads))
        np.testing.assert_allclose(np.asarray(updates["w"]), np.array([3.0, -4.0, 12.0]) * expected_factor, rtol=1e-6)
        assert float(gh.metrics(state)["grad/clip_threshold"]) == float(threshold)
    with pytest.raises(ValueError, match=r"^`max_norm` must be a number or a real scalar array, got an array of shape"):
        gh.clip_by_global_norm(jnp.ones(2))
    with pytest.raises(TypeError, match=r"got '1\.0' \(type str\)\.$"):
        gh.clip_by_global_norm("1.0")


def test_clip_factor_beyond_1e38_in_a_float64_leaf_under_x64():
    # The two-factor (square-root) clip on a leaf that is scaled in float64.
    with jax.enable_x64(True):
        grads = {"a": jnp.array([1e38, 1e38], jnp.float32), "b": jnp.array([1e30, -2.0], jnp.float64)}
        tx = gh.clip_by_global_norm(1e-3)
        updates, _ = tx.update(grads, tx.init(grads))
        norm = np_norm(grads)
        np.testing.assert_allclose(np.asarray(updates["b"]), np.array([1e30, -2.0]) * (1e-3 / norm), rtol=1e-5)
        assert updates["b"].dtype == jnp.float64


def test_clip_scales_low_precision_leaves_in_float32_even_under_x64():
    # "in float32" (scale_tree's contract): an fp16 / bf16 leaf is never widened to float64.
    with jax.enable_x64(True):
        tree = {"h": jnp.full((999,), 3.0, jnp.float16), "b": jnp.full((998,), 3.0, jnp.bfloat16)}
        tx = gh.clip_by_global_norm(1.0)
        text = str(jax.make_jaxpr(tx.update)(tree, tx.init(tree)))
        assert "f32[999]" in text and "f64[999]" not in text and "f64[998]" not in text


def test_zscore_clip_decay_keyword_of_0_1_still_works_with_a_warning():
    with pytest.warns(DeprecationWarning, match="stats_decay"):
        old = gh.ZScoreClip(z=2.0, decay=0.9, warmup_steps=0)
    assert old == gh.ZScoreClip(z=2.0, stats_decay=0.9, warmup_steps=0)


@pytest.mark.parametrize("policy", [gh.ZScoreClip(warmup_steps=0), gh.PercentileClip(history_size=4, warmup_steps=0)])
def test_adaptive_policies_keep_a_float32_state_for_a_float64_norm(policy):
    with jax.enable_x64(True):
        state = policy.init()
        new = policy.update(state, jnp.float64(1.5), jnp.bool_(True))
        assert [x.dtype for x in jax.tree.leaves(new)] == [x.dtype for x in jax.tree.leaves(state)]
        assert policy.threshold(new).dtype == jnp.float32


def test_the_deprecated_decay_keyword_never_silently_overrides_stats_decay():
    """ZScoreClip(stats_decay=0.9, decay=0.5) took 0.5 with only a warning, and a bad
    `decay` was reported under the other name."""
    with pytest.raises(TypeError, match=r"`decay` \(0.5\) is the deprecated name of `stats_decay` \(0.9\)"):
        gh.ZScoreClip(stats_decay=0.9, decay=0.5)
    with pytest.raises(ValueError, match=r"^`decay` must lie strictly between 0 and 1, got 1.5"):
        gh.ZScoreClip(decay=1.5)
    with pytest.warns(DeprecationWarning, match="stats_decay"):
        assert gh.ZScoreClip(decay=0.5).stats_decay == 0.5


# ------------------------------------------------- norms beyond float32, zero norms


def _beyond_float32_cases():
    # (dtype, elements) whose norm exceeds float32's max (3.4e38): the norm saturates.
    return [
        ("float32", [3e38] * 4),
        ("bfloat16", [3e38] * 4),
        ("float32", [3e38, -2e38, 1.0, 0.0]),
        ("float64", [1e39]),  # under x64 only
        ("float64", [-3e40, 1e39, 5.0]),
    ]


@pytest.mark.parametrize("dtype,values", _beyond_float32_cases())
@pytest.mark.parametrize("threshold", [1.0, 1e-3, 1e-26, 1e-30])
def test_a_norm_beyond_float32_is_clipped_to_the_threshold_and_recorded_truly(dtype, values, threshold):
    """The factor came from the saturated norm (3.4e38): four elements of 3e38 came out
    at norm 1.763 for a threshold of 1, and grad/norm_clipped said 1.0. A threshold below
    2**-86 (~1.3e-26) was scaled by 2**-40 below float32's normal range, to 0: an
    all-zero clip. Reference: the float64 norm of the returned update, and
    x * threshold / |x| in float64."""
    with jax.enable_x64(dtype == "float64"):
        grads = {"w": jnp.asarray(values, dtype), "b": jnp.array([3.0, 4.0], jnp.float32)}
        exact = {k: np.asarray(v, np.float64) for k, v in grads.items()}
        norm = math.sqrt(sum(float(np.sum(v**2)) for v in exact.values()))
        assert norm > float(np.finfo(np.float32).max)
        tx = gh.clip_by_global_norm(threshold)
        for update in (tx.update, jax.jit(tx.update)):
            updates, state = update(grads, tx.init(grads))
            got = {k: np.asarray(v, np.float64) for k, v in updates.items()}
            rtol = 1e-2 if dtype == "bfloat16" else 1e-6
            np.testing.assert_allclose(np_norm(updates), threshold, rtol=rtol)
            np.testing.assert_allclose(got["w"], exact["w"] * (threshold / norm), rtol=rtol, atol=1e-37)
            # (b's clipped elements are ~1e-38 and below: float32 subnormals, read as 0 on CPU.)
            m = gh.metrics(state)
            assert float(m["grad/norm"]) == np.finfo(np.float32).max  # saturated, as documented
            np.testing.assert_allclose(float(m["grad/norm_clipped"]), np_norm(updates), rtol=rtol)
            np.testing.assert_allclose(float(m["grad/norm_clipped"]), threshold, rtol=1e-6)
            assert bool(m["grad/clipped"])


def test_a_norm_beyond_float32_is_not_clipped_by_an_infinite_threshold():
    grads = {"w": jnp.full((4,), 3e38, jnp.float32)}
    tx = gh.clip_by_global_norm(None)
    updates, state = tx.update(grads, tx.init(grads))
    np.testing.assert_array_equal(np.asarray(updates["w"]), np.asarray(grads["w"]))
    m = gh.metrics(state)
    assert not bool(m["grad/clipped"])
    assert float(m["grad/norm_clipped"]) == np.finfo(np.float32).max  # 6e38, saturated


@pytest.mark.parametrize(
    "policy",
    [
        gh.ZScoreClip(warmup_steps=3, warmup_max_norm=1.0),
        gh.PercentileClip(history_size=10, warmup_steps=3, warmup_max_norm=1.0),
        gh.FixedClip(1.0),
    ],
    ids=["zscore", "percentile", "fixed"],
)
@pytest.mark.parametrize("in_guard", [False, True], ids=["standalone", "guard"])
def test_zero_gradients_never_make_the_threshold_zero(policy, in_guard):
    """All-zero gradients in the warm-up set ZScoreClip's threshold to 0 (mean 0, std 0)
    for good: every later gradient was multiplied by 0. A zero norm carries no scale:
    it is left out of the statistics and of the warm-up count. Reference, written out:
    the warm-up threshold (1) for the first three non-zero norms (5), then mean 5 +
    z * 0 (z-score) or the percentile of [5, 5, 5] (percentile): 5, unclipped."""
    zero, grads = {"w": jnp.zeros(2)}, {"w": jnp.array([3.0, 4.0])}
    if in_guard:
        tx = gh.guard(optax.sgd(-1.0), clip=policy)  # the update is the clipped gradient
        update = jax.jit(lambda g, s: tx.update(g, s, zero))
    else:
        tx = gh.clip_by_global_norm(policy)
        update = jax.jit(tx.update)
    state = tx.init(zero)
    for _ in range(4):
        updates, state = update(zero, state)
        assert np_norm(updates) == 0.0
    norms = []
    for _ in range(6):
        updates, state = update(grads, state)
        norms.append(np_norm(updates))
    expected = [1.0] * 6 if isinstance(policy, gh.FixedClip) else [1.0, 1.0, 1.0, 5.0, 5.0, 5.0]
    np.testing.assert_allclose(norms, expected, rtol=1e-6)
    assert float(gh.metrics(state)["grad/clip_threshold"]) == expected[-1]


def test_zero_norms_are_left_out_of_the_adaptive_statistics():
    """Both policies against their float64 references with zero norms mixed in (the
    references skip them, as they skip NaN and not-accepted steps)."""
    rng = np.random.default_rng(3)
    norms = list(np.abs(rng.normal(2.0, 0.5, size=40)))
    for i in (0, 1, 2, 7, 8, 20, 33):
        norms[i] = 0.0
    accepted = [True] * 40
    kwargs = dict(z=2.0, stats_decay=0.9, warmup_steps=4, warmup_max_norm=10.0)
    got = run_policy(gh.ZScoreClip(**kwargs), norms, accepted)
    np.testing.assert_allclose(got, zscore_reference(norms, accepted, **kwargs), rtol=1e-5)
    got = run_policy(
        gh.PercentileClip(percentile=75.0, history_size=5, warmup_steps=4, warmup_max_norm=10.0), norms, accepted
    )
    kept = []
    for i, norm in enumerate(norms):
        expected = float(np.percentile(kept[-5:], 75.0)) if len(kept) >= 4 else 10.0
        np.testing.assert_allclose(got[i], expected, rtol=1e-6, err_msg=f"step {i}")
        if norm > 0:
            kept.append(norm)


def test_percentile_state_of_another_history_size_is_refused():
    """flax.serialization restores a PercentileClip(history_size=100) state into a
    history_size=50 target without checking shapes: the policy kept 100 slots, wrote
    only slots 0..49 and took every later percentile over 50 stale norms. Now the first
    threshold or update refuses it (standalone, in clip_by_global_norm and in the guard),
    naming both sizes."""
    from flax import serialization

    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.array([1.0, 2.0, 2.0])}
    big, small = gh.PercentileClip(history_size=100), gh.PercentileClip(history_size=50)
    match = "(?s)percentile_history.*history_size=100.*history_size=50.*Restore into `tx.init"
    foreign = serialization.from_bytes(small.init(), serialization.to_bytes(big.init()))
    with pytest.raises(ValueError, match=match):
        small.threshold(foreign)
    with pytest.raises(ValueError, match=match):
        small.update(foreign, jnp.float32(1.0), jnp.bool_(True))
    for make in (lambda p: gh.clip_by_global_norm(p), lambda p: gh.guard(optax.sgd(0.1), clip=p)):
        old, new = make(big), make(small)
        _, state = old.update(grads, old.init(params), params)
        restored = serialization.from_bytes(new.init(params), serialization.to_bytes(state))
        for update in (new.update, jax.jit(new.update)):
            with pytest.raises(ValueError, match=match):
                update(grads, restored, params)
    # The same size restores and runs: the history holds the one norm written, |g| = 3.
    state = small.update(small.init(), jnp.float32(3.0), jnp.bool_(True))
    restored = serialization.from_bytes(small.init(), serialization.to_bytes(state))
    assert np.nanmax(np.asarray(restored.percentile_history)) == np_norm(grads)
