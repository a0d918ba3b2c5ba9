"""Wide ResNets for CIFAR, and the "WRN-20-8" of the online-KD papers.

``wrn_{depth}_{width}`` / :func:`wide_resnet` is the Zagoruyko & Komodakis WRN-d-k (BMVC 2016) as in the
common PyTorch code (xternalz/WideResNet-pytorch, copied by RepDistiller and mdistiller):

* stem: 3x3 conv 3 -> 16 (no bias);
* three stages of n = (depth - 4) / 6 pre-activation ``wide_basic`` blocks with widths 16k / 32k / 64k
  and strides 1 / 2 / 2: BN-ReLU-conv3x3(stride)-BN-ReLU-[dropout]-conv3x3, all convs without bias;
  when the shape changes the shortcut is a 1x1 conv (stride, no bias) applied to the block's
  pre-activated input BN-ReLU(x), otherwise the identity;
* head: final BN + ReLU (``Head.norm``), global average pool, Linear(64k -> C).

Init: conv ``kaiming_normal_`` (fan_out, relu); BN weight 1, bias 0; Linear bias 0 (weight: PyTorch default).
Backbone decomposition: ``stem = conv``; ``stages = [block1, block2, block3]``; stage outputs are
pre-activation sums (the last one is normalised by ``head.norm``).

``wrn_20_8`` is **not** a Zagoruyko WRN (depth 20 is not 6n+4). It is the network that OKDDip (AAAI 2020)
and the papers following its protocol (PCL, KDCL as re-run by PCL, ...) report as "WRN-20-8":
``wide_resnet20_8`` in DefangChen/OKDDip ``models/model_cifar/resnet.py``, i.e. the CIFAR bottleneck ResNet
of :mod:`models.resnet` with blocks [2, 2, 2] and ``width_per_group = 64 * 8`` (see docs/backbones.md).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import Backbone, Head, init_weights
from .registry import register
from .resnet import Bottleneck, cifar_resnet


class WideBasic(nn.Module):
    """Pre-activation wide basic block: BN-ReLU-conv3x3(stride)-BN-ReLU-dropout-conv3x3 + shortcut."""
    channel_local = True  # mixes channels only in its convs: N copies can run grouped (models/grouped.py)

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(pre)
        out = self.relu2(self.bn2(self.conv1(pre)))
        out = self.conv2(self.dropout(out))
        return out + identity


def wide_resnet(depth: int, width: int, num_classes: int = 100, dropout: float = 0.0,
                image_size: Optional[int] = None) -> Backbone:
    """WRN-``depth``-``width`` (Zagoruyko & Komodakis). ``depth`` must be 6n+4 (n >= 1 blocks per stage).
    ``image_size`` is accepted for interface uniformity and ignored (32x32 and 64x64 both work)."""
    if depth < 10 or (depth - 4) % 6 != 0:
        raise ValueError(f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...); got {depth}")
    if width < 1:
        raise ValueError(f"WRN width must be a positive integer; got {width}")
    n = (depth - 4) // 6
    widths = [16 * width, 32 * width, 64 * width]
    stem = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
    stages, cin = [], 16
    for cout, stride in zip(widths, (1, 2, 2)):
        blocks = [WideBasic(cin, cout, stride, dropout)] + [WideBasic(cout, cout, 1, dropout) for _ in range(n - 1)]
        stages.append(nn.Sequential(*blocks))
        cin = cout
    head = Head(cin, num_classes, norm=nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True)))
    return init_weights(Backbone(stem, stages, head, widths), linear_bias_zero=True)


# (depth, width) -> params at 100 classes, measured (tests/test_backbones_resnet_wrn_vgg.py re-derives them).
WRN_CONFIGS = {
    (16, 2): "703,284", (16, 4): "2,772,020", (16, 8): "11,007,540", (22, 8): "17,204,276",
    (28, 10): "36,536,884", (40, 1): "569,780", (40, 2): "2,255,156",
}


def _register_wrn(depth: int, width: int, params: str) -> None:
    name = f"wrn_{depth}_{width}"

    def build(num_classes: int = 100, dropout: float = 0.0, **kwargs) -> Backbone:
        return wide_resnet(depth, width, num_classes, dropout=dropout, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"WRN-{depth}-{width} (Zagoruyko & Komodakis): {(depth - 4) // 6} pre-act blocks per stage, "
                     f"widths {16 * width}/{32 * width}/{64 * width}; {params} params at 100 classes.")
    globals()[name] = register(name, image_size=32, description=build.__doc__)(build)


for (_depth, _width), _params in WRN_CONFIGS.items():
    _register_wrn(_depth, _width, _params)


@register("wrn_20_8", image_size=32,
          description="'WRN-20-8' of OKDDip/PCL: CIFAR Bottleneck ResNet [2,2,2], width_per_group 512 "
                      "(3x3 widths 128/256/512, 256-d feature); 6,871,220 params at C=100")
def wrn_20_8(num_classes: int = 100, **kwargs) -> Backbone:
    """The "WRN-20-8" of the online-KD literature (OKDDip ``wide_resnet20_8``; also PCL, KDCL-as-rerun-by-PCL).

    Not a Zagoruyko pre-activation WRN: it is the CIFAR ResNet of ``models/resnet.py`` with Bottleneck blocks
    [2, 2, 2] and ``width_per_group = 512``, so each bottleneck's inner width is 8x its planes:
    1x1 / 3x3 / 1x1 convs of 128-128-64, 256-256-128 and 512-512-256 channels (3x3 widths equal
    WRN-k=8's 16k/32k/64k), option-B projections, stage outputs 64 / 128 / 256, 256-d feature.
    Depth 20 = 1 stem conv + 3 stages x 2 blocks x 3 convs + 1 FC. 6,871,220 params at 100 classes.
    Init as the ResNets (conv kaiming fan_out, BN 1/0, Linear default).
    """
    return cifar_resnet(Bottleneck, [2, 2, 2], num_classes, width_per_group=64 * 8, **kwargs)
