"""DCCL: Deep Cross-Layer Collaborative Learning Network for Online Knowledge Distillation (Su et al., IEEE
TCSVT 2022, DOI 10.1109/TCSVT.2022.3222013; official code nanxiaotong/DCCL).

Two independent peers. In each peer, every stage s feeds every later stage t through a projection
K_{s->t} (conv with kernel = stride = the spatial down-scale H_s/H_t, C_s -> C_t, then BN and ReLU); the
**matched feature** of stage t is the stage's output plus the projections of all the peer's earlier stages,
used only in the loss (the backbones' forward pass is unchanged). FFL's fusion module on the two final maps
is the fused teacher:

    F_{i,t} = X_{i,t} + sum_{s<t} K^i_{s->t}(X_{i,s})      X_{i,t}: peer i's stage-t output
    z_f     = Fusion(M_1, M_2)                              (models/fusion.py)
    L = sum_i CE(z_i) + CE(z_f) + w(e) * [ sum_{i != j} KD_T(z_i <- z_j)                        "kd"
                                          + sum_t sum_{i != j} KD_T(vec F_{i,t} <- vec F_{j,t})  "kd_feat"
                                          + sum_i KD_T(z_i <- z_f) + sum_i KD_T(z_f <- z_i) ]    "kd_fused"

Every KD target is detached; the feature terms take the softmax over each sample's C*H*W values. T = 3,
w(e) = exp(-5 (1 - min(e, 80)/80)^2). The fusion module has its own SGD (weight decay 1e-5) at a constant lr,
as the official code (its scheduler step is commented out); ``--fusion-decay`` decays it.

    python train_dccl.py --arch resnet32 --gpu 0                           # the official ResNet-32 script
    python train_dccl.py --arch wrn_16_2 --gpu 0 --recipe dccl-wrn         # the official WRN script's schedule
    python train_dccl.py --arch vgg16 --gpu 0 --epochs 400                 # the official VGG-16 script
"""
from __future__ import annotations

from typing import NamedTuple, Optional


import torch
import torch.nn.functional as F
from torch import nn

from engine import Method, UserError, main, peer_heads
from fusion_teacher import add_fusion_teacher_arguments, fusion_optim_groups
from losses import sigmoid_rampup
from losses.peer_targets import kd_towards, mutual_kd
from models.fusion import FusionModule, peer_maps, stage_shapes
from models.peers import Peers


def projection(in_shape: tuple, out_shape: tuple, pre_norm: bool) -> nn.Sequential:
    """K_{s->t}: [BN(C_s)] -> Conv(C_s -> C_t, kernel = stride = H_s / H_t, no bias) -> BN(C_t) -> ReLU.

    The leading BN is the official WRN file's (``network_wrn.py``), for pre-activation backbones whose stage
    outputs are not normalised; the ResNet and VGG files have none. Raises UserError when the maps do not
    shrink by one integer factor in both axes."""
    (cin, h, w), (cout, ht, wt) = in_shape, out_shape
    r = h // ht
    if r < 1 or h != r * ht or w != r * wt:
        raise UserError(f"DCCL projects a {h}x{w} stage map onto a {ht}x{wt} one with a stride-{h}/{ht} conv, "
                        "which needs one integer down-scale in both axes; use another --arch or input size")
    conv = nn.Conv2d(cin, cout, r, stride=r, bias=False)
    nn.init.normal_(conv.weight, std=(2.0 / (r * r * cout)) ** 0.5)    # the official files' conv init
    return nn.Sequential(*([nn.BatchNorm2d(cin)] if pre_norm else []), conv, nn.BatchNorm2d(cout), nn.ReLU())


class CrossStageProjections(nn.Module):
    """One peer's projections K_{s->t}, s < t (``proj["s_t"]``), and its matched features."""

    def __init__(self, shapes: list[tuple], pre_norm: bool):
        super().__init__()
        self.num_stages = len(shapes)
        self.proj = nn.ModuleDict({f"{s}_{t}": projection(shapes[s], shapes[t], pre_norm)
                                   for s in range(len(shapes)) for t in range(s + 1, len(shapes))})

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """[F_0, ..., F_{S-1}]: F_t = maps[t] + sum_{s<t} K_{s->t}(maps[s]) (F_0 = maps[0])."""
        matched = []
        for t in range(self.num_stages):
            f = maps[t]
            for s in range(t):
                f = f + self.proj[f"{s}_{t}"](maps[s])
            matched.append(f)
        return matched


class DCCLOutput(NamedTuple):
    logits: list[torch.Tensor]                       # z_1 .. z_N
    fused: torch.Tensor                              # z_f
    features: Optional[list[list[torch.Tensor]]]     # per peer, the matched feature of every stage (training)


class DCCLNet(nn.Module):
    """N independent peers, each with its cross-stage projections, and the fusion module on the final maps."""

    def __init__(self, arch: str, num_classes: int, num_peers: int = 2, image_size: int = 32):
        super().__init__()
        self.peers = Peers(arch, num_classes, num_peers, "independent", image_size=image_size)
        net = self.peers.branches[0]
        self.stage_shapes = stage_shapes(net, image_size)
        pre_norm = not isinstance(net.head.norm, nn.Identity)
        self.projections = nn.ModuleList(CrossStageProjections(self.stage_shapes, pre_norm) for _ in range(num_peers))
        self.fusion = FusionModule(self.peers.feature_dim, num_classes, num_peers)

    def forward(self, x: torch.Tensor, features: bool = False) -> DCCLOutput:
        out = peer_maps(self.peers, x, keep_stages=features)
        matched = [proj(maps) for proj, maps in zip(self.projections, out.stages)] if features else None
        return DCCLOutput(out.logits, self.fusion(*out.final), matched)


def dccl_loss(logits, fused, features, labels, T: float, weight: float = 1.0, target_eps: float = 0.0) -> dict:
    """The DCCL objective as named terms (``train_rn32.py``, ``utils.lossOfKnowledge``); targets detached."""
    num_stages = len(features[0])
    feat = sum(mutual_kd([torch.flatten(f[t], 1) for f in features], T, target_eps) for t in range(num_stages))
    return {"ce": sum(F.cross_entropy(z, labels) for z in logits),
            "ce_fused": F.cross_entropy(fused, labels),
            "kd": weight * mutual_kd(logits, T, target_eps),
            "kd_feat": weight * feat,
            "kd_fused": weight * (kd_towards(logits, fused, T, target_eps=target_eps)
                                  + kd_towards([fused] * len(logits), logits, T, target_eps=target_eps))}


class DCCL(Method):
    """DCCL: two independent peers with cross-layer feature distillation and FFL's fusion teacher."""

    recipe = "dccl"
    num_peers = 2
    min_peers = 2
    presets = {   # train_rn32.py / train_vgg.py / train_wrn.py: utils.get_cifar100_dataloaders pads by reflection
        "official": dict(pad_mode="reflect"),
    }

    @classmethod
    def add_arguments(cls, parser):
        add_fusion_teacher_arguments(parser, fusion_decay=False)

    def build(self):
        return DCCLNet(self.args.arch, self.num_classes, self.args.num_peers, self.image_size)

    def loss(self, model, batch, epoch):
        a = self.args
        out = model(batch.images, features=True)
        return dccl_loss(out.logits, out.fused, out.features, batch.labels, a.kd_T,
                         sigmoid_rampup(epoch, a.rampup), a.kd_eps)

    def eval_logits(self, model, images):
        out = model(images)
        return {**peer_heads(out.logits), "fused": out.fused}

    def optim_groups(self):
        return fusion_optim_groups(self.model, self.args)


if __name__ == "__main__":
    main(DCCL)
