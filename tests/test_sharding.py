"""Sharded parameters in one program (GSPMD / Explicit sharding) on 8 emulated CPU devices
(conftest sets the XLA flag): a ``fsdp x tp`` mesh, leaves sharded on either dimension,
on both, and replicated.

References are numpy float64 computations of the formulas written out here, or, for the
whole optimizers, the same transformation run on one device.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_gradhealth as gh
from tests.backend import require_devices

K = 8

require_devices(K, __file__)

SPECS = {
    "dense": {"kernel": P("fsdp", "tp"), "bias": P("tp")},
    "emb": P(None, "fsdp"),  # sharded along its second dimension
    "head": P(("fsdp", "tp")),  # its rows over both axes
    "odd": P(),  # 9 rows: no even sharding
}
SHAPES = {"dense": {"kernel": (16, 12), "bias": (12,)}, "emb": (10, 8), "head": (8, 6), "odd": (9, 7)}
BIG_SHAPES = {"dense": {"kernel": (512, 384), "bias": (384,)}, "emb": (320, 256), "head": (256, 192), "odd": (9, 7)}


def _is_shape(x):
    return isinstance(x, tuple)


def _mesh(axis_type=None):
    """A 4 x 2 mesh; jax.make_mesh's own axis types (Explicit in jax 0.10) by default."""
    if axis_type is None:
        return jax.make_mesh((4, 2), ("fsdp", "tp"))
    return jax.make_mesh((4, 2), ("fsdp", "tp"), axis_types=(axis_type, axis_type))


def _arrays(rng, shapes=SHAPES, scale=1.0):
    return jax.tree.map(lambda s: (scale * rng.standard_normal(s)).astype(np.float32), shapes, is_leaf=_is_shape)


def _put(tree, mesh):
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), SPECS, is_leaf=lambda x: isinstance(x, P))
    return jax.tree.map(jax.device_put, tree, shardings)


def _put_one(tree, mesh):
    """On the one device of ``mesh``, sharded as the jitted step returns its outputs (one
    ``None`` per axis): the inputs of every step alike, so the step compiles once."""
    return jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P(*[None] * np.ndim(a)))), tree)


def _assert_sharded_as_specs(tree, mesh):
    def check(x, spec):
        assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim), (x.shape, x.sharding.spec, spec)

    jax.tree.map(check, tree, SPECS, is_leaf=lambda x: isinstance(x, P))


def _gradients(steps, nan_step=None, spike_step=None):
    rng = np.random.default_rng(1)
    out = []
    for t in range(steps):
        g = _arrays(rng, scale=0.3)
        if t == nan_step:
            g["emb"][3, 5] = np.nan
        if t == spike_step:
            g = jax.tree.map(lambda a: a * 100, g)
        out.append(g)
    return out


def test_the_default_mesh_is_explicit():
    """The premise of the tests below: jax.make_mesh's default axes are Explicit."""
    assert _mesh().axis_types == (AxisType.Explicit, AxisType.Explicit)


GUARD = lambda: gh.guard(optax.adamw(1e-2), clip=1.0, warmup_steps=2)


@pytest.mark.parametrize(
    "build",
    [
        GUARD,
        lambda: gh.guard(optax.sgd(1e-2), reset_after=None, check_updates=False, update_health=False),
        lambda: gh.dynamic_loss_scale(optax.adamw(1e-2)),
        lambda: gh.dynamic_loss_scale(GUARD()),
        lambda: gh.accumulate(GUARD(), 2, micro_batch_size=4),
        lambda: optax.MultiSteps(GUARD(), 2),
    ],
    ids=["guard", "guard-sgd", "dls-adamw", "dls-guard", "accumulate-guard", "multisteps-guard"],
)
def test_guarded_optimizers_on_an_explicit_mesh_equal_one_device(build):
    """Every transformation that selects state leaves (the guard's skip and reset, the
    loss scale's skip) ran on sharded parameters of an Explicit mesh: it used to fail
    (`select` of a replicated predicate against a sharded leaf). Jitted under
    jax.set_mesh, with a NaN step and a spike, it equals the 1-device run, and the
    parameters and moments keep their shardings."""
    mesh = _mesh()
    tx = build()
    params_np = _arrays(np.random.default_rng(0))
    grads = _gradients(8, nan_step=3, spike_step=6)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    def run(put, ctx):
        with ctx:
            params = put(params_np)
            state = jax.jit(tx.init)(params)
            f = jax.jit(step, donate_argnums=(0, 1))
            for g in grads:
                params, state = f(params, state, put(g))
            return params, state, gh.metrics(state)

    params, state, metrics = run(lambda t: _put(t, mesh), jax.set_mesh(mesh))
    one = jax.make_mesh((1,), ("one",))
    params1, state1, metrics1 = run(lambda t: _put_one(t, one), jax.set_mesh(one))
    _assert_sharded_as_specs(params, mesh)
    # Every state leaf shaped like the parameters (Adam's moments, accumulators) is sharded as they are.
    shard_of_shape = {s.shape: s.sharding.spec for s in jax.tree.leaves(params)}
    for x in jax.tree.leaves(state):
        if x.ndim and x.shape in shard_of_shape and x.size > 12:
            assert x.sharding.spec == shard_of_shape[x.shape], (x.shape, x.sharding.spec)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params1), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state1), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)
    assert metrics.keys() == metrics1.keys()
    for k in metrics:
        np.testing.assert_allclose(np.asarray(metrics[k]), np.asarray(metrics1[k]), rtol=2e-5, atol=1e-6, err_msg=k)


def test_guard_sgd_on_an_explicit_mesh_against_numpy():
    """guard(sgd, clip=1.0) on the Explicit mesh against the rule written out in float64:
    a non-finite step leaves the parameters as they are, the others take
    ``p - lr * g * min(1, 1 / |g|)``."""
    mesh = _mesh()
    lr = 0.1
    tx = gh.guard(optax.sgd(lr), clip=1.0, spike_threshold=None, reset_after=None)
    params_np = _arrays(np.random.default_rng(0))
    grads = _gradients(5, nan_step=2)
    want = jax.tree.map(lambda a: a.astype(np.float64), params_np)
    for g in grads:
        leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(g)]
        norm = np.sqrt(sum(np.sum(x**2) for x in leaves))
        if np.isfinite(norm):
            factor = lr * min(1.0, 1.0 / norm)
            want = jax.tree.map(lambda p, x, factor=factor: p - factor * np.asarray(x, np.float64), want, g)
    with jax.set_mesh(mesh):
        params = _put(params_np, mesh)
        state = tx.init(params)
        update = jax.jit(tx.update)
        for g in grads:
            updates, state = update(_put(g, mesh), state, params)
            params = optax.apply_updates(params, updates)
    _assert_sharded_as_specs(params, mesh)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=1e-5, atol=1e-6)
    assert int(gh.metrics(state)["grad/num_skipped"]) == 1


def _value_reference(grads, max_abs):
    """np.clip and the count of |g| > max_abs (NaN not counted), in float64."""
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
    with np.errstate(invalid="ignore"):
        count = sum(int(np.sum(np.abs(x) > max_abs)) for x in leaves)
    return jax.tree.map(lambda x: np.clip(np.asarray(x, np.float64), -max_abs, max_abs), grads), count


@pytest.mark.parametrize(
    "build",
    [
        lambda: gh.clip_by_value(0.2),
        lambda: optax.inject_hyperparams(gh.clip_by_value)(max_abs=0.2),
        lambda: gh.guard(optax.sgd(1.0), clip=gh.clip_by_value(0.2), spike_threshold=None, reset_after=None),
    ],
    ids=["value", "inject-value", "guard-value"],
)
@pytest.mark.parametrize("nan", [False, True], ids=["finite", "nan"])
def test_clip_by_value_on_an_explicit_mesh_against_numpy(build, nan):
    """clip_by_value used to fail on an Explicit mesh (a concatenation of row counts
    sharded differently; a dynamic slice of sharded rows on the exact count's path, the
    NaN step's and inject_hyperparams' path). Values and count against numpy."""
    mesh = _mesh()
    tx = build()
    grads = _gradients(1)[0]
    if nan:  # the standalone clip counts around a NaN; the guard skips the step
        grads["dense"]["kernel"][5, 7] = np.nan
    want, count = _value_reference(grads, 0.2)
    with jax.set_mesh(mesh):
        g = _put(grads, mesh)
        updates, state = jax.jit(tx.update)(g, tx.init(g), g)
    metrics = gh.metrics(state)
    guarded = "grad/skipped" in metrics
    if guarded and nan:  # the guard skips the step: no update, the clip's state as it was
        assert bool(metrics["grad/skipped"])
        assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
    else:
        assert int(metrics["grad/num_value_clipped"]) == count
        sign = -1.0 if guarded else 1.0  # sgd(1.0): the update is -g
        for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(sign * np.asarray(a, np.float64), b, rtol=1e-6)
    _assert_sharded_as_specs(updates, mesh)


def test_agc_on_an_explicit_mesh_against_numpy():
    """adaptive_grad_clip used to fail on an Explicit mesh (the broadcast of its per-unit
    predicate was not sharded as the gradient). Against the rule written out: each unit
    (column of a matrix, a whole vector) ``G * min(1, lam * max(|W|, eps) / |G|)``."""
    mesh = _mesh()
    lam, eps = 0.05, 1e-3
    params_np = _arrays(np.random.default_rng(0))
    grads = _gradients(1)[0]

    def ref(g, p):
        g, p = np.asarray(g, np.float64), np.asarray(p, np.float64)
        axes = (0,)  # a matrix's columns; a vector is one unit
        gn = np.sqrt(np.sum(g**2, axis=axes, keepdims=True))
        mx = lam * np.maximum(np.sqrt(np.sum(p**2, axis=axes, keepdims=True)), eps)
        return np.where(gn < mx, g, g * mx / np.maximum(gn, 1e-6)), int(np.sum(gn >= mx))

    pairs = [ref(g, p) for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params_np), strict=True)]
    tx = gh.adaptive_grad_clip(lam, eps)
    with jax.set_mesh(mesh):
        p, g = _put(params_np, mesh), _put(grads, mesh)
        updates, state = jax.jit(tx.update)(g, tx.init(p), p)
    for a, (b, _) in zip(jax.tree.leaves(updates), pairs, strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=2e-5, atol=1e-7)
    assert int(state.agc_clip_count) == sum(c for _, c in pairs)
    _assert_sharded_as_specs(updates, mesh)


_GATHER = re.compile(r"=\s*(\S+)\s+all-gather(?:-start)?\(")


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
@pytest.mark.parametrize(
    "build",
    [lambda: gh.clip_by_value(0.1), lambda: optax.inject_hyperparams(gh.clip_by_value)(max_abs=0.1)],
    ids=["value", "inject-value"],
)
def test_clip_by_value_gathers_no_sharded_leaf(build, axis_type):
    """The exact count (the NaN step's, and every step's under inject_hyperparams) sliced
    blocks of rows of each leaf: on rows sharded over the mesh (FSDP), the partitioner
    all-gathered whole leaves, and reserved ~3x the per-device gradient bytes. Its blocks
    are now strided rows, local to each device: no gather of a 2-D array, and a small
    temporary. The count on a NaN step stays exact (numpy)."""
    mesh = _mesh(axis_type)
    tx = build()
    rng = np.random.default_rng(3)
    grads_np = _arrays(rng, BIG_SHAPES, scale=0.3)
    grads_np["emb"][7, 9] = np.nan
    with jax.set_mesh(mesh):
        g = _put(grads_np, mesh)
        state = tx.init(g)
        compiled = jax.jit(tx.update).lower(g, state).compile()
        _, new_state = jax.jit(tx.update)(g, state)
    gathers = [m.group(1) for m in _GATHER.finditer(compiled.as_text()) if "," in m.group(1).split("{")[0]]
    assert gathers == []
    local = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(g))
    assert compiled.memory_analysis().temp_size_in_bytes < 0.25 * local
    count = int(gh.metrics(new_state)["grad/num_value_clipped"])
    assert count == _value_reference(grads_np, np.float32(0.1))[1]


@pytest.mark.parametrize("spec", [P("tp"), P("fsdp"), P(("fsdp", "tp"))], ids=str)
def test_leaf_norms_of_an_explicit_sharded_vector(spec):
    """LeafNorms.as_dict / as_tree / [name] of a vector sharded on an Explicit mesh used
    to fail (jax does not index it). Eager, under jax.set_mesh and jitted."""
    mesh = _mesh()
    n = {"P('tp')": 6, "P('fsdp')": 32}.get(str(spec), 40)
    names = [f"l{i:02d}" for i in range(n)]
    values = np.random.default_rng(0).random(n).astype(np.float32)
    norms = gh.LeafNorms(jax.device_put(values, NamedSharding(mesh, spec)), jax.tree.structure(dict.fromkeys(names, 0)))

    def check(as_dict, as_tree, item):
        assert list(as_dict) == names
        np.testing.assert_array_equal([float(v) for v in as_dict.values()], values)
        np.testing.assert_array_equal([float(as_tree[k]) for k in names], values)
        assert float(item) == values[3]

    check(norms.as_dict(), norms.as_tree(), norms["l03"])
    with jax.set_mesh(mesh):
        check(norms.as_dict(), norms.as_tree(), norms["l03"])
        check(*jax.jit(lambda ln: (ln.as_dict(), ln.as_tree(), ln["l03"]))(norms))
