"""Bad input to the helper scripts (check_dataset, export_peer, benchmark, reproduce, kl_gap, mcl_memory,
prepare_imagenet_val): one line naming the file or flag and the fix, exit status 2, before anything heavy runs;
nothing written is lost or overwritten."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import train_dccl
import train_dml
from datasets_on_disk import image_bytes, run_check, write_folder, write_tinyimagenet
from engine import train
from scripts import reproduce

REPO = Path(__file__).resolve().parents[1]
FAST = ["--dataset", "synthetic", "--subset", "64", "--eval-subset", "64", "--epochs", "1", "--batch-size", "32",
        "--arch", "resnet20", "--gpu", "-1", "--no-progress", "--workers", "0"]


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_line(code: int, err: str) -> str:
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, (code, err)
    return err.strip()


def trained(tmp_path_factory, method_cls, name: str) -> Path:
    """A real run of ``method_cls`` (synthetic data, one epoch of 64 images: about a second)."""
    out = tmp_path_factory.mktemp("runs") / name
    train(method_cls, FAST + ["--out", str(out)])
    return out


@pytest.fixture(scope="module")
def dml_run(tmp_path_factory):
    return trained(tmp_path_factory, train_dml.DML, "dml")


@pytest.fixture(scope="module")
def dccl_run(tmp_path_factory):
    return trained(tmp_path_factory, train_dccl.DCCL, "dccl")


# ---- every tool: Ctrl-C ------------------------------------------------------------------------------------------
def test_ctrl_c_in_a_tool_is_one_line_and_status_130(capsys):
    """A tool of scripts/ stopped by Ctrl-C says so in one line, exit status 130, not a traceback, and one whose
    reader leaves (``| head``) ends quietly: each runs its main() through engine.cli.run_tool (reproduce.py stops
    the runs it started itself first, and says what each keeps)."""
    from engine.cli import run_tool

    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as exit_:
        run_tool(interrupted)
    assert exit_.value.code == 130 and capsys.readouterr().err == "\ninterrupted (SIGINT)\n"
    summary = subprocess.run(f"{sys.executable} {REPO / 'scripts' / 'model_table.py'} --arch resnet20 | head -1",
                             shell=True, capture_output=True, text=True)     # (... | head: the pipe closes)
    assert summary.stdout.count("\n") == 1 and "Traceback" not in summary.stderr, summary.stderr
    with pytest.raises(SystemExit) as exit_:
        run_tool(lambda: 2)
    assert exit_.value.code == 2
    tools = [p for p in (REPO / "scripts").glob("*.py") if 'if __name__ == "__main__":' in p.read_text()]
    assert len(tools) >= 9
    for path in tools:
        main_block = path.read_text().rsplit('if __name__ == "__main__":', 1)[1]      # (the first: sys.path)
        assert "run_tool(main)" in main_block, path.name


# ---- scripts/check_dataset.py: --out, --classes, --download ----------------------------------------------------
def test_check_dataset_out_refuses_an_existing_file_without_force(tmp_path, capsys):
    tree = write_folder(tmp_path / "tree", per_split=(("train", 2), ("val", 1)))
    image = tree / "train" / "cat" / "cat_0.png"               # e.g. the dataset's own image given by mistake
    before = image.read_bytes()
    code, out, err = run_check(capsys, "--dataset", "folder", "--data", str(tree), "--workers", "0",
                               "--out", str(image))
    line = one_line(code, err)
    assert line.startswith(f"error: --out {image} lies inside the dataset folder being checked ({tree})")
    assert "decoding" not in out and image.read_bytes() == before
    listing = tmp_path / "bad.txt"
    listing.write_text("an earlier list\n")
    code, out, err = run_check(capsys, "--dataset", "folder", "--data", str(tree), "--workers", "0",
                               "--out", str(listing))
    line = one_line(code, err)
    assert line == f"error: --out {listing} exists; add --force to replace it, or give another file name"
    assert "decoding" not in out and listing.read_text() == "an earlier list\n"
    code, out, err = run_check(capsys, "--dataset", "folder", "--data", str(tree), "--workers", "0",
                               "--out", str(listing), "--force")
    assert code == 0 and "all 9 images decode" in out and listing.read_text() == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "tree"]          # no temporary file left
    code, _, err = run_check(capsys, "--dataset", "folder", "--data", str(tree), "--force")
    assert "--force replaces an existing --out file" in one_line(code, err)


def test_check_dataset_out_write_is_atomic(tmp_path, capsys, monkeypatch):
    """A write that fails half-way (a full disk) keeps the old file whole, leaves no temporary file and is one
    line after the list was printed."""
    import errno
    tree = write_folder(tmp_path / "tree", per_split=(("train", 2), ("val", 1)))
    bad = tree / "train" / "dog" / "dog_1.png"
    bad.write_bytes(b"not an image")
    listing = tmp_path / "bad.txt"
    listing.write_text("an earlier list\n")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full_disk)
    code, out, err = run_check(capsys, "--dataset", "folder", "--data", str(tree), "--workers", "0",
                               "--out", str(listing), "--force")
    assert f"{bad}: " in out and "1 of 9 images cannot be decoded" in err
    assert code == 2 and err.splitlines()[-1].startswith(f"error: cannot write {listing}: No space left on device")
    assert listing.read_text() == "an earlier list\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "tree"]


@pytest.mark.parametrize("where, message", [
    ("folder", "error: --out {out} is a folder; give a file name (e.g. {out}/bad.txt)"),
    ("under a file", "error: --out {out}: {tmp}/afile is not a folder; choose another --out"),
    ("under a file, deeper", "error: --out {out}: {tmp}/afile is not a folder; choose another --out"),
])
def test_check_dataset_out_checked_before_the_dataset_is_read(tmp_path, capsys, where, message):
    (tmp_path / "afile").write_text("keep me\n")
    (tmp_path / "adir").mkdir()
    out = {"folder": tmp_path / "adir", "under a file": tmp_path / "afile" / "x",
           "under a file, deeper": tmp_path / "afile" / "x" / "y.txt"}[where]
    # --data does not exist: the --out check comes first, before the layout is read or anything decoded
    code, stdout, err = run_check(capsys, "--dataset", "folder", "--data", str(tmp_path / "nowhere"),
                                  "--out", str(out))
    assert one_line(code, err) == message.format(out=out, tmp=tmp_path) and stdout == ""
    assert (tmp_path / "afile").read_text() == "keep me\n" and list((tmp_path / "adir").iterdir()) == []


def test_check_dataset_out_in_a_missing_folder_is_created(tmp_path, capsys):
    tree = write_folder(tmp_path / "tree", per_split=(("train", 2), ("val", 1)))
    out = tmp_path / "reports" / "today" / "bad.txt"
    code, _, err = run_check(capsys, "--dataset", "folder", "--data", str(tree), "--workers", "0", "--out", str(out))
    assert code == 0 and err == "" and out.read_text() == ""


def test_check_dataset_out_for_parsed_datasets_is_refused(tmp_path, capsys):
    code, _, err = run_check(capsys, "--dataset", "cifar10", "--data", str(tmp_path), "--out", str(tmp_path / "b"))
    assert "Fix: leave --out out" in one_line(code, err) and not (tmp_path / "b").exists()


def test_check_dataset_classes_folder_is_named_a_folder(tmp_path, capsys):
    tree = write_folder(tmp_path / "tree", per_split=(("train", 2), ("val", 1)))
    code, _, err = run_check(capsys, "--dataset", "folder", "--data", str(tree), "--classes", str(tree / "train"))
    line = one_line(code, err)
    assert line.startswith(f"error: --classes {tree / 'train'} is a folder. Fix: pass a text file") and \
        "no such file" not in line
    with pytest.raises(SystemExit) as e:         # an empty name is refused, as training refuses it, not ignored
        run_check(capsys, "--dataset", "folder", "--data", str(tree), "--classes", "")
    assert e.value.code == 2 and "argument --classes: must name a file or folder; got an empty string" in \
        capsys.readouterr().err


def fake_tinyimagenet_zip(calls: list):
    """data.tinyimagenet.fetch without the internet: 'extracts' a fresh copy into the folder given."""
    def fetch(parent):
        calls.append(Path(parent))
        shutil.rmtree(Path(parent) / "tiny-imagenet-200", ignore_errors=True)
        write_tinyimagenet(Path(parent))
    return fetch


def test_check_dataset_download_tinyimagenet_as_training_does(tmp_path, capsys, monkeypatch):
    """--download fetches a missing TinyImageNet, extracts a damaged one again (layout or an image), then checks
    it; no message asks for the --download that was given."""
    import data.tinyimagenet
    calls = []
    monkeypatch.setattr(data.tinyimagenet, "fetch", fake_tinyimagenet_zip(calls))
    code, out, err = run_check(capsys, "--dataset", "tinyimagenet", "--data", str(tmp_path), "--workers", "0",
                               "--download")
    assert code == 0 and "all 204 images decode" in out and "--download" not in err, err
    assert calls == [tmp_path]
    root = tmp_path / "tiny-imagenet-200"
    (root / "val" / "val_annotations.txt").write_text("cut")                        # a damaged layout
    code, out, err = run_check(capsys, "--dataset", "tinyimagenet", "--data", str(tmp_path), "--workers", "0",
                               "--download")
    assert code == 0 and "extracting tiny-imagenet-200.zip again" in out and len(calls) == 2, (out, err)
    (root / "val" / "images" / "val_0.JPEG").write_bytes(image_bytes()[:40])          # an image cut short
    code, out, err = run_check(capsys, "--dataset", "tinyimagenet", "--data", str(tmp_path), "--workers", "0",
                               "--download")
    assert code == 0 and "1 of 204 images cannot be decoded" in out and "all 204 images decode" in out, (out, err)
    assert len(calls) == 3
    shutil.rmtree(root)                                                               # without --download: the advice
    code, _, err = run_check(capsys, "--dataset", "tinyimagenet", "--data", str(tmp_path))
    assert "pass --download" in one_line(code, err) and len(calls) == 3


def test_check_dataset_keeps_its_list_when_extracting_again_fails(tmp_path, capsys, monkeypatch):
    """--download on a TinyImageNet with a bad image, offline: the zip cannot be fetched again, and the bad file
    is still listed (and written to --out)."""
    import data.tinyimagenet
    from data import DatasetNotFoundError
    root = write_tinyimagenet(tmp_path)
    bad = root / "val" / "images" / "val_0.JPEG"
    bad.write_bytes(image_bytes()[:40])

    def offline(parent):
        raise DatasetNotFoundError("tinyimagenet", "the download failed (no internet)", [parent], "try later")
    monkeypatch.setattr(data.tinyimagenet, "fetch", offline)
    listed = tmp_path / "bad.txt"
    code, out, err = run_check(capsys, "--dataset", "tinyimagenet", "--data", str(tmp_path), "--workers", "0",
                               "--download", "--out", str(listed))
    assert code == 1 and "no internet" in err and f"{bad}:" in out and "1 of 204 images cannot be decoded" in err
    assert listed.read_text() == f"{bad}\n"


@pytest.mark.parametrize("dataset", ["imagenet", "folder"])
def test_check_dataset_download_refused_where_there_is_nothing_to_download(tmp_path, capsys, dataset):
    code, _, err = run_check(capsys, "--dataset", dataset, "--data", str(tmp_path), "--download")
    assert one_line(code, err).startswith("error: --download: ") and err.strip().endswith("Fix: leave --download out")


def test_check_dataset_help_names_every_dataset_download_serves(capsys):
    with pytest.raises(SystemExit):
        script("check_dataset").main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "TinyImageNet: fetch it when missing" in text and "(not for imagenet or folder)" in text


# ---- scripts/export_peer.py: never over the checkpoint read, nor over a run's checkpoints ----------------------
def test_export_peer_never_writes_over_a_checkpoint(dml_run, tmp_path, capsys):
    export_peer = script("export_peer")
    run = dml_run
    saved = {name: (run / name).read_bytes() for name in ("last.pt", "best.pt")}
    copy = tmp_path / "c.pt"
    copy.write_bytes(saved["last.pt"])
    (tmp_path / "link.pt").symlink_to(copy)
    (tmp_path / "Best.pt").write_text("an existing file of that name, outside any run: the name is refused first")
    cases = [
        ([str(copy), "-o", str(tmp_path / "Best.pt")], "Best.pt is the name of a run's checkpoint"),
        ([str(copy), "-o", str(copy)], f"-o {copy} is the checkpoint being read"),
        ([str(copy), "-o", str(tmp_path / "." / "c.pt")], "is the checkpoint being read"),
        ([str(tmp_path / "link.pt"), "-o", str(copy)], "is the checkpoint being read"),
        ([str(run / "best.pt"), "-o", str(run / "last.pt")], f"-o {run / 'last.pt'}: last.pt is the name of a run's "
                                                             "checkpoint"),
        ([str(copy), "-o", str(run / "best.pt")], "best.pt is the name of a run's checkpoint"),
        ([str(copy), "-o", str(run / "results.json")], "holds a run (or a copy of one) and results.json is its record"),
        ([str(copy), "-o", str(tmp_path / "new" / "last.pt")], "last.pt is the name of a run's checkpoint"),
    ]
    for argv, named in cases:
        code = export_peer.main([*argv, "--peer", "1", "--force"])
        line = one_line(code, capsys.readouterr().err)
        assert named in line and line.endswith("--force or not"), line
    assert {name: (run / name).read_bytes() for name in saved} == saved and copy.read_bytes() == saved["last.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Best.pt", "c.pt", "link.pt"]
    assert export_peer.main([str(copy), "--peer", "1", "-o", str(tmp_path / "peer1.pt")]) == 0     # the way it works
    assert (run / "tensorboard").is_dir()          # the run's tensorboard/ folder: the file named is beside it
    assert export_peer.main([str(copy), "--peer", "1", "-o", str(run / "tensorboard")]) == 2
    assert one_line(2, capsys.readouterr().err) == (f"error: -o {run / 'tensorboard'} is a folder; give a file name "
                                                    f"(e.g. {run / 'peer.pt'})")
    with pytest.raises(SystemExit) as exit_:                      # (not "-o . is a folder")
        export_peer.main([str(copy), "--peer", "1", "-o", ""])
    assert "argument -o/--output: must name a file or folder; got an empty string" in \
        one_line(exit_.value.code, capsys.readouterr().err)


@pytest.mark.parametrize("name, argv, flag", [
    ("check_dataset", ["--dataset", "fashion-mnist", "--out", ""], "--out"), ("benchmark", ["--json", ""], "--json"),
    ("export_peer", ["", "--peer", "1", "-o", "x.pt"], "checkpoint"), ("kl_gap", ["--checkpoint", ""], "--checkpoint"),
])
def test_an_empty_path_is_named_not_taken_for_the_current_folder(name, argv, flag, capsys):
    """An empty file name is refused as such (Path('') is '.': it was "--out . is a folder")."""
    with pytest.raises(SystemExit) as exit_:
        script(name).main(argv)
    assert f"argument {flag}: must name a file or folder; got an empty string" in \
        one_line(exit_.value.code, capsys.readouterr().err)


# ---- every script that writes a file: never one of a run directory's own files, --force or not ------------------
RUN_OWN_FILES = ["last.pt", "best.pt", "results.json", ".lock", "eval-best-synthetic.json", "LAST.PT",
                 "tensorboard/peer.json"]


def fake_run_folder(folder: Path, lock: bool = True) -> dict:
    """A run directory's files (any content will do: the rule goes by the names a run gives them); without
    ``lock``, a copy of one (`cp run/* copy/` leaves the hidden lock file behind)."""
    (folder / "tensorboard").mkdir(parents=True)
    for name in ("last.pt", "best.pt", "results.json", "eval-best-synthetic.json", "tensorboard/events.out"):
        (folder / name).write_text(f"the run's {name}\n")
    if lock:
        (folder / ".lock").write_text("")
    return snapshot(folder)


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name, copied", [(name, False) for name in RUN_OWN_FILES]
                         + [(name, True) for name in RUN_OWN_FILES if not name.startswith("tensorboard/")])
def test_no_script_writes_over_a_run_directorys_own_files(dml_run, tmp_path, capsys, monkeypatch, name, copied):
    """Nor over those of a copy of a run without its lock file: its checkpoints mark it as a run all the same."""
    run = tmp_path / "run"
    before = fake_run_folder(run, lock=not copied)
    out = run / name
    tree = write_folder(tmp_path / "tree", per_split=(("train", 2), ("val", 1)))
    benchmark = script("benchmark")
    monkeypatch.setattr(benchmark, "make_trainer", lambda *a: pytest.fail("the benchmark ran"))
    export_peer = script("export_peer")
    calls = [
        ("-o", lambda: export_peer.main([str(dml_run / "best.pt"), "--peer", "1", "-o", str(out), "--force"])),
        ("--out", lambda: script("check_dataset").main(["--dataset", "folder", "--data", str(tree), "--workers", "0",
                                                        "--out", str(out), "--force"])),
        ("--json", lambda: benchmark.main(["--device", "cpu", "--json", str(out), "--force"])),
    ]
    for flag, call in calls:
        capsys.readouterr()
        try:
            code = call()
        except SystemExit as e:
            code = e.code
        line = one_line(code, capsys.readouterr().err)
        assert line.startswith(f"error: {flag} {out}") and line.endswith("--force or not"), line
        assert ("holds a run" in line or "tensorboard/ folder of the run" in line
                or flag == "-o" and "is the name of a run's checkpoint" in line), line   # (export_peer: anywhere)
        assert not copied or f"{run} holds a run (or a copy of one) and " in line or flag == "-o", line
    assert snapshot(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run", "tree"]


def test_a_run_file_name_outside_a_run_is_an_ordinary_output(tmp_path, capsys):
    """The rule is about a run's folder: results.json in a folder that holds no run is a file like any other."""
    tree = write_folder(tmp_path / "tree", per_split=(("train", 2), ("val", 1)))
    out = tmp_path / "reports" / "results.json"
    code, _, err = run_check(capsys, "--dataset", "folder", "--data", str(tree), "--workers", "0", "--out", str(out))
    assert code == 0 and err == ""
    code, _, err = run_check(capsys, "--dataset", "folder", "--data", str(tree), "--workers", "0", "--out", str(out),
                             "--force")                            # the script's own earlier output, replaced
    assert code == 0 and err == ""


@pytest.mark.parametrize("inside", ["train/cat/cat_0.png", "bad.txt", "train/cat/new.txt"])
def test_check_dataset_out_inside_the_dataset_checked_is_refused(tmp_path, capsys, inside):
    tree = write_folder(tmp_path / "tree", per_split=(("train", 2), ("val", 1)))
    before = snapshot(tree)
    out = tree / inside
    (tmp_path / "link").symlink_to(tree)
    for given, data in ((out, tree), (tmp_path / "link" / inside, tree), (out, tmp_path / "link")):
        code, stdout, err = run_check(capsys, "--dataset", "folder", "--data", str(data), "--workers", "0",
                                      "--out", str(given), "--force")
        line = one_line(code, err)
        assert line.startswith(f"error: --out {given} lies inside the dataset folder being checked ({data})") or \
            line.startswith(f"error: --out {given} is"), line
        assert line.endswith("--force or not") and "decoding" not in stdout
    assert snapshot(tree) == before                              # the training image is still an image


def test_check_dataset_out_inside_tinyimagenet_found_in_data_is_refused(tmp_path, capsys):
    """--data may be the parent of tiny-imagenet-200: a list beside it is fine, one inside it is refused."""
    root = write_tinyimagenet(tmp_path)
    inside = root / "wnids.txt"
    before = inside.read_bytes()
    code, _, err = run_check(capsys, "--dataset", "tinyimagenet", "--data", str(tmp_path), "--out", str(inside),
                             "--force")
    assert one_line(code, err).startswith(f"error: --out {inside} lies inside the dataset folder being checked ({root})")
    assert inside.read_bytes() == before


def test_check_dataset_workers_are_bounded(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_check(capsys, "--dataset", "folder", "--data", str(tmp_path), "--workers", "100000")
    line = one_line(exit_.value.code, capsys.readouterr().err)
    assert "argument --workers: must lie in [0, " in line and "got 100000 (decoding processes started at once" in line


# ---- scripts/reproduce.py --gpus ---------------------------------------------------------------------------------
@pytest.mark.parametrize("gpus, bad", [("a,b", "a"), ("0,x", "x"), ("-1", "-1"), ("1.5", "1.5"), ("0 gpu1", "gpu1"),
                                       ("cuda:0", "cuda:0")])
def test_reproduce_gpus_are_integer_ids(capsys, monkeypatch, gpus, bad):
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a run was started"))
    with pytest.raises(SystemExit) as exit_:
        reproduce.main(["smoke", "--gpus", gpus])
    line = one_line(exit_.value.code, capsys.readouterr().err)
    assert f"argument --gpus: {gpus!r}: {bad!r} is not a GPU index; write non-negative integers" in line


@pytest.mark.parametrize("gpus", ["0,1", "0, 1", "0 1", " 0,01 "])
def test_reproduce_gpus_separated_by_commas_or_spaces(gpus):
    assert reproduce.build_parser().parse_args(["smoke", "--gpus", gpus]).gpus == "0,1"


# ---- scripts/kl_gap.py --checkpoint ------------------------------------------------------------------------------
def test_kl_gap_checkpoint_refused_in_one_line_before_data_is_loaded(dml_run, dccl_run, tmp_path, capsys, monkeypatch):
    kl_gap = script("kl_gap")
    monkeypatch.setattr(kl_gap, "batch_of", lambda *a: pytest.fail("data loaded before the checkpoint was checked"))
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes((dccl_run / "last.pt").read_bytes()[:5000])
    line = one_line(kl_gap.main(["--checkpoint", str(truncated)]), capsys.readouterr().err)
    assert line.startswith(f"error: checkpoint {truncated} cannot be read") and "truncated" in line
    assert line.endswith("name the run's other checkpoint (best.pt / last.pt)"), line    # (not a training flag)
    dml = dml_run / "last.pt"
    line = one_line(kl_gap.main(["--checkpoint", str(dml)]), capsys.readouterr().err)
    assert line.startswith(f"error: --checkpoint {dml} was saved by train_dml.py; kl_gap.py reads dccl checkpoints")
    dccl = dccl_run / "last.pt"
    line = one_line(kl_gap.main(["--checkpoint", str(dccl), "--dataset", "cifar10"]), capsys.readouterr().err)
    assert "was trained on synthetic, not --dataset cifar10; give --dataset synthetic" in line
    with pytest.raises(SystemExit) as exit_:
        kl_gap.main(["--batch-size", "0"])
    one_line(exit_.value.code, capsys.readouterr().err)
    for argv, message in ((["--data", str(truncated)], "is a file, not a folder"),        # the engine's flag types
                          (["--kd-T", "0"], "must lie in (0, 10000]; got 0 (a temperature")):
        with pytest.raises(SystemExit) as exit_:
            kl_gap.main(argv)
        assert message in one_line(exit_.value.code, capsys.readouterr().err)


def test_kl_gap_takes_the_download_flag_its_missing_data_line_names(tmp_path, capsys, monkeypatch):
    """A missing dataset's line says 'pass --download'; kl_gap.py takes it (it was 'unrecognized arguments')."""
    kl_gap = script("kl_gap")
    monkeypatch.setenv("OKD_DATASETS", str(tmp_path))
    line = one_line(kl_gap.main(["--arch", "resnet20", "--dataset", "cifar10"]), capsys.readouterr().err)
    assert "pass --download to fetch" in line
    asked = []
    monkeypatch.setattr(kl_gap, "load_dataset", lambda name, data, download: asked.append(download) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        kl_gap.main(["--arch", "resnet20", "--dataset", "cifar10", "--download"])
    assert asked == [True]


def test_kl_gap_measures_a_dccl_checkpoint_on_its_own_data(dccl_run, capsys):
    kl_gap = script("kl_gap")
    assert kl_gap.main(["--checkpoint", str(dccl_run / "last.pt"), "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("synthetic: one augmented training batch of 8") and "(epoch 1)" in out
    assert "| kd_feat: stage 1 (16x32x32) | 16,384 |" in out


# ---- scripts/kl_gap.py: choices and ranges declared with the flags -----------------------------------------------
@pytest.mark.parametrize("argv, named", [
    (["--dataset", "bogus"], "argument --dataset: invalid choice: 'bogus' (choose from 'cifar10', 'cifar100'"),
    (["--dataset", "folder"], "argument --dataset: invalid choice: 'folder'"),
    (["--num-classes", "100000000"], "argument --num-classes: must lie in [2, 100000]; got 100000000"),
    (["--num-classes", "1"], "argument --num-classes: must lie in [2, 100000]; got 1 (classes of a classification "
                             "head (over one class every KL is 0)"),
    (["--threads", "100000"], "argument --threads: must lie in [1, "),
    (["--seed", "99999999999999999999999"], "argument --seed: must lie in [0, 4294967296)"),
])
def test_kl_gap_flags_are_checked_when_read(argv, named, capsys, monkeypatch):
    kl_gap = script("kl_gap")
    monkeypatch.setattr(kl_gap, "measure_and_print", lambda a: pytest.fail("it ran"))
    with pytest.raises(SystemExit) as exit_:
        kl_gap.main(["--arch", "resnet20", *argv])
    assert named in one_line(exit_.value.code, capsys.readouterr().err)


def test_kl_gap_says_what_it_measures(capsys, monkeypatch):
    """Nothing to measure is one line; a --batch-size above the training set prints the batch measured."""
    import torch
    kl_gap = script("kl_gap")
    with pytest.raises(SystemExit) as exit_:
        kl_gap.main(["--dataset", "synthetic"])
    assert "nothing to measure: give --arch NAME" in one_line(exit_.value.code, capsys.readouterr().err)
    monkeypatch.setattr(kl_gap, "batch_of", lambda *a: (torch.rand(5, 3, 32, 32), 10))   # a training set of 5
    assert kl_gap.main(["--dataset", "synthetic", "--arch", "resnet20", "--batch-size", "8"]) == 0
    assert capsys.readouterr().out.startswith("synthetic: one augmented training batch of 5 (the whole training set: "
                                              "--batch-size 8 is more)")


# ---- scripts/mcl_memory.py: sizes checked before any process starts ---------------------------------------------
def mcl_memory_error(argv, capsys, monkeypatch) -> str:
    """The one line mcl_memory.py refuses ``argv`` with (1 GiB free), no measurement started."""
    mcl_memory = script("mcl_memory")
    monkeypatch.setattr(mcl_memory, "available_bytes", lambda device: 2 ** 30)
    monkeypatch.setattr(mcl_memory.subprocess, "run", lambda *a, **k: pytest.fail("a measurement started"))
    with pytest.raises(SystemExit) as exit_:
        mcl_memory.main(argv)
    return one_line(exit_.value.code, capsys.readouterr().err)


@pytest.mark.parametrize("argv, named", [
    (["--peers", "1"], "argument --peers: must lie in [2, 256]; got 1 (the contrastive step scores the pairs"),
    (["--k", "100000000"], "argument --k: must lie in [1, 1048576]; got 100000000"),
    (["--batch", "0"], "argument --batch: must lie in [1, "),
    (["--k", "1000000"], "the official step needs about 377.8 GiB, and 1.0 GiB is free on the cpu; lower --k"),
])
def test_mcl_memory_sizes_are_one_line_before_anything_runs(argv, named, capsys, monkeypatch):
    assert named in mcl_memory_error(argv, capsys, monkeypatch)


def test_mcl_memory_counts_the_step_not_the_making_of_the_banks():
    """The CPU peak is the step's: making the banks (here 2 x 250,000 x 128 floats, 244 MiB, twice that while
    normalised) before it does not count. (It did: this step, a few MiB, measured as much as the banks.)"""
    import argparse
    mcl_memory = script("mcl_memory")
    a = argparse.Namespace(device="cpu", peers=2, n_data=250_000, feat_dim=128, batch=1, k=1, tau=0.1)
    assert mcl_memory.measure("ours", a)["peak_mib"] < 100


def test_mcl_memory_without_cuda_and_a_failed_measurement_are_one_line(capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "--device cuda: this machine has no CUDA GPU" in mcl_memory_error(["--device", "cuda"], capsys, monkeypatch)
    mcl_memory = script("mcl_memory")
    killed = subprocess.CompletedProcess([], -9, stdout="", stderr="")
    monkeypatch.setattr(mcl_memory.subprocess, "run", lambda *a, **k: killed)      # the kernel's OOM killer
    with pytest.raises(SystemExit) as exit_:
        mcl_memory.main(["--k", "64", "--n-data", "1000"])
    line = capsys.readouterr().err.strip()
    assert exit_.value.code == 1 and line.count("\n") == 0 and "Traceback" not in line
    assert line == ("error: the official measurement failed (killed by signal 9, most likely for lack of memory: "
                    "lower --k or --batch)")


@pytest.mark.slow
def test_mcl_memory_measures_both_variants(capsys):
    assert script("mcl_memory").main(["--k", "64", "--n-data", "1000", "--batch", "8"]) == 0
    out = capsys.readouterr().out
    assert "B=8 K=64 N=4" in out and out.count("\nofficial ") == 1 and out.count("\nours ") == 1


# ---- scripts/prepare_imagenet_val.py -----------------------------------------------------------------------------
def test_prepare_imagenet_val_missing_files_are_one_line_and_nothing_is_replaced(tmp_path, capsys):
    prepare = script("prepare_imagenet_val")
    (tmp_path / "val" / "n00000001").mkdir(parents=True)
    labels = tmp_path / "LOC_val_solution.csv"
    labels.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n00000001 1 2 3 4\n"
                      "ILSVRC2012_val_00000002,n00000001 1 2 3 4\n")
    for val_dir, csv, named in ((tmp_path / "nowhere", labels, f"--val-dir {tmp_path / 'nowhere'} is not a folder"),
                                (tmp_path / "val", tmp_path / "x.csv", f"--labels {tmp_path / 'x.csv'} is not a file")):
        with pytest.raises(SystemExit) as exit_:
            prepare.main(["--val-dir", str(val_dir), "--labels", str(csv)])
        assert named in one_line(exit_.value.code, capsys.readouterr().err)
    with pytest.raises(SystemExit) as exit_:                     # --meta is for the devkit's .txt labels only
        prepare.main(["--val-dir", str(tmp_path / "val"), "--labels", str(labels), "--meta", "meta.mat"])
    assert f"--meta is for the devkit's .txt labels; --labels {labels} names its classes itself" in \
        one_line(exit_.value.code, capsys.readouterr().err)
    (tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"the flat copy")
    (tmp_path / "val" / "ILSVRC2012_val_00000002.JPEG").write_bytes(b"image 2")
    (tmp_path / "val" / "n00000001" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"already sorted")
    assert prepare.main(["--val-dir", str(tmp_path / "val"), "--labels", str(labels)]) == 1
    assert "1 stay put because their class folder already holds a file of that name" in capsys.readouterr().out
    assert (tmp_path / "val" / "n00000001" / "ILSVRC2012_val_00000001.JPEG").read_bytes() == b"already sorted"
    assert (tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG").read_bytes() == b"the flat copy"
    assert (tmp_path / "val" / "n00000001" / "ILSVRC2012_val_00000002.JPEG").read_bytes() == b"image 2"


def test_prepare_imagenet_val_a_bom_the_datasets_root_and_a_file_cut_short(tmp_path, capsys):
    """A CSV saved with a byte-order mark (Excel) is read (it was refused as having no header); a --val-dir that
    holds no flat image but val/ (the dataset's root) is one line naming the folder to give (it printed "0 images
    into 0 class folders", exit 0); a label file cut short at a row's end says so with its row count."""
    prepare = script("prepare_imagenet_val")
    val = tmp_path / "imagenet" / "val"
    val.mkdir(parents=True)
    labels = tmp_path / "LOC_val_solution.csv"
    labels.write_bytes("\ufeffImageId,PredictionString\nILSVRC2012_val_00000001,n00000001 1 2 3 4\n".encode())
    for name in ("ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG"):      # the second has no label
        (val / name).write_bytes(b"an image")
    with pytest.raises(SystemExit) as exit_:
        prepare.main(["--val-dir", str(val.parent), "--labels", str(labels)])
    assert one_line(exit_.value.code, capsys.readouterr().err) == (
        f"error: --val-dir {val.parent} holds no flat image but a val/ folder (the dataset's root?); give --val-dir "
        f"{val}")
    assert prepare.main(["--val-dir", str(val), "--labels", str(labels)]) == 1
    assert (f"1 images into 1 class folders under {val}; 1 images have no label in {labels} and stay put (it labels "
            "1 images of the release 50,000: cut short? download it again)") in capsys.readouterr().out
    assert (val / "n00000001" / "ILSVRC2012_val_00000001.JPEG").is_file()


def test_prepare_imagenet_val_a_file_named_like_a_class_and_what_it_leaves_are_one_line(tmp_path, capsys):
    """A file where a class folder goes is named before anything moves (it was a traceback after the plan was
    printed); --dry-run exits as the real run would (1: images stay put); the images the script leaves beside
    the class folders are named as such by the dataset (it sent the user back to this script)."""
    from data import DatasetError
    from data.imagenet import load_imagenet
    prepare = script("prepare_imagenet_val")
    val = tmp_path / "imagenet" / "val"
    val.mkdir(parents=True)
    labels = tmp_path / "LOC_val_solution.csv"
    labels.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n00000001 1 2 3 4\n")
    for name in ("ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG"):      # the second has no label
        (val / name).write_bytes(b"an image")
    (val / "n00000001").write_text("a file, not a folder")
    argv = ["--val-dir", str(val), "--labels", str(labels)]
    with pytest.raises(SystemExit) as exit_:
        prepare.main(argv)
    assert one_line(exit_.value.code, capsys.readouterr().err) == (
        f"error: {val / 'n00000001'} is a file where the class folder n00000001/ goes; move it away (nothing was "
        "moved)")
    assert sorted(p.name for p in val.iterdir()) == ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG",
                                                      "n00000001"]
    (val / "n00000001").unlink()
    assert prepare.main(argv + ["--dry-run"]) == 1 and prepare.main(argv) == 1
    (tmp_path / "imagenet" / "train" / "n00000001").mkdir(parents=True)
    with pytest.raises(DatasetError) as e:
        load_imagenet(tmp_path / "imagenet")
    assert str(e.value).startswith(f"dataset 'imagenet': {val} holds 1 image file(s) beside its class folders (e.g. "
                                   "ILSVRC2012_val_00000002.JPEG): a sort into class folders that was interrupted, "
                                   "or images it left")
    assert "Fix: run scripts/prepare_imagenet_val.py again (it moves what has a label)" in str(e.value)
