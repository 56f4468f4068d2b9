"""Small convolutional nets for the CPU tier: 1-D (MNIST-1D signals of length 40) and 2-D (8×8 digits)."""

from __future__ import annotations

import math

from torch import nn

from kdbench.models import register_model


class ConvNet(nn.Module):
    """Conv → BN → ReLU blocks, all but the first halving each spatial size, then a linear classifier.

    1-D (``in_shape`` = (C, L), kernel 5) is a variant of the MNIST-1D paper's ``ConvBase``
    (greydanus/mnist1d, ``models.py``) with batch norm; 2-D (``in_shape`` = (C, H, W), kernel 3) is its
    image counterpart. Stage i is the output of block i.
    """

    def __init__(self, num_classes: int, in_shape: tuple[int, ...], width: int, depth: int = 3):
        super().__init__()
        channels, *size = in_shape
        conv, bn, kernel = (nn.Conv1d, nn.BatchNorm1d, 5) if len(size) == 1 else (nn.Conv2d, nn.BatchNorm2d, 3)
        layers = []
        for i in range(depth):
            stride = 1 if i == 0 else 2
            layers.append(
                nn.Sequential(
                    conv(channels if i == 0 else width, width, kernel, stride=stride, padding=kernel // 2, bias=False),
                    bn(width),
                    nn.ReLU(inplace=True),
                )
            )
            size = size if i == 0 else [(s - 1) // 2 + 1 for s in size]
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(width * math.prod(size), num_classes)
        self.stages = tuple(f"blocks.{i}" for i in range(depth))
        self.classifier_path = "head"  # the ``embedding`` tap: the flattened last block

    def forward(self, x):
        return self.head(self.blocks(x).flatten(1))


def _register(name: str, in_shape: tuple[int, ...], width: int) -> None:
    register_model(name, num_classes=10, in_shape=in_shape)(
        lambda num_classes, in_shape: ConvNet(num_classes, in_shape, width)
    )


for _width in (4, 8, 12, 16, 24, 32, 64, 128):  # 12 and 24: teacher assistants (methods/takd.py)
    _register(f"cnn1d_w{_width}", (1, 40), _width)  # MNIST-1D
for _width in (4, 8, 12, 16, 24, 32):
    _register(f"cnn2d_w{_width}", (1, 8, 8), _width)  # scikit-learn digits
