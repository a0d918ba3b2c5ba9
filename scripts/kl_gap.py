"""How far the official KLLoss is from the exact KL on DCCL's real terms: logits and flattened feature maps.

The FFL/DCCL/CMFF codes' ``utils.KLLoss`` (``Jangho-Kim/FFL-pytorch``, ``nanxiaotong/DCCL``, ``Coralmss/CMFF``)
distils with the target t = softmax(teacher/T) + 1e-7, not renormalised:

    official(s <- t) = T^2 mean_n sum_k t_nk (log t_nk - log softmax(s_n/T)_k)
    exact(s <- t)    = the same with eps = 0 = T^2 KL(softmax(t/T) || softmax(s/T))

Per sample the gap is T^2 [sum_k p_k log(1 + eps/p_k) + eps sum_k log((p_k + eps)/q_k)], about T^2 eps K for K
entries, so it grows with the size K of what the softmax runs over: 100 for CIFAR-100 logits, C*H*W for DCCL's
flattened stage maps (16,384 for ResNet-32's first stage, 131,072 for WRN-22-8's). This script measures it on
real networks (DCCL's two peers with their cross-stage projections, ``train_dccl.DCCLNet``) and real images, both
forms re-stated here in float64, and prints one row per term: K, the exact value, the official value, the
relative gap (official - exact) / exact, and the relative gap of the gradient each gives the student (the
difference of the two gradients over the exact one, in the Euclidean norm over the whole batch; for logits
about eps * K, far larger on flattened maps).

    python scripts/kl_gap.py --arch resnet32 wrn_22_8                     # at initialisation (seed 0)
    python scripts/kl_gap.py --checkpoint runs/dccl-resnet32-.../last.pt  # a trained DCCL run

Images: a training batch of ``--dataset`` with the training augmentation, as the loss sees it (train-mode
BatchNorm); default: the checkpoints' dataset, else fashion-mnist (offline, it reads Debian's copy).
Checkpoints are read as the engine reads them (a missing, truncated or damaged file, or one that train_dccl.py
did not save, is refused in one line before any data is loaded). docs/dccl.md quotes the numbers.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

if __name__ == "__main__":     # run as a file: the repository's packages are one folder up (imported: already found)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import DATASET_NAMES, DeviceLoader, DatasetError, dataset_info, load_dataset  # noqa: E402
from engine.checkpoint import load_checkpoint, saved_by  # noqa: E402
from engine.cli import (Parser, dataset_folder, number, path_given, positive_int, process_count,  # noqa: E402
                        run_tool, temperature)
from engine.errors import UserError  # noqa: E402
from models import ImageSizeError, UnknownModelError, model_entry  # noqa: E402
from train_dccl import DCCL, DCCLNet  # noqa: E402

EPS = 1e-7
METHOD = DCCL.name            # the checkpoints this script reads: train_dccl.py's
DEFAULT_DATASET = "fashion-mnist"
FILE_DATASETS = ("folder", "imagenet")     # large images read from files: not what the batch is drawn from
SMALL_DATASETS = [name for name in DATASET_NAMES if name not in FILE_DATASETS]
MAX_CLASSES = 100_000                      # ImageNet-21k has 21,841


def kd_forms(student: torch.Tensor, teacher: torch.Tensor, T: float) -> tuple[float, float, float, float]:
    """KD_T(student <- teacher) over dim 1 in float64: (exact, official, |g_exact|^2, |g_official - g_exact|^2),
    g the gradient with respect to the student (the teacher is detached in both forms)."""
    s = student.detach().double().flatten(1).requires_grad_()
    t = teacher.detach().double().flatten(1) / T
    log_q = F.log_softmax(s / T, 1)
    p = F.softmax(t, 1)
    exact = (p * (F.log_softmax(t, 1) - log_q)).sum(1).mean() * T * T
    target = p + EPS
    official = (target * (target.log() - log_q)).sum(1).mean() * T * T
    g_exact, = torch.autograd.grad(exact, s, retain_graph=True)
    g_official, = torch.autograd.grad(official, s)
    return exact.item(), official.item(), g_exact.square().sum().item(), (g_official - g_exact).square().sum().item()


def summed(pairs: list[tuple]) -> tuple:
    return tuple(sum(p[k] for p in pairs) for k in range(4))


def mutual(tensors: list[torch.Tensor], T: float) -> tuple:
    """Both forms summed over ordered pairs i != j (DCCL's peer and feature terms)."""
    return summed([kd_forms(a, b, T) for i, a in enumerate(tensors) for j, b in enumerate(tensors) if i != j])


def measure(model: DCCLNet, images: torch.Tensor, T: float) -> list[tuple]:
    """(term, K, exact, official, |g|^2, |dg|^2) of every KD term of DCCL's loss (unweighted by the ramp-up)."""
    model.train()
    with torch.no_grad():
        out = model(images, features=True)
    rows = [("kd: peer logits", out.logits[0].shape[1], *mutual(out.logits, T))]
    for t in range(len(out.features[0])):
        maps = [f[t] for f in out.features]
        rows.append((f"kd_feat: stage {t + 1} ({'x'.join(map(str, maps[0].shape[1:]))})", maps[0][0].numel(),
                     *mutual(maps, T)))
    fused = [kd_forms(z, out.fused, T) for z in out.logits] + [kd_forms(out.fused, z, T) for z in out.logits]
    rows.append(("kd_fused: peers <-> fused", out.fused.shape[1], *summed(fused)))
    return rows


def batch_of(dataset: str, data: Optional[str], size: int, seed: int, download: bool = False):
    if dataset in FILE_DATASETS:                # a checkpoint trained on one (--dataset itself has choices)
        raise UserError(f"kl_gap.py draws its batch from a built-in small-image dataset "
                        f"({', '.join(SMALL_DATASETS)}), not {dataset}")
    train, _ = load_dataset(dataset, data, download)
    info = dataset_info(dataset)
    loader = DeviceLoader(train, info, size, "cpu", train=True, seed=seed, pad_mode="reflect")
    loader.set_epoch(0)
    return next(iter(loader)).images, info.num_classes


def read_checkpoint(path: Path) -> dict:
    """A DCCL checkpoint, loaded as the engine loads one (engine.checkpoint.load_checkpoint: a missing, empty,
    truncated or damaged file is a one-line UserError); a checkpoint of another method is refused."""
    ckpt = load_checkpoint(path, instead="name the run's other checkpoint (best.pt / last.pt)")
    if ckpt["method"] != METHOD:
        raise UserError(f"--checkpoint {path} was saved by {saved_by(ckpt)}; kl_gap.py reads {METHOD} "
                        f"checkpoints (train_{METHOD}.py's last.pt / best.pt)")
    return ckpt


def checkpoint_dataset(checkpoints: dict, given: Optional[str]) -> str:
    """The dataset to draw the batch from: ``given`` (--dataset), which must be the one every checkpoint was
    trained on, else theirs, else the default."""
    trained = {path: ckpt["args"].get("dataset") for path, ckpt in checkpoints.items()}
    for path, dataset in trained.items():
        if dataset is not None and given is not None and dataset != given:
            raise UserError(f"--checkpoint {path} was trained on {dataset}, not --dataset {given}; give --dataset "
                            f"{dataset} (its networks take that data's images and classes)")
    found = sorted({d for d in trained.values() if d is not None})
    if given is None and len(found) > 1:
        raise UserError(f"the checkpoints were trained on {', '.join(found)}; measure those of one dataset at a time")
    return given or (found[0] if found else DEFAULT_DATASET)


def checkpoint_net(path: Path, ckpt: dict, image_size: int) -> DCCLNet:
    args = ckpt["args"]
    net = DCCLNet(args["arch"], args["num_classes"], args["num_peers"], image_size)
    try:
        net.load_state_dict(ckpt["state"]["model"])
    except RuntimeError as e:
        raise UserError(f"--checkpoint {path}: its weights do not fit DCCL's {args['arch']} network "
                        f"({str(e).splitlines()[0][:200]}); was it saved by this version of train_dccl.py?") from None
    return net


def main(argv: Optional[list] = None) -> int:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="*", default=[], help="DCCL networks at initialisation")
    p.add_argument("--checkpoint", nargs="*", default=[], type=path_given, help="DCCL checkpoints (last.pt, best.pt)")
    p.add_argument("--dataset", default=None, choices=SMALL_DATASETS,
                   help=f"default: the checkpoints' dataset, else {DEFAULT_DATASET}")
    p.add_argument("--data", type=dataset_folder, default=None, metavar="DIR",
                   help="the dataset's folder, as for training (default: the checkpoints' --data, else the usual place)")
    p.add_argument("--download", action="store_true", help="download the dataset if it is missing, as for training")
    p.add_argument("--num-classes", type=number(int, at_least=2, at_most=MAX_CLASSES,
                                                why="classes of a classification head (over one class every KL is "
                                                    "0); ImageNet-21k has 21,841"),
                   default=None,
                   help="classes of the networks built at initialisation (default: the dataset's; 100 sizes the logit "
                        "terms as on CIFAR-100)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--kd-T", type=temperature, default=3.0)
    p.add_argument("--seed", type=number(int, at_least=0, below=2 ** 32, why="the training scripts' --seed range"),
                   default=0)
    p.add_argument("--threads", type=process_count("CPU threads", at_least=1), default=1)
    a = p.parse_args(argv)
    if not (a.arch or a.checkpoint):
        p.error("nothing to measure: give --arch NAME ... (networks at initialisation) or --checkpoint PATH ...")
    try:
        return measure_and_print(a)
    except (UserError, DatasetError, UnknownModelError, ImageSizeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def measure_and_print(a) -> int:
    torch.set_num_threads(a.threads)
    checkpoints = {path: read_checkpoint(path) for path in a.checkpoint}      # before any data is loaded
    for arch in a.arch:
        model_entry(arch)                                                    # an unknown name: one line, first
    dataset = checkpoint_dataset(checkpoints, a.dataset)
    data = a.data or next((c["args"].get("data") for c in checkpoints.values() if c["args"].get("data")), None)
    images, num_classes = batch_of(dataset, data, a.batch_size, a.seed, a.download)
    nets = []
    for arch in a.arch:
        torch.manual_seed(a.seed)
        classes = a.num_classes or num_classes
        nets.append((f"{arch}, initialisation (seed {a.seed}, {classes} classes)",
                     DCCLNet(arch, classes, 2, images.shape[-1])))
    for path, ckpt in checkpoints.items():
        net = checkpoint_net(path, ckpt, images.shape[-1])
        nets.append((f"{ckpt['args']['arch']}, {path} (epoch {ckpt['epoch']})", net))
    whole = f" (the whole training set: --batch-size {a.batch_size} is more)" if len(images) < a.batch_size else ""
    print(f"{dataset}: one augmented training batch of {len(images)}{whole}, T = {a.kd_T}, eps = {EPS}, float64\n")
    for title, net in nets:
        print(f"### {title}\n")
        print("| term | K | exact | official | (official - exact) / exact | gradient: abs(g_off - g) / abs(g) |")
        print("|---|---|---|---|---|---|")
        rows = measure(net, images, a.kd_T)
        for term, k, exact, official, g2, dg2 in rows + [("all KD terms", None, *summed([r[2:] for r in rows]))]:
            print(f"| {term} | {'' if k is None else f'{k:,}'} | {exact:.6g} | {official:.6g} | "
                  f"{(official - exact) / exact:.2e} | {(dg2 / g2) ** 0.5:.2e} |")
        print()
    return 0


if __name__ == "__main__":
    run_tool(main)
