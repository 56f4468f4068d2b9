"""FitNets: Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015
(arXiv:1412.6550).

Reference implementation: HobbitLong/RepDistiller, ``distiller_zoo/FitNet.py`` (``HintLoss`` = ``nn.MSELoss``),
``models/util.py`` (``ConvReg``, ``Regress``), ``helper/loops.py`` and ``train_student.py`` (``--distill hint``).

Formula, with student logits z_s, labels y, and for each chosen stage i the student feature F_s^i, the teacher
feature F_t^i and a regressor r_i (the method's own trainable module):

    L = ce_weight · CE(z_s, y) + hint_weight · Σ_i MSE(r_i(F_s^i), F_t^i)
        [+ kd_weight · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T)), only when kd_weight > 0]

MSE is the mean over batch, channels and positions (``nn.MSELoss``). The regressor maps the student's
feature to the teacher's shape:
- feature maps (C, L) or (C, H, W): [adaptive average pooling to the teacher's spatial size, only if the sizes
  differ] → 1×1 Conv1d/Conv2d (with bias) → BatchNorm → ReLU. For equal sizes this is RepDistiller's
  ``ConvReg`` exactly (its kernel is 1 + s_H − t_H = 1);
- vectors (C,): Linear → ReLU, as RepDistiller's ``Regress``;
- transformer hidden states (L, H) (taps with a ``mask``, kdbench.taps): Linear H_s → H_t per token
  (→ ReLU), TinyBERT's W_h (Jiao et al., Findings of EMNLP 2020, §3.1, hidden-states loss MSE(H^S W_h, H^T));
  the MSE is the mean over real tokens and hidden units only, padding left out.

Defaults (source): hint_weight = 100 (RepDistiller ``-b 100``: README command ``--distill hint -a 0 -b 100``),
ce_weight = 1 (``-r``/gamma default 1), kd_weight = 0 (``-a 0``), T = 4 (``--kd_T 4``; used only if
kd_weight > 0). stages = (-2,): the paper takes the middle layer of teacher and student as hint and guided
layer (hint-based training section); RepDistiller's ``hint_layer=2`` indexes its feature list [stem, group 1,
group 2, group 3, pooled vector], i.e. the output of the middle of the three residual groups. Stage -2 is that
middle stage on 3-stage models (stage 1 of cnn1d_*) and exists on any model with ≥ 2 stages.
hint_fraction = 0.125 (only with two_stage): RepDistiller's pre-training length for its two-stage methods,
``--init_epochs 30`` of ``--epochs 240``; the paper trains stage 1 separately and gives no fraction.

Deviations:
- Spatial mismatch: RepDistiller uses a strided 3×3 conv (s = 2t), a 4×4 transposed conv (2s = t) or a
  valid conv with kernel 1 + s − t (s > t, also the paper's choice), and fails otherwise. Here the student
  map is adaptive-average-pooled to the teacher's size (averaging when larger, replication when smaller)
  before the 1×1 conv: parameter-free and defined for any sizes, in 1-D and 2-D.
- The hint loss is the element mean (RepDistiller), not the paper's ½‖·‖² sum; hint_weight is calibrated
  to the mean.
- Several stages (each with its own regressor, summed) are an extension; the paper uses one hint.
- Training is joint by default (RepDistiller). ``two_stage=True`` follows the paper's stage-wise schedule
  inside one run: while progress < hint_fraction the loss is the hint term only, so gradients reach only
  the regressors and the student layers up to the deepest guided stage (the paper's W_Guided, W_r; the
  other parameters get no gradient, so SGD/AdamW leave them untouched); afterwards CE (+ KD), no hint.
  Unlike the paper, one optimizer state and LR schedule span both phases, the BN running statistics of the
  layers above the guided one still update in phase 1, and kd_weight and T are constant (the paper's stage 2
  is KD with its own λ, τ settings; set kd_weight > 0 for it, as kd_weight defaults to 0).
- regressor_relu (default True, as ``ConvReg``/``Regress``): the paper requires the regressor to share the
  hint layer's non-linearity; set it False for stage outputs that can be negative (BERT hidden states: the
  sst2 suite does).
- Transformers: the same stage index is taken on both models and negative indices count from the end, so
  ``stages: [-1]`` pairs the last layers (the uniform layer mapping's last pair, TinyBERT's g(M) = N); other
  indices pair layers by their distance from the end. The hint's regressor is a Linear (TinyBERT), without
  batch norm, and padded positions are left out of the MSE.
"""

from __future__ import annotations

from optuna.distributions import FloatDistribution
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.taps import MASK, is_token_sequence, real_token_mean
from kdbench.losses import kd_loss, summed
from kdbench.method import Method, MethodConfig, register_method

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
_POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d}


class FitNetsConfig(MethodConfig):
    stages: tuple[int, ...] = Field(
        default=(-2,), min_length=1, description="guided/hint stage indices, one regressor each (paper: middle layer)"
    )
    hint_weight: float = Field(default=100.0, ge=0, description="weight of the hint MSE (RepDistiller -b: 100)")
    ce_weight: float = Field(default=1.0, ge=0, description="weight of CE on hard labels (RepDistiller -r: 1)")
    kd_weight: float = Field(default=0.0, ge=0, description="weight of the soft-target KD term (RepDistiller -a: 0)")
    temperature: float = Field(default=4.0, gt=0, description="KD temperature, used if kd_weight > 0 (--kd_T: 4)")
    regressor_relu: bool = Field(default=True, description="end the regressor with ReLU (the hint's non-linearity)")
    two_stage: bool = Field(default=False, description="paper schedule: hint only, then CE + KD without hint")
    hint_fraction: float = Field(
        default=0.125, gt=0, lt=1, description="two_stage: share of training that is hint-only (RepDistiller 30/240)"
    )


def stage_taps(config: FitNetsConfig) -> tuple[str, ...]:
    return tuple(f"stage:{i}" for i in config.stages)


def make_regressor(tap: str, s_shape: tuple[int, ...], t_shape: tuple[int, ...], relu: bool,
                   tokens: bool = False) -> nn.Module:
    """Maps a student feature (C_s, *S_s) to the teacher's (C_t, *S_t), or hidden states (L, H_s) to (L, H_t) with
    ``tokens``; shapes exclude the batch dimension."""
    if tokens:
        if len(s_shape) != 2 or len(t_shape) != 2 or s_shape[0] != t_shape[0]:
            raise KdbenchError(f"fitnets: {tap} has student shape {s_shape} and teacher shape {t_shape}; "
                               "hidden states must be (L, H) with the same length L")
        return nn.Sequential(nn.Linear(s_shape[1], t_shape[1]), *([nn.ReLU()] if relu else []))
    if len(s_shape) != len(t_shape) or len(s_shape) not in (1, 2, 3):
        raise KdbenchError(
            f"fitnets: {tap} has student shape {s_shape} and teacher shape {t_shape}; "
            "both must be (C,), (C, L) or (C, H, W)"
        )
    if len(s_shape) == 1:
        layers = [nn.Linear(s_shape[0], t_shape[0])]
    else:
        dims = len(s_shape) - 1
        layers = [] if s_shape[1:] == t_shape[1:] else [_POOL[dims](t_shape[1:])]
        layers += [_CONV[dims](s_shape[0], t_shape[0], kernel_size=1), _NORM[dims](t_shape[0])]
    return nn.Sequential(*layers, *([nn.ReLU()] if relu else []))


@register_method("fitnets")
class FitNets(Method):
    """Romero et al. 2015: CE + MSE between regressed student hints and teacher hints (+ optional KD)."""

    version = 1
    Config = FitNetsConfig
    search_space = {  # kdbench tune: log-uniform, each holding the default
        "hint_weight": FloatDistribution(0.1, 1000.0, log=True),
    }

    def __init__(self, config: FitNetsConfig, student_shapes, teacher_shapes):
        super().__init__(config, student_shapes, teacher_shapes)
        self.tokens = is_token_sequence(student_shapes)
        self.regressors = nn.ModuleList(
            make_regressor(tap, student_shapes[tap], teacher_shapes[tap], config.regressor_relu, self.tokens)
            for tap in stage_taps(config)
        )

    @classmethod
    def taps(cls, config):
        taps = ("logits", *stage_taps(config))
        return taps, taps

    def hint_loss(self, student, teacher) -> torch.Tensor:
        """Σ_i MSE(r_i(F_s^i), F_t^i), unweighted; over real tokens only for hidden states."""
        pairs = zip(self.regressors, stage_taps(self.config))
        if self.tokens:
            return summed(real_token_mean((regressor(student[tap]) - teacher[tap]).pow(2).mean(-1), student[MASK])
                          for regressor, tap in pairs)
        return summed(F.mse_loss(regressor(student[tap]), teacher[tap]) for regressor, tap in pairs)

    def loss(self, student, teacher, target, progress):
        c = self.config
        logits = student["logits"]
        zero = logits.new_zeros(()) if c.two_stage else None  # a phase's left-out term
        hint_only = c.two_stage and progress < c.hint_fraction  # paper stage 1
        no_hint = c.two_stage and not hint_only  # paper stage 2
        terms = {
            "ce": zero if hint_only else c.ce_weight * F.cross_entropy(logits, target),
            "hint": zero if no_hint else c.hint_weight * self.hint_loss(student, teacher),
        }
        if c.kd_weight > 0:
            terms["kd"] = zero if hint_only else c.kd_weight * kd_loss(logits, teacher["logits"], c.temperature)
        return terms
