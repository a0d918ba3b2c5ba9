"""MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018) for
32x32 inputs, as the KD benchmarks build it (HobbitLong/RepDistiller @ models/mobilenetv2.py, used by CRD and
the distillers after it; its ``mobile_half`` is width 0.5).

Inverted residual: 1x1 conv C -> tC, BN, ReLU; 3x3 depthwise conv (stride s), BN, ReLU; 1x1 conv tC -> C', BN;
plus the input when s = 1 and C = C'. As in RepDistiller the 1x1 expansion is kept when t = 1 (torchvision
drops it). Settings (t, c, n, s): (1,16,1,1) (t,24,2,1) (t,32,3,2) (t,64,4,2) (t,96,3,1) (t,160,3,2)
(t,320,1,1) with t = 6; channels int(c * width). Stem: 3x3 stride-2 conv 3 -> int(32 * width), BN, ReLU, so a
32x32 image ends at 2x2 (RepDistiller's ``input_size // 16`` average pool). After the blocks: 1x1 conv to
1280 channels (int(1280 * width) when width > 1), BN, ReLU; global average pool; Linear(1280 -> C).

Backbone decomposition (the resolution changes; RepDistiller's feature taps f1..f3, while its f4 is the 320-channel
map before the 1x1 conv that ends the last stage here):
``stem`` = conv + the t=1 block (16 x width channels at 16x16); ``stages`` = [blocks of c=24 (16x16),
c=32 (8x8), c=64 and 96 (4x4), c=160 and 320 + the 1x1 conv to 1280 (2x2)].
Init (RepDistiller): conv N(0, sqrt(2 / (k*k*out))) = kaiming fan_out, BN 1/0, Linear N(0, 0.01), bias 0.

Parameters at 100 classes: ``mobilenetv2_x0_5`` 812,836 (RepDistiller's ``mobile_half``),
``mobilenetv2`` 2,353,060 (width 1). The 0.81M of ``mobile_half`` is the MobileNetV2 size the CIFAR-100 KD
tables list.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Backbone, Head, init_weights
from .registry import register

# (expansion t, channels c, blocks n, first stride s); t = None: the network's expansion
SETTINGS = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
            (None, 160, 3, 2), (None, 320, 1, 1))
STAGE_GROUPS = ((1,), (2,), (3, 4), (5, 6))   # setting rows per stage; row 0 is in the stem


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([nn.ReLU(inplace=True)] if relu else []))


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise (``stride``), linear 1x1 projection; identity shortcut when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        self.conv = nn.Sequential(conv_bn(cin, hidden, 1), conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                  conv_bn(hidden, cout, 1, relu=False))
        self.shortcut = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.shortcut else self.conv(x)


def cifar_mobilenetv2(num_classes: int = 100, width: float = 1.0, expansion: int = 6) -> Backbone:
    """MobileNetV2 for 32x32 inputs with width multiplier ``width`` and expansion ``expansion``."""
    cin = int(32 * width)
    rows = []
    for t, c, n, s in SETTINGS:
        cout = int(c * width)
        rows.append([InvertedResidual(cin if i == 0 else cout, cout, s if i == 0 else 1, t or expansion)
                     for i in range(n)])
        cin = cout
    last = int(1280 * width) if width > 1.0 else 1280
    stem = nn.Sequential(conv_bn(3, int(32 * width), 3, 2), *rows[0])
    stages = [nn.Sequential(*[b for r in group for b in rows[r]]) for group in STAGE_GROUPS]
    stages[-1].append(conv_bn(cin, last, 1))
    widths = [int(SETTINGS[group[-1]][1] * width) for group in STAGE_GROUPS[:-1]] + [last]
    return init_weights(Backbone(stem, stages, Head(last, num_classes), widths), linear_std=0.01,
                        linear_bias_zero=True)


@register("mobilenetv2", description="MobileNetV2 for 32x32 inputs, width 1 (RepDistiller layout)")
def mobilenetv2(num_classes: int = 100, width: float = 1.0) -> Backbone:
    """MobileNetV2, width multiplier ``width`` (default 1)."""
    return cifar_mobilenetv2(num_classes, width)


@register("mobilenetv2_x0_5", description="MobileNetV2 for 32x32 inputs, width 0.5 (RepDistiller's mobile_half)")
def mobilenetv2_x0_5(num_classes: int = 100) -> Backbone:
    """MobileNetV2 at width 0.5: RepDistiller's ``mobile_half``, the KD benchmarks' MobileNetV2."""
    return cifar_mobilenetv2(num_classes, 0.5)
