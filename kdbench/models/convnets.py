"""Small convolutional nets for the CPU tier (MNIST-1D: 1-D signals of length 40)."""

from __future__ import annotations

from torch import nn

from kdbench.models import register_model


class ConvNet1d(nn.Module):
    """Conv(k=5) → BN → ReLU blocks, the later ones halving the length, then a linear classifier.

    A variant of the MNIST-1D paper's ``ConvBase`` (greydanus/mnist1d, ``models.py``) with batch norm.
    Stage i is the output of block i.
    """

    def __init__(self, num_classes: int, in_shape: tuple[int, ...], width: int, depth: int = 3):
        super().__init__()
        channels, length = in_shape
        layers = []
        for i in range(depth):
            stride = 1 if i == 0 else 2
            layers.append(
                nn.Sequential(
                    nn.Conv1d(channels if i == 0 else width, width, 5, stride=stride, padding=2, bias=False),
                    nn.BatchNorm1d(width),
                    nn.ReLU(inplace=True),
                )
            )
            length = length if i == 0 else (length - 1) // 2 + 1
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(width * length, num_classes)
        self.stages = tuple(f"blocks.{i}" for i in range(depth))

    def forward(self, x):
        return self.head(self.blocks(x).flatten(1))


def _register_cnn1d(width: int) -> None:
    register_model(f"cnn1d_w{width}", num_classes=10, in_shape=(1, 40))(lambda num_classes, in_shape: ConvNet1d(num_classes, in_shape, width))


for _width in (4, 8, 16, 32, 64, 128):
    _register_cnn1d(_width)
