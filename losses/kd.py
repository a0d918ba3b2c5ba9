"""Knowledge-distillation terms shared by the methods."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, T: float, detach: bool = True) -> torch.Tensor:
    """KD_T(student <- teacher) = T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch.

    The teacher is detached unless ``detach=False`` (OKDDip's official code lets gradients flow
    into its targets). Computed in float32 whatever the autocast dtype.
    """
    if detach:
        teacher = teacher.detach()
    log_p_student = F.log_softmax(student.float() / T, dim=1)
    log_p_teacher = F.log_softmax(teacher.float() / T, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (T * T)


def sigmoid_rampup(epoch: float, length: float = 80.0) -> float:
    """exp(-5 (1 - min(epoch, length)/length)^2): the Laine & Aila ramp-up, 0-based epochs, 1 from ``length`` on."""
    if length <= 0:
        return 1.0
    t = 1.0 - min(max(epoch, 0.0), length) / length
    return math.exp(-5.0 * t * t)
