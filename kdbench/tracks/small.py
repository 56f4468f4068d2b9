"""The CPU tier's tracks: data made offline (MNIST-1D generated, scikit-learn's bundled digits).

Both are sized for statistical power (benchmarks/README.md has the power analysis): MNIST-1D is generated
with 10,000 test samples; digits, which has only 1,797 images, is cross-validated so that every image is
tested (repeated stratified 5-fold, a fold per seed).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold, train_test_split

from kdbench.tracks import (
    VAL_SEED,
    Split,
    TrackData,
    carve_validation,
    float_split,
    register_track,
)

MNIST1D_TRAIN, MNIST1D_VAL, MNIST1D_TEST = 10_000, 2_000, 10_000
# MNIST-1D's generator translates each padded signal circularly by up to 48 of its 72 positions and scales
# its amplitude by 1 ± 0.2 (mnist1d.data.get_dataset_args: max_translation 48, scale_coeff 0.4); the same two
# transforms, redrawn for every training batch on the final 40-sample signals, are the track's augmentation
MNIST1D_MAX_SHIFT = 48 * 40 // 72
MNIST1D_SCALE = 0.4


def augment_mnist1d(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each signal of a [B, 1, L] batch rolled by a random 0…``MNIST1D_MAX_SHIFT`` positions and scaled by
    1 + ``MNIST1D_SCALE`` · (u − ½), u uniform; drawn from the run's generator (batched tensor ops)."""
    n, _, length = x.shape
    shift = torch.randint(0, MNIST1D_MAX_SHIFT + 1, (n, 1, 1), generator=generator)
    scale = 1 + MNIST1D_SCALE * (torch.rand(n, 1, 1, generator=generator) - 0.5)
    index = (torch.arange(length).view(1, 1, length) - shift) % length
    return torch.gather(x, 2, index) * scale


@register_track("mnist1d", tier="cpu", summary="MNIST-1D (Greydanus & Kobak 2024), generated offline: "
                f"{MNIST1D_TRAIN}/{MNIST1D_VAL}/{MNIST1D_TEST}, translate+scale augmentation")
def load_mnist1d(data_root: Path | None = None, download: bool = False) -> TrackData:
    """MNIST-1D from ``mnist1d.data.make_dataset`` with its default arguments (seed 42) but more samples:
    12,000 for training (2,000 of them held out, stratified, for validation) and 10,000 for test. ``get_dataset``
    is never called: it tries the network first."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = MNIST1D_TRAIN + MNIST1D_VAL + MNIST1D_TEST
    args.train_split = (MNIST1D_TRAIN + MNIST1D_VAL) / args.num_samples
    data = make_dataset(args)
    train, val = carve_validation(data["x"][:, None, :], data["y"], MNIST1D_VAL / (MNIST1D_TRAIN + MNIST1D_VAL))
    test = float_split(data["x_test"][:, None, :], data["y_test"])
    description = {
        "source": "mnist1d.data.make_dataset(get_dataset_args()), num_samples and train_split changed",
        "seed": args.seed,
        "num_samples": args.num_samples,
        "train_split": args.train_split,
        "sizes": {"train": len(train), "val": len(val), "test": len(test)},
        "val_seed": VAL_SEED,
        "augment": f"circular shift 0..{MNIST1D_MAX_SHIFT}, amplitude scale 1 ± {MNIST1D_SCALE / 2}",
    }
    return TrackData(replace(train, augment=augment_mnist1d), val, test, num_classes=10,
                     in_shape=tuple(train.x.shape[1:]), description=description)


DIGITS_FOLDS = 5
DIGITS_VAL_FRACTION = 0.2  # of all images, carved from each fold's training part: 60 / 20 / 20 % as before


@register_track("digits", tier="cpu", summary="scikit-learn's bundled 8×8 digits (1797), repeated stratified "
                "5-fold: seed s tests fold s % 5 of repetition s // 5")
def load_digits(data_root: Path | None = None, download: bool = False) -> TrackData:
    """scikit-learn's digits (1797 images, 8×8, values 0–16, scaled to [0, 1]), cross-validated: a run with seed
    ``s`` is tested on fold ``s % 5`` of repetition ``s // 5`` (``StratifiedKFold(5, shuffle=True,
    random_state=s // 5)``) and trains on the other four, less a stratified validation split of 20 % of all
    images. Five consecutive seeds test every image once. The splits returned here are seed 0's."""
    from sklearn.datasets import load_digits as sklearn_digits

    x, y = sklearn_digits(return_X_y=True)
    x = (x / 16.0).reshape(-1, 1, 8, 8)
    description = {"source": "sklearn.datasets.load_digits", "scale": "x / 16",
                   "cv": f"StratifiedKFold({DIGITS_FOLDS}, shuffle=True, random_state=seed // {DIGITS_FOLDS}), "
                         f"fold seed % {DIGITS_FOLDS}", "val_fraction": DIGITS_VAL_FRACTION, "split_seed": VAL_SEED}

    def by_seed(seed: int) -> TrackData:
        repetition, fold = divmod(seed, DIGITS_FOLDS)
        folds = StratifiedKFold(DIGITS_FOLDS, shuffle=True, random_state=repetition).split(x, y)
        rest, test = list(folds)[fold]
        val_share = DIGITS_VAL_FRACTION / (1 - 1 / DIGITS_FOLDS)
        train_ids, val_ids = train_test_split(rest, test_size=val_share, stratify=y[rest], random_state=VAL_SEED)
        splits = [_digits_split(x, y, ids) for ids in (train_ids, val_ids, test)]
        return TrackData(*splits, num_classes=10, in_shape=(1, 8, 8),
                         description={**description, "repetition": repetition, "fold": fold})

    return replace(by_seed(0), description=description, by_seed=by_seed)


def _digits_split(x: np.ndarray, y: np.ndarray, ids: np.ndarray) -> Split:
    return replace(float_split(x[ids], y[ids]), ids=torch.as_tensor(ids, dtype=torch.long))
