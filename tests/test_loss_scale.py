"""Dynamic loss scaling: scale trajectory against torch.amp.GradScaler, overflow skips
that never touch the inner state, unscaling before every statistic, fp16/bf16 numerics."""

from __future__ import annotations

import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gradhealth as gh
from tests.backend import SCRATCH_BYTES

# ------------------------------------------------------------------ build-time errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"init_scale": 0.0}, "`init_scale`"),
        ({"init_scale": -4.0}, "`init_scale`"),
        ({"init_scale": math.inf}, "`init_scale`"),
        ({"growth_factor": 1.0}, "`growth_factor`"),
        ({"growth_factor": 0.5}, "`growth_factor`"),
        ({"growth_factor": math.inf}, "`growth_factor` must be a finite number > 1"),
        ({"backoff_factor": 0.0}, "`backoff_factor`"),
        ({"backoff_factor": 1.0}, "`backoff_factor`"),
        ({"backoff_factor": 2.0}, "`backoff_factor`"),
        ({"growth_interval": 0}, "`growth_interval`"),
        ({"min_scale": 0.0}, "`min_scale`"),
        ({"min_scale": 8.0, "max_scale": 4.0, "init_scale": 4.0}, r"`max_scale` \(4.0\) must be >= `min_scale`"),
        ({"max_scale": -1.0}, "`max_scale`"),
        ({"init_scale": 2.0**30}, "`init_scale`"),
        # A float32 scale whose inverse (the unscaling factor) is a normal float32 too.
        ({"init_scale": 1e39, "max_scale": 1e40}, r"`init_scale` must lie in \[2\*\*-126, 2\*\*126\]"),
        ({"init_scale": 2.0**127, "max_scale": math.inf}, r"`init_scale` must lie in \[2\*\*-126, 2\*\*126\]"),
        ({"init_scale": 1e-46, "min_scale": 1e-46}, r"`init_scale` must lie in \[2\*\*-126"),
        ({"min_scale": 1e-40}, r"`min_scale` must lie in \[2\*\*-126, 2\*\*126\].*got 1e-40"),
    ],
)
def test_bad_arguments_raise_when_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gh.dynamic_loss_scale(optax.sgd(0.1), **kwargs)


def test_edge_arguments_are_accepted():
    """The bounds that are allowed: a growth every step, an unbounded scale, a fixed one,
    and the defaults' min_scale of 1 (a scale of 1 is a valid start)."""
    for kwargs in (
        {"growth_interval": 1},
        {"max_scale": math.inf},
        {"init_scale": 4.0, "min_scale": 4.0, "max_scale": 4.0},
        {"init_scale": 1.0},
    ):
        gh.dynamic_loss_scale(optax.sgd(0.1), **kwargs)


def test_bad_types_raise_when_built():
    with pytest.raises(TypeError, match="`growth_interval`"):
        gh.dynamic_loss_scale(optax.sgd(0.1), growth_interval=2.5)
    with pytest.raises(TypeError, match="`inner`"):
        gh.dynamic_loss_scale("adam")
    with pytest.raises(TypeError, match="`growth_factor`"):
        gh.dynamic_loss_scale(optax.sgd(0.1), growth_factor="2")
    with pytest.raises(TypeError, match="`max_scale`"):
        gh.dynamic_loss_scale(optax.sgd(0.1), max_scale="big")


def test_a_guard_around_the_loss_scale_is_refused_at_init():
    """guard(dynamic_loss_scale(...)) skipped every overflow before the scale inside saw it:
    the scale never backed off and every later step was skipped. The order is refused."""
    params = {"w": jnp.ones(2, jnp.float16)}
    for inner in (
        gh.dynamic_loss_scale(optax.sgd(0.1)),
        optax.chain(optax.scale(1.0), gh.dynamic_loss_scale(optax.sgd(0.1))),
    ):
        with pytest.raises(ValueError, match=r"gh\.dynamic_loss_scale must wrap gh\.guard.*never backs off"):
            gh.guard(inner).init(params)
    gh.dynamic_loss_scale(gh.guard(optax.sgd(0.1))).init(params)  # the documented order


def test_loss_scale_reader_needs_exactly_one_state():
    with pytest.raises(ValueError, match="found no"):
        gh.loss_scale(optax.sgd(0.1).init({"w": jnp.zeros(2)}))
    two = optax.chain(gh.dynamic_loss_scale(optax.sgd(0.1)), gh.dynamic_loss_scale(optax.sgd(0.1)))
    with pytest.raises(ValueError, match="found 2"):
        gh.loss_scale(two.init({"w": jnp.zeros(2)}))


# ------------------------------------------------------------- trajectory vs torch


def test_scale_params_and_skips_match_torch_grad_scaler():
    """The same scripted run through torch.amp.GradScaler (CPU) and through
    dynamic_loss_scale(guard(sgd)): scale after every step, parameters, skip count."""
    torch = pytest.importorskip("torch")
    true_grads = np.random.default_rng(0).normal(size=(14, 3)).astype(np.float32)
    overflow_steps = {2, 3, 9}
    kw = dict(init_scale=1024.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=3)

    p_t = torch.nn.Parameter(torch.ones(3))
    opt_t = torch.optim.SGD([p_t], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", **kw)
    tx = gh.dynamic_loss_scale(gh.guard(optax.sgd(0.1), warmup_steps=100), min_scale=1.0, **kw)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    update = jax.jit(tx.update)

    for i, g in enumerate(true_grads):
        scaler.scale(torch.ones(()))  # GradScaler's lazy init; value unused
        scaled_t = torch.tensor(g) * scaler.get_scale()
        scaled_j = jnp.asarray(g) * gh.loss_scale(state)
        if i in overflow_steps:
            scaled_t[1] = math.inf
            scaled_j = scaled_j.at[1].set(jnp.inf)
        p_t.grad = scaled_t
        scaler.step(opt_t)
        scaler.update()
        updates, state = update({"w": scaled_j}, state, params)
        params = optax.apply_updates(params, updates)
        m = gh.metrics(state)
        assert float(m["grad/loss_scale"]) == scaler.get_scale(), i
        assert bool(m["grad/overflowed"]) == (i in overflow_steps)
        np.testing.assert_allclose(np.asarray(params["w"]), p_t.detach().numpy(), rtol=1e-6)

    m = gh.metrics(state)
    assert int(m["grad/num_overflows"]) == len(overflow_steps)
    assert int(m["grad/num_nonfinite"]) == 0  # overflows are counted apart
    assert int(m["grad/num_steps"]) == len(true_grads) - len(overflow_steps)  # the guard never saw them
    chex.assert_tree_all_finite(params)


def test_scale_written_out_with_bounds():
    """Growth and backoff with bounds, against the rule written out in Python."""
    kw = dict(init_scale=4.0, growth_factor=4.0, backoff_factor=0.25, growth_interval=2, min_scale=2.0, max_scale=32.0)
    tx = gh.dynamic_loss_scale(optax.sgd(1.0), **kw)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    pattern = [True, True, True, True, True, True, False, False, False, True]  # finite?
    scale, tracker = 4.0, 0
    for finite in pattern:
        g = jnp.ones(2) if finite else jnp.array([jnp.nan, 1.0])
        _, state = tx.update({"w": g}, state, params)
        overflow = (not finite) and scale > kw["min_scale"]
        if finite:
            tracker += 1
            if tracker == kw["growth_interval"]:
                scale, tracker = min(scale * kw["growth_factor"], kw["max_scale"]), 0
        else:
            tracker = 0
            if overflow:
                scale = max(scale * kw["backoff_factor"], kw["min_scale"])
        assert float(state.loss_scale) == scale
        assert bool(state.loss_scale_overflow) == overflow


# ------------------------------------------------- overflow leaves the inner alone


def _adam_guard_run():
    tx = gh.dynamic_loss_scale(gh.guard(optax.adam(1e-2), clip=1.0, warmup_steps=1), init_scale=256.0)
    params = {"w": jnp.arange(4.0), "b": jnp.ones(())}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(3):
        scale = gh.loss_scale(state)
        grads = jax.tree.map(lambda p, scale=scale: (0.1 * p + 0.05) * scale, params)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return tx, update, params, state


def test_overflow_skips_without_touching_inner_state_or_params():
    _, update, params, state = _adam_guard_run()
    before = state
    grads = {"w": jnp.array([1.0, jnp.inf, 2.0, 3.0]), "b": jnp.ones(())}
    updates, state = update(grads, state, params, loss=jnp.float32(0.5))
    for leaf in jax.tree.leaves(updates):
        assert np.all(np.asarray(leaf) == 0.0)
    chex.assert_trees_all_equal(state.loss_scale_inner_state, before.loss_scale_inner_state)
    assert bool(state.loss_scale_overflow)
    assert float(state.loss_scale) == float(before.loss_scale) / 2
    assert int(state.loss_scale_num_overflows) == 1
    chex.assert_trees_all_equal_shapes_and_dtypes(state, before)


def test_genuine_nonfinite_goes_to_the_guard_not_the_scale():
    _, update, params, state = _adam_guard_run()
    scale = float(state.loss_scale)
    adam_before = state.loss_scale_inner_state.guard_inner_state
    grads = {"w": jnp.array([1.0, jnp.nan, 2.0, 3.0]), "b": jnp.ones(())}
    updates, state = update(grads, state, params, loss=jnp.float32(jnp.nan))  # the loss itself is NaN
    m = gh.metrics(state)
    assert not bool(m["grad/overflowed"]) and float(m["grad/loss_scale"]) == scale
    assert int(m["grad/num_nonfinite"]) == 1 and bool(m["grad/skipped"])
    chex.assert_trees_all_equal(state.loss_scale_inner_state.guard_inner_state, adam_before)
    chex.assert_tree_all_finite(updates)


def test_an_unbounded_scale_stops_at_2_126_and_keeps_unscaling_exactly():
    """max_scale=inf, a growth every step: the scale doubles up to 2**126 and stays there
    (finite, its inverse a normal float32); each step unscales the true gradient. Past
    2**127 the float32 scale was inf (every step an overflow, for good), and above
    2**126 its inverse was flushed to 0 (every gradient unscaled to 0)."""
    tx = gh.dynamic_loss_scale(optax.sgd(1.0), init_scale=2.0**120, growth_interval=1, max_scale=math.inf)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    scales = []
    for _ in range(10):
        scale = gh.loss_scale(state)
        # The true gradient [1e-3, -2e-3] as the scaled loss gives it (scaled in float64).
        true = np.array([1e-3, -2e-3])
        updates, state = update({"w": jnp.asarray(true * float(scale), jnp.float32)}, state, params)
        np.testing.assert_allclose(np.asarray(updates["w"]), -true, rtol=1e-6)
        assert not bool(state.loss_scale_overflow)
        scales.append(float(gh.loss_scale(state)))
    assert scales == [2.0**121, 2.0**122, 2.0**123, 2.0**124, 2.0**125] + [2.0**126] * 5


def test_a_nonfinite_value_with_finite_gradients_is_a_fault_not_an_overflow():
    """`value=` (what optax's reduce_on_plateau reads) is judged by the guard as a loss
    is: a NaN one with finite gradients is the guard's non-finite step, not an fp16
    overflow (the scale does not back off, grad/num_overflows stays 0)."""
    tx = gh.dynamic_loss_scale(gh.guard(optax.sgd(0.1)), init_scale=1024.0)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.array([1024.0, 2048.0])}, state, params, value=jnp.float32(jnp.nan))
    m = gh.metrics(state)
    assert not bool(m["grad/overflowed"]) and int(m["grad/num_overflows"]) == 0
    assert float(m["grad/loss_scale"]) == 1024.0 and int(m["grad/num_nonfinite"]) == 1
    assert np.all(np.asarray(updates["w"]) == 0.0)


def test_a_genuine_fault_leaves_a_plain_inner_optimizers_state_alone():
    """Without a guard, a non-finite gradient that is not an overflow (at min_scale)
    keeps adam's moments as they were, as an overflow does: the next finite step's
    update is that of an adam that never saw the fault (it was NaN: the moments had
    taken the Inf)."""
    tx = gh.dynamic_loss_scale(optax.adam(0.1), init_scale=1.0, min_scale=1.0)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    good = {"w": jnp.array([0.5, -1.0])}
    faulty, state = update({"w": jnp.array([jnp.inf, 1.0])}, state, params)
    assert np.all(np.asarray(faulty["w"]) == 0.0) and not bool(state.loss_scale_overflow)
    updates, state = update(good, state, params)
    reference = optax.adam(0.1)
    expected, _ = reference.update(good, reference.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["w"]), np.asarray(expected["w"]), rtol=1e-6)


@pytest.mark.parametrize("inner", ["adam", "guard"])
def test_an_fp16_gradient_that_overflows_when_unscaled_never_reaches_the_optimizer(inner):
    """A scale below 1 (min_scale allows it): an fp16 scaled gradient of 30000 unscales
    (by 4) to 120000, beyond fp16's 65504: the gradient the optimizer would read is
    Inf. The finite flag was taken on the scaled gradients, so Adam's moments took the
    Inf (and every later update of that element was 0), and a guard with
    `check_updates=False` returned an Inf update while reporting the gradient finite.
    Now the step is skipped whole: zero updates, the state as it was."""
    params = {"w": jnp.zeros(2, jnp.float16)}
    wrapped = optax.adam(1e-3) if inner == "adam" else gh.guard(optax.adam(1e-3), check_updates=False)
    tx = gh.dynamic_loss_scale(wrapped, init_scale=0.25, min_scale=0.25)
    state = tx.init(params)
    update = jax.jit(tx.update)
    updates, state = update({"w": jnp.array([30000.0, 1e-3], jnp.float16)}, state, params)
    assert np.all(np.asarray(updates["w"]) == 0.0)
    adam_state = lambda s: s.loss_scale_inner_state if inner == "adam" else s.loss_scale_inner_state.guard_inner_state
    chex.assert_trees_all_equal(adam_state(state), adam_state(tx.init(params)))
    assert not bool(state.loss_scale_overflow)  # at min_scale: a fault, not an overflow
    if inner == "guard":
        m = gh.metrics(state)
        assert not bool(m["grad/finite"]) and int(m["grad/num_nonfinite"]) == 1
    # The next good step is Adam's first: -lr * sign(g) per element.
    updates, state = update({"w": jnp.array([0.25, -0.25], jnp.float16)}, state, params)
    np.testing.assert_allclose(np.asarray(updates["w"], np.float32), [-1e-3, 1e-3], rtol=1e-2)


@pytest.mark.parametrize("inner", ["adam", "guard"])
def test_an_fp16_gradient_too_large_for_fp16_is_a_fault_not_an_overflow(inner):
    """A true gradient of 1e5 in float16 under a scale of 2**-4: the scaled gradient
    (6250) is finite, the unscaled one is not. Backing the scale off cannot help (it
    makes the unscaled value larger), so it is a genuine fault: skipped, the scale kept,
    nothing counted in grad/num_overflows (it backed off to min_scale, a step at a
    time, skipping every step)."""
    params = {"w": jnp.zeros(2, jnp.float16)}
    wrapped = optax.adam(1e-3) if inner == "adam" else gh.guard(optax.adam(1e-3))
    tx = gh.dynamic_loss_scale(wrapped, init_scale=2.0**-4, min_scale=2.0**-10)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(3):
        updates, state = update({"w": jnp.array([1e5 * 2.0**-4, 1.0], jnp.float16)}, state, params)
        assert np.all(np.asarray(updates["w"]) == 0.0)
    assert float(state.loss_scale) == 2.0**-4 and int(state.loss_scale_num_overflows) == 0
    if inner == "guard":
        assert int(gh.metrics(state)["grad/num_nonfinite"]) == 3
    # A scaled gradient that is not finite is still an overflow, and backs the scale off.
    _, state = update({"w": jnp.array([jnp.inf, 1.0], jnp.float16)}, state, params)
    assert bool(state.loss_scale_overflow) and float(state.loss_scale) == 2.0**-5


def test_a_small_fp16_gradient_keeps_its_norm_when_unscaled():
    """Unscaled by 2**-16 and rounded to float16, a gradient of 2e-8 per element is 0: the
    guard's norm (and its spike window and vanishing flag) read 0. The norm is taken on
    the float32 product when the factor is 1 or less; the reference: numpy float64."""
    true = np.full(1000, 2e-8)
    tx = gh.dynamic_loss_scale(gh.guard(optax.sgd(0.1)), init_scale=2.0**16)
    params = {"w": jnp.zeros(1000, jnp.float16)}
    scaled = {"w": jnp.asarray(true * 2.0**16, jnp.float16)}
    _, state = jax.jit(tx.update)(scaled, tx.init(params), params)
    want = np.linalg.norm(np.asarray(scaled["w"], np.float64) * 2.0**-16)
    np.testing.assert_allclose(float(gh.metrics(state)["grad/norm"]), want, rtol=1e-5)


def test_nonfinite_at_min_scale_is_not_an_overflow_and_updates_stay_finite():
    tx = gh.dynamic_loss_scale(optax.sgd(1.0), init_scale=2.0, min_scale=2.0)
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.array([jnp.inf, 0.0, 1.0])}, state, params)
    assert not bool(state.loss_scale_overflow) and float(state.loss_scale) == 2.0
    assert np.all(np.asarray(updates["w"]) == 0.0)  # a bare inner is still protected


# --------------------------------------------- unscaled before any statistic or clip


def test_guard_sees_true_gradients_and_clips_at_true_threshold():
    rng = np.random.default_rng(1)
    g = rng.normal(size=(5, 3)).astype(np.float32)
    true_norm = float(np.linalg.norm(g.astype(np.float64)))
    threshold = 0.5 * true_norm
    tx = gh.dynamic_loss_scale(gh.guard(optax.sgd(1.0), clip=threshold), init_scale=4096.0)
    params = {"k": jnp.zeros((5, 3))}
    state = tx.init(params)
    updates, state = tx.update({"k": jnp.asarray(g) * 4096.0}, state, params)
    m = gh.metrics(state)
    np.testing.assert_allclose(float(m["grad/norm"]), true_norm, rtol=1e-6)
    np.testing.assert_allclose(float(m["grad/leaf_norm/k"]), true_norm, rtol=1e-6)
    np.testing.assert_allclose(float(m["grad/norm_clipped"]), threshold, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(updates["k"]), -g.astype(np.float64) * threshold / true_norm, rtol=1e-5)


@pytest.mark.parametrize("value", [1e-4, 1000.0])
def test_fp16_gradients_small_and_large_give_true_norms(value):
    """fp16 grads of 1e-4 (squares underflow in fp16) and 1000 (squares overflow in fp16)."""
    n = 4096
    rng = np.random.default_rng(2)
    g = (value * (1.0 + 0.1 * rng.random(n))).astype(np.float16)
    scale = 2.0**14 if value < 1 else 32.0  # keep the scaled values inside fp16's range
    tx = gh.dynamic_loss_scale(gh.guard(optax.sgd(1.0)), init_scale=scale)
    params = {"w": jnp.zeros(n, jnp.float16)}
    state = tx.init(params)
    scaled = (jnp.asarray(g, jnp.float32) * scale).astype(jnp.float16)
    assert bool(jnp.all(jnp.isfinite(scaled)))
    updates, state = jax.jit(tx.update)({"w": scaled}, state, params)
    m = gh.metrics(state)
    expected = float(np.linalg.norm(g.astype(np.float64)))
    np.testing.assert_allclose(float(m["grad/norm"]), expected, rtol=2e-3)  # fp16 rounding of g * scale / scale
    assert not bool(m["grad/overflowed"]) and updates["w"].dtype == jnp.float16
    assert int(m["grad/num_skipped"]) == 0


def test_fp16_overflow_from_scaling_is_caught():
    g = jnp.full((8,), 1000.0, jnp.float16)
    tx = gh.dynamic_loss_scale(gh.guard(optax.sgd(1.0)), init_scale=128.0)  # 128000 > fp16 max
    params = {"w": jnp.zeros(8, jnp.float16)}
    state = tx.init(params)
    scaled = (g.astype(jnp.float32) * 128.0).astype(jnp.float16)
    updates, state = tx.update({"w": scaled}, state, params)
    assert bool(state.loss_scale_overflow) and float(state.loss_scale) == 64.0
    assert np.all(np.asarray(updates["w"]) == 0)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_params_keep_structure_dtype_in_scan(dtype):
    # Not Adam: with fp16 moments its second moment underflows to 0 and eps=1e-8 is 0 in
    # fp16, so Adam divides by zero whatever the loss scale (keep fp32 master weights).
    tx = gh.dynamic_loss_scale(gh.guard(optax.sgd(1e-2, momentum=0.9), clip=1.0), init_scale=64.0, growth_interval=2)
    params = {"w": jnp.ones((3, 2), dtype), "b": jnp.zeros((2,), dtype)}
    state0 = tx.init(params)
    seq = jnp.asarray(np.random.default_rng(3).normal(size=(6, 3, 2)), jnp.float32)
    bad = jnp.zeros(6, jnp.bool_).at[2].set(True)

    def body(carry, xs):
        params, state = carry
        g, overflow = xs
        grads = {"w": (g * gh.loss_scale(state)).astype(dtype), "b": jnp.ones((2,), dtype)}
        grads["w"] = jnp.where(overflow, jnp.asarray(jnp.inf, dtype), grads["w"])
        updates, new_state = tx.update(grads, state, params)
        chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
        chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
        return (optax.apply_updates(params, updates), new_state), new_state.loss_scale

    (params, state), scales = jax.jit(lambda c: jax.lax.scan(body, c, (seq, bad)))((params, state0))
    chex.assert_tree_all_finite(params)
    assert int(state.loss_scale_num_overflows) == 1
    # 64 -> 64 -> 128 (2 finite) -> 64 (overflow) -> 64 -> 128 -> 128
    assert np.asarray(scales).tolist() == [64.0, 128.0, 64.0, 64.0, 128.0, 128.0]


def test_scale_loss_is_float32_and_reads_nested_states():
    from flax import nnx

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(2, 1, rngs=rngs)

    model = Tiny(nnx.Rngs(0))
    opt = nnx.Optimizer(model, gh.dynamic_loss_scale(gh.guard(optax.sgd(0.1)), init_scale=2.0**16), wrt=nnx.Param)
    assert float(gh.loss_scale(opt)) == 65536.0
    assert float(gh.loss_scale(opt.opt_state)) == 65536.0
    scaled = gh.scale_loss(jnp.float16(3.0), opt)
    assert scaled.dtype == jnp.float32 and float(scaled) == 3.0 * 65536.0
    nested = optax.MultiSteps(gh.dynamic_loss_scale(optax.sgd(0.1), init_scale=8.0), 3).init({"w": jnp.zeros(1)})
    assert float(gh.loss_scale(nested)) == 8.0


# ------------------------------------------------------------------ the example


def test_fp16_example_forces_overflows_and_follows_the_scale_rule():
    from tests.example_loader import load_example

    example = load_example("fp16_loss_scaling")
    steps, interval = 40, 8
    out = example.main(steps=steps, growth_interval=interval, verbose=False)
    hist, m = out["history"], out["metrics"]

    overflows = sum(hist["overflow"])
    assert overflows >= 3  # 2**24 is far too large for fp16 activations' gradients
    assert int(m["grad/num_overflows"]) == overflows
    assert int(m["grad/num_steps"]) == steps - overflows and int(m["grad/num_nonfinite"]) == 0
    # GradScaler's rule written out: x0.5 on overflow, x2 after `interval` finite steps.
    scale, good = 2.0**24, 0
    for overflow, recorded in zip(hist["overflow"], hist["loss_scale"]):
        if overflow:
            scale, good = scale * 0.5, 0
        else:
            good += 1
            if good == interval:
                scale, good = scale * 2.0, 0
        assert recorded == scale
    assert out["params_finite"]
    assert np.mean(hist["loss"][-8:]) < np.mean(hist["loss"][:8])


@pytest.mark.parametrize(
    "init_scale, min_scale, kinds",
    [
        # overflows, a NaN loss with finite gradients, and genuine faults: NaN gradients
        # with a NaN loss
        (8.0, 1.0, ["ok", "ok", "inf", "ok", "nan_loss", "ok", "nan", "ok", "inf", "inf", "nan", "ok"]),
        # at min_scale: every Inf gradient is a genuine fault, never an overflow
        (1.0, 1.0, ["ok", "inf", "ok", "inf", "inf", "ok"]),
    ],
    ids=["overflows_and_faults", "at_min_scale"],
)
def test_guard_fast_path_equals_the_general_path(init_scale, min_scale, kinds):
    """Directly around a guard the wrapper reuses the guard's finite flag; around any
    other state (here a one-link chain holding the same guard) it checks itself. A genuine
    fault (non-finite, not an overflow) reaches the guard on both paths, which skips and
    counts it: it was kept from the chained guard, which then never counted it."""
    runs = []
    for wrap in (lambda t: t, lambda t: optax.chain(t)):
        tx = gh.dynamic_loss_scale(
            wrap(gh.guard(optax.adam(1e-2), clip=0.5)), init_scale=init_scale, min_scale=min_scale, growth_interval=2
        )
        params = {"w": jnp.ones(4)}
        state = tx.init(params)
        update = jax.jit(tx.update)
        trace = []
        for i, kind in enumerate(kinds):
            g = jnp.asarray(np.random.default_rng(i).normal(size=4), jnp.float32) * gh.loss_scale(state)
            loss = jnp.float32(jnp.nan if kind in ("nan_loss", "nan") else 1.0)
            if kind == "inf":
                g = g.at[0].set(jnp.inf)
            if kind == "nan":
                g = g.at[1].set(jnp.nan)
            updates, state = update({"w": g}, state, params, loss=loss)
            params = optax.apply_updates(params, updates)
            trace.append(jax.device_get(gh.metrics(state)))
        runs.append((params, trace))
    chex.assert_trees_all_equal(runs[0][0], runs[1][0])
    chex.assert_tree_all_finite(runs[1][0])
    for a, b in zip(runs[0][1], runs[1][1]):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    last = runs[1][1][-1]
    overflows = kinds.count("inf") if init_scale > min_scale else 0
    faults = kinds.count("nan_loss") + kinds.count("nan") + (kinds.count("inf") - overflows)
    assert int(last["grad/num_overflows"]) == overflows and int(last["grad/num_nonfinite"]) == faults
    assert int(last["grad/num_skipped"]) == faults and int(last["grad/num_steps"]) == len(kinds) - overflows


@pytest.mark.parametrize("fault", ["nan_loss", "inf_at_min_scale"])
@pytest.mark.parametrize("accumulation", ["multisteps", "accumulate"])
def test_genuine_faults_reach_a_guard_inside_accumulation_and_raise_the_rollback(accumulation, fault):
    """dls(MultiSteps(guard, 2)), the order the docstring recommends, and
    dls(accumulate(guard, 2)): a genuine fault in a micro-batch (NaN gradients with a NaN
    loss, or an Inf gradient at min_scale) spoils its window, which the guard skips and
    counts at the window's end, whether the micro-batch is the window's first or last;
    the next window starts clean (MultiSteps' own reset, 0 * NaN, kept the NaN for
    good); and `rollback_after_nonfinite` spoiled windows in a row raise the rollback.
    The reference is dls(guard) fed one step per window (the window's mean, NaN when
    spoiled): the same counters, the same parameters. Before, the micro-batch was dropped
    and nothing counted it, and the rollback never came."""
    k, rollback_after, lr = 2, 3, 0.5
    scale_args = dict(init_scale=1.0, min_scale=1.0) if fault == "inf_at_min_scale" else dict(init_scale=4.0)
    bad_value = jnp.inf if fault == "inf_at_min_scale" else jnp.nan

    def guard():
        return gh.guard(optax.sgd(lr), rollback_after_nonfinite=rollback_after, reset_after=None)

    window = optax.MultiSteps(guard(), k) if accumulation == "multisteps" else gh.accumulate(guard(), k)
    tx = gh.dynamic_loss_scale(window, **scale_args)
    reference = gh.dynamic_loss_scale(guard(), **scale_args)
    rng = np.random.default_rng(0)
    # Windows: clean; spoiled first; spoiled last; clean; then spoiled for good.
    plan = [(0, 0), (1, 0), (0, 1), (0, 0)] + [(1, 1)] * rollback_after
    params = ref_params = {"w": jnp.ones(3)}
    state, ref_state = tx.init(params), reference.init(params)
    update, ref_update = jax.jit(tx.update), jax.jit(reference.update)
    for w, bad in enumerate(plan):
        micro = [rng.normal(size=3).astype(np.float32) for _ in range(k)]
        for g, is_bad in zip(micro, bad):
            grads = {"w": (jnp.full(3, bad_value) if is_bad else jnp.asarray(g)) * gh.loss_scale(state)}
            loss = jnp.float32(jnp.nan if is_bad and fault == "nan_loss" else 1.0)
            updates, state = update(grads, state, params, loss=loss)
            params = optax.apply_updates(params, updates)
        mean = np.full(3, np.nan if any(bad) else 0.0, np.float32) + np.mean(micro, axis=0)
        ref_grads = {"w": jnp.asarray(mean) * gh.loss_scale(ref_state)}
        ref_loss = jnp.float32(jnp.nan if any(bad) and fault == "nan_loss" else 1.0)  # a fault, not an overflow
        ref_updates, ref_state = ref_update(ref_grads, ref_state, ref_params, loss=ref_loss)
        ref_params = optax.apply_updates(ref_params, ref_updates)

        m, ref = gh.metrics(state), gh.metrics(ref_state)
        for name in ("grad/num_steps", "grad/num_nonfinite", "grad/num_skipped", "grad/consecutive_nonfinite"):
            assert int(m[name]) == int(ref[name]), (w, name)
        assert bool(m["grad/rollback_recommended"]) is bool(ref["grad/rollback_recommended"]), w
        assert bool(m["grad/rollback_recommended"]) is (w == len(plan) - 1), w
        assert int(m["grad/num_overflows"]) == 0
        np.testing.assert_allclose(np.asarray(params["w"]), np.asarray(ref_params["w"]), rtol=1e-6)
        chex.assert_tree_all_finite(params)
        inner = state.loss_scale_inner_state
        acc = inner.acc_grads if accumulation == "multisteps" else inner.accumulation_inner_state.acc_grads
        chex.assert_tree_all_finite(acc)  # emptied at the window's end, NaN or not
    assert int(gh.metrics(state)["grad/num_nonfinite"]) == 2 + rollback_after


@pytest.mark.parametrize("around_guard", [True, False])
def test_unscaled_gradients_are_never_materialised(around_guard):
    """Under donation the step holds no parameter-sized temporary: the unscale multiply is
    fused where the gradients are read (around a guard: in its statistics reduction and
    in its inner update, which both read them)."""
    # check_updates and update_health off: the check's flags and update health's squares
    # are temporaries of their own on XLA:CPU (test_guard_promises, test_update_health).
    inner = optax.adamw(1e-3)
    if around_guard:
        inner = gh.guard(inner, clip=1.0, check_updates=False, update_health=False)
    tx = gh.dynamic_loss_scale(inner)
    params = {"w": jnp.ones((256, 128), jnp.float32), "b": jnp.zeros((128,), jnp.float32)}

    def step(params, state, grads, loss):
        updates, state = tx.update(grads, state, params, loss=loss)
        return optax.apply_updates(params, updates), state

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params, jnp.float32(1)).compile()
    analysis = compiled.memory_analysis()
    assert analysis is not None
    assert analysis.temp_size_in_bytes < SCRATCH_BYTES, analysis.temp_size_in_bytes  # not one [256, 128] f32


def test_general_path_with_donation_copies_no_moment_and_skips_overflow_exactly():
    """Around a plain optimizer (not a guard) the wrapper selects the inner state where the
    update produces it: under donation XLA copies no moment, an overflow step keeps the
    state bit for bit, and applied steps follow adamw on the unscaled gradients."""
    tx = gh.dynamic_loss_scale(optax.adamw(1e-2), init_scale=4.0, growth_interval=1000)
    params = {"w": jnp.ones((16, 8), jnp.float32), "b": jnp.zeros((8,), jnp.float32)}

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    jitted = jax.jit(step, donate_argnums=(0, 1))
    hlo = jitted.lower(params, tx.init(params), params).compile().as_text()
    assert not [c for c in re.findall(r"(f32\[[\d,]*\])\{[\d,]*\} copy\(", hlo) if c in ("f32[16,8]", "f32[8]")]

    rng = np.random.default_rng(0)
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params) for _ in range(5)]
    reference = optax.adamw(1e-2)
    ref_params, ref_state = params, reference.init(params)
    state = tx.init(params)
    current = jax.tree.map(jnp.copy, params)
    for i, g in enumerate(grads):
        scaled = jax.tree.map(lambda x: x * 4.0, g)
        if i == 2:
            scaled = {"w": scaled["w"].at[3, 3].set(jnp.inf), "b": scaled["b"]}
        before = jax.tree.map(np.asarray, state.loss_scale_inner_state)
        current, state = jitted(current, state, scaled)
        if i == 2:  # overflow: inner state kept bit for bit, scale halved
            chex.assert_trees_all_equal(jax.tree.map(np.asarray, state.loss_scale_inner_state), before)
            assert float(state.loss_scale) == 2.0
        else:
            updates, ref_state = reference.update(g, ref_state, ref_params)
            ref_params = optax.apply_updates(ref_params, updates)
        state = state._replace(loss_scale=jnp.float32(4.0))  # the data stays scaled by 4
    chex.assert_trees_all_close(current, ref_params, rtol=1e-5, atol=1e-6)


# --- Tests added from mutation testing (tools/mutation.py _loss_scale; docs/testing.md) --


@pytest.mark.parametrize("x64", [False, True], ids=["x32", "x64"])
def test_scale_loss_dtype_is_the_loss_dtype_widened_to_float32(x64):
    with jax.enable_x64(x64):
        state = gh.dynamic_loss_scale(optax.sgd(0.1), init_scale=1024.0).init({"w": jnp.zeros(2)})
        dtypes = [jnp.float16, jnp.bfloat16, jnp.float32] + ([jnp.float64] if x64 else [])
        for dtype in dtypes:
            scaled = gh.scale_loss(jnp.asarray(1.5, dtype), state)
            assert scaled.dtype == (jnp.float64 if dtype == jnp.float64 else jnp.float32), dtype
            assert float(scaled) == 1.5 * 1024.0


def test_loss_scale_is_found_inside_dicts_lists_and_tuples():
    state = gh.dynamic_loss_scale(optax.sgd(0.1), init_scale=32.0).init({"w": jnp.zeros(2)})
    for nested in ({"opt": state}, [None, state], ({"a": [state]},)):
        assert float(gh.loss_scale(nested)) == 32.0
    with pytest.raises(ValueError, match=r"found 2 .* state\(s\) in the optimizer state; expected exactly one\. Build"):
        gh.loss_scale({"opt": [state, state]})


@pytest.mark.parametrize("around_guard", [True, False], ids=["guard", "general"])
@pytest.mark.parametrize("x64", [False, True], ids=["x32", "x64"])
def test_state_dtypes_are_fixed_through_a_scan(around_guard, x64):
    """The scale is a float32 (not weak-typed) scalar and the counters int32, at init and
    after every update, also with 64-bit mode on: a lax.scan over steps carries the state
    unchanged in type."""
    with jax.enable_x64(x64):
        inner = gh.guard(optax.sgd(0.1)) if around_guard else optax.sgd(0.1)
        tx = gh.dynamic_loss_scale(inner, init_scale=8.0, growth_interval=2)
        params = {"w": jnp.ones(3, jnp.float32)}
        state0 = tx.init(params)
        assert state0.loss_scale.dtype == jnp.float32 and not state0.loss_scale.weak_type
        assert state0.loss_scale_num_overflows.dtype == jnp.int32
        assert state0.loss_scale_growth_tracker.dtype == jnp.int32
        grads = jnp.asarray([[1.0, 2.0, 3.0], [jnp.inf, 0.0, 0.0], [1.0, 1.0, 1.0]], jnp.float32)

        def body(state, g):
            updates, state = tx.update({"w": g * gh.loss_scale(state)}, state, params)
            return state, updates["w"]

        state, updates = jax.lax.scan(body, state0, grads)
        assert jax.tree.structure(state) == jax.tree.structure(state0)
        types = lambda tree: [(x.dtype, x.weak_type) for x in jax.tree.leaves(tree)]
        assert types(state) == types(state0)
        assert updates.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(updates[0]), -0.1 * np.array([1.0, 2.0, 3.0], np.float32))
        assert int(state.loss_scale_num_overflows) == 1 and float(state.loss_scale) == 4.0


def test_guard_path_nonfinite_at_min_scale_is_a_fault_not_an_overflow():
    tx = gh.dynamic_loss_scale(gh.guard(optax.sgd(1.0)), init_scale=1.0)  # the default min_scale, 1
    params = {"w": jnp.zeros(3)}
    updates, state = tx.update({"w": jnp.array([jnp.inf, 0.0, 1.0])}, tx.init(params), params)
    m = gh.metrics(state)
    assert not bool(m["grad/overflowed"]) and int(m["grad/num_nonfinite"]) == 1 and bool(m["grad/skipped"])
    assert float(m["grad/loss_scale"]) == 1.0
    assert np.all(np.asarray(updates["w"]) == 0.0)


def test_default_growth_interval_is_torchs_2000_finite_steps():
    tx = gh.dynamic_loss_scale(optax.sgd(0.0), init_scale=2.0)
    params = {"w": jnp.zeros(2)}

    def body(state, _):
        _, state = tx.update({"w": jnp.ones(2)}, state, params)
        return state, state.loss_scale

    _, scales = jax.jit(lambda s: jax.lax.scan(body, s, None, length=2001))(tx.init(params))
    scales = np.asarray(scales)
    assert scales[1998] == 2.0 and scales[1999] == 4.0 and scales[2000] == 4.0  # grows after the 2000th


@pytest.mark.parametrize("form", ["object", "gradient_transformation"])
def test_loss_and_value_reach_a_guard_inside_optax_multisteps(form):
    """dls(optax.MultiSteps(guard, k)), the order the docs recommend: MultiSteps is a plain
    GradientTransformation whose update takes **extra_args and hands them to the guard;
    they are passed through, not dropped (before, a NaN loss was applied and counted
    nowhere, and a reduce_on_plateau inside failed for want of `value`)."""
    k, lr = 3, 0.1

    def windowed(inner):
        ms = optax.MultiSteps(inner, k)
        return ms if form == "object" else ms.gradient_transformation()

    tx = gh.dynamic_loss_scale(windowed(gh.guard(optax.sgd(lr))), init_scale=1.0)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    micro = np.random.default_rng(3).normal(size=(2 * k, 2)).astype(np.float32)
    for i, g in enumerate(micro):  # NaN loss on the first window's last micro-batch
        updates, state = jax.jit(tx.update)(
            {"w": jnp.asarray(g)}, state, params, loss=jnp.float32(np.nan if i == k - 1 else 1.0)
        )
        params = optax.apply_updates(params, updates)
        if i == k - 1:
            np.testing.assert_array_equal(np.asarray(params["w"]), [0.0, 0.0])
    m = gh.metrics(state)
    assert int(m["grad/num_nonfinite"]) == 1 and int(m["grad/num_skipped"]) == 1
    np.testing.assert_allclose(np.asarray(params["w"]), -lr * micro[k:].astype(np.float64).mean(0), rtol=1e-6)

    plateau = gh.dynamic_loss_scale(
        windowed(optax.chain(gh.guard(optax.sgd(lr)), optax.contrib.reduce_on_plateau())), init_scale=1.0
    )
    state = plateau.init(params)
    for _ in range(k):
        _, state = plateau.update({"w": jnp.ones(2)}, state, params, value=jnp.float32(2.0))
    best = jax.tree.leaves(optax.tree.get(state, "best_value"))[0]
    assert float(best) == 2.0  # the value reached reduce_on_plateau


@pytest.mark.parametrize("chained", [False, True], ids=["guard", "chain(guard)"])
def test_a_nonfinite_update_element_is_zeroed_around_a_guard_without_its_update_check(chained):
    """guard(check_updates=False) lets an inner update's NaN through; dynamic_loss_scale
    zeroes such elements on both its paths (the guard itself, and a chain holding one).
    Before, the fast path (the guard itself) returned the NaN."""
    nan_maker = optax.stateless(lambda u, p: jax.tree.map(lambda x: jnp.log(x - 2.0), u))  # NaN where g < 2
    guard = gh.guard(nan_maker, check_updates=False)
    tx = gh.dynamic_loss_scale(optax.chain(guard) if chained else guard, init_scale=1.0)
    params = {"w": jnp.zeros(3)}
    g = np.array([1.0, 5.0, 3.5], np.float32)
    updates, _ = jax.jit(tx.update)({"w": jnp.asarray(g)}, tx.init(params), params)
    with np.errstate(invalid="ignore"):
        expected = np.log(g.astype(np.float64) - 2.0)
    expected[~np.isfinite(expected)] = 0.0
    np.testing.assert_allclose(np.asarray(updates["w"]), expected, rtol=1e-6)
