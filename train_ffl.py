"""FFL: Feature Fusion for Online Mutual Knowledge Distillation (Kim, Hyun, Chung & Kwak, ICPR 2020,
arXiv 1904.09058; official code Jangho-Kim/FFL-pytorch).

Two sub-networks, by default FFL-S as the official code: one trunk shared up to the last stage and two
branches (the last stage and a classifier each); ``--topology independent`` gives the paper's parallel
sub-networks. A fusion module reads the branches' last-stage maps and gives a fused classifier; the
sub-networks learn from it and it learns from their ensemble ("mutual knowledge distillation"):

    z_i = sub-network i's logits,  z_f = Fusion(M_1, M_2)  (models/fusion.py),  z_e = mean_i z_i
    L   = sum_i CE(z_i) + CE(z_f) + w(e) * [ sum_i KD_T(z_i <- z_f) + KD_T(z_f <- z_e) ]       targets detached

T = 3, w(e) = exp(-5 (1 - min(e, 80)/80)^2). The fusion module has its own SGD (weight decay 1e-5) whose lr
follows the schedule, as both of the official code's schedulers are stepped.

    python train_ffl.py --arch resnet32 --gpu 0                            # FFL-S, the FFL code's recipe
    python train_ffl.py --arch resnet32 --gpu 0 --topology independent     # two parallel sub-networks
    python train_ffl.py --arch resnet32 --gpu 0 --kd-eps 1e-7              # the official KLLoss exactly
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from engine import Method, main, peer_heads
from fusion_teacher import add_fusion_teacher_arguments, fusion_optim_groups
from losses import kd_loss, sigmoid_rampup
from losses.peer_targets import kd_towards
from models.fusion import FusionModule, peer_maps
from models.peers import Peers


class FFLOutput(NamedTuple):
    logits: list[torch.Tensor]   # z_1 .. z_N
    fused: torch.Tensor          # z_f


class FFLNet(nn.Module):
    """N sub-networks (``shared``: one trunk up to the last stage; ``independent``) and the fusion module on
    their final maps (ResNet-32: FFL's Fusion_module(64, C, 8) on the two 64 x 8 x 8 maps)."""

    def __init__(self, arch: str, num_classes: int, num_peers: int = 2, topology: str = "shared",
                 image_size: int = 32):
        super().__init__()
        self.peers = Peers(arch, num_classes, num_peers, topology, "one" if topology == "shared" else None,
                           image_size=image_size)
        self.fusion = FusionModule(self.peers.feature_dim, num_classes, num_peers)

    def forward(self, x: torch.Tensor) -> FFLOutput:
        out = peer_maps(self.peers, x)
        return FFLOutput(out.logits, self.fusion(*out.final))


def ffl_loss(logits, fused, labels, T: float, weight: float = 1.0, target_eps: float = 0.0) -> dict:
    """The FFL objective as named terms (``train_FFL.py``); every KD target is detached."""
    ensemble = torch.stack(logits).mean(0)
    return {"ce": sum(F.cross_entropy(z, labels) for z in logits),
            "ce_fused": F.cross_entropy(fused, labels),
            "kd": weight * kd_towards(logits, fused, T, target_eps=target_eps),           # fused -> sub-networks
            "kd_fused": weight * kd_loss(fused, ensemble, T, target_eps=target_eps)}      # ensemble -> fused


class FFL(Method):
    """FFL: sub-networks and a fused classifier over their last-stage maps, distilling into each other."""

    recipe = "ffl"
    num_peers = 2
    min_peers = 2
    presets = {   # train_FFL.py: FFL-S, and utils.get_cifar100_dataloaders pads by reflection
        "official": dict(topology="shared", pad_mode="reflect"),
    }

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument("--topology", choices=("shared", "independent"),
                            help="sub-networks on one trunk shared up to the last stage (FFL-S, the official "
                                 "code), or parallel independent networks (the paper's other variant)")
        add_fusion_teacher_arguments(parser, fusion_decay=True)

    def build(self):
        return FFLNet(self.args.arch, self.num_classes, self.args.num_peers, self.args.topology, self.image_size)

    def loss(self, model, batch, epoch):
        a = self.args
        out = model(batch.images)
        return ffl_loss(out.logits, out.fused, batch.labels, a.kd_T, sigmoid_rampup(epoch, a.rampup), a.kd_eps)

    def eval_logits(self, model, images):
        out = model(images)
        return {**peer_heads(out.logits), "fused": out.fused}

    def optim_groups(self):
        return fusion_optim_groups(self.model, self.args)


if __name__ == "__main__":
    main(FFL)
