"""gh.global_norm / gh.grad_stats against numpy float64 and torch.nn.utils.clip_grad_norm_."""

from __future__ import annotations

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import optax_gradhealth as gh
from optax_gradhealth import _stats
from tests.backend import FLUSHES_SUBNORMALS, require_devices

_F32_SMALLEST_NORMAL = float(np.finfo(np.float32).tiny)


def reference_norm(leaves) -> float:
    """The definition written out in float64: sqrt(sum over all elements of x**2)."""
    total = 0.0
    for x in leaves:
        x = np.asarray(x, dtype=np.float64)
        if x.size:
            largest = np.max(np.abs(x))
            if largest > 0:
                total += largest**2 * np.sum((x / largest) ** 2)
    return float(np.sqrt(total))


def torch_norm(leaves) -> float:
    tensors = []
    for x in leaves:
        t = torch.tensor(np.asarray(x, np.float64)).requires_grad_()
        t.grad = t.detach().clone()
        tensors.append(t)
    return float(torch.nn.utils.clip_grad_norm_(tensors, max_norm=float("inf")))


DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32]
# Magnitudes each dtype can hold (fp16: 6e-8 .. 65504).
MAGNITUDES = {
    jnp.float16: [1e-4, 1e-2, 1.0, 300.0, 1e4],
    jnp.bfloat16: [1e-30, 1e-10, 1.0, 1e10, 1e30],
    jnp.float32: [1e-30, 1e-19, 1e-10, 1.0, 1e10, 1e19, 1e30],
}


def make_leaves(dtype, magnitude, seed=0, n_leaves=5):
    rng = np.random.default_rng(seed)
    shapes = [(3, 4), (7,), (2, 2, 2), (1,), (5, 1)][:n_leaves]
    return [jnp.asarray(rng.normal(size=s) * magnitude, dtype) for s in shapes]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_norm_matches_float64_reference_across_magnitudes(dtype):
    for magnitude in MAGNITUDES[dtype]:
        leaves = make_leaves(dtype, magnitude)
        expected = reference_norm(leaves)  # of the values as stored in `dtype`
        got = float(gh.global_norm(leaves))
        np.testing.assert_allclose(got, expected, rtol=2e-6, err_msg=f"magnitude {magnitude}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_norm_matches_torch_clip_grad_norm(dtype):
    for magnitude in MAGNITUDES[dtype]:
        leaves = make_leaves(dtype, magnitude, seed=1)
        np.testing.assert_allclose(float(gh.global_norm(leaves)), torch_norm(leaves), rtol=2e-6)


def test_fp32_elements_of_1e20_give_the_finite_norm():
    stats = gh.grad_stats({"w": jnp.full((3,), 1e20, jnp.float32)})
    assert bool(stats.finite)
    np.testing.assert_allclose(float(stats.norm), 1e20 * np.sqrt(3), rtol=1e-6)


def test_fp16_sum_of_squares_above_fp16_max():
    # Each square (90000) exceeds float16's max (65504): optax would report inf.
    leaves = [jnp.full((8,), 300.0, jnp.float16)]
    np.testing.assert_allclose(float(gh.global_norm(leaves)), 300.0 * np.sqrt(8), rtol=1e-6)
    assert np.isinf(float(jnp.sqrt(sum(jnp.sum(x * x) for x in leaves))))  # the trap, in fp16


def test_fp16_small_gradients_do_not_underflow():
    leaves = [jnp.full((100,), 1e-4, jnp.float16)]
    expected = reference_norm(leaves)
    np.testing.assert_allclose(float(gh.global_norm(leaves)), expected, rtol=1e-6)


def test_bf16_many_leaves_are_summed_in_float32():
    rng = np.random.default_rng(3)
    leaves = [jnp.asarray(rng.normal(size=(64,)), jnp.bfloat16) for _ in range(300)]
    expected = reference_norm(leaves)
    np.testing.assert_allclose(float(gh.global_norm(leaves)), expected, rtol=1e-5)


def test_float64_leaves_under_x64():
    with jax.enable_x64(True):
        leaves = [jnp.asarray(np.array([1e-200, 3e-200]), jnp.float64)]
        stats = gh.grad_stats(leaves)
        assert stats.norm.dtype == jnp.float32
        assert float(stats.norm) == 0.0  # below float32's range
        leaves = [jnp.asarray(np.array([3.0, 4.0]), jnp.float64), jnp.ones((2,), jnp.float32)]
        np.testing.assert_allclose(float(gh.global_norm(leaves)), np.sqrt(27.0), rtol=1e-7)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_detected_and_first_leaf_named(bad):
    tree = {"a": jnp.ones(3), "b": jnp.array([1.0, bad]), "c": jnp.array([bad])}
    stats = gh.grad_stats(tree)
    assert not bool(stats.finite)
    assert not np.isfinite(float(stats.norm))
    assert gh.leaf_names(tree)[int(stats.first_nonfinite_leaf)] == "b"


def test_huge_but_finite_is_not_mistaken_for_nan():
    tree = {"a": jnp.array([3e38, 3e38], jnp.float32), "b": jnp.array([1.0])}
    stats = gh.grad_stats(tree)
    assert bool(stats.finite)
    assert int(stats.first_nonfinite_leaf) == -1
    # The true norm (4.2e38) exceeds float32: it saturates at float32's max, still finite.
    assert float(stats.norm) == float(np.finfo(np.float32).max)


def test_per_leaf_norms_keyed_by_path():
    rng = np.random.default_rng(4)
    tree = {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "bias": jnp.ones(3)},
        "emb": [jnp.asarray(rng.normal(size=(5,)) * 1e25, jnp.float32)],
    }
    norms = gh.leaf_norms(tree)
    assert sorted(norms) == ["dense/bias", "dense/kernel", "emb/0"]
    for path, leaf in zip(gh.leaf_names(tree), jax.tree.leaves(tree)):
        np.testing.assert_allclose(float(norms[path]), reference_norm([leaf]), rtol=2e-6)


def test_non_float_leaves_are_ignored_and_empty_trees_are_zero():
    tree = {"w": jnp.array([3.0, 4.0]), "step": jnp.array(7, jnp.int32), "mask": jnp.array([True]), "none": None}
    stats = gh.grad_stats(tree)
    assert float(stats.norm) == 5.0
    assert float(stats.leaf_norms["step"]) == 0.0
    for empty in [{}, [], None, {"a": None, "b": ()}]:
        stats = gh.grad_stats(empty)
        assert float(stats.norm) == 0.0 and bool(stats.finite)
    assert float(gh.global_norm({"z": jnp.zeros((0, 3))})) == 0.0
    assert float(gh.global_norm({"z": jnp.zeros((4,))})) == 0.0


def test_same_values_under_jit_vmap_and_grad_float0():
    tree = make_leaves(jnp.float32, 1e-25)
    np.testing.assert_allclose(float(jax.jit(gh.global_norm)(tree)), reference_norm(tree), rtol=2e-6)
    batch = [jnp.stack([x, 2 * x]) for x in tree]
    norms = jax.vmap(gh.global_norm)(batch)
    np.testing.assert_allclose(np.asarray(norms), [reference_norm(tree), 2 * reference_norm(tree)], rtol=2e-6)
    # grad w.r.t. an integer input yields float0 leaves: ignored.
    grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2) * 1.0, allow_int=True)({"w": jnp.ones(2), "i": jnp.array(1)})
    assert float(gh.global_norm(grads)) == pytest.approx(np.sqrt(8.0))


@st.composite
def random_trees(draw):
    n_leaves = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(["float16", "bfloat16", "float32"]))
    exponent = {"float16": (-3, 3), "bfloat16": (-30, 30), "float32": (-30, 30)}[dtype]
    leaves = []
    for _ in range(n_leaves):
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, max_side=5))
        mantissa = draw(
            hnp.arrays(np.float64, shape, elements=st.floats(-10, 10, allow_nan=False, allow_infinity=False))
        )
        scale = 10.0 ** draw(st.integers(*exponent))
        leaves.append(jnp.asarray(mantissa * scale, dtype))
    structure = draw(st.sampled_from(["list", "dict", "nested"]))
    if structure == "list":
        return leaves
    if structure == "dict":
        return {f"p{i}": x for i, x in enumerate(leaves)}
    return {"outer": {"inner": leaves[:1], "rest": tuple(leaves[1:])}}


@settings(max_examples=40, deadline=None)
@given(random_trees())
# Found by hypothesis: a small leaf next to an overflowing one kept its digits only after
# the rescaled pass stopped scaling every non-ordinary leaf down.
@example([jnp.asarray(9.99201e-16, jnp.bfloat16), jnp.asarray(9.97277e19, jnp.bfloat16)])
# Found by hypothesis: a float32-subnormal element (bf16 1.19e-39) is read as zero (on CPU).
@example([jnp.asarray(0.0, jnp.bfloat16), jnp.asarray(1.19386e-39, jnp.bfloat16)])
def test_property_norm_equals_float64_reference(tree):
    # XLA:CPU reads float32 subnormals (|x| < 2**-126 ~ 1.18e-38) as zero
    # (denormals-are-zero), XLA:GPU keeps them (documented in GradStats): the reference
    # flushes them where the backend does.
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
    if FLUSHES_SUBNORMALS:
        leaves = [np.where(np.abs(x) < _F32_SMALLEST_NORMAL, 0.0, x) for x in leaves]
    expected = reference_norm(leaves)
    stats = gh.grad_stats(tree)
    assert bool(stats.finite)
    np.testing.assert_allclose(float(stats.norm), expected, rtol=5e-6, atol=0)
    got_leaves = list(np.asarray(stats.leaf_norms.values))
    # Per-leaf norms are exact unless some element of the leaf is so small that its
    # square underflows float32 (|x| < ~1.1e-19) while the global total does not (then
    # that element's contribution is lost; documented in GradStats).
    for leaf, norm in zip(leaves, got_leaves):
        ref = reference_norm([leaf])
        values = np.abs(np.asarray(leaf, np.float64))
        smallest = values[values > 0].min() if (values > 0).any() else np.inf
        if smallest >= 2e-19 or expected < 1e-15:
            np.testing.assert_allclose(float(norm), ref, rtol=5e-6)
    chex.assert_trees_all_equal_structs(stats.leaf_norms.as_tree(), jax.tree.map(lambda _: 0.0, tree))
    assert stats.leaf_norms.names == tuple(gh.leaf_names(tree))


@settings(max_examples=20, deadline=None)
@given(random_trees(), st.data())
def test_property_any_nan_or_inf_is_detected(tree, data):
    leaves, treedef = jax.tree.flatten(tree)
    sizes = [x.size for x in leaves]
    candidates = [i for i, s in enumerate(sizes) if s > 0]
    if not candidates:
        return
    index = data.draw(st.sampled_from(candidates))
    bad = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    flat = np.asarray(leaves[index], np.float32).reshape(-1).copy()
    flat[data.draw(st.integers(0, flat.size - 1))] = bad
    leaves[index] = jnp.asarray(flat.reshape(leaves[index].shape), leaves[index].dtype)
    stats = gh.grad_stats(treedef.unflatten(leaves))
    assert not bool(stats.finite)
    assert int(stats.first_nonfinite_leaf) == index


def test_leaf_norms_is_one_vector_with_static_names():
    tree = {"dense": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.zeros(3)}, "step": jnp.array(3, jnp.int32)}
    norms = gh.grad_stats(tree).leaf_norms
    assert isinstance(norms, gh.LeafNorms)
    assert norms.names == ("dense/bias", "dense/kernel", "step") == tuple(gh.leaf_names(tree))
    np.testing.assert_array_equal(np.asarray(norms.values), [0.0, 4.0, 0.0])
    assert float(norms["dense/kernel"]) == 4.0 and len(norms) == 3
    with pytest.raises(KeyError, match="dense/kernel"):
        norms["dense/w"]
    # One array leaf; the names travel in the tree structure (through jit and scan).
    assert len(jax.tree.leaves(norms)) == 1

    def body(carry, x):
        stats = gh.grad_stats({**tree, "dense": jax.tree.map(lambda v: v * x, tree["dense"])})
        return stats.leaf_norms, stats.norm

    final, _ = jax.lax.scan(body, gh.LeafNorms.zeros(tree), jnp.arange(1.0, 4.0))
    assert final.names == norms.names
    np.testing.assert_allclose(np.asarray(final.values), [0.0, 12.0, 0.0])
    jitted = jax.jit(lambda t: gh.grad_stats(t).leaf_norms)(tree)
    assert jitted.names == norms.names and jitted.as_dict().keys() == norms.as_dict().keys()


def test_leaf_norms_split_their_vector_at_once_not_by_one_indexing_per_leaf(monkeypatch):
    """Outside jit, as_dict and as_tree (so gh.metrics) indexed ``values`` once per leaf:
    one dispatch, and one index sent to the device, each (~0.1 s a call on 1000 leaves)."""
    n = 100  # above _stats._UNSTACK_WINDOW (32), not a multiple of it: the last window overlaps
    tree = {f"l{i:03d}": jnp.full(4, float(i)) for i in range(n)}
    norms = gh.grad_stats(tree).leaf_norms
    expected = {f"l{i:03d}": 2.0 * i for i in range(n)}  # sqrt(4 i^2)
    array_type = type(norms.values)
    indexings = []
    original = array_type.__getitem__

    def counted(self, index):
        indexings.append(index)
        return original(self, index)

    monkeypatch.setattr(array_type, "__getitem__", counted)
    as_dict, as_tree = norms.as_dict(), norms.as_tree()
    monkeypatch.undo()
    assert len(indexings) < n // 10, len(indexings)
    assert list(as_dict) == list(expected) and sorted(as_tree) == sorted(expected)
    for name, norm in expected.items():
        assert isinstance(as_dict[name], jax.Array) and as_dict[name].shape == ()
        np.testing.assert_allclose(float(as_dict[name]), norm, rtol=1e-6)
        np.testing.assert_allclose(float(as_tree[name]), norm, rtol=1e-6)
    # Under jit (a traced vector) the same entries come back.
    jitted = jax.jit(lambda t: gh.grad_stats(t).leaf_norms.as_dict())(tree)
    assert list(jitted) == list(expected)
    np.testing.assert_allclose([float(v) for v in jitted.values()], list(expected.values()), rtol=1e-6)
    # An empty tree has no entries.
    assert gh.grad_stats({}).leaf_norms.as_dict() == {}


PMAP_DEVICES = 4


def _pmapped_guard_state(num_leaves):
    """A guard's state after one ``jax.pmap`` step on ``PMAP_DEVICES`` devices (values
    ``[K, num_leaves]``), and the float64 per-device gradients it saw: leaf ``i`` of
    device ``d`` is ``(d * num_leaves + i + 1)(1, 2, 3)``, so every (device, leaf) norm
    differs and the ``[K, K]`` norms of K leaves are not symmetric."""
    require_devices(PMAP_DEVICES, __file__)
    k, devices = PMAP_DEVICES, jax.devices()[:PMAP_DEVICES]
    names = [f"w{i:02d}" for i in range(num_leaves)]
    scale = np.arange(k)[:, None] * num_leaves + np.arange(1.0, num_leaves + 1)  # [K, num_leaves]
    grads = {name: np.outer(scale[:, i], np.arange(1.0, 4.0)) for i, name in enumerate(names)}
    params = {name: jnp.ones((k, 3)) for name in names}
    tx = gh.guard(optax.sgd(0.1))

    def step(grads, state, params):
        return tx.update(grads, state, params)[1]

    state = jax.pmap(tx.init, devices=devices)(params)
    state = jax.pmap(step, devices=devices)(jax.tree.map(jnp.float32, grads), state, params)
    return state, grads


def _leaf_norm_fields(state):
    leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, gh.LeafNorms))
    return [x for x in leaves if isinstance(x, gh.LeafNorms)]


# 4 devices and 3, 4 (one per device: the split along the device axis was silently wrong),
# 6 and 40 leaves (40: split in windows, see _unstack).
@pytest.mark.parametrize("num_leaves", [3, 4, 6, 40])
def test_metrics_of_a_pmapped_state_are_per_leaf_with_the_device_axis_kept(num_leaves):
    """On a state returned by ``jax.pmap`` the per-leaf vectors are ``[K, num_leaves]``:
    ``gh.metrics`` (and ``LeafNorms.as_dict``/``as_tree``/``[name]``) split them along
    axis 0, the device axis, and raised a ``zip()`` error, or with K == num_leaves gave
    device ``i``'s norms of every leaf as leaf ``i``'s."""
    k = PMAP_DEVICES
    state, grads = _pmapped_guard_state(num_leaves)
    expected = {name: np.linalg.norm(g, axis=-1) for name, g in grads.items()}  # [K] each
    stacked = jax.device_get(gh.metrics(state))
    per_device = [jax.device_get(gh.metrics(jax.tree.map(lambda x, d=d: x[d], state))) for d in range(k)]
    assert sum(key.startswith("update/leaf_param_ratio/") for key in stacked) == num_leaves
    for d, metrics in enumerate(per_device):
        assert list(stacked) == list(metrics)
        for key, value in metrics.items():
            assert np.shape(stacked[key]) == (k, *np.shape(value)), key
            np.testing.assert_array_equal(stacked[key][d], value, err_msg=key)
    for name, norms in expected.items():
        np.testing.assert_allclose(stacked[f"grad/leaf_norm/{name}"], norms, rtol=1e-6)
    # Every per-leaf accessor of the LeafNorms agrees: leaf axis last, device axis kept.
    grad_norms, ratios = _leaf_norm_fields(state)
    assert np.shape(grad_norms.values) == (k, num_leaves) and np.shape(ratios.values) == (k, num_leaves)
    as_dict, as_tree = grad_norms.as_dict(), grad_norms.as_tree()
    assert list(as_dict) == list(expected)
    for name, norms in expected.items():
        np.testing.assert_allclose(np.asarray(grad_norms[name]), norms, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(as_dict[name]), norms, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(as_tree[name]), norms, rtol=1e-6)
    # Under jit (a traced [K, num_leaves] vector) the same entries come back.
    jitted = jax.device_get(jax.jit(lambda s: _leaf_norm_fields(s)[0].as_dict())(state))
    for name, norms in expected.items():
        np.testing.assert_allclose(jitted[name], norms, rtol=1e-6)


@pytest.mark.parametrize("num_leaves", [3, 4])
def test_a_pmapped_state_as_a_state_dict_keeps_its_per_leaf_metrics_and_round_trips(num_leaves):
    """The dict form (``flax.serialization.to_state_dict``, as ``nnx.state`` and
    pure-dict restores give) of a pmapped state: ``gh.metrics`` names its per-leaf norms by
    index, one ``[K]`` array each (a vector that was not 1-D came out as one
    ``grad/leaf_norm/values`` array), and ``from_bytes`` refused its ``[K, num_leaves]``
    LeafNorms as not fitting the target."""
    from flax import serialization

    state, grads = _pmapped_guard_state(num_leaves)
    expected = [np.linalg.norm(g, axis=-1) for g in grads.values()]  # leaf order: sorted names
    flat = jax.device_get(gh.metrics(serialization.to_state_dict(state)))
    for i, norms in enumerate(expected):
        np.testing.assert_allclose(flat[f"grad/leaf_norm/{i}"], norms, rtol=1e-6)
    restored = serialization.from_bytes(state, serialization.to_bytes(state))
    before, after = jax.device_get(gh.metrics(state)), jax.device_get(gh.metrics(restored))
    assert list(before) == list(after)
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)
    with pytest.raises(ValueError, match="do not fit the target's"):
        serialization.from_state_dict(state, serialization.to_state_dict(_pmapped_guard_state(num_leaves + 1)[0]))


@pytest.mark.parametrize(
    "measure", [gh.global_norm, lambda g: gh.grad_stats(g).leaf_norms.values], ids=["norm", "leaf"]
)
def test_norm_beside_adam_adds_no_gradient_sized_temporary(measure):
    """Adam squares the gradient for ``nu``; so does the norm. XLA's CSE would merge the
    two squares into one materialised array (a temporary the size of the gradients:
    ``optax.global_norm`` beside ``optax.adam`` has one). The statistics keep theirs."""
    tx = optax.adam(1e-3)
    params = {"w": jnp.ones((512, 256), jnp.float32), "b": jnp.ones((256,), jnp.float32)}

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, measure(grads)

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params).compile()
    analysis = compiled.memory_analysis()
    assert analysis is not None
    assert analysis.temp_size_in_bytes < params["w"].nbytes // 8, analysis.temp_size_in_bytes


# --- Tests added from mutation testing (tools/mutation.py _stats; docs/testing.md) -------


def test_complex_leaves_count_real_and_imaginary_parts():
    z = np.array([3 + 4j, 1 - 2j, -0.5j], np.complex64)
    stats = gh.grad_stats({"z": jnp.asarray(z), "w": jnp.array([2.0])})
    expected = np.sqrt(np.sum(np.abs(z.astype(np.complex128)) ** 2) + 4.0)
    np.testing.assert_allclose(float(stats.norm), expected, rtol=1e-6)
    np.testing.assert_allclose(float(stats.leaf_norms["z"]), np.linalg.norm(z.astype(np.complex128)), rtol=1e-6)
    # The rescaled (underflow) pass takes the same two parts.
    tiny = jnp.asarray(z * np.float32(1e-20))
    expected = 1e-20 * np.linalg.norm(z.astype(np.complex128))
    np.testing.assert_allclose(float(gh.global_norm({"z": tiny})), expected, rtol=1e-5)


def test_python_scalar_leaves():
    # A Python float is a float leaf; a Python int (a step counter) is ignored.
    stats = gh.grad_stats({"w": jnp.array([3.0, 4.0]), "x": 2.0, "n": 3})
    np.testing.assert_allclose(float(stats.norm), np.sqrt(9.0 + 16.0 + 4.0), rtol=1e-7)
    assert stats.leaf_norms.names == ("n", "w", "x")
    np.testing.assert_array_equal(np.asarray(stats.leaf_norms.values), np.array([0.0, 5.0, 2.0], np.float32))


@pytest.mark.parametrize("big", [1e39, 3e43, 1e100, 1e150], ids=lambda v: f"{v:g}")
def test_float64_leaf_beyond_float32_range_under_x64_is_finite_and_saturates(big):
    # float64 leaves are reduced in float64: an element above float32's max is finite,
    # up to ~1.3e154 (where its float64 square overflows), even when its square is
    # beyond float32 after the rescaled pass's 2**-80 (above ~2e43).
    with jax.enable_x64(True):
        for fn in (gh.grad_stats, jax.jit(gh.grad_stats)):
            stats = fn({"w": jnp.asarray(np.array([big, 2.0]), jnp.float64), "v": jnp.ones(3, jnp.float32)})
            assert bool(stats.finite) and int(stats.first_nonfinite_leaf) == -1
            assert float(stats.norm) == float(np.finfo(np.float32).max)
            np.testing.assert_allclose(np.asarray(stats.leaf_norms.values), [np.sqrt(3.0), np.finfo(np.float32).max])


def test_float32_leaves_are_reduced_in_float32_under_x64():
    # Only float64 leaves take float64 arithmetic: a float32 (or fp16) gradient never has a
    # float64 copy or square (slow on accelerators), in the ordinary or the rescaled pass.
    with jax.enable_x64(True):
        tree = {"a": jnp.ones((1000,), jnp.float32), "b": jnp.ones((999,), jnp.float16)}
        text = str(jax.make_jaxpr(gh.grad_stats)(tree))
        assert "f32[1000]" in text and "f64[1000]" not in text and "f64[999]" not in text
        np.testing.assert_allclose(float(gh.global_norm(tree)), np.sqrt(1999.0), rtol=1e-6)


def test_leaf_norms_keep_float32_and_their_key_under_x64():
    with jax.enable_x64(True):
        tree = {"a": jnp.ones(2), "b": jnp.ones(3, jnp.float64), "c": jnp.array(1, jnp.int32)}
        zeros = gh.LeafNorms.zeros(tree)
        assert zeros.values.dtype == jnp.float32
        # the same dtype as the norms an update writes over them (a scan carry must match)
        stats = gh.grad_stats(tree)
        assert stats.leaf_norms.values.dtype == jnp.float32 and stats.norm.dtype == jnp.float32
    ((path, _),) = jax.tree_util.tree_flatten_with_path(zeros)[0]
    assert path == (jax.tree_util.GetAttrKey("values"),)
    assert gh.leaf_names({"norms": zeros}) == ["norms/values"]


def test_nnx_variables_count_as_their_values():
    from flax import nnx

    tree = {"w": nnx.Param(jnp.ones(3)), "b": jnp.zeros(2)}
    zeros = gh.LeafNorms.zeros(tree)
    assert zeros.treedef == jax.tree.structure({"w": jnp.ones(3), "b": jnp.zeros(2)})
    assert zeros.names == ("b", "w")
    np.testing.assert_array_equal(np.asarray(zeros.values), np.zeros(2, np.float32))


class _Pair:
    """A pytree without keys (its key path holds FlattenedIndexKey)."""

    def __init__(self, a, b):
        self.a, self.b = a, b


jax.tree_util.register_pytree_node(_Pair, lambda p: ((p.a, p.b), None), lambda _, c: _Pair(*c))


class _Tagged:
    """A pytree whose keys are objects of its own (neither DictKey nor GetAttrKey ...)."""

    class Key:
        def __init__(self, tag):
            self.tag = tag

        def __str__(self):
            return f"<{self.tag}>"

        def __hash__(self):
            return hash(self.tag)

        def __eq__(self, other):
            return isinstance(other, _Tagged.Key) and other.tag == self.tag

    def __init__(self, x):
        self.x = x


jax.tree_util.register_pytree_with_keys(
    _Tagged, lambda t: (((_Tagged.Key("x"), t.x),), None), lambda _, c: _Tagged(*c), lambda t: ((t.x,), None)
)


def test_leaf_names_for_every_kind_of_key():
    from typing import NamedTuple

    class Moments(NamedTuple):
        mu: object
        nu: object

    tree = {"opt": Moments(mu=[1.0], nu=_Pair(2.0, 3.0)), "t": _Tagged(4.0)}
    assert gh.leaf_names(tree) == ["opt/mu/0", "opt/nu/0", "opt/nu/1", "t/<x>"]
    assert gh.grad_stats(tree).leaf_norms.names == ("opt/mu/0", "opt/nu/0", "opt/nu/1", "t/<x>")


def test_leaves_whose_paths_join_to_one_name_keep_a_norm_each():
    """{'a/b': x, 'a': {'b': y}}: both leaves are named 'a/b' by their joined paths; the
    later one is 'a/b(2)', so each keeps its own norm (one overwrote the other)."""
    tree = {"a/b": jnp.full(2, 3.0), "a": {"b": jnp.ones(2)}}
    assert jax.tree.leaves(tree)[0].tolist() == [1.0, 1.0]  # jax orders 'a' before 'a/b'
    assert gh.leaf_names(tree) == ["a/b", "a/b(2)"]
    norms = {k: float(v) for k, v in gh.leaf_norms(tree).items()}
    assert norms == {"a/b": pytest.approx(np.sqrt(2.0)), "a/b(2)": pytest.approx(np.sqrt(18.0))}
    tx = gh.guard(optax.sgd(0.1))
    _, state = tx.update(tree, tx.init(tree), tree)
    m = gh.metrics(state)
    assert {k for k in m if k.startswith("grad/leaf_norm/")} == {"grad/leaf_norm/a/b", "grad/leaf_norm/a/b(2)"}


def test_a_suffixed_name_never_takes_a_name_already_in_use():
    """{'a/b': x, 'a': {'b': y}, 'a/b(2)': z}: the second 'a/b' became 'a/b(2)', the third
    leaf's own name, and one norm overwrote another. Reference: three leaves, three
    names, and each norm (numpy) under its own name."""
    tree = {"a/b": jnp.full(2, 3.0), "a": {"b": jnp.ones(2)}, "a/b(2)": jnp.full(2, 5.0)}
    names = gh.leaf_names(tree)
    assert len(set(names)) == 3
    assert names[0] == "a/b" and names[2] == "a/b(2)"  # a leaf's own path is kept
    want = {name: float(np.linalg.norm(np.asarray(x))) for name, x in zip(names, jax.tree.leaves(tree))}
    got = {k: float(v) for k, v in gh.leaf_norms(tree).items()}
    assert got == pytest.approx(want) and sorted(got.values()) == pytest.approx([np.sqrt(2), np.sqrt(18), np.sqrt(50)])


def test_leaf_names_are_unique_for_trees_of_clashing_keys():
    """Every tree whose keys are drawn from names that clash once joined (with '/') or
    suffixed: the names are unique, and a tree without clashes keeps its plain paths."""
    import itertools

    keys = ["a", "a/b", "b", "a/b(2)", "a/b(3)", "b(2)"]
    for size in (2, 3, 4):
        for chosen in itertools.combinations(keys, size):
            tree = {k: {"b": 0.0, "b(2)": 0.0} if k == "a" else 0.0 for k in chosen}
            names = gh.leaf_names(tree)
            paths = [gh.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
            assert len(set(names)) == len(names) == len(paths), (chosen, names)
            if len(set(paths)) == len(paths):
                assert names == paths


def test_leaf_names_read_through_nnx_variables_as_the_metrics_do():
    from flax import nnx

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    assert gh.leaf_names(params) == ["bias", "kernel"] == list(gh.leaf_norms(params))


@pytest.mark.parametrize("value", [1.5e18, 2.0**61])
def test_many_leaves_above_2_60_whose_total_overflows_get_the_exact_norm(value):
    # Every leaf norm is finite and the true norm (~2.6e19) is far inside float32, but the
    # sum of the leaves' squares overflows float32: the norm of norms must scale it down.
    tree = [jnp.full((1,), value, jnp.float32) for _ in range(300)]
    stats = gh.grad_stats(tree)
    assert bool(stats.finite)
    np.testing.assert_allclose(float(stats.norm), reference_norm(tree), rtol=1e-5)


@pytest.mark.parametrize("value", [1e18, 2.0**60])
def test_many_leaves_at_or_below_2_60_whose_total_overflows_get_the_exact_norm(value):
    tree = [jnp.full((1,), value, jnp.float32) for _ in range(400)]
    np.testing.assert_allclose(float(gh.global_norm(tree)), reference_norm(tree), rtol=1e-5)


def test_tiny_step_keeps_small_leaves_next_to_a_larger_tiny_leaf():
    tree = [jnp.full((1,), 2e-18, jnp.float32)] + [jnp.full((1,), 6e-20, jnp.float32) for _ in range(100)]
    np.testing.assert_allclose(float(gh.global_norm(tree)), reference_norm(tree), rtol=1e-5)


@pytest.mark.parametrize(
    "values, dtype, scale",
    [
        ([300.0, -400.0, 1.0], jnp.float16, 1.0 / 64),  # ordinary: a loss-scaled fp16 gradient
        ([1e20, -3e20, 5.0], jnp.float32, 0.5),  # the scaled sum overflows: rescaled pass
        ([1e-25, 2e-25, 0.0], jnp.float32, 4.0),  # the scaled sum is tiny: rescaled pass
        ([3e38, 1e-3, 0.0], jnp.float32, 1e-30),  # the unscaled squares would overflow, not the scaled
    ],
)
def test_input_scale_multiplies_inside_the_reduction(values, dtype, scale):
    # `_grad_stats(tree, s)` (what the guard uses to unscale loss-scaled gradients) is the
    # statistics of tree * s, written out here in float64.
    tree = {"w": jnp.asarray(values, dtype), "b": jnp.asarray([values[0] / 2, -values[1] / 10], dtype)}
    stats = _stats._grad_stats(tree, jnp.float32(scale))
    scaled = {k: np.asarray(v, np.float64) * np.float64(np.float32(scale)) for k, v in tree.items()}
    assert bool(stats.finite)
    np.testing.assert_allclose(float(stats.norm), reference_norm(list(scaled.values())), rtol=1e-5)
    np.testing.assert_allclose(float(stats.leaf_norms["w"]), reference_norm([scaled["w"]]), rtol=1e-5)
    np.testing.assert_allclose(float(stats.leaf_norms["b"]), reference_norm([scaled["b"]]), rtol=1e-5)


def test_tiny_step_just_below_2_minus_60_keeps_small_leaves():
    # Largest leaf norm 6e-19 (2**-61 < 6e-19 < 2**-60): the norm of norms scales up by
    # 2**70, so the 5e-20 leaves (squares below float32's normal range) still count.
    tree = [jnp.full((1,), 6e-19, jnp.float32)] + [jnp.full((1,), 5e-20, jnp.float32) for _ in range(100)]
    np.testing.assert_allclose(float(gh.global_norm(tree)), reference_norm(tree), rtol=1e-5)


def test_tree_without_float_leaves_has_every_statistic():
    for x64 in (False, True):
        with jax.enable_x64(x64):
            stats = gh.grad_stats({"step": jnp.array(3, jnp.int32), "mask": jnp.array([True, False])})
            assert stats.norm.dtype == jnp.float32 and float(stats.norm) == 0.0
            assert stats.finite.dtype == jnp.bool_ and bool(stats.finite)
            assert stats.first_nonfinite_leaf.dtype == jnp.int32 and int(stats.first_nonfinite_leaf) == -1
            assert stats.leaf_norms.names == ("mask", "step")
            assert stats.leaf_norms.values.dtype == jnp.float32
            np.testing.assert_array_equal(np.asarray(stats.leaf_norms.values), [0.0, 0.0])


@pytest.mark.parametrize("x64", [False, True], ids=["x32", "x64"])
def test_statistics_keep_their_dtypes_on_every_path(x64):
    with jax.enable_x64(x64):
        for values in ([3.0, 4.0], [1e30, 1e30], [1e-25, 0.0], [1.0, np.nan]):  # ordinary, overflow, tiny, NaN
            stats = gh.grad_stats({"w": jnp.asarray(values, jnp.float32), "b": jnp.ones(2, jnp.bfloat16)})
            assert stats.norm.dtype == jnp.float32 and stats.finite.dtype == jnp.bool_, values
            assert stats.first_nonfinite_leaf.dtype == jnp.int32, values
            assert stats.leaf_norms.values.dtype == jnp.float32, values
            assert int(stats.first_nonfinite_leaf) == (1 if np.isnan(values).any() else -1)  # leaves: b, w


@pytest.mark.parametrize("value", [1e38, 1.5e38])
def test_overflowing_step_whose_largest_leaf_norm_is_near_float32_max(value):
    # Leaf norms in [2**126, 2**127): the norm of norms' scale must stay a normal float32.
    tree = [jnp.full((1,), value, jnp.float32), jnp.full((1,), value / 4, jnp.float32), jnp.ones(2)]
    stats = gh.grad_stats(tree)
    assert bool(stats.finite)
    np.testing.assert_allclose(float(stats.norm), reference_norm(tree), rtol=1e-5)
