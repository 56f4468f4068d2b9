"""Loss helpers shared by more than one method (methods never import each other)."""

import operator
from collections.abc import Iterable
from functools import reduce

import torch
import torch.nn.functional as F


def summed(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """t_1 + t_2 + … of one or more tensors; unlike ``sum()``, without an extra 0 + tensor op and its backward."""
    return reduce(operator.add, terms)


def standardized(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardization (Sun et al., CVPR 2024, Algorithm 1): (z − mean(z)) / (eps + std(z)) over the classes of
    each sample, std with Bessel's correction and eps = 1e-7 as in the reference code (``normalize``)."""
    mean = logits.mean(dim=-1, keepdim=True)
    return (logits - mean) / (eps + logits.std(dim=-1, keepdim=True))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            standardize: bool = False) -> torch.Tensor:
    """Hinton et al. 2015: T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)), summed over classes, batch-averaged; with
    ``standardize``, z_s and z_t are ``standardized`` first (Sun et al. 2024: T is then their base temperature)."""
    if standardize:
        student_logits, teacher_logits = standardized(student_logits), standardized(teacher_logits)
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


def pooled_to(feature: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Adaptive average pooling of the positions to ``size`` (1-D or 2-D); unchanged if already that size."""
    if tuple(feature.shape[2:]) == size:
        return feature
    return getattr(F, f"adaptive_avg_pool{len(size)}d")(feature, size)
