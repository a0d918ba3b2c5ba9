"""A seeded synthetic image-classification set with learnable class structure; no files.

Each class has a smooth random RGB prototype (4x4 Gaussian noise upsampled bilinearly to the image
size); a sample is ``0.5 + 0.18 * prototype + 0.12 * smooth noise + 0.05 * pixel noise``, clipped to
[0, 1] and stored as uint8 (pixel mean about 0.48, std about 0.21; :func:`data.dataset_info`
normalises with the round 0.5 / 0.25). Labels cycle through the classes, so the set is class-balanced.
The content depends only on ``dataset_seed`` (fixed, independent of the training seed), so every run
sees the same images.
A small CNN beats chance within one epoch on CPU. Augmentation as CIFAR: RandomCrop(32, padding=4) +
flip, then /255 and Normalize((0.5,)*3, (0.25,)*3).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .common import ArraySplit

DATASET_SEED = 1234
N_TRAIN, N_TEST = 2048, 512          # images per split


def _smooth(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    coarse = torch.randn(n, 3, 4, 4, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


@functools.lru_cache(maxsize=4)
def make_synthetic(num_classes: int = 10, n_train: int = N_TRAIN, n_test: int = N_TEST, image_size: int = 32,
                   dataset_seed: int = DATASET_SEED) -> tuple[ArraySplit, ArraySplit]:
    """Return (train, test) as uint8 N x 3 x S x S and int64 labels (cached: treat them as read-only)."""
    g = torch.Generator().manual_seed(dataset_seed)
    prototypes = _smooth(num_classes, image_size, g)
    prototypes = prototypes / prototypes.std(dim=(1, 2, 3), keepdim=True)

    def split(n: int) -> ArraySplit:
        labels = torch.arange(n) % num_classes
        x = 0.5 + 0.18 * prototypes[labels] + 0.12 * _smooth(n, image_size, g) \
            + 0.05 * torch.randn(n, 3, image_size, image_size, generator=g)
        return ArraySplit((x.clamp(0, 1) * 255).round().to(torch.uint8), labels,
                          f"generated in memory (data/synthetic.py, seed {dataset_seed})")

    return split(n_train), split(n_test)
