"""Test-session set-up shared by tests/ and the doctests in optax_gradhealth/."""

import os

# Emulate 8 CPU devices for the data-parallel tests; must happen before jax starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Property tests: fixed examples in CI (a failure reproduces), random ones locally.
try:
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")
except ImportError:  # hypothesis is a test dependency; doctests run without it
    pass
