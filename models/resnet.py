"""CIFAR ResNets (He et al., CVPR 2016; the MCL-OKD / OKDDip ``models/resnet.py``).

* stem: 3x3 conv 3 -> 16 (stride 1, no bias), BN, ReLU;
* three stages with planes 16 / 32 / 64; the first block of stages 2 and 3 has stride 2 (32 -> 16 -> 8);
* shortcuts are **1x1 conv (stride) + BN projections** (option B) whenever the stride or the channel
  count changes, the identity otherwise; the ReLU comes after the addition;
* head: global average pool, Linear(64 * expansion -> C).

``BasicBlock`` nets are depth 6n+2 (``resnet20/32/44/56/110``; ``resnet110`` is the classic
basic-block [18,18,18] net). ``resnet110_bottleneck`` is what the MCL-OKD / OKDDip / PCL code calls
ResNet-110: Bottleneck (1x1, 3x3 with the stride, 1x1; expansion 4) [12,12,12], depth 9n+2, 256-d
feature, 1,170,868 params at 100 classes. Bottlenecks also take ``width_per_group`` (torchvision
convention: inner width = planes * width_per_group / 64), which ``models.wrn.wrn_20_8`` uses.

Backbone decomposition: ``stem = conv+bn+relu``; ``stages = [layer1, layer2, layer3]``.
Init: conv ``kaiming_normal_`` (fan_out, relu); BN weight 1, bias 0; Linear keeps the PyTorch default.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence, Type, Union

import torch
from torch import nn

from .base import Backbone, Head, init_weights
from .registry import register


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


def projection(cin: int, cout: int, stride: int) -> Optional[nn.Sequential]:
    """Option-B shortcut: 1x1 conv (stride) + BN when the shape changes, else ``None`` (identity)."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU. Output width ``planes``."""
    expansion = 1
    channel_local = True  # mixes channels only in its convs: N copies can run grouped (models/grouped.py)

    def __init__(self, inplanes: int, planes: int, stride: int = 1, width_per_group: int = 64):
        super().__init__()
        if width_per_group != 64:
            raise ValueError("BasicBlock only supports width_per_group=64")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = projection(inplanes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1-BN, plus shortcut, then ReLU.

    Inner width ``planes * width_per_group // 64``; output width ``planes * 4``.
    """
    expansion = 4
    channel_local = True  # mixes channels only in its convs: N copies can run grouped (models/grouped.py)

    def __init__(self, inplanes: int, planes: int, stride: int = 1, width_per_group: int = 64):
        super().__init__()
        width = planes * width_per_group // 64
        out = planes * self.expansion
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = projection(inplanes, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = Type[Union[BasicBlock, Bottleneck]]


def make_stage(block: Block, inplanes: int, planes: int, blocks: int, stride: int,
               width_per_group: int = 64) -> nn.Sequential:
    """``blocks`` residual blocks; only the first has ``stride`` (and, if needed, a projection)."""
    layers = [block(inplanes, planes, stride, width_per_group)]
    layers += [block(planes * block.expansion, planes, 1, width_per_group) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def init_resnet(model: nn.Module) -> nn.Module:
    """Conv: kaiming_normal_ (fan_out, relu). BN: weight 1, bias 0. Linear: PyTorch default."""
    return init_weights(model)


def cifar_resnet(block: Block, layers: Sequence[int], num_classes: int = 100, width_per_group: int = 64,
                 image_size: Optional[int] = None) -> Backbone:
    """Generic 3-stage CIFAR ResNet (MCL-OKD ``models/resnet.py``). ``image_size`` is accepted for interface uniformity
    and ignored: the net is fully convolutional up to the adaptive pool (32x32 and 64x64 both work)."""
    if len(layers) != 3:
        raise ValueError("a CIFAR ResNet has three stages")
    stem = nn.Sequential(OrderedDict([
        ("conv", conv3x3(3, 16)), ("bn", nn.BatchNorm2d(16)), ("relu", nn.ReLU(inplace=True))]))
    stages, widths, inplanes = [], [], 16
    for planes, blocks, stride in zip((16, 32, 64), layers, (1, 2, 2)):
        stages.append(make_stage(block, inplanes, planes, blocks, stride, width_per_group))
        inplanes = planes * block.expansion
        widths.append(inplanes)
    return init_resnet(Backbone(stem, stages, Head(inplanes, num_classes), widths))


@register("resnet20", image_size=32, description="CIFAR ResNet-20, BasicBlock [3,3,3]; 278,324 params at C=100")
def resnet20(num_classes: int = 100, **kwargs) -> Backbone:
    """ResNet-20 for CIFAR: BasicBlock [3,3,3], depth 6n+2, 64-d feature."""
    return cifar_resnet(BasicBlock, [3, 3, 3], num_classes, **kwargs)


@register("resnet32", image_size=32, description="CIFAR ResNet-32, BasicBlock [5,5,5]; 472,756 params at C=100")
def resnet32(num_classes: int = 100, **kwargs) -> Backbone:
    """ResNet-32 for CIFAR: BasicBlock [5,5,5], depth 6n+2, 64-d feature."""
    return cifar_resnet(BasicBlock, [5, 5, 5], num_classes, **kwargs)


@register("resnet44", image_size=32, description="CIFAR ResNet-44, BasicBlock [7,7,7]; 667,188 params at C=100")
def resnet44(num_classes: int = 100, **kwargs) -> Backbone:
    """ResNet-44 for CIFAR: BasicBlock [7,7,7], depth 6n+2, 64-d feature."""
    return cifar_resnet(BasicBlock, [7, 7, 7], num_classes, **kwargs)


@register("resnet56", image_size=32, description="CIFAR ResNet-56, BasicBlock [9,9,9]; 861,620 params at C=100")
def resnet56(num_classes: int = 100, **kwargs) -> Backbone:
    """ResNet-56 for CIFAR: BasicBlock [9,9,9], depth 6n+2, 64-d feature."""
    return cifar_resnet(BasicBlock, [9, 9, 9], num_classes, **kwargs)


@register("resnet110", image_size=32,
          description="classic CIFAR ResNet-110, BasicBlock [18,18,18]; 1,736,564 params at C=100")
def resnet110(num_classes: int = 100, **kwargs) -> Backbone:
    """ResNet-110 for CIFAR: BasicBlock [18,18,18], depth 6n+2, 64-d feature.

    The classic basic-block ResNet-110, not the MCL-OKD one (that is ``resnet110_bottleneck``)."""
    return cifar_resnet(BasicBlock, [18, 18, 18], num_classes, **kwargs)


@register("resnet110_bottleneck", image_size=32,
          description="CIFAR ResNet-110 as in MCL-OKD/OKDDip: Bottleneck [12,12,12] (9n+2); 1,170,868 params at C=100")
def resnet110_bottleneck(num_classes: int = 100, **kwargs) -> Backbone:
    """ResNet-110 of the MCL-OKD / OKDDip / PCL code (their ``models/resnet.py``): Bottleneck [12,12,12], depth 9n+2,
    stage widths 64/128/256 (stage 1 starts with a 16 -> 64 projection), 256-d feature.
    Not the classic 1.7M basic-block ResNet-110 (that one is ``resnet110``)."""
    return cifar_resnet(Bottleneck, [12, 12, 12], num_classes, **kwargs)
