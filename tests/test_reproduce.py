"""scripts/reproduce.py and scripts/tables.py: every table's cells and commands, the local launcher on tiny
synthetic runs (skip, resume, Ctrl-C), and the SLURM job array (checked without a cluster)."""
from __future__ import annotations

import json
import os
import pickle
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.checkpoint import FORMAT, atomic_save
from scripts import reproduce, summarize
from scripts.tables import PAPER_TABLES, TABLES, Table, cell, check_table

REPO = Path(__file__).resolve().parents[1]

# (cells, runs per seed) of every table: published numbers counted by hand from the papers' tables
EXPECTED = {
    "mcl-okd-cifar100": (30, 30),      # 5 backbones x 6 methods
    "mcl-okd-ablation": (15, 15),      # 5 x 3; 10 of the runs are the main table's
    "mcl-okd-imagenet": (2, 2),
    "cmff-cifar100": (62, 53),         # 70 minus 8 blanks; the second ResNet-32 column shares 9 runs
    "cmff-tinyimagenet": (10, 10),
    "pcl-cifar100": (35, 35),
    "fashion-mnist": (12, 12),
    "smoke": (2, 2),
}


def test_a_command_beside_a_published_number_trains_that_numbers_cell():
    """Where the README or a method page puts a paper's number beside a command, the command trains what
    scripts/tables.py trains for that number (the same training options as one of the method's cells with that
    published value), so no page targets a number with another network or protocol than reproduce.py runs.
    A line that says it is "our reading" of a table (docs/amln.md) is the exception it states."""
    from engine.cli import parse_args
    from engine.config import training_options
    cells: dict[tuple, list] = {}       # (script, "74.14") -> the cells that publish it
    for c in (c for name in PAPER_TABLES for c in TABLES[name].cells):
        for m in c.metrics:
            if m.published is not None:
                cells.setdefault((f"train_{c.method}.py", f"{m.published:.2f}"), []).append(c)

    def options(script: str, argv: list) -> dict:
        return training_options({**vars(parse_args(reproduce.method_class(script), argv)), "world_size": 1})
    checked = 0
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            command = re.search(r"python (train_\w+\.py) ([^`#|]*)", line)
            if page.name == "reproducing.md" or not command or "our reading" in line:
                continue
            script = command.group(1)
            targets = [c for value in re.findall(r"\b\d\d\.\d\d\b", line) for c in cells.get((script, value), [])]
            if targets:
                quoted = options(script, shlex.split(command.group(2)))
                assert any(options(script, ["--arch", c.arch, *c.flags]) == quoted for c in targets), \
                    f"{page.name}:{number}: {line.strip()} -- reproduce.py runs " + "; ".join(
                        f"--arch {c.arch} {' '.join(c.flags)}" for c in targets)
                checked += 1
    assert checked >= 15


def test_a_page_table_of_the_commands_tables_py_runs_holds_those_commands():
    """A method page's table introduced as "the commands, as `scripts/tables.py` runs them" gives, in each cell,
    the training options of one of that method's cells of the tables (docs/ffl.md once left out the PCL
    cells' `--pad-mode zero`, so its commands trained with the FFL code's reflect padding)."""
    from engine.cli import parse_args
    from engine.config import training_options
    checked = 0
    for page in sorted((REPO / "docs").glob("*.md")):
        text = page.read_text()
        if "as `scripts/tables.py` runs them" not in text:
            continue
        script = f"train_{page.stem}.py"
        method = reproduce.method_class(script)
        runs = [training_options({**vars(parse_args(method, ["--arch", c.arch, *c.flags])), "world_size": 1})
                for name in PAPER_TABLES for c in TABLES[name].cells if c.method == page.stem]
        block = text.split("as `scripts/tables.py` runs them", 1)[1].split("\n\n|", 1)[1].split("\n\n", 1)[0]
        for line in block.splitlines()[2:]:
            for command in re.findall(r"`(--arch [^`]*)`", line):
                argv = shlex.split(command)
                assert training_options({**vars(parse_args(method, argv)), "world_size": 1}) in runs, \
                    f"{page.name}: `{command}` is no cell's command of scripts/tables.py"
                checked += 1
    assert checked >= 10


def test_tables_listed():
    assert set(TABLES) == set(EXPECTED)
    assert set(PAPER_TABLES) <= set(TABLES)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_dry_run_cells_and_commands_parse(name, tmp_path, capsys):
    table = TABLES[name]
    cells, runs_per_seed = EXPECTED[name]
    runs, selected = reproduce.plan(table, [0, 1, 2], tmp_path)
    assert len(selected) == len(table.cells) == cells
    assert len(runs) == 3 * runs_per_seed
    assert reproduce.main([name, "--seeds", "0", "1", "2", "--dry-run", "--runs-dir", str(tmp_path)]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("python ")]
    assert len(lines) == 3 * runs_per_seed
    for run, line in zip(runs, lines):
        assert line.startswith(f"python {run.script} ")
        assert ("# not built" in line) == (not run.built)
        if not run.built:
            continue
        args = reproduce.parse_run_args(run)       # the script's own parser: SystemExit on any bad flag
        assert (args.seed, args.tag, args.resume) == (run.seed, f"{run.table}/{run.name}", "auto")
        assert Path(args.out).name == f"{run.name}-s{run.seed}"
    for c in table.cells:
        for m in c.metrics:
            assert m.kind in ("single", "ensemble")
            if name in PAPER_TABLES:
                assert m.published is not None and 0 < m.published < 100


def test_cells_use_the_published_variants(tmp_path):
    """The flags each paper's cell needs, as parsed by the scripts (spot checks of the mapping)."""
    def args_of(table, row, column, seed=0):
        c = TABLES[table].cell(row, column)
        runs, _ = reproduce.plan(TABLES[table], [seed], tmp_path, {"row": [row], "column": [column]})
        return c, reproduce.parse_run_args(runs[0])

    c, a = args_of("mcl-okd-cifar100", "ResNet-110", "DML")
    assert (a.arch, a.topology, a.num_peers, a.kd_T, a.recipe) == ("resnet110_bottleneck", "shared", 4, 2.0, "okd")
    c, a = args_of("mcl-okd-cifar100", "ResNet-32", "MCL-OKD")
    assert (a.recipe, a.alpha, a.batch_size, a.lr) == ("mcl-okd", 1.0, 64, 0.05)
    assert [m.published for m in c.metrics] == [24.52, 22.00]
    c, a = args_of("mcl-okd-ablation", "ResNet-32", "+MCL")
    assert a.alpha == 0 and c.runs_table is None
    assert TABLES["mcl-okd-ablation"].cell("ResNet-32", "+MCL+DOT").runs_table == "mcl-okd-cifar100"
    c, a = args_of("cmff-cifar100", "CMFF", "ResNet-110")
    assert (a.arch, a.lambda_rot, a.lambda_sim) == ("resnet110", 3.0, 2.0)
    # FFL's and DCCL's cells reproduce their codes' protocols: their KLLoss too (the gap exceeds 1e-3: docs/dccl.md)
    for table, row, column in (("cmff-cifar100", "DCCL", "ResNet-32"), ("cmff-cifar100", "DCCL", "WRN-20-8"),
                               ("cmff-cifar100", "FFL", "WRN-20-8"), ("cmff-tinyimagenet", "ResNet-18", "DCCL"),
                               ("cmff-tinyimagenet", "ResNet-34", "FFL")):
        c, a = args_of(table, row, column)
        assert c.method in ("ffl", "dccl") and a.kd_eps == 1e-7, (table, row, column)
    assert args_of("cmff-cifar100", "CMFF", "ResNet-32")[1].kd_eps == 0.0     # this repository's defaults
    assert args_of("pcl-cifar100", "ResNet-32", "FFL-S")[1].kd_eps == 0.0     # PCL's protocol, not the FFL code's
    c, a = args_of("cmff-cifar100", "DML", "WRN-20-8")
    assert a.arch == "wrn_22_8" and c.metrics[0].published == 79.76
    c, a = args_of("cmff-cifar100", "Student (baseline)", "ResNet-32 (2nd)")
    assert c.metrics[0].published == 72.56 and c.run == TABLES["cmff-cifar100"].cell("Student (baseline)",
                                                                                       "ResNet-32").run
    assert TABLES["cmff-cifar100"].cell("AMLN", "ResNet-32") is None        # "-" in the README: not a run
    c, a = args_of("pcl-cifar100", "WRN-20-8", "DML")
    assert (a.arch, a.recipe, a.lr_schedule) == ("wrn_20_8", "okddip", "multistep")
    assert (c.metrics[0].published, c.metrics[0].published_std) == (79.77, 0.07)
    c, a = args_of("mcl-okd-imagenet", "ResNet-34", "MCL-OKD")
    assert (a.dataset, a.recipe, a.epochs) == ("imagenet", "mcl-okd-imagenet", 100)


def test_only_filters(tmp_path):
    only = reproduce.parse_only(["method=dml,one", "arch=resnet3*"])
    assert only == {"method": ["dml", "one"], "arch": ["resnet3*"]}
    runs, cells = reproduce.plan(TABLES["mcl-okd-cifar100"], [0], tmp_path, only)
    assert {(c.method, c.arch) for c in cells} == {("dml", "resnet32"), ("one", "resnet32")}
    _, cells = reproduce.plan(TABLES["cmff-cifar100"], [0], tmp_path, reproduce.parse_only(["column=resnet-110"]))
    assert len(cells) == 9
    with pytest.raises(ValueError, match="keys are"):
        reproduce.parse_only(["model=dml"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        reproduce.parse_only(["method=dml", "resnet32"])


def test_a_list_option_given_twice_adds_to_the_first():
    """--only, --seeds and --extra given more than once add up (a later use once silently replaced the earlier:
    ``--only method=dml --only arch=resnet32`` selected every method on resnet32); a single use replaces the
    default, and a flag given once keeps argparse's rule."""
    parse = reproduce.build_parser().parse_args
    args = parse(["t", "--only", "method=dml", "--only", "arch=resnet32", "--seeds", "0", "--seeds", "1", "2",
                  "--extra=--amp bf16", "--extra=--gpu -1"])
    assert (args.only, args.seeds, args.extra) == (["method=dml", "arch=resnet32"], [0, 1, 2], "--amp bf16 --gpu -1")
    args = parse(["t", "--seeds", "5"])
    assert (args.only, args.seeds, args.extra) == (None, [5], "")
    assert parse(["t"]).seeds == [0, 1, 2]
    runs, cells = reproduce.plan(TABLES["mcl-okd-cifar100"], [0], Path("/nowhere"),
                                 reproduce.parse_only(parse(["t", "--only", "method=dml", "--only",
                                                             "arch=resnet32"]).only))
    assert [(c.method, c.arch) for c in cells] == [("dml", "resnet32")]


@pytest.mark.parametrize("only", [["foo"], ["model=dml"]])
def test_a_malformed_only_is_one_line_and_exit_status_2(only, capsys):
    assert reproduce.main(["smoke", "--only", *only]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --only") and err.count("\n") == 1


def test_check_table_refuses_one_run_name_for_two_commands():
    t = Table("t", "t", "t", "accuracy", ["a", "b"], ["c"],
              [cell("a", "c", "dml", "resnet20", run="x"), cell("b", "c", "dml", "resnet32", run="x")])
    with pytest.raises(ValueError, match="different commands"):
        check_table(t)


def test_not_built_script_is_listed_never_run(tmp_path, monkeypatch):
    ghost = reproduce.Run("t", "ghost-resnet20", "train_ghost.py", ["--arch", "resnet20"], 0, tmp_path / "g", ["x"])
    assert not ghost.built and reproduce.run_state(ghost) == "not built"
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a not-built run was started"))
    outcome = reproduce.run_local([ghost], log=lambda *_: None)
    assert outcome["not built"] == [ghost] and not outcome["finished"]


def test_minutes():
    # SLURM's formats (sbatch --time): two numbers are MM:SS, and after a day HH[:MM] ("2:05" once read 125 minutes)
    assert [reproduce.parse_minutes(t) for t in ("90", "1:30:00", "2:05", "30:00", "1-00:00:30", "1-12", "1-2:30")] \
        == [90, 90, 3, 30, 1441, 2160, 1590]


# ---- the local launcher on tiny synthetic runs -------------------------------------------------------------------
TINY = ("--dataset", "synthetic", "--subset", "32", "--epochs", "2", "--batch-size", "32", "--gpu", "-1",
        "--no-progress")


def tiny_table() -> Table:
    return Table("tiny", "two tiny cells", "test", "accuracy", ["Baseline", "DML"], ["ResNet-20"],
                 [cell("Baseline", "ResNet-20", "baseline", "resnet20", TINY),
                  cell("DML", "ResNet-20", "dml", "resnet20", TINY, ensemble_head="ensemble")])


def interrupt_after_first_epoch(run: reproduce.Run, monkeypatch):
    """Train ``run`` in this process and stop it like Ctrl-C right after epoch 1 was saved."""
    from engine import train
    from engine.run import Run
    real = Run.write_results                 # the last write of an epoch (after its checkpoint)

    def stop(self, status, **extra):
        real(self, status, **extra)
        if status == "running":
            raise KeyboardInterrupt
    monkeypatch.setattr(Run, "write_results", stop)
    with pytest.raises(KeyboardInterrupt):
        train(reproduce.method_class(run.script), [*run.train_argv()])
    monkeypatch.setattr(Run, "write_results", real)


@pytest.mark.slow
def test_local_launcher_skips_finished_resumes_interrupted_and_summarizes(tmp_path, monkeypatch):
    table = tiny_table()
    runs, _ = reproduce.plan(table, [0, 1], tmp_path)
    assert [r.name for r in runs] == ["baseline-resnet20"] * 2 + ["dml-resnet20"] * 2
    cut = runs[2]                                       # DML seed 0: interrupted after its first epoch
    interrupt_after_first_epoch(cut, monkeypatch)
    partial = json.loads((cut.out / "results.json").read_text())
    assert partial["status"] == "interrupted" and partial["epochs_done"] == 1
    assert [reproduce.run_state(r) for r in runs] == ["new", "new", "resume", "new"]

    outcome = reproduce.run_local(runs, jobs=2, log=lambda *_: None)   # a queue of two CPU slots
    assert sorted(r.out.name for r in outcome["finished"]) == sorted(r.out.name for r in runs), outcome
    assert "resumed from" in (cut.out / "train.log").read_text()
    for r in runs:
        data = json.loads((r.out / "results.json").read_text())
        assert data["status"] == "finished" and [h["epoch"] for h in data["history"]] == [1, 2]
        assert data["args"]["tag"] == f"tiny/{r.name}" and data["args"]["seed"] == r.seed

    stamps = [(r.out / "results.json").stat().st_mtime_ns for r in runs]
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a finished run was started again"))
    again = reproduce.run_local(runs, log=lambda *_: None)
    assert len(again["skipped"]) == 4 and not again["finished"]
    assert stamps == [(r.out / "results.json").stat().st_mtime_ns for r in runs]

    # the summary's mean and std, against a hand computation from the results.json files
    loaded, bad = summarize.load_runs(tmp_path)
    assert not bad and len(loaded) == 4
    cells = summarize.summarize_table(table, loaded)
    dml = [json.loads((r.out / "results.json").read_text()) for r in runs[2:]]
    single = [(d["best"]["test"]["peer1/top1"] + d["best"]["test"]["peer2/top1"]) / 2 for d in dml]
    ensemble_last = [d["history"][-1]["test"]["ensemble/top1"] for d in dml]
    single_m, ens_m = cells[1].metrics
    assert single_m.best[0] == pytest.approx(sum(single) / 2)
    assert single_m.best[1] == pytest.approx(abs(single[0] - single[1]) / 2 ** 0.5)
    assert ens_m.last[0] == pytest.approx(statistics.fmean(ensemble_last))
    base = [json.loads((r.out / "results.json").read_text())["best"]["test"]["net/top1"] for r in runs[:2]]
    assert cells[0].metrics[0].best == pytest.approx((statistics.fmean(base), statistics.stdev(base)))
    assert len(cells[0].finished) == 2 and cells[0].status == "2 finished"


@pytest.mark.slow
@pytest.mark.parametrize("sig, sigint", [(signal.SIGINT, signal.SIG_DFL), (signal.SIGTERM, signal.SIG_DFL),
                                         (signal.SIGTERM, signal.SIG_IGN)])
def test_ctrl_c_leaves_the_run_resumable(tmp_path, sig, sigint):
    """SIGINT to the launcher (or SIGTERM, as a scheduler, ``timeout`` or ``kill`` sends it; it once ended the
    launcher alone and left its runs training unseen): the training process stops after a checkpoint, the launcher
    exits 128 + the signal's number (130, 143), and the run is left as "resume" (last.pt + results.json status interrupted). Also for a launcher
    started with SIGINT ignored (a background job of a script): its runs inherited that, trained on after the
    launcher's SIGINT, and were killed 2 minutes later."""
    out = tmp_path / "smoke" / "dml-resnet20-s0"
    cmd = [sys.executable, "scripts/reproduce.py", "smoke", "--only", "method=dml", "--seeds", "0", "1", "--runs-dir",
           str(tmp_path), "--extra", "--epochs 40 --subset 64 --batch-size 32 --gpu -1 --no-progress"]
    # preexec_fn: Ctrl-C's SIGINT at its default, as a terminal gives it (a background job of a script, as CI may
    # run this test in, inherits SIGINT ignored, and a launcher started so keeps ignoring it, as Python does)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))
    deadline = time.time() + 240
    while not (out / "results.json").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 128 + sig.value, output           # 130 for SIGINT, 143 for SIGTERM
    assert f"interrupted ({sig.name}): stopping 1 run(s)" in output
    assert "1 interrupted, 1 not started\n" in output and "re-run the same command" in output   # (seed 1 queued)
    assert (out / "last.pt").is_file() and not (tmp_path / "smoke" / "dml-resnet20-s1").exists()
    assert json.loads((out / "results.json").read_text())["status"] == "interrupted"
    run = reproduce.plan(TABLES["smoke"], [0], tmp_path, {"method": ["dml"]})[0][0]
    assert reproduce.run_state(run, cmd[-1].split()) == "resume"
    # without the same --extra the run is not the command's: the engine would refuse to resume it
    assert reproduce.run_state(run, ["--gpu", "-1"]) == ("differs: --subset 64 (this command: 512), --epochs 40 "
                                                         "(this command: 2), --batch-size 32 (this command: 64)")


# ---- SLURM through submitit, without a cluster -------------------------------------------------------------------
def slurm_opts(*argv):
    args = reproduce.build_parser().parse_args(["smoke", "--launcher", "slurm", *argv])
    return reproduce.slurm_options(args, "smoke")


def test_slurm_job_array(tmp_path, monkeypatch):
    """A fake sbatch records the submission file: one array of 4 tasks with the options given, and one pickled
    TrainRun per task carrying the run's command with --resume auto."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/sbatch.sh\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    runs, _ = reproduce.plan(TABLES["smoke"], [0, 1], tmp_path / "runs")
    opts = slurm_opts("--partition", "gpu", "--time", "1:30:00", "--array-parallelism", "2", "--account", "lab",
                      "--setup", "module load cuda", "--max-requeues", "7")
    folder = tmp_path / "runs" / "smoke" / ".submitit"
    jobs = reproduce.submit_slurm(runs, opts, folder, log=lambda *_: None)
    assert [j.job_id for j in jobs] == [f"4242_{i}" for i in range(4)]
    sbatch = (tmp_path / "sbatch.sh").read_text()
    for line in ("#SBATCH --array=0-3%2", "#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --account=lab",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=8", "#SBATCH --signal=USR2@120",
                 "#SBATCH --requeue", "#SBATCH --job-name=okd-smoke", "module load cuda"):
        assert line in sbatch, line
    for i, run in enumerate(runs):
        with open(folder / f"4242_{i}_submitted.pkl", "rb") as f:
            delayed = pickle.load(f)
        job = delayed.function
        assert isinstance(job, reproduce.TrainRun)
        assert job.command[1:] == run.command("python", ["--gpu", "0", "--no-progress"])[1:]
        assert delayed._timeout_countdown == 7           # time-outs re-queued up to --max-requeues times
        again = job.checkpoint()                         # what submitit calls on pre-emption / time-out
        assert again.function.command == job.command and "--resume" in job.command

    wide = reproduce.submit_slurm(runs[:1], slurm_opts("--gpus-per-run", "4"), tmp_path / "wide", log=lambda *_: None)
    assert "#SBATCH --gpus-per-node=4" in (tmp_path / "sbatch.sh").read_text()
    with open(tmp_path / "wide" / f"{wide[0].job_id}_submitted.pkl", "rb") as f:
        command = pickle.load(f).function.command
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert command[5:] == runs[0].command("python", ["--no-progress"])[1:]
    table, cells = TABLES["smoke"], reproduce.plan(TABLES["smoke"], [0], tmp_path)[1]   # --dry-run says so too
    dry = reproduce.dry_run(table, runs[:1], cells, [], world_size=4)
    assert f"torchrun --standalone --nproc_per_node=4 {runs[0].script} " in dry


def test_slurm_without_its_tools_is_one_line_and_makes_nothing(tmp_path, capsys, monkeypatch):
    """--launcher slurm where sbatch or srun is missing (not a login node): one line naming what is missing,
    before any table folder is made."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))                 # sbatch, and no srun
    runs_dir = tmp_path / "runs"
    assert reproduce.main(["smoke", "--launcher", "slurm", "--runs-dir", str(runs_dir)]) == 2
    assert capsys.readouterr().err == ("error: --launcher slurm needs SLURM's srun (run it on the cluster's login "
                                       "node); here use --launcher local\n")
    assert not runs_dir.exists()


def test_more_gpus_per_run_warn_of_the_global_batch(tmp_path, capsys):
    """--batch-size is per process: --gpus-per-run N without a --batch-size in --extra says that the global batch
    is N x the table's (what summarize.py marks) and how to keep the table's; with one, nothing is said."""
    base = ["smoke", "--launcher", "slurm", "--dry-run", "--runs-dir", str(tmp_path)]
    assert reproduce.main(base + ["--gpus-per-run", "2"]) == 0
    assert capsys.readouterr().err.startswith("warning: --gpus-per-run 2 trains each cell's --batch-size on each of "
                                              "the 2 GPUs, a global batch 2 x the table's")
    assert reproduce.main(base + ["--gpus-per-run", "2", "--extra=--batch-size 32"]) == 0
    assert reproduce.main(base) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_slurm_task_trains_through_submitit_debug_executor(tmp_path):
    """The job function itself, run by submitit's in-process debug executor: a tiny run that finishes."""
    table = Table("tiny", "t", "t", "accuracy", ["Baseline"], ["R"],
                  [cell("Baseline", "R", "baseline", "resnet20", TINY[:-3] + ("--epochs", "1"))])
    runs, _ = reproduce.plan(table, [0], tmp_path / "runs")
    opts = slurm_opts()
    jobs = reproduce.submit_slurm(runs, opts, tmp_path / "submitit", extra=["--gpu", "-1"], cluster="debug",
                                  log=lambda *_: None)
    assert jobs[0].result() == 0
    data = json.loads((runs[0].out / "results.json").read_text())
    assert data["status"] == "finished" and data["args"]["tag"] == "tiny/baseline-resnet20"


def test_markdown_page_lists_every_published_number():
    page = reproduce.markdown_page()
    for name in PAPER_TABLES:
        table = TABLES[name]
        assert f"## `{name}`" in page
        for c in table.cells:
            for m in c.metrics:
                if table.unit == "error":
                    assert f"{100 - m.published:.2f} ({m.published:.2f})" in page
                else:
                    assert f"{m.published:.2f}" in page
    rows = [l for l in page.splitlines() if l.startswith("| ") and "python train_" in l]
    assert len(rows) == sum(len(c.metrics) for n in PAPER_TABLES for c in TABLES[n].cells)


def test_tag_is_recorded_but_does_not_name_the_run():
    from engine.cli import parse_args
    from engine.config import resolve, run_name
    dml = reproduce.method_class("train_dml.py")
    tagged = parse_args(dml, ["--arch", "resnet20", "--tag", "pcl-cifar100/dml-resnet20"])
    plain = parse_args(dml, ["--arch", "resnet20"])
    assert tagged.tag == "pcl-cifar100/dml-resnet20" and plain.tag is None
    name = [run_name(dml, resolve(dml, a)) for a in (tagged, plain)]
    assert name[0] == name[1] == "dml-resnet20-cifar100-n2-s0"


def test_gpu_queue_one_run_per_gpu(tmp_path, monkeypatch):
    """--gpus 0,1: at most two runs at once, each with its own CUDA_VISIBLE_DEVICES and --gpu 0; a freed GPU
    takes the next run (processes faked: each 'finishes' after a few polls)."""
    started, running = [], set()

    class FakeProc:
        def __init__(self, cmd, cwd, env, stdout, stderr, start_new_session, preexec_fn):
            assert start_new_session and cwd == REPO
            assert preexec_fn is reproduce._interruptible     # (SIGINT stops it, whatever the launcher ignores)
            self.cmd, self.gpu, self.polls, self.returncode = cmd, env["CUDA_VISIBLE_DEVICES"], 0, None
            assert self.gpu not in running, "two runs on one GPU"
            running.add(self.gpu)
            assert len(running) <= 2
            started.append(self)

        def poll(self):
            self.polls += 1
            if self.polls >= 3 and self.returncode is None:
                self.returncode = 0
                running.discard(self.gpu)
            return self.returncode

    monkeypatch.setattr(subprocess, "Popen", FakeProc)
    monkeypatch.setattr(reproduce.time, "sleep", lambda s: None)
    runs, _ = reproduce.plan(TABLES["smoke"], [0, 1], tmp_path)
    outcome = reproduce.run_local(runs, gpus=["0", "1"], log=lambda *_: None)
    assert len(outcome["finished"]) == 4 and len(started) == 4
    assert [p.gpu for p in started[:2]] == ["0", "1"]
    for p, run in zip(started, runs):
        assert p.cmd[1:] == run.command("python", ["--gpu", "0", "--no-progress"])[1:]


@pytest.mark.parametrize("exit_code", [0, 130])
def test_slurm_task_ignores_the_warning_signal_and_stops_on_checkpoint(tmp_path, exit_code):
    """The training process survives SLURM's USR2 (submitit handles it) and checkpoint() stops it with SIGINT; a
    stop for the requeue is not a failure, whatever status the stopped process exits with (the engine's is
    130)."""
    script = ("import os, signal, time\nos.kill(os.getpid(), signal.SIGUSR2)\nprint('alive after USR2', flush=True)\n"
              "try:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    print('stopped by SIGINT', flush=True)\n"
              f"    raise SystemExit({exit_code})\n")
    job = reproduce.TrainRun([sys.executable, "-c", script], str(tmp_path), str(tmp_path / "log"))
    import threading
    codes = []
    worker = threading.Thread(target=lambda: codes.append(job()))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a job started ignoring SIGINT: its training still stops
    try:
        worker.start()
        while job._proc is None and worker.is_alive():
            time.sleep(0.01)
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.time() + 60
    while "alive" not in ((tmp_path / "log").read_text() if (tmp_path / "log").exists() else "") \
            and time.time() < deadline:
        time.sleep(0.1)
    again = job.checkpoint()
    worker.join(60)
    assert codes == [exit_code] and (tmp_path / "log").read_text() == "alive after USR2\nstopped by SIGINT\n"
    assert again.function.command == job.command


# ---- bad input: one line, before anything runs ------------------------------------------------------------------
def no_training(monkeypatch):
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a run was started"))


def error_line(argv, capsys) -> str:
    """main(argv)'s exit status must be 2 and its stderr one line (no traceback); returns that line."""
    try:
        code = reproduce.main(argv)
    except SystemExit as e:                # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, (argv, code, err)
    return err.strip()


@pytest.mark.parametrize("argv, named", [
    (["--seeds", "-1", "--dry-run"], "argument --seeds: must lie in [0, 4294967296); got -1"),
    (["--seeds", "0", "one", "--dry-run"], "argument --seeds: invalid int value: 'one'"),
    (["--jobs", "0"], "argument --jobs: must lie in [1, "),
    (["--jobs", "100000"], "must lie in [1, 1024]; got 100000 (training runs started at once)"),
    (["--runs-dir", ""], "argument --runs-dir: must name a file or folder; got an empty string"),
    (["--seeds", "0", "0"], "error: --seeds 0 0: seed 0 is given more than once; list each seed once (e.g. --seeds 0)"),
    (["--seeds", "2", "1", "2", "1", "--dry-run"], "seeds 1, 2 are given more than once"),
    (["--gpus", "0,,1"], "--gpus: '0,,1'"),
    (["--gpus", "0,1,0"], "argument --gpus: '0,1,0': GPU 0 is listed twice; list each GPU once"),
    (["--gpus", "0,1", "--jobs", "2"], "--jobs is for runs on the CPU"),
    (["--partition", "gpu"], "--partition: for --launcher slurm only"),
    (["--launcher", "slurm", "--gpus", "0,1"], "--gpus: for --launcher local only"),
    (["--launcher", "slurm", "--gpus-per-run", "0"], "argument --gpus-per-run: must be >= 1; got 0"),
    (["--launcher", "slurm", "--cpus-per-run", "-2"], "argument --cpus-per-run: must be >= 1; got -2"),
    (["--launcher", "slurm", "--mem-gb", "0"], "argument --mem-gb: must be >= 1; got 0"),
    (["--launcher", "slurm", "--array-parallelism", "0"], "argument --array-parallelism: must be >= 1"),
    (["--launcher", "slurm", "--max-requeues", "-1"], "argument --max-requeues: must be >= 0; got -1"),
    (["--launcher", "slurm", "--time", "soon"], "--time: 'soon'"),
    (["--launcher", "slurm", "--time", "0"], "--time: '0'"),
    (["--launcher", "slurm", "--time", "2", "--signal-delay", "120"], "--signal-delay 120 s is not shorter"),
    (["--extra=--lr 'x", "--dry-run"], "--extra=\"--lr 'x\": No closing quotation"),
    (["--extra=--bogus 3", "--dry-run"], "unrecognized arguments: --bogus 3"),
    (["--extra=--lr -1", "--dry-run"], "argument --lr: must be >= 0"),
    (["--extra=--seed 7", "--dry-run"], "sets --seed, which reproduce.py sets"),
    (["--extra=--out /tmp/x --tag y", "--dry-run"], "sets --out, --tag, which reproduce.py sets"),
    # (argparse said "--eval-only: not allowed with argument --resume", a flag the user never gave)
    (["--extra=--eval-only x.pt", "--dry-run"], "--eval-only is not a training flag: it evaluates a checkpoint and "
     "trains nothing, and reproduce.py trains every run (it adds --resume auto itself)"),
    (["--extra=--eval-only=x.pt"], "--eval-only is not a training flag"),
    (["--extra=--eval-on x.pt"], "--eval-only is not a training flag"),              # (argparse's abbreviation)
])
def test_bad_arguments_are_one_line_before_anything_runs(argv, named, tmp_path, capsys, monkeypatch):
    no_training(monkeypatch)
    line = error_line(["smoke", "--runs-dir", str(tmp_path), *argv], capsys)
    assert named in line, line
    assert list(tmp_path.iterdir()) == []                 # nothing created


def test_the_folder_check_creates_nothing(tmp_path):
    """The table folders are checked, not created: a command refused by a later check leaves no empty folder
    behind (the runs create theirs when they start)."""
    runs, _ = reproduce.plan(TABLES["smoke"], [0], tmp_path / "new" / "runs", {})
    assert reproduce.check_folders(runs, tmp_path / "new" / "runs") is None
    assert list(tmp_path.iterdir()) == []


def test_unwritable_runs_dir_is_one_line(tmp_path, capsys, monkeypatch):
    no_training(monkeypatch)
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    for dry_run in ([], ["--dry-run"]):                     # (a dry run would list runs that cannot start)
        line = error_line(["smoke", "--runs-dir", str(a_file), *dry_run], capsys)
        assert line == f"error: --runs-dir {a_file} is a file, not a folder; choose another --runs-dir", line
    line = error_line(["smoke", "--runs-dir", str(a_file / "runs")], capsys)
    assert line.startswith(f"error: --runs-dir {a_file / 'runs'}: cannot write {a_file / 'runs'}"), line
    (tmp_path / "runs" / "smoke").mkdir(parents=True)
    (tmp_path / "runs" / "smoke" / "dml-resnet20-s1").write_text("in the way")
    line = error_line(["smoke", "--runs-dir", str(tmp_path / "runs")], capsys)
    assert line.startswith(f"error: {tmp_path / 'runs' / 'smoke' / 'dml-resnet20-s1'} is a file"), line
    assert a_file.read_text() == "keep"
    a_run = tmp_path / "a_run"                                # a run directory: its runs would lie inside it
    a_run.mkdir()
    for name in (".lock", "results.json"):
        (a_run / name).write_text("")
    line = error_line(["smoke", "--runs-dir", str(a_run / "tables")], capsys)
    assert line == (f"error: --runs-dir {a_run / 'tables'} lies inside the run directory {a_run}; choose another "
                    "--runs-dir"), line
    assert sorted(p.name for p in a_run.iterdir()) == [".lock", "results.json"]
    # run_local on its own: a run folder it cannot create is that run's failure, in one line
    run = reproduce.Run("t", "baseline-resnet20", "train_baseline.py", ["--arch", "resnet20"], 0, a_file / "r", [])
    lines = []
    outcome = reproduce.run_local([run], log=lines.append)
    assert outcome["failed"] == [run] and lines == [f"FAILED (cannot write {a_file / 'r'}: Not a directory): {a_file / 'r'}"]


@pytest.mark.slow
@pytest.mark.parametrize("jobs", [1, 2])
def test_a_run_that_fails_before_it_starts_leaves_no_empty_folder(tmp_path, jobs):
    """A run that stops before writing anything (here: its dataset is missing) leaves no empty run folder behind;
    with several jobs its folder keeps the train.log that says why."""
    runs = [reproduce.Run("t", "baseline-resnet20", "train_baseline.py", ["--arch", "resnet20", "--data",
                                                                           str(tmp_path / "no_data"), "--gpu", "-1"],
                          0, tmp_path / "runs" / f"r{i}", []) for i in range(jobs)]
    outcome = reproduce.run_local(runs, jobs=jobs, log=lambda *_: None)
    assert sorted(r.out for r in outcome["failed"]) == [r.out for r in runs]
    for run in runs:
        assert (sorted(p.name for p in run.out.iterdir()) == ["train.log"]) if jobs > 1 else not run.out.exists()


# ---- a run folder that holds a run trained with other flags ------------------------------------------------------
def engine_record(run: reproduce.Run, extra=(), epochs_done=None) -> dict:
    """results.json as the engine writes it for ``run`` trained with ``extra`` (its resolved arguments)."""
    args = reproduce.command_config(run, list(extra)).as_dict()
    done = args["epochs"] if epochs_done is None else epochs_done
    return {"status": "finished" if done >= args["epochs"] else "interrupted", "epochs_done": done,
            "epochs": args["epochs"], "world_size": 1, "args": args, "history": [], "best": None}


def checkpoint_of(run: reproduce.Run, record: dict) -> None:
    """``run``'s last.pt holding ``record`` (:func:`engine_record`), as a checkpoint holds its run's record: all
    that the engine's checks before a resume read of it."""
    atomic_save({"format": FORMAT, "method": reproduce.method_class(run.script).name, "epoch": record["epochs_done"],
                 "state": {}, **record}, run.out / "last.pt")


def test_run_trained_with_other_flags_is_reported_not_resumed(tmp_path, capsys, monkeypatch):
    """smoke with --extra="--subset 64 --epochs 1" wrote into the table's folder: the plain command (no --extra)
    lists the run as "differs" (not "resume"), refuses to start in one line instead of a failed resume, and
    summarize marks its numbers; the command with the same --extra still sees it finished."""
    no_training(monkeypatch)
    runs, _ = reproduce.plan(TABLES["smoke"], [0], tmp_path, {"method": ["dml"]})
    run = runs[0]
    short = ["--subset", "64", "--epochs", "1", "--gpu", "-1", "--no-progress"]
    run.out.mkdir(parents=True)
    (run.out / "results.json").write_text(json.dumps(engine_record(run, short)))
    checkpoint_of(run, engine_record(run, short))
    assert reproduce.run_state(run, short) == "finished"
    assert reproduce.run_state(run, ["--gpu", "0", "--workers", "2"]) == \
        "differs: --subset 64 (this command: 512), --epochs 1 (this command: 2)"
    assert reproduce.run_state(run, ["--subset", "64", "--epochs", "3", "--extend-epochs"]) == "resume"
    assert reproduce.run_state(run, short, world_size=2) == "differs: world size 1 (this command: 2)"

    base = ["smoke", "--only", "method=dml", "--seeds", "0", "--runs-dir", str(tmp_path)]
    assert reproduce.main(base + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--resume auto  # differs: --subset 64 (this command: 512), --epochs 1 (this command: 2); DML" in out
    line = error_line(base, capsys)
    assert line.startswith(f"error: 1 run folder(s) under {tmp_path} hold runs trained with other training flags "
                           "than this command (dml-resnet20-s0: --subset 64 (this command: 512), --epochs 1 "
                           "(this command: 2)): re-run with the --extra they were trained with"), line
    assert reproduce.main(base + ["--extra=" + " ".join(short)]) == 0          # finished: skipped, nothing run
    assert "skip (finished)" in capsys.readouterr().out
    outcome = reproduce.run_local(runs, log=lambda *_: None)                  # the launcher alone never starts it
    assert outcome["differs"] == [run] and not outcome["failed"]

    assert summarize.main([str(tmp_path), "--table", "smoke"]) == 0
    out = capsys.readouterr().out
    assert "other flags in s0: --subset 64 (table: 512), --epochs 1 (table: 2)" in out
    on_two = {**engine_record(run, short), "world_size": 2}       # trained by --launcher slurm --gpus-per-run 2
    (run.out / "results.json").write_text(json.dumps(on_two))
    checkpoint_of(run, on_two)
    line = error_line(base + ["--extra=" + " ".join(short)], capsys)           # the local launcher: 1 process
    assert "(dml-resnet20-s0: world size 2 (this command: 1)): re-run with the --extra and the launcher (--launcher, " \
           "--gpus-per-run) they were trained with" in line, line


def test_a_damaged_last_pt_is_refused_not_resumed(tmp_path, capsys, monkeypatch):
    """An interrupted run whose last.pt was damaged since: --dry-run once listed it as "resume" and the launcher
    started a process that failed on it; it is "refused" with the engine's line, and nothing is started."""
    no_training(monkeypatch)
    run = reproduce.plan(TABLES["smoke"], [0], tmp_path, {"method": ["dml"]})[0][0]
    run.out.mkdir(parents=True)
    (run.out / "results.json").write_text(json.dumps(engine_record(run, epochs_done=1)))
    checkpoint_of(run, engine_record(run, epochs_done=1))
    assert reproduce.run_state(run) == "resume"
    saved = (run.out / "last.pt").read_bytes()   # one word changed, as a flipped bit changes it: the file still
    assert saved.count(b"interrupted") == 1       # loads, its content no longer matches its checksum (a byte in
    (run.out / "last.pt").write_bytes(saved.replace(b"interrupted", b"interruptex"))   # the zip's padding would not)
    state = reproduce.run_state(run)
    assert state.startswith(f"refused: checkpoint {run.out / 'last.pt'} ") and "damaged" in state, state
    base = ["smoke", "--only", "method=dml", "--seeds", "0", "--runs-dir", str(tmp_path)]
    assert reproduce.main(base + ["--dry-run"]) == 0
    assert "# refused: checkpoint" in capsys.readouterr().out
    assert error_line(base, capsys).startswith(f"error: checkpoint {run.out / 'last.pt'} ")


def test_a_run_of_another_script_or_held_by_another_process_is_named(tmp_path, capsys, monkeypatch):
    """A cell's folder holding another script's run is "differs: a run of train_dml.py" (no --extra continues it);
    one that another process trains (a second reproduce.py) is "busy", skipped and said so, never "failed"."""
    from engine.run import RunLock
    no_training(monkeypatch)
    runs, _ = reproduce.plan(TABLES["smoke"], [0], tmp_path, {"method": ["baseline", "dml"]})
    baseline, dml = sorted(runs, key=lambda r: r.script)
    baseline.out.mkdir(parents=True)
    (baseline.out / "results.json").write_text(json.dumps({**engine_record(dml), "method": "dml"}))
    assert reproduce.run_state(baseline) == "differs: a run of train_dml.py"
    line = error_line(["smoke", "--only", "method=baseline", "--seeds", "0", "--runs-dir", str(tmp_path)], capsys)
    assert line == (f"error: 1 run folder(s) under {tmp_path} hold runs this command would not continue "
                    "(baseline-resnet20-s0: a run of train_dml.py): move those folders away (or choose another "
                    "--runs-dir) to train the table's command; a run trained with other flags continues when re-run "
                    "with them")
    lock = RunLock(dml.out, "python train_dml.py ...").acquire()       # another process trains it
    try:
        assert reproduce.run_state(dml).startswith(f"busy: {dml.out} is in use by process {os.getpid()}")
        outcome = reproduce.run_local([dml], log=lambda *_: None)
        assert outcome["busy"] == [dml] and not outcome["failed"]
        assert reproduce.main(["smoke", "--only", "method=dml", "--seeds", "0", "--runs-dir", str(tmp_path)]) == 1
        out = capsys.readouterr().out
        assert f"not run (busy: {dml.out} is in use by process {os.getpid()}" in out and "1 busy" in out
        assert "the busy runs are trained by another process" in out
        lines = []                                                       # on SLURM: named, not submitted
        assert reproduce.submit_slurm([dml], slurm_opts(), tmp_path / "submitit", log=lines.append) == []
        assert lines[0].startswith(f"not submitted (busy: {dml.out} is in use by process {os.getpid()}")
        assert lines[1] == "nothing to submit: every selected run is finished, busy or not built"
    finally:
        lock.release()
    # a lock held after its holder ended (a network file system), or one that cannot be read, is no busy run:
    # the engine's own line says what is wrong, in the run's log
    from engine.errors import UserError
    for problem in ("locked by process 1, which is no longer running", "cannot read .lock: Permission denied"):
        def check_free(self, line=problem):
            raise UserError(line)
        monkeypatch.setattr(RunLock, "check_free", check_free)
        assert reproduce.run_state(dml) == "new"


def test_a_run_folder_the_engine_would_refuse_is_named_before_anything_runs(tmp_path, capsys, monkeypatch):
    """A cell's folder where the engine would start no run (here: an earlier run's best.pt, its last.pt deleted)
    is "refused: <the engine's line>": --dry-run says so, and the launch stops with that line before any run
    starts (it was "new", and the run failed in its log)."""
    no_training(monkeypatch)
    runs, _ = reproduce.plan(TABLES["smoke"], [0], tmp_path, {"method": ["dml"]})
    [dml] = runs
    dml.out.mkdir(parents=True)
    (dml.out / "best.pt").write_bytes(b"an earlier run's weights")
    engine_line = (f"{dml.out} holds best.pt of an earlier run but no last.pt to continue it from; start this run "
                   "with another --out (or move that folder away); nothing is overwritten.")
    assert reproduce.run_state(dml) == f"refused: {engine_line}"
    argv = ["smoke", "--only", "method=dml", "--seeds", "0", "--runs-dir", str(tmp_path)]
    assert reproduce.main(argv + ["--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[1].endswith(f"# refused: {engine_line}; DML / ResNet-20")
    assert error_line(argv, capsys) == (f"error: {engine_line} [reproduce.py sets each run's --out: move {dml.out} "
                                        "away, or give another --runs-dir]")
    outcome = reproduce.run_local(runs, log=lambda *_: None)                  # the launcher alone never starts it
    assert outcome["refused"] == [dml] and not outcome["failed"]
    assert sorted(p.name for p in dml.out.iterdir()) == ["best.pt"]


def test_a_run_taken_by_another_process_while_queued_is_skipped(tmp_path, monkeypatch):
    """Each run's state is read again when its turn comes: one another process took meanwhile is "busy"."""
    from engine.run import RunLock
    runs, _ = reproduce.plan(TABLES["smoke"], [0], tmp_path, {"method": ["baseline", "dml"]})
    first, second = runs
    taken = []

    class Finished:                 # the first run: while it trains, another process takes the second one
        returncode = 0

        def __init__(self, cmd, **kwargs):
            taken.append(RunLock(second.out, "another reproduce.py").acquire())

        def poll(self):
            return 0
    monkeypatch.setattr(subprocess, "Popen", Finished)
    try:
        outcome = reproduce.run_local(runs, log=lambda *_: None)
    finally:
        for lock in taken:
            lock.release()
    assert (outcome["finished"], outcome["busy"], outcome["failed"]) == ([first], [second], [])


def test_engine_record_of_the_command_is_not_a_difference(tmp_path):
    """No false alarm: for every built cell of a table, the record of its own command (with flags that do not
    change training) matches, so finished runs are skipped and unfinished ones resumed."""
    for table in ("smoke", "pcl-cifar100", "mcl-okd-imagenet"):
        runs, _ = reproduce.plan(TABLES[table], [1], tmp_path)
        for run in [r for r in runs if r.built]:
            extra = ["--gpu", "-1", "--workers", "0", "--data", "/data", "--no-progress", "--channels-last"]
            assert reproduce.recorded_differences(run, engine_record(run, extra)) == [], run.name
            run.out.mkdir(parents=True)
            (run.out / "results.json").write_text(json.dumps(engine_record(run, epochs_done=1)))
            checkpoint_of(run, engine_record(run, epochs_done=1))
            assert reproduce.run_state(run) == "resume"


def test_tables_py_has_a_help_and_lists_the_tables():
    """``python scripts/tables.py --help`` says what the file is (it printed nothing and exited 0); without flags
    it lists the tables, and a flag it does not take is one line, status 2, as for every tool."""
    def tables_py(*argv):
        return subprocess.run([sys.executable, "scripts/tables.py", *argv], cwd=reproduce.REPO, capture_output=True,
                              text=True, timeout=120)
    shown = tables_py("--help")
    assert shown.returncode == 0 and shown.stdout.startswith("usage:") and "reproduce.py" in shown.stdout
    listed = tables_py()
    assert listed.returncode == 0 and [line.split()[0] for line in listed.stdout.splitlines()] == list(TABLES)
    refused = tables_py("--bogus")
    assert refused.returncode == 2 and refused.stderr == ("scripts/tables.py: error: unrecognized arguments: --bogus "
                                                          "(--help lists the options)\n")


@pytest.mark.parametrize("argv, named", [
    (["smoke", "--list"], "error: --list lists every table, not one: leave out smoke, or leave out --list"),
    (["smoke", "--markdown"], "error: --markdown prints the page of every paper table, not one: leave out smoke"),
    (["--list", "--markdown"], "error: --list and --markdown print different things; give one of them"),
])
def test_list_or_markdown_with_what_they_do_not_take_is_refused(argv, named, capsys):
    """``reproduce.py smoke --list`` listed every table, the name ignored without a word (and --list --markdown
    printed the list alone): one line now, status 2."""
    assert error_line(argv, capsys).startswith(named)
    assert reproduce.main(["--list"]) == 0 and "smoke" in capsys.readouterr().out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_the_launcher_stopped_by_a_signal_exits_128_plus_its_number(sig, tmp_path, capsys, monkeypatch):
    """A launcher stopped by SIGTERM exits 143 and by SIGHUP 129, as a training run does (128 + the signal's
    number; README); it exited 130 for every signal."""
    from engine.signals import Interrupted
    monkeypatch.setattr(reproduce, "run_state", lambda *a, **k: "new")

    class Training:          # a training process whose launcher is stopped by ``sig`` while it waits for it
        def __init__(self, *args, **kwargs):
            self.polls = 0

        def poll(self):
            self.polls += 1
            if self.polls == 1:
                raise Interrupted(sig.name)
            return 0

        def wait(self, timeout=None):
            return 0
    monkeypatch.setattr(reproduce.subprocess, "Popen", Training)
    code = reproduce.main(["smoke", "--only", "method=dml", "--seeds", "0", "--runs-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 128 + sig.value and f"interrupted ({sig.name})" in out, out
