"""DenseNet-BC for 32x32 inputs (``densenetd40k12`` in winycg/MCL-OKD ``models/densenet.py``).

Layout, as the official ``models/densenet.py`` (Huang et al. DenseNet-BC, ``small_inputs``):

* stem: ``conv0`` 3x3 conv 3 -> ``num_init_features``, no bias, **no** BN/ReLU after it;
* dense layer: BN-ReLU-Conv1x1(in -> bn_size*k)-BN-ReLU-Conv3x3(bn_size*k -> k), output concatenated to its input;
* transition: BN-ReLU-Conv1x1(c -> floor(compression*c))-AvgPool2;
* head: final BN + ReLU, global average pool, Linear.

Decomposition into the :class:`~models.base.Backbone` contract (split points: docs/backbones.md):
``stem = conv0``; ``stages = [block1+trans1, block2+trans2, ..., last block]``; ``head.norm = BN+ReLU``.
Each non-final stage is an ``nn.Sequential`` with children ``block`` and ``transition``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch
from torch import nn

from .base import Backbone, Head, init_weights
from .registry import register


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1(in -> bn_size*k)-BN-ReLU-Conv3x3(-> k); returns ``cat([x, new], 1)``."""

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int):
        super().__init__()
        mid = bn_size * growth_rate
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid, growth_rate, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.conv1(self.relu1(self.norm1(x)))
        new = self.conv2(self.relu2(self.norm2(new)))
        return torch.cat([x, new], 1)


def dense_block(num_layers: int, in_channels: int, growth_rate: int, bn_size: int) -> nn.Sequential:
    """``num_layers`` dense layers; output width ``in_channels + num_layers * growth_rate``."""
    return nn.Sequential(OrderedDict(
        (f"denselayer{i + 1}", DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size))
        for i in range(num_layers)))


def transition(in_channels: int, out_channels: int) -> nn.Sequential:
    """BN-ReLU-Conv1x1(no bias)-AvgPool2d(2): halves the resolution."""
    return nn.Sequential(OrderedDict([
        ("norm", nn.BatchNorm2d(in_channels)),
        ("relu", nn.ReLU(inplace=True)),
        ("conv", nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)),
        ("pool", nn.AvgPool2d(kernel_size=2, stride=2)),
    ]))


def densenet_bc(num_classes: int = 100, growth_rate: int = 12, block_config: Sequence[int] = (6, 6, 6),
                compression: float = 0.5, bn_size: int = 4, num_init_features: int = 24,
                image_size: Optional[int] = None) -> Backbone:
    """Generic CIFAR DenseNet-BC (Huang et al., CVPR 2017). ``image_size`` is accepted for interface uniformity and
    ignored: the network is fully convolutional up to the global pool, so 32x32 and 64x64 both work.

    Init as the official code: conv ``kaiming_normal_`` (fan_in), BatchNorm2d weight 1 / bias 0,
    Linear bias 0 (Linear weight keeps the PyTorch default).
    """
    if not 0 < compression <= 1:
        raise ValueError("compression must be in (0, 1]")
    stem = nn.Conv2d(3, num_init_features, kernel_size=3, stride=1, padding=1, bias=False)
    stages, widths = [], []
    channels = num_init_features
    for i, num_layers in enumerate(block_config):
        block = dense_block(num_layers, channels, growth_rate, bn_size)
        channels += num_layers * growth_rate
        if i == len(block_config) - 1:
            stages.append(block)
        else:
            out = int(channels * compression)
            stages.append(nn.Sequential(OrderedDict([("block", block), ("transition", transition(channels, out))])))
            channels = out
        widths.append(channels)
    head = Head(channels, num_classes, norm=nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True)))
    return init_weights(Backbone(stem, stages, head, widths), conv_mode="fan_in", linear_bias_zero=True)


@register("densenet40_12", image_size=32,
          description="DenseNet-BC-40 (k=12, [6,6,6], bn_size 4, compression 0.5); 188,092 params at 100 classes")
def densenet40_12(num_classes: int = 100, **kwargs) -> Backbone:
    """DenseNet-BC depth 40, growth 12 (``densenetd40k12``): stage widths [48, 60, 132], 188,092 params at C=100."""
    return densenet_bc(num_classes, growth_rate=12, block_config=(6, 6, 6), **kwargs)
