"""scripts/summarize.py on hand-made results.json files (engine format): statistics against hand computation,
head rules, units, corrupt / partial / running files, CSV, plots."""
from __future__ import annotations

import csv
import io
import math

import pytest

from scripts import summarize
from scripts.tables import TABLES, Table, cell
from tests.results_factory import results, write


def table_mcl(epochs: int = 3) -> Table:
    """A two-cell error table: MCL-OKD reads the last peer, DML the peer mean; published single (ensemble). Its
    commands train ``epochs`` epochs, as the hand-made runs record (the other options: the defaults)."""
    budget = ("--epochs", str(epochs))
    return Table("t", "test table", "test", "error", ["ResNet-32"], ["DML", "MCL-OKD"], [
        cell("ResNet-32", "DML", "dml", "resnet32", budget, single=25.0, ensemble=23.0),
        cell("ResNet-32", "MCL-OKD", "mcl_okd", "resnet32", budget, single=24.52, ensemble=22.0)])


def write_dml(root, seed, peer1, peer2, ens, tag="t/dml-resnet32", **kw):
    return write(root / f"dml-resnet32-s{seed}" / "results.json",
                 results(tag, seed, {"peer1": peer1, "peer2": peer2, "ensemble": ens}, **kw))


def test_mean_std_against_hand_computation(tmp_path):
    # best epoch = epoch 2 (highest ensemble) in every seed; last = epoch 3
    write_dml(tmp_path, 0, [50, 70, 69], [52, 74, 73], [55, 76, 75])
    write_dml(tmp_path, 1, [51, 72, 71], [53, 76, 70], [56, 78, 77])
    write_dml(tmp_path, 2, [49, 68, 60], [50, 70, 61], [54, 74, 73])
    runs, bad = summarize.load_runs(tmp_path)
    assert not bad and len(runs) == 3
    dml, mcl = summarize.summarize_table(table_mcl(), runs)
    single, ens = dml.metrics
    # error of the mean peer at the best epoch: 100 - (70+74)/2 = 28, 100 - (72+76)/2 = 26, 100 - (68+70)/2 = 31
    assert single.values == pytest.approx([28.0, 26.0, 31.0])
    assert single.best[0] == pytest.approx(85 / 3)
    assert single.best[1] == pytest.approx(math.sqrt(((28 - 85 / 3) ** 2 + (26 - 85 / 3) ** 2 + (31 - 85 / 3) ** 2) / 2))
    # last epoch ensemble error: 25, 23, 27 -> 25 ± 2
    assert ens.last == pytest.approx((25.0, 2.0))
    assert ens.best == pytest.approx((24.0, 2.0))            # 24, 22, 26
    assert single.diff == pytest.approx(85 / 3 - 25.0)
    assert len(dml.finished) == 3 and dml.status == "3 finished"
    assert mcl.status == "missing" and mcl.metrics[0].best == (None, None)


def test_n_counts_the_runs_behind_each_number(tmp_path):
    """A finished run without the ensemble head (an older version's) gives the single number only: n says so."""
    write_dml(tmp_path, 0, [70], [74], [80], selection="peer1")
    write(tmp_path / "dml-resnet32-s1" / "results.json",
          results("t/dml-resnet32", 1, {"peer1": [72.0], "peer2": [76.0]}, selection="peer1"))
    runs, _ = summarize.load_runs(tmp_path)
    t = table_mcl(epochs=1)
    summaries = summarize.summarize_table(t, runs)
    assert [len(m.values) for m in summaries[0].metrics] == [2, 1]
    assert summarize.grid_text(summaries[0]).startswith("27.00 ± 1.41 (20.00) n=2 (1)<br>")
    page = summarize.markdown_table(t, summaries)
    assert "| ResNet-32 | DML | ensemble | `ensemble` | 1 | 20.00 | 20.00 |" in page


def test_head_rules(tmp_path):
    curves = {"peer1": [60.0], "peer2": [62.0], "peer3": [64.0], "peer4": [70.0], "leader": [66.0],
              "ensemble": [72.0], "teacher": [73.0]}
    r = summarize.RunResult(tmp_path / "results.json", results("x", 0, curves, selection="leader"))
    assert r.value("peers") == pytest.approx(64.0)
    assert r.value("last-peer") == 70.0
    assert r.value("selection") == 66.0
    assert r.value("fused|teacher") == 73.0
    assert r.value("fused") is None
    single = summarize.RunResult(tmp_path / "results.json", results("x", 0, {"net": [50.0]}, selection="net"))
    assert single.value("net") == 50.0 and single.value("peers") is None


def test_corrupt_partial_and_running_files_are_reported_and_skipped(tmp_path, capsys):
    write_dml(tmp_path, 0, [60, 70], [60, 70], [62, 72])
    write_dml(tmp_path, 1, [61, 71], [61, 71], [63, 73])
    write_dml(tmp_path, 2, [40], [40], [45], epochs=2)                         # running: epoch 1 of 2
    corrupt = tmp_path / "dml-resnet32-s3" / "results.json"
    corrupt.parent.mkdir()
    corrupt.write_text('{"status": "running", "history": [')                    # cut mid-write
    stranger = write(tmp_path / "other" / "results.json", {"hello": 1})         # not a run's results.json
    broken = results("t/dml-resnet32", 4, {"peer1": [1.0], "peer2": [1.0], "ensemble": [1.0]})
    del broken["history"][0]["test"]
    broken = write(tmp_path / "dml-resnet32-s4" / "results.json", broken)       # an epoch without its test
    code = summarize.main([str(tmp_path), "--table", "fashion-mnist"])
    captured = capsys.readouterr()
    assert code == 0
    for path in (corrupt, stranger, broken):
        assert f"skipped {path}" in captured.err
    assert "*missing*" in captured.out                                           # fashion-mnist has no runs here

    runs, bad = summarize.load_runs(tmp_path)
    assert {p for p, _ in bad} == {corrupt, stranger, broken}
    dml, _ = summarize.summarize_table(table_mcl(2), runs)
    assert len(dml.finished) == 2 and len(dml.unfinished) == 1
    # its results.json says 'running', but no process holds the run: killed (engine.run.read_run); a run that
    # trains now has nothing more to say
    assert dml.status == "2 finished, 1 unfinished (1/2 ep killed)"
    dml.unfinished[0].data["status"] = "running"
    assert dml.status == "2 finished, 1 unfinished (1/2 ep)"
    assert dml.metrics[1].best[0] == pytest.approx(100 - 72.5)                  # the running seed is not averaged
    text = summarize.markdown_table(table_mcl(2), [dml, _])
    assert "+1 unfinished" in text and "*missing*" in text
    assert "| ResNet-32 | DML | single | `peers` | 2 | 29.50 ± 0.71 | 29.50 ± 0.71 | 25.00 | +4.50 |" in text


def test_a_run_folder_with_only_its_lock_is_reported_not_skipped_silently(tmp_path, capsys):
    """A seed whose process was killed in its first epoch left its folder with only its lock (and a train.log):
    summarize.py names it, as trained now while a process holds the lock, else as to train again (the table
    showed n=1 of 2 seeds without a word)."""
    from engine.run import RunLock
    write_dml(tmp_path, 0, [60, 70], [60, 70], [62, 72])
    killed = tmp_path / "dml-resnet32-s1"
    killed.mkdir()
    (killed / ".lock").write_text('{"pid": 999999}')
    (killed / "train.log").write_text("epoch 1/2 ...")
    assert summarize.main([str(tmp_path)]) == 0
    assert (f"warning: skipped {killed}: its run ended before it recorded an epoch (killed in its first one?); train "
            "it again") in capsys.readouterr().err
    lock = RunLock(killed, "train_dml.py").acquire()
    try:
        assert summarize.load_runs(tmp_path)[1] == [(killed, "a process trains its run now, and has recorded no "
                                                             "epoch yet")]
    finally:
        lock.release()


def test_a_folder_with_only_best_pt_is_reported_not_skipped_silently(tmp_path, capsys):
    """A run folder that kept best.pt but lost results.json and last.pt (copied in part) cannot be read: it is
    named in a warning as an unreadable results.json is, not left out of the summary without a word."""
    write_dml(tmp_path, 0, [60, 70], [60, 70], [62, 72])
    partial = tmp_path / "dml-resnet32-s1"
    partial.mkdir()
    (partial / "best.pt").write_bytes(b"a checkpoint")
    assert summarize.main([str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert err == (f"warning: skipped {partial}: it holds a best.pt but neither results.json nor last.pt, which a "
                   "run's numbers are read from (a run copied in part?); copy its results.json or last.pt beside it\n")
    runs, bad = summarize.load_runs(tmp_path)
    assert len(runs) == 1 and [p for p, _ in bad] == [partial]


def test_not_built_mark(tmp_path):
    t = Table("t", "t", "t", "accuracy", ["X"], ["R"], [cell("X", "R", "dml", "resnet20")])
    s = summarize.summarize_table(t, [])[0]
    assert s.status == "missing"
    ghost = cell("X", "R", "dml", "resnet20")
    object.__setattr__(ghost, "method", "no_such_method")
    t2 = Table("t", "t", "t", "accuracy", ["X"], ["R"], [ghost])
    assert summarize.summarize_table(t2, [])[0].status == "not built"
    assert "*not built*" in summarize.markdown_table(t2, summarize.summarize_table(t2, []))


def test_table_layout_csv_and_untabled_runs(tmp_path, capsys):
    t = TABLES["mcl-okd-cifar100"]
    write(tmp_path / "a" / "results.json",
          results("mcl-okd-cifar100/mcl_okd-resnet32", 0, {f"peer{i}": [70.0 + i] for i in range(1, 5)}
                  | {"ensemble": [78.0]}, method="mcl_okd"))
    write(tmp_path / "b" / "results.json",
          results("mcl-okd-cifar100/mcl_okd-resnet32", 1, {f"peer{i}": [72.0 + i] for i in range(1, 5)}
                  | {"ensemble": [80.0]}, method="mcl_okd"))
    write(tmp_path / "c-s0" / "results.json", results(None, 0, {"net": [55.0]}, method="baseline",
                                                       selection="net"))
    assert summarize.main([str(tmp_path), "--table", t.name, "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == sum(len(c.metrics) for c in t.cells)
    row = next(r for r in rows if r["row"] == "ResNet-32" and r["column"] == "MCL-OKD" and r["number"] == "single")
    # last peer (peer4): 74 and 76 -> error 26 and 24
    assert float(row["best_mean"]) == pytest.approx(25.0) and float(row["best_std"]) == pytest.approx(math.sqrt(2))
    assert float(row["paper"]) == 24.52 and float(row["diff"]) == pytest.approx(0.48)
    assert row["n_finished"] == "2" and row["values"] == "26.00 24.00"
    # one epoch each, where the table's command trains 300: marked, in the CSV too
    assert row["other_flags"] == "other flags in s0, s1: --epochs 1 (table: 300)"
    assert row["status"] == "2 finished; other flags in s0, s1: --epochs 1 (table: 300)"

    assert summarize.main([str(tmp_path), "--table", t.name]) == 0
    out = capsys.readouterr().out
    grid = [l for l in out.splitlines() if l.startswith("| ResNet-32 |")][0]
    assert grid.count("|") == len(t.columns) + 2                               # the paper's layout: 6 methods
    assert "25.00 ± 1.41 (21.00 ± 1.41) n=2 *other flags*<br>paper 24.52 (22.00)" in grid

    assert summarize.main([str(tmp_path)]) == 0                                   # whatever runs are there
    out = capsys.readouterr().out
    assert "| c | baseline |" in out and "| mcl-okd-cifar100/mcl_okd-resnet32 | mcl_okd |" in out

    failed = results(None, 1, {"net": []}, epochs=1, method="baseline", selection="net")
    write(tmp_path / "c-s1" / "results.json", {**failed, "status": "failed"})   # stopped before its first epoch
    assert summarize.main([str(tmp_path), "--csv"]) == 0                        # one line each, that one too
    rows = [r for r in csv.DictReader(io.StringIO(capsys.readouterr().out)) if r["runs"] == "c"]
    assert [(r["seed"], r["status"], r["epochs_done"], r["head"], r["best_top1"]) for r in rows] == [
        ("0", "finished", "1", "net", "55.0"), ("1", "failed", "0", "", "")]


def test_untabled_runs_are_averaged_only_with_runs_that_trained_the_same(tmp_path, capsys):
    """Folders named alike (``x-s0``, ``x-s1``) in different places are seeds of one run only when they trained the
    same: another method or other training options is a row of its own, with a warning naming the folders; n
    counts the runs that give the row's number."""
    dml = {"peer1": [60.0], "peer2": [62.0], "ensemble": [65.0]}
    write(tmp_path / "exp1" / "x-s0" / "results.json", results(None, 0, dml))
    write(tmp_path / "exp2" / "x-s1" / "results.json", results(None, 1, {"net": [50.0]}, method="baseline",
                                                                   selection="net"))
    write(tmp_path / "exp3" / "y-s0" / "results.json", results(None, 0, dml))
    write(tmp_path / "exp4" / "y-s1" / "results.json", results(None, 1, {k: [v[0] + 2] for k, v in dml.items()}))
    write(tmp_path / "exp5" / "y-s2" / "results.json", results(None, 2, dml, args={"lr": 0.01}))
    # an older record without --pad-mode, a newer one with its default: trained the same, as a resume sees it
    write(tmp_path / "exp6" / "z-s0" / "results.json", results(None, 0, dml, args={"dataset": "cifar100"}))
    write(tmp_path / "exp7" / "z-s1" / "results.json", results(None, 1, dml, args={"dataset": "cifar100",
                                                                                   "pad_mode": "zero"}))
    assert summarize.main([str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "| z | dml | resnet32 | cifar100 | 1 | peer1 | 2 | 60.00 ± 0.00 | 60.00 ± 0.00 | 2 finished |" in out
    assert "runs named z" not in err
    rows = [line for line in out.splitlines() if line.startswith("| x") or line.startswith("| y")]
    assert "| x [1] | dml | resnet32 | cifar100 | 1 | peer1 | 1 | 60.00 | 60.00 | 1 finished |" in rows
    assert "| x [2] | baseline | resnet32 | cifar100 | 1 | net | 1 | 50.00 | 50.00 | 1 finished |" in rows
    assert "| y [1] | dml | resnet32 | cifar100 | 1 | peer1 | 2 | 61.00 ± 1.41 | 61.00 ± 1.41 | 2 finished |" in rows
    assert "| y [2] | dml | resnet32 | cifar100 | 1 | peer1 | 1 | 60.00 | 60.00 | 1 finished |" in rows
    assert len(rows) == 3 + 1 + 3 + 3
    assert (f"warning: the runs named x did not all train the same (method or training options other than the seed), "
            f"so they are not averaged together: x [1]: {tmp_path / 'exp1' / 'x-s0'}; x [2]: "
            f"{tmp_path / 'exp2' / 'x-s1'} (method baseline (x [1]: dml))") in err.splitlines()
    assert any(line.endswith(f"y [2]: {tmp_path / 'exp5' / 'y-s2'} (--lr 0.01 (y [1]: default))")   # what differs
               for line in err.splitlines()), err


def test_every_seed_gives_its_heads_even_when_the_first_has_no_epoch(tmp_path, capsys, monkeypatch):
    """Seed 0 stopped in its first epoch (no epoch recorded), seed 1 finished: the row lists seed 1's heads with its
    numbers; the heads were once read from the first seed only, which printed '-' and no number. The plot takes
    every seed's heads and loss terms too."""
    dml = {"peer1": [60.0], "peer2": [62.0], "ensemble": [65.0]}
    write(tmp_path / "x-s0" / "results.json", {**results(None, 0, {"peer1": []}, epochs=1), "status": "interrupted"})
    write(tmp_path / "x-s1" / "results.json", results(None, 1, dml))
    assert summarize.main([str(tmp_path)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| x")]
    assert rows == [f"| x | dml | resnet32 | cifar100 | 1 | {head} | 1 | {v[0]:.2f} | {v[0]:.2f} | 1 finished, 1 "
                    "unfinished (0/1 ep interrupted) |" for head, v in dml.items()], rows
    write(tmp_path / "y" / "y-s0" / "results.json", results(None, 0, {"peer1": [50.0]}, selection="peer1",
                                                            terms={"ce": [1.0]}))
    write(tmp_path / "y" / "y-s1" / "results.json", results(None, 1, dml))
    drawn = []
    real = summarize._band
    monkeypatch.setattr(summarize, "_band", lambda ax, series, label, lw=1.5: drawn.append(label) or real(ax, series,
                                                                                                        label, lw))
    summarize.plot_curves(summarize.load_runs(tmp_path / "y")[0], "y", tmp_path / "y.png")
    assert drawn == ["peer1", "peer2", "ensemble", "ce", "total", "kd"], drawn


def test_seeds_of_a_run_with_changed_options_are_averaged(tmp_path, capsys):
    """The default run directory of a run with options other than the defaults ends in their hash, after the
    seed (``x-s0-1a2b3c4d``): its seeds share that hash and are one row, not one row per seed."""
    dml = {"peer1": [60.0], "peer2": [62.0], "ensemble": [65.0]}
    for seed in (0, 1):
        write(tmp_path / f"dml-resnet32-cifar100-n2-s{seed}-1a2b3c4d" / "results.json",
              results(None, seed, {k: [v[0] + 2 * seed] for k, v in dml.items()}, args={"lr": 0.05}))
    assert summarize.main([str(tmp_path)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| dml-")]
    assert "| dml-resnet32-cifar100-n2-1a2b3c4d | dml | resnet32 | cifar100 | 1 | peer1 | 2 | 61.00 ± 1.41 | " \
           "61.00 ± 1.41 | 2 finished |" in rows, rows


def test_runs_are_found_through_symbolic_links(tmp_path, capsys):
    """A table folder or a run folder linked in from elsewhere is read (reproduce.py follows the links too); a
    link back up is read once."""
    real = tmp_path / "disk"
    write_dml(real / "t", 0, [60], [62], [65], tag="smoke/dml-resnet20", arch="resnet20", args=SMOKE)
    write_dml(real / "other", 1, [70], [72], [75], tag="smoke/dml-resnet20", arch="resnet20", args=SMOKE)
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "smoke").symlink_to(real / "t")                                        # a linked table folder
    (runs / "dml-resnet32-s1").symlink_to(real / "other" / "dml-resnet32-s1")      # a linked run folder
    (real / "t" / "up").symlink_to(runs)                                           # a cycle
    assert summarize.main([str(runs), "--table", "smoke"]) == 0
    assert "| DML | 66.00 ± 7.07 (70.00 ± 7.07) n=2 |" in capsys.readouterr().out.splitlines()


def test_plots_written(tmp_path, capsys):
    write_dml(tmp_path / "runs", 0, [50, 70, 69], [52, 74, 73], [55, 76, 75], tag="smoke/dml-resnet20")
    write_dml(tmp_path / "runs", 1, [51, 72, 71], [53, 76, 70], [56, 78, 77], tag="smoke/dml-resnet20")
    plots = tmp_path / "plots"
    assert summarize.main([str(tmp_path / "runs"), "--table", "smoke", "--plots", str(plots)]) == 0
    written = sorted(p.relative_to(plots).as_posix() for p in plots.rglob("*.png"))
    assert written == ["smoke-paper-vs-ours.png", "smoke/dml-resnet20.png"]
    for p in plots.rglob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_against_baseline_reading(tmp_path):
    budget = ("--epochs", "1")       # what the runs record: the table's command
    t = Table("t", "t", "t", "error", ["ResNet-32"], ["Baseline", "DML"], [
        cell("ResNet-32", "Baseline", "baseline", "resnet32", budget, single=29.0),
        cell("ResNet-32", "DML", "dml", "resnet32", budget, single=25.0, ensemble=23.0)])
    for seed, acc in enumerate([70.0, 72.0]):
        write(tmp_path / f"b{seed}" / "results.json",
              results("t/baseline-resnet32", seed, {"net": [acc]}, method="baseline", selection="net"))
    for seed, (p1, p2) in enumerate([(74.0, 76.0), (76.0, 78.0)]):
        write(tmp_path / f"d{seed}" / "results.json",
              results("t/dml-resnet32", seed, {"peer1": [p1], "peer2": [p2], "ensemble": [80.0]}))
    runs, _ = summarize.load_runs(tmp_path)
    rows = summarize.against_baseline(t, summarize.summarize_table(t, runs))
    # baseline error 30, 28 (29 ± 1.414); DML single error 25, 23 (24 ± 1.414): gain +5, se = sqrt(1 + 1)
    # ensemble error 20, 20: gain +9, se = sqrt(0 + 2 / 2) = 1
    assert rows == [f"| ResNet-32 | DML | single | +5.00 | {math.sqrt(2):.2f} | better, beyond noise |",
                    "| ResNet-32 | DML | ensemble | +9.00 | 1.00 | better, beyond noise |"]
    t.cells[0] = cell("ResNet-32", "Baseline", "baseline", "resnet32", single=29.0)    # 300 epochs: not the runs'
    rows = summarize.against_baseline(t, summarize.summarize_table(t, runs))
    assert rows[0] == (f"| ResNet-32 | DML | single | +5.00 | {math.sqrt(2):.2f} | better, beyond noise; other flags "
                       "in ResNet-32 Baseline |")


def test_into_replaces_the_marked_block(tmp_path, capsys):
    write_dml(tmp_path / "runs", 0, [60], [62], [65], tag="smoke/dml-resnet20")
    page = tmp_path / "page.md"
    page.write_text(f"# head\n\n{summarize.BEGIN}\nold text\n{summarize.END}\n\nfoot\n")
    assert summarize.main([str(tmp_path / "runs"), "--table", "smoke", "--plots", str(tmp_path / "plots"),
                           "--into", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# head\n\n" + summarize.BEGIN) and text.endswith(summarize.END + "\n\nfoot\n")
    assert "old text" not in text and "| DML | ResNet-20 | single | `peers` | 1 | 61.00 |" in text
    assert "![dml-resnet20](plots/smoke/dml-resnet20.png)" in text
    page.write_text("no markers")
    assert summarize.main([str(tmp_path / "runs"), "--table", "smoke", "--into", str(page)]) == 2
    assert "needs one line" in capsys.readouterr().err
    # a runs folder without a finished run of the table (a fresh clone's runs/): the committed page is kept
    page.write_text(text)
    (tmp_path / "empty").mkdir()
    assert summarize.main([str(tmp_path / "empty"), "--table", "smoke", "--into", str(page), "--plots",
                           str(tmp_path / "new" / "plots")]) == 2
    assert not (tmp_path / "new").exists()                    # (the --plots folder is not left behind, empty)
    assert capsys.readouterr().err == (f"error: no finished run of table smoke under {tmp_path / 'empty'}; {page} is "
                                       "left as it is (--into replaces its table with the one these runs give): give "
                                       "the folder the table's runs were trained into (reproduce.py --runs-dir), or "
                                       "leave out --into to print the table\n")
    assert page.read_text() == text


SMOKE = {"dataset": "synthetic", "subset": 512, "batch_size": 64, "epochs": 2}     # the smoke table's budget


def test_runs_trained_with_other_flags_are_marked(tmp_path, capsys):
    """A run of the table's folder trained with a changed budget (reproduce.py --extra="--subset 64 --epochs 1")
    is marked in the grid, the runs column, the CSV and on stderr; runs of the table's command are not, and
    flags that cannot change training (--gpu, --workers, --data) never mark a run. The number of processes is
    how a run was launched: 2 processes with half the table's --batch-size (per process) train its global batch,
    and are not marked; 2 processes with the table's --batch-size train twice its global batch, and are."""
    curves = {"net": [40.0, 50.0]}
    # trained on 2 processes (reproduce.py --gpus-per-run 2 --extra="--batch-size 32"): the table's global batch
    baseline = dict(results("smoke/baseline-resnet20", 0, curves, method="baseline", arch="resnet20",
                            selection="net", args=dict(SMOKE, batch_size=32, gpu=-1, workers=0, data="/elsewhere",
                                                       no_progress=True)), world_size=2)
    write(tmp_path / "baseline-resnet20-s0" / "results.json", baseline)
    write(tmp_path / "dml-resnet20-s0" / "results.json",
          results("smoke/dml-resnet20", 0, {"peer1": [60.0], "peer2": [62.0], "ensemble": [65.0]},
                  arch="resnet20", args=dict(SMOKE, subset=64, epochs=1)))
    assert summarize.main([str(tmp_path), "--table", "smoke"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert "| Baseline | 50.00 n=1 |" in lines                                  # the table's command: no mark
    assert "| DML | 61.00 (65.00) n=1 *other flags* |" in lines
    assert ("| DML | ResNet-20 | single | `peers` | 1 | 61.00 | 61.00 | 1 finished; other flags in s0: "
            "--subset 64 (table: 512), --epochs 1 (table: 2) |") in out
    assert err.splitlines() == [f"warning: {tmp_path / 'dml-resnet20-s0'} was trained with --subset 64 (table: 512), "
                                "--epochs 1 (table: 2): its numbers are marked 'other flags' in smoke"]
    assert summarize.main([str(tmp_path), "--table", "smoke", "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["other_flags"] for r in rows] == ["", "other flags in s0: --subset 64 (table: 512), --epochs 1 (table: 2)",
                                                "other flags in s0: --subset 64 (table: 512), --epochs 1 (table: 2)"]
    baseline["args"]["batch_size"] = 64                        # 2 x the table's 64: another protocol
    write(tmp_path / "baseline-resnet20-s0" / "results.json", baseline)
    assert summarize.main([str(tmp_path), "--table", "smoke"]) == 0
    out, err = capsys.readouterr()
    assert "| Baseline | 50.00 n=1 *other flags* |" in out.splitlines()
    assert (f"warning: {tmp_path / 'baseline-resnet20-s0'} was trained with --batch-size 64 on 2 processes: global "
            "batch 128 (table: 64): its numbers are marked 'other flags' in smoke") in err.splitlines()


def test_output_path_errors_are_one_line(tmp_path, capsys):
    """--plots on a file, under a file or where a plot's folder is a file, and an --into page that cannot be
    read or has no markers: one line naming the path, no traceback, and nothing drawn before the page check."""
    write_dml(tmp_path / "runs", 0, [60], [62], [65], tag="smoke/dml-resnet20")
    (tmp_path / "runs" / "dml-resnet32-s0" / summarize.RUN_LOCK).touch()      # (a run directory, as the engine's)
    runs = str(tmp_path / "runs")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    plots = tmp_path / "plots"
    page = tmp_path / "page.md"
    page.write_text("no markers")
    cases = [([runs, "--plots", str(a_file)], f"--plots {a_file} is a file"),
             ([runs, "--plots", str(a_file / "sub")], f"cannot write {a_file / 'sub'}: Not a directory (a part of "
              "the path is a file, not a folder; choose another --plots)"),
             ([runs, "--table", "smoke", "--into", str(tmp_path / "absent.md"), "--plots", str(plots)],
              f"--into {tmp_path / 'absent.md'}: cannot read it"),
             ([runs, "--table", "smoke", "--into", str(tmp_path), "--plots", str(plots)],
              f"--into {tmp_path}: cannot read it"),
             ([runs, "--table", "smoke", "--into", str(page), "--plots", str(plots)], f"{page} needs one line"),
             ([str(tmp_path / "absent")], f"{tmp_path / 'absent'} does not exist"),
             ([str(a_file)], f"{a_file} is a file, not a folder of runs"),
             # a run's own folder, or one inside it: the run would no longer resume with the plots in it
             ([runs, "--plots", f"{runs}/dml-resnet32-s0/plots"], f"--plots {runs}/dml-resnet32-s0/plots lies in "
              f"the run directory {runs}/dml-resnet32-s0; give a folder outside the runs' own folders")]
    for argv, message in cases:
        assert summarize.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, (argv, err)
    assert not plots.exists() and a_file.read_text() == "keep" and page.read_text() == "no markers"
    assert not (tmp_path / "runs" / "dml-resnet32-s0" / "plots").exists()
    for flag in ("--plots", "--into"):                           # (an empty name was once ignored, silently)
        with pytest.raises(SystemExit) as stop:
            summarize.main([runs, "--table", "smoke", flag, ""])
        assert stop.value.code == 2 and "must name a file or folder" in capsys.readouterr().err
    plots.mkdir()
    (plots / "smoke").write_text("in the way")                  # the folder of the cells' curves is a file
    assert summarize.main([runs, "--table", "smoke", "--plots", str(plots)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f"error: --plots {plots}: cannot write {plots / 'smoke'}")
    assert not any("Traceback" in line for line in err)


def test_into_page_is_replaced_atomically(tmp_path, capsys, monkeypatch):
    """A write that fails half-way (a full disk) leaves the page as it was and no temporary file behind."""
    import errno
    import os
    write_dml(tmp_path / "runs", 0, [60], [62], [65], tag="smoke/dml-resnet20")
    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir()
    before = f"# head\n\n{summarize.BEGIN}\nold text\n{summarize.END}\n\nfoot\n"
    page.write_text(before)

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full_disk)
    assert summarize.main([str(tmp_path / "runs"), "--table", "smoke", "--into", str(page)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"error: --into {page}: cannot write {page}: No space left on device; the page "
                                    "is unchanged")
    assert page.read_text() == before and os.listdir(page.parent) == ["page.md"]
    monkeypatch.undo()
    assert summarize.main([str(tmp_path / "runs"), "--table", "smoke", "--into", str(page)]) == 0
    assert "old text" not in page.read_text() and os.listdir(page.parent) == ["page.md"]


def test_a_cell_never_averages_runs_that_trained_differently_or_another_methods(tmp_path, capsys, monkeypatch):
    """Runs tagged with one cell that trained differently (another --subset and --epochs) are not one number: the
    cell takes the runs of the table's command, else the runs of one protocol (the most finished seeds, marked
    'other flags'), and names the others, with how they differ; a run of another method given the cell's tag (a
    train_kdcl.py run, a train_baseline.py run) is never one of its seeds, and is named by its script. The plot of
    the cell draws the runs counted only. (They were once averaged into one cell: n=3 over two budgets, and runs of
    other methods counted as DML seeds.)"""
    dml = {"peer1": [60.0], "peer2": [62.0], "ensemble": [65.0]}
    tag = "smoke/dml-resnet20"
    for seed in (0, 1):
        write(tmp_path / f"a{seed}" / "results.json",
              results(tag, seed, {k: [v[0] + 2 * seed] for k, v in dml.items()}, arch="resnet20", args=SMOKE))
    write(tmp_path / "b2" / "results.json",
          results(tag, 2, {k: [v[0] - 40] for k, v in dml.items()}, arch="resnet20", args=dict(SMOKE, epochs=1,
                                                                                                   subset=64)))
    write(tmp_path / "kdcl" / "results.json",
          results(tag, 3, {"peer1": [10.0], "peer2": [10.0], "ensemble": [10.0]}, method="kdcl", arch="resnet20",
                  args=SMOKE))
    write(tmp_path / "base" / "results.json",
          results(tag, 4, {"net": [10.0]}, method="baseline", arch="resnet20", selection="net", args=SMOKE))
    drawn = {}
    monkeypatch.setattr(summarize, "plot_curves", lambda runs, title, path: drawn.setdefault(path.name, runs) and
                        path)
    assert summarize.main([str(tmp_path), "--table", "smoke", "--plots", str(tmp_path / "plots")]) == 0
    out, err = capsys.readouterr()
    assert "| DML | 62.00 ± 1.41 (66.00 ± 1.41) n=2 +3 left out |" in out.splitlines(), out
    assert ("| DML | ResNet-20 | single | `peers` | 2 | 62.00 ± 1.41 | 62.00 ± 1.41 | 2 finished; left out: s2 "
            "(a run trained with --subset 64 (table: 512), --epochs 1 (table: 2)); s3 (a run of train_kdcl.py, not "
            "of train_dml.py); s4 (a run of train_baseline.py, not of train_dml.py) |") in out
    because = f": left out of smoke (DML / ResNet-20), whose numbers are the runs of the table's command (runs " \
              "trained differently are not averaged together)"
    assert [line for line in err.splitlines() if not line.startswith("plot: ")] == [
        f"warning: {tmp_path / 'b2'} is a run trained with --subset 64 (table: 512), --epochs 1 (table: 2){because}",
        f"warning: {tmp_path / 'kdcl'} is a run of train_kdcl.py, not of train_dml.py{because}",
        f"warning: {tmp_path / 'base'} is a run of train_baseline.py, not of train_dml.py{because}"]
    assert sorted(r.path.parent.name for r in drawn["dml-resnet20.png"]) == ["a0", "a1"]

    # none of the table's command: the two seeds of one budget are the number, marked; the third is left out
    for seed in (0, 1):
        write(tmp_path / f"a{seed}" / "results.json",
              results(tag, seed, {k: [v[0] + 2 * seed] for k, v in dml.items()}, arch="resnet20",
                      args=dict(SMOKE, epochs=1, subset=256)))
    assert summarize.main([str(tmp_path), "--table", "smoke"]) == 0
    out, err = capsys.readouterr()
    assert "| DML | 62.00 ± 1.41 (66.00 ± 1.41) n=2 *other flags* +3 left out |" in out.splitlines(), out
    assert (f"warning: {tmp_path / 'b2'} is a run trained with --subset 64 (table: 512), --epochs 1 (table: 2): "
            "left out of smoke (DML / ResNet-20), whose numbers are runs trained with --subset 256 (table: 512), "
            "--epochs 1 (table: 2) (runs trained differently are not averaged together)") in err.splitlines(), err


def test_a_cells_run_is_the_run_in_its_folder_as_reproduce_finds_it(tmp_path, capsys):
    """A cell's command run by hand (docs/reproducing.md) with --out <runs>/smoke/baseline-resnet20-s0 and no --tag
    is the run reproduce.py skips as finished: the table counts it too (it was '*missing*', without a word). A run
    in that folder tagged for another cell is the folder's, as reproduce.py sees it: a run of another script, left
    out; a run without a tag elsewhere is no cell's."""
    base = {"net": [50.0]}
    write(tmp_path / "smoke" / "baseline-resnet20-s0" / "results.json",
          results(None, 0, base, method="baseline", arch="resnet20", selection="net", args=SMOKE))
    write(tmp_path / "smoke" / "baseline-resnet20-s1" / "results.json",
          results("smoke/dml-resnet20", 1, {"peer1": [60.0], "peer2": [62.0], "ensemble": [65.0]}, arch="resnet20",
                  args=SMOKE))
    write(tmp_path / "elsewhere" / "x-s2" / "results.json",
          results(None, 2, base, method="baseline", arch="resnet20", selection="net", args=SMOKE))
    assert summarize.main([str(tmp_path), "--table", "smoke"]) == 0
    out, err = capsys.readouterr()
    assert "| Baseline | 50.00 n=1 +1 left out |" in out.splitlines(), out
    assert "| DML | *missing* |" in out.splitlines(), out
    assert err.splitlines() == [f"warning: {tmp_path / 'smoke' / 'baseline-resnet20-s1'} is a run of train_dml.py, "
                                "not of train_baseline.py: left out of smoke (Baseline / ResNet-20), whose numbers "
                                "are the runs of the table's command (runs trained differently are not averaged "
                                "together)"]


def test_a_non_finite_number_in_a_record_is_one_line_not_a_traceback(tmp_path, capsys):
    """A results.json holding NaN or Infinity (json reads both), with no last.pt beside it to rebuild it from, is
    named in one line and left out, in the table and without one (statistics.stdev raised AttributeError on it)."""
    dml = {"peer1": [60.0, 61.0], "peer2": [62.0, 63.0], "ensemble": [65.0, 66.0]}
    for seed in (0, 1, 2):
        write_dml(tmp_path, seed, *dml.values(), tag="smoke/dml-resnet20", arch="resnet20", args=SMOKE)
    bad = results("smoke/dml-resnet20", 1, dml, arch="resnet20", args=SMOKE)
    bad["best"]["test"]["peer1/top1"] = float("nan")
    bad["history"][1]["train"]["loss"] = float("inf")
    nan = write(tmp_path / "dml-resnet32-s1" / "results.json", bad)
    assert not (nan.parent / "last.pt").exists()
    for argv in ([str(tmp_path), "--table", "smoke"], [str(tmp_path)], [str(tmp_path), "--csv"]):
        assert summarize.main(argv) == 0, argv
        out, err = capsys.readouterr()
        skipped = [line for line in err.splitlines() if str(nan) in line]
        assert len(skipped) == 1 and skipped[0].startswith(f"warning: skipped {nan}: "), err
        assert "Traceback" not in err and "nan" not in out.lower() and "inf" not in out.lower()
    assert summarize.main([str(tmp_path), "--table", "smoke"]) == 0
    assert "| DML | 62.00 ± 0.00 (66.00 ± 0.00) n=2 |" in capsys.readouterr().out.splitlines()


def test_against_baseline_with_one_seed_or_equal_numbers(tmp_path):
    """A side with one seed has no standard error: '-', not 'se 0.00'; equal numbers on an error table are a
    gain of 0.00, not -0.00 (and so is the difference to the paper)."""
    budget = ("--epochs", "1")
    t = Table("t", "t", "t", "error", ["ResNet-32"], ["Baseline", "DML"], [
        cell("ResNet-32", "Baseline", "baseline", "resnet32", budget, single=30.0),
        cell("ResNet-32", "DML", "dml", "resnet32", budget, single=25.0)])
    write(tmp_path / "b0" / "results.json",
          results("t/baseline-resnet32", 0, {"net": [70.0]}, method="baseline", selection="net"))
    for seed in (0, 1):
        write(tmp_path / f"d{seed}" / "results.json",
              results("t/dml-resnet32", seed, {"peer1": [70.0], "peer2": [70.0], "ensemble": [80.0]}))
    runs, _ = summarize.load_runs(tmp_path)
    summaries = summarize.summarize_table(t, runs)
    assert summarize.against_baseline(t, summaries) == [
        "| ResNet-32 | DML | single | 0.00 | - | too few seeds to tell |"]
    assert "| ResNet-32 | Baseline | single | `net` | 1 | 30.00 | 30.00 | 30.00 | 0.00 |" in summarize.markdown_table(
        t, summaries)


def test_two_copies_of_a_seed_say_which_copy_is_kept(tmp_path, capsys):
    """Two copies of one seed (a copied folder): the warning names the copy kept, also when both have the same
    epochs (it said 'keeping the one with more epochs' without saying which)."""
    first = write_dml(tmp_path / "a", 0, [60], [62], [65], tag="smoke/dml-resnet20", arch="resnet20", args=SMOKE)
    second = write_dml(tmp_path / "b", 0, [70], [72], [75], tag="smoke/dml-resnet20", arch="resnet20", args=SMOKE)
    kept = summarize.dedupe(summarize.load_runs(tmp_path)[0], print)
    assert [r.path for r in kept] == [first]
    assert capsys.readouterr().out.splitlines() == [
        f"two runs of seed 0 with tag smoke/dml-resnet20: {first.parent} and {second.parent}; keeping {first.parent}, "
        "the first found (both have the same epochs)"]


def test_one_other_protocol_on_one_or_two_processes_is_one_protocol(tmp_path, capsys):
    """Seeds of one --extra budget launched on 1 process (batch 64) and on 2 (batch 32 each: the same global batch)
    are one protocol, counted together (the first grouping took the number of processes for a difference and left
    one out); a cell whose only run is another method's says it has no run of its own (it said "whose numbers are
    the runs of the table's command")."""
    short = dict(SMOKE, subset=64, epochs=1)
    write(tmp_path / "a" / "results.json", results("smoke/baseline-resnet20", 0, {"net": [40.0]}, method="baseline",
                                                   arch="resnet20", selection="net", args=short))
    write(tmp_path / "b" / "results.json", dict(results("smoke/baseline-resnet20", 1, {"net": [44.0]},
                                                        method="baseline", arch="resnet20", selection="net",
                                                        args=dict(short, batch_size=32)), world_size=2))
    write(tmp_path / "c" / "results.json", results("smoke/dml-resnet20", 0, {"net": [50.0]}, method="baseline",
                                                   arch="resnet20", selection="net", args=SMOKE))
    assert summarize.main([str(tmp_path), "--table", "smoke"]) == 0
    out, err = capsys.readouterr()
    assert "| Baseline | 42.00 ± 2.83 n=2 *other flags* |" in out.splitlines()
    assert [line for line in err.splitlines() if "left out" in line] == [
        f"warning: {tmp_path / 'c'} is a run of train_baseline.py, not of train_dml.py: left out of smoke (DML / "
        "ResNet-20), which has no run of train_dml.py"]
