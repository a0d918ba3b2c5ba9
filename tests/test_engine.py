"""The shared loop end to end on synthetic data, resume, checkpoints, results and the user-facing errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_baseline
import train_dml
from engine import UserError, train
from engine.optim import lr_factor
from engine.checkpoint import load_checkpoint
from toy_methods import interrupted

REPO = Path(__file__).resolve().parent.parent
FAST = ["--dataset", "synthetic", "--arch", "resnet20", "--subset", "512", "--batch-size", "64",
        "--gpu", "-1", "--no-progress", "--workers", "0"]


def run_cli(*args, cwd=REPO):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def dml_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dml")
    results = train(train_dml.DML, FAST + ["--epochs", "3", "--lr", "0.05", "--out", str(out)])
    return out, results


@pytest.mark.slow
def test_loop_learns_and_writes_everything(dml_run):
    out, results = dml_run
    history = results["history"]
    assert len(history) == 3 and results["status"] == "finished"
    assert history[-1]["train"]["loss"] < history[0]["train"]["loss"]
    # 10 balanced classes: chance is 10 %.
    assert results["best"]["test"]["ensemble/top1"] > 30.0
    for head in ("peer1", "peer2", "ensemble"):
        for k in ("top1", "top5"):
            assert f"{head}/{k}" in results["last"]["test"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["status"] == "finished" and saved["recipe"]["name"] == "okd"
    assert saved["args"]["arch"] == "resnet20" and saved["versions"]["torch"] == torch.__version__
    assert saved["train_images_per_s"] > 0 and saved["git_commit"]
    assert set(saved["history"][0]["train"]) >= {"ce", "kd", "loss"}
    assert (out / "last.pt").is_file() and (out / "best.pt").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 3 and set(ckpt["optimizers"]) == {"model"} and "rng" in ckpt


@pytest.mark.slow
def test_tensorboard_has_every_term(dml_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, _ = dml_run
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/ce", "train/kd", "train/loss", "lr/model", "test/peer1/top1", "test/ensemble/top1"} <= tags


_InterruptedDML = interrupted(train_dml.DML, 2)


@pytest.mark.slow
def test_resume_equals_uninterrupted(dml_run, tmp_path):
    out_full, full = dml_run
    args = FAST + ["--epochs", "3", "--lr", "0.05", "--out", str(tmp_path)]
    with pytest.raises(KeyboardInterrupt):
        train(_InterruptedDML, args)
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 2
    resumed = train(train_dml.DML, args + ["--resume", "auto"])
    assert resumed["history"][2]["test"] == full["history"][2]["test"]
    assert resumed["history"][2]["train"]["loss"] == full["history"][2]["train"]["loss"]
    a = load_checkpoint(out_full / "last.pt")["state"]["model"]
    b = load_checkpoint(tmp_path / "last.pt")["state"]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_existing_run_is_never_overwritten(dml_run):
    out, _ = dml_run
    before = (out / "last.pt").stat().st_mtime_ns
    with pytest.raises(UserError, match="--resume auto"):
        train(train_dml.DML, FAST + ["--epochs", "3", "--out", str(out)])
    assert (out / "last.pt").stat().st_mtime_ns == before
    with pytest.raises(UserError, match="lies inside the run directory"):       # nor in a folder of the run
        train(train_dml.DML, FAST + ["--epochs", "1", "--out", str(out / "runs" / "inner")])
    assert not (out / "runs").exists()
    kept = out.parent / "kept_copy"           # a kept last.pt (or another tool's), without a run's lock file
    kept.mkdir()
    (kept / "last.pt").write_bytes((out / "last.pt").read_bytes())
    (kept / "results.json").write_text("{}")
    train(train_dml.DML, FAST + ["--epochs", "1", "--out", str(kept / "runs" / "inner")])


@pytest.mark.slow
def test_a_run_without_checkpoints_is_never_overwritten(dml_run, tmp_path):
    """The checkpoints of a finished run deleted to save disk: its results.json (and a best.pt or an evaluation
    left alone) still stop a new run in that folder, with or without --resume auto; a record of no epoch is
    replaced."""
    import shutil
    out = tmp_path / "kept"
    shutil.copytree(dml_run[0], out)
    (out / "last.pt").unlink()
    record = (out / "results.json").read_bytes()
    for resume in ([], ["--resume", "auto"]):
        with pytest.raises(UserError, match="holds best.pt and results.json of an earlier run but no last.pt to "
                                            f"continue it from \\(its best.pt continues into a new folder: --resume "
                                            f"{out / 'best.pt'} --out NEW_DIR\\); start this run with another --out"):
            train(train_dml.DML, FAST + ["--epochs", "1", "--out", str(out)] + resume)
    (out / "best.pt").write_text("not a checkpoint")          # no command that cannot work is suggested
    with pytest.raises(UserError) as e:
        train(train_dml.DML, FAST + ["--epochs", "1", "--out", str(out)])
    assert "holds best.pt and results.json of an earlier run but no last.pt to continue it from; start" in str(e.value)
    (out / "best.pt").unlink()
    with pytest.raises(UserError, match="holds results.json of an earlier run"):
        train(train_dml.DML, FAST + ["--epochs", "1", "--out", str(out)])
    assert (out / "results.json").read_bytes() == record
    (out / "results.json").unlink()
    (out / "eval-best-synthetic.json").write_text("kept")     # what --eval-only wrote of its best.pt
    with pytest.raises(UserError, match="holds eval-best-synthetic.json of an earlier run"):
        train(train_dml.DML, FAST + ["--epochs", "1", "--out", str(out)])
    assert (out / "eval-best-synthetic.json").read_text() == "kept"
    (out / "eval-best-synthetic.json").unlink()
    # a folder whose record holds no epoch (a run stopped in its first epoch) is simply started again
    (out / "results.json").write_text('{"method": "dml", "history": []}')
    train(train_dml.DML, FAST + ["--epochs", "1", "--out", str(out)])
    assert (out / "last.pt").exists()


@pytest.mark.parametrize("head", ["nope", ""])
def test_best_metric_names_an_evaluated_head(head, tmp_path):
    """--best-metric chooses best.pt by one head's top-1: a name the method does not evaluate, the empty one
    included (it once meant the default), stops the run in one line naming the heads, and nothing is written."""
    with pytest.raises(UserError, match=f"^--best-metric '{head}' is not an evaluated head; choose one of: peer1, "
                                        "peer2, ensemble$"):
        train(train_dml.DML, FAST + ["--epochs", "1", "--subset", "64", "--best-metric", head, "--out",
                                     str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_batch_size_1_is_refused_where_the_model_normalises_over_the_batch(tmp_path):
    """ONE's gate (and HCGNet's gates) hold BatchNorm1d, which cannot train on one sample: --batch-size 1 stops in
    one line naming the layer, before any step and with nothing written (it was a traceback from the first step).
    A model with only BatchNorm2d trains at --batch-size 1."""
    import train_one
    argv = FAST + ["--epochs", "1", "--subset", "16", "--batch-size", "1", "--out", str(tmp_path / "run")]
    with pytest.raises(UserError) as e:
        train(train_one.ONE, argv)
    assert str(e.value) == ("--batch-size 1: model.gate.norm normalises over the batch (BatchNorm1d), which cannot "
                            "train on one sample; give --batch-size 2 or more")
    assert not (tmp_path / "run").exists()
    assert train(train_baseline.Baseline, argv)["epochs_done"] == 1


def test_a_batch_larger_than_the_training_set_is_said(tmp_path, capsys):
    """--batch-size above the number of training images (a --subset check at the default batch) trains one smaller
    batch an epoch: the first line says so beside the batch it names."""
    train(train_baseline.Baseline, FAST + ["--epochs", "1", "--subset", "16", "--batch-size", "32", "--out",
                                           str(tmp_path / "run")])
    assert ("global batch 32 (32 x 1 process(es); more than the 16 training images: one smaller batch an epoch)"
            in capsys.readouterr().out)


def test_a_folder_that_is_not_a_run_is_no_out(tmp_path):
    """--out of a folder that holds what no run writes (a user's files, a home folder, a dataset's root) stops in one
    line before anything is read or written: the run's files would mix with the user's, and every later run below
    that folder would lie inside a run."""
    home = tmp_path / "home"
    (home / "datasets").mkdir(parents=True)
    (home / "notes.txt").write_text("mine")
    for more in ([], ["--resume", "auto"]):
        with pytest.raises(UserError, match=f"^{home} holds datasets, notes.txt, which no run writes; give this run "
                                            r"an --out of its own \(a new folder, or one that holds only logs: "
                                            r"\*.log, \*.out, \*.err\)$"):
            train(train_dml.DML, FAST + ["--epochs", "1", "--out", str(home)] + more)
    assert sorted(p.name for p in home.iterdir()) == ["datasets", "notes.txt"]


@pytest.mark.slow
def test_a_run_directory_may_hold_what_runs_and_tools_write_there(dml_run, tmp_path):
    """What a run directory holds besides the run's files does not make it another folder: TensorBoard's events,
    a damaged results.json kept aside, logs (scripts/reproduce.py's train.log, a shell's redirection, SLURM's
    output), hidden files; named in any case. A run continued into another --out (--resume PATH) is held to the
    same rule as a new one."""
    out = tmp_path / "run"
    (out / "TensorBoard").mkdir(parents=True)
    logs = ["train.log", "slurm-123.out", "job.ERR", "results.rejected-2.json", ".DS_Store"]
    for name in logs:
        (out / name).write_text(name)
    train(train_dml.DML, FAST + ["--epochs", "1", "--out", str(out)])
    assert (out / "last.pt").is_file() and all((out / name).read_text() == name for name in logs)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=f"^{mine} holds notes.txt, which no run writes"):
        train(train_dml.DML, FAST + ["--resume", str(dml_run[0] / "last.pt"), "--out", str(mine)])
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    (mine / "downloaded.pt").write_bytes((dml_run[0] / "last.pt").read_bytes())   # continued where it lies: the same
    with pytest.raises(UserError, match=f"^{mine} holds notes.txt, which no run writes"):
        train(train_dml.DML, FAST + ["--resume", str(mine / "downloaded.pt"), "--epochs", "4", "--extend-epochs"])
    assert sorted(p.name for p in mine.iterdir()) == ["downloaded.pt", "notes.txt"]


@pytest.mark.slow
def test_eval_only_reproduces_best(dml_run, tmp_path, capsys):
    out, results = dml_run
    evaluated = train(train_dml.DML, FAST + ["--eval-only", str(out / "best.pt"), "--out", str(tmp_path)])
    assert evaluated["test"] == results["best"]["test"]
    assert f"\ntest (best.pt, epoch {results['best']['epoch']}): peer1/top1 " in capsys.readouterr().out
    assert (tmp_path / "eval-best-synthetic.json").is_file()


class _NaNDML(train_dml.DML):
    def loss(self, model, batch, epoch):
        terms = super().loss(model, batch, epoch)
        terms["kd"] = terms["kd"] * float("nan")
        return terms


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    train(train_dml.DML, FAST + ["--epochs", "2", "--out", str(tmp_path)])
    # The same run extended, but its loss now turns NaN: a clear error, and last.pt keeps epoch 2.
    with pytest.raises(UserError, match="non-finite") as err:
        train(_NaNDML, FAST + ["--epochs", "3", "--extend-epochs", "--out", str(tmp_path), "--resume", "auto"])
    assert "kd=nan" in str(err.value) and "last.pt holds epoch 2. Start a new run (another --out)" in str(err.value)
    assert str(err.value).endswith("and any edit of _NaNDML.loss (the terms named here).")   # (an edited loss)
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 2


class _NaNStepDML(train_dml.DML):
    def train_step(self, model, batch, epoch, step):
        terms = super().train_step(model, batch, epoch, step)
        return {**terms, "kd": terms["kd"] * float("nan")}


@pytest.mark.slow
def test_a_non_finite_stop_names_the_step_of_a_method_that_has_its_own(tmp_path):
    """A method with its own train_step (as AMLN) is pointed at that hook, not at a loss it may not have."""
    with pytest.raises(UserError) as err:
        train(_NaNStepDML, FAST + ["--epochs", "1", "--out", str(tmp_path)])
    assert str(err.value).endswith("and any edit of _NaNStepDML.train_step (the terms named here).")


class _Junk(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("value", torch.zeros(3))


class _NaNStateDML(train_dml.DML):
    """Finite losses throughout, but an extra module (outside the model, like a memory bank) turns NaN in the
    last step of the epoch, after the loss was measured."""
    state_keys = ("junk",)

    def build(self):
        self.junk = _Junk()
        return super().build()

    def on_epoch_end(self, epoch, evaluator):
        self.junk.value.fill_(float("nan"))


@pytest.mark.slow
def test_non_finite_weights_with_a_finite_loss_stop_the_run(tmp_path):
    """The loss of every step is finite, yet the epoch leaves NaN in the method's state: the run stops before
    anything of the epoch is saved (no last.pt, no "finished" record), naming the module, and the message says
    no earlier epoch exists rather than pointing at a last.pt that does not."""
    with pytest.raises(UserError, match="non-finite") as err:
        train(_NaNStateDML, FAST + ["--epochs", "1", "--out", str(tmp_path)])
    message = str(err.value)
    assert "(junk holds NaN or inf)" in message and "no earlier epoch was saved" in message
    assert "loss=" not in message and "--amp" not in message       # the loss was finite; amp off: no fp16 advice
    assert not (tmp_path / "last.pt").exists() and not (tmp_path / "best.pt").exists()
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_val_split_selects_on_val(tmp_path):
    results = train(train_baseline.Baseline, FAST + ["--epochs", "2", "--val-split", "100", "--out", str(tmp_path)])
    assert results["selection"]["split"] == "val"
    best_epoch = results["best"]["epoch"]
    val_curve = [h["val"]["net/top1"] for h in results["history"]]
    assert val_curve[best_epoch - 1] == max(val_curve)
    assert results["best"]["test"] == results["history"][best_epoch - 1]["test"]


def test_lr_schedules_match_spec():
    class A:
        lr_schedule, epochs, milestones = "cosine", 300, [150, 225]
    got = [0.1 * lr_factor(e, A) for e in (0, 75, 150, 225, 299)]
    assert got == pytest.approx([0.1, 0.085355, 0.05, 0.014645, 2.7e-6], rel=1e-3, abs=1e-7)
    A.lr_schedule = "multistep"
    assert [lr_factor(e, A) for e in (0, 149, 150, 224, 225)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])


def test_recipe_and_preset_defaults():
    from engine import parse_args
    a = parse_args(train_dml.DML, [])
    assert (a.epochs, a.batch_size, a.lr, a.lr_schedule, a.weight_decay, a.nesterov) == (300, 128, 0.1, "cosine", 5e-4, True)
    assert (a.topology, a.num_peers, a.kd_T) == ("independent", 2, 1.0)
    a = parse_args(train_dml.DML, ["--recipe", "dccl", "--preset", "mcl-okd", "--kd-T", "4"])
    assert (a.lr_schedule, a.milestones, a.weight_decay) == ("multistep", [150, 225], 2e-4)
    assert (a.topology, a.num_peers, a.kd_T) == ("shared", 4, 4.0)


@pytest.mark.slow
def test_help_reads_well():
    r = run_cli("train_dml.py", "--help")
    assert r.returncode == 0
    for flag in ("--arch", "--recipe", "--preset", "--kd-T", "--resume", "--eval-only", "--val-split", "--amp",
                 "per GPU"):
        assert flag in r.stdout


@pytest.mark.parametrize("args, expected", [
    (["--arch", "resnet_nope"], "Valid names: densenet40_12"),
    (["--dataset", "cifar100", "--data", "/nonexistent/cifar"], "/nonexistent/cifar"),
    (["--resume", "auto", "--eval-only", "x.pt"], "not allowed with argument"),
    (["--num-peers", "1"], "argument --num-peers: must lie in [2, 256]; got 1"),
    (["--eval-only", "/nonexistent/ckpt.pt"], "does not exist"),
    (["--eval-only", "nowhere/ckpt.pt"], f"checkpoint {REPO / 'nowhere' / 'ckpt.pt'} does not exist"),  # absolute
    (["--eval-only", "/dev/null"], "checkpoint /dev/null is not a file (a device, pipe or socket); name a "
                                   "checkpoint file"),
])
@pytest.mark.slow
def test_user_errors_are_one_clear_message(args, expected):
    r = run_cli("train_dml.py", "--gpu", "-1", "--dataset", "synthetic", *args)
    assert r.returncode == 2, r.stderr
    assert expected in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    r = run_cli("train_dml.py", *FAST, "--epochs", "1", "--out", str(tmp_path), "--resume", "auto")
    assert r.returncode == 2 and "cannot be read" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "last.pt").read_bytes() == b"not a checkpoint"
    assert r.stderr.count("\n") == 1 and "weights_only" not in r.stderr     # one line, not torch's essay


def test_a_folder_given_as_a_checkpoint_names_the_files(tmp_path):
    """A folder given as a checkpoint: the line names the checkpoints it holds, and the command that continues
    the run only where there is a last.pt to continue."""
    with pytest.raises(UserError, match=r"is a folder, not a file; it holds no checkpoint \(last.pt, best.pt\): name "
                                        "a checkpoint file$"):
        load_checkpoint(tmp_path)
    (tmp_path / "best.pt").write_bytes(b"")
    with pytest.raises(UserError, match=f"name the checkpoint in it \\({tmp_path / 'best.pt'}\\)$"):
        load_checkpoint(tmp_path)
    (tmp_path / "last.pt").write_bytes(b"")
    with pytest.raises(UserError, match=f"in it \\({tmp_path / 'last.pt'} or {tmp_path / 'best.pt'}; to continue "
                                        f"that run: --out {tmp_path} --resume auto\\)$"):
        load_checkpoint(tmp_path)


def test_a_pickle_that_is_no_checkpoint_is_one_line_without_torchs_warning(tmp_path):
    import pickle
    import warnings
    path = tmp_path / "last.pt"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=4))      # (torch warns of the protocol before it refuses it)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with pytest.raises(UserError, match="cannot be read: torch.load refused it"):
            load_checkpoint(path)
    assert not shown, [str(w.message) for w in shown]


@pytest.mark.slow
def test_resume_follows_the_new_schedule(tmp_path):
    """Extending a run (--epochs with --extend-epochs): the next epoch uses the new schedule's lr. Another
    --lr or --weight-decay on resume is refused (tests/test_runs.py)."""
    train(train_dml.DML, FAST + ["--epochs", "1", "--subset", "128", "--out", str(tmp_path)])
    resumed = train(train_dml.DML, FAST + ["--epochs", "2", "--extend-epochs", "--subset", "128",
                                           "--out", str(tmp_path), "--resume", "auto"])
    assert resumed["history"][0]["lr"]["model"] == pytest.approx(0.1)       # epoch 1 of 1 at lr 0.1
    assert resumed["history"][1]["lr"]["model"] == pytest.approx(0.1 * 0.5)  # cosine of 2 epochs from 0.1
