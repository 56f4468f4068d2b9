"""ImageNet models from timm (Wightman, pytorch-image-models): the ResNet-34 → ResNet-18 pair of the CRD and DKD
ImageNet tables (mdistiller ``configs/imagenet/r34_r18``), for 224×224 inputs.

- ``resnet34``, the teacher, starts from pretrained weights in a local file, ``<data-root>/pretrained/
  resnet34.safetensors`` (hubs are not assumed reachable; timm is never asked to download). The file may hold a
  safetensors or a PyTorch (``torch.load(weights_only=True)``) state dict, whatever its name: torchvision's
  ``ResNet34_Weights.IMAGENET1K_V1`` (``resnet34-b627a593.pth``, 73.314 % top-1) has the same keys as timm's
  ``resnet34`` (timm ships the same weights as ``resnet34.tv_in1k``); mdistiller's teacher is torchvision's
  ResNet-34 too (under its older file name ``resnet34-333f7ec4.pth``).
- ``resnet18``, the student, starts from random weights, as in the CRD/DKD protocol. timm zero-initialises the
  last BN of each residual branch by default; ``zero_init_last=False`` keeps the initialisation of torchvision's
  ``resnet18`` and mdistiller's ``models/imagenet/resnet.py`` (convs N(0, 2 / (k²·C_out)), BN 1 and 0).

Both are ``timm.create_model(name, pretrained=False, num_classes=...)``: 21,797,672 and 11,689,512 parameters at
1000 classes, the torchvision counts. ``stage:0`` … ``stage:3`` are ``layer1`` … ``layer4`` (each block's output is
after its final ReLU, as mdistiller's ``feats[1:]``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.models import register_model

IMAGENET_CLASSES = 1000
IMAGENET_SHAPE = (3, 224, 224)
STAGES = ("layer1", "layer2", "layer3", "layer4")
RESNET34_HOW_TO_GET = (
    "on a machine with internet, save torchvision's ResNet34_Weights.IMAGENET1K_V1 (resnet34-b627a593.pth; timm's "
    "resnet34.tv_in1k are the same weights) there: python -c \"import torchvision; from safetensors.torch import "
    "save_file; save_file(torchvision.models.resnet34(weights='IMAGENET1K_V1').state_dict(), "
    "'resnet34.safetensors')\" (the .pth file itself, renamed, also loads)"
)


def _timm_resnet(arch: str, num_classes: int, in_shape: tuple[int, ...], **kwargs) -> nn.Module:
    import timm

    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_shape[0], **kwargs)
    model.stages = STAGES
    model.classifier_path = "fc"
    return model


def read_state_dict(path: Path, how_to_get: str = "") -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a PyTorch file (``weights_only``: nothing is unpickled but tensors);
    a file that is neither, or holds something else, is refused in one line."""
    from safetensors.torch import load_file

    hint = f"; {how_to_get}" if how_to_get else ""
    try:
        with open(path, "rb") as stream:
            head = stream.read(9)
            if len(head) == 9 and head[8:9] == b"{":  # safetensors: 8-byte header length, then the JSON header
                state = load_file(str(path))
            else:  # a stream, not the path: torch.load would dispatch a *.safetensors name to safetensors
                stream.seek(0)
                state = torch.load(stream, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line refusal
        raise KdbenchError(f"pretrained weights {path}: not a safetensors or PyTorch weights file "
                           f"({type(exc).__name__}){hint}") from None
    for key in ("state_dict", "model"):  # training checkpoints often wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise KdbenchError(f"pretrained weights {path}: the file holds no state dict of tensors{hint}")
    return state


def load_weights(model: nn.Module, path: Path, name: str, how_to_get: str = "") -> nn.Module:
    """Load ``path`` into ``model`` strictly; missing, unexpected or wrong-shaped entries are refused in one line.
    (BatchNorm's ``num_batches_tracked``, absent from old torchvision files, may be missing.)"""
    state = read_state_dict(path, how_to_get)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                 (("missing entries", missing), ("unexpected entries", unexpected), ("wrong shapes", wrong)) if v]
        raise KdbenchError(f"pretrained weights {path} do not fit {name} with {model.num_classes} classes: "
                           f"{'; '.join(parts)}")
    model.load_state_dict(state)
    return model


@register_model("resnet34", num_classes=IMAGENET_CLASSES, in_shape=IMAGENET_SHAPE, pretrained="resnet34.safetensors",
                how_to_get=RESNET34_HOW_TO_GET)
def resnet34(num_classes: int, in_shape: tuple[int, ...], weights: Path | None) -> nn.Module:
    """timm ResNet-34 with the pretrained weights at ``weights`` (None: random, for listing and shape probes)."""
    model = _timm_resnet("resnet34", num_classes, in_shape)
    return model if weights is None else load_weights(model, weights, "resnet34", RESNET34_HOW_TO_GET)


@register_model("resnet18", num_classes=IMAGENET_CLASSES, in_shape=IMAGENET_SHAPE)
def resnet18(num_classes: int, in_shape: tuple[int, ...]) -> nn.Module:
    """timm ResNet-18 from scratch, initialised as torchvision's (no zero-init of the last BN per block)."""
    return _timm_resnet("resnet18", num_classes, in_shape, zero_init_last=False)
