"""models/complexity.count_macs against the official sizes (docs/backbones.md), MACs of the peer topologies, and a
smoke test of scripts/model_table.py.

Models are built on the ``meta`` device where only shapes matter (count_macs is shape-only), and
one small model is also counted on the CPU to show both give the same number.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from models import count_parameters as base_count_parameters
from models import create_model
from models.complexity import count_macs, count_parameters
from models.peers import Peers

REPO = Path(__file__).resolve().parents[1]




def on_meta(fn, *args, **kwargs):
    with torch.device("meta"):
        return fn(*args, **kwargs)


# official reference sizes, docs/backbones.md: (arch, classes, input size, params, multiply-adds)
SPEC_5 = [
    ("densenet40_12", 100, 32, 188_092, 72_377_232),
    ("resnet32", 100, 32, 472_756, 69_130_496),
    ("vgg16", 100, 32, 14_774_436, 313_247_744),
    ("resnet110_bottleneck", 100, 32, 1_170_868, 167_453_696),
    ("hcgnet_a1", 100, 32, 1_102_651, 154_671_444),   # official counter ignores dilation; true 154,269,036
    ("resnet18", 1000, 224, 11_689_512, 1_814_073_344),
    ("resnet34", 1000, 224, 21_797_672, 3_663_761_408),
]


@pytest.mark.parametrize("arch,classes,size,params,macs", SPEC_5)
def test_count_macs_matches_spec_section_5(arch, classes, size, params, macs):
    model = on_meta(create_model, arch, num_classes=classes)
    measured = count_macs(model, size)
    assert abs(measured - macs) <= 0.005 * macs, f"{arch}: {measured:,} vs official {macs:,}"
    assert count_parameters(model) == params


def test_count_macs_exact_values():
    """FlopCounterMode uses the real conv output size: exact for undilated nets, and the true HCGNet count."""
    for arch, classes, size, _, macs in SPEC_5:
        if arch != "hcgnet_a1":
            assert count_macs(on_meta(create_model, arch, num_classes=classes), size) == macs
    assert count_macs(on_meta(create_model, "hcgnet_a1"), 32) == 154_269_036


def test_count_macs_cpu_equals_meta_and_is_per_sample():
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10).train()
    cpu = count_macs(model, 16)
    assert model.training and all(m.training for m in model.modules())     # training flags restored
    assert cpu == count_macs(on_meta(create_model, "resnet20", num_classes=10), (3, 16, 16))
    assert cpu == count_macs(model, (2, 3, 16, 16)) == count_macs(model, (16, 16))
    # by hand, conv + linear weights only (no BN, no bias): 16x16 input -> maps 16, 8, 4
    hand = 3 * 16 * 9 * 16 * 16                                           # stem
    hand += 6 * 16 * 16 * 9 * 16 * 16                                     # layer1: 3 blocks x 2 convs
    hand += 16 * 32 * 9 * 8 * 8 + 5 * 32 * 32 * 9 * 8 * 8 + 16 * 32 * 8 * 8   # layer2 + projection
    hand += 32 * 64 * 9 * 4 * 4 + 5 * 64 * 64 * 9 * 4 * 4 + 32 * 64 * 4 * 4   # layer3 + projection
    hand += 64 * 10                                                        # fc
    assert cpu == hand


def test_bn_bias_and_elementwise_ops_are_not_counted():
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=True)
    net = nn.Sequential(conv, nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 5))
    assert count_macs(net, (4, 6, 6)) == 4 * 8 * 9 * 36 + 8 * 5
    assert count_parameters is base_count_parameters


@pytest.mark.parametrize("arch,size", [("resnet32", 32), ("vgg16", 32), ("densenet40_12", 32), ("resnet18", 224)])
@pytest.mark.slow
def test_topology_macs(arch, size):
    """independent = N x single; shared = trunk + N x branch; tree = trunk + ceil(N/2) x group + N x branch."""
    classes = 1000 if size == 224 else 100
    single = count_macs(on_meta(create_model, arch, num_classes=classes), size)
    n = 4
    assert count_macs(on_meta(Peers, arch, classes, n, "independent"), size) == n * single
    x = torch.zeros(1, 3, size, size, device="meta")
    for split in ("dml", "one"):
        peers = on_meta(Peers, arch, classes, n, "shared", split)
        trunk_shape = peers.trunk(x)[0].shape
        trunk, branch = count_macs(peers.trunk, size), count_macs(peers.branches[0], trunk_shape)
        assert trunk + branch == single
        assert count_macs(peers, size) == trunk + n * branch
    for n in (3, 4):
        peers = on_meta(Peers, arch, classes, n, "tree")
        t = peers.trunk(x)[0]
        g = peers.groups[0](t)
        trunk, group = count_macs(peers.trunk, size), count_macs(peers.groups[0], t.shape)
        branch = count_macs(peers.branches[0], g.shape)
        assert trunk + group + branch == single
        assert count_macs(peers, size) == trunk + math.ceil(n / 2) * group + n * branch


def load_script():
    spec = importlib.util.spec_from_file_location("model_table", REPO / "scripts" / "model_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_table_script_smoke(capsys):
    script = load_script()
    assert script.main(["--arch", "resnet20", "--peers", "2"]) == 0
    text = capsys.readouterr().out
    assert "FlopCounterMode" in text and "NOT" in text and "classes" in text
    assert "| backbone | input | classes | params | MACs |" in text
    single_params = count_parameters(on_meta(create_model, "resnet20", num_classes=100))
    single_macs = count_macs(on_meta(create_model, "resnet20", num_classes=100), 32)
    assert f"| resnet20 | 32x32 | 100 | {single_params:,} | {single_macs:,} |" in text
    assert "| backbone | input | classes | N | topology | trunk stages | params | MACs |" in text
    for label, topology, split in [("independent", "independent", None), ("shared dml", "shared", "dml"),
                                   ("shared one", "shared", "one"), ("tree (CL-ILR)", "tree", None)]:
        peers = on_meta(Peers, "resnet20", 100, 2, topology, split)
        trunk = "-" if topology == "independent" else str(peers.split)
        row = (f"| resnet20 | 32x32 | 100 | 2 | {label} | {trunk} | {count_parameters(peers):,} | "
               f"{count_macs(peers, 32):,} |")
        assert row in text
    assert "| 4 |" not in text                       # only the requested peer count
    assert script.main(["--arch", "resnet20", "resnet20", "--peers", "2", "2"]) == 0     # given twice: once
    assert capsys.readouterr().out == text


def test_model_table_script_rejects_unknown_arch(capsys):
    with pytest.raises(SystemExit) as err:
        load_script().main(["--arch", "no_such_net"])
    assert err.value.code == 2
    assert "resnet32" in capsys.readouterr().err     # the listing error names the valid architectures



def test_model_table_refuses_a_pair_the_method_refuses_and_adds_up_repeated_archs(capsys):
    """--method cmff with an unequal pair: the method's one line before any table is printed (it was a traceback
    after the backbone tables); --arch given twice tabulates both (the second once replaced the first)."""
    with pytest.raises(SystemExit) as err:
        load_script().main(["--method", "cmff", "--arch", "resnet32,wrn_16_2"])
    out, line = capsys.readouterr()
    assert err.value.code == 2 and not out and line.count("\n") == 1
    assert "--arch resnet32,wrn_16_2: CMFF fuses the two peers' last-stage maps" in line
    assert load_script().main(["--arch", "resnet20", "--arch", "resnet32"]) == 0
    rows = [r.split(" | ")[0] for r in capsys.readouterr().out.splitlines() if r.startswith("| resnet")]
    assert "| resnet20" in rows and "| resnet32" in rows


def test_model_table_peer_counts_are_the_training_scripts(capsys):
    """--peers takes the counts the training scripts take (engine.cli.MAX_PEERS): a larger one is a typo."""
    for peers in ("0", "257"):
        with pytest.raises(SystemExit) as err:
            load_script().main(["--arch", "resnet20", "--peers", peers])
        line = capsys.readouterr().err
        assert err.value.code == 2 and line.count("\n") == 1 and "argument --peers: must lie in [1, 256]" in line


@pytest.mark.parametrize("name", ["train_dml", "train_dml.py", "./train_dml.py"])
def test_model_table_takes_the_method_by_its_scripts_name(name, capsys):
    """--method train_dml (the script's name) is DML, as --method dml (it was refused: 'no train_train_dml.py')."""
    assert load_script().main(["--method", name, "--arch", "resnet20", "--peers", "2"]) == 0
    out = capsys.readouterr().out
    assert "## train_dml.py with its default flags" in out and "train_train" not in out
