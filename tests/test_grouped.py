"""--grouped-peers: N branches run as one grouped network must be the N branches, in every number.

Checked in float64 against the plain (separate-module) peers built from the same weights: outputs,
features and stage maps; gradients of every parameter; BatchNorm running statistics; several SGD steps
(momentum, Nesterov, weight decay); and a whole training run through the engine.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import train_cmff
import train_dml
import train_baseline
from engine import UserError, train
from engine.checkpoint import load_checkpoint
from models import create_model
from models.grouped import GroupedLinear, NotGroupableError, merge, split
from models.peers import Peers

FAMILIES = [("resnet20", {}), ("resnet110_bottleneck", {}), ("wrn_16_2", {}), ("vgg16", {}),
            ("resnet18", {"image_size": 32})]
TOPOLOGIES = [("independent", None, 2), ("independent", None, 3), ("shared", "dml", 2), ("shared", "one", 4),
              ("tree", None, 3)]


def plain_and_grouped(arch, kw, topology, split_at, n):
    torch.manual_seed(0)
    plain = Peers(arch, 10, n, topology, split_at, **kw).double()
    grouped = copy.deepcopy(plain).group_branches()
    return plain, grouped


def peer_slice(wide: torch.nn.Module, name: str, t: torch.Tensor, n: int, i: int) -> torch.Tensor:
    """Peer i's part of the wide tensor ``t`` held at ``name``: an index for the classifier, else a chunk."""
    module = wide.get_submodule(name.rsplit(".", 1)[0])
    if isinstance(module, GroupedLinear):
        return t[i]
    return t.chunk(n)[i] if t.dim() else t


def loss_of(out, y):
    """A loss that weighs every peer, feature and stage map differently (so a swapped gradient shows)."""
    loss = sum((k + 1) * F.cross_entropy(z, y) for k, z in enumerate(out.logits))
    loss = loss + sum(0.1 * (k + 1) * f.pow(2).mean() for k, f in enumerate(out.features))
    return loss + sum(0.01 * (k + 1) * m.mean() for k, maps in enumerate(out.stages) for m in maps)


@pytest.mark.parametrize("arch,kw", FAMILIES, ids=[f[0] for f in FAMILIES])
@pytest.mark.parametrize("topology,split_at,n", TOPOLOGIES, ids=[f"{t}-{s}-{n}" for t, s, n in TOPOLOGIES])
@pytest.mark.slow
def test_grouped_forward_and_gradients_equal_plain(arch, kw, topology, split_at, n):
    plain, grouped = plain_and_grouped(arch, kw, topology, split_at, n)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([0, 3, 5, 9])
    a = plain(x, return_features=True, return_stages=True)
    b = grouped(x, return_features=True, return_stages=True)
    for za, zb in zip(a.logits, b.logits):
        torch.testing.assert_close(zb, za, rtol=0, atol=1e-11)
    assert not torch.allclose(a.logits[0], a.logits[1])            # the peers really differ
    for fa, fb in zip(a.features, b.features):
        torch.testing.assert_close(fb, fa, rtol=0, atol=1e-11)
    for sa, sb in zip(a.stages, b.stages):
        assert len(sa) == len(sb)
        for ma, mb in zip(sa, sb):
            torch.testing.assert_close(mb, ma, rtol=0, atol=1e-11)
    loss_of(a, y).backward()
    loss_of(b, y).backward()
    wide = grouped.branches.wide
    for name, wp in wide.named_parameters():
        for i in range(n):
            pp = plain.branches[i].get_parameter(name)
            torch.testing.assert_close(peer_slice(wide, name, wp.grad, n, i), pp.grad, rtol=0, atol=1e-10)
    # What the branches share (trunk, CL-ILR groups) gets the same summed gradient.
    for (na, pa), (nb, pb) in zip(plain.named_parameters(), grouped.named_parameters()):
        if not na.startswith("branches."):
            assert na == nb
            torch.testing.assert_close(pb.grad, pa.grad, rtol=0, atol=1e-10)
    # BatchNorm running statistics moved per peer exactly as in the separate networks.
    for name, wb in wide.named_buffers():
        for i in range(n):
            torch.testing.assert_close(peer_slice(wide, name, wb, n, i), plain.branches[i].get_buffer(name),
                                       rtol=0, atol=1e-12)


def test_sgd_steps_are_identical():
    plain, grouped = plain_and_grouped("resnet20", {}, "independent", None, 2)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
            for m in (plain, grouped)]
    torch.manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (8,))
        for model, opt in zip((plain, grouped), opts):
            out = model(x)
            loss = sum(F.cross_entropy(z, y) for z in out.logits) + \
                F.kl_div(F.log_softmax(out.logits[0], 1), F.softmax(out.logits[1].detach(), 1), reduction="batchmean")
            opt.zero_grad()
            loss.backward()
            opt.step()
    for i in range(2):
        back = grouped.single_network(i)
        for (name, pa), pb in zip(plain.branches[i].state_dict().items(), back.state_dict().values()):
            torch.testing.assert_close(pb, pa, rtol=0, atol=1e-10, msg=name)


def _sgd_steps(models_opts, steps=3, seed=1):
    torch.manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (8,))
        for model, opt in models_opts:
            out = model(x)
            loss = sum((k + 1) * F.cross_entropy(z, y) for k, z in enumerate(out.logits))
            opt.zero_grad()
            loss.backward()
            opt.step()


@pytest.mark.parametrize("topology,split_at,n", [("independent", None, 3), ("shared", "one", 2), ("tree", None, 3)])
@pytest.mark.slow
def test_plain_layout_of_weights_and_momentum_in_float64(topology, split_at, n):
    """Checkpoints hold the plain layout: a grouped model's weights, BN statistics and SGD momentum, split
    per peer, are the plain model's (float64, after the same steps), and the conversions are exact inverses
    in both directions (grouped -> plain -> grouped and plain -> grouped -> plain are bit-identical)."""
    from models.grouped import grouped_optimizer_state, param_names, plain_optimizer_state
    from models.grouped import convert_state, peer_blocks, plain_state
    plain, grouped = plain_and_grouped("resnet20", {}, topology, split_at, n)
    sgd = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    p_opt, g_opt = torch.optim.SGD(plain.parameters(), **sgd), torch.optim.SGD(grouped.parameters(), **sgd)
    _sgd_steps([(plain, p_opt), (grouped, g_opt)])
    names = param_names(g_opt, grouped)
    # grouped -> plain: the plain model's state, keys and positions included
    as_plain = plain_state(grouped, grouped.state_dict())
    assert list(as_plain) and set(as_plain) == set(plain.state_dict())
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(as_plain[k], v, rtol=0, atol=1e-10, msg=k)
    opt_plain = plain_optimizer_state(g_opt.state_dict(), names, grouped)
    ref = p_opt.state_dict()
    assert opt_plain["param_groups"][0]["params"] == ref["param_groups"][0]["params"]
    assert set(opt_plain["state"]) == set(ref["state"])
    for j, s in ref["state"].items():
        torch.testing.assert_close(opt_plain["state"][j]["momentum_buffer"], s["momentum_buffer"], rtol=0, atol=1e-10)
    # plain -> grouped -> plain and grouped -> plain -> grouped: bit-identical
    blocks = peer_blocks(grouped)
    back = convert_state(as_plain, grouped.state_dict(), blocks)
    assert back.keys() == grouped.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in grouped.state_dict().items())
    p_state = plain.state_dict()
    there_and_back = plain_state(grouped, convert_state(p_state, grouped.state_dict(), blocks))
    assert all(torch.equal(there_and_back[k], v) for k, v in p_state.items())
    opt_back = grouped_optimizer_state(opt_plain, names, grouped)
    g_ref = g_opt.state_dict()
    assert opt_back["param_groups"][0]["params"] == g_ref["param_groups"][0]["params"]
    assert all(torch.equal(opt_back["state"][k]["momentum_buffer"], s["momentum_buffer"]) for k, s in g_ref["state"].items())
    opt_there_and_back = plain_optimizer_state(grouped_optimizer_state(ref, names, grouped), names, grouped)
    assert all(torch.equal(opt_there_and_back["state"][j]["momentum_buffer"], s["momentum_buffer"])
               for j, s in ref["state"].items())
    # Both directions continue as one run: the grouped run resumed plain goes on as the grouped run does,
    # the plain run resumed grouped as the plain run does.
    plain2, grouped2 = copy.deepcopy(plain), copy.deepcopy(grouped)
    plain2.load_state_dict(as_plain)
    p2_opt = torch.optim.SGD(plain2.parameters(), **sgd)
    p2_opt.load_state_dict(copy.deepcopy(opt_plain))      # as through a checkpoint file: no shared tensors
    grouped2.load_state_dict(convert_state(p_state, grouped2.state_dict(), blocks))
    g2_opt = torch.optim.SGD(grouped2.parameters(), **sgd)
    g2_opt.load_state_dict(copy.deepcopy(grouped_optimizer_state(ref, names, grouped2)))
    _sgd_steps([(plain, p_opt), (grouped, g_opt), (plain2, p2_opt), (grouped2, g2_opt)], steps=2, seed=2)
    grouped_on, grouped2_on = plain_state(grouped, grouped.state_dict()), plain_state(grouped2, grouped2.state_dict())
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(plain2.state_dict()[k], grouped_on[k], rtol=0, atol=1e-10, msg=k)
        torch.testing.assert_close(grouped2_on[k], v, rtol=0, atol=1e-10, msg=k)


def test_merge_then_split_gives_the_networks_back():
    torch.manual_seed(0)
    nets = [create_model("wrn_16_2", 10) for _ in range(3)]
    for net in nets:  # non-trivial running statistics
        net(torch.randn(4, 3, 32, 32))
    wide = merge(nets)
    assert sum(p.numel() for p in wide.parameters()) == 3 * sum(p.numel() for p in nets[0].parameters())
    for i, net in enumerate(nets):
        back = split(wide, 3, i)
        assert type(back) is type(net)
        for (name, a), b in zip(net.state_dict().items(), back.state_dict().values()):
            assert torch.equal(a, b), name


def test_single_network_of_grouped_peers_is_the_peer():
    plain, grouped = plain_and_grouped("resnet20", {}, "shared", "one", 3)
    plain.eval(), grouped.eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(grouped.single_network(2)(x), plain.single_network(2)(x), rtol=0, atol=1e-11)


@pytest.mark.parametrize("arch", ["densenet40_12", "hcgnet_a1"])
def test_channel_mixing_families_are_refused(arch):
    with pytest.raises(NotGroupableError, match="not known to act per channel"):
        Peers(arch, 10, 2).group_branches()


def test_different_structures_are_refused():
    with pytest.raises(NotGroupableError, match="differ in structure"):
        merge([create_model("resnet20", 10), create_model("vgg16", 10)])


FAST = ["--dataset", "synthetic", "--arch", "resnet20", "--subset", "256", "--batch-size", "64",
        "--gpu", "-1", "--no-progress", "--epochs", "2"]


@pytest.mark.slow
def test_engine_run_is_the_same_with_grouped_peers(tmp_path):
    # float32 on the CPU: grouped and plain convolutions round differently (1e-7), and SGD amplifies that
    # over the steps, so the first epoch is compared tightly and the second loosely (float64 exactness is
    # tested above).
    lr = ["--lr", "0.02"]
    plain = train(train_dml.DML, FAST + lr + ["--out", str(tmp_path / "plain")])
    grouped = train(train_dml.DML, FAST + lr + ["--grouped-peers", "--out", str(tmp_path / "grouped")])
    for a, b, tol in zip(plain["history"], grouped["history"], (1e-4, 2e-3)):
        for key in ("ce", "kd", "loss"):
            assert b["train"][key] == pytest.approx(a["train"][key], rel=tol, abs=tol)
        for key, value in a["test"].items():
            assert b["test"][key] == pytest.approx(value, abs=3.0)   # a few borderline images may flip
    # Checkpoints hold the plain layout: each run resumes and evaluates in the other layout too.
    g_ckpt, p_ckpt = load_checkpoint(tmp_path / "grouped" / "last.pt"), load_checkpoint(tmp_path / "plain" / "last.pt")
    assert g_ckpt["args"]["grouped_peers"] is True and g_ckpt["layout"] == "plain"
    assert {k: v.shape for k, v in g_ckpt["state"]["model"].items()} == \
        {k: v.shape for k, v in p_ckpt["state"]["model"].items()}
    assert [s["momentum_buffer"].shape for s in g_ckpt["optimizers"]["model"]["state"].values()] == \
        [s["momentum_buffer"].shape for s in p_ckpt["optimizers"]["model"]["state"].values()]
    resumed_plain = train(train_dml.DML, FAST + lr + ["--epochs", "3", "--extend-epochs", "--resume", str(tmp_path / "grouped" / "last.pt"),
                                                      "--out", str(tmp_path / "r1")])
    resumed_grouped = train(train_dml.DML, FAST + lr + ["--epochs", "3", "--extend-epochs", "--grouped-peers", "--resume",
                                                        str(tmp_path / "plain" / "last.pt"), "--out", str(tmp_path / "r2")])
    for key in ("ce", "kd", "loss"):
        assert resumed_plain["history"][2]["train"][key] == pytest.approx(
            resumed_grouped["history"][2]["train"][key], rel=2e-3, abs=2e-3)
    for flags in ([], ["--grouped-peers"]):
        for run in ("plain", "grouped"):
            evaluated = train(train_dml.DML, FAST + flags + ["--eval-only", str(tmp_path / run / "best.pt"),
                                                             "--out", str(tmp_path / f"e-{run}-{len(flags)}")])
            for key, value in (plain if run == "plain" else grouped)["best"]["test"].items():
                assert evaluated["test"][key] == pytest.approx(value, abs=1.0)   # float32 rounding may flip an image


@pytest.mark.parametrize("method,extra,expected", [
    (train_cmff.CMFF, [], "cannot run them grouped"),
    (train_baseline.Baseline, [], "nothing to group"),
    (train_dml.DML, ["--arch", "densenet40_12"], "densenet40_12"),
])
def test_grouped_peers_errors(method, extra, expected):
    with pytest.raises(UserError, match=expected):
        train(method, FAST + ["--grouped-peers"] + extra)
