"""Single-device scenario library of the detection benchmark: clean runs and guarded runs with faults.

Three small model families train on data generated inside a jitted ``lax.scan`` (one PRNG key per
step, no host data loop), so that a 10_000-step run takes seconds on a CPU:

* ``'mlp_regression'``: a tanh MLP (2 x 64) regressing a fixed random teacher network plus noise.
* ``'classifier'``: a ReLU MLP (2 x 64) softmax classifier on a 10-class Gaussian mixture with
  10% label noise.
* ``'char_transformer'``: a 1-block pre-LN decoder-only transformer in plain JAX (dim 32, 4 heads,
  sequence length 32, batch 16; a second block would double its cost) on
  ``optax_gradhealth.demo.load_corpus()`` (the standard library's Python sources), random windows
  sliced on device.
* ``'classifier_finite'``: the classifier on a fixed dataset of 1,024 examples, reshuffled every
  epoch, batch 8 (the other families draw a fresh batch every step): a model that memorises its
  data, whose gradient norm is far noisier (the spike rule's z-score condition decides there).

What it provides:

* :class:`CleanSpec` and :func:`clean_specs`: the clean scenarios (family x optimizer, learning
  rate, schedule, clip x seed).
* :func:`record_clean`: one plain-optax run (no guard) -> per-step pre-clip global gradient norm
  and batch loss. Learning rate, clip threshold and seed are traced arguments: one compilation
  per (family, optimizer, schedule, steps).
* :class:`Fault` and :func:`record_guarded`: the same run with ``make_tx(inner)`` (e.g.
  ``lambda inner: gh.guard(inner, clip=1.0)``) and faults injected inside the scan from per-step
  arrays (so fault lists never recompile) -> every scalar ``gh.metrics`` entry per step, plus
  ``'loss'``, ``'fault'`` and ``'params_finite'``. A clean spec and a guarded run of it with no
  faults see the same initial parameters and the same batches.

Usage (``benchmarks/`` is not a package)::

    sys.path.insert(0, 'benchmarks'); import detection_runs
    out = detection_runs.record_clean(detection_runs.clean_specs(quick=True)[0])

    python benchmarks/detection_runs.py [--quick] [--family F]   # record the clean set, one line per spec
    python benchmarks/detection_runs.py --check-faults [--steps 2000]   # guarded runs with scripted faults
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_gradhealth as gh

__all__ = [
    "CHECK_FAULTS",
    "FAMILIES",
    "FAULT_KINDS",
    "LOOP_FAMILIES",
    "OPTIMIZERS",
    "SCHEDULES",
    "CleanSpec",
    "Fault",
    "check_faults",
    "clean_specs",
    "main",
    "record_clean",
    "record_guarded",
    "summarize_clean",
]

FAMILIES = ("mlp_regression", "classifier", "char_transformer", "classifier_finite")
# Families trained with the guard in the loop only (not in the clean replay tables).
LOOP_FAMILIES = ("classifier_memorise", "classifier_memorise_1k")
OPTIMIZERS = ("adam", "adamw", "sgd_momentum", "rmsprop")
SCHEDULES = ("constant", "warmup_cosine", "warmup_linear")
FAULT_KINDS = ("nan", "inf", "scale", "loss_spike", "lr_spike")

FULL_STEPS = 10_000
QUICK_STEPS = 2_000
SEEDS = (0, 1, 2)

# ---------------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class CleanSpec:
    """One clean scenario: a model family trained by a plain optax optimizer.

    ``clip`` is a global-norm threshold applied by ``optax.clip_by_global_norm`` in front of the
    optimizer in :func:`record_clean` (None: no clipping); :func:`record_guarded` ignores it (the
    caller's ``make_tx`` decides clipping). Schedules warm up linearly from 0 over
    ``steps // 20`` steps, then decay to 0 at ``steps`` (cosine or linear).
    """

    family: str
    optimizer: str
    learning_rate: float
    schedule: str
    clip: float | None
    seed: int
    steps: int

    def __post_init__(self) -> None:
        families = (*FAMILIES, *LOOP_FAMILIES)
        for field, allowed in (("family", families), ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"CleanSpec.{field} must be one of {allowed}, got {getattr(self, field)!r}.")
        if not self.learning_rate > 0:
            raise ValueError(f"CleanSpec.learning_rate must be > 0, got {self.learning_rate!r}.")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"CleanSpec.clip must be None or > 0, got {self.clip!r}.")
        if self.steps < 1:
            raise ValueError(f"CleanSpec.steps must be >= 1, got {self.steps!r}.")

    @property
    def name(self) -> str:
        """E.g. ``'mlp_regression/adam/1e-3/constant/clip1/s0/10k'`` (the step count last)."""
        clip = "noclip" if self.clip is None else f"clip{self.clip:g}"
        steps = f"{self.steps // 1000}k" if self.steps % 1000 == 0 else str(self.steps)
        learning_rate = _short_float(self.learning_rate)
        return "/".join((self.family, self.optimizer, learning_rate, self.schedule, clip, f"s{self.seed}", steps))


def _short_float(x: float) -> str:
    """1e-3, 3e-2, 2.5e-4, 1: a learning rate in a name."""
    mantissa, exponent = f"{x:.4e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    exponent_value = int(exponent)
    return mantissa if exponent_value == 0 else f"{mantissa}e{exponent_value}"


# (optimizer, learning rate, schedule, clip) per family: a baseline, a warm-up + decay schedule
# with clipping, a second optimizer, and a high learning rate that still trains. The transformer
# (by far the slowest family) has three, one of them both warm-up + decay and high.
_COMBOS: dict[str, tuple[tuple[str, float, str, float | None], ...]] = {
    "mlp_regression": (
        ("adam", 1e-3, "constant", None),
        ("adamw", 3e-3, "warmup_cosine", 1.0),
        ("sgd_momentum", 3e-2, "warmup_linear", None),
        ("adam", 1e-2, "constant", 1.0),
    ),
    "classifier": (
        ("adam", 1e-3, "constant", None),
        ("adamw", 3e-3, "warmup_cosine", 1.0),
        ("sgd_momentum", 1e-1, "warmup_linear", None),
        ("rmsprop", 1e-2, "constant", 1.0),
    ),
    "char_transformer": (
        ("adam", 1e-3, "constant", None),
        ("sgd_momentum", 1e-1, "warmup_cosine", 1.0),
        ("adamw", 1e-2, "warmup_linear", 1.0),
    ),
    # Batch 8 on 1,024 examples: every run memorises its data (the loss ends near 0). Adam's runs
    # and the slower SGD run swing by a window spread of about 0.4; the faster SGD run by about
    # 0.8, its clean norms reaching 65-190x their baseline, where only the z-score condition
    # keeps the rule quiet.
    "classifier_finite": (
        ("adam", 1e-3, "constant", None),
        ("adam", 3e-3, "warmup_cosine", None),
        ("sgd_momentum", 1e-2, "warmup_cosine", None),
        ("sgd_momentum", 3e-2, "warmup_linear", None),
    ),
}

# The quick (CI) set, seed 0: (family, index into _COMBOS[family]). Every family, four
# optimizers, the three schedules, clip on and off.
_QUICK: tuple[tuple[str, int], ...] = (
    ("mlp_regression", 0),
    ("mlp_regression", 2),
    ("classifier", 1),
    ("classifier", 3),
    ("char_transformer", 0),
    ("classifier_finite", 3),
)


def clean_specs(quick: bool = False) -> list[CleanSpec]:
    """The clean scenarios.

    Full: (4 + 4 + 3 + 4) (optimizer, learning rate, schedule, clip) combinations for the MLP
    regression, the classifier, the char transformer and the small-data classifier, x 3 seeds,
    10_000 steps each (45 specs). Quick: 6 specs (every family), 2_000 steps, seed 0.
    """
    if quick:
        return [CleanSpec(family, *_COMBOS[family][i], seed=0, steps=QUICK_STEPS) for family, i in _QUICK]
    return [
        CleanSpec(family, *combo, seed=seed, steps=FULL_STEPS)
        for family in FAMILIES
        for combo in _COMBOS[family]
        for seed in SEEDS
    ]


@dataclasses.dataclass(frozen=True)
class Fault:
    """A fault injected at steps ``start .. start + length - 1`` of :func:`record_guarded`.

    * ``'nan'`` / ``'inf'``: one element of the first gradient leaf set to NaN / +Inf.
    * ``'scale'``: the whole gradient multiplied by ``factor`` (a burst: ``length > 1``).
    * ``'loss_spike'``: the batch is corrupted. Regression: targets x ``factor``. Classifier:
      inputs x ``factor`` and labels shuffled within the batch. Char transformer: tokens replaced
      by uniformly random tokens and the per-token loss weights x ``factor`` (a mis-decoded shard
      with a wrong weighting, as in ``optax_gradhealth.demo``). The gradient is whatever the
      corrupted batch produces.
    * ``'lr_spike'``: the update returned by the optimizer multiplied by ``factor`` before it is
      applied.

    Overlapping faults combine (their factors multiply).
    """

    kind: str
    start: int
    length: int = 1
    factor: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"Fault.kind must be one of {FAULT_KINDS}, got {self.kind!r}.")
        if self.start < 0 or self.length < 1:
            raise ValueError(f"Fault needs start >= 0 and length >= 1, got {self.start!r}, {self.length!r}.")


# ---------------------------------------------------------------------------- model families


class _Batch(NamedTuple):
    inputs: jax.Array  # float features, or int32 tokens [B, T + 1]
    targets: jax.Array  # float targets, int32 labels, or a float32 scalar loss weight (transformer)


class _Family(NamedTuple):
    init: Callable[[jax.Array], Any]  # key -> params
    setup: Callable[[], Any]  # -> constants of the task (teacher, class means), built once per run
    # (data key, step, consts, data, corrupt, factor) -> batch; corrupt None: clean
    sample: Callable[..., _Batch]
    loss: Callable[[Any, _Batch], jax.Array]  # (params, batch) -> scalar


def _dense(key: jax.Array, fan_in: int, fan_out: int, scale: float = 1.0) -> dict[str, jax.Array]:
    w = scale * jax.random.normal(key, (fan_in, fan_out), jnp.float32) / math.sqrt(fan_in)
    return {"w": w, "b": jnp.zeros((fan_out,), jnp.float32)}


def _mlp_init(key: jax.Array, sizes: Sequence[int]) -> list[dict[str, jax.Array]]:
    keys = jax.random.split(key, len(sizes) - 1)
    return [_dense(k, a, b) for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def _mlp_apply(
    layers: Sequence[dict[str, jax.Array]], x: jax.Array, act: Callable[[jax.Array], jax.Array]
) -> jax.Array:
    for layer in layers[:-1]:
        x = act(x @ layer["w"] + layer["b"])
    return x @ layers[-1]["w"] + layers[-1]["b"]


# Fixed task constants (the same for every seed): the seed varies the initialisation and the batches.
_TASK_KEY = 20240601

# -- mlp_regression: y = teacher(x) + noise, x ~ N(0, I_8), 4 outputs.
_REG_IN, _REG_HIDDEN, _REG_OUT, _REG_BATCH, _REG_NOISE = 8, 64, 4, 32, 0.1


def _reg_setup() -> Any:
    key = jax.random.key(_TASK_KEY)
    return [_dense(k, a, b, scale=s) for k, a, b, s in zip(jax.random.split(key, 2), (8, 32), (32, 4), (2.0, 1.5))]


def _reg_sample(key: jax.Array, teacher: Any, data: Any, corrupt: jax.Array | None, factor: jax.Array) -> _Batch:
    del data
    kx, kn = jax.random.split(key)
    x = jax.random.normal(kx, (_REG_BATCH, _REG_IN), jnp.float32)
    y = _mlp_apply(teacher, x, jnp.tanh) + _REG_NOISE * jax.random.normal(kn, (_REG_BATCH, _REG_OUT), jnp.float32)
    if corrupt is not None:
        y = y * jnp.where(corrupt, factor, 1.0)
    return _Batch(x, y)


def _reg_loss(params: Any, batch: _Batch) -> jax.Array:
    return jnp.mean(jnp.square(_mlp_apply(params, batch.inputs, jnp.tanh) - batch.targets))


# -- classifier: 10-class Gaussian mixture in 16 dimensions, 10% of the labels uniformly random.
_CLS_IN, _CLS_HIDDEN, _CLS_CLASSES, _CLS_BATCH, _CLS_SPREAD, _CLS_LABEL_NOISE = 16, 64, 10, 64, 0.6, 0.1


def _cls_setup() -> jax.Array:
    return _CLS_SPREAD * jax.random.normal(jax.random.key(_TASK_KEY + 1), (_CLS_CLASSES, _CLS_IN), jnp.float32)


def _cls_sample(key: jax.Array, means: jax.Array, data: Any, corrupt: jax.Array | None, factor: jax.Array) -> _Batch:
    del data
    kc, kx, kn, kr, kp = jax.random.split(key, 5)
    classes = jax.random.randint(kc, (_CLS_BATCH,), 0, _CLS_CLASSES)
    x = means[classes] + jax.random.normal(kx, (_CLS_BATCH, _CLS_IN), jnp.float32)
    noisy = jax.random.bernoulli(kn, _CLS_LABEL_NOISE, (_CLS_BATCH,))
    labels = jnp.where(noisy, jax.random.randint(kr, (_CLS_BATCH,), 0, _CLS_CLASSES), classes)
    if corrupt is not None:
        x = x * jnp.where(corrupt, factor, 1.0)
        labels = jnp.where(corrupt, jax.random.permutation(kp, labels), labels)
    return _Batch(x, labels)


def _cls_loss(params: Any, batch: _Batch) -> jax.Array:
    logits = _mlp_apply(params, batch.inputs, jax.nn.relu)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch.targets))


# -- char_transformer: next-character prediction on the standard library's sources.
_TF_DIM, _TF_HEADS, _TF_LAYERS, _TF_SEQ, _TF_BATCH = 32, 4, 1, 32, 16


@functools.cache
def _vocab_size() -> int:
    from optax_gradhealth import demo

    return demo.VOCAB_SIZE


@functools.cache
def _corpus() -> jax.Array:
    """The demo's corpus (1 MB of token ids), put on the device once."""
    from optax_gradhealth import demo

    return jax.device_put(np.asarray(demo.load_corpus(), np.int32))


def _tf_init(key: jax.Array) -> dict[str, Any]:
    d, v = _TF_DIM, _vocab_size()
    keys = iter(jax.random.split(key, 3 + 4 * _TF_LAYERS))
    ones, zeros = jnp.ones((d,), jnp.float32), jnp.zeros((d,), jnp.float32)
    blocks = []
    for _ in range(_TF_LAYERS):
        blocks.append(
            {
                "ln1": {"scale": ones, "bias": zeros},
                "qkv": _dense(next(keys), d, 3 * d),
                "proj": _dense(next(keys), d, d, scale=1 / math.sqrt(2 * _TF_LAYERS)),
                "ln2": {"scale": ones, "bias": zeros},
                "fc1": _dense(next(keys), d, 4 * d),
                "fc2": _dense(next(keys), 4 * d, d, scale=1 / math.sqrt(2 * _TF_LAYERS)),
            }
        )
    return {
        "embed": 0.1 * jax.random.normal(next(keys), (v, d), jnp.float32),
        "pos": 0.02 * jax.random.normal(next(keys), (_TF_SEQ, d), jnp.float32),
        "blocks": blocks,
        "ln_f": {"scale": ones, "bias": zeros},
        "head": _dense(next(keys), d, v),
    }


def _layer_norm(x: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def _linear(x: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
    return x @ p["w"] + p["b"]


def _tf_logits(params: dict[str, Any], tokens: jax.Array) -> jax.Array:
    batch, length = tokens.shape
    head_dim = _TF_DIM // _TF_HEADS
    x = jnp.take(params["embed"], tokens, axis=0) + params["pos"][:length]
    causal = jnp.tril(jnp.ones((length, length), jnp.bool_))
    for block in params["blocks"]:
        qkv = _linear(_layer_norm(x, block["ln1"]), block["qkv"]).reshape(batch, length, 3, _TF_HEADS, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
        attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, _TF_DIM)
        x = x + _linear(attended, block["proj"])
        x = x + _linear(jax.nn.gelu(_linear(_layer_norm(x, block["ln2"]), block["fc1"])), block["fc2"])
    return _linear(_layer_norm(x, params["ln_f"]), params["head"])


def _tf_setup() -> None:
    return None


def _tf_sample(key: jax.Array, consts: Any, corpus: jax.Array, corrupt: jax.Array | None, factor: jax.Array) -> _Batch:
    del consts
    ks, kr = jax.random.split(key)
    starts = jax.random.randint(ks, (_TF_BATCH,), 0, corpus.shape[0] - _TF_SEQ - 1)
    tokens = jax.vmap(lambda s: jax.lax.dynamic_slice(corpus, (s,), (_TF_SEQ + 1,)))(starts)
    weight = jnp.ones((), jnp.float32)
    if corrupt is not None:
        noise = jax.random.randint(kr, tokens.shape, 1, _vocab_size(), jnp.int32)
        tokens = jnp.where(corrupt, noise, tokens)
        weight = jnp.where(corrupt, factor, 1.0).astype(jnp.float32)
    return _Batch(tokens, weight)


def _tf_loss(params: dict[str, Any], batch: _Batch) -> jax.Array:
    tokens = batch.inputs
    logits = _tf_logits(params, tokens[:, :-1])
    return batch.targets * jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]))


def _per_step(sample: Callable[..., _Batch]) -> Callable[..., _Batch]:
    """A sampler of fresh i.i.d. batches: step t's batch from ``fold_in(data key, t)``."""

    def sample_at(data_key: jax.Array, step: jax.Array, *args: Any) -> _Batch:
        return sample(jax.random.fold_in(data_key, step), *args)

    return sample_at


# -- classifier_finite: the classifier's task on a fixed dataset of 1,024 examples (drawn once
# from the same mixture, 10% of the labels random), reshuffled every epoch, batch 8. The model
# memorises it: most batches' losses fall near 0 while a batch holding an unfit example stays
# far above, and the gradient norm swings by a window spread of 0.35-0.9 (log) from step to step.
# This is the noisy regime where the spike rule's z-score condition decides (spread > ln 5 / 6).
_FIN_SIZE, _FIN_BATCH = 1024, 8


def _fin_setup() -> tuple[jax.Array, jax.Array, jax.Array]:
    means = _cls_setup()
    kc, kx, kn, kr = jax.random.split(jax.random.key(_TASK_KEY + 2), 4)
    classes = jax.random.randint(kc, (_FIN_SIZE,), 0, _CLS_CLASSES)
    x = means[classes] + jax.random.normal(kx, (_FIN_SIZE, _CLS_IN), jnp.float32)
    noisy = jax.random.bernoulli(kn, _CLS_LABEL_NOISE, (_FIN_SIZE,))
    labels = jnp.where(noisy, jax.random.randint(kr, (_FIN_SIZE,), 0, _CLS_CLASSES), classes)
    return means, x, labels


def _fin_sample(
    data_key: jax.Array, step: jax.Array, consts: Any, data: Any, corrupt: jax.Array | None, factor: jax.Array
) -> _Batch:
    del data
    _, inputs, labels = consts
    per_epoch = _FIN_SIZE // _FIN_BATCH
    # The seed's order of the examples in this epoch (a key of its own, apart from the steps').
    epoch_key = jax.random.fold_in(jax.random.fold_in(data_key, 2**31 - 1), step // per_epoch)
    order = jax.random.permutation(epoch_key, _FIN_SIZE)
    index = jax.lax.dynamic_slice(order, ((step % per_epoch) * _FIN_BATCH,), (_FIN_BATCH,))
    x, y = inputs[index], labels[index]
    if corrupt is not None:
        kp = jax.random.fold_in(data_key, step)
        x = x * jnp.where(corrupt, factor, 1.0)
        y = jnp.where(corrupt, jax.random.permutation(kp, y), y)
    return _Batch(x, y)


# -- classifier_memorise (256 examples) and classifier_memorise_1k (1,024): a wider ReLU MLP
# (32 -> 128 -> 128 -> 10, He initialisation) on a 10-class Gaussian mixture in 32 dimensions,
# a fixed dataset drawn once (10% of the labels random), batch 32 drawn with replacement. With
# Adam at 3e-3 the model fits the clean examples within a few hundred steps and the
# label-noise ones last, so a batch holding one of those stands far above the others. Run
# with the guard in the loop only (``bench_detection.guarded_clean``): a skip there changes
# which examples get learned.
_MEM_IN, _MEM_HIDDEN, _MEM_BATCH = 32, 128, 32


def _mem_init(key: jax.Array) -> list[dict[str, jax.Array]]:
    k0, k1, k2 = jax.random.split(key, 3)
    he = math.sqrt(2.0)
    return [
        _dense(k0, _MEM_IN, _MEM_HIDDEN, he),
        _dense(k1, _MEM_HIDDEN, _MEM_HIDDEN, he),
        _dense(k2, _MEM_HIDDEN, _CLS_CLASSES),
    ]


def _mem_setup(size: int) -> Callable[[], tuple[jax.Array, jax.Array]]:
    def setup() -> tuple[jax.Array, jax.Array]:
        km, kc, kx, kn, kr = jax.random.split(jax.random.key(_TASK_KEY + 3), 5)
        means = _CLS_SPREAD * jax.random.normal(km, (_CLS_CLASSES, _MEM_IN), jnp.float32)
        classes = jax.random.randint(kc, (size,), 0, _CLS_CLASSES)
        x = means[classes] + jax.random.normal(kx, (size, _MEM_IN), jnp.float32)
        noisy = jax.random.bernoulli(kn, _CLS_LABEL_NOISE, (size,))
        labels = jnp.where(noisy, jax.random.randint(kr, (size,), 0, _CLS_CLASSES), classes)
        return x, labels

    return setup


def _mem_sample(
    data_key: jax.Array, step: jax.Array, consts: Any, data: Any, corrupt: jax.Array | None, factor: jax.Array
) -> _Batch:
    del data, corrupt, factor  # clean runs only
    inputs, labels = consts
    index = jax.random.randint(jax.random.fold_in(data_key, step), (_MEM_BATCH,), 0, inputs.shape[0])
    return _Batch(inputs[index], labels[index])


_FAMILY_IMPLS: dict[str, _Family] = {
    "mlp_regression": _Family(
        lambda key: _mlp_init(key, (_REG_IN, _REG_HIDDEN, _REG_HIDDEN, _REG_OUT)),
        _reg_setup,
        _per_step(_reg_sample),
        _reg_loss,
    ),
    "classifier": _Family(
        lambda key: _mlp_init(key, (_CLS_IN, _CLS_HIDDEN, _CLS_HIDDEN, _CLS_CLASSES)),
        _cls_setup,
        _per_step(_cls_sample),
        _cls_loss,
    ),
    "char_transformer": _Family(_tf_init, _tf_setup, _per_step(_tf_sample), _tf_loss),
    "classifier_finite": _Family(
        lambda key: _mlp_init(key, (_CLS_IN, _CLS_HIDDEN, _CLS_HIDDEN, _CLS_CLASSES)),
        _fin_setup,
        _fin_sample,
        _cls_loss,
    ),
    "classifier_memorise": _Family(_mem_init, _mem_setup(256), _mem_sample, _cls_loss),
    "classifier_memorise_1k": _Family(_mem_init, _mem_setup(1024), _mem_sample, _cls_loss),
}


def _family_data(family: str) -> jax.Array | None:
    return _corpus() if family == "char_transformer" else None


# ---------------------------------------------------------------------------- optimizers


def _schedule(name: str, learning_rate: jax.Array, steps: int) -> optax.Schedule | jax.Array:
    """Constant, or a linear warm-up from 0 over ``steps // 20`` steps then a cosine / linear decay
    to 0 at ``steps``. ``learning_rate`` may be traced."""
    if name == "constant":
        return learning_rate
    warmup = max(1, steps // 20)
    decay_steps = max(1, steps - warmup)

    def schedule(count: jax.Array) -> jax.Array:
        t = count.astype(jnp.float32)
        frac = jnp.clip((t - warmup) / decay_steps, 0.0, 1.0)
        decay = 0.5 * (1.0 + jnp.cos(jnp.pi * frac)) if name == "warmup_cosine" else 1.0 - frac
        return learning_rate * jnp.where(t < warmup, t / warmup, decay)

    return schedule


def _optimizer(name: str, learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    if name == "adam":
        return optax.adam(learning_rate)
    if name == "adamw":
        return optax.adamw(learning_rate, weight_decay=0.01)
    if name == "sgd_momentum":
        return optax.sgd(learning_rate, momentum=0.9)
    if name == "rmsprop":
        return optax.rmsprop(learning_rate, decay=0.99, eps=1e-8)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


def _global_norm(tree: Any) -> jax.Array:
    """float32 sqrt of the float32 sum of squares of every element."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def _keys(seed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(init key, data key) of a seed; step t's batch uses ``fold_in(data key, t)``. A batch's
    samplers split that key into fixed parts, the corruption's own randomness (shuffle, random
    tokens) from a part of its own, so a guarded run draws exactly the clean run's batches."""
    key = jax.random.key(seed)
    return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)


# ---------------------------------------------------------------------------- clean runs


@functools.cache
def _clean_runner(family: str, optimizer: str, schedule: str, steps: int) -> Callable[..., Any]:
    """jit(learning_rate, max_norm, seed, data) -> (norms [T], losses [T]); max_norm inf: no clip."""
    fam = _FAMILY_IMPLS[family]

    def run(learning_rate: jax.Array, max_norm: jax.Array, seed: jax.Array, data: Any):
        init_key, data_key = _keys(seed)
        params = fam.init(init_key)
        consts = fam.setup()
        tx = optax.chain(
            optax.clip_by_global_norm(max_norm), _optimizer(optimizer, _schedule(schedule, learning_rate, steps))
        )

        def step(carry, t):
            params, state = carry
            batch = fam.sample(data_key, t, consts, data, None, 1.0)
            loss, grads = jax.value_and_grad(fam.loss)(params, batch)
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), (_global_norm(grads), loss)

        _, (norms, losses) = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps, dtype=jnp.int32))
        return norms, losses

    return jax.jit(run)


def record_clean(spec: CleanSpec) -> dict[str, np.ndarray]:
    """Runs ``spec`` with its plain optax optimizer (``clip_by_global_norm(spec.clip)`` first if
    set; no guard) in one jitted ``lax.scan``.

    Returns ``{'norm': float32 [T], 'loss': float32 [T]}``: the pre-clip global L2 gradient norm
    (float32) and the batch loss of every step.
    """
    runner = _clean_runner(spec.family, spec.optimizer, spec.schedule, spec.steps)
    max_norm = np.float32(np.inf if spec.clip is None else spec.clip)
    norms, losses = runner(np.float32(spec.learning_rate), max_norm, np.int32(spec.seed), _family_data(spec.family))
    return {"norm": np.asarray(norms, np.float32), "loss": np.asarray(losses, np.float32)}


# ---------------------------------------------------------------------------- guarded runs


class _FaultArrays(NamedTuple):
    """Per-step fault schedule: the scan's ``xs``, so that any fault list reuses one compilation."""

    step: np.ndarray  # int32
    grad_mult: np.ndarray  # float32, 1 = none
    nan: np.ndarray  # bool
    inf: np.ndarray  # bool
    corrupt: np.ndarray  # bool
    loss_factor: np.ndarray  # float32, 1 = none
    update_mult: np.ndarray  # float32, 1 = none


def _fault_arrays(faults: Sequence[Fault], steps: int) -> tuple[_FaultArrays, np.ndarray]:
    arrays = _FaultArrays(
        step=np.arange(steps, dtype=np.int32),
        grad_mult=np.ones(steps, np.float32),
        nan=np.zeros(steps, bool),
        inf=np.zeros(steps, bool),
        corrupt=np.zeros(steps, bool),
        loss_factor=np.ones(steps, np.float32),
        update_mult=np.ones(steps, np.float32),
    )
    injected = np.zeros(steps, bool)
    for fault in faults:
        if fault.start >= steps:
            raise ValueError(f"{fault} starts after the run's last step ({steps - 1}).")
        at = slice(fault.start, min(steps, fault.start + fault.length))
        injected[at] = True
        if fault.kind == "nan":
            arrays.nan[at] = True
        elif fault.kind == "inf":
            arrays.inf[at] = True
        elif fault.kind == "scale":
            arrays.grad_mult[at] *= fault.factor
        elif fault.kind == "loss_spike":
            arrays.corrupt[at] = True
            arrays.loss_factor[at] *= fault.factor
        elif fault.kind == "lr_spike":
            arrays.update_mult[at] *= fault.factor
    return arrays, injected


def _poison_first_leaf(grads: Any, nan: jax.Array, inf: jax.Array) -> Any:
    """Sets element 0 of the first gradient leaf to NaN (``nan``) or +Inf (``inf``)."""
    leaves, treedef = jax.tree.flatten(grads)
    first = leaves[0]
    index = (0,) * first.ndim
    value = jnp.where(nan, jnp.nan, jnp.where(inf, jnp.inf, first[index])).astype(first.dtype)
    return treedef.unflatten([first.at[index].set(value), *leaves[1:]])


def _scalar_metric_names(state: Any) -> list[str]:
    return [
        name
        for name, value in gh.metrics(state).items()
        if not name.startswith("grad/leaf_norm/") and jnp.shape(value) == ()
    ]


MakeTx = Callable[[optax.GradientTransformation], optax.GradientTransformation]


@functools.lru_cache(maxsize=32)
def _guarded_runner(family: str, optimizer: str, schedule: str, steps: int, make_tx: MakeTx) -> Callable[..., Any]:
    """jit(learning_rate, seed, data, fault arrays) -> {name: [T]}. Cached on ``make_tx``'s
    identity: pass the same function object to reuse the compilation."""
    fam = _FAMILY_IMPLS[family]

    def run(learning_rate: jax.Array, seed: jax.Array, data: Any, xs: _FaultArrays) -> dict[str, jax.Array]:
        init_key, data_key = _keys(seed)
        params = fam.init(init_key)
        consts = fam.setup()
        inner = _optimizer(optimizer, _schedule(schedule, learning_rate, steps))
        tx = optax.with_extra_args_support(make_tx(inner))
        state = tx.init(params)
        names = _scalar_metric_names(state)  # at trace time: metrics added later are picked up

        def step(carry, x: _FaultArrays):
            params, state = carry
            batch = fam.sample(data_key, x.step, consts, data, x.corrupt, x.loss_factor)
            loss, grads = jax.value_and_grad(fam.loss)(params, batch)
            grads = _poison_first_leaf(grads, x.nan, x.inf)
            grads = jax.tree.map(lambda g: g * x.grad_mult.astype(g.dtype), grads)
            updates, state = tx.update(grads, state, params, loss=loss)
            updates = jax.tree.map(lambda u: u * x.update_mult.astype(u.dtype), updates)
            params = optax.apply_updates(params, updates)
            metrics = gh.metrics(state)
            out = {name: metrics[name] for name in names}
            out["loss"] = loss
            out["params_finite"] = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
            return (params, state), out

        _, outs = jax.lax.scan(step, (params, state), xs)
        return outs

    return jax.jit(run)


def record_guarded(spec: CleanSpec, make_tx: MakeTx, faults: Sequence[Fault] = ()) -> dict[str, np.ndarray]:
    """Runs ``spec`` with ``make_tx(inner)`` and the ``faults`` injected inside one jitted scan.

    ``inner`` is the spec's optimizer and schedule WITHOUT ``spec.clip`` (``make_tx`` decides the
    clipping, e.g. ``lambda inner: gh.guard(inner, clip=1.0)``). Each step: the batch (corrupted
    on ``'loss_spike'`` steps), its loss and gradient, NaN/Inf set into one element, the gradient
    scaled, ``tx.update(grads, state, params, loss=loss)``, the update scaled on ``'lr_spike'``
    steps, then applied. Without faults the run sees the same initial parameters and batches as
    :func:`record_clean` of the same spec.

    The compilation is cached per (family, optimizer, schedule, steps, ``make_tx``) with
    ``make_tx`` by identity: reuse one function object across calls (and fault lists) to compile
    once; a fresh lambda per call recompiles.

    Returns per-step numpy arrays [T]: every scalar entry of ``gh.metrics(state)`` after the step
    (``'grad/norm'``, ``'grad/spiked'``, ``'grad/skipped'``, ...; not ``'grad/leaf_norm/...'``),
    ``'loss'`` (the batch loss, corrupted where injected), ``'fault'`` (bool: a fault was injected
    at the step) and ``'params_finite'`` (bool: every parameter is finite after the step).
    """
    xs, injected = _fault_arrays(faults, spec.steps)
    runner = _guarded_runner(spec.family, spec.optimizer, spec.schedule, spec.steps, make_tx)
    outs = runner(np.float32(spec.learning_rate), np.int32(spec.seed), _family_data(spec.family), xs)
    result = {name: np.asarray(value) for name, value in jax.device_get(outs).items()}
    result["fault"] = injected
    return result


# ---------------------------------------------------------------------------- command line

CHECK_FAULTS = (
    Fault("nan", 500),
    Fault("inf", 700),
    Fault("scale", 900, factor=10.0),
    Fault("scale", 1100, factor=100.0),
    Fault("scale", 1300, length=20, factor=10.0),
    Fault("loss_spike", 1500, factor=100.0),
    Fault("lr_spike", 1700, factor=30.0),
)


def _guard_clip1(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    return gh.guard(inner, clip=1.0)


def summarize_clean(spec: CleanSpec, out: dict[str, np.ndarray], seconds: float) -> str:
    """One line: name, steps, seconds, first / last 500 steps' mean loss, median norm, p99.99 / median."""
    loss, norm = out["loss"], out["norm"]
    window = min(500, spec.steps)
    median = float(np.median(norm))
    tail = float(np.percentile(norm, 99.99)) / median if median > 0 else float("nan")
    return (
        f"{spec.name:58s} {spec.steps:6d} {seconds:7.2f}s  loss {loss[:window].mean():8.4f} -> "
        f"{loss[-window:].mean():8.4f}  median norm {median:9.4g}  p99.99/median {tail:6.2f}"
    )


def _flags(out: dict[str, np.ndarray], name: str, at: slice) -> str:
    values = out[name][at].astype(int) if name in out else np.zeros(0, int)
    return "".join(map(str, values)) if values.size <= 5 else f"{values.sum()}/{values.size}"


def check_faults(spec: CleanSpec, faults: Sequence[Fault] = CHECK_FAULTS, make_tx: MakeTx = _guard_clip1) -> None:
    """Prints, for each fault, the guard's finite / spike / skipped flags at its steps and the
    spike / skipped flags of the 5 steps after it, and whether the parameters stayed finite."""
    started = time.perf_counter()
    out = record_guarded(spec, make_tx, faults)
    seconds = time.perf_counter() - started
    print(f"{spec.name}: {seconds:.2f}s, params finite at every step: {bool(out['params_finite'].all())}")
    for fault in faults:
        at = slice(fault.start, fault.start + fault.length)
        after = slice(at.stop, at.stop + 5)
        what = f"{fault.kind}{'' if fault.factor == 1 else f' x{fault.factor:g}'}@{fault.start}"
        what += f":{fault.length}" if fault.length > 1 else ""
        norm, loss = out["grad/norm"][at], out["loss"][at]
        print(
            f"  {what:22s} finite {_flags(out, 'grad/finite', at):6s} spike {_flags(out, 'grad/spiked', at):6s} "
            f"skipped {_flags(out, 'grad/skipped', at):6s} | next 5: spike {_flags(out, 'grad/spiked', after)} "
            f"skipped {_flags(out, 'grad/skipped', after)} | norm {np.max(norm):9.4g} loss {np.max(loss):9.4g}"
        )
    clean = ~out["fault"]
    print(
        f"  non-fault steps: {int(clean.sum())}, spikes {int(out['grad/spiked'][clean].sum())}, "
        f"skipped {int(out['grad/skipped'][clean].sum())}, clipped {int(out['grad/clipped'][clean].sum())}; "
        f"loss {out['loss'][:500].mean():.4f} -> {out['loss'][-200:].mean():.4f}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick (CI) set: 6 specs of 2_000 steps")
    parser.add_argument("--family", action="append", choices=FAMILIES, help="only this family (repeatable)")
    parser.add_argument(
        "--check-faults",
        action="store_true",
        help="instead: guarded runs (gh.guard(inner, clip=1.0)) of each family with scripted faults",
    )
    parser.add_argument("--steps", type=int, default=QUICK_STEPS, help="steps of the --check-faults runs")
    args = parser.parse_args(argv)
    families = args.family or FAMILIES
    if args.check_faults:
        for family in families:
            combo = _COMBOS[family][0]
            faults = [fault for fault in CHECK_FAULTS if fault.start < args.steps]
            check_faults(CleanSpec(family, *combo, seed=0, steps=args.steps), faults)
        return
    specs = [spec for spec in clean_specs(args.quick) if spec.family in families]
    total = time.perf_counter()
    for spec in specs:
        started = time.perf_counter()
        out = record_clean(spec)
        print(summarize_clean(spec, out, time.perf_counter() - started), flush=True)
    print(f"{len(specs)} specs in {time.perf_counter() - total:.1f}s")


if __name__ == "__main__":
    main(sys.argv[1:])
