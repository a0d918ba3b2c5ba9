#!/usr/bin/env python
"""Write one trained peer of a run as a stand-alone network.

Usage::

    python scripts/export_peer.py runs/dml-resnet32-cifar100-n2-s0/best.pt --peer 2 -o peer2.pt
    python scripts/export_peer.py RUN/best.pt --peer 1 --from mean_teacher -o pcl.pt   # PCL's mean teacher

An existing ``-o`` file is never replaced without ``--force``; the file is written whole or not at all (a
temporary file in its folder, then a rename). Even with ``--force``, ``-o`` may not be the checkpoint read, nor
be named ``last.pt`` or ``best.pt`` (a run's checkpoints: ``last.pt`` is its resume point), nor be one of a run
directory's own files (``results.json``, ``.lock``, ``eval-*.json``) in a folder that holds a run.

The file is ``{"arch", "num_classes", "classes", "model_kwargs", "format", "state_dict", "preprocessing",
"source", "sha256"}`` (``classes``: the class names in label order where the run recorded them, else None;
``sha256``: the content's checksum, as the engine's checkpoints carry):

* ``format == "models"``: load it with ``models.create_model(arch, num_classes=..., **model_kwargs)`` and
  ``load_state_dict(state_dict)`` (``load_exported`` below does both);
* ``format == "torchvision"`` (``resnet50``, ``mobilenet_v2``): the keys are torchvision's, so
  ``torchvision.models.<arch>(num_classes=...).load_state_dict(state_dict)`` takes it as it is.

``preprocessing`` is what an image goes through before the network, as the run evaluated its test images:
``{"dataset", "image_size", "mean", "std", "protocol", "test", "unknown"}``. ``mean`` and ``std`` are per channel,
on ``ToTensor``'s [0, 1] scale: for ``--dataset folder`` those the run measured on its training images (the
checkpoint's record, ``data.folder``), for a built-in dataset data/'s constants (``data.common.static_info``);
``image_size`` is the size the run recorded; ``protocol`` is 'cifar' or 'imagenet' and ``test`` the framing before
``ToTensor()`` + ``Normalize(mean, std)`` in words (``resize to 32x32 ...``, ``Resize(256) + CenterCrop(224)``).
What an older checkpoint does not record (a folder run's mean and std, or the dataset itself) is None, never
guessed, and ``unknown`` says what (None when everything is known). ``input_transform`` below builds the transform::

    exported = torch.load("peer2.pt", weights_only=True)
    pre = exported["preprocessing"]        # e.g. {"dataset": "folder", "image_size": 32, "mean": [0.47, ...], ...}
    to_input = input_transform(pre)        # or by hand, for the 'cifar' protocol of a folder run:
    # transforms.Compose([transforms.Resize((pre["image_size"],) * 2), transforms.ToTensor(),
    #                     transforms.Normalize(pre["mean"], pre["std"])])
    logits = load_exported("peer2.pt").eval()(to_input(Image.open("x.jpg").convert("RGB")).unsqueeze(0))

Peer i of independent peers is network i; of a shared trunk (ONE, OKDDip, PCL, MCL-OKD...) or the CL-ILR tree
it is the trunk + (its group +) branch i, i.e. exactly the single backbone; grouped runs (--grouped-peers) are
split back into the plain network. The script prints which head of the run the peer is and the top-1 that the
checkpoint's epoch recorded for it (test, and val with --val-split), and stores both in the export's ``source``.
That head follows ``--from``: peer N of ``model`` is head ``peerN``, peer N of PCL's ``mean_teacher`` is head
``mean_peerN`` (the weights written are the mean teacher's, so is the accuracy); OKDDip's last peer, its group
leader, is head ``leader``. A ``--head`` of another peer, of another state, or one that combines the peers
(``ensemble``, ``fused``, ``teacher``) is refused.
"""
from __future__ import annotations

import errno
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

if __name__ == "__main__":     # run as a file: the repository's packages are one folder up (imported: already found)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torchvision import transforms  # noqa: E402

from data.common import DATASET_NAMES, DatasetInfo, static_info  # noqa: E402
from data.files import RUN_CHECKPOINTS, NameTaken, checksummed, output_problem, write_atomically  # noqa: E402
from data.folder import SMALL_MAX, frame  # noqa: E402
from data.imagenet import test_transform  # noqa: E402
from engine.checkpoint import load_checkpoint  # noqa: E402
from engine.cli import Parser, non_empty_path, path_given, positive_int, run_tool  # noqa: E402
from engine.errors import UserError  # noqa: E402
from models import create_model  # noqa: E402
from models.peers import Peers, peer_archs  # noqa: E402
from models.torchvision_nets import TORCHVISION, to_torchvision_state  # noqa: E402

IMAGE_SIZES = (32, 224)   # the ResNet-18/34 stem is whichever of these the weights fit


def find_peers(state: dict) -> tuple[str, dict]:
    """(prefix, sub-state) of the one ``Peers`` in a state dict: the keys before ``branches.<i|wide>.``."""
    prefixes = {m.group(1) for key in state for m in [re.match(r"^(.*?)branches\.(\d+|wide)\.", key)] if m}
    if len(prefixes) != 1:
        raise UserError(f"found {len(prefixes)} sets of peers in this state ({sorted(prefixes)}); "
                        "export works on methods with one Peers module")
    prefix = prefixes.pop()
    return prefix, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def rebuild_peers(state: dict, arch: str, num_classes: int, num_peers: int) -> Peers:
    """A ``Peers`` with ``state`` loaded: topology and split read from the keys, the stem from the shapes."""
    topology = "tree" if any(k.startswith("groups.") for k in state) else (
        "shared" if any(k.startswith("trunk.") for k in state) else "independent")
    split = len({k.split(".")[2] for k in state if k.startswith("trunk.stages.")}) or None
    grouped = any(k.startswith("branches.wide.") for k in state)
    errors = []
    for size in IMAGE_SIZES:
        peers = Peers(arch, num_classes, num_peers, topology, split if topology != "independent" else None,
                      image_size=size)
        if grouped:
            peers.group_branches()
        try:
            peers.load_state_dict(state)
            return peers
        except RuntimeError as e:
            errors.append(str(e).splitlines()[0])
    raise UserError(f"the checkpoint's peers do not fit {arch} ({errors[-1][:200]})")


def _epoch_record(ckpt: dict) -> dict:
    """The record of the checkpoint's epoch in its history ({} for a checkpoint without its record)."""
    return next((r for r in ckpt.get("history", []) if r["epoch"] == ckpt["epoch"]), {})


def evaluated_heads(ckpt: dict) -> list[str]:
    """The heads the run evaluated at the checkpoint's epoch (empty for a checkpoint without its record)."""
    return [k[:-len("/top1")] for k in _epoch_record(ckpt).get("test", {}) if k.endswith("/top1")]


def recorded_accuracy(ckpt: dict, head: str, given: bool = False) -> dict[str, float]:
    """Top-1 of ``head`` at the checkpoint's epoch, per split (empty when the run did not evaluate it). A head
    ``given`` by the user that the run did not evaluate is a UserError naming the ones it did."""
    record, heads = _epoch_record(ckpt), evaluated_heads(ckpt)
    if given and heads and head not in heads:
        raise UserError(f"--head {head}: the run evaluated {', '.join(heads)}; choose one of them")
    return {split: record[split][f"{head}/top1"] for split in ("test", "val")
            if f"{head}/top1" in record.get(split, {})}


HEAD_PREFIX = {"model": "", "mean_teacher": "mean_"}
"""How the run names the evaluated heads of each state of a checkpoint (--from): peer N of the trained model is
head peerN; peer N of PCL's temporal mean network (train_pcl.py's eval_logits) is head mean_peerN."""


def default_head(source: str, peer: int) -> str:
    """The head whose recorded accuracy belongs to peer ``peer`` of state ``source``: the weights exported and the
    accuracy printed beside them are one network's. A state whose heads the script does not know needs --head."""
    if source not in HEAD_PREFIX:
        raise UserError(f"--from {source}: which head of the run evaluated these weights is not known to this "
                        f"script; name it with --head (e.g. --head <name>peer{peer})")
    return f"{HEAD_PREFIX[source]}peer{peer}"


COMBINED = ("ensemble", "fused", "teacher")
"""Heads that combine the peers (their ensemble, FFL/DCCL/CMFF's fusion, ONE's and PCL's teachers): no one network's."""


def check_head(head: str, source: str, peer: int) -> None:
    """Refuse a --head that is another peer's, a combination of the peers (:data:`COMBINED`), or (for the states of
    HEAD_PREFIX) another state's: its accuracy would be printed and stored beside weights it was not measured on."""
    if head in COMBINED:
        raise UserError(f"--head {head} combines the peers, it is not one network's: its accuracy would be stored "
                        f"beside peer {peer}'s weights; give the head of peer {peer}")
    named = re.match(r"^(.*)peer(\d+)$", head)
    if named and int(named.group(2)) != peer:
        raise UserError(f"--head {head} is the head of peer {named.group(2)}, but --peer is {peer}: give "
                        f"--peer {named.group(2)}, or the head of peer {peer}")
    owner = next((state for state, prefix in HEAD_PREFIX.items() if named and named.group(1) == prefix), None)
    if source in HEAD_PREFIX and owner is not None and owner != source:
        raise UserError(f"--head {head} is a head of the '{owner}' state, but --from is '{source}': give --from "
                        f"{owner}, or --head {default_head(source, peer)} (the default)")


def _test_steps(info: DatasetInfo) -> str:
    """How the run framed an evaluation image of ``info`` before ``ToTensor()`` + ``Normalize(mean, std)``: the
    test transforms of data/ (data/folder.py's ``frame``, data/imagenet.py's ``test_transform``; the built-in
    arrays, data/fashion_mnist.py's padding), in words."""
    s = info.image_size
    if info.protocol == "imagenet":
        return f"Resize({info.test_resize}) + CenterCrop({s})"
    if info.name == "folder":
        return f"resize to {s}x{s} (PIL bilinear, the aspect ratio not kept)"
    if info.name == "fashion-mnist":
        return (f"a 28x28 greyscale image zero-padded by 2 pixels on each side to {s}x{s}, its channel "
                "replicated 3 times")
    return f"an RGB image of {s}x{s}, the dataset's own size (another image: resize it to {s}x{s})"


def preprocessing(ckpt: dict) -> dict:
    """What an image goes through before the exported network, as the run evaluated its test images: ``dataset``
    (``--dataset``), ``image_size``, ``mean`` and ``std`` (per channel, on the [0, 1] scale of ``ToTensor``),
    ``protocol`` (data.DatasetInfo's: 'cifar' or 'imagenet') and ``test`` (the framing, :func:`_test_steps`, then
    ``ToTensor()`` + ``Normalize(mean, std)``). A folder dataset's are the checkpoint's record (``data.folder``: the
    mean and std measured on its training images, which a resumed run or an evaluation reuses); a built-in
    dataset's are data/'s constants (:func:`data.common.static_info`) at the size the run recorded. What the
    checkpoint does not tell (an older one without the record, or without ``args.dataset``) is None, and
    ``unknown`` says what and why (None when all is known)."""
    args = ckpt.get("args") or {}
    name = args.get("dataset")
    record = (ckpt.get("data") or {}).get("folder") or {}
    size = ckpt.get("image_size") or record.get("image_size") or args.get("image_size")
    out = {"dataset": name, "image_size": None, "mean": None, "std": None, "protocol": None, "test": None,
           "unknown": None}
    if name is None or name not in DATASET_NAMES:
        out["unknown"] = ("the checkpoint does not name its dataset (args.dataset)" if name is None else
                          f"dataset {name!r} is not one of this version's ({', '.join(DATASET_NAMES)})"
                          ) + ": the image size, mean and std it was trained with are unknown"
        return out
    if name == "folder":
        mean, std = record.get("mean"), record.get("std")
        if size is not None:
            protocol = "cifar" if size <= SMALL_MAX else "imagenet"       # data.folder.describe's rule
            info = DatasetInfo(name, args.get("num_classes") or 0, size, None, None, 0, protocol=protocol)
        missing = [what for what, value in (("image size", size), ("mean and std", mean)) if value is None]
        if missing:
            out["unknown"] = (f"the checkpoint holds no record of the folder's {' or '.join(missing)} (a checkpoint "
                              "of an older version): measure them on the training images as data/folder.py does, "
                              "at the size the run was trained at")
    else:
        info = static_info(name)
        size = size or info.image_size                   # (only ImageNet's --image-size changes it)
        mean, std = info.mean, info.std
    if size is not None:
        out.update(image_size=size, protocol=info.protocol, test=_test_steps(replace(info, image_size=size)))
    if mean is not None:
        out.update(mean=[float(v) for v in mean], std=[float(v) for v in std])
    return out


def export_peer(checkpoint: Path, peer: int, source: str = "model", head: Optional[str] = None) -> dict:
    """The stand-alone peer ``peer`` (1-based) of a run's checkpoint as the dictionary the script writes; ``head``
    (default: the head of that peer of ``source``, :func:`default_head`) names whose recorded accuracy goes with it."""
    if head is not None:
        check_head(head, source, peer)
    ckpt = load_checkpoint(checkpoint, instead="export from the run's other checkpoint (best.pt / last.pt)")
    args = ckpt["args"]
    if source not in ckpt["state"]:
        raise UserError(f"{checkpoint} has no '{source}' state; --from one of: {', '.join(ckpt['state'])}")
    state = ckpt["state"][source]
    state = {k[len("module."):]: v for k, v in state.items() if k.startswith("module.")} or state  # AveragedModel
    _, sub = find_peers(state)
    n = args.get("num_peers") or len({k.split(".")[1] for k in sub if re.match(r"branches\.\d+\.", k)})
    if not 1 <= peer <= n:
        raise UserError(f"--peer {peer}: the run has peers 1..{n}")
    given, evaluated = head is not None, evaluated_heads(ckpt)
    head = head or default_head(source, peer)
    if not given and head not in evaluated and "leader" in evaluated and source == "model" and peer == n:
        head = "leader"                  # OKDDip's group leader is its last branch (train_okddip.py's eval_logits)
    top1 = recorded_accuracy(ckpt, head, given=given)
    if head == "leader" and (source != "model" or peer != n):
        raise UserError(f"--head leader is the head of OKDDip's group leader, peer {n} of --from model: give --peer "
                        f"{n} (and no --from), or the head of peer {peer}")
    arch = peer_archs(args["arch"], n)[peer - 1]
    peers = rebuild_peers(sub, args["arch"], args["num_classes"], n)
    net = peers.single_network(peer - 1)
    kwargs = {}
    if arch in ("resnet18", "resnet34"):
        kwargs["stem"] = "small" if net.stem[0].kernel_size == (3, 3) else "imagenet"
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    check = create_model(arch, num_classes=args["num_classes"], **kwargs)
    check.load_state_dict(weights)        # the exported state is exactly that backbone's
    fmt = "models"
    if arch in TORCHVISION:
        weights, fmt = to_torchvision_state(arch, weights, args["num_classes"]), "torchvision"
    return {"arch": arch, "num_classes": args["num_classes"], "classes": ckpt.get("classes"),
            "model_kwargs": kwargs, "format": fmt, "state_dict": weights, "preprocessing": preprocessing(ckpt),
            "source": {"checkpoint": str(checkpoint), "method": ckpt["method"], "epoch": ckpt["epoch"],
                       "peer": peer, "from": source, "head": head, "top1": top1, "evaluated": evaluated,
                       "run_arch": args["arch"]}}


def input_transform(pre: dict):
    """The torchvision transform, RGB ``PIL.Image`` -> normalised 3 x S x S tensor, of an export's
    ``preprocessing`` (:func:`preprocessing`): the run's test transform (data/folder.py's ``frame``, data/imagenet.py's
    ``test_transform``, Fashion-MNIST's grey 28 x 28 padded to 32 as data/fashion_mnist.py pads it), for a new
    image. A preprocessing that does not know the size or the mean and std is a ValueError saying what is unknown."""
    if pre.get("image_size") is None or pre.get("mean") is None:
        raise ValueError(f"this export does not know how its inputs were prepared: {pre.get('unknown')}")
    s, mean, std = pre["image_size"], pre["mean"], pre["std"]
    info = DatasetInfo(pre["dataset"], 0, s, tuple(mean), tuple(std), 0, protocol=pre["protocol"])
    if info.protocol == "imagenet":
        return test_transform(s, info.test_resize, mean, std)
    framing = ([transforms.Grayscale(1), transforms.Resize((s - 4, s - 4)), transforms.Pad(2), transforms.Grayscale(3)]
               if pre["dataset"] == "fashion-mnist" else [frame(info)])
    return transforms.Compose(framing + [transforms.ToTensor(), transforms.Normalize(mean, std)])


def load_exported(path: Path) -> torch.nn.Module:
    """The network an export file holds: a ``models`` Backbone, or the ``torchvision.models`` network."""
    d = torch.load(path, map_location="cpu", weights_only=True)
    if d["format"] == "torchvision":
        net = TORCHVISION[d["arch"]][0](weights=None, num_classes=d["num_classes"])
    else:
        net = create_model(d["arch"], num_classes=d["num_classes"], **d["model_kwargs"])
    net.load_state_dict(d["state_dict"])
    return net


def check_output(path: Path, force: bool, checkpoint: Optional[Path] = None) -> None:
    """Refuse (one-line UserError naming the file) an output that data.files.output_problem refuses (the
    ``checkpoint`` read, a run directory's own file, a folder, an existing file without ``force``, ...) or
    that is named like a run's checkpoint (last.pt, best.pt) anywhere, even with ``force``: an export posing
    as a checkpoint would be taken for one (``--resume auto`` reads a folder's last.pt)."""
    if path.name.lower() in RUN_CHECKPOINTS:        # (a case-insensitive disk: LAST.PT is last.pt)
        raise UserError(f"-o {path}: {path.name} is the name of a run's checkpoint, which an export must not pose "
                        "as (--resume auto reads a folder's last.pt); give another file name (e.g. peer.pt), "
                        "--force or not")
    reads = [("the checkpoint being read", checkpoint)] if checkpoint is not None else []
    problem = output_problem(path, "-o", force, "peer.pt", reads)
    if problem:
        raise UserError(problem)


def write_export(obj: dict, path: Path, force: bool = False) -> None:
    """Write the export (with its content checksum, as checkpoints carry) to ``path`` atomically (data.files'
    ``write_atomically``: ``path`` is the old file or the whole new one). Without ``force`` no file is ever
    replaced, not even one that appeared meanwhile. OS errors: a one-line UserError naming the file."""
    buffer = checksummed(obj)
    try:
        write_atomically(path, "wb", lambda f: f.write(buffer.getbuffer()), replace=force)
    except NameTaken:
        raise UserError(f"-o {path} exists (it appeared while exporting); add --force to replace it, or give "
                        "another file name") from None
    except OSError as e:
        where = e.filename or path
        problem = (f"{where} is a file, not a folder" if e.errno in (errno.EEXIST, errno.ENOTDIR)
                   else f"{e.strerror or e} ({where})")
        raise UserError(f"cannot write -o {path}: {problem}; choose another file name or folder") from None


def input_line(pre: dict) -> str:
    """The printed line of the export's ``preprocessing``: what a new image goes through, and what is unknown."""
    numbers = lambda values: "[" + ", ".join(f"{v:.4f}" for v in values) + "]"  # noqa: E731
    steps = [pre["test"]] if pre["test"] else []
    steps.append(f"ToTensor() + Normalize({numbers(pre['mean'])}, {numbers(pre['std'])})" if pre["mean"] is not None
                 else "ToTensor() + Normalize(mean and std unknown)")
    line = f"Input ({pre['dataset'] or 'dataset unknown'}, as the run evaluated it): {', then '.join(steps)}"
    return line + (f". Unknown: {pre['unknown']}" if pre["unknown"] else "")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=path_given, help="a run's best.pt or last.pt")
    p.add_argument("--peer", type=positive_int, required=True, help="which peer, 1-based (head peerN)")
    p.add_argument("-o", "--output", type=non_empty_path, required=True,
                   help="file to write (an existing file is refused unless --force; never the checkpoint read, "
                        "a file named last.pt or best.pt, nor one of a run directory's own files)")
    p.add_argument("--force", action="store_true", help="replace the -o file if it exists")
    p.add_argument("--from", dest="source", default="model",
                   help="which state of the checkpoint: 'model' (the trained network) or an extra module such "
                        "as PCL's 'mean_teacher'")
    p.add_argument("--head", default=None,
                   help="head whose recorded accuracy to report and store with the weights (default: the head of "
                        "peer N of the --from state: peerN for 'model', mean_peerN for 'mean_teacher'); the head "
                        "of another peer or of another state is refused")
    a = p.parse_args(argv)
    try:
        check_output(Path(a.output), a.force, a.checkpoint)     # before the checkpoint is read
        out = export_peer(a.checkpoint, a.peer, a.source, a.head)
        write_export(out, Path(a.output), a.force)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = out["source"]
    single = [h for h in s["evaluated"] if h not in COMBINED]
    acc = ", ".join(f"{split} top-1 {v:.2f}" for split, v in s["top1"].items()) or (
        f"no accuracy recorded under head {s['head']} (the run evaluated {', '.join(single)} as single networks: "
        "--head names this peer's)" if single else "no accuracy recorded")
    load = (f"torchvision.models.{out['arch']}(num_classes={out['num_classes']})" if out["format"] == "torchvision"
            else f"models.create_model('{out['arch']}', num_classes={out['num_classes']}"
                 + "".join(f", {k}={v!r}" for k, v in out["model_kwargs"].items()) + ")")
    print(f"{a.output}: head {s['head']} of the {s['method']} run ({s['run_arch']}, epoch {s['epoch']}): "
          f"{out['arch']}, {acc}. Load: {load}.load_state_dict(torch.load(path)['state_dict'])")
    print(input_line(out["preprocessing"]))
    return 0


if __name__ == "__main__":
    run_tool(main)
