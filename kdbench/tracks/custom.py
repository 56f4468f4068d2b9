"""The Python API's ``custom`` track: a user's own data, ``(X, y)`` tensors or a DataLoader, as splits.

Tensors become a ``Split``: in memory, shuffled and batched by the trainer's seeded generator. A DataLoader
becomes a ``LoaderSplit``: training batches are the loader's own (its batch size, shuffling, workers, collate
function and any augmentation in its dataset; its shuffling follows torch's global seed, which the trainer
sets, unless the loader has its own generator), full batches only, as for tensors. Evaluation reads the
loader's dataset in order at the same batch size, so a loader of validation or test data should not augment.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from itertools import islice

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, Subset

from kdbench.errors import KdbenchError
from kdbench.tracks import VAL_SEED, Split

VAL_FRACTION = 0.1  # held out of the training data when no validation data is given


class LoaderSplit:
    """A DataLoader with the batches protocol of ``Split`` (``len``, ``y``, ``batches``, ``sample``, ``subset``)."""

    def __init__(self, loader: DataLoader, what: str):
        if loader.batch_size is None:
            raise KdbenchError(f"{what}: a DataLoader with a batch_sampler is not supported; give it a batch_size")
        try:
            len(loader.dataset)
        except TypeError:
            raise KdbenchError(f"{what}: the DataLoader's dataset has no length; use a map-style dataset") from None
        self.loader = loader
        self.what = what
        self.eval_batch = loader.batch_size

    def __len__(self) -> int:
        return len(self.loader.dataset)

    def batches(self, batch_size: int, generator: torch.Generator | None = None, train: bool = False
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """With a generator (training): the loader's own full batches. Without: the dataset in order.
        The batch size is always the loader's (the trainer is given the same one)."""
        if generator is None:
            batches = iter(self._loader(self.loader.dataset, shuffle=False))
        else:
            batches = islice(self.loader, len(self) // self.loader.batch_size)
        for batch in batches:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise KdbenchError(f"{self.what}: a DataLoader batch must be an (inputs, labels) pair, "
                                   f"got {type(batch).__name__}")
            yield batch[0], batch[1]

    @cached_property
    def y(self) -> torch.Tensor:
        """Every label, in dataset order (one pass over the data, remembered)."""
        return torch.cat([y for _, y in self.batches(self.eval_batch)])

    def sample(self, n: int) -> torch.Tensor:
        """The first ``n`` inputs in dataset order."""
        xs, have = [], 0
        for x, _ in self.batches(self.eval_batch):
            xs.append(x)
            have += len(x)
            if have >= n:
                break
        return torch.cat(xs)[:n]

    def subset(self, indices: torch.Tensor) -> LoaderSplit:
        """The samples at ``indices``, through a loader with this one's settings (shuffling or not)."""
        if not isinstance(self.loader.sampler, (RandomSampler, SequentialSampler)):
            raise KdbenchError(f"{self.what}: a DataLoader with a {type(self.loader.sampler).__name__} cannot be "
                               "split; pass val_data= explicitly")
        dataset = Subset(self.loader.dataset, indices.tolist())
        return LoaderSplit(self._loader(dataset, isinstance(self.loader.sampler, RandomSampler)), self.what)

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        ld = self.loader
        return DataLoader(dataset, batch_size=ld.batch_size, shuffle=shuffle, num_workers=ld.num_workers,
                          collate_fn=ld.collate_fn, pin_memory=ld.pin_memory, drop_last=ld.drop_last,
                          worker_init_fn=ld.worker_init_fn, generator=ld.generator)


def as_split(data, what: str, dtype: torch.dtype) -> Split | LoaderSplit:
    """``(X, y)`` tensors (floating inputs cast to ``dtype``, the model's) or a DataLoader, as a split."""
    if isinstance(data, DataLoader):
        return LoaderSplit(data, what)
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise KdbenchError(f"{what}: expected an (X, y) pair of tensors or a DataLoader, got {type(data).__name__}")
    x, y = (torch.as_tensor(v) for v in data)
    if y.dim() != 1 or y.is_floating_point() or len(y) != len(x):
        raise KdbenchError(f"{what}: y must be a 1-D tensor of integer class labels, one per row of X "
                           f"(X has {len(x)} rows, y has shape {tuple(y.shape)}, dtype {y.dtype})")
    return Split(x.to(dtype) if x.is_floating_point() else x, y.long())


def hold_out(split: Split | LoaderSplit) -> tuple[Split | LoaderSplit, Split | LoaderSplit, str]:
    """(train, validation, how): a fixed (seeded) ``VAL_FRACTION`` of the samples held out for validation,
    stratified by label, or at random where a class has too few samples to stratify."""
    if len(split) < 2:
        raise KdbenchError(f"data has {len(split)} sample(s): too few to hold out a validation split")
    index, labels = np.arange(len(split)), split.y.cpu().numpy()
    try:
        train, val = train_test_split(index, test_size=VAL_FRACTION, stratify=labels, random_state=VAL_SEED)
        how = "stratified"
    except ValueError:  # a class with a single sample, or fewer validation samples than classes
        train, val = train_test_split(index, test_size=VAL_FRACTION, random_state=VAL_SEED)
        how = "random"
    pick = lambda rows: split.subset(torch.as_tensor(np.sort(rows)))
    return pick(train), pick(val), f"{how} {VAL_FRACTION * 100:.0f} % of the data held out (seed {VAL_SEED})"
