"""The metric catalogue (optax_gradhealth._catalogue): one declared table of names, kinds,
meanings and healthy ranges, checked against every name the code and the docs use and
against the arrays that gh.metrics really returns."""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gradhealth as gh
from optax_gradhealth import _catalogue, _interfaces

ROOT = pathlib.Path(__file__).resolve().parent.parent

# A metric name as written in code or prose: `grad/...` or `xdev/...`, not inside a path
# or a URL. f-strings give a prefix (`grad/leaf_norm/{name}`), checked as `<path>`.
_NAME = re.compile(r"(?<![\w/.-])((?:grad|xdev)/[A-Za-z0-9_]+(?:/[A-Za-z0-9_<>.]+)*)")


def _used_names() -> dict[str, list[str]]:
    files = [
        *sorted((ROOT / "optax_gradhealth").glob("*.py")),
        *sorted((ROOT / "examples").glob("*.py")),
        *sorted((ROOT / "benchmarks").glob("*.py")),
        *sorted((ROOT / "docs").glob("*.md")),
        ROOT / "README.md",
    ]
    used: dict[str, list[str]] = {}
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for match in _NAME.finditer(line):
                used.setdefault(match.group(1).rstrip("/."), []).append(f"{path.relative_to(ROOT)}:{number}")
    return used


def _declared(name: str) -> bool:
    return _catalogue.is_declared(name) or f"{name}/<path>" in _catalogue.SPECS


def test_every_metric_name_used_in_code_examples_and_docs_is_declared():
    used = _used_names()
    # The scan finds names: a broken pattern would pass vacuously.
    assert {"grad/norm", "grad/num_skipped", "xdev/outlier_device", "grad/leaf_norm"} <= set(used)
    undeclared = {name: where[:3] for name, where in used.items() if not _declared(name)}
    assert not undeclared, f"metric names used but not declared in _catalogue.SPECS: {undeclared}"


def test_the_check_rejects_a_misspelt_name_and_resolves_per_leaf_and_vector_entries():
    assert not _declared("grad/num_skiped")
    assert not _declared("grad/leaf_norms/dense/w")
    assert not _declared("grad/norm/3")  # a scalar has no elements
    assert _catalogue.spec_of("grad/leaf_norm/dense/kernel").name == "grad/leaf_norm/<path>"
    assert _catalogue.spec_of("xdev/pairwise_cosine/0/5").name == "xdev/pairwise_cosine"
    with pytest.raises(KeyError, match="grad/nrom"):
        _catalogue.spec_of("grad/nrom")


def test_specs_are_complete_and_the_catalogue_is_made_from_them():
    for name, spec in _catalogue.SPECS.items():
        assert spec.name == name and spec.kind in _catalogue.KINDS, spec
        assert spec.meaning.strip() and spec.healthy.strip(), name
        assert gh.CATALOGUE[name] == spec.meaning
    current = [s.name for s in _catalogue._SPEC_LIST]
    assert len(current) == len(set(current))  # no name declared twice
    for old, new in _catalogue.DEPRECATED.items():
        assert new in current and old not in current, (old, new)
        assert _catalogue.SPECS[old].kind == _catalogue.SPECS[new].kind
        assert _catalogue.current_name(old) == new and _catalogue.deprecated_name(new) == old


def test_every_registered_field_names_a_declared_metric():
    assert _catalogue.STATE_FIELDS, "no state registered"
    for state_type, fields in _catalogue.STATE_FIELDS.items():
        for field, name in fields.items():
            assert field in state_type._fields, (state_type, field)
            assert _declared(name), (state_type.__name__, field, name)


def test_registering_an_unknown_field_is_a_clear_error():
    class Probe(tuple):
        _fields = ("probe_a",)

    with pytest.raises(ValueError, match=r"Probe has no field 'probe_b'"):
        gh.register_metrics(Probe, {"probe_b": "probe/b"})


def _all_states():
    params = {"dense": {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}}
    txs = [
        gh.dynamic_loss_scale(gh.guard(optax.adam(1e-3), clip=gh.ZScoreClip())),
        gh.clip_by_global_norm(1.0),
        gh.clip_by_value(1.0),
        gh.clip_by_leaf_norm(1.0),
        gh.adaptive_grad_clip(0.01),
        gh.adagc_clip(),
        gh.record_micro_batch_norms(2),
        gh.accumulate(optax.sgd(0.1), 2, micro_batch_size=2),
        gh.record_step_cosine(),
    ]
    states = [tx.init(params) for tx in txs]
    grads = jax.tree.map(lambda x: 0.5 * jnp.ones_like(x), params)
    stepped = [tx.update(grads, s, params)[1] for tx, s in zip(txs, states)]
    audit = gh.cross_device("data", num_devices=4).init(params)
    replay = gh.step_replay(jax.value_and_grad(lambda p: sum(jnp.sum(x) for x in jax.tree.leaves(p))))
    replayed = replay(replay.init(), states[0], params)[1]
    return [*states, *stepped, audit, replay.init(), replayed]


_DTYPES = {
    _catalogue.FLAG: {np.dtype(bool)},
    _catalogue.COUNT: {np.dtype(np.int32)},
    _catalogue.INDEX: {np.dtype(np.int32)},
    _catalogue.VALUE: {np.dtype(np.float32)},
}


def test_declared_kinds_match_the_arrays_metrics_returns():
    seen = set()
    for state in _all_states():
        for name, value in gh.metrics(state).items():
            spec = _catalogue.spec_of(name.split("#")[0])
            seen.add(spec.name)
            value = np.asarray(value)
            if spec.kind == _catalogue.VECTOR:
                if spec.name.endswith("/<path>"):  # one scalar entry per leaf
                    assert value.shape == (), name
                else:
                    assert value.ndim >= 1, name
                continue
            assert value.shape == () and value.dtype in _DTYPES[spec.kind], (name, spec.kind, value.dtype)
    # Every declared metric is returned by one of the states above.
    assert seen == set(_catalogue.SPECS), set(_catalogue.SPECS) - seen


def test_what_a_reset_keeps_is_declared_apart_from_logging(request):
    """_interfaces.keep_on_momentum_reset is the only declaration the reset reads; a
    registered metric state is not kept unless declared."""

    class Logged(tuple):
        _fields = ("logged_x",)

    gh.register_metrics(Logged, {"logged_x": "test/logged_x"})
    request.addfinalizer(lambda: _catalogue.STATE_FIELDS.pop(Logged, None))  # the registry is global
    assert not _interfaces.is_kept_on_momentum_reset(Logged((1,)))
    for state_type in (gh.GuardState, gh.LossScaleState, gh.CrossDeviceState, gh.ClipByGlobalNormState):
        assert _interfaces.is_kept_on_momentum_reset(state_type.__new__(state_type, *[None] * len(state_type._fields)))


# ----------------------------------------------------------------------------- renamed names


def test_deprecated_metric_names_are_returned_with_the_same_arrays_until_switched_off():
    tx = optax.chain(gh.clip_by_leaf_norm(1.0), gh.dynamic_loss_scale(gh.guard(optax.sgd(0.1))))
    params = {"dense": {"w": jnp.ones(3)}}
    state = tx.init(params)
    _, state = tx.update({"dense": {"w": jnp.array([3.0, 0.0, 4.0])}}, state, params)
    both, current = gh.metrics(state), gh.metrics(state, deprecated_names=False)
    old_names = set(both) - set(current)
    assert old_names == {
        "grad/layer_clip_fraction",
        "grad/layer_clipped/dense/w",
        "grad/layer_norm/dense/w",
        "grad/spike",
        "grad/overflow",
        "grad/rollback",
    }
    for old in old_names:
        new = _catalogue.current_name(old)
        assert new in current, old
        np.testing.assert_array_equal(np.asarray(both[old]), np.asarray(current[new]), err_msg=old)
    assert not any(_catalogue.deprecated_name(name) in current for name in current)


def test_a_log_with_the_old_names_is_read_and_diagnosed_under_the_new_ones():
    rows = [
        {"step": t, "grad/norm": 1.0, "grad/layer_norm/head": 1.0, "grad/rollback": float(t >= 30)} for t in range(40)
    ]
    history = gh.load_history(rows)
    assert history.has("grad/rollback_recommended") and history.has("grad/rollback")  # either name finds it
    assert history.leaf_names() == ["head"] and "grad/layer_norm/head" not in history.names
    assert [f.pattern for f in gh.diagnose(rows)] == ["rollback"]
    # A log written with both names keeps one column, the current one.
    both = [dict(row, **{"grad/rollback_recommended": row["grad/rollback"]}) for row in rows]
    assert "grad/rollback" not in gh.load_history(both).names


def test_old_names_with_a_copy_suffix_map_to_the_current_ones():
    """A second guard's old names (`grad/spike#2`) were left as they were: not merged
    with `grad/spiked#2`, not found under it, not declared."""
    assert _catalogue.current_name("grad/spike#2") == "grad/spiked#2"
    assert _catalogue.current_name("grad/rollback#12") == "grad/rollback_recommended#12"
    assert _catalogue.current_name("grad/layer_norm/dense/w#2") == "grad/leaf_norm/dense/w#2"
    assert _catalogue.current_name("grad/norm#2") == "grad/norm#2"
    assert _catalogue.current_name("grad/spike#x") == "grad/spike#x"  # not a copy suffix
    assert _catalogue.spec_of("grad/spike#2").name == "grad/spike"
    assert _catalogue.spec_of("grad/norm#3").name == "grad/norm"
    assert _catalogue.spec_of("xdev/device_norms#2/3").name == "xdev/device_norms"
    assert _catalogue.is_declared("grad/spiked#2") and _catalogue.is_declared("grad/rollback#2")
    assert not _catalogue.is_declared("grad/spiek#2") and not _catalogue.is_declared("grad/norm#2/0")
    with pytest.raises(KeyError, match="grad/nrom#2"):
        _catalogue.spec_of("grad/nrom#2")
    # A 0.1.0 log of two guards is read under the current names, copies included.
    rows = [{"step": 0, "grad/spike": 0.0, "grad/spike#2": 1.0, "grad/layer_norm/w#2": 2.0}]
    history = gh.load_history(rows)
    assert sorted(history.names) == ["grad/leaf_norm/w#2", "grad/spiked", "grad/spiked#2"]
    assert history["grad/spiked#2"].tolist() == [1.0] and history["grad/spike#2"].tolist() == [1.0]
    # Logged with both names (deprecated_names=True), one column per metric is left.
    both = gh.load_history([{"step": 0, "grad/spiked#2": 1.0, "grad/spike#2": 1.0}])
    assert list(both.names) == ["grad/spiked#2"]


@pytest.mark.parametrize(("old", "new"), list(gh._DEPRECATED_ATTRIBUTES.items()))
def test_deprecated_python_names_warn_and_give_the_new_object(old, new):
    with pytest.warns(DeprecationWarning, match=f"optax_gradhealth.{new}"):
        assert getattr(gh, old) is getattr(gh, new)
    with pytest.raises(AttributeError, match="no attribute 'layer_norm_typo'"):
        gh.layer_norm_typo  # noqa: B018


def test_metrics_deprecated_names_must_be_a_bool():
    state = gh.guard(optax.sgd(0.1)).init({"w": jnp.ones(2)})
    for bad in ("False", 0, None):
        with pytest.raises(TypeError, match=r"`deprecated_names` must be True or False"):
            gh.metrics(state, deprecated_names=bad)
    assert "grad/spike" not in gh.metrics(state, deprecated_names=np.bool_(False))
    assert "grad/spike" in gh.metrics(state, deprecated_names=np.bool_(True))


def test_register_metrics_validates_before_registering_anything():
    from typing import NamedTuple

    class Checked(NamedTuple):
        checked_count: jnp.ndarray

    before = dict(_catalogue.CATALOGUE)
    with pytest.raises(TypeError, match=r"`state_type` must be a NamedTuple type.*got 'not a type'"):
        gh.register_metrics("not a type", {})
    with pytest.raises(TypeError, match=r"`state_type` must be a NamedTuple type.*got <class 'dict'>"):
        gh.register_metrics(dict, {})
    with pytest.raises(TypeError, match=r"`fields` must be a dict"):
        gh.register_metrics(Checked, ["checked_count"])
    with pytest.raises(TypeError, match=r"metric name of field 'checked_count' must be a non-empty str, got 5"):
        gh.register_metrics(Checked, {"checked_count": 5})
    with pytest.raises(TypeError, match=r"`catalogue` must be None or a dict"):
        gh.register_metrics(Checked, {"checked_count": "checked/count"}, catalogue=["checked/count"])
    with pytest.raises(TypeError, match=r"meaning of 'checked/count' must be a str, got 5"):
        gh.register_metrics(Checked, {"checked_count": "checked/count"}, catalogue={"checked/count": 5})
    for builtin in ("grad/norm", "grad/spike", "grad/leaf_norm/dense/w", "xdev/device_norms/3"):
        with pytest.raises(ValueError, match=rf"{builtin!r} is a metric of optax_gradhealth"):
            gh.register_metrics(Checked, {"checked_count": "checked/count"}, catalogue={builtin: "my meaning"})
    assert Checked not in _catalogue.STATE_FIELDS
    assert _catalogue.CATALOGUE == before
    state = (Checked(jnp.int32(3)),)
    assert gh.metrics(state) == {}  # nothing was registered


# ----------------------------------------------------------------------------- per-leaf names


def _norm(x) -> float:
    return float(np.linalg.norm(np.asarray(x, np.float64)))


@pytest.mark.parametrize(
    ("params", "paths"),
    [
        ({"values": jnp.ones(3)}, {"values": ("values",)}),
        ({"values": {"w": jnp.ones(3), "b": jnp.ones(2)}}, {"values/b": ("values", "b"), "values/w": ("values", "w")}),
        ({"values": [jnp.ones(3), jnp.ones(2)]}, {"values/0": ("values", 0), "values/1": ("values", 1)}),
    ],
)
@pytest.mark.parametrize("in_guard", [False, True])
def test_a_parameter_tree_whose_only_key_is_values_is_named_by_its_paths(params, paths, in_guard):
    """A per-leaf field shaped {'values': ...} (the parameters' structure) was taken for
    an nnx-flattened LeafNorms: gh.metrics crashed or dropped the 'values/' path."""
    max_norm = 2.0
    clip = gh.clip_by_leaf_norm(max_norm)
    tx = gh.guard(optax.sgd(0.1), clip=clip) if in_guard else clip
    grads = jax.tree.map(lambda x: jnp.arange(1.0, 1.0 + x.size), params)
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    m = gh.metrics(state, deprecated_names=False)

    def leaf(path):
        x = grads
        for key in path:
            x = x[key]
        return x

    expected = {f"grad/leaf_clipped/{name}": _norm(leaf(path)) > max_norm for name, path in paths.items()}
    assert {k: bool(v) for k, v in m.items() if k.startswith("grad/leaf_clipped/")} == expected
    assert float(m["grad/leaf_clip_fraction"]) == pytest.approx(np.mean(list(expected.values())))
    if in_guard:
        for name, path in paths.items():
            assert float(m[f"grad/leaf_norm/{name}"]) == pytest.approx(_norm(leaf(path)), rel=1e-6)


def test_an_nnx_state_with_a_module_named_values_keeps_both_kinds_of_per_leaf_entries():
    from flax import nnx

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.values = nnx.Linear(3, 2, rngs=rngs)

    model = Model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, gh.guard(optax.sgd(0.1), clip=gh.clip_by_leaf_norm(1.0)), wrt=nnx.Param)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), nnx.state(model, nnx.Param))
    optimizer.update(model, grads)
    # bias [2] and kernel [3, 2] of 0.5: norms sqrt(2) / 2 and sqrt(6) / 2 (leaf order bias, kernel)
    norms = {"bias": np.sqrt(2 * 0.25), "kernel": np.sqrt(6 * 0.25)}
    from_dict = gh.metrics(nnx.state(optimizer), deprecated_names=False)
    for i, leaf in enumerate(("bias", "kernel")):  # the LeafNorms lost its names: indexed
        assert float(from_dict[f"grad/leaf_norm/{i}"]) == pytest.approx(norms[leaf], rel=1e-6)
        assert bool(from_dict[f"grad/leaf_clipped/values/{leaf}"]) == (norms[leaf] > 1.0)
    typed = gh.metrics(optimizer, deprecated_names=False)
    for leaf in ("bias", "kernel"):
        assert float(typed[f"grad/leaf_norm/values/{leaf}"]) == pytest.approx(norms[leaf], rel=1e-6)
        assert bool(typed[f"grad/leaf_clipped/values/{leaf}"]) == (norms[leaf] > 1.0)


def test_leaf_clipped_names_are_the_leaf_norm_names_when_two_paths_join_to_one_name():
    """{'a/b': x, 'a': {'b': y}}: grad/leaf_norm/ names them a/b and a/b(2); the
    grad/leaf_clipped/ entries were named per path, so one overwrote the other and kept
    the name of the other leaf's norm."""
    params = {"a/b": jnp.ones(2), "a": {"b": jnp.ones(2)}}
    grads = {"a/b": jnp.array([3.0, 4.0]), "a": {"b": jnp.array([0.3, 0.4])}}
    tx = gh.guard(optax.sgd(0.1), clip=gh.clip_by_leaf_norm(1.0))
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    m = gh.metrics(state, deprecated_names=False)
    norm_names = {k.removeprefix("grad/leaf_norm/") for k in m if k.startswith("grad/leaf_norm/")}
    clipped_names = {k.removeprefix("grad/leaf_clipped/") for k in m if k.startswith("grad/leaf_clipped/")}
    assert norm_names == clipped_names == {"a/b", "a/b(2)"}
    for name in norm_names:  # each name is one leaf: its flag is that leaf's norm against 1
        norm = float(m[f"grad/leaf_norm/{name}"])
        assert min(abs(norm - 5.0), abs(norm - 0.5)) < 1e-5  # the numpy norms of the two leaves
        assert bool(m[f"grad/leaf_clipped/{name}"]) == (norm > 1.0), name


# ----------------------------------------------------------------------------- the texts say what the code does


def test_a_skipped_step_keeps_the_clip_mode_and_step_cosine_readings_as_the_catalogue_says():
    max_abs = 0.5
    params = {"w": jnp.ones(512)}
    tx = gh.guard(optax.chain(gh.record_step_cosine(), optax.sgd(0.1)), clip=gh.clip_by_value(max_abs))
    state = tx.init(params)
    rng = np.random.default_rng(0)
    g1, g2 = rng.normal(size=512).astype(np.float32), rng.normal(size=512).astype(np.float32)
    for g in (g1, g2):
        _, state = tx.update({"w": jnp.asarray(g)}, state, params)
    accepted = jax.device_get(gh.metrics(state, deprecated_names=False))
    assert int(accepted["grad/num_value_clipped"]) == int(np.sum(np.abs(g2) > max_abs))
    _, state = tx.update({"w": jnp.full(512, jnp.nan)}, state, params)
    skipped = jax.device_get(gh.metrics(state, deprecated_names=False))
    assert bool(skipped["grad/skipped"])
    # Nothing was clipped on the NaN step (it never reached the clip): the count is g2's.
    assert int(skipped["grad/num_value_clipped"]) == int(np.sum(np.abs(g2) > max_abs))
    assert float(skipped["grad/value_clip_fraction"]) == pytest.approx(np.mean(np.abs(g2) > max_abs))
    assert float(skipped["grad/step_cosine"]) == float(accepted["grad/step_cosine"]) != 0.0
    kept = "a step gh.guard skipped keeps the last accepted step's value"
    for name in (
        "grad/num_value_clipped",
        "grad/value_clip_fraction",
        "grad/leaf_clip_fraction",
        "grad/leaf_clipped/<path>",
        "grad/num_agc_clipped",
        "grad/agc_clip_fraction",
        "grad/num_adagc_clipped",
        "grad/adagc_clip_fraction",
    ):
        assert kept in gh.CATALOGUE[name], name
    assert (
        "a skipped step does not reach it and keeps the last accepted step's value" in gh.CATALOGUE["grad/step_cosine"]
    )


def test_norm_clipped_with_a_clip_mode_is_the_norm_before_it_as_the_catalogue_says():
    params = {"w": jnp.ones(3)}
    g = np.array([3.0, 0.0, 4.0], np.float32)
    tx = gh.guard(optax.sgd(1.0), clip=gh.clip_by_value(1.0))
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
    m = gh.metrics(state, deprecated_names=False)
    assert _norm(-np.asarray(updates["w"])) == pytest.approx(_norm(np.clip(g, -1.0, 1.0)))  # what the sgd saw
    assert float(m["grad/norm_clipped"]) == pytest.approx(_norm(g))  # 5: before the clip mode
    assert not bool(m["grad/clipped"]) and np.isinf(float(m["grad/clip_threshold"]))
    assert "with a transformation as the guard's clip=" in gh.CATALOGUE["grad/norm_clipped"]
    assert "the norm before it" in gh.CATALOGUE["grad/norm_clipped"]


def test_num_steps_under_dynamic_loss_scale_is_the_calls_minus_the_overflows_as_the_catalogue_says():
    params = {"w": jnp.ones(2, jnp.float16)}
    tx = gh.dynamic_loss_scale(gh.guard(optax.sgd(0.1)), init_scale=2.0**10)
    state = tx.init(params)
    grads = [jnp.ones(2, jnp.float16), jnp.full(2, jnp.inf, jnp.float16), jnp.ones(2, jnp.float16)]
    for g in grads:  # the second "scaled gradient" overflowed
        _, state = tx.update({"w": g}, state, params)
    m = gh.metrics(state, deprecated_names=False)
    assert int(m["grad/num_overflows"]) == 1
    assert int(m["grad/num_steps"]) == len(grads) - 1
    assert "update calls minus grad/num_overflows" in _catalogue.SPECS["grad/num_steps"].healthy


def test_metrics_refuses_what_cannot_be_an_optimizer_state():
    """gh.metrics on the transformation, or on an nnx model instead of its optimizer, is
    a TypeError that says what to pass (an empty dict failed a line later as a bare
    KeyError); a state with no gradhealth part (the params, a bare optax state) is {}."""
    from flax import nnx

    params = {"w": jnp.ones((3, 2))}
    for tx in (gh.guard(optax.adamw(1e-2)), optax.adam(1e-2), gh.clip_by_global_norm(1.0)):
        with pytest.raises(TypeError, match=r"gh.metrics: got the transformation .*tx.init / tx.update returned"):
            gh.metrics(tx)
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"got a Linear, an nnx.Module that is not an nnx.Optimizer.*opt_state"):
        gh.metrics(model)
    optimizer = nnx.Optimizer(model, gh.guard(optax.sgd(0.1)), wrt=nnx.Param)

    class Trainer(nnx.Module):  # a Module that holds the optimizer: read through it
        def __init__(self):
            self.model, self.optimizer = model, optimizer

    global_names = lambda m: {name for name in m if name.count("/") == 1}  # per-leaf names differ from nnx.state
    expected = global_names(gh.metrics(optimizer.opt_state))
    assert "grad/norm" in expected
    assert global_names(gh.metrics(optimizer)) == expected == global_names(gh.metrics(Trainer()))
    assert gh.metrics(params) == {} and gh.metrics(optax.adam(1e-2).init(params)) == {}


def test_metrics_does_not_import_flax():
    """Reading a state needs no flax where the user never imported it (nnx objects cannot
    exist then)."""
    import subprocess
    import sys

    code = (
        "import sys, jax.numpy as jnp, optax, optax_gradhealth as gh\n"
        "state = gh.guard(optax.sgd(0.1)).init({'w': jnp.zeros(2)})\n"
        "assert 'grad/norm' in gh.metrics(state)\n"
        "assert gh.metrics({'w': jnp.zeros(2)}) == {}\n"
        "assert 'flax' not in sys.modules, sorted(m for m in sys.modules if m.startswith('flax'))[:3]\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
