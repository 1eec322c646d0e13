"""`swinkit bench jax`: swinkit's JAX port against swinkit in PyTorch and (with `--compare timm`) timm,
trained and validated in one run on the same data from the same initial weights.

The parent builds the model once (seeded), writes its weights as a native file and the data as
arrays, and runs every backend x batch size in a child process of its own (`bench/jax_child.py`,
one after another) with the same thread settings: `--threads` CPUs (CPU affinity, which sizes XLA's
thread pools), `torch.set_num_threads`, OMP_NUM_THREADS / MKL_NUM_THREADS, and XLA_FLAGS
`--xla_cpu_multi_thread_eigen`. Each child trains `--epochs` x steps (AdamW, label smoothing,
gradient clipping, warmup + cosine lr: the PyTorch trainer's recipe, fp32) and validates after every
epoch, timing both phases; JAX's first epoch includes its XLA compilation, also reported alone.
Before training each child reports the logits of two val images: the table states how far each
backend's are from swinkit-torch's (the same weights give the same logits within fp32 rounding).

Data: `--synthetic` draws fixed images (noise plus a smooth per-class pattern, so top-1 can rise above
chance) and labels, `steps-per-epoch x batch` for training and `val-batches x` the largest batch for
validation; `--data DIR` decodes a fixed, seeded subset of DIR/train and DIR/val once (`--train-images`,
`--val-images`) with the eval transform (resize, centre crop, normalise), no augmentation.

Speed is per backend: img/s over all epochs and over the epochs after the first (compilation and
warm-up excluded; the ratios and the fractions of the peak use these), first-epoch seconds, compile
seconds (JAX), final top-1. The machine's GEMM peaks, measured in the parent before the children on the
model's own linear shapes at each batch size (`machine.measure_peaks`), give each row's achieved GFLOP/s
as a fraction of the fp32 peak (every backend trains in fp32), counting `models.swin.flops_per_image`
per image forward and per training step.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from .. import api
from ..errors import SwinkitError
from ..models.registry import get_config
from ..models.swin import TRAINING_PASSES, flops_per_image
from ..train.config import AugmentSection, OptimSection, ScheduleSection
from ..train.optim import scaled_lrs
from .jax_child import BACKENDS, UNAVAILABLE_EXIT
from .machine import cpu_name, format_peaks, linear_shapes, load_average, measure_peaks, peak_fields

ROW_KEYS = ("backend", "batch_size", "train_img_per_s", "train_img_per_s_after_first", "val_img_per_s",
            "val_img_per_s_after_first", "first_epoch_s", "compile_s", "top1", "train_vs_timm", "val_vs_timm",
            "train_vs_torch", "val_vs_torch", "dtype", "train_gflops", "val_gflops", "peak_gflops", "train_pct_peak",
            "val_pct_peak", "gemm_peaks_gflops", "epoch_train_s", "epoch_val_s")
PROBE_IMAGES = 2


class ChildError(SwinkitError):
    """A backend's child process failed; the message holds the end of its output."""


# ------------------------------------------------------------------------------------------------ data
def synthetic_data(num_classes: int, img_size: tuple[int, int], in_chans: int, train_images: int, val_images: int,
                   seed: int = 0) -> dict[str, np.ndarray]:
    """Fixed images `[N, C, H, W]` float32 and labels: N(0, 1) noise plus the label's pattern (N(0, 1) on a
    4x4 grid, nearest-upsampled), so the classes can be learnt. Same arrays for every backend."""
    rng = np.random.default_rng(seed)
    height, width = img_size
    grid = rng.standard_normal((num_classes, in_chans, 4, 4)).astype(np.float32)
    patterns = grid.repeat(-(-height // 4), axis=2).repeat(-(-width // 4), axis=3)[:, :, :height, :width]
    arrays = {}
    for split, count in (("train", train_images), ("val", val_images)):
        labels = rng.integers(0, num_classes, count).astype(np.int64)
        images = rng.standard_normal((count, in_chans, height, width), dtype=np.float32)
        images += patterns[labels]
        arrays[f"{split}_x"], arrays[f"{split}_y"] = images, labels
    return arrays


def folder_data(root: str | Path, img_size: tuple[int, int], in_chans: int, train_images: int, val_images: int,
                seed: int = 0) -> tuple[dict[str, np.ndarray], list[str]]:
    """A seeded subset of `root`/train and `root`/val decoded once with the eval transform:
    ({train_x, train_y, val_x, val_y}, class names)."""
    from ..data.datasets import ImageFolderDataset, resolve_split
    from ..data.errors import DataError
    from ..data.transforms import build_eval_transform
    transform = build_eval_transform(img_size, in_chans=in_chans)
    arrays, classes = {}, None
    for split, count in (("train", train_images), ("val", val_images)):
        dataset = ImageFolderDataset(resolve_split(root, split), transform=transform, in_chans=in_chans)
        if classes is not None and dataset.classes != classes:
            raise DataError(f"{dataset.root} has classes {dataset.classes[:5]}... but the train split has "
                            f"{classes[:5]}...; both splits need the same class folders")
        classes = dataset.classes
        chosen = np.random.default_rng(seed).permutation(len(dataset))[:count]
        images, labels = zip(*(dataset[int(index)] for index in chosen))
        dataset.check_failures(len(chosen))
        arrays[f"{split}_x"] = torch.stack(images).numpy()
        arrays[f"{split}_y"] = np.asarray(labels, np.int64)
    return arrays, classes


# ------------------------------------------------------------------------------------------- children
def recipe(batch: int, epochs: int, steps_per_epoch: int, lr: float | None = None, warmup_epochs: float = 1.0) -> dict:
    """The trainer's defaults (`train.config`): AdamW, lrs scaled by batch / lr_reference_batch, label
    smoothing, clipping; warmup over `warmup_epochs` (at most all epochs but the last), then cosine."""
    optim, schedule = OptimSection(), ScheduleSection()
    peak, warmup_lr, min_lr = scaled_lrs(optim.lr if lr is None else lr, schedule.warmup_lr, schedule.min_lr,
                                         batch, optim.lr_reference_batch, optim.scale_lr)
    warmup = min(warmup_epochs, max(epochs - 1, 0))
    return {"lr": peak, "warmup_lr": warmup_lr, "min_lr": min_lr, "warmup_steps": int(round(warmup * steps_per_epoch)),
            "weight_decay": optim.weight_decay, "betas": list(optim.betas), "eps": optim.eps,
            "clip_grad": optim.clip_grad, "label_smoothing": AugmentSection().label_smoothing}


def child_environment(threads: int | None) -> dict[str, str]:
    """The parent's environment with the thread settings every child runs under (and the source on PYTHONPATH)."""
    env = dict(os.environ)
    source_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH")) if p)
    env.setdefault("JAX_PLATFORMS", "cpu")  # the comparison is on the CPU, as the PyTorch side's
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_cpu_multi_thread_eigen")]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'}"])
    return env


def run_backend(backend: str, model: str, weights: Path, data: Path, batch: int, epochs: int, steps_per_epoch: int,
                recipe_: dict, *, threads: int | None, seed: int, timeout: float | None = None) -> dict:
    """One child run: its JSON result ("ok" false with the reason in "unavailable" when the backend cannot
    run here, e.g. timm not installed). A failure or `timeout` seconds passed raise `ChildError`."""
    command = [sys.executable, "-m", "swinkit.bench.jax_child", "--backend", backend, "--model", model,
               "--weights", str(weights), "--data", str(data), "--batch", str(batch), "--epochs", str(epochs),
               "--steps-per-epoch", str(steps_per_epoch), "--recipe", json.dumps(recipe_), "--seed", str(seed),
               "--probe", str(PROBE_IMAGES)]
    if threads:
        command += ["--threads", str(threads)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=child_environment(threads),
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ChildError(f"bench jax: the {backend} child (batch {batch}) did not finish within {timeout:g} s "
                         "(--child-timeout)") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    if done.returncode == UNAVAILABLE_EXIT:
        return result
    if done.returncode != 0 or not result.get("ok"):
        tail = (done.stderr or done.stdout).strip().splitlines()[-6:]
        raise ChildError(f"bench jax: the {backend} child (batch {batch}) exited with {done.returncode}: "
                         + " | ".join(tail))
    return result


# ---------------------------------------------------------------------------------------------- bench
def bench_jax(model_name: str, *, batch_sizes=(32, 64), epochs: int = 3, steps_per_epoch: int | None = None,
              data: str | Path | None = None, compare=(), threads: int | None = 2, train_images: int = 512,
              val_images: int = 256, val_batches: int = 2, num_classes: int = 10, img_size: int | None = None,
              seed: int = 0, lr: float | None = None, warmup_epochs: float = 1.0, measure_peak: bool = True,
              child_timeout: float | None = None, log=None, **overrides) -> dict:
    """Train and validate swinkit-jax, swinkit-torch and the peers in `compare` ("timm") from one seeded
    initialisation; returns {"header": {...}, "rows": [one per backend and batch size], "skipped": [...]}.

    `data=None`: synthetic data (`steps_per_epoch` x largest batch training images, default 4 steps;
    `val_batches` x largest batch val images). With a folder, `train_images` / `val_images` of it and
    `steps_per_epoch` default all the training images' full batches. `overrides`: SwinConfig fields
    for the model (e.g. depths=(2,)); the children read them from the initial weights file.
    """
    log = log or (lambda message: None)
    compare = [c.strip() for c in compare if c.strip() and c.strip() != "none"]
    unknown = sorted(set(compare) - {"timm"})
    if unknown:
        raise ValueError(f"bench jax compares against timm only, not {', '.join(unknown)}")
    batch_sizes = sorted({int(b) for b in batch_sizes})
    if not batch_sizes or batch_sizes[0] < 1 or epochs < 1 or (steps_per_epoch is not None and steps_per_epoch < 1):
        raise ValueError("batch sizes, epochs and steps per epoch must be positive")
    backends = ["swinkit-jax", "swinkit-torch"] + compare
    threads_before = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="swinkit-bench-jax-") as scratch:
        scratch = Path(scratch)
        changes = {k: v for k, v in dict(overrides, img_size=img_size).items() if v is not None}
        config = get_config(model_name).replace(**changes)  # the data needs the input size and channels
        size, in_chans = tuple(config.img_size), config.in_chans
        if data is None:
            steps_per_epoch = steps_per_epoch or 4
            arrays = synthetic_data(num_classes, size, in_chans, steps_per_epoch * batch_sizes[-1],
                                    val_batches * batch_sizes[-1], seed)
            data_text = (f"synthetic ({len(arrays['train_y'])} train / {len(arrays['val_y'])} val images, "
                         f"{num_classes} classes: noise + a per-class pattern)")
        else:
            log(f"decoding {train_images} + {val_images} images of {data} ...")
            arrays, classes = folder_data(data, size, in_chans, train_images, val_images, seed)
            num_classes = len(classes)
            data_text = (f"{data} ({len(arrays['train_y'])} train / {len(arrays['val_y'])} val images decoded "
                         f"once, {num_classes} classes, eval transform)")
        steps = {b: steps_per_epoch or len(arrays["train_y"]) // b for b in batch_sizes}
        short = [b for b in batch_sizes if steps[b] < 1 or steps[b] * b > len(arrays["train_y"])]
        if short:
            raise ValueError(f"{len(arrays['train_y'])} training images are too few for {steps_per_epoch or 1} "
                             f"step(s) per epoch at batch {short[0]}; pass more --train-images or fewer steps")
        data_dir = scratch / "data"
        data_dir.mkdir()
        for name, array in arrays.items():
            np.save(data_dir / f"{name}.npy", array)
        del arrays
        torch.manual_seed(seed)
        model = api.create_model(model_name, num_classes=num_classes, **changes)
        weights = api.save_weights(model, scratch / "initial.safetensors")
        forward_flops, train_flops = flops_per_image(model, size), flops_per_image(model, size, training=True)

        header = {"model": model.name or model_name, "img_size": list(size), "num_classes": num_classes,
                  "gflops_per_image": round(forward_flops / 1e9, 4), "data": data_text, "epochs": epochs,
                  "steps_per_epoch": steps, "seed": seed, "recipe": recipe(batch_sizes[0], epochs, steps[batch_sizes[0]],
                                                                            lr, warmup_epochs),
                  "lr_base": OptimSection().lr if lr is None else lr, "warmup_epochs": warmup_epochs,
                  "cpu": cpu_name(), "threads": threads, "torch": torch.__version__, "load_average": load_average()}
        if threads:
            torch.set_num_threads(threads)
        try:
            peaks = header["gemm_peaks"] = {}
            for batch in batch_sizes if measure_peak else ():
                log(f"measuring the GEMM peaks at batch {batch} ...")
                peaks[batch] = measure_peaks(linear_shapes(model, batch, size))
            results, skipped = [], []
            for batch in batch_sizes:
                for backend in backends:
                    log(f"{backend} batch {batch}: {epochs} epochs x {steps[batch]} steps ...")
                    result = run_backend(backend, model_name, weights, data_dir, batch, epochs, steps[batch],
                                         recipe(batch, epochs, steps[batch], lr, warmup_epochs), threads=threads,
                                         seed=seed, timeout=child_timeout)
                    if not result.get("ok"):
                        skipped.append({"backend": backend, "batch_size": batch,
                                        "reason": result.get("unavailable", "unavailable")})
                        continue
                    log("  epochs (train s / val s): "
                        + ", ".join(f"{e['train_s']:.2f}/{e['val_s']:.2f}" for e in result["epochs"]))
                    results.append(result)
        finally:
            torch.set_num_threads(threads_before)
    header["load_average_after"] = load_average()
    for result in results:
        if "threads" in result:
            header.setdefault("thread_settings", {})[result["backend"]] = result["threads"]
        if "jax" in result:
            header["jax"] = result["jax"]
    rows = _rows(results, forward_flops, train_flops, peaks)
    return {"header": header, "rows": rows, "skipped": skipped}


def _rate(images: int, seconds: list[float]) -> float | None:
    total = sum(seconds)
    return images * len(seconds) / total if seconds and total > 0 else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _rows(results: list[dict], forward_flops: int, train_flops: int, peaks: dict) -> list[dict]:
    """One row per child result, with ratios to timm and swinkit-torch at the same batch size and the
    train/val GFLOP/s against the fp32 peak measured at that batch size (`peaks`: batch -> measurement)."""
    rows = []
    for result in results:
        epochs = result["epochs"]
        train_s, val_s = [e["train_s"] for e in epochs], [e["val_s"] for e in epochs]
        n_train, n_val = result["train_images_per_epoch"], result["val_images"]
        compiled = result.get("compile_train_s") is not None
        row = {"backend": result["backend"], "batch_size": result["batch_size"], "epochs": len(epochs),
               "train_images_per_epoch": n_train, "val_images": n_val,
               "train_img_per_s": _rate(n_train, train_s), "train_img_per_s_after_first": _rate(n_train, train_s[1:]),
               "val_img_per_s": _rate(n_val, val_s), "val_img_per_s_after_first": _rate(n_val, val_s[1:]),
               "first_epoch_s": train_s[0] + val_s[0], "first_epoch_train_s": train_s[0], "first_epoch_val_s": val_s[0],
               "compile_s": result["compile_train_s"] + result["compile_val_s"] if compiled else None,
               "compile_train_s": result.get("compile_train_s"), "compile_val_s": result.get("compile_val_s"),
               "top1": epochs[-1]["top1"], "val_loss": epochs[-1]["val_loss"], "train_loss": epochs[-1]["train_loss"],
               "epoch_train_s": train_s, "epoch_val_s": val_s, "epoch_top1": [e["top1"] for e in epochs],
               "initial_logits": result.get("initial_logits")}
        row["_train"] = row["train_img_per_s_after_first"] or row["train_img_per_s"]  # steady rates, when there are
        row["_val"] = row["val_img_per_s_after_first"] or row["val_img_per_s"]
        for phase, flops in (("train", train_flops), ("val", forward_flops)):
            fields = peak_fields(row[f"_{phase}"] * flops / 1e9, "fp32", peaks.get(row["batch_size"]))
            row.update(dtype=fields["dtype"], peak_gflops=fields["peak_gflops"],
                       gemm_peaks_gflops=fields["gemm_peaks_gflops"])
            row[f"{phase}_gflops"], row[f"{phase}_pct_peak"] = fields["gflops"], fields["pct_peak"]
        rows.append(row)
    logits = {(row["backend"], row["batch_size"]): row.pop("initial_logits") for row in rows}
    for row in rows:
        same = {r["backend"]: r for r in rows if r["batch_size"] == row["batch_size"]}
        for reference, suffix in (("timm", "timm"), ("swinkit-torch", "torch")):
            other = same.get(reference)
            row[f"train_vs_{suffix}"] = _ratio(row["_train"], other and other["_train"])
            row[f"val_vs_{suffix}"] = _ratio(row["_val"], other and other["_val"])
        reference = logits.get(("swinkit-torch", row["batch_size"]))
        mine = logits[row["backend"], row["batch_size"]]
        row["initial_logits_max_diff"] = (float(np.max(np.abs(np.asarray(mine) - np.asarray(reference))))
                                          if mine is not None and reference is not None else None)
    for row in rows:
        del row["_train"], row["_val"]
    return rows


# ---------------------------------------------------------------------------------------------- output
def _fmt(value, pattern: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else pattern.format(value)


def format_table(report: dict) -> str:
    header = report["header"]
    peaks = header.get("gemm_peaks") or {}
    settings = header.get("thread_settings", {})
    sample = next(iter(settings.values()), {})
    recipe_ = header["recipe"]
    lines = [
        f"swinkit bench jax: {header['model']} at {'x'.join(map(str, header['img_size']))}, "
        f"{header['gflops_per_image']} GFLOP/image forward (x{TRAINING_PASSES} per training image), "
        f"{header['num_classes']} classes; fp32",
        f"data: {header['data']}; {header['epochs']} epochs x "
        + ", ".join(f"{s} steps at batch {b}" for b, s in header["steps_per_epoch"].items()),
        f"recipe: AdamW (wd {recipe_['weight_decay']}, betas {tuple(recipe_['betas'])}), lr {header['lr_base']:g} per "
        f"512 images scaled to the batch, warmup {header['warmup_epochs']:g} epoch(s) then cosine, clip "
        f"{recipe_['clip_grad']}, label smoothing {recipe_['label_smoothing']}; the same initial weights for all",
        f"{header['cpu']}; each backend in its own process, threads {header['threads'] or 'default'}: "
        f"torch.set_num_threads -> {sample.get('torch_threads')}, OMP_NUM_THREADS={sample.get('OMP_NUM_THREADS')}, "
        f"MKL_NUM_THREADS={sample.get('MKL_NUM_THREADS')}, XLA_FLAGS={sample.get('XLA_FLAGS')!r}, "
        f"CPU affinity {sample.get('cpus')}; torch {header['torch']}"
        + (f", jax {header['jax']}" if header.get("jax") else "")
        + f"; load average {header['load_average']} -> {header.get('load_average_after')}",
    ]
    for batch, measured in peaks.items():
        lines.append(format_peaks(measured, f" at batch {batch}") + "; '% peak' is of fp32's")
    diffs: dict[str, float] = {}
    for row in report["rows"]:
        if row["backend"] != "swinkit-torch" and row["initial_logits_max_diff"] is not None:
            diffs[row["backend"]] = max(diffs.get(row["backend"], 0.0), row["initial_logits_max_diff"])
    if diffs:
        lines.append(f"initial weights: max |logit - swinkit-torch's| on {PROBE_IMAGES} val images before training: "
                     + ", ".join(f"{backend} {diff:.1e}" for backend, diff in diffs.items()))
    lines += [
        "img/s 'after 1st' excludes the first epoch (JAX's compilation, warm-up); ratios, GFLOP/s and % peak use it",
        "",
        f"| {'backend':<13} | {'batch':>5} | {'train img/s':>11} | {'after 1st':>9} | {'val img/s':>9} | "
        f"{'after 1st':>9} | {'1st epoch s':>11} | {'compile s':>9} | {'top-1':>6} | {'train/timm':>10} | "
        f"{'val/timm':>8} | {'train/torch':>11} | {'val/torch':>9} | {'train GFLOP/s':>13} | {'train %peak':>11} | "
        f"{'val GFLOP/s':>11} | {'val %peak':>9} |",
        "|" + "|".join("-" * (width + 2) for width in (13, 5, 11, 9, 9, 9, 11, 9, 6, 10, 8, 11, 9, 13, 11, 11, 9))
        + "|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['backend']:<13} | {row['batch_size']:>5} | {_fmt(row['train_img_per_s'], '{:.2f}'):>11} | "
            f"{_fmt(row['train_img_per_s_after_first'], '{:.2f}'):>9} | {_fmt(row['val_img_per_s'], '{:.2f}'):>9} | "
            f"{_fmt(row['val_img_per_s_after_first'], '{:.2f}'):>9} | {_fmt(row['first_epoch_s'], '{:.1f}'):>11} | "
            f"{_fmt(row['compile_s'], '{:.1f}'):>9} | {_fmt(row['top1'], '{:.1f}'):>6} | "
            f"{_fmt(row['train_vs_timm'], '{:.2f}x'):>10} | {_fmt(row['val_vs_timm'], '{:.2f}x'):>8} | "
            f"{_fmt(row['train_vs_torch'], '{:.2f}x'):>11} | {_fmt(row['val_vs_torch'], '{:.2f}x'):>9} | "
            f"{_fmt(row['train_gflops'], '{:.1f}'):>13} | {_fmt(row['train_pct_peak'], '{:.0f}%'):>11} | "
            f"{_fmt(row['val_gflops'], '{:.1f}'):>11} | {_fmt(row['val_pct_peak'], '{:.0f}%'):>9} |")
    lines.append("")
    lines.append("per epoch, train s / val s:")
    for row in report["rows"]:
        lines.append(f"  {row['backend']:<13} batch {row['batch_size']:>4}: "
                     + ", ".join(f"{t:.2f}/{v:.2f}" for t, v in zip(row["epoch_train_s"], row["epoch_val_s"])))
    for item in report["skipped"]:
        lines.append(f"skipped {item['backend']} (batch {item['batch_size']}): {item['reason']}")
    return "\n".join(lines)


def plot(report: dict, path: str | Path) -> Path:
    """Per-epoch train (solid) and validation (dashed) seconds per backend, one panel per batch size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ..files import atomic_write
    rows = report["rows"]
    batches = sorted({row["batch_size"] for row in rows})
    figure, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 3.8), squeeze=False)
    colors = {backend: f"C{i}" for i, backend in enumerate(BACKENDS)}
    for axis, batch in zip(axes[0], batches):
        for row in (r for r in rows if r["batch_size"] == batch):
            epochs = range(1, len(row["epoch_train_s"]) + 1)
            color = colors.get(row["backend"])
            axis.plot(epochs, row["epoch_train_s"], "o-", color=color, label=f"{row['backend']} train")
            axis.plot(epochs, row["epoch_val_s"], "s--", color=color, label=f"{row['backend']} val")
        axis.set_title(f"batch {batch}")
        axis.set_xlabel("epoch")
        axis.set_ylabel("seconds")
        axis.set_xticks(list(range(1, max(len(r["epoch_train_s"]) for r in rows) + 1)))
        axis.set_ylim(bottom=0)
        axis.legend(fontsize=7)
    header = report["header"]
    figure.suptitle(f"{header['model']} {'x'.join(map(str, header['img_size']))}, "
                    f"threads {header['threads'] or 'default'}: seconds per epoch (solid: train, dashed: val)")
    figure.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120))
    plt.close(figure)
    return path


# ----------------------------------------------------------------------------------------- command line
def _cmd_jax(args) -> int:
    log = (lambda message: print(message, file=sys.stderr, flush=True)) if not args.quiet else None
    report = bench_jax(args.model, batch_sizes=args.batch_sizes, epochs=args.epochs,
                       steps_per_epoch=args.steps_per_epoch, data=None if args.synthetic else args.data,
                       compare=args.compare.split(","), threads=args.threads, train_images=args.train_images,
                       val_images=args.val_images, val_batches=args.val_batches, num_classes=args.num_classes,
                       img_size=args.img_size, seed=args.seed, lr=args.lr, warmup_epochs=args.warmup_epochs,
                       measure_peak=not args.no_peak, child_timeout=args.child_timeout, log=log)
    if args.plot:
        report["header"]["plot"] = str(plot(report, args.plot))
    print(json.dumps(report["rows"], indent=2) if args.json else format_table(report))
    return 0


def register_jax(bench_subparsers, int_list) -> None:
    """Add `jax` to the `swinkit bench` subcommands (`int_list`: `bench.cli`'s "8,16" argument type)."""
    from ..cli_types import non_negative_float, positive_float, positive_int
    parser = bench_subparsers.add_parser(
        "jax", help="swinkit-JAX vs swinkit-PyTorch (and timm): per-epoch train/val time, img/s, compile, top-1",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model name, e.g. swin_tiny_patch4_window7_224")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="image folder with train/ and val/ (a subset is decoded once)")
    source.add_argument("--synthetic", action="store_true", help="fixed random images and labels")
    parser.add_argument("--batch-sizes", type=int_list, default=[32, 64], help="comma-separated (default 32,64)")
    parser.add_argument("--epochs", type=positive_int, default=3, help="default 3")
    parser.add_argument("--steps-per-epoch", type=positive_int, default=None,
                        help="training steps per epoch (default: 4 with --synthetic, every full batch of "
                             "--train-images with --data)")
    parser.add_argument("--val-batches", type=positive_int, default=2,
                        help="--synthetic: validation images = this x the largest batch (default 2)")
    parser.add_argument("--train-images", type=positive_int, default=512, help="--data: images decoded for training")
    parser.add_argument("--val-images", type=positive_int, default=256, help="--data: images decoded for validation")
    parser.add_argument("--num-classes", type=positive_int, default=10, help="--synthetic: classes (default 10)")
    parser.add_argument("--img-size", type=positive_int, default=None, help="square input size (default: the model's)")
    parser.add_argument("--compare", default="none", help="timm, or none (default)")
    parser.add_argument("--threads", type=positive_int, default=2, help="threads (CPUs) per backend (default 2)")
    parser.add_argument("--lr", type=positive_float, default=None,
                        help="base lr per 512 images (default: the training config's, 5e-4)")
    parser.add_argument("--warmup-epochs", type=non_negative_float, default=1.0, help="default 1")
    parser.add_argument("--seed", type=int, default=0, help="initial weights, data and batch order")
    parser.add_argument("--no-peak", action="store_true", help="skip measuring the GEMM peaks")
    parser.add_argument("--child-timeout", type=positive_float, default=None, help="seconds per backend run")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--plot", help="write per-epoch train/val seconds per backend to this .png")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(func=_cmd_jax)
