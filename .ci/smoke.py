"""Smoke test of an installed optax-gradhealth wheel, run by ``.ci/package``.

Run it with the fresh virtual environment's Python, from a folder outside the checkout:
``python -P smoke.py --checkout PATH`` (``-P``: the script's folder is not put on
``sys.path``). It fails unless the package it imports is the installed one (in that
environment's site-packages, not under ``PATH``), and then checks what a user of the
wheel does first: one guarded jitted step, ``gh.metrics``, a skipped NaN step, a JSON
Lines log read back by ``python -m optax_gradhealth diagnose``, ``--version``, and the
demo for a few steps.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_gradhealth as gh


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise SystemExit(f"smoke test FAILED: {message}")


def _run(args: list[str], cwd: pathlib.Path, timeout: float) -> subprocess.CompletedProcess:
    """``python ARGS`` with this interpreter, in ``cwd``, without PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    _check(
        result.returncode == 0,
        f"python {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}",
    )
    return result


def check_installed_copy(checkout: pathlib.Path) -> None:
    package = pathlib.Path(gh.__file__).resolve()
    _check(sys.prefix != sys.base_prefix, f"not in a virtual environment: {sys.prefix}")
    _check(not package.is_relative_to(checkout), f"imported the checkout's package: {package}")
    _check(package.is_relative_to(pathlib.Path(sys.prefix).resolve()), f"package not in {sys.prefix}: {package}")
    _check(not pathlib.Path.cwd().resolve().is_relative_to(checkout), f"running inside the checkout: {os.getcwd()}")
    version = importlib.metadata.version("optax-gradhealth")
    _check(gh.__version__ == version, f"gh.__version__ {gh.__version__!r} != installed metadata {version!r}")
    direct_url = importlib.metadata.distribution("optax-gradhealth").read_text("direct_url.json") or "{}"
    _check(not json.loads(direct_url).get("dir_info", {}).get("editable"), "an editable install, not the wheel")
    print(f"optax-gradhealth {gh.__version__} from {package.parent}")


def loss_fn(params, x, y):
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def check_guarded_step() -> list[dict]:
    tx = gh.guard(optax.adamw(1e-3), clip=1.0)

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        return optax.apply_updates(params, updates), opt_state, grads, loss, gh.metrics(opt_state)

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32), "b": jnp.zeros(2, jnp.float32)}
    x = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)
    opt_state = tx.init(params)

    new_params, opt_state, grads, loss, metrics = step(params, opt_state, x, y)
    metrics = jax.device_get(metrics)
    flat = np.concatenate([np.asarray(g, np.float64).ravel() for g in jax.tree.leaves(grads)])
    expected = float(np.linalg.norm(flat))
    np.testing.assert_allclose(float(metrics["grad/norm"]), expected, rtol=1e-6)
    _check(not bool(metrics["grad/skipped"]), "a finite first step was skipped")
    _check(bool(metrics["grad/finite"]), "grad/finite is False on a finite step")
    _check(bool(metrics["grad/clipped"]) == (expected > 1.0), f"grad/clipped wrong at norm {expected}")
    _check(int(metrics["grad/num_steps"]) == 1, f"grad/num_steps {metrics['grad/num_steps']}")
    _check(not np.array_equal(np.asarray(new_params["w"]), np.asarray(params["w"])), "the step changed nothing")
    print(f"guarded step: grad/norm {float(metrics['grad/norm']):.6g} (float64 reference {expected:.6g})")

    params = new_params
    bad_x = x.at[0, 0].set(jnp.nan)
    new_params, opt_state, _, _, metrics = step(params, opt_state, bad_x, y)
    metrics = jax.device_get(metrics)
    _check(bool(metrics["grad/skipped"]), "a NaN gradient was not skipped")
    _check(not bool(metrics["grad/finite"]), "grad/finite is True on a NaN gradient")
    _check(int(metrics["grad/num_skipped"]) == 1, f"grad/num_skipped {metrics['grad/num_skipped']}")
    for name in params:
        _check(np.array_equal(np.asarray(new_params[name]), np.asarray(params[name])), f"NaN step changed {name}")
    print("NaN step: skipped, parameters unchanged")

    # A short run with one NaN batch: the log the diagnose command reads.
    history = []
    for t in range(30):
        batch_x = bad_x if t == 20 else x
        params, opt_state, _, loss, metrics = step(params, opt_state, batch_x, y)
        history.append({**metrics, "loss": loss})
    return history


def check_log_and_diagnose(history: list[dict], work: pathlib.Path) -> None:
    log = work / "run.jsonl"
    with gh.MetricLogger(gh.JsonlWriter(log, overwrite=True), log_every=1) as logger:
        for t, metrics in enumerate(history):
            logger.log(t, metrics)
    rows = gh.read_jsonl(log)
    _check(len(rows) == len(history), f"{len(rows)} log rows for {len(history)} steps")
    _check(rows[20]["grad/finite"] == 0 and rows[20]["grad/skipped"] == 1, f"row 20: {rows[20]}")
    out = _run(["-m", "optax_gradhealth", "diagnose", str(log)], cwd=work, timeout=120).stdout
    _check("gradhealth diagnosis" in out and "non-finite" in out and "first at step 20" in out, out)
    print("diagnose: found the NaN step")


def check_version(work: pathlib.Path) -> None:
    out = _run(["-m", "optax_gradhealth", "--version"], cwd=work, timeout=120).stdout.strip()
    _check(out == f"optax-gradhealth {gh.__version__}", f"--version printed {out!r}")
    print(f"--version: {out}")


def check_demo(work: pathlib.Path, steps: int) -> None:
    out_dir = work / "demo"
    started = time.perf_counter()
    demo = ["-m", "optax_gradhealth.demo", "--steps", str(steps), "--batch-size", "8", "--out", str(out_dir)]
    result = _run([*demo, "--no-progress"], cwd=work, timeout=600)
    rows = gh.read_jsonl(out_dir / "run.jsonl")
    _check([row["step"] for row in rows] == list(range(steps)), f"demo log steps: {[row['step'] for row in rows]}")
    _check(all(np.isfinite(row["loss"]) for row in rows), "non-finite loss in the demo log")
    _check((out_dir / "report.png").stat().st_size > 0, "the demo wrote no report.png")
    _check("gradhealth diagnosis" in result.stdout, result.stdout)
    written = sorted(path.name for path in out_dir.iterdir())
    print(f"demo: {steps} steps in {time.perf_counter() - started:.1f}s, wrote {written}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", required=True, type=pathlib.Path, help="the source checkout (must not be used)")
    parser.add_argument("--demo-steps", type=int, default=10)
    args = parser.parse_args()
    check_installed_copy(args.checkout.resolve())
    with tempfile.TemporaryDirectory(prefix="gh-smoke-") as tmp:
        work = pathlib.Path(tmp).resolve()
        _check(not work.is_relative_to(args.checkout.resolve()), f"temporary folder inside the checkout: {work}")
        history = check_guarded_step()
        check_log_and_diagnose(history, work)
        check_version(work)
        check_demo(work, args.demo_steps)
    print("smoke test passed")


if __name__ == "__main__":
    main()
