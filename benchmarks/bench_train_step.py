"""Benchmark: what the guard costs inside a whole training step of a transformer.

A decoder-only Flax NNX transformer (pre-norm blocks of causal self-attention and a
GELU MLP, tied embedding; float32 parameters, bfloat16 compute), one jitted train step
per call: forward, backward (``jax.value_and_grad``), optimizer update and
``optax.apply_updates``, parameters and optimizer state donated. In ONE run, on the
same batch, timed round-robin:

* ``adamw``: bare ``optax.adamw``;
* ``clip+adamw``: ``optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(...))``;
* ``guard``: ``gh.guard(optax.adamw(...), clip=1.0)``, every feature on (loss passed,
  spike detection, momentum reset, rollback, the update check) and the per-leaf norms
  it always records.

The table reports median step times, their ratio to bare adamw and the guard's share
of the step, ``(guard - adamw) / guard``.

Usage::

    python benchmarks/bench_train_step.py                  # about 100M parameters (GPU size)
    python benchmarks/bench_train_step.py --size small     # about 1M parameters (CPU, CI)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import optax_gradhealth as gh

# (width, layers, heads, vocabulary, batch, sequence length)
SIZES = {
    "base": (768, 12, 12, 32768, 16, 512),  # about 110M parameters, GPT-2 small's shape
    "small": (128, 2, 4, 2048, 4, 64),  # about 0.7M parameters
    "tiny": (32, 1, 2, 64, 2, 8),
}
COMPUTE = jnp.bfloat16


class Block(nnx.Module):
    def __init__(self, width: int, heads: int, rngs: nnx.Rngs):
        kw = dict(dtype=COMPUTE, param_dtype=jnp.float32, rngs=rngs)
        self.norm1 = nnx.RMSNorm(width, **kw)
        self.attention = nnx.MultiHeadAttention(heads, width, decode=False, **kw)
        self.norm2 = nnx.RMSNorm(width, **kw)
        self.up = nnx.Linear(width, 4 * width, **kw)
        self.down = nnx.Linear(4 * width, width, **kw)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attention(self.norm1(x), mask=mask)
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class Transformer(nnx.Module):
    def __init__(self, width: int, layers: int, heads: int, vocabulary: int, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocabulary, width, dtype=COMPUTE, param_dtype=jnp.float32, rngs=rngs)
        self.blocks = nnx.List([Block(width, heads, rngs) for _ in range(layers)])
        self.norm = nnx.RMSNorm(width, dtype=COMPUTE, param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens)
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.embed.attend(self.norm(x))


def variants() -> dict[str, tuple[optax.GradientTransformation, bool]]:
    """name -> (transformation, whether it takes ``loss=``); the first is the baseline."""
    adamw = lambda: optax.adamw(3e-4, weight_decay=0.1)
    return {
        "adamw": (adamw(), False),
        "clip+adamw": (optax.chain(optax.clip_by_global_norm(1.0), adamw()), False),
        "guard": (gh.guard(adamw(), clip=1.0), True),
    }


def bench(size: str, steps: int, warmup: int) -> tuple[list[dict], int]:
    width, layers, heads, vocabulary, batch, length = SIZES[size]
    model = Transformer(width, layers, heads, vocabulary, nnx.Rngs(0))
    graphdef, params0 = nnx.split(model, nnx.Param)
    num_params = sum(x.size for x in jax.tree.leaves(params0))
    tokens = jax.random.randint(jax.random.key(1), (batch, length + 1), 0, vocabulary)

    def loss_fn(params, tokens):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1]).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    runners = {}
    for name, (tx, takes_loss) in variants().items():

        def step(params, opt_state, tokens, tx=tx, takes_loss=takes_loss):
            loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
            extra = {"loss": loss} if takes_loss else {}
            updates, opt_state = tx.update(grads, opt_state, params, **extra)
            return optax.apply_updates(params, updates), opt_state, loss

        params = jax.tree.map(jnp.copy, params0)
        state = tx.init(params)
        start = time.perf_counter()
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, tokens).compile()
        print(f"  compiled {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
        runners[name] = [compiled, params, state]

    times: dict[str, list[float]] = {name: [] for name in runners}
    losses: dict[str, float] = {}
    for round_index in range(warmup + steps):
        for name, run in runners.items():
            start = time.perf_counter()
            params, state, loss = run[0](run[1], run[2], tokens)
            jax.block_until_ready((params, state, loss))
            elapsed = time.perf_counter() - start
            run[1], run[2] = params, state
            losses[name] = float(loss)
            if round_index >= warmup:
                times[name].append(elapsed)
    base = statistics.median(times["adamw"])
    rows = []
    for name in runners:
        median = statistics.median(times[name])
        rows.append(
            {
                "variant": name,
                "step_ms": median * 1e3,
                "ratio": median / base,
                "share": (median - base) / median,
                "final_loss": losses[name],
            }
        )
    return rows, num_params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="base", help="model size (default base)")
    parser.add_argument("--steps", type=int, default=20, help="timed rounds per variant (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")

    rows, num_params = bench(args.size, args.steps, args.warmup)
    width, layers, heads, vocabulary, batch, length = SIZES[args.size]
    del heads
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.devices()[0].device_kind}; "
        f"transformer {num_params / 1e6:.1f}M parameters (width {width}, {layers} layers, vocabulary "
        f"{vocabulary}), batch {batch} x {length} tokens, bf16 compute, {args.steps} rounds"
    )
    print("| variant | step ms (median) | x adamw | share of the step | loss after the run |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['step_ms']:.2f} | {r['ratio']:.3f} | {100 * r['share']:.1f}% | "
            f"{r['final_loss']:.4f} |"
        )
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"backend": jax.default_backend(), "params": num_params, "rows": rows}, file, indent=1)


if __name__ == "__main__":
    main()
