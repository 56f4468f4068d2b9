"""The power of each leaderboard table, from the committed records: how wide its intervals are and why.

For every table (track × pair) and every method's Δ against the baseline, the 95 % half-width of the
leaderboard's two-way bootstrap, and of the same bootstrap resampling only the seeds (training noise) or only
the test samples (test-set noise), so a reader sees which source dominates and what more seeds or more test
samples would buy. Then the table's minimum detectable effect (power 0.8, α = 0.05) and the number of seeds
that would bring its median interval to ±0.5 point if the seed component shrinks as 1/√seeds (and the
test-sample component stays).

    python benchmarks/power_analysis.py [--results-dir results] [--suite cpu]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from tabulate import tabulate

from kdbench.predictions import outcomes, split_outcome
from kdbench.records import load_records
from kdbench.stats import MAX_HALF_WIDTH, Resampler, minimum_detectable_effect


def _half_widths(resampler: Resampler, a, b) -> tuple[float, float, float, float]:
    both = resampler.difference(a, b)
    seeds_only, samples_only = _only(resampler, "sample_weights"), _only(resampler, "seed_weights")
    return (both.half_width, seeds_only.difference(a, b).half_width, samples_only.difference(a, b).half_width,
            both.se)


def _only(resampler: Resampler, fixed: str) -> Resampler:
    """The same replicates with one level not resampled (its weights all 1)."""
    copy = object.__new__(Resampler)
    copy.__dict__.update(resampler.__dict__)
    setattr(copy, fixed, np.ones_like(getattr(resampler, fixed)))
    return copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--suite", default="cpu")
    args = parser.parse_args()
    tables: dict[tuple, dict[str, list[dict]]] = {}
    for _, rec in load_records(Path(args.results_dir)):
        if rec.suite == args.suite and rec.status == "finished" and rec.predictions:
            key = (rec.track, rec.teacher, rec.student)
            tables.setdefault(key, {}).setdefault(rec.method, []).append(rec.model_dump())
    rows = []
    for (track, teacher, student), methods in sorted(tables.items()):
        ids = np.unique(np.concatenate([split_outcome(r["predictions"]["test"])[0] for recs in methods.values()
                                        for r in recs]))
        seeds = sorted({r["seed"] for recs in methods.values() for r in recs})
        resampler = Resampler(seeds, ids)
        base = outcomes(methods["baseline"])
        widths = {m: _half_widths(resampler, outcomes(recs), base) for m, recs in methods.items() if m != "baseline"}
        widest = max(w[0] for w in widths.values())
        median = float(np.median([w[0] for w in widths.values()]))
        seed_part = float(np.median([w[1] for w in widths.values()]))
        sample_part = float(np.median([w[2] for w in widths.values()]))
        mde = minimum_detectable_effect(float(np.median([w[3] for w in widths.values()])))
        # seeds needed for ±0.5 if the seed component shrinks as 1/√seeds and the sample component stays
        room = MAX_HALF_WIDTH**2 - sample_part**2
        needed = math.ceil(len(seeds) * seed_part**2 / room) if room > 0 else "—"
        rows.append((track, f"{teacher}→{student}", len(seeds), f"{len(ids):,}", f"±{median:.2f}", f"±{widest:.2f}",
                     f"±{seed_part:.2f}", f"±{sample_part:.2f}", f"{mde:.2f}", needed))
    print(tabulate(rows, headers=["track", "pair", "seeds", "test samples", "median 95 % half-width", "widest",
                                  "median, seeds only", "median, test samples only", "MDE (power 0.8)",
                                  "seeds for a median ±0.5"],
                   tablefmt="github", disable_numparse=True))


if __name__ == "__main__":
    main()
