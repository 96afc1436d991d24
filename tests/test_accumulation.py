"""Gradient accumulation with optax.MultiSteps around gh.guard: decisions once per update on
the accumulated mean, k micro-batches == one k-times-larger batch, micro-batch norms,
loss scaling per micro-batch, and rematerialisation changing no recorded figure."""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_gradhealth as gh

K = 4
MICRO = 8
D = 5


def _data(seed=0, n=3 * K * MICRO):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D)).astype(np.float32)
    y = (x @ rng.normal(size=D) + 0.3 * rng.normal(size=n)).astype(np.float32)
    return x, y


def _loss(params, x, y):
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


_grad = jax.jit(jax.grad(_loss))


def _init_params():
    return {"w": jnp.zeros(D), "b": jnp.zeros(())}


def _run_accumulated(tx, x, y, updates_count):
    params = _init_params()
    state = tx.init(params)
    update = jax.jit(tx.update)
    history = []
    for u in range(updates_count):
        for m in range(K):
            sl = slice((u * K + m) * MICRO, (u * K + m + 1) * MICRO)
            updates, state = update(_grad(params, x[sl], y[sl]), state, params)
            params = optax.apply_updates(params, updates)
        history.append(jax.device_get(gh.metrics(state)))
    return params, state, history


def _run_big(tx, x, y, updates_count):
    params = _init_params()
    state = tx.init(params)
    update = jax.jit(tx.update)
    history = []
    for u in range(updates_count):
        sl = slice(u * K * MICRO, (u + 1) * K * MICRO)
        updates, state = update(_grad(params, x[sl], y[sl]), state, params)
        params = optax.apply_updates(params, updates)
        history.append(jax.device_get(gh.metrics(state)))
    return params, state, history


def _guarded(inner, clip):
    return gh.guard(inner, clip=clip, warmup_steps=1, spike_threshold=1.5, spike_zscore=None, spike_action="record")


@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_k_micro_batches_equal_one_big_batch_with_clipping(inner):
    x, y = _data()
    make = (lambda: optax.sgd(0.1)) if inner == "sgd" else (lambda: optax.adam(0.05))
    clip = 0.5
    acc_params, _, acc_hist = _run_accumulated(optax.MultiSteps(_guarded(make(), clip), K), x, y, 3)
    big_params, _, big_hist = _run_big(_guarded(make(), clip), x, y, 3)
    chex.assert_trees_all_close(acc_params, big_params, rtol=1e-5, atol=1e-6)
    for a, b in zip(acc_hist, big_hist):
        for name in ("grad/norm", "grad/norm_clipped", "grad/clip_threshold", "grad/spike_score", "grad/norm_mean"):
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, err_msg=name)
        for name in ("grad/clipped", "grad/spiked", "grad/num_steps", "grad/num_clipped", "grad/num_spikes"):
            assert a[name] == b[name], name
    assert all(h["grad/clipped"] for h in acc_hist)  # clipping was active
    assert int(acc_hist[-1]["grad/num_steps"]) == 3  # one guard step per update, not per micro-batch

    if inner == "sgd":  # independent reference: clipped SGD in numpy float64, gradient written out
        w, b = np.zeros(D), 0.0
        for u in range(3):
            xs = x[u * K * MICRO : (u + 1) * K * MICRO].astype(np.float64)
            r = xs @ w + b - y[u * K * MICRO : (u + 1) * K * MICRO]
            gw, gb = 2 * xs.T @ r / len(r), 2 * r.mean()
            norm = np.sqrt(gw @ gw + gb * gb)
            np.testing.assert_allclose(acc_hist[u]["grad/norm"], norm, rtol=1e-5)
            factor = min(1.0, clip / norm)
            w, b = w - 0.1 * factor * gw, b - 0.1 * factor * gb
        np.testing.assert_allclose(np.asarray(acc_params["w"]), w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(acc_params["b"]), b, rtol=1e-5, atol=1e-6)


def test_decisions_apply_to_the_mean_never_to_partial_micro_batches():
    """Two huge micro-batches that cancel: the mean is ordinary, so no spike, no clip,
    no skip, although each micro-batch (and every partial mean) would be a spike."""
    tx = optax.MultiSteps(
        gh.guard(optax.sgd(0.1), clip=10.0, warmup_steps=2, spike_threshold=2.0, spike_zscore=None), K
    )
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    g = np.array([0.3, -0.4, 1.2], np.float32)
    big = np.array([1000.0, 0.0, -500.0], np.float32)
    windows = [[g] * K, [g] * K, [g] * K, [g + big, g - big, g, g]]
    for window in windows:
        for micro in window:
            _, state = update({"w": jnp.asarray(micro)}, state, params)
    m = gh.metrics(state)
    mean = np.mean(np.stack(windows[-1]).astype(np.float64), axis=0)
    np.testing.assert_allclose(float(m["grad/norm"]), np.linalg.norm(mean), rtol=1e-4)
    assert not bool(m["grad/spiked"]) and not bool(m["grad/clipped"]) and not bool(m["grad/skipped"])
    assert int(m["grad/num_steps"]) == len(windows) and int(m["grad/num_spikes"]) == 0
    np.testing.assert_allclose(float(m["grad/leaf_norm/w"]), np.linalg.norm(mean), rtol=1e-4)


def test_micro_batch_norms_are_recorded():
    x, y = _data(1)
    tx = optax.chain(
        gh.record_micro_batch_norms(K),
        optax.MultiSteps(_guarded(optax.sgd(0.1), 1.0), K).gradient_transformation(),
    )
    _, _, hist = _run_accumulated(tx, x, y, 1)
    w0 = np.zeros(D)
    expected = []
    for m in range(K):
        xs = x[m * MICRO : (m + 1) * MICRO].astype(np.float64)
        r = xs @ w0 - y[m * MICRO : (m + 1) * MICRO]
        expected.append(np.sqrt(np.sum((2 * xs.T @ r / MICRO) ** 2) + (2 * r.mean()) ** 2))
    np.testing.assert_allclose(hist[0]["grad/micro_batch_norms"], expected, rtol=1e-5)
    # the accumulated norm is the norm of the mean, not the mean of the norms
    assert float(hist[0]["grad/norm"]) < np.mean(expected)


def test_loss_scaling_outside_multisteps_drops_overflowed_micro_batches():
    """dynamic_loss_scale(MultiSteps(guard)): each micro-batch is unscaled before it is
    accumulated; an overflowed one is dropped, the accumulator stays finite, and the
    update is the mean of the K finite micro-batches even though the scale changed."""
    tx = gh.dynamic_loss_scale(optax.MultiSteps(gh.guard(optax.sgd(1.0), clip=100.0), K), init_scale=64.0)
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    rng = np.random.default_rng(2)
    true = rng.normal(size=(K, 3)).astype(np.float32)
    sequence = [true[0], None, true[1], true[2], true[3]]  # None: an overflow
    final = None
    for g in sequence:
        scaled = jnp.full(3, jnp.inf) if g is None else jnp.asarray(g) * gh.loss_scale(state)
        final, state = update({"w": scaled}, state, params)
    m = gh.metrics(state)
    assert int(m["grad/num_overflows"]) == 1 and float(m["grad/loss_scale"]) == 32.0
    assert int(m["grad/num_steps"]) == 1 and int(m["grad/num_nonfinite"]) == 0
    mean = true.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(float(m["grad/norm"]), np.linalg.norm(mean), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(final["w"]), -mean, rtol=1e-5)
    chex.assert_tree_all_finite(state.loss_scale_inner_state.acc_grads)


# ------------------------------------------------------------ rematerialisation


def _mlp(params, x, remat):
    def layer(w, h):
        return jnp.tanh(h @ w)

    if remat:
        layer = jax.checkpoint(layer)
    h = x
    for w in params["hidden"]:
        h = layer(w, h)
    return h @ params["out"]


def test_jax_checkpoint_changes_no_recorded_figure():
    rng = np.random.default_rng(3)
    params0 = {
        "hidden": [jnp.asarray(rng.normal(size=(6, 6)) * 0.5, jnp.float32) for _ in range(3)],
        "out": jnp.asarray(rng.normal(size=(6, 1)), jnp.float32),
    }
    x = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(16, 1)), jnp.float32)
    results = []
    for remat in (False, True):
        tx = gh.guard(optax.adam(1e-2), clip=gh.ZScoreClip(warmup_steps=2), warmup_steps=2)
        params, state = params0, tx.init(params0)

        @jax.jit
        def step(params, state, remat=remat, tx=tx):
            loss, grads = jax.value_and_grad(lambda p: jnp.mean((_mlp(p, x, remat) - y) ** 2))(params)
            updates, state = tx.update(grads, state, params, loss=loss)
            return optax.apply_updates(params, updates), state

        for _ in range(4):
            params, state = step(params, state)
        results.append(jax.device_get(gh.metrics(state)))
    plain, remat = results
    assert plain.keys() == remat.keys() and "grad/leaf_norm/hidden/2" in plain
    for name in plain:
        np.testing.assert_allclose(np.asarray(remat[name]), np.asarray(plain[name]), rtol=1e-6, err_msg=name)


class _Block(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(6, 6, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.lin(x))


class _Net(nnx.Module):
    def __init__(self, rngs, remat):
        self.blocks = nnx.List([_Block(rngs) for _ in range(2)])
        self.head = nnx.Linear(6, 1, rngs=rngs)
        self.remat = remat

    def __call__(self, x):
        for block in self.blocks:
            x = nnx.remat(lambda b, h: b(h))(block, x) if self.remat else block(x)
        return self.head(x)


def test_nnx_remat_changes_no_recorded_figure():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(16, 1)), jnp.float32)
    results = []
    for remat in (False, True):
        model = _Net(nnx.Rngs(0), remat)
        opt = nnx.Optimizer(model, gh.guard(optax.adam(1e-2), clip=0.5, warmup_steps=2), wrt=nnx.Param)

        @nnx.jit
        def step(model, opt):
            loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
            opt.update(model, grads, loss=loss)

        for _ in range(3):
            step(model, opt)
        results.append(jax.device_get(gh.metrics(opt)))
    plain, remat = results
    assert plain.keys() == remat.keys() and any(k.startswith("grad/leaf_norm/blocks/1") for k in plain)
    for name in plain:
        np.testing.assert_allclose(np.asarray(remat[name]), np.asarray(plain[name]), rtol=1e-6, err_msg=name)


def test_multisteps_around_cross_device_and_guard_decides_once_on_the_global_mean():
    """optax.MultiSteps(chain(gh.cross_device, gh.guard(...)), k) under pmap: micro-steps
    accumulate the local gradients; the audit and the guard's decision happen once, on
    the k-th micro-step, on the mean over devices and micro-batches.

    The all-reduce sits in the branches of cross_device's audit cond, inside MultiSteps'
    emit branch, and stays there: none in the step's entry computation, so it runs on the
    k-th micro-step only. (When it was outside the audit cond, XLA:CPU hoisted it out of
    the emit branch and ran it on every micro-step.)"""
    from tests.test_cross_device import _all_reduces

    k, devices = 3, 8
    inner = optax.chain(
        gh.cross_device("data", audit_first_steps=0, audit_every=1000), gh.guard(optax.sgd(0.5), clip=None)
    )
    tx = optax.MultiSteps(inner, every_k_schedule=k)
    loss = lambda w, x: jnp.mean((x @ w["w"] - 1.0) ** 2)
    w = {"w": jnp.zeros((4,))}
    xs = np.random.default_rng(3).normal(size=(k, devices, 6, 4)).astype(np.float32)

    def micro_step(w, state, x):
        updates, state = tx.update(jax.grad(loss)(w, x), state, w)
        return optax.apply_updates(w, updates), state

    step = jax.pmap(micro_step, axis_name="data")
    w_k = jax.tree.map(lambda a: jnp.stack([a] * devices), w)
    # The parameters placed as the step returns them (over the "data" axis): one compile.
    w_k, state = jax.pmap(lambda w: (w, tx.init(w)), axis_name="data")(w_k)
    hlo = step.lower(w_k, state, jnp.asarray(xs[0])).compile().as_text()
    entry = _all_reduces(hlo)[0]
    total = len(re.findall(r"\ball-reduce(?:-start)?\(", hlo))
    assert entry == 0 and total >= 1
    for i in range(k):
        w_k, state = step(w_k, state, jnp.asarray(xs[i]))
        m = jax.device_get(gh.metrics(jax.tree.map(lambda a: a[0], state)))
        assert int(m["grad/num_steps"]) == (1 if i == k - 1 else 0)
    x64 = xs.astype(np.float64).reshape(k * devices, 6, 4)
    mean_grad = np.mean([2 * x.T @ (x @ np.zeros(4) - 1.0) / 6 for x in x64], axis=0)
    np.testing.assert_allclose(np.asarray(w_k["w"]), np.stack([-0.5 * mean_grad] * devices), rtol=1e-5)


def test_accumulate_recovers_the_noise_scale_of_a_model_with_known_covariance():
    """Per-example loss 0.5 |w - x_j|^2 with x_j ~ N(mu, s^2 I_d): the per-example
    gradient is w - x_j, so |G|^2 = |w - mu|^2 and tr(Sigma) = d s^2, and B_simple =
    d s^2 / |w - mu|^2 (here 16 * 4 / 32 = 2). With w held fixed (learning rate 0) the
    smoothed estimate converges to it."""
    d, s, k, b, windows = 16, 2.0, 8, 4, 600
    mu = jnp.full((d,), 2.0)  # w = 0: |G|^2 = 16 * 4 = 64 ... scaled below
    mu = mu / jnp.sqrt(2.0)  # |G|^2 = 32
    tx = gh.accumulate(optax.sgd(0.0), k, micro_batch_size=b, noise_scale_decay=0.99)
    params = {"w": jnp.zeros(d)}
    examples = mu + s * jax.random.normal(jax.random.key(0), (windows * k, b, d))

    def body(state, x):
        grads = {"w": params["w"] - x.mean(0)}  # the micro-batch's mean gradient
        _, state = tx.update(grads, state, params)
        return state, None

    state, _ = jax.jit(lambda st: jax.lax.scan(body, st, examples))(tx.init(params))
    m = gh.metrics(state)
    assert int(state.accumulation_num_windows) == windows
    truth = d * s**2 / float(jnp.sum(mu**2))
    assert float(m["grad/noise_scale"]) == pytest.approx(truth, rel=0.15)


def test_accumulate_updates_are_multisteps_and_a_guard_inside_works():
    params = {"w": jnp.zeros(3)}
    grads = [{"w": jnp.array([1.0, -2.0, 0.5]) * (i + 1)} for i in range(6)]
    ours = gh.accumulate(gh.guard(optax.adam(0.1)), 3, micro_batch_size=2)
    theirs = optax.MultiSteps(gh.guard(optax.adam(0.1)), 3)
    s1, s2 = ours.init(params), theirs.init(params)
    update1, update2 = jax.jit(ours.update), jax.jit(theirs.update)  # compiled once, not per step
    for g in grads:
        u1, s1 = update1(g, s1, params)
        u2, s2 = update2(g, s2, params)
        np.testing.assert_array_equal(np.asarray(u1["w"]), np.asarray(u2["w"]))
    m = gh.metrics(s1)
    assert int(m["grad/num_steps"]) == 2 and int(state_windows(s1)) == 2
    assert np.isfinite(float(m["grad/noise_scale"]))


def state_windows(state):
    return state.accumulation_num_windows


def test_accumulate_checks_its_arguments_and_skips_a_nonfinite_window():
    with pytest.raises(ValueError, match="`every_k`"):
        gh.accumulate(optax.sgd(0.1), 0)
    with pytest.raises(ValueError, match="`micro_batch_size`"):
        gh.accumulate(optax.sgd(0.1), 2, micro_batch_size=0)
    with pytest.raises(ValueError, match="`noise_scale_decay`"):
        gh.accumulate(optax.sgd(0.1), 2, noise_scale_decay=1.0)
    tx = gh.accumulate(optax.sgd(0.0), 2, micro_batch_size=1)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    for g in ([1.0, 0.0], [jnp.nan, 0.0], [1.0, 0.0], [3.0, 0.0]):
        _, state = tx.update({"w": jnp.array(g)}, state, params)
    assert int(state.accumulation_num_windows) == 1  # the NaN window folded nothing, the next one did
    assert float(gh.metrics(state)["grad/grad_sq_est"]) == 3.0
    assert float(state.accumulation_micro_sq_sum) == 0.0  # reset at each window's end


def test_a_nonfinite_micro_batch_spoils_its_own_window_only():
    """optax.MultiSteps alone keeps the NaN in its accumulator (0 * NaN) and a guard
    inside skips every later window; gh.accumulate starts the next window clean."""
    params = {"w": jnp.zeros(2)}
    grads = [[1.0, 0.0], [jnp.nan, 0.0], [1.0, 1.0], [1.0, 1.0]]
    for tx, later_skipped in (
        (optax.MultiSteps(gh.guard(optax.sgd(1.0)), 2), True),
        (gh.accumulate(gh.guard(optax.sgd(1.0)), 2), False),
    ):
        state = tx.init(params)
        update = jax.jit(tx.update)  # one compile (eagerly each call took seconds)
        for g in grads:
            updates, state = update({"w": jnp.array(g)}, state, params)
        assert bool(gh.metrics(state)["grad/skipped"]) is later_skipped
        assert int(gh.metrics(state)["grad/num_skipped"]) == (2 if later_skipped else 1)
        if not later_skipped:
            np.testing.assert_array_equal(np.asarray(updates["w"]), [-1.0, -1.0])


@pytest.mark.parametrize("micro_batch_size", [None, 4])
def test_a_guard_around_accumulate_of_one_micro_batch_applies_every_step(micro_batch_size):
    """With every_k=1 the covariance trace cannot be estimated: it went from 0 at init to
    NaN at the first window, which the guard's update check took for the optimizer
    making a NaN; every step was skipped. Expected: plain SGD, step for step."""
    tx = gh.guard(gh.accumulate(optax.sgd(0.1), 1, micro_batch_size=micro_batch_size))
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(3):
        grads = {"w": jnp.array([1.0, -2.0, 0.5]) * (t + 1)}
        updates, state = update(grads, state, params)
        np.testing.assert_allclose(np.asarray(updates["w"]), -0.1 * np.asarray(grads["w"]), rtol=1e-6)
    assert int(gh.metrics(state)["grad/num_skipped"]) == 0


@pytest.mark.parametrize("kind", ["np.float64", "jnp.float64", "inject_hyperparams"])
def test_a_float64_noise_scale_decay_under_x64_keeps_the_state_float32(kind):
    """Under jax_enable_x64 a float64 decay (a numpy scalar, a jnp array, or the array
    optax.inject_hyperparams makes of it) made three float32 EMA fields float64 after the
    first update: lax.scan failed on the carry and jit recompiled. The EMAs are also
    checked against the formula written out (float32 decay, as with a Python float)."""
    with jax.enable_x64(True):
        params = {"w": jnp.ones(3, jnp.float32)}
        if kind == "inject_hyperparams":
            tx = optax.inject_hyperparams(gh.accumulate, static_args=("every_k", "micro_batch_size"))(
                optax.sgd(0.1), every_k=2, micro_batch_size=2, noise_scale_decay=jnp.float64(0.9)
            )
            acc = lambda s: s.inner_state
        else:
            decay = np.float64(0.9) if kind == "np.float64" else jnp.asarray(0.9, jnp.float64)
            tx = gh.accumulate(optax.sgd(0.1), 2, micro_batch_size=2, noise_scale_decay=decay)
            acc = lambda s: s
        state0 = tx.init(params)
        grads = {"w": jnp.asarray(np.arange(12.0).reshape(4, 3) - 4.0, jnp.float32)}
        final, _ = jax.lax.scan(lambda s, g: (tx.update({"w": g}, s, params)[1], None), state0, grads["w"])
        chex.assert_trees_all_equal_shapes_and_dtypes(final, state0)
        # Written out: two windows, micro-batches of 2 examples, EMAs with decay 0.9.
        g = np.asarray(grads["w"], np.float64).reshape(2, 2, 3)
        ema_g = ema_t = 0.0
        for window in g:
            mean_group_sq = np.mean([np.sum(x**2) for x in window])
            mean_sq = np.sum(window.mean(axis=0) ** 2)
            ema_g = 0.9 * ema_g + 0.1 * (2 * mean_sq - mean_group_sq)
            ema_t = 0.9 * ema_t + 0.1 * 2 * 2 * (mean_group_sq - mean_sq)
        np.testing.assert_allclose(float(acc(final).accumulation_grad_sq_ema), ema_g, rtol=1e-5)
        np.testing.assert_allclose(float(acc(final).accumulation_trace_cov_ema), ema_t, rtol=1e-5)
        np.testing.assert_allclose(float(acc(final).accumulation_noise_scale), ema_t / ema_g, rtol=1e-5)


def _reference_noise_scale(windows, b, decay, folded):
    """B_simple written out in float64: the estimates of each window (its micro-batch
    gradients, [k, d]) in ``folded``, their EMAs, and the ratio of the EMAs."""
    grad_ema = trace_ema = 0.0
    for gs, fold in zip(windows, folded):
        if not fold:
            continue
        gs = np.asarray(gs, np.float64)
        k = len(gs)
        mean_group_sq, mean_sq = np.mean(np.sum(gs**2, axis=1)), np.sum(np.mean(gs, axis=0) ** 2)
        grad_ema = decay * grad_ema + (1 - decay) * (k * mean_sq - mean_group_sq) / (k - 1)
        trace_ema = decay * trace_ema + (1 - decay) * b * k * (mean_group_sq - mean_sq) / (k - 1)
    return trace_ema / grad_ema


def _run_windows(tx, params, windows):
    """Every micro-batch of ``windows`` ([n, k, d]) through ``tx``, in one scan."""

    def body(state, g):
        _, state = tx.update({"w": g}, state, params)
        return state, None

    flat = jnp.asarray(np.reshape(windows, (-1, windows.shape[-1])))
    return jax.jit(lambda st: jax.lax.scan(body, st, flat)[0])(tx.init(params))


def test_a_window_the_guard_inside_skips_as_a_spike_is_not_folded_into_the_noise_scale():
    """One micro-batch a thousand times the usual norm: the guard inside skips its window
    as a spike, and the noise scale is that of the clean windows alone (before, the
    window was folded and the noise scale read thousands for ~1000 windows). Without a
    guard the window is folded, as documented."""
    k, b, d, decay = 4, 8, 16, 0.9
    rng = np.random.default_rng(0)
    windows = (1.0 + rng.normal(size=(60, k, d)) / np.sqrt(b)).astype(np.float32)
    windows[40, 1] *= 1000.0
    params = {"w": jnp.zeros(d)}
    guarded = gh.accumulate(gh.guard(optax.sgd(0.0), warmup_steps=5), k, micro_batch_size=b, noise_scale_decay=decay)
    state = _run_windows(guarded, params, windows)
    m = gh.metrics(state)
    assert int(m["grad/num_skipped"]) == 1 and int(m["grad/num_spikes"]) == 1
    assert int(state.accumulation_num_windows) == 59
    clean = [w != 40 for w in range(60)]
    expected = _reference_noise_scale(windows, b, decay, clean)
    assert float(m["grad/noise_scale"]) == pytest.approx(expected, rel=1e-4)
    assert 0.5 < expected < 2.0  # B_simple is 1 here
    plain = gh.accumulate(optax.sgd(0.0), k, micro_batch_size=b, noise_scale_decay=decay)
    expected_plain = _reference_noise_scale(windows, b, decay, [True] * 60)
    assert float(gh.metrics(_run_windows(plain, params, windows))["grad/noise_scale"]) == pytest.approx(
        expected_plain, rel=1e-4
    )


def test_an_estimate_float32_cannot_hold_is_not_folded_into_the_noise_scale():
    """A window whose tr(Sigma) estimate overflows float32 (its inputs finite) folds
    nothing; before, the EMA became inf and grad/noise_scale stayed inf for good."""
    k, b, d, decay = 4, 2**16, 8, 0.9
    rng = np.random.default_rng(1)
    windows = (rng.normal(size=(6, k, d)) + 0.5).astype(np.float32)
    windows[2] *= np.float32(1e17)  # |g_i|^2 ~ 1e35: finite; b k (M - m) / (k - 1) ~ 1e40
    gs = windows[2].astype(np.float64)
    assert b * k * (np.mean(np.sum(gs**2, 1)) - np.sum(np.mean(gs, 0) ** 2)) / (k - 1) > np.finfo(np.float32).max
    params = {"w": jnp.zeros(d)}
    state = _run_windows(gh.accumulate(optax.sgd(0.0), k, micro_batch_size=b, noise_scale_decay=decay), params, windows)
    assert int(state.accumulation_num_windows) == 5
    expected = _reference_noise_scale(windows, b, decay, [w != 2 for w in range(6)])
    assert float(gh.metrics(state)["grad/noise_scale"]) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("how", ["eager", "traced_micro_batch_size"])
def test_noise_scale_estimates_that_float32_holds_do_not_overflow_part_way(how):
    """b k (M - m) / (k - 1) with b k (M - m) above float32's max but the estimate below
    it: the estimate is recorded, not inf (before, the product overflowed first, where
    XLA could not fold the constants: run eagerly, or with the micro-batch size injected
    as a hyperparameter under jit)."""
    k, b, a, c = 4, 2, 7.75e18, 3e18
    micro = np.array([[a, c], [-a, c], [a, c], [-a, c]], np.float32)  # mean (0, c): M - m = a^2
    gs = micro.astype(np.float64)
    mean_group_sq, mean_sq = np.mean(np.sum(gs**2, 1)), np.sum(np.mean(gs, 0) ** 2)
    assert b * k * (mean_group_sq - mean_sq) > np.finfo(np.float32).max
    params = {"w": jnp.zeros(2)}
    if how == "eager":
        tx = gh.accumulate(optax.sgd(0.0), k, micro_batch_size=b)
        state = tx.init(params)
        for g in micro:
            _, state = tx.update({"w": jnp.asarray(g)}, state, params)
    else:
        tx = optax.inject_hyperparams(gh.accumulate, static_args=("inner", "every_k"))(
            optax.sgd(0.0), k, micro_batch_size=b
        )
        state = _run_windows(tx, params, micro[None])
    m = gh.metrics(state)
    trace_cov = b * k * (mean_group_sq - mean_sq) / (k - 1)
    grad_sq = (k * mean_sq - mean_group_sq) / (k - 1)
    assert float(m["grad/trace_cov_est"]) == pytest.approx(trace_cov, rel=1e-5)
    assert float(m["grad/grad_sq_est"]) == pytest.approx(grad_sq, rel=1e-5)
    assert float(m["grad/noise_scale"]) == pytest.approx(trace_cov / grad_sq, rel=1e-5)


@pytest.mark.parametrize("bad_micro_batch", [0, 1, 2])
@pytest.mark.parametrize("arg", ["loss", "value"])
def test_a_nonfinite_loss_on_any_micro_batch_spoils_its_window(bad_micro_batch, arg):
    """optax.MultiSteps hands the guard the window's last loss only; gh.accumulate hands
    it a NaN at the window's end when any micro-batch's was not finite: the guard skips
    and counts that window, and the next window (clean) is applied as usual. Before, a
    NaN loss on an earlier micro-batch was applied and counted nowhere."""
    k, lr = 3, 0.1
    tx = gh.accumulate(gh.guard(optax.sgd(lr)), k, micro_batch_size=2)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    rng = np.random.default_rng(2)
    for window in range(2):
        micro = rng.normal(size=(k, 2)).astype(np.float32)
        for i, g in enumerate(micro):
            bad = window == 0 and i == bad_micro_batch
            updates, state = update({"w": jnp.asarray(g)}, state, params, **{arg: jnp.float32(np.nan if bad else 1.0)})
            params = optax.apply_updates(params, updates)
        m = gh.metrics(state)
        if window == 0:
            np.testing.assert_array_equal(np.asarray(params["w"]), [0.0, 0.0])  # skipped
            assert int(m["grad/num_nonfinite"]) == 1 and int(m["grad/num_skipped"]) == 1
        else:
            expected = -lr * np.mean(micro.astype(np.float64), axis=0)
            np.testing.assert_allclose(np.asarray(params["w"]), expected, rtol=1e-6)
            assert int(m["grad/num_nonfinite"]) == 1 and int(m["grad/num_skipped"]) == 1
    assert int(state.accumulation_num_windows) == 1  # the skipped window folded nothing


@pytest.mark.parametrize("accumulator", ["accumulate", "MultiSteps with extra args"])
def test_the_documented_micro_batch_norm_chain_passes_the_loss_to_the_guard(accumulator):
    """record_micro_batch_norms' docs chained MultiSteps(...).gradient_transformation(), a
    plain GradientTransformation: optax.chain dropped loss= before it, so a NaN loss on the
    window's last micro-batch was applied. Both documented forms must skip that window."""
    k, lr = 2, 0.5
    if accumulator == "accumulate":
        accumulated = gh.accumulate(gh.guard(optax.sgd(lr)), k)
    else:
        ms = optax.MultiSteps(gh.guard(optax.sgd(lr)), k)
        accumulated = optax.GradientTransformationExtraArgs(ms.init, ms.update)
    tx = optax.chain(gh.record_micro_batch_norms(k), accumulated)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    grads = [np.array([0.3, -0.4], np.float32), np.array([0.1, 0.2], np.float32)]
    for i, g in enumerate(grads):
        loss = jnp.float32(np.nan if i == k - 1 else 1.0)
        updates, state = tx.update({"w": jnp.asarray(g)}, state, params, loss=loss)
        params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(np.asarray(params["w"]), [0.0, 0.0])  # the window was skipped
    m = gh.metrics(state)
    assert int(m["grad/num_nonfinite"]) == 1 and int(m["grad/num_skipped"]) == 1
    np.testing.assert_allclose(np.asarray(m["grad/micro_batch_norms"]), [0.5, np.hypot(0.1, 0.2)], rtol=1e-6)


def test_a_gradient_tree_of_another_structure_is_a_clear_error():
    # A mismatched tree reached a bare JAX broadcasting error (or zip()'s, for an inner
    # optax.lookahead) at trace time instead of the message every other transformation gives.
    params = {"w": jnp.ones(3), "b": jnp.ones(2)}
    acc = gh.accumulate(optax.sgd(0.1), 2)
    with pytest.raises(ValueError, match=r"gh\.accumulate: the gradient tree's structure does not match"):
        acc.update({"w": jnp.ones(3)}, acc.init(params), params)
    fast = optax.LookaheadParams.init_synced(params)
    acc = gh.accumulate(gh.guard(optax.lookahead(optax.adam(1e-3), 5, 0.5)), 2)
    with pytest.raises(ValueError, match=r"gh\.accumulate: .*optax\.LookaheadParams.*not supported"):
        acc.update(params, acc.init(fast), fast)
