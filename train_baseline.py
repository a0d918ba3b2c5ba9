"""Baseline: one network trained alone with cross-entropy.

    python train_baseline.py --arch resnet32 --gpu 0
"""

import torch.nn.functional as F

from engine import Method, main
from models import create_model


class Baseline(Method):
    """Baseline: a single network trained with cross-entropy (the reference every OKD method is compared to)."""

    num_peers = None
    best_metric = "net"

    def build(self):
        return create_model(self.args.arch, num_classes=self.num_classes, image_size=self.image_size)

    def loss(self, model, batch, epoch):
        return {"ce": F.cross_entropy(model(batch.images), batch.labels)}


if __name__ == "__main__":
    main(Baseline)
