"""KDCL (train_kdcl.py): every soft target against an independent float64 re-statement (MinLogit by hand, Linear
against a brute-force grid, General against the error-correlation weights computed directly), the target is
detached, the loss value, each student on its own view, and the one-line refusals."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine import UserError, train
from train_kdcl import (KDCL, error_correlation_weights, linear_weights, minlogit_target, naive_target,
                        project_simplex)
from toy_methods import build_method

FAST = ["--dataset", "synthetic", "--subset", "128", "--batch-size", "64", "--gpu", "-1", "--no-progress",
        "--workers", "0", "--epochs", "1"]


def make_method(*argv):
    return build_method(KDCL, ["--arch", "resnet20", "--dataset", "synthetic", *argv])


def test_minlogit_by_hand():
    z = torch.tensor([[[2.0, 1.0, 0.0]], [[0.0, 3.0, 1.0]]])      # 2 students, 1 sample, 3 classes, y = 1
    # student 1 shifted by z[y]=1: [1, 0, -1]; student 2 by 3: [-3, 0, -2]; minimum: [-3, 0, -2]
    assert minlogit_target(z, torch.tensor([1])).tolist() == [[-3.0, 0.0, -2.0]]


def test_naive_picks_the_lowest_batch_ce():
    torch.manual_seed(0)
    z, y = torch.randn(3, 8, 5), torch.randint(0, 5, (8,))
    ce = [F.cross_entropy(z[i].double(), y).item() for i in range(3)]
    assert torch.equal(naive_target(z, y), z[int(np.argmin(ce))])


def test_project_simplex():
    v = torch.tensor([[0.5, 0.5], [2.0, 0.0], [0.3, 0.1], [-1.0, -1.0]], dtype=torch.float64)
    expected = [[0.5, 0.5], [1.0, 0.0], [0.6, 0.4], [0.5, 0.5]]
    torch.testing.assert_close(project_simplex(v), torch.tensor(expected, dtype=torch.float64))


def ce64(z, a, y):
    mix = sum(ai * zi for ai, zi in zip(a, z.double()))
    return F.cross_entropy(mix, y).item()


@pytest.mark.parametrize("seed", range(4))
def test_linear_matches_a_brute_force_grid_for_two_students(seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 32, 10, generator=g) * torch.tensor([1.0, 3.0]).view(2, 1, 1)
    z[0, :, 0] += 2.0                                     # student 1 good at class 0, student 2 confident
    y = torch.randint(0, 10, (32,), generator=g)
    grid = np.linspace(0, 1, 10001)
    ces = [ce64(z, (1 - s, s), y) for s in grid]
    best = grid[int(np.argmin(ces))]
    a = linear_weights(z, y)
    assert a.sum().item() == pytest.approx(1.0) and (a >= 0).all()
    assert ce64(z, a.tolist(), y) <= min(ces) + 1e-6
    assert a[1].item() == pytest.approx(best, abs=2e-3)


def test_linear_three_students_beats_every_grid_point():
    g = torch.Generator().manual_seed(7)
    z, y = torch.randn(3, 16, 6, generator=g) * 2, torch.randint(0, 6, (16,), generator=g)
    grid = [(a, b, 1 - a - b) for a, b in itertools.product(np.linspace(0, 1, 101), repeat=2) if a + b <= 1 + 1e-12]
    best = min(ce64(z, w, y) for w in grid)
    assert ce64(z, linear_weights(z, y).tolist(), y) <= best + 1e-6


def test_general_weights_against_a_direct_computation():
    g = torch.Generator().manual_seed(1)
    logits, y = torch.randn(3, 50, 4, generator=g) * 2, torch.randint(0, 4, (50,), generator=g)
    p = np.exp(logits.double().numpy())
    p /= p.sum(2, keepdims=True)
    e = p - np.eye(4)[y.numpy()][None]
    c = np.array([[np.mean([e[i, n] @ e[j, n] for n in range(50)]) for j in range(3)] for i in range(3)])
    w = np.linalg.inv(c) @ np.ones(3)
    w /= w.sum()
    np.testing.assert_allclose(error_correlation_weights(logits, y, ridge=0.0).numpy(), w, rtol=1e-10)
    np.testing.assert_allclose(error_correlation_weights(logits, y).numpy(), w, rtol=1e-4)


@pytest.mark.parametrize("ensemble", ["naive", "linear", "minlogit", "general"])
def test_target_is_detached_and_loss_matches_a_float64_restatement(ensemble):
    torch.manual_seed(0)
    extra = ["--val-split", "10"] if ensemble == "general" else []
    method = make_method("--ensemble", ensemble, "--kd-lambda", "0.7", *extra)
    if ensemble == "general":
        method.general.weights.copy_(torch.tensor([0.8, 0.2]))
    logits = [torch.randn(6, 10, requires_grad=True) for _ in range(2)]
    y = torch.randint(0, 10, (6,))
    target = method.target(logits, y)
    assert not target.requires_grad
    # the loss of train_kdcl.KDCL.loss with these logits, re-stated in float64
    T = 2.0
    t64 = target.double()
    ce = sum(F.cross_entropy(z.double(), y) for z in logits)
    kl = sum((F.softmax(t64 / T, 1) * (F.log_softmax(t64 / T, 1) - F.log_softmax(z.double() / T, 1))).sum(1).mean()
             for z in logits)
    expected = ce + 0.7 * T * T * kl

    class Model(torch.nn.Module):
        def forward(self, images):
            return type("Out", (), {"logits": logits})
    batch = type("Batch", (), {"images": None, "labels": y})
    terms = method.loss(Model(), batch, 0)
    total = terms["ce"] + terms["kd"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    total.backward()                          # only through the students' own terms (target detached)
    if ensemble == "general":
        z = torch.stack([zi.detach() for zi in logits])
        torch.testing.assert_close(target, 0.8 * z[0] + 0.2 * z[1])


def test_each_student_sees_its_own_view():
    method = make_method("--arch", "resnet20,wrn_16_2")
    assert method.args.views == 2
    model = method.model.eval()
    v1, v2 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model([v1, v2]).logits
        torch.testing.assert_close(out[0], model.branches[0](v1))
        torch.testing.assert_close(out[1], model.branches[1](v2))
    assert make_method("--same-view").args.views == 1


def test_general_needs_a_hold_out():
    with pytest.raises(UserError, match="--val-split"):
        train(KDCL, FAST + ["--arch", "resnet20", "--ensemble", "general"])


@pytest.mark.slow
def test_heterogeneous_run(tmp_path):
    results = train(KDCL, FAST + ["--arch", "resnet20,wrn_16_2", "--ensemble", "linear", "--out", str(tmp_path)])
    assert {"peer1/top1", "peer2/top1", "ensemble/top1"} <= set(results["last"]["test"])
    assert results["peer_archs"] == {"peer1": "resnet20", "peer2": "wrn_16_2"}
    assert set(results["last"]["train"]) >= {"ce", "kd"}


@pytest.mark.slow
def test_general_weights_follow_the_hold_out_each_epoch(tmp_path):
    results = train(KDCL, FAST + ["--arch", "resnet20", "--ensemble", "general", "--val-split", "40",
                                  "--out", str(tmp_path)])
    w = torch.load(tmp_path / "last.pt", weights_only=True)["state"]["general"]["weights"]
    assert w.sum().item() == pytest.approx(1.0) and not torch.allclose(w, torch.full((2,), 0.5))
    assert "val" in results["last"]
