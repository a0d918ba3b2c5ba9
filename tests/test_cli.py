"""The command line as a newcomer meets it: every documented command parses, bad values stop in one line
before any data is read, --help is complete, the presets and schedules a flag names; importing the engine
changes nothing global."""
import argparse
import importlib.util
import math
import os
import re
import shlex
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

import data
from engine import UserError, build_parser, main, parse_args
from engine.cli import temperature
from recipes import RECIPES
from engine.method import load_method
from engine.optim import lr_factor
from engine.trainer import one_line_warning

REPO = Path(__file__).resolve().parent.parent
METHODS = sorted(p.stem[len("train_"):] for p in REPO.glob("train_*.py"))
SCRIPTS = sorted(p.name for p in (REPO / "scripts").glob("*.py")    # the command-line tools (a __main__)
                 if 'if __name__ == "__main__"' in p.read_text())


# ---- 1. every command of the README parses ---------------------------------------------------------
def documented_commands():
    """(file, argv) of every `python train_*.py ...` / `torchrun ... train_*.py ...` line in a fenced block
    of the README and docs/, continuation lines joined and comments dropped."""
    found = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        blocks = re.findall(r"```[a-z]*\n(.*?)```", doc.read_text(), flags=re.S)
        for block in blocks:
            copies = dict(re.findall(r"^cp (train_\w+)\.py (train_\w+)\.py", block, flags=re.M))
            copies = {copy: original for original, copy in copies.items()}    # a copy parses as its original
            for line in block.replace("\\\n", " ").splitlines():
                if not re.match(r"\s*(python|torchrun)\b.*\btrain_\w+\.py", line):
                    continue
                words = shlex.split(line, comments=True)
                scripts = [i for i, w in enumerate(words) if re.fullmatch(r"train_\w+\.py", w)]
                placeholder = any(re.fullmatch(r"[A-Z]|\{.*\}|<.*>", w) for w in words)   # --seed S, {off,bf16}
                if scripts and words[0] in ("python", "torchrun") and not placeholder:
                    script = words[scripts[0]][:-3]
                    found.append((doc.name, copies.get(script, script)[len("train_"):], words[scripts[0] + 1:]))
    return found


COMMANDS = documented_commands()


def test_the_docs_have_commands():
    assert sum(doc == "README.md" for doc, _, _ in COMMANDS) >= 20
    assert {"dml", "cmff", "mcl_okd"} <= {m for _, m, _ in COMMANDS}


@pytest.mark.parametrize("doc,method,argv", COMMANDS, ids=[f"{d}:{' '.join(a)[:60]}" for d, _, a in COMMANDS])
def test_documented_command_parses(doc, method, argv):
    cls = load_method(method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # e.g. a shortened multistep run: milestones beyond --epochs
        args = parse_args(cls, argv)
        cls.check_args(args)


@pytest.mark.parametrize("argv", [["--milestones", "150", "225"], ["--milestones", "150,225"],
                                  ["--milestones", "150 225"], ["--milestones", "150,", "225"]])
def test_milestones_as_the_readme_writes_them(argv):
    cls = load_method("dml")
    assert parse_args(cls, argv + ["--lr-schedule", "multistep"]).milestones == [150, 225]


# ---- 2. bad values: one line, before any data ------------------------------------------------------
def temperature_flags(cls):
    parser = build_parser(cls, cls.recipe)
    return [a.option_strings[0] for a in parser._actions if a.type is temperature]


def test_every_distilling_method_declares_its_temperatures():
    """Every temperature flag is declared as one (type=temperature: > 0), so no temperature escapes the check."""
    flags = {m: temperature_flags(load_method(m)) for m in METHODS}
    assert flags["baseline"] == []
    assert all("--kd-T" in f for m, f in flags.items() if m != "baseline")
    assert "--nce-t" in flags["mcl_okd"] and "--sim-T" in flags["cmff"]
    for m in METHODS:
        cls = load_method(m)
        named = [a.option_strings[0] for a in build_parser(cls, cls.recipe)._actions
                 if re.search(r"(^|_)[tT]$", a.dest)]
        assert named == flags[m], m


BAD = [("dml", ["--lr", "-0.1"], "argument --lr: must be >= 0; got -0.1"),
       ("dml", ["--momentum", "-0.9"], "argument --momentum: must lie in [0, 1); got -0.9"),
       ("dml", ["--weight-decay", "-1e-4"], "argument --weight-decay: must lie in [0, 1]; got -1e-4"),
       ("dml", ["--weight-decay", "1e30"], "argument --weight-decay: must lie in [0, 1]; got 1e30 (an L2 coefficient"),
       ("ffl", ["--kd-eps", "2"], "argument --kd-eps: must lie in [0, 0.001]; got 2 (added to probabilities, not"),
       ("mcl_okd", ["--nce-m", "1"], "argument --nce-m: must lie in [0, 1); got 1 (m = 1 never writes an embedding"),
       ("mcl_okd", ["--nce-k", "100000000"], "argument --nce-k: must lie in [1, 65536]; got 100000000 (each anchor"),
       ("mcl_okd", ["--feat-dim", "100000000"], "argument --feat-dim: must lie in [1, 2048]; got 100000000 (each"),
       ("cmff", ["--attention-heads", "1000000"], "argument --attention-heads: must lie in [1, 64]; got 1000000 (each"),
       ("dml", ["--seed", "-1"], "--seed"),
       ("dml", ["--seed", str(2 ** 32)], "--seed"),
       ("cmff", ["--fusion-weight-decay", "-1"], "argument --fusion-weight-decay: must lie in [0, 1]"),
       ("dml", ["--momentum", "1.5"], "argument --momentum: must lie in [0, 1)"),
       ("dml", ["--momentum", "1"], "argument --momentum: must lie in [0, 1)"),
       ("dml", ["--num-peers", "100000"], "argument --num-peers: must lie in [2, 256]; got 100000 (the peers are"),
       ("dml", ["--eval-subset", "-1"], "argument --eval-subset: must be >= 0; got -1"),
       ("dml", ["--threads", "100000"], "argument --threads: must lie in [1, 1024]; got 100000"),
       ("dml", ["--workers", "100000"], "argument --workers: must lie in [0, 1024]; got 100000"),
       ("cmff", ["--mlp-ratio", "1e30"], "argument --mlp-ratio: must lie in (0, 8]; got 1e30 (the MLP is ratio x d"),
       ("dml", ["--lr", "1e39"], "argument --lr: must be a finite number; got 1e39, which is infinite in float32"),
       ("dml", ["--lr", "nan"], "argument --lr: must be a finite number; got nan"),
       ("amln", ["--adv-weight", "nan"], "argument --adv-weight: must be a finite number"),
       ("amln", ["--disc-weight-decay", "inf"], "argument --disc-weight-decay: must be a finite number"),
       ("amln", ["--disc-betas", "0.5", "nan"], "argument --disc-betas: must be a finite number; got nan")]
BAD += [(m, [flag, value], f"argument {flag}: must lie in (0, 10000]; got {value} (a temperature: the softmax "
                          "divides by it") for m in METHODS for flag in temperature_flags(load_method(m))
        for value in ("0", "-1", "1e30")]


def _float_flags():
    """(method, flag, nargs) of every float-valued flag of every method script."""
    found = []
    for m in METHODS:
        cls = load_method(m)
        for action in build_parser(cls, cls.recipe, None, None)._actions:
            if getattr(action.type, "kind", action.type) is float and action.option_strings:
                found.append((m, action.option_strings[-1], action.nargs))
    return found


@pytest.mark.parametrize("method,flag,nargs", _float_flags(), ids=lambda v: str(v))
def test_every_float_flag_refuses_nan_and_inf(method, flag, nargs, capsys):
    """No NaN or infinity reaches a run through any number flag (a NaN passes every `< 0` check), nor a number
    that float32, in which training computes, holds as infinity (1e308: an overflow in an optimizer or a size)."""
    cls = load_method(method)
    width = nargs if isinstance(nargs, int) else 1
    bad_values = [["--gpu", "-1", flag] + ["0.5"] * (width - 1) + [bad] for bad in ("nan", "inf", "1e308")]
    if width == 1:
        bad_values.append(["--gpu", "-1", f"{flag}=-inf"])
    for argv in bad_values:
        with pytest.raises(SystemExit):
            parse_args(cls, argv)
        assert f"argument {flag}: must be a finite number" in capsys.readouterr().err


def test_milestones_are_one_schedule_in_any_order_and_sgdr_t0_without_sgdr_warns(capsys):
    dml = load_method("dml")
    assert parse_args(dml, ["--lr-schedule", "multistep", "--milestones", "225", "150"]).milestones == [150, 225]
    with pytest.raises(SystemExit):           # a repeated epoch would decay the lr twice there (x0.01)
        parse_args(dml, ["--lr-schedule", "multistep", "--milestones", "1,1", "5"])
    assert "argument --milestones: epoch 1 given twice; give each once" in capsys.readouterr().err
    # given twice: both (the second once replaced the first, silently), the repeated-epoch check over both
    assert parse_args(dml, ["--lr-schedule", "multistep", "--milestones", "200", "--milestones", "100"]).milestones \
        == [100, 200]
    with pytest.raises(SystemExit):
        parse_args(dml, ["--lr-schedule", "multistep", "--milestones", "100", "--milestones", "100"])
    assert "argument --milestones: epoch 100 given twice; give each once" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="--sgdr-t0 applies to --lr-schedule sgdr only; this run's schedule is "
                                         "cosine, so it is ignored"):
        parse_args(dml, ["--gpu", "-1", "--sgdr-t0", "10"])


def test_milestones_without_multistep_warn():
    with pytest.warns(UserWarning, match="--milestones apply to --lr-schedule multistep only; this run's schedule "
                                         "is cosine"):
        parse_args(load_method("dml"), ["--gpu", "-1", "--milestones", "5", "10"])
    with pytest.warns(UserWarning, match="--milestones apply to --lr-schedule multistep only"):
        parse_args(load_method("ffl"), ["--gpu", "-1", "--lr-schedule", "cosine", "--milestones", "150", "225"])
    with pytest.warns(UserWarning, match="--milestones apply to --lr-schedule multistep only"):
        parse_args(load_method("dml"), ["--gpu", "-1", "--mil", "5"])           # argparse's abbreviation too
    assert parse_args(load_method("dml"), ["--gpu", "-1", "--eval-subset", "0"]).eval_subset is None


UNUSED = [("cmff", "--no-rot --lambda-rot 3", "--lambda-rot", "--no-rot turns the rotation CE off"),
          ("cmff", "--no-ssl --sim-T 0.5", "--sim-T", "--no-ssl turns both self-supervised terms off"),
          ("cmff", "--no-ssl --no-sim", "--no-sim", "--no-ssl turns both"),
          ("cmff", "--no-sim --lambda-sim 1", "--lambda-sim", "--no-sim turns L_sim off"),
          ("cmff", "--no-cross-attention --attention-heads 8", "--attention-heads", "--no-cross-attention leaves"),
          ("mcl_okd", "--alpha 0 --kd-T 5", "--kd-T", "--alpha 0 turns DOT off"),
          ("mcl_okd", "--beta 0 --nce-k 64", "--nce-k", "--beta 0 turns the contrastive loss off"),
          ("kdcl", "--kd-lambda 0 --ensemble naive", "--ensemble", "--kd-lambda 0 turns distillation off"),
          ("amln", "--adv-weight 0 --disc-lr 0.1", "--disc-lr", "--adv-weight 0 turns the adversarial loss off"),
          ("cl_ilr", "--num-peers 2 --soft-target probs", "--soft-target", "with 2 heads each head's target is"),
          ("dml", "--tf32", "--tf32", "it sets CUDA's TF32, and this run trains on the CPU"),
          ("dml", "--no-tf32", "--no-tf32", "it sets CUDA's TF32, and this run trains on the CPU"),
          ("dml", "--gpu 0 --tf32", "--tf32", "it sets CUDA's TF32, and this run trains on the CPU"),   # (no CUDA)
          ("dml", "--momentum 0 --no-nesterov", "--no-nesterov", "acts through the momentum, and --momentum is 0"),
          ("dml", "--momentum 0 --nesterov", "--nesterov", "acts through the momentum, and --momentum is 0"),
          ("dml", "--lr-scale linear", "--lr-scale", "'linear' multiplies the lr by the number of processes"),
          ("dml", "--dataset imagenet --pad-mode reflect", "--pad-mode", "ImageNet's training crop is RandomResized"),
          ("dml", "--dataset folder --image-size 96 --pad-mode reflect", "--pad-mode",
           "a folder's training crop at --image-size 96 is RandomResized"),
          ("dml", "--dataset synthetic --data /somewhere", "--data", "--dataset synthetic is generated in memory")]


@pytest.mark.parametrize("method,argv,flag,why", UNUSED, ids=[f"{m} {a}" for m, a, _, _ in UNUSED])
def test_a_flag_that_does_nothing_in_the_run_warns(method, argv, flag, why, monkeypatch):
    """A flag the command gives that this run cannot use (an ablation switch turned its term off; a GPU,
    multi-process or data-file flag where there is none) is named with why, not recorded silently."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)     # (the run falls back to the CPU)
    with pytest.warns(UserWarning) as caught:
        parse_args(load_method(method), ["--gpu", "-1", *argv.split()])
    said = [str(w.message) for w in caught if str(w.message).startswith(f"{flag} does nothing in this run: ")]
    assert len(said) == 1 and why in said[0] and said[0].endswith("the run is recorded with it, so leave it out")


@pytest.mark.parametrize("method", ["okddip", "one", "pcl", "ffl", "dccl", "cmff"])
def test_a_ramp_up_longer_than_the_run_warns_with_the_weight_it_reaches(method):
    """A shortened run (its lr schedule scaled to --epochs) keeps the ramp-up's length: its KD weight never nears
    1, which is named with the weight the last epoch (0-based: epochs - 1) reaches, exp(-5 (1 - (epochs-1)/R)^2)."""
    for epochs, rampup, weight in (("30", "80", math.exp(-5 * (1 - 29 / 80) ** 2)),    # 0.13
                                   ("30", "30", math.exp(-5 * (1 - 29 / 30) ** 2)),    # 0.99: not 1 yet
                                   ("1", "1", math.exp(-5))):                          # one epoch: epoch 0 only
        with pytest.warns(UserWarning) as caught:
            parse_args(load_method(method), ["--gpu", "-1", "--epochs", epochs, "--rampup", rampup])
        last = int(epochs) - 1         # (a one-epoch run: only 0, not "0 or less": a negative length is refused)
        fix = f"--rampup {last} or less (0: weight 1 throughout)" if last else "--rampup 0 (weight 1 throughout)"
        assert [str(w.message) for w in caught if "--rampup" in str(w.message)] == [
            f"--rampup {rampup} does not end within --epochs {epochs}: the weight it ramps up reaches only "
            f"{weight:.2f} of 1 in the last epoch; for a short run give {fix}"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_args(load_method(method), ["--gpu", "-1", "--epochs", "30", "--rampup", "29"])   # 1 in epoch 29
        parse_args(load_method(method), ["--gpu", "-1", "--epochs", "30", "--rampup", "0"])    # no ramp-up


def test_a_switch_alone_or_a_presets_value_draws_no_unused_flag_warning(monkeypatch):
    """Only flags the command gives are named: not the switch itself, nor a value a preset set (nor --tf32 of a
    run on a GPU)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method, argv in [("cmff", "--no-rot --no-cross-attention"), ("cmff", "--preset rn110 --no-rot"),
                             ("mcl_okd", "--alpha 0 --beta 0"), ("cl_ilr", "--num-peers 3 --soft-target probs"),
                             ("dml", "--gpu 0 --tf32 --dataset synthetic"), ("amln", "--adv-weight 0"),
                             ("dml", "--dataset synthetic --download")]:     # (refused in one line, later)
            parse_args(load_method(method), ["--gpu", "-1", *argv.split()])


@pytest.mark.parametrize("method,argv,message", BAD, ids=[f"{m}{' '.join(a)}" for m, a, _ in BAD])
def test_bad_value_stops_in_one_line_before_data(method, argv, message, monkeypatch, capsys):
    def no_data(*args, **kwargs):
        raise AssertionError("the data were touched")
    monkeypatch.setattr(data, "build_loaders", no_data)
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)   # main() sets its own
    with pytest.raises(SystemExit) as exit_:
        main(load_method(method), ["--dataset", "synthetic", "--gpu", "-1"] + argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.count("\n") == 1 and err.startswith(f"train_{method}.py: error: ") and message in err, err


def test_milestones_beyond_epochs_warn_in_one_line(monkeypatch, capsys):
    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop
    monkeypatch.setattr(data, "build_loaders", stop)
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda m, c, f, n, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(m, c, f, n, line))
        with pytest.raises(Stop):
            main(load_method("dml"), ["--dataset", "synthetic", "--gpu", "-1", "--epochs", "10",
                                      "--lr-schedule", "multistep", "--milestones", "5", "150"])
    err = capsys.readouterr().err
    assert err == ("warning: --milestones 150 lie at or beyond --epochs 10, so the lr never decays there; "
                   "pass milestones below --epochs\n")


def test_one_line_warning_has_no_source_line():
    text = one_line_warning(UserWarning("CUDA is not available"), UserWarning, "/x/engine/trainer.py", 12,
                            "    warnings.warn(...)")
    assert text == "warning: CUDA is not available\n"


GLOBAL_STATE_PROBE = """
import importlib, signal, sys, warnings
from pathlib import Path
import numpy, torch, torchvision      # (what the libraries do to the state when imported is theirs)
def state():
    return (sys.excepthook, sys.displayhook, warnings.formatwarning, warnings.showwarning, list(sys.meta_path),
            list(sys.path_hooks), signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM),
            list(sys.path), list(warnings.filters))
before = state()
repo = Path.cwd()
modules = [p.relative_to(repo).with_suffix("") for p in sorted(repo.glob("*/*.py"))]
names = [m.as_posix().replace("/", ".") for m in modules
         if m.parts[0] in ("engine", "data", "models", "losses", "scripts") and m.name != "__init__"]
names += [p.stem for p in sorted(repo.glob("*.py"))]          # the method scripts, fusion_teacher.py, recipes.py
for name in names:
    importlib.import_module(name)
print(len(names), state() == before)
"""


@pytest.mark.slow
def test_importing_any_module_changes_nothing_global():
    """No import hook, stand-in module, exception hook, warning format or filter, signal handler or sys.path entry
    is installed by importing any module of the repository: one-line errors and warnings are main()'s business,
    and a tool of scripts/ finds the repository's packages itself only when run as a file."""
    r = subprocess.run([sys.executable, "-c", GLOBAL_STATE_PROBE], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    count, unchanged = r.stdout.split()
    assert int(count) >= 60 and unchanged == "True"


def test_main_prints_warnings_as_one_line_and_puts_the_format_back(capsys):
    before = warnings.formatwarning
    with pytest.raises(SystemExit):
        main(load_method("dml"), ["--dataset", "synthetic", "--gpu", "-1", "--lr", "-1"])
    assert warnings.formatwarning is before


# ---- 3. --help: complete, every default once ------------------------------------------------------
def option_blocks(help_text: str) -> dict[str, str]:
    """{first option string: its whole help block} of an argparse help text."""
    blocks, current = {}, None
    for line in help_text.splitlines():
        match = re.match(r"  (-[-\w]+)", line)
        if match:
            current = match.group(1)
            blocks[current] = line
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


@pytest.mark.parametrize("method", METHODS)
def test_help_shows_every_default_once(method, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    cls = load_method(method)
    parser = build_parser(cls, cls.recipe)
    blocks = option_blocks(parser.format_help())
    recipe = RECIPES[cls.recipe]
    for flag, value in [("--epochs", recipe["epochs"]), ("--weight-decay", recipe["weight_decay"]),
                        ("--momentum", recipe["momentum"]), ("--nesterov", recipe["nesterov"]),
                        ("--seed", 0), ("--dataset", "cifar100"), ("--lr", recipe["lr"])]:
        assert f"(default: {value})" in blocks[flag], blocks[flag]
    for action in parser._actions:
        block = blocks[action.option_strings[0]]
        mentions = len(re.findall(r"\(default|default:", block))
        assert mentions <= 1, block
        if action.default not in (None, False, argparse.SUPPRESS, "") and action.dest != "help":
            assert mentions == 1, block
    assert "spec" not in parser.format_help().lower().replace("species", "")


def test_help_follows_recipe_and_preset(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    cls = load_method("dml")
    blocks = option_blocks(build_parser(cls, "one", "mcl-okd").format_help())
    assert "(default: 0.0001)" in blocks["--weight-decay"] and "(default: False)" in blocks["--nesterov"]
    assert "(default: 2.0)" in blocks["--kd-T"] and "(default: 150 225)" in blocks["--milestones"]


@pytest.mark.parametrize("method", ["dml", "kdcl"])
def test_help_shows_the_number_of_peers_an_arch_list_gives(method, monkeypatch, capsys):
    """--arch a,a,b trains 3 peers; --help showed the method's default (2) for --num-peers."""
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit):
        parse_args(load_method(method), ["--arch", "resnet20,resnet20,wrn_16_2", "--help"])
    assert "(default: 3)" in option_blocks(capsys.readouterr().out)["--num-peers"]
    assert parse_args(load_method(method), ["--arch", "resnet20,resnet20,wrn_16_2"]).num_peers == 3


@pytest.mark.slow
@pytest.mark.parametrize("script", [f"train_{m}.py" for m in METHODS] + [f"scripts/{s}" for s in SCRIPTS])
def test_help_of_every_script(script):
    """``python <script> --help`` exits 0 with its usage; for a method, with every option of its parser."""
    r = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, COLUMNS="100", OMP_NUM_THREADS="1"))
    assert r.returncode == 0 and r.stdout.startswith("usage:"), r.stderr
    if script.startswith("train_"):
        cls = load_method(script[len("train_"):-3])
        assert set(option_blocks(r.stdout)) == {a.option_strings[0] for a in build_parser(cls, cls.recipe)._actions}


# ---- 10. recipes, schedules, presets, flags --------------------------------------------------------
def test_sgdr_matches_torch_warm_restarts_and_the_official_values():
    args = parse_args(load_method("baseline"), ["--recipe", "imagenet"])
    assert (args.epochs, args.lr_schedule, args.sgdr_t0, args.weight_decay) == (300, "sgdr", 100, 1e-4)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=100, T_mult=2)
    for epoch in range(300):
        assert 0.1 * lr_factor(epoch, args) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12), epoch
        opt.step()
        sched.step()
    lrs = [0.1 * lr_factor(e, args) for e in (0, 99, 100, 200, 299)]
    assert lrs == pytest.approx([0.1, 2.5e-5, 0.1, 0.05, 6.2e-6], rel=2e-2)
    args.sgdr_t0 = None                                        # unset: one cosine over --epochs
    assert [lr_factor(e, args) for e in (0, 150)] == pytest.approx([1.0, 0.5])
    short = parse_args(load_method("baseline"), ["--recipe", "imagenet-100"])
    assert (short.epochs, short.lr_schedule) == (100, "cosine")


def test_cmff_preset_official():
    cmff = load_method("cmff")
    a = parse_args(cmff, ["--preset", "official"])
    assert (a.fusion_input, a.fusion_decay, a.kd_eps, a.epochs, a.lambda_rot, a.lambda_sim) == (
        "vector", False, 1e-7, 301, 1.0, 5.0)                  # the official KLLoss: target softmax + 1e-7
    assert (a.recipe, a.lr, a.milestones, a.weight_decay, a.fusion_weight_decay, a.kd_T) == (
        "dccl", 0.1, [150, 225], 2e-4, 1e-5, 3.0)
    a = parse_args(cmff, ["--preset", "official", "--arch", "resnet110"])
    assert (a.lambda_rot, a.lambda_sim, a.epochs, a.fusion_input) == (3.0, 2.0, 301, "vector")
    for arch in ("vgg16", "densenet40_12"):
        assert parse_args(cmff, ["--arch", arch, "--preset", "official"]).epochs == 401
    a = parse_args(cmff, ["--preset", "official", "--epochs", "5", "--lambda-sim", "1"])
    assert (a.epochs, a.lambda_sim, a.fusion_decay) == (5, 1.0, False)              # explicit flags win
    a = parse_args(cmff, ["--preset", "official", "--kd-eps", "0", "--fusion-decay"])
    assert (a.kd_eps, a.fusion_decay) == (0.0, True)
    a = parse_args(cmff, ["--arch", "resnet110"])
    assert (a.lambda_rot, a.kd_eps, a.fusion_decay) == (1.0, 0.0, True)              # only under the preset
    assert parse_args(cmff, ["--no-fusion-decay"]).fusion_decay is False


def test_cmff_preset_official_trains_the_fusion_module_at_a_constant_lr(tmp_path):
    from engine import Trainer
    cmff = load_method("cmff")
    args = parse_args(cmff, ["--preset", "official", "--arch", "resnet20", "--dataset", "synthetic", "--subset", "64",
                             "--batch-size", "32", "--fusion-grid", "1", "--gpu", "-1", "--out", str(tmp_path),
                             "--epochs", "4", "--milestones", "2"])
    trainer = Trainer(cmff, args)
    assert trainer.method.model.fusion_shape == (trainer.method.model.dim, 1, 1)     # the vector layout
    for epoch, model_factor in ((0, 1.0), (3, 0.1)):
        trainer.optimization.set_epoch(epoch)
        assert trainer.optimizers["model"].param_groups[0]["lr"] == pytest.approx(0.1 * model_factor)
        assert trainer.optimizers["fusion"].param_groups[0]["lr"] == 0.1


def test_threads_and_tf32_flags(tmp_path):
    from engine import Trainer
    dml = load_method("dml")
    before = torch.get_num_threads()
    args = parse_args(dml, ["--arch", "resnet20", "--dataset", "synthetic", "--subset", "64", "--batch-size", "32",
                            "--gpu", "-1", "--out", str(tmp_path), "--threads", "2"])
    assert args.tf32 is None and parse_args(dml, ["--tf32"]).tf32 and parse_args(dml, ["--no-tf32"]).tf32 is False
    try:
        Trainer(dml, args)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# ---- 6. paths ---------------------------------------------------------------------------------------
def test_run_directory_follows_the_current_directory_or_okd_runs(tmp_path, monkeypatch):
    from engine import Trainer
    dml = load_method("dml")
    argv = ["--arch", "resnet20", "--dataset", "synthetic", "--subset", "64", "--batch-size", "32", "--gpu", "-1"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OKD_RUNS", raising=False)
    out = Trainer(dml, parse_args(dml, argv)).run.folder
    # the readable name, then the hash of the options left at other values than the defaults (--subset ...)
    assert out.parent == tmp_path / "runs" and out.name.startswith("dml-resnet20-synthetic-n2-s0-")
    monkeypatch.setenv("OKD_RUNS", "elsewhere")
    assert Trainer(dml, parse_args(dml, argv)).run.folder == tmp_path / "elsewhere" / out.name


def test_a_failed_download_leaves_no_folder(tmp_path):
    from data.common import DatasetNotFoundError, download_or_explain
    target = tmp_path / "datasets" / "cifar100"

    def fetch():
        (target / "partial").mkdir(parents=True)
        (target / "partial" / "cifar-100-python.tar.gz").write_bytes(b"half")
        raise OSError("network unreachable")
    with pytest.raises(DatasetNotFoundError) as err:
        download_or_explain("cifar100", target, fetch)
    assert not (tmp_path / "datasets").exists()
    assert str(target.absolute()) in str(err.value)
    (tmp_path / "kept").mkdir()                                 # a folder that existed before stays

    def fail():
        raise OSError("no route to host")
    with pytest.raises(DatasetNotFoundError):
        download_or_explain("cifar100", tmp_path / "kept", fail)
    assert (tmp_path / "kept").is_dir()


def test_missing_dataset_message_gives_absolute_paths(tmp_path, monkeypatch):
    from data import load_dataset
    from data.common import DatasetNotFoundError
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OKD_DATASETS", raising=False)
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("cifar100")
    assert str(tmp_path / "datasets" / "cifar100") in str(err.value)
    assert "\n" not in str(err.value) and "To get it: pass --download" in str(err.value)     # one line
    assert not (tmp_path / "datasets").exists()


# ---- 8. scripts/model_table.py ---------------------------------------------------------------------
def load_model_table():
    spec = importlib.util.spec_from_file_location("model_table_cli", REPO / "scripts" / "model_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_table_sorts_naturally_and_counts_each_backbone_once(monkeypatch, capsys):
    table = load_model_table()
    built = Counter()
    real_create = table.create_model

    def counting_create(name, *args, **kwargs):
        built[(name, kwargs.get("image_size"))] += 1
        return real_create(name, *args, **kwargs)
    monkeypatch.setattr(table, "create_model", counting_create)
    assert table.main(["--arch", "resnet110", "resnet20", "resnet32", "resnet18", "--peers", "2", "3", "4"]) == 0
    assert built == {("resnet110", 32): 1, ("resnet20", 32): 1, ("resnet32", 32): 1, ("resnet18", 32): 1,
                     ("resnet18", 224): 1}
    text = capsys.readouterr().out
    backbones = text.split("## Peer")[0].splitlines()
    rows = [line.split(" | ")[0].lstrip("| ") for line in backbones if line.startswith("| r")]
    assert rows == ["resnet110", "resnet20", "resnet32", "resnet18", "resnet18"]     # --arch order kept


def test_model_table_default_order_is_natural():
    from models import list_models
    table = load_model_table()
    names = list_models()
    assert names.index("resnet20") < names.index("resnet32") < names.index("resnet56") < names.index("resnet110")
    assert names.index("wrn_16_2") < names.index("wrn_16_8") < names.index("wrn_28_10")
    assert table.setups("resnet18") == [(32, 100), (224, 1000)] and table.setups("resnet32") == [(32, 100)]


def test_model_table_small_stem_rows_and_method(capsys):
    from models import count_parameters, create_model
    from models.peers import Peers
    table = load_model_table()
    assert table.main(["--arch", "resnet18", "--peers", "2", "--method", "dml"]) == 0
    text = capsys.readouterr().out
    with torch.device("meta"):
        small = create_model("resnet18", num_classes=100, image_size=32)
        peers = Peers("resnet18", 100, 2, "independent", image_size=32)
    assert small.stem[0].kernel_size == (3, 3)
    assert f"| resnet18 | 32x32 | 100 | {count_parameters(small):,} |" in text
    assert "train_dml.py with its default flags" in text
    assert f"| resnet18 | 32x32 | 100 | {count_parameters(peers):,} |" in text.split("train_dml.py")[1]
    with pytest.raises(SystemExit):
        table.main(["--arch", "resnet20", "--method", "no_such_method"])


def test_model_table_counts_mcl_okd_and_a_method_s_pair_of_backbones(capsys):
    """MCL-OKD, whose class-aware negative sampler reads the training labels, is counted like every method (it
    was a traceback); a pair of backbones is counted as the method's own model where it takes one (KDCL)."""
    from models import count_parameters
    table = load_model_table()
    mcl = load_method("mcl_okd")
    args = parse_args(mcl, ["--arch", "resnet20"])
    mcl.check_args(args)
    model = mcl(args, 100, n_train=1000, train_labels=torch.arange(1000) % 100).model
    assert table.main(["--arch", "resnet20", "--peers", "2", "--method", "mcl_okd"]) == 0
    text = capsys.readouterr().out.split("## train_mcl_okd.py")[1]
    assert f"| resnet20 | 32x32 | 100 | {count_parameters(model):,} |" in text
    kdcl = load_method("kdcl")
    pair = kdcl(parse_args(kdcl, ["--arch", "resnet20,wrn_16_2"]), 100, n_train=1000).model
    assert table.main(["--arch", "resnet20,wrn_16_2", "--peers", "2", "--method", "kdcl"]) == 0
    text = capsys.readouterr().out.split("## train_kdcl.py")[1]
    assert f"| resnet20,wrn_16_2 | 32x32 | 100 | {count_parameters(pair):,} |" in text


# ---- 11. a shortened recipe: its schedule in proportion, no warning the user did not cause -------------------
def test_a_shortened_step_recipe_keeps_its_schedule_in_proportion(recwarn):
    pcl = load_method("pcl")
    a = parse_args(pcl, ["--epochs", "30"])                       # okddip recipe: x0.1 at 150 and 225 of 300
    assert (a.milestones, a.schedule_note) == ([15, 22], "the recipe's x0.1 at epochs 150 225 of 300, scaled to "
                                                         "15 22 of 30")
    assert parse_args(pcl, ["--epochs", "3"]).milestones == [2, 2]
    assert parse_args(pcl, []).schedule_note is None and parse_args(pcl, []).milestones == [150, 225]
    assert parse_args(pcl, ["--epochs", "30", "--milestones", "10"]).milestones == [10]   # given: kept
    cmff = load_method("cmff")                                    # a preset's own length (301) is not a shortening
    assert parse_args(cmff, ["--preset", "official"]).milestones == [150, 225]
    base = load_method("baseline")
    sgdr = parse_args(base, ["--recipe", "imagenet", "--epochs", "30"])
    assert (sgdr.sgdr_t0, sgdr.schedule_note) == (10, "the recipe's first SGDR cycle of 100 of 300 epochs, scaled to 10")
    # nothing the user set: no warning of the schedule; PCL's 80-epoch ramp-up is not scaled, and says so
    assert {str(w.message).split(":")[0] for w in recwarn.list} == {"--rampup 80 does not end within --epochs 30",
                                                                     "--rampup 80 does not end within --epochs 3"}
    with pytest.warns(UserWarning, match="--milestones 40 lie at or beyond --epochs 30"):
        parse_args(pcl, ["--epochs", "30", "--milestones", "10", "40"])
    vgg = parse_args(cmff, ["--preset", "official", "--arch", "vgg16", "--epochs", "40"])   # the preset's 401 epochs
    assert (vgg.milestones, vgg.schedule_note) == ([15, 22], "the recipe's x0.1 at epochs 150 225 of 401, scaled to "
                                                             "15 22 of 40")


def test_an_extended_run_says_its_shortened_schedule_was_kept(tmp_path):
    """--extend-epochs keeps the milestones of the shortened recipe (README): the note the run prints and records
    says so, rather than 'scaled to 1 2 of 2' for a run of 3 epochs; extended again, it names the last length."""
    from engine import train
    ffl, out = load_method("ffl"), str(tmp_path / "run")
    train(ffl, ["--dataset", "synthetic", "--arch", "resnet20", "--subset", "32", "--batch-size", "32", "--gpu",
                "-1", "--no-progress", "--workers", "0", "--epochs", "2", "--out", out])
    note = "the recipe's x0.1 at epochs 150 225 of 300, scaled to 1 2 of 2"
    for epochs in (3, 4):
        results = train(ffl, ["--resume", f"{out}/last.pt", "--epochs", str(epochs), "--extend-epochs", "--gpu", "-1",
                              "--no-progress"])
        assert results["args"]["milestones"] == [1, 2]
        assert results["args"]["schedule_note"] == f"{note}; kept by --extend-epochs to {epochs} epochs"
    evaluated = parse_args(ffl, ["--eval-only", f"{out}/last.pt"])     # read back without extending: kept as recorded
    from engine.checkpoint import load_checkpoint
    from engine.config import from_checkpoint
    kept = from_checkpoint(ffl, evaluated, ["--eval-only", f"{out}/last.pt"], load_checkpoint(f"{out}/last.pt"),
                           tmp_path / "run" / "last.pt", True)
    assert kept.schedule_note == f"{note}; kept by --extend-epochs to 4 epochs"


@pytest.mark.parametrize("method, argv, flag, shown", [
    ("pcl", ["--epochs", "30"], "--milestones", "(default: 15 22)"),
    ("ffl", ["--epochs=30"], "--milestones", "(default: 15 22)"),
    ("baseline", ["--recipe", "imagenet", "--epochs", "30"], "--sgdr-t0", "(default: 10)"),
])
def test_help_of_a_shortened_run_shows_the_schedule_it_trains_with(method, argv, flag, shown, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "100")
    cls = load_method(method)
    with pytest.raises(SystemExit):
        parse_args(cls, argv + ["--help"])
    assert shown in option_blocks(capsys.readouterr().out)[flag]       # what parse_args(cls, argv) trains with


@pytest.mark.parametrize("method, arch, named", [
    ("cmff", "resnet20,resnet20,resnet20", "the number of peers must be 2; got 3 (the number of peers cmff trains)"),
    ("okddip", "resnet20,resnet20", "the number of peers must lie in [3, 256]; got 2"),
])
def test_an_arch_list_has_as_many_peers_as_num_peers_allows(method, arch, named, capsys):
    with pytest.raises(SystemExit):
        parse_args(load_method(method), ["--arch", arch])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--arch lists {len(arch.split(','))} architectures, but {named}" in err, err


@pytest.mark.parametrize("flag", ["--epochs", "--arch", "--recipe", "--preset"])
def test_a_flag_the_defaults_depend_on_without_its_value_is_one_line(flag, capsys):
    with pytest.raises(SystemExit):
        parse_args(load_method("dml"), [flag])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"argument {flag}: expected one argument" in err, err


def test_a_list_of_one_repeated_architecture_takes_that_architectures_preset_values():
    cmff = load_method("cmff")                                    # official: rn110's loss weights for resnet110
    one = parse_args(cmff, ["--preset", "official", "--arch", "resnet110"])
    two = parse_args(cmff, ["--preset", "official", "--arch", "resnet110,resnet110"])
    expected = ("resnet110", 3.0, 2.0)
    assert (one.arch, one.lambda_rot, one.lambda_sim) == (two.arch, two.lambda_rot, two.lambda_sim) == expected


@pytest.mark.parametrize("argv, named", [
    (["--out", ""], "argument --out: must name a file or folder"),
    (["--data", " "], "argument --data: must name a file or folder"),
    (["--resume", ""], "argument --resume: must name a file or folder"),
    (["--gpu", "-2"], "argument --gpu: must be >= -1"),
    (["--image-size", "4"], "argument --image-size: must be >= 8"),
    (["--milestones", "-5", "10", "--lr-schedule", "multistep"], "argument --milestones: milestones are epochs >= 1"),
    (["--arch", "resnet_nope"], "argument --arch: unknown architecture 'resnet_nope'"),
])
def test_engine_flags_refuse_values_no_run_can_use(argv, named, capsys):
    with pytest.raises(SystemExit):
        parse_args(load_method("dml"), argv)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err, err


def test_the_cpu_is_used_without_a_warning_unless_a_gpu_was_asked_for(monkeypatch, recwarn):
    from engine.trainer import select_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    dml = load_method("dml")
    assert select_device(parse_args(dml, [])).type == "cpu" and not recwarn.list       # the default: no warning
    with pytest.warns(UserWarning, match="CUDA is not available: training on the CPU \\(--gpu 0;"):
        assert select_device(parse_args(dml, ["--gpu", "0"])).type == "cpu"


def test_under_torchrun_each_rank_takes_its_local_rank_gpu_whatever_gpu_says(monkeypatch):
    """docs/distributed.md: each rank uses GPU LOCAL_RANK (--gpu N is ignored, --gpu -1 is the CPU); a LOCAL_RANK
    beyond the GPUs (--nproc_per_node too large) is one line. CUDA is faked: no tensor is made on it."""
    from engine.trainer import select_device
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    dml = load_method("dml")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert select_device(parse_args(dml, ["--gpu", "5"])) == torch.device("cuda", 1) == chosen[-1]
    assert select_device(parse_args(dml, [])) == torch.device("cuda", 1)
    assert select_device(parse_args(dml, ["--gpu", "-1"])).type == "cpu"
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(UserError, match="^torchrun started a process for GPU 2 .*give --nproc_per_node=2 or fewer$"):
        select_device(parse_args(dml, []))
    monkeypatch.delenv("LOCAL_RANK")
    with pytest.raises(UserError, match="^--gpu 5 does not exist: this machine has 2 CUDA device"):
        select_device(parse_args(dml, ["--gpu", "5"]))


def test_paths_the_run_reads_are_made_absolute_as_the_system_reads_them(tmp_path, monkeypatch):
    """--data, --classes and --eval-only are recorded absolute, each naming what the system opens: ``lnk/../ds``
    is the folder beside ``lnk``'s target, not ``./ds`` (which dropping ``lnk/..`` as text would give)."""
    import train_dml
    (tmp_path / "store" / "inner").mkdir(parents=True)
    (tmp_path / "store" / "ds").mkdir()
    (tmp_path / "ds").mkdir()                                 # another folder of that name, where the text points
    (tmp_path / "lnk").symlink_to(tmp_path / "store" / "inner")
    monkeypatch.chdir(tmp_path)
    args = parse_args(train_dml.DML, ["--data", "lnk/../ds", "--classes", "lnk/../c.txt", "--eval-only", "x.pt"])
    assert Path(args.data).is_absolute() and Path(args.data).resolve() == tmp_path / "store" / "ds"
    assert Path(args.classes).is_absolute() and Path(args.classes).resolve() == tmp_path / "store" / "c.txt"
    assert args.eval_only == str(tmp_path / "x.pt")
