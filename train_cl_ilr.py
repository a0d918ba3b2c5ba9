"""CL-ILR: Collaborative Learning with Intermediate-Level Representation sharing (Song & Chai, NeurIPS 2018),
as re-implemented by the MCL-OKD repository: a two-level tree of heads, each head distilled from the
others' mean.

    trunk -> ceil(N/2) groups -> N heads (two per group); the gradient into a shared tensor is divided by
             its number of consumers (backprop rescaling, models/peers.py `ilr`)
    L = sum_i [ 0.5 * CE(z_i, y) + 0.5 * KD_T(z_i <- stopgrad mean_{j != i} z_j) ],   T = 2

    python train_cl_ilr.py --arch resnet32 --gpu 0                        # MCL-OKD defaults: 4 heads, T=2
    python train_cl_ilr.py --arch resnet32 --gpu 0 --soft-target probs    # the paper's mean of probabilities
"""
import math


import torch
import torch.nn.functional as F

from engine import Method, main, temperature
from losses.peer_targets import kd_towards, mean_of_others
from models.peers import Peers


def soft_targets(logits, T, mode="logits"):
    """Each head's target, as logits for KD_T: the others' mean logits (MCL-OKD code) or, for ``probs``,
    T * log of the others' mean of softmax(z_j/T) (the paper), whose softmax at T is that mean."""
    if mode == "logits":
        return mean_of_others(logits)
    log_p = torch.stack([F.log_softmax(z.float() / T, dim=1) for z in logits])
    n = len(logits)
    return [T * (torch.logsumexp(torch.cat([log_p[:i], log_p[i + 1:]]), 0) - math.log(n - 1)) for i in range(n)]


def cl_ilr_loss(logits, labels, T, mode="logits"):
    ce = 0.5 * sum(F.cross_entropy(z, labels) for z in logits)
    kd = 0.5 * kd_towards(logits, soft_targets(logits, T, mode), T)   # targets detached
    return {"ce": ce, "kd": kd}


class CLILR(Method):
    """CL-ILR: a tree of heads sharing a trunk and groups (gradients rescaled), each distilled from the others."""

    num_peers = 4
    min_peers = 2

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument("--kd-T", type=temperature, default=2.0, help="distillation temperature T")
        parser.add_argument("--soft-target", choices=("logits", "probs"), default="logits",
                            help="target of head i: softmax of the others' mean logits (MCL-OKD code) or "
                                 "the mean of the others' softmax (the paper)")

    @classmethod
    def unused_flags(cls, a):
        if a.num_peers == 2:
            return {"soft_target": "with 2 heads each head's target is the other head's softmax either way"}
        return {}

    def build(self):
        return Peers(self.args.arch, self.num_classes, self.args.num_peers, "tree", image_size=self.image_size)

    def loss(self, model, batch, epoch):
        return cl_ilr_loss(model(batch.images).logits, batch.labels, self.args.kd_T, self.args.soft_target)

    # eval_logits: the default, every head and the mean of ALL heads (the official code leaves the last out).


if __name__ == "__main__":
    main(CLILR)
