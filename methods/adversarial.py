"""Adversarial distillation with a conditional discriminator on logits: Xu, Hsu & Huang, "Training Shallow and
Thin Networks for Acceleration via Knowledge Distillation with Conditional Adversarial Networks", ICLR 2018
Workshop (arXiv:1709.00513; v2 retitled "Learning Loss for Knowledge Distillation with Conditional Adversarial
Networks").

Reference implementation: no official code is public; this follows the paper's §3 (learning the loss with an
adversarial network). The paper body could not be consulted while writing this file: the structure follows its
abstract and two independent reading notes of §3 and the experiments; items marked [UNVERIFIED] are not checked
against the paper text.

Formula, with student logits z_s (the generator's output), teacher logits z_t, labels y, discriminator D (an MLP
on logits, conditioned on the one-hot label), BCE(d, 1) = −log σ(d), BCE(d, 0) = −log(1 − σ(d)):

    student:       L_S = ce_weight · CE(z_s, y) + l1_weight · mean|z_s − z_t|
                         [+ kd_weight · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T)), only when kd_weight > 0]
                         + adv_weight · BCE(D(z_s, y), 1)
    discriminator: L_D = BCE(D(z_t, y), 1) + BCE(D(z_s, y), 0)

The generator term is the non-saturating GAN loss (Goodfellow et al. 2014, §3), computed through D so that its
gradient reaches the student; D's parameters are stepped only by their own optimizer (the trainer zeroes their
gradients before the D step, which sees detached logits). No label smoothing, no ½ factor in L_D.

Defaults (source):
- D: three fully connected layers — the paper's "three-layer perceptron" per the reading notes [UNVERIFIED];
  hidden width 64 and LeakyReLU(0.2) are our choice (DCGAN's slope) [UNVERIFIED against the paper].
- D optimizer: Adam, lr 2e-4, betas (0.5, 0.999) — the DCGAN settings (Radford et al. 2016, §4); the paper's
  optimizer [UNVERIFIED].
- ce_weight 1, adv_weight 1, l1_weight 1: the paper trains the student with the adversarial loss plus the
  label loss plus an L1 loss between logits, and reports the combination best (reading notes) [UNVERIFIED
  weights: ours].
- kd_weight 0: the learned loss replaces Hinton KD in the paper; > 0 adds it. T = 4 (RepDistiller, as vanilla_kd)
  is used only then.

Deviations:
- Conditioning: the one-hot label is concatenated to D's input (conditional GAN, Mirza & Osindero 2014). Per
  the reading notes the paper conditions by having D also predict the class (auxiliary-classifier style); that
  form is not implemented. ``conditional: false`` gives the unconditional discriminator.
- Logits only: a feature discriminator (``stage:<i>``) is not offered, since teacher and student widths differ
  and D would need a student-side projection.
- One D step per student step on the same batch (the trainer's alternation); the paper's schedule [UNVERIFIED].
"""

from optuna.distributions import FloatDistribution
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.losses import kd_loss
from kdbench.method import Method, MethodConfig, register_method


class AdversarialConfig(MethodConfig):
    ce_weight: float = Field(default=1.0, ge=0, description="weight of CE on hard labels (paper: label loss)")
    adv_weight: float = Field(default=1.0, ge=0, description="weight of the generator term −log σ(D(z_s))")
    l1_weight: float = Field(default=1.0, ge=0, description="weight of mean |z_s − z_t| (paper: L1 on logits)")
    kd_weight: float = Field(default=0.0, ge=0, description="weight of Hinton KD (0: not in the paper)")
    temperature: float = Field(default=4.0, gt=0, description="KD temperature T, used when kd_weight > 0")
    conditional: bool = Field(default=True, description="concatenate the one-hot label to D's input")
    hidden: int = Field(default=64, gt=0, description="width of D's two hidden layers")
    adversary_lr: float = Field(default=2e-4, gt=0, description="Adam learning rate of D (DCGAN: 2e-4)")


@register_method("adversarial")
class Adversarial(Method):
    """Xu et al. 2017: the student fools a (label-conditioned) discriminator of teacher vs. student logits."""

    version = 1
    Config = AdversarialConfig
    search_space = {  # kdbench tune: log-uniform, each holding the default
        "adv_weight": FloatDistribution(0.01, 10.0, log=True),
    }

    def __init__(self, config, student_shapes, teacher_shapes):
        super().__init__(config, student_shapes, teacher_shapes)
        if student_shapes["logits"] != teacher_shapes["logits"]:
            raise KdbenchError(
                f"adversarial: student logits {student_shapes['logits']} and teacher logits "
                f"{teacher_shapes['logits']} differ; the discriminator compares them"
            )
        (self.num_classes,) = student_shapes["logits"]
        width = self.num_classes * (2 if config.conditional else 1)
        h = config.hidden
        self.adversary = nn.Sequential(
            nn.Linear(width, h), nn.LeakyReLU(0.2), nn.Linear(h, h), nn.LeakyReLU(0.2), nn.Linear(h, 1)
        )

    def discriminate(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """D's real/fake logit per sample (real = teacher)."""
        if self.config.conditional:  # one-hot by scatter: F.one_hot reads the labels' range, a host sync on a GPU
            logits = torch.cat([logits, torch.zeros_like(logits).scatter_(1, target.unsqueeze(1), 1.0)], dim=1)
        return self.adversary(logits).squeeze(1)

    def loss(self, student, teacher, target, progress):
        c = self.config
        z_s, z_t = student["logits"], teacher["logits"]
        d_s = self.discriminate(z_s, target)
        terms = {"ce": c.ce_weight * F.cross_entropy(z_s, target), "l1": c.l1_weight * (z_s - z_t).abs().mean()}
        if c.kd_weight > 0:  # off by default: computing a zero term cost 30 % of this loss
            terms["kd"] = c.kd_weight * kd_loss(z_s, z_t, c.temperature)
        terms["adv"] = c.adv_weight * F.binary_cross_entropy_with_logits(d_s, torch.ones_like(d_s))
        return terms

    def adversary_loss(self, student, teacher, target):
        d_t = self.discriminate(teacher["logits"], target)
        d_s = self.discriminate(student["logits"], target)
        return {
            "real": F.binary_cross_entropy_with_logits(d_t, torch.ones_like(d_t)),
            "fake": F.binary_cross_entropy_with_logits(d_s, torch.zeros_like(d_s)),
        }

    def adversary_optimizer(self, params):
        return torch.optim.Adam(params, lr=self.config.adversary_lr, betas=(0.5, 0.999))
