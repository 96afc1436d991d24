"""Expectations that legitimately differ per XLA backend, each with its evidence.

A test whose expected value depends on the backend reads it here instead of loosening
the bound for every backend; ``tests/test_backend.py`` checks the premises that can be
probed on the backend the tests run on.
"""

from __future__ import annotations

import os

import jax
import pytest

BACKEND: str = jax.default_backend()

#: Whether jitted float32 arithmetic reads subnormal inputs (``|x| < 2**-126``, about
#: 1.18e-38) as zero. XLA:CPU does (denormals-are-zero; the statistics tests' float64
#: reference flushes them too); XLA:GPU keeps them (an H200, jax 0.11: a bf16 1.19e-39
#: gave its norm, not 0); TPUs have no float32 subnormals.
FLUSHES_SUBNORMALS: bool = {"cpu": True, "gpu": False, "tpu": True}.get(BACKEND, False)

#: Bytes of temporary buffer a compiled step may hold for its scalar and reduction
#: scratch, in a test whose point is that no leaf-sized temporary exists; the smallest
#: leaf those tests use is a [256, 128] float32, 128 KiB. XLA:CPU: 8 KiB, a sixteenth of
#: it (4,128 bytes for the loss-scale wrapper around a guard since the guard's spike
#: window keeps its run's norms, 2026-12-01; 3,936 before). XLA:GPU keeps the partial
#: results of its multi-block reductions (7,456 bytes for that wrapper, an H200): 16 KiB.
SCRATCH_BYTES: int = {"cpu": 8192}.get(BACKEND, 16384)


def require_devices(k: int, test_file: str) -> None:
    """Fails ``test_file`` (a module's ``__file__``) at collection when fewer than ``k``
    devices exist: a silently skipped file would hide every failure in it."""
    if jax.device_count() >= k:
        return
    pytest.fail(
        f"tests/{os.path.basename(test_file)} needs {k} devices, found {jax.device_count()} "
        f"({jax.devices()[0].platform}; XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}, "
        f"JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')!r}). conftest.py emulates {k} CPU devices unless "
        "JAX_PLATFORMS names another platform; run with JAX_PLATFORMS=cpu.",
        pytrace=False,
    )


def wait_for_processes(procs: list, timeout: float) -> list[str]:
    """The combined output of each of ``procs`` (``subprocess.Popen`` with text stdout),
    once all have exited within ``timeout`` seconds each; kills the ones still running
    on the way out (a process whose peer never joined waits forever), and fails naming a
    process that exited non-zero, with the end of its output."""
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for pid, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {pid} exited {p.returncode}:\n{log[-3000:]}"
    return logs
