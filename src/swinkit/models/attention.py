"""Window attention, written once for Swin v1 and v2, and the constants it uses.

    scores = temperature * q' k'^T + bias (+ shift/padding mask)      q' = q, k' = k (v1)
    out    = softmax(scores) v                                        q' = q/|q|, k' = k/|k| (v2)

v1: temperature = head_dim ** -0.5 and bias from a learned relative-position table;
v2 (scaled cosine attention): a learned per-head temperature exp(min(logit_scale, log 100))
and bias = 16 * sigmoid(CPB MLP of log-spaced relative coordinates).

`window_attention` is the one functional form (eval, training, the fast path and the ONNX
export all run it; the memory-lean training kernel recomputes `attention_probs` in backward).
The constant builders are plain functions so the model, the checkpoint converters and the
inference path share one definition of each.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import native
from .layers import tracing

SHIFT_MASK_VALUE = -100.0  # the official value between tokens of different shifted regions
PAD_MASK_VALUE = -10000.0  # padded keys: never attended, finite so no row becomes NaN (fp16-safe)
LOG_MAX_TEMPERATURE = math.log(100.0)  # v2 clamps logit_scale here


# ----------------------------------------------------------------------------------- the computation
def scaled_query_key(q: torch.Tensor, k: torch.Tensor, temperature, cosine: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(temperature * q', k'), whose product is the scores before bias: q' = q/|q|, k' = k/|k| for v2's
    cosine attention, else q, k. temperature: a float (1.0: the fast path folded it into the q
    projection, nothing to do) or per head `[heads, 1, 1]`."""
    if cosine:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    if torch.is_tensor(temperature):
        q = q * temperature.to(q.dtype)
    elif temperature != 1.0:
        q = q * temperature
    return q, k


def attention_probs(q: torch.Tensor, k: torch.Tensor, attn_bias: torch.Tensor, temperature, cosine: bool
                    ) -> torch.Tensor:
    """softmax(temperature * q' k'^T + attn_bias): `[B, num_windows, heads, N, N]`.

    q, k: `[B, num_windows, heads, N, head_dim]`; attn_bias broadcasts to the scores
    (`[num_windows or 1, heads, N, N]`: position bias plus mask); temperature: a float or `[heads, 1, 1]`.
    The softmax runs in at least fp32 (bf16/fp16 inputs are promoted, the result cast back).
    """
    q, k = scaled_query_key(q, k, temperature, cosine)
    scores = torch.matmul(q, k.transpose(-2, -1)).to(torch.promote_types(q.dtype, torch.float32))
    scores += attn_bias.to(scores.dtype)  # in place: the scores are not needed for backward
    return torch.softmax(scores, dim=-1).to(q.dtype)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: torch.Tensor, temperature,
                     cosine: bool, dropout: float = 0.0, fused: bool = False) -> torch.Tensor:
    """Attention inside windows: `[B, num_windows, heads, N, head_dim]` x3 -> same shape.

    Plain batched matmuls by default: what training differentiates (the lean kernel recomputes
    `attention_probs`) and what an exporter sees. `fused=True` computes the same attention in one
    call (no dropout) that reads q, k and v where they lie (strided slices of the fused projection,
    no head-split copies), never stores the scores and writes its output token-major, so
    `merge_heads` is a view: swinkit's own kernel where it applies (`native.window_attention`: CPU,
    fp32 or bf16, windows up to 64 tokens, no autograd), else torch's `scaled_dot_product_attention` with the
    windows folded into its batch."""
    if fused:
        return _fused_window_attention(q, k, v, attn_bias, temperature, cosine)
    probs = attention_probs(q, k, attn_bias, temperature, cosine)
    if dropout:
        probs = F.dropout(probs, dropout)
    return torch.matmul(probs, v)


def _fused_window_attention(q, k, v, attn_bias, temperature, cosine: bool) -> torch.Tensor:
    batch, windows, heads, tokens, head_dim = q.shape
    q, k = scaled_query_key(q, k, temperature, cosine)
    if native.window_attention_applies(q, k, v, attn_bias):  # swinkit's CPU kernel: fp32/bf16, windows up to 8x8
        return native.window_attention(q, k, v, attn_bias)
    if attn_bias.shape[0] > 1 and batch > 1:  # per window: the kernel's batch is windows of all images
        attn_bias = attn_bias.expand(batch, *attn_bias.shape).reshape(batch * windows, heads, tokens, tokens)
    out = F.scaled_dot_product_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                                         attn_mask=attn_bias.to(q.dtype), scale=1.0)
    return out.view(batch, windows, heads, tokens, head_dim)


def split_heads(x: torch.Tensor, window: int, num_heads: int) -> torch.Tensor:
    """`[B, num_windows * N, C]` -> `[B, num_windows, heads, N, head_dim]` (a view; `x` may be a slice
    of a fused qkv projection)."""
    batch, length, channels = x.shape
    tokens = window * window
    return x.view(batch, length // tokens, tokens, num_heads, channels // num_heads).transpose(2, 3)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """`[B, num_windows, heads, N, head_dim]` -> `[B, num_windows * N, heads * head_dim]`."""
    batch, windows, heads, tokens, head_dim = x.shape
    return x.permute(0, 1, 3, 2, 4).reshape(batch, windows * tokens, heads * head_dim)


# ------------------------------------------------------------------------------------------ constants
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


def long_scalar(value, device) -> torch.Tensor:
    """A 0-d long tensor of an int, a symbolic int (export: `torch.full` keeps it symbolic) or a tensor."""
    if torch.is_tensor(value):
        return value.to(device=device, dtype=torch.long)
    return torch.full((), value, dtype=torch.long, device=device)


def window_layout(height, width, window: int, shift, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each window slot's token comes from, and the attention mask, for a `height x width` map
    in the window layout of `layers.to_windows(x, window, shift)`.

    Returns (token `[num_windows * N]`: the row-major map index in each slot, -1 for padding;
    mask `[num_windows, N, N]`: SHIFT_MASK_VALUE between tokens of different regions of the cyclic
    shift (the official rule), PAD_MASK_VALUE for padded keys).
    Sizes and shifts may be ints or 0-d tensors: built from aranges and broadcasting only, so an
    export with dynamic height and width computes it in the graph without specialising a size.
    """
    windows_h, windows_w = (height + window - 1) // window, (width + window - 1) // window
    padded_h, padded_w = long_scalar(windows_h * window, device), long_scalar(windows_w * window, device)
    windows = torch.arange(windows_h * windows_w, device=device)[:, None]  # [num_windows, 1]
    tokens = torch.arange(window * window, device=device)[None, :]         # [1, N]
    windows_w = long_scalar(windows_w, device)
    rolled_r = torch.div(windows, windows_w, rounding_mode="floor") * window + tokens // window  # [nW, N]
    rolled_c = torch.remainder(windows, windows_w) * window + tokens % window
    shift_h, shift_w = long_scalar(shift[0], device), long_scalar(shift[1], device)
    source_r = torch.remainder(rolled_r + shift_h, padded_h)
    source_c = torch.remainder(rolled_c + shift_w, padded_w)
    height, width = long_scalar(height, device), long_scalar(width, device)
    pad = (source_r >= height) | (source_c >= width)
    token = torch.where(pad, -1, source_r * width + source_c)
    # The official shift regions (0, 1, 2) along each axis of the rolled map; unshifted, the
    # split falls on a window edge, which no window straddles.
    region_r = (rolled_r >= padded_h - window).long() + (rolled_r >= padded_h - shift_h).long()
    region_c = (rolled_c >= padded_w - window).long() + (rolled_c >= padded_w - shift_w).long()
    region = region_r * 3 + region_c
    mask = ((region[:, :, None] != region[:, None, :]).float() * SHIFT_MASK_VALUE
            + pad[:, None, :].float() * PAD_MASK_VALUE)
    return token.flatten(), mask


def window_attention_mask(height: int, width: int, window: int, shift: tuple[int, int], device=None
                          ) -> torch.Tensor | None:
    """The additive mask `[num_windows, N, N]` of a `height x width` map (None: nothing to mask)."""
    if not (shift[0] or shift[1] or height % window or width % window):
        return None
    return window_layout(height, width, window, shift, device)[1]


# -------------------------------------------------------------------------------------------- modules
class WindowAttention(nn.Module):
    """Multi-head self-attention inside (shifted) windows; v1 and v2 differ in `relative_position_bias`,
    `temperature` and the qkv bias. `[B, num_windows * N, C]` (+ mask `[num_windows, N, N]`) -> same shape."""

    cosine = False
    fused_attention = False  # `window_attention(fused=True)` outside tracers; the fast inference path sets it

    def __init__(self, dim: int, num_heads: int, window: int, attn_drop: float):
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop

    def _output_projection(self, dim: int, proj_drop: float) -> None:
        # Registered after the subclass's own parameters: the official/timm order, so a seeded
        # init draws the same weights as theirs.
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.project_qkv(x)
        return self.proj_drop(self.proj(self.attend(q, k, v, self.attention_bias(mask))))

    def attention_bias(self, mask: torch.Tensor | None) -> torch.Tensor:
        """Position bias plus mask, `[num_windows or 1, heads, N, N]` (no batch dimension)."""
        bias = self.relative_position_bias().unsqueeze(0)
        return bias if mask is None else bias + mask.unsqueeze(1).to(bias.dtype)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        """q, k, v `[B, num_windows * N, C]` -> attention output `[B, num_windows * N, C]`."""
        q, k, v = (split_heads(t, self.window, self.num_heads) for t in (q, k, v))
        dropout = self.attn_drop if self.training else 0.0
        fused = self.fused_attention and not dropout and not tracing()
        return merge_heads(window_attention(q, k, v, attn_bias, self.temperature(), self.cosine, dropout, fused))

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`[B, L, C]` -> q, k, v `[B, L, C]`: slices of one fused projection."""
        return F.linear(x, self.qkv.weight, self.qkv_bias()).chunk(3, dim=-1)

    def qkv_bias(self) -> torch.Tensor | None:
        raise NotImplementedError

    def relative_position_bias(self) -> torch.Tensor:
        raise NotImplementedError

    def temperature(self):
        raise NotImplementedError


class WindowAttentionV1(WindowAttention):
    """Swin v1: dot-product attention scaled by head_dim ** -0.5, bias from a learned table."""

    def __init__(self, dim: int, num_heads: int, window: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__(dim, num_heads, window, attn_drop)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index((window, window)).flatten(),
                             persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self._output_projection(dim, proj_drop)

    def qkv_bias(self) -> torch.Tensor | None:
        return self.qkv.bias

    def relative_position_bias(self) -> torch.Tensor:
        """`[heads, N, N]`."""
        tokens = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index]
        return bias.view(tokens, tokens, -1).permute(2, 0, 1)

    def temperature(self) -> float:
        return self.head_dim ** -0.5


class WindowAttentionV2(WindowAttention):
    """Swin v2: scaled cosine attention with a learned per-head temperature and a log-spaced
    continuous position bias (CPB MLP) squashed to (0, 16); q and v have biases, k has none."""

    cosine = True

    def __init__(self, dim: int, num_heads: int, window: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, pretrained_window: int = 0):
        super().__init__(dim, num_heads, window, attn_drop)
        self.pretrained_window = pretrained_window
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(num_heads, 1, 1)))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True),
                                     nn.Linear(512, num_heads, bias=False))
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self._output_projection(dim, proj_drop)
        self.register_buffer("relative_coords_table",
                             relative_coords_table((window, window), (pretrained_window, pretrained_window)),
                             persistent=False)
        self.register_buffer("relative_position_index", relative_position_index((window, window)).flatten(),
                             persistent=False)

    def qkv_bias(self) -> torch.Tensor | None:
        if self.q_bias is None:
            return None
        return torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))

    def relative_position_bias(self) -> torch.Tensor:
        """`[heads, N, N]`, values in (0, 16)."""
        tokens = self.window * self.window
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index].view(tokens, tokens, -1).permute(2, 0, 1)
        return 16 * torch.sigmoid(bias)

    def temperature(self) -> torch.Tensor:
        """Per-head temperature `[heads, 1, 1]`."""
        return torch.clamp(self.logit_scale, max=LOG_MAX_TEMPERATURE).exp()
