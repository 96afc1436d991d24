"""Step replay: tell a transient computation fault from bad data by computing a flagged
step's gradient again.

Silent data corruption (a chip that computes a wrong value once, without an error) is
rare per device and frequent on a fleet: a NaN or a spike caused by it looks, to the
guard, exactly like one caused by a bad batch. Computing the same gradient again from
the same parameters and batch tells them apart: a deterministic computation gives the
same bits twice, so a different fingerprint means the first computation was faulty.

:func:`step_replay` wraps the gradient function of a train step. On a step whose
gradient (or loss) is non-finite, or whose norm is a spike against the guard's window,
it computes the gradient again inside ``lax.cond`` (a clean step runs only the cheap
check) and compares 32-bit fingerprints of every leaf's bits:

* different: a transient fault. The recomputed gradient is used when it is healthy
  (finite and not a spike), and the step is counted (``grad/num_replay_mismatches``);
* the same: the data or the numerics; the first gradient goes on to the guard, which
  acts as usual (skips, clips or records).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_gradhealth import _catalogue, _metrics, _stats
from optax_gradhealth import _detectors as detect
from optax_gradhealth import _guard as guard_module
from optax_gradhealth import _sketch as sketch
from optax_gradhealth import _validation as check

__all__ = ["ReplayState", "StepReplay", "step_replay"]


class ReplayState(NamedTuple):
    """State of :func:`step_replay` (every field a metric).

    Attributes:
      replay_replayed: this step's gradient was computed again (``grad/replayed``).
      replay_mismatched: the second computation differed from the first: a transient
        computation fault (``grad/replay_mismatched``).
      replay_num_replays: steps computed again since ``init`` (``grad/num_replays``).
      replay_num_mismatches: of them, those whose second computation differed
        (``grad/num_replay_mismatches``).
      replay_num_recovered: of those, the steps that went on with the second
        computation, which was healthy (``grad/num_replay_recovered``).
    """

    replay_replayed: jax.Array
    replay_mismatched: jax.Array
    replay_num_replays: jax.Array
    replay_num_mismatches: jax.Array
    replay_num_recovered: jax.Array


_catalogue.register_metrics(
    ReplayState,
    {
        "replay_replayed": "grad/replayed",
        "replay_mismatched": "grad/replay_mismatched",
        "replay_num_replays": "grad/num_replays",
        "replay_num_mismatches": "grad/num_replay_mismatches",
        "replay_num_recovered": "grad/num_replay_recovered",
    },
)


@dataclasses.dataclass(frozen=True)
class StepReplay:
    """What :func:`step_replay` returns: ``init() -> ReplayState``, and the replaying
    gradient function, called as ``replay(state, opt_state, *args, **kwargs) ->
    ((value, grads), state)`` (``call`` is the same function).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import optax_gradhealth as gh
      >>> replay = gh.step_replay(jax.value_and_grad(lambda w: jnp.sum(w**2)))
      >>> tx = gh.guard(optax.sgd(0.1))
      >>> w = jnp.ones(2)
      >>> (loss, grads), state = replay(replay.init(), tx.init(w), w)
      >>> float(loss), grads.tolist(), bool(gh.metrics(state)['grad/replayed'])  # healthy: not replayed
      (2.0, [2.0, 2.0], False)
    """

    init: Callable[[], ReplayState]
    call: Callable[..., tuple[tuple[Any, Any], ReplayState]]

    def __call__(
        self, state: ReplayState, opt_state: Any, *args: Any, **kwargs: Any
    ) -> tuple[tuple[Any, Any], ReplayState]:
        """``((value, grads), state)``: the gradient function's output, computed again
        when it is non-finite or a spike against the guard's window (see
        :func:`step_replay`)."""
        return self.call(state, opt_state, *args, **kwargs)


def _loss_of(value: Any) -> jax.Array:
    """The loss in ``value_and_grad``'s value: the value, or its first element with
    ``has_aux=True``."""
    loss = value[0] if isinstance(value, (tuple, list)) else value
    return jnp.asarray(loss, jnp.float32)


def _fingerprints(tree: Any) -> jax.Array:
    """uint32 fingerprint of the bits of every float leaf of ``tree`` (one vector)."""
    leaves = _stats._float_leaves(tree)
    if not leaves:
        return jnp.zeros((0,), jnp.uint32)
    return jnp.stack([sketch.leaf_fingerprint(x, sketch.u32(0x5BD1E995 * (i + 1))) for i, x in enumerate(leaves)])


def _guard_window(opt_state: Any, grads: Any) -> detect.NormWindow | None:
    """The spike window the replay judges ``grads`` against: that of the guard state
    inside ``opt_state`` (a chain, a wrapper, an ``nnx.Optimizer`` or its ``opt_state``,
    whose leaves are nnx variables). None (no spike rule: non-finite steps only) when
    there is no guard, or when the guard's window holds norms of another gradient than
    ``grads``:

    * inside a gradient accumulation (``optax.MultiSteps``, which :func:`accumulate` is
      too): norms of accumulated means;
    * more than one guard (one per parameter group, in ``optax.multi_transform`` or
      ``optax.masked``), or a guard whose per-leaf norms cover fewer leaves than
      ``grads`` has (``optax.masked``): norms of one group's part of the gradient.
    """
    is_guard = lambda x: isinstance(x, guard_module.GuardState)
    is_stop = lambda x: is_guard(x) or isinstance(x, optax.MultiStepsState)
    guards, accumulated = [], False
    for leaf in jax.tree.leaves(_metrics._unwrap_variables(opt_state), is_leaf=is_stop):
        if is_guard(leaf):
            guards.append(leaf)
        elif isinstance(leaf, optax.MultiStepsState):
            inner = [x for x in jax.tree.leaves(tuple(leaf), is_leaf=is_guard) if is_guard(x)]
            guards.extend(inner)
            accumulated = accumulated or bool(inner)
    if accumulated or len(guards) != 1:
        return None
    (guard_state,) = guards
    seen = len(guard_state.guard_report.guard_leaf_norms)
    if seen < jax.tree.structure(_stats._without_nnx_variables(grads)).num_leaves:
        return None
    return guard_state.guard_moments.guard_norm_window


def step_replay(
    value_and_grad_fn: Callable[..., tuple[Any, Any]],
    *,
    spike_threshold: float | None = guard_module.SPIKE_THRESHOLD,
    spike_zscore: float | None = guard_module.SPIKE_ZSCORE,
    warmup_steps: int = 20,
) -> StepReplay:
    """Computes a flagged step's gradient again, to tell a hardware fault from bad data.

    ``replay = gh.step_replay(jax.value_and_grad(loss_fn))`` gives ``replay.init()``
    (a :class:`ReplayState`) and ``replay(state, opt_state, *args)``, which returns
    ``(value, grads), state`` like ``value_and_grad_fn(*args)`` does, inside your jitted
    train step, in front of the optimizer update:

    * every step: the gradient's statistics (one pass, as the guard's) and, when
      ``opt_state`` holds a :func:`guard`, the guard's spike rule against its window of
      accepted norms (pass the guard's ``spike_threshold``, ``spike_zscore`` and
      ``warmup_steps`` if you changed them);
    * on a step whose gradient or loss is non-finite, or whose norm is a spike, and only
      then (``lax.cond``): ``value_and_grad_fn(*args)`` again, and the 32-bit
      fingerprints of the bits of the two values and gradients compared. Different: a
      transient computation fault, counted in ``grad/num_replay_mismatches``; the second
      computation replaces the first when it is healthy (finite and not a spike;
      ``grad/num_replay_recovered``). The same: the data or the numerics, and the first
      goes on to the guard, which acts as usual.

    The comparison needs a deterministic computation: the same inputs must give the same
    bits. That holds on CPU and TPU; on GPU set
    ``XLA_FLAGS=--xla_gpu_deterministic_ops=true`` (scatter-adds and some reductions
    use atomics, whose order varies), or every flagged step reads as a fault. Random
    numbers (dropout) must come from a key in ``args``, so that the second computation
    draws the same ones. With :func:`dynamic_loss_scale`, the spike rule sees the scaled
    gradient: pass ``spike_threshold=None, spike_zscore=None`` to replay on non-finite
    steps only; do the same in data-parallel training, where a device's local gradient
    is judged against the window of the mean gradient's norms.

    Under gradient accumulation (the guard inside ``optax.MultiSteps`` or
    :func:`accumulate`) the replay sees one micro-batch's gradient, while the guard's
    window holds the norms of means of ``every_k`` micro-batches: a healthy
    micro-batch's norm is 1 to ``sqrt(every_k)`` times the mean's (signal- to
    noise-dominated), and one that alone makes the window a spike about ``every_k``
    times, so no single scaling of the rule fits (with 32 noisy micro-batches, a third
    of the micro-steps were replayed in a healthy run). There the spike rule is not
    applied: only non-finite micro-steps are replayed. The same holds with a guard per
    parameter group (several guards in ``optax.multi_transform``, or a guard inside
    ``optax.masked`` that sees only some leaves): each window holds the norms of its
    group's part of the gradient, not of the whole gradient the replay sees (in a
    healthy run with a head's gradient 6 times the body's, over half of the steps were
    replayed). Wrap the whole optimizer in one guard to replay spikes too.

    Args:
      value_and_grad_fn: ``(*args, **kwargs) -> (value, grads)``, e.g.
        ``jax.value_and_grad(loss_fn)`` (``has_aux=True`` too: the loss is then the
        value's first element).
      spike_threshold: the guard's ``spike_threshold`` (> 1), or None.
      spike_zscore: the guard's ``spike_zscore`` (> 0), or None (both None: replay on
        non-finite steps only).
      warmup_steps: the guard's ``warmup_steps`` (>= 1).

    Returns:
      A :class:`StepReplay`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import optax_gradhealth as gh
      >>> loss_fn = lambda w, x: jnp.sum((w * x) ** 2)
      >>> replay = gh.step_replay(jax.value_and_grad(loss_fn))
      >>> tx = gh.guard(optax.sgd(0.1))
      >>> w = jnp.ones(3)
      >>> opt_state, replay_state = tx.init(w), replay.init()
      >>> (loss, grads), replay_state = replay(replay_state, opt_state, w, jnp.array([1.0, jnp.nan, 1.0]))
      >>> m = gh.metrics(replay_state)
      >>> bool(m['grad/replayed']), bool(m['grad/replay_mismatched'])  # bad data: the same NaN twice
      (True, False)
    """
    if not callable(value_and_grad_fn):
        raise TypeError(f"gh.step_replay: `value_and_grad_fn` must be callable, got {value_and_grad_fn!r}.")
    spike_threshold = check.optional(check.positive, "spike_threshold", spike_threshold)
    if spike_threshold is not None and spike_threshold <= 1.0:
        raise ValueError(
            "gh.step_replay: `spike_threshold` is a ratio norm / baseline norm and must be > 1, "
            f"got {spike_threshold!r}."
        )
    spike_zscore = check.optional(check.positive, "spike_zscore", spike_zscore)
    warmup_steps = check.integer("warmup_steps", warmup_steps, minimum=1)
    spikes_on = spike_threshold is not None or spike_zscore is not None

    def init() -> ReplayState:
        false = lambda: jnp.zeros((), jnp.bool_)
        zero = lambda: jnp.zeros((), jnp.int32)
        return ReplayState(false(), false(), zero(), zero(), zero())

    def healthy(value: Any, grads: Any, window: detect.NormWindow | None) -> tuple[jax.Array, jax.Array]:
        """``(healthy, flagged as a spike)`` of one computation of the step."""
        stats = _stats._grad_stats(grads)
        finite = stats.finite & jnp.isfinite(_loss_of(value))
        spike = jnp.zeros((), jnp.bool_)
        if window is not None:
            size = int(window.window_log_norms.shape[0])
            rule = detect.SpikeRule(
                spike_threshold,
                spike_zscore,
                size,
                warmup_steps,
                guard_module.SPREAD_FLOOR,
                min(guard_module.SPIKE_BASELINE, size),
                guard_module.REBASELINE_AFTER,
            )
            spike = rule.judge(window, stats.norm, finite).spike
        return finite & ~spike, spike

    def call(state: ReplayState, opt_state: Any, *args: Any, **kwargs: Any):
        value, grads = value_and_grad_fn(*args, **kwargs)
        # None where the guard's window holds norms of another gradient (accumulated
        # means, one parameter group's part): non-finite steps only (see the docstring).
        window = _guard_window(opt_state, grads) if spikes_on else None
        ok, _ = healthy(value, grads, window)

        def again(first):
            value, grads = first
            value2, grads2 = value_and_grad_fn(*args, **kwargs)
            mismatched = jnp.any(_fingerprints((value, grads)) != _fingerprints((value2, grads2)))
            use = mismatched & healthy(value2, grads2, window)[0]
            chosen = jax.tree.map(lambda a, b: jnp.where(use, a, b), (value2, grads2), (value, grads))
            return chosen, mismatched, use

        def clean(first):
            return first, jnp.zeros((), jnp.bool_), jnp.zeros((), jnp.bool_)

        replayed = ~ok
        (value, grads), mismatched, recovered = jax.lax.cond(replayed, again, clean, (value, grads))
        as_int = lambda flag: flag.astype(jnp.int32)
        new_state = ReplayState(
            replay_replayed=replayed,
            replay_mismatched=mismatched,
            replay_num_replays=state.replay_num_replays + as_int(replayed),
            replay_num_mismatches=state.replay_num_mismatches + as_int(mismatched),
            replay_num_recovered=state.replay_num_recovered + as_int(recovered),
        )
        return (value, grads), new_state

    return StepReplay(init, call)
