"""Taps: named intermediate outputs captured with forward hooks, so model code is never edited.

Tap vocabulary (architecture-agnostic):
- ``logits``: the model's output;
- ``stage:<i>``: output of the model's i-th stage (models list their stage modules in ``stages``;
  negative indices count from the end);
- ``module:<dotted.path>``: output of any submodule (the escape hatch);
- for transformers (models that list their self-attention modules in ``attentions``, and whose ``stages`` are
  their layers): ``hidden:<i>``, the hidden states (B, L, H) after layer i (the same module as ``stage:<i>``),
  and ``attn:<i>``, the attention probabilities (B, heads, L, L) of layer i (element 1 of the output of the
  module ``attentions[i]``);
- ``embedding``: the input of the model's classifier, flattened to (B, D): the penultimate representation that
  relation and contrastive methods (RKD, PKT, CRD) and BYOT's deepest feature read. Models name their
  classifier module in ``classifier_path``;
- ``index``: each sample's position in the training split, (B,) integers, given by the training loop (a memory
  bank's row, as CRD needs). Among the shapes a method is built with, its shape is (N,): N, the size of the
  training split, is the number of rows such a bank needs;
- ``input``: the batch itself, as the model received it (online methods run their own peer networks on it);
- ``member:<i>``: the logits of member i of a teacher ensemble (models that list their member modules in
  ``members``, as ``kdbench.sources.TeacherEnsemble`` does; its ``logits`` are the ensemble's);
- ``mask``: for models over padded token sequences (they define ``token_mask(x)``), (B, L) with 1 for real
  tokens and 0 for padding. It is part of every tap dict of such a model, asked for or not, so that methods
  can leave padding out; a method sees hidden states (B, L, H) rather than feature maps (B, C, *positions)
  exactly when ``mask`` is among the shapes it is built with (``is_token_sequence``).

A module that returns a tuple is tapped at its element 0 (``attn:`` at element 1, the probabilities).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
from torch import nn

from kdbench.errors import KdbenchError

MASK = "mask"
EMBEDDING = "embedding"
INDEX = "index"
INPUT = "input"


def member_tap(i: int) -> str:
    return f"member:{i}"


def stage_modules(model: nn.Module) -> tuple[str, ...]:
    return tuple(getattr(model, "stages", ()))


def is_token_sequence(shapes: dict) -> bool:
    """Whether the taps come from a model over token sequences: features are (L, H), and ``mask`` is given."""
    return MASK in shapes


def token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (B, L, ...) over the real tokens of ``mask`` (B, L) only: → (B, ...)."""
    weights = mask.to(values.dtype).reshape(*mask.shape, *(1,) * (values.dim() - 2))
    return (values * weights).sum(1) / weights.sum(1).clamp_min(1)


def real_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (B, L) over all real tokens of the batch (padding left out): a scalar."""
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1)


def _indexed(model: nn.Module, tap: str, arg: str, paths: tuple[str, ...], what: str) -> str:
    try:
        return paths[int(arg)]
    except (ValueError, IndexError):
        raise KdbenchError(
            f"tap {tap!r}: {type(model).__name__} has {len(paths)} {what} "
            f"(use {tap.partition(':')[0]}:0 … {tap.partition(':')[0]}:{len(paths) - 1})"
        ) from None


def resolve_tap(model: nn.Module, tap: str) -> nn.Module:
    """The submodule whose output a tap names; a clear error for a tap the model lacks."""
    kind, _, arg = tap.partition(":")
    if kind == "stage":
        path = _indexed(model, tap, arg, stage_modules(model), "stages")
    elif kind in ("hidden", "attn"):
        attentions = tuple(getattr(model, "attentions", ()))
        if not attentions:
            raise KdbenchError(f"tap {tap!r} is for transformers: {type(model).__name__} lists no attention modules "
                               "(use stage:<i>)")
        path = _indexed(model, tap, arg, stage_modules(model) if kind == "hidden" else attentions, "layers")
    elif kind == "member":
        members = tuple(getattr(model, "members", ()))
        if not members:
            raise KdbenchError(f"tap {tap!r} is for teacher ensembles: {type(model).__name__} has no members "
                               "(a method reads them by listing its teachers in teacher_members)")
        path = _indexed(model, tap, arg, members, "members")
    elif kind == "module":
        path = arg
    else:
        raise KdbenchError(f"unknown tap {tap!r}; use 'logits', 'stage:<i>', 'module:<dotted.path>', "
                           "'hidden:<i>', 'attn:<i>', 'member:<i>', 'embedding', 'index', 'input' or 'mask'")
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise KdbenchError(f"tap {tap!r}: {type(model).__name__} has no submodule {path!r}") from None


def _classifier(model: nn.Module) -> nn.Module:
    path = getattr(model, "classifier_path", None)
    if path is None:
        raise KdbenchError(f"tap 'embedding': {type(model).__name__} names no classifier module (its "
                           "classifier_path attribute) whose input is the embedding")
    return model.get_submodule(path)


class FeatureTaps:
    """Calls a model and returns ``{"logits": output, tap: captured output, ...}``."""

    def __init__(self, model: nn.Module, taps: Iterable[str]):
        self.model = model
        self._captured: dict[str, torch.Tensor] = {}
        self._token_mask = getattr(model, "token_mask", None)
        taps = dict.fromkeys(taps)
        if MASK in taps and self._token_mask is None:
            raise KdbenchError(f"tap 'mask': {type(model).__name__} does not read padded token sequences")
        self._wants_index, self._wants_input = INDEX in taps, INPUT in taps
        self._handles = [
            resolve_tap(model, tap).register_forward_hook(partial(self._capture, tap))
            for tap in taps
            if tap not in ("logits", MASK, EMBEDDING, INDEX, INPUT)
        ]
        if EMBEDDING in taps:
            self._handles.append(_classifier(model).register_forward_pre_hook(self._capture_embedding))

    def _capture_embedding(self, module: nn.Module, inputs) -> None:
        self._captured[EMBEDDING] = inputs[0].flatten(1)

    def _capture(self, tap: str, module: nn.Module, inputs, output) -> None:
        if isinstance(output, tuple):
            output = output[1 if tap.startswith("attn:") else 0]
            if output is None:
                raise KdbenchError(f"tap {tap!r}: {type(module).__name__} returned no attention probabilities "
                                   "(it needs an attention implementation that returns them, such as eager)")
        self._captured[tap] = output

    def __call__(self, x: torch.Tensor, index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The taps on ``x``; ``index``: the samples' positions in the training split, for the ``index`` tap."""
        self._captured = {}
        logits = self.model(x)
        given = {} if self._token_mask is None else {MASK: self._token_mask(x)}
        if self._wants_index:
            if index is None:
                raise KdbenchError("tap 'index': these samples have no positions in a training split")
            given[INDEX] = index
        if self._wants_input:
            given[INPUT] = x
        return {"logits": logits, **self._captured, **given}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@torch.no_grad()
def probe(model: nn.Module, taps: Iterable[str], sample: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every tap's output on ``sample[:2]``, from one dry forward pass in eval mode (``index``: 0 and 1)."""
    was_training = model.training
    model.eval()
    tapper = FeatureTaps(model, taps)
    try:
        return tapper(sample[:2], torch.arange(2, device=sample.device))
    finally:
        tapper.remove()
        model.train(was_training)


def tap_shapes(outputs: dict[str, torch.Tensor], train_size: int | None = None) -> dict[str, tuple[int, ...]]:
    """Shapes without the batch dimension, as methods are built with; ``index`` → (train_size,)."""
    shapes = {name: tuple(value.shape[1:]) for name, value in outputs.items()}
    if INDEX in shapes:
        if train_size is None:
            raise KdbenchError("tap 'index': the size of the training split is not known here")
        shapes[INDEX] = (train_size,)
    return shapes


def probe_shapes(model: nn.Module, taps: Iterable[str], sample: torch.Tensor,
                 train_size: int | None = None) -> dict[str, tuple[int, ...]]:
    """Shapes (without the batch dimension) of each tap, from one dry forward pass in eval mode."""
    return tap_shapes(probe(model, taps, sample), train_size)
