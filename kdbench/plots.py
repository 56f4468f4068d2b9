"""Accuracy-vs-cost pictures for each leaderboard table (matplotlib, Agg backend, no pyplot state).

The PNG bytes depend only on the records (no timestamps, no software tag, fixed size, dpi, style and
font), so ``kdbench leaderboard --check`` can compare them with the committed files.
"""

from __future__ import annotations

import io

import matplotlib.style
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import offset_copy

PLOT_DIR = "results/plots"  # relative to the folder of leaderboard.md, so the embedded links stay valid
KINDS = {"latency": "batch-1 latency", "params": "parameters"}
LOG_SPREAD = 5  # a params axis spanning more than this factor is drawn on a log scale
STYLE = {"font.family": "DejaVu Sans", "font.size": 9, "axes.grid": True, "grid.alpha": 0.3}
MARKERS = "ov^D<>pPhX*"
DODGE_PT = 7  # sideways spacing (points) of methods drawn at the same x


def plot_path(key: tuple[str, str, str, str], kind: str) -> str:
    """``results/plots/<suite>-<track>-<teacher>--<student>-<kind>.png``."""
    suite, track, teacher, student = key
    return f"{PLOT_DIR}/{suite}-{track}-{teacher}--{student}-{kind}.png"


def embeds(key: tuple[str, str, str, str]) -> str:
    """The markdown line that shows a table's two pictures."""
    track = key[1]
    return " ".join(f"![{track}: test top-1 vs {label}]({plot_path(key, kind)})" for kind, label in KINDS.items())


def pair_figures(key: tuple[str, str, str, str], finished: pd.DataFrame, order: list[str]) -> dict[str, bytes]:
    """The two PNGs of one table, by path: test top-1 vs batch-1 latency and vs student parameters."""
    points = _points(finished, order)
    teacher = None
    if finished["m_teacher_top1"].notna().any():  # a run without an external teacher records none
        teacher = {
            "acc": finished["m_teacher_top1"].mean(),
            "latency": finished["m_teacher_latency_b1_ms"].median(),
            "params": finished["m_teacher_params"].max(),
        }
    return {plot_path(key, kind): _draw(key, kind, points, teacher) for kind in KINDS}


def _points(finished: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    rows = []
    for method in order:
        runs = finished[finished["method"] == method]
        if runs.empty:
            continue
        acc = runs["m_test_top1"]
        rows.append({
            "method": method,
            "acc": acc.mean(),
            "std": acc.std(ddof=1) if len(acc) > 1 else None,
            "latency": runs["m_latency_b1_ms"].median(),
            "params": runs["m_params"].iloc[0],
        })
    return pd.DataFrame(rows)


def _draw(key: tuple[str, str, str, str], kind: str, points: pd.DataFrame, teacher: dict | None) -> bytes:
    suite, track, teacher_name, student = key
    with matplotlib.style.context(["default", STYLE]):
        fig = Figure(figsize=(7.5, 4.5), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)  # Agg only: no GUI backend, no pyplot
        ax = fig.add_subplot()
        ax.set_xlabel(_x_axis(ax, kind, points, teacher))
        # methods at the same x (all students of a pair have the same parameters) are drawn side by side,
        # the first (the baseline) at its true x, the others to its right
        rank = points.groupby(kind).cumcount()
        for i, p in enumerate(points.itertuples()):
            base = p.method == "baseline"
            shift = offset_copy(ax.transData, fig, x=DODGE_PT * rank[i], units="points")
            std = None if pd.isna(p.std) else p.std  # one seed: no error bar
            ax.errorbar(getattr(p, kind), p.acc, yerr=std, capsize=3, linestyle="none", transform=shift,
                        marker="s" if base else MARKERS[i % len(MARKERS)], markersize=8 if base else 6,
                        color="black" if base else f"C{i % 10}", label=f"{p.method} (reference)" if base else p.method)
            ax.update_datalim([(getattr(p, kind), p.acc - (std or 0)), (getattr(p, kind), p.acc + (std or 0))])
        if teacher is not None:
            ax.plot(teacher[kind], teacher["acc"], linestyle="none", marker="*", markersize=12, color="goldenrod",
                    markeredgecolor="black", label=f"teacher ({teacher_name})")
        baseline = points[points["method"] == "baseline"]
        if not baseline.empty:
            ax.axhline(baseline["acc"].iloc[0], color="gray", linestyle="--", linewidth=1, label="baseline mean")
        ax.margins(x=0.08)
        ax.autoscale_view()  # from update_datalim: autoscaling skips the shifted artists
        ax.set_ylabel("test top-1 (%, mean ± sample std over seeds)")
        ax.set_title(f"{track}: {teacher_name} → {student} (suite {suite}): test top-1 vs {KINDS[kind]}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, frameon=False)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _x_axis(ax, kind: str, points: pd.DataFrame, teacher: dict | None) -> str:
    """Set the x scale; returns the x label."""
    if kind == "latency":
        return "batch-1 latency (ms, median over seeds)"
    xs = [*points["params"], *([teacher["params"]] if teacher else [])]
    log = max(xs) > LOG_SPREAD * min(xs)
    ax.set_xscale("log" if log else "linear")
    return f"parameters (deployed model{'; log scale' if log else ''}; equal counts drawn side by side)"
