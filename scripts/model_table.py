#!/usr/bin/env python
"""Parameters and multiply-adds of every registered backbone, and of its N-peer topologies.

Usage::

    python scripts/model_table.py                          # every backbone, N = 2 and 4
    python scripts/model_table.py --arch resnet32 vgg16 --peers 4

Each backbone is counted at its native input size (``model_entry(name).image_size``) with 100 classes
for the 32x32 (CIFAR-size) nets and 1000 for the 224x224 ImageNet ResNets; the class count is printed
on every row. MACs come from ``models.complexity.count_macs`` (``torch.utils.flop_counter.FlopCounterMode``
FLOPs / 2). The models are built on the ``meta`` device, so nothing is allocated or computed.

The peer table gives the whole N-peer model (``models.peers.Peers``): ``independent`` (N full
networks), ``shared`` at the ``dml`` split (DML / MCL-OKD) and at the ``one`` split (ONE / OKDDip), and
the CL-ILR ``tree`` (trunk at the ``dml`` split, ceil(N/2) one-stage groups, N branches).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import UnknownModelError, create_model, list_models, model_entry  # noqa: E402
from models.complexity import count_macs, count_parameters  # noqa: E402
from models.peers import Peers  # noqa: E402

HEADER = """\
Parameters: every parameter (trainable or not; BN affine included, buffers such as BN running stats
excluded), as the official cal_param_size.
MACs: multiply-adds of one forward pass per sample = torch.utils.flop_counter.FlopCounterMode FLOPs / 2.
FlopCounterMode counts convolutions and matrix products (Linear/addmm, mm, bmm) at 2 FLOPs per
multiply-add; BatchNorm, activations, pooling, softmax, element-wise gates, additions and biases are NOT
counted. That equals the official cal_multi_adds rule (Conv2d + Linear, winycg/MCL-OKD utils.py) except
for dilated convs, which are counted at their true output size here (hcgnet_a1: 154,269,036 here,
154,671,444 by the official counter).
Input: each backbone's native size (32x32 CIFAR nets, 224x224 ImageNet ResNets); classes: 100 for the
32x32 nets, 1000 for the 224x224 nets (column "classes")."""

# (label, topology, split) for the peer table; the tree's trunk is the 'dml' split.
TOPOLOGY_ROWS = (("independent", "independent", None), ("shared dml", "shared", "dml"),
                 ("shared one", "shared", "one"), ("tree (CL-ILR)", "tree", None))


def native_setup(name: str) -> tuple[int, int]:
    """(input size, class count) a backbone is tabulated at: 32 -> 100 classes, 224 -> 1000 classes."""
    size = model_entry(name).image_size
    return size, (1000 if size >= 128 else 100)


def backbone_row(name: str) -> dict:
    size, classes = native_setup(name)
    with torch.device("meta"):
        model = create_model(name, num_classes=classes)
    return {"name": name, "size": size, "classes": classes, "params": count_parameters(model),
            "macs": count_macs(model, size), "stages": model.num_stages}


def peer_rows(name: str, num_peers: int, single: dict) -> list[dict]:
    size, classes = single["size"], single["classes"]
    rows = []
    for label, topology, split in TOPOLOGY_ROWS:
        if topology == "tree" and (num_peers < 2 or single["stages"] < 2):
            continue
        with torch.device("meta"):
            peers = Peers(name, classes, num_peers, topology, split)
        params, macs = count_parameters(peers), count_macs(peers, size)
        rows.append({"name": name, "N": num_peers, "topology": label,
                     "trunk": "-" if topology == "independent" else str(peers.split),
                     "params": params, "macs": macs,
                     "params_ratio": params / single["params"], "macs_ratio": macs / single["macs"]})
    return rows


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", default=None, metavar="NAME",
                        help="backbones to tabulate (default: every registered one)")
    parser.add_argument("--peers", nargs="+", type=int, default=[2, 4], metavar="N",
                        help="peer counts for the topology table (default: 2 4)")
    args = parser.parse_args(argv)
    names = args.arch or list_models()
    for name in names:
        try:
            model_entry(name)
        except UnknownModelError as err:
            parser.error(str(err))
    if any(n < 1 for n in args.peers):
        parser.error("--peers needs positive peer counts")

    print(HEADER)
    print()
    print("## Backbones")
    print()
    singles = [backbone_row(name) for name in names]
    print(markdown(["backbone", "input", "classes", "params", "MACs"],
                   [[s["name"], f"{s['size']}x{s['size']}", str(s["classes"]), f"{s['params']:,}",
                     f"{s['macs']:,}"] for s in singles]))
    print()
    print("## Peer topologies (whole N-peer model)")
    print()
    print("trunk = stages in the shared trunk (the stem is always in it); the tree adds one group stage per")
    print("pair of branches after its trunk. 'x single' = total / the single backbone of the row above.")
    print()
    rows = [row for s in singles for n in args.peers for row in peer_rows(s["name"], n, s)]
    print(markdown(["backbone", "classes", "N", "topology", "trunk stages", "params", "MACs",
                    "params x single", "MACs x single"],
                   [[r["name"], str(native_setup(r["name"])[1]), str(r["N"]), r["topology"], r["trunk"],
                     f"{r['params']:,}", f"{r['macs']:,}", f"{r['params_ratio']:.2f}", f"{r['macs_ratio']:.2f}"]
                    for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
