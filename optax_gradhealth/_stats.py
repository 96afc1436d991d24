"""One-pass gradient statistics: per-leaf float32 sums of squares, global norm, finite flag.

Pure functions, no state. Every leaf is squared and summed in float32 (float64 for
float64 leaves under x64) whatever its dtype, and the per-leaf sums are added in
float32, so fp16 and bf16 gradients neither overflow nor lose precision across leaves.

A single reduction gives the sum of squares of every leaf. Its total is finite and
not tiny on every ordinary step: then the norm is its square root and every element is
known to be finite (a NaN or Inf element makes the sum NaN or Inf). Only when the total
is non-finite (NaN, Inf, or an overflow of float32 by huge but finite elements) or so
small that squares may have underflowed does a second, rare branch (``lax.cond``)
recompute each leaf's sum of squares of its elements scaled by an exact power of two:
2**-80 for a leaf that overflowed (squares of float32 values, at most 3.4e38, become at
most 7.9e28, so no finite leaf overflows again), 2**80 for one that may have underflowed;
the global norm then combines the per-leaf norms without overflow. A sum that is still
non-finite then means a NaN or Inf element, so a huge but finite gradient gets its
right, finite norm and is not mistaken for NaN. The branch is one fused reduction per
leaf, like the ordinary one: no temporary the size of the gradients.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "GradStats",
    "global_norm",
    "grad_stats",
    "layer_norms",
    "leaf_names",
    "path_name",
]

# Below this total sum of squares, squares of small elements may have underflowed in
# float32 (elements under ~1e-19 square to subnormals or zero): take the scaled branch.
_TINY_SUM_OF_SQUARES = 1e-30
_SCALE_AFTER_OVERFLOW = 2.0**-80
_SCALE_AFTER_UNDERFLOW = 2.0**80
_F32_MAX = float(np.finfo(np.float32).max)


class GradStats(NamedTuple):
    """Statistics of a gradient pytree, from one reduction.

    Attributes:
      norm: global L2 norm, float32 scalar. NaN or Inf when ``finite`` is False. A
        finite tree whose norm exceeds the float32 range reports ``finfo(float32).max``.
      finite: bool scalar, True when every element of every float leaf is finite.
      leaf_norms: a pytree of the same structure as the input whose leaves are the
        float32 L2 norms of the input leaves (0 for non-float leaves). When the global
        norm is ordinary, elements below ~1e-19 in magnitude (whose squares underflow
        float32) add nothing to their leaf's norm; the global norm is unaffected.
      first_nonfinite_leaf: int32 scalar, the index (in ``jax.tree.leaves`` order) of
        the first leaf holding a NaN or Inf, or -1 when every leaf is finite.
    """

    norm: jax.Array
    finite: jax.Array
    leaf_norms: Any
    first_nonfinite_leaf: jax.Array


def _is_float(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return isinstance(x, float)
    return jnp.issubdtype(dtype, jnp.inexact)


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
    dtype = _accumulation_dtype(x)
    return jnp.sum(_abs_squared(x, dtype, scale), dtype=dtype).astype(jnp.float32)


def _norm_of_norms(norms: jax.Array) -> jax.Array:
    """sqrt(sum(norms**2)) of a small vector of norms (>= 0), without overflow."""
    largest = jnp.max(norms)
    scale = jnp.where(largest > 0, largest, 1.0)
    return scale * jnp.sqrt(jnp.sum(jnp.square(norms / scale)))


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
    leaves, treedef = jax.tree.flatten(tree)
    leaves = [jnp.asarray(x) if isinstance(x, float) else x for x in leaves]
    float_index = [i for i, x in enumerate(leaves) if _is_float(x)]
    zero = jnp.zeros((), jnp.float32)

    def assemble(norms_of_float_leaves: list[jax.Array]) -> list[jax.Array]:
        out = [zero] * len(leaves)
        for i, norm in zip(float_index, norms_of_float_leaves):
            out[i] = norm
        return out

    if not float_index:
        return GradStats(
            norm=zero,
            finite=jnp.ones((), jnp.bool_),
            leaf_norms=treedef.unflatten([zero] * len(leaves)),
            first_nonfinite_leaf=jnp.full((), -1, jnp.int32),
        )

    float_leaves = [leaves[i] for i in float_index]
    sums = jnp.stack([_leaf_sum_of_squares(x) for x in float_leaves])
    total = jnp.sum(sums)

    def ordinary(operands):
        sums, _ = operands
        return (
            jnp.sqrt(total),
            jnp.sqrt(sums),
            jnp.ones((), jnp.bool_),
            jnp.full((), -1, jnp.int32),
        )

    def rare(operands):
        sums, float_leaves = operands
        # Exact power-of-two scaling, chosen per leaf: down for a leaf whose sum
        # overflowed (or holds a NaN/Inf), up for one whose squares may have underflowed.
        # A leaf whose scaled sum is still non-finite holds a NaN or Inf.
        scale = jnp.where(
            jnp.isfinite(sums),
            jnp.where(sums >= _TINY_SUM_OF_SQUARES, 1.0, _SCALE_AFTER_UNDERFLOW),
            _SCALE_AFTER_OVERFLOW,
        ).astype(jnp.float32)
        scaled = jnp.stack([_leaf_sum_of_squares(x, scale[i]) for i, x in enumerate(float_leaves)])
        finite_each = jnp.isfinite(scaled)
        finite = jnp.all(finite_each)
        positions = jnp.asarray(float_index, jnp.int32)
        first_bad = jnp.where(finite, -1, positions[jnp.argmin(finite_each)])
        # A finite leaf (or tree) whose norm exceeds float32 saturates at its max.
        norms = jnp.where(finite_each, jnp.minimum(jnp.sqrt(scaled) / scale, _F32_MAX), jnp.sqrt(scaled))
        norm = jnp.where(finite, jnp.minimum(_norm_of_norms(norms), _F32_MAX), jnp.sqrt(total))
        return norm, norms, finite, first_bad.astype(jnp.int32)

    ordinary_path = jnp.isfinite(total) & (total >= _TINY_SUM_OF_SQUARES)
    norm, norms, finite, first_bad = jax.lax.cond(ordinary_path, ordinary, rare, (sums, float_leaves))
    leaf_norms = treedef.unflatten(assemble([norms[j] for j in range(len(float_index))]))
    return GradStats(norm=norm, finite=finite, leaf_norms=leaf_norms, first_nonfinite_leaf=first_bad)


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

    Example:
      >>> import optax_gradhealth as gh
      >>> gh.leaf_names({'dense': {'kernel': 0.0, 'bias': 0.0}})
      ['dense/bias', 'dense/kernel']
    """
    return [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def layer_norms(tree: Any) -> dict[str, jax.Array]:
    """Per-leaf L2 norms keyed by leaf path, from the same pass as :func:`global_norm`.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_gradhealth as gh
      >>> norms = gh.layer_norms({'dense': {'kernel': jnp.ones((2, 2)), 'bias': jnp.zeros(2)}})
      >>> {k: float(v) for k, v in norms.items()}
      {'dense/bias': 0.0, 'dense/kernel': 2.0}
    """
    stats = grad_stats(tree)
    flat = jax.tree_util.tree_flatten_with_path(stats.leaf_norms)[0]
    return {path_name(p): v for p, v in flat}
