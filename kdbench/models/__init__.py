"""The model zoo: ``create_model(name, num_classes, in_shape)`` is the one constructor.

Every model lists its stage modules in ``stages`` so that methods can tap ``stage:<i>``, and names its classifier
module in ``classifier_path`` (the ``embedding`` tap is that module's input).
A model that starts from pretrained weights names them relative to ``<data-root>/pretrained/``
(hubs are not assumed reachable); its builder takes that path as a third argument.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.registry import Registry


@dataclass(frozen=True)
class ModelEntry:
    build: Callable[..., nn.Module]  # (num_classes, in_shape[, pretrained path or None]) -> model
    num_classes: int  # the shapes of the track it is made for; `kdbench list models` counts with them
    in_shape: tuple[int, ...]
    pretrained: str | None = None  # file or folder under <data-root>/pretrained/ that ``build`` loads
    how_to_get: str = ""  # one line: how a user obtains that file


MODELS: Registry[ModelEntry] = Registry("model")


def register_model(name: str, num_classes: int, in_shape: tuple[int, ...], pretrained: str | None = None,
                   how_to_get: str = ""):
    def add(build):
        MODELS.register(name)(ModelEntry(build, num_classes, in_shape, pretrained, how_to_get))
        return build

    return add


def pretrained_path(name: str, data_root: Path | None) -> Path | None:
    """Where a model's pretrained weights must be (None for models trained from scratch); refuses a missing file."""
    entry = MODELS.get(name)
    if entry.pretrained is None:
        return None
    path = Path(data_root or "DATA_ROOT") / "pretrained" / entry.pretrained
    if data_root is None or not path.exists():
        raise KdbenchError(f"model {name} starts from pretrained weights: expected {path} (pass --data-root); "
                           f"{entry.how_to_get}")
    return path


def create_model(name: str, num_classes: int | None = None, in_shape: tuple[int, ...] | None = None,
                 data_root: Path | None = None, random_init: bool = False) -> nn.Module:
    """The named model; pretrained ones load their weights from ``data_root`` unless ``random_init``
    (listing, shape probes)."""
    entry = MODELS.get(name)
    args = (num_classes or entry.num_classes, in_shape or entry.in_shape)
    if entry.pretrained is None:
        return entry.build(*args)
    return entry.build(*args, None if random_init else pretrained_path(name, data_root))


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


@cache
def _digest(path: Path, stamp: tuple) -> str:
    files = _files(path)
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        with f.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def weights_digest(path: Path) -> str:
    """sha256 of a weights file (or of every file in a weights folder), remembered per path, size and mtime."""
    path = path.resolve()
    return _digest(path, tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in _files(path)))


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


from kdbench.models import bert, cifar, convnets, timm_zoo  # noqa: F401  (register the CIFAR zoo, the small CPU-tier nets, the timm ImageNet pair, the BERT pair)
