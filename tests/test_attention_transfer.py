"""Attention transfer against an independent numpy computation of the attention maps, and a tiny example
worked out by hand."""

import math

import numpy as np
import pytest
import torch

from kdbench.errors import KdbenchError
from kdbench.taps import probe_shapes
from kdbench.method import METHODS, validate_config
from kdbench.models import create_model


def build(s_shapes: dict, t_shapes: dict, **overrides):
    cls = METHODS.get("attention_transfer")
    config = validate_config(cls, {"stages": [int(tap.split(":")[1]) for tap in s_shapes], **overrides})
    return cls(config, s_shapes, t_shapes)


def np_pool(f: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Average pooling by integer factors: each spatial axis split into ``size`` equal blocks."""
    for axis, n_out in enumerate(size, start=2):
        shape = f.shape[:axis] + (n_out, f.shape[axis] // n_out) + f.shape[axis + 1 :]
        f = f.reshape(shape).mean(axis=axis + 1)
    return f


def np_attention(f: np.ndarray, p: float) -> np.ndarray:
    q = np.zeros((f.shape[0], int(np.prod(f.shape[2:]))))
    for b in range(f.shape[0]):
        q[b] = (np.abs(f[b]) ** p).mean(axis=0).ravel()
        q[b] /= math.sqrt((q[b] ** 2).sum())
    return q


def np_at_loss(f_s: np.ndarray, f_t: np.ndarray, p: float) -> float:
    size = tuple(min(s, t) for s, t in zip(f_s.shape[2:], f_t.shape[2:]))
    diff = np_attention(np_pool(f_s, size), p) - np_attention(np_pool(f_t, size), p)
    return float((diff**2).sum() / diff.size)


def np_ce(logits: np.ndarray, target: np.ndarray) -> float:
    return float(np.mean([np.log(np.exp(row).sum()) - row[y] for row, y in zip(logits, target)]))


def random_tensors(s_shape, t_shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, *s_shape, generator=g), torch.randn(4, *t_shape, generator=g)


LOGITS, TARGET = torch.randn(4, 3, generator=torch.Generator().manual_seed(9)), torch.tensor([0, 2, 1, 1])


@pytest.mark.parametrize(
    "s_shape, t_shape",
    [
        ((3, 8), (5, 8)),
        ((3, 8), (5, 4)),  # student pooled
        ((3, 4), (5, 12)),  # teacher pooled
        ((3, 4, 4), (5, 4, 4)),
        ((3, 4, 6), (5, 2, 3)),
        ((3, 4, 3), (5, 2, 6)),  # student pooled along H, teacher along W
    ],
)
@pytest.mark.parametrize("p", [2.0, 1.0, 3.0])
def test_matches_numpy(s_shape, t_shape, p):
    f_s, f_t = random_tensors(s_shape, t_shape)
    method = build({"stage:1": s_shape}, {"stage:1": t_shape}, p=p, beta=250.0, ce_weight=0.3)
    terms = method.loss({"logits": LOGITS, "stage:1": f_s}, {"logits": LOGITS, "stage:1": f_t}, TARGET, 0.0)
    assert terms["at"].item() == pytest.approx(250.0 * np_at_loss(f_s.numpy(), f_t.numpy(), p), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(0.3 * np_ce(LOGITS.numpy(), TARGET.numpy()), rel=1e-5)


def test_stages_are_summed():
    shapes = [((3, 8), (5, 8)), ((3, 4, 4), (5, 2, 2)), ((2, 6), (4, 3))]
    s_shapes = {f"stage:{i}": s for i, (s, _) in enumerate(shapes)}
    t_shapes = {f"stage:{i}": t for i, (_, t) in enumerate(shapes)}
    feats = [random_tensors(s, t, seed=i) for i, (s, t) in enumerate(shapes)]
    student = {"logits": LOGITS, **{f"stage:{i}": f for i, (f, _) in enumerate(feats)}}
    teacher = {f"stage:{i}": f for i, (_, f) in enumerate(feats)}
    terms = build(s_shapes, t_shapes).loss(student, teacher, TARGET, 0.0)
    expected = sum(np_at_loss(f_s.numpy(), f_t.numpy(), 2.0) for f_s, f_t in feats)
    assert terms["at"].item() == pytest.approx(1000.0 * expected, rel=1e-5)


def test_hand_computed_example():
    # 1 sample, 2 channels, 2 positions, p = 2.
    #   f_s = [[1, 0], [1, 2]] → mean_c f² = [(1+1)/2, (0+4)/2] = [1, 2] → normalised [1, 2]/√5
    #   f_t = [[1, 1], [1, 1]] → [1, 1] → [1, 1]/√2
    #   Σ (diff)² = (1/5 + 4/5) + (1/2 + 1/2) − 2·(1 + 2)/√10 = 2 − 6/√10; mean over 2 positions = 1 − 3/√10
    #   × beta 1000 = 1000 · (1 − 3/√10) ≈ 51.3167.  Logits [0, 0]: CE = ln 2.
    f_s = torch.tensor([[[1.0, 0.0], [1.0, 2.0]]])
    f_t = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]])
    terms = build({"stage:0": (2, 2)}, {"stage:0": (2, 2)}).loss(
        {"logits": torch.zeros(1, 2), "stage:0": f_s}, {"stage:0": f_t}, torch.tensor([0]), 0.0
    )
    assert terms["at"].item() == pytest.approx(1000 * (1 - 3 / math.sqrt(10)), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(math.log(2), rel=1e-6)


def test_attention_ignores_scale_and_matches_itself():
    f_s, _ = random_tensors((3, 4, 4), (3, 4, 4))
    method = build({"stage:0": (3, 4, 4)}, {"stage:0": (6, 4, 4)})
    teacher = {"stage:0": torch.cat([3 * f_s, -2 * f_s], dim=1)}  # |A|² averaged over channels ∝ the student's
    terms = method.loss({"logits": LOGITS, "stage:0": f_s}, teacher, TARGET, 0.0)
    assert terms["at"].item() == pytest.approx(0.0, abs=1e-9)


def test_defaults():
    cls = METHODS.get("attention_transfer")
    config = cls.Config()
    assert (config.stages, config.beta, config.p, config.ce_weight) == ((-3, -2, -1), 1000.0, 2.0, 1.0)
    assert cls.taps(config) == (("logits", "stage:-3", "stage:-2", "stage:-1"),) * 2


def test_missing_stage_is_a_clear_error():
    cls = METHODS.get("attention_transfer")
    s_taps, _ = cls.taps(validate_config(cls, {"stages": [7]}))
    with pytest.raises(KdbenchError, match="stage:7.*3 stages"):
        probe_shapes(create_model("cnn1d_w4"), s_taps, torch.randn(2, 1, 40))


@pytest.mark.parametrize("s_shape, t_shape", [((8,), (16,)), ((4, 8), (4, 8, 8))])
def test_non_maps_are_a_clear_error(s_shape, t_shape):
    with pytest.raises(KdbenchError, match="attention_transfer: stage:0 has student shape"):
        build({"stage:0": s_shape}, {"stage:0": t_shape})


@pytest.mark.parametrize(
    "field, value", [("beta", -1.0), ("p", 0.5), ("p", 0.0), ("ce_weight", -1.0), ("stages", []), ("temperature", 4.0)]
)
def test_bad_hyperparameters_name_the_field(field, value):
    with pytest.raises(KdbenchError, match=f"method attention_transfer: {field}"):
        validate_config(METHODS.get("attention_transfer"), {field: value})
