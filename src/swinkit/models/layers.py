"""Building blocks shared by Swin v1 and v2: patch embedding, patch merging, MLP,
drop path, and the window layout (pad, cyclic shift, partition into windows and back).

Feature maps are channels-last `[B, H, W, C]`; blocks see tokens in *window layout*
`[B, num_windows * N, C]` (N = window * window tokens per window, windows in row-major order).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def tracing() -> bool:
    """A tracer, compiler or exporter is running the model (caches and eager-only kernels stay off)."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return (torch.jit.is_tracing() or torch.compiler.is_compiling() or exporting()
            or torch.onnx.is_in_onnx_export())


def pad_to_multiple(x: torch.Tensor, multiple_h: int, multiple_w: int) -> torch.Tensor:
    """Zero-pad `[B, H, W, C]` on the bottom/right so H and W are multiples. No copy if aligned."""
    _, height, width, _ = x.shape
    pad_h = (multiple_h - height % multiple_h) % multiple_h
    pad_w = (multiple_w - width % multiple_w) % multiple_w
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x


def to_windows(x: torch.Tensor, window: int, shift: tuple[int, int]) -> torch.Tensor:
    """Map `[B, H, W, C]` -> window layout `[B, num_windows * N, C]`: zero-pad bottom/right to a
    multiple of the window, roll by `-shift`, cut into windows (row-major windows, row-major tokens)."""
    x = pad_to_multiple(x, window, window)
    batch, height, width, channels = x.shape
    if shift[0] or shift[1]:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    x = x.view(batch, height // window, window, width // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, -1, channels)


def from_windows(x: torch.Tensor, window: int, shift: tuple[int, int], height: int, width: int) -> torch.Tensor:
    """Inverse of `to_windows`: window layout -> map `[B, height, width, C]` (padding cropped)."""
    batch, _, channels = x.shape
    padded_h, padded_w = -(-height // window) * window, -(-width // window) * window
    x = x.view(batch, padded_h // window, padded_w // window, window, window, channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, padded_h, padded_w, channels)
    if shift[0] or shift[1]:
        x = torch.roll(x, shifts=shift, dims=(1, 2))
    if padded_h != height or padded_w != width:
        x = x[:, :height, :width, :].contiguous()
    return x


def drop_path_mask(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor | None:
    """Stochastic depth's per-sample multiplier for a branch like `x`: 0 with probability `rate`,
    else 1 / (1 - rate); fp32, shape `[B, 1, ..., 1]`. None when nothing is dropped."""
    if rate == 0.0 or not training:
        return None
    keep = 1.0 - rate
    mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device).bernoulli_(keep)
    return mask.div_(keep)


class DropPath(nn.Module):
    """Stochastic depth: zero whole samples of a residual branch with probability `rate`.
    `mask` (from `new_mask`) replays an earlier draw instead of drawing."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            mask = self.new_mask(x)
        return x if mask is None else x * mask.to(x.dtype)

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
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class PatchEmbed(nn.Module):
    """Image `[B, C_in, H, W]` -> patches `[B, ceil(H/p), ceil(W/p), C]`.

    The image is zero-padded on the bottom/right to a multiple of the patch size.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        pad_h, pad_w = (-x.shape[2]) % p, (-x.shape[3]) % p
        if tracing() or pad_h or pad_w:  # an export with dynamic sizes cannot branch on them
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


# The order patch merging concatenates a 2x2 neighbourhood in (official): TL, BL, TR, BR as (row, col).
MERGE_OFFSETS = ((0, 0), (1, 0), (0, 1), (1, 1))


class PatchMerging(nn.Module):
    """Halve the resolution, double the channels: `[B, H, W, C]` -> `[B, ceil(H/2), ceil(W/2), 2C]`.

    Each output token concatenates its 2x2 neighbourhood in `MERGE_OFFSETS` order (odd maps are
    zero-padded to even first); `reduce` then maps 4C -> 2C: v1 normalises the 4C concatenation
    before the reduction, v2 normalises the 2C result after it.
    """

    def __init__(self, dim: int, version: int):
        super().__init__()
        self.version = version
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim if version == 1 else 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_to_multiple(x, 2, 2)
        batch, height, width, channels = x.shape
        x = x.reshape(batch, height // 2, 2, width // 2, 2, channels).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduce(x)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., 4C]` (gathered neighbourhoods) -> `[..., 2C]`."""
        if self.version == 1:
            return self.reduction(self.norm(x))
        return self.norm(self.reduction(x))
