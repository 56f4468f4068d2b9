import pytest
import torch

from kdbench.errors import KdbenchError
from kdbench.features import FeatureTaps, probe_shapes
from kdbench.models import create_model


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("cnn1d_w8").eval()


def test_taps_capture_stage_outputs(model):
    x = torch.randn(3, 1, 40)
    taps = FeatureTaps(model, ["logits", "stage:0", "stage:-1", "module:blocks.1.0"])
    out = taps(x)
    expected_stage0 = model.blocks[0](x)
    torch.testing.assert_close(out["stage:0"], expected_stage0)
    torch.testing.assert_close(out["stage:-1"], model.blocks(x))
    torch.testing.assert_close(out["module:blocks.1.0"], model.blocks[1][0](expected_stage0))
    torch.testing.assert_close(out["logits"], model(x))


def test_remove_detaches_hooks(model):
    taps = FeatureTaps(model, ["stage:0"])
    taps.remove()
    assert all(not m._forward_hooks for m in model.modules())


def test_probe_shapes(model):
    shapes = probe_shapes(model, ["logits", "stage:0", "stage:2"], torch.randn(4, 1, 40))
    assert shapes == {"logits": (10,), "stage:0": (8, 40), "stage:2": (8, 10)}
    assert model.training is False


@pytest.mark.parametrize(
    "tap, message",
    [("stage:7", "has 3 stages"), ("module:nope", "no submodule 'nope'"), ("features", "unknown tap")],
)
def test_bad_taps_are_named(model, tap, message):
    with pytest.raises(KdbenchError, match=message):
        FeatureTaps(model, [tap])
