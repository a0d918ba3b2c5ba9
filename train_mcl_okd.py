"""MCL-OKD: Multi-view Contrastive Learning for Online Knowledge Distillation (Yang et al., ICASSP 2021).

A shared trunk with N branches (z_i logits, f_i pooled features). Each branch has an embedding head
e_i = normalize(W_i f_i + b_i) and a memory bank M_i (n_data x d) indexed by training-sample index. For
each ordered pair of branches (a, b), a != b, the other branch's memory scores the anchor embedding:
s^{a->b}[n, k] = <M_a[c_nk], e_b[n]> with c_n0 the positive (the sample itself) and c_n1..c_nK negatives
of other classes, and CRD's NCE loss with a per-batch normaliser Z is applied (losses/contrast_memory.py):

    L = gamma * sum_i CE(z_i, y) + alpha * KD_T(z_N <- stopgrad mean_i z_i) + beta * sum_{a != b} NCE(s^{a->b})

then, after the optimizer step (``after_step``), M_a[idx] <- normalize(m M_a[idx] + (1 - m) e_a). Only the last branch distils from the ensemble
(DOT); it is presumably the deployed single model. Defaults: N=4, T=3, gamma=1, alpha=1, beta=0.025,
d=128, tau=0.1 (0.07 on ImageNet), m=0.5, K=256 for the CIFAR ResNets and DenseNet, 16384 otherwise.

    python train_mcl_okd.py --arch resnet32 --gpu 0                  # K=256 (README)
    python train_mcl_okd.py --arch vgg16 --gpu 0                     # K=16384 (README)
    python train_mcl_okd.py --arch resnet32 --gpu 0 --alpha 0        # the "+MCL" ablation (no DOT)
    torchrun --nproc_per_node 8 train_mcl_okd.py --arch resnet34 --dataset imagenet --data DIR \\
        --recipe mcl-okd-imagenet --batch-size 16                    # tau=0.07, K=16384; batch 128 over 8 GPUs
"""
import warnings


import torch
import torch.nn.functional as F
from torch import nn

from engine import Method, main, non_negative, number, peer_heads, temperature
from losses import kd_loss
from losses.contrast_memory import ClassNegativeSampler, MemoryBanks, all_gather_cat, bank_scores, nce_loss
from models.peers import Peers


CIFAR_RESNETS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet110_bottleneck")


def default_nce_k(arch: str) -> int:
    """The official README's K: 256 for ResNet-32/110 and DenseNet-40-12 (here every CIFAR ResNet and
    DenseNet), 16384 (the official default) for VGG-16, HCGNet and everything else (the ImageNet ResNets
    resnet18/34/50 included)."""
    return 256 if arch in CIFAR_RESNETS or arch.startswith("densenet") else 16384


class EmbedHead(nn.Module):
    """Linear(C_feat -> d) then L2 normalisation (the official ``Embed`` + ``Normalize``)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, dim)

    def forward(self, features):
        return F.normalize(self.linear(features.flatten(1)).float(), dim=1)


class MCLNet(nn.Module):
    """The trained module: the N branches and their embedding heads (so DDP averages the heads' gradients too)."""

    def __init__(self, peers: Peers, dim: int):
        super().__init__()
        self.peers = peers
        self.embed = nn.ModuleList(EmbedHead(peers.feature_dim, dim) for _ in range(peers.num_peers))

    def forward(self, x):
        """(list of N logits, N x B x d embeddings)."""
        out = self.peers(x, return_features=True)
        return out.logits, torch.stack([head(f) for head, f in zip(self.embed, out.features)])


class MCLOKD(Method):
    """MCL-OKD: shared-trunk branches, multi-view contrastive learning through memory banks, and
    distillation of the last branch from the ensemble (DOT)."""

    recipe = "mcl-okd"
    num_peers = 4
    min_peers = 2
    best_metric = "ensemble"
    state_keys = ("memory", "sampler")
    needs_every_class = True            # negatives are drawn from the other classes' samples

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument("--kd-T", type=temperature, default=3.0, help="DOT temperature T")
        parser.add_argument("--gamma", type=non_negative, default=1.0, help="weight of sum_i CE")
        parser.add_argument("--alpha", type=non_negative, default=1.0, help="weight of DOT (0: the '+MCL' ablation)")
        parser.add_argument("--beta", type=non_negative, default=0.025, help="weight of the MCL (contrastive) loss")
        parser.add_argument("--feat-dim", type=number(int, at_least=1, at_most=2048, why="each memory bank holds "
                                                      "n_train x d floats (official: 128)"),
                            default=128, help="embedding dimension d")
        parser.add_argument("--nce-k", type=number(int, at_least=1, at_most=65536, why="each anchor scores K "
                                                   "negatives of d floats (official: 256 or 16384)"), default=None,
                            help="negatives per anchor K; unset: 256 for CIFAR ResNets and DenseNet, else 16384")
        parser.add_argument("--nce-t", type=temperature, default=None,
                            help="contrastive temperature tau; unset: 0.07 on ImageNet, else 0.1")
        parser.add_argument("--nce-m", type=number(at_least=0, below=1, why="m = 1 never writes an embedding into "
                                                   "the banks"), default=0.5, help="memory momentum m")
        parser.add_argument("--mode", choices=("exact", "relax"), default="exact",
                            help="positive: the sample itself, or a random sample of its class")

    @classmethod
    def unused_flags(cls, a):
        unused = {"kd_T": "--alpha 0 turns DOT off"} if a.alpha == 0 else {}
        if a.beta == 0:
            unused.update(dict.fromkeys(("nce_k", "nce_t", "nce_m", "mode", "feat_dim"),
                                        "--beta 0 turns the contrastive loss off"))
        return unused

    @classmethod
    def check_args(cls, args):
        if args.nce_k is None:
            args.nce_k = default_nce_k(args.arch)
        if args.nce_t is None:
            args.nce_t = 0.07 if args.dataset == "imagenet" else 0.1
        if args.dataset == "imagenet" and args.recipe == "mcl-okd":
            warnings.warn("the paper's ImageNet protocol is --recipe mcl-okd-imagenet (100 epochs, batch 128, "
                          "wd 1e-4); running the CIFAR recipe")

    def build(self):
        a = self.args
        if self.train_labels is None or len(self.train_labels) != self.n_train:
            raise ValueError("MCL-OKD samples negatives by class: build it with train_labels (every training label)")
        peers = Peers(a.arch, self.num_classes, a.num_peers, "shared", "dml", image_size=self.image_size)
        # --eval-only never reads the banks (n_train x feat_dim per peer: 2.6 GB for 4 peers on ImageNet)
        self.memory = MemoryBanks(a.num_peers, 0 if a.eval_only else self.n_train, a.feat_dim)
        self.sampler = ClassNegativeSampler(self.train_labels, a.nce_k, a.mode, self.num_classes)
        return MCLNet(peers, a.feat_dim)

    def mcl_loss(self, emb, index, contrast):
        """sum over ordered pairs a != b of NCE(<M_a[contrast], e_b>) against the banks as they are; the
        batch (``index``: its sample indices, ``emb``: N x B x d normalised embeddings) is kept for the
        momentum update of every bank, which ``after_step`` applies once the backward has read the banks."""
        loss = 0.0
        for a in range(len(emb)):
            others = [b for b in range(len(emb)) if b != a]
            scores = bank_scores(self.memory.banks[a], contrast, emb[others])
            loss = loss + nce_loss(scores, self.n_train, self.args.nce_t)
        self._pending_update = (index, emb.detach())
        return loss

    def after_step(self, model, batch, epoch):
        """The momentum update of the banks with this step's embeddings; every rank applies every rank's
        batch (DDP), so the copies stay identical."""
        index, emb = self._pending_update
        self._pending_update = None
        self.memory.update(all_gather_cat(index), all_gather_cat(emb, dim=1), self.args.nce_m)

    def loss(self, model, batch, epoch):
        a = self.args
        logits, emb = model(batch.images)
        ce = sum(F.cross_entropy(z, batch.labels) for z in logits)
        dot = kd_loss(logits[-1], torch.stack(logits).mean(0), a.kd_T)
        mcl = self.mcl_loss(emb, batch.index, self.sampler(batch.index))
        return {"ce": a.gamma * ce, "dot": a.alpha * dot, "mcl": a.beta * mcl}

    def eval_logits(self, model, images):
        return peer_heads(model.peers(images).logits)


if __name__ == "__main__":
    main(MCLOKD)
