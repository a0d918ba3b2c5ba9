"""scripts/benchmark.py runs on the CPU at a tiny size, for any method, and prints its table."""
import json
import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "benchmark.py"


def run(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--arch", "resnet20", "--batch-size", "8", "--steps", "2",
                                      "--device", "cpu", *args])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    return capsys.readouterr().out


@pytest.mark.slow
def test_benchmark_prints_table(capsys, monkeypatch, tmp_path):
    out = run(monkeypatch, capsys, "--configs", "default,grouped+for-loop", "--json", str(tmp_path / "b.json"),
              "--profile", "2")
    assert "images/s" in out and "300 ep" in out and "vs ref" in out
    rows = [line for line in out.splitlines() if line.startswith(("reference", "engine"))]
    assert [r.split()[:2] for r in rows] == [["reference", "(0"], ["engine", "default"], ["engine", "grouped+for-loop"]]
    assert all(float(r.split()[-1].rstrip("x")) > 0 for r in rows)
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["peers"] == 2 and len(saved["rows"]) == 3
    assert all(r["images_per_s"] > 0 and r["minutes_300_epochs"] > 0 for r in saved["rows"])
    ops = {r["loop"]: r["ops_per_step"] for r in saved["rows"]}
    # fused SGD and grouping the peers both cut the operators (kernel launches) a step dispatches
    assert ops["engine grouped+for-loop"] < ops["reference (0 workers)"]
    assert "profile of engine" in out and "Self CPU" in out


@pytest.mark.parametrize("method", ["mcl_okd", "one"])
def test_benchmark_other_methods(capsys, monkeypatch, method):
    out = run(monkeypatch, capsys, "--method", method, "--peers", "2", "--workers", "0", "--configs", "default")
    assert any(line.startswith(f"{method} 2 x resnet20") for line in out.splitlines())   # the table's title
    assert len([line for line in out.splitlines() if line.startswith(("reference", "engine"))]) == 2


def test_benchmark_rejects_unknown_options(capsys, monkeypatch):
    with pytest.raises(SystemExit, match="unknown option"):
        run(monkeypatch, capsys, "--configs", "default,turbo")
