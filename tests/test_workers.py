"""`kdbench run --workers N`: runs in parallel processes give the same records as one after another."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_SUITE
from kdbench.cli import main

THREADED = TINY_SUITE.replace("lr: 0.01}", "lr: 0.01, threads: 1}")


def _records(root):
    return {p.relative_to(root): json.loads(p.read_text()) for p in sorted(root.rglob("seed*.json"))}


def test_two_workers_match_sequential(tmp_path, capsys):
    suite = tmp_path / "tiny.yaml"
    suite.write_text(THREADED)
    base = ["run", "--suite", str(suite), "--method", "vanilla_kd"]
    assert main([*base, "--workers", "1", "--results-dir", str(tmp_path / "seq")]) == 0
    assert main([*base, "--workers", "2", "--results-dir", str(tmp_path / "par")]) == 0
    err = capsys.readouterr().err
    assert "2 run(s) to train, 2 at a time" in err
    seq, par = _records(tmp_path / "seq"), _records(tmp_path / "par")
    assert seq.keys() == par.keys() and len(seq) == 2
    for key, record in seq.items():
        assert record["config_sha256"] == par[key]["config_sha256"]
        for metric in ("test_top1", "val_top1", "agreement", "params", "flops"):
            assert record["metrics"][metric] == par[key]["metrics"][metric], (key, metric)
        assert [row["val_top1"] for row in record["history"]] == [row["val_top1"] for row in par[key]["history"]]


def test_bad_worker_count_is_one_line(tmp_path, capsys):
    suite = tmp_path / "tiny.yaml"
    suite.write_text(THREADED)
    assert main(["run", "--suite", str(suite), "--workers", "0", "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "kdbench: error: --workers '0': expected a whole number ≥ 1 or 'auto'"


def test_a_signal_between_runs_stops_the_workers_before_kdbench_reports(tmp_path, capsys, monkeypatch):
    """A signal that lands while kdbench reports a finished run (not while it waits on the workers) still stops
    them at once: the executor is closed before the "stopped after" line, not when the interpreter exits."""
    import kdbench.cli as cli
    import kdbench.executor

    def fake_execute(specs, *args):
        try:
            for spec in specs:
                yield spec, {"status": "finished", "metrics": None, "error": ""}
        finally:
            print("workers stopped", file=sys.stderr)

    def interrupted(*args):
        raise cli.Terminated()

    monkeypatch.setattr(kdbench.executor, "execute", fake_execute)
    monkeypatch.setattr(cli, "_progress_line", interrupted)
    suite = tmp_path / "tiny.yaml"
    suite.write_text(THREADED)
    assert main(["run", "--suite", str(suite), "--method", "vanilla_kd", "--workers", "2",
                 "--results-dir", str(tmp_path / "results")]) == 143
    err = capsys.readouterr().err.splitlines()
    assert err[-3:] == ["workers stopped", err[-2], "kdbench: terminated"] and err[-2].startswith("stopped after 1 of 2"), err


def _children(pid: int) -> list[int]:
    return [int(c) for c in (Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for a parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(),
                    reason="reads a process's children from /proc (Linux)")
def test_sigterm_stops_the_workers_with_kdbench(tmp_path):
    """`kill` of `kdbench run --workers 2` ends its worker processes too, at once: no run queued to them trains on
    and writes a record afterwards, and the message says how to go on (Ctrl-C takes the same path)."""
    suite = tmp_path / "tiny.yaml"
    suite.write_text(THREADED.replace("seeds: [0, 1]", f"seeds: {list(range(12))}"))
    results = tmp_path / "results"
    run = subprocess.Popen([sys.executable, "-m", "kdbench", "run", "--suite", str(suite), "--method", "vanilla_kd",
                            "--workers", "2", "--results-dir", str(results)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in run.stderr:
            if line.startswith("[1/12]"):
                break
        else:
            pytest.fail(f"kdbench run ended before its first run finished (exit {run.wait()})")
        workers = _children(run.pid)
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=120) == 143
    finally:
        run.kill()
    rest = run.stderr.read().splitlines()
    assert rest[-1] == "kdbench: terminated", rest
    assert rest[-2].startswith("stopped after ") and rest[-2].endswith(
        "of 12 runs: their records are kept; the same command trains the rest (a run stopped midway resumes "
        "from its last epoch)"), rest
    deadline = time.monotonic() + 60
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert workers and not any(map(_alive, workers)), "a worker process outlived kdbench"
    kept = sorted(results.rglob("seed*.json"))
    assert 1 <= len(kept) < 12
    for path in kept:
        assert json.loads(path.read_text())["status"] == "finished"
