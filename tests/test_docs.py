"""The documentation: it builds with warnings as errors, covers every public name and
every metric, its code examples run, and what it says about optax is true of the
installed optax."""

from __future__ import annotations

import importlib
import pathlib
import pkgutil
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gradhealth as gh
from optax_gradhealth import _catalogue

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _import_all_submodules() -> None:
    # Every module that may register metrics (the docs extension imports the same set).
    for info in pkgutil.iter_modules(gh.__path__, prefix="optax_gradhealth."):
        if info.name.rsplit(".", 1)[-1] in {"__main__", "demo"}:
            continue
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as error:  # a host-side module's optional dependency
            if not error.name or error.name.startswith("optax_gradhealth"):
                raise


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("docs_html")
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html", str(DOCS), str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"sphinx-build -W failed:\n{result.stdout}\n{result.stderr}"
    return out


def test_docs_build_with_warnings_as_errors(html):
    for page in ["index", "quickstart", "concepts", "metrics", "api", "comparison", "benchmarks"]:
        assert (html / f"{page}.html").is_file(), page


def test_api_reference_documents_every_public_name(html):
    text = (html / "api.html").read_text()
    missing = [name for name in gh.__all__ if f'id="optax_gradhealth.{name}"' not in text]
    assert not missing, f"public names without an API entry: {missing}"


def test_metrics_page_lists_every_catalogue_name(html):
    _import_all_submodules()
    text = (html / "metrics.html").read_text()
    cell = '<code class="docutils literal notranslate"><span class="pre">{}</span></code>'
    missing = [name for name in gh.CATALOGUE if cell.format(_html_escape(name)) not in text]
    assert not missing, f"metrics without a catalogue row: {missing}"
    # The names the guard actually returns are all in the catalogue (hence on the page).
    state = gh.guard(optax.adam(0.1), clip=1.0).init({"dense": {"kernel": jnp.ones((2, 2))}})
    for name in gh.metrics(state):  # the deprecated names too
        catalogue_name = _catalogue.spec_of(name).name
        assert catalogue_name in gh.CATALOGUE, name


_PROBE_CONF = """
import sys
sys.path.insert(0, {root!r})
sys.path.insert(0, {ext!r})
exec(compile(open({conf!r}).read(), {conf!r}, "exec"))

import typing
import optax_gradhealth as gh
import gh_docs


def probe_function(x):
    \"\"\"A public function added after the docs were written.\"\"\"
    return x


class ProbeState(typing.NamedTuple):
    probe_value: typing.Any


gh.probe_function = probe_function
gh.__all__ = [*gh.__all__, "probe_function"]
gh.register_metrics(ProbeState, {{"probe_value": "probe/value"}}, catalogue={{"probe/value": "a new metric"}})
if {with_range!r}:
    gh_docs.HEALTHY_RANGES["probe/value"] = "a documented healthy range"
"""

_PROBE_PAGES = {
    "index.md": "# Probe\n\n```{toctree}\nmetrics\napi\n```\n",
    "metrics.md": "# Metrics\n\n```{gh-metrics-catalogue}\n```\n",
    "api.md": "# API\n\n```{eval-rst}\n.. gh-api::\n```\n",
}


def _build_probe(tmp_path: pathlib.Path, with_range: bool) -> tuple[subprocess.CompletedProcess, pathlib.Path]:
    source = tmp_path / "src"
    source.mkdir()
    (source / "conf.py").write_text(
        _PROBE_CONF.format(root=str(ROOT), ext=str(DOCS / "_ext"), conf=str(DOCS / "conf.py"), with_range=with_range)
    )
    for name, text in _PROBE_PAGES.items():
        (source / name).write_text(text)
    out = tmp_path / "html"
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html", str(source), str(out)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300), out


def test_names_added_later_are_documented_without_editing_the_docs(tmp_path):
    result, out = _build_probe(tmp_path, with_range=True)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert 'id="optax_gradhealth.probe_function"' in (out / "api.html").read_text()
    assert "A public function added after the docs were written." in (out / "api.html").read_text()
    assert '<span class="pre">probe/value</span>' in (out / "metrics.html").read_text()


def test_a_metric_without_a_healthy_range_fails_the_build(tmp_path):
    result, _ = _build_probe(tmp_path, with_range=False)
    assert result.returncode != 0
    assert "'probe/value' is in CATALOGUE but has no healthy range" in result.stderr


def _html_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


@pytest.mark.parametrize("page", ["quickstart.md", "metrics.md"])
def test_python_examples_in_page_run(page):
    text = (DOCS / page).read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert blocks, page
    namespace: dict = {"__name__": f"docs_{page}"}
    for block in blocks:  # the blocks of a page form one program, in order
        exec(compile(block, str(DOCS / page), "exec"), namespace)


# --- docs/comparison.md and docs/concepts.md: the claims about optax ---------------


def test_optax_clip_by_global_norm_records_nothing_and_zeroes_overflowing_gradients():
    tx = optax.clip_by_global_norm(1.0)
    g16 = {"w": jnp.full((4,), 300.0, jnp.float16)}
    updates, state = tx.update(g16, tx.init(g16))
    assert state == optax.EmptyState()
    assert np.all(np.asarray(updates["w"]) == 0.0)  # silently zeroed
    g32 = {"w": jnp.array([1e20, 1e20, 0.0, 0.0], jnp.float32)}
    assert np.all(np.asarray(tx.update(g32, tx.init(g32))[0]["w"]) == 0.0)
    nan = {"w": jnp.array([jnp.nan, 1.0, 1.0, 1.0])}
    assert np.all(np.isnan(np.asarray(tx.update(nan, tx.init(nan))[0]["w"])))
    # bf16 leaves summed in bf16: 16.0 then 32 leaves of 1.0 give 16 (256 + 1 == 256), not sqrt(288).
    leaves = {"a": jnp.full((1,), 16.0, jnp.bfloat16)} | {f"b{i:02d}": jnp.ones((1,), jnp.bfloat16) for i in range(32)}
    assert float(jax.jit(optax.tree.norm)(leaves)) == 16.0

    # What the docs say gradhealth does instead (references: the norms written out).
    ours = gh.clip_by_global_norm(1.0)
    update = jax.jit(ours.update)
    updates, state = update(g16, ours.init(g16))
    np.testing.assert_allclose(float(state.clip_norm), np.sqrt(4 * 300.0**2), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(updates["w"], np.float32), 0.5, rtol=1e-3)
    updates, state = update(g32, ours.init(g32))
    np.testing.assert_allclose(float(state.clip_norm), np.sqrt(2) * 1e20, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(updates["w"])[:2], 1 / np.sqrt(2), rtol=1e-6)
    np.testing.assert_allclose(float(jax.jit(gh.global_norm)(leaves)), np.sqrt(16.0**2 + 32), rtol=1e-6)


def test_optax_adam_turns_zero_fp16_gradients_into_nan():
    params = {"w": jnp.ones(3, jnp.float16)}
    tx = optax.adam(1e-3)
    updates, _ = tx.update({"w": jnp.zeros(3, jnp.float16)}, tx.init(params), params)
    assert np.all(np.isnan(np.asarray(updates["w"], np.float32)))


def _run(tx, grads_sequence, params):
    state = tx.init(params)
    update = jax.jit(tx.update)  # eager dispatch of every op is slow; one compile is not
    for grads in grads_sequence:
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def test_optax_apply_if_finite_applies_nan_after_max_consecutive_errors():
    params = {"w": jnp.ones(3)}
    nan = {"w": jnp.full(3, jnp.nan)}
    tx = optax.apply_if_finite(optax.adam(0.1), max_consecutive_errors=2)
    kept, _ = _run(tx, [nan] * 2, params)
    np.testing.assert_array_equal(np.asarray(kept["w"]), 1.0)
    lost, state = _run(tx, [nan] * 3, params)
    assert np.all(np.isnan(np.asarray(lost["w"])))
    assert np.all(np.isnan(np.asarray(state.inner_state[0].mu["w"])))
    huge, _ = _run(optax.apply_if_finite(optax.sgd(0.1), 2), [{"w": jnp.full(3, 1e30)}], params)
    np.testing.assert_allclose(np.asarray(huge["w"]), 1.0 - 1e29, rtol=1e-6)

    guarded, state = _run(gh.guard(optax.adam(0.1)), [nan] * 50, params)
    np.testing.assert_array_equal(np.asarray(guarded["w"]), 1.0)
    assert int(state.guard_counters.guard_num_nonfinite) == 50 and bool(state.guard_counters.guard_rollback)


def test_optax_monitor_state_changes_structure_after_first_update():
    params = {"w": jnp.ones(3)}
    tx = optax.chain(optax.monitor({"norm": optax.tree.norm}), optax.sgd(0.1))
    state0 = tx.init(params)
    assert optax.tree.get(state0, "norm") is None
    _, state1 = tx.update({"w": jnp.ones(3)}, state0, params)
    assert jax.tree.structure(state0) != jax.tree.structure(state1)
    np.testing.assert_allclose(float(optax.tree.get(state1, "norm")), np.sqrt(3.0), rtol=1e-6)

    def body(state, grads):
        return tx.update(grads, state, params)[1], None

    with pytest.raises(TypeError, match="same pytree structure"):
        jax.lax.scan(body, state0, {"w": jnp.ones((4, 3))})

    traces = []

    @jax.jit
    def step(state, grads):
        traces.append(None)
        return tx.update(grads, state, params)[1]

    state = state0
    for _ in range(3):
        state = step(state, {"w": jnp.ones(3)})
    assert len(traces) == 2

    guard = gh.guard(optax.sgd(0.1))
    g0 = guard.init(params)
    g1 = guard.update({"w": jnp.ones(3)}, g0, params)[1]
    assert jax.tree.structure(g0) == jax.tree.structure(g1)
    assert set(gh.metrics(g0)) == set(gh.metrics(g1))


def test_optax_adaptive_grad_clip_needs_params_records_nothing_and_passes_nan():
    params = {"w": jnp.ones((4, 3))}
    tx = optax.adaptive_grad_clip(0.01)
    updates, state = tx.update({"w": jnp.full((4, 3), 10.0)}, tx.init(params), params)
    assert state == optax.EmptyState()
    # Unit-wise: each column's norm capped at 0.01 * the parameter column's norm (2).
    np.testing.assert_allclose(np.linalg.norm(np.asarray(updates["w"]), axis=0), 0.01 * 2.0, rtol=1e-5)
    updates, _ = tx.update({"w": jnp.full((4, 3), jnp.nan)}, tx.init(params), params)
    assert np.all(np.isnan(np.asarray(updates["w"])))
    with pytest.raises((TypeError, ValueError)):
        tx.update({"w": jnp.ones((4, 3))}, tx.init(params))


def test_optax_multisteps_nan_microbatch_poisons_the_accumulator():
    params = {"w": jnp.ones(3)}
    one, nan = {"w": jnp.ones(3)}, {"w": jnp.full(3, jnp.nan)}
    tx = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2)
    update = jax.jit(tx.update)
    updates, state = update(nan, tx.init(params), params)  # first micro-step: not an emit step
    assert np.all(np.isnan(np.asarray(updates["w"])))  # 0 * NaN reaches the parameters
    state = tx.init(params)
    for grads in [one, nan, one, one, one, one]:
        updates, state = update(grads, state, params)
    assert np.all(np.isnan(np.asarray(state.acc_grads["w"])))  # never recovers
    assert np.all(np.isnan(np.asarray(updates["w"])))

    skipping = optax.MultiSteps(optax.sgd(0.1), 2, should_skip_update_fn=optax.skip_not_finite)
    kept, state = _run(skipping, [one, nan, one, one, one, one], params)
    np.testing.assert_allclose(np.asarray(kept["w"]), 1.0 - 2 * 0.1, rtol=1e-6)  # 5 good micro-steps: 2 updates

    inside = optax.MultiSteps(gh.guard(optax.sgd(0.1)), 2)
    _, state = _run(inside, [one] * 6, params)
    assert int(gh.metrics(state)["grad/num_steps"]) == 3  # once per accumulation cycle

    outside = gh.guard(optax.MultiSteps(optax.sgd(0.1), 2).gradient_transformation())
    kept, state = _run(outside, [one, nan, one, one, one, one], params)
    np.testing.assert_allclose(np.asarray(kept["w"]), 1.0 - 2 * 0.1, rtol=1e-6)
    metrics = gh.metrics(state)
    assert int(metrics["grad/num_steps"]) == 6 and int(metrics["grad/num_skipped"]) == 1


def test_momentum_reset_keeps_schedule_counter_and_restarts_adam():
    schedule = optax.linear_schedule(1e-3, 0.0, 1000)
    tx = gh.guard(optax.adamw(schedule), warmup_steps=3, reset_after=1, spike_zscore=None, spike_action="record")
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    for value in [1.0] * 5 + [100.0]:
        _, state = tx.update({"w": jnp.full(3, value)}, state, params)
    assert bool(state.guard_report.guard_momentum_reset)
    adam, _, schedule_state = state.guard_inner_state
    # 'record' applies the reset step: the fresh adam took its gradient (100) as its first.
    assert int(adam.count) == 1
    np.testing.assert_allclose(np.asarray(adam.mu["w"]), (1 - 0.9) * 100.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(adam.nu["w"]), (1 - 0.999) * 100.0**2, rtol=1e-5)
    assert int(schedule_state.count) == 6


def _package_imports(path: pathlib.Path) -> set[str]:
    """The package's modules a source file imports (first name below optax_gradhealth)."""
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "optax_gradhealth":
            parts = node.module.split(".")
            names |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names if not a.name.startswith("__")}
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("optax_gradhealth.")}
    return names


def test_architecture_table_lists_what_each_module_imports():
    # docs/concepts.md "Architecture": the third column is exactly the package modules the
    # row's modules import (one another excepted); "nothing" for a leaf module.
    package = pathlib.Path(gh.__file__).parent
    text = (pathlib.Path(__file__).parents[1] / "docs" / "concepts.md").read_text()
    table = text[text.index("| module | what it holds | imports from the package |") :].split("\n\n")[0]
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    assert len(rows) >= 15
    documented: set[str] = set()
    for row in rows:
        modules = re.findall(r"`(\w+)`", row[0])
        files = [
            f
            for m in modules
            for f in ([package / f"{m}.py"] if (package / f"{m}.py").exists() else sorted((package / m).glob("*.py")))
        ]
        assert files, row[0]
        actual = set().union(*map(_package_imports, files)) - set(modules)
        listed = set(re.findall(r"`(\w+)`", row[2])) if row[2].strip(" |") != "nothing" else set()
        assert listed == actual, (row[0], sorted(listed), sorted(actual))
        documented |= set(modules)
    private = {p.stem for p in package.glob("_*.py")} - {"__init__", "__main__"}
    assert private <= documented, sorted(private - documented)


def test_every_public_function_and_class_has_a_runnable_example():
    # The doctests run them (--doctest-modules); this test sees that there is one. The
    # NamedTuple states and records (what `init` returns, GradStats, the guard's groups)
    # are data, shown by the examples of the functions that make them.
    import inspect

    missing = []
    for name in gh.__all__:
        obj = getattr(gh, name)
        is_record = isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields")
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and not is_record:
            if ">>>" not in (inspect.getdoc(obj) or ""):
                missing.append(name)
    assert not missing, missing
