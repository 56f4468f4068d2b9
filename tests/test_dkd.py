"""DKD against a hand computation in plain Python, against an independent re-implementation of mdistiller's
``dkd_loss`` (−1000 mask, log of summed probabilities) in value and gradient, with and without logit
standardization (the ``dkd+ls`` row), and the paper's identity KD = TCKD + (1 − p_t^y)·NCKD."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.method import METHODS, validate_config

from conftest import CRD_PAIRS, zoo_step


def build(name="dkd", **overrides):
    cls = METHODS.get(name)
    return cls(validate_config(cls, overrides), {"logits": (0,)}, {"logits": (0,)})


# ---------------------------------------------------------------- plain-Python hand computation


def softmax(z, t):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def hand_dkd(zs, zt, y, t):
    """Batch means of TCKD and NCKD (T² included) and of CE, written out from the paper's definitions."""
    tckd = nckd = ce = 0.0
    for s_row, t_row, label in zip(zs, zt, y):
        p_s, p_t = softmax(s_row, t), softmax(t_row, t)
        tckd += kl([p_t[label], 1 - p_t[label]], [p_s[label], 1 - p_s[label]])
        hat_s = softmax([v for k, v in enumerate(s_row) if k != label], t)
        hat_t = softmax([v for k, v in enumerate(t_row) if k != label], t)
        nckd += kl(hat_t, hat_s)
        ce += -math.log(softmax(s_row, 1)[label])
    n = len(y)
    return t * t * tckd / n, t * t * nckd / n, ce / n


ZS = [[1.0, 2.0, 0.5, -1.0], [0.0, -1.0, 3.0, 0.5]]
ZT = [[2.0, 1.0, 0.0, 0.5], [0.5, 0.5, 4.0, -2.0]]
Y = [1, 2]


def terms_on(zs, zt, y, progress=1.0, name="dkd", **overrides):
    return build(name, **overrides).loss({"logits": torch.tensor(zs)}, {"logits": torch.tensor(zt)},
                                        torch.tensor(y), progress)


@pytest.mark.parametrize("t, alpha, beta, ce_w", [(4.0, 1.0, 8.0, 1.0), (1.0, 0.5, 2.0, 0.1), (2.0, 9.0, 72.0, 0.0)])
def test_matches_hand_computation(t, alpha, beta, ce_w):
    terms = terms_on(ZS, ZT, Y, temperature=t, alpha=alpha, beta=beta, ce_weight=ce_w)
    tckd, nckd, ce = hand_dkd(ZS, ZT, Y, t)
    assert terms["tckd"].item() == pytest.approx(alpha * tckd, rel=1e-5)
    assert terms["nckd"].item() == pytest.approx(beta * nckd, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(ce_w * ce, rel=1e-5, abs=1e-12)
    assert set(terms) == {"ce", "tckd", "nckd"}


def test_hand_worked_two_class_example():
    # 1 sample, 3 classes, T = 1, target 0. Student [0, 0, 0]: p_s = 1/3 each, b_s = [1/3, 2/3], p̂_s = [1/2, 1/2].
    # Teacher [ln 2, 0, 0]: p_t = [1/2, 1/4, 1/4], b_t = [1/2, 1/2], p̂_t = [1/2, 1/2].
    # TCKD = ½ ln(½ / ⅓) + ½ ln(½ / ⅔) = ½ ln(3/2) + ½ ln(3/4) = ½ ln(9/8); NCKD = 0.  CE = ln 3.
    terms = terms_on([[0.0, 0.0, 0.0]], [[math.log(2), 0.0, 0.0]], [0], temperature=1.0)
    assert terms["tckd"].item() == pytest.approx(0.5 * math.log(9 / 8), rel=1e-6)
    assert terms["nckd"].item() == pytest.approx(0.0, abs=1e-7)
    assert terms["ce"].item() == pytest.approx(math.log(3), rel=1e-6)


def test_kd_decomposes_into_tckd_and_weighted_nckd():
    """Zhao et al. Eq. (5): KL(p_t ‖ p_s) = TCKD + (1 − p_t^y) · NCKD, per sample."""
    g = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(1, 7, generator=g, dtype=torch.float64), torch.randn(1, 7, generator=g, dtype=torch.float64)
    y, t = torch.tensor([4]), 3.0
    terms = build(temperature=t, alpha=1.0, beta=1.0).double().loss({"logits": zs}, {"logits": zt}, y, 1.0)
    p_t = F.softmax(zt / t, 1)
    kd = t * t * (p_t * (F.log_softmax(zt / t, 1) - F.log_softmax(zs / t, 1))).sum()
    assert (terms["tckd"] + (1 - p_t[0, 4]) * terms["nckd"]).item() == pytest.approx(kd.item(), rel=1e-10)


def test_identical_logits_give_zero_distillation():
    z = torch.randn(5, 10, generator=torch.Generator().manual_seed(1))
    terms = build().loss({"logits": z}, {"logits": z.clone()}, torch.arange(5), 1.0)
    assert terms["tckd"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["nckd"].item() == pytest.approx(0.0, abs=1e-6)


def test_two_classes_have_no_non_target_term():
    terms = terms_on([[1.0, -1.0], [0.3, 2.0]], [[2.0, 0.0], [-1.0, 1.0]], [0, 1])
    assert terms["nckd"].item() == 0.0
    assert terms["tckd"].item() > 0


# ---------------------------------------------------------------- independent re-implementation of mdistiller


def ref_standardize(z):
    return (z - z.mean(-1, keepdim=True)) / (1e-7 + z.std(-1, keepdim=True))


def ref_dkd(z_s, z_t, y, alpha, beta, t, ce_w, epoch_ramp, stand=False):
    """mdistiller ``dkd_loss`` as published: masks, log of summed probabilities, the −1000 offset, kl_div sums / B;
    with ``stand`` the logit-standardization repo's ``normalize`` first."""
    if stand:
        zs_kd, zt_kd = ref_standardize(z_s), ref_standardize(z_t)
    else:
        zs_kd, zt_kd = z_s, z_t
    n = y.shape[0]
    gt = F.one_hot(y, z_s.shape[1]).to(z_s.dtype)
    other = 1 - gt
    ps, pt = torch.softmax(zs_kd / t, 1), torch.softmax(zt_kd / t, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * other).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * other).sum(1)], 1)
    tckd = (bt * (bt.log() - bs.log())).sum() * t * t / n
    hat_t = torch.softmax(zt_kd / t - 1000.0 * gt, 1)
    log_hat_s = torch.log_softmax(zs_kd / t - 1000.0 * gt, 1)
    nckd = torch.where(hat_t > 0, hat_t * (hat_t.clamp_min(1e-300).log() - log_hat_s), 0.0).sum() * t * t / n
    ce = -torch.log_softmax(z_s, 1).gather(1, y[:, None]).mean()
    return ce_w * ce + epoch_ramp * (alpha * tckd + beta * nckd)


@pytest.mark.parametrize("name, overrides", [
    ("dkd", {}),
    ("dkd", {"temperature": 2.5, "alpha": 0.7, "beta": 6.0, "ce_weight": 0.3}),
    ("dkd", {"logit_standardization": True}),
    ("dkd+ls", {}),
])
@pytest.mark.parametrize("k", [10, 100])
def test_matches_reference_value_and_gradient(name, overrides, k):
    g = torch.Generator().manual_seed(k)
    z_s = (3 * torch.randn(16, k, generator=g, dtype=torch.float64)).requires_grad_()
    z_t = 3 * torch.randn(16, k, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (16,), generator=g)
    method = build(name, **overrides).double()
    c = method.config
    progress = 0.5 * c.warmup_fraction  # halfway through the warm-up: ramp ½
    ours = sum(method.loss({"logits": z_s}, {"logits": z_t}, y, progress).values())
    ref = ref_dkd(z_s, z_t, y, c.alpha, c.beta, c.temperature, c.ce_weight, 0.5, c.logit_standardization)
    (g_ours,), (g_ref,) = torch.autograd.grad(ours, z_s), torch.autograd.grad(ref, z_s)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-10)


def test_ls_variant_is_the_reference_settings():
    cls = METHODS.get("dkd+ls")
    c = cls.Config()
    assert cls.variant_of == "dkd"
    # README: --logit-stand --base-temp 2 --kd-weight 9 ; train.py multiplies ALPHA 1 and BETA 8 by the kd weight.
    assert (c.logit_standardization, c.temperature, c.alpha, c.beta, c.ce_weight) == (True, 2.0, 9.0, 72.0, 1.0)
    assert c.warmup_fraction == pytest.approx(20 / 240)


def test_standardization_ignores_each_samples_logit_scale_and_shift():
    g = torch.Generator().manual_seed(5)
    z_s, z_t, y = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g), torch.arange(6)
    scale = torch.tensor([[0.5], [2.0], [3.0], [1.0], [7.0], [0.2]])
    ls, plain = build("dkd+ls"), build("dkd", temperature=2.0, alpha=9.0, beta=72.0)
    for method, invariant in ((ls, True), (plain, False)):
        a = method.loss({"logits": z_s}, {"logits": z_t}, y, 1.0)
        b = method.loss({"logits": scale * z_s + 4.0}, {"logits": z_t / scale - 1.0}, y, 1.0)
        for term in ("tckd", "nckd"):
            assert (a[term].item() == pytest.approx(b[term].item(), rel=1e-4)) is invariant
    # CE stays on the raw logits: it does change with the scale.
    a, b = (ls.loss({"logits": z}, {"logits": z_t}, y, 1.0)["ce"].item() for z in (z_s, 5 * z_s))
    assert a != pytest.approx(b, rel=1e-3)


# ---------------------------------------------------------------- config options


def test_defaults_are_mdistiller():
    c = METHODS.get("dkd").Config()
    assert (c.ce_weight, c.alpha, c.beta, c.temperature) == (1.0, 1.0, 8.0, 4.0)
    assert c.warmup_fraction == pytest.approx(20 / 240)
    assert not c.logit_standardization
    assert "logit_standardization" not in c.model_dump()  # off: left out of the resolved config


@pytest.mark.parametrize("progress, ramp", [(0.0, 0.0), (0.05, 0.5), (0.075, 0.75), (0.1, 1.0), (0.9, 1.0)])
def test_warmup_ramps_linearly_over_its_fraction(progress, ramp):
    full = terms_on(ZS, ZT, Y, 1.0, warmup_fraction=0.1)
    terms = terms_on(ZS, ZT, Y, progress, warmup_fraction=0.1)
    for term in ("tckd", "nckd"):
        assert terms[term].item() == pytest.approx(ramp * full[term].item(), rel=1e-6, abs=1e-12)
    assert terms["ce"].item() == pytest.approx(full["ce"].item(), rel=1e-7)  # CE is never ramped


def test_no_warmup_is_full_weight_from_the_start():
    start, end = terms_on(ZS, ZT, Y, 0.0, warmup_fraction=0.0), terms_on(ZS, ZT, Y, 1.0, warmup_fraction=0.0)
    assert start["nckd"].item() == pytest.approx(end["nckd"].item(), rel=1e-7) and start["nckd"].item() > 0


def test_default_warmup_ends_after_twenty_of_240_epochs():
    at = [terms_on(ZS, ZT, Y, e / 240)["tckd"].item() for e in (10, 20, 30)]
    assert at[0] == pytest.approx(0.5 * at[1], rel=1e-6) and at[1] == pytest.approx(at[2], rel=1e-7)


@pytest.mark.parametrize("field, value", [
    ("temperature", 0.0), ("temperature", -1.0), ("alpha", -1.0), ("beta", -0.5), ("ce_weight", -1.0),
    ("warmup_fraction", -0.1), ("warmup_fraction", 1.5), ("gamma", 1.0)])
def test_bad_hyperparameters_name_the_field(field, value):
    with pytest.raises(KdbenchError, match=f"method dkd: {field}"):
        validate_config(METHODS.get("dkd"), {field: value})


# ---------------------------------------------------------------- the CRD zoo


@pytest.mark.parametrize("name", ["dkd", "dkd+ls"])
@pytest.mark.parametrize("teacher_name, student_name", CRD_PAIRS)
def test_one_step_on_the_crd_zoo(name, teacher_name, student_name):
    run = zoo_step(name, teacher_name, student_name, [0, 57, 99], train_size=50000, progress=0.5)
    student, terms = run.student, run.terms
    total = sum(terms.values())
    assert torch.isfinite(total) and terms["nckd"].item() > 0
    total.backward()
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
