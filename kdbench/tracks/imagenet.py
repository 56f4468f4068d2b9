"""ImageNet (ILSVRC-2012) read from a torchvision ImageFolder tree, with the standard ImageNet transforms.

Layout under ``--data-root`` (what torchvision's ``ImageFolder`` and the PyTorch ``examples/imagenet`` expect):
``imagenet/train/<wnid>/*.JPEG`` and ``imagenet/val/<wnid>/*.JPEG``, the validation images sorted into the same
class folders as the training images (e.g. with the PyTorch examples' ``extract_ILSVRC.sh``). Classes are the
sorted ``train`` folder names (1000 on ImageNet-1k); ``val`` may lack a class but may not add one.

Splits:
- test: the official validation set, ``imagenet/val`` (50,000 images): what every paper reports;
- validation (for choices): a fixed, stratified ``VAL_PER_CLASS`` = 10 images per class held out of
  ``imagenet/train`` (10,000 images on ImageNet-1k; at most half of a class, for tiny hand-made trees),
  drawn per class with a generator seeded ``VAL_SEED``;
- train: the other training images (1,271,167 on ImageNet-1k). mdistiller trains on all 1,281,167 and has no
  validation split: a deviation, stated in the run's data description.

Transforms (mdistiller ``mdistiller/dataset/imagenet.py``, the PyTorch ``examples/imagenet/main.py``):
train ``RandomResizedCrop(224)`` + ``RandomHorizontalFlip()`` + ``ToTensor()`` + ``Normalize(mean, std)``;
evaluation ``Resize(256)`` + ``CenterCrop(224)`` + ``ToTensor()`` + ``Normalize(mean, std)``, with the
ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225).

Loading: images are decoded by a torch ``DataLoader`` with ``num_workers`` worker processes: every CPU this
process may use but one, at most 32 (``KDBENCH_NUM_WORKERS`` overrides it). JPEG decoding, not the training
step, bounds the speed (README, "Full tier", has the measured rates). Shuffling and augmentation are drawn from
the trainer's generator only: each epoch draws a permutation and one seed per sample, and the random transforms of a sample run under its
own seed. The same generator state therefore gives the same batches, bit for bit, whatever the number of
workers, and the global torch RNG is never touched (a run resumes from its checkpointed generator).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from kdbench.errors import KdbenchError
from kdbench.tracks import (
    VAL_SEED,
    TrackData,
    missing_data,
    register_track,
    require_data_root,
)

VAL_PER_CLASS = 10
IMAGE_SIZE = 224
RESIZE = 256
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
EVAL_BATCH = 256
MAX_WORKERS = 32
LAYOUT = "imagenet/train/<wnid>/*.JPEG and imagenet/val/<wnid>/*.JPEG inside it"
HOW_TO_GET = ("ImageNet cannot be downloaded automatically: get ILSVRC2012 (image-net.org, after registering) and "
              "extract train/ and val/ into class folders, e.g. with the PyTorch examples' "
              "imagenet/extract_ILSVRC.sh, so that {root}/imagenet/train/n01440764/*.JPEG exists")


def train_transform():
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(IMAGE_SIZE), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])


def eval_transform():
    from torchvision import transforms as T

    return T.Compose([T.Resize(RESIZE), T.CenterCrop(IMAGE_SIZE), T.ToTensor(), T.Normalize(MEAN, STD)])


def default_workers() -> int:
    """DataLoader worker processes: ``$KDBENCH_NUM_WORKERS``, else the CPUs this process may use but one (the
    training loop's), at most ``MAX_WORKERS``."""
    value = os.environ.get("KDBENCH_NUM_WORKERS")
    if value is not None:
        if not value.isdigit():
            raise KdbenchError(f"KDBENCH_NUM_WORKERS={value!r}: expected a whole number ≥ 0")
        return int(value)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cpus - 1))


class _Images(torch.utils.data.Dataset):
    """Decodes one image; an item is ``(index, seed)``: the random transform runs under ``seed`` (−1: eval)."""

    def __init__(self, root: Path, files: np.ndarray, targets: np.ndarray, transform: Callable, augment: Callable | None):
        self.root, self.files, self.targets = str(root), files, targets
        self.transform, self.augment = transform, augment

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        from torchvision.datasets.folder import pil_loader

        index, seed = item
        image = pil_loader(os.path.join(self.root, os.fsdecode(self.files[index])))
        if seed < 0 or self.augment is None:
            return self.transform(image), int(self.targets[index])
        with torch.random.fork_rng(devices=[]):  # torchvision's random transforms draw from the global CPU RNG
            torch.random.default_generator.manual_seed(seed)
            return self.augment(image), int(self.targets[index])


@dataclass(frozen=True, eq=False)
class FolderSplit:
    """Images on disk (paths relative to ``root``), decoded and transformed per batch by DataLoader workers.

    Implements the split interface of ``kdbench.tracks.Split``: ``len``, ``y``, ``batches``, ``indexed_batches``,
    ``sample``, ``subset`` and ``eval_batch``. Paths are a numpy bytes array (no per-path Python objects for the forked
    workers to copy).
    """

    root: Path
    files: np.ndarray  # relative paths, bytes
    y: torch.Tensor
    transform: Callable  # the evaluation transform
    augment: Callable | None = None  # the random training transform (training batches only)
    eval_batch: int = EVAL_BATCH
    num_workers: int | None = None  # None: default_workers()

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int, generator: torch.Generator | None = None, train: bool = False
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled full batches with a generator (the last partial one dropped; with ``train`` each sample
        augmented under its own seed from the generator); all samples in order, eval transform, without."""
        for _, x, y in self.indexed_batches(batch_size, generator, train):
            yield x, y

    def indexed_batches(self, batch_size: int, generator: torch.Generator | None = None, train: bool = False
                        ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """As ``batches``, each batch with its samples' positions in this split (the rows of a memory bank, as
        CRD keeps one per training image)."""
        n = len(self)
        if generator is None:
            order, seeds = torch.arange(n), torch.full((n,), -1)
            chunks = [slice(i, i + batch_size) for i in range(0, n, batch_size)]
        else:
            order = torch.randperm(n, generator=generator)
            augment = train and self.augment is not None
            seeds = torch.randint(0, 2**62, (n,), generator=generator) if augment else torch.full((n,), -1)
            chunks = [slice(i * batch_size, (i + 1) * batch_size) for i in range(n // batch_size)]
        batch_sampler = [list(zip(order[c].tolist(), seeds[c].tolist())) for c in chunks]
        workers = min(self.num_workers if self.num_workers is not None else default_workers(), len(batch_sampler))
        loader = torch.utils.data.DataLoader(
            _Images(self.root, self.files, self.y.numpy(), self.transform, self.augment),
            batch_sampler=batch_sampler,
            num_workers=workers if workers > 1 else 0,  # a single worker: decode in this process instead
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(0),  # its draw of the (unused) worker base seed stays private
        )
        for chunk, (x, y) in zip(chunks, loader, strict=True):
            yield order[chunk], x, y

    def sample(self, n: int) -> torch.Tensor:
        """The first ``n`` inputs, transformed as for evaluation (shape probes, FLOPs, latency)."""
        images = _Images(self.root, self.files, self.y.numpy(), self.transform, None)
        return torch.stack([images[(i, -1)][0] for i in range(min(n, len(self)))])

    def subset(self, indices) -> FolderSplit:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return replace(self, files=self.files[idx.numpy()], y=self.y[idx])


def _holdout(targets: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices: per class, ``min(VAL_PER_CLASS, n_c // 2)`` images drawn with ``VAL_SEED``."""
    generator = torch.Generator().manual_seed(VAL_SEED)
    by_class = np.argsort(targets, kind="stable")  # each class's indices, in file order
    val = []
    for members in np.split(by_class, np.cumsum(np.bincount(targets, minlength=num_classes))[:-1]):
        k = min(VAL_PER_CLASS, len(members) // 2)
        val.append(members[torch.randperm(len(members), generator=generator)[:k].numpy()])
    val = np.sort(np.concatenate(val))
    return np.setdiff1d(np.arange(len(targets)), val), val


def _scan(root: Path) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """(classes, train samples, val samples) of ``root/imagenet``; one-line errors for a wrong layout."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    base = root / "imagenet"
    how = HOW_TO_GET.format(root=root)
    for name in ("train", "val"):
        if not (base / name).is_dir():
            raise missing_data(base / name, f"ImageNet {name} folder", how)
    try:
        train = ImageFolder(str(base / "train"))
    except FileNotFoundError as exc:
        raise KdbenchError(f"{base / 'train'}: {str(exc).splitlines()[0]}; {how}") from None
    extra = sorted(p.name for p in (base / "val").iterdir() if p.is_dir() and p.name not in train.class_to_idx)
    if extra:
        raise KdbenchError(f"{base / 'val'} has class folders that imagenet/train lacks ({', '.join(extra[:3])}"
                           f"{', …' if len(extra) > 3 else ''}); both must hold the same <wnid> folders")
    val = make_dataset(str(base / "val"), train.class_to_idx, IMG_EXTENSIONS, allow_empty=True)
    if not val:
        raise KdbenchError(f"{base / 'val'} has no images in class folders: sort the validation images into "
                           "<wnid>/ folders, e.g. with the PyTorch examples' imagenet/extract_ILSVRC.sh")
    return train.classes, train.samples, val


def _relative(samples: list[tuple[str, int]], base: Path) -> tuple[np.ndarray, np.ndarray]:
    """(paths relative to ``base`` as bytes, targets) of ImageFolder samples, which all start with ``base/``."""
    cut = len(os.path.join(str(base), ""))
    files = np.array([os.fsencode(path[cut:]) for path, _ in samples], dtype=np.bytes_)
    return files, np.array([target for _, target in samples], dtype=np.int64)


@register_track("imagenet", tier="gpu",
                summary="ImageNet-1k as ImageFolder under --data-root/imagenet; 1271167/10000 (10 per class)/50000")
def load_imagenet(data_root: Path | None = None, download: bool = False) -> TrackData:
    """ImageNet from ``data_root/imagenet/{train,val}``; ``download`` cannot help (the data needs registration)."""
    root = require_data_root("imagenet", data_root, LAYOUT)
    base = root / "imagenet"
    classes, train_samples, val_samples = _scan(root)
    files, targets = _relative(train_samples, base)
    test_files, test_targets = _relative(val_samples, base)
    listing = hashlib.sha256(b"\n".join([*files.tolist(), *test_files.tolist()])).hexdigest()
    train_idx, val_idx = _holdout(targets, len(classes))
    augment, transform = train_transform(), eval_transform()

    def split(f: np.ndarray, t: np.ndarray, random: Callable | None = None) -> FolderSplit:
        return FolderSplit(base, f, torch.from_numpy(t), transform, augment=random)

    train = split(files[train_idx], targets[train_idx], augment)
    val = split(files[val_idx], targets[val_idx])
    test = split(test_files, test_targets)
    description = {
        "source": "ImageFolder: imagenet/train/<wnid>/*, imagenet/val/<wnid>/*",
        "files_sha256": listing,  # of the sorted relative paths of every image
        "classes": len(classes),
        "sizes": {"train": len(train), "val": len(val), "test": len(test)},
        "val": f"{VAL_PER_CLASS} per class held out of imagenet/train (at most half a class); test = imagenet/val",
        "val_seed": VAL_SEED,
        "train_transform": f"RandomResizedCrop({IMAGE_SIZE}, scale=(0.08, 1), ratio=(3/4, 4/3), bilinear), "
                           "RandomHorizontalFlip(0.5), ToTensor, Normalize; one seed per sample from the run's generator",
        "eval_transform": f"Resize({RESIZE}, bilinear), CenterCrop({IMAGE_SIZE}), ToTensor, Normalize",
        "normalize": [list(MEAN), list(STD)],
    }
    return TrackData(train, val, test, num_classes=len(classes), in_shape=(3, IMAGE_SIZE, IMAGE_SIZE),
                     description=description)
