"""A real-data check: one epoch of DML on 6,000 Fashion-MNIST images (Debian's dataset-fashion-mnist)."""
from pathlib import Path

import pytest

import train_dml
from engine import train

FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(),
                    reason="apt-get install dataset-fashion-mnist")
def test_dml_fashion_mnist_one_epoch_well_above_chance(tmp_path):
    results = train(train_dml.DML, ["--arch", "resnet20", "--dataset", "fashion-mnist", "--subset", "6000",
                                    "--epochs", "1", "--gpu", "-1", "--no-progress", "--out", str(tmp_path)])
    test, train_ce = results["last"]["test"], results["last"]["train"]["ce"]
    # 10 classes: chance is 10 % and a CE of ln 10 = 2.30 per peer. One epoch is 46 steps at lr 0.1, in
    # which DML learns more slowly than a baseline (each peer is pulled towards the other's near-uniform
    # output): measured 19-36 % per peer and 25-31 % for the ensemble on the 10,000 test images, per-peer
    # training CE about 2.0. (A baseline ResNet-20 on the same command: 45 % after one epoch, 78 % after 3.)
    assert test["ensemble/top1"] > 20 and max(test["peer1/top1"], test["peer2/top1"]) > 20
    assert train_ce / 2 < 2.1
