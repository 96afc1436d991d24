"""gh.step_replay (issue 15, part 5): a flagged step's gradient is computed again, and a
different result (a transient fault, injected here through a host callback that
corrupts chosen calls) is told apart from bad data (the same result twice).

References are runs of the same train step without the fault (or without the replay),
never values read from the state under test.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gradhealth as gh

DIM = 6


class Faults:
    """A host-side source of faults: ``plan[step]`` lists the factors returned by the
    successive calls made at that step (then 1.0); every call is counted."""

    def __init__(self, plan: dict[int, list[float]] | None = None):
        self.plan = {step: list(factors) for step, factors in (plan or {}).items()}
        self.calls: dict[int, int] = {}

    def __call__(self, step):
        step = int(step)
        self.calls[step] = self.calls.get(step, 0) + 1
        factors = self.plan.get(step, [])
        return np.float32(factors.pop(0) if factors else 1.0)


def _loss_fn(faults: Faults):
    def loss_fn(w, x, step):
        factor = jax.experimental.io_callback(faults, jax.ShapeDtypeStruct((), jnp.float32), step, ordered=False)
        return jnp.mean((x @ w - 1.0) ** 2) * factor

    return loss_fn


def _batches(num_steps: int, nan_at: int | None = None):
    rng = np.random.default_rng(0)
    out = [jnp.asarray(rng.normal(size=(8, DIM)), jnp.float32) for _ in range(num_steps)]
    if nan_at is not None:
        out[nan_at] = out[nan_at].at[0, 0].set(jnp.nan)
    return out


class _ActiveFaults:
    """The fault source of the `_train` run in progress: the train step is compiled once
    (per `replay`) with this object's callback, which reads ``faults`` when it runs."""

    faults = Faults()

    def __call__(self, step):
        return self.faults(step)


_ACTIVE_FAULTS = _ActiveFaults()


@functools.cache
def _train_step(replay: bool):
    tx = gh.guard(optax.sgd(0.05))
    vg = jax.value_and_grad(_loss_fn(_ACTIVE_FAULTS))
    replayer = gh.step_replay(vg)

    @jax.jit
    def step(w, opt_state, replay_state, x, t):
        if replay:
            (loss, grads), replay_state = replayer(replay_state, opt_state, w, x, t)
        else:
            loss, grads = vg(w, x, t)
        updates, opt_state = tx.update(grads, opt_state, w, loss=loss)
        return optax.apply_updates(w, updates), opt_state, replay_state

    return tx, replayer, step


def _run_steps(faults: Faults, batches, replay: bool):
    """Yields ``(w, opt_state, replay_state)`` after each step of the shared train step,
    its loss corrupted by ``faults``."""
    tx, replayer, step = _train_step(replay)
    w = jnp.full((DIM,), 0.1, jnp.float32)  # not weak-typed: the step's outputs are not
    opt_state, replay_state = tx.init(w), replayer.init()
    _ACTIVE_FAULTS.faults = faults
    try:
        for t, x in enumerate(batches):
            w, opt_state, replay_state = step(w, opt_state, replay_state, x, jnp.int32(t))
            yield w, opt_state, replay_state
        jax.block_until_ready((w, opt_state, replay_state))  # every callback has run
    finally:
        _ACTIVE_FAULTS.faults = Faults()


def _train(faults: Faults, batches, replay: bool):
    *_, (w, opt_state, replay_state) = _run_steps(faults, batches, replay)
    return np.asarray(w), gh.metrics(opt_state), gh.metrics(replay_state)


def test_clean_steps_compute_the_gradient_once_and_match_the_plain_step():
    faults = Faults()
    w, _, r = _train(faults, _batches(30), replay=True)
    assert set(faults.calls.values()) == {1}  # the second computation never ran
    w_plain, _, _ = _train(Faults(), _batches(30), replay=False)
    np.testing.assert_array_equal(w, w_plain)
    assert int(r["grad/num_replays"]) == 0 and int(r["grad/num_replay_mismatches"]) == 0


def test_a_transient_nan_is_recomputed_and_the_step_is_not_lost():
    faults = Faults({5: [np.nan]})  # the first computation of step 5 is corrupted
    w, m, r = _train(faults, _batches(12), replay=True)
    assert faults.calls[5] == 2 and faults.calls[4] == 1
    assert int(r["grad/num_replays"]) == 1
    assert int(r["grad/num_replay_mismatches"]) == 1 and int(r["grad/num_replay_recovered"]) == 1
    assert int(m["grad/num_skipped"]) == 0 and int(m["grad/num_nonfinite"]) == 0
    clean, _, _ = _train(Faults(), _batches(12), replay=True)
    np.testing.assert_array_equal(w, clean)  # as if the fault never happened


def test_a_transient_spike_is_recomputed_after_the_guards_warmup():
    """A 200x loss on one computation at step 30: the guard's spike rule (its window is
    read from the optimizer state) flags it, the second computation is healthy."""
    faults = Faults({30: [200.0]})
    w, m, r = _train(faults, _batches(36), replay=True)
    assert faults.calls[30] == 2
    assert int(r["grad/num_replay_recovered"]) == 1
    assert int(m["grad/num_spikes"]) == 0
    clean, _, _ = _train(Faults(), _batches(36), replay=True)
    np.testing.assert_array_equal(w, clean)
    # Without the replay, the guard skips the spike: the runs differ.
    skipped, m_plain, _ = _train(Faults({30: [200.0]}), _batches(36), replay=False)
    assert int(m_plain["grad/num_spikes"]) == 1 and not np.array_equal(skipped, clean)


def test_bad_data_gives_the_same_gradient_twice_and_the_guard_skips_it():
    faults = Faults()
    w, m, r = _train(faults, _batches(12, nan_at=5), replay=True)
    assert faults.calls[5] == 2
    assert int(r["grad/num_replays"]) == 1 and int(r["grad/num_replay_mismatches"]) == 0
    assert int(m["grad/num_skipped"]) == 1 and int(m["grad/num_nonfinite"]) == 1
    without, _, _ = _train(Faults(), _batches(12, nan_at=5), replay=False)
    np.testing.assert_array_equal(w, without)


def test_a_fault_whose_second_computation_is_also_bad_is_left_to_the_guard():
    """Both computations of step 5 are corrupted, differently: a fault (counted), but
    the second result is no better, so the first goes on and the guard skips it."""
    faults = Faults({5: [np.nan, np.inf]})
    _, m, r = _train(faults, _batches(8), replay=True)
    assert int(r["grad/num_replay_mismatches"]) == 1 and int(r["grad/num_replay_recovered"]) == 0
    assert int(m["grad/num_skipped"]) == 1


def test_without_a_guard_only_nonfinite_steps_are_replayed():
    loss_fn = lambda w, x: jnp.sum((w * x) ** 2)
    replay = gh.step_replay(jax.value_and_grad(loss_fn))
    state = replay.init()
    w = jnp.ones(3)
    _, state = jax.jit(replay)(state, optax.sgd(0.1).init(w), w, jnp.full(3, 1e6))  # huge but finite
    assert not bool(gh.metrics(state)["grad/replayed"])
    _, state = jax.jit(replay)(state, None, w, jnp.array([1.0, jnp.inf, 1.0]))
    assert bool(gh.metrics(state)["grad/replayed"]) and int(gh.metrics(state)["grad/num_replays"]) == 1


def test_has_aux_values_are_replayed_and_returned():
    def loss_fn(w, x):
        loss = jnp.sum((w * x) ** 2)
        return loss, {"loss_again": loss}

    replay = gh.step_replay(jax.value_and_grad(loss_fn, has_aux=True))
    w = jnp.ones(2)
    ((loss, aux), grads), state = replay(replay.init(), None, w, jnp.array([1.0, jnp.nan]))
    assert bool(gh.metrics(state)["grad/replayed"]) and not bool(gh.metrics(state)["grad/replay_mismatched"])
    assert bool(jnp.isnan(loss)) and bool(jnp.isnan(aux["loss_again"]))
    ((loss, aux), grads), state = replay(state, None, w, jnp.array([1.0, 2.0]))
    np.testing.assert_allclose(float(loss), 5.0)
    np.testing.assert_allclose(np.asarray(grads), [2.0, 8.0])


def test_the_state_keeps_its_structure_through_a_scan():
    loss_fn = lambda w, x: jnp.sum((w * x) ** 2)
    replay = gh.step_replay(jax.value_and_grad(loss_fn))
    tx = gh.guard(optax.sgd(0.1))
    w = jnp.ones(3)
    xs = jnp.stack([jnp.ones(3), jnp.full(3, jnp.nan), jnp.ones(3)])

    def body(carry, x):
        w, opt_state, state = carry
        (loss, grads), state = replay(state, opt_state, w, x)
        updates, opt_state = tx.update(grads, opt_state, w, loss=loss)
        return (optax.apply_updates(w, updates), opt_state, state), None

    (_, _, state), _ = jax.lax.scan(body, (w, tx.init(w), replay.init()), xs)
    assert int(state.replay_num_replays) == 1
    assert jax.tree.structure(state) == jax.tree.structure(replay.init())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"spike_threshold": 1.0}, r"spike_threshold.*> 1.*1\.0"),
        ({"spike_zscore": -1.0}, r"spike_zscore"),
        ({"warmup_steps": 0}, r"warmup_steps"),
    ],
)
def test_bad_arguments_are_rejected_at_construction(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        gh.step_replay(jax.value_and_grad(lambda w: jnp.sum(w)), **kwargs)
    with pytest.raises(TypeError, match="value_and_grad_fn"):
        gh.step_replay("not a function")


def test_diagnose_reports_the_fault_from_the_run_metrics():
    rows = []
    for t, (_, opt_state, replay_state) in enumerate(_run_steps(Faults({5: [np.nan]}), _batches(10), replay=True)):
        metrics = gh.metrics((opt_state, replay_state), deprecated_names=False)
        rows.append({"step": t, **{k: np.asarray(v).tolist() for k, v in metrics.items()}})
    found = {f.pattern: f for f in gh.diagnose(rows)}
    assert set(found) == {"replay_mismatch"}
    assert found["replay_mismatch"].steps == (5,)
    assert found["replay_mismatch"].evidence == {
        "num_replay_mismatches": 1,
        "first_logged_step": 5,
        "num_replay_recovered": 1,
    }


@pytest.mark.parametrize("source", ["optimizer", "opt_state"])
def test_the_guard_is_found_in_an_nnx_optimizer(source):
    """With flax.nnx the guard's state sits in an nnx.Optimizer (its leaves nnx
    variables): the replay reads its spike window there, as gh.metrics does, and
    replays the step the guard calls a spike."""
    from flax import nnx

    model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, gh.guard(optax.sgd(0.01), warmup_steps=1), wrt=nnx.Param)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, x):
        return jnp.mean(nnx.merge(graphdef, params, rest)(x) ** 2)

    replay = gh.step_replay(jax.value_and_grad(loss_fn), warmup_steps=1)
    replay_state = replay.init()
    replayed, spiked = [], []
    for i in range(4):
        params = nnx.state(model, nnx.Param)
        held = optimizer if source == "optimizer" else optimizer.opt_state
        (loss, grads), replay_state = replay(replay_state, held, params, jnp.ones((2, 3)) * (1 if i < 3 else 1000))
        optimizer.update(model, grads, loss=loss)
        replayed.append(bool(gh.metrics(replay_state)["grad/replayed"]))
        spiked.append(bool(gh.metrics(optimizer)["grad/spiked"]))
    assert replayed == spiked == [False, False, False, True]


@pytest.mark.parametrize("wrapper", ["none", "MultiSteps", "accumulate", "chain(MultiSteps)"])
def test_under_accumulation_only_nonfinite_micro_steps_are_replayed(wrapper):
    """Inside optax.MultiSteps / gh.accumulate the guard's window holds norms of
    accumulated means, not comparable with one micro-batch's: a micro-batch 100x the
    window's norms (a spike against it, as the bare guard shows) is not replayed there;
    a non-finite one still is."""
    every_k = 4
    inner = gh.guard(optax.sgd(0.1), warmup_steps=2)
    tx = {
        "none": inner,
        "MultiSteps": optax.MultiSteps(inner, every_k).gradient_transformation(),
        "accumulate": gh.accumulate(inner, every_k),
        "chain(MultiSteps)": optax.chain(optax.MultiSteps(inner, every_k).gradient_transformation()),
    }[wrapper]
    w = jnp.zeros(3)
    opt_state = tx.init(w)
    rng = np.random.default_rng(0)
    g = rng.normal(size=(8 * every_k, 3))  # unit-norm gradients: the window fills with norms ~1
    g = jnp.asarray(g / np.linalg.norm(g, axis=1, keepdims=True), jnp.float32)
    opt_state, _ = jax.lax.scan(lambda s, g: (tx.update(g, s, w)[1], None), opt_state, g)
    replay = gh.step_replay(jax.value_and_grad(lambda w, x: jnp.sum(w * x)), warmup_steps=2)  # gradient: x
    call = jax.jit(replay)
    _, state = call(replay.init(), opt_state, w, jnp.full(3, 100.0 / np.sqrt(3), jnp.float32))  # norm 100
    assert bool(gh.metrics(state)["grad/replayed"]) == (wrapper == "none")
    _, state = call(replay.init(), opt_state, w, jnp.array([1.0, jnp.nan, 1.0]))
    assert bool(gh.metrics(state)["grad/replayed"])


@pytest.mark.parametrize("setup", ["guard(multi_transform)", "multi_transform(guards)", "masked(guard)"])
def test_with_a_guard_per_parameter_group_only_nonfinite_steps_are_replayed(setup):
    """A guard per parameter group (optax.multi_transform, optax.masked) holds the norms
    of its group's part of the gradient, not of the whole gradient the replay sees: a
    clean step whose head is 30x the body (as in training) is not replayed there, nor
    is a spike (no spike rule); a non-finite step still is. One guard over the whole
    optimizer keeps the spike rule."""
    labels = {"body": "body", "head": "head"}
    sgd = lambda: optax.sgd(0.1)
    guard = lambda inner: gh.guard(inner, warmup_steps=2)
    tx = {
        "guard(multi_transform)": guard(optax.multi_transform({"body": sgd(), "head": sgd()}, labels)),
        "multi_transform(guards)": optax.multi_transform({"body": guard(sgd()), "head": guard(sgd())}, labels),
        "masked(guard)": optax.chain(
            optax.masked(guard(sgd()), {"body": True, "head": False}),
            optax.masked(sgd(), {"body": False, "head": True}),
        ),
    }[setup]
    w = {"body": jnp.zeros(3), "head": jnp.zeros(3)}
    opt_state = tx.init(w)
    rng = np.random.default_rng(0)
    unit = lambda: (lambda v: v / np.linalg.norm(v))(rng.normal(size=3)).astype(np.float32)
    for _ in range(16):  # the body's gradient has norm 1, the head's 30
        opt_state = tx.update({"body": jnp.asarray(unit()), "head": jnp.asarray(30 * unit())}, opt_state, w)[1]
    loss = lambda w, x: jnp.sum(w["body"] * x["body"]) + jnp.sum(w["head"] * x["head"])  # gradient: x
    replay = gh.step_replay(jax.value_and_grad(loss), warmup_steps=2)
    call = jax.jit(replay)

    def replayed(body, head):
        _, state = call(replay.init(), opt_state, w, {"body": jnp.asarray(body), "head": jnp.asarray(head)})
        return bool(gh.metrics(state)["grad/replayed"])

    whole = setup == "guard(multi_transform)"
    assert not replayed(unit(), 30 * unit())  # a clean step, as in training
    assert replayed(100 * unit(), 3000 * unit()) == whole  # a 100x spike of both groups
    assert replayed(np.array([1.0, np.nan, 1.0], np.float32), 30 * unit())  # non-finite
