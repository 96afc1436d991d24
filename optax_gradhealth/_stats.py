"""One-pass gradient statistics: per-leaf float32 sums of squares, global norm, finite flag.

Pure functions, no state. Every leaf is squared and summed in float32 (float64 for
float64 leaves under x64) whatever its dtype, and the per-leaf sums are added in
float32, so fp16 and bf16 gradients neither overflow nor lose precision across leaves.

A single reduction gives the sum of squares of every leaf. Its total is finite and
not tiny on every ordinary step: then the norm is its square root and every element is
known to be finite (a NaN or Inf element makes the sum NaN or Inf). Only when the total
is non-finite (NaN, Inf, or an overflow of float32 by huge but finite elements) or so
small that squares may have underflowed does a second, rare branch (``lax.cond``)
reduce every element scaled by one exact power of two: 2**-80 after an overflow
(squares of float32 values, at most 3.4e38, become at most 7.9e28, so no finite element
overflows again), 2**80 after an underflow (the total was below 1e-30, so every element
is below 1e-15 and its scaled square below 1.5e18). After an overflow a leaf whose own
first-pass sum was finite keeps it (scaling it down would only lose its digits); a leaf
whose rescaled sum is still non-finite holds a NaN or Inf. So
a huge but finite gradient gets its right, finite norm and is not mistaken for NaN, and
a 1e-30 gradient is not flushed to zero. Both passes are one fused reduction per leaf:
no temporary the size of the gradients (or of a leaf).

Per-leaf norms are returned as one float32 vector (:class:`LeafNorms`), not one scalar
per leaf: on a tree of 1000 leaves, 1000 separate outputs (or 1000 slices of a vector)
add 1000 small kernels to the compiled step.
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_gradhealth import _lowering

__all__ = [
    "GradStats",
    "LeafNorms",
    "global_norm",
    "grad_stats",
    "leaf_names",
    "leaf_norms",
    "path_name",
]

# Below this total sum of squares, squares of small elements may have underflowed in
# float32 (elements under ~1e-19 square to subnormals or zero): take the scaled pass.
_TINY_SUM_OF_SQUARES = 1e-30
_SCALE_AFTER_OVERFLOW = 2.0**-80
_SCALE_AFTER_UNDERFLOW = 2.0**80
_F32_MAX = float(np.finfo(np.float32).max)


@jax.tree_util.register_pytree_with_keys_class
class LeafNorms:
    """Per-leaf L2 norms of a pytree, stored as one float32 vector.

    ``values[i]`` is the norm of the ``i``-th leaf in ``jax.tree.leaves`` order (0 for
    a non-float leaf); the tree structure is static (pytree auxiliary data), so the
    leaf names come for free and a jitted step carries one array instead of one per
    leaf. It is a pytree with the single leaf ``values``.

    The leaf axis is the last one: a state returned by ``jax.pmap`` holds per-device
    copies, ``values`` of shape ``[num_devices, num_leaves]``, and each entry of
    :meth:`as_dict`, :meth:`as_tree` and ``norms[name]`` is then ``values[..., i]``,
    one norm per device.

    Attributes:
      values: float32 array of shape ``[num_leaves]`` (``[..., num_leaves]`` with
        leading per-device axes).
      treedef: the structure of the tree the norms belong to.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_gradhealth as gh
      >>> norms = gh.grad_stats({'b': jnp.zeros(2), 'w': jnp.array([3.0, 4.0])}).leaf_norms
      >>> norms.names, norms.values.tolist()
      (('b', 'w'), [0.0, 5.0])
      >>> float(norms['w']), {k: float(v) for k, v in norms.as_dict().items()}
      (5.0, {'b': 0.0, 'w': 5.0})
    """

    __slots__ = ("treedef", "values")

    def __init__(self, values: Any, treedef: Any):
        self.values = values
        self.treedef = treedef
        if not _flax_serialization_registered:
            _register_flax_serialization()

    @classmethod
    def zeros(cls, tree: Any) -> LeafNorms:
        """All-zero norms for the leaves of ``tree`` (an optimizer state's initial value).

        ``flax.nnx`` variables (``nnx.Param``) count as their values: ``nnx.Optimizer``
        initialises with a state of ``Param`` variables and updates with plain gradients.
        """
        treedef = jax.tree.structure(_without_nnx_variables(tree))
        return cls(jnp.zeros((treedef.num_leaves,), jnp.float32), treedef)

    @property
    def names(self) -> tuple[str, ...]:
        """The ``/``-separated path of every leaf, in ``values`` order."""
        return _names_of_treedef(self.treedef)

    def as_dict(self) -> dict[str, jax.Array]:
        """``{leaf path: norm}`` (``values[..., i]`` for leaf ``i``: a scalar, or one
        norm per device for per-device copies)."""
        return dict(zip(self.names, _unstack(self.values), strict=True))

    def as_tree(self) -> Any:
        """The norms (as :meth:`as_dict`'s entries) as a pytree with the structure of the
        original tree."""
        return self.treedef.unflatten(_unstack(self.values))

    def __getitem__(self, name: str) -> jax.Array:
        try:
            index = self.names.index(name)
        except ValueError:
            raise KeyError(f"no leaf named {name!r}; the leaves are {list(self.names)}") from None
        return replicated(self.values)[..., index]

    def __len__(self) -> int:
        return self.treedef.num_leaves

    def __repr__(self) -> str:
        return f"LeafNorms(values={self.values!r}, names={self.names})"

    def tree_flatten_with_keys(self):
        return ((jax.tree_util.GetAttrKey("values"), self.values),), self.treedef

    def tree_flatten(self):
        return (self.values,), self.treedef

    @classmethod
    def tree_unflatten(cls, treedef, children):
        return cls(children[0], treedef)


# `_unstack` splits a vector outside jit in windows of this many elements: one compiled
# program (an unstack of this size) serves every vector, whatever its length.
_UNSTACK_WINDOW = 32


def _unstack(values: Any) -> list[Any]:
    """A per-leaf vector split into one scalar per leaf, with no device-to-host copy.

    The leaf axis is the last: per-device copies (``[num_devices, num_leaves]`` from
    ``pmap``) are split into ``values[..., i]``, one norm per device each (the leaf
    axis is moved to the front first, one transpose, and split as a vector is).

    Outside jit, indexing ``values`` once per leaf is one dispatch (and one index sent to
    the device) each: ~0.1 s per :func:`metrics` call on 1000 leaves. A vector of at
    least ``_UNSTACK_WINDOW`` elements is split instead in windows of that size (the
    last one overlapping the one before), each one slice and one unstack, so that a
    single compiled unstack serves every length (jax's own iteration compiles an
    unstack for each new length: seconds, once per tree size). Under jit (a traced
    vector) the slices are the same as indexing. A vector sharded over several devices,
    which jax would split through the host, is indexed; one sharded over an Explicit
    mesh axis, which jax will not index, is replicated first (one small gather).
    """
    values = replicated(values)
    if np.ndim(values) > 1:
        values = (np if isinstance(values, np.ndarray) else jnp).moveaxis(values, -1, 0)
    if isinstance(values, jax.core.Tracer) or not isinstance(values, jax.Array):
        return list(values)  # traced (the same slices as indexing), or numpy
    n = values.shape[0]
    sharded = values.sharding.num_devices > 1 and not values.is_fully_replicated
    if sharded and values.ndim > 1:  # per-device copies: split over the leaf axis?
        sharded = values.sharding.shard_shape(values.shape)[0] < n
    if sharded or n < _UNSTACK_WINDOW:
        return [values[i] for i in range(n)]
    out: list[Any] = []
    for start in range(0, n, _UNSTACK_WINDOW):
        first = min(start, n - _UNSTACK_WINDOW)
        window = jax.lax.unstack(jax.lax.dynamic_slice_in_dim(values, first, _UNSTACK_WINDOW))
        out.extend(window[start - first :])
    return out


def _leaf_norms_state_dict(norms: LeafNorms) -> dict[str, Any]:
    return {"values": norms.values}


def _leaf_norms_from_state_dict(target: LeafNorms, state: Any) -> LeafNorms:
    """A :class:`LeafNorms` with ``state``'s values and ``target``'s tree structure (a
    state dict holds only the vector, as ``nnx.state`` and pure-dict restores do)."""
    if not isinstance(state, dict) or set(state) != {"values"}:
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"a LeafNorms state dict has the one key 'values', got {keys}.")
    values = state["values"]
    if np.shape(values)[-1:] != (target.treedef.num_leaves,):  # after any per-device axes
        raise ValueError(
            f"LeafNorms values of shape {np.shape(values)} do not fit the target's "
            f"{target.treedef.num_leaves} leaves ({list(target.names)[:4]}...): "
            "was the state saved for other parameters?"
        )
    return LeafNorms(values, target.treedef)


_flax_serialization_registered = False


def _register_flax_serialization() -> None:
    """Registers :class:`LeafNorms` with ``flax.serialization`` (``to_bytes``,
    ``to_state_dict``, ``from_bytes``) once flax is imported.

    Like :func:`_without_nnx_variables`, this never imports flax: it acts when flax is
    already in ``sys.modules`` (any ``import flax...`` loads ``flax.serialization``). It
    runs when this module is imported and, until it has registered, whenever a
    ``LeafNorms`` is built (``init``, every step), so that flax imported after
    optax_gradhealth is covered too.
    """
    global _flax_serialization_registered
    serialization = sys.modules.get("flax.serialization")
    if serialization is None or not hasattr(serialization, "register_serialization_state"):
        return  # not imported (or still being imported)
    _flax_serialization_registered = True
    if not serialization.is_serializable(LeafNorms):
        serialization.register_serialization_state(LeafNorms, _leaf_norms_state_dict, _leaf_norms_from_state_dict)


def _without_nnx_variables(tree: Any) -> Any:
    nnx = sys.modules.get("flax.nnx")
    if nnx is None:
        return tree
    return jax.tree.map(
        lambda v: v.get_value() if isinstance(v, nnx.Variable) else v,
        tree,
        is_leaf=lambda v: isinstance(v, nnx.Variable),
    )


_NAMES_CACHE: dict[Any, tuple[str, ...]] = {}


def _names_of_treedef(treedef: Any) -> tuple[str, ...]:
    names = _NAMES_CACHE.get(treedef)
    if names is None:
        dummy = treedef.unflatten([0] * treedef.num_leaves)
        names = tuple(leaf_names(dummy))
        if len(_NAMES_CACHE) < 256:
            _NAMES_CACHE[treedef] = names
    return names


class GradStats(NamedTuple):
    """Statistics of a gradient pytree, from one reduction.

    Attributes:
      norm: global L2 norm, float32 scalar. NaN or Inf when ``finite`` is False. A
        finite tree whose norm exceeds the float32 range reports ``finfo(float32).max``.
      finite: bool scalar, True when every element of every float leaf is finite.
      leaf_norms: a :class:`LeafNorms`: the float32 L2 norm of every leaf (0 for
        non-float leaves), ``leaf_norms.as_tree()`` gives them with the structure of the
        input. When the global norm is ordinary, elements below ~1e-19 in magnitude
        (whose squares underflow float32) add nothing to their leaf's norm; the global
        norm is unaffected (on a step whose global sum overflowed, too: such a leaf keeps
        its own first-pass sum). Float32-subnormal elements (below ~1.18e-38) count as
        zero on CPU and TPU (XLA:CPU reads them as zero, denormals-are-zero; TPUs have
        none) and with their value on GPU (XLA:GPU keeps them).
      first_nonfinite_leaf: int32 scalar, the index (in ``jax.tree.leaves`` order) of
        the first leaf holding a NaN or Inf, or -1 when every leaf is finite.
    """

    norm: jax.Array
    finite: jax.Array
    leaf_norms: LeafNorms
    first_nonfinite_leaf: jax.Array


def explicit_sharding(x: Any) -> Any:
    """The sharding of ``x``'s type when its mesh has an Explicit axis (the default of
    ``jax.make_mesh`` in jax 0.10), else None. An array built to be combined with ``x``
    (a broadcast predicate, zeros) must then be given it: Explicit sharding rejects a
    ``select`` or ``concatenate`` of operands sharded differently. On other meshes (Auto,
    one device, under ``shard_map``) the partitioner places it, and the program is left
    as it was."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or jax.sharding.AxisType.Explicit not in getattr(mesh, "axis_types", ()):
        return None
    return sharding


def explicitly_split(x: Any) -> bool:
    """Whether ``x`` is split over an Explicit mesh axis (its type says so at trace time)."""
    sharding = explicit_sharding(x)
    return sharding is not None and any(axis is not None for axis in sharding.spec)


def replicated(x: Any) -> Any:
    """``x`` replicated when it is split over an Explicit mesh axis, as it is otherwise.
    jax will not index such a vector, concatenate it with differently sharded ones, or
    flatten it: callers use this on small arrays (a per-leaf vector, row counts, row sums,
    a leaf with no rows to sketch in place)."""
    if not isinstance(x, jax.Array) or not explicitly_split(x):
        return x
    return jax.sharding.reshard(
        x, jax.sharding.NamedSharding(jax.typeof(x).sharding.mesh, jax.sharding.PartitionSpec())
    )


def _is_float(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return isinstance(x, float)
    return jnp.issubdtype(dtype, jnp.inexact)


def _float_leaves(tree: Any) -> list[jax.Array]:
    """The float (and complex) leaves of ``tree``, as arrays, in ``jax.tree.leaves`` order;
    the one filter every module uses (integer, bool and ``float0`` leaves are skipped)."""
    return [jnp.asarray(x) for x in jax.tree.leaves(tree) if _is_float(x)]


def _accumulation_dtype(x: jax.Array) -> Any:
    # float64 (and complex128) leaves keep their precision under x64; all others
    # (fp16, bf16, fp32, fp8) are reduced in float32.
    if jnp.finfo(x.dtype).bits >= 64:
        return jnp.float64
    return jnp.float32


def _abs_squared(x: jax.Array, dtype: Any, scale: jax.Array | None) -> jax.Array:
    parts = (jnp.real(x), jnp.imag(x)) if jnp.iscomplexobj(x) else (x,)
    total = None
    for part in parts:
        part = part.astype(dtype)
        if scale is not None:
            part = part * scale.astype(dtype)
        total = jnp.square(part) if total is None else total + jnp.square(part)
    return total


def _leaf_sum_of_squares(x: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    """Sum of ``|x * scale|**2`` in float32 (float64 for float64 leaves), as float32."""
    x = jnp.asarray(x)  # a Python float leaf
    dtype = _accumulation_dtype(x)
    if scale is None:
        # The barrier keeps this square inside the reduction. Without it, XLA's CSE merges
        # it with an identical square elsewhere in the step (Adam's `nu` squares the same
        # gradient) and materialises the shared square: a temporary the size of the leaf.
        x = _lowering.keep_in_reduction(x)
    total = jnp.sum(_abs_squared(x, dtype, scale), dtype=dtype)
    if dtype != jnp.float32 and scale is not None:
        # A float64 sum beyond float32 even after the rescaling (a norm above ~1e43):
        # saturated, so that the norm reads float32's max and the tree stays finite.
        # (An element whose float64 square overflows, above ~1e154, is counted as Inf.)
        total = jnp.where(jnp.isfinite(total), jnp.minimum(total, _F32_MAX), total)
    return total.astype(jnp.float32)


def _norm_of_norms(norms: jax.Array) -> jax.Array:
    """sqrt(sum(norms**2)) of a small vector of norms (>= 0), without overflow.

    Scaled by the exact power of two that brings the largest norm into [0.5, 1): the
    sum of squares then lies in [0.25, len(norms)], far from overflow, and a norm is
    lost only if it is below 2**-63 of the largest (its square below float32's normal
    range), where its share of the total is under 2**-126 anyway. Scaling by the
    largest norm itself would not do: XLA may divide by multiplying with the
    reciprocal, and 1 / 3e38 is subnormal, flushed to zero on CPU. The exponent is
    clipped to +-100 so that the scale and its inverse are normal float32 numbers.
    """
    scale, inverse = _power_of_two_scale(jnp.max(norms), 100)
    return jnp.sqrt(jnp.sum(jnp.square(norms * scale))) * inverse


def _power_of_two_scale(largest: jax.Array, max_exponent: int) -> tuple[jax.Array, jax.Array]:
    """``(2**-e, 2**e)``, exactly, for the exponent ``e`` that brings ``largest`` (>= 0,
    finite) into [0.5, 1), clipped to ``+-max_exponent`` (at most 126: both stay normal
    float32 numbers); ``(1, 1)`` for 0."""
    _, exponent = jnp.frexp(largest)
    exponent = jnp.clip(exponent, -max_exponent, max_exponent).astype(jnp.int32)
    # The biased exponents written into float32 exponent bits.
    scale = jax.lax.bitcast_convert_type((127 - exponent) << 23, jnp.float32)
    inverse = jax.lax.bitcast_convert_type((127 + exponent) << 23, jnp.float32)
    return scale, inverse


def _ordinary(total: jax.Array) -> jax.Array:
    return jnp.isfinite(total) & (total >= _TINY_SUM_OF_SQUARES)


def _rescue_scale(total: jax.Array) -> jax.Array:
    """The factor the rescaled pass multiplies the elements by, chosen from the first
    pass's total: 2**-80 after an overflow (not finite), 2**80 after an underflow."""
    return jnp.where(jnp.isfinite(total), _SCALE_AFTER_UNDERFLOW, _SCALE_AFTER_OVERFLOW).astype(jnp.float32)


def _rescued_norm(scaled: jax.Array, scale: jax.Array) -> jax.Array:
    """The norm from a sum of squares of elements multiplied by ``scale``: NaN or Inf
    only when an element was, a finite norm beyond float32 saturating at its max."""
    return jnp.where(jnp.isfinite(scaled), jnp.minimum(jnp.sqrt(scaled) / scale, _F32_MAX), jnp.sqrt(scaled))


def _sum_of_squares_or_zero(x: Any, scale: jax.Array | None = None) -> jax.Array:
    if _is_float(x):
        return _leaf_sum_of_squares(x, scale)
    return jnp.zeros((), jnp.float32)


def _overflows_on_scaling(x: Any) -> bool:
    """A float leaf whose dtype's range is far below float32's (float16, the fp8 types):
    multiplied by a factor above 1 and rounded back to its dtype (as a loss scale below 1
    unscales it, ``_clipping.scale_tree``), a finite element can become Inf."""
    return _is_float(x) and not jnp.iscomplexobj(x) and float(jnp.finfo(jnp.asarray(x).dtype).max) < 1e30


def _scaled_in_dtype(x: jax.Array, scale: jax.Array) -> jax.Array:
    """``x * scale`` in float32, rounded through ``x``'s dtype when ``scale`` is above 1:
    then, as the optimizer given the scaled tree reads it, an element beyond the dtype's
    range is Inf. A factor of 1 or less (the usual unscaling) keeps the float32 product,
    so that a small gradient's norm does not underflow the dtype."""
    product = x.astype(jnp.float32) * scale
    return jnp.where(scale > 1.0, product.astype(x.dtype).astype(jnp.float32), product)


def _sums_of_squares(
    leaves: list[Any], input_scale: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per-leaf sums of squares (0 for non-float leaves), their total, the rescaled sums
    and the scale.

    The first pass reduces every leaf as it is. The rescaled pass (a ``lax.cond``
    branch) runs only when the first total is non-finite or tiny; on an ordinary step
    its value (zeros) and the scale are unused.
    """

    def first(x):
        if input_scale is None:
            return _sum_of_squares_or_zero(x)
        # The barrier keeps this multiply inside the reduction (XLA would otherwise share
        # it with the caller's own `x * input_scale` and materialise the product).
        x, own = _lowering.keep_in_reduction((x, input_scale))
        if _overflows_on_scaling(x):
            return _sum_of_squares_or_zero(_scaled_in_dtype(x, own))
        return _sum_of_squares_or_zero(x, own)

    # The barrier keeps the vector one concatenation: otherwise XLA rewrites each of its
    # elementwise consumers through the stack, and each becomes a kernel with one
    # operand per leaf (slow to compile on a tree of 1000 leaves).
    sums = _lowering.one_vector(jnp.stack([first(x) for x in leaves]))
    total = jnp.sum(sums)
    scale = _rescue_scale(total)

    def rescaled(operands):
        leaves, rescue = operands
        out = []
        for x in leaves:
            if input_scale is None:
                factor = rescue
            elif _overflows_on_scaling(x):  # rounded to its dtype first, as in `first`
                x, factor = _scaled_in_dtype(x, input_scale), rescue
            else:
                factor = rescue * input_scale
            # One barrier per leaf gives each leaf its own copy of the scalar factor:
            # otherwise XLA shares one broadcast of it between leaves of the same shape
            # and materialises it, a temporary the size of those leaves.
            x, own_factor = _lowering.own_operands((x, factor))
            out.append(_sum_of_squares_or_zero(x, own_factor))
        return _lowering.one_vector(jnp.stack(out))

    # The ordinary branch's value is never read (grad_stats keeps the first-pass sums
    # then); zeros rather than `sums`, which XLA would copy into the branch's output.
    scaled = jax.lax.cond(_ordinary(total), lambda operands: jnp.zeros_like(sums), rescaled, (leaves, scale))
    return sums, total, scaled, scale


def grad_stats(tree: Any) -> GradStats:
    """Computes the global norm, per-leaf norms and a finite flag in one pass.

    Non-float leaves (integer, bool, ``float0``) are ignored: they add nothing to the
    norm and their per-leaf norm is 0. ``None`` and empty subtrees hold no leaves. A tree
    with no float leaf has norm 0 and is finite.

    Args:
      tree: a pytree of arrays (gradients, updates or parameters).

    Returns:
      A :class:`GradStats`.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_gradhealth as gh
      >>> stats = gh.grad_stats({'w': jnp.array([3.0, 4.0]), 'b': jnp.array([12.0])})
      >>> float(stats.norm), bool(stats.finite), int(stats.first_nonfinite_leaf)
      (13.0, True, -1)
      >>> float(gh.grad_stats({'w': jnp.array([1e20, 1e20])}).norm)  # no overflow
      1.4142135...e+20
    """
    return _grad_stats(tree)


def _grad_stats(tree: Any, input_scale: jax.Array | None = None) -> GradStats:
    """:func:`grad_stats` of ``tree * input_scale`` (a float32 scalar), with the multiply
    inside the reductions: the scaled tree is never materialised. ``flax.nnx`` variables
    count as their values (gradients taken with respect to an ``nnx.split`` state hold
    ``nnx.Param`` nodes), so the recorded structure is the one ``LeafNorms.zeros`` gives."""
    return _grad_stats_and_scaled_norms(tree, input_scale)[0]


class _ScaledNorms(NamedTuple):
    """The norms of a :class:`GradStats` times ``2**-80`` (``_SCALE_AFTER_OVERFLOW``),
    for a norm that saturates at float32's max: its true value, ``norm * 2**80``, is
    beyond float32, its scaled value is not (so that a clip factor can be computed from
    it). Read them only where the matching norm is finite and saturated (a step that
    took the overflow branch); elsewhere they hold no meaning.

    Attributes:
      norm: float32 scalar, the global norm times ``2**-80``.
      leaf_norms: float32 ``[num_leaves]``, every leaf's norm times ``2**-80``.
    """

    norm: jax.Array
    leaf_norms: jax.Array


def _grad_stats_and_scaled_norms(tree: Any, input_scale: jax.Array | None = None) -> tuple[GradStats, _ScaledNorms]:
    """:func:`_grad_stats` and the norms times ``2**-80`` (:class:`_ScaledNorms`), from
    the same passes: the rescaled sums the overflow branch already computes, and the
    norm of the per-leaf norms that the global norm is taken from. No further pass over
    the gradients and no further reduction (unread, they cost nothing)."""
    leaves, treedef = jax.tree.flatten(_without_nnx_variables(tree))
    leaves = [jnp.asarray(x) if isinstance(x, float) else x for x in leaves]
    if not any(_is_float(x) for x in leaves):
        zero = jnp.zeros((), jnp.float32)
        zeros = jnp.zeros((len(leaves),), jnp.float32)
        stats = GradStats(
            norm=zero,
            finite=jnp.ones((), jnp.bool_),
            leaf_norms=LeafNorms(zeros, treedef),
            first_nonfinite_leaf=jnp.full((), -1, jnp.int32),
        )
        return stats, _ScaledNorms(zero, zeros)

    sums, total, scaled, scale = _sums_of_squares(leaves, input_scale)
    ordinary = _ordinary(total)
    # A leaf keeps its first-pass sum when the step was ordinary, or when the total was
    # not finite (overflow: scaled down by 2**-80) and its own sum was: scaling down
    # only loses a small leaf's digits (1e-15 next to 1e20 would come out 0). Otherwise
    # (tiny total: scaled up) its rescaled sum, non-finite only for a NaN or Inf element.
    keep = ordinary | (~jnp.isfinite(total) & jnp.isfinite(sums))
    finite_each = keep | jnp.isfinite(scaled)
    finite = jnp.all(finite_each)
    norms = jnp.where(keep, jnp.sqrt(sums), _rescued_norm(scaled, scale))
    # Off the ordinary path, every leaf's norm times the rescue scale (2**-80 after an
    # overflow, 2**80 after an underflow): unlike `norms`, never saturated, so that the
    # global norm's scaled value (`unit_norm`) holds a norm beyond float32 for a clip
    # (_ScaledNorms). Powers of two: the global norm is what the norm of `norms` was.
    unit_norms = jnp.where(keep, jnp.sqrt(sums) * scale, jnp.sqrt(scaled))
    unit_norm = _norm_of_norms(jnp.where(finite_each, unit_norms, 0.0))
    norm = jnp.where(
        ordinary,
        jnp.sqrt(total),
        jnp.where(finite, jnp.minimum(unit_norm / scale, _F32_MAX), jnp.sqrt(total)),
    )
    first_bad = jnp.where(finite, -1, jnp.argmin(finite_each))
    stats = GradStats(
        norm=norm,
        finite=finite,
        leaf_norms=LeafNorms(norms, treedef),
        first_nonfinite_leaf=first_bad.astype(jnp.int32),
    )
    # (A saturated norm comes from the overflow branch, whose scale is 2**-80.)
    return stats, _ScaledNorms(unit_norm, unit_norms)


def global_norm(tree: Any) -> jax.Array:
    """Global L2 norm of a pytree, float32, overflow- and underflow-safe.

    Squares and sums every leaf in float32 whatever its dtype (fp16, bf16, fp32;
    float64 leaves under x64 are reduced in float64), sums across leaves in float32,
    and recomputes with scaling only when the plain sum overflows or underflows.

    Args:
      tree: a pytree of arrays. Non-float leaves are ignored.

    Returns:
      A float32 scalar: the norm, or NaN/Inf if some element is NaN/Inf.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_gradhealth as gh
      >>> float(gh.global_norm([jnp.full((4,), 300.0, jnp.float16)]))  # fp16 sum > 65504
      600.0
    """
    return grad_stats(tree).norm


def path_name(path: tuple[Any, ...]) -> str:
    """Turns a jax key path into a ``/``-separated name, e.g. ``params/dense/kernel``.

    Example:
      >>> import jax
      >>> import optax_gradhealth as gh
      >>> [gh.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path({'a': [1, 2]})[0]]
      ['a/0', 'a/1']
    """
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(str(key.name))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    return "/".join(parts)


def leaf_names(tree: Any) -> list[str]:
    """Names of the leaves of ``tree`` in ``jax.tree.leaves`` order.

    Use it to name ``grad/first_nonfinite_leaf``: ``gh.leaf_names(params)[index]``.
    ``flax.nnx`` variables are named by their path (``kernel``, not ``kernel/value``),
    as the per-leaf metrics name them. Two leaves whose paths join to the same name (a
    key holding ``/``: ``{'a/b': x, 'a': {'b': y}}``) are told apart by a suffix on the
    later ones (``a/b(2)``; not ``#2``, which names a second guard's metric; the next
    number when that name is taken too), so that no leaf's metric overwrites another's.

    Example:
      >>> import optax_gradhealth as gh
      >>> gh.leaf_names({'dense': {'kernel': 0.0, 'bias': 0.0}})
      ['dense/bias', 'dense/kernel']
      >>> gh.leaf_names({'a/b': 0.0, 'a': {'b': 0.0}})
      ['a/b', 'a/b(2)']
    """
    names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(_without_nnx_variables(tree))[0]]
    # A suffix never takes a name that is already given or that a leaf has as its own
    # path (`{'a/b': x, 'a': {'b': y}, 'a/b(2)': z}` gives `a/b(3)` to the second leaf).
    taken = set(names)
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        if seen[name] == 1:
            unique.append(name)
            continue
        k = seen[name]
        while f"{name}({k})" in taken:
            k += 1
        seen[name] = k
        taken.add(f"{name}({k})")
        unique.append(f"{name}({k})")
    return unique


def leaf_norms(tree: Any) -> dict[str, jax.Array]:
    """Per-leaf L2 norms keyed by leaf path, from the same pass as :func:`global_norm`.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_gradhealth as gh
      >>> norms = gh.leaf_norms({'dense': {'kernel': jnp.ones((2, 2)), 'bias': jnp.zeros(2)}})
      >>> {k: float(v) for k, v in norms.items()}
      {'dense/bias': 0.0, 'dense/kernel': 2.0}
    """
    return grad_stats(tree).leaf_norms.as_dict()


_register_flax_serialization()
