"""How the jitted core steers XLA's fusion: every such choice in one place, with its reason.

A leaf module (it imports nothing from the package). The statistics, the guard, the
selects and the clip modes call these functions instead of placing
``jax.lax.optimization_barrier`` themselves, so that a choice measured to differ
between backends is changed here, once (with ``jax.lax.platform_dependent``), and the
table below says which choice holds where and on what evidence.

* ``keep_in_reduction``: prevents XLA from merging an elementwise op inside a
  reduction with an identical one elsewhere in the step (Adam's ``nu`` squares the same
  gradient; a caller multiplies by the same scale) and materialising the shared result,
  a leaf-sized temporary. Evidence, XLA:CPU: no such temporary in the guard's compiled
  step (``tests/test_guard_inplace.py``; ``docs/benchmarks_guard.md``).
* ``one_vector``: prevents XLA from rewriting each elementwise consumer of a stacked
  vector of per-leaf scalars through the stack, each consumer becoming a kernel with one
  operand per leaf. Evidence, XLA:CPU: compile time at 1000 leaves
  (``docs/benchmarks_guard.md``).
* ``own_operands``: prevents one scalar broadcast shared between leaves of one shape
  from being materialised and read by every reduction; each leaf gets its own copy of
  the scalars. Evidence, XLA:CPU: no temporary the size of those leaves
  (``tests/test_guard_inplace.py``).
* ``apart``: prevents a computation evaluated twice (the inner update, once checked and
  once with its state selected) from sharing its outputs, which would then have two
  consumers and be materialised. Evidence, XLA:CPU: no state-sized temporary per leaf
  with ``check_updates=True`` (``docs/benchmarks_guard.md``, "The update check").
* ``before_writes``: orders a reduction that reads the parameters or the optimizer
  state (the guard's update health: the parameters' sums, and with the update check off
  the update's too) before the step writes them in place, by a data dependency of the
  skip flag (always False in value): without it XLA copies them first. Evidence,
  XLA:CPU: no copy of the parameters or moments in the compiled step
  (``tests/test_update_health.py``, the temporary bound with the check on and off).

Every choice is, today, the same on every backend: measured on XLA:CPU only. On GPU
and TPU each is the same barrier until a measurement there says otherwise (the
accelerator issue; ``benchmarks/gpu_suite.sh`` measures the guard's cost per backend,
and ``benchmarks/bench_lowering.py`` what turning each choice off does there).

Turned off one at a time on XLA:CPU (2026-11-30, ``docs/benchmarks.md``, "The fusion
choices, one by one"), each makes tests fail:
``keep_in_reduction`` 4 (gradient-sized temporaries beside Adam, in the loss-scale
fast path and the adaptive clip), ``one_vector`` 3 (kernels with one operand per leaf;
temporaries of the value clip), ``own_operands`` 5 (temporaries of the clip modes and
of the check's flags), ``apart`` 2 (the temporary bounds of the update check and of
update health) and ``before_writes`` 27 (copies of the parameters or moments under
donation, for every inner optimizer and clip mode).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["CHOICES", "apart", "before_writes", "keep_in_reduction", "one_vector", "own_operands"]

#: The fusion choices and, per backend, the lowering in force ("barrier": an
#: ``optimization_barrier``; "dependency": a data dependency that changes no value;
#: the same on every backend until measured otherwise).
CHOICES: dict[str, dict[str, str]] = {
    "keep_in_reduction": {"cpu": "barrier", "gpu": "barrier", "tpu": "barrier"},
    "one_vector": {"cpu": "barrier", "gpu": "barrier", "tpu": "barrier"},
    "own_operands": {"cpu": "barrier", "gpu": "barrier", "tpu": "barrier"},
    "apart": {"cpu": "barrier", "gpu": "barrier", "tpu": "barrier"},
    "before_writes": {"cpu": "dependency", "gpu": "dependency", "tpu": "dependency"},
}


def keep_in_reduction(operands: Any) -> Any:
    """``operands`` (an array or a tuple) as the operands of a reduction that must keep
    its elementwise work to itself (see the table)."""
    return jax.lax.optimization_barrier(operands)


def one_vector(vector: jax.Array) -> jax.Array:
    """A stacked (or concatenated) vector of per-leaf values, kept one array for its
    consumers (see the table)."""
    return jax.lax.optimization_barrier(vector)


def own_operands(operands: Any) -> Any:
    """A leaf and the scalars it is combined with, given copies of their own (see the
    table)."""
    return jax.lax.optimization_barrier(operands)


def apart(value: Any) -> Any:
    """An input of a second evaluation of a computation, kept apart from the first so
    that the two do not share outputs (see the table)."""
    return jax.lax.optimization_barrier(value)


def before_writes(flag: jax.Array, sums: jax.Array) -> jax.Array:
    """``flag`` (a bool the step's writes depend on), unchanged in value but computed
    from ``sums`` (a vector of sums of squares or counts: >= 0 or NaN), so that the
    reductions giving ``sums`` run before those writes (see the table). An
    ``optimization_barrier`` does not do it: XLA:CPU turns it into a control dependency
    that its copy insertion does not see."""
    return flag | jnp.any(sums < 0.0)
