"""DDP on the CPU: two gloo processes under torchrun (loopback rendezvous on a free port)."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_dml
from engine import UserError, parse_args, train
from engine.config import resolve, run_name

REPO = Path(__file__).resolve().parent.parent
ARGS = ["--dataset", "synthetic", "--arch", "resnet20", "--subset", "512", "--batch-size", "32",
        "--gpu", "-1", "--no-progress", "--workers", "0", "--lr", "0.05"]


def torchrun(*args, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "tests" / "ddp_worker.py"), *args]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    r = torchrun("train_dml", *ARGS, "--epochs", "1", "--out", str(out))
    return out, r


def _weights(path):
    return torch.load(path, weights_only=True)["model"]["model"]


def _same(a, b):
    """Equal parameters and buffers (the engine hands rank 0's BN statistics to every rank before evaluating)."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_ranks_hold_identical_parameters(two_rank_run):
    out, r = two_rank_run
    a, b = _weights(out / "rank0.pt"), _weights(out / "rank1.pt")
    assert _same(a, b)
    assert "global batch 64 (32 x 2 process(es))" in r.stdout


@pytest.mark.slow   # its fixture is a torchrun run
def test_only_rank0_writes_and_results_count_both_ranks(two_rank_run):
    out, _ = two_rank_run
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["epochs_done"] == 1
    assert len(list((out / "tensorboard").glob("events.*"))) == 1


@pytest.mark.slow   # its fixture is a torchrun run
def test_resume_auto_on_one_process_names_the_torchrun_run(two_rank_run, tmp_path, monkeypatch):
    """--resume auto without --out on one process, after the same command under torchrun: the run's name holds its
    number of processes, so the torchrun run and the torchrun command that continues it are named, rather than a
    new run started beside it."""
    out, _ = two_rank_run
    monkeypatch.setenv("OKD_RUNS", str(tmp_path))
    argv = ARGS + ["--epochs", "1"]
    dml = train_dml.DML
    folder = tmp_path / run_name(dml, resolve(dml, parse_args(dml, argv)), world_size=2)
    shutil.copytree(out, folder)
    with pytest.raises(UserError) as e:
        train(dml, argv + ["--resume", "auto"])
    assert str(e.value) == (f"--resume auto: {folder} holds this run, finished on 2 processes after 1 epochs: nothing "
                            f"to continue, its results are in {folder} (or leave out --resume or give an --out of its "
                            "own to start a new run)")
    with pytest.raises(UserError) as e:
        train(dml, ARGS + ["--epochs", "2", "--resume", "auto"])
    assert str(e.value).startswith(f"--resume auto: {folder} holds this run, trained on 2 processes for 1 epochs (1 "
                                   "done); continue it with: torchrun --nproc_per_node=2 train_dml.py ")
    assert f"--out {folder} --resume auto --extend-epochs" in str(e.value)
    assert os.listdir(tmp_path) == [folder.name]


@pytest.mark.slow
def test_two_rank_eval_equals_one_rank(two_rank_run, tmp_path):
    out, _ = two_rank_run
    torchrun("train_dml", *ARGS, "--eval-only", str(out / "last.pt"), "--out", str(tmp_path / "two"))
    two = json.loads((tmp_path / "two" / "eval-last-synthetic.json").read_text())
    one = train(train_dml.DML, ARGS + ["--eval-only", str(out / "last.pt"), "--out", str(tmp_path / "one")])
    assert two["test"] == one["test"]


@pytest.mark.slow
def test_two_rank_run_resumes(two_rank_run, tmp_path):
    out = tmp_path / "run"     # a copy: the other tests of the module read the 1-epoch run, on any worker
    shutil.copytree(two_rank_run[0], out)
    torchrun("train_dml", *ARGS, "--epochs", "2", "--extend-epochs", "--out", str(out), "--resume", "auto")
    results = json.loads((out / "results.json").read_text())
    assert results["epochs_done"] == 2 and results["status"] == "finished"
    a, b = _weights(out / "rank0.pt"), _weights(out / "rank1.pt")
    assert _same(a, b)


@pytest.mark.slow
def test_module_with_its_own_optimizer_stays_identical(tmp_path):
    """CMFF's fusion module has a second optimizer; it sits in the one DDP module, so ranks agree."""
    torchrun("train_cmff", *ARGS, "--subset", "256", "--epochs", "1", "--fusion-grid", "1", "--out", str(tmp_path))
    a, b = _weights(tmp_path / "rank0.pt"), _weights(tmp_path / "rank1.pt")
    assert any("fusion" in k for k in a) and _same(a, b)


@pytest.mark.slow
@pytest.mark.slow   # two torchrun processes
def test_a_folder_another_process_holds_stops_every_rank_in_one_line(tmp_path):
    """Rank 0 alone finds that another process holds the run folder (before the data are read); every rank stops
    with a line (rank 0's reason, the other ranks' pointer to it), none with a traceback or a hang."""
    from engine.run import RunLock
    out = tmp_path / "run"
    lock = RunLock(out, "the test").acquire()
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_dml.py",
               *ARGS, "--epochs", "1", "--out", str(out)]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    finally:
        lock.release()
    errors = sorted(line for line in r.stderr.splitlines() if line.startswith("error: "))
    assert r.returncode != 0 and "build_loaders" not in r.stderr, r.stderr[-3000:]     # (no rank went on)
    assert errors == [f"error: {out} is in use by process {os.getpid()} on {socket.gethostname()} (since "
                      f"{errors[0].split('(since ')[1]}",
                      f"error: rank 0 cannot use {out}; see its message"], r.stderr[-3000:]


def test_a_stopped_two_rank_run_says_how_to_continue_once(tmp_path):
    """SIGTERM to torchrun (what SLURM sends) stops every rank; the line saying what is saved and how to continue
    is printed once, by rank 0, and the command it names continues the run."""
    import signal
    import time
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_dml.py",
           *ARGS, "--epochs", "30", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "last.pt").exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=300)
    assert stderr.count("Continue with:") == 1, stderr[-3000:]
    command = stderr.split("Continue with: ", 1)[1].splitlines()[0]
    assert command.startswith("torchrun --nproc_per_node=2 train_dml.py") and "--resume auto" in command


@pytest.mark.parametrize("flags, out", [([], []), (["--out", "runs/r34"], []), ([], ["runs/o"])])
def test_the_slurm_script_trains_the_run_directory_the_command_names(tmp_path, flags, out):
    """scripts/slurm_ddp.sh adds --resume auto and leaves the run directory to the command: the engine's default
    one for the options, the --out given, or OUT=DIR, so the same command submitted again continues the run; the
    user's own flags come last (their --resume or --out wins). srun and scontrol are stand-ins that print."""
    for name, body in (("srun", 'printf "%s\\n" "$@"'), ("scontrol", "echo node1")):
        (tmp_path / name).write_text(f"#!/bin/bash\n{body}\n")
        (tmp_path / name).chmod(0o755)
    bad = subprocess.run(["bash", "scripts/slurm_ddp.sh", "train_dml.py"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "GPUS_PER_NODE": "0"})
    assert bad.returncode == 2 and bad.stderr == ("error: 0 processes per node (GPUS_PER_NODE, or SLURM's GPUs per "
                                                  "node); set GPUS_PER_NODE=N\n"), bad.stderr
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_GPUS", "GPUS_PER_NODE"))},
           "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[1-2]",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "77", **({"OUT": out[0]} if out else {})}
    r = subprocess.run(["bash", "scripts/slurm_ddp.sh", "train_dml.py", "--arch", "resnet34", *flags], cwd=REPO,
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    argv = r.stdout.split("\n")[:-1]
    script = argv.index("train_dml.py")
    assert argv[0] == "torchrun" and "77" in argv[:script]
    assert argv[script + 1:] == ["--resume", "auto", *(["--out", out[0]] if out else []), "--arch", "resnet34", *flags]
    assert argv[argv.index("--nproc_per_node") + 1] == "8"               # the script's own #SBATCH line
    for allocated, expected in ({"SLURM_GPUS_PER_NODE": "a100:4"}, "4"), ({"SLURM_GPUS_ON_NODE": "2"}, "2"), (
            {"SLURM_GPUS_ON_NODE": "2", "GPUS_PER_NODE": "1"}, "1"), (     # sbatch --gpus-per-node, or the user's
            {"SLURM_GPUS_ON_NODE": "0", "SLURM_GPUS_PER_NODE": "4"}, "4"):  # (0 on the node: not a count to start)
        r = subprocess.run(["bash", "scripts/slurm_ddp.sh", "train_dml.py"], cwd=REPO, env={**env, **allocated},
                           capture_output=True, text=True)
        argv = r.stdout.split("\n")[:-1]
        assert argv[argv.index("--nproc_per_node") + 1] == expected, (allocated, argv)
    for wrong in ([], ["--arch", "resnet34"]):             # the script first, or one line that says so
        r = subprocess.run(["bash", "scripts/slurm_ddp.sh", *wrong], cwd=REPO, env=env, capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith("error: the first argument is the training script"), r.stderr
    for wrong in (["train_dmll.py"], ["python", "train_dml.py"]):      # one line before srun, not one per process
        r = subprocess.run(["bash", "scripts/slurm_ddp.sh", *wrong], cwd=REPO, env=env, capture_output=True, text=True)
        assert r.returncode == 2 and r.stdout == "" and r.stderr == (
            f"error: {wrong[0]}: no such training script here ({REPO}); give the train_X.py file (no 'python' "
            "before it)\n"), r.stderr
