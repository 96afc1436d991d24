"""Each example (and the demo) runs briefly end to end."""

import os
import pathlib

import jax
import numpy as np

import optax_gradhealth as gh
from tests.example_loader import load_example

ROOT = pathlib.Path(__file__).parents[1]


def test_char_transformer_with_injected_faults_and_a_rollback(tmp_path, capsys):
    result = load_example("char_transformer").main(
        ["--steps", "60", "--inject", "nan@24,corrupt@32,lr@40:3", "--out", str(tmp_path), "--no-progress"]
    )
    rows = gh.read_jsonl(tmp_path / "run.jsonl")
    assert [r["step"] for r in rows] == list(range(60))  # every step logged (all_steps=True)
    assert rows[24]["grad/finite"] == 0 and rows[24]["grad/skipped"] == 1
    assert rows[32]["grad/spiked"] == 1 and rows[32]["grad/skipped"] == 1
    # The LR spike damages the model: spikes in a row, then the sticky rollback flag; the loop
    # checks every 5 steps and restores the last healthy snapshot: the initial state (the
    # step-0 snapshot is the newest: no later snapshot step has confirmed it).
    flagged = [r["step"] for r in rows if r["grad/rollback_recommended"] == 1]
    assert flagged, "the LR spike should end in a rollback recommendation"
    restore_step = -(-flagged[0] // 5) * 5
    assert result["rollbacks"] == [(restore_step, None)]
    after = rows[restore_step + 1]
    assert after["grad/rollback_recommended"] == 0 and after["grad/num_steps"] == 1  # initial counters, +1
    assert np.isfinite(result["final_loss"])
    patterns = {f.pattern: f for f in result["findings"]}
    assert patterns["nonfinite"].steps == (24,)
    assert 32 in patterns["explosion"].steps
    assert patterns["rollback"].steps[0] == flagged[0]
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert (tmp_path / "report.findings.txt").exists()
    out = capsys.readouterr().out
    assert "gradhealth diagnosis" in out and f"rollback at step {restore_step}: restored the initial state" in out


def test_demo_rollback_restores_a_snapshot_from_before_an_unskipped_lr_spike(tmp_path):
    """A learning-rate spike's own update is not skipped (its gradient is normal): with
    the spike at a snapshot step, the snapshot taken right after it held the damaged
    parameters, and the rollback restored them (the README's lr@200 at snapshot_every=50:
    loss ~3.9 after the restore instead of ~2.05, the first steps after it skipped as
    spikes). A snapshot is now restored only once a whole interval without a skip has
    followed it. Reference: the same log's losses before the fault."""
    from optax_gradhealth import demo

    fault = 30
    config = demo.TrainConfig(
        steps=60, faults=f"lr@{fault}:3", snapshot_every=10, out=str(tmp_path), progress=False, report=False
    )
    result = demo.train(config)
    rows = gh.read_jsonl(tmp_path / "run.jsonl")
    assert result["rollbacks"], "the LR spike should end in a rollback"
    (step, restored), *_ = result["rollbacks"]
    assert restored is not None and restored < fault, result["rollbacks"]
    after = rows[step + 1]
    assert after["grad/num_steps"] == restored + 2  # the snapshot's counters, +1
    assert after["grad/skipped"] == 0 and after["grad/rollback_recommended"] == 0
    before = np.median([row["loss"] for row in rows[fault - 10 : fault]])
    assert all(row["loss"] < 1.25 * before for row in rows[step + 1 :]), (before, [r["loss"] for r in rows[step:]])
    assert len(result["rollbacks"]) == 1


def test_char_transformer_bad_fault_spec_is_a_usage_error(capsys):
    import pytest

    with pytest.raises(SystemExit) as raised:
        load_example("char_transformer").main(["--inject", "nan50", "--no-progress"])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert "argument --inject: bad fault 'nan50'" in err and "Traceback" not in err


def test_demo_entry_point_writes_into_out(tmp_path, capsys, monkeypatch):
    from optax_gradhealth import demo

    monkeypatch.chdir(tmp_path)  # the default --out is the current folder
    # Same --steps as the char-transformer test: the same optimizer, so one compilation.
    result = demo.main(["--steps", "60", "--no-progress"])
    assert (tmp_path / "run.jsonl").exists() and (tmp_path / "report.png").exists()
    assert len(gh.read_jsonl(tmp_path / "run.jsonl")) == 60
    assert result["rollbacks"] == []
    assert "faults scripted" in capsys.readouterr().out


def test_demo_fault_spec_parsing():
    from optax_gradhealth import demo

    faults = demo.parse_faults(demo.DEMO_FAULTS)
    assert [f.kind for f in faults] == ["nan", "corrupt", "lr"] and faults[2].length == 3
    assert demo.parse_faults("") == []
    import pytest

    with pytest.raises(ValueError, match="kind@step"):
        demo.parse_faults("boom@3")


def test_demo_corpus_is_the_standard_library():
    import sysconfig

    from optax_gradhealth import demo

    tokens = demo.load_corpus(max_bytes=5000)
    assert tokens.shape == (5000,) and tokens.min() >= 0 and tokens.max() < demo.VOCAB_SIZE
    first = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[0].read_bytes()[:100]
    expected = [demo._CHARS.index(chr(b)) + 1 if chr(b) in demo._CHARS else 0 for b in first]
    assert tokens[:100].tolist() == expected


def test_rollback_orbax_example(tmp_path, capsys):
    result = load_example("rollback_orbax").main(
        ["--steps", "40", "--bad-from", "22", "--bad-steps", "6", "--ckpt", str(tmp_path / "ckpt")]
    )
    # Checkpoint 20 is only a candidate: the NaN batches from 22 on follow it, so the
    # rollback restores checkpoint 0 (the interval after it, 1..20, had no skip), and
    # deletes checkpoint 20.
    assert result["rollbacks"] == [(26, 0)] and result["saved"] == [0, 20]
    assert "restored checkpoint 0" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["0"]


def _with_lr_spike_at(example, monkeypatch, fault, magnitude):
    """Patches the example's step so that the update of step ``fault`` is applied
    ``magnitude`` times (a learning-rate spike: the gradient is normal, nothing is skipped)."""
    make_step = example.make_step

    def spiked(tx):
        step_fn, calls = make_step(tx), [0]

        def step(params, opt_state, x, y):
            new, opt_state, loss, metrics = step_fn(params, opt_state, x, y)
            if calls[0] == fault:
                new = jax.tree.map(lambda n, p: p + magnitude * (n - p), new, params)
            calls[0] += 1
            return new, opt_state, loss, metrics

        return step

    monkeypatch.setattr(example, "make_step", spiked)


def test_rollback_orbax_restores_a_checkpoint_from_before_an_unskipped_lr_spike(tmp_path, monkeypatch):
    """The update of step 20 (a save step) applied x1000: not skipped, so checkpoint 20
    was saved with the damaged parameters, every later step spiked, and each rollback
    restored checkpoint 20 again (rollbacks at 30, 40, ..., 70, all to 20). Now the
    rollback restores a checkpoint that a whole interval without a skip followed, and
    the run recovers. Reference: a clean run of the same steps."""
    example = load_example("rollback_orbax")
    clean = example.train(80, str(tmp_path / "clean"), save_every=10)
    _with_lr_spike_at(example, monkeypatch, fault=20, magnitude=1000.0)
    run = example.train(80, str(tmp_path / "ckpt"), save_every=10)
    assert len(run["rollbacks"]) == 1, run["rollbacks"]
    ((step, restored),) = run["rollbacks"]
    assert restored is not None and restored < 20
    assert not any(run["flags"][step + 1 :])
    x, y = example.batch(1000)  # a batch neither run trained on
    final, reference = (float(example.loss_fn(r["params"], x, y)) for r in (run, clean))
    assert final < 1.5 * reference, (final, reference)


def test_rollback_orbax_before_any_checkpoint_restores_the_starting_state(tmp_path, capsys):
    """--bad-from 0: step 0 is skipped, so nothing is saved before the rollback at step 4;
    restore(manager, None) raised FileNotFoundError ("No steps found"). Now the rollback
    restores the state the run started from. Reference: a clean run started at step 5
    from the initial state, bit for bit."""
    example = load_example("rollback_orbax")
    result = example.main(["--steps", "30", "--bad-from", "0", "--bad-steps", "5", "--ckpt", str(tmp_path / "a")])
    assert result["rollbacks"] == [(4, None)]
    assert "step 4: rollback recommended -> restored the starting state" in capsys.readouterr().out
    assert not any(result["flags"][5:])
    fresh = example.train(30, str(tmp_path / "b"), start=5, state=(example.init_params(0), None))
    for got, want in zip(jax.tree.leaves(result["params"]), jax.tree.leaves(fresh["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_rollback_orbax_refuses_a_checkpoint_folder_of_an_earlier_run(tmp_path, capsys):
    """orbax skips saving a step that is not newer than the newest in the folder: a second
    run into a folder of a longer run saved nothing and rolled back to step 80 of the first."""
    import pytest

    example = load_example("rollback_orbax")
    ckpt = tmp_path / "ckpt"
    example.main(["--steps", "100", "--bad-from", "500", "--ckpt", str(ckpt)])
    assert sorted(p.name for p in ckpt.iterdir()) == ["40", "60", "80"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--steps", "40", "--bad-from", "22", "--bad-steps", "6", "--ckpt", str(ckpt)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "is not empty (it holds 40, 60, 80)" in err and "Pass a new folder to --ckpt" in err
    with pytest.raises(ValueError, match="is not empty"):
        example.train(40, str(ckpt))
    assert sorted(p.name for p in ckpt.iterdir()) == ["40", "60", "80"]  # untouched
    # A save orbax skips is an error, not a silent no-op.
    params = example.init_params(0)
    manager = example.checkpoint_manager(str(ckpt))
    with pytest.raises(RuntimeError, match=r"did not save step 20 .*newest step there: 80"):
        example.save(manager, 20, params, example.make_optimizer().init(params))
    manager.close()


def test_data_parallel_adds_the_device_count_to_xla_flags_already_set(monkeypatch):
    """os.environ.setdefault left XLA_FLAGS without the 8 devices whenever the user had a
    flag there, and the desync scenario failed with an IndexError on one device."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_disable_metadata=true")
    load_example("data_parallel")
    assert os.environ["XLA_FLAGS"] == "--xla_dump_disable_metadata=true --xla_force_host_platform_device_count=8"
    monkeypatch.delenv("XLA_FLAGS")
    load_example("data_parallel")
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4 --xla_dump_disable_metadata=true")
    load_example("data_parallel")  # a count the user set is kept
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4 --xla_dump_disable_metadata=true"


def test_char_transformer_refuses_log_every_below_one_with_a_usage_error(capsys):
    """--log-every 0 went through argparse (type=int) and ended in a traceback."""
    import pytest

    example = load_example("char_transformer")
    for bad, message in (
        ("0", "must be at least 1, got 0"),
        ("-3", "must be at least 1, got -3"),
        ("x", "expected an integer"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            example.main(["--log-every", bad, "--no-progress"])
        assert exit_info.value.code == 2
        assert f"argument --log-every: {message}" in capsys.readouterr().err


def test_rollback_orbax_trains_on_after_a_lasting_change_instead_of_restoring_for_ever(tmp_path, monkeypatch):
    """Review C (round 6), finding 1: from step 100 the targets are 10x larger (a new
    dataset in other units; plain Adam trains on it). The loop restored checkpoint 60 at
    step 109, 119, 129, ... to the end, and never trained on the new data. Now a
    recommendation that comes back before a new healthy checkpoint re-baselines the guard
    (gh.rebaseline) instead of restoring again. Reference: plain optax.adam, same batches."""
    import optax

    example = load_example("rollback_orbax")
    change, steps = 100, 400
    old_batch = example.batch

    def new_data(step, seed=0, size=32):
        x, y = old_batch(step, seed, size)
        return (x, y) if step < change else (x, 10.0 * y)

    monkeypatch.setattr(example, "batch", new_data)
    run = example.train(steps, str(tmp_path / "ckpt"))
    assert len(run["rollbacks"]) <= 1, run["rollbacks"]
    assert len(run["rebaselines"]) <= 1, run["rebaselines"]
    last = max([s for s, _ in run["rollbacks"]] + run["rebaselines"], default=change)
    assert last < change + 50 and not any(run["flags"][last + 1 :])
    assert int(gh.metrics(run["opt_state"])["grad/num_rebaselines"]) == len(run["rebaselines"])

    tx = optax.adam(1e-2)
    params = example.init_params(0)
    state = tx.init(params)

    @jax.jit
    def adam_step(params, state, x, y):
        grads = jax.grad(example.loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for step in range(steps):
        params, state = adam_step(params, state, *new_data(step))
    held_out = [new_data(10_000 + i) for i in range(8)]  # new-task batches neither run trained on
    final, reference = (np.mean([float(example.loss_fn(p, *b)) for b in held_out]) for p in (run["params"], params))
    assert final < 1.5 * reference, (final, reference)


def test_demo_rolls_back_once_then_rebaselines_on_a_lasting_change(tmp_path, monkeypatch):
    """Review C (round 6), finding 1, the demo's loop: loss weights x10 from the 35th
    batch on (a planned loss-weight change the loop was not told of). The loop restored
    the same snapshot every time the recommendation came back, skipping every step of the
    new level. Now the second recommendation, with no new healthy snapshot since the
    restore, re-baselines the guard and the steps after it are applied."""
    from optax_gradhealth import demo

    change, sample_batch, calls = 35, demo.sample_batch, [0]

    def heavier(corpus, rng, batch_size, seq_len):
        batch = sample_batch(corpus, rng, batch_size, seq_len)
        calls[0] += 1
        return batch if calls[0] <= change else demo.Batch(batch.tokens, 10.0 * batch.weights)

    monkeypatch.setattr(demo, "sample_batch", heavier)
    config = demo.TrainConfig(steps=60, faults="", snapshot_every=10, out=str(tmp_path), progress=False, report=False)
    result = demo.train(config)
    rows = gh.read_jsonl(tmp_path / "run.jsonl")
    assert len(result["rollbacks"]) == 1, result["rollbacks"]
    ((restored_at, _),) = result["rollbacks"]
    assert len(result["rebaselines"]) == 1 and result["rebaselines"][0] > restored_at, result
    (rebaselined_at,) = result["rebaselines"]
    after = rows[rebaselined_at + 1 :]
    assert after and all(r["grad/skipped"] == 0 and r["grad/rollback_recommended"] == 0 for r in after)
    assert all(r["grad/num_rebaselines"] == 1 for r in after)
