"""scripts/benchmark.py runs on the CPU at a tiny size, for any method, and prints its table; bad input (a --json
it cannot write, --device cuda without a GPU, unknown --configs) is one line before anything is measured."""
import importlib.util
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

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


def load():
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def refused(monkeypatch, capsys, *args) -> str:
    """The one line (exit status 2) the benchmark refuses ``args`` with, before any trainer is built."""
    benchmark = load()
    monkeypatch.setattr(benchmark, "make_trainer", lambda *a: pytest.fail("the benchmark ran"))
    with pytest.raises(SystemExit) as exit_:
        benchmark.main(["--arch", "resnet20", "--steps", "2", *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def test_benchmark_rejects_unknown_options(capsys, monkeypatch):
    assert refused(monkeypatch, capsys, "--device", "cpu", "--configs", "default,turbo").startswith(
        "error: unknown option(s) ['turbo'] in --configs")
    assert "names no configuration" in refused(monkeypatch, capsys, "--device", "cpu", "--configs", ",")
    import engine
    monkeypatch.setattr(engine.Trainer, "__init__", lambda *a, **k: pytest.fail("a trainer was built"))
    assert refused(monkeypatch, capsys, "--device", "cpu", "--method", "cmff", "--arch", "resnet20,resnet20,resnet20"
                   ).endswith("--arch lists 3 architectures, but the number of peers must be 2; got 3 (the number of "
                              "peers cmff trains) (--help lists the options)")     # (not of a --num-peers never given)
    wrong_arch = refused(monkeypatch, capsys, "--arch", "resnet_nope")    # the benchmark's flag, not train_dml.py's
    assert ": error: argument --arch: " in wrong_arch and not wrong_arch.startswith("train_dml.py"), wrong_arch
    assert refused(monkeypatch, capsys, "--method", "nope") == ("error: no train_nope.py: the methods are the "
                                                                "train_<method>.py scripts")
    assert refused(monkeypatch, capsys, "--device", "cpu", "--method", "cmff", "--peers", "3") == (
        "error: --peers 3: must be 2; got 3 (the number of peers cmff trains)")          # the method's own range
    assert refused(monkeypatch, capsys, "--device", "cpu", "--method", "baseline", "--peers", "3") == (
        "error: --peers 3: train_baseline.py trains a single network; leave --peers out")   # (it was ignored)


def test_benchmark_refuses_what_would_misstate_its_table(capsys, monkeypatch):
    """A --method-args flag the benchmark sets itself once overrode it silently: the images/s of batch 8 computed as
    batch 32's, the row labelled 'default' trained bf16. An abbreviation too (argparse reads --batch as --batch-size).
    A method with a train_step of its own and no loss() (AMLN) cannot run the reference loop; a path is no method."""
    import engine
    monkeypatch.setattr(engine.Trainer, "__init__", lambda *a, **k: pytest.fail("a trainer was built"))
    for given, flag in (("--batch-size 8", "--batch-size"), ("--batch=8", "--batch-size"), ("--amp bf16", "--amp"),
                        ("--arch resnet32", "--arch"), ("--topology independent --grouped-peers", "--grouped-peers")):
        assert refused(monkeypatch, capsys, "--device", "cpu", f"--method-args={given}") == (
            f"error: --method-args {given}: the benchmark sets {flag} itself (its table states --arch, --batch-size, "
            "--peers and --configs; the data, epochs, subset, lr and device are its own); leave it out of "
            "--method-args")
    benchmark = load()

    class Reached(Exception):
        pass

    def reached(*args):
        raise Reached
    monkeypatch.setattr(benchmark, "make_trainer", reached)
    for mine in ("--data /nowhere", "--kd-T 2", "--kd 2"):  # the method's own (--data is no --dataset abbreviated)
        with pytest.raises(Reached):
            benchmark.main(["--arch", "resnet20", "--device", "cpu", f"--method-args={mine}", "--configs", "default"])
    assert refused(monkeypatch, capsys, "--device", "cpu", "--method", "amln") == (
        "error: train_amln.py trains with a train_step of its own, without the loss() the reference loop calls; add "
        "--skip-reference (the engine's rows only)")
    assert refused(monkeypatch, capsys, "--method", "../train_dml") == ("error: no train_../train_dml.py: the methods "
                                                                        "are the train_<method>.py scripts")


def test_benchmark_checks_every_configuration_before_it_builds_one(capsys, monkeypatch):
    """A configuration the engine refuses (--cuda-graph on the CPU, a --method-args that conflicts) is one line
    naming it, before the first trainer is built."""
    import engine
    monkeypatch.setattr(engine.Trainer, "__init__", lambda *a, **k: pytest.fail("a trainer was built"))
    assert refused(monkeypatch, capsys, "--device", "cpu", "--configs", "default,cudagraph") == (
        "error: --configs cudagraph: --cuda-graph needs a CUDA GPU; leave it out on the CPU")
    assert refused(monkeypatch, capsys, "--device", "cpu", "--configs", "grouped", "--method", "baseline").startswith(
        "error: --configs grouped: baseline trains a single network: --grouped-peers has nothing to group")


def test_benchmark_without_cuda_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert refused(monkeypatch, capsys, "--device", "cuda").startswith(
        "error: --device cuda: this machine has no CUDA GPU that torch can use")


def test_benchmark_json_is_checked_before_it_runs(capsys, monkeypatch, tmp_path):
    """A --json that cannot be written is one line before anything is measured, not a traceback after it."""
    existing = tmp_path / "old.json"
    existing.write_text("earlier rows\n")
    assert refused(monkeypatch, capsys, "--device", "cpu", "--json", str(tmp_path)).startswith(
        f"error: --json {tmp_path} is a folder; give a file name (e.g. {tmp_path / 'benchmark.json'})")
    assert refused(monkeypatch, capsys, "--device", "cpu", "--json", str(existing)) == (
        f"error: --json {existing} exists; add --force to replace it, or give another file name")
    assert refused(monkeypatch, capsys, "--device", "cpu", "--json", str(existing / "x.json")).startswith(
        f"error: --json {existing / 'x.json'}: {existing} is not a folder")
    assert "give --json PATH too" in refused(monkeypatch, capsys, "--device", "cpu", "--force")
    assert existing.read_text() == "earlier rows\n"
    if Path("/proc/self").is_dir():    # a virtual file system: os.access calls it writable, yet no file can be made
        assert refused(monkeypatch, capsys, "--device", "cpu", "--json", "/proc/x.json").startswith(
            "error: --json: cannot write /proc/x.json")


def test_benchmark_json_in_missing_folders_is_written(capsys, monkeypatch, tmp_path):
    out = tmp_path / "missing" / "parent" / "b.json"
    run(monkeypatch, capsys, "--skip-reference", "--configs", "default", "--json", str(out))
    assert [r["loop"] for r in json.loads(out.read_text())["rows"]] == ["engine default"]
    with pytest.raises(SystemExit):                   # written: a second run needs --force
        run(monkeypatch, capsys, "--skip-reference", "--configs", "default", "--json", str(out))
    run(monkeypatch, capsys, "--skip-reference", "--configs", "default", "--json", str(out), "--force")


def test_benchmark_epochs_fit_the_synthetic_set(monkeypatch):
    """The default batch (128) and --steps (100) once asked for 12,800 of the 2,048 synthetic training images
    (a one-line refusal of every default command): an epoch is as many steps as the set holds."""
    benchmark = load()
    seen = []
    monkeypatch.setattr(benchmark, "parse_args", lambda cls, argv: seen.append(argv))
    monkeypatch.setattr(benchmark, "Trainer", lambda cls, args: None)
    for batch, steps in ((128, 100), (8, 2), (2048, 1)):
        args = benchmark.argparse.Namespace(arch="resnet20", batch_size=batch, steps=steps, peers=None,
                                            device=torch.device("cpu"), method_args="")
        benchmark._make_trainer(benchmark.load_method("dml"), args, [])
        subset = int(seen[-1][seen[-1].index("--subset") + 1])
        assert subset == batch * min(steps, 100, 2048 // batch) <= 2048
    with pytest.raises(SystemExit):
        benchmark.main(["--batch-size", "2049"])
