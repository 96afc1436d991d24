"""Train a small Flax model in fp16 with dynamic loss scaling, on CPU.

The model computes in float16 (activations, matmuls, logits) and keeps float32 master
weights, as mixed-precision training does; the loss is taken in float32. The initial
scale is deliberately too large (2**24), so the first steps overflow: they are skipped
without touching the weights or Adam's moments, and the scale backs off until the
scaled gradients fit in fp16. A short growth interval then shows the scale creeping up
again and backing off when it overshoots.

Run: ``python examples/fp16_loss_scaling.py`` (``--steps N`` to change the length).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_gradhealth as gh


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, features: int = 16, hidden: int = 64, classes: int = 4):
        common = dict(dtype=jnp.float16, param_dtype=jnp.float32, rngs=rngs)
        self.hidden = nnx.Linear(features, hidden, **common)
        self.out = nnx.Linear(hidden, classes, **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(nnx.relu(self.hidden(x.astype(jnp.float16))))


def main(steps: int = 200, seed: int = 0, growth_interval: int = 25, verbose: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    true_w = rng.normal(size=(16, 4)).astype(np.float32)
    model = MLP(nnx.Rngs(seed))
    tx = gh.dynamic_loss_scale(
        gh.guard(optax.adam(3e-3), clip=1.0),
        init_scale=2.0**24,
        growth_interval=growth_interval,
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x).astype(jnp.float32)  # the loss in float32
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return gh.scale_loss(loss, optimizer), loss

        grads, loss = nnx.grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads, loss=loss)
        m = gh.metrics(optimizer, deprecated_names=False)
        return loss, m["grad/loss_scale"], m["grad/overflowed"], m["grad/norm"]

    history = {"loss": [], "loss_scale": [], "overflow": [], "norm": []}
    for step in range(steps):
        x = rng.normal(size=(64, 16)).astype(np.float32)
        y = np.argmax(x @ true_w, axis=1)
        loss, scale, overflow, norm = jax.device_get(train_step(model, optimizer, x, y))
        for key, value in zip(history, (loss, scale, overflow, norm)):
            history[key].append(value.item())
        if verbose and (overflow or step % 25 == 0):
            # On an overflowed step the guard did not run: its figures are the last step's.
            shown = "skipped (overflow)" if overflow else f"grad norm {float(norm):8.4f}"
            print(f"step {step:4d}  loss {float(loss):7.4f}  scale {float(scale):10.0f}  {shown}")
    final = {k: v for k, v in jax.device_get(gh.metrics(optimizer, deprecated_names=False)).items() if np.ndim(v) == 0}
    params_finite = all(bool(np.all(np.isfinite(p))) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    if verbose:
        print(
            f"overflows skipped: {int(final['grad/num_overflows'])}, genuine non-finite: "
            f"{int(final['grad/num_nonfinite'])}, applied steps: {int(final['grad/num_steps'])}, "
            f"final scale: {float(final['grad/loss_scale']):.0f}, parameters finite: {params_finite}"
        )
    return {"history": history, "metrics": final, "params_finite": params_finite}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(steps=args.steps, seed=args.seed)
