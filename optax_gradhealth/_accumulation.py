"""Gradient accumulation helpers: per-micro-batch norms next to ``optax.MultiSteps``.

``optax.MultiSteps(gh.guard(inner, ...), k)`` already takes every guard decision once,
on the accumulated mean gradient: MultiSteps calls the guard on each micro-step but
keeps the guard's new state only on the k-th, so partial means never count. What it
cannot show is the micro-batches themselves; :func:`record_micro_batch_norms` does,
when placed in front of it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_gradhealth import _catalogue, _clipping, _interfaces, _stats
from optax_gradhealth import _validation as check

__all__ = ["MicroBatchNormsState", "record_micro_batch_norms"]


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

    Put it in front of ``optax.MultiSteps`` with the same ``every_k``::

        tx = optax.chain(
            gh.record_micro_batch_norms(4),
            optax.MultiSteps(gh.guard(optax.adam(1e-3), clip=1.0), 4).gradient_transformation(),
        )

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
        del params, extra_args
        slot = state.micro_batch_num_steps % every_k
        norm = _stats.global_norm(updates)
        return updates, MicroBatchNormsState(
            micro_batch_norms=_clipping.ring_write(state.micro_batch_norms, slot, norm),
            micro_batch_num_steps=state.micro_batch_num_steps + 1,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
