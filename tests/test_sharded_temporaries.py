"""Sharded leaves on 8 emulated CPU devices (conftest sets the XLA flag): the hashes and the
count sketch of ``_sketch`` (step_replay's fingerprints, record_step_cosine, the
cross-device audit) computed where a leaf lies, on Auto and Explicit meshes, and
``gh.accumulate``'s temporaries against ``optax.MultiSteps``.

References are numpy computations of the formulas written out here (the flat,
row-major hash and sketch), never the code under test.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_gradhealth as gh
from optax_gradhealth import _sketch
from tests.backend import require_devices

K = 8

require_devices(K, __file__)

M32 = 0xFFFFFFFF


def _mesh(axis_type):
    return jax.make_mesh((4, 2), ("fsdp", "tp"), axis_types=(axis_type, axis_type))


def np_mix32(h):
    h = h.astype(np.uint64)
    h ^= h >> 16
    h = (h * 0x7FEB352D) & M32
    h ^= h >> 15
    h = (h * 0x846CA68B) & M32
    return h ^ (h >> 16)


def np_flat_bits(x):
    """The leaf's bits as one flat row-major uint32 vector (real parts, then imaginary)."""
    x = np.asarray(x)
    parts = (x.real, x.imag) if np.iscomplexobj(x) else (x,)
    out = []
    for part in parts:
        part = np.ascontiguousarray(part)
        if part.dtype == np.bool_:
            out.append(part.reshape(-1).astype(np.uint64))
        else:
            width = {4: np.uint32, 2: np.uint16, 1: np.uint8}[part.dtype.itemsize]
            out.append(part.view(width).reshape(-1).astype(np.uint64))
    return np.concatenate(out)


def np_fingerprint(x, salt):
    bits = np_flat_bits(x)
    position = np.arange(bits.size, dtype=np.uint64)
    hashed = np_mix32(bits ^ ((position * 0x9E3779B1 + salt) & M32))
    return int(np.sum(hashed) & M32)


def np_sketch(x, dim, salt, offset):
    """Element i of the flat leaf (imaginary parts after the real ones) into bucket
    ``(i // ceil(n / dim) + offset) mod dim``, with the sign of bit 31 of mix32(i ^ salt)."""
    x = np.asarray(x)
    flat = np.concatenate([x.real.reshape(-1), x.imag.reshape(-1)]) if np.iscomplexobj(x) else x.reshape(-1)
    flat = flat.astype(np.float64)
    n = flat.size
    rows = -(-n // dim)
    i = np.arange(n, dtype=np.uint64)
    sign = np_mix32(i ^ salt) >> 31
    out = np.zeros(dim)
    np.add.at(out, ((i // rows + offset) % dim).astype(np.int64), np.where(sign == 0, flat, -flat))
    return out


# (shape, spec, dtype): leaves split along a non-leading axis, along both axes, along a
# 3-D leaf's last two axes, 1-D, complex, and narrow dtypes.
LEAVES = [
    ((64, 48), P(None, "fsdp"), jnp.float32),
    ((32, 96), P("fsdp", "tp"), jnp.float32),
    ((8, 16, 24), P(None, "fsdp", "tp"), jnp.float32),
    ((96,), P("fsdp"), jnp.float32),
    ((64, 48), P("tp", "fsdp"), jnp.complex64),
    ((16, 12), P(None, "tp"), jnp.bfloat16),
    ((16, 12), P(None, "fsdp"), jnp.int8),
    ((16, 12), P(None, "tp"), jnp.bool_),
]
SALT = 0x12345678


def _leaf(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * 3
    if dtype == jnp.complex64:
        x = x + 1j * rng.normal(size=shape)
    if dtype == jnp.bool_:
        x = x > 0
    return np.asarray(jnp.asarray(x, dtype))


@pytest.mark.parametrize("where", ["one device", "auto", "explicit"])
def test_fingerprints_equal_the_flat_row_major_hash_wherever_the_leaf_lies(where):
    fingerprint = jax.jit(lambda x: _sketch.leaf_fingerprint(x, _sketch.u32(SALT)))
    for shape, spec, dtype in LEAVES:
        x = _leaf(shape, dtype)
        if where == "one device":
            got = fingerprint(jnp.asarray(x))
        else:
            mesh = _mesh(AxisType.Explicit if where == "explicit" else AxisType.Auto)
            with jax.set_mesh(mesh):
                got = fingerprint(jax.device_put(x, NamedSharding(mesh, spec)))
        assert int(got) == np_fingerprint(x, SALT), (where, shape, spec, dtype)


@pytest.mark.parametrize("where", ["one device", "explicit"])
@pytest.mark.parametrize("dim", [16, 64])
def test_sketches_equal_the_flat_count_sketch_wherever_the_leaf_lies(where, dim):
    sketch = jax.jit(lambda x: _sketch.leaf_sketch(x, dim, _sketch.u32(SALT), 5))
    for shape, spec, dtype in LEAVES:
        if dtype not in (jnp.float32, jnp.complex64):
            continue
        x = _leaf(shape, dtype)
        if where == "one device":
            got = sketch(jnp.asarray(x))
        else:
            mesh = _mesh(AxisType.Explicit)
            with jax.set_mesh(mesh):
                got = sketch(jax.device_put(x, NamedSharding(mesh, spec)))
        want = np_sketch(x, dim, SALT, 5)
        scale = np.sum(np.abs(x))
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=1e-6 * scale, err_msg=str(shape))


def _all_gathers(compiled_text):
    return re.findall(r"(\S+\[[\d,]+\])\S*\s+all-gather\(", compiled_text)


SPECS = {"kernel": P("fsdp", "tp"), "emb": P(None, "fsdp"), "head": P(None, "tp")}
SHAPES = {"kernel": (512, 384), "emb": (320, 256), "head": (256, 192)}


def _sharded_params(mesh, seed=0):
    rng = np.random.default_rng(seed)
    return {
        k: jax.device_put(rng.normal(size=SHAPES[k]).astype(np.float32), NamedSharding(mesh, SPECS[k])) for k in SHAPES
    }


def _on_one_device(tree):
    return jax.tree.map(lambda a: jax.device_put(np.asarray(a), jax.devices()[0]), tree)


def _loss(p, x):
    return sum(jnp.mean((a * x - 0.1) ** 2) for a in jax.tree.leaves(p))


def test_step_replay_gathers_no_leaf_on_an_auto_mesh():
    mesh = _mesh(AxisType.Auto)
    params = _sharded_params(mesh)
    tx = gh.guard(optax.sgd(0.1))
    replay = gh.step_replay(jax.value_and_grad(_loss), spike_threshold=None, spike_zscore=None)

    def step(p, s, r, x):
        (loss, g), r = replay(r, s, p, x)
        u, s = tx.update(g, s, p, loss=loss)
        return optax.apply_updates(p, u), s, r

    text = jax.jit(step).lower(params, tx.init(params), replay.init(), jnp.float32(1.0)).compile().as_text()
    assert _all_gathers(text) == []


def _replay_and_cosine_run(params, init):
    """Four guarded steps (healthy, NaN, two healthy) under step_replay and
    record_step_cosine: the parameters, the cosines and the replay's metrics. ``init``
    maps ``(tx.init, replay.init)`` and the parameters to the state, placed where the
    step's outputs lie, so the jitted step compiles once for the four steps."""
    tx = gh.guard(optax.chain(gh.record_step_cosine(sketch_dim=64), optax.sgd(0.1)))
    replay = gh.step_replay(jax.value_and_grad(_loss), spike_threshold=None, spike_zscore=None)

    def step(p, s, r, x):
        (loss, g), r = replay(r, s, p, x)
        u, s = tx.update(g, s, p, loss=loss)
        return optax.apply_updates(p, u), s, r

    s, r = init(lambda p: (tx.init(p), replay.init()), params)
    f = jax.jit(step)
    cosines = []
    for x in (1.0, float("nan"), 0.5, 0.7):
        params, s, r = f(params, s, r, jnp.float32(x))
        cosines.append(float(gh.metrics(s)["grad/step_cosine"]))
    return jax.device_get(params), cosines, jax.device_get(gh.metrics(r))


@functools.cache
def _replay_and_cosine_on_one_device():
    """The one-device reference (the same parameters for either mesh type): computed once."""
    params = _on_one_device(_sharded_params(_mesh(AxisType.Auto)))
    return _replay_and_cosine_run(params, lambda init, p: jax.device_put(init(p), jax.devices()[0]))


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_step_replay_and_step_cosine_on_a_sharded_mesh_equal_one_device(axis_type):
    """Explicit: they ran into a reshape of a sharded leaf. Both: the replayed step's
    fingerprints and the cosine as on one device, for a NaN batch and two healthy ones."""
    mesh = _mesh(axis_type)
    one = _replay_and_cosine_on_one_device()
    with jax.set_mesh(mesh):
        sharded = _replay_and_cosine_run(_sharded_params(mesh), lambda init, p: jax.jit(init)(p))
    for k in SHAPES:
        np.testing.assert_allclose(sharded[0][k], one[0][k], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sharded[1], one[1], atol=1e-5)
    assert int(sharded[2]["grad/num_replays"]) == int(one[2]["grad/num_replays"]) == 1
    assert int(sharded[2]["grad/num_replay_mismatches"]) == 0


def _temp_bytes(tx, params, grads):
    s = jax.jit(tx.init)(params)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, s, grads).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("where", ["one device", "auto"])
@pytest.mark.parametrize("inner", ["sgd", "guard(adamw)"])
def test_accumulate_holds_no_gradient_sized_buffer_beyond_multisteps(where, inner):
    mesh = _mesh(AxisType.Auto)
    params = _sharded_params(mesh, 0)
    grads = _sharded_params(mesh, 1)
    if where == "one device":
        params, grads = (_on_one_device(t) for t in (params, grads))
    make = (lambda: optax.sgd(0.1)) if inner == "sgd" else (lambda: gh.guard(optax.adamw(1e-3), clip=1.0))
    per_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(params))
    multi_steps = _temp_bytes(optax.MultiSteps(make(), 2), params, grads)
    accumulate = _temp_bytes(gh.accumulate(make(), 2, micro_batch_size=4), params, grads)
    # A gradient-sized buffer is `per_device` bytes. accumulate empties its accumulator
    # with a select (a NaN stays in its own window), which may take one such buffer
    # where MultiSteps' own multiply by 0 takes less; the mean of the window took another
    # (64.0 against 33.6 MB for sgd at 8M parameters on one device).
    bound = max(multi_steps, per_device) + 0.1 * per_device
    if where == "auto" and inner == "guard(adamw)":
        # Known and documented (accumulate's docstring): sharded, the `lax.cond` that
        # keeps the window's norm off the other micro-steps holds one more such buffer.
        # Computing it on every micro-step removes it but costs 10-40% of a micro-step
        # on XLA:CPU; no more than that one buffer.
        bound += per_device
    assert accumulate <= bound, (accumulate, multi_steps, per_device)


def test_a_zero_size_leaf_split_over_an_explicit_mesh_adds_nothing_to_the_sketch():
    """An empty leaf split over an Explicit axis crashed the in-place sketch
    (ZeroDivisionError: no rows to split). It adds nothing: the sketch of the other
    leaves alone, the numpy count sketch."""
    x = _leaf((8, 16), jnp.float32)
    mesh = _mesh(AxisType.Explicit)
    with jax.set_mesh(mesh):
        empty = jax.device_put(np.ones((0, 8), np.float32), NamedSharding(mesh, P(None, "fsdp")))
        got = jax.jit(lambda e: _sketch.leaf_sketch(e, 16, _sketch.u32(SALT), 5))(empty)
        np.testing.assert_array_equal(np.asarray(got), np.zeros(16))
        params = {"w": jax.device_put(x, NamedSharding(mesh, P("fsdp"))), "empty": empty}
        tx = optax.chain(gh.record_step_cosine(), optax.sgd(0.1))
        state = tx.init(params)
        _, state = jax.jit(tx.update)(params, state, params)
    assert float(gh.metrics(state)["grad/step_cosine"]) == 0.0  # the first step
