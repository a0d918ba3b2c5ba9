"""One run, one directory, one true record: the :class:`Run` owns the run directory, its lock, the per-epoch
history, the record of every process that trained it (``results.json``), the checks before a resume, and
the life of its checkpoints on disk. The training loop hands it a state to save; it never sees the loop.

* **One writer.** :class:`RunLock` holds an exclusive ``fcntl.flock`` on ``<run>/.lock`` while a process
  trains the run; the kernel releases it when the process ends, however it ends.
* **Nothing overwritten.** A new run never starts in a folder that holds another run's files; a resumed
  one only where its checkpoint belongs (the training options must agree: engine/config.py).
* **Checkpoints.** ``last.pt`` every epoch and ``best.pt`` when the selection metric improves, last.pt
  first, each written atomically and checksummed (engine/checkpoint.py) while the stop signals wait. A kill
  between the two leaves an older best.pt, which the next resume rebuilds: ``best.pt`` is never stale.
* **The record.** ``results.json`` is rewritten after every epoch and when the process ends (finished,
  interrupted, failed); it lists every process that trained the run, and only the epochs its last.pt holds.
  Every checkpoint holds the record too: a process killed between the two writes is read back from it.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import fnmatch
import hashlib
import io
import json
import math
import os
import shlex
import socket
import time
import uuid
import warnings
from pathlib import Path
from typing import Mapping, NamedTuple, Optional, Sequence

from data.common import inside_the_classes, printable
from data.files import (RUN_EVALUATIONS, RUN_FILES, RUN_LOCK, RUN_TENSORBOARD, clean_temp_files, holds_run,
                        os_error_message, run_file_role)
from recipes import RECIPE_KEYS, RECIPES

from .checkpoint import FORMAT, atomic_save, atomic_write, check_saved_by, load_checkpoint, saved_by
from .cli import parse_args, resume_path
from .config import RunConfig, describe_differences, new_run_hint, recorded_differences, without_hash
from .distributed import any_rank, barrier
from .errors import UserError
from .method import REPOSITORY, script_path
from .signals import signals_held, stop_signal


def history_state(records: Sequence[dict], split: str, metric: str) -> dict:
    """What a run's per-epoch ``records`` say, as a checkpoint and results.json hold it: the records, the best
    epoch (the highest ``split``'s ``metric``, the first of equals; its test metrics are reported), the
    maximum over epochs of every test metric of the last epoch (each head's top-1 and top-5), and the training
    time and images for the throughput."""
    best = max(records, key=lambda r: r[split][metric], default=None)
    heads = records[-1]["test"] if records else {}
    speeds = [r.get("speed", {}) for r in records]         # (records of older versions have none)
    return {"selection": {"split": split, "metric": metric}, "history": list(records),
            "best": best and {k: best[k] for k in ("epoch", "test", "val") if k in best},
            "max_test": {k: max(r["test"][k] for r in records if k in r["test"]) for k in heads},
            "train_seconds": sum(v.get("epoch_s", 0.0) for v in speeds),
            "train_samples": sum(v.get("images", 0) for v in speeds)}


# How to start a new run beside the one --resume auto found (scripts/slurm_ddp.sh always adds --resume auto)
_NEW_SIBLING = "leave out --resume or give an --out of its own"


class Run:
    """The run directory ``folder`` of ``method_cls`` trained with ``config`` by ``argv`` on ``world_size``
    processes (this one ``rank``). Made before the data are read, so that :meth:`check` refuses a folder before
    anything heavy runs; :meth:`describe` then adds what the data and the model tell. Only rank 0 writes."""

    def __init__(self, folder: Path, method_cls, config: RunConfig, argv: Sequence[str], world_size: int = 1,
                 rank: int = 0, read: Optional["CheckpointRead"] = None):
        self.folder = Path(folder).absolute()
        self.method_cls, self.config, self.argv = method_cls, config, list(argv)
        self.world_size, self.is_main = world_size, rank == 0
        self.about: dict = {}
        self.selection: Optional[tuple] = None  # (split, metric) choosing the best epoch: describe() gives it
        self.read = read or NOT_READ            # the checkpoint last read (read_checkpoint)
        self.records: list[dict] = []           # every epoch's record, once its checkpoint is written
        self.run_id = uuid.uuid4().hex          # a resumed run takes its checkpoint's
        self.processes: list[dict] = []         # every process that trained the run
        self.process: Optional[dict] = None     # this one's entry, while it trains
        self.lock: Optional[RunLock] = None
        self.saved: Optional[Path] = None        # the checkpoint that holds the recorded epochs (resumed: its own)
        self.tag = config.tag                   # the run's label (--tag); continued in its folder: kept unless given
        self.script = script_path(method_cls)   # as the command that runs it names it
        self.command = shlex.join([self.script] + self.argv)

    def log(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    def describe(self, selection: tuple, about: dict) -> None:
        """What the data and the model tell, once built: ``selection``, the split and metric that choose the best
        epoch; ``about``, what results.json says of the run besides its record (the peers' architectures, the
        classes and image size, the data used, the code and library versions)."""
        self.selection, self.about = selection, about

    # ---- opening: the checks, the lock, then a new run or the checkpoint to continue -------------------------

    def check(self, before_lock: bool = True) -> Optional[dict]:
        """Check the folder against this command, reading no data and leaving nothing changed: None for a new run,
        else the checkpoint to continue from (:func:`read_checkpoint`: the one read before if the file is
        unchanged, else read again: another process may have saved a later epoch meanwhile). Raises UserError
        rather than overwrite anything. Made before the data are read (every rank; ``before_lock``: rank 0 also
        finds whether another process holds the folder, waiting up to 12 s for a lock whose holder has ended, or
        it cannot be created, and every rank stops with it), and again by :meth:`open` under the lock."""
        problem = (self._inside_a_run() or inside_the_classes(self.config.dataset, self.config.data, self.folder)
                   or _not_utf8(self.folder))
        if before_lock and not problem:
            self._refuse_an_unusable_folder(lock=True)
        resume = self._resume()
        problem = problem or _a_folder_in_the_way(self.folder)
        if resume is None:
            problem = problem or self._new_run_problem()
        elif resume.parent != self.folder:     # (continued into another folder: it must not hold runs)
            problem = problem or _a_run_below(self.folder) or _not_a_run(self.folder)
        elif not holds_run(self.folder):                 # (the checkpoint's own folder, which is no run's yet)
            problem = problem or _not_a_run(self.folder, resume.name)
        if problem:
            raise UserError(problem)
        if resume is None:
            if self.config.resume == "auto":
                self._refuse_a_sibling_run()
            return None
        self.read = read_checkpoint(resume, self.read)
        ckpt = self.read.ckpt
        check_saved_by(ckpt, resume, self.method_cls.name, "resume")
        diffs = recorded_differences(self.method_cls, self.config, ckpt, self.world_size)
        if diffs and all(key == "epochs" for key, _, _ in diffs) and self.config.resume == "auto":
            raise self._continue_instead(self.folder, ckpt["args"]["epochs"], ckpt["epoch"], "another --out",
                                         self.world_size, ckpt["epoch"] >= ckpt["args"]["epochs"])
        if diffs:     # (found by its options without --out: the script's defaults have changed since it was trained)
            found = "" if self.config.out or self.config.resume != "auto" else f": {self.continue_command()}"
            raise UserError(f"{resume} was trained with {describe_differences(diffs)}. Resume with the "
                            f"checkpoint's values{found}, or {new_run_hint(self.config.resume)}")
        self._check_target(resume, ckpt)
        earlier = [] if (self.folder / "last.pt").exists() else _earlier_run_files(self.folder, ckpt.get("run_id"))
        if earlier:
            raise UserError(f"{self.folder} holds {' and '.join(earlier)} of another run; continuing {resume} there "
                            f"would overwrite it. Give another --out to continue {resume}")
        recorded = {} if (self.folder / "last.pt").exists() else read_record(self.folder / "results.json") or {}
        if recorded.get("run_id") == ckpt.get("run_id") and recorded.get("epochs_done", 0) > ckpt["epoch"]:
            raise UserError(f"{self.folder / 'results.json'} records {recorded['epochs_done']} epochs of this run; "
                            f"continuing {resume} (epoch {ckpt['epoch']}) there would replace the record of the "
                            f"later ones. Give another --out to continue {resume}")
        return ckpt

    def _resume(self) -> Optional[Path]:
        """The checkpoint --resume names (:func:`resume_path`), spelled as a file of this folder wherever it lies in
        it under another name (``runs/x/../x/last.pt``, a link to the folder): one folder, one spelling."""
        resume = resume_path(self.config.resume, self.folder)
        with contextlib.suppress(OSError):          # (no such folder yet: it is another one)
            if resume is not None and os.path.samefile(resume.parent, self.folder):
                return self.folder / resume.name
        return resume

    def _refuse_an_unusable_folder(self, lock: bool) -> None:
        """Rank 0 finds whether the folder cannot be created (:func:`cannot_create`) or, with ``lock``, another
        process holds it (:meth:`RunLock.check_free`); every rank stops with its line."""
        def check_usable() -> None:
            if lock:
                RunLock(self.folder).check_free(wait=True)
            problem = cannot_create(self.folder)
            if problem:
                raise UserError(problem)
        self._on_rank_0(check_usable)

    def _on_rank_0(self, action):
        """``action()`` on rank 0, its result there (None elsewhere); a UserError it raises stops every rank,
        rank 0 with its line."""
        result = error = None
        if self.is_main:
            try:
                result = action()
            except UserError as e:
                error = e
        if any_rank(error is not None):
            raise error or UserError(f"rank 0 cannot use {self.folder}; see its message")
        return result

    def _inside_a_run(self) -> Optional[str]:
        inside = next((p for p in self.folder.parents if holds_run(p)), None)
        return inside and f"{self.folder} lies inside the run directory {inside}; give an --out outside it"

    def _new_run_problem(self) -> Optional[str]:
        """Why a new run cannot start in the folder, or None: it holds another run's last.pt, or what an earlier
        run left (:func:`_earlier_run_files`); a folder in the way of the run's files is :meth:`check`'s."""
        folder = self.folder
        if (folder / "last.pt").exists():
            return self._a_run_here()
        enclosed = _a_run_below(folder)
        if enclosed:
            return enclosed
        earlier = _earlier_run_files(folder)
        if earlier:
            best = (f" (its best.pt continues into a new folder: --resume {folder / 'best.pt'} --out NEW_DIR)"
                    if "best.pt" in earlier and _readable_checkpoint(folder / "best.pt") else "")
            return (f"{folder} holds {' and '.join(earlier)} of an earlier run but no last.pt to continue it "
                    f"from{best}; start this run with another --out (or move that folder away); nothing is "
                    "overwritten.")
        return _not_a_run(folder)

    def _a_run_here(self) -> str:
        """The line for a folder that holds a run's last.pt, for a command that starts a new run there: continue it
        with --resume auto, unless its record (results.json) says it is another method's, or was trained with
        other options (a given --out, or the method's defaults changed since), which --resume would refuse. (The
        record: results.json, or last.pt's own when results.json is behind it, lost or hand-edited.)"""
        recorded = read_run(self.folder)
        if not (recorded and recorded.get("method")):    # (a hand-edited record: the checkpoint's own)
            recorded = _readable_checkpoint(self.folder / "last.pt")
        new_run = "start this run with another --out; nothing is overwritten."
        if recorded and recorded["method"] != self.method_cls.name:
            return f"{self.folder} already holds a run of {saved_by(recorded)} (last.pt); {new_run}"
        diffs = recorded and [d for d in recorded_differences(self.method_cls, self.config, recorded, self.world_size)
                              if d[0] != "epochs"]
        if diffs:
            return (f"{self.folder} already holds a run (last.pt) trained with {describe_differences(diffs)}; continue "
                    f"it with --resume auto and the run's values, or {new_run}")
        return f"{self.folder} already holds a run (last.pt). Continue it with --resume auto, or {new_run}"

    def open(self) -> Optional[dict]:
        """Lock the folder (every rank stops if rank 0 could not), check it again (:meth:`check`, with the
        checkpoint it read if the file is unchanged) and against the data: None for a new run, else the checkpoint
        to continue from. Repairs what a kill left behind (best.pt, results.json)."""
        self._lock()
        ckpt = self.check(before_lock=False)
        if ckpt is None:
            if self.config.resume == "auto":
                self.log(f"--resume auto: no checkpoint in {self.folder}, starting a new run")
            return None
        resume = self.read.path
        self.saved, self.records = resume, list(ckpt["history"])    # what the folder holds, from here on
        self.check_data(ckpt, resume)
        if self.is_main and (resume.parent == self.folder or not self.done_after(ckpt["epoch"])):
            # (a finished run "resumed" into another --out changes nothing, there or here)
            self._repair_best(resume, ckpt)
            self._repair_record(resume, ckpt)
        if self.tag is None and resume.parent == self.folder:   # (a copy in a new --out: another run)
            self.tag = ckpt["args"].get("tag")
        if self.done_after(ckpt["epoch"]):
            if resume.parent == self.folder and self._recall_processes(ckpt):     # (its lock is released next)
                self._write_record("finished", {**ckpt, "processes": self.processes})    # (as trained: its tag...)
            self.log(f"{resume}: the run is already finished ({ckpt['epoch']} of {self.config.epochs} epochs); "
                     "nothing to train. To train longer: a larger --epochs with --extend-epochs")
        return ckpt

    def check_data(self, ckpt: dict, path: Path) -> None:
        """The data must be the checkpoint's: the same class names in the same label order (a folder dataset,
        an ImageNet subset) and the same image size; and to resume, as many images in each split (a folder that
        gained or lost images since would train the later epochs on other data, with another mean and std, and the
        record would state the new counts for every epoch; --eval-only evaluates the data as they are). Without
        --data (the checkpoint's or this command's), a run is resumed only on the data in the folder it read, while
        that folder is there: the default place lies under the current folder (or $OKD_DATASETS), and another
        folder may hold another copy; --eval-only evaluates the copy it reads, with a warning naming both."""
        from data import class_difference
        before, now = [(d.get("data") or {}).get("source") for d in (ckpt, self.about)]
        if (self.config.data is None and before and now and os.path.isdir(before)
                and os.path.realpath(before) != os.path.realpath(now)):
            read = f"{path} was trained on the data in {before}; without --data this command read {now}"
            if not self.config.eval_only:
                raise UserError(f"{read}: give --data with the data it was trained on (or with these, to use them)")
            warnings.warn(f"{read}, and evaluates those (--data chooses)")
        if ckpt.get("classes") and self.about.get("classes") is not None:
            difference = class_difference(ckpt["classes"], self.about["classes"])
            if difference:
                raise UserError(f"{path} does not fit this data: {difference}; give the --data (or --classes) it "
                                "was trained on")
        if ckpt.get("image_size") not in (None, self.about.get("image_size")):
            raise UserError(f"{path} was trained on {ckpt['image_size']} px images, this data gives "
                            f"{self.about.get('image_size')} px; give the data it was trained on, or "
                            f"--image-size {ckpt['image_size']}")
        before = (ckpt.get("data") or {}).get("images_found")        # (checkpoints of older versions: unknown)
        now = (self.about.get("data") or {}).get("images_found")
        if before and now and before != now and not self.config.eval_only:
            counts = [" / ".join(f"{n} {split}" for split, n in found.items()) for found in (before, now)]
            raise UserError(f"{path} was trained on {counts[0]} images; this data has {counts[1]} (images added or "
                            "removed since?): give the data it was trained on, or start a new run with another --out")

    def _refuse_a_sibling_run(self) -> None:
        """--resume auto without --out finds its run by its options. A run of the same method, backbone, data and
        seed whose options differ at most in --epochs (one trained to another length, or extended in place) and
        in the number of processes (torchrun) is named, with the command that continues it, instead of starting
        a new run beside it."""
        if self.config.out or not self.folder.parent.is_dir():
            return
        readable, found = without_hash(self.folder.name), []
        for other in sorted([self.folder.parent / readable, *self.folder.parent.glob(f"{readable}-????????")]):
            recorded = read_run(other) if (other / "last.pt").is_file() and other != self.folder else None
            diffs = recorded and recorded_differences(self.method_cls, self._for_epochs(recorded["epochs"]), recorded,
                                                      self.world_size)
            if recorded and all(key in ("epochs", "world_size") for key, _, _ in diffs):
                found.append((recorded["epochs"] != self.config.epochs, len(diffs), other, recorded))
        if found:        # the run of this --epochs first (a run on other processes), then the others
            _, _, other, recorded = min(found, key=lambda f: f[:2])
            raise self._continue_instead(other, recorded["epochs"], recorded["epochs_done"], _NEW_SIBLING,
                                         recorded.get("world_size", 1), recorded["status"] == "finished")

    def _for_epochs(self, epochs: int) -> RunConfig:
        """This command's options had it asked for ``epochs`` epochs: a recipe's step schedule (its milestones, its
        first SGDR cycle) follows --epochs unless given (engine.cli.parse_args), and is no other difference. The
        options as they are where ``argv`` is not the command they were parsed from (a Trainer built in code)."""
        try:
            with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")             # (this command's own warnings are printed already)
                now, then = [parse_args(self.method_cls, [*self.argv, "--epochs", str(e)])
                             for e in (self.config.epochs, epochs)]
        except SystemExit:
            return self.config
        if (now.milestones, now.sgdr_t0) != (self.config.milestones, self.config.sgdr_t0):
            return self.config
        return RunConfig({**self.config.as_dict(), "epochs": epochs, "milestones": then.milestones,
                          "sgdr_t0": then.sgdr_t0})

    def _continue_instead(self, folder: Path, epochs: int, done: int, new_run: str, world_size: int,
                          finished: bool) -> UserError:
        """The line naming the run in ``folder`` that this command would continue but for its --epochs (the run's
        are ``epochs``, ``done`` of them trained) or its number of processes (the run's: ``world_size``), with the
        command that does: its own --epochs when this command asks fewer, --extend-epochs when it asks more, its
        torchrun; ``new_run``: how to start a new run instead. A ``finished`` run that this command would not train
        longer has nothing to continue: its results are named (one whose best.pt a resume must still rebuild is not
        finished: :func:`read_run`)."""
        processes = "" if world_size == self.world_size else f" on {world_size} process{'es' * (world_size > 1)}"
        if finished and done >= epochs >= self.config.epochs:
            more = f" (more than --epochs {self.config.epochs} asks)" if epochs > self.config.epochs else ""
            return UserError(f"--resume auto: {folder} holds this run, finished{processes} after {epochs} "
                             f"epochs{more}: nothing to continue, its results are in {folder} (or {new_run} to start "
                             "a new run)")
        command = (self.continue_command(folder, epochs if self.config.epochs < epochs else None, world_size)
                   + (" --extend-epochs" if self.config.epochs > epochs else ""))
        return UserError(f"--resume auto: {folder} holds this run, trained{processes} for {epochs} epochs ({done} "
                         f"done); continue it with: {command} (or {new_run} to start a new run)")

    def done_after(self, epochs: int) -> bool:
        return epochs >= self.config.epochs

    def _recall_processes(self, ckpt: Optional[dict]) -> bool:
        """The processes that trained the run before this one: ``ckpt``'s merged with what results.json lists; for a
        new run, those of the record without epochs that a run stopped in its first epoch left, when this is that
        run started again (the same method and options in its folder: the command it printed), which keeps the
        record's id; and the holder of a stale lock that saved no epoch (killed in its first one), known from its
        lock only. True when that holder was added: the record must then be written at once, since this process's
        lock replaces the one that named it."""
        if ckpt is not None:
            self.run_id = ckpt.get("run_id", self.run_id)
            # results.json of the checkpoint's folder, then of this one, where it is this run's record (a run continued
            # into a new --out: its processes are recorded in the old one); lost: how its processes ended is not known
            paths = list(dict.fromkeys([self.saved.parent / "results.json", self.folder / "results.json"]))
            records = [read_record(path) for path in paths]
            found = [p for r in records if r and r.get("run_id") == self.run_id for p in r.get("processes", [])]
            lost = records[0] is None and paths[0].exists()
            self.processes = merge_processes(ckpt.get("processes", []), found, ckpt["args"]["epochs"], lost)
        else:
            recorded = read_record(self.folder / "results.json")
            if (recorded and recorded.get("method") == self.method_cls.name and recorded.get("run_id")
                    and not recorded_differences(self.method_cls, self.config, recorded, self.world_size)):
                self.run_id = recorded["run_id"]
                self.processes = merge_processes(recorded["processes"], None, self.config.epochs)
        stale = self.lock.stale if self.lock else None
        if not stale or not (ckpt or self.processes) or any(_holder_of(stale, p) for p in self.processes):
            return False                        # (a new run started over in its folder lists no one before it)
        epoch = ckpt["epoch"] if ckpt else 0
        self.processes.append({"started_unix": time.time(), **stale, "start_epoch": epoch, "end_epoch": epoch,
                               "ended": None, "status": "killed", "reason": _KILLED})
        return True

    def begin(self, ckpt: Optional[dict]) -> None:
        """Start this process's entry in the record, after the loop has loaded ``ckpt`` (None: a new run)."""
        unrecorded = self._recall_processes(ckpt)
        if ckpt is not None:
            self.log(f"resumed from {self.saved} after epoch {ckpt['epoch']}")
        # its entry: from the epochs already done, with the repository's commit it runs (a run resumed after a change
        # of the code records both), started when rank 0 locked the run (as its lock file says; other ranks: now)
        t = self.lock.started if self.lock else time.time()
        self.process = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                        "git_commit": self.about.get("git_commit"), "start_epoch": self.epochs,
                        "end_epoch": self.epochs, "started": _now_iso(t), "ended": None, "updated": _now_iso(t),
                        "started_unix": t, "wall_s": 0.0, "status": "running"}
        self.processes.append(self.process)
        if unrecorded:       # recorded at once: this process's lock replaces the one that named it
            self._write_record("running")

    @property
    def epochs(self) -> int:
        """Epochs trained and saved (an epoch is recorded once its checkpoint is written)."""
        return len(self.records)

    def _lock(self) -> None:
        """Rank 0 takes the folder's lock, then removes the temporary files of interrupted writes."""
        self.lock = self._on_rank_0(RunLock(self.folder, self.command).acquire)
        if self.is_main:
            if self.lock.stale:
                self.log(f"{self.folder}: process {self.lock.stale.get('pid')} that held it ended without "
                         "unlocking (stale lock taken over)")
            for tmp in clean_temp_files(self.folder):
                self.log(f"removed {tmp}, left by an interrupted write")

    def _check_target(self, path: Path, ckpt: dict) -> None:
        """Never write into a folder that holds another run's last.pt (or a later state of this run)."""
        last = self.folder / "last.pt"
        if not last.is_file() or os.path.samefile(last, path):
            return
        other = _readable_checkpoint(last)
        if other is None:
            raise UserError(f"{last} cannot be read (damaged, or not a checkpoint); continuing {path} there would "
                            f"replace it. Give another --out to continue {path}")
        same_run = other.get("run_id") == ckpt.get("run_id") is not None
        if same_run and other["epoch"] == ckpt["epoch"]:
            return   # a copy of the same state
        what = ("a later state of this run" if same_run
                else f"another run ({other['method']}, {other['args'].get('arch')} on {other['args'].get('dataset')})")
        raise UserError(f"{self.folder} holds {what} in last.pt (epoch {other['epoch']}); continuing {path} "
                        f"(epoch {ckpt['epoch']}) there would overwrite it. Give another --out to continue {path}")

    def _repair_best(self, path: Path, ckpt: dict) -> None:
        """best.pt must hold the best epoch that last.pt names. A kill between the writes of last.pt and
        best.pt leaves an older best.pt: then the best epoch is last.pt's own epoch, and last.pt is copied."""
        if not ckpt["best"]:
            return
        epoch, best = ckpt["best"]["epoch"], self.folder / "best.pt"
        if (_readable_checkpoint(best) or {}).get("epoch") == epoch:
            return
        source_best = path.parent / "best.pt"
        existed = best.exists()      # a stale or damaged best.pt of this run, not a new --out's first one
        if epoch == ckpt["epoch"]:
            atomic_write(best, path.read_bytes())
        elif path.parent != self.folder and (_readable_checkpoint(source_best) or {}).get("epoch") == epoch:
            atomic_write(best, source_best.read_bytes())
        else:
            warnings.warn(f"{best} does not hold the best epoch ({epoch}) and it cannot be rebuilt; it will be "
                          "written again when an epoch improves on it")
            return
        self.log(f"{best} repaired: it now holds the best epoch, {epoch}" if existed else
                 f"{best} written from the resumed run: it holds the best epoch, {epoch}")

    def _repair_record(self, path: Path, ckpt: dict) -> None:
        """results.json must list every epoch of the last.pt it is continued from: a kill between the two
        writes left it an epoch behind (or without its end), and it is rebuilt from the checkpoint."""
        if path != self.folder / "last.pt":
            return
        record = self.folder / "results.json"
        recorded = read_record(record)
        lost = recorded is None and record.exists()     # kept aside: how its processes ended is not known
        rebuilt = _in_line(recorded, ckpt, lost)
        if rebuilt is not recorded:
            kept = ""
            if lost:                                     # kept aside
                aside, k = record.with_name("results.rejected.json"), 1
                while aside.exists():                    # an earlier one is kept too
                    k += 1
                    aside = record.with_name(f"results.rejected-{k}.json")
                atomic_write(aside, record.read_bytes())
                kept = f" (the old file is kept as {aside.name})"
            what = ("was missing" if not record.exists() else
                    f"held no run's record ({why_not_a_record(record)})" if recorded is None else
                    "said 'running' but no process holds the run (it was killed)"
                    if recorded.get("status") == "running" and recorded.get("epochs_done", 0) >= ckpt["epoch"] else
                    f"listed {recorded.get('epochs_done', 0)} of the {ckpt['epoch']} epochs in last.pt (a process "
                    "ended between the writes of the two)")
            atomic_write(record, json.dumps(rebuilt, indent=2, default=str) + "\n")
            self.log(f"{record} {what}: rebuilt from last.pt{kept}")

    # ---- every epoch -----------------------------------------------------------------------------------

    def save(self, record: dict, state: dict) -> None:
        """Add an epoch's ``record`` (``epoch``, ``lr``, ``train`` terms, ``speed``, ``test`` and ``val``
        metrics) with the loop's ``state``: last.pt (and best.pt when the epoch improved) written atomically by
        rank 0 while the stop signals wait, then results.json. The history holds the epoch only once its
        checkpoint is written; every rank waits for rank 0 and the others take the epoch after it."""
        records = self.records + [record]
        status = "finished" if self.done_after(record["epoch"]) else "running"
        lost = self._stop_if_lock_lost()
        if any_rank(lost is not None):
            raise UserError(f"{lost or 'rank 0 lost the lock of the run'}; epoch {record['epoch']} was not saved. "
                            f"Once no other process trains it: {self.continue_command()}")
        if self.is_main:
            self._update_process("running", len(records))  # the checkpoint's own record counts this epoch
            ckpt = {"format": FORMAT, "layout": "plain", "epoch": record["epoch"], **state, **self.record(records)}
            improved = ckpt["best"]["epoch"] == record["epoch"]
            paths = [self.folder / "last.pt"] + ([self.folder / "best.pt"] if improved else [])
            with signals_held():
                atomic_save(ckpt, *paths)
                self.records, self.saved = records, paths[0]   # (before a held signal stops it: the epoch is saved)
        self.write_results(status)
        barrier()   # no rank starts the next epoch before rank 0 has written this one's checkpoint
        self.records, self.saved = records, self.folder / "last.pt"

    # ---- the end of a process ----------------------------------------------------------------------------

    def close(self, error: Optional[BaseException]) -> Optional[str]:
        """Record how this process ended in results.json (rank 0) and unlock. For an interrupt (Ctrl-C,
        SIGTERM, SIGHUP, a closed output pipe) returns the one line for the user: what is saved and the command
        that continues the run."""
        message, sig, end = None, stop_signal(error), None     # end: how this process ended, for its entry
        try:
            lost = self._stop_if_lock_lost()
            if lost and sig:
                message = f"interrupted ({sig}): {lost}"
            elif self.process is not None and error is None:
                self.write_results("finished")
            elif sig and self.done_after(self.epochs):
                # stopped after its last epoch was saved (or opened finished): complete, whatever it was doing
                message = (f"interrupted ({sig}) after the last epoch was saved: {self.saved_state()}; "
                           "the run is finished")
                end = {"status": "finished"}
            elif sig and self.process is not None:
                # the record holds the checkpointed epochs only: an epoch whose save was cut short is trained again
                message = (f"interrupted ({sig}) during epoch {self.epochs + 1}: {self.saved_state()}. "
                           "Continue with: " + self.continue_command())
                end = {"status": "interrupted", "signal": sig}
            elif self.process is not None:
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                if not isinstance(error, UserError):
                    reason = f"{type(error).__name__}: {reason}"
                end = {"status": "failed", "reason": reason}
            elif sig and self.lock is not None:      # opened (maybe repaired), not yet training
                known = self.saved is not None or resume_path(self.config.resume, self.folder) is None
                message = (f"interrupted ({sig}) while starting: "
                           f"{self.saved_state() if known else 'the run is as it was'}. Continue with: "
                           + self.continue_command())
            if end and self.process is not None:
                # the disk that failed the run may fail its record too; the one-line error says why
                with contextlib.suppress(UserError):
                    self.write_results(**end)
        finally:
            self.process = None
            if self.lock is not None:
                self.lock.release()
                self.lock = None
        return message

    def _stop_if_lock_lost(self) -> Optional[str]:
        """When rank 0's lock file was removed or replaced (by hand) while this process trained the run, another
        process may be writing the run now: this one stops writing it (``process`` is None from then on, so
        :meth:`close` records nothing) and the line for the user is returned. Else None."""
        if not (self.is_main and self.process is not None and self.lock is not None and not self.lock.held()):
            return None
        self.process = None
        return (f"{self.lock.path} was removed or replaced while this process trained the run, so another process "
                f"may be writing it; nothing more was written by this one, and {self.saved_state()}")

    def saved_state(self) -> str:
        """What a stopped run keeps, for the user: '<checkpoint> holds epoch N' or 'no epoch had been saved'."""
        return f"{self.saved} holds epoch {self.epochs}" if self.epochs else "no epoch had been saved"

    def continue_command(self, folder: Optional[Path] = None, epochs: Optional[int] = None, world_size: int = 0
                         ) -> str:
        """The command that continues a stopped run (or the run in ``folder``, to ``epochs`` if given, on
        ``world_size`` processes if given): this command with ``--out OUT --resume auto`` in place of any
        ``--out``/``--resume`` it had, or ``--resume PATH`` while the run has no last.pt of its own yet (e.g. after
        --extend-epochs into a new --out), under torchrun with this run's nodes and processes per node (the
        rendezvous options of a multi-node launch are the user's); prefixed with this process's PYTHONPATH where
        the script lies outside the repository's root folder (Python puts the script's own folder on the path, so
        it imports the engine through PYTHONPATH)."""
        folder = folder or self.folder
        resume = self.saved if self.saved not in (None, folder / "last.pt") and folder == self.folder else "auto"
        strip = argparse.ArgumentParser(add_help=False)   # as the script's parser reads them (``--resu`` too);
        strip.add_argument("--out")                        # every other token is left as it was
        strip.add_argument("--resume", nargs="?")
        if epochs is not None:
            strip.add_argument("--epochs")
        rest = strip.parse_known_args(self.argv)[1] + (["--epochs", str(epochs)] if epochs is not None else [])
        world_size = world_size or self.world_size
        launcher = ["python"] if world_size <= 1 else ["torchrun", f"--nproc_per_node={world_size}"]
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))     # (torchrun's processes on this node)
        if world_size == self.world_size and 0 < per_node < world_size:  # several nodes, each started alike
            launcher[1:] = [f"--nnodes={world_size // per_node}", f"--nproc_per_node={per_node}"]
        command = shlex.join(launcher + [self.script, *rest, "--out", str(folder), "--resume", str(resume)])
        if os.environ.get("PYTHONPATH") and Path(self.script).resolve().parent != REPOSITORY:
            command = f"PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])} {command}"   # (a copy kept elsewhere)
        return command

    # ---- --eval-only: the evaluation of a checkpoint, beside the run's files -------------------------------

    def evaluation_file(self) -> Path:
        """``eval-<checkpoint>-<dataset>[-test<N>][-<amp>][-<hash of --data>].json`` in the checkpoint's folder
        (or --out): evaluations of another dataset, of another --eval-subset, in another precision or of another
        copy of the data never overwrite each other."""
        a = self.config
        name = f"eval-{Path(a.eval_only).stem}-{a.dataset}"
        if a.eval_subset:
            name += f"-test{a.eval_subset}"
        if a.amp in ("bf16", "fp16"):
            name += f"-{a.amp}"
        if a.data:
            name += "-" + hashlib.sha256(os.fsencode(Path(a.data).resolve())).hexdigest()[:6]
        return self.folder / f"{name}.json"

    def check_evaluation(self, path: Path, ckpt: dict) -> None:
        """Before evaluating ``ckpt`` (read from ``path``): the evaluation file may only replace an evaluation of
        the same run's same checkpoint file (whatever epoch it held then; in the checkpoint's own folder, the file
        of that name, the folder may have moved), never another run's (``--eval-only OTHER/best.pt --out RUN``) nor
        another checkpoint file of this run (a copy continued into another folder, evaluated into this one). One
        that cannot be read is kept, except in the checkpoint's own folder. An --out of its own must not hold
        another run. A best.pt that does not hold its run's best epoch is evaluated with a warning."""
        target = self.evaluation_file()
        problem = ((self.config.out and self._inside_a_run())       # (the default: the checkpoint's own folder)
                   or inside_the_classes(self.config.dataset, self.config.data, self.folder))
        if problem:
            raise UserError(problem)
        self._refuse_an_unusable_folder(lock=False)
        if target.is_dir():
            raise UserError(f"{target} is a folder where the evaluation is written; move it away, or give another "
                            "--out")
        own_folder = path.absolute().parent == self.folder      # (its file of that name; the folder may have moved)
        if not own_folder and holds_run(self.folder):
            other = (_json_object(self.folder / "results.json").get("run_id")
                     or (_readable_checkpoint(self.folder / "last.pt") or {}).get("run_id"))
            if other != ckpt.get("run_id"):
                raise UserError(f"--out {self.folder} holds another run; give this evaluation an --out of its own (or "
                                f"leave --out out: it is written beside {path})")
        earlier = _json_object(target)       # (older versions recorded no run_id: taken as this run's)
        same_run = earlier.get("run_id", ckpt.get("run_id")) == ckpt.get("run_id")
        recorded = Path(earlier.get("checkpoint") or "")
        same_file = (os.path.samefile(recorded, path) if recorded.is_absolute() and recorded.exists() else
                     own_folder or (not recorded.is_absolute() and str(recorded) == str(path)))   # (older: as given)
        if target.exists() and not (same_run and same_file):
            raise UserError(f"{target} holds the evaluation of another checkpoint "
                            f"({earlier.get('checkpoint', 'unknown')}); evaluating {path} would replace it. Give "
                            "another --out for this evaluation")
        its_run = (read_run(path.parent) or {}) if path.name == "best.pt" and self.is_main else {}
        best = (its_run.get("best") or {}).get("epoch")
        if best not in (None, ckpt["epoch"]) and its_run["status"] != "running":   # (a live run may be saving)
            warnings.warn(f"{path} holds epoch {ckpt['epoch']}, but its run's best epoch is {best} " + (
                f"(its process ended between the writes of last.pt and best.pt); --out {path.parent} --resume auto "
                "rebuilds it" if best == its_run.get("epochs_done") else
                "(it was replaced since; no resume rebuilds an earlier epoch)"))

    def write_evaluation(self, result: dict) -> None:
        """The evaluation file (:meth:`evaluation_file`), written by rank 0."""
        if self.is_main:
            atomic_write(self.evaluation_file(), json.dumps(result, indent=2) + "\n")
            self.log(f"results: {self.evaluation_file()}")

    # ---- results.json ----------------------------------------------------------------------------------------

    def record(self, records: Optional[list] = None) -> dict:
        """What results.json renders (:func:`results_of`): the epochs' ``records`` (default: the saved ones) and
        what the run is; every checkpoint holds it too, so that the record of a run killed between its two
        writes is rebuilt from its last.pt (:func:`read_run`)."""
        return {"method": self.method_cls.name, "run_id": self.run_id,
                "args": {**self.config.as_dict(), "tag": self.tag}, "world_size": self.world_size,
                "processes": self.processes,
                **history_state(self.records if records is None else records, *self.selection), **self.about,
                "command": self.command}

    def results(self, status: str) -> dict:
        return results_of(self.record(), status)

    def write_results(self, status: str, **extra) -> None:
        """Bring this process's entry up to date (its status, and the signal or reason it ended with), then
        write results.json (rank 0)."""
        self._update_process(status, len(self.records), **extra)
        self._write_record(status)

    def _write_record(self, status: str, record: Optional[Mapping] = None) -> None:
        """results.json (rank 0) of ``record`` (default: this run's, :meth:`record`) ending in ``status``."""
        if self.is_main:
            atomic_write(self.folder / "results.json",
                         json.dumps(results_of(record or self.record(), status), indent=2, default=str) + "\n")

    def _update_process(self, status: str, epochs: int, **extra) -> None:
        if self.process is not None:
            t = time.time()
            self.process.update(end_epoch=epochs, updated=_now_iso(t), wall_s=t - self.process["started_unix"],
                                status=status, **extra)
            if status != "running":
                self.process["ended"] = _now_iso(t)

    def recorded(self) -> dict:
        """results.json as written, or this run's record if there is none."""
        return read_record(self.folder / "results.json") or self.results("finished")


def cannot_create(folder: Path, flag: str = "--out") -> Optional[str]:
    """Why ``folder`` cannot be created (a read-only disk, a file in its path, a name too long) or, if it exists,
    written to, or None (the line names ``flag``, the option that chose it); found by creating it, and the folders
    above it that are missing, and removing them again: nothing is left behind."""
    missing = []
    for p in [folder, *folder.parents]:
        with contextlib.suppress(OSError):      # (a name too long cannot even be looked up)
            if p.exists():
                break
        missing.append(p)
    if not missing:                             # (it exists: it must take the run's files)
        if os.access(folder, os.W_OK | os.X_OK):
            return None
        code = errno.EROFS if os.statvfs(folder).f_flag & os.ST_RDONLY else errno.EACCES   # (a mount read-only)
        return os_error_message(folder, OSError(code, os.strerror(code)), flag)
    with signals_held():                        # (Ctrl-C: after the folders made are removed again)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return os_error_message(folder, e, flag)
        finally:
            for p in missing:                   # deepest first; one another process filled stays
                with contextlib.suppress(OSError):
                    p.rmdir()
    return None


def _a_run_below(folder: Path) -> Optional[str]:
    """The line for a folder that holds a run directory (up to 3 levels down: --out runs, --out .): a run there
    would enclose it, and no run inside a run can be resumed or started. None otherwise."""
    inner = next((p.parent for depth in (1, 2, 3) for p in sorted(folder.glob("*/" * depth + RUN_LOCK))
                  if holds_run(p.parent)), None)
    return inner and (f"{folder} holds the run directory {inner}; a run there would enclose it. Give this run an "
                      "--out of its own")


# What a run directory holds besides the run's files (RUN_FILES, eval-*.json): TensorBoard's events, a damaged
# results.json kept aside, logs (reproduce.py's train.log, a shell's `> out.log`, SLURM's slurm-<job>.out), and
# hidden files (temporary writes, .DS_Store). Matched as run_file_role matches: case-insensitively.
RUN_EXTRAS = (RUN_TENSORBOARD, "results.rejected*.json", "*.log", "*.out", "*.err", ".*")


def _not_a_run(folder: Path, checkpoint: str = "") -> Optional[str]:
    """The line for a folder that holds what no run writes (a user's files, a dataset, a home folder) besides the
    ``checkpoint`` resumed there, or None: the run's files would mix with them, and every run below it would lie
    inside a run."""
    try:
        others = sorted(p.name for p in folder.iterdir() if p.name != checkpoint and not (
            run_file_role(p.name) or any(fnmatch.fnmatch(p.name.lower(), x) for x in RUN_EXTRAS)))
    except OSError:
        return None                 # (no folder yet, or not one: the other checks name it)
    if not others:
        return None
    return (f"{folder} holds {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}, which no run writes; give "
            "this run an --out of its own (a new folder, or one that holds only logs: *.log, *.out, *.err)")


def _not_utf8(folder: Path) -> Optional[str]:
    """The line for a run directory whose path is not valid UTF-8 (a file system takes any bytes; TensorBoard
    cannot write under it), or None."""
    try:
        str(folder).encode()
    except UnicodeEncodeError:
        return f"{printable(folder)} is not valid UTF-8, under which TensorBoard cannot write; give an --out that is"
    return None


def _a_folder_in_the_way(folder: Path) -> Optional[str]:
    """The line for a folder named as a file the run writes (last.pt, best.pt, results.json), or None."""
    taken = next((folder / name for name in RUN_FILES if name != RUN_LOCK and (folder / name).is_dir()), None)
    return taken and f"{taken} is a folder where the run writes a file; move it away, or give another --out"


def _earlier_run_files(folder: Path, run_id: Optional[str] = None) -> list[str]:
    """What of another run than ``run_id`` (the run being continued, if any) ``folder`` holds besides last.pt:
    best.pt and the evaluations of its checkpoints (eval-*.json), and a results.json unless it is this
    repository's record of a run that saved no epoch (one stopped in its first epoch, which a new run simply
    replaces)."""
    best = folder / "best.pt"
    of_this_run = run_id is not None and (_readable_checkpoint(best) or {}).get("run_id") == run_id
    evaluations = sorted(p.name for p in folder.glob(RUN_EVALUATIONS)
                         if run_id is None or _json_object(p).get("run_id") != run_id)
    found = (["best.pt"] if best.exists() and not of_this_run else []) + evaluations
    record = folder / "results.json"
    if record.exists():
        saved = _json_object(record)         # unreadable ({}): kept, it may be all that is left of a run
        if not ("method" in saved
                and (saved.get("history") == [] or (run_id is not None and saved.get("run_id") == run_id))):
            found.append("results.json")
    return found


def read_record(path: Path) -> Optional[dict]:
    """A run's results.json, or None: absent, unreadable, or not a run's record (:func:`record_problem`)."""
    data = _json_object(path)
    return None if record_problem(data) else data


def why_not_a_record(path: Path) -> str:
    """Why :func:`read_record` finds no record in ``path``, in a few words for the user."""
    try:
        return record_problem(json.loads(Path(path).read_text())) or "a run's record"
    except FileNotFoundError:
        return "missing"
    except (OSError, UnicodeDecodeError, ValueError):
        return "unreadable, or not JSON (empty, truncated or damaged)"


# The fields the engine and the scripts read, with the types the engine writes; "args.tag": the tag in args.
_FIELD_TYPES = {"args": dict, "status": str, "history": list, "method": str, "epochs": int, "epochs_done": int,
                "world_size": int, "processes": list, "selection": dict, "best": (dict, type(None)),
                "last": (dict, type(None)), "selection.metric": str, "args.tag": (str, type(None)), "args.seed": int,
                "args.arch": str, "args.dataset": str, "args.batch_size": int}


_JSON_NAMES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def record_problem(data) -> Optional[str]:
    """What keeps ``data`` (a parsed results.json) from being a run's record, or None. A hand-edited file may
    hold anything; checked: ``args``, ``status`` and ``history`` are present, the fields the engine and the
    scripts read (:data:`_FIELD_TYPES`) have the engine's types, every epoch has its ``epoch`` (a number),
    ``train`` and ``test``, every process entry is an object, a history has its ``best`` and ``last`` epochs,
    and every train, test and val value of the epochs, of ``best`` and of ``last`` is a finite number."""
    if not isinstance(data, dict) or any(k not in data for k in ("args", "status", "history")):
        return "not a run's record (no status, args or history)"
    for key, kind in _FIELD_TYPES.items():
        parent, _, name = key.rpartition(".")
        fields = data.get(parent, {}) if parent else data   # (a parent is checked before its fields: a dict)
        value = fields.get(name)
        if name in fields and (not isinstance(value, kind) or isinstance(value, bool)):
            return f"its {key!r} is {_JSON_NAMES.get(type(value), 'of another type')}, not what the engine writes"
    if not all(isinstance(p, dict) for p in data.get("processes", [])):
        return "partial: a process entry that is not a JSON object"
    for h in data["history"]:
        if not (isinstance(h, dict) and {"epoch", "train", "test"} <= set(h)):
            return "partial: an epoch record without epoch, train or test"
        if not isinstance(h["epoch"], int) or isinstance(h["epoch"], bool):
            return f"an epoch numbered {h['epoch']!r}, not a number"
        if not all(_metrics(h.get(k)) for k in ("train", "test", "val") if k in h):
            return f"epoch {h['epoch']}: a train, test or val value that is not a finite number"
    for key in ("best", "last"):
        if data["history"] and not data.get(key):
            return f"partial: history without a {key} epoch"
        if data.get(key) and not _metrics(data[key].get("test")):
            return f"{key}: a test value that is not a finite number"
    return None


def _metrics(values) -> bool:
    """A dict of finite numbers (metrics or loss terms, as the engine writes them: a non-finite loss stops a run)."""
    return isinstance(values, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                            and math.isfinite(v) for v in values.values())


def results_of(record: Mapping, status: str) -> dict:
    """results.json of a run whose ``record`` (:meth:`Run.record`, or a checkpoint) ends in ``status``."""
    a, history, processes = record["args"], record["history"], record["processes"]
    final = processes[-1] if processes else {}
    seconds = record["train_seconds"]
    return {
        "status": status,
        **{k: final[k] for k in ("signal", "reason") if k in final and status != "finished"},
        "method": record["method"], "arch": a["arch"], "peer_archs": record.get("peer_archs"),
        "classes": record.get("classes"), "image_size": record.get("image_size"),
        "dataset": a["dataset"], "run_id": record["run_id"], "epochs_done": len(history), "epochs": a["epochs"],
        "recipe": {"name": a["recipe"], **{k: a.get(k) for k in RECIPE_KEYS},
                   "same_as_recipe": all(a.get(k) == RECIPES[a["recipe"]].get(k) for k in RECIPE_KEYS)},
        "selection": {**record["selection"],
                      "note": "best = the epoch with the highest selection metric; its test metrics are "
                              "reported. max_over_epochs_test is what the official codes report when "
                              "selecting on the test set."},
        "best": record["best"], "last": history[-1] if history else None,
        "max_over_epochs_test": record["max_test"],
        "wall_time_s": sum(p.get("wall_s", 0.0) for p in processes),
        "train_time_s": seconds, "train_images_per_s": record["train_samples"] / max(seconds, 1e-9),
        "world_size": record["world_size"], "data": record.get("data"), "git_commit": record.get("git_commit"),
        "versions": record.get("versions"), "command": record.get("command"), "processes": processes,
        "args": a, "history": history,
    }


def read_run(folder: Path) -> Optional[dict]:
    """The record of the run in ``folder``: its results.json, or, when last.pt holds epochs results.json
    does not list (the process was killed between the two writes) and no live process holds the folder,
    the record rebuilt from last.pt; a record saying 'running' that no live process holds says 'killed', and a run
    whose best.pt does not yet hold its last epoch, the best, is not 'finished' (a resume rebuilds it). None when
    there is neither. What reproduce.py and summarize.py read."""
    folder = Path(folder)
    recorded = read_record(folder / "results.json")
    lost = recorded is None and (folder / "results.json").exists()     # (damaged, hand-edited: see _in_line)
    try:
        RunLock(folder).check_free()
    except UserError:
        return recorded                  # a process trains it now (or its lock cannot be read): as it says
    last = folder / "last.pt"
    if recorded and recorded.get("status") == "finished" and not _newer(last, folder / "results.json"):
        return recorded                                    # (no checkpoint to read: summaries stay fast)
    rebuilt = _in_line(recorded, _readable_checkpoint(last), lost)
    if rebuilt is recorded or rebuilt.get("status") != "finished" or not rebuilt["best"]:
        return rebuilt
    best = rebuilt["best"]["epoch"]
    if best == rebuilt["epochs_done"] and (_readable_checkpoint(folder / "best.pt") or {}).get("epoch") != best:
        # stopped between the writes of last.pt and best.pt of the last epoch: not finished until a resume
        # rebuilds best.pt from last.pt (reproduce.py resumes it; an earlier best epoch cannot be rebuilt)
        rebuilt = {**rebuilt, "status": _stopped(rebuilt["processes"]),
                   "reason": f"its process ended before best.pt held the best epoch ({best}); "
                             "--resume auto rebuilds it"}
    return rebuilt


def _newer(path: Path, than: Path) -> bool:
    try:
        return path.stat().st_mtime_ns > than.stat().st_mtime_ns
    except OSError:
        return False


def _in_line(recorded: Optional[dict], ckpt: Optional[dict], lost: bool) -> Optional[dict]:
    """The record of a run no live process holds: ``recorded`` when it lists every epoch of the checkpoint
    ``ckpt`` ('killed' if it still says 'running'), else the checkpoint's own record (its processes merged with
    results.json's): 'finished' when it holds every epoch, else how its last process ended where results.json
    says (interrupted, failed), 'unknown' where results.json could not be read (``lost``), else 'killed'."""
    if recorded is not None and recorded.get("status") == "running":
        recorded = {**recorded, "status": "killed"}        # its process died without a word (SIGKILL, power)
    same_run = recorded is not None and ckpt is not None and recorded.get("run_id") == ckpt.get("run_id")
    if ckpt is None or (same_run and recorded.get("epochs_done", 0) >= ckpt["epoch"]) or "selection" not in ckpt:
        return recorded   # (a checkpoint of an older version holds no record to rebuild from)
    processes = merge_processes(ckpt.get("processes", []), recorded.get("processes") if same_run else None,
                                ckpt["args"]["epochs"], lost)
    return results_of({**ckpt, "processes": processes}, "finished" if ckpt["epoch"] >= ckpt["args"]["epochs"]
                      else _stopped(processes))


def _stopped(processes: Sequence[dict]) -> str:
    """The status of a run stopped before its last epoch: how its last process ended where that is recorded
    (interrupted, failed, unknown), else 'killed'."""
    ended = processes[-1].get("status") if processes else None
    return ended if ended in ("interrupted", "failed", "unknown") else "killed"


class CheckpointRead(NamedTuple):
    path: Optional[Path]            # as given
    stamp: Optional[tuple]          # (device, inode, size, mtime) of the file when it was read
    ckpt: Optional[dict]            # its contents (engine.checkpoint.load_checkpoint)


NOT_READ = CheckpointRead(None, None, None)


def read_checkpoint(path: Path, read: CheckpointRead = NOT_READ) -> CheckpointRead:
    """The checkpoint at ``path``: that of ``read``, one read before (under any spelling of the path), while the
    file is still the one it read (the same device, inode, size and time: an atomic write makes a new inode), else
    read again (a missing or damaged file: :func:`load_checkpoint`'s one line). The stamp is taken before the
    read, so that a later write changes it."""
    try:
        stat = Path(path).stat()
        stamp = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    except OSError:
        stamp = None                 # (a file that is gone: read again, and named if missing)
    same = stamp is not None and read.stamp == stamp
    return CheckpointRead(Path(path), stamp, read.ckpt if same else load_checkpoint(path))


def _json_object(path: Path) -> dict:
    """The JSON object a file holds; {} when it is unreadable or holds something else."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _readable_checkpoint(path: Path) -> Optional[dict]:
    """The checkpoint ``path`` holds; None when it is missing or damaged."""
    try:
        return load_checkpoint(path) if path.is_file() else None
    except UserError:
        return None


# ---- the process record ------------------------------------------------------------------------------------

def _now_iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))


def _holder_of(lock: dict, process: dict) -> bool:
    """The lock record ``lock`` was written by the process of entry ``process``: the same host and pid (a pid
    is reused, in a restarted container for one) and the same start (a lock of older versions has none)."""
    return ((lock.get("host"), lock.get("pid")) == (process.get("host"), process.get("pid"))
            and lock.get("started_unix") in (None, process.get("started_unix")))


_KILLED = "the process ended without recording it (SIGKILL, out of memory or power loss)"


def merge_processes(from_checkpoint: Sequence[dict], from_results: Optional[Sequence[dict]],
                    epochs: Optional[int] = None, lost: bool = False) -> list[dict]:
    """The processes of a run being resumed: the checkpoint's list, with each entry replaced by the one
    ``results.json`` holds unless that one counts fewer epochs (results.json is written after the checkpoint,
    with the process's end; a kill between the two leaves it behind, and so does a failed best.pt write after
    last.pt's: then the checkpoint's count is kept with how results.json says the process ended), and the
    processes ``results.json`` adds (those that ended before finishing an epoch). Epochs after the checkpoint's
    (results.json of a run continued from its best.pt) are another line of the run's history: a process that
    trained them keeps the checkpoint's count and times, with how it ended and a note; one that only trained
    them is left out. An entry still 'running' belongs to a process that ended without writing its end: it
    becomes 'finished' if it saved the run's last epoch (of ``epochs``), as a process stopped by a signal at
    that point is, else 'killed' (SIGKILL, out of memory, power loss), or 'unknown' when ``lost``: the
    results.json that would say how it ended could not be read (damaged, hand-edited)."""
    def key(p: Mapping) -> tuple:     # (the start to the microsecond: two starts in one second are two processes)
        return p.get("host"), p.get("pid"), p.get("started_unix", p.get("started"))
    merged = {key(p): dict(p) for p in from_checkpoint}
    saved_epochs = max((p.get("end_epoch", 0) for p in from_checkpoint), default=float("inf"))   # (older: no list)
    for p in from_results or ():
        saved, ended = merged.get(key(p)), p.get("status") not in (None, "running")
        if p.get("end_epoch", 0) > saved_epochs:          # it trained epochs after the checkpoint's
            if saved is not None:
                saved["note"] = (f"it went on to epoch {p['end_epoch']} after this checkpoint; those epochs are "
                                 "not in this run")
                if ended:
                    saved.update({k: v for k, v in p.items() if k in ("status", "ended", "signal", "reason")})
        elif p.get("end_epoch", 0) >= (saved or {}).get("end_epoch", 0):
            merged[key(p)] = dict(p)
        elif ended:
            saved.update({k: v for k, v in p.items()
                          if k in ("status", "ended", "updated", "wall_s", "signal", "reason", "note")})
    processes = sorted(merged.values(), key=lambda p: p.get("started_unix", 0.0))
    for p in [p for p in processes if p.get("status") == "running"]:
        end = p.get("end_epoch", 0)      # (one that saved no epoch, e.g. killed while extending a run: not the last)
        if epochs is not None and end >= epochs and end > p.get("start_epoch", 0):
            p.update(status="finished", ended=p.get("updated"),
                     note="it saved the run's last epoch; how it ended was not recorded (times are as of its "
                          "last write)")
        elif lost:
            p.update(status="unknown", ended=None, reason="how it ended was recorded in a results.json that could "
                                                          "not be read; times are as of its last write")
        else:
            p.update(status="killed", ended=None, reason=_KILLED + "; times are as of its last write")
    return processes


# ---- one writer per run directory ---------------------------------------------------------------------------

class RunInUse(UserError):
    """Another live process holds the run directory's lock: the run is being trained now."""


class RunLock:
    """The one writer of a run directory: ``acquire()`` creates the folder if needed, takes an exclusive
    ``fcntl.flock`` on ``<dir>/.lock`` (a second process gets a UserError naming the holder's pid) and writes
    the holder (pid, host, start time, command) into it. The kernel releases a flock however its process ends
    (exception, signal, SIGKILL), so a lock file left by a dead process is stale and taken over (``stale``
    then holds the dead holder's record)."""

    def __init__(self, folder: Path, command: str = ""):
        self.folder = Path(folder)
        self.path = self.folder / RUN_LOCK
        self.command = command
        self.fd: Optional[int] = None
        self.stale: Optional[dict] = None
        self.created_folder = False
        self.started: Optional[float] = None    # when acquired (unix time): this process's start in the record

    def acquire(self) -> "RunLock":
        try:
            self.created_folder = not self.folder.exists()
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise UserError(os_error_message(self.folder, e)) from None
        try:
            self._flock(fd, fcntl.LOCK_EX, 0.6, wait_for_ended=True)    # (a probe, check_free, holds it an instant)
        except UserError:
            os.close(fd)
            raise
        if not _names(self.path, fd):         # a holder that left no run removed this file after we opened it
            os.close(fd)
            return self.acquire()
        self.fd = fd
        holder = _json_object(self.path)
        if holder.get("pid"):
            self.stale = holder
        self.started = t = time.time()
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now_iso(t), "started_unix": t,
                  "command": self.command}
        if os.environ.get("TORCHELASTIC_RUN_ID"):     # a worker of torchrun: its launcher is what to signal
            record["torchrun"] = os.getppid()
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        return self

    def check_free(self, wait: bool = False) -> None:
        """Raise the UserError :meth:`acquire` would for a folder another process holds (or whose lock file this
        user cannot read), taking nothing and creating nothing: an existing lock file is share-locked and unlocked
        at once (read-only, so a reader without write permission probes too; NFS takes a shared lock of a file
        open for reading, not an exclusive one). Not for a lock this process holds: the two would conflict.
        ``wait``: as :meth:`acquire`, for a lock held after its holder ended (a process about to take it); a
        reader does not wait, since no process of that holder writes the run."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except PermissionError as e:
            raise UserError(os_error_message(self.path, e)) from None
        except OSError:
            return                  # no lock file yet (or no folder): acquire() says what is wrong
        try:
            self._flock(fd, fcntl.LOCK_SH, 0.0, wait_for_ended=wait)
        finally:
            os.close(fd)            # (closing releases a lock taken here)

    def _flock(self, fd: int, mode: int, patience: float, wait_for_ended: bool) -> None:
        """``flock`` ``fd`` (``mode``: LOCK_EX or LOCK_SH), trying again for ``patience`` seconds while another
        process holds it, and with ``wait_for_ended`` for up to 12 s while the holder the lock file names has ended
        on this host: the DataLoader workers it forked share its lock until they find their parent gone (torch
        looks every 5 s). Else the UserError of :meth:`_not_taken`."""
        start = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                return
            except OSError as e:
                waited = time.monotonic() - start
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) or waited > max(
                        patience, 12.0 if wait_for_ended and self._holder_ended() else 0.0):
                    raise self._not_taken(e) from None
                time.sleep(0.05 if waited < 0.5 else 0.5)

    def _holder_ended(self) -> bool:
        """The process the lock file names ran on this host and has ended."""
        holder = _json_object(self.path)
        return (holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int)
                and not _pid_alive(holder["pid"]))

    def _not_taken(self, error: OSError) -> UserError:
        """The line for a lock that could not be taken: held by another live process (:class:`RunInUse`, named from
        the lock file), held after its holder ended, or the system's error."""
        if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return UserError(os_error_message(self.path, error))
        holder = _json_object(self.path)
        who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"
        if holder.get("torchrun"):    # (a worker alone stopped leaves the other ranks a traceback)
            who += f", a worker of torchrun (process {holder['torchrun']}: signal that one to stop the run)"
        if holder.get("started"):
            who += f" (since {holder['started']}: {holder.get('command', '')})"
        if self._holder_ended():
            return UserError(f"{self.folder} is locked by {who}, which is no longer running, yet its lock is still "
                             "held (a network file system, or a process it started still running?); if no other "
                             f"machine trains this run, delete {self.path}")
        return RunInUse(f"{self.folder} is in use by {who}: one process writes a run at a time; wait for it to end, "
                        "or choose another --out")

    def held(self) -> bool:
        """The lock file is still the one this lock holds: not removed or replaced (by hand) since it was taken,
        when a second process could lock a new file of the same name."""
        return self.fd is not None and _names(self.path, self.fd)

    def release(self) -> None:
        """Unlock (emptying the holder record). The lock file stays: removing it could let two processes
        lock two different files of the same name. Only a folder this lock created and nothing else was
        written to goes, with its lock file, while still locked (a process that opened the file meanwhile
        finds it gone once it has the lock, and starts again: :func:`_names`)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
            if self.created_folder and [p.name for p in self.folder.iterdir()] == [RUN_LOCK]:
                self.path.unlink()      # the run stopped before it began: leave no empty run directory behind
                self.folder.rmdir()
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _names(path: Path, fd: int) -> bool:
    """``path`` still names the file open as ``fd`` (it was not removed or replaced since it was opened)."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(fd))
    except FileNotFoundError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:            # a zombie (killed, not yet reaped by its parent) has ended
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
