"""Cross-device audit for data-parallel training inside ``jax.pmap`` / ``jax.shard_map``.

``cross_device`` receives each device's local (pre-all-reduce) gradient, performs the
mean all-reduce itself and records what the all-reduce would otherwise hide:

* every step, from one scalar per device (carried by the gradient all-reduce): the per-device
  gradient norms, their dispersion, the exact agreement score and the gradient noise
  scale (McCandlish et al. 2018, appendix A.1);
* on audit steps (every step for the first ``audit_first_steps`` updates, then every
  ``audit_every``): each device's cosine to the mean gradient, a K x K pairwise cosine
  matrix from a count-sketch random projection, exact duplicate gradients (gradient
  fingerprints), the outlier device and a parameter fingerprint compared across replicas.

Every recorded value is computed from collectives, so it is bitwise identical on every
device: the state can leave ``shard_map`` with ``out_specs=P()`` and a downstream
``gh.guard`` takes the same skip decision everywhere.

Per-device quantities are gathered with a masked ``psum`` (each device writes its own
row of a ``[K, m]`` array, zeros elsewhere): the sum is exact, the result is identical
everywhere and, under ``shard_map``'s ``check_vma``, it is typed as replicated.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optax_gradhealth import _catalogue, _interfaces, _lowering, _stats, _vma
from optax_gradhealth import _detectors as detect
from optax_gradhealth import _noise_scale as noise
from optax_gradhealth import _sketch as sketch
from optax_gradhealth import _validation as check

__all__ = [
    "Alarm",
    "CrossDeviceState",
    "cross_device",
    "cross_device_alarms",
    "local_grad",
    "local_value_and_grad",
]


class CrossDeviceState(NamedTuple):
    """State of :func:`cross_device`; every field is prefixed ``xdev_``.

    ``K`` is the number of devices on the data axes. The audit fields
    (``xdev_cosine_to_mean`` to ``xdev_param_desync``) hold the values of the latest audit
    step; ``xdev_audited`` says whether the latest update was one.

    Before the first update every count, norm, score, spread and piece of evidence is 0,
    every flag False, ``xdev_norm_max_over_min`` 1, ``xdev_pairwise_cosine`` the identity,
    ``xdev_outlier_device`` -1 and ``xdev_noise_scale`` NaN (``xdev_trace_cov_est`` too
    without ``per_device_batch``): nothing is flagged and no estimate exists yet.

    Attributes:
      xdev_num_steps: int32, updates seen.
      xdev_num_audits: int32, audit steps performed (``xdev/num_audits``: a log whose rows
        fall between audits tells from its growth which rows hold a new audit).
      xdev_device_norms: float32 [K], each device's local gradient norm (``xdev/device_norms``).
      xdev_norm_cv: coefficient of variation of the device norms (population std / mean).
      xdev_norm_max_over_min: largest over smallest device norm.
      xdev_agreement: ``(K^2 |g|^2 - sum_k |g_k|^2) / ((K - 1) sum_k |g_k|^2)``, the mean
        pairwise inner product over the mean squared norm: 1 when all devices agree,
        ~0 for orthogonal (pure noise) gradients, -1/(K-1) when they cancel.
      xdev_grad_sq_est: this step's unbiased estimate of the true gradient's squared
        norm ``|G|^2``.
      xdev_trace_cov_est: this step's estimate of ``tr(Sigma)``, the per-example
        gradient covariance trace (NaN without ``per_device_batch``).
      xdev_grad_sq_ema, xdev_trace_cov_ema: EMAs of the two estimates (not bias-corrected),
        updated on finite steps only.
      xdev_num_noise_steps: int32, finite steps folded into the two EMAs.
      xdev_noise_scale: ``B_simple``: ratio of the bias-corrected EMAs (NaN without
        ``per_device_batch``).
      xdev_audited: bool, the latest update was an audit step.
      xdev_cosine_to_mean: float32 [K], exact cosine of each device's gradient to the mean.
      xdev_pairwise_cosine: float32 [K, K], pairwise cosines estimated from the sketches.
      xdev_mean_pairwise_cosine: mean of the off-diagonal entries of the above.
      xdev_outlier_device: int32, device index (position on the data axes) of the named
        outlier with the most evidence, -1 when no device is named.
      xdev_outlier_score: the largest instant device score (see :func:`cross_device`).
      xdev_outlier_devices: bool [K], every device named as an outlier (instant score
        above ``outlier_threshold``, or CUSUM evidence above ``outlier_evidence`` with a
        score above ``outlier_drift``).
      xdev_norm_score: float32 [K], each device's robust log-norm score.
      xdev_direction_score: float32 [K], each device's robust score of ``log(1 - c_k)``, ``c_k``
        its leave-one-out cosine.
      xdev_outlier_evidence: float32 [K], each device's CUSUM evidence of being an outlier,
        accumulated over audits.
      xdev_duplicate_pairs: bool [K, K], ``[j, k]`` is True when devices j != k produced
        bit-identical non-zero gradients.
      xdev_param_desync: bool [K], True for devices whose parameter fingerprint (every array
        leaf, integer leaves included) differs from that of a strict majority (more than K/2
        devices); all True when no strict majority agrees (K = 2 with differing replicas, a
        2-2 split), all False when ``params`` is not passed to ``update``.
      xdev_near_duplicate_pairs: bool [K, K], pairs whose sketched cosine has stood far
        above the other pairs' for several audits (same examples, different noise).
      xdev_pair_evidence: float32 [K, K], the CUSUM evidence behind it.
      xdev_num_detector_audits: int32, finite audits folded into the running spreads.
      xdev_norm_spread_ema, xdev_cosine_spread_ema: EMAs (decay 0.9 per audit, bias-corrected
        with ``xdev_num_detector_audits``) of the cross-device spread (1.4826 MAD) of the
        log-norms and of ``log(1 - c_k)``; the outlier scores divide by them.
    """

    xdev_num_steps: jax.Array
    xdev_num_audits: jax.Array
    xdev_device_norms: jax.Array
    xdev_norm_cv: jax.Array
    xdev_norm_max_over_min: jax.Array
    xdev_agreement: jax.Array
    xdev_grad_sq_est: jax.Array
    xdev_trace_cov_est: jax.Array
    xdev_grad_sq_ema: jax.Array
    xdev_trace_cov_ema: jax.Array
    xdev_num_noise_steps: jax.Array
    xdev_noise_scale: jax.Array
    xdev_audited: jax.Array
    xdev_cosine_to_mean: jax.Array
    xdev_pairwise_cosine: jax.Array
    xdev_mean_pairwise_cosine: jax.Array
    xdev_outlier_device: jax.Array
    xdev_outlier_score: jax.Array
    xdev_duplicate_pairs: jax.Array
    xdev_param_desync: jax.Array
    xdev_outlier_devices: jax.Array
    xdev_norm_score: jax.Array
    xdev_direction_score: jax.Array
    xdev_outlier_evidence: jax.Array
    xdev_near_duplicate_pairs: jax.Array
    xdev_pair_evidence: jax.Array
    xdev_num_detector_audits: jax.Array
    xdev_norm_spread_ema: jax.Array
    xdev_cosine_spread_ema: jax.Array


_XDEV_FIELDS = {
    "xdev_device_norms": "xdev/device_norms",
    "xdev_norm_cv": "xdev/norm_cv",
    "xdev_norm_max_over_min": "xdev/norm_max_over_min",
    "xdev_agreement": "xdev/agreement",
    "xdev_audited": "xdev/audited",
    "xdev_num_audits": "xdev/num_audits",
    "xdev_cosine_to_mean": "xdev/cosine_to_mean",
    "xdev_pairwise_cosine": "xdev/pairwise_cosine",
    "xdev_mean_pairwise_cosine": "xdev/mean_pairwise_cosine",
    "xdev_outlier_device": "xdev/outlier_device",
    "xdev_outlier_score": "xdev/outlier_score",
    "xdev_duplicate_pairs": "xdev/duplicate_pairs",
    "xdev_param_desync": "xdev/param_desync",
    "xdev_outlier_devices": "xdev/outlier_devices",
    "xdev_norm_score": "xdev/norm_score",
    "xdev_direction_score": "xdev/direction_score",
    "xdev_outlier_evidence": "xdev/outlier_evidence",
    "xdev_near_duplicate_pairs": "xdev/near_duplicate_pairs",
    "xdev_noise_scale": "xdev/noise_scale",
    "xdev_grad_sq_est": "xdev/grad_sq_est",
    "xdev_trace_cov_est": "xdev/trace_cov_est",
}

_catalogue.register_metrics(CrossDeviceState, _XDEV_FIELDS)
_interfaces.keep_on_momentum_reset(CrossDeviceState)
_interfaces.must_wrap(
    CrossDeviceState,
    "gh.cross_device",
    "each device's guard judges its own local gradient, so devices skip different steps and the parameter "
    "replicas drift apart (the guard must see the mean that gh.cross_device returns)",
    before="optax.chain(gh.cross_device(...), {outer}(...))",
)


# Decay (per audit step) of the running cross-device spreads the outlier scores divide by.
_SPREAD_DECAY = 0.9
# The audit detectors' defaults, chosen from the detection benchmark (docs/detection.md).
OUTLIER_THRESHOLD = 10.0  # instant score that names a device at once
OUTLIER_EVIDENCE = 12.0  # CUSUM evidence that names a device
OUTLIER_DRIFT = 2.0  # CUSUM drift: a clean device's score stays below it on average
NEAR_DUPLICATE_EVIDENCE = 12.0
NEAR_DUPLICATE_DRIFT = 3.0
NORM_FLOOR = 0.1
COSINE_FLOOR = 0.05
PAIR_FLOOR = 0.05


def default_audit_rule(**overrides: float) -> dict[str, float]:
    """The keyword arguments of ``_detectors.audit_update`` that ``cross_device`` uses by
    default (what the host-side replays use too), with ``overrides`` applied."""
    rule = dict(
        outlier_threshold=OUTLIER_THRESHOLD,
        evidence_threshold=OUTLIER_EVIDENCE,
        evidence_drift=OUTLIER_DRIFT,
        norm_floor=NORM_FLOOR,
        cosine_floor=COSINE_FLOOR,
        pair_threshold=NEAR_DUPLICATE_EVIDENCE,
        pair_drift=NEAR_DUPLICATE_DRIFT,
        pair_floor=PAIR_FLOOR,
        spread_decay=_SPREAD_DECAY,
    )
    rule.update(overrides)
    return rule


# ----------------------------------------------------------------------------- axes


def _as_axes(name: str, value: Any, *, allow_empty: bool) -> tuple[str, ...]:
    given = value
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not all(isinstance(a, str) and a for a in value):
        raise TypeError(
            f"`{name}` must be a mesh/pmap axis name (a non-empty str) or a tuple of them, got {given!r} "
            f"(type {type(given).__name__})."
        )
    value = tuple(value)
    if not value and not allow_empty:
        raise ValueError(f"`{name}` must name at least one axis, e.g. {name}='data'.")
    if len(set(value)) != len(value):
        raise ValueError(f"`{name}` names an axis twice: {value!r}.")
    return value


def _bound_axes_hint() -> str:
    try:
        names = tuple(jax.sharding.get_abstract_mesh().axis_names)
    except Exception:  # pragma: no cover - no mesh API
        names = ()
    if names:
        return f"the axes bound here are {names!r}"
    return "no mesh axis is bound here (not inside jax.shard_map); a jax.pmap axis must match its axis_name"


def _axis_size(axes: tuple[str, ...], what: str) -> int:
    try:
        return int(lax.axis_size(axes if len(axes) > 1 else axes[0]))
    except NameError as err:
        raise ValueError(
            f"`{what}={axes if len(axes) > 1 else axes[0]!r}` is not a bound axis ({_bound_axes_hint()}). "
            "Call the update inside jax.pmap(step, axis_name=...) or jax.shard_map(step, mesh=...) whose "
            f"axis names include it, or fix `{what}`."
        ) from err


def _vma_checked(axes: tuple[str, ...]) -> bool:
    """True inside ``jax.shard_map(..., check_vma=True)`` for these axes."""
    varying = _vma.varying_axes(lax.axis_index(axes if len(axes) > 1 else axes[0]))
    return bool(varying) and set(axes) <= varying


def _to_varying(tree: Any, axes: tuple[str, ...]) -> Any:
    if not _vma_checked(axes):
        return tree

    def cast(x):
        if not _stats._is_float(x):
            return x
        missing = tuple(a for a in axes if a not in (_vma.varying_axes(x) or frozenset()))
        return lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree)


# ----------------------------------------------------------------------------- local grads


def local_value_and_grad(
    fun: Callable[..., Any],
    axis_name: str | Sequence[str] = "data",
    *,
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
) -> Callable[..., Any]:
    """``jax.value_and_grad`` that returns each device's LOCAL gradient inside ``shard_map``.

    Inside ``jax.shard_map`` (with the default ``check_vma=True``), ``jax.grad`` with respect
    to replicated parameters (``in_specs=P()``) returns the SUM of the gradients of all
    devices, already reduced: a following ``pmean`` is a no-op and pmap-style code
    silently applies K-times-too-large gradients. This wrapper first casts the
    differentiated arguments to "varying" over ``axis_name`` (``jax.lax.pcast``), so the
    gradient is the device's own, as under ``jax.pmap``. Under ``jax.pmap`` or
    ``check_vma=False`` it is plain ``jax.value_and_grad``. :func:`cross_device` raises
    an error when it is handed already-summed gradients.

    Args:
      fun: the loss function.
      axis_name: the data axis (or axes) over which devices see different data.
      argnums: which positional arguments to differentiate.
      has_aux: as in ``jax.value_and_grad``.

    Returns:
      A function with the signature of ``jax.value_and_grad(fun, argnums, has_aux)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P, AxisType
      >>> import optax_gradhealth as gh
      >>> mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
      >>> loss = lambda w, x: jnp.sum(w * x)
      >>> def step(w, x):
      ...     _, g = gh.local_value_and_grad(loss, 'data')(w, x)
      ...     return g
      >>> x = jnp.arange(8.0).reshape(8, 1)
      >>> jax.shard_map(step, mesh=mesh, in_specs=(P(), P('data')), out_specs=P('data'))(jnp.ones(1), x).tolist()
      [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    """
    return _local_value_and_grad(fun, axis_name, argnums, has_aux, "gh.local_value_and_grad")


def _local_value_and_grad(
    fun: Callable[..., Any], axis_name: Any, argnums: Any, has_aux: Any, caller: str
) -> Callable[..., Any]:
    """:func:`local_value_and_grad`, its errors naming ``caller`` (the function called)."""
    if not callable(fun):
        raise TypeError(f"{caller}: `fun` must be callable, got {fun!r}.")
    axes = _as_axes("axis_name", axis_name, allow_empty=False)
    positions = check.int_or_ints("argnums", argnums, context=f"{caller}: ")
    positions = (positions,) if isinstance(positions, int) else positions
    has_aux = check.boolean("has_aux", has_aux, context=f"{caller}: ")
    value_and_grad = jax.value_and_grad(fun, argnums=argnums, has_aux=has_aux)

    @functools.wraps(fun)
    def wrapped(*args, **kwargs):
        _axis_size(axes, "axis_name")
        bad = [i for i in positions if not -len(args) <= i < len(args)]
        if bad:
            raise TypeError(
                f"{caller}: `argnums` {argnums!r} names positional argument {bad[0]}, but the "
                f"function was called with {len(args)} positional argument(s) (keyword arguments are not "
                "differentiated)."
            )
        args = list(args)
        for i in positions:
            args[i] = _to_varying(args[i], axes)
        return value_and_grad(*args, **kwargs)

    return wrapped


def local_grad(
    fun: Callable[..., Any],
    axis_name: str | Sequence[str] = "data",
    *,
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
) -> Callable[..., Any]:
    """``jax.grad`` returning each device's local gradient inside ``shard_map``.

    See :func:`local_value_and_grad` for the trap it avoids.

    Args:
      fun: the loss function.
      axis_name: the data axis (or axes) over which devices see different data.
      argnums: which positional arguments to differentiate (an int or a tuple of ints).
      has_aux: as in ``jax.grad``.

    Returns:
      A function with the signature of ``jax.grad(fun, argnums, has_aux)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import optax_gradhealth as gh
      >>> g = jax.pmap(gh.local_grad(lambda w, x: jnp.sum(w * x), 'data'), axis_name='data')
      >>> g(jnp.ones((8, 1)), jnp.arange(8.0).reshape(8, 1))[:, 0].tolist()
      [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    """
    value_and_grad = _local_value_and_grad(fun, axis_name, argnums, has_aux, "gh.local_grad")
    has_aux = bool(has_aux)  # checked above: True or False

    @functools.wraps(fun)
    def wrapped(*args, **kwargs):
        out, grads = value_and_grad(*args, **kwargs)
        return (grads, out[1]) if has_aux else grads

    return wrapped


# ----------------------------------------------------------------------------- statistics


def _safe_div(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a / b``; 0 where ``b`` is 0 (no gradient: no agreement, no dispersion), but NaN
    where either is NaN: a device's NaN gradient must not read as a finite 0."""
    ok = b > 0
    quotient = a / jnp.where(ok, b, 1.0)
    return jnp.where(ok, quotient, jnp.where(jnp.isnan(a) | jnp.isnan(b), jnp.nan, 0.0))


def _common_scale(device_norms: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(s, 1 / s)``: the exact power of two that brings the largest finite device norm
    into [0.5, 1) (1 when no norm is finite and positive).

    Every scale-free figure of the audit (agreement, cosines, the noise scale's ratio) is
    computed from the gradients, the mean and the norms multiplied by ``s``: their squares
    and dot products then stay in float32's range whatever the gradients' scale (elements
    of 1e-20 or 1e18 included), and a multiplication by a power of two is exact. The
    exponent is clipped to +-120 so that ``s`` and ``1 / s`` are normal float32 numbers.
    """
    largest = jnp.max(jnp.where(jnp.isfinite(device_norms), device_norms, 0.0))
    return _stats._power_of_two_scale(largest, 120)


def _scaled(x: jax.Array, scale: jax.Array) -> jax.Array:
    """``x * scale`` as float32 (complex64 for a complex leaf); the product is taken in
    float64 for a 64-bit leaf, so that a float64 element beyond float32 is brought in."""
    wide = _stats._accumulation_dtype(x)
    complex_leaf = jnp.iscomplexobj(x)
    if complex_leaf:
        wide = jnp.complex128 if wide == jnp.float64 else jnp.complex64
    return (x.astype(wide) * scale.astype(wide)).astype(jnp.complex64 if complex_leaf else jnp.float32)


def _array_leaves(tree: Any) -> list[jax.Array]:
    """Every array leaf of ``tree`` (integer, bool and PRNG-key leaves included, ``float0``
    left out), in ``jax.tree.leaves`` order: what the parameter fingerprint hashes."""
    leaves = []
    for x in jax.tree.leaves(tree):
        if not (hasattr(x, "dtype") or isinstance(x, (bool, int, float, complex))):
            continue
        x = jnp.asarray(x)
        if x.dtype != jax.dtypes.float0:
            leaves.append(x)
    return leaves


def cross_device(
    axis_name: str | Sequence[str] = "data",
    *,
    per_device_batch: int | None = None,
    sharded_axes: str | Sequence[str] = (),
    num_devices: int | None = None,
    audit_first_steps: int = 200,
    audit_every: int | None = 500,
    sketch_dim: int = 1024,
    sketch_seed: int = 0,
    noise_scale_decay: float = 0.99,
    outlier_threshold: float = OUTLIER_THRESHOLD,
    outlier_evidence: float = OUTLIER_EVIDENCE,
    outlier_drift: float = OUTLIER_DRIFT,
    near_duplicate_evidence: float = NEAR_DUPLICATE_EVIDENCE,
    near_duplicate_drift: float = NEAR_DUPLICATE_DRIFT,
    norm_floor: float = NORM_FLOOR,
    cosine_floor: float = COSINE_FLOOR,
) -> optax.GradientTransformationExtraArgs:
    """Averages local gradients across devices and audits them before the all-reduce.

    Use it first in the chain, inside ``jax.pmap(..., axis_name=...)`` or
    ``jax.shard_map``, on each device's LOCAL gradient: it returns the mean gradient (one
    ``pmean`` over ``axis_name``) and records the audit in its state (read it with
    ``gh.metrics``; every value is identical on every device)::

      tx = optax.chain(gh.cross_device('data', per_device_batch=32),
                       gh.guard(optax.adamw(3e-4), clip=1.0))

    Never inside the guard (``gh.guard(optax.chain(gh.cross_device(...), ...))``): each
    device's guard would judge its local gradient and skip steps the others apply; the
    guard's ``init`` refuses it. Nor after it (``optax.chain(gh.guard(...),
    gh.cross_device(...))``), for the same reason: under ``jax.shard_map`` the guard's
    ``update`` refuses gradients that vary over a mesh axis its state does not; under
    ``pmap`` this cannot be seen, and the devices' optimizer states drift apart.

    Every step (K floats ride in the gradient all-reduce; one all-reduce in all):
    ``xdev/device_norms``,
    ``xdev/norm_cv``, ``xdev/norm_max_over_min``, ``xdev/agreement``, and, from the same
    numbers with ``B_small = per_device_batch`` and ``B_big = K * B_small``
    (McCandlish et al. 2018, A.1)::

      |G|^2     ~ (K |g|^2 - mean_k |g_k|^2) / (K - 1)
      tr(Sigma) ~ (mean_k |g_k|^2 - |g|^2) / (1 / B_small - 1 / B_big)
      B_simple  = EMA(tr Sigma) / EMA(|G|^2)      (two bias-corrected EMAs)

    Audit steps (update index ``t < audit_first_steps`` or ``t % audit_every == 0``;
    the branch runs under ``lax.cond`` and is skipped entirely on other steps) add one
    all-reduce of ``K x (sketch_dim + 1)`` floats and one of ``K x 2`` integers:
    ``xdev/cosine_to_mean``, ``xdev/pairwise_cosine`` (count-sketch with a static seed
    shared by all devices), ``xdev/duplicate_pairs`` (bit-exact gradient fingerprints),
    ``xdev/param_desync`` (parameter fingerprints of every array leaf; pass ``params`` to
    ``update``; devices outside a group of more than K/2 identical replicas are flagged,
    every device when there is no such group) and the outlier device. The cosines and
    the agreement are computed from the gradients multiplied by one exact power of two
    (from the largest device norm), so they hold for gradients of any scale float32 can
    hold. The noise scale's two estimates and EMAs are in absolute units: it needs
    ``|G|^2`` and ``tr(Sigma)`` within float32's range, about ``1e-36`` to ``3e38``
    (outside it an estimate is not folded, or the EMAs lose precision, and
    ``xdev/noise_scale`` reads NaN: gradients of elements around ``1e18`` overflow
    ``tr(Sigma)``). A device's outlier score is the larger of

    * ``|log|g_k| - median_j log|g_j|| / max(1.4826 MAD, norm_floor)`` (norm), and
    * ``(d_k - median_j d_j) / max(1.4826 MAD, cosine_floor)`` of ``d_k = log(1 - c_k)``,
      where ``c_k`` is the exact cosine of ``g_k`` to the mean of the OTHER devices'
      gradients (direction: the log makes it a ratio, see ``docs/distributed.md``);

    a non-finite local gradient scores ``inf`` (``xdev/norm_score``,
    ``xdev/direction_score``). The two robust scores need K >= 3 (the spread of two
    values is their distance): with K = 2 they are 0, and only a non-finite device or a
    dead one (an all-zero gradient while the other's is not) is named (score ``inf``).
    Evidence accumulates across audits in a one-sided CUSUM per device,
    ``e_k <- clip(e_k + score_k - 2, 0, 2 * outlier_evidence)``
    (``xdev/outlier_evidence``). A device is named (``xdev/outlier_devices``) when its
    score exceeds ``outlier_threshold`` (a strong fault, at the audit it shows) or its
    evidence exceeds ``outlier_evidence`` while its score exceeds ``outlier_drift``, so
    that the audit adds to the evidence (a moderate fault that persists: a score of 6 on
    every audit is named at the fourth, evidence 4, 8, 12, 16; once the fault is over, the
    evidence drains slowly, and a device whose score is back below the drift is not named
    on it); ``xdev/outlier_device`` is the named device
    with the most evidence, else -1. Near-duplicate data: each pair's closeness
    ``-log(1 - c)`` of its sketched cosine gets a robust z-score against the other
    pairs' and a CUSUM of drift 3 (one audit adds at most half the threshold); a pair
    whose evidence exceeds ``near_duplicate_evidence`` is flagged in
    ``xdev/near_duplicate_pairs`` (two devices that see the same examples under
    different dropout or augmentation). The rules live in
    ``optax_gradhealth._detectors`` and their defaults come from the detection
    benchmark (``docs/detection.md``); :func:`cross_device_alarms` words the result.

    Args:
      axis_name: the data axis name(s) over which gradients are averaged (the
        ``axis_name`` of ``jax.pmap``, or mesh axes of ``jax.shard_map``).
      per_device_batch: examples per device per update (after gradient accumulation);
        enables ``xdev/trace_cov_est`` and ``xdev/noise_scale`` (NaN without it).
      sharded_axes: mesh axes over which each parameter is split (FSDP, tensor
        parallelism): the local sums are ``psum``-ed over them, never averaged.
      num_devices: K, the number of devices on the data axes. Only needed when ``init``
        is called outside the mapped function and K differs from
        ``jax.device_count()``; inside ``pmap``/``shard_map`` it is read from the axis.
      audit_first_steps: audit every step while the update index is below it.
      audit_every: then audit every ``audit_every`` updates (``None``: never again).
      sketch_dim: dimension of the random-projection sketch (int >= 2; pairwise
        cosines carry an error of about ``1 / sqrt(sketch_dim)``). One bucket makes
        every cosine exactly +-1, and the near-duplicate rule then flagged same-sign
        pairs of clean, independent gradients (8 devices: 395 of 400 audits); from 2
        buckets on it flagged none.
      sketch_seed: seed of the sketch and fingerprint hashes (a Python int >= 0, so the
        same on every device and host; read by ``numpy.random.default_rng``, which takes
        any size).
      noise_scale_decay: decay of the two noise-scale EMAs, in (0, 1).
      outlier_threshold: instant score above which a device is named at once.
      outlier_evidence: CUSUM evidence above which a device is named (at the audits whose
        score is above ``outlier_drift``).
      outlier_drift: the CUSUM's drift, the score a clean device stays below on
        average (> 0): lower finds moderate faults sooner and raises more false alarms.
      near_duplicate_evidence: CUSUM evidence above which a pair is flagged as
        near-duplicate.
      near_duplicate_drift: the pair CUSUM's drift (> 0).
      norm_floor: lower bound of the log-norm spread (0.1 ~ 10 % norm differences count
        as normal even when the other devices agree more closely).
      cosine_floor: lower bound of the spread of ``log(1 - c_k)`` (about the spread of the
        leave-one-out cosines ``c_k`` themselves when they are near 0).

    Returns:
      A ``GradientTransformationExtraArgs``; ``update(grads, state, params=None)``.

    Raises:
      ValueError/TypeError: at build time for bad arguments; at the first trace when an
        axis is not bound, K disagrees with the state, or (inside ``shard_map``) the
        gradients are already summed across devices (use :func:`local_value_and_grad`).

    References:
      McCandlish et al., "An Empirical Model of Large-Batch Training", 2018.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import optax_gradhealth as gh
      >>> tx = gh.cross_device('data', per_device_batch=4)
      >>> params = {'w': jnp.zeros(2)}
      >>> state = jax.pmap(tx.init, axis_name='data')(jnp.zeros((8, 2)))  # one copy per device
      >>> def step(grads, state):
      ...     return tx.update({'w': grads}, state)
      >>> grads = jnp.ones((8, 2)).at[3].set(-1.0)   # device 3 points the other way
      >>> updates, state = jax.pmap(step, axis_name='data')(grads, state)
      >>> updates['w'][0].tolist()
      [0.75, 0.75]
      >>> m = jax.device_get(gh.metrics(state))
      >>> int(m['xdev/outlier_device'][0]), m['xdev/cosine_to_mean'][0].round(2).tolist()[2:5]
      (3, [1.0, -1.0, 1.0])
    """
    data_axes = _as_axes("axis_name", axis_name, allow_empty=False)
    shard_axes = _as_axes("sharded_axes", sharded_axes, allow_empty=True)
    if set(data_axes) & set(shard_axes):
        raise ValueError(
            f"An axis cannot be both a data axis and a sharded axis: axis_name={data_axes!r}, "
            f"sharded_axes={shard_axes!r}."
        )
    batch = check.optional(check.integer, "per_device_batch", per_device_batch, minimum=1)
    devices = check.optional(check.integer, "num_devices", num_devices, minimum=1)
    first = check.integer("audit_first_steps", audit_first_steps, minimum=0)
    every = check.optional(check.integer, "audit_every", audit_every, minimum=1)
    if first == 0 and every is None:
        raise ValueError(
            "The audit schedule never audits: audit_first_steps=0 and audit_every=None. Set "
            "audit_first_steps > 0 (audit every step at first) and/or audit_every >= 1 (then every N)."
        )
    # One bucket: every cosine +-1, false near-duplicate alarms (see the docstring).
    dim = check.integer("sketch_dim", sketch_dim, minimum=2)
    # Only numpy's default_rng reads the seed (on the host, when the step is traced): any
    # int >= 0 is a seed; it is never stored in or compared with an int32.
    seed = check.integer("sketch_seed", sketch_seed, minimum=0, maximum=None)
    decay = check.in_open_unit_interval("noise_scale_decay", noise_scale_decay)
    rule = default_audit_rule(
        outlier_threshold=check.positive("outlier_threshold", outlier_threshold, allow_inf=True),
        evidence_threshold=check.positive("outlier_evidence", outlier_evidence, allow_inf=True),
        pair_threshold=check.positive("near_duplicate_evidence", near_duplicate_evidence, allow_inf=True),
        evidence_drift=check.positive("outlier_drift", outlier_drift),
        pair_drift=check.positive("near_duplicate_drift", near_duplicate_drift),
        norm_floor=check.positive("norm_floor", norm_floor),
        cosine_floor=check.positive("cosine_floor", cosine_floor),
    )
    data_name = data_axes if len(data_axes) > 1 else data_axes[0]

    def init_fn(params):
        del params
        try:
            k = int(lax.axis_size(data_name))
        except NameError:
            k = devices
            if k is None:
                mesh = jax.sharding.get_abstract_mesh()
                names = tuple(getattr(mesh, "axis_names", ()))
                if names and set(data_axes) <= set(names):
                    k = math.prod(mesh.shape[a] for a in data_axes)
                elif shard_axes:
                    raise ValueError(
                        "cross_device cannot tell the number of data-parallel devices K outside the mapped "
                        f"function when sharded_axes={shard_axes!r}: pass num_devices=K, or call init inside "
                        "jax.shard_map / under `with jax.set_mesh(mesh)`."
                    ) from None
                else:
                    k = jax.device_count()
        f32 = jnp.float32
        zero = jnp.zeros((), f32)
        nan = jnp.full((), jnp.nan, f32)
        return CrossDeviceState(
            xdev_num_steps=jnp.zeros((), jnp.int32),
            xdev_num_audits=jnp.zeros((), jnp.int32),
            xdev_device_norms=jnp.zeros((k,), f32),
            xdev_norm_cv=zero,
            xdev_norm_max_over_min=jnp.ones((), f32),
            xdev_agreement=zero,
            xdev_grad_sq_est=zero,
            xdev_trace_cov_est=nan if batch is None else zero,
            xdev_grad_sq_ema=zero,
            xdev_trace_cov_ema=zero,
            xdev_num_noise_steps=jnp.zeros((), jnp.int32),
            xdev_noise_scale=nan,
            xdev_audited=jnp.zeros((), jnp.bool_),
            xdev_cosine_to_mean=jnp.zeros((k,), f32),
            xdev_pairwise_cosine=jnp.eye(k, dtype=f32),
            xdev_mean_pairwise_cosine=zero,
            xdev_outlier_device=jnp.full((), -1, jnp.int32),
            xdev_outlier_score=zero,
            xdev_duplicate_pairs=jnp.zeros((k, k), jnp.bool_),
            xdev_param_desync=jnp.zeros((k,), jnp.bool_),
            xdev_outlier_devices=jnp.zeros((k,), jnp.bool_),
            xdev_norm_score=jnp.zeros((k,), f32),
            xdev_direction_score=jnp.zeros((k,), f32),
            xdev_outlier_evidence=jnp.zeros((k,), f32),
            xdev_near_duplicate_pairs=jnp.zeros((k, k), jnp.bool_),
            xdev_pair_evidence=jnp.zeros((k, k), f32),
            xdev_num_detector_audits=jnp.zeros((), jnp.int32),
            xdev_norm_spread_ema=zero,
            xdev_cosine_spread_ema=zero,
        )

    leaf_seed = sketch.LeafSeeds(seed, dim)  # per leaf: (salt, sketch offset), drawn once, static

    def sharded_sum(tree, per_leaf, tracked, leaves_of=_stats._float_leaves):
        """sum over the float leaves (``leaves_of``) of ``per_leaf(i, leaf, salt)``, summed
        over the devices holding the other parts of each leaf.

        A leaf split over some ``sharded_axes`` (it varies over them under ``check_vma``;
        every leaf when variation is not tracked, e.g. under ``pmap``) contributes a
        partial value that is ``psum``-ed over exactly those axes; a leaf replicated over
        them is counted once. ``salt`` differs between the parts of a split leaf.
        """
        return reduce_groups(local_groups(tree, per_leaf, tracked, leaves_of))

    def local_groups(tree, per_leaf, tracked, leaves_of=_stats._float_leaves):
        """This device's part of :func:`sharded_sum`: the sum of ``per_leaf`` over the
        leaves split over each tuple of sharded axes (``()``: not split), before the
        ``psum`` over those axes (:func:`reduce_groups`)."""
        groups: dict[tuple[str, ...], Any] = {}
        for i, leaf in enumerate(leaves_of(tree)):
            if not shard_axes:
                axes = ()
            elif tracked:
                axes = tuple(a for a in shard_axes if a in (_vma.varying_axes(leaf) or frozenset()))
            else:
                axes = shard_axes
            salt = sketch.u32(leaf_seed(i)[0])
            if axes:
                salt = salt ^ sketch.mix32(lax.axis_index(axes if len(axes) > 1 else axes[0]).astype(jnp.uint32) + 1)
            value = per_leaf(i, leaf, salt)
            groups[axes] = value if axes not in groups else groups[axes] + value
        return groups

    def reduce_groups(groups):
        total = None
        for axes, value in groups.items():
            reduced = lax.psum(value, axes if len(axes) > 1 else axes[0]) if axes else value
            total = reduced if total is None else total + reduced
        return total

    def gather(row, k, index):
        """[K, ...] array of every device's ``row`` (exact, identical on every device)."""
        mine = (jnp.arange(k) == index).reshape((k,) + (1,) * row.ndim)
        return lax.psum(jnp.where(mine, row[None], jnp.zeros_like(row)[None]), data_name)

    def update_fn(updates, state, params=None, **extra_args):
        check.state_type("gh.cross_device", state, CrossDeviceState)
        del extra_args
        k = _axis_size(data_axes, "axis_name")
        if shard_axes:
            _axis_size(shard_axes, "sharded_axes")
        if state.xdev_device_norms.shape[0] != k:
            raise ValueError(
                f"cross_device state was initialised for K={state.xdev_device_norms.shape[0]} devices but "
                f"axis {data_name!r} has {k}: pass num_devices={k} to gh.cross_device, or call init inside "
                "the mapped function."
            )
        tracked = _vma_checked(data_axes)
        if tracked:
            for path, leaf in jax.tree_util.tree_flatten_with_path(updates)[0]:
                if _stats._is_float(leaf) and not set(data_axes) <= (_vma.varying_axes(leaf) or frozenset()):
                    raise ValueError(
                        f"Gradient leaf {_stats.path_name(path)!r} does not vary over {data_name!r}: inside "
                        "jax.shard_map, jax.grad w.r.t. replicated parameters returns the SUM over devices, "
                        "not the local gradient. Compute it with gh.local_value_and_grad(loss_fn, "
                        f"{data_name!r}) (or pcast the params to varying before jax.grad)."
                    )
            known = set(data_axes) | set(shard_axes)
            for what, tree, keep in (
                ("Gradient", updates, _stats._is_float),
                ("Parameter", params, lambda x: hasattr(x, "dtype")),  # every array: all are fingerprinted
            ):
                for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
                    if not keep(leaf):
                        continue
                    other = sorted((_vma.varying_axes(leaf) or frozenset()) - known)
                    if other:
                        suggestion = (*shard_axes, *other)
                        suggestion = suggestion[0] if len(suggestion) == 1 else suggestion
                        raise ValueError(
                            f"{what} leaf {_stats.path_name(path)!r} varies over the mesh axis {other[0]!r}, which "
                            f"is neither a data axis (axis_name={data_name!r}) nor a sharded axis "
                            f"(sharded_axes={shard_axes!r}): its norms, dot products and fingerprints would be "
                            f"partial and differ across {other[0]!r}. If the leaf is split over {other[0]!r} "
                            f"(tensor parallelism, FSDP), pass sharded_axes={suggestion!r} to gh.cross_device; if "
                            f"the devices along {other[0]!r} see different data, add it to axis_name."
                        )
        index = lax.axis_index(data_name)
        f32_zero = jnp.zeros((), jnp.float32)

        def plain_sum_of_squares(i, x, salt):
            return _stats._leaf_sum_of_squares(x)

        def rescued_sum_of_squares(tree, rescue_scale):
            """``(total, again, ordinary, scale)``: the float32 sum of squares of ``tree``
            (summed over the sharded axes), whether it is ordinary (finite and not tiny:
            ``_stats._ordinary``) and, only when it is not, the sum of squares of the
            elements multiplied by ``scale = rescue_scale(total)``, taken again in a
            ``lax.cond`` (a rare second pass; 0 on ordinary steps). Its ``psum`` over
            sharded axes stays outside the branch. None for a tree without float leaves."""
            groups = local_groups(tree, plain_sum_of_squares, tracked)
            if not groups:
                return None
            total = reduce_groups(groups)
            ordinary = _stats._ordinary(total)
            scale = rescue_scale(total)

            def rescaled(operands):
                tree, scale = operands
                return local_groups(tree, lambda i, x, salt: _stats._leaf_sum_of_squares(x, scale), tracked)

            def not_needed(operands):
                return jax.tree.map(jnp.zeros_like, groups)

            again = reduce_groups(_vma.match(lax.cond(ordinary, not_needed, rescaled, (tree, scale)), groups))
            return total, again, ordinary, scale

        def local_norm(tree):
            """This device's gradient norm, finite for every finite gradient: where the
            float32 sum of squares overflows (a norm above ~1.8e19) or is tiny (below
            ~1e-15, or flushed to 0), the sums are taken again on the gradient scaled by
            2**-80 or 2**80 (as :func:`optax_gradhealth.grad_stats` does). NaN or Inf
            only when an element is; a finite norm beyond float32 saturates at its max."""
            sums = rescued_sum_of_squares(tree, _stats._rescue_scale)
            if sums is None:
                return f32_zero
            total, again, ordinary, scale = sums
            return jnp.where(ordinary, jnp.sqrt(total), _stats._rescued_norm(again, scale))

        def scaled_sum_of_squares(tree, scale):
            """``|tree|^2 scale^2`` (``scale`` a power of two from :func:`_common_scale`):
            on an ordinary step the plain sum times ``scale^2`` (exact), else the sum of
            squares of the elements multiplied by ``scale``, so that a sum of squares that
            overflowed or underflowed float32 is not lost."""
            sums = rescued_sum_of_squares(tree, lambda total: scale)
            if sums is None:
                return f32_zero
            total, again, ordinary, _ = sums
            return jnp.where(ordinary, total * scale * scale, again)

        # ONE all-reduce per update: the gradients and the masked [K] vector of local norms
        # travel in the same psum (XLA emits a single all-reduce for the tuple). It runs
        # inside the audit's lax.cond (below), once in each branch: an audit reads the local
        # gradients after the all-reduce, and a cond outside it would keep them alive through
        # it on every step (a second gradient-sized buffer; +0.12x step time on 8 CPU devices).
        local = local_norm(updates)
        leaves, treedef = jax.tree.flatten(updates)
        is_float = [_stats._is_float(x) for x in leaves]
        mine = jnp.arange(k) == index

        def all_reduce(grads):
            floats = [x for x, f in zip(jax.tree.leaves(grads), is_float) if f]
            # fp16 and fp8 leaves are summed in float32: the sum over K devices may pass their
            # range (65504 for fp16) although the mean does not. Other dtypes keep theirs.
            wide = [x.astype(jnp.float32) if _stats._overflows_on_scaling(x) else x for x in floats]
            summed, device_norms = lax.psum((wide, jnp.where(mine, local, jnp.zeros_like(local))), data_name)
            summed = iter([(total / k).astype(x.dtype) for total, x in zip(summed, floats)])
            mean = treedef.unflatten([next(summed) if f else x for x, f in zip(leaves, is_float)])
            return mean, device_norms

        count = state.xdev_num_steps
        audited = count < first
        if every is not None:
            audited = audited | (count % every == 0)
        kf = jnp.float32(k)

        def audit(operands):
            grads, params = operands
            mean, device_norms = all_reduce(grads)
            # Every sum below is taken on the gradients and the mean multiplied by the
            # common power of two ``scale`` (the largest device norm brought into [0.5, 1)):
            # squares and dot products of 1e-20 or 1e18 elements stay in float32's range,
            # and the cosines do not depend on the scale. (A rare branch: no cheap path.)
            scale, _ = _common_scale(device_norms)

            # Each reduction multiplies by its own copy of the scale (`_lowering.own_operands`):
            # a product `x * scale` shared by two reductions (the mean's in |g|^2 and in every
            # dot product, a gradient's in its dot product and its sketch) is materialised
            # by XLA:CPU, a gradient-sized temporary on audit steps.
            def own_sum_of_squares(i, x, salt):
                x, own = _lowering.own_operands((x, scale))
                return _stats._leaf_sum_of_squares(x, own)

            mean_sq = sharded_sum(mean, own_sum_of_squares, tracked)
            mean_sq = f32_zero if mean_sq is None else mean_sq  # |g|^2 scale^2
            mean_leaves = _stats._float_leaves(mean)

            def dot_and_sketch(i, g, salt):
                # complex leaves keep their imaginary part: Re <g, m> = sum Re(g conj(m))
                g_dot, m_dot, own = _lowering.own_operands((g, mean_leaves[i], scale))
                dot = jnp.sum(jnp.real(_scaled(g_dot, own) * jnp.conj(_scaled(m_dot, own))))
                g_sketch, own = _lowering.own_operands((g, scale))
                sketched = sketch.leaf_sketch(_scaled(g_sketch, own), dim, salt, leaf_seed(i)[1])
                return jnp.concatenate([dot[None], sketched])

            row = sharded_sum(grads, dot_and_sketch, tracked)
            row = jnp.zeros((dim + 1,), jnp.float32) if row is None else row
            floats = gather(row, k, index)
            grad_fp = sharded_sum(grads, lambda i, g, salt: sketch.leaf_fingerprint(g, salt), tracked)
            grad_fp = sketch.u32(0) if grad_fp is None else grad_fp
            param_fp = None
            if params is not None:  # every array leaf: an integer table out of sync is a desync too
                param_fp = sharded_sum(
                    params,
                    lambda i, p, salt: sketch.leaf_fingerprint(p, sketch.mix32(salt ^ sketch.u32(0x5BD1E995))),
                    tracked,
                    _array_leaves,
                )
            param_fp = sketch.u32(0) if param_fp is None else param_fp
            ints = gather(jnp.stack([grad_fp, param_fp]), k, index)
            dots, sketches = floats[:, 0], floats[:, 1:]

            mean_norm = jnp.sqrt(mean_sq)
            cosine_to_mean = _safe_div(dots, (device_norms * scale) * mean_norm)
            sketch_norms = jnp.sqrt(jnp.sum(jnp.square(sketches), axis=1))
            gram = jnp.matmul(sketches, sketches.T, precision=lax.Precision.HIGHEST)
            pairwise = _safe_div(gram, sketch_norms[:, None] * sketch_norms[None, :])
            off_diagonal = ~jnp.eye(k, dtype=jnp.bool_)
            pairwise = jnp.where(off_diagonal, pairwise, 1.0)
            mean_pairwise = jnp.sum(jnp.where(off_diagonal, pairwise, 0.0)) / max(k * (k - 1), 1)

            fp = ints[:, 0]
            same = (fp[:, None] == fp[None, :]) & (device_norms[:, None] == device_norms[None, :])
            duplicates = same & off_diagonal & (device_norms[:, None] > 0)

            pfp = ints[:, 1]
            support = jnp.sum(pfp[:, None] == pfp[None, :], axis=1)  # devices sharing each one's
            majority = jnp.argmax(support)
            # Only a group of more than K/2 identical replicas is a reference: without one
            # (K = 2 and the two differ, a 2-2 split, ...) nothing tells which replicas are
            # healthy, and every device is flagged (the alarm says: no majority).
            desync = jnp.where(2 * support[majority] > k, pfp != pfp[majority], True)

            detector, verdict = detect.audit_update(detector_state(), device_norms, cosine_to_mean, pairwise, **rule)
            scores = verdict.scores
            return (
                mean,
                device_norms,
                mean_sq,
                _vma.match(
                    (
                        cosine_to_mean.astype(jnp.float32),
                        pairwise.astype(jnp.float32),
                        mean_pairwise.astype(jnp.float32),
                        verdict.outlier_device,
                        verdict.outlier_score,
                        duplicates,
                        desync,
                        verdict.outlier_devices,
                        scores.norm_score,
                        scores.direction_score,
                        verdict.near_duplicate_pairs,
                        *detector,
                    ),
                    recorded(),
                ),
            )

        def detector_state():
            return detect.AuditDetectorState(
                num_audits=state.xdev_num_detector_audits,
                norm_spread_ema=state.xdev_norm_spread_ema,
                cosine_spread_ema=state.xdev_cosine_spread_ema,
                outlier_evidence=state.xdev_outlier_evidence,
                pair_evidence=state.xdev_pair_evidence,
            )

        def recorded():
            return (
                state.xdev_cosine_to_mean,
                state.xdev_pairwise_cosine,
                state.xdev_mean_pairwise_cosine,
                state.xdev_outlier_device,
                state.xdev_outlier_score,
                state.xdev_duplicate_pairs,
                state.xdev_param_desync,
                state.xdev_outlier_devices,
                state.xdev_norm_score,
                state.xdev_direction_score,
                state.xdev_near_duplicate_pairs,
                *detector_state(),
            )

        def no_audit(operands):
            grads, _ = operands
            mean, device_norms = all_reduce(grads)
            # |g|^2 scale^2 (the same scale as the audit's): the plain sum of squares, taken
            # again on the scaled mean only when it overflowed or underflowed (rare).
            mean_sq = scaled_sum_of_squares(mean, _common_scale(device_norms)[0])
            return mean, device_norms, mean_sq, recorded()

        # mean_sq is |g|^2 scale^2, with scale = _common_scale(device_norms)[0].
        mean, device_norms, mean_sq, audit_values = lax.cond(audited, audit, no_audit, (updates, params))
        (
            cosine_to_mean,
            pairwise,
            mean_pairwise,
            outlier,
            score,
            duplicates,
            desync,
            outlier_devices,
            norm_score,
            direction_score,
            near_duplicates,
        ) = audit_values[:11]
        detector = detect.AuditDetectorState(*audit_values[11:])
        # The scale-free figures from the norms and |g|^2 times the common power of two
        # (exact): the squares stay in float32's range whatever the gradients' scale. Only
        # the two estimates carry a scale, undone at the end (they overflow or underflow
        # only when their true value is outside float32's range).
        scale, inverse = _common_scale(device_norms)
        scaled_norms = device_norms * scale
        total_sq = jnp.sum(jnp.square(scaled_norms))
        mean_local_sq = total_sq / kf
        norm_cv = _safe_div(jnp.std(scaled_norms), jnp.mean(scaled_norms))
        norm_max_over_min = jnp.max(device_norms) / jnp.min(device_norms)
        if k > 1:
            agreement = _safe_div(kf * kf * mean_sq - total_sq, (kf - 1.0) * total_sq)
        else:
            agreement = jnp.ones((), jnp.float32)
        grad_sq_est, trace_cov_est = noise.estimates(mean_local_sq, mean_sq, k, batch)
        grad_sq_est = grad_sq_est * inverse * inverse
        trace_cov_est = trace_cov_est * inverse * inverse
        finite = jnp.isfinite(grad_sq_est) & jnp.isfinite(trace_cov_est)
        if batch is not None and k > 1:
            grad_sq_ema, trace_ema, noise_count, noise_scale = noise.fold(
                state.xdev_grad_sq_ema,
                state.xdev_trace_cov_ema,
                state.xdev_num_noise_steps,
                grad_sq_est,
                trace_cov_est,
                decay,
                finite,
            )
        else:
            grad_sq_ema, trace_ema, noise_count = (
                state.xdev_grad_sq_ema,
                state.xdev_trace_cov_ema,
                state.xdev_num_noise_steps,
            )
            noise_scale = jnp.full((), jnp.nan, jnp.float32)

        new_state = CrossDeviceState(
            xdev_num_steps=count + 1,
            xdev_num_audits=state.xdev_num_audits + audited.astype(jnp.int32),
            xdev_device_norms=device_norms,
            xdev_norm_cv=norm_cv,
            xdev_norm_max_over_min=norm_max_over_min,
            xdev_agreement=agreement,
            xdev_grad_sq_est=grad_sq_est,
            xdev_trace_cov_est=trace_cov_est,
            xdev_grad_sq_ema=grad_sq_ema,
            xdev_trace_cov_ema=trace_ema,
            xdev_num_noise_steps=noise_count,
            xdev_noise_scale=noise_scale,
            xdev_audited=audited,
            xdev_cosine_to_mean=cosine_to_mean,
            xdev_pairwise_cosine=pairwise,
            xdev_mean_pairwise_cosine=mean_pairwise,
            xdev_outlier_device=outlier,
            xdev_outlier_score=score,
            xdev_duplicate_pairs=duplicates,
            xdev_param_desync=desync,
            xdev_outlier_devices=outlier_devices,
            xdev_norm_score=norm_score,
            xdev_direction_score=direction_score,
            xdev_outlier_evidence=detector.outlier_evidence,
            xdev_near_duplicate_pairs=near_duplicates,
            xdev_pair_evidence=detector.pair_evidence,
            xdev_num_detector_audits=detector.num_audits,
            xdev_norm_spread_ema=detector.norm_spread_ema,
            xdev_cosine_spread_ema=detector.cosine_spread_ema,
        )
        # (A state kept per device keeps its type: `_vma.keeps_state_type`, below.)
        return mean, jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, state)

    return optax.GradientTransformationExtraArgs(init_fn, _vma.keeps_state_type(update_fn))


class Alarm(str):
    """One cross-device alarm: a readable string that also carries its parts.

    Attributes:
      kind: ``'nonfinite_device'``, ``'dead_device'``, ``'outlier_norm'``,
        ``'outlier_direction'``, ``'duplicate_pair'``, ``'near_duplicate_pair'`` or
        ``'param_desync'``.
      devices: the device indices (positions on the data axes) it names.
      evidence: the numbers behind it.

    Example:
      >>> import optax_gradhealth as gh
      >>> alarm = gh.Alarm("device 2: zero gradient", "dead_device", (2,), {"device_norm": 0.0})
      >>> alarm == "device 2: zero gradient", alarm.kind, alarm.devices
      (True, 'dead_device', (2,))
    """

    kind: str
    devices: tuple[int, ...]
    evidence: dict[str, float]

    def __new__(cls, text: str, kind: str, devices: tuple[int, ...], evidence: dict[str, float]) -> Alarm:
        alarm = super().__new__(cls, text)
        alarm.kind, alarm.devices, alarm.evidence = kind, tuple(int(d) for d in devices), dict(evidence)
        return alarm


def describe_outlier(
    device: int,
    device_norms: np.ndarray,
    cosine_to_mean: np.ndarray | None,
    norm_score: np.ndarray | None,
    direction_score: np.ndarray | None,
    outlier_evidence: np.ndarray | None,
) -> Alarm:
    """The :class:`Alarm` for a device the outlier detector named, with its kind and
    evidence (host side; shared by :func:`cross_device_alarms` and ``gh.diagnose``)."""
    norms = np.asarray(device_norms, np.float64)
    norm = float(norms[device])
    others = np.delete(norms, device)
    typical = float(np.median(others[np.isfinite(others)])) if np.isfinite(others).any() else float("nan")
    evidence: dict[str, float] = {"device_norm": norm, "median_norm_others": typical}
    by_norm = True
    if norm_score is not None and direction_score is not None:
        evidence["norm_score"] = float(norm_score[device])
        evidence["direction_score"] = float(direction_score[device])
        by_norm = not evidence["direction_score"] > evidence["norm_score"]
    if cosine_to_mean is not None:
        cos = np.asarray(cosine_to_mean, np.float64)
        evidence["cosine_to_mean"] = float(cos[device])
        evidence["median_cosine_others"] = float(np.median(np.delete(cos, device)))
    if outlier_evidence is not None:
        evidence["cusum_evidence"] = float(outlier_evidence[device])
    detail = ", ".join(
        f"{name} {evidence[key]:.3g}"
        for name, key in (("score", "norm_score" if by_norm else "direction_score"), ("evidence", "cusum_evidence"))
        if key in evidence
    )
    if not np.isfinite(norm):
        return Alarm(f"device {device}: non-finite gradient (NaN/Inf)", "nonfinite_device", (device,), evidence)
    if norm == 0.0:
        return Alarm(f"device {device}: zero gradient (dead device or empty batch)", "dead_device", (device,), evidence)
    if by_norm:
        ratio = norm / typical if typical > 0 else float("inf")
        evidence["norm_ratio"] = ratio
        text = f"device {device}: gradient norm {ratio:.3g}x the other devices' median"
        text += f" ({detail})" if detail else ""
        return Alarm(text, "outlier_norm", (device,), evidence)
    cos_text = (
        f"cosine to the mean {evidence['cosine_to_mean']:.2f} vs {evidence['median_cosine_others']:.2f}"
        if "cosine_to_mean" in evidence
        else "direction unlike the others"
    )
    text = f"device {device}: gradient direction unlike the others ({cos_text}; {detail})"
    return Alarm(text, "outlier_direction", (device,), evidence)


def cross_device_alarms(metrics: dict[str, Any]) -> list[Alarm]:
    """Host-side: the alarms raised by the latest cross-device audit.

    Each alarm is an :class:`Alarm`, a readable string that names the device or devices,
    the kind of fault and the evidence (``alarm.kind``, ``alarm.devices``,
    ``alarm.evidence``):

    * an outlier device (``xdev/outlier_devices``, or ``xdev/outlier_device != -1`` in
      logs without it): non-finite gradient, dead (zero) gradient, a gradient norm far
      from the others' (``outlier_norm``) or a direction unlike theirs
      (``outlier_direction``), with its score and CUSUM evidence;
    * a pair of devices with bit-identical gradients (``xdev/duplicate_pairs``);
    * a pair whose gradients have agreed far more than the other pairs' for several
      audits (``xdev/near_duplicate_pairs``: same examples, different dropout or
      augmentation), with its cosine and the other pairs' median;
    * a device whose parameters differ from the majority (``xdev/param_desync``), or,
      when every device is flagged (no group of more than K/2 replicas agrees), one alarm
      that the parameter replicas disagree with no majority, naming every device.

    Values may be per-device copies (a leading device axis from ``pmap``); the first
    copy is read.

    Example:
      >>> import numpy as np, optax_gradhealth as gh
      >>> alarms = gh.cross_device_alarms({
      ...     'xdev/outlier_device': np.int32(3), 'xdev/outlier_score': np.float32(12.5),
      ...     'xdev/device_norms': np.array([1.0, 1.1, 0.9, 2.6], np.float32),
      ...     'xdev/duplicate_pairs': np.zeros((4, 4), bool), 'xdev/param_desync': np.zeros(4, bool)})
      >>> alarms
      ["device 3: gradient norm 2.6x the other devices' median"]
      >>> alarms[0].kind, alarms[0].devices
      ('outlier_norm', (3,))
    """
    out: list[Alarm] = []

    def read(name, ndim):
        if name not in metrics:
            return None
        value = np.asarray(jax.device_get(metrics[name]))
        while value.ndim > ndim:
            value = value[0]
        return value

    def read_flags(name, ndim):
        # bool, or 0/1 floats as a log reads them back (NaN: not logged there)
        value = read(name, ndim)
        return None if value is None else np.nan_to_num(value.astype(np.float64)) != 0

    norms = read("xdev/device_norms", 1)
    named = read_flags("xdev/outlier_devices", 1)
    single = read("xdev/outlier_device", 0)
    if named is not None:
        devices = [int(d) for d in np.nonzero(named)[0]]
    else:  # an older log: the single named device, -1 (or NaN: not logged) for none
        logged = single is not None and np.isfinite(single)
        devices = [int(single)] if logged and int(single) >= 0 else []
    for device in devices:
        if norms is None:
            score = read("xdev/outlier_score", 0)
            out.append(Alarm(f"device {device}: outlier (score {float(score):.3g})", "outlier_norm", (device,), {}))
            continue
        out.append(
            describe_outlier(
                device,
                norms,
                read("xdev/cosine_to_mean", 1),
                read("xdev/norm_score", 1),
                read("xdev/direction_score", 1),
                read("xdev/outlier_evidence", 1),
            )
        )
    pairs = read_flags("xdev/duplicate_pairs", 2)
    if pairs is not None:
        for j, k in zip(*np.nonzero(np.triu(pairs, 1))):
            text = f"devices {int(j)} and {int(k)} have identical gradients (same data shard?)"
            out.append(Alarm(text, "duplicate_pair", (j, k), {}))
    near = read_flags("xdev/near_duplicate_pairs", 2)
    if near is not None:
        exact = pairs if pairs is not None else np.zeros_like(near)
        cos = read("xdev/pairwise_cosine", 2)
        for j, k in zip(*np.nonzero(np.triu(near & ~exact, 1))):
            evidence = {}
            text = f"devices {int(j)} and {int(k)} have nearly the same gradients (same examples?)"
            if cos is not None:
                off = ~np.eye(cos.shape[0], dtype=bool)
                off[j, k] = off[k, j] = False
                evidence = {"pair_cosine": float(cos[j, k]), "median_pair_cosine": float(np.median(cos[off]))}
                text = (
                    f"devices {int(j)} and {int(k)} have nearly the same gradients (pair cosine "
                    f"{evidence['pair_cosine']:.2f} vs median {evidence['median_pair_cosine']:.2f}; same examples?)"
                )
            out.append(Alarm(text, "near_duplicate_pair", (j, k), evidence))
    desync = read_flags("xdev/param_desync", 1)
    if desync is not None and desync.size > 1 and desync.all():
        # every device flagged: no group of more than K/2 replicas agrees, so none is the reference
        text = f"parameter replicas disagree with no majority (all {desync.size} devices; desync or corruption)"
        out.append(Alarm(text, "param_desync", tuple(range(desync.size)), {}))
    elif desync is not None:
        for k in np.nonzero(desync)[0]:
            text = f"device {int(k)} parameters differ from the majority (desync or corruption)"
            out.append(Alarm(text, "param_desync", (k,), {}))
    return out
