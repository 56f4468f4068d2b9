"""RKD against a worked example, a plain-Python computation, and an independent re-implementation of RepDistiller's
``RKDLoss`` (value and gradient in float64)."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.method import METHODS, validate_config

from conftest import CRD_PAIRS, embedding_method, method_module, zoo_step
from conftest import embedding_step as step

build = partial(embedding_method, "rkd")  # build(s_dim, t_dim, **overrides)
_Angles = method_module("rkd")._Angles


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def python_rkd(f_s: list[list[float]], f_t: list[list[float]], squared: bool = False):
    """Plain Python: (L_D, L_A, number of Huber arguments with |x| ≥ 1)."""
    b = len(f_s)

    def distances(rows):
        d = [[0.0] * b for _ in range(b)]
        for i in range(b):
            for j in range(b):
                if i != j:
                    sq = max(sum((u - v) ** 2 for u, v in zip(rows[i], rows[j])), 1e-12)
                    d[i][j] = sq if squared else math.sqrt(sq)
        mean = sum(map(sum, d)) / (b * (b - 1))
        return [[x / mean for x in row] for row in d]

    def angles(rows):
        def unit(i, j):
            v = [q - p for p, q in zip(rows[i], rows[j])]
            n = max(math.sqrt(sum(x * x for x in v)), 1e-12)
            return [x / n for x in v]

        return [[[sum(p * q for p, q in zip(unit(i, j), unit(i, k))) for k in range(b)] for j in range(b)]
                for i in range(b)]

    d_s, d_t, a_s, a_t = distances(f_s), distances(f_t), angles(f_s), angles(f_t)
    dist_args = [d_s[i][j] - d_t[i][j] for i in range(b) for j in range(b)]
    angle_args = [a_s[i][j][k] - a_t[i][j][k] for i in range(b) for j in range(b) for k in range(b)]
    large = sum(abs(x) >= 1 for x in dist_args + angle_args)
    return sum(map(huber, dist_args)) / b**2, sum(map(huber, angle_args)) / b**3, large


def reference_rkd(f_s: torch.Tensor, f_t: torch.Tensor, w_d=25.0, w_a=50.0, squared=False) -> torch.Tensor:
    """RepDistiller's ``RKDLoss.forward`` as published: distances from the Gram expansion clamped at 1e-12, the
    mean over the positive entries, smooth L1; angles from normalised difference vectors."""

    def pdist(e):
        e_square = e.pow(2).sum(dim=1)
        res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * e @ e.t()).clamp(min=1e-12)
        res = (res if squared else res.sqrt()).clone()
        res[range(len(e)), range(len(e))] = 0
        return res

    with torch.no_grad():
        t_d = pdist(f_t)
        t_d = t_d / t_d[t_d > 0].mean()
    d = pdist(f_s)
    d = d / d[d > 0].mean()
    loss_d = F.smooth_l1_loss(d, t_d)
    with torch.no_grad():
        td = F.normalize(f_t.unsqueeze(0) - f_t.unsqueeze(1), p=2, dim=2)
        t_angle = torch.bmm(td, td.transpose(1, 2)).view(-1)
    sd = F.normalize(f_s.unsqueeze(0) - f_s.unsqueeze(1), p=2, dim=2)
    s_angle = torch.bmm(sd, sd.transpose(1, 2)).view(-1)
    return w_d * loss_d + w_a * F.smooth_l1_loss(s_angle, t_angle)


def test_hand_computed_example():
    # Student: the right triangle [0,0], [1,0], [0,1]; teacher: the collinear points [0,0], [1,0], [2,0].
    # Distances: student 1, 1, √2 (pairs 01, 02, 12), mean (2 + √2)/3 → ψ = 3(2 − √2)/2, 3(2 − √2)/2, 3√2 − 3;
    #            teacher 1, 2, 1, mean 4/3 → ψ = 3/4, 3/2, 3/4. All |differences| < 1: Huber = x²/2, each pair twice,
    #            over b² = 9 entries: L_D = Σ x² / 9.
    # Angles (cosine at the vertex i, each distinct triplet twice, j = k and degenerate ones 0, over b³ = 27):
    #            student 0, 1/√2, 1/√2 at vertices 0, 1, 2; teacher 1, −1, 1 →
    #            differences −1 (Huber 0.5), 1 + 1/√2 (Huber 1/√2 + 1/2), 1/√2 − 1 (Huber (1 − 1/√2)²/2).
    f_s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    f_t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    psi = 3 * (2 - math.sqrt(2)) / 2
    l_d = ((psi - 0.75) ** 2 + (psi - 1.5) ** 2 + (3 * math.sqrt(2) - 3 - 0.75) ** 2) / 9
    l_a = 2 * (0.5 + (1 / math.sqrt(2) + 0.5) + (1 - 1 / math.sqrt(2)) ** 2 / 2) / 27
    terms = step(build(2, 2), f_s, f_t)
    assert set(terms) == {"ce", "distance", "angle"}
    assert terms["distance"].item() == pytest.approx(25 * l_d, rel=1e-9)
    assert terms["angle"].item() == pytest.approx(50 * l_a, rel=1e-9)
    assert terms["ce"].item() == pytest.approx(math.log(3), rel=1e-9)


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("s_dim, t_dim, batch", [(6, 6, 5), (4, 10, 6), (12, 3, 4)])
def test_matches_plain_python(s_dim, t_dim, batch, squared):
    g = torch.Generator().manual_seed(0)
    f_s = torch.randn(batch, s_dim, generator=g, dtype=torch.float64)
    f_t = torch.randn(batch, t_dim, generator=g, dtype=torch.float64).relu()
    f_s[0] += 10.0  # an outlier, another one in the teacher: pairs with normalised distances ≈ 2 on one side and
    f_t[-1] += 10.0  # ≈ 0 on the other, so that Huber's linear part is exercised
    logits, y = torch.randn(batch, 3, generator=g, dtype=torch.float64), torch.arange(batch) % 3
    method = build(s_dim, t_dim, distance_weight=3.0, angle_weight=7.0, ce_weight=0.5, squared_distance=squared)
    terms = step(method, f_s, f_t, logits, y)
    l_d, l_a, large = python_rkd(f_s.tolist(), f_t.tolist(), squared)
    assert large > 0  # both branches of the Huber loss are exercised
    assert terms["distance"].item() == pytest.approx(3.0 * l_d, rel=1e-9)
    assert terms["angle"].item() == pytest.approx(7.0 * l_a, rel=1e-9)
    ce = sum(math.log(sum(math.exp(v) for v in row)) - row[t] for row, t in zip(logits.tolist(), y.tolist())) / batch
    assert terms["ce"].item() == pytest.approx(0.5 * ce, rel=1e-9)


def test_squared_distance_changes_only_the_distance_term():
    g = torch.Generator().manual_seed(5)
    f_s, f_t = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 6, generator=g, dtype=torch.float64)
    plain, squared = step(build(4, 6), f_s, f_t), step(build(4, 6, squared_distance=True), f_s, f_t)
    assert plain["angle"].item() == squared["angle"].item()
    assert plain["distance"].item() != pytest.approx(squared["distance"].item(), rel=1e-3)


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("s_dim, t_dim", [(16, 16), (10, 40), (64, 8)])
def test_value_and_gradient_match_the_reference_in_float64(s_dim, t_dim, squared):
    g = torch.Generator().manual_seed(1)
    f_s = torch.randn(7, s_dim, generator=g, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(7, t_dim, generator=g, dtype=torch.float64)
    terms = step(build(s_dim, t_dim, squared_distance=squared).double(), f_s, f_t)
    ours = terms["distance"] + terms["angle"]
    ref = reference_rkd(f_s, f_t, squared=squared)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    (grad_ours,) = torch.autograd.grad(ours, f_s)
    (grad_ref,) = torch.autograd.grad(ref, f_s)
    assert grad_ref.abs().max() > 0
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-5, atol=1e-12)


def test_angles_backward_is_the_gradient_of_its_forward():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    gram = (x @ x.T).requires_grad_()
    q = torch.randn(5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    inv = torch.rand(5, 5, generator=g, dtype=torch.float64).add(0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: _Angles.apply(*a, torch.float64), (gram, q, inv))


@pytest.mark.parametrize("clustered", [False, True])
def test_float32_batch_of_100_matches_the_float64_reference(clustered):
    # the CPU tier's shapes (b = 100, D_s = 80, D_t = 320); clustered: tight groups, where the Gram expansion
    # cancels most
    g = torch.Generator().manual_seed(8)
    if clustered:
        centres = 3 * torch.randn(5, 80, generator=g)
        f_s = centres[torch.arange(100) % 5] + 0.01 * torch.randn(100, 80, generator=g)
    else:
        f_s = torch.randn(100, 80, generator=g).relu()
    f_t = torch.randn(100, 320, generator=g).relu()
    f_s.requires_grad_()
    terms = step(build(80, 320, distance_weight=2.5, angle_weight=5.0), f_s, f_t)
    ours = terms["distance"] + terms["angle"]
    f_s64 = f_s.detach().double().requires_grad_()
    ref = reference_rkd(f_s64, f_t.double(), w_d=2.5, w_a=5.0)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    (grad_ours,) = torch.autograd.grad(ours, f_s)
    (grad_ref,) = torch.autograd.grad(ref, f_s64)
    torch.testing.assert_close(grad_ours.double(), grad_ref, rtol=0, atol=2e-6 * grad_ref.abs().max().item())


def test_weights_scale_their_own_terms():
    g = torch.Generator().manual_seed(6)
    f_s, f_t = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    base, scaled = step(build(5, 5), f_s, f_t), step(build(5, 5, distance_weight=1.0, angle_weight=4.0), f_s, f_t)
    assert scaled["distance"].item() == pytest.approx(base["distance"].item() / 25, rel=1e-6)
    assert scaled["angle"].item() == pytest.approx(base["angle"].item() * 4 / 50, rel=1e-6)


def test_teacher_gets_no_gradient():
    g = torch.Generator().manual_seed(2)
    f_s = torch.randn(4, 6, generator=g, requires_grad=True)
    f_t = torch.randn(4, 9, generator=g, requires_grad=True)
    terms = step(build(6, 9), f_s, f_t)
    grad_s, grad_t = torch.autograd.grad(terms["distance"] + terms["angle"], (f_s, f_t), allow_unused=True)
    assert grad_s is not None and grad_s.abs().sum() > 0
    assert grad_t is None


def test_similar_geometry_gives_zero_whatever_the_scale_shift_and_width():
    # Distances over their mean and angles are invariant to scale, translation and an orthogonal map into a wider
    # space: such a teacher gives 0; the same teacher with its samples permuted does not.
    g = torch.Generator().manual_seed(3)
    f_s = torch.randn(6, 5, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(9, 9, generator=g, dtype=torch.float64))
    f_t = 2.5 * torch.cat([f_s, torch.zeros(6, 4, dtype=torch.float64)], dim=1) @ q + 1.0
    terms = step(build(5, 9), f_s, f_t)
    assert terms["distance"].item() == pytest.approx(0.0, abs=1e-10)
    assert terms["angle"].item() == pytest.approx(0.0, abs=1e-10)
    permuted = step(build(5, 9), f_s, f_t[[1, 0, 2, 3, 4, 5]])
    assert permuted["distance"].item() > 1e-3 and permuted["angle"].item() > 1e-3


def test_degenerate_batches_stay_finite():
    # One sample: no pairs (the reference divides by an empty mean); duplicated samples: zero differences.
    one = step(build(4, 4), torch.randn(1, 4, requires_grad=True), torch.randn(1, 4))
    assert one["distance"].item() == 0 and one["angle"].item() == 0
    f_s = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0]], requires_grad=True)
    terms = step(build(2, 3), f_s, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]]))
    (grad,) = torch.autograd.grad(terms["distance"] + terms["angle"], f_s)
    assert torch.isfinite(terms["distance"]) and torch.isfinite(terms["angle"]) and torch.all(torch.isfinite(grad))


def test_embeddings_apart_by_rounding_count_as_coincident():
    # Rows 0 and 1 differ by one float32 ulp in 8 of 80 coordinates: closer than float64's Gram expansion resolves
    # (squared distance below 1e-12 of ‖e_0‖² + ‖e_1‖²). Their distance and cosines are 0, as for equal rows,
    # instead of rounding noise over a 1e-7 distance (cosines off by up to 0.5, gradients in the thousands).
    g = torch.Generator().manual_seed(0)
    f_s = torch.randn(6, 80, generator=g).relu() + 0.5
    f_s[1] = f_s[0]
    f_s[1, :8] = torch.nextafter(f_s[0, :8], torch.tensor(10.0))
    f_s.requires_grad_()
    norms, angles = method_module("rkd")._geometry(f_s)
    assert norms[0, 1] == 0 and norms[0, 2] > 0
    assert angles[0, 1].abs().max() == 0 and angles[0, :, 1].abs().max() == 0
    assert angles[0, 2, 2].item() == pytest.approx(1.0, abs=1e-6)
    terms = step(build(80, 20), f_s, torch.randn(6, 20, generator=g))
    (grad,) = torch.autograd.grad(terms["distance"] + terms["angle"], f_s)
    assert grad.abs().max() < 1.0


def test_defaults_are_repdistiller():
    cls = METHODS.get("rkd")
    config = cls.Config()
    assert (config.distance_weight, config.angle_weight, config.ce_weight, config.squared_distance) == \
        (25.0, 50.0, 1.0, False)
    assert cls.taps(config) == (("logits", "embedding"),) * 2


@pytest.mark.parametrize("field, value", [("distance_weight", -1.0), ("angle_weight", -0.1), ("ce_weight", -2.0),
                                          ("squared_distance", "maybe"), ("beta", 1.0)])
def test_bad_hyperparameters_name_the_field(field, value):
    with pytest.raises(KdbenchError, match=f"method rkd: {field}"):
        validate_config(METHODS.get("rkd"), {field: value})


@pytest.mark.parametrize("teacher_name, student_name", CRD_PAIRS)
def test_one_step_on_the_crd_zoo(teacher_name, student_name):
    run = zoo_step("rkd", teacher_name, student_name, [0, 5, 99, 7], train_size=100, progress=0.5)
    student, terms = run.student, run.terms
    total = sum(terms.values())
    assert torch.isfinite(total) and terms["distance"].item() > 0 and terms["angle"].item() > 0
    total.backward()
    assert all(p.grad is not None and torch.all(torch.isfinite(p.grad)) for p in student.parameters())
