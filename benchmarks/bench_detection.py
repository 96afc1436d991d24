"""Detection benchmark: false-alarm rates and detection delays of the gradhealth detectors.

A detector is judged by two numbers measured on runs: how often it fires on clean runs, and how
soon it fires on each kind of fault (see docs/detection.md, where this script's output is kept).

Single device (``gh.guard``'s spike rule, ``optax_gradhealth._detectors.SpikeRule``):

1. Clean runs of three model families that draw a fresh batch every step
   (``detection_runs.clean_specs``: an MLP regression, a classifier, a char transformer;
   several optimizers, learning rates, warm-up and decay schedules, seeds; 10,000 steps each),
   and of a small-data one (the classifier on 1,024 examples reshuffled every epoch, batch 8:
   the noisy regime where the z-score condition decides, scored in tables of its own), record
   their per-step gradient norms and losses in jitted ``lax.scan`` runs.
2. The spike rule is replayed on the recorded norms (``_detectors.replay_spikes``: the code the
   guard runs), for the defaults and a grid of settings: false skips per 10,000 clean steps, and
   the share of x3 / x10 / x100 gradient spikes (the norm of ``c * g`` is exactly ``c |g|``, so a
   spike at any step can be scored against the window the guard had there) that it catches.
   The guard's loss z-score (``loss_spike_zscore``) is replayed on the same runs' losses:
   false alarms, and the share of one-step loss jumps it catches, per threshold.
3. Guarded runs (``detection_runs.record_guarded``, the real ``gh.guard`` in the loop) with
   injected NaN/Inf elements, x3 / x10 / x100 gradients, a burst of x10 gradients, a loss spike
   and a learning-rate spike: what the guard flagged, how soon, and whether the parameters stayed
   finite.

Cross-device (``gh.cross_device``'s audit detectors, ``_detectors.audit_update``):

4. Data-parallel runs on K = 8 and K = 32 emulated devices (``detection_xdev_runs``), every step
   audited, clean and with one fault each (label noise, a broken augmentation, a 2.5x or 10x
   gradient, stale parameters, a drifting device, near-duplicate and exact-duplicate shards,
   desync, a bit flip, a dead device; strong and moderate): alarms per 1,000 clean audits, and
   the detection rate and delay (audits) of each fault. At K = 8 also the regression family
   (``regression/...``: a model that starts far from a smooth target, so the devices' gradients
   share a strong signal in the first steps), clean and with a few faults from step 30. The
   in-run verdicts are checked against a host replay of the same detector on the recorded
   per-device scalars.

Run: ``python benchmarks/bench_detection.py [--quick] [--refresh] [--only single|xdev]``.
Recordings are cached under ``benchmarks/.detection_cache/`` (``--refresh`` re-records them).
``--quick`` runs the reduced scenario set that CI runs (``tests/test_bench_detection.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import detection_runs as single
import detection_xdev_runs as xdev
import jax
import jax.numpy as jnp
import numpy as np

import optax_gradhealth as gh
from optax_gradhealth import _clipping, _cross_device, _guard
from optax_gradhealth import _detectors as detect

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".detection_cache"
WARMUP = 20  # the guard's default warmup_steps
FACTORS = (3.0, 10.0, 100.0)


def say(*args: Any) -> None:
    print(*args, flush=True)


# ============================================================================ single device


def clean_streams(quick: bool, refresh: bool) -> dict[str, dict[str, np.ndarray]]:
    """``{spec name: {'norm', 'loss'}}`` for every clean spec (cached; a spec missing from the
    cache is recorded and added, the others are read back)."""
    path = CACHE / f"clean_{'quick' if quick else 'full'}.npz"
    specs = single.clean_specs(quick)
    flat = {}
    if path.exists() and not refresh:
        with np.load(path) as data:
            flat = {key: data[key] for key in data.files}
    missing = [s for s in specs if f"{s.name}|norm" not in flat]
    if missing:
        start = time.perf_counter()
        for spec in missing:
            run = single.record_clean(spec)
            flat.update({f"{spec.name}|{k}": v for k, v in run.items()})
        CACHE.mkdir(exist_ok=True)
        np.savez_compressed(path, **flat)
        say(f"recorded {len(missing)} clean runs in {time.perf_counter() - start:.0f} s")
    return {s.name: {"norm": flat[f"{s.name}|norm"], "loss": flat[f"{s.name}|loss"]} for s in specs}


@dataclasses.dataclass(frozen=True)
class Setting:
    """A spike rule: thresholds, the window (spread) and the baseline (median) lengths."""

    threshold: float | None
    zscore: float | None
    window: int
    baseline: int = _guard.SPIKE_BASELINE

    @property
    def label(self) -> str:
        parts = [f"ratio>{self.threshold:g}" if self.threshold else "", f"z>{self.zscore:g}" if self.zscore else ""]
        return " & ".join(p for p in parts if p) + f", W={self.window}, B={self.baseline}"

    def rule(self) -> detect.SpikeRule:
        return detect.SpikeRule(
            self.threshold,
            self.zscore,
            self.window,
            WARMUP,
            _guard.SPREAD_FLOOR,
            self.baseline,
            _guard.REBASELINE_AFTER,
        )


DEFAULT = Setting(_guard.SPIKE_THRESHOLD, _guard.SPIKE_ZSCORE, _guard.SPIKE_WINDOW)
GRID = [
    Setting(t, z, w, b)
    for w, b in ((128, 16), (64, 16), (256, 16), (128, 8), (128, 32), (128, 128))
    for t, z in ((2.0, 3.0), (2.0, 5.0), (3.0, None), (3.0, 4.0), (3.0, 5.0), (3.0, 6.0), (4.0, 6.0), (5.0, None))
] + [Setting(5.0, z, 128, 16) for z in (4.0, 5.0, 6.0)]
#: The family whose runs are scored apart: batch 8 on a small dataset, the noisy regime where
#: the z-score condition decides (``detection_runs``, "classifier_finite").
SMALL_DATA = "classifier_finite"


@functools.partial(jax.jit, static_argnames="rule")
def _replay_many(rule: detect.SpikeRule, norms: jax.Array) -> dict[str, jax.Array]:
    """``replay_spikes`` of each row of ``norms`` ``[R, T]`` (one scan for all the runs)."""
    return jax.vmap(lambda n: detect.replay_spikes(rule, n))(norms)


def _window_stats_all(
    streams: dict[str, dict[str, np.ndarray]], setting: Setting
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per run: the guard's window (median, spread of log-norms) before each step, and its own
    flags, replayed closed-loop with the skip action (runs of one length in one batch)."""
    by_length: dict[int, list[str]] = {}
    for name in sorted(streams):
        by_length.setdefault(streams[name]["norm"].size, []).append(name)
    out = {}
    for names in by_length.values():
        replay = jax.device_get(_replay_many(setting.rule(), np.stack([streams[n]["norm"] for n in names])))
        for i, name in enumerate(names):
            out[name] = (replay["median"][i], replay["spread"][i], replay["spike"][i])
    return out


def _flags(norms: np.ndarray, median: np.ndarray, spread: np.ndarray, setting: Setting) -> np.ndarray:
    """Whether each norm is a spike against the given windows (the rule's own thresholds)."""
    flag = np.array(setting.rule().exceeds(norms, median, spread)[2])
    flag[..., :WARMUP] = False  # no accepted window yet: no spike (the guard's warm-up)
    return flag


def previous_rule(norms: np.ndarray) -> np.ndarray:
    """The guard's spike rule before this benchmark (v0.1): bias-corrected EMAs (decay 0.98) of
    the accepted norms, spike when ``norm / mean > 2`` and ``(norm - mean) / std > 3`` after 20
    accepted steps; a spike is skipped and not folded in. Written out here as the baseline."""
    decay, mean, var, count = 0.98, 0.0, 0.0, 0
    flags = np.zeros(norms.shape, bool)
    for t, norm in enumerate(norms.astype(np.float64)):
        if count >= WARMUP and math.isfinite(norm):
            std = math.sqrt(var)
            flags[t] = norm / mean > 2.0 and (norm - mean) / max(std, 1e-12 * mean) > 3.0
        if not flags[t] and math.isfinite(norm):
            count += 1
            alpha = (1 - decay) / (1 - decay**count)
            diff = norm - mean
            mean += alpha * diff
            var = (1 - alpha) * (var + alpha * diff * diff)
    return flags


def spike_table(streams: dict[str, dict[str, np.ndarray]], grid: bool) -> tuple[str, dict[str, Any]]:
    """Markdown: one row per setting (the default, and the grid when ``grid``); false skips per
    10k clean steps and the caught share of x3 / x10 / x100 spikes (after warm-up), pooled over
    runs and on the worst run."""
    settings = [DEFAULT] + ([s for s in GRID if s != DEFAULT] if grid else [])
    names = sorted(streams)
    rows, summary = [], {}
    for setting in settings:
        false_per_run, caught = [], {f: [] for f in FACTORS}
        # The closed-loop replay of this setting: what a guard with it would skip (false skips
        # are not folded into its window), and the window each injected spike meets.
        windows = _window_stats_all(streams, setting)
        for n in names:
            norms = streams[n]["norm"]
            median, spread, flags = windows[n]
            false_per_run.append(1e4 * flags.sum() / norms.size)
            for f in FACTORS:
                caught[f].append(_flags(f * norms, median, spread, setting)[WARMUP:])
        pooled = {f: float(np.mean(np.concatenate(caught[f]))) for f in FACTORS}
        worst = {f: float(min(c.mean() for c in caught[f])) for f in FACTORS}
        total = sum(streams[n]["norm"].size for n in names)
        false_total = sum(fp * streams[n]["norm"].size / 1e4 for fp, n in zip(false_per_run, names))
        rows.append(
            f"| {setting.label}{' (default)' if setting == DEFAULT else ''} | {1e4 * false_total / total:.2f} | "
            f"{max(false_per_run):.1f} | {sum(fp > 1.0 for fp in false_per_run)} | "
            + " | ".join(f"{100 * pooled[f]:.2f} ({100 * worst[f]:.1f})" for f in FACTORS)
            + " |"
        )
        if setting == DEFAULT:
            summary = {
                "false_per_10k": 1e4 * false_total / total,
                "worst_run_false_per_10k": max(false_per_run),
                "caught": pooled,
                "caught_worst_run": worst,
            }
    old_false = [1e4 * previous_rule(streams[n]["norm"]).sum() / streams[n]["norm"].size for n in names]
    rows.append(
        f"| previous default (v0.1: EMA, ratio>2 & z>3) | {np.mean(old_false):.2f} | {max(old_false):.1f} | "
        f"{sum(fp > 1.0 for fp in old_false)} | n/a | n/a | n/a |"
    )
    head = (
        f"{len(names)} clean runs, {sum(streams[n]['norm'].size for n in names):,} steps.\n\n"
        "| setting | false skips / 10k steps | worst run | runs > 1 / 10k | x3 caught % (worst run) "
        "| x10 caught % (worst run) | x100 caught % (worst run) |\n|---|---|---|---|---|---|---|"
    )
    return head + "\n" + "\n".join(rows), summary


def per_run_table(streams: dict[str, dict[str, np.ndarray]]) -> str:
    """Markdown: the default rule on every clean run."""
    rows = []
    windows = _window_stats_all(streams, DEFAULT)
    for n in sorted(streams):
        norms = streams[n]["norm"]
        median, spread, flags = windows[n]
        spread_median = float(np.median(np.asarray(spread)[WARMUP:]))
        ratio = norms[WARMUP:] / np.exp(np.asarray(median)[WARMUP:])
        caught = {f: _flags(f * norms, median, spread, DEFAULT)[WARMUP:].mean() for f in FACTORS}
        loss = streams[n]["loss"]
        rows.append(
            f"| {n} | {float(np.mean(loss[:100])):.3g} -> {float(np.mean(loss[-500:])):.3g} | "
            f"{spread_median:.3f} | {float(np.max(ratio)):.2f} | {int(flags.sum())} | "
            + " | ".join(f"{100 * caught[f]:.1f}" for f in FACTORS)
            + " |"
        )
    head = (
        "| clean run | loss (first 100 -> last 500) | median window spread (log) | max norm / baseline | false "
        "skips | x3 % | x10 % | x100 % |\n|---|---|---|---|---|---|---|---|"
    )
    return head + "\n" + "\n".join(rows)


LOSS_ZSCORES = (3.0, 4.0, 6.0, 8.0)
LOSS_FACTORS = (1.5, 2.0, 3.0, 10.0, 100.0)


#: The guard's default ``stats_decay`` (the running loss statistics' EMA decay).
LOSS_DECAY = inspect.signature(gh.guard).parameters["stats_decay"].default


@jax.jit
def _loss_moments(loss: jax.Array, threshold: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The guard's running loss statistics before each step (``_guard._loss_zscore``'s
    mean, floored standard deviation and count), as the guard folds them: a finite loss
    whose z-score is above ``threshold`` is a loss spike, and stays out; after the
    guard's ``rebaseline_after`` (50) spikes in a row (a non-finite loss does not break
    the run) the statistics start again. (The norm's spikes and dips, which count in the
    guard's streak too, are left out: the clean runs have none.)"""

    def step(carry, x):
        mean, var, count, streak = carry
        floored = jnp.maximum(jnp.sqrt(var), _guard.LOSS_SPREAD_FLOOR * jnp.abs(mean) + 1e-30)
        finite = jnp.isfinite(x)
        spike = (count >= WARMUP) & finite & ((x - mean) / floored > threshold)
        new = _clipping.running_moments_update(mean, var, count, x, LOSS_DECAY, finite & ~spike)
        streak = jnp.where(spike, streak + 1, jnp.where(finite, 0, streak))
        restart = streak >= _guard.REBASELINE_AFTER
        new = tuple(jnp.where(restart, jnp.zeros_like(a), a) for a in (*new, streak))
        return new, (mean, floored, count)

    zero = jnp.zeros((), jnp.float32)
    return jax.lax.scan(step, (zero, zero, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)), loss)[1]


def loss_table(streams: dict[str, dict[str, np.ndarray]]) -> tuple[str, dict[str, Any]]:
    """The guard's loss z-score (``loss_spike_zscore``, the guard's default
    ``stats_decay`` and warm-up of 20) on the clean runs' losses: false alarms per 10,000
    steps, and the share of one-step loss jumps (the loss times k at one step, scored
    against the statistics the guard had there) it catches, per threshold. Each
    threshold's statistics leave out the losses it calls spikes, as the guard's do."""
    false = dict.fromkeys(LOSS_ZSCORES, 0)
    worst = dict.fromkeys(LOSS_ZSCORES, 0.0)
    caught: dict[tuple[float, float], list[float]] = {(k, t): [] for k in LOSS_FACTORS for t in LOSS_ZSCORES}
    total = 0
    for run in streams.values():
        loss = np.asarray(run["loss"], np.float32)
        total += loss.size
        for t in LOSS_ZSCORES:
            moments = _loss_moments(jnp.asarray(loss), jnp.float32(t))
            mean, std, count = (np.asarray(a, np.float64) for a in moments)
            warm = count >= WARMUP
            z = np.where(warm, (loss - mean) / std, 0.0)
            false[t] += int((z > t).sum())
            worst[t] = max(worst[t], float((z > t).sum()) / loss.size * 1e4)
            for k in LOSS_FACTORS:
                caught[(k, t)].append(float((((k * loss - mean) / std)[warm] > t).mean()))
    head = "| `loss_spike_zscore` | false per 10k (all runs) | worst run | "
    head += " | ".join(f"x{k:g} caught (worst run)" for k in LOSS_FACTORS) + " |"
    lines = [head, "|---:|---:|---:|" + "---:|" * len(LOSS_FACTORS)]
    for t in LOSS_ZSCORES:
        cells = " | ".join(
            f"{100 * np.mean(caught[(k, t)]):.0f}% ({100 * min(caught[(k, t)]):.0f}%)" for k in LOSS_FACTORS
        )
        lines.append(f"| {t:g} | {false[t] / total * 1e4:.2f} | {worst[t]:.1f} | {cells} |")
    summary = {"false_per_10k": {str(t): false[t] / total * 1e4 for t in LOSS_ZSCORES}}
    return "\n".join(lines), summary


def guarded_faults(quick: bool) -> tuple[str, list[dict[str, Any]]]:
    """Markdown: the real guard (defaults, clip=1.0) in the loop with scripted faults, one run
    per family (the first spec of each family)."""
    steps = single.QUICK_STEPS if quick else single.FULL_STEPS
    gap = steps // 10
    plan = [
        ("NaN element", single.Fault("nan", 1 * gap)),
        ("Inf element", single.Fault("inf", 1 * gap + gap // 2)),
        ("x3 gradient", single.Fault("scale", 2 * gap, factor=3.0)),
        ("x10 gradient", single.Fault("scale", 3 * gap, factor=10.0)),
        ("x100 gradient", single.Fault("scale", 4 * gap, factor=100.0)),
        ("burst of 20 x10 gradients", single.Fault("scale", 5 * gap, length=20, factor=10.0)),
        ("loss spike (corrupted batch, x100)", single.Fault("loss_spike", 6 * gap, factor=100.0)),
        ("learning-rate spike (x30, one step)", single.Fault("lr_spike", 7 * gap, factor=30.0)),
    ]
    specs = {}
    for spec in single.clean_specs(quick):
        if spec.family != SMALL_DATA:  # scored on its clean runs (``spike_table``) only
            specs.setdefault(spec.family, spec)
    rows, results = [], []
    for family, spec in specs.items():
        out = single.record_guarded(spec, lambda inner: gh.guard(inner, clip=1.0), [f for _, f in plan])
        flagged = (out["grad/spiked"] != 0) | (out["grad/finite"] == 0)
        fault_steps = np.zeros(steps, bool)
        for label, fault in plan:
            window = slice(fault.start, fault.start + fault.length)
            fault_steps[fault.start : fault.start + fault.length + 50] = True
            hit = flagged[window]
            after = np.nonzero(flagged[fault.start : fault.start + fault.length + 50])[0]
            delay = int(after[0]) if after.size else None
            skipped = int((out["grad/skipped"][window] != 0).sum())
            tail = slice(fault.start + fault.length, fault.start + fault.length + 50)
            skipped_after = int((out["grad/skipped"][tail] != 0).sum())
            resets = int(out["grad/num_momentum_resets"][fault.start + fault.length + 49]) - int(
                out["grad/num_momentum_resets"][fault.start - 1]
            )
            results.append(
                {"family": family, "fault": label, "caught": int(hit.sum()), "of": fault.length, "delay": delay}
            )
            rows.append(
                f"| {family} | {label} | {int(hit.sum())}/{fault.length} | "
                f"{'-' if delay is None else delay} | {skipped} | {skipped_after} | {resets} |"
            )
        others = ~fault_steps
        others[:WARMUP] = False
        false = int((flagged & others).sum())
        finite = bool(out["params_finite"][-1])
        rows.append(
            f"| {family} | none (all other steps; params finite at the end: {finite}) | "
            f"{false}/{int(others.sum())} | | {int((out['grad/skipped'] != 0)[others].sum())} | | |"
        )
        results.append({"family": family, "fault": "clean", "false": false, "params_finite": finite})
    head = (
        f"`gh.guard(inner, clip=1.0)`, defaults, {steps:,} steps per run.\n\n"
        "| family | fault | fault steps flagged | delay (steps) | fault steps skipped | skipped in the next 50 "
        "steps | momentum resets (fault + 50 steps) |\n|---|---|---|---|---|---|---|"
    )
    return head + "\n" + "\n".join(rows), results


def _guard_defaults(inner: Any) -> Any:
    return gh.guard(inner)


def _guard_recording(inner: Any) -> Any:
    return gh.guard(inner, spike_action="record", reset_after=None, rollback_after_spikes=None)


def guarded_clean(quick: bool) -> tuple[str, list[dict[str, Any]]]:
    """Markdown: the real guard (defaults, no clip) trained in the loop on clean runs that
    memorise a small dataset, against a twin that only records (``spike_action='record'``,
    no reset). The replayed tables above judge runs recorded without skips; here a skip
    changes the training that follows it (a skipped example stays unfit)."""
    steps = single.QUICK_STEPS
    # Adam at 3e-3 (where skips cascaded before recurring spikes were clipped) on 8 seeds, 1e-3 on
    # 4. Quick: the two runs where they cascaded (715 and 108 skips, 238 and 35 resets).
    plan = [(3e-3, range(8)), (1e-3, range(4))]
    specs = [
        single.CleanSpec(family, "adam", rate, "constant", None, seed, steps)
        for family in single.LOOP_FAMILIES
        for rate, seeds in plan
        for seed in seeds
    ]
    if quick:
        cascaded = {("classifier_memorise", 6), ("classifier_memorise_1k", 3)}
        specs = [spec for spec in specs if spec.learning_rate == 3e-3 and (spec.family, spec.seed) in cascaded]
    if not quick:
        specs += [
            single.CleanSpec(SMALL_DATA, optimizer, rate, schedule, None, 0, steps)
            for optimizer, rate, schedule, _ in single._COMBOS[SMALL_DATA]
        ]
    rows, results = [], []
    tail = slice(steps - 200, steps)
    for spec in specs:
        guarded = single.record_guarded(spec, _guard_defaults)
        twin = single.record_guarded(spec, _guard_recording)
        last = lambda out, name: int(out[name][-1])
        result = {
            "run": spec.name,
            "spikes": last(guarded, "grad/num_spikes"),
            "skipped": last(guarded, "grad/num_skipped"),
            "clipped": last(guarded, "grad/num_clipped"),
            "resets": last(guarded, "grad/num_momentum_resets"),
            "loss": float(np.mean(guarded["loss"][tail])),
            "twin_spikes": last(twin, "grad/num_spikes"),
            "twin_loss": float(np.mean(twin["loss"][tail])),
        }
        results.append(result)
        cells = "{run} | {spikes} | {skipped} | {clipped} | {resets} | {loss:.4f} | {twin_spikes} | {twin_loss:.4f}"
        rows.append("| " + cells.format(**result) + " |")
    total = {key: sum(r[key] for r in results) for key in ("spikes", "skipped", "clipped", "resets", "twin_spikes")}
    cells = "all {} runs | {spikes} | {skipped} | {clipped} | {resets} | | {twin_spikes} |"
    rows.append("| " + cells.format(len(results), **total) + " |")
    head = (
        f"`gh.guard(inner)` (defaults, no clip) against its recording twin, {steps:,} steps per run; loss: the "
        "mean batch loss over the last 200 steps.\n\n"
        "| run | spikes | skipped | clipped (recurring) | momentum resets | loss | twin: spikes | twin: loss |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    return head + "\n" + "\n".join(rows), results


# ============================================================================ cross-device


def xdev_runs(k: int, quick: bool, refresh: bool) -> dict[tuple[str, int], dict[str, np.ndarray]]:
    """The recorded cross-device scenarios at K devices (cached)."""
    steps, seeds = (300, [0]) if quick else (1000, [0, 1, 2])
    # At K = 32 a run costs ~30 s on 2 cores: the clean runs take every seed, the faults one.
    fault_seeds = seeds if k <= 8 else seeds[:1]
    path = CACHE / f"xdev_k{k}_{'quick' if quick else 'full'}.npz"
    if refresh or not path.exists():
        CACHE.mkdir(exist_ok=True)
        start = time.perf_counter()
        xdev.record_in_subprocess(k, quick, steps, seeds, str(path), fault_seeds=fault_seeds)
        say(f"recorded the K={k} scenarios in {time.perf_counter() - start:.0f} s")
    runs = xdev.load(str(path))
    if k == 8:  # the regression family (early training), K = 8 only
        path = CACHE / f"xdev_regression_k{k}_{'quick' if quick else 'full'}.npz"
        if refresh or not path.exists():
            CACHE.mkdir(exist_ok=True)
            start = time.perf_counter()
            clean_seeds = seeds if quick else list(range(8))
            xdev.record_in_subprocess(
                k, quick, xdev.REG_STEPS, clean_seeds, str(path), fault_seeds=seeds, family="regression"
            )
            say(f"recorded the K={k} regression scenarios in {time.perf_counter() - start:.0f} s")
        runs.update(xdev.load(str(path)))
    return runs


def _alarm_masks(run: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per audit, per device: which devices each kind of alarm names (bool [T, K])."""
    off = ~np.eye(run["xdev/device_norms"].shape[1], dtype=bool)
    near = run["xdev/near_duplicate_pairs"].astype(bool) & ~run["xdev/duplicate_pairs"].astype(bool) & off
    return {
        "outlier": run["xdev/outlier_devices"].astype(bool),
        "near_duplicate": near.any(axis=2),
        "duplicate": (run["xdev/duplicate_pairs"].astype(bool) & off).any(axis=2),
        "desync": run["xdev/param_desync"].astype(bool),
    }


def _replayed(run: dict[str, np.ndarray], **rule: float) -> detect.AuditVerdict:
    return jax.device_get(
        detect.replay_audits(
            run["xdev/device_norms"],
            run["xdev/cosine_to_mean"],
            run["xdev/pairwise_cosine"],
            **_cross_device.default_audit_rule(**rule),
        )
    )


def xdev_table(runs_by_k: dict[int, dict[tuple[str, int], dict[str, np.ndarray]]]) -> tuple[str, dict[str, Any]]:
    """Markdown: per K and scenario, alarms on clean audits, detection rate, delay, the first
    alarm's words; plus the replay check (in-run verdicts vs the host replay)."""
    rows, summary, mismatches = [], {}, 0
    for k, runs in runs_by_k.items():
        clean_audits = clean_alarms = 0
        by_name: dict[str, list[dict[str, np.ndarray]]] = {}
        for (name, _seed), run in sorted(runs.items()):
            by_name.setdefault(name, []).append(run)
            replay = _replayed(run)
            mismatches += int((np.asarray(replay.outlier_devices) != run["xdev/outlier_devices"].astype(bool)).sum())
            mismatches += int(
                (np.asarray(replay.near_duplicate_pairs) != run["xdev/near_duplicate_pairs"].astype(bool)).sum()
            )
            active = run["fault_active"]
            start = int(np.argmax(active)) if active.any() else len(active)
            masks = _alarm_masks(run)
            any_alarm = np.zeros(len(active), bool)
            for mask in masks.values():
                any_alarm |= mask.any(axis=1)
            if xdev.is_clean(name):
                # A fault run replays its clean run's seed, so its audits before the fault are
                # copies of the clean run's first ones: only the clean runs count as clean audits.
                clean_audits += start
                clean_alarms += int(any_alarm[:start].sum())
        for name, group in by_name.items():
            if xdev.is_clean(name):
                alarms = [int(sum(m.any(axis=1) for m in _alarm_masks(r).values()).astype(bool).sum()) for r in group]
                audits = sum(len(r["fault_active"]) for r in group)
                rows.append(f"| {k} | {name} | {len(group)} | {sum(alarms)} alarms in {audits} audits | | | |")
                summary[(k, name)] = {"alarms": sum(alarms), "audits": audits}
                continue
            delays, wrong, first_words = [], 0, ""
            for run in group:
                faulty = run["faulty_devices"]
                active = run["fault_active"]
                start = int(np.argmax(active))
                masks = _alarm_masks(run)
                names_faulty = np.zeros(len(active), bool)
                for mask in masks.values():
                    names_faulty |= mask[:, faulty].any(axis=1)
                    others = np.delete(mask, faulty, axis=1)
                    wrong += int(others[start:].any(axis=1).sum())
                hits = np.nonzero(names_faulty[start:])[0]
                delays.append(int(hits[0]) if hits.size else None)
                if hits.size and not first_words:
                    t = start + int(hits[0])
                    alarms = gh.cross_device_alarms({m: v[t] for m, v in run.items() if m.startswith("xdev/")})
                    first_words = "; ".join(str(a) for a in alarms if set(a.devices) & set(faulty.tolist()))
            found = [d for d in delays if d is not None]
            after = sum(len(r["fault_active"]) - int(np.argmax(r["fault_active"])) for r in group)
            rows.append(
                f"| {k} | {name} | {len(group)} | {len(found)}/{len(group)} | "
                f"{'-' if not found else (f'{min(found)}-{max(found)}' if min(found) != max(found) else found[0])} | "
                f"{1000 * wrong / after:.1f} | {first_words or '-'} |"
            )
            summary[(k, name)] = {"found": len(found), "runs": len(group), "delays": delays}
        summary[(k, "clean_audits")] = {"audits": clean_audits, "alarms": clean_alarms}
        rows.append(
            f"| {k} | **all clean audits** (the clean runs; a fault run before its fault repeats its clean run) | | "
            f"{clean_alarms} alarms in {clean_audits} audits ({1000 * clean_alarms / max(clean_audits, 1):.2f} / 1000)"
            " | | | |"
        )
    head = (
        "| K | scenario | seeds | detected | delay (audits) | alarms on other devices / 1000 audits after "
        "the start | first alarm (cross_device_alarms) |\n|---|---|---|---|---|---|---|"
    )
    summary["replay_mismatches"] = mismatches
    check = f"In-run verdicts vs the host replay: {mismatches} differing flags."
    return head + "\n" + "\n".join(rows) + "\n\n" + check, summary


XDEV_SWEEP = [
    {"evidence_drift": d, "evidence_threshold": h, "pair_drift": pd, "pair_threshold": h}
    for d, pd in ((1.0, 2.0), (1.5, 2.5), (2.0, 3.0), (3.0, 4.0), (4.0, 5.0))
    for h in (8.0, 12.0, 16.0)
]
MODERATE = ("grad_scale/moderate/persistent", "label_noise/moderate/persistent", "bad_augment/moderate/persistent")


def xdev_sweep(runs_by_k: dict[int, dict[tuple[str, int], dict[str, np.ndarray]]]) -> str:
    """Markdown: the audit detectors replayed with other drifts and thresholds: alarms on clean
    audits, and the delay of the moderate faults and the near-duplicates."""
    rows = []
    for rule in XDEV_SWEEP:
        clean_alarms = clean_audits = 0
        delays: dict[str, list[int | None]] = {}
        for runs in runs_by_k.values():
            for (name, _seed), run in runs.items():
                verdict = _replayed(run, **rule)
                outlier = np.asarray(verdict.outlier_devices)
                near = np.asarray(verdict.near_duplicate_pairs)
                active = run["fault_active"]
                start = int(np.argmax(active)) if active.any() else len(active)
                if xdev.is_clean(name):  # fault runs before the fault copy their clean run's audits
                    any_alarm = outlier.any(axis=1) | near.any(axis=(1, 2))
                    clean_alarms += int(any_alarm[:start].sum())
                    clean_audits += start
                faulty = run["faulty_devices"]
                if name in MODERATE or name.startswith("near_duplicate"):
                    hit = outlier[:, faulty].any(axis=1) | near[:, faulty[0], faulty[-1]]
                    hits = np.nonzero(hit[start:])[0]
                    delays.setdefault(name, []).append(int(hits[0]) if hits.size else None)
        cells = []
        for name in sorted(delays):
            found = [d for d in delays[name] if d is not None]
            cells.append(f"{len(found)}/{len(delays[name])}, {max(found) if found else '-'}")
        rows.append(
            f"| {rule['evidence_drift']:g} / {rule['pair_drift']:g} | {rule['evidence_threshold']:g} | "
            f"{clean_alarms} / {clean_audits} | " + " | ".join(cells) + " |"
        )
    names = sorted(delays)
    head = (
        "| drift (outlier / pair) | evidence threshold | alarms / clean audits | "
        + " | ".join(f"{n}: found, worst delay" for n in names)
        + " |\n|"
        + "---|" * (3 + len(names))
    )
    return head + "\n" + "\n".join(rows)


# ============================================================================ main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the reduced scenario set (what CI runs)")
    parser.add_argument("--refresh", action="store_true", help="re-record the cached runs")
    parser.add_argument("--only", choices=("single", "loop", "xdev"), help="one half of the benchmark")
    parser.add_argument("--json", help="also write the summary numbers to this file")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    summary: dict[str, Any] = {}
    kind = "quick" if args.quick else "full"
    say(f"# Detection benchmark ({kind}), jax {jax.__version__}, {jax.default_backend()}\n")
    if args.only in (None, "single"):
        streams = clean_streams(args.quick, args.refresh)
        fresh = {n: v for n, v in streams.items() if not n.startswith(SMALL_DATA + "/")}
        small = {n: v for n, v in streams.items() if n.startswith(SMALL_DATA + "/")}
        table, summary["spike"] = spike_table(fresh, grid=not args.quick)
        say("## Spike rule on clean runs: false skips and spikes caught\n\n" + table + "\n")
        table, summary["spike_small_data"] = spike_table(small, grid=not args.quick)
        say("## Spike rule on the small-data runs (batch 8, epochs): false skips and spikes caught\n\n" + table + "\n")
        say("## The default rule on each clean run\n\n" + per_run_table(streams) + "\n")
        table, summary["loss"] = loss_table(fresh)
        say("## Loss spikes: the loss z-score on clean runs\n\n" + table + "\n")
        table, summary["loss_small_data"] = loss_table(small)
        say("## Loss spikes on the small-data runs (batch 8, epochs)\n\n" + table + "\n")
        table, summary["guarded"] = guarded_faults(args.quick)
        say("## The guard in the loop with injected faults\n\n" + table + "\n")
    if args.only in (None, "single", "loop"):
        table, summary["guarded_clean"] = guarded_clean(args.quick)
        say("## The guard in the loop on clean runs that memorise a small dataset\n\n" + table + "\n")
    if args.only in (None, "xdev"):
        runs = {k: xdev_runs(k, args.quick, args.refresh) for k in (8, 32)}
        table, xsummary = xdev_table(runs)
        summary["xdev"] = {f"{key[0]}|{key[1]}": v for key, v in xsummary.items() if isinstance(key, tuple)}
        summary["xdev_replay_mismatches"] = xsummary["replay_mismatches"]
        say("## Cross-device audit: alarms and detection\n\n" + table + "\n")
        if not args.quick:
            say("## Cross-device detectors with other settings (host replay)\n\n" + xdev_sweep(runs) + "\n")
    say(f"({time.perf_counter() - began:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str))
    return summary


if __name__ == "__main__":
    main()
