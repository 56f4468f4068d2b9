"""PKT against a worked example, a plain-Python computation, and an independent re-implementation of RepDistiller's
(the authors') ``PKT.cosine_similarity_loss`` (value and gradient in float64)."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from kdbench.errors import KdbenchError
from kdbench.method import METHODS, validate_config
from kdbench.taps import MASK

from conftest import CRD_PAIRS, embedding_method, zoo_step
from conftest import embedding_step as step

EPS = 1e-7
build = partial(embedding_method, "pkt")  # build(s_dim, t_dim, **overrides)


def python_pkt(f_s: list[list[float]], f_t: list[list[float]]) -> float:
    """Plain Python: unit vectors (norm + ε), kernel (cos + 1)/2, rows normalised, mean of P_t log((P_t+ε)/(P_s+ε))."""

    def probabilities(rows):
        units = [[x / (math.sqrt(sum(v * v for v in row)) + EPS) for x in row] for row in rows]
        kernel = [[(sum(a * b for a, b in zip(u, v)) + 1) / 2 for v in units] for u in units]
        return [[k / sum(row) for k in row] for row in kernel]

    p_s, p_t = probabilities(f_s), probabilities(f_t)
    b = len(f_s)
    return sum(p_t[i][j] * math.log((p_t[i][j] + EPS) / (p_s[i][j] + EPS)) for i in range(b) for j in range(b)) / b**2


def reference_pkt(output_net: torch.Tensor, target_net: torch.Tensor) -> torch.Tensor:
    """The reference ``cosine_similarity_loss``, step by step as published (NaN zeroing included)."""
    output_net = output_net / (torch.sqrt(torch.sum(output_net**2, dim=1, keepdim=True)) + EPS)
    output_net = torch.where(output_net != output_net, torch.zeros_like(output_net), output_net)
    target_net = target_net / (torch.sqrt(torch.sum(target_net**2, dim=1, keepdim=True)) + EPS)
    target_net = torch.where(target_net != target_net, torch.zeros_like(target_net), target_net)
    model_similarity = (torch.mm(output_net, output_net.transpose(0, 1)) + 1.0) / 2.0
    target_similarity = (torch.mm(target_net, target_net.transpose(0, 1)) + 1.0) / 2.0
    model_similarity = model_similarity / torch.sum(model_similarity, dim=1, keepdim=True)
    target_similarity = target_similarity / torch.sum(target_similarity, dim=1, keepdim=True)
    return torch.mean(target_similarity * torch.log((target_similarity + EPS) / (model_similarity + EPS)))


def test_hand_computed_example():
    # Student [1, 0], [0, 1]: cos 0 → kernel [[1, ½], [½, 1]] → P_s = [[⅔, ⅓], [⅓, ⅔]].
    # Teacher [1, 0], [1, 1]: cos 1/√2 → k = (1 + 1/√2)/2 off the diagonal → P_t rows (1, k)/(1 + k).
    # KL summed over the 4 entries = 2·(a ln(a/⅔) + c ln(c/⅓)), a = 1/(1+k), c = k/(1+k); mean = /4; × 30000.
    k = (1 + 1 / math.sqrt(2)) / 2
    a, c = 1 / (1 + k), k / (1 + k)
    expected = 30000 * 2 * (a * math.log(a / (2 / 3)) + c * math.log(c / (1 / 3))) / 4
    terms = step(build(2, 2), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    assert set(terms) == {"ce", "pkt"}
    assert terms["pkt"].item() == pytest.approx(expected, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(math.log(3), rel=1e-6)


@pytest.mark.parametrize("s_dim, t_dim, batch", [(8, 8, 4), (5, 12, 6), (16, 3, 2)])
def test_matches_plain_python(s_dim, t_dim, batch):
    g = torch.Generator().manual_seed(0)
    f_s = torch.randn(batch, s_dim, generator=g, dtype=torch.float64)  # float64: the KL is small, float32 rounding
    f_t = torch.randn(batch, t_dim, generator=g, dtype=torch.float64).relu()  # would be visible at rel 1e-5
    logits, y = torch.randn(batch, 3, generator=g, dtype=torch.float64), torch.arange(batch) % 3
    terms = step(build(s_dim, t_dim, beta=11.0, ce_weight=0.5), f_s, f_t, logits, y)
    assert terms["pkt"].item() == pytest.approx(11.0 * python_pkt(f_s.tolist(), f_t.tolist()), rel=1e-5)
    ce = sum(math.log(sum(math.exp(v) for v in row)) - row[t] for row, t in zip(logits.tolist(), y.tolist())) / batch
    assert terms["ce"].item() == pytest.approx(0.5 * ce, rel=1e-5)


@pytest.mark.parametrize("s_dim, t_dim", [(16, 16), (10, 40), (64, 8)])
def test_value_and_gradient_match_the_reference_in_float64(s_dim, t_dim):
    g = torch.Generator().manual_seed(1)
    f_s = torch.randn(7, s_dim, generator=g, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(7, t_dim, generator=g, dtype=torch.float64)
    method = build(s_dim, t_dim).double()
    ours = step(method, f_s, f_t)["pkt"]
    ref = 30000.0 * reference_pkt(f_s, f_t)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    (grad_ours,) = torch.autograd.grad(ours, f_s)
    (grad_ref,) = torch.autograd.grad(ref, f_s)
    assert grad_ref.abs().max() > 0
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-5, atol=1e-12)


def test_teacher_gets_no_gradient():
    g = torch.Generator().manual_seed(2)
    f_s = torch.randn(4, 6, generator=g, requires_grad=True)
    f_t = torch.randn(4, 9, generator=g, requires_grad=True)
    grad_s, grad_t = torch.autograd.grad(step(build(6, 9), f_s, f_t)["pkt"], (f_s, f_t), allow_unused=True)
    assert grad_s is not None and grad_s.abs().sum() > 0
    assert grad_t is None


def test_same_angles_give_zero_whatever_the_scale_and_width():
    # Cosine similarities are invariant to each sample's scale and to an orthogonal map into a wider space.
    g = torch.Generator().manual_seed(3)
    f_s = torch.randn(6, 5, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(9, 9, generator=g, dtype=torch.float64))
    scales = torch.rand(6, 1, generator=g, dtype=torch.float64) + 0.5
    f_t = torch.cat([f_s, torch.zeros(6, 4, dtype=torch.float64)], dim=1) @ q * scales
    assert step(build(5, 9).double(), f_s, f_t)["pkt"].item() == pytest.approx(0.0, abs=1e-8)
    assert step(build(5, 9).double(), f_s, f_t.flip(0))["pkt"].item() > 1e-3  # samples paired matter


def test_token_models_read_the_pooled_embedding():
    cls = METHODS.get("pkt")
    shapes = {"logits": (2,), "embedding": (8,), MASK: (5,)}
    method = cls(cls.Config(), shapes, shapes)
    f = torch.randn(3, 8, generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    terms = method.loss({"logits": torch.zeros(3, 2), "embedding": f, MASK: mask},
                        {"logits": torch.zeros(3, 2), "embedding": -f, MASK: mask}, torch.tensor([0, 1, 0]), 0.0)
    assert terms["pkt"].item() == pytest.approx(30000 * python_pkt(f.tolist(), (-f).tolist()), rel=1e-5)


def test_defaults_are_repdistiller():
    cls = METHODS.get("pkt")
    config = cls.Config()
    assert (config.beta, config.ce_weight) == (30000.0, 1.0)
    assert cls.taps(config) == (("logits", "embedding"),) * 2


@pytest.mark.parametrize("field, value", [("beta", -1.0), ("ce_weight", -0.5), ("eps", 1e-7)])
def test_bad_hyperparameters_name_the_field(field, value):
    with pytest.raises(KdbenchError, match=f"method pkt: {field}"):
        validate_config(METHODS.get("pkt"), {field: value})


@pytest.mark.parametrize("teacher_name, student_name", CRD_PAIRS)
def test_one_step_on_the_crd_zoo(teacher_name, student_name):
    run = zoo_step("pkt", teacher_name, student_name, [0, 5, 99], train_size=100, progress=0.5)
    student, terms = run.student, run.terms
    assert len(run.s_shapes["embedding"]) == 1
    total = sum(terms.values())
    assert torch.isfinite(total) and terms["pkt"].item() > 0
    total.backward()
    assert all(p.grad is not None for p in student.parameters())
