"""Choose a track's schedule and a method's hyperparameters on the validation split.

Runs the grid below through the normal pipeline (records go to a scratch folder, never results/, with a
scratch MLflow store) on the track's middle student, and prints validation top-1 only: the mean over tuning
seeds disjoint from the reported ones, and each variant's Δ against the baseline with its 95 % interval from
the per-sample validation predictions (kdbench.stats, the leaderboard's paired bootstrap).

    python benchmarks/validation_sweep.py --suite cpu --track mnist1d --workers 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from tabulate import tabulate

from kdbench.executor import execute
from kdbench.predictions import outcomes
from kdbench.runner import Placement
from kdbench.stats import compare
from kdbench.suite import expand, load_suite

# tuning seeds per track, disjoint from the reported ones; on digits, 100–104 are the five folds of repetition 20
TUNING_SEEDS = {"mnist1d": (100, 101), "digits": (100, 101, 102, 103, 104)}
# Per method: the variants tried, each a dict of hyperparameter overrides ("epochs" sets the student schedule).
GRID = {
    "baseline": [{"epochs": 30}, {"epochs": 60}],
    "vanilla_kd": [
        {"temperature": t, "ce_weight": ce, "kd_weight": kd} for t in (1.0, 2.0, 4.0) for ce, kd in ((0.1, 0.9), (0.5, 0.5))
    ],
    "fitnets": [{"hint_weight": w} for w in (1.0, 10.0, 100.0)],
    "attention_transfer": [{"beta": b} for b in (1.0, 10.0, 100.0, 1000.0)],
    "adversarial": [{"adv_weight": w} for w in (0.1, 1.0)],
    "self_distillation": [{"alpha": a} for a in (0.1, 0.3)],
    # the methods of issue 16: each from its reference default down by decades of its distillation weight
    "vanilla_kd+ls": [{"temperature": t} for t in (1.0, 2.0, 4.0)],
    "dkd": [{"beta": b} for b in (1.0, 2.0, 8.0)],
    "dkd+ls": [{"alpha": a, "beta": 8.0 * a} for a in (1.0, 9.0)],
    "dist": [{"beta": w, "gamma": w} for w in (1.0, 2.0)],
    "sp": [{"beta": b} for b in (30.0, 300.0, 3000.0)],
    "pkt": [{"beta": b} for b in (300.0, 3000.0, 30000.0)],
    "rkd": [{"distance_weight": 25.0 * s, "angle_weight": 50.0 * s} for s in (0.1, 1.0)],
    "crd": [{"nce_k": k, "crd_weight": w} for k in (1024, 4096) for w in (0.8,)] + [{"nce_k": 1024, "crd_weight": 0.2}],
    "review_kd": [{"review_weight": w} for w in (0.6, 1.0, 5.0)],
    "nst": [{"beta": b} for b in (0.5, 5.0, 50.0)],
    "vid": [{"beta": b} for b in (0.1, 1.0)],
    # the methods of issue 17: the paper's mutual weight and half of it; KD's temperatures (TAKD's assistant is
    # re-trained for each); the ensemble's temperature and weighting
    "dml": [{"kl_weight": w} for w in (0.5, 1.0)],
    "takd": [{"temperature": t} for t in (2.0, 4.0)],
    "multi_teacher": [{"temperature": t, "weighting": w} for t in (2.0, 4.0) for w in ("equal", "confidence")],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="cpu")
    parser.add_argument("--track", default="mnist1d", choices=list(TUNING_SEEDS))
    parser.add_argument("--pair", help="teacher:student (default: the track's middle pair)")
    parser.add_argument("--method", action="append", choices=list(GRID), help="only these methods (default: all)")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    suite = load_suite(args.suite)
    pairs = suite.tracks[args.track].pairs
    pair = args.pair or f"{pairs[len(pairs) // 2].teacher}:{pairs[len(pairs) // 2].student}"
    seeds = TUNING_SEEDS[args.track]
    variants, specs = [], []
    for method in ["baseline", *[m for m in args.method or GRID if m != "baseline"]]:
        (base,) = expand(suite, methods=[method], tracks=[args.track], pairs=[pair], seeds=(seeds[0],))
        for variant in GRID[method] if method != "baseline" or not args.method else GRID[method][:1]:
            overrides = {k: v for k, v in variant.items() if k != "epochs"}
            train = base.train.model_copy(update={"epochs": variant.get("epochs", base.train.epochs)})
            runs = [replace(base, seed=s, method_config={**base.method_config, **overrides}, train=train)
                    for s in seeds]
            variants.append((method, train.epochs, overrides, runs))
            specs += runs
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch}/mlflow.db"  # keep sweeps out of the real store
        done = {}
        for spec, record in execute(specs, Path(scratch) / "results", Placement(), args.workers):
            done[id(spec)] = record
            print(f"[{len(done)}/{len(specs)}] {spec.label()} {spec.method_config}: val top-1 "
                  f"{record['metrics']['val_top1']:.2f}", flush=True)
    records = [[done[id(s)] for s in runs] for *_, runs in variants]
    reference = outcomes(records[0], "val")  # the baseline at the suite's schedule
    rows = []
    for (method, epochs, overrides, _), recs in zip(variants, records):
        vals = [r["metrics"]["val_top1"] for r in recs]
        diff = compare(outcomes(recs, "val"), reference)
        rows.append((method, epochs, overrides or "–", f"{statistics.mean(vals):.2f}",
                     f"{diff.delta:+.2f} [{diff.low:+.2f}, {diff.high:+.2f}]", ", ".join(f"{v:.2f}" for v in vals)))
    print(f"{args.track} {pair}, validation top-1 %, tuning seeds {seeds}")
    print(tabulate(rows, headers=["method", "epochs", "overrides", "val top-1 mean", "Δ vs baseline [95 % CI]",
                                  "per seed"], tablefmt="github", disable_numparse=True))


if __name__ == "__main__":
    main()
