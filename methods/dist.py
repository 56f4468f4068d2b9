"""DIST: Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022
(arXiv:2205.10536).

Reference implementation: hunto/DIST_KD, whose classification code is the submodule hunto/image_classification_sota:
``lib/models/losses/dist_kd.py`` (``DIST``, ``inter_class_relation``, ``intra_class_relation``,
``pearson_correlation``), wired in ``lib/models/losses/kd_loss.py`` (``KDLoss``); also torchdistill's ``DISTLoss``
(``torchdistill/losses/mid_level.py``), the same formula.

Formula, with student logits z_s, teacher logits z_t (B samples × K classes), labels y, temperature τ:

    Y_s = softmax(z_s / τ),  Y_t = softmax(z_t / τ)          row-wise, B × K
    ρ(u, v) = Σ_i (u_i − ū)(v_i − v̄) / (‖u − ū‖ · ‖v − v̄‖ + ε)   Pearson correlation, ε = 1e-8

    inter = τ² · (1 − (1/B) Σ_b ρ(Y_s[b, :], Y_t[b, :]))     each sample's relation across the K classes
    intra = τ² · (1 − (1/K) Σ_k ρ(Y_s[:, k], Y_t[:, k]))     each class's relation across the B samples

    L = ce_weight · CE(z_s, y) + beta · inter + gamma · intra

The terms are returned as ``ce``, ``inter`` (= beta · inter) and ``intra`` (= gamma · intra).

Defaults (source): the reference's CIFAR-100 recipe ``configs/strategies/distill/dist_cifar.yaml`` (the README's
command for its CIFAR-100 / CRD-protocol table): ``kd: dist_t4`` builds ``DIST(beta=1, gamma=1, tau=4)`` and
``kd_loss_weight: 2.``, ``ori_loss_weight: 1.`` scale the whole DIST term and the CE (label smoothing 0), so
τ = 4, beta = gamma = 2 · 1 = 2, ce_weight = 1. (Its ImageNet recipes ``resnet_dist.yaml``/``dist_b2.yaml`` use
``kd: dist``, τ = 1, with the same weights.)

Logit standardization (Sun et al. 2024) is not offered: that paper and its code apply it to KD, DKD, MLKD and
CTKD, not to DIST.

Deviations: none in the loss. The reference's single weight kd_loss_weight × (beta · inter + gamma · intra) is
expressed as the two products beta and gamma; torchdistill's ``DISTLoss`` uses torch's ``cosine_similarity``,
which clamps the norms at ε, where DIST_KD adds ε to their product; the value here is DIST_KD's (they differ only for
near-constant rows or columns). The intra-class term needs more than one sample: with B = 1 every class column is
constant, its correlation is 0 and intra is τ² with no gradient, as in the reference.
"""

from optuna.distributions import FloatDistribution
import torch
import torch.nn.functional as F
from pydantic import Field

from kdbench.method import Method, MethodConfig, register_method


class DISTConfig(MethodConfig):
    ce_weight: float = Field(default=1.0, ge=0, description="weight of CE on hard labels (DIST_KD dist_cifar.yaml "
                                                            "ori_loss_weight: 1.0)")
    beta: float = Field(default=2.0, ge=0, description="weight beta of the inter-class term (DIST_KD CIFAR: "
                                                       "DIST beta 1 × kd_loss_weight 2 = 2.0)")
    gamma: float = Field(default=2.0, ge=0, description="weight gamma of the intra-class term (DIST_KD CIFAR: "
                                                        "DIST gamma 1 × kd_loss_weight 2 = 2.0)")
    temperature: float = Field(default=4.0, gt=0, description="softmax temperature tau (DIST_KD dist_cifar.yaml "
                                                              "kd: dist_t4 → 4.0)")


def _mean_correlation(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean over rows of the Pearson correlation between matching rows of a and b (DIST_KD's ε form)."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)).mean()


@register_method("dist")
class DIST(Method):
    """Huang et al. 2022: match the Pearson correlations of softened predictions, per sample and per class."""

    version = 1
    Config = DISTConfig
    search_space = {  # kdbench tune: log-uniform, each holding the default
        "beta": FloatDistribution(0.25, 8.0, log=True),
        "gamma": FloatDistribution(0.25, 8.0, log=True),
        "temperature": FloatDistribution(1.0, 8.0, log=True),
    }

    def loss(self, student, teacher, target, progress):
        c = self.config
        z_s = student["logits"]
        y_s = F.softmax(z_s / c.temperature, dim=1)
        y_t = F.softmax(teacher["logits"] / c.temperature, dim=1)
        t2 = c.temperature**2
        return {
            "ce": c.ce_weight * F.cross_entropy(z_s, target),
            "inter": c.beta * t2 * (1 - _mean_correlation(y_s, y_t)),
            "intra": c.gamma * t2 * (1 - _mean_correlation(y_s.t(), y_t.t())),
        }
