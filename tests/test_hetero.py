"""Peers of different architectures (``--arch resnet20,wrn_16_2``): the name helpers, a heterogeneous DML
run end to end (heads, recorded architectures, run name, resume, refusal of another list) and the
one-line refusals (shared trunks, grouping, a --num-peers that disagrees, CMFF's fusion sizes)."""
import json
import re

import pytest
import torch

import train_baseline
import train_cmff
import train_dccl
import train_dml
import train_one
from engine import UserError, train
from engine.checkpoint import load_checkpoint
from engine.trainer import Trainer
from engine.cli import parse_args
from models import count_parameters, create_model
from models.peers import Peers, arch_names, arch_tag, normalize_arch, peer_archs

FAST = ["--dataset", "synthetic", "--subset", "128", "--batch-size", "64", "--gpu", "-1", "--no-progress",
        "--workers", "0"]
PAIR = ["--arch", "resnet20,wrn_16_2"]


def test_name_helpers():
    assert arch_names(" resnet32 , wrn_16_2") == ["resnet32", "wrn_16_2"]
    assert normalize_arch("resnet32,resnet32") == "resnet32"
    assert normalize_arch(["resnet32", "wrn_16_2"]) == "resnet32,wrn_16_2"
    assert peer_archs("resnet32", 3) == ["resnet32"] * 3
    assert peer_archs("resnet32,wrn_16_2", 2) == ["resnet32", "wrn_16_2"]
    with pytest.raises(ValueError, match="2 architectures for 3 peers"):
        peer_archs("resnet32,wrn_16_2", 3)
    with pytest.raises(ValueError, match="empty name"):
        arch_names("resnet32,,wrn_16_2")
    assert arch_tag("resnet32,resnet32,wrn_16_2") == "resnet32x2+wrn_16_2"
    assert arch_tag("resnet32,wrn_16_2,resnet32") == "resnet32+wrn_16_2+resnet32"


def test_mixed_peers_are_the_named_backbones():
    peers = Peers("resnet20,wrn_16_2", 10, 2)
    assert peers.archs == ["resnet20", "wrn_16_2"] and peers.mixed and peers.arch == "resnet20,wrn_16_2"
    for net, name in zip(peers.branches, peers.archs):
        assert count_parameters(net) == count_parameters(create_model(name, num_classes=10))
    assert peers.feature_dims == [64, 128]
    out = peers(torch.randn(2, 3, 32, 32), return_features=True)
    assert [z.shape for z in out.logits] == [(2, 10)] * 2 and [f.shape[1] for f in out.features] == [64, 128]
    with pytest.raises(ValueError, match="shares a trunk"):
        Peers("resnet20,wrn_16_2", 10, 2, "shared")


def test_cli_list_sets_the_number_of_peers():
    args = parse_args(train_dml.DML, PAIR + ["--arch", "resnet20,wrn_16_2,resnet20"])
    assert args.num_peers == 3 and args.arch == "resnet20,wrn_16_2,resnet20"
    assert parse_args(train_dml.DML, ["--arch", "resnet20,resnet20,resnet20"]).arch == "resnet20"
    assert parse_args(train_dml.DML, PAIR + ["--num-peers", "2"]).num_peers == 2


@pytest.mark.parametrize("method,argv", [
    (train_dml.DML, PAIR + ["--num-peers", "3"]),
    (train_baseline.Baseline, PAIR),
    (train_dml.DML, ["--arch", "resnet20,"]),
])
def test_cli_refusals_are_one_line(method, argv, capsys):
    with pytest.raises(SystemExit):
        parse_args(method, argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("train_") and "--arch" in err


@pytest.mark.parametrize("method,extra,expected", [
    (train_one.ONE, [], "share layers"),
    (train_dccl.DCCL, [], r"dccl builds its peers from one architecture \(they share layers, or exchange features"),
    (train_dml.DML, ["--preset", "mcl-okd", "--num-peers", "2"], r"--topology shared \(--preset mcl-okd's\): "),
    (train_dml.DML, ["--topology", "shared"], "--topology shared: shared-trunk"),   # (no preset named: it gave none)
    (train_dml.DML, ["--grouped-peers"], "different architectures"),
    (train_cmff.CMFF, [], "64x8x8 and 128x8x8"),
])
def test_refusals(method, extra, expected, tmp_path):
    with pytest.raises(UserError, match=expected):
        train(method, FAST + PAIR + extra + ["--out", str(tmp_path)])


@pytest.mark.slow
def test_cmff_accepts_a_pair_with_one_map_shape(tmp_path):
    args = parse_args(train_cmff.CMFF, FAST + ["--arch", "resnet20,resnet32", "--out", str(tmp_path)])
    trainer = Trainer(train_cmff.CMFF, args)
    assert trainer.method.model.peers.archs == ["resnet20", "resnet32"]


@pytest.mark.slow
def test_heterogeneous_dml_runs_resumes_and_refuses_another_list(tmp_path, monkeypatch):
    out = tmp_path / "run"
    results = train(train_dml.DML, FAST + PAIR + ["--epochs", "1", "--out", str(out)])
    assert {"peer1/top1", "peer2/top1", "ensemble/top1"} <= set(results["last"]["test"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["peer_archs"] == {"peer1": "resnet20", "peer2": "wrn_16_2"} and saved["arch"] == "resnet20,wrn_16_2"
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["args"]["num_peers"] == 2
    # The two peers hold the two architectures' weights.
    state = ckpt["state"]["model"]
    for i, name in enumerate(("resnet20", "wrn_16_2")):
        own = {k[len(f"branches.{i}."):]: v for k, v in state.items() if k.startswith(f"branches.{i}.")}
        create_model(name, num_classes=10).load_state_dict(own)
    resumed = train(train_dml.DML, FAST + PAIR + ["--epochs", "2", "--extend-epochs", "--out", str(out),
                                                  "--resume", "auto"])
    assert len(resumed["history"]) == 2 and resumed["history"][0] == results["history"][0]
    with pytest.raises(UserError, match=r"--arch resnet20,wrn_16_2 \(this command: wrn_16_2,resnet20\)"):
        train(train_dml.DML, FAST + ["--arch", "wrn_16_2,resnet20", "--epochs", "3", "--out", str(out),
                                     "--resume", "auto"])
    # The default run directory names both architectures, shortly (then the hash of FAST's non-default options).
    monkeypatch.chdir(tmp_path)
    args = parse_args(train_dml.DML, FAST + ["--arch", "resnet20,resnet20,wrn_16_2"])
    name = Trainer(train_dml.DML, args).run.folder.name
    assert re.fullmatch(r"dml-resnet20x2\+wrn_16_2-synthetic-n3-s0-[0-9a-f]{8}", name), name


def test_model_table_prints_a_pair(capsys):
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "model_table", Path(__file__).resolve().parents[1] / "scripts" / "model_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    main = module.main
    main(["--arch", "resnet20,wrn_16_2", "--peers", "2"])
    out = capsys.readouterr().out
    total = count_parameters(create_model("resnet20")) + count_parameters(create_model("wrn_16_2"))
    row = next(line for line in out.splitlines() if line.startswith("| resnet20,wrn_16_2 "))
    assert f"{total:,}" in row and "| independent |" in row
    assert "| resnet20 | 32x32 |" in out and "| wrn_16_2 | 32x32 |" in out
