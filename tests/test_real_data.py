"""Real-data checks on Fashion-MNIST (Debian's dataset-fashion-mnist): the README's first command (DML), and two
epochs on 4,000 training images (stratified), tested on 2,000 test images (stratified), of FFL and DCCL (whose
fused head must be recorded in results.json). A budget that CI affords (about a minute or two each on one core);
the full table is scripts/reproduce.py fashion-mnist (docs/results.md)."""
import json
import re
import shlex
from pathlib import Path

import pytest

import train_dccl
import train_dml
import train_ffl
from engine import train

FASHION = Path("/usr/share/datasets/fashion-mnist")


BUDGET = ["--arch", "resnet20", "--dataset", "fashion-mnist", "--subset", "4000", "--eval-subset", "2000",
          "--epochs", "2", "--gpu", "-1", "--no-progress"]


@pytest.mark.slow
@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(),
                    reason="apt-get install dataset-fashion-mnist")
def test_the_readmes_first_command_learns(tmp_path):
    """The first training command of the README, as written (plus the CPU, one thread, a folder of the test's):
    each peer and the ensemble end far above chance (10 %). Measured (seed 0, CPU, one thread, about a minute):
    peer1/peer2/ensemble top-1 46.8/49.8/48.7 % after epoch 1, 68.2/47.7/60.2 after epoch 2, 75.2/74.8/75.0 after
    epoch 3; the ensemble after epoch 3 over seeds 0-2: 75.0, 75.9, 75.5 (tests/test_folder_data.py)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    command = re.search(r"^(?:pip install .*&& )?python (train_dml\.py .*)$", readme, flags=re.M).group(1)
    argv = shlex.split(command)[1:]
    results = train(train_dml.DML, argv + ["--gpu", "-1", "--threads", "1", "--no-progress", "--out", str(tmp_path)])
    last = results["history"][-1]["test"]
    assert min(last["peer1/top1"], last["peer2/top1"], last["ensemble/top1"]) > 60, last
    assert results["data"]["images_used"]["test"] < 10000                      # a stratified part of the test set


@pytest.mark.slow
@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(),
                    reason="apt-get install dataset-fashion-mnist")
@pytest.mark.parametrize("name", ["ffl", "dccl"])
def test_fusion_methods_fashion_mnist_two_epochs_well_above_chance(name, tmp_path):
    method = {"ffl": train_ffl.FFL, "dccl": train_dccl.DCCL}[name]
    train(method, BUDGET + ["--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    first, last = saved["history"][0]["test"], saved["last"]["test"]
    # 10 classes: chance is 10 %. Measured on this command (CPU, seed 0; 62 steps at lr 0.1, reflect padding),
    # peer1/peer2/ensemble/fused top-1 after epochs 1 and 2: FFL 30.2/36.0/34.2/38.0 then 70.8/60.2/67.4/69.6;
    # DCCL 36.9/34.8/38.0/37.9 then 69.7/40.0/64.3/66.2. The fused head is recorded with every other head.
    assert {"peer1/top1", "peer2/top1", "ensemble/top1", "fused/top1"} <= set(last)
    assert last["ensemble/top1"] > 50 and last["fused/top1"] > 50
    assert last["fused/top1"] > first["fused/top1"] + 10
    assert saved["args"]["pad_mode"] == "reflect" and set(saved["history"][0]["lr"]) == {"model", "fusion"}
