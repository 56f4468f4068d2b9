"""Shared fixtures: an isolated kdbench home and MLflow store, and a tiny suite that trains in seconds."""

from __future__ import annotations

import textwrap

import pytest

TINY_SUITE = """\
name: tiny
tier: cpu
seeds: [0, 1]
methods:
  baseline: {}
  vanilla_kd: {}
measure: {threads: 1, throughput_batch: 16, min_run_time: 0.01}
tracks:
  mnist1d:
    pairs:
      - {teacher: cnn1d_w8, student: cnn1d_w4}
    teacher_train: {epochs: 2, batch_size: 200, lr: 0.01}
    train: {epochs: 2, batch_size: 200, lr: 0.01}
"""


CLEAN_COMMIT = "0" * 40


@pytest.fixture(scope="session")
def session_home(tmp_path_factory):
    return tmp_path_factory.mktemp("kdbench-home")


@pytest.fixture(autouse=True)
def isolated_home(session_home, monkeypatch):
    """Teacher cache and MLflow store in a temporary folder shared by the session (created once)."""
    monkeypatch.setenv("KDBENCH_HOME", str(session_home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{session_home / 'mlflow.db'}")
    return session_home


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, session_home):
    """The tiny suite run once per test module (2 methods × 2 seeds) with its own MLflow store; its folder. Its
    records say they come from a clean checkout, whatever the state of the working tree running the tests."""
    from kdbench.cli import main

    root = tmp_path_factory.mktemp("tiny-run")
    suite = root / "tiny.yaml"
    suite.write_text(TINY_SUITE)
    mp = pytest.MonkeyPatch()
    mp.setenv("KDBENCH_HOME", str(session_home))
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    for module in ("kdbench.records", "kdbench.timing"):  # as if made from a clean checkout (tests/test_git_state.py)
        mp.setattr(f"{module}.git_state", lambda: (CLEAN_COMMIT, False))
    assert main(["run", "--suite", str(suite), "--results-dir", str(root / "results")]) == 0
    mp.undo()
    return root


@pytest.fixture
def tiny_suite(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(textwrap.dedent(TINY_SUITE))
    return path


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite tests/golden/*.json from the current code")


@pytest.fixture
def update_golden(request):
    return request.config.getoption("--update-golden")
