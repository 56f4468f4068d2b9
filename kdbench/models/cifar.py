"""The CIFAR model zoo of the CRD benchmark (Tian, Krishnan & Isola, "Contrastive Representation Distillation",
ICLR 2020): ResNets, wide ResNets and VGG-BN nets for 32×32 inputs.

Reference implementation: HobbitLong/RepDistiller, ``models/resnet.py``, ``models/wrn.py``, ``models/vgg.py`` and
the names of ``models/__init__.py`` (``model_dict``; its ``vgg<d>`` are the ``vgg<d>_bn`` nets). Architectures,
parameter counts, initialisation and state-dict keys are those of the reference, so its checkpoints load with
``load_state_dict``; modules are built and initialised in the reference's order, so one seed gives the same
initial weights.

Stages: ``stage:i`` is the reference's ``is_feat`` feature ``feat[i]`` (``preact=False``, the features its
FitNets, AT, NST, VID, … losses use) for every i but the last, pooled, entry: ResNets and WRNs have 4 stages
(stem, group 1, group 2, group 3), VGGs 5 (blocks 0–4). The RepDistiller ``preact=True`` features (only its AB
method asks for them) are not exposed as stages.

Deviations (none changes a parameter, a stage output or, beyond float rounding in the pooling, a logit at 32×32):
- adaptive average pooling to 1×1 replaces the reference's fixed 8×8 pooling (ResNet, WRN), so any input size works;
- VGG never applies ``pool3``; the reference applies it when the input is 64 px high (its Tiny-ImageNet setting);
- the first convolution takes ``in_shape[0]`` channels (the reference: 3);
- the WRN's dropout (``dropRate``, 0 in every reference model) and the reference's unused ``Bottleneck`` block are
  left out.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from itertools import pairwise

import torch
from torch import nn

from kdbench.models import register_model


def _init(model: nn.Module, linear_std: float | None = None, linear_bias_zero: bool = False) -> None:
    """The reference's re-initialisation: N(0, 2 / (k² · C_out)) convs (kaiming normal, fan out), conv biases 0,
    BN weight 1 and bias 0; linear layers keep PyTorch's default unless ``linear_std``/``linear_bias_zero``."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            if m.bias is not None:
                m.bias.data.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                m.weight.data.normal_(0, linear_std)
            if linear_bias_zero:
                m.bias.data.zero_()


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation residual block: ReLU(BN(conv(ReLU(BN(conv x)))) + shortcut x), the shortcut a 1×1 conv + BN
    when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        downsample = None
        if stride != 1 or cin != cout:  # built first, as the reference's _make_layer does
            downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016): conv3×3–BN–ReLU stem with ``widths[0]`` channels, then three groups of
    (depth − 2) / 6 basic blocks with ``widths[1:]`` channels, the last two groups halving the size, then global
    average pooling and a linear classifier. ``resnet<d>`` use widths (16, 16, 32, 64), ``resnet<d>x4``
    (32, 64, 128, 256); the x4 nets also have three groups, not four.

    Stages (4): ``relu`` (the stem's ReLU: the stem output, RepDistiller's f0), ``layer1``, ``layer2``,
    ``layer3`` (the group outputs f1–f3). Every tap is post-ReLU; ``stage:-1`` is the map that is pooled. The
    pre-ReLU sums (RepDistiller's ``preact``) are not tapped.
    """

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        for i, (cin, cout) in enumerate(pairwise(widths), start=1):
            stride = 1 if i == 1 else 2
            blocks = [BasicBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1) for j in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        _init(self)
        self.stages = ("relu", "layer1", "layer2", "layer3")
        self.classifier_path = "fc"  # the embedding tap: the pooled map

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(self.avgpool(x).flatten(1))


class WideBlock(nn.Module):
    """Pre-activation residual block of the WRN: conv(ReLU(BN(conv(ReLU(BN x))))) + shortcut, the shortcut x itself,
    or a 1×1 conv of ReLU(BN x) when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(cout, cout)
        self.convShortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x):
        a = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(a))))
        return out + (x if self.convShortcut is None else self.convShortcut(a))


class WideResNet(nn.Module):
    """Wide ResNet WRN-depth-k (Zagoruyko & Komodakis 2016): a conv3×3 stem (16 channels), three groups of
    (depth − 4) / 6 pre-activation blocks with 16k, 32k, 64k channels (the last two halving the size), a final
    BN–ReLU, global average pooling and a linear classifier.

    Stages (4): ``conv1`` (the stem), ``block1``, ``block2``, ``block3``, RepDistiller's f0–f3. In this
    pre-activation net they are raw residual sums, with no activation: the BN–ReLU that follows each one belongs
    to the next block (``block<i+1>.layer.0.relu1``) or, after ``block3``, is the final ``bn1``/``relu``. So,
    unlike ResNet and VGG, ``stage:-1`` is not the pooled map: tap ``module:relu`` for that (post BN–ReLU).
    RepDistiller's ``preact`` features (BN applied, no ReLU) are not tapped.
    """

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = _conv3x3(in_channels, widths[0])
        for i, (cin, cout) in enumerate(pairwise(widths), start=1):
            stride = 1 if i == 1 else 2
            blocks = [WideBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1) for j in range(n)]
            # nested as the reference's NetworkBlock, so that the keys read block<i>.layer.<j>.…
            self.add_module(f"block{i}", nn.Sequential(OrderedDict(layer=nn.Sequential(*blocks))))
        self.bn1 = nn.BatchNorm2d(widths[-1])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        _init(self, linear_bias_zero=True)
        self.stages = ("conv1", "block1", "block2", "block3")
        self.classifier_path = "fc"  # the embedding tap: the pooled ReLU(BN(block3))

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(self.avgpool(self.relu(self.bn1(x))).flatten(1))


_VGG_CFG = {  # conv widths of blocks 0–4
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


class VGG(nn.Module):
    """VGG with batch norm and no hidden FC layers (RepDistiller's ``vgg<d>_bn``): five blocks of conv3×3 (with
    bias)–BN–ReLU layers, a 2×2 max-pool after each of blocks 0–2 (so 4×4 maps from a 32×32 input), global
    average pooling and a linear classifier.

    Stages (5): ``block0`` … ``block4``, RepDistiller's f0–f4. Each block ends in its ReLU (the reference applies
    that ReLU in ``forward``; it has no parameters, so keys and counts are unchanged), so every tap is post-ReLU
    and ``stage:-1`` is the pooled map. The pre-ReLU block outputs (RepDistiller's ``preact``) are not tapped.
    """

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        cin = in_channels
        for i, widths in enumerate(_VGG_CFG[depth]):
            layers = []
            for cout in widths:
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
                cin = cout
            self.add_module(f"block{i}", nn.Sequential(*layers))
        self.pool = nn.MaxPool2d(2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)
        _init(self, linear_std=0.01, linear_bias_zero=True)
        self.stages = tuple(f"block{i}" for i in range(5))
        self.classifier_path = "classifier"  # the embedding tap: the pooled map

    def forward(self, x):
        x = self.pool(self.block0(x))
        x = self.pool(self.block1(x))
        x = self.pool(self.block2(x))
        x = self.block4(self.block3(x))
        return self.classifier(self.avgpool(x).flatten(1))


def _register(name: str, build) -> None:
    register_model(name, num_classes=100, in_shape=(3, 32, 32))(
        lambda num_classes, in_shape: build(num_classes, in_shape[0])
    )


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register(f"resnet{_depth}", lambda c, i, d=_depth: ResNet(d, (16, 16, 32, 64), c, i))
for _depth in (8, 20, 32):  # resnet20x4, wrn_28_2: teacher assistants (methods/takd.py)
    _register(f"resnet{_depth}x4", lambda c, i, d=_depth: ResNet(d, (32, 64, 128, 256), c, i))
for _depth in (16, 28, 40):
    for _widen in (1, 2):
        _register(f"wrn_{_depth}_{_widen}", lambda c, i, d=_depth, k=_widen: WideResNet(d, k, c, i))
for _depth in _VGG_CFG:
    _register(f"vgg{_depth}", lambda c, i, d=_depth: VGG(d, c, i))
