"""Training throughput: the official repositories' loop against this engine, same method, model and weights.

    python scripts/benchmark.py --method dml --arch resnet32 --peers 2            # on the GPU if there is one
    python scripts/benchmark.py --method mcl_okd --arch resnet32 --peers 4 --batch-size 128
    python scripts/benchmark.py --arch resnet20 --batch-size 32 --steps 10 --device cpu   # tiny CPU run

Reference loop (what the official CIFAR scripts do): torchvision PIL transforms (RandomCrop(32, padding 4),
RandomHorizontalFlip, ToTensor, Normalize) in a DataLoader with the official worker count (0; 8 for
MCL-OKD, whose dataset also draws K class negatives per sample with ``np.random.choice`` over a
49,500-index pool, as CRD's CIFAR100InstanceSample does), fp32, one-parameter-at-a-time SGD as in the
torch of those codes, the method's loss, and a ``loss.item()`` every step. Its loss terms are this
repository's (on-device negatives, no per-step ``.item()`` inside the loss), so the reference is if
anything faster than the official code and the ratios are conservative.

Engine: ``Trainer.train_epoch`` itself (data resident on the device, batched on-device augmentation and
metric accumulation) with its defaults, and with the options of each configuration (``--configs``):
``channels_last``, ``bf16``, ``compile``, ``compile-ro`` (mode reduce-overhead), ``grouped``
(--grouped-peers), ``cudagraph``, ``foreach`` / ``for-loop`` (--sgd-impl), joined by '+'.
Every configuration starts from the same initial weights; images/s counts peers x images; s/epoch and the
300-epoch time are projected for a 50,000-image CIFAR epoch (training only, drop_last). On the CPU,
ops/step counts the aten operators one training step dispatches (loader excluded): on a GPU each is at
least one kernel launch, which is what bounds thin peers at batch 64-128.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
import warnings
from pathlib import Path
from typing import NoReturn, Optional

REPO = Path(__file__).resolve().parent.parent
if __name__ == "__main__":     # run as a file: the repository's packages are one folder up (imported: already found)
    sys.path.insert(0, str(REPO))
from engine import Method, Trainer, UserError, parse_args  # noqa: E402
from engine.config import resolve  # noqa: E402
from engine.method import load_method  # noqa: E402
from engine.cli import (MAX_PEERS, HelpFormatter, Parser, arch_list, build_parser, non_negative_int,  # noqa: E402
                        number, path_given, peer_count, positive_int, process_count, run_tool)
from data.files import NameTaken, os_error_message, output_problem, write_atomically  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torchvision import transforms  # noqa: E402

from data.loaders import Batch  # noqa: E402
from data.synthetic import N_TRAIN as SYNTHETIC_TRAIN  # noqa: E402

class RawDescriptionHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every option's default once."""


CIFAR_TRAIN = 50_000
OFFICIAL_WORKERS = {"mcl_okd": 8}            # winycg/MCL-OKD main_cifar_*.py: the others use 0
CIFAR100_NEGATIVE_POOL = 49_500              # CIFAR-100 samples of the other 99 classes
OPTIONS = {
    "channels_last": ["--channels-last"], "bf16": ["--amp", "bf16"], "compile": ["--compile"],
    "compile-ro": ["--compile", "reduce-overhead"], "grouped": ["--grouped-peers"], "cudagraph": ["--cuda-graph"],
    "foreach": ["--sgd-impl", "foreach"], "for-loop": ["--sgd-impl", "for-loop"], "fp16": ["--amp", "fp16"],
    "compile-max": ["--compile", "max-autotune"],
}


class PILImages(Dataset):
    """What torchvision's CIFAR100 does per sample (uint8 HWC array -> PIL image -> transforms), returning
    (image or views, label, index); with ``negatives`` it also draws them as CRD's instance-sample dataset."""

    def __init__(self, images_u8: torch.Tensor, labels: torch.Tensor, transform, views: int = 1, negatives: int = 0):
        self.images = images_u8.permute(0, 2, 3, 1).numpy()
        self.labels = labels.numpy()
        self.transform, self.views, self.negatives = transform, views, negatives
        self.pool = np.arange(CIFAR100_NEGATIVE_POOL)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i])
        x = self.transform(img) if self.views == 1 else [self.transform(img) for _ in range(self.views)]
        if self.negatives:
            np.random.choice(self.pool, self.negatives, replace=False)   # the cost; our loss samples on device
        return x, int(self.labels[i]), i


class OpCounter(TorchDispatchMode):
    """Counts the aten operators a step dispatches: on a GPU each is at least one kernel launch. Backward
    runs on the calling thread only on the CPU, so the count is taken on the CPU."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_step(method: Method, images, labels, info, args, device, warmup: int = 3) -> tuple[float, Optional[int]]:
    """(seconds per step, aten operators per step on the CPU) of the official-style loop."""
    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(info.mean, info.std)])
    negatives = method.args.nce_k if method.name == "mcl_okd" else 0
    loader = DataLoader(PILImages(images, labels, tf, method.args.views, negatives), batch_size=args.batch_size,
                        shuffle=True, num_workers=args.workers, pin_memory=device.type == "cuda", drop_last=True,
                        persistent_workers=args.workers > 0)
    opts = [torch.optim.SGD(g.params, lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True, foreach=False)
            for g in method.optim_groups()]
    method.model.train()

    def batches():
        while True:
            yield from loader

    def step(batch):
        terms = method.loss(method.model, batch, 0)
        loss = sum(terms.values())
        for opt in opts:
            opt.zero_grad()
        loss.backward()
        for opt in opts:
            opt.step()
        loss.item()  # the official scripts log the running loss every step

    it = batches()
    for i in range(warmup + args.steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        x, y, idx = next(it)
        x = [v.to(device) for v in x] if isinstance(x, list) else x.to(device)
        step(Batch(x, y.to(device), idx.to(device)))
    seconds = (time.perf_counter() - start) / args.steps
    ops = None
    if device.type == "cpu":
        with OpCounter() as counter:
            step(Batch(x, y.to(device), idx.to(device)))
        ops = counter.count
    return seconds, ops


def config_flags(config: str) -> list[str]:
    return [] if config == "default" else [flag for option in config.split("+") for flag in OPTIONS[option]]


def fail(message: str) -> NoReturn:
    """Stop with one line on stderr and exit status 2, as every script does on bad input."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def make_trainer(method_cls, args, extra: list[str]) -> Trainer:
    try:
        return _make_trainer(method_cls, args, extra)
    except UserError as e:
        fail(str(e))


def _make_trainer(method_cls, args, extra: list[str]) -> Trainer:
    """A Trainer of ``method_cls`` on synthetic data: epochs of min(--steps, 100) steps, as many as the synthetic
    training set holds (engine_step runs as many epochs as --steps needs)."""
    return Trainer(method_cls, parse_args(method_cls, trainer_argv(method_cls, args, extra)))


def trainer_argv(method_cls, args, extra: list[str]) -> list[str]:
    """The command line of :func:`_make_trainer`'s Trainer: its budget, --method-args, then ``extra``."""
    steps_per_epoch = min(args.steps, 100, SYNTHETIC_TRAIN // args.batch_size)
    argv = ["--dataset", "synthetic", "--arch", args.arch, "--batch-size", str(args.batch_size),
            "--gpu", "0" if args.device.type == "cuda" else "-1", "--no-progress", "--epochs", "1000",
            "--subset", str(args.batch_size * steps_per_epoch), "--lr", "0.05"]
    if args.peers is not None and method_cls.num_peers is not None:     # (else the method's, or an --arch list's)
        argv += ["--num-peers", str(args.peers)]
    return argv + args.method_args.split() + extra


def engine_step(trainer: Trainer, steps: int) -> tuple[float, Optional[int]]:
    """(seconds per step, aten operators per step on the CPU) of ``Trainer.train_epoch``."""
    trainer.train_epoch(0)   # warm-up: cuDNN autotuning, compilation, graph capture
    done, seconds, epoch = 0, 0.0, 1
    while done < steps:
        _, speed = trainer.train_epoch(epoch)
        done += len(trainer.loaders.train)
        seconds += speed["epoch_s"]
        epoch += 1
    ops = None
    if trainer.device.type == "cpu":
        batch = next(iter(trainer.loaders.train))
        with OpCounter() as counter:
            trainer.train_batch(batch, epoch)
        ops = counter.count
    return seconds / done, ops


def peak_memory_mib(device):
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def profile(trainer: Trainer, steps: int, device) -> None:
    """Where a step's time goes: the top operators, and how busy the device is."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    loader = trainer.loaders.train
    loader.set_epoch(10_000)
    it = iter(loader)
    batches = [next(it) for _ in range(min(steps, len(loader)))]
    sync(device)
    with torch_profile(activities=activities) as prof:
        start = time.perf_counter()
        for batch in batches:  # epoch 0: the epoch its graph (if any) was captured for in the warm-up
            trainer.train_batch(batch, 0)
        sync(device)
        wall = time.perf_counter() - start
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    print(events.table(sort_by=key, row_limit=15))
    if device.type == "cuda":
        busy = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in events) / 1e6
        kernels = sum(e.count for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
        print(f"profile: {len(batches)} steps, wall {wall * 1e3 / len(batches):.2f} ms/step, device busy "
              f"{busy * 1e3 / len(batches):.2f} ms/step ({100 * busy / wall:.0f}%), "
              f"{kernels / len(batches):.0f} device ops/step")


# The training flags the benchmark sets itself (trainer_argv, OPTIONS): --method-args may not change them, since
# the table's label and images/s are computed from the benchmark's own values.
BENCHMARK_FLAGS = ("--dataset", "--arch", "--batch-size", "--gpu", "--no-progress", "--epochs", "--subset", "--lr",
                   "--num-peers", *dict.fromkeys(f for flags in OPTIONS.values() for f in flags if f.startswith("--")))


def check_arguments(a) -> None:
    """What is refused before anything is built or timed (one line, exit status 2): --force without --json, a
    --json file that cannot be written (data.files.output_problem), --device cuda without a GPU, a --configs
    option that does not exist or a --configs that names none."""
    if a.force and a.json is None:
        fail("--force replaces an existing --json file; give --json PATH too, or leave --force out")
    problem = a.json is not None and output_problem(a.json, "--json", a.force, "benchmark.json")
    if problem:
        fail(problem)
    if a.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: this machine has no CUDA GPU that torch can use (torch.cuda.is_available() is False); "
             "use --device cpu, or run it on a GPU machine")
    configs = [c for c in a.configs.split(",") if c]
    if not configs:
        fail(f"--configs {a.configs!r} names no configuration; e.g. --configs default,grouped")
    for c in configs:
        unknown = [o for o in c.split("+") if o not in OPTIONS and c != "default"]
        if unknown:
            fail(f"unknown option(s) {unknown} in --configs; known: default, {', '.join(OPTIONS)}")


def write_json(path: Path, content: dict, force: bool) -> None:
    """The rows as JSON, whole or not at all (data.files.write_atomically; missing folders are created). Without
    ``force`` no file is replaced, not even one that appeared while the benchmark ran. A failure is one line: the
    table is printed above, so nothing measured is lost."""
    text = json.dumps(content, indent=2) + "\n"
    try:
        write_atomically(path, "w", lambda f: f.write(text), replace=force)
    except NameTaken:
        fail(f"--json {path} appeared while the benchmark ran; the table is above (add --force to replace the "
             "file, or give another name)")
    except OSError as e:
        fail(f"{os_error_message(path, e, '--json')}; the table is above")


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    p.add_argument("--method", default="dml", help="train_<method>.py to benchmark: dml, mcl_okd, one, okddip, ...")
    p.add_argument("--arch", type=arch_list, default="resnet32", help="backbone(s), as the training scripts' --arch")
    p.add_argument("--peers", type=number(int, at_least=1, at_most=MAX_PEERS, why="the training scripts' bound"),
                   default=None, help="--num-peers (default: the method's)")
    p.add_argument("--batch-size", type=number(int, at_least=1, at_most=SYNTHETIC_TRAIN,
                                               why="the synthetic training images a batch is drawn from"),
                   default=128)
    p.add_argument("--method-args", default="", help="more flags for the method, e.g. '--topology independent' "
                   "(write --method-args=--flag when it is one flag starting with a dash)")
    p.add_argument("--steps", type=positive_int, default=100, help="timed steps per configuration")
    p.add_argument("--workers", type=process_count("reference DataLoader workers"), default=None,
                   help="reference DataLoader workers (default: the official code's, 8 for mcl_okd, else 0)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--configs", default="default,grouped,bf16,channels_last,bf16+channels_last+grouped",
                   help="engine configurations, comma-separated: 'default' or options joined by '+': "
                        + ", ".join(OPTIONS))
    p.add_argument("--skip-reference", action="store_true", help="engine rows only")
    p.add_argument("--profile", type=non_negative_int, default=0, metavar="STEPS",
                   help="profile STEPS steps of the fastest engine configuration")
    p.add_argument("--json", type=path_given, default=None, metavar="PATH",
                   help="also write the rows as JSON (checked before the benchmark runs; an existing file is "
                        "refused unless --force, a run directory's own files always)")
    p.add_argument("--force", action="store_true", help="replace the --json file if it exists")
    a = p.parse_args(argv)
    check_arguments(a)
    a.device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                            "cpu" if a.device == "auto" else a.device)
    if a.workers is None:
        a.workers = OFFICIAL_WORKERS.get(a.method, 0)
    try:
        method_cls = load_method(a.method)
    except UserError as e:
        fail(str(e))
    options = build_parser(method_cls, method_cls.recipe)._option_string_actions
    for token in a.method_args.split():   # a flag the benchmark sets (BENCHMARK_FLAGS), as argparse reads it
        name = token.split("=")[0]
        read_as = [name] if name in options else [o for o in options if o.startswith(name)]   # (--batch: abbreviated)
        if len(read_as) == 1 and read_as[0] in BENCHMARK_FLAGS:
            fail(f"--method-args {a.method_args}: the benchmark sets {read_as[0]} itself (its table states --arch, "
                 "--batch-size, --peers and --configs; the data, epochs, subset, lr and device are its own); leave "
                 "it out of --method-args")
    if not a.skip_reference and method_cls.loss is Method.loss:
        fail(f"train_{a.method}.py trains with a train_step of its own, without the loss() the reference loop calls; "
             "add --skip-reference (the engine's rows only)")
    if a.peers is not None and method_cls.num_peers is None:
        fail(f"--peers {a.peers}: train_{a.method}.py trains a single network; leave --peers out")
    if a.peers is not None:
        try:
            peer_count(method_cls)(str(a.peers))
        except argparse.ArgumentTypeError as e:
            fail(f"--peers {a.peers}: {e}")
    configs = [c for c in a.configs.split(",") if c]
    for config in configs:       # every configuration's flags, refused before anything is built or timed
        try:
            with warnings.catch_warnings():           # (said once, when its trainer is built)
                warnings.simplefilter("ignore")
                resolve(method_cls, parse_args(method_cls, trainer_argv(method_cls, a, config_flags(config))))
        except UserError as e:
            fail(f"--configs {config}: {e}")

    start_mib = torch.cuda.memory_allocated(a.device) / 2**20 if a.device.type == "cuda" else 0.0
    first = make_trainer(method_cls, a, [])
    first_mib = (torch.cuda.memory_allocated(a.device) / 2**20 - start_mib) if a.device.type == "cuda" else 0.0
    init_state = copy.deepcopy({k: m.state_dict() for k, m in first.modules.items()})
    rows = []
    def memory_mark() -> float:
        """Reset the peak; the memory already held (MiB) is not counted in the next row's peak."""
        if a.device.type != "cuda":
            return 0.0
        gc.collect()   # a finished trainer is a reference cycle (through its graphed step)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(a.device)
        return torch.cuda.memory_allocated(a.device) / 2**20

    def row(loop: str, sec: float, ops, held: float) -> dict:
        peak = peak_memory_mib(a.device)
        return {"loop": loop, "s_per_step": sec, "ops_per_step": ops, "peak_mib": None if peak is None else peak - held}

    if not a.skip_reference:
        held = memory_mark()
        ref = copy.deepcopy(first.method)
        split = first.loaders.train
        sec, ops = reference_step(ref, split.images.cpu(), split.labels.cpu(), first.loaders.info, a, a.device)
        rows.append(row(f"reference ({a.workers} workers)", sec, ops, held))
        del ref
    for config in configs:
        held = memory_mark() - (first_mib if config == "default" else 0.0)   # default: the first trainer itself
        trainer = first if config == "default" else make_trainer(method_cls, a, config_flags(config))
        if "grouped" not in config.split("+"):
            trainer.load_method_state(init_state, "the first trainer's weights")   # grouped: converted
        sec, ops = engine_step(trainer, a.steps)
        rows.append(row(f"engine {config}", sec, ops, held))
        del trainer

    peers = first.args.num_peers if method_cls.num_peers is not None else 1
    name = torch.cuda.get_device_name(a.device) if a.device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    ref_sec = rows[0]["s_per_step"] if not a.skip_reference else None
    steps_per_epoch = CIFAR_TRAIN // a.batch_size
    print(f"{method_cls.name} {peers} x {a.arch}, batch {a.batch_size}, {name}, torch {torch.__version__}")
    print(f"{'loop':<44} {'images/s':>9} {'ms/step':>8} {'s/epoch':>8} {'300 ep':>8} {'ops/step':>8} "
          f"{'peak MiB':>9} {'vs ref':>7}")
    for r in rows:
        r["images_per_s"] = peers * a.batch_size / r["s_per_step"]
        r["s_per_epoch"] = steps_per_epoch * r["s_per_step"]
        r["minutes_300_epochs"] = 300 * r["s_per_epoch"] / 60
        r["vs_reference"] = ref_sec / r["s_per_step"] if ref_sec else None
        mem = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        ratio = f"{r['vs_reference']:.2f}x" if r["vs_reference"] else "-"
        ops = str(r["ops_per_step"]) if r["ops_per_step"] is not None else "-"
        print(f"{r['loop']:<44} {r['images_per_s']:9.0f} {r['s_per_step'] * 1e3:8.2f} {r['s_per_epoch']:8.2f} "
              f"{r['minutes_300_epochs']:7.1f}m {ops:>8} {mem:>9} {ratio:>7}")
    if a.json:
        write_json(a.json, {"method": method_cls.name, "arch": a.arch, "peers": peers, "batch_size": a.batch_size,
                            "device": name, "torch": torch.__version__, "rows": rows}, a.force)
    if a.profile:
        best = min(rows[0 if a.skip_reference else 1:], key=lambda r: r["s_per_step"])["loop"][len("engine "):]
        trainer = make_trainer(method_cls, a, config_flags(best))
        trainer.train_epoch(0)
        print(f"\nprofile of engine {best}:")
        profile(trainer, a.profile, a.device)

if __name__ == "__main__":
    run_tool(main)
