"""A tiny suite through the command line: records, MLflow, leaderboard, --check, determinism."""

import json

import mlflow
import pytest

from kdbench.cli import main
from kdbench.errors import KdbenchError
from kdbench.leaderboard import render
from kdbench.predictions import split_outcome
from kdbench.records import environment, load_records
from kdbench.timing import load_timing, timing_path


def test_records_have_every_field(finished_run):
    records = load_records(finished_run / "results")
    assert len(records) == 4
    for path, rec in records:
        raw = json.loads(path.read_text())
        for field in ("schema_version", "suite", "track", "teacher", "student", "method", "method_version", "seed",
                      "status", "config", "config_sha256", "git_commit", "git_dirty", "created_at", "env", "metrics"):
            assert field in raw, field
        assert rec.status == "finished"
        m = rec.metrics
        assert 0 <= m.test_top1 <= 100 and 0 <= m.agreement <= 100
        assert m.params == 614 and m.extra_params == 0 and m.flops > 0
        assert m.latency_b1_ms is None  # timed once per architecture, in the pair's timing.json
        assert rec.env.threads == 1 and rec.config["train"]["epochs"] == 2
        assert rec.suite_seeds == [0, 1] and rec.schema_version == 2
        assert len(split_outcome(rec.predictions["test"])[1]) == 10_000 and "ids" not in rec.predictions["test"]
        assert split_outcome(rec.predictions["test"])[1].mean() * 100 == pytest.approx(m.test_top1)
        assert split_outcome(rec.predictions["val"])[1].mean() * 100 == pytest.approx(m.val_top1)
    hashes = {rec.method: rec.config_sha256 for _, rec in records}
    assert hashes["baseline"] != hashes["vanilla_kd"]


def test_local_store_keeps_artifacts_in_kdbench_home(tiny_suite, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("KDBENCH_HOME", str(tmp_path / "home"))
    args = ["run", "--suite", str(tiny_suite), "--method", "baseline", "--seeds", "0", "--results-dir", str(tmp_path)]
    assert main(args) == 0
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.artifact_uri.startswith((tmp_path / "home" / "mlartifacts").as_uri())
    assert list((tmp_path / "home" / "mlartifacts").rglob("record.json"))


def test_every_run_is_in_mlflow(finished_run):
    mlflow.set_tracking_uri(f"sqlite:///{finished_run / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 4
    assert set(runs["tags.method"]) == {"baseline", "vanilla_kd"}
    from kdbench.tracking import record_key

    records = {record_key(rec.model_dump(mode="json")): rec for _, rec in load_records(finished_run / "results")}
    assert set(runs["tags.record_key"]) == set(records)
    for _, run in runs.iterrows():  # each run's final metric is its record's
        assert run["metrics.test_top1"] == pytest.approx(records[run["tags.record_key"]].metrics.test_top1)
    client = mlflow.MlflowClient()
    curve = client.get_metric_history(runs["run_id"].iloc[0], "val_top1")
    assert [p.step for p in curve] == [1, 2]
    # artifacts sit beside the sqlite database, never in ./mlruns of the folder kdbench ran from
    assert set(runs["artifact_uri"].str.startswith((finished_run / "mlartifacts").as_uri())) == {True}


def test_leaderboard_and_check(finished_run, capsys):
    results, out = str(finished_run / "results"), finished_run / "leaderboard.md"
    assert main(["leaderboard", "--results-dir", results, "--output", str(out)]) == 0
    text = out.read_text()
    assert "| baseline" in text and "| vanilla_kd" in text and "teacher (cnn1d_w8)" in text
    assert render(finished_run / "results") == text  # deterministic
    assert main(["leaderboard", "--results-dir", results, "--output", str(out), "--check"]) == 0
    out.write_text(text.replace("vanilla_kd", "vanilla_kb", 1))
    assert main(["leaderboard", "--results-dir", results, "--output", str(out), "--check"]) == 1


def test_one_timing_per_architecture_shared_by_every_row(finished_run):
    timing = load_timing(timing_path(finished_run / "results", "tiny", "mnist1d", "cnn1d_w8", "cnn1d_w4"))
    assert timing["timed_with"] == ["cnn1d_w8", "cnn1d_w4"]
    assert timing["student_cost"]["params"] == 614 and timing["student_cost"]["latency_b1_ms"] > 0
    assert timing["teacher_cost"]["latency_b1_ms"] > 0
    cost_lines = [line for line in render(finished_run / "results").splitlines() if line.startswith("Student `")]
    assert len(cost_lines) == 1 and f"{timing['student_cost']['latency_b1_ms']:.3f} ms" in cost_lines[0]


def test_finished_runs_are_skipped_and_left_untouched(finished_run, capsys):
    suite = str(finished_run / "tiny.yaml")
    before = {p: p.read_bytes() for p, _ in load_records(finished_run / "results")}
    timing = timing_path(finished_run / "results", "tiny", "mnist1d", "cnn1d_w8", "cnn1d_w4").read_bytes()
    assert main(["run", "--suite", suite, "--results-dir", str(finished_run / "results"), "--seeds", "0"]) == 0
    assert "0 of 2 runs trained" in capsys.readouterr().out
    assert {p: p.read_bytes() for p, _ in load_records(finished_run / "results")} == before
    assert timing_path(finished_run / "results", "tiny", "mnist1d", "cnn1d_w8", "cnn1d_w4").read_bytes() == timing


def test_same_seed_same_metrics(finished_run, tmp_path):
    suite = str(finished_run / "tiny.yaml")
    args = ["run", "--suite", suite, "--method", "vanilla_kd", "--seeds", "1", "--results-dir", str(tmp_path)]
    assert main(args) == 0
    ((_, again),) = load_records(tmp_path)
    (original,) = [r for _, r in load_records(finished_run / "results") if r.method == "vanilla_kd" and r.seed == 1]
    for key in ("test_top1", "val_top1", "teacher_top1", "agreement", "params", "flops"):
        assert getattr(again.metrics, key) == getattr(original.metrics, key), key
    assert again.config_sha256 == original.config_sha256


def test_rows_trained_with_speed_modes_say_so(finished_run, tmp_path):
    """A row made with an opt-in speed mode (bf16, compile) is another configuration: its table names it."""
    import shutil

    results = tmp_path / "results"
    shutil.copytree(finished_run / "results", results)
    for path, record in load_records(results):
        if record.method == "vanilla_kd":
            raw = json.loads(path.read_text())
            raw["config"]["train"] |= {"precision": "bf16", "compile": "default"}
            path.write_text(json.dumps(raw))
    board = render(results)
    assert ("- trained with the opt-in speed modes precision bf16, compile default (README, Performance; not the fp32 "
            "eager protocol): `vanilla_kd`.") in board.splitlines()
    assert "speed modes" not in render(finished_run / "results")


def test_failed_runs_are_counted_not_hidden(finished_run, tmp_path):
    import shutil

    results = tmp_path / "results"
    shutil.copytree(finished_run / "results", results)
    (path,) = [p for p, r in load_records(results) if r.method == "vanilla_kd" and r.seed == 1]
    raw = json.loads(path.read_text())
    raw.update(status="failed", error="diverged: loss is nan at epoch 2, step 30", metrics=None)
    path.write_text(json.dumps(raw))
    row = next(line for line in render(results).splitlines() if line.startswith("| vanilla_kd"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "vanilla_kd (incomplete: 1/2 seeds)" and cells[1:3] == ["1", "1"]  # n finished, failed


def test_verify_reports_match_and_mismatch(finished_run, tmp_path, capsys):
    import shutil

    (path,) = [p for p, r in load_records(finished_run / "results") if r.method == "vanilla_kd" and r.seed == 0]
    assert main(["verify", str(path)]) == 0
    assert "verified: every deterministic metric matches" in capsys.readouterr().out
    tampered = tmp_path / "seed0.json"
    shutil.copy(path, tampered)
    raw = json.loads(tampered.read_text())
    raw["metrics"]["test_top1"] += 1.0
    tampered.write_text(json.dumps(raw))
    assert main(["verify", str(tampered)]) == 1
    out = capsys.readouterr().out
    assert "test_top1" in out and "MISMATCH" in out and "1 metric(s) differ\n" in out
    raw["env"]["cpu"] = "Another CPU"  # a record made on another machine: the mismatch says so
    tampered.write_text(json.dumps(raw))
    assert main(["verify", str(tampered)]) == 1
    assert f"1 metric(s) differ; re-run on another machine (cpu Another CPU → {environment(1)['cpu']}): bit-exact only on " \
        "the record's" in capsys.readouterr().out
    raw["env"] |= {"cpu": environment(1)["cpu"], "cpu_capability": "Other ISA"}  # same CPU name, other instructions
    tampered.write_text(json.dumps(raw))
    assert main(["verify", str(tampered)]) == 1
    assert (f"re-run on another machine (cpu_capability Other ISA → {environment(1)['cpu_capability']}): bit-exact "
            "only on the record's") in capsys.readouterr().out
    del raw["env"]["cpu_capability"]  # a record made before records named them
    tampered.write_text(json.dumps(raw))
    assert main(["verify", str(tampered)]) == 1
    assert capsys.readouterr().out.rstrip().endswith(
        f"1 metric(s) differ; the record does not name its CPU's vector instructions (this {environment(1)['cpu']} "
        f"has {environment(1)['cpu_capability']}): made with others, it re-runs bit-exactly only where they are the same")


def test_verify_says_when_the_cached_teacher_is_not_the_records(finished_run, session_home, tmp_path, monkeypatch,
                                                                 capsys):
    """A teacher cache filled by other code or on another machine: every metric differs, and the verdict says why."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    (path,) = [p for p, r in load_records(finished_run / "results") if r.method == "vanilla_kd" and r.seed == 0]
    home = tmp_path / "home"
    shutil.copytree(session_home / "teachers", home / "teachers")
    noise = torch.Generator().manual_seed(0)
    for cached in (home / "teachers").glob("*.safetensors"):  # another teacher under the record's cache key
        weights = load_file(cached)
        save_file({k: v + torch.randn(v.shape, generator=noise) if k.endswith("weight") else v
                   for k, v in weights.items()}, cached)
    monkeypatch.setenv("KDBENCH_HOME", str(home))
    assert main(["verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert next(line for line in out.splitlines() if line.startswith("teacher_top1")).endswith("MISMATCH")
    assert out.rstrip().endswith(f"; the teacher differs from the record's: this re-run used the one cached in "
                                 f"{home / 'teachers'}; set KDBENCH_HOME to an empty folder to re-train it")
    moved = tmp_path / "seed0.json"  # the same record made on another CPU: re-training the teacher would not help
    raw = json.loads(path.read_text())
    raw["env"]["cpu"] = "Another CPU"
    moved.write_text(json.dumps(raw))
    assert main(["verify", str(moved)]) == 1
    out = capsys.readouterr().out
    assert "re-run on another machine (cpu Another CPU" in out and "KDBENCH_HOME" not in out


def test_verify_missing_file(capsys):
    assert main(["verify", "/nonexistent/seed0.json"]) == 2
    assert capsys.readouterr().err.strip() == "kdbench: error: record /nonexistent/seed0.json does not exist"


def test_published_numbers_sit_beside_ours(finished_run, tmp_path):
    published = tmp_path / "published.yaml"
    published.write_text(
        "sources: {paper: 'A. Author, a paper, table 1'}\n"
        "results:\n"
        "  - {suite: tiny, track: mnist1d, teacher: cnn1d_w8, student: cnn1d_w4, source: paper,\n"
        "     top1: {teacher: 97.5, vanilla_kd: 12.34}}\n"
    )
    text = render(finished_run / "results", published)
    row = next(line for line in text.splitlines() if line.startswith("| vanilla_kd"))
    teacher = next(line for line in text.splitlines() if line.startswith("| teacher"))
    assert row.rstrip(" |").endswith("12.34 [paper]") and teacher.rstrip(" |").endswith("97.50 [paper]")
    assert "- published [paper]: A. Author, a paper, table 1" in text
    assert "| published" not in render(finished_run / "results")  # no entry for this suite in the real file
    published.write_text(published.read_text().replace("source: paper", "source: nowhere"))
    with pytest.raises(KdbenchError, match="source 'nowhere' is used but not listed"):
        render(finished_run / "results", published)


@pytest.mark.parametrize("content", ['{"name": "x", "version": 3}', "[1, 2]"])
def test_verify_a_json_file_that_is_not_a_record(tmp_path, capsys, content):
    path = tmp_path / "package.json"
    path.write_text(content)
    assert main(["verify", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"kdbench: error: {path} is not a kdbench run record (it has none of schema_version, " \
                  "config_sha256, metrics); give the path of a results/…/seedN.json file"
