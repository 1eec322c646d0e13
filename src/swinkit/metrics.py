"""Classification accuracy, counted one way for training's validation and `swinkit eval`."""
from __future__ import annotations

import torch


def topk_hits(logits: torch.Tensor, targets: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, K], targets [B] -> (top-1 hit [B] bool, top-k hit [B] bool), k capped at K."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    hits = top == targets[:, None]
    return hits[:, 0], hits.any(dim=1)


def percent(count: int | float | torch.Tensor, out_of: int | float | torch.Tensor) -> float:
    """100 * count / out_of; 0.0 when there is nothing to count."""
    return 100.0 * float(count) / float(out_of) if float(out_of) else 0.0
