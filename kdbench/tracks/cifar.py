"""CIFAR-10 and CIFAR-100 from the standard python-version folders, with the CRD (RepDistiller) augmentation.

Layout under ``--data-root`` (what https://www.cs.toronto.edu/~kriz/cifar.html ships and torchvision
unpacks): ``cifar-100-python/{train,test}`` and ``cifar-10-batches-py/{data_batch_1..5,test_batch}``.
The pickles are read with an unpickler that admits only numpy arrays, so a tampered file cannot run code;
unlike torchvision's classes there is no checksum check, so data a user prepared in the same format loads.

Splits: the official 10,000 test images are the test split; a fixed stratified 5,000 images of the official
training set are the validation split (RepDistiller has none: it reports on test and trains on all 50,000 —
a deviation, stated in the leaderboard protocol), the other 45,000 train.

Augmentation (RepDistiller ``dataset/cifar100.py``): ``RandomCrop(32, padding=4)`` with zero fill,
``RandomHorizontalFlip``, then per-channel normalisation. Here it runs on uint8 tensors, batched, drawn from
the trainer's seeded generator, so a run is reproducible and resumable.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from kdbench.errors import KdbenchError
from kdbench.tracks import VAL_SEED, Split, TrackData, missing_data, register_track, require_data_root

VAL_SIZE = 5000
PAD = 4
# Per-channel mean / std of the training images: CIFAR-100 as in RepDistiller dataset/cifar100.py; CIFAR-10
# computed the same way (the commonly used 0.4914, 0.4822, 0.4465 / 0.2470, 0.2435, 0.2616).
STATS = {
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
FOLDERS = {
    "cifar100": ("cifar-100-python", ("train",), ("test",), b"fine_labels", 100),
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), b"labels", 10),
}
SOURCE = "https://www.cs.toronto.edu/~kriz/cifar.html"


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays; refuses any other global (no code runs)."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
        (f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        return super().find_class(module, name)


def _read_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray, str]:
    blob = path.read_bytes()
    try:
        batch = _ArraysOnly(io.BytesIO(blob), encoding="bytes").load()
        x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(batch[label_key], dtype=np.int64)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line refusal
        raise KdbenchError(f"{path} is not a CIFAR python-version batch ({type(exc).__name__}: {exc}); "
                           f"re-download it from {SOURCE}") from None
    if len(x) != len(y):
        raise KdbenchError(f"{path}: {len(x)} images but {len(y)} labels; re-download it from {SOURCE}")
    return x, y, hashlib.sha256(blob).hexdigest()


def _read(folder: Path, names: tuple[str, ...], label_key: bytes) -> tuple[np.ndarray, np.ndarray, dict]:
    parts = [_read_batch(folder / name, label_key) for name in names]
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            {name: p[2] for name, p in zip(names, parts)})


def pad_crop_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 32×32 crop of the zero-padded (by ``PAD``) images and a horizontal flip with probability ½."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (PAD, PAD, PAD, PAD))
    top = torch.randint(0, 2 * PAD + 1, (b,), generator=generator)
    left = torch.randint(0, 2 * PAD + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    cols = torch.arange(w)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + left[:, None]  # (b, w)
    rows = torch.arange(h) + top[:, None]  # (b, h)
    return padded[torch.arange(b)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def normalizer(track: str):
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in STATS[track])

    def normalize(x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255 - mean) / std

    return normalize


def load_cifar(track: str, data_root: Path | None, download: bool) -> TrackData:
    folder_name, train_files, test_files, label_key, num_classes = FOLDERS[track]
    root = require_data_root(track, data_root, f"{folder_name}/ inside it ({SOURCE}, python version)")
    folder = root / folder_name
    missing = [name for name in train_files + test_files if not (folder / name).is_file()]
    if missing and download:
        from torchvision import datasets

        getattr(datasets, track.upper())(str(root), download=True)
        missing = [name for name in train_files + test_files if not (folder / name).is_file()]
    if missing:
        raise missing_data(folder / missing[0], f"{track} file {missing[0]}",
                           f"add --download, or unpack the python version from {SOURCE} into {root}")
    x, y, train_sha = _read(folder, train_files, label_key)
    x_test, y_test, test_sha = _read(folder, test_files, label_key)
    if y.max() >= num_classes or y_test.max() >= num_classes:
        raise KdbenchError(f"{folder}: labels exceed {num_classes - 1}; is this the {track} folder?")
    val_size = min(VAL_SIZE, len(y) // 10)
    stratify = y if val_size >= len(np.unique(y)) else None  # tiny hand-made data: a plain seeded split
    x_tr, x_val, y_tr, y_val = train_test_split(x, y, test_size=val_size, stratify=stratify, random_state=VAL_SEED)
    norm = normalizer(track)

    def split(xs, ys, augment=None):
        return Split(torch.from_numpy(xs), torch.from_numpy(ys), transform=norm, augment=augment)

    description = {
        "source": f"{folder_name} (python version)",
        "sha256": {**train_sha, **test_sha},
        "sizes": {"train": len(y_tr), "val": len(y_val), "test": len(y_test)},
        "val_seed": VAL_SEED,
        "augment": f"random crop 32 with zero padding {PAD}, horizontal flip p=0.5",
        "normalize": STATS[track],
    }
    return TrackData(split(x_tr, y_tr, pad_crop_flip), split(x_val, y_val), split(x_test, y_test), num_classes,
                     (3, 32, 32), description)


@register_track("cifar100", tier="gpu", summary="CIFAR-100, python version under --data-root; 45000/5000/10000")
def load_cifar100(data_root: Path | None = None, download: bool = False) -> TrackData:
    return load_cifar("cifar100", data_root, download)


@register_track("cifar10", tier="gpu", summary="CIFAR-10, python version under --data-root; 45000/5000/10000")
def load_cifar10(data_root: Path | None = None, download: bool = False) -> TrackData:
    return load_cifar("cifar10", data_root, download)
