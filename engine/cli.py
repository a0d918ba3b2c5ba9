"""The command line every method script shares: its flags, each with its valid range, their defaults taken
from the method's recipe (its paper's training protocol: recipes.py) and preset.

A flag's range is declared once, with the flag, by its ``type``: :func:`number` and its shorthands
(``non_negative``, ``positive``, ``temperature``, ``fraction``, ``positive_int``, ...). A value outside
the range stops the command in one line before anything is read; so does NaN or infinity in any float
flag, ``type=float`` included (the parser registers a finite-float type for it).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

from recipes import RECIPES

from .errors import UserError
from .method import hook_name

FLOAT32_MAX = 3.4028234663852886e38  # the largest float32: a float flag beyond it would be inf in training
MAX_PROCESSES = 1024                 # process and thread counts: far above any machine's cores (process_count)
MAX_PEERS = 256     # far above any published cohort (2 to 8); a larger --num-peers is a typo that would sit building


# ---- value types: a flag's range, declared with the flag --------------------------------------------------------

def number(kind=float, *, at_least=None, above=None, below=None, at_most=None, why: str = ""):
    """An argparse ``type``: a ``kind`` (float or int) within the given bounds, a finite float32 for floats. A value
    outside is refused with one line, ``argument --x: must lie in [0, 1); got 1.5`` (and ``why``, if given)."""
    low = f"[{at_least}" if at_least is not None else f"({above}" if above is not None else None
    high = f"{below})" if below is not None else f"{at_most}]" if at_most is not None else None
    rule = (f"must be {at_least}" if at_least is not None and at_least == at_most else
            f"must lie in {low}, {high}" if low and high else
            f"must be {'>=' if low[0] == '[' else '>'} {low[1:]}" if low else
            f"must be {'<' if high[-1] == ')' else '<='} {high[:-1]}" if high else "")

    def parse(text: str):
        value = kind(text)                       # ValueError: argparse's "invalid float value: 'x'"
        if kind is float and not abs(value) <= FLOAT32_MAX:      # training computes in float32: no inf, no NaN
            raise argparse.ArgumentTypeError(f"must be a finite number; got {text}" + (
                f", which is infinite in float32, as training computes (at most {FLOAT32_MAX:.4g})"
                if math.isfinite(value) else ""))
        if ((at_least is not None and value < at_least) or (above is not None and not value > above)
                or (below is not None and not value < below) or (at_most is not None and value > at_most)):
            raise argparse.ArgumentTypeError(f"{rule}; got {text}" + (f" ({why})" if why else ""))
        return value
    parse.__name__ = kind.__name__               # argparse names the type in "invalid <type> value"
    parse.kind = kind
    return parse


non_negative = number(at_least=0)                # loss weights, ramp-up lengths
weight_decay = number(at_least=0, at_most=1, why="an L2 coefficient; published ones are 1e-5 to 5e-4, and lr x decay "
                      "near 1 erases the weights every step")   # (1e30 was a NaN after a whole epoch)
positive = number(above=0)                       # learning rates, ratios
temperature = number(above=0, at_most=10_000, why="a temperature: the softmax divides by it, and a distillation term "
                     "is scaled by its square")       # (1e30: T² overflows float32, found only as a NaN loss)
fraction = number(at_least=0, below=1)           # momenta, dropout probabilities, Adam betas
unit_interval = number(at_least=0, at_most=1)    # decays and momenta that may reach 1
positive_int = number(int, at_least=1)
ramp_up = number(at_least=0)                     # epochs of a sigmoid ramp-up (losses.sigmoid_rampup): a run shorter
ramp_up.epochs = True                            # than one is warned (parse_args), since its weight never reaches 1
non_negative_int = number(int, at_least=0)


def process_count(what: str, at_least: int = 0):
    """An argparse ``type``: how many processes or threads (``what``, e.g. "DataLoader workers") to start at
    once, ``at_least`` .. :data:`MAX_PROCESSES`. Without a bound a typo (``--workers 100000``) starts that many
    and exhausts the machine's memory instead of failing."""
    return number(int, at_least=at_least, at_most=MAX_PROCESSES, why=f"{what} started at once")


def peer_count(method_cls):
    """The ``type`` of ``method_cls``'s ``--num-peers``: from its ``min_peers`` to its ``max_peers`` (None:
    :data:`MAX_PEERS`). Also what an ``--arch`` list's length must be."""
    return number(int, at_least=method_cls.min_peers, at_most=method_cls.max_peers or MAX_PEERS,
                  why="the peers are networks built and trained together" if method_cls.max_peers is None else
                  f"the number of peers {method_cls.name} trains")


def _count_or_all(text: str) -> Optional[int]:
    """``--eval-subset``: N >= 0 samples; 0 is the whole set, as when the flag is left out (None)."""
    return non_negative_int(text) or None


_count_or_all.__name__ = "int"                   # argparse's "invalid int value: 'x'"


def arch_list(text: str) -> str:
    """``--arch``: one registered backbone name, or one per peer separated by commas."""
    from models import UnknownModelError, model_entry
    from models.peers import arch_names
    try:
        names = arch_names(text)
        for name in names:
            model_entry(name)
    except (ValueError, UnknownModelError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return ",".join(names)


def non_empty_path(text: str) -> str:
    """A file or folder name: anything but empty (``--out ''`` would otherwise mean the default folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a file or folder; got an empty string")
    return text


def path_given(text: str) -> Path:
    """A file or folder name as a Path, for the scripts: anything but empty (``Path('')`` is the current folder)."""
    return Path(non_empty_path(text))


def absolute_path(text: str) -> str:
    """A file or folder the run reads (``--classes``, ``--eval-only``), made absolute: the record and the messages
    name it wherever the run is later resumed or evaluated from (a relative one would then name another file)."""
    return str(Path(non_empty_path(text)).absolute())    # (not abspath: "link/.." is the link's target's parent)


def dataset_folder(text: str) -> str:
    """A folder name (``--data``), made absolute (:func:`absolute_path`): a path that is not a file (it may not exist
    yet: ``--download`` makes it)."""
    if Path(non_empty_path(text)).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder: give the folder that holds the dataset")
    return absolute_path(text)


def _milestones(text: str) -> list[int]:
    try:
        values = [int(m) for m in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"milestones are epochs such as '150 225' or '150,225'; got {text!r}")
    if any(m < 1 for m in values):
        raise argparse.ArgumentTypeError(f"milestones are epochs >= 1; got {text!r}")
    return values


class _Store(argparse._StoreAction):     # (argparse's checks of nargs and const kept)
    """argparse's default action, but a list option (nargs '+' or '*') given twice adds to its earlier values in
    place of the default (``--arch a --arch b``: both), where argparse silently keeps the last alone."""

    def __call__(self, parser, namespace, values, option_string=None):
        before = getattr(namespace, self.dest, None)
        if self.nargs in ("+", "*") and before is not self.default and before is not None:
            values = before + values
        setattr(namespace, self.dest, values)


class _Milestones(_Store):
    """``--milestones 150 225``, ``--milestones 150,225`` and ``--milestones '150 225'``: one flat list, in
    order (``225 150`` is the same schedule, so the same run); given twice, both (:class:`_Store`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, [m for chunk in values for m in chunk], option_string)
        milestones = sorted(getattr(namespace, self.dest))
        repeated = sorted({m for m in milestones if milestones.count(m) > 1})
        if repeated:           # (MultiStepLR would decay twice there, x0.01: a typo, not a schedule)
            raise argparse.ArgumentError(self, f"epoch {' '.join(map(str, repeated))} given twice; give each once")
        setattr(namespace, self.dest, milestones)


# ---- a method's command line: the parser, the values it fills in, the warnings ----------------------------------

def shown(value) -> str:
    """An option's value as typed: lists space-separated, None as 'default'."""
    if value is None:
        return "default"
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


class HelpFormatter(argparse.HelpFormatter):
    """Each option's default shown once, after its help: the value a recipe or preset sets included, lists
    as typed (``150 225``); not for off-by-default switches, nor where the help already states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if ("%(default)" in text or "(default" in text or "default:" in text or default in (None, "")
                or default is argparse.SUPPRESS
                or (default is False and action.nargs == 0
                    and not isinstance(action, argparse.BooleanOptionalAction))):
            return text
        return " ".join(filter(None, (text, f"(default: {shown(default).replace('%', '%%')})")))


class Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (the usage is what --help is for), every ``type=float`` finite,
    negative numbers in scientific notation (``--weight-decay -1e-4``) read as values, not as flags, and a
    list option given twice adding up (:class:`_Store`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("type", float, number())          # argument groups share this registry
        self.register("action", None, _Store)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$", re.I)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def build_parser(method_cls, recipe: str, preset: Optional[str] = None,
                 arch: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of ``method_cls``'s script, its defaults from ``recipe`` and ``preset`` (for ``arch``,
    default: --arch's default), so that ``--help`` shows the values a run would use."""
    from data import DATASET_NAMES
    from models import list_models

    from .method import script_path
    p = Parser(prog=Path(script_path(method_cls)).name, description=(method_cls.__doc__ or "").strip(),
               formatter_class=HelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--arch", type=arch_list, default="resnet32", metavar="NAME[,NAME...]",
                   help="backbone; a comma list gives one architecture per peer (independent peers; its length "
                        f"is the number of peers). One of: {', '.join(list_models())}")
    if method_cls.num_peers is not None:
        g.add_argument("--num-peers", type=peer_count(method_cls), default=method_cls.num_peers,
                       help="number of peer networks (branches)")
    g.add_argument("--dataset", default="cifar100", choices=DATASET_NAMES, help="training and test data")
    g.add_argument("--data", type=dataset_folder, default=None, metavar="DIR",
                   help="dataset folder (default: datasets/<name> under $OKD_DATASETS, else under the current "
                        "directory); --dataset folder: DIR/train/<class>/<image> and the evaluation images in "
                        "DIR/val/<class>/ or DIR/test/<class>/ (both: val/ chooses best, test/ is reported; "
                        "neither: pass --val-split N)")
    g.add_argument("--image-size", type=number(int, at_least=8), default=None, metavar="S",
                   help="--dataset folder or imagenet: the input size S. S <= 64: images resized to SxS, "
                        "RandomCrop(S, padding S/8) + flip; above: RandomResizedCrop(S) + flip, test "
                        "Resize(S*8/7) + CenterCrop(S) (default: folder: the median image side rounded to 32, "
                        "64 or 224; imagenet: 224)")
    g.add_argument("--classes", type=absolute_path, default=None, metavar="FILE",
                   help="--dataset folder or imagenet: use only the class folders listed in FILE, one name a "
                        "line (e.g. ImageNet-100 over an ILSVRC tree), without copying images")
    g.add_argument("--download", action="store_true", help="download the dataset if missing (needs internet)")
    g.add_argument("--num-classes", type=positive_int, default=None, help="inferred from the dataset; a check if "
                                                                           "given")
    g.add_argument("--subset", type=positive_int, default=None, metavar="N",
                   help="train on N training samples, a seeded stratified random subset (quick checks)")
    g.add_argument("--eval-subset", type=_count_or_all, default=None, metavar="N",
                   help="test on N test samples, a seeded stratified random subset (quick checks); 0: the whole "
                        "test set (e.g. --eval-only of a run trained with a subset)")
    g.add_argument("--pad-mode", choices=("zero", "reflect"), default="zero",
                   help="padding of the training RandomCrop: zeros (torchvision's default), or the border "
                        "reflected as FFL/DCCL/CMFF's Pad(4, reflect) (their presets' default, except on "
                        "tinyimagenet, imagenet and folder datasets: their codes pad only CIFAR by reflection)")
    g.add_argument("--val-split", type=non_negative_int, default=0, metavar="N",
                   help="hold out N training samples (stratified, seeded) to select `best`; "
                        "the test set is then only reported")

    o = p.add_argument_group(f"optimisation (defaults: recipe '{recipe}')")
    o.add_argument("--recipe", default=recipe, choices=sorted(RECIPES),
                   help="a paper's protocol; its values are the defaults of the options below")
    o.add_argument("--epochs", type=positive_int, help="training epochs")
    o.add_argument("--batch-size", type=positive_int, help="training batch per process (per GPU under torchrun)")
    o.add_argument("--eval-batch-size", type=positive_int, default=None, help="default: 2 x batch size")
    o.add_argument("--lr", type=non_negative, help="peak learning rate")
    o.add_argument("--lr-schedule", choices=("cosine", "multistep", "sgdr"),
                   help="per-epoch cosine to 0; x0.1 at each milestone; or cosine with warm restarts (SGDR)")
    o.add_argument("--milestones", type=_milestones, nargs="+", action=_Milestones, metavar="E",
                   help="epochs of the multistep decay, as '150 225' or '150,225'")
    o.add_argument("--sgdr-t0", type=positive_int, metavar="E",
                   help="SGDR: epochs of the first cosine cycle; each later cycle is twice as long, so the lr "
                        "restarts at T0, 3 T0, 7 T0, ... (unset: --epochs, one cosine without restart)")
    o.add_argument("--weight-decay", type=weight_decay, help="SGD weight decay (L2)")
    o.add_argument("--momentum", type=number(at_least=0, below=1, why="1 and above never forget a gradient"),
                   help="SGD momentum")
    o.add_argument("--nesterov", action=argparse.BooleanOptionalAction, help="Nesterov momentum")
    p.set_defaults(**RECIPES[recipe])

    r = p.add_argument_group("run")
    r.add_argument("--seed", type=number(int, at_least=0, below=2 ** 32, why="numpy's seed range"), default=0,
                   help="seeds python, numpy and torch: initial weights, data order, augmentation")
    r.add_argument("--workers", type=process_count("DataLoader workers"), default=4,
                   help="DataLoader workers (torch loader only)")
    r.add_argument("--loader", choices=("device", "torch"), default=None,
                   help="'device': uint8 data kept on the training device, augmented there in batch "
                        "(the default where the dataset fits); 'torch': a DataLoader with workers (the default "
                        "for ImageNet)")
    r.add_argument("--gpu", type=number(int, at_least=-1), default=None,
                   help="CUDA device index; -1 for the CPU (used anyway, with a warning, when CUDA is absent); unset: "
                        "GPU 0, or the CPU where there is no GPU. Under torchrun: LOCAL_RANK")
    r.add_argument("--threads", type=process_count("CPU threads", at_least=1), default=None, metavar="N",
                   help="CPU threads of torch's operators (torch.set_num_threads); unset: torch's choice, "
                        "the number of cores or $OMP_NUM_THREADS")
    r.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=None,
                   help="CUDA float32 matmuls and cuDNN convolutions on TF32 tensor cores (Ampere and newer): "
                        "--tf32 both (faster, products rounded to a 10-bit mantissa), --no-tf32 neither (strict "
                        "float32); unset: PyTorch's defaults, float32 matmuls and TF32 convolutions")
    r.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off", help="mixed precision autocast")
    r.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    r.add_argument("--compile", nargs="?", const="default", default=None,
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   metavar="MODE", help="torch.compile the model, in mode MODE (default: 'default'; "
                                        "'reduce-overhead' adds CUDA graphs of the model); the first epoch pays "
                                        "the compile")
    r.add_argument("--cuda-graph", action="store_true",
                   help="capture the whole training step (forward, loss, backward, SGD) as one CUDA graph, "
                        "again each epoch; single GPU. It needs one batch shape, so the last incomplete batch "
                        "of every epoch is dropped (without it, it is trained on, as in the official codes)")
    r.add_argument("--sgd-impl", choices=("fused", "foreach", "for-loop"), default="fused",
                   help="SGD kernels: one fused kernel (falls back to foreach where torch lacks it), multi-tensor "
                        "foreach, or one parameter at a time; the same update")
    r.add_argument("--grouped-peers", action="store_true",
                   help="run same-architecture peers (the branches of a Peers) as one grouped network: the same "
                        "maths, one peer's kernel launches (ResNet, WRN and VGG families)")
    r.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on GPUs: batch-norm statistics over the global batch (SyncBatchNorm)")
    r.add_argument("--lr-scale", choices=("none", "linear"), default="none",
                   help="under torchrun: 'linear' multiplies the lr by the number of processes")
    r.add_argument("--out", type=non_empty_path, default=None, metavar="DIR",
                   help="run directory (default: runs/<method>-<arch>-<dataset>[-n<peers>]-s<seed>[-<hash of the "
                        "options that differ from the defaults>] under $OKD_RUNS, else under the current "
                        "directory)")
    r.add_argument("--tag", default=None, metavar="TEXT",
                   help="a label recorded in results.json (args.tag), e.g. TABLE/CELL by scripts/reproduce.py; "
                        "it does not change the run directory; a resumed run keeps its own unless one is given")
    once = r.add_mutually_exclusive_group()
    once.add_argument("--resume", type=non_empty_path, nargs="?", const="auto", default=None, metavar="PATH|auto",
                      help="continue from a checkpoint, with its training options unless given again; 'auto' = "
                           "the run directory's last.pt (a new run if there is none)")
    r.add_argument("--extend-epochs", action="store_true",
                   help="with --resume: train a run to a larger --epochs than it was started with. The lr "
                        "schedule becomes the one of the new --epochs from the resumed epoch on (cosine: the lr "
                        "rises to the new curve's value; multistep: the same milestones)")
    once.add_argument("--eval-only", type=absolute_path, default=None, metavar="CHECKPOINT",
                      help="evaluate a checkpoint, as it was trained, on the test (and --val-split) set and exit")
    r.add_argument("--best-metric", default=None, metavar="HEAD",
                   help=f"head whose top-1 selects best.pt (default: {method_cls.best_metric})")
    r.add_argument("--no-progress", action="store_true",
                   help="no tqdm progress bar (it is off anyway when stderr is not a terminal)")

    m = p.add_argument_group(f"{method_cls.name} options")
    arch = arch or p.get_default("arch")
    if method_cls.presets:
        preset = preset or next(iter(method_cls.presets))
        m.add_argument("--preset", default=preset, choices=list(method_cls.presets),
                       help=f"a published variant of the method; its values (for --arch {arch}) are the defaults "
                            "of the options they name: " + "; ".join(
                                f"{name}: " + ", ".join(f"{k}={v}" for k, v in
                                                        method_cls.preset_values(name, arch).items())
                                for name in method_cls.presets))
    try:
        method_cls.add_arguments(m)
    except argparse.ArgumentError as e:       # (a flag the engine or the method declares already)
        raise UserError(f"{hook_name(method_cls, 'add_arguments')}: {e}; give the method's flag a name of its own "
                        "(python train_<method>.py --help lists the names taken)") from None
    if method_cls.presets:
        p.set_defaults(**method_cls.preset_values(preset, arch))
    return p


class _PreParser(argparse.ArgumentParser):
    """:func:`parse_args`' first look at the flags its defaults depend on: what it cannot read raises, and the
    full parser then names the fault in its own line."""

    def error(self, message: str):
        raise argparse.ArgumentError(None, message)


def parse_args(method_cls, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line of ``method_cls``'s script: a value outside its flag's range, an unknown flag or a
    malformed --arch list exits with argparse's one line (SystemExit 2). A recipe's step schedule follows a
    shortened --epochs (``schedule_note`` says how); --milestones given that cannot act draw a warning."""
    from models.peers import normalize_arch
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = _PreParser(add_help=False)                  # what the defaults depend on, read before the defaults
    for name in ("--recipe", "--preset", "--arch", "--epochs", "--dataset", "--data"):    # (--data: not --dataset)
        pre.add_argument(name, nargs="?")             # (a missing value: the parser below says so)
    try:
        known, _ = pre.parse_known_args(argv)
    except argparse.ArgumentError:                    # (an ambiguous --dat: the parser below says so)
        known, _ = pre.parse_known_args([])
    recipe = known.recipe if known.recipe in RECIPES else method_cls.recipe  # a bad name: argparse reports it
    preset = known.preset if known.preset in method_cls.presets else None
    try:                                              # a preset's values for resnet32,resnet32 are resnet32's
        arch = normalize_arch(known.arch.split(",")) if known.arch else None
    except ValueError:
        arch = None                                   # (argparse reports it)
    parser = build_parser(method_cls, recipe, preset, arch)
    if known.arch and "," in known.arch and method_cls.num_peers is not None:    # --help: the list's count
        parser.set_defaults(num_peers=len(known.arch.split(",")))
    if known.dataset in ("tinyimagenet", "imagenet", "folder"):   # a preset's --pad-mode is its code's CIFAR
        parser.set_defaults(pad_mode="zero")     # pipeline (and that of CIFAR's offline stand-ins, Fashion-MNIST and
                                                 # synthetic); the CMFF code pads TinyImageNet with zeros
    shortened = _shorten_schedule(parser, known.epochs)   # before parsing: --help shows the defaults a run uses
    args = parser.parse_args(argv)
    given = given_options(method_cls, argv)
    _peer_list(parser, args, method_cls, given.get("num_peers"))
    args.schedule_note = _schedule_note(args, given, *shortened) if shortened else None
    if not (args.eval_only or resume_path(args.resume, args.out)):    # else: once the checkpoint's are known
        warn_unused_flags(args, given, method_cls)
        warn_long_ramp_ups(parser, args)
    return args


def warn_unused_flags(args: argparse.Namespace, given: dict, method_cls) -> None:
    """A warning for each flag given that cannot act in this run (it is recorded with them all the same):
    --milestones or --sgdr-t0 under another schedule, milestones at or beyond --epochs, a flag for GPUs, several
    processes or data files where there are none (a --download that cannot act is refused by the data layer),
    and the method's own (``Method.unused_flags``)."""
    unused = dict(method_cls.unused_flags(args))
    if args.momentum == 0:
        unused["nesterov"] = "Nesterov's correction acts through the momentum, and --momentum is 0"
    import torch
    if (args.gpu or 0) < 0 or not torch.cuda.is_available():
        unused["tf32"] = "it sets CUDA's TF32, and this run trains on the CPU"
    if args.lr_scale == "linear" and int(os.environ.get("WORLD_SIZE", 1)) == 1:
        unused["lr_scale"] = "'linear' multiplies the lr by the number of processes, and this is one (torchrun: more)"
    from data.folder import SMALL_MAX      # (the largest --image-size a folder trains at the CIFAR protocol)
    if args.dataset == "imagenet" or (args.dataset == "folder" and (args.image_size or 0) > SMALL_MAX):
        crop = ("ImageNet's training crop" if args.dataset == "imagenet" else
                f"a folder's training crop at --image-size {args.image_size}")
        unused["pad_mode"] = f"{crop} is RandomResizedCrop, which pads nothing"
    if args.dataset == "synthetic":      # (its --download is refused: data.common.check_download)
        unused["data"] = "--dataset synthetic is generated in memory and reads no files"
    for name, why in unused.items():
        if name in given:      # (False: a --no-<flag> of a flag that is on by default)
            typed = ("--no-" if getattr(args, name) is False else "--") + name.replace("_", "-")
            warnings.warn(f"{typed} does nothing in this run: {why}; the run is recorded with it, so leave it out")
    if "sgdr_t0" in given and args.lr_schedule != "sgdr":
        warnings.warn(f"--sgdr-t0 applies to --lr-schedule sgdr only; this run's schedule is {args.lr_schedule}, so "
                      "it is ignored (add --lr-schedule sgdr to use it)")
    if "milestones" in given and args.lr_schedule != "multistep":
        warnings.warn("--milestones apply to --lr-schedule multistep only; this run's schedule is "
                      f"{args.lr_schedule}, so they are ignored (add --lr-schedule multistep to use them)")
    elif "milestones" in given and any(m >= args.epochs for m in args.milestones):
        late = " ".join(str(m) for m in args.milestones if m >= args.epochs)
        warnings.warn(f"--milestones {late} lie at or beyond --epochs {args.epochs}, so the lr never decays there; "
                      "pass milestones below --epochs")


def warn_long_ramp_ups(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A warning for each ramp-up (a flag of type :data:`ramp_up`) that does not end within the run: a shortened
    run (--epochs 30 of a method with an 80-epoch ramp-up) keeps its loss weight far below 1 to the end, which the
    recipe's scaled lr schedule does not show. The weight is 1 from epoch R on, counted from 0, so the last epoch
    (--epochs - 1) reaches it when R <= --epochs - 1."""
    from losses import sigmoid_rampup
    last = args.epochs - 1
    for action in parser._actions:
        length = getattr(args, action.dest, None) if getattr(action.type, "epochs", False) else None
        if length and length > last:
            flag = action.option_strings[0]
            fix = f"{flag} {last} or less (0: weight 1 throughout)" if last else f"{flag} 0 (weight 1 throughout)"
            warnings.warn(f"{flag} {length:g} does not end within --epochs {args.epochs}: the weight it ramps up "
                          f"reaches only {sigmoid_rampup(last, length):.2f} of 1 in the last epoch; for a short run "
                          f"give {fix}")


def resume_path(resume: Optional[str], folder: Optional[str]) -> Optional[Path]:
    """The checkpoint ``--resume`` names, as an absolute path (the run's folder is one): PATH, or for 'auto' the
    last.pt of ``folder`` if it has one (None: a new run, or no folder known yet)."""
    if resume != "auto":
        return Path(resume).absolute() if resume else None
    last = Path(folder).absolute() / "last.pt" if folder else None
    return last if last and os.path.isfile(last) else None      # (no OSError: a name too long is no file)


def _shorten_schedule(parser: argparse.ArgumentParser, epochs: Optional[str]) -> Optional[tuple]:
    """A run given fewer --epochs than its recipe's (or preset's) keeps that schedule in proportion: the defaults
    of the multistep milestones and of the first SGDR cycle are scaled by --epochs / the recipe's epochs, as a
    cosine is. ``epochs``: --epochs as typed, if given. Returns (the recipe's epochs, milestones, SGDR cycle)
    when it scaled them, else None."""
    try:
        default, epochs = parser.get_default("epochs"), int(epochs)
    except (TypeError, ValueError):
        return None                                   # (not given, or not a number: argparse reports it)
    if not 0 < epochs < default:
        return None
    milestones, t0 = parser.get_default("milestones"), parser.get_default("sgdr_t0")
    parser.set_defaults(milestones=milestones and [max(1, round(m * epochs / default)) for m in milestones],
                        sgdr_t0=t0 and max(1, round(t0 * epochs / default)))
    return default, milestones, t0


def _schedule_note(args: argparse.Namespace, given: dict, epochs: int, milestones: list, t0: Optional[int]
                   ) -> Optional[str]:
    """The sentence the run's first line shows about a schedule :func:`_shorten_schedule` scaled, or None when
    the run's schedule does not use what it scaled (or the command gave its own)."""
    if args.lr_schedule == "multistep" and "milestones" not in given:
        return (f"the recipe's x0.1 at epochs {shown(milestones)} of {epochs}, scaled to "
                f"{shown(args.milestones)} of {args.epochs}")
    if args.lr_schedule == "sgdr" and t0 and "sgdr_t0" not in given:
        return f"the recipe's first SGDR cycle of {t0} of {epochs} epochs, scaled to {args.sgdr_t0}"
    return None


def given_options(method_cls, argv: Sequence[str]) -> dict:
    """The options given explicitly in ``argv`` (not left to a default), by argument name."""
    parser = build_parser(method_cls, method_cls.recipe)
    parser._defaults.clear()             # recipe and preset defaults (shared by the argument groups)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    known = vars(parser.parse_known_args(list(argv))[0])
    if "arch" in known:                  # as parse_args holds it: a list of one repeated name is that name
        from models.peers import normalize_arch
        known["arch"] = normalize_arch(known["arch"].split(","))
    return known


def _peer_list(parser: argparse.ArgumentParser, args: argparse.Namespace, method_cls, explicit: Optional[int]
               ) -> None:
    """``--arch a,b,c``: one architecture per peer. The list's length is the number of peers; an ``explicit``
    --num-peers must agree. A list of one repeated name is that name (N copies)."""
    from models.peers import normalize_arch
    names = args.arch.split(",")
    args.arch = normalize_arch(names)
    if len(names) == 1:
        return
    if method_cls.num_peers is None:
        parser.error(f"--arch {args.arch}: {method_cls.name} trains a single network; give one name")
    if explicit is not None and explicit != len(names):
        parser.error(f"--arch lists {len(names)} architectures but --num-peers is {explicit}; drop --num-peers "
                     "(the list sets it) or give one name per peer")
    try:
        peer_count(method_cls)(str(len(names)))
    except argparse.ArgumentTypeError as e:
        parser.error(f"--arch lists {len(names)} architectures, but the number of peers {e}")
    args.num_peers = len(names)


# ---- the tools of scripts/ --------------------------------------------------------------------------------------

def run_tool(main) -> None:
    """``sys.exit(main())`` for a tool of scripts/: Ctrl-C ends it with one line and exit status 130 (128 + SIGINT),
    a closed output pipe (``... | head``) quietly with 141 (128 + SIGPIPE), not with a traceback (the train
    scripts: engine.trainer.main)."""
    try:
        status = main()
    except KeyboardInterrupt:
        print("\ninterrupted (SIGINT)", file=sys.stderr)
        status = 130
    except BrokenPipeError:       # the reader left: nothing more to say, and nothing for the exit's flush to raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 141
    if status:              # (0 or None: the script ends as usual)
        sys.exit(status)
