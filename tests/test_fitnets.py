"""FitNets against an independent computation: the regressor written out (einsum conv, batch-norm by hand,
pooling by reshape), the MSE as an explicit sum, and a tiny example worked out by hand."""

import math

import pytest
import torch

from kdbench.errors import KdbenchError
from kdbench.taps import FeatureTaps, probe_shapes
from kdbench.losses import kd_loss
from kdbench.method import METHODS, validate_config
from kdbench.models import create_model

# (student shape, teacher shape) without the batch dimension: 1-D, 2-D, vectors; equal and mismatched sizes.
SHAPES = [
    ((4, 8), (6, 8)),
    ((4, 8), (6, 4)),  # student longer: averaged
    ((4, 4), (6, 8)),  # student shorter: replicated
    ((3, 4, 4), (5, 4, 4)),
    ((3, 4, 6), (5, 2, 3)),
    ((3, 2, 6), (5, 4, 3)),  # H replicated, W averaged
    ((5,), (7,)),
]


def build(s_shapes: dict, t_shapes: dict, **overrides):
    cls = METHODS.get("fitnets")
    config = validate_config(cls, {"stages": [int(tap.split(":")[1]) for tap in s_shapes], **overrides})
    return cls(config, s_shapes, t_shapes).double()


def pool_by_reshape(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Adaptive average pooling for integer ratios: block means when shrinking, repetition when growing."""
    for dim, n_out in enumerate(size, start=2):
        n_in = x.shape[dim]
        if n_in >= n_out:
            x = x.unflatten(dim, (n_out, n_in // n_out)).mean(dim + 1)
        else:
            x = x.repeat_interleave(n_out // n_in, dim=dim)
    return x


def manual_regressor(regressor, x: torch.Tensor, t_shape: tuple[int, ...]) -> torch.Tensor:
    """The regressor's forward pass written out, training-mode batch norm with biased batch variance."""
    if x.dim() == 2:
        linear = regressor[0]
        return (x @ linear.weight.T + linear.bias).clamp(min=0)
    conv, bn = regressor[-3], regressor[-2]
    x = pool_by_reshape(x, t_shape[1:])
    y = torch.einsum("oc,bc...->bo...", conv.weight.flatten(1), x) + conv.bias.view(1, -1, *[1] * (x.dim() - 2))
    dims = [0, *range(2, y.dim())]
    mean, var = y.mean(dims, keepdim=True), y.var(dims, unbiased=False, keepdim=True)
    shape = (1, -1, *[1] * (y.dim() - 2))
    y = (y - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)
    return y.clamp(min=0)


def manual_ce(logits: torch.Tensor, target: torch.Tensor) -> float:
    total = 0.0
    for row, label in zip(logits.tolist(), target.tolist()):
        total += math.log(sum(math.exp(v) for v in row)) - row[label]
    return total / len(target)


def explicit_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum((u - v) ** 2 for u, v in zip(a.flatten().tolist(), b.flatten().tolist())) / a.numel()


def random_inputs(s_shape, t_shape, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    f_s = torch.randn(batch, *s_shape, generator=g, dtype=torch.float64)
    f_t = torch.randn(batch, *t_shape, generator=g, dtype=torch.float64).clamp(min=0)
    logits = torch.randn(batch, 4, generator=g, dtype=torch.float64)
    return f_s, f_t, logits, torch.tensor([0, 3, 1][:batch])


def randomize_norm(method, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in method.modules():
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                module.weight.copy_(torch.rand(module.weight.shape, generator=g, dtype=torch.float64) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("s_shape, t_shape", SHAPES)
def test_regressor_matches_manual_forward(s_shape, t_shape):
    method = build({"stage:0": s_shape}, {"stage:0": t_shape})
    randomize_norm(method)
    f_s, *_ = random_inputs(s_shape, t_shape)
    out = method.regressors[0](f_s)
    assert out.shape == (3, *t_shape)
    torch.testing.assert_close(out, manual_regressor(method.regressors[0], f_s, t_shape))


@pytest.mark.parametrize("s_shape, t_shape", SHAPES)
def test_loss_matches_explicit_mse_and_ce(s_shape, t_shape):
    method = build({"stage:0": s_shape}, {"stage:0": t_shape}, hint_weight=7.0, ce_weight=0.5)
    f_s, f_t, logits, y = random_inputs(s_shape, t_shape)
    terms = method.loss({"logits": logits, "stage:0": f_s}, {"logits": logits, "stage:0": f_t}, y, 0.0)
    assert set(terms) == {"ce", "hint"}
    with torch.no_grad():
        mse = explicit_mse(method.regressors[0](f_s), f_t)
    assert terms["hint"].item() == pytest.approx(7.0 * mse, rel=1e-9)
    assert terms["ce"].item() == pytest.approx(0.5 * manual_ce(logits, y), rel=1e-9)


def test_several_stages_sum_their_hints():
    s_shapes = {"stage:0": (4, 8), "stage:1": (3, 2, 2)}
    t_shapes = {"stage:0": (6, 4), "stage:1": (5, 2, 2)}
    method = build(s_shapes, t_shapes)
    assert len(method.regressors) == 2
    (f0, t0, logits, y), (f1, t1, *_) = random_inputs((4, 8), (6, 4)), random_inputs((3, 2, 2), (5, 2, 2), seed=1)
    terms = method.loss({"logits": logits, "stage:0": f0, "stage:1": f1}, {"stage:0": t0, "stage:1": t1}, y, 0.0)
    with torch.no_grad():
        expected = explicit_mse(method.regressors[0](f0), t0) + explicit_mse(method.regressors[1](f1), t1)
    assert terms["hint"].item() == pytest.approx(100.0 * expected, rel=1e-9)


def test_hand_computed_example():
    # 1 sample, 2 channels, 2 positions, identity 1x1 conv, zero bias; BN in eval mode with its initial running
    # statistics (mean 0, var 1, weight 1, bias 0) is x / sqrt(1 + 1e-5) ≈ x. Then ReLU:
    #   f_s = [[1, -2], [3, 0]] → r(f_s) = [[1, 0], [3, 0]];  f_t = [[0, 1], [2, 2]]
    #   differences [[1, -1], [1, -2]] → squares 1 + 1 + 1 + 4 = 7 → mean 7/4 = 1.75 → × hint_weight 100 = 175.
    # Logits [0, 0] with 2 classes: CE = ln 2.
    method = build({"stage:0": (2, 2)}, {"stage:0": (2, 2)}).eval()
    conv = method.regressors[0][0]
    with torch.no_grad():
        conv.weight.copy_(torch.eye(2, dtype=torch.float64).view(2, 2, 1))
        conv.bias.zero_()
    f_s = torch.tensor([[[1.0, -2.0], [3.0, 0.0]]], dtype=torch.float64)
    f_t = torch.tensor([[[0.0, 1.0], [2.0, 2.0]]], dtype=torch.float64)
    logits = torch.zeros(1, 2, dtype=torch.float64)
    terms = method.loss({"logits": logits, "stage:0": f_s}, {"stage:0": f_t}, torch.tensor([1]), 0.0)
    assert terms["hint"].item() == pytest.approx(175.0, rel=1e-4)
    assert terms["ce"].item() == pytest.approx(math.log(2), rel=1e-9)


def test_kd_term_only_when_weighted():
    method = build({"stage:0": (4, 8)}, {"stage:0": (6, 8)}, kd_weight=0.9, temperature=3.0)
    f_s, f_t, logits, y = random_inputs((4, 8), (6, 8))
    t_logits = logits.flip(1)
    terms = method.loss({"logits": logits, "stage:0": f_s}, {"logits": t_logits, "stage:0": f_t}, y, 0.0)
    assert terms["kd"].item() == pytest.approx(0.9 * kd_loss(logits, t_logits, 3.0).item(), rel=1e-9)


def cnn1d_step(progress: float, **overrides):
    torch.manual_seed(0)
    teacher, student = create_model("cnn1d_w8"), create_model("cnn1d_w4")
    x, y = torch.randn(8, 1, 40), torch.arange(8) % 10
    cls = METHODS.get("fitnets")
    config = validate_config(cls, overrides)
    s_taps, t_taps = cls.taps(config)
    method = cls(config, probe_shapes(student, s_taps, x), probe_shapes(teacher, t_taps, x))
    teacher.requires_grad_(False).eval()
    terms = method.loss(FeatureTaps(student, s_taps)(x), FeatureTaps(teacher, t_taps)(x), y, progress)
    return student, method, terms


def test_defaults_are_repdistiller_on_cnn1d():
    student, method, terms = cnn1d_step(0.0)
    c = method.config
    assert (c.stages, c.hint_weight, c.ce_weight, c.kd_weight) == ((-2,), 100.0, 1.0, 0.0)
    assert set(terms) == {"ce", "hint"}
    # stage -2 is blocks.1: (4, 20) → (8, 20); Conv1d(4, 8, 1) has 32 + 8 parameters, BatchNorm1d(8) 16.
    assert sum(p.numel() for p in method.parameters()) == 56


def test_two_stage_schedule():
    overrides = {"two_stage": True, "kd_weight": 0.9, "hint_fraction": 0.25}
    student, method, terms = cnn1d_step(0.1, **overrides)
    assert terms["ce"].item() == 0 and terms["kd"].item() == 0 and terms["hint"].item() > 0
    sum(terms.values()).backward()
    # Stage 1 trains only the layers up to the guided stage (blocks.0, blocks.1) and the regressor.
    for name, p in student.named_parameters():
        assert (p.grad is not None) == name.startswith(("blocks.0", "blocks.1")), name
    assert all(p.grad is not None for p in method.parameters())
    _, _, terms = cnn1d_step(0.25, **overrides)
    assert terms["hint"].item() == 0 and terms["ce"].item() > 0 and terms["kd"].item() > 0


def test_missing_stage_is_a_clear_error():
    with pytest.raises(KdbenchError, match="stage:7.*3 stages"):
        cnn1d_step(0.0, stages=[7])


@pytest.mark.parametrize("s_shape, t_shape", [((4, 8), (6,)), ((2, 3, 4, 4), (2, 3, 4, 4))])
def test_unsupported_shapes_are_a_clear_error(s_shape, t_shape):
    with pytest.raises(KdbenchError, match="fitnets: stage:0 has student shape"):
        build({"stage:0": s_shape}, {"stage:0": t_shape})


@pytest.mark.parametrize(
    "field, value",
    [("hint_weight", -1.0), ("ce_weight", -0.1), ("kd_weight", -2.0), ("temperature", 0.0), ("stages", []),
     ("hint_fraction", 1.0), ("hint_fraction", 0.0), ("beta", 1.0)],
)
def test_bad_hyperparameters_name_the_field(field, value):
    with pytest.raises(KdbenchError, match=f"method fitnets: {field}"):
        validate_config(METHODS.get("fitnets"), {field: value})
