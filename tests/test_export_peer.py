"""scripts/export_peer.py: one trained peer as a stand-alone network, from a shared-trunk run (same logits as its
head in the run), a grouped run, and a torchvision-backed peer (loads into torchvision.models as it is)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import train_dml
import train_one
from data import build_loaders
from data import fashion_mnist
from data.common import array_transforms, static_info
from data.folder import decode_image, scan
from datasets_on_disk import loader_args, write_folder
from engine import train
from engine.checkpoint import FORMAT, atomic_save
from models import create_model
from models.peers import Peers

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("export_peer", REPO / "scripts" / "export_peer.py")
export_peer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(export_peer)

FAST = ["--dataset", "synthetic", "--subset", "128", "--batch-size", "64", "--gpu", "-1", "--no-progress",
        "--workers", "0", "--epochs", "1"]


def fake_checkpoint(path, peers, arch, n, history_head="peer1"):
    atomic_save({"format": FORMAT, "method": "dml", "epoch": 1, "state": {"model": peers.state_dict()},
                 "args": {"arch": arch, "num_classes": 10, "num_peers": n},
                 "history": [{"epoch": 1, "test": {f"{history_head}/top1": 42.5}}]}, path)


@pytest.mark.slow
def test_shared_trunk_peer_gives_its_heads_logits(tmp_path, capsys):
    run = tmp_path / "one"
    train(train_one.ONE, FAST + ["--arch", "resnet20", "--num-peers", "3", "--out", str(run)])
    assert export_peer.main([str(run / "best.pt"), "--peer", "2", "-o", str(tmp_path / "p2.pt")]) == 0
    printed = capsys.readouterr().out
    assert "head peer2 of the one run" in printed and "test top-1" in printed
    exported = torch.load(tmp_path / "p2.pt", weights_only=True)
    assert exported["arch"] == "resnet20" and exported["format"] == "models"
    net = create_model("resnet20", num_classes=exported["num_classes"])
    net.load_state_dict(exported["state_dict"])          # plain create_model + strict load
    # the run's model, rebuilt independently of the export code, and its head peer2
    ckpt = torch.load(run / "best.pt", weights_only=True)
    model = train_one.ONENet(Peers("resnet20", 10, 3, "shared", "one"))
    model.load_state_dict(ckpt["state"]["model"])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        heads = train_one.ONE.eval_logits(None, model.eval(), x)
        torch.testing.assert_close(net.eval()(x), heads["peer2"], rtol=0, atol=0)
    assert exported["source"]["top1"]["test"] == ckpt["history"][-1]["test"]["peer2/top1"]
    synthetic = static_info("synthetic")                 # a built-in dataset: data/'s constants
    assert exported["preprocessing"] == {"dataset": "synthetic", "image_size": 32, "mean": list(synthetic.mean),
                                         "std": list(synthetic.std), "protocol": "cifar",
                                         "test": "an RGB image of 32x32, the dataset's own size (another image: "
                                                 "resize it to 32x32)", "unknown": None}
    assert "Input (synthetic, as the run evaluated it): an RGB image of 32x32" in printed


def test_grouped_peer_is_split_back(tmp_path):
    torch.manual_seed(0)
    peers = Peers("resnet20", 10, 3).group_branches()
    with torch.no_grad():
        for p in peers.parameters():
            p.add_(0.01 * torch.randn_like(p))
    fake_checkpoint(tmp_path / "g.pt", peers, "resnet20", 3, "peer3")
    out = export_peer.export_peer(tmp_path / "g.pt", 3)
    assert out["source"]["top1"] == {"test": 42.5}
    net = create_model("resnet20", num_classes=10)
    net.load_state_dict(out["state_dict"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), peers.eval()(x).logits[2], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_torchvision_peer_loads_into_torchvision(tmp_path):
    torch.manual_seed(0)
    peers = Peers("resnet50,mobilenet_v2", 10, 2)
    fake_checkpoint(tmp_path / "tv.pt", peers, "resnet50,mobilenet_v2", 2)
    assert export_peer.main([str(tmp_path / "tv.pt"), "--peer", "2", "-o", str(tmp_path / "mb.pt")]) == 0
    exported = torch.load(tmp_path / "mb.pt", weights_only=True)
    assert exported["arch"] == "mobilenet_v2" and exported["format"] == "torchvision"
    net = torchvision.models.mobilenet_v2(num_classes=10)
    net.load_state_dict(exported["state_dict"])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), peers.eval()(x).logits[1], rtol=0, atol=0)
    assert isinstance(export_peer.load_exported(tmp_path / "mb.pt"), torchvision.models.MobileNetV2)


def test_bad_peer_is_one_line(tmp_path, capsys):
    fake_checkpoint(tmp_path / "c.pt", Peers("resnet20", 10, 2), "resnet20", 2)
    assert export_peer.main([str(tmp_path / "c.pt"), "--peer", "3", "-o", str(tmp_path / "x.pt")]) == 2
    assert capsys.readouterr().err.strip() == "error: --peer 3: the run has peers 1..2"
    assert not (tmp_path / "x.pt").exists()


def test_a_peer_whose_head_has_another_name_is_exported_with_its_accuracy(tmp_path, capsys):
    """OKDDip's last peer is its group leader, evaluated as head ``leader``, not ``peerN``: exported with the
    leader's top-1. A head that combines the peers is refused (its accuracy is no one network's); a head of no
    known name leaves the accuracy out and names the single-network heads the run evaluated."""
    peers = Peers("resnet20", 10, 3)
    atomic_save({"format": FORMAT, "method": "okddip", "epoch": 1, "state": {"model": peers.state_dict()},
                 "args": {"arch": "resnet20", "num_classes": 10, "num_peers": 3},
                 "history": [{"epoch": 1, "test": {"peer1/top1": 40.0, "peer2/top1": 41.0, "leader/top1": 42.5,
                                                   "ensemble/top1": 45.0}}]}, tmp_path / "c.pt")
    assert export_peer.main([str(tmp_path / "c.pt"), "--peer", "3", "-o", str(tmp_path / "a.pt")]) == 0
    assert "head leader of the okddip run (resnet20, epoch 1): resnet20, test top-1 42.50" in capsys.readouterr().out
    assert torch.load(tmp_path / "a.pt", weights_only=True)["source"]["top1"] == {"test": 42.5}
    assert export_peer.main([str(tmp_path / "c.pt"), "--peer", "2", "-o", str(tmp_path / "b.pt")]) == 0
    assert "head peer2 of the okddip run (resnet20, epoch 1): resnet20, test top-1 41.00" in capsys.readouterr().out
    assert export_peer.main([str(tmp_path / "c.pt"), "--peer", "3", "--head", "ensemble", "-o",
                             str(tmp_path / "e.pt")]) == 2
    assert capsys.readouterr().err.strip() == ("error: --head ensemble combines the peers, it is not one network's: "
                                               "its accuracy would be stored beside peer 3's weights; give the head "
                                               "of peer 3")
    assert export_peer.main([str(tmp_path / "c.pt"), "--peer", "1", "--head", "leader", "-o",
                             str(tmp_path / "l.pt")]) == 2              # the leader's accuracy beside peer 1's weights
    assert capsys.readouterr().err.strip() == ("error: --head leader is the head of OKDDip's group leader, peer 3 of "
                                               "--from model: give --peer 3 (and no --from), or the head of peer 1")
    assert not (tmp_path / "l.pt").exists()
    fake_checkpoint(tmp_path / "d.pt", peers, "resnet20", 3, history_head="student")
    assert export_peer.main([str(tmp_path / "d.pt"), "--peer", "3", "-o", str(tmp_path / "d3.pt")]) == 0
    assert ("no accuracy recorded under head peer3 (the run evaluated student as single networks: --head names this "
            "peer's)") in capsys.readouterr().out


def test_existing_output_is_refused_without_force(tmp_path, capsys):
    fake_checkpoint(tmp_path / "c.pt", Peers("resnet20", 10, 2), "resnet20", 2)
    out = tmp_path / "peer.pt"
    out.write_bytes(b"an earlier export")
    assert export_peer.main([str(tmp_path / "c.pt"), "--peer", "1", "-o", str(out)]) == 2
    assert capsys.readouterr().err == f"error: -o {out} exists; add --force to replace it, or give another file name\n"
    assert out.read_bytes() == b"an earlier export"
    assert export_peer.main([str(tmp_path / "c.pt"), "--peer", "1", "-o", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: -o {tmp_path} is a folder")
    assert export_peer.main([str(tmp_path / "c.pt"), "--peer", "1", "-o", str(out), "--force"]) == 0
    assert torch.load(out, weights_only=True)["source"]["peer"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "peer.pt"]        # no temporary file left


def test_write_is_atomic_and_never_replaces_without_force(tmp_path, capsys, monkeypatch):
    """A write that fails half-way (a full disk) leaves the old file whole and no temporary file; a file that
    appears under the name while exporting is not replaced without --force."""
    import errno
    import os
    fake_checkpoint(tmp_path / "c.pt", Peers("resnet20", 10, 2), "resnet20", 2)
    out = tmp_path / "peer.pt"
    out.write_bytes(b"an earlier export")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full_disk)
    assert export_peer.main([str(tmp_path / "c.pt"), "--peer", "1", "-o", str(out), "--force"]) == 2
    assert capsys.readouterr().err == (f"error: cannot write -o {out}: No space left on device ({out}); choose "
                                       "another file name or folder\n")
    assert out.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "peer.pt"]
    monkeypatch.undo()

    exported = export_peer.export_peer(tmp_path / "c.pt", 2)
    with pytest.raises(export_peer.UserError, match=r"appeared while exporting\); add --force"):
        export_peer.write_export(exported, out)                  # the name was taken after the first check
    assert out.read_bytes() == b"an earlier export"
    fresh = tmp_path / "sub" / "peer2.pt"
    export_peer.write_export(exported, fresh)
    assert torch.load(fresh, weights_only=True)["source"]["peer"] == 2
    assert sorted(p.name for p in fresh.parent.iterdir()) == ["peer2.pt"]


def test_an_unknown_head_is_refused_and_nothing_is_written(tmp_path, capsys):
    ckpt = tmp_path / "best.pt"
    fake_checkpoint(ckpt, Peers("resnet20", 10, 2, "independent"), "resnet20", 2, history_head="mean_peer1")
    assert export_peer.main([str(ckpt), "--peer", "1", "--head", "leader", "-o", str(tmp_path / "p.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --head leader: the run evaluated mean_peer1; choose") and err.count("\n") == 1
    # the head of another peer would report that peer's accuracy beside this one's weights
    assert export_peer.main([str(ckpt), "--peer", "1", "--head", "mean_peer2", "-o", str(tmp_path / "p.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --head mean_peer2 is the head of peer 2, but --peer is 1") and err.count("\n") == 1
    assert not (tmp_path / "p.pt").exists()


def pcl_checkpoint(path):
    """A PCL-like checkpoint: the live peers ('model') and the mean teacher's ('mean_teacher', other weights), each
    with its own recorded heads (peerN, mean_peerN) and accuracies, as train_pcl.py records them."""
    torch.manual_seed(0)
    live = Peers("resnet20", 10, 2, "shared", "one")
    mean = Peers("resnet20", 10, 2, "shared", "one")
    record = {"peer1/top1": 18.75, "peer2/top1": 12.5, "teacher/top1": 20.0, "mean_peer1/top1": 15.62,
              "mean_peer2/top1": 10.0}
    atomic_save({"format": FORMAT, "method": "pcl", "epoch": 1,
                 "state": {"model": live.state_dict(), "mean_teacher": mean.state_dict()},
                 "args": {"arch": "resnet20", "num_classes": 10, "num_peers": 2},
                 "history": [{"epoch": 1, "test": record}]}, path)
    return live, mean


def test_the_head_follows_from(tmp_path, capsys):
    """--from mean_teacher writes the mean teacher's weights, so the accuracy printed and stored with them is its
    head's (mean_peerN), not the live peer's; a --head of the other state is refused."""
    ckpt = tmp_path / "best.pt"
    live, mean = pcl_checkpoint(ckpt)
    out = tmp_path / "pcl.pt"
    assert export_peer.main([str(ckpt), "--peer", "1", "--from", "mean_teacher", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "head mean_peer1 of the pcl run" in printed and "test top-1 15.62" in printed
    exported = torch.load(out, weights_only=True)
    assert exported["source"]["head"] == "mean_peer1" and exported["source"]["top1"] == {"test": 15.62}
    net = create_model("resnet20", num_classes=10)
    net.load_state_dict(exported["state_dict"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), mean.eval()(x).logits[0], rtol=1e-5, atol=1e-5)
    assert export_peer.export_peer(ckpt, 2)["source"]["top1"] == {"test": 12.5}          # --from model: peer2
    assert export_peer.export_peer(ckpt, 2, "mean_teacher")["source"]["head"] == "mean_peer2"
    for argv, message in ((["--from", "mean_teacher", "--head", "peer1"],
                           "error: --head peer1 is a head of the 'model' state, but --from is 'mean_teacher'"),
                          (["--head", "mean_peer1"],
                           "error: --head mean_peer1 is a head of the 'mean_teacher' state, but --from is 'model'")):
        assert export_peer.main([str(ckpt), "--peer", "1", *argv, "-o", str(tmp_path / "x.pt")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "x.pt").exists()


def test_a_folder_peer_carries_the_mean_and_std_its_run_measured(tmp_path, monkeypatch, capsys):
    """A run on one's own images (--dataset folder) normalises with the mean and std measured on its training
    images: the export carries exactly those of the run's record, with the size and the framing, so that a new
    image given to the exported network is the input the run evaluated (the test loader's, to the last bit)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    root = write_folder(tmp_path / "tree", per_split=(("train", 4), ("val", 2)))
    run = tmp_path / "run"
    results = train(train_dml.DML, ["--dataset", "folder", "--data", str(root), "--arch", "resnet20", "--epochs", "1",
                                    "--batch-size", "4", "--gpu", "-1", "--threads", "1", "--no-progress", "--out",
                                    str(run)])
    assert export_peer.main([str(run / "best.pt"), "--peer", "2", "-o", str(tmp_path / "p2.pt")]) == 0
    pre = torch.load(tmp_path / "p2.pt", weights_only=True)["preprocessing"]
    recorded = torch.load(run / "best.pt", weights_only=True)["data"]["folder"]
    assert pre["mean"] == recorded["mean"] == results["data"]["folder"]["mean"]
    assert pre["std"] == recorded["std"] == results["data"]["folder"]["std"]
    assert pre["mean"] != list(static_info("synthetic").mean)         # measured, not a default
    assert {k: pre[k] for k in ("dataset", "image_size", "protocol", "unknown")} == {
        "dataset": "folder", "image_size": 32, "protocol": "cifar", "unknown": None}
    assert pre["test"].startswith("resize to 32x32")
    assert f"Normalize([{pre['mean'][0]:.4f}" in capsys.readouterr().out
    test = build_loaders(loader_args(dataset="folder", data=str(root), batch_size=4), torch.device("cpu")).test
    batch = next(iter(test))
    files = [path for path, _ in scan(root).samples["val"]]
    mine = torch.stack([export_peer.input_transform(pre)(decode_image(files[i])) for i in batch.index.tolist()])
    torch.testing.assert_close(mine, batch.images, rtol=0, atol=1e-6)


def test_a_built_in_datasets_normalisation_is_the_data_layers(tmp_path):
    """Built-in datasets: the mean, std and size of data/ (static_info), at the size the run recorded (ImageNet's
    --image-size); Fashion-MNIST's transform pads a grey 28 x 28 image to 32 as its loader does."""
    peers = Peers("resnet20", 10, 2)
    for dataset, size, test in (("fashion-mnist", None, "a 28x28 greyscale image zero-padded by 2 pixels on each "
                                                        "side to 32x32, its channel replicated 3 times"),
                                ("imagenet", 160, "Resize(183) + CenterCrop(160)")):
        atomic_save({"format": FORMAT, "method": "dml", "epoch": 1, "state": {"model": peers.state_dict()},
                     "args": {"arch": "resnet20", "num_classes": 10, "num_peers": 2, "dataset": dataset,
                              "image_size": size}, "history": []}, tmp_path / "c.pt")
        info = static_info(dataset)
        assert export_peer.export_peer(tmp_path / "c.pt", 1)["preprocessing"] == {
            "dataset": dataset, "image_size": size or info.image_size, "mean": list(info.mean),
            "std": list(info.std), "protocol": info.protocol, "test": test, "unknown": None}
    original = np.random.default_rng(0).integers(0, 256, (1, 28, 28), dtype=np.uint8)   # a 28 x 28 grey image
    padded = fashion_mnist._split(Path("x"), original, np.zeros(1, np.int64)).images[0]  # as it is read
    pre = export_peer.preprocessing({"args": {"dataset": "fashion-mnist"}})
    torch.testing.assert_close(export_peer.input_transform(pre)(Image.fromarray(original[0], "L")),
                               array_transforms(static_info("fashion-mnist"), train=False)(padded), rtol=0, atol=1e-6)


def test_an_old_checkpoint_exports_and_says_what_is_unknown(tmp_path, capsys):
    """A checkpoint without the record (an older version's) still exports; what it does not tell is None and
    named, not invented: the dataset (so the size, mean and std), or a folder run's mean and std."""
    peers = Peers("resnet20", 10, 2)
    fake_checkpoint(tmp_path / "c.pt", peers, "resnet20", 2)                  # no args.dataset
    assert export_peer.main([str(tmp_path / "c.pt"), "--peer", "1", "-o", str(tmp_path / "a.pt")]) == 0
    pre = torch.load(tmp_path / "a.pt", weights_only=True)["preprocessing"]
    assert [pre[k] for k in ("dataset", "image_size", "mean", "std", "protocol", "test")] == [None] * 6
    assert pre["unknown"] == ("the checkpoint does not name its dataset (args.dataset): the image size, mean and "
                              "std it was trained with are unknown")
    assert f"Unknown: {pre['unknown']}" in capsys.readouterr().out
    atomic_save({"format": FORMAT, "method": "dml", "epoch": 1, "state": {"model": peers.state_dict()},
                 "args": {"arch": "resnet20", "num_classes": 10, "num_peers": 2, "dataset": "folder",
                          "image_size": None}, "image_size": 32, "history": []}, tmp_path / "old.pt")
    pre = export_peer.export_peer(tmp_path / "old.pt", 2)["preprocessing"]
    assert (pre["dataset"], pre["image_size"], pre["mean"], pre["std"]) == ("folder", 32, None, None)
    assert pre["unknown"].startswith("the checkpoint holds no record of the folder's mean and std")
    with pytest.raises(ValueError, match="does not know how its inputs were prepared: the checkpoint holds no"):
        export_peer.input_transform(pre)
