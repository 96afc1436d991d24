"""A short training loop on a synthetic regression task that prints its health metrics.

Faults are injected at known steps (a NaN batch, a 100x gradient spike) to show the
guard skipping them. Run: ``python examples/quickstart.py``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_gradhealth as gh


def main(steps: int = 300, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    true_w = rng.normal(size=(16, 1)).astype(np.float32)
    params = {"dense": {"kernel": jnp.zeros((16, 1)), "bias": jnp.zeros((1,))}}
    tx = gh.guard(optax.adamw(3e-2), clip=gh.ZScoreClip(), warmup_steps=20)
    opt_state = tx.init(params)

    def loss_fn(p, x, y):
        pred = x @ p["dense"]["kernel"] + p["dense"]["bias"]
        return jnp.mean((pred - y) ** 2)

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        return optax.apply_updates(params, updates), opt_state, loss

    faults = {100: "nan", 200: "spike"}
    for i in range(steps):
        x = rng.normal(size=(64, 16)).astype(np.float32)
        y = x @ true_w + 0.1 * rng.normal(size=(64, 1)).astype(np.float32)
        if faults.get(i) == "nan":
            x[0, 0] = np.nan
        elif faults.get(i) == "spike":
            y = y * 100.0
        params, opt_state, loss = step(params, opt_state, x, y)
        if i % 50 == 0 or i in faults:
            m = jax.device_get(gh.metrics(opt_state, deprecated_names=False))
            print(
                f"step {i:4d}  loss {float(loss):10.4f}  norm {float(m['grad/norm']):10.4f}  "
                f"threshold {float(m['grad/clip_threshold']):8.4f}  skipped {bool(m['grad/skipped'])!s:5}  "
                f"spike {bool(m['grad/spiked'])!s:5}"
            )
    final = {
        k: float(v) for k, v in jax.device_get(gh.metrics(opt_state, deprecated_names=False)).items() if np.ndim(v) == 0
    }
    print("counters: " + ", ".join(f"{k.split('/')[-1]}={int(final[k])}" for k in sorted(final) if "/num_" in k))
    return final


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    main(args.steps)
