"""The grid on Ray (a local instance of 2 CPUs) against an MLflow tracking server with a database backend:
the same records as the local executor, written by the driver, and every run on the server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kdbench.cli import main
from kdbench.tracking import record_key
from kdbench.verify import EXACT

pytest.importorskip("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """``mlflow server`` on loopback: sqlite database backend, artifacts proxied to a local folder."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=(root / "server.log").open("w"))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                assert server.poll() is None, (root / "server.log").read_text()[-2000:]
                time.sleep(0.25)
        else:
            pytest.fail("mlflow server did not answer within 60 s")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory, tracking_server, finished_run, session_home):
    """The tiny suite through ``--executor ray``, logging to the tracking server, with the session's teacher cache
    (a module fixture: the per-test isolated home is not set yet); its results folder."""
    root = tmp_path_factory.mktemp("ray-run")
    suite = root / "tiny.yaml"
    suite.write_text((finished_run / "tiny.yaml").read_text())
    mp = pytest.MonkeyPatch()
    mp.setenv("KDBENCH_HOME", str(session_home))
    mp.setenv("MLFLOW_TRACKING_URI", tracking_server)
    assert main(["run", "--suite", str(suite), "--executor", "ray", "--results-dir", str(root / "results")]) == 0
    mp.undo()
    return root / "results"


def _records(results: Path) -> dict[str, dict]:
    return {str(p.relative_to(results)): json.loads(p.read_text()) for p in sorted(results.rglob("seed*.json"))}


def _untimed(record: dict) -> dict:
    """A record without what differs between two executions of the same run: timings, when/where it ran and
    the checkout's state (the local fixture's records say they come from a clean checkout, conftest)."""
    out = {k: v for k, v in record.items() if k not in ("created_at", "env", "git_commit", "git_dirty")}
    out["metrics"] = {k: record["metrics"].get(k) for k in EXACT}
    return out


def test_ray_gives_the_local_executors_records(ray_run, finished_run):
    ray_records, local_records = _records(ray_run), _records(finished_run / "results")
    assert len(ray_records) == 4 and ray_records.keys() == local_records.keys()
    for path, record in ray_records.items():
        assert record["status"] == "finished"
        assert _untimed(record) == _untimed(local_records[path]), path


def test_every_ray_run_is_on_the_tracking_server(ray_run, tracking_server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_server)
    runs = client.search_runs([client.get_experiment_by_name("kdbench-tiny").experiment_id])
    records = _records(ray_run).values()
    by_key = {r.data.tags["record_key"]: r for r in runs}
    assert len(runs) == len(records) == 4
    for record in records:
        run = by_key[record_key(record)]
        assert run.data.metrics["test_top1"] == pytest.approx(record["metrics"]["test_top1"])
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["record.json"]


def test_a_failing_task_stops_the_grid_in_one_line(tiny_suite, tmp_path, capsys):
    """A run that raises on its Ray worker: exit 2 and one line naming the run and the cause."""
    from kdbench.executor import execute_on_ray
    from kdbench.errors import KdbenchError
    from kdbench.runner import Placement
    from kdbench.suite import expand, load_suite

    spec = expand(load_suite(tiny_suite), ["baseline"], None, None, [0])[0]
    broken = type(spec)(**{**spec.__dict__, "student": "no_such_model"})
    with pytest.raises(KdbenchError, match=r"^mnist1d cnn1d_w8:no_such_model baseline seed 0 failed on Ray: .*no_such_model"):
        list(execute_on_ray([broken], tmp_path / "results", Placement()))
    assert not (tmp_path / "results").exists()


def test_executor_flags_are_checked(tiny_suite, tmp_path, capsys):
    args = ["run", "--suite", str(tiny_suite), "--results-dir", str(tmp_path)]
    assert main([*args, "--address", "auto"]) == 2
    assert main([*args, "--executor", "ray", "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2:] == ["kdbench: error: --address names a Ray cluster: add --executor ray",
                        "kdbench: error: --workers is for the local executor; on Ray each run takes the CPUs its "
                        "threads need"]
    assert os.listdir(tmp_path) == ["tiny.yaml"]


def test_a_gpu_run_needs_a_gpu_in_the_cluster(tiny_suite, tmp_path, capsys):
    """--device cuda is checked against the Ray cluster's GPUs (not this machine's): none here → one line."""
    args = ["run", "--suite", str(tiny_suite), "--results-dir", str(tmp_path / "r"), "--executor", "ray"]
    assert main([*args, "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "kdbench: error: --device cuda: the Ray cluster has no GPU; use --device cpu")
    assert not (tmp_path / "r").exists()
