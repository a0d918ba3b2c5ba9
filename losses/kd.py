"""Knowledge-distillation terms shared by the methods."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, T: float, detach: bool = True,
            target_eps: float = 0.0) -> torch.Tensor:
    """KD_T(student <- teacher) = T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch.

    ``student``, ``teacher``: B x K (logits, or flattened feature maps as DCCL's feature terms); softmax over
    dim 1. The teacher is detached unless ``detach=False`` (OKDDip's official code lets gradients flow
    into its targets). Computed in float32 whatever the autocast dtype.

    ``target_eps`` > 0 is the official ``KLLoss`` of ONE, FFL, DCCL and CMFF (e.g. ``Jangho-Kim/FFL-pytorch``
    ``utils.py``): the target is t = softmax(teacher/T) + eps, **not** renormalised, and the loss is
    T^2 * mean_n sum_k t_nk (log t_nk - log softmax(student_n/T)_k), with eps = 1e-7 there. The default 0
    is the exact KL divergence.
    """
    if detach:
        teacher = teacher.detach()
    log_p_student = F.log_softmax(student.float() / T, dim=1)
    if target_eps:
        target = F.softmax(teacher.float() / T, dim=1) + target_eps
        return (target * (target.log() - log_p_student)).sum(1).mean() * (T * T)
    log_p_teacher = F.log_softmax(teacher.float() / T, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (T * T)


def sigmoid_rampup(epoch: float, length: float = 80.0) -> float:
    """exp(-5 (1 - min(epoch, length)/length)^2): the Laine & Aila ramp-up, 0-based epochs, 1 from ``length`` on."""
    if length <= 0:
        return 1.0
    t = 1.0 - min(max(epoch, 0.0), length) / length
    return math.exp(-5.0 * t * t)
