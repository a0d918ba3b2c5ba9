"""CL-ILR, ONE and OKDDip: losses against float64 re-statements, ramp-up, module shapes, gradient flow,
parameter counts, every backbone family, and one short run of each script."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from data import Batch
from engine import parse_args, train
from losses import sigmoid_rampup
from models import create_model
from models.peers import PeerOutput
from train_cl_ilr import CLILR, cl_ilr_loss
from train_okddip import OKDDip, PeerAttention, okddip_loss
from train_one import ONE, Gate, one_loss

FAMILIES = ["resnet20", "resnet32", "resnet110", "resnet110_bottleneck", "wrn_16_2", "vgg16", "densenet40_12",
            "hcgnet_a1", "resnet18", "resnet34"]
FAST = ["--dataset", "synthetic", "--arch", "resnet20", "--subset", "128", "--batch-size", "64",
        "--eval-batch-size", "256", "--epochs", "1", "--gpu", "-1", "--no-progress", "--workers", "0"]


def make(cls, *argv, num_classes=10):
    torch.manual_seed(0)
    args = parse_args(cls, ["--arch", "resnet20", *argv])
    return cls(args, num_classes, n_train=64, image_size=32)


def batch(n=4, num_classes=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % num_classes, torch.arange(n))


# ---- float64 re-statements of the formulas (numpy, explicit loops) ------------------------------------------
def np_log_softmax(x):
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def np_softmax(x):
    return np.exp(np_log_softmax(x))


def np_ce(z, y):
    return -np.mean([np_log_softmax(z)[b, y[b]] for b in range(len(y))])


def np_kd_from_probs(student, p_teacher, T):
    """T^2 * mean_b sum_c p_t log(p_t / p_s)."""
    log_ps = np_log_softmax(student / T)
    total = 0.0
    for b in range(student.shape[0]):
        for c in range(student.shape[1]):
            total += p_teacher[b, c] * (np.log(p_teacher[b, c]) - log_ps[b, c])
    return T * T * total / student.shape[0]


def fixed_logits(n, B=3, C=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [3 * torch.randn(B, C, generator=g, dtype=torch.float64) for _ in range(n)]


# ---- losses -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_cl_ilr_loss_matches_float64(mode):
    logits, y, T = fixed_logits(4), torch.tensor([0, 3, 4]), 2.0
    z, yn = [t.numpy() for t in logits], y.numpy()
    ce = kd = 0.0
    for i in range(4):
        ce += 0.5 * np_ce(z[i], yn)
        others = [z[j] for j in range(4) if j != i]
        if mode == "logits":
            p_t = np_softmax((sum(others) / 3) / T)
        else:
            p_t = sum(np_softmax(o / T) for o in others) / 3
        kd += 0.5 * np_kd_from_probs(z[i], p_t, T)
    got = cl_ilr_loss(logits, y, T, mode)
    assert got["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert got["kd"].item() == pytest.approx(kd, rel=1e-5)


def test_one_loss_and_teacher_match_float64():
    logits, y, T, w = fixed_logits(3), torch.tensor([1, 2, 0]), 3.0, 0.3
    g = torch.softmax(torch.randn(3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64), 1)
    z, gn, yn = [t.numpy() for t in logits], g.numpy(), y.numpy()
    teacher = np.zeros_like(z[0])
    for b in range(3):
        for i in range(3):
            teacher[b] += gn[b, i] * z[i][b]
    teacher_t = sum(g[:, i, None] * logits[i] for i in range(3))
    assert np.allclose(teacher_t.numpy(), teacher)
    got = one_loss(logits, teacher_t, y, T, w)
    assert got["ce"].item() == pytest.approx(sum(np_ce(zi, yn) for zi in z), rel=1e-6)
    assert got["ce_teacher"].item() == pytest.approx(np_ce(teacher, yn), rel=1e-6)
    kd = sum(np_kd_from_probs(zi, np_softmax(teacher / T), T) for zi in z)
    assert got["kd"].item() == pytest.approx(w * kd, rel=1e-5)


def test_okddip_attention_and_loss_match_float64():
    B, n, C, K, T, w = 2, 3, 16, 5, 3.0, 0.7
    g = torch.Generator().manual_seed(3)
    attention = PeerAttention(C).double()
    with torch.no_grad():
        attention.query.weight.copy_(torch.randn(C // 8, C, generator=g))
        attention.key.weight.copy_(torch.randn(C // 8, C, generator=g))
    feats = [torch.randn(B, C, generator=g, dtype=torch.float64) for _ in range(n)]
    peers = fixed_logits(n, B, K, seed=4)
    targets, A = attention(feats, peers)
    Wq, Wk = attention.query.weight.detach().numpy(), attention.key.weight.detach().numpy()
    h, z = [f.numpy() for f in feats], [p.numpy() for p in peers]
    for b in range(B):
        for i in range(n):
            e = np.array([np.dot(Wq @ h[i][b], Wk @ h[j][b]) for j in range(n)])   # no 1/sqrt(d)
            a = np.exp(e - e.max()) / np.exp(e - e.max()).sum()
            assert np.allclose(A[b, i].detach().numpy(), a, rtol=1e-10)
            x = sum(a[j] * z[j][b] for j in range(n))
            assert np.allclose(targets[i][b].detach().numpy(), x, rtol=1e-10)
    leader, y = fixed_logits(1, B, K, seed=9)[0], torch.tensor([4, 1])
    leader_target = torch.stack(peers).mean(0)
    got = okddip_loss(peers, leader, targets, leader_target, y, T, w)
    xn = [t.detach().numpy() for t in targets]
    assert got["ce"].item() == pytest.approx(sum(np_ce(zi, y.numpy()) for zi in z), rel=1e-6)
    assert got["ce_leader"].item() == pytest.approx(np_ce(leader.numpy(), y.numpy()), rel=1e-6)
    kd_peers = sum(np_kd_from_probs(z[i], np_softmax(xn[i] / T), T) for i in range(n))
    kd_leader = np_kd_from_probs(leader.numpy(), np_softmax(sum(z) / n / T), T)
    assert got["kd_peers"].item() == pytest.approx(w * kd_peers, rel=1e-5)
    assert got["kd_leader"].item() == pytest.approx(w * kd_leader, rel=1e-5)


def test_rampup_values_and_their_use():
    assert [sigmoid_rampup(e, 80) for e in (0, 40, 80)] == pytest.approx([0.006738, 0.286505, 1.0], abs=1e-6)
    assert math.exp(-5 * (1 - 40 / 80) ** 2) == pytest.approx(0.286505, abs=1e-6)
    b = batch()
    for method, key in ((make(OKDDip), "kd_peers"), (make(ONE, "--preset", "paper"), "kd"),
                        (make(ONE), "kd")):
        kd = {e: method.loss(method.model, b, e)[key].item() for e in (0, 40, 80, 200)}
        w = [sigmoid_rampup(e, method.args.rampup) for e in (0, 40, 80)]
        assert [kd[0] / kd[200], kd[40] / kd[200], kd[80] / kd[200]] == pytest.approx(w, rel=1e-4)
    assert w == [1.0, 1.0, 1.0]   # the MCL-OKD ONE: no ramp-up


# ---- modules ----------------------------------------------------------------------------------------------------
def test_gate_matches_float64_and_shapes():
    gate = Gate(6, 4).double().train()
    x = torch.randn(5, 6, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    g = gate(x).detach().numpy()
    pooled = x.numpy().mean(axis=(2, 3))
    lin = pooled @ gate.fc.weight.detach().numpy().T + gate.fc.bias.detach().numpy()
    bn = (lin - lin.mean(0)) / np.sqrt(lin.var(0) + gate.norm.eps)     # train mode: biased batch variance
    assert np.allclose(g, np_softmax(np.maximum(bn, 0.0)), rtol=1e-8)
    one = make(ONE)
    out = one.model(batch(3).images)
    assert out.gate.shape == (3, 4) and torch.allclose(out.gate.sum(1), torch.ones(3))
    assert one.model.gate.fc.in_features == one.model.peers.trunk_width == 32
    teacher = sum(out.gate[:, i, None].double() * z.double() for i, z in enumerate(out.logits))
    assert torch.allclose(out.teacher.double(), teacher, atol=1e-5)
    one.model.eval()
    assert list(one.eval_logits(one.model, batch(2).images)) == ["peer1", "peer2", "peer3", "peer4",
                                                                  "ensemble", "teacher"]


def test_okddip_attention_shapes_and_heads():
    m = make(OKDDip, "--num-peers", "5")
    out = m.model(batch(3).images)
    assert len(out.peers) == 4 and out.leader.shape == (3, 10) and len(out.targets) == 4
    assert out.attention.shape == (3, 4, 4) and torch.allclose(out.attention.sum(-1), torch.ones(3, 4))
    assert m.model.attention.query.weight.shape == (64 // 8, 64) and m.model.attention.query.bias is None
    m.model.eval()
    heads = m.eval_logits(m.model, batch(2).images)
    assert list(heads) == ["peer1", "peer2", "peer3", "peer4", "leader", "ensemble"]
    total = torch.stack([heads[f"peer{i}"] for i in range(1, 5)] + [heads["leader"]]).sum(0)
    assert torch.equal(heads["ensemble"].argmax(1), total.argmax(1))   # the official sum, same argmax


def test_okddip_needs_two_peers_and_a_leader(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train(OKDDip, FAST + ["--num-peers", "2", "--out", str(tmp_path)])
    assert "argument --num-peers: must lie in [3, 256]; got 2" in capsys.readouterr().err


# ---- gradients --------------------------------------------------------------------------------------------------
class _PlainTree(nn.Module):
    """The same tree without backprop rescaling: trunk -> group -> branch."""

    def __init__(self, peers):
        super().__init__()
        self.p = peers

    def forward(self, x):
        t, _ = self.p.trunk(x)
        groups = [g(t) for g in self.p.groups]
        logits = [b(groups[self.p.group_of[i]]) for i, b in enumerate(self.p.branches)]
        return PeerOutput(logits, None, None, t)


def _grads(module):
    return {k: p.grad.clone() for k, p in module.named_parameters()}


@pytest.mark.parametrize("n", [4, 3])
def test_cl_ilr_gradients_are_rescaled_through_the_method(n):
    m = make(CLILR, "--num-peers", str(n))
    peers, b = m.model, batch()
    grads = []
    for model in (peers, _PlainTree(peers)):
        peers.zero_grad(set_to_none=True)
        sum(m.loss(model, b, 0).values()).backward()
        grads.append(_grads(peers))
    scaled, plain = grads
    assert len(peers.groups) == (n + 1) // 2
    for k in plain:
        if k.startswith("branches."):
            factor = 1.0
        elif k.startswith("groups."):
            factor = 0.5 if peers.branch_consumers(int(k.split(".")[1])) == 2 else 1.0
        elif n == 4:   # trunk: every path crosses the trunk's and one group's rescaling
            factor = 0.25
        else:
            continue
        assert torch.allclose(scaled[k], factor * plain[k], rtol=1e-4, atol=1e-7), k
    assert any(plain[k].abs().sum() > 0 for k in plain if k.startswith("trunk."))


def test_one_teacher_is_detached_in_kd_but_trained_by_ce():
    m = make(ONE)
    terms = m.loss(m.model, batch(), 0)
    terms["kd"].backward(retain_graph=True)
    assert all(p.grad is None for p in m.model.gate.parameters())
    assert m.model.peers.branches[0].head.fc.weight.grad.abs().sum() > 0    # the students do learn
    terms["ce_teacher"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.model.gate.parameters())


@pytest.mark.parametrize("mode", ["none", "all", "peers"])
def test_okddip_gradients_through_targets(mode):
    from losses import kd_loss
    m = make(OKDDip, "--detach-targets", mode)
    out = m.model(batch().images)
    net, T = m.model, m.args.kd_T
    # KD of peer 1 alone: does it reach peer 2's branch (only through the target) and the attention?
    kd_loss(out.peers[0], out.targets[0], T, detach=False).backward(retain_graph=True)
    other = net.peers.branches[1].head.fc.weight.grad
    reaches_other = other is not None and other.abs().sum() > 0
    attention_grad = net.attention.query.weight.grad
    trains_attention = attention_grad is not None and attention_grad.abs().sum() > 0
    assert reaches_other == (mode == "none")
    assert trains_attention == (mode in ("none", "peers"))
    net.zero_grad(set_to_none=True)
    kd_loss(out.leader, out.leader_target, T, detach=False).backward()
    peer_grad = net.peers.branches[0].head.fc.weight.grad
    assert (peer_grad is not None and peer_grad.abs().sum() > 0) == (mode == "none")
    assert all(p.requires_grad for p in net.attention.parameters()) == (mode != "all")   # frozen when constant


def test_okddip_method_loss_trains_the_attention_by_default():
    m = make(OKDDip)
    m.loss(m.model, batch(), 100)["kd_peers"].backward()
    assert all(p.grad.abs().sum() > 0 for p in m.model.attention.parameters())


# ---- sizes ------------------------------------------------------------------------------------------------------
def _count(*modules):
    return sum(p.numel() for mod in modules for p in mod.parameters())


def test_parameter_counts_resnet32_n4():
    net = create_model("resnet32", num_classes=100)
    assert _count(net) == 472_756
    st = list(net.stages)
    one_trunk, one_branch = _count(net.stem, *st[:2]), _count(st[2], net.head)
    gate = 32 * 4 + 4 + 2 * 4          # Linear(32 -> 4) + BatchNorm1d(4)
    attention = 2 * 64 * 8             # W_q, W_k: 64 -> 8, no bias
    for cls, expected in ((ONE, one_trunk + 4 * one_branch + gate),
                          (OKDDip, one_trunk + 4 * one_branch + attention),
                          (CLILR, _count(net.stem, st[0]) + 2 * _count(st[1]) + 4 * one_branch)):
        m = make(cls, "--arch", "resnet32", num_classes=100)
        assert _count(m.model) == expected, cls.name
    assert one_trunk + one_branch == 472_756


# ---- every family, any N ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.slow
def test_every_family_forward_backward(arch):
    b = batch(2)
    for cls, n in ((CLILR, 2), (ONE, 2), (OKDDip, 3)):   # the smallest N of each; other N below
        m = make(cls, "--arch", arch, "--num-peers", str(n))
        m.model.train()
        terms = m.loss(m.model, b, 100)
        total = sum(terms.values())
        assert torch.isfinite(total)
        total.backward()
        missing = [k for k, p in m.model.named_parameters() if p.grad is None]
        assert not missing, (cls.name, arch, missing[:5])
        m.model.eval()
        with torch.no_grad():
            heads = m.eval_logits(m.model, b.images)
        assert all(v.shape == (2, 10) for v in heads.values()) and m.best_metric in heads


@pytest.mark.parametrize("cls,n", [(CLILR, 2), (CLILR, 5), (ONE, 5), (OKDDip, 5)])
def test_any_number_of_peers(cls, n):
    m = make(cls, "--num-peers", str(n))
    terms = m.loss(m.model, batch(2), 0)
    sum(terms.values()).backward()
    m.model.eval()
    heads = m.eval_logits(m.model, batch(2).images)
    singles = [h for h in heads if h.startswith("peer")] + (["leader"] if cls is OKDDip else [])
    assert len(singles) == n and "ensemble" in heads


# ---- the scripts end to end -------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,heads", [
    (CLILR, ["peer1", "peer2", "peer3", "ensemble"]),
    (ONE, ["peer1", "peer2", "peer3", "ensemble", "teacher"]),
    (OKDDip, ["peer1", "peer2", "leader", "ensemble"]),
])
@pytest.mark.slow
def test_script_runs_end_to_end(cls, heads, tmp_path):
    results = train(cls, FAST + ["--num-peers", "3", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "finished" and saved["method"] == cls.name
    assert saved["selection"]["metric"] == f"{cls.best_metric}/top1"
    for head in heads:
        assert f"{head}/top1" in saved["last"]["test"] and f"{head}/top1" in results["best"]["test"]
    assert len([k for k in saved["last"]["test"] if k.endswith("/top1")]) == len(heads)
    assert all(math.isfinite(v) for v in saved["history"][0]["train"].values())
