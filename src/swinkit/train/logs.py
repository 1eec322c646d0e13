"""Run records on rank 0: metrics.jsonl, TensorBoard events, curves.png, the progress bar."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from ..files import atomic_write


class MetricsLog:
    """`metrics.jsonl`: one JSON object per logged step or epoch end.

    On resume, records past the checkpoint's step (written by the run that was killed after
    it) are dropped, so the file reads as one uninterrupted run.
    """

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.records: list[dict] = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut short by a kill
                    continue
                if record.get("step", 0) <= resume_step:
                    self.records.append(record)
            text = "".join(json.dumps(r) + "\n" for r in self.records)
            atomic_write(self.path, lambda tmp: tmp.write_text(text))
        elif self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a")

    def write(self, record: dict) -> None:
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoard:
    """Scalars to OUTPUT/tensorboard; a no-op when disabled."""

    def __init__(self, log_dir: str | Path | None, purge_step: int | None = None):
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def scalars(self, values: dict, step: int) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_curves(records: list[dict], path: str | Path) -> None:
    """Training loss per logged step and val top-1/top-5 per epoch -> PNG (matplotlib Agg)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    steps = [r for r in records if r.get("loss") is not None and "val_top1" not in r]
    epochs = [r for r in records if r.get("val_top1") is not None]
    figure = Figure(figsize=(10, 4))
    loss_axes, acc_axes = figure.subplots(1, 2)
    loss_axes.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1)
    loss_axes.set(xlabel="step", ylabel="train loss", title="loss")
    loss_axes.grid(alpha=0.3)
    if epochs:
        x = [r["step"] for r in epochs]
        acc_axes.plot(x, [r["val_top1"] for r in epochs], marker="o", label="val top-1")
        acc_axes.plot(x, [r["val_top5"] for r in epochs], marker=".", label="val top-5")
        if any(r.get("ema_val_top1") is not None for r in epochs):
            acc_axes.plot(x, [r.get("ema_val_top1") for r in epochs], marker="x", label="EMA val top-1")
        acc_axes.legend()
    acc_axes.set(xlabel="step", ylabel="accuracy (%)", title="validation")
    acc_axes.grid(alpha=0.3)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))


def progress_enabled(requested: bool) -> bool:
    """tqdm only for a person watching: a TTY, and not under CI."""
    return requested and sys.stderr.isatty() and not os.environ.get("CI")


def progress_bar(requested: bool, total: int, done: int, description: str):
    """A tqdm bar over `total` steps starting at `done`, or None (see `progress_enabled`)."""
    if not progress_enabled(requested):
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=done, desc=description, unit="step", dynamic_ncols=True, leave=False)
