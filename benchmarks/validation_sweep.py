"""Choose a track's schedule and a method's hyperparameters on the validation split.

Runs the grid below through the normal pipeline (records go to a scratch folder, never results/)
and prints validation top-1 only, mean over tuning seeds disjoint from the reported ones.

    python benchmarks/validation_sweep.py --suite cpu --track mnist1d
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from tabulate import tabulate

from kdbench.runner import run_one
from kdbench.suite import expand, load_suite

TUNING_SEEDS = (100, 101)
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
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="cpu")
    parser.add_argument("--track", default="mnist1d")
    parser.add_argument("--method", action="append", choices=list(GRID), help="only these methods (default: all)")
    args = parser.parse_args()
    suite = load_suite(args.suite)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch}/mlflow.db"  # keep sweeps out of the real store
        for method in args.method or GRID:
            (base,) = expand(suite, methods=[method], tracks=[args.track], seeds=(0,))
            for variant in GRID[method]:
                overrides = {k: v for k, v in variant.items() if k != "epochs"}
                epochs = variant.get("epochs", base.train.epochs)
                config = {**base.method_config, **overrides}
                vals = []
                for seed in TUNING_SEEDS:
                    spec = replace(base, seed=seed, method_config=config,
                                   train=base.train.model_copy(update={"epochs": epochs}))
                    vals.append(run_one(spec, Path(scratch))["metrics"]["val_top1"])
                rows.append((method, epochs, overrides, f"{statistics.mean(vals):.2f}", ", ".join(f"{v:.2f}" for v in vals)))
                print(rows[-1], flush=True)
    print(tabulate(rows, headers=["method", "epochs", "overrides", "val top-1 mean", f"per seed {TUNING_SEEDS}"],
                   tablefmt="github"))


if __name__ == "__main__":
    main()
