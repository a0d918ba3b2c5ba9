"""PCL: Peer Collaborative Learning for Online Knowledge Distillation (Wu & Gong, AAAI 2021).

A multi-branch network: a shared trunk (all but the last stage: stem, layer1, layer2 of a CIFAR ResNet) and
m = 3 peers (branches: the last stage, pool, fc). Each peer gets its **own augmented view** of the image (the
trunk runs once per view). Per view-batch:

    z_i   = peer i on view i;  f_i its pooled feature
    z_en  = FC([f_1, ..., f_m])                           peer ensemble teacher (a learned classifier)
    z~_j  = peer j of the peer mean teacher (a temporal mean of the whole network) on view j, no gradient
    L     = CE(z_en) + sum_i [ CE(z_i) + w(e) KD_T(z_i <- stopgrad z_en) + w(e) 1/(m-1) sum_{j != i} KD_T(z_i <- z~_j) ]

The mean teacher's peer j sees its own peer's view j (``--mean-view own``, the default: the method's overview
figure, where X^j enters the temporal mean network of branch j, and the re-implementation's
``self.mean_model(img1, img2, img3)``); ``--mean-view student`` runs it on view i of the peer it teaches
(docs/pcl.md).

T = 3, w(e) = exp(-5 (1 - min(e, 80)/80)^2) (e = 0-based epoch). The mean teacher is updated after every step:
theta~ <- d theta~ + (1 - d) theta, d = min(1 - 1/(n + 1), 0.999), n = updates so far; it keeps its own BatchNorm
statistics, computed when it runs (in train mode) on the training views.

    python train_pcl.py --arch resnet32 --gpu 0          # CIFAR-100, the OKDDip protocol; target 74.14 (paper)
    python train_pcl.py --arch wrn_20_8 --gpu 0          # 80.51
"""

import torch
import torch.nn.functional as F
from torch import nn

from engine import Method, main, peer_heads, ramp_up, temperature, unit_interval
from losses import kd_loss, sigmoid_rampup
from models.peers import Peers
from models.temporal_mean import TemporalMean


def mean_teacher_decay(n: int, limit: float = 0.999) -> float:
    """d(n) = min(1 - 1/(n + 1), limit) for update n = 0, 1, ... (d(0) = 0: the first update copies)."""
    return min(1.0 - 1.0 / (n + 1), limit)


class PCLNet(nn.Module):
    """The peers on their shared trunk and the peer ensemble teacher FC([f_1, ..., f_m])."""

    def __init__(self, peers: Peers, num_classes: int):
        super().__init__()
        self.peers = peers
        self.ensemble_fc = nn.Linear(peers.num_peers * peers.feature_dim, num_classes)

    def forward(self, x):
        """``x``: one batch, or one view per peer. Returns (list of m peer logits, ensemble-teacher logits)."""
        out = self.peers(x, return_features=True)
        return out.logits, self.ensemble_fc(torch.cat(out.features, dim=1))


def pcl_loss(logits, teacher, mean_logits, labels, T: float, weight: float) -> dict:
    """The PCL loss terms. ``logits[i]``: peer i on view i; ``teacher``: z_en; ``mean_logits[i][j]``: the target
    peer j of the mean teacher gives peer i (no gradient): on view j (``--mean-view own``, then the same for
    every i) or on view i (``student``)."""
    m = len(logits)
    kd_en = sum(kd_loss(z, teacher, T) for z in logits)
    kd_mean = sum(sum(kd_loss(z, mean_logits[i][j], T) for j in range(m) if j != i) / (m - 1)
                  for i, z in enumerate(logits))
    return {"ce": sum(F.cross_entropy(z, labels) for z in logits),
            "ce_teacher": F.cross_entropy(teacher, labels),
            "kd_teacher": weight * kd_en,
            "kd_mean": weight * kd_mean}


class PCL(Method):
    """PCL: peers on a shared trunk, each on its own view, taught by a learned ensemble teacher and by the
    temporal mean of the other peers."""

    recipe = "okddip"
    num_peers = 3
    min_peers = 2
    best_metric = "mean_peer1"    # the deployed network: the first peer of the peer mean teacher (docs/pcl.md)
    state_keys = ("mean_teacher",)

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument("--kd-T", type=temperature, default=3.0, help="distillation temperature T")
        parser.add_argument("--rampup", type=ramp_up, default=80.0, metavar="EPOCHS",
                            help="sigmoid ramp-up length of the two KD weights, in epochs (0: weight 1)")
        parser.add_argument("--ema-decay", type=unit_interval, default=0.999,
                            help="upper limit of the mean teacher's decay min(1 - 1/(n+1), limit)")
        parser.add_argument("--mean-view", choices=("own", "student"), default="own",
                            help="the view the mean teacher's peer j sees when it teaches peer i: own (view j, its "
                                 "own peer's: the method's overview figure and the re-implementation) or "
                                 "student (view i)")

    @classmethod
    def check_args(cls, args):
        args.views = args.num_peers          # one augmented view per peer

    def build(self):
        a = self.args
        model = PCLNet(Peers(a.arch, self.num_classes, a.num_peers, "shared", "one", image_size=self.image_size),
                       self.num_classes)
        self.mean_teacher = TemporalMean(model, lambda n: mean_teacher_decay(n, a.ema_decay), buffers="own")
        return model

    def loss(self, model, batch, epoch):
        a = self.args
        views = batch.images if isinstance(batch.images, (list, tuple)) else [batch.images] * a.num_peers
        logits, teacher = model(views)
        self.mean_teacher.train()         # its own BN statistics, from the training views
        with torch.no_grad():
            if a.mean_view == "own":      # peer j of the mean teacher on view j, the target of every i != j
                mean_logits = [self.mean_teacher(views)[0]] * len(views)
            else:                         # peer j of the mean teacher on view i, the target of peer i
                mean_logits = [self.mean_teacher(v)[0] for v in views]
        return pcl_loss(logits, teacher, mean_logits, batch.labels, a.kd_T, sigmoid_rampup(epoch, a.rampup))

    def eval_logits(self, model, images):
        logits, teacher = model(images)
        self.mean_teacher.eval()
        mean_logits, _ = self.mean_teacher(images)
        means = {f"mean_{name}": z for name, z in peer_heads(mean_logits, ensemble=False).items()}
        return {**peer_heads(logits, ensemble=False), "teacher": teacher, **means}


if __name__ == "__main__":
    main(PCL)
