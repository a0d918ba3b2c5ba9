"""The published tables this repository re-runs, as data: one entry per cell.

A **cell** is one published number (or a single/ensemble pair) of a paper's table: the row and column labels
as the paper prints them, the method script and its flags that reproduce it, and the published value(s) in
the table's unit (top-1 error or top-1 accuracy, %). A cell the paper leaves blank ("-") is not listed.

A cell's runs live in ``RUNS_DIR/<table>/<run>-s<seed>/`` and carry ``--tag <table>/<run>`` (recorded in
``results.json``). Cells of one table with the same command share a run name and therefore their runs (the
CMFF README's two "ResNet-32" columns); a cell can also read another table's runs (``runs_table``: the
MCL-OKD ablation's baseline and +MCL+DOT columns are the main table's baseline and MCL-OKD cells).

``scripts/reproduce.py`` turns the cells into commands, ``scripts/summarize.py`` reads the runs back, and
``python scripts/reproduce.py --markdown`` regenerates ``docs/reproducing.md`` from this file;
``python scripts/tables.py`` lists the tables.

Sources (papers and official repositories, quoted as published):

* MCL-OKD: Yang et al., "Multi-view Contrastive Learning for Online Knowledge Distillation", ICASSP 2021;
  the CIFAR-100 table, ablation and ImageNet row of the official repository's README (winycg/MCL-OKD).
* CMFF: "Self-Supervised Learning and Cross-Modal Feature Fusion for Online Knowledge Distillation" (TMM);
  the CIFAR-100 and TinyImageNet tables of the official repository's README (Coralmss/CMFF).
* PCL: Wu & Gong, "Peer Collaborative Learning for Online Knowledge Distillation", AAAI 2021, CIFAR-100
  table (mean ± std over runs), as quoted in the README of shaoeric/Peer-Collaborative-Learning-for-Online-
  Knowledge-Distillation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

# How a "single" or "ensemble" number is read from a run's heads (results.json ``best.test`` / ``last.test``):
#   "peers"      the mean top-1 over the heads peer1..peerN (the average single peer)
#   "last-peer"  the highest-numbered peer (MCL-OKD distils only its last branch, which is the deployed one)
#   "selection"  the head that selects best.pt (results.json ``selection.metric``): the method's deployed head
#   a name       that head; "a|b" = the first of these the run has
SINGLE = {"baseline": "net", "dml": "peers", "cl_ilr": "peers", "one": "peers", "okddip": "leader",
          "mcl_okd": "last-peer", "cmff": "peers", "ffl": "peers", "dccl": "peers", "kdcl": "peers",
          "pcl": "selection", "amln": "peers"}
ENSEMBLE = {"baseline": None, "one": "teacher", "pcl": "teacher"}   # everyone else: "ensemble"


@dataclass(frozen=True)
class Metric:
    """One published number: ``kind`` "single" or "ensemble", the head rule that reads it from a run, and the
    paper's value (and its ± std when the paper gives one) in the table's unit; None where the table has
    no published number (the Fashion-MNIST table)."""
    kind: str
    head: str
    published: Optional[float] = None
    published_std: Optional[float] = None


@dataclass(frozen=True)
class Cell:
    """One cell: ``python <script> --arch <arch> <flags...>`` per seed; ``run`` names its run directories."""
    row: str
    column: str
    method: str                      # the script is train_<method>.py
    arch: str
    flags: tuple = ()
    metrics: tuple = ()
    run: str = ""                    # run name inside the table folder
    runs_table: Optional[str] = None  # read the runs of this other table (same run name) instead of running
    note: str = ""

    @property
    def script(self) -> str:
        return f"train_{self.method}.py"

    @property
    def argv(self) -> list[str]:
        return ["--arch", self.arch, *self.flags]


@dataclass
class Table:
    name: str
    title: str
    source: str
    unit: str                        # "error" or "accuracy" (top-1, %)
    rows: list                       # row labels in the paper's order
    columns: list                    # column labels in the paper's order
    cells: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def cell(self, row: str, column: str) -> Optional[Cell]:
        return next((c for c in self.cells if c.row == row and c.column == column), None)


def cell(row, column, method, arch, flags=(), single=None, ensemble=None, std=None, run=None, runs_table=None,
         note="", ensemble_head=None):
    """A Cell with its metrics: ``single``/``ensemble`` published values (None: the table has no ensemble
    number); ``run`` defaults to ``<method>-<arch>``."""
    metrics = [Metric("single", SINGLE[method], single, std)]
    if ensemble is not None or ensemble_head:
        metrics.append(Metric("ensemble", ensemble_head or ENSEMBLE.get(method, "ensemble"), ensemble))
    return Cell(row, column, method, arch, tuple(flags), tuple(metrics), run or f"{method}-{arch}", runs_table,
                note)


# --------------------------------------------------------------------------------------------------------------
# MCL-OKD README: CIFAR-100 top-1 error (%), "single (ensemble)". Every method at the MCL-OKD repository's
# protocol, which is each script's default; DML's column is the repository's 4-branch shared-trunk DML.
# --------------------------------------------------------------------------------------------------------------
MCL_BACKBONES = [("DenseNet-40-12", "densenet40_12"), ("ResNet-32", "resnet32"), ("VGG-16", "vgg16"),
                 ("ResNet-110", "resnet110_bottleneck"), ("HCGNet-A1", "hcgnet_a1")]
MCL_METHODS = [("Baseline", "baseline", ()), ("DML", "dml", ("--preset", "mcl-okd")), ("CL-ILR", "cl_ilr", ()),
               ("ONE", "one", ()), ("OKDDip", "okddip", ()), ("MCL-OKD", "mcl_okd", ())]
MCL_ERROR = {   # row: baseline, then (single, ensemble) per method in MCL_METHODS order
    "DenseNet-40-12": (29.17, (27.34, 26.02), (27.38, 26.19), (29.01, 28.67), (28.75, 27.51), (26.04, 23.55)),
    "ResNet-32": (28.91, (24.92, 22.97), (25.40, 24.03), (25.74, 24.03), (25.76, 23.73), (24.52, 22.00)),
    "VGG-16": (25.18, (24.14, 23.27), (23.58, 22.96), (25.22, 25.12), (24.86, 24.52), (23.11, 22.36)),
    "ResNet-110": (23.62, (21.51, 19.12), (21.16, 18.66), (22.19, 20.23), (21.05, 19.40), (20.39, 18.29)),
    "HCGNet-A1": (22.46, (18.98, 17.86), (19.04, 18.35), (22.30, 21.64), (21.54, 20.97), (18.72, 17.54)),
}


def _mcl_okd_cifar100() -> Table:
    t = Table("mcl-okd-cifar100", "MCL-OKD README: CIFAR-100", "winycg/MCL-OKD README.md (CIFAR-100 table)",
              "error", [r for r, _ in MCL_BACKBONES], [m for m, _, _ in MCL_METHODS])
    for row, arch in MCL_BACKBONES:
        for (label, method, flags), value in zip(MCL_METHODS, MCL_ERROR[row]):
            single, ens = (value, None) if method == "baseline" else value
            t.cells.append(cell(row, label, method, arch, flags, single, ens))
    t.notes = [
        "The repository's \"ResNet-110\" is the bottleneck ResNet-110 (`resnet110_bottleneck`, 1.17M).",
        "Single: the mean over the peers' top-1 (the README does not say which branch), the leader for OKDDip, "
        "the last branch (the one DOT distils) for MCL-OKD. Ensemble: the mean of all peers' logits (ONE: its "
        "gated teacher). The official CL-ILR \"ensemble\" leaves out the last branch (a bug); ours includes it.",
        "Official scripts select the checkpoint on the test set; `best` here does the same (highest test top-1 "
        "of the method's selection head), and `last` is the last epoch.",
    ]
    return t


def _mcl_okd_ablation() -> Table:
    cols = ["Baseline", "+MCL", "+MCL+DOT"]
    t = Table("mcl-okd-ablation", "MCL-OKD README: ablation on CIFAR-100", "winycg/MCL-OKD README.md (ablation)",
              "error", [r for r, _ in MCL_BACKBONES], cols)
    ablation = {"DenseNet-40-12": (29.17, 28.07, 26.04), "ResNet-32": (28.91, 27.29, 24.52),
                "VGG-16": (25.18, 23.86, 23.11), "ResNet-110": (23.62, 21.65, 20.39),
                "HCGNet-A1": (22.46, 20.76, 18.72)}
    for row, arch in MCL_BACKBONES:
        base, mcl, both = ablation[row]
        t.cells += [
            cell(row, "Baseline", "baseline", arch, (), base, runs_table="mcl-okd-cifar100"),
            cell(row, "+MCL", "mcl_okd", arch, ("--alpha", "0"), mcl, run=f"mcl_okd-{arch}-alpha0"),
            cell(row, "+MCL+DOT", "mcl_okd", arch, (), both, runs_table="mcl-okd-cifar100"),
        ]
    t.notes = ["Baseline and +MCL+DOT are the main table's baseline and MCL-OKD runs (read from "
               "`RUNS_DIR/mcl-okd-cifar100/`); only +MCL (`--alpha 0`: no DOT) runs here. Single = the last branch."]
    return t


def _mcl_okd_imagenet() -> Table:
    data = ("--dataset", "imagenet")
    t = Table("mcl-okd-imagenet", "MCL-OKD README: ImageNet ResNet-34", "winycg/MCL-OKD README.md (ImageNet)",
              "error", ["ResNet-34"], ["Baseline", "MCL-OKD"])
    t.cells = [
        cell("ResNet-34", "Baseline", "baseline", "resnet34", data + ("--recipe", "imagenet"), 25.43),
        cell("ResNet-34", "MCL-OKD", "mcl_okd", "resnet34", data + ("--recipe", "mcl-okd-imagenet"), 24.64, 23.26),
    ]
    t.notes = ["Needs the ILSVRC-2012 files (`--extra \"--data /path/to/imagenet\"` or `$OKD_DATASETS`). One GPU "
               "per run at the recipe's batch (256 / 128); the official 8-GPU form is in docs/distributed.md."]
    return t


# --------------------------------------------------------------------------------------------------------------
# CMFF README: CIFAR-100 top-1 accuracy (%). Every method with its own script's defaults (its paper's recipe and
# variant), which is what the README quotes; the baseline at the CMFF repository's protocol.
# --------------------------------------------------------------------------------------------------------------
# The CMFF README's baseline ("Student"): the CMFF code's protocol, which is the DCCL code's (steps 150/225, wd 2e-4,
# reflect-padded crops); the README does not say how its baselines were trained, and its code has no baseline script.
CMFF_RECIPE = ("--recipe", "dccl", "--pad-mode", "reflect")
# The FFL and DCCL codes' KLLoss (target softmax + 1e-7, not renormalised) is more than 1e-3 (relative) away from
# the exact KL on DCCL's flattened feature maps of real ResNet-32 and WRN networks, and on 100-class WRN logits at
# initialisation (scripts/kl_gap.py; docs/dccl.md, docs/ffl.md): the cells that reproduce those codes' protocols
# (each script's defaults) train with it.
OFFICIAL_KL = ("--kd-eps", "1e-7")
CMFF_COLUMNS = [("ResNet-32", "resnet32"), ("ResNet-110", "resnet110"), ("VGG-16", "vgg16"),
                ("WRN-20-8", "wrn_22_8"), ("DenseNet-40-12", "densenet40_12"), ("ResNet-32 (2nd)", "resnet32"),
                ("ResNet-56", "resnet56")]
CMFF_METHODS = [("Student (baseline)", "baseline", CMFF_RECIPE), ("DML", "dml", ()),
                ("ONE", "one", ("--preset", "paper", "--recipe", "one")), ("AMLN", "amln", ()),
                ("FFL", "ffl", OFFICIAL_KL), ("OKDDip", "okddip", ("--recipe", "okddip")), ("PCL", "pcl", ()),
                ("KDCL", "kdcl", ("--ensemble", "minlogit")), ("DCCL", "dccl", OFFICIAL_KL), ("CMFF", "cmff", ())]
_ = None
CMFF_ACCURACY = {   # per method, the 7 columns in CMFF_COLUMNS order; None = "-" in the README
    "Student (baseline)": (70.02, 76.49, 74.50, 78.23, 71.02, 72.56, 74.49),
    "DML": (73.59, 77.66, 75.07, 79.76, 73.05, 71.69, 73.25),
    "ONE": (73.64, 79.73, _, 81.27, 71.27, 71.53, 72.03),
    "AMLN": (_, 74.69, 79.87, _, _, 74.65, 75.29),
    "FFL": (74.44, 80.66, 73.56, 80.94, 71.31, 72.94, 73.77),
    "OKDDip": (74.60, 80.88, 74.20, 81.32, 72.01, 75.24, 75.01),
    "PCL": (74.14, 80.39, 73.16, 80.07, 70.89, 74.51, 75.08),
    "KDCL": (73.76, _, _, 81.04, _, 74.82, 75.43),
    "DCCL": (75.38, 80.74, _, 73.98, 71.27, 74.87, 76.31),
    "CMFF": (75.72, 80.54, 79.36, 81.83, 74.52, 75.22, 77.09),
}


def _cmff_column_flags(method: str, arch: str) -> tuple:
    """The official CMFF per-backbone scripts: ResNet-110 loss weights (train_rn110.py), 400 epochs for VGG and
    DenseNet (train_vgg.py, train_Densenet.py), 400 epochs with steps at 50/150/225/300 for WRN (train_wrn.py, which
    the DCCL code has too: DCCL's WRN cell follows it as well)."""
    if method == "cmff" and arch == "resnet110":
        return ("--preset", "rn110")
    if method == "cmff" and arch in ("vgg16", "densenet40_12"):
        return ("--epochs", "400")
    if method in ("cmff", "dccl") and arch == "wrn_22_8":
        return ("--recipe", "dccl-wrn")
    return ()


def _cmff_cifar100() -> Table:
    t = Table("cmff-cifar100", "CMFF README: CIFAR-100", "Coralmss/CMFF README.md (CIFAR-100 table)", "accuracy",
              [m for m, _, _ in CMFF_METHODS], [c for c, _ in CMFF_COLUMNS])
    for label, method, flags in CMFF_METHODS:
        for (column, arch), value in zip(CMFF_COLUMNS, CMFF_ACCURACY[label]):
            if value is not None:
                t.cells.append(cell(label, column, method, arch, flags + _cmff_column_flags(method, arch), value))
    t.notes = [
        "The README's header row names the last two columns WRN-16-2 / WRN-40-2, its rows ResNet-32 / ResNet-56; "
        "we follow the rows. The second ResNet-32 column is the same command as the first, so its cells share "
        "the first column's runs and differ only in the published number.",
        "\"WRN-20-8\" is trained as WRN-22-8 (`wrn_22_8`): the CMFF code's WRN script builds depth 22 (the DCCL "
        "code's default, depth 20, fails its constructor), without their dropout 0.3; \"ResNet-110\" is the "
        "basic-block `resnet110`. Every method's cells train these two networks, so that a column compares one "
        "network. The README does not say where the other methods' numbers come from: a few match the PCL "
        "table's (KDCL ResNet-32 73.76; DML within 0.01 on DenseNet-40-12 and WRN-20-8), most match no table we "
        "know, and the OKDDip/PCL re-runs' WRN-20-8 is `wrn_20_8` (6.87M parameters against 17.2M) and their "
        "ResNet-110 the bottleneck one (docs/backbones.md).",
        "Each method runs with its own script's defaults, the README saying nothing of their protocols: DML and "
        "AMLN MCL-OKD's (`okd`: cosine from 0.1, weight decay 5e-4; neither paper's schedule is reproduced, "
        "docs/dml.md, docs/amln.md), PCL and KDCL the OKDDip/PCL one (`okddip`, under which PCL's "
        "paper ran both), FFL its code's (`ffl`, weight decay 1e-4); the baseline with the CMFF code's protocol "
        "(`--recipe dccl --pad-mode reflect`); ONE "
        "with its paper's 3 branches and run scripts (`--preset paper --recipe one`), "
        "OKDDip with its paper's step schedule, KDCL with the MinLogit target, FFL and DCCL with their codes' KL form "
        "(`--kd-eps 1e-7`, which is more than 1e-3 from the exact KL on DCCL's feature maps: docs/dccl.md). CMFF "
        "runs this repository's defaults, not `--preset official`, so the exact KL. Single = the mean over the peers "
        "(PCL: the head it deploys); the README does not say which head it reports.",
        "CMFF's own cells follow its per-backbone scripts: `--preset rn110` on ResNet-110, `--epochs 400` on VGG-16 "
        "and DenseNet-40-12, `--recipe dccl-wrn` (400 epochs, steps at 50/150/225/300) on WRN. The official WRN "
        "script trains FFL + DCCL terms without the rotation task or the attention; ours trains the whole CMFF "
        "method there. DCCL's WRN cell follows its own code's WRN script too (`--recipe dccl-wrn`).",
    ]
    return t


def _cmff_tinyimagenet() -> Table:
    # the CMFF code's TinyImageNet loader pads with zeros (RandomCrop(64, padding=4)), for every method it ran: the
    # default of every script on --dataset tinyimagenet (FFL, DCCL and CMFF pad only CIFAR by reflection)
    methods = [("Baseline", "baseline", ("--recipe", "dccl")), ("DML", "dml", ()), ("FFL", "ffl", OFFICIAL_KL),
               ("DCCL", "dccl", OFFICIAL_KL), ("CMFF", "cmff", ())]
    published = {"ResNet-18": (65.30, 67.32, 68.89, 69.59, 74.99), "ResNet-34": (67.45, 69.14, 69.69, 69.92, 81.11)}
    t = Table("cmff-tinyimagenet", "CMFF README: TinyImageNet", "Coralmss/CMFF README.md (TinyImageNet)", "accuracy",
              list(published), [m for m, _, _ in methods])
    for row, arch in (("ResNet-18", "resnet18"), ("ResNet-34", "resnet34")):
        for (label, method, flags), value in zip(methods, published[row]):
            t.cells.append(cell(row, label, method, arch, ("--dataset", "tinyimagenet") + flags, value))
    t.notes = ["Not comparable: the CMFF code measured these on the augmented *training* set with CIFAR-style "
               "ResNet-20/32 networks; ours are real ResNet-18/34 on the official validation split.",
               "FFL and DCCL train with their codes' KL form (`--kd-eps 1e-7`), as in the CIFAR-100 table; every "
               "method pads its crops with zeros, as the CMFF code's TinyImageNet loader (the default on "
               "tinyimagenet: the FFL, DCCL and CMFF presets pad only CIFAR by reflection). Each method runs its "
               "own script's recipe as in the CIFAR-100 table (DML: `okd`, cosine, weight decay 5e-4; the baseline, "
               "DCCL and CMFF: `dccl`; FFL: `ffl`); the README does not say how its DML runs were trained."]
    return t


# --------------------------------------------------------------------------------------------------------------
# PCL (AAAI 2021) CIFAR-100 top-1 accuracy (%), mean ± std. PCL re-ran every method at the OKDDip protocol.
# --------------------------------------------------------------------------------------------------------------
PCL_BACKBONES = [("ResNet-32", "resnet32"), ("ResNet-110", "resnet110_bottleneck"), ("VGG-16", "vgg16"),
                 ("DenseNet-40-12", "densenet40_12"), ("WRN-20-8", "wrn_20_8")]
PCL_PROTOCOL = ("--recipe", "okddip")
PCL_METHODS = [("DML", "dml", ()), ("CL", "cl_ilr", ()), ("ONE", "one", ("--preset", "paper")),
               ("FFL-S", "ffl", ("--pad-mode", "zero")),
               ("OKDDip", "okddip", ()), ("KDCL", "kdcl", ("--ensemble", "minlogit")), ("PCL", "pcl", ())]
PCL_ACCURACY = {   # (mean, std) per method in PCL_METHODS order
    "ResNet-32": ((73.68, .14), (72.33, .46), (73.79, .41), (72.18, .11), (73.25, .38), (73.76, .34), (74.14, .16)),
    "ResNet-110": ((77.86, .50), (78.83, .58), (78.40, .36), (77.22, .41), (78.54, .26), (78.28, .32), (79.98, .55)),
    "VGG-16": ((75.52, .10), (74.33, .08), (74.37, .39), (70.87, .99), (74.68, .05), (75.67, .22), (76.89, .25)),
    "DenseNet-40-12": ((73.06, .31), (71.45, .34), (71.60, .38), (71.25, .35), (71.23, .14), (72.52, .42),
                       (73.09, .16)),
    "WRN-20-8": ((79.77, .07), (79.40, .12), (79.10, .39), (78.22, .14), (78.83, .06), (79.37, .30), (80.51, .49)),
}


def _pcl_cifar100() -> Table:
    t = Table("pcl-cifar100", "PCL (AAAI 2021): CIFAR-100", "Wu & Gong, AAAI 2021, CIFAR-100 table", "accuracy",
              [r for r, _ in PCL_BACKBONES], [m for m, _, _ in PCL_METHODS])
    for row, arch in PCL_BACKBONES:
        for (label, method, flags), (mean, std) in zip(PCL_METHODS, PCL_ACCURACY[row]):
            t.cells.append(cell(row, label, method, arch, flags + PCL_PROTOCOL, mean, std=std))
    t.notes = ["Every method at the OKDDip/PCL protocol (`--recipe okddip`: steps at 150/225, weight decay 5e-4; "
               "the usual zero-padded crop, so FFL-S leaves its code's reflect padding: `--pad-mode zero`). "
               "\"ResNet-110\" is the bottleneck one and \"WRN-20-8\" the OKDDip/PCL `wrn_20_8` (docs/backbones.md). "
               "Single = the mean over the peers (OKDDip: the leader, PCL: the head it deploys). \"VGG-16\" is "
               "MCL-OKD's `vgg16` (one Linear); the OKDDip and PCL codes end in a 3-layer classifier, +525k "
               "parameters (docs/backbones.md).",
               "CL is MCL-OKD's CL-ILR (a tree of 4 heads, T = 2, CE and KD weighted 0.5 each, no ramp-up: "
               "docs/cl_ilr.md). The OKDDip code's CL, which this column may report (PCL does not say), is "
               "`train_one.py --avg --bpscale`: ONE's topology with the trunk's gradient divided by the number of "
               "branches, T = 3, an 80-epoch ramp-up and weights 1/1; it is not built here. ONE runs its paper's "
               "3 branches (`--preset paper`); the OKDDip code's default is 4."]
    return t


# --------------------------------------------------------------------------------------------------------------
# Real data this machine has: every method on Fashion-MNIST, one backbone, a small fixed budget, no paper numbers.
# --------------------------------------------------------------------------------------------------------------
FASHION_METHODS = [("Baseline", "baseline"), ("DML", "dml"), ("CL-ILR", "cl_ilr"), ("ONE", "one"),
                   ("OKDDip", "okddip"), ("MCL-OKD", "mcl_okd"), ("FFL", "ffl"), ("DCCL", "dccl"), ("KDCL", "kdcl"),
                   ("PCL", "pcl"), ("AMLN", "amln"), ("CMFF", "cmff")]
# about 50 minutes on 2 CPU cores (evaluating the full 10,000 test images every epoch would double it)
FASHION_BUDGET = ("--dataset", "fashion-mnist", "--subset", "4000", "--eval-subset", "2000", "--epochs", "3")


def _fashion_mnist() -> Table:
    t = Table("fashion-mnist", "Every method on Fashion-MNIST (ResNet-20, 4,000 images, 3 epochs)",
              "this repository (docs/results.md)", "accuracy", [m for m, _ in FASHION_METHODS], ["ResNet-20"])
    for label, method in FASHION_METHODS:
        extra = ("--ensemble", "minlogit") if method == "kdcl" else ()
        t.cells.append(cell(label, "ResNet-20", method, "resnet20", FASHION_BUDGET + extra,
                            ensemble_head=None if method == "baseline" else ENSEMBLE.get(method, "ensemble")))
    t.notes = ["Each method's defaults on 4,000 Fashion-MNIST training images (a stratified subset drawn with the "
               "run's seed) for 3 epochs, tested on 2,000 test images (stratified; the same images for every method "
               "of a seed); no published numbers (a harness and sanity check, not a paper)."]
    return t


# --------------------------------------------------------------------------------------------------------------
# A two-cell synthetic table to check the harness in a minute (and time it on a new machine).
# --------------------------------------------------------------------------------------------------------------
def _smoke() -> Table:
    budget = ("--dataset", "synthetic", "--subset", "512", "--epochs", "2", "--batch-size", "64")
    t = Table("smoke", "Harness check on the synthetic set (ResNet-20, 2 epochs)", "this repository", "accuracy",
              ["Baseline", "DML"], ["ResNet-20"])
    t.cells = [cell("Baseline", "ResNet-20", "baseline", "resnet20", budget),
               cell("DML", "ResNet-20", "dml", "resnet20", budget, ensemble_head="ensemble")]
    return t


TABLES: dict[str, Table] = {t.name: t for t in (
    _mcl_okd_cifar100(), _mcl_okd_ablation(), _mcl_okd_imagenet(), _cmff_cifar100(), _cmff_tinyimagenet(),
    _pcl_cifar100(), _fashion_mnist(), _smoke())}
PAPER_TABLES = ("mcl-okd-cifar100", "mcl-okd-ablation", "mcl-okd-imagenet", "cmff-cifar100", "cmff-tinyimagenet",
                "pcl-cifar100")


def check_table(table: Table) -> None:
    """Raise ValueError if two cells share a run name with different commands, or a cell is listed twice."""
    seen: dict[str, Cell] = {}
    places = set()
    for c in table.cells:
        if (c.row, c.column) in places:
            raise ValueError(f"{table.name}: two cells at ({c.row}, {c.column})")
        places.add((c.row, c.column))
        other = seen.setdefault(c.run, c)
        if (other.script, other.argv, other.runs_table) != (c.script, c.argv, c.runs_table):
            raise ValueError(f"{table.name}: run {c.run!r} is used by two cells with different commands")


for _table in TABLES.values():
    check_table(_table)


def main(argv: Optional[list] = None) -> int:
    """``python scripts/tables.py``: the tables, one line each (``--help``: what this file is). The file is data:
    reproduce.py runs its cells and summarize.py reads their runs back."""
    import argparse

    from engine.cli import Parser          # (the tools' parser: an error in one line)
    parser = Parser(
        prog="scripts/tables.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
        epilog="The file is data: python scripts/reproduce.py TABLE --dry-run prints a table's commands, "
               "reproduce.py --list\ncounts its runs, and python scripts/summarize.py RUNS --table TABLE reads "
               "them back.\ntables: " + ", ".join(TABLES))
    parser.parse_args(argv)
    for t in TABLES.values():
        print(f"{t.name:<20} {len(t.cells):>3} cells  {t.title}")
    return 0


if __name__ == "__main__":     # run as a file: the repository's packages are one folder up, as for every tool
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from engine.cli import run_tool
    run_tool(main)
