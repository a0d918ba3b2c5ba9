"""Training throughput: the official repositories' loop against this engine, same model, same weights.

    python scripts/benchmark.py --arch resnet32 --peers 2                 # on the GPU if there is one
    python scripts/benchmark.py --arch resnet20 --batch-size 32 --steps 10 --device cpu   # tiny CPU run

Reference loop (what the official DML / MCL-OKD CIFAR scripts do): torchvision PIL transforms
(RandomCrop(32, padding 4), RandomHorizontalFlip, ToTensor, Normalize) in a DataLoader with 0 workers,
fp32, the N peers' losses written as in main_cifar_dml.py, and a ``loss.item()`` every step.
Engine: ``Trainer.train_epoch`` itself (GPU-resident uint8 data, on-device augmentation and metric
accumulation) with its defaults and with each speed option. Both train DML peers of the same backbone from
the same initial weights on CIFAR-shaped synthetic data. images/s counts peers x images.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_dml  # noqa: E402
from engine import Trainer, parse_args  # noqa: E402


class PILImages(Dataset):
    """What torchvision's CIFAR100 does per sample: a uint8 HWC array -> PIL image -> transforms."""

    def __init__(self, images_u8: torch.Tensor, labels: torch.Tensor, transform):
        self.images = images_u8.permute(0, 2, 3, 1).numpy()
        self.labels = labels.numpy()
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def reference_steps(model, images, labels, info, batch_size, steps, device, T=1.0):
    """The official-style loop; returns seconds per step after one warm-up step."""
    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(info.mean, info.std)])
    loader = DataLoader(PILImages(images, labels, tf), batch_size=batch_size, shuffle=True, num_workers=0,
                        pin_memory=device.type == "cuda", drop_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    kl = torch.nn.KLDivLoss(reduction="batchmean")
    model.train()
    times, it = [], iter(loader)
    for step in range(steps + 1):
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        start = time.perf_counter()
        x, y = x.to(device), y.to(device)
        logits = model(x).logits
        loss = 0
        for i, z in enumerate(logits):
            loss = loss + F.cross_entropy(z, y)
            for j, t in enumerate(logits):
                if j != i:
                    loss = loss + kl(F.log_softmax(z / T, 1), F.softmax(t.detach() / T, 1)) * T * T / (len(logits) - 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()  # the official scripts log the running loss every step
        if step:
            times.append(time.perf_counter() - start)
    # Data loading is inside the step in the official loop: time it as such.
    return (sum(times) + _data_time(loader, steps)) / steps


def _data_time(loader, steps):
    start, it = time.perf_counter(), iter(loader)
    for _ in range(steps):
        try:
            next(it)
        except StopIteration:
            it = iter(loader)
    return time.perf_counter() - start


def engine_trainer(base_args, extra):
    args = parse_args(train_dml.DML, base_args + extra)
    trainer = Trainer(train_dml.DML, args)
    return trainer


def peak_memory(device):
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
    return "-"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet32")
    p.add_argument("--peers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=50, help="timed steps per configuration")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--configs", default="default,channels_last,bf16,bf16+channels_last",
                   help="engine configurations, comma-separated; options joined by '+': "
                        "channels_last, bf16, compile")
    a = p.parse_args(argv)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          "cpu" if a.device == "auto" else a.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    n_images = a.batch_size * (a.steps + 1)
    base = ["--dataset", "synthetic", "--arch", a.arch, "--num-peers", str(a.peers), "--batch-size",
            str(a.batch_size), "--gpu", "0" if device.type == "cuda" else "-1", "--no-progress",
            "--subset", str(min(n_images, 2048)), "--epochs", "1000"]

    # The engine's model, and a copy of its initial weights for the reference loop.
    first = engine_trainer(base, [])
    init_state = copy.deepcopy(first.method.model.state_dict())
    split = first.loaders.train
    images, labels = split.images.cpu(), split.labels.cpu()
    ref_model = copy.deepcopy(first.method.model).to(device)
    ref_model.load_state_dict(init_state)
    ref = reference_steps(ref_model, images, labels, first.loaders.info, a.batch_size, a.steps, device)
    rows = [("reference (official loop)", ref, peak_memory(device))]
    del ref_model

    for config in a.configs.split(","):
        opts = [] if config == "default" else config.split("+")
        extra = (["--channels-last"] if "channels_last" in opts else []) + \
                (["--amp", "bf16"] if "bf16" in opts else []) + (["--compile"] if "compile" in opts else [])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer = engine_trainer(base, extra)
        trainer.method.model.load_state_dict(init_state)
        trainer.train_epoch(0)  # warm-up (and compilation)
        steps, seconds = 0, 0.0
        epoch = 1
        while steps < a.steps:
            stats = trainer.train_epoch(epoch)
            steps += len(trainer.loaders.train)
            seconds += stats["epoch_s"]
            epoch += 1
        rows.append((f"engine {config}", seconds / steps, peak_memory(device)))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"DML {a.peers} x {a.arch}, batch {a.batch_size}, {name}, torch {torch.__version__}")
    print(f"{'loop':<32} {'images/s':>10} {'ms/step':>9} {'peak mem':>10} {'vs reference':>13}")
    for label, sec, mem in rows:
        print(f"{label:<32} {a.peers * a.batch_size / sec:10.0f} {sec * 1000:9.1f} {mem:>10} {ref / sec:12.2f}x")


if __name__ == "__main__":
    main()
