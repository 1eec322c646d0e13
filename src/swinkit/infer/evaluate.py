"""`evaluate`: top-1 / top-5 / per-class accuracy and loss of a weights file on an image folder.

Flow: `load_runner` (weights -> model + preprocessing + class names) -> match the folder's
classes to the model's outputs -> DataLoader batches -> logits -> counts. Images that
cannot be decoded are skipped, named in a warning and counted; more than 1% of them is an
error, as in training (`data.errors.check_unreadable`).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..data import DataError, ImageFolderDataset, load_image, resolve_split
from ..data.errors import check_unreadable, name_some
from ..metadata import Preprocess
from ..metrics import percent, topk_hits
from .runner import Runner, load_runner, with_preprocess

log = logging.getLogger("swinkit")


class _EvalImages(Dataset):
    """An image folder's samples -> (image [C, H, W], target, ok). An unreadable file gives
    ok=False and a zero image, so the batch keeps its shape and the file is left out of the counts."""

    def __init__(self, samples: list[tuple[str, int]], transform, preprocess: Preprocess):
        self.samples = samples
        self.transform = transform
        self.in_chans = preprocess.in_chans
        self.min_side = preprocess.resize_side  # a huge image is decoded no larger than the resize needs
        self.blank_shape = (preprocess.in_chans, *preprocess.img_size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, bool]:
        path, target = self.samples[index]
        try:
            image = load_image(path, self.in_chans, min_side=self.min_side)
        except Exception as error:  # any decode failure: PIL raises many types
            log.warning("skipping unreadable image %s (%s: %s)", path, type(error).__name__, error)
            return torch.zeros(self.blank_shape), target, False
        return self.transform(image), target, True


def class_mapping(folder_classes: list[str], runner: Runner, folder: Path) -> list[int]:
    """Model output index of each folder class (in the folder's sorted order).

    With class names in the checkpoint, folders are matched by name; otherwise the sorted
    folder order is the output order, as torchvision's ImageFolder assumes.
    """
    if runner.named_classes:
        index = {name: i for i, name in enumerate(runner.classes)}
        unknown = [name for name in folder_classes if name not in index]
        if unknown:
            known = ", ".join(runner.classes[:10]) + (", ..." if len(runner.classes) > 10 else "")
            raise DataError(f"class folder{'s' if len(unknown) > 1 else ''} {', '.join(repr(n) for n in unknown)} "
                            f"in {folder} {'are' if len(unknown) > 1 else 'is'} not among the classes of "
                            f"{runner.source} ({known})")
        return [index[name] for name in folder_classes]
    if len(folder_classes) > len(runner.classes):
        raise DataError(f"{folder} has {len(folder_classes)} class folders but {runner.source} has "
                        f"{len(runner.classes)} outputs and no class names to match them by")
    return list(range(len(folder_classes)))


def evaluate(weights: str | Path | Runner, data: str | Path, *, model_name: str | None = None, batch_size: int = 64,
             workers: int = 2, device: str | torch.device | None = None,
             preprocess: Preprocess | Mapping[str, Any] | None = None, precision: str = "fp32",
             calib: str | Path | None = None, calib_images: int = 256) -> dict:
    """Accuracy of `weights` on `data` (a dataset root, whose `val` split is used, or a class folder).

    `weights` is a checkpoint file (see `load_runner`; `precision` fp32 / bf16 / fp16 is the dtype its
    model runs in, int8 its linears in INT8 calibrated on `calib_images` images of the folder `calib`) or a
    ready runner. `preprocess` replaces
    the checkpoint's preprocessing, or changes some of its fields ({"img_size": 256, "crop_pct": 1.0}).
    Returns {"weights", "precision", "data", "images", "top1", "top5", "top5_k", "loss", "per_class",
    "per_class_images", "failed", "seconds"}: accuracies in percent; "top5" is top-k with
    k = min(5, classes) ("top5_k"); "per_class" maps folder class -> top-1 %; "failed" lists
    unreadable files (left out of every number).
    """
    folder = resolve_split(data, "val")
    dataset = ImageFolderDataset(folder)  # validates: class folders exist, none empty
    if isinstance(weights, (str, Path)):  # the runner is built with the preprocessing (int8 calibrates with it)
        runner = load_runner(weights, model_name=model_name, device=device, precision=precision, calib=calib,
                             calib_images=calib_images, preprocess=preprocess)
    else:
        runner = with_preprocess(weights, preprocess)
    mapping = torch.tensor(class_mapping(dataset.classes, runner, folder))
    num_outputs = len(runner.classes)
    k = min(5, num_outputs)

    images = _EvalImages(dataset.samples, runner.preprocess.transform(), runner.preprocess)
    device_type = getattr(getattr(runner, "device", None), "type", "cpu")
    loader = DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device_type == "cuda", persistent_workers=False)

    num_folder_classes = len(dataset.classes)
    correct_top1 = torch.zeros(num_folder_classes, dtype=torch.long)
    correct_topk = torch.zeros(num_folder_classes, dtype=torch.long)
    seen = torch.zeros(num_folder_classes, dtype=torch.long)
    loss_sum = 0.0
    failed: list[str] = []
    started = time.perf_counter()
    position = 0
    for batch, folder_targets, ok in loader:
        if not ok.all():
            failed += [dataset.samples[position + i][0] for i in torch.nonzero(~ok).flatten().tolist()]
            batch, folder_targets = batch[ok], folder_targets[ok]
        position += len(ok)
        if not len(batch):
            continue
        logits = runner(batch).cpu()
        targets = mapping[folder_targets]
        loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
        hit_top1, hit_topk = topk_hits(logits, targets, k)
        seen += torch.bincount(folder_targets, minlength=num_folder_classes)
        correct_top1 += torch.bincount(folder_targets[hit_top1], minlength=num_folder_classes)
        correct_topk += torch.bincount(folder_targets[hit_topk], minlength=num_folder_classes)
    seconds = time.perf_counter() - started

    total = int(seen.sum())
    if failed:
        check_unreadable(len(failed), len(dataset), folder, failed)
        log.warning("%d unreadable image(s) under %s left out of the evaluation: %s", len(failed), folder,
                    name_some(failed))

    return {
        "weights": runner.source,
        "precision": getattr(runner, "precision", None),
        "data": str(folder),
        "images": total,
        "top1": percent(correct_top1.sum(), total),
        "top5": percent(correct_topk.sum(), total),
        "top5_k": k,
        "loss": loss_sum / total if total else float("nan"),
        "per_class": {name: percent(correct_top1[i], seen[i]) for i, name in enumerate(dataset.classes)},
        "per_class_images": {name: int(seen[i]) for i, name in enumerate(dataset.classes)},
        "failed": failed,
        "seconds": seconds,
    }
