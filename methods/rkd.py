"""Relational knowledge distillation: Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019
(arXiv:1904.05068).

Reference implementation: HobbitLong/RepDistiller, ``distiller_zoo/RKD.py`` (``RKDLoss.forward``, ``RKDLoss.pdist``)
and ``train_student.py`` (``--distill rkd``: ``f_s = feat_s[-1]``, the penultimate embedding; loss
``gamma · CE + alpha · KD + beta · loss_kd``). The authors' own code (lenscloth/RKD, ``metric/loss.py``:
``RkdDistance``, ``RKdAngle``) computes the same two terms.

Formula, for a batch of b samples with student embeddings s_i (dimension D_s), teacher embeddings t_i (dimension
D_t), student logits z_s and labels y (written for the student; the teacher's ψ are the same functions of t):

    d_ij     = sqrt(max(‖s_i − s_j‖₂², 1e-12)) for i ≠ j,  d_ii = 0      (``pdist``, squared=False)
    μ        = 1/(b(b−1)) · Σ_{i≠j} d_ij                                    (mean distance over the distinct pairs)
    ψ_D(i,j) = d_ij / μ
    u_ij     = (s_j − s_i) / max(‖s_j − s_i‖₂, 1e-12)                       (0 when j = i)
    ψ_A(i,j,k) = ⟨u_ij, u_ik⟩                                              (cosine of the angle at s_i)
    ℓ(x)     = x²/2 if |x| < 1, else |x| − 1/2                              (Huber / smooth L1, δ = 1)
    L_D      = 1/b² · Σ_{i,j} ℓ(ψ_D^s(i,j) − ψ_D^t(i,j))
    L_A      = 1/b³ · Σ_{i,j,k} ℓ(ψ_A^s(i,j,k) − ψ_A^t(i,j,k))
    L        = ce_weight · CE(z_s, y) + distance_weight · L_D + angle_weight · L_A

Only distances and angles within one network are compared, so D_s and D_t may differ and no projection is learnt.
The teacher's ψ carry no gradient. With ``squared_distance``, d_ij = max(‖s_i − s_j‖², 1e-12) (the reference's
``pdist(squared=True)``, unused by its training script). A batch of one sample has no pairs: L_D = 0 (L_A is 0).

Defaults (source): the ``embedding`` tap (the input of the classifier, RepDistiller's ``feat[-1]``) on both
models; distance_weight = 25 and angle_weight = 50 (``RKDLoss(w_d=25, w_a=50)``, times RepDistiller
``scripts/run_cifar_distill.sh``: ``--distill rkd -a 0 -b 1``); ce_weight = 1 (``-r``/gamma default 1); no KD term
(``-a 0``); squared_distance = False (``pdist(teacher, squared=False)``). The terms are logged as ``ce``,
``distance`` and ``angle``, each already weighted.

Deviations:
- From the paper, following the code: the paper sums ℓ over the distinct pairs (i ≠ j) and triplets (i ≠ j ≠ k);
  the code averages over all b² pairs and b³ triplets. The degenerate ones (i = j; j = i or k = i; j = k) give
  ψ^s = ψ^t, hence ℓ = 0, so only the normaliser differs: a constant factor (b(b−1)/b² for the pairs, b(b−1)(b−2)/b³
  for the triplets, for distinct embeddings), absorbed in the weights 25 and 50, which were set with the code.
- RepDistiller's β (1) is folded into distance_weight and angle_weight.
- Numerics only: the pairwise distances are the norms of the differences s_i − s_j, which the angle term needs
  anyway, instead of the reference's ‖s_i‖² + ‖s_j‖² − 2 s_iᵀ s_j (equal in exact arithmetic; the expansion cancels
  catastrophically in float32 for nearby points). The norms are computed once and serve both terms: the angle
  term divides by them (clamped at 1e-12, as ``F.normalize``), the distance term clamps them at 1e-6 (the same as
  the reference's clamp of the squared distance at 1e-12 before the root; version 2, which made the loss as fast
  as the reference's formula; version 1 computed the norms twice, with equal values up to rounding). μ is the mean over
  the off-diagonal entries, which equals the reference's mean over the positive entries since the clamp makes
  every off-diagonal distance positive.
- The batch of one sample (no pairs; the reference returns NaN) gives L_D = 0.
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

EPS = 1e-12  # reference ``pdist(..., eps=1e-12)`` and ``F.normalize``'s default


class RKDConfig(MethodConfig):
    distance_weight: float = Field(
        default=25.0, ge=0, description="weight of the distance-wise loss (RepDistiller RKDLoss w_d: 25, × -b 1)")
    angle_weight: float = Field(
        default=50.0, ge=0, description="weight of the angle-wise loss (RepDistiller RKDLoss w_a: 50, × -b 1)")
    ce_weight: float = Field(default=1.0, ge=0, description="weight of CE on hard labels (RepDistiller -r: 1)")
    squared_distance: bool = Field(
        default=False, description="squared Euclidean distances in the distance term (RepDistiller: squared=False)")


def _differences(features: torch.Tensor) -> torch.Tensor:
    """(b, D) → (b, b, D): entry [i, j] is e_j − e_i."""
    flat = features.flatten(1)
    return flat.unsqueeze(0) - flat.unsqueeze(1)


def _norms(diff: torch.Tensor) -> torch.Tensor:
    """(b, b, D) → (b, b): ‖e_j − e_i‖₂, computed once for both terms."""
    return torch.linalg.vector_norm(diff, dim=2)


def _normalized_distances(norms: torch.Tensor, squared: bool) -> torch.Tensor:
    """ψ_D: the pairwise distances (squared ones clamped at 1e-12, hence roots at 1e-6; 0 on the diagonal) over their
    mean off the diagonal."""
    b = norms.shape[0]
    dist = norms.pow(2).clamp_min(EPS) if squared else norms.clamp_min(EPS**0.5)
    off_diagonal = 1.0 - torch.eye(b, dtype=dist.dtype, device=dist.device)
    dist = dist * off_diagonal
    return dist / (dist.sum() / (b * (b - 1)))


def _angles(diff: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """ψ_A: (b, b, b), entry [i, j, k] the cosine between e_j − e_i and e_k − e_i (0 where one of them is 0)."""
    unit = diff / norms.clamp_min(EPS).unsqueeze(2)  # F.normalize(diff, dim=2, eps=1e-12), the norms reused
    return unit @ unit.transpose(1, 2)


def rkd_losses(f_s: torch.Tensor, f_t: torch.Tensor, squared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_D, L_A), unweighted: smooth-L1 means over all pairs and all triplets (reference ``RKDLoss.forward``)."""
    diff_s = _differences(f_s)
    norms_s = _norms(diff_s)
    with torch.no_grad():
        diff_t = _differences(f_t.detach())
        norms_t = _norms(diff_t)
        angle_t = _angles(diff_t, norms_t)
    angle = F.smooth_l1_loss(_angles(diff_s, norms_s), angle_t)
    if f_s.shape[0] < 2:  # no pairs: no mean distance to normalise by
        return f_s.new_zeros(()), angle
    with torch.no_grad():
        dist_t = _normalized_distances(norms_t, squared)
    distance = F.smooth_l1_loss(_normalized_distances(norms_s, squared), dist_t)
    return distance, angle


@register_method("rkd")
class RKD(Method):
    """Park et al. 2019: CE + Huber losses between student and teacher pairwise distances and triplet angles."""

    version = 2
    Config = RKDConfig
    search_space = {  # kdbench tune: log-uniform, each holding the default
        "distance_weight": FloatDistribution(0.25, 100.0, log=True),
        "angle_weight": FloatDistribution(0.5, 200.0, log=True),
    }

    @classmethod
    def taps(cls, config):
        taps = ("logits", EMBEDDING)
        return taps, taps

    def loss(self, student, teacher, target, progress):
        c = self.config
        distance, angle = rkd_losses(student[EMBEDDING], teacher[EMBEDDING], c.squared_distance)
        return {
            "ce": c.ce_weight * F.cross_entropy(student["logits"], target),
            "distance": c.distance_weight * distance,
            "angle": c.angle_weight * angle,
        }
