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

# Host side (diagnosis, logging, report): plain numpy, never used by the jitted path.
from optax_gradhealth.diagnose import Finding, Thresholds, diagnose, format_findings
from optax_gradhealth.report import plot_report
from optax_gradhealth.writers import JsonlWriter, MetricLogger, TensorBoardWriter, WandbWriter, flatten, read_jsonl

__version__ = "0.1.0"

__all__ = [
    "CATALOGUE",
    "ClipByGlobalNormState",
    "ClipPolicy",
    "Finding",
    "FixedClip",
    "FixedClipState",
    "GradStats",
    "GuardState",
    "JsonlWriter",
    "MetricLogger",
    "PercentileClip",
    "PercentileClipState",
    "TensorBoardWriter",
    "Thresholds",
    "WandbWriter",
    "ZScoreClip",
    "ZScoreClipState",
    "clip_by_global_norm",
    "diagnose",
    "flatten",
    "format_findings",
    "global_norm",
    "grad_stats",
    "guard",
    "layer_norms",
    "leaf_names",
    "metrics",
    "path_name",
    "plot_report",
    "read_jsonl",
    "register_metrics",
]
