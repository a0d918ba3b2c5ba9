"""ImageNet ResNet-50 and MobileNetV2 taken from ``torchvision.models`` (KDCL's flagship pair, Guo et al.,
CVPR 2020), held as stem + stages + head without copying their code: the Backbone's modules ARE the torchvision
model's modules (same classes, same init, same forward maths), only regrouped:

* ``resnet50``: stem = conv1, bn1, relu, maxpool; stages = layer1..layer4 (256/512/1024/2048 channels at
  56/28/14/7 for a 224 input); head = average pool + fc. 25,557,032 parameters at 1000 classes.
* ``mobilenet_v2``: stem = features[0:2] (3x3 s2 conv and the t=1 block, 16 channels at 112); stages =
  features[2:4] (24 at 56), [4:7] (32 at 28), [7:14] (96 at 14), [14:19] (320 -> 1x1 conv to 1280 at 7);
  head = average pool + dropout 0.2 + classifier[1]. 3,504,872 parameters at 1000 classes.

A peer's weights load into the torchvision model as they are: :func:`to_torchvision_state` only renames the
keys (``stem.conv1.weight`` -> ``conv1.weight``), found by matching the very tensors of a wrapped torchvision
model, and :func:`torchvision_model` builds the torchvision network it loads into (same logits; tested).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
import torchvision
from torch import nn

from .base import Backbone, Head
from .registry import register


def wrap_resnet(net: torchvision.models.ResNet) -> Backbone:
    """A torchvision ResNet as a Backbone sharing its modules."""
    stem = nn.Sequential(OrderedDict(conv1=net.conv1, bn1=net.bn1, relu=net.relu, maxpool=net.maxpool))
    stages = [net.layer1, net.layer2, net.layer3, net.layer4]
    widths = [stage[-1].conv3.out_channels if hasattr(stage[-1], "conv3") else stage[-1].conv2.out_channels
              for stage in stages]
    head = Head(net.fc.in_features, net.fc.out_features)
    head.fc = net.fc
    return Backbone(stem, stages, head, widths)


MOBILENET_V2_STAGES = ((2, 4), (4, 7), (7, 14), (14, 19))   # features[a:b] per stage; features[0:2] is the stem


def wrap_mobilenet_v2(net: torchvision.models.MobileNetV2) -> Backbone:
    """A torchvision MobileNetV2 as a Backbone sharing its modules."""
    f = net.features
    stem = nn.Sequential(f[0], f[1])
    stages = [nn.Sequential(*f[a:b]) for a, b in MOBILENET_V2_STAGES]
    widths = [f[b - 1].out_channels for _, b in MOBILENET_V2_STAGES]
    dropout, fc = net.classifier[0], net.classifier[1]
    head = Head(fc.in_features, fc.out_features, dropout=dropout.p)
    head.fc = fc
    return Backbone(stem, stages, head, widths)


# name -> (torchvision constructor, wrapper)
TORCHVISION: dict[str, tuple[Callable[..., nn.Module], Callable[[nn.Module], Backbone]]] = {
    "resnet50": (torchvision.models.resnet50, wrap_resnet),
    "mobilenet_v2": (torchvision.models.mobilenet_v2, wrap_mobilenet_v2),
}


def torchvision_model(name: str, num_classes: int = 1000) -> nn.Module:
    """The plain ``torchvision.models.<name>(num_classes=...)`` (randomly initialised, no download)."""
    return TORCHVISION[name][0](weights=None, num_classes=num_classes)


def torchvision_key_map(name: str, num_classes: int = 1000) -> dict[str, str]:
    """Backbone state-dict key -> torchvision state-dict key, found by identity of the shared tensors."""
    with torch.device("meta"):
        net = torchvision_model(name, num_classes)
        wrapped = TORCHVISION[name][1](net)
    by_id = {id(t): key for key, t in net.state_dict(keep_vars=True).items()}
    return {key: by_id[id(t)] for key, t in wrapped.state_dict(keep_vars=True).items()}


def to_torchvision_state(name: str, state: dict, num_classes: int) -> dict:
    """A ``name`` Backbone's state dict with torchvision's key names (tensors untouched)."""
    mapping = torchvision_key_map(name, num_classes)
    return OrderedDict((mapping[key], value) for key, value in state.items())


@register("resnet50", image_size=224, description="ResNet-50 from torchvision.models (Bottleneck [3,4,6,3])")
def resnet50(num_classes: int = 1000) -> Backbone:
    """torchvision's ResNet-50 as a Backbone: 25,557,032 parameters at 1000 classes."""
    return wrap_resnet(torchvision_model("resnet50", num_classes))


@register("mobilenet_v2", image_size=224, description="MobileNetV2 (width 1) from torchvision.models")
def mobilenet_v2(num_classes: int = 1000) -> Backbone:
    """torchvision's MobileNetV2 as a Backbone: 3,504,872 parameters at 1000 classes."""
    return wrap_mobilenet_v2(torchvision_model("mobilenet_v2", num_classes))
