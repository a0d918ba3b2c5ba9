"""OKDDip: Online Knowledge Distillation with Diverse Peers (Chen, Mei, Wang, Feng & Chen, AAAI 2020).

N-1 auxiliary peers and one group leader (the last branch) on a trunk shared up to the last stage.
Each peer distils from its own attention-weighted mix of the peers; the leader from the peers' mean.

    q_i = W_q h_i,  k_i = W_k h_i        h_i: peer i's pooled feature; W_q, W_k shared, bias-free, C -> C//8
    A_ij = softmax_j(q_i . k_j)          over the N-1 peers (self included), no 1/sqrt(d)
    x_i  = sum_j A_ij z_j
    L = sum_i CE(z_i, y) + CE(z_l, y) + w(e) [ sum_i KD_T(z_i <- x_i) + KD_T(z_l <- mean_i z_i) ],   T = 3
    w(e) = exp(-5 (1 - min(e, 80)/80)^2), e the 0-based epoch

Nothing is detached by default (the official code): the targets pass gradients into the attention and
the peers. --detach-targets all: constant targets (W_q, W_k then get no gradient and keep their
initial values); --detach-targets peers: no gradient into the peers through the targets, W_q, W_k still learn.

    python train_okddip.py --arch resnet32 --gpu 0                     # MCL-OKD protocol (cosine)
    python train_okddip.py --arch resnet32 --gpu 0 --recipe okddip     # the paper's step schedule
"""
from typing import NamedTuple


import torch
import torch.nn.functional as F
from torch import nn

from engine import Method, main, peer_heads, ramp_up, temperature
from losses import sigmoid_rampup
from losses.peer_targets import kd_towards
from models.peers import Peers


class PeerAttention(nn.Module):
    """x_i = sum_j softmax_j(W_q h_i . W_k h_j) z_j for lists of features h and logits z; returns (x, A)."""

    def __init__(self, feature_dim: int, factor: int = 8):
        super().__init__()
        self.query = nn.Linear(feature_dim, feature_dim // factor, bias=False)
        self.key = nn.Linear(feature_dim, feature_dim // factor, bias=False)

    def forward(self, features, logits):
        h, z = torch.stack(features, 1), torch.stack(logits, 1)                      # B x n x C, B x n x K
        attention = F.softmax(self.query(h) @ self.key(h).transpose(1, 2), dim=-1)   # B x n x n
        return list((attention @ z).unbind(1)), attention


class OKDDipOutput(NamedTuple):
    peers: list               # z_1 .. z_{N-1}
    leader: torch.Tensor      # z_l
    targets: list             # x_1 .. x_{N-1}
    leader_target: torch.Tensor
    attention: torch.Tensor   # B x (N-1) x (N-1)


class OKDDipNet(nn.Module):
    def __init__(self, peers: Peers, detach: str = "none"):
        super().__init__()
        self.peers, self.detach = peers, detach
        self.attention = PeerAttention(peers.feature_dim)
        # constant targets: W_q and W_k get no gradient and keep their initial values (frozen, so that neither
        # DDP nor the optimizer waits for one)
        self.attention.requires_grad_(detach != "all")

    def forward(self, x):
        out = self.peers(x, return_features=True)
        z, leader, h = out.logits[:-1], out.logits[-1], out.features[:-1]
        if self.detach == "peers":
            targets, attention = self.attention([f.detach() for f in h], [t.detach() for t in z])
        else:
            targets, attention = self.attention(h, z)
        if self.detach == "all":
            targets = [t.detach() for t in targets]
        leader_target = torch.stack(z).mean(0)
        if self.detach != "none":
            leader_target = leader_target.detach()
        return OKDDipOutput(z, leader, targets, leader_target, attention)


def okddip_loss(peers, leader, targets, leader_target, labels, T, weight):
    # detach=False: whether the targets carry gradients was decided by OKDDipNet (--detach-targets)
    return {"ce": sum(F.cross_entropy(z, labels) for z in peers),
            "ce_leader": F.cross_entropy(leader, labels),
            "kd_peers": weight * kd_towards(peers, targets, T, detach=False),
            "kd_leader": weight * kd_towards([leader], [leader_target], T, detach=False)}


class OKDDip(Method):
    """OKDDip: peers distilled from attention-weighted peer mixes, and a group leader from the peer mean."""

    num_peers = 4         # N-1 = 3 peers + 1 leader
    min_peers = 3         # the attention needs at least two peers to mix

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument("--kd-T", type=temperature, default=3.0, help="distillation temperature T")
        parser.add_argument("--rampup", type=ramp_up, default=80.0, metavar="EPOCHS",
                            help="sigmoid ramp-up length of the KD weight, in epochs (0: weight 1 throughout)")
        parser.add_argument("--detach-targets", choices=("none", "all", "peers"), default="none",
                            help="none: gradients flow through the targets (official code); all: constant "
                                 "targets (the attention is not trained); peers: no gradient into the peers "
                                 "through the targets, the attention still learns")

    def build(self):
        a = self.args
        peers = Peers(a.arch, self.num_classes, a.num_peers, "shared", "one", image_size=self.image_size)
        return OKDDipNet(peers, a.detach_targets)

    def loss(self, model, batch, epoch):
        out = model(batch.images)
        return okddip_loss(out.peers, out.leader, out.targets, out.leader_target, batch.labels,
                           self.args.kd_T, sigmoid_rampup(epoch, self.args.rampup))

    def eval_logits(self, model, images):
        out = model(images)
        heads = peer_heads(out.peers, ensemble=False)
        heads["leader"] = out.leader
        heads["ensemble"] = torch.stack(out.peers + [out.leader]).mean(0)   # official: the sum, same argmax
        return heads


if __name__ == "__main__":
    main(OKDDip)
