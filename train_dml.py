"""Deep Mutual Learning (Zhang et al., CVPR 2018): N peers, each learning from the labels and from
every other peer.

    L = sum_i CE(z_i, y) + sum_i 1/(N-1) sum_{j != i} KD_T(z_i <- stopgrad z_j)

    python train_dml.py --arch resnet32 --gpu 0                      # the paper: 2 independent peers, T=1
    python train_dml.py --arch resnet32 --gpu 0 --preset mcl-okd     # MCL-OKD repository: 4 branches, shared trunk, T=2
    python train_dml.py --arch resnet32,wrn_16_2 --gpu 0             # two peers of different architectures
"""

import torch.nn.functional as F

from engine import Method, UserError, main, temperature
from losses.peer_targets import mutual_kd
from models.peers import Peers


class DML(Method):
    """Deep Mutual Learning: peers trained together, each distilling from all the others."""

    num_peers = 2
    min_peers = 2
    mixed_archs = True
    presets = {
        "paper": dict(topology="independent", num_peers=2, kd_T=1.0),
        "mcl-okd": dict(topology="shared", num_peers=4, kd_T=2.0),
    }

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument("--kd-T", type=temperature, help="distillation temperature T")
        parser.add_argument("--topology", choices=("independent", "shared"),
                            help="independent networks, or a shared trunk of all but the last two stages (the "
                                 "MCL-OKD repository's DML models)")

    @classmethod
    def check_args(cls, args):
        if "," in args.arch and args.topology == "shared":
            preset = f" (--preset {args.preset}'s)" if cls.presets[args.preset]["topology"] == "shared" else ""
            raise UserError(f"--arch {args.arch} with --topology shared{preset}: shared-trunk peers have one "
                            "architecture; use --topology independent or one name")

    def build(self):
        a = self.args
        split = "dml" if a.topology == "shared" else None
        return Peers(a.arch, self.num_classes, a.num_peers, a.topology, split, image_size=self.image_size)

    def loss(self, model, batch, epoch):
        logits = model(batch.images).logits
        n, T = len(logits), self.args.kd_T
        ce = sum(F.cross_entropy(z, batch.labels) for z in logits)
        return {"ce": ce, "kd": mutual_kd(logits, T) / (n - 1)}


if __name__ == "__main__":
    main(DML)
