"""Flax integration (nnx.Optimizer, TrainState) and orbax checkpoints (rollback, resume)."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import optax_gradhealth as gh
from tests.example_loader import load_example

ROOT = pathlib.Path(__file__).parents[1]


def reference_norm(tree):
    return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree))))


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(3, 4, rngs=rngs)
        self.b = nnx.Linear(4, 1, rngs=rngs)

    def __call__(self, x):
        return self.b(jnp.tanh(self.a(x)))


def mse(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


# ---------------------------------------------------------------- nnx.Optimizer


def test_nnx_optimizer_forwards_loss_and_metrics_read_it():
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, gh.guard(optax.adam(1e-2), clip=1.0), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y, loss_scale):
        loss, grads = nnx.value_and_grad(mse)(model, x, y)
        optimizer.update(model, grads, loss=loss * loss_scale)
        return grads, gh.metrics(optimizer)

    x, y = jnp.ones((5, 3)), jnp.zeros((5, 1))
    grads, metrics = step(model, optimizer, x, y, 1.0)
    assert float(metrics["grad/norm"]) == pytest.approx(reference_norm(grads), rel=1e-6)
    assert not bool(metrics["grad/skipped"])
    params_before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    # A NaN loss with finite gradients is only visible to the guard if loss= was forwarded.
    _, metrics = step(model, optimizer, x, y, jnp.nan)
    assert bool(metrics["grad/skipped"]) and not bool(metrics["grad/finite"])
    assert int(metrics["grad/num_nonfinite"]) == 1
    params_after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, params_before, params_after)


def test_metrics_of_the_optimizer_its_opt_state_and_its_nnx_state_agree():
    model = MLP(nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, gh.guard(optax.sgd(0.1), clip=0.5), wrt=nnx.Param)
    grads = nnx.grad(mse)(model, jnp.ones((2, 3)), jnp.ones((2, 1)))
    optimizer.update(model, grads, loss=jnp.float32(1.0))
    direct = jax.device_get(gh.metrics(optimizer, deprecated_names=False))
    other = jax.device_get(gh.metrics(optimizer.opt_state, deprecated_names=False))
    assert sorted(other) == sorted(direct)
    for name in direct:
        np.testing.assert_array_equal(other[name], direct[name])
    # nnx.state turns the per-layer norms (gh.LeafNorms) into a plain dict and loses
    # the leaf names: there they are indexed in leaf order (documented in metrics()).
    from_dict = jax.device_get(gh.metrics(nnx.state(optimizer), deprecated_names=False))
    per_leaf = ("grad/leaf_norm/", "update/leaf_param_ratio/")
    leaf_entries = []
    for prefix in per_leaf:
        entries = sorted(name for name in direct if name.startswith(prefix))
        assert len(entries) == 4, prefix
        for i, name in enumerate(entries):
            np.testing.assert_array_equal(from_dict[f"{prefix}{i}"], direct[name])
        leaf_entries += entries
    others = [name for name in direct if name not in leaf_entries]
    assert sorted(others) == sorted(n for n in from_dict if not n.startswith(per_leaf))
    for name in others:
        np.testing.assert_array_equal(from_dict[name], direct[name])
    assert any(name.startswith("grad/leaf_norm/a/") for name in direct)
    assert float(direct["grad/leaf_norm/a/kernel"]) == pytest.approx(reference_norm(grads["a"]["kernel"]), rel=1e-6)


def test_nnx_state_of_a_guard_without_update_health_keeps_the_guard_metrics():
    """nnx.state drops GuardReport's None fields (update_health=False); the dict was then
    not recognised as a GuardReport and every grad/norm, grad/clipped... was lost."""
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, gh.guard(optax.sgd(0.1), clip=1.0, update_health=False), wrt=nnx.Param)
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    optimizer.update(model, grads, loss=jnp.float32(1.0))
    from_dict = jax.device_get(gh.metrics(nnx.state(optimizer), deprecated_names=False))
    direct = jax.device_get(gh.metrics(optimizer, deprecated_names=False))
    # norm of 8 ones (kernel 3x2, bias 2) = sqrt(8); clipped to 1.0
    assert float(from_dict["grad/norm"]) == pytest.approx(2.8284271, rel=1e-6)
    assert float(from_dict["grad/clip_threshold"]) == 1.0 and bool(from_dict["grad/clipped"])
    assert float(from_dict["grad/norm_clipped"]) == pytest.approx(1.0, rel=1e-6)
    assert bool(from_dict["grad/finite"]) and not bool(from_dict["grad/skipped"])
    # leaf order bias, kernel: sqrt(2), sqrt(6)
    assert float(from_dict["grad/leaf_norm/0"]) == pytest.approx(1.4142136, rel=1e-6)
    assert float(from_dict["grad/leaf_norm/1"]) == pytest.approx(2.4494897, rel=1e-6)
    assert "update/norm" not in from_dict and "update/norm" not in direct
    globals_direct = sorted(n for n in direct if not n.startswith("grad/leaf_norm/"))
    assert globals_direct == sorted(n for n in from_dict if not n.startswith("grad/leaf_norm/"))


# ---------------------------------------------------------------- TrainState


def test_train_state_apply_gradients_does_not_forward_loss():
    state = train_state.TrainState.create(apply_fn=None, params={"w": jnp.ones(2)}, tx=gh.guard(optax.sgd(0.1)))
    with pytest.raises(TypeError, match="loss"):
        state.apply_gradients(grads={"w": jnp.ones(2)}, loss=jnp.float32(1.0))


def apply_gradients_with_loss(state, grads, loss):
    """The workaround documented in docs/logging.md: call tx.update yourself."""
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params, loss=loss)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)


def test_train_state_workaround_passes_loss_and_metrics_read_the_state():
    state = train_state.TrainState.create(apply_fn=None, params={"w": jnp.ones(2)}, tx=gh.guard(optax.sgd(0.1)))
    step = jax.jit(apply_gradients_with_loss)
    state = step(state, {"w": jnp.array([3.0, 4.0])}, jnp.float32(1.0))
    np.testing.assert_allclose(np.asarray(state.params["w"]), [1 - 0.3, 1 - 0.4], rtol=1e-6)
    assert float(gh.metrics(state)["grad/norm"]) == pytest.approx(5.0)
    state = step(state, {"w": jnp.array([3.0, 4.0])}, jnp.float32(jnp.nan))
    metrics = gh.metrics(state)  # the TrainState itself, or state.opt_state
    assert bool(metrics["grad/skipped"]) and int(metrics["grad/num_steps"]) == 2
    np.testing.assert_allclose(np.asarray(state.params["w"]), [0.7, 0.6], rtol=1e-6)
    assert int(state.step) == 2


def test_train_state_with_a_guard_round_trips_through_flax_msgpack():
    """flax.serialization.to_bytes failed: "can not serialize 'LeafNorms' object"."""
    from flax import serialization

    tx = gh.guard(optax.sgd(0.1))
    state = train_state.TrainState.create(apply_fn=None, params={"b": jnp.zeros(2), "w": jnp.ones(2)}, tx=tx)
    state = jax.jit(apply_gradients_with_loss)(
        state, {"b": jnp.array([0.0, 1.0]), "w": jnp.array([3.0, 4.0])}, jnp.float32(1.0)
    )
    state_dict = serialization.to_state_dict(state)
    np.testing.assert_array_equal(state_dict["opt_state"]["guard_report"]["guard_leaf_norms"]["values"], [1.0, 5.0])
    blob = serialization.to_bytes(state)
    target = train_state.TrainState.create(apply_fn=None, params={"b": jnp.zeros(2), "w": jnp.ones(2)}, tx=tx)
    restored = serialization.from_bytes(target, blob)
    norms = restored.opt_state.guard_report.guard_leaf_norms
    assert isinstance(norms, gh.LeafNorms) and norms.names == ("b", "w")
    assert norms.values.tolist() == [1.0, 5.0]
    metrics = gh.metrics(restored, deprecated_names=False)
    assert float(metrics["grad/leaf_norm/w"]) == 5.0 and float(metrics["grad/leaf_norm/b"]) == 1.0
    assert float(metrics["grad/norm"]) == pytest.approx(5.0990195, rel=1e-6)  # sqrt(26)
    assert int(metrics["grad/num_steps"]) == 1 and int(restored.step) == 1
    np.testing.assert_allclose(np.asarray(restored.params["w"]), [0.7, 0.6], rtol=1e-6)
    # Values for other parameters (2 norms into a 3-leaf target) are refused, not mislabelled.
    three_leaves = gh.LeafNorms.zeros({"a": jnp.zeros(1), "b": jnp.zeros(2), "w": jnp.ones(2)})
    with pytest.raises(ValueError, match="3 leaves"):
        serialization.from_state_dict(three_leaves, {"values": np.array([1.0, 5.0], np.float32)})


def test_leaf_norms_register_with_flax_imported_after_optax_gradhealth():
    """The registration never imports flax: it waits for flax in sys.modules."""
    import subprocess
    import sys

    code = (
        "import sys, jax, jax.numpy as jnp, optax, optax_gradhealth as gh\n"
        "assert 'flax' not in sys.modules\n"
        "tx = gh.guard(optax.sgd(0.1)); params = {'w': jnp.ones(2)}\n"
        "state = tx.init(params)\n"
        "from flax import serialization\n"
        "_, state = tx.update({'w': jnp.array([3.0, 4.0])}, state, params)\n"
        "back = serialization.from_bytes(tx.init(params), serialization.to_bytes(state))\n"
        "print(type(back.guard_report.guard_leaf_norms).__name__, back.guard_report.guard_leaf_norms.values.tolist())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "LeafNorms [5.0]"


# ---------------------------------------------------------------- orbax


def assert_trees_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def rollback_example():
    return load_example("rollback_orbax")


def test_rollback_restores_the_last_healthy_checkpoint(tmp_path, rollback_example):
    ex = rollback_example
    # NaN batches at 45..52: the 5th in a row (step 49) raises the rollback recommendation.
    run = ex.train(70, str(tmp_path / "ckpt"), save_every=10, bad_from=45, bad_steps=8)
    assert run["saved"][:5] == [0, 10, 20, 30, 40]
    assert run["rollbacks"] == [(49, 30)]  # 40 is the newest, not yet confirmed by a clean interval
    assert run["flags"][49] and not any(run["flags"][50:])  # restored state: flag cleared
    # The restored checkpoint holds the state of a clean run after step 30 (data depend on the step only).
    clean = ex.train(31, str(tmp_path / "clean"), save_every=1000)
    manager = ex.checkpoint_manager(str(tmp_path / "ckpt"))
    params, opt_state, _ = ex.restore(manager, 30, clean["params"], clean["opt_state"])
    manager.close()
    assert_trees_bitwise_equal(params, clean["params"])
    assert_trees_bitwise_equal(opt_state, clean["opt_state"])
    assert not bool(gh.metrics(opt_state)["grad/rollback_recommended"])


def test_guard_state_round_trips_and_a_resumed_run_is_bit_identical(tmp_path, rollback_example):
    ex = rollback_example
    # Include a skipped NaN step and clipping so that counters and statistics are non-trivial.
    full = ex.train(60, str(tmp_path / "a"), save_every=10, bad_from=15, bad_steps=1)
    manager = ex.checkpoint_manager(str(tmp_path / "a"))
    like_params = ex.init_params(123)  # any values: only the structure is used
    like_state = ex.make_optimizer().init(like_params)
    params, opt_state, step = ex.restore(manager, 30, like_params, like_state)
    manager.close()
    assert step == 30
    metrics = jax.device_get(gh.metrics(opt_state))
    assert int(metrics["grad/num_steps"]) == 31 and int(metrics["grad/num_nonfinite"]) == 1
    assert metrics["grad/skipped"].dtype == np.bool_ and metrics["grad/num_steps"].dtype == np.int32
    resumed = ex.train(60, str(tmp_path / "b"), start=31, state=(params, opt_state), save_every=1000)
    assert_trees_bitwise_equal(resumed["params"], full["params"])
    assert_trees_bitwise_equal(resumed["opt_state"], full["opt_state"])


def test_guard_on_gradients_of_an_nnx_split_state():
    """The functional NNX pattern: params = nnx.split(model, nnx.Param)[1] and gradients
    taken with respect to them (their leaves are nnx.Param nodes). The guard measures
    and steps as bare adamw does, and its state keeps the structure of init."""
    model = MLP(nnx.Rngs(2))
    graphdef, params = nnx.split(model, nnx.Param)
    x, y = jnp.ones((2, 3)), jnp.zeros((2, 1))

    def loss_fn(params):
        return mse(nnx.merge(graphdef, params), x, y)

    guarded, bare = gh.guard(optax.adam(0.1)), optax.adam(0.1)
    state, bare_state = guarded.init(params), bare.init(params)
    structure = jax.tree.structure(state)
    p_guarded = p_bare = params
    for _ in range(3):
        grads = jax.grad(loss_fn)(p_guarded)
        norm = reference_norm(grads)
        updates, state = jax.jit(guarded.update)(grads, state, p_guarded)
        assert jax.tree.structure(state) == structure
        assert float(gh.metrics(state)["grad/norm"]) == pytest.approx(norm, rel=1e-6)
        p_guarded = optax.apply_updates(p_guarded, updates)
        bare_updates, bare_state = bare.update(jax.grad(loss_fn)(p_bare), bare_state, p_bare)
        p_bare = optax.apply_updates(p_bare, bare_updates)
    for a, b in zip(jax.tree.leaves(p_guarded), jax.tree.leaves(p_bare)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)  # jit vs eager
    assert set(gh.metrics(state, deprecated_names=False)) >= {"grad/leaf_norm/a/kernel", "grad/leaf_norm/b/bias"}


_MAKERS = {
    "guard": lambda: gh.guard(optax.adam(0.1), clip=0.5),
    "global_norm": lambda: gh.clip_by_global_norm(0.5),
    "leaf_norm": lambda: gh.clip_by_leaf_norm(0.2),
    "agc": lambda: gh.adaptive_grad_clip(0.05),
    "value": lambda: gh.clip_by_value(0.05),
    "guard+leaf_norm": lambda: gh.guard(optax.sgd(0.1), clip=gh.clip_by_leaf_norm(0.2)),
}
_STATELESS = ("global_norm", "leaf_norm", "agc", "value")


@pytest.mark.parametrize(
    ("name", "wrapped_grads"),
    [(name, True) for name in _MAKERS] + [(name, False) for name in _STATELESS],
)
def test_transformations_on_nnx_param_states_equal_plain_trees(name, wrapped_grads):
    """Initialised with an nnx.split state (nnx.Param leaves), updated with gradients
    that are Param-wrapped (jax.grad of it) or, for the stateless clips, plain (a
    stateful optimizer's moments take the gradients' wrapping: see the error test
    below): the same updates and metrics as on plain dicts, and the state keeps its
    structure."""
    make = _MAKERS[name]
    model = MLP(nnx.Rngs(4))
    graphdef, params = nnx.split(model, nnx.Param)
    grads = jax.grad(lambda p: mse(nnx.merge(graphdef, p), jnp.ones((2, 3)), jnp.ones((2, 1))))(params)
    plain_params, plain_grads = (nnx.to_pure_dict(t) for t in (params, grads))
    unwrapped = lambda v: v.get_value() if isinstance(v, nnx.Variable) else v
    state_grads = jax.tree.map(unwrapped, grads, is_leaf=lambda v: isinstance(v, nnx.Variable))  # nnx.grad's form
    tx = make()
    state = tx.init(params)
    updates, new_state = jax.jit(tx.update)(grads if wrapped_grads else state_grads, state, params)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    plain_tx = make()
    plain_updates, plain_state = plain_tx.update(plain_grads, plain_tx.init(plain_params), plain_params)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(plain_updates)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    m, plain_m = gh.metrics(new_state), gh.metrics(plain_state)
    assert m.keys() == plain_m.keys()
    for metric in m:
        np.testing.assert_allclose(np.asarray(m[metric]), np.asarray(plain_m[metric]), rtol=1e-6, err_msg=metric)


def test_guard_says_what_to_do_when_init_and_gradients_differ_in_nnx_wrapping():
    model = MLP(nnx.Rngs(4))
    _, params = nnx.split(model, nnx.Param)
    plain = jax.tree.map(lambda v: v.get_value() if isinstance(v, nnx.Variable) else v, params,
                         is_leaf=lambda v: isinstance(v, nnx.Variable))  # fmt: skip
    tx = gh.guard(optax.adam(0.1))
    with pytest.raises(ValueError, match=r"flax\.nnx\.Param-wrapped parameters and updated with plain gradients"):
        tx.update(plain, tx.init(params), params)
