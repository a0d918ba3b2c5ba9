"""PCL (train_pcl.py): the mean teacher's weights after k updates against the decay schedule re-stated in float64,
each branch on its own view, the mean teacher's peer j on view j (or on the student's view with --mean-view
student), the loss against a float64 re-statement, the
detached teachers, the ramp-up, and a run end to end with every head."""
import math

import pytest
import torch
import torch.nn.functional as F

import train_pcl
from engine import UserError, train
from losses import sigmoid_rampup
from models import create_model
from train_pcl import PCL, mean_teacher_decay, pcl_loss
from toy_methods import build_method

FAST = ["--dataset", "synthetic", "--subset", "64", "--batch-size", "32", "--gpu", "-1", "--no-progress",
        "--workers", "0", "--epochs", "1"]


def make_method(*argv):
    return build_method(PCL, ["--arch", "resnet20", "--dataset", "synthetic", *argv])


def test_decay_schedule():
    assert [mean_teacher_decay(n) for n in range(4)] == pytest.approx([0.0, 0.5, 2 / 3, 0.75], rel=1e-15)
    assert mean_teacher_decay(5000) == 0.999


def test_mean_teacher_after_k_updates_equals_the_schedule_in_float64():
    torch.manual_seed(0)
    method = make_method("--num-peers", "2")
    live = method.model
    expected = None
    for n in range(6):
        with torch.no_grad():
            for p in live.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        theta = [p.detach().double().clone() for p in live.parameters()]
        d = min(1 - 1 / (n + 1), 0.999)
        expected = theta if expected is None else [d * e + (1 - d) * t for e, t in zip(expected, theta)]
        method.mean_teacher.update()
    assert method.mean_teacher.steps == 6
    for e, p in zip(expected, method.mean_teacher.module.parameters()):
        torch.testing.assert_close(p.double(), e, rtol=1e-5, atol=1e-6)
        assert not p.requires_grad


def _mean_targets(method, views, monkeypatch):
    """The mean-teacher targets ``mean_logits[i][j]`` that ``method.loss`` hands to pcl_loss."""
    seen = {}
    monkeypatch.setattr(train_pcl, "pcl_loss", lambda logits, teacher, mean_logits, *a: seen.update(m=mean_logits) or {})
    batch = type("Batch", (), {"images": views, "labels": torch.zeros(4, dtype=torch.long)})
    method.loss(method.model, batch, 0)
    return seen["m"]


def _views():
    base = torch.randn(4, 3, 32, 32)
    return [base[torch.randperm(4)] + 0.1 * i for i in range(3)]    # views differ by sample


def test_each_branch_sees_its_own_view():
    torch.manual_seed(0)
    method, views = make_method(), _views()
    model = method.model.eval()
    with torch.no_grad():
        logits, _ = model(views)
        for i in range(3):
            torch.testing.assert_close(logits[i], model.peers.single_network(i)(views[i]))


def test_mean_teacher_peer_j_sees_its_own_view_j_by_default(monkeypatch):
    """The paper's overview figure (X^j into the temporal mean network of branch j) and the re-implementation
    (src/controller.py: mean_model(img1, img2, img3)): peer i's target from peer j is mean peer j on view j."""
    torch.manual_seed(0)
    method, views = make_method(), _views()
    assert method.args.mean_view == "own"
    targets = _mean_targets(method, views, monkeypatch)
    mean_net = method.mean_teacher.module.peers
    with torch.no_grad():                # train mode: batch statistics, so each output depends on its batch only
        for j in range(3):
            expected = mean_net.single_network(j)(views[j])          # trunk + branch j of the mean, on view j
            assert not torch.allclose(expected, mean_net.single_network(j)(views[(j + 1) % 3]), atol=1e-4)
            for i in range(3):
                torch.testing.assert_close(targets[i][j], expected)
                assert not targets[i][j].requires_grad


def test_mean_view_student_runs_mean_peer_j_on_the_students_view(monkeypatch):
    torch.manual_seed(0)
    method, views = make_method("--mean-view", "student"), _views()
    targets = _mean_targets(method, views, monkeypatch)
    mean_net = method.mean_teacher.module.peers
    with torch.no_grad():
        for i in range(3):
            for j in range(3):
                torch.testing.assert_close(targets[i][j], mean_net.single_network(j)(views[i]))
                assert not targets[i][j].requires_grad


def test_loss_matches_a_float64_restatement_and_teachers_are_detached():
    torch.manual_seed(1)
    m, B, C, T, w = 3, 5, 7, 3.0, 0.4
    logits = [torch.randn(B, C, requires_grad=True) for _ in range(m)]
    teacher = torch.randn(B, C, requires_grad=True)
    mean = [[torch.randn(B, C) for _ in range(m)] for _ in range(m)]
    y = torch.randint(0, C, (B,))
    terms = pcl_loss(logits, teacher, mean, y, T, w)

    def kd(s, t):
        s, t = s.double() / T, t.double() / T
        return T * T * (F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(s, 1))).sum(1).mean()

    expected = F.cross_entropy(teacher.double(), y) + sum(
        F.cross_entropy(z.double(), y) + w * kd(z, teacher)
        + w * sum(kd(z, mean[i][j]) for j in range(m) if j != i) / (m - 1) for i, z in enumerate(logits))
    assert sum(terms.values()).item() == pytest.approx(expected.item(), rel=1e-5)
    (terms["kd_teacher"] + terms["kd_mean"]).backward()
    assert teacher.grad is None and all(z.grad is not None for z in logits)


def test_rampup_reaches_one_at_80_epochs():
    assert sigmoid_rampup(0, 80) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(40, 80) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(80, 80) == 1.0 and sigmoid_rampup(200, 80) == 1.0


@pytest.mark.slow
def test_run_heads_and_resume(tmp_path):
    out = tmp_path / "run"
    results = train(PCL, FAST + ["--arch", "resnet20", "--out", str(out)])
    heads = {k[:-5] for k in results["last"]["test"] if k.endswith("/top1")}
    assert heads == {"peer1", "peer2", "peer3", "teacher", "mean_peer1", "mean_peer2", "mean_peer3"}
    assert results["selection"]["metric"] == "mean_peer1/top1"
    assert set(results["last"]["train"]) >= {"ce", "ce_teacher", "kd_teacher", "kd_mean"}
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert int(ckpt["state"]["mean_teacher"]["n_averaged"]) == 2          # 64 / 32 steps
    # the deployed network: peer 1 of the mean teacher, exported, gives the run's mean_peer1 logits
    export = load_script("export_peer")
    exported = export.export_peer(out / "last.pt", 1, source="mean_teacher", head="mean_peer1")
    assert exported["source"]["top1"]["test"] == results["last"]["test"]["mean_peer1/top1"]
    net = create_model("resnet20", num_classes=10)
    net.load_state_dict(exported["state_dict"])
    method = make_method()
    method.model.load_state_dict(ckpt["state"]["model"])
    method.mean_teacher.load_state_dict(ckpt["state"]["mean_teacher"])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), method.eval_logits(method.model.eval(), x)["mean_peer1"])
    resumed = train(PCL, FAST + ["--arch", "resnet20", "--epochs", "2", "--extend-epochs", "--out", str(out),
                                 "--resume", "auto"])
    assert len(resumed["history"]) == 2
    assert int(torch.load(out / "last.pt", weights_only=True)["state"]["mean_teacher"]["n_averaged"]) == 4


def load_script(name):
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_refusals(tmp_path):
    with pytest.raises(UserError, match="share layers"):
        train(PCL, FAST + ["--arch", "resnet20,wrn_16_2", "--out", str(tmp_path)])


@pytest.mark.slow
def test_grouped_peers_train_the_same_run(tmp_path):
    """--grouped-peers groups the peers of the model and of its mean teacher (a copy made at build time) alike:
    the same losses (float32 rounding apart), checkpoints in the plain layout, evaluated without the flag alike."""
    from engine.checkpoint import load_checkpoint
    argv = FAST + ["--arch", "resnet20", "--subset", "128", "--lr", "0.02"]
    plain = train(PCL, argv + ["--out", str(tmp_path / "plain")])
    grouped = train(PCL, argv + ["--grouped-peers", "--out", str(tmp_path / "grouped")])
    for key, value in plain["history"][0]["train"].items():
        if key in ("ce", "ce_teacher", "kd_teacher", "kd_mean", "loss"):
            assert grouped["history"][0]["train"][key] == pytest.approx(value, rel=1e-4, abs=1e-6)
    shapes = [{part: {k: v.shape for k, v in module.items()} for part, module in
               load_checkpoint(tmp_path / run / "last.pt")["state"].items()} for run in ("plain", "grouped")]
    assert shapes[0] == shapes[1] and set(shapes[0]) == {"model", "mean_teacher"}
    evaluated = train(PCL, argv + ["--eval-only", str(tmp_path / "grouped" / "best.pt"), "--out", str(tmp_path / "e")])
    assert evaluated["test"] == pytest.approx(grouped["best"]["test"], abs=1e-9)
