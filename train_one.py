"""ONE: Knowledge Distillation by On-the-fly Native Ensemble (Lan, Zhu & Gong, NeurIPS 2018).

A trunk shared up to the last stage, N branches, and a gate on the trunk that mixes the branches'
logits into a teacher, which every branch distils from.

    g   = softmax(ReLU(BN1d(Linear_{C_trunk -> N}(GAP(trunk output)))))      one weight per branch and sample
    z_e = sum_i g_i z_i                                                      (the gate is trained through CE(z_e))
    L   = sum_i CE(z_i, y) + CE(z_e, y) + w(e) * sum_i KD_T(z_i <- stopgrad z_e),   T = 3
    w(e) = 1 (MCL-OKD code), or exp(-5 (1 - min(e, R)/R)^2) with --rampup R (ONE code: R = 80)

    python train_one.py --arch resnet32 --gpu 0                                # MCL-OKD: 4 branches, w = 1
    python train_one.py --arch resnet32 --gpu 0 --preset paper --recipe one    # ONE code: 3 branches, ramp-up 80
"""
from typing import NamedTuple


import torch
import torch.nn.functional as F
from torch import nn

from engine import Method, main, peer_heads, ramp_up, temperature
from losses import sigmoid_rampup
from losses.peer_targets import kd_towards
from models.peers import Peers


class Gate(nn.Module):
    """g = softmax(ReLU(BN1d(Linear(GAP(x))))): N mixing weights per sample from the trunk output x."""

    def __init__(self, in_channels: int, num_branches: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_branches)
        self.norm = nn.BatchNorm1d(num_branches)

    def forward(self, x):
        return F.softmax(F.relu(self.norm(self.fc(x.mean(dim=(2, 3))))), dim=1)


class ONEOutput(NamedTuple):
    logits: list          # z_1 .. z_N
    gate: torch.Tensor    # B x N
    teacher: torch.Tensor  # z_e


class ONENet(nn.Module):
    def __init__(self, peers: Peers):
        super().__init__()
        self.peers = peers
        self.gate = Gate(peers.trunk_width, peers.num_peers)

    def forward(self, x):
        out = self.peers(x)
        g = self.gate(out.trunk)
        teacher = sum(g[:, i, None] * z for i, z in enumerate(out.logits))
        return ONEOutput(out.logits, g, teacher)


def one_loss(logits, teacher, labels, T, weight=1.0):
    return {"ce": sum(F.cross_entropy(z, labels) for z in logits),
            "ce_teacher": F.cross_entropy(teacher, labels),
            "kd": weight * kd_towards(logits, teacher, T)}          # the teacher is detached here


class ONE(Method):
    """ONE: branches on a shared trunk, distilled from their gated on-the-fly ensemble."""

    num_peers = 4
    min_peers = 2
    best_metric = "teacher"   # the official "Ens" of ONE is the gated teacher z_e
    presets = {
        "mcl-okd": dict(num_peers=4, kd_T=3.0, rampup=0.0),
        "paper": dict(num_peers=3, kd_T=3.0, rampup=80.0),
    }

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument("--kd-T", type=temperature, help="distillation temperature T")
        parser.add_argument("--rampup", type=ramp_up, metavar="EPOCHS",
                            help="sigmoid ramp-up length of the KD weight, in epochs (0: weight 1 throughout)")

    def build(self):
        a = self.args
        return ONENet(Peers(a.arch, self.num_classes, a.num_peers, "shared", "one", image_size=self.image_size))

    def loss(self, model, batch, epoch):
        out = model(batch.images)
        return one_loss(out.logits, out.teacher, batch.labels, self.args.kd_T,
                        sigmoid_rampup(epoch, self.args.rampup))

    def eval_logits(self, model, images):
        out = model(images)
        return {**peer_heads(out.logits), "teacher": out.teacher}


if __name__ == "__main__":
    main(ONE)
