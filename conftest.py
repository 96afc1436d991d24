"""Test-session set-up shared by tests/ and the doctests in optax_gradhealth/."""

import os

# Emulate 8 CPU devices for the data-parallel tests; must happen before jax starts. Added
# to XLA_FLAGS already set (a flag of the user's own must not drop the device count, or
# tests/test_cross_device.py would find one device); a count set there is kept.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Property tests: fixed examples in CI (a failure reproduces), random ones locally.
try:
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")
except ImportError:  # hypothesis is a test dependency; doctests run without it
    pass
