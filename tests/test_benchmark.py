"""scripts/benchmark.py runs on the CPU at a tiny size and prints its table."""
import runpy
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "benchmark.py"


def test_benchmark_prints_table(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--arch", "resnet20", "--batch-size", "8", "--steps", "2",
                                      "--device", "cpu", "--configs", "default,channels_last"])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    out = capsys.readouterr().out
    assert "images/s" in out and "vs reference" in out
    rows = [line for line in out.splitlines() if line.startswith(("reference", "engine"))]
    assert [r.split()[0] for r in rows] == ["reference", "engine", "engine"]
    assert all(float(r.split()[-1].rstrip("x")) > 0 for r in rows)
