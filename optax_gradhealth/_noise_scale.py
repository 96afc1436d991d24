"""The gradient noise scale from groups of examples: the estimates and their smoothing.

Pure functions over scalars, shared by the cross-device audit (the groups are the
devices) and by :func:`optax_gradhealth.record_noise_scale` (the groups are the
micro-batches of a gradient accumulation).

With ``k`` groups of ``b`` examples each (``B = k b`` in all), ``g_i`` the mean gradient
of group ``i`` and ``g`` the mean of the ``g_i``, the expectations
``E|g_i|^2 = |G|^2 + tr(Sigma) / b`` and ``E|g|^2 = |G|^2 + tr(Sigma) / B`` give the
unbiased estimates (McCandlish et al., "An Empirical Model of Large-Batch Training",
2018, appendix A)::

    |G|^2     ~ (k |g|^2 - mean_i |g_i|^2) / (k - 1)
    tr(Sigma) ~ b k (mean_i |g_i|^2 - |g|^2) / (k - 1)

and ``B_simple = tr(Sigma) / |G|^2``, estimated as the ratio of bias-corrected EMAs of
the two (each estimate alone is noisy, and ``|G|^2``'s can be negative).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["NoiseScale", "estimates", "fold"]


def estimates(
    mean_group_sq: jax.Array, mean_sq: jax.Array, k: int | jax.Array, group_size: float | jax.Array | None
) -> tuple:
    """``(|G|^2, tr(Sigma))`` estimated from ``mean_i |g_i|^2`` and ``|g|^2`` over ``k``
    groups of ``group_size`` examples (``tr(Sigma)`` is NaN without a group size, and
    both are ``|g|^2`` and NaN for one group)."""
    nan = jnp.full((), jnp.nan, jnp.float32)
    # ``k`` and ``group_size`` may be traced (optax.inject_hyperparams): selects, not ifs.
    kf = jnp.asarray(k, jnp.float32)
    one = kf < 2.0
    below = jnp.where(one, 1.0, kf - 1.0)
    # Divided before multiplied, so that an estimate float32 can hold does not overflow
    # part-way: ``(k a - b) / (k - 1) = a + (a - b) / (k - 1)``, and ``k / (k - 1)`` is at
    # most 2 (``k * a`` alone overflows for ``a`` above float32's max / k).
    grad_sq = jnp.where(one, mean_sq, mean_sq + (mean_sq - mean_group_sq) / below)
    if group_size is None:
        return grad_sq, nan
    spread = (mean_group_sq - mean_sq) * (kf / below)
    return grad_sq, jnp.where(one, nan, jnp.asarray(group_size, jnp.float32) * spread)


class NoiseScale(NamedTuple):
    """The smoothed estimates: EMAs (not bias-corrected) of ``|G|^2`` and ``tr(Sigma)``,
    the number of estimates folded into them, and ``B_simple`` from them."""

    grad_sq_ema: jax.Array
    trace_cov_ema: jax.Array
    count: jax.Array
    noise_scale: jax.Array


def fold(
    grad_sq_ema: jax.Array,
    trace_cov_ema: jax.Array,
    count: jax.Array,
    grad_sq: jax.Array,
    trace_cov: jax.Array,
    decay: float,
    finite: jax.Array,
) -> NoiseScale:
    """Folds one pair of estimates into the EMAs where ``finite``; ``B_simple`` is the
    ratio of the bias-corrected EMAs (NaN before the first estimate)."""
    grad_sq_ema = jnp.where(finite, decay * grad_sq_ema + (1 - decay) * grad_sq, grad_sq_ema)
    trace_cov_ema = jnp.where(finite, decay * trace_cov_ema + (1 - decay) * trace_cov, trace_cov_ema)
    count = count + finite.astype(jnp.int32)
    # Both EMAs carry the same bias correction ``1 - decay**count``: it cancels in the
    # ratio, and is left out. (Written as a quotient of two corrected EMAs, XLA:CPU
    # rearranged it into products of an EMA and the correction, which flush to 0 when
    # the EMA is below ~1.2e-38 / correction, ~1e-36 on the first step at decay 0.99:
    # 0 / 0 = NaN.)
    noise_scale = jnp.where(count > 0, trace_cov_ema / grad_sq_ema, jnp.nan)
    return NoiseScale(grad_sq_ema, trace_cov_ema, count, noise_scale)
