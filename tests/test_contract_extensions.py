"""The contract's generic extensions: the ``embedding`` and ``index`` taps, method variants (rows of their own)
and logit standardization as an option of logit methods."""

import math

import pytest
import torch
from torch import nn

from kdbench.config import TrainConfig, sha256_of
from kdbench.errors import KdbenchError
from kdbench.losses import kd_loss, standardized
from kdbench.method import METHODS, Method, MethodConfig, SupervisedOnly, _variant, validate_config
from kdbench.models import create_model
from kdbench.suite import Suite, expand
from kdbench.taps import FeatureTaps, probe_shapes
from kdbench.tracks import Split, TrackData
from kdbench.train import fit


# --- the embedding tap: what the classifier reads


@pytest.mark.parametrize(("name", "x"), [
    ("cnn1d_w4", torch.randn(2, 1, 40)), ("cnn2d_w4", torch.randn(2, 1, 8, 8)),
    ("resnet8x4", torch.randn(2, 3, 32, 32)), ("wrn_16_2", torch.randn(2, 3, 32, 32)),
    ("vgg8", torch.randn(2, 3, 32, 32)),
])
def test_the_embedding_is_the_classifier_input(name, x):
    torch.manual_seed(0)
    model = create_model(name).eval()
    with torch.no_grad():
        out = FeatureTaps(model, ["embedding"])(x)
        classifier = model.get_submodule(model.classifier_path)
        assert out["embedding"].dim() == 2 and isinstance(classifier, nn.Linear)
        torch.testing.assert_close(classifier(out["embedding"]), out["logits"])


def test_a_model_without_a_classifier_path_is_one_line():
    with pytest.raises(KdbenchError, match="names no classifier module"):
        FeatureTaps(nn.Sequential(nn.Linear(3, 2)), ["embedding"])


# --- the index tap: each sample's position in the training split


def test_index_shape_is_the_training_split_size_and_a_missing_index_is_refused():
    model, x = create_model("cnn1d_w4"), torch.randn(2, 1, 40)
    assert probe_shapes(model, ["index"], x, train_size=500)["index"] == (500,)
    with pytest.raises(KdbenchError, match="size of the training split"):
        probe_shapes(model, ["index"], x)
    with pytest.raises(KdbenchError, match="no positions in a training split"):
        FeatureTaps(model, ["index"])(x)


class RecordsIndex(SupervisedOnly):
    """Keeps every batch's indices and inputs, to check that index i is the row i of the training split."""

    @classmethod
    def taps(cls, config):
        return ("logits", "index"), ()

    def __init__(self, *args):
        super().__init__(*args)
        self.seen = []

    def loss(self, student, teacher, target, progress):
        self.seen.append((student["index"].clone(), target.clone()))
        return super().loss(student, teacher, target, progress)


def test_the_loop_gives_each_sample_its_position_in_the_training_split():
    n = 24
    g = torch.Generator().manual_seed(0)
    train = Split(torch.randn(n, 1, 40, generator=g), torch.arange(n) % 10)
    data = TrackData(train, train, train, num_classes=10, in_shape=(1, 40))
    method = RecordsIndex(MethodConfig(), {}, {})
    fit(create_model("cnn1d_w4"), method, None, data, TrainConfig(epochs=2, batch_size=8, lr=0.01), 0)
    assert len(method.seen) == 2 * (n // 8)
    for index, target in method.seen:
        assert index.dtype == torch.int64 and torch.equal(train.y[index], target)
    epoch = torch.cat([index for index, _ in method.seen[: n // 8]])
    assert sorted(epoch.tolist()) == list(range(n))  # every sample once per epoch, shuffled
    assert epoch.tolist() != list(range(n))


# --- variants: the same method with other defaults, a row of its own


def test_a_variant_is_registered_with_its_own_defaults():
    plain, ls = METHODS.get("vanilla_kd"), METHODS.get("vanilla_kd+ls")
    assert issubclass(ls, plain) and ls.name == "vanilla_kd+ls" and ls.variant_of == "vanilla_kd"
    assert ls.version == plain.version
    assert (ls.Config().temperature, ls.Config().kd_weight, ls.Config().logit_standardization) == (2.0, 9.0, True)
    assert (plain.Config().temperature, plain.Config().logit_standardization) == (4.0, False)
    assert validate_config(ls, {"temperature": 3.0}).logit_standardization  # overrides keep the variant's others


def test_a_variant_runs_in_every_all_methods_suite_and_an_excluded_method_does_not():
    raw = {"name": "s", "tier": "cpu", "seeds": [0], "all_methods": True, "excluded": {"fitnets": "why"},
           "tracks": {"digits": {"pairs": [{"teacher": "cnn2d_w8", "student": "cnn2d_w4"}],
                                 "train": {"epochs": 1, "batch_size": 8, "lr": 0.01}}}}
    methods = {spec.method for spec in expand(Suite.model_validate(raw))}
    assert "vanilla_kd+ls" in methods and "vanilla_kd" in methods and "fitnets" not in methods


@pytest.mark.parametrize(("name", "defaults", "message"), [
    ("vanilla_kd_ls", {"temperature": 2.0}, "must be named vanilla_kd\\+<tag>"),
    ("vanilla_kd+ls", {"temprature": 2.0}, "no field 'temprature'"),
    ("vanilla_kd+ls", {"temperature": -1.0}, "temperature"),
])
def test_bad_variants_are_refused(name, defaults, message):
    with pytest.raises(KdbenchError, match=message):
        _variant(METHODS.get("vanilla_kd"), name, defaults)


# --- logit standardization


def test_standardized_by_hand():
    z = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    mean, std = 3.0, math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 3)  # Bessel's correction
    expected = [(v - mean) / (1e-7 + std) for v in (1.0, 2.0, 3.0, 6.0)]
    assert standardized(z)[0].tolist() == pytest.approx(expected, rel=1e-6)


def test_standardized_kd_is_invariant_to_each_samples_logit_scale_and_shift():
    torch.manual_seed(0)
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    scale, shift = torch.tensor([[0.5], [2.0], [3.0], [10.0]]), torch.tensor([[1.0], [-4.0], [0.0], [7.0]])
    base = kd_loss(s, t, 2.0, standardize=True)
    assert kd_loss(s * scale + shift, t * scale.flip(0) - shift, 2.0, standardize=True).item() == pytest.approx(
        base.item(), rel=1e-5)
    assert kd_loss(s * scale, t, 2.0).item() != pytest.approx(kd_loss(s, t, 2.0).item(), rel=1e-2)


def test_the_option_off_leaves_existing_configs_and_their_hash_unchanged():
    dumped = METHODS.get("vanilla_kd").Config().model_dump(mode="json")
    assert dumped == {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}
    assert sha256_of(dumped) == sha256_of({"ce_weight": 0.1, "kd_weight": 0.9, "temperature": 4.0})
    assert METHODS.get("vanilla_kd+ls").Config().model_dump(mode="json")["logit_standardization"] is True


def test_vanilla_kd_with_standardization_is_kd_on_z_scores():
    torch.manual_seed(1)
    s, t, y = torch.randn(5, 7), torch.randn(5, 7), torch.arange(5)
    cls = METHODS.get("vanilla_kd+ls")
    method: Method = cls(cls.Config(), {}, {})
    z = lambda v: (v - v.mean(1, keepdim=True)) / (1e-7 + v.std(1, keepdim=True))  # noqa: E731
    expected = 9.0 * 4.0 * torch.nn.functional.kl_div(torch.log_softmax(z(s) / 2, 1), torch.softmax(z(t) / 2, 1),
                                                      reduction="batchmean")
    assert method.loss({"logits": s}, {"logits": t}, y, 0.5)["kd"].item() == pytest.approx(expected.item(), rel=1e-5)
