"""The Swin Transformer v1/v2 classifier in Flax NNX: the PyTorch model's computation, written for JAX.

    image [B, H, W, C_in]  (NHWC, the JAX convention; the PyTorch model takes NCHW)
      -> PatchEmbed            [B, H/p, W/p, C]  (+ the absolute position embedding with `ape`)
      -> stage 0..S-1          (PatchMerging if i > 0) + blocks, [B, H_i, W_i, C_i]
      -> LayerNorm, mean over H, W, Linear -> [B, num_classes]

Every rule that is not the arithmetic itself comes from the PyTorch side, which owns it:
the variant table and stage windows (`models.registry`), which blocks shift and by how much
(`models.swin.SwinStage.block_shifts`, `registry.shift_size`), the constant tables and the
shift/padding mask (`models.attention`, evaluated once per window or map size and cached
as numpy), the resize of the absolute position embedding (`weights.resize`, as matrices
cached per size), the drop-path rates (`SwinConfig.drop_path_rates`) and the weight-decay
exemptions. Parameters are laid out under the PyTorch state-dict names (`convert.py` maps
them); they start at zero here: `swinkit.jax.create_model` fills them from the PyTorch
model, the one owner of the initialisation and of every checkpoint layout.

Dropout and drop path are `nnx.Dropout` modules (drop path drops whole samples: its mask
broadcasts over every non-batch dimension); `model.train()` / `model.eval()` switch them.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from ..models import attention as torch_attention
from ..models import swin as torch_swin
from ..models.registry import SwinConfig
from ..weights.resize import resize_absolute_position_embedding

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default (Flax's is 1e-6)
_ZEROS = nnx.initializers.zeros_init()


# ------------------------------------------------------------------------------ constants (cached numpy)
@functools.lru_cache(maxsize=None)
def position_constants(window: int, pretrained_window: int) -> tuple[np.ndarray, np.ndarray]:
    """(relative_position_index `[N * N]` int32, v2 relative_coords_table `[1, 2W-1, 2W-1, 2]` float32)
    for a square window, from the PyTorch definitions."""
    index = torch_attention.relative_position_index((window, window)).flatten().numpy().astype(np.int32)
    coords = torch_attention.relative_coords_table((window, window), (pretrained_window, pretrained_window))
    return index, coords.numpy()


@functools.lru_cache(maxsize=64)
def attention_mask(height: int, width: int, window: int, shift: tuple[int, int]) -> np.ndarray | None:
    """The additive shift/padding mask `[num_windows, N, N]` of a `height x width` map, or None."""
    mask = torch_attention.window_attention_mask(height, width, window, shift)
    return None if mask is None else mask.numpy()


@functools.lru_cache(maxsize=64)
def bicubic_matrix(size: int, new_size: int) -> np.ndarray:
    """`[new_size, size]` float32: the PyTorch resize of the absolute position embedding along one axis
    (`weights.resize.resize_absolute_position_embedding`, bicubic, separable) as a matrix, read off by
    resizing the identity, so the JAX model resizes as PyTorch does (`jax.image.resize`'s bicubic uses
    another kernel: ~5e-3 off on a 0.07-scale table, against ~1e-8 here)."""
    identity = torch.eye(size).unsqueeze(0)  # [1, size positions on a size x 1 grid, a one-hot channel each]
    return resize_absolute_position_embedding(identity, (size, 1), (new_size, 1))[0].numpy().copy()


# ------------------------------------------------------------------------------------- window layout
def pad_to_multiple(x: jax.Array, multiple_h: int, multiple_w: int) -> jax.Array:
    """Zero-pad `[B, H, W, C]` on the bottom/right so H and W are multiples."""
    _, height, width, _ = x.shape
    pad_h, pad_w = (-height) % multiple_h, (-width) % multiple_w
    if pad_h or pad_w:
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    return x


def to_windows(x: jax.Array, window: int, shift: tuple[int, int]) -> jax.Array:
    """`[B, H, W, C]` -> window layout `[B, num_windows * N, C]`: pad, roll by -shift, cut into windows."""
    x = pad_to_multiple(x, window, window)
    batch, height, width, channels = x.shape
    if shift[0] or shift[1]:
        x = jnp.roll(x, (-shift[0], -shift[1]), axis=(1, 2))
    x = x.reshape(batch, height // window, window, width // window, window, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, -1, channels)


def from_windows(x: jax.Array, window: int, shift: tuple[int, int], height: int, width: int) -> jax.Array:
    """Inverse of `to_windows`: window layout -> map `[B, height, width, C]` (padding cropped)."""
    batch, _, channels = x.shape
    padded_h, padded_w = -(-height // window) * window, -(-width // window) * window
    x = x.reshape(batch, padded_h // window, padded_w // window, window, window, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, padded_h, padded_w, channels)
    if shift[0] or shift[1]:
        x = jnp.roll(x, shift, axis=(1, 2))
    return x[:, :height, :width, :]


def _linear(in_features: int, out_features: int, rngs: nnx.Rngs, bias: bool = True) -> nnx.Linear:
    return nnx.Linear(in_features, out_features, use_bias=bias, kernel_init=_ZEROS, rngs=rngs)


def _layer_norm(features: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(features, epsilon=LAYER_NORM_EPS, use_fast_variance=False, rngs=rngs)


def _dropout(rate: float, rngs: nnx.Rngs, broadcast_dims: tuple[int, ...] = ()) -> nnx.Dropout:
    """Dropout with its own random stream, or none at rate 0 (it never draws: a smaller state)."""
    return nnx.Dropout(rate, broadcast_dims=broadcast_dims, rngs=rngs if rate > 0 else None)


def _drop_path(rate: float, rngs: nnx.Rngs) -> nnx.Dropout:
    """Stochastic depth for `[B, H, W, C]`: dropout whose mask is one draw per sample."""
    return _dropout(rate, rngs, broadcast_dims=(1, 2, 3))


# ------------------------------------------------------------------------------------------- modules
class WindowAttention(nnx.Module):
    """Multi-head self-attention inside (shifted) windows, v1 or v2.
    `[B, num_windows * N, C]` (+ mask `[num_windows, N, N]`) -> same shape.

    v1: q k^T * head_dim^-0.5 + bias from a learned table.
    v2: cosine similarity * exp(min(logit_scale, log 100)) + 16 sigmoid(CPB MLP(log-spaced coords)).
    Scores and softmax run in at least fp32, as in the PyTorch `attention_probs`.
    """

    def __init__(self, dim: int, num_heads: int, window: int, version: int, qkv_bias: bool, attn_drop: float,
                 proj_drop: float, pretrained_window: int, *, rngs: nnx.Rngs):
        self.num_heads, self.window, self.version = num_heads, window, version
        self.pretrained_window = pretrained_window
        self.head_dim = dim // num_heads
        if version == 1:
            self.relative_position_bias_table = nnx.Param(jnp.zeros(((2 * window - 1) ** 2, num_heads)))
            self.qkv = _linear(dim, 3 * dim, rngs, bias=qkv_bias)
        else:
            self.logit_scale = nnx.Param(jnp.zeros((num_heads, 1, 1)))
            self.cpb_mlp = nnx.Sequential(_linear(2, 512, rngs), jax.nn.relu,
                                          _linear(512, num_heads, rngs, bias=False))
            self.qkv = _linear(dim, 3 * dim, rngs, bias=False)
            self.q_bias = nnx.Param(jnp.zeros((dim,))) if qkv_bias else None
            self.v_bias = nnx.Param(jnp.zeros((dim,))) if qkv_bias else None
        self.attn_drop = _dropout(attn_drop, rngs)
        self.proj = _linear(dim, dim, rngs)
        self.proj_drop = _dropout(proj_drop, rngs)

    def relative_position_bias(self) -> jax.Array:
        """`[heads, N, N]`."""
        index, coords = position_constants(self.window, self.pretrained_window)
        tokens = self.window * self.window
        if self.version == 1:
            table = self.relative_position_bias_table[...]
        else:
            table = self.cpb_mlp(jnp.asarray(coords)).reshape(-1, self.num_heads)
        bias = table[index].reshape(tokens, tokens, self.num_heads).transpose(2, 0, 1)
        return bias if self.version == 1 else 16 * jax.nn.sigmoid(bias)

    def project_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        if self.version == 1 or self.q_bias is None:
            qkv = self.qkv(x)
        else:
            bias = jnp.concatenate([self.q_bias[...], jnp.zeros_like(self.v_bias[...]), self.v_bias[...]])
            qkv = self.qkv(x)
            qkv = qkv + bias.astype(qkv.dtype)
        return tuple(jnp.split(qkv, 3, axis=-1))

    def __call__(self, x: jax.Array, mask: np.ndarray | None = None) -> jax.Array:
        batch, length, channels = x.shape
        tokens = self.window * self.window

        def split_heads(t):  # [B, L, C] -> [B, num_windows, heads, N, head_dim]
            return t.reshape(batch, length // tokens, tokens, self.num_heads, self.head_dim).transpose(0, 1, 3, 2, 4)

        q, k, v = (split_heads(t) for t in self.project_qkv(x))
        if self.version == 1:
            q = q * self.head_dim ** -0.5
        else:
            q, k = _normalize(q), _normalize(k)
            temperature = jnp.exp(jnp.minimum(self.logit_scale[...], torch_attention.LOG_MAX_TEMPERATURE))
            q = q * temperature.astype(q.dtype)
        bias = self.relative_position_bias()[None]
        if mask is not None:
            bias = bias + jnp.asarray(mask)[:, None]
        scores = jnp.matmul(q, k.swapaxes(-2, -1)).astype(jnp.promote_types(q.dtype, jnp.float32))
        probs = jax.nn.softmax(scores + bias.astype(scores.dtype), axis=-1).astype(q.dtype)
        out = jnp.matmul(self.attn_drop(probs), v)
        out = out.transpose(0, 1, 3, 2, 4).reshape(batch, length, channels)
        return self.proj_drop(self.proj(out))


def _normalize(x: jax.Array) -> jax.Array:
    """x / max(|x|, 1e-12) along the last axis (torch.nn.functional.normalize)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True))
    return (x / jnp.maximum(norm, 1e-12)).astype(x.dtype)


class Mlp(nnx.Module):
    """fc1 -> GELU (exact, as torch.nn.GELU) -> dropout -> fc2 -> dropout. `[..., C]` -> `[..., C]`."""

    def __init__(self, dim: int, hidden_dim: int, drop: float, *, rngs: nnx.Rngs):
        self.fc1 = _linear(dim, hidden_dim, rngs)
        self.fc2 = _linear(hidden_dim, dim, rngs)
        self.drop = _dropout(drop, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.drop(self.fc2(self.drop(jax.nn.gelu(self.fc1(x), approximate=False))))


class SwinBlock(nnx.Module):
    """One (optionally shifted) window-attention block plus MLP. `[B, H, W, C]` -> `[B, H, W, C]`.

    v1: x + attn(norm1(x)), then x + mlp(norm2(x))   (pre-norm)
    v2: x + norm1(attn(x)), then x + norm2(mlp(x))   (residual post-norm)
    """

    def __init__(self, dim: int, num_heads: int, window: int, version: int, mlp_ratio: float, qkv_bias: bool,
                 drop: float, attn_drop: float, drop_path: float, pretrained_window: int, *, rngs: nnx.Rngs):
        self.version, self.window = version, window
        self.norm1 = _layer_norm(dim, rngs)
        self.attn = WindowAttention(dim, num_heads, window, version, qkv_bias, attn_drop, drop, pretrained_window,
                                    rngs=rngs)
        self.drop_path1 = _drop_path(drop_path, rngs)
        self.norm2 = _layer_norm(dim, rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop, rngs=rngs)
        self.drop_path2 = _drop_path(drop_path, rngs)

    def __call__(self, x: jax.Array, shift: tuple[int, int] = (0, 0), mask: np.ndarray | None = None) -> jax.Array:
        height, width = x.shape[1], x.shape[2]

        def attend(t):
            return from_windows(self.attn(to_windows(t, self.window, shift), mask), self.window, shift, height, width)

        if self.version == 1:
            x = x + self.drop_path1(attend(self.norm1(x)))
            return x + self.drop_path2(self.mlp(self.norm2(x)))
        x = x + self.drop_path1(self.norm1(attend(x)))
        return x + self.drop_path2(self.norm2(self.mlp(x)))


class PatchMerging(nnx.Module):
    """Halve the resolution, double the channels: `[B, H, W, C]` -> `[B, ceil(H/2), ceil(W/2), 2C]`
    (2x2 neighbourhoods concatenated in `layers.MERGE_OFFSETS` order; v1 norm before, v2 after the reduction)."""

    def __init__(self, dim: int, version: int, *, rngs: nnx.Rngs):
        self.version = version
        self.reduction = _linear(4 * dim, 2 * dim, rngs, bias=False)
        self.norm = _layer_norm(4 * dim if version == 1 else 2 * dim, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = pad_to_multiple(x, 2, 2)
        batch, height, width, channels = x.shape
        x = x.reshape(batch, height // 2, 2, width // 2, 2, channels).transpose(0, 1, 3, 4, 2, 5)
        x = x.reshape(batch, height // 2, width // 2, 4 * channels)
        return self.reduction(self.norm(x)) if self.version == 1 else self.norm(self.reduction(x))


class SwinStage(nnx.Module):
    """Optional patch merging, then blocks alternating plain and shifted windows.
    `[B, H, W, C_in]` -> `[B, H', W', C_out]`.

    `remat_policy` (set from outside by `swinkit.jax.train.apply_remat`) wraps each block in
    `jax.checkpoint`: None stores activations, else the name of a `jax.checkpoint_policies` entry."""

    block_shifts = torch_swin.SwinStage.block_shifts  # the shift rule of the PyTorch stage, one owner

    def __init__(self, dim: int, out_dim: int, depth: int, num_heads: int, window: int, version: int,
                 downsample: bool, mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float,
                 drop_path: list[float], pretrained_window: int, *, rngs: nnx.Rngs):
        self.window = window
        self.remat_policy: str | None = None
        self.downsample = PatchMerging(dim, version, rngs=rngs) if downsample else None
        self.blocks = nnx.List([
            SwinBlock(out_dim, num_heads, window, version, mlp_ratio, qkv_bias, drop, attn_drop, drop_path[i],
                      pretrained_window, rngs=rngs)
            for i in range(depth)])

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.downsample is not None:
            x = self.downsample(x)
        height, width = x.shape[1], x.shape[2]
        for block, shift in zip(self.blocks, self.block_shifts(height, width)):
            mask = attention_mask(height, width, self.window, shift)
            if self.remat_policy is None:
                x = block(x, shift, mask)
            else:
                x = _remat_block(block, x, shift, mask, self.remat_policy)
        return x


def _remat_block(block: SwinBlock, x: jax.Array, shift: tuple[int, int], mask, policy: str) -> jax.Array:
    """`block(x)` recomputed in backward (`nnx.remat` under `jax.checkpoint_policies.<policy>`)."""
    run = nnx.remat(lambda module, t: module(t, shift, mask), policy=getattr(jax.checkpoint_policies, policy))
    return run(block, x)


class SwinTransformer(nnx.Module):
    """Swin Transformer v1 or v2 classifier built from a `SwinConfig`.

    `[B, H, W, in_chans]` (any H, W) -> `[B, num_classes]` (pooled features if num_classes == 0).
    """

    # Parameter-name fragments exempt from weight decay: the PyTorch model's list (one owner).
    no_weight_decay_keywords = torch_swin.SwinTransformer.no_weight_decay_keywords

    def __init__(self, config: SwinConfig, name: str | None = None, *, rngs: nnx.Rngs):
        self.config, self.name = config, name
        self.num_classes, self.num_features = config.num_classes, config.num_features
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, config.embed_dim, config.patch_norm,
                                      rngs=rngs)
        rows, cols = config.patch_grid()
        self.absolute_pos_embed = nnx.Param(jnp.zeros((1, rows * cols, config.embed_dim))) if config.ape else None
        rates, dims = config.drop_path_rates(), config.stage_dims()
        stages = []
        for i, (depth, heads, window) in enumerate(zip(config.depths, config.num_heads, config.stage_windows())):
            start = sum(config.depths[:i])
            stages.append(SwinStage(
                dims[max(i - 1, 0)], dims[i], depth, heads, window, config.version, i > 0, config.mlp_ratio,
                config.qkv_bias, config.drop_rate, config.attn_drop_rate, rates[start:start + depth],
                config.pretrained_window_sizes[i], rngs=rngs))
        self.layers = nnx.List(stages)
        self.norm = _layer_norm(self.num_features, rngs)
        self.head = ClassifierHead(self.num_features, config.num_classes, config.drop_rate, rngs=rngs)

    def forward_features(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, C_in]` -> normalised last-stage map `[B, H/32, W/32, num_features]` (for patch 4)."""
        x = self.add_position_embedding(self.patch_embed(x))
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)

    def add_position_embedding(self, x: jax.Array) -> jax.Array:
        """`[B, h, w, C]` patch embeddings + the absolute position embedding (`ape`), resized from the
        `img_size` grid to h x w as the PyTorch model resizes it (`bicubic_matrix`); unchanged without ape."""
        if self.absolute_pos_embed is None:
            return x
        rows, cols = self.config.patch_grid()
        height, width = x.shape[1], x.shape[2]
        table = self.absolute_pos_embed[...].reshape(rows, cols, -1)
        if (height, width) != (rows, cols):
            table = jnp.einsum("hr,rcd,wc->hwd", bicubic_matrix(rows, height), table.astype(jnp.float32),
                               bicubic_matrix(cols, width), precision=jax.lax.Precision.HIGHEST)
        return x + table[None].astype(x.dtype)

    def forward_head(self, x: jax.Array, pre_logits: bool = False) -> jax.Array:
        return self.head(x, pre_logits=pre_logits)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.forward_head(self.forward_features(x))


class PatchEmbed(nnx.Module):
    """Image `[B, H, W, C_in]` -> patches `[B, ceil(H/p), ceil(W/p), C]` (zero-padded bottom/right)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm: bool, *, rngs: nnx.Rngs):
        self.patch_size = patch_size
        self.proj = nnx.Conv(in_chans, embed_dim, kernel_size=(patch_size, patch_size),
                             strides=(patch_size, patch_size), padding="VALID", kernel_init=_ZEROS, rngs=rngs)
        self.norm = _layer_norm(embed_dim, rngs) if norm else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.proj(pad_to_multiple(x, self.patch_size, self.patch_size))
        return x if self.norm is None else self.norm(x)


class ClassifierHead(nnx.Module):
    """Mean over H, W, dropout, linear: `[B, H, W, C]` -> `[B, num_classes]`."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float, *, rngs: nnx.Rngs):
        self.drop = _dropout(drop_rate, rngs)
        self.fc = _linear(in_features, num_classes, rngs) if num_classes > 0 else None

    def __call__(self, x: jax.Array, pre_logits: bool = False) -> jax.Array:
        x = self.drop(x.mean(axis=(1, 2)))
        return x if pre_logits or self.fc is None else self.fc(x)
