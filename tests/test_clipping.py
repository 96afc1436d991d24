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
            np.testing.assert_allclose(m["grad/layer_norm/w"], np_norm(grads["w"]), rtol=1e-6)

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


def zscore_reference(norms, accepted, z, decay, warmup_steps, warmup_max_norm, max_norm=None):
    """ZScoreClip written out in float64: thresholds used at each step."""
    ema = sq = 0.0
    count = 0
    thresholds = []
    for norm, ok in zip(norms, accepted):
        warm = count >= max(warmup_steps, 1)
        if warm:
            correction = 1 - decay**count
            mean, second = ema / correction, sq / correction
            threshold = mean + z * math.sqrt(max(second - mean**2, 0.0))
        else:
            threshold = warmup_max_norm
        if max_norm is not None:
            threshold = min(threshold, max_norm)
        thresholds.append(threshold)
        if ok and math.isfinite(norm):
            value = min(norm, threshold) if warm else norm
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
        dict(z=2.5, decay=0.97, warmup_steps=25, warmup_max_norm=1.0),
        dict(z=1.0, decay=0.9, warmup_steps=0, warmup_max_norm=math.inf, max_norm=1.1),
    ]:
        got = run_policy(gh.ZScoreClip(**kwargs), norms, accepted)
        expected = zscore_reference(norms, accepted, **kwargs)
        np.testing.assert_allclose(got, expected, rtol=1e-5)


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
        (lambda: gh.ZScoreClip(decay=1.0), r"`decay` must lie strictly between 0 and 1, got 1.0"),
        (lambda: gh.ZScoreClip(decay=0.0), r"`decay` must lie strictly between 0 and 1"),
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
