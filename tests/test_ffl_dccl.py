"""FFL (train_ffl.py) and DCCL (train_dccl.py): the losses against float64 re-statements, where the gradients go,
sizes against hand counts, grouped peers, every backbone family for one epoch, the recipes and resume."""
import copy
import json
import math

import numpy as np
import pytest
import torch

import data.synthetic
from data import Batch
from engine import Trainer, UserError, parse_args, train
from engine.checkpoint import load_checkpoint
from losses import kd_loss
from models import count_parameters
from models.fusion import FusionModule, peer_maps
from train_cmff import CMFF
from train_dccl import DCCL, DCCLNet, dccl_loss
from train_ffl import FFL, FFLNet, ffl_loss
from toy_methods import interrupted

FAST = ["--dataset", "synthetic", "--gpu", "-1", "--no-progress", "--workers", "0"]


# ---- float64 re-statements ----------------------------------------------------------------------------
def _softmax(v, T):
    e = np.exp(v / T - (v / T).max())
    return e / e.sum()


def _kd(student, teacher, T, eps=0.0):
    """T^2 * mean_n sum_k t (log t - log softmax(s/T)), t = softmax(teacher/T) + eps; eps = 0 is the KL."""
    s, t = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
    total = 0.0
    for n in range(s.shape[0]):
        p_t, p_s = _softmax(t[n], T) + eps, _softmax(s[n], T)
        total += sum(p_t[k] * (math.log(p_t[k]) - math.log(p_s[k])) for k in range(len(p_t)))
    return T * T * total / s.shape[0]


def _ce(z, y):
    z = np.asarray(z, np.float64)
    return float(np.mean([-math.log(_softmax(z[n], 1.0)[y[n]]) for n in range(len(y))]))


def _logits(n=3, B=4, C=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [3 * torch.randn(B, C, generator=g) for _ in range(n)], torch.randint(0, C, (B,), generator=g)


@pytest.mark.parametrize("eps", [0.0, 1e-7, 1e-2])
def test_kd_loss_with_the_official_target_eps(eps):
    (s, t), _ = _logits(2)
    assert kd_loss(s, t, 3.0, target_eps=eps).item() == pytest.approx(_kd(s, t, 3.0, eps), rel=1e-5)
    if eps == 1e-7:   # the official KLLoss is within 1e-5 of the exact KL on these logits
        assert abs(kd_loss(s, t, 3.0, target_eps=eps).item() - kd_loss(s, t, 3.0).item()) < 1e-5


def test_kl_gap_script_forms_by_hand_and_against_kd_loss():
    """scripts/kl_gap.py's float64 forms: equal uniform rows of K entries give exact 0 and official
    T^2 (1 + eps K) log(1 + eps K) (by hand: t = 1/K + eps, q = 1/K), with no gradient on either; random rows
    agree with kd_loss with and without target_eps."""
    from scripts.kl_gap import EPS, kd_forms
    K, T = 100_000, 3.0
    x = torch.zeros(2, K)
    exact, official, g2, dg2 = kd_forms(x, x, T)
    assert exact == pytest.approx(0.0, abs=1e-12)
    assert official == pytest.approx(T * T * (1 + EPS * K) * math.log(1 + EPS * K), rel=1e-9)
    assert g2 == pytest.approx(0.0, abs=1e-20) and dg2 == pytest.approx(0.0, abs=1e-20)
    (s, t), _ = _logits(2, B=3, C=7)
    exact, official, g2, dg2 = kd_forms(s, t, T)
    assert exact == pytest.approx(kd_loss(s, t, T).item(), rel=1e-5)
    assert official == pytest.approx(kd_loss(s, t, T, target_eps=EPS).item(), rel=1e-5)
    assert g2 > 0 and 0 < dg2 < 1e-6 * g2


@pytest.mark.parametrize("n,eps,w", [(2, 0.0, 1.0), (2, 1e-7, 0.3), (3, 0.0, 0.7)])
def test_ffl_loss_matches_float64_statement(n, eps, w):
    logits, y = _logits(n + 1, seed=n)
    z, f = logits[:n], logits[n]
    terms = ffl_loss(z, f, y, 3.0, w, eps)
    ens = np.mean([v.numpy().astype(np.float64) for v in z], axis=0)
    want = {"ce": sum(_ce(v, y) for v in z), "ce_fused": _ce(f, y),
            "kd": w * sum(_kd(v, f, 3.0, eps) for v in z), "kd_fused": w * _kd(f, ens, 3.0, eps)}
    assert set(terms) == set(want)
    for k in want:
        assert terms[k].item() == pytest.approx(want[k], rel=1e-5), k


@pytest.mark.parametrize("eps", [0.0, 1e-7])
def test_dccl_loss_matches_float64_statement(eps):
    logits, y = _logits(3, seed=5)
    z, f = logits[:2], logits[2]
    g = torch.Generator().manual_seed(1)
    shapes = [(2, 4, 4), (3, 2, 2)]
    feats = [[torch.randn(4, *s, generator=g) for s in shapes] for _ in range(2)]
    w = 0.6
    terms = dccl_loss(z, f, feats, y, 3.0, w, eps)
    flat = [[v.flatten(1).numpy() for v in peer] for peer in feats]
    want = {"ce": _ce(z[0], y) + _ce(z[1], y), "ce_fused": _ce(f, y),
            "kd": w * (_kd(z[0], z[1], 3.0, eps) + _kd(z[1], z[0], 3.0, eps)),
            "kd_feat": w * sum(_kd(flat[0][t], flat[1][t], 3.0, eps) + _kd(flat[1][t], flat[0][t], 3.0, eps)
                               for t in range(2)),
            "kd_fused": w * sum(_kd(z[i], f, 3.0, eps) + _kd(f, z[i], 3.0, eps) for i in range(2))}
    assert set(terms) == set(want)
    for k in want:
        assert terms[k].item() == pytest.approx(want[k], rel=1e-5), k


def test_every_kd_target_is_detached():
    logits, y = _logits(3, seed=2)
    z = [v.clone().requires_grad_() for v in logits]
    ffl_loss(z[:2], z[2], y, 3.0)["kd"].backward()              # fused -> peers: z_f gets nothing
    assert z[2].grad is None and all(v.grad.abs().sum() > 0 for v in z[:2])
    z = [v.clone().requires_grad_() for v in logits]
    ffl_loss(z[:2], z[2], y, 3.0)["kd_fused"].backward()        # ensemble -> fused: the peers get nothing
    assert z[0].grad is None and z[1].grad is None and z[2].grad.abs().sum() > 0
    # DCCL's feature term: peer 1's feature gets exactly the gradient of KD(F_1 <- F_2), nothing of KD(F_2 <- F_1)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    fa, fb = a.clone().requires_grad_(), b.clone().requires_grad_()
    dccl_loss(logits[:2], logits[2], [[fa], [fb]], y, 3.0)["kd_feat"].backward()
    ref = a.clone().requires_grad_()
    kd_loss(ref.flatten(1), b.flatten(1), 3.0).backward()
    torch.testing.assert_close(fa.grad, ref.grad)


# ---- which modules each term trains -------------------------------------------------------------------
def _grads(model, term_names, terms):
    model.zero_grad(set_to_none=True)
    sum(terms[k] for k in term_names).backward(retain_graph=True)
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_ffl_gradients_reach_the_intended_modules():
    torch.manual_seed(0)
    net = FFLNet("resnet20", 10, 2, "shared")
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    out = net(x)
    terms = ffl_loss(out.logits, out.fused, y, 3.0, 1.0)
    names = {n for n, _ in net.named_parameters()}
    fusion = {n for n in names if n.startswith("fusion.")}
    fcs = {n for n in names if ".head.fc." in n}
    # the peers' terms train the sub-networks, never the fusion module (its logits are a detached target)
    assert _grads(net, ["kd"], terms) == names - fusion
    assert _grads(net, ["ce"], terms) == names - fusion
    # the fused terms train the fusion module and, through the maps it reads, the trunk and branches, but
    # not the peers' classifiers (the ensemble target is detached)
    assert _grads(net, ["kd_fused"], terms) == names - fcs
    assert _grads(net, ["ce_fused"], terms) == names - fcs


def test_dccl_projections_are_trained_by_the_feature_terms_only():
    torch.manual_seed(0)
    net = DCCLNet("resnet20", 10)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    out = net(x, features=True)
    terms = dccl_loss(out.logits, out.fused, out.features, y, 3.0, 1.0)
    names = {n for n, _ in net.named_parameters()}
    proj = {n for n in names if n.startswith("projections.")}
    fusion = {n for n in names if n.startswith("fusion.")}
    fcs = {n for n in names if ".head.fc." in n}
    assert not _grads(net, ["ce", "ce_fused", "kd", "kd_fused"], terms) & proj
    feat = _grads(net, ["kd_feat"], terms)
    assert proj <= feat and not feat & (fusion | fcs)
    assert _grads(net, ["kd"], terms) == names - proj - fusion
    assert fusion <= _grads(net, ["kd_fused"], terms)
    # the matched feature is the stage output plus the projections of the earlier stages, and nothing more
    maps = peer_maps(net.peers, x, keep_stages=True).stages[0]
    p = net.projections[0].proj
    torch.testing.assert_close(out.features[0][0], maps[0])
    torch.testing.assert_close(out.features[0][2], maps[2] + p["0_2"](maps[0]) + p["1_2"](maps[1]))
    # evaluation runs no projection and returns the plain backbones' logits
    net.eval()
    with torch.no_grad():
        ev = net(x)
        assert ev.features is None
        torch.testing.assert_close(ev.logits[1], net.peers.branches[1](x))


def test_fusion_teachers_peers_train_through_their_heads_dropout():
    """The logits FFL's and DCCL's peer_maps and CMFF's network give while training are the peers' own, the head's
    dropout included (torchvision's MobileNetV2: 0.2): the same draws give the same logits as ``peers(x)``."""
    from models.peers import Peers
    from train_cmff import CMFFNet
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    plain, cmff = Peers("mobilenet_v2", 10, 2), CMFFNet("mobilenet_v2", 10, 32, heads=1, mlp_ratio=1)
    for peers, run in [(plain, lambda x: peer_maps(plain, x).logits), (cmff.peers, lambda x: cmff(x).logits)]:
        assert all(isinstance(net.head.dropout, torch.nn.Dropout) for net in peers.branches)
        peers.train()
        torch.manual_seed(1)
        expected = peers(x).logits
        torch.manual_seed(1)
        for got, want in zip(run(x), expected):
            torch.testing.assert_close(got, want)


# ---- sizes against hand counts ------------------------------------------------------------------------
def test_dccl_resnet32_projection_shapes_and_counts():
    net = DCCLNet("resnet32", 100)
    assert net.stage_shapes == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
    proj = net.projections[0].proj
    assert sorted(proj) == ["0_1", "0_2", "1_2"]
    convs = {k: v[0] for k, v in proj.items()}             # ResNet: conv -> BN -> ReLU, no leading BN
    assert {k: tuple(c.weight.shape) for k, c in convs.items()} == {
        "0_1": (32, 16, 2, 2), "0_2": (64, 16, 4, 4), "1_2": (64, 32, 2, 2)}
    assert {k: c.stride for k, c in convs.items()} == {"0_1": (2, 2), "0_2": (4, 4), "1_2": (2, 2)}
    # conv C_s*C_t*r^2 + BN 2*C_t: 16*32*4 + 64, 16*64*16 + 128, 32*64*4 + 128
    per_peer = (2048 + 64) + (16384 + 128) + (8192 + 128)
    assert count_parameters(net.projections[0]) == per_peer == 26_944
    assert count_parameters(net.projections) == 2 * per_peer
    assert count_parameters(net.peers.branches[0]) == 472_756
    # FFL's Fusion_module(64, 100, 8): depthwise 128*9, BN 2*128, 1x1 128*64, BN 2*64, fc 64*100 + 100
    assert count_parameters(net.fusion) == 1152 + 256 + 8192 + 128 + 6500 == 16_228
    wrn = DCCLNet("wrn_16_2", 10)                          # pre-activation: a leading BN, as the official WRN file
    assert isinstance(wrn.projections[0].proj["0_2"][0], torch.nn.BatchNorm2d)


def test_ffl_resnet32_fusion_module_and_shared_trunk():
    net = FFLNet("resnet32", 100)
    assert count_parameters(net.fusion) == 16_228          # Fusion_module(64, 100, 8) of train_FFL.py
    assert net.fusion.conv1.weight.shape == (128, 1, 3, 3) and net.fusion.conv2.weight.shape == (64, 128, 1, 1)
    assert net.peers.topology == "shared" and len(net.peers.trunk.stages) == 2
    single = count_parameters(net.peers.single_network(0))
    assert single == 472_756
    branch = count_parameters(net.peers.branches[0])        # layer3 + fc
    assert count_parameters(net.peers) == single + branch
    with pytest.raises(ValueError, match="2 maps"):
        FusionModule(4, 3)(torch.zeros(1, 4, 2, 2))


# ---- grouped peers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,argv", [(FFL, []), (FFL, ["--topology", "independent"]), (DCCL, [])])
def test_grouped_peers_give_the_same_loss_and_gradients(cls, argv):
    torch.manual_seed(0)
    method = cls(parse_args(cls, FAST + ["--arch", "resnet20"] + argv), 10, 100)
    plain = method.model.double()
    grouped = copy.deepcopy(plain)
    grouped.peers.group_branches()
    batch = Batch(torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 3]), torch.arange(4))
    a, b = method.loss(plain, batch, 50), method.loss(grouped, batch, 50)
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    sum(a.values()).backward()
    sum(b.values()).backward()
    if cls is DCCL:
        for pa, pb in zip(plain.projections.parameters(), grouped.projections.parameters()):
            torch.testing.assert_close(pa.grad, pb.grad)
    torch.testing.assert_close(plain.fusion.conv1.weight.grad, grouped.fusion.conv1.weight.grad)


def test_grouped_peers_refused_in_one_line_where_impossible(tmp_path):
    with pytest.raises(UserError, match="--grouped-peers with --arch densenet40_12"):
        Trainer(DCCL, parse_args(DCCL, FAST + ["--arch", "densenet40_12", "--grouped-peers", "--subset", "16",
                                               "--batch-size", "8", "--out", str(tmp_path)]))


# ---- recipes, presets, flags --------------------------------------------------------------------------
def test_recipes_presets_and_flags(capsys):
    a = parse_args(FFL, [])
    assert (a.recipe, a.weight_decay, a.milestones, a.nesterov, a.epochs) == ("ffl", 1e-4, [150, 225], True, 300)
    assert (a.topology, a.pad_mode, a.kd_T, a.rampup, a.kd_eps, a.fusion_weight_decay, a.fusion_decay) == \
        ("shared", "reflect", 3.0, 80.0, 0.0, 1e-5, True)
    a = parse_args(DCCL, [])
    assert (a.recipe, a.weight_decay, a.milestones, a.pad_mode, a.fusion_decay) == ("dccl", 2e-4, [150, 225],
                                                                                    "reflect", False)
    a = parse_args(DCCL, ["--recipe", "dccl-wrn", "--fusion-decay", "--pad-mode", "zero", "--kd-eps", "1e-7"])
    assert (a.epochs, a.milestones, a.weight_decay, a.fusion_decay, a.pad_mode, a.kd_eps) == \
        (400, [50, 150, 225, 300], 2e-4, True, "zero", 1e-7)
    a = parse_args(CMFF, [])
    assert (a.recipe, a.weight_decay, a.pad_mode) == ("dccl", 2e-4, "reflect")
    for cls in (FFL, DCCL):     # a temperature's range is its argparse type: refused while parsing
        with pytest.raises(SystemExit):
            parse_args(cls, ["--kd-T", "0"])
        assert "argument --kd-T: must lie in (0, 10000]" in capsys.readouterr().err


# ---- every family, one epoch ---------------------------------------------------------------------------
@pytest.fixture
def tiny_synthetic(monkeypatch):
    """The synthetic set cut to 32 training and 8 test images, so an epoch of the large backbones is quick."""
    train_split, test_split = data.synthetic.make_synthetic()
    cut = lambda s, n: type(s)(s.images[:n], s.labels[:n])   # noqa: E731
    monkeypatch.setattr(data.synthetic, "make_synthetic", lambda: (cut(train_split, 32), cut(test_split, 8)))


FAMILIES = ["resnet20", "resnet32", "resnet110", "wrn_16_2", "vgg16", "densenet40_12", "hcgnet_a1", "resnet18"]


@pytest.mark.parametrize("cls", [FFL, DCCL, CMFF])
def test_presets_pad_by_reflection_only_where_their_codes_do(cls, capsys):
    """The presets' reflect padding is their codes' CIFAR pipeline (kept on its offline stand-ins); the CMFF code
    pads TinyImageNet with zeros, and no code of theirs has an ImageNet or folder pipeline: the default is zero
    there, as --help says, and --pad-mode still chooses. ``--data`` is not taken for ``--dataset``, and an
    ambiguous ``--dat`` is the parser's usual one line."""
    for dataset, padding in [("cifar100", "reflect"), ("cifar10", "reflect"), ("fashion-mnist", "reflect"),
                             ("synthetic", "reflect"), ("tinyimagenet", "zero"), ("imagenet", "zero"),
                             ("folder", "zero")]:
        assert parse_args(cls, ["--dataset", dataset]).pad_mode == padding, dataset
    assert parse_args(cls, []).pad_mode == "reflect"
    assert parse_args(cls, ["--dataset=tinyimagenet", "--pad-mode", "reflect"]).pad_mode == "reflect"
    assert parse_args(cls, ["--data", "tinyimagenet", "--dataset", "cifar100"]).pad_mode == "reflect"
    assert parse_args(cls, ["--dataset", "cifar100", "--data", "tinyimagenet"]).pad_mode == "reflect"
    with pytest.raises(SystemExit):
        parse_args(cls, ["--dat", "tinyimagenet"])
    assert capsys.readouterr().err.endswith("could match --dataset, --data (--help lists the options)\n")
    with pytest.raises(SystemExit):
        parse_args(cls, ["--dataset", "tinyimagenet", "--help"])
    option = " ".join(capsys.readouterr().out.split()).split("--pad-mode {zero,reflect} padding")[1]
    assert option.split("--val-split")[0].rstrip().endswith("(default: zero)")


@pytest.mark.parametrize("cls", [FFL, DCCL], ids=["ffl", "dccl"])
@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.slow
def test_one_epoch_every_family(cls, arch, tiny_synthetic, tmp_path):
    results = train(cls, FAST + ["--arch", arch, "--subset", "8", "--batch-size", "4", "--epochs", "1",
                                 "--out", str(tmp_path)])
    last = results["last"]
    assert set(k[:-5] for k in last["test"] if k.endswith("/top1")) == {"peer1", "peer2", "ensemble", "fused"}
    assert all(math.isfinite(v) for v in last["train"].values())
    terms = {"ce", "ce_fused", "kd", "kd_fused"} | ({"kd_feat"} if cls is DCCL else set())
    assert terms <= set(last["train"])
    assert set(last["lr"]) == {"model", "fusion"} and results["args"]["pad_mode"] == "reflect"


def test_three_peers_run(tiny_synthetic, tmp_path):
    for cls in (FFL, DCCL):
        results = train(cls, FAST + ["--arch", "resnet20", "--num-peers", "3", "--subset", "16", "--batch-size", "8",
                                     "--epochs", "1", "--out", str(tmp_path / cls.name)])
        assert "peer3/top1" in results["last"]["test"] and "fused/top1" in results["last"]["test"]


# ---- two optimizers: schedules and resume -------------------------------------------------------------
_Interrupted = interrupted(FFL, 1)


def test_resume_with_two_optimizers_equals_uninterrupted(tiny_synthetic, tmp_path):
    args = FAST + ["--arch", "resnet20", "--subset", "32", "--batch-size", "8", "--epochs", "2", "--lr-schedule",
                   "multistep", "--milestones", "1"]
    full = train(FFL, args + ["--out", str(tmp_path / "full")])
    with pytest.raises(KeyboardInterrupt):
        train(_Interrupted, args + ["--out", str(tmp_path / "cut")])
    resumed = train(FFL, args + ["--out", str(tmp_path / "cut"), "--resume", "auto"])
    assert [h["lr"] for h in full["history"]] == [{"model": 0.1, "fusion": 0.1},
                                                   pytest.approx({"model": 0.01, "fusion": 0.01})]
    assert resumed["history"][1]["test"] == full["history"][1]["test"]
    assert resumed["history"][1]["train"]["loss"] == full["history"][1]["train"]["loss"]
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "cut" / "last.pt")
    assert set(a["optimizers"]) == {"model", "fusion"}
    for key in a["state"]["model"]:
        assert torch.equal(a["state"]["model"][key], b["state"]["model"][key]), key
    for name in ("model", "fusion"):
        sa, sb = a["optimizers"][name]["state"], b["optimizers"][name]["state"]
        assert all(torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) for i in sa)
    saved = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert saved["recipe"]["name"] == "ffl" and "fused/top1" in saved["best"]["test"]


def test_dccl_fusion_lr_constant_by_default(tiny_synthetic, tmp_path):
    results = train(DCCL, FAST + ["--arch", "resnet20", "--subset", "16", "--batch-size", "8", "--epochs", "2",
                                  "--milestones", "1", "--out", str(tmp_path)])
    assert [h["lr"]["fusion"] for h in results["history"]] == [0.1, 0.1]
    assert [h["lr"]["model"] for h in results["history"]] == pytest.approx([0.1, 0.01])
