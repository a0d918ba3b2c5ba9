"""VGG-16 for CIFAR (Simonyan & Zisserman, ICLR 2015; the MCL-OKD ``models/vgg.py``; OKDDip's own code and the
PCL re-implementation end in a 3-layer classifier instead: docs/backbones.md).

13 3x3 convs (with bias), each followed by BN and ReLU, five 2x2 max-pools, then a **single**
Linear(512 -> C): no FC-4096 layers, no dropout.

* stem: conv 3 -> 64, conv 64 -> 64, max-pool (32 -> 16);
* stages: layer1 = 2 x 128 + max-pool (-> 8), layer2 = 3 x 256 + max-pool (-> 4),
  layer3 = 3 x 512 + max-pool (-> 2), layer4 = 3 x 512 + max-pool (-> 1);
* head: global average pool (the identity on the 1x1 map of a 32x32 input), Linear(512 -> C).

14,774,436 params at 100 classes.
Init: conv ``kaiming_normal_`` (fan_out, relu), bias 0; BN weight 1, bias 0; Linear weight N(0, 0.01), bias 0.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from .base import Backbone, Head, init_weights
from .registry import register


def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=True), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def vgg_stage(cin: int, cout: int, convs: int) -> nn.Sequential:
    """``convs`` x [conv3x3 + BN + ReLU] then a 2x2 max-pool."""
    layers = conv_bn_relu(cin, cout)
    for _ in range(convs - 1):
        layers += conv_bn_relu(cout, cout)
    return nn.Sequential(*layers, nn.MaxPool2d(kernel_size=2, stride=2))


@register("vgg16", image_size=32,
          description="CIFAR VGG-16 (13 conv+BN, single Linear 512->C); 14,774,436 params at C=100")
def vgg16(num_classes: int = 100, image_size: Optional[int] = None) -> Backbone:
    """VGG-16 (MCL-OKD ``models/vgg.py``). ``image_size`` is accepted for interface uniformity and ignored (a 64x64
    input leaves a 2x2 map, which the global average pool reduces)."""
    stem = vgg_stage(3, 64, 2)
    config = [(64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3)]
    stages = [vgg_stage(cin, cout, convs) for cin, cout, convs in config]
    model = Backbone(stem, stages, Head(512, num_classes), [cout for _, cout, _ in config])
    return init_weights(model, conv_bias_zero=True, linear_std=0.01, linear_bias_zero=True)
