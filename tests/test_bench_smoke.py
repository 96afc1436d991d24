"""The benchmarks run end to end at a tiny size (no timing is asserted)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run_benchmark(script: str, *args: str, compile_cache: Path | None = None) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    if compile_cache is not None:
        # A fresh (empty) persistent compilation cache: a program compiled twice in the
        # run (the same HLO again, e.g. for inputs that only became committed) is
        # compiled once. Never for a script whose compile times are asserted.
        env |= {
            "JAX_COMPILATION_CACHE_DIR": str(compile_cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        }
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
    )


def test_bench_guard_runs_and_prints_every_row():
    result = _run_benchmark(
        "bench_guard.py", "--params", "2e4", "--leaves", "3", "--steps", "2", "--warmup", "1", "--compile-reps", "1"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 0.02M/3 |")]
    variants = [row.split("|")[2].strip() for row in rows]
    assert variants == [
        "adamw",
        "clip+adamw",
        "apply_if_finite",
        "guard (all on)",
        "guard, update_health=False",
        "guard, check_updates=False",
        "guard, both False",
    ], result.stdout


def test_bench_guard_runs_only_the_chosen_variants_after_the_baseline():
    result = _run_benchmark(
        "bench_guard.py", "--params", "2e4", "--leaves", "3", "--steps", "1", "--warmup", "1", "--compile-reps", "1",
        "--variants", "guard (all on)", "clip+adamw",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 0.02M/3 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["adamw", "clip+adamw", "guard (all on)"], result.stdout
    bad = _run_benchmark("bench_guard.py", "--variants", "guard (all off)")
    assert bad.returncode == 2 and "unknown --variants ['guard (all off)']" in bad.stderr


def test_bench_cross_device_runs_and_prints_every_row(tmp_path):
    # Each variant's first timed call recompiles its step (the same program): the cache
    # halves the run's compile time.
    result = _run_benchmark("bench_cross_device.py", "--rounds", "1", "--batch", "2", compile_cache=tmp_path / "jax")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8 devices, 3.15 M parameters, per-device batch 2, 1 rounds" in result.stdout, result.stdout
    rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith("| ") and "ms" not in line]
    assert [row[1].strip() for row in rows] == [
        "plain",
        "plain+clip",
        "xdev",
        "xdev+guard",
        "xdev+guard lean",
        "xdev+guard audit",
        "naive all-gather",
    ]
    assert re.search(r"^xdev\+guard / plain\+clip: [0-9.]+x$", result.stdout, re.M), result.stdout
    assert re.search(r"^xdev\+guard lean / plain\+clip: [0-9.]+x$", result.stdout, re.M), result.stdout
    # The naive variant gathers every device's full gradient: K times the all-reduce.
    floats = {row[1].strip(): int(row[6].strip().replace(",", "")) for row in rows}
    assert floats["naive all-gather"] == 9 * floats["plain"], floats


def test_bench_cross_device_rejects_a_non_positive_batch():
    result = _run_benchmark("bench_cross_device.py", "--batch", "0")
    assert result.returncode == 2
    assert "--batch and --rounds must be positive, got 0 and 15" in result.stderr


def test_bench_guard_loop_mode_reports_per_step_rows():
    result = _run_benchmark(
        "bench_guard.py", "--params", "2e4", "--leaves", "3", "--steps", "1", "--warmup", "1", "--compile-reps", "1",
        "--loop", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 steps per call (fori_loop)" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 0.02M/3 loop3 |")]
    assert len(rows) == 7, result.stdout


def test_bench_train_step_runs_every_variant():
    result = _run_benchmark("bench_train_step.py", "--size", "tiny", "--steps", "1", "--warmup", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [row[1].strip() for row in rows] == ["adamw", "clip+adamw", "guard"], result.stdout
    losses = {row[1].strip(): float(row[5]) for row in rows}
    # The same model, batch and learning rate: no clipping or skip at this size, so the
    # three runs end at nearly the same loss.
    assert max(losses.values()) - min(losses.values()) < 1e-2, losses


def test_gpu_suite_script_parses():
    result = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_suite.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_sharded_pytest_runs_every_file_and_reports_a_failing_shard(tmp_path):
    """The GPU suite's test runner: files spread over the shards round-robin, every
    shard's output printed, a non-zero exit when one shard fails."""
    names = ["test_a.py", "test_b.py", "test_c.py"]
    bodies = [
        "def test_one():\n    assert 1 + 1 == 2\n",
        "def test_two():\n    assert 2 * 2 == 5\n",
        "def test_x():\n    pass\n",
    ]
    for name, body in zip(names, bodies):
        (tmp_path / name).write_text(body)
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    script = str(ROOT / "benchmarks" / "sharded_pytest.sh")
    result = subprocess.run(["bash", script, "2", *names], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "### shard_0: test_a.py test_c.py" in result.stdout
    assert "### shard_1: test_b.py" in result.stdout
    assert "2 passed" in result.stdout and "1 failed" in result.stdout
    assert "FAILED test_b.py::test_two" in result.stdout
    passing = subprocess.run(
        ["bash", script, "2", names[0], names[2]], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert passing.returncode == 0, passing.stdout


def test_compile_profile_splits_compile_time_per_variant():
    result = _run_benchmark(
        "compile_profile.py", "--params", "2e4", "--leaves", "4", "--variants", "adamw", "guard (all on)"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [row[1].strip() for row in rows] == ["adamw", "guard (all on)"], result.stdout
    for row in rows:
        trace, compile_s, passes, backend, kernels = (float(x) for x in row[2:7])
        # XLA's pass timers were read (so the log format is still understood), and they
        # are part of compile(): passes + backend = compile (to the table's rounding).
        assert trace > 0 and 0 < passes < compile_s and abs(passes + backend - compile_s) <= 0.011 and kernels > 0
    # Adamw compiles one fusion per moment and parameter (4 leaves: at least 12 kernels);
    # the guard adds its statistics and its decision.
    assert float(rows[1][6]) > float(rows[0][6]) >= 12, result.stdout


def test_bench_reductions_times_every_formulation():
    result = _run_benchmark(
        "bench_reductions.py", "--elements", "4096", "--leaves", "2", "--rounds", "1", "--warmup", "0"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [
        line.split("|") for line in result.stdout.splitlines() if line.startswith("| ") and "formulation" not in line
    ]
    assert [row[1].strip() for row in rows] == ["input_sq", "mu_sq", "update_sq", "poisoned", "flags"], result.stdout
    assert float(rows[0][3]) == 1.0  # the baseline's ratio to itself
    bad = _run_benchmark("bench_reductions.py", "--leaves", "0")
    assert bad.returncode == 2 and "need --leaves >= 1" in bad.stderr


@pytest.mark.parametrize("loop", [[], ["--loop", "2"]], ids=["per-call", "loop"])
def test_bench_lowering_turns_off_each_fusion_choice_in_turn(loop):
    from optax_gradhealth import _lowering

    args = ["--params", "2e4", "--leaves", "3", "--steps", "1", "--warmup", "0", *loop]
    result = _run_benchmark("bench_lowering.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("2 steps per call (fori_loop" in result.stdout) == bool(loop), result.stdout
    rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith("| ") and "variant" not in line]
    expected = ["adamw", "all choices", *(f"without {choice}" for choice in _lowering.CHOICES)]
    assert [row[1].strip() for row in rows] == expected, result.stdout
    assert float(rows[1][4]) == 1.0  # the guard as it is, against itself
    if not loop:  # the argument check does not depend on --loop: run it once
        bad = _run_benchmark("bench_lowering.py", "--guard", "adamw")
        assert bad.returncode == 2 and "unknown --guard 'adamw'" in bad.stderr


def test_bench_check_times_every_formulation():
    result = _run_benchmark("bench_check.py", "--params", "2e4", "--leaves", "3", "--steps", "1", "--warmup", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [row[2].strip() for row in rows] == ["adamw", "clip+adamw", "clip", "atomic", "per element"], result.stdout
    bad = _run_benchmark("bench_check.py", "--leaves", "0")
    assert bad.returncode == 2 and "need --leaves >= 1" in bad.stderr


def _overflowing_trace():
    """An optimizer whose state is a trace ``t + 3e38 g + 3e38 g`` (1 at init) and
    whose update is ``-t / 2``: where ``|g| > ~0.57`` the trace overflows float32."""
    import jax.numpy as jnp
    import optax

    def init(params):
        return {"trace": jnp.ones_like(params["w"])}

    def update(grads, state, params=None):
        big = jnp.float32(3e38)
        trace = state["trace"] + grads["w"] * big + grads["w"] * big
        return {"w": -0.5 * trace}, {"trace": trace}

    return optax.GradientTransformation(init, update)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_bench_check_formulations_do_what_they_say(jit):
    """The benchmark times what it names: without a check the overflow goes through; the
    atomic check skips the whole step; the per-element check keeps the overflowed
    element's old state, zeroes its update and applies the rest (values by hand)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_check

    params = {"w": jnp.zeros(3, jnp.float32)}
    grads = {"w": jnp.array([0.3, 0.9539392, 0.0], jnp.float32)}  # norm 1: the clip keeps it
    inf = np.inf
    expected = {  # (trace, updates, flagged steps)
        "clip": ([1.8e38, inf, 1.0], [-0.9e38, -inf, -0.5], 0),
        "atomic": ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0], 1),
        # The held element's update: 0 eagerly; under jit the update reads the selected
        # state (`_skip`), so the old trace gives -0.5. Either is finite.
        "per element": ([1.8e38, 1.0, 1.0], [-0.9e38, -0.5 if jit else 0.0, -0.5], 1),
    }
    for mode in bench_check.MODES:
        tx = bench_check.checked(_overflowing_trace(), mode)
        update = jax.jit(tx.update) if jit else tx.update
        updates, state = update(grads, tx.init(params), params)
        trace, want_updates, flagged = expected[mode]
        np.testing.assert_allclose(np.asarray(state.inner["trace"]), trace, rtol=1e-6, err_msg=mode)
        np.testing.assert_allclose(np.asarray(updates["w"]), want_updates, rtol=1e-6, err_msg=mode)
        assert int(state.flagged) == flagged, mode
