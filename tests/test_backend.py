"""The per-backend premises of ``tests/backend.py``, probed on the backend in use."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tests.backend import FLUSHES_SUBNORMALS


def test_subnormal_flushing_is_what_the_table_says():
    # x * y with y a traced 1.0: nothing for XLA to fold, a float32 multiply of a
    # subnormal input (1e-39, of the bf16 kind that found this difference).
    product = jax.jit(jnp.multiply)(np.float32(1e-39), np.float32(1.0))
    assert (float(product) == 0.0) == FLUSHES_SUBNORMALS, float(product)
