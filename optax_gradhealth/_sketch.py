"""Hashes and the count sketch: a fixed-size random projection of a gradient.

Shared by the cross-device audit (pairwise cosines between devices, fingerprints of
gradients and parameters) and by :func:`optax_gradhealth.record_step_cosine` (the
cosine between consecutive steps' gradients). Pure functions; the salts and offsets
are static, drawn from a seed, so a map is the same on every call and every device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["LeafSeeds", "bits_u32", "leaf_fingerprint", "leaf_sketch", "mix32", "u32"]


def u32(value: int) -> jax.Array:
    return jnp.asarray(np.uint32(value & 0xFFFFFFFF))


def mix32(h: jax.Array) -> jax.Array:
    """A 32-bit integer finaliser (xorshift-multiply): every output bit depends on every input bit."""
    h = h ^ (h >> 16)
    h = h * u32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * u32(0x846CA68B)
    return h ^ (h >> 16)


def bits_u32(x: jax.Array) -> jax.Array:
    """The bit pattern of an array leaf as a flat uint32 vector (complex: real and
    imaginary parts; integers and bools too, for the parameter fingerprint)."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if jnp.iscomplexobj(x):
        x = jnp.stack([jnp.real(x), jnp.imag(x)])
    x = x.reshape(-1)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    bits = jax.dtypes.itemsize_bits(x.dtype)
    if bits == 32:
        return lax.bitcast_convert_type(x, jnp.uint32)
    if bits == 64:
        return lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    if bits == 16:
        return lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    if bits == 8:
        return lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)  # fp8, int8, uint8
    # sub-byte types (int4, fp4): their values, converted exactly to 32 bits
    wide = jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating) else jnp.int32
    return lax.bitcast_convert_type(x.astype(wide), jnp.uint32)


def leaf_fingerprint(x: jax.Array, salt: jax.Array) -> jax.Array:
    """uint32 hash of the bits of one leaf and their positions (sums of hashes wrap mod 2^32)."""
    bits = bits_u32(x)
    position = lax.iota(jnp.uint32, bits.shape[0])
    # One mix per element: the position enters through an odd-multiplier (bijective) spread.
    return jnp.sum(mix32(bits ^ (position * u32(0x9E3779B1) + salt)), dtype=jnp.uint32)


def leaf_sketch(x: jax.Array, dim: int, salt: jax.Array, offset: int) -> jax.Array:
    """Count-sketch of one leaf into ``dim`` float32 buckets.

    Element i goes to bucket ``(i // rows + offset) mod dim`` (``rows = ceil(n / dim)``)
    with a pseudo-random sign from a hash of (i, salt). The salt and offset are drawn
    from the static ``sketch_seed`` (and the shard index when the leaf is split across
    devices), so the map is the same on every data-parallel device and ``<sketch(x), sketch(y)>`` estimates ``<x, y>``
    without bias, with a standard error of about ``|x| |y| / sqrt(dim)``.
    """
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
