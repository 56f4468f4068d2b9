"""Self-distillation with auxiliary classifiers ("Be Your Own Teacher", BYOT): Zhang, Song, Gao, Chen, Bao &
Ma, "Be Your Own Teacher: Improve the Performance of Convolutional Neural Networks via Self Distillation",
ICCV 2019 (arXiv:1905.08094). No external teacher.

Reference implementation: luanyunteng/pytorch-be-your-own-teacher (unofficial): ``train.py`` (losses, defaults)
and ``models/resnet.py`` (``branchBottleNeck`` heads). The authors' ArchipLab-LinfengZhang/
pytorch-self-distillation-final is the later journal version (other weights, a linear adaptation layer for the
feature loss, weight 1 on the deepest CE) and is not followed.

Formula (as in the reference's ``train.py``; the paper's §3 names the same three sources: CE from the labels,
KL to the deepest classifier, L2 hints to its feature). Auxiliary heads sit on the student stages
i ∈ ``stages``; the deepest classifier is the student's own output z_C, its feature F_C the input of that
classifier (the ``embedding`` tap) where it is the globally average-pooled deepest map, as on the CIFAR zoo
(ResNet, VGG, and WRN, whose classifier reads GAP of the final BN–ReLU of ``stage:-1``); otherwise
F_C = GAP(stage:-1) (global average pooling over length or height × width). Head i: F_i = GAP(bottleneck_i(stage_i)) ∈ R^{C_deep},
q_i = Linear(F_i). With sg = stop-gradient (both the unofficial and the authors' code detach the deepest logits
and feature):

    L = (1 − α) · CE(z_C, y)
        + Σ_i [ (1 − α) · CE(q_i, y) + α · T² · KL(softmax(sg(z_C) / T) ‖ softmax(q_i / T))
                + λ · Σ_batch Σ_channels (F_i − sg(F_C))² ]

KL is summed over classes and batch-averaged; the hint is summed over batch and channels as in the reference
(so λ's effective weight grows with the batch size). Returned terms: ``ce`` (deepest), ``aux_ce``, ``kd``, ``hint``.

Auxiliary head (the reference's ``branchBottleNeck``, in Conv1d for (C, L) or Conv2d for (C, H, W) stages):
1×1 conv C_i → m, BN, ReLU; k×k conv stride k (k = the stage's size over the deepest stage's, per spatial dim),
BN, ReLU; 1×1 conv m → C_deep, BN, ReLU; GAP; Linear(C_deep, classes); m = max(1, C_deep // 4) (reference:
C_deep // 4). The heads are this method's modules: they train the student's stages and are dropped at
deployment, never part of the student's parameters or checkpoint.

Defaults (source): α = 0.1, T = 3, λ = 1e-6 — the reference's ``train.py`` (``--alpha 0.1 --temperature 3
--beta 1e-6``); the paper's own values [UNVERIFIED: paper text not consulted] (the authors' journal code uses
0.3 and T = 3). stages = (0, 1): every stage but the last of a 3-stage model (the reference puts 3 heads on a
4-stage ResNet); set ``stages`` for deeper models. List shallow stages only: a head on the deepest stage
would merely copy the student's own classifier (``-1`` is refused; its positive index cannot be checked here).

Born-again networks (Furlanello et al. 2018) need no method file: vanilla_kd with a teacher of the student's own
architecture (a pair choice).

Deviations:
- KD is T²·KL; the reference uses T²·soft cross-entropy = T²·(KL + H(softmax(z_C / T))): same gradients, the
  logged value is lower by the (detached) entropy term.
- The hint is a plain squared error; the reference masks it to entries where F_i > 0 or F_C > 0, which changes
  nothing for the non-negative (post-ReLU) features compared here but would for signed features.
- On models whose classifier reads the flattened, unpooled map (the CPU tracks' cnn1d_* and cnn2d_*), F_C is
  GAP(stage:-1), the pooled form of the classifier's input, since the heads end in GAP. Head convolutions have no
  bias (BN follows). Before F_C was taken from the classifier's input, WRN students pooled the raw residual sum
  ``stage:-1`` instead (before the final BN–ReLU); the loss on every other model, the CPU tracks' included, is
  unchanged, so the version stays 1.
- Transformer hidden states (L, H) (taps with a ``mask``, kdbench.taps): the head is applied per token,
  Linear(H_i, m) → GELU → Linear(m, H_deep) with m = max(1, H_deep // 4) (the bottleneck's widths, with the
  transformer's own activation, no batch norm, and no final ReLU since hidden states are signed), and GAP
  becomes the mean over the real tokens (padding left out); F_C is that mean of the last layer's hidden states
  (the student's own classifier reads [CLS] through BERT's pooler instead). Self-distillation from the deepest
  classifier into per-layer classifiers of a BERT is FastBERT's scheme (Liu et al., ACL 2020), whose branches
  sit after every layer; the sst2 suite puts heads after every student layer but the last.
"""

from optuna.distributions import FloatDistribution
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.taps import MASK, is_token_sequence, token_mean
from kdbench.losses import kd_loss
from kdbench.method import Method, MethodConfig, register_method


class SelfDistillationConfig(MethodConfig):
    stages: tuple[int, ...] = Field(default=(0, 1), min_length=1, description="student stages given an aux head")
    alpha: float = Field(default=0.1, ge=0, le=1, description="KD weight α; CE gets 1 − α (reference: 0.1)")
    temperature: float = Field(default=3.0, gt=0, description="softmax temperature T (reference: 3)")
    hint_weight: float = Field(default=1e-6, ge=0, description="feature hint weight λ (reference --beta: 1e-6)")

    @field_validator("stages")
    @classmethod
    def _shallow_and_distinct(cls, stages: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(stages)) != len(stages):
            raise ValueError("stages must be distinct")
        if -1 in stages:
            raise ValueError("stage -1 is the deepest stage, whose classifier is the student's own output")
        return stages


def global_pool(feature: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) → (B, C)."""
    return feature.flatten(2).mean(2)


def bottleneck(in_shape: tuple[int, ...], deep_shape: tuple[int, ...]) -> nn.Sequential:
    """The reference's branchBottleNeck for one stage, followed by global average pooling: → (B, C_deep)."""
    conv, norm, pool = {
        2: (nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d),
        3: (nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d),
    }[len(in_shape)]
    deep = deep_shape[0]
    mid = max(1, deep // 4)
    ratio = tuple(max(1, size // deep_size) for size, deep_size in zip(in_shape[1:], deep_shape[1:]))
    return nn.Sequential(
        conv(in_shape[0], mid, 1, bias=False), norm(mid), nn.ReLU(),
        conv(mid, mid, ratio, stride=ratio, bias=False), norm(mid), nn.ReLU(),
        conv(mid, deep, 1, bias=False), norm(deep), nn.ReLU(),
        pool(1), nn.Flatten(1),
    )


def token_head(in_shape: tuple[int, ...], deep_shape: tuple[int, ...]) -> nn.Sequential:
    """The bottleneck for hidden states (L, H_i), per token: → (B, L, H_deep); pooled over real tokens after."""
    deep = deep_shape[-1]
    mid = max(1, deep // 4)
    return nn.Sequential(nn.Linear(in_shape[-1], mid), nn.GELU(), nn.Linear(mid, deep))


def check_feature_map(tap: str, shape: tuple[int, ...], deep_shape: tuple[int, ...], tokens: bool = False) -> None:
    if tokens:
        if len(shape) != 2 or len(deep_shape) != 2 or shape[0] != deep_shape[0]:
            raise KdbenchError(f"self_distillation: {tap} has shape {shape} and stage:-1 {deep_shape}; "
                               "hidden states must be (L, H) with the same length L")
        return
    if len(shape) not in (2, 3) or len(shape) != len(deep_shape):
        raise KdbenchError(
            f"self_distillation: {tap} has shape {shape} and stage:-1 {deep_shape}; auxiliary heads need "
            "convolutional feature maps of the same kind, (C, L) or (C, H, W)"
        )


@register_method("self_distillation")
class SelfDistillation(Method):
    """Zhang et al. 2019 (BYOT): auxiliary heads on shallow stages learn from labels and the deepest classifier."""

    version = 1
    needs_teacher = False
    Config = SelfDistillationConfig
    search_space = {  # kdbench tune: log-uniform, each holding the default
        "alpha": FloatDistribution(0.05, 0.9, log=True),
        "temperature": FloatDistribution(1.0, 8.0, log=True),
    }

    def __init__(self, config, student_shapes, teacher_shapes):
        super().__init__(config, student_shapes, teacher_shapes)
        deep_shape = student_shapes["stage:-1"]
        (num_classes,) = student_shapes["logits"]
        self.tokens = is_token_sequence(student_shapes)
        for tap in self.stage_taps(config):
            check_feature_map(tap, student_shapes[tap], deep_shape, self.tokens)
        head = token_head if self.tokens else bottleneck
        self.bottlenecks = nn.ModuleList(head(student_shapes[tap], deep_shape) for tap in self.stage_taps(config))
        width = deep_shape[-1] if self.tokens else deep_shape[0]
        # F_C is the classifier's input where that is the pooled deepest map (the CIFAR zoo), else GAP(stage:-1)
        self.deep_is_embedding = not self.tokens and student_shapes["embedding"] == (width,)
        self.classifiers = nn.ModuleList(nn.Linear(width, num_classes) for _ in config.stages)

    @staticmethod
    def stage_taps(config: SelfDistillationConfig) -> list[str]:
        return [f"stage:{i}" for i in config.stages]

    @classmethod
    def taps(cls, config):
        return ("logits", *cls.stage_taps(config), "stage:-1", "embedding"), ()

    def loss(self, student, teacher, target, progress):
        c = self.config
        z_deep = student["logits"]
        pool = (lambda f: token_mean(f, student[MASK])) if self.tokens else (lambda f: f)
        if self.tokens:
            deep = token_mean(student["stage:-1"], student[MASK])
        else:
            deep = student["embedding"] if self.deep_is_embedding else global_pool(student["stage:-1"])
        teacher_logits, teacher_feature = z_deep.detach(), deep.detach()
        aux_ce = kd = hint = z_deep.new_zeros(())
        for tap, head, classifier in zip(self.stage_taps(c), self.bottlenecks, self.classifiers):
            feature = pool(head(student[tap]))
            logits = classifier(feature)
            aux_ce = aux_ce + F.cross_entropy(logits, target)
            kd = kd + kd_loss(logits, teacher_logits, c.temperature)
            hint = hint + (feature - teacher_feature).pow(2).sum()
        return {
            "ce": (1 - c.alpha) * F.cross_entropy(z_deep, target),
            "aux_ce": (1 - c.alpha) * aux_ce,
            "kd": c.alpha * kd,
            "hint": c.hint_weight * hint,
        }
