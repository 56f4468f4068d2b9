"""`kdbench run --workers N`: runs in parallel processes give the same records as one after another."""

from __future__ import annotations

import json

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
