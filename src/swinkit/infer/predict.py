"""`predict`: top-k classes and probabilities for image files; a bad image is reported, not fatal.

Flow: `load_runner` -> decode + transform every image (failures become error entries) ->
batches -> softmax -> top-k, named with the checkpoint's class names.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..data import load_image
from ..metadata import Preprocess
from .runner import Runner, load_runner, with_preprocess


def _describe_error(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def predict(weights: str | Path | Runner, images: Iterable[str | Path], *, model_name: str | None = None,
            topk: int = 5, device: str | torch.device | None = None, batch_size: int = 32,
            preprocess: Preprocess | Mapping[str, Any] | None = None, precision: str = "fp32",
            calib: str | Path | None = None, calib_images: int = 256) -> list[dict]:
    """One entry per image, in input order:

        {"image": path, "predictions": [{"class": name, "index": i, "prob": p}, ...]}  (most likely first)
        {"image": path, "error": "why it could not be read"}

    `topk` is capped at the number of classes. Class names come from the checkpoint's metadata
    (index strings without it). `weights`, `preprocess`, `precision` and `calib` are as for `evaluate`.
    """
    if topk < 1:
        raise ValueError(f"topk must be at least 1, got {topk}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(weights, (str, Path)):  # the runner is built with the preprocessing (int8 calibrates with it)
        runner = load_runner(weights, model_name=model_name, device=device, precision=precision, calib=calib,
                             calib_images=calib_images, preprocess=preprocess)
    else:
        runner = with_preprocess(weights, preprocess)
    transform = runner.preprocess.transform()
    k = min(topk, len(runner.classes))

    results: list[dict] = []
    pending: list[tuple[dict, torch.Tensor]] = []  # (entry to fill, image tensor)

    def flush() -> None:
        if not pending:
            return
        probs = torch.softmax(runner(torch.stack([tensor for _, tensor in pending])).cpu().double(), dim=1)
        values, indices = probs.topk(k, dim=1)
        for (entry, _), row_values, row_indices in zip(pending, values.tolist(), indices.tolist()):
            entry["predictions"] = [{"class": runner.classes[index], "index": index, "prob": value}
                                    for value, index in zip(row_values, row_indices)]
        pending.clear()

    for image in images:
        entry: dict[str, Any] = {"image": str(image)}
        results.append(entry)
        try:
            tensor = transform(load_image(image, runner.preprocess.in_chans, min_side=runner.preprocess.resize_side))
        except Exception as error:  # unreadable, missing, not an image: report it and go on
            entry["error"] = _describe_error(error)
            continue
        pending.append((entry, tensor))
        if len(pending) == batch_size:
            flush()
    flush()
    return results
