"""Bad input gives one line naming what is wrong, exit status 2, and no traceback."""

import pytest

from kdbench.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--suite", "cpuu"], "unknown suite 'cpuu'; did you mean: cpu?"),
        (["run", "--method", "vanila_kd"], "unknown method 'vanila_kd'; did you mean: vanilla_kd"),
        (["run", "--track", "mnist"], "unknown track 'mnist'; did you mean: mnist1d?"),
        (["run", "--pair", "cnn1d_w32:cnn1d_w64"], "unknown pair 'cnn1d_w32:cnn1d_w64'; did you mean: cnn1d_w32:cnn1d_w4"),
        (["run", "--seeds", "0,x"], "--seeds '0,x': expected comma-separated whole numbers"),
        (["leaderboard", "--results-dir", "/nonexistent-kdbench"], "no run records under /nonexistent-kdbench"),
    ],
)
def test_bad_input_is_one_line(capsys, argv, message):
    code, err = _run(capsys, *argv)
    assert code == 2
    assert message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_suite_with_unknown_key_names_key_and_file(capsys, tiny_suite):
    tiny_suite.write_text(tiny_suite.read_text().replace("seeds: [0, 1]", "seeds: [0, 1]\nepochz: 3"))
    code, err = _run(capsys, "run", "--suite", str(tiny_suite))
    assert code == 2 and str(tiny_suite) in err and "epochz: Extra inputs are not permitted" in err


def test_suite_with_wrong_type_names_field(capsys, tiny_suite):
    tiny_suite.write_text(tiny_suite.read_text().replace("lr: 0.01}\n    train", "lr: fast}\n    train"))
    code, err = _run(capsys, "run", "--suite", str(tiny_suite))
    assert code == 2 and "tracks.mnist1d.teacher_train.lr" in err


def test_invalid_hyperparameter_in_suite(capsys, tiny_suite):
    tiny_suite.write_text(tiny_suite.read_text().replace("vanilla_kd: {}", "vanilla_kd: {temperature: -2}"))
    code, err = _run(capsys, "run", "--suite", str(tiny_suite))
    assert code == 2 and "method vanilla_kd: temperature: Input should be greater than 0" in err


def test_truncated_record_is_named(capsys, tmp_path):
    bad = tmp_path / "s" / "seed0.json"
    bad.parent.mkdir()
    bad.write_text('{"schema_version": 1, "suite"')
    code, err = _run(capsys, "leaderboard", "--results-dir", str(tmp_path), "--output", str(tmp_path / "lb.md"))
    assert code == 2 and f"record {bad} is not valid JSON" in err
    assert not (tmp_path / "lb.md").exists()


def test_list_commands(capsys):
    for what in ("methods", "models", "tracks", "suites", "pairs"):
        assert main(["list", what]) == 0
    out = capsys.readouterr().out
    assert "vanilla_kd" in out and "cnn1d_w8" in out and "1,538" in out and "mnist1d" in out


def test_ui_opens_mlflow_on_the_local_store(monkeypatch, isolated_home):
    calls = []
    monkeypatch.setattr("os.execv", lambda exe, argv: calls.append(argv))
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    main(["ui", "--port", "5123"])
    (argv,) = calls
    assert argv[1:4] == ["-m", "mlflow", "ui"]
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{isolated_home / 'mlflow.db'}"
    assert "5123" in argv


def test_tap_the_model_lacks_is_named_before_training(capsys, tiny_suite, tmp_path):
    tiny_suite.write_text(tiny_suite.read_text().replace("vanilla_kd: {}", "fitnets: {stages: [7]}"))
    code, err = _run(capsys, "run", "--suite", str(tiny_suite), "--method", "fitnets", "--seeds", "0",
                     "--results-dir", str(tmp_path))
    assert code == 2 and err.startswith("kdbench: error: tap 'stage:7'")  # before any line of progress
    assert len(err.splitlines()) == 1 and not list(tmp_path.rglob("*.json"))


def test_missing_data_root_is_named(capsys, tmp_path):
    code, err = _run(capsys, "run", "--data-root", str(tmp_path / "nowhere"))
    assert code == 2 and f"--data-root {tmp_path / 'nowhere'} is not a folder" in err
