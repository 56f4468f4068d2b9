"""Choose a track's schedule and a method's hyperparameters on the validation split.

Runs the grid below through the normal pipeline (records go to a scratch folder, never results/)
and prints validation top-1 only, mean over tuning seeds disjoint from the reported ones.

    python benchmarks/validation_sweep.py --suite cpu --track mnist1d
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from tabulate import tabulate

from kdbench.runner import run_one
from kdbench.suite import expand, load_suite

TUNING_SEEDS = (100, 101)
GRID = {
    "baseline": {"epochs": [30, 60]},
    "vanilla_kd": {"epochs": [30], "temperature": [1.0, 2.0, 4.0], "weights": [(0.1, 0.9), (0.5, 0.5)]},
}


def _variants(method: str):
    grid = GRID[method]
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, values))
        epochs = point.pop("epochs")
        if "weights" in point:
            point["ce_weight"], point["kd_weight"] = point.pop("weights")
        yield epochs, point


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="cpu")
    parser.add_argument("--track", default="mnist1d")
    args = parser.parse_args()
    suite = load_suite(args.suite)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for method in GRID:
            (base,) = expand(suite, methods=[method], tracks=[args.track], seeds=(0,))
            for epochs, overrides in _variants(method):
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
