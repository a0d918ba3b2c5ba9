"""CMFF: Self-Supervised Learning and Cross-Modal Feature Fusion for Online Knowledge Distillation.

Two independent peers. Each training batch of B images is expanded to 4B by the rotations k*90 deg
(joint label 4y+k); the backbones see all 4B images, everything else below uses the B upright ones.
The last-stage map M_i of peer i (as its classifier sees it) is average-pooled to an s x s grid and
flattened: v_i in R^d, d = channels * s^2 (s = --fusion-grid; 8 for CIFAR ResNets: d = 64*8*8 = 4096).

    o_i = peer i's own classifier (a deployed peer is the plain backbone)
    f   = Fusion(CrossAttention(v_1, v_2) as two channels x s x s maps)      fused teacher (FFL's module, models/fusion.py)
    L   = CE(o_1) + CE(o_2) + CE(f) + w(e) * sum_{a != b in {o_1, o_2, f}} KD_T(a <- stopgrad b)
          + lambda_rot * CE(RotHead(v_1 of all 4B), 4y+k)           Feature Enhancement Network (peer 1)
          + lambda_sim * L_sim(ProjHead(v_2 of all 4B))              Feature Contrast Network (peer 2)

T = 3, w(e) = exp(-5 (1 - min(e, 80)/80)^2), lambda_rot = 1, lambda_sim = 5 (the rn110 preset: 3, 2). KD_T is
the exact KL; ``--kd-eps 1e-7`` (part of ``--preset official``) is the official KLLoss (target softmax + 1e-7, not
renormalised). The fusion module (not the cross-attention) has its own SGD, weight decay 1e-5; its flags and
optimizers are the fusion teacher's of FFL and DCCL (fusion_teacher.py).

    python train_cmff.py --arch resnet32 --gpu 0                        # CIFAR-100, the official recipe
    python train_cmff.py --arch resnet110 --gpu 0 --preset rn110        # the official ResNet-110 weights
    python train_cmff.py --arch resnet18 --dataset tinyimagenet --gpu 0 # real ResNet-18, official val split
    python train_cmff.py --arch resnet32 --gpu 0 --no-ssl --no-cross-attention   # ablation: FFL teacher + KL6
    python train_cmff.py --arch resnet110 --gpu 0 --preset official     # the official train_rn110.py's settings
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional


import torch
import torch.nn.functional as F
from torch import nn

from engine import Method, UserError, fraction, main, non_negative, number, peer_heads, positive_int, temperature
from fusion_teacher import add_fusion_teacher_arguments, fusion_optim_groups
from losses import sigmoid_rampup
from losses.peer_targets import mutual_kd
from losses.rotation_ssl import ROTATIONS, rotate_batch, upright_contrast_loss
from models.base import run_stages
from models.fusion import FusionModule, last_stage_shape
from models.peers import Peers

# The official ResNet-32 fusion width (64 x 8 x 8): the automatic --fusion-grid never goes above it.
OFFICIAL_FUSION_DIM = 4096
# The narrowest hidden layer of the official rotation heads (4096->2048->1024->512->4C, 256->512->4C).
ROT_HEAD_MIN_WIDTH = 512


# ---- sizes from the backbone ----------------------------------------------------------------------
def default_fusion_grid(channels: int, map_size: int) -> int:
    """The largest s in 8, 4, 2, 1 with s <= map_size and channels * s^2 <= 4096: the whole 8x8 map of a
    CIFAR ResNet (4096, the official ResNet file) and the 1x1 map of VGG-16 (512, the official VGG file)."""
    for s in (8, 4, 2, 1):
        if s <= map_size and channels * s * s <= OFFICIAL_FUSION_DIM:
            return s
    return 1


def rotation_head_widths(d: int, min_width: int = ROT_HEAD_MIN_WIDTH) -> list[int]:
    """Hidden widths d/2, d/4, ... down to ``min_width`` (4096 -> 2048, 1024, 512 as the official ResNet
    head); a single ``min_width`` layer when d/2 is already narrower (256 -> 512 as the official tiny head)."""
    widths, w = [], d // 2
    while w >= min_width:
        widths.append(w)
        w //= 2
    return widths or [min_width]


def mlp(widths: list[int]) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU(inplace=True)] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


# ---- the fusion teacher ----------------------------------------------------------------------------
class CrossAttention(nn.Module):
    """The official ``CrossAttention`` (SSMS): each d-vector is cut into ``heads`` chunks ("tokens") and the
    two peers attend to each other over those chunks (a heads x heads attention per sample)::

        A_1 = softmax(Q_2 K_1^T / sqrt(t)),  O_1 = W_o1 vec(A_1 V_1),  g_1 = c_1 f_1 + c_2 O_1,
        h_1 = c_5 g_1 + c_6 MLP_1(LN_3 g_1)        (and 1 <-> 2 with c_3, c_4, c_7, c_8)

    Q_i, K_i, V_i come from LN_i(f_i). When d is not a multiple of ``heads`` the chunk width is
    t = ceil(d / heads): q/k/v map d -> heads * t and W_o maps heads * t back to d (no padding, and
    exactly the official block when heads divides d). MLP: Linear(d, hidden) GELU Linear(hidden, d) Dropout.
    """

    def __init__(self, d: int, heads: int = 4, hidden: Optional[int] = None, dropout: float = 0.1):
        super().__init__()
        self.heads, self.chunk = heads, math.ceil(d / heads)
        inner, hidden = heads * self.chunk, hidden or 2 * d
        self.norm = nn.ModuleList(nn.LayerNorm(d) for _ in range(4))            # LN1, LN2 (inputs), LN3, LN4
        self.qkv = nn.ModuleList(nn.Linear(d, 3 * inner) for _ in range(2))     # q, k, v of each side
        self.proj = nn.ModuleList(nn.Linear(inner, d) for _ in range(2))        # W_o1, W_o2
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d),
                                               nn.Dropout(dropout)) for _ in range(2))
        self.attn_drop, self.resid_drop = nn.Dropout(dropout), nn.Dropout(dropout)
        self.coef = nn.Parameter(torch.ones(8))                                 # c_1 .. c_8
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.001)
                nn.init.zeros_(m.bias)

    def forward(self, f1: torch.Tensor, f2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.coef
        q1, k1, v1 = self._split(self.qkv[0](self.norm[0](f1)))
        q2, k2, v2 = self._split(self.qkv[1](self.norm[1](f2)))
        o1 = self._attend(q2, k1, v1, self.proj[0])       # peer-2 queries over peer-1 keys and values
        o2 = self._attend(q1, k2, v2, self.proj[1])
        g1, g2 = c[0] * f1 + c[1] * o1, c[2] * f2 + c[3] * o2
        return (c[4] * g1 + c[5] * self.mlp[0](self.norm[2](g1)),
                c[6] * g2 + c[7] * self.mlp[1](self.norm[3](g2)))

    def _split(self, qkv: torch.Tensor):
        return qkv.view(qkv.shape[0], 3, self.heads, self.chunk).unbind(1)

    def _attend(self, q, k, v, proj):
        attn = self.attn_drop(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(self.chunk), dim=-1))
        return self.resid_drop(proj((attn @ v).flatten(1)))


class CMFFOutput(NamedTuple):
    logits: list[torch.Tensor]            # o_1, o_2 on the upright images
    fused: torch.Tensor                   # f on the upright images
    rotation: Optional[torch.Tensor]      # rotation-head logits, all rows (4B x 4C), training only
    projection: Optional[torch.Tensor]    # projection of peer 2, all rows (4B x d), training only


class CMFFNet(nn.Module):
    """Two peers, the fusion teacher and the two self-supervised heads, in one module."""

    def __init__(self, arch: str, num_classes: int, image_size: int, grid: Optional[int] = None,
                 heads: int = 4, mlp_ratio: float = 2.0, dropout: float = 0.1, cross_attention: bool = True,
                 rotation_head: bool = True, projection_head: bool = True, fusion_input: str = "map"):
        super().__init__()
        self.peers = Peers(arch, num_classes, 2, "independent", image_size=image_size)
        channels, h, w = last_stage_shape(self.peers.branches[0], image_size)
        if self.peers.mixed and last_stage_shape(self.peers.branches[1], image_size) != (channels, h, w):
            shapes = " and ".join("x".join(map(str, last_stage_shape(net, image_size))) for net in self.peers.branches)
            raise UserError(f"--arch {arch}: CMFF fuses the two peers' last-stage maps, which must have one shape; "
                            f"these are {shapes} (channels x H x W). Pair architectures with equal maps "
                            "(e.g. resnet20,resnet32)")
        self.grid = grid or default_fusion_grid(channels, min(h, w))
        if self.grid > min(h, w):
            raise UserError(f"--fusion-grid {self.grid} is larger than the {h}x{w} last-stage map of {arch} "
                            f"at {image_size}x{image_size}; use at most {min(h, w)}")
        self.dim = d = channels * self.grid ** 2
        self.attention = CrossAttention(d, heads, round(mlp_ratio * d), dropout) if cross_attention else None
        # "map": FFL's module on the (channels, S, S) grid (for ResNet-32: FFL's Fusion_module(64, C, 8));
        # "vector": the official CMFF files' module on (d, 1, 1) (unstable at d = 4096, see docs/cmff.md)
        self.fusion_shape = (channels, self.grid, self.grid) if fusion_input == "map" else (d, 1, 1)
        self.fusion = FusionModule(self.fusion_shape[0], num_classes)
        self.rotation_head = mlp([d, *rotation_head_widths(d), ROTATIONS * num_classes]) if rotation_head else None
        self.projection_head = mlp([d, d, d]) if projection_head else None

    def forward(self, x: torch.Tensor, upright: Optional[int] = None) -> CMFFOutput:
        """``upright``: the first ``upright`` rows are the upright images (None: all rows, no SSL heads)."""
        n = x.shape[0] if upright is None else upright
        logits, vectors = [], []
        for net in self.peers.branches:
            m, _ = run_stages(net.stem(x), net.stages, keep=False)
            m = net.head.norm(m)                  # the map the classifier pools (BN+ReLU in pre-act nets)
            logits.append(net.head.classify(m[:n]))
            vectors.append(torch.flatten(F.adaptive_avg_pool2d(m, self.grid), 1))
        v1, v2 = vectors[0][:n], vectors[1][:n]
        if self.attention is not None:
            v1, v2 = self.attention(v1, v2)
        fused = self.fusion(v1.reshape(n, *self.fusion_shape), v2.reshape(n, *self.fusion_shape))
        ssl = upright is not None
        rotation = self.rotation_head(vectors[0]) if ssl and self.rotation_head is not None else None
        projection = self.projection_head(vectors[1]) if ssl and self.projection_head is not None else None
        return CMFFOutput(logits, fused, rotation, projection)


# ---- the method ------------------------------------------------------------------------------------
class CMFF(Method):
    """CMFF: two peers, rotation self-supervision (peer 1), rotation contrast (peer 2), and a cross-attention
    fusion teacher, all distilling into each other."""

    recipe = "dccl"   # the protocol of the DCCL code, on which the CMFF code is built
    num_peers = 2
    min_peers = max_peers = 2   # a rotation peer and a contrast peer
    mixed_archs = True       # two architectures whose last-stage maps have one shape (the fusion needs it)
    groupable_peers = False  # CMFFNet.forward runs each peer's stages and head parts itself
    presets = {   # the official data pipeline pads by reflection (utils.get_cifar100_dataloaders)
        "paper": dict(lambda_rot=1.0, lambda_sim=5.0, pad_mode="reflect"),   # train_rn32 / vgg / Densenet / tiny
        "rn110": dict(lambda_rot=3.0, lambda_sim=2.0, pad_mode="reflect"),   # train_rn110.py
        # The official scripts as they run: the fusion module on (d, 1, 1) vectors, its lr never decayed, the
        # KLLoss's target softmax + 1e-7, and their loops' epoch count (e = 0..E inclusive); per backbone in
        # preset_values.
        "official": dict(lambda_rot=1.0, lambda_sim=5.0, fusion_input="vector", fusion_decay=False, kd_eps=1e-7,
                         epochs=301, pad_mode="reflect"),
    }

    @classmethod
    def preset_values(cls, preset, arch):
        """``official``: train_rn110.py's loss weights for resnet110, and the 401 epochs of train_vgg.py and
        train_Densenet.py for vgg16 and densenet40_12."""
        values = dict(cls.presets[preset])
        if preset == "official":
            if arch == "resnet110":
                values.update(cls.presets["rn110"])
            if arch in ("vgg16", "densenet40_12"):
                values["epochs"] = 401
        return values

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument("--lambda-rot", type=non_negative, help="weight of the rotation CE (peer 1)")
        parser.add_argument("--lambda-sim", type=non_negative, help="weight of the rotation contrast L_sim (peer 2)")
        parser.add_argument("--sim-T", type=temperature, default=1.0, help="temperature of L_sim (official: 1)")
        add_fusion_teacher_arguments(parser, fusion_decay=True)     # --kd-T --rampup --kd-eps, the fusion SGD
        parser.add_argument("--fusion-grid", type=positive_int, default=None, metavar="S",
                            help="pool the last-stage map to S x S before flattening (d = channels*S^2); "
                                 "default: largest of 8/4/2/1 fitting the map with d <= 4096 (CIFAR ResNet: 8)")
        parser.add_argument("--attention-heads", default=4, help="chunks of the cross-attention",
                            type=number(int, at_least=1, at_most=64, why="each sample's attention is heads x heads "
                                        "(official: 4)"))
        parser.add_argument("--mlp-ratio", default=2.0, help="cross-attention MLP width / d",
                            type=number(above=0, at_most=8, why="the MLP is ratio x d wide, and d is up to 4096 "
                                        "(official: 2)"))
        parser.add_argument("--attention-dropout", type=fraction, default=0.1,
                            help="dropout on the attention weights, its output and the MLP output")
        parser.add_argument("--fusion-input", choices=("map", "vector"), default="map",
                            help="fusion module on the attended vectors reshaped to (channels, S, S) maps (FFL), "
                                 "or on (d, 1, 1) maps as the official CMFF files (unstable at lr 0.1 for d=4096)")
        parser.add_argument("--no-ssl", action="store_true", help="ablation: no rotations at all (plain batches)")
        parser.add_argument("--no-rot", action="store_true", help="ablation: no rotation CE (peer 1)")
        parser.add_argument("--no-sim", action="store_true", help="ablation: no L_sim (peer 2)")
        parser.add_argument("--no-cross-attention", action="store_true",
                            help="ablation: the fusion module takes the pooled maps directly")

    @classmethod
    def unused_flags(cls, a):
        unused = {}
        if a.no_ssl:
            unused.update(dict.fromkeys(("no_rot", "no_sim", "lambda_rot", "lambda_sim", "sim_T"),
                                        "--no-ssl turns both self-supervised terms off"))
        if a.no_rot:
            unused["lambda_rot"] = "--no-rot turns the rotation CE off"
        if a.no_sim:
            unused.update(dict.fromkeys(("lambda_sim", "sim_T"), "--no-sim turns L_sim off"))
        if a.no_cross_attention:
            unused.update(dict.fromkeys(("attention_heads", "mlp_ratio", "attention_dropout"),
                                        "--no-cross-attention leaves the cross-attention out"))
        return unused

    def build(self):
        a = self.args
        self.use_rot = not (a.no_ssl or a.no_rot)
        self.use_sim = not (a.no_ssl or a.no_sim)
        return CMFFNet(a.arch, self.num_classes, self.image_size, a.fusion_grid, a.attention_heads,
                       a.mlp_ratio, a.attention_dropout, not a.no_cross_attention,
                       self.use_rot, self.use_sim, a.fusion_input)

    def loss(self, model, batch, epoch):
        a = self.args
        images, labels = batch.images, batch.labels
        rotate = self.use_rot or self.use_sim
        if rotate:
            images, joint = rotate_batch(images, labels)
            if a.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
        out = model(images, upright=labels.shape[0] if rotate else None)
        (o1, o2), f = out.logits, out.fused
        terms = {"ce": F.cross_entropy(o1, labels) + F.cross_entropy(o2, labels),
                 "ce_fused": F.cross_entropy(f, labels),
                 "kl": sigmoid_rampup(epoch, a.rampup) * mutual_kd([o1, o2, f], a.kd_T, a.kd_eps)}
        if out.rotation is not None:
            terms["rot"] = a.lambda_rot * F.cross_entropy(out.rotation, joint)
        if out.projection is not None:
            terms["sim"] = a.lambda_sim * upright_contrast_loss(out.projection, labels.shape[0], a.sim_T)
        return terms

    def eval_logits(self, model, images):
        out = model(images)
        return {**peer_heads(out.logits), "fused": out.fused}

    def optim_groups(self):
        return fusion_optim_groups(self.model, self.args)     # the fusion module alone in the second SGD


if __name__ == "__main__":
    main(CMFF)
