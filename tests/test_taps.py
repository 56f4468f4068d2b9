import pytest
import torch

from kdbench.errors import KdbenchError
from kdbench.taps import FeatureTaps, probe_shapes
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


@pytest.mark.parametrize(
    "tap, message",
    [("hidden:0", "is for transformers"), ("attn:0", "lists no attention modules"), ("mask", "padded token sequences")],
)
def test_transformer_taps_on_a_cnn_are_named(model, tap, message):
    with pytest.raises(KdbenchError, match=message):
        FeatureTaps(model, [tap])


class TupleLayers(torch.nn.Module):
    """A toy 'transformer': layers and an attention module that return tuples, as Hugging Face modules do."""

    class Layer(torch.nn.Module):
        def forward(self, x):
            return x + 1, "extra"

    class Attention(torch.nn.Module):
        def forward(self, x):
            return x * 2, torch.softmax(x, -1)

    def __init__(self):
        super().__init__()
        self.layer0, self.attention = self.Layer(), self.Attention()
        self.stages, self.attentions = ("layer0",), ("attention",)

    @staticmethod
    def token_mask(x):
        return (x[..., 0] > 0).long()

    def forward(self, x):
        return self.attention(self.layer0(x)[0])[0].sum(1)


def test_tuple_outputs_hidden_attention_and_mask():
    toy, x = TupleLayers(), torch.randn(2, 3, 4)
    out = FeatureTaps(toy, ["hidden:0", "stage:0", "module:layer0", "attn:0"])(x)
    for tap in ("hidden:0", "stage:0", "module:layer0"):
        torch.testing.assert_close(out[tap], x + 1)  # element 0 of a tuple
    torch.testing.assert_close(out["attn:0"], torch.softmax(x + 1, -1))  # attn: element 1
    torch.testing.assert_close(out["mask"], (x[..., 0] > 0).long())  # always there for token models
    assert probe_shapes(toy, ["attn:0"], x) == {"logits": (4,), "attn:0": (3, 4), "mask": (3,)}
    with pytest.raises(KdbenchError, match=r"has 1 layers \(use attn:0"):
        FeatureTaps(toy, ["attn:3"])
