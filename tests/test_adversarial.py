"""Adversarial distillation (Xu et al. 2017): loss terms against explicit formulas, the alternation, the real loop."""

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

ZS = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
ZT = torch.tensor([[2.0, 1.0, 0.0], [0.5, 0.5, 4.0]])
Y = torch.tensor([1, 2])
SHAPES = {"logits": (3,)}


def make(**overrides):
    torch.manual_seed(0)
    cls = METHODS.get("adversarial")
    return cls(validate_config(cls, overrides), SHAPES, SHAPES)


def d_out(method, z, y, conditional=True):
    """D's raw output, with the conditioning input built by hand."""
    x = torch.cat([z, torch.eye(z.shape[1])[y]], dim=1) if conditional else z
    return method.adversary(x).squeeze(1)


def neg_log_sigmoid(d: torch.Tensor) -> float:
    return sum(-math.log(1 / (1 + math.exp(-v))) for v in d.tolist()) / len(d)


def neg_log_one_minus_sigmoid(d: torch.Tensor) -> float:
    return sum(-math.log(1 - 1 / (1 + math.exp(-v))) for v in d.tolist()) / len(d)


def hand_ce(z, y):
    return sum(-(row[t] - math.log(sum(math.exp(v) for v in row))) for row, t in zip(z.tolist(), y.tolist())) / len(y)


def hand_kd(zs, zt, t):
    kl = 0.0
    for s_row, t_row in zip(zs.tolist(), zt.tolist()):
        p_s = [math.exp(v / t) / sum(math.exp(u / t) for u in s_row) for v in s_row]
        p_t = [math.exp(v / t) / sum(math.exp(u / t) for u in t_row) for v in t_row]
        kl += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
    return t * t * kl / len(zs)


@pytest.mark.parametrize("conditional", [True, False])
def test_student_terms_match_explicit_formulas(conditional):
    w = {"ce_weight": 0.3, "adv_weight": 0.7, "l1_weight": 0.2, "kd_weight": 0.5, "temperature": 2.0}
    method = make(conditional=conditional, **w)
    terms = method.loss({"logits": ZS}, {"logits": ZT}, Y, 0.0)
    with torch.no_grad():
        d_s = d_out(method, ZS, Y, conditional)
    l1 = sum(abs(a - b) for ra, rb in zip(ZS.tolist(), ZT.tolist()) for a, b in zip(ra, rb)) / ZS.numel()
    assert terms["ce"].item() == pytest.approx(0.3 * hand_ce(ZS, Y), rel=1e-5)
    assert terms["l1"].item() == pytest.approx(0.2 * l1, rel=1e-5)
    assert terms["kd"].item() == pytest.approx(0.5 * hand_kd(ZS, ZT, 2.0), rel=1e-5)
    assert terms["adv"].item() == pytest.approx(0.7 * neg_log_sigmoid(d_s), rel=1e-5)


def test_discriminator_terms_match_explicit_formulas():
    method = make()
    terms = method.adversary_loss({"logits": ZS}, {"logits": ZT}, Y)
    with torch.no_grad():
        d_t, d_s = d_out(method, ZT, Y), d_out(method, ZS, Y)
    assert terms["real"].item() == pytest.approx(neg_log_sigmoid(d_t), rel=1e-5)
    assert terms["fake"].item() == pytest.approx(neg_log_one_minus_sigmoid(d_s), rel=1e-5)


def test_conditional_discriminator_sees_the_label():
    method = make()
    assert method.adversary[0].in_features == 6 and make(conditional=False).adversary[0].in_features == 3
    with torch.no_grad():
        assert not torch.allclose(method.discriminate(ZS, Y), method.discriminate(ZS, torch.tensor([0, 0])))


def test_generator_gradient_flows_through_the_discriminator_to_the_student_logits():
    method = make(ce_weight=0.0, l1_weight=0.0)
    z = ZS.clone().requires_grad_(True)
    sum(method.loss({"logits": z}, {"logits": ZT}, Y, 0.0).values()).backward()
    assert z.grad is not None and torch.any(z.grad != 0)
    assert method.student_side_parameters() == []  # D is never in the student optimizer


def test_adversary_step_changes_only_the_discriminator():
    torch.manual_seed(0)
    teacher, student = create_model("cnn1d_w8"), create_model("cnn1d_w4")
    teacher.eval().requires_grad_(False)
    x, y = torch.randn(8, 1, 40), torch.arange(8) % 10
    cls = METHODS.get("adversarial")
    method = cls(cls.Config(), probe_shapes(student, ["logits"], x), probe_shapes(teacher, ["logits"], x))
    s_out, t_out = FeatureTaps(student, ["logits"])(x), FeatureTaps(teacher, ["logits"])(x)
    before_s = [p.clone() for p in student.parameters()]
    before_d = [p.clone() for p in method.adversary.parameters()]
    optimizer = method.adversary_optimizer(method.adversary.parameters())
    terms = method.adversary_loss({"logits": s_out["logits"].detach()}, {"logits": t_out["logits"]}, y)
    sum(terms.values()).backward()
    optimizer.step()
    assert all(p.grad is None for p in student.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before_s, student.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(before_d, method.adversary.parameters()))


def test_mismatched_logits_are_refused():
    cls = METHODS.get("adversarial")
    with pytest.raises(KdbenchError, match="logits"):
        cls(cls.Config(), {"logits": (10,)}, {"logits": (100,)})


@pytest.mark.parametrize(
    "field, value",
    [("adv_weight", -1.0), ("ce_weight", -0.1), ("l1_weight", -2.0), ("kd_weight", -0.5), ("adversary_lr", 0.0),
     ("temperature", 0.0), ("hidden", 0), ("lr", 0.1)],
)
def test_bad_hyperparameters_name_the_field(field, value):
    with pytest.raises(KdbenchError, match=f"method adversarial: {field}"):
        validate_config(METHODS.get("adversarial"), {field: value})


def tiny_data() -> TrackData:
    g = torch.Generator().manual_seed(0)
    split = lambda n: Split(torch.randn(n, 1, 40, generator=g), torch.randint(0, 10, (n,), generator=g))  # noqa: E731
    return TrackData(split(16), split(8), split(8), num_classes=10, in_shape=(1, 40))


def test_one_epoch_in_the_real_loop():
    torch.manual_seed(0)
    teacher, student = create_model("cnn1d_w8"), create_model("cnn1d_w4")
    data = tiny_data()
    cls = METHODS.get("adversarial")
    x = data.train.x
    method = cls(cls.Config(), probe_shapes(student, ["logits"], x), probe_shapes(teacher, ["logits"], x))
    before_s = [p.clone() for p in student.parameters()]
    before_d = [p.clone() for p in method.adversary.parameters()]
    history = fit(student, method, teacher, data, TrainConfig(epochs=1, batch_size=8, lr=0.01), seed=0)
    row = history[0]
    assert {"train_adv", "train_adversary_real", "train_adversary_fake"} <= row.keys()
    assert all(math.isfinite(v) for v in row.values())
    assert all(not torch.equal(a, b) for a, b in zip(before_d, method.adversary.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before_s, student.parameters()))
