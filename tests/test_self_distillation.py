"""Self-distillation (BYOT, Zhang et al. 2019): loss terms against explicit math, shapes, errors, the real loop."""

import math

import pytest
import torch

from kdbench.config import TrainConfig
from kdbench.errors import KdbenchError
from kdbench.taps import FeatureTaps, probe_shapes
from kdbench.method import METHODS, validate_config
from kdbench.models import create_model
from kdbench.tracks import Split, TrackData
from kdbench.train import fit

# The embedding (the classifier's input) is the flattened deepest map, as on the CPU tracks' convnets.
SHAPES_1D = {"logits": (3,), "stage:0": (4, 8), "stage:1": (6, 4), "stage:-1": (8, 2), "embedding": (16,)}
SHAPES_2D = {"logits": (3,), "stage:0": (4, 8, 8), "stage:1": (6, 4, 4), "stage:-1": (8, 2, 2), "embedding": (32,)}


def make(shapes, **overrides):
    torch.manual_seed(0)
    cls = METHODS.get("self_distillation")
    return cls(validate_config(cls, overrides), shapes, {})


def random_taps(shapes, batch=4):
    """Fixed tensors; stage features non-negative, as after a ReLU."""
    g = torch.Generator().manual_seed(1)
    taps = {tap: torch.randn(batch, *shape, generator=g) for tap, shape in shapes.items()}
    return {tap: v if tap == "logits" else v.relu() for tap, v in taps.items()}


def log_softmax(row, t=1.0):
    m = max(v / t for v in row)
    lse = m + math.log(sum(math.exp(v / t - m) for v in row))
    return [v / t - lse for v in row]


def hand_ce(z, y):
    return sum(-log_softmax(row)[label] for row, label in zip(z.tolist(), y.tolist())) / len(y)


def hand_kl(z_student, z_teacher, t):
    total = 0.0
    for s_row, t_row in zip(z_student.tolist(), z_teacher.tolist()):
        log_s, log_t = log_softmax(s_row, t), log_softmax(t_row, t)
        total += sum(math.exp(lt) * (lt - ls) for lt, ls in zip(log_t, log_s))
    return t * t * total / len(z_student)


@pytest.mark.parametrize("shapes", [SHAPES_1D, SHAPES_2D], ids=["C,L", "C,H,W"])
def test_terms_match_explicit_math(shapes):
    alpha, t, lam = 0.3, 2.0, 0.01
    method = make(shapes, alpha=alpha, temperature=t, hint_weight=lam)
    taps, y = random_taps(shapes), torch.tensor([0, 1, 2, 1])
    terms = method.loss(taps, None, y, 0.0)
    deep_feature = taps["stage:-1"].flatten(2).mean(2)
    ce = kd = hint = 0.0
    with torch.no_grad():
        for i, (head, classifier) in enumerate(zip(method.bottlenecks, method.classifiers)):
            feature = head(taps[f"stage:{i}"])
            q = classifier(feature)
            ce += hand_ce(q, y)
            kd += hand_kl(q, taps["logits"], t)
            hint += sum((a - b) ** 2 for ra, rb in zip(feature.tolist(), deep_feature.tolist()) for a, b in zip(ra, rb))
    assert terms["ce"].item() == pytest.approx((1 - alpha) * hand_ce(taps["logits"], y), rel=1e-5)
    assert terms["aux_ce"].item() == pytest.approx((1 - alpha) * ce, rel=1e-5)
    assert terms["kd"].item() == pytest.approx(alpha * kd, rel=1e-5)
    assert terms["hint"].item() == pytest.approx(lam * hint, rel=1e-5)


@pytest.mark.parametrize("shapes", [SHAPES_1D, SHAPES_2D], ids=["C,L", "C,H,W"])
def test_heads_map_each_stage_to_the_deepest_width(shapes):
    method = make(shapes)
    taps = random_taps(shapes)
    for i, head in enumerate(method.bottlenecks):
        assert head(taps[f"stage:{i}"]).shape == (4, shapes["stage:-1"][0])


def test_the_deepest_classifier_and_feature_are_detached_targets():
    method = make(SHAPES_1D, alpha=0.5, hint_weight=1.0)
    taps = {k: v.requires_grad_(True) for k, v in random_taps(SHAPES_1D).items()}
    terms = method.loss(taps, None, torch.tensor([0, 1, 2, 1]), 0.0)
    (terms["kd"] + terms["hint"]).backward()
    assert taps["logits"].grad is None and taps["stage:-1"].grad is None
    assert torch.any(taps["stage:0"].grad != 0) and torch.any(taps["stage:1"].grad != 0)


def test_taps_and_no_teacher():
    cls = METHODS.get("self_distillation")
    assert cls.needs_teacher is False
    assert cls.taps(cls.Config(stages=(1,))) == (("logits", "stage:1", "stage:-1", "embedding"), ())


@pytest.mark.parametrize("name", ["wrn_16_2", "resnet8x4", "vgg8"])
def test_the_deepest_feature_is_the_classifier_input_on_the_zoo(name):
    """BYOT's F_C is what the deepest classifier reads: on a WRN that is GAP(ReLU(BN(stage:-1))), not GAP(stage:-1)."""
    torch.manual_seed(0)
    student, x = create_model(name).eval(), torch.randn(2, 3, 32, 32)
    cls = METHODS.get("self_distillation")
    config = cls.Config(stages=(1,), hint_weight=1.0)
    taps = cls.taps(config)[0]
    method = cls(config, probe_shapes(student, taps, x), {})
    assert method.deep_is_embedding
    with torch.no_grad():
        out = FeatureTaps(student, taps)(x)
        feature = method.bottlenecks[0](out["stage:1"])
        hint = method.loss(out, None, torch.tensor([0, 1]), 0.0)["hint"]
        head = student.classifier if name.startswith("vgg") else student.fc
        torch.testing.assert_close(head(out["embedding"]), out["logits"])
        assert hint.item() == pytest.approx((feature - out["embedding"]).pow(2).sum().item(), rel=1e-5)
        if name.startswith("wrn"):
            assert hint.item() != pytest.approx((feature - out["stage:-1"].mean((2, 3))).pow(2).sum().item(), rel=1e-3)


def test_heads_stay_outside_the_student():
    torch.manual_seed(0)
    student, x = create_model("cnn1d_w4"), torch.randn(2, 1, 40)
    cls = METHODS.get("self_distillation")
    config = cls.Config()
    method = cls(config, probe_shapes(student, cls.taps(config)[0], x), {})
    assert len(method.bottlenecks) == 2
    assert not any(k.startswith(("bottlenecks", "classifiers")) for k in student.state_dict())


def test_a_stage_the_model_lacks_is_a_clear_error():
    cls = METHODS.get("self_distillation")
    with pytest.raises(KdbenchError, match="stage"):
        probe_shapes(create_model("cnn1d_w4"), cls.taps(cls.Config(stages=(7,)))[0], torch.randn(2, 1, 40))


def test_flat_features_are_refused():
    with pytest.raises(KdbenchError, match=r"\(C, L\) or \(C, H, W\)"):
        make({"logits": (3,), "stage:0": (16,), "stage:1": (16,), "stage:-1": (16,), "embedding": (16,)})


@pytest.mark.parametrize(
    "field, value",
    [("alpha", 1.5), ("alpha", -0.1), ("temperature", 0.0), ("hint_weight", -1e-6), ("stages", ()),
     ("stages", (0, 0)), ("stages", (0, -1)), ("beta", 1.0)],
)
def test_bad_hyperparameters_name_the_field(field, value):
    with pytest.raises(KdbenchError, match=f"method self_distillation: {field}"):
        validate_config(METHODS.get("self_distillation"), {field: value})


def test_one_epoch_in_the_real_loop():
    torch.manual_seed(0)
    student = create_model("cnn1d_w4")
    g = torch.Generator().manual_seed(0)
    split = lambda n: Split(torch.randn(n, 1, 40, generator=g), torch.randint(0, 10, (n,), generator=g))  # noqa: E731
    data = TrackData(split(16), split(8), split(8), num_classes=10, in_shape=(1, 40))
    cls = METHODS.get("self_distillation")
    config = cls.Config()
    method = cls(config, probe_shapes(student, cls.taps(config)[0], data.train.x), {})
    before = [p.clone() for p in method.parameters()]
    history = fit(student, method, None, data, TrainConfig(epochs=1, batch_size=8, lr=0.01), seed=0)
    assert {"train_ce", "train_aux_ce", "train_kd", "train_hint"} <= history[0].keys()
    assert all(math.isfinite(v) for v in history[0].values())
    assert any(not torch.equal(a, b) for a, b in zip(before, method.parameters()))
