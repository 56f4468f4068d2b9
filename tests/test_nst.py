"""Neuron selectivity transfer against a tiny example worked out by hand, an explicit-loop numpy MMD², and an
independent torch re-implementation of RepDistiller's ``NSTLoss`` (value and gradient, float64)."""

import math

import numpy as np
import pytest
import torch

from kdbench.errors import KdbenchError
from kdbench.method import METHODS, validate_config
from kdbench.taps import MASK

from conftest import CRD_PAIRS, zoo_step


def build(s_shapes: dict, t_shapes: dict, **overrides):
    cls = METHODS.get("nst")
    stages = [int(tap.split(":")[1]) for tap in s_shapes if tap.startswith("stage:")]
    config = validate_config(cls, {"stages": stages, **overrides})
    return cls(config, s_shapes, t_shapes)


def step(method, f_s, f_t, logits, target, mask=None):
    student = {"logits": logits, "stage:0": f_s}
    teacher = {"logits": logits, "stage:0": f_t}
    if mask is not None:
        student[MASK] = teacher[MASK] = mask
    return method.loss(student, teacher, target, 0.0)


# --- by hand


def test_hand_computed_example():
    # 1 sample; student 2 channels × 2 positions, teacher 1 channel × 2 positions.
    #   f_s = [[1, 0], [0, 2]] → rows normalised: ŝ1 = [1, 0], ŝ2 = [0, 1];  f_t = [[3, 3]] → t̂ = [1, 1]/√2.
    #   K(s,s) = (ŝ·ŝ')²: [[1, 0], [0, 1]] → mean 1/2;  K(t,t) = 1;  K(s,t) = (1/√2)² = 1/2 twice → mean 1/2.
    #   MMD² = 1 + 1/2 − 2 · 1/2 = 1/2 → × beta 50 = 25.   Logits [0, 0]: CE = ln 2.
    method = build({"stage:0": (2, 2)}, {"stage:0": (1, 2)})
    f_s = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    f_t = torch.tensor([[[3.0, 3.0]]])
    terms = step(method, f_s, f_t, torch.zeros(1, 2), torch.tensor([1]))
    assert set(terms) == {"ce", "nst"}
    assert terms["nst"].item() == pytest.approx(25.0, rel=1e-6)
    assert terms["ce"].item() == pytest.approx(math.log(2), rel=1e-6)


def test_hand_computed_linear_kernel_and_offset():
    f_s = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    f_t = torch.tensor([[[3.0, 3.0]]])
    logits, y = torch.zeros(1, 2), torch.tensor([1])
    # d = 1, c = 0 (the paper's linear kernel): MMD² = ‖mean ŝ − mean t̂‖² = 2 · (1/2 − 1/√2)² = 3/2 − √2.
    linear = build({"stage:0": (2, 2)}, {"stage:0": (1, 2)}, degree=1, beta=1.0)
    assert step(linear, f_s, f_t, logits, y)["nst"].item() == pytest.approx(1.5 - math.sqrt(2), rel=1e-5)
    # d = 2, c = 1: K(s,s) = [[4, 1], [1, 4]] → 5/2; K(t,t) = 4; K(s,t) = (1 + 1/√2)² = 3/2 + √2.
    #   MMD² = 4 + 5/2 − 2 (3/2 + √2) = 7/2 − 2√2.
    offset = build({"stage:0": (2, 2)}, {"stage:0": (1, 2)}, offset=1.0, beta=1.0)
    assert step(offset, f_s, f_t, logits, y)["nst"].item() == pytest.approx(3.5 - 2 * math.sqrt(2), rel=1e-5)


def test_weights_scale_their_terms():
    f_s, f_t, logits, y = random_inputs((3, 8), (5, 8))
    base = step(build({"stage:0": (3, 8)}, {"stage:0": (5, 8)}), f_s, f_t, logits, y)
    scaled = step(build({"stage:0": (3, 8)}, {"stage:0": (5, 8)}, beta=7.0, ce_weight=0.25), f_s, f_t, logits, y)
    assert scaled["nst"].item() == pytest.approx(base["nst"].item() * 7.0 / 50.0, rel=1e-12)
    assert scaled["ce"].item() == pytest.approx(base["ce"].item() * 0.25, rel=1e-12)


def test_identical_selectivity_costs_nothing():
    """Same rows up to a positive scale per channel, in another channel order and count: MMD² = 0."""
    f_s, *_ = random_inputs((3, 4, 4), (3, 4, 4))
    f_t = torch.cat([2 * f_s[:, [2, 0, 1]], 5 * f_s], dim=1)  # the same distribution of normalised rows
    method = build({"stage:0": (3, 4, 4)}, {"stage:0": (6, 4, 4)})
    assert step(method, f_s, f_t, LOGITS, TARGET)["nst"].item() == pytest.approx(0.0, abs=1e-9)


# --- explicit loops (numpy) and an independent re-implementation of RepDistiller's NSTLoss


def random_inputs(s_shape, t_shape, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    f_s = torch.randn(batch, *s_shape, generator=g, dtype=torch.float64)
    f_t = torch.randn(batch, *t_shape, generator=g, dtype=torch.float64).clamp(min=0) + 0.01
    logits = torch.randn(batch, 3, generator=g, dtype=torch.float64)
    return f_s, f_t, logits, torch.tensor([0, 2, 1, 1][:batch])


LOGITS, TARGET = torch.randn(4, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64), \
    torch.tensor([0, 2, 1, 1])


def np_block_pool(f: np.ndarray, size) -> np.ndarray:
    """Average pooling by integer factors: each spatial axis split into ``size`` equal blocks."""
    for axis, n_out in enumerate(size, start=2):
        shape = f.shape[:axis] + (n_out, f.shape[axis] // n_out) + f.shape[axis + 1:]
        f = f.reshape(shape).mean(axis=axis + 1)
    return f


def unit(row: list) -> list:
    norm = math.sqrt(sum(v * v for v in row))
    return [v / norm for v in row]


def np_mmd2(f_s: np.ndarray, f_t: np.ndarray, d: int = 2, c: float = 0.0) -> float:
    size = tuple(min(a, b) for a, b in zip(f_s.shape[2:], f_t.shape[2:]))
    f_s, f_t = np_block_pool(f_s, size), np_block_pool(f_t, size)
    total = 0.0
    for b in range(f_s.shape[0]):
        s = [unit(row) for row in f_s[b].reshape(f_s.shape[1], -1).tolist()]
        t = [unit(row) for row in f_t[b].reshape(f_t.shape[1], -1).tolist()]
        k = lambda x, y: (sum(u * v for u, v in zip(x, y)) + c) ** d  # noqa: E731
        kss = sum(k(x, y) for x in s for y in s) / len(s) ** 2
        ktt = sum(k(x, y) for x in t for y in t) / len(t) ** 2
        kst = sum(k(x, y) for x in s for y in t) / (len(s) * len(t))
        total += ktt + kss - 2 * kst
    return total / f_s.shape[0]


def torch_block_pool(x: torch.Tensor, size) -> torch.Tensor:
    for dim, n_out in enumerate(size, start=2):
        x = x.unflatten(dim, (n_out, x.shape[dim] // n_out)).mean(dim + 1)
    return x


def reference_nst(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """RepDistiller ``NSTLoss.nst_loss`` (full_loss) written from its formula: the larger map pooled, rows
    flattened and normalised, the polynomial kernel by broadcasting, means of the three kernel matrices."""
    size = tuple(min(a, b) for a, b in zip(f_s.shape[2:], f_t.shape[2:]))
    f_s, f_t = torch_block_pool(f_s, size), torch_block_pool(f_t, size)
    s = f_s.reshape(f_s.shape[0], f_s.shape[1], -1)
    t = f_t.reshape(f_t.shape[0], f_t.shape[1], -1)
    s = s / s.pow(2).sum(-1, keepdim=True).sqrt()
    t = t / t.pow(2).sum(-1, keepdim=True).sqrt()
    kernel = lambda a, b: (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)  # noqa: E731
    return kernel(t, t).mean() + kernel(s, s).mean() - 2 * kernel(s, t).mean()


SHAPES = [
    ((3, 8), (5, 8)),
    ((3, 8), (5, 4)),  # student pooled
    ((3, 4), (5, 12)),  # teacher pooled
    ((3, 4, 4), (5, 4, 4)),
    ((3, 4, 6), (5, 2, 3)),  # student pooled
    ((4, 4, 3), (2, 2, 6)),  # student pooled along H, teacher along W
]


@pytest.mark.parametrize("s_shape, t_shape", SHAPES)
def test_matches_explicit_loops(s_shape, t_shape):
    f_s, f_t, logits, y = random_inputs(s_shape, t_shape)
    method = build({"stage:0": s_shape}, {"stage:0": t_shape}, beta=3.0)
    terms = step(method, f_s, f_t, logits, y)
    assert terms["nst"].item() == pytest.approx(3.0 * np_mmd2(f_s.numpy(), f_t.numpy()), rel=1e-9)
    ce = np.mean([np.log(np.exp(row).sum()) - row[label] for row, label in zip(logits.numpy(), y.numpy())])
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-9)


@pytest.mark.parametrize("degree, offset", [(1, 0.0), (3, 0.5), (2, 2.0)])
def test_kernel_options_match_explicit_loops(degree, offset):
    f_s, f_t, logits, y = random_inputs((3, 2, 3), (4, 2, 3))
    method = build({"stage:0": (3, 2, 3)}, {"stage:0": (4, 2, 3)}, degree=degree, offset=offset, beta=1.0)
    expected = np_mmd2(f_s.numpy(), f_t.numpy(), degree, offset)
    assert step(method, f_s, f_t, logits, y)["nst"].item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("s_shape, t_shape", SHAPES)
def test_value_and_gradient_match_reference(s_shape, t_shape):
    f_s, f_t, logits, y = random_inputs(s_shape, t_shape, seed=3)
    f_s.requires_grad_(True)
    method = build({"stage:0": s_shape}, {"stage:0": t_shape}, ce_weight=0.0)
    ours = step(method, f_s, f_t, logits, y)["nst"]
    theirs = 50.0 * reference_nst(f_s, f_t)
    (g_ours,) = torch.autograd.grad(ours, f_s)
    (g_theirs,) = torch.autograd.grad(theirs, f_s)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-12)
    assert g_ours.abs().sum() > 0


def test_stages_are_summed():
    shapes = [((3, 8), (5, 8)), ((3, 4, 4), (5, 2, 2)), ((2, 6), (4, 3))]
    s_shapes = {f"stage:{i}": s for i, (s, _) in enumerate(shapes)}
    t_shapes = {f"stage:{i}": t for i, (_, t) in enumerate(shapes)}
    feats = [random_inputs(s, t, seed=i)[:2] for i, (s, t) in enumerate(shapes)]
    student = {"logits": LOGITS, **{f"stage:{i}": f for i, (f, _) in enumerate(feats)}}
    teacher = {f"stage:{i}": f for i, (_, f) in enumerate(feats)}
    terms = build(s_shapes, t_shapes).loss(student, teacher, TARGET, 0.0)
    expected = sum(np_mmd2(f_s.numpy(), f_t.numpy()) for f_s, f_t in feats)
    assert terms["nst"].item() == pytest.approx(50.0 * expected, rel=1e-9)


# --- hidden states (token models)


def test_hidden_states_leave_padding_out():
    """Per sentence, the MMD² of hidden units over its real tokens only; padded positions change nothing."""
    g = torch.Generator().manual_seed(4)
    h_s = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    h_t = torch.randn(3, 5, 6, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    shapes_s = {"logits": (3,), "stage:-1": (5, 4), MASK: (5,)}
    shapes_t = {"logits": (3,), "stage:-1": (5, 6), MASK: (5,)}
    method = build(shapes_s, shapes_t, beta=1.0)
    logits, y = torch.zeros(3, 3, dtype=torch.float64), torch.tensor([0, 1, 2])

    def loss(hs, ht):
        return method.loss({"logits": logits, "stage:-1": hs, MASK: mask},
                           {"logits": logits, "stage:-1": ht, MASK: mask}, y, 0.0)["nst"].item()

    expected = 0.0
    for b, n in enumerate(mask.sum(1).tolist()):  # hidden units as channels (rows) over the n real tokens
        expected += np_mmd2(h_s[b:b + 1, :n].transpose(1, 2).numpy(), h_t[b:b + 1, :n].transpose(1, 2).numpy())
    assert loss(h_s, h_t) == pytest.approx(expected / 3, rel=1e-9)
    noisy_s, noisy_t = h_s.clone(), h_t.clone()
    noisy_s[mask == 0] = 100.0
    noisy_t[mask == 0] = -7.0
    assert loss(noisy_s, noisy_t) == pytest.approx(expected / 3, rel=1e-9)


def test_hidden_states_need_the_same_length():
    with pytest.raises(KdbenchError, match="nst: stage:-1 has student shape .* same length L"):
        build({"stage:-1": (5, 4), MASK: (5,)}, {"stage:-1": (6, 4), MASK: (6,)})


# --- models, shapes, config


@pytest.mark.parametrize("teacher_name, student_name", CRD_PAIRS)
def test_one_step_on_the_crd_zoo(teacher_name, student_name):
    run = zoo_step("nst", teacher_name, student_name, [3, 7], train_size=10, progress=0.0, freeze_teacher=False)
    student, terms = run.student, run.terms
    assert all(torch.isfinite(t) for t in terms.values()) and terms["nst"].item() > 0
    terms["nst"].backward()  # the NST term alone reaches the student's earliest matched stage
    first = student.get_submodule(student.stages[-3])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in first.parameters())


def test_defaults_and_taps():
    cls = METHODS.get("nst")
    c = cls.Config()
    assert (c.stages, c.beta, c.ce_weight, c.degree, c.offset) == ((-3, -2, -1), 50.0, 1.0, 2, 0.0)
    assert cls.taps(c) == (("logits", "stage:-3", "stage:-2", "stage:-1"),) * 2
    method = cls(c, *[{"logits": (10,), "stage:-3": (4, 40), "stage:-2": (4, 20), "stage:-1": (4, 10)}] * 2)
    assert sum(p.numel() for p in method.parameters()) == 0  # NST has no trainable modules of its own


@pytest.mark.parametrize("s_shape, t_shape", [((8,), (16,)), ((4, 8), (4, 8, 8)), ((2, 3, 4, 4), (2, 3, 4, 4))])
def test_non_maps_are_a_clear_error(s_shape, t_shape):
    with pytest.raises(KdbenchError, match="nst: stage:0 has student shape"):
        build({"stage:0": s_shape}, {"stage:0": t_shape})


@pytest.mark.parametrize(
    "field, value",
    [("beta", -1.0), ("ce_weight", -0.1), ("degree", 0), ("degree", 1.5), ("offset", -1.0), ("stages", []),
     ("temperature", 4.0)],
)
def test_bad_hyperparameters_name_the_field(field, value):
    with pytest.raises(KdbenchError, match=f"method nst: {field}"):
        validate_config(METHODS.get("nst"), {field: value})
