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
from optax_gradhealth._guard import GuardCounters, GuardMoments, GuardReport, GuardState, guard, rebaseline
from optax_gradhealth._metrics import CATALOGUE, metrics, register_metrics
from optax_gradhealth._stats import (
    GradStats,
    LeafNorms,
    global_norm,
    grad_stats,
    leaf_names,
    leaf_norms,
    path_name,
)

# isort: split
# --- mixed precision, accumulation and the remaining clipping modes (issue 5) ---
from optax_gradhealth._accumulation import (
    AccumulationState,
    MicroBatchNormsState,
    accumulate,
    record_micro_batch_norms,
)
from optax_gradhealth._clip_modes import (
    AdaGCState,
    AdaptiveClipState,
    ClipByLeafNormState,
    ClipByValueState,
    adagc_clip,
    adaptive_grad_clip,
    clip_by_leaf_norm,
    clip_by_value,
)
from optax_gradhealth._direction import StepCosineState, record_step_cosine
from optax_gradhealth._loss_scale import LossScaleState, dynamic_loss_scale, loss_scale, scale_loss
from optax_gradhealth._replay import ReplayState, StepReplay, step_replay

# isort: split
# --- host side: diagnosis, logging, report (issue 4); plain numpy, never used by the jitted path ---
from optax_gradhealth.diagnosis import Finding, Thresholds, diagnose, format_findings
from optax_gradhealth.history import History, load_history
from optax_gradhealth.report import plot_report
from optax_gradhealth.writers import JsonlWriter, MetricLogger, TensorBoardWriter, WandbWriter, flatten, read_jsonl

# isort: split
# --- cross-device audit (pmap / shard_map): issue 3 --- (pmap / shard_map): issue 3.
from optax_gradhealth._cross_device import (
    Alarm,
    CrossDeviceState,
    cross_device,
    cross_device_alarms,
    local_grad,
    local_value_and_grad,
)

# The release's one version: pyproject.toml reads it from here ([tool.setuptools.dynamic],
# statically, without importing the package), `python -m optax_gradhealth --version`
# prints it. Keep it a plain string literal.
__version__ = "0.2.0.dev0"

__all__ = [
    "CATALOGUE",
    "ClipByGlobalNormState",
    "ClipPolicy",
    "FixedClip",
    "FixedClipState",
    "GradStats",
    "GuardCounters",
    "GuardMoments",
    "GuardReport",
    "GuardState",
    "LeafNorms",
    "PercentileClip",
    "PercentileClipState",
    "ZScoreClip",
    "ZScoreClipState",
    "clip_by_global_norm",
    "global_norm",
    "grad_stats",
    "guard",
    "leaf_names",
    "leaf_norms",
    "metrics",
    "path_name",
    "rebaseline",
    "register_metrics",
]

# mixed precision, accumulation and the remaining clipping modes (issue 5)
__all__ += [
    "AccumulationState",
    "AdaGCState",
    "AdaptiveClipState",
    "ClipByLeafNormState",
    "ClipByValueState",
    "LossScaleState",
    "MicroBatchNormsState",
    "ReplayState",
    "StepCosineState",
    "StepReplay",
    "accumulate",
    "adagc_clip",
    "adaptive_grad_clip",
    "clip_by_leaf_norm",
    "clip_by_value",
    "dynamic_loss_scale",
    "loss_scale",
    "record_micro_batch_norms",
    "record_step_cosine",
    "scale_loss",
    "step_replay",
]

# host side: diagnosis, logging, report (issue 4)
__all__ += [
    "Finding",
    "History",
    "JsonlWriter",
    "MetricLogger",
    "TensorBoardWriter",
    "Thresholds",
    "WandbWriter",
    "diagnose",
    "flatten",
    "format_findings",
    "load_history",
    "plot_report",
    "read_jsonl",
]

# cross-device audit (pmap / shard_map): issue 3.
__all__ += [
    "Alarm",
    "CrossDeviceState",
    "cross_device",
    "cross_device_alarms",
    "local_grad",
    "local_value_and_grad",
]

# Names of 0.1.0 that say "layer" for what is per leaf: they still work, with a
# DeprecationWarning, and go in 0.4 (docs/api_policy.md).
_DEPRECATED_ATTRIBUTES = {
    "LayerNorms": "LeafNorms",
    "layer_norms": "leaf_norms",
    "clip_by_layer_norm": "clip_by_leaf_norm",
    "ClipByLayerNormState": "ClipByLeafNormState",
}


def __getattr__(name: str):
    if name in _DEPRECATED_ATTRIBUTES:
        import warnings

        new = _DEPRECATED_ATTRIBUTES[name]
        warnings.warn(
            f"optax_gradhealth.{name} is deprecated (per-leaf things are named 'leaf'): use "
            f"optax_gradhealth.{new}. The old name goes in 0.4.",
            DeprecationWarning,
            stacklevel=2,
        )
        return globals()[new]
    raise AttributeError(f"module 'optax_gradhealth' has no attribute {name!r}")
