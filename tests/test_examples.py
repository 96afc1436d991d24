"""Each example (and the demo) runs briefly end to end."""

import os
import pathlib

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
    # checks every 5 steps and restores the last healthy snapshot (step 0: later intervals had skips).
    flagged = [r["step"] for r in rows if r["grad/rollback_recommended"] == 1]
    assert flagged, "the LR spike should end in a rollback recommendation"
    restore_step = -(-flagged[0] // 5) * 5
    assert result["rollbacks"] == [(restore_step, 0)]
    after = rows[restore_step + 1]
    assert (
        after["grad/rollback_recommended"] == 0 and after["grad/num_steps"] == 2
    )  # counters of the step-0 snapshot, +1
    assert np.isfinite(result["final_loss"])
    patterns = {f.pattern: f for f in result["findings"]}
    assert patterns["nonfinite"].steps == (24,)
    assert 32 in patterns["explosion"].steps
    assert patterns["rollback"].steps[0] == flagged[0]
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert (tmp_path / "report.findings.txt").exists()
    out = capsys.readouterr().out
    assert "gradhealth diagnosis" in out and f"rollback at step {restore_step}" in out


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
    assert result["rollbacks"] == [(26, 20)]
    assert "restored checkpoint 20" in capsys.readouterr().out


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
