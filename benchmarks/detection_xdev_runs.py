"""Cross-device fault scenarios for the detection benchmark: recorded audits of faulty data-parallel runs.

Each run trains a small MLP classifier (two hidden layers with dropout) on a synthetic
Gaussian mixture, data-parallel on K devices (``jax.shard_map`` over the ``'data'`` axis,
local gradients from ``gh.local_value_and_grad``), with ``gh.cross_device`` auditing every
step, chained before ``optax.adam``. Every device draws its own batch inside the jitted
program from a key folded with the step and the device index; all steps of a run are one
``lax.scan``.

A fault (:class:`XFault`) is encoded as data (per-device arrays: label-noise fraction,
input corruption, gradient multiplier, staleness, drift rate, data / augmentation /
dropout-key source device and shared fraction, desync perturbation, bit-flip kind, dead
mask and the fault's window), so ONE compiled program per (K, steps) serves every
scenario and seed (the run seed is an argument too).

The model: 32 features -> 64 -> 64 -> 8 classes (ReLU, dropout 0.1 after each hidden
layer, 6.8k parameters), Adam 1e-3, 32 examples per device and step; class centres
~ N(0, 0.35^2) per feature plus N(0, 1) example noise (overlapping classes: the loss stays
near 1 nat, and the per-device gradients are noise-dominated, ``xdev/agreement`` ~ 0.01,
as in most real data-parallel runs); the input pipeline adds a N(0, 0.3^2) jitter.

Fault kinds (device ``d``; pairs: ``d`` and ``d + 1``), strong / moderate:

* ``label_noise``: d's labels are replaced by uniform random classes with probability 1.0 / 0.3.
* ``bad_augment``: d's inputs are corrupted: features permuted, scaled x3 and heavy noise
  (std 2, the class noise being 1) / extra noise of std 1 (features kept).
* ``grad_scale``: d's gradient is multiplied by 10 / 2.5.
* ``stale_params``: d computes its gradient on the parameters of 50 / 10 steps ago (a ring of
  the last 64 parameter sets in the scan state).
* ``drift``: d's gradient becomes ``g + r (t - start) |g| u`` with ``u`` a fixed random unit
  direction: ``r`` = 0.02 / 0.002 per step (the perturbation equals the gradient's norm after
  50 / 500 steps).
* ``near_duplicate``: d + 1 sees d's examples with its own dropout mask; strong: all of
  them, with d's input augmentation (jitter); moderate: half of them (the other half its
  own), with its own augmentation (sketched pair cosine ~0.7 / ~0.3, the other pairs' ~0).
* ``exact_duplicate``: d + 1 sees d's examples, augmentation and dropout key: bit-identical
  gradients (strong only).
* ``desync``: at ``start``, d's parameters are multiplied once by ``1 +- eps`` (random signs,
  eps = 1e-2 / 1e-6); every device then applies the same mean update, so the difference persists.
* ``bit_flip``: one element of d's first-layer kernel gradient gets bit 30 (the top exponent
  bit: 1e-3 becomes ~3e35) flipped / the highest zero bit among exponent bits 26..23 set
  (a x256, x16, x4 or x2 change).
* ``dead``: d's gradient is all zeros (strong only).

``strong`` is meant to be revealed by a single audit and ``moderate`` not; measured (K=8
and 32), a single audit does NOT clearly reveal strong label_noise (outlier score ~4-5,
named by the CUSUM evidence after a few audits), strong stale_params (no visible effect
at all: the gradient noise hides a 50-step-old parameter set), nor drift before it has grown
(~100 steps at the strong rate); near_duplicate shows in ``xdev/pairwise_cosine`` and
exact_duplicate / desync in the fingerprints, not in the outlier score.

Use from the benchmark (``benchmarks/`` is not a package)::

  sys.path.insert(0, 'benchmarks')
  import detection_xdev_runs as xruns
  xruns.record_in_subprocess(8, quick=True, steps=300, seeds=[0], out_path='/tmp/xdev8.npz')
  runs = xruns.load('/tmp/xdev8.npz')   # {(scenario name, seed): {metric: array [steps, ...]}}

CLI (sets ``XLA_FLAGS`` for K host devices itself)::

  python benchmarks/detection_xdev_runs.py --devices 8 [--quick] [--steps 1000] [--seeds 0 1 2] --out PATH
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "CLEAN",
    "KINDS",
    "PAIR_KINDS",
    "REGRESSION",
    "XFault",
    "is_clean",
    "load",
    "record",
    "record_in_subprocess",
    "record_regression",
    "regression_scenarios",
    "save",
    "scenario_name",
    "scenarios",
    "summarize",
]

KINDS = (
    "label_noise",
    "bad_augment",
    "grad_scale",
    "stale_params",
    "drift",
    "near_duplicate",
    "exact_duplicate",
    "desync",
    "bit_flip",
    "dead",
)
PAIR_KINDS = ("near_duplicate", "exact_duplicate")
STRENGTHS = ("strong", "moderate")
_STRONG_ONLY = ("exact_duplicate", "dead")
CLEAN = "clean"

# ----------------------------------------------------------------------------- model and data
FEATURES, CLASSES, HIDDEN = 32, 8, 64
BATCH = 32  # examples per device per step
DROPOUT = 0.1
LEARNING_RATE = 1e-3
CENTER_SCALE = 0.35  # class centres ~ N(0, CENTER_SCALE^2), examples = centre + N(0, 1): overlapping classes
AUGMENT_NOISE = 0.3  # the pipeline's own augmentation: input jitter of this std
_MAX_DEVICES = 4096  # per-step keys fold in step * _MAX_DEVICES + device
RING = 64  # past parameter sets kept for stale_params (the largest staleness must be < RING)

# ----------------------------------------------------------------------------- fault strengths
LABEL_NOISE = {"strong": 1.0, "moderate": 0.3}
BAD_AUGMENT = {"strong": (1.0, 3.0, 2.0), "moderate": (0.0, 1.0, 1.0)}  # (permute features, scale, noise std)
GRAD_SCALE = {"strong": 10.0, "moderate": 2.5}
STALENESS = {"strong": 50, "moderate": 10}
NEAR_DUPLICATE_SHARE = 0.5  # moderate near_duplicate: fraction of d's examples that d + 1 also sees
DRIFT_RATE = {"strong": 0.02, "moderate": 0.002}  # per step, relative to the gradient's norm
DESYNC = {"strong": 1e-2, "moderate": 1e-6}
BIT_FLIP = {"strong": 1, "moderate": 2}  # flip_kind codes, see flip_bits in _program
_NEVER = np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True)
class XFault:
    """One cross-device fault.

    Attributes:
      kind: one of :data:`KINDS`.
      device: the faulty device (pair kinds: devices ``device`` and ``device + 1``).
      start: first step of the fault (0-based).
      strength: ``'strong'`` (a single audit reveals it) or ``'moderate'`` (it does not).
      length: ``None``: persistent from ``start`` on; else the number of faulty steps
        (sudden faults: 1). ``desync`` is always persistent.
    """

    kind: str
    device: int = 1
    start: int = 100
    strength: str = "strong"
    length: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"XFault kind must be one of {KINDS}, got {self.kind!r}.")
        if self.strength not in STRENGTHS:
            raise ValueError(f"XFault strength must be 'strong' or 'moderate', got {self.strength!r}.")
        if self.kind in _STRONG_ONLY and self.strength != "strong":
            raise ValueError(f"XFault kind {self.kind!r} has only strength='strong', got {self.strength!r}.")
        if self.device < 0 or self.start < 0:
            raise ValueError(f"XFault device and start must be >= 0, got device={self.device}, start={self.start}.")
        if self.length is not None and self.length < 1:
            raise ValueError(f"XFault length must be None (persistent) or >= 1, got {self.length}.")
        if self.kind == "desync" and self.length is not None:
            raise ValueError("A desync persists once introduced: XFault('desync') takes length=None.")

    @property
    def name(self) -> str:
        """``kind/strength/duration`` (``persistent``, ``sudden`` or ``<n>steps``), plus
        ``@d<device>`` / ``@t<start>`` when they differ from the defaults (1, 100)."""
        duration = "persistent" if self.length is None else "sudden" if self.length == 1 else f"{self.length}steps"
        name = f"{self.kind}/{self.strength}/{duration}"
        if self.device != 1:
            name += f"@d{self.device}"
        if self.start != 100:
            name += f"@t{self.start}"
        return name

    @property
    def devices(self) -> tuple[int, ...]:
        """The devices the fault touches."""
        return (self.device, self.device + 1) if self.kind in PAIR_KINDS else (self.device,)

    def active(self, steps: int) -> np.ndarray:
        """bool [steps]: the steps on which the fault acts (desync: from ``start`` on)."""
        out = np.zeros(steps, bool)
        out[self.start : steps if self.length is None else self.start + self.length] = True
        return out


def scenario_name(fault: XFault | None) -> str:
    """The name a run is stored under: ``fault.name``, or ``'clean'``."""
    return CLEAN if fault is None else fault.name


def scenarios(quick: bool = False) -> list[XFault | None]:
    """The scenario set. ``None`` is a clean run (listed first).

    Full: every kind in each strength that applies, sudden (one step) and persistent where
    both make sense (label_noise, bad_augment, grad_scale); stale_params, drift,
    near_duplicate, exact_duplicate, desync and dead are persistent, bit_flip sudden.
    Quick: the clean run, every kind once (strong) and the moderate grad_scale and desync.
    """
    if quick:
        return [
            None,
            XFault("label_noise"),
            XFault("bad_augment"),
            XFault("grad_scale"),
            XFault("grad_scale", strength="moderate"),
            XFault("stale_params"),
            XFault("drift"),
            XFault("near_duplicate"),
            XFault("exact_duplicate"),
            XFault("desync"),
            XFault("desync", strength="moderate"),
            XFault("bit_flip", length=1),
            XFault("dead"),
        ]
    out: list[XFault | None] = [None]
    for kind in KINDS:
        for strength in ("strong",) if kind in _STRONG_ONLY else STRENGTHS:
            if kind in ("label_noise", "bad_augment", "grad_scale"):
                lengths: tuple[int | None, ...] = (1, None)
            elif kind == "bit_flip":
                lengths = (1,)
            else:
                lengths = (None,)
            out.extend(XFault(kind, strength=strength, length=length) for length in lengths)
    return out


# ----------------------------------------------------------------------------- faults as data
# name: (dtype, value on a device the fault does not touch; None = the device's own index)
_FIELDS: dict[str, tuple[type, Any]] = {
    "start": (np.int32, 0),
    "end": (np.int32, 0),  # the device's fault window is [start, end): empty when untouched
    "label_noise": (np.float32, 0.0),
    "aug_permute": (np.float32, 0.0),
    "aug_scale": (np.float32, 1.0),
    "aug_noise": (np.float32, 0.0),
    "grad_mult": (np.float32, 1.0),
    "stale_lag": (np.int32, 0),
    "drift_rate": (np.float32, 0.0),
    "data_src": (np.int32, None),
    "data_share": (np.float32, 1.0),  # fraction of the batch taken from data_src's examples
    "aug_src": (np.int32, None),
    "dropout_src": (np.int32, None),
    "desync_eps": (np.float32, 0.0),
    "flip_kind": (np.int32, 0),
    "dead": (np.float32, 0.0),
}


def _fault_arrays(fault: XFault | None, k: int) -> dict[str, np.ndarray]:
    """Per-device [K] arrays that encode ``fault`` for the compiled program."""
    arrays = {
        name: np.arange(k, dtype=dtype) if clean is None else np.full(k, clean, dtype)
        for name, (dtype, clean) in _FIELDS.items()
    }
    if fault is None:
        return arrays
    if max(fault.devices) >= k:
        raise ValueError(f"{fault.name} touches devices {fault.devices} but the run has only K={k} devices.")
    d, s = fault.device, fault.strength
    for device in fault.devices:
        arrays["start"][device] = fault.start
        arrays["end"][device] = _NEVER if fault.length is None else fault.start + fault.length
    if fault.kind == "label_noise":
        arrays["label_noise"][d] = LABEL_NOISE[s]
    elif fault.kind == "bad_augment":
        arrays["aug_permute"][d], arrays["aug_scale"][d], arrays["aug_noise"][d] = BAD_AUGMENT[s]
    elif fault.kind == "grad_scale":
        arrays["grad_mult"][d] = GRAD_SCALE[s]
    elif fault.kind == "stale_params":
        arrays["stale_lag"][d] = STALENESS[s]
    elif fault.kind == "drift":
        arrays["drift_rate"][d] = DRIFT_RATE[s]
    elif fault.kind == "near_duplicate":
        arrays["data_src"][d + 1] = d
        if s == "strong":
            arrays["aug_src"][d + 1] = d
        else:
            arrays["data_share"][d + 1] = NEAR_DUPLICATE_SHARE
    elif fault.kind == "exact_duplicate":
        arrays["data_src"][d + 1] = arrays["aug_src"][d + 1] = arrays["dropout_src"][d + 1] = d
    elif fault.kind == "desync":
        arrays["desync_eps"][d] = DESYNC[s]
    elif fault.kind == "bit_flip":
        arrays["flip_kind"][d] = BIT_FLIP[s]
    elif fault.kind == "dead":
        arrays["dead"][d] = 1.0
    return arrays


# ----------------------------------------------------------------------------- the compiled program
def _random_bits(key: Any, step: Any, draws: Sequence[tuple[int, Any, tuple[int, ...]]]) -> list[Any]:
    """uint32 bits for each draw ``(stream, device, shape)``: ``key`` folded with the stream, then
    with ``step * _MAX_DEVICES + device`` (the same stream, step and device give the same bits)."""
    import jax

    return [
        jax.random.bits(jax.random.fold_in(jax.random.fold_in(key, stream), step * _MAX_DEVICES + device), shape)
        for stream, device, shape in draws
    ]


def _uniform(bits: Any) -> Any:
    """Uniform float32 samples in (0, 1) from uint32 bits."""
    import jax.numpy as jnp

    return ((bits >> 9).astype(jnp.float32) + 0.5) * jnp.float32(2.0**-23)


def _normal(bits: Any) -> Any:
    """Standard normal float32 samples from uint32 bits (as jax.random.normal: erfinv of a uniform)."""
    from jax import lax

    return np.float32(np.sqrt(2.0)) * lax.erf_inv(2.0 * _uniform(bits) - 1.0)


_PROGRAMS: dict[tuple[Any, ...], Callable[..., Any]] = {}
COMPILE_SECONDS: dict[tuple[int, int], float] = {}  # (K, steps) -> seconds to trace and compile


def _program(k: int, steps: int) -> Callable[..., Any]:
    """The compiled ``run(seed int32 [], faults {name: [K]}) -> ({metric: [steps, ...]}, loss [K, steps])``."""
    key = (k, steps)
    if key in _PROGRAMS:
        return _PROGRAMS[key]

    import jax
    import jax.numpy as jnp
    import optax
    from jax import lax
    from jax.sharding import AxisType, Mesh
    from jax.sharding import PartitionSpec as P

    import optax_gradhealth as gh

    if jax.device_count() < k:
        raise RuntimeError(
            f"record(k={k}) needs >= {k} devices, this process has {jax.device_count()}: set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={k} before jax is imported, or use record_in_subprocess."
        )
    if k > _MAX_DEVICES:
        raise ValueError(f"At most {_MAX_DEVICES} devices, got k={k}.")
    if max(STALENESS.values()) >= RING:
        raise ValueError(f"staleness {max(STALENESS.values())} needs RING > it, RING={RING}")
    mesh = Mesh(np.asarray(jax.devices()[:k]), ("data",), axis_types=(AxisType.Auto,))
    tx = optax.chain(
        gh.cross_device("data", per_device_batch=BATCH, audit_first_steps=steps + 1), optax.adam(LEARNING_RATE)
    )
    f32 = jnp.float32

    def varying_axes(x: Any) -> frozenset:
        aval = jax.typeof(x)
        vma = getattr(aval, "vma", None)
        if vma is None:
            vma = getattr(getattr(aval, "mat", None), "varying", None)
        return frozenset(vma or ())

    def first_copy(x: jax.Array) -> jax.Array:
        """Device 0's value, typed as replicated (a no-op for values that already are)."""
        if "data" not in varying_axes(x):
            return x
        mine = lax.axis_index("data") == 0
        if x.dtype == jnp.bool_:
            return lax.psum(jnp.where(mine, x, False).astype(jnp.int32), "data") > 0
        return lax.psum(jnp.where(mine, x, jnp.zeros_like(x)), "data")

    def init_params(rng: jax.Array) -> dict[str, jax.Array]:
        sizes = [(FEATURES, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, CLASSES)]
        params = {}
        for i, (fan_in, fan_out) in enumerate(sizes, start=1):
            params[f"w{i}"] = jax.random.normal(jax.random.fold_in(rng, i), (fan_in, fan_out), f32) * np.sqrt(
                2.0 / fan_in
            )
            params[f"b{i}"] = jnp.zeros((fan_out,), f32)
        return params

    def dropout(h: jax.Array, bits: jax.Array) -> jax.Array:
        keep = bits < np.uint32(round((1.0 - DROPOUT) * 2.0**32))
        return jnp.where(keep, h / (1.0 - DROPOUT), 0.0)

    def loss_fn(params: dict[str, jax.Array], x: jax.Array, y: jax.Array, bits: jax.Array) -> jax.Array:
        h = dropout(jax.nn.relu(x @ params["w1"] + params["b1"]), bits[:, :HIDDEN])
        h = dropout(jax.nn.relu(h @ params["w2"] + params["b2"]), bits[:, HIDDEN:])
        logits = h @ params["w3"] + params["b3"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grad_fn = gh.local_value_and_grad(loss_fn, "data")

    def flip_bits(g: jax.Array, kind: jax.Array) -> jax.Array:
        """``g`` (a float32 scalar) with a bit flipped: kind 1: bit 30; kind 2: the highest zero bit of 26..23."""
        bits = lax.bitcast_convert_type(g, jnp.uint32)
        low = jnp.uint32(1 << 23)
        for bit in (24, 25, 26):
            low = jnp.where(bits & jnp.uint32(1 << bit), low, jnp.uint32(1 << bit))
        mask = jnp.where(kind == 1, jnp.uint32(1 << 30), low)
        return lax.bitcast_convert_type(bits ^ mask, f32)

    def run(seed: jax.Array, faults: dict[str, jax.Array]) -> tuple[dict[str, jax.Array], jax.Array]:
        f = {name: value[0] for name, value in faults.items()}
        index = lax.axis_index("data")
        root = jax.random.key(seed)
        k_init, k_centers, k_perm, k_signs, k_drift, k_flip, k_steps = jax.random.split(root, 7)
        params = init_params(k_init)  # the same on every device
        centers = CENTER_SCALE * jax.random.normal(k_centers, (CLASSES, FEATURES), f32)
        permutation = jax.random.permutation(k_perm, FEATURES)
        leaves, treedef = jax.tree.flatten(params)
        signs = treedef.unflatten(
            [
                jnp.where(jax.random.bernoulli(jax.random.fold_in(k_signs, i), 0.5, x.shape), 1.0, -1.0)
                for i, x in enumerate(leaves)
            ]
        )
        direction = treedef.unflatten(
            [jax.random.normal(jax.random.fold_in(k_drift, i), x.shape, f32) for i, x in enumerate(leaves)]
        )
        direction = jax.tree.map(lambda u: u / optax.global_norm(direction), direction)
        flip_index = jax.random.randint(k_flip, (), 0, FEATURES * HIDDEN)

        params = lax.pcast(params, "data", to="varying")  # each device keeps its own copy (desync)
        opt_state = tx.init(params)
        ring = jax.tree.map(lambda p: jnp.broadcast_to(p, (RING, *p.shape)), params)

        def step(carry: Any, t: jax.Array) -> tuple[Any, tuple[dict[str, jax.Array], jax.Array]]:
            params, opt_state, ring = carry
            active = (t >= f["start"]) & (t < f["end"])
            perturb = (t == f["start"]) & (f["desync_eps"] > 0)
            params = jax.tree.map(lambda p, s: jnp.where(perturb, p * (1.0 + f["desync_eps"] * s), p), params, signs)
            ring = jax.tree.map(lambda r, p: lax.dynamic_update_index_in_dim(r, p, t % RING, 0), ring, params)
            lag = jnp.where(active, f["stale_lag"], 0)
            used = jax.tree.map(lambda r: lax.dynamic_index_in_dim(r, jnp.maximum(t - lag, 0) % RING, 0, False), ring)

            # This device's batch, from random bits keyed by the run seed, the stream, the step and a
            # device: examples from the data source device's, jitter from the augmentation source's,
            # dropout from the dropout source's, fault noise from its own (one draw per stream).
            def source(name: str) -> jax.Array:
                return jnp.where(active, f[name], index)

            def examples(raw: jax.Array) -> tuple[jax.Array, jax.Array]:
                y = (raw[:, FEATURES] % CLASSES).astype(jnp.int32)
                return centers[y] + _normal(raw[:, :FEATURES]), y

            draws = [
                (0, source("data_src"), (BATCH, FEATURES + 1)),
                (0, index, (BATCH, FEATURES + 1)),  # its own examples (the same as the above when no fault)
                (1, source("aug_src"), (BATCH, FEATURES)),
                (2, source("dropout_src"), (BATCH, 2 * HIDDEN)),
                (3, index, (BATCH, FEATURES + 2)),
            ]
            src_raw, own_raw, aug_raw, drop_raw, fault_bits = _random_bits(k_steps, t, draws)
            x, y = examples(src_raw)
            own_x, own_y = examples(own_raw)
            own = jnp.arange(BATCH) >= jnp.round(jnp.where(active, f["data_share"], 1.0) * BATCH)
            x, y = jnp.where(own[:, None], own_x, x), jnp.where(own, own_y, y)
            x = x + AUGMENT_NOISE * _normal(aug_raw)
            x = jnp.where(active & (f["aug_permute"] > 0), x[:, permutation], x)
            x = x * jnp.where(active, f["aug_scale"], 1.0)
            x = x + jnp.where(active, f["aug_noise"], 0.0) * _normal(fault_bits[:, :FEATURES])
            coin = _uniform(fault_bits[:, FEATURES]) < jnp.where(active, f["label_noise"], 0.0)
            y = jnp.where(coin, (fault_bits[:, FEATURES + 1] % CLASSES).astype(jnp.int32), y)

            loss, grads = grad_fn(used, x, y, drop_raw)

            mult = jnp.where(active, f["grad_mult"], 1.0)
            drift = jnp.where(active, f["drift_rate"] * (t - f["start"]).astype(f32), 0.0) * optax.global_norm(grads)
            dead = active & (f["dead"] > 0)
            grads = jax.tree.map(lambda g, u: jnp.where(dead, 0.0, g * mult + drift * u), grads, direction)
            w1 = grads["w1"].reshape(-1)
            flipped = jnp.where(
                active & (f["flip_kind"] > 0), flip_bits(w1[flip_index], f["flip_kind"]), w1[flip_index]
            )
            grads["w1"] = w1.at[flip_index].set(flipped).reshape(grads["w1"].shape)

            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            out = {name: first_copy(value) for name, value in gh.metrics(opt_state).items()}
            return (params, opt_state, ring), (out, loss)

        _, (out, losses) = lax.scan(step, (params, opt_state, ring), jnp.arange(steps, dtype=jnp.int32))
        return out, losses[None]  # the losses stay per device: no collective for them

    began = time.perf_counter()
    jitted = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(P(), P("data")), out_specs=(P(), P("data"))))
    program = jitted.lower(np.int32(0), _fault_arrays(None, k)).compile()
    COMPILE_SECONDS[key] = time.perf_counter() - began
    _PROGRAMS[key] = program
    return program


# ----------------------------------------------------------------------------- regression family
# A second model, for the clean audits of EARLY training: the classifier above is
# noise-dominated from its first step, but a model that starts far from a smooth target
# has per-device gradients that share a strong signal (cosines to the mean ~0.9 in the
# first 20-30 steps, then ~0.1), and the batches of a regression differ in their noise
# by factors (residuals have heavy tails): a device at cosine 0.3 among others at 0.93
# happens by chance. Scenario names carry the prefix ``regression/<config>/``.
REGRESSION = "regression"
REG_FEATURES, REG_HIDDEN = 8, 32
REG_TARGET_NOISE = 0.1
# config: (examples per device and step, peak learning rate)
REG_CONFIGS = {"b64": (64, 3e-3), "b16": (16, 1e-2)}
REG_STEPS = 200
REG_FAULT_START = 30  # inside the signal-dominated phase


def is_clean(name: str) -> bool:
    """Whether a stored scenario name is a clean run (of either family)."""
    return name == CLEAN or name.endswith("/" + CLEAN)


def regression_scenarios(quick: bool = False) -> list[XFault | None]:
    """Clean runs and the faults that apply to a regression (its targets are the labels),
    from step ``REG_FAULT_START``."""
    if quick:
        return [None, XFault("grad_scale", start=REG_FAULT_START)]
    out: list[XFault | None] = [None]
    for kind in ("grad_scale", "label_noise", "bad_augment"):
        for strength in STRENGTHS:
            out.append(XFault(kind, strength=strength, start=REG_FAULT_START))
    out.append(XFault("grad_scale", start=REG_FAULT_START, length=1))
    return out


def _regression_program(k: int, steps: int, batch: int, learning_rate: float) -> Callable[..., Any]:
    """The compiled ``run(seed, faults) -> {metric: [steps, ...]}`` of the regression family:
    an MLP 8 -> 32 -> 32 -> 1 (ReLU) fits ``sin(x . w) + N(0, 0.1^2)`` with ``x ~ N(0, I)``,
    ``gh.cross_device`` (every step audited) chained before ``gh.guard(adamw, clip=1.0)``
    with a warm-up (10% of the steps) and cosine decay. Faults: ``grad_mult``,
    ``label_noise`` (a target replaced by N(0, 1)) and the ``aug_*`` input corruption."""
    key = ("regression", k, steps, batch, learning_rate)
    if key in _PROGRAMS:
        return _PROGRAMS[key]

    import jax
    import jax.numpy as jnp
    import optax
    from jax import lax
    from jax.sharding import AxisType, Mesh
    from jax.sharding import PartitionSpec as P

    import optax_gradhealth as gh

    if jax.device_count() < k:
        raise RuntimeError(
            f"the regression family at K={k} needs >= {k} devices, this process has {jax.device_count()}."
        )
    mesh = Mesh(np.asarray(jax.devices()[:k]), ("data",), axis_types=(AxisType.Auto,))
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, steps // 10, steps, learning_rate * 0.05)
    tx = optax.chain(
        gh.cross_device("data", per_device_batch=batch, audit_first_steps=steps + 1),
        gh.guard(optax.adamw(schedule), clip=1.0),
    )
    f32 = jnp.float32
    sizes = [(REG_FEATURES, REG_HIDDEN), (REG_HIDDEN, REG_HIDDEN), (REG_HIDDEN, 1)]

    def loss_fn(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
        h = x
        for i in range(1, len(sizes) + 1):
            h = h @ params[f"w{i}"] + params[f"b{i}"]
            h = jax.nn.relu(h) if i < len(sizes) else h
        return jnp.mean((h[:, 0] - y) ** 2)

    grad_fn = gh.local_value_and_grad(loss_fn, "data")

    def run(seed: jax.Array, faults: dict[str, jax.Array]) -> dict[str, jax.Array]:
        f = {name: value[0] for name, value in faults.items()}
        index = lax.axis_index("data")
        k_init, k_target, k_perm, k_steps = jax.random.split(jax.random.key(seed), 4)
        params = {}
        for i, (fan_in, fan_out) in enumerate(sizes, start=1):
            params[f"w{i}"] = jax.random.normal(jax.random.fold_in(k_init, i), (fan_in, fan_out), f32) / np.sqrt(fan_in)
            params[f"b{i}"] = jnp.zeros((fan_out,), f32)
        target = jax.random.normal(k_target, (REG_FEATURES,), f32)
        permutation = jax.random.permutation(k_perm, REG_FEATURES)
        opt_state = tx.init(params)

        def step(carry: Any, t: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
            params, opt_state = carry
            active = (t >= f["start"]) & (t < f["end"])
            (x_bits, noise_bits, fault_bits, coin_bits) = _random_bits(
                k_steps,
                t,
                [
                    (0, index, (batch, REG_FEATURES)),
                    (1, index, (batch,)),
                    (2, index, (batch, REG_FEATURES + 1)),
                    (3, index, (batch,)),
                ],
            )
            x = _normal(x_bits)
            y = jnp.sin(x @ target) + REG_TARGET_NOISE * _normal(noise_bits)
            coin = _uniform(coin_bits) < jnp.where(active, f["label_noise"], 0.0)
            y = jnp.where(coin, _normal(fault_bits[:, REG_FEATURES]), y)
            x = jnp.where(active & (f["aug_permute"] > 0), x[:, permutation], x)
            x = x * jnp.where(active, f["aug_scale"], 1.0)
            x = x + jnp.where(active, f["aug_noise"], 0.0) * _normal(fault_bits[:, :REG_FEATURES])
            _, grads = grad_fn(params, x, y)
            grads = jax.tree.map(lambda g: g * jnp.where(active, f["grad_mult"], 1.0), grads)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (params, opt_state), gh.metrics(opt_state)

        _, out = lax.scan(step, (params, opt_state), jnp.arange(steps, dtype=jnp.int32))
        return out

    jitted = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(P(), P("data")), out_specs=P()))
    program = jitted.lower(np.int32(0), _fault_arrays(None, k)).compile()
    _PROGRAMS[key] = program
    return program


def record_regression(k: int, quick: bool, seeds: Sequence[int], fault_seeds: Sequence[int]) -> Runs:
    """Records the regression family on K devices of this process: every config of
    :data:`REG_CONFIGS`, clean runs on ``seeds`` and :func:`regression_scenarios`' faults on
    ``fault_seeds`` (quick: the first config only). Same layout as :func:`record`'s."""
    import jax

    runs: Runs = {}
    configs = list(REG_CONFIGS.items())[:1] if quick else list(REG_CONFIGS.items())
    for config, (batch, learning_rate) in configs:
        program = _regression_program(k, REG_STEPS, batch, learning_rate)
        for fault in regression_scenarios(quick):
            name = f"{REGRESSION}/{config}/{scenario_name(fault)}"
            arrays = _fault_arrays(fault, k)
            for seed in seeds if fault is None else fault_seeds:
                began = time.perf_counter()
                out = jax.device_get(program(np.int32(seed), arrays))
                metrics = {metric: np.asarray(value) for metric, value in out.items()}
                metrics["fault_active"] = np.zeros(REG_STEPS, bool) if fault is None else fault.active(REG_STEPS)
                metrics["faulty_devices"] = np.asarray([] if fault is None else fault.devices, np.int64)
                runs[(name, int(seed))] = metrics
                named = np.nonzero(metrics["xdev/outlier_devices"].any(axis=1))[0]
                print(
                    f"K={k} {name:50s} seed={seed} {time.perf_counter() - began:5.2f}s  audits naming a device: "
                    f"{named.size} (first {named[:5].tolist()})",
                    flush=True,
                )
    return runs


# ----------------------------------------------------------------------------- recording
Runs = dict[tuple[str, int], dict[str, np.ndarray]]


def summarize(metrics: dict[str, np.ndarray]) -> dict[str, float]:
    """Summary numbers of one recorded run (audited steps only).

    Returns:
      ``score_before`` / ``score_after``: median ``xdev/outlier_score`` before / from the
      fault's start (a clean run: NaN / the whole run); ``hit_active`` / ``hit_after``: the
      fraction of audits while the fault acts / from its start on whose
      ``xdev/outlier_device`` is a faulty device (NaN for a clean run); ``named``: the
      fraction of audits from the start on that name any device (on a clean run, the
      false-alarm rate); ``score_max``: the largest score of the run.
    """
    active = metrics["fault_active"].astype(bool)
    faulty = metrics["faulty_devices"]
    audited = metrics["xdev/audited"].astype(bool)
    score = metrics["xdev/outlier_score"]
    outlier = metrics["xdev/outlier_device"]
    start = int(np.argmax(active)) if active.any() else (len(active) if faulty.size else 0)
    after = audited & (np.arange(len(active)) >= start)
    before = audited & ~after

    def median(mask: np.ndarray) -> float:
        return float(np.median(score[mask])) if mask.any() else float("nan")

    def hits(mask: np.ndarray) -> float:
        return float(np.isin(outlier[mask], faulty).mean()) if faulty.size and mask.any() else float("nan")

    return {
        "score_before": median(before),
        "score_after": median(after),
        "hit_active": hits(active & audited),
        "hit_after": hits(after),
        "named": float((outlier[after] >= 0).mean()) if after.any() else float("nan"),
        "score_max": float(np.max(score[audited])) if audited.any() else float("nan"),
    }


def record(
    k: int,
    faults: Sequence[XFault | None],
    steps: int,
    seeds: Sequence[int],
    out_path: str | None = None,
    *,
    verbose: bool = False,
) -> Runs:
    """Records every (scenario, seed) run on K devices of this process.

    Args:
      k: devices on the data axis (this process must have at least ``k``).
      faults: the scenarios; ``None`` is a clean run.
      steps: training steps per run, every one audited.
      seeds: run seeds (initial parameters, class centres, data, drift direction, bit-flip element).
      out_path: if given, everything is saved there as one ``.npz`` (read it with :func:`load`).
      verbose: print one line per run (name, seed, seconds, summary numbers).

    Returns:
      ``{(scenario name, seed): {metric: array [steps, ...]}}``: every entry of
      ``gh.metrics(state)`` after each step (vectors ``[steps, K]``, matrices ``[steps, K, K]``),
      ``device_loss`` [steps, K] (each device's training loss), ``train_loss`` [steps] (its mean
      over devices), ``fault_active`` bool [steps] and
      ``faulty_devices`` int [n] (empty for clean runs).
    """
    import jax

    names = [scenario_name(fault) for fault in faults]
    if len(set(names)) != len(names):
        raise ValueError(f"Two scenarios share a name: {names}")
    for fault in faults:
        if fault is not None:
            _fault_arrays(fault, k)  # validates the devices before compiling
    if out_path is not None:  # fail before the runs, not after
        directory = os.path.dirname(os.path.abspath(out_path))
        os.makedirs(directory, exist_ok=True)
        if not os.access(directory, os.W_OK):
            raise PermissionError(f"Cannot write {out_path!r}: directory {directory!r} is not writable.")
    program = _program(k, steps)
    if verbose:
        print(f"K={k} steps={steps}: compiled in {COMPILE_SECONDS[(k, steps)]:.1f}s", flush=True)
    runs: Runs = {}
    for fault, name in zip(faults, names):
        arrays = _fault_arrays(fault, k)
        for seed in seeds:
            began = time.perf_counter()
            out, losses = jax.device_get(program(np.int32(seed), arrays))
            seconds = time.perf_counter() - began
            metrics = {metric: np.asarray(value) for metric, value in out.items()}
            metrics["device_loss"] = np.asarray(losses).T
            metrics["train_loss"] = metrics["device_loss"].mean(axis=1)
            metrics["fault_active"] = np.zeros(steps, bool) if fault is None else fault.active(steps)
            metrics["faulty_devices"] = np.asarray([] if fault is None else fault.devices, np.int64)
            runs[(name, int(seed))] = metrics
            if verbose:
                s = summarize(metrics)
                names = f"faulty named {s['hit_active']:6.1%} while active, {s['hit_after']:6.1%} after start"
                if fault is None:
                    names = f"a device named (false alarm) on {s['named']:6.1%} of audits"
                print(
                    f"K={k} {name:36s} seed={seed} {seconds:6.2f}s  median outlier_score before/after "
                    f"{s['score_before']:6.2f} {s['score_after']:8.3g}  max {s['score_max']:8.3g}  {names}",
                    flush=True,
                )
    if out_path is not None:
        save(runs, out_path)
    return runs


def save(runs: Runs, out_path: str) -> None:
    """Writes ``runs`` to one ``.npz`` (an index of (scenario, seed, metric) and one array each)."""
    arrays: dict[str, np.ndarray] = {}
    index = []
    for (name, seed), metrics in runs.items():
        for metric, value in metrics.items():
            slot = f"a{len(index)}"
            index.append([name, seed, metric, slot])
            arrays[slot] = value
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    np.savez_compressed(out_path, __index__=np.asarray(json.dumps(index)), **arrays)


def load(out_path: str) -> Runs:
    """Reads what :func:`record` saved: ``{(scenario name, seed): {metric: array}}``."""
    runs: Runs = {}
    with np.load(out_path) as data:
        for name, seed, metric, slot in json.loads(str(data["__index__"])):
            runs.setdefault((name, int(seed)), {})[metric] = data[slot]
    return runs


# ----------------------------------------------------------------------------- processes
_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


def _xla_flags(k: int, flags: str | None) -> str:
    """``flags`` with the host device count set to ``k``."""
    rest = _COUNT_FLAG.sub("", flags or "").split()
    return " ".join([*rest, f"--xla_force_host_platform_device_count={k}"])


def record_in_subprocess(
    k: int,
    quick: bool,
    steps: int,
    seeds: Sequence[int],
    out_path: str,
    fault_seeds: Sequence[int] | None = None,
    family: str = "classifier",
) -> None:
    """Runs this file's CLI in a fresh process with K CPU devices and waits for it.

    Clean runs use ``seeds``, fault runs ``fault_seeds`` (default: the same); ``family``
    is ``'classifier'`` (:func:`record`, ``steps`` per run) or ``'regression'``
    (:func:`record_regression`, :data:`REG_STEPS` per run). Its stdout (one line per run)
    passes through; raises ``RuntimeError`` with its stderr when it fails.
    """
    env = dict(os.environ)
    env["XLA_FLAGS"] = _xla_flags(k, env.get("XLA_FLAGS"))
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    command = [sys.executable, os.path.abspath(__file__), "--devices", str(k), "--steps", str(steps), "--out", out_path]
    command += ["--seeds", *map(str, seeds), "--family", family] + (["--quick"] if quick else [])
    if fault_seeds is not None:
        command += ["--fault-seeds", *map(str, fault_seeds)]
    done = subprocess.run(command, env=env, cwd=root, stderr=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stderr}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, required=True, help="K, devices on the data axis")
    parser.add_argument("--quick", action="store_true", help="the quick (CI) scenario set")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 300 quick, 1000 full)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 quick, 0 1 2 full)")
    parser.add_argument("--fault-seeds", type=int, nargs="+", default=None, help="seeds of the fault runs")
    parser.add_argument("--out", required=True, help="the .npz to write")
    parser.add_argument("--family", choices=("classifier", "regression"), default="classifier", help="the model")
    args = parser.parse_args(argv)
    if "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = _xla_flags(args.devices, os.environ.get("XLA_FLAGS"))
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    steps = args.steps if args.steps is not None else 300 if args.quick else 1000
    seeds = args.seeds if args.seeds is not None else [0] if args.quick else [0, 1, 2]
    began = time.perf_counter()
    every = scenarios(args.quick)
    if args.family == "regression":
        save(record_regression(args.devices, args.quick, seeds, args.fault_seeds or seeds), args.out)
    elif args.fault_seeds is None:
        record(args.devices, every, steps, seeds, args.out, verbose=True)
    else:
        runs = record(args.devices, [f for f in every if f is None], steps, seeds, verbose=True)
        runs.update(record(args.devices, [f for f in every if f is not None], steps, args.fault_seeds, verbose=True))
        save(runs, args.out)
    print(f"K={args.devices}: {time.perf_counter() - began:.1f}s in all, saved {args.out}", flush=True)


if __name__ == "__main__":
    main()
