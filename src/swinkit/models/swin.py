"""The Swin Transformer backbone and classifier, v1 and v2 in one implementation.

    image [B, C_in, H, W]
      -> PatchEmbed            [B, H/p, W/p, C]
      -> stage 0..S-1          each: (PatchMerging if i > 0) + blocks, [B, H_i, W_i, C_i]
      -> LayerNorm             [B, H_S, W_S, C_S]
      -> ClassifierHead        mean over H, W -> Linear -> [B, num_classes]

v1 and v2 differ only in the block (pre-norm + bias table vs. residual post-norm
+ cosine attention + CPB) and in where patch merging normalises.

Padding rule (any input size works):
  1. the image is zero-padded bottom/right to a multiple of the patch size;
  2. patch merging zero-pads odd feature maps to even;
  3. before attention each block zero-pads its map bottom/right to a multiple of
     the stage window; padded tokens are masked as keys and cropped afterwards;
  4. the odd blocks of a stage shift by window // 2 along a dimension only where
     the (unpadded) map is larger than the window in that dimension.
Windows are fixed at build time from `config.img_size` as in the official code:
a stage whose resolution there is <= the window uses its resolution as the window.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import WindowAttentionV1, WindowAttentionV2, window_attention_mask
from .gemm import fast_linear, linear_grads, tracing
from .lean import mlp_branch
from .recompute import recompute_block
from .layers import DropPath, Mlp, PatchEmbed, PatchMerging, pad_to_multiple, window_partition, window_reverse
from .registry import SwinConfig


class SwinBlock(nn.Module):
    """One (optionally shifted) window-attention block plus MLP. `[B, H, W, C]` -> `[B, H, W, C]`.

    v1: x + attn(norm1(x)), then x + mlp(norm2(x))   (pre-norm)
    v2: x + norm1(attn(x)), then x + norm2(mlp(x))   (residual post-norm)
    """

    def __init__(self, dim: int, num_heads: int, window: int, version: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 pretrained_window: int = 0):
        super().__init__()
        self.version = version
        self.window = window
        # What backward recomputes instead of storing: "none"; "selective" (the attention branch:
        # norm, qkv, attention, projection; the MLP keeps its matmul output); "full" (the whole block).
        self.recompute = "none"
        self.lean = True  # memory-lean autograd in training (see models/lean.py)
        self.norm1 = nn.LayerNorm(dim)
        if version == 1:
            self.attn = WindowAttentionV1(dim, num_heads, window, qkv_bias, attn_drop, drop)
        else:
            self.attn = WindowAttentionV2(dim, num_heads, window, qkv_bias, attn_drop, drop, pretrained_window)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path2 = DropPath(drop_path)

    def _window_attention(self, x: torch.Tensor, shift: tuple[int, int], mask: torch.Tensor | None) -> torch.Tensor:
        """Pad, cyclic-shift, attend within windows, undo both. `[B, H, W, C]` -> `[B, H, W, C]`."""
        _, height, width, _ = x.shape
        x = pad_to_multiple(x, self.window, self.window)
        padded_h, padded_w = x.shape[1:3]
        if shift[0] or shift[1]:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        x = window_reverse(self.attn(window_partition(x, self.window), mask), self.window, padded_h, padded_w)
        if shift[0] or shift[1]:
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        if padded_h != height or padded_w != width:
            x = x[:, :height, :width, :].contiguous()
        return x

    def _mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        if self.lean and torch.is_grad_enabled() and not (self.training and self.mlp.drop.p > 0):
            return mlp_branch(x, self.norm2, self.mlp, pre_norm=self.version == 1)
        return self.mlp(self.norm2(x)) if self.version == 1 else self.norm2(self.mlp(x))

    def _attention_branch(self, x: torch.Tensor, shift: tuple[int, int], mask: torch.Tensor | None) -> torch.Tensor:
        if self.version == 1:
            return self._window_attention(self.norm1(x), shift, mask)
        return self.norm1(self._window_attention(x, shift, mask))

    def forward_parts(self, x: torch.Tensor, shift: tuple[int, int], mask: torch.Tensor | None,
                      keep: tuple = (None, None), recompute_attention: bool = False) -> torch.Tensor:
        """The block; `keep` replays drop-path masks drawn by `drop_path_masks` (None: draw here)."""
        if recompute_attention:
            branch = checkpoint(self._attention_branch, x, shift, mask, use_reentrant=False)
        else:
            branch = self._attention_branch(x, shift, mask)
        x = x + self.drop_path1(branch, keep[0])
        return x + self.drop_path2(self._mlp_branch(x), keep[1])

    def forward_without_grad(self, x: torch.Tensor, shift, mask, keep) -> torch.Tensor:
        """For `models.recompute`: the forward pass that backward will repeat, autograd off, with the
        kernels the repetition uses, so the output equals the recomputed one bit for bit."""
        self.attn.recompute_forward = True
        try:
            with torch.no_grad():
                return self.forward_parts(x, shift, mask, keep)
        finally:
            self.attn.recompute_forward = False

    def has_dropout(self) -> bool:
        """Elementwise dropout anywhere in the block (attention, projection or MLP)."""
        return self.attn.attn_drop > 0 or self.attn.proj_drop.p > 0 or self.mlp.drop.p > 0

    def drop_path_masks(self, x: torch.Tensor) -> tuple:
        """Both residual branches' drop-path masks for a batch like `x`, drawn in forward's order."""
        return self.drop_path1.new_mask(x), self.drop_path2.new_mask(x)

    def recompute_for_backward(self, x: torch.Tensor, shift, mask, keep, grad_out: torch.Tensor):
        """For `models.recompute`: rebuild what backward needs from the block input `x` (autograd
        recording) and return (outputs, their gradients, parameter gradients computed directly).

        v1 stops before fc2: its output only feeds the residual sum, so backward needs fc2's input
        and weight, not its output; fc2's gradients are formed here. v2 normalises fc2's output and
        so recomputes the whole block."""
        self.attn.keep_probs = True  # the slice is small: store the probabilities, not a third softmax
        try:
            if self.version != 1:
                return (self.forward_parts(x, shift, mask, keep),), (grad_out,), {}
            x1 = x + self.drop_path1(self._attention_branch(x, shift, mask), keep[0])
        finally:
            self.attn.keep_probs = False
        hidden = F.gelu(fast_linear(self.norm2(x1), self.mlp.fc1.weight, self.mlp.fc1.bias))
        grad_branch = grad_out if keep[1] is None else grad_out * keep[1].to(grad_out.dtype)
        fc2 = self.mlp.fc2
        grad_hidden, grad_w2, grad_b2 = linear_grads(grad_branch.to(hidden.dtype), hidden.detach(),
                                                     fc2.weight.to(hidden.dtype))
        direct = {id(fc2.weight): grad_w2.to(fc2.weight.dtype), id(fc2.bias): grad_b2.to(fc2.bias.dtype)}
        return (x1, hidden), (grad_out, grad_hidden), direct

    def forward(self, x: torch.Tensor, shift: tuple[int, int] = (0, 0),
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.recompute == "none" or not torch.is_grad_enabled():
            return self.forward_parts(x, shift, mask)
        if self.recompute == "full":
            if self.training and self.has_dropout():  # elementwise masks cannot be re-drawn per slice: recompute the whole batch
                return checkpoint(self.forward_parts, x, shift, mask, use_reentrant=False)
            return recompute_block(self, x, shift, mask)
        return self.forward_parts(x, shift, mask, recompute_attention=True)  # "selective"


class SwinStage(nn.Module):
    """Optional patch merging, then `depth` blocks alternating plain and shifted windows.

    `[B, H, W, C_in]` -> `[B, H', W', C_out]`. Attention masks depend only on the
    feature-map size, so they are built once per size and cached.
    """

    def __init__(self, dim: int, out_dim: int, depth: int, num_heads: int, window: int, version: int,
                 downsample: bool, mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float,
                 drop_path: list[float], pretrained_window: int = 0):
        super().__init__()
        self.window = window
        self.downsample = PatchMerging(dim, version) if downsample else nn.Identity()
        self.blocks = nn.ModuleList(
            SwinBlock(out_dim, num_heads, window, version, mlp_ratio, qkv_bias, drop, attn_drop, drop_path[i],
                      pretrained_window)
            for i in range(depth))
        self._mask_cache: dict[tuple, tuple] = {}

    def shifts_and_masks(self, height: int, width: int, device: torch.device):
        """((shift, mask) for plain blocks, (shift, mask) for shifted blocks) at this map size."""
        key = (height, width, device)
        cached = self._mask_cache.get(key)
        if cached is not None:
            return cached
        window = self.window
        padded_h, padded_w = math.ceil(height / window) * window, math.ceil(width / window) * window
        shift = (window // 2 if height > window else 0, window // 2 if width > window else 0)
        plain = ((0, 0), window_attention_mask(padded_h, padded_w, height, width, window, (0, 0), device))
        shifted = (shift, window_attention_mask(padded_h, padded_w, height, width, window, shift, device))
        result = (plain, shifted)
        if not tracing():
            if len(self._mask_cache) >= 8:
                self._mask_cache.pop(next(iter(self._mask_cache)))
            self._mask_cache[key] = result
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        plain, shifted = self.shifts_and_masks(x.shape[1], x.shape[2], x.device)
        for i, block in enumerate(self.blocks):
            shift, mask = shifted if i % 2 else plain
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
        total = sum(config.depths)
        rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear in depth
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
        self.init_weights()

    # ----------------------------------------------------------------- init
    def init_weights(self) -> None:
        """Official init: truncated normal (std .02) for linear weights and bias tables, zero biases;
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
        if self.config.version == 2:
            for stage in self.layers:
                for block in stage.blocks:
                    for norm in (block.norm1, block.norm2):
                        nn.init.zeros_(norm.weight)
                        nn.init.zeros_(norm.bias)

    # -------------------------------------------------------------- forward
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, C_in, H, W]` -> normalised last-stage map `[B, H/32, W/32, num_features]` (for patch 4)."""
        return self.norm(self.layers(self.patch_embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """`[B, H, W, num_features]` -> `[B, num_classes]` (or pooled `[B, num_features]`)."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Output of every stage as NCHW maps; the last one after the final norm.

        Swin-T at 224: [B,96,56,56], [B,192,28,28], [B,384,14,14], [B,768,7,7].
        """
        x = self.patch_embed(x)
        maps = []
        for i, stage in enumerate(self.layers):
            x = stage(x)
            out = self.norm(x) if i == len(self.layers) - 1 else x
            maps.append(out.permute(0, 3, 1, 2).contiguous())
        return maps

    # ------------------------------------------------------------ utilities
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block in backward instead of storing its activations."""
        self.set_recompute("full" if enable else "none")

    RECOMPUTE_MODES = ("none", "selective", "full")

    def set_recompute(self, plan: str | list[str]) -> None:
        """What each block recomputes in backward: one mode for all blocks or a list, one per block
        (modes: "none", "selective" = the attention branch, "full" = the whole block)."""
        blocks = self.blocks()
        modes = [plan] * len(blocks) if isinstance(plan, str) else list(plan)
        if len(modes) != len(blocks) or any(m not in self.RECOMPUTE_MODES for m in modes):
            raise ValueError(f"recompute plan must be one of {self.RECOMPUTE_MODES} or a list of "
                             f"{len(blocks)} of them, got {plan!r}")
        for block, mode in zip(blocks, modes):
            block.recompute = mode

    def recompute_plan(self) -> list[str]:
        return [block.recompute for block in self.blocks()]

    def set_lean_training(self, enable: bool = True) -> None:
        """Use the memory-lean autograd kernels of `models/lean.py` (default) or plain autograd."""
        for block in self.blocks():
            block.lean = block.attn.lean = enable
        self.patch_embed.lean = enable
        for stage in self.layers:
            if isinstance(stage.downsample, PatchMerging):
                stage.downsample.lean = enable

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
        return ("relative_position_bias_table", "logit_scale", "cpb_mlp")

    def flops(self, img_size: int | tuple[int, int] | None = None) -> int:
        """Multiply-accumulates of one forward pass (the official count: GMACs reported as 'FLOPs').

        Swin-T at 224 gives 4.5e9. Constant position-bias work (v2's CPB MLP) is excluded,
        as it is precomputable; padding is included.
        """
        config = self.config
        if img_size is None:
            img_size = config.img_size
        if isinstance(img_size, int):
            img_size = (img_size, img_size)
        resolutions = config.stage_resolutions(img_size)
        height, width = resolutions[0]
        macs = height * width * config.embed_dim * config.in_chans * config.patch_size ** 2
        if config.patch_norm:
            macs += height * width * config.embed_dim
        dim = config.embed_dim
        for i, stage in enumerate(self.layers):
            if i > 0:
                prev_h, prev_w = resolutions[i - 1]
                macs += prev_h * prev_w * dim  # norm of merging, as the official count
                dim *= 2
                height, width = resolutions[i]
                macs += height * width * (2 * dim) * dim
            height, width = resolutions[i]
            window = stage.window
            padded = math.ceil(height / window) * math.ceil(width / window)
            tokens = window * window
            heads = stage.blocks[0].attn.num_heads
            for _ in stage.blocks:
                macs += 2 * height * width * dim  # two norms
                attn = tokens * dim * 3 * dim + 2 * heads * tokens * tokens * (dim // heads) + tokens * dim * dim
                macs += padded * attn
                macs += 2 * height * width * dim * int(dim * config.mlp_ratio)
        height, width = resolutions[-1]
        macs += height * width * self.num_features
        if self.num_classes > 0:
            macs += self.num_features * self.num_classes
        return int(macs)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
