"""The model zoo: ``create_model(name, num_classes, in_shape)`` is the one constructor.

Every model lists its stage modules in ``stages`` so that methods can tap ``stage:<i>``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kdbench.registry import Registry


@dataclass(frozen=True)
class ModelEntry:
    build: Callable[[int, tuple[int, ...]], nn.Module]  # (num_classes, in_shape) -> model
    num_classes: int  # the shapes of the track it is made for; `kdbench list models` counts with them
    in_shape: tuple[int, ...]


MODELS: Registry[ModelEntry] = Registry("model")


def register_model(name: str, num_classes: int, in_shape: tuple[int, ...]):
    def add(build):
        MODELS.register(name)(ModelEntry(build, num_classes, in_shape))
        return build

    return add


def create_model(name: str, num_classes: int | None = None, in_shape: tuple[int, ...] | None = None) -> nn.Module:
    entry = MODELS.get(name)
    return entry.build(num_classes or entry.num_classes, in_shape or entry.in_shape)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


from kdbench.models import cifar, convnets  # noqa: E402,F401  (register the CIFAR zoo and the small CPU-tier nets)
