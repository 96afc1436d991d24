"""Step-to-step direction: the cosine between consecutive gradients, from a sketch.

The cosine of this step's gradient with the previous one says how the direction moves:
near 1, the gradient keeps pointing the same way (a slow drift down a valley: a larger
learning rate may go faster); around 0, the steps are dominated by noise; persistently
negative, consecutive steps undo each other (oscillation across a sharp valley: a
learning rate too high). Keeping the previous gradient would cost its size; a count
sketch (a fixed random projection to ``sketch_dim`` floats, ``_sketch.leaf_sketch``)
keeps inner products: ``<S x, S y>`` estimates ``<x, y>`` without bias, with a standard
error of about ``|x| |y| / sqrt(sketch_dim)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_gradhealth import _catalogue, _clipping, _interfaces, _stats, _vma
from optax_gradhealth import _sketch as sketch
from optax_gradhealth import _validation as check

__all__ = ["StepCosineState", "record_step_cosine"]


class StepCosineState(NamedTuple):
    """State of :func:`record_step_cosine`.

    Attributes:
      step_sketch: float32 ``[sketch_dim]``, the sketch of the last finite, non-zero
        gradient seen (the previous accepted step's, inside :func:`guard`), scaled to
        unit norm.
      step_has_reference: bool, a reference sketch exists.
      step_cosine: float32, the estimated cosine between this step's gradient and the
        reference (``grad/step_cosine``; 0 on the first step, and on a non-finite or
        zero gradient, which do not replace the reference: never NaN, so that the
        guard's check of its inner state's finiteness holds).
    """

    step_sketch: jax.Array
    step_has_reference: jax.Array
    step_cosine: jax.Array


_interfaces.keep_on_momentum_reset(StepCosineState)
_catalogue.register_metrics(StepCosineState, {"step_cosine": "grad/step_cosine"})


def record_step_cosine(sketch_dim: int = 1024, seed: int = 0) -> optax.GradientTransformation:
    """Records the cosine between consecutive gradients (``grad/step_cosine``);
    updates pass unchanged.

    The previous gradient is kept as a count sketch of ``sketch_dim`` float32 numbers
    (4 KiB at the default), never as a copy; the cosine is the cosine of the two
    sketches, with an error of about ``1 / sqrt(sketch_dim)`` (``docs/concepts.md``
    tabulates it). One pass over the gradient a step, fused with nothing else.

    Put it inside :func:`guard`, in front of the optimizer, to compare accepted steps
    only (a skipped step reaches neither it nor the reference)::

        gh.guard(optax.chain(gh.record_step_cosine(), optax.adamw(1e-3)))

    Args:
      sketch_dim: floats in the sketch (int >= 2).
      seed: seed of the sketch's hashes (a Python int >= 0, of any size: only
        ``numpy.random.default_rng`` reads it, on the host, when the step is traced).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`StepCosineState`.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_gradhealth as gh
      >>> tx = gh.record_step_cosine()
      >>> state = tx.init({'w': jnp.zeros(4096)})
      >>> g = jnp.sin(jnp.arange(4096.0))
      >>> for grads in (g, 2 * g, -g):
      ...     _, state = tx.update({'w': grads}, state)
      ...     print(round(float(gh.metrics(state)['grad/step_cosine']), 3))
      0.0
      1.0
      -1.0
    """
    dim = check.integer("sketch_dim", sketch_dim, minimum=2)
    # Only numpy's default_rng reads the seed: any int >= 0, never stored in an int32.
    seed = check.integer("seed", seed, minimum=0, maximum=None)
    leaf_seed = sketch.LeafSeeds(seed, dim)

    def init_fn(params):
        del params
        return StepCosineState(
            step_sketch=jnp.zeros((dim,), jnp.float32),
            step_has_reference=jnp.zeros((), jnp.bool_),
            step_cosine=jnp.zeros((), jnp.float32),
        )

    def update_fn(updates, state, params=None):
        check.state_type("gh.record_step_cosine", state, StepCosineState)
        del params
        shape = jnp.shape(state.step_sketch)  # static: a checkpoint of another sketch_dim is refused
        if shape != (dim,):
            raise _clipping.other_config_error("gh.record_step_cosine", "step_sketch", "sketch_dim", shape, dim)
        leaves = jax.tree.leaves(updates)
        current = jnp.zeros((dim,), jnp.float32)
        for i, x in enumerate(leaves):
            if _stats._is_float(x):
                salt, offset = leaf_seed(i)
                # (jnp.asarray: a Python float leaf)
                current = current + sketch.leaf_sketch(jnp.asarray(x), dim, sketch.u32(salt), offset)
        # A gradient with a direction (finite, not zero) becomes the next reference, kept
        # as a unit vector. Divided by its largest entry before any square, so that a
        # gradient of any finite scale (a norm of 1e20 or of 1e-25) keeps its direction.
        peak = jnp.max(jnp.abs(current))
        usable = jnp.isfinite(peak) & (peak > 0)
        scaled = current / jnp.where(usable, peak, 1.0)
        unit = scaled / jnp.sqrt(jnp.sum(jnp.square(scaled)))  # its norm is in [1, sqrt(dim)]
        cosine = jnp.sum(unit * state.step_sketch)
        known = usable & state.step_has_reference
        return updates, StepCosineState(
            step_sketch=jnp.where(usable, unit, state.step_sketch),
            step_has_reference=state.step_has_reference | usable,
            step_cosine=jnp.where(known, jnp.clip(cosine, -1.0, 1.0), 0.0).astype(jnp.float32),
        )

    return optax.GradientTransformation(init_fn, _vma.keeps_state_type(update_fn))
