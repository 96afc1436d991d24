"""optax-gradhealth: gradient health for Optax.

Measure the gradient (global and per-layer norms, once per step, float32,
overflow-safe), clip it (fixed or adaptive), guard the optimizer (skip NaN/Inf and
spikes, reset momentum, recommend rollback) and read it all as a flat metrics dict.
"""

from optax_gradhealth._clipping import (
    ClipByGlobalNormState,
    ClipPolicy,
    FixedClip,
    FixedClipState,
    PercentileClip,
    PercentileClipState,
    ZScoreClip,
    ZScoreClipState,
    clip_by_global_norm,
)
from optax_gradhealth._guard import GuardState, guard
from optax_gradhealth._metrics import CATALOGUE, metrics, register_metrics
from optax_gradhealth._stats import GradStats, global_norm, grad_stats, layer_norms, leaf_names, path_name

# isort: split
# Cross-device audit (pmap / shard_map): issue 3.
from optax_gradhealth._cross_device import (
    CrossDeviceState,
    cross_device,
    cross_device_alarms,
    local_grad,
    local_value_and_grad,
)

__version__ = "0.1.0"

__all__ = [
    "CATALOGUE",
    "ClipByGlobalNormState",
    "ClipPolicy",
    "FixedClip",
    "FixedClipState",
    "GradStats",
    "GuardState",
    "PercentileClip",
    "PercentileClipState",
    "ZScoreClip",
    "ZScoreClipState",
    "clip_by_global_norm",
    "global_norm",
    "grad_stats",
    "guard",
    "layer_norms",
    "leaf_names",
    "metrics",
    "path_name",
    "register_metrics",
]

# Cross-device audit (pmap / shard_map): issue 3.
__all__ += [
    "CrossDeviceState",
    "cross_device",
    "cross_device_alarms",
    "local_grad",
    "local_value_and_grad",
]
