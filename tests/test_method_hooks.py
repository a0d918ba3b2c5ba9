"""The method-owned step (train_step / after_step / StepContext), on_epoch_end's evaluator and the
TemporalMean helper: against a float64 re-statement, through the engine, across resume and across 2 gloo
ranks."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from engine import UserError, train
from engine.checkpoint import load_checkpoint
from engine.method import Method, StepContext
from models.temporal_mean import TemporalMean
from toy_methods import AlternatingToy, MeanTeacherToy, interrupted, mean_teacher_decay

REPO = Path(__file__).resolve().parent.parent
FAST = ["--dataset", "synthetic", "--arch", "resnet20", "--subset", "256", "--batch-size", "64",
        "--gpu", "-1", "--no-progress", "--workers", "0", "--lr", "0.05"]
STEPS_PER_EPOCH = 256 // 64


def assert_same_state(a: dict, b: dict):
    """Bit-identical nested state dicts (tensors compared exactly, everything else with ==)."""
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            assert_same_state(a[k], b[k])
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def run_and_resume(cls, tmp_path, epochs=3, extra=()):
    """(uninterrupted results, resumed results): the second run stops before epoch 2 and resumes."""
    full = train(cls, FAST + ["--epochs", str(epochs), "--out", str(tmp_path / "full"), *extra])
    with pytest.raises(KeyboardInterrupt):
        train(interrupted(cls, 2), FAST + ["--epochs", str(epochs), "--out", str(tmp_path / "cut"), *extra])
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 2
    resumed = train(cls, FAST + ["--epochs", str(epochs), "--out", str(tmp_path / "cut"), "--resume", "auto", *extra])
    return full, resumed


# ---- a method with its own step: two optimizers, an after_step counter ------------------------------

def test_alternating_method_trains_and_resumes_bit_identically(tmp_path):
    full, resumed = run_and_resume(AlternatingToy, tmp_path)
    assert set(full["history"][0]["train"]) >= {"critic", "ce", "fool", "loss"}   # every named term logged
    h = full["history"][0]["train"]
    assert h["loss"] == pytest.approx(h["critic"] + h["ce"] + h["fool"], rel=1e-5)
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "cut" / "last.pt")
    assert int(a["state"]["counter"]["steps"]) == 3 * STEPS_PER_EPOCH             # once per step
    assert_same_state(a["state"], b["state"])
    assert_same_state(a["optimizers"], b["optimizers"])                           # both momentum buffers
    assert set(a["optimizers"]) == {"net", "critic"}
    assert all(s["momentum_buffer"] is not None for o in a["optimizers"].values() for s in o["state"].values())
    timing = ("epoch_s", "images_per_s")
    assert {k: v for k, v in resumed["history"][2]["train"].items() if k not in timing} == \
        {k: v for k, v in full["history"][2]["train"].items() if k not in timing}
    assert resumed["history"][2]["test"] == full["history"][2]["test"]
    assert full["history"][2]["lr"]["critic"] == 0.05                            # unscheduled group


def test_step_context_names_and_errors():
    w = nn.Parameter(torch.ones(2))
    v = nn.Parameter(torch.ones(2))
    opts = {"a": torch.optim.SGD([w], lr=0.5), "b": torch.optim.SGD([v], lr=0.5)}
    step = StepContext(opts, torch.amp.GradScaler("cpu", enabled=False), "cpu")
    step.zero_grad()
    step.backward((w * v).sum())
    step.step("a")                                   # only a moves
    assert torch.equal(w.detach(), torch.full((2,), 0.5)) and torch.equal(v.detach(), torch.ones(2))
    step.zero_grad("b")
    assert v.grad is None and w.grad is not None
    with pytest.raises(KeyError, match="no optimizer named 'c'"):
        step.step("c")
    with step.autocast():                            # --amp off: a no-op context
        assert not torch.is_autocast_enabled()


# ---- on_epoch_end's evaluator ---------------------------------------------------------------------

def test_on_epoch_end_predicts_the_whole_val_split(tmp_path):
    results = train(MeanTeacherToy, FAST + ["--epochs", "1", "--val-split", "64", "--out", str(tmp_path)])
    probe = load_checkpoint(tmp_path / "last.pt")["state"]["probe"]
    logits, labels = probe["val_logits"], probe["val_labels"]
    assert logits.shape == (64, 10) and logits.abs().sum(1).gt(0).all()          # every row filled
    top1 = (logits.argmax(1) == labels).double().mean().item() * 100
    assert top1 == pytest.approx(results["history"][0]["val"]["net/top1"], abs=1e-4)


def test_predict_without_val_split_is_a_user_error(tmp_path):
    class NeedsVal(MeanTeacherToy):
        def on_epoch_end(self, epoch, evaluator):
            evaluator.predict("val")
    with pytest.raises(UserError, match="--val-split"):
        train(NeedsVal, FAST + ["--epochs", "1", "--subset", "64", "--out", str(tmp_path)])


# ---- TemporalMean ---------------------------------------------------------------------------------

def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()


def perturb(net, gen):
    """A stand-in for an optimizer step: new live weights and BN statistics."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        net(torch.randn(5, 3, generator=gen, dtype=torch.float64))      # train mode: BN statistics move


def test_temporal_mean_follows_the_schedule_in_float64():
    net = small_net()
    mean = TemporalMean(net, mean_teacher_decay)
    start = {k: v.clone() for k, v in mean.module.state_dict().items()}
    assert not any(p.requires_grad for p in mean.parameters())
    gen = torch.Generator().manual_seed(1)
    expected = None
    for n in range(120):                                  # past the ramp: d reaches its cap of 0.99
        perturb(net, gen)
        live = [p.detach().clone() for p in net.parameters()]
        if n == 0:
            expected = live                               # update 0 copies
        else:
            d = min(1 - 1 / (n + 1), 0.99)
            expected = [d * m + (1 - d) * x for m, x in zip(expected, live)]
        mean.update()
    assert mean.steps == 120 and int(mean.n_averaged) == 120
    for got, want in zip(mean.module.parameters(), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for name, b in mean.module.named_buffers():           # "own": never copied from the live net
        assert torch.equal(b, start[name])


def test_temporal_mean_buffer_modes():
    gen = torch.Generator().manual_seed(2)
    net = small_net()
    copied, averaged = TemporalMean(net, lambda n: 0.5, buffers="copy"), TemporalMean(net, lambda n: 0.5, buffers="average")
    start = net[1].running_mean.clone()
    perturb(net, gen)
    copied.update(), averaged.update()                     # update 0 copies everything
    first = net[1].running_mean.clone()
    perturb(net, gen)
    copied.update(), averaged.update()
    assert torch.equal(copied.module[1].running_mean, net[1].running_mean)
    torch.testing.assert_close(averaged.module[1].running_mean, 0.5 * first + 0.5 * net[1].running_mean,
                               rtol=1e-12, atol=1e-12)
    assert int(averaged.module[1].num_batches_tracked) == int(net[1].num_batches_tracked) == 2
    assert not torch.equal(start, first)
    own = TemporalMean(net, lambda n: 0.5)
    own.train()(torch.randn(5, 3, generator=gen, dtype=torch.float64))   # run in train mode: its own statistics
    assert not torch.equal(own.module[1].running_mean, net[1].running_mean)
    with pytest.raises(ValueError, match="buffers"):
        TemporalMean(net, lambda n: 0.5, buffers="live")
    bad = TemporalMean(net, lambda n: 1.5)
    bad.update()                                           # update 0 copies: decay not read
    with pytest.raises(ValueError, match=r"d\(1\) = 1.5"):
        bad.update()


def test_temporal_mean_resumes_exactly():
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    net_a, net_b = small_net(), small_net()
    a = TemporalMean(net_a, mean_teacher_decay)
    for _ in range(5):
        perturb(net_a, gen_a)
        a.update()
    state = copy.deepcopy(a.state_dict())
    live = copy.deepcopy(net_a.state_dict())
    for _ in range(5):
        perturb(net_a, gen_a)
        a.update()
    # A fresh process: new module, new mean (counter 0), then the checkpoint.
    for _ in range(5):
        perturb(net_b, gen_b)
    net_b.load_state_dict(live)
    b = TemporalMean(net_b, mean_teacher_decay)
    b.load_state_dict(state)
    assert b.steps == 5
    for _ in range(5):
        perturb(net_b, gen_b)
        b.update()
    assert_same_state(a.state_dict(), b.state_dict())


def test_temporal_mean_through_the_engine_resumes_bit_identically(tmp_path):
    full, resumed = run_and_resume(MeanTeacherToy, tmp_path)
    assert "mean/top1" in full["history"][0]["test"]                  # evaluated as a head
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "cut" / "last.pt")
    assert int(a["state"]["mean"]["n_averaged"]) == 3 * STEPS_PER_EPOCH
    assert_same_state(a["state"], b["state"])
    assert resumed["history"][2]["test"] == full["history"][2]["test"]
    mean, live = a["state"]["mean"], a["state"]["model"]
    assert not torch.equal(mean["module.fc.weight"], live["fc.weight"])
    assert not torch.equal(mean["module.features.1.running_mean"], live["features.1.running_mean"])


@pytest.mark.slow
def test_two_ranks_hold_identical_temporal_means(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "ddp_worker.py"), "toy_methods:MeanTeacherToy", *FAST, "--epochs", "2",
           "--subset", "320", "--val-split", "64", "--batch-size", "32", "--out", str(tmp_path)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)["model"]
    assert_same_state(a, b)                                  # model, mean (weights, BN statistics, counter)
    assert int(a["mean"]["n_averaged"]) == 2 * (320 // (32 * 2))          # --subset counts training images
    # The evaluator gathered the whole val split on every rank: its accuracy is the engine's val accuracy.
    results = json.loads((tmp_path / "results.json").read_text())
    probe = a["probe"]
    top1 = (probe["val_logits"].argmax(1) == probe["val_labels"]).double().mean().item() * 100
    assert top1 == pytest.approx(results["history"][-1]["val"]["net/top1"], abs=1e-4)
    assert probe["val_logits"].abs().sum(1).gt(0).all()


@pytest.mark.slow
def test_non_finite_state_on_one_rank_stops_both(tmp_path):
    """NaN in an extra module of rank 1 only (BN buffers, too, may differ between ranks): both ranks stop with
    the one-line error in the same epoch, none hangs in a collective, and nothing of the epoch is saved."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "ddp_worker.py"), "toy_methods:NaNStateOnOneRank", *FAST, "--epochs", "1",
           "--out", str(tmp_path)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert (r.stdout + r.stderr).count("training became non-finite in epoch 1 (junk holds NaN or inf)") == 2, \
        r.stderr[-3000:]
    assert not (tmp_path / "last.pt").exists()


# ---- what a method's step returns, and what a method must define ----------------------------------------

@pytest.mark.parametrize("returned, says", [
    ({"ce": torch.ones(4)}, "WrongTerms.loss: its term 'ce' is a tensor of shape (4,); every term is a scalar "
                            "tensor (reduce it, e.g. with .mean())"),
    ({"ce": 0.0}, "WrongTerms.loss: its term 'ce' is a float; every term is a scalar tensor"),
    ({}, "WrongTerms.loss returned an empty dict; it returns the named loss terms, a dict such as"),
    (torch.ones(()), "WrongTerms.loss returned Tensor; it returns the named loss terms"),
    ({"n": torch.tensor(3)}, "WrongTerms.loss: its term 'n' has dtype int64, not a loss; every term is a float"),
    ({"kd": torch.tensor(True)}, "WrongTerms.loss: its term 'kd' has dtype bool, not a loss"),
    ({1: torch.ones(())}, "WrongTerms.loss: a term is named 1 (int); name every term by a string"),
    ({"ce": torch.ones(()), "kd": torch.zeros(())}, "WrongTerms.loss: none of its terms (ce, kd) has a gradient "
                                                     "(each is detached or computed under no_grad), so nothing"),
])
def test_loss_terms_of_the_wrong_kind_are_one_line_naming_the_term(returned, says, tmp_path):
    """A copied method whose loss returns a non-scalar term, a number, an integer or boolean tensor, a term not
    named by a string, only detached terms, nothing or a bare tensor stops at its first
    step with one line naming the method and the term (it was an error deep in autograd or the epoch's averages),
    and the run records it as failed."""
    class WrongTerms(MeanTeacherToy):
        def loss(self, model, batch, epoch):
            super().loss(model, batch, epoch)
            return returned
    with pytest.raises(UserError) as e:
        train(WrongTerms, FAST + ["--epochs", "1", "--out", str(tmp_path)])
    assert str(e.value).startswith(says)
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "failed"


def test_a_copied_scripts_loss_is_named_with_the_copy(tmp_path):
    """A copy of a script keeps its class's name (``DML``): the line for a wrong loss names the copy's file too, so
    that the user edits the copy, not train_dml.py."""
    copy = tmp_path / "train_dml_named.py"        # (kept outside the repository: it imports the engine by PYTHONPATH)
    code = (REPO / "train_dml.py").read_text()
    assert code.count('"kd": mutual_kd(logits, T) / (n - 1)}') == 1
    copy.write_text(code.replace('"kd": mutual_kd(logits, T) / (n - 1)}', '"kd": ce[None]}'))
    r = subprocess.run([sys.executable, str(copy), *FAST, "--epochs", "1", "--out", str(tmp_path / "run")],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and r.stderr.splitlines()[-1] == (
        f"error: DML.loss in {copy.name}: its term 'kd' is a tensor of shape (1,); every term is a scalar tensor "
        "(reduce it, e.g. with .mean())"), r.stderr


def test_a_subclass_outside_a_script_is_named_alone():
    """A method subclassed in a notebook or a test inherits its parent's script, but is not defined there."""
    import train_dml
    from engine.method import hook_name

    class Mine(train_dml.DML):
        pass
    assert hook_name(Mine, "loss") == "Mine.loss"
    assert hook_name(train_dml.DML, "loss") == "DML.loss in train_dml.py"


def test_a_train_step_of_its_own_is_checked_too():
    from engine.method import checked_terms
    assert checked_terms({"a": torch.zeros(())}, "X.train_step") == {"a": torch.zeros(())}
    with pytest.raises(UserError, match=r"^X\.train_step: its term 'b' is a tensor of shape \(1,\)"):
        checked_terms({"a": torch.zeros(()), "b": torch.zeros(1)}, "X.train_step")
    with pytest.raises(UserError, match=r"^X\.train_step returned NoneType"):
        checked_terms(None, "X.train_step")
    with pytest.raises(UserError, match=r"^X\.train_step: a term is named 'loss', the name of their sum"):
        checked_terms({"loss": torch.zeros(())}, "X.train_step")     # (it was overwritten by the sum, unseen)


def test_a_method_without_build_or_loss_and_a_recipe_typo_say_so():
    class NoBuild(MeanTeacherToy):
        build = Method.build
    with pytest.raises(NotImplementedError, match=r"NoBuild does not implement build\(\), which returns its model"):
        NoBuild.build(object.__new__(NoBuild))
    with pytest.raises(NotImplementedError, match=r"NoBuild does not implement loss\(\)"):
        Method.loss(object.__new__(NoBuild), None, None, 0)
    with pytest.raises(TypeError, match=r"Typo\.recipe is 'okdip', which recipes\.py does not define; one of: "):
        class Typo(MeanTeacherToy):
            recipe = "okdip"


def test_a_best_metric_of_the_class_is_named_as_such(tmp_path):
    class Misspelt(MeanTeacherToy):
        best_metric = "ensembel"
    with pytest.raises(UserError, match=r"^Misspelt\.best_metric 'ensembel' is not an evaluated head; choose one "):
        train(Misspelt, FAST + ["--epochs", "1", "--out", str(tmp_path)])
    with pytest.raises(UserError, match=r"^--best-metric 'x' is not an evaluated head"):
        train(Misspelt, FAST + ["--epochs", "1", "--best-metric", "x", "--out", str(tmp_path / "b")])


def test_a_flag_declared_twice_is_one_line_naming_the_method():
    """A copy that adds a flag the engine declares already (``--lr``) stops in one line, not argparse's traceback."""
    from engine import parse_args

    class Clash(MeanTeacherToy):
        @classmethod
        def add_arguments(cls, parser):
            parser.add_argument("--lr", type=float, default=0.5)
    with pytest.raises(UserError, match=r"^Clash\.add_arguments: argument --lr: conflicting option string: --lr; "
                                        "give the method's flag a name of its own"):
        parse_args(Clash, [])
