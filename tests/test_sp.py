"""Similarity-preserving KD against a worked example, a plain-Python computation, and an independent
re-implementation of RepDistiller's ``Similarity.similarity_loss`` (value and gradient in float64)."""

from __future__ import annotations

import math

import pytest
import torch

from kdbench.errors import KdbenchError
from kdbench.method import METHODS, validate_config
from kdbench.taps import MASK

from conftest import CRD_PAIRS, zoo_step


def build(s_shapes: dict, t_shapes: dict, **overrides):
    cls = METHODS.get("sp")
    stages = [int(tap.split(":")[1]) for tap in s_shapes if tap.startswith("stage:")]
    return cls(validate_config(cls, {"stages": stages, **overrides}), s_shapes, t_shapes)


def python_sp(f_s: list[list[float]], f_t: list[list[float]]) -> float:
    """The SP loss in plain Python: Gram matrices, rows divided by their L2 norms, mean squared difference."""

    def similarity(rows):
        gram = [[sum(a * b for a, b in zip(u, v)) for v in rows] for u in rows]
        return [[g / math.sqrt(sum(x * x for x in row)) for g in row] for row in gram]

    g_s, g_t = similarity(f_s), similarity(f_t)
    b = len(f_s)
    return sum((g_t[i][j] - g_s[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def python_ce(logits: torch.Tensor, target: torch.Tensor) -> float:
    rows = logits.tolist()
    return sum(math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(rows, target.tolist())) / len(rows)


def reference_sp(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """RepDistiller's ``similarity_loss``, written out from its description: per-sample flattening, Gram matrix,
    ``F.normalize`` of each row (x / max(‖x‖, 1e-12)), ‖G_t − G_s‖²_F / b²."""
    b = f_s.shape[0]
    q_s, q_t = f_s.reshape(b, -1), f_t.reshape(b, -1)
    g_s = torch.mm(q_s, q_s.t())
    g_t = torch.mm(q_t, q_t.t())
    g_s = g_s / torch.sqrt((g_s * g_s).sum(1, keepdim=True)).clamp(min=1e-12)
    g_t = g_t / torch.sqrt((g_t * g_t).sum(1, keepdim=True)).clamp(min=1e-12)
    return ((g_t - g_s) ** 2).view(-1, 1).sum(0)[0] / (b * b)


def test_hand_computed_example():
    # b = 2 vectors. Student [1, 0], [1, 1]: Gram [[1, 1], [1, 2]], rows over √2 and √5.
    # Teacher [1, 0], [0, 1]: Gram = I, already normalised.
    # G_t − G_s = [[1 − 1/√2, −1/√2], [−1/√5, 1 − 2/√5]]; the loss is the sum of squares over b² = 4, × beta 3000.
    # Logits [0, 0, 0]: CE = ln 3.
    method = build({"stage:-1": (2,)}, {"stage:-1": (2,)})
    f_s, f_t = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    terms = method.loss({"logits": torch.zeros(2, 3), "stage:-1": f_s}, {"stage:-1": f_t}, torch.tensor([0, 2]), 0.0)
    squares = (1 - 1 / math.sqrt(2)) ** 2 + 1 / 2 + 1 / 5 + (1 - 2 / math.sqrt(5)) ** 2
    assert set(terms) == {"ce", "sp"}
    assert terms["sp"].item() == pytest.approx(3000 * squares / 4, rel=1e-6)
    assert terms["ce"].item() == pytest.approx(math.log(3), rel=1e-6)


@pytest.mark.parametrize("s_shape, t_shape", [((3, 8), (5, 4)), ((3, 4, 4), (6, 2, 2)), ((7,), (4, 3, 3))])
def test_matches_plain_python(s_shape, t_shape):
    g = torch.Generator().manual_seed(0)
    f_s, f_t = torch.randn(5, *s_shape, generator=g), torch.randn(5, *t_shape, generator=g).relu()
    logits, y = torch.randn(5, 4, generator=g), torch.tensor([0, 3, 1, 2, 2])
    method = build({"stage:1": s_shape}, {"stage:1": t_shape}, beta=7.0, ce_weight=0.25)
    terms = method.loss({"logits": logits, "stage:1": f_s}, {"logits": logits, "stage:1": f_t}, y, 0.0)
    expected = python_sp(f_s.flatten(1).tolist(), f_t.flatten(1).tolist())
    assert terms["sp"].item() == pytest.approx(7.0 * expected, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(0.25 * python_ce(logits, y), rel=1e-5)


@pytest.mark.parametrize("s_shape, t_shape", [((4, 10), (8, 5)), ((3, 4, 4), (6, 8, 8)), ((16,), (32,))])
def test_value_and_gradient_match_the_reference_in_float64(s_shape, t_shape):
    g = torch.Generator().manual_seed(1)
    f_s = torch.randn(6, *s_shape, generator=g, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(6, *t_shape, generator=g, dtype=torch.float64)
    logits, y = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.arange(6) % 3
    method = build({"stage:-1": s_shape}, {"stage:-1": t_shape}).double()
    ours = method.loss({"logits": logits, "stage:-1": f_s}, {"stage:-1": f_t}, y, 0.0)["sp"]
    ref = 3000.0 * reference_sp(f_s, f_t)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    (grad_ours,) = torch.autograd.grad(ours, f_s)
    (grad_ref,) = torch.autograd.grad(ref, f_s)
    assert grad_ref.abs().max() > 0
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-5, atol=1e-12)


def test_teacher_gets_no_gradient():
    g = torch.Generator().manual_seed(2)
    f_s = torch.randn(4, 3, 5, generator=g, requires_grad=True)
    f_t = torch.randn(4, 6, 5, generator=g, requires_grad=True)
    terms = build({"stage:-1": (3, 5)}, {"stage:-1": (6, 5)}).loss(
        {"logits": torch.zeros(4, 2), "stage:-1": f_s}, {"stage:-1": f_t}, torch.zeros(4, dtype=torch.long), 0.0)
    grad_s, grad_t = torch.autograd.grad(terms["sp"], (f_s, f_t), allow_unused=True)
    assert grad_s is not None and grad_s.abs().sum() > 0
    assert grad_t is None


def test_same_similarities_give_zero_whatever_the_scale_and_width():
    # A teacher whose flattened features are 3 × the student's, padded with zeros, has the same normalised Gram
    # matrix: the loss is 0 although shapes and scales differ.
    f_s = torch.randn(5, 4, 6, generator=torch.Generator().manual_seed(3))
    f_t = torch.cat([3 * f_s.flatten(1), torch.zeros(5, 10)], dim=1)
    terms = build({"stage:-1": (4, 6)}, {"stage:-1": (34,)}).loss(
        {"logits": torch.zeros(5, 2), "stage:-1": f_s}, {"stage:-1": f_t}, torch.zeros(5, dtype=torch.long), 0.0)
    assert terms["sp"].item() == pytest.approx(0.0, abs=1e-6)


def test_stages_are_summed():
    g = torch.Generator().manual_seed(4)
    shapes = {"stage:-2": ((3, 8), (5, 8)), "stage:-1": ((4, 2, 2), (6, 2, 2))}
    feats = {tap: (torch.randn(4, *s, generator=g), torch.randn(4, *t, generator=g)) for tap, (s, t) in shapes.items()}
    method = build({tap: s for tap, (s, _) in shapes.items()}, {tap: t for tap, (_, t) in shapes.items()})
    assert method.config.stages == (-2, -1)
    terms = method.loss({"logits": torch.zeros(4, 2), **{tap: f for tap, (f, _) in feats.items()}},
                        {tap: f for tap, (_, f) in feats.items()}, torch.zeros(4, dtype=torch.long), 0.0)
    expected = sum(python_sp(f_s.flatten(1).tolist(), f_t.flatten(1).tolist()) for f_s, f_t in feats.values())
    assert terms["sp"].item() == pytest.approx(3000 * expected, rel=1e-5)


def test_hidden_states_leave_padding_out():
    # Token model: (L, H) hidden states with a mask; padded positions are zeroed before flattening, so changing
    # them changes nothing, and the loss is that of the flattened real tokens.
    g = torch.Generator().manual_seed(5)
    shapes_s = {"logits": (2,), "stage:-1": (4, 3), MASK: (4,)}
    shapes_t = {"logits": (2,), "stage:-1": (4, 5), MASK: (4,)}
    method = build(shapes_s, shapes_t)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    h_s, h_t = torch.randn(3, 4, 3, generator=g), torch.randn(3, 4, 5, generator=g)
    logits, y = torch.zeros(3, 2), torch.tensor([0, 1, 0])

    def sp(h_s, h_t):
        return method.loss({"logits": logits, "stage:-1": h_s, MASK: mask},
                           {"logits": logits, "stage:-1": h_t, MASK: mask}, y, 0.0)["sp"].item()

    zeroed_s, zeroed_t = h_s * mask[..., None], h_t * mask[..., None]
    expected = 3000 * python_sp(zeroed_s.flatten(1).tolist(), zeroed_t.flatten(1).tolist())
    assert sp(h_s, h_t) == pytest.approx(expected, rel=1e-5)
    noisy_s, noisy_t = h_s.clone(), h_t.clone()
    noisy_s[mask == 0] = 9.0
    noisy_t[mask == 0] = -4.0
    assert sp(noisy_s, noisy_t) == pytest.approx(expected, rel=1e-5)
    # without the mask (a feature map (C, L) of the same shape) the padding would count
    plain = build({"stage:-1": (4, 3)}, {"stage:-1": (4, 5)})
    assert plain.loss({"logits": logits, "stage:-1": noisy_s}, {"stage:-1": noisy_t}, y, 0.0)["sp"].item() != \
        pytest.approx(expected, rel=1e-3)


def test_token_model_needs_hidden_states():
    with pytest.raises(KdbenchError, match=r"sp: stage:-1 has student shape \(4, 3, 2\)"):
        build({"stage:-1": (4, 3, 2), MASK: (4,)}, {"stage:-1": (4, 5), MASK: (4,)})


def test_defaults_are_repdistiller():
    cls = METHODS.get("sp")
    config = cls.Config()
    assert (config.stages, config.beta, config.ce_weight) == ((-1,), 3000.0, 1.0)
    assert cls.taps(config) == (("logits", "stage:-1"),) * 2


@pytest.mark.parametrize("field, value", [("beta", -1.0), ("ce_weight", -0.5), ("stages", []), ("gamma", 1.0)])
def test_bad_hyperparameters_name_the_field(field, value):
    with pytest.raises(KdbenchError, match=f"method sp: {field}"):
        validate_config(METHODS.get("sp"), {field: value})


@pytest.mark.parametrize("teacher_name, student_name", CRD_PAIRS)
def test_one_step_on_the_crd_zoo(teacher_name, student_name):
    run = zoo_step("sp", teacher_name, student_name, [0, 5, 99], train_size=100, progress=0.5)
    student, terms = run.student, run.terms
    total = sum(terms.values())
    assert torch.isfinite(total) and terms["sp"].item() > 0
    total.backward()
    assert all(p.grad is not None for p in student.parameters())
