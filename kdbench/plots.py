"""Accuracy-vs-cost pictures for each leaderboard table (matplotlib, Agg backend, no pyplot state).

The PNG bytes depend only on the records (no timestamps, no software tag, fixed size, dpi, style and
font), so ``kdbench leaderboard --check`` can compare them with the committed files.
"""

from __future__ import annotations

import io

import matplotlib.style
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PLOT_DIR = "results/plots"  # relative to the folder of leaderboard.md, so the embedded links stay valid
KINDS = {"latency": "batch-1 latency", "params": "parameters"}
LOG_SPREAD = 5  # an axis spanning more than this factor is drawn on a log scale
STYLE = {"font.family": "DejaVu Sans", "font.size": 9, "axes.grid": True, "grid.alpha": 0.3}
MARKERS = "ov^D<>pPhX*"
DODGE = 0.012  # sideways spacing of methods at one student, as a fraction of the x axis (log-aware)


def plot_path(key: tuple[str, str], kind: str) -> str:
    """``results/plots/<suite>-<track>-<kind>.png``."""
    suite, track = key
    return f"{PLOT_DIR}/{suite}-{track}-{kind}.png"


def embeds(key: tuple[str, str]) -> str:
    """The markdown line that shows a track's two pictures."""
    track = key[1]
    return " ".join(f"![{track}: test top-1 vs {label}]({plot_path(key, kind)})" for kind, label in KINDS.items())


def track_figures(key: tuple[str, str], tables: dict) -> dict[str, bytes]:
    """The two PNGs of one track, by path: every method's test top-1 (95 % interval) at each student size,
    against the student's batch-1 latency and against its parameters; nothing where no table has points."""
    rows, teachers = [], {}
    for (teacher, student), table in tables.items():
        if table.cost is None:
            continue
        teachers[teacher] = table.teacher
        for p in table.points:
            rows.append(p | {"student": student, "params": table.cost["params"], "latency": table.cost.get("latency")})
    if not rows:
        return {}
    points = pd.DataFrame(rows)
    return {plot_path(key, kind): _draw(key, kind, points, teachers) for kind in KINDS
            if points[kind].notna().all()}


def _draw(key: tuple[str, str], kind: str, points: pd.DataFrame, teachers: dict) -> bytes:
    suite, track = key
    with matplotlib.style.context(["default", STYLE]):
        fig = Figure(figsize=(7.5, 4.5), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)  # Agg only: no GUI backend, no pyplot
        ax = fig.add_subplot()
        xs = [*points[kind], *(t[kind] for t in teachers.values() if t and t.get(kind))]
        log = max(xs) > LOG_SPREAD * min(xs)
        ax.set_xscale("log" if log else "linear")
        methods = list(dict.fromkeys(points["method"]))  # the table's order: the baseline first
        span = np.log(max(xs) / min(xs)) if log else max(xs) - min(xs) or 1.0
        for i, method in enumerate(methods):
            p = points[points["method"] == method].sort_values(kind)
            offset = DODGE * span * (i - (len(methods) - 1) / 2)
            x = p[kind] * np.exp(offset) if log else p[kind] + offset
            base = method == "baseline"
            ax.errorbar(x, p["acc"], yerr=[p["acc"] - p["low"], p["high"] - p["acc"]], capsize=2,
                        marker="s" if base else MARKERS[i % len(MARKERS)], markersize=6 if base else 4,
                        linewidth=1.5 if base else 0.8, color="black" if base else f"C{i % 10}",
                        label=f"{method} (reference)" if base else method)
        for name, t in teachers.items():
            if t and t.get(kind):
                ax.plot(t[kind], t["acc"], linestyle="none", marker="*", markersize=12, color="goldenrod",
                        markeredgecolor="black", label=f"teacher ({name})")
        ax.set_xlabel({"latency": "student batch-1 latency (ms, timed once per architecture)",
                       "params": "student parameters (deployed model)"}[kind] + ("; log scale" if log else ""))
        ax.set_ylabel("test top-1 (%, with 95 % interval)")
        ax.set_title(f"{track} (suite {suite}): test top-1 vs {KINDS[kind]}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, frameon=False)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()
