"""One run, one directory, one true record.

* **Identity.** A run is its configuration. The default directory is ``runs/<method>-<arch>-<dataset>-n<peers>
  -s<seed>``, followed by ``-<hash>`` (8 hex digits of sha256) when any other *training option* differs from
  the method's defaults (:func:`run_name`). Two commands that train differently never share a directory.
* **Training options** are every option except the ones listed below, which cannot change what is trained
  (:data:`NOT_TRAINING`) or change only how fast the same maths runs (:data:`SPEED`). They take no part in
  the name and may differ when a run is resumed; every training option must be equal
  (:func:`config_differences`), except ``--epochs``, which may grow with ``--extend-epochs``.
* **One writer.** :class:`RunLock` holds an exclusive ``fcntl.flock`` on ``<run>/.lock`` while a process
  trains the run; the kernel releases it when the process ends, however it ends.
* **The record.** :func:`new_process` / :func:`close_process` / :func:`merge_processes` keep the list of every
  process that trained the run, written to ``results.json`` and into each checkpoint.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shlex
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

from .checkpoint import os_error_message
from .errors import UserError

# Options that cannot change what is trained: where the run lives and what this process does (--out,
# --resume, --eval-only, --extend-epochs), a label (--tag), the device index (--gpu; -1 = the CPU), CPU
# threads, DataLoader processes (--workers: the augmentation of a sample does not depend on them, see
# data/loaders.py), the progress bar,
# where the dataset is read from (--data, --download: the dataset is --dataset), a check (--num-classes), and
# the evaluation batch (--eval-batch-size: batch norm runs in eval mode, so a prediction does not depend on
# the batch it is in).
NOT_TRAINING = frozenset({"out", "resume", "eval_only", "extend_epochs", "tag", "gpu", "workers", "threads",
                          "no_progress", "data", "download", "num_classes", "eval_batch_size"})
# Speed options: the same maths computed by other kernels (the rounding of floats may differ, the
# experiment does not). A run keeps its directory when one is switched on, and may be resumed with another
# (checkpoints hold the plain layout of --grouped-peers either way).
SPEED = frozenset({"channels_last", "compile", "cuda_graph", "sgd_impl", "grouped_peers"})
# Names of bundles of defaults: the values they set are compared, not the names.
BUNDLES = frozenset({"recipe", "preset"})
# Filled in by the engine, not by the user.
DERIVED = frozenset({"views"})
# Options shown in the readable part of the name (not hashed).
NAMED = ("arch", "dataset", "num_peers", "seed")
LOCK_NAME = ".lock"


def flag(key: str) -> str:
    """The command-line flag of an argument name: ``batch_size`` -> ``--batch-size``."""
    return "--" + key.replace("_", "-")


def training_options(args: Mapping) -> dict:
    """The options of ``args`` (a dict of argument values) that can change what is trained. ``--milestones``
    and ``--sgdr-t0`` are left out under the schedules that do not read them."""
    skip = NOT_TRAINING | SPEED | BUNDLES | DERIVED
    options = {k: v for k, v in args.items() if k not in skip}
    if options.get("lr_schedule") != "multistep":
        options.pop("milestones", None)
    if options.get("lr_schedule") != "sgdr":
        options.pop("sgdr_t0", None)
    return options


def _canonical(value):
    return list(value) if isinstance(value, tuple) else value


def run_name(method: str, options: Mapping, defaults: Mapping) -> str:
    """``<method>-<arch>-<dataset>[-n<peers>]-s<seed>[-<hash>]``: the hash (8 hex digits of sha256) covers
    every training option other than the named ones whose value differs from ``defaults`` (the method's
    defaults for this arch and dataset), so adding an option with a default keeps existing names."""
    from models.peers import arch_tag      # resnet20,resnet20,wrn_16_2 -> resnet20x2+wrn_16_2
    peers = f"-n{options['num_peers']}" if "num_peers" in options else ""
    name = f"{method}-{arch_tag(options['arch'])}-{options['dataset']}{peers}-s{options['seed']}"
    changed = {k: _canonical(v) for k, v in options.items()
               if k not in NAMED and (k not in defaults or _canonical(defaults[k]) != _canonical(v))}
    if changed:
        text = json.dumps(changed, sort_keys=True, default=str)
        name += "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return name


def config_differences(saved: Mapping, now: Mapping, defaults: Mapping,
                       extend_epochs: bool = False) -> list[tuple[str, object, object]]:
    """Training options that differ between a checkpoint's arguments ``saved`` and this run's ``now``, as
    (key, saved value, new value). An option the checkpoint predates counts as its default. ``--epochs``
    may grow when ``extend_epochs``."""
    saved_opts, now_opts = training_options(saved), training_options(now)
    diffs = []
    for key in list(now_opts) + [k for k in saved_opts if k not in now_opts]:
        before = _canonical(saved_opts.get(key, defaults.get(key)))
        after = _canonical(now_opts.get(key, defaults.get(key)))
        if key == "epochs" and extend_epochs and after is not None and before is not None and after > before:
            continue
        if before != after:
            diffs.append((key, before, after))
    return diffs


def describe_differences(path: Path, diffs: Sequence[tuple[str, object, object]]) -> str:
    """One line: the checkpoint, each differing flag with both values, and the ways forward."""
    parts = []
    for key, before, after in diffs:
        part = f"{flag(key)} {before} (this command: {after})"
        if key == "epochs" and isinstance(before, int) and isinstance(after, int) and after > before:
            part += " [to train longer, add --extend-epochs]"
        parts.append(part)
    return (f"{path} was trained with {'; '.join(parts)}. Resume with the checkpoint's values, or start a new "
            "run (leave out --resume, or give another --out)")


def continue_command(argv: Sequence[str], script: str, out: Path, world_size: int = 1,
                     resume: Optional[Path] = None) -> str:
    """The command that continues the run in ``out``: this command with ``--out OUT --resume auto`` (or
    ``--resume RESUME`` when given: a run that has no last.pt of its own yet) in place of any
    ``--out``/``--resume`` it had."""
    rest, i = [], 0
    argv = list(argv)
    while i < len(argv):
        token = argv[i]
        if token == "--out":
            i += 2
            continue
        if token == "--resume":
            i += 2 if i + 1 < len(argv) and not argv[i + 1].startswith("-") else 1
            continue
        if token.startswith("--out=") or token.startswith("--resume="):
            i += 1
            continue
        rest.append(token)
        i += 1
    launcher = ["python"] if world_size <= 1 else ["torchrun", f"--nproc_per_node={world_size}"]
    return shlex.join(launcher + [script, *rest, "--out", str(out), "--resume", str(resume or "auto")])


# ---- one writer per run directory -------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory, held by the one process that writes it.

    ``acquire()`` creates the directory if needed and takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on
    ``<dir>/.lock``, then writes its holder (pid, host, start time, command) into it. The kernel releases
    a flock when its process ends, however it ends (exception, signal, SIGKILL), so a lock file left by a
    dead process is stale and simply taken over (``stale`` then holds the dead holder's record). A second
    process gets a UserError naming the holder's pid.
    """

    def __init__(self, folder: Path, command: str = ""):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command
        self.fd: Optional[int] = None
        self.stale: Optional[dict] = None
        self.created_folder = False

    def _read_holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "RunLock":
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"--out {self.folder} is a file, not a folder; choose another --out")
        try:
            self.created_folder = not self.folder.exists()
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise UserError(os_error_message(self.folder, e)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(os_error_message(self.path, e)) from None
            holder = self._read_holder()
            who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"
            if holder.get("started"):
                who += f" (since {holder['started']}: {holder.get('command', '')})"
            if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
                    and not _pid_alive(holder["pid"]):
                raise UserError(f"{self.folder} is locked by {who}, which is no longer running, yet its lock "
                                f"is still held (a network file system?); if no other machine trains this run, "
                                f"delete {self.path}")
            raise UserError(f"{self.folder} is in use by {who}: one process writes a run at a time; wait for it "
                            "to end, or choose another --out")
        self.fd = fd
        holder = self._read_holder()
        if holder.get("pid"):
            self.stale = holder
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": now_iso(), "command": self.command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        return self

    def release(self) -> None:
        """Unlock (emptying the holder record). The lock file stays: removing it could let two processes
        lock two different files of the same name."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
        if self.created_folder and [p.name for p in self.folder.iterdir()] == [LOCK_NAME]:
            # Nothing was written (the run stopped before it began): leave no empty run directory behind.
            try:
                self.path.unlink()
                self.folder.rmdir()
            except OSError:
                pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# ---- the record ------------------------------------------------------------------------------------

def now_iso(t: Optional[float] = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() if t is None else t))


def new_process(command: str, start_epoch: int) -> dict:
    """The record of this process training the run, from ``start_epoch`` (epochs already done)."""
    t = time.time()
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "start_epoch": start_epoch,
            "end_epoch": start_epoch, "started": now_iso(t), "ended": None, "updated": now_iso(t),
            "started_unix": t, "wall_s": 0.0, "status": "running"}


def update_process(process: dict, epochs_done: int, status: str = "running", **extra) -> dict:
    """Bring ``process`` up to date (in place): epochs done, wall time, status and, once it is not
    'running', its end time and the signal or reason (``extra``)."""
    t = time.time()
    process.update(end_epoch=epochs_done, updated=now_iso(t), wall_s=t - process["started_unix"], status=status)
    if status != "running":
        process["ended"] = now_iso(t)
    process.update(extra)
    return process


def _key(process: Mapping) -> tuple:
    return process.get("host"), process.get("pid"), process.get("started")


def merge_processes(from_checkpoint: Sequence[dict], from_results: Optional[Sequence[dict]]) -> list[dict]:
    """The processes of a run being resumed: the checkpoint's list, with each entry replaced by the newer
    one ``results.json`` holds (written later: its final status) and the processes ``results.json`` adds
    (those that ended before finishing an epoch). An entry still 'running' belongs to a process that ended
    without writing its end (SIGKILL, out of memory, power loss): it becomes 'killed'."""
    merged = {_key(p): dict(p) for p in from_checkpoint}
    for p in from_results or ():
        merged[_key(p)] = dict(p)
    processes = sorted(merged.values(), key=lambda p: p.get("started_unix", 0.0))
    for p in processes:
        if p.get("status") == "running":
            p.update(status="killed", ended=None,
                     reason="the process ended without recording it (SIGKILL, out of memory or power loss); "
                            "times are as of its last write")
    return processes


def wall_time(processes: Sequence[Mapping]) -> float:
    """Cumulative wall time (s) of every process that trained the run."""
    return sum(p.get("wall_s", 0.0) for p in processes)



def given_options(method_cls, argv: Sequence[str]) -> dict:
    """The options given explicitly in ``argv`` (not left to a default), by argument name."""
    import argparse
    from .cli import build_parser
    parser = build_parser(method_cls, method_cls.recipe)
    parser._defaults.clear()             # recipe and preset defaults (shared by the argument groups)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    known, _ = parser.parse_known_args(list(argv))
    return vars(known)


# ---- signals -----------------------------------------------------------------------------------------

class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT (Ctrl-C) or SIGTERM (SLURM, Kubernetes); ``message`` is the line for the user."""

    def __init__(self, signal_name: str = "SIGINT", message: str = ""):
        super().__init__(message or signal_name)
        self.signal_name, self.message = signal_name, message


@contextlib.contextmanager
def signals_held():
    """SIGINT and SIGTERM wait until the block ends, then arrive as usual: a checkpoint write and the record
    of what it holds happen together or not at all. (The handlers are swapped for a recorder: blocking the
    signals would not do, since any other thread, TensorBoard's writer for one, can take them.) Main thread
    only, as Python's handlers; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if pending:                                   # delivered now, to the handler it was meant for
        handler = previous[pending[0]]
        if callable(handler):
            handler(pending[0], None)
        elif handler == signal.SIG_DFL:
            os.kill(os.getpid(), pending[0])


def raise_interrupted(signum, frame):
    """A signal handler: SIGTERM stops the run where it is, as Ctrl-C does."""
    raise Interrupted(signal.Signals(signum).name)
