"""The Swin Transformer backbone and classifier, v1 and v2 in one implementation.

    image [B, C_in, H, W]
      -> PatchEmbed            [B, H/p, W/p, C]  (+ the absolute position embedding with `ape`)
      -> stage 0..S-1          each: (PatchMerging if i > 0) + blocks, [B, H_i, W_i, C_i];
                               a block sees its map in window layout [B, num_windows * N, C]
      -> LayerNorm             [B, H_S, W_S, C_S]
      -> ClassifierHead        mean over H, W -> Linear -> [B, num_classes]

v1 and v2 differ only in the block (pre-norm + bias table vs. residual post-norm
+ cosine attention + CPB) and in where patch merging normalises.

Padding rule (any input size works):
  1. the image is zero-padded bottom/right to a multiple of the patch size;
  2. patch merging zero-pads odd feature maps to even;
  3. each block zero-pads its map bottom/right to a multiple of the stage window
     (`layers.to_windows`); padded tokens are masked as keys and cropped afterwards;
  4. the odd blocks of a stage shift by window // 2 along a dimension only where
     the (unpadded) map is larger than the window in that dimension (`registry.shift_size`,
     the one rule the fast path, the ONNX export and the official layout's masks also use).

This module says WHAT is computed, once. How it runs is applied from outside: memory-lean
training and recomputation by `swinkit.train.lean`, the frozen fast path and ONNX export by
`swinkit.infer.fast`; `set_grad_checkpointing` is the one switch the model carries (as timm's).
Windows are fixed at build time from `config.img_size` as in the official code:
a stage whose resolution there is <= the window uses its resolution as the window.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import WindowAttentionV1, WindowAttentionV2, window_attention_mask
from .layers import DropPath, Mlp, PatchEmbed, PatchMerging, from_windows, to_windows, tracing
from ..weights.resize import resize_absolute_position_embedding
from .registry import SwinConfig, shift_size


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


class SwinBlock(nn.Module):
    """One (optionally shifted) window-attention block plus MLP. `[B, H, W, C]` -> `[B, H, W, C]`.

    v1: x + attn(norm1(x)), then x + mlp(norm2(x))   (pre-norm)
    v2: x + norm1(attn(x)), then x + norm2(mlp(x))   (residual post-norm)

    Everything but attention is per token; attention runs on the block's window layout
    (`to_windows`: padded, rolled by `shift`, cut into windows; mask `[num_windows, N, N]`).
    `forward_tokens` is the computation for tokens in any layout, given how to move attention's
    input there and back; `forward` gives it the map's (the fast path keeps whole stages in
    window layout and passes none). `drop_masks` replays drop-path masks drawn earlier by
    `drop_path_masks` (None: draw here).
    """

    def __init__(self, dim: int, num_heads: int, window: int, version: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 pretrained_window: int = 0):
        super().__init__()
        self.version = version
        self.window = window
        self.norm1 = nn.LayerNorm(dim)
        if version == 1:
            self.attn = WindowAttentionV1(dim, num_heads, window, qkv_bias, attn_drop, drop)
        else:
            self.attn = WindowAttentionV2(dim, num_heads, window, qkv_bias, attn_drop, drop, pretrained_window)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, shift: tuple[int, int] = (0, 0), mask: torch.Tensor | None = None,
                drop_masks: tuple = (None, None)) -> torch.Tensor:
        height, width = x.shape[1], x.shape[2]
        layout = (lambda t: to_windows(t, self.window, shift),
                  lambda t: from_windows(t, self.window, shift, height, width))
        return self.forward_tokens(x, mask, drop_masks, layout)

    def forward_tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None, drop_masks: tuple = (None, None),
                       layout: tuple | None = None) -> torch.Tensor:
        """`layout`: (into window layout, back) for attention's input and output; None: `x` is in it."""
        x = x + self.drop_path1(self.attention_branch(x, mask, layout), drop_masks[0])
        return x + self.drop_path2(self.mlp_branch(x), drop_masks[1])

    def attention_branch(self, x: torch.Tensor, mask: torch.Tensor | None, layout: tuple | None = None
                         ) -> torch.Tensor:
        into, back = layout or (_same, _same)
        if self.version == 1:
            return back(self.attn(into(self.norm1(x)), mask))
        return self.norm1(back(self.attn(into(x), mask)))

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        if self.version == 1:
            return self.mlp(self.norm2(x))
        return self.norm2(self.mlp(x))

    def drop_path_masks(self, x: torch.Tensor) -> tuple:
        """Both residual branches' drop-path masks for a batch like `x`, drawn in forward's order."""
        return self.drop_path1.new_mask(x), self.drop_path2.new_mask(x)

    def has_dropout(self) -> bool:
        """Elementwise dropout anywhere in the block (attention, projection or MLP)."""
        return self.attn.attn_drop > 0 or self.attn.proj_drop.p > 0 or self.mlp.drop.p > 0


class SwinStage(nn.Module):
    """Optional patch merging, then `depth` blocks alternating plain and shifted windows.

    `[B, H, W, C_in]` -> `[B, H', W', C_out]`. Each block works on the map in its window layout
    (`layers.to_windows`: padded, rolled by its shift, cut into windows); masks depend only on the
    map size, so they are built once per size and cached.
    """

    def __init__(self, dim: int, out_dim: int, depth: int, num_heads: int, window: int, version: int,
                 downsample: bool, mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float,
                 drop_path: list[float], pretrained_window: int = 0):
        super().__init__()
        self.window = window
        self.grad_checkpointing = False
        self.downsample = PatchMerging(dim, version) if downsample else nn.Identity()
        self.blocks = nn.ModuleList(
            SwinBlock(out_dim, num_heads, window, version, mlp_ratio, qkv_bias, drop, attn_drop, drop_path[i],
                      pretrained_window)
            for i in range(depth))
        self._mask_cache: dict[tuple, torch.Tensor | None] = {}

    def block_shifts(self, height: int, width: int) -> list[tuple[int, int]]:
        """The shift of each block at this map size: none for even blocks, `shift_size` for odd ones."""
        shift = (shift_size(height, self.window), shift_size(width, self.window))
        return [shift if i % 2 else (0, 0) for i in range(len(self.blocks))]

    def attention_mask(self, height: int, width: int, shift: tuple[int, int], device) -> torch.Tensor | None:
        """`[num_windows, N, N]` shift/padding mask of a block at this map size (cached), or None."""
        key = (height, width, shift, device)
        if key not in self._mask_cache:
            mask = window_attention_mask(height, width, self.window, shift, device)
            if tracing():
                return mask
            if len(self._mask_cache) >= 16:
                self._mask_cache.pop(next(iter(self._mask_cache)))
            self._mask_cache[key] = mask
        return self._mask_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        height, width = x.shape[1], x.shape[2]
        for block, shift in zip(self.blocks, self.block_shifts(height, width)):
            mask = self.attention_mask(height, width, shift, x.device)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, shift, mask, use_reentrant=False)
            else:
                x = block(x, shift, mask)
        return x

    def _apply(self, fn, *args, **kwargs):
        self._mask_cache.clear()  # device/dtype moves invalidate cached masks
        return super()._apply(fn, *args, **kwargs)


class ClassifierHead(nn.Module):
    """Global average pool over H, W, dropout, linear: `[B, H, W, C]` -> `[B, num_classes]`."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x.mean(dim=(1, 2)))
        return x if pre_logits else self.fc(x)


class SwinTransformer(nn.Module):
    """Swin Transformer v1 or v2 classifier built from a `SwinConfig`.

    forward: `[B, in_chans, H, W]` -> `[B, num_classes]` (features `[B, num_features]` if num_classes == 0).
    """

    def __init__(self, config: SwinConfig, name: str | None = None):
        super().__init__()
        self.config = config
        self.name = name
        self.num_classes = config.num_classes
        self.num_features = config.num_features
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, config.embed_dim, config.patch_norm)
        if config.ape:  # [1, rows * cols, C] on the img_size patch grid, row-major (official name and shape)
            rows, cols = config.patch_grid()
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, rows * cols, config.embed_dim))
        else:
            self.register_parameter("absolute_pos_embed", None)  # state dicts without ape stay as they were
        rates = config.drop_path_rates()
        dims = config.stage_dims()
        stages = []
        for i, (depth, heads, window) in enumerate(zip(config.depths, config.num_heads, config.stage_windows())):
            start = sum(config.depths[:i])
            stages.append(SwinStage(
                dim=dims[max(i - 1, 0)], out_dim=dims[i], depth=depth, num_heads=heads, window=window,
                version=config.version, downsample=i > 0, mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias,
                drop=config.drop_rate, attn_drop=config.attn_drop_rate, drop_path=rates[start:start + depth],
                pretrained_window=config.pretrained_window_sizes[i]))
        self.layers = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = ClassifierHead(self.num_features, config.num_classes, config.drop_rate)
        self.register_parameter("mask_token", None)  # masked-image pre-training only (`add_mask_token`)
        self.init_weights()

    # ----------------------------------------------------------------- init
    def init_weights(self) -> None:
        """Official init: truncated normal (std .02) for linear weights, bias tables and the absolute
        position embedding, zero biases;
        v2 additionally starts every residual post-norm at zero so each block starts as identity."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, WindowAttentionV1):
                nn.init.trunc_normal_(module.relative_position_bias_table, std=0.02)
            elif isinstance(module, WindowAttentionV2):
                nn.init.constant_(module.logit_scale, math.log(10.0))
                if module.q_bias is not None:
                    nn.init.zeros_(module.q_bias)
                    nn.init.zeros_(module.v_bias)
        if self.absolute_pos_embed is not None:
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        if self.config.version == 2:
            for stage in self.layers:
                for block in stage.blocks:
                    for norm in (block.norm1, block.norm2):
                        nn.init.zeros_(norm.weight)
                        nn.init.zeros_(norm.bias)

    def add_mask_token(self) -> nn.Parameter:
        """Give the model the learnable token that replaces masked patch embeddings (SimMIM;
        `[1, 1, embed_dim]`, truncated normal std .02 as officially). Its state-dict key is `mask_token`."""
        if self.mask_token is None:
            device = self.norm.weight.device
            self.mask_token = nn.Parameter(torch.zeros(1, 1, self.config.embed_dim, device=device))
            nn.init.trunc_normal_(self.mask_token, std=0.02)
        return self.mask_token

    # -------------------------------------------------------------- forward
    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`[B, C_in, H, W]` -> normalised last-stage map `[B, H/32, W/32, num_features]` (for patch 4).

        `mask` `[B, H/p, W/p]` (1 = masked, p the patch size; needs `add_mask_token`): masked patch
        embeddings are replaced by the mask token after the embedding's norm, as SimMIM does; the absolute
        position embedding (`ape`) is added after that, as in the official SimMIM and Hugging Face."""
        x = self.patch_embed(x)
        if mask is not None:
            x = self.mask_patches(x, mask)
        return self.norm(self.layers(self.add_position_embedding(x)))

    def position_embedding(self, height, width) -> torch.Tensor | None:
        """The absolute position embedding for a `height x width` patch grid, `[1, height * width, C]`
        row-major: the learned `img_size` table, resized bicubically for any other grid
        (`weights.resize.resize_absolute_position_embedding`, the loader's resize too). None without ape."""
        if self.absolute_pos_embed is None:
            return None
        return resize_absolute_position_embedding(self.absolute_pos_embed, self.config.patch_grid(), (height, width))

    def add_position_embedding(self, x: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """`[B, h, w, C]` patch embeddings + the absolute position embedding (`table`: a precomputed
        `position_embedding(h, w)`, as the fast path's plan holds); unchanged without ape."""
        if self.absolute_pos_embed is None:
            return x
        if table is None:
            table = self.position_embedding(x.shape[1], x.shape[2])
        return x + table.view(1, x.shape[1], x.shape[2], -1).to(x.dtype)

    def mask_patches(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`[B, h, w, C]` patch embeddings, `[B, h, w]` 0/1 mask -> embeddings with the masked ones
        replaced by the mask token."""
        if self.mask_token is None:
            raise ValueError("this model has no mask token: call add_mask_token() (or use swinkit.create_simmim)")
        if mask.shape != x.shape[:3]:
            raise ValueError(f"mask of shape {list(mask.shape)} does not match the {list(x.shape[:3])} patch grid "
                             f"(batch, H/{self.config.patch_size}, W/{self.config.patch_size})")
        weight = mask.unsqueeze(-1).to(x.dtype)
        return x * (1.0 - weight) + self.mask_token.to(x.dtype) * weight

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """`[B, H, W, num_features]` -> `[B, num_classes]` (or pooled `[B, num_features]`)."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Output of every stage as NCHW maps; the last one after the final norm.

        Swin-T at 224: [B,96,56,56], [B,192,28,28], [B,384,14,14], [B,768,7,7].
        """
        x = self.add_position_embedding(self.patch_embed(x))
        maps = []
        for i, stage in enumerate(self.layers):
            x = stage(x)
            out = self.norm(x) if i == len(self.layers) - 1 else x
            maps.append(out.permute(0, 3, 1, 2).contiguous())
        return maps

    # ------------------------------------------------------------ utilities
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block in backward instead of storing its activations (torch.utils.checkpoint,
        as timm). `swinkit.train.lean` offers finer, sliced recomputation for training."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def blocks(self) -> list[SwinBlock]:
        return [block for stage in self.layers for block in stage.blocks]

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one for `num_classes` (0 = features only)."""
        self.num_classes = num_classes
        self.config = self.config.replace(num_classes=num_classes)
        device = self.norm.weight.device
        self.head = ClassifierHead(self.num_features, num_classes, self.config.drop_rate).to(device)
        if num_classes > 0:
            nn.init.trunc_normal_(self.head.fc.weight, std=0.02)
            nn.init.zeros_(self.head.fc.bias)

    def no_weight_decay_keywords(self) -> tuple[str, ...]:
        """Parameter-name fragments exempt from weight decay (besides 1-D norms and biases)."""
        return ("relative_position_bias_table", "logit_scale", "cpb_mlp", "mask_token", "absolute_pos_embed")

    def flops(self, img_size: int | tuple[int, int] | None = None) -> int:
        """Multiply-accumulates of one forward pass (the official count: GMACs reported as 'FLOPs').
        Swin-T at 224 gives 4.5e9. See `macs`."""
        counts = macs(self.config, img_size)
        return counts["other"] + sum(attention + mlp for attention, mlp in counts["blocks"])

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# A training step's matmuls per image: the forward pass, then the input and the weight gradient, each the
# forward's size.
TRAINING_PASSES = 3


def flops_per_image(model: SwinTransformer, img_size: int | tuple[int, int] | None = None, *,
                    training: bool = False) -> int:
    """FLOPs (2 x `model.flops`' multiply-accumulates) of one image's forward pass, or with `training` of its
    training step (`TRAINING_PASSES` x that): what the benchmarks' GFLOP/s and the memory planner count."""
    return 2 * model.flops(img_size) * (TRAINING_PASSES if training else 1)


def macs(config: SwinConfig, img_size: int | tuple[int, int] | None = None) -> dict:
    """THE operation count of a forward pass, in multiply-accumulates per image:
    {"blocks": [(attention branch, MLP branch) per block], "other": embedding, merging, norm, head}.

    An attention branch counts its norm, the qkv and output projections and the two attention
    matmuls over padded windows; an MLP branch its norm and two linears. Constant position-bias
    work (v2's CPB MLP) is excluded, as it is precomputable; padding is included.
    """
    img_size = config.img_size if img_size is None else img_size
    img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    resolutions = config.stage_resolutions(img_size)
    height, width = resolutions[0]
    other = height * width * config.embed_dim * config.in_chans * config.patch_size ** 2
    if config.patch_norm:
        other += height * width * config.embed_dim
    blocks = []
    for i, (dim, depth, heads, window) in enumerate(zip(config.stage_dims(), config.depths, config.num_heads,
                                                        config.stage_windows())):
        if i > 0:
            prev_h, prev_w = resolutions[i - 1]
            height, width = resolutions[i]
            other += prev_h * prev_w * (dim // 2) + height * width * (2 * dim) * dim  # merging: norm, reduction
        height, width = resolutions[i]
        windows = math.ceil(height / window) * math.ceil(width / window)
        tokens = window * window
        attention = (windows * (tokens * dim * 3 * dim + 2 * heads * tokens * tokens * (dim // heads)
                                + tokens * dim * dim) + height * width * dim)
        mlp = 2 * height * width * dim * int(dim * config.mlp_ratio) + height * width * dim
        blocks += [(attention, mlp)] * depth
    height, width = resolutions[-1]
    other += height * width * config.num_features
    if config.num_classes > 0:
        other += config.num_features * config.num_classes
    return {"blocks": blocks, "other": other}
