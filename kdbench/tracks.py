"""Datasets per track, as in-memory tensors with fixed train / validation / test splits.

Test data is touched only for the final number; any choice is made on the validation split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from kdbench.registry import Registry

VAL_SEED = 0  # the validation split is fixed for every run of a track


@dataclass(frozen=True)
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class TrackData:
    train: Split
    val: Split
    test: Split
    num_classes: int
    in_shape: tuple[int, ...]
    description: dict = field(default_factory=dict)  # what defines the data; part of the run's config


@dataclass(frozen=True)
class Track:
    name: str
    tier: str
    summary: str
    load: Callable[[Path | None], TrackData]


TRACKS: Registry[Track] = Registry("track")


def register_track(name: str, tier: str, summary: str):
    def add(load):
        TRACKS.register(name)(Track(name, tier, summary, load))
        return load

    return add


def load_track(name: str, data_root: Path | None = None) -> TrackData:
    return TRACKS.get(name).load(data_root)


def carve_validation(x: np.ndarray, y: np.ndarray, fraction: float) -> tuple[Split, Split]:
    """A stratified, fixed (seeded) validation split carved from the training data."""
    x_tr, x_val, y_tr, y_val = train_test_split(x, y, test_size=fraction, stratify=y, random_state=VAL_SEED)
    return _split(x_tr, y_tr), _split(x_val, y_val)


def _split(x: np.ndarray, y: np.ndarray) -> Split:
    return Split(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long))


MNIST1D_VAL_FRACTION = 0.1


@register_track("mnist1d", tier="cpu", summary="MNIST-1D (Greydanus & Kobak 2024), generated offline: 3600/400/1000")
def load_mnist1d(data_root: Path | None = None) -> TrackData:
    """MNIST-1D from ``mnist1d.data.make_dataset`` with its default arguments (4000 train, 1000 test,
    seed 42). ``get_dataset`` is never called: it tries the network first."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    data = make_dataset(args)
    train, val = carve_validation(data["x"][:, None, :], data["y"], MNIST1D_VAL_FRACTION)
    test = _split(data["x_test"][:, None, :], data["y_test"])
    description = {
        "source": "mnist1d.data.make_dataset(get_dataset_args())",
        "seed": args.seed,
        "num_samples": args.num_samples,
        "val_fraction": MNIST1D_VAL_FRACTION,
        "val_seed": VAL_SEED,
    }
    return TrackData(train, val, test, num_classes=10, in_shape=tuple(train.x.shape[1:]), description=description)


DIGITS_TEST_FRACTION = 0.2
DIGITS_VAL_FRACTION = 0.2


@register_track("digits", tier="cpu", summary="scikit-learn's bundled 8×8 digits, stratified 1077/360/360, no download")
def load_digits(data_root: Path | None = None) -> TrackData:
    """scikit-learn's digits (1797 images, 8×8, values 0–16, scaled to [0, 1]), with fixed stratified
    train / validation / test splits (60 / 20 / 20 %)."""
    from sklearn.datasets import load_digits as sklearn_digits

    x, y = sklearn_digits(return_X_y=True)
    x = (x / 16.0).reshape(-1, 1, 8, 8)
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=DIGITS_TEST_FRACTION, stratify=y,
                                                      random_state=VAL_SEED)
    train, val = carve_validation(x_rest, y_rest, DIGITS_VAL_FRACTION / (1 - DIGITS_TEST_FRACTION))
    description = {"source": "sklearn.datasets.load_digits", "scale": "x / 16", "test_fraction": DIGITS_TEST_FRACTION,
                   "val_fraction": DIGITS_VAL_FRACTION, "split_seed": VAL_SEED}
    return TrackData(train, val, _split(x_test, y_test), num_classes=10, in_shape=(1, 8, 8), description=description)
