"""Hashes and the count sketch: a fixed-size random projection of a gradient.

Shared by the cross-device audit (pairwise cosines between devices, fingerprints of
gradients and parameters) and by :func:`optax_gradhealth.record_step_cosine` (the
cosine between consecutive steps' gradients). Pure functions; the salts and offsets
are static, drawn from a seed, so a map is the same on every call and every device.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optax_gradhealth import _stats

__all__ = ["LeafSeeds", "bits_u32", "leaf_fingerprint", "leaf_sketch", "mix32", "positions", "u32"]


def u32(value: int) -> jax.Array:
    return jnp.asarray(np.uint32(value & 0xFFFFFFFF))


def mix32(h: jax.Array) -> jax.Array:
    """A 32-bit integer finaliser (xorshift-multiply): every output bit depends on every input bit."""
    h = h ^ (h >> 16)
    h = h * u32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * u32(0x846CA68B)
    return h ^ (h >> 16)


def bits_u32(x: jax.Array) -> list[jax.Array]:
    """The bit pattern of an array leaf as uint32 arrays in the leaf's own shape: one, or
    two for a complex leaf (real and imaginary parts); a 64-bit type adds a trailing axis
    of 2 (its words). Integers and bools too, for the parameter fingerprint. Read in
    order, row-major, they are the leaf's bits as one flat vector; no array is flattened
    here, so a leaf sharded along any axis stays where it is."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return [_bits(part) for part in ((jnp.real(x), jnp.imag(x)) if jnp.iscomplexobj(x) else (x,))]


def _bits(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    bits = jax.dtypes.itemsize_bits(x.dtype)
    if bits in (32, 64):
        return lax.bitcast_convert_type(x, jnp.uint32)
    if bits == 16:
        return lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    if bits == 8:
        return lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)  # fp8, int8, uint8
    # sub-byte types (int4, fp4): their values, converted exactly to 32 bits
    wide = jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating) else jnp.int32
    return lax.bitcast_convert_type(x.astype(wide), jnp.uint32)


def positions(shape: tuple[int, ...], base: int = 0, sharding: Any = None, axes: int | None = None) -> jax.Array:
    """uint32 row-major position (plus ``base``) of every element of an array of ``shape``,
    from one iota per axis times its static stride: elementwise, so the partitioner keeps
    it where the leaf is (``sharding``: the leaf's, for an Explicit mesh). ``axes``: the
    position of the element's row over the first ``axes`` axes only (times the size of
    the rest)."""
    axes = len(shape) if axes is None else axes
    idx, stride = None, math.prod(shape[axes:])
    for d in reversed(range(axes)):
        term = lax.broadcasted_iota(jnp.uint32, shape, d, out_sharding=sharding)
        term = term * u32(stride) if stride != 1 else term
        idx = term if idx is None else term + idx
        stride *= shape[d]
    if idx is None:
        idx = jnp.zeros(shape, jnp.uint32, out_sharding=sharding)
    return idx + u32(base) if base else idx


def leaf_fingerprint(x: jax.Array, salt: jax.Array) -> jax.Array:
    """uint32 hash of the bits of one leaf and their positions (sums of hashes wrap mod 2^32).

    The position is the element's row-major index (each 32-bit word of a 64-bit type,
    then the imaginary parts after the real ones), computed in place: a hash of every
    element and a full reduction, so a sharded leaf is summed where it lies, with one
    scalar all-reduce, and never gathered."""
    total, base = None, 0
    for bits in bits_u32(x):
        position = positions(bits.shape, base, jax.typeof(bits).sharding)
        # One mix per element: the position enters through an odd-multiplier (bijective) spread.
        part = jnp.sum(mix32(bits ^ (position * u32(0x9E3779B1) + salt)), dtype=jnp.uint32)
        total = part if total is None else total + part
        base += bits.size
    return total


def leaf_sketch(x: jax.Array, dim: int, salt: jax.Array, offset: int) -> jax.Array:
    """Count-sketch of one leaf into ``dim`` float32 buckets.

    Element i goes to bucket ``(i // rows + offset) mod dim`` (``rows = ceil(n / dim)``)
    with a pseudo-random sign from a hash of (i, salt). The salt and offset are drawn
    from the static ``sketch_seed`` (and the shard index when the leaf is split across
    devices), so the map is the same on every data-parallel device and ``<sketch(x), sketch(y)>`` estimates ``<x, y>``
    without bias, with a standard error of about ``|x| |y| / sqrt(dim)``.

    A leaf sharded on an Explicit mesh is sketched in place (:func:`_sketch_in_place`):
    the same map, summed in another order. Otherwise the leaf is flattened, which is free
    on one device and for a leaf split along its first axis only; on an Auto mesh a leaf
    split along another axis is gathered for it.
    """
    x = jnp.asarray(x)
    if _stats.explicitly_split(x):
        return _sketch_in_place(x, dim, salt, offset)
    x = x.reshape(-1)
    if jnp.iscomplexobj(x):
        x = jnp.concatenate([jnp.real(x), jnp.imag(x)])
    x = x.astype(jnp.float32)
    n = x.shape[0]
    rows = -(-n // dim)
    sign_bits = mix32(lax.iota(jnp.uint32, n) ^ salt) >> 31
    signed = jnp.pad(jnp.where(sign_bits == 0, x, -x), (0, rows * dim - n))
    # Contiguous blocks of ``rows`` elements share a bucket: a reduction over the minor
    # axis, which XLA fuses with the sign flip (no gradient-sized temporary).
    return jnp.roll(jnp.sum(signed.reshape(dim, rows), axis=1), offset)


def _row_split(shape: tuple[int, ...], rows: int) -> tuple[int, int] | None:
    """``(axis, m)``: rows over the axes before ``axis``, each spanning at most ``m`` <= 3
    buckets of ``rows`` elements, and few enough (``16 m R <= n``) to scatter-add; None
    when no axis gives both (1-D and small leaves, or a few very long rows)."""
    n, best = math.prod(shape), None
    for axis in range(1, len(shape)):
        t = math.prod(shape[axis:])
        m = (rows - 1 + t - 1) // rows + 1
        if m <= 3 and 16 * m * (n // t) <= n and (best is None or (m, n // t) < best[1:]):
            best = (axis, m, n // t)
    return None if best is None else best[:2]


def _sketch_in_place(x: jax.Array, dim: int, salt: jax.Array, offset: int) -> jax.Array:
    """:func:`leaf_sketch`'s map without flattening the leaf: the element's row-major
    position from :func:`positions`, each row of the leaf (its last axes) summed into the
    <= 3 buckets it spans (one variadic reduction, partial sums all-reduced), and those
    row sums scatter-added into the buckets. A leaf with no such rows is gathered first."""
    if x.size == 0:  # nothing to sketch (and no rows to split)
        return jnp.zeros((dim,), jnp.float32)
    parts = [jnp.real(x), jnp.imag(x)] if jnp.iscomplexobj(x) else [x]
    shape, n = x.shape, x.size
    rows = -(-n * len(parts) // dim)
    split = _row_split(shape, rows)
    if split is None:
        return leaf_sketch(_stats.replicated(x), dim, salt, offset)
    axis, m = split
    inner = tuple(range(axis, len(shape)))
    sums, buckets = [], []
    for j, part in enumerate(parts):
        part = part.astype(jnp.float32)
        sharding = jax.typeof(part).sharding
        position = positions(shape, j * n, sharding)
        signed = jnp.where(mix32(position ^ salt) >> 31 == 0, part, -part)
        # which of its row's buckets an element falls in: 0 .. m-1
        k = position // u32(rows) - positions(shape, j * n, sharding, axis) // u32(rows)
        masked = tuple(jnp.where(k == i, signed, 0.0) for i in range(m))
        zero = (np.float32(0),) * m
        sums += lax.reduce(masked, zero, lambda a, b: tuple(u + v for u, v in zip(a, b, strict=True)), inner)
        first = (positions(shape[:axis]) * u32(math.prod(shape[axis:])) + u32(j * n)) // u32(rows)
        buckets += [((first + u32(i + offset)) % u32(dim)).astype(jnp.int32) for i in range(m)]
    row_sums = _stats.replicated(jnp.stack(sums))  # m x (rows of the leaf): small
    return jnp.zeros((dim,), jnp.float32).at[jnp.stack(buckets)].add(row_sums)


class LeafSeeds:
    """``(salt, offset)`` for leaf ``i``: drawn once from ``seed``, static thereafter."""

    def __init__(self, seed: int, dim: int):
        self._rng = np.random.default_rng(seed)
        self._dim = dim
        self._seeds: list[tuple[int, int]] = []

    def __call__(self, i: int) -> tuple[int, int]:
        while len(self._seeds) <= i:
            self._seeds.append((int(self._rng.integers(0, 2**32)), int(self._rng.integers(0, self._dim))))
        return self._seeds[i]
