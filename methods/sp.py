"""Similarity-preserving knowledge distillation: Tung & Mori, "Similarity-Preserving Knowledge Distillation",
ICCV 2019 (arXiv:1907.09682).

Reference implementation: HobbitLong/RepDistiller, ``distiller_zoo/SP.py`` (``Similarity.similarity_loss``) and
``train_student.py`` (``--distill similarity``: ``g_s = [feat_s[-2]]``, the last feature map before pooling;
loss ``gamma · CE + alpha · KD + beta · sum(loss_group)``).

Formula, for a batch of b samples and each chosen stage l, with Q_s (b × D_s) and Q_t (b × D_t) the student's and
the teacher's stage-l outputs each flattened per sample (D = C·H·W for a 2-D map, C·L for a 1-D map, C for a
vector), student logits z_s and labels y:

    G̃  = Q Qᵀ                                   (b × b: the samples' pairwise inner products)
    G   = G̃_[i,:] / max(‖G̃_[i,:]‖₂, 1e-12)      for every row i        (``F.normalize``, dim 1)
    L_SP^l = 1/b² · ‖G_t − G_s‖²_F               (squared Frobenius norm: summed over all b² entries)
    L   = ce_weight · CE(z_s, y) + beta · Σ_l L_SP^l

Only the b × b similarity matrices are compared, so the student's and the teacher's feature shapes (channels,
spatial size, hidden width) may differ freely; no trainable module is needed. The teacher's G_t carries no
gradient.

Defaults (source): stages = (-1,): RepDistiller's ``feat[-2]``, the output of the last stage before the global
pooling (kdbench's ``stage:-1`` on the CRD zoo, whose stage i is RepDistiller's ``feat[i]``); beta = 3000
(RepDistiller ``scripts/run_cifar_distill.sh``: ``--distill similarity -a 0 -b 3000``); ce_weight = 1
(``-r``/gamma default 1). No KD term (``-a 0``).

Transformer hidden states (L, H) (taps with a ``mask``, kdbench.taps): each sample's hidden states are flattened to
a vector of L·H entries with the padded positions set to 0, so G̃_[i,j] = Σ_{t real in both i and j} ⟨h_{i,t},
h_{j,t}⟩ (tokens are compared position by position, as the flattening of a feature map compares locations) and
whatever the model computes at padding cannot change the loss. Student and teacher may have different widths.

Deviations:
- Several stages are summed, as the reference's ``loss_group`` (and the paper's set I of layer pairs) allow;
  stages pair by the same index on both models (negative indices count from the end), not by the paper's
  hand-picked pairs.
- Transformer hidden states (padding zeroed before the flattening) are an extension: neither the paper nor the
  reference code covers token models.
- none in the loss otherwise.
"""

from __future__ import annotations

from optuna.distributions import FloatDistribution
import torch
import torch.nn.functional as F
from pydantic import Field

from kdbench.errors import KdbenchError
from kdbench.losses import summed
from kdbench.method import Method, MethodConfig, register_method
from kdbench.taps import MASK, is_token_sequence


class SPConfig(MethodConfig):
    stages: tuple[int, ...] = Field(
        default=(-1,), min_length=1,
        description="stage indices whose similarity matrices are matched (RepDistiller feat[-2]: the last stage)")
    beta: float = Field(default=3000.0, ge=0, description="weight of the summed SP losses (RepDistiller -b: 3000)")
    ce_weight: float = Field(default=1.0, ge=0, description="weight of CE on hard labels (RepDistiller -r: 1)")


def stage_taps(config: SPConfig) -> tuple[str, ...]:
    return tuple(f"stage:{i}" for i in config.stages)


def _similarity(features: torch.Tensor) -> torch.Tensor:
    """(b, ...) → (b, b): the Gram matrix of the flattened features, each row L2-normalised."""
    flat = features.flatten(1)
    return F.normalize(torch.mm(flat, flat.t()), p=2, dim=1, eps=1e-12)


def sp_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """1/b² ‖G_t − G_s‖²_F (reference ``similarity_loss``); the teacher side carries no gradient."""
    b = f_s.shape[0]
    diff = _similarity(f_t.detach()) - _similarity(f_s)
    return (diff * diff).sum() / (b * b)


def _zero_padding(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(b, L, H) hidden states with the padded positions (mask 0) set to 0."""
    return hidden * mask.to(hidden.dtype).unsqueeze(-1)


@register_method("sp")
class SP(Method):
    """Tung & Mori 2019: CE + beta · ‖row-normalised batch Gram matrices, student vs teacher‖²_F / b²."""

    version = 1
    Config = SPConfig
    search_space = {  # kdbench tune: log-uniform, each holding the default
        "beta": FloatDistribution(1.0, 10000.0, log=True),
    }

    def __init__(self, config: SPConfig, student_shapes, teacher_shapes):
        super().__init__(config, student_shapes, teacher_shapes)
        self.tokens = is_token_sequence(student_shapes)
        if self.tokens:
            for tap in stage_taps(config):
                s_shape, t_shape = student_shapes[tap], teacher_shapes[tap]
                if len(s_shape) != 2 or len(t_shape) != 2:
                    raise KdbenchError(f"sp: {tap} has student shape {s_shape} and teacher shape {t_shape}; "
                                       "on a token model both must be hidden states (L, H)")

    @classmethod
    def taps(cls, config):
        taps = ("logits", *stage_taps(config))
        return taps, taps

    def loss(self, student, teacher, target, progress):
        c = self.config
        pairs = [(student[tap], teacher[tap]) for tap in stage_taps(c)]
        if self.tokens:
            mask = student[MASK]
            pairs = [(_zero_padding(f_s, mask), _zero_padding(f_t, mask)) for f_s, f_t in pairs]
        return {
            "ce": c.ce_weight * F.cross_entropy(student["logits"], target),
            "sp": c.beta * summed(sp_loss(f_s, f_t) for f_s, f_t in pairs),
        }
