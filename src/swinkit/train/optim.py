"""AdamW with the official Swin weight-decay split, and the per-step warmup + cosine schedule."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, skip_keywords: tuple[str, ...] = ()) -> list[dict]:
    """Two AdamW groups: decayed weights, and the rest (1-D params such as norms, biases, and any
    name containing one of `skip_keywords`, e.g. relative_position_bias_table, logit_scale, cpb_mlp)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or any(word in name for word in skip_keywords):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, betas, eps: float) -> torch.optim.AdamW:
    keywords = tuple(getattr(model, "no_weight_decay_keywords", lambda: ())())
    return torch.optim.AdamW(param_groups(model, weight_decay, keywords), lr=lr, betas=tuple(betas), eps=eps)


def scaled_lrs(lr: float, warmup_lr: float, min_lr: float, images_per_step: int, reference_batch: int,
               scale: bool = True) -> tuple[float, float, float]:
    """Linear scaling rule (official Swin): every lr x images per optimizer step / reference batch."""
    factor = images_per_step / reference_batch if scale else 1.0
    return lr * factor, warmup_lr * factor, min_lr * factor


@dataclass
class WarmupCosineSchedule:
    """lr at optimizer step s: linear warmup_lr -> peak over `warmup_steps`, then cosine peak -> min_lr
    until `total_steps` (timm CosineLRScheduler with warmup_prefix, stepped per update as officially).

    The state is the step count alone, so a resumed run sets exactly the same lr."""

    optimizer: torch.optim.Optimizer
    peak_lr: float
    warmup_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    step_count: int = 0

    def __post_init__(self):
        self._apply()

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.peak_lr - self.warmup_lr) * step / self.warmup_steps
        progress = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
        return self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    @property
    def lr(self) -> float:
        return self.lr_at(self.step_count)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def _apply(self) -> None:
        lr = self.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "peak_lr": self.peak_lr, "warmup_lr": self.warmup_lr,
                "min_lr": self.min_lr, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()
