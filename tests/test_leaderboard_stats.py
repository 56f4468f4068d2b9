"""Every Δ in the leaderboard has its interval and verdict, recomputed here from the records alone; rows that
are incomplete or untraceable fail --check; `kdbench compare` gives the same answer as the table."""

import json
import shutil

import pytest

from kdbench.cli import main
from kdbench.leaderboard import machine_name, render
from kdbench.method import METHODS
from kdbench.predictions import outcomes
from kdbench.records import load_records
from kdbench.stats import compare, holm, verdict


def _row(text: str, method: str) -> dict:
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| method"))
    row = next(line for line in lines if line.startswith(f"| {method} "))
    cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]  # noqa: E731
    return dict(zip(cells(header), cells(row)))


def _by_method(results):
    records = {}
    for _, rec in load_records(results):
        records.setdefault(rec.method, []).append(rec.model_dump())
    return records


def test_delta_interval_and_verdict_recompute_from_the_records(finished_run):
    records = _by_method(finished_run / "results")
    diff = compare(outcomes(records["vanilla_kd"]), outcomes(records["baseline"]))
    row = _row(render(finished_run / "results"), "vanilla_kd")
    assert row["Δ vs baseline [95 % CI]"] == f"{diff.delta:+.2f} [{diff.low:+.2f}, {diff.high:+.2f}]"
    assert row["p"] == f"{diff.p_value:.3f}"
    assert row["verdict"].strip("*") == verdict(diff, holm([diff.p_value])[0])
    mean = sum(r["metrics"]["test_top1"] for r in records["vanilla_kd"]) / 2
    assert row["test top-1 [95 % CI]"].startswith(f"{mean:.2f} [")


def test_a_table_wider_than_half_a_point_is_labelled_underpowered(finished_run):
    text = render(finished_run / "results")
    line = next(line for line in text.splitlines() if line.startswith("Resolution:"))
    assert line.startswith("Resolution: 2 seeds × 10,000 test samples;") and "MDE" in line
    diff = compare(*(outcomes(recs) for recs in _by_method(finished_run / "results").values()))
    assert ("**underpowered**" in line) == (diff.half_width > 0.5)  # one row: its interval is the median


def _copy(finished_run, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(finished_run, root)
    out = root / "leaderboard.md"
    assert main(["leaderboard", "--results-dir", str(root / "results"), "--output", str(out)]) == 0
    return root, ["leaderboard", "--results-dir", str(root / "results"), "--output", str(out), "--check"]


def test_check_refuses_a_record_made_from_a_dirty_tree(finished_run, tmp_path, capsys):
    root, check = _copy(finished_run, tmp_path)
    assert main(check) == 0
    path = next(p for p, r in load_records(root / "results") if r.method == "baseline")
    raw = json.loads(path.read_text())
    raw["git_dirty"] = True
    path.write_text(json.dumps(raw))
    assert main(check) == 1
    assert f"{path} was made from a tree with uncommitted changes" in capsys.readouterr().out


def test_check_refuses_a_row_made_with_an_older_method_version(finished_run, tmp_path, capsys):
    root, check = _copy(finished_run, tmp_path)
    for path, record in load_records(root / "results"):
        if record.method == "vanilla_kd":
            raw = json.loads(path.read_text())
            raw["method_version"] -= 1
            path.write_text(json.dumps(raw))
    assert main(check) == 1
    version = METHODS.get("vanilla_kd").version
    assert f"vanilla_kd: made with method version {version - 1}, the code has version {version}" in capsys.readouterr().out


def test_rows_made_on_another_cpu_are_named_with_their_teachers(finished_run, tmp_path):
    root, _ = _copy(finished_run, tmp_path)
    def machine_notes():
        lines = render(root / "results").splitlines()
        return [line for line in lines if line.startswith("- `") and "were made on" in line]

    assert machine_notes() == []
    for path, record in load_records(root / "results"):
        if record.method == "vanilla_kd":
            raw = json.loads(path.read_text())
            raw["env"]["cpu"] = "Another CPU"
            if record.seed == 1:
                raw["metrics"]["teacher_top1"] += 0.5
            path.write_text(json.dumps(raw))
    usual = next(r for _, r in load_records(root / "results") if r.method == "baseline" and r.seed == 1)
    here = machine_name(usual.env.model_dump())
    assert here == f"{usual.env.cpu} ({usual.env.cpu_capability})" and usual.env.cpu_capability
    assert machine_notes() == [
        f"- `vanilla_kd`: 2 of its 2 records were made on Another CPU ({usual.env.cpu_capability}), the table's other "
        f"rows on {here}; its teacher there tests differently on 1 of its seeds (seed 1: "
        f"{usual.metrics.teacher_top1 + 0.5:.2f} against {usual.metrics.teacher_top1:.2f})."]
    for path, record in load_records(root / "results"):  # the same CPU name, other vector instructions and int8
        if record.method == "vanilla_kd":
            raw = json.loads(path.read_text())
            raw["env"] |= {"cpu": usual.env.cpu, "cpu_capability": "Other ISA", "int8_weight_bits": 7}
            path.write_text(json.dumps(raw))
    assert machine_notes()[0].startswith(f"- `vanilla_kd`: 2 of its 2 records were made on {usual.env.cpu} (Other ISA, "
                                         f"7-bit int8 weights), the table's other rows on {here}; ")


def test_check_refuses_a_row_missing_a_declared_seed(finished_run, tmp_path, capsys):
    root, check = _copy(finished_run, tmp_path)
    next(p for p, r in load_records(root / "results") if r.method == "vanilla_kd" and r.seed == 1).unlink()
    assert main(["leaderboard", "--results-dir", str(root / "results"), "--output", str(root / "leaderboard.md")]) == 0
    assert main(check) == 1
    out = capsys.readouterr().out
    assert "vanilla_kd: 1 of the 2 seeds the suite declares have finished records" in out
    assert "has rows that cannot be published" in out and "run `kdbench leaderboard`" not in out
    assert "| vanilla_kd (incomplete: 1/2 seeds)" in (root / "leaderboard.md").read_text()


def test_compare_answers_like_the_table(finished_run, capsys):
    pair = finished_run / "results" / "tiny" / "mnist1d" / "cnn1d_w8--cnn1d_w4"
    assert main(["compare", str(pair / "vanilla_kd"), str(pair / "baseline")]) == 0
    out = capsys.readouterr().out
    row = _row(render(finished_run / "results"), "vanilla_kd")
    delta, interval = row["Δ vs baseline [95 % CI]"].split(" ", 1)
    assert f"Δ {delta} points, 95 % interval {interval}" in out and "2 paired seeds × 10,000 test samples" in out


@pytest.mark.parametrize("args, message", [
    (["compare", "/nonexistent", "/nonexistent"], "no finished run records"),
])
def test_compare_refuses_bad_input_in_one_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_compare_refuses_a_folder_of_several_rows(finished_run, capsys):
    pair = finished_run / "results" / "tiny" / "mnist1d" / "cnn1d_w8--cnn1d_w4"
    assert main(["compare", str(pair), str(pair / "baseline")]) == 2
    assert "holds records of 2 different rows" in capsys.readouterr().err
