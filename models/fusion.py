"""FFL's fusion module (one module for CMFF, FFL and DCCL) and the probes that size it from a backbone.

The fusion module is ``Fusion_module(channel, numclass, sptial)`` of the FFL code (Kim et al., "Feature Fusion
for Online Mutual Knowledge Distillation", ICPR 2020 / arXiv 1904.09058; ``Jangho-Kim/FFL-pytorch``:
``our_network.py``), copied unchanged into the DCCL code (``nanxiaotong/DCCL``: ``network.py``,
``network_wrn.py``, ``network_VGG.py``) and the CMFF code::

    cat(m_1, ..., m_N)  (B x N*ch x H x W)
    -> depthwise 3x3 conv (N*ch groups, padding 1, no bias) -> BN -> ReLU
    -> 1x1 conv N*ch -> ch (no bias) -> BN -> ReLU
    -> average pool over H x W -> Linear(ch, C)                             = the fused logits

Conv weights start N(0, 2 / (k*k*out_channels)), BN at weight 1 / bias 0, the Linear at PyTorch's default,
as the official file. The official module takes two maps and pools with a fixed ``avg_pool2d(sptial)``
equal to the map size; here it takes N >= 2 maps (N = 2 is the official module, parameter for parameter)
and pools globally, which is the same for a map of that size and needs no size argument.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import Backbone, run_stages
from .peers import Peers


class FusionModule(nn.Module):
    """The FFL fusion module over ``num_inputs`` maps of ``channels`` channels (see the module docstring).

    ``forward(m_1, ..., m_N)``: N tensors B x channels x H x W (two B x channels x 1 x 1 maps for vectors);
    returns B x ``num_classes`` logits. Parameters: 9·N·ch + 2·N·ch (depthwise conv, BN) + N·ch·ch + 2·ch
    (1x1 conv, BN) + ch·C + C (classifier); 16,228 for ResNet-32's 64-channel maps at C = 100, N = 2."""

    def __init__(self, channels: int, num_classes: int, num_inputs: int = 2):
        super().__init__()
        if num_inputs < 2:
            raise ValueError(f"the fusion module fuses at least two maps; got num_inputs={num_inputs}")
        wide = num_inputs * channels
        self.num_inputs = num_inputs
        self.conv1 = nn.Conv2d(wide, wide, 3, padding=1, groups=wide, bias=False)
        self.bn1 = nn.BatchNorm2d(wide)
        self.conv2 = nn.Conv2d(wide, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)
        for m in (self.conv1, self.conv2):
            nn.init.normal_(m.weight, std=math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))

    def forward(self, *maps: torch.Tensor) -> torch.Tensor:
        if len(maps) != self.num_inputs:
            raise ValueError(f"this fusion module fuses {self.num_inputs} maps; got {len(maps)}")
        x = F.relu(self.bn1(self.conv1(torch.cat(maps, 1))))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@torch.no_grad()
def stage_shapes(net: Backbone, image_size: int) -> list[tuple[int, int, int]]:
    """(channels, H, W) of every stage's output map for a square ``image_size`` input, probed once in eval
    mode (no BatchNorm statistics change; works on the ``meta`` device)."""
    was = net.training
    net.eval()
    param = next(net.parameters())
    x = torch.zeros(2, 3, image_size, image_size, device=param.device, dtype=param.dtype)
    _, maps = run_stages(net.stem(x), net.stages, keep=True)
    net.train(was)
    return [tuple(m.shape[1:]) for m in maps]


def last_stage_shape(net: Backbone, image_size: int) -> tuple[int, int, int]:
    """(channels, H, W) of the last stage's map for a square ``image_size`` input (probed in eval mode)."""
    return stage_shapes(net, image_size)[-1]


class PeerMaps(NamedTuple):
    logits: list[torch.Tensor]                   # per peer, B x C
    final: list[torch.Tensor]                    # per peer, the last-stage map as its classifier sees it
    stages: Optional[list[list[torch.Tensor]]]   # per peer, the raw output of every stage (trunk ones shared)


def peer_maps(peers: Peers, x: torch.Tensor, keep_stages: bool = False) -> PeerMaps:
    """Run ``peers`` (independent or on a shared trunk, plain or grouped by ``--grouped-peers``) once and
    return each peer's logits, its **final map** (the last stage's output after the head's ``norm``: the
    identity for ResNet/VGG, BN+ReLU for the pre-activation WRN/DenseNet/HCGNet, i.e. the map the
    classifier pools, which is what a fusion teacher reads) and, with ``keep_stages``, every stage's map.
    The logits are exactly those of ``peers(x)``; each head's ``norm`` runs once per step."""
    if peers.topology == "tree":
        raise ValueError("peer_maps runs independent or shared-trunk peers, not the CL-ILR tree")
    trunk_maps: list[torch.Tensor] = []
    if peers.trunk is not None:
        x, trunk_maps = peers.trunk(x, keep_stages)
    n = peers.num_peers
    if peers.grouped:    # one wide network: peer i owns channel block i of every tensor
        nets, inputs, per_net = [peers.branches.wide], [torch.cat([x] * n, 1)], n
    else:
        nets, inputs, per_net = list(peers.branches), [x] * n, 1
    logits, final, stages = [], [], []
    for net, inp in zip(nets, inputs):
        m, maps = run_stages(net.stem(inp), net.stages, keep_stages)
        m = net.head.norm(m)
        logits += net.head.classify(m).chunk(per_net, 1)
        final += m.chunk(per_net, 1)
        if keep_stages:
            blocks = [s.chunk(per_net, 1) for s in maps]
            stages += [trunk_maps + [b[i] for b in blocks] for i in range(per_net)]
    return PeerMaps(logits, final, stages if keep_stages else None)
