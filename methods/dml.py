"""Deep mutual learning: Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning", CVPR 2018 (arXiv:1706.00384).

Reference implementations: the paper's Algorithm 1 and Eq. 1–2, 9–10; SforAiDl/KD_Lib ``KD/vision/DML/dml.py``
(``DML.train_students``).

Online distillation: no pre-trained teacher. K networks train together from scratch on the same batches: the
pair's student (the network reported, as in every other row) and K − 1 peers of its architecture, which this
method owns (kdbench.method: ``peer_count``). With p_k = softmax(z_k), network k minimises

    L_k = CE(z_k, y) + kl_weight · 1/(K − 1) · Σ_{l ≠ k} KL(p_l ‖ p_k)

with p_l a constant for network k (detached). The terms are returned as ``ce`` and ``mutual`` (the student's)
and ``peer_ce`` and ``peer_mutual`` (the peers', summed); since each network's terms reach only its own weights,
one step on their sum is each network's own step on its L_k. KL is summed over classes, batch-averaged.

Defaults (source): K = 2, a student and one peer (the paper's main setting, Tables 1–3); kl_weight = 1 and no
temperature (Eq. 9–10: L_Θ1 = L_C1 + D_KL(p2 ‖ p1)).

Deviations:
- Update order: Algorithm 1 steps network 1, recomputes its predictions and then steps network 2 on the same
  batch (KD_Lib does the same by re-running every network for each loss). Here every network steps at once on
  the predictions of one forward pass, the trainer's single optimizer step (the K losses are still each
  network's own; only the peer targets are one step older for the later networks).
- KD_Lib's default ``loss_fn`` is the MSE between logits and it does not detach the peer's output; here the
  paper's KL with a detached target.
- The peers share the student's optimizer and schedule (one optimizer over all parameters, as the trainer
  has); the paper gives each network its own optimizer with the same settings.
- Only the student is evaluated and reported; the paper reports each network (and their mean).
"""

from optuna.distributions import FloatDistribution
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdbench.losses import summed
from kdbench.method import Method, MethodConfig, register_method
from kdbench.taps import INPUT


class DMLConfig(MethodConfig):
    networks: int = Field(default=2, ge=2, description="K: the student and K − 1 peers (paper: 2)")
    kl_weight: float = Field(default=1.0, ge=0, description="weight of the mutual KL terms (paper Eq. 9–10: 1)")


def mutual_losses(logits: list[torch.Tensor], target: torch.Tensor, kl_weight: float) -> list[tuple]:
    """(CE, mutual KL) of each network, the others' predictions detached."""
    k = len(logits)
    log_p = [F.log_softmax(z, dim=1) for z in logits]
    out = []
    for i, z in enumerate(logits):
        kl = summed(F.kl_div(log_p[i], log_p[j].detach(), reduction="batchmean", log_target=True)
                    for j in range(k) if j != i)
        out.append((F.cross_entropy(z, target), kl_weight * kl / (k - 1)))
    return out


@register_method("dml")
class DML(Method):
    """Zhang et al. 2018: the student and its peers learn from the labels and from each other."""

    version = 1
    Config = DMLConfig
    search_space = {  # kdbench tune: log-uniform, each holding the default
        "kl_weight": FloatDistribution(0.1, 4.0, log=True),
    }
    needs_teacher = False

    def __init__(self, config, student_shapes, teacher_shapes, peers: list[nn.Module]):
        super().__init__(config, student_shapes, teacher_shapes)
        self.peers = nn.ModuleList(peers)

    @classmethod
    def peer_count(cls, config):
        return config.networks - 1

    @classmethod
    def taps(cls, config):
        return ("logits", INPUT), ()

    def loss(self, student, teacher, target, progress):
        peer_logits = [peer(student[INPUT]) for peer in self.peers]
        (ce, mutual), *peers = mutual_losses([student["logits"], *peer_logits], target, self.config.kl_weight)
        return {"ce": ce, "mutual": mutual,
                "peer_ce": summed(p[0] for p in peers), "peer_mutual": summed(p[1] for p in peers)}
