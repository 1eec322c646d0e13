"""Top-1 / top-5 accuracy of a classifier over a loader; pure (no distributed, no logging)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..metrics import percent, topk_hits


@torch.no_grad()
def evaluate_model(model: nn.Module, loader, device: torch.device | str, *,
                   amp_dtype: torch.dtype | None = None) -> dict:
    """Run `model` in eval mode over `loader` (batches of images `[B, C, H, W]`, labels `[B]`).

    Returns counts (`images`, `correct_top1`, `correct_top5`, `loss_sum`) that sum across
    shards, and `top1`, `top5` (percent) and `loss` (mean cross-entropy) from them. Top-5
    means top-min(5, num_classes). The model's train/eval mode is restored afterwards.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    images_seen, correct1, correct5, loss_sum = 0, 0, 0, 0.0
    try:
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            labels = torch.as_tensor(labels).to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(images)
            logits = logits.float()
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            hit_top1, hit_top5 = topk_hits(logits, labels)
            correct1 += int(hit_top1.sum())
            correct5 += int(hit_top5.sum())
            images_seen += labels.shape[0]
    finally:
        model.train(was_training)
    return summarize({"images": images_seen, "correct_top1": correct1, "correct_top5": correct5,
                      "loss_sum": loss_sum})


def summarize(counts: dict) -> dict:
    """Counts -> counts plus top1, top5 (percent) and mean loss."""
    images = counts["images"]
    return {**counts,
            "top1": percent(counts["correct_top1"], images),
            "top5": percent(counts["correct_top5"], images),
            "loss": counts["loss_sum"] / images if images else float("nan")}
