"""Contrastive memory banks indexed by training-sample index (CRD / MCL-OKD style).

* :class:`ClassNegativeSampler`: for each anchor, the positive (the sample itself, or a random sample of
  its class) and K negatives drawn **from the other classes, without replacement**, on the training
  device, vectorised, with no per-class index lists (the official code's lists take ~5 GB on ImageNet).
* :func:`bank_scores`: s[j, n, k] = <bank[c[n, k]], e_j[n]> with the gathered bank rows never kept for
  backward (they are constants); the backward gathers them again. Peak extra memory is one chunk of
  gathered rows instead of B x (K+1) x d per score tensor.
* :func:`nce_loss`: CRD's NCE loss ("Eq. 11") with MCL-OKD's per-batch normaliser Z.
* :class:`MemoryBanks`: one n_data x d bank per view, with the momentum update.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

NCE_EPS = 1e-7
_GATHER_ELEMS = 1 << 24   # gathered floats per chunk in bank_scores (64 MiB in float32)


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ---- negative sampling ---------------------------------------------------------------------------

def draws_for_distinct(pools: torch.Tensor, k: int, log_fail: float = 40.0) -> int:
    """Number M of i.i.d. uniform draws from a pool of ``p`` values after which at least ``k`` distinct
    values have appeared, except with probability <= exp(-log_fail), for every pool size ``p`` in
    ``pools`` (each >= k).

    The draws needed for k distinct values, X, are a sum of independent geometrics with success
    probabilities (p - i)/p, i < k: mean mu = p (H_p - H_{p-k}), smallest probability q = (p-k+1)/p.
    Janson (2018, "Tail bounds for sums of geometric and exponential variables", Thm 2.1):
    P(X >= lam mu) <= exp(-q mu (lam - 1 - ln lam)); M = ceil(lam mu) with that bound = exp(-log_fail).
    """
    p = pools.double()
    if p.numel() == 0:
        return k
    mu = p * (torch.digamma(p + 1) - torch.digamma(p - k + 1))
    need = log_fail / (((p - k + 1) / p) * mu)          # lam - 1 - ln lam >= need
    lo, hi = torch.ones_like(p), torch.full_like(p, 2.0)
    while bool(((hi - 1 - hi.log()) < need).any()):
        hi = torch.where((hi - 1 - hi.log()) < need, hi * 2, hi)
    for _ in range(80):                                  # bisection: hi always satisfies the bound
        mid = (lo + hi) / 2
        ok = (mid - 1 - mid.log()) >= need
        hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid)
    return max(k, int(math.ceil((hi * mu).max().item())))


class ClassNegativeSampler(nn.Module):
    """Contrast indices for a batch: column 0 the positive, columns 1..K negatives of other classes.

    ``labels``: the class of every training sample, in sample-index order. ``mode``: ``exact`` (the
    positive is the anchor itself) or ``relax`` (a uniformly random sample of the anchor's class, possibly
    itself). As the official loader (``np.random.choice(cls_negative[y], K, replace=False)``), negatives
    are K distinct samples of the other classes, drawn uniformly; if K exceeds that pool they are drawn
    with replacement (``replace = K > len(pool)`` in the official code).

    Vectorised: the sample indices are sorted by class, so the pool of class c is that order with c's
    block [start_c, start_c + n_c) removed; a position p in [0, n - n_c) maps to p (p < start_c) or
    p + n_c. K distinct positions are the first K distinct values, in order of appearance, of M i.i.d.
    uniform draws, which is exactly uniform sampling without replacement; M is chosen so that fewer than K
    distinct values appear with probability < 1e-17 per row (:func:`draws_for_distinct`; in that event the
    row is completed with repeats instead of synchronising with the host). Memory: B x M integers,
    M ~ 1.07 K for ImageNet (K = 16384), ~1.3 K for CIFAR at K = 16384.
    """

    def __init__(self, labels: torch.Tensor, k: int, mode: str = "exact", num_classes: Optional[int] = None):
        super().__init__()
        if mode not in ("exact", "relax"):
            raise ValueError(f"mode must be 'exact' or 'relax'; got {mode!r}")
        if k < 1:
            raise ValueError(f"the number of negatives must be >= 1; got {k}")
        labels = torch.as_tensor(labels, dtype=torch.int64, device="cpu")   # (the host, whatever the default device)
        n = len(labels)
        counts = torch.bincount(labels, minlength=num_classes or 0)
        present = counts > 0
        pools = n - counts
        if bool((pools[present] == 0).any()):
            raise ValueError("every training sample has the same class: there are no negatives to sample")
        replace = k > pools
        self.k, self.mode, self.n = k, mode, n
        self.num_draws = draws_for_distinct(pools[present & ~replace], k)
        self.register_buffer("labels", labels, persistent=False)
        self.register_buffer("order", torch.argsort(labels, stable=True), persistent=False)
        self.register_buffer("starts", torch.cumsum(counts, 0) - counts, persistent=False)
        self.register_buffer("counts", counts, persistent=False)
        self.register_buffer("replace", replace, persistent=False)

    @staticmethod
    def _uniform(size, high: torch.Tensor) -> torch.Tensor:
        """Integers uniform on [0, high) per row (``high``: B); modulo bias < high / 2^62.

        Under DDP every rank's global generator is in the same state (same seed, same calls), so the
        draws are made for the rows of all ranks and each rank keeps its own slice: the ranks' negatives
        are independent, and a resumed run (which restores the generator) draws the same ones."""
        rank, world = _rank_and_world()
        rows = size[0]
        draws = torch.randint(1 << 62, (rows * world, *size[1:]), device=high.device)[rank * rows:(rank + 1) * rows]
        return draws % high.view(-1, *([1] * (len(size) - 1)))

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        """B x (K+1) int64 sample indices for the anchors ``index`` (B)."""
        y = self.labels[index]
        start, count = self.starts[y], self.counts[y]
        b, k, m = len(index), self.k, self.num_draws
        draws = self._uniform((b, m), self.n - count)                       # i.i.d. positions in the pool
        values, position = draws.sort(dim=1, stable=True)
        first = torch.ones_like(values, dtype=torch.bool)
        first[:, 1:] = values[:, 1:] != values[:, :-1]                      # first occurrence of each value
        key = torch.where(first, position, position + m)                    # first occurrences, in draw order
        distinct = values.gather(1, key.argsort(dim=1)[:, :k])
        pos = torch.where(self.replace[y][:, None], draws[:, :k], distinct)
        negatives = self.order[pos + (pos >= start[:, None]) * count[:, None]]
        if self.mode == "exact":
            positive = index
        else:
            positive = self.order[start + self._uniform((b,), count)]
        return torch.cat([positive[:, None], negatives], dim=1)


# ---- scores against a bank, without keeping the gathered rows ---------------------------------------

class _BankScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, emb, bank, contrast, chunk):
        with torch.autocast(emb.device.type, enabled=False):
            out = emb.new_empty(emb.shape[0], *contrast.shape)
            for r in range(0, contrast.shape[0], chunk):
                rows = bank[contrast[r:r + chunk]]                           # c x (K+1) x d, freed after use
                out[:, r:r + chunk] = torch.einsum("ckd,jcd->jck", rows, emb[:, r:r + chunk])
        # The bank is read again in backward; saved for backward, so autograd's version counter catches an
        # in-place update (the memory update) made before the backward has run.
        ctx.chunk, ctx.emb_shape = chunk, emb.shape
        ctx.save_for_backward(contrast, bank)
        return out

    @staticmethod
    def backward(ctx, grad):
        contrast, bank = ctx.saved_tensors
        grad_emb = grad.new_empty(ctx.emb_shape)
        with torch.autocast(grad.device.type, enabled=False):
            for r in range(0, contrast.shape[0], ctx.chunk):
                rows = bank[contrast[r:r + ctx.chunk]]
                grad_emb[:, r:r + ctx.chunk] = torch.einsum("jck,ckd->jcd", grad[:, r:r + ctx.chunk], rows)
        return grad_emb, None, None, None


def bank_scores(bank: torch.Tensor, contrast: torch.Tensor, emb: torch.Tensor,
                max_elems: int = _GATHER_ELEMS) -> torch.Tensor:
    """s[j, n, k] = <bank[contrast[n, k]], emb[j, n]>: J x B x (K+1), float32.

    ``bank`` n_data x d (a constant: no gradient), ``contrast`` B x (K+1) indices, ``emb`` J x B x d.
    The gradient reaches ``emb`` only: dL/de_j[n] = sum_k dL/ds[j, n, k] bank[contrast[n, k]], with the
    bank rows gathered again (chunks of at most ``max_elems`` floats) instead of kept from the forward.
    The bank must not change between this call and the backward (update it after the step, as
    MCL-OKD's ``after_step`` does); autograd raises if it was modified in place.
    """
    chunk = max(1, max_elems // (contrast.shape[1] * bank.shape[1]))
    return _BankScores.apply(emb.float(), bank.detach(), contrast, chunk)


# ---- the NCE loss ---------------------------------------------------------------------------------

def nce_loss(scores: torch.Tensor, n_data: int, tau: float, eps: float = NCE_EPS) -> torch.Tensor:
    """CRD's NCE loss with MCL-OKD's per-batch normaliser, summed over the leading dimensions.

    For each B x (K+1) score tensor s (column 0 the positive): P = exp(s/tau) / Z with
    Z = n_data * mean(exp(s/tau)) (a constant: detached, recomputed per tensor and per call), m = K,
    Pn = 1/n_data, and

        L = -(1/B) [ sum_n log(P_n0 / (P_n0 + m Pn + eps)) + sum_{n, k>=1} log(m Pn / (P_nk + m Pn + eps)) ].

    Computed in log space (softplus; Z through logsumexp), which is the same function without overflow
    and keeps one B x (K+1) tensor per score tensor for backward.
    """
    b, k1 = scores.shape[-2:]
    k = k1 - 1
    x = scores.float() / tau
    log_z = torch.logsumexp(x.detach().flatten(-2), dim=-1) + math.log(n_data) - math.log(b * k1)
    c = k / n_data + eps                                       # m Pn + eps
    u = x - (log_z[..., None, None] + math.log(c))             # log(P / c)
    log_pos = -F.softplus(-u[..., 0])                          # log(P / (P + c))
    log_neg = math.log((k / n_data) / c) - F.softplus(u[..., 1:])   # log(m Pn / (P + c))
    return -(log_pos.sum() + log_neg.sum()) / b


def nce_equal_scores(k: int) -> float:
    """The NCE loss of one score tensor whose scores are all equal (eps neglected): log(K+1) + K log(1+1/K)."""
    return math.log(k + 1) + k * math.log1p(1 / k)


# ---- the memory banks -------------------------------------------------------------------------------

class MemoryBanks(nn.Module):
    """``views`` banks of ``n_data`` x ``dim`` (buffer ``banks``: views x n_data x dim), initialised uniform in
    [-s, s] with s = 1/sqrt(dim/3) and not normalised (CRD / MCL-OKD ``ContrastMemory``)."""

    def __init__(self, views: int, n_data: int, dim: int):
        super().__init__()
        s = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("banks", torch.rand(views, n_data, dim).mul_(2 * s).sub_(s))

    @torch.no_grad()
    def update(self, index: torch.Tensor, emb: torch.Tensor, momentum: float) -> None:
        """banks[v, i] <- normalize(momentum * banks[v, i] + (1 - momentum) * emb[v, j]) for i = index[j].
        ``emb``: views x B x dim. Indices must be distinct (as in one epoch's batch)."""
        rows = self.banks[:, index].mul_(momentum).add_(emb.float().detach(), alpha=1 - momentum)
        self.banks.index_copy_(1, index, F.normalize(rows, dim=-1))


def all_gather_cat(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate ``t`` from every rank along ``dim`` (identity in a world of one). Not differentiable:
    for memory updates, which every rank then applies identically so the bank replicas stay equal."""
    world = _rank_and_world()[1]
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=dim)
