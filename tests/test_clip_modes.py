"""Value, per-layer and unit-wise adaptive clipping: updates against independent references
(optax, numpy float64), recorded figures against numpy counts, use inside gh.guard."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gradhealth as gh


def _tree(rng, dtype=np.float32, scale=1.0):
    return {
        "dense": {
            "kernel": (scale * rng.normal(size=(6, 4))).astype(dtype),
            "bias": (scale * rng.normal(size=4)).astype(dtype),
        },
        "conv": {"kernel": (scale * rng.normal(size=(3, 3, 2, 5))).astype(dtype)},
        "head": (scale * rng.normal(size=(4, 3, 2))).astype(dtype),
        "scalar": np.asarray(scale * rng.normal(), dtype),
        "row": (scale * rng.normal(size=(1, 7))).astype(dtype),
    }


# --------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_bad_thresholds_raise_when_built(bad):
    for make, name in [
        (gh.clip_by_value, "max_abs"),
        (gh.clip_by_leaf_norm, "max_norm"),
        (gh.adaptive_grad_clip, "clipping"),
    ]:
        with pytest.raises(ValueError, match=name):
            make(bad)
    with pytest.raises(ValueError, match="eps"):
        gh.adaptive_grad_clip(0.01, eps=bad)


def test_bad_types_raise_when_built():
    with pytest.raises(TypeError, match="max_abs"):
        gh.clip_by_value(True)
    with pytest.raises(TypeError, match="max_norm"):
        gh.clip_by_leaf_norm("1.0")


@pytest.mark.parametrize(
    "build, name, value",
    [
        (gh.clip_by_value, "max_abs", jnp.float32(1.0)),
        (gh.clip_by_leaf_norm, "max_norm", jnp.float32(1.0)),
        (gh.adaptive_grad_clip, "clipping", jnp.float32(0.01)),
        (gh.adaptive_grad_clip, "eps", jnp.float32(1e-3)),
        (gh.adagc_clip, "relative", jnp.float32(1.05)),
        (gh.adagc_clip, "stats_decay", jnp.float32(0.98)),
        (gh.adagc_clip, "warmup_steps", jnp.int32(10)),
        (gh.adagc_clip, "warmup_max_norm", jnp.float32(1.0)),
    ],
)
def test_type_hints_admit_the_scalar_arrays_each_mode_takes(build, name, value):
    """Each of these takes a jax scalar (optax.inject_hyperparams); the hints said
    `float` / `int`, so type checkers flagged correct code."""
    import typing

    build(**{name: value})  # accepted
    hint = typing.get_type_hints(build)[name]
    assert jax.Array in typing.get_args(hint), hint


# ------------------------------------------------------------------------- value


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_clip_by_value_matches_optax_and_counts(dtype):
    grads = jax.tree.map(jnp.asarray, _tree(np.random.default_rng(0), dtype, scale=2.0))
    tx = gh.clip_by_value(1.5)
    updates, state = jax.jit(tx.update)(grads, tx.init(grads))
    expected, _ = optax.clip(1.5).update(grads, optax.clip(1.5).init(grads))
    chex.assert_trees_all_equal(updates, expected)
    flat = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(grads)])
    count = int(np.sum(np.abs(flat) > np.float64(np.asarray(1.5, dtype))))
    assert count > 0
    m = gh.metrics(state)
    assert int(m["grad/num_value_clipped"]) == count
    np.testing.assert_allclose(float(m["grad/value_clip_fraction"]), count / flat.size, rtol=1e-6)


def test_clip_by_value_rejects_complex_leaves_by_name():
    tx = gh.clip_by_value(1.0)
    with pytest.raises(ValueError, match=r"'c'.*complex"):
        tx.update({"c": jnp.array([2 + 2j]), "r": jnp.ones(2)}, tx.init(None))


def test_clip_by_value_passes_nan_through_uncounted():
    tx = gh.clip_by_value(1.0)
    updates, state = tx.update({"w": jnp.array([jnp.nan, 5.0, -0.5, 1.0])}, tx.init(None))
    got = np.asarray(updates["w"])
    assert np.isnan(got[0]) and got[1:].tolist() == [1.0, -0.5, 1.0]
    assert int(state.value_clip_count) == 1


# --------------------------------------------------------------------- per layer


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_clip_by_leaf_norm_against_numpy(dtype):
    # fp16 at scale 300: squares overflow fp16, the norms must still be right.
    grads = _tree(np.random.default_rng(1), dtype, scale=300.0 if dtype == np.float16 else 1.0)
    max_norm = 2000.0 if dtype == np.float16 else 2.0
    tx = gh.clip_by_leaf_norm(max_norm)
    jgrads = jax.tree.map(jnp.asarray, grads)
    updates, state = jax.jit(tx.update)(jgrads, tx.init(jgrads))

    clipped_names = set()
    ref_updates = {}
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        g64 = np.asarray(g, np.float64)
        norm = np.linalg.norm(g64.ravel())
        if norm > max_norm:
            clipped_names.add(gh.path_name(path))
        ref_updates[gh.path_name(path)] = g64 * min(1.0, max_norm / norm)
    assert 0 < len(clipped_names) < 6
    rtol = 2e-3 if dtype == np.float16 else 1e-6
    for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
        assert u.dtype == dtype
        np.testing.assert_allclose(np.asarray(u, np.float64), ref_updates[gh.path_name(path)], rtol=rtol, atol=1e-6)
    m = gh.metrics(state)
    got = {k.removeprefix("grad/leaf_clipped/") for k, v in m.items() if k.startswith("grad/leaf_clipped/") and v}
    assert got == clipped_names
    np.testing.assert_allclose(float(m["grad/leaf_clip_fraction"]), len(clipped_names) / 6, rtol=1e-6)


# --------------------------------------------------------------------------- AGC


def _agc_reference(grads, params, clipping, eps):
    """AGC in numpy float64, with the unit axes written out per shape."""
    axes_by_ndim = {2: (0,), 3: (0,), 4: (0, 1, 2), 5: (0, 1, 2, 3)}
    out, count, total = {}, 0, 0
    for (path, g), p in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(params)):
        g64, p64 = np.asarray(g, np.float64), np.asarray(p, np.float64)
        axes = tuple(range(g64.ndim)) if np.squeeze(g64).ndim <= 1 else axes_by_ndim[g64.ndim]
        g_norm = np.sqrt(np.sum(g64**2, axis=axes, keepdims=True))
        p_norm = np.sqrt(np.sum(p64**2, axis=axes, keepdims=True))
        bound = clipping * np.maximum(p_norm, eps)
        clip = g_norm >= bound
        count += int(np.sum(clip))
        total += g_norm.size
        out[gh.path_name(path)] = np.where(clip, g64 * bound / np.maximum(g_norm, 1e-6), g64)
    return out, count, total


def test_agc_equals_optax_and_counts_units():
    rng = np.random.default_rng(2)
    params = jax.tree.map(jnp.asarray, _tree(rng))
    grads = jax.tree.map(jnp.asarray, _tree(rng, scale=0.05))
    params["dense"]["bias"] = jnp.zeros(4)  # zero-initialised unit: eps floor applies
    tx = gh.adaptive_grad_clip(0.05, eps=1e-3)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    optax_tx = optax.adaptive_grad_clip(0.05, eps=1e-3)
    expected, _ = optax_tx.update(grads, optax_tx.init(params), params)
    chex.assert_trees_all_close(updates, expected, rtol=1e-6, atol=0)
    _, count, total = _agc_reference(grads, params, 0.05, 1e-3)
    assert 0 < count < total
    m = gh.metrics(state)
    assert int(m["grad/num_agc_clipped"]) == count
    np.testing.assert_allclose(float(m["grad/agc_clip_fraction"]), count / total, rtol=1e-6)


def test_agc_fp16_against_numpy():
    rng = np.random.default_rng(3)
    params = _tree(rng, np.float16, scale=10.0)
    grads = _tree(rng, np.float16, scale=300.0)  # squares overflow in fp16
    tx = gh.adaptive_grad_clip(0.5)
    updates, state = tx.update(jax.tree.map(jnp.asarray, grads), tx.init(params), jax.tree.map(jnp.asarray, params))
    ref, count, total = _agc_reference(grads, params, 0.5, 1e-3)
    for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
        assert u.dtype == jnp.float16
        np.testing.assert_allclose(np.asarray(u, np.float64), ref[gh.path_name(path)], rtol=2e-3, atol=1e-3)
    assert int(state.agc_clip_count) == count and count == total


def test_agc_needs_params():
    tx = gh.adaptive_grad_clip()
    with pytest.raises(ValueError, match="params"):
        tx.update({"w": jnp.ones(2)}, tx.init(None))


def test_agc_explicit_axis_and_unknown_rank():
    params = {"w": jnp.ones((2, 3, 4, 5, 6, 7))}
    tx = gh.adaptive_grad_clip(0.01)
    with pytest.raises(ValueError, match="axis"):
        tx.update(params, tx.init(params), params)
    tx = gh.adaptive_grad_clip(0.01, axis=(0, 1, 2, 3, 4))
    got, state = tx.update(params, tx.init(params), params)
    expected, _ = optax.adaptive_grad_clip(0.01, axis=(0, 1, 2, 3, 4)).update(params, None, params)
    chex.assert_trees_all_close(got, expected, rtol=1e-6)
    assert int(state.agc_clip_count) == 7


@pytest.mark.parametrize("axis", ["1", 1.5, True, (0, 0), (), [0, "a"]])
def test_agc_axis_of_the_wrong_kind_raises_when_built(axis):
    with pytest.raises(TypeError, match=r"`axis` must be None, an int or a non-empty tuple of distinct ints"):
        gh.adaptive_grad_clip(0.01, axis=axis)


@pytest.mark.parametrize("axis", [2, -3, 7, 2**40, (0, 2), (1, -1)])
def test_agc_axis_out_of_a_parameters_range_is_an_error_not_wrapped(axis):
    """An axis past the parameter's rank was taken modulo the rank (axis=7 on a matrix
    clipped along axis 1, silently); numpy and optax raise. (1, -1) names axis 1 twice."""
    params = {"w": jnp.ones((3, 4))}
    tx = gh.adaptive_grad_clip(0.01, axis=axis)
    with pytest.raises(ValueError, match=r"gh.adaptive_grad_clip: `axis` .* (out of bounds|names one axis twice)"):
        tx.update(params, tx.init(params), params)


def test_agc_float64_threshold_under_x64_keeps_the_parameters_dtype():
    """A float64 threshold under x64 made the clipped branch float64: lax.select failed
    with mixed dtypes deep inside the update."""
    with jax.enable_x64(True):
        for dtype in (jnp.float32, jnp.bfloat16):
            params = {"w": jnp.ones((3, 4), dtype)}
            grads = {"w": jnp.full((3, 4), 10.0, dtype)}
            for clipping in (np.float64(0.1), jnp.float64(0.1)):
                tx = gh.adaptive_grad_clip(clipping)
                got, _ = jax.jit(tx.update)(grads, tx.init(params), params)
                want, _ = optax.adaptive_grad_clip(0.1).update(grads, None, params)
                assert got["w"].dtype == dtype
                as_f32 = lambda x: np.asarray(x, np.float32)
                np.testing.assert_allclose(as_f32(got["w"]), as_f32(want["w"]), rtol=1e-2)


# --------------------------------------------------- as the guard's clipping step


def _modes():
    return [
        (gh.clip_by_value(0.5), "grad/num_value_clipped", optax.clip(0.5)),
        (gh.clip_by_leaf_norm(0.5), "grad/leaf_clip_fraction", None),
        (gh.adaptive_grad_clip(0.02), "grad/num_agc_clipped", optax.adaptive_grad_clip(0.02)),
    ]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_inside_guard_skipped_steps_leave_the_clip_alone(index):
    mode, metric, optax_mode = _modes()[index]
    rng = np.random.default_rng(4)
    params = jax.tree.map(jnp.asarray, _tree(rng))
    tx = gh.guard(optax.chain(mode, optax.sgd(1.0)), warmup_steps=100)
    state = tx.init(params)
    update = jax.jit(tx.update)
    grads = jax.tree.map(jnp.asarray, _tree(rng, scale=2.0))
    updates, state = update(grads, state, params)
    m = gh.metrics(state)
    assert float(m[metric]) > 0
    if optax_mode is not None:  # the guard changes nothing else: same updates as optax's clip + sgd
        ref_tx = optax.chain(optax_mode, optax.sgd(1.0))
        expected, _ = ref_tx.update(grads, ref_tx.init(params), params)
        chex.assert_trees_all_close(updates, expected, rtol=1e-6)
    before = state
    bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
    updates, state = update(bad, state, params)
    assert bool(gh.metrics(state)["grad/skipped"])
    chex.assert_trees_all_equal(state.guard_inner_state, before.guard_inner_state)
    chex.assert_tree_all_finite(updates)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, before)


def test_standalone_in_chain_with_every_mode_reports_all_metrics():
    rng = np.random.default_rng(5)
    params = jax.tree.map(jnp.asarray, _tree(rng))
    tx = optax.chain(gh.clip_by_value(2.0), gh.adaptive_grad_clip(0.05), gh.clip_by_leaf_norm(1.0), optax.adam(1e-3))
    state = tx.init(params)

    def body(carry, _):
        params, state = carry
        grads = jax.tree.map(lambda p: 3.0 * p + 0.1, params)
        updates, new_state = tx.update(grads, state, params)
        chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
        return (optax.apply_updates(params, updates), new_state), None

    (params, state), _ = jax.lax.scan(body, (params, state), None, length=3)
    names = set(gh.metrics(state))
    expected = {"grad/num_value_clipped", "grad/value_clip_fraction", "grad/num_agc_clipped", "grad/agc_clip_fraction"}
    assert expected <= names
    assert "grad/leaf_clip_fraction" in names and "grad/leaf_clipped/dense/kernel" in names
    assert set(gh.CATALOGUE) >= {"grad/num_value_clipped", "grad/agc_clip_fraction", "grad/leaf_clipped/<path>"}
    chex.assert_tree_all_finite(params)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("max_abs", [1.0, 0.3, 1e-3, 1e-35, 7e4])
def test_value_clip_count_is_exact_on_both_paths(dtype, max_abs):
    """The fast count (float32 row sums of sign(max(|x| - b, 0))) and the rare one (a
    comparison, a block of rows at a time) against numpy, on leaves whose row counts do
    not divide the block, magnitudes around the bound, NaN and +-Inf elements."""
    from optax_gradhealth._clip_modes import _count_above, _exact_count

    rng = np.random.default_rng(7)
    leaves = []
    with np.errstate(over="ignore"):  # 7e4 overflows float16 to inf: elements and bound
        for shape, scale in [((7,), 1.0), ((33, 5), 1e-34), ((4, 3, 9), 1e3), ((1,), 2.0), ((300, 17), max_abs)]:
            leaves.append(jnp.asarray(rng.standard_normal(shape) * scale, dtype))
        bound = np.float64(np.asarray(max_abs, dtype))

    def expected(xs):
        return sum(int(np.sum(np.abs(np.asarray(x, np.float64)) > bound)) for x in xs)

    assert int(jax.jit(lambda xs: _count_above(xs, max_abs))(leaves)) == expected(leaves)
    assert [int(_exact_count([x], max_abs)) for x in leaves] == [expected([x]) for x in leaves]
    bad = leaves[-1].at[5, 3].set(jnp.nan).at[200, 1].set(jnp.inf).at[299, 16].set(-jnp.inf)
    assert int(jax.jit(lambda xs: _count_above(xs, max_abs))([bad])) == expected([bad])
    assert int(_exact_count([bad], max_abs)) == expected([bad])


@pytest.mark.parametrize(
    "build",
    [
        lambda: optax.chain(gh.clip_by_value(1.0), optax.adam(1e-3)),
        # The update check's flags and update health's squares are temporaries of their
        # own on XLA:CPU (test_guard_promises, test_update_health): both off here.
        lambda: gh.guard(optax.adam(1e-3), clip=gh.clip_by_value(1.0), check_updates=False, update_health=False),
        lambda: gh.guard(optax.adam(1e-3), clip=gh.clip_by_leaf_norm(1.0), check_updates=False, update_health=False),
        lambda: gh.guard(optax.adam(1e-3), clip=gh.adaptive_grad_clip(0.01), check_updates=False, update_health=False),
    ],
    ids=["value", "guard-value", "guard-layer", "guard-agc"],
)
def test_clip_modes_add_no_gradient_sized_temporary(build):
    """Counting clipped elements with a comparison, or a clip mode reading the guard's
    scaled gradient, used to hold a temporary the size of all the gradients."""
    tx = build()
    params = {f"w{i}": jnp.ones((256, 128), jnp.float32) for i in range(6)}

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params).compile()
    analysis = compiled.memory_analysis()
    assert analysis is not None
    leaf_bytes = params["w0"].nbytes
    assert analysis.temp_size_in_bytes < leaf_bytes // 4, analysis.temp_size_in_bytes / leaf_bytes


# ----------------------------------------------------------------------------- AdaGC


def adagc_reference(steps, relative, decay, warmup, lam_abs):
    """AdaGC's rule written out in float64 over a list of {leaf: array} gradients:
    warm-up, a global clip and gamma = running min of the clipped norms; after, a clip
    per leaf at relative * gamma and gamma = EMA of the clipped norms. A non-finite
    step folds nothing; nor does an all-zero one (no warm-up step), nor a leaf's zero
    norm. A leaf's gamma is inf until its first non-zero norm: after the warm-up that
    norm is not clipped (its bound is inf) and becomes gamma. Returns the clipped
    gradients, gammas and clipped counts."""
    names = sorted(steps[0])
    gamma = {k: np.inf for k in names}
    count, out = 0, []
    for grads in steps:
        g = {k: np.asarray(v, np.float64) for k, v in grads.items()}
        n = {k: np.sqrt(np.sum(g[k] ** 2)) for k in names}
        total = np.sqrt(sum(n[k] ** 2 for k in names))
        warm = count >= max(warmup, 1)
        if warm:
            h = {k: min(relative * gamma[k] / n[k], 1.0) if n[k] > relative * gamma[k] else 1.0 for k in names}
        else:
            h = {k: min(lam_abs / total, 1.0) if total > 0 else 1.0 for k in names}
        clipped = {k: g[k] * h[k] for k in names}
        if np.isfinite(total) and total > 0:
            for k in names:
                hn = h[k] * n[k]
                if hn == 0:
                    continue
                if not warm or gamma[k] == np.inf:
                    gamma[k] = min(gamma[k], hn)
                else:
                    gamma[k] = decay * gamma[k] + (1 - decay) * hn
            count += 1
        out.append((clipped, dict(gamma), sum(h[k] < 1.0 for k in names)))
    return out


def _adagc_matches_reference(steps, relative, decay, warmup, lam_abs):
    """Runs ``gh.adagc_clip`` (jitted) over ``steps`` (dicts of float32 arrays) and checks
    every update and every gamma against :func:`adagc_reference`; returns the reference
    and the state after each step."""
    tx = gh.adagc_clip(relative=relative, stats_decay=decay, warmup_steps=warmup, warmup_max_norm=lam_abs)
    state = tx.init({k: jnp.zeros(v.shape) for k, v in steps[0].items()})
    update = jax.jit(tx.update)
    reference = adagc_reference(steps, relative, decay, warmup, lam_abs)
    states = []
    for t, (grads, (want, gamma, _)) in enumerate(zip(steps, reference)):
        updates, state = update({k: jnp.asarray(v) for k, v in grads.items()}, state)
        for k in grads:
            np.testing.assert_allclose(np.asarray(updates[k], np.float64), want[k], rtol=2e-5, err_msg=f"{t} {k}")
        np.testing.assert_allclose(
            np.asarray(state.adagc_norm_ema), [gamma[k] for k in sorted(grads)], rtol=2e-5, err_msg=str(t)
        )
        states.append(state)
    return reference, states


def test_adagc_clip_follows_the_rule_written_out():
    rng = np.random.default_rng(7)
    shapes = {"emb": (8, 4), "head": (4,), "mid": (3, 3)}
    steps = []
    for t in range(40):
        grads = {k: rng.normal(size=s).astype(np.float32) * (1.0 + 0.02 * t) for k, s in shapes.items()}
        if t == 25:
            grads["mid"] = grads["mid"] * 50.0  # a spike in one leaf only
        if t == 30:
            grads["head"][0] = np.nan  # folds nothing
        steps.append(grads)
    relative, decay, warmup, lam_abs = 1.05, 0.9, 10, 3.0
    reference, states = _adagc_matches_reference(steps, relative, decay, warmup, lam_abs)
    for t, ((_, _, clipped), state) in enumerate(zip(reference, states)):
        if t != 30:
            assert int(state.adagc_num_clipped) == clipped, t
    assert int(state.adagc_num_steps) == 39  # the NaN step was not folded
    # The rule was exercised: the warm-up's global clip (lam_abs below the norm), then
    # per-leaf clips, and the spike cut to a small fraction of its raw norm.
    assert all(clipped == 3 for _, _, clipped in reference[:warmup])
    spike_raw = np.linalg.norm(steps[25]["mid"])
    assert np.linalg.norm(reference[25][0]["mid"]) < 0.1 * spike_raw


def test_adagc_clip_folds_no_zero_norm():
    """One zero norm of a leaf during the warm-up (a LoRA factor whose partner starts at
    0) set its gamma, the running minimum, to 0 for good: every later update of the leaf
    was 0. An all-zero gradient did it to every leaf, and counted as a warm-up step. A
    leaf zero through the whole warm-up must not stay unclipped or Inf for good either:
    its first non-zero norm after it seeds gamma. Reference: the rule written out in
    float64, with zero norms left out."""
    rng = np.random.default_rng(11)
    shapes = {"a": (4,), "b": (3, 2), "late": (5,)}
    steps = []
    for t in range(30):
        grads = {k: (rng.normal(size=s) * (1.0 + 0.03 * t)).astype(np.float32) for k, s in shapes.items()}
        if t == 0:
            grads["a"][:] = 0.0  # zero on one warm-up step
        if t < 12:
            grads["late"][:] = 0.0  # zero through the warm-up (and two steps after it)
        if t == 3:
            grads = {k: np.zeros(s, np.float32) for k, s in shapes.items()}  # a fully masked batch
        if t in (15, 16):
            grads["b"][:] = 0.0  # zero after the warm-up: gamma kept
        if t == 20:
            grads["late"] = grads["late"] * 40.0  # a spike, clipped against the seeded gamma
        steps.append(grads)
    relative, decay, warmup, lam_abs = 1.05, 0.9, 8, 2.0
    reference, states = _adagc_matches_reference(steps, relative, decay, warmup, lam_abs)
    assert [int(state.adagc_num_clipped) for state in states] == [clipped for _, _, clipped in reference]
    assert int(states[-1].adagc_num_steps) == 29  # the all-zero step is no step
    # Every leaf still moves at the end; "late" was seeded and its spike was clipped.
    assert all(np.linalg.norm(reference[-1][0][k]) > 0 for k in shapes)
    assert all(np.isfinite(reference[-1][1][k]) and reference[-1][1][k] > 0 for k in shapes)
    assert np.linalg.norm(reference[20][0]["late"]) < 0.1 * np.linalg.norm(steps[20]["late"])


def test_adagc_clip_in_the_guard_survives_an_all_zero_batch_and_a_frozen_leaf():
    """Inside the guard: an all-zero gradient during the warm-up zeroed every later
    update of the run (nothing skipped, nothing reported). A leaf whose gradient is
    always zero keeps gamma = +inf, a sentinel the guard's update check accepts: no
    step is skipped. The moving leaf's updates are sgd's of the clipped gradient,
    with the rule written out in float64."""
    params = {"w": jnp.ones((3, 3)), "frozen": jnp.ones(2)}
    tx = gh.guard(optax.sgd(0.1), clip=gh.adagc_clip(warmup_steps=10, warmup_max_norm=100.0))
    state = tx.init(params)
    update = jax.jit(tx.update)
    rng = np.random.default_rng(0)
    steps = []
    for t in range(40):
        w = (rng.normal(size=(3, 3)) * 0.1 * (0.0 if t == 3 else 1.0)).astype(np.float32)
        steps.append({"frozen": np.zeros(2, np.float32), "w": w})
    reference = adagc_reference(steps, 1.05, 0.98, 10, 100.0)
    for t, (g, (want, _, _)) in enumerate(zip(steps, reference)):
        updates, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, params)
        np.testing.assert_allclose(np.asarray(updates["w"], np.float64), -0.1 * want["w"], rtol=2e-5, err_msg=str(t))
    assert np.linalg.norm(-0.1 * reference[-1][0]["w"]) > 0
    m = gh.metrics(state)
    assert int(m["grad/num_skipped"]) == 0 and int(m["grad/num_nonfinite_updates"]) == 0


def test_adagc_clip_inside_the_guard_sees_accepted_steps_only_and_survives_a_reset():
    params = {"a": jnp.zeros(3), "b": jnp.zeros(2)}
    tx = gh.guard(optax.sgd(1.0), clip=gh.adagc_clip(warmup_steps=2, warmup_max_norm=100.0), warmup_steps=3)
    state = tx.init(params)
    update = jax.jit(tx.update)
    grads = [{"a": jnp.ones(3) * (1.0 + 0.01 * t), "b": jnp.ones(2)} for t in range(6)]
    grads[4] = {"a": jnp.array([jnp.nan, 1.0, 1.0]), "b": jnp.ones(2)}
    for g in grads:
        _, state = update(g, state, params)

    def adagc(state):
        leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, gh.AdaGCState))
        return next(s for s in leaves if isinstance(s, gh.AdaGCState))

    assert int(adagc(state).adagc_num_steps) == 5  # the skipped NaN step never reached it
    assert bool(jnp.all(jnp.isfinite(adagc(state).adagc_norm_ema)))
    m = gh.metrics(state)
    assert {"grad/num_adagc_clipped", "grad/adagc_clip_fraction"} <= set(m)


def test_adagc_clip_rejects_bad_arguments_by_name():
    for kwargs, match in [
        ({"relative": 0.0}, "`relative`"),
        ({"stats_decay": 1.0}, "`stats_decay`"),
        ({"warmup_steps": -1}, "`warmup_steps`"),
        ({"warmup_max_norm": -2.0}, "`warmup_max_norm`"),
    ]:
        with pytest.raises(ValueError, match=match):
            gh.adagc_clip(**kwargs)
    tx = gh.adagc_clip()
    with pytest.raises(ValueError, match="2 leaves, the state was initialised for 1"):
        tx.update({"a": jnp.ones(2), "b": jnp.ones(2)}, tx.init({"a": jnp.ones(2)}))


_EVERY_MODE = {
    "value": lambda: gh.clip_by_value(1.0),
    "layer": lambda: gh.clip_by_leaf_norm(1.0),
    "agc": lambda: gh.adaptive_grad_clip(0.01),
    "adagc": lambda: gh.adagc_clip(warmup_steps=1),
}


@pytest.mark.parametrize("mode", list(_EVERY_MODE))
@pytest.mark.parametrize("leaf_dtype", ["float32", "float64"])
def test_under_x64_every_mode_runs_and_keeps_its_state_types(mode, leaf_dtype):
    """With jax_enable_x64 (float32 or float64 leaves), each clip mode runs standalone and
    inside the guard, and its state keeps its dtypes through a scan of steps: an int
    sum defaulting to int64, or a cond whose branches disagree, breaks both."""
    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        params = {"w": jnp.asarray(rng.normal(size=(6, 4)), leaf_dtype), "b": jnp.zeros(4, leaf_dtype)}
        grads = [
            jax.tree.map(lambda p, s=s: jnp.asarray(rng.normal(size=p.shape) * 3.0, p.dtype), params) for s in range(3)
        ]
        for tx in (_EVERY_MODE[mode](), gh.guard(optax.sgd(0.1), clip=_EVERY_MODE[mode]())):
            state = tx.init(params)
            before = [jnp.asarray(x).dtype for x in jax.tree.leaves(state)]

            def body(state, g, tx=tx):
                updates, state = tx.update(g, state, params)
                return state, updates

            state, updates = jax.jit(lambda s, gs, body=body: jax.lax.scan(body, s, gs))(
                state, jax.tree.map(lambda *xs: jnp.stack(xs), *grads)
            )
            assert [jnp.asarray(x).dtype for x in jax.tree.leaves(state)] == before
            assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_value_clip_counts_float64_elements_just_above_the_bound():
    """1 + 2**-40 is above the bound 1.0 in float64 (and clipped there) but rounds to 1.0
    in float32: the count must see it (counted in the leaf's dtype)."""
    with jax.enable_x64(True):
        x = jnp.asarray([1.0 + 2.0**-40, -(1.0 + 2.0**-40), 0.5, 1.0], jnp.float64)
        tx = gh.clip_by_value(1.0)
        updates, state = jax.jit(tx.update)({"w": x}, tx.init({"w": x}))
        np.testing.assert_array_equal(np.asarray(updates["w"]), [1.0, -1.0, 0.5, 1.0])
        assert int(gh.metrics(state)["grad/value_clip_count"]) == 2


def test_adagc_inside_the_guard_applies_steps_when_a_gradient_leaf_is_not_float():
    """A float0 gradient leaf (jax.grad(..., allow_int=True) on an integer parameter) has
    no norm: AdaGC records 0 for it, not its initial Inf, which the guard's update check
    would take for an overflow and skip every step. The float leaf's updates are those
    of the same run without the integer leaf."""
    params = {"w": jnp.asarray([1.0, -2.0, 3.0], jnp.float32), "idx": jnp.arange(2, dtype=jnp.int32)}
    grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2), allow_int=True)(params)
    assert grads["idx"].dtype == jax.dtypes.float0
    runs = {}
    for name, p, g, inner in [
        ("with int leaf", params, grads, optax.masked(optax.sgd(0.1), {"w": True, "idx": False})),
        ("float only", {"w": params["w"]}, {"w": grads["w"]}, optax.sgd(0.1)),
    ]:
        tx = gh.guard(inner, clip=gh.adagc_clip(warmup_steps=1))
        state = tx.init(p)
        steps = []
        for _ in range(3):
            updates, state = jax.jit(tx.update)(g, state, p)
            steps.append(np.asarray(updates["w"]))
        runs[name] = (steps, gh.metrics(state))
    for a, b in zip(runs["with int leaf"][0], runs["float only"][0]):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert np.all(runs["float only"][0][-1] != 0.0)
    m = runs["with int leaf"][1]
    assert int(m["grad/num_skipped"]) == 0 and int(m["grad/num_nonfinite_updates"]) == 0


# ------------------------------------------- tiny factors, norms beyond float32, edge leaves


def test_adagc_clip_keeps_its_two_factors_apart_where_their_product_underflows():
    """A norm 1e39 times the bound: clip_scale's factor sqrt(t/n) twice, which adagc
    multiplied back into one float32 subnormal (flushed to 0): the gradient was zeroed,
    gamma became 0, and every later step of the leaf was zeroed too. Reference: the AdaGC
    rule written out in float64."""
    lam, relative, decay = 1e-2, 1.05, 0.98
    tx = gh.adagc_clip(relative=relative, stats_decay=decay, warmup_steps=1, warmup_max_norm=lam)
    update = jax.jit(tx.update)
    g = np.array([1e37, 0.0])
    updates, state = update({"w": jnp.asarray(g, jnp.float32)}, tx.init({"w": jnp.zeros(2)}))
    h = lam / np.linalg.norm(g)  # warm-up: h = lambda_abs / N, gamma = min(inf, h * n)
    np.testing.assert_allclose(np.asarray(updates["w"], np.float64), g * h, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(state.adagc_norm_ema), [h * np.linalg.norm(g)], rtol=1e-6)
    gamma = float(h * np.linalg.norm(g))
    # After: 0.005 < relative * gamma, so h = 1: unchanged.
    small = np.array([0.003, 0.004])
    updates, state = update({"w": jnp.asarray(small, jnp.float32)}, state)
    np.testing.assert_array_equal(np.asarray(updates["w"]), small.astype(np.float32))
    gamma = decay * gamma + (1 - decay) * np.linalg.norm(small)
    np.testing.assert_allclose(np.asarray(state.adagc_norm_ema), [gamma], rtol=1e-6)
    # After the warm-up the per-leaf factor relative * gamma / n is tiny too (1e-41).
    huge = np.array([-1e36, 1e35])
    updates, state = update({"w": jnp.asarray(huge, jnp.float32)}, state)
    h = relative * gamma / np.linalg.norm(huge)
    np.testing.assert_allclose(np.asarray(updates["w"], np.float64), huge * h, rtol=1e-6)
    gamma = decay * gamma + (1 - decay) * h * np.linalg.norm(huge)
    np.testing.assert_allclose(np.asarray(state.adagc_norm_ema), [gamma], rtol=1e-6)
    assert int(state.adagc_num_clipped) == 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_leaf_norm_and_adagc_clip_a_leaf_norm_beyond_float32_to_the_threshold(dtype):
    """A leaf whose norm exceeds float32's max (saturated at 3.4e38) came out at norm
    1.763 (or 0, adagc) for a threshold of 1. Reference: x * threshold / |x| in float64
    for the huge leaf; the small leaf's own rule written out."""
    with jax.enable_x64(dtype == "float64"):
        huge = np.array([3e38, -3e38, 3e38, 1.0]) if dtype != "float64" else np.array([2e40, 1e39])
        small = np.array([0.3, 0.4])
        grads = {"huge": jnp.asarray(huge, dtype), "small": jnp.asarray(small, jnp.float32)}
        exact = np.asarray(grads["huge"], np.float64)
        rtol = 1e-2 if dtype == "bfloat16" else 1e-6

        tx = gh.clip_by_leaf_norm(1.0)
        updates, state = jax.jit(tx.update)(grads, tx.init(grads))
        np.testing.assert_allclose(
            np.asarray(updates["huge"], np.float64), exact / np.linalg.norm(exact), rtol=rtol, atol=1e-37
        )
        np.testing.assert_array_equal(np.asarray(updates["small"]), small.astype(np.float32))  # norm 0.5 < 1
        assert bool(state.leaf_clipped["huge"]) and not bool(state.leaf_clipped["small"])

        # AdaGC's warm-up: the global factor lambda_abs / N, N = |(huge, small)| > 3.4e38.
        lam = 1.0
        tx = gh.adagc_clip(warmup_steps=1, warmup_max_norm=lam)
        updates, state = jax.jit(tx.update)(grads, tx.init(grads))
        n = np.array([np.linalg.norm(exact), np.linalg.norm(small)])
        h = lam / np.linalg.norm(n)
        np.testing.assert_allclose(np.asarray(updates["huge"], np.float64), exact * h, rtol=rtol, atol=1e-37)
        np.testing.assert_allclose(np.asarray(state.adagc_norm_ema)[0], n[0] * h, rtol=1e-6)  # gamma of "huge"


@pytest.mark.parametrize("hyperparams", [False, True], ids=["float", "injected"])
def test_clip_by_value_on_leaves_of_size_zero(hyperparams):
    """A leaf of shape (3, 0) crashed the count (reshape(-1, 0)). Reference: optax.clip
    and a numpy count."""
    grads = {
        "w": jnp.array([-3.0, 0.5, 2.0]),
        "e30": jnp.zeros((3, 0)),
        "e0": jnp.zeros((0,)),
        "e03": jnp.zeros((0, 3)),
        "e204": jnp.zeros((2, 0, 4), jnp.bfloat16),
    }
    tx = optax.inject_hyperparams(gh.clip_by_value)(max_abs=1.0) if hyperparams else gh.clip_by_value(1.0)
    updates, state = jax.jit(tx.update)(grads, tx.init(grads))
    expected, _ = optax.clip(1.0).update(grads, optax.clip(1.0).init(grads))
    chex.assert_trees_all_equal(updates, expected)
    m = gh.metrics(state)
    assert int(m["grad/num_value_clipped"]) == int(np.sum(np.abs(np.asarray(grads["w"])) > 1.0)) == 2
    np.testing.assert_allclose(float(m["grad/value_clip_fraction"]), 2 / 3)


def test_clip_by_value_accepts_a_python_float_leaf():
    """A Python float leaf raised AttributeError outside jit (x.dtype). Reference:
    optax.clip, and the same call under jit (where the leaf is an array)."""
    grads = {"s": 2.0, "w": jnp.array([-3.0, 0.5])}
    tx = gh.clip_by_value(1.0)
    updates, state = tx.update(grads, tx.init(grads))
    jitted, jitted_state = jax.jit(tx.update)(grads, tx.init(grads))
    expected, _ = optax.clip(1.0).update(grads, optax.clip(1.0).init(grads))
    assert float(updates["s"]) == float(jitted["s"]) == float(expected["s"]) == 1.0
    np.testing.assert_array_equal(np.asarray(updates["w"]), np.asarray(expected["w"]))
    assert int(state.value_clip_count) == int(jitted_state.value_clip_count) == 2
