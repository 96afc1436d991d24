"""The metric catalogue: one table of every metric name (meaning, kind, healthy range),
and the registry of which state fields hold which metric.

A leaf module: it imports nothing from the package, and nothing in the jitted path reads
it to decide what to do (only :func:`optax_gradhealth.metrics`, the docs, ``diagnose`` and
``report`` read it). Names are declared here once; the code that records a metric
registers its state's fields with :func:`register_metrics`, and
``tests/test_catalogue.py`` fails on any metric name used in the package, the examples
or the docs that is not declared.

Per-leaf metrics are declared with a ``<path>`` placeholder
(``grad/leaf_norm/<path>``): :func:`metrics` returns one entry per gradient leaf.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

__all__ = [
    "CATALOGUE",
    "KINDS",
    "SPECS",
    "MetricSpec",
    "is_declared",
    "register_metrics",
    "spec_of",
]

FLAG, COUNT, VALUE, VECTOR, INDEX = "flag", "count", "value", "vector", "index"
#: The kinds of metric: ``flag`` (bool, this step), ``count`` (int32 counter or count),
#: ``value`` (float32 scalar), ``vector`` (one value per device, device pair, leaf or
#: micro-batch) and ``index`` (an int32 position, -1 for none).
KINDS = (FLAG, COUNT, VALUE, VECTOR, INDEX)


class MetricSpec(NamedTuple):
    """One metric: its logged name, kind, meaning and what a healthy run shows.

    Attributes:
      name: the key :func:`optax_gradhealth.metrics` returns (``<path>``: one per leaf).
      kind: one of :data:`KINDS`.
      meaning: one line, the catalogue's (:data:`optax_gradhealth.CATALOGUE`).
      healthy: what a healthy run shows, and what a departure suggests (the docs' table).
    """

    name: str
    kind: str
    meaning: str
    healthy: str


_SPEC_LIST: tuple[MetricSpec, ...] = (
    # the guard (gh.guard) and gh.clip_by_global_norm
    MetricSpec(
        "grad/norm",
        VALUE,
        "global L2 norm of the gradient before clipping (float32; NaN/Inf on a non-finite step)",
        (
            "finite and > 0; varies smoothly, usually within 2x of grad/norm_mean. NaN/Inf only on a skipped "
            "step; a slow climb over thousands of steps often precedes divergence."
        ),
    ),
    MetricSpec(
        "grad/norm_clipped",
        VALUE,
        (
            "global norm after the global-norm clip (gh.clip_by_global_norm; the guard's clip= threshold or "
            "policy, or its spike clip), 0 on a skipped step; with a transformation as the guard's clip= "
            "(gh.clip_by_value, gh.clip_by_leaf_norm, ...) the norm before it, whose own metrics say what it did"
        ),
        ("equal to grad/norm on most steps, below it on clipped steps (grad/clipped), 0 only on skipped steps."),
    ),
    MetricSpec(
        "grad/clip_threshold",
        VALUE,
        (
            "global-norm clip threshold in force this step, a spike clip's included (inf when there is none: no "
            "clip=, or a transformation as the guard's clip=, and no spike clip)"
        ),
        (
            "a little above the typical grad/norm, so that only the top few percent of steps are clipped; inf"
            " when clipping is off."
        ),
    ),
    MetricSpec(
        "grad/clipped",
        FLAG,
        (
            "the global-norm clip (gh.clip_by_global_norm; the guard's clip= threshold or policy, or its spike "
            "clip: every spike under spike_action='clip', a recurring one under 'skip') scaled this step's gradient"
        ),
        (
            "True on a few percent of steps. True on (almost) every step: the threshold is too low (the "
            "optimizer sees a fixed-size step); never True over a long run: the threshold does nothing."
        ),
    ),
    MetricSpec(
        "grad/finite",
        FLAG,
        "every gradient element (and the loss and value, if passed) was finite",
        "True. A rare False is tolerated (the step is skipped); frequent False is a numerics bug.",
    ),
    MetricSpec(
        "grad/skipped",
        FLAG,
        "the update was skipped: zero update, inner state unchanged",
        "False on (almost) every step.",
    ),
    MetricSpec(
        "grad/spiked",
        FLAG,
        (
            "this step was a spike (see guard's spike rule): skipped, or clipped when it recurs or with "
            "spike_action='clip'"
        ),
        "rarely True (well under 1% of steps).",
    ),
    MetricSpec(
        "grad/spike_score",
        VALUE,
        "norm / baseline norm, the median of the latest 16 accepted norms (0 during warm-up)",
        (
            "around 1 (about 0.5 to 2). Above spike_threshold (5 by default) with a robust z-score above "
            "spike_zscore (5): a spike. 0 during warm-up."
        ),
    ),
    MetricSpec(
        "grad/zscore",
        VALUE,
        (
            "robust z-score log(norm / baseline) / s, s the robust std of the step-to-step changes of the "
            "log-norm over the spike window, at least 0.05 (0 during warm-up)"
        ),
        "within about +-3. 0 during warm-up.",
    ),
    MetricSpec(
        "grad/norm_mean",
        VALUE,
        "bias-corrected running mean of accepted norms, before this step",
        "positive, changing slowly.",
    ),
    MetricSpec(
        "grad/norm_std",
        VALUE,
        "running standard deviation of accepted norms, before this step",
        "below grad/norm_mean (coefficient of variation std / mean well under 1).",
    ),
    MetricSpec(
        "grad/loss_zscore",
        VALUE,
        "(loss - running mean loss) / running std, when loss= is passed",
        "within about +-3 (0 when no loss= is passed).",
    ),
    MetricSpec(
        "grad/momentum_reset",
        FLAG,
        "this step re-initialised the inner optimizer's moments",
        (
            "False. An occasional reset is survivable; repeated resets mean persistent spikes (learning rate "
            "too high, bad data)."
        ),
    ),
    MetricSpec(
        "grad/rollback_recommended",
        FLAG,
        "sticky recommendation to restore the last healthy checkpoint",
        (
            "False. Once True it stays True: restore the last healthy checkpoint. (Cleared when the run of spikes "
            "that raised it turns out to be a lasting change the window re-baselines on, and by gh.rebaseline.)"
        ),
    ),
    MetricSpec(
        "grad/vanishing",
        FLAG,
        "finite norm below the vanishing threshold (and loss not falling, if given)",
        (
            "False after the first steps. True for many steps while the loss is high: vanishing gradients "
            "(dead units, saturated activations, a learning rate decayed to nothing)."
        ),
    ),
    MetricSpec(
        "grad/first_nonfinite_leaf",
        INDEX,
        (
            "leaf index (gh.leaf_names order) of the first NaN/Inf leaf at the latest step whose gradient was "
            "non-finite (a NaN loss alone leaves it as it was), -1 if none"
        ),
        ("-1 (no non-finite gradient yet); otherwise the leaf to inspect, named by gh.leaf_names(params)[index]."),
    ),
    MetricSpec(
        "grad/num_steps",
        COUNT,
        "steps seen",
        (
            "equal to the number of update calls that reached it, skipped steps included (inside "
            "gh.dynamic_loss_scale, the update calls minus grad/num_overflows: an overflowed step never reaches "
            "the states inside; inside gh.accumulate, one per window)."
        ),
    ),
    MetricSpec(
        "grad/num_clipped",
        COUNT,
        "steps clipped",
        "a small fraction (a few percent) of grad/num_steps.",
    ),
    MetricSpec(
        "grad/num_nonfinite",
        COUNT,
        "steps with a non-finite gradient, loss or value",
        ("0, or growing only rarely. Steady growth: fp16 without loss scaling, log(0), a division by zero, bad data."),
    ),
    MetricSpec(
        "grad/num_nonfinite_updates",
        COUNT,
        "finite steps skipped because the inner update or new inner state was non-finite",
        (
            "0. Growing: the optimizer itself makes the NaN/Inf from finite gradients (an infinite learning "
            "rate, fp16/bf16 moments overflowing, bf16 hyperparameters rounding b2 to 1)."
        ),
    ),
    MetricSpec(
        "grad/num_skipped",
        COUNT,
        "steps skipped (non-finite, or spike with spike_action='skip')",
        ("about grad/num_nonfinite (plus grad/num_spikes with spike_action='skip'); a small fraction of steps."),
    ),
    MetricSpec(
        "grad/num_spikes",
        COUNT,
        "spikes detected",
        "well under 1% of grad/num_steps.",
    ),
    MetricSpec(
        "grad/num_momentum_resets",
        COUNT,
        "momentum resets performed",
        "0, or a handful over a whole run.",
    ),
    MetricSpec(
        "grad/num_rebaselines",
        COUNT,
        "restarts of the spike window on a new level: after rebaseline_after spikes or dips, or by gh.rebaseline",
        "0 on a steady run; one per lasting change of the gradient's scale (planned ones announced with "
        "gh.rebaseline). A rise without a change you made: a fault that persisted.",
    ),
    MetricSpec(
        "grad/consecutive_nonfinite",
        COUNT,
        "non-finite steps (gradient, loss, value or update) since the last good step (spikes do not break the run)",
        "0 (1 on an isolated bad step). Reaching rollback_after_nonfinite (10) raises grad/rollback_recommended.",
    ),
    MetricSpec(
        "grad/consecutive_spikes",
        COUNT,
        "spikes since the last good step (non-finite steps do not break the run)",
        "0 (1 on an isolated spike). Reaching rollback_after_spikes (10) raises grad/rollback_recommended.",
    ),
    MetricSpec(
        "grad/leaf_norm/<path>",
        VECTOR,
        "pre-clip L2 norm of one gradient leaf, named by its path",
        (
            "finite; the ratios between layers steady over time. One layer far above the others (or climbing)"
            " is where a blow-up starts; a layer at ~0 is dead or frozen."
        ),
    ),
    # update health (gh.guard, update_health=True)
    MetricSpec(
        "update/norm",
        VALUE,
        "global L2 norm of the update the guard returned (0 on a skipped step)",
        (
            "roughly the learning rate times sqrt(number of parameters) for Adam-like optimizers, following the "
            "schedule; 0 only on skipped steps."
        ),
    ),
    MetricSpec(
        "param/norm",
        VALUE,
        "global L2 norm of the params passed to the guard's update (0 when none are passed)",
        "changes slowly; a steady climb is weights growing (too little weight decay), a jump follows a bad step.",
    ),
    MetricSpec(
        "update/param_ratio",
        VALUE,
        "update/norm / param/norm: the relative size of the step (0 when either is 0)",
        (
            "about 1e-4 to 1e-2 (often near 1e-3). Far above: the learning rate is too high for these weights; "
            "far below: too low, or the weights barely train."
        ),
    ),
    MetricSpec(
        "update/leaf_param_ratio/<path>",
        VECTOR,
        "per leaf, the norm of its update over the norm of its parameter (0 when either is 0)",
        (
            "about 1e-4 to 1e-2 for every leaf. One leaf far above the band trains too fast (its learning rate, "
            "or a small initialisation); far below, or 0 on every step, trains too slowly or not at all (a dead "
            "or frozen leaf)."
        ),
    ),
    # step replay (gh.step_replay)
    MetricSpec(
        "grad/replayed",
        FLAG,
        "this step's gradient was computed again: it was non-finite or a spike (gh.step_replay)",
        "False on almost every step: as rare as non-finite steps and spikes.",
    ),
    MetricSpec(
        "grad/replay_mismatched",
        FLAG,
        "the second computation of this step's gradient differed from the first: a transient computation fault",
        "always False. True: a device computed a wrong value (or the computation is not deterministic).",
    ),
    MetricSpec(
        "grad/num_replays",
        COUNT,
        "steps whose gradient was computed again (gh.step_replay)",
        "about grad/num_nonfinite + grad/num_spikes.",
    ),
    MetricSpec(
        "grad/num_replay_mismatches",
        COUNT,
        "replayed steps whose second computation differed from the first (transient computation faults)",
        (
            "0. Any other value: silent data corruption on some device (or non-deterministic kernels: on GPU set "
            "--xla_gpu_deterministic_ops=true)."
        ),
    ),
    MetricSpec(
        "grad/num_replay_recovered",
        COUNT,
        "mismatched replays whose healthy second computation was used instead of the first",
        "equal to grad/num_replay_mismatches: every fault was transient.",
    ),
    # gradient accumulation (gh.record_micro_batch_norms)
    MetricSpec(
        "grad/micro_batch_norms",
        VECTOR,
        (
            "[k] global norm of each micro-batch gradient of the current accumulation window "
            "(gh.record_micro_batch_norms)"
        ),
        (
            "similar values across the micro-batches of one update; one far above the others points at a bad "
            "micro-batch."
        ),
    ),
    # the clip modes (gh.clip_by_value, gh.clip_by_leaf_norm, gh.adaptive_grad_clip)
    MetricSpec(
        "grad/num_value_clipped",
        COUNT,
        (
            "gradient elements clipped by gh.clip_by_value this step "
            "(a step gh.guard skipped keeps the last accepted step's value)"
        ),
        "0 or a small number of elements; a large count means the value bound is too tight.",
    ),
    MetricSpec(
        "grad/value_clip_fraction",
        VALUE,
        (
            "fraction of gradient elements clipped by gh.clip_by_value this step "
            "(a step gh.guard skipped keeps the last accepted step's value)"
        ),
        "below ~0.01; near 1 the bound is too tight and clipping changes the direction.",
    ),
    MetricSpec(
        "grad/leaf_clip_fraction",
        VALUE,
        (
            "fraction of gradient leaves (layers) clipped by gh.clip_by_leaf_norm "
            "(a step gh.guard skipped keeps the last accepted step's value)"
        ),
        "0 on most steps; near 1 on every step means the per-layer bound is too low.",
    ),
    MetricSpec(
        "grad/leaf_clipped/<path>",
        FLAG,
        (
            "this leaf was clipped by gh.clip_by_leaf_norm this step "
            "(a step gh.guard skipped keeps the last accepted step's value)"
        ),
        ("False on most steps; one layer clipped on every step deserves a look (its norm in grad/leaf_norm/<path>)."),
    ),
    MetricSpec(
        "grad/num_agc_clipped",
        COUNT,
        (
            "units rescaled by gh.adaptive_grad_clip (AGC) this step "
            "(a step gh.guard skipped keeps the last accepted step's value)"
        ),
        "a small share of the units; many units clipped every step means lambda is too small.",
    ),
    MetricSpec(
        "grad/agc_clip_fraction",
        VALUE,
        (
            "fraction of units rescaled by gh.adaptive_grad_clip (AGC) this step "
            "(a step gh.guard skipped keeps the last accepted step's value)"
        ),
        "below ~0.1 once training settles; near 1 means lambda (default 0.01) is too small.",
    ),
    MetricSpec(
        "grad/num_adagc_clipped",
        COUNT,
        (
            "leaves rescaled by gh.adagc_clip this step (against their own norm history, or globally in warm-up) "
            "(a step gh.guard skipped keeps the last accepted step's value)"
        ),
        "0 on most steps once warm-up is over; a few leaves on a spiking step. Many leaves every step: "
        "`relative` is too tight for this model's norm noise.",
    ),
    MetricSpec(
        "grad/adagc_clip_fraction",
        VALUE,
        (
            "fraction of the float leaves rescaled by gh.adagc_clip this step "
            "(a step gh.guard skipped keeps the last accepted step's value)"
        ),
        "near 0 after warm-up; near 1 during warm-up only when the global warm-up threshold is below the typical norm.",
    ),
    MetricSpec(
        "grad/noise_scale",
        VALUE,
        "gradient noise scale B_simple = EMA(tr Sigma) / EMA(|G|^2), bias-corrected, from the micro-batches of "
        "gh.accumulate (one estimate per window)",
        "positive, usually growing during training. A global batch far above it gives diminishing returns; far "
        "below it wastes steps (the same reading as xdev/noise_scale).",
    ),
    MetricSpec(
        "grad/grad_sq_est",
        VALUE,
        "the last window's unbiased estimate of |G|^2 from the micro-batch and accumulated norms (gh.accumulate)",
        "positive on average (a single window's estimate is noisy and can be negative).",
    ),
    MetricSpec(
        "grad/trace_cov_est",
        VALUE,
        "the last window's estimate of tr(Sigma), the per-example gradient covariance trace (gh.accumulate)",
        "positive on average (noisy per window).",
    ),
    MetricSpec(
        "grad/step_cosine",
        VALUE,
        "cosine between this step's gradient and the previous one seen (accepted, inside gh.guard), from "
        "count sketches (gh.record_step_cosine; 0 on the first step and on a non-finite or zero gradient; inside "
        "gh.guard a skipped step does not reach it and keeps the last accepted step's value: read grad/skipped)",
        "mostly between 0 and 0.5 for noisy minibatch gradients. Persistently negative: consecutive steps undo "
        "each other (learning rate too high, a sharp valley). Persistently near 1: the direction barely "
        "changes (a slow drift: the learning rate may be too low).",
    ),
    # dynamic loss scaling (gh.dynamic_loss_scale)
    MetricSpec(
        "grad/loss_scale",
        VALUE,
        "dynamic loss scale the next train step multiplies its loss by",
        (
            "a power of two that settles (moving by 2x around its ceiling). A collapse toward the lower "
            "bound: gradients overflow even at a small scale (gh.diagnose's loss_scale finding)."
        ),
    ),
    MetricSpec(
        "grad/overflowed",
        FLAG,
        (
            "the scaled gradient overflowed: step skipped before any statistic, inner state untouched (so the "
            "metrics of the states inside, the guard's included, keep the previous step's values), scale backed "
            "off (not counted in grad/num_nonfinite)"
        ),
        (
            "False on almost every step. A few overflows right after each growth of the scale are normal: "
            "that is how the scale finds its ceiling."
        ),
    ),
    MetricSpec(
        "grad/num_overflows",
        COUNT,
        "overflowed (skipped) steps so far",
        (
            "rises by a few per 2000 steps as the scale probes upward (expected); growing every step means "
            "the scale cannot find a level: check the loss for Inf."
        ),
    ),
    # the cross-device audit (gh.cross_device)
    MetricSpec(
        "xdev/device_norms",
        VECTOR,
        "[K] L2 norm of each device's local gradient before the all-reduce (every step)",
        "all devices within about 10-20% of one another (same data distribution).",
    ),
    MetricSpec(
        "xdev/norm_cv",
        VALUE,
        "coefficient of variation (std / mean) of the device norms (every step)",
        "small (under about 0.2 for per-device batches of reasonable size).",
    ),
    MetricSpec(
        "xdev/norm_max_over_min",
        VALUE,
        "largest / smallest device norm (every step)",
        "close to 1 (under about 1.5).",
    ),
    MetricSpec(
        "xdev/agreement",
        VALUE,
        (
            "(K^2 |mean g|^2 - sum_k |g_k|^2) / ((K-1) sum_k |g_k|^2): mean pairwise inner product over the "
            "mean squared norm; 1 = identical, ~0 = orthogonal, -1/(K-1) = cancelling (every step)"
        ),
        (
            "between 0 and 1, steady; higher for larger per-device batches. Persistently ~0: noise-dominated "
            "(batch too small, learning rate too high). A sudden drop from > 0.5 to ~0: seed desync or "
            "sampler misalignment. Above 0.99: duplicated data shards."
        ),
    ),
    MetricSpec(
        "xdev/audited",
        FLAG,
        "the latest update was an audit step",
        "True on audit steps (every step at first, then every N steps).",
    ),
    MetricSpec(
        "xdev/num_audits",
        COUNT,
        "audit steps performed",
        (
            "growing by one on each audit step (every step at first, then every N steps). A logged row whose "
            "count is above the previous logged row's holds a new audit's values, even when xdev/audited is 0 "
            "on it (the audit fell between logged rows)."
        ),
    ),
    MetricSpec(
        "xdev/cosine_to_mean",
        VECTOR,
        "[K] exact cosine of each device's gradient to the mean gradient (latest audit)",
        "positive and similar for every device; one device far below the others is an outlier.",
    ),
    MetricSpec(
        "xdev/pairwise_cosine",
        VECTOR,
        "[K, K] pairwise cosines from the random-projection sketch (latest audit)",
        ("off-diagonal entries positive and similar; an entry near 1 flags two devices seeing the same data."),
    ),
    MetricSpec(
        "xdev/mean_pairwise_cosine",
        VALUE,
        "mean off-diagonal sketched pairwise cosine (latest audit)",
        "positive and below 0.99.",
    ),
    MetricSpec(
        "xdev/outlier_device",
        INDEX,
        "data-axis index of the named outlier device with the most evidence, -1 if none (latest audit)",
        ("-1 (no outlier). The same device flagged again and again: a hardware fault or silent data corruption on it."),
    ),
    MetricSpec(
        "xdev/outlier_score",
        VALUE,
        "largest instant device score: robust z of log-norm or of log(1 - leave-one-out cosine) (latest audit)",
        "below the outlier threshold (10), usually below 3.",
    ),
    MetricSpec(
        "xdev/outlier_devices",
        VECTOR,
        (
            "[K] devices named as outliers: instant score > outlier_threshold, or CUSUM evidence > "
            "outlier_evidence with an instant score > outlier_drift (latest audit)"
        ),
        (
            "all False. A device True at one audit only: a transient fault (a bit flip, a bad batch); True "
            "audit after audit: hardware or that device's data."
        ),
    ),
    MetricSpec(
        "xdev/norm_score",
        VECTOR,
        (
            "[K] robust z-score of each device's log gradient norm across devices (latest audit; needs K >= 3: "
            "with 2 devices 0, inf for a dead or non-finite device)"
        ),
        "below about 3 for every device; one device high: its gradient norm differs from the others'.",
    ),
    MetricSpec(
        "xdev/direction_score",
        VECTOR,
        (
            "[K] robust one-sided z-score of each device's log(1 - leave-one-out cosine) across devices (latest audit; "
            "needs K >= 3, 0 with 2 devices)"
        ),
        (
            "below about 3 for every device; one device high: its gradient points elsewhere (label noise, a "
            "broken augmentation, stale parameters)."
        ),
    ),
    MetricSpec(
        "xdev/outlier_evidence",
        VECTOR,
        "[K] CUSUM evidence, accumulated over audits, that each device is an outlier",
        ("0 or a few units; climbing toward outlier_evidence (12): a persistent moderate deviation on that device."),
    ),
    MetricSpec(
        "xdev/near_duplicate_pairs",
        VECTOR,
        ("[K, K] pairs whose sketched cosine stood far above the other pairs' for several audits (latest audit)"),
        "all False. A pair True: two devices see the same examples.",
    ),
    MetricSpec(
        "xdev/duplicate_pairs",
        VECTOR,
        "[K, K] devices j != k with bit-identical non-zero gradients (latest audit)",
        "all False (no two devices with bit-identical gradients).",
    ),
    MetricSpec(
        "xdev/param_desync",
        VECTOR,
        (
            "[K] device whose parameter fingerprint differs from the strict majority's (more than K/2 devices); "
            "every device when no strict majority agrees (latest audit)"
        ),
        "0 / False: the replicas' parameters are identical.",
    ),
    MetricSpec(
        "xdev/noise_scale",
        VALUE,
        "gradient noise scale B_simple = EMA(tr Sigma) / EMA(|G|^2), bias-corrected (every step)",
        (
            "positive, usually growing during training. A global batch far above it gives diminishing "
            "returns; far below it wastes steps."
        ),
    ),
    MetricSpec(
        "xdev/grad_sq_est",
        VALUE,
        "this step's unbiased estimate of |G|^2 from the local and mean gradient norms",
        "positive on average (a single step's estimate is noisy and can be negative).",
    ),
    MetricSpec(
        "xdev/trace_cov_est",
        VALUE,
        "this step's estimate of tr(Sigma), per-example gradient covariance trace",
        "positive on average (noisy per step).",
    ),
)

#: Names of 0.1.0 that still work (``gh.metrics(..., deprecated_names=True)`` returns
#: them next to the new ones, and logs written with them are read under the new ones),
#: and the names that replace them. The rules they broke: per-leaf metrics say "leaf"; a
#: flag is a past participle or adjective of the step; every count starts ``num_``.
DEPRECATED: dict[str, str] = {
    "grad/layer_norm/<path>": "grad/leaf_norm/<path>",
    "grad/layer_clipped/<path>": "grad/leaf_clipped/<path>",
    "grad/layer_clip_fraction": "grad/leaf_clip_fraction",
    "grad/spike": "grad/spiked",
    "grad/overflow": "grad/overflowed",
    "grad/rollback": "grad/rollback_recommended",
    "grad/value_clip_count": "grad/num_value_clipped",
    "grad/agc_clip_count": "grad/num_agc_clipped",
}


def _deprecated_spec(old: str, new: MetricSpec) -> MetricSpec:
    return MetricSpec(old, new.kind, f"deprecated name of {new.name}: {new.meaning}", new.healthy)


_CURRENT = {spec.name: spec for spec in _SPEC_LIST}

#: Every metric the package records, by name (the deprecated names last).
SPECS: dict[str, MetricSpec] = {
    **_CURRENT,
    **{old: _deprecated_spec(old, _CURRENT[new]) for old, new in DEPRECATED.items()},
}

# ``{name: one-line meaning}`` of every metric `metrics` can return; names that users
# register with `register_metrics` are added to it (documented in docs/_ext: DATA_DOCS).
CATALOGUE: dict[str, str] = {spec.name: spec.meaning for spec in SPECS.values()}

# state type -> {field: metric name}: what `metrics` reads. Filled by the modules that
# define the states (and by users), never read by the jitted path.
STATE_FIELDS: dict[type, dict[str, str]] = {}

_PLACEHOLDER = re.compile(r"/<[a-z_]+>$")


_INDICES = re.compile(r"(/[0-9]+)+$")

# The suffix `metrics` gives the second, third... state reporting a name (`#2`), followed
# by the indices `flatten` adds to an element of a vector: `grad/spiked#2`,
# `grad/leaf_norm/dense/w#2`, `xdev/device_norms#2/3`.
_COPY = re.compile(r"#[0-9]+((?:/[0-9]+)*)$")


def _split_copy(name: str) -> tuple[str, str]:
    """``name`` without its ``#N`` copy suffix (indices kept) and the suffix:
    ``('xdev/device_norms/3', '#2')`` for ``xdev/device_norms#2/3``; ``(name, '')`` when
    there is none."""
    match = _COPY.search(name)
    if match is None:
        return name, ""
    return name[: match.start()] + match.group(1), name[match.start() : match.start(1)]


def spec_of(name: str) -> MetricSpec:
    """The spec of a declared metric name. A per-leaf name (``grad/leaf_norm/dense/w``)
    resolves to its ``<path>`` entry, one element of a vector as the writers flatten it
    (``xdev/device_norms/3``, ``xdev/pairwise_cosine/0/5``) to the vector's, and the
    second, third... copy of a name (``grad/norm#2``, ``xdev/device_norms#2/3``) to the
    name's. Raises ``KeyError`` for an undeclared name."""
    if name in SPECS:
        return SPECS[name]
    stem, copy = _split_copy(name)
    if copy:
        try:
            return spec_of(stem)
        except KeyError:
            raise KeyError(f"metric {name!r} is not declared in optax_gradhealth._catalogue.SPECS") from None
    for declared, spec in SPECS.items():
        if _PLACEHOLDER.search(declared) and name.startswith(_PLACEHOLDER.sub("/", declared)):
            return spec
    base = _INDICES.sub("", name)
    if base != name and base in SPECS and SPECS[base].kind == VECTOR:
        return SPECS[base]
    raise KeyError(f"metric {name!r} is not declared in optax_gradhealth._catalogue.SPECS")


def _prefix(name: str) -> str:
    return _PLACEHOLDER.sub("/", name)


_RENAMED_PREFIXES = {_prefix(old): _prefix(new) for old, new in DEPRECATED.items() if _PLACEHOLDER.search(old)}
_RENAMED = {old: new for old, new in DEPRECATED.items() if not _PLACEHOLDER.search(old)}
_OLD_NAME = {new: old for old, new in _RENAMED.items()}
_OLD_PREFIX = {new: old for old, new in _RENAMED_PREFIXES.items()}


def current_name(name: str) -> str:
    """The name that replaces a deprecated one (also a per-leaf entry, one element of a
    vector as the writers flatten it, or a second, third... copy: ``grad/spike#2``); any
    other name unchanged.

    Example:
      >>> from optax_gradhealth._catalogue import current_name
      >>> current_name('grad/layer_norm/dense/w'), current_name('grad/spike'), current_name('grad/norm')
      ('grad/leaf_norm/dense/w', 'grad/spiked', 'grad/norm')
      >>> current_name('grad/spike#2'), current_name('grad/layer_norm/dense/w#2')
      ('grad/spiked#2', 'grad/leaf_norm/dense/w#2')
    """
    stem, copy = _split_copy(name)
    base = _INDICES.sub("", stem)
    if base in _RENAMED:
        # the copy suffix goes back before the indices: `old#2/3` -> `new#2/3`
        return _RENAMED[base] + copy + stem[len(base) :]
    for old, new in _RENAMED_PREFIXES.items():
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def deprecated_name(name: str) -> str | None:
    """The deprecated name a current one replaced (per-leaf entries too), or None."""
    if name in _OLD_NAME:
        return _OLD_NAME[name]
    for new, old in _OLD_PREFIX.items():
        if name.startswith(new):
            return old + name[len(new) :]
    return None


def is_declared(name: str) -> bool:
    """True when ``name`` is a declared metric, a per-leaf entry of one, or a name a user
    registered with :func:`register_metrics`."""
    if name in CATALOGUE or _split_copy(name)[0] in CATALOGUE:
        return True
    try:
        spec_of(name)
    except KeyError:
        return False
    return True


def register_metrics(state_type: type, fields: dict[str, str], catalogue: dict[str, str] | None = None) -> None:
    """Declares which fields of a NamedTuple state type are metrics, and their names.

    A field whose value is a pytree (not an array) is flattened into
    ``<name>/<leaf path>`` entries, e.g. per-layer norms. Registering only changes what
    :func:`metrics` reports: never what a transformation does (a momentum reset keeps
    what ``keep_on_momentum_reset`` declares, whatever is logged). Registering a type
    again replaces its fields.

    Args:
      state_type: a NamedTuple type that a transformation keeps in its state.
      fields: ``{field name: metric name}`` (non-empty strs); an empty dict marks a
        state that holds registered states (groups) so that they are reported in field
        order.
      catalogue: ``{metric name: one-line meaning}`` (strs) for names not declared yet:
        a name of the package's own metrics (``grad/norm``, a per-leaf or vector entry
        of one, a deprecated name) is refused, its meaning is fixed; a name registered
        before is given the new meaning.

    Raises:
      TypeError: an argument of the wrong type (naming it and what it got).
      ValueError: a field ``state_type`` does not have, a catalogue entry for a name of
        the package's own metrics. Nothing is registered then.

    Example:
      >>> from typing import NamedTuple
      >>> import jax.numpy as jnp
      >>> import optax_gradhealth as gh
      >>> class MyState(NamedTuple):
      ...     my_count: jnp.ndarray
      >>> gh.register_metrics(MyState, {'my_count': 'my/count'}, catalogue={'my/count': 'my steps'})
      >>> gh.metrics((MyState(jnp.int32(3)),))
      {'my/count': Array(3, dtype=int32)}
    """

    def got(value: object) -> str:
        return f"got {value!r} (type {type(value).__name__})"

    if not (isinstance(state_type, type) and issubclass(state_type, tuple) and hasattr(state_type, "_fields")):
        raise TypeError(
            f"gh.register_metrics: `state_type` must be a NamedTuple type (the class, e.g. MyState), {got(state_type)}."
        )
    if not isinstance(fields, Mapping):
        raise TypeError(f"gh.register_metrics: `fields` must be a dict {{field name: metric name}}, {got(fields)}.")
    fields = dict(fields)
    for field, name in fields.items():
        if field not in state_type._fields:
            raise ValueError(
                f"gh.register_metrics: {state_type.__name__} has no field {field!r} (fields: {state_type._fields})."
            )
        if not isinstance(name, str) or not name:
            raise TypeError(
                f"gh.register_metrics: the metric name of field {field!r} must be a non-empty str, {got(name)}."
            )
    if catalogue is not None and not isinstance(catalogue, Mapping):
        raise TypeError(
            f"gh.register_metrics: `catalogue` must be None or a dict {{metric name: meaning}}, {got(catalogue)}."
        )
    catalogue = dict(catalogue or {})
    for name, meaning in catalogue.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"gh.register_metrics: a `catalogue` name must be a non-empty str, {got(name)}.")
        if not isinstance(meaning, str):
            raise TypeError(f"gh.register_metrics: the `catalogue` meaning of {name!r} must be a str, {got(meaning)}.")
        try:
            spec_of(name)
        except KeyError:
            continue
        raise ValueError(
            f"gh.register_metrics: {name!r} is a metric of optax_gradhealth (see gh.CATALOGUE): its meaning cannot "
            "be replaced; `catalogue` is for names not declared yet."
        )
    STATE_FIELDS[state_type] = fields
    CATALOGUE.update(catalogue)
