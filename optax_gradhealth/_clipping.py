"""Global-norm clipping: threshold policies (fixed, z-score, percentile) and the
recording ``clip_by_global_norm`` transformation.

A policy is a small frozen object with three pure methods:

* ``init() -> state``: its state, a NamedTuple of fixed structure;
* ``threshold(state) -> float32 scalar``: the clip threshold for this step;
* ``update(state, norm, accepted) -> state``: folds this step's pre-clip norm into the
  running statistics, only where ``accepted`` is True (finite steps the caller applied),
  so one NaN or spike never poisons them. The adaptive policies also leave out a zero
  norm (an all-zero gradient carries no scale): zeros alone would set their threshold
  to 0, which multiplies every later gradient by 0.

The same policy objects are used standalone (:func:`clip_by_global_norm`) and as the
``clip=`` argument of :func:`optax_gradhealth.guard`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import optax

from optax_gradhealth import _catalogue, _interfaces, _stats, _vma
from optax_gradhealth import _validation as check

__all__ = [
    "ClipByGlobalNormState",
    "ClipPolicy",
    "FixedClip",
    "FixedClipState",
    "PercentileClip",
    "PercentileClipState",
    "ZScoreClip",
    "ZScoreClipState",
    "as_clip_policy",
    "clip_by_global_norm",
]


@runtime_checkable
class ClipPolicy(Protocol):
    """What a clip-threshold policy provides (see the module docstring).

    Any object with these three methods can be the guard's ``clip=``.

    Example:
      >>> from typing import NamedTuple
      >>> import jax, jax.numpy as jnp, optax
      >>> import optax_gradhealth as gh
      >>> class StepDownState(NamedTuple):
      ...     accepted: jax.Array
      >>> class StepDown:  # a threshold of 10 for two accepted steps, then 1
      ...     def init(self):
      ...         return StepDownState(jnp.zeros((), jnp.int32))
      ...     def threshold(self, state):
      ...         return jnp.where(state.accepted < 2, 10.0, 1.0).astype(jnp.float32)
      ...     def update(self, state, norm, accepted):
      ...         return StepDownState(state.accepted + accepted.astype(jnp.int32))
      >>> tx = gh.guard(optax.sgd(1.0), clip=StepDown())
      >>> w = jnp.zeros(2)
      >>> state = tx.init(w)
      >>> for _ in range(3):
      ...     updates, state = tx.update(jnp.array([3.0, 4.0]), state, w)
      >>> updates.tolist(), float(gh.metrics(state)['grad/clip_threshold'])  # the norm 5 clipped to 1
      ([-0.6000000238418579, -0.800000011920929], 1.0)
    """

    def init(self) -> Any:
        """The policy's initial state (a NamedTuple of arrays, fixed in structure)."""
        ...

    def threshold(self, state: Any) -> jax.Array:
        """The float32 threshold to clip this step's norm to (inf: no clipping)."""
        ...

    def update(self, state: Any, norm: jax.Array, accepted: jax.Array) -> Any:
        """The state after a step of global norm ``norm``, folded in where ``accepted``
        (a skipped step leaves it as it was)."""
        ...


class FixedClipState(NamedTuple):
    """State of :class:`FixedClip` (nothing to remember)."""


@dataclasses.dataclass(frozen=True)
class FixedClip:
    """A fixed global-norm threshold, as ``optax.clip_by_global_norm(max_norm)``.

    Attributes:
      max_norm: the threshold, > 0, or a scalar array (``optax.inject_hyperparams``);
        ``math.inf`` never clips.

    Example:
      >>> import optax_gradhealth as gh
      >>> policy = gh.FixedClip(1.0)
      >>> float(policy.threshold(policy.init()))
      1.0
    """

    max_norm: float | jax.Array

    def __post_init__(self):
        object.__setattr__(self, "max_norm", check.positive_or_array("max_norm", self.max_norm, allow_inf=True))

    def init(self) -> FixedClipState:
        """The empty state (a fixed threshold remembers nothing)."""
        return FixedClipState()

    def threshold(self, state: FixedClipState) -> jax.Array:
        """``max_norm`` as float32."""
        del state
        # A copy: an array threshold (the user's, or optax.inject_hyperparams' own) must
        # not be the state's buffer too, or donating the state deletes it (and donating
        # inject_hyperparams' state donates one buffer twice).
        return jnp.array(self.max_norm, jnp.float32, copy=True)

    def update(self, state: FixedClipState, norm: jax.Array, accepted: jax.Array) -> FixedClipState:
        """The state, unchanged."""
        del norm, accepted
        return state


class ZScoreClipState(NamedTuple):
    """State of :class:`ZScoreClip`.

    Attributes:
      zscore_norm_mean: bias-corrected EMA of the accepted norms.
      zscore_norm_var: bias-corrected EMA variance of the accepted norms.
      zscore_num_accepted: number of accepted steps folded in (int32).
    """

    zscore_norm_mean: jax.Array
    zscore_norm_var: jax.Array
    zscore_num_accepted: jax.Array


def running_moments_update(
    mean: jax.Array, var: jax.Array, count: jax.Array, value: jax.Array, decay: float, accepted: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Folds ``value`` into a bias-corrected EMA mean and variance where ``accepted``.

    Equal, in exact arithmetic, to bias-correcting EMAs of x and x**2 (``m / (1 -
    decay**t)``) and taking ``E[x**2] - E[x]**2``; this incremental (Welford) form uses
    the bias-corrected weight ``alpha_t = (1 - decay) / (1 - decay**t)`` and avoids the
    cancellation of the squared form in float32 and the overflow of ``x**2``.

    The variance's weight ``1 - alpha_t`` is written out as ``decay * (1 - decay**(t-1))
    / (1 - decay**t)``, exactly 0 at ``t = 1`` (``decay**0`` is 1 on every backend)
    and never negative: taken as ``1 - alpha_t``, a power or a division rounded one ulp
    off (XLA:GPU's) left the first variance at about ``±6e-8 * x**2``, a standard deviation
    of ``2.4e-4 * x`` (or, negative, a NaN) where it is 0.
    """
    new_count = count + 1
    decay = jnp.float32(decay)
    previous = jnp.power(decay, count.astype(jnp.float32))  # decay**(t-1): 1 at t = 1
    remaining = 1.0 - previous * decay  # 1 - decay**t: 1 - decay at t = 1, as below
    alpha = (1.0 - decay) / remaining
    keep = decay * (1.0 - previous) / remaining  # 1 - alpha, >= 0
    # Saturated at float32's max, not Inf: one norm above ~1.8e19 (its square
    # overflows) would otherwise leave the variance Inf, or NaN (0 * Inf at t = 1), for
    # the rest of the run; saturated, it decays back as the EMA forgets.
    big = jnp.float32(_stats._F32_MAX)
    diff = jnp.clip(value - mean, -big, big)
    increment = alpha * diff
    new_mean = mean + increment
    new_var = keep * jnp.minimum(var + jnp.minimum(diff * increment, big), big)
    return (
        jnp.where(accepted, new_mean, mean),
        jnp.where(accepted, new_var, var),
        jnp.where(accepted, new_count, count),
    )


def _check_warmup_and_cap(policy: Any) -> None:
    """Validates the fields the adaptive policies share (frozen dataclasses)."""
    object.__setattr__(policy, "warmup_steps", check.integer("warmup_steps", policy.warmup_steps, minimum=0))
    object.__setattr__(
        policy, "warmup_max_norm", check.positive("warmup_max_norm", policy.warmup_max_norm, allow_inf=True)
    )
    object.__setattr__(policy, "max_norm", check.optional(check.positive, "max_norm", policy.max_norm))


@dataclasses.dataclass(frozen=True)
class ZScoreClip:
    """Adaptive threshold ``mean + z * std`` of the running norm statistics (ZClip's idea).

    The running mean and standard deviation are those of bias-corrected EMAs (decay
    ``stats_decay``) of the norm and of its square, kept in incremental form
    (:func:`running_moments_update`). During the first ``max(warmup_steps, 2)``
    accepted steps the threshold is ``warmup_max_norm`` and the raw norms feed the
    statistics; afterwards the clipped norm ``min(norm, threshold)`` feeds them, so a
    spike moves the statistics by at most the threshold. Only accepted (finite,
    applied) steps with a non-zero norm update the statistics and count toward the
    warm-up, so the threshold is never 0. ``max_norm`` is an optional hard cap.

    The warm-up is at least two norms: after one, the standard deviation is 0 and
    ``mean + z * std`` is that norm, so clipped norms folded back would keep the
    threshold at the first norm for good. For the same reason, while the variance is
    exactly 0 (every norm folded so far equal) the raw norm feeds the statistics.

    The variance is kept in float32 in the norm's units: for norms below about 1e-17
    its increments fall into float32's subnormal range (flushed to 0), so it stays
    near 0, the threshold falls to about the running mean, and up to half of the
    steps are clipped. Scale the loss up for gradients that small.

    Attributes:
      z: z-score above which the norm is clipped (> 0). ZClip's default: 2.5.
      stats_decay: EMA decay of the running statistics, in (0, 1) (the name the guard
        uses for its own). ZClip's default: 0.97.
      warmup_steps: accepted steps before the adaptive threshold applies (>= 0; fewer
        than 2 counts as 2).
      warmup_max_norm: threshold during warm-up (> 0, may be inf). Default 1.0.
      max_norm: optional hard cap on the threshold (> 0) or None.

    References:
      Kumar et al., "ZClip: Adaptive Spike Mitigation for LLM Pre-Training", 2025.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_gradhealth as gh
      >>> policy = gh.ZScoreClip(z=2.0, warmup_steps=2)
      >>> state = policy.init()
      >>> for norm in [1.0, 1.2, 0.8, 1.0]:
      ...     state = policy.update(state, jnp.float32(norm), jnp.bool_(True))
      >>> round(float(policy.threshold(state)), 3)
      1.281
    """

    z: float = 2.5
    stats_decay: float = 0.97
    warmup_steps: int = 25
    warmup_max_norm: float = 1.0
    max_norm: float | None = None
    # Deprecated keyword of 0.1.0 for `stats_decay` (one name per meaning); goes in 0.4.
    decay: dataclasses.InitVar[float | None] = None

    def __post_init__(self, decay: float | None):
        if decay is not None:
            import warnings

            decay = check.in_open_unit_interval("decay", decay)
            default = next(f.default for f in dataclasses.fields(self) if f.name == "stats_decay")
            if self.stats_decay != default:
                raise TypeError(
                    f"gh.ZScoreClip: `decay` ({decay!r}) is the deprecated name of `stats_decay` "
                    f"({self.stats_decay!r}); pass only stats_decay."
                )
            warnings.warn(
                "gh.ZScoreClip(decay=...) is deprecated: use stats_decay=... (the guard's name for the same "
                "decay). The old keyword goes in 0.4.",
                DeprecationWarning,
                stacklevel=3,
            )
            object.__setattr__(self, "stats_decay", decay)
        object.__setattr__(self, "z", check.positive("z", self.z))
        object.__setattr__(self, "stats_decay", check.in_open_unit_interval("stats_decay", self.stats_decay))
        _check_warmup_and_cap(self)

    def init(self) -> ZScoreClipState:
        """Zero mean, variance and count: warming up."""
        return ZScoreClipState(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))

    def threshold(self, state: ZScoreClipState) -> jax.Array:
        """``mean + z * std`` once warm (``warmup_max_norm`` before), capped at ``max_norm``."""
        adaptive = state.zscore_norm_mean + self.z * jnp.sqrt(state.zscore_norm_var)
        threshold = jnp.where(self._warm(state), adaptive, self.warmup_max_norm)
        if self.max_norm is not None:
            threshold = jnp.minimum(threshold, self.max_norm)
        return threshold.astype(jnp.float32)

    def _warm(self, state: ZScoreClipState) -> jax.Array:
        # Two accepted norms at least: after one, the variance is 0 and mean + z * std is
        # that norm; clipped to it, every larger norm would be folded in as it, the
        # variance would stay 0, and the threshold could never rise again.
        return state.zscore_num_accepted >= max(self.warmup_steps, 2)

    def update(self, state: ZScoreClipState, norm: jax.Array, accepted: jax.Array) -> ZScoreClipState:
        """Folds an accepted ``norm`` (capped at the threshold once warm) into the running moments."""
        norm = jnp.asarray(norm, jnp.float32)  # the state stays float32 (a float64 norm under x64)
        # Capped once warm, but not while the variance is 0 (every norm folded so far
        # equal): the threshold is then the mean itself, and norms capped at it would
        # keep the variance 0 and the threshold where it is for good.
        capped = self._warm(state) & (state.zscore_norm_var > 0)
        value = jnp.where(capped, jnp.minimum(norm, self.threshold(state)), norm)
        # A zero norm says nothing of the scale: zeros alone would make the threshold 0.
        accepted = accepted & jnp.isfinite(norm) & (norm > 0)
        return ZScoreClipState(
            *running_moments_update(
                state.zscore_norm_mean,
                state.zscore_norm_var,
                state.zscore_num_accepted,
                value,
                self.stats_decay,
                accepted,
            )
        )


# The 0.1.0 attribute reads on: `policy.decay` is `policy.stats_decay`.
ZScoreClip.decay = property(lambda self: self.stats_decay, doc="Deprecated name of ``stats_decay``.")


class PercentileClipState(NamedTuple):
    """State of :class:`PercentileClip`.

    Attributes:
      percentile_history: ring buffer of the last accepted norms, float32
        ``[history_size]``, NaN where not yet filled.
      percentile_num_accepted: number of accepted norms written so far (int32).
    """

    percentile_history: jax.Array
    percentile_num_accepted: jax.Array


@dataclasses.dataclass(frozen=True)
class PercentileClip:
    """Threshold at a percentile of the recent accepted norms (AutoClip's idea).

    Keeps a ring buffer of the last ``history_size`` accepted pre-clip norms and clips
    at their ``percentile``-th percentile. Zero norms (all-zero gradients) are left out
    of the history and of the warm-up count, so the threshold is never 0. AutoClip used
    the 10th percentile of the whole history, which clips most steps; the default here
    (90) clips the top tenth.

    Attributes:
      percentile: in (0, 100].
      history_size: ring-buffer length (>= 1). Memory is ``4 * history_size`` bytes.
      warmup_steps: accepted steps before the percentile applies (>= 0).
      warmup_max_norm: threshold during warm-up (> 0, may be inf).
      max_norm: optional hard cap on the threshold (> 0) or None.

    References:
      Seetharaman et al., "AutoClip: Adaptive Gradient Clipping for Source Separation
      Networks", 2020.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_gradhealth as gh
      >>> policy = gh.PercentileClip(percentile=50, history_size=4, warmup_steps=0)
      >>> state = policy.init()
      >>> for norm in [1.0, 2.0, 3.0, 4.0, 5.0]:  # 1.0 falls out of the ring
      ...     state = policy.update(state, jnp.float32(norm), jnp.bool_(True))
      >>> float(policy.threshold(state))
      3.5
    """

    percentile: float = 90.0
    history_size: int = 1000
    warmup_steps: int = 25
    warmup_max_norm: float = 1.0
    max_norm: float | None = None

    def __post_init__(self):
        p = check.real_number("percentile", self.percentile)
        if not 0.0 < p <= 100.0:
            raise ValueError(f"`percentile` must lie in (0, 100], got {p!r}.")
        object.__setattr__(self, "percentile", p)
        object.__setattr__(self, "history_size", check.integer("history_size", self.history_size, minimum=1))
        _check_warmup_and_cap(self)

    def init(self) -> PercentileClipState:
        """An empty history (NaN slots) and a zero count."""
        return PercentileClipState(
            percentile_history=jnp.full((self.history_size,), jnp.nan, jnp.float32),
            percentile_num_accepted=jnp.zeros((), jnp.int32),
        )

    def _check_state(self, state: PercentileClipState) -> None:
        """A history of another length (a checkpoint of another ``history_size``) is refused."""
        shape = jnp.shape(state.percentile_history)
        if shape != (self.history_size,):
            size = self.history_size
            raise other_config_error("gh.PercentileClip", "percentile_history", "history_size", shape, size)

    def threshold(self, state: PercentileClipState) -> jax.Array:
        """The ``percentile`` of the accepted norms in the history once warm, capped at ``max_norm``."""
        self._check_state(state)
        # Slots not yet written hold NaN and are ignored.
        value = jnp.nanpercentile(state.percentile_history, self.percentile)
        warm = state.percentile_num_accepted >= max(self.warmup_steps, 1)
        threshold = jnp.where(warm, value, self.warmup_max_norm)
        if self.max_norm is not None:
            threshold = jnp.minimum(threshold, self.max_norm)
        return threshold.astype(jnp.float32)

    def update(self, state: PercentileClipState, norm: jax.Array, accepted: jax.Array) -> PercentileClipState:
        """Writes an accepted ``norm`` into the ring of recent norms."""
        self._check_state(state)
        norm = jnp.asarray(norm, jnp.float32)  # the state stays float32 (a float64 norm under x64)
        accepted = accepted & jnp.isfinite(norm) & (norm > 0)  # a zero norm says nothing of the scale
        slot = state.percentile_num_accepted % self.history_size
        written = ring_write(state.percentile_history, slot, norm)
        return PercentileClipState(
            percentile_history=jnp.where(accepted, written, state.percentile_history),
            percentile_num_accepted=state.percentile_num_accepted + accepted.astype(jnp.int32),
        )


def as_clip_policy(name: str, clip: Any) -> ClipPolicy:
    """Turns ``None`` (no clipping), a number (fixed threshold) or a policy into a policy.

    ``name`` is the argument's name in the error message. As ``"clip"`` (the guard's
    argument) the message also lists the clip-mode transformations, which
    :func:`optax_gradhealth.guard` accepts before it gets here.
    """
    if clip is None:
        return FixedClip(math.inf)
    if isinstance(clip, ClipPolicy) and not isinstance(clip, type):
        return clip
    if isinstance(clip, (int, float)) and not isinstance(clip, bool):
        return FixedClip(check.positive(name, clip, allow_inf=True))
    if check.is_array_like(clip):  # e.g. a threshold scheduled by optax.inject_hyperparams
        return FixedClip(check.positive_or_array(name, clip, allow_inf=True))  # inf: never clips, as a float
    modes = (
        ", or a clip-mode transformation (gh.clip_by_value, gh.clip_by_leaf_norm, gh.adaptive_grad_clip, "
        "gh.adagc_clip, or any optax.GradientTransformation)"
        if name == "clip"
        else ""
    )
    raise TypeError(
        f"`{name}` must be None, a positive number or a clip policy "
        f"(gh.FixedClip, gh.ZScoreClip, gh.PercentileClip) or a scalar array{modes}, "
        f"got {clip!r} (type {type(clip).__name__})."
    )


_F32_TINY = float(jnp.finfo(jnp.float32).tiny)


# The square root of the overflow branch's scale (`_stats._SCALE_AFTER_OVERFLOW`,
# 2**-80): 2**-40, exactly. A norm beyond float32 is `scaled_norm * 2**80`.
_HALF_RESCUE_SCALE = math.sqrt(_stats._SCALE_AFTER_OVERFLOW)


def _saturated(norm: jax.Array) -> jax.Array:
    """A finite norm that :func:`grad_stats` saturated at float32's max."""
    return jnp.isfinite(norm) & (norm >= _stats._F32_MAX)


def clip_scale(
    norm: jax.Array, threshold: jax.Array, scaled_norm: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """The factor that brings ``norm`` down to ``threshold``, as two float32 factors.

    Returns ``(threshold / norm, 1)`` where clipping applies, ``(1, 1)`` elsewhere. When
    ``threshold / norm`` would be a float32 subnormal (``norm / threshold`` above ~1e38;
    CPUs and GPUs flush those to zero: a silent all-zero clip), it returns
    ``(sqrt(threshold / norm), sqrt(threshold / norm))`` instead, which never underflows.
    :func:`scale_tree` multiplies by both factors; on ordinary steps the second is 1 and
    the result is exactly ``x * (threshold / norm)``, as ``optax.clip_by_global_norm``.
    Elementwise: ``norm`` and ``threshold`` may be vectors (one norm per leaf).

    A norm beyond float32's range saturates at its max (:class:`GradStats`), and a factor
    computed from it leaves the clipped norm above the threshold. Given ``scaled_norm``,
    the norm times ``2**-80`` (``_stats._grad_stats_and_scaled_norms``), a saturated norm
    is compared and divided in units of ``2**40``: ``threshold * 2**-40`` against
    ``scaled_norm * 2**40``, whose ratio is ``threshold`` over the true norm (to float32
    rounding). Where that ratio is subnormal its square root is ``sqrt(threshold)`` over
    ``sqrt(scaled_norm * 2**40) * 2**20``: the threshold is not scaled there, so that
    one below ``2**-86`` (~1.3e-26), which ``2**-40`` would take below float32's normal
    range, still clips to itself, not to zero. Where the norm is not saturated the
    factors are exactly those without ``scaled_norm``.

    A non-finite norm gets ``(1, 1)``: clipping never turns NaN into zeros silently;
    skipping non-finite steps is the guard's job.
    """
    root_threshold, root_unit = threshold, None
    if scaled_norm is not None:
        # A saturated norm is judged in units of 2**40: the threshold times 2**-40 against
        # the true norm times 2**-40 (`scaled_norm * 2**40`, finite for any norm below
        # 2**168), so that the factors below come from their true ratio. Selected before
        # the division: the cheap selects after it are repeated in every leaf's kernel.
        # (A threshold below 2**-86 becomes 0 here: still below the norm, and the ratio,
        # below 2**-214, is taken from the root, whose threshold is not scaled.)
        saturated = _saturated(norm)
        threshold = jnp.where(saturated, threshold * _HALF_RESCUE_SCALE, threshold)
        norm = jnp.where(saturated, scaled_norm / _HALF_RESCUE_SCALE, norm)
        root_unit = jnp.where(saturated, 1.0 / math.sqrt(_HALF_RESCUE_SCALE), 1.0)  # 2**20
    clip = jnp.isfinite(norm) & (norm > threshold)
    safe_norm = jnp.where(clip, norm, 1.0)
    direct = threshold / safe_norm
    if root_unit is None:
        root = jnp.sqrt(threshold) / jnp.sqrt(safe_norm)
    else:
        # sqrt(threshold * 2**-40) = sqrt(threshold) * 2**-20, taken as a 2**20 in the
        # denominator (the same value, bit for bit, and no more work in the leaf kernels).
        root = jnp.sqrt(root_threshold) / (jnp.sqrt(safe_norm) * root_unit)
    normal = direct >= _F32_TINY
    factor = jnp.where(clip, jnp.where(normal, direct, root), 1.0).astype(jnp.float32)
    correction = jnp.where(clip & ~normal, root, 1.0).astype(jnp.float32)
    return factor, correction


def clipped_norm(
    norm: jax.Array, factors: tuple[jax.Array, jax.Array], scaled_norm: jax.Array | None = None
) -> jax.Array:
    """The norm after :func:`scale_tree` by ``factors``: ``norm * factors[0] *
    factors[1]`` (in that order: the product of the two factors may underflow).

    Given ``scaled_norm`` (see :func:`clip_scale`), a saturated norm's clipped value is
    computed from it, ``scaled_norm * (factors[0] * 2**40) * (factors[1] * 2**40)``, and
    saturates only if it is itself beyond float32's max; elsewhere the plain product.
    """
    plain = norm * factors[0] * factors[1]
    if scaled_norm is None:
        return plain
    undo = 1.0 / _HALF_RESCUE_SCALE  # 2**40, exactly
    rescued = jnp.minimum(scaled_norm * (factors[0] * undo) * (factors[1] * undo), _stats._F32_MAX)
    return jnp.where(_saturated(norm), rescued, plain).astype(plain.dtype)


def scale_tree(tree: Any, factors: tuple[jax.Array, jax.Array]) -> Any:
    """Multiplies every float leaf by both ``factors`` (see :func:`clip_scale`) in
    float32, keeping each leaf's dtype; non-float leaves pass through."""
    factor, correction = factors

    def one(x):
        if not _stats._is_float(x):
            return x
        x = jnp.asarray(x)  # a Python float leaf
        if x.dtype == jnp.float32:
            return x * factor * correction
        wide = jnp.promote_types(x.dtype, jnp.float32)
        return (x.astype(wide) * factor * correction).astype(x.dtype)

    return jax.tree.map(one, tree)


class ClipByGlobalNormState(NamedTuple):
    """State of :func:`clip_by_global_norm`: what the last step saw and did.

    Attributes:
      clip_policy_state: the threshold policy's state.
      clip_norm: pre-clip global norm of the last step (float32).
      clip_norm_clipped: global norm after clipping (float32).
      clip_threshold: the threshold used (float32; inf when clipping is off).
      clip_clipped: whether the last step was clipped (bool).
      clip_num_clipped: number of clipped steps (int32).
      clip_num_steps: number of steps seen (int32).
      clip_leaf_norms: pre-clip per-leaf norms (a :class:`LeafNorms`: one vector).
    """

    clip_policy_state: Any
    clip_norm: jax.Array
    clip_norm_clipped: jax.Array
    clip_threshold: jax.Array
    clip_clipped: jax.Array
    clip_num_clipped: jax.Array
    clip_num_steps: jax.Array
    clip_leaf_norms: _stats.LeafNorms


def ring_write(buffer: jax.Array, slot: jax.Array, value: jax.Array) -> jax.Array:
    """``buffer.at[slot].set(value)`` for a small ring buffer, as a select.

    A scatter makes XLA:CPU expand it into a loop and re-run a simplification pass over
    the whole step (about 3 s of compile time on a 1000-leaf adamw step); a select
    against ``arange`` compiles to one small fused kernel.
    """
    hit = jnp.arange(buffer.shape[0], dtype=jnp.asarray(slot).dtype) == slot
    return jnp.where(hit, jnp.asarray(value, buffer.dtype), buffer)


def other_config_error(what: str, field: str, argument: str, built: Any, configured: Any) -> ValueError:
    """The error for a state whose ``field`` was built with ``argument=built`` (a buffer's
    shape stands for its length) given to a transformation that has
    ``argument=configured``: a state restored from a checkpoint of another configuration.

    The callers compare static shapes and structure only (Python, at trace time): nothing
    is added to the compiled step. orbax refuses such a restore itself;
    ``flax.serialization`` does not check shapes, and fills a ``None`` field of its target
    with the saved array.
    """
    if isinstance(built, tuple):  # a buffer's shape
        built = built[0] if len(built) == 1 else f"? (a `{field}` of shape {built})"
    return ValueError(
        f"{what}: the state's `{field}` was built for {argument}={built}, but this {what} has "
        f"{argument}={configured}. Was it restored from a checkpoint of another configuration? Restore "
        "into `tx.init(params)` of a transformation built with the same arguments (flax.serialization "
        "does not check shapes; orbax does)."
    )


def check_same_structure(grads: Any, expected: Any, what: str) -> None:
    """Raises a readable error at trace time when ``grads``'s tree structure is not
    ``expected`` (a ``PyTreeDef``, e.g. ``state.guard_leaf_norms.treedef``)."""
    got = jax.tree.structure(_stats._without_nnx_variables(grads))
    # `flax.nnx` variables count as their values on both sides (an init with nnx.Param
    # parameters and plain gradients, or the other way round, match).
    expected = jax.tree.structure(_stats._without_nnx_variables(expected.unflatten([0] * expected.num_leaves)))
    if got != expected:
        raise ValueError(
            f"{what}: the gradient tree's structure does not match the one the state was "
            f"initialised with.\n  expected: {expected}\n  got:      {got}\n"
            "Call `init` with parameters of the same structure as the gradients."
        )


_catalogue.register_metrics(
    ClipByGlobalNormState,
    {
        "clip_norm": "grad/norm",
        "clip_norm_clipped": "grad/norm_clipped",
        "clip_threshold": "grad/clip_threshold",
        "clip_clipped": "grad/clipped",
        "clip_num_clipped": "grad/num_clipped",
        "clip_num_steps": "grad/num_steps",
        "clip_leaf_norms": "grad/leaf_norm",
    },
)
_interfaces.keep_on_momentum_reset(ClipByGlobalNormState)


def clip_by_global_norm(max_norm: float | jax.Array | ClipPolicy | None) -> optax.GradientTransformation:
    """Clips updates by their global norm and records the pre- and post-clip norms.

    Like ``optax.clip_by_global_norm`` but (1) the norm is computed in float32 for every
    dtype and without overflow, so a huge but finite gradient is clipped rather than
    zeroed, (2) the threshold may be adaptive (:class:`ZScoreClip`,
    :class:`PercentileClip`), and (3) the state records ``grad/norm``,
    ``grad/norm_clipped``, ``grad/clip_threshold``, ``grad/clipped`` and
    ``grad/num_clipped`` for :func:`optax_gradhealth.metrics`. Non-finite updates pass
    through unchanged (wrap the optimizer in :func:`optax_gradhealth.guard` to skip them).

    Args:
      max_norm: a positive number (fixed threshold) or a clip policy.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import optax_gradhealth as gh
      >>> tx = optax.chain(gh.clip_by_global_norm(1.0), optax.sgd(0.1))
      >>> params = {'w': jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({'w': jnp.array([3.0, 4.0])}, state, params)
      >>> m = gh.metrics(state)
      >>> float(m['grad/norm']), float(m['grad/norm_clipped']), bool(m['grad/clipped'])
      (5.0, 1.0, True)
    """
    policy = as_clip_policy("max_norm", max_norm)

    def init_fn(params):
        return ClipByGlobalNormState(
            clip_policy_state=policy.init(),
            clip_norm=jnp.zeros((), jnp.float32),
            clip_norm_clipped=jnp.zeros((), jnp.float32),
            clip_threshold=policy.threshold(policy.init()),
            clip_clipped=jnp.zeros((), jnp.bool_),
            clip_num_clipped=jnp.zeros((), jnp.int32),
            clip_num_steps=jnp.zeros((), jnp.int32),
            clip_leaf_norms=_stats.LeafNorms.zeros(params),
        )

    def update_fn(updates, state, params=None):
        check.state_type("gh.clip_by_global_norm", state, ClipByGlobalNormState)
        del params
        check_same_structure(updates, state.clip_leaf_norms.treedef, "gh.clip_by_global_norm")
        stats, scaled = _stats._grad_stats_and_scaled_norms(updates)
        threshold = policy.threshold(state.clip_policy_state)
        # (A norm beyond float32 saturates: the factor comes from its scaled value.)
        factors = clip_scale(stats.norm, threshold, scaled.norm)
        clipped = factors[0] < 1.0
        return scale_tree(updates, factors), ClipByGlobalNormState(
            clip_policy_state=policy.update(state.clip_policy_state, stats.norm, stats.finite),
            clip_norm=stats.norm,
            clip_norm_clipped=clipped_norm(stats.norm, factors, scaled.norm),
            clip_threshold=threshold,
            clip_clipped=clipped,
            clip_num_clipped=state.clip_num_clipped + clipped.astype(jnp.int32),
            clip_num_steps=state.clip_num_steps + 1,
            clip_leaf_norms=stats.leaf_norms,
        )

    return optax.GradientTransformation(init_fn, _vma.keeps_state_type(update_fn))
