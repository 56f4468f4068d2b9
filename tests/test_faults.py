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
