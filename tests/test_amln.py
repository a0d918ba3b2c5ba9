"""AMLN (train_amln.py): the GAN losses against float64 re-statements, the block pairing and module sizes for every
family, the alternating step (each player's step leaves the other's parameters alone), short runs, exact resume
and a real-data check."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine import parse_args
from losses.adversarial import discriminator_loss, generator_loss
from train_amln import (AMLN, Adapter, AlignmentContainer, Discriminator, adversarial_loss, alignment_loss,
                        cyclic_targets, discriminators_loss, paired_stages, stage_shapes)
from toy_methods import build_method, interrupted


def _method(argv, num_classes=10, image_size=32):
    return build_method(AMLN, ["--gpu", "-1"] + argv, num_classes, image_size=image_size)


# ---- the GAN losses ----------------------------------------------------------------------------------
def _log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _d_reference(real, fake, kind):
    real, fake = np.asarray(real, np.float64).ravel(), np.asarray(fake, np.float64).ravel()
    if kind == "lsgan":
        return sum((r - 1) ** 2 for r in real) / len(real) + sum(f ** 2 for f in fake) / len(fake)
    # -log s(r) and -log(1 - s(f)) = -log s(-f)
    return -sum(_log_sigmoid(r) for r in real) / len(real) - sum(_log_sigmoid(-f) for f in fake) / len(fake)


def _g_reference(fake, kind):
    fake = np.asarray(fake, np.float64).ravel()
    if kind == "lsgan":
        return sum((f - 1) ** 2 for f in fake) / len(fake)
    return -sum(_log_sigmoid(f) for f in fake) / len(fake)


@pytest.mark.parametrize("kind", ["lsgan", "bce"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gan_losses_match_float64_statements(kind, seed):
    g = torch.Generator().manual_seed(seed)
    real, fake = 3 * torch.randn(5, generator=g), 3 * torch.randn(7, generator=g)
    assert discriminator_loss(real, fake, kind).item() == pytest.approx(_d_reference(real, fake, kind), rel=1e-5)
    assert generator_loss(fake, kind).item() == pytest.approx(_g_reference(fake, kind), rel=1e-5)
    # reduced precision inputs are computed in float32
    assert generator_loss(fake.bfloat16(), kind).dtype == torch.float32


def test_gan_losses_by_hand():
    real, fake = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    assert discriminator_loss(real, fake, "lsgan").item() == pytest.approx((0 + 1) / 2 + (0 + 4) / 2)
    assert generator_loss(fake, "lsgan").item() == pytest.approx((1 + 1) / 2)
    # BCE at score 0 is log 2 per side; a perfect discriminator (huge margins) costs ~0
    zero = torch.zeros(3)
    assert discriminator_loss(zero, zero, "bce").item() == pytest.approx(2 * math.log(2))
    assert discriminator_loss(torch.full((3,), 50.0), torch.full((3,), -50.0), "bce").item() < 1e-12
    with pytest.raises(ValueError, match="lsgan"):
        generator_loss(zero, "wgan")


def test_block_sums_match_float64_statement():
    """L_D, the peers' adversarial loss and the L1 term summed over peers and blocks, re-stated in float64."""
    torch.manual_seed(0)
    ds = torch.nn.ModuleList([torch.nn.ModuleList([Discriminator(3, 8), Discriminator(5, 2)]) for _ in range(2)])
    fake = [[torch.randn(4, 3, 8, 8), torch.randn(4, 5, 2, 2)] for _ in range(2)]
    real = [[torch.randn(4, 3, 8, 8), torch.randn(4, 5, 2, 2)] for _ in range(2)]
    for kind in ("lsgan", "bce"):
        d_ref = sum(_d_reference(d(r).detach().numpy(), d(f).detach().numpy(), kind)
                    for dl, fl, rl in zip(ds, fake, real) for d, f, r in zip(dl, fl, rl))
        g_ref = sum(_g_reference(d(f).detach().numpy(), kind) for dl, fl in zip(ds, fake) for d, f in zip(dl, fl))
        assert discriminators_loss(ds, fake, real, kind).item() == pytest.approx(d_ref, rel=1e-5)
        assert adversarial_loss(ds, fake, kind).item() == pytest.approx(g_ref, rel=1e-5)
    l1_ref = sum(np.abs(f.double().numpy() - r.double().numpy()).mean() for fl, rl in zip(fake, real)
                 for f, r in zip(fl, rl))
    assert alignment_loss(fake, real).item() == pytest.approx(l1_ref, rel=1e-5)


def test_which_tensors_get_gradients():
    torch.manual_seed(0)
    ds = torch.nn.ModuleList([torch.nn.ModuleList([Discriminator(3, 4)])])
    fake = [[torch.randn(2, 3, 4, 4, requires_grad=True)]]
    real = [[torch.randn(2, 3, 4, 4, requires_grad=True)]]
    discriminators_loss(ds, fake, real, "lsgan").backward()
    assert fake[0][0].grad is None and real[0][0].grad is None          # the maps are detached
    assert all(p.grad is not None for p in ds.parameters())
    ds.zero_grad(set_to_none=True)
    ds.requires_grad_(False)
    (adversarial_loss(ds, fake, "lsgan") + alignment_loss(fake, real)).backward()
    assert fake[0][0].grad is not None and real[0][0].grad is None      # the target's map is a stop-gradient
    assert all(p.grad is None for p in ds.parameters())


# ---- pairing, adapters, discriminators ---------------------------------------------------------------
def test_cyclic_targets_and_pairing():
    assert cyclic_targets(2) == [1, 0]
    assert cyclic_targets(3) == [2, 0, 1]        # every peer is imitated by exactly one other
    assert paired_stages(3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert paired_stages(4, 3) == [(1, 0), (2, 1), (3, 2)]   # the last stages of each
    assert paired_stages(3, 4) == [(0, 1), (1, 2), (2, 3)]


def test_adapter_is_identity_for_equal_shapes_and_fits_otherwise():
    assert len(Adapter((16, 8, 8), (16, 8, 8))) == 0
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(Adapter((16, 8, 8), (16, 8, 8))(x), x)
    assert Adapter((16, 8, 8), (32, 4, 4))(x).shape == (2, 32, 4, 4)
    assert Adapter((16, 8, 8), (16, 4, 4))(x).shape == (2, 16, 4, 4)
    assert not any(isinstance(m, torch.nn.ReLU) for m in Adapter((16, 8, 8), (32, 8, 8)))


@pytest.mark.parametrize("channels,size,strided", [(16, 32, 3), (32, 16, 2), (64, 8, 1), (512, 2, 0), (512, 1, 0)])
def test_discriminator_shapes(channels, size, strided):
    d = Discriminator(channels, size)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sum(c.stride == (2, 2) for c in convs) == strided
    assert len(convs) == max(strided, 1) + 1
    assert d(torch.randn(3, channels, size, size)).shape == (3,)


@pytest.mark.parametrize("arch,blocks", [("resnet20", 3), ("wrn_16_2", 3), ("vgg16", 4), ("resnet18", 4)])
def test_modules_sized_from_every_family(arch, blocks):
    m = _method(["--arch", arch])
    net = m.model
    shapes = stage_shapes(net.peers.single_network(0), 32)
    assert [len(a) for a in net.adapters] == [blocks, blocks]
    assert net.block_shapes == [shapes, shapes]
    # one architecture: every adapter is the identity, so the adversarial loss reaches the peers' own maps
    assert all(len(a) == 0 for row in net.adapters for a in row)
    for row, shape_row in zip(m.discriminators, net.block_shapes):
        for d, (c, h, _) in zip(row, shape_row):
            assert d.net[0].in_channels == c
    out = net(torch.randn(2, 3, 32, 32))
    for i, t in enumerate(net.targets):
        for f, r, shape in zip(out.fake[i], out.real[i], net.block_shapes[i]):
            assert f.shape[1:] == r.shape[1:] == shape
        for a, f, shape in zip(out.aligned[i], out.final[i], net.final_shapes[i]):
            assert a.shape[1:] == f.shape[1:] == shape
    # evaluation runs no block
    assert net(torch.randn(2, 3, 32, 32), blocks=False).fake is None


def test_three_peers_are_cyclic():
    m = _method(["--arch", "resnet20", "--num-peers", "3"])
    assert m.model.targets == [2, 0, 1] and len(m.discriminators) == 3
    x = torch.randn(2, 3, 32, 32)
    m.model.eval()
    out = m.model(x)
    stages = m.model.peers(x, return_stages=True).stages
    assert torch.equal(out.real[0][1], stages[2][1]) and torch.equal(out.fake[1][2], stages[1][2])
    # the intermediate-to-final alignment of peer 1 targets peer 3's final map, of peer 2 peer 1's
    assert torch.equal(out.final[0][0], stages[2][2]) and torch.equal(out.final[1][1], stages[0][2])


def test_bad_flags_are_one_line_errors(capsys):
    for argv in (["--kd-T", "0"], ["--disc-lr", "-1"], ["--adv-weight", "-1"], ["--final-weight", "-1"],
                 ["--disc-betas", "1", "0.9"]):
        with pytest.raises(SystemExit):   # each flag's range, declared with the flag
            parse_args(AMLN, ["--gpu", "-1"] + argv)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"argument {argv[0]}: must" in err, err


# ---- the alternating step ----------------------------------------------------------------------------
def _snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("arch", ["resnet20", "resnet20,wrn_16_2"])
def test_each_players_step_leaves_the_other_alone(arch):
    """Parameters compared around every optimizer step: the discriminators' step changes the discriminators
    and no peer/adapter parameter; the peers' step changes the peers and no discriminator parameter."""
    from data import Batch
    from engine.method import StepContext

    torch.manual_seed(0)
    m = _method(["--arch", arch, "--align-weight", "0.1"])
    optimizers = {g.name: _optimizer_for(g) for g in m.optim_groups()}
    assert isinstance(optimizers["discriminators"], torch.optim.Adam)
    step = StepContext(optimizers, torch.amp.GradScaler("cpu", enabled=False), "cpu")
    log = []
    real_step = step.step

    def watched(*names):
        before = (_snapshot(m.model), _snapshot(m.discriminators), _snapshot(m.model.containers))
        real_step(*names)
        after = (_snapshot(m.model), _snapshot(m.discriminators), _snapshot(m.model.containers))
        log.append((names, _same(before[0], after[0]), _same(before[1], after[1]), _same(before[2], after[2])))

    step.step = watched
    batch = Batch(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)), torch.arange(8))
    for _ in range(2):
        terms = m.train_step(m.model, batch, 0, step)
    # per step: discriminators first (peers untouched), then the model (discriminators untouched)
    # (the containers are trained by the model's step)
    assert log == [(("discriminators",), True, False, True), (("model",), False, True, False)] * 2
    assert set(terms) == {"ce", "kd", "adv", "final", "align", "disc"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in terms.values())
    assert all(p.requires_grad for p in m.discriminators.parameters())    # unfrozen after the step


@pytest.mark.parametrize("own,final,widths,pooled", [
    ((16, 32, 32), (64, 8, 8), [32, 64], False),                    # ResNet-32 block 1 -> final map
    ((32, 16, 16), (64, 8, 8), [64], False),                        # block 2
    ((16, 32, 32), (512, 1, 1), [32, 64, 128, 256, 512], False),    # towards VGG-16's final map
    ((256, 4, 4), (64, 4, 4), [], False),                           # same size: the 1x1 conv alone
    ((16, 12, 12), (64, 5, 5), [32], True),                         # 12 -> 6 by a stride, then pooled to 5
])
def test_alignment_container_shapes(own, final, widths, pooled):
    container = AlignmentContainer(own, final)
    convs = [m for m in container if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs if c.stride == (2, 2)] == widths
    assert convs[-1].kernel_size == (1, 1) and convs[-1].out_channels == final[0]
    assert isinstance(container[-1], torch.nn.BatchNorm2d)          # linear end: no ReLU after the projection
    assert any(isinstance(m, torch.nn.AdaptiveAvgPool2d) for m in container) == pooled
    assert container(torch.randn(2, *own)).shape == (2, *final)


def test_intermediate_to_final_alignment_matches_float64_and_its_gradients():
    """The `final` term: sum over peers i and intermediate blocks b of mean |C_ib(F_ib) - F_t(i)L|, re-stated in
    float64 from the peers' stage maps (the wiring and the L1 mean; the containers' own layers are reused, their
    shapes are tested above and the heterogeneous pooling below); its gradient reaches peer i's blocks before the last and C_i, never the
    target peer (a stop-gradient) nor peer i's last stage."""
    import copy
    m = _method(["--arch", "resnet20"])
    net = m.model.eval()                      # running BN statistics: every forward gives the same maps
    assert net.final_shapes == [[(64, 8, 8), (64, 8, 8)]] * 2 and net.targets == [1, 0]
    x = torch.randn(3, 3, 32, 32)
    out = net(x)
    stages = net.peers(x, return_stages=True).stages
    ref = 0.0
    for i, t in enumerate(net.targets):
        for b, container in enumerate(net.containers[i]):
            aligned = copy.deepcopy(container).double()(stages[i][b].double()).detach().numpy()
            ref += np.abs(aligned - stages[t][-1].double().detach().numpy()).mean()
    assert alignment_loss(out.aligned, out.final).item() == pytest.approx(ref, rel=1e-5)

    net.train()
    out = net(x)
    alignment_loss(out.aligned[:1], out.final[:1]).backward()          # peer 1's term only (its target: peer 2)
    peer1, peer2 = net.peers.single_network(0), net.peers.single_network(1)
    has_grad = lambda module: [p.grad is not None for p in module.parameters()]
    assert all(has_grad(peer1.stem)) and all(has_grad(peer1.stages[0])) and all(has_grad(peer1.stages[1]))
    assert not any(has_grad(peer1.stages[2])) and not any(has_grad(peer1.head))
    assert not any(has_grad(peer2)) and not any(has_grad(net.containers[1]))
    assert all(has_grad(net.containers[0]))


def _step_terms(m, batch):
    from engine.method import StepContext
    optimizers = {g.name: _optimizer_for(g) for g in m.optim_groups()}
    return m.train_step(m.model, batch, 0, StepContext(optimizers, torch.amp.GradScaler("cpu", enabled=False), "cpu"))


def test_final_term_is_weighted_and_off_at_zero():
    """`final` = lambda_final x the L1 sum on the step's own forward (train mode, batch statistics); with
    --final-weight 0 there are no containers and no `final` term."""
    from data import Batch
    torch.manual_seed(0)
    batch = Batch(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)), torch.arange(8))
    m = _method(["--arch", "resnet20", "--final-weight", "0.5"])
    trained = {id(p) for p in m.optim_groups()[0].params}                    # the peers' SGD group
    assert len(m.model.containers[0]) == 2 and all(id(p) in trained for p in m.model.containers.parameters())
    with torch.no_grad():
        out = m.model.train()(batch.images)
        expected = 0.5 * alignment_loss(out.aligned, out.final).item()
    assert _step_terms(m, batch)["final"].item() == pytest.approx(expected, rel=1e-5)

    off = _method(["--arch", "resnet20", "--final-weight", "0"])
    assert sum(p.numel() for p in off.model.containers.parameters()) == 0
    assert "final" not in _step_terms(off, batch)


def _optimizer_for(group):
    """The optimizer the engine builds for an OptimGroup (its factory, else SGD at lr 0.1)."""
    if group.optimizer is not None:
        return group.optimizer(group.params, lr=group.lr, weight_decay=group.weight_decay or 0.0, **group.extra)
    return torch.optim.SGD(group.params, lr=0.1, momentum=0.9)


# ---- runs end to end ---------------------------------------------------------------------------------
FAST = ["--dataset", "synthetic", "--subset", "64", "--eval-subset", "100", "--batch-size", "32", "--gpu", "-1",
        "--no-progress", "--workers", "0"]


@pytest.mark.parametrize("arch", ["resnet20", "wrn_16_2", "vgg16"])
@pytest.mark.slow
def test_one_epoch_every_family(arch, tmp_path):
    from engine import train
    from engine.checkpoint import load_checkpoint
    results = train(AMLN, FAST + ["--arch", arch, "--epochs", "1", "--out", str(tmp_path)])
    last = results["last"]
    assert set(last["train"]) >= {"ce", "kd", "adv", "final", "disc", "loss"} and "align" not in last["train"]
    assert all(math.isfinite(last["train"][k]) for k in ("ce", "kd", "adv", "final", "disc"))
    assert {"peer1/top1", "peer2/top1", "ensemble/top1"} <= set(last["test"])
    assert set(last["lr"]) == {"model", "discriminators"} and last["lr"]["discriminators"] == pytest.approx(2e-4)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert set(ckpt["optimizers"]) == {"model", "discriminators"}
    assert ckpt["optimizers"]["discriminators"]["param_groups"][0]["betas"] == (0.5, 0.999)
    assert set(ckpt["state"]) == {"model", "discriminators"}


_InterruptedAMLN = interrupted(AMLN, 1)


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path):
    """A run stopped between its two epochs and resumed ends with the same peers, discriminators, optimizer
    states (SGD momentum, Adam's moments and step) and metrics as the run that was never stopped."""
    from engine import train
    from engine.checkpoint import load_checkpoint
    args = FAST + ["--arch", "resnet20", "--epochs", "2", "--num-peers", "3"]
    full = train(AMLN, args + ["--out", str(tmp_path / "full")])
    with pytest.raises(KeyboardInterrupt):
        train(_InterruptedAMLN, args + ["--out", str(tmp_path / "cut")])
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 1
    resumed = train(AMLN, args + ["--out", str(tmp_path / "cut"), "--resume", "auto"])
    assert resumed["history"][1]["test"] == full["history"][1]["test"]
    for term in ("ce", "kd", "adv", "final", "disc", "loss"):
        assert resumed["history"][1]["train"][term] == full["history"][1]["train"][term]
    a, b = (load_checkpoint(tmp_path / d / "last.pt") for d in ("full", "cut"))
    for part in ("model", "discriminators"):
        assert a["state"][part].keys() == b["state"][part].keys()
        assert all(torch.equal(a["state"][part][k], b["state"][part][k]) for k in a["state"][part])
    for name in ("model", "discriminators"):
        sa, sb = a["optimizers"][name]["state"], b["optimizers"][name]["state"]
        assert sa.keys() == sb.keys() and all(
            torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i] if torch.is_tensor(sa[i][k]))
    assert a["optimizers"]["discriminators"]["state"][0]["step"].item() == 2 * 2   # 2 steps per epoch


def test_heterogeneous_pairs_are_adapted():
    """ResNet-20 (3 stages: 16x32x32, 32x16x16, 64x8x8) with VGG-16 (4 stages: 128x8x8, 256x4x4, 512x2x2,
    512x1x1): the pair uses the last three stages of each, at the target's width and the smaller spatial size
    (the larger map is pooled down, whichever side it is on; nothing is upsampled)."""
    m = _method(["--arch", "resnet20,vgg16"])
    net = m.model
    assert net.pairs == [[(0, 1), (1, 2), (2, 3)], [(1, 0), (2, 1), (3, 2)]]
    assert net.block_shapes == [[(256, 4, 4), (512, 2, 2), (512, 1, 1)], [(16, 4, 4), (32, 2, 2), (64, 1, 1)]]
    # the containers of the intermediate blocks end at the target's final map: VGG's 512x1x1 for the ResNet, the
    # ResNet's 64x8x8 pooled down to VGG's smaller 4x4 and 2x2 maps
    assert net.final_shapes == [[(512, 1, 1), (512, 1, 1)], [(64, 4, 4), (64, 2, 2)]]
    assert [type(l).__name__ for l in net.adapters[0][2]] == ["AdaptiveAvgPool2d", "Conv2d", "BatchNorm2d"]
    assert [type(l).__name__ for l in net.adapters[1][0]] == ["Conv2d", "BatchNorm2d"]     # 4x4 already
    x = torch.randn(2, 3, 32, 32)
    out = net(x)
    for i in range(2):
        for f, r, shape in zip(out.fake[i], out.real[i], net.block_shapes[i]):
            assert f.shape[1:] == r.shape[1:] == shape
        for a, f, shape in zip(out.aligned[i], out.final[i], net.final_shapes[i]):
            assert a.shape[1:] == f.shape[1:] == shape
    net.eval()
    stages = net.peers(x, return_stages=True).stages
    # peer 2 (VGG) imitates peer 1 (ResNet): ResNet's 16x32x32 stage-1 map average-pooled to 4x4 is "real", and
    # its 64x8x8 final map average-pooled to 4x4 is what VGG's first intermediate block is aligned with
    out = net(x)
    assert torch.allclose(out.real[1][0], F.adaptive_avg_pool2d(stages[0][0], 4))
    assert torch.allclose(out.final[1][0], F.adaptive_avg_pool2d(stages[0][2], 4))
    assert torch.allclose(out.final[1][1], F.adaptive_avg_pool2d(stages[0][2], 2))


@pytest.mark.slow
def test_heterogeneous_pair_one_epoch(tmp_path):
    from engine import train
    results = train(AMLN, FAST + ["--arch", "resnet20,wrn_16_2", "--epochs", "1", "--out", str(tmp_path)])
    assert results["peer_archs"] == {"peer1": "resnet20", "peer2": "wrn_16_2"}
    assert math.isfinite(results["last"]["train"]["adv"]) and "ensemble/top1" in results["last"]["test"]


@pytest.mark.slow
def test_two_ranks_keep_one_set_of_discriminators(tmp_path):
    """Under torchrun the discriminators live outside DDP; their gradients are averaged over the ranks by hand,
    so after training both ranks hold the same discriminators (and the same peers)."""
    from tests.test_distributed import torchrun
    torchrun("train_amln", *FAST, "--arch", "resnet20", "--subset", "128", "--epochs", "1", "--out", str(tmp_path))
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["model"] for r in (0, 1))
    for part in ("model", "discriminators"):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part])


def test_grouped_peers_give_the_same_blocks():
    """--grouped-peers runs the peers as one grouped network: the logits and the block maps AMLN compares are
    the same as with separate peers."""
    import copy
    m = _method(["--arch", "resnet20"])
    plain = m.model.eval()
    grouped = copy.deepcopy(plain)
    grouped.peers.group_branches()
    x = torch.randn(3, 3, 32, 32)
    a, b = plain(x), grouped(x)
    for za, zb in zip(a.logits, b.logits):
        assert torch.allclose(za, zb, atol=1e-5)
    for part in ("fake", "real", "aligned", "final"):
        for ra, rb in zip(getattr(a, part), getattr(b, part)):
            assert all(torch.allclose(u, v, atol=1e-5) for u, v in zip(ra, rb))


FASHION = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").path.exists(FASHION), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_three_epochs_clear_chance(tmp_path):
    """Real data, the issue's check: 3 epochs of two ResNet-20 peers on 6,000 Fashion-MNIST training images
    (stratified), tested on 2,000 (stratified); every head and every loss term is recorded at every epoch. At lr
    0.05 and batch 64: at the recipe's lr 0.1 and batch 128 (141 steps, the last batch of each epoch kept) the
    peers had not left mutual learning's slow start (measured 30.0 % for the ensemble after epoch 3, 47.5 % before
    the last batch was kept: docs/amln.md, "Measured here"). Measured (seed 0, CPU, one thread, 4.5 minutes):
    peer1/peer2/ensemble top-1 43.2/31.8/48.2 % after epoch 1, 34.6/51.4/54.6 after epoch 2, 65.2/57.0/68.5
    after epoch 3; train CE per peer 1.55 -> 0.97. Chance is 10 %."""
    from engine import train
    results = train(AMLN, ["--arch", "resnet20", "--dataset", "fashion-mnist", "--subset", "6000", "--eval-subset",
                           "2000", "--epochs", "3", "--batch-size", "64", "--lr", "0.05", "--gpu", "-1",
                           "--no-progress", "--workers", "0", "--out", str(tmp_path)])
    for record in results["history"]:
        assert {f"{h}/{k}" for h in ("peer1", "peer2", "ensemble") for k in ("top1", "top5")} <= set(record["test"])
        assert {"ce", "kd", "adv", "final", "disc", "loss"} <= set(record["train"])
        assert set(record["lr"]) == {"model", "discriminators"}
    last = results["last"]
    assert last["test"]["ensemble/top1"] > 30 and max(last["test"]["peer1/top1"], last["test"]["peer2/top1"]) > 30
    assert last["train"]["ce"] / 2 < 1.6 and results["history"][0]["train"]["ce"] > last["train"]["ce"]
