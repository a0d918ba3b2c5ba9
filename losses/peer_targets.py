"""Distilling each peer towards its own target: the shared shape of CL-ILR, ONE and OKDDip.

    kd_towards([z_1..z_n], [t_1..t_n], T) = sum_i KD_T(z_i <- t_i)
    mutual_kd([z_1..z_n], T)              = sum_{i != j} KD_T(z_i <- z_j)
    mean_of_others([z_1..z_n])[i]         = 1/(n-1) sum_{j != i} z_j
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

from .kd import kd_loss


def kd_towards(students: Sequence[torch.Tensor], targets: Union[torch.Tensor, Sequence[torch.Tensor]],
               T: float, detach: bool = True, target_eps: float = 0.0) -> torch.Tensor:
    """sum_i KD_T(students[i] <- targets[i]); one tensor as ``targets`` is the target of every student.

    Targets are detached unless ``detach=False`` (then gradients also flow into whatever made them);
    ``target_eps``: see :func:`losses.kd.kd_loss`."""
    if isinstance(targets, torch.Tensor):
        targets = [targets] * len(students)
    if len(targets) != len(students):
        raise ValueError(f"{len(students)} students but {len(targets)} targets")
    return sum(kd_loss(s, t, T, detach=detach, target_eps=target_eps) for s, t in zip(students, targets))


def mutual_kd(logits: Sequence[torch.Tensor], T: float, target_eps: float = 0.0) -> torch.Tensor:
    """sum over ordered pairs i != j of KD_T(z_i <- stopgrad z_j): every peer distilled from every other
    (DML divides it by N-1; CMFF's KL6 is it over (o_1, o_2, f); DCCL's peer and feature terms)."""
    return sum(kd_loss(s, t, T, target_eps=target_eps)
               for i, s in enumerate(logits) for j, t in enumerate(logits) if i != j)


def mean_of_others(logits: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """For each i, the mean of the other n-1 tensors (leave-one-out mean); needs n >= 2."""
    n = len(logits)
    if n < 2:
        raise ValueError("the mean of the others needs at least two peers")
    total = torch.stack(list(logits)).sum(0)
    return [(total - z) / (n - 1) for z in logits]
