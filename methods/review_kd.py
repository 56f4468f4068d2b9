"""Review KD: Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021 (arXiv:2104.09044).

Reference implementations: megvii-research/mdistiller, ``mdistiller/distillers/ReviewKD.py`` (``ReviewKD``,
``ABF``, ``hcl_loss``) with ``mdistiller/engine/cfg.py`` (``CFG.REVIEWKD``) and ``configs/cifar100/reviewkd.yaml``
— the primary reference, followed here; dvlab-research/ReviewKD (the authors' code), ``CIFAR-100/model/reviewkd.py``
(``ABF``, ``ReviewKD``, ``build_review_kd``, ``hcl``), ``CIFAR-100/train.py`` and ``CIFAR-100/script/reviewKD.sh``.
The two compute the same loss; they differ only in where the settings live (mdistiller: a config with
SHAPES/OUT_SHAPES/IN_CHANNELS/OUT_CHANNELS and CE_WEIGHT; the authors' code: per-architecture lists in
``build_review_kd``, command-line weights) and in the warm-up's first epoch (below).

Formula. The student features F_s^1 … F_s^n are the chosen stage maps, shallow to deep, followed (``pooled``) by
the classifier's input as a 1×1 map (the ``embedding`` tap, reshaped to (D, 1) or (D, 1, 1)); the teacher's
features F_t^1 … F_t^n are the same taps of the teacher. The review path runs from deep to shallow through one
attention-based fusion module (ABF, the method's own trainable modules) per level i:

    x_i      = BN(conv1×1(F_s^i))                                         C_s^i → M channels, the student's size
    r_{i+1}' = nearest-neighbour interpolation of r_{i+1} to x_i's size   (no r for the deepest level i = n)
    (a, b)   = sigmoid(conv1×1([x_i, r_{i+1}']))                          two attention maps, one per position
    r_i      = a · x_i + b · r_{i+1}'          (deepest level: r_n = x_n), then interpolated (nearest) to the
                                                teacher's size at level i if it differs
    G_i      = BN(conv3×3(r_i))                                           M → C_t^i channels, padding 1

with M = min(max_mid_channel, C_s of the deepest stage map) (reference: ``min(512, in_channels[-1])``), the
convolutions without bias except the attention one, the conv1×1/conv3×3 weights kaiming-uniform with a = 1
(reference init). 1-D maps (C, L) use Conv1d/BatchNorm1d, 2-D maps (C, H, W) Conv2d/BatchNorm2d. The hierarchical
context loss compares each G_i with F_t^i:

    HCL(G, F) = [ MSE(G, F) + Σ_{k ∈ K(h)} w_k · MSE(P_k(G), P_k(F)) ] / (1 + Σ_{k ∈ K(h)} w_k)

where MSE is the mean over batch, channels and positions, P_k is adaptive average pooling to k × k (2-D) or k
(1-D), h is the map's first spatial size (H, or L), K(h) are the levels of ``hcl_levels`` = (4, 2, 1) smaller
than h (levels ≥ h are skipped), and the weights halve with each level used: 1/2, 1/4, 1/8 (so a 4×4 map gets
[MSE + ½ MSE_2×2 + ¼ MSE_1×1] / 1.75, an 8×8 map [MSE + ½ MSE_4×4 + ¼ MSE_2×2 + ⅛ MSE_1×1] / 1.875, a 1×1
map plain MSE). With progress p ∈ [0, 1] of training and target labels y,

    L = ce_weight · CE(z_s, y) + review_weight · min(p / warmup_fraction, 1) · Σ_i HCL(G_i, F_t^i)

Defaults (source): review_weight = 5.0 (mdistiller ``configs/cifar100/reviewkd.yaml`` REVIEWKD_WEIGHT 5.0, its
only CIFAR-100 ReviewKD config, for resnet32x4 → resnet8x4; the authors' ``script/reviewKD.sh``
``--kd-loss-weight 5.0`` for resnet32x4 → resnet8x4 and wrn-40-2 → wrn-16-2. Per pair the authors use 0.6 for
resnet56 → resnet20 and 1.0 for resnet110 → resnet32, and publish none for vgg13 → vgg8; the code defaults,
``CFG.REVIEWKD.REVIEWKD_WEIGHT`` and ``--kd-loss-weight``, are 1.0). ce_weight = 1.0 (``CFG.REVIEWKD.CE_WEIGHT``;
``--ce-loss-weight`` 1.0). warmup_fraction = 20/240 (``CFG.REVIEWKD.WARMUP_EPOCHS`` 20 and ``--kd-warm-up`` 20 of
the CRD protocol's 240 epochs). max_mid_channel = 512 (``CFG.REVIEWKD.MAX_MID_CHANNEL``; the ``min(512, ·)`` of
both codes). hcl_levels = (4, 2, 1) (``hcl``/``hcl_loss``). stages = (-3, -2, -1) with pooled = True: both codes
review the three residual groups and the pooled feature of the CIFAR ResNets and WRNs (mdistiller: the student's
``feats`` + ``pooled_feat``, the teacher's ``preact_feats[1:]`` + ``pooled_feat``; the authors' in_channels
e.g. [64, 128, 256, 256] for resnet8x4), i.e. every stage but the stem, plus the classifier's input; on the
3-stage models of the CPU tracks (cnn1d_*, cnn2d_*) the three stages are all of them.

Deviations:
- Teacher features are the stage taps as kdbench exposes them: post-ReLU outputs for the ResNets, VGGs and CPU
  convnets, the raw residual sums for the WRNs. Both references distil to the teacher's pre-ReLU ("preact")
  features, which kdbench does not tap (kdbench/models/cifar.py). The student side matches mdistiller
  (STU_PREACT False: post-ReLU ``feats``).
- Default stages on VGG: (-3, -2, -1) are blocks 2–4; the references also review block 1 (128 channels, 16×16):
  set ``stages: [-4, -3, -2, -1]`` for that. The default is a fixed list so that it also exists on 3-stage models.
- Shapes and channels come from the tap shapes the method is built with (the references hard-code SHAPES,
  OUT_SHAPES, IN_CHANNELS, OUT_CHANNELS per architecture); sizes are compared as whole tuples (the references
  compare only the last side of square maps); the same construction runs on 1-D maps with Conv1d, BatchNorm1d,
  1-D nearest interpolation and adaptive_avg_pool1d, pooling to k positions. For non-square 2-D maps the HCL
  levels are still k × k, skipped when k ≥ H, as the reference.
- M is computed from the deepest *stage* map's channels, not from the pooled level's: the same number on every
  CRD-zoo model (the pooled feature has the last stage's channels there), but on the CPU convnets the
  classifier's input is the flattened last map (C · L or C · H · W values, not a pooled vector), which is
  nevertheless fed, as in the references, as the deepest 1×1 level (``pooled: false`` leaves it out; the
  deepest stage then gets the un-fused ABF).
- Warm-up: min(p / warmup_fraction, 1) rises per step, continuously from 0; the references multiply by
  min(epoch / 20, 1) per epoch (a staircase; the authors' epochs count from 0, so their first epoch has no review
  term, mdistiller's from 1).
- Transformer hidden states (L, H) are refused in the constructor: the ABFs and the HCL pyramid need feature
  maps (C, positions) whose sizes shrink with depth.
"""

from __future__ import annotations

from typing import Annotated

from optuna.distributions import FloatDistribution
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.losses import summed
from kdbench.method import Method, MethodConfig, register_method
from kdbench.taps import EMBEDDING, is_token_sequence

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d}


class ReviewKDConfig(MethodConfig):
    stages: tuple[int, ...] = Field(
        default=(-3, -2, -1), min_length=1,
        description="stage indices reviewed, shallow to deep (references: every stage but the stem: -3, -2, -1)")
    pooled: bool = Field(
        default=True, description="add the classifier's input (embedding tap) as the deepest 1×1 level (references)")
    review_weight: float = Field(
        default=5.0, ge=0,
        description="weight of the summed HCL losses (mdistiller cifar100/reviewkd.yaml REVIEWKD_WEIGHT: 5.0)")
    ce_weight: float = Field(default=1.0, ge=0, description="weight of CE on hard labels (CFG.REVIEWKD.CE_WEIGHT: 1.0)")
    warmup_fraction: float = Field(
        default=20 / 240, ge=0, le=1,
        description="share of training over which the review weight rises linearly from 0 (WARMUP_EPOCHS 20 of 240)")
    max_mid_channel: int = Field(
        default=512, gt=0, description="cap on the ABFs' middle channel count M (MAX_MID_CHANNEL: 512)")
    hcl_levels: tuple[Annotated[int, Field(gt=0)], ...] = Field(
        default=(4, 2, 1), description="HCL pooling sizes, weights halving from 1/2 (hcl_loss: [4, 2, 1])")

    @field_validator("stages")
    @classmethod
    def _shallow_to_deep(cls, stages):
        if not (all(i >= 0 for i in stages) or all(i < 0 for i in stages)) or list(stages) != sorted(set(stages)):
            raise ValueError("stages must be strictly increasing (shallow to deep), all ≥ 0 or all negative")
        return stages


def stage_taps(config: ReviewKDConfig) -> tuple[str, ...]:
    return tuple(f"stage:{i}" for i in config.stages)


def _interpolate(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    return x if tuple(x.shape[2:]) == tuple(size) else F.interpolate(x, size=tuple(size), mode="nearest")


class ABF(nn.Module):
    """Attention-based fusion of one level: the student map and the deeper levels' residual → (output, residual)."""

    def __init__(self, dims: int, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        conv, norm = _CONV[dims], _NORM[dims]
        self.conv1 = nn.Sequential(conv(in_channels, mid_channels, 1, bias=False), norm(mid_channels))
        self.conv2 = nn.Sequential(conv(mid_channels, out_channels, 3, padding=1, bias=False), norm(out_channels))
        self.att_conv = nn.Sequential(conv(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, out_size: tuple[int, ...]):
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = _interpolate(residual, x.shape[2:])
            z = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * z[:, :1] + residual * z[:, 1:]
        x = _interpolate(x, out_size)
        return self.conv2(x), x


def hcl(student: torch.Tensor, teacher: torch.Tensor, levels: tuple[int, ...]) -> torch.Tensor:
    """Hierarchical context loss of one level: full-size MSE plus pooled MSEs (weights ½, ¼, …), normalised."""
    pool = _POOL[student.dim() - 2]
    loss, weight, total = F.mse_loss(student, teacher), 1.0, 1.0
    for k in levels:
        if k >= student.shape[2]:
            continue
        weight /= 2
        size = (k,) * (student.dim() - 2)
        loss = loss + weight * F.mse_loss(pool(student, size), pool(teacher, size))
        total += weight
    return loss / total


@register_method("review_kd")
class ReviewKD(Method):
    """Chen et al. 2021: CE + HCL between teacher maps and student maps fused deep-to-shallow by ABFs."""

    version = 1
    Config = ReviewKDConfig
    search_space = {  # kdbench tune: log-uniform, each holding the default
        "review_weight": FloatDistribution(0.1, 20.0, log=True),
    }

    def __init__(self, config: ReviewKDConfig, student_shapes, teacher_shapes):
        super().__init__(config, student_shapes, teacher_shapes)
        if is_token_sequence(student_shapes) or is_token_sequence(teacher_shapes):
            raise KdbenchError("review_kd: needs feature maps (C, L) or (C, H, W) that shrink with depth for its "
                               "fusion modules and pooled context loss; transformer hidden states (L, H) have none")
        s_levels, t_levels = [], []
        dims = None
        for tap in stage_taps(config):
            s, t = tuple(student_shapes[tap]), tuple(teacher_shapes[tap])
            if len(s) != len(t) or len(s) not in (2, 3) or (dims is not None and len(s) - 1 != dims):
                raise KdbenchError(f"review_kd: {tap} has student shape {s} and teacher shape {t}; every reviewed "
                                   "stage must be a feature map (C, L) or (C, H, W) on both models, of one kind")
            dims = len(s) - 1
            s_levels.append(s)
            t_levels.append(t)
        if config.pooled:
            s, t = tuple(student_shapes[EMBEDDING]), tuple(teacher_shapes[EMBEDDING])
            if len(s) != 1 or len(t) != 1:
                raise KdbenchError(f"review_kd: the embedding has student shape {s} and teacher shape {t}; "
                                   "it must be a vector (D,)")
            s_levels.append((s[0],) + (1,) * dims)
            t_levels.append((t[0],) + (1,) * dims)
        self.dims = dims
        mid = min(config.max_mid_channel, student_shapes[stage_taps(config)[-1]][0])
        self.out_sizes = [t[1:] for t in t_levels]  # teacher sizes, shallow to deep
        # abfs[i] belongs to level i (shallow to deep); the deepest has no fusion.
        self.abfs = nn.ModuleList(
            ABF(dims, s[0], mid, t[0], fuse=i < len(s_levels) - 1)
            for i, (s, t) in enumerate(zip(s_levels, t_levels))
        )

    @classmethod
    def taps(cls, config):
        taps = ("logits", *stage_taps(config), *((EMBEDDING,) if config.pooled else ()))
        return taps, taps

    def _features(self, taps) -> list[torch.Tensor]:
        features = [taps[tap] for tap in stage_taps(self.config)]
        if self.config.pooled:
            embedding = taps[EMBEDDING]
            features.append(embedding.reshape(*embedding.shape, *(1,) * self.dims))
        return features

    def review(self, student) -> list[torch.Tensor]:
        """The ABF outputs G_1 … G_n (shallow to deep), computed deep to shallow."""
        outputs, residual = [], None
        for abf, feature, size in reversed(list(zip(self.abfs, self._features(student), self.out_sizes))):
            out, residual = abf(feature, residual, size)
            outputs.insert(0, out)
        return outputs

    def review_loss(self, student, teacher) -> torch.Tensor:
        """Σ_i HCL(G_i, F_t^i), unweighted."""
        levels = self.config.hcl_levels
        return summed(hcl(g, f, levels) for g, f in zip(self.review(student), self._features(teacher)))

    def loss(self, student, teacher, target, progress):
        c = self.config
        warmup = 1.0 if c.warmup_fraction == 0 else min(progress / c.warmup_fraction, 1.0)
        return {
            "ce": c.ce_weight * F.cross_entropy(student["logits"], target),
            "review": c.review_weight * warmup * self.review_loss(student, teacher),
        }
