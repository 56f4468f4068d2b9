"""Multi-teacher distillation: the student learns from an ensemble of teachers. Hinton, Vinyals & Dean,
"Distilling the Knowledge in a Neural Network", 2015, §3 and §5 (distilling an ensemble into one model); You, Xu,
Xu & Tao, "Learning from Multiple Teacher Networks", KDD 2017; the per-sample weighting of Zhang, Chen & Wang,
"Confidence-Aware Multi-Teacher Knowledge Distillation" (CA-MKD), ICASSP 2022.

Reference implementations: Rorozhl/CA-MKD ``helper/loops.py`` (``train_distill_multi_teacher``:
``AVERAGE_LOSS`` and ``CAMKD``) with ``distiller_zoo/KD.py``; airaria/TextBrewer ``MultiTeacherDistiller``.

The teachers are the method's ``teacher_members`` (kdbench.method): each an architecture (default: the pair's
teacher) trained with the track's teacher seed plus an offset and cached like any teacher; offset 0 of the pair's
teacher is the pair's teacher itself. With z_k teacher k's logits (the ``member:<k>`` taps), p_k^T =
softmax(z_k / T) and per-sample weights w_k(x) that sum to 1 over the K teachers,

    L = ce_weight · CE(z_s, y) + kd_weight · T² · mean_x Σ_k w_k(x) · KL(p_k^T(x) ‖ p_s^T(x))

- ``weighting: equal``: w_k = 1/K (CA-MKD's ``AVERAGE_LOSS``). Its gradient is that of KL(mean_k p_k^T ‖ p_s^T),
  matching the ensemble's averaged soft targets as Hinton et al. and You et al. do; the two values differ by a
  term free of the student.
- ``weighting: confidence`` (CA-MKD): w_k = (1 − softmax_k(−log p_k(y)))/(K − 1), the softmax taken over the
  teachers of their cross-entropy on the true label, so a teacher that is more confident in the right class
  weighs more (K ≥ 2).

Defaults (source): three teachers, the pair's architecture with seed offsets 0, 1, 2 (CA-MKD's CIFAR-100 runs
use three teachers); T = 4, ce_weight = 0.1, kd_weight = 0.9, vanilla_kd's (RepDistiller), so that the row
differs from vanilla_kd by the ensemble alone; equal weighting.

Deviations:
- CA-MKD divides its weighted sum once more by K (``/ (bsz * teacher_num)``); here the weights sum to 1, so its
  loss is kd_weight = α / K here.
- CA-MKD's intermediate-feature term is left out: this row distils logits only, as You et al.'s logit part and
  TextBrewer's multi-teacher distiller do.
- With identical teachers the loss equals vanilla KD's (the weights sum to 1), up to rounding.
"""

from typing import Literal

from optuna.distributions import FloatDistribution
import torch
import torch.nn.functional as F
from pydantic import Field

from kdbench.method import Method, MethodConfig, TeacherMember, register_method
from kdbench.taps import member_tap


class MultiTeacherConfig(MethodConfig):
    teachers: tuple[TeacherMember, ...] = Field(
        default=(TeacherMember(seed_offset=0), TeacherMember(seed_offset=1), TeacherMember(seed_offset=2)),
        min_length=1, description="the ensemble: architecture (default the pair's teacher) and seed offset of each "
                                  "(CA-MKD: three teachers)")
    weighting: Literal["equal", "confidence"] = Field(
        default="equal", description="per-sample teacher weights: equal (1/K) or confidence (CA-MKD)")
    temperature: float = Field(default=4.0, gt=0, description="softmax temperature T (vanilla_kd's: 4)")
    ce_weight: float = Field(default=0.1, ge=0, description="weight of CE on hard labels (vanilla_kd's: 0.1)")
    kd_weight: float = Field(default=0.9, ge=0, description="weight of the soft-target term (vanilla_kd's: 0.9)")


def teacher_weights(teacher_logits: torch.Tensor, target: torch.Tensor, weighting: str) -> torch.Tensor:
    """(K, B) weights summing to 1 over the K teachers, from their logits (K, B, C)."""
    k = teacher_logits.shape[0]
    if weighting == "equal" or k == 1:
        return teacher_logits.new_full(teacher_logits.shape[:2], 1.0 / k)
    ce = -F.log_softmax(teacher_logits, dim=2).gather(2, target.expand(k, -1).unsqueeze(2)).squeeze(2)
    return (1.0 - F.softmax(ce, dim=0)) / (k - 1)


def multi_teacher_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """T² · mean over samples of Σ_k w_k · KL(p_k^T ‖ p_s^T); teacher_logits (K, B, C), weights (K, B)."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=2)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(2)  # (K, B)
    return (weights * kl).sum(0).mean() * temperature**2


@register_method("multi_teacher")
class MultiTeacher(Method):
    """Hinton et al. 2015 §3, You et al. 2017, CA-MKD 2022: KD from an ensemble's soft targets."""

    version = 1
    Config = MultiTeacherConfig
    search_space = {  # kdbench tune: log-uniform, each holding the default
        "temperature": FloatDistribution(1.0, 8.0, log=True),
        "kd_weight": FloatDistribution(0.1, 10.0, log=True),
    }

    @classmethod
    def teacher_members(cls, config):
        return config.teachers

    @classmethod
    def taps(cls, config):
        return ("logits",), tuple(member_tap(i) for i in range(len(config.teachers)))

    def loss(self, student, teacher, target, progress):
        c = self.config
        logits = torch.stack([teacher[member_tap(i)] for i in range(len(c.teachers))])
        weights = teacher_weights(logits, target, c.weighting)
        return {
            "ce": c.ce_weight * F.cross_entropy(student["logits"], target),
            "kd": c.kd_weight * multi_teacher_kd(student["logits"], logits, weights, c.temperature),
        }
