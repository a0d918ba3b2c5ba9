"""What a run shows while it runs: console lines (rank 0 only), TensorBoard scalars, the final table."""
from __future__ import annotations

from data.files import RUN_TENSORBOARD


class Reporter:
    """Console and TensorBoard output of ``run``, a :class:`~engine.run.Run` once described (its folder, its
    --epochs and the metric that selects its best epoch, shown for a validation split); only rank 0 shows it."""

    def __init__(self, run):
        self.folder, self.epochs, self.metric = run.folder, run.config.epochs, run.selection[1]
        self.is_main, self.log, self.writer = run.is_main, run.log, None

    def tensorboard(self, epoch: int, record: dict) -> None:
        """Every training term, speed figure, lr and evaluated metric of 0-based ``epoch``, at step epoch + 1."""
        if not self.is_main:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.folder / RUN_TENSORBOARD), purge_step=epoch + 1)
        for group in ("train", "speed", "lr", "val", "test"):
            for name, value in record.get(group, {}).items():
                self.writer.add_scalar(f"{group}/{name}", value, epoch + 1)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def epoch(self, epoch: int, record: dict) -> None:
        """0-based ``epoch``'s ``record`` in TensorBoard and as one console line."""
        self.tensorboard(epoch, record)
        train, speed = record["train"], record["speed"]
        terms = " ".join(f"{k} {v:.3f}" for k, v in train.items() if k != "loss")
        heads = " ".join(f"{k[:-5]} {v:.2f}" for k, v in record["test"].items() if k.endswith("/top1"))
        val = f" | val {record['val'][self.metric]:.2f}" if "val" in record else ""
        lr = next(iter(record["lr"].values()))
        self.log(f"epoch {record['epoch']}/{self.epochs} lr {lr:.4g} loss {train['loss']:.3f} "
                 f"({terms}) | test top1 {heads}{val} | {speed['epoch_s']:.1f}s {speed['images_per_s']:.0f} img/s")

    def final_table(self, results: dict) -> None:
        """Best and last top-1 (and last top-5) of every head of a run's ``results`` (results.json), each
        peer's architecture after it when the peers differ."""
        best, last = results["best"], results["last"]
        if not best or not last:
            return
        archs = results.get("peer_archs") or {}
        archs = archs if len(set(archs.values())) > 1 else {}
        heads = [k[:-5] for k in last["test"] if k.endswith("/top1")]
        selection = results["selection"]
        lines = [f"{'head':<12} {'best top1':>9} {'last top1':>9} {'last top5':>9}   "
                 f"(best = epoch {best['epoch']}, selected on {selection['split']} {selection['metric']})"]
        for h in heads:
            lines.append(f"{h:<12} {best['test'][h + '/top1']:9.2f} {last['test'][h + '/top1']:9.2f} "
                         f"{last['test'][h + '/top5']:9.2f}" + (f"   {archs[h]}" if h in archs else ""))
        self.log("\n".join(lines) + f"\nresults: {self.folder / 'results.json'}")
