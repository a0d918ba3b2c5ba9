"""The command line every method script shares, and the papers' training protocols ("recipes")."""
from __future__ import annotations

import argparse
import copy
import math
import re
import sys
import warnings
from typing import Optional, Sequence

# Each recipe is one paper's protocol. A run's defaults come from its recipe; explicit flags win.
RECIPES: dict[str, dict] = {
    # winycg/MCL-OKD main_cifar_*.py (docs/official_code.md): per-epoch cosine from 0.1 over 300 epochs.
    "okd": dict(epochs=300, batch_size=128, lr=0.1, lr_schedule="cosine", milestones=[150, 225],
                weight_decay=5e-4, momentum=0.9, nesterov=True),
    # MCL-OKD's own method: the same protocol at lr 0.05 and batch 64.
    "mcl-okd": dict(epochs=300, batch_size=64, lr=0.05, lr_schedule="cosine", milestones=[150, 200, 250],
                    weight_decay=5e-4, momentum=0.9, nesterov=True),
    # OKDDip / PCL papers: step decay x0.1 at 150 and 225.
    "okddip": dict(epochs=300, batch_size=128, lr=0.1, lr_schedule="multistep", milestones=[150, 225],
                   weight_decay=5e-4, momentum=0.9, nesterov=True),
    # FFL code (Jangho-Kim/FFL-pytorch train_FFL.py): step decay at 150 and 225, weight decay 1e-4.
    "ffl": dict(epochs=300, batch_size=128, lr=0.1, lr_schedule="multistep", milestones=[150, 225],
                weight_decay=1e-4, momentum=0.9, nesterov=True),
    # DCCL code (nanxiaotong/DCCL train_rn32.py), which CMFF's code keeps: as FFL's with weight decay 2e-4.
    "dccl": dict(epochs=300, batch_size=128, lr=0.1, lr_schedule="multistep", milestones=[150, 225],
                 weight_decay=2e-4, momentum=0.9, nesterov=True),
    # DCCL's WRN script (train_wrn.py): 400 epochs, step decay at 50, 150, 225 and 300, weight decay 2e-4.
    "dccl-wrn": dict(epochs=400, batch_size=128, lr=0.1, lr_schedule="multistep", milestones=[50, 150, 225, 300],
                     weight_decay=2e-4, momentum=0.9, nesterov=True),
    # ONE's own run scripts: plain momentum (no Nesterov), weight decay 1e-4, step decay at 150 and 225.
    "one": dict(epochs=300, batch_size=128, lr=0.1, lr_schedule="multistep", milestones=[150, 225],
                weight_decay=1e-4, momentum=0.9, nesterov=False),
    # ImageNet baseline (MCL-OKD repository, main_imagenet_baseline.py defaults): 300 epochs of SGDR with
    # T0 = 100 (a cosine over epochs 0-99, a warm restart at 100, then one 200-epoch cosine), wd 1e-4.
    "imagenet": dict(epochs=300, batch_size=256, lr=0.1, lr_schedule="sgdr", sgdr_t0=100, milestones=[30, 60, 90],
                     weight_decay=1e-4, momentum=0.9, nesterov=True),
    # The same protocol as one 100-epoch cosine (no restart): the run length of MCL-OKD's own ImageNet script.
    "imagenet-100": dict(epochs=100, batch_size=256, lr=0.1, lr_schedule="cosine", milestones=[30, 60, 90],
                         weight_decay=1e-4, momentum=0.9, nesterov=True),
    "mcl-okd-imagenet": dict(epochs=100, batch_size=128, lr=0.05, lr_schedule="cosine", milestones=[30, 60, 90],
                             weight_decay=1e-4, momentum=0.9, nesterov=True),
}
RECIPE_KEYS = tuple(dict.fromkeys(key for recipe in RECIPES.values() for key in recipe))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text}")
    return value


def _milestones(text: str) -> list[int]:
    try:
        return [int(m) for m in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"milestones are epochs such as '150 225' or '150,225'; got {text!r}")


class _Milestones(argparse.Action):
    """``--milestones 150 225``, ``--milestones 150,225`` and ``--milestones '150 225'``: one flat list."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [m for chunk in values for m in chunk])


class HelpFormatter(argparse.HelpFormatter):
    """Each option's default shown once, after its help: the value a recipe or preset sets included, lists
    as typed (``150 225``); not for off-by-default switches, nor where the help already states it."""

    @staticmethod
    def _default(action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if ("%(default)" in text or "(default" in text or "default:" in text or default in (None, "")
                or default is argparse.SUPPRESS
                or (default is False and action.nargs == 0
                    and not isinstance(action, argparse.BooleanOptionalAction))):
            return ""
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"(default: {shown.replace('%', '%%')})"

    def _get_help_string(self, action: argparse.Action) -> str:
        return " ".join(filter(None, (action.help, self._default(action))))

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._default(action):      # no help text: argparse would print nothing
            action = copy.copy(action)
            action.help = self._default(action)
        return super()._format_action(action)


class Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (the usage is what --help is for), and negative numbers in
    scientific notation (``--weight-decay -1e-4``) read as values, not as flags."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$", re.I)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def build_parser(method_cls, recipe: str, preset: Optional[str] = None,
                 arch: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of ``method_cls``'s script, its defaults from ``recipe`` and ``preset`` (for ``arch``,
    default: --arch's default), so that ``--help`` shows the values a run would use."""
    from data import DATASET_NAMES
    from models import list_models

    p = Parser(
        prog=f"train_{method_cls.name}.py",
        description=method_cls.describe(),
        formatter_class=HelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--arch", default="resnet32", metavar="NAME[,NAME...]",
                   help="backbone; a comma list gives one architecture per peer (independent peers; its length "
                        f"is the number of peers). One of: {', '.join(list_models())}")
    if method_cls.num_peers is not None:
        g.add_argument("--num-peers", type=_positive_int, default=method_cls.num_peers,
                       help="number of peer networks (branches)")
    g.add_argument("--dataset", default="cifar100", choices=DATASET_NAMES, help="training and test data")
    g.add_argument("--data", default=None, metavar="DIR",
                   help="dataset folder (default: datasets/<name> under $OKD_DATASETS, else under the current "
                        "directory); --dataset folder: DIR/train/<class>/<image> and the evaluation images in "
                        "DIR/val/<class>/ or DIR/test/<class>/ (both: val/ chooses best, test/ is reported; "
                        "neither: pass --val-split N)")
    # --- folder data (data/folder.py): two flags, to be ported onto the new engine's cli ---
    g.add_argument("--image-size", type=_positive_int, default=None, metavar="S",
                   help="--dataset folder or imagenet: the input size S. S <= 64: images resized to SxS, "
                        "RandomCrop(S, padding S/8) + flip; above: RandomResizedCrop(S) + flip, test "
                        "Resize(S*8/7) + CenterCrop(S) (default: folder: the median image side rounded to 32, "
                        "64 or 224; imagenet: 224)")
    g.add_argument("--classes", default=None, metavar="FILE",
                   help="--dataset folder or imagenet: use only the class folders listed in FILE, one name a "
                        "line (e.g. ImageNet-100 over an ILSVRC tree), without copying images")
    # --- end of folder data flags ---
    g.add_argument("--download", action="store_true", help="download the dataset if missing (needs internet)")
    g.add_argument("--num-classes", type=int, default=None, help="inferred from the dataset; a check if given")
    g.add_argument("--subset", type=_positive_int, default=None, metavar="N",
                   help="train on N training samples, a seeded stratified random subset (quick checks)")
    g.add_argument("--eval-subset", type=_non_negative_int, default=None, metavar="N",
                   help="test on N test samples, a seeded stratified random subset (quick checks); 0: the whole "
                        "test set (e.g. --eval-only of a run trained with a subset)")
    g.add_argument("--pad-mode", choices=("zero", "reflect"), default="zero",
                   help="padding of the training RandomCrop: zeros (torchvision's default), or the border "
                        "reflected as FFL/DCCL/CMFF's Pad(4, reflect) (their presets' default)")
    g.add_argument("--val-split", type=int, default=0, metavar="N",
                   help="hold out N training samples (stratified, seeded) to select `best`; "
                        "the test set is then only reported")

    o = p.add_argument_group(f"optimisation (defaults: recipe '{recipe}')")
    o.add_argument("--recipe", default=recipe, choices=sorted(RECIPES),
                   help="a paper's protocol; its values are the defaults of the options below")
    o.add_argument("--epochs", type=_positive_int, help="training epochs")
    o.add_argument("--batch-size", type=_positive_int, help="training batch per process (per GPU under torchrun)")
    o.add_argument("--eval-batch-size", type=_positive_int, default=None, help="default: 2 x batch size")
    o.add_argument("--lr", type=float, help="peak learning rate")
    o.add_argument("--lr-schedule", choices=("cosine", "multistep", "sgdr"),
                   help="per-epoch cosine to 0; x0.1 at each milestone; or cosine with warm restarts (SGDR)")
    o.add_argument("--milestones", type=_milestones, nargs="+", action=_Milestones, metavar="E",
                   help="epochs of the multistep decay, as '150 225' or '150,225'")
    o.add_argument("--sgdr-t0", type=_positive_int, metavar="E",
                   help="SGDR: epochs of the first cosine cycle; each later cycle is twice as long, so the lr "
                        "restarts at T0, 3 T0, 7 T0, ... (unset: --epochs, one cosine without restart)")
    o.add_argument("--weight-decay", type=float, help="SGD weight decay (L2)")
    o.add_argument("--momentum", type=float, help="SGD momentum")
    o.add_argument("--nesterov", action=argparse.BooleanOptionalAction, help="Nesterov momentum")
    p.set_defaults(**RECIPES[recipe])

    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=0,
                   help="seeds python, numpy and torch: initial weights, data order, augmentation")
    r.add_argument("--workers", type=int, default=4, help="DataLoader workers (torch loader only)")
    r.add_argument("--loader", choices=("device", "torch"), default=None,
                   help="'device': uint8 data kept on the training device, augmented there in batch "
                        "(the default where the dataset fits); 'torch': a DataLoader with workers (the default "
                        "for ImageNet)")
    r.add_argument("--gpu", type=int, default=0, help="CUDA device index; -1 for the CPU (used anyway, with a "
                                                      "warning, when CUDA is absent). Under torchrun: LOCAL_RANK")
    r.add_argument("--threads", type=_positive_int, default=None, metavar="N",
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
                        "again each epoch; single GPU, static batch shapes")
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
    r.add_argument("--out", default=None, metavar="DIR",
                   help="run directory (default: runs/<method>-<arch>-<dataset>-n<peers>-s<seed> under "
                        "$OKD_RUNS, else under the current directory)")
    r.add_argument("--tag", default=None, metavar="TEXT",
                   help="a label recorded in results.json (args.tag), e.g. TABLE/CELL by scripts/reproduce.py; "
                        "it does not change the run directory")
    r.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH|auto",
                   help="continue from a checkpoint; 'auto' = the run directory's last.pt")
    r.add_argument("--extend-epochs", action="store_true",
                   help="with --resume: train a run to a larger --epochs than it was started with. The lr "
                        "schedule becomes the one of the new --epochs from the resumed epoch on (cosine: the lr "
                        "rises to the new curve's value; multistep: the same milestones)")
    r.add_argument("--eval-only", default=None, metavar="CHECKPOINT",
                   help="evaluate a checkpoint on the test (and --val-split) set and exit")
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
    method_cls.add_arguments(m)
    if method_cls.presets:
        p.set_defaults(**method_cls.preset_values(preset, arch))
    return p


# Flags whose values are never negative (numpy refuses negative seeds; SGD refuses the rest).
NON_NEGATIVE = ("lr", "momentum", "weight_decay", "seed", "workers")


def is_temperature(dest: str) -> bool:
    """A softmax temperature flag, by the repository's naming: ``--kd-T``, ``--sim-T``, ``--nce-t``."""
    return dest == "T" or dest.lower().endswith("_t")


def check_values(args: argparse.Namespace) -> None:
    """Refuse values no run could use, in one line each, right after parsing (before any data or model):
    NaN or infinite numbers in any flag; negative lr, momentum, weight decay (every ``*weight_decay`` flag),
    seed or workers; momentum >= 1; a temperature (every ``*_T``/``*_t`` flag) <= 0. Warns when multistep
    milestones lie beyond --epochs."""
    from .errors import UserError

    for dest, value in vars(args).items():
        flag = "--" + dest.replace("_", "-")
        numbers = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            shown = " ".join(map(str, numbers))
            raise UserError(f"{flag} must be a finite number; got {shown}")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if dest == "momentum" and value >= 1:
            raise UserError(f"--momentum must lie in [0, 1); got {value} (1 and above never forget a gradient)")
        if (dest in NON_NEGATIVE or dest.endswith("weight_decay")) and value < 0:
            raise UserError(f"{flag} must be >= 0; got {value}")
        if is_temperature(dest) and not value > 0:
            raise UserError(f"{flag} is a temperature and must be > 0; got {value} (the softmax divides by it)")
    if args.seed >= 2 ** 32:
        raise UserError(f"--seed must be below 2**32 (numpy's limit); got {args.seed}")
    if args.lr_schedule == "multistep":
        late = [m for m in args.milestones if m >= args.epochs]
        if late:
            warnings.warn(f"--milestones {' '.join(map(str, late))} lie at or beyond --epochs {args.epochs}, so the "
                          "lr never decays there; pass milestones below --epochs")


def parse_args(method_cls, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default=method_cls.recipe)
    pre.add_argument("--preset", default=None)
    pre.add_argument("--arch", default=None)
    known, _ = pre.parse_known_args(argv)
    recipe = known.recipe if known.recipe in RECIPES else method_cls.recipe  # a bad name: argparse reports it
    preset = known.preset if known.preset in method_cls.presets else None
    parser = build_parser(method_cls, recipe, preset, known.arch)
    args = parser.parse_args(argv, argparse.Namespace(num_peers=None))   # num_peers None: not on the command line
    _peer_list(parser, args, method_cls)
    check_values(args)
    if args.eval_subset == 0:
        args.eval_subset = None             # the whole test set, as when the flag is left out
    from .run_dir import given_options     # (run_dir imports this module)
    if args.lr_schedule != "multistep" and "milestones" in given_options(method_cls, argv):
        warnings.warn("--milestones apply to --lr-schedule multistep only; this run's schedule is "
                      f"{args.lr_schedule}, so they are ignored (add --lr-schedule multistep to use them)")
    return args


def _peer_list(parser: argparse.ArgumentParser, args: argparse.Namespace, method_cls) -> None:
    """``--arch a,b,c``: one architecture per peer. The list's length is the number of peers; an explicit
    --num-peers must agree. A list of one repeated name is that name (N copies)."""
    from models.peers import arch_names, normalize_arch
    explicit = args.num_peers
    if method_cls.num_peers is None:
        del args.num_peers                  # a single-network method has no such flag
    elif args.num_peers is None:
        args.num_peers = parser.get_default("num_peers")
    try:
        names = arch_names(args.arch)
    except ValueError as e:
        parser.error(str(e))
    args.arch = normalize_arch(names)
    if len(names) == 1:
        return
    if method_cls.num_peers is None:
        parser.error(f"--arch {args.arch}: {method_cls.name} trains a single network; give one name")
    if explicit is not None and explicit != len(names):
        parser.error(f"--arch lists {len(names)} architectures but --num-peers is {explicit}; drop --num-peers "
                     "(the list sets it) or give one name per peer")
    args.num_peers = len(names)
