"""Decoupled knowledge distillation: Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation", CVPR 2022
(arXiv:2203.08679).

Reference implementation: megvii-research/mdistiller, ``mdistiller/distillers/DKD.py`` (``dkd_loss`` and
``DKD.forward_train``), defaults in ``mdistiller/engine/cfg.py`` (``CFG.DKD``) and ``configs/cifar100/dkd/*.yaml``.

Formula, with student logits z_s, teacher logits z_t (B × K), labels y, temperature T. For each sample and each
of the two models, p = softmax(z / T) over the K classes,

    b  = [p_y, 1 − p_y]                                     binary target / non-target probabilities,
    p̂_k = exp(z_k / T) / Σ_{j ≠ y} exp(z_j / T),  k ≠ y     the distribution among the K − 1 non-target classes,

    TCKD = T² · KL(b_t ‖ b_s),   NCKD = T² · KL(p̂_t ‖ p̂_s)   (each batch-averaged),

    L = ce_weight · CE(z_s, y) + w · (alpha · TCKD + beta · NCKD),   w = min(progress / warmup_fraction, 1)

where progress runs from 0 to 1 over training and w is the warm-up ramp (w = 1 throughout when
warmup_fraction = 0). The terms are returned as ``ce``, ``tckd`` (= w · alpha · TCKD) and ``nckd``
(= w · beta · NCKD); their sum is the reference's ``loss_ce + loss_kd``.

Defaults (source): ce_weight = 1, alpha = 1, beta = 8, T = 4, warm-up 20 of 240 epochs — mdistiller
``CFG.DKD`` (CE_WEIGHT 1.0, ALPHA 1.0, BETA 8.0, T 4.0, WARMUP 20) with ``SOLVER.EPOCHS`` 240 in every CIFAR-100
config, so warmup_fraction = 20 / 240. beta = 8 is what resnet32x4→resnet8x4 (and →ShuffleV1/V2) uses; the
other CRD pairs override it in ``configs/cifar100/dkd/``: resnet56→resnet20 and resnet110→resnet32 beta = 2.0,
vgg13→vgg8, wrn_40_2→wrn_16_2, wrn_40_2→wrn_40_1 and vgg13→MobileNetV2 beta = 6.0 (suites set these per track).

Logit standardization (``logit_standardization``; Sun, Ren, Li, Wang & Cao, "Logit Standardization in Knowledge
Distillation", CVPR 2024, arXiv:2403.01427; reference sunshangquan/logit-standardization-KD,
``mdistiller/distillers/DKD.py`` ``dkd_loss(..., logit_stand)`` and ``tools/train.py``): z_s and z_t are each
replaced by (z − mean(z)) / (1e-7 + std(z)) over the classes (std with Bessel's correction;
``kdbench.losses.standardized``) at the top of the DKD term, before the division by T, so TCKD and NCKD (T²
factor included) are computed on the standardized logits; CE stays on the raw student logits and the warm-up
ramp is unchanged. The row ``dkd+ls`` uses the reference README's DKD+Ours command for resnet32x4→resnet8x4
(``--logit-stand --base-temp 2 --kd-weight 9``). In ``tools/train.py`` for DKD, ``--kd-weight`` is not a third
weight: it multiplies both ALPHA and BETA (``cfg.DKD.ALPHA *= kd_weight``, ``cfg.DKD.BETA *= kd_weight``) and
``--base-temp`` sets ``cfg.DKD.T``; so with the config's ALPHA 1 and BETA 8: T = 2, alpha = 9, beta = 72,
ce_weight = 1. The logs of the other CRD pairs are named ``dkd,<teacher>,<student>,<base temp>,<kd weight>,<BETA>``
(README): vgg13→vgg8 (2, 15, 2.0), wrn_40_2→wrn_16_2 (2, 12, 2.0), resnet56→resnet20 (3, 18, 2.0), i.e., reading
BETA as the value before the ×kd-weight scaling (train.py merges command-line options first, then scales):
T = 2, alpha = 15, beta = 30; T = 2, alpha = 12, beta = 24; T = 3, alpha = 18, beta = 36.

Deviations:
- Warm-up: the reference scales the DKD term by min(epoch / 20, 1) with epochs counted from 1, a per-epoch
  staircase (1/20 in the first epoch, 1 from epoch 20 on). Here it is a per-step linear ramp over a fraction of
  training, min(progress / warmup_fraction, 1), starting at 0 and reaching 1 at the end of epoch 20 of 240; within
  epoch e of the reference schedule it runs from (e − 1)/20 to e/20 where the reference holds e/20. As a fraction
  it follows a track's own training length.
- NCKD leaves the target class out exactly (softmax over the K − 1 non-target logits) where the reference
  subtracts 1000 from the target's z/T before a K-way softmax; the two agree to floating-point underflow unless
  z_y/T exceeds every other z_k/T by several hundred.
- TCKD takes log b from log-sum-exps (log p_y = z_y/T − lse(z/T), log(1 − p_y) = lse_{k≠y}(z_k/T) − lse(z/T))
  rather than the log of summed probabilities: the same value, without log 0 when p_y rounds to 1.
- The reference returns one ``loss_kd``; here it is split into ``tckd`` and ``nckd`` (same sum).
"""

from optuna.distributions import FloatDistribution
import torch
import torch.nn.functional as F
from pydantic import Field

from kdbench.losses import standardized
from kdbench.method import LogitMethodConfig, Method, register_method


class DKDConfig(LogitMethodConfig):
    ce_weight: float = Field(default=1.0, ge=0,
                             description="weight of CE on hard labels (mdistiller DKD.CE_WEIGHT: 1.0)")
    alpha: float = Field(default=1.0, ge=0, description="weight alpha of TCKD (mdistiller DKD.ALPHA: 1.0)")
    beta: float = Field(default=8.0, ge=0,
                        description="weight beta of NCKD (mdistiller DKD.BETA: 8.0, resnet32x4→resnet8x4; its configs "
                                    "use 6.0 for vgg13→vgg8 and wrn_40_2→wrn_16_2, 2.0 for resnet56→resnet20)")
    temperature: float = Field(default=4.0, gt=0, description="softmax temperature T (mdistiller DKD.T: 4.0)")
    warmup_fraction: float = Field(default=20 / 240, ge=0, le=1,
                                   description="fraction of training over which the DKD terms ramp linearly from 0 to "
                                               "full weight (mdistiller DKD.WARMUP 20 of SOLVER.EPOCHS 240)")


def _non_target_columns(target: torch.Tensor, classes: int) -> torch.Tensor:
    """(B, K − 1) column indices: each row's classes without its target, in order (for ``gather``, which, unlike a
    boolean mask, needs no host sync)."""
    cols = torch.arange(classes - 1, device=target.device).expand(target.shape[0], -1)
    return cols + (cols >= target.reshape(-1, 1)).long()


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ_k p_k (log p_k − log q_k) per row, with 0 · log 0 = 0; p is the (constant) teacher side."""
    return F.kl_div(log_q, log_p.exp(), reduction="none").sum(1)


def _decoupled(z_s: torch.Tensor, z_t: torch.Tensor, target: torch.Tensor, temperature: float):
    """Batch means of T²·KL(b_t ‖ b_s) and T²·KL(p̂_t ‖ p̂_s)."""
    scaled = {}
    non_target = _non_target_columns(target, z_s.shape[1])
    for side, z in (("s", z_s), ("t", z_t)):
        z = z / temperature
        lse_all = z.logsumexp(1)
        others = z.gather(1, non_target)
        lse_others = others.logsumexp(1)
        log_b = torch.stack([z.gather(1, target.reshape(-1, 1)).squeeze(1) - lse_all, lse_others - lse_all], 1)
        scaled[side] = (log_b, others - lse_others.unsqueeze(1))
    (log_b_s, log_hat_s), (log_b_t, log_hat_t) = scaled["s"], scaled["t"]
    t2 = temperature**2
    return t2 * _kl(log_b_t, log_b_s).mean(), t2 * _kl(log_hat_t, log_hat_s).mean()


@register_method("dkd", variants={
    "dkd+ls": {"logit_standardization": True, "temperature": 2.0, "alpha": 9.0, "beta": 72.0}})
class DKD(Method):
    """Zhao et al. 2022: KD split into target-class (TCKD) and non-target-class (NCKD) terms, weighted apart."""

    version = 1
    Config = DKDConfig
    search_space = {  # kdbench tune: log-uniform, each holding the default
        "alpha": FloatDistribution(0.25, 16.0, log=True),
        "beta": FloatDistribution(0.5, 128.0, log=True),
        "temperature": FloatDistribution(1.0, 8.0, log=True),
    }

    def loss(self, student, teacher, target, progress):
        c = self.config
        z_s, z_t = student["logits"], teacher["logits"]
        ramp = min(progress / c.warmup_fraction, 1.0) if c.warmup_fraction > 0 else 1.0
        if c.logit_standardization:
            z_s, z_t = standardized(z_s), standardized(z_t)
        tckd, nckd = _decoupled(z_s, z_t, target, c.temperature)
        return {
            "ce": c.ce_weight * F.cross_entropy(student["logits"], target),
            "tckd": ramp * c.alpha * tckd,
            "nckd": ramp * c.beta * nckd,
        }
