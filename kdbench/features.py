"""Taps: named intermediate outputs captured with forward hooks, so model code is never edited.

Tap vocabulary (architecture-agnostic):
- ``logits``: the model's output;
- ``stage:<i>``: output of the model's i-th stage (models list their stage modules in ``stages``;
  negative indices count from the end);
- ``module:<dotted.path>``: output of any submodule (the escape hatch).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
from torch import nn

from kdbench.errors import KdbenchError


def stage_modules(model: nn.Module) -> tuple[str, ...]:
    return tuple(getattr(model, "stages", ()))


def resolve_tap(model: nn.Module, tap: str) -> nn.Module:
    """The submodule whose output a tap names; a clear error for a tap the model lacks."""
    kind, _, arg = tap.partition(":")
    if kind == "stage":
        stages = stage_modules(model)
        try:
            path = stages[int(arg)]
        except (ValueError, IndexError):
            raise KdbenchError(
                f"tap {tap!r}: {type(model).__name__} has {len(stages)} stages "
                f"(use stage:0 … stage:{len(stages) - 1})"
            ) from None
    elif kind == "module":
        path = arg
    else:
        raise KdbenchError(f"unknown tap {tap!r}; use 'logits', 'stage:<i>' or 'module:<dotted.path>'")
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise KdbenchError(f"tap {tap!r}: {type(model).__name__} has no submodule {path!r}") from None


class FeatureTaps:
    """Calls a model and returns ``{"logits": output, tap: captured output, ...}``."""

    def __init__(self, model: nn.Module, taps: Iterable[str]):
        self.model = model
        self._captured: dict[str, torch.Tensor] = {}
        self._handles = [
            resolve_tap(model, tap).register_forward_hook(partial(self._capture, tap))
            for tap in dict.fromkeys(taps)
            if tap != "logits"
        ]

    def _capture(self, tap: str, module: nn.Module, inputs, output) -> None:
        self._captured[tap] = output

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._captured = {}
        logits = self.model(x)
        return {"logits": logits, **self._captured}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@torch.no_grad()
def probe_shapes(model: nn.Module, taps: Iterable[str], sample: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Shapes (without the batch dimension) of each tap, from one dry forward pass in eval mode."""
    was_training = model.training
    model.eval()
    tapper = FeatureTaps(model, taps)
    try:
        outputs = tapper(sample[:2])
    finally:
        tapper.remove()
        model.train(was_training)
    return {name: tuple(value.shape[1:]) for name, value in outputs.items()}
