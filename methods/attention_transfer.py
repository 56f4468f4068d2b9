"""Attention transfer: Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of
Convolutional Neural Networks via Attention Transfer", ICLR 2017 (arXiv:1612.03928).

Reference implementations: szagoruyko/attention-transfer, ``cifar.py`` (``at``, ``at_loss``, the loss
``... + opt.beta * sum(loss_groups)``); HobbitLong/RepDistiller, ``distiller_zoo/AT.py`` (``Attention``) and
``helper/loops.py`` (``--distill attention``: ``gamma · CE + beta · sum(loss_group)``).

Formula, for a feature A of shape (B, C, *positions), with positions (L) for 1-D maps (temporal attention)
or (H, W) for 2-D maps (spatial attention):

    Q(A)  = normalize_L2( mean_c |A_c|^p  flattened per sample )          (reference ``at``)
    L     = ce_weight · CE(z_s, y) + beta · Σ_{i ∈ stages} mean_{b, positions} (Q(F_s^i) − Q(F_t^i))²

i.e. per stage ``(at(x) - at(y)).pow(2).mean()`` exactly as both reference codes, multiplied by beta (not
beta/2). If student and teacher maps differ in spatial size, the larger *feature map* is adaptive-average-
pooled to the smaller size (per dimension) before Q is computed, as RepDistiller's ``at_loss`` does.

Defaults (source): beta = 1000 (paper: β = 10³ with the code's per-element mean; RepDistiller ``-b 1000``),
p = 2 (paper's choice for activation-based AT; ``x.pow(2)`` in both codes), ce_weight = 1 (RepDistiller
``-r`` default 1; the original code's ``(1 - alpha) · CE`` with alpha = 0). stages = (-3, -2, -1): both
references transfer at every stage output (the three residual groups g0, g1, g2 in ``cifar.py``;
``feat[1:-1]`` in RepDistiller drops only the stem and the pooled vector), which is all stages of a 3-stage
model such as cnn1d_*.

Deviations:
- Loss scale follows the code, not the printed formula: the paper writes β/2 · Σ_j ‖Q_s/‖Q_s‖ − Q_t/‖Q_t‖‖_p and
  says β = 10³ is divided by the attention map size and batch size; the code's mean of squares times β is what
  β = 1000 was used with, so it is used here (no ½, squared distance).
- |A|^p instead of the code's A.pow(p): identical for even p (the default), and the paper's definition for
  other p. p must be ≥ 1: for p < 1 the gradient of |A|^p is infinite at the exact zeros of post-ReLU maps.
- Pooling for mismatched sizes is RepDistiller's addition (square (t_H, t_H) there; per-dimension here).
- The default stage list is fixed, not "all stages": on a 4-stage model it takes the last three, on a
  2-stage model it fails with the usual unknown-stage error (set ``stages``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from kdbench.errors import KdbenchError
from kdbench.method import Method, MethodConfig, register_method


class AttentionTransferConfig(MethodConfig):
    stages: tuple[int, ...] = Field(
        default=(-3, -2, -1), min_length=1, description="stage indices whose attention maps are matched"
    )
    beta: float = Field(default=1000.0, ge=0, description="weight of the summed AT losses (paper, RepDistiller: 1000)")
    p: float = Field(default=2.0, ge=1, description="exponent of |A| in the attention map (paper: 2)")
    ce_weight: float = Field(default=1.0, ge=0, description="weight of CE on hard labels (RepDistiller -r: 1)")


def stage_taps(config: AttentionTransferConfig) -> tuple[str, ...]:
    return tuple(f"stage:{i}" for i in config.stages)


def attention_map(feature: torch.Tensor, p: float) -> torch.Tensor:
    """(B, C, *positions) → (B, positions): mean over channels of |A|^p, flattened, L2-normalised per sample."""
    return F.normalize(feature.abs().pow(p).mean(1).flatten(1), dim=1)


def pooled_to(feature: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Adaptive average pooling of the positions to ``size`` (1-D or 2-D); unchanged if already that size."""
    if tuple(feature.shape[2:]) == size:
        return feature
    return getattr(F, f"adaptive_avg_pool{len(size)}d")(feature, size)


def at_loss(f_s: torch.Tensor, f_t: torch.Tensor, p: float) -> torch.Tensor:
    """Mean over batch and positions of the squared difference of the attention maps (reference ``at_loss``)."""
    size = tuple(min(s, t) for s, t in zip(f_s.shape[2:], f_t.shape[2:]))
    return (attention_map(pooled_to(f_s, size), p) - attention_map(pooled_to(f_t, size), p)).pow(2).mean()


@register_method("attention_transfer")
class AttentionTransfer(Method):
    """Zagoruyko & Komodakis 2017: CE + beta · Σ_stages squared distance of normalised attention maps."""

    version = 1
    Config = AttentionTransferConfig

    def __init__(self, config: AttentionTransferConfig, student_shapes, teacher_shapes):
        super().__init__(config, student_shapes, teacher_shapes)
        for tap in stage_taps(config):
            s_shape, t_shape = student_shapes[tap], teacher_shapes[tap]
            if len(s_shape) != len(t_shape) or len(s_shape) not in (2, 3):
                raise KdbenchError(
                    f"attention_transfer: {tap} has student shape {s_shape} and teacher shape {t_shape}; "
                    "attention needs feature maps (C, L) or (C, H, W) on both"
                )

    @classmethod
    def taps(cls, config):
        taps = ("logits", *stage_taps(config))
        return taps, taps

    def loss(self, student, teacher, target, progress):
        c = self.config
        at = sum(at_loss(student[tap], teacher[tap], c.p) for tap in stage_taps(c))
        return {"ce": c.ce_weight * F.cross_entropy(student["logits"], target), "at": c.beta * at}
