"""DIST against numpy's Pearson correlation (np.corrcoef) and a hand-worked example, and against an independent
re-implementation of DIST_KD's ``DIST`` loss in value and gradient."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.method import METHODS, validate_config

from conftest import CRD_PAIRS, zoo_step


def build(**overrides):
    cls = METHODS.get("dist")
    return cls(validate_config(cls, overrides), {"logits": (0,)}, {"logits": (0,)})


def np_softmax(z, t):
    e = np.exp(z / t - (z / t).max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def np_dist(zs, zt, y, t):
    """(inter, intra, CE) with numpy's correlation coefficient, τ² included, unweighted."""
    ys, yt = np_softmax(zs, t), np_softmax(zt, t)
    inter = 1 - np.mean([np.corrcoef(ys[b], yt[b])[0, 1] for b in range(len(ys))])
    intra = 1 - np.mean([np.corrcoef(ys[:, k], yt[:, k])[0, 1] for k in range(ys.shape[1])])
    ce = np.mean([np.log(np.exp(row).sum()) - row[label] for row, label in zip(zs, y)])
    return t * t * inter, t * t * intra, ce


def loss_on(zs, zt, y, **overrides):
    as64 = dict(dtype=torch.float64)  # float64: the hand example has constant columns, exact only in high precision
    return build(**overrides).loss({"logits": torch.tensor(zs, **as64)}, {"logits": torch.tensor(zt, **as64)},
                                   torch.tensor(y), 0.5)


@pytest.mark.parametrize("t, beta, gamma, ce_w", [(4.0, 2.0, 2.0, 1.0), (1.0, 1.0, 0.5, 0.1), (2.5, 0.0, 3.0, 0.0)])
def test_matches_numpy_corrcoef(t, beta, gamma, ce_w):
    g = np.random.default_rng(0)
    zs, zt = 3 * g.standard_normal((6, 5)), 3 * g.standard_normal((6, 5))
    y = [0, 1, 2, 3, 4, 0]
    terms = loss_on(zs, zt, y, temperature=t, beta=beta, gamma=gamma, ce_weight=ce_w)
    inter, intra, ce = np_dist(zs, zt, y, t)
    assert set(terms) == {"ce", "inter", "intra"}
    assert terms["inter"].item() == pytest.approx(beta * inter, rel=1e-5, abs=1e-12)
    assert terms["intra"].item() == pytest.approx(gamma * intra, rel=1e-5, abs=1e-12)
    assert terms["ce"].item() == pytest.approx(ce_w * ce, rel=1e-5, abs=1e-12)


def test_hand_worked_example():
    # τ = 1, 2 samples × 3 classes. Logits ln of the probabilities wanted:
    #   Y_s = [[1/2, 1/4, 1/4], [1/4, 1/2, 1/4]],  Y_t = [[1/2, 1/3, 1/6], [1/6, 1/3, 1/2]].
    # Inter, sample 0: deviations s = [1/6, −1/12, −1/12] ∝ [2, −1, −1], t ∝ [1, 0, −1] → ρ = 3 / (√6·√2) = √3/2.
    #   sample 1: s ∝ [−1, 2, −1], t ∝ [−1, 0, 1] → ρ = 0.  inter = 1 − (√3/2 + 0)/2.
    # Intra, class 0: s = [1/2, 1/4] vs t = [1/2, 1/6] (same direction) → ρ = 1; class 1: s = [1/4, 1/2] vs
    #   t = [1/3, 1/3], constant → ρ = 0 (ε); class 2: s = [1/4, 1/4] constant → 0.  intra = 1 − 1/3 = 2/3.
    ys = [[1 / 2, 1 / 4, 1 / 4], [1 / 4, 1 / 2, 1 / 4]]
    yt = [[1 / 2, 1 / 3, 1 / 6], [1 / 6, 1 / 3, 1 / 2]]
    zs = [[math.log(p) for p in row] for row in ys]
    zt = [[math.log(p) for p in row] for row in yt]
    terms = loss_on(zs, zt, [0, 1], temperature=1.0, beta=1.0, gamma=1.0)
    assert terms["inter"].item() == pytest.approx(1 - math.sqrt(3) / 4, rel=1e-5)
    assert terms["intra"].item() == pytest.approx(2 / 3, rel=1e-5)
    assert terms["ce"].item() == pytest.approx((math.log(2) + math.log(2)) / 2, rel=1e-5)


def ref_dist(z_s, z_t, y, beta, gamma, tau, ce_w):
    """DIST_KD's loss: cosine similarity of mean-centred rows with ε = 1e-8 added to the norms' product."""

    def pearson_rows(a, b):
        a = a - a.mean(dim=1).unsqueeze(1)
        b = b - b.mean(dim=1).unsqueeze(1)
        return torch.einsum("ij,ij->i", a, b) / (torch.sqrt((a * a).sum(1)) * torch.sqrt((b * b).sum(1)) + 1e-8)

    p_s, p_t = torch.exp(F.log_softmax(z_s / tau, 1)), torch.exp(F.log_softmax(z_t / tau, 1))
    inter = 1 - pearson_rows(p_s, p_t).mean()
    intra = 1 - pearson_rows(p_s.T.contiguous(), p_t.T.contiguous()).mean()
    ce = F.nll_loss(F.log_softmax(z_s, 1), y)
    return ce_w * ce + tau**2 * (beta * inter + gamma * intra)


@pytest.mark.parametrize("overrides", [{}, {"temperature": 1.0, "beta": 1.0, "gamma": 0.5, "ce_weight": 0.2}])
@pytest.mark.parametrize("b, k", [(16, 10), (8, 100), (2, 3)])
def test_matches_reference_value_and_gradient(overrides, b, k):
    g = torch.Generator().manual_seed(b * k)
    z_s = (2 * torch.randn(b, k, generator=g, dtype=torch.float64)).requires_grad_()
    z_t = 2 * torch.randn(b, k, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (b,), generator=g)
    method = build(**overrides).double()
    c = method.config
    ours = sum(method.loss({"logits": z_s}, {"logits": z_t}, y, 0.5).values())
    ref = ref_dist(z_s, z_t, y, c.beta, c.gamma, c.temperature, c.ce_weight)
    (g_ours,), (g_ref,) = torch.autograd.grad(ours, z_s), torch.autograd.grad(ref, z_s)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-10)


def test_identical_logits_leave_only_the_epsilon():
    # ρ(u, u) = ‖u − ū‖² / (‖u − ū‖² + ε): the loss is τ²·β·mean(ε / (‖u − ū‖² + ε)), tiny but not 0 (DIST_KD's ε).
    z = torch.randn(6, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    terms = build().loss({"logits": z}, {"logits": z.clone()}, torch.arange(6), 0.5)
    y = np_softmax(z.numpy(), 4.0)
    for term, rows in (("inter", y), ("intra", y.T)):
        sq = ((rows - rows.mean(1, keepdims=True)) ** 2).sum(1)
        assert terms[term].item() == pytest.approx(2.0 * 16.0 * np.mean(1e-8 / (sq + 1e-8)), rel=1e-6)
        assert terms[term].item() < 1e-3


def test_one_sample_has_a_constant_intra_term_without_gradient():
    z_s = torch.randn(1, 10, generator=torch.Generator().manual_seed(4), requires_grad=True)
    z_t = torch.randn(1, 10, generator=torch.Generator().manual_seed(5))
    terms = build().loss({"logits": z_s}, {"logits": z_t}, torch.tensor([3]), 0.5)
    assert terms["intra"].item() == pytest.approx(2.0 * 16.0, rel=1e-6)  # γ · τ² · (1 − 0)
    (grad,) = torch.autograd.grad(terms["intra"], z_s)
    assert grad.abs().max().item() < 1e-6


def test_defaults_are_dist_kd_cifar():
    c = METHODS.get("dist").Config()
    assert (c.ce_weight, c.beta, c.gamma, c.temperature) == (1.0, 2.0, 2.0, 4.0)


def test_temperature_changes_the_softening_and_the_scale():
    g = np.random.default_rng(1)
    zs, zt, y = 2 * g.standard_normal((5, 7)), 2 * g.standard_normal((5, 7)), [0, 1, 2, 3, 4]
    for t in (1.0, 4.0):
        inter, intra, _ = np_dist(zs, zt, y, t)
        terms = loss_on(zs, zt, y, temperature=t)
        assert terms["inter"].item() == pytest.approx(2 * inter, rel=1e-5)
        assert terms["intra"].item() == pytest.approx(2 * intra, rel=1e-5)
    assert loss_on(zs, zt, y, temperature=1.0)["inter"].item() != pytest.approx(
        loss_on(zs, zt, y, temperature=4.0)["inter"].item() / 16, rel=1e-3)


@pytest.mark.parametrize("field, value", [
    ("temperature", 0.0), ("temperature", -2.0), ("beta", -1.0), ("gamma", -0.1), ("ce_weight", -1.0),
    ("logit_standardization", True), ("alpha", 1.0)])
def test_bad_hyperparameters_name_the_field(field, value):
    with pytest.raises(KdbenchError, match=f"method dist: {field}"):
        validate_config(METHODS.get("dist"), {field: value})


@pytest.mark.parametrize("teacher_name, student_name", CRD_PAIRS)
def test_one_step_on_the_crd_zoo(teacher_name, student_name):
    run = zoo_step("dist", teacher_name, student_name, [0, 57, 99], train_size=50000, progress=0.5)
    student, terms = run.student, run.terms
    total = sum(terms.values())
    assert torch.isfinite(total) and terms["inter"].item() > 0 and terms["intra"].item() > 0
    total.backward()
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
