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

Deviations: none in the loss. The weights are free (RepDistiller's 0.1/0.9 do not sum to 1 as an
α/(1−α) split would); suites may override T and the weights per track, chosen on the validation split.
"""

import torch.nn.functional as F
from pydantic import Field

from kdbench.losses import kd_loss
from kdbench.method import Method, MethodConfig, register_method


class VanillaKDConfig(MethodConfig):
    temperature: float = Field(default=4.0, gt=0, description="softmax temperature T (RepDistiller: 4)")
    ce_weight: float = Field(default=0.1, ge=0, description="weight of CE on hard labels (RepDistiller -r: 0.1)")
    kd_weight: float = Field(default=0.9, ge=0, description="weight of the soft-target term (RepDistiller -a: 0.9)")


@register_method("vanilla_kd")
class VanillaKD(Method):
    """Hinton et al. 2015: CE + T²-scaled KL to the teacher's softened outputs."""

    version = 1
    Config = VanillaKDConfig

    def loss(self, student, teacher, target, progress):
        c = self.config
        return {
            "ce": c.ce_weight * F.cross_entropy(student["logits"], target),
            "kd": c.kd_weight * kd_loss(student["logits"], teacher["logits"], c.temperature),
        }
