"""Tests of gh.cross_device on 8 emulated CPU devices (conftest sets the XLA flag).

References are numpy float64 computations of the formulas written out here, never
the code under test.
"""

from __future__ import annotations

import functools
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import optax_gradhealth as gh
from tests.backend import require_devices, wait_for_processes

K = 8
ROOT = Path(__file__).resolve().parents[1]

require_devices(K, __file__)


# ----------------------------------------------------------------------------- references


def flat(tree_k):
    """[K, n] float64 matrix of per-device flattened gradients (leaves in jax order)."""
    leaves = jax.tree.leaves(tree_k)
    return np.concatenate([np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in leaves], axis=1)


def reference(g, batch):
    """The cross-device formulas of DESIGN.md in float64. g: [K, n] local gradients."""
    k = g.shape[0]
    mean = g.mean(0)
    sq = (g**2).sum(1)
    norms = np.sqrt(sq)
    mean_sq = (mean**2).sum()
    mean_local_sq = sq.mean()
    unit = g / norms[:, None]
    return {
        "device_norms": norms,
        "norm_cv": norms.std() / norms.mean(),
        "norm_max_over_min": norms.max() / norms.min(),
        "agreement": (k * k * mean_sq - sq.sum()) / ((k - 1) * sq.sum()),
        "grad_sq_est": (k * batch * mean_sq - batch * mean_local_sq) / (k * batch - batch),
        "trace_cov_est": (mean_local_sq - mean_sq) / (1.0 / batch - 1.0 / (k * batch)),
        "cosine_to_mean": g @ mean / (norms * np.sqrt(mean_sq)),
        "pairwise_cosine": unit @ unit.T,
    }


def random_grads(seed, k=K):
    rng = np.random.default_rng(seed)
    shared = {"a": rng.normal(size=(60, 40)), "b": rng.normal(size=(7,))}
    return {
        name: jnp.asarray(
            np.stack([rng.uniform(0.5, 2.0) * (x + rng.normal(size=x.shape)) for _ in range(k)]), jnp.float32
        )
        for name, x in shared.items()
    }


def first_copy(tree):
    return jax.tree.map(lambda x: np.asarray(x)[0], jax.device_get(tree))


def assert_identical_on_every_device(tree_k):
    for name, x in jax.device_get(tree_k).items():
        x = np.asarray(x)
        for d in range(1, x.shape[0]):
            np.testing.assert_array_equal(x[d], x[0], err_msg=f"{name} differs on device {d}")


# ----------------------------------------------------------------------------- the numbers


BATCH = 4
DECAY = 0.9


def folded_noise_scale(grad_steps):
    """The noise scale after the given (finite) steps' float64 estimates are folded into
    EMAs of decay DECAY, each bias-corrected."""
    ema_sq = ema_tr = 0.0
    for grads in grad_steps:
        ref = reference(flat(grads), BATCH)
        ema_sq = DECAY * ema_sq + (1 - DECAY) * ref["grad_sq_est"]
        ema_tr = DECAY * ema_tr + (1 - DECAY) * ref["trace_cov_est"]
    corr = 1 - DECAY ** len(grad_steps)
    return (ema_tr / corr) / (ema_sq / corr)


@functools.cache
def _pmapped_run(kwargs_items):
    """The audited steps under pmap, built once per set of cross_device arguments (so
    compiled once per argument shapes, not once per call)."""
    tx = gh.cross_device("data", per_device_batch=BATCH, noise_scale_decay=DECAY, **dict(kwargs_items))

    def run(grads_seq, params):
        def body(state, g):
            updates, state = tx.update(g, state, params)
            return state, (updates, gh.metrics(state))

        return jax.lax.scan(body, tx.init(params), grads_seq)[1]  # one step compiled, however many

    return jax.pmap(run, axis_name="data")


def pmap_run(grads_per_step, params_k=None, **kwargs):
    """``(updates, metrics)`` after each of the steps (each leaf ``[K, ...]``), from one
    state through all of them."""
    params_k = params_k if params_k is not None else jax.tree.map(lambda x: jnp.stack([x[0]] * K), grads_per_step[0])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs, axis=1), *grads_per_step)  # [K, steps, ...]
    outs = jax.device_get(_pmapped_run(tuple(sorted(kwargs.items())))(stacked, params_k))
    return [jax.tree.map(lambda x, t=t: x[:, t], outs) for t in range(len(grads_per_step))]


def test_every_step_and_audit_figures_match_float64_reference():
    steps = [random_grads(0), random_grads(1)]
    outs = pmap_run(steps)
    for t, (grads, (updates, m)) in enumerate(zip(steps, outs)):
        assert_identical_on_every_device(m)
        m = first_copy(m)
        g = flat(grads)
        ref = reference(g, BATCH)
        np.testing.assert_allclose(flat(updates)[0], g.mean(0), rtol=1e-5, atol=1e-6)
        for name in ("device_norms", "norm_cv", "norm_max_over_min", "agreement", "cosine_to_mean"):
            np.testing.assert_allclose(m[f"xdev/{name}"], ref[name], rtol=2e-4, atol=2e-5, err_msg=name)
        for name in ("grad_sq_est", "trace_cov_est"):
            np.testing.assert_allclose(m[f"xdev/{name}"], ref[name], rtol=2e-3, err_msg=name)
        np.testing.assert_allclose(m["xdev/noise_scale"], folded_noise_scale(steps[: t + 1]), rtol=2e-3)
        # The sketch estimates the pairwise cosines with error ~ 1/sqrt(1024) ~ 0.03.
        np.testing.assert_allclose(m["xdev/pairwise_cosine"], ref["pairwise_cosine"], atol=0.12)
        off = ~np.eye(K, dtype=bool)
        np.testing.assert_allclose(m["xdev/mean_pairwise_cosine"], ref["pairwise_cosine"][off].mean(), atol=0.05)
        assert bool(m["xdev/audited"])
        assert int(m["xdev/outlier_device"]) == -1
        assert not m["xdev/duplicate_pairs"].any() and not m["xdev/param_desync"].any()


def test_without_batch_size_noise_scale_is_nan_and_k_mismatch_is_caught():
    grads = random_grads(2)
    tx = gh.cross_device("data")
    state = jax.pmap(tx.init, axis_name="data")(grads)
    _, state = jax.pmap(tx.update, axis_name="data")(grads, state)
    m = first_copy(gh.metrics(state))
    assert np.isnan(m["xdev/noise_scale"]) and np.isnan(m["xdev/trace_cov_est"])
    np.testing.assert_allclose(m["xdev/grad_sq_est"], reference(flat(grads), 1)["grad_sq_est"], rtol=2e-3)
    # nothing is folded into the noise-scale EMAs
    assert (int(state.xdev_num_noise_steps[0]), float(state.xdev_grad_sq_ema[0])) == (0, 0.0)
    wrong = gh.cross_device("data", num_devices=4)
    with pytest.raises(ValueError) as raised:
        jax.pmap(wrong.update, axis_name="data")(grads, jax.tree.map(lambda x: jnp.stack([x] * K), wrong.init(None)))
    assert str(raised.value) == (
        "cross_device state was initialised for K=4 devices but axis 'data' has 8: pass num_devices=8 to "
        "gh.cross_device, or call init inside the mapped function."
    )


def test_complex_gradients_are_audited_as_the_real_vectors_of_their_parts():
    """A complex leaf is the real vector (Re, Im): norms, cosines and agreement use the real
    inner product Re <g, h>, the imaginary parts included."""
    rng = np.random.default_rng(11)
    shared = rng.normal(size=30) + 1j * rng.normal(size=30)
    z = np.stack([2 * shared + rng.normal(size=30) + 1j * rng.normal(size=30) for _ in range(K)])
    r = rng.normal(size=(K, 7))
    grads = {"r": jnp.asarray(r, jnp.float32), "z": jnp.asarray(z, jnp.complex64)}
    (updates, m), *_ = pmap_run([grads])
    m = first_copy(m)
    g = np.concatenate([r, z.real, z.imag], axis=1)
    ref = reference(g, BATCH)
    for name in ("device_norms", "norm_cv", "agreement", "cosine_to_mean"):
        np.testing.assert_allclose(m[f"xdev/{name}"], ref[name], rtol=2e-4, atol=2e-5, err_msg=name)
    np.testing.assert_allclose(m["xdev/pairwise_cosine"], ref["pairwise_cosine"], atol=0.12)
    np.testing.assert_allclose(np.asarray(updates["z"])[0], z.mean(0), rtol=1e-5)
    assert updates["z"].dtype == jnp.complex64


def test_each_float_leaf_is_averaged_in_its_dtype_and_integer_leaves_pass_through():
    rng = np.random.default_rng(12)
    f, h = rng.normal(size=(K, 5)), rng.normal(size=(K, 4))
    grads = {
        "f": jnp.asarray(f, jnp.float32),
        "h": jnp.asarray(h, jnp.bfloat16),
        "i": jnp.arange(K * 3, dtype=jnp.int32).reshape(K, 3),
    }
    (updates, m), *_ = pmap_run([grads])
    m = first_copy(m)
    assert {k: v.dtype for k, v in updates.items()} == {"f": jnp.float32, "h": jnp.bfloat16, "i": jnp.int32}
    h_given = np.asarray(grads["h"].astype(jnp.float32), np.float64)  # the bf16 values the devices hold
    for d in range(K):
        np.testing.assert_allclose(np.asarray(updates["f"][d]), f.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(updates["h"][d], np.float64), h_given.mean(0), rtol=1e-2, atol=1e-2)
        np.testing.assert_array_equal(np.asarray(updates["i"][d]), np.arange(3 * d, 3 * d + 3))  # its own
    np.testing.assert_allclose(
        m["xdev/device_norms"], np.sqrt((f.astype(np.float32) ** 2).sum(1) + (h_given**2).sum(1)), rtol=1e-5
    )


@pytest.mark.parametrize("x64", [False, True], ids=["x32", "x64"])
@pytest.mark.parametrize("batch", [None, 4])
def test_the_state_before_the_first_update_flags_nothing_and_estimates_nothing(batch, x64):
    """The initial values CrossDeviceState documents, with each field's dtype and shape:
    float32 and int32 also when jax_enable_x64 makes float64 and int64 the defaults."""
    with jax.enable_x64(x64):
        state = gh.cross_device("data", per_device_batch=batch, num_devices=3).init(None)
    k, f32, i32, b = 3, np.float32, np.int32, np.bool_
    nan = float("nan")
    expected = {
        "xdev_num_steps": (0, i32),
        "xdev_num_audits": (0, i32),
        "xdev_device_norms": (np.zeros(k), f32),
        "xdev_norm_cv": (0.0, f32),
        "xdev_norm_max_over_min": (1.0, f32),
        "xdev_agreement": (0.0, f32),
        "xdev_grad_sq_est": (0.0, f32),
        "xdev_trace_cov_est": (nan if batch is None else 0.0, f32),
        "xdev_grad_sq_ema": (0.0, f32),
        "xdev_trace_cov_ema": (0.0, f32),
        "xdev_num_noise_steps": (0, i32),
        "xdev_noise_scale": (nan, f32),
        "xdev_audited": (False, b),
        "xdev_cosine_to_mean": (np.zeros(k), f32),
        "xdev_pairwise_cosine": (np.eye(k), f32),
        "xdev_mean_pairwise_cosine": (0.0, f32),
        "xdev_outlier_device": (-1, i32),
        "xdev_outlier_score": (0.0, f32),
        "xdev_duplicate_pairs": (np.zeros((k, k), bool), b),
        "xdev_param_desync": (np.zeros(k, bool), b),
        "xdev_outlier_devices": (np.zeros(k, bool), b),
        "xdev_norm_score": (np.zeros(k), f32),
        "xdev_direction_score": (np.zeros(k), f32),
        "xdev_outlier_evidence": (np.zeros(k), f32),
        "xdev_near_duplicate_pairs": (np.zeros((k, k), bool), b),
        "xdev_pair_evidence": (np.zeros((k, k)), f32),
        "xdev_num_detector_audits": (0, i32),
        "xdev_norm_spread_ema": (0.0, f32),
        "xdev_cosine_spread_ema": (0.0, f32),
    }
    assert list(expected) == list(gh.CrossDeviceState._fields)
    for name, (value, dtype) in expected.items():
        got = np.asarray(getattr(state, name))
        assert got.dtype == dtype, name
        np.testing.assert_array_equal(got, np.asarray(value, dtype), err_msg=name)


def test_a_nonfinite_step_leaves_the_noise_scale_emas_alone():
    steps = [random_grads(0), random_grads(1), random_grads(2)]
    steps[1]["a"] = steps[1]["a"].at[6, 0, 0].set(jnp.inf)
    states = [first_copy(m) for _, m in pmap_run(steps)]  # the metrics after each step
    assert not np.isfinite(states[1]["xdev/grad_sq_est"])
    # after the bad step: still the first step's smoothed value (count 1)
    np.testing.assert_allclose(states[1]["xdev/noise_scale"], folded_noise_scale(steps[:1]), rtol=2e-3)
    np.testing.assert_allclose(states[2]["xdev/noise_scale"], folded_noise_scale(steps[::2]), rtol=2e-3)


def test_a_step_whose_estimate_overflows_leaves_the_noise_scale_emas_alone():
    """Every device's norm ~2e19 (finite, measured), and |G|^2 ~4e38 is beyond float32: that
    step's estimate is Inf, and it is not folded into the EMAs; the next step's is. (Norms
    of 1e19, whose squares sum beyond float32 over 8 devices while |G|^2 ~1e38 does not,
    give finite estimates: test_tiny_or_huge_gradients_give_the_float64_figures.)"""
    base = random_grads(0)
    scale = 2e19 / np.linalg.norm(flat(base)[0])  # device d's copy of base[0]: norm 2e19 * (1 + 0.01 d)
    huge = {
        n: jnp.asarray(
            np.stack([np.asarray(x[0], np.float64) * (1 + 0.01 * d) for d in range(K)]) * scale,
            jnp.float32,
        )
        for n, x in base.items()
    }
    steps = [random_grads(1), huge, random_grads(2)]
    states = [first_copy(m) for _, m in pmap_run(steps)]
    assert reference(flat(huge), BATCH)["grad_sq_est"] > np.finfo(np.float32).max
    assert np.isfinite(states[1]["xdev/device_norms"]).all() and not np.isfinite(states[1]["xdev/grad_sq_est"])
    np.testing.assert_allclose(states[1]["xdev/noise_scale"], folded_noise_scale(steps[:1]), rtol=2e-3)
    np.testing.assert_allclose(states[2]["xdev/noise_scale"], folded_noise_scale(steps[::2]), rtol=2e-3)


@pytest.mark.parametrize("factor", [1e21, 1e-24], ids=["overflowing-squares", "underflowing-squares"])
def test_a_finite_device_norm_outside_the_range_of_its_square_is_measured(factor):
    """Device 3's gradient times 1e21 (its squares overflow float32) or 1e-24 (they
    underflow to 0): its norm is still measured (float64 reference), so the device is
    an outlier by its norm, not called non-finite or dead."""
    grads = random_grads(7)
    grads = {n: x.at[3].multiply(factor) for n, x in grads.items()}
    (_, m), *_ = pmap_run([grads])
    m = first_copy(m)
    np.testing.assert_allclose(m["xdev/device_norms"], reference(flat(grads), BATCH)["device_norms"], rtol=1e-5)
    assert int(m["xdev/outlier_device"]) == 3 and np.isfinite(m["xdev/outlier_score"])
    kinds = {alarm.kind for alarm in gh.cross_device_alarms(m)}
    assert "outlier_norm" in kinds and not kinds & {"nonfinite_device", "dead_device"}, kinds


def test_under_x64_the_state_stays_float32_and_the_figures_match():
    """jax_enable_x64 on: every state field keeps its init dtype through audited and
    unaudited updates, and the figures are the float64 reference's."""
    steps = [random_grads(28), random_grads(29)]
    with jax.enable_x64(True):
        tx = gh.cross_device("data", per_device_batch=BATCH, audit_first_steps=1, audit_every=None)

        def run(seq):
            state = tx.init(None)
            init_dtypes = jax.tree.map(lambda x: x.dtype, state)
            for g in seq:
                _, state = tx.update(g, state)
            assert jax.tree.map(lambda x: x.dtype, state) == init_dtypes
            return gh.metrics(state), state.xdev_num_audits

        m, audits = jax.pmap(run, axis_name="data")(steps)
    m = first_copy(m)
    assert int(first_copy(audits)) == 1
    assert m["xdev/device_norms"].dtype == np.float32 and m["xdev/cosine_to_mean"].dtype == np.float32
    ref = reference(flat(steps[1]), BATCH)
    np.testing.assert_allclose(m["xdev/device_norms"], ref["device_norms"], rtol=1e-5)
    np.testing.assert_allclose(m["xdev/agreement"], ref["agreement"], rtol=2e-4, atol=2e-5)


def test_nonfinite_device_is_the_outlier_and_the_guard_skips_everywhere():
    grads = random_grads(3)
    grads["a"] = grads["a"].at[6, 0, 0].set(jnp.nan)
    tx = optax.chain(gh.cross_device("data"), gh.guard(optax.sgd(0.1)))
    params = jax.tree.map(lambda x: jnp.zeros_like(x), grads)

    def step(g, p):
        updates, state = tx.update(g, tx.init(p), p)
        return updates, gh.metrics(state)

    updates, m = jax.pmap(step, axis_name="data")(grads, params)
    assert_identical_on_every_device(m)
    m = first_copy(m)
    assert int(m["xdev/outlier_device"]) == 6 and np.isinf(m["xdev/outlier_score"])
    assert bool(m["grad/skipped"])
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize(
    "inside",
    [
        lambda: optax.chain(gh.cross_device("data"), optax.sgd(0.1)),
        lambda: optax.MultiSteps(optax.chain(gh.cross_device("data"), optax.sgd(0.1)), 2),
    ],
    ids=["chain", "multisteps"],
)
def test_the_guard_refuses_cross_device_inside_it(inside):
    """Inside the guard, each device's guard would judge its LOCAL gradient: devices
    would skip different steps and the replicas drift apart (under shard_map: a
    JAX-internal trace error). The guard's init refuses it, naming the order to use."""
    tx = gh.guard(inside())
    with pytest.raises(
        ValueError,
        match=r"gh\.cross_device must come before gh\.guard.*optax\.chain\(gh\.cross_device\(\.\.\.\), "
        r"gh\.guard\(\.\.\.\)\).*local gradient",
    ):
        tx.init({"w": jnp.zeros(3)})


def test_accumulate_around_cross_device_and_guard_still_applies_the_global_mean():
    """gh.accumulate(chain(gh.cross_device, gh.guard(sgd)), k) under pmap (the audit
    outside the guard, so not refused): one update on the k-th micro-step, -lr times the
    mean over devices and micro-batches (float64 reference), the same on every device."""
    k, lr = 3, 0.5
    tx = gh.accumulate(optax.chain(gh.cross_device("data"), gh.guard(optax.sgd(lr), clip=None)), k)
    grads = np.random.default_rng(5).normal(size=(k, K, 6)).astype(np.float32)
    # The parameters placed as the step returns them (over the "data" axis): one compile.
    params, state = jax.pmap(lambda p: (p, tx.init(p)), axis_name="data")({"w": jnp.zeros((K, 6), jnp.float32)})

    def micro_step(g, s, p):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    step = jax.pmap(micro_step, axis_name="data")
    for i in range(k):
        params, state = step({"w": jnp.asarray(grads[i])}, state, params)
    expected = -lr * grads.astype(np.float64).mean(axis=(0, 1))
    np.testing.assert_allclose(np.asarray(params["w"]), np.stack([expected] * K), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_a_nonfinite_device_leaves_the_dispersion_and_agreement_unknown_not_zero(bad):
    """One device's NaN (or Inf) makes the mean, so every cosine, the dispersion and the
    agreement unknown: recorded as NaN, never as a finite 0 that the diagnosis would
    read as the devices ceasing to agree."""
    grads = random_grads(3)
    grads["a"] = grads["a"].at[6, 0, 0].set(bad)
    (_, m), *_ = pmap_run([grads])
    m = first_copy(m)
    for name in ("xdev/agreement", "xdev/norm_cv", "xdev/cosine_to_mean"):
        assert np.all(np.isnan(m[name])), (name, m[name])
    assert int(m["xdev/outlier_device"]) == 6
    # A clean history, then that step: the diagnosis names the device, not a drop of
    # agreement.
    clean = [first_copy(pmap_run([random_grads(20 + t)])[0][1]) for t in range(12)]
    kinds = {f.pattern for f in gh.diagnose([{"step": t, **r} for t, r in enumerate([*clean, m])])}
    assert "outlier_device" in kinds and "agreement_drop" not in kinds, kinds


def test_one_device_records_what_one_gradient_can_tell():
    """K = 1: the mean is the gradient, the dispersion is nil, the one device agrees with
    itself, |G|^2 is its squared norm and the covariance (so the noise scale) is unknown."""
    grads = random_grads(0, k=1)
    tx = gh.cross_device("data", per_device_batch=BATCH)

    def run(g):
        state = tx.init(g)
        updates, state = tx.update(g, state, g)
        return updates, gh.metrics(state), (state.xdev_num_noise_steps, state.xdev_grad_sq_ema)

    updates, m, folded = jax.pmap(run, axis_name="data")(grads)
    m = first_copy(m)
    assert first_copy(folded) == (0, 0.0)  # no covariance estimate: nothing folded into the EMAs
    g = flat(grads)[0]
    np.testing.assert_array_equal(flat(updates)[0], g)
    np.testing.assert_allclose(m["xdev/device_norms"], [np.linalg.norm(g)], rtol=1e-6)
    np.testing.assert_allclose(m["xdev/grad_sq_est"], g @ g, rtol=1e-5)
    assert np.isnan(m["xdev/trace_cov_est"]) and np.isnan(m["xdev/noise_scale"])
    assert (m["xdev/norm_cv"], m["xdev/norm_max_over_min"], m["xdev/agreement"]) == (0.0, 1.0, 1.0)
    assert m["xdev/pairwise_cosine"].tolist() == [[1.0]] and m["xdev/mean_pairwise_cosine"] == 0.0
    np.testing.assert_allclose(m["xdev/cosine_to_mean"], [1.0], rtol=1e-6)
    assert m["xdev/outlier_device"] == -1 and not m["xdev/outlier_devices"].any()
    assert not m["xdev/duplicate_pairs"].any() and not m["xdev/param_desync"].any()


def test_identical_gradients_are_duplicates_but_two_zero_gradients_are_not():
    grads = random_grads(6)
    grads = jax.tree.map(lambda x: x.at[4].set(x[1]).at[2].set(0.0).at[5].set(0.0), grads)
    (_, m), *_ = pmap_run([grads])
    m = first_copy(m)
    assert np.argwhere(m["xdev/duplicate_pairs"]).tolist() == [[1, 4], [4, 1]]
    # A zero gradient has cosine 0 to the mean and to every other device.
    assert m["xdev/cosine_to_mean"][[2, 5]].tolist() == [0.0, 0.0]
    off = ~np.eye(K, dtype=bool)
    assert not m["xdev/pairwise_cosine"][[2, 5]][off[[2, 5]]].any()
    assert m["xdev/pairwise_cosine"][2, 2] == 1.0


def test_equal_norms_are_not_enough_for_a_duplicate():
    """Device 4 holds device 1's gradient negated: the same sum of squares, bit for bit,
    and a different gradient (its fingerprint differs): not a duplicate pair."""
    grads = random_grads(19)
    grads = jax.tree.map(lambda x: x.at[4].set(-x[1]), grads)
    (_, m), *_ = pmap_run([grads])
    m = first_copy(m)
    assert m["xdev/device_norms"][4] == m["xdev/device_norms"][1]
    assert not m["xdev/duplicate_pairs"].any()


def test_a_gradient_tree_without_float_leaves_is_passed_through_with_zero_figures():
    """Only integer leaves (a step counter): nothing to average or audit, and no error,
    with the smallest sketch too."""
    ints = {"count": jnp.arange(K, dtype=jnp.int32) * 3}
    for dim in (2, 16):
        tx = gh.cross_device("data", sketch_dim=dim)

        def run(g, tx=tx):
            updates, state = tx.update(g, tx.init(g))
            return updates, gh.metrics(state)

        updates, m = jax.pmap(run, axis_name="data")(ints)
        np.testing.assert_array_equal(np.asarray(updates["count"]), np.arange(K) * 3)
        m = first_copy(m)
        assert not m["xdev/device_norms"].any() and not m["xdev/cosine_to_mean"].any(), dim
        assert not m["xdev/duplicate_pairs"].any() and not m["xdev/param_desync"].any(), dim
        assert (m["xdev/norm_cv"], m["xdev/agreement"], m["xdev/mean_pairwise_cosine"]) == (0.0, 0.0, 0.0), dim


def test_small_identical_gradients_are_duplicates():
    """Norms ~0.05 (squared norms below 1): devices 2 and 6 hold the same gradient."""
    grads = jax.tree.map(lambda x: 1e-3 * x.at[6].set(x[2]), random_grads(20))
    (_, m), *_ = pmap_run([grads])
    m = first_copy(m)
    assert m["xdev/device_norms"].max() < 0.2
    assert np.argwhere(m["xdev/duplicate_pairs"]).tolist() == [[2, 6], [6, 2]]


@pytest.mark.parametrize("dim", [2, 1024])
def test_two_leaves_swapped_between_devices_are_not_a_duplicate(dim):
    """Device 3 holds device 0's two same-shape leaves exchanged: the same numbers, in
    other leaves (each leaf hashes with its own salt, whatever the sketch's size)."""
    rng = np.random.default_rng(24)
    grads = {n: jnp.asarray(rng.normal(size=(K, 5, 4)), jnp.float32) for n in ("p", "q")}
    grads["p"], grads["q"] = grads["p"].at[3].set(grads["q"][0]), grads["q"].at[3].set(grads["p"][0])
    (_, m), *_ = pmap_run([grads], sketch_dim=dim)
    m = first_copy(m)
    assert not m["xdev/duplicate_pairs"].any()


def test_a_sketch_as_wide_as_the_gradient_gives_the_exact_pairwise_cosines():
    """One leaf of 24 elements in 24 buckets: each bucket holds one element (with a sign),
    so the sketch keeps inner products exactly."""
    g = np.random.default_rng(25).normal(size=(K, 24))
    (_, m), *_ = pmap_run([{"w": jnp.asarray(g, jnp.float32)}], sketch_dim=24)
    unit = g / np.linalg.norm(g, axis=1, keepdims=True)
    np.testing.assert_allclose(first_copy(m)["xdev/pairwise_cosine"], unit @ unit.T, atol=2e-6)


def test_a_desynchronised_first_device_is_the_one_named():
    """The majority's parameters are the reference: device 0 out of sync names device 0."""
    grads = random_grads(26)
    params_k = jax.tree.map(lambda x: jnp.stack([x[0]] * K), random_grads(27))
    params_k["b"] = params_k["b"].at[0, 3].add(1e-3)
    (_, m), *_ = pmap_run([grads], params_k)
    assert np.flatnonzero(first_copy(m)["xdev/param_desync"]).tolist() == [0]


def test_all_zero_gradients_have_no_dispersion_and_no_agreement():
    grads = jax.tree.map(jnp.zeros_like, random_grads(6))
    (_, m), *_ = pmap_run([grads])
    m = first_copy(m)
    assert (m["xdev/norm_cv"], m["xdev/agreement"], m["xdev/mean_pairwise_cosine"]) == (0.0, 0.0, 0.0)
    assert not m["xdev/cosine_to_mean"].any() and not m["xdev/duplicate_pairs"].any()


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_the_scale_free_figures_do_not_depend_on_the_gradients_scale(scale):
    """Cosines, dispersion and agreement are the same for gradients of norm ~0.05 or ~5e4
    (the float64 reference of the unscaled gradients)."""
    grads = random_grads(14)
    small = jax.tree.map(lambda x: x * scale, grads)
    (_, m), *_ = pmap_run([small])
    m = first_copy(m)
    ref = reference(flat(grads), BATCH)
    for name in ("norm_cv", "norm_max_over_min", "agreement", "cosine_to_mean"):
        np.testing.assert_allclose(m[f"xdev/{name}"], ref[name], rtol=2e-4, atol=2e-5, err_msg=name)
    np.testing.assert_allclose(m["xdev/device_norms"], scale * ref["device_norms"], rtol=1e-5)
    np.testing.assert_allclose(m["xdev/pairwise_cosine"], ref["pairwise_cosine"], atol=0.12)


F32_MAX = float(np.finfo(np.float32).max)


@pytest.mark.parametrize("scale", [1e-20, 1e17, 1e18])
def test_tiny_or_huge_gradients_give_the_float64_figures(scale):
    """Elements ~1e-20 (squares below float32's normal range), ~1e17 (the devices' squared
    norms sum beyond float32) or ~1e18 (every square sum and dot product overflows), with
    device 2 sign-flipped: the float64 figures of the same gradients, device 2 named as a
    direction outlier. The estimates are Inf only where their float64 value is beyond
    float32 (1e18), and that step is then not folded into the noise scale."""
    grads = jax.tree.map(lambda x: x.at[2].multiply(-1.0) * scale, random_grads(14))
    (_, m), *_ = pmap_run([grads])
    m = first_copy(m)
    ref = reference(flat(grads), BATCH)
    np.testing.assert_allclose(m["xdev/device_norms"], ref["device_norms"], rtol=1e-5)
    for name in ("norm_cv", "agreement", "cosine_to_mean"):
        np.testing.assert_allclose(m[f"xdev/{name}"], ref[name], rtol=2e-4, atol=2e-5, err_msg=name)
    np.testing.assert_allclose(m["xdev/pairwise_cosine"], ref["pairwise_cosine"], atol=0.12)
    fits = True
    for name in ("grad_sq_est", "trace_cov_est"):
        if abs(ref[name]) > F32_MAX:
            fits = False
            assert m[f"xdev/{name}"] == np.sign(ref[name]) * np.inf, name
        else:
            np.testing.assert_allclose(m[f"xdev/{name}"], ref[name], rtol=2e-3, err_msg=name)
    if fits:
        np.testing.assert_allclose(m["xdev/noise_scale"], folded_noise_scale([grads]), rtol=2e-3)
    else:
        assert np.isnan(m["xdev/noise_scale"])
    assert np.flatnonzero(m["xdev/outlier_devices"]).tolist() == [2]
    assert [(a.kind, a.devices) for a in gh.cross_device_alarms(m)] == [("outlier_direction", (2,))]


def test_fp16_gradients_whose_sum_passes_the_fp16_range_average_to_their_mean():
    """Elements ~9000 on each of 8 devices: the sum (~72000) is beyond fp16's 65504, the
    mean is not. The mean comes back in fp16, equal to the float64 mean of the values."""
    g = np.full((K, 6), 9000.0) + np.random.default_rng(30).normal(size=(K, 6))
    grads = {"w": jnp.asarray(g, jnp.float16)}
    (updates, m), *_ = pmap_run([grads])
    given = np.asarray(grads["w"].astype(jnp.float32), np.float64)  # the fp16 values the devices hold
    assert updates["w"].dtype == jnp.float16
    for d in range(K):
        np.testing.assert_allclose(np.asarray(updates["w"][d], np.float64), given.mean(0), rtol=1e-3)
    m = first_copy(m)
    np.testing.assert_allclose(m["xdev/agreement"], reference(given, BATCH)["agreement"], rtol=1e-4)


@pytest.mark.parametrize(
    ("fault", "kind"),
    [("zero", "dead_device"), ("nan", "nonfinite_device"), ("both zero", None), ("x1000", None), (None, None)],
)
def test_with_two_devices_a_dead_or_nonfinite_device_is_named(fault, kind):
    """K = 2: device 1's gradient all zero (the other's is not) or NaN is named; the robust
    norm and direction scores need K >= 3, so a x1000 norm is not (docs/distributed.md)."""
    grads = random_grads(3, k=2)
    if fault == "zero":
        grads = jax.tree.map(lambda x: x.at[1].set(0.0), grads)
    elif fault == "both zero":
        grads = jax.tree.map(jnp.zeros_like, grads)
    elif fault == "nan":
        grads["a"] = grads["a"].at[1, 0, 0].set(jnp.nan)
    elif fault == "x1000":
        grads = jax.tree.map(lambda x: x.at[1].multiply(1000.0), grads)
    params_k = jax.tree.map(lambda x: jnp.stack([x[0]] * 2), random_grads(4, k=2))
    (_, m), *_ = pmap_run([grads], params_k)
    m = first_copy(m)
    alarms = [(a.kind, a.devices) for a in gh.cross_device_alarms(m)]
    assert alarms == ([] if kind is None else [(kind, (1,))])


@pytest.mark.parametrize(
    ("k", "corrupted", "flagged"),
    [(2, [0], [0, 1]), (4, [0, 1], [0, 1, 2, 3]), (4, [0, 1, 2], [0, 1, 2, 3]), (3, [0], [0]), (4, [2], [2])],
)
def test_param_desync_names_devices_outside_a_strict_majority_or_every_device_without_one(k, corrupted, flagged):
    """Replicas 'corrupted' hold other parameters (each its own). A group of more than K/2
    equal replicas is the reference; without one nothing tells the healthy replicas
    apart, every device is flagged and the alarm says there is no majority."""
    grads = random_grads(1, k=k)
    params_k = jax.tree.map(lambda x: jnp.stack([x[0]] * k), random_grads(2, k=k))
    for d in corrupted:
        params_k["b"] = params_k["b"].at[d, 0].add(1.0 + d)
    (_, m), *_ = pmap_run([grads], params_k)
    m = first_copy(m)
    assert np.flatnonzero(m["xdev/param_desync"]).tolist() == flagged
    alarms = [a for a in gh.cross_device_alarms(m) if a.kind == "param_desync"]
    if len(flagged) == k:
        assert [(str(a), a.devices) for a in alarms] == [
            (
                f"parameter replicas disagree with no majority (all {k} devices; desync or corruption)",
                tuple(range(k)),
            )
        ]
    else:
        assert [a.devices for a in alarms] == [(d,) for d in flagged]


def test_an_integer_parameter_leaf_out_of_sync_is_a_desync():
    """An int32 table that differs on device 6 (the float leaves agree) names device 6."""
    grads = {"w": jnp.asarray(np.random.default_rng(31).normal(size=(K, 5)), jnp.float32)}
    table = np.zeros((K, 5), np.int32)
    table[6, 2] = 7
    params_k = {"w": jnp.zeros((K, 5)), "table": jnp.asarray(table), "flag": jnp.zeros((K, 2), bool)}
    (_, m), *_ = pmap_run([grads], params_k)
    assert np.flatnonzero(first_copy(m)["xdev/param_desync"]).tolist() == [6]
    params_k["flag"] = params_k["flag"].at[3, 1].set(True)  # and a bool leaf on device 3
    params_k["table"] = jnp.zeros((K, 5), jnp.int32)
    (_, m), *_ = pmap_run([grads], params_k)
    assert np.flatnonzero(first_copy(m)["xdev/param_desync"]).tolist() == [3]


def test_init_outside_the_mapped_function_reads_k_from_the_mesh_or_num_devices():
    def k_of(tx):
        return tx.init(None).xdev_device_norms.shape[0]

    assert k_of(gh.cross_device("data")) == jax.device_count() == K  # no mesh: every device
    assert k_of(gh.cross_device("data", num_devices=3)) == 3
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        assert k_of(gh.cross_device("data", sharded_axes="model")) == 4
        assert k_of(gh.cross_device(("data", "model"))) == 8
        assert k_of(gh.cross_device("data", num_devices=5)) == 5  # the argument wins
    only_data = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:4])
    with jax.set_mesh(only_data):  # the data axes are all of the mesh
        assert k_of(gh.cross_device("data")) == 4
    with pytest.raises(ValueError) as raised:
        gh.cross_device("data", sharded_axes="model").init(None)
    assert str(raised.value) == (
        "cross_device cannot tell the number of data-parallel devices K outside the mapped function when "
        "sharded_axes=('model',): pass num_devices=K, or call init inside jax.shard_map / under "
        "`with jax.set_mesh(mesh)`."
    )


def test_init_inside_the_mapped_function_reads_k_from_its_axis():
    """pmap over 4 of the 8 devices, and vmap over 3: K is the axis size, not the device
    count."""
    tx = gh.cross_device("data")
    grads = random_grads(21, k=4)

    def run(g):
        state = tx.init(g)
        return tx.update(g, state)[1].xdev_device_norms

    norms = jax.pmap(run, axis_name="data", devices=jax.devices()[:4])(grads)
    np.testing.assert_allclose(np.asarray(norms)[0], reference(flat(grads), BATCH)["device_norms"], rtol=1e-5)
    # jax.vmap with an axis name (no mesh, no devices): K is its size, 3
    grads = random_grads(22, k=3)
    norms = jax.vmap(run, axis_name="data")(grads)
    np.testing.assert_allclose(np.asarray(norms)[0], reference(flat(grads), BATCH)["device_norms"], rtol=1e-5)


def shard_map_run(grads, params_k, mesh, grad_specs, param_specs, check_vma=True, **kwargs):
    tx = gh.cross_device("data", per_device_batch=BATCH, noise_scale_decay=DECAY, **kwargs)

    def run(g, p):
        squeeze = lambda t: jax.tree.map(lambda x: x[0], t)
        g, p = squeeze(g), squeeze(p)
        state = tx.init(p)
        updates, state = tx.update(g, state, p)
        return updates, gh.metrics(state)

    out_specs = (jax.tree.map(lambda s: P(*s[1:]), grad_specs, is_leaf=lambda s: isinstance(s, P)), P())
    f = jax.shard_map(run, mesh=mesh, in_specs=(grad_specs, param_specs), out_specs=out_specs, check_vma=check_vma)
    return jax.jit(f)(grads, params_k)


def test_shard_map_gives_the_pmap_numbers():
    grads = random_grads(4)
    params_k = jax.tree.map(lambda x: x[:, :1], random_grads(5))
    (_, m_pmap), *_ = pmap_run([grads], params_k)
    m_pmap = first_copy(m_pmap)
    mesh = jax.make_mesh((K,), ("data",), axis_types=(AxisType.Auto,))
    specs = {"a": P("data"), "b": P("data")}
    updates, m = shard_map_run(grads, params_k, mesh, specs, specs)
    m = jax.device_get(m)
    assert set(m) == set(m_pmap)
    for name in m:
        np.testing.assert_allclose(m[name], m_pmap[name], rtol=1e-6, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(
        flat(jax.tree.map(lambda x: x[None], updates))[0], flat(grads).mean(0), rtol=1e-5, atol=1e-6
    )


def test_two_data_axes_act_as_one_of_their_product():
    """axis_name=('replica', 'data') on a 2 x 4 mesh: the same figures as one axis of 8."""
    grads = random_grads(11)
    params_k = jax.tree.map(lambda x: jnp.stack([x[0]] * K), random_grads(12))
    mesh = jax.make_mesh((2, 4), ("replica", "data"), axis_types=(AxisType.Auto,) * 2)
    specs = {"a": P(("replica", "data")), "b": P(("replica", "data"))}
    tx = gh.cross_device(("replica", "data"), per_device_batch=BATCH)

    def run(g, p):
        g, p = jax.tree.map(lambda x: x[0], (g, p))
        updates, state = tx.update(g, tx.init(p), p)
        return jax.tree.map(lambda u: u[None], updates), gh.metrics(state)

    f = jax.shard_map(run, mesh=mesh, in_specs=(specs, specs), out_specs=(specs, P()))
    _, m = jax.device_get(jax.jit(f)(grads, params_k))
    ref = reference(flat(grads), BATCH)
    for name in ("device_norms", "agreement", "cosine_to_mean"):
        np.testing.assert_allclose(m[f"xdev/{name}"], ref[name], rtol=2e-4, atol=2e-5, err_msg=name)
    np.testing.assert_allclose(m["xdev/trace_cov_est"], ref["trace_cov_est"], rtol=2e-3)
    # Gradients already summed over both axes are caught on the pair of axes too.
    summed = jax.shard_map(
        lambda g, p: run(jax.tree.map(lambda x: jax.lax.psum(x, ("replica", "data")), g), p),
        mesh=mesh,
        in_specs=(specs, specs),
        out_specs=(specs, P()),
    )
    with pytest.raises(ValueError, match=r"^Gradient leaf 'a' does not vary over \('replica', 'data'\): "):
        jax.jit(summed)(grads, params_k)


def test_two_dimensional_mesh_with_sharded_parameters_equals_unsharded_reference():
    """data (4) x model (2): 'a' is split over 'model', 'b' is replicated over it."""
    k = 4
    grads = random_grads(6, k=k)
    params_k = jax.tree.map(lambda x: x * 0.5, random_grads(7, k=k))
    params_k = jax.tree.map(lambda x: jnp.stack([x[0]] * k), params_k)
    params_k["a"] = params_k["a"].at[2, 5, 33].add(1e-3)  # device 2 of the data axis is out of sync
    grads["b"] = grads["b"].at[3].set(grads["b"][1])
    grads["a"] = grads["a"].at[3].set(grads["a"][1])  # devices 1 and 3: identical gradients
    mesh = jax.make_mesh((k, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    specs = {"a": P("data", None, "model"), "b": P("data")}
    updates, m = shard_map_run(grads, params_k, mesh, specs, specs, sharded_axes="model")
    m = jax.device_get(m)
    ref = reference(flat(grads), BATCH)
    for name in ("device_norms", "norm_cv", "norm_max_over_min", "agreement", "cosine_to_mean"):
        np.testing.assert_allclose(m[f"xdev/{name}"], ref[name], rtol=2e-4, atol=2e-5, err_msg=name)
    for name in ("grad_sq_est", "trace_cov_est"):
        np.testing.assert_allclose(m[f"xdev/{name}"], ref[name], rtol=2e-3, err_msg=name)
    np.testing.assert_allclose(m["xdev/pairwise_cosine"], ref["pairwise_cosine"], atol=0.12)
    assert np.argwhere(np.triu(m["xdev/duplicate_pairs"])).tolist() == [[1, 3]]
    assert np.flatnonzero(m["xdev/param_desync"]).tolist() == [2]
    np.testing.assert_allclose(np.asarray(updates["a"]), np.asarray(grads["a"]).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(updates["b"]), np.asarray(grads["b"]).mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("check_vma", [True, False], ids=["tracked", "untracked"])
def test_every_leaf_split_over_the_model_axis_gives_the_unsharded_numbers(check_vma):
    """Untracked (check_vma=False) every leaf is taken as split over sharded_axes: right
    when each is, as here; tracked, each leaf's type says so."""
    k = 4
    rng = np.random.default_rng(13)
    shared = {"a": rng.normal(size=(6, 8)), "b": rng.normal(size=(10,))}
    grads = {
        n: jnp.asarray(np.stack([x + rng.normal(size=x.shape) for _ in range(k)]), jnp.float32)
        for n, x in shared.items()
    }
    grads["a"] = grads["a"].at[3].set(grads["a"][0])
    grads["b"] = grads["b"].at[3].set(grads["b"][0])  # devices 0 and 3: identical gradients
    params_k = jax.tree.map(lambda x: jnp.stack([x[0]] * k), grads)
    params_k["b"] = params_k["b"].at[1, 7].add(1e-3)  # device 1 out of sync, in the second half of 'b'
    mesh = jax.make_mesh((k, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    specs = {"a": P("data", None, "model"), "b": P("data", "model")}
    updates, m = shard_map_run(grads, params_k, mesh, specs, specs, check_vma=check_vma, sharded_axes="model")
    m = jax.device_get(m)
    ref = reference(flat(grads), BATCH)
    for name in ("device_norms", "agreement", "cosine_to_mean", "grad_sq_est", "trace_cov_est"):
        np.testing.assert_allclose(m[f"xdev/{name}"], ref[name], rtol=2e-3, atol=2e-5, err_msg=name)
    np.testing.assert_allclose(m["xdev/pairwise_cosine"], ref["pairwise_cosine"], atol=0.12)
    assert np.argwhere(np.triu(m["xdev/duplicate_pairs"])).tolist() == [[0, 3]]
    assert np.flatnonzero(m["xdev/param_desync"]).tolist() == [1]
    np.testing.assert_allclose(np.asarray(updates["b"]), np.asarray(grads["b"]).mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("split", ["Gradient", "Parameter"])
def test_a_leaf_varying_over_an_axis_neither_data_nor_sharded_is_a_clear_error(split):
    """data (4) x model (2), leaf 'a' split over 'model' and sharded_axes not given: a
    ValueError that names the leaf, the axis and the fix (it was a TypeError from inside
    the audit's lax.cond)."""
    k = 4
    grads = random_grads(6, k=k)
    params_k = jax.tree.map(lambda x: jnp.stack([x[0]] * k), random_grads(7, k=k))
    mesh = jax.make_mesh((k, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    split_a = {"a": P("data", None, "model"), "b": P("data")}
    whole = {"a": P("data"), "b": P("data")}
    grad_specs, param_specs = (split_a, split_a) if split == "Gradient" else (whole, split_a)
    with pytest.raises(ValueError) as raised:
        shard_map_run(grads, params_k, mesh, grad_specs, param_specs)
    assert str(raised.value) == (
        f"{split} leaf 'a' varies over the mesh axis 'model', which is neither a data axis (axis_name='data') nor "
        "a sharded axis (sharded_axes=()): its norms, dot products and fingerprints would be partial and differ "
        "across 'model'. If the leaf is split over 'model' (tensor parallelism, FSDP), pass sharded_axes='model' "
        "to gh.cross_device; if the devices along 'model' see different data, add it to axis_name."
    )


def test_a_leaf_split_over_two_model_axes_is_summed_and_salted_over_both():
    """data (2) x m1 (2) x m2 (2), 'a' split over m1 and m2, sharded_axes=('m1', 'm2'):
    the unsharded numbers, and device 1's gradient (device 0's with its two m2 halves
    swapped: the same parts, elsewhere) is not a duplicate of device 0's."""
    k = 2
    grads = random_grads(23, k=k)
    # small integers: every partial sum of squares is exact, so the two norms are equal
    grads["a"] = jnp.round(grads["a"] * 2.0)
    a0 = grads["a"][0]
    grads["a"] = grads["a"].at[1].set(jnp.concatenate([a0[:, 20:], a0[:, :20]], axis=1))
    grads["b"] = grads["b"].at[1].set(grads["b"][0])
    params_k = jax.tree.map(lambda x: jnp.stack([x[0]] * k), grads)
    mesh = jax.make_mesh((k, 2, 2), ("data", "m1", "m2"), axis_types=(AxisType.Auto,) * 3)
    specs = {"a": P("data", "m1", "m2"), "b": P("data")}
    updates, m = shard_map_run(grads, params_k, mesh, specs, specs, sharded_axes=("m1", "m2"))
    m = jax.device_get(m)
    ref = reference(flat(grads), BATCH)
    for name in ("device_norms", "agreement", "cosine_to_mean"):
        np.testing.assert_allclose(m[f"xdev/{name}"], ref[name], rtol=2e-4, atol=2e-5, err_msg=name)
    # K = 2 with a batch size: the noise scale of one step is its two estimates' ratio
    np.testing.assert_allclose(m["xdev/noise_scale"], ref["trace_cov_est"] / ref["grad_sq_est"], rtol=2e-3)
    assert m["xdev/device_norms"][0] == m["xdev/device_norms"][1]
    assert not m["xdev/duplicate_pairs"].any()
    np.testing.assert_allclose(np.asarray(updates["a"]), np.asarray(grads["a"]).mean(0), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the shard_map trap


def test_shard_map_summed_gradients_raise_and_local_value_and_grad_fixes_them():
    mesh = jax.make_mesh((K,), ("data",), axis_types=(AxisType.Auto,))
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(K, 5, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3,)), jnp.float32)
    loss = lambda w, x: jnp.mean((x @ w - 1.0) ** 2)
    tx = gh.cross_device("data")

    def step(grad_fn):
        def body(w, x):
            g = grad_fn(w, x[0])
            updates, _ = tx.update({"w": g}, tx.init({"w": w}), {"w": w})
            return updates["w"]

        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("data")), out_specs=P()))

    with pytest.raises(ValueError) as raised:
        step(jax.grad(loss))(w, x)
    assert str(raised.value) == (
        "Gradient leaf 'w' does not vary over 'data': inside jax.shard_map, jax.grad w.r.t. replicated parameters "
        "returns the SUM over devices, not the local gradient. Compute it with gh.local_value_and_grad(loss_fn, "
        "'data') (or pcast the params to varying before jax.grad)."
    )
    got = step(lambda w, x: gh.local_value_and_grad(loss, "data")(w, x)[1])(w, x)
    xs, wn = np.asarray(x, np.float64), np.asarray(w, np.float64)
    local = np.stack([2 * xs[k].T @ (xs[k] @ wn - 1.0) / 5 for k in range(K)])
    np.testing.assert_allclose(got, local.mean(0), rtol=1e-5)


@pytest.mark.parametrize("argnums", ["a", 1.5, True, (), (0, "b")])
def test_local_grad_argnums_of_the_wrong_kind_raise_when_built(argnums):
    with pytest.raises(TypeError, match=r"`argnums` must be an int or a non-empty tuple of ints"):
        gh.local_value_and_grad(lambda w: jnp.sum(w), "data", argnums=argnums)


def test_local_grad_argnums_past_the_positional_arguments_say_so():
    """argnums=5 for a two-argument call raised a bare IndexError from inside the wrapper."""
    grad = jax.pmap(gh.local_grad(lambda w, x: jnp.sum(w * x), "data", argnums=5), axis_name="data")
    with pytest.raises(TypeError, match=r"`argnums` 5 names positional argument 5, but the function was called with 2"):
        grad(jnp.ones((1, 1)), jnp.ones((1, 1)))


def test_local_grad_gives_every_differentiated_argument_its_local_gradient_and_passes_aux_through():
    """Under shard_map, each of several replicated arguments (argnums) gets the device's own
    gradient, not the sum over devices; the default axis is 'data'; has_aux returns the
    auxiliary output beside the gradients, as jax.grad does."""
    mesh = jax.make_mesh((K,), ("data",), axis_types=(AxisType.Auto,))
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(K, 5, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3,)), jnp.float32)
    b = jnp.asarray(0.25, jnp.float32)

    def loss(w, b, x):
        residual = x @ w + b - 1.0
        return jnp.mean(residual**2), jnp.max(residual)

    def body(w, b, x):
        (gw, gb), aux = gh.local_grad(loss, argnums=(0, 1), has_aux=True)(w, b, x[0])
        (value, aux2), gw_only = gh.local_value_and_grad(loss, has_aux=True)(w, b, x[0])
        return gw[None], gb[None], aux[None], value[None], aux2[None], gw_only[None]

    out_specs = (P("data"),) * 6
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=out_specs))
    gw, gb, aux, value, aux2, gw_only = (np.asarray(a, np.float64) for a in f(w, b, x))
    xs, wn, bn = np.asarray(x, np.float64), np.asarray(w, np.float64), 0.25
    residual = np.einsum("kij,j->ki", xs, wn) + bn - 1.0  # [K, 5]
    np.testing.assert_allclose(gw, 2 * np.einsum("ki,kij->kj", residual, xs) / 5, rtol=1e-5)
    np.testing.assert_allclose(gb, 2 * residual.mean(1), rtol=1e-5)
    np.testing.assert_allclose(aux, residual.max(1), rtol=1e-5)
    np.testing.assert_allclose(aux2, residual.max(1), rtol=1e-5)
    np.testing.assert_allclose(value, (residual**2).mean(1), rtol=1e-5)
    np.testing.assert_allclose(gw_only, gw, rtol=1e-6)

    # Defaults otherwise (argnums=0, no aux) on an axis of another name.
    batch_mesh = jax.make_mesh((K,), ("batch",), axis_types=(AxisType.Auto,))
    plain = lambda w, x: loss(w, 0.25, x)[0]
    g = jax.shard_map(
        lambda w, x: gh.local_grad(plain, "batch")(w, x[0])[None],
        mesh=batch_mesh,
        in_specs=(P(), P("batch")),
        out_specs=P("batch"),
    )(w, x)
    np.testing.assert_allclose(np.asarray(g, np.float64), gw, rtol=1e-5)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("make", [gh.local_grad, gh.local_value_and_grad])
def test_local_grad_rejects_a_bad_axis_name_when_built(make):
    loss = lambda w: jnp.sum(w)
    with pytest.raises(ValueError) as empty:
        make(loss, ())
    assert str(empty.value) == "`axis_name` must name at least one axis, e.g. axis_name='data'."
    with pytest.raises(TypeError) as blank:
        make(loss, "")
    assert str(blank.value) == (
        "`axis_name` must be a mesh/pmap axis name (a non-empty str) or a tuple of them, got '' (type str)."
    )


_POSITIVE = "must be a positive number"
_AXIS = "must be a mesh/pmap axis name (a non-empty str) or a tuple of them, got"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"sketch_dim": 0}, ValueError, "`sketch_dim` must be an int >= 2, got 0."),
        ({"sketch_dim": 1}, ValueError, "`sketch_dim` must be an int >= 2, got 1."),
        ({"sketch_dim": 2.0}, TypeError, "`sketch_dim` must be an int >= 2, got 2.0 (type float)."),
        ({"sketch_seed": -1}, ValueError, "`sketch_seed` must be an int >= 0, got -1."),
        ({"num_devices": 0}, ValueError, "`num_devices` must be an int >= 1, got 0."),
        ({"per_device_batch": 0}, ValueError, "`per_device_batch` must be an int >= 1, got 0."),
        ({"per_device_batch": 2.5}, TypeError, "`per_device_batch` must be an int >= 1, got 2.5 (type float)."),
        ({"audit_every": 0}, ValueError, "`audit_every` must be an int >= 1, got 0."),
        ({"audit_first_steps": -1}, ValueError, "`audit_first_steps` must be an int >= 0, got -1."),
        (
            {"audit_first_steps": 10**10},
            ValueError,
            "`audit_first_steps` must be an int <= 2147483647 (2**31 - 1: it is compared with int32 step counts), "
            "got 10000000000.",
        ),
        (
            {"audit_every": 2**31},
            ValueError,
            "`audit_every` must be an int <= 2147483647 (2**31 - 1: it is compared with int32 step counts), "
            "got 2147483648.",
        ),
        (
            {"audit_first_steps": 0, "audit_every": None},
            ValueError,
            "The audit schedule never audits: audit_first_steps=0 and audit_every=None. Set audit_first_steps > 0 "
            "(audit every step at first) and/or audit_every >= 1 (then every N).",
        ),
        ({"axis_name": ""}, TypeError, f"`axis_name` {_AXIS} '' (type str)."),
        ({"axis_name": 3}, TypeError, f"`axis_name` {_AXIS} 3 (type int)."),
        ({"axis_name": ("data", "data")}, ValueError, "`axis_name` names an axis twice: ('data', 'data')."),
        ({"axis_name": ()}, ValueError, "`axis_name` must name at least one axis, e.g. axis_name='data'."),
        ({"sharded_axes": ""}, TypeError, f"`sharded_axes` {_AXIS} '' (type str)."),
        (
            {"sharded_axes": ("model", "data")},
            ValueError,
            "An axis cannot be both a data axis and a sharded axis: axis_name=('data',), "
            "sharded_axes=('model', 'data').",
        ),
        ({"noise_scale_decay": 1.0}, ValueError, "`noise_scale_decay` must lie strictly between 0 and 1, got 1.0."),
        ({"outlier_threshold": 0.0}, ValueError, f"`outlier_threshold` {_POSITIVE} (inf allowed), got 0.0."),
        ({"outlier_evidence": -1.0}, ValueError, f"`outlier_evidence` {_POSITIVE} (inf allowed), got -1.0."),
        (
            {"near_duplicate_evidence": 0.0},
            ValueError,
            f"`near_duplicate_evidence` {_POSITIVE} (inf allowed), got 0.0.",
        ),
        ({"near_duplicate_evidence": float("nan")}, ValueError, "`near_duplicate_evidence` must not be NaN, got nan."),
        ({"outlier_drift": 0.0}, ValueError, f"`outlier_drift` {_POSITIVE}, finite, got 0.0."),
        ({"outlier_drift": float("inf")}, ValueError, f"`outlier_drift` {_POSITIVE}, finite, got inf."),
        ({"near_duplicate_drift": "3"}, TypeError, "`near_duplicate_drift` must be a real number, got '3' (type str)."),
        ({"near_duplicate_drift": float("inf")}, ValueError, f"`near_duplicate_drift` {_POSITIVE}, finite, got inf."),
        ({"norm_floor": 0.0}, ValueError, f"`norm_floor` {_POSITIVE}, finite, got 0.0."),
        ({"cosine_floor": float("inf")}, ValueError, f"`cosine_floor` {_POSITIVE}, finite, got inf."),
    ],
)
def test_bad_arguments_fail_at_build_time(kwargs, error, message):
    with pytest.raises(error) as raised:
        gh.cross_device(**{"axis_name": "data", **kwargs})
    assert str(raised.value) == message


@pytest.mark.parametrize("seed", [2**31, 2**64 + 5])
def test_a_sketch_seed_beyond_int32_is_a_seed(seed):
    """The seed only seeds numpy's generator (it is never compared with an int32): a seed
    beyond 2**31 - 1 builds and gives the exact cosines of a sketch as wide as the
    gradient (float64 reference)."""
    g = np.random.default_rng(32).normal(size=(K, 24))
    (_, m), *_ = pmap_run([{"w": jnp.asarray(g, jnp.float32)}], sketch_dim=24, sketch_seed=seed)
    unit = g / np.linalg.norm(g, axis=1, keepdims=True)
    np.testing.assert_allclose(first_copy(m)["xdev/pairwise_cosine"], unit @ unit.T, atol=2e-6)


def test_the_largest_schedule_an_int32_step_count_allows_runs():
    """audit_first_steps = audit_every = 2**31 - 1, the bound the build-time check allows:
    the step's int32 comparisons take it (step 0 is audited: below audit_first_steps)."""
    (_, m), *_ = pmap_run([random_grads(0)], audit_first_steps=2**31 - 1, audit_every=2**31 - 1)
    assert bool(first_copy(m)["xdev/audited"])


def test_infinite_thresholds_switch_a_detector_off_and_are_accepted():
    inf = float("inf")
    tx = gh.cross_device("data", outlier_threshold=inf, outlier_evidence=inf, near_duplicate_evidence=inf)
    grads = {"w": jnp.ones((K, 3)).at[3].multiply(1e4)}  # device 3 far off: named under the defaults
    state = jax.pmap(tx.init, axis_name="data")(grads)
    _, state = jax.pmap(tx.update, axis_name="data")(grads, state)
    m = first_copy(gh.metrics(state))
    assert m["xdev/outlier_device"] == -1 and not m["xdev/outlier_devices"].any()
    assert m["xdev/norm_score"][3] > 10.0  # the score is still recorded


def state_per_step(tx, seq):
    """The state after each update of ``tx`` on ``{'w': seq[k, t]}`` (devices k, steps t,
    one lax.scan under pmap): the first device's copy, fields of shape [steps, ...]."""

    def steps(seq):
        def body(state, g):
            _, state = tx.update({"w": g}, state)
            return state, state

        return jax.lax.scan(body, tx.init(None), seq)[1]

    return first_copy(jax.pmap(steps, axis_name="data")(seq))


def test_the_defaults_audit_200_steps_then_every_500_on_axis_data_with_a_1024_sketch_of_seed_0():
    grads = {"w": jnp.asarray(np.random.default_rng(15).normal(size=(K, 502, 3)), jnp.float32)}

    audited = state_per_step(gh.cross_device(), grads["w"]).xdev_audited
    assert np.flatnonzero(audited).tolist() == [*range(200), 500]

    # The sketch: 8192 elements in 1024 buckets collide, so its size and seed decide the estimates.
    wide = {"w": jnp.asarray(np.random.default_rng(16).normal(size=(K, 8192)), jnp.float32)}

    def pairwise(tx):
        def step(g):
            return tx.update(g, tx.init(g))[1].xdev_pairwise_cosine

        return first_copy(jax.pmap(step, axis_name="data")(wide))

    default = pairwise(gh.cross_device())
    np.testing.assert_array_equal(default, pairwise(gh.cross_device("data", sketch_dim=1024, sketch_seed=0)))
    for other in ({"sketch_dim": 1025}, {"sketch_seed": 1}):
        assert not np.array_equal(default, pairwise(gh.cross_device("data", **other))), other


@pytest.mark.parametrize(("first", "every", "expected"), [(2, None, [0, 1]), (0, 3, [0, 3])])
def test_an_audit_schedule_may_drop_either_part(first, every, expected):
    tx = gh.cross_device("data", audit_first_steps=first, audit_every=every)
    seq = jnp.asarray(np.random.default_rng(17).normal(size=(K, 5, 3)), jnp.float32)

    assert np.flatnonzero(state_per_step(tx, seq).xdev_audited).tolist() == expected


def test_unbound_and_unknown_axes_fail_at_first_trace():
    grads = {"w": jnp.ones((K, 3))}
    tx = gh.cross_device("data")
    state = tx.init(None)
    with pytest.raises(ValueError) as outside:
        tx.update({"w": jnp.ones(3)}, state)  # outside pmap / shard_map
    assert str(outside.value) == (
        "`axis_name='data'` is not a bound axis (no mesh axis is bound here (not inside jax.shard_map); "
        "a jax.pmap axis must match its axis_name). Call the update inside jax.pmap(step, axis_name=...) or "
        "jax.shard_map(step, mesh=...) whose axis names include it, or fix `axis_name`."
    )
    pair = gh.cross_device(("replica", "data"))
    with pytest.raises(ValueError) as raised:
        pair.update({"w": jnp.ones(3)}, pair.init(None))
    assert str(raised.value).startswith("`axis_name=('replica', 'data')` is not a bound axis (no mesh axis")
    typo = gh.cross_device("dta")
    with pytest.raises(ValueError, match=r"'dta'.*not a bound axis"):
        jax.pmap(lambda g: typo.update(g, typo.init(g))[0], axis_name="data")(grads)
    mesh = jax.make_mesh((K,), ("data",), axis_types=(AxisType.Auto,))
    f = jax.shard_map(lambda g: typo.update(g, state)[0], mesh=mesh, in_specs=P("data"), out_specs=P())
    with pytest.raises(ValueError, match=r"axes bound here are \('data',\)"):
        f(grads)
    unbound_shards = gh.cross_device("data", sharded_axes="model")
    with pytest.raises(ValueError) as raised:
        jax.pmap(lambda g: unbound_shards.update(g, unbound_shards.init(g))[0], axis_name="data")(grads)
    assert str(raised.value).startswith("`sharded_axes='model'` is not a bound axis (")
    assert str(raised.value).endswith("or fix `sharded_axes`.")


# ----------------------------------------------------------------------------- schedule, accumulation


def test_audit_schedule_and_held_values():
    tx = gh.cross_device("data", audit_first_steps=3, audit_every=4)
    rng = np.random.default_rng(9)
    seq = jnp.asarray(rng.normal(size=(K, 10, 30)), jnp.float32)

    states = state_per_step(tx, seq)
    audited, cosines, norms = states.xdev_audited, states.xdev_cosine_to_mean, states.xdev_device_norms
    expected = [t < 3 or t % 4 == 0 for t in range(10)]
    assert audited.tolist() == expected
    assert states.xdev_num_audits.tolist() == np.cumsum(expected).tolist()
    assert states.xdev_num_steps.tolist() == list(range(1, 11))
    g = np.asarray(seq, np.float64).transpose(1, 0, 2)  # [step, K, n]
    last = -1
    # Every audit field (the detectors' running state included) holds its last audit's value.
    held = [f for f in gh.CrossDeviceState._fields if f.startswith("xdev_") and f not in _EVERY_STEP_FIELDS]
    assert "xdev_pairwise_cosine" in held and "xdev_cosine_spread_ema" in held and len(held) == 16
    for t in range(10):
        np.testing.assert_allclose(norms[t], np.linalg.norm(g[t], axis=1), rtol=1e-5)
        last = t if expected[t] else last
        np.testing.assert_allclose(cosines[t], reference(g[last], 1)["cosine_to_mean"], rtol=1e-4, atol=1e-5)
        for field in held:
            np.testing.assert_array_equal(getattr(states, field)[t], getattr(states, field)[last], err_msg=field)
    # and the values differ between audits, so holding the wrong step's would be seen
    assert not np.array_equal(states.xdev_pairwise_cosine[0], states.xdev_pairwise_cosine[1])
    assert states.xdev_num_detector_audits.tolist() == np.cumsum(expected).tolist()


# Fields recomputed on every step (the rest is the audit's, held between audits).
_EVERY_STEP_FIELDS = {
    "xdev_num_steps",
    "xdev_num_audits",
    "xdev_device_norms",
    "xdev_norm_cv",
    "xdev_norm_max_over_min",
    "xdev_agreement",
    "xdev_grad_sq_est",
    "xdev_trace_cov_est",
    "xdev_grad_sq_ema",
    "xdev_trace_cov_ema",
    "xdev_num_noise_steps",
    "xdev_noise_scale",
    "xdev_audited",
}


def _computations(hlo: str) -> dict[str, str]:
    """name -> body text of each computation in an HLO module dump."""
    out, name, lines = {}, None, []
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header and not line.startswith(" "):
            name, lines = header.group(1), []
        elif line.startswith("}") and name:
            out[name] = "\n".join(lines)
            name = None
        elif name:
            lines.append(line)
    return out


def _all_reduces(hlo: str) -> tuple[int, list[int], int]:
    """All-reduces of a compiled step: (in the entry computation, in each branch of each
    conditional of the entry (sorted), inside while-loop bodies)."""
    comps = _computations(hlo)
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    count = lambda text: len(re.findall(r"\ball-reduce(?:-start)?\(", text))
    entry = re.search(r"^ENTRY %?([\w.\-]+)", hlo, re.M).group(1)
    inside = sum(count(text) for name, text in comps.items() if name in bodies)
    branches = [
        name.strip().lstrip("%")
        for group in re.findall(r"branch_computations=\{([^}]*)\}", comps[entry])
        for name in group.split(",")
    ]
    return count(comps[entry]), sorted(count(comps[name]) for name in branches), inside


@pytest.mark.parametrize("micro_batches", [2, 4])
def test_gradient_accumulation_uses_one_all_reduce_per_update(micro_batches):
    """k micro-batches are accumulated locally in a scan; cross_device all-reduces once."""
    tx = gh.cross_device("data", audit_first_steps=0, audit_every=1000)
    loss = lambda w, x: jnp.mean((x @ w["w"] - 1.0) ** 2)
    w = {"w": jnp.zeros((4,))}
    rng = np.random.default_rng(10)
    xs = jnp.asarray(rng.normal(size=(K, micro_batches, 6, 4)), jnp.float32)

    def accumulate_then_reduce(w, state, xs):
        def body(acc, x):
            return jax.tree.map(jnp.add, acc, jax.grad(loss)(w, x)), None

        total, _ = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, w), xs)
        local = jax.tree.map(lambda g: g / micro_batches, total)
        return tx.update(local, state, w)

    def reduce_every_micro_batch(w, state, xs):  # what the pattern avoids
        def body(acc, x):
            return jax.tree.map(jnp.add, acc, jax.lax.pmean(jax.grad(loss)(w, x), "data")), None

        return jax.lax.scan(body, jax.tree.map(jnp.zeros_like, w), xs)[0]

    w_k = jax.tree.map(lambda x: jnp.stack([x] * K), w)
    state_k = jax.pmap(tx.init, axis_name="data")(w_k)
    step = jax.pmap(accumulate_then_reduce, axis_name="data")
    entry, branches, inside = _all_reduces(step.lower(w_k, state_k, xs).compile().as_text())
    assert inside == 0
    # One all-reduce per update (gradients + the K per-device norms in one op), inside the
    # audit's lax.cond: the plain branch has that one, the audit branch it and the audit's
    # two gathers. Nothing outside the cond, nothing per micro-batch, none in the two
    # branches of the local norm's rescue (`local_norm`: a rare second pass).
    assert entry == 0 and branches == [0, 0, 1, 3]
    naive = jax.pmap(reduce_every_micro_batch, axis_name="data").lower(w_k, state_k, xs).compile().as_text()
    assert _all_reduces(naive)[2] >= 1
    updates, _ = step(w_k, state_k, xs)
    x64 = np.asarray(xs, np.float64).reshape(K * micro_batches, 6, 4)
    expected = np.mean([2 * x.T @ (x @ np.zeros(4) - 1.0) / 6 for x in x64], axis=0)
    np.testing.assert_allclose(np.asarray(updates["w"])[0], expected, rtol=1e-5)


# ----------------------------------------------------------------------------- detection


B = 64
D_IN, HIDDEN, CLASSES = 16, 32, 4


def mlp_params(seed):
    rng = np.random.default_rng(seed)
    return {
        "w1": jnp.asarray(rng.normal(size=(D_IN, HIDDEN)) / np.sqrt(D_IN), jnp.float32),
        "b1": jnp.zeros((HIDDEN,), jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(HIDDEN, CLASSES)) / np.sqrt(HIDDEN), jnp.float32),
        "b2": jnp.zeros((CLASSES,), jnp.float32),
    }


def mlp_loss(p, x, y):
    logits = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def teacher_data(steps, seed=0):
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(D_IN, CLASSES))
    x = rng.normal(size=(steps, K, B, D_IN)).astype(np.float32)
    y = np.argmax(x @ teacher + 0.5 * rng.normal(size=(steps, K, B, CLASSES)), -1).astype(np.int32)
    return x, y


_WATCH = (
    "xdev/outlier_device",
    "xdev/outlier_score",
    "xdev/agreement",
    "xdev/duplicate_pairs",
    "xdev/param_desync",
    "grad/skipped",
)


@functools.cache
def _trainer():
    """Data-parallel training under pmap + lax.scan (compiled once per number of steps).
    Per-device gradient corruption: ``g * scale + noise * |g| * N(0, I) / sqrt(n)``."""
    tx = optax.chain(
        gh.cross_device("data", per_device_batch=B, audit_first_steps=10**6),
        gh.guard(optax.adamw(1e-2), clip=1.0),
    )

    def one_device(params, x, y, scale, noise):
        def body(carry, batch):
            params, state, step = carry
            loss, grads = jax.value_and_grad(mlp_loss)(params, *batch)
            key = jax.random.fold_in(jax.random.key(1), step)

            def corrupt(g):
                z = jax.random.normal(jax.random.fold_in(key, g.size), g.shape)
                return g * scale + noise * jnp.linalg.norm(g) * z / np.sqrt(g.size)

            updates, state = tx.update(jax.tree.map(corrupt, grads), state, params, loss=loss)
            m = gh.metrics(state)
            return (optax.apply_updates(params, updates), state, step + 1), {k: m[k] for k in _WATCH}

        return jax.lax.scan(body, (params, tx.init(params), 0), (x, y))[1]

    return jax.pmap(one_device, axis_name="data", in_axes=(0, 1, 1, 0, 0))


def train(params_k, x, y, scale, noise):
    """Returns the watched metrics per step (first device's copy)."""
    return first_copy(_trainer()(params_k, x, y, scale, noise))


def replicate(p):
    return jax.tree.map(lambda x: jnp.stack([x] * K), p)


def alarms(out, t):
    return gh.cross_device_alarms({k: v[t] for k, v in out.items()})


def test_clean_control_run_raises_no_alarm_for_240_steps():
    x, y = teacher_data(240)
    out = train(replicate(mlp_params(0)), x, y, jnp.ones(K), jnp.zeros(K))
    raised = {t: alarms(out, t) for t in range(240) if alarms(out, t)}
    assert raised == {}, raised
    assert float(out["xdev/outlier_score"].max()) < 10.0  # the documented default threshold


SCENARIO_STEPS = 6


@pytest.fixture(scope="module")
def scenario_data():
    return teacher_data(SCENARIO_STEPS, seed=1)


@pytest.mark.parametrize(
    ("corruption", "scale", "noise", "within"),
    # A sign flip scores 7-8 per audit here (its log-distance against gradients whose
    # cosines are ~0.5): the evidence names it at the third audit.
    [("scaled x10", 10.0, 0.0, 2), ("sign-flipped", -1.0, 0.0, 3), ("noised", 1.0, 5.0, 2)],
)
def test_corrupted_device_is_named(scenario_data, corruption, scale, noise, within):
    x, y = scenario_data
    s, n = np.ones(K, np.float32), np.zeros(K, np.float32)
    s[3], n[3] = scale, noise
    out = train(replicate(mlp_params(0)), x, y, jnp.asarray(s), jnp.asarray(n))
    named = out["xdev/outlier_device"]
    assert 3 in named[:within].tolist() and (named[within:] == 3).all(), (corruption, named)
    assert set(named.tolist()) <= {3, -1}, (corruption, named)  # never names an innocent device
    assert not out["xdev/duplicate_pairs"].any() and not out["xdev/param_desync"].any()


def test_desynchronised_seed_is_named(scenario_data):
    """Device 5 initialised its parameter replica from its own seed (key not shared)."""
    x, y = scenario_data
    params = jax.tree.map(lambda a, b: a.at[5].set(b), replicate(mlp_params(0)), mlp_params(5))
    out = train(params, x, y, jnp.ones(K), jnp.zeros(K))
    for t in range(SCENARIO_STEPS):  # the replica never resynchronises: every audit names it
        assert np.flatnonzero(out["xdev/param_desync"][t]).tolist() == [5]
    assert set(out["xdev/outlier_device"].tolist()) <= {5, -1}
    assert alarms(out, 0)[-1] == "device 5 parameters differ from the majority (desync or corruption)"


def test_duplicated_data_shard_is_named(scenario_data):
    x, y = (a.copy() for a in scenario_data)
    x[:, 6], y[:, 6] = x[:, 2], y[:, 2]
    out = train(replicate(mlp_params(0)), x, y, jnp.ones(K), jnp.zeros(K))
    for t in range(SCENARIO_STEPS):
        assert np.argwhere(np.triu(out["xdev/duplicate_pairs"][t])).tolist() == [[2, 6]]
    assert not out["xdev/param_desync"].any()
    assert set(out["xdev/outlier_device"].tolist()) == {-1}


# ----------------------------------------------------------------------------- multi-host


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(num_processes: int, devices_per_process: int, out_dir: Path, timeout: float = 120.0) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    procs = []
    for pid in range(num_processes):
        cmd = [sys.executable, str(ROOT / "tests" / "_multihost_worker.py")]
        cmd += [f"127.0.0.1:{port}", str(num_processes), str(pid), str(out_dir / f"p{pid}.json")]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    wait_for_processes(procs, timeout)
    return [json.loads((out_dir / f"p{pid}.json").read_text()) for pid in range(num_processes)]


def test_two_processes_of_four_devices_equal_one_process_of_eight(tmp_path):
    (single,) = _launch(1, 8, tmp_path / "one")
    two = _launch(2, 4, tmp_path / "two")
    assert two[0] == two[1]  # every process holds the same (replicated) figures
    assert set(single) == set(two[0]) and len(single) > 10
    for name, value in single.items():
        np.testing.assert_allclose(np.asarray(two[0][name], float), np.asarray(value, float), rtol=1e-5, err_msg=name)
    assert single["step1/xdev/duplicate_pairs"][1][5] and single["step1/xdev/outlier_device"] == 3


def test_data_parallel_example_with_per_device_state_under_shard_map():
    """The example keeps parameters and optimizer state per device (P('data')) under
    shard_map: the audit's lax.cond must keep the state's per-device type."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import data_parallel
    finally:
        sys.path.pop(0)
    duplicate = data_parallel.main("duplicate", steps=2, every=100)
    assert duplicate == [["devices 2 and 6 have identical gradients (same data shard?)"]] * 2


def test_metric_names_are_the_design_catalogue():
    names = set(gh.metrics(gh.cross_device("data", num_devices=4).init(None)))
    design = (
        "device_norms norm_cv norm_max_over_min agreement audited cosine_to_mean pairwise_cosine "
        "mean_pairwise_cosine outlier_device outlier_score duplicate_pairs param_desync noise_scale "
        "grad_sq_est trace_cov_est"
    )
    # The detectors' evidence (docs/detection.md): per-device scores and CUSUM evidence,
    # the devices named, and the near-duplicate pairs.
    design += " outlier_devices norm_score direction_score outlier_evidence near_duplicate_pairs"
    # The audit counter: a row logged off the audit steps holds a new audit when it grew.
    design += " num_audits"
    assert names == {f"xdev/{n}" for n in design.split()}
    assert names <= set(gh.CATALOGUE)


def test_alarms_name_the_devices_the_kind_and_the_evidence():
    k = 6
    cos = np.full((k, k), 0.1, np.float32)
    np.fill_diagonal(cos, 1.0)
    cos[1, 4] = cos[4, 1] = 0.85
    near = np.zeros((k, k), bool)
    near[1, 4] = near[4, 1] = True
    norms = np.array([1.0, 1.1, 0.9, 1.0, 1.05, 0.0], np.float32)
    m = {
        "xdev/device_norms": norms,
        "xdev/cosine_to_mean": np.array([0.5, 0.5, 0.5, -0.2, 0.5, 0.0], np.float32),
        "xdev/outlier_devices": np.array([False, False, False, True, False, True]),
        "xdev/norm_score": np.array([0.1, 0.5, 1.0, 0.0, 0.3, 300.0], np.float32),
        "xdev/direction_score": np.array([0.2, 0.1, 0.3, 9.0, 0.2, 4.0], np.float32),
        "xdev/outlier_evidence": np.array([0.0, 0.0, 0.0, 14.0, 0.0, 24.0], np.float32),
        "xdev/pairwise_cosine": cos,
        "xdev/near_duplicate_pairs": near,
        "xdev/duplicate_pairs": np.zeros((k, k), bool),
        "xdev/param_desync": np.zeros(k, bool),
    }
    alarms = gh.cross_device_alarms(m)
    assert [(a.kind, a.devices) for a in alarms] == [
        ("outlier_direction", (3,)),
        ("dead_device", (5,)),
        ("near_duplicate_pair", (1, 4)),
    ]
    assert alarms[0] == (
        "device 3: gradient direction unlike the others (cosine to the mean -0.20 vs 0.50; score 9, evidence 14)"
    )
    assert alarms[0].evidence["cusum_evidence"] == 14.0
    assert alarms[2].evidence == {"pair_cosine": pytest.approx(0.85), "median_pair_cosine": pytest.approx(0.1)}
    # The flags as a log reads them back (0/1 floats, NaN where not logged) say the same.
    as_logged = {n: (np.where(v, 1.0, 0.0) if np.asarray(v).dtype == bool else v) for n, v in m.items()}
    as_logged["xdev/param_desync"] = np.full(k, np.nan)
    assert [(a.kind, a.devices) for a in gh.cross_device_alarms(as_logged)] == [(a.kind, a.devices) for a in alarms]
    # A bit-identical pair is an exact duplicate, not also a near one.
    m["xdev/duplicate_pairs"] = near
    assert [a.kind for a in gh.cross_device_alarms(m)][-1] == "duplicate_pair"


def test_sketch_signs_keep_structured_orthogonal_gradients_orthogonal():
    """Gradients that are orthogonal only through their signs inside each bucket (even
    versus odd positions, and a +-1 pattern against all ones) have equal or opposite
    bucket sums: an unsigned sketch reads their cosine as +-1 (or 0/0). The random signs
    of the count sketch make the estimate 0 +- about 1/sqrt(sketch_dim)."""
    n, dim = 8192, 256
    i = np.arange(n)
    rng = np.random.default_rng(0)
    vectors = [
        (i % 2 == 0).astype(np.float64),  # even positions
        (i % 2 == 1).astype(np.float64),  # odd positions: orthogonal to the first
        np.ones(n),
        np.where(i % 2 == 0, 1.0, -1.0),  # orthogonal to all ones
    ] + [rng.normal(size=n) for _ in range(K - 4)]
    grads = {"w": jnp.asarray(np.stack(vectors), jnp.float32)}
    _, m = pmap_run([grads], sketch_dim=dim)[0]
    m = first_copy(m)
    g = np.stack(vectors)
    unit = g / np.linalg.norm(g, axis=1, keepdims=True)
    exact = unit @ unit.T
    assert abs(exact[0, 1]) < 1e-12 and abs(exact[2, 3]) < 1e-12
    # Four standard errors of a cosine estimated from a `dim`-bucket sketch.
    tolerance = 4.0 / np.sqrt(dim)
    np.testing.assert_allclose(m["xdev/pairwise_cosine"][0, 1], 0.0, atol=tolerance)
    np.testing.assert_allclose(m["xdev/pairwise_cosine"][2, 3], 0.0, atol=tolerance)
    np.testing.assert_allclose(m["xdev/pairwise_cosine"], exact, atol=tolerance)


def test_accumulate_noise_scale_equals_the_audits_on_the_same_shards():
    """gh.accumulate over K micro-batches sees what the audit sees over K devices: the
    same local gradients, so the same estimates and the same smoothed noise scale."""
    steps = [random_grads(seed) for seed in (0, 1, 2)]
    audit = [first_copy(m) for _, m in pmap_run(steps)]
    tx = gh.accumulate(optax.sgd(0.0), K, micro_batch_size=BATCH, noise_scale_decay=DECAY)
    params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), steps[0])
    state = tx.init(params)
    update = jax.jit(tx.update)
    for grads, m in zip(steps, audit):
        for i in range(K):
            _, state = update(jax.tree.map(lambda x, i=i: x[i], grads), state, params)
        mine = gh.metrics(state)
        for name in ("noise_scale", "grad_sq_est", "trace_cov_est"):
            np.testing.assert_allclose(mine[f"grad/{name}"], m[f"xdev/{name}"], rtol=1e-4, err_msg=name)


_PER_DEVICE_CHAINS = {
    "cross_device": lambda: optax.chain(gh.cross_device("data", per_device_batch=BATCH), optax.adam(1e-3)),
    "+ guard": lambda: optax.chain(gh.cross_device("data", per_device_batch=BATCH), gh.guard(optax.adam(1e-3))),
    "+ loss scale": lambda: optax.chain(
        gh.cross_device("data"), gh.dynamic_loss_scale(gh.guard(optax.adam(1e-3), clip=1.0), init_scale=1.0)
    ),
    "+ adaptive clips": lambda: optax.chain(
        gh.cross_device("data"), gh.adagc_clip(), gh.adaptive_grad_clip(), optax.adam(1e-3)
    ),
    "+ accumulate": lambda: optax.chain(
        gh.cross_device("data"), gh.accumulate(gh.guard(optax.adam(1e-3)), 3, micro_batch_size=4)
    ),
    "+ stateful records": lambda: optax.chain(
        gh.cross_device("data"), gh.record_step_cosine(sketch_dim=8), gh.clip_by_global_norm(1.0), optax.sgd(0.1)
    ),
}


@pytest.mark.parametrize("name", list(_PER_DEVICE_CHAINS))
def test_a_per_device_state_keeps_its_type_through_a_scan_of_steps(name):
    """A state kept per device (P('data'), as examples/data_parallel.py keeps it) is the
    carry of a lax.scan over steps inside shard_map: every transformation after
    cross_device computes from the replicated mean gradient, and each must hand back its
    state with the per-device type it got (else: the scan's carry types differ)."""
    tx = _PER_DEVICE_CHAINS[name]()
    steps = 3
    grads = jnp.asarray(np.random.default_rng(3).normal(size=(K, steps, 16)), jnp.float32)
    params = jnp.zeros((K, 16), jnp.float32)
    state = jax.tree.map(lambda s: jnp.stack([s] * K), tx.init({"w": jnp.zeros(16, jnp.float32)}))
    mesh = jax.make_mesh((K,), ("data",), axis_types=(AxisType.Auto,))

    def run(params, state, grads):
        params, state, grads = jax.tree.map(lambda x: x[0], (params, state, grads))

        def body(carry, g):
            p, s = carry
            updates, s = tx.update({"w": g}, s, {"w": p})
            return (p + updates["w"], s), None

        (params, state), _ = jax.lax.scan(body, (params, state), grads)
        return jax.tree.map(lambda x: x[None], (params, state))

    f = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(P("data"),) * 3, out_specs=P("data")))
    params, state = f(params, state, grads)
    # The mean gradient's steps, applied on every device alike.
    params = np.asarray(params)
    assert all(np.array_equal(params[0], params[i]) for i in range(K))
    assert np.all(np.isfinite(np.asarray(params))) and not np.allclose(np.asarray(params), 0.0)
    assert np.all(np.asarray(optax.tree.get(state, "xdev_num_steps")) == steps)


def test_audit_holds_no_second_gradient_sized_temporary():
    """The audit multiplies the gradients and the mean by a power of two before its dot
    products, sketches and |g|^2 (tiny or huge gradients). A product shared by two of those
    reductions was materialised: two leaves' worth more per device than `pmean` + sgd
    (one before this session too, from the unscaled dot products and sketches). One leaf
    remains: the mean, all-reduced inside the audit's `lax.cond`, leaves it through the
    cond's output (on the benchmark's MLP, whose gradient comes from its backward pass,
    that copy is absorbed: 36.5 MiB against 36.0). Reference: the same step with a plain
    `pmean`, compiled on the same shapes."""
    params = {"w": jnp.ones((512, 256), jnp.float32), "b": jnp.ones((256,), jnp.float32)}
    leaf_bytes = 512 * 256 * 4

    def temp_bytes(average):
        tx = optax.sgd(0.1)
        xdev = gh.cross_device("data", per_device_batch=4, audit_first_steps=10)  # audits: in the program

        def step(p, s, xs, g):
            if average:
                updates, xs = xdev.update(g, xs, p)
            else:
                updates = jax.lax.pmean(g, "data")
            updates, s = tx.update(updates, s, p)
            return optax.apply_updates(p, updates), s, xs

        stacked = jax.tree.map(lambda a: jnp.stack([a] * K), params)
        grads = jax.tree.map(lambda a: jnp.stack([a * (i + 1) for i in range(K)]), params)
        xs = jax.pmap(xdev.init, axis_name="data")(stacked)
        s = jax.pmap(tx.init, axis_name="data")(stacked)
        compiled = jax.pmap(step, axis_name="data", donate_argnums=(0, 1, 2)).lower(stacked, s, xs, grads).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    extra = temp_bytes(True) - temp_bytes(False)
    assert extra < leaf_bytes * 3 // 2, (extra, leaf_bytes)


@pytest.mark.parametrize("make", [gh.local_grad, gh.local_value_and_grad])
@pytest.mark.parametrize("has_aux", ["False", None, 0, 1.0])
def test_local_grad_has_aux_must_be_a_bool_and_the_error_names_the_function_called(make, has_aux):
    """A string "False" was read by its truth value (as True); the errors named
    gh.local_value_and_grad when gh.local_grad was called."""
    name = f"gh.{make.__name__}"
    with pytest.raises(TypeError, match=rf"^{name}: `has_aux` must be True or False, got {re.escape(repr(has_aux))}"):
        make(lambda w: jnp.sum(w), "data", has_aux=has_aux)
    with pytest.raises(TypeError, match=rf"^{name}: `argnums` must be an int"):
        make(lambda w: jnp.sum(w), "data", argnums="a")
    grad = jax.pmap(make(lambda w, x: jnp.sum(w * x), "data", argnums=5), axis_name="data")
    with pytest.raises(TypeError, match=rf"^{name}: `argnums` 5 names positional argument 5"):
        grad(jnp.ones((1, 1)), jnp.ones((1, 1)))


def test_the_smallest_sketch_flags_no_near_duplicate_pair_on_clean_gradients():
    """Independent gradients on every device, every step audited: with one bucket every
    sketched cosine is +-1 (refused when built); with two, the cosines spread out and no
    pair gathers near-duplicate evidence."""
    rng = np.random.default_rng(31)
    steps = [{"w": jnp.asarray(rng.normal(size=(K, 64)), jnp.float32)} for _ in range(15)]
    outs = pmap_run(steps, sketch_dim=2)
    for _, m in outs:
        m = first_copy(m)
        cosines = m["xdev/pairwise_cosine"][~np.eye(K, dtype=bool)]
        assert np.abs(cosines).min() < 0.99  # not the +-1 of a single bucket
        assert not m["xdev/near_duplicate_pairs"].any()
    with pytest.raises(ValueError, match=r"`sketch_dim` must be an int >= 2, got 1\."):
        gh.cross_device("data", sketch_dim=1)


def test_the_guard_refuses_per_device_gradients_from_the_wrong_chain_order_under_shard_map():
    """optax.chain(gh.guard(...), gh.cross_device(...)): the guard sees each device's
    local gradient (each device would skip on its own). Under shard_map the gradients
    vary over 'data' and the guard's state does not: a clear error naming the order
    (it used to be JAX's "Primitive pow requires varying manual axes to match"). The
    documented order runs and judges the mean gradient (float64 reference)."""
    mesh = jax.make_mesh((K,), ("data",), axis_types=(AxisType.Auto,))
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.normal(size=(K * 2, 4)), jnp.float32)
    y = x[:, 0]
    params = {"w": jnp.ones((4,), jnp.float32)}
    loss_fn = lambda p, x, y: jnp.mean((x @ p["w"] - y) ** 2)

    def make_step(tx):
        def step(params, opt_state, x, y):
            loss, grads = gh.local_value_and_grad(loss_fn, "data")(params, x, y)
            updates, opt_state = tx.update(grads, opt_state, params, loss=jax.lax.pmean(loss, "data"))
            return optax.apply_updates(params, updates), opt_state

        in_specs = (P(), P(), P("data"), P("data"))
        return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=in_specs, out_specs=(P(), P())))

    wrong = optax.chain(gh.guard(optax.adam(0.1)), gh.cross_device(axis_name="data"))
    with pytest.raises(
        ValueError,
        match=r"gh\.guard: the gradients vary over the jax\.shard_map mesh axes \['data'\].*"
        r"optax\.chain\(gh\.cross_device\(axis_name='data'\), gh\.guard\(\.\.\.\)\)",
    ):
        make_step(wrong)(params, wrong.init(params), x, y)
    right = optax.chain(gh.cross_device(axis_name="data"), gh.guard(optax.adam(0.1)))
    _, state = make_step(right)(params, right.init(params), x, y)
    xs, ys = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mean_grad = 2 * xs.T @ (xs @ np.ones(4) - ys) / len(ys)  # equal shards: the mean of local means
    np.testing.assert_allclose(float(gh.metrics(state)["grad/norm"]), np.linalg.norm(mean_grad), rtol=1e-5)


# ----------------------------------------------------------------------------- round 7 (review C)


def test_metrics_export_the_audit_counter():
    """Review C r7 #1: xdev/num_audits is logged (gh.metrics), the number of audits up to
    each update: a row logged off the audit steps tells from it that an audit ran since
    the previous logged row."""
    tx = gh.cross_device("data", audit_first_steps=3, audit_every=4)
    seq = jnp.asarray(np.random.default_rng(21).normal(size=(K, 10, 5)), jnp.float32)
    states = state_per_step(tx, seq)
    counts = [int(gh.metrics(jax.tree.map(lambda v, t=t: v[t], states))["xdev/num_audits"]) for t in range(10)]
    assert counts == np.cumsum([t < 3 or t % 4 == 0 for t in range(10)]).tolist()


def _cusum_reference(scores, drift, cap):
    """Per-device one-sided CUSUM in float64: e <- clip(e + s - drift, 0, cap); a NaN
    score adds nothing (every audit here is finite)."""
    evidence = np.zeros_like(scores, dtype=np.float64)
    e = np.zeros(scores.shape[1])
    for t, s in enumerate(np.asarray(scores, np.float64)):
        e = np.clip(e + np.nan_to_num(s) - drift, 0.0, cap)
        evidence[t] = e
    return evidence


def _outlier_stream(seed, audits=160, k=K):
    """Audits of K devices: log-normal norms (10 %) and cosines to the mean near 0.5;
    device 2's norm x1.4 on audits 40-70 (a moderate fault, scores of a few units),
    device 5's x1e4 at audit 100 only (a strong one-audit fault: its evidence jumps to the
    cap), device 6 x2.5 from audit 130 on (persistent)."""
    rng = np.random.default_rng(seed)
    norms = np.exp(0.1 * rng.standard_normal((audits, k)))
    norms[40:71, 2] *= 1.4
    norms[100, 5] *= 1e4
    norms[130:, 6] *= 2.5
    cosines = 0.5 + 0.05 * rng.standard_normal((audits, k))
    return norms.astype(np.float32), cosines.astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_evidence_names_a_device_only_while_the_audit_adds_to_it(seed):
    """Review C r7 #2: after a fault, the capped evidence (24) drains by only 2 - score per
    clean audit, and the evidence rule kept naming the device for ~10 audits whose score
    said it was normal. The rule is now, in numpy: named = score > outlier_threshold or
    (evidence > outlier_evidence and score > outlier_drift), the evidence a float64 CUSUM
    of the scores. The first naming of every fault, and every audit where the evidence
    passes the threshold, are the same as under the old rule (score > threshold or
    evidence > threshold): the evidence only passes it at an audit with score > drift."""
    from optax_gradhealth import _cross_device as xd
    from optax_gradhealth import _detectors as detect

    rule = xd.default_audit_rule()
    thr, h, drift = rule["outlier_threshold"], rule["evidence_threshold"], rule["evidence_drift"]
    norms, cosines = _outlier_stream(seed)
    verdicts = jax.device_get(detect.replay_audits(norms, cosines, **rule))
    score = np.asarray(verdicts.scores.score, np.float64)
    evidence = _cusum_reference(score, drift, 2 * h)
    np.testing.assert_allclose(verdicts.outlier_evidence, evidence, rtol=1e-5, atol=1e-4)
    named = (score > thr) | ((evidence > h) & (score > drift))
    np.testing.assert_array_equal(verdicts.outlier_devices, named)
    old = (score > thr) | (evidence > h)
    previous = np.vstack([np.zeros((1, K)), evidence[:-1]])
    crossing = (previous <= h) & (evidence > h)
    assert crossing.any() and (named | ~crossing).all() and (score[crossing] > drift).all()
    for device in range(K):  # the first naming of each device is unchanged
        assert np.argmax(named[:, device]) == np.argmax(old[:, device]), device
        assert named[:, device].any() == old[:, device].any(), device
    # device 5's one-audit fault: the old rule named it on later clean audits, no longer
    assert named[100, 5] and evidence[100, 5] == 2 * h
    lingering = old[101:, 5] & ~named[101:, 5]
    assert lingering.sum() >= 3 and (score[101:, 5][lingering] <= drift).all()
    # device 6's persistent fault is named at every audit whose score is above the drift
    assert named[130:, 6].sum() == ((evidence[130:, 6] > h) & (score[130:, 6] > drift) | (score[130:, 6] > thr)).sum()
    assert named[150:, 6].mean() > 0.9


def test_in_the_step_a_one_step_fault_is_not_named_once_its_gradient_is_normal():
    """Review C r7 #2, in the jitted step: device 1's gradient x1e4 at update 30 of 60
    (every update audited). The state's xdev/outlier_devices follows the numpy rule on its
    own scores and evidence (float64 CUSUM), and device 1 is named at update 30, then only
    at the audits whose score is above the drift (2)."""
    rng = np.random.default_rng(22)
    seq = rng.normal(size=(K, 60, 40))
    seq[1, 30] *= 1e4
    tx = gh.cross_device("data", audit_first_steps=60)
    states = state_per_step(tx, jnp.asarray(seq, jnp.float32))
    score = np.maximum(np.asarray(states.xdev_norm_score, np.float64), np.asarray(states.xdev_direction_score))
    evidence = _cusum_reference(score, 2.0, 24.0)
    np.testing.assert_allclose(states.xdev_outlier_evidence, evidence, rtol=1e-5, atol=1e-4)
    named = (score > 10.0) | ((evidence > 12.0) & (score > 2.0))
    np.testing.assert_array_equal(states.xdev_outlier_devices, named)
    old = (score > 10.0) | (evidence > 12.0)  # the rule before: named on the evidence alone
    assert named[30, 1] and (evidence[31:36, 1] > 12.0).all()
    assert named[31:, 1].sum() == ((evidence[31:, 1] > 12.0) & (score[31:, 1] > 2.0)).sum() < old[31:, 1].sum() - 3
