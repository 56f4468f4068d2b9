"""What equal-budget tuning changed, per tuned table: each row's test top-1 and Δ against the baseline with the
suite's settings (the records at git revision BEFORE) and with every row tuned (the records in results/), and each
row tuned − untuned.

Every Δ is the leaderboard's: runs paired by seed, two-way bootstrap over seeds and test samples, 95 % interval;
↑ / ↓ mark a Δ significant after Holm's correction over the column's rows of the table.

    python benchmarks/tuning_effect.py --before REV [--results-dir results] [--suite cpu]

REV is a commit whose results/ holds the untuned records (the last one before the tuned re-run of those tables).
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from kdbench.predictions import outcomes
from kdbench.records import load_records
from kdbench.stats import Difference, compare, holm


def finished(folder: Path) -> list[dict]:
    return [rec.model_dump() for _, rec in load_records(folder) if rec.status == "finished"]


def tuned_tables(results: Path, suite: str) -> list[Path]:
    """The table folders (``<suite>/<track>/<pair>``) whose records were all made with tuned settings."""
    tables = sorted({p.parent.parent for p in (results / suite).glob("*/*/*/seed*.json")})
    return [t for t in tables if all(r["config"].get("tuning") for r in finished(t))]


def checkout_records(rev: str, folders: list[str], into: Path) -> None:
    """The records of ``folders`` (paths relative to the repository) as they were at ``rev``."""
    try:
        archive = subprocess.run(["git", "archive", rev, *folders], capture_output=True, check=True).stdout
    except subprocess.CalledProcessError as exc:
        sys.exit(f"--before {rev}: git archive failed ({exc.stderr.decode().strip()}); name a commit of this "
                 "repository whose results/ holds the untuned records")
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(into, filter="data")


def cell(d: Difference, significant: bool) -> str:
    mark = (" ↑" if d.delta > 0 else " ↓") if significant else ""
    return f"{d.delta:+.2f} [{d.low:+.2f}, {d.high:+.2f}]{mark}"


def table(before: Path, after: Path) -> str:
    rows = sorted(p.name for p in after.iterdir() if p.is_dir())
    if "baseline" not in rows:
        return "(no baseline row)"
    old = {m: finished(before / m) for m in rows}
    new = {m: finished(after / m) for m in rows}
    missing = [m for m in rows if not old[m]]
    if missing:
        return f"(no untuned records at --before for {', '.join(missing)})"
    methods = [m for m in rows if m != "baseline"]
    old_out, new_out = ({m: outcomes(recs[m]) for m in rows} for recs in (old, new))

    def against(runs: dict, names: list[str], reference: dict) -> tuple[dict, dict]:
        diffs = {m: compare(runs[m], reference[m]) for m in names}
        return diffs, dict(zip(names, holm([d.p_value for d in diffs.values()])))

    untuned, untuned_sig = against(old_out, methods, dict.fromkeys(methods, old_out["baseline"]))
    tuned, tuned_sig = against(new_out, methods, dict.fromkeys(methods, new_out["baseline"]))
    gain, gain_sig = against(new_out, rows, old_out)
    top1 = {m: (statistics.fmean(r["metrics"]["test_top1"] for r in old[m]),
                statistics.fmean(r["metrics"]["test_top1"] for r in new[m])) for m in rows}
    lines = ["| method | test top-1 untuned → tuned | Δ vs baseline, suite settings | Δ vs baseline, tuned "
             "| tuned − untuned |", "|---|---|---|---|---|"]
    for m in ["baseline", *sorted(methods, key=lambda m: -tuned[m].delta)]:
        before_cell = "—" if m == "baseline" else cell(untuned[m], untuned_sig[m])
        after_cell = "—" if m == "baseline" else cell(tuned[m], tuned_sig[m])
        lines.append(f"| {m} | {top1[m][0]:.2f} → {top1[m][1]:.2f} | {before_cell} | {after_cell} | "
                     f"{cell(gain[m], gain_sig[m])} |")
    better = lambda diffs, sig: sum(sig[m] and diffs[m].delta > 0 for m in methods)
    worse = lambda diffs, sig: sum(sig[m] and diffs[m].delta < 0 for m in methods)
    lines.append(f"\nSignificantly better / worse than the baseline: {better(untuned, untuned_sig)} / "
                 f"{worse(untuned, untuned_sig)} of {len(methods)} with the suite's settings, "
                 f"{better(tuned, tuned_sig)} / {worse(tuned, tuned_sig)} tuned. The baseline's own tuning gain: "
                 f"{gain['baseline'].delta:+.2f}; the methods' median: "
                 f"{statistics.median(gain[m].delta for m in methods):+.2f}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="commit whose results/ holds the untuned records")
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--suite", default="cpu")
    args = parser.parse_args()
    results = Path(args.results_dir)
    tables = tuned_tables(results, args.suite)
    if not tables:
        sys.exit(f"no table under {results / args.suite} is tuned yet: run kdbench tune, then kdbench run")
    with tempfile.TemporaryDirectory() as tmp:
        checkout_records(args.before, [str(Path("results") / t.relative_to(results)) for t in tables], Path(tmp))
        for t in tables:
            track, pair = t.relative_to(results / args.suite).parts
            print(f"### {track}: {pair.replace('--', ' → ')}\n")
            print(table(Path(tmp) / "results" / t.relative_to(results), t), end="\n\n")


if __name__ == "__main__":
    main()
