"""Every public transformation x every execution mode (docs/api_policy.md, DESIGN.md).

Each cell builds one transformation, runs ``STEPS`` updates on a tiny tree with finite
random gradients and checks the promises every transformation makes:

- the state after the updates has the tree structure, leaf shapes and leaf dtypes of
  the state ``init`` returned (compared on the flattened leaves: some states hold
  custom pytree nodes such as ``gh.LeafNorms``);
- the updates are finite and have the gradients' structure, shapes and dtypes;
- the update path never calls back to the host (no callback primitive in its jaxpr,
  eager and inside ``shard_map``) and, under ``jax.jit``, is traced once for all steps;
- the updates and the final state equal those of the same steps run eagerly (for
  ``pmap`` / ``shard_map``, with the same gradient on every device, on every device).

Modes: eager, ``jit``, ``lax.scan`` over the steps, ``pmap`` and ``shard_map`` over
the 8 emulated CPU devices (conftest.py; the state kept per device, ``P('data')``),
and ``jit`` under ``jax.enable_x64(True)``. ``gh.cross_device`` needs a mapped axis:
its cells exist for ``pmap`` and ``shard_map`` only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import optax_gradhealth as gh
from tests.backend import require_devices

K = 8
STEPS = 3
SHAPES = {"w": (4, 3), "b": (3,)}
RTOL = 1e-5
ATOL = 1e-7

require_devices(K, __file__)


# ----------------------------------------------------------------------------- the matrix


class Case(NamedTuple):
    build: Callable[[], optax.GradientTransformation]
    grad_scale: float = 1.0  # the gradients passed are the random ones times this (loss scaling)
    needs_axis: bool = False  # only inside pmap / shard_map
    reference: str | None = None  # the case whose eager run it must equal (None: itself)


def _guard(**kwargs):
    return lambda: gh.guard(optax.adam(1e-3), **kwargs)


CASES = {
    "guard": Case(_guard()),
    "guard_zscore_clip": Case(_guard(clip=gh.ZScoreClip())),
    "guard_percentile_clip": Case(_guard(clip=gh.PercentileClip())),
    "guard_spike_action_clip": Case(_guard(spike_action="clip")),
    "guard_reset_after_2": Case(_guard(reset_after=2)),
    "clip_by_global_norm": Case(lambda: gh.clip_by_global_norm(1.0)),
    "clip_by_value": Case(lambda: gh.clip_by_value(1.0)),
    "clip_by_leaf_norm": Case(lambda: gh.clip_by_leaf_norm(1.0)),
    "adaptive_grad_clip": Case(lambda: gh.adaptive_grad_clip(0.01)),
    "adagc_clip": Case(lambda: gh.adagc_clip()),
    "record_step_cosine": Case(lambda: optax.chain(gh.record_step_cosine(), optax.sgd(0.1))),
    # The gradients of a loss scaled by the initial scale (2**16): unscaled, they are the
    # random gradients exactly.
    "dynamic_loss_scale_guard": Case(lambda: gh.dynamic_loss_scale(gh.guard(optax.adam(1e-3))), 2.0**16),
    "dynamic_loss_scale_adam": Case(lambda: gh.dynamic_loss_scale(optax.adam(1e-3)), 2.0**16),
    "accumulate": Case(lambda: gh.accumulate(gh.guard(optax.adam(1e-3)), 2, micro_batch_size=4)),
    "record_micro_batch_norms": Case(
        lambda: optax.chain(
            gh.record_micro_batch_norms(2),
            optax.MultiSteps(gh.guard(optax.adam(1e-3), clip=1.0), 2).gradient_transformation(),
        )
    ),
    # Same gradient on every device: the mean is that gradient, and the guard behind it
    # must do what the guard alone does eagerly.
    "cross_device_guard": Case(
        lambda: optax.chain(gh.cross_device("data", per_device_batch=4), gh.guard(optax.adam(1e-3))),
        needs_axis=True,
        reference="guard",
    ),
}

MODES = ("eager", "jit", "scan", "pmap", "shard_map", "jit_x64")
MAPPED = ("pmap", "shard_map")

CELLS = [
    pytest.param(name, mode, id=f"{name}-{mode}")
    for name, case in CASES.items()
    for mode in MODES
    if mode in MAPPED or not case.needs_axis
]


# ----------------------------------------------------------------------------- inputs


def _params():
    rng = np.random.default_rng(0)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}


def _grads(scale):
    """STEPS finite random gradient trees (numpy float32), times ``scale``. Standard
    normal elements: a global norm of ~4 and elements above 1, so the clips at 1 clip."""
    rng = np.random.default_rng(1)
    return [
        {name: (rng.normal(size=shape) * scale).astype(np.float32) for name, shape in SHAPES.items()}
        for _ in range(STEPS)
    ]


def _on_device(tree):
    return jax.tree.map(jnp.asarray, tree)


def _replicate(tree):
    """One copy per device, stacked on a leading axis of K."""
    return jax.tree.map(lambda x: jnp.asarray(np.stack([x] * K)), tree)


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


# ----------------------------------------------------------------------------- runners
# Each returns (state after init, state after STEPS updates, [updates of each step]), on
# the host. In pmap / shard_map every leaf carries a leading axis of K (one per device).


def _primitives(jaxpr, found):
    """Every primitive's name in ``jaxpr`` and in the jaxprs nested in it (cond, scan, jit...)."""
    for eqn in jaxpr.eqns:
        found.add(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                if hasattr(sub, "eqns"):
                    _primitives(sub, found)
                elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    _primitives(sub.jaxpr, found)
    return found


def _assert_no_host_callback(fn, *args):
    """The update path never calls back to the host (pure_callback, io_callback,
    debug_callback, debug_print): checked on its jaxpr, since on CPU the device memory
    is the host's and ``jax.transfer_guard`` sees no transfer to forbid."""
    found = _primitives(jax.make_jaxpr(fn)(*args).jaxpr, set())
    assert not {p for p in found if "callback" in p or "print" in p}, f"host callbacks in the update: {sorted(found)}"


def _run_eager(tx, params, grads):
    params = _on_device(params)
    state0 = tx.init(params)
    _assert_no_host_callback(tx.update, _on_device(grads[0]), state0, params)
    state, updates = state0, []
    for g in grads:
        u, state = tx.update(_on_device(g), state, params)
        updates.append(u)
    return _host(state0), _host(state), _host(updates)


def _run_jit(tx, params, grads):
    traces = []

    def step(g, state, p):
        traces.append(None)
        return tx.update(g, state, p)

    init, step = jax.jit(tx.init), jax.jit(step)
    params = _on_device(params)
    state0 = init(params)
    state, updates = state0, []
    for g in grads:
        u, state = step(_on_device(g), state, params)
        updates.append(u)
    out = _host(state0), _host(state), _host(updates)
    assert len(traces) == 1, (
        f"jax.jit traced the update {len(traces)} times for {STEPS} steps: the state after an update is "
        "not of the type of the state after init (a weak_type or dtype change?)"
    )
    return out


def _run_scan(tx, params, grads):
    @jax.jit
    def run(p, grads_seq):
        state0 = tx.init(p)

        def body(state, g):
            u, state = tx.update(g, state, p)
            return state, u

        state, updates = jax.lax.scan(body, state0, grads_seq)
        return state0, state, updates

    grads_seq = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *grads)
    state0, state, updates = _host(run(_on_device(params), grads_seq))
    return state0, state, [jax.tree.map(lambda x, t=t: x[t], updates) for t in range(STEPS)]


def _mapped_steps(step, state0, params_k, grads):
    """``step`` (a mapped update) over the steps, each device given the same gradient:
    ``(state0, state, updates)`` on the host."""
    state, updates = state0, []
    for g in grads:
        u, state = step(_replicate(g), state, params_k)
        updates.append(u)
    return _host(state0), _host(state), _host(updates)


def _run_pmap(tx, params, grads):
    init = jax.pmap(tx.init, axis_name="data")
    step = jax.pmap(lambda g, state, p: tx.update(g, state, p), axis_name="data")
    params_k = _replicate(params)
    state0 = init(params_k)
    return _mapped_steps(step, state0, params_k, grads)


def _run_shard_map(tx, params, grads):
    mesh = jax.make_mesh((K,), ("data",), axis_types=(AxisType.Auto,))
    local = lambda tree: jax.tree.map(lambda x: x[0], tree)  # this device's block of 1
    stacked = lambda tree: jax.tree.map(lambda x: x[None], tree)

    def init_local(p):
        return stacked(tx.init(local(p)))

    def step_local(g, state, p):
        u, state = tx.update(local(g), local(state), local(p))
        return stacked(u), stacked(state)

    init = jax.jit(jax.shard_map(init_local, mesh=mesh, in_specs=P("data"), out_specs=P("data")))
    step = jax.jit(
        jax.shard_map(step_local, mesh=mesh, in_specs=(P("data"), P("data"), P("data")), out_specs=P("data"))
    )
    params_k = _replicate(params)
    state0 = init(params_k)
    _assert_no_host_callback(step, _replicate(grads[0]), state0, params_k)
    return _mapped_steps(step, state0, params_k, grads)


def _run_jit_x64(tx, params, grads):
    with jax.enable_x64(True):
        return _run_jit(tx, params, grads)


RUNNERS = {
    "eager": _run_eager,
    "jit": _run_jit,
    "scan": _run_scan,
    "pmap": _run_pmap,
    "shard_map": _run_shard_map,
    "jit_x64": _run_jit_x64,
}


@functools.cache
def _eager_reference(name):
    case = CASES[name]
    return _run_eager(case.build(), _params(), _grads(case.grad_scale))


# ----------------------------------------------------------------------------- checks


def _signature(tree):
    """The tree structure and each leaf's (shape, dtype), comparable with ==."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, [(np.shape(x), np.asarray(x).dtype) for x in leaves]


def _leaf_names(tree):
    return [jax.tree_util.keystr(path) for path, _ in jax.tree.leaves_with_path(tree)]


def _per_device(tree):
    """Drop the leading device axis (after checking every device holds the same)."""
    for path, x in jax.tree.leaves_with_path(tree):
        for k in range(1, K):
            np.testing.assert_array_equal(
                x[k], x[0], err_msg=f"device {k} differs from device 0 at {jax.tree_util.keystr(path)}"
            )
    return jax.tree.map(lambda x: x[0], tree)


def _assert_close(actual, expected, what):
    a_leaves, a_def = jax.tree.flatten_with_path(actual)
    e_leaves, e_def = jax.tree.flatten(expected)
    assert a_def == e_def, f"{what}: structure {a_def} != eager {e_def}"
    for (path, a), e in zip(a_leaves, e_leaves):
        where = f"{what}{jax.tree_util.keystr(path)}"
        a, e = np.asarray(a), np.asarray(e)
        assert (a.shape, a.dtype) == (e.shape, e.dtype), f"{where}: {a.shape} {a.dtype} != eager {e.shape} {e.dtype}"
        if np.issubdtype(e.dtype, np.inexact):
            np.testing.assert_allclose(a, e, rtol=RTOL, atol=ATOL, err_msg=where)
        else:
            np.testing.assert_array_equal(a, e, err_msg=where)


@pytest.mark.parametrize(("name", "mode"), CELLS)
def test_matrix(name, mode):
    case = CASES[name]
    params, grads = _params(), _grads(case.grad_scale)
    expected = _eager_reference(case.reference or name)
    if mode == "eager":  # the reference is this cell's own run (eager MultiSteps recompiles every step)
        state0, state, updates = expected
    else:
        state0, state, updates = RUNNERS[mode](case.build(), params, grads)

    # The state keeps the structure, shapes and dtypes of init's.
    (def0, sig0), (def1, sig1) = _signature(state0), _signature(state)
    assert def1 == def0, f"state structure changed by the updates:\n  init:  {def0}\n  after: {def1}"
    changed = [(leaf, a, b) for leaf, a, b in zip(_leaf_names(state0), sig0, sig1) if a != b]
    assert not changed, f"state leaves changed ((shape, dtype) at init, after): {changed}"

    if mode in MAPPED:
        state, updates = _per_device(state), [_per_device(u) for u in updates]

    # Finite updates with the gradients' structure, shapes and dtypes.
    for t, u in enumerate(updates):
        assert _signature(u) == _signature(grads[t]), f"step {t}: updates {_signature(u)} vs grads"
        for path, x in jax.tree.leaves_with_path(u):
            assert np.isfinite(x).all(), f"step {t}: non-finite update at {jax.tree_util.keystr(path)}: {x}"

    # The same numbers as the eager run (for cross_device: the guard behind it).
    _, e_state, e_updates = expected
    if case.reference is not None:
        state = state[1]
    for t, (u, e) in enumerate(zip(updates, e_updates)):
        _assert_close(u, e, f"updates of step {t}")
    _assert_close(state, e_state, "state")
