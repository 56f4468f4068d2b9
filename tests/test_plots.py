"""Leaderboard pictures (written, embedded, byte-identical, covered by --check) and MLflow training curves."""

import re
import shutil

import mlflow
import pytest

from kdbench.cli import main
from kdbench.leaderboard import build, render
from kdbench.records import load_records


@pytest.fixture(scope="module")
def plotted_run(finished_run):
    """The tiny run (conftest) with its leaderboard and plots written."""
    results, output = str(finished_run / "results"), str(finished_run / "leaderboard.md")
    assert main(["leaderboard", "--results-dir", results, "--output", output]) == 0
    return finished_run


def _check(root) -> int:
    return main(["leaderboard", "--results-dir", str(root / "results"), "--output", str(root / "leaderboard.md"), "--check"])


def test_plots_are_written_and_embedded(plotted_run):
    links = re.findall(r"!\[[^]]+\]\(([^)]+)\)", (plotted_run / "leaderboard.md").read_text())
    prefix = "results/plots/tiny-mnist1d"
    assert links == [f"{prefix}-latency.png", f"{prefix}-params.png"]
    for link in links:
        assert (plotted_run / link).read_bytes().startswith(b"\x89PNG")
    assert len(load_records(plotted_run / "results")) == 4  # the PNGs under results/ are not records


def test_plots_are_byte_identical_on_regeneration(plotted_run):
    figures = build(plotted_run / "results").figures
    assert figures == build(plotted_run / "results").figures
    assert figures == {rel: (plotted_run / rel).read_bytes() for rel in figures}
    assert all(b"Software" not in data and b"Matplotlib" not in data for data in figures.values())


@pytest.mark.parametrize("damage", ["delete", "alter"])
def test_check_fails_on_a_missing_or_altered_plot(plotted_run, tmp_path, damage, capsys):
    root = tmp_path / "copy"
    shutil.copytree(plotted_run, root)
    assert _check(root) == 0
    png = root / "results/plots/tiny-mnist1d-params.png"
    if damage == "delete":
        png.unlink()
    else:
        png.write_bytes(png.read_bytes() + b"\0")
    assert _check(root) == 1
    assert f"{png} is {'missing' if damage == 'delete' else 'stale'}" in capsys.readouterr().out
    assert main(["leaderboard", "--results-dir", str(root / "results"), "--output", str(root / "leaderboard.md")]) == 0
    assert _check(root) == 0


def test_output_elsewhere_keeps_links_valid(plotted_run, tmp_path):
    out = tmp_path / "site" / "board.md"
    out.parent.mkdir()
    assert main(["leaderboard", "--results-dir", str(plotted_run / "results"), "--output", str(out)]) == 0
    assert out.read_text() == render(plotted_run / "results")
    for link in re.findall(r"!\[[^]]+\]\(([^)]+)\)", out.read_text()):
        assert (out.parent / link).is_file()
    stray = out.parent / "results/plots/gone-track-a--b-params.png"
    stray.write_bytes(b"")
    assert main(["leaderboard", "--results-dir", str(plotted_run / "results"), "--output", str(out), "--check"]) == 1
    assert main(["leaderboard", "--results-dir", str(plotted_run / "results"), "--output", str(out)]) == 0
    assert not stray.exists()


def test_mlflow_curves_have_one_point_per_epoch(plotted_run):
    mlflow.set_tracking_uri(f"sqlite:///{plotted_run / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    runs = {r.data.tags["record_key"]: r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")}
    for _, rec in load_records(plotted_run / "results"):
        run = runs[f"{rec.config_sha256[:16]}-seed{rec.seed}-{rec.created_at}"]
        curves = [k for k in rec.history[0] if k.startswith("train_") or k == "val_top1"]
        assert "train_loss" in curves and "val_top1" in curves
        if rec.method == "vanilla_kd":
            assert "train_kd" in curves, curves
        for name in curves:
            points = client.get_metric_history(run.info.run_id, name)
            assert [p.step for p in points] == [1, 2], name
            assert [p.value for p in points] == [row[name] for row in rec.history], name


def test_plots_draw_each_methods_interval(plotted_run, tmp_path, monkeypatch):
    """The error bars are the table's 95 % intervals: the figure changes when an interval does, and the
    bars drawn span exactly each row's interval."""
    from matplotlib.axes import Axes

    drawn = []
    original = Axes.errorbar

    def spy(self, x, y, yerr=None, **kwargs):
        drawn.append((kwargs.get("label"), list(y), [list(e) for e in yerr]))
        return original(self, x, y, yerr=yerr, **kwargs)

    monkeypatch.setattr(Axes, "errorbar", spy)
    board = build(plotted_run / "results")
    text = board.text
    for label, ys, (below, above) in drawn[:2]:
        method = label.split(" ")[0]
        cell = next(line for line in text.splitlines() if line.startswith(f"| {method} ")).split("|")[4].strip()
        mean, low, high = (float(v) for v in cell.replace("[", "").replace("]", "").replace(",", "").split())
        assert ys[0] == pytest.approx(mean, abs=0.005)
        assert ys[0] - below[0] == pytest.approx(low, abs=0.005) and ys[0] + above[0] == pytest.approx(high, abs=0.005)
    results = tmp_path / "results"
    shutil.copytree(plotted_run / "results", results)
    for path, rec in load_records(results):
        if rec.seed == 1:
            path.unlink()
    assert build(results).figures != board.figures
