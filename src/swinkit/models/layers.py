"""Building blocks shared by Swin v1 and v2: patch embedding, patch merging, MLP,
drop path and the window partition / reverse helpers.

All feature maps are channels-last: `[B, H, W, C]`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torch.utils.checkpoint import checkpoint

from .gemm import fast_linear, tracing
from .lean import norm_linear


def pad_to_multiple(x: torch.Tensor, multiple_h: int, multiple_w: int) -> torch.Tensor:
    """Zero-pad `[B, H, W, C]` on the bottom/right so H and W are multiples. No copy if aligned."""
    _, height, width, _ = x.shape
    pad_h = (multiple_h - height % multiple_h) % multiple_h
    pad_w = (multiple_w - width % multiple_w) % multiple_w
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """`[B, H, W, C]` (H, W multiples of `window`) -> `[B * num_windows, window * window, C]`."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window, window, width // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels)


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """`[B * num_windows, window * window, C]` -> `[B, H, W, C]`; inverse of `window_partition`."""
    channels = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def drop_path_mask(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor | None:
    """Stochastic depth's per-sample multiplier for a branch like `x`: 0 with probability `rate`,
    else 1 / (1 - rate); fp32, shape `[B, 1, ..., 1]`. None when nothing is dropped."""
    if rate == 0.0 or not training:
        return None
    keep = 1.0 - rate
    mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device).bernoulli_(keep)
    return mask.div_(keep)


def drop_path(x: torch.Tensor, rate: float, training: bool, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability `rate`.
    `mask` (from `drop_path_mask`) replays an earlier draw instead of drawing."""
    if mask is None:
        mask = drop_path_mask(x, rate, training)
    return x if mask is None else x * mask.to(x.dtype)


class DropPath(nn.Module):
    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return drop_path(x, self.rate, self.training, mask)

    def new_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        return drop_path_mask(x, self.rate, self.training)

    def extra_repr(self) -> str:
        return f"rate={self.rate:.3f}"


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout. `[..., C]` -> `[..., C]`."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.drop(self.act(fast_linear(x, self.fc1.weight, self.fc1.bias)))
        return self.drop(fast_linear(hidden, self.fc2.weight, self.fc2.bias))


class PatchEmbed(nn.Module):
    """Image `[B, C_in, H, W]` -> patches `[B, ceil(H/p), ceil(W/p), C]`.

    The image is zero-padded on the bottom/right to a multiple of the patch size.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()
        # Training keeps only the image for backward and recomputes projection + norm there (a
        # ~0.3% FLOP overhead for Swin-T; it runs last in backward, when little else is held).
        self.lean = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lean and self.training and torch.is_grad_enabled() and not tracing():
            return checkpoint(self._embed, x, use_reentrant=False)
        return self._embed(x)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        pad_h, pad_w = (p - x.shape[2] % p) % p, (p - x.shape[3] % p) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """Halve the resolution, double the channels: `[B, H, W, C]` -> `[B, ceil(H/2), ceil(W/2), 2C]`.

    Each output token concatenates the 2x2 neighbourhood in the official order
    (top-left, bottom-left, top-right, bottom-right). v1 normalises the 4C
    concatenation before the reduction; v2 normalises the 2C result after it.
    """

    def __init__(self, dim: int, version: int):
        super().__init__()
        self.version = version
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim if version == 1 else 2 * dim)
        self.lean = True  # v1 training: keep the 2x2 gather only, rebuild its norm in backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_to_multiple(x, 2, 2)
        batch, height, width, channels = x.shape
        x = x.reshape(batch, height // 2, 2, width // 2, 2, channels).permute(0, 1, 3, 4, 2, 5).flatten(3)
        if self.version == 1:
            if self.lean and torch.is_grad_enabled() and not tracing():
                return norm_linear(x, self.norm, self.reduction.weight)
            return fast_linear(self.norm(x), self.reduction.weight)
        return self.norm(fast_linear(x, self.reduction.weight))
