"""KDCL: Online Knowledge Distillation via Collaborative Learning (Guo et al., CVPR 2020).

m independent students, possibly of different architectures (--arch resnet32,wrn_16_2), each on its own
random crop/flip of the image ("invariant collaborative learning"), all distilled from one shared soft target
z_t built from their logits and detached:

    L = sum_i [ CE(z_i, y) + lambda T^2 KL(softmax(z_t / T) || softmax(z_i / T)) ],   lambda = 1, T = 2 (CIFAR)

--ensemble picks z_t (Z = the students' logits on the batch, one row per student):
    naive     z_t = z_k, k = argmin_i CE(z_i, y) over the batch
    linear    z_t = sum_i a_i z_i, a = argmin_{a in simplex} CE(sum_i a_i z_i, y) on the batch (no backprop;
              projected gradient with a per-step line search, ``linear_weights``)
    minlogit  z_t[c] = min_i (z_i[c] - z_i[y]): each student's logits shifted so the true class is 0, then the
              element-wise minimum
    general   z_t = sum_i w_i z_i, w = C^-1 1 / (1^T C^-1 1), C_ij = mean_n <e_i,n, e_j,n> the error correlation
              of the students on the --val-split hold-out (e = softmax(z) - onehot(y)), recomputed each epoch

    python train_kdcl.py --arch resnet32 --gpu 0                                  # two ResNet-32, MinLogit
    python train_kdcl.py --arch resnet32,wrn_16_2 --gpu 0 --ensemble linear       # a heterogeneous pair
    python train_kdcl.py --arch resnet32 --gpu 0 --ensemble general --val-split 5000
    python train_kdcl.py --arch resnet50,mobilenet_v2 --dataset imagenet --data DIR --recipe imagenet   # T = 4
"""

import torch
import torch.nn.functional as F
from torch import nn

from engine import Method, UserError, main, non_negative, temperature
from losses import kd_loss
from models.peers import Peers

ENSEMBLES = ("naive", "linear", "minlogit", "general")


# ---- the soft targets (every function takes the students' logits as one m x B x C tensor) ----------------
def naive_target(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The logits of the student with the lowest cross-entropy on the batch (B x C)."""
    ce = torch.stack([F.cross_entropy(zi, labels) for zi in z])
    return z.index_select(0, ce.argmin().view(1)).squeeze(0)


def minlogit_target(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """min_i (z_i - z_i[y]) element-wise: the true class is 0, every other class its smallest margin (B x C)."""
    true = z.gather(2, labels.view(1, -1, 1).expand(z.shape[0], -1, 1))
    return (z - true).amin(0)


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of ``v`` (... x m) onto the probability simplex (sort-based)."""
    m = v.shape[-1]
    u = v.sort(dim=-1, descending=True).values
    css = u.cumsum(-1) - 1
    k = torch.arange(1, m + 1, device=v.device, dtype=v.dtype)
    rho = (u - css / k > 0).sum(-1, keepdim=True)            # at least 1: u_1 - (u_1 - 1) = 1 > 0
    theta = css.gather(-1, rho - 1) / rho
    return (v - theta).clamp_min(0)


def batch_ce(z: torch.Tensor, a: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE(sum_i a[s, i] z_i, y) on the batch for every row s of ``a`` (S x m) -> S."""
    mix = torch.einsum("sm,mbc->sbc", a, z)
    return (mix.logsumexp(2) - mix.gather(2, labels.view(1, -1, 1).expand(a.shape[0], -1, 1)).squeeze(2)).mean(1)


@torch.no_grad()
def linear_weights(z: torch.Tensor, labels: torch.Tensor, steps: int = 30, candidates: int = 16) -> torch.Tensor:
    """argmin over the simplex of CE(sum_i a_i z_i, y) on the batch (m weights), without back-propagation.

    CE of a linear combination is convex in a. Projected gradient descent from the uniform weights: the
    gradient g_i = mean_n <softmax(Z a)_n - onehot(y_n), z_i,n> is written out, and each step tries the moves
    a - t g / max|g| for t = 1, 1/2, ..., 2^-(candidates-1) (projected onto the simplex) and keeps the best of
    them and the current a, so CE never rises. All on the device, no host synchronisation."""
    z = z.float()
    m = z.shape[0]
    onehot = F.one_hot(labels, z.shape[2]).to(z.dtype)
    a = torch.full((m,), 1.0 / m, device=z.device, dtype=z.dtype)
    t = 2.0 ** -torch.arange(candidates, device=z.device, dtype=z.dtype)
    for _ in range(steps):
        p = torch.softmax(torch.einsum("m,mbc->bc", a, z), dim=1)
        g = torch.einsum("bc,mbc->m", p - onehot, z) / z.shape[1]
        tries = torch.cat([a[None], project_simplex(a - t[:, None] * (g / g.abs().max().clamp_min(1e-12)))])
        a = tries[batch_ce(z, tries, labels).argmin()]
    return a


def linear_target(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.einsum("m,mbc->bc", linear_weights(z, labels), z.float())


def error_correlation_weights(logits: torch.Tensor, labels: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """Generalized-ensemble weights w = C^-1 1 / (1^T C^-1 1) from the students' logits on a hold-out set
    (m x N x C): C_ij = mean_n <e_i,n, e_j,n>, e = softmax(z) - onehot(y). Computed in float64; a ridge of
    ``ridge`` x mean(diag C) keeps C invertible when two students err alike."""
    z = logits.double()
    e = torch.softmax(z, dim=2) - F.one_hot(labels, z.shape[2]).double()
    c = torch.einsum("inc,jnc->ij", e, e) / z.shape[1]
    c = c + ridge * c.diagonal().mean() * torch.eye(len(c), dtype=c.dtype, device=c.device)
    w = torch.linalg.solve(c, torch.ones(len(c), dtype=c.dtype, device=c.device))
    return w / w.sum()


class GeneralWeights(nn.Module):
    """The General ensemble's weights as a buffer (checkpointed, restored on resume); uniform until the first
    epoch's hold-out statistics exist."""

    def __init__(self, m: int):
        super().__init__()
        self.register_buffer("weights", torch.full((m,), 1.0 / m))


# ---- the method ------------------------------------------------------------------------------------------
class KDCL(Method):
    """KDCL: independent students on their own augmented views, distilled from one detached ensemble target."""

    recipe = "okddip"           # the protocol under which PCL's paper re-ran KDCL (its table's KDCL column)
    num_peers = 2
    min_peers = 2
    mixed_archs = True
    state_keys = ("general",)

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument("--ensemble", choices=ENSEMBLES, default="minlogit", help="how the soft target is made")
        parser.add_argument("--kd-T", type=temperature, default=None,
                            help="temperature T (default: 4 on ImageNet, else 2)")
        parser.add_argument("--kd-lambda", type=non_negative, default=1.0,
                            help="weight lambda of the distillation term")
        parser.add_argument("--same-view", action="store_true",
                            help="ablation: every student sees the same augmented image (no per-student views)")

    @classmethod
    def unused_flags(cls, a):
        return dict.fromkeys(("kd_T", "ensemble"), "--kd-lambda 0 turns distillation off") if a.kd_lambda == 0 else {}

    @classmethod
    def check_args(cls, args):
        if args.kd_T is None:
            args.kd_T = 4.0 if args.dataset == "imagenet" else 2.0
        if args.ensemble == "general" and not args.val_split:
            raise UserError("--ensemble general weighs the students by their error correlation on a hold-out set: "
                            "add --val-split N (e.g. --val-split 5000)")
        args.views = 1 if args.same_view else args.num_peers     # one augmented view per student

    def build(self):
        a = self.args
        self.general = GeneralWeights(a.num_peers)
        return Peers(a.arch, self.num_classes, a.num_peers, "independent", image_size=self.image_size)

    @torch.no_grad()
    def target(self, logits: list, labels: torch.Tensor) -> torch.Tensor:
        """The shared soft target z_t (B x C, float32, no gradient) from the students' logits."""
        z = torch.stack([zi.detach().float() for zi in logits])
        kind = self.args.ensemble
        if kind == "naive":
            return naive_target(z, labels)
        if kind == "linear":
            return linear_target(z, labels)
        if kind == "minlogit":
            return minlogit_target(z, labels)
        return torch.einsum("m,mbc->bc", self.general.weights.to(z.dtype), z)

    def loss(self, model, batch, epoch):
        a = self.args
        logits = model(batch.images).logits          # student i on view i
        target = self.target(logits, batch.labels)
        return {"ce": sum(F.cross_entropy(z, batch.labels) for z in logits),
                "kd": a.kd_lambda * sum(kd_loss(z, target, a.kd_T) for z in logits)}

    def on_epoch_end(self, epoch, evaluator):
        """General: the next epoch's weights from the students' error correlation on the hold-out split."""
        if self.args.ensemble != "general":
            return
        heads, labels = evaluator.predict("val")
        z = torch.stack([heads[f"peer{i + 1}"] for i in range(self.args.num_peers)])
        self.general.weights.copy_(error_correlation_weights(z, labels).to(self.general.weights))


if __name__ == "__main__":
    main(KDCL)
