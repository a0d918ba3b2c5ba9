"""HCGNet for 32x32 inputs (Yang et al., AAAI 2020, "Gated Convolutional Networks with
Hybrid Connectivity for Image Classification"; official code winycg/HCGNet ``models/HCGNet_CIFAR.py``, of which
the MCL-OKD ``models/hcgnet.py`` is a copy for A1).

Building blocks:

* ``BasicConv`` is pre-activation: BN -> ReLU -> Conv (no bias).
* :class:`Gates` is the part shared by an SMG module and a transition, applied to a map ``x`` of C channels:
  the *forget gate* (global-context SE: spatial softmax context -> fc1 -> BN1d -> tanh -> fc2 -> sigmoid)
  gives a per-channel ``g``; the *update gate* (two depthwise 3x3 convs, the second with dilation 2, each
  pooled with its own spatial-softmax context, fused SK-style with a per-channel softmax over the two)
  gives a global vector ``u``. Output ``x * g + u`` (``u`` broadcast over H, W).
* SMG module: squeeze cell (1x1 c_in -> bn_size*k, 3x3 groups 4 -> k), gates with hidden sizes k/2, k;
  output ``cat([input, gated])`` (dense connectivity, +k channels).
* Transition: 1x1 c_in -> c_in - r, 3x3 stride 2 -> c_out (r = (c_in - c_out)//2), gates with hidden sizes
  c_out//4 and 2*c_out//4; no concatenation.

Every spatial softmax runs over the actual H*W, so the net works at any input size (32x32, 64x64, ...).
Decomposition (docs/backbones.md): ``stem = conv0``; ``stages = [HB1+T1, HB2+T2, HB3]`` (non-final stages are
``nn.Sequential`` with children ``block`` and ``transition``); ``head.norm = BN(norm5) + ReLU``.
Init: PyTorch defaults (the official code has no custom init).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import Backbone, Head
from .registry import register


class BasicConv(nn.Sequential):
    """Pre-activation conv: BN(in) -> ReLU -> Conv2d(bias=False)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, groups: int = 1, dilation: int = 1):
        super().__init__(OrderedDict([
            ("norm", nn.BatchNorm2d(in_channels)),
            ("relu", nn.ReLU(inplace=True)),
            ("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                               dilation=dilation, groups=groups, bias=False)),
        ]))


def context_pool(x: torch.Tensor, context: nn.Conv2d) -> torch.Tensor:
    """Global-context pooling: ``sum_hw x * softmax_hw(context(x))`` -> B x C x 1 x 1."""
    weights = F.softmax(torch.flatten(context(x), 1), dim=1).view(x.size(0), 1, *x.shape[2:])
    return (x * weights).sum(dim=(2, 3), keepdim=True)


class Gates(nn.Module):
    """Forget gate and update gate of HCGNet on a C-channel map; returns ``x * g + u``.

    ``forget_hidden`` is the bottleneck of the forget gate's fc1/fc2, ``update_hidden`` that of the
    update gate's fcall (2C -> hidden) before the fc3x3 / fc5x5 heads (hidden -> C).
    """

    def __init__(self, channels: int, forget_hidden: int, update_hidden: int):
        super().__init__()
        c = channels
        # forget gate (global-context SE)
        self.forget_context = nn.Conv2d(c, 1, kernel_size=1)
        self.fc1 = nn.Conv2d(c, forget_hidden, kernel_size=1)
        self.bn_forget = nn.BatchNorm1d(forget_hidden)
        self.fc2 = nn.Conv2d(forget_hidden, c, kernel_size=1)
        # update gate (multi-scale depthwise convs, SK-like fusion of their global contexts)
        self.conv_3x3 = BasicConv(c, c, 3, padding=1, groups=c)
        self.conv_5x5 = BasicConv(c, c, 3, padding=2, groups=c, dilation=2)  # 5x5 receptive field
        self.context_3x3 = nn.Conv2d(c, 1, kernel_size=1)
        self.context_5x5 = nn.Conv2d(c, 1, kernel_size=1)
        self.fcall = nn.Conv2d(2 * c, update_hidden, kernel_size=1)
        self.bn_attention = nn.BatchNorm1d(update_hidden)
        self.fc3x3 = nn.Conv2d(update_hidden, c, kernel_size=1)
        self.fc5x5 = nn.Conv2d(update_hidden, c, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        # forget gate: g in (0, 1)^C
        g = self.fc1(context_pool(x, self.forget_context))
        g = torch.tanh(self.bn_forget(torch.flatten(g, 1))).view(b, -1, 1, 1)
        g = torch.sigmoid(self.fc2(g))
        # update gate: u, a global B x C x 1 x 1 vector
        s3 = context_pool(self.conv_3x3(x), self.context_3x3)
        s5 = context_pool(self.conv_5x5(x), self.context_5x5)
        a = self.fcall(torch.cat([s3, s5], 1))
        a = torch.tanh(self.bn_attention(torch.flatten(a, 1))).view(b, -1, 1, 1)
        w = F.softmax(torch.stack([self.fc3x3(a), self.fc5x5(a)], dim=1), dim=1)  # B x 2 x C x 1 x 1
        u = w[:, 0] * s3 + w[:, 1] * s5
        return x * g + u


class SMG(nn.Module):
    """Squeeze cell + gates; output ``cat([input, x*g + u])`` (c_in -> c_in + k)."""

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int = 4, groups: int = 4,
                 reduction_factor: int = 2, forget_factor: int = 2):
        super().__init__()
        k = growth_rate
        self.conv1_1x1 = BasicConv(in_channels, bn_size * k, 1)
        self.conv2_3x3 = BasicConv(bn_size * k, k, 3, padding=1, groups=groups)
        self.gates = Gates(k, k // forget_factor, 2 * k // reduction_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.gates(self.conv2_3x3(self.conv1_1x1(x)))], 1)


class Transition(nn.Module):
    """1x1 conv, 3x3 stride-2 conv, then gates (hidden c_out//4, 2*c_out//4); halves the resolution."""

    def __init__(self, in_channels: int, out_channels: int, forget_factor: int = 4, reduction_factor: int = 4):
        super().__init__()
        mid = in_channels - (in_channels - out_channels) // 2
        self.conv1_1x1 = BasicConv(in_channels, mid, 1)
        self.conv2_3x3 = BasicConv(mid, out_channels, 3, stride=2, padding=1)
        self.gates = Gates(out_channels, out_channels // forget_factor, 2 * out_channels // reduction_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gates(self.conv2_3x3(self.conv1_1x1(x)))


def hybrid_block(num_layers: int, in_channels: int, growth_rate: int, bn_size: int) -> nn.Sequential:
    """``num_layers`` SMG modules, densely connected (width grows by ``growth_rate`` per module)."""
    return nn.Sequential(OrderedDict(
        (f"SMG{i + 1}", SMG(in_channels + i * growth_rate, growth_rate, bn_size)) for i in range(num_layers)))


def hcgnet(num_classes: int = 100, growth_rates: Sequence[int] = (12, 24, 36),
           block_config: Sequence[int] = (8, 8, 8), bn_size: int = 4, theta: float = 0.5,
           num_init_features: Optional[int] = None, image_size: Optional[int] = None) -> Backbone:
    """Generic CIFAR HCGNet (``HCGNet_CIFAR.py``). ``num_init_features`` defaults to ``2 * growth_rates[0]`` as in the
    official code. ``image_size`` is accepted for interface uniformity and ignored (size-agnostic net)."""
    if len(growth_rates) != len(block_config):
        raise ValueError("one growth rate per hybrid block")
    channels = num_init_features if num_init_features is not None else 2 * growth_rates[0]
    stem = nn.Conv2d(3, channels, kernel_size=3, stride=1, padding=1, bias=False)
    stages, widths = [], []
    for i, (k, num_layers) in enumerate(zip(growth_rates, block_config)):
        block = hybrid_block(num_layers, channels, k, bn_size)
        channels += k * num_layers
        if i == len(block_config) - 1:
            stages.append(block)
        else:
            out = int(channels * theta)
            stages.append(nn.Sequential(OrderedDict([("block", block), ("transition", Transition(channels, out))])))
            channels = out
        widths.append(channels)
    head = Head(channels, num_classes, norm=nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True)))
    return Backbone(stem, stages, head, widths)


@register("hcgnet_a1", image_size=32,
          description="HCGNet-A1 (growth 12/24/36, 8 SMG per block); 1,102,651 params at 100 classes")
def hcgnet_a1(num_classes: int = 100, **kwargs) -> Backbone:
    """HCGNet-A1 (``HCGNet_A1``): growth (12, 24, 36), blocks (8, 8, 8), 24 initial features; widths [60, 126, 414]."""
    return hcgnet(num_classes, growth_rates=(12, 24, 36), block_config=(8, 8, 8), **kwargs)


@register("hcgnet_a2", image_size=32,
          description="HCGNet-A2 (growth 24/36/64, 8 SMG per block; official HCGNet_CIFAR.py)")
def hcgnet_a2(num_classes: int = 100, **kwargs) -> Backbone:
    """HCGNet-A2 as the official ``HCGNet_A2``: growth (24, 36, 64), blocks (8, 8, 8), 48 initial features."""
    return hcgnet(num_classes, growth_rates=(24, 36, 64), block_config=(8, 8, 8), **kwargs)


@register("hcgnet_a3", image_size=32,
          description="HCGNet-A3 (growth 36/48/80, 12 SMG per block; official HCGNet_CIFAR.py)")
def hcgnet_a3(num_classes: int = 100, **kwargs) -> Backbone:
    """HCGNet-A3 as the official ``HCGNet_A3``: growth (36, 48, 80), blocks (12, 12, 12), 72 initial features."""
    return hcgnet(num_classes, growth_rates=(36, 48, 80), block_config=(12, 12, 12), **kwargs)
