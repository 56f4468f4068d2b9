"""Datasets per track, with fixed train / validation / test splits.

Test data is touched only for the final number; any choice is made on the validation split.
A split hands out batches: ``split.batches(batch_size, generator, train=True)`` shuffles with the
generator and applies the track's random augmentation (seeded by the same generator);
without a generator it yields the samples in order, untouched by augmentation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from kdbench.errors import KdbenchError
from kdbench.registry import Registry

VAL_SEED = 0  # the validation split (and any subset of a split) is fixed for every run of a track
EVAL_BATCH = 1000

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class Split:
    """Samples held as tensors in memory (no DataLoader workers): ``x`` raw, ``transform`` applied per batch."""

    x: torch.Tensor
    y: torch.Tensor
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    augment: Augment | None = None  # random, training batches only; runs before ``transform``
    eval_batch: int = EVAL_BATCH
    ids: torch.Tensor | None = None  # each sample's index in the track's data (None: its position in this split)

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int, generator: torch.Generator | None = None, train: bool = False
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled full batches with a generator (the last partial one dropped); all samples in order without."""
        for _, x, y in self.indexed_batches(batch_size, generator, train):
            yield x, y

    def indexed_batches(self, batch_size: int, generator: torch.Generator | None = None, train: bool = False
                        ) -> Iterator[tuple[torch.Tensor | slice, torch.Tensor, torch.Tensor]]:
        """As ``batches``, each batch with the indices of its samples (to read cached teacher outputs)."""
        if generator is None:
            chunks = (slice(i, i + batch_size) for i in range(0, len(self), batch_size))
        else:
            perm = torch.randperm(len(self), generator=generator)
            chunks = (perm[i * batch_size : (i + 1) * batch_size] for i in range(len(self) // batch_size))
        for idx in chunks:
            x = self.x[idx]
            if train and self.augment is not None:
                x = self.augment(x, generator)
            yield idx, (self.transform(x) if self.transform else x), self.y[idx]

    def sample(self, n: int) -> torch.Tensor:
        """The first ``n`` inputs, transformed as for evaluation (shape probes, FLOPs, latency)."""
        x = self.x[:n]
        return self.transform(x) if self.transform else x

    def subset(self, indices: torch.Tensor) -> Split:
        return replace(self, x=self.x[indices], y=self.y[indices], ids=sample_ids(self)[indices])


def sample_ids(split) -> torch.Tensor:
    """Each sample's index in the track's data (its position in the split where the split keeps none): what
    pairs two runs' predictions sample by sample."""
    ids = getattr(split, "ids", None)
    return ids if ids is not None else torch.arange(len(split))


@dataclass(frozen=True)
class TrackData:
    train: Split
    val: Split
    test: Split
    num_classes: int
    in_shape: tuple[int, ...]
    description: dict = field(default_factory=dict)  # what defines the data; part of the run's config
    # cross-validated tracks: the splits of a run with this seed (its fold), else None: every seed shares these
    by_seed: Callable[[int], TrackData] | None = None

    def for_seed(self, seed: int) -> TrackData:
        """The splits a run with ``seed`` trains and is tested on (its fold on a cross-validated track); the
        description then names the fold, so each fold's teacher is trained and cached apart."""
        if self.by_seed is None:
            return self
        fold = self.by_seed(seed)
        limit = self.description.get("limit")
        return fold.limited(limit) if limit else fold

    def limited(self, limit: dict[str, int] | None) -> TrackData:
        """A fixed subset (seeded, ``VAL_SEED``) of at most ``limit[split]`` samples per split, for smoke runs."""
        if not limit:
            return self
        parts = {}
        for name, n in limit.items():
            split = getattr(self, name)
            if n < len(split):
                pick = torch.randperm(len(split), generator=torch.Generator().manual_seed(VAL_SEED))[:n]
                split = split.subset(pick.sort().values)
            parts[name] = split
        return replace(self, **parts, description={**self.description, "limit": dict(sorted(limit.items()))})


class SealedSplit:
    """The test split while tuning: any use of it (its samples, labels, length, batches) is refused."""

    def __getattr__(self, name):
        raise KdbenchError("the test split is sealed while tuning: choices are made on the validation split only")

    def __len__(self) -> int:
        self.x  # noqa: B018 - refused like any other use


def sealed(data: TrackData) -> TrackData:
    """``data`` with its test split sealed (kdbench tune); the description is unchanged, so the teacher is the
    reported runs' teacher."""
    return replace(data, test=SealedSplit())


@dataclass(frozen=True)
class Track:
    name: str
    tier: str
    summary: str
    load: Callable[..., TrackData]  # (data_root, download) -> TrackData


TRACKS: Registry[Track] = Registry("track")


def register_track(name: str, tier: str, summary: str):
    def add(load):
        TRACKS.register(name)(Track(name, tier, summary, load))
        return load

    return add


def load_track(name: str, data_root: Path | None = None, download: bool = False) -> TrackData:
    return TRACKS.get(name).load(data_root, download)


def require_data_root(track: str, data_root: Path | None, layout: str) -> Path:
    if data_root is None:
        raise KdbenchError(f"track {track} reads its data from disk: pass --data-root DIR, with {layout}")
    return Path(data_root)


def missing_data(path: Path, what: str, how_to_get: str) -> KdbenchError:
    return KdbenchError(f"{what} not found at {path}; {how_to_get}")


def carve_validation(x: np.ndarray, y: np.ndarray, fraction: float) -> tuple[Split, Split]:
    """A stratified, fixed (seeded) validation split carved from the training data."""
    x_tr, x_val, y_tr, y_val = train_test_split(x, y, test_size=fraction, stratify=y, random_state=VAL_SEED)
    return float_split(x_tr, y_tr), float_split(x_val, y_val)


def float_split(x: np.ndarray, y: np.ndarray) -> Split:
    return Split(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long))


from kdbench.tracks import cifar, imagenet, small, sst2  # noqa: F401  (registers the tracks)
