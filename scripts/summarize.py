#!/usr/bin/env python
"""Gather every results.json under a folder into tables (markdown or CSV) and plots.

Usage::

    python scripts/summarize.py runs                                   # every run found, seeds grouped
    python scripts/summarize.py runs --table mcl-okd-cifar100          # the paper's layout, paper next to ours
    python scripts/summarize.py runs --table pcl-cifar100 --csv > pcl.csv
    python scripts/summarize.py runs --table fashion-mnist --plots docs/results --into docs/results.md

For a named table (``scripts/tables.py``) each cell gathers the runs in its folders ``<table>/<run>-s<seed>`` (where
``scripts/reproduce.py`` finds them, whatever their tag: a cell's command run by hand with that --out is the cell's)
and elsewhere the runs tagged ``<table>/<run>`` (the tag reproduce.py passes), and shows, in the table's unit (top-1
error or accuracy, %): the mean ± sample standard deviation (n - 1) over seeds at the best epoch and at the last
epoch, the number of finished seeds, the published value and ours (best) minus it. Unfinished runs are counted and
marked, never averaged; a cell without runs is marked missing, a cell whose script does not exist yet "not built".
Runs that trained differently are never averaged into one number: a cell's numbers are those of its runs trained
with the table's command (the options compared are the engine's, ``engine/config.py``, as reproduce.py compares
them; a run on N processes by its global batch); where it has none, those of the runs of one other protocol (the one
with the most finished seeds, e.g. ``reproduce.py --extra="--subset 64"``), marked "other flags", with the flags.
The cell's other runs, and any run of another method given its tag, are "left out": named on stderr and in the runs
column with what they are (``a run of train_kdcl.py``) or how they differ. A results.json that cannot be read
(corrupt, truncated, not a run's) is read from its run's last.pt, and reported by path and skipped where there is
none; so is a record that holds a number that is not finite (NaN, Infinity).

Where the table has a baseline, each method's single number is also set against the baseline on the same
backbone: the gain in top-1 points and whether it exceeds twice its standard error over seeds (marked when
either side was trained with other flags).

Without ``--table``, the runs found are grouped as the seeds of one run by their tag, else by their folder name
without ``-s<seed>``, and only with runs that trained the same (the method and every training option but the
seed): runs of one name that did not are rows of their own (``NAME [1]``, ``NAME [2]``), with a warning.
Symbolic links to run or table folders are followed.
``--into FILE`` writes the markdown between two marker lines of FILE (docs/results.md) instead of printing it.

``--plots DIR`` writes, per cell, test top-1 of every head and the training-loss terms against the epoch
(mean line, ± std band over seeds), and per table a paper-vs-ours bar chart.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import io
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":     # run as a file: the repository's packages are one folder up (imported: already found)
    sys.path.insert(0, str(REPO))

from scripts.tables import TABLES, Cell, Metric, Table  # noqa: E402
from engine.cli import Parser, non_empty_path, run_tool  # noqa: E402  (one-line errors)
from engine.config import describe_differences, without_seed  # noqa: E402  (run_name; a resume's comparison)
from data.files import RUN_LOCK, holds_run, output_problem  # noqa: E402  (what a script may write; run folders)
from scripts import reproduce  # noqa: E402  (the tables' runs and the engine's option comparison)
from engine.run import cannot_create  # noqa: E402  (a folder checked without creating it)

PEER = re.compile(r"^peer(\d+)$")


# ---- reading runs ----------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    path: Path                       # the results.json
    data: dict

    @property
    def tag(self) -> Optional[str]:
        return (self.data.get("args") or {}).get("tag")

    @property
    def seed(self):
        return (self.data.get("args") or {}).get("seed")

    @property
    def finished(self) -> bool:
        return self.data.get("status") == "finished" and self.data.get("epochs_done", 0) >= self.data.get("epochs", 0)

    @property
    def progress(self) -> str:
        """Epochs done of the run's: ``1/2 ep``, with how it stopped when it is not training (``1/2 ep failed``)."""
        status = self.data.get("status")
        stopped = f" {status}" if status in ("failed", "interrupted", "killed", "unknown") else ""
        return f"{self.data.get('epochs_done', 0)}/{self.data.get('epochs', '?')} ep{stopped}"

    def heads(self, which: str = "best") -> dict[str, float]:
        """Top-1 (%) of every head at the best or the last epoch."""
        record = self.data.get(which) or {}
        return {k[:-5]: v for k, v in (record.get("test") or {}).items() if k.endswith("/top1")}

    def value(self, rule: str, which: str = "best") -> Optional[float]:
        """Top-1 (%) a head rule reads (scripts/tables.py): "peers", "last-peer", "selection", "a|b"."""
        heads = self.heads(which)
        peers = {int(PEER.match(h).group(1)): v for h, v in heads.items() if PEER.match(h)}
        for name in rule.split("|"):
            if name == "peers" and peers:
                return statistics.fmean(peers.values())
            if name == "last-peer" and peers:
                return peers[max(peers)]
            if name == "selection":
                name = (self.data.get("selection") or {}).get("metric", "").removesuffix("/top1")
            if name in heads:
                return heads[name]
        return None


def load_runs(root: Path) -> tuple[list[RunResult], list[tuple[Path, str]]]:
    """Every readable run under ``root`` (a folder with a results.json or a last.pt) and, separately, (path,
    reason) for every results.json that is not, for every folder that holds only a best.pt (a run whose
    record and resume point were removed or not copied), and for every run folder that holds only its lock (a run
    in its first epoch, or one killed there): each would otherwise be left out without a word."""
    from engine.errors import UserError
    from engine.run import RunLock, read_run, why_not_a_record
    runs, bad = [], []
    holding = _folders_holding(root, ("results.json", "last.pt", "best.pt", RUN_LOCK))
    folders = holding["results.json"] | holding["last.pt"]
    for path in sorted(folder / "results.json" for folder in folders):
        data = read_run(path.parent)           # brought in line with last.pt, as reproduce.py reads it
        if data is None:
            bad.append((path, f"{why_not_a_record(path)}, and no readable last.pt to rebuild it from"))
            continue
        runs.append(RunResult(path, data))
    for folder in sorted(holding["best.pt"] - folders):
        bad.append((folder, "it holds a best.pt but neither results.json nor last.pt, which a run's numbers are "
                            "read from (a run copied in part?); copy its results.json or last.pt beside it"))
    for folder in sorted(holding[RUN_LOCK] - folders - holding["best.pt"]):
        try:
            RunLock(folder).check_free()
            reason = "its run ended before it recorded an epoch (killed in its first one?); train it again"
        except UserError:
            reason = "a process trains its run now, and has recorded no epoch yet"
        bad.append((folder, reason))
    return runs, bad


def _folders_holding(root: Path, names: Sequence[str]) -> dict[str, set[Path]]:
    """For each file name of ``names``, the folders under ``root`` that hold it, following symbolic links (a table
    folder or a run linked in from another disk, as reproduce.py follows them), each real folder once."""
    found: dict[str, set[Path]] = {name: set() for name in names}
    seen = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:                 # (a link back up, or a second link to one folder)
            subfolders.clear()
            continue
        seen.add(real)
        for name in names:
            if name in files:
                found[name].add(Path(folder))
    return found


# ---- statistics ------------------------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (n - 1; None for one value)."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def in_unit(acc: Optional[float], unit: str) -> Optional[float]:
    return None if acc is None else (100.0 - acc if unit == "error" else acc)


def fmt(mean: Optional[float], std: Optional[float] = None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def signed(value: float) -> str:
    """``+1.25``, ``-0.50``; ``0.00`` for a value that rounds to zero (never ``-0.00``, e.g. -(a - a) on an error
    table)."""
    text = f"{value:+.2f}"
    return "0.00" if float(text) == 0 else text


@dataclass
class MetricSummary:
    metric: Metric
    unit: str
    best: tuple = (None, None)
    last: tuple = (None, None)
    values: list = field(default_factory=list)       # per finished seed, best epoch, in unit

    @property
    def diff(self) -> Optional[float]:
        if self.best[0] is None or self.metric.published is None:
            return None
        return self.best[0] - self.metric.published


@dataclass
class CellSummary:
    cell: Cell
    built: bool
    finished: list
    unfinished: list
    metrics: list
    other_flags: list = field(default_factory=list)   # (run, its training flags that differ from the table's)
    left_out: list = field(default_factory=list)      # (run, why): found for the cell, trained otherwise; not counted

    @property
    def other_flags_text(self) -> str:
        """``other flags in s0, s1: --subset 64 (table: 512)`` (one part per distinct difference), or ''."""
        seeds: dict[str, list] = {}
        for r, text in self.other_flags:
            seeds.setdefault(text, []).append(f"s{r.seed}")
        return "; ".join(f"other flags in {', '.join(s)}: {text}" for text, s in seeds.items())

    @property
    def left_out_text(self) -> str:
        """``left out: s2 (trained with --epochs 1 (table: 2)); s0 (a run of train_kdcl.py, ...)``, or ''."""
        seeds: dict[str, list] = {}
        for r, why in self.left_out:
            seeds.setdefault(why, []).append(f"s{r.seed}")
        return "left out: " + "; ".join(f"{', '.join(s)} ({why})" for why, s in seeds.items()) if seeds else ""

    @property
    def status(self) -> str:
        if not self.built and not self.finished and not self.unfinished:
            return "not built"
        if not self.finished and not self.unfinished:
            return "missing" + (f"; {self.left_out_text}" if self.left_out else "")
        parts = [f"{len(self.finished)} finished"] if self.finished else []
        if self.unfinished:
            parts.append(f"{len(self.unfinished)} unfinished ({', '.join(r.progress for r in self.unfinished)})")
        return ", ".join(parts) + (f"; {self.other_flags_text}" if self.other_flags else "") + (
            f"; {self.left_out_text}" if self.left_out else "")


def dedupe(runs: Sequence[RunResult], warn=None) -> list[RunResult]:
    """One run per seed: a second copy of a seed (a copied folder) is reported and the further-trained kept."""
    by_seed: dict = {}
    for r in runs:
        old = by_seed.get(r.seed)
        if old is None or r.data.get("epochs_done", 0) > old.data.get("epochs_done", 0):
            by_seed[r.seed] = r
        if old is not None and warn:      # (equal epochs: the first found is kept; the line says which)
            kept = by_seed[r.seed]
            how = ("the one with more epochs" if old.data.get("epochs_done", 0) != r.data.get("epochs_done", 0)
                   else "the first found (both have the same epochs)")
            warn(f"two runs of seed {r.seed} with tag {r.tag}: {old.path.parent} and {r.path.parent}; keeping "
                 f"{kept.path.parent}, {how}")
    return [by_seed[s] for s in sorted(by_seed, key=str)]


def flags_against_table(table: Table, cell: Cell, run: RunResult) -> str:
    """The training options (engine.config: every option but where the run lives, labels, devices, speed) on
    which ``run``'s recorded arguments differ from the cell's command, as ``--subset 64 (table: 512), ...``;
    '' when they are the table's (or the cell's script is not there to tell). A run on N processes is compared
    by its global batch (``--batch-size`` is per process): N x the table's batch is another protocol, the
    table's batch split over N processes is not."""
    if not (REPO / cell.script).is_file() or not isinstance(run.seed, int) or run.seed < 0:
        return ""
    spec = reproduce.Run(cell.runs_table or table.name, cell.run, cell.script, cell.argv, run.seed, run.path.parent, [])
    # the number of processes is how the run was launched; what the table's protocol fixes is the global batch
    # (--batch-size is per process): N processes with 1/N of the table's batch train the table's protocol
    world = run.data.get("world_size") or 1
    from engine.config import describe_differences
    diffs = reproduce.recorded_differences(spec, run.data, world_size=world)
    if world == 1:
        return describe_differences(diffs, "table", hint=False)
    batch, table_batch = (run.data.get("args") or {}).get("batch_size"), reproduce.command_config(spec).batch_size
    text = describe_differences([d for d in diffs if d[0] != "batch_size"], "table", hint=False)
    if isinstance(batch, int) and batch * world != table_batch:
        text += (", " if text else "") + (f"--batch-size {batch} on {world} processes: global batch {batch * world} "
                                          f"(table: {table_batch})")
    return text


def summarize_cell(table: Table, cell: Cell, by_tag: dict, warn=None) -> CellSummary:
    """The cell's numbers from its runs (``by_tag``: the cell's tag -> the runs found for it, by folder or tag), and
    only from runs that trained alike: those of the table's command; where there are none, the runs of one other
    protocol (the most finished seeds), marked 'other flags'. A run of another method, and a run trained otherwise
    than the runs counted (engine.config's comparison, as reproduce.py's), is left out, and named in a warning with
    what it is or how it differs: runs trained differently are never averaged into one number."""
    tag = f"{cell.runs_table or table.name}/{cell.run}"
    where = f"{table.name} ({cell.row} / {cell.column})"
    built = (REPO / cell.script).is_file()
    found, left_out = list(by_tag.get(tag, [])), []
    if built:             # a run of another script (tagged or put here by hand) is never one of the cell's seeds
        from engine.checkpoint import saved_by
        method = reproduce.method_class(cell.script).name
        other = [r for r in found if r.data.get("method") not in (None, method)]   # (None: as reproduce.py reads it)
        left_out = [(r, f"a run of {saved_by(r.data)}, not of {cell.script}") for r in other]
        found = [r for r in found if not any(r is o for o in other)]
    flags = [(r, flags_against_table(table, cell, r)) for r in found]
    counted = [(r, text) for r, text in flags if not text]          # the table's command
    basis = "the runs of the table's command"
    if not counted and flags:   # none of the table's command: one protocol's runs, the one with the most finished
        kinds: dict[str, list] = {}     # (one protocol: the same flags against the table's, a global batch as one)
        for r, text in flags:
            kinds.setdefault(text, []).append((r, text))
        counted = max(kinds.values(), key=lambda k: (sum(r.finished for r, _ in k), len(k)))   # (ties: first found)
        basis = f"runs trained with {counted[0][1]}"
    kept = {id(r) for r, _ in counted}
    left_out += [(r, f"a run trained with {text}") for r, text in flags if id(r) not in kept]
    left_out.sort(key=lambda item: (str(item[0].seed), str(item[0].path)))
    for r, why in left_out:
        if warn:
            warn(f"{r.path.parent} is {why}: left out of {where}, " + (
                f"whose numbers are {basis} (runs trained differently are not averaged together)" if counted else
                f"which has no run of {cell.script}"))
    runs = dedupe([r for r, _ in counted], warn)
    other = [(r, text) for r, text in counted if text and any(r is k for k in runs)]
    for r, text in other:
        if warn:
            warn(f"{r.path.parent} was trained with {text}: its numbers are marked 'other flags' in {table.name}")
    finished = [r for r in runs if r.finished]
    unfinished = [r for r in runs if not r.finished]
    metrics = []
    for m in cell.metrics:
        best = [in_unit(r.value(m.head, "best"), table.unit) for r in finished]
        last = [in_unit(r.value(m.head, "last"), table.unit) for r in finished]
        best, last = [v for v in best if v is not None], [v for v in last if v is not None]
        metrics.append(MetricSummary(m, table.unit, mean_std(best), mean_std(last), best))
    return CellSummary(cell, built, finished, unfinished, metrics, other, left_out)


def cell_tag(table: Table, run: RunResult) -> Optional[str]:
    """The tag of the cell whose runs ``run`` is found among: the cell whose folder holds it, as reproduce.py
    finds a cell's run at seed S (``<table>/<run>-sS``, whatever tag the run was given, or none: a command of
    docs/reproducing.md run by hand); else the run's tag."""
    folder = run.path.parent
    for c in table.cells:
        name = c.runs_table or table.name
        if folder.parent.name == name and folder.name == f"{c.run}-s{run.seed}":
            return f"{name}/{c.run}"
    return run.tag


def summarize_table(table: Table, runs: Sequence[RunResult], warn=None) -> list[CellSummary]:
    by_tag: dict[str, list] = {}
    for r in runs:
        by_tag.setdefault(cell_tag(table, r), []).append(r)
    return [summarize_cell(table, c, by_tag, warn) for c in table.cells]


# ---- output ----------------------------------------------------------------------------------------------------
def grid_text(s: CellSummary) -> str:
    """One cell of the paper-layout grid: ours (single, and ensemble in brackets), then the paper's."""
    def pair(values):
        single, *ens = values
        return single + (f" ({ens[0]})" if ens else "")
    paper = pair([fmt(m.metric.published, m.metric.published_std) for m in s.metrics])
    if s.finished:
        counts = [str(len(m.values)) for m in s.metrics]     # the finished runs behind each number
        ours = pair([fmt(*m.best) for m in s.metrics]) + f" n={counts[0] if len(set(counts)) == 1 else pair(counts)}"
        if s.unfinished:
            ours += f" +{len(s.unfinished)} unfinished"
        if s.other_flags:
            ours += " *other flags*"
        if s.left_out:
            ours += f" +{len(s.left_out)} left out"
    elif s.left_out:
        ours = f"*missing* +{len(s.left_out)} left out"
    else:
        ours = {"not built": "*not built*", "missing": "*missing*"}.get(s.status, f"*{s.status}*")
    return f"{ours}<br>paper {paper}" if any(m.metric.published is not None for m in s.metrics) else ours


def markdown_table(table: Table, summaries: Sequence[CellSummary]) -> str:
    by_place = {(s.cell.row, s.cell.column): s for s in summaries}
    unit = f"top-1 {table.unit} (%)"
    lines = [f"### {table.title}", "",
             f"Ours: mean ± std over seeds at the best epoch, n = the finished seeds that give it; {unit}; single "
             "(ensemble). "
             f"Source: {table.source}.", "",
             "| | " + " | ".join(table.columns) + " |", "|---" * (len(table.columns) + 1) + "|"]
    for row in table.rows:
        cells = [grid_text(by_place[(row, col)]) if (row, col) in by_place else "-" for col in table.columns]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    published = any(c.metrics and any(m.published is not None for m in c.metrics) for c in table.cells)
    lines += ["", f"Per cell ({unit}" + ("; Δ = ours (best) − paper):" if published else "):"), "",
              "| row | column | number | head | n | best | last |" + (" paper | Δ |" if published else "") + " runs |",
              "|---" * (8 + 2 * published) + "|"]
    for s in summaries:
        for m in s.metrics:
            paper = fmt(m.metric.published, m.metric.published_std)
            diff = "-" if m.diff is None else signed(m.diff)
            lines.append(f"| {s.cell.row} | {s.cell.column} | {m.metric.kind} | `{m.metric.head}` | "
                         f"{len(m.values)} | {fmt(*m.best)} | {fmt(*m.last)} |"
                         + (f" {paper} | {diff} |" if published else "") + f" {s.status} |")
    against = against_baseline(table, summaries)
    if against:
        lines += ["", "Against the baseline network on the same backbone (best epoch): gain = top-1 points gained by "
                      "the method's single (or ensemble) number over the baseline (> 0: better, in either unit); "
                      "se = sqrt(s₁²/n₁ + s₂²/n₂) over the seeds (- where a side has one seed: not known); "
                      "\"beyond noise\" when |gain| > 2 se (with 2-3 seeds a rough screen, not a test).", "",
                  "| row | column | number | gain | se | reading |", "|---|---|---|---|---|---|"] + against
    if any(s.other_flags for s in summaries):
        lines += ["", "*other flags*: runs of the cell were trained with other training flags than the table's "
                      "command (a changed budget, e.g. `reproduce.py --extra`): their numbers are not the table's. "
                      "The runs column lists the flags."]
    if any(s.left_out for s in summaries):
        lines += ["", "*left out*: runs found for the cell (in its folder, or tagged with it) that are of another "
                      "method, or trained otherwise than the runs its numbers are of: they are not averaged in. The "
                      "runs column says what each is."]
    if table.notes:
        lines += [""] + [f"- {n}" for n in table.notes]
    return "\n".join(lines)


def against_baseline(table: Table, summaries: Sequence[CellSummary]) -> list[str]:
    """Markdown rows: each method's single number against the baseline cell of the same backbone (sharing the
    method's row or column), with the spread over seeds. Gain > 0 means better in either unit."""
    rows = []
    baselines = [b for b in summaries if b.cell.method == "baseline" and b.metrics[0].best[0] is not None]
    for s in summaries:
        if s.cell.method == "baseline":
            continue
        same = [b for b in baselines if b.cell.arch == s.cell.arch]
        ref = next((b for b in same if s.cell.row == b.cell.row or s.cell.column == b.cell.column), None)
        if ref is None:
            continue
        theirs = ref.metrics[0]
        for ours in s.metrics:
            if ours.best[0] is None:
                continue
            gain = ours.best[0] - theirs.best[0]
            if table.unit == "error":
                gain = -gain
            n1, n2 = len(ours.values), len(theirs.values)
            # (one seed has no spread: its standard error is not known, not 0)
            se = math.sqrt(ours.best[1] ** 2 / n1 + theirs.best[1] ** 2 / n2) if min(n1, n2) > 1 else None
            if n1 < 2 or n2 < 2:
                reading = "too few seeds to tell"
            elif abs(gain) > 2 * se:
                reading = "better, beyond noise" if gain > 0 else "worse, beyond noise"
            else:
                reading = "within noise"
            if s.other_flags or ref.other_flags:    # not the table's protocol: said here too, not only in the cell
                reading += "; other flags in " + " and ".join(f"{c.cell.row} {c.cell.column}" for c in (s, ref)
                                                              if c.other_flags)
            rows.append(f"| {s.cell.row} | {s.cell.column} | {ours.metric.kind} | {signed(gain)} | {fmt(se)} | "
                        f"{reading} |")
    return rows


CSV_FIELDS = ["table", "row", "column", "run", "script", "number", "head", "unit", "n_finished", "n_unfinished",
              "best_mean", "best_std", "last_mean", "last_std", "paper", "paper_std", "diff", "status", "values",
              "other_flags"]


def csv_rows(table: Table, summaries: Sequence[CellSummary]) -> list[dict]:
    rows = []
    for s in summaries:
        for m in s.metrics:
            rows.append(dict(table=table.name, row=s.cell.row, column=s.cell.column, run=s.cell.run,
                             script=s.cell.script, number=m.metric.kind, head=m.metric.head, unit=table.unit,
                             n_finished=len(s.finished), n_unfinished=len(s.unfinished),
                             best_mean=m.best[0], best_std=m.best[1], last_mean=m.last[0], last_std=m.last[1],
                             paper=m.metric.published, paper_std=m.metric.published_std, diff=m.diff,
                             status=s.status, values=" ".join(f"{v:.2f}" for v in m.values),
                             other_flags=s.other_flags_text))
    return rows


def group_runs(runs: Sequence[RunResult], warn=None) -> dict[str, list[RunResult]]:
    """Untabled runs grouped as the seeds of one run: by their tag, or by their folder name without its
    ``-s<seed>`` (engine.config.without_seed: ``x-s0-1a2b3c4d`` and ``x-s1-1a2b3c4d`` are both ``x-1a2b3c4d``),
    and within that with the runs that trained the same (the method, and every training option but the seed,
    compared as a resume compares them: engine.config.differences). Runs of one name that did not are not seeds
    of one run: each kind is a group of its own, ``NAME [1]``, ``NAME [2]``, ..., with a warning naming their
    folders."""
    by_name: dict[str, list[list[RunResult]]] = {}
    for r in runs:
        kinds = by_name.setdefault(r.tag or without_seed(r.path.parent.name), [])
        kind = next((k for k in kinds if not _training_differences(k[0], r)), None)
        if kind is None:
            kinds.append([r])
        else:
            kind.append(r)
    groups = {}
    for name, kinds in by_name.items():
        keys = [name] if len(kinds) == 1 else [f"{name} [{i}]" for i in range(1, len(kinds) + 1)]
        groups.update(zip(keys, kinds))
        if len(kinds) > 1 and warn:
            warn(f"the runs named {name} did not all train the same (method or training options other than the "
                 "seed), so they are not averaged together: " + "; ".join(
                     f"{key}: {', '.join(str(r.path.parent) for r in members)}" + (
                         f" ({describe_differences(_training_differences(kinds[0][0], members[0]), keys[0], False)})"
                         if i else "") for i, (key, members) in enumerate(zip(keys, kinds))))
    return groups


@functools.lru_cache(maxsize=None)
def _method_defaults(method: str, arch, dataset, data) -> dict:
    """The training options ``method`` defaults to for ``arch`` on ``dataset`` (engine.config.default_options);
    {} when they cannot be known: a method script no longer there, or an arch or dataset this version does not know
    (argparse's line for those is not shown)."""
    from engine.config import default_options
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return default_options(reproduce.method_class(f"train_{method}.py"),
                                   argparse.Namespace(arch=arch, dataset=dataset, data=data))
    except (Exception, SystemExit):
        return {}


def _training_differences(a: RunResult, b: RunResult) -> list[tuple]:
    """How ``b``'s training differs from ``a``'s, as (key, ``b``'s value, ``a``'s value); [] when they ran one method
    with the same training options, the seed aside (an option one record lacks, an older version's, counts as the
    method's default, as when a run is resumed)."""
    from engine.config import differences
    method, args = a.data.get("method"), a.data.get("args") or {}
    if method != b.data.get("method"):
        return [("method", b.data.get("method"), method)]
    named = (method, args.get("arch"), args.get("dataset"), args.get("data"))
    defaults = _method_defaults(*named) if all(isinstance(v, (str, type(None))) for v in named) else {}   # (edited)
    return [(key, now, before) for key, before, now in differences(
        {**args, "seed": 0, "world_size": a.data.get("world_size", 1)},
        {**(b.data.get("args") or {}), "seed": 0, "world_size": b.data.get("world_size", 1)}, defaults,
        trained=a.data)]


def markdown_runs(groups: dict[str, list[RunResult]], warn=None) -> str:
    lines = ["| runs | method | arch | dataset | epochs | head | n | best top-1 | last top-1 | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, runs in sorted(groups.items()):
        runs = dedupe(runs, warn)
        finished = [r for r in runs if r.finished]
        unfinished = [r for r in runs if not r.finished]
        status = f"{len(finished)} finished" + (f", {len(unfinished)} unfinished ("
                                                f"{', '.join(r.progress for r in unfinished)})" if unfinished else "")
        first = runs[0].data
        heads = list(dict.fromkeys(head for r in runs for head in r.heads("last"))) or ["-"]    # (every seed's)
        for head in heads:       # n: the finished runs that hold the head
            best = [r.heads("best")[head] for r in finished if head in r.heads("best")]
            last = [r.heads("last")[head] for r in finished if head in r.heads("last")]
            lines.append(f"| {key} | {first.get('method')} | {first.get('arch')} | {first.get('dataset')} | "
                         f"{first.get('epochs', '?')} | {head} | {len(best)} | {fmt(*mean_std(best))} | "
                         f"{fmt(*mean_std(last))} | {status} |")
    return "\n".join(lines)


# ---- plots -----------------------------------------------------------------------------------------------------
def _band(ax, series: list[dict], label: str, lw: float = 1.5):
    """Mean line and ± std band of per-seed {epoch: value} series."""
    import numpy as np
    epochs = sorted({e for s in series for e in s})
    mean = np.array([statistics.fmean([s[e] for s in series if e in s]) for e in epochs])
    std = np.array([statistics.stdev(v) if len(v := [s[e] for s in series if e in s]) > 1 else 0.0 for e in epochs])
    line, = ax.plot(epochs, mean, label=label, lw=lw, marker="o" if len(epochs) < 20 else None, ms=3)
    ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)


def plot_curves(runs: Sequence[RunResult], title: str, path: Path) -> Path:
    """Test top-1 per head and training-loss terms against the epoch, mean ± std over the runs (seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in runs if r.data.get("history")]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    heads = list(dict.fromkeys(k[:-5] for r in runs for k in r.data["history"][-1]["test"] if k.endswith("/top1")))
    for head in heads:
        _band(acc_ax, [{h["epoch"]: h["test"][f"{head}/top1"] for h in r.data["history"]
                        if f"{head}/top1" in h.get("test", {})} for r in runs], head,
              lw=1.0 if PEER.match(head) else 2.2)       # the peers thin, ensembles and teachers bold
    terms = list(dict.fromkeys(term for r in runs for term in r.data["history"][-1]["train"]))
    for term in terms:
        _band(loss_ax, [{h["epoch"]: h["train"][term] for h in r.data["history"] if term in h.get("train", {})}
                        for r in runs], "total" if term == "loss" else term)
    n = len(runs)
    acc_ax.set(title="test top-1 per head", xlabel="epoch", ylabel="top-1 accuracy (%)")
    loss_ax.set(title="training loss terms (epoch mean)", xlabel="epoch", ylabel="loss")
    from matplotlib.ticker import MaxNLocator
    for ax in (acc_ax, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"{title}  (mean ± std over {n} seed{'s' if n > 1 else ''})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_paper_vs_ours(table: Table, summaries: Sequence[CellSummary], path: Path) -> Optional[Path]:
    """Bars: the paper's number and ours (best, mean ± std over seeds) for every cell and number, one panel per
    backbone (the table's rows or columns, whichever names the backbones), the methods side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows_are_backbones = all(len({c.arch for c in table.cells if c.row == r}) <= 1 for r in table.rows)
    if len(table.columns) == 1:
        panel_of, label_of, panels = (lambda c: c.column), (lambda c: c.row), table.columns
    elif rows_are_backbones:
        panel_of, label_of, panels = (lambda c: c.row), (lambda c: c.column), table.rows
    else:
        panel_of, label_of, panels = (lambda c: c.column), (lambda c: c.row), table.columns
    by_panel = {p: [s for s in summaries if panel_of(s.cell) == p] for p in panels}
    by_panel = {p: v for p, v in by_panel.items() if v}
    if not by_panel:
        return None
    ncols = min(3, len(by_panel))
    nrows = math.ceil(len(by_panel) / ncols)
    width = max(len(v) for v in by_panel.values())
    any_paper = any(m.metric.published is not None for s in summaries for m in s.metrics)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(8.0 / ncols, 0.6 * width + 1.6) * ncols, 4.0 * nrows + 1.0),
                             squeeze=False)
    for ax, (panel, cells) in zip(axes.flat, by_panel.items()):
        labels, paper, ours, err = [], [], [], []
        for s in cells:
            for m in s.metrics:
                labels.append(label_of(s.cell) + (" (ens.)" if m.metric.kind == "ensemble" else "")
                              + (" [other flags]" if s.other_flags else ""))
                paper.append(np.nan if m.metric.published is None else m.metric.published)
                ours.append(np.nan if m.best[0] is None else m.best[0])
                err.append(0.0 if m.best[1] is None else m.best[1])
        x = np.arange(len(labels))
        shift = 0.2 if any_paper else 0.0
        if any_paper:
            ax.bar(x - shift, paper, 0.4, label="paper", color="#9e9e9e")
        ax.bar(x + shift, ours, 0.4, yerr=err, label="ours: best epoch, mean ± std over seeds", color="#1f77b4",
               capsize=3)
        values = [v for v in paper if not np.isnan(v)]
        values += [v + e for v, e in zip(ours, err) if not np.isnan(v)] + [v - e for v, e in zip(ours, err)
                                                                           if not np.isnan(v)]
        lo, hi = (min(values), max(values)) if values else (0.0, 100.0)
        bottom = max(0.0, lo - 0.2 * (hi - lo) - 2)
        ax.set_ylim(bottom, min(100.0, hi + 0.1 * (hi - lo) + 2) if hi < 100 else hi + 1)
        for i, v in enumerate(ours):
            if np.isnan(v):
                ax.text(x[i] + shift, bottom, " no run", rotation=90, ha="center", va="bottom", fontsize=8,
                        color="#b00000")
        ax.set_xticks(x, labels, rotation=40, ha="right", fontsize=9)
        ax.set_title(panel, fontsize=11)
        ax.set_ylabel(f"top-1 {table.unit} (%)")
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(by_panel):]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    top = 1 - 0.9 / fig.get_figheight()
    fig.suptitle(f"{table.title}: {'paper vs ours' if any_paper else 'ours'} (top-1 {table.unit}, %)", y=0.995,
                 va="top")
    fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.4 / fig.get_figheight()), fontsize=9,
               ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, top))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(out: Path, table: Optional[Table], summaries, groups) -> list[Path]:
    written = []
    if table is not None:
        for s in summaries:
            runs = [r for r in s.finished + s.unfinished if r.data.get("history")]
            if runs and s.cell.runs_table is None:
                flags = " [other flags than the table]" if s.other_flags else ""
                written.append(plot_curves(runs, f"{table.name}: {s.cell.row} / {s.cell.column}{flags}",
                                           out / table.name / f"{s.cell.run}.png"))
        if any(m.metric.published is not None for s in summaries for m in s.metrics) or any(s.finished for s in summaries):
            p = plot_paper_vs_ours(table, summaries, out / f"{table.name}-paper-vs-ours.png")
            written += [p] if p else []
    else:
        for key, runs in groups.items():
            runs = [r for r in runs if r.data.get("history")]
            if runs:
                written.append(plot_curves(runs, key, out / (key.replace("/", "__") + ".png")))
    return sorted(set(written))


# ---- command line ----------------------------------------------------------------------------------------------
def plots_folder(path: Path) -> Optional[str]:
    """One line naming the --plots folder when it cannot be created (found without leaving it behind: a command
    refused later creates nothing), or when it is (or lies in) a run's folder: a run directory takes its own files
    only, and would no longer resume with plots in it. None when it can take the plots."""
    run = next((p for p in [path.absolute(), *path.absolute().parents] if holds_run(p)), None)
    if run is not None:
        return (f"error: --plots {path} lies in the run directory {run}; give a folder outside the runs' own "
                "folders")
    if path.exists() and not path.is_dir():
        return f"error: --plots {path} is a file, not a folder; give a folder for the plots"
    problem = cannot_create(path.absolute(), "--plots")
    return problem and f"error: {problem}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = Parser(description=__doc__.split("\n\n")[0], epilog="tables: " + ", ".join(TABLES))
    p.add_argument("runs_dir", type=non_empty_path, help="folder searched (recursively) for results.json files")
    p.add_argument("--table", choices=list(TABLES), help="summarise this table in the paper's layout")
    p.add_argument("--csv", action="store_true", help="CSV (one line per cell and number) instead of markdown")
    p.add_argument("--plots", type=non_empty_path, metavar="DIR", help="write PNG plots here")
    p.add_argument("--into", type=non_empty_path, metavar="FILE.md",
                   help="with --table: write the markdown (and links to the plots) into FILE between the lines "
                        f"'{BEGIN}' and '{END}' instead of printing it")
    args = p.parse_args(argv)
    if args.into and (not args.table or args.csv):
        p.error("--into needs --table and markdown output (no --csv)")

    root = Path(args.runs_dir)
    if not root.is_dir():
        print(f"error: {root} " + ("is a file, not a folder of runs" if root.exists() else "does not exist")
              + "; give the folder that holds the run directories (e.g. runs)", file=sys.stderr)
        return 2
    if args.into:                 # before anything is read or drawn: the page must take the block
        try:
            read_block_page(Path(args.into))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        problem = output_problem(Path(args.into), "--into", True, "results.md")    # never a run's own file
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    if args.plots:
        problem = plots_folder(Path(args.plots))
        if problem:
            print(problem, file=sys.stderr)
            return 2

    def warn(text):
        print(f"warning: {text}", file=sys.stderr)

    runs, bad = load_runs(root)
    for path, reason in bad:
        warn(f"skipped {path}: {reason}")
    table = TABLES[args.table] if args.table else None
    summaries, groups = [], {}
    if table is not None:
        summaries = summarize_table(table, runs, warn)
        if args.into and not any(s.finished for s in summaries):    # (a runs folder without the table's runs)
            print(f"error: no finished run of table {table.name} under {root}; {args.into} is left as it is (--into "
                  "replaces its table with the one these runs give): give the folder the table's runs were trained "
                  "into (reproduce.py --runs-dir), or leave out --into to print the table", file=sys.stderr)
            return 2
        if args.csv:
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, CSV_FIELDS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(csv_rows(table, summaries))
            print(buffer.getvalue(), end="")
        elif not args.into:
            print(markdown_table(table, summaries))
    else:
        groups = group_runs(runs, warn)
        if args.csv:
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            writer.writerow(["runs", "path", "seed", "status", "epochs_done", "head", "best_top1", "last_top1"])
            for key, group in sorted(groups.items()):
                for r in group:
                    for head, value in (r.heads("best") or {"": None}).items():    # (no epoch: its status alone)
                        writer.writerow([key, r.path.parent, r.seed, r.data["status"], r.data.get("epochs_done"),
                                         head, value, r.heads("last").get(head)])
            print(buffer.getvalue(), end="")
        elif groups:
            print(markdown_runs(groups, warn))
        else:
            print(f"no readable results.json under {root}" if bad else f"no results.json under {root}")
    plots = []
    if args.plots:
        try:
            plots = write_plots(Path(args.plots), table, summaries, groups)
        except OSError as e:
            print(f"error: --plots {args.plots}: cannot write {e.filename or args.plots}: {e.strerror or e}; "
                  "choose another folder", file=sys.stderr)
            return 2
    for path in plots:
        print(f"plot: {path}", file=sys.stderr)
    if args.into:
        try:
            fill_block(Path(args.into), markdown_table(table, summaries), plots)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"updated {args.into}", file=sys.stderr)
    return 0


BEGIN, END = "<!-- summarize.py: begin -->", "<!-- summarize.py: end -->"


def read_block_page(path: Path) -> str:
    """The text of ``path``, which must hold one BEGIN and, after it, one END marker line (ValueError: one line
    naming the file)."""
    try:
        page = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise ValueError(f"--into {path}: cannot read it ({reason}); give an existing markdown file with the "
                         f"lines '{BEGIN}' and '{END}'") from None
    if page.count(BEGIN) != 1 or page.count(END) != 1 or page.index(BEGIN) > page.index(END):
        raise ValueError(f"{path} needs one line '{BEGIN}' and, after it, one line '{END}'")
    return page


def fill_block(path: Path, text: str, plots: Sequence[Path] = ()) -> None:
    """Replace what lies between the BEGIN and END marker lines of ``path`` with ``text`` and image links. The
    page is replaced at once (a temporary file in its folder, then a rename): it is the old page or the new one,
    never half of one. ValueError (one line naming the file) when it cannot be read or written."""
    import os
    from data.files import write_atomically
    page = read_block_page(path)
    links = [f"![{p.stem}]({Path(os.path.relpath(p.resolve(), path.resolve().parent)).as_posix()})" for p in plots]
    body = text + ("\n\n" + "\n\n".join(links) if links else "")
    head, rest = page.split(BEGIN)
    new = f"{head}{BEGIN}\n{body}\n{END}{rest.split(END, 1)[1]}"
    target = path.resolve()           # a link to the page: the page it points to is replaced, the link kept
    try:
        write_atomically(target, "w", lambda f: f.write(new), permissions=target.stat().st_mode & 0o7777)
    except OSError as e:
        raise ValueError(f"--into {path}: cannot write {e.filename or path}: {e.strerror or e}; the page is "
                         "unchanged") from None


if __name__ == "__main__":
    run_tool(main)
