"""The demo: a small character-level transformer (Flax NNX) trained on the Python
standard library's own source files, with scripted faults, guarded by ``gh.guard``.

Run ``python -m optax_gradhealth.demo`` (about a minute on a laptop CPU). It shows a
progress bar with the loss and the gradient norm, injects a NaN batch, a corrupted
batch and a learning-rate spike, restores the last healthy snapshot (one followed by
a snapshot interval without a skipped step) if the guard recommends a rollback (the
default faults usually stop short of one: at most 7 spikes in a row, below its
``rollback_after_spikes=8``), prints the diagnosis and writes ``run.jsonl``,
``report.png`` and the findings into the current folder (or ``--out DIR``).

The model, the data and the training loop live here so that
``examples/char_transformer.py`` (the same run with ``--inject`` faults of your
choosing) is a thin command line over :func:`train`. Needs the ``examples`` extra
(``tqdm``, ``matplotlib``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import os
import sys
import sysconfig
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_gradhealth as gh

__all__ = [
    "CharTransformer",
    "Fault",
    "TrainConfig",
    "load_corpus",
    "main",
    "parse_faults",
    "scale_by_fault_multiplier",
    "train",
]

# ---------------------------------------------------------------------------- data

# Vocabulary: index 0 for anything else, then tab, newline and printable ASCII.
_CHARS = "\t\n" + "".join(chr(c) for c in range(32, 127))
VOCAB_SIZE = len(_CHARS) + 1
_LOOKUP = np.zeros(256, np.int32)
for _i, _c in enumerate(_CHARS):
    _LOOKUP[ord(_c)] = _i + 1


def load_corpus(max_bytes: int = 1_000_000) -> np.ndarray:
    """Token ids of the standard library's top-level ``*.py`` files (sorted by name,
    concatenated until ``max_bytes``): a text corpus that ships with every Python."""
    stdlib = sysconfig.get_paths()["stdlib"]
    chunks, total = [], 0
    for path in sorted(glob.glob(os.path.join(stdlib, "*.py"))):
        with open(path, "rb") as file:
            data = file.read(max_bytes - total)
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not total:
        raise RuntimeError(f"no Python sources found under {stdlib!r}")
    return _LOOKUP[np.frombuffer(b"".join(chunks), np.uint8)]


class Batch(NamedTuple):
    tokens: np.ndarray  # int32 [B, T + 1]
    weights: np.ndarray  # float32 [B, T]: per-token loss weights (a float input a NaN can ride in on)


def sample_batch(corpus: np.ndarray, rng: np.random.Generator, batch_size: int, seq_len: int) -> Batch:
    starts = rng.integers(0, corpus.size - seq_len - 1, size=batch_size)
    tokens = np.stack([corpus[s : s + seq_len + 1] for s in starts])
    return Batch(tokens.astype(np.int32), np.ones((batch_size, seq_len), np.float32))


# ---------------------------------------------------------------------------- model


class Block(nnx.Module):
    """Pre-LN transformer block: causal self-attention and an MLP."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp_in = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.mlp_out = nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.ln2(x))))


class CharTransformer(nnx.Module):
    """A small decoder-only character model (embeddings, learned positions, blocks, head)."""

    def __init__(self, *, seq_len: int, dim: int = 64, heads: int = 4, layers: int = 2, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB_SIZE, dim, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq_len, dim)))
        self.blocks = nnx.List([Block(dim, heads, rngs=rngs) for _ in range(layers)])
        self.ln_f = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, VOCAB_SIZE, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        length = tokens.shape[-1]
        x = self.embed(tokens) + self.pos[:length]
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_f(x))


def loss_fn(model: CharTransformer, tokens: jax.Array, weights: jax.Array) -> jax.Array:
    logits = model(tokens[:, :-1])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return jnp.sum(losses * weights) / jnp.sum(jnp.ones_like(weights))


# ---------------------------------------------------------------------------- faults


@dataclasses.dataclass(frozen=True)
class Fault:
    """A scripted fault: ``kind`` at ``step`` for ``length`` steps.

    Kinds: ``'nan'`` (a NaN in the batch's loss weights), ``'corrupt'`` (the batch's
    text replaced by one repeated byte with 50x loss weights: what a truncated,
    zero-filled or mis-decoded shard does), ``'lr'`` (the learning rate multiplied by
    ``magnitude``, 100 by default).
    """

    kind: str
    step: int
    length: int = 1
    magnitude: float = 100.0

    def covers(self, step: int) -> bool:
        return self.step <= step < self.step + self.length


FAULT_KINDS = ("nan", "corrupt", "lr")
DEMO_FAULTS = "nan@100,corrupt@160,lr@220:3"


def parse_faults(spec: str) -> list[Fault]:
    """``'nan@100,corrupt@160,lr@220:3'`` -> faults (``kind@step[:length]``); '' -> none."""
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        kind, _, rest = item.partition("@")
        step, _, length = rest.partition(":")
        if kind not in FAULT_KINDS or not step.isdigit() or (length and not length.isdigit()):
            raise ValueError(
                f"bad fault {item!r}: expected kind@step[:length] with kind one of {FAULT_KINDS}, e.g. 'nan@120'."
            )
        faults.append(Fault(kind, int(step), int(length) if length else 1))
    return faults


class FaultMultiplierState(NamedTuple):
    """Nothing to remember."""


def scale_by_fault_multiplier() -> optax.GradientTransformationExtraArgs:
    """Multiplies the updates by the ``lr_multiplier=`` extra argument (1 when absent):
    how the demo injects a learning-rate spike without touching the schedule."""

    def init_fn(params):
        del params
        return FaultMultiplierState()

    def update_fn(updates, state, params=None, *, lr_multiplier=None, **extra):
        del params, extra
        if lr_multiplier is None:
            return updates, state
        return jax.tree.map(lambda u: u * jnp.asarray(lr_multiplier, u.dtype), updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _apply_faults(batch: Batch, faults: Sequence[Fault], step: int, rng: np.random.Generator) -> tuple[Batch, float]:
    lr_multiplier = 1.0
    tokens, weights = batch.tokens.copy(), batch.weights.copy()
    for fault in faults:
        if not fault.covers(step):
            continue
        if fault.kind == "nan":
            weights[0, 0] = np.nan
        elif fault.kind == "corrupt":
            tokens[:] = _LOOKUP[ord("\x00")]  # a zero-filled shard
            tokens[:, rng.integers(0, tokens.shape[1], size=4)] = rng.integers(1, VOCAB_SIZE, size=4)
            weights *= 50.0
        elif fault.kind == "lr":
            lr_multiplier *= fault.magnitude
    return Batch(tokens, weights), lr_multiplier


# ---------------------------------------------------------------------------- training


@dataclasses.dataclass
class TrainConfig:
    """Settings of :func:`train` (the defaults are the demo's)."""

    steps: int = 300
    batch_size: int = 32
    seq_len: int = 64
    dim: int = 64
    heads: int = 4
    layers: int = 2
    learning_rate: float = 3e-3
    seed: int = 0
    faults: str = DEMO_FAULTS
    log_every: int = 25
    snapshot_every: int = 50
    check_every: int = 5
    out: str = "."
    log_name: str = "run.jsonl"
    report_name: str = "report.png"
    progress: bool = True
    report: bool = True


def make_optimizer(config: TrainConfig) -> optax.GradientTransformationExtraArgs:
    """The guarded optimizer: AdamW with warm-up/cosine decay, inside ``gh.guard`` with
    z-score clipping, spike skipping, momentum reset and the rollback recommendation."""
    return _optimizer(config.steps, config.learning_rate)


@functools.lru_cache(maxsize=8)
def _optimizer(steps: int, learning_rate: float) -> optax.GradientTransformationExtraArgs:
    # One transformation object per setting: the optimizer is part of the jitted step's
    # static graph, so runs with the same settings in one process share one compilation.
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps=max(1, steps // 20), decay_steps=steps
    )
    inner = optax.chain(optax.adamw(schedule, weight_decay=0.01), scale_by_fault_multiplier())
    return gh.guard(
        inner,
        clip=gh.ZScoreClip(),
        spike_action="skip",
        warmup_steps=20,
        reset_after=3,
        reset_window=50,
        rollback_after_spikes=8,
        rollback_after_nonfinite=5,
    )


@nnx.jit
def train_step(model, optimizer, tokens, weights, lr_multiplier):
    loss, grads = nnx.value_and_grad(loss_fn)(model, tokens, weights)
    # nnx.Optimizer forwards keyword arguments to the transformation: loss= reaches the guard.
    optimizer.update(model, grads, loss=loss, lr_multiplier=lr_multiplier)
    return loss, gh.metrics(optimizer, deprecated_names=False)


def train(config: TrainConfig) -> dict[str, Any]:
    """Trains the character transformer with the scripted faults and writes the log
    (and the report). Returns a summary: final loss, event counts (from the log),
    rollbacks (``(step, restored)`` pairs: the snapshot's step, None for the initial
    state), findings and the paths written.

    A snapshot is taken every ``snapshot_every`` steps after an interval without a
    skipped step. A rollback restores the newest snapshot but one (the newest has no
    interval without a skip after it yet): the update of a learning-rate spike is not
    skipped, so a snapshot taken just after it would hold the damage. A recommendation
    that comes back before a new healthy snapshot (none since the restore) has a cause
    that restoring does not remove (a lasting change of the gradient's scale, or bad data
    that goes on): instead of restoring again, and again, the loop re-baselines the guard
    (``gh.rebaseline``) and trains on; those steps are in ``rebaselines``."""
    faults = parse_faults(config.faults)
    os.makedirs(config.out, exist_ok=True)
    log_path = os.path.join(config.out, config.log_name)
    report_path = os.path.join(config.out, config.report_name)
    corpus = load_corpus()
    rng = np.random.default_rng(config.seed)
    model = CharTransformer(
        seq_len=config.seq_len, dim=config.dim, heads=config.heads, layers=config.layers, rngs=nnx.Rngs(config.seed)
    )
    optimizer = nnx.Optimizer(model, make_optimizer(config), wrt=nnx.Param)

    # cached_partial traverses the model/optimizer graph once, not on every call.
    step_fn = nnx.cached_partial(train_step, model, optimizer)
    # Two snapshots. A snapshot step after an interval without a skip takes a `candidate`,
    # and the candidate before it becomes `healthy` (the one a rollback restores): a whole
    # interval without a skip came after it (not necessarily the next one: a one-off bad
    # batch the guard skipped did no damage). The newest snapshot is not restored: a
    # learning-rate spike's own update is not skipped (its gradient is normal), so a
    # snapshot taken right after it holds the damage, which only the spikes of the steps
    # after it give away. `healthy` starts as the initial state.
    healthy = _Snapshot(nnx.clone((model, optimizer)), None, 0)
    candidate, skipped_at_snapshot, rollbacks, rebaselines = None, 0, [], []
    restored_healthy = False  # a rollback went back to `healthy`, and no newer healthy snapshot since
    progress = _progress(config)
    started = time.perf_counter()
    with gh.MetricLogger(gh.JsonlWriter(log_path, overwrite=True), log_every=config.log_every, all_steps=True) as log:
        for step in progress:
            batch, lr_multiplier = _apply_faults(
                sample_batch(corpus, rng, config.batch_size, config.seq_len), faults, step, rng
            )
            loss, metrics = step_fn(batch.tokens, batch.weights, lr_multiplier)
            log.log(step, {**metrics, "loss": loss})
            if step % config.check_every == 0 or step == config.steps - 1:
                # One small fetch every few steps (not every step): rollback flag, counters.
                flags = jax.device_get(
                    {k: metrics[k] for k in ("grad/rollback_recommended", "grad/num_skipped", "grad/norm")}
                    | {"loss": loss}
                )
                if hasattr(progress, "set_postfix"):
                    progress.set_postfix(loss=f"{flags['loss']:.3f}", norm=f"{flags['grad/norm']:.3g}")
                if flags["grad/rollback_recommended"] and restored_healthy:
                    # Back before a new healthy snapshot: restoring did not remove the cause (a
                    # lasting change of scale, or bad data that goes on), and restoring again
                    # would loop for ever. Accept the new level: the guard judges afresh.
                    # In place (nnx.update): step_fn, an nnx.cached_partial, holds this optimizer
                    # object, so `optimizer.opt_state = ...` alone would not reach it.
                    rebaselined = nnx.clone(optimizer)
                    rebaselined.opt_state = gh.rebaseline(optimizer.opt_state)
                    nnx.update(optimizer, nnx.state(rebaselined))
                    rebaselines.append(step)
                    _say(
                        progress,
                        f"step {step}: guard recommends rollback again before a new healthy snapshot -> "
                        "the cause persists; re-baselined the guard (gh.rebaseline) instead of restoring",
                    )
                elif flags["grad/rollback_recommended"]:
                    # Restore the last healthy snapshot: parameters and the whole optimizer state
                    # (the guard's sticky flag, its statistics and the inner moments).
                    nnx.update((model, optimizer), nnx.state(nnx.clone(healthy.objects)))
                    rollbacks.append((step, healthy.step))
                    candidate, skipped_at_snapshot = None, healthy.num_skipped  # the restored counters
                    restored_healthy = True
                    _say(progress, f"step {step}: guard recommends rollback -> restored {_snapshot_name(healthy.step)}")
                elif step % config.snapshot_every == 0:
                    skipped = int(flags["grad/num_skipped"])
                    if skipped == skipped_at_snapshot:  # no skip since the last snapshot step
                        if candidate is not None:  # a clean interval followed it: a new healthy snapshot
                            healthy, restored_healthy = candidate, False
                        candidate = _Snapshot(nnx.clone((model, optimizer)), step, skipped)
                    skipped_at_snapshot = skipped  # judge the next interval afresh
    seconds = time.perf_counter() - started
    # Count events from the log: a rollback restores the state's counters too.
    rows = gh.read_jsonl(log_path)
    events = {
        name.split("/")[-1]: sum(1 for row in rows if row.get(name) == 1)
        for name in ("grad/skipped", "grad/clipped", "grad/spiked", "grad/momentum_reset")
    }
    events["nonfinite"] = sum(1 for row in rows if row.get("grad/finite") == 0)
    findings = gh.diagnose(log_path)
    report = config.report
    if report:
        try:
            from optax_gradhealth.report import write_report

            title = f"char transformer demo ({config.faults or 'no faults'})"
            findings = write_report(log_path, report_path, title=title)
        except ImportError as error:  # matplotlib is in the examples extra
            _say(progress, f"no report.png ({error}); pip install 'optax-gradhealth[examples]'")
            report = False
    return {
        "seconds": seconds,
        "final_loss": float(jax.device_get(loss)),
        "events": events,
        "rollbacks": rollbacks,
        "rebaselines": rebaselines,
        "findings": findings,
        "log": log_path,
        "report": report_path if report else None,
    }


class _Snapshot(NamedTuple):
    """An in-memory copy of ``(model, optimizer)``, taken after the update of ``step``
    (None: the initial state), and the skipped steps counted then."""

    objects: Any
    step: int | None
    num_skipped: int


def _snapshot_name(step: int | None) -> str:
    return "the initial state" if step is None else f"the snapshot of step {step}"


def _progress(config: TrainConfig):
    if not config.progress:
        return range(config.steps)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return range(config.steps)
    return tqdm(range(config.steps), desc="char transformer", unit="step", dynamic_ncols=True)


def _say(progress, message: str) -> None:
    if hasattr(progress, "write"):
        progress.write(message)
    else:
        print(message)


def _int_at_least(low: int):
    """An argparse type: an integer >= ``low`` (else argparse's usage error, exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def add_arguments(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    parser.add_argument("--out", default=defaults.out, help="folder for the log and the report (default: .)")
    # At least 2 steps: the learning-rate schedule decays over the run (0 or 1 has no decay).
    parser.add_argument("--steps", type=_int_at_least(2), default=defaults.steps, help="optimizer steps (>= 2)")
    parser.add_argument("--batch-size", type=_int_at_least(1), default=defaults.batch_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def print_summary(result: dict[str, Any]) -> None:
    events = ", ".join(f"{k}={v}" for k, v in result["events"].items())
    print(f"\ntrained in {result['seconds']:.1f}s; final loss {result['final_loss']:.3f}; steps with {events}")
    for step, restored in result["rollbacks"]:
        print(f"rollback at step {step}: restored {_snapshot_name(restored)}")
    for step in result.get("rebaselines", ()):
        print(f"rollback recommended again at step {step} before a new healthy snapshot: re-baselined the guard")
    print()
    print(gh.format_findings(result["findings"]))
    written = [result["log"]]
    if result["report"]:
        from optax_gradhealth.report import findings_paths  # written only with matplotlib

        written += [result["report"], *findings_paths(result["report"])]
    print("\nwrote " + ", ".join(written))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m optax_gradhealth.demo", description=__doc__.split("\n\n")[0])
    add_arguments(parser, TrainConfig())
    args = parser.parse_args(argv)
    config = TrainConfig(
        out=args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress
    )
    print(f"faults scripted: {config.faults}  (NaN batch, corrupted batch, learning-rate spike)")
    result = train(config)
    print_summary(result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
