"""Vanilla KD against values computed by hand (plain math, no torch loss functions)."""

import math

import pytest
import torch

from kdbench.method import METHODS, validate_config
from kdbench.errors import KdbenchError


def softmax(z, t):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def hand_kd(zs, zt, y, t, ce_w, kd_w):
    ce = kl = 0.0
    for s_row, t_row, label in zip(zs, zt, y):
        ce += -math.log(softmax(s_row, 1)[label])
        p_t, p_s = softmax(t_row, t), softmax(s_row, t)
        kl += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
    n = len(y)
    return ce_w * ce / n, kd_w * t * t * kl / n


ZS = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
ZT = [[2.0, 1.0, 0.0], [0.5, 0.5, 4.0]]
Y = [1, 2]


def _loss(**overrides):
    cls = METHODS.get("vanilla_kd")
    method = cls(validate_config(cls, overrides), {}, {})
    return method.loss({"logits": torch.tensor(ZS)}, {"logits": torch.tensor(ZT)}, torch.tensor(Y), 0.0)


@pytest.mark.parametrize("t, ce_w, kd_w", [(4.0, 0.1, 0.9), (1.0, 0.5, 0.5), (20.0, 0.0, 1.0)])
def test_matches_hand_computation(t, ce_w, kd_w):
    terms = _loss(temperature=t, ce_weight=ce_w, kd_weight=kd_w)
    ce, kd = hand_kd(ZS, ZT, Y, t, ce_w, kd_w)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert terms["kd"].item() == pytest.approx(kd, rel=1e-5)


def test_defaults_are_repdistiller():
    terms = _loss()
    # T=4, CE 0.1, KD 0.9 on the tensors above, worked out with hand_kd: CE 0.265126, KL 0.0141225.
    assert terms["ce"].item() == pytest.approx(0.1 * 0.265126, rel=1e-5)
    assert terms["kd"].item() == pytest.approx(0.9 * 16 * 0.0141225, rel=1e-5)


def test_identical_logits_give_zero_kd():
    cls = METHODS.get("vanilla_kd")
    method = cls(cls.Config(), {}, {})
    z = torch.tensor(ZS)
    assert method.loss({"logits": z}, {"logits": z}, torch.tensor(Y), 0.0)["kd"].item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("field, value", [("temperature", -1.0), ("temperature", 0.0), ("kd_weight", -0.5), ("alpha", 1.0)])
def test_bad_hyperparameters_name_the_field(field, value):
    with pytest.raises(KdbenchError, match=f"method vanilla_kd: {field}"):
        validate_config(METHODS.get("vanilla_kd"), {field: value})
