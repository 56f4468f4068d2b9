"""kdbench reproduce: re-train from a cold teacher cache into a scratch folder, compare with the committed records
exactly; and the comparison and number formatting that kdbench verify shares with it."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil

import pytest

from kdbench.cli import main
from kdbench.records import load_records
from kdbench.reproduce import Outcome, row_verdict
from kdbench.verify import compare_records, format_pair, format_value


def _main(*argv) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``kdbench argv`` (usable in module-scoped fixtures, unlike capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reproduced(finished_run, tmp_path_factory, session_home):
    """The whole tiny suite reproduced against finished_run's records, the user's home being session_home."""
    scratch = tmp_path_factory.mktemp("reproduce") / "scratch"
    mp = pytest.MonkeyPatch()
    mp.setenv("KDBENCH_HOME", str(session_home))
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{session_home / 'mlflow.db'}")
    before = _snapshot(session_home)
    code, out, err = _main("reproduce", "--suite", finished_run / "tiny.yaml", "--results-dir",
                           finished_run / "results", "--scratch", scratch)
    after = _snapshot(session_home)
    env_after = os.environ["KDBENCH_HOME"], os.environ["MLFLOW_TRACKING_URI"]
    mp.undo()
    return {"code": code, "out": out, "err": err, "scratch": scratch, "before": before, "after": after,
            "env_after": env_after, "home": session_home}


def test_whole_suite_reproduces_bit_exactly(reproduced):
    assert reproduced["code"] == 0, reproduced["err"]
    lines = reproduced["out"].strip().splitlines()
    assert lines[-1] == "4/4 records reproduced bit-exactly"
    rows = [line for line in lines if line.startswith("mnist1d")]
    assert len(rows) == 2  # one line per leaderboard row: (track, pair, method)
    for row, method in zip(rows, ("baseline", "vanilla_kd")):
        assert row.split()[:3] == ["mnist1d", "cnn1d_w8:cnn1d_w4", method]
        assert row.rstrip().endswith("2/2 bit-exact")
    err = reproduced["err"]
    assert "[1/4] mnist1d cnn1d_w8:cnn1d_w4" in err and "[4/4]" in err and "bit-exact" in err


def test_teachers_come_from_a_cold_cache_in_the_scratch_folder(reproduced):
    scratch, home = reproduced["scratch"], reproduced["home"]
    assert "training teacher cnn1d_w8 on mnist1d" in reproduced["err"]  # trained again, not read from a cache
    assert list((scratch / "home" / "teachers").glob("mnist1d-cnn1d_w8-*.safetensors"))
    assert (scratch / "home" / "mlflow.db").is_file()
    assert len(load_records(scratch / "results")) == 4  # the fresh records, kept with --scratch
    # the user's own home (teacher cache, MLflow store) is neither read into nor written to
    assert list((home / "teachers").glob("mnist1d-cnn1d_w8-*.safetensors"))  # there was a cached teacher …
    assert reproduced["after"] == reproduced["before"]  # … and nothing in that home changed
    assert reproduced["env_after"] == (str(home), f"sqlite:///{home / 'mlflow.db'}")  # the environment restored


def test_differences_and_missing_records_are_named(finished_run, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(finished_run / "results", results)
    records = {(r.method, r.seed): p for p, r in load_records(results)}
    tampered = records[("vanilla_kd", 0)]
    raw = json.loads(tampered.read_text())
    raw["metrics"]["test_top1"] += 0.1
    tampered.write_text(json.dumps(raw))
    records[("baseline", 0)].unlink()
    code, out, err = _main("reproduce", "--suite", finished_run / "tiny.yaml", "--results-dir", results,
                           "--seeds", "0", "--scratch", tmp_path / "scratch")
    assert code == 1, err
    lines = out.strip().splitlines()
    assert lines[-1] == "0/2 records reproduced bit-exactly"
    (kd,) = [line for line in lines if " vanilla_kd " in line]
    assert kd.rstrip().endswith("0/1 bit-exact: test_top1 differs in 1 of 1 (max |Δ| 0.1)")
    (baseline,) = [line for line in lines if " baseline " in line]
    assert baseline.rstrip().endswith("no committed record")
    assert "differs: test_top1" in err  # the progress line says it as the run finishes


def test_bad_scratch_and_results_dir_fail_before_training(finished_run, tmp_path, capsys):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "teachers").mkdir()
    suite = str(finished_run / "tiny.yaml")
    assert main(["reproduce", "--suite", suite, "--scratch", str(tmp_path / "used")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"kdbench: error: --scratch {tmp_path / 'used'} is not an empty folder: give a new one, so that " \
                  "the teacher cache starts cold"
    assert main(["reproduce", "--suite", suite, "--results-dir", str(tmp_path / "none"),
                 "--scratch", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--results-dir {tmp_path / 'none'} is not a folder" in err
    assert not (tmp_path / "s" / "home").exists()  # nothing was set up, nothing trained


def test_reproduce_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "--scratch" in out and "kdbench reproduce" in out


# --- the comparison, shared with kdbench verify

RECORD = {"status": "finished", "config_sha256": "ab" * 32,
          "metrics": {"test_top1": 95.2, "val_top1": 94.0, "teacher_top1": 97.5, "agreement": 96.1, "params": 614,
                      "extra_params": 0, "flops": 1234, "epochs": 2, "latency_b1_ms": 0.31, "train_seconds": 4.0},
          "predictions": {"test": {"pred": "eJxjYGBgAAAABAAB", "ids": "eJxjYGBgAAAABAAB"}}}


def _changed(**changes) -> dict:
    record = json.loads(json.dumps(RECORD))
    for key, value in changes.items():
        if key in record["metrics"]:
            record["metrics"][key] = value
        else:
            record[key] = value
    return record


def test_compare_records():
    assert compare_records(RECORD, _changed()) == {}
    assert compare_records(RECORD, _changed(latency_b1_ms=0.5, train_seconds=9.0, created_at="x")) == {}  # timings
    assert compare_records(RECORD, _changed(test_top1=95.3, flops=1235)) == {"test_top1": (95.2, 95.3),
                                                                              "flops": (1234, 1235)}
    other = {"test": {"pred": "eJxjYGBgAAAABAAC", "ids": "eJxjYGBgAAAABAAB"}}
    assert compare_records(RECORD, _changed(predictions=other)) == {"predictions": (RECORD["predictions"], other)}
    without = {k: v for k, v in RECORD.items() if k != "predictions"}
    assert compare_records(without, dict(without)) == {}  # absent on both sides: equal
    assert set(compare_records(without, RECORD)) == {"predictions"}  # absent on one side: a difference
    failed = _changed(status="failed", metrics=None)
    assert compare_records(RECORD, failed) == {"status": ("finished", "failed")}
    assert compare_records(RECORD, _changed(config_sha256="cd" * 32)) == {"config_sha256": ("ab" * 32, "cd" * 32)}


def test_row_verdict():
    def outcome(diffs, committed=True):
        return Outcome(None, {}, RECORD if committed else None, diffs)

    same = outcome({})
    assert row_verdict([same, same, same]) == "3/3 bit-exact"
    rows = [same, outcome({"test_top1": (95.2, 95.1)}), outcome({"test_top1": (90.0, 90.05), "predictions": (1, 2)}),
            same, same]
    assert row_verdict(rows) == "3/5 bit-exact: test_top1 differs in 2 of 5 (max |Δ| 0.1); predictions differ in 1 of 5"
    assert row_verdict([outcome({}, committed=False)] * 2) == "no committed record"
    assert row_verdict([same, outcome({}, committed=False)]) == "1/2 bit-exact: no committed record for 1 of 2"
    assert row_verdict([outcome({"status": ("finished", "failed")})]) == \
        "0/1 bit-exact: status differs in 1 of 1 (finished → failed)"
    xeon, epyc = {**RECORD, "env": {"cpu": "Xeon", "torch": "2.14"}}, {"env": {"cpu": "EPYC", "torch": "2.14"}}
    moved = [Outcome(None, epyc, xeon, {"test_top1": (95.2, 95.1)}), Outcome(None, epyc, xeon, {})]
    assert row_verdict(moved) == ("1/2 bit-exact: test_top1 differs in 1 of 2 (max |Δ| 0.1); re-run on another "
                                  "machine (cpu Xeon → EPYC): bit-exact only on the record's")
    assert row_verdict([Outcome(None, xeon, xeon, {"test_top1": (95.2, 95.1)})]) == \
        "0/1 bit-exact: test_top1 differs in 1 of 1 (max |Δ| 0.1)"  # same machine: no note
    avx2 = {"env": {**xeon["env"], "cpu_capability": "AVX2"}}  # an older record does not name the instructions
    assert row_verdict([Outcome(None, avx2, xeon, {"test_top1": (95.2, 95.1)})]) == (
        "0/1 bit-exact: test_top1 differs in 1 of 1 (max |Δ| 0.1); the record does not name its CPU's vector "
        "instructions (this Xeon has AVX2): made with others, it re-runs bit-exactly only where they are the same")
    named = {**RECORD, "env": avx2["env"]}
    assert row_verdict([Outcome(None, avx2, named, {"test_top1": (95.2, 95.1)})]) == \
        "0/1 bit-exact: test_top1 differs in 1 of 1 (max |Δ| 0.1)"


def test_numbers_are_printed_rounded():
    assert format_value(95.19999999999999) == "95.2"
    assert format_value(100 * 343 / 360) == "95.2778"
    assert format_value(614) == "614" and format_value(None) == "None" and format_value(2.5e-6) == "2.5e-06"
    assert format_value({"test": {"pred": "x"}}).startswith("sha256 ")
    assert format_pair(95.19999999999999, 95.3) == ("95.2", "95.3")
    old, new = format_pair(95.2, 95.20000000000002)  # different values never print alike
    assert old != new and old == "95.2" and new == "95.20000000000002"


def test_verify_prints_rounded_numbers_and_compares_predictions(finished_run, tmp_path, capsys):
    (path,) = [p for p, r in load_records(finished_run / "results") if r.method == "baseline" and r.seed == 0]
    raw = json.loads(path.read_text())
    raw["metrics"]["test_top1"] = 95.19999999999999
    assert raw.get("predictions"), "records carry per-sample predictions"
    raw["predictions"] = {**raw["predictions"], "test": "tampered"}
    tampered = tmp_path / "seed0.json"
    tampered.write_text(json.dumps(raw))
    assert main(["verify", str(tampered)]) == 1
    out = capsys.readouterr().out
    assert "95.19999999999999" not in out
    (top1,) = [line for line in out.splitlines() if line.startswith("test_top1")]
    assert top1.split()[1] == "95.2" and top1.split()[-1] == "MISMATCH"
    (preds,) = [line for line in out.splitlines() if line.startswith("predictions")]
    assert preds.split()[-1] == "MISMATCH"
    assert "2 metric(s) differ" in out


def test_a_row_without_committed_records_is_named_not_retrained(finished_run, tmp_path, capsys):
    """A method the suite runs but nobody has run yet has nothing to reproduce; the rows that have records do."""
    results = tmp_path / "results"
    shutil.copytree(finished_run / "results", results)
    shutil.rmtree(results / "tiny" / "mnist1d" / "cnn1d_w8--cnn1d_w4" / "vanilla_kd")
    code = main(["reproduce", "--suite", str(finished_run / "tiny.yaml"), "--results-dir", str(results),
                 "--seeds", "0", "--scratch", str(tmp_path / "scratch")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "1 row(s) have no committed records" in err and "mnist1d cnn1d_w8:cnn1d_w4 vanilla_kd" in err
    assert out.strip().splitlines()[-1] == "1/1 records reproduced bit-exactly"
    assert not list((tmp_path / "scratch" / "results").rglob("vanilla_kd"))
