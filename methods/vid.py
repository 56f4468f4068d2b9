"""Variational information distillation: Ahn, Hu, Damianou, Lawrence & Dai, "Variational Information Distillation
for Knowledge Transfer", CVPR 2019 (arXiv:1904.05835).

Reference implementation: HobbitLong/RepDistiller, ``distiller_zoo/VID.py`` (``VIDLoss``, after the authors' code
ssahn0215/variational-information-distillation) and ``train_student.py`` (``--distill vid``: one
``VIDLoss(s_n, t_n, t_n)`` per feature of ``feat[1:-1]``, trained with the student; ``loss = gamma · CE +
alpha · KL + beta · sum(loss_group)``; ``scripts/run_cifar_distill.sh``: ``-a 0 -b 1``).

Formula. For each chosen stage, with the student feature s of shape (B, C_s, *positions) and the teacher feature
t of shape (B, C_t, *positions), the teacher's feature is modelled by a Gaussian q(t | s) = N(μ(s), σ²) whose
mean is a regressor of the student's feature and whose variance is one learned value per teacher channel:

    μ(s)   = W_3 ∗ ReLU(W_2 ∗ ReLU(W_1 ∗ s))       1×1 convolutions without bias, C_s → M → M → C_t channels
    σ²_c   = softplus(α_c) + eps = log(1 + exp(α_c)) + eps              for each teacher channel c
    NLL    = mean_{b, c, positions} ½ · ( log σ²_c + (μ(s)_{b,c,·} − t_{b,c,·})² / σ²_c )
    L      = ce_weight · CE(z_s, y) + beta · Σ_{stages} NLL

with z_s the student logits, y the labels, M the regressor's mid channels, and α_c initialised so that
σ²_c = init_pred_var at the start (α_c = log(exp(init_pred_var − eps) − 1)). W_1, W_2, W_3 and α are the method's
own trainable parameters, one set per stage. If the student's and the teacher's maps differ in spatial size,
the larger one is adaptive-average-pooled to the smaller size before the regressor (the reference's ``forward``).
1-D maps (C, L) use Conv1d, 2-D maps (C, H, W) Conv2d.

Defaults (source): beta = 1 (RepDistiller ``-b 1``, ``scripts/run_cifar_distill.sh``), ce_weight = 1
(RepDistiller ``-r``/gamma default 1; ``-a 0``: no KD term), init_pred_var = 5.0 and eps = 1e-5 (``VIDLoss``
defaults), mid_channels = the teacher's channels C_t (``train_student.py``: ``VIDLoss(s, t, t)``).
stages = (-3, -2, -1): RepDistiller's ``feat[1:-1]`` drops only the stem and the pooled vector, i.e. the three
residual groups of its ResNets and WRNs, which are all stages of a 3-stage model such as cnn1d_*/cnn2d_*.

Deviations:
- Loss scale follows the code, not the paper: the paper sums the negative log-likelihood over channels and
  positions (with per-layer weights λ_k); the reference's mean over batch, channels and positions, summed over
  stages with one weight β = 1, is what is used here. The constant ½ log 2π is left out, as in both.
- softplus is computed with ``F.softplus`` (exact up to float rounding; it does not overflow for large α), and the
  initial α with a stable inverse softplus.
- Spatial mismatch: the reference pools the larger map to the square size (t_H, t_H) judged by the height only;
  here each spatial dimension is pooled to the smaller of the two sizes (1-D and 2-D maps). Identical for square
  maps, and the CRD-zoo pairs have equal sizes anyway.
- The default stage list is fixed, not ``feat[1:-1]``: on a 4-stage model (the CIFAR ResNets/WRNs: stem + 3
  groups) it is exactly ``feat[1:-1]``; on VGG (5 stages) it takes blocks 2–4 where the reference also takes
  block 1; on a 2-stage model it fails with the usual unknown-stage error (set ``stages``).
- ``mid_channels`` is a config field (default: the teacher's channels per stage, as the reference).
- Transformer hidden states (L, H) (taps with a ``mask``, kdbench.taps): the regressor is the same three-layer
  network as bias-free Linear layers over the hidden units of each token (H_s → M → M → H_t), the variance is one
  value per teacher hidden unit, and the NLL is the mean over real tokens and hidden units, padding left out.
  Student and teacher need the same length L. Stages pair by the same index on both models (``-1``: the last
  layers).
"""

from __future__ import annotations

import math

import pydantic
from optuna.distributions import FloatDistribution
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.losses import pooled_to
from kdbench.method import Method, MethodConfig, register_method
from kdbench.taps import MASK, is_token_sequence, real_token_mean

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}


class VIDConfig(MethodConfig):
    stages: tuple[int, ...] = Field(
        default=(-3, -2, -1), min_length=1,
        description="stage indices, one regressor and variance each (RepDistiller feat[1:-1]: the 3 groups)")
    beta: float = Field(default=1.0, ge=0, description="weight of the summed VID NLL terms (RepDistiller -b: 1)")
    ce_weight: float = Field(default=1.0, ge=0, description="weight of CE on hard labels (RepDistiller -r: 1)")
    init_pred_var: float = Field(default=5.0, gt=0, description="initial variance σ² (RepDistiller VIDLoss: 5.0)")
    eps: float = Field(default=1e-5, ge=0, description="floor added to the softplus variance (RepDistiller: 1e-5)")
    mid_channels: int | None = Field(
        default=None, ge=1, description="regressor mid channels M; None: the teacher's (RepDistiller VIDLoss(s, t, t))")

    @pydantic.model_validator(mode="after")
    def _variance_above_floor(self):
        if self.init_pred_var <= self.eps:
            raise ValueError(f"init_pred_var ({self.init_pred_var}) must exceed eps ({self.eps})")
        return self


def stage_taps(config: VIDConfig) -> tuple[str, ...]:
    return tuple(f"stage:{i}" for i in config.stages)


def _inverse_softplus(y: float) -> float:
    """α with log(1 + exp(α)) = y > 0, computed stably: y + log(1 − exp(−y))."""
    return y + math.log(-math.expm1(-y))


class VariationalRegressor(nn.Module):
    """μ(s): three bias-free 1×1 convolutions (or Linear layers over hidden units) with ReLU between, and the
    per-teacher-channel variance parameter α (σ² = softplus(α) + eps)."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, dims: int | None, init_pred_var: float, eps: float):
        super().__init__()
        if dims is None:  # hidden states: over the last axis
            layer = lambda i, o: nn.Linear(i, o, bias=False)  # noqa: E731
        else:
            layer = lambda i, o: _CONV[dims](i, o, kernel_size=1, bias=False)  # noqa: E731
        self.mean = nn.Sequential(layer(c_in, c_mid), nn.ReLU(), layer(c_mid, c_mid), nn.ReLU(), layer(c_mid, c_out))
        self.log_scale = nn.Parameter(torch.full((c_out,), _inverse_softplus(init_pred_var - eps)))
        self.eps = eps

    def variance(self) -> torch.Tensor:
        return F.softplus(self.log_scale) + self.eps

    def nll(self, s: torch.Tensor, t: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """½ (log σ² + (μ(s) − t)² / σ²) elementwise, σ² broadcast along ``channel_dim``."""
        var = self.variance()
        shape = [1] * t.dim()
        shape[channel_dim] = -1
        var = var.view(shape)
        return 0.5 * (var.log() + (self.mean(s) - t).pow(2) / var)


@register_method("vid")
class VID(Method):
    """Ahn et al. 2019: CE + beta · Σ_stages Gaussian NLL of teacher features given regressed student features."""

    version = 1
    Config = VIDConfig
    search_space = {  # kdbench tune: log-uniform, each holding the default
        "beta": FloatDistribution(0.01, 10.0, log=True),
    }

    def __init__(self, config: VIDConfig, student_shapes, teacher_shapes):
        super().__init__(config, student_shapes, teacher_shapes)
        self.tokens = is_token_sequence(student_shapes)
        regressors = []
        for tap in stage_taps(config):
            s_shape, t_shape = student_shapes[tap], teacher_shapes[tap]
            if self.tokens:
                if len(s_shape) != 2 or len(t_shape) != 2 or s_shape[0] != t_shape[0]:
                    raise KdbenchError(f"vid: {tap} has student shape {s_shape} and teacher shape {t_shape}; "
                                       "hidden states must be (L, H) with the same length L")
                c_s, c_t, dims = s_shape[1], t_shape[1], None
            elif len(s_shape) != len(t_shape) or len(s_shape) not in (2, 3):
                raise KdbenchError(f"vid: {tap} has student shape {s_shape} and teacher shape {t_shape}; "
                                   "VID needs feature maps (C, L) or (C, H, W) on both")
            else:
                c_s, c_t, dims = s_shape[0], t_shape[0], len(s_shape) - 1
            mid = config.mid_channels or c_t
            regressors.append(VariationalRegressor(c_s, mid, c_t, dims, config.init_pred_var, config.eps))
        self.regressors = nn.ModuleList(regressors)

    @classmethod
    def taps(cls, config):
        taps = ("logits", *stage_taps(config))
        return taps, taps

    def vid_loss(self, student, teacher) -> torch.Tensor:
        """Σ_stages NLL, unweighted: the mean over batch, channels and positions (real tokens for hidden states)."""
        total = 0
        for regressor, tap in zip(self.regressors, stage_taps(self.config)):
            s, t = student[tap], teacher[tap]
            if self.tokens:
                total = total + real_token_mean(regressor.nll(s, t, -1).mean(-1), student[MASK])
            else:
                size = tuple(min(a, b) for a, b in zip(s.shape[2:], t.shape[2:]))
                total = total + regressor.nll(pooled_to(s, size), pooled_to(t, size), 1).mean()
        return total

    def loss(self, student, teacher, target, progress):
        c = self.config
        return {"ce": c.ce_weight * F.cross_entropy(student["logits"], target),
                "vid": c.beta * self.vid_loss(student, teacher)}
