"""Review KD against values worked out by hand (the HCL pyramid on a 4×4 map and a length-8 signal, a whole review
path with fixed modules) and against an independent float64 re-implementation of the reference code (the
ABF/ReviewKD/hcl of dvlab-research/ReviewKD and mdistiller), value and gradient, on 1-D and 2-D maps."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.method import METHODS, validate_config
from kdbench.models import create_model
from kdbench.taps import probe_shapes, resolve_tap

from conftest import CRD_PAIRS, method_module, zoo_step

NAME = "review_kd"


def build(s_shapes: dict, t_shapes: dict, **overrides):
    cls = METHODS.get(NAME)
    stages = [int(tap.split(":")[1]) for tap in s_shapes if tap.startswith("stage:")]
    config = validate_config(cls, {"stages": stages, "pooled": "embedding" in s_shapes, **overrides})
    return cls(config, s_shapes, t_shapes)


# --------------------------------------------------------------------------------------------------- by hand


def test_hcl_by_hand_on_a_4x4_map():
    # d = student − teacher = [[1..4], [5..8], [9..12], [13..16]] (teacher 0), one sample, one channel.
    #   full MSE = Σ k² / 16 = 1496 / 16 = 93.5
    #   level 4: skipped (4 ≥ h = 4)
    #   level 2 (weight ½): block means 3.5, 5.5, 11.5, 13.5 → (12.25 + 30.25 + 132.25 + 182.25) / 4 = 89.25
    #   level 1 (weight ¼): mean 8.5 → 72.25
    #   HCL = (93.5 + ½ · 89.25 + ¼ · 72.25) / (1 + ½ + ¼) = 156.1875 / 1.75 = 89.25
    d = torch.arange(1.0, 17.0).view(1, 1, 4, 4)
    hcl = method_module(NAME).hcl
    assert hcl(d, torch.zeros_like(d), (4, 2, 1)).item() == pytest.approx(89.25, rel=1e-6)
    # a teacher offset changes nothing but the difference: student d + 3, teacher 3
    assert hcl(d + 3, torch.full_like(d, 3.0), (4, 2, 1)).item() == pytest.approx(89.25, rel=1e-6)
    # hcl_levels (2,): (93.5 + ½ · 89.25) / 1.5
    assert hcl(d, torch.zeros_like(d), (2,)).item() == pytest.approx((93.5 + 44.625) / 1.5, rel=1e-6)
    # no levels: the plain MSE
    assert hcl(d, torch.zeros_like(d), ()).item() == pytest.approx(93.5, rel=1e-6)


def test_hcl_by_hand_on_a_length_8_signal_and_a_1x1_map():
    # d = [1..8]: full MSE 204 / 8 = 25.5; all of 4, 2, 1 are < 8, weights ½, ¼, ⅛, total 1.875
    #   pooled to 4: [1.5, 3.5, 5.5, 7.5] → 101 / 4 = 25.25;  to 2: [2.5, 6.5] → 48.5 / 2 = 24.25;
    #   to 1: 4.5² = 20.25
    d = torch.arange(1.0, 9.0).view(1, 1, 8)
    expected = (25.5 + 25.25 / 2 + 24.25 / 4 + 20.25 / 8) / 1.875
    hcl = method_module(NAME).hcl
    assert hcl(d, torch.zeros_like(d), (4, 2, 1)).item() == pytest.approx(expected, rel=1e-6)
    # two samples, two channels, 1×1 (the pooled level): every level is skipped, plain MSE
    g = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(2, 2, 1, 1)
    f = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).view(2, 2, 1, 1)
    assert hcl(g, f, (4, 2, 1)).item() == pytest.approx((1 + 4 + 4 + 9) / 4, rel=1e-6)


def fix_modules(method):
    """Identity 1×1 convs, a centre-tap-only 3-wide conv2, attention logits 0 (both weights ½), identity BN."""
    method.eval()
    with torch.no_grad():
        for abf in method.abfs:
            abf.conv1[0].weight.fill_(1.0)
            abf.conv2[0].weight.zero_()
            abf.conv2[0].weight[:, :, 1] = 1.0
            if abf.att_conv is not None:
                abf.att_conv[0].weight.zero_()
                abf.att_conv[0].bias.zero_()
    for module in method.modules():
        if isinstance(module, nn.BatchNorm1d):
            module.eps = 0.0  # eval mode, running mean 0, var 1, weight 1, bias 0: the identity


@pytest.mark.parametrize("pooled", [False, True])
def test_review_path_by_hand(pooled):
    # 1-D, one sample, one channel everywhere, so M = 1.  Student stage 0 = [2, 4], stage 1 = [6], embedding [7];
    # teacher stage 0 = [1, 3], stage 1 = [3], embedding [5].
    # pooled = False: deepest (stage 1) G₂ = 6, residual 6; stage 0: ½ · [2, 4] + ½ · [6, 6] = [4, 5] = G₁.
    #   HCL₁ (h = 2: only level 1, weight ½): (((4−1)² + (5−3)²) / 2 + ½ (4.5 − 2)²) / 1.5
    #        = (6.5 + 3.125) / 1.5
    #   HCL₂ = (6 − 3)² = 9
    # pooled = True: G₃ = 7, residual 7; stage 1: ½ · 6 + ½ · 7 = 6.5 = G₂;
    #   stage 0: ½ [2, 4] + ½ [6.5, 6.5] = [4.25, 5.25] = G₁
    #   HCL₁ = ((3.25² + 2.25²) / 2 + ½ (4.75 − 2)²) / 1.5 = (7.8125 + 3.78125) / 1.5;  HCL₂ = 3.5²;  HCL₃ = 2²
    s_shapes = {"stage:0": (1, 2), "stage:1": (1, 1), **({"embedding": (1,)} if pooled else {})}
    method = build(s_shapes, dict(s_shapes), ce_weight=0.5)
    fix_modules(method)
    student = {"logits": torch.zeros(1, 2), "stage:0": torch.tensor([[[2.0, 4.0]]]), "stage:1": torch.tensor([[[6.0]]]),
               "embedding": torch.tensor([[7.0]])}
    teacher = {"logits": torch.zeros(1, 2), "stage:0": torch.tensor([[[1.0, 3.0]]]), "stage:1": torch.tensor([[[3.0]]]),
               "embedding": torch.tensor([[5.0]])}
    review = (7.8125 + 3.78125) / 1.5 + 12.25 + 4.0 if pooled else (6.5 + 3.125) / 1.5 + 9.0
    terms = method.loss(student, teacher, torch.tensor([1]), 1.0)
    assert set(terms) == {"ce", "review"}
    assert terms["review"].item() == pytest.approx(5.0 * review, rel=1e-6)
    assert terms["ce"].item() == pytest.approx(0.5 * math.log(2), rel=1e-6)
    # warm-up: a quarter of the way through the 20/240 warm-up, a quarter of the weight; none at the start
    assert method.loss(student, teacher, torch.tensor([1]), 5 / 240)["review"].item() == pytest.approx(
        5.0 * review / 4, rel=1e-6)
    assert method.loss(student, teacher, torch.tensor([1]), 0.0)["review"].item() == 0.0


# ----------------------------------------------------------------------- reference code, re-implemented in float64


class RefABF(nn.Module):
    """The reference's ABF for square 2-D maps, or (dims = 1) its 1-D counterpart; sizes given as ints."""

    def __init__(self, dims, in_channel, mid_channel, out_channel, fuse):
        super().__init__()
        conv, bn = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
        self.dims = dims
        self.conv1 = nn.Sequential(conv(in_channel, mid_channel, kernel_size=1, bias=False), bn(mid_channel))
        self.conv2 = nn.Sequential(conv(mid_channel, out_channel, kernel_size=3, stride=1, padding=1, bias=False),
                                   bn(out_channel))
        self.att_conv = nn.Sequential(conv(mid_channel * 2, 2, kernel_size=1), nn.Sigmoid()) if fuse else None

    def forward(self, x, y=None, shape=None, out_shape=None):
        n, positions = x.shape[0], x.shape[2:]
        x = self.conv1(x)
        if self.att_conv is not None:
            y = F.interpolate(y, (shape,) * self.dims, mode="nearest")
            z = self.att_conv(torch.cat([x, y], dim=1))
            x = x * z[:, 0].view(n, 1, *positions) + y * z[:, 1].view(n, 1, *positions)
        if x.shape[-1] != out_shape:
            x = F.interpolate(x, (out_shape,) * self.dims, mode="nearest")
        y = self.conv2(x)
        return y, x


class RefReviewKD(nn.Module):
    """The reference's ReviewKD wrapper: in/out channels shallow → deep, shapes and out_shapes deep → shallow."""

    def __init__(self, dims, in_channels, out_channels, shapes, out_shapes, max_mid=512):
        super().__init__()
        self.shapes, self.out_shapes = shapes, out_shapes
        mid_channel = min(max_mid, in_channels[-1])
        abfs = nn.ModuleList(RefABF(dims, c, mid_channel, out_channels[idx], idx < len(in_channels) - 1)
                             for idx, c in enumerate(in_channels))
        self.abfs = abfs[::-1]

    def forward(self, features):
        x = features[::-1]
        results = []
        out_features, res_features = self.abfs[0](x[0], out_shape=self.out_shapes[0])
        results.append(out_features)
        for feat, abf, shape, out_shape in zip(x[1:], self.abfs[1:], self.shapes[1:], self.out_shapes[1:]):
            out_features, res_features = abf(feat, res_features, shape, out_shape)
            results.insert(0, out_features)
        return results


def ref_hcl(fstudent, fteacher):
    loss_all = 0.0
    for fs, ft in zip(fstudent, fteacher):
        h = fs.shape[2]
        pool = F.adaptive_avg_pool1d if fs.dim() == 3 else F.adaptive_avg_pool2d
        loss = F.mse_loss(fs, ft, reduction="mean")
        cnt = tot = 1.0
        for l in [4, 2, 1]:
            if l >= h:
                continue
            size = l if fs.dim() == 3 else (l, l)
            cnt /= 2.0
            loss = loss + F.mse_loss(pool(fs, size), pool(ft, size), reduction="mean") * cnt
            tot += cnt
        loss_all = loss_all + loss / tot
    return loss_all


# (student stage shapes, teacher stage shapes), shallow to deep; embeddings have the deepest stage's channels.
CASES = {
    "1d": ([(3, 16), (4, 8), (5, 4)], [(6, 16), (7, 8), (8, 4)]),
    "1d-sizes-differ": ([(3, 16), (4, 8), (5, 4)], [(6, 8), (7, 16), (8, 2)]),
    "2d": ([(3, 8, 8), (4, 4, 4), (5, 2, 2)], [(6, 8, 8), (7, 4, 4), (8, 2, 2)]),
    "2d-sizes-differ": ([(3, 8, 8), (4, 4, 4), (5, 2, 2)], [(6, 4, 4), (7, 8, 8), (8, 1, 1)]),
}


def random_batch(s_levels, t_levels, pooled, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = {f"stage:{i}": torch.randn(batch, *s, generator=g, dtype=torch.float64) for i, s in enumerate(s_levels)}
    teacher = {f"stage:{i}": torch.randn(batch, *t, generator=g, dtype=torch.float64) for i, t in enumerate(t_levels)}
    if pooled:
        student["embedding"] = torch.randn(batch, s_levels[-1][0], generator=g, dtype=torch.float64)
        teacher["embedding"] = torch.randn(batch, t_levels[-1][0], generator=g, dtype=torch.float64)
    student["logits"] = torch.randn(batch, 5, generator=g, dtype=torch.float64)
    teacher["logits"] = torch.randn(batch, 5, generator=g, dtype=torch.float64)
    for value in student.values():
        value.requires_grad_(True)
    return student, teacher, torch.tensor([0, 4, 2][:batch])


def randomize_norms(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=m.weight.dtype) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype))


def with_levels(student, teacher, n, pooled, dims):
    """The reference's feature lists: the stage maps and the embedding as a 1×1 map, shallow → deep."""
    def levels(taps):
        maps = [taps[f"stage:{i}"] for i in range(n)]
        return maps + ([taps["embedding"].view(*taps["embedding"].shape, *(1,) * dims)] if pooled else [])
    return levels(student), levels(teacher)


@pytest.mark.parametrize("pooled", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_reference_code(case, pooled):
    s_levels, t_levels = CASES[case]
    dims = len(s_levels[0]) - 1
    s_shapes = {f"stage:{i}": s for i, s in enumerate(s_levels)}
    t_shapes = {f"stage:{i}": t for i, t in enumerate(t_levels)}
    if pooled:
        s_shapes["embedding"], t_shapes["embedding"] = (s_levels[-1][0],), (t_levels[-1][0],)
    method = build(s_shapes, t_shapes, review_weight=2.5, ce_weight=0.7).double().train()
    randomize_norms(method)

    all_s = s_levels + ([(s_levels[-1][0],) + (1,) * dims] if pooled else [])
    all_t = t_levels + ([(t_levels[-1][0],) + (1,) * dims] if pooled else [])
    ref = RefReviewKD(dims, [s[0] for s in all_s], [t[0] for t in all_t],
                      [s[1] for s in all_s][::-1], [t[1] for t in all_t][::-1]).double().train()
    # copy the parameters: the method's abfs[i] is level i (shallow → deep), the reference's abfs are deep → shallow
    for i, abf in enumerate(method.abfs):
        ref.abfs[len(method.abfs) - 1 - i].load_state_dict(abf.state_dict())

    student, teacher, y = random_batch(s_levels, t_levels, pooled)
    progress = 0.05  # inside the warm-up: weight 0.05 · 240 / 20 = 0.6
    terms = method.loss(student, teacher, y, progress)
    s_feats, t_feats = with_levels(student, teacher, len(s_levels), pooled, dims)
    ref_review = 2.5 * min(progress * 240 / 20, 1.0) * ref_hcl(ref(s_feats), t_feats)
    ref_ce = 0.7 * F.cross_entropy(student["logits"], y)
    torch.testing.assert_close(terms["review"], ref_review, rtol=1e-5, atol=0)
    torch.testing.assert_close(terms["ce"], ref_ce, rtol=1e-5, atol=0)

    inputs = [v for k, v in student.items()]
    got = torch.autograd.grad(terms["review"] + terms["ce"], inputs)
    want = torch.autograd.grad(ref_review + ref_ce, inputs)
    for name, a, b in zip(student, got, want):
        assert b.abs().sum() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-12, msg=name)
    # and the gradients of the method's own parameters
    got = torch.autograd.grad(method.review_loss(student, teacher), list(method.abfs[0].parameters()))
    want = torch.autograd.grad(ref_hcl(ref(s_feats), t_feats), list(ref.abfs[-1].parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-12)


# ------------------------------------------------------------------------------------------------ config options


def test_defaults():
    cls = METHODS.get(NAME)
    c = cls.Config()
    assert (c.stages, c.pooled, c.review_weight, c.ce_weight, c.max_mid_channel, c.hcl_levels) == (
        (-3, -2, -1), True, 5.0, 1.0, 512, (4, 2, 1))
    assert c.warmup_fraction == pytest.approx(20 / 240)
    assert cls.taps(c) == (("logits", "stage:-3", "stage:-2", "stage:-1", "embedding"),) * 2
    assert cls.taps(validate_config(cls, {"pooled": False}))[0] == ("logits", "stage:-3", "stage:-2", "stage:-1")


def test_modules_follow_the_shapes():
    s = {"stage:0": (3, 8, 8), "stage:1": (6, 4, 4), "embedding": (6,)}
    t = {"stage:0": (5, 4, 4), "stage:1": (9, 2, 2), "embedding": (11,)}
    method = build(s, t)
    assert len(method.abfs) == 3
    assert [abf.att_conv is not None for abf in method.abfs] == [True, True, False]  # the deepest is not fused
    assert [abf.conv1[0].in_channels for abf in method.abfs] == [3, 6, 6]
    assert [abf.conv2[0].out_channels for abf in method.abfs] == [5, 9, 11]
    assert {abf.conv1[0].out_channels for abf in method.abfs} == {6}  # M = min(512, 6)
    assert isinstance(method.abfs[0].conv1[0], nn.Conv2d)
    capped = build(s, t, max_mid_channel=4)
    assert {abf.conv1[0].out_channels for abf in capped.abfs} == {4}
    assert len(build({"stage:0": (3, 8)}, {"stage:0": (5, 8)}).abfs) == 1
    assert isinstance(build({"stage:0": (3, 8)}, {"stage:0": (5, 8)}).abfs[0].conv2[0], nn.Conv1d)


def test_weights_and_warmup_options():
    s_levels, t_levels = CASES["2d"]
    s_shapes = {f"stage:{i}": s for i, s in enumerate(s_levels)}
    t_shapes = {f"stage:{i}": t for i, t in enumerate(t_levels)}
    student, teacher, y = random_batch(s_levels, t_levels, pooled=False)

    def terms(progress, **overrides):
        torch.manual_seed(0)
        method = build(s_shapes, t_shapes, **overrides).double()
        return {k: v.item() for k, v in method.loss(student, teacher, y, progress).items()}

    base = terms(0.5)
    assert base["review"] > 0
    assert terms(0.5, review_weight=1.0)["review"] == pytest.approx(base["review"] / 5, rel=1e-9)
    assert terms(0.5, ce_weight=0.25)["ce"] == pytest.approx(base["ce"] / 4, rel=1e-9)
    assert terms(0.0)["review"] == 0.0
    assert terms(10 / 240)["review"] == pytest.approx(base["review"] / 2, rel=1e-9)
    assert terms(0.0, warmup_fraction=0.0)["review"] == pytest.approx(base["review"], rel=1e-9)
    assert terms(0.1, warmup_fraction=0.4)["review"] == pytest.approx(base["review"] / 4, rel=1e-9)
    # hcl_levels: only level 1 instead of 4, 2, 1 changes the 8×8 and 4×4 levels' pyramids
    assert terms(0.5, hcl_levels=[1])["review"] != pytest.approx(base["review"], rel=1e-3)


@pytest.mark.parametrize("field, value", [
    ("review_weight", -1.0), ("ce_weight", -0.5), ("warmup_fraction", 1.5), ("warmup_fraction", -0.1),
    ("max_mid_channel", 0), ("hcl_levels", [2, 0]), ("stages", []), ("stages", [-1, -2]), ("stages", [0, -1]),
    ("stages", [1, 1]), ("temperature", 4.0),
])
def test_bad_hyperparameters_name_the_field(field, value):
    with pytest.raises(KdbenchError, match=f"method {NAME}: {field}"):
        validate_config(METHODS.get(NAME), {field: value})


@pytest.mark.parametrize("s_shape, t_shape", [((4, 8), (6,)), ((2, 3, 4, 4), (2, 3, 4, 4)), ((4, 8), (4, 8, 8))])
def test_non_maps_are_a_clear_error(s_shape, t_shape):
    with pytest.raises(KdbenchError, match="review_kd: stage:0 has student shape"):
        build({"stage:0": s_shape}, {"stage:0": t_shape})


def test_token_models_are_refused_in_one_line():
    shapes = {"logits": (2,), "stage:0": (16, 32), "embedding": (32,), "mask": (16,)}
    with pytest.raises(KdbenchError, match="review_kd: needs feature maps") as info:
        build({k: v for k, v in shapes.items() if k != "logits"}, shapes)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------- real models


def test_cpu_convnet_defaults():
    torch.manual_seed(0)
    teacher, student = create_model("cnn1d_w32"), create_model("cnn1d_w8")
    x = torch.randn(4, 1, 40)
    cls = METHODS.get(NAME)
    config = cls.Config()
    s_taps, t_taps = cls.taps(config)
    method = cls(config, probe_shapes(student, s_taps, x), probe_shapes(teacher, t_taps, x))
    # three stages (8 channels, lengths 40, 20, 10) and the flattened last map (80) as a 1×1 level; M = 8
    assert [abf.conv1[0].in_channels for abf in method.abfs] == [8, 8, 8, 80]
    assert [abf.conv2[0].out_channels for abf in method.abfs] == [32, 32, 32, 320]
    assert {abf.conv1[0].out_channels for abf in method.abfs} == {8}


@pytest.mark.parametrize("teacher_name, student_name", CRD_PAIRS)
def test_builds_and_steps_on_the_crd_zoo(teacher_name, student_name):
    run = zoo_step(NAME, teacher_name, student_name, [3, 7], train_size=100, progress=0.5)
    teacher, student, method, terms = run.teacher, run.student, run.method, run.terms
    t_taps, t_shapes = run.t_taps, run.t_shapes
    assert len(method.abfs) == 4
    assert [abf.conv2[0].out_channels for abf in method.abfs] == [t_shapes[t][0] for t in t_taps[1:]]
    assert set(terms) == {"ce", "review"} and all(torch.isfinite(v) for v in terms.values())
    terms["review"].backward()  # the review term alone reaches the student's shallowest reviewed stage
    first = resolve_tap(student, "stage:-3")
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in first.parameters())
    assert all(p.grad is not None for p in method.parameters())
    assert all(p.grad is None for p in teacher.parameters())
