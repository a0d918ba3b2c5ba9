"""What only a GPU can check: --cuda-graph, --grouped-peers, bf16 and compile on CUDA give the eager fp32
numbers. Skipped without CUDA (CI); run on a GPU machine with ``python -m pytest tests/test_gpu.py``."""
from pathlib import Path

import pytest
import torch

import train_cl_ilr
import train_dml
import train_mcl_okd
import train_okddip
import train_one
from engine import train
from toy_methods import AlternatingToy, MeanTeacherToy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FAST = ["--dataset", "synthetic", "--arch", "resnet20", "--subset", "1024", "--batch-size", "64", "--lr", "0.02",
        "--gpu", "0", "--no-progress", "--epochs", "3"]
METHODS = [train_dml.DML, train_mcl_okd.MCLOKD, train_one.ONE, train_okddip.OKDDip, train_cl_ilr.CLILR]


def losses(results):
    return [(h["train"]["loss"], h["test"]) for h in results["history"]]


def assert_same_run(a, b, tol):
    for (la, ta), (lb, tb) in zip(losses(a), losses(b)):
        assert lb == pytest.approx(la, rel=tol, abs=tol)
        for key, value in ta.items():
            assert tb[key] == pytest.approx(value, abs=3.0)


@pytest.mark.parametrize("method", METHODS + [AlternatingToy, MeanTeacherToy],
                         ids=[m.name for m in METHODS + [AlternatingToy, MeanTeacherToy]])
def test_cuda_graph_equals_eager(method, tmp_path):
    """Methods with the default step, with their own (two optimizers, after_step), with a temporal mean."""
    eager = train(method, FAST + ["--out", str(tmp_path / "eager")])
    graphed = train(method, FAST + ["--cuda-graph", "--out", str(tmp_path / "graph")])
    assert_same_run(eager, graphed, 2e-3)


def test_cuda_graph_is_captured_every_epoch_and_replayed(tmp_path):
    from engine import Trainer, parse_args
    args = parse_args(train_dml.DML, FAST + ["--cuda-graph", "--grouped-peers", "--amp", "bf16", "--channels-last",
                                             "--epochs", "10", "--out", str(tmp_path)])   # lr > 0 in epoch 4
    trainer = Trainer(train_dml.DML, args)
    steps = len(trainer.loaders.train)
    for epoch in range(3):
        assert torch.isfinite(torch.tensor(trainer.train_epoch(epoch)[0]["loss"]))
    graph = trainer.graphed
    assert graph.captures == 3
    assert graph.replays == 3 * steps - 3            # all but the three warm-up steps
    before = [p.detach().clone() for p in trainer.method.model.parameters()]
    trainer.train_epoch(3)
    assert all(not torch.equal(a, p) for a, p in zip(before, trainer.method.model.parameters()))  # it trains


@pytest.mark.parametrize("method", [train_dml.DML, train_one.ONE], ids=["dml", "one"])
def test_grouped_peers_on_cuda_equal_plain(method, tmp_path):
    plain = train(method, FAST + ["--out", str(tmp_path / "plain")])
    grouped = train(method, FAST + ["--grouped-peers", "--out", str(tmp_path / "grouped")])
    assert_same_run(plain, grouped, 2e-3)


def test_bf16_channels_last_compile_train(tmp_path):
    fp32 = train(train_dml.DML, FAST + ["--out", str(tmp_path / "fp32")])
    fast = train(train_dml.DML, FAST + ["--amp", "bf16", "--channels-last", "--compile", "--out", str(tmp_path / "bf16")])
    assert_same_run(fp32, fast, 5e-2)


def test_a_checkpoint_written_on_a_gpu_opens_without_one(tmp_path):
    """Every tensor of last.pt, best.pt and an export is stored on the CPU: a bare torch.load opens them in a
    process that sees no GPU (the engine's own loaders pass map_location; other code does not)."""
    import subprocess
    import sys
    from test_runs import assert_every_tensor_on_the_cpu
    train(train_dml.DML, FAST + ["--epochs", "1", "--out", str(tmp_path)])
    export = subprocess.run([sys.executable, "scripts/export_peer.py", str(tmp_path / "best.pt"), "--peer", "1",
                             "-o", str(tmp_path / "peer1.pt")], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert export.returncode == 0, export.stderr
    for name in ("last.pt", "best.pt", "peer1.pt"):
        assert_every_tensor_on_the_cpu(tmp_path / name)
