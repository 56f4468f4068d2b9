"""Vanilla knowledge distillation: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
Network", NIPS 2014 Deep Learning Workshop (arXiv:1503.02531).

Reference implementation: HobbitLong/RepDistiller, ``distiller_zoo/KD.py`` (``DistillKL``) and
``train_student.py`` (``--gamma`` / ``--alpha`` weights).

Formula, with student logits z_s, teacher logits z_t, labels y, temperature T:

    L = ce_weight · CE(z_s, y) + kd_weight · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))

The KL divergence is summed over classes and averaged over the batch ("batchmean"); the T² factor
keeps the soft-target gradients' scale independent of T (Hinton et al. §2).

Defaults (source): T = 4, ce_weight = 0.1, kd_weight = 0.9 — RepDistiller's CIFAR-100 settings
(``train_student.py``: ``--kd_T 4 -r 0.1 -a 0.9``), also used by the CRD benchmark table.
Hinton et al. give no single default: they report T = 20 on MNIST (T 2.5–4 for small students) and
a CE weight of 0.5 relative to the soft targets in the speech experiments.

Logit standardization (``logit_standardization``; Sun, Ren, Li, Wang & Cao, "Logit Standardization in Knowledge
Distillation", CVPR 2024, arXiv:2403.01427; reference implementation sunshangquan/logit-standardization-KD,
``mdistiller/distillers/KD.py``): z_s and z_t are each replaced by (z − mean(z)) / (1e-7 + std(z)) over the
classes (std with Bessel's correction, as the reference's ``torch.std``) before the softmax; the formula is
otherwise the same, T² included. The row ``vanilla_kd+ls`` is KD with it, at the reference's CIFAR-100 settings
(README: ``--logit-stand --base-temp 2 --kd-weight 9``, CE weight 0.1 from mdistiller's KD config): T = 2,
kd_weight = 9, ce_weight = 0.1.

Deviations: none in the loss. The weights are free (RepDistiller's 0.1/0.9 do not sum to 1 as an
α/(1−α) split would); suites may override T and the weights per track, chosen on the validation split.
"""

from optuna.distributions import FloatDistribution
import torch.nn.functional as F
from pydantic import Field

from kdbench.losses import kd_loss
from kdbench.method import LogitMethodConfig, Method, register_method


class VanillaKDConfig(LogitMethodConfig):
    temperature: float = Field(default=4.0, gt=0, description="softmax temperature T (RepDistiller: 4)")
    ce_weight: float = Field(default=0.1, ge=0, description="weight of CE on hard labels (RepDistiller -r: 0.1)")
    kd_weight: float = Field(default=0.9, ge=0, description="weight of the soft-target term (RepDistiller -a: 0.9)")


@register_method("vanilla_kd", variants={
    "vanilla_kd+ls": {"logit_standardization": True, "temperature": 2.0, "kd_weight": 9.0}})
class VanillaKD(Method):
    """Hinton et al. 2015: CE + T²-scaled KL to the teacher's softened outputs."""

    version = 1
    Config = VanillaKDConfig
    search_space = {  # kdbench tune: log-uniform, each holding the default
        "temperature": FloatDistribution(1.0, 8.0, log=True),
        "kd_weight": FloatDistribution(0.1, 10.0, log=True),
    }

    def loss(self, student, teacher, target, progress):
        c = self.config
        return {
            "ce": c.ce_weight * F.cross_entropy(student["logits"], target),
            "kd": c.kd_weight * kd_loss(student["logits"], teacher["logits"], c.temperature,
                                        c.logit_standardization),
        }
