"""The remaining clipping modes, each recording what it did: element-wise value clipping,
per-layer (per-leaf) norm clipping, and unit-wise adaptive clipping (AGC).

Each is an ``optax.GradientTransformation`` usable anywhere in ``optax.chain``, and as
the ``clip=`` of :func:`optax_gradhealth.guard`, which chains it in front of the inner
optimizer::

    gh.guard(optax.adam(1e-3), clip=gh.clip_by_value(1.0))

The guard then measures the raw gradient, takes its skip / spike decisions on it, and
only accepted steps reach the clip and the optimizer, exactly the order the guard uses
for its own global-norm clip. On a skipped step the clip's state (and so its recorded
figures) stays as it was. The guard's ``grad/norm_clipped`` is the norm *before* these
modes (they are not a single global scale); their own metrics say what they did.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_gradhealth import _catalogue, _clipping, _interfaces, _lowering, _stats, _vma
from optax_gradhealth import _validation as check

__all__ = [
    "AdaGCState",
    "AdaptiveClipState",
    "ClipByLeafNormState",
    "ClipByValueState",
    "adagc_clip",
    "adaptive_grad_clip",
    "clip_by_leaf_norm",
    "clip_by_value",
]


def _fraction(count: jax.Array, total: int) -> jax.Array:
    return (count.astype(jnp.float32) / max(total, 1)).astype(jnp.float32)


# ----------------------------------------------------------------------------- value

# Row sums of 0/1 values in float32 are exact up to 2**24 per row (every partial sum is
# an integer that float32 holds exactly).
_EXACT_F32_COUNT = 2**24
_RARE_TRIPS = 128


def _bound(max_abs: float | jax.Array, dtype: Any) -> np.ndarray | jax.Array:
    """``max_abs`` in ``dtype`` (inf beyond its range, e.g. 7e4 in float16), no warning;
    a scalar array (``optax.inject_hyperparams``) is cast with jax."""
    if not isinstance(max_abs, float):
        return jnp.asarray(max_abs).astype(dtype)
    with np.errstate(over="ignore"):
        return np.asarray(max_abs, dtype)


def _rows(x: jax.Array) -> jax.Array:
    """``x`` as a 2-D array of rows (its last axis; a vector is one row). The number of
    rows is written out: ``reshape(-1, 0)`` of a leaf of shape ``(..., 0)`` is an error."""
    return x.reshape(1, -1) if x.ndim < 2 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def _exact_count(leaves: list[jax.Array], max_abs: float | jax.Array) -> jax.Array:
    """``|x| > max_abs`` counted with a comparison (the rare path): one loop of
    ``_RARE_TRIPS`` steps, each counting one block of rows of every leaf, so no
    temporary exceeds about ``1 / _RARE_TRIPS`` of a leaf.

    A block must be local to each device when the leaf is sharded: a block of rows
    sharded over the mesh (FSDP) would be gathered whole to be sliced. So
    the rows ``(R, C)`` are viewed as ``(gr, R / gr, gc, C / gc)``, ``gr`` and ``gc``
    their greatest common divisors with the device count (an even sharding of either
    axis, over ``n`` devices, has ``n`` dividing them: it stays on the chunk axes), and
    a block is a contiguous range of each chunk's rows and columns. With one device, or
    sizes no device count divides, that is the plain block of rows.
    """
    devices = jax.device_count()
    plans = []
    for x in leaves:
        x2 = _rows(x)
        num_rows, num_cols = x2.shape
        bound = jnp.asarray(_bound(max_abs, x.dtype))
        row_chunks, col_chunks = math.gcd(num_rows, devices), math.gcd(num_cols, devices)
        if row_chunks == col_chunks == 1:
            plans.append((x2, bound, (num_rows, -(-num_rows // _RARE_TRIPS), 1), None))
            continue
        rows, cols = num_rows // row_chunks, num_cols // col_chunks
        row_trips = min(rows, _RARE_TRIPS)
        col_trips = max(1, min(cols, _RARE_TRIPS // row_trips))
        sharding = _stats.explicit_sharding(x2)  # on an Explicit mesh, said: the chunk axes keep it
        if sharding is not None:
            spec = (*sharding.spec, None, None)[:2]
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(spec[0], None, spec[1]))
        x4 = jax.lax.reshape(x2, (row_chunks, rows, col_chunks, cols), out_sharding=sharding)
        plans.append((x4, bound, (rows, -(-rows // row_trips), col_trips), (cols, -(-cols // col_trips))))

    def fresh_range(x, index, size, block, axis):
        """Block ``index`` of ``block`` elements along ``axis`` (of ``size``; the last one
        overlaps the one before) and which of them no earlier block counted."""
        start = jnp.minimum(index * block, size - block)
        return jax.lax.dynamic_slice_in_dim(x, start, block, axis=axis), (start + jnp.arange(block)) >= index * block

    def body(i, total):
        for x, bound, (rows, row_block, col_trips), col_plan in plans:
            if col_plan is None:
                block, fresh = fresh_range(x, i, rows, row_block, axis=0)
                total = total + jnp.sum((jnp.abs(block) > bound) & fresh[:, None], dtype=jnp.int32)
                continue
            block, fresh = fresh_range(x, i // col_trips, rows, row_block, axis=1)
            block, fresh_cols = fresh_range(block, i % col_trips, *col_plan, axis=3)
            keep = fresh[None, :, None, None] & fresh_cols[None, None, None, :]
            total = total + jnp.sum((jnp.abs(block) > bound) & keep, dtype=jnp.int32)
        return total

    # (The count is typed per device when a leaf is, under shard_map: the loop's carry.)
    return jax.lax.fori_loop(0, _RARE_TRIPS, body, _vma.varying_like(jnp.zeros((), jnp.int32), leaves))


def _count_above(leaves: list[jax.Array], max_abs: float | jax.Array) -> jax.Array:
    """Number of elements with ``|x| > max_abs`` (in each leaf's dtype), NaN excluded.

    Counting with a comparison (``jnp.sum(|x| > b)``) is slow on XLA:CPU and
    materialises the boolean/integer array, a temporary the size of the gradients: its
    reductions only run fast on arithmetic. So each row (last axis) counts
    ``sign(max(|x| - b, 0))`` in float32, exactly (see ``_EXACT_F32_COUNT``), and the
    row counts are added as integers. A row holding a NaN or an Inf sums to NaN; then, on
    that rare step, a ``lax.cond`` recounts every leaf with the comparison, a block of
    rows at a time (no large temporary).
    """
    leaves = [x for x in leaves if x.size]  # an empty leaf has nothing to count
    if not leaves:
        return jnp.zeros((), jnp.int32)
    if not isinstance(max_abs, float):
        # A scalar array (optax.inject_hyperparams: traced in the step): the comparison,
        # a block of rows at a time; the fast path's constants are Python floats.
        return _exact_count(leaves, max_abs)

    def fast_rows(x):
        bound = float(_bound(max_abs, x.dtype))
        # Below ~1e-30 the difference |x| - b of two floats can be subnormal (flushed to
        # 0): compare min(|x|, 2b) * s with b * s, s a power of two that lifts b to ~1.
        lift = 2.0 ** -math.frexp(bound)[1] if 0.0 < bound < 1e-30 else 1.0
        # The barrier gives each leaf its own scalars: XLA would otherwise materialise one
        # broadcast of a shared constant as an array operand of every reduction.
        # Counted in float32, or in the leaf's own dtype when wider (a float64 element
        # just above the bound would round down to it in float32).
        wide = jnp.promote_types(x.dtype, jnp.float32)
        x, cap, lifted, zero = _lowering.own_operands(
            (x, *(jnp.asarray(v, wide) for v in (2.0 * bound, bound * lift, 0.0)))
        )
        rows = _rows(x).astype(wide)
        magnitude = jnp.abs(rows)
        if lift != 1.0:
            magnitude = jnp.minimum(magnitude, cap) * lift
        # `rows * 0` is 0, or NaN for a NaN or Inf element: such a row's count is NaN and
        # the rare path recounts it. (min/max alone would not say: XLA:CPU's reduction
        # library may return the other operand of a NaN, as x86's min/max do.)
        return jnp.sum(jnp.sign(jnp.maximum(magnitude - lifted, zero)) + rows * zero, axis=-1)

    # A row wider than 2**24 (a vector of more than 16M elements) would not count exactly
    # in float32: such a leaf is counted by comparison on every step (correct, as slow as
    # a plain `jnp.sum(|x| > b)`; its blocks are whole rows).
    fast_leaves, wide_leaves = [], []
    for x in leaves:
        (fast_leaves if _rows(x).shape[-1] <= _EXACT_F32_COUNT else wide_leaves).append(x)
    wide_count = _exact_count(wide_leaves, max_abs) if wide_leaves else jnp.zeros((), jnp.int32)
    if not fast_leaves:
        return wide_count
    # One vector of every row count (a few floats per row): one NaN test, one integer sum.
    row_counts = _lowering.one_vector(jnp.concatenate([_stats.replicated(fast_rows(x)) for x in fast_leaves]))
    counted = jax.lax.cond(
        jnp.isnan(jnp.sum(row_counts)),
        lambda: _exact_count(fast_leaves, max_abs),
        lambda: jnp.sum(row_counts.astype(jnp.int32), dtype=jnp.int32),
    )
    return wide_count + counted


class ClipByValueState(NamedTuple):
    """State of :func:`clip_by_value`: what the last step did.

    Attributes:
      value_clip_count: int32, elements whose magnitude exceeded ``max_abs`` and were
        clipped (``grad/num_value_clipped``).
      value_clip_fraction: float32, that count over the number of float elements
        (``grad/value_clip_fraction``).
    """

    value_clip_count: jax.Array
    value_clip_fraction: jax.Array


def clip_by_value(max_abs: float | jax.Array) -> optax.GradientTransformation:
    """Clips every element to ``[-max_abs, max_abs]`` and counts the clipped elements.

    The updates are those of ``optax.clip(max_abs)``. NaN elements pass through (and
    are not counted); skipping them is :func:`guard`'s job.

    Args:
      max_abs: the largest magnitude an element may keep (> 0); a scalar array too
        (``optax.inject_hyperparams``), counted by comparison (slower on CPU).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ClipByValueState`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import optax_gradhealth as gh
      >>> tx = gh.clip_by_value(1.0)
      >>> updates, state = tx.update({'w': jnp.array([-3.0, 0.5, 2.0, 1.0])}, tx.init(None))
      >>> updates['w'].tolist(), int(state.value_clip_count), float(state.value_clip_fraction)
      ([-1.0, 0.5, 1.0, 1.0], 2, 0.5)
    """
    max_abs = check.positive_or_array("max_abs", max_abs)

    def init_fn(params):
        del params
        return ClipByValueState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))

    def update_fn(updates, state, params=None):
        check.state_type("gh.clip_by_value", state, ClipByValueState)
        del state, params
        for path, leaf in jax.tree_util.tree_flatten_with_path(updates)[0]:
            if jnp.iscomplexobj(leaf):
                raise ValueError(
                    f"gh.clip_by_value: leaf {_stats.path_name(path)!r} is complex ({leaf.dtype}); complex values "
                    "have no order to clip by. Clip their real and imaginary parts, or use gh.clip_by_leaf_norm."
                )
        leaves = _stats._float_leaves(updates)
        total = sum(int(x.size) for x in leaves)
        count = _count_above(leaves, max_abs)

        def one(x):
            if not _stats._is_float(x):
                return x
            x = jnp.asarray(x)  # a Python float leaf
            bound = jnp.asarray(_bound(max_abs, x.dtype))
            return jnp.clip(x, -bound, bound)

        return jax.tree.map(one, updates), ClipByValueState(count, _fraction(count, total))

    return optax.GradientTransformation(init_fn, _vma.keeps_state_type(update_fn))


# ----------------------------------------------------------------------------- per layer


class ClipByLeafNormState(NamedTuple):
    """State of :func:`clip_by_leaf_norm`: what the last step did.

    Attributes:
      leaf_clip_fraction: float32, fraction of the float leaves (layers) that were
        clipped (``grad/leaf_clip_fraction``).
      leaf_clipped: bool per leaf, same structure as the gradients: which leaves
        were clipped (``grad/leaf_clipped/<path>``).
    """

    leaf_clip_fraction: jax.Array
    leaf_clipped: Any


def clip_by_leaf_norm(max_norm: float | jax.Array) -> optax.GradientTransformation:
    """Clips each leaf (layer parameter) to L2 norm ``max_norm`` independently.

    Each leaf ``g`` becomes ``g * min(1, max_norm / |g|)``; the norms are computed in
    float32 and overflow-safe (:func:`grad_stats`), whatever the dtype. A non-finite
    leaf passes through unchanged. The state records the fraction of leaves clipped and
    which ones.

    Args:
      max_norm: the largest L2 norm a leaf may keep (> 0).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ClipByLeafNormState`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import optax_gradhealth as gh
      >>> tx = gh.clip_by_leaf_norm(1.0)
      >>> grads = {'a': jnp.array([3.0, 4.0]), 'b': jnp.array([0.6, 0.0])}
      >>> updates, state = tx.update(grads, tx.init(grads))
      >>> updates['a'].tolist(), float(state.leaf_clip_fraction)
      ([0.6000000238418579, 0.800000011920929], 0.5)
      >>> {k: bool(v) for k, v in gh.metrics(state).items() if k.startswith('grad/leaf_clipped/')}
      {'grad/leaf_clipped/a': True, 'grad/leaf_clipped/b': False}
    """
    max_norm = check.positive_or_array("max_norm", max_norm)

    def init_fn(params):
        return ClipByLeafNormState(
            leaf_clip_fraction=jnp.zeros((), jnp.float32),
            leaf_clipped=jax.tree.map(lambda _: jnp.zeros((), jnp.bool_), params),
        )

    def update_fn(updates, state, params=None):
        check.state_type("gh.clip_by_leaf_norm", state, ClipByLeafNormState)
        del params
        _clipping.check_same_structure(updates, jax.tree.structure(state.leaf_clipped), "gh.clip_by_leaf_norm")
        # Leaf by leaf, in flattening order (nnx.Param wrappers, if any, are kept as
        # they come: the updates keep the gradients' structure, the flags the state's).
        leaves, treedef = jax.tree.flatten(updates)
        stats, scaled = _stats._grad_stats_and_scaled_norms(updates)
        norms = stats.leaf_norms.values
        threshold = jnp.asarray(max_norm, jnp.float32)
        # One vector of factors (one small kernel, not one per leaf); a leaf norm beyond
        # float32 saturates, and its factor comes from its scaled value.
        factor, correction = _clipping.clip_scale(norms, threshold, scaled.leaf_norms)
        new_leaves = [_clipping.scale_tree(x, (factor[i], correction[i])) for i, x in enumerate(leaves)]
        is_float = jnp.asarray([_stats._is_float(x) for x in leaves], jnp.bool_)
        flag_vector = is_float & (factor < 1.0)
        flags = [flag_vector[i] for i in range(len(leaves))]
        num_float = len(_stats._float_leaves(updates))
        count = jnp.sum(flag_vector, dtype=jnp.int32)
        clipped = jax.tree.structure(state.leaf_clipped).unflatten(flags)
        return treedef.unflatten(new_leaves), ClipByLeafNormState(_fraction(count, num_float), clipped)

    return optax.GradientTransformation(init_fn, _vma.keeps_state_type(update_fn))


# ----------------------------------------------------------------------------- AGC


class AdaptiveClipState(NamedTuple):
    """State of :func:`adaptive_grad_clip`: what the last step did.

    Attributes:
      agc_clip_count: int32, units whose gradient norm reached
        ``clipping * max(|W_unit|, eps)`` and were rescaled (``grad/num_agc_clipped``).
      agc_clip_fraction: float32, that count over the number of units
        (``grad/agc_clip_fraction``).
    """

    agc_clip_count: jax.Array
    agc_clip_fraction: jax.Array


def _unit_axes(x: jax.Array, axis: int | tuple[int, ...] | None) -> tuple[int, ...]:
    """The reduction axes of ``optax.unitwise_norm`` (same rule); an ``axis`` out of a
    parameter's range is an error, as in numpy (it is not wrapped around)."""
    if axis is not None:
        axes = (axis,) if isinstance(axis, int) else axis
        bad = [a for a in axes if not -x.ndim <= a < x.ndim]
        if bad:
            raise ValueError(
                f"gh.adaptive_grad_clip: `axis` {axis!r} is out of bounds for a parameter of shape {x.shape} "
                f"(rank {x.ndim}: axes {-x.ndim} to {x.ndim - 1})."
            )
        if len({a % x.ndim for a in axes}) != len(axes):
            raise ValueError(
                f"gh.adaptive_grad_clip: `axis` {axis!r} names one axis twice for a parameter of shape {x.shape}."
            )
        return tuple(a % x.ndim for a in axes)
    if sum(d != 1 for d in x.shape) <= 1:  # scalars and vectors: one unit
        return tuple(range(x.ndim))
    if x.ndim in (2, 3):
        return (0,)
    if x.ndim in (4, 5):
        return tuple(range(x.ndim - 1))
    raise ValueError(
        f"gh.adaptive_grad_clip: no default unit for a parameter of shape {x.shape}; pass `axis=` "
        "(the axes a unit's norm is taken over)."
    )


def adaptive_grad_clip(
    clipping: float | jax.Array = 0.01,
    eps: float | jax.Array = 1e-3,
    axis: int | tuple[int, ...] | None = None,
) -> optax.GradientTransformation:
    """Unit-wise adaptive gradient clipping (AGC) that counts the units it clipped.

    For every unit (an output column of a dense kernel, an output channel of a conv
    kernel, a whole vector), the gradient ``G_i`` is rescaled to norm
    ``clipping * max(|W_i|, eps)`` when ``|G_i|`` reaches that bound. The returned
    updates equal ``optax.adaptive_grad_clip(clipping, eps, axis)``'s for float32;
    fp16/bf16 norms are taken in float32 (no overflow of the squares) and the result
    is cast back to the leaf's dtype.

    Args:
      clipping: the ratio ``lambda`` of gradient norm to parameter norm (> 0).
        Brock et al. use 0.01 for large batches.
      eps: floor of the parameter norm, so zero-initialised units can move (> 0).
      axis: reduction axes of a unit (None: optax's rule by rank).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`AdaptiveClipState`;
      ``update`` requires ``params``.

    References:
      Brock et al., "High-Performance Large-Scale Image Recognition Without
      Normalization", 2021.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import optax_gradhealth as gh
      >>> tx = gh.adaptive_grad_clip(0.1)
      >>> params = {'w': jnp.ones((2, 2))}         # two units (columns) of norm sqrt(2)
      >>> grads = {'w': jnp.array([[1.0, 0.01], [1.0, 0.01]])}
      >>> updates, state = tx.update(grads, tx.init(params), params)
      >>> int(state.agc_clip_count), float(state.agc_clip_fraction)
      (1, 0.5)
    """
    clipping = check.positive_or_array("clipping", clipping)
    eps = check.positive_or_array("eps", eps)
    # (Its range depends on each parameter's rank: checked per leaf, `_unit_axes`.)
    axis = check.int_or_ints("axis", axis, distinct=True, or_none=True, context="gh.adaptive_grad_clip: ")

    def init_fn(params):
        del params
        return AdaptiveClipState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))

    def update_fn(updates, state, params=None):
        check.state_type("gh.adaptive_grad_clip", state, AdaptiveClipState)
        del state
        if params is None:
            raise ValueError("gh.adaptive_grad_clip needs `params`: call update(updates, state, params).")
        _clipping.check_same_structure(updates, jax.tree.structure(params), "gh.adaptive_grad_clip (updates vs params)")
        counts, total = [], 0

        def one(g, p):
            nonlocal total
            if not _stats._is_float(g):
                return g
            axes = _unit_axes(g, axis)
            wide = jnp.promote_types(g.dtype, jnp.float32)
            g_wide, p_wide = g.astype(wide), jnp.asarray(p).astype(wide)
            g_norm = jnp.sqrt(jnp.sum(jnp.square(jnp.abs(g_wide)), axis=axes, keepdims=True))
            p_norm = jnp.sqrt(jnp.sum(jnp.square(jnp.abs(p_wide)), axis=axes, keepdims=True))
            # In the working dtype: a float64 threshold under x64 would make it float64.
            max_norm = (clipping * jnp.maximum(p_norm, eps)).astype(wide)
            keep = g_norm < max_norm
            counts.append(jnp.sum(g_norm >= max_norm, dtype=jnp.int32))
            total += int(g_norm.size)
            clipped = g_wide * (max_norm / jnp.maximum(g_norm, 1e-6))
            # lax.select, not jnp.where: no nested call per leaf in the compiled step. (On
            # an Explicit mesh the predicate must be sharded as the gradient.)
            keep = jnp.broadcast_to(keep, g_wide.shape, out_sharding=_stats.explicit_sharding(g_wide))
            return jax.lax.select(keep, g_wide, clipped).astype(g.dtype)

        # Leaf by leaf, in flattening order (the updates and the params may differ in
        # nnx.Param wrappers); the updates keep their own structure.
        leaves, treedef = jax.tree.flatten(updates)
        new_updates = treedef.unflatten([one(g, p) for g, p in zip(leaves, jax.tree.leaves(params))])
        count = sum(counts, jnp.zeros((), jnp.int32))
        return new_updates, AdaptiveClipState(count, _fraction(count, total))

    return optax.GradientTransformation(init_fn, _vma.keeps_state_type(update_fn))


# ----------------------------------------------------------------------------- AdaGC


class AdaGCState(NamedTuple):
    """State of :func:`adagc_clip`.

    Attributes:
      adagc_norm_ema: float32 ``[L]``, one per leaf (flattening order): ``gamma``, the
        EMA of the leaf's non-zero clipped norms (during the warm-up, their running
        minimum; +inf until the leaf's first non-zero norm; 0 for a non-float leaf).
      adagc_num_steps: int32, steps folded into it (steps with a non-finite or an
        all-zero gradient are not).
      adagc_num_clipped: int32, leaves clipped this step (``grad/num_adagc_clipped``).
      adagc_clip_fraction: float32, that count over the float leaves
        (``grad/adagc_clip_fraction``).
    """

    adagc_norm_ema: jax.Array
    adagc_num_steps: jax.Array
    adagc_num_clipped: jax.Array
    adagc_clip_fraction: jax.Array


def adagc_clip(
    relative: float | jax.Array = 1.05,
    stats_decay: float | jax.Array = 0.98,
    warmup_steps: int | jax.Array = 100,
    warmup_max_norm: float | jax.Array = 1.0,
) -> optax.GradientTransformation:
    """Per-leaf adaptive clipping against each leaf's own history (AdaGC).

    Each leaf (tensor) ``i`` keeps ``gamma_i``, an exponential moving average of its own
    clipped gradient norms. With ``n_i`` the leaf's norm and ``N`` the global norm:

    * **warm-up** (the first ``warmup_steps`` steps, at least one): a global clip,
      ``h = min(warmup_max_norm / N, 1)`` for every leaf, and
      ``gamma_i = min(gamma_i, h n_i)`` (the running minimum of the clipped norms);
    * **after**: ``h_i = min(relative * gamma_i / n_i, 1)`` and
      ``gamma_i = stats_decay * gamma_i + (1 - stats_decay) * h_i n_i``.

    The leaf's gradient is multiplied by its ``h_i`` (in float32, cast back to its
    dtype). A step whose gradient is not finite leaves every ``gamma`` and the step
    count as they were (inside :func:`guard`, which skips it, it never reaches here).

    A zero norm carries no scale, so it is never folded into ``gamma`` (folded, one
    zero would make the running minimum, and with it the leaf's bound, 0 for good):
    a step whose whole gradient is zero (a fully masked batch) leaves every ``gamma``
    and the step count as they were, and a leaf whose own norm is zero keeps its
    ``gamma``. ``gamma_i`` starts at +inf; a leaf with no non-zero norm by the end of
    the warm-up (a zero-initialised layer, a layer not yet used) is not clipped until
    its first non-zero norm after it, which seeds ``gamma_i`` unclipped.

    Usable on its own in ``optax.chain`` and as ``gh.guard(..., clip=gh.adagc_clip())``,
    where only accepted steps reach it (and so its statistics).

    Args:
      relative: ``lambda_rel``, the norm a leaf may reach as a multiple of its
        ``gamma`` (> 0).
      stats_decay: the EMA's decay ``beta``, in (0, 1).
      warmup_steps: steps (with a finite, non-zero gradient) of global clipping
        before the per-leaf rule (int >= 0; 0 still uses the global rule on the first
        such step, to give ``gamma`` a value).
      warmup_max_norm: ``lambda_abs``, the global threshold during the warm-up (> 0).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`AdaGCState`.

    References:
      Wang et al., "AdaGC: Enhancing LLM Pretraining Stability via Adaptive Gradient
      Clipping", ICML 2026 (arXiv 2502.11034).

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_gradhealth as gh
      >>> tx = gh.adagc_clip(relative=1.0, stats_decay=0.5, warmup_steps=1, warmup_max_norm=10.0)
      >>> state = tx.init({'a': jnp.zeros(2), 'b': jnp.zeros(2)})
      >>> _, state = tx.update({'a': jnp.array([3.0, 4.0]), 'b': jnp.array([1.0, 0.0])}, state)
      >>> state.adagc_norm_ema.tolist()                         # warm-up: the norms, unclipped
      [5.0, 1.0]
      >>> updates, state = tx.update({'a': jnp.array([6.0, 8.0]), 'b': jnp.array([0.5, 0.0])}, state)
      >>> updates['a'].tolist(), updates['b'].tolist(), int(state.adagc_num_clipped)
      ([3.0, 4.0], [0.5, 0.0], 1)
      >>> state.adagc_norm_ema.tolist()                         # 0.5 * 5 + 0.5 * 5, 0.5 * 1 + 0.5 * 0.5
      [5.0, 0.75]
    """
    relative = check.positive_or_array("relative", relative)
    stats_decay = check.or_array(check.in_open_unit_interval, "stats_decay", stats_decay)
    warmup_steps = check.integer_or_array("warmup_steps", warmup_steps, minimum=0)
    warmup_max_norm = check.positive_or_array("warmup_max_norm", warmup_max_norm)

    def init_fn(params):
        num_leaves = len(jax.tree.leaves(params))
        return AdaGCState(
            adagc_norm_ema=jnp.full((num_leaves,), jnp.inf, jnp.float32),
            adagc_num_steps=jnp.zeros((), jnp.int32),
            adagc_num_clipped=jnp.zeros((), jnp.int32),
            adagc_clip_fraction=jnp.zeros((), jnp.float32),
        )

    def update_fn(updates, state, params=None):
        check.state_type("gh.adagc_clip", state, AdaGCState)
        del params
        leaves, treedef = jax.tree.flatten(updates)
        if len(leaves) != state.adagc_norm_ema.shape[0]:
            raise ValueError(
                f"gh.adagc_clip: the gradients have {len(leaves)} leaves, the state was initialised for "
                f"{state.adagc_norm_ema.shape[0]}. Call `init` with parameters of the same structure."
            )
        stats, scaled = _stats._grad_stats_and_scaled_norms(updates)
        norms, gamma = stats.leaf_norms.values, state.adagc_norm_ema
        is_float = jnp.asarray([_stats._is_float(x) for x in leaves], jnp.bool_)
        warm = state.adagc_num_steps >= jnp.maximum(warmup_steps, 1)
        decay = jnp.asarray(stats_decay, jnp.float32)
        # Warm-up: one global factor. After: a factor per leaf (clip_scale keeps exactly
        # 1 for a norm at or under the bound, and 0 / 0 never arises). Each is a pair of
        # factors, kept apart up to the multiply of the elements: their product can be a
        # float32 subnormal (a norm 1e38 times the bound), flushed to 0.
        global_factor = _clipping.clip_scale(stats.norm, jnp.asarray(warmup_max_norm, jnp.float32), scaled.norm)
        bound = jnp.asarray(relative, jnp.float32) * gamma
        local = _clipping.clip_scale(norms, bound, scaled.leaf_norms)
        factors = tuple(jnp.where(warm, local[k], global_factor[k]) for k in range(2))
        clipped_norms = _clipping.clipped_norm(norms, factors, scaled.leaf_norms)
        # A leaf's gamma stays +inf until its first non-zero norm: after the warm-up that
        # norm (its bound relative * inf never clips) seeds gamma, and the EMA starts from
        # it (decay * inf would stay inf). A zero norm carries no scale and is not folded:
        # folded, one would set the running minimum, and so the leaf's bound, to 0 for good.
        seeded = warm & jnp.isfinite(gamma)
        new_gamma = jnp.where(seeded, decay * gamma + (1.0 - decay) * clipped_norms, jnp.minimum(gamma, clipped_norms))
        new_gamma = jnp.where(clipped_norms > 0, new_gamma, gamma)
        # A non-float leaf has no norm: 0, not the initial Inf (a guard's update check
        # would take an Inf in the state for an optimizer's overflow and skip every step).
        new_gamma = jnp.where(is_float, new_gamma, 0.0)
        # An all-zero gradient (a fully masked batch) is no step of the warm-up.
        fold = stats.finite & (stats.norm > 0)
        flags = is_float & (factors[0] < 1.0)
        count = jnp.sum(flags, dtype=jnp.int32)
        new_leaves = [_clipping.scale_tree(x, (factors[0][i], factors[1][i])) for i, x in enumerate(leaves)]
        num_float = len(_stats._float_leaves(updates))
        return treedef.unflatten(new_leaves), AdaGCState(
            adagc_norm_ema=jnp.where(fold, new_gamma, gamma),
            adagc_num_steps=state.adagc_num_steps + fold.astype(jnp.int32),
            adagc_num_clipped=count,
            adagc_clip_fraction=_fraction(count, num_float),
        )

    return optax.GradientTransformation(init_fn, _vma.keeps_state_type(update_fn))


_interfaces.keep_on_momentum_reset(ClipByValueState, ClipByLeafNormState, AdaptiveClipState, AdaGCState)
_catalogue.register_metrics(
    ClipByValueState,
    {"value_clip_count": "grad/num_value_clipped", "value_clip_fraction": "grad/value_clip_fraction"},
)
_catalogue.register_metrics(
    ClipByLeafNormState,
    {"leaf_clip_fraction": "grad/leaf_clip_fraction", "leaf_clipped": "grad/leaf_clipped"},
)
_catalogue.register_metrics(
    AdaGCState, {"adagc_num_clipped": "grad/num_adagc_clipped", "adagc_clip_fraction": "grad/adagc_clip_fraction"}
)
_catalogue.register_metrics(
    AdaptiveClipState,
    {"agc_clip_count": "grad/num_agc_clipped", "agc_clip_fraction": "grad/agc_clip_fraction"},
)
