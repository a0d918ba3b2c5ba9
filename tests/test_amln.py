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
from models.peers import Peers
from train_amln import (AMLN, AMLNNet, Adapter, Discriminator, adversarial_loss, alignment_loss, cyclic_targets,
                        discriminators_loss, paired_stages, stage_shapes)


def _method(argv, num_classes=10, image_size=32):
    args = parse_args(AMLN, ["--gpu", "-1"] + argv)
    AMLN.check_args(args)
    return AMLN(args, num_classes, n_train=100, image_size=image_size)


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


def test_bad_flags_are_one_line_errors():
    from engine import UserError
    for argv in (["--kd-T", "0"], ["--disc-lr", "-1"], ["--adv-weight", "-1"], ["--disc-betas", "1", "0.9"]):
        args = parse_args(AMLN, ["--gpu", "-1"] + argv)
        with pytest.raises(UserError):
            AMLN.check_args(args)
