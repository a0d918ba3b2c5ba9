"""scripts/summarize.py on hand-made results.json files (engine format): statistics against hand computation,
head rules, units, corrupt / partial / running files, CSV, plots."""
from __future__ import annotations

import csv
import io
import json
import math

import pytest

from scripts import summarize
from scripts.tables import TABLES, Table, cell
from tests.results_factory import results, write


def table_mcl() -> Table:
    """A two-cell error table: MCL-OKD reads the last peer, DML the peer mean; published single (ensemble)."""
    return Table("t", "test table", "test", "error", ["ResNet-32"], ["DML", "MCL-OKD"], [
        cell("ResNet-32", "DML", "dml", "resnet32", single=25.0, ensemble=23.0),
        cell("ResNet-32", "MCL-OKD", "mcl_okd", "resnet32", single=24.52, ensemble=22.0)])


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
    write_dml(tmp_path, 2, [40], [40], [45], epochs=300)                       # running: epoch 1 of 300
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
    dml, _ = summarize.summarize_table(table_mcl(), runs)
    assert len(dml.finished) == 2 and len(dml.unfinished) == 1
    assert dml.status == "2 finished, 1 unfinished (1/300 ep)"
    assert dml.metrics[1].best[0] == pytest.approx(100 - 72.5)                  # the running seed is not averaged
    text = summarize.markdown_table(table_mcl(), [dml, _])
    assert "+1 unfinished" in text and "*missing*" in text
    assert "| ResNet-32 | DML | single | `peers` | 2 | 29.50 ± 0.71 | 29.50 ± 0.71 | 25.00 | +4.50 |" in text


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

    assert summarize.main([str(tmp_path), "--table", t.name]) == 0
    out = capsys.readouterr().out
    grid = [l for l in out.splitlines() if l.startswith("| ResNet-32 |")][0]
    assert grid.count("|") == len(t.columns) + 2                               # the paper's layout: 6 methods
    assert "25.00 ± 1.41 (21.00 ± 1.41) n=2<br>paper 24.52 (22.00)" in grid

    assert summarize.main([str(tmp_path)]) == 0                                   # whatever runs are there
    out = capsys.readouterr().out
    assert "| c | baseline |" in out and "| mcl-okd-cifar100/mcl_okd-resnet32 | mcl_okd |" in out


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
    t = Table("t", "t", "t", "error", ["ResNet-32"], ["Baseline", "DML"], [
        cell("ResNet-32", "Baseline", "baseline", "resnet32", single=29.0),
        cell("ResNet-32", "DML", "dml", "resnet32", single=25.0, ensemble=23.0)])
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
