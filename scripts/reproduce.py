#!/usr/bin/env python
"""Re-run a published table: every cell as one run per seed, locally or on a SLURM cluster.

Usage::

    python scripts/reproduce.py --list                                  # the tables
    python scripts/reproduce.py mcl-okd-cifar100 --seeds 0 1 2 --dry-run     # print every command
    python scripts/reproduce.py mcl-okd-cifar100 --only method=dml,mcl_okd arch=resnet32
    python scripts/reproduce.py pcl-cifar100 --gpus 0,1,2,3             # a queue: one run per GPU
    python scripts/reproduce.py cmff-cifar100 --launcher slurm --partition gpu --time 24:00:00
    python scripts/summarize.py runs --table mcl-okd-cifar100           # the table, paper next to ours

The tables and the flags of each cell are in ``scripts/tables.py``. Run ``s`` of a cell goes to
``RUNS_DIR/<table>/<run>-s<s>/`` with ``--seed s --tag <table>/<run> --resume auto``, so:

* a finished run (``results.json`` status "finished" with all its epochs) is skipped;
* an unfinished one (interrupted, killed, pre-empted) continues from its ``last.pt``;
* Ctrl-C (or SIGTERM, SIGHUP) stops the runs in flight after their checkpoint and leaves each one resumable:
  re-run the same command to continue; the launcher exits 128 + the signal's number (130, 143, 129), as a
  training run does;
* a folder that holds a run trained with other training flags than the command (``--extra`` flags that change
  training, e.g. a shortened ``--subset 64 --epochs 1`` check) is reported as "differs: <flags>" and never
  started (the engine would refuse to resume it): run it with the same ``--extra``, or move it away; so is one
  that holds another script's run ("differs: a run of train_dml.py"), and one where the engine would start no
  run or continue none, e.g. one holding an earlier run's best.pt without its last.pt, or a damaged last.pt
  ("refused: <the engine's line>");
* a run another process trains (a second reproduce.py) is "busy": skipped, also when it is taken while queued.

A cell whose method script does not exist yet is listed as "not built" and never run; it becomes live as
soon as ``train_<method>.py`` lands. ``--launcher slurm`` submits one job-array task per run through
submitit; a task that is pre-empted or reaches its time limit is re-queued and continues with
``--resume auto`` (``--max-requeues`` times).
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":     # run as a file: the repository's packages are one folder up (imported: already found)
    sys.path.insert(0, str(REPO))

from data.files import holds_run  # noqa: E402
from engine.cli import (Parser, non_empty_path, non_negative_int, number, positive_int, process_count,  # noqa: E402
                        run_tool)
from engine.signals import stop_on_signals, stop_signal  # noqa: E402
from scripts.tables import PAPER_TABLES, TABLES, Cell, Table  # noqa: E402

FILTER_KEYS = ("method", "arch", "row", "column", "run")


# ---- run specifications ----------------------------------------------------------------------------------------
@dataclass
class Run:
    """One training run: a cell's command at one seed."""
    table: str          # the table whose folder holds it (a cell with runs_table reads another table's runs)
    name: str           # run name inside that folder
    script: str
    argv: list          # the cell's flags (--arch ... ), without seed/out/tag/resume
    seed: int
    out: Path
    cells: list         # "row / column" labels of the cells it serves

    @property
    def tag(self) -> str:
        return f"{self.table}/{self.name}"

    @property
    def built(self) -> bool:
        return (REPO / self.script).is_file()

    def train_argv(self) -> list[str]:
        """Flags of the script: the cell's, then seed, run directory, tag and --resume auto."""
        return [*self.argv, "--seed", str(self.seed), "--out", display_path(self.out), "--tag", self.tag,
                "--resume", "auto"]

    def command(self, python: str = "python", extra: Sequence[str] = ()) -> list[str]:
        return [python, self.script, *self.train_argv(), *extra]


def display_path(path: Path) -> str:
    """``path`` relative to the repository (commands run from its root) when it is inside it."""
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def parse_only(tokens: Optional[Sequence[str]]) -> dict[str, list[str]]:
    """``method=dml,one arch=resnet32`` -> {"method": ["dml", "one"], "arch": ["resnet32"]}.
    Pairs are separated by spaces or commas; inside one word, a comma-separated value without '=' is one more
    value of the key before it. Values are shell patterns (``arch=resnet*``). A word that is not KEY=VALUE, or
    an unknown key, raises ValueError."""
    wanted: dict[str, list[str]] = {}
    for token in tokens or ():
        key = None
        for word in filter(None, token.split(",")):
            if "=" in word:
                key, value = word.split("=", 1)
                if key not in FILTER_KEYS:
                    raise ValueError(f"--only {key}=...: the keys are {', '.join(FILTER_KEYS)}")
            elif key is None:
                raise ValueError(f"--only {word!r}: write KEY=VALUE, e.g. method=dml,arch=resnet32")
            else:
                value = word
            wanted.setdefault(key, []).append(value)
    return wanted


def matches(cell: Cell, wanted: dict[str, list[str]]) -> bool:
    fields = {"method": cell.method, "arch": cell.arch, "row": cell.row, "column": cell.column, "run": cell.run}
    return all(any(fnmatch.fnmatch(fields[k].lower(), v.lower()) for v in values) for k, values in wanted.items())


def plan(table: Table, seeds: Sequence[int], runs_dir: Path, only: Optional[dict] = None) -> tuple[list[Run], list]:
    """The runs a table needs (one per distinct run name and seed, in table order) and the selected cells."""
    cells = [c for c in table.cells if matches(c, only or {})]
    runs: dict[tuple, Run] = {}
    for c in cells:
        folder = c.runs_table or table.name
        for seed in seeds:
            key = (folder, c.run, seed)
            if key not in runs:
                runs[key] = Run(folder, c.run, c.script, c.argv, seed, runs_dir / folder / f"{c.run}-s{seed}", [])
            runs[key].cells.append(f"{c.row} / {c.column}")
    return list(runs.values()), cells


# ---- the state of a run on disk --------------------------------------------------------------------------------
def method_class(script: str):
    """The Method subclass a ``train_<name>.py`` hands to the engine (engine.method.load_method)."""
    from engine.method import load_method
    return load_method(Path(script).stem.removeprefix("train_"))


def parse_run_args(run: Run, extra: Sequence[str] = ()):
    """The run's arguments as its script parses them (raises SystemExit on a bad flag, as argparse does)."""
    from engine.cli import parse_args
    return parse_args(method_class(run.script), run.train_argv() + list(extra))


_OPTIONS: dict[tuple, object] = {}


def command_config(run: Run, extra: Sequence[str] = ()):
    """The resolved configuration (engine.config.RunConfig) of the command that trains ``run`` with ``extra``,
    as the engine resolves it (recipe, preset, method defaults). Raises SystemExit (a bad flag, argparse's
    line) or engine.errors.UserError (flags that conflict)."""
    key = (run.script, tuple(run.argv), run.seed, tuple(extra))
    if key not in _OPTIONS:
        import warnings
        from engine.config import resolve
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")            # the script warns once, when it runs
            _OPTIONS[key] = resolve(method_class(run.script), parse_run_args(run, extra))
    return _OPTIONS[key]


def recorded_differences(run: Run, recorded: dict, extra: Sequence[str] = (),
                         world_size: int = 1) -> list[tuple[str, object, object]]:
    """The training options on which a run's ``results.json`` (``recorded``) differs from the command that
    trains ``run`` with ``extra`` on ``world_size`` processes, as (option, recorded value, command's value):
    the engine's own comparison before it resumes a run (engine.config.recorded_differences), so a run
    reported here is one the command would refuse to continue."""
    from engine.config import recorded_differences as differences
    return differences(method_class(run.script), command_config(run, extra), recorded, world_size)


def run_state(run: Run, extra: Sequence[str] = (), world_size: int = 1) -> str:
    """"not built"; "busy: <who>" (another process trains it now, e.g. a second reproduce.py); "differs:
    <flags>" (the folder holds a run of another script, or one trained with other training flags than this
    command: the engine would refuse to resume it, and a finished one is not the table's number); "finished";
    "resume" (a last.pt the engine would continue from); "refused: <the engine's line>" (a folder where the
    engine would start or continue no run: a damaged last.pt, an earlier run's best.pt without its last.pt); or
    "new"."""
    if not run.built:
        return "not built"
    from engine.checkpoint import saved_by
    from engine.config import describe_differences
    from engine.errors import UserError
    from engine.run import Run as RunFolder
    from engine.run import RunInUse, RunLock, read_run
    try:
        RunLock(run.out).check_free()
    except RunInUse as e:
        return f"busy: {e}"
    except UserError:
        pass        # (a lock file it cannot read, one held after its holder ended: the engine says so, in its log)
    recorded = read_run(run.out)
    if recorded is not None and recorded.get("method") not in (None, method_class(run.script).name):
        return f"differs: a run of {saved_by(recorded)}"
    if recorded is not None:
        diffs = recorded_differences(run, recorded, extra, world_size)
        if diffs:
            return "differs: " + describe_differences(diffs, hint=False)
        epochs = command_config(run, extra).epochs
        if recorded.get("status") == "finished" and recorded.get("epochs_done", 0) >= epochs:
            return "finished"
    try:            # the engine's own checks, the lock's aside (read above): a damaged last.pt is refused here
        folder = RunFolder(run.out, method_class(run.script), command_config(run, extra), [], world_size)
        return "new" if folder.check(before_lock=False) is None else "resume"
    except UserError as e:
        return f"refused: {e}"


# ---- local launcher --------------------------------------------------------------------------------------------
def _stop(procs: dict) -> None:
    """Ctrl-C: one SIGINT to each training process (the engine then exits, its last.pt intact), then wait
    (a second Ctrl-C is ignored meanwhile, so no run is left behind; after 2 minutes a run is killed, which
    loses at most its current epoch)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    deadline = time.time() + 120
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    signal.signal(signal.SIGINT, signal.default_int_handler)


def say(text: str) -> None:
    print(text, flush=True)      # in order with the training processes' own output


def run_local(runs: Sequence[Run], gpus: Optional[list[str]] = None, jobs: int = 1, extra: Sequence[str] = (),
              python: str = sys.executable, log=say) -> dict[str, list]:
    """Run every built, unfinished run: one after another, or ``jobs`` at a time (one per GPU of ``gpus``); a run
    another process trains (or has finished) by the time its turn comes is skipped, "busy" (or "skipped").

    Each run is its own process (``python train_x.py ... --resume auto``) started in its own session, so Ctrl-C
    reaches this launcher only; it forwards one SIGINT to every run in flight and returns once they have
    stopped (main() makes SIGTERM and SIGHUP a KeyboardInterrupt too: engine.signals.stop_on_signals). With one
    job the run's output goes to the terminal, otherwise to ``<run>/train.log``. A run whose folder holds a run
    trained with other flags ("differs"), or that the engine would refuse ("refused"), is never started (main()
    refuses those up front).
    Returns {"finished": [...], "skipped": [...], "busy": [...], "failed": [...], "not built": [...],
    "differs": [...], "refused": [...], "interrupted": [...], "not started": [...]} (the last two after a Ctrl-C),
    and after a stop signal "signal": [its name] (SIGINT, SIGTERM, SIGHUP).
    """
    outcome: dict[str, list] = {k: [] for k in ("finished", "skipped", "busy", "failed", "not built", "differs",
                                                "refused", "interrupted", "not started")}
    slots = list(gpus) if gpus else [None] * max(1, jobs)
    queue = []
    for run in runs:
        state = run_state(run, extra)
        if state == "not built":
            outcome["not built"].append(run)
        elif state == "finished":
            outcome["skipped"].append(run)
            log(f"skip (finished): {display_path(run.out)}")
        elif state.startswith(("differs", "busy", "refused")):
            outcome[state.split(":")[0]].append(run)
            log(f"not run ({state}): {display_path(run.out)}")
        else:
            queue.append((run, state))
    procs: dict[subprocess.Popen, tuple] = {}
    free = list(slots)
    made: set[Path] = set()        # run folders made here (for train.log): removed if a failed run left them empty
    try:
        while queue or procs:
            while queue and free:
                run, state = queue.pop(0)
                state = run_state(run, extra)       # again: another process may have taken or finished it since
                if state == "finished" or state.startswith("busy"):
                    outcome["skipped" if state == "finished" else "busy"].append(run)
                    log(f"skip ({state}): {display_path(run.out)}")
                    continue
                slot = free.pop(0)
                env = dict(os.environ)
                if slot is None and len(slots) > 1:   # CPU runs side by side: share the cores
                    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(slots))))
                args = []
                if slot is not None:
                    env["CUDA_VISIBLE_DEVICES"] = str(slot)
                    args += ["--gpu", "0"]
                if len(slots) > 1:
                    args += ["--no-progress"]
                args += extra           # last: the user's flags win
                cmd = run.command(python, args)
                stream = None
                try:
                    if not run.out.exists():
                        made.add(run.out)
                    run.out.mkdir(parents=True, exist_ok=True)
                    if len(slots) > 1:
                        stream = open(run.out / "train.log", "a")
                except OSError as e:
                    outcome["failed"].append(run)
                    free.append(slot)
                    log(f"FAILED (cannot write {e.filename or run.out}: {e.strerror or e}): {display_path(run.out)}")
                    continue
                where = f" on GPU {slot}" if slot is not None else ""
                log(f"{'resume' if state == 'resume' else 'start'}{where}: {shlex.join(cmd[1:])}")
                proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=stream, stderr=subprocess.STDOUT if stream
                                        else None, start_new_session=True, preexec_fn=_interruptible)
                procs[proc] = (run, slot, stream)
            done = [p for p in procs if p.poll() is not None]
            if not done:
                time.sleep(0.2)
            for proc in done:
                run, slot, stream = procs.pop(proc)
                if stream:
                    stream.close()
                free.append(slot)
                if proc.returncode == 0:
                    outcome["finished"].append(run)
                    log(f"finished: {display_path(run.out)}")
                elif run_state(run, extra).startswith("busy"):     # another process took it in the meantime
                    outcome["busy"].append(run)
                    log(f"skip (busy: another process took it first): {display_path(run.out)}")
                else:
                    outcome["failed"].append(run)
                    if run.out in made:
                        with contextlib.suppress(OSError):    # (only an empty folder: a train.log stays)
                            run.out.rmdir()
                    where = f"; its output is in {display_path(run.out / 'train.log')}" if stream else ""
                    log(f"FAILED (exit {proc.returncode}): {display_path(run.out)}{where}")
    except KeyboardInterrupt as e:
        log(f"\ninterrupted ({stop_signal(e)}): stopping {len(procs)} run(s); each keeps its last finished epoch in "
            "last.pt ...")
        _stop(list(procs))
        for run, _, stream in procs.values():
            if stream:
                stream.close()
            outcome["finished" if run_state(run, extra) == "finished" else "interrupted"].append(run)
        outcome["not started"] += [run for run, _ in queue]
        outcome["signal"] = [stop_signal(e) or "SIGINT"]       # (main's exit status: 128 + its number)
    return outcome


def _interruptible() -> None:
    """In a training process, before it starts: SIGINT at its default (Python's KeyboardInterrupt), with which the
    launcher stops it, also where the launcher was started ignoring SIGINT (a background job of a script is, and
    its processes inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# ---- SLURM launcher (submitit) ---------------------------------------------------------------------------------
def _training_signals() -> None:
    """In a SLURM job's training process, before it starts: SLURM's warning signal (USR2) is submitit's to handle,
    so the training process ignores it; checkpoint() stops it with SIGINT (:func:`_interruptible`)."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    _interruptible()


class TrainRun:
    """A submitit job: one training process (``--resume auto``); re-queued on pre-emption or time-out.

    ``checkpoint`` is what submitit calls when SLURM signals the end of the job's time or a pre-emption: it asks
    the training process to stop (SIGINT; its last.pt is the last finished epoch) and returns the same job,
    which submitit re-queues; the re-queued job continues the run from its last.pt.
    """

    def __init__(self, command: list[str], cwd: str, log_path: str):
        self.command, self.cwd, self.log_path = command, cwd, log_path
        self._proc = None
        self._requeued = False      # checkpoint() stopped the training for a requeue

    def __call__(self) -> int:
        with open(self.log_path, "a") as log:
            self._proc = subprocess.Popen(self.command, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                          preexec_fn=_training_signals)
            code = self._proc.wait()
        if code != 0 and not self._requeued:   # a clean stop for the requeue is not a failure
            raise RuntimeError(f"{shlex.join(self.command)} exited with {code}; its output is in {self.log_path}")
        return code

    def checkpoint(self, *args, **kwargs):
        import submitit
        if self._proc is not None and self._proc.poll() is None:
            self._requeued = True
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        fresh = TrainRun(self.command, self.cwd, self.log_path)
        return submitit.helpers.DelayedSubmission(fresh)

    def __getstate__(self):
        return {"command": self.command, "cwd": self.cwd, "log_path": self.log_path}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._proc, self._requeued = None, False


def parse_minutes(text: str) -> int:
    """SLURM's time formats (sbatch(1) ``--time``): ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M`` or ``D-H:M:S``
    -> minutes (rounded up). Two numbers are minutes and seconds without a day, hours and minutes after one."""
    days, clock = text.split("-", 1) if "-" in text else ("0", text)
    parts = [int(p) for p in clock.split(":")]
    if len(parts) > 3:
        raise ValueError(text)
    if "-" in text:
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    else:
        hours, minutes, seconds = 0, parts[0], (parts + [0])[1]
    return int(days) * 1440 + hours * 60 + minutes + (1 if seconds else 0)


def slurm_options(args: argparse.Namespace, table: str) -> argparse.Namespace:
    """The parsed command line plus ``time_min`` and ``job_name``."""
    opts = argparse.Namespace(**vars(args))
    opts.time_min = parse_minutes(args.time)
    opts.job_name = args.job_name or f"okd-{table}"
    return opts


def slurm_executor(folder: Path, opts: argparse.Namespace, cluster: str = "slurm"):
    """A submitit executor with the job options. ``cluster`` is always "slurm" from the command line (never
    submitit's silent fall-back to local processes); the tests pass "debug" or "local"."""
    import submitit
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster, slurm_max_num_timeout=opts.max_requeues)
    params = dict(timeout_min=opts.time_min, gpus_per_node=opts.gpus_per_run, tasks_per_node=1, nodes=1,
                  cpus_per_task=opts.cpus_per_run, name=opts.job_name)
    if opts.mem_gb:
        params["mem_gb"] = opts.mem_gb
    slurm = dict(slurm_partition=opts.partition, slurm_account=opts.account, slurm_qos=opts.qos,
                 slurm_constraint=opts.constraint, slurm_array_parallelism=opts.array_parallelism,
                 slurm_setup=opts.setup or None, slurm_signal_delay_s=opts.signal_delay,
                 slurm_additional_parameters={"requeue": True})   # SLURM may re-queue it (pre-emption, node loss)
    params.update({k: v for k, v in slurm.items() if v is not None})
    executor.update_parameters(**params)
    return executor


def submit_slurm(runs: Sequence[Run], opts: argparse.Namespace, folder: Path, extra: Sequence[str] = (),
                 python: str = sys.executable, cluster: str = "slurm", log=say):
    """One job array, one task per unfinished built run that no process trains now (a busy run is named, not
    submitted). Returns the submitit jobs."""
    states = [(r, run_state(r, extra, opts.gpus_per_run)) for r in runs]
    for run, state in states:
        if state.startswith(("busy", "refused")):
            log(f"not submitted ({state}): {display_path(run.out)}")
    todo = [r for r, state in states if state in ("new", "resume")]
    if not todo:
        log("nothing to submit: every selected run is finished, busy or not built")
        return []
    executor = slurm_executor(folder, opts, cluster)
    jobs = []
    with executor.batch():
        for run in todo:
            run.out.mkdir(parents=True, exist_ok=True)
            if opts.gpus_per_run > 1:     # one torchrun process per GPU of the task (--batch-size is per GPU)
                command = [python, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={opts.gpus_per_run}", *run.command(python, ["--no-progress", *extra])[1:]]
            else:
                command = run.command(python, ["--gpu", "0", "--no-progress", *extra])
            jobs.append(executor.submit(TrainRun(command, str(REPO), str(run.out / "train.log"))))
    for run, job in zip(todo, jobs):
        log(f"submitted {job.job_id}: {display_path(run.out)}")
    return jobs


# ---- command line ----------------------------------------------------------------------------------------------
def _slurm_time(text: str) -> str:
    try:
        minutes = parse_minutes(text)
    except ValueError:
        minutes = 0
    if minutes <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: write a time limit above 0 as SLURM does: minutes, MM:SS, "
                                         "HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (e.g. 24:00:00)")
    return text


def _gpu_list(text: str) -> str:
    """``--gpus``: GPU indices (non-negative integers, as nvidia-smi numbers them) separated by commas or spaces,
    returned as ``0,1,2,3``. Anything else is refused in one line: CUDA_VISIBLE_DEVICES=a hides every GPU, so
    the runs would train on the CPU without a word."""
    pieces = [piece.split() for piece in text.split(",")]
    if not all(pieces):                          # '', '0,,1', '0,' : an index left out
        raise argparse.ArgumentTypeError(f"{text!r}: write the GPU indices separated by commas, e.g. 0,1,2,3")
    ids = [g for piece in pieces for g in piece]
    odd = [g for g in ids if not re.fullmatch(r"[0-9]+", g)]
    if odd:
        raise argparse.ArgumentTypeError(f"{text!r}: {odd[0]!r} is not a GPU index; write non-negative integers "
                                         "(as nvidia-smi numbers the GPUs) separated by commas, e.g. 0,1,2,3")
    repeated = sorted({int(g) for g in ids if [int(i) for i in ids].count(int(g)) > 1})
    if repeated:                                 # (two runs at once on one GPU would share its memory)
        raise argparse.ArgumentTypeError(f"{text!r}: GPU {repeated[0]} is listed twice; list each GPU once (one run "
                                         "at a time per GPU)")
    return ",".join(str(int(g)) for g in ids)


SEED = number(int, at_least=0, below=2 ** 32, why="the training scripts' --seed")
LOCAL_FLAGS = ("gpus", "jobs")
SLURM_FLAGS = ("partition", "account", "qos", "constraint", "time", "gpus_per_run", "cpus_per_run", "mem_gb",
               "array_parallelism", "max_requeues", "signal_delay", "setup", "job_name")
RESERVED = ("seed", "out", "tag", "resume")       # reproduce.py sets them per run


class _Added(argparse.Action):
    """``--extra=A --extra=B``: both flags (a later use once silently replaced the earlier; list options such as
    --only and --seeds add up likewise: engine.cli.Parser)."""

    def __call__(self, parser, namespace, values, option_string=None):
        before = getattr(namespace, self.dest)
        setattr(namespace, self.dest, f"{before} {values}" if before is not self.default else values)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
               epilog="tables: " + ", ".join(TABLES))
    p.add_argument("table", nargs="?", help="a table name (--list shows them)")
    p.add_argument("--list", action="store_true", help="list the tables and their number of cells and runs")
    p.add_argument("--seeds", type=SEED, nargs="+", default=[0, 1, 2],
                   help="seeds of every cell, each once (default 0 1 2); given twice, both lists")
    p.add_argument("--only", nargs="+", metavar="KEY=VALUE",
                   help="keep the cells whose KEY matches one of the values, for every KEY given: "
                        f"{', '.join(FILTER_KEYS)} (shell patterns; e.g. method=dml,one arch=resnet32); given twice, "
                        "both filters")
    p.add_argument("--runs-dir", type=non_empty_path, default=os.environ.get("OKD_RUNS") or str(REPO / "runs"),
                   help="where the table folders go (default: $OKD_RUNS, else runs/ in the repository)")
    p.add_argument("--extra", default="", metavar="FLAGS", action=_Added,
                   help='flags added to every command, e.g. --extra="--data /data/imagenet --amp bf16" '
                        "(write --extra=... when they start with a dash). They do not change the run\n"
                        "directory; a run's folder that holds a run trained with other training flags is\n"
                        "reported as 'differs' and never continued (see README: Reproducing the papers); given\n"
                        "twice, both")
    p.add_argument("--dry-run", action="store_true", help="print every command and its state; run nothing")
    p.add_argument("--markdown", action="store_true",
                   help="print the page docs/reproducing.md (every published number, its command, its state)")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local")
    g = p.add_argument_group("local launcher")
    g.add_argument("--gpus", type=_gpu_list, default=None, metavar="0,1,2,3",
                   help="a queue over these GPUs, one run per GPU (CUDA_VISIBLE_DEVICES, --gpu 0); GPU indices, "
                        "non-negative integers separated by commas or spaces")
    g.add_argument("--jobs", type=process_count("training runs", at_least=1), default=1,
                   help="runs at a time without --gpus (CPU); default 1")
    s = p.add_argument_group("slurm launcher (submitit)")
    s.add_argument("--partition", default=None)
    s.add_argument("--account", default=None)
    s.add_argument("--qos", default=None)
    s.add_argument("--constraint", default=None)
    s.add_argument("--time", type=_slurm_time, default="24:00:00",
                   help="time limit per job, as SLURM reads it (HH:MM:SS, minutes, MM:SS, D-HH[:MM[:SS]]); a run "
                        "that needs longer is re-queued and continues")
    s.add_argument("--gpus-per-run", type=positive_int, default=1,
                   help="GPUs per run; above 1 the run is started with torchrun, and --batch-size is per GPU: "
                        "keep the table's global batch with --extra='--batch-size B/N' (summarize.py marks a run "
                        "whose global batch is not the table's)")
    s.add_argument("--cpus-per-run", type=positive_int, default=8)
    s.add_argument("--mem-gb", type=positive_int, default=None)
    s.add_argument("--array-parallelism", type=positive_int, default=64,
                   help="array tasks running at once")
    s.add_argument("--max-requeues", type=non_negative_int, default=20, help="re-queues after a time-out (pre-emptions are "
                                                                "always re-queued)")
    s.add_argument("--signal-delay", type=non_negative_int, default=120,
                   help="seconds before the time limit at which SLURM warns the job (USR2)")
    s.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="a shell line run before each job (e.g. 'module load cuda'); repeatable")
    s.add_argument("--job-name", default=None, help="default: okd-<table>")
    return p


def list_tables() -> str:
    lines = [f"{'table':<20} {'cells':>5} {'runs/seed':>9} {'not built':>9}  title"]
    for t in TABLES.values():
        runs, _ = plan(t, [0], Path("runs"))
        missing = sum(not r.built for r in runs)
        lines.append(f"{t.name:<20} {len(t.cells):>5} {len(runs):>9} {missing:>9}  {t.title}")
    return "\n".join(lines)


def dry_run(table: Table, runs: Sequence[Run], cells: Sequence[Cell], extra: Sequence[str],
            world_size: int = 1) -> str:
    lines = [f"# {table.title}: {len(cells)} cell(s), {len(runs)} run(s)"]
    for run in runs:
        state = run_state(run, extra, world_size)
        launcher = ["torchrun", "--standalone", f"--nproc_per_node={world_size}"] if world_size > 1 else ["python"]
        cmd = shlex.join(launcher + [run.script] + run.train_argv() + list(extra))
        lines.append(f"{cmd}  # {state}; {', '.join(run.cells)}")
    return "\n".join(lines)


def markdown_page() -> str:
    """docs/reproducing.md: every published number of the paper tables, its command and whether it can run."""
    out = [
        "# Reproducing the papers' tables",
        "",
        "Generated by `python scripts/reproduce.py --markdown` from `scripts/tables.py`; do not edit by hand.",
        "",
        "```bash",
        "python scripts/reproduce.py --list                                      # tables, cells, runs",
        "python scripts/reproduce.py mcl-okd-cifar100 --seeds 0 1 2 --dry-run    # the commands",
        "python scripts/reproduce.py mcl-okd-cifar100 --seeds 0 1 2 --gpus 0,1,2,3",
        "python scripts/reproduce.py pcl-cifar100 --launcher slurm --partition gpu --time 24:00:00",
        "python scripts/summarize.py runs --table mcl-okd-cifar100 --plots plots/",
        "```",
        "",
        "Each command below is one seed's run; `reproduce.py` adds `--seed S --out runs/<table>/<run>-sS "
        "--tag <table>/<run> --resume auto`. Every number is top-1 **accuracy** (%) on the test set; where the "
        "paper gives top-1 **error** its value is in brackets. \"single\" and \"ensemble\" say which head the "
        "summary reads (see the notes). *not built*: the method's script is not in the repository yet, so the "
        "cell is listed but never run (it runs as soon as the script lands). A blank (\"-\") in the paper is not a "
        "run and is not listed.",
        "",
        "Heads (the `number` column): `net` the single network; `peers` the mean top-1 over the peers "
        "`peer1..peerN` (the average single peer); `last-peer` the highest-numbered peer; `leader`, `teacher`, "
        "`ensemble` those heads; `selection` the head the method deploys (its `--best-metric` default, recorded in "
        "`results.json` as `selection.metric`).",
        "",
        "How `scripts/summarize.py` reads a cell: mean ± sample std (n - 1) over the seeds at the **best** epoch "
        "(the epoch of the highest test top-1 of the method's selection head, as the official codes select) "
        "and at the **last** epoch; the difference is ours (best) minus the paper's, in the table's unit.",
        "",
    ]
    for name in PAPER_TABLES:
        t = TABLES[name]
        runs, _ = plan(t, [0], Path("runs"))
        out += [f"## `{t.name}`: {t.title}", "", f"Source: {t.source}. Unit: top-1 {t.unit}. {len(t.cells)} "
                f"published cells, {len(runs)} runs per seed.", ""]
        out += [f"- {n}" for n in t.notes] + [""]
        out += ["| row | column | number | paper: top-1 acc. (error) | command | script |", "|---|---|---|---|---|---|"]
        for c in t.cells:
            built = "yes" if (REPO / c.script).is_file() else "**not built**"
            reuse = f" (runs of `{c.runs_table}`)" if c.runs_table else ""
            cmd = f"`python {c.script} {shlex.join(c.argv)}`{reuse}"
            for m in c.metrics:
                if m.published is None:
                    continue
                std = f" ± {m.published_std:.2f}" if m.published_std is not None else ""
                value = (f"{100 - m.published:.2f} ({m.published:.2f})" if t.unit == "error"
                         else f"{m.published:.2f}{std}")
                out.append(f"| {c.row} | {c.column} | {m.kind} (`{m.head}`) | {value} | {cmd} | {built} |")
        out.append("")
    out += ["## Other tables", "",
            "- `fashion-mnist`: every method on real data this repository can fetch offline (Fashion-MNIST); no "
            "published numbers. The measured table and its commands are in [results.md](results.md).",
            "- `smoke`: two tiny synthetic cells to check the harness (and time it on a new machine) in a minute.", ""]
    return "\n".join(out)


def check_launcher_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Optional[str]:
    """One line when a flag of the other launcher is given (it would be ignored: --partition without
    --launcher slurm would train every run here) or the SLURM warning comes after the time limit."""
    other = SLURM_FLAGS if args.launcher == "local" else LOCAL_FLAGS
    given = [d for d in other if getattr(args, d) != parser.get_default(d)]
    if given:
        flags = ", ".join("--" + d.replace("_", "-") for d in given)
        if args.launcher == "local":
            return (f"error: {flags}: for --launcher slurm only (without it every run trains on this machine); "
                    "add --launcher slurm, or leave them out")
        return f"error: {flags}: for --launcher local only (SLURM places the runs; see --gpus-per-run); leave them out"
    if args.gpus and args.jobs != parser.get_default("jobs"):
        return "error: --jobs is for runs on the CPU; with --gpus one run goes on each GPU listed: leave out --jobs"
    if args.launcher == "slurm" and args.signal_delay >= parse_minutes(args.time) * 60:
        return (f"error: --signal-delay {args.signal_delay} s is not shorter than --time {args.time}: give a "
                "smaller --signal-delay (SLURM warns the job that many seconds before its time limit)")
    return None


def repeated_seeds(seeds: Sequence[int]) -> Optional[str]:
    """One line when a seed is given twice: it would be one run listed, trained and counted twice."""
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        named = f"seed {twice[0]} is" if len(twice) == 1 else f"seeds {', '.join(map(str, twice))} are"
        return (f"error: --seeds {' '.join(map(str, seeds))}: {named} given more than once; list each seed once "
                f"(e.g. --seeds {' '.join(map(str, dict.fromkeys(seeds)))})")
    return None


def check_extra(runs: Sequence[Run], extra: Sequence[str], text: str) -> Optional[str]:
    """One line when ``--extra`` does not parse for a run's script, sets what reproduce.py sets per run, or
    conflicts with a cell's flags; None when every built run takes it."""
    import io
    from engine.errors import UserError
    # (argparse's line, "--eval-only: not allowed with argument --resume", names a flag the user never gave)
    if any("--eval-only".startswith(t.split("=")[0]) and t.startswith("--eval-o") for t in extra):   # (--eval-on)
        return (f"error: --extra={text!r}: --eval-only is not a training flag: it evaluates a checkpoint and "
                "trains nothing, and reproduce.py trains every run (it adds --resume auto itself); evaluate a "
                "checkpoint with python train_<method>.py --eval-only PATH")
    for run in runs:
        if not run.built:
            continue
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                args = parse_run_args(run, extra)
                command_config(run, extra)
        except SystemExit:
            problem = (err.getvalue().strip().splitlines() or ["a flag the script refuses"])[-1]
            problem = problem.removeprefix(f"{run.script}: error: ").removesuffix(" (--help lists the options)")
            return f"error: --extra={text!r}: {problem} (python {run.script} --help lists its options)"
        except UserError as e:
            return f"error: --extra={text!r}: {e} (in {run.script})"
        clash = [k for k in RESERVED if str(getattr(args, k)) != str(parse_run_args(run).__dict__[k])]
        if clash:
            return (f"error: --extra={text!r} sets {', '.join('--' + k for k in clash)}, which reproduce.py sets "
                    "for every run (--seed from --seeds, --out from --runs-dir and the table); leave it out")
    return None


def check_folders(runs: Sequence[Run], runs_dir: Path) -> Optional[str]:
    """One line naming the path where a table folder cannot be created (a file in the way, no permission, a
    read-only disk), found without leaving it behind (the runs create them: a refused command creates nothing), or
    where a run folder is a file; else None."""
    from engine.run import cannot_create
    inside = next((p for p in [runs_dir, *runs_dir.parents] if holds_run(p)), None)
    if inside:                              # (its runs would lie inside that run: the engine refuses each)
        return f"error: --runs-dir {display_path(runs_dir)} lies inside the run directory {display_path(inside)}; " \
               "choose another --runs-dir"
    for folder in sorted({r.out.parent for r in runs}):
        problem = cannot_create(folder, "--runs-dir")
        if problem:
            return f"error: --runs-dir {display_path(runs_dir)}: {problem}"
    for run in runs:
        if run.out.exists() and not run.out.is_dir():
            return (f"error: {display_path(run.out)} is a file, not a run folder; move it away or choose another "
                    "--runs-dir")
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list and args.markdown:
        print("error: --list and --markdown print different things; give one of them", file=sys.stderr)
        return 2
    if (args.list or args.markdown) and args.table:     # (it was ignored without a word)
        what = "--list lists every table" if args.list else "--markdown prints the page of every paper table"
        print(f"error: {what}, not one: leave out {args.table}, or leave out "
              f"{'--list' if args.list else '--markdown'} (--dry-run prints a table's commands)", file=sys.stderr)
        return 2
    if args.list:
        print(list_tables())
        return 0
    if args.markdown:
        print(markdown_page())
        return 0
    if not args.table:
        print(f"error: name a table; one of: {', '.join(TABLES)}", file=sys.stderr)
        return 2
    if args.table not in TABLES:
        print(f"error: no table {args.table!r}; the tables are: {', '.join(TABLES)}", file=sys.stderr)
        return 2
    problem = check_launcher_flags(parser, args) or repeated_seeds(args.seeds)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    table = TABLES[args.table]
    try:
        extra = shlex.split(args.extra)
    except ValueError as e:
        print(f"error: --extra={args.extra!r}: {e} (quote the flags as one shell word)", file=sys.stderr)
        return 2
    try:
        only = parse_only(args.only)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runs_dir = Path(args.runs_dir).resolve()
    if runs_dir.exists() and not runs_dir.is_dir():       # (--dry-run too: it would list runs that cannot start)
        print(f"error: --runs-dir {display_path(runs_dir)} is a file, not a folder; choose another --runs-dir",
              file=sys.stderr)
        return 2
    runs, cells = plan(table, args.seeds, runs_dir, only)
    if not cells:
        print(f"error: --only {' '.join(args.only)} selects no cell of {table.name}", file=sys.stderr)
        return 2
    if extra:                  # a bad --extra flag: one line now, not after hours of other runs
        problem = check_extra(runs, extra, args.extra)
        if problem:
            print(problem, file=sys.stderr)
            return 2
    world_size = args.gpus_per_run if args.launcher == "slurm" else 1
    if world_size > 1 and not any(t.startswith("--batch") for t in extra):
        print(f"warning: --gpus-per-run {world_size} trains each cell's --batch-size on each of the {world_size} GPUs, "
              f"a global batch {world_size} x the table's, which summarize.py marks 'other flags'; for the table's "
              f"global batch add --extra='--batch-size B/{world_size}'", file=sys.stderr)
    if args.dry_run:
        print(dry_run(table, runs, cells, extra, world_size))
        return 0
    missing = [tool for tool in ("sbatch", "srun") if args.launcher == "slurm" and shutil.which(tool) is None]
    if missing:                                       # (before any folder is made)
        print(f"error: --launcher slurm needs SLURM's {' and '.join(missing)} (run it on the cluster's login node); "
              "here use --launcher local", file=sys.stderr)
        return 2
    states = [(r, run_state(r, extra, world_size)) for r in runs]
    differing = [(r, s) for r, s in states if s.startswith("differs")]
    if differing:
        shown = "; ".join(f"{r.out.name}: {s.removeprefix('differs: ')}" for r, s in differing[:3])
        more = f"; and {len(differing) - 3} more (--dry-run lists them)" if len(differing) > 3 else ""
        other_script = any(state.startswith("differs: a run of train_") for _, state in differing)
        what = ("runs this command would not continue" if other_script else    # (no --extra continues those)
                "runs trained with other training flags than this command")
        processes = any("world size " in state for _, state in differing)     # (what the launcher sets)
        fix = ("move those folders away (or choose another --runs-dir) to train the table's command; a run trained "
               "with other flags continues when re-run with them" if other_script else
               f"re-run with the --extra{' and the launcher (--launcher, --gpus-per-run)' * processes} they were "
               "trained with to continue them, or move those folders away (or choose another --runs-dir) to train the "
               "table's command")
        print(f"error: {len(differing)} run folder(s) under {display_path(runs_dir)} hold {what} ({shown}{more}): "
              f"{fix}", file=sys.stderr)
        return 2
    problem = check_folders([r for r in runs if r.built], runs_dir)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    refused = [(r, s.removeprefix("refused: ")) for r, s in states if s.startswith("refused")]
    if refused:
        more = f" (and {len(refused) - 1} more run folder(s): --dry-run lists them)" if len(refused) > 1 else ""
        print(f"error: {refused[0][1]}{more} [reproduce.py sets each run's --out: move {refused[0][0].out} away, or "
              "give another --runs-dir]", file=sys.stderr)
        return 2
    not_built = sorted({r.script for r in runs if not r.built})
    if not_built:
        print(f"not built (listed, not run): {', '.join(not_built)}")
    if args.launcher == "slurm":
        opts = slurm_options(args, table.name)
        submit_slurm(runs, opts, runs_dir / table.name / ".submitit", extra)
        print(f"when they are done: python scripts/summarize.py {args.runs_dir} --table {table.name}")
        return 0
    gpus = args.gpus.split(",") if args.gpus else None
    with stop_on_signals():     # SIGTERM and SIGHUP (a scheduler, a closed ssh session) stop the runs as Ctrl-C does
        outcome = run_local(runs, gpus, args.jobs, extra)
    stopped_by = outcome.pop("signal", ["SIGINT"])[0]
    print(", ".join(f"{len(v)} {k}" for k, v in outcome.items() if v) or "nothing to do")
    if outcome["interrupted"] or outcome["not started"]:
        print("every interrupted run continues from its last.pt, and the others start: re-run the same command")
        return 128 + signal.Signals[stopped_by].value       # as a training run exits: 130 SIGINT, 143 SIGTERM
    if outcome["busy"]:
        print("the busy runs are trained by another process: once it ends, re-run the same command for the rest")
    return 1 if outcome["failed"] or outcome["differs"] or outcome["refused"] or outcome["busy"] else 0


if __name__ == "__main__":
    run_tool(main)
