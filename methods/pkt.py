"""Probabilistic knowledge transfer: Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge
Transfer", ECCV 2018 (arXiv:1803.10837).

Reference implementation: HobbitLong/RepDistiller, ``distiller_zoo/PKT.py`` (``PKT.cosine_similarity_loss``, "code
from author": passalis/probabilistic_kt) and ``train_student.py`` (``--distill pkt``: ``f_s = feat_s[-1]``, the
penultimate embedding; loss ``gamma · CE + alpha · KD + beta · loss_kd``).

Formula, for a batch of b samples with student embeddings x_i (i = 1 … b, dimension D_s), teacher embeddings y_i
(dimension D_t), student logits z_s, labels y, and ε = 1e-7:

    x̂_i   = x_i / (‖x_i‖₂ + ε)                          (ŷ_i likewise)
    K^s_ij = (x̂_iᵀ x̂_j + 1) / 2                         (cosine-similarity kernel, scaled to [0, 1]; K^t likewise)
    P^s_ij = K^s_ij / Σ_k K^s_ik                         (each row a distribution over the batch; P^t likewise)
    L_PKT  = 1/b² · Σ_{i,j} P^t_ij · log((P^t_ij + ε) / (P^s_ij + ε))      (KL(P^t ‖ P^s), mean over the b² pairs)
    L      = ce_weight · CE(z_s, y) + beta · L_PKT

The kernel compares samples within one network, so D_s and D_t may differ and no projection is learnt. The
teacher's P^t carries no gradient.

Defaults (source): the ``embedding`` tap (the input of the classifier, RepDistiller's ``feat[-1]``) on both
models; beta = 30000 (RepDistiller ``scripts/run_cifar_distill.sh``: ``--distill pkt -a 0 -b 30000``);
ce_weight = 1 (``-r``/gamma default 1). No KD term (``-a 0``). ε = 1e-7 is the reference's ``eps``.

Deviations:
- From the paper, following the reference (author's) code: the paper's conditional probabilities leave the sample
  itself out of the normalisation (Σ_{k ≠ j}, as in t-SNE) and sum the KL divergence over all pairs; the code keeps
  the diagonal (K_ii = 1) in every row and averages over the b² entries, and beta = 30000 is calibrated to that
  mean. This file follows the code.
- The reference's ``x[x != x] = 0`` (NaN → 0 after the normalisation) is left out: with ε > 0 it changes nothing
  for finite features, and a NaN feature is better reported than silently zeroed.
- Token models: the ``embedding`` tap of a BERT classifier is its pooled [CLS] vector, so the loss is the same; no
  padding is involved.
"""

from __future__ import annotations

from optuna.distributions import FloatDistribution
import torch
import torch.nn.functional as F
from pydantic import Field

from kdbench.method import Method, MethodConfig, register_method
from kdbench.taps import EMBEDDING

EPS = 1e-7  # reference ``cosine_similarity_loss(..., eps=0.0000001)``


class PKTConfig(MethodConfig):
    beta: float = Field(default=30000.0, ge=0, description="weight of the PKT loss (RepDistiller -b: 30000)")
    ce_weight: float = Field(default=1.0, ge=0, description="weight of CE on hard labels (RepDistiller -r: 1)")


def _conditional_probabilities(features: torch.Tensor) -> torch.Tensor:
    """(b, D) → (b, b): the cosine kernel (cos + 1) / 2 between the samples, each row normalised to sum to 1."""
    flat = features.flatten(1)
    unit = flat / (flat.norm(p=2, dim=1, keepdim=True) + EPS)
    kernel = (unit @ unit.T + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """KL(P^t ‖ P^s) with ε in numerator and denominator, averaged over the b² entries (reference)."""
    p_s = _conditional_probabilities(f_s)
    p_t = _conditional_probabilities(f_t.detach())
    return (p_t * torch.log((p_t + EPS) / (p_s + EPS))).mean()


@register_method("pkt")
class PKT(Method):
    """Passalis & Tefas 2018: CE + beta · KL between teacher and student cosine-kernel affinities of the embeddings."""

    version = 1
    Config = PKTConfig
    search_space = {  # kdbench tune: log-uniform, each holding the default
        "beta": FloatDistribution(100.0, 100000.0, log=True),
    }

    @classmethod
    def taps(cls, config):
        taps = ("logits", EMBEDDING)
        return taps, taps

    def loss(self, student, teacher, target, progress):
        c = self.config
        return {
            "ce": c.ce_weight * F.cross_entropy(student["logits"], target),
            "pkt": c.beta * pkt_loss(student[EMBEDDING], teacher[EMBEDDING]),
        }
