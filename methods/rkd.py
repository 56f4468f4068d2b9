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
- Numerics only: distances and angles come from the Gram matrix G = E Eᵀ of the batch's embeddings, in float64:
  ‖e_j − e_i‖² = G_ii + G_jj − 2 G_ij (the reference's own expansion for the distances, where it runs in float32)
  and ⟨e_j − e_i, e_k − e_i⟩ = G_jk − G_ij − G_ik + G_ii (the reference normalises the b² difference vectors and
  multiplies them, O(b³·D)). Equal in exact arithmetic; float64 keeps the expansion's cancellation below float32
  rounding, so the values and gradients agree with the reference's to float32 rounding. The b³ cosines are then
  formed in the embeddings' own precision, with their backward written out (``_Angles``): O(b²·D + b³) work
  instead of O(b³·D) (version 3; version 2 normalised the difference vectors, version 1 also computed their norms
  twice: equal values up to rounding). A pair whose squared distance is below 1e-12 of ‖e_i‖² + ‖e_j‖² (float64
  cannot tell it from rounding) counts as coincident: distance 0 (then clamped as below), cosines 0, as the
  reference gives for equal embeddings. Distances are clamped at 1e-6 (the reference clamps the squared distance
  at 1e-12 before the root; squared ones at 1e-12). μ is the mean over the off-diagonal entries, which equals the
  reference's mean over the positive entries since the clamp makes every off-diagonal distance positive.
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

EPS = 1e-12  # reference ``pdist(..., eps=1e-12)``: the clamp of the squared distances


class RKDConfig(MethodConfig):
    distance_weight: float = Field(
        default=25.0, ge=0, description="weight of the distance-wise loss (RepDistiller RKDLoss w_d: 25, × -b 1)")
    angle_weight: float = Field(
        default=50.0, ge=0, description="weight of the angle-wise loss (RepDistiller RKDLoss w_a: 50, × -b 1)")
    ce_weight: float = Field(default=1.0, ge=0, description="weight of CE on hard labels (RepDistiller -r: 1)")
    squared_distance: bool = Field(
        default=False, description="squared Euclidean distances in the distance term (RepDistiller: squared=False)")


COINCIDENT = 1e-12  # squared distance over ‖e_i‖² + ‖e_j‖² below which two embeddings count as equal


class _Angles(torch.autograd.Function):
    """ψ_A[i, j, k] = a_ij · a_ik · (g_jk − q_ij − q_ik) from b × b float64 inputs: the Gram matrix g,
    q_ij = g_ij − g_ii / 2 and the inverse distances a (0 for coincident pairs). The cancelling sum is formed in
    float64, the b³ products (and their gradients) in ``dtype``; the backward reads each b³ tensor twice instead of
    the dozen passes autograd makes through the broadcasts."""

    @staticmethod
    def forward(ctx, g, q, inv, dtype):
        dot = g.unsqueeze(0) - q.unsqueeze(2)
        dot -= q.unsqueeze(1)
        inv_d = inv.to(dtype)
        angles = dot.to(dtype).mul_(inv_d.unsqueeze(2)).mul_(inv_d.unsqueeze(1))
        ctx.save_for_backward(inv, angles)
        return angles

    @staticmethod
    def backward(ctx, grad):
        inv, angles = ctx.saved_tensors
        inv_d = inv.to(grad.dtype)
        by_dot = (grad * inv_d.unsqueeze(2)).mul_(inv_d.unsqueeze(1))  # ∂L/∂(g_jk − q_ij − q_ik)
        by_angle = grad * angles  # a_ij · ∂L/∂a_ij, summed over k, from either side of the (j, k) pair

        def both_sides(t):
            return (t.sum(2) + t.sum(1)).to(inv.dtype)

        grad_inv = both_sides(by_angle) / torch.where(inv > 0, inv, 1.0)
        return by_dot.sum(0).to(inv.dtype), -both_sides(by_dot), grad_inv, None


def _geometry(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ψ's distances ‖e_j − e_i‖ (b, b), float64, 0 on the diagonal and for coincident pairs; ψ_A (b, b, b) in the
    features' dtype, entry [i, j, k] the cosine between e_j − e_i and e_k − e_i, 0 where one of them is 0)."""
    flat = features.flatten(1)
    x = flat.to(torch.float64)
    g = x @ x.T
    sq = g.diagonal()
    scale = sq.unsqueeze(1) + sq.unsqueeze(0)
    squared = scale - 2 * g
    apart = squared > COINCIDENT * scale
    apart.fill_diagonal_(False)
    norms = torch.where(apart, torch.where(apart, squared, 1.0).sqrt(), 0.0)
    inv = torch.where(apart, 1.0 / torch.where(apart, norms, 1.0), 0.0)
    return norms, _Angles.apply(g, g - sq.unsqueeze(1) / 2, inv, flat.dtype)


def _normalized_distances(norms: torch.Tensor, squared: bool) -> torch.Tensor:
    """ψ_D: the pairwise distances (squared ones clamped at 1e-12, hence roots at 1e-6; 0 on the diagonal) over their
    mean off the diagonal."""
    b = norms.shape[0]
    dist = norms.pow(2).clamp_min(EPS) if squared else norms.clamp_min(EPS**0.5)
    off_diagonal = 1.0 - torch.eye(b, dtype=dist.dtype, device=dist.device)
    dist = dist * off_diagonal
    return dist / (dist.sum() / (b * (b - 1)))


def rkd_losses(f_s: torch.Tensor, f_t: torch.Tensor, squared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_D, L_A), unweighted: smooth-L1 means over all pairs and all triplets (reference ``RKDLoss.forward``)."""
    norms_s, angle_s = _geometry(f_s)
    with torch.no_grad():
        norms_t, angle_t = _geometry(f_t.detach())
    angle = F.smooth_l1_loss(angle_s, angle_t.to(angle_s.dtype))
    if f_s.shape[0] < 2:  # no pairs: no mean distance to normalise by
        return f_s.new_zeros(()), angle
    with torch.no_grad():
        dist_t = _normalized_distances(norms_t, squared)
    distance = F.smooth_l1_loss(_normalized_distances(norms_s, squared).to(f_s.dtype), dist_t.to(f_s.dtype))
    return distance, angle


@register_method("rkd")
class RKD(Method):
    """Park et al. 2019: CE + Huber losses between student and teacher pairwise distances and triplet angles."""

    version = 3
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
