"""Variational information distillation against a tiny example worked out by hand and an independent torch
re-implementation of RepDistiller's ``VIDLoss`` (einsum 1×1 convolutions, log(1 + exp(α)) written out, pooling by
reshape), value and gradient in float64."""

import math

import pytest
import torch

from kdbench.errors import KdbenchError
from kdbench.method import METHODS, validate_config
from kdbench.models import create_model
from kdbench.taps import MASK, probe_shapes

from conftest import CRD_PAIRS, zoo_step


def build(s_shapes: dict, t_shapes: dict, **overrides):
    cls = METHODS.get("vid")
    stages = [int(tap.split(":")[1]) for tap in s_shapes if tap.startswith("stage:")]
    config = validate_config(cls, {"stages": stages, **overrides})
    return cls(config, s_shapes, t_shapes).double()


def step(method, f_s, f_t, logits, target, tap="stage:0", mask=None):
    student, teacher = {"logits": logits, tap: f_s}, {"logits": logits, tap: f_t}
    if mask is not None:
        student[MASK] = teacher[MASK] = mask
    return method.loss(student, teacher, target, 0.0)


def random_inputs(s_shape, t_shape, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    f_s = torch.randn(batch, *s_shape, generator=g, dtype=torch.float64).clamp(min=0)
    f_t = torch.randn(batch, *t_shape, generator=g, dtype=torch.float64).clamp(min=0)
    logits = torch.randn(batch, 4, generator=g, dtype=torch.float64)
    return f_s, f_t, logits, torch.tensor([0, 3, 1, 2][:batch])


def randomize(method, seed=1):
    """Random variances (the initial ones are all equal) so that a wrong channel broadcast shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for regressor in method.regressors:
            regressor.log_scale.copy_(torch.randn(regressor.log_scale.shape, generator=g, dtype=torch.float64))


# --- by hand


def test_hand_computed_example():
    # 1 sample, 1 channel each side, 2 positions, mid channels 1, every 1×1 weight 1: μ(s) = ReLU(ReLU(s)).
    #   s = [1, −2] → μ = [1, 0];  t = [3, 0.5] → (μ − t)² = [4, 0.25];  σ² = init_pred_var = 5.
    #   NLL = mean of ½ (ln 5 + [4, 0.25] / 5) = ½ (ln 5 + 0.425);  × beta 1.   Logits [0, 0]: CE = ln 2.
    method = build({"stage:0": (1, 2)}, {"stage:0": (1, 2)})
    with torch.no_grad():
        for p in method.regressors[0].mean.parameters():
            p.fill_(1.0)
    f_s = torch.tensor([[[1.0, -2.0]]], dtype=torch.float64)
    f_t = torch.tensor([[[3.0, 0.5]]], dtype=torch.float64)
    terms = step(method, f_s, f_t, torch.zeros(1, 2, dtype=torch.float64), torch.tensor([1]))
    assert set(terms) == {"ce", "vid"}
    assert terms["vid"].item() == pytest.approx(0.5 * (math.log(5) + 0.425), rel=1e-6)  # α is stored in float32
    assert terms["ce"].item() == pytest.approx(math.log(2), rel=1e-12)


@pytest.mark.parametrize("init_pred_var, eps", [(5.0, 1e-5), (0.5, 0.0), (40.0, 1e-2)])
def test_initial_variance_is_init_pred_var(init_pred_var, eps):
    method = build({"stage:0": (2, 4)}, {"stage:0": (3, 4)}, init_pred_var=init_pred_var, eps=eps)
    regressor = method.regressors[0]
    assert regressor.log_scale.shape == (3,)
    var = torch.log(1 + torch.exp(regressor.log_scale)) + eps  # the reference's parameterisation, written out
    # α is created in float32, as the reference's: exact up to float32 rounding of α
    torch.testing.assert_close(var, torch.full((3,), init_pred_var, dtype=torch.float64), rtol=1e-6, atol=0)


def test_eps_is_added_to_the_variance():
    # μ = 0 (zero weights), t = 1 everywhere, α fixed: NLL = ½ (ln σ² + 1/σ²) with σ² = ln(1 + e^α) + eps.
    for eps in (0.0, 0.3):
        method = build({"stage:0": (1, 2)}, {"stage:0": (1, 2)}, eps=eps, beta=2.0)
        with torch.no_grad():
            for p in method.regressors[0].mean.parameters():
                p.zero_()
            method.regressors[0].log_scale.fill_(0.0)
        var = math.log(2) + eps
        terms = step(method, torch.ones(1, 1, 2, dtype=torch.float64), torch.ones(1, 1, 2, dtype=torch.float64),
                     torch.zeros(1, 2, dtype=torch.float64), torch.tensor([0]))
        assert terms["vid"].item() == pytest.approx(2.0 * 0.5 * (math.log(var) + 1 / var), rel=1e-12)


def test_weights_scale_their_terms():
    f_s, f_t, logits, y = random_inputs((3, 8), (5, 8))
    torch.manual_seed(0)
    base = step(build({"stage:0": (3, 8)}, {"stage:0": (5, 8)}), f_s, f_t, logits, y)
    torch.manual_seed(0)
    scaled = step(build({"stage:0": (3, 8)}, {"stage:0": (5, 8)}, beta=7.0, ce_weight=0.25), f_s, f_t, logits, y)
    assert scaled["vid"].item() == pytest.approx(base["vid"].item() * 7.0, rel=1e-12)
    assert scaled["ce"].item() == pytest.approx(base["ce"].item() * 0.25, rel=1e-12)


# --- an independent re-implementation of RepDistiller's VIDLoss


def block_pool(x: torch.Tensor, size) -> torch.Tensor:
    for dim, n_out in enumerate(size, start=2):
        x = x.unflatten(dim, (n_out, x.shape[dim] // n_out)).mean(dim + 1)
    return x


def reference_vid(weights, alpha, eps, f_s, f_t):
    """RepDistiller ``VIDLoss.forward``: pool the larger map, three bias-free 1×1 convs with ReLU between,
    σ² = log(1 + exp(α)) + eps per teacher channel, mean of ½ ((μ − t)² / σ² + log σ²)."""
    size = tuple(min(a, b) for a, b in zip(f_s.shape[2:], f_t.shape[2:]))
    x, t = block_pool(f_s, size), block_pool(f_t, size)
    for i, w in enumerate(weights):
        x = torch.einsum("oc,bc...->bo...", w.reshape(w.shape[0], w.shape[1]), x)
        if i < 2:
            x = torch.relu(x)
    var = (torch.log(1.0 + torch.exp(alpha)) + eps).reshape(1, -1, *[1] * len(size))
    return torch.mean(0.5 * ((x - t) ** 2 / var + torch.log(var)))


SHAPES = [
    ((3, 8), (5, 8)),
    ((3, 8), (5, 4)),  # student pooled
    ((3, 4), (5, 12)),  # teacher pooled
    ((3, 4, 4), (5, 4, 4)),
    ((3, 4, 6), (5, 2, 3)),  # student pooled
    ((4, 4, 3), (2, 2, 6)),  # student pooled along H, teacher along W
]


@pytest.mark.parametrize("mid_channels", [None, 2])
@pytest.mark.parametrize("s_shape, t_shape", SHAPES)
def test_value_and_gradient_match_reference(s_shape, t_shape, mid_channels):
    f_s, f_t, logits, y = random_inputs(s_shape, t_shape, seed=2)
    f_s.requires_grad_(True)
    torch.manual_seed(0)
    method = build({"stage:0": s_shape}, {"stage:0": t_shape}, beta=3.0, ce_weight=0.0, mid_channels=mid_channels)
    randomize(method)
    regressor = method.regressors[0]
    convs = [m for m in regressor.mean if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d))]
    mid = mid_channels or t_shape[0]
    assert [tuple(c.weight.shape[:2]) for c in convs] == [(mid, s_shape[0]), (mid, mid), (t_shape[0], mid)]
    assert all(c.bias is None and c.weight.dim() == len(s_shape) + 1 for c in convs)
    weights = [c.weight.detach().clone().requires_grad_(True) for c in convs]
    alpha = regressor.log_scale.detach().clone().requires_grad_(True)

    ours = step(method, f_s, f_t, logits, y)["vid"]
    theirs = 3.0 * reference_vid(weights, alpha, 1e-5, f_s, f_t)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    grads_ours = torch.autograd.grad(ours, [f_s, *[c.weight for c in convs], regressor.log_scale])
    grads_theirs = torch.autograd.grad(theirs, [f_s, *weights, alpha])
    assert grads_ours[0].abs().sum() > 0
    for a, b in zip(grads_ours, grads_theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-12)


def test_stages_are_summed_each_with_its_own_regressor():
    shapes = [((3, 8), (5, 8)), ((3, 4, 4), (5, 2, 2))]
    s_shapes = {f"stage:{i}": s for i, (s, _) in enumerate(shapes)}
    t_shapes = {f"stage:{i}": t for i, (_, t) in enumerate(shapes)}
    method = build(s_shapes, t_shapes)
    randomize(method)
    assert len(method.regressors) == 2
    feats = [random_inputs(s, t, seed=i)[:2] for i, (s, t) in enumerate(shapes)]
    logits, y = random_inputs((1,), (1,))[2:]
    student = {"logits": logits, **{f"stage:{i}": f for i, (f, _) in enumerate(feats)}}
    teacher = {f"stage:{i}": f for i, (_, f) in enumerate(feats)}
    terms = method.loss(student, teacher, y, 0.0)
    expected = 0.0
    for regressor, (f_s, f_t) in zip(method.regressors, feats):
        weights = [m.weight for m in regressor.mean if not isinstance(m, torch.nn.ReLU)]
        expected += reference_vid(weights, regressor.log_scale, 1e-5, f_s, f_t).item()
    assert terms["vid"].item() == pytest.approx(expected, rel=1e-9)


# --- hidden states (token models)


def test_hidden_states_use_linear_regressors_and_leave_padding_out():
    g = torch.Generator().manual_seed(4)
    h_s = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    h_t = torch.randn(3, 5, 6, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    method = build({"logits": (3,), "stage:-1": (5, 4), MASK: (5,)},
                   {"logits": (3,), "stage:-1": (5, 6), MASK: (5,)}, mid_channels=3)
    randomize(method)
    regressor = method.regressors[0]
    linears = [m for m in regressor.mean if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(3, 4), (3, 3), (6, 3)]
    assert all(m.bias is None for m in linears)
    logits, y = torch.zeros(3, 3, dtype=torch.float64), torch.tensor([0, 1, 2])

    def loss(hs, ht):
        return step(method, hs, ht, logits, y, tap="stage:-1", mask=mask)["vid"].item()

    # the real tokens stacked as (tokens, hidden units, 1): a 1-D map with one position per token
    real = mask.bool()
    weights = [m.weight.unsqueeze(-1) for m in linears]
    expected = reference_vid(weights, regressor.log_scale, 1e-5, h_s[real].unsqueeze(-1), h_t[real].unsqueeze(-1))
    assert loss(h_s, h_t) == pytest.approx(expected.item(), rel=1e-9)
    noisy_s, noisy_t = h_s.clone(), h_t.clone()
    noisy_s[~real] = 100.0
    noisy_t[~real] = -7.0
    assert loss(noisy_s, noisy_t) == pytest.approx(expected.item(), rel=1e-9)


def test_hidden_states_need_the_same_length():
    with pytest.raises(KdbenchError, match="vid: stage:-1 has student shape .* same length L"):
        build({"stage:-1": (5, 4), MASK: (5,)}, {"stage:-1": (6, 4), MASK: (6,)})


# --- models, shapes, config


@pytest.mark.parametrize("teacher_name, student_name", CRD_PAIRS)
def test_one_step_on_the_crd_zoo(teacher_name, student_name):
    run = zoo_step("vid", teacher_name, student_name, [3, 7], train_size=10, progress=0.0, freeze_teacher=False)
    teacher, student, method, terms = run.teacher, run.student, run.method, run.terms
    assert all(torch.isfinite(t) for t in terms.values())
    terms["vid"].backward()  # the VID term alone reaches the student's earliest matched stage and every extra
    first = student.get_submodule(student.stages[-3])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in first.parameters())
    assert all(p.grad is not None for p in method.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_defaults_taps_and_extra_parameters_on_cnn1d():
    cls = METHODS.get("vid")
    c = cls.Config()
    assert (c.stages, c.beta, c.ce_weight, c.init_pred_var, c.eps, c.mid_channels) == \
        ((-3, -2, -1), 1.0, 1.0, 5.0, 1e-5, None)
    assert cls.taps(c) == (("logits", "stage:-3", "stage:-2", "stage:-1"),) * 2
    x = torch.randn(2, 1, 40)
    student, teacher = create_model("cnn1d_w4"), create_model("cnn1d_w8")
    method = cls(c, probe_shapes(student, cls.taps(c)[0], x), probe_shapes(teacher, cls.taps(c)[1], x))
    # per stage: Conv1d 4→8, 8→8, 8→8 without bias (32 + 64 + 64) and 8 variances; three stages.
    assert sum(p.numel() for p in method.parameters()) == 3 * (32 + 64 + 64 + 8)
    assert all(isinstance(m, torch.nn.Conv1d) for r in method.regressors for m in r.mean
               if not isinstance(m, torch.nn.ReLU))


@pytest.mark.parametrize("s_shape, t_shape", [((8,), (16,)), ((4, 8), (4, 8, 8)), ((2, 3, 4, 4), (2, 3, 4, 4))])
def test_non_maps_are_a_clear_error(s_shape, t_shape):
    with pytest.raises(KdbenchError, match="vid: stage:0 has student shape"):
        build({"stage:0": s_shape}, {"stage:0": t_shape})


@pytest.mark.parametrize(
    "overrides, field",
    [({"beta": -1.0}, "beta"), ({"ce_weight": -0.1}, "ce_weight"), ({"init_pred_var": 0.0}, "init_pred_var"),
     ({"eps": -1e-5}, "eps"), ({"mid_channels": 0}, "mid_channels"), ({"stages": []}, "stages"),
     ({"temperature": 4.0}, "temperature"), ({"init_pred_var": 1e-3, "eps": 1e-2}, "value")],
)
def test_bad_hyperparameters_name_the_field(overrides, field):
    with pytest.raises(KdbenchError, match=f"method vid: {field}"):
        validate_config(METHODS.get("vid"), overrides)
