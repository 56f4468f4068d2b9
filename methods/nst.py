"""Neuron selectivity transfer: Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity
Transfer", arXiv preprint, 2017 (arXiv:1707.01219).

Reference implementation: HobbitLong/RepDistiller, ``distiller_zoo/NST.py`` (``NSTLoss.nst_loss``,
``NSTLoss.poly_kernel``, ``full_loss = True``) and ``train_student.py`` (``--distill nst``: ``g_s = feat_s[1:-1]``,
``loss = gamma · CE + alpha · KL + beta · sum(loss_group)``; ``scripts/run_cifar_distill.sh``: ``-a 0 -b 50``).

Formula. A feature map F of shape (B, C, *positions) is read as C samples per example ("neuron selectivity
patterns"): the row f_k ∈ R^N of channel k over the N flattened positions, L2-normalised over the positions,
f̂_k = f_k / ‖f_k‖₂. With the polynomial kernel k(x, y) = (xᵀy + c)^d, for one example with student rows
ŝ_1 … ŝ_{C_s} and teacher rows t̂_1 … t̂_{C_t} (the channel counts may differ: the MMD compares the two
distributions of rows, no projection is learned):

    MMD²(S, T) = 1/C_t² Σ_{i,i'} k(t̂_i, t̂_i') + 1/C_s² Σ_{j,j'} k(ŝ_j, ŝ_j') − 2/(C_s C_t) Σ_{j,i} k(ŝ_j, t̂_i)
    L          = ce_weight · CE(z_s, y) + beta · Σ_{stages} mean_b MMD²(S_b, T_b)

with z_s the student logits, y the labels and mean_b the mean over the batch (the reference's ``.mean()`` of each
kernel matrix over batch and both channel axes). If the student's and the teacher's maps differ in spatial size,
the larger one is adaptive-average-pooled to the smaller size before flattening (the reference's ``nst_loss``).

Defaults (source): beta = 50 (RepDistiller ``-b 50``, ``scripts/run_cifar_distill.sh``), ce_weight = 1
(RepDistiller ``-r``/gamma default 1; ``-a 0``: no KD term), degree d = 2 and offset c = 0 (the paper's
polynomial kernel, the only kernel of the reference's ``poly_kernel``: ``(a·b).sum(-1).pow(2)``; d = 1, c = 0
is the paper's linear kernel). stages = (-3, -2, -1): RepDistiller's ``feat[1:-1]`` drops only the stem and the
pooled vector, i.e. the three residual groups of its ResNets and WRNs, which are all stages of a 3-stage model
such as cnn1d_*/cnn2d_*.

Deviations:
- Loss scale follows the code, not the printed formula: the paper writes λ/2 · L_MMD²; the reference's β · MMD²
  (no ½) is what β = 50 was used with.
- Only the polynomial kernel (with d and c configurable): the paper's Gaussian kernel variant is not implemented.
- The teacher's self-similarity term K(t, t) is kept in the value (the reference's ``full_loss = True``); it has
  no gradient either way.
- Spatial mismatch: the reference pools the larger map to the square size (t_H, t_H) judged by the height only;
  here each spatial dimension is pooled to the smaller of the two sizes (1-D and 2-D maps). Identical for square
  maps, and the CRD-zoo pairs have equal sizes anyway.
- The default stage list is fixed, not ``feat[1:-1]``: on a 4-stage model (the CIFAR ResNets/WRNs: stem + 3
  groups) it is exactly ``feat[1:-1]``; on VGG (5 stages) it takes blocks 2–4 where the reference also takes
  block 1; on a 2-stage model it fails with the usual unknown-stage error (set ``stages``).
- Transformer hidden states (L, H) (taps with a ``mask``, kdbench.taps): the hidden units are the channels and the
  real tokens the positions: padded positions are set to 0 before the normalisation, so they add nothing to the
  norms nor to the kernel's inner products (exactly as if they were left out). Student and teacher need the same
  length L; the hidden sizes may differ. Stages pair by the same index on both models (``-1``: the last layers).
"""

from __future__ import annotations

from optuna.distributions import FloatDistribution
import torch
import torch.nn.functional as F
from pydantic import Field

from kdbench.errors import KdbenchError
from kdbench.losses import pooled_to, summed
from kdbench.method import Method, MethodConfig, register_method
from kdbench.taps import MASK, is_token_sequence


class NSTConfig(MethodConfig):
    stages: tuple[int, ...] = Field(
        default=(-3, -2, -1), min_length=1,
        description="stage indices whose maps are matched (RepDistiller feat[1:-1]: the 3 groups)")
    beta: float = Field(default=50.0, ge=0, description="weight of the summed MMD² terms (RepDistiller -b: 50)")
    ce_weight: float = Field(default=1.0, ge=0, description="weight of CE on hard labels (RepDistiller -r: 1)")
    degree: int = Field(default=2, ge=1, description="polynomial kernel degree d (paper, RepDistiller: 2)")
    offset: float = Field(default=0.0, ge=0, description="polynomial kernel offset c (paper, RepDistiller: 0)")


def stage_taps(config: NSTConfig) -> tuple[str, ...]:
    return tuple(f"stage:{i}" for i in config.stages)


def _poly_kernel_mean(a: torch.Tensor, b: torch.Tensor, degree: int, offset: float) -> torch.Tensor:
    """Mean over batch and both row axes of (a_j · b_i + c)^d; ``a`` (B, C_a, N), ``b`` (B, C_b, N)."""
    gram = torch.bmm(a, b.transpose(1, 2))
    return (gram + offset).pow(degree).mean()


def _mmd2(rows_s: torch.Tensor, rows_t: torch.Tensor, degree: int, offset: float) -> torch.Tensor:
    """Batch mean of the squared MMD between the L2-normalised rows (B, C, N) of student and teacher."""
    s, t = F.normalize(rows_s, dim=2), F.normalize(rows_t, dim=2)
    return (_poly_kernel_mean(t, t, degree, offset) + _poly_kernel_mean(s, s, degree, offset)
            - 2 * _poly_kernel_mean(s, t, degree, offset))


def nst_loss(f_s: torch.Tensor, f_t: torch.Tensor, degree: int, offset: float) -> torch.Tensor:
    """MMD² of feature maps (B, C, *positions), the larger map pooled to the smaller spatial size first."""
    size = tuple(min(s, t) for s, t in zip(f_s.shape[2:], f_t.shape[2:]))
    return _mmd2(pooled_to(f_s, size).flatten(2), pooled_to(f_t, size).flatten(2), degree, offset)


def token_nst_loss(h_s: torch.Tensor, h_t: torch.Tensor, mask: torch.Tensor, degree: int,
                   offset: float) -> torch.Tensor:
    """MMD² of hidden states (B, L, H): hidden units as rows over the real tokens (padding set to 0)."""
    weights = mask.to(h_s.dtype).unsqueeze(-1)
    return _mmd2((h_s * weights).transpose(1, 2), (h_t * weights.to(h_t.dtype)).transpose(1, 2), degree, offset)


@register_method("nst")
class NST(Method):
    """Huang & Wang 2017: CE + beta · Σ_stages MMD² (polynomial kernel) between channel selectivity patterns."""

    version = 1
    Config = NSTConfig
    search_space = {  # kdbench tune: log-uniform, each holding the default
        "beta": FloatDistribution(0.1, 500.0, log=True),
    }

    def __init__(self, config: NSTConfig, student_shapes, teacher_shapes):
        super().__init__(config, student_shapes, teacher_shapes)
        self.tokens = is_token_sequence(student_shapes)
        for tap in stage_taps(config):
            s_shape, t_shape = student_shapes[tap], teacher_shapes[tap]
            if self.tokens:
                if len(s_shape) != 2 or len(t_shape) != 2 or s_shape[0] != t_shape[0]:
                    raise KdbenchError(f"nst: {tap} has student shape {s_shape} and teacher shape {t_shape}; "
                                       "hidden states must be (L, H) with the same length L")
            elif len(s_shape) != len(t_shape) or len(s_shape) not in (2, 3):
                raise KdbenchError(f"nst: {tap} has student shape {s_shape} and teacher shape {t_shape}; "
                                   "NST needs feature maps (C, L) or (C, H, W) on both")

    @classmethod
    def taps(cls, config):
        taps = ("logits", *stage_taps(config))
        return taps, taps

    def loss(self, student, teacher, target, progress):
        c = self.config
        if self.tokens:
            mmd = summed(token_nst_loss(student[tap], teacher[tap], student[MASK], c.degree, c.offset)
                         for tap in stage_taps(c))
        else:
            mmd = summed(nst_loss(student[tap], teacher[tap], c.degree, c.offset) for tap in stage_taps(c))
        return {"ce": c.ce_weight * F.cross_entropy(student["logits"], target), "nst": c.beta * mmd}
