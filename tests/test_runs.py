"""Runs you can trust: one run, one directory, one true record (engine/run.py, engine/config.py,
engine/checkpoint.py and their use in engine/trainer.py). Tiny synthetic runs: 64 training images, 1 or 2 epochs."""
import errno
import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_baseline
import train_cl_ilr
import train_cmff
import train_dml
import train_mcl_okd
from data.files import RUN_LOCK
from engine import UserError, main, parse_args, train
from engine.checkpoint import atomic_save, atomic_write, load_checkpoint
from engine import run as run_module
from engine.config import differences, resolve, run_name
from recipes import RECIPES
from toy_methods import interrupted

REPO = Path(__file__).resolve().parent.parent
TINY = ["--dataset", "synthetic", "--arch", "resnet20", "--subset", "64", "--batch-size", "32", "--gpu", "-1",
        "--no-progress", "--workers", "0", "--epochs", "1"]
EVAL = ["--gpu", "-1", "--no-progress", "--workers", "0"]
DML, Baseline = train_dml.DML, train_baseline.Baseline


def _env():
    return dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


def _files(folder: Path) -> dict:
    """Every file the run wrote, by name, with its bytes and mtime (the lock file aside)."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file() and p.name != RUN_LOCK}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 1-epoch DML run."""
    out = tmp_path_factory.mktemp("dml_run")
    train(DML, TINY + ["--out", str(out)])
    return out


# ---- 1. identity -------------------------------------------------------------------------------------

def _name(method_cls, argv, world_size=1):
    return run_name(method_cls, resolve(method_cls, parse_args(method_cls, argv)), world_size)


@pytest.mark.parametrize("method_cls, flags", [
    (DML, ["--recipe", "one"]),
    (train_mcl_okd.MCLOKD, ["--alpha", "0"]),
    (train_cl_ilr.CLILR, ["--soft-target", "probs"]),
    (train_cmff.CMFF, ["--no-ssl"]),
])
def test_commands_that_train_differently_never_share_a_directory(method_cls, flags):
    base = _name(method_cls, ["--arch", "resnet32"])
    assert base == f"{method_cls.name}-resnet32-cifar100-n{method_cls.num_peers}-s0"   # defaults: no hash
    other = _name(method_cls, ["--arch", "resnet32", *flags])
    assert other != base and other.startswith(base + "-") and len(other) == len(base) + 9
    assert _name(method_cls, ["--arch", "resnet32", *flags]) == other                   # stable


def test_options_that_cannot_change_training_keep_the_directory():
    base = _name(DML, [])
    same = ["--workers", "8", "--no-progress", "--gpu", "1", "--eval-batch-size", "512", "--data", "/elsewhere",
            "--channels-last", "--sgd-impl", "for-loop", "--grouped-peers", "--milestones", "10 20", "--recipe", "okd"]
    assert _name(DML, same) == base          # (cosine does not read --milestones)
    assert _name(DML, ["--lr-schedule", "multistep", "--milestones", "10 20"]) != base
    assert _name(DML, [], world_size=2) != base   # a global batch of 2 x --batch-size
    assert _name(DML, ["--seed", "3", "--num-peers", "3"]) == "dml-resnet32-cifar100-n3-s3"
    assert _name(Baseline, []) == "baseline-resnet32-cifar100-s0"


def _copy_of(script: str, tmp_path: Path, name: str = ""):
    """The Method class of a copy of ``script`` saved as ``name`` (default ``train_<method>_copy.py``), imported
    as a script is."""
    copy = tmp_path / (name or script.replace(".py", "_copy.py"))
    shutil.copy(REPO / script, copy)
    spec = importlib.util.spec_from_file_location(copy.stem, copy)
    module = importlib.util.module_from_spec(spec)
    sys.modules[copy.stem] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[copy.stem]
    from engine import Method
    [cls] = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, Method)
             and c.__module__ == copy.stem]
    return cls


@pytest.mark.parametrize("script", sorted(p.name for p in REPO.glob("train_*.py")))
def test_a_copied_script_is_another_method(script, tmp_path):
    """Every script: its copy is a new method, named after the copy's file, with run directories of its own."""
    method = script[len("train_"):-3]
    cls = _copy_of(script, tmp_path)
    assert cls.name == f"{method}_copy" and cls.script == str(tmp_path / f"train_{method}_copy.py")
    assert _name(cls, ["--dataset", "synthetic"]).startswith(f"{method}_copy-")


def test_the_recorded_commit_is_dirty_when_the_code_that_ran_is_not_in_it(monkeypatch):
    """git_commit: HEAD's commit, '-dirty' when git lists a changed or untracked .py file or the script lies
    outside the repository; 'unknown' outside git (git answered as by a stand-in)."""
    import engine.trainer as trainer_module
    answers = {}

    def git(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 0, stdout=answers[cmd[1]], stderr="")
    monkeypatch.setattr(trainer_module.subprocess, "run", git)
    answers.update({"rev-parse": "abc\n", "status": ""})
    assert trainer_module.git_commit(str(REPO / "train_dml.py")) == "abc"
    assert trainer_module.git_commit("/elsewhere/my_idea.py") == "abc-dirty"
    answers["status"] = "?? train_dml_x.py\n"                       # a copied method, not yet committed
    assert trainer_module.git_commit(str(REPO / "train_dml_x.py")) == "abc-dirty"
    answers.update({"rev-parse": "", "status": ""})                  # not a git repository (or no commit)
    assert trainer_module.git_commit(str(REPO / "train_dml.py")) == "unknown"


def test_a_copy_named_train_py_is_a_method_with_a_name(tmp_path):
    cls = _copy_of("train_dml.py", tmp_path, name="train_.py")
    assert cls.name == "train_"
    assert _name(cls, ["--dataset", "synthetic"]).startswith("train_-resnet32-synthetic")


def test_the_script_that_saved_a_record_is_its_commands_first_word():
    from engine.checkpoint import saved_by
    assert saved_by({"method": "my_idea", "command": "/home/me/my_idea.py --arch resnet20"}) == "/home/me/my_idea.py"
    for command in (None, "", "'unclosed", 7):                     # older, empty, damaged or hand-edited: by name
        assert saved_by({"method": "dml", "command": command}) == "train_dml.py"
    assert saved_by({"method": "dml"}) == "train_dml.py"


def test_a_copy_never_resumes_its_originals_checkpoint(run, tmp_path):
    cls = _copy_of("train_dml.py", tmp_path)
    with pytest.raises(UserError, match=r"was saved by train_dml\.py; resume it with that script"):
        train(cls, TINY + ["--resume", str(run / "last.pt"), "--out", str(tmp_path / "copy")])
    with pytest.raises(UserError, match=r"was saved by train_dml\.py; evaluate it with that script"):
        train(cls, EVAL + ["--eval-only", str(run / "best.pt")])
    # and the original never resumes the copy's: the message names the script that saved it, as it was run
    copy_run = tmp_path / "copy_run"
    # the commit recorded does not hold the copy's code (outside the repository, or untracked in it)
    assert train(cls, TINY + ["--out", str(copy_run)])["git_commit"].endswith("-dirty")
    with pytest.raises(UserError, match=f"was saved by {tmp_path / 'train_dml_copy.py'}; resume it with that script"):
        train(DML, TINY + ["--epochs", "2", "--extend-epochs", "--resume", str(copy_run / "last.pt")])
    # renamed since, the script it names is gone: the rule that finds the method again is named too
    with pytest.raises(UserError, match=r"that script \(a method is its file name, in any folder: "
                                        r"train_dml_copy\.py\)$"):
        train(DML, TINY + ["--out", str(tmp_path / "x"), "--resume", str(copy_run / "last.pt")])


def test_a_method_cannot_name_itself():
    class Variant(DML):          # a subclass outside a script (a test, a helper module) stays the method
        pass
    assert Variant.name == "dml"
    with pytest.raises(TypeError, match="identity is its file name"):
        class SaysSo(DML):
            name = "other"


# ---- 2. resume checks the whole configuration -----------------------------------------------------------

def test_config_differences():
    saved = vars(parse_args(DML, ["--arch", "resnet20", "--epochs", "10"]))
    same = dict(saved, workers=0, gpu=-1, no_progress=True, sgd_impl="for-loop", out="x", resume="auto")
    assert differences(saved, same, {}) == []
    assert differences(saved, dict(saved, lr=0.2, kd_T=3.0), {}) == [("lr", 0.1, 0.2), ("kd_T", 1.0, 3.0)]
    longer = dict(saved, epochs=20)
    assert differences(saved, longer, {}) == [("epochs", 10, 20)]
    assert differences(saved, longer, {}, extend_epochs=True) == []
    assert differences(saved, dict(saved, epochs=5), {}, extend_epochs=True) == [("epochs", 10, 5)]
    # An option the checkpoint predates counts as its default.
    old = {k: v for k, v in saved.items() if k != "val_split"}
    assert differences(old, saved, {"val_split": 0}) == []
    assert differences(old, dict(saved, val_split=100), {"val_split": 0}) == [("val_split", 0, 100)]


@pytest.mark.parametrize("flags, named", [
    (["--lr", "0.2"], "--lr 0.1 (this command: 0.2)"),
    (["--seed", "1"], "--seed 0 (this command: 1)"),
    (["--batch-size", "16"], "--batch-size 32 (this command: 16)"),
    (["--kd-T", "4"], "--kd-T 1.0 (this command: 4.0)"),
    (["--epochs", "2"], "--epochs 1 (this command: 2) [to train longer, add --extend-epochs]"),
    # what the checkpoint's weights and sample indices are tied to
    (["--arch", "resnet32"], "--arch resnet20 (this command: resnet32)"),
    (["--num-peers", "3"], "--num-peers 2 (this command: 3)"),
    (["--subset", "32"], "--subset 64 (this command: 32)"),
    (["--val-split", "16"], "--val-split 0 (this command: 16)"),
    # a bundle of defaults: the run's record names it, so another one is refused too
    (["--recipe", "one"], "--recipe okd (this command: one)"),
    (["--preset", "mcl-okd"], "--preset paper (this command: mcl-okd)"),
])
def test_resume_with_another_training_option_stops(run, flags, named):
    before = _files(run)
    with pytest.raises(UserError) as e:
        train(DML, TINY + flags + ["--out", str(run), "--resume", "auto"])
    assert named in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).endswith("or start a new run with another --out")
    assert _files(run) == before


def test_a_new_run_in_a_folder_holding_a_run_is_told_what_resume_would_say(run, tmp_path, monkeypatch):
    """A command that starts a new run where a run's last.pt lies is told to continue it with --resume auto only
    when the run's record agrees with it (--epochs aside, which --resume auto names); another method's run, or
    one trained with other options (a reused --out, or the method's defaults changed since), is not offered."""
    before, out = _files(run), ["--out", str(run)]
    for argv, message in [
            (TINY + out, f"{run} already holds a run (last.pt). Continue it with --resume auto, or start this run "
                         "with another --out; nothing is overwritten."),
            (TINY + out + ["--epochs", "2"], f"{run} already holds a run (last.pt). Continue it with --resume auto"),
            (TINY + out + ["--lr", "0.2"], f"{run} already holds a run (last.pt) trained with --lr 0.1 (this command: "
                                           "0.2); continue it with --resume auto and the run's values, or start "
                                           "this run with another --out; nothing is overwritten.")]:
        with pytest.raises(UserError) as e:
            train(DML, argv)
        assert str(e.value).startswith(message)
    with pytest.raises(UserError) as e:
        train(train_cl_ilr.CLILR, TINY + out)
    assert str(e.value) == f"{run} already holds a run of train_dml.py (last.pt); start this run with another --out; " \
                           "nothing is overwritten."
    copy = tmp_path / "copy"              # results.json damaged, or without its method: last.pt's record is read
    shutil.copytree(run, copy)
    for damaged in (b"{", json.dumps({k: v for k, v in json.loads((run / "results.json").read_text()).items()
                                      if k != "method"}).encode()):
        (copy / "results.json").write_bytes(damaged)
        with pytest.raises(UserError, match=f"^{copy} already holds a run of train_dml.py \\(last.pt\\); start"):
            train(train_cl_ilr.CLILR, TINY + ["--out", str(copy)])
    monkeypatch.setitem(DML.presets, "paper", dict(DML.presets["paper"], kd_T=3.0))   # the script's default edited
    with pytest.raises(UserError, match=r"trained with --kd-T 1.0 \(this command: 3.0\); continue it with --resume"):
        train(DML, TINY + out)
    assert _files(run) == before


def test_resuming_a_finished_run_changes_nothing(run, capsys):
    before = _files(run)
    results = train(DML, TINY + ["--out", str(run), "--resume", "auto"])
    assert "already finished" in capsys.readouterr().out
    assert results["status"] == "finished" and results["epochs_done"] == 1
    assert _files(run) == before


def test_extend_epochs_needs_a_named_run():
    with pytest.raises(UserError, match="--extend-epochs continues an existing run"):
        train(DML, TINY + ["--epochs", "2", "--extend-epochs", "--resume", "auto"])


# ---- 3. --resume PATH: its own directory, never another run's -------------------------------------------

def test_resume_path_continues_in_its_own_directory(run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    results = train(DML, TINY + ["--epochs", "2", "--extend-epochs", "--resume", str(copy / "last.pt")])
    assert results["epochs_done"] == 2
    saved = json.loads((copy / "results.json").read_text())
    assert saved["epochs_done"] == 2 and saved["epochs"] == 2
    # --extend-epochs: the lr of the new epochs follows the cosine of the new --epochs.
    assert saved["history"][1]["lr"]["model"] == pytest.approx(0.1 * 0.5)
    # The record: both processes, cumulative wall time.
    processes = saved["processes"]
    assert [(p["start_epoch"], p["end_epoch"], p["status"]) for p in processes] == [(0, 1, "finished"),
                                                                                     (1, 2, "finished")]
    assert "--extend-epochs" in processes[1]["command"] and processes[1]["pid"] == os.getpid()
    assert saved["wall_time_s"] == pytest.approx(sum(p["wall_s"] for p in processes))
    assert load_checkpoint(copy / "last.pt")["epoch"] == 2


def test_a_run_continued_from_an_earlier_checkpoint_lists_only_its_own_processes(run, tmp_path):
    """A checkpoint older than its folder's record (a best.pt, a kept copy of last.pt) continued into another
    --out: the process that trained only the epochs after it is another line of the run's history."""
    line = tmp_path / "line"
    shutil.copytree(run, line)
    shutil.copy(line / "last.pt", line / "epoch1.pt")
    train(DML, TINY + ["--epochs", "2", "--extend-epochs", "--resume", str(line / "last.pt")])
    first = json.loads((line / "results.json").read_text())["processes"][0]
    fork = tmp_path / "fork"
    train(DML, TINY + ["--epochs", "3", "--extend-epochs", "--resume", str(line / "epoch1.pt"), "--out", str(fork)])
    saved = json.loads((fork / "results.json").read_text())
    processes = saved["processes"]
    assert [(p["start_epoch"], p["end_epoch"], p["status"]) for p in processes] == [(0, 1, "finished"),
                                                                                     (1, 3, "finished")]
    assert processes[0] == first
    assert saved["wall_time_s"] == pytest.approx(sum(p["wall_s"] for p in processes))


def test_a_process_that_went_on_past_the_checkpoint_keeps_the_checkpoints_count():
    at_best = {"pid": 1, "host": "h", "started": "t0", "started_unix": 0.0, "start_epoch": 0, "end_epoch": 1,
               "updated": "t1", "wall_s": 5.0, "status": "running"}          # as best.pt (epoch 1) holds it
    went_on = dict(at_best, end_epoch=2, updated="t2", wall_s=9.0, status="finished", ended="t2")  # results.json
    later = dict(at_best, pid=2, started="t3", started_unix=3.0, start_epoch=2, end_epoch=3, status="finished")
    [merged] = run_module.merge_processes([at_best], [went_on, later], epochs=3)
    assert (merged["end_epoch"], merged["wall_s"], merged["updated"]) == (1, 5.0, "t1")
    assert (merged["status"], merged["ended"]) == ("finished", "t2") and "went on to epoch 2" in merged["note"]


@pytest.mark.slow
def test_never_writes_into_another_runs_directory(run, tmp_path):
    other = tmp_path / "other"
    train(DML, TINY + ["--seed", "1", "--out", str(other)])
    before = _files(other)
    with pytest.raises(UserError, match="holds another run"):
        train(DML, TINY + ["--resume", str(run / "last.pt"), "--out", str(other)])
    assert _files(other) == before


# ---- 4. one writer per run directory -------------------------------------------------------------------

@pytest.mark.slow
def test_one_writer_per_run_directory(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from engine.run import RunLock; "
                               "RunLock(sys.argv[1], 'holder').acquire(); print('locked', flush=True); time.sleep(300)",
         str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"in use by process {holder.pid} "):
            train(Baseline, TINY + ["--out", str(tmp_path)])
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "last.pt").exists()
    # The holder died without unlocking: the kernel released its flock, the lock file is stale.
    lock = run_module.RunLock(tmp_path).acquire()
    assert lock.stale["pid"] == holder.pid
    lock.release()


def test_a_lock_its_dead_holder_s_loader_workers_still_hold_is_waited_for(tmp_path):
    """A trainer killed with SIGKILL leaves its DataLoader workers, forked with its lock, holding the lock until they
    find their parent gone (torch looks every 5 s): the next process waits for them (up to 12 s) rather than call
    the lock of a dead process stuck (it said 'a network file system?', 4 times of 4 after a kill)."""
    import socket
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    holder = {"pid": dead.pid, "host": socket.gethostname(), "started": "t", "started_unix": 1.0, "command": "x"}
    (tmp_path / RUN_LOCK).write_text(json.dumps(holder))
    worker = subprocess.Popen(        # an orphaned worker: it holds the lock and writes nothing
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(1.5)",
         str(tmp_path / RUN_LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="no longer running, yet its lock is still held"):
            run_module.RunLock(tmp_path).check_free()       # a reader does not wait: no process of that holder writes
        run_module.RunLock(tmp_path).check_free(wait=True)  # (the check of a command about to train waits)
        lock = run_module.RunLock(tmp_path).acquire()
        assert worker.wait(timeout=5) == 0 and lock.stale == holder
        lock.release()
    finally:
        worker.kill()
        worker.wait()
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.kill()                      # not reaped yet (a zombie): it has ended too
    deadline = time.time() + 10
    while run_module._pid_alive(killed.pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not run_module._pid_alive(killed.pid) and killed.poll() is not None


def test_lock_is_released_on_errors(tmp_path):
    lock = run_module.RunLock(tmp_path / "new").acquire()
    with pytest.raises(UserError, match="in use by process"):
        run_module.RunLock(tmp_path / "new").acquire()    # a second open file description: refused
    lock.release()
    assert not (tmp_path / "new").exists()            # nothing was written: no empty run directory left
    run_module.RunLock(tmp_path / "new").acquire().release()


def test_a_run_held_by_a_worker_of_torchrun_names_the_launcher_to_signal(tmp_path, monkeypatch):
    """Under torchrun the lock's holder is one worker; stopped alone, it leaves the other ranks a traceback. The
    line names the launcher (the worker's parent), which stops every rank."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    lock = run_module.RunLock(tmp_path / "run").acquire()
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    try:
        with pytest.raises(UserError, match=re.escape(f"in use by process {os.getpid()} on {socket.gethostname()}, "
                                                      f"a worker of torchrun (process {os.getppid()}: signal that "
                                                      "one to stop the run) (since ")):
            run_module.RunLock(tmp_path / "run").acquire()
    finally:
        lock.release()
    lock = run_module.RunLock(tmp_path / "run").acquire()       # not under torchrun: no launcher named
    with pytest.raises(UserError) as e:
        run_module.RunLock(tmp_path / "run").acquire()
    lock.release()
    assert "torchrun" not in str(e.value)


def test_a_lock_file_removed_after_it_was_opened_is_not_taken(tmp_path, monkeypatch):
    """The holder of a new, empty run folder leaves (removing the folder and its lock file) between another
    process's open of the lock file and its flock: that process must not count the removed file as the lock,
    or a third could lock a new file of the same name beside it."""
    import fcntl
    folder = tmp_path / "new"
    first = run_module.RunLock(folder).acquire()
    real_flock, left = fcntl.flock, []

    def flock(fd, operation):
        if not left:
            left.append(True)
            first.release()
        return real_flock(fd, operation)
    monkeypatch.setattr(fcntl, "flock", flock)
    second = run_module.RunLock(folder).acquire()
    assert left and second.path.is_file() and os.path.samestat(os.stat(second.path), os.fstat(second.fd))
    second.release()


@pytest.mark.slow
def test_a_run_whose_lock_file_was_removed_stops_before_its_next_save(tmp_path):
    """Removing .lock by hand lets a second process lock the folder: the first stops at its next save, without
    writing a checkpoint or a record (the folder may have another writer), and says how to continue."""
    out = tmp_path / "run"

    class LockRemoved(DML):
        def on_epoch_end(self, epoch, evaluator):
            if epoch == 1:
                (out / RUN_LOCK).unlink()
    train(DML, TINY + ["--out", str(out)])
    saved = ("last.pt", "best.pt", "results.json")
    before = {name: (out / name).read_bytes() for name in saved}
    with pytest.raises(UserError, match=r"\.lock was removed or replaced .* nothing more was written by this one, "
                                        r"and .*last\.pt holds epoch 1; epoch 2 was not saved\. Once no other "
                                        r"process trains it: python train_dml\.py"):
        train(LockRemoved, TINY[:-2] + ["--epochs", "2", "--extend-epochs", "--resume", "auto", "--out", str(out)])
    assert {name: (out / name).read_bytes() for name in saved} == before
    assert train(DML, TINY[:-2] + ["--epochs", "2", "--extend-epochs", "--resume", "auto",
                                   "--out", str(out)])["epochs_done"] == 2

    other = run_module.RunLock(out, "another process")

    class TakenOverThenStopped(DML):      # another process locks the folder and writes; then Ctrl-C on this one
        def on_epoch_end(self, epoch, evaluator):
            (out / RUN_LOCK).unlink()
            other.acquire()
            (out / "results.json").write_text("the other process's record")
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt) as e:
        train(TakenOverThenStopped, TINY[:-2] + ["--epochs", "3", "--extend-epochs", "--resume", "auto", "--out",
                                                 str(out)])
    other.release()
    assert "removed or replaced while this process trained the run" in e.value.message
    assert "Continue with" not in e.value.message
    assert (out / "results.json").read_text() == "the other process's record"


# ---- 5. --eval-only evaluates the checkpoint as trained --------------------------------------------------

@pytest.mark.slow
def test_eval_only_takes_the_checkpoint_options(run, tmp_path):
    # Neither --arch (default resnet32) nor --dataset (default cifar100) nor --subset given: the checkpoint's.
    result = train(DML, EVAL + ["--eval-only", str(run / "best.pt"), "--out", str(tmp_path)])
    assert (result["arch"], result["dataset"]) == ("resnet20", "synthetic")
    saved = json.loads((tmp_path / "eval-best-synthetic.json").read_text())
    assert saved["test"] == result["test"] and "synthetic test set" in saved["splits"]["test"]
    # Another copy of the data (--data) writes its own file, next to the first.
    train(DML, EVAL + ["--eval-only", str(run / "best.pt"), "--out", str(tmp_path), "--data", str(tmp_path)])
    assert len(list(tmp_path.glob("eval-best-synthetic*.json"))) == 2


@pytest.mark.slow
def test_eval_only_honours_the_evaluation_options_it_is_given(run, tmp_path):
    """--eval-subset (an evaluation option) given with --eval-only wins over the checkpoint's, is said in the
    record and gets its own file: the full-test-set evaluation beside it is not overwritten."""
    full = train(DML, EVAL + ["--eval-only", str(run / "best.pt"), "--out", str(tmp_path)])
    part = train(DML, EVAL + ["--eval-only", str(run / "best.pt"), "--out", str(tmp_path), "--eval-subset", "50"])
    whole = json.loads((tmp_path / "eval-best-synthetic.json").read_text())
    fifty = json.loads((tmp_path / "eval-best-synthetic-test50.json").read_text())
    assert whole["test"] == full["test"] and fifty["test"] == part["test"]
    assert fifty["splits"]["test"].startswith("50 images of the synthetic test set")
    assert whole["splits"]["test"] == "the synthetic test set"
    # another precision (an evaluation option too) gets its own file and says so
    train(DML, EVAL + ["--eval-only", str(run / "best.pt"), "--out", str(tmp_path), "--amp", "bf16"])
    assert json.loads((tmp_path / "eval-best-synthetic-bf16.json").read_text())["amp"] == "bf16"
    assert whole["amp"] == "off"
    # a run trained on a test subset is evaluated on its whole test set with --eval-subset 0
    subset_run = tmp_path / "subset_run"
    train(DML, TINY + ["--eval-subset", "40", "--out", str(subset_run)])
    train(DML, EVAL + ["--eval-only", str(subset_run / "best.pt"), "--eval-subset", "0"])
    assert json.loads((subset_run / "eval-best-synthetic.json").read_text())["splits"]["test"] == \
        "the synthetic test set"
    assert not (subset_run / "eval-best-synthetic-test40.json").exists()
    # another run's checkpoint evaluated into this folder would replace its evaluation: refused, before evaluating
    before = (subset_run / "eval-best-synthetic.json").read_bytes()
    with pytest.raises(UserError, match=f"--out {subset_run} holds another run"):
        train(DML, EVAL + ["--eval-only", str(run / "best.pt"), "--eval-subset", "0", "--out", str(subset_run)])
    assert (subset_run / "eval-best-synthetic.json").read_bytes() == before
    # and so in a folder of evaluations (no run): each checkpoint's evaluation is only replaced by its own
    train(DML, EVAL + ["--eval-only", str(subset_run / "best.pt"), "--eval-subset", "0", "--out", str(tmp_path / "evals")])
    before = (tmp_path / "evals" / "eval-best-synthetic.json").read_bytes()
    with pytest.raises(UserError, match=r"eval-best-synthetic.json holds the evaluation of another checkpoint .*"
                                        "Give another --out"):
        train(DML, EVAL + ["--eval-only", str(run / "best.pt"), "--eval-subset", "0", "--out", str(tmp_path / "evals")])
    assert (tmp_path / "evals" / "eval-best-synthetic.json").read_bytes() == before
    train(DML, EVAL + ["--eval-only", str(subset_run / "best.pt"), "--eval-subset", "0"])    # its own: replaced
    evaluation = subset_run / "eval-best-synthetic.json"    # one of an older version (no run_id), in its folder
    evaluation.write_text(json.dumps({k: v for k, v in json.loads(evaluation.read_text()).items() if k != "run_id"}))
    train(DML, EVAL + ["--eval-only", str((subset_run / "best.pt").absolute()), "--eval-subset", "0"])
    # an evaluation of the run continued into a folder is the run's own there, not another run's
    train(DML, EVAL + ["--eval-only", str(subset_run / "best.pt"), "--eval-subset", "0", "--out", str(tmp_path / "on")])
    assert train(DML, TINY + ["--eval-subset", "40", "--epochs", "2", "--extend-epochs", "--resume",
                              str(subset_run / "last.pt"), "--out", str(tmp_path / "on")])["epochs_done"] == 2


@pytest.mark.parametrize("case", ["inside a run", "another run's last.pt", "world size", "in use", "under a file",
                                  "name too long", "--resume auto, name too long"])
def test_the_run_folder_is_refused_before_the_data_are_read(run, tmp_path, monkeypatch, case):
    """Every check of the run folder against the command runs before the data are read (a large folder dataset
    takes minutes to decode), and again under the lock."""
    import data
    monkeypatch.setattr(data, "build_loaders", lambda *a, **k: pytest.fail("the data were read before the refusal"))
    argv = TINY + ["--out", str(run / "tensorboard")]
    match = f"{run / 'tensorboard'} lies inside the run directory {run}"
    if case == "another run's last.pt":
        other = tmp_path / "other"
        other.mkdir()
        ckpt = load_checkpoint(run / "last.pt")
        atomic_save({**ckpt, "run_id": "another"}, other / "last.pt")
        argv, match = TINY + ["--resume", str(run / "last.pt"), "--out", str(other)], "holds another run"
    if case == "world size":
        ckpt = load_checkpoint(run / "last.pt")
        atomic_save({**ckpt, "world_size": 2}, tmp_path / "last.pt")
        argv = TINY + ["--resume", str(tmp_path / "last.pt")]
        match = r"world size 2 \(this command: 1\) \[run it with torchrun --nproc_per_node=2\]"
    if "under a file" in case or "too long" in case:
        (tmp_path / "a_file").write_text("")
        out = tmp_path / ("a_file/run" if case == "under a file" else "new/er/" + "r" * 300)
        argv = TINY + ["--out", str(out)] + (["--resume", "auto"] if "--resume" in case else [])
        match = f"^cannot write {out}: " + ("Not a directory" if case == "under a file" else "File name too long")
    lock = run_module.RunLock(run, "the test").acquire() if case == "in use" else None
    if lock:
        argv, match = TINY + ["--out", str(run), "--resume", "auto"], f"{run} is in use by process {os.getpid()}"
    try:
        with pytest.raises(UserError, match=match):
            train(DML, argv)
    finally:
        if lock:
            lock.release()
    assert not (tmp_path / "new").exists()        # the folders a probe made are removed, whatever it found
    if case == "under a file":                     # an evaluation's --out too, before anything is evaluated
        with pytest.raises(UserError, match=match.replace("/run", "/evals")):
            train(DML, EVAL + ["--eval-only", str(run / "best.pt"), "--out", str(tmp_path / "a_file" / "evals")])


@pytest.mark.slow
def test_an_evaluation_is_replaced_only_by_one_of_its_own_checkpoint_file(tmp_path):
    """Two checkpoints of one run (the run continued into another --out, one epoch further): evaluating the first
    into the folder of the second does not replace the second's evaluation, nor does a folder of evaluations take
    both under one name. The same file evaluated again, and a run folder moved, replace their own."""
    first, second, evals = tmp_path / "first", tmp_path / "second", tmp_path / "evals"
    train(DML, TINY + ["--out", str(first)])
    train(DML, TINY + ["--resume", str(first / "last.pt"), "--out", str(second), "--epochs", "2", "--extend-epochs"])
    train(DML, EVAL + ["--eval-only", str(second / "last.pt")])
    own = (second / "eval-last-synthetic.json").read_bytes()
    assert json.loads(own)["checkpoint"] == str(second / "last.pt") and json.loads(own)["epoch"] == 2
    with pytest.raises(UserError, match=f"eval-last-synthetic.json holds the evaluation of another checkpoint "
                                        f"\\({second / 'last.pt'}\\); evaluating {first / 'last.pt'} would replace it"):
        train(DML, EVAL + ["--eval-only", str(first / "last.pt"), "--out", str(second)])
    assert (second / "eval-last-synthetic.json").read_bytes() == own
    train(DML, EVAL + ["--eval-only", str(second / "last.pt"), "--out", str(first)])    # in first's folder: the
    with pytest.raises(UserError, match="holds the evaluation of another checkpoint"):  # first's own is refused
        train(DML, EVAL + ["--eval-only", str(first / "last.pt")])
    assert json.loads((first / "eval-last-synthetic.json").read_text())["epoch"] == 2
    (first / "eval-last-synthetic.json").unlink()
    train(DML, EVAL + ["--eval-only", str(first / "last.pt"), "--out", str(evals)])
    with pytest.raises(UserError, match="holds the evaluation of another checkpoint"):
        train(DML, EVAL + ["--eval-only", str(second / "last.pt"), "--out", str(evals)])
    assert train(DML, EVAL + ["--eval-only", str(first / "last.pt"), "--out", str(evals)])["epoch"] == 1
    second.rename(tmp_path / "moved")
    assert train(DML, EVAL + ["--eval-only", str(tmp_path / "moved" / "last.pt")])["epoch"] == 2


def test_eval_only_refuses_a_flag_that_disagrees(run):
    with pytest.raises(UserError, match="trained with --dataset synthetic, not fashion-mnist"):
        train(DML, EVAL + ["--eval-only", str(run / "best.pt"), "--dataset", "fashion-mnist"])
    with pytest.raises(UserError, match="trained with --recipe okd, not one"):
        train(DML, EVAL + ["--eval-only", str(run / "best.pt"), "--recipe", "one"])
    assert train(DML, EVAL + ["--eval-only", str(run / "best.pt"), "--best-metric", "peer1"])["epoch"] == 1
    with pytest.raises(UserError, match="was saved by train_dml.py; evaluate it with that script"):
        train(Baseline, EVAL + ["--eval-only", str(run / "best.pt")])


def test_an_image_size_left_unset_is_the_size_it_was_trained_at(run):
    """A run trained without --image-size was trained at its data's size: --eval-only and --resume name that size
    when another is given (never 'default'), and accept it given."""
    with pytest.raises(UserError, match="trained with --image-size 32, not 64"):
        train(DML, EVAL + ["--eval-only", str(run / "best.pt"), "--image-size", "64"])
    assert train(DML, EVAL + ["--eval-only", str(run / "best.pt"), "--image-size", "32"])["epoch"] == 1
    with pytest.raises(UserError, match=r"trained with --image-size 32 \(this command: 64\)"):
        train(DML, EVAL + ["--out", str(run), "--resume", "auto", "--image-size", "64"])
    assert train(DML, EVAL + ["--out", str(run), "--resume", "auto", "--image-size", "32"])["epochs_done"] == 1


@pytest.mark.slow
def test_eval_only_never_needs_mcl_memory_banks(tmp_path):
    method_cls = train_mcl_okd.MCLOKD
    args = parse_args(method_cls, ["--dataset", "synthetic", "--arch", "resnet20", "--subset", "64"])
    method_cls.check_args(args)
    method = method_cls(args, 10, 64, 32, train_labels=torch.arange(64) % 10)
    weights = {"format": 1, "method": "mcl_okd", "epoch": 1, "state": {"model": method.model.state_dict()},
               "args": vars(args)}
    atomic_save(weights, tmp_path / "weights.pt")
    result = train(method_cls, EVAL + ["--eval-only", str(tmp_path / "weights.pt")])
    assert {"peer1/top1", "peer4/top1", "ensemble/top1"} <= set(result["test"])
    # a complete checkpoint, banks included, evaluates the same; --eval-only builds the banks empty
    atomic_save(dict(weights, state={"model": method.model.state_dict(), "memory": method.memory.state_dict()}),
                tmp_path / "full.pt")
    assert train(method_cls, EVAL + ["--eval-only", str(tmp_path / "full.pt")])["test"] == result["test"]
    eval_args = parse_args(method_cls, ["--dataset", "synthetic", "--arch", "resnet20", "--eval-only",
                                        str(tmp_path / "full.pt")])
    method_cls.check_args(eval_args)
    evaluating = method_cls(eval_args, 10, 64, 32, train_labels=torch.arange(64) % 10)
    assert evaluating.memory.banks.shape == (4, 0, args.feat_dim)


# ---- 6./7. the record and signals -------------------------------------------------------------------------

_StopInEpoch2 = interrupted(Baseline, 1)


def test_the_record_keeps_every_process(tmp_path):
    args = TINY + ["--epochs", "2", "--out", str(tmp_path)]
    with pytest.raises(KeyboardInterrupt) as e:
        train(_StopInEpoch2, args)
    assert "holds epoch 1. Continue with: python train_baseline.py" in e.value.message
    assert f"--out {tmp_path} --resume auto" in e.value.message
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (saved["status"], saved["signal"], saved["epochs_done"]) == ("interrupted", "SIGINT", 1)
    train(Baseline, args + ["--resume", "auto"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "finished" and "signal" not in saved
    assert [(p["start_epoch"], p["end_epoch"], p["status"]) for p in saved["processes"]] == [
        (0, 1, "interrupted"), (1, 2, "finished")]
    for p in saved["processes"]:
        assert p["pid"] == os.getpid() and p["host"] and p["started"] and p["ended"]
        assert p["command"].startswith("train_baseline.py --dataset synthetic")


def test_an_interrupt_while_the_first_checkpoint_is_written_leaves_a_run_that_continues(tmp_path, monkeypatch):
    """SIGTERM (or a full disk) while epoch 1's last.pt is being written: the record lists no epoch (none is in a
    checkpoint), the message says so, and the printed --resume auto command starts the run again."""
    real_save = run_module.atomic_save

    def interrupted_save(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(run_module, "atomic_save", interrupted_save)
    args = TINY + ["--epochs", "1", "--out", str(tmp_path)]
    with pytest.raises(KeyboardInterrupt) as e:
        train(Baseline, args)
    assert "during epoch 1: no epoch had been saved" in e.value.message and "--resume auto" in e.value.message
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (saved["status"], saved["history"], saved["epochs_done"]) == ("interrupted", [], 0)
    monkeypatch.setattr(run_module, "atomic_save", real_save)
    again = train(Baseline, args + ["--resume", "auto"])
    assert again["history"][0]["epoch"] == 1 and again["run_id"] == saved["run_id"]
    assert [(p["status"], p["end_epoch"]) for p in again["processes"]] == [("interrupted", 0), ("finished", 1)]


@pytest.mark.slow
def test_a_run_resumed_into_a_new_out_continues_from_its_source_until_it_has_its_own(run, tmp_path):
    """--extend-epochs from another run's last.pt into a new --out, stopped in its first epoch: the new folder
    has no last.pt yet, so the printed command resumes from the source again, and that command works."""
    args = TINY + ["--epochs", "2", "--extend-epochs", "--out", str(tmp_path / "longer")]
    with pytest.raises(KeyboardInterrupt) as e:
        train(_StopInEpoch2Dml, args + ["--resume", str(run / "last.pt")])
    assert f"{run / 'last.pt'} holds epoch 1" in e.value.message
    assert f"--out {tmp_path / 'longer'} --resume {run / 'last.pt'}" in e.value.message
    assert len(json.loads((tmp_path / "longer" / "results.json").read_text())["history"]) == 1
    assert train(DML, args + ["--resume", str(run / "last.pt")])["history"][1]["epoch"] == 2


@pytest.mark.parametrize("held", ["results.json", "best.pt", "an unreadable results.json"])
def test_a_resume_into_another_out_never_overwrites_another_runs_files(run, tmp_path, held):
    """A run continued into a new --out that holds another run's record or best.pt (but no last.pt) is
    refused, and the folder is left as it was."""
    target = tmp_path / "other"
    target.mkdir()
    if held == "results.json":
        record = json.loads((run / "results.json").read_text())
        (target / "results.json").write_text(json.dumps({**record, "run_id": "another run"}))
    elif held == "best.pt":
        ckpt = load_checkpoint(run / "best.pt")
        ckpt.pop("sha256", None)
        atomic_save({**ckpt, "run_id": "another run"}, target / "best.pt")
    else:
        (target / "results.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(UserError, match=f"{target} holds .* of another run; continuing .*last.pt there would "
                                        "overwrite it. Give another --out"):
        train(DML, TINY + ["--epochs", "2", "--extend-epochs", "--out", str(target), "--resume", str(run / "last.pt")])
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.name != ".lock"} == before


@pytest.mark.slow
def test_a_run_continued_into_a_new_out_keeps_how_its_processes_ended(tmp_path):
    """The record of a run continued into another --out lists the earlier processes as they ended (the
    source folder's results.json), not as the checkpoint saw them while they ran."""
    args = TINY + ["--epochs", "2"]
    with pytest.raises(KeyboardInterrupt):
        train(_StopInEpoch2Dml, args + ["--out", str(tmp_path / "first")])
    results = train(DML, args + ["--resume", str(tmp_path / "first" / "last.pt"), "--out", str(tmp_path / "second")])
    assert [(p["status"], p.get("signal")) for p in results["processes"]] == [("interrupted", "SIGINT"),
                                                                              ("finished", None)]


@pytest.mark.slow
def test_milestones_given_again_on_resume_are_checked_against_the_checkpoints_schedule(tmp_path, recwarn):
    """--milestones repeated on resume follow the checkpoint's multistep schedule: no warning that they are
    ignored (the command alone, without --lr-schedule, would be the recipe's cosine)."""
    out = ["--out", str(tmp_path)]
    train(DML, TINY + out + ["--lr-schedule", "multistep", "--milestones", "2"])
    recwarn.clear()
    resumed = train(DML, TINY + out + ["--resume", "auto", "--milestones", "2", "--epochs", "3", "--extend-epochs"])
    assert not [w for w in recwarn if "milestones" in str(w.message)]
    lrs = [h["lr"]["model"] for h in resumed["history"]]
    assert lrs[1] == lrs[0] and lrs[2] == pytest.approx(0.1 * lrs[0])          # x0.1 from epoch 3: applied


def test_a_signal_waits_for_the_checkpoint_write():
    """SIGTERM during a checkpoint write (signals.signals_held) arrives when the write and its record are done."""
    from engine.signals import Interrupted, raise_interrupted, signals_held
    previous = signal.signal(signal.SIGTERM, raise_interrupted)
    done = []
    try:
        with pytest.raises(Interrupted):
            with signals_held():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                done.append("written")
        assert done == ["written"]
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 2560000000000 bytes."),
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    MemoryError()])
def test_running_out_of_memory_is_one_line_naming_what_to_lower(monkeypatch, capsys, error):
    import engine.trainer as trainer_module
    def allocate(cls, argv):
        raise error
    monkeypatch.setattr(trainer_module, "train", allocate)
    with pytest.raises(SystemExit) as e:
        main(Baseline, [])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: out of memory (") and err.count("\n") == 1
    assert "--batch-size" in err and "--image-size" in err
    monkeypatch.setattr(trainer_module, "train", lambda cls, argv: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):                 # any other error stays a traceback
        main(Baseline, [])


def test_an_error_exit_leaves_the_callers_own_processes_alone(capsys):
    """main() ends the loader workers a stopped run leaves behind (the daemons it started), never the daemon
    processes of a program that calls it (a multiprocessing pool, a sweep driver)."""
    import multiprocessing
    import time
    caller = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,), daemon=True)
    caller.start()
    try:
        with pytest.raises(SystemExit) as e:
            main(Baseline, ["--dataset", "synthetic", "--gpu", "-1", "--cuda-graph"])   # (a UserError)
        assert e.value.code == 2 and caller.is_alive()
    finally:
        caller.kill()
        caller.join()


def test_a_stop_signal_the_shell_ignores_stays_ignored(monkeypatch):
    """``nohup python train_x.py ...`` ignores SIGHUP: main() keeps it ignored (the run survives the closed
    terminal, as asked) and still stops on SIGINT and SIGTERM; the shell's handlers come back afterwards."""
    import engine.trainer as trainer_module
    from engine.signals import STOP_SIGNALS, raise_interrupted
    seen = {}
    monkeypatch.setattr(trainer_module, "train", lambda cls, argv: seen.update(
        {s: signal.getsignal(s) for s in STOP_SIGNALS}))
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    # A job started with `&` by a non-interactive shell (as CI runs) inherits SIGINT ignored: set what an
    # interactive `nohup` gives, SIGHUP ignored and the other two at their defaults.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        main(Baseline, [])
        assert seen[signal.SIGHUP] is signal.SIG_IGN
        assert seen[signal.SIGINT] is seen[signal.SIGTERM] is raise_interrupted
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_a_stop_after_the_last_epoch_was_saved_leaves_a_finished_run(tmp_path, monkeypatch):
    real = run_module.Run.write_results
    calls = []

    def stopped_while_recording(self, status, **extra):
        calls.append(status)
        if status == "finished" and len(calls) == 1:
            raise KeyboardInterrupt
        return real(self, status, **extra)
    monkeypatch.setattr(run_module.Run, "write_results", stopped_while_recording)
    with pytest.raises(KeyboardInterrupt) as e:
        train(Baseline, TINY + ["--out", str(tmp_path)])
    assert "after the last epoch was saved" in e.value.message and "the run is finished" in e.value.message
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (saved["status"], saved["epochs_done"]) == ("finished", 1)


def test_a_stop_after_the_run_was_closed_says_it_is_finished(tmp_path, monkeypatch):
    """A signal while the final table prints (the run closed as finished) says so, not "nothing was written"."""
    from engine.reporting import Reporter

    def stopped(self, results):
        raise KeyboardInterrupt
    monkeypatch.setattr(Reporter, "final_table", stopped)
    with pytest.raises(KeyboardInterrupt) as e:
        train(Baseline, TINY + ["--out", str(tmp_path)])
    assert e.value.message == (f"interrupted (SIGINT) after the last epoch was saved: {tmp_path / 'last.pt'} holds "
                               "epoch 1; the run is finished")


def test_a_process_killed_before_it_saved_an_epoch_is_listed_from_its_lock(tmp_path):
    """The lock file a SIGKILLed process leaves names it: the next process lists it as killed, unless it is an
    entry already listed (the same host, pid and start; a pid alone is reused, in a restarted container)."""
    import socket
    train(Baseline, TINY + ["--out", str(tmp_path)])
    first = json.loads((tmp_path / "results.json").read_text())["processes"][0]
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()

    def resume_after_a_kill(epochs, pid, started_unix):
        (tmp_path / RUN_LOCK).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "t",
                                                     "started_unix": started_unix, "command": "train_baseline.py"}))
        result = train(Baseline, TINY + ["--epochs", str(epochs), "--out", str(tmp_path), "--resume", "auto",
                                         "--extend-epochs"])
        return [(p["pid"], p["status"], p["start_epoch"], p["end_epoch"]) for p in result["processes"]]
    me = os.getpid()
    # the first process, killed after it saved its epoch: listed once
    assert resume_after_a_kill(2, me, first["started_unix"]) == [(me, "finished", 0, 1), (me, "finished", 1, 2)]
    processes = resume_after_a_kill(3, dead.pid, time.time())
    assert processes[2:] == [(dead.pid, "killed", 2, 2), (me, "finished", 2, 3)]
    processes = resume_after_a_kill(4, me, time.time())         # a listed pid, another start: another process
    assert len(processes) == 6 and processes[4:] == [(me, "killed", 3, 3), (me, "finished", 3, 4)]
    record = json.loads((tmp_path / "results.json").read_text())
    assert "SIGKILL" in record["processes"][2]["reason"] and record["processes"][2]["started"] == "t"


def test_a_holder_known_from_its_lock_is_listed_by_any_process_that_takes_the_lock(tmp_path, monkeypatch):
    """A process SIGKILLed before it saved an epoch is known from its lock file only, so the next process that
    takes the lock lists it, whatever that process does: one that continues a record without epochs (it
    continued the earlier processes but dropped the killed one), and one that finds the run finished (it released
    the lock, which forgot the holder, so the next extension did not list it either)."""
    import socket
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()

    def killed_holder():
        (tmp_path / RUN_LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "t",
                                                     "started_unix": time.time(), "command": "train_baseline.py"}))
    real_save = run_module.atomic_save

    def interrupted_save(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(run_module, "atomic_save", interrupted_save)
    args = TINY + ["--epochs", "1", "--out", str(tmp_path), "--resume", "auto"]
    with pytest.raises(KeyboardInterrupt):
        train(Baseline, args)                        # interrupted in epoch 1: a record without epochs
    monkeypatch.setattr(run_module, "atomic_save", real_save)
    killed_holder()                                  # the next one, SIGKILLed in epoch 1
    listed = [(p["pid"], p["status"], p["end_epoch"]) for p in train(Baseline, args)["processes"]]
    assert listed == [(os.getpid(), "interrupted", 0), (dead.pid, "killed", 0), (os.getpid(), "finished", 1)]
    killed_holder()                                  # an extension to 2 epochs, SIGKILLed before it saved one
    before = json.loads((tmp_path / "results.json").read_text())
    assert train(Baseline, args + ["--tag", "other"])["status"] == "finished"     # nothing to train
    after = json.loads((tmp_path / "results.json").read_text())
    assert [(p["pid"], p["status"]) for p in after["processes"][3:]] == [(dead.pid, "killed")]
    # the rest of the record stays as trained: not that command's tag and arguments, no 'reason' of a finished run
    assert {k: v for k, v in after.items() if k not in ("processes", "wall_time_s")} == \
        {k: v for k, v in before.items() if k not in ("processes", "wall_time_s")}
    extended = train(Baseline, args + ["--epochs", "2", "--extend-epochs"])["processes"]
    assert [(p["pid"], p["status"], p["start_epoch"], p["end_epoch"]) for p in extended[3:]] == [
        (dead.pid, "killed", 1, 1), (os.getpid(), "finished", 1, 2)]


def test_processes_killed_one_after_another_before_saving_are_all_listed(tmp_path, monkeypatch):
    """Two processes continuing a run, each killed before it saved an epoch: the lock file names only the last,
    so the one that finds a holder known from its lock alone records it at once. The next process lists both
    as killed (the first was left out), neither as finished though the checkpoint's run had all its epochs."""
    from engine.trainer import Trainer
    train(Baseline, TINY + ["--out", str(tmp_path)])

    class Killed(BaseException):
        pass

    def killed(self, start_epoch):
        raise Killed

    def sigkill(self, error):          # the kernel drops the flock; the lock file still names the holder
        os.close(self.lock.fd)
        self.lock = None
    argv = TINY[:-2] + ["--epochs", "2", "--extend-epochs", "--resume", "auto", "--out", str(tmp_path)]
    with monkeypatch.context() as m:
        m.setattr(Trainer, "_train", killed)
        m.setattr(run_module.Run, "close", sigkill)
        for _ in range(2):
            with pytest.raises(Killed):
                train(Baseline, argv)
    processes = train(Baseline, argv)["processes"]
    assert [(p["status"], p["start_epoch"], p["end_epoch"]) for p in processes] == [
        ("finished", 0, 1), ("killed", 1, 1), ("killed", 1, 1), ("finished", 1, 2)]
    assert len({p["started_unix"] for p in processes}) == 4


def test_a_run_is_live_while_its_lock_is_held_whatever_pid_the_lock_file_names(run, tmp_path):
    from engine.run import RunLock, read_run
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    record = json.loads((folder / "results.json").read_text())
    (folder / "results.json").write_text(json.dumps({**record, "status": "running"}))
    (folder / RUN_LOCK).write_text(json.dumps({"pid": os.getpid(), "host": "h"}))    # a live pid, no lock held
    assert read_run(folder)["status"] == "killed"
    lock = RunLock(folder).acquire()
    try:
        assert read_run(folder)["status"] == "running"                    # held: as the record says
    finally:
        lock.release()


def test_a_run_on_nfs_is_probed_with_a_shared_lock(run, tmp_path, monkeypatch):
    """NFS takes no exclusive lock of a file open for reading (flock(2)): the probe of a run's lock (is it live?
    may this command start?) takes a shared one, which conflicts with a trainer's exclusive lock only."""
    import fcntl
    from engine.run import read_run
    real = fcntl.flock

    def nfs_flock(fd, operation):
        if operation & fcntl.LOCK_EX and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return real(fd, operation)
    monkeypatch.setattr(fcntl, "flock", nfs_flock)
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    assert read_run(folder)["status"] == "finished"
    result = train(DML, TINY + ["--epochs", "2", "--out", str(folder), "--resume", "auto", "--extend-epochs"])
    assert result["epochs_done"] == 2


@pytest.mark.parametrize("out, resume", [(".", []), ("runs", []), ("runs", ["--resume", "best.pt"])])
def test_a_folder_that_holds_runs_is_refused(run, tmp_path, out, resume):
    """--out runs (or .) would make every run below lie inside a run: none could be resumed or started; so would
    a run continued into it."""
    shutil.copytree(run, tmp_path / "runs" / "dml-a")
    resume = [str(tmp_path / "runs" / "dml-a" / r) if r.endswith(".pt") else r for r in resume]
    with pytest.raises(UserError) as e:
        train(DML, TINY + ["--out", str(tmp_path / out)] + resume)
    assert str(e.value) == (f"{(tmp_path / out).absolute()} holds the run directory {tmp_path / 'runs' / 'dml-a'}; "
                            "a run there would enclose it. Give this run an --out of its own")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_the_lock_waits_out_a_probe_that_holds_it_for_an_instant(tmp_path, monkeypatch):
    import fcntl
    real, probed = fcntl.flock, []

    def flock(fd, operation):
        if operation & fcntl.LOCK_NB and not probed:
            probed.append(True)
            raise BlockingIOError(errno.EWOULDBLOCK, "held by a probe")
        return real(fd, operation)
    monkeypatch.setattr(fcntl, "flock", flock)
    lock = run_module.RunLock(tmp_path).acquire()
    assert probed and lock.held()
    lock.release()


_StopInEpoch2Dml = interrupted(DML, 1)


def test_a_process_that_ended_without_a_record_is_marked_killed():
    running = {"pid": 1, "host": "h", "started": "t0", "started_unix": 0.0, "status": "running", "wall_s": 5.0}
    done = dict(running, pid=2, started="t1", started_unix=1.0, status="finished", wall_s=2.0)
    merged = run_module.merge_processes([running], [dict(running, wall_s=7.0), done])
    assert [(p["pid"], p["status"]) for p in merged] == [(1, "killed"), (2, "finished")]
    assert [p["wall_s"] for p in merged] == [7.0, 2.0]          # the newer record of each process
    again = dict(running, started_unix=0.5, status="finished")   # the same pid started again in the same second
    assert len(run_module.merge_processes([running, again], [again])) == 2
    last = dict(running, end_epoch=3, updated="t2")               # it saved the run's last epoch (of 3)
    merged = run_module.merge_processes([last], None, epochs=3)
    assert (merged[0]["status"], merged[0]["ended"]) == ("finished", "t2") and "reason" not in merged[0]
    assert run_module.merge_processes([dict(last, end_epoch=2)], None, epochs=3)[0]["status"] == "killed"
    # last.pt written, then best.pt's write failed (a full disk): results.json recorded the failure, one epoch behind
    failed = dict(running, end_epoch=0, status="failed", ended="t3", reason="cannot write best.pt")
    [merged] = run_module.merge_processes([dict(running, end_epoch=1)], [failed], epochs=3)
    assert (merged["status"], merged["end_epoch"], merged["reason"], merged["ended"]) == \
        ("failed", 1, "cannot write best.pt", "t3")


_StopBeforeEpoch1 = interrupted(Baseline, 0)


class _StopWhileBuilding(Baseline):
    def build(self):
        raise KeyboardInterrupt


@pytest.mark.parametrize("method_cls, expected", [
    (_StopWhileBuilding, "interrupted (SIGINT) while starting: nothing was written"),
    (_StopBeforeEpoch1, "interrupted (SIGINT) during epoch 1: no epoch had been saved. "
                        "Continue with: python train_baseline.py"),
])
def test_ctrl_c_is_one_line_that_says_what_was_saved(tmp_path, capsys, method_cls, expected):
    with pytest.raises(SystemExit) as e:
        main(method_cls, TINY + ["--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 130 and "\n" not in err and err.startswith(expected) and "last.pt" not in err


@pytest.mark.parametrize("where", ["loading the state", "repairing best.pt"])
def test_ctrl_c_while_a_run_opens_says_what_is_saved(run, tmp_path, capsys, monkeypatch, where):
    """Interrupted after the run's folder was opened (and perhaps repaired) but before this process trained: the
    line says what the folder holds and how to continue, not that nothing was written."""
    from engine.trainer import Trainer
    out = tmp_path / "run"
    shutil.copytree(run, out)

    def interrupted(*args):
        raise KeyboardInterrupt
    if where == "repairing best.pt":
        (out / "best.pt").unlink()
        monkeypatch.setattr(run_module.Run, "_repair_best", interrupted)
    else:
        monkeypatch.setattr(Trainer, "load_state_dict", interrupted)
    with pytest.raises(SystemExit) as e:
        main(DML, TINY[:-2] + ["--epochs", "2", "--extend-epochs", "--out", str(out), "--resume", "auto"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 130 and "\n" not in err, err
    assert err.startswith(f"interrupted (SIGINT) while starting: {out / 'last.pt'} holds epoch 1. Continue with: "
                          "python train_dml.py ")
    assert err.endswith(f"--epochs 2 --extend-epochs --out {out} --resume auto")


@pytest.mark.slow
def test_sigterm_mid_epoch_stops_like_ctrl_c(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "train_baseline.py", "--dataset", "synthetic", "--arch", "resnet20", "--subset", "512",
           "--batch-size", "32", "--gpu", "-1", "--no-progress", "--workers", "0", "--epochs", "4", "--out", str(out)]
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.time() + 600
    while not (out / "last.pt").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 143, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    epoch = load_checkpoint(out / "last.pt")["epoch"]
    assert f"interrupted (SIGTERM) during epoch {epoch + 1}: {out / 'last.pt'} holds epoch {epoch}." in err
    assert err.strip().endswith(f"--epochs 4 --out {out} --resume auto")
    saved = json.loads((out / "results.json").read_text())
    assert (saved["status"], saved["signal"], saved["epochs_done"]) == ("interrupted", "SIGTERM", epoch)
    assert saved["processes"][-1]["status"] == "interrupted" and saved["processes"][-1]["ended"]



def _default_stop_signals():
    """In the child: a SIGHUP or SIGINT that this test's own shell ignores (nohup, a background job) is not
    inherited, since a run keeps an ignored stop signal ignored."""
    for s in (signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)


def _stopped(tmp_path, stop, workers: int = 0, epochs: int = 4):
    """A training process (``--loader torch --workers N`` when N > 0, in a process group of its own) stopped by
    ``stop(process)`` once its first last.pt exists; returns (process, stdout, stderr, out folder)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "train_baseline.py", "--dataset", "synthetic", "--arch", "resnet20", "--subset", "512",
           "--batch-size", "32", "--gpu", "-1", "--no-progress", "--workers", str(workers), "--epochs", str(epochs),
           "--out", str(out)] + (["--loader", "torch"] if workers else [])
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                         start_new_session=True, preexec_fn=_default_stop_signals)
    deadline = time.time() + 600
    while not (out / "last.pt").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    stop(p)
    stdout, err = p.communicate(timeout=300)
    return p, stdout, err, out


def _assert_one_line_and_a_resumable_record(p, err, out, sig: str, code: int):
    assert p.returncode == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    epoch = load_checkpoint(out / "last.pt")["epoch"]
    assert f"interrupted ({sig}) during epoch {epoch + 1}: {out / 'last.pt'} holds epoch {epoch}." in err
    assert err.strip().endswith(f"--out {out} --resume auto")
    saved = json.loads((out / "results.json").read_text())
    assert (saved["status"], saved["signal"], saved["epochs_done"]) == ("interrupted", sig, epoch)


@pytest.mark.slow
@pytest.mark.parametrize("how, sig, code", [
    ("sighup", "SIGHUP", 129),                  # a closed terminal or ssh session
    ("twice", "SIGINT", 130),                   # two quick Ctrl-C: the second one waits for nothing
    ("group", "SIGTERM", 143),                  # SLURM pre-emption: SIGTERM to the whole process group, workers too
])
def test_every_way_of_stopping_ends_in_one_line_and_a_resumable_record(tmp_path, how, sig, code):
    def stop(p):
        if how == "sighup":
            p.send_signal(signal.SIGHUP)
        elif how == "twice":
            p.send_signal(signal.SIGINT)
            time.sleep(0.05)
            p.send_signal(signal.SIGINT)
        else:
            time.sleep(1.0)                       # the DataLoader workers of the next epoch are up
            os.killpg(p.pid, signal.SIGTERM)
    p, _, err, out = _stopped(tmp_path, stop, workers=2 if how == "group" else 0)
    _assert_one_line_and_a_resumable_record(p, err, out, sig, code)


@pytest.mark.slow
def test_a_closed_output_pipe_stops_the_run_resumably(tmp_path):
    """``python train_x.py ... | head -1``: the pipe closes after the first line; the run stops at its next line
    with a resumable record and one line on stderr, no BrokenPipeError traceback."""
    p, _, err, out = _stopped(tmp_path, lambda p: p.stdout.close())
    _assert_one_line_and_a_resumable_record(p, err, out, "SIGPIPE", 141)

# ---- 8. checkpoint consistency and integrity ------------------------------------------------------------

def _small_checkpoint(path):
    atomic_save({"format": 1, "method": "dml", "epoch": 1, "state": {"w": torch.full((64,), 1.2345)}, "args": {}},
                path)


def test_flipped_bytes_are_refused(tmp_path):
    path = tmp_path / "last.pt"
    _small_checkpoint(path)
    assert torch.equal(load_checkpoint(path)["state"]["w"], torch.full((64,), 1.2345))
    data = bytearray(path.read_bytes())
    data[data.find(torch.tensor(1.2345).numpy().tobytes()) + 1] ^= 0x10
    path.write_bytes(data)
    assert torch.load(path, weights_only=True)["state"]["w"][0] != 1.2345   # torch itself loads the damage
    with pytest.raises(UserError, match="is damaged: its content does not match the sha256"):
        load_checkpoint(path)


@pytest.mark.parametrize("content, expected", [
    (b"", "is an empty file"), ({}, "not a checkpoint of this repository"),
    ({"format": 1}, r"expected format 1; it has no method, epoch, state, args"),
    ({**{k: 1 for k in ("method", "epoch", "state", "args")}, "format": 0}, "expected format 1; it has format 0"),
])
def test_empty_or_bare_checkpoint_is_one_line(tmp_path, content, expected):
    path = tmp_path / "last.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(UserError, match=expected):
        train(Baseline, TINY + ["--out", str(tmp_path), "--resume", "auto"])
    with pytest.raises(UserError, match=expected):
        train(Baseline, EVAL + ["--eval-only", str(path)])


def test_a_damaged_last_pt_names_a_fix_that_works(run, tmp_path):
    """A damaged last.pt: the message names the run's other checkpoint, continued into another --out; continuing it
    in place is refused (it would replace last.pt), and the suggested command works."""
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    (damaged / "last.pt").write_bytes((run / "last.pt").read_bytes()[:5000])
    with pytest.raises(UserError, match=r"continue it with --resume IT --out NEW_DIR"):
        train(DML, TINY + ["--out", str(damaged), "--resume", "auto"])
    with pytest.raises(UserError, match=r"last.pt cannot be read .*Give another --out to continue"):
        train(DML, TINY + ["--epochs", "2", "--extend-epochs", "--resume", str(damaged / "best.pt")])
    assert len((damaged / "last.pt").read_bytes()) == 5000
    results = train(DML, TINY + ["--epochs", "2", "--extend-epochs", "--resume", str(damaged / "best.pt"),
                                 "--out", str(tmp_path / "new")])
    assert results["epochs_done"] == 2


def test_a_resumed_run_keeps_its_tag(tmp_path, monkeypatch):
    """--tag labels the run (reproduce.py's TABLE/CELL, by which summarize.py finds a table's runs): continued
    in its folder without it, however the folder is found, the run keeps its checkpoint's; a --tag given again
    replaces it; a copy continued in another --out is another run and has none unless given."""
    out = tmp_path / "run"
    train(DML, TINY + ["--out", str(out), "--tag", "smoke/dml-resnet20"])
    resumed = train(DML, EVAL + ["--resume", str(out / "last.pt"), "--epochs", "2", "--extend-epochs"])
    assert resumed["args"]["tag"] == "smoke/dml-resnet20"
    assert load_checkpoint(out / "last.pt")["args"]["tag"] == "smoke/dml-resnet20"
    fork = train(DML, EVAL + ["--resume", str(out / "last.pt"), "--epochs", "3", "--extend-epochs", "--out",
                              str(tmp_path / "fork")])
    assert fork["args"]["tag"] is None
    again = train(DML, EVAL + ["--out", str(out), "--resume", "auto", "--epochs", "3", "--extend-epochs", "--tag", "x"])
    assert again["args"]["tag"] == "x"
    monkeypatch.setenv("OKD_RUNS", str(tmp_path / "runs"))       # found by its flags (no --out)
    interrupted_dml = interrupted(DML, 1)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted_dml, TINY[:-2] + ["--epochs", "2", "--tag", "t/cell"])
    assert train(DML, TINY[:-2] + ["--epochs", "2", "--resume", "auto"])["args"]["tag"] == "t/cell"


def test_best_pt_continued_in_place_never_replaces_the_record_of_later_epochs(tmp_path):
    """last.pt deleted (to keep only best.pt), then best.pt continued in its own folder: the record of the epochs
    after it would be replaced, so it is refused, and nothing changes; into another --out it continues."""
    out = tmp_path / "run"
    train(DML, TINY + ["--out", str(out)])
    shutil.copy(out / "last.pt", out / "epoch1.pt")       # (an earlier best.pt: a checkpoint of epoch 1)
    train(DML, TINY[:-2] + ["--epochs", "2", "--extend-epochs", "--resume", "auto", "--out", str(out)])
    (out / "last.pt").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    for extra in ([], ["--epochs", "4", "--extend-epochs"]):
        with pytest.raises(UserError, match=r"results.json records 2 epochs of this run; continuing .*epoch1.pt "
                                            r"\(epoch 1\) there would replace the record of the later ones"):
            train(DML, EVAL + ["--resume", str(out / "epoch1.pt")] + extra)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    fork = train(DML, EVAL + ["--resume", str(out / "epoch1.pt"), "--epochs", "2", "--extend-epochs", "--out",
                              str(tmp_path / "fork")])
    assert fork["epochs_done"] == 2


def test_a_kill_between_last_and_best_is_repaired(tmp_path, monkeypatch, capsys):
    import engine.trainer as trainer_module
    calls = []

    def evaluate(self, loader):      # every epoch beats the last: each one writes best.pt
        calls.append(1)
        return {"net/top1": float(len(calls)), "net/top5": 100.0}

    real_save = run_module.atomic_save

    def killed_after_last(obj, *paths):
        if obj["epoch"] == 2:
            real_save(obj, paths[0])          # last.pt is renamed into place, then the process dies
            raise SystemExit("killed")
        real_save(obj, *paths)

    import scripts.reproduce as reproduce
    from engine.run import read_run
    monkeypatch.setattr(trainer_module.Trainer, "evaluate", evaluate)
    monkeypatch.setattr(run_module, "atomic_save", killed_after_last)
    monkeypatch.setattr(run_module.Run, "close", lambda self, error: self.lock.release())   # SIGKILL: no record
    args = TINY + ["--epochs", "2", "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        train(Baseline, args)
    assert load_checkpoint(tmp_path / "last.pt")["best"]["epoch"] == 2
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1             # stale
    # every epoch is saved, yet the run is not finished until best.pt is rebuilt: reproduce.py resumes it
    record = read_run(tmp_path)
    assert (record["status"], record["epochs_done"]) == ("killed", 2) and "best.pt" in record["reason"]
    run = reproduce.Run("t", "baseline-resnet20", "train_baseline.py", TINY[:-2] + ["--epochs", "2"], 0, tmp_path, [])
    assert reproduce.run_state(run) == "resume"
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="holds epoch 1, but its run's best epoch is 2"):
        train(Baseline, EVAL + ["--eval-only", str(tmp_path / "best.pt")])
    train(Baseline, args + ["--resume", "auto"])
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 2
    assert "best.pt repaired" in capsys.readouterr().out
    assert read_run(tmp_path)["status"] == "finished"


def test_a_lost_best_pt_of_an_earlier_epoch_leaves_a_finished_run_finished(tmp_path, monkeypatch, capsys):
    """best.pt of an earlier epoch than the last, removed by hand (with results.json): no kill leaves that, and no
    resume can rebuild it, so the run read back from last.pt is finished (its numbers are all there), not killed."""
    import engine.trainer as trainer_module
    from engine.run import read_run
    scores = iter([60.0, 50.0])                            # epoch 1 is the best

    def evaluate(self, loader):
        return {"net/top1": next(scores), "net/top5": 100.0}
    monkeypatch.setattr(trainer_module.Trainer, "evaluate", evaluate)
    args = TINY + ["--epochs", "2", "--out", str(tmp_path)]
    train(Baseline, args)
    monkeypatch.undo()
    (tmp_path / "best.pt").unlink()
    (tmp_path / "results.json").unlink()
    record = read_run(tmp_path)
    assert (record["status"], record["epochs_done"], record["best"]["epoch"]) == ("finished", 2, 1)
    shutil.copyfile(tmp_path / "last.pt", tmp_path / "best.pt")            # replaced by another epoch's state
    with pytest.warns(UserWarning, match=r"best.pt holds epoch 2, but its run's best epoch is 1 \(it was replaced "
                                         r"since; no resume rebuilds an earlier epoch\)"):
        train(Baseline, EVAL + ["--eval-only", str(tmp_path / "best.pt")])
    with pytest.warns(UserWarning, match=r"best.pt does not hold the best epoch \(1\) and it cannot be rebuilt"):
        train(Baseline, args + ["--resume", "auto"])
    assert "the run is already finished" in capsys.readouterr().out and read_run(tmp_path)["status"] == "finished"


def test_files_follow_the_umask_and_interrupted_writes_are_cleaned(tmp_path):
    (tmp_path / ".last.pt.x1y2z3.tmp").write_bytes(b"half a checkpoint")
    old = os.umask(0o027)
    try:
        train(Baseline, TINY + ["--out", str(tmp_path), "--resume", "auto"])
        atomic_write(tmp_path / "note.txt", "x")
    finally:
        os.umask(old)
    assert not list(tmp_path.glob(".*.tmp"))
    for name in ("last.pt", "best.pt", "results.json", "note.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name


# ---- 9. OS errors are user errors -------------------------------------------------------------------------

def test_out_that_is_a_file(tmp_path):
    path = tmp_path / "not_a_folder"
    path.write_text("x")
    with pytest.raises(UserError, match=f"--out {path} is a file"):
        train(Baseline, TINY + ["--out", str(path)])


@pytest.mark.parametrize("name", ["last.pt", "best.pt", "results.json"])
def test_a_run_file_that_is_a_folder_is_one_line(run, tmp_path, name):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / name).unlink()
    (copy / name).mkdir()
    with pytest.raises(UserError, match=f"{copy / name} is a folder where the run writes a file; move it away"):
        train(DML, EVAL + ["--out", str(copy), "--resume", "auto", "--epochs", "2", "--extend-epochs"])


def test_an_eval_only_out_is_checked_before_evaluating(run, tmp_path, capsys):
    """--eval-only --out: a file, a folder of another run, or an evaluation file name taken by a folder, each
    stop in one line before anything is evaluated; the other run's files are untouched."""
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    with pytest.raises(UserError, match=f"--out {a_file} is a file, not a folder"):
        train(DML, EVAL + ["--eval-only", str(run / "best.pt"), "--out", str(a_file)])
    other = tmp_path / "other"
    train(Baseline, TINY + ["--out", str(other)])
    before = _files(other)
    with pytest.raises(UserError, match=f"--out {other} holds another run; give this evaluation an --out of its own"):
        train(DML, EVAL + ["--eval-only", str(run / "best.pt"), "--out", str(other)])
    with pytest.raises(UserError, match=f"lies inside the run directory {other}; give an --out outside it"):
        train(DML, EVAL + ["--eval-only", str(run / "best.pt"), "--out", str(other / "sub")])
    assert _files(other) == before and not (other / "sub").exists()
    (tmp_path / "evals" / "eval-best-synthetic.json").mkdir(parents=True)
    with pytest.raises(UserError, match="eval-best-synthetic.json is a folder where the evaluation is written"):
        train(DML, EVAL + ["--eval-only", str(run / "best.pt"), "--out", str(tmp_path / "evals")])
    assert "/top1 " not in capsys.readouterr().out           # (no evaluation line: nothing was evaluated)


def test_a_new_run_in_a_folder_of_an_earlier_run_is_refused_before_the_data_are_read(run, tmp_path, monkeypatch):
    """--out DIR --resume auto with no flags, DIR without last.pt but with best.pt: the folder's problem, not the
    default dataset's (CIFAR-100, absent from an empty $OKD_DATASETS)."""
    monkeypatch.setenv("OKD_DATASETS", str(tmp_path / "no_datasets"))
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "last.pt").unlink()
    # (the shared run's folder may hold evaluations too, written by other tests)
    with pytest.raises(UserError, match=r"holds best.pt and (eval-\S+ and )*results.json of an earlier run but no "
                                        "last.pt"):
        train(DML, ["--out", str(copy), "--resume", "auto", "--gpu", "-1"])


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    args = TINY + ["--out", str(tmp_path)]
    train(Baseline, args)
    real = os.open

    def full(path, flags, *a, **k):
        if Path(path).name.startswith(".last.pt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", full)
    with pytest.raises(UserError) as e:
        train(Baseline, args + ["--epochs", "2", "--extend-epochs", "--resume", "auto"])
    assert str(e.value).startswith(f"cannot write {tmp_path / 'last.pt'}: No space left on device (the disk is full")
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "failed" and "No space left on device" in saved["reason"]


def test_read_only_out_is_one_line(tmp_path, monkeypatch):
    """A folder without write permission. Root ignores permission bits (and the venv's interpreter is not
    reachable by an unprivileged user here), so as root the kernel's answer to a non-root user, EACCES for
    files created in that folder, is reproduced by wrapping os.open."""
    out = tmp_path / "read_only"
    out.mkdir()
    os.chmod(out, 0o555)
    if os.geteuid() == 0:
        real_open = os.open

        def refuse(path):
            if Path(path).resolve().is_relative_to(out.resolve()):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

        def guarded_open(path, flags, *a, **k):
            if flags & os.O_CREAT:
                refuse(path)
            return real_open(path, flags, *a, **k)

        monkeypatch.setattr(os, "open", guarded_open)
    try:
        with pytest.raises(UserError) as e:
            train(Baseline, TINY + ["--out", str(out)])
        assert str(e.value).startswith(f"cannot write {out}: Permission denied (no permission to write there")
        assert list(out.iterdir()) == []
    finally:
        os.chmod(out, 0o755)


# ---- 10. a kill between last.pt and results.json -----------------------------------------------------------

def _killed_after_the_checkpoint(monkeypatch, at_status: str):
    """Run.write_results of the epoch whose status is ``at_status`` never happens: the process dies right after
    last.pt was written (the lock is released, as the kernel does, and nothing else of the process's end is
    recorded)."""
    from engine.run import Run
    real_write, real_close = Run.write_results, Run.close

    def write(self, status, **extra):
        if status == at_status and self.process is not None:
            raise SystemExit("killed")
        return real_write(self, status, **extra)

    def vanish(self, error):
        self.lock.release()
    monkeypatch.setattr(Run, "write_results", write)
    monkeypatch.setattr(Run, "close", vanish)
    return lambda: (monkeypatch.setattr(Run, "write_results", real_write),
                    monkeypatch.setattr(Run, "close", real_close))


@pytest.mark.slow
def test_a_kill_after_the_last_checkpoint_leaves_a_finished_run(tmp_path, monkeypatch, capsys):
    """Killed after the last epoch's last.pt and before its results.json: results.json says 'running', one epoch
    short. reproduce.py and summarize.py read the run as finished with every epoch (they agree), and the next
    start of the run rewrites results.json from last.pt, says so in one line, and trains nothing."""
    import scripts.reproduce as reproduce
    import scripts.summarize as summarize
    from engine.run import read_run
    out = tmp_path / "runs" / "t" / "baseline-resnet20-s0"
    args = TINY + ["--epochs", "2", "--seed", "0", "--out", str(out)]
    restore = _killed_after_the_checkpoint(monkeypatch, "finished")
    with pytest.raises(SystemExit):
        train(Baseline, args)
    restore()
    stale = json.loads((out / "results.json").read_text())
    assert (stale["status"], stale["epochs_done"]) == ("running", 1) and load_checkpoint(out / "last.pt")["epoch"] == 2
    record = read_run(out)
    assert (record["status"], record["epochs_done"], [h["epoch"] for h in record["history"]]) == ("finished", 2, [1, 2])
    assert record["processes"][-1]["status"] == "finished"    # it saved the last epoch, as a Ctrl-C there would
    assert record["processes"][-1]["end_epoch"] == 2          # the checkpoint's own entry counts its epoch
    run = reproduce.Run("t", "baseline-resnet20", "train_baseline.py", TINY[:-2] + ["--epochs", "2"], 0, out, [])
    assert reproduce.run_state(run) == "finished"
    runs, bad = summarize.load_runs(tmp_path / "runs")
    assert not bad and [r.finished for r in runs] == [True]
    capsys.readouterr()
    again = train(Baseline, args + ["--resume", "auto"])
    lines = capsys.readouterr().out.splitlines()
    assert sum("rebuilt from last.pt" in line for line in lines) == 1 and any("already finished" in l for l in lines)
    saved = json.loads((out / "results.json").read_text())
    assert (saved["status"], saved["epochs_done"], again["epochs_done"]) == ("finished", 2, 2)
    assert saved["history"] == record["history"]


@pytest.mark.slow
def test_a_kill_mid_run_after_a_checkpoint_resumes_with_every_epoch(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = TINY + ["--epochs", "3", "--out", str(out)]
    restore = _killed_after_the_checkpoint(monkeypatch, "running")
    with pytest.raises(SystemExit):
        train(Baseline, args)
    restore()
    from engine.run import read_run
    assert not (out / "results.json").exists()                                       # written after the checkpoint
    assert (read_run(out)["status"], read_run(out)["epochs_done"]) == ("killed", 1)  # last.pt holds epoch 1
    resumed = train(Baseline, args + ["--resume", "auto"])
    assert "rebuilt from last.pt" in capsys.readouterr().out
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3] and resumed["status"] == "finished"
    assert [p["status"] for p in resumed["processes"]] == ["killed", "finished"]


def test_a_record_no_process_finished_is_read_as_killed(run, tmp_path):
    """results.json saying 'running' with no live process behind it (SIGKILL right after the write) is read as
    'killed'; a finished run extended in place and killed before its record caught up is read from last.pt;
    a run folder whose results.json is gone is still found by summarize.py."""
    import scripts.summarize as summarize
    from engine.run import read_run
    copy = tmp_path / "runs" / "copy"
    shutil.copytree(run, copy)
    saved = json.loads((copy / "results.json").read_text())
    (copy / "results.json").write_text(json.dumps({**saved, "status": "running"}))
    os.utime(copy / "last.pt", ns=(0, 0))                     # older than the record
    assert (read_run(copy)["status"], read_run(copy)["epochs_done"]) == ("killed", 1)
    ckpt = load_checkpoint(copy / "last.pt")                  # the same run, extended to 2 epochs: last.pt ahead
    later = {**ckpt["history"][0], "epoch": 2}
    atomic_save({**ckpt, "epoch": 2, "history": ckpt["history"] + [later],
                 "args": {**ckpt["args"], "epochs": 2}}, copy / "last.pt")
    (copy / "results.json").write_text(json.dumps(saved))     # 'finished' with 1 epoch, written before last.pt
    os.utime(copy / "results.json", ns=(1, 1))
    assert (read_run(copy)["status"], read_run(copy)["epochs_done"]) == ("finished", 2)
    (copy / "results.json").unlink()
    runs, bad = summarize.load_runs(tmp_path / "runs")
    assert not bad and [r.data["epochs_done"] for r in runs] == [2]


@pytest.mark.parametrize("edit, problem", [
    (lambda r: r.update(processes="y"), "its 'processes' is a string"),
    (lambda r: r.update(epochs="3"), "its 'epochs' is a string"),
    (lambda r: r["best"]["test"].update({"peer1/top1": "abc"}), "best: a test value that is not a finite number"),
    (lambda r: r["history"][0]["train"].update(ce=None),
     "epoch 1: a train, test or val value that is not a finite number"),
    (lambda r: r.clear(), "not a run's record"),
    # the fields summarize.py and reproduce.py read (each once a traceback or a misstated table)
    (lambda r: r.update(last={"test": "x"}), "last: a test value that is not a finite number"),
    (lambda r: r["last"]["test"].update({"peer1/top1": "abc"}), "last: a test value that is not a finite number"),
    (lambda r: r.update(last=None), "partial: history without a last epoch"),
    (lambda r: r["args"].update(tag=["x"]), "its 'args.tag' is an array"),
    (lambda r: r.update(world_size="1"), "its 'world_size' is a string"),
    (lambda r: r["history"][0].update(epoch="one"), "an epoch numbered 'one', not a number"),
    (lambda r: r["best"]["test"].update({"peer1/top1": float("inf")}), "best: a test value that is not a finite"),
])
def test_a_results_json_of_the_wrong_shape_is_no_record(run, tmp_path, capsys, edit, problem):
    """A hand-edited results.json whose fields have other types than the engine writes is no record: read_run
    and a resume rebuild it from last.pt (saying why), and summarize.py skips it, naming the field, when there is
    no last.pt to rebuild it from."""
    import scripts.summarize as summarize
    from engine.run import read_run
    copy = tmp_path / "runs" / "copy"
    shutil.copytree(run, copy)
    saved = json.loads((copy / "results.json").read_text())
    edit(saved)
    (copy / "results.json").write_text(json.dumps(saved))
    assert (read_run(copy)["status"], read_run(copy)["epochs_done"]) == ("finished", 1)
    capsys.readouterr()
    train(DML, TINY + ["--out", str(copy), "--resume", "auto", "--epochs", "2", "--extend-epochs"])
    out = capsys.readouterr().out
    assert f"held no run's record ({problem}" in out and "rebuilt from last.pt (the old file is kept as " \
        "results.rejected.json)" in out
    assert json.loads((copy / "results.json").read_text())["epochs_done"] == 2
    assert json.loads((copy / "results.rejected.json").read_text()) == saved     # the hand-edited file, not lost
    (copy / "results.json").write_text(json.dumps(saved))                          # again: the first copy stays
    train(DML, TINY + ["--out", str(copy), "--resume", "auto", "--epochs", "3", "--extend-epochs"])
    assert "kept as results.rejected-2.json" in capsys.readouterr().out
    assert json.loads((copy / "results.rejected-2.json").read_text()) == saved
    assert json.loads((copy / "results.rejected.json").read_text()) == saved
    bare = tmp_path / "bare" / "run"
    bare.mkdir(parents=True)
    (bare / "results.json").write_text(json.dumps(saved))
    runs, bad = summarize.load_runs(tmp_path / "bare")
    assert not runs and len(bad) == 1 and bad[0][1].startswith(problem)


@pytest.mark.parametrize("field, value, problem", [
    ("args.seed", "0", "its 'args.seed' is a string"), ("args.arch", 32, "its 'args.arch' is a number"),
    ("args.dataset", None, "its 'args.dataset' is null"), ("args.batch_size", 3.5, "its 'args.batch_size' is a number"),
    ("args.tag", False, "its 'args.tag' is a boolean"), ("selection.metric", ["x"], "its 'selection.metric' is an array"),
    ("epochs_done", True, "its 'epochs_done' is a boolean"),
])
def test_every_field_the_scripts_read_has_the_engines_type(run, field, value, problem):
    """Each field of results.json that summarize.py or reproduce.py reads, edited to another JSON type, makes the
    file no record (named); the record as the engine wrote it is one."""
    from engine.run import record_problem
    record = json.loads((run / "results.json").read_text())
    assert record_problem(record) is None
    *parents, name = field.split(".")
    functools.reduce(lambda d, k: d[k], parents, record)[name] = value
    assert record_problem(record) == f"{problem}, not what the engine writes"


@pytest.mark.slow
def test_a_damaged_record_is_rebuilt_without_guessing_how_its_processes_ended(tmp_path):
    """Only results.json says how a process that saved epochs ended (here: Ctrl-C); last.pt's copy of the record
    was written while it still ran. A damaged results.json rebuilt from last.pt calls that end 'unknown', not
    'killed' (it was not killed), in read_run and in the record the resume rebuilds."""
    from engine.run import read_run
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(interrupted(DML, 1), TINY + ["--epochs", "3", "--out", str(out)])
    assert [p["status"] for p in json.loads((out / "results.json").read_text())["processes"]] == ["interrupted"]
    (out / "results.json").write_text('{"status": "interr')
    record = read_run(out)
    assert (record["status"], [p["status"] for p in record["processes"]]) == ("unknown", ["unknown"])
    assert record["processes"][0]["reason"].startswith("how it ended was recorded in a results.json that could not")
    elsewhere = tmp_path / "elsewhere"     # continued into another --out: the same record of the earlier process
    train(DML, TINY + ["--epochs", "3", "--resume", str(out / "last.pt"), "--out", str(elsewhere)])
    copied = json.loads((elsewhere / "results.json").read_text())
    assert [p["status"] for p in copied["processes"]] == ["unknown", "finished"]
    train(DML, TINY + ["--epochs", "3", "--out", str(out), "--resume", "auto"])
    done = json.loads((out / "results.json").read_text())
    assert (done["status"], [p["status"] for p in done["processes"]]) == ("finished", ["unknown", "finished"])
    assert (out / "results.rejected.json").read_text() == '{"status": "interr'


@pytest.mark.parametrize("resume, out", [("runs/x/last.pt", None), ("runs/x/../x/last.pt", "runs/x"),
                                         ("link/last.pt", "runs/x")])
def test_a_run_resumed_by_another_spelling_of_its_last_pt_is_repaired_in_its_folder(run, tmp_path, monkeypatch,
                                                                                      capsys, resume, out):
    """--resume of the run's own last.pt, spelled relative to the current directory, through '..' or through a
    link to the folder, is the run's own folder as --resume auto is: a results.json lost there is rebuilt (each
    of these spellings once failed to match the folder, so nothing was)."""
    shutil.copytree(run, tmp_path / "runs" / "x")
    (tmp_path / "link").symlink_to(tmp_path / "runs" / "x")
    (tmp_path / "runs" / "x" / "results.json").unlink()
    monkeypatch.chdir(tmp_path)
    train(DML, EVAL + ["--resume", resume] + (["--out", out] if out else []))
    assert "results.json was missing: rebuilt from last.pt" in capsys.readouterr().out
    assert json.loads((tmp_path / "runs" / "x" / "results.json").read_text())["status"] == "finished"


def test_a_finished_run_resumed_into_another_out_writes_nothing_there(run, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    train(DML, EVAL + ["--resume", str(run / "last.pt"), "--out", str(elsewhere)])
    assert "already finished" in capsys.readouterr().out and not elsewhere.exists()


# ---- 11. resume finds its run ---------------------------------------------------------------------------------

def test_resume_path_takes_the_checkpoints_options(run, tmp_path, monkeypatch):
    """--resume PATH without the training flags: the checkpoint's (the default dataset, cifar100, is not read);
    a training flag given that disagrees is named in one line, with both values."""
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    resumed = train(DML, ["--gpu", "-1", "--no-progress", "--workers", "0", "--epochs", "2", "--extend-epochs",
                          "--resume", str(copy / "last.pt")])
    assert (resumed["epochs_done"], resumed["dataset"], resumed["args"]["subset"]) == (2, "synthetic", 64)
    assert resumed["args"]["epochs"] == resumed["epochs"] == 2                      # the true length, recorded
    with pytest.raises(UserError) as e:
        train(DML, EVAL + ["--resume", str(copy / "last.pt"), "--lr", "0.2", "--subset", "32", "--batch-size", "32"])
    assert str(e.value).startswith(f"{copy / 'last.pt'} was trained with --lr 0.1 (this command: 0.2), --subset 64 "
                                   "(this command: 32)") and "\n" not in str(e.value)
    # the new run it suggests: without --resume PATH (compared whatever the --out), in another --out
    assert str(e.value).endswith("or start a new run: leave out --resume and give another --out")
    argv = EVAL + ["--lr", "0.2", "--subset", "32", "--batch-size", "32", "--dataset", "synthetic", "--arch",
                   "resnet20", "--epochs", "1"]
    assert train(DML, argv + ["--out", str(tmp_path / "another")])["epochs_done"] == 1


@pytest.mark.parametrize("schedule, epochs, given", [
    (["--recipe", "okddip"], "2", ["--milestones", "1"]),                       # milestones 1 1 of 1 epoch, 1 1 of 2
    (["--recipe", "imagenet", "--lr-schedule", "sgdr"], "5", ["--sgdr-t0", "3"])])     # a first cycle of 1, of 2
def test_resume_auto_names_the_run_of_a_step_schedule_trained_to_another_length(tmp_path, monkeypatch, schedule,
                                                                               epochs, given):
    """A recipe's step schedule follows --epochs (its milestones or first SGDR cycle scaled), so a run trained
    to another length has another schedule: that is no other difference, and --resume auto names the run (it once
    started a new run beside it). A schedule given that differs is another run."""
    monkeypatch.setenv("OKD_RUNS", str(tmp_path / "runs"))
    args = TINY[:-2] + schedule
    train(DML, args + ["--epochs", "1"])
    [folder] = list((tmp_path / "runs").iterdir())
    with pytest.raises(UserError) as e:
        train(DML, args + ["--epochs", epochs, "--resume", "auto"])
    assert str(e.value).startswith(f"--resume auto: {folder} holds this run, trained for 1 epochs (1 done); continue "
                                   "it with: python train_dml.py") and "--extend-epochs" in str(e.value)
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [folder.name]
    assert train(DML, args + ["--epochs", epochs, *given, "--resume", "auto"])["epochs_done"] == int(epochs)
    assert len(list((tmp_path / "runs").iterdir())) == 2


def test_resume_auto_of_a_run_trained_under_other_defaults_names_the_command_that_continues_it(tmp_path, monkeypatch):
    """A script whose defaults changed since a run was trained (a preset's --pad-mode, a recipe's lr) finds the run
    by its options, now the defaults, and cannot resume it with them: the line names the command that continues it
    with the checkpoint's values (--out: they are taken where a flag is left out), and that command does."""
    monkeypatch.setenv("OKD_RUNS", str(tmp_path / "runs"))
    train(DML, TINY[:-2] + ["--epochs", "1"])
    folder = next((tmp_path / "runs").iterdir())
    monkeypatch.setitem(RECIPES["okd"], "lr", 0.2)             # DML's recipe, changed since
    with pytest.raises(UserError) as e:
        train(DML, TINY[:-2] + ["--epochs", "1", "--resume", "auto"])
    said = str(e.value)
    assert said.startswith(f"{folder / 'last.pt'} was trained with --lr 0.1 (this command: 0.2). Resume with the "
                           "checkpoint's values: python train_dml.py ")
    command = shlex.split(said.split("values: ")[1].split(", or ")[0])
    assert command[-4:] == ["--out", str(folder), "--resume", "auto"]
    assert train(DML, command[2:])["args"]["lr"] == 0.1       # (finished: its record, as trained)


def test_a_resume_names_every_difference_the_number_of_processes_with_the_flags(tmp_path, monkeypatch):
    """A run of one process resumed under torchrun with another --subset: one line names both (the number of
    processes was named only once the flags were fixed, in a second refusal)."""
    train(DML, TINY[:-2] + ["--epochs", "1", "--out", str(tmp_path / "run")])
    monkeypatch.setenv("WORLD_SIZE", "2")                       # (what torchrun --nproc_per_node=2 sets)
    with pytest.raises(UserError) as e:
        train(DML, EVAL + ["--resume", str(tmp_path / "run" / "last.pt"), "--subset", "32"])
    assert str(e.value).startswith(f"{tmp_path / 'run' / 'last.pt'} was trained with --subset 64 (this command: 32), "
                                   "world size 1 (this command: 2) [without torchrun]. Resume with the checkpoint's "
                                   "values (leave these flags out)")
    with pytest.raises(UserError) as e:                         # the number of processes alone: no flag to leave out
        train(DML, EVAL + ["--resume", str(tmp_path / "run" / "last.pt")])
    assert str(e.value).startswith(f"{tmp_path / 'run' / 'last.pt'} was trained with world size 1 (this command: 2) "
                                   "[without torchrun]. Resume with its number of processes, or")


def test_resume_auto_names_the_sibling_run_of_this_length_first(tmp_path, monkeypatch):
    """Two runs of this command's options but for --epochs or the number of processes: --resume auto names the
    one of this --epochs (trained under torchrun, here), not the first found (it named a 1-epoch run and told to
    extend it, beside the 2-epoch run the command asked for)."""
    monkeypatch.setenv("OKD_RUNS", str(tmp_path / "runs"))
    train(DML, TINY[:-2] + ["--epochs", "2"])
    [two] = list((tmp_path / "runs").iterdir())
    torchrun = two.with_name(two.name[:-8] + "ffffffff")         # (sorted after the other) as if on 2 processes
    two.rename(torchrun)
    record = json.loads((torchrun / "results.json").read_text())
    (torchrun / "results.json").write_text(json.dumps({**record, "world_size": 2}))
    train(DML, TINY[:-2] + ["--epochs", "1"])
    with pytest.raises(UserError) as e:
        train(DML, TINY[:-2] + ["--epochs", "2", "--resume", "auto"])
    assert str(e.value).startswith(f"--resume auto: {torchrun} holds this run, finished on 2 processes after 2 epochs")


def test_a_trainer_built_in_code_compares_its_own_options_with_a_sibling_run(tmp_path, monkeypatch):
    """A Trainer built from parsed options in code (a notebook, whose sys.argv is the kernel's) is no command line
    to read the schedule from again: the sibling run is compared with its options as they are, and no argv is
    parsed (it once stopped on the kernel's '-f' as an unrecognised argument)."""
    from engine.trainer import Trainer
    monkeypatch.setenv("OKD_RUNS", str(tmp_path / "runs"))
    args = TINY[:-2] + ["--recipe", "okddip"]
    train(DML, args + ["--epochs", "1"])
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", str(tmp_path / "kernel.json")])
    trainer = Trainer(DML, parse_args(DML, args + ["--epochs", "2", "--resume", "auto"]))
    assert trainer.run.folder.parent == tmp_path / "runs" and not (trainer.run.folder / "last.pt").exists()


@pytest.mark.slow
def test_resume_auto_names_the_run_trained_to_another_length(run, tmp_path, monkeypatch):
    """--epochs N --resume auto, the run being in its default folder with other --epochs: the run and the
    command that extends it are named (no new run starts beside it); extended in place, it is found again."""
    monkeypatch.setenv("OKD_RUNS", str(tmp_path / "runs"))
    args = TINY[:-2] + ["--epochs", "1"]
    train(DML, args)
    [folder] = list((tmp_path / "runs").glob("dml-resnet20-synthetic-n2-s0-*"))
    with pytest.raises(UserError) as e:
        train(DML, TINY[:-2] + ["--epochs", "2", "--resume", "auto"])
    message = str(e.value)
    assert message.startswith(f"--resume auto: {folder} holds this run, trained for 1 epochs (1 done); continue it "
                              "with: python train_dml.py") and message.count(f"--out {folder} --resume auto") == 1
    assert "--epochs 2" in message and "--extend-epochs" in message
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [folder.name]     # nothing new started
    train(DML, TINY[:-2] + ["--epochs", "2", "--out", str(folder), "--resume", "auto", "--extend-epochs"])
    with pytest.raises(UserError) as e:     # found again, finished: nothing to continue (it was told to continue it)
        train(DML, TINY[:-2] + ["--epochs", "2", "--resume", "auto"])
    assert str(e.value) == (f"--resume auto: {folder} holds this run, finished after 2 epochs: nothing to continue, "
                            f"its results are in {folder} (or leave out --resume or give an --out of its own to start "
                            "a new run)")
    with pytest.raises(UserError) as e:      # the first command again: the run it made, now 2 epochs long, finished
        train(DML, args + ["--resume", "auto"])
    assert str(e.value) == (f"--resume auto: {folder} holds this run, finished after 2 epochs (more than --epochs 1 "
                            f"asks): nothing to continue, its results are in {folder} (or another --out to start a "
                            "new run)")
    assert json.loads((folder / "results.json").read_text())["epochs_done"] == 2
    train(DML, TINY[:-2] + ["--epochs", "2", "--seed", "1"])
    [folder] = list((tmp_path / "runs").glob("dml-resnet20-synthetic-n2-s1-*"))
    with pytest.raises(UserError) as e:                  # fewer --epochs than the finished run's: it is named
        train(DML, TINY[:-2] + ["--epochs", "1", "--seed", "1", "--resume", "auto"])
    assert str(e.value) == (f"--resume auto: {folder} holds this run, finished after 2 epochs (more than --epochs 1 "
                            f"asks): nothing to continue, its results are in {folder} (or leave out --resume or give "
                            "an --out of its own to start a new run)")
    train(DML, TINY[:-2] + ["--epochs", "2", "--seed", "2"])    # one not finished: the command continues it
    [stopped] = list((tmp_path / "runs").glob("dml-resnet20-synthetic-n2-s2-*"))
    last = load_checkpoint(stopped / "last.pt")
    atomic_save({**last, "epoch": 1, "history": last["history"][:1]}, stopped / "last.pt")
    (stopped / "best.pt").unlink()
    (stopped / "results.json").unlink()
    with pytest.raises(UserError) as e:                  # fewer --epochs: the command names the run's own length
        train(DML, TINY[:-2] + ["--epochs", "1", "--seed", "2", "--resume", "auto"])
    command = str(e.value).split("continue it with: ")[1].split(" (or leave out")[0]
    assert command.endswith(f"--epochs 2 --out {stopped} --resume auto") and "--epochs 1" not in command
    assert train(DML, shlex.split(command)[2:])["epochs_done"] == 2


@pytest.mark.parametrize("argv, kept", [
    (["--arch", "resnet20", "--resu", "auto", "--gpu", "-1", "--milestones", "150", "225"],
     "--arch resnet20 --gpu -1 --milestones 150 225"),
    (["--out=old", "--resume=old/last.pt", "--lr", "1e-3"], "--lr 1e-3"),
    (["--resume", "--compile", "--ou", "old", "--lr", ".1"], "--compile --lr .1"),
])
def test_the_continue_command_replaces_out_and_resume_as_the_parser_reads_them(argv, kept, tmp_path):
    """Whatever spelling named --out and --resume (``=``, an abbreviation, --resume without a value), they
    are replaced by the run's folder and ``auto``; every other token stays, in order (negative numbers too)."""
    config = parse_args(DML, argv)
    stopped = run_module.Run(tmp_path, DML, config, argv)
    assert stopped.continue_command() == f"python train_dml.py {kept} --out {tmp_path} --resume auto"



def test_a_run_to_continue_is_named_finished_only_when_its_record_says_so(tmp_path, monkeypatch):
    """--resume auto finding its run elsewhere (another --epochs, another number of processes): a run with all its
    epochs is 'finished: nothing to continue' only when its record says finished; one whose process ended before
    best.pt held the best epoch (read_run: not finished) gets the command that continues it, which repairs it."""
    monkeypatch.chdir(REPO)
    argv = ["--arch", "resnet20", "--epochs", "2"]
    run = run_module.Run(tmp_path / "this", DML, parse_args(DML, argv), argv)
    other = tmp_path / "other"
    assert str(run._continue_instead(other, 2, 2, "leave out --resume", 2, finished=True)) == (
        f"--resume auto: {other} holds this run, finished on 2 processes after 2 epochs: nothing to continue, its "
        f"results are in {other} (or leave out --resume to start a new run)")
    assert str(run._continue_instead(other, 2, 2, "leave out --resume", 2, finished=False)) == (
        f"--resume auto: {other} holds this run, trained on 2 processes for 2 epochs (2 done); continue it with: "
        f"torchrun --nproc_per_node=2 train_dml.py --arch resnet20 --epochs 2 --out {other} --resume auto (or leave "
        "out --resume to start a new run)")


def test_the_commands_a_run_suggests_name_its_script_from_the_current_directory(tmp_path, monkeypatch):
    """Run from another directory (``python /path/to/train_dml.py``), the commands a run records and suggests
    name the script so that they run from there; from the repository's root, as ``train_dml.py``."""
    argv = ["--arch", "resnet20"]
    config = parse_args(DML, argv)
    monkeypatch.chdir(REPO)
    assert run_module.Run(tmp_path, DML, config, argv).command == \
        "train_dml.py --arch resnet20"
    monkeypatch.chdir(tmp_path)
    stopped = run_module.Run(tmp_path / "run", DML, config, argv)
    assert stopped.command == f"{REPO / 'train_dml.py'} --arch resnet20"
    assert stopped.continue_command() == f"python {REPO / 'train_dml.py'} --arch resnet20 --out {tmp_path / 'run'} " \
                                         "--resume auto"


def test_a_multi_node_run_is_continued_on_as_many_nodes(tmp_path, monkeypatch):
    """Under torchrun on 2 nodes of 2 processes (LOCAL_WORLD_SIZE 2 of WORLD_SIZE 4) the command that continues the
    run starts 2 processes on each of 2 nodes (it said --nproc_per_node=4, on one node, which cannot start)."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    argv = ["--arch", "resnet20"]
    stopped = run_module.Run(tmp_path, DML, parse_args(DML, argv), argv, world_size=4)
    assert stopped.continue_command() == (f"torchrun --nnodes=2 --nproc_per_node=2 train_dml.py --arch resnet20 --out "
                                          f"{tmp_path} --resume auto")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert stopped.continue_command().startswith("torchrun --nproc_per_node=4 train_dml.py")


def test_a_copy_kept_outside_the_repository_is_continued_with_its_pythonpath(tmp_path, monkeypatch):
    """A copy outside the repository imports the engine through PYTHONPATH (docs/engine.md): the command that
    continues its run sets it as this process had it (a command without it stopped with No module named
    'engine'); a script of the repository is continued without it."""
    cls = _copy_of("train_dml.py", tmp_path)
    argv = ["--arch", "resnet20"]
    monkeypatch.setenv("PYTHONPATH", f"{REPO}:/my libs")
    monkeypatch.chdir(tmp_path)
    stopped = run_module.Run(tmp_path / "run", cls, parse_args(cls, argv), argv)
    assert stopped.continue_command() == (f"PYTHONPATH='{REPO}:/my libs' python train_dml_copy.py --arch resnet20 "
                                          f"--out {tmp_path / 'run'} --resume auto")
    monkeypatch.chdir(REPO)
    assert run_module.Run(tmp_path / "run", DML, parse_args(DML, argv), argv).continue_command() == (
        f"python train_dml.py --arch resnet20 --out {tmp_path / 'run'} --resume auto")
    # a copy in a folder of the repository is outside its root folder too: Python puts the script's own folder
    # on the path, not the repository's
    monkeypatch.setattr(cls, "script", str(REPO / "ideas" / "train_dml_copy.py"))
    assert run_module.Run(tmp_path / "run", cls, parse_args(cls, argv), argv).continue_command().startswith(
        f"PYTHONPATH='{REPO}:/my libs' python ideas/train_dml_copy.py --arch resnet20")


# ---- 12. a checkpoint opens anywhere ---------------------------------------------------------------------------

def assert_every_tensor_on_the_cpu(path: Path):
    """Every tensor of the file ``path`` is stored on the CPU, and a bare ``torch.load(path)`` opens it in a
    process that sees no GPU (tests/test_gpu.py writes the file on one)."""
    from torch.utils._pytree import tree_leaves
    devices = {t.device.type for t in tree_leaves(torch.load(path, map_location=None, weights_only=True))
               if isinstance(t, torch.Tensor)}
    assert devices == {"cpu"}, (path, devices)
    probe = f"import torch; print(sorted(torch.load({str(path)!r}, weights_only=True)))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                       env=dict(_env(), CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 0 and "state" in r.stdout, r.stderr


@pytest.mark.slow
def test_checkpoints_and_exports_hold_cpu_tensors(run, tmp_path):
    export = subprocess.run([sys.executable, "scripts/export_peer.py", str(run / "best.pt"), "--peer", "2", "-o",
                             str(tmp_path / "peer2.pt")], cwd=REPO, capture_output=True, text=True, env=_env())
    assert export.returncode == 0, export.stderr
    for path in (run / "last.pt", run / "best.pt", tmp_path / "peer2.pt"):
        assert_every_tensor_on_the_cpu(path)


def test_a_run_without_data_is_resumed_only_on_the_copy_it_read(tmp_path, monkeypatch):
    """A run trained without --data reads the default place under the current folder: resumed from another folder
    that holds another copy of the dataset (the same counts, other labels), it is refused with one line naming both
    copies until --data chooses; evaluated there, it evaluates that copy with a warning naming both, and the
    evaluation file says which it read (it evaluated the other copy silently, and named none)."""
    from datasets_on_disk import write_cifar10
    monkeypatch.delenv("OKD_DATASETS", raising=False)
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    for where in (here, elsewhere):
        write_cifar10(where / "datasets" / "cifar10")
    monkeypatch.chdir(here)
    out = tmp_path / "run"
    argv = ["--dataset", "cifar10", "--arch", "resnet20", "--batch-size", "4", "--gpu", "-1", "--threads", "1",
            "--no-progress", "--epochs", "2", "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        train(interrupted(train_baseline.Baseline, 1), argv)
    monkeypatch.chdir(elsewhere)
    trained_on, read = (here / "datasets" / "cifar10" / "cifar-10-batches-py",
                        elsewhere / "datasets" / "cifar10" / "cifar-10-batches-py")
    said = f"trained on the data in {trained_on}; without --data this command read {read}"
    with pytest.raises(UserError, match=f"{said}: give --data with the data it was trained on") as err:
        train(train_baseline.Baseline, ["--resume", str(out / "last.pt"), "--gpu", "-1", "--no-progress"])
    assert "\n" not in str(err.value)
    with pytest.warns(UserWarning, match=f"{said}, and evaluates those"):
        evaluated = train(train_baseline.Baseline, ["--eval-only", str(out / "last.pt"), "--gpu", "-1",
                                                    "--no-progress", "--out", str(tmp_path / "eval")])
    assert evaluated["source"] == str(read)
    resumed = train(train_baseline.Baseline, ["--resume", str(out / "last.pt"), "--data", str(here / "datasets" /
                                              "cifar10"), "--gpu", "-1", "--no-progress", "--threads", "1"])
    assert resumed["epochs_done"] == 2 and resumed["data"]["source"] == str(trained_on)


@pytest.mark.parametrize("dataset", ["tinyimagenet", "folder"])
def test_a_run_without_data_is_resumed_from_its_own_folder(tmp_path, monkeypatch, dataset):
    """The same rule, where the place read is recorded otherwise: TinyImageNet read once from its images, then from
    its decoded cache, is the same folder (it was refused as another copy); a folder dataset read from the default
    place records that folder (it recorded none, so another copy was read silently)."""
    from datasets_on_disk import write_folder, write_tinyimagenet
    monkeypatch.delenv("OKD_DATASETS", raising=False)
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    for where in (here, elsewhere):
        if dataset == "tinyimagenet":
            write_tinyimagenet(where / "datasets" / "tinyimagenet")
        else:
            write_folder(where / "datasets" / "folder", per_split=(("train", 4), ("val", 2)))
    monkeypatch.chdir(here)
    out = tmp_path / "run"
    argv = ["--dataset", dataset, "--arch", "resnet20", "--batch-size", "16", "--gpu", "-1", "--threads", "1",
            "--no-progress", "--epochs", "2", "--out", str(out)] + (["--subset", "200"] * (dataset == "tinyimagenet"))
    with pytest.raises(KeyboardInterrupt):
        train(interrupted(train_baseline.Baseline, 1), argv)
    resumed = train(train_baseline.Baseline, ["--resume", str(out / "last.pt"), "--gpu", "-1", "--no-progress"])
    assert resumed["epochs_done"] == 2 and resumed["data"]["source"].startswith(str(here / "datasets"))
    monkeypatch.chdir(elsewhere)
    with pytest.raises(UserError, match=f"trained on the data in {here / 'datasets'}"):
        train(train_baseline.Baseline, ["--resume", str(out / "last.pt"), "--gpu", "-1", "--no-progress", "--epochs",
                                        "3", "--extend-epochs"])


def test_a_results_json_holding_nan_is_no_record(run, tmp_path):
    """NaN (which json writes and reads back) in a hand-edited results.json is no value the engine writes (a
    non-finite loss stops a run): no record, so read_run rebuilds it from last.pt (it once reached summarize.py's
    statistics as a traceback)."""
    from engine.run import read_run, record_problem
    saved = json.loads((run / "results.json").read_text())
    saved["history"][0]["test"]["peer1/top1"] = float("nan")
    assert record_problem(json.loads(json.dumps(saved))) == "epoch 1: a train, test or val value that is not a " \
        "finite number"
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "results.json").write_text(json.dumps(saved))
    rebuilt = read_run(copy)                               # (from its last.pt: the numbers the run saved)
    assert rebuilt["history"][0]["test"]["peer1/top1"] == json.loads((run / "results.json").read_text())[
        "history"][0]["test"]["peer1/top1"]


def test_a_run_of_a_folder_or_out_whose_name_is_not_utf8(tmp_path, monkeypatch):
    """A data folder whose name is not valid UTF-8 (bytes a file system takes) gives its run a name TensorBoard can
    write under (U+FFFD for the bytes); an --out that is not valid UTF-8 is one line before anything runs (both
    were TensorBoard's UnicodeEncodeError traceback)."""
    from datasets_on_disk import write_folder
    root = write_folder(tmp_path / os.fsdecode(b"d\xf6ta"), per_split=(("train", 4), ("val", 2)))
    monkeypatch.chdir(tmp_path)
    argv = ["--dataset", "folder", "--data", str(root), "--arch", "resnet20", "--batch-size", "4", "--epochs", "1",
            "--gpu", "-1", "--threads", "1", "--no-progress"]
    result = train(train_baseline.Baseline, argv)
    assert result["epochs_done"] == 1 and [p.name.split("-")[3] for p in (tmp_path / "runs").iterdir()] == ["d\ufffdta"]
    out = tmp_path / os.fsdecode(b"r\xf6n")
    with pytest.raises(UserError, match=r"r\\xf6n is not valid UTF-8, under which TensorBoard cannot write") as err:
        train(train_baseline.Baseline, argv + ["--out", str(out)])
    assert "\n" not in str(err.value) and not out.exists()


def test_an_out_on_a_read_only_file_system_says_so(tmp_path, monkeypatch):
    """An existing --out that cannot be written because its file system is mounted read-only is named as such (it
    was "Permission denied ... fix its permissions", which no chmod fixes). A read-only mount cannot be made here:
    the kernel's answers (access refused, statvfs's ST_RDONLY flag) are stood in for."""
    out = tmp_path / "mounted"
    out.mkdir()
    real_access, real_statvfs = os.access, os.statvfs
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == out else real_access(p, mode, **k))
    monkeypatch.setattr(os, "statvfs", lambda p: type("Stat", (), {"f_flag": os.ST_RDONLY})() if Path(p) == out
                        else real_statvfs(p))
    from engine.run import cannot_create
    assert cannot_create(out, "--runs-dir") == (f"cannot write {out}: Read-only file system (the file system is "
                                                "read-only; choose another --runs-dir)")
    monkeypatch.setattr(os, "statvfs", lambda p: type("Stat", (), {"f_flag": 0})())
    assert "Permission denied (no permission to write there" in cannot_create(out)
