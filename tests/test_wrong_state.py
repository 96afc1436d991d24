"""A state of the wrong type handed to a transformation's update (another optimizer's,
the inner optimizer's, a state dict, None) is refused with a TypeError naming the
transformation, what it got and what it takes; every form accepted before still is."""

from __future__ import annotations

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gradhealth as gh

PARAMS = {"w": np.linspace(-1.0, 1.0, 6, dtype=np.float32).reshape(3, 2), "b": np.array([0.5, -2.0], np.float32)}
GRADS = {"w": np.full((3, 2), 0.75, np.float32), "b": np.array([3.0, -4.0], np.float32)}

# (name in the error, factory, its state class)
TRANSFORMATIONS = [
    ("gh.clip_by_global_norm", lambda: gh.clip_by_global_norm(1.0), gh.ClipByGlobalNormState),
    ("gh.clip_by_value", lambda: gh.clip_by_value(1.0), gh.ClipByValueState),
    ("gh.clip_by_leaf_norm", lambda: gh.clip_by_leaf_norm(1.0), gh.ClipByLeafNormState),
    ("gh.adaptive_grad_clip", lambda: gh.adaptive_grad_clip(0.1), gh.AdaptiveClipState),
    ("gh.adagc_clip", lambda: gh.adagc_clip(), gh.AdaGCState),
    ("gh.record_micro_batch_norms", lambda: gh.record_micro_batch_norms(2), gh.MicroBatchNormsState),
    ("gh.accumulate", lambda: gh.accumulate(optax.sgd(0.1), 2), gh.AccumulationState),
    ("gh.dynamic_loss_scale", lambda: gh.dynamic_loss_scale(optax.sgd(0.1)), gh.LossScaleState),
    ("gh.record_step_cosine", lambda: gh.record_step_cosine(), gh.StepCosineState),
    ("gh.cross_device", lambda: gh.cross_device("data", num_devices=2), gh.CrossDeviceState),
]
IDS = [t[0] for t in TRANSFORMATIONS]


def _refused(tx, state):
    with pytest.raises(TypeError) as info:
        tx.update(GRADS, state, PARAMS)
    return str(info.value)


@pytest.mark.parametrize(("name", "make", "cls"), TRANSFORMATIONS, ids=IDS)
def test_another_optimizers_state_is_refused_by_name(name, make, cls):
    msg = _refused(make(), optax.adamw(1e-3).init(PARAMS))
    assert msg.startswith(f"{name}: `state` must be the {cls.__name__} that this transformation's init returned")
    assert "got a tuple of (ScaleByAdamState, " in msg
    assert "an optax state" in msg
    assert f"before {name} was added? Restore the params alone and call tx.init(params)" in msg


@pytest.mark.parametrize(("name", "make", "cls"), TRANSFORMATIONS, ids=IDS)
def test_state_dict_and_none_are_refused_by_name(name, make, cls):
    state = make().init(PARAMS) if name != "gh.cross_device" else None
    if state is not None:
        msg = _refused(make(), flax.serialization.to_state_dict(state))
        assert msg.startswith(f"{name}: `state` must be the {cls.__name__}")
        assert f"got a dict with keys {cls._fields[0]!r}" in msg
        assert "flax.serialization.from_state_dict(tx.init(params), state_dict)" in msg
    msg = _refused(make(), None)
    assert msg.startswith(f"{name}: `state` must be the {cls.__name__}") and "got None" in msg


@pytest.mark.parametrize(
    ("name", "make", "field"),
    [
        ("gh.accumulate", lambda: gh.accumulate(gh.guard(optax.adamw(1e-3)), 2), "accumulation_inner_state"),
        ("gh.dynamic_loss_scale", lambda: gh.dynamic_loss_scale(gh.guard(optax.adamw(1e-3))), "loss_scale_inner_state"),
    ],
)
def test_the_wrapped_optimizers_state_is_refused_with_a_pointer_to_the_outer_one(name, make, field):
    tx = make()
    inner = getattr(tx.init(PARAMS), field)
    msg = _refused(tx, inner)
    assert f"got optax.{type(inner).__name__}" in msg or f"got optax_gradhealth.{type(inner).__name__}" in msg
    assert f"The state of the optimizer that {name} wraps? Pass {name}'s own state" in msg
    assert f"(state.{field})" in msg
    # the guard's state handed to a transformation around the guard
    msg = _refused(tx, gh.guard(optax.adamw(1e-3)).init(PARAMS))
    assert "got optax_gradhealth.GuardState" in msg and "another gradhealth transformation (GuardState)" in msg


def test_refused_under_jit_and_inside_a_chain():
    tx = optax.chain(gh.clip_by_global_norm(1.0), optax.sgd(0.1))
    wrong = (optax.adamw(1e-3).init(PARAMS), optax.sgd(0.1).init(PARAMS))
    with pytest.raises(TypeError, match=r"^gh.clip_by_global_norm: `state` must be the ClipByGlobalNormState"):
        jax.jit(tx.update)(GRADS, wrong, PARAMS)


def test_refused_inside_pmap():
    tx = gh.cross_device("data")
    k = jax.local_device_count()
    grads = jax.tree.map(lambda g: np.stack([g] * k), GRADS)
    with pytest.raises(TypeError, match=r"^gh.cross_device: `state` must be the CrossDeviceState"):
        jax.pmap(tx.update, axis_name="data")(grads, jax.tree.map(lambda g: g[:, 0], grads))


def _clipped_reference(grads, max_norm):
    """optax.clip_by_global_norm's update, in numpy float64."""
    norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in grads.values()))
    return {k: np.asarray(g, np.float64) * min(1.0, max_norm / norm) for k, g in grads.items()}


@pytest.mark.parametrize(
    "wrap",
    [
        lambda tx: tx,
        lambda tx: optax.MultiSteps(tx, 1).gradient_transformation(),
        lambda tx: optax.masked(tx, {"w": True, "b": True}),
        lambda tx: optax.chain(optax.identity(), tx),
        lambda tx: optax.named_chain(("clip", tx)),
    ],
    ids=["bare", "MultiSteps", "masked", "chain", "named_chain"],
)
@pytest.mark.parametrize("restore", [False, True], ids=["state", "flax_restored"])
def test_every_accepted_state_form_still_works(wrap, restore):
    tx = wrap(gh.clip_by_global_norm(1.0))
    state = tx.init(PARAMS)
    if restore:  # a checkpoint restored into the structure of tx.init(params)
        saved = jax.device_get(flax.serialization.to_state_dict(state))
        state = flax.serialization.from_state_dict(tx.init(PARAMS), saved)
    updates, state = jax.jit(tx.update)(GRADS, state, PARAMS)
    updates, _ = tx.update(GRADS, state, PARAMS)
    want = _clipped_reference(GRADS, 1.0)
    for k in want:
        np.testing.assert_allclose(np.asarray(updates[k], np.float64), want[k], rtol=1e-6)


def test_inject_hyperparams_state_is_accepted():
    tx = optax.inject_hyperparams(gh.clip_by_global_norm)(max_norm=2.0)
    state = tx.init(PARAMS)
    for _ in range(2):
        updates, state = jax.jit(tx.update)(GRADS, state, PARAMS)
    want = _clipped_reference(GRADS, 2.0)
    for k in want:
        np.testing.assert_allclose(np.asarray(updates[k], np.float64), want[k], rtol=1e-6)
    assert isinstance(state.inner_state, gh.ClipByGlobalNormState)


@pytest.mark.parametrize(("name", "make", "cls"), TRANSFORMATIONS[:-1], ids=IDS[:-1])
def test_own_state_and_restored_state_are_accepted(name, make, cls):
    tx = make()
    state = tx.init(PARAMS)
    restored = flax.serialization.from_state_dict(tx.init(PARAMS), flax.serialization.to_state_dict(state))
    assert type(restored) is cls
    for s in (state, restored):
        _, new = tx.update(GRADS, s, PARAMS)
        assert type(new) is cls
    assert jnp.shape(jax.tree.leaves(new)[0]) == jnp.shape(jax.tree.leaves(state)[0])
