"""ImageNet-style ResNet-18 / ResNet-34 (torchvision design; winycg/MCL-OKD ``models/resnet_imagenet.py``).

BasicBlock stages [2,2,2,2] (ResNet-18) / [3,4,6,3] (ResNet-34) with widths 64/128/256/512, stride 2
at the start of stages 2-4, 1x1-conv + BN downsample, global average pool, Linear(512 -> C).

Two stems, chosen by ``stem``:

* ``'imagenet'``: 7x7 stride-2 conv 3 -> 64, BN, ReLU, 3x3 stride-2 max-pool (torchvision; 224x224 input);
* ``'small'``: 3x3 stride-1 conv 3 -> 64, BN, ReLU, no max-pool (the usual CIFAR / TinyImageNet adaptation
  for 32x32 and 64x64 inputs).

With ``stem=None`` the stem follows ``image_size``: ``'imagenet'`` if ``image_size >= 128`` else ``'small'``.
At 1000 classes with the ImageNet stem the parameter counts equal torchvision's: ResNet-18 11,689,512,
ResNet-34 21,797,672.

Backbone decomposition: ``stem`` (conv, bn, relu and, for the ImageNet stem, maxpool);
``stages = [layer1, layer2, layer3, layer4]``.
Init: conv ``kaiming_normal_`` (fan_out, relu); BN weight 1, bias 0; Linear keeps the PyTorch default.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

from torch import nn

from .base import Backbone, Head
from .registry import register
from .resnet import BasicBlock, init_resnet, make_stage

STEMS = ("imagenet", "small")


def make_stem(stem: str) -> nn.Sequential:
    """The ImageNet (7x7 s2 conv + 3x3 s2 max-pool) or the small (3x3 s1 conv) stem, 3 -> 64 channels."""
    if stem == "imagenet":
        return nn.Sequential(OrderedDict([
            ("conv", nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)),
            ("bn", nn.BatchNorm2d(64)), ("relu", nn.ReLU(inplace=True)),
            ("maxpool", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))]))
    if stem == "small":
        return nn.Sequential(OrderedDict([
            ("conv", nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)),
            ("bn", nn.BatchNorm2d(64)), ("relu", nn.ReLU(inplace=True))]))
    raise ValueError(f"unknown stem {stem!r}; choose one of {STEMS}")


def default_stem(image_size: int) -> str:
    """``'imagenet'`` for inputs of 128 pixels and more, ``'small'`` below (32x32 CIFAR, 64x64 TinyImageNet)."""
    return "imagenet" if image_size >= 128 else "small"


def imagenet_resnet(layers: Sequence[int], num_classes: int = 1000, image_size: int = 224,
                    stem: Optional[str] = None) -> Backbone:
    """Generic 4-stage BasicBlock ResNet with the stem chosen by ``stem`` / ``image_size``."""
    stem_module = make_stem(stem if stem is not None else default_stem(image_size))
    stages, inplanes = [], 64
    for planes, blocks, stride in zip((64, 128, 256, 512), layers, (1, 2, 2, 2)):
        stages.append(make_stage(BasicBlock, inplanes, planes, blocks, stride))
        inplanes = planes
    return init_resnet(Backbone(stem_module, stages, Head(512, num_classes), [64, 128, 256, 512]))


@register("resnet18", image_size=224,
          description="ResNet-18 (torchvision design, BasicBlock [2,2,2,2]); stem 'imagenet' or 'small'")
def resnet18(num_classes: int = 100, image_size: int = 224, stem: Optional[str] = None) -> Backbone:
    """ResNet-18: 11,689,512 params at 1000 classes with the ImageNet stem."""
    return imagenet_resnet([2, 2, 2, 2], num_classes, image_size, stem)


@register("resnet34", image_size=224,
          description="ResNet-34 (torchvision design, BasicBlock [3,4,6,3]); stem 'imagenet' or 'small'")
def resnet34(num_classes: int = 100, image_size: int = 224, stem: Optional[str] = None) -> Backbone:
    """ResNet-34: 21,797,672 params at 1000 classes with the ImageNet stem."""
    return imagenet_resnet([3, 4, 6, 3], num_classes, image_size, stem)
