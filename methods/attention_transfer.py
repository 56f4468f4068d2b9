"""Attention transfer: Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of
Convolutional Neural Networks via Attention Transfer", ICLR 2017 (arXiv:1612.03928).

Reference implementations: szagoruyko/attention-transfer, ``cifar.py`` (``at``, ``at_loss``, the loss
``... + opt.beta * sum(loss_groups)``); HobbitLong/RepDistiller, ``distiller_zoo/AT.py`` (``Attention``) and
``helper/loops.py`` (``--distill attention``: ``gamma · CE + beta · sum(loss_group)``).

Formula, for a feature A of shape (B, C, *positions), with positions (L) for 1-D maps (temporal attention)
or (H, W) for 2-D maps (spatial attention):

    Q(A)  = normalize_L2( mean_c |A_c|^p  flattened per sample )          (reference ``at``)
    L     = ce_weight · CE(z_s, y) + beta · Σ_{i ∈ stages} mean_{b, positions} (Q(F_s^i) − Q(F_t^i))²

i.e. per stage ``(at(x) - at(y)).pow(2).mean()`` exactly as both reference codes, multiplied by beta (not
beta/2). If student and teacher maps differ in spatial size, the larger *feature map* is adaptive-average-
pooled to the smaller size (per dimension) before Q is computed, as RepDistiller's ``at_loss`` does.

Defaults (source): beta = 1000 (paper: β = 10³ with the code's per-element mean; RepDistiller ``-b 1000``),
p = 2 (paper's choice for activation-based AT; ``x.pow(2)`` in both codes), ce_weight = 1 (RepDistiller
``-r`` default 1; the original code's ``(1 - alpha) · CE`` with alpha = 0). stages = (-3, -2, -1): both
references transfer at every stage output (the three residual groups g0, g1, g2 in ``cifar.py``;
``feat[1:-1]`` in RepDistiller drops only the stem and the pooled vector), which is all stages of a 3-stage
model such as cnn1d_*.

Deviations:
- Loss scale follows the code, not the printed formula: the paper writes β/2 · Σ_j ‖Q_s/‖Q_s‖ − Q_t/‖Q_t‖‖_p and
  says β = 10³ is divided by the attention map size and batch size; the code's mean of squares times β is what
  β = 1000 was used with, so it is used here (no ½, squared distance).
- |A|^p (the paper's definition) for odd or fractional p, where the code's A.pow(p) would differ; for even p
  (the default) A^p, as the code, which equals |A|^p and skips the abs. p must be ≥ 1: for p < 1 the gradient
  of |A|^p is infinite at the exact zeros of post-ReLU maps.
- Pooling for mismatched sizes is RepDistiller's addition (square (t_H, t_H) there; per-dimension here).
- The default stage list is fixed, not "all stages": on a 4-stage model it takes the last three, on a
  2-stage model it fails with the usual unknown-stage error (set ``stages``).
- Transformer hidden states (L, H) (taps with a ``mask``, kdbench.taps): the channels are the hidden units,
  the positions the tokens: Q = normalize_L2(mean_h |A_h|^p over the real tokens, 0 at padding), and the mean of
  squares runs over real tokens only. Stages pair by the same index on both models (``-1``: the last layers).

Transformer variant, ``maps: attention`` (for models with ``attn:<i>`` taps): the self-attention distributions
themselves are transferred, as in MiniLM (Wang, Wei, Dong, Bao, Yang & Zhou, "MiniLM: Deep Self-Attention
Distillation for Task-Agnostic Compression of Pre-Trained Transformers", NeurIPS 2020, arXiv:2002.10957, §3,
"self-attention distribution transfer"). With A_{l,a,t} the attention distribution of query token t in
head a of layer l (softmax over keys, before attention dropout), A_h heads and |x| real tokens of a sentence:

    L_AT  = 1 / (A_h |x|) · Σ_a Σ_{t real} KL(A^T_{l_t, a, t} ‖ A^S_{l_s, a, t})        per sentence, batch mean
    L     = ce_weight · CE(z_s, y) + beta · Σ_{stages} L_AT

Padded keys have probability 0 in both distributions (the models mask them) and padded queries are left out.
Defaults with ``maps: attention`` (source): stages = (-1,), the last layer of each model (MiniLM transfers only
the last layer, so student and teacher depths may differ: layer mapping last ↔ last); beta = 1 (MiniLM sums its
terms with weight 1); ce_weight = 1. Both are filled in only when not given, so the resolved config names them.
Reference implementation: microsoft/unilm, ``minilm/`` publishes the checkpoints and a fine-tuning example, not
the distillation code; this follows the paper's equation. Deviations from MiniLM: its value-relation transfer
(L_VR, KL between softmax(V Vᵀ/√d) of the last layers) is not implemented (no tap exposes the values);
MiniLM distils task-agnostically during pre-training, here the term is added to task fine-tuning with CE
(task-specific, as the other methods of the benchmark); student and teacher need the same number of heads
(as in MiniLM). The config key ``maps`` is left out of the resolved config when it is ``activation``, so
existing runs keep their config hash.
"""

from __future__ import annotations

from typing import Literal

from optuna.distributions import FloatDistribution
import torch
import torch.nn.functional as F
from pydantic import Field, model_serializer, model_validator

from kdbench.errors import KdbenchError
from kdbench.taps import MASK, is_token_sequence, real_token_mean
from kdbench.losses import pooled_to, summed
from kdbench.method import Method, MethodConfig, register_method

ATTENTION_DEFAULTS = {"stages": (-1,), "beta": 1.0}  # maps: attention (MiniLM: last layer, weight 1)


class AttentionTransferConfig(MethodConfig):
    stages: tuple[int, ...] = Field(
        default=(-3, -2, -1), min_length=1, description="stage indices whose attention maps are matched"
    )
    beta: float = Field(default=1000.0, ge=0, description="weight of the summed AT losses (paper, RepDistiller: 1000)")
    p: float = Field(default=2.0, ge=1, description="exponent of |A| in the attention map (paper: 2)")
    ce_weight: float = Field(default=1.0, ge=0, description="weight of CE on hard labels (RepDistiller -r: 1)")
    maps: Literal["activation", "attention"] = Field(
        default="activation",
        description="activation: Zagoruyko & Komodakis maps of stage outputs; attention: MiniLM KL of attn:<i>",
    )

    @model_validator(mode="before")
    @classmethod
    def _attention_defaults(cls, data):
        if isinstance(data, dict) and data.get("maps") == "attention":
            return {**ATTENTION_DEFAULTS, **data}
        return data

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        data = handler(self)
        if self.maps == "activation":
            data.pop("maps", None)  # configs written before ``maps`` existed keep their hash
        return data


def stage_taps(config: AttentionTransferConfig) -> tuple[str, ...]:
    kind = "attn" if config.maps == "attention" else "stage"
    return tuple(f"{kind}:{i}" for i in config.stages)


def _abs_pow(values: torch.Tensor, p: float) -> torch.Tensor:
    """|A|^p; for even p A^p, the same values (and gradients) without the abs and its backward."""
    return values.pow(p) if p % 2 == 0 else values.abs().pow(p)


def attention_map(feature: torch.Tensor, p: float) -> torch.Tensor:
    """(B, C, *positions) → (B, positions): mean over channels of |A|^p, flattened, L2-normalised per sample."""
    return F.normalize(_abs_pow(feature, p).mean(1).flatten(1), dim=1)


def at_loss(f_s: torch.Tensor, f_t: torch.Tensor, p: float) -> torch.Tensor:
    """Mean over batch and positions of the squared difference of the attention maps (reference ``at_loss``)."""
    size = tuple(min(s, t) for s, t in zip(f_s.shape[2:], f_t.shape[2:]))
    return (attention_map(pooled_to(f_s, size), p) - attention_map(pooled_to(f_t, size), p)).pow(2).mean()


def token_attention_map(hidden: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """(B, L, H) hidden states → (B, L): mean over hidden units of |A|^p, 0 at padding, L2-normalised per sample."""
    return F.normalize(_abs_pow(hidden, p).mean(-1) * mask.to(hidden.dtype), dim=1)


def token_at_loss(h_s: torch.Tensor, h_t: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """``at_loss`` on hidden states: the mean of squared differences over the real tokens of the batch."""
    diff = token_attention_map(h_s, mask, p) - token_attention_map(h_t, mask, p)
    return real_token_mean(diff.pow(2), mask)


def attention_kl(p_s: torch.Tensor, p_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MiniLM's L_AT: KL(p_t ‖ p_s) of each (head, real query) distribution over the real keys, averaged over heads
    and real queries per sentence, then over the batch. ``p_s``, ``p_t``: (B, heads, L, L) probabilities."""
    keys = mask.bool()[:, None, None, :]  # padded keys: probability 0 on both sides, left out of the sum
    log_s = p_s.masked_fill(~keys, 1.0).clamp_min(torch.finfo(p_s.dtype).tiny).log()
    log_t = p_t.masked_fill(~keys, 1.0).clamp_min(torch.finfo(p_t.dtype).tiny).log()
    kl = (p_t * (log_t - log_s)).masked_fill(~keys, 0.0).sum(-1).mean(1)  # (B, L): per query, mean over heads
    queries = mask.to(kl.dtype)
    return ((kl * queries).sum(1) / queries.sum(1).clamp_min(1)).mean()


@register_method("attention_transfer")
class AttentionTransfer(Method):
    """Zagoruyko & Komodakis 2017: CE + beta · Σ_stages squared distance of normalised attention maps."""

    version = 1
    Config = AttentionTransferConfig
    search_space = {  # kdbench tune: log-uniform, each holding the default
        "beta": FloatDistribution(1.0, 10000.0, log=True),
    }

    def __init__(self, config: AttentionTransferConfig, student_shapes, teacher_shapes):
        super().__init__(config, student_shapes, teacher_shapes)
        self.tokens = is_token_sequence(student_shapes)
        for tap in stage_taps(config):
            s_shape, t_shape = student_shapes[tap], teacher_shapes[tap]
            if config.maps == "attention":
                if s_shape != t_shape or len(s_shape) != 3:
                    raise KdbenchError(
                        f"attention_transfer (maps: attention): {tap} has student shape {s_shape} and teacher shape "
                        f"{t_shape}; MiniLM needs attention maps (heads, L, L) with the same number of heads"
                    )
                if not self.tokens:
                    raise KdbenchError("attention_transfer (maps: attention) needs the padding mask of a token model")
            elif self.tokens:
                if len(s_shape) != 2 or s_shape[0] != t_shape[0] or len(t_shape) != 2:
                    raise KdbenchError(f"attention_transfer: {tap} has student shape {s_shape} and teacher shape "
                                       f"{t_shape}; hidden states must be (L, H) with the same length L")
            elif len(s_shape) != len(t_shape) or len(s_shape) not in (2, 3):
                raise KdbenchError(
                    f"attention_transfer: {tap} has student shape {s_shape} and teacher shape {t_shape}; "
                    "attention needs feature maps (C, L) or (C, H, W) on both"
                )

    @classmethod
    def taps(cls, config):
        taps = ("logits", *stage_taps(config))
        return taps, taps

    def loss(self, student, teacher, target, progress):
        c = self.config
        if c.maps == "attention":
            at = summed(attention_kl(student[tap], teacher[tap], student[MASK]) for tap in stage_taps(c))
        elif self.tokens:
            at = summed(token_at_loss(student[tap], teacher[tap], student[MASK], c.p) for tap in stage_taps(c))
        else:
            at = summed(at_loss(student[tap], teacher[tap], c.p) for tap in stage_taps(c))
        return {"ce": c.ce_weight * F.cross_entropy(student["logits"], target), "at": c.beta * at}
