"""AMLN: Adversarial-based Mutual Learning Network for online knowledge distillation (Zhang, Lu, Gong, Luo & Liu,
ECCV 2020, LNCS 12357 pp. 158-173). No official code. Of the paper only the abstract and the introduction could be
read, and a third-party summary of the whole paper (its block-wise module: a discriminator and an "alignment
container" per block); where neither says, the design follows AFD (Chung, Park, Kim & Kwak, "Feature-map-level
Online Adversarial Knowledge Distillation", ICML 2020). docs/amln.md says which choice is whose.

N >= 2 independent peers. Peer i learns from its target peer t(i) = i - 1 (mod N): the other peer for N = 2,
AFD's cyclic scheme beyond. At every block b (backbone stage; heterogeneous peers pair their last stages) the
stage map F_ib of peer i goes through an adaptation module A_ib (the identity when it already has the target's
shape; else pooling to the smaller spatial size + 1x1 conv + BN to the target's width) and a discriminator D_ib
tells A_ib(F_ib) ("fake") from the target's map F_t(i)b ("real", pooled to the smaller size where larger). After
every intermediate block b < L an alignment container C_ib (strided convs + a 1x1 projection) maps F_ib to the
shape of the target's final map F_t(i)L (that map pooled down to F_ib's size where F_ib is smaller):

    L_D    = sum_i sum_b  d(D_ib(sg F_t(i)b), D_ib(sg A_ib(F_ib)))                      discriminators' step
    L_peer = sum_i CE(z_i, y) + 1/(N-1) sum_i sum_{j != i} KD_T(z_i <- sg z_j)           outcome-driven (DML)
             + lambda_adv sum_i sum_b g(D_ib(A_ib(F_ib)))                               process-driven, block-wise
             + lambda_final sum_i sum_{b<L} |C_ib(F_ib) - sg F_t(i)L|_1 (mean)          intermediate-to-final
             + lambda_align sum_i sum_b |A_ib(F_ib) - sg F_t(i)b|_1 (mean)              optional direct alignment

d, g: least-squares GAN losses (--gan-loss lsgan, AFD) or cross-entropy ones (bce); sg = stop-gradient. Each
training step first updates the discriminators (Adam) on the detached maps, then the peers, adaptation modules
and containers (the run's SGD) through the just-updated, frozen discriminators.

    python train_amln.py --arch resnet32 --gpu 0                 # two ResNet-32 peers, CIFAR-100
    python train_amln.py --arch resnet32 --num-peers 3 --gpu 0   # three peers, cyclic (AFD)
    python train_amln.py --arch resnet32,wrn_16_2 --gpu 0        # heterogeneous peers
"""
from __future__ import annotations

from typing import NamedTuple, Optional


import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine import Method, OptimGroup, fraction, main, non_negative, peer_heads, positive, temperature, weight_decay
from losses.adversarial import GAN_LOSSES, discriminator_loss, generator_loss
from losses.peer_targets import mutual_kd
from models.base import Backbone, run_stages
from models.peers import Peers


# ---- pairing and shapes ----------------------------------------------------------------------------
def cyclic_targets(num_peers: int) -> list[int]:
    """t(i) = (i - 1) mod N: each peer imitates the previous one (AFD's cyclic learning; the other peer for N=2)."""
    return [(i - 1) % num_peers for i in range(num_peers)]


@torch.no_grad()
def stage_shapes(net: Backbone, image_size: int) -> list[tuple[int, int, int]]:
    """(channels, H, W) of every stage map of ``net`` for a square ``image_size`` input (probed in eval mode)."""
    was = net.training
    net.eval()
    _, maps = run_stages(net.stem(torch.zeros(2, 3, image_size, image_size)), net.stages, keep=True)
    net.train(was)
    return [tuple(m.shape[1:]) for m in maps]


def paired_stages(n_own: int, n_target: int) -> list[tuple[int, int]]:
    """(own stage, target stage) of each block: the last min(n_own, n_target) stages of both, in order
    (every stage for peers of one architecture)."""
    k = min(n_own, n_target)
    return [(n_own - k + b, n_target - k + b) for b in range(k)]


# ---- the block-wise modules ------------------------------------------------------------------------
def block_shape(own: tuple[int, int, int], target: tuple[int, int, int]) -> tuple[int, int, int]:
    """Where a peer's map and its target's are compared: the target's width at the smaller of the two spatial
    sizes (the larger map is average-pooled down; nothing is upsampled)."""
    return target[0], min(own[1], target[1]), min(own[2], target[2])


class Adapter(nn.Sequential):
    """A_ib: peer i's (c_in, h_in, w_in) stage map -> the block's (c, h, w). The identity when the shapes agree;
    else adaptive average pooling to (h, w) when the peer's map is larger and a 1x1 conv (no bias) + BN when
    the widths differ (no ReLU: the pre-activation WRN's stage maps are not rectified)."""

    def __init__(self, own: tuple[int, int, int], block: tuple[int, int, int]):
        layers: list[nn.Module] = []
        if own[1:] != block[1:]:
            layers.append(nn.AdaptiveAvgPool2d(block[1:]))
        if own[0] != block[0]:
            layers += [nn.Conv2d(own[0], block[0], 1, bias=False), nn.BatchNorm2d(block[0])]
            nn.init.kaiming_normal_(layers[-2].weight, mode="fan_out", nonlinearity="relu")
        super().__init__(*layers)   # an empty Sequential is the identity


class Discriminator(nn.Module):
    """D_ib on a (c, h, w) feature map: [3x3 conv c->c, stride 2 while the map is above 4x4, + LeakyReLU(0.2)]
    (at least one such layer), then a 1x1 conv c->1 averaged over positions: one raw score per sample, B.
    No normalisation layer: the real and fake batches go through it separately (no batch-statistics leak)."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        layers: list[nn.Module] = []
        while True:
            stride = 2 if size > 4 else 1
            layers += [nn.Conv2d(channels, channels, 3, stride, 1), nn.LeakyReLU(0.2, inplace=True)]
            size = (size + 1) // 2 if stride == 2 else size
            if size <= 4:
                break
        layers.append(nn.Conv2d(channels, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(dim=(1, 2, 3))


class AlignmentContainer(nn.Sequential):
    """C_ib: peer i's (c, h, w) map after an intermediate block -> the (c_L, h_L, w_L) of its target's final map
    (pooled down to (h, w) where the own map is smaller; ``final`` is that size):
    a 3x3 conv (stride 2) + BN + ReLU per halving of the spatial size, widening to min(2c, c_L) each time (to c_L
    at once when c >= c_L), adaptive average pooling for what halving cannot reach, then a 1x1 conv + BN to c_L
    (no ReLU at the end: the pre-activation WRN's stage maps are not rectified)."""

    def __init__(self, own: tuple[int, int, int], final: tuple[int, int, int]):
        (c, h, w), (c_out, h_out, w_out) = own, final
        layers: list[nn.Module] = []
        while h >= 2 * h_out and w >= 2 * w_out:
            width = c_out if c >= c_out else min(2 * c, c_out)
            layers += [nn.Conv2d(c, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            c, h, w = width, (h + 1) // 2, (w + 1) // 2
        if (h, w) != (h_out, w_out):
            layers.append(nn.AdaptiveAvgPool2d((h_out, w_out)))
        layers += [nn.Conv2d(c, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        for layer in layers:
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
        super().__init__(*layers)


class AMLNOutput(NamedTuple):
    logits: list[torch.Tensor]                   # z_i, one B x C tensor per peer
    fake: Optional[list[list[torch.Tensor]]]     # per peer i, per block b: A_ib(F_ib) (with gradient)
    real: Optional[list[list[torch.Tensor]]]     # per peer i, per block b: F_t(i)b, pooled to the block's size
                                                 # where larger (with gradient; detach to use)
    aligned: Optional[list[list[torch.Tensor]]] = None   # per peer i, per intermediate block b: C_ib(F_ib)
    final: Optional[list[list[torch.Tensor]]] = None     # per peer i, per intermediate block b: F_t(i)L, pooled
                                                         # to C_ib's output size where larger


class AMLNNet(nn.Module):
    """The N peers, their adaptation modules and, with ``containers``, their alignment containers (everything the
    peers' SGD trains). ``forward(x)`` returns an :class:`AMLNOutput`; ``blocks=False`` (evaluation) skips the
    stage maps, adapters and containers."""

    def __init__(self, peers: Peers, image_size: int, containers: bool = True):
        super().__init__()
        self.peers = peers
        self.targets = cyclic_targets(peers.num_peers)
        shapes = [stage_shapes(peers.single_network(i), image_size) for i in range(peers.num_peers)]
        # per peer i: the (own stage, target stage) index and the shapes of every block
        self.pairs = [paired_stages(len(shapes[i]), len(shapes[t])) for i, t in enumerate(self.targets)]
        self.block_shapes = [[block_shape(shapes[i][s], shapes[t][ts]) for s, ts in pairs]
                             for i, (t, pairs) in enumerate(zip(self.targets, self.pairs))]
        self.adapters = nn.ModuleList(
            nn.ModuleList(Adapter(shapes[i][s], shape) for (s, _), shape in zip(self.pairs[i], self.block_shapes[i]))
            for i in range(peers.num_peers))
        # per peer i: the own stages of its intermediate blocks (every paired block but the last), each mapped by a
        # container C_ib to the target's final map (pooled down where the own map is smaller); none without
        # ``containers``
        self.intermediate = [[s for s, _ in pairs[:-1]] if containers else [] for pairs in self.pairs]
        self.final_shapes = [[block_shape(shapes[i][s], shapes[t][-1]) for s in own]
                             for i, (t, own) in enumerate(zip(self.targets, self.intermediate))]
        self.containers = nn.ModuleList(
            nn.ModuleList(AlignmentContainer(shapes[i][s], shape) for s, shape in zip(own, self.final_shapes[i]))
            for i, own in enumerate(self.intermediate))

    def forward(self, x: torch.Tensor, blocks: bool = True) -> AMLNOutput:
        out = self.peers(x, return_stages=blocks)
        if not blocks:
            return AMLNOutput(out.logits, None, None)
        fake = [[adapter(out.stages[i][s]) for adapter, (s, _) in zip(self.adapters[i], self.pairs[i])]
                for i in range(len(self.adapters))]
        real = [[_pool_to(out.stages[t][ts], shape[1:]) for (_, ts), shape in zip(self.pairs[i], self.block_shapes[i])]
                for i, t in enumerate(self.targets)]
        aligned = [[container(out.stages[i][s]) for container, s in zip(self.containers[i], own)]
                   for i, own in enumerate(self.intermediate)]
        final = [[_pool_to(out.stages[t][-1], shape[1:]) for shape in self.final_shapes[i]]
                 for i, t in enumerate(self.targets)]
        return AMLNOutput(out.logits, fake, real, aligned, final)


def _pool_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.adaptive_avg_pool2d(x, size)


def build_discriminators(block_shapes: list[list[tuple[int, int, int]]]) -> nn.ModuleList:
    """D_ib for every peer i and block b, sized from the target's map (channels, H)."""
    return nn.ModuleList(nn.ModuleList(Discriminator(c, h) for c, h, _ in shapes) for shapes in block_shapes)


# ---- the losses of one step ------------------------------------------------------------------------
def discriminators_loss(discriminators: nn.ModuleList, fake, real, kind: str) -> torch.Tensor:
    """L_D = sum_i sum_b d(D_ib(sg real_ib), D_ib(sg fake_ib)): only the discriminators get gradients."""
    return sum(discriminator_loss(d(r.detach()), d(f.detach()), kind)
               for ds, fs, rs in zip(discriminators, fake, real) for d, f, r in zip(ds, fs, rs))


def adversarial_loss(discriminators: nn.ModuleList, fake, kind: str) -> torch.Tensor:
    """sum_i sum_b g(D_ib(fake_ib)): gradients reach the peers and adapters (freeze the discriminators)."""
    return sum(generator_loss(d(f), kind) for ds, fs in zip(discriminators, fake) for d, f in zip(ds, fs))


def alignment_loss(fake, real) -> torch.Tensor:
    """sum_i sum_b mean |fake_ib - sg real_ib|: the mean absolute difference of each pair of maps, the target's
    side detached. On the same blocks (``fake``, ``real``) it is the direct L1 alignment AFD compares against;
    on the containers' outputs and the targets' final maps (``aligned``, ``final``) the intermediate-to-final
    alignment. Computed in float32."""
    return sum(F.l1_loss(f.float(), r.detach().float()) for fs, rs in zip(fake, real) for f, r in zip(fs, rs))


def average_gradients(module: nn.Module) -> None:
    """Under torchrun, replace each gradient of ``module`` by its mean over the ranks (what DDP does for the
    model); nothing in a single process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


class AMLN(Method):
    """AMLN: peers learn from each other's logits (DML) and, block by block, from each other's stage maps:
    adversarially through per-peer discriminators (AFD's scheme), and from each intermediate block towards the
    target's final map through alignment containers."""

    num_peers = 2
    min_peers = 2
    mixed_archs = True       # --arch a,b: heterogeneous peers, paired by their last stages through the adapters
    state_keys = ("discriminators",)

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument("--kd-T", type=temperature, default=1.0, help="temperature of the mutual KL (DML: 1)")
        parser.add_argument("--adv-weight", type=non_negative, default=1.0,
                            help="lambda_adv, weight of the peers' block-wise adversarial loss")
        parser.add_argument("--final-weight", type=non_negative, default=1.0,
                            help="lambda_final, weight of the intermediate-to-final alignment: each intermediate "
                                 "block's map, through its alignment container, against the target peer's final "
                                 "map (0: off, and no containers are built)")
        parser.add_argument("--align-weight", type=non_negative, default=0.0,
                            help="lambda_align, weight of a direct L1 alignment of the same maps (0: off)")
        parser.add_argument("--gan-loss", choices=GAN_LOSSES, default="lsgan",
                            help="least-squares (AFD) or binary cross-entropy adversarial losses")
        parser.add_argument("--disc-lr", type=positive, default=2e-4, help="Adam lr of the discriminators (constant)")
        parser.add_argument("--disc-betas", type=fraction, nargs=2, default=(0.5, 0.999), metavar=("B1", "B2"),
                            help="Adam betas of the discriminators")
        parser.add_argument("--disc-weight-decay", type=weight_decay, default=0.0,
                            help="weight decay of the discriminators")

    @classmethod
    def unused_flags(cls, a):
        return dict.fromkeys(("gan_loss", "disc_lr", "disc_betas", "disc_weight_decay"), "--adv-weight 0 turns the "
                             "adversarial loss off (the discriminators still train)") if a.adv_weight == 0 else {}

    def build(self):
        a = self.args
        net = AMLNNet(Peers(a.arch, self.num_classes, a.num_peers, image_size=self.image_size), self.image_size,
                      containers=a.final_weight > 0)
        self.discriminators = build_discriminators(net.block_shapes)
        return net

    def train_step(self, model, batch, epoch, step):
        a = self.args
        with step.autocast():
            out = model(batch.images)
            logits = out.logits
            ce = sum(F.cross_entropy(z, batch.labels) for z in logits)
            kd = mutual_kd(logits, a.kd_T) / (len(logits) - 1)
            # 1. the discriminators' step, on the detached maps
            disc = discriminators_loss(self.discriminators, out.fake, out.real, a.gan_loss)
        step.zero_grad("discriminators")
        step.backward(disc)
        average_gradients(self.discriminators)   # they live outside DDP: average them over the ranks
        step.step("discriminators")
        # 2. the peers' step through the updated discriminators, which get no gradient
        self.discriminators.requires_grad_(False)
        with step.autocast():
            terms = {"ce": ce, "kd": kd,
                     "adv": a.adv_weight * adversarial_loss(self.discriminators, out.fake, a.gan_loss)}
            if a.final_weight > 0:
                terms["final"] = a.final_weight * alignment_loss(out.aligned, out.final)
            if a.align_weight > 0:
                terms["align"] = a.align_weight * alignment_loss(out.fake, out.real)
        step.zero_grad("model")
        step.backward(sum(terms.values()))
        step.step("model")
        self.discriminators.requires_grad_(True)
        return {**terms, "disc": disc.detach()}

    def eval_logits(self, model, images):
        return peer_heads(model(images, blocks=False).logits)

    def optim_groups(self):
        a = self.args
        return [OptimGroup("model", [p for p in self.model.parameters() if p.requires_grad]),
                OptimGroup("discriminators", list(self.discriminators.parameters()), lr=a.disc_lr,
                           weight_decay=a.disc_weight_decay, scheduled=False, optimizer=torch.optim.Adam,
                           extra={"betas": tuple(a.disc_betas)})]


if __name__ == "__main__":
    main(AMLN)
