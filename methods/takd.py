"""Teacher-assistant knowledge distillation: Mirzadeh, Farajtabar, Li, Levine, Matsukawa & Ghasemzadeh,
"Improved Knowledge Distillation via Teacher Assistant", AAAI 2020 (arXiv:1902.03393).

Reference implementations: imirzadeh/Teacher-Assistant-Knowledge-Distillation (``train.py``,
``TrainManager``); SforAiDl/KD_Lib ``KD/vision/TAKD/takd.py``.

Progressive distillation: the teacher first teaches an assistant (TA) of intermediate size by KD, and the TA then
teaches the student by KD (kdbench.method: ``assistants``). Each step is Hinton's KD,

    L = ce_weight · CE(z_s, y) + kd_weight · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))

with z_t the teacher's logits for the TA's step and the TA's for the student's. The TA is trained once per teacher
(on the run's data and schedule, with the track's teacher seed) and cached like a teacher, so every seed of the
row learns from the same TA; its size, accuracy and training time are in each record (``source.assistants``).

Defaults (source): T = 4, ce_weight = 0.1, kd_weight = 0.9, vanilla_kd's (RepDistiller), so that the row differs
from vanilla_kd by the assistant alone; the TAKD paper tunes T and λ per experiment and publishes no single
setting. ``assistant`` has no default: suites name
one per pair. TAKD's finding (§4–5) is that a TA of intermediate size helps and that the best size is not
always the middle one; the suites take the zoo model nearest the middle. In the reference's ``train.py`` the loss
is (1 − λ) · CE + λ · T² · KL, λ and T drawn by an NNI search (``search_space.json``): ce_weight = 1 − λ and
kd_weight = λ here.

Deviations:
- The reference's ``nn.KLDivLoss()`` averages over classes as well as samples; here the KL is batch-averaged
  only (the T² scaling of Hinton et al., as every KD row here), a constant factor of the class count.
- The TA learns with the student's schedule (the reference trains every model with the same settings too).
- Logit standardization is not offered (the paper predates it).
"""

from optuna.distributions import FloatDistribution
import torch.nn.functional as F
from pydantic import Field

from kdbench.errors import KdbenchError
from kdbench.losses import kd_loss
from kdbench.method import Method, MethodConfig, register_method


class TAKDConfig(MethodConfig):
    assistant: str | None = Field(default=None, description="the teacher assistant's architecture (a zoo model; "
                                                            "suites set it per pair)")
    temperature: float = Field(default=4.0, gt=0, description="softmax temperature T (vanilla_kd's: 4)")
    ce_weight: float = Field(default=0.1, ge=0, description="weight of CE on hard labels (vanilla_kd's: 0.1)")
    kd_weight: float = Field(default=0.9, ge=0, description="weight of the soft-target term (vanilla_kd's: 0.9)")


@register_method("takd")
class TAKD(Method):
    """Mirzadeh et al. 2020: KD from the teacher to an assistant of intermediate size, then to the student."""

    version = 1
    Config = TAKDConfig
    search_space = {  # kdbench tune: log-uniform, each holding the default
        "temperature": FloatDistribution(1.0, 8.0, log=True),
        "kd_weight": FloatDistribution(0.1, 10.0, log=True),
    }

    @classmethod
    def assistants(cls, config):
        if config.assistant is None:
            raise KdbenchError("takd needs a teacher assistant: name its architecture per pair in the suite, "
                               "e.g. methods: {takd: {assistant: cnn1d_w16}}")
        return (config.assistant,)

    def loss(self, student, teacher, target, progress):
        c = self.config
        return {
            "ce": c.ce_weight * F.cross_entropy(student["logits"], target),
            "kd": c.kd_weight * kd_loss(student["logits"], teacher["logits"], c.temperature),
        }
