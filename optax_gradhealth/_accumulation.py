"""Gradient accumulation helpers: per-micro-batch norms next to ``optax.MultiSteps``.

``optax.MultiSteps(gh.guard(inner, ...), k)`` already takes every guard decision once,
on the accumulated mean gradient: MultiSteps calls the guard on each micro-step but
keeps the guard's new state only on the k-th, so partial means never count. What it
cannot show is the micro-batches themselves; :func:`record_micro_batch_norms` does,
when placed in front of it. :func:`accumulate` is ``optax.MultiSteps`` that also
measures the gradient noise scale from the micro-batches, as the cross-device audit does
from the devices.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_gradhealth import _catalogue, _clipping, _interfaces, _stats, _vma
from optax_gradhealth import _noise_scale as noise
from optax_gradhealth import _validation as check

__all__ = ["AccumulationState", "MicroBatchNormsState", "accumulate", "record_micro_batch_norms"]


class MicroBatchNormsState(NamedTuple):
    """State of :func:`record_micro_batch_norms`.

    Attributes:
      micro_batch_norms: float32 ``[every_k]``, the global norm of each micro-batch
        gradient, slot ``i`` for the ``i``-th micro-batch of the current window (slots
        not yet reached in this window keep the previous window's values)
        (``grad/micro_batch_norms``).
      micro_batch_num_steps: int32, micro-batches seen so far.
    """

    micro_batch_norms: jax.Array
    micro_batch_num_steps: jax.Array


_interfaces.keep_on_momentum_reset(MicroBatchNormsState)
_catalogue.register_metrics(
    MicroBatchNormsState,
    {"micro_batch_norms": "grad/micro_batch_norms"},
)


def record_micro_batch_norms(every_k: int) -> optax.GradientTransformationExtraArgs:
    """Records the global norm of each micro-batch gradient; updates pass unchanged.

    Put it in front of :func:`accumulate` (or ``optax.MultiSteps``) with the same
    ``every_k``::

        tx = optax.chain(
            gh.record_micro_batch_norms(4),
            gh.accumulate(gh.guard(optax.adam(1e-3), clip=1.0), 4),
        )

    With ``optax.MultiSteps``, chain ``optax.GradientTransformationExtraArgs(ms.init,
    ms.update)`` of ``ms = optax.MultiSteps(...)``, not ``ms.gradient_transformation()``:
    that is a plain ``GradientTransformation``, and ``optax.chain`` drops the extra
    arguments (``loss=``, ``value=``) it would pass to one, so the guard inside would never
    see the loss.

    It costs one float32 norm pass over each micro-batch gradient; leave it out when the
    accumulated norm (the guard's ``grad/norm``) is enough. The slots follow this
    transformation's own micro-batch counter, which matches ``MultiSteps``' unless a
    ``should_skip_update_fn`` drops micro-batches.

    Args:
      every_k: micro-batches per update (int >= 1), as given to ``MultiSteps``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (extra arguments are ignored).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import optax_gradhealth as gh
      >>> tx = gh.record_micro_batch_norms(2)
      >>> state = tx.init({'w': jnp.zeros(2)})
      >>> for g in ([3.0, 4.0], [0.0, 1.0]):
      ...     _, state = tx.update({'w': jnp.array(g)}, state)
      >>> gh.metrics(state)['grad/micro_batch_norms'].tolist()
      [5.0, 1.0]
    """
    every_k = check.integer("every_k", every_k, minimum=1)

    def init_fn(params):
        del params
        return MicroBatchNormsState(jnp.zeros((every_k,), jnp.float32), jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, **extra_args):
        check.state_type("gh.record_micro_batch_norms", state, MicroBatchNormsState)
        del params, extra_args
        slot = state.micro_batch_num_steps % every_k
        norm = _stats.global_norm(updates)
        return updates, MicroBatchNormsState(
            micro_batch_norms=_clipping.ring_write(state.micro_batch_norms, slot, norm),
            micro_batch_num_steps=state.micro_batch_num_steps + 1,
        )

    return optax.GradientTransformationExtraArgs(init_fn, _vma.keeps_state_type(update_fn))


# ----------------------------------------------------------------------------- noise scale


class AccumulationState(NamedTuple):
    """State of :func:`accumulate`.

    Attributes:
      accumulation_inner_state: the ``optax.MultiStepsState`` of the accumulation (and,
        inside it, the wrapped optimizer's state).
      accumulation_micro_sq_sum: float32, sum of the squared norms of this window's
        micro-batch gradients so far.
      accumulation_loss_nonfinite: bool, a micro-batch of this window so far had a
        non-finite ``loss`` or ``value``: the window's end hands ``inner`` a NaN one.
      accumulation_grad_sq_est: float32, the last window's estimate of ``|G|^2``
        (``grad/grad_sq_est``).
      accumulation_trace_cov_est: float32, the last window's estimate of ``tr(Sigma)``
        (``grad/trace_cov_est``; NaN without ``micro_batch_size`` or with ``every_k=1``).
      accumulation_grad_sq_ema, accumulation_trace_cov_ema: their EMAs (not
        bias-corrected), over the windows folded (finite estimates, and neither
        skipped nor judged a spike by a guard inside).
      accumulation_num_windows: int32, windows folded into the EMAs.
      accumulation_noise_scale: float32, ``B_simple``, the ratio of the bias-corrected
        EMAs (``grad/noise_scale``; NaN before the first window or without
        ``micro_batch_size``).
    """

    accumulation_inner_state: Any
    accumulation_micro_sq_sum: jax.Array
    accumulation_loss_nonfinite: jax.Array
    accumulation_grad_sq_est: jax.Array
    accumulation_trace_cov_est: jax.Array
    accumulation_grad_sq_ema: jax.Array
    accumulation_trace_cov_ema: jax.Array
    accumulation_num_windows: jax.Array
    accumulation_noise_scale: jax.Array


# The wrapped optimizer's state (in MultiSteps') and the window's partial records are
# reset with the moments; the noise-scale estimates are bookkeeping.
_interfaces.keep_on_momentum_reset(
    AccumulationState,
    wrapped=("accumulation_inner_state", "accumulation_micro_sq_sum", "accumulation_loss_nonfinite"),
)
_catalogue.register_metrics(
    AccumulationState,
    {
        "accumulation_noise_scale": "grad/noise_scale",
        "accumulation_grad_sq_est": "grad/grad_sq_est",
        "accumulation_trace_cov_est": "grad/trace_cov_est",
    },
)


def accumulate(
    inner: optax.GradientTransformation,
    every_k: int | jax.Array,
    *,
    micro_batch_size: int | jax.Array | None = None,
    noise_scale_decay: float | jax.Array = 0.99,
) -> optax.GradientTransformationExtraArgs:
    """``optax.MultiSteps(inner, every_k)`` that also measures the gradient noise scale.

    The updates and the accumulation are MultiSteps' own (the mean of ``every_k``
    micro-batch gradients reaches ``inner`` once per window). At the end of each window
    the mean of the micro-batches' squared norms and the squared norm of their mean give
    unbiased estimates of ``|G|^2`` and ``tr(Sigma)`` (the per-example gradient
    covariance's trace): the formulas the cross-device audit applies to devices, here
    with micro-batches of ``micro_batch_size`` examples. ``B_simple = tr(Sigma) / |G|^2``
    (McCandlish et al., 2018), smoothed as the audit smooths it (bias-corrected EMAs with
    decay ``noise_scale_decay``), is recorded as ``grad/noise_scale``: a batch far above it
    gives diminishing returns, one far below it wastes steps.

    Cost: one float32 norm pass over each micro-batch gradient, and one pass over the
    accumulator at the end of each window (under ``lax.cond``: the other micro-steps
    skip it). On one device no gradient-sized buffer beyond ``optax.MultiSteps``' own;
    with the parameters sharded over devices, the cond holds one (a window's norm on
    every micro-step would not, at 10-40% of a micro-step on XLA:CPU). A window with a non-finite
    micro-batch folds nothing, and, unlike ``optax.MultiSteps`` alone (which empties its
    accumulator by multiplying it by 0, keeping a NaN), spoils no later window: a guard
    inside skips that window's update and the next one starts clean.

    Only a window whose two estimates are finite is folded into the EMAs. When a
    :func:`guard` is inside ``inner`` (``inner`` itself or a chain holding one, found
    from the state's structure), a window it skipped (a non-finite gradient, loss or
    update, a skipped spike) or judged a spike (a clipped one) is not folded either:
    the bad micro-batch it caught leaves ``grad/noise_scale`` as it was. Without a
    guard every finite window is folded, an outlier micro-batch included: one with a
    thousand times the usual norm inflates the noise scale for about a thousand
    windows at the default decay.

    ``loss=`` and ``value=`` reach ``inner`` as ``optax.MultiSteps`` passes them, the
    window's last micro-batch's, except that a non-finite one on an earlier micro-batch
    of the window makes the one passed at the window's end NaN: a guard inside skips
    that window and counts it in ``grad/num_nonfinite``, whichever micro-batch it was.

    Args:
      inner: the optimizer the accumulated gradients go to (e.g. ``gh.guard(...)``).
      every_k: micro-batches per update (int >= 1; 1 gives no estimate).
      micro_batch_size: examples per micro-batch (int >= 1), for ``tr(Sigma)`` and the
        noise scale; None records ``|G|^2`` only.
      noise_scale_decay: decay of the two EMAs, in (0, 1).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`AccumulationState`.

    References:
      McCandlish, Kaplan, Amodei et al., "An Empirical Model of Large-Batch Training",
      2018, appendix A.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import optax_gradhealth as gh
      >>> tx = gh.accumulate(optax.sgd(1.0), 2, micro_batch_size=1)
      >>> params = {'w': jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> _, state = tx.update({'w': jnp.array([1.0, 0.0])}, state, params)
      >>> updates, state = tx.update({'w': jnp.array([3.0, 0.0])}, state, params)
      >>> updates['w'].tolist()                              # the mean, once per window
      [-2.0, 0.0]
      >>> m = gh.metrics(state)                              # (2 * 4 - 5) / 1, 1 * 2 * (5 - 4) / 1
      >>> float(m['grad/grad_sq_est']), float(m['grad/trace_cov_est']), round(float(m['grad/noise_scale']), 4)
      (3.0, 2.0, 0.6667)
    """
    inner = check.transformation("inner", inner)
    every_k = check.integer_or_array("every_k", every_k, minimum=1)
    micro_batch_size = check.optional(check.integer_or_array, "micro_batch_size", micro_batch_size, minimum=1)
    decay = check.or_array(check.in_open_unit_interval, "noise_scale_decay", noise_scale_decay)
    # The EMAs stay float32 whatever the decay's dtype: a float64 decay (an np.float64, or
    # a jnp array under jax_enable_x64) would make them float64 after the first update
    # (lax.scan then fails, jit recompiles). A Python number is weakly typed already; an
    # np.float64 (a Python float subclass) becomes one; an array, concrete or traced
    # (optax.inject_hyperparams), is cast where it is used.
    if isinstance(decay, float):
        decay = float(decay)
    # (MultiSteps takes an int or a schedule: a traced `every_k` goes in as a schedule.)
    schedule = every_k if isinstance(every_k, int) else (lambda step: every_k)
    multi_steps = optax.MultiSteps(inner, schedule, use_grad_mean=True).gradient_transformation()

    def init_fn(params):
        zero = lambda: jnp.zeros((), jnp.float32)
        nan = jnp.full((), jnp.nan, jnp.float32)
        return AccumulationState(
            accumulation_inner_state=multi_steps.init(params),
            accumulation_micro_sq_sum=zero(),
            accumulation_loss_nonfinite=jnp.zeros((), jnp.bool_),
            accumulation_grad_sq_est=zero(),
            # NaN from the start when it can never be estimated (no micro-batch size, or
            # windows of one micro-batch): a value that is NaN by design stays NaN, not
            # 0 then NaN, which the guard's update check would take for a fault.
            accumulation_trace_cov_est=nan
            if micro_batch_size is None or (isinstance(every_k, int) and every_k == 1)
            else zero(),
            accumulation_grad_sq_ema=zero(),
            accumulation_trace_cov_ema=zero(),
            accumulation_num_windows=jnp.zeros((), jnp.int32),
            accumulation_noise_scale=jnp.full((), jnp.nan, jnp.float32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        check.state_type("gh.accumulate", state, AccumulationState)
        ms_state = state.accumulation_inner_state
        if isinstance(ms_state.acc_grads, optax.LookaheadParams) and not isinstance(updates, optax.LookaheadParams):
            raise ValueError(
                "gh.accumulate: the accumulator was initialised with optax.LookaheadParams (an inner "
                "optax.lookahead), whose gradients are shaped like its fast parameters only; accumulating "
                "them is not supported (optax.MultiSteps' accumulator is shaped like the parameters). "
                "Put the accumulation inside the lookahead: optax.lookahead(gh.accumulate(fast_optimizer, k), ...)."
            )
        _clipping.check_same_structure(updates, jax.tree.structure(ms_state.acc_grads), "gh.accumulate")
        step = ms_state.mini_step
        emit = step == every_k - 1
        micro_sq = jnp.square(_stats.global_norm(updates))
        sum_sq = state.accumulation_micro_sq_sum + micro_sq

        def window_sq():
            # The window's mean, as MultiSteps forms it, acc + (g - acc) / (step + 1), and
            # its squared norm (float32 sums, float64 for float64 leaves), formed inside
            # each leaf's reduction: the mean tree is never a value of its own. Non-float
            # leaves are in neither this norm nor the micro-batches'.
            count = (step + 1).astype(jnp.float32)
            total = jnp.zeros((), jnp.float32)
            for g, acc in zip(jax.tree.leaves(updates), jax.tree.leaves(ms_state.acc_grads), strict=True):
                if _stats._is_float(g):
                    wide = jnp.promote_types(g.dtype, jnp.float32)  # complex stays complex
                    mean = acc.astype(wide) + (g.astype(wide) - acc.astype(wide)) / count.astype(wide)
                    parts = (jnp.real(mean), jnp.imag(mean)) if jnp.iscomplexobj(mean) else (mean,)
                    total = total + sum(jnp.sum(jnp.square(part)) for part in parts).astype(jnp.float32)
            return total

        # No norm helper: its barrier made XLA keep the mean tree, a gradient-sized
        # buffer beyond optax.MultiSteps' own (64.0 against 33.6 MB for sgd at 8M
        # parameters). Sharded, the cond's operands still cost one such buffer; a
        # `jnp.where` of the norm computed on every micro-step does not, but costs 10-40%
        # of a micro-step on XLA:CPU (2026-12-01). (The zero is typed per device when
        # the accumulator is: a state kept per device under shard_map.)
        no_window = _vma.varying_like(jnp.zeros((), jnp.float32), updates, ms_state.acc_grads)
        mean_sq = jax.lax.cond(emit, window_sq, lambda: no_window)
        grad_sq, trace_cov = noise.estimates(sum_sq / every_k, mean_sq, every_k, micro_batch_size)
        # MultiSteps hands `inner` the window's last loss only: a non-finite one earlier
        # in the window is remembered and handed on as a NaN at its end.
        loss_nonfinite = state.accumulation_loss_nonfinite
        extra_args = dict(extra_args)
        for name in ("loss", "value"):
            arg = extra_args.get(name)
            if arg is not None and jnp.issubdtype(jnp.result_type(arg), jnp.inexact):
                extra_args[name] = jnp.where(state.accumulation_loss_nonfinite, jnp.nan, arg)
                loss_nonfinite = loss_nonfinite | ~jnp.all(jnp.isfinite(arg))
        new_updates, new_ms_state = multi_steps.update(updates, ms_state, params, **extra_args)
        fold = emit & jnp.isfinite(grad_sq) & jnp.isfinite(trace_cov) & (every_k > 1) & (micro_batch_size is not None)
        # A window a guard inside skipped or judged a spike is not folded (its new state
        # is kept at the window's end, when `emit`).
        for flag in _guard_flags(new_ms_state.inner_opt_state, ("guard_skipped", "guard_spike")):
            fold = fold & ~flag
        folded = noise.fold(
            state.accumulation_grad_sq_ema,
            state.accumulation_trace_cov_ema,
            state.accumulation_num_windows,
            grad_sq,
            trace_cov,
            decay if isinstance(decay, float) else jnp.asarray(decay, jnp.float32),
            fold,
        )
        # MultiSteps empties its accumulator by multiplying it by 0, which keeps a NaN or
        # Inf: one bad micro-batch would make every later window non-finite. Emptied
        # here with a select, a bad micro-batch spoils its own window only (which a
        # guard inside skips).
        new_ms_state = new_ms_state._replace(
            acc_grads=jax.tree.map(lambda a: jnp.where(emit, jnp.zeros_like(a), a), new_ms_state.acc_grads)
        )
        return new_updates, AccumulationState(
            accumulation_inner_state=new_ms_state,
            accumulation_micro_sq_sum=jnp.where(emit, 0.0, sum_sq),
            accumulation_loss_nonfinite=~emit & loss_nonfinite,
            accumulation_grad_sq_est=jnp.where(emit, grad_sq, state.accumulation_grad_sq_est),
            accumulation_trace_cov_est=jnp.where(emit, trace_cov, state.accumulation_trace_cov_est),
            accumulation_grad_sq_ema=folded.grad_sq_ema,
            accumulation_trace_cov_ema=folded.trace_cov_ema,
            accumulation_num_windows=folded.count,
            accumulation_noise_scale=folded.noise_scale,
        )

    return optax.GradientTransformationExtraArgs(init_fn, _vma.keeps_state_type(update_fn))


def _guard_flags(state: Any, names: tuple[str, ...]) -> list[jax.Array]:
    """The fields ``names`` of the last step's report (``guard_report``) of each guard
    in ``state`` (the outermost ones), found from the state's structure as the loss
    scale finds a guard (an ``UnscalesOnRead`` state), without importing the guard."""
    reports = [getattr(x, "guard_report", None) for x in _interfaces.guard_states(state)]
    return [getattr(r, name) for r in reports if r is not None for name in names if hasattr(r, name)]
