"""Peak memory of one MCL-OKD contrastive step (scores of the N(N-1) directed pairs, NCE, backward):
the official way (each gathered block of memory rows kept for backward) against losses/contrast_memory.py
(rows gathered again in backward, in chunks).

    python scripts/mcl_memory.py                       # B=64, K=16384, N=4, d=128, n_data=50000, CPU
    python scripts/mcl_memory.py --device cuda         # torch.cuda.max_memory_allocated instead of RSS

On the CPU each variant runs in a fresh process and the number is the peak resident set size during the
step minus the resident size just before it (the banks, embeddings and contrast indices already exist, and
the peak of making them is reset first: Linux's /proc/self/clear_refs; elsewhere use --device cuda).
Sizes whose official step would not fit in the free memory (it grows with N(N-1) B (K+1) d) are refused in one
line before any process starts, as is --device cuda without a GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

if __name__ == "__main__":     # run as a file: the repository's packages are one folder up (imported: already found)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.cli import MAX_PEERS, HelpFormatter, Parser, number, run_tool, temperature  # noqa: E402
from engine.trainer import out_of_memory  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from losses.contrast_memory import bank_scores, nce_loss  # noqa: E402

MIB = 1 << 20


def official_step(banks, emb, contrast, n_data, tau, eps=1e-7):
    """mcl/criterion.py + mcl/memory.py as written: per pair, index_select the rows, bmm, exp, /Z, log."""
    n, b, d = emb.shape
    k1 = contrast.shape[1]
    loss = 0.0
    for a in range(n):
        for o in range(a + 1, n):
            for mem, anc in ((a, o), (o, a)):
                rows = torch.index_select(banks[mem], 0, contrast.view(-1)).detach().view(b, k1, d)
                p = torch.exp(torch.bmm(rows, emb[anc].view(b, d, 1)) / tau)
                z = (p.mean() * n_data).detach()
                p = p / z
                m_pn = (k1 - 1) / n_data
                log_pos = torch.log(p[:, 0] / (p[:, 0] + m_pn + eps))
                log_neg = torch.log(m_pn / (p[:, 1:] + m_pn + eps))
                loss = loss - (log_pos.sum() + log_neg.sum()) / b
    return loss


def ours_step(banks, emb, contrast, n_data, tau):
    loss = 0.0
    for a in range(emb.shape[0]):
        others = [o for o in range(emb.shape[0]) if o != a]
        loss = loss + nce_loss(bank_scores(banks[a], contrast, emb[others]), n_data, tau)
    return loss


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Set this process's peak resident size (VmHWM) to its current one, so that the peak read afterwards is the
    step's and not that of making the banks (which briefly needs twice their size)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        fail(f"cannot reset the peak resident size here (/proc/self/clear_refs: {e.strerror or e}), so the CPU "
             "peak would include making the banks; use --device cuda", 1)


def peak_rss_bytes() -> int:
    """This process's peak resident size since :func:`reset_peak_rss` (VmHWM of /proc/self/status)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def measure(variant: str, a) -> dict:
    torch.manual_seed(0)
    device = torch.device(a.device)
    banks = F.normalize(torch.randn(a.peers, a.n_data, a.feat_dim, device=device), dim=-1)
    emb = F.normalize(torch.randn(a.peers, a.batch, a.feat_dim, device=device), dim=-1).requires_grad_()
    contrast = torch.randint(a.n_data, (a.batch, a.k + 1), device=device)
    step = official_step if variant == "official" else ours_step
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        before = rss_bytes()
    loss = step(banks, emb, contrast, a.n_data, a.tau)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = peak_rss_bytes() - before
    return {"variant": variant, "peak_mib": peak / MIB, "loss": loss.item(),
            "grad_norm": emb.grad.norm().item()}


def available_bytes(device: str) -> int:
    """Memory a step may use: the GPU's free memory, or the system's MemAvailable (all of RAM if unknown)."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def needed_bytes(a) -> int:
    """About what the official variant holds at its peak: the banks and embeddings, and per directed pair the
    gathered block B x (K+1) x d and a few B x (K+1) score tensors (all float32)."""
    pairs = a.peers * (a.peers - 1)
    return 4 * (a.peers * (a.n_data + a.batch) * a.feat_dim + pairs * a.batch * (a.k + 1) * (a.feat_dim + 4))


def fail(message: str, code: int) -> NoReturn:
    """One line on stderr, then exit with ``code`` (2: the sizes asked for; 1: the measurement itself)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def check_size(a) -> None:
    """Refuse (one line, exit status 2) a size whose step cannot fit, before any process starts: the official
    variant's peak grows with N(N-1) B (K+1) d, so a large --k or --peers would otherwise die mid-step."""
    if a.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: this machine has no CUDA GPU that torch can use; use --device cpu", 2)
    needed, free = needed_bytes(a), available_bytes(a.device)
    if needed > free:
        fail(f"B={a.batch} K={a.k} N={a.peers} d={a.feat_dim} n_data={a.n_data}: the official step needs about "
             f"{needed / 2**30:.1f} GiB, and {free / 2**30:.1f} GiB is free on the {a.device}; lower --k, --batch, "
             "--peers or --feat-dim", 2)


def measure_in_child(variant: str, argv: list) -> dict:
    """One measurement in a fresh process (its RSS is the variant's own); a failure there is one line here."""
    out = subprocess.run([sys.executable, __file__, *argv, "--variant", variant], capture_output=True, text=True)
    if out.returncode != 0:
        said = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
        if said:
            fail(said[-1].removeprefix("error: "), out.returncode if out.returncode in (1, 2) else 2)
        how = (f"killed by signal {-out.returncode}, most likely for lack of memory: lower --k or --batch"
               if out.returncode < 0 else f"exit status {out.returncode}: "
               + (out.stderr.strip().splitlines() or ["no message"])[-1])
        fail(f"the {variant} measurement failed ({how})", 1)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = Parser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--batch", type=number(int, at_least=1, at_most=1 << 16, why="embeddings per step"), default=64)
    p.add_argument("--k", type=number(int, at_least=1, at_most=1 << 20, why="negatives per sample; MCL-OKD: 16384"),
                   default=16384)
    p.add_argument("--peers", type=number(int, at_least=2, at_most=MAX_PEERS,
                                          why="the contrastive step scores the pairs of peers"), default=4)
    p.add_argument("--feat-dim", type=number(int, at_least=1, at_most=1 << 14, why="embedding width"), default=128)
    p.add_argument("--n-data", type=number(int, at_least=1, at_most=1 << 24, why="rows of each memory bank"),
                   default=50000)
    p.add_argument("--tau", type=temperature, default=0.1)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--variant", choices=("official", "ours"), help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    a = p.parse_args(argv)
    if a.variant:                                    # child process: one measurement
        try:
            print(json.dumps(measure(a.variant, a)))
        except (MemoryError, RuntimeError) as e:     # (CUDA's OutOfMemoryError and the CPU allocator's: RuntimeError)
            if not out_of_memory(e):
                raise
            fail(f"out of memory on the {a.device} during the {a.variant} step; lower --k, --batch or --peers", 2)
        return 0
    check_size(a)                                    # before any process starts
    rows = [measure_in_child(variant, argv) for variant in ("official", "ours")]
    pairs = a.peers * (a.peers - 1)
    block = a.batch * (a.k + 1) * a.feat_dim * 4 / MIB
    scores = a.batch * (a.k + 1) * 4 / MIB
    print(f"B={a.batch} K={a.k} N={a.peers} d={a.feat_dim} n_data={a.n_data} device={a.device}")
    print(f"one gathered block B x (K+1) x d: {block:.1f} MiB; one score tensor B x (K+1): {scores:.2f} MiB; "
          f"{pairs} directed pairs")
    print(f"{'variant':<10} {'peak MiB':>10} {'loss':>12} {'|grad|':>10}")
    for r in rows:
        print(f"{r['variant']:<10} {r['peak_mib']:10.1f} {r['loss']:12.5f} {r['grad_norm']:10.5f}")
    if not math.isclose(rows[0]["loss"], rows[1]["loss"], rel_tol=1e-4):
        print(f"error: the two variants disagree (loss {rows[0]['loss']} against {rows[1]['loss']})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_tool(main)
