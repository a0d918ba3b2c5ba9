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
    test = results["last"]["test"]
    # 10 classes: chance is 10 %. One epoch (46 steps at lr 0.1) lands at 25-40 % per peer on the 10,000
    # test images; twice chance is a margin no broken pipeline (labels, normalisation, eval) reaches.
    assert min(test["peer1/top1"], test["peer2/top1"], test["ensemble/top1"]) > 20
