"""Window attention for Swin v1 (relative-position bias table) and v2 (scaled cosine
attention + log-spaced continuous position bias), and the constants they use.

The constant builders are plain functions so the model, the checkpoint converters
and the inference path share one definition of each.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .gemm import fast_linear
from .lean import window_attention as lean_window_attention

SHIFT_MASK_VALUE = -100.0  # the official value between tokens of different shifted regions
PAD_MASK_VALUE = -10000.0  # padded keys: never attended, finite so no row becomes NaN (fp16-safe)


def relative_position_index(window: tuple[int, int]) -> torch.Tensor:
    """Index into the `(2Wh-1)*(2Ww-1)` bias table for each token pair: `[N, N]`, N = Wh*Ww."""
    window_h, window_w = window
    coords = torch.stack(torch.meshgrid(torch.arange(window_h), torch.arange(window_w), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    relative[:, :, 0] += window_h - 1
    relative[:, :, 1] += window_w - 1
    return relative[:, :, 0] * (2 * window_w - 1) + relative[:, :, 1]


def relative_coords_table(window: tuple[int, int], pretrained_window: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """v2's log-spaced relative coordinates, input of the CPB MLP: `[1, 2Wh-1, 2Ww-1, 2]`.

    Coordinates are normalised by the pretrained window (when given) so that a
    model fine-tuned at a larger window sees the same scale it was trained on.
    """
    window_h, window_w = window
    rows = torch.arange(-(window_h - 1), window_h, dtype=torch.float32)
    cols = torch.arange(-(window_w - 1), window_w, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(rows, cols, indexing="ij")).permute(1, 2, 0).unsqueeze(0)
    norm_h, norm_w = pretrained_window if pretrained_window[0] > 0 else window
    table[..., 0] /= max(norm_h - 1, 1)
    table[..., 1] /= max(norm_w - 1, 1)
    table *= 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


def window_attention_mask(height: int, width: int, real_height: int, real_width: int, window: int,
                          shift: tuple[int, int], device=None) -> torch.Tensor | None:
    """Additive mask for the windows of a (shifted, padded) `height x width` map: `[num_windows, N, N]`.

    Tokens from different regions of the cyclic shift may not attend to each
    other (the official rule), and padded keys (row >= real_height or col >=
    real_width, before the shift) are never attended. Returns None when neither applies.
    """
    shift_h, shift_w = shift
    padded = height != real_height or width != real_width
    if not (shift_h or shift_w or padded):
        return None
    region = torch.zeros(height, width, device=device)
    count = 0
    for rows in _shift_slices(height, window, shift_h):
        for cols in _shift_slices(width, window, shift_w):
            region[rows, cols] = count
            count += 1
    is_pad = torch.zeros(height, width, device=device)
    is_pad[real_height:, :] = 1.0
    is_pad[:, real_width:] = 1.0
    # The padding map is defined before the cyclic shift; move it where the shift puts it.
    is_pad = torch.roll(is_pad, shifts=(-shift_h, -shift_w), dims=(0, 1))
    region = window_tokens(region, window)  # [num_windows, N]
    is_pad = window_tokens(is_pad, window)
    mask = (region[:, :, None] != region[:, None, :]).float() * SHIFT_MASK_VALUE
    return mask + is_pad[:, None, :] * PAD_MASK_VALUE


def _shift_slices(size: int, window: int, shift: int) -> list[slice]:
    if shift == 0:
        return [slice(0, size)]
    return [slice(0, size - window), slice(size - window, size - shift), slice(size - shift, size)]


def window_tokens(grid: torch.Tensor, window: int) -> torch.Tensor:
    """`[H, W]` -> `[num_windows, window*window]` in `window_partition` order."""
    height, width = grid.shape
    grid = grid.view(height // window, window, width // window, window).permute(0, 2, 1, 3)
    return grid.reshape(-1, window * window)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
           mask: torch.Tensor | None, dropout: float, scale: float | None) -> torch.Tensor:
    """Attention inside windows with one additive term.

    q, k, v: `[B * num_windows, heads, N, head_dim]`; bias: `[heads, N, N]`;
    mask: `[num_windows, N, N]` or None. Returns `[B * num_windows, heads, N, head_dim]`.
    The bias and mask are added once into `[num_windows, heads, N, N]` and broadcast
    over the batch, so no per-image copy of them exists.
    """
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0), dropout_p=dropout, scale=scale)
    num_windows = mask.shape[0]
    batch_windows, heads, tokens, head_dim = q.shape
    shape = (batch_windows // num_windows, num_windows, heads, tokens, head_dim)
    out = F.scaled_dot_product_attention(q.view(shape), k.view(shape), v.view(shape),
                                         attn_mask=bias.unsqueeze(0) + mask.unsqueeze(1).to(bias.dtype),
                                         dropout_p=dropout, scale=scale)
    return out.view(batch_windows, heads, tokens, head_dim)


def _use_lean(module: nn.Module) -> bool:
    """Use the memory-lean training kernel: autograd is recording (or block recomputation runs the
    forward it will repeat, which must compute the same numbers) and no attention dropout is asked for."""
    return (module.lean and (torch.is_grad_enabled() or module.recompute_forward)
            and not (module.training and module.attn_drop > 0))


class WindowAttentionV1(nn.Module):
    """Swin v1 multi-head self-attention inside windows with a learned relative-position bias table.

    `[B * num_windows, N, C]` (+ mask `[num_windows, N, N]`) -> `[B * num_windows, N, C]`.
    """

    def __init__(self, dim: int, num_heads: int, window: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.lean = True  # memory-lean autograd in training (see models/lean.py)
        self.keep_probs = False  # lean kernel also stores the probabilities (block recomputation sets it)
        self.recompute_forward = False  # lean kernel without autograd (block recomputation sets it)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index((window, window)).flatten(),
                             persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def relative_position_bias(self) -> torch.Tensor:
        """`[heads, N, N]`."""
        tokens = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index]
        return bias.view(tokens, tokens, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch_windows, tokens, channels = x.shape
        qkv = fast_linear(x, self.qkv.weight, self.qkv.bias)
        qkv = qkv.view(batch_windows, tokens, 3, self.num_heads, self.head_dim)
        if _use_lean(self):
            out = lean_window_attention(qkv, self.relative_position_bias(), mask, None, self.head_dim ** -0.5,
                                        self.keep_probs)
            return self.proj_drop(fast_linear(out, self.proj.weight, self.proj.bias))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        dropout = self.attn_drop if self.training else 0.0
        out = attend(q, k, v, self.relative_position_bias().to(q.dtype), mask, dropout, scale=None)
        out = out.transpose(1, 2).reshape(batch_windows, tokens, channels)
        return self.proj_drop(fast_linear(out, self.proj.weight, self.proj.bias))


class WindowAttentionV2(nn.Module):
    """Swin v2 scaled cosine attention inside windows with a log-spaced continuous position bias.

    q and k are L2-normalised, their dot product is multiplied by a learned per-head
    temperature `exp(min(logit_scale, log 100))`, and a small MLP maps relative
    coordinates to a bias squashed to (0, 16). q and v have biases, k has none.
    `[B * num_windows, N, C]` (+ mask `[num_windows, N, N]`) -> `[B * num_windows, N, C]`.
    """

    def __init__(self, dim: int, num_heads: int, window: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, pretrained_window: int = 0):
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.pretrained_window = pretrained_window
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.lean = True  # memory-lean autograd in training (see models/lean.py)
        self.keep_probs = False  # lean kernel also stores the probabilities (block recomputation sets it)
        self.recompute_forward = False  # lean kernel without autograd (block recomputation sets it)
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(num_heads, 1, 1)))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True),
                                     nn.Linear(512, num_heads, bias=False))
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.register_buffer("relative_coords_table",
                             relative_coords_table((window, window), (pretrained_window, pretrained_window)),
                             persistent=False)
        self.register_buffer("relative_position_index", relative_position_index((window, window)).flatten(),
                             persistent=False)

    def relative_position_bias(self) -> torch.Tensor:
        """`[heads, N, N]`, values in (0, 16)."""
        tokens = self.window * self.window
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index].view(tokens, tokens, -1).permute(2, 0, 1)
        return 16 * torch.sigmoid(bias)

    def logit_scale_value(self) -> torch.Tensor:
        """Per-head temperature `[heads, 1, 1]`."""
        return torch.clamp(self.logit_scale, max=math.log(100.0)).exp()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch_windows, tokens, channels = x.shape
        qkv_bias = None
        if self.q_bias is not None:
            qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = fast_linear(x, self.qkv.weight, qkv_bias)
        qkv = qkv.view(batch_windows, tokens, 3, self.num_heads, self.head_dim)
        if _use_lean(self):
            out = lean_window_attention(qkv, self.relative_position_bias(), mask, self.logit_scale, 1.0,
                                        self.keep_probs)
            return self.proj_drop(fast_linear(out, self.proj.weight, self.proj.bias))
        qkv = qkv.permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        # Cosine similarity times a per-head temperature: fold the temperature into q.
        q = F.normalize(q, dim=-1) * self.logit_scale_value().to(q.dtype)
        k = F.normalize(k, dim=-1)
        dropout = self.attn_drop if self.training else 0.0
        out = attend(q, k, v, self.relative_position_bias().to(q.dtype), mask, dropout, scale=1.0)
        out = out.transpose(1, 2).reshape(batch_windows, tokens, channels)
        return self.proj_drop(fast_linear(out, self.proj.weight, self.proj.bias))
