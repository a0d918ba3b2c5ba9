"""Peer topologies (models/peers.py; split points and ILR: docs/backbones.md).

* trunk + one branch is exactly the backbone: parameter counts for every registered backbone and
  every split, and identical outputs after copying a standalone backbone's weights in;
* total parameter counts per topology (independent, shared, CL-ILR tree with N = 2, 3, 4);
* ILR gradient rescaling, against gradients computed independently without the ``ilr`` op;
* storage: independent peers share nothing, shared branches share the one trunk (and tree groups);
* unknown names raise the listing ``UnknownModelError``;
* default split points per family (docs/backbones.md) and the shapes of ``PeerOutput``.

Parameter-count and shape checks build the models on the ``meta`` device (no memory, no compute);
numerical checks use small CPU models, batch 2.
"""
from __future__ import annotations

import math
import re
from functools import lru_cache

import pytest
import torch
from torch import nn

import models.peers as peers_module
from models import UnknownModelError, count_parameters, create_model, list_models
from models.peers import PeerOutput, Peers, ilr, resolve_split




def on_meta(fn, *args, **kwargs):
    with torch.device("meta"):
        return fn(*args, **kwargs)


@lru_cache(maxsize=None)
def meta_backbone(arch: str):
    """Shape-only backbone at 100 classes (the tests below never change these models)."""
    return on_meta(create_model, arch, num_classes=100)


@lru_cache(maxsize=None)
def meta_peers(arch: str, n: int, topology: str, split=None):
    """Shape-only ``Peers`` at 100 classes, cached across tests (they never change these models)."""
    return on_meta(Peers, arch, 100, n, topology, split)


def stage_split_counts(backbone, k):
    """(trunk, stage k, stages[k:] + head, stages[k+1:] + head) parameter counts of a standalone backbone."""
    trunk = count_parameters(backbone.stem) + sum(count_parameters(s) for s in backbone.stages[:k])
    rest = sum(count_parameters(s) for s in backbone.stages[k:]) + count_parameters(backbone.head)
    group = count_parameters(backbone.stages[k]) if k < backbone.num_stages else 0
    return trunk, group, rest, rest - group


def randomize_bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN running statistics and affine parameters, so an eval-mode comparison checks them too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.2 * torch.rand(m.running_var.shape, generator=g))
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


# ------------------------------------------------------------------------------------------------
# Trunk + one branch == the backbone.

@pytest.mark.parametrize("split", ["dml", "one", 1])
@pytest.mark.parametrize("arch", list_models())
def test_trunk_plus_branch_param_count_equals_backbone(arch, split):
    backbone = meta_backbone(arch)
    peers = meta_peers(arch, 1, "shared", split)
    expected = count_parameters(backbone)
    assert count_parameters(peers.trunk) + count_parameters(peers.branches[0]) == expected
    assert count_parameters(peers.single_network(0)) == expected
    assert peers.single_network(0).num_stages == backbone.num_stages


@pytest.mark.parametrize("arch", list_models())
def test_tree_trunk_group_branch_equals_backbone(arch):
    backbone = meta_backbone(arch)
    peers = meta_peers(arch, 2, "tree")
    parts = count_parameters(peers.trunk) + count_parameters(peers.groups[0]) + count_parameters(peers.branches[0])
    assert parts == count_parameters(backbone)
    assert count_parameters(peers.single_network(1)) == count_parameters(backbone)


def peer_key(key: str, topology: str, k: int, peer: int) -> str:
    """Name of a standalone backbone's state-dict entry inside ``Peers`` (peer ``peer``, split ``k``)."""
    if topology == "independent":
        return f"branches.{peer}.{key}"
    if key.startswith("stem."):
        return "trunk." + key
    if key.startswith("head."):
        return f"branches.{peer}.{key}"
    m = re.match(r"stages\.(\d+)\.(.*)", key)
    j, rest = int(m.group(1)), m.group(2)
    if j < k:
        return f"trunk.stages.{j}.{rest}"
    if topology == "tree":
        if j == k:
            return f"groups.{peer // 2}.{rest}"
        return f"branches.{peer}.stages.{j - k - 1}.{rest}"
    return f"branches.{peer}.stages.{j - k}.{rest}"


@pytest.mark.parametrize("topology,split,n", [("independent", None, 2), ("shared", "dml", 2),
                                              ("shared", "one", 3), ("shared", 0, 2), ("tree", None, 3)])
def test_state_dict_name_mapping_reproduces_backbone(topology, split, n):
    """Every peer is the backbone after a pure renaming of the backbone's state dict (strict load)."""
    torch.manual_seed(0)
    backbone = randomize_bn_stats(create_model("resnet32", num_classes=10)).eval()
    peers = Peers("resnet32", 10, n, topology, split).eval()
    state = backbone.state_dict()
    mapped = {peer_key(key, topology, peers.split, i): v for i in range(n) for key, v in state.items()}
    peers.load_state_dict(mapped, strict=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        reference = backbone(x, return_features=True)
        out = peers(x, return_features=True)
    for i in range(n):
        torch.testing.assert_close(out.logits[i], reference.logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(out.features[i], reference.features, rtol=0, atol=1e-6)


EQUIVALENCE_CASES = [  # (arch, kwargs, input size)
    ("resnet32", {}, 16),
    ("vgg16", {}, 32),
    ("densenet40_12", {}, 16),
    ("hcgnet_a1", {}, 16),
    ("resnet18", {"image_size": 32}, 32),   # small stem at 32x32
]


@pytest.mark.parametrize("topology,split", [("shared", "dml"), ("shared", "one"), ("tree", None)])
@pytest.mark.parametrize("arch,kwargs,size", EQUIVALENCE_CASES)
def test_peers_reproduce_backbone_outputs(arch, kwargs, size, topology, split):
    """Load a standalone backbone into every ``single_network(i)``: each peer's output equals the backbone's."""
    torch.manual_seed(0)
    backbone = randomize_bn_stats(create_model(arch, num_classes=10, **kwargs)).eval()
    n = 2
    peers = Peers(arch, 10, n, topology, split, **kwargs).eval()
    for i in range(n):
        peers.single_network(i).load_state_dict(backbone.state_dict(), strict=True)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        reference = backbone(x, return_features=True, return_stages=True)
        out = peers(x, return_features=True, return_stages=True)
        alone = peers.single_network(1)(x)
    for i in range(n):
        torch.testing.assert_close(out.logits[i], reference.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.features[i], reference.features, rtol=1e-5, atol=1e-5)
        for mine, theirs in zip(out.stages[i], reference.stages):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone, reference.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.trunk, reference.stages[peers.split - 1], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Total parameter counts per topology.

@pytest.mark.parametrize("arch", ["resnet32", "vgg16", "densenet40_12", "hcgnet_a1", "resnet18", "wrn_16_2"])
@pytest.mark.slow
def test_total_parameter_counts(arch):
    backbone = meta_backbone(arch)
    single = count_parameters(backbone)
    assert count_parameters(meta_peers(arch, 3, "independent")) == 3 * single
    for split in ("dml", "one", 0):
        k = resolve_split(backbone, split)
        trunk, _, branch, _ = stage_split_counts(backbone, k)
        for n in (3,):
            peers = meta_peers(arch, n, "shared", split)
            assert peers.split == k
            assert count_parameters(peers) == trunk + n * branch
    k = resolve_split(backbone, "dml")
    trunk, group, _, branch = stage_split_counts(backbone, k)
    for n in (2, 3, 4):
        peers = meta_peers(arch, n, "tree")
        groups = math.ceil(n / 2)
        assert len(peers.groups) == groups
        assert peers.group_of == [i // 2 for i in range(n)]
        assert count_parameters(peers) == trunk + groups * group + n * branch


# ------------------------------------------------------------------------------------------------
# ILR: identity forward, gradient / k backward.

def test_ilr_unit():
    x = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    for k in (2, 3, 4):
        y = ilr(x, k)
        assert torch.equal(y, x) and y.shape == x.shape and y.dtype == x.dtype
        upstream = torch.randn(3, 4, dtype=torch.double)
        grad, = torch.autograd.grad(y, x, upstream)
        torch.testing.assert_close(grad, upstream / k, rtol=0, atol=0)
    assert ilr(x, 1) is x                          # a single consumer: no op at all
    # inside a graph: d/dx sum(w * ilr(x^2, 2)) = w * 2x / 2
    w = torch.randn(3, 4, dtype=torch.double)
    grad, = torch.autograd.grad((w * ilr(x * x, 2)).sum(), x)
    torch.testing.assert_close(grad, w * x.detach())


def make_tree(n: int) -> Peers:
    torch.manual_seed(0)
    peers = Peers("resnet20", 5, n, "tree").double()
    randomize_bn_stats(peers)
    return peers.eval()


def tree_loss(peers: Peers, x: torch.Tensor, weights: list[torch.Tensor]):
    out = peers(x)
    return sum((w * z).sum() for w, z in zip(weights, out.logits)), out


@pytest.mark.parametrize("n", [2, 3, 4])
def test_tree_ilr_gradients_match_independent_computation(n):
    """Peers' gradients vs. a hand-written forward without ilr: trunk / ceil(N/2), group / its branch count."""
    peers = make_tree(n)
    x = torch.randn(2, 3, 8, 8, dtype=torch.double)
    weights = [torch.randn(2, 5, dtype=torch.double) for _ in range(n)]
    loss, out = tree_loss(peers, x, weights)
    trunk_params = list(peers.trunk.parameters())
    grads = torch.autograd.grad(loss, [out.trunk] + trunk_params + list(peers.groups.parameters())
                                + list(peers.branches.parameters()))
    got_trunk, grads = grads[0], grads[1:]

    # Independent computation: no ilr op, the factors applied by hand.
    num_groups = math.ceil(n / 2)
    t = out.trunk.detach().requires_grad_()
    expected_trunk = torch.zeros_like(t)
    expected_group, expected_branch = [], []
    for g in range(num_groups):
        members = [i for i in range(n) if i // 2 == g]
        h = peers.groups[g](t)
        h_in = h.detach().requires_grad_()
        part = sum((weights[i] * peers.branches[i](h_in)).sum() for i in members)
        grad_h, *branch_grads = torch.autograd.grad(
            part, [h_in] + [p for i in members for p in peers.branches[i].parameters()])
        expected_branch += branch_grads                         # branches: not rescaled
        grad_h = grad_h / len(members)                          # group output: / its consumers (1 or 2)
        grad_t, *group_grads = torch.autograd.grad(h, [t] + list(peers.groups[g].parameters()), grad_h)
        expected_group += group_grads
        expected_trunk += grad_t / num_groups                   # trunk output: / number of groups
    torch.testing.assert_close(got_trunk, expected_trunk)
    fresh_trunk, _ = peers.trunk(x)
    expected_trunk_params = torch.autograd.grad(fresh_trunk, trunk_params, expected_trunk)
    expected = list(expected_trunk_params) + expected_group + expected_branch
    assert len(expected) == len(grads)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("n,trunk_factor,group_factors", [(2, 1 / 2, [1 / 2]), (4, 1 / 4, [1 / 2, 1 / 2]),
                                                          (3, None, [1 / 2, 1.0])])
def test_tree_ilr_factors_against_unscaled_gradients(monkeypatch, n, trunk_factor, group_factors):
    """With every group feeding two branches the trunk gradient is exactly unscaled / (2 x groups);
    group parameters get unscaled / consumers (1 for the lone group of an odd N); branches are untouched."""
    peers = make_tree(n)
    x = torch.randn(2, 3, 8, 8, dtype=torch.double)
    weights = [torch.randn(2, 5, dtype=torch.double) for _ in range(n)]

    def grads():
        loss, out = tree_loss(peers, x, weights)
        return torch.autograd.grad(loss, [out.trunk] + [list(g.parameters())[0] for g in peers.groups]
                                   + [list(b.parameters())[0] for b in peers.branches])

    scaled = grads()
    monkeypatch.setattr(peers_module, "ilr", lambda t, k: t)
    unscaled = grads()
    if trunk_factor is not None:
        torch.testing.assert_close(scaled[0], unscaled[0] * trunk_factor)
    for g, factor in enumerate(group_factors):
        torch.testing.assert_close(scaled[1 + g], unscaled[1 + g] * factor)
    for i in range(n):
        torch.testing.assert_close(scaled[1 + len(group_factors) + i], unscaled[1 + len(group_factors) + i])


def test_shared_topology_has_no_rescaling(monkeypatch):
    """Only the tree rescales: a shared trunk sums its branches' gradients (ONE / DML / MCL-OKD)."""
    calls = []
    monkeypatch.setattr(peers_module, "ilr", lambda t, k: calls.append(k) or t)
    Peers("resnet20", 5, 3, "shared", "dml")(torch.randn(2, 3, 8, 8))
    assert calls == []
    Peers("resnet20", 5, 3, "tree")(torch.randn(2, 3, 8, 8))
    assert calls == [2, 2, 1]                        # trunk: 2 groups; group 0: 2 branches; group 1: 1


# ------------------------------------------------------------------------------------------------
# Storage.

def test_independent_peers_share_no_storage():
    peers = Peers("resnet20", 10, 3, "independent")
    ptrs = [{p.data_ptr() for p in branch.parameters()} for branch in peers.branches]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not ptrs[i] & ptrs[j]
    assert peers.trunk is None and len(peers.groups) == 0
    # separately initialised, and changing one leaves the others alone
    w = [b.stem.conv.weight for b in peers.branches]
    assert not torch.equal(w[0], w[1])
    before = [t.detach().clone() for t in w[1:]]
    with torch.no_grad():
        w[0].add_(1.0)
    for t, b in zip(w[1:], before):
        assert torch.equal(t, b)
    assert peers.single_network(2) is peers.branches[2]


def test_shared_branches_are_distinct_but_share_the_trunk():
    peers = Peers("resnet20", 10, 3, "shared", "dml")
    branches = list(peers.branches)
    assert len({id(b) for b in branches}) == 3
    ptrs = [{p.data_ptr() for p in b.parameters()} for b in branches]
    trunk_ptrs = {p.data_ptr() for p in peers.trunk.parameters()}
    for i in range(3):
        assert not ptrs[i] & trunk_ptrs
        for j in range(i + 1, 3):
            assert not ptrs[i] & ptrs[j]
    nets = [peers.single_network(i) for i in range(3)]
    for net in nets:
        assert net.stem is peers.trunk.stem
        assert net.stages[0] is peers.trunk.stages[0]
    assert nets[0].stages[1] is not nets[1].stages[1]
    # one trunk: a change through one peer's view is seen by all of them
    with torch.no_grad():
        nets[0].stem.conv.weight.mul_(2.0)
    assert nets[1].stem.conv.weight.data_ptr() == nets[0].stem.conv.weight.data_ptr()
    assert torch.equal(nets[2].stem.conv.weight, peers.trunk.stem.conv.weight)


def test_tree_groups_are_shared_by_pairs():
    peers = Peers("resnet20", 10, 3, "tree")
    k = peers.split
    nets = [peers.single_network(i) for i in range(3)]
    assert nets[0].stages[k] is nets[1].stages[k] is peers.groups[0]
    assert nets[2].stages[k] is peers.groups[1] is not peers.groups[0]
    assert {p.data_ptr() for p in peers.groups[0].parameters()}.isdisjoint(
        p.data_ptr() for p in peers.groups[1].parameters())
    assert all(net.stem is peers.trunk.stem for net in nets)


# ------------------------------------------------------------------------------------------------
# Errors.

def test_unknown_name_lists_the_valid_names():
    for build in (lambda: create_model("resnet_nonexistent"),
                  lambda: Peers("resnet_nonexistent", 10, 2, "shared")):
        with pytest.raises(UnknownModelError) as err:
            build()
        message = str(err.value)
        assert "resnet_nonexistent" in message
        assert all(name in message for name in list_models())
    assert issubclass(UnknownModelError, ValueError)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="topology"):
        Peers("resnet20", 10, 2, "star")
    with pytest.raises(ValueError, match="split"):
        on_meta(Peers, "resnet20", 10, 2, "shared", "middle")
    with pytest.raises(ValueError, match="split"):
        on_meta(Peers, "resnet20", 10, 2, "shared", 4)
    with pytest.raises(ValueError):
        on_meta(Peers, "resnet20", 10, 2, "tree", "one")      # no room for a group and a branch
    with pytest.raises(ValueError):
        on_meta(Peers, "resnet20", 10, 1, "tree")
    with pytest.raises(ValueError):
        on_meta(Peers, "resnet20", 10, 0, "shared")
    with pytest.raises(ValueError):
        on_meta(Peers, "resnet20", 10, 2, "independent").trunk_width


# ------------------------------------------------------------------------------------------------
# Split points (docs/backbones.md) and output shapes.

def family_splits(name: str) -> tuple[int, int]:
    """Expected (dml, one) trunk stage counts per family (docs/backbones.md, split points)."""
    if name in ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenetv2", "mobilenetv2_x0_5") or name == "vgg16":
        return 2, 3
    if re.fullmatch(r"resnet\d+(_bottleneck)?|wrn_\d+_\d+|densenet40_12|hcgnet_a\d", name):
        return 1, 2
    raise AssertionError(f"no official split rule written down for {name}; add it to this test")


@pytest.mark.parametrize("arch", list_models())
def test_default_split_points_per_family(arch):
    backbone = meta_backbone(arch)
    dml, one = family_splits(arch)
    assert resolve_split(backbone, "dml") == dml
    assert resolve_split(backbone, "one") == one
    assert meta_peers(arch, 1, "shared").split == one               # shared default: the ONE split
    assert meta_peers(arch, 1, "shared", "dml").split == dml
    assert meta_peers(arch, 2, "tree").split == dml                 # CL-ILR: DML trunk, one group stage


@pytest.mark.parametrize("arch,dml_width,one_width,dml_convs,one_convs", [
    ("resnet32", 16, 32, 1 + 10, 1 + 10 + 11),          # stem conv + layer1 (5 blocks x 2) [+ layer2 incl. projection]
    ("vgg16", 256, 512, 2 + 2 + 3, 2 + 2 + 3 + 3),      # conv1, conv2, layer1, layer2 [+ layer3]
    ("densenet40_12", 48, 60, 1 + 12 + 1, 1 + 12 + 1 + 12 + 1),   # conv0 + block1 + trans1 [+ block2 + trans2]
    ("resnet34", 128, 256, 1 + 6 + 9, 1 + 6 + 9 + 13),  # stem + layer1 + layer2 [+ layer3]
])
def test_trunk_contents(arch, dml_width, one_width, dml_convs, one_convs):
    for split, width, convs in (("dml", dml_width, dml_convs), ("one", one_width, one_convs)):
        peers = meta_peers(arch, 1, "shared", split)
        assert peers.trunk_width == width
        assert sum(isinstance(m, nn.Conv2d) for m in peers.trunk.modules()) == convs


def test_output_shapes_resnet32_shared():
    peers = Peers("resnet32", 10, 2, "shared", "dml").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = peers(x, return_features=True, return_stages=True)
        plain = peers(x)
    assert isinstance(out, PeerOutput)
    assert [z.shape for z in out.logits] == [torch.Size([2, 10])] * 2
    assert [f.shape for f in out.features] == [torch.Size([2, 64])] * 2
    for maps in out.stages:
        assert [m.shape for m in maps] == [(2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8)]
    assert out.stages[0][0] is out.stages[1][0] is out.trunk          # the shared map, repeated
    assert out.trunk.shape == (2, peers.trunk_width, 32, 32)
    assert plain.features is None and plain.stages is None and plain.trunk.shape == out.trunk.shape
    assert len(plain.logits) == 2


@pytest.mark.parametrize("arch,size,n,topology,split", [
    ("vgg16", 32, 3, "shared", "one"),
    ("densenet40_12", 32, 3, "tree", None),
    ("hcgnet_a1", 32, 2, "shared", "dml"),
    ("resnet34", 224, 2, "shared", "dml"),          # MCL-OKD ImageNet: trunk 128 x 28 x 28
    ("resnet18", 64, 2, "independent", None),
])
def test_output_shapes_follow_backbone(arch, size, n, topology, split):
    kwargs = {"image_size": size} if arch.startswith("resnet") and size != 224 else {}
    backbone = on_meta(create_model, arch, num_classes=7, **kwargs).eval()
    peers = on_meta(Peers, arch, 7, n, topology, split, **kwargs).eval()
    x = torch.zeros(2, 3, size, size, device="meta")
    ref = backbone(x, return_features=True, return_stages=True)
    out = peers(x, return_features=True, return_stages=True)
    assert len(out.logits) == len(out.features) == len(out.stages) == n
    for i in range(n):
        assert out.logits[i].shape == (2, 7)
        assert out.features[i].shape == (2, backbone.feature_dim) == (2, peers.feature_dim)
        assert [m.shape for m in out.stages[i]] == [m.shape for m in ref.stages]
        assert [m.shape[1] for m in out.stages[i]] == backbone.stage_widths
    if topology == "independent":
        assert out.trunk is None
    else:
        assert out.trunk.shape == ref.stages[peers.split - 1].shape
        assert out.trunk.shape[1] == peers.trunk_width
    if arch == "resnet34":
        assert out.trunk.shape == (2, 128, 28, 28)
