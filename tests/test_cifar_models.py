"""The CIFAR zoo of the CRD benchmark (kdbench.models.cifar): sizes, shapes, stage taps and seeded init."""

import pytest
import torch

from kdbench.taps import FeatureTaps, probe_shapes
from kdbench.models import MODELS, count_params, create_model

# Exact parameter counts at 100 classes, as RepDistiller's models/{resnet,wrn,vgg}.py give them (checked against
# a transcription of that code: same state-dict keys, shapes and seeded initial weights).
PARAMS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
}
# Published sizes, in M to 2 decimals. The code gives resnet110 1.7366M and vgg8 3.9650M, printed rounded (1.74M,
# 3.97M) here; 1.73M and 3.96M are truncations. A 0.5% bound around these 2-decimal figures would reject correct
# small nets (resnet20: 0.2783M is 0.6% off 0.28M), so PARAMS is the tolerance-free pin and this checks the figure.
PUBLISHED_M = {
    "resnet8x4": "1.23",
    "resnet32x4": "7.43",
    "wrn_16_2": "0.70",
    "wrn_40_2": "2.26",
    "resnet20": "0.28",
    "resnet56": "0.86",
    "resnet110": "1.74",
    "vgg8": "3.97",
    "vgg13": "9.46",
}
RESNET_STAGES = ("relu", "layer1", "layer2", "layer3")
WRN_STAGES = ("conv1", "block1", "block2", "block3")
VGG_STAGES = ("block0", "block1", "block2", "block3", "block4")
FAMILIES = ["resnet20", "resnet8x4", "wrn_16_2", "vgg8"]  # one of each kind, for the slower checks


def expected_stages(name: str) -> tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...]]:
    """The stage modules and the (C, H, W) of stage:0 and stage:-1 for a 32×32 input."""
    if name.startswith("resnet"):
        wide = name.endswith("x4")
        return RESNET_STAGES, (32 if wide else 16, 32, 32), (256 if wide else 64, 8, 8)
    if name.startswith("wrn"):
        return WRN_STAGES, (16, 32, 32), (64 * int(name.split("_")[2]), 8, 8)
    return VGG_STAGES, (64, 32, 32), (512, 4, 4)


@pytest.fixture(scope="module")
def zoo():
    """Every CIFAR model once at its defaults (100 classes), seeded, shared by the tests that only read it."""
    torch.manual_seed(0)
    return {name: create_model(name) for name in PARAMS}


def test_registered_with_cifar100_defaults():
    for name in PARAMS:
        entry = MODELS.get(name)
        assert (entry.num_classes, entry.in_shape) == (100, (3, 32, 32)), name


@pytest.mark.parametrize("name", PARAMS)
def test_param_counts(zoo, name):
    n = count_params(zoo[name])
    assert n == PARAMS[name]
    if name in PUBLISHED_M:
        assert f"{n / 1e6:.2f}" == PUBLISHED_M[name]


@pytest.mark.parametrize("name", PARAMS)
def test_forward_and_stages(zoo, name):
    model = zoo[name]
    stages, first, last = expected_stages(name)
    assert model.stages == stages
    for path in model.stages:
        model.get_submodule(path)
    shapes = probe_shapes(model, ["stage:-1", "stage:0"], torch.zeros(2, 3, 32, 32))  # a forward pass
    assert shapes == {"logits": (100,), "stage:0": first, "stage:-1": last}


@pytest.mark.parametrize("name", FAMILIES)
def test_other_class_counts_channels_and_sizes(name):
    """CIFAR-10 heads, and only in_shape's channel count matters (adaptive pooling: any spatial size)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    gray = create_model(name, num_classes=10, in_shape=(1, 40, 40))
    assert gray(torch.randn(2, 1, 40, 40)).shape == (2, 10)
    assert gray(torch.randn(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", FAMILIES)
def test_last_stage_feeds_the_classifier(name):
    """ResNet/VGG: stage:-1 is post-ReLU and its average is the classifier input. WRN: stage:-1 is the raw
    residual sum of block3 (RepDistiller's f3); the classifier sees ReLU(BN(·)) of it."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    taps = FeatureTaps(model, ["stage:-1"])
    with torch.no_grad():
        out = taps(torch.randn(2, 3, 32, 32))
        feature = out["stage:-1"]
        if name.startswith("wrn"):
            assert feature.min() < 0
            feature = model.relu(model.bn1(feature))
        else:
            assert feature.min() >= 0
        head = model.classifier if name.startswith("vgg") else model.fc
        torch.testing.assert_close(out["logits"], head(feature.mean((2, 3))))


@pytest.mark.parametrize("name", ["resnet8x4", "wrn_16_2", "vgg8"])
def test_same_seed_same_initial_weights(name):
    torch.manual_seed(7)
    a = create_model(name).state_dict()
    torch.manual_seed(7)
    b = create_model(name).state_dict()
    torch.manual_seed(8)
    c = create_model(name).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.endswith("weight"))


def test_reference_init():
    """Kaiming-normal (fan out) convs, BN weight 1 and bias 0, as RepDistiller's code."""
    torch.manual_seed(0)
    model = create_model("resnet32x4")
    conv = model.layer3[0].conv2.weight  # 256 → 256, 3×3: std = sqrt(2 / (9 · 256))
    assert abs(conv.std().item() / (2 / (9 * 256)) ** 0.5 - 1) < 0.02
    bn = model.layer2[1].bn1
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_reference_state_dict_keys(zoo):
    """Module names follow RepDistiller's, so its checkpoints load (a sample of the keys, with shapes)."""
    expected = {
        "resnet8x4": {
            "conv1.weight": (32, 3, 3, 3),
            "layer1.0.downsample.0.weight": (64, 32, 1, 1),
            "layer3.0.bn2.running_var": (256,),
            "fc.weight": (100, 256),
        },
        "wrn_16_2": {
            "block1.layer.0.convShortcut.weight": (32, 16, 1, 1),
            "block3.layer.1.bn1.weight": (128,),
            "bn1.num_batches_tracked": (),
            "fc.bias": (100,),
        },
        "vgg13": {
            "block0.3.weight": (64, 64, 3, 3),
            "block0.4.running_mean": (64,),
            "block4.4.bias": (512,),
            "classifier.weight": (100, 512),
        },
    }
    for name, keys in expected.items():
        state = zoo[name].state_dict()
        assert {k: tuple(state[k].shape) for k in keys} == keys, name
