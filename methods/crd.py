"""Contrastive representation distillation: Tian, Krishnan & Isola, "Contrastive Representation Distillation",
ICLR 2020 (arXiv:1910.10699).

Reference implementation: HobbitLong/RepDistiller, ``crd/criterion.py`` (``CRDLoss``, ``ContrastLoss``, ``Embed``),
``crd/memory.py`` (``ContrastMemory``), ``dataset/cifar100.py`` (``CIFAR100InstanceSample``: which rows are the
positive and the negatives), ``helper/loops.py`` (``train_distill``: ``--distill crd`` reads ``feat[-1]``, the pooled
classifier input) and ``train_student.py`` (defaults).

Formula. f_s, f_t: the student's and the teacher's ``embedding`` taps (the classifier inputs, (B, D_s), (B, D_t));
i: each sample's row in the training split (the ``index`` tap); N: the number of training samples; d: feat_dim;
τ: nce_t; m: nce_m; K: the number of negatives per sample; y: the labels; z_s, z_t: the logits.

    e_s = W_s f_s + b_s, e_s ← e_s / ‖e_s‖₂        e_t = W_t f_t + b_t, e_t ← e_t / ‖e_t‖₂      (``Embed``)

W_s, b_s, W_t, b_t are the method's own trainable modules (the teacher's head trains too, with the student's loss).
Two memory banks M_s, M_t ∈ R^{N×d} (buffers, no gradient) hold one vector per training sample. For sample b of
the batch, j_0 = i_b is the positive row and j_1 … j_K are negative rows (see "Negatives"):

    P^s_{b,k} = exp(⟨M_t[j_k], e_s,b⟩ / τ) / Z_s      the student embedding against the teacher bank
    P^t_{b,k} = exp(⟨M_s[j_k], e_t,b⟩ / τ) / Z_t      the teacher embedding against the student bank
    L_NCE(P)  = −(1/B) Σ_b [ log( P_{b,0} / (P_{b,0} + K/N + ε) ) + Σ_{k=1..K} log( (K/N) / (P_{b,k} + K/N + ε) ) ]
    L_crd     = L_NCE(P^s) + L_NCE(P^t)
    L         = ce_weight · CE(z_s, y) + crd_weight · L_crd  [+ kd_weight · T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)),
                                                             only when kd_weight > 0; kdbench.losses.kd_loss]

This is NCE with the uniform noise distribution P_n = 1/N (``ContrastLoss``, "Eq (18)" there; the paper's critic
h(T, S) = e^{⟨g_T, g_S⟩/τ} / (e^{⟨g_T, g_S⟩/τ} + K/N) with P in place of the exponential), ε = 1e-7 as in the
reference. Z_s (Z_t) is estimated once, on the first batch the method sees: N times the mean of the
B·(K+1) values exp(⟨·,·⟩/τ) of that batch (without gradient), then fixed; it is the buffer ``z`` (Z_s, Z_t; −1 until
set), so a resumed run equals an uninterrupted one. The loss is computed in log space
(log h = log P − logaddexp(log P, log(K/N + ε))), the same value without overflow.

Memory banks (``ContrastMemory``): initialised uniformly in [−stdv, stdv], stdv = 1/√(d/3) (each row then has
expected squared norm 1), M_s from torch's global RNG before M_t, after the two heads, as the reference builds
them. Once the loss is computed, under no_grad, the batch's rows are updated with its (detached) embeddings:
M_s[i] ← normalize(m · M_s[i] + (1 − m) · e_s), M_t[i] ← normalize(m · M_t[i] + (1 − m) · e_t) (L2, per row).
The reference does so at the end of its forward; here the banks are saved for the loss's backward, so the update
is applied in ``on_step_end`` (after the student step), or at the start of the next ``loss`` in a loop that never
calls it: the same values, since nothing reads the banks in between.

Negatives. K = min(nce_k, N − 1), so that small training splits (the CPU tracks) never ask for more negatives
than there are other samples. The positive is the sample itself (RepDistiller's default ``--mode exact``). The
negatives are drawn i.i.d., with replacement, uniformly, with torch's global RNG on the banks' device (never
seeded here), by ``draw_negatives(index, target)`` (tests replace it to fix them):
- every draw is uniform over the N − 1 rows other than the sample's own row (a draw r ∈ {0 … N−2} is shifted to
  r + 1 when r ≥ i), so the positive's row is never a negative;
- with ``negatives: other_classes`` (the default, as the reference's ``cls_negative[target]``: the rows of every
  other class), a draw whose row has the anchor's label is drawn again, up to 64 rounds (a row still of the
  anchor's class after that, probability 0.5⁶⁴ per draw on two classes, is kept). The method learns each row's
  label when it first sees the sample (the buffer ``labels``, −1 until then); a row not seen yet is accepted.
  ``other_samples`` skips the label test: uniform over all other samples.

Defaults (source): feat_dim = 128, nce_k = 16384, nce_t = 0.07, nce_m = 0.5 (RepDistiller ``train_student.py``:
``--feat_dim 128 --nce_k 16384 --nce_t 0.07 --nce_m 0.5``); crd_weight β = 0.8, kd_weight α = 0 (README's CRD
command ``--distill crd -a 0 -b 0.8``); ce_weight γ = 1 (``-r`` default 1); temperature T = 4 (``--kd_T 4``, used
only when kd_weight > 0: the README's CRD+KD command is ``-a 1 -b 0.8``); negatives = other_classes
(``dataset/cifar100.py``, ``CIFAR100InstanceSample``, ``mode='exact'``).

Deviations:
- Negatives are drawn with replacement. The reference draws K of the other-class rows without replacement
  (``np.random.choice(..., replace=False)``) unless K exceeds their number. Each negative has the same uniform
  marginal either way, so the expected loss and gradient are the same; only their variance differs (at CIFAR-100's
  K = 16384 of ~49,500 other-class rows, about 15 % of i.i.d. draws repeat a row). I.i.d. draws are the NCE noise
  model the loss assumes (P_n = 1/N per draw) and cost O(B·K) rather than O(B·N).
- The reference knows every sample's label before training; here a row's label is known from the first batch
  that contains the sample, so during the first epoch a row not seen yet can be a negative of its own class (its
  bank vector is still the random initial one, which carries no class information); and same-class draws are
  redrawn at most 64 times (see "Negatives"). ``negatives: other_samples``
  (uniform over all other samples, the NCE noise model of the paper) is an option, not in the reference.
- K is bounded by N − 1 (the reference assumes K < N). The scores are computed against the whole bank
  (e_s M_tᵀ, then the K + 1 rows picked) rather than by gathering the K + 1 rows first (``index_select``, ``bmm``):
  the same values up to rounding, in B·N numbers instead of B·(K+1)·d (less memory whenever N < (K+1)·d, as on
  CIFAR-100: 50,000 < 16,385 · 128). Their backward sums the picked rows weighted by their gradients
  (``embedding_bag``) instead of multiplying a dense (B, N) gradient by the bank: the same gradient up to rounding
  (version 2; version 1 let autograd do the dense product).
- L2 normalisation divides by max(‖e‖, 1e-12) (``F.normalize``) instead of ‖e‖: the same except for a zero vector.
- The loss is computed in log space (see above): the reference's formula, without exp overflow; log(P + K/N + ε)
  as max(log P, c) + log(1 + e^−|log P − c|), c = log(K/N + ε) (version 2; version 1 called ``torch.logaddexp``,
  the same value up to rounding).
- Several processes (DDP): the banks are buffers, which DDP broadcasts from the first process at every forward
  pass, so only that process's rows update the banks (the reference trains on one GPU).
- Transformers (hidden states with a ``mask``): the ``embedding`` tap is the classifier input, BERT's pooled
  [CLS] vector (kdbench.taps), so CRD runs on it unchanged; the paper and the reference are CNN-only.
"""

from __future__ import annotations

import math
from typing import Literal

from optuna.distributions import FloatDistribution
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.losses import kd_loss
from kdbench.method import Method, MethodConfig, register_method
from kdbench.taps import EMBEDDING, INDEX

EPS = 1e-7  # RepDistiller crd/criterion.py: added to the NCE denominators
MAX_REDRAWS = 64  # rounds of redrawing same-class negatives (negatives: other_classes)


class CRDConfig(MethodConfig):
    crd_weight: float = Field(default=0.8, ge=0, description="β, weight of the CRD term (RepDistiller README -b 0.8)")
    ce_weight: float = Field(default=1.0, ge=0, description="γ, weight of CE on hard labels (RepDistiller -r: 1)")
    kd_weight: float = Field(default=0.0, ge=0, description="α, weight of the KD term (RepDistiller README -a 0)")
    temperature: float = Field(default=4.0, gt=0, description="KD temperature, used if kd_weight > 0 (--kd_T: 4)")
    feat_dim: int = Field(default=128, ge=1, description="dimension d of the embedding heads (--feat_dim: 128)")
    nce_k: int = Field(default=16384, ge=1,
                       description="negatives per sample, capped at N − 1 (--nce_k: 16384)")
    nce_t: float = Field(default=0.07, gt=0, description="NCE temperature τ (--nce_t: 0.07)")
    nce_m: float = Field(default=0.5, ge=0, lt=1, description="memory bank momentum m (--nce_m: 0.5)")
    negatives: Literal["other_classes", "other_samples"] = Field(
        default="other_classes",
        description="negative rows: of other classes (RepDistiller cls_negative: other_classes) or any other sample")


def _embedding_dim(shapes: dict, who: str) -> int:
    shape = shapes.get(EMBEDDING)
    if shape is None or len(shape) != 1:
        raise KdbenchError(f"crd: the {who}'s embedding tap has shape {shape}; it must be a vector (D,)")
    return shape[0]


def _embed(head: nn.Linear, features: torch.Tensor) -> torch.Tensor:
    """RepDistiller's ``Embed``: Linear, then L2 normalisation of each row."""
    return F.normalize(head(features.flatten(1)), dim=1)


def _log_add_exp(x: torch.Tensor, c: float) -> torch.Tensor:
    """log(eˣ + eᶜ) elementwise, as max(x, c) + log(1 + e^−|x − c|): ``torch.logaddexp``'s value to float rounding
    (the small term's absolute error is below 1e-7), without overflow, in vectorised ops (on CPU ``logaddexp``,
    ``softplus`` and ``log1p`` run element by element, 4× slower on a (100, 1025) batch)."""
    d = x - c
    return torch.relu(d) + c + torch.log(torch.exp(-d.abs()) + 1)


class _BankScores(torch.autograd.Function):
    """⟨bank[rows[b, k]], anchor[b]⟩, (B, K+1): the scores against the whole bank, then the rows picked; the
    backward sums the picked rows weighted by their gradients (``embedding_bag``), O(B·(K+1)·d), instead of a
    dense (B, N) gradient times the bank, O(B·N·d). The bank gets no gradient."""

    @staticmethod
    def forward(ctx, anchor, bank, rows):
        ctx.save_for_backward(bank, rows)
        ctx.anchor_dtype = anchor.dtype
        return (anchor @ bank.T).gather(1, rows)

    @staticmethod
    def backward(ctx, grad):
        bank, rows = ctx.saved_tensors
        weighted = F.embedding_bag(rows, bank, per_sample_weights=grad.to(bank.dtype), mode="sum")
        return weighted.to(ctx.anchor_dtype), None, None


@register_method("crd")
class CRD(Method):
    """Tian et al. 2020: CE + NCE contrast of student and teacher embeddings against memory banks of both."""

    version = 2
    Config = CRDConfig
    search_space = {  # kdbench tune: log-uniform, each holding the default
        "crd_weight": FloatDistribution(0.05, 5.0, log=True),
        "nce_t": FloatDistribution(0.03, 0.3, log=True),
    }

    def __init__(self, config: CRDConfig, student_shapes, teacher_shapes):
        super().__init__(config, student_shapes, teacher_shapes)
        if INDEX not in student_shapes:
            raise KdbenchError("crd: needs the 'index' tap's shape (N,), the size of the training split")
        (n,) = student_shapes[INDEX]
        if n < 2:
            raise KdbenchError(f"crd: needs at least 2 training samples for a negative, got {n}")
        self.n_data, self.k = n, min(config.nce_k, n - 1)
        d = config.feat_dim
        self.embed_s = nn.Linear(_embedding_dim(student_shapes, "student"), d)
        self.embed_t = nn.Linear(_embedding_dim(teacher_shapes, "teacher"), d)
        stdv = 1.0 / math.sqrt(d / 3)
        self.register_buffer("memory_s", torch.rand(n, d).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_t", torch.rand(n, d).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z", torch.full((2,), -1.0))  # Z_s, Z_t; −1 until the first batch sets them
        self.register_buffer("labels", torch.full((n,), -1, dtype=torch.long))  # each row's label once seen
        self._pending = None  # (index, e_s, e_t) of the last batch, until its rows are updated

    @classmethod
    def taps(cls, config):
        return ("logits", EMBEDDING, INDEX), ("logits", EMBEDDING)

    def _others(self, index: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Rows drawn uniformly from the N − 1 rows other than ``index`` (broadcast against ``shape``)."""
        rows = torch.randint(0, self.n_data - 1, shape, device=self.memory_s.device)
        return rows + (rows >= index).long()

    def draw_negatives(self, index: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, K) negative rows for the batch's rows ``index`` (B,) with labels ``target`` (B,)."""
        index = index.to(self.memory_s.device)
        negatives = self._others(index[:, None], (len(index), self.k))
        if self.config.negatives == "other_classes":
            target = target.to(self.labels.device)
            rows, cols = (self.labels[negatives] == target[:, None]).nonzero(as_tuple=True)
            for _ in range(MAX_REDRAWS):  # redraw the draws of the anchor's class, row-major, until none is left
                if rows.numel() == 0:
                    break
                redrawn = self._others(index[rows], rows.shape)
                negatives[rows, cols] = redrawn
                again = self.labels[redrawn] == target[rows]
                rows, cols = rows[again], cols[again]
        return negatives

    def _log_p(self, anchor: torch.Tensor, bank: torch.Tensor, rows: torch.Tensor, which: int) -> torch.Tensor:
        """log P = ⟨bank[rows], anchor⟩/τ − log Z, (B, K+1); Z set from this batch if not set yet."""
        scores = _BankScores.apply(anchor, bank, rows) / self.config.nce_t
        if self.z[which].item() < 0:
            with torch.no_grad():
                log_mean = torch.logsumexp(scores.flatten(), 0) - math.log(scores.numel())
                self.z[which] = torch.exp(log_mean) * self.n_data
        return scores - torch.log(self.z[which])

    def nce_loss(self, log_p: torch.Tensor) -> torch.Tensor:
        """RepDistiller's ``ContrastLoss`` on log P (B, K+1), column 0 the positive; P_n = 1/N."""
        noise = (log_p.shape[1] - 1) / self.n_data  # K · P_n
        log_denominator = _log_add_exp(log_p, math.log(noise + EPS))  # log(P + K/N + ε)
        positive = (log_p[:, 0] - log_denominator[:, 0]).sum()
        negative = (math.log(noise) - log_denominator[:, 1:]).sum()
        return -(positive + negative) / log_p.shape[0]

    def loss(self, student, teacher, target, progress):
        c = self.config
        self.update_memory()  # a previous batch's update not yet applied (a loop that never calls on_step_end)
        logits, index = student["logits"], student[INDEX]
        e_s = _embed(self.embed_s, student[EMBEDDING])
        e_t = _embed(self.embed_t, teacher[EMBEDDING])
        with torch.no_grad():
            self.labels[index] = target.to(self.labels.device)
        rows = torch.cat([index[:, None].to(self.memory_s.device), self.draw_negatives(index, target)], dim=1)
        crd = (self.nce_loss(self._log_p(e_s, self.memory_t, rows, 0))
               + self.nce_loss(self._log_p(e_t, self.memory_s, rows, 1)))
        terms = {"ce": c.ce_weight * F.cross_entropy(logits, target), "crd": c.crd_weight * crd}
        if c.kd_weight > 0:
            terms["kd"] = c.kd_weight * kd_loss(logits, teacher["logits"], c.temperature)
        # the banks move after this loss's backward (they are saved for it): in on_step_end, or at the next loss
        self._pending = (index.detach(), e_s.detach(), e_t.detach())
        return terms

    @torch.no_grad()
    def update_memory(self) -> None:
        """ContrastMemory's update of the last batch's rows: M[i] ← normalize(m · M[i] + (1 − m) · e)."""
        if self._pending is None:
            return
        (index, e_s, e_t), self._pending = self._pending, None
        m = self.config.nce_m
        for bank, e in ((self.memory_s, e_s), (self.memory_t, e_t)):
            index = index.to(bank.device)
            bank[index] = F.normalize(bank[index] * m + e.to(bank) * (1 - m), dim=1)

    def on_step_end(self, progress):
        self.update_memory()
