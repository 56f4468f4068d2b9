"""The CPU tier's tracks: data made offline (MNIST-1D generated, scikit-learn's bundled digits)."""

from __future__ import annotations

from pathlib import Path

from sklearn.model_selection import train_test_split

from kdbench.tracks import (
    VAL_SEED,
    TrackData,
    carve_validation,
    float_split,
    register_track,
)

MNIST1D_VAL_FRACTION = 0.1


@register_track("mnist1d", tier="cpu", summary="MNIST-1D (Greydanus & Kobak 2024), generated offline: 3600/400/1000")
def load_mnist1d(data_root: Path | None = None, download: bool = False) -> TrackData:
    """MNIST-1D from ``mnist1d.data.make_dataset`` with its default arguments (4000 train, 1000 test,
    seed 42). ``get_dataset`` is never called: it tries the network first."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    data = make_dataset(args)
    train, val = carve_validation(data["x"][:, None, :], data["y"], MNIST1D_VAL_FRACTION)
    test = float_split(data["x_test"][:, None, :], data["y_test"])
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
def load_digits(data_root: Path | None = None, download: bool = False) -> TrackData:
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
    return TrackData(train, val, float_split(x_test, y_test), num_classes=10, in_shape=(1, 8, 8), description=description)
