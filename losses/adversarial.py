"""Adversarial (GAN) losses on discriminator scores, for methods that train discriminators (AMLN).

A discriminator returns one raw score per sample (no sigmoid). ``real`` are its scores on the samples it
must call real, ``fake`` on those it must call fake; the generator side wants its samples called real.

    least squares (Mao et al., "Least Squares Generative Adversarial Networks", ICCV 2017, a=0, b=c=1):
        L_D = mean (D(real) - 1)^2 + mean D(fake)^2          L_G = mean (D(fake) - 1)^2
    binary cross-entropy (Goodfellow et al., NeurIPS 2014, the non-saturating generator loss):
        L_D = mean -log s(D(real)) + mean -log(1 - s(D(fake)))     L_G = mean -log s(D(fake))

(s = sigmoid; -log s(x) = softplus(-x), -log(1 - s(x)) = softplus(x).) LSGAN drops its paper's 1/2 factors,
as the adversarial feature-map distillation of Chung et al. (ICML 2020) writes them. Computed in float32 whatever
the autocast dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

GAN_LOSSES = ("lsgan", "bce")


def _check(kind: str) -> None:
    if kind not in GAN_LOSSES:
        raise ValueError(f"GAN loss must be one of {GAN_LOSSES}; got {kind!r}")


def discriminator_loss(real: torch.Tensor, fake: torch.Tensor, kind: str = "lsgan") -> torch.Tensor:
    """The discriminator's loss: score ``real`` (any shape) as real and ``fake`` as fake; a scalar."""
    _check(kind)
    real, fake = real.float(), fake.float()
    if kind == "lsgan":
        return (real - 1).pow(2).mean() + fake.pow(2).mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def generator_loss(fake: torch.Tensor, kind: str = "lsgan") -> torch.Tensor:
    """The generator's loss: have its samples' scores ``fake`` called real; a scalar."""
    _check(kind)
    fake = fake.float()
    if kind == "lsgan":
        return (fake - 1).pow(2).mean()
    return F.softplus(-fake).mean()
