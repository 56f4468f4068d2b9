"""Faults done for real: a run killed with SIGKILL, an unreachable tracking server, tampered files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from conftest import TINY_SUITE
from kdbench.cli import main
from kdbench.records import load_records

SLOW_SUITE = TINY_SUITE.replace("train: {epochs: 2, batch_size: 200", "train: {epochs: 12, batch_size: 50")


def _kdbench(*args, env):
    return subprocess.Popen([sys.executable, "-m", "kdbench", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigkill_mid_run_then_rerun_finishes_with_same_metrics(tmp_path, session_home):
    suite = tmp_path / "slow.yaml"
    suite.write_text(SLOW_SUITE)
    env = {**os.environ, "KDBENCH_HOME": str(session_home), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'ml.db'}"}
    args = ["run", "--suite", str(suite), "--method", "vanilla_kd", "--seeds", "0", "--results-dir", str(tmp_path / "r")]
    proc = _kdbench(*args, env=env)
    checkpoints = session_home / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("mnist1d-*-seed0.pt")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stdout.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list((tmp_path / "r").rglob("*.json")), "a killed run must leave no record"

    rerun = _kdbench(*args, env=env)
    output = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, output
    assert "resumed from" in output
    ((_, resumed),) = load_records(tmp_path / "r")
    assert resumed.status == "finished"
    assert not list(checkpoints.glob("mnist1d-*-seed0.pt")), "the checkpoint is removed once the record is written"

    assert main([*args[:-1], str(tmp_path / "uninterrupted")]) == 0
    ((_, straight),) = load_records(tmp_path / "uninterrupted")
    for key in ("test_top1", "val_top1", "agreement"):
        assert getattr(resumed.metrics, key) == getattr(straight.metrics, key), key

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(search_all_experiments=True)
    assert set(runs["status"]) == {"FINISHED"}, "no run may be left RUNNING by the killed attempt"


def test_unreachable_tracking_server_loses_no_run(tiny_suite, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    args = ["run", "--suite", str(tiny_suite), "--method", "baseline", "--seeds", "0", "--results-dir", str(tmp_path)]
    assert main(args) == 0
    ((_, record),) = load_records(tmp_path)
    assert record.status == "finished"
    assert "warning: run not logged to MLflow at http://127.0.0.1:9" in capsys.readouterr().err


def test_sync_logs_what_an_unreachable_server_missed(tiny_suite, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    args = ["run", "--suite", str(tiny_suite), "--method", "baseline", "--results-dir", str(tmp_path / "r")]
    assert main(args) == 0
    store = f"sqlite:///{tmp_path / 'later.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert main(["sync", "--results-dir", str(tmp_path / "r")]) == 0
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 2 and set(runs["tags.method"]) == {"baseline"}
    assert len(mlflow.MlflowClient().get_metric_history(runs["run_id"].iloc[0], "val_top1")) == 2  # curves too
    assert main(["sync", "--results-dir", str(tmp_path / "r")]) == 0
    assert len(mlflow.search_runs(search_all_experiments=True)) == 2  # nothing logged twice


def _log_fake_runs(uri: str, worker: int, count: int) -> None:
    os.environ["MLFLOW_TRACKING_URI"] = uri
    from kdbench.tracking import log_run

    for i in range(count):
        record = {"suite": "parallel", "track": "t", "teacher": "a", "student": "b", "method": "m", "seed": i,
                  "config_sha256": f"{worker:064d}", "git_commit": None, "status": "finished",
                  "created_at": f"w{worker}", "config": {"x": 1}, "metrics": {"test_top1": 1.0},
                  "history": [{"epoch": 1, "val_top1": 1.0}]}
        assert log_run(record)


def test_parallel_writers_to_one_sqlite_store_lose_no_run(tmp_path):
    import multiprocessing

    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    place = multiprocessing.get_context("spawn")
    workers = [place.Process(target=_log_fake_runs, args=(uri, w, 4)) for w in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    mlflow.set_tracking_uri(uri)
    assert len(mlflow.search_runs(search_all_experiments=True)) == 12


def test_teacher_file_that_is_not_safetensors_is_refused(tiny_suite, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KDBENCH_HOME", str(tmp_path / "home"))
    args = ["run", "--suite", str(tiny_suite), "--method", "baseline", "--seeds", "0", "--results-dir", str(tmp_path / "r")]
    assert main(args) == 0
    (teacher,) = (tmp_path / "home" / "teachers").glob("*.safetensors")
    import pickle

    teacher.write_bytes(pickle.dumps({"weights": "from elsewhere"}))
    capsys.readouterr()
    assert main([*args, "--force"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"teacher checkpoint {teacher} is not a safetensors weights file" in err.splitlines()[-1]
    assert "Traceback" not in err


@pytest.mark.parametrize("damage", ["truncate", "wrong_type", "missing_field"])
def test_damaged_record_is_refused_by_name(damage, tiny_suite, tmp_path, capsys):
    results = tmp_path / "r"
    assert main(["run", "--suite", str(tiny_suite), "--method", "baseline", "--seeds", "0", "--results-dir", str(results)]) == 0
    ((path, _),) = load_records(results)
    text = path.read_text()
    if damage == "truncate":
        path.write_text(text[: len(text) // 2])
    else:
        raw = json.loads(text)
        if damage == "wrong_type":
            raw["metrics"]["test_top1"] = "ninety"
        else:
            del raw["config_sha256"]
        path.write_text(json.dumps(raw))
    capsys.readouterr()
    assert main(["leaderboard", "--results-dir", str(results), "--output", str(tmp_path / "lb.md")]) == 2
    err = capsys.readouterr().err.strip()
    assert str(path) in err and len(err.splitlines()) == 1
    assert not (tmp_path / "lb.md").exists()
