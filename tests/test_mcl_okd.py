"""MCL-OKD: the NCE loss and memory update against a float64 re-statement, the class-aware negative
sampler's distribution, the memory-saving scores, checkpoint/resume of the banks, every backbone family,
and a short end-to-end run."""
import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train_mcl_okd
from data import Batch
from engine import parse_args, train
from engine.checkpoint import load_checkpoint
from losses.contrast_memory import ClassNegativeSampler, bank_scores, nce_equal_scores, nce_loss
from train_mcl_okd import MCLOKD
from toy_methods import build_method, interrupted

REPO = Path(__file__).resolve().parent.parent
FAST = ["--dataset", "synthetic", "--arch", "resnet20", "--subset", "128", "--batch-size", "32",
        "--eval-batch-size", "256", "--gpu", "-1", "--no-progress", "--workers", "0"]


def make_method(argv, labels, num_classes):
    return build_method(MCLOKD, ["--gpu", "-1", "--dataset", "synthetic"] + argv, num_classes, len(labels),
                        train_labels=labels)


# ---- the loss and the memory update, against explicit float64 loops --------------------------------

def reference_step(M, E, index, contrast, n_data, tau, mom, eps=1e-7):
    """docs/mcl_okd.md (MCL-OKD mcl/), written again: M N x n x d, E N x B x d (float64, E requires grad).
    Returns (loss, updated memory)."""
    N, B, K1 = E.shape[0], E.shape[1], contrast.shape[1]
    K = K1 - 1
    loss = 0.0
    for a in range(N):
        for b in range(a + 1, N):
            for mem, anc in ((a, b), (b, a)):
                s = [[torch.dot(M[mem, int(contrast[n, k])], E[anc, n]) for k in range(K1)] for n in range(B)]
                P = [[torch.exp(s[n][k] / tau) for k in range(K1)] for n in range(B)]
                Z = n_data * sum(P[n][k] for n in range(B) for k in range(K1)).detach() / (B * K1)
                total = 0.0
                for n in range(B):
                    p0 = P[n][0] / Z
                    total = total + torch.log(p0 / (p0 + K / n_data + eps))
                    for k in range(1, K1):
                        pk = P[n][k] / Z
                        total = total + torch.log((K / n_data) / (pk + K / n_data + eps))
                loss = loss - total / B
    new = M.clone()
    for a in range(N):
        for j in range(B):
            v = mom * M[a, int(index[j])] + (1 - mom) * E[a, j].detach()
            new[a, int(index[j])] = v / torch.sqrt((v * v).sum())
    return loss, new


def test_mcl_loss_and_update_match_float64_loops():
    torch.manual_seed(0)
    n, C, N, B, d, K = 50, 5, 4, 4, 8, 6
    labels = torch.arange(n) % C
    m = make_method(["--feat-dim", str(d), "--nce-k", str(K), "--nce-t", "0.1"], labels, C)
    assert m.memory.banks.shape == (N, n, d)
    ref_M = m.memory.banks.double().clone()
    index1 = torch.tensor([3, 17, 22, 40])
    # Negatives that hit other anchors of the batch: rows the memory update of the same step overwrites.
    contrast1 = torch.cat([index1[:, None], torch.randint(n, (B, K))], 1)
    contrast1[0, 1], contrast1[1, 2], contrast1[2, 3] = 17, 40, 3
    index2 = torch.tensor([17, 5, 40, 9])      # two rows updated by step 1
    contrast2 = torch.cat([index2[:, None], torch.randint(n, (B, K))], 1)
    contrast2[1, 1], contrast2[3, 2] = 22, 3
    for index, contrast in ((index1, contrast1), (index2, contrast2)):
        e = F.normalize(torch.randn(N, B, d), dim=-1)
        e_impl, e_ref = e.clone().requires_grad_(), e.double().clone().requires_grad_()
        loss = m.mcl_loss(e_impl, index, contrast)
        loss.backward()
        with torch.no_grad():
            m.after_step(m.model, None, 0)     # the memory update, after the step as in the engine
        ref_loss, ref_M = reference_step(ref_M, e_ref, index, contrast, n, 0.1, 0.5)
        ref_loss.backward()
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
        torch.testing.assert_close(e_impl.grad.double(), e_ref.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(m.memory.banks.double(), ref_M, rtol=1e-5, atol=1e-6)
    assert torch.allclose(m.memory.banks[:, index1].norm(dim=-1), torch.ones(N, B))   # updated rows normalised


def test_bank_scores_chunked_equal_plain_autograd():
    torch.manual_seed(1)
    bank, contrast = torch.randn(30, 5), torch.randint(30, (6, 9))
    emb = torch.randn(3, 6, 5)
    e1, e2 = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    ref = torch.einsum("nkd,jnd->jnk", bank[contrast], e1)
    got = bank_scores(bank, contrast, e2, max_elems=9 * 5)   # one row per chunk
    torch.testing.assert_close(got, ref)
    w = torch.randn_like(ref)
    (ref * w).sum().backward()
    (got * w).sum().backward()
    torch.testing.assert_close(e2.grad, e1.grad)


def test_bank_changed_before_backward_is_an_error():
    """The memory update belongs after the step: a bank modified between scoring and backward would give
    the gradient of the wrong bank, so autograd refuses."""
    bank, contrast = torch.randn(30, 5), torch.randint(30, (6, 9))
    emb = torch.randn(3, 6, 5, requires_grad=True)
    scores = bank_scores(bank, contrast, emb)
    bank[4] = 0.0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        scores.sum().backward()


def test_equal_scores_give_the_sanity_value():
    assert nce_equal_scores(256) == pytest.approx(6.55, abs=5e-3)
    assert nce_equal_scores(16384) == pytest.approx(10.70, abs=5e-3)
    for K, n in ((256, 50000), (16384, 50000), (6, 50)):
        s = torch.full((2, 3, K + 1), 0.37)               # two score tensors, B = 3
        exact = -(math.log((1 / n) / (1 / n + K / n + 1e-7)) + K * math.log((K / n) / (1 / n + K / n + 1e-7)))
        assert nce_loss(s, n, 0.1).item() == pytest.approx(2 * exact, rel=2e-5)
        assert exact == pytest.approx(nce_equal_scores(K), rel=1e-3)
    # Through the method: identical bank rows make every score equal, so each of the N(N-1) terms is the value.
    labels = torch.arange(50) % 5
    m = make_method(["--feat-dim", "8", "--nce-k", "6"], labels, 5)
    m.memory.banks[:] = F.normalize(torch.ones(8), dim=0)
    e = F.normalize(torch.randn(4, 1, 8), dim=-1).expand(4, 4, 8)    # the same embedding in every row
    index = torch.tensor([0, 1, 2, 3])
    loss = m.mcl_loss(e, index, m.sampler(index))
    assert loss.item() == pytest.approx(12 * nce_equal_scores(6), rel=1e-3)


# ---- negative sampling ----------------------------------------------------------------------------

def uneven_labels():
    g = torch.Generator().manual_seed(3)
    labels = torch.repeat_interleave(torch.arange(5), torch.tensor([3, 5, 8, 4, 10]))
    return labels[torch.randperm(len(labels), generator=g)]


def chi_square_ok(counts: torch.Tensor, expected: float) -> bool:
    df = counts.numel() - 1
    stat = ((counts.double() - expected) ** 2 / expected).sum().item()
    return stat < df + 6 * math.sqrt(2 * df)


@pytest.mark.parametrize("mode", ["exact", "relax"])
def test_negatives_other_class_distinct_reachable_uniform(mode):
    torch.manual_seed(4)
    labels, K, reps = uneven_labels(), 10, 300
    n = len(labels)
    sampler = ClassNegativeSampler(labels, K, mode)
    # Memory: O(n + classes), no per-class negative lists.
    assert sum(b.numel() for b in sampler.buffers()) <= 2 * n + 3 * 5
    index = torch.arange(n).repeat(reps)
    c = sampler(index)
    assert c.shape == (n * reps, K + 1) and c.dtype == torch.int64
    neg, pos = c[:, 1:], c[:, 0]
    assert (labels[neg] != labels[index][:, None]).all()
    s = neg.sort(dim=1).values
    assert (s[:, 1:] != s[:, :-1]).all()                                # no repeat within a row
    for cls in range(5):
        rows = labels[index] == cls
        pool = (labels != cls).nonzero().flatten()
        counts = torch.bincount(neg[rows].flatten(), minlength=n)[pool]
        assert (counts > 0).all()                                       # every other-class sample reachable
        assert counts.sum() == rows.sum() * K
        assert chi_square_ok(counts, rows.sum().item() * K / len(pool))
    if mode == "exact":
        assert torch.equal(pos, index)
    else:
        assert (labels[pos] == labels[index]).all()
        assert (pos == index).any() and (pos != index).any()
        for anchor in (0, 7):                                           # uniform over the anchor's class
            members = (labels == labels[anchor]).nonzero().flatten()
            counts = torch.bincount(pos[index == anchor], minlength=n)[members]
            assert counts.sum() == reps and chi_square_ok(counts, reps / len(members))


def test_negative_subsets_are_uniform():
    """Without replacement, every K-subset of the pool is equally likely (10 subsets of 2 from 5)."""
    torch.manual_seed(5)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
    sampler = ClassNegativeSampler(labels, 2)
    c = sampler(torch.zeros(20000, dtype=torch.int64))
    pairs = c[:, 1:].sort(dim=1).values
    code = pairs[:, 0] * 8 + pairs[:, 1]
    subsets = [a * 8 + b for a, b in itertools.combinations(range(3, 8), 2)]
    counts = torch.stack([(code == s).sum() for s in subsets])
    assert counts.sum() == 20000 and chi_square_ok(counts, 2000)


def test_k_beyond_the_pool_falls_back_to_replacement():
    torch.manual_seed(6)
    labels = torch.arange(12) % 3                                       # pools of 8
    index = torch.arange(12).repeat(20)
    c = ClassNegativeSampler(labels, 20)(index)                         # K > pool: with replacement
    assert c.shape == (240, 21)
    assert (labels[c[:, 1:]] != labels[index][:, None]).all()
    for cls in range(3):
        assert set(c[labels[index] == cls, 1:].flatten().tolist()) == set((labels != cls).nonzero().flatten().tolist())
    c = ClassNegativeSampler(labels, 8)(index)                          # K = pool: the whole pool, once
    for row, i in zip(c, index):
        assert sorted(row[1:].tolist()) == (labels != labels[i]).nonzero().flatten().tolist()
    with pytest.raises(ValueError, match="same class"):
        ClassNegativeSampler(torch.zeros(5, dtype=torch.int64), 2)


# ---- defaults, structure, DOT -----------------------------------------------------------------------

def test_defaults_resolve_from_arch_and_dataset():
    def resolved(argv):
        a = parse_args(MCLOKD, argv)
        MCLOKD.check_args(a)
        return a
    a = resolved(["--arch", "resnet32"])
    assert (a.nce_k, a.nce_t, a.nce_m, a.feat_dim, a.kd_T, a.gamma, a.alpha, a.beta, a.num_peers, a.mode) == \
        (256, 0.1, 0.5, 128, 3.0, 1.0, 1.0, 0.025, 4, "exact")
    assert (a.recipe, a.lr, a.batch_size, a.epochs, a.weight_decay, a.nesterov) == ("mcl-okd", 0.05, 64, 300, 5e-4, True)
    assert [resolved(["--arch", x]).nce_k for x in ("resnet110_bottleneck", "densenet40_12", "vgg16", "hcgnet_a1",
                                                    "resnet18", "resnet50")] == [256, 256, 16384, 16384, 16384, 16384]
    with pytest.warns(UserWarning, match="mcl-okd-imagenet"):
        a = resolved(["--arch", "resnet34", "--dataset", "imagenet"])
    assert (a.nce_t, a.nce_k) == (0.07, 16384)
    a = resolved(["--arch", "resnet34", "--dataset", "imagenet", "--recipe", "mcl-okd-imagenet", "--nce-t", "0.2"])
    assert (a.nce_t, a.lr, a.batch_size, a.epochs, a.weight_decay) == (0.2, 0.05, 128, 100, 1e-4)


def test_dot_teaches_only_the_last_branch():
    torch.manual_seed(7)
    labels = torch.arange(16) % 4
    m = make_method(["--arch", "resnet20", "--gamma", "0", "--beta", "0"], labels, 4)
    index = torch.arange(4)
    terms = m.loss(m.model, Batch(torch.randn(4, 3, 32, 32), labels[index], index), 0)
    assert set(terms) == {"ce", "dot", "mcl"} and terms["ce"].item() == 0 and terms["mcl"].item() == 0
    sum(terms.values()).backward()
    heads = [branch.head for branch in m.model.peers.branches]
    grads = [sum(p.grad.abs().sum().item() for p in h.parameters() if p.grad is not None) for h in heads]
    assert grads[:-1] == [0, 0, 0] and grads[-1] > 0


def test_embedding_head_sizes_match_the_official_models():
    """Parameters of the 4 official heads Linear(C_feat -> 128) for each official backbone."""
    from models import create_model
    expected = {"densenet40_12": 68096, "resnet32": 33280, "vgg16": 262656, "resnet110_bottleneck": 131584,
                "hcgnet_a1": 212480, "resnet34": 262656}
    for arch, count in expected.items():
        head = train_mcl_okd.EmbedHead(create_model(arch, num_classes=100).feature_dim, 128)
        assert 4 * sum(p.numel() for p in head.parameters()) == count, arch


@pytest.mark.parametrize("arch", ["resnet20", "resnet110_bottleneck", "wrn_16_2", "vgg16", "densenet40_12",
                                  "hcgnet_a1", "resnet18"])
def test_every_backbone_family_trains(arch):
    torch.manual_seed(8)
    labels = torch.arange(12) % 3
    m = make_method(["--arch", arch, "--feat-dim", "16"], labels, 3)
    assert isinstance(m.model.peers.trunk, torch.nn.Module) and len(m.model.embed) == 4
    assert m.model.embed[0].linear.in_features == m.model.peers.feature_dim
    index = torch.tensor([0, 4, 8, 1])
    before = m.memory.banks.clone()
    terms = m.loss(m.model, Batch(torch.randn(4, 3, 32, 32), labels[index], index), 0)
    total = sum(terms.values())
    assert torch.isfinite(total)
    total.backward()
    for head in m.model.embed:
        assert head.linear.weight.grad is not None and head.linear.weight.grad.abs().sum() > 0
    assert torch.equal(m.memory.banks, before)          # the banks change after the step, not in the loss
    with torch.no_grad():
        m.after_step(m.model, None, 0)
    changed = (m.memory.banks != before).any(dim=-1).any(dim=0)
    assert torch.equal(changed.nonzero().flatten(), index.sort().values)
    heads = m.eval_logits(m.model.eval(), torch.randn(2, 3, 32, 32))
    assert set(heads) == {"peer1", "peer2", "peer3", "peer4", "ensemble"}


# ---- end to end, checkpoint and resume ---------------------------------------------------------------

@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    out = tmp_path_factory.mktemp("mcl_full")
    return out, train(MCLOKD, FAST + ["--epochs", "2", "--out", str(out)])


@pytest.mark.slow
def test_end_to_end_run(two_epochs):
    out, results = two_epochs
    assert results["status"] == "finished" and len(results["history"]) == 2
    assert set(results["history"][0]["train"]) >= {"ce", "dot", "mcl", "loss"}
    assert all(math.isfinite(v) for h in results["history"] for v in h["train"].values())
    for head in ("peer1", "peer2", "peer3", "peer4", "ensemble"):
        assert f"{head}/top1" in results["best"]["test"]
    assert (results["args"]["nce_k"], results["args"]["nce_t"], results["recipe"]["name"]) == (256, 0.1, "mcl-okd")
    state = load_checkpoint(out / "last.pt")["state"]
    assert state["memory"]["banks"].shape == (4, 128, 128)
    assert "embed.3.linear.weight" in state["model"]


_InterruptedMCL = interrupted(MCLOKD, 1)


class _RecordingMCL(MCLOKD):
    seen = {}

    def train_step(self, model, batch, epoch, step):
        if epoch not in _RecordingMCL.seen:   # the state the epoch starts from
            _RecordingMCL.seen[epoch] = (self.memory.banks.clone(),
                                       {k: v.clone() for k, v in self.model.embed.state_dict().items()})
        return super().train_step(model, batch, epoch, step)


@pytest.mark.slow
def test_resume_restores_memory_and_heads(two_epochs, tmp_path):
    out_full, full = two_epochs
    with pytest.raises(KeyboardInterrupt):      # the same 2-epoch run, stopped after epoch 1
        train(_InterruptedMCL, FAST + ["--epochs", "2", "--out", str(tmp_path)])
    saved = load_checkpoint(tmp_path / "last.pt")["state"]
    resumed = train(_RecordingMCL, FAST + ["--epochs", "2", "--out", str(tmp_path), "--resume", "auto"])
    banks, heads = _RecordingMCL.seen[1]
    assert torch.equal(banks, saved["memory"]["banks"])
    assert all(torch.equal(v, saved["model"][f"embed.{k}"]) for k, v in heads.items())
    # ... and the resumed run continues exactly as the uninterrupted one.
    for term in ("loss", "ce", "dot", "mcl"):
        assert resumed["history"][1]["train"][term] == full["history"][1]["train"][term]
    assert resumed["history"][1]["test"] == full["history"][1]["test"]
    a, b = load_checkpoint(out_full / "last.pt")["state"], load_checkpoint(tmp_path / "last.pt")["state"]
    assert torch.equal(a["memory"]["banks"], b["memory"]["banks"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.slow
def test_two_ranks_keep_identical_banks(tmp_path):
    """DDP (2 gloo processes): the heads are in the DDP module and every rank applies every rank's memory
    update, so parameters and banks stay bit-identical, and every sample's row is updated once per epoch."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "ddp_worker.py"), "train_mcl_okd", *FAST, "--epochs", "1", "--out", str(tmp_path)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True)["model"] for i in (0, 1))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["memory"]["banks"], b["memory"]["banks"])
    norms = a["memory"]["banks"].norm(dim=-1)                # updated rows are unit vectors; initial rows are not
    assert torch.allclose(norms, torch.ones_like(norms))
