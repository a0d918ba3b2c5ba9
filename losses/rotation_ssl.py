"""Rotation self-supervision (CMFF): the four-rotation batch and the upright-anchored contrast.

``rotate_batch`` expands a batch of B images to 4B: rows ``k*B .. (k+1)*B - 1`` hold the batch rotated by
k * 90 degrees (k = 0..3, ``torch.rot90`` over H, W), so the first B rows are the upright images. The joint
label of row ``k*B + j`` is ``4 * y_j + k`` (4C classes: "class y seen at rotation k").

``upright_contrast_loss`` is CMFF's L_sim: every rotated row is an anchor, the B upright rows are the
candidates, the anchor's own image is the positive::

    S_ij = cos(a_i, n_j) / tau,   a_i = z[B + i] (i < 3B),   n_j = z[j] (j < B)
    L_sim = (1 / 3B) sum_i -log softmax_j(S_i)_{j(i)},   j(i) = i mod B

With the official tau = 1 (raw cosines as logits) the loss never falls below log(1 + (B-1) e^{-2}).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ROTATIONS = 4


def rotate_batch(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(4B x C x H x W images, 4B joint labels): the batch at 0, 90, 180, 270 degrees, upright first."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotations need square images; got {tuple(images.shape[-2:])}")
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(ROTATIONS)])
    k = torch.arange(ROTATIONS, device=labels.device).repeat_interleave(labels.shape[0])
    return rotated, ROTATIONS * labels.repeat(ROTATIONS) + k


def upright_contrast_loss(z: torch.Tensor, batch_size: int, temperature: float = 1.0) -> torch.Tensor:
    """L_sim over ``z`` (R*B x D, laid out as :func:`rotate_batch`): rotated rows against the B upright rows."""
    if z.shape[0] % batch_size or z.shape[0] <= batch_size:
        raise ValueError(f"expected k*B rows with k > 1 for B={batch_size}; got {z.shape[0]}")
    z = F.normalize(z.float(), dim=1)
    upright, rotated = z[:batch_size], z[batch_size:]
    logits = rotated @ upright.t() / temperature
    target = torch.arange(rotated.shape[0], device=z.device) % batch_size
    return F.cross_entropy(logits, target)
