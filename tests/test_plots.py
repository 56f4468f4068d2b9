"""Leaderboard pictures (written, embedded, byte-identical, covered by --check) and MLflow training curves."""

import re
import shutil

import mlflow
import pytest

from kdbench.cli import main
from kdbench.leaderboard import render, render_figures
from kdbench.records import load_records


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, session_home):
    """Run the tiny suite once for the module (2 methods × 2 seeds) and write its leaderboard."""
    root = tmp_path_factory.mktemp("plots")
    suite = root / "tiny.yaml"
    from conftest import TINY_SUITE

    suite.write_text(TINY_SUITE)
    mp = pytest.MonkeyPatch()
    mp.setenv("KDBENCH_HOME", str(session_home))
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    assert main(["run", "--suite", str(suite), "--results-dir", str(root / "results")]) == 0
    mp.undo()
    assert main(["leaderboard", "--results-dir", str(root / "results"), "--output", str(root / "leaderboard.md")]) == 0
    return root


def _check(root) -> int:
    return main(["leaderboard", "--results-dir", str(root / "results"), "--output", str(root / "leaderboard.md"), "--check"])


def test_plots_are_written_and_embedded(finished_run):
    links = re.findall(r"!\[[^]]+\]\(([^)]+)\)", (finished_run / "leaderboard.md").read_text())
    prefix = "results/plots/tiny-mnist1d-cnn1d_w8--cnn1d_w4"
    assert links == [f"{prefix}-latency.png", f"{prefix}-params.png"]
    for link in links:
        assert (finished_run / link).read_bytes().startswith(b"\x89PNG")
    assert len(load_records(finished_run / "results")) == 4  # the PNGs under results/ are not records


def test_plots_are_byte_identical_on_regeneration(finished_run):
    figures = render_figures(finished_run / "results")
    assert figures == render_figures(finished_run / "results")
    assert figures == {rel: (finished_run / rel).read_bytes() for rel in figures}
    assert all(b"Software" not in data and b"Matplotlib" not in data for data in figures.values())


@pytest.mark.parametrize("damage", ["delete", "alter"])
def test_check_fails_on_a_missing_or_altered_plot(finished_run, tmp_path, damage, capsys):
    root = tmp_path / "copy"
    shutil.copytree(finished_run, root)
    assert _check(root) == 0
    png = root / "results/plots/tiny-mnist1d-cnn1d_w8--cnn1d_w4-params.png"
    if damage == "delete":
        png.unlink()
    else:
        png.write_bytes(png.read_bytes() + b"\0")
    assert _check(root) == 1
    assert f"{png} is {'missing' if damage == 'delete' else 'stale'}" in capsys.readouterr().out
    assert main(["leaderboard", "--results-dir", str(root / "results"), "--output", str(root / "leaderboard.md")]) == 0
    assert _check(root) == 0


def test_output_elsewhere_keeps_links_valid(finished_run, tmp_path):
    out = tmp_path / "site" / "board.md"
    out.parent.mkdir()
    assert main(["leaderboard", "--results-dir", str(finished_run / "results"), "--output", str(out)]) == 0
    assert out.read_text() == render(finished_run / "results")
    for link in re.findall(r"!\[[^]]+\]\(([^)]+)\)", out.read_text()):
        assert (out.parent / link).is_file()
    stray = out.parent / "results/plots/gone-track-a--b-params.png"
    stray.write_bytes(b"")
    assert main(["leaderboard", "--results-dir", str(finished_run / "results"), "--output", str(out), "--check"]) == 1
    assert main(["leaderboard", "--results-dir", str(finished_run / "results"), "--output", str(out)]) == 0
    assert not stray.exists()


def test_mlflow_curves_have_one_point_per_epoch(finished_run):
    mlflow.set_tracking_uri(f"sqlite:///{finished_run / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    runs = {r.data.tags["record_key"]: r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")}
    for _, rec in load_records(finished_run / "results"):
        run = runs[f"{rec.config_sha256[:16]}-seed{rec.seed}-{rec.created_at}"]
        curves = [k for k in rec.history[0] if k.startswith("train_") or k == "val_top1"]
        assert "train_loss" in curves and "val_top1" in curves
        if rec.method == "vanilla_kd":
            assert "train_kd" in curves, curves
        for name in curves:
            points = client.get_metric_history(run.info.run_id, name)
            assert [p.step for p in points] == [1, 2], name
            assert [p.value for p in points] == [row[name] for row in rec.history], name


def test_one_seed_draws_without_error_bars(finished_run, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(finished_run / "results", results)
    for path, rec in load_records(results):
        if rec.seed == 1:
            path.unlink()
    figures = render_figures(results)
    assert len(figures) == 2 and figures != render_figures(finished_run / "results")
