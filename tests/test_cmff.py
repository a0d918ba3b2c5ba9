"""CMFF (train_cmff.py): rotation batching, L_sim, KL6 and its ramp-up, the cross-attention, sizes from every
backbone, the two optimizers, the ablations and a short run end to end."""
import json
import math

import numpy as np
import pytest
import torch

from data import Batch
from engine import Trainer, parse_args, train
from losses import kd_loss, sigmoid_rampup
from losses.peer_targets import mutual_kd
from losses.rotation_ssl import rotate_batch, upright_contrast_loss
from train_cmff import CMFF, CMFFNet, CrossAttention, default_fusion_grid, last_stage_shape, rotation_head_widths
from models import count_parameters
from models.peers import Peers
from toy_methods import build_method

FAST = ["--dataset", "synthetic", "--arch", "resnet20", "--gpu", "-1", "--no-progress", "--workers", "0"]


def _method(argv, num_classes=10, image_size=32):
    return build_method(CMFF, ["--gpu", "-1"] + argv, num_classes, image_size=image_size)


# ---- rotations ---------------------------------------------------------------------------------------
def test_rotate_batch_layout_and_joint_labels():
    images = torch.randn(3, 2, 5, 5)
    labels = torch.tensor([4, 0, 7])
    rotated, joint = rotate_batch(images, labels)
    assert rotated.shape == (12, 2, 5, 5)
    x = images.numpy()
    for k in range(4):
        for j in range(3):
            row = k * 3 + j
            # upright rows first, then each rotation of the whole batch; np.rot90 = counter-clockwise
            np.testing.assert_array_equal(rotated[row].numpy(), np.rot90(x[j], k, axes=(1, 2)))
            assert joint[row].item() == 4 * labels[j].item() + k
    assert torch.equal(rotated[:3], images)                 # the first B rows are the upright images
    assert not torch.equal(rotated[3:6], images)
    with pytest.raises(ValueError, match="square"):
        rotate_batch(torch.zeros(2, 3, 4, 6), labels[:2])


# ---- L_sim -------------------------------------------------------------------------------------------
def _lsim_reference(z, B, tau):
    z = np.asarray(z, dtype=np.float64)
    R = z.shape[0] // B
    total, count = 0.0, 0
    for i in range((R - 1) * B):
        a = z[B + i]
        sims = [float(a @ z[j]) / (np.linalg.norm(a) * np.linalg.norm(z[j])) / tau for j in range(B)]
        m = max(sims)
        lse = m + math.log(sum(math.exp(s - m) for s in sims))
        total += lse - sims[i % B]
        count += 1
    return total / count


@pytest.mark.parametrize("B,dim,tau", [(3, 5, 1.0), (4, 7, 0.5), (2, 3, 1.0)])
def test_upright_contrast_loss_matches_float64_statement(B, dim, tau):
    g = torch.Generator().manual_seed(B * 10 + dim)
    z = torch.randn(4 * B, dim, generator=g)
    got = upright_contrast_loss(z, B, tau).item()
    assert got == pytest.approx(_lsim_reference(z.numpy(), B, tau), rel=1e-5, abs=1e-6)


def test_upright_contrast_loss_lower_bound_at_temperature_one():
    # cos lies in [-1, 1], so each anchor's CE >= -log(e / (e + (B-1)/e)) = log(1 + (B-1) e^-2).
    for B in (2, 5, 16):
        bound = math.log(1 + (B - 1) * math.exp(-2))
        for seed in range(5):
            z = torch.randn(4 * B, 6, generator=torch.Generator().manual_seed(seed))
            assert upright_contrast_loss(z, B).item() >= bound - 1e-6
    # B = 2 reaches it: every view equals its upright image, the two upright images are antipodal.
    u = torch.tensor([[1.0, 2.0, -1.0]])
    z = torch.cat([u, -u] * 4)
    assert upright_contrast_loss(z, 2).item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)
    assert math.log(1 + 127 * math.exp(-2)) == pytest.approx(2.90, abs=0.005)   # the B = 128 floor (docs/cmff.md)


# ---- KL6 and its ramp-up ----------------------------------------------------------------------------
def _kl6_reference(logits, T, eps=0.0):
    """sum over ordered pairs of T^2 mean_n sum_c t (log t - log softmax(s/T)), t = softmax(teacher/T) + eps
    (eps = 0: the KL; 1e-7: the official KLLoss, not renormalised)."""
    zs = [np.asarray(z, dtype=np.float64) for z in logits]

    def softmax(v):
        e = np.exp(v / T - (v / T).max())
        return e / e.sum()
    total = 0.0
    for a in range(len(zs)):
        for b in range(len(zs)):
            if a == b:
                continue
            kl = 0.0
            for n in range(zs[a].shape[0]):
                p_s, p_t = softmax(zs[a][n]), softmax(zs[b][n]) + eps
                kl += sum(p_t[c] * (math.log(p_t[c]) - math.log(p_s[c])) for c in range(len(p_t)))
            total += T * T * kl / zs[a].shape[0]
    return total


def test_kl6_matches_float64_statement_and_official_form():
    g = torch.Generator().manual_seed(0)
    o1, o2, f = (3 * torch.randn(4, 6, generator=g) for _ in range(3))
    got = mutual_kd([o1, o2, f], 3.0).item()
    assert got == pytest.approx(_kl6_reference([o1, o2, f], 3.0), rel=1e-5)
    # The official KLLoss adds 1e-7 to the (not renormalised) target: a difference far below 1e-3.
    official = 0.0
    for s, t in ((o1, o2), (o2, o1), (o1, f), (o2, f), (f, o1), (f, o2)):
        tgt = torch.softmax(t.double() / 3, 1) + 1e-7
        official += 9 * (tgt * (tgt.log() - torch.log_softmax(s.double() / 3, 1))).sum(1).mean().item()
    assert abs(official - got) < 1e-3
    # Gradients reach only the student side of each pair: x gets exactly the gradient of KD(x <- y).
    x, y = o1.clone().requires_grad_(), o2.clone().requires_grad_()
    mutual_kd([x, y], 3.0).backward()
    x2 = o1.clone().requires_grad_()
    kd_loss(x2, o2, 3.0).backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_kd_eps_gives_the_official_kl_form_in_the_loss():
    """--kd-eps 1e-7 (part of --preset official) makes the "kl" term the official KLLoss over (o_1, o_2, f),
    re-stated in float64 from the model's own outputs; the default is the exact KL. Only the student side of
    each pair gets gradients in the official form too."""
    torch.manual_seed(0)
    images, labels = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    values = {}
    for eps in ("0", "1e-7"):
        method = _method(FAST + ["--no-ssl", "--attention-dropout", "0", "--fusion-grid", "1", "--kd-eps", eps])
        assert method.args.kd_eps == float(eps)
        torch.manual_seed(1)
        method.model.load_state_dict(_method(FAST + ["--no-ssl", "--fusion-grid", "1"]).model.state_dict())
        terms = method.loss(method.model, Batch(images, labels, torch.arange(6)), epoch=80)   # w(80) = 1
        with torch.no_grad():
            out = method.model(images)                    # train mode, batch statistics: the same outputs
        logits = [z.detach().numpy() for z in (*out.logits, out.fused)]
        values[eps] = terms["kl"].item()
        assert values[eps] == pytest.approx(_kl6_reference(logits, 3.0, float(eps)), rel=1e-5)
    # 10 classes: the official form exceeds the KL by about 1e-7 * 9 * 10 per term (measured gaps: docs/cmff.md)
    assert 1e-6 < values["1e-7"] - values["0"] < 1e-4
    x, y = (torch.randn(4, 6).requires_grad_() for _ in range(2))
    mutual_kd([x, y], 3.0, 1e-7).backward()
    x2 = x.detach().clone().requires_grad_()
    kd_loss(x2, y, 3.0, target_eps=1e-7).backward()
    torch.testing.assert_close(x.grad, x2.grad)
    assert not torch.equal(x.grad, torch.zeros_like(x.grad))


def test_rampup_values():
    for e, w in ((0, 0.0067), (20, 0.060), (40, 0.287), (60, 0.732), (80, 1.0), (299, 1.0)):
        assert sigmoid_rampup(e, 80) == pytest.approx(w, abs=5e-4)
        assert sigmoid_rampup(e, 80) == pytest.approx(math.exp(-5 * (1 - min(e, 80) / 80) ** 2))


# ---- the cross-attention -----------------------------------------------------------------------------
def _attention_reference(block, f1, f2):
    """The equations of docs/cmff.md (official CrossAttention) in float64 numpy, from the block's weights."""
    P = {k: v.detach().double().numpy() for k, v in block.state_dict().items()}
    h, t = block.heads, block.chunk
    inner = h * t

    def ln(x, i):
        mu, var = x.mean(), x.var()
        return (x - mu) / math.sqrt(var + 1e-5) * P[f"norm.{i}.weight"] + P[f"norm.{i}.bias"]

    def gelu(x):
        return np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])

    def mlp(x, i):
        hid = gelu(P[f"mlp.{i}.0.weight"] @ x + P[f"mlp.{i}.0.bias"])
        return P[f"mlp.{i}.2.weight"] @ hid + P[f"mlp.{i}.2.bias"]

    def attend(q, k, v, i):
        out = np.zeros((h, t))
        for r in range(h):
            s = np.array([q[r] @ k[c] / math.sqrt(t) for c in range(h)])
            e = np.exp(s - s.max())
            out[r] = (e / e.sum()) @ v
        return P[f"proj.{i}.weight"] @ out.reshape(-1) + P[f"proj.{i}.bias"]

    c = P["coef"]
    outs = []
    for x1, x2 in zip(f1.double().numpy(), f2.double().numpy()):
        qkv = [P[f"qkv.{i}.weight"] @ ln(x, i) + P[f"qkv.{i}.bias"] for i, x in enumerate((x1, x2))]
        (q1, k1, v1), (q2, k2, v2) = [[y[j * inner:(j + 1) * inner].reshape(h, t) for j in range(3)] for y in qkv]
        g1 = c[0] * x1 + c[1] * attend(q2, k1, v1, 0)      # peer-2 queries over peer-1 keys
        g2 = c[2] * x2 + c[3] * attend(q1, k2, v2, 1)
        outs.append((c[4] * g1 + c[5] * mlp(ln(g1, 2), 0), c[6] * g2 + c[7] * mlp(ln(g2, 3), 1)))
    return np.stack([o[0] for o in outs]), np.stack([o[1] for o in outs])


@pytest.mark.parametrize("d", [12, 10, 7])       # 10 and 7 are not multiples of the 4 chunks
def test_cross_attention_equations_shapes_and_coefficients(d):
    torch.manual_seed(d)
    block = CrossAttention(d, heads=4, dropout=0.1)
    t = math.ceil(d / 4)
    assert block.chunk == t and block.qkv[0].out_features == 3 * 4 * t and block.proj[0].out_features == d
    assert block.mlp[0][0].out_features == 2 * d                                    # hidden width 2d
    assert all(p.std().item() < 0.01 for n, p in block.named_parameters() if n.endswith("weight") and "qkv" in n)
    with torch.no_grad():                # larger weights than the official N(0, 1e-3) so the test can see them
        for name, p in block.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn_like(p) * (0.5 if name == "coef" else 0.4) + (1.0 if name == "coef" else 0.0))
    f1, f2 = torch.randn(3, d), torch.randn(3, d)
    block.eval()
    h1, h2 = block(f1, f2)
    assert h1.shape == (3, d) and h2.shape == (3, d)
    r1, r2 = _attention_reference(block, f1, f2)
    np.testing.assert_allclose(h1.detach().double().numpy(), r1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(h2.detach().double().numpy(), r2, rtol=1e-4, atol=1e-5)
    block.train()
    h1, h2 = block(f1, f2)
    (h1.square().mean() + h2.square().mean()).backward()
    assert block.coef.grad is not None and (block.coef.grad.abs() > 0).all()


# ---- sizes from the backbone -------------------------------------------------------------------------
def test_default_grid_reproduces_official_widths():
    assert default_fusion_grid(64, 8) == 8          # CIFAR ResNet-32/110: 64 x 8 x 8 = 4096
    assert default_fusion_grid(512, 1) == 1         # VGG-16: 512 x 1 x 1 = 512
    assert default_fusion_grid(256, 8) == 4         # resnet110_bottleneck: 4096
    assert default_fusion_grid(512, 7) == 2         # ImageNet ResNet-18/34 at 224: 2048
    assert default_fusion_grid(8192, 8) == 1
    assert rotation_head_widths(4096) == [2048, 1024, 512]     # official ResNet-32 rotation head
    assert rotation_head_widths(256) == [512]                  # official tiny head
    assert last_stage_shape(Peers("resnet32", 10, 1).branches[0], 32) == (64, 8, 8)
    with torch.device("meta"):                      # the full-size official ResNet-32 teacher, without memory
        net = CMFFNet("resnet32", 100, 32)
    d, m = 4096, 8192
    assert net.grid == 8 and net.dim == d and net.attention.mlp[0][0].out_features == m
    # q/k/v/o (4 per side), the MLP, 4 LayerNorms and c_1..c_8: ~270M, as docs/cmff.md says
    assert count_parameters(net.attention) == 2 * (4 * (d * d + d) + d * m + m + m * d + d) + 4 * 2 * d + 8
    # default fusion input "map": FFL's Fusion_module(64, 100, 8) on the attended 64 x 8 x 8 grid
    assert net.fusion_shape == (64, 8, 8)
    assert count_parameters(net.fusion) == 128 * 9 + 2 * 128 + 128 * 64 + 2 * 64 + 64 * 100 + 100
    with torch.device("meta"):                      # the official files' layout: d-vectors as (d, 1, 1) maps
        vec = CMFFNet("resnet32", 100, 32, fusion_input="vector", rotation_head=False, projection_head=False)
    assert vec.fusion_shape == (d, 1, 1)
    assert count_parameters(vec.fusion) == 2 * d * 9 + 2 * 2 * d + 2 * d * d + 2 * d + d * 100 + 100  # +34M
    assert [l.out_features for l in net.rotation_head if hasattr(l, "out_features")] == [2048, 1024, 512, 400]
    assert count_parameters(net.peers.branches[0]) == 472_756


def test_fusion_grid_larger_than_the_map_is_a_clear_error():
    from engine import UserError
    with pytest.raises(UserError, match="larger than the 1x1"):
        CMFFNet("vgg16", 10, 32, grid=2)


FAMILIES = [("resnet20", 32), ("resnet32", 32), ("resnet56", 32), ("resnet110", 32), ("resnet110_bottleneck", 32),
            ("wrn_16_2", 32), ("wrn_20_8", 32), ("vgg16", 32), ("densenet40_12", 32), ("hcgnet_a1", 32),
            ("resnet18", 32), pytest.param("resnet18", 64, marks=pytest.mark.slow), ("resnet34", 32)]   # 3 s and more


@pytest.mark.parametrize("arch,size", FAMILIES)
def test_every_backbone_family_trains_one_step(arch, size):
    torch.manual_seed(0)
    method = _method(["--arch", arch, "--fusion-grid", "1"], image_size=size)
    model = method.model
    B, C = 2, 10
    batch = Batch(torch.randn(B, 3, size, size), torch.tensor([3, 7]), torch.arange(B))
    captured = []
    model.register_forward_hook(lambda m, args, out: captured.append(out))
    terms = method.loss(model, batch, epoch=5)
    assert set(terms) == {"ce", "ce_fused", "kl", "rot", "sim"}
    sum(terms.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing[:5]                       # every parameter is used (DDP without unused params)
    out, d = captured[0], model.dim
    assert [z.shape for z in out.logits] == [(B, C)] * 2 and out.fused.shape == (B, C)
    assert out.rotation.shape == (4 * B, 4 * C) and out.projection.shape == (4 * B, d)
    model.eval()
    with torch.no_grad():
        heads = method.eval_logits(model, batch.images)
    assert set(heads) == {"peer1", "peer2", "ensemble", "fused"} and all(v.shape == (B, C) for v in heads.values())
    # a deployed peer is exactly the plain backbone
    torch.testing.assert_close(heads["peer1"], model.peers.branches[0](batch.images))


@pytest.mark.slow
def test_ablations_drop_their_parts():
    B = 2
    batch = Batch(torch.randn(B, 3, 32, 32), torch.tensor([1, 2]), torch.arange(B))
    seen = []
    for flags, expect in ((["--no-ssl"], {"ce", "ce_fused", "kl"}),
                          (["--no-rot"], {"ce", "ce_fused", "kl", "sim"}),
                          (["--no-sim"], {"ce", "ce_fused", "kl", "rot"}),
                          (["--no-rot", "--no-sim"], {"ce", "ce_fused", "kl"}),
                          (["--no-cross-attention"], {"ce", "ce_fused", "kl", "rot", "sim"}),
                          (["--fusion-input", "vector"], {"ce", "ce_fused", "kl", "rot", "sim"})):
        method = _method(["--fusion-grid", "2", "--arch", "resnet20"] + flags)
        model = method.model
        model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0].shape[0]), with_kwargs=True)
        terms = method.loss(model, batch, 0)
        assert set(terms) == expect, flags
        assert (model.rotation_head is None) == ("rot" not in expect)
        assert (model.projection_head is None) == ("sim" not in expect)
        assert (model.attention is None) == ("--no-cross-attention" in flags)
        assert model.fusion_shape == ((256, 1, 1) if "vector" in flags else (64, 2, 2))   # resnet20, grid 2
        assert seen[-1] == (B if expect == {"ce", "ce_fused", "kl"} else 4 * B)   # plain batches without SSL
        sum(terms.values()).backward()
        assert all(p.grad is not None for p in model.parameters())
    assert _method(["--preset", "rn110"]).args.lambda_rot == 3.0
    a = _method(["--fusion-grid", "1", "--arch", "resnet20"]).args
    assert (a.lambda_rot, a.lambda_sim, a.kd_T, a.rampup, a.sim_T) == (1.0, 5.0, 3.0, 80.0, 1.0)
    assert (a.lr, a.weight_decay, a.milestones, a.epochs, a.batch_size, a.nesterov) == (0.1, 2e-4, [150, 225], 300, 128, True)


@pytest.mark.parametrize("peers", ["1", "3"])
def test_two_peers_only(peers, capsys):
    with pytest.raises(SystemExit):
        _method(["--num-peers", peers])
    assert f"argument --num-peers: must be 2; got {peers} (the number of peers cmff trains)" in capsys.readouterr().err


# ---- optimizers and a short run ----------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_fusion_optimizer_groups_and_constant_lr_flag(tmp_path):
    args = parse_args(CMFF, FAST + ["--subset", "64", "--batch-size", "32", "--fusion-grid", "1", "--no-fusion-decay",
                                    "--lr-schedule", "multistep", "--milestones", "1", "--out", str(tmp_path)])
    trainer = Trainer(CMFF, args)
    model_opt, fusion_opt = trainer.optimizers["model"], trainer.optimizers["fusion"]
    fusion_ids = {id(p) for p in trainer.method.model.fusion.parameters()}
    assert {id(p) for p in fusion_opt.param_groups[0]["params"]} == fusion_ids
    assert not fusion_ids & {id(p) for p in model_opt.param_groups[0]["params"]}
    assert {id(p) for p in trainer.method.model.attention.parameters()} <= {id(p) for p in model_opt.param_groups[0]["params"]}
    assert fusion_opt.param_groups[0]["weight_decay"] == 1e-5 and model_opt.param_groups[0]["weight_decay"] == 2e-4
    assert fusion_opt.param_groups[0]["nesterov"] and fusion_opt.param_groups[0]["momentum"] == 0.9
    trainer.optimization.set_epoch(2)
    assert model_opt.param_groups[0]["lr"] == pytest.approx(0.01)
    assert fusion_opt.param_groups[0]["lr"] == pytest.approx(0.1)       # the official code's behaviour


@pytest.mark.slow
def test_short_run_end_to_end(tmp_path):
    results = train(CMFF, FAST + ["--subset", "32", "--batch-size", "16", "--eval-batch-size", "256",
                                  "--epochs", "2", "--fusion-grid", "2", "--lr-schedule", "multistep",
                                  "--milestones", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "finished" and saved["recipe"]["name"] == "dccl"
    for split in ("best", "last"):
        for head in ("peer1", "peer2", "ensemble", "fused"):
            for k in ("top1", "top5"):
                assert 0.0 <= saved[split]["test"][f"{head}/{k}"] <= 100.0
    hist = saved["history"]
    assert [h["lr"]["fusion"] for h in hist] == pytest.approx([0.1, 0.01])   # decayed with the schedule
    assert [h["lr"]["model"] for h in hist] == pytest.approx([0.1, 0.01])
    assert set(hist[0]["train"]) >= {"ce", "ce_fused", "kl", "rot", "sim", "loss"}
    assert all(math.isfinite(h["train"]["loss"]) for h in hist)
    assert results["args"]["fusion_grid"] == 2
